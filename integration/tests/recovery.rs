//! `RAFT.CLUSTER RECOVER`: a cluster that lost its majority for good is recovered from a survivor,
//! keeps what the survivor holds, grows again with new nodes, and never takes the lost members
//! back as they were.

use raftis_integration::{digest, info_field, info_text, wait_for, Cluster, Server};
use redis::Value;
use std::time::Duration;

#[test]
fn a_survivor_of_a_lost_majority_recovers_the_cluster_keeps_its_data_and_grows_again() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let survivor = (leader + 1) % 3;
    let lost: Vec<usize> = (0..3).filter(|i| *i != survivor).collect();
    for i in 0..200 {
        let _: () = cluster.leader().cmd(&["SET", &format!("k{i}"), &i.to_string()]).unwrap();
    }
    let _: i64 = cluster.leader().cmd(&["INCR", "counter"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    let before = digest(&cluster.nodes[survivor]);

    // A healthy follower refuses: its cluster has a leader.
    let err = cluster.nodes[survivor].cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]).unwrap_err().to_string();
    assert!(err.contains("cannot recover") && err.contains("leads this cluster"), "{err}");

    // The other two die with their disks: the survivor can neither serve nor change anything.
    let lost_ids: Vec<u64> = lost.iter().map(|i| cluster.nodes[*i].node_id()).collect();
    for i in &lost {
        cluster.nodes[*i].kill9();
    }
    // Restarted, the survivor has heard from nobody yet, which says nothing about who is alive.
    cluster.nodes[survivor].restart().unwrap();
    let s = &cluster.nodes[survivor];
    let err = s.cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]).unwrap_err().to_string();
    assert!(err.contains("too soon to know whether other members are alive"), "{err}");
    assert!(s.cmd::<()>(&["SET", "stuck", "1"]).is_err());

    let ok: String = wait_for("RECOVER to be accepted", Duration::from_secs(10), || match s.cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]) {
        Ok(ok) => Some(ok),
        Err(e) if e.to_string().contains("too soon to know") => None,
        Err(e) => panic!("RECOVER: {e}"),
    });
    assert_eq!(ok, "OK");
    assert_eq!(s.state(), "leader");
    assert_eq!(digest(s), before, "the survivor keeps its dataset");
    assert_eq!(s.cmd::<i64>(&["INCR", "counter"]).unwrap(), 2, "and serves writes");
    let peers: Vec<Value> = s.cmd(&["RAFT.PEERS"]).unwrap();
    assert_eq!(peers.len(), 1);
    let mut left: Vec<u64> = info_text(s, "recovered_left_behind").split(',').map(|id| id.parse().unwrap()).collect();
    left.sort();
    let mut expected = lost_ids.clone();
    expected.sort();
    assert_eq!(left, expected);
    // The log from before the recovery goes once a snapshot follows it.
    let at = info_field(s, "recovered_at_index");
    wait_for("the old log to be dropped", Duration::from_secs(20), || (info_text(s, "recovery_pending") == "no").then_some(()));
    assert!(info_field(s, "first_log_index") > at);

    // A lost member that comes back as it was is told it was left behind, and stops.
    let old = lost[0];
    cluster.nodes[old].restart().unwrap();
    wait_for("the old member to stop", Duration::from_secs(20), || (cluster.nodes[old].state() == "stopped").then_some(()));
    let err = cluster.nodes[old].cmd::<Value>(&["GET", "k1"]).unwrap_err().to_string();
    assert!(err.contains("recovered the cluster on its own") && err.contains("left node"), "{err}");
    assert_eq!(cluster.nodes[survivor].state(), "leader");

    // Empty but configured with its old id, it is refused at once, and told why.
    cluster.nodes[old].extra.push(format!("node-id={}", lost_ids[0]));
    cluster.nodes[old].restart_empty().unwrap();
    let started = std::time::Instant::now();
    let err = cluster.nodes[old].cmd::<String>(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[survivor].addr()]).unwrap_err().to_string();
    assert!(err.contains("refused the join") && err.contains("was left behind by a recovery"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "not retried as if the cluster had no leader");
    cluster.nodes[old].extra.pop();

    // New, empty nodes join (one of them where the old member was) and get the whole dataset.
    cluster.nodes[old].restart_empty().unwrap();
    cluster.nodes[lost[1]].restart_empty().unwrap();
    cluster.join(old, survivor).unwrap();
    let id: i64 = cluster.nodes[survivor].cmd(&["RAFT.ADDPEER", &cluster.nodes[lost[1]].addr()]).unwrap();
    assert!(id > 0);
    let _: () = cluster.nodes[survivor].cmd(&["SET", "after", "1"]).unwrap();
    let digest_after = cluster.assert_same_dataset(&[0, 1, 2]);
    assert_ne!(digest_after, before);
    for node in &cluster.nodes {
        let peers: Vec<Value> = node.cmd(&["RAFT.PEERS"]).unwrap();
        assert_eq!(peers.len(), 3, "every node sees the new membership only");
    }

    // The new cluster stands on its own: without the recovered node, the new two elect a leader.
    cluster.nodes[survivor].kill9();
    let newcomers = lost.clone();
    let leader = wait_for("a leader among the new nodes", Duration::from_secs(20), || {
        newcomers.iter().copied().find(|i| cluster.nodes[*i].state() == "leader")
    });
    assert_eq!(cluster.nodes[leader].cmd::<i64>(&["INCR", "counter"]).unwrap(), 3);
    cluster.nodes[survivor].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn recover_refuses_where_it_is_not_the_way_out() {
    let root = tempfile::tempdir().unwrap();
    let empty = Server::start(raftis_integration::free_port_pair(), &root.path().join("empty"), &[]).unwrap();
    let err = empty.cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]).unwrap_err().to_string();
    assert!(err.contains("not part of a cluster"), "{err}");
    let err = empty.cmd::<String>(&["RAFT.CLUSTER", "RECOVER", "now"]).unwrap_err().to_string();
    assert!(err.contains("wrong number of arguments"), "{err}");

    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let err = cluster.nodes[leader].cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]).unwrap_err().to_string();
    assert!(err.contains("leads the cluster"), "{err}");

    // Two of four members are lost: the other two cannot elect a leader, but each hears the
    // other. Neither may recover alone while the other is alive: that one must be stopped first
    // (and join the recovered cluster anew).
    drop(cluster);
    let mut cluster = Cluster::start(4, &[]).unwrap();
    let leader = cluster.wait_leader();
    let others: Vec<usize> = (0..4).filter(|i| *i != leader).collect();
    let (gone, a, b) = (others[0], others[1], others[2]);
    let b_id = cluster.nodes[b].node_id();
    cluster.nodes[leader].kill9();
    cluster.nodes[gone].kill9();
    let survivor = &cluster.nodes[a];
    wait_for("the survivors to lose their leader", Duration::from_secs(10), || {
        survivor.cmd::<Value>(&["RAFT.LEADER"]).is_err().then_some(())
    });
    // The dead spoke moments ago too; once they fall silent, only the live one is named.
    let err = wait_for("RECOVER to name only the live member", Duration::from_secs(20), || {
        let err = survivor.cmd::<String>(&["RAFT.CLUSTER", "RECOVER"]).unwrap_err().to_string();
        if err.contains("too soon to know") {
            return None;
        }
        assert!(err.contains("spoke to this node moments ago"), "{err}");
        err.contains(&format!("node(s) {b_id} spoke")).then_some(err)
    });
    assert!(err.contains("two clusters"), "{err}");
    assert_eq!(survivor.state(), "pre-candidate", "nothing changed");
    let peers: Vec<Value> = survivor.cmd(&["RAFT.PEERS"]).unwrap();
    assert_eq!(peers.len(), 4);
}
