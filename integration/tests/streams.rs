//! Stream consumer groups: `XREADGROUP`, `XCLAIM` and `XAUTOCLAIM` read Redis' clock, and run by
//! the log's clock on every node, so every node keeps the same pending entries, delivery times
//! and owners, however late it applies them.

use raftis_integration::{wait_for, Cluster, Server};
use redis::Value;
use std::time::Duration;

fn cmd<T: redis::FromRedisValue>(server: &Server, args: &[&str]) -> T {
    server.cmd(args).unwrap_or_else(|e| panic!("{args:?} on {}: {e}", server.port))
}

/// Everything Redis keeps about the stream and its groups, times included.
fn full_state(server: &Server) -> Value {
    cmd(server, &["XINFO", "STREAM", "jobs", "FULL"])
}

fn assert_same_groups(cluster: &Cluster, nodes: &[usize]) {
    cluster.assert_same_dataset(nodes);
    let first = full_state(&cluster.nodes[nodes[0]]);
    for i in &nodes[1..] {
        assert_eq!(full_state(&cluster.nodes[*i]), first, "node {i}'s consumer groups differ from node {}'s", nodes[0]);
    }
}

#[test]
fn consumer_groups_deliver_and_claim_the_same_on_every_node_however_late_they_apply() {
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let late = (leader + 1) % 3;
    let node = &cluster.nodes[leader];
    let _: () = cmd(node, &["XGROUP", "CREATE", "jobs", "workers", "$", "MKSTREAM"]);
    let ids: Vec<String> = (0..5).map(|i| cmd(node, &["XADD", "jobs", "*", "job", &i.to_string()])).collect();

    // One follower applies what follows in one burst, long after the leader did.
    cluster.nodes[late].pause();
    let delivered: Value = cmd(node, &["XREADGROUP", "GROUP", "workers", "w1", "COUNT", "3", "STREAMS", "jobs", ">"]);
    assert!(matches!(&delivered, Value::Bulk(streams) if streams.len() == 1), "{delivered:?}");
    // The three delivered jobs sit idle past 250 ms before anyone claims them (by the leader's
    // clock; the late follower sees no time pass at all between the two).
    std::thread::sleep(Duration::from_millis(400));
    let (_, claimed, _): (String, Vec<Value>, Vec<String>) = cmd(node, &["XAUTOCLAIM", "jobs", "workers", "w2", "250", "0", "COUNT", "10"]);
    assert_eq!(claimed.len(), 3, "jobs idle for 400 ms are claimed: {claimed:?}");
    // Jobs delivered just now are not idle enough (a minute, which no loaded machine reaches).
    let _: Value = cmd(node, &["XREADGROUP", "GROUP", "workers", "w1", "STREAMS", "jobs", ">"]);
    let not_idle: Vec<Value> = cmd(node, &["XCLAIM", "jobs", "workers", "w3", "60000", &ids[3], &ids[4]]);
    assert!(not_idle.is_empty(), "{not_idle:?}");
    let _: i64 = cmd(node, &["XACK", "jobs", "workers", &ids[0]]);
    let _: i64 = cmd(node, &["XGROUP", "CREATECONSUMER", "jobs", "workers", "w4"]);
    cluster.nodes[late].resume();
    assert_same_groups(&cluster, &[0, 1, 2]);
    let (count, _, _, owners): (i64, String, String, Vec<Vec<String>>) = cmd(node, &["XPENDING", "jobs", "workers"]);
    assert_eq!(count, 4);
    assert_eq!(owners, [["w1", "2"], ["w2", "2"]]);

    // A node that replays its whole log seconds later, and one restarted from a snapshot, keep
    // the same delivery times and owners.
    cluster.nodes[late].kill9();
    cluster.nodes[late].restart().unwrap();
    assert_same_groups(&cluster, &[0, 1, 2]);
    let other = (leader + 2) % 3;
    let _: (i64, i64) = cmd(&cluster.nodes[other], &["RAFT.SNAPSHOT"]);
    cluster.nodes[other].kill9();
    cluster.nodes[other].restart().unwrap();
    assert_same_groups(&cluster, &[0, 1, 2]);
}

#[test]
fn what_consumer_groups_cannot_do_here_is_refused_clearly() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    let _: () = cmd(node, &["XGROUP", "CREATE", "jobs", "workers", "$", "MKSTREAM"]);
    let err = node.cmd::<Value>(&["EVAL", "return redis.call('XREAD', 'BLOCK', 10, 'STREAMS', KEYS[1], '$')", "1", "jobs"]).unwrap_err();
    assert!(err.to_string().contains("not allowed with BLOCK option from scripts"), "Redis' own rule: {err}");
    let err = node
        .cmd::<Value>(&["EVAL", "return redis.call('XREADGROUP', 'GROUP', 'workers', 'w', 'STREAMS', KEYS[1], '>')", "1", "jobs"])
        .unwrap_err();
    assert!(err.to_string().contains("would read each node's clock"), "{err}");
    let err = node.cmd::<Value>(&["EVAL", "return redis.call('XAUTOCLAIM', KEYS[1], 'workers', 'w', 0, 0)", "1", "jobs"]).unwrap_err();
    assert!(err.to_string().contains("could answer differently"), "{err}");
    let follower = &cluster.nodes[(leader + 1) % 3];
    let err = follower.cmd::<Value>(&["XREADGROUP", "GROUP", "workers", "w", "STREAMS", "jobs", ">"]).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "a write: {err}");
    // Inside a transaction, with the rest of it.
    let (id, read): (String, Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg("jobs")
        .arg("*")
        .arg("job")
        .arg("x")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w")
        .arg("STREAMS")
        .arg("jobs")
        .arg(">")
        .query(&mut node.client().unwrap())
        .unwrap();
    assert!(format!("{read:?}").contains(&id), "{read:?}");
    wait_for("every node to apply", Duration::from_secs(10), || {
        let states: Vec<Value> = cluster.nodes.iter().map(full_state).collect();
        states.iter().all(|s| *s == states[0]).then_some(())
    });
}

/// `XADD ... *` takes the stream's next ID as Redis does, by the log's clock: after an explicit ID
/// ahead of the clock, the next automatic one follows it (the leader's clock pinned into the
/// command refused it); and every node, however late it applies it, gives the same ID.
#[test]
fn automatic_stream_ids_follow_an_id_ahead_of_the_clock() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    let _: String = cmd(node, &["XADD", "s", "99999999999999-0", "f", "v"]);
    let next: String = cmd(node, &["XADD", "s", "*", "f", "v"]);
    assert_eq!(next, "99999999999999-1");
    let now: String = cmd(node, &["XADD", "fresh", "*", "f", "v"]);
    let ms: u64 = now.split_once('-').unwrap().0.parse().unwrap();
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(ms <= clock && clock - ms < 10_000, "an automatic ID from the clock: {now} at {clock}");
    let digest = cluster.assert_same_dataset(&[0, 1, 2]);
    let follower = (leader + 1) % 3;
    cluster.nodes[follower].restart().unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    assert_eq!(cluster.assert_same_dataset(&[0, 1, 2]), digest, "replayed later, the same IDs");
}
