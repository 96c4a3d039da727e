//! The durable Raft log: entries, hard state, conf state and the latest snapshot, kept in an LMDB
//! environment under `<dir>/raft-log/`.
//!
//! Layout, two databases:
//! - `entries`: log index as big-endian `u64` (LMDB's byte order is then index order) -> prost
//!   `Entry`.
//! - `meta`: string keys -> `hard_state`, `conf_state` (prost), `snapshot_meta` (prost
//!   `SnapshotMetadata`), `snapshot_data` (raw bytes), `truncated` (prost index and term of the
//!   entry just before the first one), and application blobs under `app/<key>`.
//!   The snapshot is split in two so that opening the log does not read a possibly huge dataset
//!   just to learn its index; application keys get a prefix so they can never clobber Raft state.
//!
//! Durability: appends go to a journal (`crate::journal`, `<dir>/raft-log/journal`) and stay in
//! memory (the tail) until a checkpoint moves them into LMDB in one commit and restarts the
//! journal; opening the store replays the journal. Callers choose when to pay for an fsync: per
//! append (`sync = true`, the group commit of one Raft `Ready`: one journal write and flush) or
//! from a background flusher through [`LogStore::sync`]. The environment is opened with
//! `MDB_NOSYNC`; with ordered commits (durability high) every LMDB commit is made durably
//! anyway, checkpoints included. A process crash loses nothing either way; what a power loss can
//! do is up to that choice.
//!
//! Concurrency: writes come from one thread (the Raft loop) but everything takes `&self`. The
//! cached indexes and states sit behind an `RwLock` that a writer holds for the whole write
//! transaction and publishes only after commit, so a reader on another thread never sees cached
//! indexes that disagree with what its read transaction finds. Transactions never outlive a
//! method call, and the environment uses `MDB_NOTLS` (see `open`), so a thread never trips over
//! LMDB's one-transaction-per-thread rule.
//!
//! Beside this file: `records` (the journal's records and an entry's sealed form), `reads` (reading
//! the log back, and raft's `Storage` trait) and the tests.

use std::cmp;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::journal::Journal;
use heed::byteorder::BigEndian;
use heed::types::{Bytes, DecodeIgnore, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RoTxn, RwTxn};
use prost::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError as RaftStorageError};

mod reads;
mod records;
#[cfg(test)]
mod tests;

use records::{decode_record, encode_record, unseal};

/// Name of the LMDB directory inside the node's data directory.
const LOG_DIR: &str = "raft-log";

/// How often a commit index that changed alone is written. Raft does not need it on disk (a
/// restarted node learns it again from the leader), and writing it with every Ready cost each
/// durable commit an extra LMDB page or two to flush, on every node.
const COMMIT_STORE_EVERY: Duration = Duration::from_millis(100);

/// The map is only address space: LMDB's file grows as pages are used, so reserving far more than
/// any log needs costs nothing and spares us resizing the map at runtime.
#[cfg(target_pointer_width = "64")]
const MAP_SIZE: usize = 64 << 30;
#[cfg(not(target_pointer_width = "64"))]
const MAP_SIZE: usize = 1 << 30;

mod key {
    pub const HARD_STATE: &str = "hard_state";
    pub const CONF_STATE: &str = "conf_state";
    pub const SNAPSHOT_META: &str = "snapshot_meta";
    pub const SNAPSHOT_DATA: &str = "snapshot_data";
    pub const TRUNCATED: &str = "truncated";
    /// The newest journal generation whose records a checkpoint put in LMDB.
    pub const JOURNAL_ABSORBED: &str = "journal_absorbed";
    pub const APP_PREFIX: &str = "app/";
}

type EntriesDb = Database<U64<BigEndian>, Bytes>;
type MetaDb = Database<Str, Bytes>;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("decoding a stored record: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("entry {index} is compacted (first index is {first_index})")]
    Compacted { index: u64, first_index: u64 },
    #[error("entry {index} is unavailable (last index is {last_index})")]
    Unavailable { index: u64, last_index: u64 },
    #[error("appending at index {index} would leave a gap after last index {last_index}")]
    Gap { index: u64, last_index: u64 },
    #[error("entries to append are not consecutive: index {found} follows {previous}")]
    NotConsecutive { previous: u64, found: u64 },
    #[error("snapshot at index {index} is out of date (needs at least index {min_index})")]
    SnapshotOutOfDate { index: u64, min_index: u64 },
    #[error("snapshot has no metadata")]
    MissingSnapshotMetadata,
    #[error(
        "cannot compact up to index {compact_index}: the stored snapshot only covers index \
         {snapshot_index}, so lagging followers could not catch up"
    )]
    CompactBeyondSnapshot { compact_index: u64, snapshot_index: u64 },
    #[error("the log is already initialized")]
    AlreadyInitialized,
    #[error("a bootstrap snapshot must name at least one voter")]
    NoVoters,
    #[error("{} is already open in this process; clone that LogStore", .0.display())]
    AlreadyOpen(PathBuf),
    #[error("corrupt log: {0}")]
    Corrupt(String),
}

/// Raft only understands its own error kinds; it reacts to `Compacted` and `Unavailable` (e.g. by
/// sending a snapshot), everything else makes the node inoperable, which is what a failing disk
/// deserves.
impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        let store = match e {
            StorageError::Compacted { .. } => RaftStorageError::Compacted,
            StorageError::Unavailable { .. } => RaftStorageError::Unavailable,
            StorageError::SnapshotOutOfDate { .. } => RaftStorageError::SnapshotOutOfDate,
            other => RaftStorageError::Other(Box::new(other)),
        };
        raft::Error::Store(store)
    }
}

/// Sizes of the log, for INFO-style reporting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub first_index: u64,
    pub last_index: u64,
    /// Entries currently stored: `last_index + 1 - first_index`.
    pub entries: u64,
    /// Bytes of the data file LMDB has allocated: (last used page + 1) * page size. This is the
    /// file's high-water mark, free pages included; LMDB reuses pages freed by compaction but
    /// never shrinks the file, so this does not drop after `compact`.
    pub size_bytes: u64,
    /// Bytes of records in the journal now: appended since the last checkpoint.
    pub journal_bytes: u64,
    /// Checkpoints that moved the journal's entries into LMDB, and the time they took.
    pub checkpoints: u64,
    pub checkpoint_micros: u64,
}

/// The `term` field of an `Entry` and nothing else. `term()` is on Raft's hot path and entries
/// can carry megabytes of payload; prost skips undeclared fields without copying them.
#[derive(Clone, PartialEq, Message)]
struct EntryTerm {
    #[prost(uint64, tag = "2")]
    term: u64,
}

/// Index and term of one entry; stored for the entry just before the first one.
#[derive(Clone, PartialEq, Message)]
struct LogPosition {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(uint64, tag = "2")]
    term: u64,
}

/// What Raft asks for most, mirrored from disk so that answering needs no transaction.
#[derive(Clone, Debug, Default)]
struct State {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index of the stored snapshot (0 when there is none); its data stays on disk.
    snapshot_index: u64,
    /// The entry just before the first stored one. Its body is gone, but Raft still asks for its
    /// term to check that an append from the leader continues our log.
    truncated_index: u64,
    truncated_term: u64,
    /// Equals `truncated_index` when the log holds no entries.
    last_index: u64,
    /// When `hard_state` was last written; its commit index may be newer than the stored one.
    hard_state_stored_at: Option<Instant>,
    /// The commit index last written (to the journal or LMDB), or found on open.
    stored_commit: u64,
}

impl State {
    fn first_index(&self) -> u64 {
        self.truncated_index + 1
    }

    /// Whether `hs` must be written now: a new term or vote always (Raft's safety rests on
    /// them, and they are always on disk as `hard_state` has them), a commit index other than the
    /// one written last only if `every` has passed since the hard state was last written.
    fn must_store(&self, hs: &HardState, every: Duration) -> bool {
        let current = &self.hard_state;
        hs.term != current.term
            || hs.vote != current.vote
            || (hs.commit != self.stored_commit && self.hard_state_stored_at.is_none_or(|at| at.elapsed() >= every))
    }

    /// Records that the hard state, with commit index `commit`, was just written.
    fn stored(&mut self, commit: u64) {
        self.hard_state_stored_at = Some(Instant::now());
        self.stored_commit = commit;
    }

    fn is_initialized(&self) -> bool {
        let cs = &self.conf_state;
        !cs.voters.is_empty() || !cs.learners.is_empty() || self.hard_state.term > 0
    }
}

/// A durable Raft log. Cloning is cheap and shares the environment and the cache.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

// Fields drop in order: the environment closes before the directory claim is released, so a
// reopen in this process cannot race with the close.
struct Inner {
    env: Env,
    entries: EntriesDb,
    meta: MetaDb,
    page_size: u64,
    state: RwLock<State>,
    /// See `COMMIT_STORE_EVERY` (tests shorten or lengthen it).
    commit_store_every: Mutex<Duration>,
    /// Raft asked for a snapshot the stored one cannot serve (too old, or taken before the
    /// recipient joined): the application should make a fresh one.
    snapshot_wanted: AtomicBool,
    /// Every commit flushes its pages before the meta page that points at them, also commits
    /// that need not be durable themselves (see `set_ordered_commits`).
    ordered_commits: AtomicBool,
    /// Commits made with LMDB's own flushes (for tests).
    durable_commits: AtomicU64,
    /// What the journal and its checkpoints cost (see `LogStats`); kept outside the tail's lock
    /// so reading them never waits for an append's flush.
    journal_bytes: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_micros: AtomicU64,
    /// The log's first and last index as `stats` last read them: what it answers while a commit
    /// holds the state (its flush can take long on a slow disk, and `stats` serves RAFT.INFO on
    /// Redis' main thread, which must not wait for a disk).
    seen_indexes: Mutex<(u64, u64)>,
    /// Entries appended since the last checkpoint, durable in the journal; see `crate::journal`.
    tail: Mutex<Tail>,
    claim: DirClaim,
}

impl Drop for Inner {
    /// heed keeps every environment it opens in a process-wide map and hands that one, with
    /// the files as they were when it was first opened, to any later open of the same path.
    /// Taken out of the map here, the environment closes with the store (before the claim on
    /// the directory goes), and a store opened later in the process reads the files as they
    /// are then: a test that puts an older copy of a node's dir in place must get that copy.
    fn drop(&mut self) {
        let _closing = self.env.clone().prepare_for_closing();
    }
}

/// The log past what LMDB holds: entries from `first` on, recorded in the journal. Stored
/// entries from `first` on, if any, are superseded (a new leader overwrote them).
struct Tail {
    journal: Journal,
    first: u64,
    entries: Vec<TailEntry>,
    /// When entries last moved into LMDB.
    checkpointed_at: Instant,
}

/// An entry of the tail with its stored form, sealed once for the journal record and reused
/// when a checkpoint moves the entry into LMDB.
struct TailEntry {
    entry: Entry,
    sealed: Sealed,
}

/// An entry's stored form (see `seal_into`); a cheap slice of the journal record it came in.
type Sealed = bytes::Bytes;

/// The journal's size. A checkpoint empties it when it is half full, every
/// `CHECKPOINT_EVERY`, or at `CHECKPOINT_ENTRIES` entries, whichever comes first.
const JOURNAL_BYTES: u64 = 8 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
const CHECKPOINT_ENTRIES: usize = 16_384;

/// Log directories with a live `LogStore` in this process. heed hands a second open of the same
/// path the same environment, and two stores over one environment would each trust their own
/// cached indexes while the other moves the log under them.
static OPEN_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

struct DirClaim(PathBuf);

impl DirClaim {
    fn new(path: PathBuf) -> Result<Self> {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        if open.contains(&path) {
            return Err(StorageError::AlreadyOpen(path));
        }
        open.push(path.clone());
        Ok(DirClaim(path))
    }
}

impl Drop for DirClaim {
    fn drop(&mut self) {
        OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner).retain(|p| *p != self.0);
    }
}

/// While alive, commits on this environment are synchronous (NO_SYNC cleared). Only the Raft
/// loop writes, so toggling the flag cannot race another writer.
struct DurableCommit<'a> {
    env: &'a heed::Env,
}

impl<'a> DurableCommit<'a> {
    fn begin(inner: &'a Inner) -> Result<Self> {
        unsafe { inner.env.set_flags(EnvFlags::NO_SYNC, heed::FlagSetMode::Disable)? };
        inner.durable_commits.fetch_add(1, Ordering::Relaxed);
        Ok(DurableCommit { env: &inner.env })
    }
}

impl Drop for DurableCommit<'_> {
    fn drop(&mut self) {
        if let Err(e) = unsafe { self.env.set_flags(EnvFlags::NO_SYNC, heed::FlagSetMode::Enable) } {
            log::error!("cannot restore NO_SYNC on the raft log: {e}");
        }
    }
}

impl LogStore {
    /// Opens (creating if needed) the log under `dir/raft-log/`.
    pub fn open(dir: &Path) -> Result<LogStore> {
        let path = dir.join(LOG_DIR);
        fs::create_dir_all(&path)?;
        let claim = DirClaim::new(path.canonicalize()?)?;

        let mut options = EnvOpenOptions::new();
        options.map_size(MAP_SIZE).max_dbs(2);
        // SAFETY: heed marks these flags unsafe because they weaken crash guarantees, not memory
        // safety in a running process. NO_SYNC: commits skip fsync; we fsync explicitly in
        // `sync` so the operator's durability level decides. (The price, per LMDB's docs: unless
        // the filesystem preserves write order, a power loss between fsyncs can corrupt the
        // environment, not merely lose the latest commits.)
        // NO_TLS: reader slots belong to transactions instead of threads. heed 0.20 only sets it
        // with its `read-txn-no-tls` feature, which we do not enable; without it LMDB forbids a
        // thread from holding a read and a write transaction at once.
        unsafe {
            options.flags(EnvFlags::NO_SYNC | EnvFlags::NO_TLS);
        }
        // SAFETY: the files under raft-log/ are only modified through LMDB, and `DirClaim` keeps
        // this process from mapping them through two stores.
        let env = unsafe { options.open(&path)? };

        let mut txn = env.write_txn()?;
        let entries: EntriesDb = env.create_database(&mut txn, Some("entries"))?;
        let meta: MetaDb = env.create_database(&mut txn, Some("meta"))?;
        let page_size = u64::from(entries.stat(&txn)?.page_size);
        let state = load_state(&txn, entries, meta)?;
        let absorbed = journal_absorbed(&txn, meta)?;
        txn.commit()?;
        let (mut journal, mut records) = Journal::open(&path.join("journal"), JOURNAL_BYTES)?;
        sync_new_directories(&path)?;
        if let Some(absorbed) = absorbed.filter(|absorbed| journal.generation() <= *absorbed) {
            // LMDB already holds these records: its checkpoint reached the disk and the journal's
            // next header did not (below durability high, where neither is flushed on its own,
            // a power loss can do that). Replayed, they would cut the log back to where they
            // end and bring back the term and vote they recorded.
            if !records.is_empty() {
                log::warn!(
                    "raft log: the journal's {} records (generation {}) are already in the stored log; not replaying them",
                    records.len(),
                    journal.generation()
                );
            }
            records.clear();
            journal.restart_past(absorbed)?;
        }

        let seen_indexes = (state.first_index(), state.last_index);
        let store = LogStore {
            inner: Arc::new(Inner {
                env,
                entries,
                meta,
                page_size,
                state: RwLock::new(state),
                commit_store_every: Mutex::new(COMMIT_STORE_EVERY),
                snapshot_wanted: AtomicBool::new(false),
                ordered_commits: AtomicBool::new(true),
                durable_commits: AtomicU64::new(0),
                journal_bytes: AtomicU64::new(0),
                checkpoints: AtomicU64::new(0),
                checkpoint_micros: AtomicU64::new(0),
                seen_indexes: Mutex::new(seen_indexes),
                tail: Mutex::new(Tail { journal, first: 0, entries: Vec::new(), checkpointed_at: Instant::now() }),
                claim,
            }),
        };
        store.replay(records)?;
        Ok(store)
    }

    /// At open: what the journal recorded since the last checkpoint, back in place and then
    /// moved into LMDB, so the store starts with an empty journal.
    fn replay(&self, records: Vec<Vec<u8>>) -> Result<()> {
        let mut tail = self.tail();
        let replayed = records.len();
        for record in records {
            let (mut entries, hs) = decode_record(&Sealed::from(record))?;
            // Entries below the log's start were applied and compacted since (possible only if a
            // power loss below durability high kept LMDB's compaction but not the journal's
            // restart): nothing to put back.
            let first_index = self.first_index();
            entries.retain(|e| e.entry.index >= first_index);
            self.check_append(entries.iter().map(|e| &e.entry))?;
            // LMDB may hold a newer commit index than the record (written alone since). Term and
            // vote change through the journal first, but LMDB takes them with any later commit:
            // should the journal have lost the record that changed them (a power loss below
            // durability high), LMDB's are the newer, and a term or vote must never go back.
            let hs = hs.map(|hs| {
                let stored = self.hard_state();
                let commit = hs.commit.max(stored.commit);
                match (stored.term, stored.vote != 0) > (hs.term, hs.vote != 0) {
                    true => HardState { commit, ..stored },
                    false => HardState { commit, ..hs },
                }
            });
            self.remember(&mut tail, entries, hs.as_ref(), hs.is_some());
        }
        if replayed > 0 {
            log::info!("raft log: replayed {replayed} journal records up to index {}", self.last_index());
        }
        self.checkpoint(&mut tail)?;
        // With durability below high the journal may have lost its last records while LMDB
        // kept a commit index beyond them; Raft refuses a commit index past the log.
        let mut state = self.inner.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.hard_state.commit > state.last_index {
            state.hard_state.commit = state.last_index;
        }
        // Likewise the entries a snapshot was taken at (the snapshot is LMDB's, the entries may
        // have been the journal's). The dataset is the snapshot's, and Raft cannot start a log
        // that ends before it.
        if state.snapshot_index > state.last_index {
            return Err(StorageError::Corrupt(format!(
                "the log ends at index {} but its snapshot was taken at index {}: a power loss below durability high lost entries the snapshot holds",
                state.last_index, state.snapshot_index
            )));
        }
        Ok(())
    }

    /// Where the log lives (`<dir>/raft-log`).
    pub fn path(&self) -> &Path {
        &self.inner.claim.0
    }

    /// Whether this node already belongs to a cluster: it knows a member or has seen a term.
    pub fn is_initialized(&self) -> bool {
        self.state().is_initialized()
    }

    /// Makes `snapshot` the starting point of a fresh log (a new cluster's first node, or a node
    /// given its initial configuration), with `meta` stored in the same commit, and fsyncs: a
    /// crash leaves all of it or none of it.
    pub fn bootstrap(&self, snapshot: Snapshot, meta: &[(&str, &[u8])]) -> Result<()> {
        let snapshot_meta = snapshot.metadata.as_ref().ok_or(StorageError::MissingSnapshotMetadata)?;
        if snapshot_meta.conf_state.as_ref().is_none_or(|cs| cs.voters.is_empty()) {
            return Err(StorageError::NoVoters);
        }
        self.write(|txn, state| {
            if state.is_initialized() {
                return Err(StorageError::AlreadyInitialized);
            }
            self.install_snapshot(txn, state, snapshot)?;
            self.put_metas_in(txn, meta)
        })?;
        self.sync()
    }

    /// Starts a fresh log with `first` (index 1), `hard_state` and `conf_state`, with `meta`
    /// stored in the same commit, and fsyncs: a crash leaves all of it or none of it. The entry
    /// goes straight to LMDB, not through the journal, so that it shares the commit.
    pub fn start_log(&self, first: &Entry, hard_state: &HardState, conf_state: &ConfState, meta: &[(&str, &[u8])]) -> Result<()> {
        if conf_state.voters.is_empty() {
            return Err(StorageError::NoVoters);
        }
        self.check_append(std::iter::once(first))?;
        let (_, mut sealed) = encode_record(std::slice::from_ref(first), None);
        let first_stored = TailEntry { entry: first.clone(), sealed: sealed.remove(0) };
        self.write(|txn, state| {
            if state.is_initialized() || state.last_index != 0 {
                return Err(StorageError::AlreadyInitialized);
            }
            self.put_entries(txn, std::slice::from_ref(&first_stored))?;
            self.put_message(txn, key::HARD_STATE, hard_state)?;
            self.put_message(txn, key::CONF_STATE, conf_state)?;
            self.put_metas_in(txn, meta)?;
            state.last_index = first.index;
            state.hard_state = hard_state.clone();
            state.conf_state = conf_state.clone();
            state.stored(hard_state.commit);
            Ok(())
        })?;
        self.sync()
    }

    /// Persists the entries and hard state of one Raft `Ready` in a single transaction, replacing
    /// any stored entries from `entries[0].index` on, then fsyncs if `sync`.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) -> Result<()> {
        if entries.is_empty() && hard_state.is_none() {
            if sync {
                self.sync()?;
            }
            return Ok(());
        }
        self.check_append(entries.iter())?;
        let mut tail = self.tail();
        // Entries always go to the journal; a hard state only when it must be stored (see
        // `State::must_store`), otherwise it waits for the next record or checkpoint.
        let record_hs = hard_state.filter(|hs| self.state().must_store(hs, self.commit_store_every()));
        let mut journalled = true;
        let mut sealed = Vec::new();
        if !entries.is_empty() || record_hs.is_some() {
            let record;
            (record, sealed) = encode_record(entries, record_hs);
            if !tail.journal.fits(record.len()) {
                self.checkpoint(&mut tail)?;
            }
            journalled = tail.journal.fits(record.len());
            if journalled {
                tail.journal.append(&record, sync)?;
                self.inner.journal_bytes.store(tail.journal.used(), Ordering::Relaxed);
            }
        }
        let entries = entries.iter().zip(sealed).map(|(entry, sealed)| TailEntry { entry: entry.clone(), sealed });
        self.remember(&mut tail, entries.collect(), hard_state, record_hs.is_some());
        if !journalled {
            // Larger than the whole journal: straight into LMDB, durably, by a checkpoint of a
            // tail that holds only this append.
            self.checkpoint_with(&mut tail, true)?;
        } else if tail.entries.len() >= CHECKPOINT_ENTRIES
            || tail.journal.used() >= JOURNAL_BYTES / 2
            || tail.checkpointed_at.elapsed() >= CHECKPOINT_EVERY
        {
            self.checkpoint(&mut tail)?;
        }
        Ok(())
    }

    /// Refuses entries that would not continue the log: before its first index, or past its end.
    fn check_append<'a>(&self, mut entries: impl Iterator<Item = &'a Entry>) -> Result<()> {
        let Some(first) = entries.next().map(|e| e.index) else { return Ok(()) };
        let mut previous = first;
        for entry in entries {
            if previous.checked_add(1) != Some(entry.index) {
                return Err(StorageError::NotConsecutive { previous, found: entry.index });
            }
            previous = entry.index;
        }
        let state = self.state();
        if first < state.first_index() {
            return Err(StorageError::Compacted { index: first, first_index: state.first_index() });
        }
        if first > state.last_index + 1 {
            return Err(StorageError::Gap { index: first, last_index: state.last_index });
        }
        Ok(())
    }

    /// Puts appended (or replayed) entries and hard state in place in memory. A new leader
    /// overwrites a suffix it disagrees with: everything from the first new index on is
    /// superseded, including entries past the new batch, in the tail and in LMDB alike.
    fn remember(&self, tail: &mut Tail, entries: Vec<TailEntry>, hs: Option<&HardState>, hs_recorded: bool) {
        let last = entries.last().map(|e| e.entry.index);
        if let Some(first) = entries.first().map(|e| e.entry.index) {
            if tail.entries.is_empty() || first < tail.first {
                tail.first = first;
                tail.entries.clear();
            } else {
                tail.entries.truncate((first - tail.first) as usize);
            }
            tail.entries.extend(entries);
        }
        let mut state = self.inner.state.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = last {
            state.last_index = last;
        }
        if let Some(hs) = hs {
            state.hard_state = hs.clone();
            if hs_recorded {
                state.stored(hs.commit);
            }
        }
    }

    /// Moves the tail into LMDB in one commit, with the newest hard state, then starts a new
    /// journal generation. With ordered commits (durability high) the commit is durable before
    /// the journal forgets; below high neither is flushed here, and the flush thread's `sync`
    /// bounds what a power loss can take.
    fn checkpoint(&self, tail: &mut Tail) -> Result<()> {
        self.checkpoint_with(tail, false)
    }

    /// `checkpoint`, durable before it returns with `sync` (or with ordered commits).
    fn checkpoint_with(&self, tail: &mut Tail, sync: bool) -> Result<()> {
        self.checkpoint_with_meta(tail, sync, &[])
    }

    /// `checkpoint_with`, storing `meta` in the same commit.
    fn checkpoint_with_meta(&self, tail: &mut Tail, sync: bool, meta: &[(&str, &[u8])]) -> Result<()> {
        if meta.is_empty() && tail.entries.is_empty() && tail.journal.used() == 0 {
            tail.checkpointed_at = Instant::now();
            return Ok(());
        }
        self.checkpoint_and(tail, sync, |txn, _| self.put_metas_in(txn, meta))
    }

    /// `checkpoint_with`, running `also` in the same commit (after the tail's entries are in
    /// place): what is derived from entries is never on disk without them.
    fn checkpoint_and(&self, tail: &mut Tail, sync: bool, also: impl FnOnce(&mut RwTxn, &mut State) -> Result<()>) -> Result<()> {
        let started = Instant::now();
        tail.checkpointed_at = started;
        if tail.entries.is_empty() && tail.journal.used() == 0 {
            return self.write_with(sync, also);
        }
        let generation = tail.journal.generation();
        // Records a flush made durable (medium's background flush, a vote) may be all that holds
        // an acknowledged entry or a vote: the journal forgets them only once LMDB holds them
        // durably. Otherwise the page writes of the unflushed LMDB commit and of the journal's
        // new generation reach the disk in any order, and a power loss could keep the second.
        let sync = sync || tail.journal.holds_flushed_records();
        self.write_with(sync, |txn, state| {
            self.put_entries(txn, &tail.entries)?;
            self.put_message(txn, key::HARD_STATE, &state.hard_state)?;
            self.inner.meta.put(txn, key::JOURNAL_ABSORBED, &generation.to_be_bytes())?;
            state.stored(state.hard_state.commit);
            also(txn, state)
        })?;
        tail.entries.clear();
        tail.journal.restart(self.flushes(sync))?;
        let inner = &self.inner;
        inner.journal_bytes.store(tail.journal.used(), Ordering::Relaxed);
        inner.checkpoints.fetch_add(1, Ordering::Release);
        inner.checkpoint_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Stores `entries` in place of everything from the first of them on.
    fn put_entries(&self, txn: &mut RwTxn, entries: &[TailEntry]) -> Result<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        self.inner.entries.delete_range(txn, &(first.entry.index..))?;
        // Every stored key is now below `first`: LMDB may append at the end of its last page
        // instead of searching the tree for each entry (and refuses, rather than misplaces, a
        // key that would not sort last).
        for e in entries {
            self.inner.entries.put_with_flags(txn, PutFlags::APPEND, &e.entry.index, &e.sealed)?;
        }
        Ok(())
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.inner.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_hard_state(&self, hs: &HardState, sync: bool) -> Result<()> {
        self.append(&[], Some(hs), sync)
    }

    /// Moves only the commit index of the hard state (Raft reports commit advances on their own).
    /// Written to disk at once with `sync`, otherwise at most every
    /// `COMMIT_STORE_EVERY` (or by `store_commit`): after a crash the stored one may be older,
    /// never newer, and Raft learns the rest from the leader again.
    pub fn set_commit(&self, commit: u64, sync: bool) -> Result<()> {
        {
            let mut state = self.inner.state.write().unwrap_or_else(PoisonError::into_inner);
            if state.hard_state.commit == commit && !sync {
                return Ok(());
            }
            let hs = HardState { commit, ..state.hard_state.clone() };
            if !sync && !state.must_store(&hs, self.commit_store_every()) {
                state.hard_state = hs;
                return Ok(());
            }
        }
        if sync {
            // All of it durable: LMDB must hold the entries it covers (see `write_commit`).
            self.checkpoint(&mut self.tail())?;
        }
        self.write_commit(commit)?;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// The commit index last written (to the journal or LMDB): what a restart after a crash
    /// starts from.
    pub fn stored_commit(&self) -> u64 {
        self.state().stored_commit
    }

    /// Writes the newest commit index now (fsynced only with ordered commits), e.g. before a
    /// clean shutdown. A checkpoint first, so that LMDB holds every entry it covers.
    pub fn store_commit(&self) -> Result<()> {
        self.checkpoint(&mut self.tail())?;
        self.write_commit(self.hard_state().commit)
    }

    /// Writes the commit index if it moved since it was last written and `COMMIT_STORE_EVERY`
    /// has passed; returns whether it did. Called on every tick: the last advance before the
    /// cluster goes quiet is otherwise never written, and a node restarted after it would apply
    /// nothing of its own log until the leader spoke (serving an empty dataset at consistency
    /// low). It goes into the journal, unflushed: it survives the process, and the next
    /// durable append flushes it with everything before it; nothing depends on it surviving the
    /// machine.
    pub fn store_commit_if_behind(&self) -> Result<bool> {
        let (hs, stored) = {
            let state = self.state();
            (state.hard_state.clone(), state.stored_commit)
        };
        // An append of the hard state alone records it when `State::must_store` says it is due.
        self.append(&[], Some(&hs), false)?;
        Ok(self.state().stored_commit != stored)
    }

    /// Writes the commit index into LMDB alone, as far as LMDB's own entries reach: from the
    /// tail's first index on, they are stale (a new leader replaced them) or missing until the
    /// next checkpoint. Below durability high a power loss can keep this commit and lose the
    /// journal's records, and a commit index over the stale entries would have the node apply
    /// entries the cluster never committed. The rest is written by that checkpoint.
    fn write_commit(&self, commit: u64) -> Result<()> {
        let tail = self.tail();
        let lmdb_current = if tail.entries.is_empty() { u64::MAX } else { tail.first - 1 };
        let stored = commit.min(lmdb_current);
        self.write(|txn, state| {
            state.hard_state.commit = commit;
            state.stored(stored);
            self.put_message(txn, key::HARD_STATE, &HardState { commit: stored, ..state.hard_state.clone() })
        })
    }

    fn commit_store_every(&self) -> Duration {
        *self.inner.commit_store_every.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn set_commit_store_every(&self, every: Duration) {
        *self.inner.commit_store_every.lock().unwrap_or_else(PoisonError::into_inner) = every;
    }

    /// Records the configuration the application has applied. Fsynced only with ordered commits
    /// (`set_ordered_commits`); otherwise durable with the next synced write or `sync`.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<()> {
        self.write(|txn, state| {
            self.put_message(txn, key::CONF_STATE, cs)?;
            state.conf_state = cs.clone();
            Ok(())
        })
    }

    /// Replaces the whole log with a snapshot received from the leader: entries are dropped, the
    /// log restarts after the snapshot's index, and the configuration is the snapshot's.
    ///
    /// `meta` is stored in the same commit: what the node derives from the snapshot (its
    /// membership) must never be on disk without the snapshot itself, nor the reverse.
    pub fn apply_snapshot(&self, snapshot: Snapshot, meta: &[(&str, &[u8])], sync: bool) -> Result<()> {
        // The journal starts a new generation first: none of its records may be replayed onto
        // the log that replaces them.
        self.checkpoint(&mut self.tail())?;
        let index = snapshot.metadata.as_ref().ok_or(StorageError::MissingSnapshotMetadata)?.index;
        self.write(|txn, state| {
            // Same rule as raft's MemStorage: a snapshot must reach at least our first entry,
            // otherwise it would move the log backwards over entries we already compacted.
            if index < state.first_index() {
                return Err(StorageError::SnapshotOutOfDate { index, min_index: state.first_index() });
            }
            self.install_snapshot(txn, state, snapshot)?;
            self.put_metas_in(txn, meta)
        })?;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Discards entries before `compact_index`. The stored snapshot must already cover
    /// `compact_index - 1` (see `set_snapshot`): it is what a follower needing those entries
    /// receives instead.
    pub fn compact(&self, compact_index: u64) -> Result<()> {
        // Compaction works on LMDB alone, and no journal record may reach below it afterwards.
        self.checkpoint(&mut self.tail())?;
        self.write(|txn, state| {
            if compact_index <= state.first_index() {
                return Ok(());
            }
            let new_truncated = compact_index - 1;
            if new_truncated > state.last_index {
                return Err(StorageError::Unavailable { index: new_truncated, last_index: state.last_index });
            }
            if new_truncated > state.snapshot_index {
                return Err(StorageError::CompactBeyondSnapshot { compact_index, snapshot_index: state.snapshot_index });
            }
            let term = self.stored_term(txn, new_truncated)?;
            self.inner.entries.delete_range(txn, &(..compact_index))?;
            self.put_truncated(txn, new_truncated, term)?;
            state.truncated_index = new_truncated;
            state.truncated_term = term;
            Ok(())
        })
    }

    /// The first index of the longest run of entries ending at `last` that starts at `floor` or
    /// later and weighs at most `budget` bytes as stored; `last + 1` if even entry `last` weighs
    /// more. Reads only the stored lengths, not the entries.
    pub fn start_within_bytes(&self, floor: u64, last: u64, budget: u64) -> Result<u64> {
        // It reads stored lengths: the tail must be in LMDB first.
        self.checkpoint(&mut self.tail())?;
        let floor = floor.max(self.first_index());
        if floor > last {
            return Ok(last + 1);
        }
        let txn = self.inner.env.read_txn()?;
        let mut start = last + 1;
        let mut weight = 0u64;
        for stored in self.inner.entries.rev_range(&txn, &(floor..=last))? {
            let (index, bytes) = stored?;
            weight = weight.saturating_add(bytes.len() as u64);
            if weight > budget {
                break;
            }
            start = index;
        }
        Ok(start)
    }

    /// Stores a newer snapshot made by the application, leaving the log alone. Not fsynced on its
    /// own unless commits are ordered (`set_ordered_commits`). A later `compact` relies on it:
    /// LMDB commits take effect in order (across a power loss, only ordered ones). Stored in one
    /// commit with the journal's entries: below durability high a snapshot record that outlived
    /// the entries it was taken at (a power loss) would leave a log that ends before its
    /// snapshot, or a commit index over entries a new leader had replaced.
    pub fn set_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let meta = snapshot.metadata.as_ref().ok_or(StorageError::MissingSnapshotMetadata)?;
        self.checkpoint_and(&mut self.tail(), false, |txn, state| {
            if meta.index < state.snapshot_index {
                return Err(StorageError::SnapshotOutOfDate { index: meta.index, min_index: state.snapshot_index });
            }
            // The application can only snapshot what it applied, which the log must contain.
            if meta.index > state.last_index {
                return Err(StorageError::Unavailable { index: meta.index, last_index: state.last_index });
            }
            self.put_message(txn, key::SNAPSHOT_META, meta)?;
            self.inner.meta.put(txn, key::SNAPSHOT_DATA, &snapshot.data)?;
            state.snapshot_index = meta.index;
            Ok(())
        })
    }

    /// True once after raft wanted a snapshot the stored one could not serve.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.inner.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// Flushes everything written so far to disk: LMDB, then the journal, with no checkpoint
    /// in between. Below durability high this is the only flush, and a power loss between the
    /// two must not find the journal ahead of LMDB: a journal generation flushed after a
    /// checkpoint whose LMDB commit was not would leave a hole at open, and the node would not
    /// start. The other way round, an older generation is replayed over a log that already
    /// holds its entries.
    ///
    /// LMDB's flush can take milliseconds, and under the tail lock it stalled every append
    /// behind it, so only the journal's flush is made under the lock. That is enough when no
    /// checkpoint ended between the two flushes: every checkpoint counted before LMDB's flush
    /// had committed by then, so the flush covered it, and the journal's generation is the one
    /// that checkpoint started. When one did end in between, LMDB is flushed again, and after
    /// a few such misses both are flushed under the lock.
    ///
    /// A failed flush, of either, leaves the journal failed: the next append fails and the node
    /// stops, rather than acknowledge writes on a disk that may have lost earlier ones.
    pub fn sync(&self) -> Result<()> {
        let flushed = self.sync_both();
        if flushed.is_err() {
            self.tail().journal.fail();
        }
        flushed
    }

    fn sync_both(&self) -> Result<()> {
        // A checkpoint counts itself after its LMDB commit and its journal restart.
        let mut checkpoints = self.inner.checkpoints.load(Ordering::Acquire);
        for _ in 0..3 {
            self.inner.env.force_sync()?;
            let mut tail = self.tail();
            let now = self.inner.checkpoints.load(Ordering::Acquire);
            if now == checkpoints {
                tail.journal.sync()?;
                return Ok(());
            }
            checkpoints = now;
        }
        let mut tail = self.tail();
        self.inner.env.force_sync()?;
        tail.journal.sync()?;
        Ok(())
    }

    /// Stores an application blob. Durable like `set_conf_state`.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.put_metas(&[(key, value)])
    }

    /// Stores several values in one commit with every entry the log holds: for what is derived
    /// from entries (the membership they applied), which must never be on disk without them.
    /// Below durability high the journal's records and LMDB's commits reach the disk in no set
    /// order, and a value stored alone could outlive the entries it was derived from.
    pub fn put_metas_with_log(&self, pairs: &[(&str, &[u8])]) -> Result<()> {
        self.checkpoint_with_meta(&mut self.tail(), false, pairs)
    }

    /// Stores several values in one commit: all of them or none survive a crash.
    pub fn put_metas(&self, pairs: &[(&str, &[u8])]) -> Result<()> {
        // No cached state changes, so no need for the state lock; LMDB serializes writers.
        let _durable = self.durable_if(false)?;
        let mut txn = self.inner.env.write_txn()?;
        self.put_metas_in(&mut txn, pairs)?;
        txn.commit()?;
        Ok(())
    }

    fn put_metas_in(&self, txn: &mut RwTxn, pairs: &[(&str, &[u8])]) -> Result<()> {
        for (key, value) in pairs {
            self.inner.meta.put(txn, &app_key(key), value)?;
        }
        Ok(())
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.inner.env.read_txn()?;
        Ok(self.inner.meta.get(&txn, &app_key(key))?.map(<[u8]>::to_vec))
    }

    pub fn hard_state(&self) -> HardState {
        self.state().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.state().conf_state.clone()
    }

    pub fn first_index(&self) -> u64 {
        self.state().first_index()
    }

    pub fn last_index(&self) -> u64 {
        self.state().last_index
    }

    pub fn stats(&self) -> LogStats {
        let mut seen = self.inner.seen_indexes.lock().unwrap_or_else(PoisonError::into_inner);
        let (first_index, last_index) = match self.inner.state.try_read() {
            Ok(state) => {
                *seen = (state.first_index(), state.last_index);
                *seen
            }
            Err(TryLockError::Poisoned(state)) => (state.get_ref().first_index(), state.get_ref().last_index),
            Err(TryLockError::WouldBlock) => *seen,
        };
        drop(seen);
        let pages = self.inner.env.info().last_page_number as u64 + 1;
        LogStats {
            first_index,
            last_index,
            entries: last_index + 1 - first_index,
            size_bytes: pages * self.inner.page_size,
            journal_bytes: self.inner.journal_bytes.load(Ordering::Relaxed),
            checkpoints: self.inner.checkpoints.load(Ordering::Relaxed),
            checkpoint_micros: self.inner.checkpoint_micros.load(Ordering::Relaxed),
        }
    }

    /// With durability high, every commit is made the way LMDB makes a durable one: its pages
    /// flushed, then the meta page that points at them. Commits that need not be durable (the
    /// commit index, membership, compaction, snapshot records) would otherwise leave a window,
    /// until the next durable commit, in which a power loss could persist a meta page without
    /// the pages it points at and damage the log. They are rare, so flushing them costs little.
    /// Without it (durability medium and low) only `sync` commits are flushed.
    ///
    /// Turning it on (durability raised to high) first flushes everything: a journal flush
    /// must never reach the disk ahead of the LMDB commits before it (a checkpoint's entries,
    /// behind the journal generation it started), or a power cut would leave a gap in the log.
    pub fn set_ordered_commits(&self, ordered: bool) -> Result<()> {
        let was = self.inner.ordered_commits.swap(ordered, Ordering::AcqRel);
        if ordered && !was {
            self.sync()?;
        }
        Ok(())
    }

    /// Whether a write is flushed before it returns: asked to (`sync`), or commits are ordered.
    fn flushes(&self, sync: bool) -> bool {
        sync || self.inner.ordered_commits.load(Ordering::Relaxed)
    }

    fn durable_if(&self, sync: bool) -> Result<Option<DurableCommit<'_>>> {
        if self.flushes(sync) {
            Ok(Some(DurableCommit::begin(&self.inner)?))
        } else {
            Ok(None)
        }
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        // Writers publish the state only after a successful commit and never panic in between,
        // so a poisoned lock still guards a consistent state.
        self.inner.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one write transaction against a copy of the cached state and publishes the
    /// copy only once the transaction has committed, so a failed write leaves cache and disk
    /// agreeing.
    fn write<T>(&self, f: impl FnOnce(&mut RwTxn, &mut State) -> Result<T>) -> Result<T> {
        self.write_with(false, f)
    }

    /// `write`, durable before it returns with `sync` (or with ordered commits).
    fn write_with<T>(&self, sync: bool, f: impl FnOnce(&mut RwTxn, &mut State) -> Result<T>) -> Result<T> {
        let _durable = self.durable_if(sync)?;
        let mut state = self.inner.state.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = state.clone();
        let mut txn = self.inner.env.write_txn()?;
        let out = f(&mut txn, &mut next)?;
        txn.commit()?;
        *state = next;
        Ok(out)
    }

    /// Resets the log to start right after the snapshot. Callers check that this is allowed.
    fn install_snapshot(&self, txn: &mut RwTxn, state: &mut State, snapshot: Snapshot) -> Result<()> {
        let Snapshot { data, metadata } = snapshot;
        let meta = metadata.ok_or(StorageError::MissingSnapshotMetadata)?;

        self.inner.entries.clear(txn)?;
        state.truncated_index = meta.index;
        state.truncated_term = meta.term;
        state.last_index = meta.index;
        state.snapshot_index = meta.index;
        state.hard_state.term = cmp::max(state.hard_state.term, meta.term);
        state.hard_state.commit = meta.index;
        state.stored(meta.index);
        state.conf_state = meta.conf_state.clone().unwrap_or_default();

        self.put_message(txn, key::SNAPSHOT_META, &meta)?;
        self.inner.meta.put(txn, key::SNAPSHOT_DATA, &data)?;
        self.put_truncated(txn, meta.index, meta.term)?;
        self.put_message(txn, key::HARD_STATE, &state.hard_state)?;
        self.put_message(txn, key::CONF_STATE, &state.conf_state)
    }

    fn put_message(&self, txn: &mut RwTxn, key: &str, message: &impl Message) -> Result<()> {
        self.inner.meta.put(txn, key, &message.encode_to_vec())?;
        Ok(())
    }

    fn put_truncated(&self, txn: &mut RwTxn, index: u64, term: u64) -> Result<()> {
        self.put_message(txn, key::TRUNCATED, &LogPosition { index, term })
    }

    fn stored_term(&self, txn: &RoTxn, index: u64) -> Result<u64> {
        let bytes = self.inner.entries.get(txn, &index)?.ok_or_else(|| missing_entry(index))?;
        Ok(EntryTerm::decode(unseal(index, bytes)?)?.term)
    }
}

/// The journal generation the stored log absorbed last (none in a log written before it was
/// recorded).
fn journal_absorbed(txn: &RoTxn, meta: MetaDb) -> Result<Option<u64>> {
    let Some(bytes) = meta.get(txn, key::JOURNAL_ABSORBED)? else { return Ok(None) };
    let bytes: [u8; 8] =
        bytes.try_into().map_err(|_| StorageError::Corrupt(format!("{} holds {} bytes, not 8", key::JOURNAL_ABSORBED, bytes.len())))?;
    Ok(Some(u64::from_be_bytes(bytes)))
}

fn load_state(txn: &RoTxn, entries: EntriesDb, meta: MetaDb) -> Result<State> {
    let hard_state = decode_meta::<HardState>(txn, meta, key::HARD_STATE)?.unwrap_or_default();
    let conf_state = decode_meta::<ConfState>(txn, meta, key::CONF_STATE)?.unwrap_or_default();
    let snapshot_index = decode_meta::<SnapshotMetadata>(txn, meta, key::SNAPSHOT_META)?.map_or(0, |m| m.index);
    let truncated = decode_meta::<LogPosition>(txn, meta, key::TRUNCATED)?.unwrap_or_default();
    let (truncated_index, truncated_term) = (truncated.index, truncated.term);

    // The stored entries must be exactly truncated_index+1 ..= last: anything else means the
    // file was damaged, and guessing would hand Raft a log it never wrote.
    let keys = entries.remap_data_type::<DecodeIgnore>();
    let last_index = match (keys.first(txn)?, keys.last(txn)?) {
        (Some((first, ())), Some((last, ()))) => {
            if first != truncated_index + 1 {
                return Err(StorageError::Corrupt(format!("first entry is {first}, expected {} after truncation", truncated_index + 1)));
            }
            let count = entries.len(txn)?;
            if count != last - first + 1 {
                return Err(StorageError::Corrupt(format!("{count} entries stored between indexes {first} and {last}")));
            }
            // Every entry's checksum, once, at open: a damaged log stops the node here rather
            // than in the middle of a replay.
            for item in entries.iter(txn)? {
                let (index, bytes) = item?;
                unseal(index, bytes)?;
            }
            last
        }
        _ => truncated_index,
    };

    // The commit index is written lazily (see `COMMIT_STORE_EVERY`) and may trail compaction
    // and the snapshot: both hold only applied entries, so everything up to them was committed.
    // Behind the snapshot, Raft would refuse to start (a node resumes at the snapshot's index,
    // and nothing may be applied past the commit index); a kill -9 between a snapshot and the
    // next write of the commit index left such a log.
    let mut hard_state = hard_state;
    hard_state.commit = hard_state.commit.max(truncated_index).max(snapshot_index);
    Ok(State {
        stored_commit: hard_state.commit,
        hard_state,
        conf_state,
        snapshot_index,
        truncated_index,
        truncated_term,
        last_index,
        hard_state_stored_at: None,
    })
}

fn decode_meta<M: Message + Default>(txn: &RoTxn, meta: MetaDb, key: &str) -> Result<Option<M>> {
    Ok(meta.get(txn, key)?.map(M::decode).transpose()?)
}

fn app_key(key: &str) -> String {
    format!("{}{key}", key::APP_PREFIX)
}

fn missing_entry(index: u64) -> StorageError {
    StorageError::Corrupt(format!("entry {index} is missing from the log"))
}

/// Fsyncs the log's directory and the two above it (the node's dir and where it was made): an
/// fsync of a new file makes its data durable, not the directory entries that lead to it, and a
/// power loss soon after the first start must not take the whole log (votes and acknowledged
/// entries) with it. Cheap, and done at every open rather than remembering which ones are new.
fn sync_new_directories(log_dir: &Path) -> Result<()> {
    for dir in log_dir.ancestors().take(3) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
