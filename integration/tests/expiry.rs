//! Keys expire by the log's clock: a node that applies an entry late (replaying its log after a
//! restart, loading a snapshot, catching up after being cut off) treats keys as the leader did
//! when it proposed the entry, and reaches the same dataset.

use raftis_integration::{digest, free_port_pair, info_text, wait_for, Cluster, Server};
use std::time::{Duration, Instant};

/// Writes on the leader until every node in `nodes` holds the same dataset, and returns its
/// digest. Keys the log has expired leave a follower's memory when Redis' background expiry
/// deletes them, which it does only while the follower applies recent entries: hence the writes.
fn converge(cluster: &Cluster, nodes: &[usize]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _: () = cluster.leader().cmd(&["SET", "tick", "1"]).unwrap();
        cluster.wait_converged(nodes);
        let digests: Vec<String> = nodes.iter().map(|i| digest(&cluster.nodes[*i])).collect();
        if digests.iter().all(|d| *d == digests[0]) || Instant::now() > deadline {
            // Past the deadline, this prints every node's state and fails.
            return cluster.assert_same_dataset(nodes);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(server: &Server, key: &str) -> Option<String> {
    server.cmd(&["GET", key]).unwrap()
}

/// Waits on the wall clock until `deadline` has passed by a margin: what is tested here is what
/// nodes do once a key's deadline is behind them, so real time has to pass it.
fn sleep_past(deadline: Instant) {
    std::thread::sleep((deadline + Duration::from_millis(300)).saturating_duration_since(Instant::now()));
}

/// An INCR, an APPEND and an HINCRBY on each of the `n` keys of each kind.
fn write_to_keys(conn: &mut redis::Connection, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("INCR").arg(format!("c{i}")).ignore();
        pipe.cmd("APPEND").arg(format!("s{i}")).arg("!").ignore();
        pipe.cmd("HINCRBY").arg(format!("h{i}")).arg("f").arg(1).ignore();
    }
    pipe.query::<()>(conn).unwrap();
}

#[test]
fn nodes_replaying_old_entries_expire_keys_as_the_leader_did() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let (from_snapshot, from_log) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let ttl_ms = 5000;
    let expires = Instant::now() + Duration::from_millis(ttl_ms);
    let mut conn = cluster.nodes[leader].client().unwrap();
    let n = 10;
    let mut pipe = redis::pipe();
    for i in 0..n {
        let ttl = ttl_ms.to_string();
        pipe.cmd("SET").arg(format!("c{i}")).arg(5).arg("PX").arg(&ttl).ignore();
        pipe.cmd("SET").arg(format!("s{i}")).arg("hello").arg("PX").arg(&ttl).ignore();
        pipe.cmd("HSET").arg(format!("h{i}")).arg("f").arg(1).ignore();
        pipe.cmd("PEXPIRE").arg(format!("h{i}")).arg(&ttl).ignore();
        pipe.cmd("SET").arg(format!("gone{i}")).arg("x").arg("PX").arg(&ttl).ignore();
        pipe.cmd("SET").arg(format!("long{i}")).arg("v").arg("EX").arg(3600).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    // One node snapshots now, while those keys live: after its restart it loads them from there.
    cluster.wait_converged(&[0, 1, 2]);
    let _: Vec<i64> = cluster.nodes[from_snapshot].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    // Writes to the keys before their deadline: they keep them, and their deadlines.
    write_to_keys(&mut conn, n);
    assert!(Instant::now() < expires, "the writes before the deadline took longer than {ttl_ms} ms");
    assert_eq!(get(&cluster.nodes[leader], "c0").as_deref(), Some("6"));
    sleep_past(expires);
    // Writes to the same keys after it: they meet no key and start new ones, with no deadline.
    write_to_keys(&mut conn, n);
    assert_eq!(get(&cluster.nodes[leader], "c0").as_deref(), Some("1"));
    drop(conn);

    // Both followers apply all of it again, long after every deadline: one from its snapshot
    // and the log after it, the other from its whole log.
    cluster.nodes[from_snapshot].restart().unwrap();
    cluster.nodes[from_log].restart().unwrap();
    let digest = converge(&cluster, &[0, 1, 2]);
    assert_ne!(digest, "0000000000000000000000000000000000000000");
    cluster.config_set("consistency", "low");
    for (i, node) in cluster.nodes.iter().enumerate() {
        for k in 0..n {
            let what = format!("node {i}, key number {k}");
            assert_eq!(get(node, &format!("c{k}")).as_deref(), Some("1"), "{what}");
            assert_eq!(get(node, &format!("s{k}")).as_deref(), Some("!"), "{what}");
            let f: Option<String> = node.cmd(&["HGET", &format!("h{k}"), "f"]).unwrap();
            assert_eq!(f.as_deref(), Some("1"), "{what}");
            let ttls: Vec<i64> = ["c", "s", "h"].iter().map(|p| node.cmd(&["TTL", &format!("{p}{k}")]).unwrap()).collect();
            assert_eq!(ttls, [-1, -1, -1], "{what}: the keys written after the deadline have none");
            assert_eq!(get(node, &format!("gone{k}")), None, "{what}");
            let long: i64 = node.cmd(&["TTL", &format!("long{k}")]).unwrap();
            assert!(long > 3000, "{what}: TTL {long}");
        }
    }
}

/// A partitionable 3-node cluster where every node holds `k = 5`, due `ttl_ms` from now: the
/// cluster, its [leader, a follower, the other follower], and the deadline.
fn key_with_a_deadline(ttl_ms: u64) -> (Cluster, [usize; 3], Instant) {
    let cluster = Cluster::start_partitionable(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let expires = Instant::now() + Duration::from_millis(ttl_ms);
    let _: () = cluster.nodes[leader].cmd(&["SET", "k", "5", "PX", &ttl_ms.to_string()]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    (cluster, [leader, (leader + 1) % 3, (leader + 2) % 3], expires)
}

#[test]
fn a_follower_cut_off_past_a_deadline_keeps_the_key_until_the_log_expires_it() {
    let (cluster, [leader, follower, other], expires) = key_with_a_deadline(8000);
    let network = cluster.network.as_ref().unwrap();
    let l = &cluster.nodes[leader];
    // A stream due before `k`, which the leader keeps (PERSIST) while the follower is cut off.
    let _: String = l.cmd(&["XADD", "s", "*", "f", "v"]).unwrap();
    let _: i64 = l.cmd(&["PEXPIRE", "s", "7000"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    // The follower is cut off and misses a write to the key made before its deadline; it runs
    // on without a leader until the deadline is behind it.
    let _: () = cluster.nodes[follower].cmd(&["RAFT.CONFIG", "SET", "consistency", "low"]).unwrap();
    let keys_held: i64 = cluster.nodes[follower].cmd(&["DBSIZE"]).unwrap();
    network.partition(&[vec![follower], vec![leader, other]]);
    let v: i64 = l.cmd(&["INCR", "k"]).unwrap();
    assert_eq!(v, 6);
    assert_eq!(l.cmd::<i64>(&["PERSIST", "s"]).unwrap(), 1);
    assert!(Instant::now() < expires, "the writes took until the deadline");
    sleep_past(expires);
    let f = &cluster.nodes[follower];
    let horizon: i64 = info_text(f, "expired_up_to_ms").parse().unwrap();
    let applied: i64 = info_text(f, "applied_entry_time_ms").parse().unwrap();
    assert!(horizon <= applied, "the follower expires keys by the log ({horizon}), not its clock");
    // Nor does a read there delete them by the follower's clock (consistency low serves it): a
    // key past its deadline reads as gone, as on a Redis replica, and stays.
    assert_eq!(get(f, "k"), None);
    assert_eq!(f.cmd::<i64>(&["EXISTS", "k", "s"]).unwrap(), 0);
    // Nor does a blocking stream read there, which finds nothing after `$` and waits.
    let read: redis::Value = f.cmd(&["XREAD", "BLOCK", "100", "STREAMS", "s", "$"]).unwrap();
    assert_eq!(read, redis::Value::Nil);
    assert_eq!(f.cmd::<i64>(&["DBSIZE"]).unwrap(), keys_held, "both keys outlived the follower's own clock");
    network.heal();
    // The write arrives after the deadline and must meet the key as the leader did: the key then
    // expires everywhere. Had the follower's clock deleted it meanwhile, the INCR would leave
    // k = 1, with no deadline, on that node alone.
    converge(&cluster, &[0, 1, 2]);
    cluster.config_set("consistency", "low");
    for (i, node) in cluster.nodes.iter().enumerate() {
        assert_eq!(get(node, "k"), None, "node {i}");
        assert_eq!(node.cmd::<i64>(&["EXISTS", "s"]).unwrap(), 1, "node {i}: the PERSIST met the stream");
    }
}

#[test]
fn sort_reads_its_pattern_keys_as_of_the_entry_time_on_every_node() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let replaying = (leader + 1) % 3;
    let ttl_ms = 5000;
    let expires = Instant::now() + Duration::from_millis(ttl_ms);
    let mut conn = cluster.nodes[leader].client().unwrap();
    let ttl = ttl_ms.to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("RPUSH").arg("l").arg(&["a", "b", "c"]).ignore();
    // Weights and objects that SORT reads through its patterns, all expiring: the weights order
    // the list b, c, a; without them it sorts as a, b, c.
    for (element, weight) in [("a", 3), ("b", 1), ("c", 2)] {
        pipe.cmd("SET").arg(format!("w_{element}")).arg(weight).arg("PX").arg(&ttl).ignore();
        pipe.cmd("HSET").arg(format!("o_{element}")).arg("name").arg(element.to_uppercase()).ignore();
        pipe.cmd("PEXPIRE").arg(format!("o_{element}")).arg(&ttl).ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    let sort_into = |conn: &mut redis::Connection, dst: &str| -> i64 {
        redis::cmd("SORT").arg(&["l", "BY", "w_*", "GET", "#", "GET", "o_*->name", "STORE", dst]).query(conn).unwrap()
    };
    assert_eq!(sort_into(&mut conn, "before"), 6);
    assert!(Instant::now() < expires, "the writes before the deadline took longer than {ttl_ms} ms");
    sleep_past(expires);
    assert_eq!(sort_into(&mut conn, "after"), 6);
    drop(conn);

    // The follower replays both sorts long after the deadline. Redis does not count pattern keys
    // among a command's keys: unless they are expired by the entry's time too, it would find the
    // weights still there (nothing expires while the log is applied) and sort the second time as
    // it did the first.
    cluster.nodes[replaying].restart().unwrap();
    converge(&cluster, &[0, 1, 2]);
    cluster.config_set("consistency", "low");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let before: Vec<String> = node.cmd(&["LRANGE", "before", "0", "-1"]).unwrap();
        assert_eq!(before, ["b", "B", "c", "C", "a", "A"], "node {i}");
        let after: Vec<String> = node.cmd(&["LRANGE", "after", "0", "-1"]).unwrap();
        assert_eq!(after, ["a", "", "b", "", "c", ""], "node {i}");
    }
}

#[test]
fn followers_of_an_idle_cluster_expire_keys_too() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let _: () = cluster.nodes[leader].cmd(&["SET", "k", "v", "PX", "1000"]).unwrap();
    let _: () = cluster.nodes[leader].cmd(&["SET", "kept", "v"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    // No more writes. A follower expires keys only up to the time of the newest entry it
    // applied, before the key's deadline; without the leader's clock entries it would keep `k`
    // for good. INFO keyspace counts the keys with a deadline in memory without expiring any.
    for (i, node) in cluster.nodes.iter().enumerate() {
        wait_for(&format!("node {i} to drop the expired key"), Duration::from_secs(10), || {
            let keyspace: String = node.cmd(&["INFO", "keyspace"]).unwrap();
            keyspace.contains("expires=0,").then_some(())
        });
    }
    let kept: Option<String> = cluster.nodes[leader].cmd(&["GET", "kept"]).unwrap();
    assert_eq!(kept.as_deref(), Some("v"));
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn a_key_the_log_expires_is_announced_as_expired() {
    let (cluster, [leader, follower, other], expires) = key_with_a_deadline(5000);
    let network = cluster.network.as_ref().unwrap();
    let l = &cluster.nodes[leader];
    // A subscriber to the follower's expiry events, as an application invalidating a cache would.
    let f = &cluster.nodes[follower];
    let _: () = f.cmd(&["CONFIG", "SET", "notify-keyspace-events", "Ex"]).unwrap();
    let mut events = f.client().unwrap();
    events.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut events = events.as_pubsub();
    events.subscribe("__keyevent@0__:expired").unwrap();

    // Cut off, the follower applies nothing after the deadline, and keeps the key past it.
    network.partition(&[vec![follower], vec![leader, other]]);
    assert!(Instant::now() < expires, "the follower was cut off only after the deadline");
    sleep_past(expires);
    let _: i64 = l.cmd(&["APPEND", "k", "x"]).unwrap();
    network.heal();
    // The follower applies the APPEND, stamped after the deadline: it is the log, not Redis'
    // clock, that deletes the key there, and subscribers must hear of it as they would of any
    // expiry.
    let message = events.get_message().expect("an expired event from the follower");
    assert_eq!(message.get_channel_name(), "__keyevent@0__:expired");
    assert_eq!(message.get_payload::<String>().unwrap(), "k");
    cluster.wait_converged(&[0, 1, 2]);
    cluster.config_set("consistency", "low");
    assert_eq!(get(f, "k").as_deref(), Some("x"));
    let ttl: i64 = f.cmd(&["TTL", "k"]).unwrap();
    assert_eq!(ttl, -1);
}

/// Every write of a transaction reads the entry's clock, however long EXEC takes to reach it: an
/// `EXPIRE k 0` thousands of commands after the `SET` (milliseconds later) still deletes the key
/// at once, on every node. Each write used to be pinned to its own moment while the entry
/// applies at its first write's, so the deadline was still ahead when it applied.
#[test]
fn a_transaction_reads_one_clock_however_long_exec_takes() {
    // Low: every node answers for itself.
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let mut conn = leader.client().unwrap();
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("SET").arg("a").arg(1).ignore();
    for i in 0..5000 {
        pipe.cmd("SET").arg(format!("pad{i}")).arg(i).ignore();
    }
    pipe.cmd("EXPIRE").arg("a").arg(0).cmd("EXISTS").arg("a");
    let (expired, exists): (i64, i64) = pipe.query(&mut conn).unwrap();
    assert_eq!((expired, exists), (1, 0), "EXPIRE a 0 inside the transaction left the key");
    cluster.wait_converged(&[0, 1, 2]);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let exists: i64 = node.cmd(&["EXISTS", "a"]).unwrap();
        assert_eq!(exists, 0, "node {i} kept a key whose deadline had passed when it was set");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A deadline already past when it is set deletes the key at once, as in Redis, also inside a
/// transaction or a script, where the next command must not find the key; and a deadline before
/// 1970 (`PEXPIREAT k -1`) does not leave a key that never expires.
#[test]
fn a_deadline_already_past_deletes_the_key_at_once_on_every_node() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let keys_before: i64 = leader.cmd(&["DBSIZE"]).unwrap();
    let mut conn = leader.client().unwrap();

    let (set, expired, exists, size): (String, i64, i64, i64) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("a")
        .arg(1)
        .cmd("EXPIRE")
        .arg("a")
        .arg(0)
        .cmd("EXISTS")
        .arg("a")
        .cmd("DBSIZE")
        .query(&mut conn)
        .unwrap();
    assert_eq!((set.as_str(), expired, exists, size), ("OK", 1, 0, keys_before), "inside a transaction");

    // (A script may not call DBSIZE. EXISTS says it: Redis, loading while the log applies,
    // would find a key left with a past deadline.)
    let script = "redis.call('SET', KEYS[1], 1); redis.call('EXPIRE', KEYS[1], 0); return redis.call('EXISTS', KEYS[1])";
    let exists: i64 = redis::cmd("EVAL").arg(script).arg(1).arg("b").query(&mut conn).unwrap();
    assert_eq!(exists, 0, "inside a script");

    let _: () = redis::cmd("SET").arg("c").arg(1).query(&mut conn).unwrap();
    let _: i64 = redis::cmd("PEXPIREAT").arg("c").arg(-1).query(&mut conn).unwrap();
    let _: () = redis::cmd("SET").arg("d").arg(1).query(&mut conn).unwrap();
    let v: String = redis::cmd("GETEX").arg("d").arg("PXAT").arg(1).query(&mut conn).unwrap();
    assert_eq!(v, "1");
    // Times Redis does not read as integers are refused as Redis refuses them, not turned into
    // valid deadlines on the way to the log.
    for time in ["010", "+5", "-0", "-05"] {
        for command in [&["SET", "e", "1", "EX", time][..], &["EXPIRE", "c", time], &["SETEX", "e", time, "1"]] {
            let err = leader.cmd::<redis::Value>(command).unwrap_err().to_string();
            assert!(err.contains("not an integer"), "{command:?}: {err}");
        }
    }
    cluster.wait_converged(&[0, 1, 2]);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let size: i64 = node.cmd(&["DBSIZE"]).unwrap();
        assert_eq!(size, keys_before, "node {i} still holds keys whose deadline had passed when it was set");
        let exists: i64 = node.cmd(&["EXISTS", "c"]).unwrap();
        assert_eq!(exists, 0, "node {i}: PEXPIREAT c -1 left a key that never expires");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// `MOVE` and `COPY ... DB` write a key in another database, where a key of that name, dead by
/// the log's clock, makes them refuse: every node, however late it applies them, sees that key as
/// the leader did. (A follower replaying its log still holds the dead key, which the leader's
/// background expiry deleted long before.)
#[test]
fn move_and_copy_meet_the_other_databases_keys_as_of_the_entry_time() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let mut conn = cluster.nodes[leader].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(1).query(&mut conn).unwrap();
    for key in ["moved", "copied"] {
        let _: () = redis::cmd("SET").arg(key).arg("old").arg("PX").arg(100).query(&mut conn).unwrap();
    }
    sleep_past(Instant::now() + Duration::from_millis(100));
    let _: () = redis::cmd("SELECT").arg(0).query(&mut conn).unwrap();
    for key in ["moved", "copied"] {
        let _: () = redis::cmd("SET").arg(key).arg("new").query(&mut conn).unwrap();
    }
    let moved: i64 = redis::cmd("MOVE").arg("moved").arg(1).query(&mut conn).unwrap();
    let copied: i64 = redis::cmd("COPY").arg("copied").arg("copied").arg("DB").arg(1).query(&mut conn).unwrap();
    assert_eq!((moved, copied), (1, 1), "the keys in database 1 were dead");
    let digest = converge(&cluster, &[0, 1, 2]);

    cluster.nodes[follower].restart().unwrap();
    assert_eq!(converge(&cluster, &[0, 1, 2]), digest, "the follower that replayed its log holds the same dataset");
}

/// Lists that expire while they are drained into lists that do not: every `LMOVE` the leader
/// proposed before a source's deadline must move an element on every node, however close to the
/// deadline it arrives there. Nodes used to delete a source by their own clock (Redis' background
/// expiry, a read) while such a move was on its way, and their destination lists parted from the
/// leader's within seconds, with no fault at all. Writers go through the leader and through the
/// followers (their proxy stamps writes on other threads than Redis'), and readers on every node
/// look the sources up.
#[test]
fn keys_expiring_under_a_stream_of_writes_leave_every_node_with_the_same_data() {
    let cluster = Cluster::start(3, &["consistency=low", "follower-proxy=yes"]).unwrap();
    cluster.wait_leader();
    drain_expiring_lists(&cluster, Duration::from_secs(10), || {});
    assert_every_node_drops_the_sources_alike(&cluster);
}

/// The same with the nodes' clocks 3 s apart (one ahead, one behind, one right) while leadership
/// moves from one to the next every second: a leader behind the log's newest time stamps its
/// entries no earlier (times never go back along the log), and no node deletes by a clock, its
/// own or the log's, a key that an entry still on its way meets alive.
#[test]
fn keys_expiring_under_skewed_clocks_and_moving_leadership_leave_every_node_with_the_same_data() {
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let args = ["consistency=low", "follower-proxy=yes"];
    let nodes = [0, 3000, -3000]
        .iter()
        .enumerate()
        .map(|(i, skew)| Server::start_with_clock_skew(free_port_pair(), &root.path().join(format!("n{i}")), *skew, &args).unwrap())
        .collect();
    let cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();
    let mut moves = 0;
    drain_expiring_lists(&cluster, Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_secs(1));
        let leader = cluster.wait_leader();
        let next = cluster.nodes[(leader + 1) % 3].node_id().to_string();
        moves += usize::from(cluster.nodes[leader].cmd::<String>(&["RAFT.TRANSFERLEADER", &next]).is_ok());
    });
    assert!(moves >= 3, "leadership moved {moves} times");
    assert_every_node_drops_the_sources_alike(&cluster);
}

/// A leader deletes a key once its clock passes the key's deadline, and that is not in the log: the
/// next leader, whose clock is behind, must still stamp its entries past that deadline, or they
/// meet the key alive on every node but the one that deleted it. (They did: `INCR` answered 6 on
/// the new leader, and the old one, with the key gone, had 1.)
#[test]
fn a_new_leader_behind_its_predecessors_clock_never_meets_alive_a_key_the_predecessor_expired() {
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let args = ["consistency=low"];
    let start =
        |i: usize, skew: i64| Server::start_with_clock_skew(free_port_pair(), &root.path().join(format!("n{i}")), skew, &args).unwrap();
    let nodes = vec![start(0, 3000), start(1, 0), start(2, 0)];
    let cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();
    let (ahead, behind) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Due before the old leader proposes a clock entry (after a second without writes), which
    // would put its clock in the log.
    let _: () = ahead.cmd(&["SET", "k", "5", "PX", "300"]).unwrap();
    let deadline: i64 = ahead.cmd::<i64>(&["PEXPIRETIME", "k"]).unwrap();
    let clock_ms = |node: &Server| {
        let [s, us]: [i64; 2] = node.cmd::<Vec<i64>>(&["TIME"]).unwrap().try_into().unwrap();
        s * 1000 + us / 1000
    };
    wait_for("the leader's clock to pass the deadline", Duration::from_secs(5), || (clock_ms(ahead) > deadline).then_some(()));
    assert_eq!(ahead.cmd::<Option<String>>(&["GET", "k"]).unwrap(), None);
    let _: () = ahead.cmd(&["RAFT.TRANSFERLEADER", &behind.node_id().to_string()]).unwrap();
    assert_eq!(cluster.wait_leader(), 1);
    assert_eq!(behind.cmd::<i64>(&["INCR", "k"]).unwrap(), 1, "the new leader met the key alive");
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// For `duration`: writers (two through each node) push lists due in 20 to 29 ms and drain them
/// with `LMOVE` into lists with no deadline, across their deadlines, while readers on every node
/// look the sources up; `meanwhile` runs over and over beside them.
fn drain_expiring_lists(cluster: &Cluster, duration: Duration, mut meanwhile: impl FnMut()) {
    let until = Instant::now() + duration;
    // On two busy cores a follower's proxy may give up waiting for the leader (-TIMEOUT), and a
    // write may meet leadership moving (-CLUSTERDOWN): the write may or may not have happened.
    // Either way every node must end with the same lists.
    let tolerated = |e: &redis::RedisError| matches!(e.code(), Some("TIMEOUT" | "CLUSTERDOWN" | "MOVED"));
    std::thread::scope(|scope| {
        for writer in 0..6 {
            let node = &cluster.nodes[writer % 3];
            scope.spawn(move || {
                let mut conn = node.client().unwrap();
                let mut round = 0;
                while Instant::now() < until {
                    // Ten sources at a time, due 20 to 29 ms from now, drained for 60 ms.
                    let sources: Vec<String> = (0..10).map(|i| format!("src:{writer}:{round}:{i}")).collect();
                    let mut pipe = redis::pipe();
                    for (i, src) in sources.iter().enumerate() {
                        pipe.cmd("RPUSH").arg(src).arg((0..50).collect::<Vec<_>>()).ignore();
                        pipe.cmd("PEXPIRE").arg(src).arg(20 + i).ignore();
                    }
                    if let Err(e) = pipe.query::<()>(&mut conn) {
                        assert!(tolerated(&e), "{e}");
                        conn = node.client().unwrap();
                    }
                    let draining = Instant::now() + Duration::from_millis(60);
                    while Instant::now() < draining {
                        let mut pipe = redis::pipe();
                        for src in &sources {
                            pipe.cmd("LMOVE").arg(src).arg(format!("dst:{writer}")).arg("LEFT").arg("RIGHT").ignore();
                        }
                        if let Err(e) = pipe.query::<()>(&mut conn) {
                            assert!(tolerated(&e), "{e}");
                            conn = node.client().unwrap();
                        }
                    }
                    round += 1;
                }
            });
        }
        for node in &cluster.nodes {
            scope.spawn(move || {
                let mut conn = node.client().unwrap();
                while Instant::now() < until {
                    let sources: Vec<String> = redis::cmd("KEYS").arg("src:*").query(&mut conn).unwrap();
                    for src in sources.iter().take(20) {
                        let _: i64 = redis::cmd("LLEN").arg(src).query(&mut conn).unwrap();
                    }
                }
            });
        }
        while Instant::now() < until {
            meanwhile();
        }
    });
}

/// Every source has expired by now: once the nodes have the same log, each drops them all (its
/// background expiry), and they hold the same data.
fn assert_every_node_drops_the_sources_alike(cluster: &Cluster) {
    cluster.wait_converged(&[0, 1, 2]);
    for (i, node) in cluster.nodes.iter().enumerate() {
        wait_for(&format!("node {i} to drop the expired sources"), Duration::from_secs(10), || {
            let keyspace: String = node.cmd(&["INFO", "keyspace"]).unwrap();
            keyspace.contains("expires=0,").then_some(())
        });
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}
