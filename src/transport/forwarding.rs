//! A follower's side of the proxy: a forwarded command goes to the leader on a pooled (or new)
//! connection, and its reply comes back to the module.

use super::*;

/// Idle connections kept per leader address for forwarded commands.
const FORWARD_POOL: usize = 32;

/// How long the answer of a blocking command, which has no timeout of its own, waits for this
/// node's dataset to catch up with the leader's (see [`catch_up`]).
const BLOCKING_CATCH_UP: Duration = Duration::from_secs(5);

/// The least time an answer waits for this node to catch up, even past its forward's timeout: an
/// answer that came in just then (this node was paused meanwhile, say, with the leader's news
/// waiting in its sockets too) still gets the moment catching up takes. Well inside the margin
/// every client's backstop leaves beyond its forward's timeout (one second at the least).
const CATCH_UP_FLOOR: Duration = Duration::from_millis(500);

/// How long an answer that came `elapsed` into a forward with `timeout` may wait for this node
/// to catch up: within the forward's own time, or a moment past it, which the client's backstop
/// allows for (a client timed out after its write, or pop, took effect would not know).
pub(super) fn catch_up_limit(timeout: Option<Duration>, elapsed: Duration) -> Duration {
    timeout.map_or(BLOCKING_CATCH_UP, |t| t.saturating_sub(elapsed).max(CATCH_UP_FLOOR))
}

/// Waits, at most `limit`, until this node's reads see the leader's dataset as it was when it
/// answered a forwarded command (`reflects`), so that the client, once answered, reads its own
/// write here too. A follower normally has: the leader sends the new commit index to its
/// followers before it applies the entry and answers. One that lags further has its client
/// answered anyway after `limit`, and counted: the write did take effect.
pub(super) async fn catch_up(inner: &Inner, reflects: LogIndex, limit: Duration) {
    let Some(dataset) = inner.dataset.read().unwrap_or_else(|p| p.into_inner()).clone() else { return };
    let (caught_up, wait) = oneshot::channel();
    dataset.when_reflects(
        reflects,
        Box::new(move || {
            let _ = caught_up.send(());
        }),
    );
    let mut wait = wait;
    if !matches!(wait.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
        // Caught up already (or the dataset dropped the wait: nothing to wait for).
        return;
    }
    inner.catch_ups.fetch_add(1, Ordering::Relaxed);
    if tokio::time::timeout(limit, wait).await.is_err() {
        inner.catch_ups_late.fetch_add(1, Ordering::Relaxed);
        log::debug!("raft transport: a forwarded reply is relayed before this node has applied index {reflects}");
    }
}

/// How long after its first refusal a forward keeps trying leaders.
const RETRY_FOR: Duration = Duration::from_secs(3);

/// How long before a forward goes again to a leader that refused it for now.
const SAME_LEADER_PAUSE: Duration = Duration::from_millis(100);

/// How often it looks for a new leader meanwhile.
const NEW_LEADER_POLL: Duration = Duration::from_millis(20);

/// Where a forward that ran nothing goes again.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Retry {
    /// To another leader: the node no longer leads, or cannot be reached.
    Elsewhere,
    /// To the leader this node knows of then, maybe the same: it could not take it for now
    /// (its leadership is moving and raft drops proposals, say).
    Later,
}

/// [`forward_once`] to `addr`, then, where the node there ran none of it, to the leader this
/// node learns of next, for [`RETRY_FOR`] after the first refusal: that node no longer leads
/// (`-MOVED`), or could not take it (`-CLUSTERDOWN`: leadership is moving, or it could not be
/// reached). A follower's clients then ride through a change of leader, and only what may have
/// run comes back as an error (`-TIMEOUT`).
pub(super) async fn forward_to_leader(inner: &Inner, mut addr: String, request: &[u8]) -> Result<(Vec<u8>, LogIndex), String> {
    let mut give_up_at = None;
    loop {
        let reply = forward_once(inner, &addr, request).await;
        let Some(retry) = reply.as_ref().err().and_then(|e| retry_of(e)) else { return reply };
        let give_up = *give_up_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY_FOR);
        match next_leader(inner, &addr, retry, give_up).await {
            Some(next) => addr = next,
            None => return reply,
        }
    }
}

/// Whether, and where, a forward whose answer was `error` goes again. Only a redirect and a
/// `-CLUSTERDOWN` say that nothing of it ran ("not done, try again"); a leader that refused
/// this node's password will not take it the next time either.
fn retry_of(error: &str) -> Option<Retry> {
    if error.starts_with("MOVED ") || error.starts_with("CLUSTERDOWN cannot reach the leader") {
        Some(Retry::Elsewhere)
    } else if error.starts_with("CLUSTERDOWN ") && !error.starts_with("CLUSTERDOWN cannot use the leader") {
        Some(Retry::Later)
    } else {
        None
    }
}

/// The side-port address of the leader to go to next: one other than `addr` as soon as this node
/// knows of one, or for [`Retry::Later`], whichever it knows of after [`SAME_LEADER_PAUSE`].
/// None at `give_up`.
async fn next_leader(inner: &Inner, addr: &str, retry: Retry, give_up: tokio::time::Instant) -> Option<String> {
    let source = inner.leader.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    let same_from = tokio::time::Instant::now() + SAME_LEADER_PAUSE;
    loop {
        let now = tokio::time::Instant::now();
        match source() {
            Some(leader) if leader != addr => return Some(leader),
            Some(leader) if retry == Retry::Later && now >= same_from => return Some(leader),
            _ if now >= give_up => return None,
            _ => tokio::time::sleep(NEW_LEADER_POLL).await,
        }
    }
}

/// One forwarded command on a pooled (or new) connection to the leader: its reply and the index
/// the leader's dataset reflected when it answered.
pub(super) async fn forward_once(inner: &Inner, addr: &str, request: &[u8]) -> Result<(Vec<u8>, LogIndex), String> {
    forward::read_reply_frame(exchange(inner, addr, request, true).await?)
}

/// One request on a pooled (or new) connection to `addr`, answered with a bulk string. After an
/// error answer the connection goes back to the pool only if `pool_after_error`: a node that
/// refuses a request it does not know (an earlier build) closes the connection it came on.
pub(super) async fn ask_once(inner: &Inner, addr: &str, request: &[u8], pool_after_error: bool) -> forward::ForwardReply {
    match exchange(inner, addr, request, pool_after_error).await? {
        Frame::Bulk(raw) => Ok(raw.to_vec()),
        Frame::Error(e) => Err(e),
        other => Err(format!("ERR the leader answered with {other:?}")),
    }
}

/// Sends `request` to `addr` and reads the one frame of its answer; an error line is an `Err`.
async fn exchange(inner: &Inner, addr: &str, request: &[u8], pool_after_error: bool) -> Result<Frame, String> {
    let mut stream = match pooled_connection(inner, addr) {
        Some(s) => s,
        None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                let _ = s.set_nodelay(true);
                let _ = super::keepalive::enable(&s);
                if let Some(password) = &inner.password {
                    if let Err(e) = peer_auth::authenticate(&mut s, password).await {
                        return Err(format!("CLUSTERDOWN cannot use the leader at {addr}: {e:#}"));
                    }
                }
                s
            }
            Ok(Err(e)) => return Err(format!("CLUSTERDOWN cannot reach the leader at {addr}: {e}")),
            Err(_) => return Err(format!("CLUSTERDOWN cannot reach the leader at {addr}: connect timed out")),
        },
    };
    let lost = |e: &dyn std::fmt::Display| {
        format!("TIMEOUT lost the connection to the leader ({e}); the command may or may not have taken effect")
    };
    write_fully(&mut stream, request).await.map_err(|e| lost(&e))?;
    let mut buf = BytesMut::with_capacity(4096);
    let frame = match resp::read_frame_async(&mut stream, &mut buf).await {
        Ok(frame) => frame,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(lost(&"connection closed")),
        Err(e) => return Err(lost(&e)),
    };
    if buf.is_empty() && (pool_after_error || !matches!(frame, Frame::Error(_))) {
        let mut pool = inner.forward_pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(addr.to_string()).or_default();
        if idle.len() < FORWARD_POOL {
            idle.push(stream);
        }
    }
    match frame {
        Frame::Error(e) => Err(e),
        frame => Ok(frame),
    }
}

/// An idle pooled connection to `addr` that is still open. One the leader has closed meanwhile
/// (it restarted, say) reads as ended: it is dropped, rather than sent a command whose answer
/// could never come and whose outcome would then be unknown.
fn pooled_connection(inner: &Inner, addr: &str) -> Option<TcpStream> {
    let mut pool = inner.forward_pool.lock().unwrap_or_else(|p| p.into_inner());
    let idle = pool.get_mut(addr)?;
    while let Some(stream) = idle.pop() {
        if nothing_to_read(&stream) {
            return Some(stream);
        }
    }
    None
}

/// Whether the socket has nothing to read, neither data nor the peer's close, as the kernel sees
/// it now. Nothing is due on an idle connection, so anything else makes it unusable. (tokio's own
/// `try_read` answers from its reactor's last look, which can predate a close that has arrived.)
fn nothing_to_read(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    let peeked = unsafe { libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    peeked < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

#[cfg(test)]
mod tests {
    use super::{retry_of, Retry};

    #[test]
    fn only_redirects_and_clusterdown_say_nothing_ran() {
        assert_eq!(retry_of("MOVED 1234 127.0.0.1:7002"), Some(Retry::Elsewhere));
        assert_eq!(retry_of("CLUSTERDOWN cannot reach the leader at 127.0.0.1:17001: connection refused"), Some(Retry::Elsewhere));
        assert_eq!(retry_of("CLUSTERDOWN the request was not accepted: raft: proposal dropped"), Some(Retry::Later));
        assert_eq!(retry_of("CLUSTERDOWN cannot use the leader at 127.0.0.1:17001: wrong password"), None);
        assert_eq!(
            retry_of("TIMEOUT lost the connection to the leader (connection closed); the command may or may not have taken effect"),
            None
        );
        assert_eq!(retry_of("ERR unknown command"), None);
    }
}
