//! A Raft node: one `RawNode` driven by the "Raft loop", persisting to a [`LogStore`], talking
//! to peers through a [`Transport`], and handing committed entries, in log order, to a
//! [`StateMachine`].
//!
//! Everything that touches the `RawNode` happens on the Raft loop. Other threads talk to it
//! through a channel of [`Request`]s and read its published [`Status`]. The loop drains every
//! request already queued before it asks raft for a Ready, so a burst of proposals becomes one
//! Ready, one LMDB transaction and one fsync (group commit).
//!
//! The loop is a task on the transport's network thread rather than a thread of its own: a
//! round trip to the followers then wakes one thread per node instead of two, which on a small
//! machine is most of what a round costs. The loop lets the connections write its messages
//! before it blocks in an fsync, so a leader still persists while its appends travel.

use crate::config::{Durability, Timing};
use crate::heartbeats;
use crate::ids::{LogIndex, NodeId, Term};
use crate::membership::{self, Members, MembershipChange, NodeInfo, Readdress};
use crate::proposal::{Callback, Pending, PendingProposals, ProposeError, Waiter};
use crate::raft_logger;
use crate::recovery::{self, Recovery, META_RECOVERY};
use crate::snapshot_data;
use crate::snapshot_transfer::{self, FetchProgress, SnapshotDescriptor};
use crate::status::{Counters, PeerProgress, Role, Status};
use crate::storage::{LogStore, StorageError};
use crate::transport::{Inbound, Transport, TransportConfig};
use anyhow::Context as _;
use crossbeam_channel::Sender;
use prost::Message as _;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{RawNode, StateRole};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use std::time::{Duration, Instant};

/// Requests drained per loop round before a Ready is processed. Bounds the latency one round
/// adds while still batching generously.
const MAX_REQUESTS_PER_ROUND: usize = 8192;
/// How often the leader proposes new addresses for a member that moved, at most.
const READDRESS_EVERY: Duration = Duration::from_secs(1);

/// Log entries dropped per loop round when compacting after a snapshot. Deleting a million
/// small entries in one LMDB transaction kept the loop (and so heartbeats and appends) busy for
/// ~0.45 s; this many take a few milliseconds, and the rounds in between serve everything else.
const COMPACTION_STEP: u64 = 16_384;

/// A loop round longer than this is counted and logged. The loop also runs the side port: while
/// one round lasts, this node sends no heartbeats and reads nothing from its peers, and a round
/// past the election timeout gets a leader deposed without it noticing.
const SLOW_ROUND: Duration = Duration::from_millis(500);
/// Slow rounds are logged at most this often (every one is counted).
const SLOW_ROUND_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a shutdown waits for the Raft loop to answer what it holds and stop.
const LOOP_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a recovered node asks again for the snapshot that ends its recovery.
const RECOVERY_SNAPSHOT_RETRY: Duration = Duration::from_secs(2);

const META_MEMBERS: &str = "members";
const META_CONF_APPLIED: &str = "conf_applied";
/// Why this node was removed from the cluster, once it knows: it then stays stopped, restarts
/// included (its data is no longer replicated; it joins again with an empty dir).
const META_REMOVED: &str = "removed";

/// The application on top of the log. The Raft loop calls it; it must not block for long (the
/// Redis module hands batches to Redis' main thread and returns).
pub trait StateMachine: Send + 'static {
    type Waiter: Waiter;

    /// Committed normal entries, in log order. Every entry up to `batch.applied_to` has been
    /// handed over once this returns (entries without data and membership entries are not in
    /// `entries`, but are covered by `applied_to`).
    fn apply(&mut self, batch: ApplyBatch<Self::Waiter>);

    /// Replace the whole dataset with a snapshot's application bytes, taken at `index`.
    fn restore(&mut self, index: LogIndex, data: &[u8]);

    /// A follower needs a snapshot the latest one cannot serve: take a new one soon (then call
    /// [`Node::snapshot_taken`]).
    fn request_snapshot(&mut self) {}

    /// The Raft loop stopped for good on an error (`why`, also in [`Status::fatal`]): nothing
    /// more will be applied, and the dataset should no longer be served.
    fn stopped(&mut self, _why: &str) {}
    /// This node was removed from the cluster (`why`, also in [`Status::fatal`]); the Raft loop
    /// has stopped for good, as for [`StateMachine::stopped`].
    fn removed(&mut self, why: &str) {
        self.stopped(why)
    }
}

pub struct ApplyBatch<W> {
    pub entries: Vec<Committed<W>>,
    pub applied_to: LogIndex,
    /// Term of the entry at `applied_to`, and the membership in force there: what a snapshot
    /// taken right after this batch must record.
    pub term: Term,
    pub conf_state: ConfState,
    pub members: Arc<Members>,
}

/// A snapshot file the state machine finished writing (see [`Node::snapshot_taken`]).
#[derive(Clone, Debug)]
pub struct TakenSnapshot {
    pub index: LogIndex,
    pub term: Term,
    pub conf_state: ConfState,
    pub members: Arc<Members>,
    pub descriptor: SnapshotDescriptor,
}

pub struct Committed<W> {
    pub index: LogIndex,
    pub term: Term,
    pub data: Vec<u8>,
    /// Present on the node that proposed the entry, while its proposer is still waiting.
    pub waiter: Option<W>,
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Address the side port binds to.
    pub listen: SocketAddr,
    /// This node's advertised addresses (what peers and clients are told).
    pub info: NodeInfo,
    pub timing: Timing,
    pub durability: Durability,
    /// Where snapshot files are kept (and served to peers from).
    pub snapshot_dir: PathBuf,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers replay them
    /// rather than download the whole dataset.
    pub trailing_logs: u64,
    /// ... and at most this many bytes of them (0: no byte limit), so large values cannot make
    /// the kept tail outgrow the disk.
    pub trailing_bytes: u64,
    /// Proposals larger than this are refused (see [`crate::settings::Settings::max_entry_bytes`]).
    pub max_entry_bytes: u64,
    /// The cluster's `raft-password`, if it has one (see [`crate::peer_auth`]).
    pub password: Option<crate::peer_auth::Password>,
    /// The Redis settings every node must share (see [`crate::shared_settings`]); None: not compared.
    pub shared: Option<crate::shared_settings::SharedSettings>,
}

enum Request<W> {
    Propose { data: Vec<u8>, waiter: W, deadline: Instant },
    ChangeMembership { change: MembershipChange, waiter: Callback<()>, deadline: Instant },
    /// With a term, the round only counts in that term (see [`Node::read_index_in_term`]).
    ReadIndex { waiter: Callback<LogIndex>, deadline: Instant, term: Option<Term> },
    LastProposed(Callback<LogIndex>),
    Raft(Vec<Message>),
    Hello { from: NodeId, addr: String, client_addr: Option<String> },
    Unreachable(NodeId),
    /// A peer says this node was removed from the cluster.
    Removed { by: NodeId, why: String },
    TransferLeader(NodeId),
    SetTicks { election: usize, heartbeat: usize },
    /// Make this node the only voter of a cluster that lost its majority (see [`crate::recovery`]).
    Recover(Sender<Result<LogIndex, String>>),
    SnapshotTaken(TakenSnapshot, Sender<()>),
    /// A snapshot message whose file has been fetched (or could not be).
    SnapshotFetched { msg: Box<Message>, ok: bool },
    Shutdown,
}

#[derive(Default)]
struct CounterCells {
    rounds: AtomicU64,
    readies: AtomicU64,
    proposals: AtomicU64,
    entries_persisted: AtomicU64,
    fsyncs: AtomicU64,
    persist_micros: AtomicU64,
    read_index_rounds: AtomicU64,
    reads: AtomicU64,
    heartbeats_coalesced: AtomicU64,
    slow_rounds: AtomicU64,
    max_round_micros: AtomicU64,
    compaction_steps: AtomicU64,
    snapshots_fetched: AtomicU64,
    snapshot_fetch_failures: AtomicU64,
    snapshot_bytes_fetched: AtomicU64,
}

impl CounterCells {
    fn add(cell: &AtomicU64, n: u64) {
        cell.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            rounds: get(&self.rounds),
            readies: get(&self.readies),
            proposals: get(&self.proposals),
            entries_persisted: get(&self.entries_persisted),
            fsyncs: get(&self.fsyncs),
            persist_micros: get(&self.persist_micros),
            read_index_rounds: get(&self.read_index_rounds),
            reads: get(&self.reads),
            heartbeats_coalesced: get(&self.heartbeats_coalesced),
            slow_rounds: get(&self.slow_rounds),
            max_round_micros: get(&self.max_round_micros),
            compaction_steps: get(&self.compaction_steps),
            snapshots_fetched: get(&self.snapshots_fetched),
            snapshot_fetch_failures: get(&self.snapshot_fetch_failures),
            snapshot_bytes_fetched: get(&self.snapshot_bytes_fetched),
        }
    }
}

struct Shared {
    status: Mutex<Status>,
    /// Cheap view of the status for hot paths (every client command asks): the term while
    /// leading, 0 otherwise.
    leading_term: AtomicU64,
    /// Index of the entry that made this leader ready (its own term's first commit); 0 if none.
    ready_index: AtomicU64,
    tick_ms: AtomicU64,
    counters: CounterCells,
    durability: AtomicU8,
    trailing_bytes: AtomicU64,
    max_entry_bytes: AtomicU64,
    /// Entries were written without fsync since the last flush (durability medium/low).
    dirty: AtomicBool,
    stopped: AtomicBool,
    /// The snapshot file being downloaded from the leader, if any.
    fetch: Mutex<Option<FetchProgress>>,
}

/// Handle to a running node. Dropping it shuts the node down.
pub struct Node<S: StateMachine> {
    tx: UnboundedSender<Request<S::Waiter>>,
    shared: Arc<Shared>,
    transport: Transport,
    /// Signalled when the Raft loop has stopped.
    loop_stopped: crossbeam_channel::Receiver<()>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl<S: StateMachine> Node<S> {
    /// Makes `store` the log of a new single-node cluster with `info` as its only voter. The
    /// first log entry is the membership change that adds it (with its addresses), committed by
    /// construction: nodes that join later replay the whole membership history from the log.
    pub fn bootstrap(store: &LogStore, info: &NodeInfo) -> anyhow::Result<()> {
        anyhow::ensure!(!store.is_initialized(), "this node already belongs to a cluster");
        let (cc, context) = MembershipChange::AddVoter(info.clone()).to_raft();
        let mut entry = Entry::default();
        entry.set_entry_type(EntryType::EntryConfChangeV2);
        entry.index = 1;
        entry.term = 1;
        entry.data = cc.encode_to_vec();
        entry.context = context;
        let hard_state = HardState { term: 1, vote: 0, commit: 1 };
        store.set_conf_state(&ConfState { voters: vec![info.id.get()], ..Default::default() })?;
        store.append(&[entry], Some(&hard_state), true).context("writing the first log entry")?;
        let mut members = Members::new();
        members.insert(info.id, info.clone());
        store.put_meta(META_MEMBERS, &serde_json::to_vec(&members)?)?;
        store.put_meta(META_CONF_APPLIED, &1u64.to_be_bytes())?;
        store.sync()?;
        Ok(())
    }

    /// Starts the side port and the Raft loop. A store that was never bootstrapped gives a node
    /// that waits to be added to a cluster by its leader.
    pub fn start(cfg: NodeConfig, store: LogStore, mut sm: S) -> anyhow::Result<Node<S>> {
        let recovered = match store.get_meta(META_RECOVERY)? {
            Some(bytes) => Some(Recovery::decode(&bytes).context("the recovery record is corrupt")?),
            None => None,
        };
        if let Some(rec) = recovered.as_ref().filter(|r| !r.done) {
            // A crash in the middle of the recovery: finish it.
            store_recovered_membership(&store, &cfg.info, rec).context("finishing an interrupted recovery")?;
        }
        let recovered = recovered.map(|r| Arc::new(Recovery { done: true, ..r }));
        let members: Members = match store.get_meta(META_MEMBERS)? {
            Some(bytes) => serde_json::from_slice(&bytes).context("decoding the member list")?,
            None => Members::new(),
        };
        let removed = store.get_meta(META_REMOVED)?.map(|why| String::from_utf8_lossy(&why).into_owned());
        let conf_applied = match store.get_meta(META_CONF_APPLIED)? {
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().context("conf_applied is corrupt")?),
            None => 0,
        };

        // The state machine starts empty: it is rebuilt from the latest snapshot and the log.
        // The dataset resumes at the snapshot's index, which may be past the first log entry:
        // entries kept behind it (trailing logs) are already in the snapshot and must not be
        // applied again.
        let snapshot = raft::Storage::snapshot(&store, 0, 0).ok().filter(|s| s.get_metadata().index > 0);
        let snapshot_index = match snapshot {
            Some(snap) => {
                let (_, app) = snapshot_data::decode(&snap.data)?;
                sm.restore(LogIndex(snap.get_metadata().index), app);
                snap.get_metadata().index
            }
            None => {
                let index = store.first_index().saturating_sub(1);
                sm.restore(LogIndex(index), &[]);
                index
            }
        };

        let raft_cfg = raft_config(cfg.id, cfg.timing.election_ticks, cfg.timing.heartbeat_ticks, snapshot_index);
        raft_cfg.validate().context("invalid raft configuration")?;
        let logger = raft_logger::logger(cfg.id.get());
        let raw = RawNode::new(&raft_cfg, store.clone(), &logger).context("starting raft")?;

        let (tx, rx) = mpsc::unbounded_channel::<Request<S::Waiter>>();
        let inbound_tx = tx.clone();
        let transport = Transport::start(
            TransportConfig {
                me: cfg.id,
                listen: cfg.listen,
                advertise: cfg.info.raft_addr.clone(),
                advertise_client: Some(cfg.info.client_addr.clone()),
                queue_limit: 4096,
                snapshot_dir: Some(cfg.snapshot_dir.clone()),
                password: cfg.password.clone(),
                shared: cfg.shared.clone(),
            },
            move |inbound| {
                let req = match inbound {
                    Inbound::Raft(msgs) => Request::Raft(msgs),
                    Inbound::Hello { from, addr, client_addr } => Request::Hello { from, addr, client_addr },
                    Inbound::Unreachable(id) => Request::Unreachable(id),
                    Inbound::Removed { by, why } => Request::Removed { by, why },
                };
                let _ = inbound_tx.send(req);
            },
        )
        .with_context(|| format!("starting the side port on {}", cfg.listen))?;
        // Before the first dial: a member that removed this node meanwhile tells it in answer.
        transport.set_last_index(membership_claim(&raw, cfg.id));
        for info in members.values().filter(|m| m.id != cfg.id) {
            transport.set_peer_addr(info.id, info.raft_addr.clone());
        }

        let shared = Arc::new(Shared {
            status: Mutex::new(Status::initial(cfg.id)),
            leading_term: AtomicU64::new(0),
            ready_index: AtomicU64::new(0),
            tick_ms: AtomicU64::new(cfg.timing.tick_interval.as_millis().max(1) as u64),
            counters: CounterCells::default(),
            durability: AtomicU8::new(durability_code(cfg.durability)),
            trailing_bytes: AtomicU64::new(cfg.trailing_bytes),
            max_entry_bytes: AtomicU64::new(cfg.max_entry_bytes),
            dirty: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            fetch: Mutex::new(None),
        });
        let status = shared.clone();
        transport.set_removed_check(Arc::new(move |from, their_last| {
            let status = status.status.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(rec) = status.recovered.as_ref().filter(|r| r.left(from)) {
                return Some(format!(
                    "node {} recovered the cluster on its own at index {} and left node {from} behind",
                    status.id, rec.at
                ));
            }
            let is_member = |id: NodeId| status.voters.contains(&id) || status.learners.contains(&id);
            membership::was_removed(is_member, status.applied, from, LogIndex(their_last)).then(|| {
                let (me, applied) = (status.id, status.applied);
                format!(
                    "node {me} has applied the removal of node {from} (applied up to {applied}, its log ends at {their_last})"
                )
            })
        }));
        let mut raft_loop = RaftLoop {
            self_tx: tx.clone(),
            snapshot_dir: cfg.snapshot_dir.clone(),
            trailing_logs: cfg.trailing_logs,
            fetching: None,
            id: cfg.id,
            me: cfg.info.clone(),
            raw,
            store: store.clone(),
            sm,
            transport: transport.clone(),
            shared: shared.clone(),
            rx,
            round: Vec::new(),
            slow_round_logged: None,
            compact_to: 0,
            ticks_wanted: None,
            campaigned: false,
            members: Arc::new(members),
            conf_applied: LogIndex(conf_applied),
            proposals: PendingProposals::new(),
            membership_waiters: BTreeMap::new(),
            readdress: Readdress::default(),
            readdress_proposed: None,
            membership_done: Vec::new(),
            reads_to_start: Vec::new(),
            reads_in_flight: BTreeMap::new(),
            next_read_id: 1,
            was_leader: false,
            leader_ready: false,
            shutdown: false,
            removed,
            recovery: recovered,
            recover_wanted: None,
            recovery_snapshot_asked: None,
            last_heard: BTreeMap::new(),
        };
        raft_loop.publish_status();
        let (stopped_tx, loop_stopped) = crossbeam_channel::bounded(1);
        transport.spawn(async move {
            raft_loop.run().await;
            let _ = stopped_tx.send(());
        });
        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name(format!("raft-flush-{}", cfg.id))
            .spawn(move || flush_every_second(flusher_shared, store))
            .context("spawning the flush thread")?;
        Ok(Node { tx, shared, transport, loop_stopped, flusher: Mutex::new(Some(flusher)) })
    }

    /// Proposes `data` as a log entry. `waiter` is completed by the state machine when the entry
    /// is applied, or failed by the node (not leader, leadership lost, overwritten, deadline).
    pub fn propose(&self, data: Vec<u8>, waiter: S::Waiter, deadline: Instant) {
        if data.is_empty() {
            // Empty entries are raft's own (leader no-ops); never let a proposal look like one.
            return waiter.fail(ProposeError::Dropped("empty proposal".into()));
        }
        let limit = self.max_entry_bytes();
        if data.len() as u64 > limit {
            // raft copies an entry several times on every node within one loop round, which holds
            // up heartbeats: a large enough one costs an election (and a side-port frame is
            // limited anyway).
            return waiter.fail(ProposeError::TooLarge { bytes: data.len() as u64, limit });
        }
        if let Err(e) = self.tx.send(Request::Propose { data, waiter, deadline }) {
            if let Request::Propose { waiter, .. } = e.0 {
                waiter.fail(ProposeError::Shutdown);
            }
        }
    }

    /// One membership step; `waiter` completes when the change is committed and applied here.
    pub fn change_membership(&self, change: MembershipChange, waiter: Callback<()>, deadline: Instant) {
        if let Err(e) = self.tx.send(Request::ChangeMembership { change, waiter, deadline }) {
            if let Request::ChangeMembership { waiter, .. } = e.0 {
                waiter(Err(ProposeError::Shutdown));
            }
        }
    }

    /// Confirms leadership with a ReadIndex round (all reads queued in the same loop round share
    /// one). The waiter gets the commit index a linearizable read must wait to see applied.
    pub fn read_index(&self, waiter: Callback<LogIndex>, deadline: Instant) {
        self.send_read_index(waiter, deadline, None);
    }

    /// A ReadIndex round that fails unless this node still leads in `term` when the round
    /// starts. It confirms reads that already ran in that term: had another leader been elected
    /// since, the round could not be confirmed in the same term.
    pub fn read_index_in_term(&self, term: Term, waiter: Callback<LogIndex>, deadline: Instant) {
        self.send_read_index(waiter, deadline, Some(term));
    }

    fn send_read_index(&self, waiter: Callback<LogIndex>, deadline: Instant, term: Option<Term>) {
        if let Err(e) = self.tx.send(Request::ReadIndex { waiter, deadline, term }) {
            if let Request::ReadIndex { waiter, .. } = e.0 {
                waiter(Err(ProposeError::Shutdown));
            }
        }
    }

    /// A barrier behind every proposal sent before it: the waiter gets the index of the last
    /// entry this leader has appended by then (so once that index is applied, every earlier
    /// proposal has been applied or has failed), or an error if this node does not lead.
    pub fn last_proposed_index(&self, waiter: Callback<LogIndex>) {
        if let Err(e) = self.tx.send(Request::LastProposed(waiter)) {
            if let Request::LastProposed(waiter) = e.0 {
                waiter(Err(ProposeError::Shutdown));
            }
        }
    }

    /// Asks the leader to hand leadership to `to` (best effort).
    pub fn transfer_leader(&self, to: NodeId) {
        let _ = self.tx.send(Request::TransferLeader(to));
    }

    /// On a leader about to go away: hands leadership to its most up-to-date voter and waits,
    /// until `deadline` at most, for this node to stop leading, so the cluster has a new leader
    /// at once instead of after an election timeout. Returns the node it handed over to, or why
    /// it did not (not the leader, no other voter, or no hand-over in time). Blocks the caller.
    pub fn hand_over_leadership(&self, deadline: Instant) -> Result<NodeId, String> {
        let status = self.status();
        if !status.is_leader() {
            return Err("this node does not lead".into());
        }
        let to = status.successor().ok_or("no other voter to hand leadership to")?;
        self.transfer_leader(to);
        loop {
            let status = self.status();
            if !status.is_leader() {
                return Ok(to);
            }
            if Instant::now() >= deadline || status.fatal.is_some() {
                return Err(format!("node {to} did not take over in time"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Changes raft's election and heartbeat timeouts (in ticks) on this running node. raft-rs
    /// fixes them when a node is built, so the node rebuilds its raft state from the log (term,
    /// vote, commit, membership: nothing is lost). A leader first hands leadership to its most
    /// up-to-date voter, so the cluster keeps a leader throughout; a single-node cluster
    /// re-elects itself at once.
    pub fn set_ticks(&self, election: usize, heartbeat: usize) -> Result<(), String> {
        raft_config(NodeId(1), election, heartbeat, 0).validate().map_err(|e| e.to_string())?;
        let _ = self.tx.send(Request::SetTicks { election, heartbeat });
        Ok(())
    }

    /// Blocking: makes this node the only voter of a cluster that lost its majority for good,
    /// keeping its whole log (see [`crate::recovery`]). Returns the index the recovery was made
    /// at, or why it was refused. The node then elects itself.
    pub fn recover(&self) -> Result<LogIndex, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Request::Recover(tx)).is_err() {
            return Err("the raft node has stopped".into());
        }
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(answer) => answer,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err("the raft node has stopped".into()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err("the raft loop did not answer in time".into()),
        }
    }

    /// Blocking: adds `info` as a learner, waits until it has caught up with the log, then
    /// promotes it to voter. Runs on the caller's thread (never Redis' main thread).
    pub fn add_member(&self, info: NodeInfo, deadline: Instant) -> Result<(), ProposeError> {
        let id = info.id;
        let status = self.status();
        if status.voters.contains(&id) {
            return Ok(());
        }
        // After a recovery, a new node must start from the snapshot that follows it, never from
        // the old membership's history (see `crate::recovery`).
        while self.status().recovery_pending() {
            if Instant::now() >= deadline {
                let status = self.status();
                return Err(ProposeError::Dropped(status.recovered.as_ref().map(|r| recovery_pending_message(r)).unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !status.learners.contains(&id) {
            self.change_membership_blocking(MembershipChange::AddLearner(info), deadline)?;
        }
        // A learner that has not caught up would stall the quorum as soon as it votes.
        loop {
            let status = self.status();
            if !status.is_leader() {
                return Err(ProposeError::NotLeader { leader: status.leader });
            }
            if status.progress_of(id).map_or(false, |p| p.matched >= status.commit) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ProposeError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.change_membership_blocking(MembershipChange::Promote(id), deadline)
    }

    /// Blocking form of [`Node::change_membership`].
    pub fn change_membership_blocking(&self, change: MembershipChange, deadline: Instant) -> Result<(), ProposeError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.change_membership(change, Box::new(move |r| drop(tx.send(r))), deadline);
        // The loop enforces the deadline; the margin only guards against a stopped loop.
        let margin = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        rx.recv_timeout(margin).unwrap_or(Err(ProposeError::Timeout))
    }

    pub fn status(&self) -> Status {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    /// The snapshot file this node is downloading, and how far it got.
    pub fn snapshot_fetch(&self) -> Option<FetchProgress> {
        self.shared.fetch.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True while this node leads. Lock-free: meant for every client command.
    pub fn is_leader(&self) -> bool {
        self.leading_term().is_some()
    }

    /// The term this node leads in, if it leads. Lock-free.
    pub fn leading_term(&self) -> Option<Term> {
        let term = self.shared.leading_term.load(Ordering::Acquire);
        (term > 0).then_some(Term(term))
    }

    /// While leading: the index of this term's first committed entry. A leader may serve
    /// leader-local reads once its state machine has applied it. None when not a ready leader.
    pub fn leader_ready_index(&self) -> Option<LogIndex> {
        let i = self.shared.ready_index.load(Ordering::Acquire);
        (i > 0 && self.is_leader()).then_some(LogIndex(i))
    }

    /// The state machine finished writing a snapshot file: raft will offer it to followers that
    /// need it, and the log is compacted up to it (keeping `trailing_logs` entries). Blocks until
    /// the log durably records the snapshot; false if it could not.
    pub fn snapshot_taken(&self, taken: TakenSnapshot) -> bool {
        let (done, recorded) = crossbeam_channel::bounded(1);
        if self.tx.send(Request::SnapshotTaken(taken, done)).is_err() {
            return false;
        }
        recorded.recv_timeout(Duration::from_secs(60)).is_ok()
    }

    /// Changes the tick length at runtime; election and heartbeat timeouts scale with it.
    pub fn set_tick_interval(&self, tick: Duration) {
        self.shared.tick_ms.store(tick.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn durability(&self) -> Durability {
        durability_from_code(self.shared.durability.load(Ordering::Relaxed))
    }

    pub fn set_durability(&self, durability: Durability) {
        self.shared.durability.store(durability_code(durability), Ordering::Relaxed);
    }

    pub fn max_entry_bytes(&self) -> u64 {
        self.shared.max_entry_bytes.load(Ordering::Relaxed)
    }

    pub fn set_max_entry_bytes(&self, bytes: u64) {
        self.shared.max_entry_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Changes the byte limit on the log kept behind a snapshot, from the next snapshot on.
    pub fn set_trailing_bytes(&self, bytes: u64) {
        self.shared.trailing_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Stops the Raft loop, the flusher and the side port; pending requests fail with
    /// [`ProposeError::Shutdown`]. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Request::Shutdown);
        // The loop answers what it holds before it stops. A shutdown from the network thread
        // itself (a callback dropping the last handle) cannot wait for it: the loop runs there.
        if !self.transport.on_network_thread() && self.loop_stopped.recv_timeout(LOOP_STOP_TIMEOUT).is_err() {
            log::warn!("raft node: the raft loop did not stop in time");
        }
        if let Some(flusher) = self.flusher.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = flusher.join();
        }
        self.transport.shutdown();
    }
}

impl<S: StateMachine> Drop for Node<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What this node's `HELLO` claims about its log (see [`Transport::set_last_index`]): how far it
/// goes, but only while the membership this node has applied counts it. Then an entry at or before
/// the end of its log made it a member, which is what lets a member that has applied further, and
/// no longer counts it, conclude it was removed. A node still catching up in its join has not
/// applied its own addition yet (that entry is further on): it claims nothing (0), or it would
/// be judged by memberships from before it was added.
fn membership_claim<S: raft::Storage>(raw: &RawNode<S>, id: NodeId) -> u64 {
    let conf = raw.raft.prs().conf();
    let counted = conf.voters().contains(id.get()) || conf.learners().contains(&id.get());
    if counted {
        raw.raft.raft_log.last_index()
    } else {
        0
    }
}

fn raft_config(id: NodeId, election_ticks: usize, heartbeat_ticks: usize, applied: u64) -> raft::Config {
    raft::Config {
        id: id.get(),
        election_tick: election_ticks,
        heartbeat_tick: heartbeat_ticks,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        // Many small proposals per Ready: let raft pack them into few append messages.
        batch_append: true,
        ..Default::default()
    }
}

fn durability_code(d: Durability) -> u8 {
    match d {
        Durability::High => 0,
        Durability::Medium => 1,
        Durability::Low => 2,
    }
}

fn durability_from_code(c: u8) -> Durability {
    match c {
        0 => Durability::High,
        1 => Durability::Medium,
        _ => Durability::Low,
    }
}

/// durability=medium: what was written without fsync reaches the disk within about a second.
fn flush_every_second(shared: Arc<Shared>, store: LogStore) {
    let mut last = Instant::now();
    while !shared.stopped.load(Ordering::Relaxed) {
        // Short sleeps so shutdown is prompt.
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last = Instant::now();
        let medium = durability_from_code(shared.durability.load(Ordering::Relaxed)) == Durability::Medium;
        if medium && shared.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = store.sync() {
                log::error!("background fsync of the raft log failed: {e:#}");
                shared.dirty.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct RaftLoop<S: StateMachine> {
    /// For helper threads (snapshot fetches) to report back.
    self_tx: UnboundedSender<Request<S::Waiter>>,
    snapshot_dir: PathBuf,
    trailing_logs: u64,
    /// The snapshot file being fetched, if any.
    fetching: Option<String>,
    id: NodeId,
    raw: RawNode<LogStore>,
    store: LogStore,
    sm: S,
    transport: Transport,
    shared: Arc<Shared>,
    rx: UnboundedReceiver<Request<S::Waiter>>,
    /// The requests of the current round (kept to reuse its allocation).
    round: Vec<Request<S::Waiter>>,
    /// When a slow round was last logged.
    slow_round_logged: Option<Instant>,
    /// The log is being compacted up to (not including) this index, a step per round.
    compact_to: u64,
    /// New election and heartbeat ticks waiting for a round boundary (and, on a leader, for
    /// leadership to move away), with when they were asked for.
    ticks_wanted: Option<(usize, usize, Instant)>,
    /// A campaign was started after this round's Ready: the next round must not wait.
    campaigned: bool,
    members: Arc<Members>,
    /// Membership entries up to here are already reflected in the stored ConfState: on restart
    /// they are replayed for the state machine but not applied to raft a second time.
    conf_applied: LogIndex,
    proposals: PendingProposals<S::Waiter>,
    membership_waiters: BTreeMap<LogIndex, (Term, Instant, Callback<()>)>,
    /// Members heard at new addresses, and when their change was last proposed.
    readdress: Readdress,
    readdress_proposed: Option<Instant>,
    membership_done: Vec<(Callback<()>, Result<(), ProposeError>)>,
    reads_to_start: Vec<(Instant, Option<Term>, Callback<LogIndex>)>,
    reads_in_flight: BTreeMap<u64, Vec<(Instant, Callback<LogIndex>)>>,
    next_read_id: u64,
    was_leader: bool,
    leader_ready: bool,
    shutdown: bool,
    /// Why this node was removed from the cluster, once it learns it: the loop then stops.
    removed: Option<String>,
    /// This node's own addresses, as it runs now.
    me: NodeInfo,
    /// The recovery this node made, if any (see [`crate::recovery`]).
    recovery: Option<Arc<Recovery>>,
    /// A recovery asked for, waiting for a round boundary.
    recover_wanted: Option<Sender<Result<LogIndex, String>>>,
    /// When the snapshot that ends a recovery was last asked for.
    recovery_snapshot_asked: Option<Instant>,
    /// When each peer's last message arrived: a recovery is refused while another member talks.
    last_heard: BTreeMap<NodeId, Instant>,
}

impl<S: StateMachine> RaftLoop<S> {
    async fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick_interval();
        while !self.shutdown {
            if let Some(why) = self.removed.take() {
                self.leave(why);
                break;
            }
            // With compaction left to do, or after a campaign started outside a round (new
            // timeouts on a single node), a round runs at once even if nothing arrives.
            let again = self.compacting() || std::mem::take(&mut self.campaigned);
            let wake_at = if again { Instant::now() } else { next_tick };
            let received = tokio::time::timeout_at(wake_at.into(), self.rx.recv()).await;
            let started = Instant::now();
            let mut requests = 0;
            self.store.set_ordered_commits(self.sync_writes());
            match received {
                Ok(Some(req)) => {
                    let mut round = std::mem::take(&mut self.round);
                    round.push(req);
                    while round.len() < MAX_REQUESTS_PER_ROUND {
                        match self.rx.try_recv() {
                            Ok(req) => round.push(req),
                            Err(_) => break,
                        }
                    }
                    let messages = round.iter_mut().filter_map(|req| match req {
                        Request::Raft(msgs) => Some(msgs),
                        _ => None,
                    });
                    let skipped = heartbeats::drop_superseded(messages);
                    CounterCells::add(&self.shared.counters.heartbeats_coalesced, skipped as u64);
                    requests = round.len();
                    for req in round.drain(..) {
                        self.handle(req);
                    }
                    self.round = round;
                }
                Ok(None) => break,
                Err(_elapsed) => {}
            }
            CounterCells::add(&self.shared.counters.rounds, 1);
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.tick_interval();
                self.expire(now);
            }
            self.start_reads();
            if let Err(e) = self.on_ready().await {
                self.stop_on(e);
                break;
            }
            self.transport.set_last_index(membership_claim(&self.raw, self.id));
            self.compact_step();
            if self.store.take_snapshot_wanted() {
                self.sm.request_snapshot();
            }
            self.check_leadership();
            self.propose_readdress();
            if let Err(e) = self.apply_wanted_ticks() {
                self.stop_on(e);
                break;
            }
            if let Err(e) = self.recover_if_wanted() {
                self.stop_on(e);
                break;
            }
            self.finish_recovery();
            self.publish_status();
            for (w, result) in self.membership_done.drain(..) {
                w(result);
            }
            self.account_round(started.elapsed(), requests);
            // Lets the connections write what this round sent (acknowledgements, heartbeats)
            // even while more requests keep the channel busy.
            tokio::task::yield_now().await;
        }
        self.shared.leading_term.store(0, Ordering::Release);
        self.shared.ready_index.store(0, Ordering::Release);
        // The commit index is written lazily; a clean stop leaves the newest on disk.
        if let Err(e) = self.store.store_commit() {
            log::warn!("raft {}: could not store the commit index at shutdown: {e:#}", self.id);
        }
        self.fail_everything(ProposeError::Shutdown);
        // Requests that raced with the stop still get an answer.
        self.rx.close();
        while let Ok(req) = self.rx.try_recv() {
            fail_request(req, ProposeError::Shutdown);
        }
        self.publish_status();
    }

    /// Records why the loop is about to stop, for the log and for `Status::fatal`.
    fn stop_on(&mut self, e: anyhow::Error) {
        let mut msg = format!("{e:#}");
        let disk_failed = e.chain().any(|cause| {
            cause.is::<std::io::Error>() || matches!(cause.downcast_ref::<StorageError>(), Some(StorageError::Lmdb(_) | StorageError::Io(_)))
        });
        if disk_failed {
            // A full disk shows up as a bare I/O error.
            msg = format!("{msg} ({})", crate::disk_space::describe(self.store.path()));
        }
        log::error!("raft node {} stopped: {msg}", self.id);
        self.sm.stopped(&msg);
        self.lock_status().fatal = Some(msg);
    }

    /// Stops for good: this node is no longer a member, so nothing it holds is replicated any
    /// more and it must serve nothing (raft would leave it campaigning, or following nobody, for
    /// ever). Whoever learnt of the removal has recorded it, so a restart stops again at once.
    fn leave(&mut self, why: String) {
        for id in self.members.keys() {
            self.transport.remove_peer(*id);
        }
        log::error!("raft node {} stopped: {why}", self.id);
        self.sm.removed(&why);
        self.lock_status().fatal = Some(why);
    }

    fn account_round(&mut self, took: Duration, requests: usize) {
        let counters = &self.shared.counters;
        counters.max_round_micros.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        if took < SLOW_ROUND {
            return;
        }
        CounterCells::add(&counters.slow_rounds, 1);
        if self.slow_round_logged.map_or(true, |at| at.elapsed() >= SLOW_ROUND_LOG_EVERY) {
            self.slow_round_logged = Some(Instant::now());
            log::warn!(
                "raft {}: one loop round took {took:?} ({requests} requests); meanwhile this node sent no heartbeats \
                 and read nothing from its peers (RAFT.STATS slow_rounds counts them all)",
                self.id
            );
        }
    }

    fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.shared.tick_ms.load(Ordering::Relaxed))
    }

    fn handle(&mut self, req: Request<S::Waiter>) {
        match req {
            Request::Propose { data, waiter, deadline } => self.propose(data, waiter, deadline),
            Request::ChangeMembership { change, waiter, deadline } => self.propose_membership(change, waiter, deadline),
            Request::ReadIndex { waiter, deadline, term } => self.reads_to_start.push((deadline, term, waiter)),
            Request::LastProposed(waiter) => match self.not_leader() {
                Some(err) => waiter(Err(err)),
                None => waiter(Ok(LogIndex(self.raw.raft.raft_log.last_index()))),
            },
            Request::Raft(msgs) => {
                let now = Instant::now();
                for m in msgs {
                    if self.left_behind(NodeId(m.from)) {
                        continue;
                    }
                    self.last_heard.insert(NodeId(m.from), now);
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        self.on_snapshot_message(m);
                    } else {
                        self.step(m);
                    }
                }
            }
            Request::SnapshotFetched { msg, ok } => {
                self.fetching = None;
                if ok {
                    self.step(*msg);
                }
            }
            Request::SnapshotTaken(taken, done) => {
                match self.on_snapshot_taken(taken) {
                    Ok(()) => drop(done.send(())),
                    Err(e) => log::error!("raft {}: could not record a new snapshot: {e:#}", self.id),
                }
            }
            Request::Hello { from, addr, client_addr } => {
                if from == self.id || self.left_behind(from) {
                    return;
                }
                // The member list is authoritative: a hello fills in peers we have not learnt yet
                // (e.g. the leader, seen by a node that is joining), and a member at new addresses
                // gets them through the log.
                self.readdress.heard(&self.members, from, &addr, client_addr.as_deref());
                if self.transport.peer_addr(from).is_none() {
                    self.transport.set_peer_addr(from, addr);
                }
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id.get()),
            // Several members may say so in one round; the first is recorded.
            Request::Removed { by, why } if self.removed.is_none() => {
                log::warn!("raft {}: node {by} says this node was removed from the cluster: {why}", self.id);
                let why = format!("removed from the cluster: {why}");
                if let Err(e) = self.store.put_meta(META_REMOVED, why.as_bytes()) {
                    log::warn!("raft {}: could not record its removal (a restart learns it again): {e:#}", self.id);
                }
                self.removed = Some(why);
            }
            Request::Removed { .. } => {}
            Request::TransferLeader(to) => self.raw.transfer_leader(to.get()),
            Request::SetTicks { election, heartbeat } => self.want_ticks(election, heartbeat),
            Request::Recover(done) => {
                if let Some(earlier) = self.recover_wanted.replace(done) {
                    let _ = earlier.send(Err("another RECOVER came first".into()));
                }
            }
            Request::Shutdown => self.shutdown = true,
        }
    }

    fn step(&mut self, m: Message) {
        // A message for another id (a misrouted or stale peer) is dropped by raft with an error;
        // nothing to do but log at debug level.
        if let Err(e) = self.raw.step(m) {
            log::debug!("raft {} ignored a message: {e}", self.id);
        }
    }

    /// A leader sends us a snapshot: fetch its file first (on another thread), then step it.
    fn on_snapshot_message(&mut self, m: Message) {
        let descriptor = m
            .snapshot
            .as_ref()
            .and_then(|snap| snapshot_data::decode(&snap.data).ok().and_then(|(_, app)| SnapshotDescriptor::decode(app)));
        let Some(descriptor) = descriptor else {
            return self.step(m);
        };
        if self.fetching.is_some() {
            return; // one fetch at a time; the leader sends the snapshot again later
        }
        let Some(peer) = self.transport.peer_addr(NodeId(m.from)) else {
            log::warn!("raft {}: snapshot from node {} whose address is unknown", self.id, m.from);
            return;
        };
        log::info!("raft {}: fetching snapshot {} ({} bytes) from node {}", self.id, descriptor.file, descriptor.size, m.from);
        self.fetching = Some(descriptor.file.clone());
        let (tx, dir, id, shared) = (self.self_tx.clone(), self.snapshot_dir.clone(), self.id, self.shared.clone());
        let password = self.transport.password();
        let from = NodeId(m.from);
        let spawned = std::thread::Builder::new().name(format!("raft-fetch-{id}")).spawn(move || {
            let started = Instant::now();
            let mut last = None;
            let result = snapshot_transfer::fetch(&peer, password.as_ref(), &descriptor, &dir, |received| {
                // The first report is what an earlier attempt left: not fetched now.
                let new = last.map_or(0, |l| received.saturating_sub(l));
                last = Some(received);
                CounterCells::add(&shared.counters.snapshot_bytes_fetched, new);
                *shared.fetch.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(FetchProgress { file: descriptor.file.clone(), from, received, size: descriptor.size });
            });
            *shared.fetch.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let ok = match result {
                Ok(()) => {
                    CounterCells::add(&shared.counters.snapshots_fetched, 1);
                    log::info!("raft {id}: fetched snapshot {} in {:?}", descriptor.file, started.elapsed());
                    true
                }
                Err(e) => {
                    CounterCells::add(&shared.counters.snapshot_fetch_failures, 1);
                    log::warn!("raft {id}: fetching snapshot {} from {peer} failed: {e:#}", descriptor.file);
                    false
                }
            };
            let _ = tx.send(Request::SnapshotFetched { msg: Box::new(m), ok });
        });
        if spawned.is_err() {
            self.fetching = None;
        }
    }

    /// The state machine wrote a snapshot file: make it raft's snapshot and compact the log.
    fn on_snapshot_taken(&mut self, t: TakenSnapshot) -> anyhow::Result<()> {
        let current = raft::Storage::snapshot(&self.store, 0, 0).map(|s| s.get_metadata().index).unwrap_or(0);
        if t.index.get() <= current {
            return Ok(());
        }
        let mut snapshot = Snapshot::default();
        snapshot.data = snapshot_data::encode(&t.members, &t.descriptor.encode());
        let meta = snapshot.metadata.get_or_insert_with(Default::default);
        meta.index = t.index.get();
        meta.term = t.term.get();
        meta.conf_state = Some(t.conf_state.clone());
        self.store.set_snapshot(snapshot).context("storing the snapshot metadata")?;
        let mut keep_from = (t.index.get() + 1).saturating_sub(self.trailing_logs);
        let trailing_bytes = self.shared.trailing_bytes.load(Ordering::Relaxed);
        if trailing_bytes > 0 {
            keep_from = self.store.start_within_bytes(keep_from, t.index.get(), trailing_bytes).context("sizing the log tail")?;
        }
        if self.pending_recovery().map_or(false, |r| t.index >= r.at) {
            // Nothing from before the recovery may be left for a new node to replay.
            keep_from = t.index.get() + 1;
        }
        // The entries go in steps, a few each round (`compact_step`), not all in this one.
        self.compact_to = self.compact_to.max(keep_from.min(self.raw.raft.raft_log.applied + 1));
        self.store.sync()?;
        let kept = self.snapshot_dir.join(&t.descriptor.file);
        let _ = crate::snapshot_file::remove_older_than(&self.snapshot_dir, &kept);
        log::info!(
            "raft {}: snapshot at {} ({} bytes); compacting the log from {} up to {}",
            self.id,
            t.index,
            t.descriptor.size,
            self.store.first_index(),
            self.compact_to
        );
        Ok(())
    }

    fn want_ticks(&mut self, election: usize, heartbeat: usize) {
        let raft = &self.raw.raft;
        if (election, heartbeat) == (raft.election_timeout(), raft.heartbeat_timeout()) {
            self.ticks_wanted = None;
            return;
        }
        self.ticks_wanted = Some((election, heartbeat, Instant::now()));
        if raft.state != StateRole::Leader {
            return;
        }
        // Rebuilding makes a leader a follower: hand leadership over first, to the voter that
        // has the most of the log (raft waits until it has all of it).
        let voters = self.conf_state().voters;
        let successor = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id.get() && voters.contains(id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id);
        if let Some(to) = successor {
            log::info!("raft {}: handing leadership to {to} before changing its timeouts", self.id);
            self.raw.transfer_leader(to);
        }
    }

    /// Rebuilds raft with the wanted ticks once this round left nothing pending and this node
    /// no longer leads others (or the hand-over had an election timeout to happen).
    fn apply_wanted_ticks(&mut self) -> anyhow::Result<()> {
        let Some((election, heartbeat, since)) = self.ticks_wanted else { return Ok(()) };
        if self.raw.has_ready() {
            return Ok(());
        }
        let leader = self.raw.raft.state == StateRole::Leader;
        let alone = self.conf_state().voters == [self.id.get()];
        let grace = self.tick_interval() * self.raw.raft.election_timeout() as u32;
        if leader && !alone && since.elapsed() < grace {
            return Ok(());
        }
        self.ticks_wanted = None;
        self.rebuild_raft(election, heartbeat).context("rebuilding raft with new timeouts")?;
        log::info!("raft {}: election timeout now {election} ticks, heartbeat {heartbeat} ticks", self.id);
        if leader && alone {
            // Nobody else can lead: elect ourselves again at once instead of after a timeout.
            self.raw.campaign().context("re-electing the only voter")?;
            self.campaigned = true;
        }
        self.check_leadership();
        Ok(())
    }

    /// The recovery this node made, while the log from before it is still there.
    fn pending_recovery(&self) -> Option<&Recovery> {
        self.recovery.as_deref().filter(|r| r.pending(LogIndex(self.store.first_index())))
    }

    fn left_behind(&self, id: NodeId) -> bool {
        self.recovery.as_ref().map_or(false, |r| r.left(id))
    }

    /// Runs a recovery asked for, at a round boundary (raft has nothing in flight to persist).
    /// An error is a store that failed half-way: the node stops, and finishes at its next start.
    fn recover_if_wanted(&mut self) -> anyhow::Result<()> {
        if self.recover_wanted.is_none() || self.raw.has_ready() {
            return Ok(());
        }
        let done = self.recover_wanted.take().expect("checked above");
        let result = self.recover();
        let answer = match &result {
            Ok(at) => Ok(*at),
            Err(RecoverError::Refused(why)) => Err(why.clone()),
            Err(RecoverError::Store(e)) => Err(format!("the recovery could not be stored: {e:#}")),
        };
        let _ = done.send(answer);
        match result {
            Err(RecoverError::Store(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn recover(&mut self) -> Result<LogIndex, RecoverError> {
        let conf = self.conf_state();
        let voters: Vec<NodeId> = conf.voters.iter().map(|v| NodeId(*v)).collect();
        let alive_within = self.tick_interval() * self.raw.raft.election_timeout() as u32 * recovery::ALIVE_WITHIN_ELECTIONS;
        let heard_from: Vec<NodeId> =
            self.last_heard.iter().filter(|(_, at)| at.elapsed() < alive_within).map(|(id, _)| *id).collect();
        let raft = &self.raw.raft;
        recovery::check(&recovery::Situation {
            me: self.id,
            leading: raft.state == StateRole::Leader,
            leader: (raft.leader_id != 0).then_some(NodeId(raft.leader_id)),
            voters: &voters,
            heard_from: &heard_from,
        })
        .map_err(RecoverError::Refused)?;
        let at = LogIndex(raft.raft_log.last_index());
        let (election, heartbeat) = (raft.election_timeout(), raft.heartbeat_timeout());
        let mut left: BTreeSet<NodeId> = self.members.keys().copied().collect();
        left.extend(conf.voters.iter().chain(&conf.learners).map(|v| NodeId(*v)));
        // Those an earlier recovery left behind stay left behind.
        left.extend(self.recovery.iter().flat_map(|r| r.left_behind.iter().copied()));
        left.remove(&self.id);
        let rec = Recovery { at, left_behind: left.into_iter().collect(), done: false };

        // The record first: a crash before the membership is stored finishes it at the next start.
        let store = || -> anyhow::Result<Members> {
            self.store.put_meta(META_RECOVERY, &rec.encode())?;
            self.store.sync()?;
            store_recovered_membership(&self.store, &self.me, &rec)
        };
        let members = store().map_err(RecoverError::Store)?;
        self.members = Arc::new(members);
        self.conf_applied = at;
        for id in &rec.left_behind {
            self.transport.remove_peer(*id);
        }
        // With the new membership from the store.
        self.rebuild_raft(election, heartbeat).context("rebuilding raft").map_err(RecoverError::Store)?;
        self.raw.campaign().context("electing the recovered node").map_err(RecoverError::Store)?;
        self.campaigned = true;
        self.recovery = Some(Arc::new(Recovery { done: true, ..rec.clone() }));
        self.recovery_snapshot_asked = None;
        self.check_leadership();
        log::warn!(
            "raft {}: RECOVER: this node is now the only voter of the cluster, with its whole log (up to {at}); \
             left behind: {}. It drops the log from before once a snapshot follows the recovery; add new nodes then",
            self.id,
            rec.left_behind.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
        );
        Ok(at)
    }

    /// After a recovery, asks for the snapshot that lets the log from before it go (see
    /// [`crate::recovery`]), again now and then until one is taken.
    fn finish_recovery(&mut self) {
        let Some(rec) = self.pending_recovery() else { return };
        if self.compact_to > rec.at.get() {
            return;
        }
        if self.raw.raft.raft_log.applied < rec.at.get() {
            return;
        }
        if self.recovery_snapshot_asked.map_or(false, |at| at.elapsed() < RECOVERY_SNAPSHOT_RETRY) {
            return;
        }
        self.recovery_snapshot_asked = Some(Instant::now());
        self.sm.request_snapshot();
    }

    /// Builds raft afresh from the store: term, vote, commit index, log and membership all come
    /// back from it; only in-memory rounds are lost (a leader's pending reads, which
    /// check_leadership fails).
    fn rebuild_raft(&mut self, election: usize, heartbeat: usize) -> anyhow::Result<()> {
        let cfg = raft_config(self.id, election, heartbeat, self.raw.raft.raft_log.applied);
        cfg.validate().context("invalid raft timeouts")?;
        let logger = raft_logger::logger(self.id.get());
        self.raw = RawNode::new(&cfg, self.store.clone(), &logger)?;
        Ok(())
    }

    fn compacting(&self) -> bool {
        self.compact_to > self.store.first_index()
    }

    /// Drops the next [`COMPACTION_STEP`] entries of the log below `compact_to`. Not fsynced: a
    /// crash only leaves entries that the next snapshot compacts again.
    fn compact_step(&mut self) {
        let first = self.store.first_index();
        if self.compact_to <= first {
            return;
        }
        let to = self.compact_to.min(first.saturating_add(COMPACTION_STEP));
        if let Err(e) = self.store.compact(to) {
            log::error!("raft {}: compacting the log up to {to} failed (the next snapshot retries): {e:#}", self.id);
            self.compact_to = 0;
            return;
        }
        CounterCells::add(&self.shared.counters.compaction_steps, 1);
        if to == self.compact_to {
            log::info!("raft {}: log compacted; it now starts at {to}", self.id);
        }
    }

    fn not_leader(&self) -> Option<ProposeError> {
        if self.raw.raft.state == StateRole::Leader {
            None
        } else {
            let leader = self.raw.raft.leader_id;
            Some(ProposeError::NotLeader { leader: (leader != 0).then_some(NodeId(leader)) })
        }
    }

    fn propose(&mut self, data: Vec<u8>, waiter: S::Waiter, deadline: Instant) {
        if let Some(err) = self.not_leader() {
            return waiter.fail(err);
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index == before {
                    return waiter.fail(ProposeError::Dropped("raft did not append the entry".into()));
                }
                let term = Term(self.raw.raft.term);
                CounterCells::add(&self.shared.counters.proposals, 1);
                self.proposals.insert(LogIndex(index), Pending { term, deadline, waiter });
            }
            Err(e) => waiter.fail(ProposeError::Dropped(e.to_string())),
        }
    }

    fn propose_membership(&mut self, change: MembershipChange, waiter: Callback<()>, deadline: Instant) {
        if let Some(err) = self.not_leader() {
            return waiter(Err(err));
        }
        let adds = matches!(change, MembershipChange::AddLearner(_) | MembershipChange::AddVoter(_));
        if let Some(rec) = self.pending_recovery().filter(|_| adds) {
            return waiter(Err(ProposeError::Dropped(recovery_pending_message(rec))));
        }
        if self.left_behind(change.node_id()) && !matches!(change, MembershipChange::Remove(_)) {
            let why = format!("node {} was left behind by a recovery: it must join with another id", change.node_id());
            return waiter(Err(ProposeError::Dropped(why)));
        }
        let (cc, context) = change.to_raft();
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() > before => {
                let index = LogIndex(self.raw.raft.raft_log.last_index());
                self.membership_waiters.insert(index, (Term(self.raw.raft.term), deadline, waiter));
            }
            Ok(()) => waiter(Err(ProposeError::Dropped("raft did not append the change".into()))),
            Err(e) => waiter(Err(ProposeError::Dropped(e.to_string()))),
        }
    }

    /// On the leader: gives a member heard at new addresses those addresses, through the log, one
    /// membership change at a time and at most one attempt a second.
    fn propose_readdress(&mut self) {
        if self.not_leader().is_some() || self.raw.raft.has_pending_conf() {
            return;
        }
        if self.readdress_proposed.is_some_and(|at| at.elapsed() < READDRESS_EVERY) {
            return;
        }
        let learners = &self.raw.raft.prs().conf().learners();
        let Some(change) = self.readdress.next(&self.members, |id| learners.contains(&id.get())) else { return };
        log::info!("raft {}: proposing new addresses for a member: {change:?}", self.id);
        self.readdress_proposed = Some(Instant::now());
        let id = self.id;
        let logged: Callback<()> = Box::new(move |result| {
            if let Err(e) = result {
                log::warn!("raft {id}: new addresses for a member not recorded ({e}); retrying");
            }
        });
        self.propose_membership(change, logged, Instant::now() + READDRESS_EVERY * 10);
    }

    /// All reads queued this round share one ReadIndex request.
    fn start_reads(&mut self) {
        if self.reads_to_start.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.reads_to_start);
        if let Some(err) = self.not_leader() {
            for (_, _, w) in reads {
                w(Err(err.clone()));
            }
            return;
        }
        let term = Term(self.raw.raft.term);
        let mut confirmable = Vec::with_capacity(reads.len());
        for (deadline, wanted, w) in reads {
            match wanted {
                Some(t) if t != term => w(Err(ProposeError::LeadershipLost)),
                _ => confirmable.push((deadline, w)),
            }
        }
        let reads = confirmable;
        if reads.is_empty() {
            return;
        }
        let id = self.next_read_id;
        self.next_read_id += 1;
        CounterCells::add(&self.shared.counters.read_index_rounds, 1);
        CounterCells::add(&self.shared.counters.reads, reads.len() as u64);
        self.raw.read_index(id.to_be_bytes().to_vec());
        self.reads_in_flight.insert(id, reads);
    }

    fn expire(&mut self, now: Instant) {
        self.proposals.expire(now);
        let expired: Vec<LogIndex> =
            self.membership_waiters.iter().filter(|(_, (_, d, _))| *d <= now).map(|(i, _)| *i).collect();
        for i in expired {
            if let Some((_, _, w)) = self.membership_waiters.remove(&i) {
                w(Err(ProposeError::Timeout));
            }
        }
        for reads in self.reads_in_flight.values_mut() {
            let (expired, alive): (Vec<_>, Vec<_>) = std::mem::take(reads).into_iter().partition(|(d, _)| *d <= now);
            *reads = alive;
            for (_, w) in expired {
                w(Err(ProposeError::Timeout));
            }
        }
        self.reads_in_flight.retain(|_, reads| !reads.is_empty());
    }

    /// A leader that stepped down cannot vouch for anything it had in flight.
    fn check_leadership(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if !is_leader {
            self.leader_ready = false;
            self.shared.ready_index.store(0, Ordering::Release);
        }
        let term = if is_leader { self.raw.raft.term } else { 0 };
        self.shared.leading_term.store(term, Ordering::Release);
        let lost = self.was_leader && !is_leader;
        self.was_leader = is_leader;
        if lost {
            log::warn!("raft {} lost leadership at term {}", self.id, self.raw.raft.term);
            // Published before the waiters hear of it: whoever acts on a failed request (Redis'
            // main thread) must already see that this node no longer leads, and who does.
            self.publish_status();
            self.fail_everything(ProposeError::LeadershipLost);
        }
    }

    fn fail_everything(&mut self, err: ProposeError) {
        self.proposals.fail_all(err.clone());
        for (_, (_, _, w)) in std::mem::take(&mut self.membership_waiters) {
            w(Err(err.clone()));
        }
        for (_, w) in std::mem::take(&mut self.reads_in_flight).into_values().flatten() {
            w(Err(err.clone()));
        }
        for (_, _, w) in std::mem::take(&mut self.reads_to_start) {
            w(Err(err.clone()));
        }
    }

    fn sync_writes(&self) -> bool {
        let durability = durability_from_code(self.shared.durability.load(Ordering::Relaxed));
        durability == Durability::High
    }

    async fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        let sync = self.sync_writes();
        CounterCells::add(&self.shared.counters.readies, 1);

        // A leader may send appends while it persists its own copy: it only counts itself
        // towards the quorum once the entries are persisted (after advance).
        if !ready.messages().is_empty() {
            self.send(ready.take_messages());
            if !ready.entries().is_empty() {
                // The appends leave before the fsync below, not after it.
                tokio::task::yield_now().await;
            }
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone(), sync)?;
        }
        self.handle_committed(ready.take_committed_entries())?;
        let entries = ready.take_entries();
        if !entries.is_empty() || ready.hs().is_some() {
            // Only entries, term and vote must be on disk before we answer; a commit index that
            // is lost in a crash is learnt again from the leader.
            let stored = self.store.hard_state();
            let must_sync = sync
                && (!entries.is_empty() || ready.hs().map_or(false, |hs| hs.term != stored.term || hs.vote != stored.vote));
            let sync = must_sync;
            let started = Instant::now();
            self.store.append(&entries, ready.hs(), sync).context("persisting raft entries")?;
            CounterCells::add(&self.shared.counters.persist_micros, started.elapsed().as_micros() as u64);
            CounterCells::add(&self.shared.counters.entries_persisted, entries.len() as u64);
            if sync {
                CounterCells::add(&self.shared.counters.fsyncs, 1);
            }
            if !sync {
                self.shared.dirty.store(true, Ordering::Release);
            }
        }
        // Votes and append acknowledgements promise that the data is on disk: only now.
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        self.complete_reads(ready.take_read_states());

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit, false).context("persisting the commit index")?;
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages());
        }
        self.handle_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    /// Hands messages to the transport. A snapshot is reported as delivered as soon as it is
    /// queued: the follower fetches the file itself and answers when it has installed it; if it
    /// does not, raft probes it again and resends.
    fn send(&mut self, msgs: Vec<Message>) {
        let snapshot_to: Vec<u64> =
            msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| m.to).collect();
        self.transport.send(msgs);
        for to in snapshot_to {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot, sync: bool) -> anyhow::Result<()> {
        let index = snapshot.get_metadata().index;
        let (members, app) = snapshot_data::decode(&snapshot.data)?;
        log::info!("raft {} installing a snapshot at index {index} ({} bytes)", self.id, snapshot.data.len());
        self.sm.restore(LogIndex(index), app);
        self.members = Arc::new(members);
        self.conf_applied = LogIndex(index);
        self.persist_members()?;
        for info in self.members.values().filter(|m| m.id != self.id) {
            self.transport.set_peer_addr(info.id, info.raft_addr.clone());
        }
        let file = SnapshotDescriptor::decode(app).map(|d| d.file);
        self.store.apply_snapshot(snapshot, sync).context("storing the snapshot")?;
        if let Some(file) = file {
            let _ = crate::snapshot_file::remove_older_than(&self.snapshot_dir, &self.snapshot_dir.join(file));
        }
        Ok(())
    }

    fn handle_committed(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let Some((last, last_term)) = entries.last().map(|e| (LogIndex(e.index), Term(e.term))) else {
            return Ok(());
        };
        let mut batch = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = LogIndex(entry.index);
            let term = Term(entry.term);
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A leader's no-op. A membership waiter at this index means raft replaced
                    // our change because another one was still pending.
                    if let Some((_, _, w)) = self.membership_waiters.remove(&index) {
                        w(Err(ProposeError::Dropped("another membership change is in progress".into())));
                    }
                    if term.get() == self.raw.raft.term && self.raw.raft.state == StateRole::Leader && !self.leader_ready {
                        self.leader_ready = true;
                        self.shared.ready_index.store(index.get(), Ordering::Release);
                    }
                }
                EntryType::EntryNormal => {
                    let waiter = self.proposals.take_committed(index, term);
                    batch.push(Committed { index, term, data: entry.data, waiter });
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::decode(entry.data.as_slice()).context("decoding a membership entry")?;
                    self.apply_membership(index, &cc)?;
                    if let Some((t, _, w)) = self.membership_waiters.remove(&index) {
                        // Answered after this round's status is published, so the caller sees
                        // the new membership in `status()`.
                        self.membership_done.push((w, if t == term { Ok(()) } else { Err(ProposeError::Overwritten) }));
                    }
                }
                EntryType::EntryConfChange => {
                    log::warn!("raft {} skipped a v1 membership entry at {index}: Raftis only writes v2", self.id);
                }
            }
        }
        let conf_state = self.conf_state();
        self.sm.apply(ApplyBatch { entries: batch, applied_to: last, term: last_term, conf_state, members: self.members.clone() });
        Ok(())
    }

    fn apply_membership(&mut self, index: LogIndex, cc: &ConfChangeV2) -> anyhow::Result<()> {
        if index <= self.conf_applied {
            return Ok(());
        }
        let conf_state = self.raw.apply_conf_change(cc).context("applying a membership change")?;
        let removes_me =
            cc.changes.iter().any(|c| c.node_id == self.id.get() && c.get_change_type() == ConfChangeType::RemoveNode);
        if removes_me {
            let why = format!("removed from the cluster: its removal was committed at index {index}");
            // Before the membership is stored: a restart would not apply this entry again.
            self.store.put_meta(META_REMOVED, why.as_bytes()).context("recording this node's removal")?;
            self.removed = Some(why);
        }
        self.store.set_conf_state(&conf_state).context("persisting the membership")?;
        let before: Vec<NodeId> = self.members.keys().copied().collect();
        MembershipChange::apply_to_members(cc, Arc::make_mut(&mut self.members));
        self.conf_applied = index;
        self.persist_members()?;
        for id in before.iter().filter(|id| !self.members.contains_key(id)) {
            self.transport.remove_peer(*id);
        }
        for info in self.members.values().filter(|m| m.id != self.id) {
            if self.transport.peer_addr(info.id).as_deref() != Some(info.raft_addr.as_str()) {
                self.transport.set_peer_addr(info.id, info.raft_addr.clone());
            }
        }
        log::info!(
            "raft {} membership at {index}: voters {:?} learners {:?}",
            self.id,
            conf_state.voters,
            conf_state.learners
        );
        Ok(())
    }

    fn persist_members(&self) -> anyhow::Result<()> {
        self.store.put_meta(META_MEMBERS, &serde_json::to_vec(&*self.members)?)?;
        self.store.put_meta(META_CONF_APPLIED, &self.conf_applied.get().to_be_bytes())?;
        Ok(())
    }

    fn complete_reads(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else { continue };
            if let Some(reads) = self.reads_in_flight.remove(&u64::from_be_bytes(bytes)) {
                for (_, w) in reads {
                    w(Ok(LogIndex(rs.index)));
                }
            }
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The membership in force, with ids in a stable order.
    fn conf_state(&self) -> ConfState {
        let mut conf = self.raw.raft.prs().conf().to_conf_state();
        conf.voters.sort_unstable();
        conf.learners.sort_unstable();
        conf
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let conf = self.conf_state();
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if conf.learners.contains(&self.id.get()) => Role::Learner,
            StateRole::Follower => Role::Follower,
        };
        let progress = if role == Role::Leader {
            raft.prs()
                .iter()
                .filter(|(id, _)| **id != self.id.get())
                .map(|(id, pr)| PeerProgress {
                    id: NodeId(*id),
                    matched: LogIndex(pr.matched),
                    next: LogIndex(pr.next_idx),
                    state: format!("{:?}", pr.state).to_lowercase(),
                    is_learner: conf.learners.contains(id),
                })
                .collect()
        } else {
            Vec::new()
        };
        let status = Status {
            id: self.id,
            role,
            term: Term(raft.term),
            leader: (raft.leader_id != 0).then_some(NodeId(raft.leader_id)),
            commit: LogIndex(raft.raft_log.committed),
            applied: LogIndex(raft.raft_log.applied),
            first_index: LogIndex(self.store.first_index()),
            last_index: LogIndex(raft.raft_log.last_index()),
            voters: conf.voters.iter().map(|v| NodeId(*v)).collect(),
            learners: conf.learners.iter().map(|v| NodeId(*v)).collect(),
            members: self.members.clone(),
            progress,
            leader_ready: self.leader_ready,
            pending_proposals: self.proposals.len(),
            election_ticks: raft.election_timeout(),
            heartbeat_ticks: raft.heartbeat_timeout(),
            fatal: None,
            recovered: self.recovery.clone(),
        };
        let mut slot = self.lock_status();
        let fatal = slot.fatal.take();
        *slot = Status { fatal, ..status };
    }
}

enum RecoverError {
    Refused(String),
    Store(anyhow::Error),
}

/// Makes `me` the only voter and member of the cluster, as `rec` decided, and marks the record
/// done. Written after the record itself (see [`RaftLoop::recover`]).
fn store_recovered_membership(store: &LogStore, me: &NodeInfo, rec: &Recovery) -> anyhow::Result<Members> {
    store.set_conf_state(&ConfState { voters: vec![me.id.get()], ..Default::default() })?;
    let mut members = Members::new();
    members.insert(me.id, me.clone());
    store.put_meta(META_MEMBERS, &serde_json::to_vec(&members)?)?;
    store.put_meta(META_CONF_APPLIED, &rec.at.get().to_be_bytes())?;
    store.put_meta(META_RECOVERY, &Recovery { done: true, ..rec.clone() }.encode())?;
    store.sync()?;
    Ok(members)
}

fn recovery_pending_message(rec: &Recovery) -> String {
    format!(
        "this node recovered the cluster at index {} and is still dropping the log from before it \
         (a snapshot, then compaction): nodes can be added once RAFT.INFO shows recovery_pending:no",
        rec.at
    )
}

fn fail_request<W: Waiter>(req: Request<W>, err: ProposeError) {
    match req {
        Request::Propose { waiter, .. } => waiter.fail(err),
        Request::ChangeMembership { waiter, .. } => waiter(Err(err)),
        Request::ReadIndex { waiter, .. } => waiter(Err(err)),
        Request::LastProposed(waiter) => waiter(Err(err)),
        Request::Recover(done) => drop(done.send(Err(err.to_string()))),
        _ => {}
    }
}
