//! Shipping a snapshot file between nodes: chunks read on the sender, and an incoming file
//! written, resumed, verified and renamed on the receiver.

use super::*;

/// Up to `max_len` bytes of `file` from `offset`; empty at or past the end. The buffer is sized
/// by what the file really has left, not by the requested length. The file is open already: one
/// deleted since (a newer snapshot replaced it) can still be read to the end.
pub fn read_chunk(file: &File, offset: u64, max_len: usize) -> io::Result<Vec<u8>> {
    let left = file.metadata()?.len().saturating_sub(offset);
    let want = left.min(max_len as u64);
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut file = file;
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
        Ok(IncomingSnapshot { final_path: final_path.to_path_buf(), part, info, file, offset, expected_size, expected_checksum })
    }

    /// Gives the transfer up and removes what it wrote, so that it takes no room.
    pub fn abandon(self) {
        self.discard();
    }

    /// Removes the partial file and its resume record: the next attempt starts over.
    fn discard(&self) {
        let _ = fs::remove_file(&self.part);
        let _ = fs::remove_file(&self.info);
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
        if let Err(e) = self.file.sync_all() {
            // Not resumed: after a failed fsync the kernel may have dropped pages it could not
            // write, and the next attempt's read would check its own cache, not the disk.
            self.discard();
            return Err(e.into());
        }
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
                self.discard();
                return Err(e);
            }
        };
        fs::rename(&self.part, &self.final_path)?;
        let _ = fs::remove_file(&self.info);
        sync_dir_of(&self.final_path)?;
        Ok(SnapshotSummary { path: self.final_path, ..summary })
    }
}
