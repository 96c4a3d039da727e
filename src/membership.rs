//! Who is in the cluster and how to reach them. Raft's ConfState only knows ids; the addresses
//! travel in the context of each membership entry and in snapshots, so every node learns them
//! from the log itself.

use crate::ids::NodeId;
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
}

impl MembershipChange {
    pub fn node_id(&self) -> NodeId {
        match self {
            MembershipChange::AddVoter(info) | MembershipChange::AddLearner(info) => info.id,
            MembershipChange::Promote(id) | MembershipChange::Remove(id) => *id,
        }
    }

    /// The raft conf change and its context (the node's addresses, when it has any).
    pub fn to_raft(&self) -> (ConfChangeV2, Vec<u8>) {
        let (change_type, context) = match self {
            MembershipChange::AddVoter(info) => {
                (ConfChangeType::AddNode, serde_json::to_vec(info).expect("NodeInfo serializes"))
            }
            MembershipChange::AddLearner(info) => {
                (ConfChangeType::AddLearnerNode, serde_json::to_vec(info).expect("NodeInfo serializes"))
            }
            MembershipChange::Promote(_) => (ConfChangeType::AddNode, Vec::new()),
            MembershipChange::Remove(_) => (ConfChangeType::RemoveNode, Vec::new()),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = self.node_id().get();
        let mut cc = ConfChangeV2::default();
        cc.changes = vec![single];
        cc.context = context.clone();
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
}
