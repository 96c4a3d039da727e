//! Snapshots: installing one sent by the leader (its file fetched first), recording one this node
//! took, and compacting the log behind it a step per round.

use super::*;

impl<S: StateMachine> RaftLoop<S> {
    /// A leader sends us a snapshot: fetch its file first (on another thread), then step it.
    pub(super) fn on_snapshot_message(&mut self, m: Message) {
        let descriptor = m
            .snapshot
            .as_ref()
            .and_then(|snap| snapshot_data::decode(&snap.data).ok().and_then(|(_, app)| SnapshotDescriptor::decode(app)));
        let Some(descriptor) = descriptor else {
            return self.step(m);
        };
        if self.fetching.is_some() {
            return; // one fetch at a time; the leader sends the snapshot again later
        }
        let Some(peer) = self.transport.peer_addr(NodeId(m.from)) else {
            log::warn!("raft {}: snapshot from node {} whose address is unknown", self.id, m.from);
            return;
        };
        log::info!("raft {}: fetching snapshot {} ({} bytes) from node {}", self.id, descriptor.file, descriptor.size, m.from);
        self.fetching = Some(descriptor.file.clone());
        let (tx, dir, id, shared) = (self.self_tx.clone(), self.snapshot_dir.clone(), self.id, self.shared.clone());
        let password = self.transport.password();
        let from = NodeId(m.from);
        let spawned = std::thread::Builder::new().name(format!("raft-fetch-{id}")).spawn(move || {
            let started = Instant::now();
            let mut last = None;
            let result = snapshot_transfer::fetch(&peer, password.as_ref(), &descriptor, &dir, |received| {
                // The first report is what an earlier attempt left: not fetched now.
                let new = last.map_or(0, |l| received.saturating_sub(l));
                last = Some(received);
                CounterCells::add(&shared.counters.snapshot_bytes_fetched, new);
                *shared.fetch.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(FetchProgress { file: descriptor.file.clone(), from, received, size: descriptor.size });
            });
            *shared.fetch.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let ok = match result {
                Ok(()) => {
                    CounterCells::add(&shared.counters.snapshots_fetched, 1);
                    log::info!("raft {id}: fetched snapshot {} in {:?}", descriptor.file, started.elapsed());
                    true
                }
                Err(e) => {
                    CounterCells::add(&shared.counters.snapshot_fetch_failures, 1);
                    log::warn!("raft {id}: fetching snapshot {} from {peer} failed: {e:#}", descriptor.file);
                    false
                }
            };
            let _ = tx.send(Request::SnapshotFetched { msg: Box::new(m), ok });
        });
        if spawned.is_err() {
            self.fetching = None;
        }
    }

    /// The state machine wrote a snapshot file: make it raft's snapshot and compact the log.
    pub(super) fn on_snapshot_taken(&mut self, t: TakenSnapshot) -> anyhow::Result<()> {
        let current = raft::Storage::snapshot(&self.store, 0, 0).map(|s| s.get_metadata().index).unwrap_or(0);
        if t.index.get() <= current {
            return Ok(());
        }
        self.store.set_snapshot(t.to_raft()).context("storing the snapshot metadata")?;
        let mut keep_from = (t.index.get() + 1).saturating_sub(self.trailing_logs);
        let trailing_bytes = self.shared.trailing_bytes.load(Ordering::Relaxed);
        if trailing_bytes > 0 {
            keep_from = self.store.start_within_bytes(keep_from, t.index.get(), trailing_bytes).context("sizing the log tail")?;
        }
        if self.pending_recovery().is_some_and(|r| t.index >= r.at) {
            // Nothing from before the recovery may be left for a new node to replay.
            keep_from = t.index.get() + 1;
        }
        // The entries go in steps, a few each round (`compact_step`), not all in this one.
        self.compact_to = self.compact_to.max(keep_from.min(self.raw.raft.raft_log.applied + 1));
        self.store.sync()?;
        let kept = self.snapshot_dir.join(&t.descriptor.file);
        let _ = crate::snapshot_file::remove_older_than(&self.snapshot_dir, &kept);
        log::info!(
            "raft {}: snapshot at {} ({} bytes); compacting the log from {} up to {}",
            self.id,
            t.index,
            t.descriptor.size,
            self.store.first_index(),
            self.compact_to
        );
        Ok(())
    }

    pub(super) fn compacting(&self) -> bool {
        self.compact_to > self.store.first_index()
    }

    /// Drops the next [`COMPACTION_STEP`] entries of the log below `compact_to`. Not fsynced: a
    /// crash only leaves entries that the next snapshot compacts again.
    pub(super) fn compact_step(&mut self) {
        let first = self.store.first_index();
        if self.compact_to <= first {
            return;
        }
        let to = self.compact_to.min(first.saturating_add(COMPACTION_STEP));
        if let Err(e) = self.store.compact(to) {
            log::error!("raft {}: compacting the log up to {to} failed (the next snapshot retries): {e:#}", self.id);
            self.compact_to = 0;
            return;
        }
        CounterCells::add(&self.shared.counters.compaction_steps, 1);
        if to == self.compact_to {
            log::info!("raft {}: log compacted; it now starts at {to}", self.id);
        }
    }

    pub(super) fn install_snapshot(&mut self, snapshot: Snapshot, sync: bool) -> anyhow::Result<()> {
        let index = snapshot.get_metadata().index;
        let (members, app) = snapshot_data::decode(&snapshot.data)?;
        log::info!("raft {} installing a snapshot at index {index} ({} bytes)", self.id, snapshot.data.len());
        self.sm.restore(LogIndex(index), app);
        let file = SnapshotDescriptor::decode(app).map(|d| d.file);
        // The membership goes to disk in the snapshot's own commit. Recorded before it, a crash
        // in between would leave this node at its old log and configuration but believing it had
        // applied every membership change up to the snapshot: it would skip them as it caught up
        // from the log, and keep a wrong set of voters.
        let (members_json, conf_applied) = super::committed::members_record(&members, LogIndex(index))?;
        let meta: [(&str, &[u8]); 2] = [(META_MEMBERS, &members_json), (META_CONF_APPLIED, &conf_applied)];
        self.store.apply_snapshot(snapshot, &meta, sync).context("storing the snapshot")?;
        // Members removed in the entries the snapshot stands for are dialed no more (their
        // removal is not applied here as an entry).
        let before: Vec<NodeId> = self.members.keys().copied().collect();
        self.members = Arc::new(members);
        self.conf_applied = LogIndex(index);
        self.peers_follow_members(&before);
        // The older files go once the log durably names the new one: below durability high,
        // the commit above is flushed later, and a power cut before then would leave the log
        // naming a file that is gone.
        let durable = sync || self.store.sync().is_ok();
        if let Some(file) = file.filter(|_| durable) {
            let _ = crate::snapshot_file::remove_older_than(&self.snapshot_dir, &self.snapshot_dir.join(file));
        }
        Ok(())
    }
}
