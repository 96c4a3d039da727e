//! The side-port transport between Raft nodes.
//!
//! Every node listens on its raft address and dials one long-lived outgoing TCP connection to each
//! peer. Connections carry traffic one way: the dialer introduces itself with
//! `HELLO <id> <advertise-addr> [<client-addr> <shared settings> <last log index> <incarnation>
//! <cluster id>]` (a node of another cluster is refused, see [`crate::cluster_id`], so is one
//! whose settings differ, see [`crate::shared_settings`], one the cluster removed, and a second
//! server with a live one's id, see `claims`) and then sends
//! `MSGS <m1> <m2> ...` frames, each a RESP array of bulk strings holding prost-encoded raft
//! messages. Nothing is answered, except by
//! an error that closes the connection (`-REMOVED ...` to a node that says hello or asks for votes
//! after it was removed from the cluster). The listener also answers `PING` with `+PONG`, so
//! `redis-cli -p <raft-port> PING` tells an operator the port is alive, and `HEALTH` with the
//! leader's view of every member (see [`crate::health_report`]). With a `raft-password`,
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
//!
//! This file holds the handle ([`Transport`]) and the state its tasks share; the tasks are in
//! the files beside it: `dial` (to each peer), `listen` (from them) and `forwarding` (a
//! follower's proxied commands).

use crate::cluster_id::ClusterId;
use crate::forward::{self, Abandoned, Dataset, ForwardCancel, ForwardDone, ForwardHandler, ForwardRequest};
use crate::health_report;
use crate::heartbeats;
use crate::ids::{LogIndex, NodeId};
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

mod claims;
mod dial;
mod forwarding;
mod keepalive;
mod listen;
#[cfg(test)]
mod tests;

use dial::{run_peer, Hello, PeerTask, MIN_BACKOFF};
use forwarding::{ask_once, catch_up, catch_up_limit, forward_once, forward_to_leader};
use listen::{accept_loop, Served};

pub const DEFAULT_QUEUE_LIMIT: usize = 4096;
/// Bytes waiting for one peer; more are dropped. The message limit alone would let a queue of full
/// appends (up to 1 MiB each) hold gigabytes for a dead or slow peer.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// tokio's bounded channel needs a capacity of at least 1 and far below `usize::MAX`; a queue
/// bigger than this would defeat the point of bounding memory anyway.
const MAX_QUEUE_LIMIT: usize = 1 << 24;
/// Without a deadline, dialing a black-holed address waits for the kernel's SYN retries (minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that accepts no bytes at all for this long is treated as gone. This is a stall timeout
/// (reset by any progress), so a large snapshot on a slow link still gets through.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a removed peer's queued messages may take to go out before its connection is dropped.
const RETIRE_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for blocking work (DNS lookups while dialing) before giving up on it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// This node's cluster, said in `HELLO`; peers of another are refused (see [`crate::cluster_id`]).
    pub cluster: ClusterId,
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
            cluster: ClusterId::UNKNOWN,
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
/// Set by the module: how far this node's dataset has come (see [`Dataset`]). Empty: replies
/// say index 0 and are relayed at once.
type DatasetSlot = Arc<std::sync::RwLock<Option<Arc<dyn Dataset>>>>;
/// Set by the Raft node; empty means no vote is refused.
type RemovedSlot = Arc<std::sync::RwLock<Option<RemovedCheck>>>;
/// Set by the Raft node: its answer to `HEALTH` (see [`crate::health_report`]), or the error
/// line it answers instead (a follower has nothing to report).
pub type HealthSource = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;
type HealthSlot = Arc<std::sync::RwLock<Option<HealthSource>>>;
/// Set by the Raft node: the side-port address of the leader this node knows of, if any, where a
/// forwarded command goes again when the node it went to ran none of it (see `forwarding`).
pub type LeaderSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;
type LeaderSlot = Arc<std::sync::RwLock<Option<LeaderSource>>>;

/// This node's cluster id, which a joining node learns late, and the ones its peers said.
#[derive(Default)]
struct Clusters {
    ours: AtomicU64,
    said: Mutex<HashMap<NodeId, ClusterId>>,
}

impl Clusters {
    fn ours(&self) -> ClusterId {
        ClusterId(self.ours.load(Ordering::Relaxed))
    }
}

struct Inner {
    me: NodeId,
    advertise: String,
    advertise_client: Option<String>,
    queue_limit: usize,
    password: Option<Password>,
    shared: Option<SharedSettings>,
    /// The index of the last entry in this node's log, said in `HELLO`.
    last_index: Arc<AtomicU64>,
    /// Said in `HELLO`, to tell this server from another with the same node id (see `claims`).
    incarnation: u64,
    clusters: Arc<Clusters>,
    local_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    inbound: Callback,
    forward_handler: ForwardSlot,
    dataset: DatasetSlot,
    /// Forwarded replies that waited for this node's dataset to catch up, and those relayed
    /// without it having caught up in time.
    catch_ups: AtomicU64,
    catch_ups_late: AtomicU64,
    removed_check: RemovedSlot,
    health: HealthSlot,
    leader: LeaderSlot,
    /// Idle connections to leaders, for forwarding commands (one command at a time each).
    forward_pool: Mutex<HashMap<String, Vec<TcpStream>>>,
    /// Shared with the listener, which wakes a peer's dialer when that peer says hello.
    state: Arc<Mutex<State>>,
    /// Taken by the first shutdown, which makes shutdown idempotent.
    stop: Mutex<Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

struct State {
    peers: HashMap<NodeId, Peer>,
    closed: bool,
}

impl State {
    /// `id` has just dialed us, so it is up: if our own connection to it is down, dial it now
    /// rather than after the rest of the backoff. Without this a restarted node waits up to
    /// [`dial::MAX_BACKOFF`] for the leader's appends, and counts as missing meanwhile.
    fn heard_from(&self, id: NodeId) {
        if let Some(peer) = self.peers.get(&id) {
            if !peer.link.connected.load(Ordering::Relaxed) {
                peer.link.redial.notify_one();
            }
        }
    }
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
    /// Cuts a wait between dial attempts short: the peer just dialed us, so it is up again.
    redial: tokio::sync::Notify,
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
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().context("building the transport runtime")?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let inbound: Callback = Arc::new(inbound);
        let handle = runtime.handle().clone();
        let snapshots = cfg.snapshot_dir.clone().map(Arc::new);
        let forward_handler = ForwardSlot::default();
        let dataset = DatasetSlot::default();
        let removed_check = RemovedSlot::default();
        let health = HealthSlot::default();
        let leader = LeaderSlot::default();
        let incarnation = claims::new_incarnation();
        let clusters = Arc::new(Clusters { ours: AtomicU64::new(cfg.cluster.0), said: Mutex::default() });
        let state = Arc::new(Mutex::new(State { peers: HashMap::new(), closed: false }));
        let served = Served {
            dialers: state.clone(),
            me: cfg.me,
            inbound: inbound.clone(),
            snapshots,
            forward: forward_handler.clone(),
            dataset: dataset.clone(),
            removed: removed_check.clone(),
            health: health.clone(),
            password: cfg.password.clone(),
            shared: cfg.shared.clone(),
            claims: Arc::default(),
            clusters: clusters.clone(),
            waiting_for_auth: Arc::default(),
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
                incarnation,
                clusters,
                local_addr,
                runtime: handle,
                inbound,
                forward_handler,
                dataset,
                catch_ups: AtomicU64::new(0),
                catch_ups_late: AtomicU64::new(0),
                removed_check,
                health,
                leader,
                forward_pool: Mutex::new(HashMap::new()),
                state,
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
        stop.as_ref().is_some_and(|(_, thread)| thread.thread().id() == std::thread::current().id())
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

    /// This node's cluster id, as it says it in `HELLO` and checks peers' against.
    pub fn cluster_id(&self) -> ClusterId {
        self.inner.clusters.ours()
    }

    /// Sets the cluster id of a node that joined without one, for the connections made from now
    /// on (those open keep saying none, which no member refuses).
    pub fn set_cluster_id(&self, id: ClusterId) {
        self.inner.clusters.ours.store(id.0, Ordering::Relaxed);
    }

    /// The cluster id `peer` said in its last `HELLO`, if it said one.
    pub fn cluster_said_by(&self, peer: NodeId) -> Option<ClusterId> {
        self.inner.clusters.said.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).copied()
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

    /// Tells forwarded replies how far this node's dataset has come, as a leader, and waits for
    /// it to catch up with them, as a follower (see [`Dataset`]).
    pub fn set_dataset(&self, dataset: Arc<dyn Dataset>) {
        *self.inner.dataset.write().unwrap_or_else(|p| p.into_inner()) = Some(dataset);
    }

    /// Forwarded replies that waited for this node's dataset to catch up with the leader's, and
    /// how many of them were relayed anyway because it had not within their time.
    pub fn catch_up_stats(&self) -> (u64, u64) {
        (self.inner.catch_ups.load(Ordering::Relaxed), self.inner.catch_ups_late.load(Ordering::Relaxed))
    }

    /// Refuses the votes of members that `check` says were removed from the cluster: their
    /// connection is closed with `-REMOVED <why>`, which their transport reports as
    /// [`Inbound::Removed`]. Raft itself never tells a removed node: the leader stops writing to
    /// it, and with pre-vote the others ignore its campaigns, so it would ask for votes for ever.
    pub fn set_removed_check(&self, check: RemovedCheck) {
        *self.inner.removed_check.write().unwrap_or_else(|p| p.into_inner()) = Some(check);
    }

    /// Answers `HEALTH` with what `source` says (see [`crate::health_report`]).
    pub fn set_health_source(&self, source: HealthSource) {
        *self.inner.health.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Where forwarded commands go again when the node they went to ran none of them: the
    /// leader `source` names (see `forwarding::forward_to_leader`).
    pub fn set_leader_source(&self, source: LeaderSource) {
        *self.inner.leader.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Asks the leader at `addr` for its health report and calls `done` with the raw answer, or
    /// with an error line (it could not be reached, did not answer within `timeout`, or refused).
    pub fn ask_health(&self, addr: String, timeout: Duration, done: ForwardDone) {
        let mut request = BytesMut::new();
        resp::encode_command(&[health_report::HEALTH], &mut request);
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let answer = tokio::time::timeout(timeout, ask_once(&inner, &addr, &request, false)).await;
            done(answer.unwrap_or_else(|_| Err(format!("TIMEOUT the leader at {addr} did not answer HEALTH in time"))));
        });
    }

    /// Sends `req` to the leader's side port at `addr` and calls `done` with its reply, or with
    /// an error line: `CLUSTERDOWN` if no leader could be reached (nothing was sent),
    /// `TIMEOUT` if the answer did not come back within `timeout` (the command may have run).
    /// Where the node at `addr` ran none of it, it goes on to the next leader this node learns
    /// of (see `forwarding::forward_to_leader`). A reply waits, within `timeout`, for this node's
    /// dataset to reflect the leader's as it answered (see [`Dataset`]).
    pub fn forward(&self, addr: String, req: &ForwardRequest, timeout: Duration, done: ForwardDone) {
        self.send_forward(addr, req, Some(timeout), ForwardCancel::default(), true, done);
    }

    /// Like [`Transport::forward`], with no timeout if `timeout` is None (a blocking command may
    /// wait for ever), and ended early by `cancel`: `done` then gets the cancel's reason, and the
    /// connection is closed, which tells the leader to stop waiting. It goes to `addr` only: the
    /// caller sends a blocking command on itself, for what is left of its timeout.
    pub fn forward_until(&self, addr: String, req: &ForwardRequest, timeout: Option<Duration>, cancel: ForwardCancel, done: ForwardDone) {
        self.send_forward(addr, req, timeout, cancel, false, done);
    }

    fn send_forward(
        &self,
        addr: String,
        req: &ForwardRequest,
        timeout: Option<Duration>,
        cancel: ForwardCancel,
        follow_leader: bool,
        done: ForwardDone,
    ) {
        let mut request = BytesMut::new();
        req.encode(&mut request);
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let started = tokio::time::Instant::now();
            let answer = async {
                let once = async {
                    match follow_leader {
                        true => forward_to_leader(&inner, addr, &request).await,
                        false => forward_once(&inner, &addr, &request).await,
                    }
                };
                match timeout {
                    None => once.await,
                    Some(timeout) => tokio::time::timeout(timeout, once).await.unwrap_or_else(|_| {
                        Err("TIMEOUT the leader did not answer in time; the command may or may not have taken effect".into())
                    }),
                }
            };
            // Dropping the unanswered request drops its connection (it is not pooled).
            let reply = tokio::select! {
                // A forward cancelled before it is sent is not sent.
                biased;
                reason = cancel.cancelled() => Err(reason),
                reply = answer => reply,
            };
            done(match reply {
                Ok((raw, reflects)) => {
                    tokio::select! {
                        () = catch_up(&inner, reflects, catch_up_limit(timeout, started.elapsed())) => {}
                        // Its client is gone or given up on: nobody to read anything here.
                        _ = cancel.cancelled() => {}
                    }
                    Ok(raw)
                }
                Err(e) => Err(e),
            });
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
                    incarnation: inner.incarnation,
                    cluster: inner.clusters.clone(),
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
                    // Raft gives a leadership transfer up after an election timeout. Queued for
                    // a peer it cannot reach, the transfer's MsgTimeoutNow would go out whenever
                    // the peer comes back, and make it start an election long after.
                    Some(peer) if msg.msg_type() == MessageType::MsgTimeoutNow && !peer.link.connected.load(Ordering::Relaxed) => {
                        peer.counters.drop_messages(to, 1, "a leadership transfer to an unreachable peer");
                    }
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
        self.inner.shutdown(true);
    }

    /// Like [`Transport::shutdown`], without waiting for the transport thread: a task stuck on
    /// it (a Raft loop in an fsync of a dead disk) must not hold up the process' exit.
    pub fn shutdown_without_waiting(&self) {
        self.inner.shutdown(false);
    }
}

impl Inner {
    /// The lock is only held for short, non-blocking work and never across a callback; a panic
    /// while holding it leaves the map consistent, so a poisoned lock is simply reused.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutdown(&self, wait: bool) {
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
            if wait && thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                log::error!("raft transport: the network thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown(true);
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
