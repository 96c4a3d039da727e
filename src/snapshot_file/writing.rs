//! Writing a snapshot file as a stream of records, with the running checksum for the trailer.

use super::*;

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

        let tmp = temp_path(path);
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
