//! The snapshot file: the dataset at one log index, as written by the module's forked child and
//! read back by RESTORE. Integrity is checked before a single record is handed out, because a
//! node must refuse bad data rather than serve it.
//!
//! Layout (integers big-endian):
//! `"RAFTISSN" | version u32 | index u64 | term u64 | conf_state (u32 len, prost) |
//!  members (u32 len, JSON) | records: 0x01 db u32, key (u32 len), expire_at_ms i64, payload (u32 len) |
//!  trailer: 0xFF records u64 | crc32 u32 of everything before it`.

use crate::ids::{LogIndex, Term};
use crate::membership::Members;
use prost::Message as _;
use raft::eraftpb::ConfState;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RAFTISSN";
const VERSION: u32 = 1;
const TAG_RECORD: u8 = 0x01;
const TAG_TRAILER: u8 = 0xFF;
/// No field of a sane snapshot is larger; a bigger length means damage, not a huge value.
const MAX_FIELD: usize = 512 * 1024 * 1024;
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
    /// Absolute milliseconds since the epoch, or -1 for no expiry.
    pub expire_at_ms: i64,
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
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("not a Raftis snapshot (bad magic)")]
    BadMagic,
    #[error("unsupported snapshot version {0}")]
    UnsupportedVersion(u32),
    #[error("snapshot is truncated")]
    Truncated,
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, SnapshotError>;

pub fn snapshot_path(dir: &Path, index: LogIndex, term: Term) -> PathBuf {
    dir.join(format!("snapshot-{:020}-{}.{EXTENSION}", index.get(), term.get()))
}

fn index_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("snapshot-")?.strip_suffix(&format!(".{EXTENSION}"))?;
    rest.split('-').next()?.parse().ok()
}

/// The complete snapshot file with the highest index in `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(i) = index_of(&path) {
            if best.as_ref().map_or(true, |(b, _)| i > *b) {
                best = Some((i, path));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Deletes every complete snapshot file but `keep`. Files being written (`.tmp`, perhaps by a
/// child process right now) and partial downloads (`.part`, resumable) are left alone; see
/// [`remove_leftovers`] for start-up.
pub fn remove_older_than(dir: &Path, keep: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ours = name.starts_with("snapshot-") && name.ends_with(&format!(".{EXTENSION}"));
        if ours && path != keep {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// At start-up, before any snapshot is being written: half-written files of a crashed writer.
pub fn remove_leftovers(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("snapshot-") && name.ends_with(".tmp") {
            std::fs::remove_file(&path)?;
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

fn sync_dir(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes bytes and keeps the running CRC and size.
struct Hashing<W> {
    inner: W,
    crc: crc32fast::Hasher,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.size += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    fn put_field(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(&(bytes.len() as u32).to_be_bytes())?;
        self.put(bytes)
    }
}

pub struct SnapshotWriter {
    out: Hashing<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    records: u64,
}

impl SnapshotWriter {
    pub fn create(path: &Path, meta: &SnapshotMeta) -> Result<Self> {
        let tmp = with_suffix(path, ".tmp");
        let file = File::create(&tmp)?;
        let mut out = Hashing { inner: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new(), size: 0 };
        out.put(MAGIC)?;
        out.put(&VERSION.to_be_bytes())?;
        out.put(&meta.index.get().to_be_bytes())?;
        out.put(&meta.term.get().to_be_bytes())?;
        out.put_field(&meta.conf_state.encode_to_vec())?;
        out.put_field(&serde_json::to_vec(&meta.members).map_err(|e| SnapshotError::Corrupt(e.to_string()))?)?;
        Ok(SnapshotWriter { out, tmp, path: path.to_path_buf(), records: 0 })
    }

    pub fn add(&mut self, rec: &Record) -> Result<()> {
        self.out.put(&[TAG_RECORD])?;
        self.out.put(&rec.db.to_be_bytes())?;
        self.out.put_field(&rec.key)?;
        self.out.put(&rec.expire_at_ms.to_be_bytes())?;
        self.out.put_field(&rec.payload)?;
        self.records += 1;
        Ok(())
    }

    /// Seals the file (trailer and checksum), makes it durable, and gives it its final name.
    pub fn finish(mut self) -> Result<SnapshotSummary> {
        self.out.put(&[TAG_TRAILER])?;
        self.out.put(&self.records.to_be_bytes())?;
        let checksum = self.out.crc.clone().finalize();
        self.out.inner.write_all(&checksum.to_be_bytes())?;
        let size = self.out.size + 4;
        let file = self.out.inner.into_inner().map_err(|e| SnapshotError::Io(e.into_error()))?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        sync_dir(&self.path)?;
        Ok(SnapshotSummary { path: self.path, size, records: self.records, checksum })
    }
}

/// Reads fields and keeps the running CRC.
struct Hashed<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Hashed<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        if n > MAX_FIELD {
            return Err(SnapshotError::Corrupt(format!("field of {n} bytes")));
        }
        let mut buf = Vec::new();
        (&mut self.inner).take(n as u64).read_to_end(&mut buf)?;
        if buf.len() < n {
            return Err(SnapshotError::Truncated);
        }
        self.crc.update(&buf);
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn field(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn read_header<R: Read>(r: &mut Hashed<R>) -> Result<SnapshotMeta> {
    let magic = r.take(8).map_err(|e| if matches!(e, SnapshotError::Truncated) { SnapshotError::BadMagic } else { e })?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let index = LogIndex(r.u64()?);
    let term = Term(r.u64()?);
    let conf_state = ConfState::decode(r.field()?.as_slice()).map_err(|e| SnapshotError::Corrupt(format!("conf state: {e}")))?;
    let members = serde_json::from_slice(&r.field()?).map_err(|e| SnapshotError::Corrupt(format!("members: {e}")))?;
    Ok(SnapshotMeta { index, term, conf_state, members })
}

enum Item {
    Record(Record),
    End { records: u64 },
}

fn read_item<R: Read>(r: &mut Hashed<R>) -> Result<Item> {
    match r.array::<1>()?[0] {
        TAG_RECORD => {
            let db = r.u32()?;
            let key = r.field()?;
            let expire_at_ms = i64::from_be_bytes(r.array()?);
            let payload = r.field()?;
            Ok(Item::Record(Record { db, key, expire_at_ms, payload }))
        }
        TAG_TRAILER => Ok(Item::End { records: r.u64()? }),
        other => Err(SnapshotError::Corrupt(format!("unknown tag 0x{other:02x}"))),
    }
}

pub fn read_meta(path: &Path) -> Result<SnapshotMeta> {
    let mut r = Hashed { inner: BufReader::new(File::open(path)?), crc: crc32fast::Hasher::new() };
    read_header(&mut r)
}

/// Reads the whole file and checks its structure, record count and checksum.
pub fn verify(path: &Path) -> Result<SnapshotSummary> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut r = Hashed { inner: BufReader::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    read_header(&mut r)?;
    let mut records = 0u64;
    loop {
        match read_item(&mut r)? {
            Item::Record(_) => records += 1,
            Item::End { records: claimed } => {
                if claimed != records {
                    return Err(SnapshotError::Corrupt(format!("trailer says {claimed} records, found {records}")));
                }
                break;
            }
        }
    }
    let expected = r.crc.clone().finalize();
    let mut stored = [0u8; 4];
    r.inner.read_exact(&mut stored).map_err(|_| SnapshotError::Truncated)?;
    let stored = u32::from_be_bytes(stored);
    if stored != expected {
        return Err(SnapshotError::Corrupt(format!("checksum mismatch (stored {stored:08x}, computed {expected:08x})")));
    }
    if r.inner.read(&mut [0u8; 1])? != 0 {
        return Err(SnapshotError::Corrupt("bytes after the trailer".into()));
    }
    Ok(SnapshotSummary { path: path.to_path_buf(), size, records, checksum: stored })
}

pub struct SnapshotReader {
    r: Hashed<BufReader<File>>,
    done: bool,
}

impl SnapshotReader {
    /// Verifies the whole file first: nothing is yielded from a damaged snapshot.
    pub fn open(path: &Path) -> Result<(SnapshotMeta, SnapshotReader)> {
        verify(path)?;
        let mut r = Hashed { inner: BufReader::with_capacity(1 << 20, File::open(path)?), crc: crc32fast::Hasher::new() };
        let meta = read_header(&mut r)?;
        Ok((meta, SnapshotReader { r, done: false }))
    }
}

impl Iterator for SnapshotReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match read_item(&mut self.r) {
            Ok(Item::Record(rec)) => Some(Ok(rec)),
            Ok(Item::End { .. }) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Up to `max_len` bytes of `path` from `offset` (empty at the end).
pub fn read_chunk(path: &Path, offset: u64, max_len: usize) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(max_len.min(MAX_FIELD));
    file.take(max_len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// A snapshot arriving in chunks, written to `<final>.part`. A `.part` left by an interrupted
/// transfer of the same file (same size and checksum, recorded in `<final>.part.info`) is resumed.
pub struct IncomingSnapshot {
    final_path: PathBuf,
    part: PathBuf,
    file: File,
    offset: u64,
    expected_size: u64,
    expected_checksum: u32,
}

impl IncomingSnapshot {
    pub fn begin(final_path: &Path, expected_size: u64, expected_checksum: u32) -> Result<Self> {
        let part = with_suffix(final_path, ".part");
        let info = with_suffix(final_path, ".part.info");
        let wanted = format!("{expected_size} {expected_checksum}");
        let resumable = std::fs::read_to_string(&info).map_or(false, |s| s == wanted);
        if !resumable {
            let _ = std::fs::remove_file(&part);
            std::fs::write(&info, &wanted)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&part)?;
        let offset = file.metadata()?.len().min(expected_size);
        file.set_len(offset)?;
        Ok(IncomingSnapshot { final_path: final_path.to_path_buf(), part, file, offset, expected_size, expected_checksum })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn write_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.offset {
            return Err(SnapshotError::Corrupt(format!("chunk at {offset}, expected {}", self.offset)));
        }
        if self.offset + data.len() as u64 > self.expected_size {
            return Err(SnapshotError::Corrupt("more data than the snapshot's size".into()));
        }
        self.file.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    pub fn finish(self) -> Result<SnapshotSummary> {
        let info = with_suffix(&self.final_path, ".part.info");
        if self.offset != self.expected_size {
            return Err(SnapshotError::Truncated);
        }
        self.file.sync_all()?;
        let summary = match verify(&self.part) {
            Ok(s) if s.checksum == self.expected_checksum => s,
            Ok(s) => {
                let _ = std::fs::remove_file(&self.part);
                let _ = std::fs::remove_file(&info);
                return Err(SnapshotError::Corrupt(format!(
                    "checksum {:08x} is not the announced {:08x}",
                    s.checksum, self.expected_checksum
                )));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.part);
                let _ = std::fs::remove_file(&info);
                return Err(e);
            }
        };
        std::fs::rename(&self.part, &self.final_path)?;
        let _ = std::fs::remove_file(&info);
        sync_dir(&self.final_path)?;
        Ok(SnapshotSummary { path: self.final_path, ..summary })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NodeInfo;
    use crate::NodeId;

    fn meta(index: u64) -> SnapshotMeta {
        let mut members = Members::new();
        members.insert(NodeId(1), NodeInfo { id: NodeId(1), raft_addr: "a:1".into(), client_addr: "a:2".into() });
        SnapshotMeta {
            index: LogIndex(index),
            term: Term(3),
            conf_state: ConfState { voters: vec![1, 2], learners: vec![4], ..Default::default() },
            members,
        }
    }

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                db: (i % 3) as u32,
                key: format!("k\0{i}").into_bytes(),
                expire_at_ms: if i % 2 == 0 { -1 } else { 1_700_000_000_000 + i as i64 },
                payload: vec![(i % 251) as u8; i % 40],
            })
            .collect()
    }

    fn write(dir: &Path, index: u64, recs: &[Record]) -> SnapshotSummary {
        let path = snapshot_path(dir, LogIndex(index), Term(3));
        let mut w = SnapshotWriter::create(&path, &meta(index)).unwrap();
        for r in recs {
            w.add(r).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_meta_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let recs = records(3000);
        let s = write(dir.path(), 42, &recs);
        assert_eq!(s.records, 3000);
        assert_eq!(std::fs::metadata(&s.path).unwrap().len(), s.size);
        assert_eq!(read_meta(&s.path).unwrap(), meta(42));
        let (m, reader) = SnapshotReader::open(&s.path).unwrap();
        assert_eq!(m, meta(42));
        let back: Vec<Record> = reader.map(|r| r.unwrap()).collect();
        assert_eq!(back, recs);
        assert_eq!(verify(&s.path).unwrap().checksum, s.checksum);
    }

    #[test]
    fn latest_and_cleanup_ignore_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, &records(3));
        let newest = write(dir.path(), 12, &records(3));
        std::fs::write(dir.path().join("snapshot-00000000000000000099-1.rsnap.tmp"), b"x").unwrap();
        assert_eq!(latest(dir.path()).unwrap(), Some(newest.path.clone()));
        assert_eq!(remove_older_than(dir.path(), &newest.path).unwrap(), 1, "a .tmp may be a live writer's");
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 1);
        assert_eq!(latest(dir.path()).unwrap(), Some(newest.path));
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = write(dir.path(), 7, &records(50));
        let good = std::fs::read(&s.path).unwrap();
        let bad = dir.path().join("bad.rsnap");
        for offset in (0..good.len()).step_by(7) {
            let mut b = good.clone();
            b[offset] ^= 0x41;
            std::fs::write(&bad, &b).unwrap();
            assert!(verify(&bad).is_err(), "flip at {offset} undetected");
            assert!(SnapshotReader::open(&bad).is_err());
        }
        for len in (0..good.len()).step_by(13) {
            std::fs::write(&bad, &good[..len]).unwrap();
            assert!(verify(&bad).is_err(), "truncation to {len} undetected");
        }
    }

    #[test]
    fn chunked_transfer_resumes_and_verifies() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = write(src.path(), 9, &records(200));
        let target = dst.path().join(s.path.file_name().unwrap());
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        while inc.offset() < s.size / 2 {
            let chunk = read_chunk(&s.path, inc.offset(), 7).unwrap();
            inc.write_chunk(inc.offset(), &chunk).unwrap();
        }
        let halfway = inc.offset();
        drop(inc);
        let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
        assert_eq!(inc.offset(), halfway, "resumes where it stopped");
        assert!(inc.write_chunk(0, b"x").is_err(), "out-of-order chunk refused");
        while inc.offset() < s.size {
            let chunk = read_chunk(&s.path, inc.offset(), 7).unwrap();
            inc.write_chunk(inc.offset(), &chunk).unwrap();
        }
        assert_eq!(inc.finish().unwrap().checksum, s.checksum);
        assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&s.path).unwrap());

        // The wrong announced checksum: refused, nothing left under the final name.
        let other = dst.path().join("snapshot-00000000000000000010-3.rsnap");
        let mut inc = IncomingSnapshot::begin(&other, s.size, s.checksum ^ 1).unwrap();
        inc.write_chunk(0, &std::fs::read(&s.path).unwrap()).unwrap();
        assert!(inc.finish().is_err());
        assert!(!other.exists());
    }
}
