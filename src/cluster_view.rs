//! The cluster as Redis Cluster clients see it: one shard that owns all 16384 hash slots, whose
//! master is the Raft leader and whose replicas are the other voters.
//!
//! Cluster-aware clients (`redis-benchmark --cluster`, the cluster modes of client libraries)
//! already follow `-MOVED`, which is how a follower answers a write. What they also need is the
//! map they ask for at start and again after a `-MOVED`: `CLUSTER SLOTS` or `CLUSTER NODES`. With
//! it they send every command to the leader, and find the new one after an election.
//!
//! The leader also says which of its followers it has lost, as Redis Cluster flags a node it can
//! no longer reach: a client that reads from replicas then leaves those out. A follower shows
//! what the leader last told it (see [`crate::health_report`]).

use crate::health_report;
use crate::ids::{NodeId, Term};
use crate::status::Status;
use std::time::Duration;

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

/// How a node of the map is doing, as far as the answering node can tell (Redis Cluster's
/// `health`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Online,
    /// The leader is sending it a snapshot: it serves nothing until it has loaded it.
    Loading,
    /// The leader has heard nothing from it for [`failed_after`].
    Failed,
}

impl Health {
    /// The word `CLUSTER SHARDS` gives, as Redis writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Online => "online",
            Health::Loading => "loading",
            Health::Failed => "fail",
        }
    }

    pub fn parse(word: &str) -> Option<Health> {
        [Health::Online, Health::Loading, Health::Failed].into_iter().find(|h| h.as_str() == word)
    }
}

/// How long a leader goes without hearing from a member before the map shows it failed: the
/// longest election timeout, after which a follower that had heard nothing from the leader would
/// have stood for election itself. Heartbeats go every few ticks, so a live member is never near
/// it; a fork or a slow disk stalling one for a second does not flag it.
pub fn failed_after(tick: Duration, election_ticks: usize) -> Duration {
    tick * 2 * election_ticks as u32
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
    pub health: Health,
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
    /// The map as the node of status `st` knows it; `None` while it knows no leader, or has no
    /// address for it. A leader flags a follower it has not heard from for `failed_after`; a
    /// follower flags those its leader's current report flags (never itself: it is answering).
    pub fn new(st: &Status, failed_after: Duration) -> Option<ClusterView> {
        let health = |id: NodeId| health_report::health_of(st, id, failed_after).unwrap_or(Health::Online);
        let node = |id: NodeId| {
            let info = st.members.get(&id)?;
            let (host, port) = split(&info.client_addr)?;
            let bus_port = split(&info.raft_addr).map_or(0, |(_, p)| p);
            Some(ClusterNode { id, name: node_name(id), host, port, bus_port, myself: id == st.id, health: health(id) })
        };
        let leader_id = st.leader?;
        let leader = node(leader_id)?;
        let replicas = st.voters.iter().filter(|id| **id != leader_id).filter_map(|id| node(*id)).collect();
        Some(ClusterView { leader, replicas, epoch: st.term })
    }

    /// The replicas a client may be sent to: those not failed (`CLUSTER SLOTS` leaves the others
    /// out, as Redis Cluster does).
    pub fn live_replicas(&self) -> impl Iterator<Item = &ClusterNode> {
        self.replicas.iter().filter(|n| n.health != Health::Failed)
    }

    /// `CLUSTER NODES`: one line per node, as Redis Cluster writes them.
    pub fn nodes_text(&self) -> String {
        let line = |n: &ClusterNode, role: &str, master: &str, slots: &str| {
            let mut flags = if n.myself { format!("myself,{role}") } else { role.to_string() };
            let mut link = "connected";
            if n.health == Health::Failed {
                flags.push_str(",fail");
                link = "disconnected";
            }
            format!("{} {}:{}@{} {flags} {master} 0 0 {} {link}{slots}\n", n.name, n.host, n.port, n.bus_port, self.epoch)
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

/// A client address as Redis writes one in `-MOVED`: `::1:7001`, an IPv6 host without the
/// brackets `advertise-addr` may give it (clients split at the last colon).
pub fn moved_address(addr: &str) -> String {
    split(addr).map_or_else(|| addr.to_string(), |(host, port)| format!("{host}:{port}"))
}

/// The address of a `-MOVED` reply in a form to dial: an IPv6 host back in brackets.
pub fn dialable(moved: &str) -> String {
    match moved.rsplit_once(':') {
        Some((host, port)) if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        _ => moved.to_string(),
    }
}

/// `host:port` split in two; the host may be an IPv6 address.
fn split(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health_report::{HealthReport, LeaderView};
    use crate::ids::LogIndex;
    use crate::membership::{Members, NodeInfo};
    use crate::status::PeerProgress;
    use std::sync::Arc;

    fn members() -> Members {
        let mut m = Members::new();
        for (id, port) in [(1, 7001), (2, 7002), (3, 7003), (4, 7004)] {
            let info =
                NodeInfo { id: NodeId(id), client_addr: format!("127.0.0.1:{port}"), raft_addr: format!("127.0.0.1:{}", port + 10000) };
            m.insert(NodeId(id), info);
        }
        m
    }

    /// Node `me`'s status in a cluster led by `leader`.
    fn status(me: u64, leader: Option<u64>, voters: &[u64], term: u64) -> Status {
        let mut st = Status::initial(NodeId(me));
        st.leader = leader.map(NodeId);
        st.voters = voters.iter().copied().map(NodeId).collect();
        st.members = Arc::new(members());
        st.term = Term(term);
        if leader == Some(me) {
            st.role = crate::status::Role::Leader;
        }
        st
    }

    const FAILED_AFTER: Duration = Duration::from_secs(2);

    #[test]
    fn the_leader_owns_every_slot_and_the_other_voters_replicate_it() {
        // Node 4 is a learner: not a voter, so not in the map.
        let view = ClusterView::new(&status(3, Some(2), &[1, 2, 3], 7), FAILED_AFTER).unwrap();
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
    fn the_leader_flags_followers_it_lost_or_is_sending_a_snapshot() {
        let peer = |id: u64, state: &str, silent_ms: u64| PeerProgress {
            id: NodeId(id),
            matched: LogIndex(5),
            next: LogIndex(6),
            state: state.into(),
            is_learner: false,
            silent_for: Duration::from_millis(silent_ms),
        };
        let mut st = status(1, Some(1), &[1, 2, 3, 4], 3);
        st.progress = vec![peer(2, "probe", 2_000), peer(3, "snapshot", 150), peer(4, "replicate", 1_999)];
        let view = ClusterView::new(&st, FAILED_AFTER).unwrap();
        let health: Vec<_> = view.replicas.iter().map(|n| (n.id.get(), n.health)).collect();
        assert_eq!(health, [(2, Health::Failed), (3, Health::Loading), (4, Health::Online)]);
        assert_eq!(view.live_replicas().map(|n| n.id.get()).collect::<Vec<_>>(), [3, 4]);
        let text = view.nodes_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains(" myself,master - 0 0 3 connected 0-16383"), "{}", lines[0]);
        assert!(lines[1].ends_with(" slave,fail 0000000000000000000000000000000000000001 0 0 3 disconnected"), "{}", lines[1]);
        assert!(lines[2].ends_with(" slave 0000000000000000000000000000000000000001 0 0 3 connected"), "{}", lines[2]);
        // A follower knows how the others are doing only from its leader's report, and never
        // flags itself.
        let mut follower = status(2, Some(1), &[1, 2, 3, 4], 3);
        let view = ClusterView::new(&follower, FAILED_AFTER).unwrap();
        assert!(view.replicas.iter().all(|n| n.health == Health::Online));
        let report = HealthReport::of(&st, FAILED_AFTER).unwrap();
        follower.leader_view = Some(Arc::new(LeaderView { report, received: std::time::Instant::now() }));
        let view = ClusterView::new(&follower, FAILED_AFTER).unwrap();
        let health: Vec<_> = view.replicas.iter().map(|n| (n.id.get(), n.health)).collect();
        assert_eq!(health, [(2, Health::Online), (3, Health::Loading), (4, Health::Online)]);
        assert!(view.nodes_text().lines().nth(1).unwrap().contains(" myself,slave "));
        let mut lost = st.clone();
        lost.progress[2].silent_for = FAILED_AFTER;
        let report = HealthReport::of(&lost, FAILED_AFTER).unwrap();
        follower.leader_view = Some(Arc::new(LeaderView { report, received: std::time::Instant::now() }));
        let view = ClusterView::new(&follower, FAILED_AFTER).unwrap();
        assert_eq!(view.live_replicas().map(|n| n.id.get()).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn a_member_fails_after_the_longest_election_timeout() {
        assert_eq!(failed_after(Duration::from_millis(100), 10), Duration::from_secs(2));
    }

    #[test]
    fn without_a_leader_there_is_no_map() {
        assert_eq!(ClusterView::new(&status(1, None, &[1, 2], 1), FAILED_AFTER), None);
        // A leader this node has no address for yet.
        assert_eq!(ClusterView::new(&status(1, Some(9), &[1, 9], 1), FAILED_AFTER), None);
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

    #[test]
    fn moved_names_an_ipv6_host_as_redis_does() {
        assert_eq!(moved_address("[::1]:7001"), "::1:7001");
        assert_eq!(moved_address("10.0.0.3:7001"), "10.0.0.3:7001");
        assert_eq!(moved_address("redis-1.example:7001"), "redis-1.example:7001");
        assert_eq!(dialable("::1:7001"), "[::1]:7001");
        assert_eq!(dialable("10.0.0.3:7001"), "10.0.0.3:7001");
        assert_eq!(dialable("[::1]:7001"), "[::1]:7001");
    }
}
