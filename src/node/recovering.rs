//! The loop's side of `RAFT.CLUSTER RECOVER` (see [`crate::recovery`]): run at a round boundary,
//! the survivor becomes the only voter with its whole log, then drops the log from before behind
//! a snapshot.

use super::*;

impl<S: StateMachine> RaftLoop<S> {
    /// The recovery this node made, while the log from before it is still there.
    pub(super) fn pending_recovery(&self) -> Option<&Recovery> {
        self.recovery.as_deref().filter(|r| r.pending(LogIndex(self.store.first_index())))
    }

    pub(super) fn left_behind(&self, id: NodeId) -> bool {
        self.recovery.as_ref().is_some_and(|r| r.left(id))
    }

    /// Runs a recovery asked for, at a round boundary (raft has nothing in flight to persist).
    /// An error is a store that failed half-way: the node stops, and finishes at its next start.
    pub(super) fn recover_if_wanted(&mut self) -> anyhow::Result<()> {
        if self.recover_wanted.is_none() || self.raw.has_ready() {
            return Ok(());
        }
        let done = self.recover_wanted.take().expect("checked above");
        let result = self.recover();
        let answer = match &result {
            Ok(at) => Ok(*at),
            Err(RecoverError::Refused(why)) => Err(why.clone()),
            Err(RecoverError::Store(e)) => Err(format!("the recovery could not be stored: {e:#}")),
        };
        let _ = done.send(answer);
        match result {
            Err(RecoverError::Store(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn recover(&mut self) -> Result<LogIndex, RecoverError> {
        let conf = self.conf_state();
        let voters: Vec<NodeId> = conf.voters.iter().map(|v| NodeId(*v)).collect();
        let alive_within = self.election_timeout() * recovery::ALIVE_WITHIN_ELECTIONS;
        let heard_from: Vec<NodeId> = self.last_heard.iter().filter(|(_, at)| at.elapsed() < alive_within).map(|(id, _)| *id).collect();
        let raft = &self.raw.raft;
        recovery::check(&recovery::Situation {
            me: self.id,
            leading: raft.state == StateRole::Leader,
            leader: (raft.leader_id != 0).then_some(NodeId(raft.leader_id)),
            voters: &voters,
            heard_from: &heard_from,
            listening_for: self.started_at.elapsed(),
            alive_within,
        })
        .map_err(RecoverError::Refused)?;
        let at = LogIndex(raft.raft_log.last_index());
        let (election, heartbeat) = (raft.election_timeout(), raft.heartbeat_timeout());
        let mut left: BTreeSet<NodeId> = self.members.keys().copied().collect();
        left.extend(conf.voters.iter().chain(&conf.learners).map(|v| NodeId(*v)));
        // Those an earlier recovery left behind stay left behind.
        left.extend(self.recovery.iter().flat_map(|r| r.left_behind.iter().copied()));
        left.remove(&self.id);
        let rec = Recovery { at, left_behind: left.into_iter().collect(), done: false };

        // The record first: a crash before the membership is stored finishes it at the next start.
        let store = || -> anyhow::Result<Members> {
            self.store.put_meta(META_RECOVERY, &rec.encode())?;
            self.store.sync()?;
            store_recovered_membership(&self.store, &self.me, &rec)
        };
        let members = store().map_err(RecoverError::Store)?;
        self.members = Arc::new(members);
        self.conf_applied = at;
        for id in &rec.left_behind {
            self.transport.remove_peer(*id);
        }
        // With the new membership from the store.
        self.rebuild_raft(election, heartbeat).context("rebuilding raft").map_err(RecoverError::Store)?;
        self.raw.campaign().context("electing the recovered node").map_err(RecoverError::Store)?;
        self.campaigned = true;
        self.recovery = Some(Arc::new(Recovery { done: true, ..rec.clone() }));
        self.recovery_snapshot_asked = None;
        self.check_leadership();
        log::warn!(
            "raft {}: RECOVER: this node is now the only voter of the cluster, with its whole log (up to {at}); \
             left behind: {}. It drops the log from before once a snapshot follows the recovery; add new nodes then",
            self.id,
            rec.left_behind.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
        );
        Ok(at)
    }

    /// After a recovery, asks for the snapshot that lets the log from before it go (see
    /// [`crate::recovery`]), again now and then until one is taken.
    pub(super) fn finish_recovery(&mut self) {
        let Some(rec) = self.pending_recovery() else { return };
        if self.compact_to > rec.at.get() {
            return;
        }
        if self.raw.raft.raft_log.applied < rec.at.get() {
            return;
        }
        if self.recovery_snapshot_asked.is_some_and(|at| at.elapsed() < RECOVERY_SNAPSHOT_RETRY) {
            return;
        }
        self.recovery_snapshot_asked = Some(Instant::now());
        self.sm.request_snapshot();
    }
}

enum RecoverError {
    Refused(String),
    Store(anyhow::Error),
}

/// Makes `me` the only voter and member of the cluster, as `rec` decided, and marks the record
/// done. Written after the record itself (see [`RaftLoop::recover`]).
pub(super) fn store_recovered_membership(store: &LogStore, me: &NodeInfo, rec: &Recovery) -> anyhow::Result<Members> {
    store.set_conf_state(&ConfState { voters: vec![me.id.get()], ..Default::default() })?;
    let mut members = Members::new();
    members.insert(me.id, me.clone());
    store.put_meta(META_MEMBERS, &serde_json::to_vec(&members)?)?;
    store.put_meta(META_CONF_APPLIED, &rec.at.get().to_be_bytes())?;
    store.put_meta(META_RECOVERY, &Recovery { done: true, ..rec.clone() }.encode())?;
    store.sync()?;
    Ok(members)
}

pub(super) fn recovery_pending_message(rec: &Recovery) -> String {
    format!(
        "this node recovered the cluster at index {} and is still dropping the log from before it \
         (a snapshot, then compaction): nodes can be added once RAFT.INFO shows recovery_pending:no",
        rec.at
    )
}
