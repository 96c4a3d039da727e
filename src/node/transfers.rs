//! Leadership transfers wait for a sign of life from their target.
//!
//! raft sends `MsgTimeoutNow` at once to a target that has the whole log, and the target then
//! stands for election without pre-vote or the leader lease. Sent to a node that was paused a
//! moment before (SIGSTOP, a stalled VM), the message waits in the socket, and deposes the
//! leader whenever the node resumes, long after raft gave the transfer up. So the loop first
//! sends heartbeats, and starts raft's transfer only once the target has been heard from since
//! the ask: it was alive a round trip ago, not up to a heartbeat interval and half an election
//! timeout ago (how long a leader waits before it counts a voter as missing, see
//! [`crate::status::Status::is_missing`]).

use super::*;

/// A hand-over asked for on the leader, waiting for its target to be heard from.
pub(super) struct TransferWanted {
    to: NodeId,
    asked: Instant,
}

impl<S: StateMachine> RaftLoop<S> {
    /// Hands leadership to `to` once it has shown it is alive (see the file's comment). A
    /// follower passes the ask to raft as it is: raft forwards it to the leader.
    pub(super) fn want_transfer(&mut self, to: NodeId) {
        if self.raw.raft.state != StateRole::Leader || to == self.id {
            self.raw.transfer_leader(to.get());
            return;
        }
        self.transfer_wanted = Some(TransferWanted { to, asked: Instant::now() });
        // An idle cluster would otherwise answer only at the next heartbeat.
        self.raw.ping();
    }

    /// Once a round: starts the wanted transfer if its target has been heard from since the ask,
    /// or drops it after an election timeout, as raft drops a transfer that does not happen
    /// (whoever asked waits for a new leader until its own deadline and says what happened).
    pub(super) fn start_wanted_transfer(&mut self) {
        let Some(wanted) = &self.transfer_wanted else { return };
        let to = wanted.to;
        if self.raw.raft.state != StateRole::Leader {
            self.transfer_wanted = None;
        } else if self.last_heard.get(&to).is_some_and(|heard| *heard > wanted.asked) {
            self.transfer_wanted = None;
            self.raw.transfer_leader(to.get());
        } else if wanted.asked.elapsed() > self.election_timeout() {
            self.transfer_wanted = None;
            log::warn!("raft {}: node {to} did not answer within an election timeout; leadership stays here", self.id);
        }
    }
}
