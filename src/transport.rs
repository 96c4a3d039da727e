//! The side-port transport between Raft nodes.
//!
//! Every node listens on its raft address and dials one long-lived outgoing TCP connection to each
//! peer. Connections carry traffic one way: the dialer introduces itself with
//! `HELLO <id> <advertise-addr> [<client-addr> <shared settings> <last log index>]` (a node
//! whose settings differ is refused, see [`crate::shared_settings`], and so is one the cluster
//! removed) and then sends `MSGS <m1> <m2> ...` frames, each
//! a RESP array of bulk strings holding prost-encoded raft messages. Nothing is answered, except by
//! an error that closes the connection (`-REMOVED ...` to a node that says hello or asks for votes
//! after it was removed from the cluster). The listener also answers `PING` with `+PONG`, so
//! `redis-cli -p <raft-port> PING` tells an operator the port is alive. With a `raft-password`,
//! every connection starts with `AUTH <password>` (see [`peer_auth`]).
//!
//! Raft tolerates lost messages, so the transport favours staying bounded over delivering
//! everything: each peer has a queue limited in messages and in bytes, [`Transport::send`] never
//! blocks and drops (and counts) what does not fit, and a dead peer costs at most one queue of
//! memory. When a connection
//! attempt or a write fails, [`Inbound::Unreachable`] tells raft to slow down on that peer.
//!
//! All networking runs on a current-thread tokio runtime on one dedicated thread, so the rest of
//! Raftis (which is not async) only ever talks to it through non-blocking calls.

use crate::forward::{self, Abandoned, ForwardCancel, ForwardDone, ForwardHandler, ForwardRequest, Forwarded};
use crate::heartbeats;
use crate::ids::NodeId;
use crate::peer_auth::{self, Gate, Password};
use crate::resp::{self, Frame};
use crate::shared_settings::SharedSettings;
use anyhow::Context as _;
use bytes::BytesMut;
use prost::Message as _;
use raft::eraftpb::{Message, MessageType};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const DEFAULT_QUEUE_LIMIT: usize = 4096;
/// Bytes waiting for one peer; more are dropped. The message limit alone would let a queue of full
/// appends (up to 1 MiB each) hold gigabytes for a dead or slow peer.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// tokio's bounded channel needs a capacity of at least 1 and far below `usize::MAX`; a queue
/// bigger than this would defeat the point of bounding memory anyway.
const MAX_QUEUE_LIMIT: usize = 1 << 24;
/// One outgoing frame holds at most this many messages / bytes, so a deep queue becomes a few
/// large writes rather than one giant buffer.
const MAX_BATCH_MSGS: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection counts as working once it has stayed up this long. The receiver answers nothing
/// when all is well, so a refusal (a wrong raft-password) comes after the connect succeeded;
/// counting such a connection as working would retry it every MIN_BACKOFF and warn every time.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);
/// Without a deadline, dialing a black-holed address waits for the kernel's SYN retries (minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that accepts no bytes at all for this long is treated as gone. This is a stall timeout
/// (reset by any progress), so a large snapshot on a slow link still gets through.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a rejected connection is kept half-open so the client can read our `-ERR` before the
/// socket closes (closing with unread input would send a reset that may destroy the reply).
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// How long a removed peer's queued messages may take to go out before its connection is dropped.
const RETIRE_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for blocking work (DNS lookups while dialing) before giving up on it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// A backstop for a forwarded command on the leader (its own write-timeout normally ends it).
const FORWARD_BACKSTOP: Duration = Duration::from_secs(60);
/// Idle connections kept per leader address for forwarded commands.
const FORWARD_POOL: usize = 32;
/// What a follower may send on a connection that waits for a forwarded command's answer before
/// the leader stops reading it (it sends nothing, normally: the read only notices a hang-up).
const FORWARD_READ_AHEAD: usize = 1 << 20;

/// What the transport hands to the Raft node.
#[derive(Debug)]
pub enum Inbound {
    /// The messages of one `MSGS` frame, in the order they were sent.
    Raft(Vec<Message>),
    /// A peer dialed us and said where it can be reached: its side port, and its client port
    /// (peers of this version say both).
    Hello { from: NodeId, addr: String, client_addr: Option<String> },
    /// Messages to this peer could not be delivered (unknown peer, failed connect or write).
    Unreachable(NodeId),
    /// A peer closed our connection with `-REMOVED <why>`: it has applied this node's removal
    /// from the cluster (see [`Transport::set_removed_check`]).
    Removed { by: NodeId, why: String },
}

/// Whether the member `from`, asking for votes with `last_index` as the index of its last log
/// entry, is known to have been removed from the cluster; `Some(why)` if so.
pub type RemovedCheck = Arc<dyn Fn(NodeId, u64) -> Option<String> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub me: NodeId,
    pub listen: SocketAddr,
    /// `host:port` peers dial to reach this node.
    pub advertise: String,
    /// `host:port` clients reach this node at, said in `HELLO` too (so a member that moved can
    /// be given its new addresses, see the node's `readdress`).
    pub advertise_client: Option<String>,
    /// Most messages waiting for one peer; more are dropped. Clamped to at least 1.
    pub queue_limit: usize,
    /// Where this node's snapshot files are, for peers fetching them with `SNAPSHOT.CHUNK`.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// The cluster's `raft-password`: asked of every connection, and given on every one dialed.
    pub password: Option<Password>,
    /// This node's Redis settings that every node must share, said in `HELLO` and compared with
    /// what dialers say (with `advertise_client` only).
    pub shared: Option<SharedSettings>,
}

impl TransportConfig {
    /// A configuration with the default queue limit.
    pub fn new(me: NodeId, listen: SocketAddr, advertise: impl Into<String>) -> Self {
        TransportConfig {
            me,
            listen,
            advertise: advertise.into(),
            advertise_client: None,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            snapshot_dir: None,
            password: None,
            shared: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub id: NodeId,
    pub addr: String,
    pub connected: bool,
    /// Messages waiting in the peer's queue.
    pub queued: usize,
    /// Their encoded size.
    pub queued_bytes: usize,
    /// Messages written to the peer's connection.
    pub sent: u64,
    /// Messages dropped: queue full, or lost with a failed write.
    pub dropped: u64,
    /// Why the connection failed last, while it is down (a refusal says what the peer answered).
    pub last_error: Option<String>,
}

/// Handle to the transport. Clones share one transport; it shuts down on [`Transport::shutdown`]
/// or when the last clone is dropped.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

type Callback = Arc<dyn Fn(Inbound) + Send + Sync>;
/// Set by the module once it can serve forwarded commands; empty means "refuse them".
type ForwardSlot = Arc<std::sync::RwLock<Option<ForwardHandler>>>;
/// Set by the Raft node; empty means no vote is refused.
type RemovedSlot = Arc<std::sync::RwLock<Option<RemovedCheck>>>;

struct Inner {
    me: NodeId,
    advertise: String,
    advertise_client: Option<String>,
    queue_limit: usize,
    password: Option<Password>,
    shared: Option<SharedSettings>,
    /// The index of the last entry in this node's log, said in `HELLO`.
    last_index: Arc<AtomicU64>,
    local_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    inbound: Callback,
    forward_handler: ForwardSlot,
    removed_check: RemovedSlot,
    /// Idle connections to leaders, for forwarding commands (one command at a time each).
    forward_pool: Mutex<HashMap<String, Vec<TcpStream>>>,
    state: Mutex<State>,
    /// Taken by the first shutdown, which makes shutdown idempotent.
    stop: Mutex<Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

struct State {
    peers: HashMap<NodeId, Peer>,
    closed: bool,
}

/// One peer: its queue and the task that owns its connection. Dropping it aborts the task, which
/// closes the connection and frees the queue.
struct Peer {
    addr: String,
    queue: mpsc::Sender<Message>,
    link: Arc<Link>,
    counters: Arc<Counters>,
    /// Taken only by [`Peer::retire`].
    task: Option<JoinHandle<()>>,
}

impl Peer {
    /// Drops the peer once what is queued for it has gone out (the task ends when the closed
    /// queue is empty), or after [`RETIRE_GRACE`] if it cannot be delivered.
    fn retire(mut self, runtime: &tokio::runtime::Handle) {
        let Some(task) = self.task.take() else { return };
        drop(self);
        runtime.spawn(async move {
            tokio::time::sleep(RETIRE_GRACE).await;
            task.abort();
        });
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// State of one connection task. A new one per address, so a replaced task that has not noticed
/// its abort yet cannot make the new connection look up or down.
#[derive(Default)]
struct Link {
    connected: AtomicBool,
    /// Encoded size of what waits in the queue (added by `send`, taken off as frames are built).
    queued_bytes: AtomicUsize,
    /// Why the last connection failed; cleared once one works.
    last_error: Mutex<Option<String>>,
}

/// Kept across address changes, so the peer's totals survive a move.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn drop_messages(&self, id: NodeId, n: u64, why: &str) {
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        // Logarithmic logging: the first drop is visible, a sustained flood does not fill the log.
        if before.checked_ilog2() != after.checked_ilog2() {
            log::warn!("raft transport: dropping messages to peer {id} ({why}); {after} dropped so far");
        }
    }
}

impl Transport {
    /// Binds the listener here, so a bind error reaches the caller, then runs all networking on
    /// a background thread. `inbound` is called on that thread, one call at a time; it must not
    /// block for long (and must never wait for this transport to shut down).
    pub fn start(cfg: TransportConfig, inbound: impl Fn(Inbound) + Send + Sync + 'static) -> anyhow::Result<Transport> {
        let listener = std::net::TcpListener::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let local_addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("building the transport runtime")?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let inbound: Callback = Arc::new(inbound);
        let handle = runtime.handle().clone();
        let snapshots = cfg.snapshot_dir.clone().map(Arc::new);
        let forward_handler = ForwardSlot::default();
        let removed_check = RemovedSlot::default();
        let served = Served {
            me: cfg.me,
            inbound: inbound.clone(),
            snapshots,
            forward: forward_handler.clone(),
            removed: removed_check.clone(),
            password: cfg.password.clone(),
            shared: cfg.shared.clone(),
        };
        handle.spawn(accept_loop(listener, served));

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("raft-net-{}", cfg.me))
            .spawn(move || {
                // Runs every task until told to stop (or until the handle is gone, which drops the
                // sender). Dropping the runtime then cancels all tasks, closing the listener and
                // every connection.
                let _ = runtime.block_on(stop_rx);
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })
            .context("spawning the transport thread")?;

        Ok(Transport {
            inner: Arc::new(Inner {
                me: cfg.me,
                advertise: cfg.advertise,
                advertise_client: cfg.advertise_client,
                queue_limit: cfg.queue_limit.clamp(1, MAX_QUEUE_LIMIT),
                password: cfg.password,
                shared: cfg.shared,
                last_index: Arc::default(),
                local_addr,
                runtime: handle,
                inbound,
                forward_handler,
                removed_check,
                forward_pool: Mutex::new(HashMap::new()),
                state: Mutex::new(State { peers: HashMap::new(), closed: false }),
                stop: Mutex::new(Some((stop_tx, thread))),
            }),
        })
    }

    /// Runs `task` on the network thread, beside the connections. The Raft loop lives there so
    /// that a message goes from raft to its socket (and back) without waking another thread.
    /// The task must not block for long: while it runs, no connection is served.
    pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, task: F) {
        self.inner.runtime.spawn(task);
    }

    /// True on the network thread (where callbacks and spawned tasks run).
    pub fn on_network_thread(&self) -> bool {
        let stop = self.inner.stop.lock().unwrap_or_else(|e| e.into_inner());
        stop.as_ref().map_or(false, |(_, thread)| thread.thread().id() == std::thread::current().id())
    }

    /// The address the listener is bound to (useful when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The index of the last entry in this node's log, for the `HELLO` of connections made from
    /// now on: a member that has applied further and no longer counts this node tells it it was
    /// removed (a learner that was down while it was removed would hear it no other way).
    pub fn set_last_index(&self, index: u64) {
        self.inner.last_index.store(index, Ordering::Relaxed);
    }

    /// The `raft-password` this transport gives and asks for, for other connections to peers'
    /// side ports (snapshot downloads).
    pub fn password(&self) -> Option<Password> {
        self.inner.password.clone()
    }

    /// Serves `FORWARD` requests from followers with `handler` (called on the transport thread;
    /// it must hand the work off and return).
    pub fn set_forward_handler(&self, handler: ForwardHandler) {
        *self.inner.forward_handler.write().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Refuses the votes of members that `check` says were removed from the cluster: their
    /// connection is closed with `-REMOVED <why>`, which their transport reports as
    /// [`Inbound::Removed`]. Raft itself never tells a removed node: the leader stops writing to
    /// it, and with pre-vote the others ignore its campaigns, so it would ask for votes for ever.
    pub fn set_removed_check(&self, check: RemovedCheck) {
        *self.inner.removed_check.write().unwrap_or_else(|p| p.into_inner()) = Some(check);
    }

    /// Sends `req` to the leader's side port at `addr` and calls `done` with its reply, or with
    /// an error line: `CLUSTERDOWN` if the leader could not be reached (nothing was sent),
    /// `TIMEOUT` if the answer did not come back within `timeout` (the command may have run).
    pub fn forward(&self, addr: String, req: &ForwardRequest, timeout: Duration, done: ForwardDone) {
        self.forward_until(addr, req, Some(timeout), ForwardCancel::default(), done);
    }

    /// Like [`Transport::forward`], with no timeout if `timeout` is None (a blocking command may
    /// wait for ever), and ended early by `cancel`: `done` then gets the cancel's reason, and the
    /// connection is closed, which tells the leader to stop waiting.
    pub fn forward_until(&self, addr: String, req: &ForwardRequest, timeout: Option<Duration>, cancel: ForwardCancel, done: ForwardDone) {
        let mut request = BytesMut::new();
        req.encode(&mut request);
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let answer = async {
                let once = forward_once(&inner, &addr, &request);
                match timeout {
                    None => once.await,
                    Some(timeout) => tokio::time::timeout(timeout, once).await.unwrap_or_else(|_| {
                        Err("TIMEOUT the leader did not answer in time; the command may or may not have taken effect".into())
                    }),
                }
            };
            // Dropping the unanswered request drops its connection (it is not pooled).
            let reply = tokio::select! {
                reply = answer => reply,
                reason = cancel.cancelled() => Err(reason),
            };
            done(reply);
        });
    }

    /// Adds a peer, or moves it to a new address (dropping the old connection and queue).
    /// Setting the same address again changes nothing. A node never dials itself.
    pub fn set_peer_addr(&self, id: NodeId, addr: String) {
        let inner = &self.inner;
        if id == inner.me {
            log::debug!("raft transport: ignoring an address for myself ({addr})");
            return;
        }
        let replaced;
        {
            let mut state = inner.state();
            if state.closed {
                return;
            }
            let counters = match state.peers.get(&id) {
                Some(peer) if peer.addr == addr => return,
                Some(peer) => peer.counters.clone(),
                None => Arc::default(),
            };
            let (queue, rx) = mpsc::channel(inner.queue_limit);
            let link = Arc::new(Link::default());
            let task = inner.runtime.spawn(run_peer(PeerTask {
                id,
                addr: addr.clone(),
                hello: Hello {
                    me: inner.me,
                    advertise: inner.advertise.clone(),
                    client: inner.advertise_client.clone(),
                    shared: inner.shared.as_ref().map(SharedSettings::encode),
                    last_index: inner.last_index.clone(),
                },
                password: inner.password.clone(),
                rx,
                link: link.clone(),
                counters: counters.clone(),
                inbound: inner.inbound.clone(),
                backoff: MIN_BACKOFF,
                failing: false,
            }));
            log::info!("raft transport: peer {id} is at {addr}");
            replaced = state.peers.insert(id, Peer { addr, queue, link, counters, task: Some(task) });
        }
        drop(replaced);
    }

    /// Forgets a peer: no more messages are queued for it, and its connection is closed once
    /// those already queued have gone out. A member removed from the cluster still gets the
    /// messages sent with its removal (the commit index that lets it apply the change itself).
    pub fn remove_peer(&self, id: NodeId) {
        let removed = self.inner.state().peers.remove(&id);
        if let Some(peer) = removed {
            log::info!("raft transport: peer {id} removed");
            peer.retire(&self.inner.runtime);
        }
    }

    pub fn peer_addr(&self, id: NodeId) -> Option<String> {
        self.inner.state().peers.get(&id).map(|p| p.addr.clone())
    }

    /// Queues messages for their recipients (`msg.to`), keeping their order per recipient. Never
    /// blocks: a message that does not fit its peer's queue is dropped and counted; messages to
    /// unknown peers are dropped and reported as [`Inbound::Unreachable`].
    pub fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let mut unknown: Vec<NodeId> = Vec::new();
        {
            let state = self.inner.state();
            if state.closed {
                return;
            }
            for msg in msgs {
                let to = NodeId(msg.to);
                match state.peers.get(&to) {
                    Some(peer) => {
                        let size = msg.encoded_len();
                        let queued = peer.link.queued_bytes.fetch_add(size, Ordering::Relaxed);
                        // One message always fits, however large, so an oversized entry still
                        // gets through once the queue has drained.
                        let why = if queued > 0 && queued + size > MAX_QUEUE_BYTES {
                            Some("queue over its byte limit")
                        } else {
                            peer.queue.try_send(msg).err().map(|_| "queue full")
                        };
                        if let Some(why) = why {
                            peer.link.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                            peer.counters.drop_messages(to, 1, why);
                        }
                    }
                    None => {
                        log::debug!("raft transport: dropping a {:?} to unknown peer {to}", msg.msg_type());
                        if !unknown.contains(&to) {
                            unknown.push(to);
                        }
                    }
                }
            }
        }
        // Reported from the runtime thread, like every other callback, so the callback never runs
        // on the caller's (the Raft loop's) thread.
        for id in unknown {
            let inbound = self.inner.inbound.clone();
            self.inner.runtime.spawn(async move { inbound(Inbound::Unreachable(id)) });
        }
    }

    /// Per peer, ordered by id.
    pub fn stats(&self) -> Vec<PeerStats> {
        let mut stats: Vec<PeerStats> = self
            .inner
            .state()
            .peers
            .iter()
            .map(|(&id, peer)| PeerStats {
                id,
                addr: peer.addr.clone(),
                connected: peer.link.connected.load(Ordering::Relaxed),
                queued: peer.queue.max_capacity() - peer.queue.capacity(),
                queued_bytes: peer.link.queued_bytes.load(Ordering::Relaxed),
                sent: peer.counters.sent.load(Ordering::Relaxed),
                dropped: peer.counters.dropped.load(Ordering::Relaxed),
                last_error: peer.link.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            })
            .collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    /// Stops every task, closes the listener and all connections, and joins the transport thread.
    /// Idempotent; afterwards the other methods do nothing.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    /// The lock is only held for short, non-blocking work and never across a callback; a panic
    /// while holding it leaves the map consistent, so a poisoned lock is simply reused.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutdown(&self) {
        let peers = {
            let mut state = self.state();
            state.closed = true;
            std::mem::take(&mut state.peers)
        };
        drop(peers);
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((stop_tx, thread)) = stop {
            let _ = stop_tx.send(());
            // A callback on the transport thread may be the one shutting down (or dropping the
            // last handle); joining itself would deadlock. It stops once the callback returns.
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                log::error!("raft transport: the network thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a connection to a peer starts with.
struct Hello {
    me: NodeId,
    advertise: String,
    client: Option<String>,
    /// Encoded; compared only when given.
    shared: Option<String>,
    last_index: Arc<AtomicU64>,
}

impl Hello {
    /// The `HELLO` frame, with the log's last index as of now.
    fn frame(&self) -> BytesMut {
        let mut out = BytesMut::new();
        let id = self.me.to_string();
        let last_index = self.last_index.load(Ordering::Relaxed).to_string();
        let mut args = vec![&b"HELLO"[..], id.as_bytes(), self.advertise.as_bytes()];
        if let Some(client) = &self.client {
            args.extend([client.as_bytes(), self.shared.as_deref().unwrap_or_default().as_bytes(), last_index.as_bytes()]);
        }
        resp::encode_command(&args, &mut out);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Outgoing side: one task per peer.

struct PeerTask {
    id: NodeId,
    addr: String,
    hello: Hello,
    password: Option<Password>,
    rx: mpsc::Receiver<Message>,
    link: Arc<Link>,
    counters: Arc<Counters>,
    inbound: Callback,
    /// The wait before the next connection attempt.
    backoff: Duration,
    /// Whether the last connection failed; the outage is warned about once, not on every retry.
    failing: bool,
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
async fn run_peer(mut task: PeerTask) {
    loop {
        let error = match connect(&task.addr).await {
            Ok(stream) => {
                task.link.connected.store(true, Ordering::Relaxed);
                let result = pump(stream, &mut task).await;
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
        tokio::time::sleep(task.backoff).await;
        task.backoff = (task.backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))?
        .context("connect failed")?;
    // Raft messages are small and latency-bound (heartbeats, votes); batching is done by us.
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
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

/// Writes all of `buf`, failing if the peer accepts nothing for [`WRITE_STALL_TIMEOUT`].
async fn write_fully(writer: &mut (impl AsyncWrite + Unpin), buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match tokio::time::timeout(WRITE_STALL_TIMEOUT, writer.write(&buf[done..])).await {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading")),
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// One forwarded command on a pooled (or new) connection to the leader.
async fn forward_once(inner: &Inner, addr: &str, request: &[u8]) -> forward::ForwardReply {
    let mut stream = match pooled_connection(inner, addr) {
        Some(s) => s,
        None => match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(mut s)) => {
                let _ = s.set_nodelay(true);
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
    if buf.is_empty() {
        let mut pool = inner.forward_pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(addr.to_string()).or_default();
        if idle.len() < FORWARD_POOL {
            idle.push(stream);
        }
    }
    match frame {
        Frame::Bulk(raw) => Ok(raw.to_vec()),
        Frame::Error(e) => Err(e),
        other => Err(format!("ERR the leader answered a forwarded command with {other:?}")),
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
    let peeked = unsafe {
        libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    peeked < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

// ---------------------------------------------------------------------------------------------
// Incoming side: the listener and one reader task per accepted connection.

type SnapshotDir = Option<Arc<std::path::PathBuf>>;

/// What the listener's connections are served with.
#[derive(Clone)]
struct Served {
    me: NodeId,
    inbound: Callback,
    snapshots: SnapshotDir,
    forward: ForwardSlot,
    removed: RemovedSlot,
    password: Option<Password>,
    shared: Option<SharedSettings>,
}

async fn accept_loop(listener: TcpListener, served: Served) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
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

/// Reads frames from one connection until it closes or misbehaves.
async fn serve(mut stream: TcpStream, remote: SocketAddr, served: Served) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::new();
    let mut authenticated = served.password.is_none();
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
                    resp::encode(&Frame::Simple("OK".into()), &mut out);
                    continue;
                }
                Gate::Refuse(line) => return reject(stream, remote, out, Reject(line)).await,
            }
            // A forwarded command is answered when the cluster has run it; replies stay in order
            // because this connection waits for it before handling more.
            if let Some(request) = as_forward(&frame) {
                let reply = match request {
                    Ok(req) => match run_forwarded(&served.forward, req, &mut stream, &mut buf).await {
                        Some(reply) => reply,
                        None => return log::debug!("raft transport: {remote} hung up on a forwarded command"),
                    },
                    Err(e) => Frame::Error(format!("ERR {e}")),
                };
                resp::encode(&reply, &mut out);
                continue;
            }
            match handle(frame, &served) {
                Ok(None) => {}
                Ok(Some(reply)) => resp::encode(&reply, &mut out),
                Err(why) => return reject(stream, remote, out, why).await,
            }
        }
        if !out.is_empty() {
            if let Err(e) = write_fully(&mut stream, &out).await {
                log::debug!("raft transport: connection from {remote}: {e}");
                return;
            }
            out.clear();
        }
        buf.reserve(16 * 1024);
        match stream.read_buf(&mut buf).await {
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
        Some(Frame::Bulk(verb)) if ForwardRequest::is_verb(verb) => {
            Some(ForwardRequest::decode(verb, &args[1..]))
        }
        _ => None,
    }
}

/// The reply to one forwarded request, or None if the follower hung up before it came (the
/// handler is told, through [`Abandoned`]). The connection is read meanwhile, to notice that:
/// what arrives is kept in `buf` for later.
async fn run_forwarded(slot: &ForwardSlot, req: ForwardRequest, stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    let handler = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(handler) = handler else {
        return Some(Frame::Error("ERR this node does not serve forwarded commands".into()));
    };
    // A blocking command may wait for ever; anything else is answered within write-timeout.
    let backstop = match req.what {
        Forwarded::Blocking { .. } => None,
        _ => Some(FORWARD_BACKSTOP),
    };
    let (tx, rx) = oneshot::channel();
    let abandoned = Abandoned::default();
    handler(
        req,
        Box::new(move |reply| {
            let _ = tx.send(reply);
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
                Some(Ok(reply)) => forward::reply_frame(reply),
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
fn handle(frame: Frame, served: &Served) -> Result<Option<Frame>, Reject> {
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
        let mut msgs = Vec::with_capacity(args.len() - 1);
        let mut misrouted = 0;
        for (i, arg) in args.iter().enumerate().skip(1) {
            let Frame::Bulk(bytes) = arg else {
                return Err(Reject::err(format!("MSGS argument {i} is not a bulk string")));
            };
            let msg = Message::decode(&bytes[..])
                .map_err(|e| Reject::err(format!("MSGS argument {i} is not a raft message: {e}")))?;
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
        let usage = || Reject::err("usage: HELLO <node-id> <host:port> [<client host:port> [<settings> [<last log index>]]]");
        let (3..=6, Some(Frame::Bulk(id)), Some(Frame::Bulk(addr))) = (args.len(), args.get(1), args.get(2)) else {
            return Err(usage());
        };
        let text = |i: usize, what: &str| match args.get(i) {
            Some(Frame::Bulk(bytes)) => std::str::from_utf8(bytes)
                .map(|s| Some(s.to_string()))
                .map_err(|_| Reject::err(format!("HELLO: {what} is not UTF-8"))),
            Some(_) => Err(usage()),
            None => Ok(None),
        };
        let client_addr = text(3, "client address")?;
        let from = std::str::from_utf8(id)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| Reject::err("HELLO: invalid node id"))?;
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
        inbound(Inbound::Hello { from: NodeId(from), addr: addr.to_string(), client_addr });
        Ok(None)
    } else if is("SNAPSHOT.CHUNK") {
        snapshot_chunk(&args, served.snapshots.as_deref().map(|p| p.as_path())).map(Some)
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

/// `SNAPSHOT.CHUNK <file> <offset> <len>`: bytes of one of our snapshot files. Only plain file
/// names of snapshot files are served, never a path. A read error is an `-ERR` reply, not a reason
/// to drop the connection (the fetcher retries or gives up).
fn snapshot_chunk(args: &[Frame], dir: Option<&std::path::Path>) -> Result<Frame, Reject> {
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
    match crate::snapshot_file::read_chunk(&dir.join(name), offset, len) {
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
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, MessageType};
    use std::io::{Read, Write};
    use std::sync::mpsc as std_mpsc;
    use std::time::Instant;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn init_log() {
        let _ = env_logger::builder().is_test(true).try_init();
    }

    /// A message that is easy to check for order (`index`) and integrity (the entry's payload).
    fn msg(from: u64, to: u64, index: u64) -> Message {
        let entry = Entry { index, term: 3, data: format!("payload {index}").into_bytes(), ..Default::default() };
        Message {
            msg_type: MessageType::MsgAppend as i32,
            from,
            to,
            term: 3,
            index,
            entries: vec![entry],
            ..Default::default()
        }
    }

    /// A transport whose callback forwards into a channel, and remembers whether it ever ran on a
    /// thread other than the transport's own.
    struct Node {
        transport: Transport,
        rx: std_mpsc::Receiver<Inbound>,
        off_thread: Arc<AtomicBool>,
    }

    impl Node {
        fn start(me: u64, listen: SocketAddr, queue_limit: usize) -> Node {
            let mut cfg = TransportConfig::new(NodeId(me), listen, format!("node-{me}.test:7000"));
            cfg.queue_limit = queue_limit;
            Node::with_config(cfg)
        }

        /// A node on any port whose cluster has the `raft-password` `password`.
        fn with_password(me: u64, password: &str) -> Node {
            let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("node-{me}.test:7000"));
            cfg.password = Password::new(password.as_bytes());
            Node::with_config(cfg)
        }

        fn with_config(cfg: TransportConfig) -> Node {
            init_log();
            let me = cfg.me;
            let (tx, rx) = std_mpsc::channel();
            let tx = Mutex::new(tx);
            let off_thread = Arc::new(AtomicBool::new(false));
            let flag = off_thread.clone();
            let transport = Transport::start(cfg, move |inbound| {
                let name = std::thread::current().name().unwrap_or_default().to_string();
                if name != format!("raft-net-{me}") {
                    flag.store(true, Ordering::Relaxed);
                }
                let _ = tx.lock().unwrap().send(inbound);
            })
            .unwrap();
            Node { transport, rx, off_thread }
        }

        fn on_any_port(me: u64) -> Node {
            Node::start(me, loopback(0), DEFAULT_QUEUE_LIMIT)
        }

        fn addr(&self) -> String {
            self.transport.local_addr().to_string()
        }

        /// Waits for the next event that `pick` accepts, skipping the others.
        fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(Inbound) -> Option<T>) -> T {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(inbound) => {
                        if let Some(found) = pick(inbound) {
                            return found;
                        }
                    }
                    Err(_) => panic!("timed out waiting for {what}"),
                }
            }
        }

        /// Collects raft messages until `n` have arrived.
        fn raft_messages(&self, n: usize) -> Vec<Message> {
            let mut all = Vec::new();
            while all.len() < n {
                all.extend(self.wait_for("raft messages", |i| match i {
                    Inbound::Raft(msgs) => Some(msgs),
                    _ => None,
                }));
            }
            all
        }

        fn peer(&self, id: u64) -> PeerStats {
            self.transport.stats().into_iter().find(|s| s.id == NodeId(id)).expect("peer is known")
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                assert!(!self.off_thread.load(Ordering::Relaxed), "callbacks run on the transport thread only");
            }
        }
    }

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A loopback port with nothing listening on it (for now).
    fn unused_port() -> u16 {
        std::net::TcpListener::bind(loopback(0)).unwrap().local_addr().unwrap().port()
    }

    /// Node 1, told that node 2 is at `port` where nothing listens, once it has found that out.
    fn with_dead_peer(port: u16) -> Node {
        let a = Node::on_any_port(1);
        a.transport.set_peer_addr(NodeId(2), loopback(port).to_string());
        a.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
        a
    }

    /// Polls `cond` until it holds; for state that is not announced through a channel.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends raw bytes on a fresh connection and reads until the server closes it.
    fn raw_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(request).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).expect("the server closes the connection");
        reply
    }

    fn command(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = BytesMut::new();
        resp::encode_command(parts, &mut out);
        out.to_vec()
    }

    #[test]
    fn two_transports_exchange_messages_both_ways() {
        let a = Node::on_any_port(1);
        let b = Node::on_any_port(2);
        a.transport.set_peer_addr(NodeId(2), b.addr());
        b.transport.set_peer_addr(NodeId(1), a.addr());
        assert_eq!(a.transport.peer_addr(NodeId(2)), Some(b.addr()));

        let to_b: Vec<Message> = (1..=5).map(|i| msg(1, 2, i)).collect();
        let to_a: Vec<Message> = (10..=12).map(|i| msg(2, 1, i)).collect();
        a.transport.send(to_b.clone());
        b.transport.send(to_a.clone());

        let hello = b.wait_for("a HELLO", |i| match i {
            Inbound::Hello { from, addr, .. } => Some((from, addr)),
            _ => None,
        });
        assert_eq!(hello, (NodeId(1), "node-1.test:7000".to_string()));
        assert_eq!(b.raft_messages(5), to_b, "in order and intact");
        assert_eq!(a.raft_messages(3), to_a);
        wait_until("counters", || a.peer(2).sent == 5 && b.peer(1).sent == 3);
        let stats = a.peer(2);
        assert!(stats.connected);
        assert_eq!((stats.addr, stats.queued, stats.dropped), (b.addr(), 0, 0));
    }

    #[test]
    fn a_removed_node_asking_for_votes_is_told_so_and_its_other_messages_pass() {
        let a = Node::on_any_port(1);
        let b = Node::on_any_port(2);
        b.transport.set_removed_check(Arc::new(|from, last_index| {
            (from == NodeId(1) && last_index <= 40).then(|| format!("node 2 has applied the removal of node {from}"))
        }));
        a.transport.set_peer_addr(NodeId(2), b.addr());
        let vote = |msg_type: MessageType, index: u64| Message {
            msg_type: msg_type as i32,
            from: 1,
            to: 2,
            term: 4,
            index,
            ..Default::default()
        };

        // Appends, and votes from a log the check cannot judge, reach raft.
        let passed = vec![msg(1, 2, 7), vote(MessageType::MsgRequestPreVote, 41)];
        a.transport.send(passed.clone());
        assert_eq!(b.raft_messages(2), passed);

        for msg_type in [MessageType::MsgRequestPreVote, MessageType::MsgRequestVote] {
            a.transport.send(vec![vote(msg_type, 40)]);
            let (by, why) = a.wait_for("Removed", |i| match i {
                Inbound::Removed { by, why } => Some((by, why)),
                _ => None,
            });
            assert_eq!((by, why.as_str()), (NodeId(2), "node 2 has applied the removal of node 1"));
        }
        assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_))), "the refused votes never reach raft");
    }

    #[test]
    fn ten_thousand_messages_all_arrive_in_order() {
        let a = Node::on_any_port(1);
        let b = Node::on_any_port(2);
        a.transport.set_peer_addr(NodeId(2), b.addr());
        // Paced so the default queue never overflows: none may be lost while the receiver is up.
        let chunk = 500;
        for start in (0..10_000).step_by(chunk) {
            wait_until("room in the queue", || a.peer(2).queued + chunk <= DEFAULT_QUEUE_LIMIT);
            a.transport.send((start..start + chunk as u64).map(|i| msg(1, 2, i)).collect());
        }
        let got = b.raft_messages(10_000);
        assert_eq!(got.len(), 10_000);
        assert!(got.iter().enumerate().all(|(i, m)| *m == msg(1, 2, i as u64)), "in order and intact");
        wait_until("all counted as sent", || a.peer(2).sent == 10_000);
        assert_eq!(a.peer(2).dropped, 0);
    }

    #[test]
    fn a_dead_peer_costs_a_bounded_queue_and_catches_up_when_it_comes_up() {
        let port = unused_port();
        let a = with_dead_peer(port);

        for start in (0..100_000).step_by(1000) {
            a.transport.send((start..start + 1000).map(|i| msg(1, 2, i)).collect());
        }
        let stats = a.peer(2);
        assert!(!stats.connected);
        assert_eq!(stats.queued, DEFAULT_QUEUE_LIMIT, "{stats:?}");
        assert_eq!(stats.dropped, 100_000 - DEFAULT_QUEUE_LIMIT as u64, "{stats:?}");

        // The peer comes up on that address; the backoff retries find it.
        let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
        wait_until("the queue to drain", || a.peer(2).queued == 0);
        a.transport.send(vec![msg(1, 2, 1_000_000)]);
        let got = b.raft_messages(DEFAULT_QUEUE_LIMIT + 1);
        let indexes: Vec<u64> = got.iter().map(|m| m.index).collect();
        let expected: Vec<u64> = (0..DEFAULT_QUEUE_LIMIT as u64).chain([1_000_000]).collect();
        assert_eq!(indexes, expected, "what fitted in the queue, then the new message");
    }

    #[test]
    fn a_dead_peer_queues_at_most_its_byte_limit_of_large_messages() {
        let port = unused_port();
        let a = with_dead_peer(port);

        let big = |index: u64, len: usize| {
            let mut m = msg(1, 2, index);
            m.entries[0].data = vec![b'x'; len];
            m
        };
        // One message larger than the whole limit still goes when the queue is empty.
        a.transport.send(vec![big(0, MAX_QUEUE_BYTES + 1)]);
        a.transport.send(vec![big(1, 10)]);
        let stats = a.peer(2);
        assert_eq!((stats.queued, stats.dropped), (1, 1), "{stats:?}");
        assert!(stats.queued_bytes > MAX_QUEUE_BYTES);

        let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
        assert_eq!(b.raft_messages(1)[0].index, 0);
        wait_until("the queue to drain", || a.peer(2).queued == 0);
        assert_eq!(a.peer(2).queued_bytes, 0);
        drop(b);
        wait_until("the connection to drop", || !a.peer(2).connected);

        // 200 messages of 1 MiB: about 64 fit, the rest are dropped and counted.
        let dropped_before = a.peer(2).dropped;
        for i in 0..200 {
            a.transport.send(vec![big(100 + i, 1 << 20)]);
        }
        let stats = a.peer(2);
        assert!(stats.queued_bytes <= MAX_QUEUE_BYTES, "{stats:?}");
        assert!((60..=64).contains(&stats.queued), "{stats:?}");
        assert_eq!(stats.dropped - dropped_before, 200 - stats.queued as u64, "{stats:?}");
    }

    #[test]
    fn peers_can_be_moved_and_removed() {
        let port = unused_port();
        let a = Node::on_any_port(1);
        let b = Node::on_any_port(2);
        a.transport.set_peer_addr(NodeId(2), loopback(port).to_string());
        a.transport.send(vec![msg(1, 2, 1)]);
        a.transport.set_peer_addr(NodeId(2), b.addr());
        a.transport.set_peer_addr(NodeId(2), b.addr()); // same address: no reconnect
        a.transport.send(vec![msg(1, 2, 2)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 2)], "the old address's queue went with it");
        assert_eq!(a.transport.peer_addr(NodeId(2)), Some(b.addr()));

        a.transport.set_peer_addr(NodeId(1), "127.0.0.1:1".into());
        assert_eq!(a.transport.peer_addr(NodeId(1)), None, "a node never dials itself");

        a.transport.remove_peer(NodeId(2));
        assert_eq!(a.transport.peer_addr(NodeId(2)), None);
        assert!(a.transport.stats().is_empty());
        a.transport.send(vec![msg(1, 2, 3), msg(1, 9, 1)]);
        // Reports from the first, dead address may still be queued: collect until both show up.
        let mut unreachable = std::collections::BTreeSet::new();
        while !(unreachable.contains(&NodeId(2)) && unreachable.contains(&NodeId(9))) {
            unreachable.insert(a.wait_for("Unreachable", |i| match i {
                Inbound::Unreachable(id) => Some(id),
                _ => None,
            }));
        }
        assert_eq!(unreachable.into_iter().collect::<Vec<_>>(), vec![NodeId(2), NodeId(9)]);
    }

    #[test]
    fn garbage_closes_only_that_connection() {
        let b = Node::on_any_port(2);
        // Keep a well-behaved peer connected throughout, to see it is unaffected.
        let a = Node::on_any_port(1);
        a.transport.set_peer_addr(NodeId(2), b.addr());
        a.transport.send(vec![msg(1, 2, 1)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);

        let undecodable = command(&[b"MSGS", &[0xff; 11]]);
        let mut good_then_bad = command(&[b"PING"]);
        good_then_bad.extend_from_slice(b"!");
        let cases: Vec<(&[u8], &str)> = vec![
            (b"hello world\r\n", "-ERR protocol error: unknown frame type"),
            (b"GET / HTTP/1.0\r\n\r\n", "-ERR protocol error"),
            (&[0xff; 64], "-ERR protocol error"),
            (b"$-5\r\n", "-ERR protocol error: negative length"),
            (b"*2\r\n$x\r\n", "-ERR protocol error: invalid length"),
            (b"*3\r\n$4\r\nMSGS\r\n$3\r\nabc\r\n$-9\r\n", "-ERR protocol error"),
            (&undecodable, "-ERR MSGS argument 1 is not a raft message"),
            (b"*2\r\n$4\r\nMSGS\r\n:1\r\n", "-ERR MSGS argument 1 is not a bulk string"),
            (b"*1\r\n$4\r\nNOPE\r\n", "-ERR unknown command 'NOPE'"),
            (b":5\r\n", "-ERR expected a command"),
            (b"*2\r\n$5\r\nHELLO\r\n$1\r\n0\r\n", "-ERR usage: HELLO"),
            (b"*3\r\n$5\r\nHELLO\r\n$1\r\n0\r\n$1\r\nx\r\n", "-ERR HELLO: invalid node id"),
            (b"*4\r\n$5\r\nHELLO\r\n$1\r\n7\r\n$1\r\nx\r\n:1\r\n", "-ERR usage: HELLO"),
            (&good_then_bad, "+PONG\r\n-ERR protocol error"),
        ];
        for (garbage, expected) in cases {
            let reply = raw_exchange(&b.addr(), garbage);
            let reply = String::from_utf8_lossy(&reply);
            assert!(reply.starts_with(expected), "{:?} got {reply:?}", String::from_utf8_lossy(garbage));
        }

        // A new, well-formed connection is served...
        let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut good = command(&[b"HELLO", b"7", b"node-7:1", b"node-7:2"]);
        let encoded = msg(7, 2, 42).encode_to_vec();
        good.extend(command(&[b"MSGS", &encoded]));
        good.extend(command(&[b"PING"]));
        s.write_all(&good).unwrap();
        let mut pong = [0u8; 7];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        let hello = b.wait_for("HELLO from 7", |i| match i {
            Inbound::Hello { from, addr, client_addr } => Some((from, addr, client_addr)),
            _ => None,
        });
        assert_eq!(hello, (NodeId(7), "node-7:1".to_string(), Some("node-7:2".to_string())));
        assert_eq!(b.raft_messages(1), vec![msg(7, 2, 42)]);

        // ... and so is the peer connected all along.
        a.transport.send(vec![msg(1, 2, 2)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 2)]);
        assert_eq!(a.peer(2).dropped, 0);
    }

    #[test]
    fn ping_answers_pong_and_misrouted_messages_are_dropped() {
        let b = Node::on_any_port(2);
        let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        // Messages for node 3 must not reach node 2's raft; the connection stays up.
        let mut request = command(&[b"MSGS", &msg(1, 3, 1).encode_to_vec()]);
        request.extend(command(&[b"PING"]));
        request.extend(command(&[b"ping", b"hi"]));
        s.write_all(&request).unwrap();
        let mut reply = [0u8; 7 + 8];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+PONG\r\n$2\r\nhi\r\n");
        s.write_all(&command(&[b"MSGS", &msg(1, 2, 5).encode_to_vec()])).unwrap();
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 5)], "nothing before it: the misrouted one was dropped");
    }

    #[test]
    fn shutdown_is_prompt_idempotent_and_frees_the_port() {
        let dead_port = unused_port();
        let a = Node::on_any_port(1);
        let b = Node::on_any_port(2);
        a.transport.set_peer_addr(NodeId(2), b.addr());
        a.transport.set_peer_addr(NodeId(3), loopback(dead_port).to_string());
        a.transport.send(vec![msg(1, 2, 1), msg(1, 3, 1)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
        // An idle inbound connection must not hold shutdown up either.
        let _idle = std::net::TcpStream::connect(a.addr()).unwrap();

        let began = Instant::now();
        a.transport.shutdown();
        assert!(began.elapsed() < Duration::from_secs(2), "took {:?}", began.elapsed());
        a.transport.shutdown();
        let clone = a.transport.clone();
        clone.send(vec![msg(1, 2, 2)]);
        clone.set_peer_addr(NodeId(2), b.addr());
        assert!(clone.stats().is_empty());
        std::net::TcpListener::bind(a.transport.local_addr()).expect("the port is free again");

        // Dropping the last handle shuts down too.
        let addr = b.transport.local_addr();
        drop(b);
        std::net::TcpListener::bind(addr).expect("the port is free after the last handle is gone");
    }

    fn forwarded(argv: &[&str]) -> ForwardRequest {
        let argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
        ForwardRequest { resp3: false, what: forward::Forwarded::Command { db: 0, argv } }
    }

    /// Forwards `req` from `from` to `to_addr` and waits for the outcome.
    fn forward_and_wait(from: &Node, to_addr: &str, argv: &[&str]) -> forward::ForwardReply {
        let (tx, rx) = std_mpsc::channel();
        let req = forwarded(argv);
        from.transport.forward(to_addr.to_string(), &req, DEADLINE, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv_timeout(DEADLINE * 2).expect("forward answers")
    }

    #[test]
    fn forwarded_commands_reach_the_handler_and_their_replies_come_back() {
        let leader = Node::on_any_port(1);
        let follower = Node::on_any_port(2);
        // Before the module installs a handler the leader refuses politely.
        let refused = forward_and_wait(&follower, &leader.addr(), &["GET", "k"]).unwrap_err();
        assert!(refused.contains("does not serve forwarded commands"), "{refused}");

        // The handler answers later, from another thread, like the main thread would.
        leader.transport.set_forward_handler(Arc::new(|req: ForwardRequest, done: ForwardDone, _: Abandoned| {
            std::thread::spawn(move || {
                let forward::Forwarded::Command { argv, .. } = req.what else { return done(Err("ERR not a command".into())) };
                let name = String::from_utf8_lossy(&argv[0]).to_string();
                done(match name.as_str() {
                    "ECHO" => Ok(format!("${}\r\n{}\r\n", argv[1].len(), String::from_utf8_lossy(&argv[1])).into_bytes()),
                    _ => Err("MOVED 0 elsewhere:1".into()),
                })
            });
        }));
        for i in 0..20 {
            let word = format!("w{i}");
            let reply = forward_and_wait(&follower, &leader.addr(), &["ECHO", &word]).unwrap();
            assert_eq!(reply, format!("${}\r\n{word}\r\n", word.len()).into_bytes());
        }
        assert_eq!(forward_and_wait(&follower, &leader.addr(), &["SET", "k", "v"]).unwrap_err(), "MOVED 0 elsewhere:1");
        // Pipelined on one raw connection, replies keep the order of the requests.
        let mut pipelined = Vec::new();
        for word in ["a", "bb", "ccc"] {
            let mut out = BytesMut::new();
            forwarded(&["ECHO", word]).encode(&mut out);
            pipelined.extend_from_slice(&out);
        }
        let mut s = std::net::TcpStream::connect(leader.addr()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(&pipelined).unwrap();
        let expected = b"$7\r\n$1\r\na\r\n\r\n$8\r\n$2\r\nbb\r\n\r\n$9\r\n$3\r\nccc\r\n\r\n";
        let mut got = vec![0u8; expected.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
    }

    #[test]
    fn a_raft_password_keeps_out_whoever_does_not_know_it() {
        let a = Node::with_password(1, "s3cret");
        let b = Node::with_password(2, "s3cret");
        let stranger = Node::with_password(3, "guess");
        let open = Node::on_any_port(4);
        for node in [&a, &stranger, &open] {
            node.transport.set_peer_addr(NodeId(2), b.addr());
        }
        b.transport.set_forward_handler(Arc::new(|_: ForwardRequest, done: ForwardDone, _: Abandoned| done(Ok(b"+OK\r\n".to_vec()))));

        // The other member's messages and forwarded commands get through.
        a.transport.send(vec![msg(1, 2, 1)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
        assert_eq!(forward_and_wait(&a, &b.addr(), &["SET", "k", "v"]).unwrap(), b"+OK\r\n");

        // A wrong password or none: nothing arrives, and the sender hears why.
        stranger.transport.send(vec![msg(3, 2, 7)]);
        open.transport.send(vec![msg(4, 2, 8)]);
        stranger.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
        open.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
        let refused = forward_and_wait(&stranger, &b.addr(), &["FLUSHALL"]).unwrap_err();
        assert!(refused.starts_with("CLUSTERDOWN") && refused.contains("WRONGPASS"), "{refused}");
        let refused = forward_and_wait(&open, &b.addr(), &["FLUSHALL"]).unwrap_err();
        assert!(refused.contains("NOAUTH"), "{refused}");
        // The same by hand: every command before AUTH is refused, the snapshot files included.
        for request in [command(&[b"PING"]), command(&[b"SNAPSHOT.CHUNK", b"x.rsnap", b"0", b"10"]), command(&[b"HELLO", b"9", b"x:1"])] {
            assert_eq!(raw_exchange(&b.addr(), &request), b"-NOAUTH Authentication required.\r\n");
        }
        let mut good = command(&[b"AUTH", b"s3cret"]);
        good.extend(command(&[b"PING"]));
        good.extend(command(&[b"AUTH", b"guess"]));
        assert_eq!(raw_exchange(&b.addr(), &good), b"+OK\r\n+PONG\r\n-WRONGPASS invalid raft-password\r\n");
        // A node without a password says so rather than accept any.
        let refused = String::from_utf8(raw_exchange(&open.addr(), &command(&[b"AUTH", b"s3cret"]))).unwrap();
        assert!(refused.starts_with("-ERR AUTH: this node has no raft-password"), "{refused}");
        assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_) | Inbound::Hello { from: NodeId(3 | 4 | 9), .. })));
    }

    #[test]
    fn a_node_whose_shared_settings_differ_is_refused_with_what_differs() {
        let with = |me: u64, databases: &str| {
            let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("node-{me}.test:7000"));
            cfg.advertise_client = Some(format!("client-{me}.test:6379"));
            cfg.shared = Some(SharedSettings::read(|name| if name == "databases" { databases.into() } else { "1".into() }));
            Node::with_config(cfg)
        };
        let (a, b, odd) = (with(1, "16"), with(2, "16"), with(3, "32"));
        a.transport.set_peer_addr(NodeId(2), b.addr());
        odd.transport.set_peer_addr(NodeId(2), b.addr());
        a.transport.send(vec![msg(1, 2, 1)]);
        assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
        odd.transport.send(vec![msg(3, 2, 1)]);
        odd.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
        let why = odd.peer(2).last_error.expect("the refusal is kept");
        assert!(why.contains("Redis settings differ from this node's: databases is 32 there and 16 here"), "{why}");
        let hello = command(&[b"HELLO", b"3", b"x:1", b"y:2", SharedSettings::decode("databases=32").encode().as_bytes()]);
        let refused = String::from_utf8(raw_exchange(&b.addr(), &hello)).unwrap();
        assert!(refused.starts_with("-ERR node 3's Redis settings differ from this node's: databases is 32 there and 16 here"), "{refused}");
        assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_) | Inbound::Hello { from: NodeId(3), .. })));
    }

    #[test]
    fn a_peer_that_refuses_us_right_after_connecting_is_retried_with_backoff() {
        // A peer that accepts, answers an error and hangs up (as one with another raft-password
        // does): each attempt "connects", but must not count as a working connection.
        let peer = std::net::TcpListener::bind(loopback(0)).unwrap();
        peer.set_nonblocking(true).unwrap();
        let a = Node::on_any_port(1);
        a.transport.set_peer_addr(NodeId(2), peer.local_addr().unwrap().to_string());
        a.transport.send(vec![msg(1, 2, 1)]);
        let started = Instant::now();
        let mut attempts = 0;
        while started.elapsed() < Duration::from_secs(3) {
            match peer.accept() {
                Ok((mut s, _)) => {
                    attempts += 1;
                    let _ = s.write_all(b"-NOAUTH Authentication required.\r\n");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("accept: {e}"),
            }
        }
        // Backing off from 50 ms, doubling: 6 attempts in 3 s; every 50 ms would be ~50.
        assert!((2..=10).contains(&attempts), "{attempts} connection attempts in 3 s");
        assert!(!a.peer(2).connected);
    }

    #[test]
    fn forwarding_to_a_dead_leader_says_nothing_was_sent() {
        let follower = Node::on_any_port(2);
        let dead = loopback(unused_port()).to_string();
        let err = forward_and_wait(&follower, &dead, &["SET", "k", "v"]).unwrap_err();
        assert!(err.starts_with("CLUSTERDOWN cannot reach the leader"), "{err}");
    }

    #[test]
    fn a_pooled_connection_the_leader_closed_is_not_used_again() {
        // A leader that answers one command per connection, then closes it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (closed_tx, closed) = std_mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                let mut request = [0u8; 1024];
                let _ = conn.read(&mut request).unwrap();
                conn.write_all(b"$4\r\n:1\r\n\r\n").unwrap();
                drop(conn);
                let _ = closed_tx.send(());
            }
        });
        let follower = Node::on_any_port(2);
        for i in 0..3 {
            assert_eq!(forward_and_wait(&follower, &addr, &["INCR", "k"]), Ok(b":1\r\n".to_vec()), "forward {i}");
            closed.recv_timeout(DEADLINE).expect("the leader closed the connection");
        }
    }

    #[test]
    fn a_blocking_forward_waits_past_any_backstop_until_answered_or_cancelled() {
        let leader = Node::on_any_port(1);
        let follower = Node::on_any_port(2);
        // The handler hands each request's answer and hang-up flag to the test.
        let (handed_tx, handed) = std_mpsc::channel::<(ForwardDone, Abandoned)>();
        let handed_tx = Mutex::new(handed_tx);
        leader.transport.set_forward_handler(Arc::new(move |_req: ForwardRequest, done: ForwardDone, abandoned: Abandoned| {
            handed_tx.lock().unwrap().send((done, abandoned)).unwrap();
        }));
        let blpop = || {
            let argv = ["BLPOP", "q", "0"].iter().map(|a| a.as_bytes().to_vec()).collect();
            ForwardRequest { resp3: false, what: Forwarded::Blocking { db: 0, argv } }
        };
        let start = |cancel: ForwardCancel| {
            let (tx, rx) = std_mpsc::channel();
            follower.transport.forward_until(leader.addr(), &blpop(), None, cancel, Box::new(move |r| tx.send(r).unwrap()));
            let (done, abandoned) = handed.recv_timeout(DEADLINE).expect("the leader gets the request");
            (rx, done, abandoned)
        };

        // Answered: the reply comes back, and nothing was abandoned.
        let (replies, done, abandoned) = start(ForwardCancel::default());
        done(Ok(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n".to_vec()));
        assert_eq!(replies.recv_timeout(DEADLINE).unwrap().unwrap(), b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
        assert!(!abandoned.is_set());

        // Cancelled: the follower's client gets the reason at once, and the leader sees the
        // hang-up.
        let cancel = ForwardCancel::default();
        let (replies, _done, abandoned) = start(cancel.clone());
        assert!(replies.recv_timeout(Duration::from_millis(50)).is_err(), "it waits");
        assert!(!abandoned.is_set());
        cancel.cancel("TIMEOUT gave up");
        assert_eq!(replies.recv_timeout(DEADLINE).unwrap().unwrap_err(), "TIMEOUT gave up");
        wait_until("the leader to see the hang-up", || abandoned.is_set());
    }
}
