//! Reading a snapshot file back: its header alone, a whole-file check, and its records one by
//! one, never trusting a length before the checksum has vouched for it.

use super::*;

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
                Ok(_) => return Err(SnapshotError::Corrupt(format!("unexpected bytes after the trailer at offset {}", self.pos))),
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
    let members =
        serde_json::from_slice(&r.field("members")?).map_err(|e| SnapshotError::Corrupt(format!("members do not decode: {e}")))?;
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
