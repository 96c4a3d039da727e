//! The Raft loop's round: wait for requests (or the next tick), handle them, then process one
//! Ready (send, persist, apply) and publish the node's status. The rest of what the loop does is
//! in its sibling files, by concern.

use super::proposals::fail_request;
use super::*;

impl<S: StateMachine> RaftLoop<S> {
    /// Runs the loop until the node stops, then answers everything still waiting. A panic in a
    /// round stops the node as an error would, rather than leave it serving with a frozen status.
    pub(super) async fn run(mut self) {
        if let Err(panic) = crate::unwind::CatchUnwind::new(self.rounds()).await {
            self.stop_on(anyhow::anyhow!("internal error: {panic}"));
        }
        self.wind_down();
    }

    async fn rounds(&mut self) {
        let mut last_tick = Instant::now();
        while !self.shutdown {
            // From the tick length now, not the one at the last tick: a shorter `tick-ms` set
            // after a long one takes effect at once (the change wakes the loop).
            let next_tick = last_tick + self.tick_interval();
            if let Some(why) = self.removed.take() {
                self.leave(why);
                break;
            }
            if let Some(why) = self.must_stop.take() {
                self.stop_on(why);
                break;
            }
            // With compaction left to do, or after a campaign started outside a round (new
            // timeouts on a single node), a round runs at once even if nothing arrives.
            let again = self.compacting() || std::mem::take(&mut self.campaigned);
            let wake_at = if again { Instant::now() } else { next_tick };
            let received = tokio::time::timeout_at(wake_at.into(), self.rx.recv()).await;
            let started = Instant::now();
            let mut requests = 0;
            match received {
                Ok(Some(req)) => {
                    let mut round = std::mem::take(&mut self.round);
                    round.push(req);
                    while round.len() < MAX_REQUESTS_PER_ROUND {
                        match self.rx.try_recv() {
                            Ok(req) => round.push(req),
                            Err(_) => break,
                        }
                    }
                    let messages = round.iter_mut().filter_map(|req| match req {
                        Request::Raft(msgs) => Some(msgs),
                        _ => None,
                    });
                    let skipped = heartbeats::drop_superseded(messages);
                    CounterCells::add(&self.shared.counters.heartbeats_coalesced, skipped as u64);
                    requests = round.len();
                    for req in round.drain(..) {
                        self.handle(req);
                    }
                    self.round = round;
                }
                Ok(None) => break,
                Err(_elapsed) => {}
            }
            // Read once per round: the append below must be flushed exactly when the earlier,
            // unflushed writes were (a durability raised in between would fsync the journal
            // alone, over a log whose older part may still be lost). Read after the round's
            // requests are taken: a write sent after `RAFT.CONFIG SET durability high` answered
            // is in this round at the earliest, and must see it.
            let sync = self.sync_writes();
            if let Err(e) = self.store.set_ordered_commits(sync).context("flushing the log as durability rises to high") {
                self.stop_on(e);
                break;
            }
            CounterCells::add(&self.shared.counters.rounds, 1);
            let now = Instant::now();
            let ticked = now >= next_tick;
            if ticked {
                self.raw.tick();
                last_tick = now;
                self.expire(now);
                self.ask_leader_health();
            }
            self.start_wanted_transfer();
            self.start_reads();
            if let Err(e) = self.on_ready(sync).await {
                self.stop_on(e);
                break;
            }
            if ticked {
                if let Err(e) = self.store.store_commit_if_behind().context("persisting the commit index") {
                    self.stop_on(e);
                    break;
                }
            }
            self.transport.set_last_index(membership_claim(&self.raw, self.id));
            self.compact_step();
            if self.store.take_snapshot_wanted() {
                self.sm.request_snapshot();
            }
            self.check_leadership();
            self.propose_readdress();
            self.adopt_cluster_id();
            if let Err(e) = self.apply_wanted_ticks() {
                self.stop_on(e);
                break;
            }
            if let Err(e) = self.recover_if_wanted() {
                self.stop_on(e);
                break;
            }
            self.finish_recovery();
            self.publish_status();
            for (w, result) in self.membership_done.drain(..) {
                w(result);
            }
            self.account_round(started.elapsed(), requests);
            // Lets the connections write what this round sent (acknowledgements, heartbeats)
            // even while more requests keep the channel busy.
            tokio::task::yield_now().await;
        }
    }

    fn wind_down(&mut self) {
        self.shared.leading_term.store(0, Ordering::Release);
        self.shared.ready_index.store(0, Ordering::Release);
        // The commit index is written lazily; a clean stop leaves the newest on disk.
        if let Err(e) = self.store.store_commit() {
            log::warn!("raft {}: could not store the commit index at shutdown: {e:#}", self.id);
        }
        // Below durability=high, what was written since the last flush is flushed now: a clean
        // stop leaves nothing for a power loss right after it (a VM stopped with the service).
        if durability_from_code(self.shared.durability.load(Ordering::Relaxed)) != Durability::High {
            if let Err(e) = self.store.sync() {
                log::warn!("raft {}: could not flush the log at shutdown: {e:#}", self.id);
            }
        }
        self.fail_everything(ProposeError::Shutdown);
        // Requests that raced with the stop still get an answer.
        self.rx.close();
        while let Ok(req) = self.rx.try_recv() {
            fail_request(req, ProposeError::Shutdown);
        }
        self.publish_status();
    }

    /// Records why the loop is about to stop, for the log and for `Status::fatal`.
    fn stop_on(&mut self, e: anyhow::Error) {
        let mut msg = format!("{e:#}");
        let disk_failed = e.chain().any(|cause| {
            cause.is::<std::io::Error>()
                || matches!(cause.downcast_ref::<StorageError>(), Some(StorageError::Lmdb(_) | StorageError::Io(_)))
        });
        if disk_failed {
            // A full disk shows up as a bare I/O error.
            msg = format!("{msg} ({})", crate::disk_space::describe(self.store.path()));
        }
        log::error!("raft node {} stopped: {msg}", self.id);
        self.sm.stopped(&msg);
        self.lock_status().fatal = Some(msg);
    }

    /// Stops for good: this node is no longer a member, so nothing it holds is replicated any
    /// more and it must serve nothing (raft would leave it campaigning, or following nobody, for
    /// ever). Whoever learnt of the removal has recorded it, so a restart stops again at once.
    pub(super) fn leave(&mut self, why: String) {
        for id in self.members.keys() {
            self.transport.remove_peer(*id);
        }
        log::error!("raft node {} stopped: {why}", self.id);
        self.sm.removed(&why);
        self.lock_status().fatal = Some(why);
    }

    fn account_round(&mut self, took: Duration, requests: usize) {
        let counters = &self.shared.counters;
        counters.max_round_micros.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
        if took < SLOW_ROUND {
            return;
        }
        CounterCells::add(&counters.slow_rounds, 1);
        if self.slow_round_logged.is_none_or(|at| at.elapsed() >= SLOW_ROUND_LOG_EVERY) {
            self.slow_round_logged = Some(Instant::now());
            log::warn!(
                "raft {}: one loop round took {took:?} ({requests} requests); meanwhile this node sent no heartbeats \
                 and read nothing from its peers (RAFT.STATS slow_rounds counts them all)",
                self.id
            );
        }
    }

    pub(super) fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.shared.tick_ms.load(Ordering::Relaxed))
    }

    /// raft's election timeout as this loop runs it now.
    pub(super) fn election_timeout(&self) -> Duration {
        self.tick_interval() * self.raw.raft.election_timeout() as u32
    }

    fn handle(&mut self, req: Request<S::Waiter>) {
        match req {
            Request::Propose { data, waiter, deadline } => self.propose(data, waiter, deadline),
            Request::ChangeMembership { change, waiter, deadline } => self.propose_membership(change, waiter, deadline),
            Request::ReadIndex { waiter, deadline, term } => self.reads_to_start.push((deadline, term, waiter)),
            Request::LastProposed(waiter) => match self.not_leader() {
                Some(err) => waiter(Err(err)),
                None => waiter(Ok(LogIndex(self.raw.raft.raft_log.last_index()))),
            },
            Request::Raft(msgs) => {
                let now = Instant::now();
                for m in msgs {
                    if self.left_behind(NodeId(m.from)) {
                        continue;
                    }
                    self.last_heard.insert(NodeId(m.from), now);
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        self.on_snapshot_message(m);
                    } else {
                        self.step(m);
                    }
                }
            }
            Request::SnapshotFetched { msg, ok } => {
                self.fetching = None;
                if ok {
                    self.step(*msg);
                }
            }
            Request::SnapshotTaken(taken, done) => match self.on_snapshot_taken(taken) {
                Ok(()) => drop(done.send(())),
                Err(e) => log::error!("raft {}: could not record a new snapshot: {e:#}", self.id),
            },
            Request::Hello { from, addr, client_addr } => {
                if from == self.id || self.left_behind(from) || self.departed.contains(&from) {
                    return;
                }
                // The member list is authoritative: a hello fills in peers we have not learnt yet
                // (e.g. the leader, seen by a node that is joining), and a member at new addresses
                // gets them through the log.
                self.readdress.heard(&self.members, from, &addr, client_addr.as_deref());
                if self.transport.peer_addr(from).is_none() {
                    self.transport.set_peer_addr(from, addr);
                }
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id.get()),
            // Several members may say so in one round; the first is recorded.
            Request::Removed { by, why } if self.removed.is_none() => {
                log::warn!("raft {}: node {by} says this node was removed from the cluster: {why}", self.id);
                let why = format!("removed from the cluster: {why}");
                if let Err(e) = self.store.put_meta(META_REMOVED, why.as_bytes()) {
                    log::warn!("raft {}: could not record its removal (a restart learns it again): {e:#}", self.id);
                }
                self.removed = Some(why);
            }
            Request::Removed { .. } => {}
            Request::FlushFailed(why) => _ = self.must_stop.get_or_insert(why),
            Request::TransferLeader(to) => self.want_transfer(to),
            Request::SetTicks { election, heartbeat } => self.want_ticks(election, heartbeat),
            // Only wakes the loop, which reads the new length (`rounds`).
            Request::TickChanged => {}
            Request::Recover(done) => {
                if let Some(earlier) = self.recover_wanted.replace(done) {
                    let _ = earlier.send(Err("another RECOVER came first".into()));
                }
            }
            Request::Shutdown => self.shutdown = true,
        }
    }

    pub(super) fn step(&mut self, m: Message) {
        if let Some(why) = self.lost_acknowledged_entries(&m).or_else(|| self.kept_entries_the_cluster_lost(&m)) {
            // raft would panic on this heartbeat, or leave the node stuck on that append;
            // nothing this node can do makes it whole.
            self.must_stop.get_or_insert(why);
            return;
        }
        // A message for another id (a misrouted or stale peer) is dropped by raft with an error;
        // nothing to do but log at debug level.
        if let Err(e) = self.raw.step(m) {
            log::debug!("raft {} ignored a message: {e}", self.id);
        }
    }

    /// Why this node must stop, if `m` is a heartbeat from a current leader that says this node
    /// holds entries past the end of its log. The leader only counts an entry as a follower's
    /// once the follower has acknowledged it, so entries this node acknowledged are gone: its
    /// raft dir went back in time. raft cannot repair that under the same id (it panics here),
    /// and the node must not vote as if its log were whole.
    fn lost_acknowledged_entries(&self, m: &Message) -> Option<anyhow::Error> {
        let last = self.raw.raft.raft_log.last_index();
        if m.get_msg_type() != MessageType::MsgHeartbeat || m.term < self.raw.raft.term || m.commit <= last {
            return None;
        }
        let (leader, held) = (m.from, m.commit);
        Some(anyhow::anyhow!(
            "this node's log ends at index {last}, but the leader (node {leader}) has it down as holding entries \
             up to {held}: entries it acknowledged are gone. Its raft dir is older than the node itself (a backup \
             or a copy started in its place), or it lost writes in a machine crash (durability low or medium). {}",
            self.rebuild_advice()
        ))
    }

    /// Why this node must stop, if `m` is an append from a current leader that puts another
    /// entry where this node has one it counts as committed. Every leader holds every committed
    /// entry, so the cluster lost entries it had committed: a power loss on a majority below
    /// durability high, which this node survived with more of its log. raft would leave it
    /// stuck (it answers such appends with its commit index, which the leader takes for
    /// progress), and its dataset holds writes the cluster no longer has.
    fn kept_entries_the_cluster_lost(&self, m: &Message) -> Option<anyhow::Error> {
        if m.get_msg_type() != MessageType::MsgAppend || m.term < self.raw.raft.term {
            return None;
        }
        let log = &self.raw.raft.raft_log;
        let sent = std::iter::once((m.index, m.log_term)).chain(m.entries.iter().map(|e| (e.index, e.term)));
        // Outside the log (compacted, or past its end) raft's term is 0: nothing to compare.
        let (index, leaders, ours) = sent
            .filter(|(index, _)| *index > 0 && *index <= log.committed)
            .find_map(|(index, term)| log.term(index).ok().filter(|ours| *ours != 0 && *ours != term).map(|ours| (index, term, ours)))?;
        let leader = m.from;
        Some(anyhow::anyhow!(
            "entry {index} is committed on this node in term {ours}, but the leader (node {leader}) has an entry of \
             term {leaders} there: the cluster lost entries it had committed, which this node kept (a power loss on \
             most nodes at durability low or medium), and this node's dataset holds writes the cluster no longer has. {}",
            self.rebuild_advice()
        ))
    }

    /// What to do with a node whose log no longer matches the cluster's under its id.
    fn rebuild_advice(&self) -> String {
        let id = self.id;
        format!(
            "It cannot rejoin as node {id}: remove it (RAFT.REMOVEPEER {id} on the leader), empty its dir, and join it \
             again (RAFT.CLUSTER JOIN)"
        )
    }

    /// A node that joined has no cluster id until it follows a leader; it then keeps the one
    /// that leader said in its `HELLO`. Raft only follows a leader that reached it through a
    /// connection this node accepted, and a node without an id accepts any: a joining node is
    /// reached by the leader that is adding it and by the members it learns from the log.
    fn adopt_cluster_id(&mut self) {
        if self.transport.cluster_id().is_known() || self.raw.raft.leader_id == 0 || self.raw.raft.leader_id == self.id.get() {
            return;
        }
        let Some(id) = self.transport.cluster_said_by(NodeId(self.raw.raft.leader_id)).filter(|id| id.is_known()) else {
            return;
        };
        match id.save(&self.store) {
            Ok(()) => {
                log::info!("raft {}: this node is in cluster {id}", self.id);
                self.transport.set_cluster_id(id);
            }
            Err(e) => log::warn!("raft {}: could not record the cluster id (it is learnt again): {e:#}", self.id),
        }
    }

    fn sync_writes(&self) -> bool {
        let durability = durability_from_code(self.shared.durability.load(Ordering::Relaxed));
        durability == Durability::High
    }

    /// The time of the newest timed entry in the log (at start: the floor of this node's
    /// proposals, should it lead). Entries from before the last snapshot are applied: the
    /// module never stamps a proposal before an entry it applied.
    pub(super) fn newest_time_in_log(&self) -> EntryTime {
        // Membership entries and a new leader's empty ones carry no time: a few at the end at
        // most, but a log written before entries carried times has none anywhere.
        const LOOK_BACK: u64 = 1000;
        let log = &self.raw.raft.raft_log;
        let mut index = log.last_index();
        while index >= log.first_index() && index > 0 && log.last_index() - index < LOOK_BACK {
            match log.entries(index, 1, raft::GetEntriesContext::empty(false)) {
                Ok(entries) => {
                    if let Some(at) = entries.first().and_then(entry_time) {
                        return at;
                    }
                }
                Err(e) => {
                    log::warn!("raft {}: cannot read entry {index} for its time: {e}", self.id);
                    break;
                }
            }
            index -= 1;
        }
        EntryTime(i64::MIN)
    }

    /// Persists and sends what raft has ready; `sync`: durability is high for this round.
    async fn on_ready(&mut self, sync: bool) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        CounterCells::add(&self.shared.counters.readies, 1);

        // A leader may send appends while it persists its own copy: it only counts itself
        // towards the quorum once the entries are persisted (after advance).
        if !ready.messages().is_empty() {
            self.send(ready.take_messages());
            if !ready.entries().is_empty() {
                // The appends leave before the fsync below, not after it.
                tokio::task::yield_now().await;
            }
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone(), sync)?;
        }
        self.handle_committed(ready.take_committed_entries())?;
        let entries = ready.take_entries();
        // A leader's own proposals raised it already; a follower's appends may make it newer.
        for entry in &entries {
            if let Some(at) = entry_time(entry) {
                self.time_floor = self.time_floor.max(at);
            }
        }
        if !entries.is_empty() || ready.hs().is_some() {
            // Only entries, term and vote must be on disk before we answer; a commit index that
            // is lost in a crash is learnt again from the leader. A term or vote is flushed at
            // every durability level: a node that forgot its vote in a power loss could vote
            // again in the same term and elect a second leader, which no level allows. It costs a
            // flush per election, not per write.
            let stored = self.store.hard_state();
            let new_term_or_vote = ready.hs().is_some_and(|hs| hs.term != stored.term || hs.vote != stored.vote);
            let sync = (sync && !entries.is_empty()) || new_term_or_vote;
            let started = Instant::now();
            self.store.append(&entries, ready.hs(), sync).context("persisting raft entries")?;
            if !entries.is_empty() {
                // A follower's appends (a leader's own were counted as it proposed them), and
                // the entries of a log a new leader overwrote: what a claim must see applied.
                let mut gate = self.shared.time_gate.lock().unwrap_or_else(|p| p.into_inner());
                gate.last_index = LogIndex(self.raw.raft.raft_log.last_index());
            }
            CounterCells::add(&self.shared.counters.persist_micros, started.elapsed().as_micros() as u64);
            CounterCells::add(&self.shared.counters.entries_persisted, entries.len() as u64);
            if sync {
                CounterCells::add(&self.shared.counters.fsyncs, 1);
            }
            if !sync {
                self.shared.dirty.store(true, Ordering::Release);
            }
        }
        // Votes and append acknowledgements promise that the data is on disk: only now.
        if !ready.persisted_messages().is_empty() {
            self.send(ready.take_persisted_messages());
        }
        self.complete_reads(ready.take_read_states());

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit, false).context("persisting the commit index")?;
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages());
        }
        self.handle_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        Ok(())
    }

    /// Hands messages to the transport. A snapshot is reported as delivered as soon as it is
    /// queued: the follower fetches the file itself and answers when it has installed it; if it
    /// does not, raft probes it again and resends.
    fn send(&mut self, msgs: Vec<Message>) {
        let snapshot_to: Vec<u64> = msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| m.to).collect();
        self.transport.send(msgs);
        for to in snapshot_to {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
    }

    pub(super) fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The membership in force, with ids in a stable order.
    pub(super) fn conf_state(&self) -> ConfState {
        let mut conf = self.raw.raft.prs().conf().to_conf_state();
        conf.voters.sort_unstable();
        conf.learners.sort_unstable();
        conf
    }

    pub(super) fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let conf = self.conf_state();
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if conf.learners.contains(&self.id.get()) => Role::Learner,
            StateRole::Follower => Role::Follower,
        };
        let progress = if role == Role::Leader {
            raft.prs()
                .iter()
                .filter(|(id, _)| **id != self.id.get())
                .map(|(id, pr)| PeerProgress {
                    id: NodeId(*id),
                    matched: LogIndex(pr.matched),
                    next: LogIndex(pr.next_idx),
                    state: format!("{:?}", pr.state).to_lowercase(),
                    is_learner: conf.learners.contains(id),
                    silent_for: self.last_heard.get(&NodeId(*id)).unwrap_or(&self.started_at).elapsed(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let status = Status {
            id: self.id,
            role,
            term: Term(raft.term),
            leader: (raft.leader_id != 0).then_some(NodeId(raft.leader_id)),
            commit: LogIndex(raft.raft_log.committed),
            commit_stored: LogIndex(self.store.stored_commit()),
            applied: LogIndex(raft.raft_log.applied),
            first_index: LogIndex(self.store.first_index()),
            last_index: LogIndex(raft.raft_log.last_index()),
            voters: conf.voters.iter().map(|v| NodeId(*v)).collect(),
            learners: conf.learners.iter().map(|v| NodeId(*v)).collect(),
            members: self.members.clone(),
            progress,
            leader_ready: self.leader_ready,
            pending_proposals: self.proposals.len(),
            election_ticks: raft.election_timeout(),
            heartbeat_ticks: raft.heartbeat_timeout(),
            tick: self.tick_interval(),
            fatal: None,
            recovered: self.recovery.clone(),
            cluster: self.transport.cluster_id(),
            leader_view: None,
        };
        let mut slot = self.lock_status();
        let fatal = slot.fatal.take();
        // The leader's newest report (see `leader_health`) is kept while there is one to follow.
        let leader_view = slot.leader_view.take().filter(|_| role != Role::Leader && status.leader.is_some());
        *slot = Status { fatal, leader_view, ..status };
    }
}

/// The time a client entry happens at (see `command_entry`); None for raft's and membership
/// entries, whose data is not a command.
pub(super) fn entry_time(entry: &Entry) -> Option<EntryTime> {
    (entry.get_entry_type() == EntryType::EntryNormal).then(|| command_entry::time_of(&entry.data)).flatten()
}
