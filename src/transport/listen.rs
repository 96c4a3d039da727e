//! The incoming side: the listener and one reader task per accepted connection, which checks
//! the password and `HELLO`, hands raft messages to the node, runs forwarded commands and serves
//! snapshot chunks.

use super::claims::Claims;
use super::*;
use crate::unwind::CatchUnwind;
use std::time::Instant;

/// How long a rejected connection is kept half-open so the client can read our `-ERR` before the
/// socket closes (closing with unread input would send a reset that may destroy the reply).
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// A backstop for a forwarded command on the leader (its own write-timeout normally ends it).
const FORWARD_BACKSTOP: Duration = Duration::from_secs(60);
/// What a follower may send on a connection that waits for a forwarded command's answer before
/// the leader stops reading it (it sends nothing, normally: the read only notices a hang-up).
const FORWARD_READ_AHEAD: usize = 1 << 20;
/// With a password: how much a connection may send before it has logged in (an `AUTH` is a few
/// hundred bytes), how long it has to log in, and how many may be waiting to, as Redis limits
/// its own clients before they authenticate. Without these a stranger could make this node
/// buffer gigabytes, or hold its file descriptors, without knowing the password.
const BEFORE_AUTH_MAX_BYTES: usize = 64 * 1024;
const AUTH_WITHIN: Duration = Duration::from_secs(if cfg!(test) { 1 } else { 10 });
pub(super) const MAX_WAITING_FOR_AUTH: usize = 128;
/// Replies are written out once this many bytes are waiting, before more frames are handled: a
/// pipeline of snapshot chunk requests would otherwise pile gigabytes up.
const WRITE_OUT_AT: usize = 8 * 1024 * 1024;

type SnapshotDir = Option<Arc<std::path::PathBuf>>;

/// What the listener's connections are served with.
#[derive(Clone)]
pub(super) struct Served {
    pub(super) me: NodeId,
    /// The transport's peers, to wake the dialer of one that says hello.
    pub(super) dialers: Arc<Mutex<State>>,
    pub(super) inbound: Callback,
    pub(super) snapshots: SnapshotDir,
    pub(super) forward: ForwardSlot,
    pub(super) dataset: DatasetSlot,
    pub(super) removed: RemovedSlot,
    pub(super) health: HealthSlot,
    pub(super) password: Option<Password>,
    pub(super) shared: Option<SharedSettings>,
    pub(super) claims: Arc<Claims>,
    pub(super) clusters: Arc<Clusters>,
    /// Connections that have not logged in yet (with a password).
    pub(super) waiting_for_auth: Arc<std::sync::atomic::AtomicUsize>,
}

pub(super) async fn accept_loop(listener: TcpListener, served: Served) {
    // Each connection is a task of its own, so a panic serving one closes only it. One here (a
    // bug) would otherwise close the port for good while the node went on looking alive.
    loop {
        if let Err(panic) = CatchUnwind::new(accept_connections(&listener, &served)).await {
            log::error!("raft transport: internal error accepting connections: {panic}; accepting again");
        }
    }
}

async fn accept_connections(listener: &TcpListener, served: &Served) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let _ = super::keepalive::enable(&stream);
                tokio::spawn(serve(stream, remote, served.clone()));
            }
            Err(e) => {
                // Typically out of file descriptors: pause instead of spinning on the error.
                log::warn!("raft transport: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a connection is being closed: the error line sent back (and logged).
struct Reject(String);

impl Reject {
    /// An `-ERR` reply: the peer sent something this side does not accept.
    fn err(reason: impl std::fmt::Display) -> Reject {
        Reject(format!("ERR {reason}"))
    }
}

/// The node id and incarnation a connection said hello as (see [`Claims`]), given up when the
/// connection ends, however it ends.
struct Speaker {
    claims: Arc<Claims>,
    claim: Option<(NodeId, u64)>,
}

impl Speaker {
    fn release(&mut self) {
        if let Some((id, incarnation)) = self.claim.take() {
            self.claims.closed(id, incarnation);
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.release();
    }
}

/// Counts a connection among those that have not logged in, until it does or closes.
struct WaitingForAuth(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl WaitingForAuth {
    /// None: too many are waiting already.
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> Option<WaitingForAuth> {
        use std::sync::atomic::Ordering::AcqRel;
        let before = count.fetch_add(1, AcqRel);
        let entered = WaitingForAuth(Some(count.clone()));
        (before < MAX_WAITING_FOR_AUTH).then_some(entered)
    }

    fn logged_in(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl Drop for WaitingForAuth {
    fn drop(&mut self) {
        self.logged_in();
    }
}

/// Capacity an empty connection buffer may keep between frames; beyond it, the buffer is
/// replaced by one of `fresh` bytes.
const KEEP_WHEN_IDLE: usize = 1 << 20;

/// Replaces `buffer`, if it is empty and holds more than [`KEEP_WHEN_IDLE`], by one of `fresh`
/// bytes (a `BytesMut` never gives capacity back by itself).
fn shrink_if_idle(buffer: &mut BytesMut, fresh: usize) {
    if buffer.is_empty() && buffer.capacity() > KEEP_WHEN_IDLE {
        *buffer = BytesMut::with_capacity(fresh);
    }
}

/// Reads frames from one connection until it closes or misbehaves.
async fn serve(mut stream: TcpStream, remote: SocketAddr, served: Served) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut authenticated = served.password.is_none();
    let mut waiting_for_auth = None;
    if !authenticated {
        match WaitingForAuth::enter(&served.waiting_for_auth) {
            Some(entered) => waiting_for_auth = Some(entered),
            None => return reject(stream, remote, out, Reject::err("too many connections waiting to log in")).await,
        }
    }
    let auth_by = tokio::time::Instant::now() + AUTH_WITHIN;
    let mut speaker = Speaker { claims: served.claims.clone(), claim: None };
    let mut downloading = Downloading::default();
    loop {
        // Handle every complete frame already buffered before reading more.
        loop {
            let frame = match resp::parse(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return reject(stream, remote, out, Reject::err(format!("protocol error: {e}"))).await,
            };
            match peer_auth::gate(served.password.as_ref(), &mut authenticated, &frame) {
                Gate::Pass => {}
                Gate::Accepted => {
                    waiting_for_auth.take();
                    resp::encode(&Frame::Simple("OK".into()), &mut out);
                    continue;
                }
                Gate::Refuse(line) => return reject(stream, remote, out, Reject(line)).await,
            }
            // A forwarded command is answered when the cluster has run it; replies stay in order
            // because this connection waits for it before handling more.
            if let Some(request) = as_forward(&frame) {
                let reply = match request {
                    Ok(req) => match run_forwarded(&served.forward, &served.dataset, req, &mut stream, &mut buf).await {
                        Some(reply) => reply,
                        None => return log::debug!("raft transport: {remote} hung up on a forwarded command"),
                    },
                    Err(e) => Frame::Error(format!("ERR {e}")),
                };
                resp::encode(&reply, &mut out);
                continue;
            }
            let handled = match as_snapshot_chunk(frame) {
                Ok(args) => read_snapshot_chunk(args, &served, &mut downloading).await.map(Some),
                Err(frame) => handle(frame, &served, &mut speaker),
            };
            match handled {
                Ok(None) => {}
                Ok(Some(reply)) => resp::encode(&reply, &mut out),
                Err(why) => return reject(stream, remote, out, why).await,
            }
            if out.len() >= WRITE_OUT_AT {
                if let Err(e) = write_fully(&mut stream, &out).await {
                    log::debug!("raft transport: connection from {remote}: {e}");
                    return;
                }
                out.clear();
            }
        }
        if !authenticated && buf.len() > BEFORE_AUTH_MAX_BYTES {
            return reject(stream, remote, out, Reject(peer_auth::NOAUTH.into())).await;
        }
        if !out.is_empty() {
            if let Err(e) = write_fully(&mut stream, &out).await {
                log::debug!("raft transport: connection from {remote}: {e}");
                return;
            }
            out.clear();
        }
        // A connection lives for weeks, and a follower pools up to 32 of them to forward through:
        // buffers one big request or reply grew give their memory back once it has passed.
        // (A node's connections to its peers are one each, and keep theirs: see `dial`.)
        shrink_if_idle(&mut out, 0);
        shrink_if_idle(&mut buf, 64 * 1024);
        buf.reserve(16 * 1024);
        let read = if authenticated {
            stream.read_buf(&mut buf).await
        } else {
            match tokio::time::timeout_at(auth_by, stream.read_buf(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return reject(stream, remote, out, Reject(peer_auth::NOAUTH.into())).await,
            }
        };
        match read {
            Ok(0) if buf.is_empty() => return,
            Ok(0) => {
                log::debug!("raft transport: connection from {remote} closed in the middle of a frame");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                log::debug!("raft transport: connection from {remote}: {e}");
                return;
            }
        }
    }
}

/// `Some` if `frame` is a `FORWARD` or `FORWARD-TX` command (with its parsed request, or why it
/// is malformed).
fn as_forward(frame: &Frame) -> Option<Result<ForwardRequest, String>> {
    let Frame::Array(args) = frame else { return None };
    match args.first() {
        Some(Frame::Bulk(verb)) if ForwardRequest::is_verb(verb) => Some(ForwardRequest::decode(verb, &args[1..])),
        _ => None,
    }
}

/// The reply to one forwarded request, or None if the follower hung up before it came (the
/// handler is told, through [`Abandoned`]). The connection is read meanwhile, to notice that:
/// what arrives is kept in `buf` for later.
async fn run_forwarded(
    slot: &ForwardSlot,
    dataset: &DatasetSlot,
    req: ForwardRequest,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Option<Frame> {
    let handler = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(handler) = handler else {
        return Some(Frame::Error("ERR this node does not serve forwarded commands".into()));
    };
    let dataset = dataset.read().unwrap_or_else(|p| p.into_inner()).clone();
    // A blocking command may wait for ever; anything else is answered within write-timeout.
    let backstop = if req.is_blocking() { None } else { Some(FORWARD_BACKSTOP) };
    let (tx, rx) = oneshot::channel();
    let abandoned = Abandoned::default();
    handler(
        req,
        Box::new(move |reply| {
            // Read where the reply is produced: later, the dataset may have moved on, or not yet
            // have counted the entry being applied as applied.
            let reflects = dataset.map_or(LogIndex(0), |d| d.reflects());
            let _ = tx.send((reply, reflects));
        }),
        abandoned.clone(),
    );
    let answer = async {
        match backstop {
            Some(backstop) => tokio::time::timeout(backstop, rx).await.ok(),
            None => Some(rx.await),
        }
    };
    tokio::pin!(answer);
    let mut open = true;
    loop {
        tokio::select! {
            reply = &mut answer => return Some(match reply {
                Some(Ok((reply, reflects))) => forward::reply_frame(reply, reflects),
                _ => Frame::Error("TIMEOUT the forwarded command was not answered; it may or may not have taken effect".into()),
            }),
            read = stream.read_buf(buf), if open => match read {
                Ok(0) | Err(_) => {
                    abandoned.set();
                    return None;
                }
                // Only a misbehaving follower sends more before its answer; served after it.
                Ok(_) => open = buf.len() < FORWARD_READ_AHEAD,
            },
        }
    }
}

/// Acts on one command; `Ok(Some)` is a reply to send back.
fn handle(frame: Frame, served: &Served, speaker: &mut Speaker) -> Result<Option<Frame>, Reject> {
    let (me, inbound) = (served.me, &served.inbound);
    let not_a_command = || Reject::err("expected a command (an array of bulk strings)");
    let Frame::Array(mut args) = frame else {
        return Err(not_a_command());
    };
    let Some(Frame::Bulk(name)) = args.first() else {
        return Err(not_a_command());
    };
    // Case-insensitive, as in Redis: an operator may well type `ping`.
    let is = |command: &str| name.eq_ignore_ascii_case(command.as_bytes());
    if is("MSGS") {
        if let Some((id, incarnation)) = speaker.claim {
            served.claims.heard(id, incarnation, Instant::now()).map_err(Reject::err)?;
        }
        let mut msgs = Vec::with_capacity(args.len() - 1);
        let mut misrouted = 0;
        for (i, arg) in args.iter().enumerate().skip(1) {
            let Frame::Bulk(bytes) = arg else {
                return Err(Reject::err(format!("MSGS argument {i} is not a bulk string")));
            };
            let msg = Message::decode(&bytes[..]).map_err(|e| Reject::err(format!("MSGS argument {i} is not a raft message: {e}")))?;
            // A peer that knows us under another node's (old) address: raft trusts `to`, so such
            // messages must not reach it.
            if msg.to != me.get() {
                misrouted += 1;
                continue;
            }
            if let Some(why) = removed_voter(&served.removed, &msg) {
                return Err(Reject(format!("REMOVED {why}")));
            }
            msgs.push(msg);
        }
        if misrouted > 0 {
            log::warn!("raft transport: dropped {misrouted} messages addressed to another node (I am {me})");
        }
        if !msgs.is_empty() {
            inbound(Inbound::Raft(msgs));
        }
        Ok(None)
    } else if is("HELLO") {
        let usage = || {
            Reject::err(
                "usage: HELLO <node-id> <host:port> [<client host:port> [<settings> [<last log index> [<incarnation> \
                 [<cluster id>]]]]]",
            )
        };
        // Words after those this build knows are ignored: a node of a later build may say more.
        let (3.., Some(Frame::Bulk(id)), Some(Frame::Bulk(addr))) = (args.len(), args.get(1), args.get(2)) else {
            return Err(usage());
        };
        let text = |i: usize, what: &str| match args.get(i) {
            Some(Frame::Bulk(bytes)) => {
                std::str::from_utf8(bytes).map(|s| Some(s.to_string())).map_err(|_| Reject::err(format!("HELLO: {what} is not UTF-8")))
            }
            Some(_) => Err(usage()),
            None => Ok(None),
        };
        let client_addr = text(3, "client address")?;
        let from = std::str::from_utf8(id)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| Reject::err("HELLO: invalid node id"))?;
        if let Some(theirs) = text(7, "cluster id")? {
            let theirs = ClusterId::parse(&theirs).ok_or_else(|| Reject::err("HELLO: invalid cluster id"))?;
            if let Some(why) = served.clusters.ours().refuses(theirs, from) {
                return Err(Reject::err(why));
            }
            served.clusters.said.lock().unwrap_or_else(|p| p.into_inner()).insert(NodeId(from), theirs);
        }
        if let (Some(ours), Some(theirs)) = (&served.shared, text(4, "settings")?.filter(|t| !t.is_empty())) {
            if let Some(differ) = ours.differences(&SharedSettings::decode(&theirs)) {
                return Err(Reject::err(format!("node {from}'s Redis settings differ from this node's: {differ}")));
            }
        }
        if let Some(last_index) = text(5, "last log index")? {
            let last_index = last_index.parse::<u64>().map_err(|_| Reject::err("HELLO: invalid last log index"))?;
            if let Some(why) = removed_member(&served.removed, NodeId(from), last_index) {
                return Err(Reject(format!("REMOVED {why}")));
            }
        }
        let addr = std::str::from_utf8(addr).map_err(|_| Reject::err("HELLO: address is not UTF-8"))?;
        if let Some(incarnation) = text(6, "incarnation")? {
            let incarnation = incarnation.parse::<u64>().map_err(|_| Reject::err("HELLO: invalid incarnation"))?;
            speaker.release();
            served.claims.hello(NodeId(from), incarnation, addr, Instant::now()).map_err(Reject::err)?;
            speaker.claim = Some((NodeId(from), incarnation));
        }
        served.dialers.lock().unwrap_or_else(|p| p.into_inner()).heard_from(NodeId(from));
        inbound(Inbound::Hello { from: NodeId(from), addr: addr.to_string(), client_addr });
        Ok(None)
    } else if is("HEALTH") {
        let source = served.health.read().unwrap_or_else(|p| p.into_inner()).clone();
        let answer = source.map_or_else(|| Err("ERR this node is not running raft yet".into()), |source| source());
        Ok(Some(answer.map_or_else(Frame::Error, |report| Frame::Bulk(report.into_bytes().into()))))
    } else if is("PING") {
        match args.len() {
            1 => Ok(Some(Frame::Simple("PONG".into()))),
            2 => Ok(Some(args.swap_remove(1))),
            _ => Err(Reject::err("usage: PING [message]")),
        }
    } else {
        let shown = String::from_utf8_lossy(&name[..name.len().min(32)]).into_owned();
        Err(Reject::err(format!("unknown command '{shown}'")))
    }
}

/// Why the sender of `msg` is refused, if it asks for votes and was removed from the cluster.
fn removed_voter(slot: &RemovedSlot, msg: &Message) -> Option<String> {
    if !matches!(msg.get_msg_type(), MessageType::MsgRequestVote | MessageType::MsgRequestPreVote) {
        return None;
    }
    removed_member(slot, NodeId(msg.from), msg.index)
}

/// Why `from`, whose log ends at `last_index`, is refused, if it was removed from the cluster.
fn removed_member(slot: &RemovedSlot, from: NodeId, last_index: u64) -> Option<String> {
    let check = slot.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    check(from, last_index)
}

/// Largest chunk a peer may ask for at once.
pub const MAX_SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;

/// The snapshot file a connection downloads, kept open from its first chunk to the connection's
/// end. A newer snapshot deletes it meanwhile: reopened for every chunk, it would be gone, and the
/// download would start over with the newer one, never to finish if snapshots come faster than
/// a download takes (a large dataset under writes).
#[derive(Default)]
struct Downloading(Option<(String, std::fs::File)>);

/// The arguments of a `SNAPSHOT.CHUNK` command, or the frame back if it is something else.
fn as_snapshot_chunk(frame: Frame) -> Result<Vec<Frame>, Frame> {
    match frame {
        Frame::Array(args) if matches!(args.first(), Some(Frame::Bulk(name)) if name.eq_ignore_ascii_case(b"SNAPSHOT.CHUNK")) => Ok(args),
        other => Err(other),
    }
}

/// [`snapshot_chunk`] off the runtime's thread, which the Raft loop shares: a 4 MB read from a
/// cold disk would hold up its heartbeats.
async fn read_snapshot_chunk(args: Vec<Frame>, served: &Served, downloading: &mut Downloading) -> Result<Frame, Reject> {
    let dir = served.snapshots.clone();
    let mut taken = std::mem::take(downloading);
    let read = tokio::task::spawn_blocking(move || {
        let reply = snapshot_chunk(&args, dir.as_deref().map(|p| p.as_path()), &mut taken);
        (reply, taken)
    });
    match read.await {
        Ok((reply, kept)) => {
            *downloading = kept;
            reply
        }
        Err(e) => Ok(Frame::Error(format!("ERR internal error reading a snapshot chunk: {e}"))),
    }
}

/// `SNAPSHOT.CHUNK <file> <offset> <len>`: bytes of one of our snapshot files. Only plain file
/// names of snapshot files are served, never a path. A read error is an `-ERR` reply, not a reason
/// to drop the connection (the fetcher retries or gives up).
fn snapshot_chunk(args: &[Frame], dir: Option<&std::path::Path>, downloading: &mut Downloading) -> Result<Frame, Reject> {
    let usage = || Reject::err("usage: SNAPSHOT.CHUNK <file> <offset> <len>");
    let [_, Frame::Bulk(file), Frame::Bulk(offset), Frame::Bulk(len)] = args else { return Err(usage()) };
    let number = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|s| s.parse::<u64>().ok());
    let (Some(offset), Some(len)) = (number(offset), number(len)) else { return Err(usage()) };
    let Some(dir) = dir else { return Ok(Frame::Error("ERR this node serves no snapshots".into())) };
    let name = std::str::from_utf8(file).unwrap_or("");
    if !crate::snapshot_transfer::is_plain_name(name) {
        return Err(Reject::err(format!("SNAPSHOT.CHUNK: '{}' is not a snapshot file name", String::from_utf8_lossy(file))));
    }
    let len = (len as usize).min(MAX_SNAPSHOT_CHUNK);
    let file = match downloading.0.take() {
        Some((open, file)) if open == name => file,
        _ => match std::fs::File::open(dir.join(name)) {
            Ok(file) => file,
            Err(e) => return Ok(Frame::Error(format!("ERR cannot read {name}: {e}"))),
        },
    };
    let read = crate::snapshot_file::read_chunk(&file, offset, len);
    downloading.0 = Some((name.to_string(), file));
    match read {
        Ok(bytes) => Ok(Frame::Bulk(bytes.into())),
        Err(e) => Ok(Frame::Error(format!("ERR cannot read {name}: {e}"))),
    }
}

/// Logs, answers with the error line best-effort (after any replies still in `out`) and closes
/// the connection.
async fn reject(mut stream: TcpStream, remote: SocketAddr, mut out: BytesMut, Reject(line): Reject) {
    log::warn!("raft transport: closing connection from {remote}: {line}");
    resp::encode(&Frame::Error(line), &mut out);
    let _ = tokio::time::timeout(REJECT_LINGER, async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        // Swallow what the client still sends until it closes too, so our close does not turn
        // into a reset that could discard the -ERR before the client reads it.
        let mut sink = [0u8; 4096];
        let mut budget: usize = 1024 * 1024;
        while budget > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => budget = budget.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod buffer_tests {
    use super::*;

    #[test]
    fn an_idle_buffer_gives_back_what_a_big_frame_grew() {
        let mut grown = BytesMut::with_capacity(8 << 20);
        shrink_if_idle(&mut grown, 64 * 1024);
        assert!(grown.capacity() >= 64 * 1024 && grown.capacity() < 1 << 20, "{}", grown.capacity());
        // Not while it holds part of the next frame.
        let mut busy = BytesMut::with_capacity(8 << 20);
        busy.extend_from_slice(b"*1\r\n");
        shrink_if_idle(&mut busy, 0);
        assert!(busy.capacity() >= 8 << 20);
        // Nor a buffer of ordinary size.
        let mut small = BytesMut::with_capacity(256 * 1024);
        shrink_if_idle(&mut small, 0);
        assert!(small.capacity() >= 256 * 1024);
    }
}
