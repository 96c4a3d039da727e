//! Redis Cluster clients: the map they ask for (`CLUSTER SLOTS`, `CLUSTER NODES`, ...) names the
//! leader as the master of every slot, so a cluster-mode client (here the `redis` crate's) sends
//! its commands to the leader, and after the leader changes it follows `-MOVED` to the new one.

use raftis_integration::{wait_for, Cluster};
use redis::cluster::ClusterClient;
use redis::Commands;
use std::time::Duration;

fn owner_of_every_slot(slots: &redis::Value) -> (String, i64) {
    let redis::Value::Bulk(ranges) = slots else { panic!("CLUSTER SLOTS: {slots:?}") };
    assert_eq!(ranges.len(), 1, "one range: {slots:?}");
    let redis::Value::Bulk(range) = &ranges[0] else { panic!("{slots:?}") };
    assert_eq!((&range[0], &range[1]), (&redis::Value::Int(0), &redis::Value::Int(16383)));
    let redis::Value::Bulk(master) = &range[2] else { panic!("{slots:?}") };
    let host: String = redis::from_redis_value(&master[0]).unwrap();
    let port: i64 = redis::from_redis_value(&master[1]).unwrap();
    assert_eq!(range.len(), 5, "the master and two replicas: {slots:?}");
    (host, port)
}

#[test]
fn a_cluster_mode_client_writes_through_the_leader_and_finds_the_next_one() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let leader_port = cluster.nodes[leader].port;

    // Every node gives the same map, the leader its master.
    for node in &cluster.nodes {
        let slots: redis::Value = node.cmd(&["CLUSTER", "SLOTS"]).unwrap();
        assert_eq!(owner_of_every_slot(&slots), ("127.0.0.1".to_string(), leader_port as i64));
        let info: String = node.cmd(&["CLUSTER", "INFO"]).unwrap();
        assert!(info.contains("cluster_state:ok\r\n") && info.contains("cluster_known_nodes:3\r\n"), "{info}");
        let nodes: String = node.cmd(&["CLUSTER", "NODES"]).unwrap();
        let myid: String = node.cmd(&["CLUSTER", "MYID"]).unwrap();
        let mine = nodes.lines().find(|l| l.contains("myself")).expect("a myself line");
        assert!(mine.starts_with(&myid), "{nodes}");
        assert_eq!(nodes.lines().filter(|l| l.contains("master - ") && l.ends_with(" connected 0-16383")).count(), 1, "{nodes}");
        let ok: String = node.cmd(&["READONLY"]).unwrap();
        assert_eq!(ok, "OK");
    }
    // What Redis answers without cluster support stays so.
    let err = cluster.nodes[follower].cmd::<String>(&["CLUSTER", "KEYSLOT", "k"]).unwrap_err().to_string();
    assert!(err.contains("cluster support disabled"), "{err}");

    // Given only a follower's address, the client finds the leader from the map.
    let client = ClusterClient::new(vec![format!("redis://127.0.0.1:{}", cluster.nodes[follower].port)]).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..200 {
        let _: () = conn.set(format!("key:{i}"), i).unwrap();
    }
    let got: i64 = conn.get("key:199").unwrap();
    assert_eq!(got, 199);
    let on_leader: Vec<String> = cluster.nodes[leader].cmd(&["KEYS", "key:*"]).unwrap();
    assert_eq!(on_leader.len(), 200);

    // Another node takes over while the old leader is paused; back, it is a follower that answers
    // -MOVED, and the client fetches the new map and goes on. None acknowledged is lost.
    cluster.nodes[leader].pause();
    let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
        (0..3).filter(|i| *i != leader).find(|i| cluster.nodes[*i].state() == "leader")
    });
    cluster.nodes[leader].resume();
    wait_for("the old leader to follow", Duration::from_secs(20), || (cluster.nodes[leader].state() == "follower").then_some(()));
    for i in 200..300 {
        wait_for("a write through the cluster client after the leader changed", Duration::from_secs(30), || {
            conn.set::<_, _, ()>(format!("key:{i}"), i).ok()
        });
    }
    let slots: redis::Value = cluster.nodes[leader].cmd(&["CLUSTER", "SLOTS"]).unwrap();
    assert_eq!(owner_of_every_slot(&slots).1, cluster.nodes[new_leader].port as i64);
    let on_new_leader: Vec<String> = cluster.nodes[new_leader].cmd(&["KEYS", "key:*"]).unwrap();
    assert_eq!(on_new_leader.len(), 300);
    let got: i64 = conn.get("key:299").unwrap();
    assert_eq!(got, 299);
}
