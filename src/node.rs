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
//!
//! This file holds the handle other threads use ([`Node`]) and the loop's state ([`RaftLoop`]);
//! what the loop does is in the files beside it: a round (`raft_loop`), proposals and reads
//! (`proposals`), committed entries (`committed`), snapshots and compaction (`snapshots`), new
//! tick counts (`ticks`) and `RAFT.CLUSTER RECOVER` (`recovering`).

use crate::cluster_id::{ClusterId, META_CLUSTER_ID};
use crate::command_entry::{self, EntryTime};
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
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

mod committed;
mod leader_health;
mod proposals;
mod raft_loop;
mod recovering;
mod snapshots;
mod ticks;
mod transfers;

use recovering::{recovery_pending_message, store_recovered_membership};

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
/// How long a member at a joining node's address must have been silent before it is taken for
/// the one that was there before and removed (see [`Node::retire_previous_at`]).
const SILENT_BEFORE_REPLACED: Duration = Duration::from_secs(3);

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

impl TakenSnapshot {
    /// Raft's snapshot for it: the address book and the file's descriptor as its data.
    fn to_raft(&self) -> Snapshot {
        let mut snapshot = Snapshot { data: snapshot_data::encode(&self.members, &self.descriptor.encode()), ..Default::default() };
        let meta = snapshot.metadata.get_or_insert_with(Default::default);
        meta.index = self.index.get();
        meta.term = self.term.get();
        meta.conf_state = Some(self.conf_state.clone());
        snapshot
    }
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

/// Why leadership was not handed over.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandOverError {
    #[error("this node does not lead")]
    NotLeader,
    #[error("no other voter to hand leadership to")]
    NoOtherVoter,
    /// raft gave the transfer up (or has yet to): this node leads on.
    #[error("the new leader did not take over in time")]
    StillLeading,
    /// This node stepped down, and no leader has made itself known to it yet.
    #[error("no leader yet")]
    NoLeaderYet,
    #[error("the raft node stopped: {0}")]
    Stopped(String),
}

enum Request<W> {
    Propose {
        data: Vec<u8>,
        waiter: W,
        deadline: Instant,
    },
    ChangeMembership {
        change: MembershipChange,
        waiter: Callback<()>,
        deadline: Instant,
    },
    /// With a term, the round only counts in that term (see [`Node::read_index_in_term`]).
    ReadIndex {
        waiter: Callback<LogIndex>,
        deadline: Instant,
        term: Option<Term>,
    },
    LastProposed(Callback<LogIndex>),
    Raft(Vec<Message>),
    Hello {
        from: NodeId,
        addr: String,
        client_addr: Option<String>,
    },
    Unreachable(NodeId),
    /// A peer says this node was removed from the cluster.
    Removed {
        by: NodeId,
        why: String,
    },
    TransferLeader(NodeId),
    SetTicks {
        election: usize,
        heartbeat: usize,
    },
    /// `tick-ms` changed: the next tick is due by the new length.
    TickChanged,
    /// Make this node the only voter of a cluster that lost its majority (see [`crate::recovery`]).
    Recover(Sender<Result<LogIndex, String>>),
    SnapshotTaken(TakenSnapshot, Sender<()>),
    /// A snapshot message whose file has been fetched (or could not be).
    SnapshotFetched {
        msg: Box<Message>,
        ok: bool,
    },
    /// The background flush of the log failed (durability=medium): the node stops.
    FlushFailed(anyhow::Error),
    Shutdown,
}

#[derive(Default)]
struct CounterCells {
    rounds: AtomicU64,
    readies: AtomicU64,
    proposals_requested: AtomicU64,
    proposals: AtomicU64,
    entries_persisted: AtomicU64,
    fsyncs: AtomicU64,
    background_fsyncs: AtomicU64,
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
            proposals_requested: get(&self.proposals_requested),
            proposals: get(&self.proposals),
            entries_persisted: get(&self.entries_persisted),
            fsyncs: get(&self.fsyncs),
            background_fsyncs: get(&self.background_fsyncs),
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
    /// Between the entries this node appends and the times its state machine expires keys by.
    time_gate: Mutex<TimeGate>,
}

/// A leader's state machine may delete keys by its own clock only while no entry it will apply
/// later happens before that time (see [`Node::claim_time`]). Held by the Raft loop while it
/// appends a proposal, so that a claim sees every entry appended before it, and every entry
/// appended after it happens after the claim.
struct TimeGate {
    /// The latest time claimed: entries appended from now on happen later.
    claimed: EntryTime,
    /// The index of the last entry in this node's log.
    last_index: LogIndex,
    /// The time of the newest committed entry this node knows of: every later leader has it in
    /// its log, and a claim goes at most [`CLAIM_LEAD`] past it.
    committed: EntryTime,
}

/// How far past the newest committed entry time a leader may claim a time (see
/// [`Node::claim_time`]), and so how far past the newest time in its log a new leader stamps its
/// first entry: no claim of a leader before it is later than that, however its clock ran. (A
/// claim is not in the log: a new leader whose clock is behind a claim would otherwise stamp
/// entries that meet alive, on every node but the claimant, keys the claimant deleted.) Above
/// the longest an idle leader goes without an entry (the module proposes a clock entry after a
/// second), so that its claims hold while it is idle.
pub const CLAIM_LEAD: EntryTime = EntryTime(1500);

/// Handle to a running node. Dropping it shuts the node down.
pub struct Node<S: StateMachine> {
    tx: UnboundedSender<Request<S::Waiter>>,
    shared: Arc<Shared>,
    transport: Transport,
    /// Signalled when the Raft loop has stopped.
    loop_stopped: crossbeam_channel::Receiver<()>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Held for the whole of a shutdown.
    shutting_down: Mutex<()>,
}

/// Runs `write` with what a new cluster's first node stores beside its first entry or snapshot,
/// in the same commit: its member list, the membership applied at index 1, a new cluster id.
fn with_first_metadata<T>(members: &Members, write: impl FnOnce(&[(&str, &[u8])]) -> T) -> anyhow::Result<T> {
    let (members, conf_applied) = committed::members_record(members, LogIndex(1))?;
    let cluster_id = ClusterId::random().to_meta();
    Ok(write(&[(META_MEMBERS, &members), (META_CONF_APPLIED, &conf_applied), (META_CLUSTER_ID, &cluster_id)]))
}

impl<S: StateMachine> Node<S> {
    /// Makes `store` the log of a new single-node cluster with `info` as its only voter. The
    /// first log entry is the membership change that adds it (with its addresses), committed by
    /// construction: nodes that join later replay the whole membership history from the log.
    /// The cluster gets a new random id (see [`crate::cluster_id`]).
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
        let conf_state = ConfState { voters: vec![info.id.get()], ..Default::default() };
        // One commit: a crash leaves no cluster (and INIT can run again) or the whole of it,
        // never a node that serves with no cluster id or no member list.
        let members = Members::from([(info.id, info.clone())]);
        with_first_metadata(&members, |meta| store.start_log(&entry, &hard_state, &conf_state, meta))?
            .context("writing the first log entry")?;
        Ok(())
    }

    /// Like [`Node::bootstrap`], for a cluster whose dataset starts as what the state machine
    /// already holds: `seed`, a snapshot of it at index 1 whose only voter is `info`. The log
    /// starts after it, so every node that joins loads the snapshot rather than replaying a log
    /// that never held those keys. Written in one commit, like [`Node::bootstrap`].
    pub fn bootstrap_from(store: &LogStore, info: &NodeInfo, seed: &TakenSnapshot) -> anyhow::Result<()> {
        anyhow::ensure!(!store.is_initialized(), "this node already belongs to a cluster");
        let only_voter = seed.conf_state.voters == [info.id.get()] && seed.conf_state.learners.is_empty();
        let first = seed.index == LogIndex(1) && seed.term == Term(1);
        anyhow::ensure!(first && only_voter, "not a snapshot to start a cluster from");
        with_first_metadata(&seed.members, |meta| store.bootstrap(seed.to_raft(), meta))?.context("recording the first snapshot")?;
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
        // Every membership entry up to `conf_applied` was applied, so committed, but the commit
        // index is written lazily and may trail it. Raft starts from the stored membership, the
        // one after `conf_applied`: a replay that ended below it would hand the state machine a
        // point whose membership is not its own, and a snapshot taken there would record it.
        // Raised to it, the replay's one batch (raft puts no limit on committed entries per
        // Ready) ends past it.
        let applied_membership = conf_applied.min(store.last_index());
        if store.hard_state().commit < applied_membership {
            store.set_commit(applied_membership, true).context("raising the commit index to the membership applied")?;
        }

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
                cluster: ClusterId::load(&store)?,
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
            time_gate: Mutex::new(TimeGate {
                claimed: EntryTime(i64::MIN),
                last_index: LogIndex(raw.raft.raft_log.last_index()),
                committed: EntryTime(i64::MIN),
            }),
        });
        let reporter = shared.clone();
        transport.set_health_source(Arc::new(move || leader_health::answer(&reporter)));
        let known = shared.clone();
        transport.set_leader_source(Arc::new(move || {
            let status = known.status.lock().unwrap_or_else(|p| p.into_inner());
            status.leader_member().map(|leader| leader.raft_addr.clone())
        }));
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
                format!("node {me} has applied the removal of node {from} (applied up to {applied}, its log ends at {their_last})")
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
            transfer_wanted: None,
            campaigned: false,
            members: Arc::new(members),
            departed: HashSet::new(),
            conf_applied: LogIndex(conf_applied),
            proposals: PendingProposals::new(),
            time_floor: EntryTime(i64::MIN),
            floor_raised_in: Term(0),
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
            must_stop: None,
            recovery: recovered,
            recover_wanted: None,
            recovery_snapshot_asked: None,
            last_heard: BTreeMap::new(),
            started_at: Instant::now(),
            health_asks: Arc::default(),
        };
        raft_loop.time_floor = raft_loop.newest_time_in_log();
        raft_loop.publish_status();
        if let Some(why) = raft_loop.removed.take() {
            // Stopped before it serves anything, not in the loop's first round: a read at
            // consistency=low could slip in before that. The loop then only winds down.
            raft_loop.leave(why);
            raft_loop.shutdown = true;
        }
        let (stopped_tx, loop_stopped) = crossbeam_channel::bounded(1);
        transport.spawn(async move {
            raft_loop.run().await;
            let _ = stopped_tx.send(());
        });
        let flusher_shared = shared.clone();
        let flusher_tx = tx.clone();
        let flusher = std::thread::Builder::new()
            .name(format!("raft-flush-{}", cfg.id))
            .spawn(move || flush_every_second(flusher_shared, store, flusher_tx))
            .context("spawning the flush thread")?;
        Ok(Node { tx, shared, transport, loop_stopped, flusher: Mutex::new(Some(flusher)), shutting_down: Mutex::new(()) })
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
        match self.tx.send(Request::Propose { data, waiter, deadline }) {
            Ok(()) => CounterCells::add(&self.shared.counters.proposals_requested, 1),
            Err(e) => {
                if let Request::Propose { waiter, .. } = e.0 {
                    waiter.fail(ProposeError::Shutdown);
                }
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
    /// until `deadline` at most, for the new leader, so the cluster has one at once instead of
    /// after an election timeout. Returns the new leader. Blocks the caller.
    pub fn hand_over_leadership(&self, deadline: Instant) -> Result<NodeId, HandOverError> {
        let status = self.status();
        if !status.is_leader() {
            return Err(HandOverError::NotLeader);
        }
        let to = status.successor().ok_or(HandOverError::NoOtherVoter)?;
        self.transfer_leadership(to, deadline)
    }

    /// On the leader: asks raft to hand leadership to `to` and waits, until `deadline` at most,
    /// until this node hears from a new leader (`to`, unless another node won the election).
    /// Returns it. raft gives a transfer up after one election timeout. Blocks the caller.
    pub fn transfer_leadership(&self, to: NodeId, deadline: Instant) -> Result<NodeId, HandOverError> {
        let me = self.status().id;
        self.transfer_leader(to);
        loop {
            let status = self.status();
            if let Some(fatal) = status.fatal {
                return Err(HandOverError::Stopped(fatal));
            }
            match status.leader {
                Some(leader) if leader != me => return Ok(leader),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Some(_) => return Err(HandOverError::StillLeading),
                None => return Err(HandOverError::NoLeaderYet),
            }
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
            // The same node again (a join whose answer was lost), or one that moved: done. But
            // a member that still talks to the leader from another address is another server
            // given the same node-id: adding it would do nothing, and it would wait for ever.
            let elsewhere = status.members.get(&id).map(|m| m.raft_addr.clone()).filter(|addr| *addr != info.raft_addr);
            let talking = status.progress_of(id).is_some_and(|p| p.silent_for < SILENT_BEFORE_REPLACED) || id == status.id;
            if let (Some(addr), true) = (elsewhere, talking) {
                return Err(ProposeError::Refused(format!(
                    "node {id} is already a member, at {addr}, and talks to the leader: {} has the same node-id (give it another)",
                    info.raft_addr
                )));
            }
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
            self.retire_previous_at(&info, deadline)?;
            self.change_membership_blocking(MembershipChange::AddLearner(info), deadline)?;
        }
        // A learner that has not caught up would stall the quorum as soon as it votes.
        loop {
            let status = self.status();
            if !status.is_leader() {
                return Err(ProposeError::NotLeader { leader: status.leader });
            }
            if status.progress_of(id).is_some_and(|p| p.matched >= status.commit) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ProposeError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.change_membership_blocking(MembershipChange::Promote(id), deadline)
    }

    /// Removes the member that was at `info`'s side-port address before, if one was: a node
    /// whose dir was lost joins again from the same address with a new id, and the old id would
    /// otherwise stay a voter that never answers (a 3-node cluster would need all of its other
    /// three live nodes for a quorum of 4). Two live servers cannot listen on one address, so the
    /// old one is gone, but only once it is silent is it removed: a member that still talks to
    /// the leader means the joining node's address is wrong, and the join is refused.
    fn retire_previous_at(&self, info: &NodeInfo, deadline: Instant) -> Result<(), ProposeError> {
        // A member that talks is not waited for long: the joining node's address is wrong.
        let give_up = deadline.min(Instant::now() + 2 * SILENT_BEFORE_REPLACED);
        loop {
            let status = self.status();
            let Some(old) = status.members.values().find(|m| m.id != info.id && m.raft_addr == info.raft_addr).map(|m| m.id) else {
                return Ok(());
            };
            if !status.is_leader() {
                return Err(ProposeError::NotLeader { leader: status.leader });
            }
            let addr = &info.raft_addr;
            if old == status.id {
                return Err(ProposeError::Refused(format!("{addr} is this leader's own side port (node {old})")));
            }
            let talking = status.progress_of(old).is_none_or(|p| p.silent_for < SILENT_BEFORE_REPLACED);
            if !talking {
                log::warn!("raft {}: node {} joins at {addr}, where node {old} was: removing node {old}", status.id, info.id);
                self.change_membership_blocking(MembershipChange::Remove(old), deadline)?;
                continue;
            }
            if Instant::now() >= give_up {
                return Err(ProposeError::Refused(format!(
                    "node {old}, a member, is at {addr} and still talks to the leader: the joining node {} cannot \
                     be reached there (check its advertise-addr)",
                    info.id
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// On the leader, once its state machine has applied every entry in its log (`applied`):
    /// claims `now` (milliseconds since the epoch), and returns it. Every entry appended from
    /// then on happens after it, here and under any later leader, so the state machine may
    /// delete keys whose deadline is before it: no entry it applies later meets them alive where
    /// another node's would (see the module's `expiry`). None on a follower, while entries are
    /// still to be applied here, or for a time [`CLAIM_LEAD`] or more past the newest committed
    /// entry's.
    pub fn claim_time(&self, now: EntryTime, applied: LogIndex) -> Option<EntryTime> {
        self.leading_term()?;
        let mut gate = self.shared.time_gate.lock().unwrap_or_else(|p| p.into_inner());
        // Strictly below the lead: a read that claimed a time may run into the next millisecond.
        if gate.last_index > applied || now.0 >= gate.committed.0.saturating_add(CLAIM_LEAD.0) {
            return None;
        }
        gate.claimed = gate.claimed.max(now);
        Some(gate.claimed)
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
        // The term first: the loop clears the index before the term when leadership ends, so an
        // index read after a leading term is that term's (or a later one's). Read the other way
        // round, an old term's index could pass for the next term's across a quick re-election.
        self.leading_term()?;
        let i = self.shared.ready_index.load(Ordering::Acquire);
        (i > 0).then_some(LogIndex(i))
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
        let _ = self.tx.send(Request::TickChanged);
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
        // A second caller waits for the first to be done (Redis exiting while a helper thread
        // stops a node that cannot follow must not exit before the loop has wound down).
        let _one_at_a_time = self.shutting_down.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            // Shut down already (this is the drop after it): a loop that did not stop then
            // is not waited for again.
            return;
        }
        let _ = self.tx.send(Request::Shutdown);
        // The loop answers what it holds before it stops. A shutdown from the network thread
        // itself (a callback dropping the last handle) cannot wait for it: the loop runs there.
        // Disconnected: the loop stopped already, and an earlier shutdown saw it go.
        let timed_out = || matches!(self.loop_stopped.recv_timeout(LOOP_STOP_TIMEOUT), Err(crossbeam_channel::RecvTimeoutError::Timeout));
        if !self.transport.on_network_thread() && timed_out() {
            // Stuck, most likely in a write or flush of a disk that no longer answers: the
            // threads are left behind (the process is exiting), or shutdown would never end.
            log::warn!("raft node: the raft loop did not stop in time; not waiting for it");
            drop(self.flusher.lock().unwrap_or_else(|p| p.into_inner()).take());
            self.transport.shutdown_without_waiting();
            return;
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
/// A failed flush is not retried (a retry may succeed with the failed pages dropped): the node
/// stops, as for a failed write.
fn flush_every_second<W>(shared: Arc<Shared>, store: LogStore, tx: UnboundedSender<Request<W>>) {
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
            match store.sync() {
                Ok(()) => CounterCells::add(&shared.counters.background_fsyncs, 1),
                Err(e) => {
                    let _ = tx.send(Request::FlushFailed(anyhow::Error::new(e).context("the background flush of the raft log failed")));
                    return;
                }
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
    /// Members this node saw leave (an entry, or a snapshot without them): a HELLO from one of
    /// them, whose dialer may linger a few seconds, must not make it a peer again.
    departed: HashSet<NodeId>,
    /// Membership entries up to here are already reflected in the stored ConfState: on restart
    /// they are replayed for the state machine but not applied to raft a second time.
    conf_applied: LogIndex,
    proposals: PendingProposals<S::Waiter>,
    /// The newest time an entry in this node's log happens at: what a proposal is raised to (see
    /// `command_entry::raise_time`).
    time_floor: EntryTime,
    /// The term whose first proposal raised `time_floor` by [`CLAIM_LEAD`].
    floor_raised_in: Term,
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
    /// Why the loop must stop at the next round, found while handling a request.
    must_stop: Option<anyhow::Error>,
    /// This node's own addresses, as it runs now.
    me: NodeInfo,
    /// The recovery this node made, if any (see [`crate::recovery`]).
    recovery: Option<Arc<Recovery>>,
    /// A recovery asked for, waiting for a round boundary.
    recover_wanted: Option<Sender<Result<LogIndex, String>>>,
    /// When the snapshot that ends a recovery was last asked for.
    recovery_snapshot_asked: Option<Instant>,
    /// When each peer's last message arrived: a recovery is refused while another member talks,
    /// and a hand-over waits for its target to talk.
    last_heard: BTreeMap<NodeId, Instant>,
    /// A hand-over waiting for its target to be heard from (see `transfers`).
    transfer_wanted: Option<transfers::TransferWanted>,
    /// When this loop started: a peer not heard from since has been silent at least that long.
    started_at: Instant,
    /// A follower's asks for its leader's health report.
    health_asks: Arc<leader_health::HealthAsks>,
}
