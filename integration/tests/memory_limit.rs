//! The memory limit: over `maxmemory`, the leader refuses what Redis would refuse, with Redis'
//! own replies, whether a client sends it to the leader or through a follower; scripts decide
//! alike on every node, a restarted node included; a follower's own memory never changes what it
//! applies; and the Redis settings the log depends on cannot be changed under it.

use raftis_integration::resp_conn::{args, call, RespConn};
use raftis_integration::{free_port_pair, module_path, Cluster, Server};

const LIBRARY: &str = "#!lua name=lib
redis.register_function('plain', function(keys, args) return redis.call('SET', keys[1], args[1]) end)
redis.register_function{function_name='oom_ok', callback=function(keys, args) return redis.call('SET', keys[1], args[1]) end, flags={'allow-oom'}}
redis.register_function{function_name='reader', callback=function(keys, args) return redis.call('GET', keys[1]) end, flags={'no-writes'}}";

const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";

/// What the same commands get from plain Redis over its `maxmemory` and from a cluster whose
/// leader is over its limit: the same replies, byte for byte.
#[test]
fn over_the_limit_the_leader_answers_as_redis_does() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut redis = RespConn::connect(plain.port).unwrap();
    let mut nodes = [RespConn::connect(cluster.nodes[leader].port).unwrap(), RespConn::connect(cluster.nodes[follower].port).unwrap()];
    for (i, node) in nodes.iter_mut().enumerate() {
        let (k, list) = (format!("k{i}"), format!("list{i}"));
        let (k, list) = (k.as_str(), list.as_str());
        for conn in [&mut redis, &mut *node] {
            assert_eq!(call(conn, &["SET", k, "before"]).text().as_deref(), Some("OK"));
            assert_eq!(call(conn, &["RPUSH", list, "a", "b"]).integer(), Some(2));
            call(conn, &["FUNCTION", "LOAD", "REPLACE", LIBRARY]);
        }
        let flagged = "#!lua\nreturn redis.call('SET', KEYS[1], 'flagged')";
        let sha = call(&mut redis, &["EVAL", "return redis.sha1hex(ARGV[1])", "0", flagged]).text().unwrap();
        call(&mut redis, &["CONFIG", "SET", "maxmemory", "1"]);
        cluster.config_set("maxmemory", "1");
        for command in [
            &["SET", k, "v"][..],
            &["INCR", "counter"],
            &["GET", k],
            &["DEL", "nokey"],
            &["BLMOVE", list, "elsewhere", "LEFT", "RIGHT", "0.1"],
            &["BLPOP", list, "0.1"],
            // A plain script: its first call that may grow memory fails, unless it wrote before.
            &["EVAL", "return redis.call('SET', KEYS[1], 'in-script')", "1", k],
            &["EVAL", "return redis.pcall('SET', KEYS[1], 'in-script')", "1", k],
            &["EVAL", "redis.call('DEL', 'nokey') return redis.call('SET', KEYS[1], 'after-del')", "1", k],
            &["EVAL", "return redis.call('GET', KEYS[1])", "1", k],
            // Scripts with flags and functions are judged before they start.
            &["EVAL", flagged, "1", k],
            // Refused, it was never cached.
            &["EVALSHA", &sha, "1", k],
            &["EVAL", "#!lua flags=allow-oom\nreturn redis.call('SET', KEYS[1], 'allowed')", "1", k],
            &["EVAL", "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])", "1", k],
            &["EVAL", "#!lua flags=no-such-flag\nreturn 1", "0"],
            // Redis splits the first line as it splits a config line: quotes count.
            &["EVAL", "#!lua \"flags=allow-oom\"\nreturn redis.call('SET', KEYS[1], 'quoted')", "1", k],
            &["EVAL", "#!lua flags=allow-oom,\nreturn redis.call('SET', KEYS[1], 'trailing')", "1", k],
            &["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", k],
            &["EVAL_RO", "#!lua\nreturn redis.call('GET', KEYS[1])", "1", k],
            &["EVAL_RO", "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])", "1", k],
            &["FCALL_RO", "plain", "1", k, "fn"],
            &["FCALL_RO", "reader", "1", k],
            &["FCALL", "plain", "1", k, "fn"],
            &["FCALL", "OOM_OK", "1", k, "fn-allowed"],
            &["FCALL", "reader", "1", k],
            &["FCALL", "nosuch", "0"],
            &["GET", k],
        ] {
            assert_eq!(call(node, command), call(&mut redis, command), "node {i}: {command:?}");
        }
        call(&mut redis, &["CONFIG", "SET", "maxmemory", "0"]);
        cluster.config_set("maxmemory", "0");
        assert_eq!(call(node, &["SET", k, "after"]), call(&mut redis, &["SET", k, "after"]), "node {i}: under the limit again");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// Over the limit, a transaction holding a command that may grow memory is discarded whole at
/// EXEC, as Redis discards it: nothing of it runs, and each of its commands answers Redis' error
/// (Redis answers EXEC with that one error: see the README). Through a follower too, where the
/// commands the client pipelines after EXEC travel to the leader with the transaction and still
/// run, and so does a transaction that only frees memory.
#[test]
fn over_the_limit_a_transaction_that_may_grow_memory_is_discarded_whole() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let aborted = format!("EXECABORT Transaction discarded because of: {OOM}");
    for (i, node) in [leader, follower].into_iter().enumerate() {
        let mut conn = RespConn::connect(cluster.nodes[node].port).unwrap();
        let (kept, freed, new) = (format!("kept{i}"), format!("freed{i}"), format!("new{i}"));
        for key in [&kept, &freed] {
            assert_eq!(call(&mut conn, &["SET", key, "x"]).text().as_deref(), Some("OK"));
        }
        cluster.config_set("maxmemory", "1");
        let replies = conn
            .pipeline(&[
                args(&["MULTI"]),
                args(&["DEL", &kept]),
                args(&["SET", &new, "x"]),
                args(&["EXISTS", &kept]),
                args(&["EXEC"]),
                // After the EXEC, in the same pipeline: these run.
                args(&["EXISTS", &kept]),
                args(&["MULTI"]),
                args(&["DEL", &freed]),
                args(&["EXEC"]),
                args(&["EXISTS", &freed]),
                // A transaction whose last command is the one that may grow memory.
                args(&["MULTI"]),
                args(&["DEL", &kept]),
                args(&["INCR", &new]),
                args(&["EXEC"]),
            ])
            .unwrap();
        for (exec, commands) in [(&replies[4], 3), (&replies[13], 2)] {
            let exec = exec.items().unwrap_or_else(|| panic!("node {node}: EXEC's array: {exec:?}"));
            assert_eq!(exec.len(), commands, "node {node}: {exec:?}");
            assert!(exec.iter().all(|r| r.is_error() && r.text().as_deref() == Some(aborted.as_str())), "node {node}: {exec:?}");
        }
        assert_eq!(replies[5].integer(), Some(1), "node {node}: the first transaction's DEL ran: {replies:?}");
        assert_eq!(replies[8].items().map(|r| r.to_vec()), Some(vec![replies[5].clone()]), "node {node}: {replies:?}");
        assert_eq!(replies[9].integer(), Some(0), "node {node}: {replies:?}");
        cluster.config_set("maxmemory", "0");
        assert_eq!(call(&mut conn, &["EXISTS", &kept, &new]).integer(), Some(1), "node {node}");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// The commands of a transaction after the one that discards it are not readied for the log:
/// a client watching what they write keeps its transaction, as nothing was written. (Those
/// before it were readied already, and count as writes for WATCH, as a write that times out does.)
#[test]
fn a_discarded_transaction_leaves_watchers_of_its_later_keys_alone() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    for node in [leader, follower] {
        let mut watcher = RespConn::connect(cluster.nodes[leader].port).unwrap();
        assert_eq!(call(&mut watcher, &["WATCH", "watched"]).text().as_deref(), Some("OK"));
        let mut conn = RespConn::connect(cluster.nodes[node].port).unwrap();
        cluster.config_set("maxmemory", "1");
        let replies = conn.pipeline(&[args(&["MULTI"]), args(&["SET", "new", "x"]), args(&["DEL", "watched"]), args(&["EXEC"])]).unwrap();
        let exec = replies[3].items().unwrap_or_else(|| panic!("node {node}: {replies:?}"));
        assert_eq!(exec.len(), 2, "node {node}: {exec:?}");
        assert!(exec.iter().all(|r| r.text().is_some_and(|e| e.starts_with("EXECABORT"))), "node {node}: {exec:?}");
        cluster.config_set("maxmemory", "0");
        let kept = watcher.pipeline(&[args(&["MULTI"]), args(&["GET", "watched"]), args(&["EXEC"])]).unwrap();
        assert!(kept[2].items().is_some(), "node {node}: the watcher's EXEC ran: {kept:?}");
    }
}

/// The leader's judgement is in the log: followers far over a limit of their own apply every
/// write the leader let in, scripts decide as the leader's mark says on every node, and a node
/// that replays the log after a restart decides the same again.
#[test]
fn every_node_applies_what_the_leader_let_in_whatever_its_own_memory() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        cluster.nodes[*f].cmd::<()>(&["RAFT.CONFIG", "SET", "maxmemory", "1"]).unwrap();
    }
    let mut conn = RespConn::connect(cluster.nodes[leader].port).unwrap();
    for i in 0..50 {
        assert_eq!(call(&mut conn, &["SET", &format!("k{i}"), "v"]).text().as_deref(), Some("OK"));
    }
    let script = "return redis.pcall('SET', KEYS[1], 'x')";
    assert_eq!(call(&mut conn, &["EVAL", script, "1", "under"]).text().as_deref(), Some("OK"), "the leader is under its limit");
    cluster.nodes[leader].cmd::<()>(&["RAFT.CONFIG", "SET", "maxmemory", "1"]).unwrap();
    let refused = call(&mut conn, &["EVAL", script, "1", "over"]);
    assert!(refused.is_error() && refused.text().unwrap().starts_with(OOM), "{refused:?}");
    let later = "redis.call('DEL', 'k0') return redis.call('SET', KEYS[1], 'x')";
    assert_eq!(call(&mut conn, &["EVAL", later, "1", "over-after-del"]).text().as_deref(), Some("OK"));
    // The harness finds the leader by a write it must accept.
    cluster.nodes[leader].cmd::<()>(&["RAFT.CONFIG", "SET", "maxmemory", "0"]).unwrap();
    let digest = cluster.assert_same_dataset(&[0, 1, 2]);
    // Every node holds this dataset (the same digest).
    let exists: i64 = cluster.nodes[leader].cmd(&["EXISTS", "under", "over", "over-after-del", "k0", "k1"]).unwrap();
    assert_eq!(exists, 3, "'under', 'over-after-del' and 'k1' only");
    // A restarted follower replays the marked entries from its log and decides the same.
    let f = followers[0];
    cluster.nodes[f].restart().unwrap();
    cluster.nodes[f].cmd::<()>(&["RAFT.CONFIG", "SET", "maxmemory", "0"]).unwrap();
    assert_eq!(cluster.assert_same_dataset(&[0, 1, 2]), digest);
}

/// A setting the log depends on cannot be changed at runtime, and a node whose Redis holds its own
/// memory limit does not load the module.
#[test]
fn redis_settings_the_log_depends_on_are_held() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let mut conn = RespConn::connect(node.port).unwrap();
    for (name, value) in [
        ("maxmemory-policy", "allkeys-lru"),
        ("maxmemory", "1gb"),
        // Redis' unit multiplication wraps: 1024 bytes to it.
        ("maxmemory", "18014398509481985kb"),
        ("bind", "127.0.0.2 127.0.0.1"),
        ("sanitize-dump-payload", "no"),
        ("appendonly", "yes"),
        ("save", "3600 1"),
        ("min-replicas-to-write", "1"),
        ("maxmemory-clients", "4mb"),
    ] {
        let reply = call(&mut conn, &["CONFIG", "SET", "hz", "11", name, value]);
        let text = reply.text().unwrap_or_default();
        assert!(reply.is_error() && text.contains(&format!("'{name}'")), "{name} {value}: {reply:?}");
        let now = call(&mut conn, &["CONFIG", "GET", name]);
        assert_ne!(now.items().and_then(|i| i[1].text()).as_deref(), Some(value), "{name} changed");
        if name == "maxmemory" {
            assert_eq!(now.items().and_then(|i| i[1].text()).as_deref(), Some("0"));
        }
    }
    assert_eq!(call(&mut conn, &["CONFIG", "GET", "hz"]).items().and_then(|i| i[1].text()).as_deref(), Some("10"), "refused whole");
    // The port the others know this node by may be set again, not changed.
    let moved = call(&mut conn, &["CONFIG", "SET", "port", &(node.port + 1).to_string()]);
    assert!(moved.is_error() && moved.text().unwrap_or_default().contains(&format!("port {}", node.port)), "{moved:?}");
    assert_eq!(call(&mut conn, &["CONFIG", "SET", "port", &node.port.to_string()]).text().as_deref(), Some("OK"));
    assert_eq!(call(&mut conn, &["CONFIG", "SET", "maxmemory-policy", "noeviction", "hz", "12"]).text().as_deref(), Some("OK"));
    let queued = conn.pipeline(&[args(&["MULTI"]), args(&["CONFIG", "SET", "appendonly", "yes"]), args(&["EXEC"])]).unwrap();
    assert!(queued[2].items().is_some_and(|r| r[0].is_error()), "{queued:?}");
    assert_eq!(call(&mut conn, &["CONFIG", "GET", "appendonly"]).items().and_then(|i| i[1].text()).as_deref(), Some("no"));
    let bad = call(&mut conn, &["RAFT.CONFIG", "SET", "maxmemory", "lots"]);
    assert!(bad.is_error() && bad.text().unwrap().contains("512mb"), "{bad:?}");

    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut redis = RespConn::connect(plain.port).unwrap();
    call(&mut redis, &["CONFIG", "SET", "maxmemory", "1gb"]);
    let module = module_path().display().to_string();
    let dir = format!("dir={}", cluster.root.path().join("refused").display());
    let loaded = call(&mut redis, &["MODULE", "LOAD", &module, &dir]);
    assert!(loaded.is_error(), "{loaded:?}");
    raftis_integration::wait_for("the reason in the log", std::time::Duration::from_secs(5), || {
        plain.log_tail().contains("maxmemory is '1073741824'").then_some(())
    });
    // An early refusal: the load may be tried again, and is refused for the next setting.
    call(&mut redis, &["CONFIG", "SET", "maxmemory", "0", "maxmemory-clients", "4mb"]);
    let loaded = call(&mut redis, &["MODULE", "LOAD", &module, &dir]);
    assert!(loaded.is_error(), "{loaded:?}");
    raftis_integration::wait_for("the reason in the log", std::time::Duration::from_secs(5), || {
        plain.log_tail().contains("maxmemory-clients is '4194304'").then_some(())
    });
    // A replica of another Redis (here of a port nobody listens on).
    call(&mut redis, &["CONFIG", "SET", "maxmemory-clients", "0"]);
    call(&mut redis, &["REPLICAOF", "127.0.0.1", &free_port_pair().to_string()]);
    let loaded = call(&mut redis, &["MODULE", "LOAD", &module, &dir]);
    assert!(loaded.is_error(), "{loaded:?}");
    raftis_integration::wait_for("the reason in the log", std::time::Duration::from_secs(5), || {
        plain.log_tail().contains("replicaof is '127.0.0.1 ").then_some(())
    });
    call(&mut redis, &["REPLICAOF", "NO", "ONE"]);
    assert_eq!(call(&mut redis, &["MODULE", "LOAD", &module, &dir]).text().as_deref(), Some("OK"), "loads once it is no replica");
}
