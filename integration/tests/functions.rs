//! Functions (`FUNCTION LOAD`, `FCALL`): libraries are replicated through the log and carried by
//! snapshots, and every call runs on every node to the same dataset.

use raftis_integration::{info_field, libraries, stat_field, wait_for, Cluster, Server};
use redis::Value;
use std::time::Duration;

/// Small thresholds so that a few thousand writes snapshot and compact the log.
const SNAPSHOTTING: &[&str] = &["snapshot-threshold=2000", "trailing-logs=200", "consistency=low"];

const LIBRARY: &str = r#"#!lua name=counters
redis.register_function('add', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)
redis.register_function{function_name='draw', callback=function() return math.random(1000000) end, flags={'no-writes'}}
redis.register_function('clock', function(keys) redis.call('INCR', keys[1]); return redis.call('TIME') end)
redis.register_function('lease', function(keys)
  redis.call('SET', keys[1], 'held', 'EX', 100)
  return redis.call('PEXPIRETIME', keys[1])
end)
"#;

fn load(server: &Server, code: &str, replace: bool) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD");
    if replace {
        cmd.arg("REPLACE");
    }
    cmd.arg(code).query(&mut server.client().unwrap())
}

fn fcall<T: redis::FromRedisValue>(server: &Server, name: &str, keys: &[&str], args: &[&str]) -> redis::RedisResult<T> {
    redis::cmd("FCALL").arg(name).arg(keys.len()).arg(keys).arg(args).query(&mut server.client().unwrap())
}

/// `n` pipelined writes, every one acknowledged.
fn write_many(server: &Server, n: usize) {
    let mut conn = server.client().unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("filler:{i}")).arg(i).ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
}

#[test]
fn functions_run_the_same_on_every_node_from_the_log_and_from_snapshots() {
    let mut cluster = Cluster::start(3, SNAPSHOTTING).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let node = &cluster.nodes[leader];

    assert_eq!(load(node, LIBRARY, false).unwrap(), "counters");
    let err = load(node, LIBRARY, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "Redis' own error: {err}");
    let err = load(&cluster.nodes[follower], LIBRARY, true).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "a library is a write: {err}");
    assert_eq!(fcall::<i64>(node, "add", &["n"], &["2"]).unwrap(), 2);
    assert_eq!(fcall::<i64>(node, "add", &["n"], &["3"]).unwrap(), 5);
    // math.random starts from the same seed at every call, on every node.
    let drawn: i64 = fcall(node, "draw", &[], &[]).unwrap();
    let again: i64 = redis::cmd("FCALL_RO").arg("draw").arg(0).query(&mut node.client().unwrap()).unwrap();
    assert_eq!(drawn, again);
    // A call whose answer differs between nodes raises an error; the write before it stays.
    let err = fcall::<Value>(node, "clock", &["before-clock"], &[]).unwrap_err();
    assert!(err.to_string().contains("TIME inside a script"), "{err}");
    // A relative time gets one deadline, from the entry's time.
    let deadline: i64 = fcall(node, "lease", &["lease"], &[]).unwrap();
    assert!(deadline > 0);
    let err = fcall::<Value>(node, "nosuch", &[], &[]).unwrap_err();
    assert!(err.to_string().contains("Function not found"), "{err}");
    // Inside a transaction, with the rest of it.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("FCALL")
        .arg("add")
        .arg(1)
        .arg("n")
        .arg(10)
        .cmd("INCR")
        .arg("n")
        .query(&mut node.client().unwrap())
        .unwrap();
    assert_eq!((a, b), (15, 16));
    // REPLACE swaps the code on every node.
    let replaced = LIBRARY.replace("args[1])", "args[1] * 2)");
    assert_eq!(load(node, &replaced, true).unwrap(), "counters");
    assert_eq!(fcall::<i64>(node, "add", &["n"], &["1"]).unwrap(), 18);
    cluster.assert_same_dataset(&[0, 1, 2]);
    for n in &cluster.nodes {
        assert_eq!(libraries(n), [("counters".to_string(), replaced.clone())], "node {}", n.port);
        let lease: i64 = n.cmd(&["PEXPIRETIME", "lease"]).unwrap();
        assert_eq!(lease, deadline, "node {}", n.port);
        let before: i64 = n.cmd(&["GET", "before-clock"]).unwrap();
        assert_eq!(before, 1, "node {}", n.port);
    }

    // A follower that misses FUNCTION FLUSH and enough writes to be caught up by a snapshot,
    // one with no libraries: restarted, it loads its own snapshot first (with the library), then
    // must drop the library as it installs the leader's. (Killed, not paused: a paused process
    // still receives appends into its socket buffer.)
    let (applied, _): (u64, u64) = cluster.nodes[follower].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    cluster.kill_behind(follower);
    let _: () = cluster.nodes[leader].cmd(&["FUNCTION", "FLUSH"]).unwrap();
    write_many(&cluster.nodes[leader], 5_000);
    wait_for("the leader to compact past the stopped follower", Duration::from_secs(20), || {
        (info_field(&cluster.nodes[leader], "first_log_index") > applied + 1).then_some(())
    });
    cluster.nodes[follower].restart().unwrap();
    wait_for("the follower to fetch a snapshot", Duration::from_secs(20), || {
        (stat_field(&cluster.nodes[follower], "snapshots_fetched") >= 1).then_some(())
    });
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert!(libraries(&cluster.nodes[follower]).is_empty());

    // Libraries loaded again are in the next snapshots: every node restarts from one.
    const SECOND: &str = "#!lua name=second\nredis.register_function('echo', function(keys, args) return args[1] end)";
    assert_eq!(load(&cluster.nodes[leader], SECOND, false).unwrap(), "second");
    for n in &cluster.nodes {
        let _: (i64, i64) = n.cmd(&["RAFT.SNAPSHOT"]).unwrap();
    }
    let before = cluster.assert_same_dataset(&[0, 1, 2]);
    for n in cluster.nodes.iter_mut() {
        n.kill9();
    }
    for n in cluster.nodes.iter_mut() {
        n.restart().unwrap();
    }
    let leader = cluster.wait_leader();
    assert_eq!(cluster.assert_same_dataset(&[0, 1, 2]), before);
    for n in &cluster.nodes {
        assert_eq!(libraries(n), [("second".to_string(), SECOND.to_string())], "node {}", n.port);
        let log = std::fs::read_to_string(n.dir.join("redis.log")).unwrap();
        assert!(log.contains("loaded snapshot"), "node {} restarted from its snapshot", n.port);
    }
    assert_eq!(fcall::<String>(&cluster.nodes[leader], "echo", &[], &["back"]).unwrap(), "back");
}

#[test]
fn function_dump_and_restore_go_through_the_log() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    assert_eq!(load(node, LIBRARY, false).unwrap(), "counters");
    let dump: Vec<u8> = node.cmd(&["FUNCTION", "DUMP"]).unwrap();
    let _: () = node.cmd(&["FUNCTION", "DELETE", "counters"]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert!(libraries(&cluster.nodes[(leader + 1) % 3]).is_empty());
    let restored: String = redis::cmd("FUNCTION").arg("RESTORE").arg(&dump).query(&mut node.client().unwrap()).unwrap();
    assert_eq!(restored, "OK");
    cluster.assert_same_dataset(&[0, 1, 2]);
    for n in &cluster.nodes {
        assert_eq!(libraries(n).len(), 1, "node {}", n.port);
    }
    let err = redis::cmd("FUNCTION").arg("RESTORE").arg(&dump).query::<Value>(&mut node.client().unwrap()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = node.cmd::<Value>(&["FUNCTION", "RESTORE", "not a dump"]).unwrap_err();
    assert!(err.to_string().contains("payload version or checksum are wrong"), "{err}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn a_function_that_never_ends_is_killed_on_every_node_and_the_cluster_goes_on() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    for node in &cluster.nodes {
        let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    }
    let leader = cluster.wait_leader();
    let spin = "#!lua name=spin\nredis.register_function('spin', function() while true do end end)";
    assert_eq!(load(&cluster.nodes[leader], spin, false).unwrap(), "spin");
    let mut conn = cluster.nodes[leader].client().unwrap();
    let runner = std::thread::spawn(move || redis::cmd("FCALL").arg("spin").arg(0).query::<Value>(&mut conn));
    for node in &cluster.nodes {
        // SCRIPT KILL does not stop a function (Redis' rule), FUNCTION KILL does.
        let err = wait_for("the function to run here", Duration::from_secs(10), || {
            node.quick_cmd::<Value>(&["SCRIPT", "KILL"]).err().filter(|e| e.code() == Some("BUSY"))
        });
        assert!(err.to_string().contains("FUNCTION KILL"), "{err}");
        // FUNCTION STATS names it, as in Redis (Redis, loading while the log applies, would
        // answer -LOADING).
        let stats = format!("{:?}", node.quick_cmd::<Value>(&["FUNCTION", "STATS"]).unwrap());
        assert!(stats.contains("running_script") && stats.contains("spin") && stats.contains("duration_ms"), "{stats}");
        let reply: String = node.quick_cmd(&["FUNCTION", "KILL"]).unwrap();
        assert_eq!(reply, "OK");
    }
    let err = runner.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("killed"), "{err}");
    let _: () = cluster.nodes[leader].cmd(&["SET", "after", "1"]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    let err = cluster.nodes[leader].cmd::<Value>(&["FUNCTION", "KILL"]).unwrap_err();
    assert_eq!(err.code(), Some("NOTBUSY"), "{err}");
}
