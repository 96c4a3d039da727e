//! Committed entries: handed to the state machine in batches, and membership changes applied to
//! raft and to the address book.

use super::raft_loop::entry_time;
use super::*;

impl<S: StateMachine> RaftLoop<S> {
    pub(super) fn handle_committed(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let Some((last, last_term)) = entries.last().map(|e| (LogIndex(e.index), Term(e.term))) else {
            return Ok(());
        };
        let mut batch = Vec::with_capacity(entries.len());
        if let Some(at) = entries.iter().rev().find_map(entry_time) {
            let mut gate = self.shared.time_gate.lock().unwrap_or_else(|p| p.into_inner());
            gate.committed = gate.committed.max(at);
        }
        for entry in entries {
            let index = LogIndex(entry.index);
            let term = Term(entry.term);
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A leader's no-op. A membership waiter at this index means raft replaced
                    // our change because another one was still pending.
                    if let Some((_, _, w)) = self.membership_waiters.remove(&index) {
                        w(Err(ProposeError::Dropped("another membership change is in progress".into())));
                    }
                    if term.get() == self.raw.raft.term && self.raw.raft.state == StateRole::Leader && !self.leader_ready {
                        self.leader_ready = true;
                        self.shared.ready_index.store(index.get(), Ordering::Release);
                    }
                }
                EntryType::EntryNormal => {
                    let waiter = self.proposals.take_committed(index, term);
                    batch.push(Committed { index, term, data: entry.data, waiter });
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::decode(entry.data.as_slice()).context("decoding a membership entry")?;
                    self.apply_membership(index, &cc)?;
                    if let Some((t, _, w)) = self.membership_waiters.remove(&index) {
                        // Answered after this round's status is published, so the caller sees
                        // the new membership in `status()`.
                        self.membership_done.push((w, if t == term { Ok(()) } else { Err(ProposeError::Overwritten) }));
                    }
                }
                EntryType::EntryConfChange => {
                    log::warn!("raft {} skipped a v1 membership entry at {index}: Raftis only writes v2", self.id);
                }
            }
        }
        let conf_state = self.conf_state();
        self.sm.apply(ApplyBatch { entries: batch, applied_to: last, term: last_term, conf_state, members: self.members.clone() });
        Ok(())
    }

    fn apply_membership(&mut self, index: LogIndex, cc: &ConfChangeV2) -> anyhow::Result<()> {
        if index <= self.conf_applied {
            return Ok(());
        }
        let conf_state = self.raw.apply_conf_change(cc).context("applying a membership change")?;
        let removes_me = cc.changes.iter().any(|c| c.node_id == self.id.get() && c.get_change_type() == ConfChangeType::RemoveNode);
        if removes_me {
            let why = format!("removed from the cluster: its removal was committed at index {index}");
            // Before the membership is stored: a restart would not apply this entry again.
            self.store.put_meta(META_REMOVED, why.as_bytes()).context("recording this node's removal")?;
            self.removed = Some(why);
        }
        self.store.set_conf_state(&conf_state).context("persisting the membership")?;
        let before: Vec<NodeId> = self.members.keys().copied().collect();
        MembershipChange::apply_to_members(cc, Arc::make_mut(&mut self.members));
        self.conf_applied = index;
        self.persist_members()?;
        self.peers_follow_members(&before);
        log::info!("raft {} membership at {index}: voters {:?} learners {:?}", self.id, conf_state.voters, conf_state.learners);
        Ok(())
    }

    /// The membership changed from `before` to `self.members` (an entry, or a snapshot): the
    /// transport dials the members at their addresses, and no longer the ones that left, whose
    /// HELLO (their dialer lingers) must not make them peers again.
    pub(super) fn peers_follow_members(&mut self, before: &[NodeId]) {
        for id in before.iter().filter(|id| **id != self.id && !self.members.contains_key(id)) {
            self.transport.remove_peer(*id);
            self.departed.insert(*id);
        }
        for info in self.members.values() {
            self.departed.remove(&info.id);
            if info.id != self.id {
                // Nothing happens for a peer already at that address.
                self.transport.set_peer_addr(info.id, info.raft_addr.clone());
            }
        }
    }

    pub(super) fn persist_members(&self) -> anyhow::Result<()> {
        let (members, conf_applied) = members_record(&self.members, self.conf_applied)?;
        // With the entries: `conf_applied` raises the commit index at the next start, over
        // entries that must then be the ones applied (see `Node::start`).
        self.store.put_metas_with_log(&[(META_MEMBERS, &members), (META_CONF_APPLIED, &conf_applied)])?;
        Ok(())
    }
}

/// How a member list and the index of the last membership change applied to it are stored
/// (`META_MEMBERS`, `META_CONF_APPLIED`), always together.
pub(super) fn members_record(members: &Members, conf_applied: LogIndex) -> anyhow::Result<(Vec<u8>, [u8; 8])> {
    Ok((serde_json::to_vec(members)?, conf_applied.get().to_be_bytes()))
}
