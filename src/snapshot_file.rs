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

use crate::ids::{LogIndex, Term};
use crate::membership::Members;
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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

// ---------------------------------------------------------------------------------------------
// Names and housekeeping

pub fn snapshot_path(dir: &Path, index: LogIndex, term: Term) -> PathBuf {
    dir.join(format!("snapshot-{:020}-{}.{EXTENSION}", index.get(), term.get()))
}

/// What a file in a snapshot directory is, judged by its name alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Complete,
    Tmp,
    Part,
    PartInfo,
}

/// `(kind, index, term)` of one of our file names; `None` for anything else.
fn parse_name(name: &str) -> Option<(Kind, u64, u64)> {
    let rest = name.strip_prefix("snapshot-")?;
    let (stem, kind) = if let Some(s) = rest.strip_suffix(".rsnap") {
        (s, Kind::Complete)
    } else if let Some(s) = rest.strip_suffix(".rsnap.tmp") {
        (s, Kind::Tmp)
    } else if let Some(s) = rest.strip_suffix(".rsnap.part") {
        (s, Kind::Part)
    } else if let Some(s) = rest.strip_suffix(".rsnap.part.info") {
        (s, Kind::PartInfo)
    } else {
        return None;
    };
    let (index, term) = stem.split_once('-')?;
    let number = |s: &str| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { s.parse().ok() } else { None };
    Some((kind, number(index)?, number(term)?))
}

fn parse_path(path: &Path) -> Option<(Kind, u64, u64)> {
    parse_name(path.file_name()?.to_str()?)
}

/// Our files in `dir`, with what their names say.
fn listing(dir: &Path) -> io::Result<Vec<(PathBuf, Kind, u64, u64)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some((kind, index, term)) = parse_path(&path) {
            out.push((path, kind, index, term));
        }
    }
    Ok(out)
}

/// The complete snapshot file with the highest index in `dir` (the higher term on a tie), or
/// `None` if there is none or `dir` does not exist. Files being written (`.tmp`) or downloaded
/// (`.part`) never count: only a finished file gets the final name. Contents are not verified
/// here; that is [`verify`]'s job and reads the whole file.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let files = match listing(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(files
        .into_iter()
        .filter(|(_, kind, _, _)| *kind == Kind::Complete)
        .max_by_key(|(_, _, index, term)| (*index, *term))
        .map(|(path, _, _, _)| path))
}

/// Deletes what `keep` (a complete snapshot in `dir`) makes useless, and returns how many files
/// went:
/// - complete snapshots at a lower index, or at the same index under another name;
/// - `.tmp` writes and `.part`/`.part.info` downloads at an index up to `keep`'s. Raft never
///   goes back to an older snapshot, so these can never be used; if a writer or a download is
///   still at work on one, its final rename fails and it reports an error, losing nothing.
///
/// Anything at a higher index stays: that may be a snapshot a child process has just finished
/// (and is about to be recorded), a live writer's `.tmp`, or a download in flight.
/// `keep` must carry a name from [`snapshot_path`]; otherwise nothing is deleted (`InvalidInput`).
pub fn remove_older_than(dir: &Path, keep: &Path) -> io::Result<usize> {
    let keep_name = keep.file_name();
    let Some((Kind::Complete, keep_index, _)) = parse_path(keep) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a snapshot file name; refusing to clean up around it", keep.display()),
        ));
    };
    let mut removed = 0;
    for (path, kind, index, _) in listing(dir)? {
        let stale = match kind {
            Kind::Complete => index < keep_index || (index == keep_index && path.file_name() != keep_name),
            Kind::Tmp | Kind::Part | Kind::PartInfo => index <= keep_index,
        };
        if stale {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                // Someone else (a finishing writer's rename, a concurrent cleanup) got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// At start-up, before any snapshot is being written: half-written files of a crashed writer.
/// Downloads (`.part`) stay, they resume.
pub fn remove_leftovers(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for (path, kind, _, _) in listing(dir)? {
        if kind == Kind::Tmp {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A rename is only durable once the directory itself is synced.
fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes bytes while keeping the running CRC and size, so the trailer needs no second pass.
struct HashingWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.size += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    /// A length-prefixed field; the caller has checked the length against [`MAX_FIELD`].
    fn put_field(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(&(bytes.len() as u32).to_be_bytes())?;
        self.put(bytes)
    }
}

fn check_field(field: &'static str, bytes: &[u8]) -> Result<()> {
    if bytes.len() > MAX_FIELD {
        return Err(SnapshotError::FieldTooLarge { field, len: bytes.len() });
    }
    Ok(())
}

/// Streams a snapshot into `<path>.tmp`; [`SnapshotWriter::finish`] seals it and gives it the
/// final name. Dropped unfinished (an error half-way, a failed child), it deletes its `.tmp`.
pub struct SnapshotWriter {
    /// `None` once sealed or handed back.
    out: Option<HashingWriter<BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
    records: u64,
    /// A write failed part-way: the stream no longer matches its CRC, so it must not be sealed.
    failed: bool,
}

impl SnapshotWriter {
    /// `functions` is the dataset's function libraries as Redis' `FUNCTION DUMP` gives them
    /// (empty for none); they are not keys, so they travel beside them.
    pub fn create(path: &Path, meta: &SnapshotMeta, functions: &[u8]) -> Result<Self> {
        let conf_state = meta.conf_state.encode_to_vec();
        let members = serde_json::to_vec(&meta.members)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot encode the members: {e}")))?;
        check_field("conf_state", &conf_state)?;
        check_field("members", &members)?;
        check_field("functions", functions)?;

        let tmp = with_suffix(path, ".tmp");
        // Truncates a leftover of an earlier, crashed attempt at the same snapshot.
        let file = File::create(&tmp)?;
        let out = HashingWriter { inner: BufWriter::with_capacity(IO_BUFFER, file), crc: crc32fast::Hasher::new(), size: 0 };
        // Built before the header is written so that Drop removes the .tmp if that fails.
        let mut w = SnapshotWriter { out: Some(out), tmp, path: path.to_path_buf(), records: 0, failed: false };
        w.write(|out| {
            out.put(MAGIC)?;
            out.put(&VERSION.to_be_bytes())?;
            out.put(&meta.index.get().to_be_bytes())?;
            out.put(&meta.term.get().to_be_bytes())?;
            out.put_field(&conf_state)?;
            out.put_field(&members)?;
            out.put_field(functions)
        })?;
        Ok(w)
    }

    pub fn add(&mut self, rec: &Record) -> Result<()> {
        // Checked before anything is written: a refused record leaves the stream intact.
        check_field("key", &rec.key)?;
        check_field("payload", &rec.payload)?;
        self.write(|out| {
            out.put(&[TAG_RECORD])?;
            out.put(&rec.db.to_be_bytes())?;
            out.put_field(&rec.key)?;
            out.put(&rec.expire_at_ms.to_be_bytes())?;
            out.put_field(&rec.payload)
        })?;
        self.records += 1;
        Ok(())
    }

    fn write(&mut self, f: impl FnOnce(&mut HashingWriter<BufWriter<File>>) -> io::Result<()>) -> Result<()> {
        if self.failed {
            return Err(earlier_failure());
        }
        let Some(out) = self.out.as_mut() else { return Err(earlier_failure()) };
        f(out).map_err(|e| {
            self.failed = true;
            SnapshotError::Io(e)
        })
    }

    /// Seals the file (trailer and checksum), makes it durable, gives it its final name and
    /// makes that durable too. On error the `.tmp` is removed and no final file appears (unless
    /// only the final directory sync failed).
    pub fn finish(mut self) -> Result<SnapshotSummary> {
        if self.failed {
            return Err(earlier_failure()); // Drop removes the .tmp
        }
        let Some(out) = self.out.take() else { return Err(earlier_failure()) };
        let sealed = Self::seal(out, self.records, &self.tmp, &self.path);
        if sealed.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        let (size, checksum) = sealed?;
        Ok(SnapshotSummary { path: self.path.clone(), size, records: self.records, checksum })
    }

    fn seal(mut out: HashingWriter<BufWriter<File>>, records: u64, tmp: &Path, path: &Path) -> Result<(u64, u32)> {
        out.put(&[TAG_TRAILER])?;
        out.put(&records.to_be_bytes())?;
        let checksum = out.crc.clone().finalize();
        // The CRC itself is outside what it covers, so it bypasses the hasher.
        out.inner.write_all(&checksum.to_be_bytes())?;
        let size = out.size + 4;
        let file = out.inner.into_inner().map_err(|e| SnapshotError::Io(e.into_error()))?;
        file.sync_all()?;
        drop(file);
        fs::rename(tmp, path)?;
        sync_dir_of(path)?;
        Ok((size, checksum))
    }
}

fn earlier_failure() -> SnapshotError {
    SnapshotError::Io(io::Error::other("an earlier write to this snapshot failed; it cannot be completed"))
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            // Discard the buffer rather than flush it into a file that is about to go.
            let _ = out.inner.into_parts();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Reads the file while keeping the running CRC and position (for error messages).
struct HashingReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    pos: u64,
}

fn eof_is_truncation(e: io::Error) -> SnapshotError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotError::Truncated
    } else {
        SnapshotError::Io(e)
    }
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader { inner, crc: crc32fast::Hasher::new(), pos: 0 }
    }

    /// Fills as much of `buf` as the file has; returns how much that was.
    fn fill_up_to(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.crc.update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    fn exact<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(eof_is_truncation)?;
        self.crc.update(&buf);
        self.pos += N as u64;
        Ok(buf)
    }

    fn u8(&mut self) -> Result<u8> {
        let [b] = self.exact::<1>()?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        self.exact().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.exact().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64> {
        self.exact().map(i64::from_be_bytes)
    }

    /// A field's length prefix, refused if over the bound.
    fn field_len(&mut self, what: &str) -> Result<usize> {
        let at = self.pos;
        let len = self.u32()? as usize;
        if len > MAX_FIELD {
            return Err(SnapshotError::Corrupt(format!("{what} length {len} at offset {at} is over the {MAX_FIELD}-byte limit")));
        }
        Ok(len)
    }

    /// A length-prefixed field. Memory grows with the bytes actually read, never with the
    /// length the file claims.
    fn field(&mut self, what: &str) -> Result<Vec<u8>> {
        let len = self.field_len(what)?;
        let mut buf = Vec::with_capacity(len.min(READ_STEP));
        while buf.len() < len {
            let start = buf.len();
            let step = (len - start).min(READ_STEP);
            buf.resize(start + step, 0);
            let got = self.fill_up_to(&mut buf[start..])?;
            if got < step {
                return Err(SnapshotError::Truncated);
            }
        }
        Ok(buf)
    }

    /// A length-prefixed field that is only checksummed, not kept ([`verify`] needs no copies).
    fn skip_field(&mut self, what: &str) -> Result<()> {
        let mut left = self.field_len(what)?;
        let mut scratch = [0u8; 8192];
        while left > 0 {
            let step = left.min(scratch.len());
            if self.fill_up_to(&mut scratch[..step])? < step {
                return Err(SnapshotError::Truncated);
            }
            left -= step;
        }
        Ok(())
    }

    /// The stored CRC (not itself checksummed) compared with the running one, and nothing after.
    fn check_seal(&mut self) -> Result<u32> {
        let computed = self.crc.clone().finalize();
        let mut stored = [0u8; 4];
        self.inner.read_exact(&mut stored).map_err(eof_is_truncation)?;
        let stored = u32::from_be_bytes(stored);
        self.pos += 4;
        if stored != computed {
            return Err(SnapshotError::Corrupt(format!(
                "checksum mismatch: the file says {stored:08x}, its contents hash to {computed:08x}"
            )));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.inner.read(&mut extra) {
                Ok(0) => return Ok(stored),
                Ok(_) => {
                    return Err(SnapshotError::Corrupt(format!("unexpected bytes after the trailer at offset {}", self.pos)))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The header, and the format version it declares.
fn read_header<R: Read>(r: &mut HashingReader<R>) -> Result<(SnapshotMeta, u32)> {
    let mut magic = [0u8; 8];
    let n = r.fill_up_to(&mut magic)?;
    if magic[..n] != MAGIC[..n] {
        return Err(SnapshotError::BadMagic);
    }
    if n < MAGIC.len() {
        // A prefix of the magic: the start of a snapshot that was cut short.
        return Err(SnapshotError::Truncated);
    }
    let version = r.u32()?;
    if !(OLDEST_READABLE..=VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let index = LogIndex(r.u64()?);
    let term = Term(r.u64()?);
    let conf_state = ConfState::decode(r.field("conf_state")?.as_slice())
        .map_err(|e| SnapshotError::Corrupt(format!("conf_state does not decode: {e}")))?;
    let members = serde_json::from_slice(&r.field("members")?)
        .map_err(|e| SnapshotError::Corrupt(format!("members do not decode: {e}")))?;
    Ok((SnapshotMeta { index, term, conf_state, members }, version))
}

/// The function libraries after the header (none before version 2).
fn read_functions<R: Read>(r: &mut HashingReader<R>, version: u32) -> Result<Vec<u8>> {
    if version >= 2 {
        r.field("functions")
    } else {
        Ok(Vec::new())
    }
}

enum Tag {
    Record,
    Trailer,
}

fn read_tag<R: Read>(r: &mut HashingReader<R>) -> Result<Tag> {
    let at = r.pos;
    match r.u8()? {
        TAG_RECORD => Ok(Tag::Record),
        TAG_TRAILER => Ok(Tag::Trailer),
        other => Err(SnapshotError::Corrupt(format!("unknown tag 0x{other:02x} at offset {at}"))),
    }
}

fn read_record<R: Read>(r: &mut HashingReader<R>) -> Result<Record> {
    let db = r.u32()?;
    let key = r.field("key")?;
    let expire_at_ms = r.i64()?;
    let payload = r.field("payload")?;
    Ok(Record { db, key, expire_at_ms, payload })
}

fn skip_record<R: Read>(r: &mut HashingReader<R>) -> Result<()> {
    r.u32()?;
    r.skip_field("key")?;
    r.i64()?;
    r.skip_field("payload")
}

/// The trailer after its tag: the record count must match what was read, then the seal.
fn read_trailer<R: Read>(r: &mut HashingReader<R>, records: u64) -> Result<u32> {
    let claimed = r.u64()?;
    // Checksum first: if the bytes are damaged, that is the more useful thing to say.
    let checksum = r.check_seal()?;
    if claimed != records {
        return Err(SnapshotError::Corrupt(format!("the trailer counts {claimed} records, the file holds {records}")));
    }
    Ok(checksum)
}

/// The whole stream checked: header, structure, record count, checksum, nothing after.
fn verify_stream<R: Read>(r: &mut HashingReader<R>) -> Result<(SnapshotMeta, u64, u32)> {
    let (meta, version) = read_header(r)?;
    if version >= 2 {
        r.skip_field("functions")?;
    }
    let mut records = 0u64;
    loop {
        match read_tag(r)? {
            Tag::Record => {
                skip_record(r)?;
                records += 1;
            }
            Tag::Trailer => {
                let checksum = read_trailer(r, records)?;
                return Ok((meta, records, checksum));
            }
        }
    }
}

/// The header only, without reading the rest: cheap, but the checksum is not checked, so a
/// damaged file can still answer here. Use [`verify`] or [`SnapshotReader::open`] before
/// trusting the data.
pub fn read_meta(path: &Path) -> Result<SnapshotMeta> {
    let mut r = HashingReader::new(BufReader::new(File::open(path)?));
    read_header(&mut r).map(|(meta, _)| meta)
}

/// Streams the whole file (without keeping the records) and checks its structure, record count
/// and checksum.
pub fn verify(path: &Path) -> Result<SnapshotSummary> {
    let mut r = HashingReader::new(BufReader::with_capacity(IO_BUFFER, File::open(path)?));
    let (_, records, checksum) = verify_stream(&mut r)?;
    Ok(SnapshotSummary { path: path.to_path_buf(), size: r.pos, records, checksum })
}

/// The records of a verified snapshot, in file order.
pub struct SnapshotReader {
    r: HashingReader<BufReader<File>>,
    functions: Vec<u8>,
    records: u64,
    done: bool,
}

impl SnapshotReader {
    /// Verifies the whole file first, so nothing is ever yielded from a damaged snapshot. The
    /// same open file is then read from the start: a rename over the path in between cannot
    /// swap in a file that was not verified.
    pub fn open(path: &Path) -> Result<(SnapshotMeta, SnapshotReader)> {
        let mut file = File::open(path)?;
        verify_stream(&mut HashingReader::new(BufReader::with_capacity(IO_BUFFER, &file)))?;
        file.seek(SeekFrom::Start(0))?;
        let mut r = HashingReader::new(BufReader::with_capacity(IO_BUFFER, file));
        let (meta, version) = read_header(&mut r)?;
        let functions = read_functions(&mut r, version)?;
        Ok((meta, SnapshotReader { r, functions, records: 0, done: false }))
    }

    /// The function libraries, as `FUNCTION DUMP` gave them; empty for none.
    pub fn functions(&self) -> &[u8] {
        &self.functions
    }
}

impl Iterator for SnapshotReader {
    type Item = Result<Record>;

    /// Re-checks count and checksum at the end, in case the file was changed in place after
    /// `open` verified it; such a change shows up as an error item.
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match read_tag(&mut self.r) {
            Ok(Tag::Record) => read_record(&mut self.r).map(Some),
            Ok(Tag::Trailer) => read_trailer(&mut self.r, self.records).map(|_| None),
            Err(e) => Err(e),
        };
        match item {
            Ok(Some(record)) => {
                self.records += 1;
                Some(Ok(record))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(SnapshotError::Corrupt(format!("the file changed after it was verified: {e}"))))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked transfer

/// Up to `max_len` bytes of `path` from `offset`; empty at or past the end. The buffer is sized
/// by what the file really has left, not by the requested length.
pub fn read_chunk(path: &Path, offset: u64, max_len: usize) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let left = file.metadata()?.len().saturating_sub(offset);
    let want = left.min(max_len as u64);
    if want == 0 {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(want as usize);
    file.take(want).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A snapshot arriving in chunks, written to `<final>.part`. What it should turn out to be (size
/// and checksum, as announced by the sender) is recorded in `<final>.part.info`, so that a later
/// [`IncomingSnapshot::begin`] for the same transfer resumes the `.part` instead of starting
/// over, while one for a different file (say, a new leader's snapshot under the same name)
/// discards it.
pub struct IncomingSnapshot {
    final_path: PathBuf,
    part: PathBuf,
    info: PathBuf,
    file: File,
    offset: u64,
    expected_size: u64,
    expected_checksum: u32,
}

impl IncomingSnapshot {
    pub fn begin(final_path: &Path, expected_size: u64, expected_checksum: u32) -> Result<Self> {
        let part = with_suffix(final_path, ".part");
        let info = with_suffix(final_path, ".part.info");
        let wanted = format!("size {expected_size} checksum {expected_checksum:08x}\n");
        let resumable = fs::read_to_string(&info).is_ok_and(|s| s == wanted);
        if !resumable {
            match fs::remove_file(&part) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            // Written after the old .part is gone: a crash in between leaves nothing to resume
            // by mistake.
            fs::write(&info, &wanted)?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&part)?;
        let mut offset = file.metadata()?.len();
        if offset > expected_size {
            // Longer than the whole file: not a prefix of it.
            file.set_len(0)?;
            offset = 0;
        }
        // Bytes resumed here may not have reached the disk before a crash; whatever they are,
        // finish() verifies the whole file and discards it if they are wrong.
        Ok(IncomingSnapshot {
            final_path: final_path.to_path_buf(),
            part,
            info,
            file,
            offset,
            expected_size,
            expected_checksum,
        })
    }

    /// Where the transfer resumes: the next chunk must start here.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.offset {
            return Err(SnapshotError::UnexpectedOffset { expected: self.offset, got: offset });
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.expected_size {
            return Err(SnapshotError::SizeMismatch { expected: self.expected_size, actual: end });
        }
        // At an explicit position rather than appending: if a write fails half-way, the retry
        // of the same chunk overwrites whatever part of it landed.
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(data)?;
        self.offset = end;
        Ok(())
    }

    /// Checks the size, syncs, [`verify`]s the whole file and compares its checksum with the
    /// announced one, then renames it to the final name. A short transfer keeps its `.part` (it
    /// can resume); a complete one that is wrong is deleted, so the next attempt starts over.
    pub fn finish(self) -> Result<SnapshotSummary> {
        if self.offset != self.expected_size {
            return Err(SnapshotError::SizeMismatch { expected: self.expected_size, actual: self.offset });
        }
        self.file.sync_all()?;
        let checked = verify(&self.part).and_then(|s| {
            if s.checksum != self.expected_checksum {
                return Err(SnapshotError::Corrupt(format!(
                    "received file has checksum {:08x}, the sender announced {:08x}",
                    s.checksum, self.expected_checksum
                )));
            }
            Ok(s)
        });
        let summary = match checked {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_file(&self.part);
                let _ = fs::remove_file(&self.info);
                return Err(e);
            }
        };
        fs::rename(&self.part, &self.final_path)?;
        let _ = fs::remove_file(&self.info);
        sync_dir_of(&self.final_path)?;
        Ok(SnapshotSummary { path: self.final_path, ..summary })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NodeInfo;
    use crate::NodeId;
    use rand::{Rng, RngCore, SeedableRng};

    fn meta(index: u64) -> SnapshotMeta {
        let mut members = Members::new();
        for id in [1u64, 2, 4] {
            members.insert(
                NodeId(id),
                NodeInfo { id: NodeId(id), raft_addr: format!("10.0.0.{id}:17000"), client_addr: format!("10.0.0.{id}:7000") },
            );
        }
        SnapshotMeta {
            index: LogIndex(index),
            term: Term(3),
            conf_state: ConfState { voters: vec![1, 2], learners: vec![4], ..Default::default() },
            members,
        }
    }

    /// Binary keys and payloads (every byte value, empty ones), every kind of expiry.
    fn records(n: usize) -> Vec<Record> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        (0..n)
            .map(|i| {
                let mut key = format!("k\0{i}\u{ff}").into_bytes();
                key.push((i % 256) as u8);
                let mut payload = vec![0u8; rng.gen_range(0..300)];
                rng.fill_bytes(&mut payload);
                Record {
                    db: (i % 16) as u32,
                    key: if i == 7 { Vec::new() } else { key },
                    expire_at_ms: match i % 4 {
                        0 | 1 => -1,
                        2 => 1_700_000_000_000 + i as i64,
                        _ => i64::MAX,
                    },
                    payload,
                }
            })
            .collect()
    }

    fn write_at(dir: &Path, index: u64, term: u64, recs: &[Record]) -> SnapshotSummary {
        let path = snapshot_path(dir, LogIndex(index), Term(term));
        let mut w = SnapshotWriter::create(&path, &SnapshotMeta { term: Term(term), ..meta(index) }, b"").unwrap();
        for r in recs {
            w.add(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn write(dir: &Path, index: u64, recs: &[Record]) -> SnapshotSummary {
        write_at(dir, index, 3, recs)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// Neither entry point may accept the file or yield a record from it.
    fn assert_refused(path: &Path, what: &str) {
        assert!(verify(path).is_err(), "verify accepted {what}");
        if let Ok((_, reader)) = SnapshotReader::open(path) {
            panic!("open accepted {what} (would yield {} items)", reader.count());
        }
    }

    #[test]
    fn round_trip_of_thousands_of_binary_records() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(3000);
        let s = write(dir.path(), 42, &recs);
        assert_eq!(s.path, snapshot_path(dir.path(), LogIndex(42), Term(3)));
        assert_eq!(s.records, 3000);
        assert_eq!(fs::metadata(&s.path).unwrap().len(), s.size);
        assert_eq!(names(dir.path()), vec!["snapshot-00000000000000000042-3.rsnap"], "no .tmp left behind");

        let (m, reader) = SnapshotReader::open(&s.path).unwrap();
        assert_eq!(m, meta(42));
        let back: Vec<Record> = reader.map(|r| r.unwrap()).collect();
        assert_eq!(back, recs);
        assert_eq!(verify(&s.path).unwrap(), s);
    }

    #[test]
    fn an_empty_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 1, &[]);
        assert_eq!(s.records, 0);
        let (m, mut reader) = SnapshotReader::open(&s.path).unwrap();
        assert_eq!(m, meta(1));
        assert!(reader.next().is_none());
        assert!(reader.next().is_none(), "stays finished");
    }

    #[test]
    fn function_libraries_travel_beside_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_path(dir.path(), LogIndex(9), Term(3));
        let libraries = b"\xf5\xc3@X@\0binary dump payload\xff".to_vec();
        let mut w = SnapshotWriter::create(&path, &meta(9), &libraries).unwrap();
        for r in records(5) {
            w.add(&r).unwrap();
        }
        let s = w.finish().unwrap();
        assert_eq!(s.records, 5, "the libraries are not a key");
        assert_eq!(verify(&path).unwrap(), s);
        assert_eq!(read_meta(&path).unwrap(), meta(9));
        let (m, reader) = SnapshotReader::open(&path).unwrap();
        assert_eq!(m, meta(9));
        assert_eq!(reader.functions(), libraries.as_slice());
        assert_eq!(reader.map(|r| r.unwrap()).collect::<Vec<_>>(), records(5));
    }

    /// A file written before snapshots carried functions: no functions field, version 1.
    #[test]
    fn a_version_1_file_is_still_read_and_has_no_functions() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 5, &records(4));
        let v2 = fs::read(&s.path).unwrap();
        // The empty functions field is the 4 zero bytes right after the members field.
        let members_len_at = 8 + 4 + 8 + 8 + 4 + u32::from_be_bytes(v2[28..32].try_into().unwrap()) as usize;
        let functions_at = members_len_at + 4 + u32::from_be_bytes(v2[members_len_at..members_len_at + 4].try_into().unwrap()) as usize;
        assert_eq!(&v2[functions_at..functions_at + 4], &[0, 0, 0, 0]);
        let mut v1 = [&v2[..functions_at], &v2[functions_at + 4..v2.len() - 4]].concat();
        v1[8..12].copy_from_slice(&1u32.to_be_bytes());
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_be_bytes());
        let old = dir.path().join("old");
        fs::write(&old, &v1).unwrap();

        assert_eq!(verify(&old).unwrap().records, 4);
        let (m, reader) = SnapshotReader::open(&old).unwrap();
        assert_eq!(m, meta(5));
        assert!(reader.functions().is_empty());
        assert_eq!(reader.map(|r| r.unwrap()).collect::<Vec<_>>(), records(4));
    }

    #[test]
    fn read_meta_reads_the_header_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 77, &records(100));
        assert_eq!(read_meta(&s.path).unwrap(), meta(77));
        // Damage far past the header: read_meta does not look there, verify does.
        let mut bytes = fs::read(&s.path).unwrap();
        let n = bytes.len();
        bytes[n - 20] ^= 0x10;
        fs::write(&s.path, &bytes).unwrap();
        assert_eq!(read_meta(&s.path).unwrap(), meta(77));
        assert!(matches!(verify(&s.path), Err(SnapshotError::Corrupt(_))));
    }

    #[test]
    fn magic_and_version_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 5, &records(3));
        let good = fs::read(&s.path).unwrap();
        let bad = dir.path().join("x");

        fs::write(&bad, b"REDIS0011 and more bytes than the magic").unwrap();
        assert!(matches!(read_meta(&bad), Err(SnapshotError::BadMagic)));
        assert!(matches!(verify(&bad), Err(SnapshotError::BadMagic)));
        fs::write(&bad, b"").unwrap();
        assert!(matches!(verify(&bad), Err(SnapshotError::Truncated)));
        fs::write(&bad, b"RAFT").unwrap();
        assert!(matches!(verify(&bad), Err(SnapshotError::Truncated)));

        let mut b = good.clone();
        b[8..12].copy_from_slice(&3u32.to_be_bytes());
        fs::write(&bad, &b).unwrap();
        assert!(matches!(read_meta(&bad), Err(SnapshotError::UnsupportedVersion(3))));
        assert!(matches!(SnapshotReader::open(&bad), Err(SnapshotError::UnsupportedVersion(3))));
        b[8..12].copy_from_slice(&0u32.to_be_bytes());
        fs::write(&bad, &b).unwrap();
        assert!(matches!(verify(&bad), Err(SnapshotError::UnsupportedVersion(0))));
    }

    #[test]
    fn a_huge_length_is_refused_without_allocating_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 5, &records(3));
        let mut b = fs::read(&s.path).unwrap();
        // The conf_state length sits right after magic, version, index and term.
        b[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
        fs::write(&s.path, &b).unwrap();
        let e = read_meta(&s.path).unwrap_err();
        assert!(matches!(&e, SnapshotError::Corrupt(m) if m.contains("conf_state length")), "{e}");
        // Within the bound but far beyond the file: reads what is there, then says truncated.
        b[28..32].copy_from_slice(&(MAX_FIELD as u32).to_be_bytes());
        fs::write(&s.path, &b).unwrap();
        assert!(matches!(read_meta(&s.path), Err(SnapshotError::Truncated)));
        assert!(matches!(verify(&s.path), Err(SnapshotError::Truncated)));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.rsnap");
        // A small file at every offset (header, tags, lengths, trailer, CRC), a bigger one sampled.
        for (count, step) in [(6usize, 1usize), (400, 331)] {
            let s = write(dir.path(), 7, &records(count));
            let good = fs::read(&s.path).unwrap();
            let mut offsets: Vec<usize> = (0..good.len()).step_by(step).collect();
            offsets.extend(good.len().saturating_sub(16)..good.len());
            for offset in offsets {
                for mask in [0x01u8, 0x80, 0xFF] {
                    let mut b = good.clone();
                    b[offset] ^= mask;
                    fs::write(&bad, &b).unwrap();
                    assert_refused(&bad, &format!("a flip of {mask:#04x} at {offset} of {}", good.len()));
                    let _ = read_meta(&bad); // may or may not notice, must not panic
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 7, &records(60));
        let good = fs::read(&s.path).unwrap();
        let bad = dir.path().join("short.rsnap");
        let mut lengths: Vec<usize> = (0..good.len()).step_by(11).collect();
        lengths.extend(0..64);
        lengths.extend(good.len() - 32..good.len());
        for len in lengths {
            fs::write(&bad, &good[..len]).unwrap();
            assert_refused(&bad, &format!("a truncation to {len} of {}", good.len()));
            let _ = read_meta(&bad);
        }
        // And bytes appended after a valid trailer.
        let mut longer = good.clone();
        longer.push(0);
        fs::write(&bad, &longer).unwrap();
        assert_refused(&bad, "a trailing byte");
    }

    #[test]
    fn random_garbage_and_random_damage_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 9, &records(40));
        let good = fs::read(&s.path).unwrap();
        let bad = dir.path().join("fuzz.rsnap");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..300 {
            let b = if round % 3 == 0 {
                let mut g = vec![0u8; rng.gen_range(0..2000)];
                rng.fill_bytes(&mut g);
                if round % 2 == 0 && g.len() >= 12 {
                    g[..8].copy_from_slice(MAGIC);
                    g[8..12].copy_from_slice(&VERSION.to_be_bytes());
                }
                g
            } else {
                let mut g = good.clone();
                for _ in 0..rng.gen_range(1..5) {
                    let i = rng.gen_range(0..g.len());
                    g[i] = rng.gen();
                }
                if g == good {
                    continue;
                }
                g
            };
            fs::write(&bad, &b).unwrap();
            assert_refused(&bad, &format!("fuzz round {round}"));
            let _ = read_meta(&bad);
        }
    }

    #[test]
    fn a_writer_dropped_unfinished_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_path(dir.path(), LogIndex(3), Term(1));
        let mut w = SnapshotWriter::create(&path, &meta(3), b"").unwrap();
        w.add(&records(1)[0]).unwrap();
        assert_eq!(names(dir.path()), vec!["snapshot-00000000000000000003-1.rsnap.tmp"]);
        drop(w);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn latest_picks_the_highest_complete_index() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest(dir.path()).unwrap(), None);
        assert_eq!(latest(&dir.path().join("missing")).unwrap(), None);
        write(dir.path(), 5, &records(3));
        write(dir.path(), 100, &records(3));
        write_at(dir.path(), 12, 9, &records(3));
        let best = write_at(dir.path(), 100, 4, &records(3));
        // Higher indexes, but not complete; and things that are not ours at all.
        for name in [
            "snapshot-00000000000000000999-4.rsnap.tmp",
            "snapshot-00000000000000000998-4.rsnap.part",
            "snapshot-00000000000000000998-4.rsnap.part.info",
            "snapshot-x-4.rsnap",
            "snapshot-00000000000000000997.rsnap",
            "dump.rdb",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(latest(dir.path()).unwrap(), Some(best.path));
    }

    #[test]
    fn remove_older_than_keeps_the_kept_and_anything_newer() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, 5, &records(3));
        write_at(d, 12, 2, &records(3));
        let keep = write(d, 12, &records(3));
        let newer = write(d, 20, &records(3));
        for name in [
            "snapshot-00000000000000000010-3.rsnap.tmp",
            "snapshot-00000000000000000012-3.rsnap.tmp",
            "snapshot-00000000000000000011-3.rsnap.part",
            "snapshot-00000000000000000011-3.rsnap.part.info",
            "snapshot-00000000000000000030-3.rsnap.tmp",
            "snapshot-00000000000000000031-3.rsnap.part",
            "snapshot-00000000000000000031-3.rsnap.part.info",
            "dump.rdb",
        ] {
            fs::write(d.join(name), b"x").unwrap();
        }
        assert_eq!(remove_older_than(d, &keep.path).unwrap(), 6);
        assert_eq!(
            names(d),
            vec![
                "dump.rdb",
                "snapshot-00000000000000000012-3.rsnap",
                "snapshot-00000000000000000020-3.rsnap",
                "snapshot-00000000000000000030-3.rsnap.tmp",
                "snapshot-00000000000000000031-3.rsnap.part",
                "snapshot-00000000000000000031-3.rsnap.part.info",
            ]
        );
        assert_eq!(remove_older_than(d, &keep.path).unwrap(), 0, "idempotent");
        assert_eq!(remove_older_than(d, &newer.path).unwrap(), 1);
        assert!(remove_older_than(d, &d.join("dump.rdb")).is_err(), "refuses a keep it cannot place");
        // At start-up every .tmp is a crashed writer's; downloads stay to resume.
        assert_eq!(remove_leftovers(d).unwrap(), 1);
        assert_eq!(
            names(d),
            vec![
                "dump.rdb",
                "snapshot-00000000000000000020-3.rsnap",
                "snapshot-00000000000000000031-3.rsnap.part",
                "snapshot-00000000000000000031-3.rsnap.part.info",
            ]
        );
    }

    fn send(src: &Path, inc: &mut IncomingSnapshot, until: u64) {
        while inc.offset() < until {
            let chunk = read_chunk(src, inc.offset(), 7).unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= 7);
            inc.write_chunk(inc.offset(), &chunk).unwrap();
        }
    }

    #[test]
    fn chunked_transfer_resumes_and_verifies() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = write(src.path(), 9, &records(200));
        assert!(read_chunk(&s.path, s.size, 7).unwrap().is_empty());
        assert!(read_chunk(&s.path, s.size + 100, usize::MAX).unwrap().is_empty());
        assert_eq!(read_chunk(&s.path, s.size - 3, usize::MAX).unwrap().len(), 3);

        let target = dst.path().join(s.path.file_name().unwrap());
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        assert_eq!(inc.offset(), 0);
        send(&s.path, &mut inc, s.size / 2);
        let halfway = inc.offset();
        drop(inc); // interrupted

        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        assert_eq!(inc.offset(), halfway, "resumes where it stopped");
        assert!(matches!(inc.write_chunk(0, b"x"), Err(SnapshotError::UnexpectedOffset { expected, got: 0 }) if expected == halfway));
        assert!(matches!(inc.write_chunk(halfway + 7, b"x"), Err(SnapshotError::UnexpectedOffset { .. })));
        send(&s.path, &mut inc, s.size);
        assert!(matches!(inc.write_chunk(s.size, b"x"), Err(SnapshotError::SizeMismatch { .. })), "nothing past the end");
        let got = inc.finish().unwrap();
        assert_eq!(got.checksum, s.checksum);
        assert_eq!(got.path, target);
        assert_eq!(fs::read(&target).unwrap(), fs::read(&s.path).unwrap());
        assert_eq!(names(dst.path()), vec![s.path.file_name().unwrap().to_string_lossy().into_owned()], "no .part left");
        assert_eq!(SnapshotReader::open(&target).unwrap().1.count(), 200);
    }

    #[test]
    fn a_different_transfer_starts_over_and_a_short_one_stays_resumable() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let a = write(src.path(), 9, &records(50));
        let target = dst.path().join("snapshot-00000000000000000009-3.rsnap");
        let mut inc = IncomingSnapshot::begin(&target, a.size, a.checksum).unwrap();
        send(&a.path, &mut inc, 98);
        // Finishing early: refused, but the bytes stay for a resume.
        assert!(matches!(inc.finish(), Err(SnapshotError::SizeMismatch { actual: 98, .. })));
        let inc = IncomingSnapshot::begin(&target, a.size, a.checksum).unwrap();
        assert_eq!(inc.offset(), 98);
        drop(inc);
        // Another file under the same name (a new leader's): the old bytes are discarded.
        let inc = IncomingSnapshot::begin(&target, a.size + 1, a.checksum).unwrap();
        assert_eq!(inc.offset(), 0);
        drop(inc);
        let inc = IncomingSnapshot::begin(&target, a.size, a.checksum ^ 1).unwrap();
        assert_eq!(inc.offset(), 0);
    }

    #[test]
    fn a_mismatched_checksum_or_damaged_transfer_leaves_no_final_file() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = write(src.path(), 9, &records(50));
        let bytes = fs::read(&s.path).unwrap();

        // A sound file, but not the one announced.
        let target = dst.path().join("snapshot-00000000000000000010-3.rsnap");
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum ^ 1).unwrap();
        inc.write_chunk(0, &bytes).unwrap();
        let e = inc.finish().unwrap_err();
        assert!(matches!(&e, SnapshotError::Corrupt(m) if m.contains("announced")), "{e}");
        assert!(!target.exists());
        assert!(names(dst.path()).is_empty(), "the bad .part is gone: {:?}", names(dst.path()));

        // Bytes damaged in transit.
        let mut damaged = bytes.clone();
        damaged[bytes.len() / 2] ^= 0x20;
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        inc.write_chunk(0, &damaged).unwrap();
        assert!(matches!(inc.finish(), Err(SnapshotError::Corrupt(_))));
        assert!(!target.exists());
        // The next attempt starts from scratch and succeeds.
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        assert_eq!(inc.offset(), 0);
        inc.write_chunk(0, &bytes).unwrap();
        inc.finish().unwrap();
        assert!(target.exists());
    }

    #[test]
    fn names_parse_strictly() {
        let p = snapshot_path(Path::new("/d"), LogIndex(42), Term(7));
        assert_eq!(p, Path::new("/d/snapshot-00000000000000000042-7.rsnap"));
        assert_eq!(parse_path(&p), Some((Kind::Complete, 42, 7)));
        assert_eq!(parse_name("snapshot-00000000000000000042-7.rsnap.tmp"), Some((Kind::Tmp, 42, 7)));
        for bad in ["snapshot--7.rsnap", "snapshot-1-.rsnap", "snapshot-+1-2.rsnap", "snapshot-1-2.rsnapx", "other-1-2.rsnap"] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
