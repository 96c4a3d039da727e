//! The cluster as Redis Cluster clients see it: one shard that owns all 16384 hash slots, whose
//! master is the Raft leader and whose replicas are the other voters.
//!
//! Cluster-aware clients (`redis-benchmark --cluster`, the cluster modes of client libraries)
//! already follow `-MOVED`, which is how a follower answers a write. What they also need is the
//! map they ask for at start and again after a `-MOVED`: `CLUSTER SLOTS` or `CLUSTER NODES`. With
//! it they send every command to the leader, and find the new one after an election.

use crate::ids::{NodeId, Term};
use crate::membership::Members;

/// Redis Cluster's hash slots; the one shard holds them all.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key, as Redis Cluster computes it. The one shard holds them all, but a
/// `-MOVED` names the slot of the command's key, and some clients (redis-py, ioredis) move only
/// that slot to the node it names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashSlot(pub u16);

impl HashSlot {
    /// What a `-MOVED` names for a command without keys. Redis Cluster never redirects one, so no
    /// slot is more right than another.
    pub const NO_KEY: HashSlot = HashSlot(0);

    /// CRC16 (XMODEM) of the key modulo 16384; of its hash tag only when it has one: the bytes
    /// between its first `{` and the first `}` after it, if there are any.
    pub fn of_key(key: &[u8]) -> HashSlot {
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let tag = &key[open + 1..];
                tag.iter().position(|&b| b == b'}').map(|close| &tag[..close])
            })
            .filter(|tag| !tag.is_empty())
            .unwrap_or(key);
        HashSlot(crc16(hashed) % SLOTS)
    }
}

impl std::fmt::Display for HashSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// CRC16-CCITT as Redis Cluster uses it (XMODEM: polynomial 0x1021, initial value 0). A bit at a
/// time: it only runs to name a slot, never on the path of a served command.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// One node as the map shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: NodeId,
    /// Redis Cluster names nodes with 40 hex characters.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The side port, shown where Redis Cluster shows its bus port.
    pub bus_port: u16,
    pub myself: bool,
}

/// The map: the leader first, then the other voters. Learners are left out: they are still
/// catching up and serve nothing yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    pub leader: ClusterNode,
    pub replicas: Vec<ClusterNode>,
    /// The Raft term, shown as the config epoch.
    pub epoch: Term,
}

/// A node id in Redis Cluster's form.
pub fn node_name(id: NodeId) -> String {
    format!("{:040x}", id.get())
}

impl ClusterView {
    /// The map as this node (`me`) knows it; `None` while it knows no leader, or has no address
    /// for it.
    pub fn new(me: NodeId, leader: Option<NodeId>, voters: &[NodeId], members: &Members, epoch: Term) -> Option<ClusterView> {
        let node = |id: NodeId| {
            let info = members.get(&id)?;
            let (host, port) = split(&info.client_addr)?;
            let bus_port = split(&info.raft_addr).map_or(0, |(_, p)| p);
            Some(ClusterNode { id, name: node_name(id), host, port, bus_port, myself: id == me })
        };
        let leader_id = leader?;
        let leader = node(leader_id)?;
        let replicas = voters.iter().filter(|id| **id != leader_id).filter_map(|id| node(*id)).collect();
        Some(ClusterView { leader, replicas, epoch })
    }

    /// `CLUSTER NODES`: one line per node, as Redis Cluster writes them.
    pub fn nodes_text(&self) -> String {
        let line = |n: &ClusterNode, role: &str, master: &str, slots: &str| {
            let flags = if n.myself { format!("myself,{role}") } else { role.to_string() };
            format!("{} {}:{}@{} {flags} {master} 0 0 {} connected{slots}\n", n.name, n.host, n.port, n.bus_port, self.epoch)
        };
        let mut out = line(&self.leader, "master", "-", &format!(" 0-{}", SLOTS - 1));
        for replica in &self.replicas {
            out.push_str(&line(replica, "slave", &self.leader.name, ""));
        }
        out
    }
}

/// `CLUSTER INFO`, for a node that knows `view` (or, with `None`, no leader).
pub fn info_text(view: Option<&ClusterView>, known_nodes: usize, epoch: Term) -> String {
    let (state, slots) = match view {
        Some(_) => ("ok", SLOTS),
        None => ("fail", 0),
    };
    [
        format!("cluster_state:{state}"),
        format!("cluster_slots_assigned:{slots}"),
        format!("cluster_slots_ok:{slots}"),
        "cluster_slots_pfail:0".to_string(),
        "cluster_slots_fail:0".to_string(),
        format!("cluster_known_nodes:{known_nodes}"),
        "cluster_size:1".to_string(),
        format!("cluster_current_epoch:{epoch}"),
        format!("cluster_my_epoch:{epoch}"),
    ]
    .iter()
    .map(|line| format!("{line}\r\n"))
    .collect()
}

/// `host:port` split in two; the host may be an IPv6 address.
fn split(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NodeInfo;

    fn members() -> Members {
        let mut m = Members::new();
        for (id, port) in [(1, 7001), (2, 7002), (3, 7003), (4, 7004)] {
            let info = NodeInfo { id: NodeId(id), client_addr: format!("127.0.0.1:{port}"), raft_addr: format!("127.0.0.1:{}", port + 10000) };
            m.insert(NodeId(id), info);
        }
        m
    }

    #[test]
    fn the_leader_owns_every_slot_and_the_other_voters_replicate_it() {
        // Node 4 is a learner: not a voter, so not in the map.
        let view = ClusterView::new(NodeId(3), Some(NodeId(2)), &[NodeId(1), NodeId(2), NodeId(3)], &members(), Term(7)).unwrap();
        assert_eq!(view.leader.name, "0000000000000000000000000000000000000002");
        assert_eq!((view.leader.host.as_str(), view.leader.port, view.leader.bus_port), ("127.0.0.1", 7002, 17002));
        assert_eq!(view.replicas.iter().map(|n| n.port).collect::<Vec<_>>(), [7001, 7003]);
        assert_eq!(
            view.nodes_text(),
            "0000000000000000000000000000000000000002 127.0.0.1:7002@17002 master - 0 0 7 connected 0-16383\n\
             0000000000000000000000000000000000000001 127.0.0.1:7001@17001 slave 0000000000000000000000000000000000000002 0 0 7 connected\n\
             0000000000000000000000000000000000000003 127.0.0.1:7003@17003 myself,slave 0000000000000000000000000000000000000002 0 0 7 connected\n"
        );
        assert!(info_text(Some(&view), 3, Term(7)).starts_with("cluster_state:ok\r\ncluster_slots_assigned:16384\r\n"));
    }

    #[test]
    fn without_a_leader_there_is_no_map() {
        assert_eq!(ClusterView::new(NodeId(1), None, &[NodeId(1), NodeId(2)], &members(), Term(1)), None);
        // A leader this node has no address for yet.
        assert_eq!(ClusterView::new(NodeId(1), Some(NodeId(9)), &[NodeId(1), NodeId(9)], &members(), Term(1)), None);
        let info = info_text(None, 2, Term(1));
        assert!(info.contains("cluster_state:fail\r\n") && info.contains("cluster_slots_assigned:0\r\n"), "{info}");
    }

    #[test]
    fn keys_hash_to_the_slots_redis_cluster_gives_them() {
        // The check value of CRC16/XMODEM, which Redis Cluster's specification gives too.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(HashSlot::of_key(b"foo"), HashSlot(12182));
        assert_eq!(HashSlot::of_key(b""), HashSlot(0));
        // Only the first tag counts, and only a non-empty one.
        assert_eq!(HashSlot::of_key(b"{user1000}.following"), HashSlot::of_key(b"user1000"));
        assert_eq!(HashSlot::of_key(b"foo{}{bar}"), HashSlot(crc16(b"foo{}{bar}") % SLOTS));
        assert_eq!(HashSlot::of_key(b"foo{{bar}}zap"), HashSlot::of_key(b"{bar"));
        assert_eq!(HashSlot::of_key(b"foo{bar}{zap}"), HashSlot::of_key(b"bar"));
        assert_eq!(HashSlot::of_key(b"{unclosed"), HashSlot(crc16(b"{unclosed") % SLOTS));
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        assert_eq!(split("[::1]:7001"), Some(("::1".to_string(), 7001)));
        assert_eq!(split("nohost"), None);
    }
}
