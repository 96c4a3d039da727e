//! Recovering a cluster that lost its majority for good: `RAFT.CLUSTER RECOVER`.
//!
//! Raft needs a majority of the voters to elect a leader or commit anything, so a three-node
//! cluster whose other two nodes died with their disks is stuck for ever: the survivor holds the
//! data but may neither serve nor change the membership (that takes a commit too). The way out,
//! as etcd's `--force-new-cluster`, is to make the survivor the only voter of the cluster by
//! decree, outside the log, and to add fresh nodes to it.
//!
//! What the survivor keeps: its whole log, the entries it had not seen committed included (it
//! cannot tell which of them the lost majority had committed and acknowledged, so it commits them
//! all). What is lost: writes that reached only the lost nodes. The nodes left behind must never
//! come back as they were: had they only been cut off, they could still be a majority of the old
//! membership and elect a leader of their own. So the recovered node records them, answers their
//! `HELLO` with a removal (they stop), and drops anything else they send.
//!
//! The membership history in the log before the recovery says the old members are voters. A node
//! added later must never replay it, or it would count them in its quorums. So the recovered node
//! takes a snapshot right after the recovery point and drops the whole log up to it, and adds no
//! node until that is done (`pending`): a new node starts from that snapshot, whose membership
//! is the recovered one.

use crate::ids::{LogIndex, NodeId};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Where the record of a recovery lives in the log store's metadata.
pub const META_RECOVERY: &str = "recovery";

/// A recovery this node made, as recorded in its store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The last entry of the log when it recovered: everything up to here belongs to the old
    /// membership's history.
    pub at: LogIndex,
    /// The members it left behind. They are never members again under these ids.
    pub left_behind: Vec<NodeId>,
    /// The new membership is stored (written after this record, so that a crash in between is
    /// finished at the next start).
    pub done: bool,
}

impl Recovery {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a recovery record serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<Recovery> {
        serde_json::from_slice(bytes).ok()
    }

    /// Whether the log still holds entries from before the recovery: new nodes wait until not.
    pub fn pending(&self, first_index: LogIndex) -> bool {
        first_index <= self.at
    }

    pub fn left(&self, id: NodeId) -> bool {
        self.left_behind.contains(&id)
    }
}

/// A member heard from within this many election timeouts counts as alive: a live member that
/// cannot elect a leader still asks for votes, and answers ours, about once per election timeout.
/// Whether a TCP connection is up says less: one to a machine that lost power stays up for many
/// minutes.
pub const ALIVE_WITHIN_ELECTIONS: u32 = 3;

/// What the node knows when asked to recover.
pub struct Situation<'a> {
    pub me: NodeId,
    pub leading: bool,
    pub leader: Option<NodeId>,
    pub voters: &'a [NodeId],
    /// Other members this node has heard from lately (see [`ALIVE_WITHIN_ELECTIONS`]).
    pub heard_from: &'a [NodeId],
    /// How long this node has been listening, and how long it takes to hear from a live member.
    pub listening_for: Duration,
    pub alive_within: Duration,
}

/// Refuses a recovery that is not a way out of a lost majority, or that would make two clusters.
pub fn check(s: &Situation) -> Result<(), String> {
    if !s.voters.contains(&s.me) {
        return Err("only a voter can recover the cluster: this node is not one".into());
    }
    if s.leading {
        return Err("this node leads the cluster, which has its majority: remove members with RAFT.REMOVEPEER".into());
    }
    if let Some(leader) = s.leader {
        return Err(format!(
            "node {leader} leads this cluster: remove members with RAFT.REMOVEPEER there (RECOVER is for a cluster that lost its majority)"
        ));
    }
    if s.voters == [s.me] {
        return Err("this node is already the only voter: it elects itself".into());
    }
    // Just started, it has heard from nobody yet: that says nothing about who is alive.
    if s.listening_for < s.alive_within {
        let left = s.alive_within - s.listening_for;
        return Err(format!(
            "this node started {} ms ago, too soon to know whether other members are alive (a member that is could still \
             form a majority without it, and there would be two clusters): retry in {} ms",
            s.listening_for.as_millis(),
            left.as_millis() + 1
        ));
    }
    let alive: Vec<String> = s.heard_from.iter().filter(|id| **id != s.me).map(|id| id.to_string()).collect();
    if !alive.is_empty() {
        return Err(format!(
            "node(s) {} spoke to this node moments ago: a member that is alive could still form a majority without this \
             node and there would be two clusters; stop it for good (it can join the recovered cluster anew) first",
            alive.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn situation<'a>(voters: &'a [NodeId], heard_from: &'a [NodeId]) -> Situation<'a> {
        let (listening_for, alive_within) = (Duration::from_secs(10), Duration::from_secs(3));
        Situation { me: NodeId(1), leading: false, leader: None, voters, heard_from, listening_for, alive_within }
    }

    #[test]
    fn only_a_voter_without_a_leader_and_without_live_peers_recovers() {
        let voters = [NodeId(1), NodeId(2), NodeId(3)];
        assert_eq!(check(&situation(&voters, &[])), Ok(()));

        let err = check(&situation(&voters, &[NodeId(3)])).unwrap_err();
        assert!(err.contains("node(s) 3 spoke"), "{err}");
        let err = check(&Situation { leader: Some(NodeId(2)), ..situation(&voters, &[]) }).unwrap_err();
        assert!(err.contains("node 2 leads"), "{err}");
        let err = check(&Situation { leading: true, ..situation(&voters, &[]) }).unwrap_err();
        assert!(err.contains("leads the cluster"), "{err}");
        let err = check(&situation(&[NodeId(2), NodeId(3)], &[])).unwrap_err();
        assert!(err.contains("not one"), "{err}");
        let err = check(&situation(&[NodeId(1)], &[])).unwrap_err();
        assert!(err.contains("already the only voter"), "{err}");
    }

    #[test]
    fn a_node_that_just_started_has_not_listened_long_enough_to_recover() {
        let voters = [NodeId(1), NodeId(2), NodeId(3)];
        let just_started = Situation { listening_for: Duration::from_millis(1200), ..situation(&voters, &[]) };
        let err = check(&just_started).unwrap_err();
        assert!(err.contains("started 1200 ms ago") && err.contains("retry in 1801 ms"), "{err}");
        assert_eq!(check(&Situation { listening_for: Duration::from_secs(3), ..situation(&voters, &[]) }), Ok(()));
    }

    #[test]
    fn a_record_survives_encoding_and_says_when_the_old_log_is_gone() {
        let r = Recovery { at: LogIndex(40), left_behind: vec![NodeId(2), NodeId(3)], done: true };
        let back = Recovery::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert!(back.pending(LogIndex(1)));
        assert!(back.pending(LogIndex(40)));
        assert!(!back.pending(LogIndex(41)));
        assert!(back.left(NodeId(3)) && !back.left(NodeId(4)));
        assert_eq!(Recovery::decode(b"junk"), None);
    }
}
