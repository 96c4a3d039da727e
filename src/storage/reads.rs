//! Reading the log back: entries (from the in-memory tail or LMDB), terms and the snapshot, and
//! the `raft::Storage` trait raft-rs reads through.

use super::*;

impl LogStore {
    fn read_entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>> {
        let tail = self.tail();
        let state = self.state();
        if low < state.first_index() {
            return Err(StorageError::Compacted { index: low, first_index: state.first_index() });
        }
        if high > state.last_index + 1 {
            return Err(StorageError::Unavailable { index: high - 1, last_index: state.last_index });
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let max_size = max_size.filter(|&max| max != raft::NO_LIMIT);

        // Entries from the tail's first on are read from the tail; LMDB's, if any, are stale.
        let split = if tail.entries.is_empty() { high } else { tail.first.clamp(low, high) };
        let txn = self.inner.env.read_txn()?;
        let mut stored = self.inner.entries.range(&txn, &(low..split))?;
        let mut out = Vec::with_capacity(cmp::min(high - low, 1024) as usize);
        // Same accounting as raft::util::limit_size: an entry weighs its encoded length (what
        // we stored), and the first one is returned whatever its size so that Raft always makes
        // progress.
        let mut size = 0u64;
        let mut room_for = |out: &Vec<Entry>, encoded_len: usize| {
            size = size.saturating_add(encoded_len as u64);
            out.is_empty() || max_size.is_none_or(|max| size <= max)
        };
        for expected in low..split {
            let (index, bytes) = stored.next().ok_or_else(|| missing_entry(expected))??;
            if index != expected {
                return Err(missing_entry(expected));
            }
            let body = unseal(index, bytes)?;
            if !room_for(&out, body.len()) {
                return Ok(out);
            }
            out.push(Entry::decode(body)?);
        }
        if split < high {
            for e in &tail.entries[(split - tail.first) as usize..(high - tail.first) as usize] {
                if !room_for(&out, e.entry.encoded_len()) {
                    break;
                }
                out.push(e.entry.clone());
            }
        }
        Ok(out)
    }

    fn read_term(&self, index: u64) -> Result<u64> {
        let tail = self.tail();
        let state = self.state();
        if index == state.truncated_index {
            return Ok(state.truncated_term);
        }
        if index < state.first_index() {
            return Err(StorageError::Compacted { index, first_index: state.first_index() });
        }
        if index > state.last_index {
            return Err(StorageError::Unavailable { index, last_index: state.last_index });
        }
        if !tail.entries.is_empty() && index >= tail.first {
            return Ok(tail.entries[(index - tail.first) as usize].entry.term);
        }
        let txn = self.inner.env.read_txn()?;
        self.stored_term(&txn, index)
    }

    fn read_snapshot(&self) -> Result<Option<Snapshot>> {
        let txn = self.inner.env.read_txn()?;
        let Some(metadata) = decode_meta::<SnapshotMetadata>(&txn, self.inner.meta, key::SNAPSHOT_META)? else {
            return Ok(None);
        };
        let data = self.inner.meta.get(&txn, key::SNAPSHOT_DATA)?.map(<[u8]>::to_vec).unwrap_or_default();
        Ok(Some(Snapshot { data, metadata: Some(metadata) }))
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let state = self.state();
        Ok(RaftState::new(state.hard_state.clone(), state.conf_state.clone()))
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, _context: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        Ok(self.read_entries(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.read_term(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // No snapshot at all, one older than the follower needs, or one taken before the
        // follower joined (raft would drop it: it must find itself in the snapshot's ConfState):
        // the application has to make a newer one first. Raft retries later on this error
        // instead of sending a useless one.
        let includes = |cs: &ConfState| to == 0 || cs.voters.contains(&to) || cs.learners.contains(&to);
        match self.read_snapshot()? {
            Some(snapshot)
                if snapshot.metadata.as_ref().map_or(0, |m| m.index) >= request_index
                    && snapshot.metadata.as_ref().and_then(|m| m.conf_state.as_ref()).is_some_and(includes) =>
            {
                Ok(snapshot)
            }
            _ => {
                if to != 0 {
                    self.inner.snapshot_wanted.store(true, Ordering::Relaxed);
                }
                Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}
