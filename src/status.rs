//! A picture of a node that other threads can read without talking to the Raft loop: the loop
//! publishes one after every round, so RAFT.INFO on Redis' main thread never waits for it.

use crate::cluster_id::ClusterId;
use crate::health_report::LeaderView;
use crate::ids::{LogIndex, NodeId, Term};
use crate::membership::{Members, NodeInfo};
use crate::recovery::Recovery;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    /// A candidate in the pre-vote phase (it has not bumped the term yet).
    PreCandidate,
    /// A non-voting member catching up before promotion.
    Learner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Learner => "learner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Replication progress of one peer, as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    pub id: NodeId,
    pub matched: LogIndex,
    pub next: LogIndex,
    /// raft's probe / replicate / snapshot state.
    pub state: String,
    pub is_learner: bool,
    /// How long the leader has not heard from it: since its last message, or since the leader
    /// started if it never heard from it.
    pub silent_for: std::time::Duration,
}

#[derive(Clone, Debug)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub commit: LogIndex,
    /// The commit index as last written to the log (written lazily, so it may trail `commit`):
    /// where a restart after a crash resumes applying before a leader says more.
    pub commit_stored: LogIndex,
    /// Highest index handed to the state machine (it may still be applying it).
    pub applied: LogIndex,
    pub first_index: LogIndex,
    pub last_index: LogIndex,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Shared with the Raft loop; replaced only when membership changes.
    pub members: Arc<Members>,
    /// Only filled on the leader.
    pub progress: Vec<PeerProgress>,
    /// The leader has committed an entry of its own term, so its commit index is current.
    pub leader_ready: bool,
    pub pending_proposals: usize,
    /// Raft's election and heartbeat timeouts, in ticks, as the running node has them.
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// The tick interval in force.
    pub tick: Duration,
    /// The node stopped because of an unrecoverable error (e.g. its disk failed).
    pub fatal: Option<String>,
    /// The recovery this node made of a cluster that had lost its majority, if it made one.
    pub recovered: Option<Arc<Recovery>>,
    /// Unknown on a node that has not followed a leader yet, and in clusters made before ids.
    pub cluster: ClusterId,
    /// On a follower: the members' health as its leader last reported it (see `health_report`).
    pub leader_view: Option<Arc<LeaderView>>,
}

impl Status {
    /// The member this node knows leads, if any.
    pub fn leader_member(&self) -> Option<&NodeInfo> {
        self.leader.and_then(|id| self.members.get(&id))
    }

    pub fn initial(id: NodeId) -> Status {
        Status {
            id,
            role: Role::Follower,
            term: Term(0),
            leader: None,
            commit: LogIndex(0),
            commit_stored: LogIndex(0),
            applied: LogIndex(0),
            first_index: LogIndex(0),
            last_index: LogIndex(0),
            voters: Vec::new(),
            learners: Vec::new(),
            members: Arc::new(Members::new()),
            progress: Vec::new(),
            leader_ready: false,
            pending_proposals: 0,
            election_ticks: 0,
            heartbeat_ticks: 0,
            tick: Duration::ZERO,
            fatal: None,
            recovered: None,
            cluster: ClusterId::UNKNOWN,
            leader_view: None,
        }
    }

    /// A recovery this node made still has the log from before it to drop: no node joins yet.
    pub fn recovery_pending(&self) -> bool {
        self.recovered.as_ref().is_some_and(|r| r.pending(self.first_index))
    }

    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    pub fn progress_of(&self, id: NodeId) -> Option<&PeerProgress> {
        self.progress.iter().find(|p| p.id == id)
    }

    /// Raft's election timeout as the running node has it.
    pub fn election_timeout(&self) -> Duration {
        self.tick * self.election_ticks as u32
    }

    /// How long the leader goes without hearing from a member before the cluster map shows it
    /// failed (see [`crate::cluster_view::failed_after`]), with this node's own tick.
    pub fn failed_after(&self) -> Duration {
        crate::cluster_view::failed_after(self.tick, self.election_ticks)
    }

    /// On a leader: whether `peer` has been silent for longer than a live one ever is. A live
    /// peer answers every heartbeat: a heartbeat interval and half an election timeout leave
    /// room for a slow answer, and still tell a dead one in well under an election timeout.
    /// Shorter than the cluster map's [`crate::cluster_view::failed_after`] on purpose: a
    /// hand-over to a dead voter costs an election timeout of refused writes, while the map
    /// must not show a member failed for a stall of a second.
    pub fn is_missing(&self, peer: &PeerProgress) -> bool {
        peer.silent_for > self.tick * self.heartbeat_ticks as u32 + self.election_timeout() / 2
    }

    /// On a leader: the voter to hand leadership to. One the leader hears from and is
    /// replicating to (not probing: it may be down) with the most of the log, since raft brings
    /// it up to date first.
    pub fn successor(&self) -> Option<NodeId> {
        let voters = self.progress.iter().filter(|p| !p.is_learner);
        voters.max_by_key(|p| (!self.is_missing(p), p.state == "replicate", p.matched)).map(|p| p.id)
    }
}

/// Work the Raft loop has done since start, for RAFT.STATS and the benchmark: proposals per
/// Ready and per fsync show how well group commit batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rounds: u64,
    pub readies: u64,
    /// Proposals handed to the Raft loop, counted on the caller's thread: unlike `proposals`
    /// (those raft appended), they agree with what the caller counted itself at any moment.
    pub proposals_requested: u64,
    pub proposals: u64,
    pub entries_persisted: u64,
    pub fsyncs: u64,
    /// The once-a-second flushes of `durability=medium` that found something to flush: what
    /// the node had written before one of them started survives a power loss.
    pub background_fsyncs: u64,
    /// Time the Raft loop spent writing its log (with the fsyncs, at durability high).
    pub persist_micros: u64,
    pub read_index_rounds: u64,
    pub reads: u64,
    /// Heartbeats (and responses) dropped unstepped because a later one from the same sender
    /// arrived in the same round.
    pub heartbeats_coalesced: u64,
    /// Loop rounds that took 500 ms or more, and the longest round so far.
    pub slow_rounds: u64,
    pub max_round_micros: u64,
    /// Transactions that dropped compacted entries from the log (a bounded number each).
    pub compaction_steps: u64,
    /// Snapshot files downloaded from a leader, downloads that failed (they are retried when
    /// the leader sends the snapshot again), and the bytes received.
    pub snapshots_fetched: u64,
    pub snapshot_fetch_failures: u64,
    pub snapshot_bytes_fetched: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_is_a_replicating_voter_with_the_most_of_the_log() {
        let peer = |id: u64, matched: u64, state: &str, is_learner: bool| PeerProgress {
            id: NodeId(id),
            matched: LogIndex(matched),
            next: LogIndex(matched + 1),
            state: state.into(),
            is_learner,
            silent_for: std::time::Duration::ZERO,
        };
        let mut status = Status::initial(NodeId(1));
        assert_eq!(status.successor(), None, "alone");
        status.progress = vec![peer(2, 90, "replicate", false), peer(3, 95, "probe", false), peer(4, 99, "replicate", true)];
        assert_eq!(status.successor(), Some(NodeId(2)), "not a learner, nor one that may be down");
        status.progress.push(peer(5, 93, "replicate", false));
        assert_eq!(status.successor(), Some(NodeId(5)), "the most of the log");
        (status.tick, status.election_ticks, status.heartbeat_ticks) = (std::time::Duration::from_millis(100), 10, 2);
        status.progress[3].silent_for = std::time::Duration::from_millis(701);
        assert!(status.is_missing(&status.progress[3]));
        assert_eq!(status.successor(), Some(NodeId(2)), "not one the leader has missed for 0.2 s + 0.5 s");
        status.progress.retain(|p| p.state == "probe");
        assert_eq!(status.successor(), Some(NodeId(3)), "a probed voter rather than none");
    }
}
