//! The module's global state: settings, the log store, the Raft node once this server belongs
//! to a cluster, and the apply machinery. Created once in `RedisModule_OnLoad`.

use crate::apply::Job;
use crate::apply::{self, ApplyProgress, RedisMachine};
use crate::ffi::DetachedContext;
use crate::snapshot::Snapshots;
use raftis_core::cluster_view::HashSlot;
use raftis_core::config::Consistency;
use raftis_core::ids::LogIndex;
use raftis_core::membership::NodeInfo;
use raftis_core::node::{Node, NodeConfig, TakenSnapshot};
use raftis_core::proposal::ProposeError;
use raftis_core::routing::{CommandTable, KeyPositions, Route};
use raftis_core::settings::Settings;
use raftis_core::shared_settings::SharedSettings;
use raftis_core::status::Status;
use raftis_core::storage::LogStore;
use raftis_core::NodeId;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

const META_NODE_ID: &str = "node_id";

pub type RaftNode = Node<RedisMachine>;

/// How [`Raftis::start_node`] finds the store.
pub enum Start<'a> {
    /// As it is: a restart, or a node waiting for a leader to add it.
    AsIs,
    /// Bootstrapped first, this node the single voter of a new cluster (`RAFT.CLUSTER INIT`).
    NewCluster,
    /// Bootstrapped first from the first snapshot of a new cluster (`RAFT.CLUSTER INIT KEEPDATA`).
    Seeded(&'a TakenSnapshot),
}

pub struct Raftis {
    pub settings: RwLock<Settings>,
    pub store: LogStore,
    /// Where the side port listens.
    pub listen: SocketAddr,
    /// This node's addresses as peers and clients should use them.
    pub client_addr: String,
    pub raft_addr: String,
    table: RwLock<CommandTable>,
    pub progress: Arc<ApplyProgress>,
    apply_ctx: Arc<DetachedContext>,
    node: RwLock<Option<Arc<RaftNode>>>,
    consistency: AtomicU8,
    snapshot_threshold: AtomicU64,
    snapshot_log_bytes: AtomicU64,
    maxmemory: AtomicU64,
    pub snapshots: Snapshots,
    /// How many databases Redis has (snapshots cover them all).
    pub databases: u32,
    /// The Redis settings every node must share, as they were at load (see
    /// `raftis_core::shared_settings`).
    pub shared: SharedSettings,
    apply_tx: Mutex<Option<apply::Queue>>,
    /// Set when this node must stop serving: a snapshot it cannot load, or its Raft loop stopped
    /// (a log it cannot write, e.g. on a full disk).
    fatal: Mutex<Option<String>>,
    /// Whether `fatal` is set, for the command filter (read on every command).
    stopped: AtomicBool,
    /// Whether `node` is set, for the command filter.
    has_node: AtomicBool,
    /// What a restarted node knew committed when it started: it replays its own log that far
    /// before it serves a read from its dataset (see [`Raftis::replaying_to`]).
    replay_to: AtomicU64,
    /// Serialises INIT/JOIN so two of them cannot both start a node.
    starting: Mutex<()>,
    /// Held by `RAFT.CONFIG SET` throughout, and by a starting node from its install on: a SET
    /// made while the node was being built (from settings read before it) either finds the node
    /// or is found by it.
    pub(crate) config_change: Mutex<()>,
}

static STATE: OnceLock<Raftis> = OnceLock::new();

pub fn init(r: Raftis) -> &'static Raftis {
    let _ = STATE.set(r);
    get()
}

pub fn get() -> &'static Raftis {
    STATE.get().expect("raftis state is initialised in OnLoad before any command runs")
}

impl Raftis {
    // One call, in OnLoad: each argument is something it found or built.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        store: LogStore,
        listen: SocketAddr,
        client_addr: String,
        raft_addr: String,
        table: CommandTable,
        apply_ctx: DetachedContext,
        databases: u32,
        shared: SharedSettings,
    ) -> Raftis {
        let r = Raftis {
            consistency: AtomicU8::new(0),
            snapshot_threshold: AtomicU64::new(settings.snapshot_threshold),
            snapshot_log_bytes: AtomicU64::new(settings.snapshot_log_bytes),
            maxmemory: AtomicU64::new(settings.maxmemory),
            snapshots: Snapshots::default(),
            databases,
            shared,
            apply_tx: Mutex::new(None),
            fatal: Mutex::new(None),
            stopped: AtomicBool::new(false),
            settings: RwLock::new(settings.clone()),
            store,
            listen,
            client_addr,
            raft_addr,
            table: RwLock::new(table),
            progress: Arc::new(ApplyProgress::default()),
            apply_ctx: Arc::new(apply_ctx),
            node: RwLock::new(None),
            has_node: AtomicBool::new(false),
            replay_to: AtomicU64::new(0),
            starting: Mutex::new(()),
            config_change: Mutex::new(()),
        };
        r.set_consistency(settings.consistency);
        r
    }

    pub fn node(&self) -> Option<Arc<RaftNode>> {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Read on every client read: kept outside the settings lock.
    pub fn consistency(&self) -> Consistency {
        match self.consistency.load(Ordering::Relaxed) {
            0 => Consistency::High,
            1 => Consistency::Medium,
            _ => Consistency::Low,
        }
    }

    pub fn set_consistency(&self, c: Consistency) {
        let code = match c {
            Consistency::High => 0,
            Consistency::Medium => 1,
            Consistency::Low => 2,
        };
        self.consistency.store(code, Ordering::Relaxed);
        self.settings.write().unwrap_or_else(|p| p.into_inner()).consistency = c;
    }

    pub fn snapshot_threshold(&self) -> u64 {
        self.snapshot_threshold.load(Ordering::Relaxed)
    }

    pub fn set_snapshot_threshold(&self, entries: u64) {
        self.snapshot_threshold.store(entries, Ordering::Relaxed);
    }

    pub fn snapshot_log_bytes(&self) -> u64 {
        self.snapshot_log_bytes.load(Ordering::Relaxed)
    }

    pub fn set_snapshot_log_bytes(&self, bytes: u64) {
        self.snapshot_log_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The memory limit in bytes (0: none); read on every write while one is set.
    pub fn maxmemory(&self) -> u64 {
        self.maxmemory.load(Ordering::Relaxed)
    }

    pub fn set_maxmemory(&self, bytes: u64) {
        self.maxmemory.store(bytes, Ordering::Relaxed);
    }

    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this node stopped serving (see [`Raftis::fatal`]; a Raft loop that stops sets it
    /// too, through the state machine). Lock-free.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Whether a read may run on the local dataset without asking (at consistency low): not
    /// on a node that is in no cluster yet (its dataset is nobody's), nor on one that stopped.
    /// Lock-free.
    pub fn may_read_locally(&self) -> bool {
        self.has_node.load(Ordering::Acquire) && !self.stopped() && self.replaying_to().is_none()
    }

    /// While a restarted node's dataset is behind what it knew committed when it started (its
    /// snapshot not loaded yet, its log not replayed that far), the index its local reads wait
    /// for: served before, they would show a dataset older than one it served before the restart
    /// (or Redis' own dump file).
    pub fn replaying_to(&self) -> Option<LogIndex> {
        let to = LogIndex(self.replay_to.load(Ordering::Acquire));
        (to.get() > 0 && self.progress.applied() < to).then_some(to)
    }

    /// Why this node stopped serving, if it did.
    pub fn stopped_why(&self) -> Option<String> {
        self.stopped().then(|| self.fatal()).flatten()
    }

    /// The reply to a client's data command once this node stopped serving.
    pub fn refuse_if_stopped(&self) -> Result<(), String> {
        match self.stopped_why() {
            Some(why) => Err(stopped_error(&why)),
            None => Ok(()),
        }
    }

    /// Where a command goes (see `raftis_core::routing`).
    pub fn route(&self, argv: &[&[u8]]) -> Route {
        self.table.read().unwrap_or_else(|p| p.into_inner()).route(argv)
    }

    pub fn refused_in_scripts(&self, argv: &[&[u8]]) -> Option<String> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).refused_in_scripts(argv)
    }

    pub fn grows_memory(&self, argv: &[&[u8]]) -> bool {
        self.table.read().unwrap_or_else(|p| p.into_inner()).grows_memory(argv)
    }

    pub fn writes(&self, argv: &[&[u8]]) -> bool {
        self.table.read().unwrap_or_else(|p| p.into_inner()).writes(argv)
    }

    pub fn key_positions(&self, argv: &[&[u8]]) -> KeyPositions {
        self.table.read().unwrap_or_else(|p| p.into_inner()).key_positions(argv)
    }

    /// The node, for a client's read, write or transaction: an error reply if this node is not
    /// in a cluster yet or stopped serving.
    pub fn serving_node(&self) -> Result<Arc<RaftNode>, String> {
        let node = self.node().ok_or_else(crate::write::not_initialized)?;
        self.refuse_if_stopped()?;
        Ok(node)
    }

    /// This node stops serving, for good (until it is restarted). The first reason is kept.
    pub fn set_fatal(&self, why: String) {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        self.stopped.store(true, Ordering::Release);
    }

    /// This node's dataset cannot follow the log any more (an entry it cannot run as the others
    /// do, a snapshot it cannot load). It stops serving, applies nothing more and takes no more
    /// snapshots (one would record the wrong dataset as the truth for the next start), and leaves
    /// the cluster's Raft traffic to the others: as a voter that still answered, it could lead,
    /// and hold every write up. A restart once the cause is fixed replays the log again.
    pub fn dataset_cannot_follow(&self, why: String) {
        log::error!("{why}; this node stops serving and leaves the others to go on without it");
        self.set_fatal(why);
        let Some(node) = self.node() else { return };
        let spawned = std::thread::Builder::new().name("raft-step-aside".into()).spawn(move || {
            // Handing leadership over first spares the others an election timeout.
            if let Ok(to) = get().hand_over_leadership(&node) {
                log::info!("handed leadership to node {to}");
            }
            node.shutdown();
        });
        if let Err(e) = spawned {
            log::error!("cannot spawn a thread to stop the raft node: {e}");
        }
    }

    /// Hands leadership to the most up-to-date voter if this node leads, and waits for it: one
    /// election timeout at most (0.2-5 s), after which raft gives the hand-over up anyway.
    /// Blocks the caller.
    pub fn hand_over_leadership(&self, node: &RaftNode) -> Result<NodeId, raftis_core::node::HandOverError> {
        let wait = node.status().election_timeout().clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(5));
        node.hand_over_leadership(std::time::Instant::now() + wait)
    }

    /// Queues work for the dataset on the main thread (RAFT.SNAPSHOT).
    pub fn send_to_apply(&self, job: Job) -> Result<(), String> {
        match &*self.apply_tx.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(queue) => {
                queue.send(job);
                Ok(())
            }
            None => Err(crate::write::not_initialized()),
        }
    }

    /// A context for calls on Redis' main thread outside any command (applying entries).
    pub fn main_thread_ctx(&self) -> *mut crate::ffi::RedisModuleCtx {
        self.apply_ctx.0
    }

    pub fn settings(&self) -> Settings {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The current write-timeout, without copying all settings (every request asks).
    pub fn write_timeout(&self) -> std::time::Duration {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).write_timeout
    }

    /// Whether followers forward instead of redirecting.
    pub fn follower_proxy(&self) -> bool {
        self.settings.read().unwrap_or_else(|p| p.into_inner()).follower_proxy
    }

    /// The id this node was given when it joined or created a cluster.
    pub fn stored_node_id(&self) -> anyhow::Result<Option<NodeId>> {
        Ok(match self.store.get_meta(META_NODE_ID)? {
            Some(b) => Some(NodeId(u64::from_be_bytes(b.as_slice().try_into().map_err(|_| anyhow::anyhow!("node id is corrupt"))?))),
            None => None,
        })
    }

    /// Records this node's id in the store. Done before the store is bootstrapped: a log with
    /// Raft state but no node id cannot be loaded, whereas an id with no Raft state is an
    /// uninitialized node, which can run `RAFT.CLUSTER` again after a crash.
    fn store_node_id(&self, id: NodeId) -> anyhow::Result<()> {
        Ok(self.store.put_meta(META_NODE_ID, &id.get().to_be_bytes())?)
    }

    pub fn info(&self, id: NodeId) -> NodeInfo {
        NodeInfo { id, raft_addr: self.raft_addr.clone(), client_addr: self.client_addr.clone() }
    }

    /// Starts the Raft node with `id`, from the store as `start` says. Returns the running node
    /// if there is one, unless a new cluster was asked for.
    pub fn start_node(&self, id: NodeId, start: Start) -> anyhow::Result<Arc<RaftNode>> {
        let _guard = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = self.node() {
            anyhow::ensure!(matches!(start, Start::AsIs), "this node already belongs to a cluster");
            return Ok(node);
        }
        self.store_node_id(id)?;
        match start {
            Start::AsIs => {}
            Start::NewCluster => RaftNode::bootstrap(&self.store, &self.info(id))?,
            Start::Seeded(seed) => RaftNode::bootstrap_from(&self.store, &self.info(id), seed)?,
        }
        let settings = self.settings();
        let (machine, apply_tx) = apply::start(self.apply_ctx.clone(), self.progress.clone());
        *self.apply_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(apply_tx);
        let cfg = NodeConfig {
            id,
            listen: self.listen,
            info: self.info(id),
            timing: settings.timing.clone(),
            durability: settings.durability,
            snapshot_dir: settings.dir.clone(),
            trailing_logs: settings.trailing_logs,
            trailing_bytes: settings.snapshot_log_bytes,
            max_entry_bytes: settings.max_entry_bytes,
            password: settings.raft_password.clone(),
            shared: Some(self.shared.clone()),
        };
        self.replay_to.store(self.store.hard_state().commit, Ordering::Release);
        let node = Arc::new(RaftNode::start(cfg, self.store.clone(), machine)?);
        node.transport().set_forward_handler(crate::forward::handler());
        node.transport().set_dataset(Arc::new(crate::forward::DatasetProgress));
        let _config = self.config_change.lock().unwrap_or_else(|p| p.into_inner());
        *self.node.write().unwrap_or_else(|p| p.into_inner()) = Some(node.clone());
        self.has_node.store(true, Ordering::Release);
        if let Err(e) = crate::config_cmd::push_to_node(&node, &settings, &self.settings()) {
            log::warn!("a RAFT.CONFIG SET made while the node started does not apply to it: {e}");
        }
        Ok(node)
    }
}

/// The error for a write whose log entry would be `bytes` long, over `max-entry-size`.
pub fn too_large(bytes: u64, limit: u64) -> String {
    format!("ERR the write is too large for the Raft log: its entry would be {bytes} bytes, over max-entry-size ({limit} bytes)")
}

/// The error for a client's command on a node that stopped serving.
pub fn stopped_error(why: &str) -> String {
    format!("CLUSTERDOWN this node stopped serving: {why}")
}

/// The reply to a write whose entry was committed, reaching a node that stopped before it could
/// apply it: it takes effect (on the other nodes), but this node cannot tell its result.
pub fn committed_but_stopped_error(why: &str) -> String {
    format!("TIMEOUT this node stopped serving ({why}) before it applied the request; the request was committed and takes effect on the other nodes")
}

/// The error for a request this node cannot serve or send anywhere: it knows no leader.
pub const NO_LEADER: &str = "CLUSTERDOWN No raft leader";

/// `-MOVED` to the leader's client address for a command on `slot` (see
/// `cluster_view::slot_of`), or `-CLUSTERDOWN` when there is no leader or this node stopped.
pub fn redirect(status: &Status, slot: HashSlot) -> String {
    // A node whose Raft loop stopped still names the leader it knew last, possibly itself.
    if let Err(stopped) = get().refuse_if_stopped() {
        return stopped;
    }
    match status.leader_member() {
        Some(leader) => format!("MOVED {slot} {}", raftis_core::cluster_view::moved_address(&leader.client_addr)),
        None => NO_LEADER.to_string(),
    }
}

/// The error reply for a request the cluster did not complete. `-TIMEOUT` always means the
/// outcome is unknown; `-MOVED` (naming `slot`) and `-CLUSTERDOWN` mean the request took no
/// effect.
pub fn error_reply(err: &ProposeError, slot: HashSlot) -> String {
    match err {
        ProposeError::NotLeader { .. } => match get().node() {
            Some(node) => redirect(&node.status(), slot),
            None => NO_LEADER.to_string(),
        },
        ProposeError::LeadershipLost => {
            "TIMEOUT leadership changed while the request was in flight; it may or may not have taken effect".into()
        }
        ProposeError::Timeout => "TIMEOUT the request was not committed within write-timeout; it may still take effect".into(),
        ProposeError::Shutdown => match get().fatal() {
            Some(why) => format!("TIMEOUT this node stopped serving ({why}); the request may or may not have taken effect"),
            None => "TIMEOUT the node is shutting down; the request may or may not have taken effect".into(),
        },
        ProposeError::Overwritten => "CLUSTERDOWN the request was discarded by a new leader; retry it".into(),
        ProposeError::Dropped(why) => format!("CLUSTERDOWN the request was not accepted: {why}"),
        ProposeError::Refused(why) => format!("ERR {why}"),
        ProposeError::TooLarge { bytes, limit } => too_large(*bytes, *limit),
    }
}
