//! New election and heartbeat ticks. raft-rs fixes them when it builds a node, so the loop
//! rebuilds its `RawNode` from the stored state (term, vote, commit, membership) at a round
//! boundary; a leader first hands leadership away.

use super::*;

impl<S: StateMachine> RaftLoop<S> {
    pub(super) fn want_ticks(&mut self, election: usize, heartbeat: usize) {
        let raft = &self.raw.raft;
        if (election, heartbeat) == (raft.election_timeout(), raft.heartbeat_timeout()) {
            self.ticks_wanted = None;
            return;
        }
        self.ticks_wanted = Some((election, heartbeat, Instant::now()));
        if raft.state != StateRole::Leader {
            return;
        }
        // Rebuilding makes a leader a follower: hand leadership over first, to the voter the
        // status names (raft waits until it has the whole log).
        self.publish_status();
        let successor = self.lock_status().successor();
        if let Some(to) = successor {
            log::info!("raft {}: handing leadership to {to} before changing its timeouts", self.id);
            self.want_transfer(to);
        }
    }

    /// Rebuilds raft with the wanted ticks once this round left nothing pending and this node
    /// no longer leads others (or the hand-over had an election timeout to happen).
    pub(super) fn apply_wanted_ticks(&mut self) -> anyhow::Result<()> {
        let Some((election, heartbeat, since)) = self.ticks_wanted else { return Ok(()) };
        if self.raw.has_ready() {
            return Ok(());
        }
        let leader = self.raw.raft.state == StateRole::Leader;
        let alone = self.conf_state().voters == [self.id.get()];
        let grace = self.election_timeout();
        if leader && !alone && since.elapsed() < grace {
            return Ok(());
        }
        self.ticks_wanted = None;
        self.rebuild_raft(election, heartbeat).context("rebuilding raft with new timeouts")?;
        log::info!("raft {}: election timeout now {election} ticks, heartbeat {heartbeat} ticks", self.id);
        if leader && alone {
            // Nobody else can lead: elect ourselves again at once instead of after a timeout.
            self.raw.campaign().context("re-electing the only voter")?;
            self.campaigned = true;
        }
        self.check_leadership();
        Ok(())
    }

    /// Builds raft afresh from the store: term, vote, commit index, log and membership all come
    /// back from it; only in-memory rounds are lost. A leader's read rounds are failed here: the
    /// new raft never confirms them, also when this node leads again at once (a single voter),
    /// and that leadership is only ready once it commits in its new term.
    pub(super) fn rebuild_raft(&mut self, election: usize, heartbeat: usize) -> anyhow::Result<()> {
        let cfg = raft_config(self.id, election, heartbeat, self.raw.raft.raft_log.applied);
        cfg.validate().context("invalid raft timeouts")?;
        let logger = raft_logger::logger(self.id.get());
        self.raw = RawNode::new(&cfg, self.store.clone(), &logger)?;
        for (_, w) in std::mem::take(&mut self.reads_in_flight).into_values().flatten() {
            w(Err(ProposeError::LeadershipLost));
        }
        self.leader_ready = false;
        self.shared.ready_index.store(0, Ordering::Release);
        Ok(())
    }
}
