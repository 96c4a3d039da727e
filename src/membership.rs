//! Who is in the cluster and how to reach them. Raft's ConfState only knows ids; the addresses
//! travel in the context of each membership entry and in snapshots, so every node learns them
//! from the log itself.

use crate::ids::{LogIndex, NodeId};
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A member's identity and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Where other nodes reach its side port (host:port).
    pub raft_addr: String,
    /// Where clients reach its Redis port (host:port); used in -MOVED replies.
    pub client_addr: String,
}

/// Every member ever added and not removed, with its addresses.
pub type Members = BTreeMap<NodeId, NodeInfo>;

/// One membership step. Joining is two steps (learner, then voter) so a new node catches up
/// before it counts towards the quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Adds a voter directly; only for the first member of a new cluster.
    AddVoter(NodeInfo),
    AddLearner(NodeInfo),
    Promote(NodeId),
    Remove(NodeId),
    /// New addresses for a member, which stays what it is (a voter, or a learner): a node that
    /// came back from a restart on another address (see [`Readdress`]).
    Readdress {
        info: NodeInfo,
        learner: bool,
    },
}

impl MembershipChange {
    pub fn node_id(&self) -> NodeId {
        match self {
            MembershipChange::AddVoter(info) | MembershipChange::AddLearner(info) | MembershipChange::Readdress { info, .. } => info.id,
            MembershipChange::Promote(id) | MembershipChange::Remove(id) => *id,
        }
    }

    /// The raft conf change and its context (the node's addresses, when it has any).
    pub fn to_raft(&self) -> (ConfChangeV2, Vec<u8>) {
        let (change_type, context) = match self {
            MembershipChange::AddVoter(info) => (ConfChangeType::AddNode, serde_json::to_vec(info).expect("NodeInfo serializes")),
            MembershipChange::AddLearner(info) | MembershipChange::Readdress { info, learner: true } => {
                (ConfChangeType::AddLearnerNode, serde_json::to_vec(info).expect("NodeInfo serializes"))
            }
            // Adding a voter that is one already changes nothing in raft's configuration; the
            // context carries the new addresses to every node's address book.
            MembershipChange::Readdress { info, learner: false } => {
                (ConfChangeType::AddNode, serde_json::to_vec(info).expect("NodeInfo serializes"))
            }
            MembershipChange::Promote(_) => (ConfChangeType::AddNode, Vec::new()),
            MembershipChange::Remove(_) => (ConfChangeType::RemoveNode, Vec::new()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = self.node_id().get();
        let cc = ConfChangeV2 { changes: vec![single], context: context.clone(), ..Default::default() };
        (cc, context)
    }

    /// Updates the address book for a committed conf change.
    pub fn apply_to_members(cc: &ConfChangeV2, members: &mut Members) {
        for change in &cc.changes {
            let id = NodeId(change.node_id);
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Ok(info) = serde_json::from_slice::<NodeInfo>(&cc.context) {
                        if info.id == id {
                            members.insert(id, info);
                        }
                    }
                }
                ConfChangeType::RemoveNode => {
                    members.remove(&id);
                }
            }
        }
    }
}

/// Whether a node asking for votes, or dialing in (it dials the members it knows of), was removed
/// from the cluster, as far as this node can tell for certain. The asker believes it is a member, so some committed entry at or before its last
/// log entry (`their_last`) made it one; every node applies the same committed entries in the
/// same order, so if this node has applied at least that far (`applied`) and the asker is no
/// longer among its members (`is_member`), a later committed entry removed it. A node that has
/// applied less cannot tell a removed member from one whose addition it has not seen yet.
pub fn was_removed(is_member: impl Fn(NodeId) -> bool, applied: LogIndex, from: NodeId, their_last: LogIndex) -> bool {
    their_last.get() > 0 && applied >= their_last && !is_member(from)
}

/// Members that said, dialing this node, that they are now at other addresses. The member list
/// is what the log says, so a node restarted on another address (another port, a container's new
/// IP) would hear nothing from the others until the log said so: the leader proposes the new
/// addresses ([`MembershipChange::Readdress`]), one change at a time.
#[derive(Default)]
pub struct Readdress {
    wanted: BTreeMap<NodeId, NodeInfo>,
}

impl Readdress {
    /// A member dialed in from `raft_addr`, saying clients reach it at `client_addr`. Anything
    /// else than a member's `HELLO` with both addresses, one of them new, is no news.
    pub fn heard(&mut self, members: &Members, from: NodeId, raft_addr: &str, client_addr: Option<&str>) {
        let (Some(known), Some(client_addr)) = (members.get(&from), client_addr) else { return };
        if known.raft_addr == raft_addr && known.client_addr == client_addr {
            self.wanted.remove(&from);
            return;
        }
        self.wanted.insert(from, NodeInfo { id: from, raft_addr: raft_addr.to_string(), client_addr: client_addr.to_string() });
    }

    /// The next change to propose, if one is still wanted. `is_learner` says which kind of member
    /// an id is; members gone, or already at the addresses wanted, are forgotten.
    pub fn next(&mut self, members: &Members, is_learner: impl Fn(NodeId) -> bool) -> Option<MembershipChange> {
        self.wanted.retain(|id, info| members.get(id).is_some_and(|known| known != info));
        let info = self.wanted.values().next()?.clone();
        Some(MembershipChange::Readdress { learner: is_learner(info.id), info })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_learner_carries_addresses_and_remove_forgets_them() {
        let info = NodeInfo { id: NodeId(4), raft_addr: "127.0.0.1:17004".into(), client_addr: "127.0.0.1:7004".into() };
        let mut members = Members::new();
        let (cc, _) = MembershipChange::AddLearner(info.clone()).to_raft();
        MembershipChange::apply_to_members(&cc, &mut members);
        assert_eq!(members.get(&NodeId(4)), Some(&info));
        let (cc, _) = MembershipChange::Promote(NodeId(4)).to_raft();
        MembershipChange::apply_to_members(&cc, &mut members);
        assert_eq!(members.get(&NodeId(4)), Some(&info), "promotion keeps the addresses");
        let (cc, _) = MembershipChange::Remove(NodeId(4)).to_raft();
        MembershipChange::apply_to_members(&cc, &mut members);
        assert!(members.is_empty());
    }

    #[test]
    fn only_a_node_that_applied_past_the_askers_log_calls_it_removed() {
        let members = [NodeId(1), NodeId(2)];
        let is_member = |id: NodeId| members.contains(&id);
        assert!(was_removed(is_member, LogIndex(75), NodeId(3), LogIndex(65)), "applied past its log, not a member");
        assert!(was_removed(is_member, LogIndex(65), NodeId(3), LogIndex(65)), "applied exactly its log");
        assert!(!was_removed(is_member, LogIndex(64), NodeId(3), LogIndex(65)), "its addition may be ahead of us");
        assert!(!was_removed(is_member, LogIndex(75), NodeId(2), LogIndex(65)), "a member");
        assert!(!was_removed(is_member, LogIndex(0), NodeId(3), LogIndex(0)), "nothing applied, empty log");
    }

    #[test]
    fn a_member_heard_at_new_addresses_is_readdressed_once() {
        let old = NodeInfo { id: NodeId(2), raft_addr: "10.0.0.2:17001".into(), client_addr: "10.0.0.2:7001".into() };
        let mut members = Members::from([(NodeId(2), old.clone())]);
        let mut readdress = Readdress::default();
        readdress.heard(&members, NodeId(2), "10.0.0.2:17001", Some("10.0.0.2:7001"));
        readdress.heard(&members, NodeId(9), "10.0.0.9:17001", Some("10.0.0.9:7001"));
        readdress.heard(&members, NodeId(2), "10.0.0.7:17001", None);
        assert_eq!(readdress.next(&members, |_| false), None, "same addresses, a stranger, an old peer's HELLO");

        readdress.heard(&members, NodeId(2), "10.0.0.7:17001", Some("10.0.0.7:7001"));
        let moved = NodeInfo { id: NodeId(2), raft_addr: "10.0.0.7:17001".into(), client_addr: "10.0.0.7:7001".into() };
        let change = readdress.next(&members, |_| false).unwrap();
        assert_eq!(change, MembershipChange::Readdress { info: moved.clone(), learner: false });
        let (cc, _) = change.to_raft();
        assert_eq!(cc.changes[0].get_change_type(), ConfChangeType::AddNode);
        MembershipChange::apply_to_members(&cc, &mut members);
        assert_eq!(members[&NodeId(2)], moved);
        assert_eq!(readdress.next(&members, |_| false), None, "done once the log says so");

        readdress.heard(&members, NodeId(2), "10.0.0.8:17001", Some("10.0.0.8:7001"));
        let (cc, _) = readdress.next(&members, |_| true).unwrap().to_raft();
        assert_eq!(cc.changes[0].get_change_type(), ConfChangeType::AddLearnerNode, "a learner stays one");
        members.clear();
        assert_eq!(readdress.next(&members, |_| true), None, "removed meanwhile");
    }
}
