//! Snapshots of the dataset, taken without stopping the server: Redis' main thread, applying
//! committed entries between two batches (so the dataset is exactly at a known log index), forks; the
//! child writes the function libraries (`FUNCTION DUMP`) and every key as its DUMP payload and
//! absolute expiry into a checksummed file and exits. Redis tells us on its main thread when the child is done; the file is verified on a
//! background thread and handed to the Raft node, which compacts the log.
//!
//! Loading (restart, or a snapshot received from the leader) flushes the dataset and the
//! libraries and RESTOREs everything on the main thread in one go, so clients never see a
//! half-loaded dataset.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, RedisModuleCtx};
use crate::state;
use raft::eraftpb::ConfState;
use raftis_core::membership::Members;
use raftis_core::node::TakenSnapshot;
use raftis_core::snapshot_file::{self, Record, SnapshotMeta, SnapshotReader, SnapshotWriter};
use raftis_core::snapshot_transfer::SnapshotDescriptor;
use raftis_core::{LogIndex, Term};
use redis_module::raw;
use std::os::raw::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the dataset stands after the last applied batch: what a snapshot taken now records.
#[derive(Clone, Debug, Default)]
pub struct AppliedPoint {
    pub index: LogIndex,
    pub term: Term,
    pub conf_state: ConfState,
    pub members: Arc<Members>,
}

struct InProgress {
    point: AppliedPoint,
    path: PathBuf,
    started: Instant,
    waiters: Vec<Blocked>,
    purpose: Purpose,
}

const SEEDING: &str = "ERR RAFT.CLUSTER INIT KEEPDATA is writing this node's dataset into its first snapshot; retry once it is done";

/// What a snapshot is taken for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// To compact the log behind it (the usual case).
    Compaction,
    /// `RAFT.CLUSTER INIT KEEPDATA`: the dataset Redis loaded becomes a new cluster's first
    /// snapshot; the cluster is made once the file is written (see `cluster_ops::create_from`).
    Seed,
}

#[derive(Default)]
pub struct Snapshots {
    in_progress: Mutex<Option<InProgress>>,
    /// `Some` while a finished child's file is verified and recorded in the log, with the
    /// RAFT.SNAPSHOT callers that came meanwhile. Until `latest` names the file, the log still
    /// looks due for a snapshot, and a second child started now would race this publication
    /// (recording it could remove this file while it is verified): none starts, and those
    /// callers are served once it is recorded.
    publishing: Mutex<Option<Vec<Blocked>>>,
    /// Snapshot children started since this process started (RAFT.INFO `snapshots_started`).
    started: AtomicU64,
    /// Index and size of the newest snapshot this node has.
    latest: Mutex<Option<(LogIndex, u64)>>,
    /// Bytes of entries applied since the last snapshot started (or was loaded): roughly how
    /// much log a new snapshot would let the node compact.
    applied_bytes: AtomicU64,
    /// How the newest snapshot attempt ended, and how many failed: what an operator watches, as
    /// Redis' `rdb_last_bgsave_status`, to learn that the log has stopped being compacted.
    last_ended: Mutex<Option<Ended>>,
    failed: AtomicU64,
    /// When a refused fork was last logged.
    fork_refused_warned: Mutex<Option<Instant>>,
}

/// How a snapshot attempt ended (RAFT.INFO `last_snapshot_status`, `last_snapshot_duration_ms`).
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub ok: bool,
    /// From the fork to the file recorded in the log (or to the failure).
    pub took: Duration,
    pub at: Instant,
}

/// How long after a failed snapshot the log's own needs start another (`RAFT.SNAPSHOT` tries at
/// once). What failed (a key too large to dump, a full disk) most likely fails again, and the
/// log asks after every applied batch: each try would fork, copy pages, and fill the disk the log
/// needs. Redis waits as long between failed BGSAVEs.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

impl Snapshots {
    pub fn latest(&self) -> Option<(LogIndex, u64)> {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_latest(&self, index: LogIndex, size: u64) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((index, size));
    }

    fn set_latest_if_newer(&self, index: LogIndex, size: u64) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if latest.is_none_or(|(current, _)| current < index) {
            *latest = Some((index, size));
        }
    }

    pub fn add_applied_bytes(&self, bytes: u64) {
        self.applied_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn applied_bytes(&self) -> u64 {
        self.applied_bytes.load(Ordering::Relaxed)
    }

    /// The dataset was just replaced by a snapshot: nothing applied on top of it yet.
    pub fn loaded(&self, index: LogIndex, size: u64) {
        self.set_latest(index, size);
        self.applied_bytes.store(0, Ordering::Relaxed);
    }

    /// A child is writing a snapshot, or its file is being verified and recorded.
    pub fn in_progress(&self) -> bool {
        self.phase() != "none"
    }

    /// Where a snapshot stands (RAFT.INFO `snapshot_phase`): `none`, `writing` (a child is
    /// writing it) or `publishing` (its file is being verified and recorded).
    pub fn phase(&self) -> &'static str {
        if self.is_publishing() {
            "publishing"
        } else if self.in_progress.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            "writing"
        } else {
            "none"
        }
    }

    fn is_publishing(&self) -> bool {
        self.publishing().is_some()
    }

    fn publishing(&self) -> std::sync::MutexGuard<'_, Option<Vec<Blocked>>> {
        self.publishing.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub fn last_ended(&self) -> Option<Ended> {
        *self.last_ended.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    fn ended(&self, ok: bool, took: Duration) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ended { ok, took, at: Instant::now() });
    }

    /// Starts a snapshot at `point`. Must be called on the main thread, between batches.
    /// A waiter is answered when the snapshot is done; with one already running it joins that.
    pub fn start(&self, ctx: *mut RedisModuleCtx, point: &AppliedPoint, waiter: Option<Blocked>) {
        self.begin(ctx, point, waiter, Purpose::Compaction);
    }

    /// `RAFT.CLUSTER INIT KEEPDATA`, on the main thread of a node in no cluster: writes the
    /// dataset as the snapshot `point` (index 1, this node the only voter), then makes the cluster
    /// from it and answers `waiter` `+OK`. Refused while a snapshot is being written.
    pub fn seed(&self, ctx: *mut RedisModuleCtx, point: &AppliedPoint, waiter: Blocked) {
        if self.in_progress() {
            return waiter.finish(Outcome::Error(SEEDING.into()));
        }
        self.begin(ctx, point, Some(waiter), Purpose::Seed);
    }

    fn begin(&self, ctx: *mut RedisModuleCtx, point: &AppliedPoint, waiter: Option<Blocked>, purpose: Purpose) {
        let mut slot = self.in_progress.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.as_mut() {
            match (running.purpose, waiter) {
                // Its one waiter is the INIT, answered +OK, not with a snapshot.
                (Purpose::Seed, Some(w)) => w.finish(Outcome::Error(SEEDING.into())),
                (_, waiter) => running.waiters.extend(waiter),
            }
            return;
        }
        if let Some(deferred) = self.publishing().as_mut() {
            // Asked again once the one being published is recorded; it may be the answer. A
            // request from Raft itself is simply dropped: it asks again while it still needs one.
            deferred.extend(waiter);
            return;
        }
        if point.index.get() == 0 {
            if let Some(w) = waiter {
                w.finish(Outcome::Error("ERR nothing to snapshot yet".into()));
            }
            return;
        }
        let compaction = purpose == Purpose::Compaction;
        let failed_lately = self.last_ended().is_some_and(|e| !e.ok && e.at.elapsed() < RETRY_AFTER_FAILURE);
        if compaction && waiter.is_none() && failed_lately {
            return;
        }
        if let Some((index, size)) = self.latest().filter(|(index, _)| *index == point.index && compaction) {
            // Nothing applied since the last snapshot: it is the answer.
            if let Some(w) = waiter {
                w.finish(Outcome::Pair(index.get() as i64, size as i64));
            }
            return;
        }
        let dir = state::get().settings().dir;
        if let Some(why) = no_room(&dir, self.latest().map(|(_, size)| size)) {
            // Counted as a snapshot that failed: tried again no sooner than one that ran out of
            // room while it was written, which would have filled the disk the log needs.
            log::warn!("snapshot at index {} not started: {why}", point.index);
            self.started.fetch_add(1, Ordering::Relaxed);
            self.ended(false, Duration::ZERO);
            if let Some(w) = waiter {
                w.finish(Outcome::Error(format!("ERR {why}")));
            }
            return;
        }
        let path = snapshot_file::snapshot_path(&dir, point.index, point.term);
        let done: extern "C" fn(c_int, c_int, *mut c_void) = fork_done;
        let pid = unsafe { api!(RedisModule_Fork)(Some(done), std::ptr::null_mut()) };
        if pid == 0 {
            // The child: write and leave. Nothing here may touch locks other threads could hold.
            ffi::close_inherited_sockets();
            // With Redis' expiry suspended, as the log is applied: keys past their deadline by
            // the clock but not by the log are kept (see `expiry`).
            let code = match crate::expiry::suspended(|| write_dataset(ctx, &path, point)) {
                Ok(_) => 0,
                Err(e) => {
                    ffi::log_line("warning", &format!("<raft> snapshot child failed: {e:#}"));
                    1
                }
            };
            unsafe { api!(RedisModule_ExitFromChild)(code) };
            return;
        }
        if pid < 0 {
            // Another child (a BGSAVE) is running: not a failed snapshot but one not started yet,
            // and asked for again with every applied batch, so said at most every 10 s.
            let mut warned = self.fork_refused_warned.lock().unwrap_or_else(|p| p.into_inner());
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                log::warn!("cannot fork for a snapshot now (another child process is running?); will retry");
                *warned = Some(Instant::now());
            }
            drop(warned);
            if let Some(w) = waiter {
                w.finish(Outcome::Error("ERR cannot fork for a snapshot right now (is a BGSAVE running?); retry".into()));
            }
            return;
        }
        log::info!("snapshot at index {} started (child pid {pid})", point.index);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.applied_bytes.store(0, Ordering::Relaxed);
        let waiters = waiter.into_iter().collect();
        *slot = Some(InProgress { point: point.clone(), path, started: Instant::now(), waiters, purpose });
    }
}

/// Room the log keeps while a snapshot is written, beyond the snapshot's own.
const LOG_HEADROOM: u64 = 16 << 20;

/// Why a snapshot should not start in `dir`, if it should not: the disk has less room than the
/// snapshot will take (about as much as the `last` one, if any) and [`LOG_HEADROOM`]. A snapshot
/// that fills the disk fails, and meanwhile leaves the log no room for its writes.
fn no_room(dir: &Path, last: Option<u64>) -> Option<String> {
    let free = raftis_core::disk_space::free_bytes(dir)?;
    let needed = last.unwrap_or(0).saturating_add(LOG_HEADROOM);
    (free < needed).then(|| {
        format!(
            "no room for a snapshot: {} MB free on the disk holding {}, and it needs {} MB (the last snapshot's size, and {} MB for the log meanwhile)",
            free >> 20,
            dir.display(),
            needed.div_ceil(1 << 20),
            LOG_HEADROOM >> 20
        )
    })
}

/// In the child: the function libraries, then every key of every database, DUMPed with its
/// absolute expiry.
fn write_dataset(ctx: *mut RedisModuleCtx, path: &Path, point: &AppliedPoint) -> anyhow::Result<()> {
    let meta =
        SnapshotMeta { index: point.index, term: point.term, conf_state: point.conf_state.clone(), members: (*point.members).clone() };
    let functions = dump_functions(ctx)?;
    let writer = SnapshotWriter::create(path, &meta, &functions)?;
    let mut scan = Scan { writer, db: 0, failed: None };
    let databases = state::get().databases;
    for db in 0..databases {
        if !ffi::select_db(ctx, db) {
            continue;
        }
        scan.db = db;
        // The module API's scan hands each key over already opened: no SCAN replies to build
        // and no PEXPIRETIME call per key, only the DUMP.
        let cursor = unsafe { api!(RedisModule_ScanCursorCreate)() };
        let privdata = &mut scan as *mut Scan as *mut c_void;
        while scan.failed.is_none() && unsafe { api!(RedisModule_Scan)(ctx, cursor, Some(add_scanned), privdata) } != 0 {}
        unsafe { api!(RedisModule_ScanCursorDestroy)(cursor) };
        if let Some(e) = scan.failed.take() {
            return Err(e);
        }
    }
    scan.writer.finish()?;
    Ok(())
}

/// The libraries as `FUNCTION DUMP` serializes them; empty when there are none.
fn dump_functions(ctx: *mut RedisModuleCtx) -> anyhow::Result<Vec<u8>> {
    let list = ffi::call_strs(ctx, &["FUNCTION", "LIST"]);
    let none = ffi::is_array(list) && ffi::reply_len(list) == 0;
    ffi::free_call_reply(list);
    if none {
        return Ok(Vec::new());
    }
    let dump = ffi::call_strs(ctx, &["FUNCTION", "DUMP"]);
    let payload = ffi::reply_bytes(dump).to_vec();
    let is_error = ffi::is_error(dump);
    ffi::free_call_reply(dump);
    if is_error || payload.is_empty() {
        anyhow::bail!("FUNCTION DUMP failed: {}", String::from_utf8_lossy(&payload));
    }
    Ok(payload)
}

/// Where [`add_scanned`] writes, and the first error it met (the scan then stops).
struct Scan {
    writer: SnapshotWriter,
    db: u32,
    failed: Option<anyhow::Error>,
}

extern "C" fn add_scanned(
    ctx: *mut RedisModuleCtx,
    name: *mut ffi::RedisModuleString,
    key: *mut raw::RedisModuleKey,
    privdata: *mut c_void,
) {
    // SAFETY: `write_dataset` passes its `Scan`, alive and otherwise untouched while Scan runs.
    let scan = unsafe { &mut *(privdata as *mut Scan) };
    if scan.failed.is_some() {
        return;
    }
    let added = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| add_key(ctx, scan, name, key)));
    match added {
        Ok(Ok(())) => {}
        Ok(Err(e)) => scan.failed = Some(e),
        Err(_) => scan.failed = Some(anyhow::anyhow!("panic while writing a key")),
    }
}

fn add_key(
    ctx: *mut RedisModuleCtx,
    scan: &mut Scan,
    name: *mut ffi::RedisModuleString,
    key: *mut raw::RedisModuleKey,
) -> anyhow::Result<()> {
    let key_name = ffi::string_bytes(name);
    let dump = ffi::call(ctx, &[b"DUMP".as_slice(), key_name], false);
    let payload = ffi::reply_bytes(dump).to_vec();
    ffi::free_call_reply(dump);
    if payload.is_empty() {
        return Ok(()); // not a key DUMP can serialize any more; nothing to restore
    }
    // Redis opens every scanned key for us; should it not have, PEXPIRETIME tells the same.
    let expire_at_ms = if key.is_null() {
        let ttl = ffi::call(ctx, &[b"PEXPIRETIME".as_slice(), key_name], false);
        let at = ffi::reply_integer_value(ttl);
        ffi::free_call_reply(ttl);
        at
    } else {
        unsafe { api!(RedisModule_GetAbsExpire)(key) }
    };
    let expire_at_ms = if expire_at_ms < 0 { -1 } else { expire_at_ms };
    scan.writer.add(&Record { db: scan.db, key: key_name.to_vec(), expire_at_ms, payload })?;
    Ok(())
}

/// On Redis' main thread when the child exits: verify and publish off the main thread.
extern "C" fn fork_done(exitcode: c_int, bysignal: c_int, _user_data: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        let s = state::get();
        let Some(job) = s.snapshots.in_progress.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        if exitcode != 0 || bysignal != 0 {
            log::error!("snapshot child failed (exit code {exitcode}, signal {bysignal})");
            if bysignal != 0 {
                // A child that exits cleans up its own file; one killed (the OOM killer, say)
                // leaves it, a dataset's worth of disk that would refuse every later snapshot
                // for want of room. Removed here, before another snapshot of the same point can
                // start writing it again. (Rare enough for the main thread's unlink.)
                let tmp = raftis_core::snapshot_file::temp_path(&job.path);
                if let Err(e) = std::fs::remove_file(&tmp) {
                    log::warn!("could not remove {}: {e}", tmp.display());
                }
            }
            s.snapshots.ended(false, job.started.elapsed());
            for w in job.waiters {
                w.finish(Outcome::Error("ERR snapshot failed; see the Redis log".into()));
            }
            return;
        }
        // This and every caller of `in_progress()` and `start()` run on the main thread: none
        // sees the gap.
        *s.snapshots.publishing() = Some(Vec::new());
        let started = job.started;
        let published = std::thread::Builder::new().name("raft-snapshot".into()).spawn(move || publish(job));
        if published.is_err() {
            log::error!("cannot start a thread to publish the snapshot; the next one will be taken later");
            s.snapshots.ended(false, started.elapsed());
            *s.snapshots.publishing() = None;
        }
    });
}

/// Ends `publishing` however `publish` ends, and asks again for the snapshots requested
/// meanwhile (on the main thread, like every request).
struct Publishing;

impl Drop for Publishing {
    fn drop(&mut self) {
        let s = state::get();
        let deferred = s.snapshots.publishing().take().unwrap_or_default();
        for waiter in deferred {
            // Should the queue be gone, the dropped request answers its client with an error.
            let _ = s.send_to_apply(crate::apply::Job::TakeSnapshot(waiter));
        }
    }
}

fn publish(job: InProgress) {
    let _publishing = Publishing;
    let s = state::get();
    let summary = match snapshot_file::verify(&job.path) {
        Ok(summary) => summary,
        Err(e) => {
            log::error!("the snapshot just written at {} does not verify: {e}", job.path.display());
            s.snapshots.ended(false, job.started.elapsed());
            for w in job.waiters {
                w.finish(Outcome::Error(format!("ERR snapshot failed verification: {e}")));
            }
            return;
        }
    };
    let file = job.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    log::info!(
        "snapshot at index {}: {} keys, {} bytes, written in {:?}",
        job.point.index,
        summary.records,
        summary.size,
        job.started.elapsed()
    );
    let taken = TakenSnapshot {
        index: job.point.index,
        term: job.point.term,
        conf_state: job.point.conf_state.clone(),
        members: job.point.members.clone(),
        descriptor: SnapshotDescriptor { file, size: summary.size, checksum: summary.checksum },
    };
    if job.purpose == Purpose::Seed {
        let made = crate::cluster_ops::create_from(taken);
        s.snapshots.ended(made.is_ok(), job.started.elapsed());
        let outcome = match made {
            Ok(()) => Outcome::Simple("OK".into()),
            Err(e) => {
                log::error!("RAFT.CLUSTER INIT KEEPDATA: {e}");
                Outcome::Error(e)
            }
        };
        if let Some(w) = job.waiters.into_iter().next() {
            w.finish(outcome);
        }
        return;
    }
    let recorded = s.node().is_some_and(|node| node.snapshot_taken(taken));
    if recorded {
        // Only now: `RAFT.SNAPSHOT` answers with the latest at once, which must be in the log. A
        // snapshot loaded meanwhile (from the leader) may be newer, and stays the latest.
        s.snapshots.set_latest_if_newer(job.point.index, summary.size);
    }
    s.snapshots.ended(recorded, job.started.elapsed());
    // Entries applied while this one was written may already call for the next.
    drop(_publishing);
    let _ = s.send_to_apply(crate::apply::Job::CheckSnapshot);
    // Answered only once the log durably refers to the snapshot.
    for w in job.waiters {
        w.finish(if recorded {
            Outcome::Pair(job.point.index.get() as i64, summary.size as i64)
        } else {
            Outcome::Error("ERR the snapshot was written but the raft log could not record it; see the Redis log".into())
        });
    }
}

/// Replaces the dataset and the function libraries with the snapshot at `path` (on the main
/// thread).
pub fn load(ctx: *mut RedisModuleCtx, path: &Path) -> anyhow::Result<u64> {
    let (_meta, reader) = SnapshotReader::open(path)?;
    ffi::free_call_reply(ffi::call_strs(ctx, &["FLUSHALL", "SYNC"]));
    // FLUSHALL leaves the libraries alone.
    let functions = if reader.functions().is_empty() {
        ffi::call_strs(ctx, &["FUNCTION", "FLUSH", "SYNC"])
    } else {
        ffi::call(ctx, &[&b"FUNCTION"[..], b"RESTORE", reader.functions(), b"FLUSH"], false)
    };
    let failed = ffi::is_error(functions);
    let error = String::from_utf8_lossy(ffi::reply_bytes(functions)).into_owned();
    ffi::free_call_reply(functions);
    if failed {
        anyhow::bail!("FUNCTION RESTORE failed: {error}");
    }
    let mut n = 0;
    for record in reader {
        let r = record?;
        if !ffi::select_db(ctx, r.db) {
            anyhow::bail!("it holds keys of database {}, {}", r.db, crate::apply::too_few_databases(r.db));
        }
        let ttl = if r.expire_at_ms < 0 { b"0".to_vec() } else { r.expire_at_ms.to_string().into_bytes() };
        let reply = ffi::call(ctx, &[b"RESTORE".to_vec(), r.key, ttl, r.payload, b"ABSTTL".to_vec(), b"REPLACE".to_vec()], false);
        if ffi::is_error(reply) {
            let e = String::from_utf8_lossy(ffi::reply_bytes(reply)).into_owned();
            ffi::free_call_reply(reply);
            anyhow::bail!("RESTORE failed: {e}");
        }
        ffi::free_call_reply(reply);
        n += 1;
    }
    ffi::select_db(ctx, 0);
    Ok(n)
}
