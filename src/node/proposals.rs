//! What the leader is asked to do: client proposals, membership changes, new addresses of a member
//! that moved, and ReadIndex rounds, with their deadlines and what they get when leadership is lost.

use super::*;

impl<S: StateMachine> RaftLoop<S> {
    pub(super) fn not_leader(&self) -> Option<ProposeError> {
        if self.raw.raft.state == StateRole::Leader {
            None
        } else {
            let leader = self.raw.raft.leader_id;
            Some(ProposeError::NotLeader { leader: (leader != 0).then_some(NodeId(leader)) })
        }
    }

    pub(super) fn propose(&mut self, mut data: Vec<u8>, waiter: S::Waiter, deadline: Instant) {
        if let Some(err) = self.not_leader() {
            return waiter.fail(err);
        }
        // Proposals stamped on different threads can arrive out of order, and a new leader's
        // clock can be behind its predecessor's: an entry never happens before the one ahead of
        // it. Nor at or before a time the state machine claimed to expire keys by: a millisecond
        // later, as a read that claimed a time may run into the next millisecond. Nor, under a
        // new leader, before what an earlier leader may have claimed (see `CLAIM_LEAD`).
        let term = Term(self.raw.raft.term);
        if self.floor_raised_in != term {
            if self.time_floor.0 != i64::MIN {
                self.time_floor = EntryTime(self.time_floor.0.saturating_add(CLAIM_LEAD.0));
            }
            self.floor_raised_in = term;
        }
        let mut gate = self.shared.time_gate.lock().unwrap_or_else(|p| p.into_inner());
        let floor = self.time_floor.max(EntryTime(gate.claimed.0.saturating_add(1)));
        if let Some(at) = command_entry::raise_time(&mut data, floor) {
            self.time_floor = at;
        }
        let before = self.raw.raft.raft_log.last_index();
        let proposed = self.raw.propose(Vec::new(), data);
        gate.last_index = LogIndex(self.raw.raft.raft_log.last_index());
        drop(gate);
        match proposed {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index == before {
                    return waiter.fail(ProposeError::Dropped("raft did not append the entry".into()));
                }
                let term = Term(self.raw.raft.term);
                CounterCells::add(&self.shared.counters.proposals, 1);
                self.proposals.insert(LogIndex(index), Pending { term, deadline, waiter });
            }
            Err(e) => waiter.fail(ProposeError::Dropped(e.to_string())),
        }
    }

    pub(super) fn propose_membership(&mut self, change: MembershipChange, waiter: Callback<()>, deadline: Instant) {
        if let Some(err) = self.not_leader() {
            return waiter(Err(err));
        }
        let adds = matches!(change, MembershipChange::AddLearner(_) | MembershipChange::AddVoter(_));
        if let Some(rec) = self.pending_recovery().filter(|_| adds) {
            return waiter(Err(ProposeError::Dropped(recovery_pending_message(rec))));
        }
        if self.left_behind(change.node_id()) && !matches!(change, MembershipChange::Remove(_)) {
            let why = format!("node {} was left behind by a recovery: it must join with another id", change.node_id());
            return waiter(Err(ProposeError::Refused(why)));
        }
        let (cc, context) = change.to_raft();
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(context, cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() > before => {
                let index = LogIndex(self.raw.raft.raft_log.last_index());
                self.membership_waiters.insert(index, (Term(self.raw.raft.term), deadline, waiter));
            }
            Ok(()) => waiter(Err(ProposeError::Dropped("raft did not append the change".into()))),
            Err(e) => waiter(Err(ProposeError::Dropped(e.to_string()))),
        }
    }

    /// On the leader: gives a member heard at new addresses those addresses, through the log, one
    /// membership change at a time and at most one attempt a second.
    pub(super) fn propose_readdress(&mut self) {
        if self.not_leader().is_some() || self.raw.raft.has_pending_conf() {
            return;
        }
        if self.readdress_proposed.is_some_and(|at| at.elapsed() < READDRESS_EVERY) {
            return;
        }
        let learners = &self.raw.raft.prs().conf().learners();
        let Some(change) = self.readdress.next(&self.members, |id| learners.contains(&id.get())) else { return };
        log::info!("raft {}: proposing new addresses for a member: {change:?}", self.id);
        self.readdress_proposed = Some(Instant::now());
        let id = self.id;
        let logged: Callback<()> = Box::new(move |result| {
            if let Err(e) = result {
                log::warn!("raft {id}: new addresses for a member not recorded ({e}); retrying");
            }
        });
        self.propose_membership(change, logged, Instant::now() + READDRESS_EVERY * 10);
    }

    /// All reads queued this round share one ReadIndex request.
    pub(super) fn start_reads(&mut self) {
        if self.reads_to_start.is_empty() {
            return;
        }
        if let Some(err) = self.not_leader() {
            for (_, _, w) in std::mem::take(&mut self.reads_to_start) {
                w(Err(err.clone()));
            }
            return;
        }
        if !self.raw.raft.commit_to_current_term() {
            // A new leader until its first entry commits: raft drops a ReadIndex request then
            // (it cannot know the commit index yet), and would never answer it. The reads wait
            // here for that entry, about one round trip, or fail with the leadership or their
            // deadline.
            return;
        }
        let reads = std::mem::take(&mut self.reads_to_start);
        let term = Term(self.raw.raft.term);
        let mut confirmable = Vec::with_capacity(reads.len());
        for (deadline, wanted, w) in reads {
            match wanted {
                Some(t) if t != term => w(Err(ProposeError::LeadershipLost)),
                _ => confirmable.push((deadline, w)),
            }
        }
        let reads = confirmable;
        if reads.is_empty() {
            return;
        }
        let id = self.next_read_id;
        self.next_read_id += 1;
        CounterCells::add(&self.shared.counters.read_index_rounds, 1);
        CounterCells::add(&self.shared.counters.reads, reads.len() as u64);
        self.raw.read_index(id.to_be_bytes().to_vec());
        self.reads_in_flight.insert(id, reads);
    }

    pub(super) fn complete_reads(&mut self, states: Vec<raft::ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else { continue };
            if let Some(reads) = self.reads_in_flight.remove(&u64::from_be_bytes(bytes)) {
                for (_, w) in reads {
                    w(Ok(LogIndex(rs.index)));
                }
            }
        }
    }

    pub(super) fn expire(&mut self, now: Instant) {
        self.proposals.expire(now);
        let expired: Vec<LogIndex> = self.membership_waiters.iter().filter(|(_, (_, d, _))| *d <= now).map(|(i, _)| *i).collect();
        for i in expired {
            if let Some((_, _, w)) = self.membership_waiters.remove(&i) {
                w(Err(ProposeError::Timeout));
            }
        }
        for reads in self.reads_in_flight.values_mut() {
            let (expired, alive): (Vec<_>, Vec<_>) = std::mem::take(reads).into_iter().partition(|(d, _)| *d <= now);
            *reads = alive;
            for (_, w) in expired {
                w(Err(ProposeError::Timeout));
            }
        }
        self.reads_in_flight.retain(|_, reads| !reads.is_empty());
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_to_start).into_iter().partition(|(d, _, _)| *d <= now);
        self.reads_to_start = waiting;
        for (_, _, w) in expired {
            w(Err(ProposeError::Timeout));
        }
    }

    /// A leader that stepped down cannot vouch for anything it had in flight.
    pub(super) fn check_leadership(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if !is_leader {
            self.leader_ready = false;
            self.shared.ready_index.store(0, Ordering::Release);
        }
        let term = if is_leader { self.raw.raft.term } else { 0 };
        self.shared.leading_term.store(term, Ordering::Release);
        let lost = self.was_leader && !is_leader;
        self.was_leader = is_leader;
        if lost {
            log::warn!("raft {} lost leadership at term {}", self.id, self.raw.raft.term);
            // Published before the waiters hear of it: whoever acts on a failed request (Redis'
            // main thread) must already see that this node no longer leads, and who does.
            self.publish_status();
            self.fail_everything(ProposeError::LeadershipLost);
        }
    }

    pub(super) fn fail_everything(&mut self, err: ProposeError) {
        self.proposals.fail_all(err.clone());
        for (_, (_, _, w)) in std::mem::take(&mut self.membership_waiters) {
            w(Err(err.clone()));
        }
        for (_, w) in std::mem::take(&mut self.reads_in_flight).into_values().flatten() {
            w(Err(err.clone()));
        }
        for (_, _, w) in std::mem::take(&mut self.reads_to_start) {
            w(Err(err.clone()));
        }
    }
}

pub(super) fn fail_request<W: Waiter>(req: Request<W>, err: ProposeError) {
    match req {
        Request::Propose { waiter, .. } => waiter.fail(err),
        Request::ChangeMembership { waiter, .. } => waiter(Err(err)),
        Request::ReadIndex { waiter, .. } => waiter(Err(err)),
        Request::LastProposed(waiter) => waiter(Err(err)),
        Request::Recover(done) => drop(done.send(Err(err.to_string()))),
        _ => {}
    }
}
