//! The state machine side of the module: committed entries are executed on the Redis dataset by
//! one apply thread that holds Redis' global lock for a whole batch (Redis' main thread is paused
//! meanwhile, exactly as if the commands came from clients). The Raft loop only queues work here
//! and never waits for Redis.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, DetachedContext};
use crossbeam_channel::{Receiver, Sender};
use raftis_core::command_entry::CommandEntry;
use raftis_core::node::{ApplyBatch, Committed, StateMachine};
use raftis_core::proposal::{ProposeError, Waiter};
use crate::snapshot::AppliedPoint;
use crate::state;
use raftis_core::snapshot_transfer::SnapshotDescriptor;
use raftis_core::LogIndex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A client waiting for its write to be applied.
pub struct WriteWaiter {
    pub blocked: Blocked,
    /// The client speaks RESP3: its reply must be produced in RESP3 too.
    pub resp3: bool,
}

impl Waiter for WriteWaiter {
    fn fail(self, err: ProposeError) {
        self.blocked.finish(Outcome::Error(crate::state::error_reply(&err)));
    }
}

/// How far the dataset has really been applied, and who waits for it (linearizable reads).
#[derive(Default)]
pub struct ApplyProgress {
    applied: AtomicU64,
    entries: AtomicU64,
    batches: AtomicU64,
    waiters: Mutex<BTreeMap<LogIndex, Vec<Box<dyn FnOnce() + Send>>>>,
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
    pub fn when_applied(&self, index: LogIndex, f: Box<dyn FnOnce() + Send>) {
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
    Restore { index: LogIndex, data: Vec<u8> },
    /// RAFT.SNAPSHOT: take one now and answer this client when it is done.
    TakeSnapshot(Blocked),
    /// Raft needs a newer snapshot for a follower.
    SnapshotWanted,
}

/// The [`StateMachine`] the Raft node drives.
pub struct RedisMachine {
    tx: Sender<Job>,
}

impl StateMachine for RedisMachine {
    type Waiter = WriteWaiter;

    fn apply(&mut self, batch: ApplyBatch<WriteWaiter>) {
        let _ = self.tx.send(Job::Apply(batch));
    }

    fn restore(&mut self, index: LogIndex, data: &[u8]) {
        let _ = self.tx.send(Job::Restore { index, data: data.to_vec() });
    }

    fn request_snapshot(&mut self) {
        let _ = self.tx.send(Job::SnapshotWanted);
    }
}

/// Starts the apply thread; the returned machine feeds it, the sender reaches it directly.
pub fn start(ctx: Arc<DetachedContext>, progress: Arc<ApplyProgress>) -> anyhow::Result<(RedisMachine, Sender<Job>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new().name("raft-apply".into()).spawn(move || run(rx, ctx, progress))?;
    Ok((RedisMachine { tx: tx.clone() }, tx))
}

fn run(rx: Receiver<Job>, ctx: Arc<DetachedContext>, progress: Arc<ApplyProgress>) {
    let mut point = AppliedPoint::default();
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile is applied under the same lock.
        let jobs: Vec<Job> = std::iter::once(first).chain(rx.try_iter()).collect();
        let mut applied_to = None;
        let mut entries = 0;
        {
            let lock = ctx.lock();
            for job in jobs {
                match job {
                    Job::Restore { index, data } => {
                        restore(lock.ctx(), index, &data);
                        point = AppliedPoint { index, ..AppliedPoint::default() };
                        applied_to = Some(index);
                    }
                    Job::Apply(batch) => {
                        entries += batch.entries.len() as u64;
                        for committed in batch.entries {
                            apply_one(lock.ctx(), committed);
                        }
                        point = AppliedPoint {
                            index: batch.applied_to,
                            term: batch.term,
                            conf_state: batch.conf_state,
                            members: batch.members,
                        };
                        applied_to = Some(batch.applied_to);
                    }
                    Job::TakeSnapshot(waiter) => state::get().snapshots.start(lock.ctx(), &point, Some(waiter)),
                    Job::SnapshotWanted => state::get().snapshots.start(lock.ctx(), &point, None),
                }
            }
            maybe_snapshot(lock.ctx(), &point);
        }
        progress.entries.fetch_add(entries, Ordering::Relaxed);
        progress.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(index) = applied_to {
            progress.advance(index);
        }
    }
}

fn apply_one(ctx: *mut ffi::RedisModuleCtx, committed: Committed<WriteWaiter>) {
    let index = committed.index;
    let waiter = committed.waiter;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let entry = CommandEntry::decode(&committed.data).map_err(|e| format!("ERR corrupt log entry at {index}: {e}"))?;
        if !ffi::select_db(ctx, entry.db) {
            return Err(format!("ERR log entry at {index} names database {} which does not exist here", entry.db));
        }
        let resp3 = waiter.as_ref().map_or(false, |w| w.resp3);
        Ok(ffi::call(ctx, &entry.argv, resp3))
    }));
    let outcome = match result {
        Ok(Ok(reply)) => Outcome::Call(reply),
        Ok(Err(msg)) => {
            log::error!("{msg}");
            Outcome::Error(msg)
        }
        Err(_) => {
            log::error!("panic while applying the entry at {index}");
            Outcome::Error(format!("ERR internal error applying entry {index}"))
        }
    };
    match (waiter, outcome) {
        (Some(w), outcome) => w.blocked.finish(outcome),
        (None, Outcome::Call(reply)) => ffi::free_call_reply(reply),
        (None, _) => {}
    }
}

/// Takes a snapshot when the log has grown `snapshot-threshold` entries past the last one.
fn maybe_snapshot(ctx: *mut ffi::RedisModuleCtx, point: &AppliedPoint) {
    let s = state::get();
    let threshold = s.snapshot_threshold();
    if threshold == 0 || point.index.get() == 0 || s.snapshots.in_progress() {
        return;
    }
    let last = s.snapshots.latest().map_or(0, |(i, _)| i.get());
    if point.index.get().saturating_sub(last) >= threshold {
        s.snapshots.start(ctx, point, None);
    }
}

/// Replaces the dataset. A snapshot that cannot be loaded leaves the node unable to serve
/// correct data: it is stopped rather than allowed to answer from a wrong dataset.
fn restore(ctx: *mut ffi::RedisModuleCtx, index: LogIndex, data: &[u8]) {
    let Some(descriptor) = SnapshotDescriptor::decode(data) else {
        // Whatever Redis loaded from its own files, or had before, must not count twice.
        ffi::free_call_reply(ffi::call_strs(ctx, &["FLUSHALL", "SYNC"]));
        return;
    };
    state::get().snapshots.set_latest(index, descriptor.size);
    let path = state::get().settings().dir.join(&descriptor.file);
    let started = std::time::Instant::now();
    match crate::snapshot::load(ctx, &path) {
        Ok(keys) => log::info!("loaded snapshot {} at index {index}: {keys} keys in {:?}", descriptor.file, started.elapsed()),
        Err(e) => {
            log::error!("cannot load snapshot {}: {e:#}; this node stops serving", path.display());
            ffi::free_call_reply(ffi::call_strs(ctx, &["FLUSHALL", "SYNC"]));
            state::get().set_fatal(format!("snapshot {} could not be loaded: {e}", descriptor.file));
        }
    }
}
