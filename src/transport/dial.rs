//! The outgoing side: one long-lived connection per peer, dialed again with backoff when it
//! fails, that says `HELLO` and then writes the peer's queued messages in `MSGS` frames.

use super::*;
use crate::unwind::CatchUnwind;

/// One outgoing frame holds at most this many messages / bytes, so a deep queue becomes a few
/// large writes rather than one giant buffer.
const MAX_BATCH_MSGS: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// The wait between attempts to dial a peer: it doubles after each failure, up to MAX_BACKOFF.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(50);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection counts as working once it has stayed up this long. The receiver answers nothing
/// when all is well, so a refusal (a wrong raft-password) comes after the connect succeeded;
/// counting such a connection as working would retry it every MIN_BACKOFF and warn every time.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// What a connection to a peer starts with.
pub(super) struct Hello {
    pub(super) me: NodeId,
    pub(super) advertise: String,
    pub(super) client: Option<String>,
    /// Encoded; compared only when given.
    pub(super) shared: Option<String>,
    pub(super) last_index: Arc<AtomicU64>,
    /// This transport's, to tell it from another server with the same id (see [`super::claims`]).
    pub(super) incarnation: u64,
    /// This node's cluster id, as of each connection made.
    pub(super) cluster: Arc<Clusters>,
}

impl Hello {
    /// The `HELLO` frame, with the log's last index as of now.
    fn frame(&self) -> BytesMut {
        let mut out = BytesMut::new();
        let id = self.me.to_string();
        let last_index = self.last_index.load(Ordering::Relaxed).to_string();
        let incarnation = self.incarnation.to_string();
        let cluster = self.cluster.ours().to_string();
        let mut args = vec![&b"HELLO"[..], id.as_bytes(), self.advertise.as_bytes()];
        if let Some(client) = &self.client {
            let shared = self.shared.as_deref().unwrap_or_default();
            args.extend([client.as_bytes(), shared.as_bytes(), last_index.as_bytes(), incarnation.as_bytes(), cluster.as_bytes()]);
        }
        resp::encode_command(&args, &mut out);
        out
    }
}

pub(super) struct PeerTask {
    pub(super) id: NodeId,
    pub(super) addr: String,
    pub(super) hello: Hello,
    pub(super) password: Option<Password>,
    pub(super) rx: mpsc::Receiver<Message>,
    pub(super) link: Arc<Link>,
    pub(super) counters: Arc<Counters>,
    pub(super) inbound: Callback,
    /// The wait before the next connection attempt.
    pub(super) backoff: Duration,
    /// Whether the last connection failed; the outage is warned about once, not on every retry.
    pub(super) failing: bool,
}

impl PeerTask {
    /// The connection has stayed up for [`HEALTHY_AFTER`]: the outage, if any, is over.
    fn healthy(&mut self) {
        *self.link.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.failing {
            log::info!("raft transport: reconnected to peer {} at {}", self.id, self.addr);
        }
        self.failing = false;
        self.backoff = MIN_BACKOFF;
    }
}

/// Keeps one connection to the peer up, reconnecting with exponential backoff, and streams the
/// queue into it. Runs until aborted or until the queue's sender is dropped.
///
/// While disconnected nothing reads the queue, so it fills up to its limit and `send` drops the
/// rest: a dead peer costs one queue of memory, and what is queued goes out once it is back.
pub(super) async fn run_peer(mut task: PeerTask) {
    loop {
        let error = match connect(&task.addr).await {
            Ok(stream) => {
                task.link.connected.store(true, Ordering::Relaxed);
                // A panic (a bug) ends this connection, not the task: a vanished task would leave
                // the peer's queue unread, and every message for it dropped, for good.
                let result = match CatchUnwind::new(pump(stream, &mut task)).await {
                    Ok(result) => result,
                    Err(panic) => Err(anyhow::anyhow!("internal error: {panic}")),
                };
                task.link.connected.store(false, Ordering::Relaxed);
                match result {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        *task.link.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{error:#}"));
        if task.failing {
            log::debug!("raft transport: peer {} at {}: {error:#}", task.id, task.addr);
        } else {
            log::warn!("raft transport: peer {} at {}: {error:#}; retrying", task.id, task.addr);
        }
        task.failing = true;
        (task.inbound)(Inbound::Unreachable(task.id));
        tokio::select! {
            _ = tokio::time::sleep(task.backoff) => task.backoff = (task.backoff * 2).min(MAX_BACKOFF),
            _ = task.link.redial.notified() => log::debug!("raft transport: peer {} dialed us; dialing it now", task.id),
        }
    }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))?
        .context("connect failed")?;
    // Raft messages are small and latency-bound (heartbeats, votes); batching is done by us.
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    super::keepalive::enable(&stream).context("setting TCP keepalive")?;
    Ok(stream)
}

/// Streams the queue into a connected socket until the queue closes (`Ok`) or the connection
/// fails (`Err`). Everything queued when a message arrives goes out in one frame and one write.
async fn pump(mut stream: TcpStream, task: &mut PeerTask) -> anyhow::Result<()> {
    if let Some(password) = &task.password {
        peer_auth::authenticate(&mut stream, password).await?;
    }
    let (mut reader, mut writer) = stream.into_split();
    write_fully(&mut writer, &task.hello.frame()).await.context("sending HELLO failed")?;
    let mut batch: Vec<Message> = Vec::new();
    let mut out = BytesMut::new();
    let mut scratch = [0u8; 256];
    let healthy = tokio::time::sleep(HEALTHY_AFTER);
    tokio::pin!(healthy);
    let mut proven = false;
    loop {
        tokio::select! {
            _ = &mut healthy, if !proven => {
                proven = true;
                task.healthy();
            }
            first = task.rx.recv() => {
                let Some(first) = first else { return Ok(()) };
                let mut bytes = first.encoded_len();
                batch.push(first);
                while batch.len() < MAX_BATCH_MSGS && bytes < MAX_BATCH_BYTES {
                    let Ok(msg) = task.rx.try_recv() else { break };
                    bytes += msg.encoded_len();
                    batch.push(msg);
                }
                task.link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                // A peer that stopped reading (paused, or just reconnected) has a queue full of
                // heartbeats; only the newest is worth sending.
                heartbeats::drop_superseded(std::iter::once(&mut batch));
                encode_msgs(&batch, &mut out);
                let n = batch.len() as u64;
                batch.clear();
                let written = write_fully(&mut writer, &out).await;
                out.clear();
                if let Err(e) = written {
                    // Part of the batch may have arrived; raft copes either way.
                    task.counters.drop_messages(task.id, n, "connection failed");
                    return Err(e).context("write failed");
                }
                task.counters.sent.fetch_add(n, Ordering::Relaxed);
            }
            // The receiver never answers, so anything readable means the connection is over:
            // a close (the peer restarted) or an -ERR saying why it rejected us. Watching for it
            // notices a dead connection before the next batch is lost to it.
            read = reader.read(&mut scratch) => {
                return Err(match read {
                    Ok(0) => anyhow::anyhow!("peer closed the connection"),
                    Ok(n) => {
                        let answer = String::from_utf8_lossy(&scratch[..n]);
                        if let Some(why) = answer.strip_prefix("-REMOVED ") {
                            (task.inbound)(Inbound::Removed { by: task.id, why: why.trim_end().to_string() });
                        }
                        anyhow::anyhow!("peer answered {:?}", answer.trim_end())
                    }
                    Err(e) => anyhow::Error::new(e).context("read failed"),
                });
            }
        }
    }
}

/// `MSGS <m1> <m2> ...`, each message prost-encoded straight into the output buffer.
fn encode_msgs(batch: &[Message], out: &mut BytesMut) {
    resp::encode_array_len(batch.len() + 1, out);
    resp::encode_bulk(b"MSGS", out);
    for msg in batch {
        resp::encode_bulk_with(msg.encoded_len(), out, |out| {
            // Only fails for lack of space, and a BytesMut grows as needed.
            let _ = msg.encode(out);
        });
    }
}
