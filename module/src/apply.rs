//! The state machine side of the module: committed entries are executed on the Redis dataset on
//! Redis' own main thread, between client commands, exactly as if clients had sent them. The Raft
//! loop only queues work here and never waits for Redis: the first job queued wakes the main
//! thread's event loop (`RedisModule_EventLoopAddOneShot`), which then runs everything queued by
//! then as one batch. Running there (rather than on a thread that takes Redis' global lock) costs
//! no lock hand-over and lets the replies of a batch go out in the same event-loop turn.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, DetachedContext};
use crate::snapshot::AppliedPoint;
use crate::state;
use raftis_core::cluster_view::HashSlot;
use raftis_core::command_entry::{CommandView, Entry, EntryTime, EntryView};
use raftis_core::determinism;
use raftis_core::forward::{encode_replies, Abandoned, ForwardDone, ForwardRequest};
use raftis_core::memory_limit;
use raftis_core::node::{ApplyBatch, Committed, StateMachine};
use raftis_core::proposal::{ProposeError, Waiter};
use raftis_core::snapshot_transfer::SnapshotDescriptor;
use raftis_core::sort_patterns;
use raftis_core::LogIndex;
use redis_module::raw;
use std::collections::BTreeMap;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How old a published message may be when a node applies it and still deliver it.
const OLD_NEWS: Duration = Duration::from_secs(5);

/// A client waiting for its write to be applied.
pub struct WriteWaiter {
    pub reply_to: ReplyTo,
    /// The client speaks RESP3: its reply must be produced in RESP3 too.
    pub resp3: bool,
}

/// Where a write's reply goes.
pub enum ReplyTo {
    /// A client of this node.
    Client(Blocked),
    /// A follower's client (follower proxy): the raw reply goes back over the side port.
    Forwarded(ForwardDone),
    /// A client of this node whose pipeline keeps flowing: the reply fills its slot.
    Held(crate::held::HeldReply),
    /// A transaction's commands, one slot each.
    Transaction(Vec<TransactionSlot>),
    /// A follower's transaction (follower proxy): every command's raw reply goes back together,
    /// each in its own protocol (`resp3`, one per command).
    ForwardedTransaction { done: ForwardDone, resp3: Vec<bool> },
    /// An attempt of a blocking command (see `blocking`): its waiting client, by id.
    Attempt(u64),
    /// Nobody: the leader's own clock entries (see `expiry`).
    Nobody,
}

/// One command of a transaction a client of this node waits for.
pub struct TransactionSlot {
    /// Where its reply goes; None when the client takes no replies.
    pub held: Option<crate::held::HeldReply>,
    /// The protocol it answers in: a HELLO inside the transaction switches it for the commands
    /// after it, as in Redis.
    pub resp3: bool,
}

impl WriteWaiter {
    /// From any thread: a failure reaches a held slot through the event loop.
    fn finish(self, outcome: Outcome) {
        match self.reply_to {
            ReplyTo::Client(blocked) => blocked.finish(outcome),
            ReplyTo::Forwarded(done) | ReplyTo::ForwardedTransaction { done, .. } => done(raw_reply(outcome)),
            ReplyTo::Held(held) => finish_held(held, outcome),
            ReplyTo::Transaction(slots) => {
                let error = whole_transaction_error(outcome);
                for held in slots.into_iter().filter_map(|slot| slot.held) {
                    held.fail(&error);
                }
            }
            ReplyTo::Attempt(id) => crate::blocking::attempted(id, outcome),
            ReplyTo::Nobody => discard(outcome),
        }
    }

    /// On the main thread, as its entry is applied (or skipped). A held write's slot is filled
    /// now, also with an error: the reads queued behind it then run before the entries after it
    /// are applied (an error sent through the event loop, as from another thread, would let them
    /// read the writes the client sent after them).
    fn finish_applied(self, outcome: Outcome) {
        match self.reply_to {
            ReplyTo::Held(held) => held.finish(reply_bytes(outcome)),
            ReplyTo::Transaction(slots) => {
                let error = crate::forward::error_proto(&whole_transaction_error(outcome));
                for held in slots.into_iter().filter_map(|slot| slot.held) {
                    held.finish(error.clone());
                }
            }
            reply_to => WriteWaiter { reply_to, resp3: self.resp3 }.finish(outcome),
        }
    }
}

fn finish_held(held: crate::held::HeldReply, outcome: Outcome) {
    match raw_reply(outcome) {
        Ok(bytes) => held.finish(bytes),
        Err(e) => held.fail(&e),
    }
}

/// The error every command of a transaction gets when the transaction as a whole fails (only a
/// failure reaches a transaction's waiter whole).
fn whole_transaction_error(outcome: Outcome) -> String {
    match raw_reply(outcome) {
        Err(e) => e,
        Ok(_) => "ERR unexpected reply for a transaction".into(),
    }
}

/// A write's reply as raw RESP, its error's included.
fn reply_bytes(outcome: Outcome) -> Vec<u8> {
    raw_reply(outcome).unwrap_or_else(|e| crate::forward::error_proto(&e))
}

/// A write's reply as raw RESP, for replies that do not go through a blocked client; or the
/// error (without the leading '-') to answer instead.
pub fn raw_reply(outcome: Outcome) -> Result<Vec<u8>, String> {
    match outcome {
        Outcome::Call(reply) => crate::forward::take_proto(reply),
        Outcome::Relay(raw) => Ok(raw),
        Outcome::Error(e) => Err(e),
        _ => Err("ERR unexpected reply for a write".into()),
    }
}

impl Waiter for WriteWaiter {
    fn fail(self, err: ProposeError) {
        // Only a write that lost a race with an election fails with `NotLeader`: its `-MOVED`
        // names no slot, as keeping the slot would cost every write a hash. A client that moves
        // only the slot named still reaches the leader: its retry here gets the slot of its key.
        self.finish(Outcome::Error(crate::state::error_reply(&err, HashSlot::NO_KEY)));
    }
}

/// How far the dataset has really been applied, and who waits for it (linearizable reads).
/// What runs once an index is applied.
pub type WhenApplied = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub struct ApplyProgress {
    applied: AtomicU64,
    entries: AtomicU64,
    batches: AtomicU64,
    waiters: Mutex<BTreeMap<LogIndex, Vec<WhenApplied>>>,
}

impl ApplyProgress {
    pub fn applied(&self) -> LogIndex {
        LogIndex(self.applied.load(Ordering::Acquire))
    }

    pub fn entries_applied(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn batches_applied(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Runs `f` once the dataset has applied `index` (immediately if it already has).
    pub fn when_applied(&self, index: LogIndex, f: WhenApplied) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock so an advance cannot slip between the check and the insert.
        if self.applied() >= index {
            drop(waiters);
            return f();
        }
        waiters.entry(index).or_default().push(f);
    }

    fn advance(&self, index: LogIndex) {
        let ready = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            self.applied.store(index.get(), Ordering::Release);
            let later = waiters.split_off(&LogIndex(index.get() + 1));
            std::mem::replace(&mut *waiters, later)
        };
        for f in ready.into_values().flatten() {
            f();
        }
    }
}

pub enum Job {
    Apply(ApplyBatch<WriteWaiter>),
    /// Replace the dataset: empty `data` means an empty dataset, otherwise a snapshot descriptor.
    Restore {
        index: LogIndex,
        data: Vec<u8>,
    },
    /// RAFT.SNAPSHOT: take one now and answer this client when it is done.
    TakeSnapshot(Blocked),
    /// Raft needs a newer snapshot for a follower.
    SnapshotWanted,
    /// A snapshot just finished: take the next one now if the log outgrew the limits meanwhile
    /// (otherwise only the next write would notice).
    CheckSnapshot,
    /// A command a follower forwarded (follower proxy).
    Forward {
        req: ForwardRequest,
        done: ForwardDone,
        abandoned: Abandoned,
    },
    /// Forwarded reads whose read index is applied: run them now, back to back.
    RunForwarded {
        reads: Vec<(u32, Vec<Vec<u8>>)>,
        batch: bool,
        resp3: Vec<bool>,
        done: ForwardDone,
    },
}

/// The [`StateMachine`] the Raft node drives.
pub struct RedisMachine {
    queue: Queue,
}

impl StateMachine for RedisMachine {
    type Waiter = WriteWaiter;

    fn apply(&mut self, batch: ApplyBatch<WriteWaiter>) {
        self.queue.send(Job::Apply(batch));
    }

    fn restore(&mut self, index: LogIndex, data: &[u8]) {
        self.queue.send(Job::Restore { index, data: data.to_vec() });
    }

    fn request_snapshot(&mut self) {
        self.queue.send(Job::SnapshotWanted);
    }

    fn stopped(&mut self, why: &str) {
        state::get().set_fatal(format!("raft node stopped: {why}"));
    }

    fn removed(&mut self, why: &str) {
        state::get().set_fatal(format!("{why}; to serve again it must join anew: empty its dir, restart it and RAFT.CLUSTER JOIN"));
    }
}

/// Jobs waiting for Redis' main thread.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    jobs: Mutex<Vec<Job>>,
    /// A wake-up of the main thread is on its way: later jobs ride along with it.
    scheduled: AtomicBool,
    /// Jobs are being applied right now (on the main thread).
    applying: AtomicBool,
    /// A wake-up arrived while applying and was put off.
    missed: AtomicBool,
    ctx: Arc<DetachedContext>,
    progress: Arc<ApplyProgress>,
    /// Where the dataset stands, for snapshots (only touched on the main thread).
    point: Mutex<AppliedPoint>,
}

impl Queue {
    pub fn send(&self, job: Job) {
        self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner()).push(job);
        if !self.inner.scheduled.swap(true, Ordering::AcqRel) {
            wake(&self.inner);
        }
    }
}

fn wake(inner: &Arc<QueueInner>) {
    // The one-shot holds a strong reference until it runs; Redis runs every one-shot.
    let data = Arc::into_raw(inner.clone()) as *mut c_void;
    unsafe { ffi::api!(RedisModule_EventLoopAddOneShot)(Some(on_main_thread), data) };
}

/// Creates the machine for the Raft node; the returned queue reaches the main thread directly.
pub fn start(ctx: Arc<DetachedContext>, progress: Arc<ApplyProgress>) -> (RedisMachine, Queue) {
    let inner = QueueInner {
        jobs: Mutex::new(Vec::new()),
        scheduled: AtomicBool::new(false),
        applying: AtomicBool::new(false),
        missed: AtomicBool::new(false),
        ctx,
        progress,
        point: Mutex::new(AppliedPoint::default()),
    };
    let queue = Queue { inner: Arc::new(inner) };
    (RedisMachine { queue: queue.clone() }, queue)
}

/// Set when the module's load failed after its node began to start: what the node queued (its
/// dataset restored from the snapshot, say) must not run on a Redis the module is no part of.
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// See [`ABANDONED`].
pub fn abandon() {
    ABANDONED.store(true, Ordering::Release);
}

extern "C" fn on_main_thread(data: *mut c_void) {
    let inner = unsafe { Arc::from_raw(data as *const QueueInner) };
    if ABANDONED.load(Ordering::Acquire) {
        return;
    }
    // A command we are applying can hand control back to the event loop (a script running past
    // busy-reply-threshold lets Redis process events while it runs). Applying more entries in
    // the middle of it would break the script's atomicity: put the wake-up off until it is done.
    if inner.applying.swap(true, Ordering::AcqRel) {
        inner.missed.store(true, Ordering::Release);
        return;
    }
    // Redis loads its dump file (one left beside the node, say by `INIT KEEPDATA`) after loading
    // the module, and runs file events every 2 MB meanwhile. Restoring the node's dataset then
    // would leave the rest of the file to meet keys already there, and Redis aborts ("Duplicated
    // key found in RDB file"). Redis fires no timer before the load is over: one due at once
    // brings the jobs back then, to replace whatever the file held.
    let ctx = inner.ctx.0;
    if ffi::redis_is_loading(ctx) {
        inner.applying.store(false, Ordering::Release);
        let data = Arc::into_raw(inner) as *mut c_void;
        unsafe { ffi::api!(RedisModule_CreateTimer)(ctx, 0, Some(after_loading), data) };
        return;
    }
    // Cleared before taking the jobs: a job queued from here on schedules a new wake-up.
    inner.scheduled.store(false, Ordering::Release);
    let jobs = std::mem::take(&mut *inner.jobs.lock().unwrap_or_else(|p| p.into_inner()));
    if !jobs.is_empty() && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&inner, jobs))).is_err() {
        log::error!("panic while applying committed entries");
    }
    inner.applying.store(false, Ordering::Release);
    if inner.missed.swap(false, Ordering::AcqRel) {
        inner.scheduled.store(true, Ordering::Release);
        wake(&inner);
    }
}

extern "C" fn after_loading(_ctx: *mut ffi::RedisModuleCtx, data: *mut c_void) {
    on_main_thread(data);
}

/// Runs a batch of jobs on the main thread (which holds Redis' global lock).
fn run(inner: &QueueInner, jobs: Vec<Job>) {
    let ctx = inner.ctx.0;
    let mut point = inner.point.lock().unwrap_or_else(|p| p.into_inner());
    let mut applied_to = None;
    let mut entries = 0;
    // A snapshot queued behind another replaces it whole. The first one's file may be gone:
    // jobs wait while Redis loads its dump file at start, and the Raft loop, installing a newer
    // snapshot from the leader meanwhile, deletes the older files.
    let last_restore = jobs.iter().rposition(|job| matches!(job, Job::Restore { .. }));
    for (position, job) in jobs.into_iter().enumerate() {
        if let Job::Restore { index, .. } = &job {
            if last_restore.is_some_and(|last| position < last) {
                log::info!("the snapshot at index {index} is not loaded: a newer one replaces it");
                continue;
            }
        }
        // One job's panic must not drop the jobs behind it: committed entries would silently go
        // unapplied here while the node went on serving.
        let changes_the_dataset = matches!(job, Job::Restore { .. } | Job::Apply(_));
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::Restore { index, data } => {
                // Keys the clock has expired but the log has not are part of the dataset.
                crate::expiry::suspended(|| restore(ctx, index, &data));
                *point = AppliedPoint { index, ..AppliedPoint::default() };
                applied_to = Some(index);
            }
            Job::Apply(batch) => {
                entries += batch.entries.len() as u64;
                let bytes: usize = batch.entries.iter().map(|c| c.data.len()).sum();
                state::get().snapshots.add_applied_bytes(bytes as u64);
                // With Redis' own expiry suspended: each command expires its keys by its entry's
                // time (see `expiry`).
                crate::expiry::suspended(|| {
                    for committed in batch.entries {
                        apply_one(ctx, committed);
                    }
                });
                *point = AppliedPoint { index: batch.applied_to, term: batch.term, conf_state: batch.conf_state, members: batch.members };
                applied_to = Some(batch.applied_to);
            }
            Job::TakeSnapshot(waiter) => match state::get().refuse_if_stopped() {
                Ok(()) => state::get().snapshots.start(ctx, &point, Some(waiter)),
                Err(stopped) => waiter.finish(Outcome::Error(stopped)),
            },
            Job::SnapshotWanted if state::get().stopped() => {}
            Job::SnapshotWanted => state::get().snapshots.start(ctx, &point, None),
            Job::CheckSnapshot => {}
            Job::Forward { req, done, abandoned } => crate::forward::serve(req, done, abandoned),
            Job::RunForwarded { reads, batch, resp3, done } => crate::forward::run_reads(ctx, reads, batch, resp3, done),
        }));
        if ran.is_err() {
            if changes_the_dataset {
                // Part of the dataset may be missing: it no longer follows the log.
                state::get().dataset_cannot_follow("a panic while applying committed entries (a bug)".into());
            } else {
                log::error!("panic in a job on Redis' main thread; that job is dropped");
            }
        }
    }
    crate::runaway::end();
    let s = state::get();
    let latest = || s.snapshots.latest().map_or(LogIndex(0), |(index, _)| index);
    if s.stopped() {
        // Its dataset may be wrong (see `Raftis::dataset_cannot_follow`): never a snapshot of it.
    } else if crate::runaway::snapshot_wanted(latest) && !s.snapshots.in_progress() {
        // So that a restart does not replay the skipped entry (see `runaway`).
        s.snapshots.start(ctx, &point, None);
    } else {
        maybe_snapshot(ctx, &point);
    }
    drop(point);
    let progress = &inner.progress;
    progress.entries.fetch_add(entries, Ordering::Relaxed);
    progress.batches.fetch_add(1, Ordering::Relaxed);
    if let Some(index) = applied_to {
        progress.advance(index);
    }
    crate::blocking::after_apply(ctx);
}

fn apply_one(ctx: *mut ffi::RedisModuleCtx, committed: Committed<WriteWaiter>) {
    let index = committed.index;
    let mut waiter = committed.waiter;
    if let Some(why) = state::get().stopped_why() {
        // Not -CLUSTERDOWN, which says the write did not take effect: this entry is committed,
        // and the other nodes apply it.
        return finish(waiter, Outcome::Error(state::committed_but_stopped_error(&why)));
    }
    let resp3 = waiter.as_ref().is_some_and(|w| w.resp3);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Entry { at, view } = Entry::decode(&committed.data).map_err(|e| format!("ERR corrupt log entry at {index}: {e}"))?;
        crate::expiry::applied(at);
        crate::runaway::begin(index);
        if crate::runaway::skips(index, &view) {
            finish(waiter.take(), Outcome::Error(crate::runaway::skipped_error(index)));
            return Ok(());
        }
        match view {
            EntryView::Command(command) => {
                let outcome = run_command(ctx, index, at, &command, resp3);
                finish(waiter.take(), outcome);
            }
            EntryView::Transaction(commands) => {
                // Back to back on the main thread: nothing runs between them.
                let in_one_protocol = || commands.iter().map(|command| run_command(ctx, index, at, command, resp3));
                // The leader's client waits for one reply per command, a follower's client for
                // all of them at once, each in its own protocol (a HELLO inside the transaction
                // switches it); anyone else for none.
                match waiter.take().map(|w| w.reply_to) {
                    Some(ReplyTo::Transaction(slots)) => {
                        let mut slots = slots.into_iter();
                        for command in commands.iter() {
                            let slot = slots.next();
                            let outcome = run_command(ctx, index, at, command, slot.as_ref().map_or(resp3, |slot| slot.resp3));
                            match slot.and_then(|slot| slot.held) {
                                Some(held) => held.finish(reply_bytes(outcome)),
                                None => discard(outcome),
                            }
                        }
                    }
                    Some(ReplyTo::ForwardedTransaction { done, resp3: protocols }) => {
                        let replies: Vec<Vec<u8>> = commands
                            .iter()
                            .enumerate()
                            .map(|(i, command)| run_command(ctx, index, at, command, protocols.get(i).copied().unwrap_or(resp3)))
                            .map(reply_bytes)
                            .collect();
                        done(Ok(encode_replies(&replies)));
                    }
                    Some(ReplyTo::Nobody) | None => in_one_protocol().for_each(discard),
                    Some(reply_to) => {
                        in_one_protocol().for_each(discard);
                        let error = "ERR internal error: a transaction's waiter does not fit it";
                        WriteWaiter { reply_to, resp3 }.finish(Outcome::Error(error.into()));
                    }
                }
            }
        }
        Ok::<(), String>(())
    }));
    let failure = match result {
        Ok(Ok(())) => return,
        Ok(Err(msg)) => msg,
        Err(_) => format!("ERR internal error applying entry {index}"),
    };
    log::error!("{failure}");
    finish(waiter, Outcome::Error(failure));
}

/// What to say of a node that lacks database `db` (see `lib.rs`, `databases` at load).
pub fn too_few_databases(db: u32) -> String {
    let databases = state::get().databases;
    format!(
        "and this node has {databases} (databases {databases}): every node needs as many databases as the others; restart \
         it with their databases setting (at least {})",
        db + 1
    )
}

/// Runs one replicated command in its database, as of the time its entry happens at, with
/// Redis' own expiry suspended (see `expiry`).
fn run_command(ctx: *mut ffi::RedisModuleCtx, index: LogIndex, at: Option<EntryTime>, command: &CommandView, resp3: bool) -> Outcome {
    if !ffi::select_db(ctx, command.db) {
        let why = format!("log entry {index} writes to database {}, {}", command.db, too_few_databases(command.db));
        state::get().dataset_cannot_follow(why.clone());
        return Outcome::Error(state::stopped_error(&why));
    }
    // A script the leader proposed while over its memory limit (see `memory`).
    let (over_limit, argv) = memory_limit::split_mark(&command.argv);
    // Entries from before entries carried a time: nothing expires while they run, on any node.
    if let Some(at) = at {
        if is_old_news(argv, at) {
            return Outcome::Error(format!("ERR a message published {} ms ago is not delivered", ffi::now_ms() - at.0));
        }
        crate::expiry::expire_due(ctx, argv, at);
    }
    if let Some(refusal) = sort_ties_refusal(ctx, argv) {
        return Outcome::Error(refusal);
    }
    if let Some(popped) = crate::set_pop::apply(ctx, index, argv, resp3) {
        return popped;
    }
    // Redis may serve clients while a script runs, without the filter (see `held`).
    if argv.first().is_some_and(|name| crate::scripts::runs_lua(name)) {
        crate::held::before_long_command();
    }
    let call = || ffi::call(ctx, argv, resp3);
    let by_the_log_clock = |name: &[u8]| {
        // XADD's automatic ID as Redis' `*` takes it at the entry's time: the stream's next ID
        // once its top has gone past that time (see `determinism::pin_automatic_stream_id`).
        determinism::runs_by_the_log_clock(name) || (name.eq_ignore_ascii_case(b"xadd") && crate::clock::available().is_ok())
    };
    let reply = match at {
        Some(at) if argv.first().is_some_and(|name| by_the_log_clock(name)) => crate::clock::pinned(at.0, call),
        _ => crate::scripts::apply(ctx, command.db, at, argv, over_limit, call),
    };
    if let Some(at) = at {
        crate::expiry::delete_if_already_expired(ctx, argv, at);
    }
    Outcome::Call(reply)
}

/// A `SORT ... BY pattern ALPHA ... STORE` of a set or a sorted set would store the elements
/// that tie in each node's own hash table order (see `sort_patterns::ties_keep_stored_order`):
/// refused, on every node alike, since the key's type is the same everywhere at this entry.
fn sort_ties_refusal(ctx: *mut ffi::RedisModuleCtx, argv: &[&[u8]]) -> Option<String> {
    if !(sort_patterns::stores(argv) && sort_patterns::ties_keep_stored_order(argv)) {
        return None;
    }
    let (kind, _) = ffi::key_type_and_length(ctx, argv.get(1)?);
    let hashed = kind == raw::REDISMODULE_KEYTYPE_SET as i32 || kind == raw::REDISMODULE_KEYTYPE_ZSET as i32;
    hashed.then(|| {
        "ERR SORT of a set or a sorted set BY a pattern with ALPHA and STORE would store the elements that tie \
         (missing or equal BY keys) in a different order on every node; Raftis refuses it: sort numerically \
         (ties then go by the elements), without BY, or from a list"
            .to_string()
    })
}

/// A `PUBLISH` (or `SPUBLISH`) whose entry is older than [`OLD_NEWS`] by this node's clock: a node
/// replaying its log, or catching up after a partition, does not hand its subscribers messages
/// from long ago. (Publishing changes no data, so skipping it cannot part the datasets.)
fn is_old_news(argv: &[&[u8]], at: EntryTime) -> bool {
    let publishes = argv.first().is_some_and(|name| name.eq_ignore_ascii_case(b"publish") || name.eq_ignore_ascii_case(b"spublish"));
    publishes && ffi::now_ms().saturating_sub(at.0) > OLD_NEWS.as_millis() as i64
}

/// On the main thread, as the entry is applied.
fn finish(waiter: Option<WriteWaiter>, outcome: Outcome) {
    match waiter {
        Some(w) => w.finish_applied(outcome),
        None => discard(outcome),
    }
}

/// An outcome nobody waits for (a follower's apply, a client that takes no replies).
pub fn discard(outcome: Outcome) {
    if let Outcome::Call(reply) = outcome {
        ffi::free_call_reply(reply);
    }
}

/// Takes a snapshot when the log has grown `snapshot-threshold` entries or `snapshot-log-size`
/// bytes past the last one.
fn maybe_snapshot(ctx: *mut ffi::RedisModuleCtx, point: &AppliedPoint) {
    let s = state::get();
    if point.index.get() == 0 || s.snapshots.in_progress() {
        return;
    }
    let (threshold, max_bytes) = (s.snapshot_threshold(), s.snapshot_log_bytes());
    let last = s.snapshots.latest().map_or(0, |(i, _)| i.get());
    let by_entries = threshold > 0 && point.index.get().saturating_sub(last) >= threshold;
    let by_bytes = max_bytes > 0 && s.snapshots.applied_bytes() >= max_bytes;
    if by_entries || by_bytes {
        s.snapshots.start(ctx, point, None);
    }
}

/// Empties the dataset: the keys, and the function libraries, which FLUSHALL leaves alone (a dump
/// file Redis loaded at start holds both; a library left here would make the log's own
/// `FUNCTION LOAD` of it fail on this node alone).
fn flush_dataset(ctx: *mut ffi::RedisModuleCtx) {
    ffi::free_call_reply(ffi::call_strs(ctx, &["FLUSHALL", "SYNC"]));
    ffi::free_call_reply(ffi::call_strs(ctx, &["FUNCTION", "FLUSH", "SYNC"]));
}

/// Replaces the dataset. A snapshot that cannot be loaded leaves the node unable to serve
/// correct data: it is stopped rather than allowed to answer from a wrong dataset.
fn restore(ctx: *mut ffi::RedisModuleCtx, index: LogIndex, data: &[u8]) {
    let Some(descriptor) = SnapshotDescriptor::decode(data) else {
        // Whatever Redis loaded from its own files, or had before, must not count twice.
        flush_dataset(ctx);
        return;
    };
    state::get().snapshots.loaded(index, descriptor.size);
    let path = state::get().settings().dir.join(&descriptor.file);
    let started = std::time::Instant::now();
    match crate::snapshot::load(ctx, &path) {
        Ok(keys) => log::info!("loaded snapshot {} at index {index}: {keys} keys in {:?}", descriptor.file, started.elapsed()),
        Err(e) => {
            flush_dataset(ctx);
            state::get().dataset_cannot_follow(format!("snapshot {} could not be loaded: {e}", descriptor.file));
        }
    }
}
