//! The raft log's journal: what the log appended since its last checkpoint into LMDB.
//!
//! A durable LMDB commit rewrites, copy on write, the log's last pages, their branch pages and
//! the free list, each a page of its own, and flushes twice (data, then the meta page). Per
//! Ready that cost more than the replication itself. The journal makes a durable append one
//! sequential write and one flush; the entries reach LMDB later, many at once, in one durable
//! commit (a checkpoint), after which the journal starts over.
//!
//! Layout: a header block (magic, generation, checksum), then records, each
//! `[len u32][crc u32][generation u64][payload]`, the checksum over generation and payload. A
//! checkpoint bumps the generation in the header before anything new is written, so records of
//! an older generation, still on disk past the new end, are never read as current. Reading
//! stops at the first record that is empty, torn, or of another generation; whatever lies past
//! that point is never read later (after a replay the caller's checkpoint starts a new
//! generation, and `open` starts one itself when it found none but something follows). Each
//! checkpoint also records in LMDB the generation it absorbed, so a journal whose header never
//! reached the disk after that checkpoint (possible below durability high) is not replayed over
//! the newer log. The file is filled with zeros when created, so appends never change its size
//! and a flush writes data only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: u64 = 0x5241_4654_4a4e_4c31; // "RAFTJNL1"
const HEADER_BYTES: u64 = 4096;
const RECORD_HEAD: usize = 16;

pub struct Journal {
    file: File,
    generation: u64,
    /// Where the next record goes.
    end: u64,
    capacity: u64,
    /// A write or flush failed: after a failed fsync the kernel may have dropped the pages it
    /// could not write and report success for the next one, so nothing more is written, and
    /// every later call fails (the node stops rather than acknowledge what may not be on disk).
    failed: bool,
    /// Some record of this generation was flushed: it may be all that holds an acknowledged
    /// entry or a vote, so LMDB must hold them durably before the journal starts over.
    flushed: bool,
    /// Added to the first restart after `open` (see [`OPEN_JUMP`]).
    jump: u64,
}

/// How far the first generation after an open jumps. The header names the generation last
/// written there, not necessarily the newest: below durability high its page may not have
/// reached the disk while records of later generations did. A generation reused would make
/// those records valid again, so the next one goes past any a process can have reached (one a
/// checkpoint, 2^32 of them are 13 years at 10 a second).
const OPEN_JUMP: u64 = 1 << 32;

impl Journal {
    /// Opens (creating, `capacity` bytes of zeros) the journal at `path`; returns it with the
    /// payloads of the current generation's records, oldest first. New records go after them.
    pub fn open(path: &Path, capacity: u64) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        if !path.exists() {
            create(path, capacity)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let capacity = file.metadata()?.len();
        let mut head = [0u8; 20];
        file.read_exact_at(&mut head, 0)?;
        let Some(generation) = generation_in(&head) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} has no valid journal header", path.display())));
        };
        let mut journal = Journal { file, generation, end: HEADER_BYTES, capacity, failed: false, flushed: false, jump: OPEN_JUMP };
        let records = journal.read_records()?;
        if records.is_empty() {
            // Records of this generation may lie past a torn (or never written) first one:
            // written before a crash, never flushed. A new record the torn one's size would bring
            // them back into the journal, a stale term or vote with them: a new generation rules
            // them out. Whether any are there cannot be told for sure (a page of zeros can stand
            // before one), so it is started whenever nothing was read. (With records, the
            // caller's checkpoint starts one anyway.)
            journal.restart(true)?;
        }
        Ok((journal, records))
    }

    fn read_records(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let mut records = Vec::new();
        while let Some(head) = self.head_at_end()? {
            let len = head.len as u64;
            if len == 0 || head.generation != self.generation || self.end + RECORD_HEAD as u64 + len > self.capacity {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            self.file.read_exact_at(&mut payload, self.end + RECORD_HEAD as u64)?;
            if checksum(head.generation, &payload) != head.crc {
                break;
            }
            self.end += RECORD_HEAD as u64 + len;
            records.push(payload);
        }
        Ok(records)
    }

    /// The record head at the end, if one fits there (it may be zeros, torn or stale).
    fn head_at_end(&self) -> io::Result<Option<RecordHead>> {
        if self.end + RECORD_HEAD as u64 > self.capacity {
            return Ok(None);
        }
        let mut raw = [0u8; RECORD_HEAD];
        self.file.read_exact_at(&mut raw, self.end)?;
        Ok(Some(RecordHead::decode(&raw)))
    }

    /// Whether a record of `payload_len` bytes still fits.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.end + (RECORD_HEAD + payload_len) as u64 <= self.capacity
    }

    /// Bytes of records written since the last checkpoint.
    pub fn used(&self) -> u64 {
        self.end - HEADER_BYTES
    }

    /// Appends one record (the caller checked it `fits`), flushed before returning with `sync`.
    pub fn append(&mut self, payload: &[u8], sync: bool) -> io::Result<()> {
        self.usable()?;
        let result = self.write_record(payload, sync);
        self.failed |= result.is_err();
        result
    }

    fn write_record(&mut self, payload: &[u8], sync: bool) -> io::Result<()> {
        let head = RecordHead { len: payload.len() as u32, crc: checksum(self.generation, payload), generation: self.generation };
        let mut record = Vec::with_capacity(RECORD_HEAD + payload.len());
        record.extend_from_slice(&head.encode());
        record.extend_from_slice(payload);
        self.file.write_all_at(&record, self.end)?;
        self.end += record.len() as u64;
        if sync {
            self.file.sync_data()?;
            self.flushed = true;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.usable()?;
        let result = self.file.sync_data();
        self.failed |= result.is_err();
        self.flushed |= result.is_ok() && self.used() > 0;
        result
    }

    /// Whether a record of this generation was flushed (see `flushed`).
    pub fn holds_flushed_records(&self) -> bool {
        self.flushed
    }

    /// Marks the journal failed (see `failed`): a flush of the rest of the log failed.
    pub fn fail(&mut self) {
        self.failed = true;
    }

    fn usable(&self) -> io::Result<()> {
        match self.failed {
            true => Err(io::Error::other("an earlier write or flush of the raft log failed; restart the node")),
            false => Ok(()),
        }
    }

    /// The generation new records are written in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts a generation newer than `absorbed`, flushed: none of this journal's records, of
    /// `absorbed` or older, may be read again (see `LogStore::open`).
    pub fn restart_past(&mut self, absorbed: u64) -> io::Result<()> {
        self.generation = self.generation.max(absorbed);
        self.restart(true)
    }

    /// Starts a new generation: everything recorded so far is in LMDB and must never be read
    /// again. With `sync`, durable before it returns, so no flushed record of the new
    /// generation can be read with the old header.
    pub fn restart(&mut self, sync: bool) -> io::Result<()> {
        self.usable()?;
        let generation = self.generation.saturating_add(1 + self.jump);
        let result = self.file.write_all_at(&header(generation), 0).and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        // Records appended after a failed restart would be of a generation the header on disk
        // may not name, or one already absorbed: recovery would never read them.
        self.failed |= result.is_err();
        result?;
        self.generation = generation;
        self.end = HEADER_BYTES;
        self.flushed = false;
        self.jump = 0;
        Ok(())
    }
}

/// `[len u32][crc u32][generation u64]` before each record's payload.
#[derive(Debug, Default, PartialEq, Eq)]
struct RecordHead {
    len: u32,
    crc: u32,
    generation: u64,
}

impl RecordHead {
    fn encode(&self) -> [u8; RECORD_HEAD] {
        let mut h = [0u8; RECORD_HEAD];
        h[0..4].copy_from_slice(&self.len.to_le_bytes());
        h[4..8].copy_from_slice(&self.crc.to_le_bytes());
        h[8..16].copy_from_slice(&self.generation.to_le_bytes());
        h
    }

    fn decode(raw: &[u8; RECORD_HEAD]) -> RecordHead {
        RecordHead {
            len: u32::from_le_bytes(raw[0..4].try_into().unwrap()),
            crc: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
            generation: u64::from_le_bytes(raw[8..16].try_into().unwrap()),
        }
    }
}

/// A record's checksum: over its generation and payload.
fn checksum(generation: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn header(generation: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The generation a `header` names, if it is one.
fn generation_in(header: &[u8; 20]) -> Option<u64> {
    let magic = u64::from_le_bytes(header[0..8].try_into().unwrap());
    let generation = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let crc = u32::from_le_bytes(header[16..20].try_into().unwrap());
    (magic == MAGIC && crc == crc32fast::hash(&header[0..16])).then_some(generation)
}

/// Writes the whole file under a temporary name and renames it, so a journal that exists is
/// complete.
fn create(path: &Path, capacity: u64) -> io::Result<()> {
    let tmp = path.with_extension("new");
    let mut file = File::create(&tmp)?;
    let mut first = vec![0u8; HEADER_BYTES as usize];
    first[..20].copy_from_slice(&header(1));
    file.write_all(&first)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = capacity.saturating_sub(HEADER_BYTES);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_names_its_generation_and_nothing_else_passes_for_one() {
        assert_eq!(generation_in(&header(7)), Some(7));
        let mut damaged = header(7);
        damaged[9] ^= 1;
        assert_eq!(generation_in(&damaged), None);
        assert_eq!(generation_in(&[0u8; 20]), None);
    }

    #[test]
    fn records_come_back_in_order_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
            assert!(records.is_empty());
            j.append(b"one", true).unwrap();
            j.append(b"two", false).unwrap();
        }
        let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"one".to_vec(), b"two".to_vec()]);
        // New records go after the ones read back.
        j.append(b"three", true).unwrap();
        drop(j);
        let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records.len(), 3);
        // After a restart the old records, still on disk past the new end, are not read.
        j.restart(true).unwrap();
        j.append(b"x", true).unwrap();
        drop(j);
        let (_, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"x".to_vec()]);
    }

    #[test]
    fn after_a_failed_write_nothing_more_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
        j.append(b"one", true).unwrap();
        // A transient error: the restart's header write fails, and the disk then works again.
        let writable = std::mem::replace(&mut j.file, File::open(&path).unwrap());
        assert!(j.restart(true).is_err());
        j.file = writable;
        assert!(j.append(b"two", true).is_err(), "a record after a failed restart would never be read back");
        assert!(j.sync().is_err());
        assert!(j.restart(true).is_err());
        drop(j);
        let (_, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"one".to_vec()]);

        let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
        j.fail();
        assert!(j.append(b"three", true).is_err(), "a failed flush elsewhere fails the journal too");
    }

    #[test]
    fn a_torn_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
            j.append(b"kept", true).unwrap();
            j.append(b"torn record", true).unwrap();
            j.append(b"after", true).unwrap();
        }
        // Flip a byte in the second record's payload.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", HEADER_BYTES + (RECORD_HEAD + 4) as u64 + RECORD_HEAD as u64 + 2).unwrap();
        let (j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"kept".to_vec()]);
        assert!(j.fits(100));
        assert!(!j.fits(1 << 16));
    }

    #[test]
    fn records_of_a_generation_whose_header_was_lost_never_come_back() {
        // Below durability high a restart's header may not reach the disk while the records
        // written after it do: the header on disk then names the generation before theirs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let old_header;
        {
            let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
            j.append(b"absorbed", true).unwrap();
            let mut head = [0u8; 20];
            j.file.read_exact_at(&mut head, 0).unwrap();
            old_header = head;
            j.restart(false).unwrap();
            j.append(b"stale one", false).unwrap();
            j.append(b"stale two", false).unwrap();
        }
        OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&old_header, 0).unwrap();
        let (j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert!(records.is_empty(), "the stale generation's records do not match the header");
        drop(j);
        // The generation the open started is not the lost one: its records stay out.
        let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert!(records.is_empty(), "{records:?}");
        j.append(b"fresh", true).unwrap();
        drop(j);
        let (_, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"fresh".to_vec()]);
    }

    #[test]
    fn a_flushed_record_is_remembered_until_the_next_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&dir.path().join("journal"), 1 << 16).unwrap();
        j.sync().unwrap();
        assert!(!j.holds_flushed_records(), "nothing to flush");
        j.append(b"unflushed", false).unwrap();
        assert!(!j.holds_flushed_records());
        j.sync().unwrap();
        assert!(j.holds_flushed_records());
        j.restart(false).unwrap();
        assert!(!j.holds_flushed_records());
        j.append(b"flushed", true).unwrap();
        assert!(j.holds_flushed_records());
    }

    #[test]
    fn records_behind_a_torn_first_record_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            // Unflushed writes: after a crash the first may be torn while the second survived.
            let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
            j.append(b"first", false).unwrap();
            j.append(b"stale", false).unwrap();
        }
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", HEADER_BYTES + RECORD_HEAD as u64).unwrap();
        let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert!(records.is_empty());
        // A new record exactly where, and as long as, the torn one.
        j.append(b"fresh", true).unwrap();
        drop(j);
        let (_, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"fresh".to_vec()]);

        // The same when the first record's page never reached the disk at all (zeros).
        let path = dir.path().join("journal-zeroed");
        {
            let (mut j, _) = Journal::open(&path, 1 << 16).unwrap();
            j.append(b"first", false).unwrap();
            j.append(b"stale", false).unwrap();
        }
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0u8; RECORD_HEAD + 5], HEADER_BYTES).unwrap();
        let (mut j, records) = Journal::open(&path, 1 << 16).unwrap();
        assert!(records.is_empty());
        j.append(b"fresh", true).unwrap();
        drop(j);
        let (_, records) = Journal::open(&path, 1 << 16).unwrap();
        assert_eq!(records, vec![b"fresh".to_vec()], "the stale record stays out");
    }
}
