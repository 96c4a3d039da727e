//! Lua scripts run on every node from the log and leave every node with the same dataset.

use raftis_integration::{field_in, info_field, stat_field, wait_for, Cluster};
use redis::Value;
use std::time::Duration;

fn eval<T: redis::FromRedisValue>(conn: &mut redis::Connection, script: &str, keys: &[&str], args: &[&str]) -> redis::RedisResult<T> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
    cmd.query(conn)
}

#[test]
fn scripts_run_the_same_on_every_node_also_when_replayed() {
    // consistency=low lets the test read each node's own dataset.
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let mut conn = cluster.nodes[leader].client().unwrap();

    // A write, its reply Redis' own.
    let n: i64 = eval(&mut conn, "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])", &["a", "c"], &["x"]).unwrap();
    assert_eq!(n, 1);
    // math.random starts from the same seed on every node, at every script.
    let r1: i64 = eval(&mut conn, "local r = math.random(1000000); redis.call('SET', KEYS[1], r); return r", &["random"], &[]).unwrap();
    let r2: i64 = eval(&mut conn, "return math.random(1000000)", &[], &[]).unwrap();
    assert_eq!(r1, r2);
    // A relative time inside a script gets one deadline, from the entry's time.
    let deadline: i64 =
        eval(&mut conn, "redis.call('SET', KEYS[1], 'v', 'EX', 100); return redis.call('PEXPIRETIME', KEYS[1])", &["ttl"], &[]).unwrap();
    assert!(deadline > 0);
    // A key the script does not declare is still written, and replicated.
    let _: () = eval(&mut conn, "redis.call('RPUSH', 'undeclared', 1, 2, 3)", &[], &[]).unwrap();
    // Calls whose answer differs between nodes raise an error in the script; what it wrote before
    // stays, as in Redis.
    for (call, name) in
        [("redis.call('TIME')", "TIME"), ("redis.call('SMEMBERS', 's')", "SMEMBERS"), ("redis.call('RANDOMKEY')", "RANDOMKEY")]
    {
        let script = format!("redis.call('INCR', 'before-refused'); return {call}");
        let err = eval::<Value>(&mut conn, &script, &[], &[]).unwrap_err();
        assert!(err.to_string().contains(&format!("{name} inside a script")), "{err}");
    }
    let err = eval::<Value>(&mut conn, "return redis.call('RAFT.INFO')", &[], &[]).unwrap_err();
    assert!(err.to_string().contains("Raftis' own commands"), "{err}");
    // A script Redis cannot compile: its error, and nothing known under its SHA1.
    let err = eval::<Value>(&mut conn, "this is not lua", &[], &[]).unwrap_err();
    assert!(err.to_string().contains("Error compiling script"), "{err}");

    // SCRIPT LOAD goes through the log; EVALSHA reaches the log as the script's text.
    let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg("return redis.call('INCRBY', KEYS[1], ARGV[1])").query(&mut conn).unwrap();
    let v: i64 = redis::cmd("EVALSHA").arg(&sha).arg(1).arg("counter").arg(5).query(&mut conn).unwrap();
    assert_eq!(v, 5);
    let err = redis::cmd("EVALSHA").arg("0000000000000000000000000000000000000000").arg(0).query::<Value>(&mut conn).unwrap_err();
    assert_eq!(err.code(), Some("NOSCRIPT"), "{err}");
    let v: String = redis::cmd("EVAL_RO").arg("return redis.call('GET', KEYS[1])").arg(1).arg("a").query(&mut conn).unwrap();
    assert_eq!(v, "x");
    // Inside a transaction, with the rest of it.
    let (v, w): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("EVALSHA")
        .arg(&sha)
        .arg(1)
        .arg("counter")
        .arg(1)
        .cmd("EVAL")
        .arg("return redis.call('INCR', KEYS[1])")
        .arg(1)
        .arg("counter")
        .query(&mut conn)
        .unwrap();
    assert_eq!((v, w), (6, 7));
    drop(conn);

    for node in &cluster.nodes {
        let ttl_deadline: i64 = node.cmd(&["PEXPIRETIME", "ttl"]).unwrap();
        assert_eq!(ttl_deadline, deadline, "node {}", node.port);
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        assert_eq!(stat_field(node, "known_scripts"), stat_field(&cluster.nodes[leader], "known_scripts"));
    }

    // A follower restarted from its log runs every script again, with an empty script cache, to
    // the same dataset.
    let follower = (leader + 1) % 3;
    cluster.nodes[follower].kill9();
    cluster.nodes[follower].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);

    // Any node can lead and still turn a SHA1 its log loaded into the script.
    cluster.nodes[leader].kill9();
    let new = wait_for("a new leader", Duration::from_secs(10), || {
        (0..3).filter(|i| *i != leader).find(|i| cluster.nodes[*i].state() == "leader")
    });
    let mut conn = cluster.nodes[new].client().unwrap();
    let v: i64 = wait_for("EVALSHA on the new leader", Duration::from_secs(10), || {
        redis::cmd("EVALSHA").arg(&sha).arg(1).arg("counter").arg(10).query(&mut conn).ok()
    });
    assert_eq!(v, 17);
    cluster.nodes[leader].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn script_flush_and_the_commands_a_script_cannot_use_are_answered_clearly() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let sha: String = node.cmd(&["SCRIPT", "LOAD", "return 1"]).unwrap();
    let exists: Vec<i64> = node.cmd(&["SCRIPT", "EXISTS", &sha]).unwrap();
    assert_eq!(exists, [1]);
    let _: () = node.cmd(&["SCRIPT", "FLUSH"]).unwrap();
    let err = node.cmd::<Value>(&["EVALSHA", &sha, "0"]).unwrap_err();
    assert_eq!(err.code(), Some("NOSCRIPT"), "a flushed script is forgotten by the log too: {err}");
    assert_eq!(stat_field(node, "known_scripts"), 0);
    // Pipelined, none of it applied yet when the next is proposed: EVALSHA finds what EVAL ran
    // before it and not what SCRIPT FLUSH dropped before it, as in Redis.
    let evalsha = format!("*3\r\n$7\r\nEVALSHA\r\n$40\r\n{sha}\r\n$1\r\n0\r\n");
    let request = format!("*3\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n0\r\n{evalsha}SCRIPT FLUSH\r\n{evalsha}");
    let expected = ":1\r\n:1\r\n+OK\r\n-NOSCRIPT No matching script. Please use EVAL.\r\n";
    let got = raftis_integration::raw_exchange(node.port, request.as_bytes(), expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected);
    // A flush Redis refuses keeps the cache, in Redis and in the log's copy.
    let sha: String = node.cmd(&["SCRIPT", "LOAD", "return 2"]).unwrap();
    let err = node.cmd::<Value>(&["SCRIPT", "FLUSH", "LATER"]).unwrap_err();
    assert!(err.to_string().contains("SYNC|ASYNC"), "{err}");
    assert_eq!(node.cmd::<i64>(&["EVALSHA", &sha, "0"]).unwrap(), 2);
    let _: () = node.cmd(&["SCRIPT", "FLUSH", "async"]).unwrap();
    assert_eq!(node.cmd::<Value>(&["EVALSHA", &sha, "0"]).unwrap_err().code(), Some("NOSCRIPT"));
    let err = node.cmd::<Value>(&["SCRIPT", "DEBUG", "YES"]).unwrap_err();
    assert!(err.to_string().contains("SCRIPT DEBUG"), "{err}");
    let err = node.cmd::<Value>(&["EVAL", "return redis.call('SPOP', KEYS[1])", "1", "s"]).unwrap_err();
    assert!(err.to_string().contains("SPOP"), "{err}");
    let err = node.cmd::<Value>(&["EVAL", "return redis.call('FCALL', 'f', 0)", "0"]).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("function") || err.to_string().contains("not allowed"), "{err}");
    // Untipped by Redis, but what they answer differs between nodes.
    for call in ["DBSIZE", "PUBSUB', 'NUMSUB', 'ch"] {
        let script = format!("redis.call('SET', KEYS[1], redis.call('{call}')) return 1");
        let err = node.cmd::<Value>(&["EVAL", &script, "1", "n"]).unwrap_err();
        assert!(err.to_string().contains("could answer differently on every node"), "{call}: {err}");
    }
    assert_eq!(node.cmd::<i64>(&["EXISTS", "n"]).unwrap(), 0);
    let err = node.cmd::<Value>(&["RESTORE-ASKING", "k", "5000", "x"]).unwrap_err();
    assert!(err.to_string().contains("use RESTORE"), "{err}");
    assert!(node.cmd::<String>(&["PING"]).is_ok());
}

#[test]
fn a_script_that_never_ends_is_killed_on_every_node_and_the_cluster_goes_on() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    for node in &cluster.nodes {
        let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    }
    let leader = cluster.wait_leader();
    let mut conn = cluster.nodes[leader].client().unwrap();
    let runner = std::thread::spawn(move || eval::<Value>(&mut conn, "while true do end", &[], &[]));
    // Every node runs it (Redis answers -BUSY meanwhile); each one is told to stop it.
    for node in &cluster.nodes {
        let reply: String = wait_for("the script to run here", Duration::from_secs(10), || node.quick_cmd(&["SCRIPT", "KILL"]).ok());
        assert_eq!(reply, "OK");
    }
    let err = runner.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("Script killed"), "{err}");
    let _: () = cluster.nodes[leader].cmd(&["SET", "after", "1"]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    let err = cluster.nodes[leader].cmd::<Value>(&["SCRIPT", "KILL"]).unwrap_err();
    assert_eq!(err.code(), Some("NOTBUSY"), "{err}");
}

/// A read-only script (`EVAL_RO`) goes through the log like any script, at consistency high
/// too. One that runs past `busy-reply-threshold` lets Redis serve other clients meanwhile
/// (RAFT.INFO, SCRIPT KILL) and run the module's events: none of them may wait for what the
/// running script holds, and SCRIPT KILL ends it as in Redis.
#[test]
fn a_long_read_only_script_at_consistency_high_leaves_the_server_serving() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    let mut conn = node.client().unwrap();
    let runner =
        std::thread::spawn(move || redis::cmd("EVAL_RO").arg("local i = 0 while true do i = i + 1 end").arg(0).query::<Value>(&mut conn));
    // Redis refuses other commands while it runs (-BUSY; -LOADING once the leader, its clock
    // entry committed and not applied, holds its expiry back, see `expiry`).
    let info: String = wait_for("RAFT.INFO while the script runs", Duration::from_secs(10), || {
        let refused = node.quick_cmd::<String>(&["PING"]).is_err();
        let info: String = node.quick_cmd(&["RAFT.INFO"]).ok()?;
        refused.then_some(info)
    });
    assert!(info.contains("role:leader"), "{info}");
    let reply: String = node.cmd(&["SCRIPT", "KILL"]).unwrap();
    assert_eq!(reply, "OK");
    let err = runner.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("Script killed"), "{err}");
    let _: () = node.cmd(&["SET", "after", "1"]).unwrap();
    assert_eq!(node.cmd::<String>(&["GET", "after"]).unwrap(), "1");
}

/// A script that writes and then never ends holds every node, and would hold them again each
/// time they replay their logs: SCRIPT KILL cannot stop it. RAFT.INFO and the log name the entry;
/// started again with skip-entry, every node passes it by, and a later restart without the
/// argument does not run it again (a snapshot covers it).
#[test]
fn a_script_that_writes_and_never_ends_is_skipped_at_the_operators_request() {
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let _: () = cluster.nodes[leader].cmd(&["SET", "before", "1"]).unwrap();
    let mut conn = cluster.nodes[leader].client().unwrap();
    let runner = std::thread::spawn(move || eval::<Value>(&mut conn, "redis.call('SET', 'written', 1) while true do end", &[], &[]));

    // RAFT.INFO answers while the script holds a node, and names the entry.
    let stuck: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|node| {
            wait_for("the script to hold this node", Duration::from_secs(10), || {
                let info: String = node.quick_cmd(&["RAFT.INFO"]).ok()?;
                let index: u64 = field_in(&info, "applying_index")?.parse().ok()?;
                let running: u64 = field_in(&info, "applying_for_ms")?.parse().ok()?;
                (index > 0 && running >= 200).then_some(index)
            })
        })
        .collect();
    let entry = stuck[0];
    assert!(stuck.iter().all(|i| *i == entry), "{stuck:?}");
    let err = cluster.nodes[leader].quick_cmd::<Value>(&["SCRIPT", "KILL"]).unwrap_err();
    assert_eq!(err.code(), Some("UNKILLABLE"), "{err}");
    // The watchdog tells the operator what to do, with the index.
    let advice = format!("start each again with the module argument skip-entry={entry}");
    wait_for("the watchdog's advice in the log", WATCHDOG_REPORT, || {
        std::fs::read_to_string(cluster.nodes[leader].dir.join("redis.log")).ok()?.contains(&advice).then_some(())
    });

    for node in &mut cluster.nodes {
        node.kill9();
    }
    assert!(runner.join().unwrap().is_err());
    for node in &mut cluster.nodes {
        node.extra.push(format!("skip-entry={entry}"));
        node.restart().unwrap();
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        assert_eq!(node.cmd::<String>(&["GET", "before"]).unwrap(), "1");
        assert_eq!(node.cmd::<i64>(&["EXISTS", "written"]).unwrap(), 0, "the skipped script's write");
        assert_eq!(node.cmd::<Vec<String>>(&["RAFT.CONFIG", "GET", "skip-entry"]).unwrap(), ["skip-entry", &entry.to_string()]);
        wait_for("a snapshot past the skipped entry", Duration::from_secs(20), || {
            (info_field(node, "snapshot_index") >= entry).then_some(())
        });
    }

    // Without the argument again, the nodes start from their snapshots and never meet the entry.
    for node in &mut cluster.nodes {
        node.extra.pop();
        node.restart().unwrap();
    }
    let leader = cluster.wait_leader();
    let _: () = cluster.nodes[leader].cmd(&["SET", "after", "1"]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        assert_eq!(node.cmd::<i64>(&["EXISTS", "before", "after", "written"]).unwrap(), 2);
    }
}

/// How soon the watchdog reports a stuck entry at the latest: it looks once a second and reports
/// one running for 10 s (`runaway::SLOW_AFTER`).
const WATCHDOG_REPORT: Duration = Duration::from_secs(20);

/// Through a follower, an EVALSHA the leader cannot resolve fails alone, as on the leader: the
/// commands pipelined or queued with it still run.
#[test]
fn through_a_follower_an_unknown_sha_fails_alone() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    let unknown = "EVALSHA 0000000000000000000000000000000000000000 0\r\n";
    let request = format!("SET b 1\r\n{unknown}GET b\r\nMULTI\r\nSET a 1\r\n{unknown}GET a\r\nEXEC\r\n");
    let noscript = "-NOSCRIPT No matching script. Please use EVAL.\r\n";
    let expected = format!("+OK\r\n{noscript}$1\r\n1\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n{noscript}$1\r\n1\r\n");
    let got = raftis_integration::raw_exchange(follower.port, request.as_bytes(), expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A script may add to a stream with an id of its own and trim it, approximately too: Redis tips
/// both commands as nondeterministic for an automatic id and for the approximate trim, which
/// depends only on the stream's nodes, the same on every node. An automatic id is still refused.
#[test]
fn a_script_adds_to_a_stream_with_its_own_ids_and_trims_it_the_same_everywhere() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let script = "for i = 1, 300 do redis.call('XADD', KEYS[1], 'MAXLEN', '~', '50', ARGV[1] + i .. '-1', 'n', i) end \
                  return redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', '20')";
    for round in 0..3 {
        let base = (round * 1000).to_string();
        let _: i64 = leader.cmd(&["EVAL", script, "1", "s", &base]).unwrap();
    }
    let err = leader.cmd::<Value>(&["EVAL", "return redis.call('XADD', KEYS[1], '*', 'f', 'v')", "1", "s"]).unwrap_err();
    assert!(err.to_string().contains("XADD inside a script"), "{err}");
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
    let len: i64 = leader.cmd(&["XLEN", "s"]).unwrap();
    assert!((20..300).contains(&len), "{len}");
}
