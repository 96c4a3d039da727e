//! The snapshot file: the Redis dataset at one exact log index, written key by key by the
//! module's forked child and read back with RESTORE. It is also shipped to followers in chunks,
//! so its integrity is checked end to end (one CRC32 over the whole file) before a single record
//! is handed out: a node must refuse bad data rather than serve it.
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! "RAFTISSN"  version u32 (=2)
//! header:   index u64 | term u64 | conf_state: len u32 + prost bytes | members: len u32 + JSON
//! functions: len u32 + Redis' `FUNCTION DUMP` payload (empty: none)     (version 2 on)
//! records:  0x01 | db u32 | key: len u32 + bytes | expire_at_ms i64 | payload: len u32 + bytes
//! trailer:  0xFF | record count u64 | CRC32 u32 of every byte before it
//! ```
//!
//! Every record starts with a tag byte so the reader can tell the trailer from another record
//! without knowing the count in advance (the writer streams and only knows it at the end).
//!
//! Files in a node's directory:
//! - `snapshot-<index, 20 digits>-<term>.rsnap`: complete. Only ever created by a rename after
//!   the data is fsynced, so the final name alone means "complete".
//! - `….rsnap.tmp`: being written by [`SnapshotWriter`] (perhaps by a live child process).
//! - `….rsnap.part` and `….rsnap.part.info`: a download from another node, resumable.
//!
//! Beside this file: `files` (names and clean-up), `writing`, `reading` and `transfer` (chunks
//! between nodes).

use crate::ids::{LogIndex, Term};
use crate::membership::Members;
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

mod files;
mod reading;
#[cfg(test)]
mod tests;
mod transfer;
mod writing;

use files::with_suffix;
pub use files::{latest, remove_leftovers, remove_older_than, snapshot_path, sync_dir_of, temp_path};
pub use reading::{read_meta, verify, SnapshotReader};
pub use transfer::{read_chunk, IncomingSnapshot};
pub use writing::SnapshotWriter;

const MAGIC: &[u8; 8] = b"RAFTISSN";
/// Version 2 added the function libraries; version 1 files (none) are still read.
const VERSION: u32 = 2;
const OLDEST_READABLE: u32 = 1;
const TAG_RECORD: u8 = 0x01;
const TAG_TRAILER: u8 = 0xFF;
/// Bound on any one length-prefixed field. Lengths come from the file, so until the checksum
/// has been checked they are untrusted: a bigger one means damage, not a huge value, and is
/// refused instead of being allowed to drive an allocation. (Redis keys and strings are capped
/// at 512 MiB too; a DUMP of a collection bigger than this cannot be snapshotted.)
pub const MAX_FIELD: usize = 512 * 1024 * 1024;
/// Fields are read in steps of at most this much, so even a within-bound length only costs
/// memory for bytes that are really in the file.
const READ_STEP: usize = 64 * 1024;
const IO_BUFFER: usize = 1 << 20;
const EXTENSION: &str = "rsnap";

#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotMeta {
    pub index: LogIndex,
    pub term: Term,
    pub conf_state: ConfState,
    pub members: Members,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub db: u32,
    pub key: Vec<u8>,
    /// Absolute milliseconds since the epoch, or -1 for no expiry. Absolute, so that a snapshot
    /// loaded later does not extend the life of a key.
    pub expire_at_ms: i64,
    /// The key's Redis `DUMP` payload.
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub path: PathBuf,
    pub size: u64,
    pub records: u64,
    pub checksum: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("not a Raftis snapshot file (bad magic)")]
    BadMagic,
    #[error("unsupported snapshot format version {0} (this build reads versions {OLDEST_READABLE} to {VERSION})")]
    UnsupportedVersion(u32),
    #[error("snapshot file is truncated")]
    Truncated,
    #[error("snapshot file is corrupt: {0}")]
    Corrupt(String),
    /// The writer was handed a record the format cannot carry.
    #[error("snapshot record {field} of {len} bytes is over the {MAX_FIELD}-byte field limit")]
    FieldTooLarge { field: &'static str, len: usize },
    /// An incoming chunk that does not continue the transfer where it stands.
    #[error("snapshot chunk at offset {got}, expected one at offset {expected}")]
    UnexpectedOffset { expected: u64, got: u64 },
    /// An incoming transfer whose bytes do not add up to the announced size.
    #[error("snapshot transfer of {actual} bytes, the sender announced {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
}

type Result<T> = std::result::Result<T, SnapshotError>;
