//! Redis Cluster clients: the map they ask for (`CLUSTER SLOTS`, `CLUSTER NODES`, ...) names the
//! leader as the master of every slot, so a cluster-mode client (here the `redis` crate's) sends
//! its commands to the leader, and after the leader changes it follows `-MOVED` to the new one.

use raftis_integration::resp_conn::{args, Reply, RespConn};
use raftis_integration::{free_port_pair, stat_field, wait_for, Cluster, Server};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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
    assert_eq!(master.len(), 4, "Redis 7.0's fields, the last an empty map of other endpoints: {slots:?}");
    assert_eq!(master[3], redis::Value::Bulk(vec![]), "{slots:?}");
    assert_eq!(range.len(), 5, "the master and two replicas: {slots:?}");
    (host, port)
}

/// `CLUSTER SHARDS` in RESP2: the nodes of its one shard, each as field -> value.
fn shard_nodes(shards: &redis::Value) -> Vec<std::collections::HashMap<String, String>> {
    let redis::Value::Bulk(shards) = shards else { panic!("CLUSTER SHARDS: {shards:?}") };
    assert_eq!(shards.len(), 1, "one shard: {shards:?}");
    let shard: std::collections::HashMap<String, redis::Value> = redis::from_redis_value(&shards[0]).unwrap();
    let slots: Vec<i64> = redis::from_redis_value(&shard["slots"]).unwrap();
    assert_eq!(slots, [0, 16383]);
    let nodes: Vec<std::collections::HashMap<String, redis::Value>> = redis::from_redis_value(&shard["nodes"]).unwrap();
    let text = |v: &redis::Value| match v {
        redis::Value::Int(i) => i.to_string(),
        v => redis::from_redis_value::<String>(v).unwrap(),
    };
    nodes.iter().map(|n| n.iter().map(|(k, v)| (k.clone(), text(v))).collect()).collect()
}

/// Pauses the leader until another node leads, then resumes it and waits until it follows.
/// Returns the new leader.
fn hand_over_by_pausing(cluster: &Cluster, leader: usize) -> usize {
    cluster.nodes[leader].pause();
    let new_leader = wait_for("a new leader", Duration::from_secs(20), || {
        (0..cluster.nodes.len()).filter(|i| *i != leader).find(|i| cluster.nodes[*i].state() == "leader")
    });
    cluster.nodes[leader].resume();
    wait_for("the old leader to follow", Duration::from_secs(20), || (cluster.nodes[leader].state() == "follower").then_some(()));
    new_leader
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
        // Redis 7's map: one shard, every slot, the leader its master.
        let shards: redis::Value = node.cmd(&["CLUSTER", "SHARDS"]).unwrap();
        let nodes = shard_nodes(&shards);
        assert_eq!(nodes.len(), 3, "{shards:?}");
        assert_eq!((nodes[0]["role"].as_str(), nodes[0]["port"].as_str()), ("master", leader_port.to_string().as_str()));
        assert!(nodes[1..].iter().all(|n| n["role"] == "replica" && n["health"] == "online"), "{nodes:?}");
        assert!(nodes.iter().any(|n| n["id"] == myid), "{nodes:?}");
    }
    // The leader knows how far each node has the log: the write that made it ready, at least.
    let on_leader = shard_nodes(&cluster.nodes[leader].cmd(&["CLUSTER", "SHARDS"]).unwrap());
    assert!(on_leader.iter().all(|n| n["replication-offset"].parse::<u64>().unwrap() > 0), "{on_leader:?}");
    // In RESP3 a shard and a node are maps, as in Redis.
    let mut resp3 = RespConn::connect(cluster.nodes[follower].port).unwrap();
    resp3.call(&[b"HELLO", b"3"]).unwrap();
    let shards = resp3.call(&[b"CLUSTER", b"SHARDS"]).unwrap();
    assert!(matches!(&shards.items().unwrap()[0], Reply::Aggregate(b'%', _)), "{shards:?}");
    // The subcommands that manage a Redis Cluster are refused with what does their job here,
    // not with Redis' "cluster support disabled", which CLUSTER INFO would contradict.
    let node = &cluster.nodes[follower];
    let err = |args: &[&str]| node.cmd::<String>(args).unwrap_err().to_string();
    let refused = err(&["CLUSTER", "COUNTKEYSINSLOT", "0"]);
    assert!(refused.contains("CLUSTER COUNTKEYSINSLOT is not supported by Raftis") && refused.contains("DBSIZE"), "{refused}");
    assert!(err(&["cluster", "failover"]).contains("RAFT.TRANSFERLEADER"));
    assert!(err(&["CLUSTER", "MEET", "127.0.0.1", "7000"]).contains("RAFT.ADDPEER"));
    assert!(err(&["CLUSTER", "Frob"]).contains("unknown subcommand 'Frob'. Try CLUSTER HELP."));
    assert!(err(&["CLUSTER", "KEYSLOT"]).contains("wrong number of arguments for 'cluster|keyslot' command"));
    assert!(err(&["CLUSTER", "NODES", "extra"]).contains("wrong number of arguments for 'cluster|nodes' command"));
    let help: Vec<String> = node.cmd(&["CLUSTER", "HELP"]).unwrap();
    assert!(help.iter().any(|line| line == "SHARDS") && help.iter().any(|line| line.contains("RAFT.TRANSFERLEADER")), "{help:?}");

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
    let new_leader = hand_over_by_pausing(&cluster, leader);
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

/// The leader flags a follower it has lost, as Redis Cluster flags a node it cannot reach:
/// `fail` and `disconnected` in `CLUSTER NODES`, `health fail` in `CLUSTER SHARDS`, and left out
/// of `CLUSTER SLOTS`, so a client reading from replicas does not pick it. Back, it is online.
/// The other follower shows the same, from the report its leader answers on the side port
/// (`HEALTH`), which a follower refuses to answer itself.
#[test]
fn every_node_shows_a_follower_the_leader_lost_as_failed_until_it_is_back() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let lost = (leader + 1) % 3;
    let witness = (leader + 2) % 3;
    let lost_id = cluster.nodes[lost].node_id();
    let name = format!("{lost_id:040x}");
    let line_of_lost = |cluster: &Cluster, on: usize| {
        let nodes: String = cluster.nodes[on].cmd(&["CLUSTER", "NODES"]).unwrap();
        nodes.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("no line for {name}: {nodes}")).to_string()
    };
    let health_of_lost = |cluster: &Cluster, on: usize| {
        let nodes = shard_nodes(&cluster.nodes[on].cmd(&["CLUSTER", "SHARDS"]).unwrap());
        nodes.iter().find(|n| n["id"] == name).expect("the lost node in SHARDS")["health"].clone()
    };
    let replicas_in_slots = |cluster: &Cluster, on: usize| {
        let slots: redis::Value = cluster.nodes[on].cmd(&["CLUSTER", "SLOTS"]).unwrap();
        let redis::Value::Bulk(ranges) = &slots else { panic!("{slots:?}") };
        let redis::Value::Bulk(range) = &ranges[0] else { panic!("{slots:?}") };
        range[3..].iter().map(|n| redis::from_redis_value::<Vec<redis::Value>>(n).unwrap()[2].clone()).collect::<Vec<_>>()
    };
    let health_report = |cluster: &Cluster, on: usize| {
        let mut side = RespConn::connect(cluster.nodes[on].port + 10000).unwrap();
        side.call(&[b"HEALTH"]).unwrap()
    };
    for on in [leader, witness] {
        assert!(line_of_lost(&cluster, on).ends_with(" connected"), "{}", line_of_lost(&cluster, on));
        assert_eq!(health_of_lost(&cluster, on), "online");
        assert_eq!(replicas_in_slots(&cluster, on).len(), 2);
    }
    let report = health_report(&cluster, leader).text().expect("the leader's report");
    let leader_id = cluster.nodes[leader].node_id();
    assert!(report.starts_with(&format!("leader {leader_id}\nterm ")), "{report}");
    assert!(report.contains(&format!("\n{lost_id} online\n")), "{report}");
    let refused = health_report(&cluster, witness);
    assert!(refused.is_error() && refused.text().unwrap().contains("not the leader"), "{refused:?}");

    cluster.nodes[lost].kill9();
    for on in [leader, witness] {
        let line = wait_for("the lost follower to be flagged", Duration::from_secs(20), || {
            Some(line_of_lost(&cluster, on)).filter(|l| l.contains(" slave,fail "))
        });
        assert!(line.ends_with(" disconnected"), "{line}");
        assert_eq!(health_of_lost(&cluster, on), "fail");
        let replicas = replicas_in_slots(&cluster, on);
        assert_eq!(replicas.len(), 1, "only the live replica: {replicas:?}");
        assert_ne!(replicas[0], redis::Value::Data(name.clone().into_bytes()));
    }
    assert!(health_report(&cluster, leader).text().unwrap().contains(&format!("\n{lost_id} fail\n")));
    // RAFT.INFO says the same on both, and how old the witness' report is.
    let id = format!("id={lost_id},");
    for on in [leader, witness] {
        let info: String = cluster.nodes[on].cmd(&["RAFT.INFO"]).unwrap();
        let peer = info.lines().find(|l| l.starts_with("peer") && l.contains(&id)).unwrap_or_else(|| panic!("{info}"));
        assert!(peer.contains(",health=fail"), "{peer}");
    }
    let age = raftis_integration::info_text(&cluster.nodes[witness], "leader_report_age_ms");
    assert!(age.parse::<i64>().is_ok_and(|ms| (0..2000).contains(&ms)), "a report {age} ms old");
    // The witness never flags itself, nor the leader it hears from.
    let nodes: String = cluster.nodes[witness].cmd(&["CLUSTER", "NODES"]).unwrap();
    assert_eq!(nodes.matches(",fail ").count(), 1, "{nodes}");
    let info: String = cluster.nodes[leader].cmd(&["RAFT.INFO"]).unwrap();
    let peer = info.lines().find(|l| l.starts_with("peer") && l.contains(&id)).unwrap_or_else(|| panic!("{info}"));
    let heard = peer.split(',').find_map(|f| f.strip_prefix("last_heard_ms=")).unwrap_or_else(|| panic!("{peer}"));
    let heard: u64 = heard.parse().unwrap();
    assert!(heard >= 2000, "{peer}");
    // Writes go on with the two that are left; the map still has one master.
    let _: () = cluster.nodes[leader].cmd(&["SET", "k", "v"]).unwrap();
    let info: String = cluster.nodes[leader].cmd(&["CLUSTER", "INFO"]).unwrap();
    assert!(info.contains("cluster_state:ok\r\n"), "{info}");

    cluster.nodes[lost].restart().unwrap();
    for on in [leader, witness] {
        wait_for("the follower to be online again", Duration::from_secs(20), || {
            (health_of_lost(&cluster, on) == "online" && line_of_lost(&cluster, on).ends_with(" connected")).then_some(())
        });
        assert_eq!(replicas_in_slots(&cluster, on).len(), 2);
    }
}

/// A follower's `-MOVED` names the hash slot of the command's key, as Redis Cluster computes it
/// (a cluster-enabled redis-server is the reference), whatever finds the key: a fixed position
/// (writes, reads, blocking commands), WATCH's own arguments, or Redis from the arguments (EVAL).
/// `CLUSTER KEYSLOT` answers the same slot.
#[test]
fn moved_names_the_slot_of_the_commands_key() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    let dir = tempfile::tempdir().unwrap();
    let nodes_conf = dir.path().join("nodes.conf");
    let redis_args = ["--cluster-enabled", "yes", "--cluster-config-file", nodes_conf.to_str().unwrap()];
    let reference = Server::start_plain_with_redis_args(free_port_pair(), dir.path(), &redis_args).unwrap();
    let mut reference_conn = RespConn::connect(reference.port).unwrap();

    let mut keys: Vec<Vec<u8>> = ["foo", "", "{user1000}.following", "a{}{b}", "x{{y}}z", "{a}{b}", "{unclosed", "}{"]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    keys.push(vec![0xff, 0x00, b'{', 0x80, b'}']);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..40 {
        let len = rng.gen_range(1..12);
        keys.push((0..len).map(|_| *[b'{', b'}', b'a', b'b', 0x00, 0xfe].choose(&mut rng).unwrap()).collect());
    }

    let mut conn = RespConn::connect(follower.port).unwrap();
    let leader_addr = cluster.nodes[leader].addr();
    for key in &keys {
        let slot = reference_conn.call(&[b"CLUSTER", b"KEYSLOT", key]).unwrap().integer().expect("the reference's slot");
        let ours = conn.call(&[b"CLUSTER", b"KEYSLOT", key]).unwrap();
        assert_eq!(ours.integer(), Some(slot), "CLUSTER KEYSLOT {key:?}: {ours:?}");
        let commands: [&[&[u8]]; 6] = [
            &[b"SET", key, b"v"],
            &[b"GET", key],
            &[b"BLPOP", key, b"0"],
            &[b"XREAD", b"BLOCK", b"0", b"STREAMS", key, b"$"],
            &[b"WATCH", key],
            &[b"EVAL", b"return 1", b"1", key],
        ];
        for command in commands {
            let moved = conn.call(command).unwrap();
            assert_eq!(moved.text(), Some(format!("MOVED {slot} {leader_addr}")), "{command:?}");
        }
    }
    // A command without keys names slot 0, as any would do.
    let moved = conn.call(&[b"EVAL", b"return 1", b"0"]).unwrap();
    assert_eq!(moved.text(), Some(format!("MOVED 0 {leader_addr}")));
}

/// redis-py's cluster client, as Debian ships it (4.3), on the same path as the Rust client
/// above. That version also reads `cluster_enabled` in `INFO` first and refuses a server that
/// says 0; an `INFO` that shows the Cluster section says 1 here, the other sections are Redis'
/// own.
#[test]
fn redis_py_writes_through_the_leader_and_finds_the_next_one() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    for sections in [&["INFO"][..], &["INFO", "cluster"], &["INFO", "server", "CLUSTER"], &["INFO", "everything"]] {
        let info: String = follower.cmd(sections).unwrap();
        assert!(info.contains("# Cluster\r\ncluster_enabled:1\r\n"), "{sections:?}: {info}");
    }
    let memory: String = follower.cmd(&["INFO", "memory"]).unwrap();
    assert!(memory.contains("used_memory:") && !memory.contains("cluster_enabled"), "{memory}");
    // RESP3 clients get INFO's text as Redis sends it: a verbatim string.
    let mut resp3 = RespConn::connect(follower.port).unwrap();
    resp3.call(&[b"HELLO", b"3"]).unwrap();
    let info = resp3.call(&[b"INFO", b"cluster"]).unwrap();
    assert_eq!(info, Reply::Blob(b'=', b"txt:# Cluster\r\ncluster_enabled:1\r\n".to_vec()));

    let dir = tempfile::tempdir().unwrap();
    let mut client = RedisPy::start(follower.port, dir.path());
    assert_eq!(client.ask("primaries"), cluster.nodes[leader].port.to_string());
    assert_eq!(client.ask("set 0 200"), "ok");
    let on_leader: Vec<String> = cluster.nodes[leader].cmd(&["KEYS", "key:*"]).unwrap();
    assert_eq!(on_leader.len(), 200);

    let new_leader = hand_over_by_pausing(&cluster, leader);
    // The old leader answers -MOVED; the client moves the slots it names, then reads the map anew.
    assert_eq!(client.ask("set 200 400"), "ok");
    let on_new_leader: Vec<String> = cluster.nodes[new_leader].cmd(&["KEYS", "key:*"]).unwrap();
    assert_eq!(on_new_leader.len(), 400);
    assert_eq!(client.ask("get key:399"), "399");
    assert_eq!(client.ask("primaries"), cluster.nodes[new_leader].port.to_string());
    // Reading from replicas: the followers send its reads to the leader (see the test below).
    assert_eq!(client.ask("replica-get 0 400"), "ok");
    let readonly: u64 = (0..3).filter(|i| *i != new_leader).map(|i| stat_field(&cluster.nodes[i], "readonly_clients")).sum();
    assert!(readonly >= 1, "the client sent READONLY to a follower");
}

/// A connection that sent `READONLY` to a follower, as cluster-mode clients do before they read
/// from replicas, has its reads served through the leader, linearizable as the node's
/// consistency says, blocking ones included; its writes still get `-MOVED`. `READWRITE` ends it,
/// and so does hanging up.
#[test]
fn a_readonly_connection_reads_through_a_follower() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    let mut writer = RespConn::connect(cluster.nodes[leader].port).unwrap();
    let mut conn = RespConn::connect(follower.port).unwrap();
    let moved = format!("MOVED {} {}", redis::cluster_routing::get_slot(b"k"), cluster.nodes[leader].addr());
    assert_eq!(conn.call(&[b"GET", b"k"]).unwrap().text(), Some(moved.clone()));
    assert_eq!(conn.call(&[b"READONLY"]).unwrap().text().as_deref(), Some("OK"));
    assert_eq!(stat_field(follower, "readonly_clients"), 1);
    for i in 0..20 {
        let value = i.to_string();
        assert_eq!(writer.call(&[b"SET", b"k", value.as_bytes()]).unwrap().text().as_deref(), Some("OK"));
        // Right after the write was acknowledged, the follower's reply has it.
        assert_eq!(conn.call(&[b"GET", b"k"]).unwrap().text(), Some(value));
    }
    assert_eq!(conn.call(&[b"SET", b"k", b"x"]).unwrap().text(), Some(moved.clone()));
    // A blocking read waits at the leader.
    conn.send(&[args(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"])]).unwrap();
    wait_for("the read to wait at the leader", Duration::from_secs(10), || {
        (stat_field(&cluster.nodes[leader], "blocked_pops_waiting") == 1).then_some(())
    });
    writer.call(&[b"XADD", b"s", b"1-1", b"f", b"v"]).unwrap();
    let read = format!("{:?}", conn.reply().unwrap());
    assert!(read.contains("1-1"), "{read}");

    assert_eq!(conn.call(&[b"READWRITE"]).unwrap().text().as_deref(), Some("OK"));
    assert_eq!(conn.call(&[b"GET", b"k"]).unwrap().text(), Some(moved));
    assert_eq!(stat_field(follower, "readonly_clients"), 0);
    conn.call(&[b"READONLY"]).unwrap();
    assert_eq!(stat_field(follower, "readonly_clients"), 1);
    drop(conn);
    wait_for("the closed connection to be forgotten", Duration::from_secs(10), || {
        (stat_field(follower, "readonly_clients") == 0).then_some(())
    });
}

/// `integration/clients/redis_py_cluster.py`, run by Debian's Python, which has Debian's redis-py
/// (`scripts/setup` installs it).
struct RedisPy {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    stderr_file: std::path::PathBuf,
}

impl RedisPy {
    fn start(port: u16, dir: &std::path::Path) -> RedisPy {
        let stderr_file = dir.join("redis-py.stderr");
        let script = raftis_integration::workspace().join("integration/clients/redis_py_cluster.py");
        let mut child = std::process::Command::new("/usr/bin/python3")
            .arg(script)
            .arg(port.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .expect("/usr/bin/python3 (scripts/setup installs python3-redis)");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut client = RedisPy { child, stdout, stderr_file };
        assert_eq!(client.line(), "ready");
        client
    }

    fn ask(&mut self, request: &str) -> String {
        use std::io::Write as _;
        writeln!(self.child.stdin.as_mut().unwrap(), "{request}").unwrap();
        self.line()
    }

    fn line(&mut self) -> String {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let line = line.trim_end().to_string();
        let stderr = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
        assert!(!line.is_empty() && !line.starts_with("error"), "redis-py: {line:?}; its stderr:\n{stderr}");
        line
    }
}

impl Drop for RedisPy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes on IPv6: each advertises its bracketed address, a join follows a follower's `-MOVED` to
/// the leader, and `-MOVED` names the leader as Redis does (`::1:7001`, no brackets).
#[test]
fn nodes_on_ipv6_join_and_redirect_as_redis_does() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let nodes: Vec<Server> =
        (0..3).map(|i| Server::start_bound(free_port_pair(), &root.path().join(i.to_string()), "::1 127.0.0.1", &[]).unwrap()).collect();
    assert_eq!(nodes[0].cmd::<String>(&["RAFT.CLUSTER", "INIT"]).unwrap(), "OK");
    wait_for("a leader", Duration::from_secs(10), || (nodes[0].cmd::<String>(&["RAFT.STATE"]).ok()? == "leader").then_some(()));
    let first = format!("[::1]:{}", nodes[0].port);
    assert_eq!(nodes[1].cmd::<String>(&["RAFT.CLUSTER", "JOIN", &first]).unwrap(), "OK");
    // Sent to the follower, the join is redirected to the leader.
    let second = format!("[::1]:{}", nodes[1].port);
    assert_eq!(nodes[2].cmd::<String>(&["RAFT.CLUSTER", "JOIN", &second]).unwrap(), "OK");
    let moved = nodes[2].cmd::<String>(&["SET", "k", "v"]).unwrap_err();
    assert_eq!(moved.redirect_node().map(|(addr, _)| addr.to_string()), Some(format!("::1:{}", nodes[0].port)), "{moved}");
    let (_, leader): (u64, String) = nodes[2].cmd(&["RAFT.LEADER"]).unwrap();
    assert_eq!(leader, first);
}
