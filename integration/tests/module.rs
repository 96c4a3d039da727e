//! End to end: clusters of real redis-server processes with libraftis.so loaded.

use raftis_integration::own_writes;
use raftis_integration::resp_conn::{self, args, call, Reply, RespConn};
use raftis_integration::{
    client_proposals, digest, info_field, info_field_of_live, info_text, raw_exchange, stat_field, wait_for, Cluster, Server,
};
use redis::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A deterministic mix of writes over every basic type, with argument counts on both sides of
/// how the module hands arguments to Redis (one by one up to six, as a vector beyond).
fn mixed_writes(n: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = i % 37;
        let cmd: Vec<String> = match i % 10 {
            0 => vec!["SET".into(), format!("s{k}"), format!("v{i}")],
            1 => vec!["INCR".into(), format!("c{}", k % 5)],
            2 => vec!["HSET".into(), format!("h{}", k % 7), format!("f{i}"), format!("{i}")],
            3 => vec!["RPUSH".into(), format!("l{}", k % 4), format!("{i}")],
            4 => vec!["SADD".into(), format!("set{}", k % 6), format!("m{}", i % 50)],
            5 => vec!["ZADD".into(), format!("z{}", k % 3), format!("{}", i % 100), format!("m{i}")],
            6 => vec!["LPOP".into(), format!("l{}", k % 4)],
            7 => {
                let m = format!("m{}", k % 5);
                let pairs = [("a", format!("v{i}")), ("b", format!("{i}")), ("c", String::new()), ("d", format!("x{i}"))];
                std::iter::once("MSET".to_string()).chain(pairs.into_iter().flat_map(|(f, v)| [format!("{m}{f}"), v])).collect()
            }
            8 => vec![
                "SADD".into(),
                format!("w{}", k % 3),
                format!("a{i}"),
                format!("b{i}"),
                format!("c{i}"),
                format!("d{i}"),
                format!("e{i}"),
            ],
            _ => vec!["EXPIRE".into(), format!("s{k}"), "1000".into()],
        };
        out.push(cmd);
    }
    out
}

fn run(conn: &mut redis::Connection, args: &[String]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(&args[0]);
    for a in &args[1..] {
        cmd.arg(a);
    }
    cmd.query(conn)
}

#[test]
fn a_thousand_mixed_writes_leave_every_node_with_the_same_dataset() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let mut conn = leader.client().unwrap();
    let writes = mixed_writes(1000);
    for cmd in &writes {
        run(&mut conn, cmd).unwrap_or_else(|e| panic!("{cmd:?} failed: {e}"));
    }
    let digest = cluster.assert_same_dataset(&[0, 1, 2]);
    assert_ne!(digest, "0000000000000000000000000000000000000000", "dataset is not empty");
    // Replies are Redis' own.
    let v: i64 = redis::cmd("INCR").arg("c0").query(&mut conn).unwrap();
    assert!(v > 1);
    let err = redis::cmd("INCR").arg("h0").query::<i64>(&mut conn).unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    // Every argument arrived, in place, on the long commands and the short ones, empty ones too.
    // The last MSET and the last six-argument SADD are the final word on their keys.
    let mset = writes.iter().rev().find(|c| c[0] == "MSET").unwrap();
    let keys: Vec<&String> = mset[1..].iter().step_by(2).collect();
    let expected: Vec<&String> = mset[2..].iter().step_by(2).collect();
    let values: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut conn).unwrap();
    assert_eq!(values.iter().collect::<Vec<_>>(), expected, "MGET {keys:?}");
    let sadd = writes.iter().rev().find(|c| c[0] == "SADD" && c.len() == 7).unwrap();
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(&sadd[1]).query(&mut conn).unwrap();
    for m in &sadd[2..] {
        assert!(members.contains(m), "{m} missing from {members:?}");
    }
}

#[test]
fn followers_redirect_writes_to_the_leader_client_port() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    for (i, node) in cluster.nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
        let err = node.cmd::<String>(&["SET", "k", "v"]).unwrap_err();
        assert_eq!(err.code(), Some("MOVED"), "node {i}: {err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{}", cluster.nodes[leader].port)),
            "node {i} should name the leader's client port: {err}"
        );
        // RAFT.LEADER agrees.
        let l: (i64, String) = node.cmd(&["RAFT.LEADER"]).unwrap();
        assert_eq!(l.1, cluster.nodes[leader].addr());
    }
}

#[test]
fn killing_the_leader_elects_a_new_one_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let old = cluster.wait_leader();
    let mut acked = Vec::new();
    {
        let mut conn = cluster.nodes[old].client().unwrap();
        for i in 0..200 {
            let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut conn).unwrap();
            acked.push(i);
        }
    }
    cluster.nodes[old].kill9();
    let new =
        wait_for("a new leader", Duration::from_secs(10), || (0..3).filter(|i| *i != old).find(|i| cluster.nodes[*i].state() == "leader"));
    let mut conn = cluster.nodes[new].client().unwrap();
    wait_for("the new leader to accept writes", Duration::from_secs(10), || {
        redis::cmd("SET").arg("after").arg("1").query::<()>(&mut conn).ok()
    });
    for i in 200..300 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query(&mut conn).unwrap();
        acked.push(i);
    }
    for i in &acked {
        let v: i64 = redis::cmd("GET").arg(format!("k{i}")).query(&mut conn).unwrap();
        assert_eq!(v, *i);
    }
    // The old leader comes back as a follower and catches up.
    cluster.nodes[old].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn a_leader_that_shuts_down_hands_leadership_over_first() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    // An election now waits 10-20 s for the old leader's silence: a new leader within a few
    // seconds can only come from the hand-over.
    cluster.config_set("tick-ms", "1000");
    let old = cluster.wait_leader();
    let _: () = cluster.nodes[old].cmd(&["SET", "before", "1"]).unwrap();
    let _ = cluster.nodes[old].cmd::<Value>(&["SHUTDOWN", "NOSAVE"]);
    wait_for("the old leader to exit", Duration::from_secs(10), || (!cluster.nodes[old].is_running()).then_some(()));
    let new =
        wait_for("a new leader", Duration::from_secs(5), || (0..3).filter(|i| *i != old).find(|i| cluster.nodes[*i].state() == "leader"));
    let taken: Option<String> = wait_for("the new leader to serve", Duration::from_secs(5), || {
        let _: () = cluster.nodes[new].cmd(&["SET", "after", "1"]).ok()?;
        cluster.nodes[new].cmd(&["GET", "before"]).ok()
    });
    assert_eq!(taken.as_deref(), Some("1"));
    let log = cluster.nodes[old].log_tail();
    assert!(log.contains("handed leadership to node"), "{log}");
}

/// `SAVE` (and `SHUTDOWN SAVE`, which saves before the shutdown event) holds Redis' main thread
/// for the whole save. A leader hands leadership over first: the others go on taking writes
/// meanwhile, instead of waiting for the save.
#[test]
fn a_leader_asked_to_save_on_its_main_thread_hands_leadership_over_first() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let old = cluster.wait_leader();
    let _: () = cluster.nodes[old].cmd(&["SET", "before", "1"]).unwrap();
    // A save of five seconds: 1 ms for each of its keys.
    let mut conn = cluster.nodes[old].client().unwrap();
    let mut pipe = redis::pipe();
    for i in 0..5_000 {
        pipe.cmd("SET").arg(format!("k{i}")).arg(i).ignore();
    }
    let () = pipe.query(&mut conn).unwrap();
    let _: () = cluster.nodes[old].cmd(&["CONFIG", "SET", "rdb-key-save-delay", "1000"]).unwrap();
    let port = cluster.nodes[old].port;
    let saving = std::thread::spawn(move || {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap();
        redis::cmd("SAVE").query::<String>(&mut conn)
    });
    let new =
        wait_for("a new leader", Duration::from_secs(10), || (0..3).filter(|i| *i != old).find(|i| cluster.nodes[*i].state() == "leader"));
    wait_for("the new leader to serve", Duration::from_secs(10), || cluster.nodes[new].cmd::<()>(&["SET", "during", "1"]).ok());
    assert!(!saving.is_finished(), "the save ended before the others took a write: nothing tested");
    assert_eq!(saving.join().unwrap().unwrap(), "OK");
    let log = cluster.nodes[old].log_tail();
    assert!(log.contains("before saving the dump file"), "{log}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn raft_transferleader_hands_leadership_to_a_voter_and_refuses_one_that_is_down() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let old = cluster.wait_leader();
    let _: () = cluster.nodes[old].cmd(&["SET", "before", "1"]).unwrap();
    fn transfer(cluster: &Cluster, from: usize, target: &str) -> redis::RedisResult<String> {
        cluster.nodes[from].cmd(&["RAFT.TRANSFERLEADER", target])
    }

    // Inside MULTI it is refused (Redis cannot block a client in EXEC), and nothing moves.
    let mut conn = cluster.nodes[old].client().unwrap();
    let _: () = redis::cmd("MULTI").query(&mut conn).unwrap();
    let _: () = redis::cmd("RAFT.TRANSFERLEADER").query(&mut conn).unwrap();
    let exec = format!("{:?}", redis::cmd("EXEC").query::<Value>(&mut conn));
    assert!(exec.contains("RAFT.TRANSFERLEADER cannot run inside MULTI"), "{exec}");
    assert_eq!(cluster.nodes[old].state(), "leader");

    // Named by its client address: it leads by the time the command answers, with every write.
    let to = (old + 1) % 3;
    assert_eq!(transfer(&cluster, old, &cluster.nodes[to].addr()).unwrap(), "OK");
    assert_eq!(cluster.nodes[to].state(), "leader");
    let _: () = cluster.nodes[to].cmd(&["SET", "after", "1"]).unwrap();
    assert_eq!(cluster.nodes[to].cmd::<String>(&["GET", "before"]).unwrap(), "1");
    // A follower redirects the command to the leader, as it does writes.
    let err = cluster.nodes[old].cmd::<String>(&["RAFT.TRANSFERLEADER"]).unwrap_err();
    assert!(err.to_string().contains(&cluster.nodes[to].addr()), "{err}");
    // Named by node id, back to the old leader; without an argument, to another voter.
    assert_eq!(transfer(&cluster, to, &cluster.nodes[old].node_id().to_string()).unwrap(), "OK");
    assert_eq!(cluster.nodes[old].state(), "leader");
    assert_eq!(cluster.nodes[old].cmd::<String>(&["RAFT.TRANSFERLEADER"]).unwrap(), "OK");
    let leader = cluster.wait_leader();
    assert_ne!(leader, old);
    // Naming the leader itself changes nothing; naming a stranger is an error.
    assert_eq!(transfer(&cluster, leader, &cluster.nodes[leader].node_id().to_string()).unwrap(), "OK");
    assert_eq!(cluster.nodes[leader].state(), "leader");
    let err = transfer(&cluster, leader, "12345").unwrap_err();
    assert!(err.to_string().contains("node 12345 is not a member"), "{err}");

    // A voter that is down is refused at once (raft would refuse writes while it waited for it),
    // once the leader has missed it for a heartbeat interval and half an election timeout.
    let down = (leader + 1) % 3;
    let down_id = cluster.nodes[down].node_id().to_string();
    cluster.nodes[down].kill9();
    let err = wait_for("the leader to miss the killed node", Duration::from_secs(20), || match transfer(&cluster, leader, &down_id) {
        Ok(ok) => panic!("a transfer to a killed node answered {ok}"),
        Err(e) => e.to_string().contains("has not answered").then_some(e),
    });
    assert!(err.to_string().contains("is it up?"), "{err}");
    assert_eq!(cluster.nodes[leader].state(), "leader");
    // Without an argument, leadership goes to the voter that is up, and comes back by id.
    let up = (leader + 2) % 3;
    assert_eq!(cluster.nodes[leader].cmd::<String>(&["RAFT.TRANSFERLEADER"]).unwrap(), "OK");
    assert_eq!(cluster.nodes[up].state(), "leader");
    assert_eq!(transfer(&cluster, up, &cluster.nodes[leader].node_id().to_string()).unwrap(), "OK");
    let _: () = cluster.nodes[leader].cmd(&["SET", "while-down", "1"]).unwrap();
    cluster.nodes[down].restart().unwrap();
    cluster.wait_converged(&[0, 1, 2]);

    // One paused just before the transfer (too recently for the leader to miss it) does not
    // answer, so the leader never asks it to take over: the command gives up after an election
    // timeout and says who still leads.
    let paused = (leader + 2) % 3;
    let paused_id = cluster.nodes[paused].node_id().to_string();
    let term = info_field_of_live(&cluster.nodes[leader], "term");
    cluster.nodes[paused].pause();
    let err = transfer(&cluster, leader, &paused_id).unwrap_err();
    cluster.nodes[paused].resume();
    assert!(err.to_string().contains("did not take over") && err.to_string().contains("still leads"), "{err}");
    // Nor does it take over when it resumes: no stale request waited in its socket. Once it has
    // applied a write made after it resumed, it has read everything sent while it was paused.
    let _: () = cluster.nodes[leader].cmd(&["SET", "after-pause", "1"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    assert_eq!((cluster.nodes[leader].state(), info_field(&cluster.nodes[leader], "term")), ("leader".to_string(), term));
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn restarting_every_node_keeps_every_acknowledged_write() {
    // consistency=low lets the test read each node's own dataset.
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    {
        let mut conn = cluster.leader().client().unwrap();
        for i in 0..300 {
            let _: () = redis::cmd("RPUSH").arg("log").arg(i).query(&mut conn).unwrap();
        }
        let _: () = redis::cmd("SELECT").arg(2).query(&mut conn).unwrap();
        let _: () = redis::cmd("SET").arg("in-db-2").arg("yes").query(&mut conn).unwrap();
    }
    for n in cluster.nodes.iter_mut() {
        n.kill9();
    }
    for n in cluster.nodes.iter_mut() {
        n.restart().unwrap();
    }
    let leader = cluster.wait_leader();
    cluster.wait_converged(&[0, 1, 2]);
    for node in &cluster.nodes {
        let len: i64 = node.cmd(&["LLEN", "log"]).unwrap();
        assert_eq!(len, 300, "node {} lost writes", node.port);
    }
    let mut conn = cluster.nodes[leader].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(2).query(&mut conn).unwrap();
    let v: String = redis::cmd("GET").arg("in-db-2").query(&mut conn).unwrap();
    assert_eq!(v, "yes");
    let items: Vec<i64> = redis::cmd("LRANGE").arg("log").arg(0).arg(-1).query(&mut cluster.nodes[leader].client().unwrap()).unwrap();
    assert_eq!(items, (0..300).collect::<Vec<i64>>(), "order preserved");
}

/// At consistency low a node serves its own dataset from the moment it starts. A restarted node
/// must start from what it knew was committed, not from nothing until a leader speaks: the commit
/// index, which is written lazily, must be on disk after a clean shutdown and, once the cluster
/// has been quiet for a tick or two, before a kill -9. The other nodes are paused meanwhile, so
/// no leader can tell the restarted one anything.
#[test]
fn a_restarted_node_serves_what_it_knew_committed_before_it_hears_from_a_leader() {
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let paused: Vec<usize> = (0..3).filter(|i| *i != follower).collect();
    for (round, clean) in [true, false].into_iter().enumerate() {
        let leader = cluster.wait_leader();
        let value = format!("value-{round}");
        let _: () = cluster.nodes[leader].cmd(&["SET", "k", &value]).unwrap();
        wait_for("the follower to apply the write", Duration::from_secs(10), || {
            (cluster.nodes[follower].cmd::<Option<String>>(&["GET", "k"]).ok()?? == value).then_some(())
        });
        if clean {
            let _ = cluster.nodes[follower].cmd::<Value>(&["SHUTDOWN", "NOSAVE"]);
            wait_for("the follower to exit", Duration::from_secs(15), || (!cluster.nodes[follower].is_running()).then_some(()));
        } else {
            // The bound the README gives is a tick (100 ms) after the commit interval (100 ms).
            let written = info_field_of_live(&cluster.nodes[follower], "commit_index");
            wait_for("the follower to write its commit index", Duration::from_secs(10), || {
                (info_field_of_live(&cluster.nodes[follower], "commit_index_stored") >= written).then_some(())
            });
            cluster.nodes[follower].kill9();
        }
        for i in &paused {
            cluster.nodes[*i].pause();
        }
        cluster.nodes[follower].restart().unwrap();
        // Its very first read: one served before the node has replayed its log that far would
        // show the key missing, or older.
        let served: Option<String> = cluster.nodes[follower].cmd(&["GET", "k"]).unwrap();
        assert_eq!(served.as_deref(), Some(value.as_str()), "round {round}");
        for i in &paused {
            cluster.nodes[*i].resume();
        }
    }
}

#[test]
fn a_second_server_given_a_running_nodes_dir_refuses_to_start() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let _: () = cluster.nodes[0].cmd(&["SET", "k", "v"]).unwrap();
    let dir = cluster.nodes[0].dir.clone();
    let err = Server::start(raftis_integration::free_port_pair(), &dir, &[]).err().expect("the second server is refused").to_string();
    assert!(err.contains("is in use by another running node (pid"), "{err}");
    assert_eq!(cluster.nodes[0].cmd::<String>(&["GET", "k"]).unwrap(), "v", "the first one runs on");
    // The lock dies with its process, kill -9 included.
    cluster.nodes[0].kill9();
    let second = Server::start(raftis_integration::free_port_pair(), &dir, &[]).unwrap();
    wait_for("the node to lead again", Duration::from_secs(10), || (second.state() == "leader").then_some(()));
    assert_eq!(second.cmd::<String>(&["GET", "k"]).unwrap(), "v");
}

/// A `MODULE LOAD` that fails late, after the module hooked into Redis and began to start its
/// node (here the side port is taken as the node restarts from its log), leaves the server and
/// its data as they were without the module. Redis drops a failed module's commands but keeps its
/// command filters, which went on rewriting every client command into a `RAFT._*` command that no
/// longer existed; the module had switched Redis' background expiry off; and the node's start had
/// queued the dataset's rebuild from the log (a FLUSHALL first), which then ran. A load that fails
/// early (a mistyped argument) may be tried again; after a late failure, loading the module again
/// in that process is refused, saying why.
#[test]
fn a_module_load_that_fails_late_leaves_redis_as_it_was() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let _: () = cluster.nodes[0].cmd(&["SET", "k", "v"]).unwrap();
    let raft_dir = format!("dir={}", cluster.nodes[0].dir.join("raft").display());
    cluster.nodes[0].kill9();
    let port = raftis_integration::free_port_pair();
    let plain = Server::start_plain(port, &cluster.root.path().join("plain")).unwrap();
    let side_port = std::net::TcpListener::bind(("127.0.0.1", port + 10000)).unwrap();
    let module = raftis_integration::module_path().display().to_string();
    let mut conn = RespConn::connect(port).unwrap();
    assert_eq!(call(&mut conn, &["SET", "before", "1"]).text().as_deref(), Some("OK"));
    let mistyped = call(&mut conn, &["MODULE", "LOAD", &module, &raft_dir, "no-such-setting=1"]);
    assert!(mistyped.is_error(), "{mistyped:?}");
    let loaded = call(&mut conn, &["MODULE", "LOAD", &module, &raft_dir]);
    assert!(loaded.is_error(), "{loaded:?}");
    wait_for("the reason in the log", Duration::from_secs(5), || plain.log_tail().contains("Address already in use").then_some(()));
    assert_eq!(call(&mut conn, &["SET", "a", "1"]).text().as_deref(), Some("OK"));
    assert_eq!(call(&mut conn, &["GET", "a"]).text().as_deref(), Some("1"));
    assert_eq!(call(&mut conn, &["GET", "before"]).text().as_deref(), Some("1"), "the data from before the load");
    // Expired without being read: Redis' background expiry runs.
    assert_eq!(call(&mut conn, &["SET", "short", "1", "PX", "50"]).text().as_deref(), Some("OK"));
    wait_for("background expiry", Duration::from_secs(10), || (call(&mut conn, &["DBSIZE"]).integer() == Some(2)).then_some(()));
    drop(side_port);
    let again = call(&mut conn, &["MODULE", "LOAD", &module, &raft_dir]);
    assert!(again.is_error(), "{again:?}");
    wait_for("the reason in the log", Duration::from_secs(5), || {
        plain.log_tail().contains("an earlier load in this process failed").then_some(())
    });
    assert_eq!(call(&mut conn, &["GET", "before"]).text().as_deref(), Some("1"));
}

/// Module arguments are not read lossily: two passwords (or dirs) that differ only in bytes that
/// are not UTF-8 would be the same one. Such an argument is refused early, so a corrected load
/// in the same process works.
#[test]
fn a_module_argument_that_is_not_utf8_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let port = raftis_integration::free_port_pair();
    let plain = Server::start_plain(port, &root.path().join("plain")).unwrap();
    let module = raftis_integration::module_path().display().to_string();
    let raft_dir = format!("dir={}", root.path().join("raft").display());
    let mut conn = RespConn::connect(port).unwrap();
    let refused = conn.call(&[b"MODULE", b"LOAD", module.as_bytes(), raft_dir.as_bytes(), b"raft-password=\xff\xfe"]).unwrap();
    assert!(refused.is_error(), "{refused:?}");
    wait_for("the reason in the log", Duration::from_secs(5), || plain.log_tail().contains("argument 2 is not valid UTF-8").then_some(()));
    let loaded = call(&mut conn, &["MODULE", "LOAD", &module, &raft_dir, "raft-password=secret"]);
    assert_eq!(loaded.text().as_deref(), Some("OK"), "{loaded:?}");
}

/// Nodes whose settings differ never talk (see the next test); a single node is its own majority
/// and replays its own log at start, which is how one with fewer databases meets an entry it
/// cannot run as it ran before.
#[test]
fn a_node_restarted_with_fewer_databases_stops_rather_than_skip_a_write_and_catches_up_once_fixed() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let mut conn = cluster.nodes[0].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(10).query(&mut conn).unwrap();
    let _: () = redis::cmd("SET").arg("x").arg("in-db-10").query(&mut conn).unwrap();
    let _: () = cluster.nodes[0].cmd(&["SET", "in-db-0", "1"]).unwrap();

    // It stops at that entry, rather than go on with a dataset short of it (and snapshot it).
    cluster.nodes[0].redis_args = vec!["--databases".into(), "8".into()];
    cluster.nodes[0].restart().unwrap();
    let node = &cluster.nodes[0];
    wait_for("the node to stop", Duration::from_secs(10), || (node.state() == "stopped").then_some(()));
    let err = node.cmd::<String>(&["GET", "in-db-0"]).unwrap_err().to_string();
    assert!(err.contains("writes to database 10, and this node has 8 (databases 8)"), "{err}");
    assert!(node.cmd::<Value>(&["RAFT.SNAPSHOT"]).unwrap_err().to_string().contains("stopped serving"));

    // Restarted with its former setting, it replays its log whole.
    cluster.nodes[0].redis_args.clear();
    cluster.nodes[0].restart().unwrap();
    let node = &cluster.nodes[0];
    wait_for("the node to lead again", Duration::from_secs(10), || node.cmd::<Option<String>>(&["GET", "in-db-0"]).ok().flatten());
    let mut c = node.client().unwrap();
    let _: () = redis::cmd("SELECT").arg(10).query(&mut c).unwrap();
    assert_eq!(redis::cmd("GET").arg("x").query::<String>(&mut c).unwrap(), "in-db-10");
}

#[test]
fn nodes_whose_redis_settings_differ_are_kept_apart() {
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let odd_args = ["--stream-node-max-entries", "10"];
    let dir = cluster.root.path().join("odd");
    let odd = Server::start_with_redis_args(raftis_integration::free_port_pair(), &dir, &odd_args, &["consistency=low"]).unwrap();
    let err = odd.cmd::<String>(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap_err().to_string();
    assert!(err.contains("refused the join") && err.contains("stream-node-max-entries is 10 there and 100 here"), "{err}");
    let err = cluster.nodes[leader].cmd::<Value>(&["RAFT.ADDPEER", &odd.addr()]).unwrap_err().to_string();
    assert!(err.contains("cannot be added: its Redis settings differ"), "{err}");
    let err = cluster.nodes[leader].cmd::<String>(&["CONFIG", "SET", "stream-node-max-entries", "50"]).unwrap_err().to_string();
    assert!(err.contains("every node must have the same value"), "{err}");

    // A member restarted with another value is cut off from the others (each side refuses the
    // other's HELLO), so it cannot apply the log differently; the others go on.
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let other = (0..3).find(|&i| i != leader && i != follower).unwrap();
    cluster.nodes[follower].redis_args = odd_args.iter().map(|a| a.to_string()).collect();
    cluster.nodes[follower].restart().unwrap();
    wait_for("the restarted node to refuse the leader", Duration::from_secs(20), || {
        cluster.nodes[follower]
            .log_tail()
            .contains("Redis settings differ from this node's: stream-node-max-entries is 100 there and 10 here")
            .then_some(())
    });
    // The leader's RAFT.INFO says why that peer is down.
    wait_for("the leader to show why", Duration::from_secs(10), || {
        let info: String = cluster.nodes[leader].cmd(&["RAFT.INFO"]).unwrap();
        info.lines().any(|l| l.contains("_last_error:") && l.contains("stream-node-max-entries is 100 there and 10 here")).then_some(())
    });
    let _: () = cluster.nodes[leader].cmd(&["SET", "while-apart", "1"]).unwrap();
    wait_for("the other follower to apply it", Duration::from_secs(10), || {
        cluster.nodes[other].cmd::<Option<String>>(&["GET", "while-apart"]).unwrap().map(|_| ())
    });
    assert_eq!(cluster.nodes[follower].cmd::<Option<String>>(&["GET", "while-apart"]).unwrap(), None);
    // With the same settings again, it catches up.
    cluster.nodes[follower].redis_args.clear();
    cluster.nodes[follower].restart().unwrap();
    wait_for("the node to catch up", Duration::from_secs(20), || {
        cluster.nodes[follower].cmd::<Option<String>>(&["GET", "while-apart"]).ok().flatten().map(|_| ())
    });
}

#[test]
fn a_redis_with_renamed_or_disabled_commands_refuses_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("redis.log");
    let status = std::process::Command::new("redis-server")
        .args(["--port", &raftis_integration::free_port_pair().to_string(), "--bind", "127.0.0.1"])
        .arg("--logfile")
        .arg(&log)
        .args(["--rename-command", "FLUSHALL", "MYFLUSH", "--rename-command", "KEYS", ""])
        .arg("--loadmodule")
        .arg(raftis_integration::module_path())
        .arg(format!("dir={}", dir.path().join("raft").display()))
        .status()
        .unwrap();
    assert!(!status.success(), "redis-server must not start with the module refused");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("FLUSHALL, KEYS renamed or disabled here") && log.contains("ACL rules instead"), "{log}");
}

#[test]
fn replies_are_forwarded_byte_for_byte_in_resp2_and_resp3() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let port = cluster.leader().port;
    let resp2 = raw_exchange(port, b"*4\r\n$7\r\nZINCRBY\r\n$1\r\nz\r\n$3\r\n1.5\r\n$1\r\nm\r\n", 9);
    assert_eq!(resp2, b"$3\r\n1.5\r\n");
    // After HELLO 3, ZINCRBY answers a RESP3 double.
    assert_eq!(resp3_exchange(port, b"*4\r\n$7\r\nZINCRBY\r\n$1\r\nz\r\n$1\r\n1\r\n$1\r\nm\r\n", 6), b",2.5\r\n");
}

#[test]
fn relative_expirations_are_made_absolute_by_the_leader() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.leader();
    let _: () = leader.cmd(&["SET", "ttl", "v", "EX", "100"]).unwrap();
    let _: i64 = leader.cmd(&["EXPIRE", "ttl2", "100"]).unwrap();
    let _: () = leader.cmd(&["SETEX", "ttl3", "100", "v"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    let at: Vec<i64> = cluster.nodes.iter().map(|n| n.cmd::<i64>(&["PEXPIRETIME", "ttl"]).unwrap()).collect();
    assert!(at[0] > 0 && at.iter().all(|t| *t == at[0]), "same absolute expiry everywhere: {at:?}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// PFCOUNT rewrites the HyperLogLog's cached cardinality: counted on the leader alone, the
/// leader's bytes would differ from its followers'.
#[test]
fn a_hyperloglog_counted_on_the_leader_has_the_same_bytes_on_every_node() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.leader();
    let _: i64 = leader.cmd(&["PFADD", "h", "a", "b", "c"]).unwrap();
    let count: i64 = leader.cmd(&["PFCOUNT", "h"]).unwrap();
    assert_eq!(count, 3);
    cluster.wait_converged(&[0, 1, 2]);
    let bytes: Vec<Vec<u8>> = cluster.nodes.iter().map(|n| n.cmd::<Vec<u8>>(&["GET", "h"]).unwrap()).collect();
    assert!(bytes.iter().all(|b| *b == bytes[0]), "the HyperLogLog's bytes differ between nodes");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn bad_input_gets_clear_errors_and_never_crashes_the_server() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let expect_err = |args: &[&str], needle: &str| {
        let err = node.cmd::<Value>(args).expect_err(&format!("{args:?} should fail"));
        assert!(err.to_string().contains(needle), "{args:?}: {err}");
    };
    expect_err(&["RAFT.CLUSTER"], "wrong number of arguments for 'raft.cluster' command");
    expect_err(&["RAFT.CLUSTER", "FROB"], "unknown subcommand 'FROB'. Try RAFT.CLUSTER INIT");
    expect_err(&["RAFT.CLUSTER", "JOIN"], "wrong number of arguments for 'raft.cluster|join' command");
    expect_err(&["RAFT.CONFIG"], "wrong number of arguments for 'raft.config' command");
    expect_err(&["RAFT.CONFIG", "FROB"], "unknown subcommand 'FROB'. Try RAFT.CONFIG GET");
    expect_err(&["RAFT.CLUSTER", "INIT"], "already belongs");
    expect_err(&["RAFT.CLUSTER", "INIT", "KEEP"], "syntax error: RAFT.CLUSTER INIT takes KEEPDATA or nothing, not 'KEEP'");
    expect_err(&["RAFT.CLUSTER", "JOIN", "nonsense"], "already belongs");
    expect_err(&["RAFT.ADDPEER"], "wrong number of arguments");
    expect_err(&["RAFT.ADDPEER", "not-an-address"], "invalid address");
    expect_err(&["RAFT.REMOVEPEER", "12345"], "not a member");
    expect_err(&["RAFT.REMOVEPEER", "1"], "only voter");
    expect_err(&["RAFT._JOIN", "x", "y", "z"], "invalid node id");
    expect_err(&["RAFT.HELP", "x"], "wrong number of arguments for 'raft.help' command");
    expect_err(&["RAFT.CLUSTER", "HELP", "x"], "wrong number of arguments for 'raft.cluster|help' command");
    // Help, as Redis' own `CONFIG HELP`: a title, then each command's syntax and what it does.
    let help: Vec<String> = node.cmd(&["RAFT.HELP"]).unwrap();
    for command in ["RAFT.CLUSTER JOIN <host:port>", "RAFT.TRANSFERLEADER", "RAFT.CONFIG SET <name> <value>", "RAFT.HELP"] {
        let at = help.iter().position(|l| l.starts_with(command)).unwrap_or_else(|| panic!("{command} not in {help:?}"));
        assert!(help[at + 1].starts_with("    "), "{command}: {help:?}");
    }
    for command in ["RAFT.CLUSTER", "RAFT.CONFIG"] {
        let lines: Vec<String> = node.cmd(&[command, "help"]).unwrap();
        assert!(lines[0].starts_with(&format!("{command} <subcommand>")), "{lines:?}");
        assert!(lines[1..].iter().step_by(2).all(|l| l.starts_with(&format!("{command} "))), "{lines:?}");
        assert!(lines.len() >= 5, "{lines:?}");
    }
    // Field patterns pick lines, as the README's `RAFT.INFO snapshot_phase` does.
    assert_eq!(node.cmd::<String>(&["RAFT.INFO", "ROLE", "nothing-*"]).unwrap(), "# Raft\r\nrole:leader\r\n");
    let stats = node.cmd::<String>(&["RAFT.STATS", "log_*_index"]).unwrap();
    assert_eq!(
        stats.lines().map(|l| l.split(':').next().unwrap()).collect::<Vec<_>>(),
        ["# Raft stats", "log_first_index", "log_last_index"]
    );
    // The commands that block until done are refused inside MULTI before they start anything.
    let mut conn = raftis_integration::resp_conn::RespConn::connect(node.port).unwrap();
    let in_multi: [(&[&str], &str); 5] = [
        (&["RAFT.SNAPSHOT"], "RAFT.SNAPSHOT"),
        (&["RAFT.ADDPEER", "127.0.0.1:1"], "RAFT.ADDPEER"),
        (&["RAFT.REMOVEPEER", "7"], "RAFT.REMOVEPEER"),
        (&["RAFT.TRANSFERLEADER"], "RAFT.TRANSFERLEADER"),
        (&["RAFT.CLUSTER", "RECOVER"], "RAFT.CLUSTER RECOVER"),
    ];
    let mut pipeline = vec![resp_conn::args(&["MULTI"])];
    pipeline.extend(in_multi.iter().map(|(command, _)| resp_conn::args(command)));
    pipeline.push(resp_conn::args(&["EXEC"]));
    let replies = conn.pipeline(&pipeline).unwrap();
    let exec = replies.last().and_then(|r| r.items()).expect("EXEC answers an array");
    assert_eq!(exec.len(), in_multi.len());
    for ((command, name), reply) in in_multi.iter().zip(exec) {
        let expected = format!("ERR {name} cannot run inside MULTI: it blocks until it is done");
        assert_eq!(reply.text().unwrap_or_default(), expected, "{command:?}");
    }
    assert_eq!(info_field(node, "snapshot_index"), 0, "no snapshot was taken");
    expect_err(&["WATCH"], "wrong number of arguments for 'watch'");
    // Called directly, the internal commands say so rather than misread their arguments.
    expect_err(&["RAFT._WATCH"], "RAFT._WATCH only takes WATCH key [key ...] (it is used internally)");
    expect_err(&["RAFT._WATCH", "k"], "RAFT._WATCH only takes WATCH key [key ...] (it is used internally)");
    expect_err(&["RAFT._WAIT", "100", "0"], "RAFT._WAIT only takes WAIT numreplicas timeout (it is used internally)");
    // RAFT._READ runs its command on this node alone: a write there would bypass the log.
    expect_err(&["RAFT._READ", "SET", "bypass", "local"], "RAFT._READ only takes read commands (it is used internally)");
    expect_err(&["RAFT._READ", "FLUSHALL"], "RAFT._READ only takes read commands");
    expect_err(&["RAFT._READ", "CONFIG", "SET", "maxmemory-policy", "allkeys-lru"], "RAFT._READ only takes read commands");
    expect_err(&["RAFT._READ", "REPLICAOF", "127.0.0.1", "1"], "Redis replication is refused");
    expect_err(&["RAFT._CMD", "GET", "bypass"], "RAFT._CMD only takes write commands");
    assert_eq!(node.cmd::<Option<String>>(&["GET", "bypass"]).unwrap(), None);
    let _: () = node.cmd(&["SET", "bypass", "logged"]).unwrap();
    assert_eq!(node.cmd::<String>(&["RAFT._READ", "GET", "bypass"]).unwrap(), "logged", "a read through it still runs");
    expect_err(&["FCALL", "f", "0"], "Function not found");
    expect_err(&["FUNCTION", "LOAD", "not lua"], "Missing library metadata");
    expect_err(&["FUNCTION", "RESTORE", "junk"], "payload version or checksum are wrong");
    expect_err(&["FUNCTION", "KILL"], "No scripts in execution");
    expect_err(&["RAFT._SCRIPTKILL", "FUNCTION", "KILL"], "No scripts in execution");
    expect_err(&["XREAD", "BLOCK", "x", "STREAMS", "s", "$"], "timeout is not an integer");
    expect_err(&["XREAD", "BLOCK", "0", "STREAMS", "s"], "Unbalanced XREAD");
    expect_err(&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"], "NOGROUP");
    expect_err(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"], "NOGROUP");
    expect_err(&["XAUTOCLAIM", "s", "g", "c", "x", "0"], "Invalid min-idle-time");
    expect_err(&["RAFT._BLOCK"], "only takes blocking commands");
    expect_err(&["RAFT._BLOCK", "GET", "k"], "only takes blocking commands");
    expect_err(&["RAFT._BLOCK", "BLPOP", "l"], "only takes blocking commands");
    expect_err(&["RAFT._BLOCK", "XREAD", "STREAMS", "s", "0"], "only takes blocking commands");
    expect_err(&["RAFT._BLOCK", "XREAD", "BLOCK", "0", "STREAMS"], "syntax error");
    expect_err(&["RAFT._BLOCK", "BLPOP", "l", "x"], "timeout is not a float");
    expect_err(&["SET", "onlykey"], "wrong number of arguments for 'set'");
    expect_err(&["MODULE", "UNLOAD", "raft"], "");
    // DEBUG that would change this node's dataset alone (the harness enables DEBUG).
    let keys: i64 = node.cmd(&["DBSIZE"]).unwrap();
    expect_err(&["DEBUG", "POPULATE", "100"], "DEBUG POPULATE is refused by Raftis");
    expect_err(&["DEBUG", "SET-ACTIVE-EXPIRE", "1"], "DEBUG SET-ACTIVE-EXPIRE is refused by Raftis");
    assert_eq!(node.cmd::<i64>(&["DBSIZE"]).unwrap(), keys);
    assert!(node.cmd::<String>(&["DEBUG", "DIGEST"]).is_ok());

    // An uninitialized node joining a dead address answers an error instead of hanging.
    let lonely = Server::start(raftis_integration::free_port_pair(), &cluster.root.path().join("lonely"), &[]).unwrap();
    let err = lonely.cmd::<String>(&["RAFT.CLUSTER", "JOIN", "127.0.0.1:1"]).unwrap_err();
    assert!(err.to_string().contains("cannot reach"), "{err}");
    let err = lonely.cmd::<String>(&["SET", "k", "v"]).unwrap_err();
    assert_eq!(err.code(), Some("CLUSTERDOWN"), "{err}");
    assert_eq!(lonely.state(), "uninitialized", "no leader added it");

    // Garbage on the side port closes that connection only.
    let raft_port = node.port + 10000;
    for garbage in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"*3\r\n$4\r\nMSGS\r\n$3\r\nabc\r\n$-9\r\n", &[0xff; 64]] {
        let _ = raw_exchange(raft_port, garbage, usize::MAX);
    }
    let pong = raw_exchange(raft_port, b"PING\r\n", 7);
    assert!(pong.is_empty() || pong.starts_with(b"-ERR") || pong.starts_with(b"+PONG"));
    assert!(cluster.nodes[0].is_running(), "redis-server survived");
    let _: () = cluster.nodes[0].cmd(&["SET", "still", "alive"]).unwrap();
    let v: String = cluster.nodes[0].cmd(&["GET", "still"]).unwrap();
    assert_eq!(v, "alive");
    assert!(info_field(&cluster.nodes[0], "commit_index") > 0);
}

/// Odd arguments for every `RAFT.*` command, internal ones included (any client can send those):
/// none, empty, not UTF-8, numbers out of range, globs, half-formed subcommands, too many, huge.
fn odd_arguments() -> Vec<Vec<Vec<u8>>> {
    let words = |ws: &[&str]| ws.iter().map(|w| w.as_bytes().to_vec()).collect::<Vec<_>>();
    let mut sets = vec![
        vec![],
        words(&[""]),
        vec![vec![0xff, 0xfe, 0x00]],
        words(&["-1"]),
        words(&["0"]),
        words(&["18446744073709551616"]),
        words(&["*"]),
        words(&["GET"]),
        words(&["SET", "k"]),
        words(&["SET", "consistency"]),
        words(&["SET", "durability", "\u{1}"]),
        words(&["SET", "tick-ms", "-5"]),
        words(&["SET", "write-timeout", "99999999999999999999"]),
        words(&["INIT", "extra"]),
        words(&["JOIN"]),
        words(&["JOIN", ""]),
        words(&["JOIN", "127.0.0.1:0"]),
        words(&["JOIN", "[::1]:99999", "x:y:z"]),
        words(&["RECOVER"]),
        words(&["RECOVER", "now"]),
        words(&["CLUSTER"]),
        words(&["CLUSTER", "SLOTS"]),
        words(&["CLUSTER", "KEYSLOT"]),
        words(&["CLUSTER", "KEYSLOT", ""]),
        words(&["INFO", "cluster"]),
        words(&["INFO", "all", "bogus"]),
        words(&["READONLY", "now"]),
        words(&["1", "2", "3", "4", "5", "6", "7", "8"]),
        vec![b"x".to_vec(); 64],
    ];
    sets.push(vec![vec![b'a'; 1 << 20]]);
    sets
}

#[test]
fn every_raft_command_answers_odd_arguments_and_the_server_lives_on() {
    let mut cluster = Cluster::start(1, &["write-timeout=1000"]).unwrap();
    let member = &cluster.nodes[0];
    let mut empty =
        Server::start(raftis_integration::free_port_pair(), &cluster.root.path().join("empty"), &["write-timeout=1000"]).unwrap();
    // From Redis' own table, so a command added later is swept too.
    let names: Vec<String> = member.cmd(&["COMMAND", "LIST", "FILTERBY", "PATTERN", "raft*"]).unwrap();
    assert!(names.len() >= 10 && names.iter().any(|n| n == "raft._cmd"), "{names:?}");
    for server in [member, &empty] {
        let mut conn = server.client().unwrap();
        for name in &names {
            for args in odd_arguments() {
                let what = format!("{name} with {} argument(s) on port {}", args.len(), server.port);
                let mut cmd = redis::cmd(name);
                for a in &args {
                    cmd.arg(a.as_slice());
                }
                // Any reply will do, an error included; a dropped connection or no answer will not.
                if let Err(e) = cmd.query::<Value>(&mut conn) {
                    assert!(!e.is_io_error() && !e.is_timeout() && !e.is_connection_dropped(), "{what}: {e}");
                }
                // RAFT._MULTI opens a transaction, as MULTI (which the module turns into it) does.
                let reset: String = redis::cmd("RESET").query(&mut conn).unwrap_or_else(|e| panic!("{what}: then RESET: {e}"));
                assert_eq!(reset, "RESET", "{what}");
                let pong: String = redis::cmd("PING").query(&mut conn).unwrap_or_else(|e| panic!("{what}: then PING: {e}"));
                assert_eq!(pong, "PONG", "{what}");
            }
        }
    }
    assert!(empty.is_running(), "the empty node survived");
    assert!(cluster.nodes[0].is_running(), "the member survived");
    let member = &cluster.nodes[0];
    // The member still replicates and serves.
    let _: () = member.cmd(&["SET", "still", "alive"]).unwrap();
    let v: String = member.cmd(&["GET", "still"]).unwrap();
    assert_eq!(v, "alive");
}

#[test]
fn addpeer_and_removepeer_change_membership_of_a_running_cluster() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let _: () = leader.cmd(&["SET", "before", "1"]).unwrap();
    let mut fourth = Server::start(raftis_integration::free_port_pair(), &cluster.root.path().join("n3"), &["consistency=low"]).unwrap();
    // In no cluster yet, its (empty) dataset is nobody's, even at consistency=low.
    let err = fourth.cmd::<Option<String>>(&["GET", "before"]).unwrap_err();
    assert!(err.code() == Some("CLUSTERDOWN") && err.to_string().contains("not part of a cluster yet"), "{err}");
    let id: i64 = leader.cmd(&["RAFT.ADDPEER", &fourth.addr()]).unwrap();
    assert!(id > 0);
    let peers: Vec<Value> = leader.cmd(&["RAFT.PEERS"]).unwrap();
    assert_eq!(peers.len(), 4);
    wait_for("node 4 to apply", Duration::from_secs(10), || fourth.cmd::<Option<String>>(&["GET", "before"]).ok().flatten());
    let cluster_id = info_text(leader, "cluster_id");
    assert_eq!(cluster_id.len(), 16, "made by INIT: {cluster_id:?}");
    wait_for("node 4 to take the cluster id", Duration::from_secs(10), || (info_text(&fourth, "cluster_id") == cluster_id).then_some(()));
    // Something that is not Redis at all is named as such.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = http.accept() {
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let err = leader.cmd::<i64>(&["RAFT.ADDPEER", &http_addr]).unwrap_err().to_string();
    assert!(err.contains("not a Redis server") && err.contains("HTTP/1.1 400"), "{err}");

    let removed: String = leader.cmd(&["RAFT.REMOVEPEER", &id.to_string()]).unwrap();
    assert_eq!(removed, "OK");
    let peers: Vec<Value> = leader.cmd(&["RAFT.PEERS"]).unwrap();
    assert_eq!(peers.len(), 3);
    let _: () = leader.cmd(&["SET", "after", "1"]).unwrap();

    // The removed node, still running, stops serving (at consistency=low it would otherwise
    // answer from a dataset nothing updates any more) and says why.
    let leader_term = info_field_of_live(leader, "term");
    wait_for("the removed node to stop", Duration::from_secs(10), || (fourth.state() == "stopped").then_some(()));
    let refused = |node: &Server, args: &[&str]| {
        let err = node.cmd::<Value>(args).unwrap_err();
        assert_eq!(err.code(), Some("CLUSTERDOWN"), "{args:?}: {err}");
        assert!(err.to_string().contains("removed from the cluster"), "{args:?}: {err}");
        assert!(err.to_string().contains("empty its dir"), "{args:?}: {err}");
    };
    refused(&fourth, &["GET", "before"]);
    refused(&fourth, &["SET", "x", "1"]);
    // A restart keeps it stopped, and it cannot join again with what it holds.
    fourth.restart().unwrap();
    assert_eq!(fourth.state(), "stopped");
    refused(&fourth, &["GET", "before"]);
    refused(&fourth, &["RAFT.CLUSTER", "JOIN", &leader.addr()]);
    let err = leader.cmd::<i64>(&["RAFT.ADDPEER", &fourth.addr()]).unwrap_err();
    assert!(err.to_string().contains("removed from the cluster"), "{err}");
    assert_eq!((leader.state(), info_field(leader, "term")), ("leader".to_string(), leader_term), "no election meanwhile");

    // Emptied, it joins again as a new member and catches up.
    fourth.restart_empty().unwrap();
    let id: i64 = leader.cmd(&["RAFT.ADDPEER", &fourth.addr()]).unwrap();
    assert!(id > 0);
    wait_for("the node added again to apply", Duration::from_secs(10), || fourth.cmd::<Option<String>>(&["GET", "after"]).ok().flatten());
}

#[test]
fn joining_a_cluster_without_a_leader_fails_with_clusterdown_and_can_be_retried() {
    let mut cluster = Cluster::start(2, &[]).unwrap();
    let leader = cluster.wait_leader();
    cluster.nodes[leader].kill9();
    let survivor = &cluster.nodes[1 - leader];
    wait_for("the survivor to lose its leader", Duration::from_secs(10), || {
        (survivor.cmd::<Value>(&["RAFT.LEADER"]).is_err()).then_some(())
    });
    let joiner = Server::start(raftis_integration::free_port_pair(), &cluster.root.path().join("n2"), &[]).unwrap();
    // One member of two cannot elect a leader: the join gives up after a while (15 s, as long
    // as the harness' usual read timeout, hence a connection that waits longer) rather than
    // blocking for the whole catch-up allowance, and says why.
    let mut patient = joiner.client().unwrap();
    patient.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let err = redis::cmd("RAFT.CLUSTER").arg("JOIN").arg(survivor.addr()).query::<String>(&mut patient).unwrap_err();
    assert_eq!(err.code(), Some("CLUSTERDOWN"), "{err}");
    assert!(err.to_string().contains("no leader"), "{err}");
    assert_eq!(joiner.state(), "uninitialized");
    // With the other member back, the same node joins.
    cluster.nodes[leader].restart().unwrap();
    wait_for("a leader", Duration::from_secs(20), || (0..2).find(|i| cluster.nodes[*i].state() == "leader"));
    let joined: String = joiner.cmd(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[1 - leader].addr()]).unwrap();
    assert_eq!(joined, "OK");
    wait_for("the joined node to apply its promotion", Duration::from_secs(10), || (joiner.state() == "follower").then_some(()));
}

#[test]
fn consistency_levels_decide_who_serves_reads() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let l = &cluster.nodes[leader];
    let followers: Vec<&Server> = cluster.nodes.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, n)| n).collect();

    // high (default): the leader confirms leadership, then reads; a read sees the write before it.
    let mut conn = l.client().unwrap();
    for i in 0..200 {
        let _: () = redis::cmd("SET").arg("reg").arg(i).query(&mut conn).unwrap();
        let v: i64 = redis::cmd("GET").arg("reg").query(&mut conn).unwrap();
        assert_eq!(v, i, "a linearizable read returns the last acknowledged write");
    }
    // Pipelined reads share ReadIndex rounds and still answer in order.
    let mut pipe = redis::pipe();
    for _ in 0..100 {
        pipe.cmd("GET").arg("reg");
    }
    let vs: Vec<i64> = pipe.query(&mut conn).unwrap();
    assert!(vs.iter().all(|v| *v == 199));
    for f in &followers {
        let err = f.cmd::<String>(&["GET", "reg"]).unwrap_err();
        assert_eq!(err.code(), Some("MOVED"), "{err}");
        // Its answer shows whether the key exists: a read.
        let err = f.cmd::<Option<i64>>(&["MEMORY", "USAGE", "reg"]).unwrap_err();
        assert_eq!(err.code(), Some("MOVED"), "{err}");
    }
    assert!(l.cmd::<i64>(&["MEMORY", "USAGE", "reg"]).unwrap() > 0);
    // Commands that are neither reads nor writes are never redirected.
    for f in &followers {
        let pong: String = f.cmd(&["PING"]).unwrap();
        assert_eq!(pong, "PONG");
        let _: Value = f.cmd(&["MEMORY", "STATS"]).unwrap();
    }

    // medium: leader-local reads, followers still redirect.
    cluster.config_set("consistency", "medium");
    let v: i64 = l.cmd(&["GET", "reg"]).unwrap();
    assert_eq!(v, 199);
    assert_eq!(followers[0].cmd::<String>(&["GET", "reg"]).unwrap_err().code(), Some("MOVED"));

    // low: every node answers from its own dataset.
    cluster.config_set("consistency", "low");
    for f in &followers {
        wait_for("a follower to serve the value locally", Duration::from_secs(10), || {
            (f.cmd::<i64>(&["GET", "reg"]).ok() == Some(199)).then_some(())
        });
    }
}

#[test]
fn raft_config_gets_and_sets_and_rejects_invalid_values_without_changing_anything() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let n = &cluster.nodes[0];
    let all: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "*"]).unwrap();
    assert!(all.chunks(2).any(|kv| kv[0] == "durability" && kv[1] == "high"), "{all:?}");
    // Not given at load: the id the node runs as.
    let id: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "node-id"]).unwrap();
    assert_eq!(id, ["node-id".to_string(), n.node_id().to_string()]);
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "durability", "medium"]).unwrap();
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "write-timeout", "2500"]).unwrap();
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "tick-ms", "50"]).unwrap();
    let got: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "durability"]).unwrap();
    assert_eq!(got, ["durability", "medium"]);
    // In RESP3 a map, as CONFIG GET answers.
    let mut resp3 = RespConn::connect(n.port).unwrap();
    call(&mut resp3, &["HELLO", "3"]);
    let got = call(&mut resp3, &["RAFT.CONFIG", "GET", "durability"]);
    assert!(matches!(&got, resp_conn::Reply::Aggregate(b'%', items) if items.len() == 2), "{got:?}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "durability", "fast"]).unwrap_err().to_string();
    assert!(err.contains("high, medium, low"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "consistency", "strong"]).unwrap_err().to_string();
    assert!(err.contains("high, medium, low"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "write-timeout", "-1"]).unwrap_err().to_string();
    assert!(err.contains("write-timeout"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "dir", "/tmp"]).unwrap_err().to_string();
    assert!(err.contains("module argument"), "{err}");
    // Raft's timeouts change on the running node: RAFT.INFO reads them back from raft itself.
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "election-ticks", "20"]).unwrap();
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "heartbeat-ticks", "4"]).unwrap();
    wait_for("raft to run with the new timeouts", Duration::from_secs(10), || {
        (info_field(n, "election_ticks") == 20 && info_field(n, "heartbeat_ticks") == 4).then_some(())
    });
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "heartbeat-ticks", "20"]).unwrap_err().to_string();
    assert!(err.contains("heartbeat-ticks (20) must be less than election-ticks (20)"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "election-ticks", "4"]).unwrap_err().to_string();
    assert!(err.contains("heartbeat-ticks (4) must be less than election-ticks (4)"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "election-ticks", "4294967306"]).unwrap_err().to_string();
    assert!(err.contains("from 2 to 100000"), "{err}");
    let got: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "*t*"]).unwrap();
    let map: std::collections::HashMap<&str, &str> = got.chunks(2).map(|kv| (kv[0].as_str(), kv[1].as_str())).collect();
    assert_eq!(map["durability"], "medium", "a rejected SET changed nothing");
    assert_eq!(map["consistency"], "high");
    assert_eq!(map["write-timeout"], "2500");
    assert_eq!(map["tick-ms"], "50");
    assert_eq!((map["election-ticks"], map["heartbeat-ticks"]), ("20", "4"));
    assert_eq!(info_field(n, "election_ticks"), 20, "a refused SET left raft alone");
    // Several patterns, Redis' glob, each setting once.
    let got: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "dur*", "[cd]*", "?ick-ms"]).unwrap();
    let names: Vec<&str> = got.iter().step_by(2).map(String::as_str).collect();
    assert_eq!(names, ["consistency", "durability", "tick-ms", "dir"], "{got:?}");
    // Several pairs: all or none. Ticks are checked together, so both can move at once.
    let _: () = n.cmd(&["RAFT.CONFIG", "SET", "election-ticks", "40", "heartbeat-ticks", "30", "write-timeout", "3000"]).unwrap();
    wait_for("raft to run with both new timeouts", Duration::from_secs(10), || {
        (info_field(n, "election_ticks") == 40 && info_field(n, "heartbeat_ticks") == 30).then_some(())
    });
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "write-timeout", "4000", "durability", "fast"]).unwrap_err().to_string();
    assert!(err.contains("durability") && err.contains("high, medium, low"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "write-timeout", "4000", "WRITE-TIMEOUT", "5000"]).unwrap_err().to_string();
    assert!(err.contains("write-timeout is given more than once"), "{err}");
    let err = n.cmd::<String>(&["RAFT.CONFIG", "SET", "write-timeout", "4000", "durability"]).unwrap_err().to_string();
    assert!(err.contains("wrong number of arguments"), "{err}");
    let got: Vec<String> = n.cmd(&["RAFT.CONFIG", "GET", "write-timeout", "durability"]).unwrap();
    assert_eq!(got, ["durability", "medium", "write-timeout", "3000"], "refused SETs changed nothing");
    // Still serving, with the new settings.
    let _: () = n.cmd(&["SET", "k", "v"]).unwrap();
    let info: String = n.cmd(&["INFO", "raft"]).unwrap();
    assert!(info.contains("raft_durability:medium"), "{info}");
}

/// A JOIN that reached nobody leaves the node waiting to be added: INIT then says so, and what
/// to do, rather than that the node already belongs to a cluster.
#[test]
fn init_after_a_join_that_reached_nobody_says_the_node_waits_to_be_added() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let port = raftis_integration::free_port_pair();
    let node = Server::start(port, &cluster.root.path().join("lone"), &[]).unwrap();
    let nobody = format!("127.0.0.1:{}", raftis_integration::free_port_pair());
    let err = node.cmd::<String>(&["RAFT.CLUSTER", "JOIN", &nobody]).unwrap_err().to_string();
    assert!(err.contains("cannot reach any of the given nodes"), "{err}");
    let err = node.cmd::<String>(&["RAFT.CLUSTER", "INIT"]).unwrap_err().to_string();
    assert!(err.contains("waiting to be added to a cluster") && err.contains("restart it"), "{err}");
    // JOIN again, to a cluster that answers, works.
    let _: String = node.cmd(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[0].addr()]).unwrap();
    wait_for("the node to follow", Duration::from_secs(10), || (node.state() == "follower").then_some(()));
}

/// A client the module answers while Redis' main thread is held up past the client's backstop
/// still gets the answer: here a WATCH, whose barrier the Raft loop completes while the leader
/// runs a DEBUG SLEEP that came in the same event-loop turn. (The backstop was Redis' own timer,
/// and Redis 7.0 runs timeouts before it takes modules' answers: the client got no reply.)
#[test]
fn an_answer_that_comes_while_the_main_thread_is_held_up_is_not_lost() {
    let cluster = Cluster::start(1, &["write-timeout=200"]).unwrap();
    let node = &cluster.nodes[0];
    let _: () = node.cmd(&["SET", "k", "v"]).unwrap();
    // WATCH's backstop: write-timeout and a second, 1.2 s.
    let mut watcher = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    let mut sleeper = std::net::TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    sleeper.write_all(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n").unwrap();
    watcher.write_all(b"WATCH k\r\n").unwrap();
    // The last bytes of the sleep go last, so both commands are read in one turn, WATCH first.
    sleeper.write_all(b"$1\r\n2\r\n").unwrap();
    let got = raftis_integration::exchange_on(&mut watcher, b"", 5);
    assert_eq!(String::from_utf8_lossy(&got), "+OK\r\n");
}

/// A shorter `tick-ms` takes effect at once, not after a tick of the old length: a leader set
/// to tick once a minute and set back still ends a write that cannot commit at write-timeout
/// (deadlines are checked on ticks), not at Redis' backstop a second later.
#[test]
fn a_shorter_tick_takes_effect_at_once() {
    let cluster = Cluster::start(3, &["write-timeout=500"]).unwrap();
    let leader = cluster.wait_leader();
    let _: () = cluster.nodes[leader].cmd(&["RAFT.CONFIG", "SET", "tick-ms", "60000"]).unwrap();
    // Part of the scenario, not a wait for a condition: one tick runs at the long length.
    std::thread::sleep(Duration::from_millis(300));
    let _: () = cluster.nodes[leader].cmd(&["RAFT.CONFIG", "SET", "tick-ms", "100"]).unwrap();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        cluster.nodes[f].pause();
    }
    let err = cluster.nodes[leader].cmd::<()>(&["SET", "k", "v"]).unwrap_err().to_string();
    for &f in &followers {
        cluster.nodes[f].resume();
    }
    assert!(err.contains("not committed within write-timeout"), "{err}");
}

/// A node restarted on other ports (as a container comes back with another IP) is given its new
/// addresses through the log: it said them when it dialed the others, the leader proposed them,
/// and every node reaches it there again.
#[test]
fn a_node_restarted_on_another_address_is_readdressed_and_catches_up() {
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    // A follower, then the leader (the others elect another one, which readdresses it).
    for (step, moved) in [(leader + 1) % 3, leader].into_iter().enumerate() {
        let id = cluster.nodes[moved].node_id();
        let key = format!("before-{step}");
        let _: () = cluster.leader().cmd(&["SET", &key, "1"]).unwrap();
        let node = &mut cluster.nodes[moved];
        node.kill9();
        node.port = raftis_integration::free_port_pair();
        node.restart().unwrap();
        let line = format!("id={id},addr={},raft_addr=127.0.0.1:{},", node.addr(), node.port + 10000);
        for (i, node) in cluster.nodes.iter().enumerate() {
            wait_for(&format!("node {i} to know node {moved}'s new addresses"), Duration::from_secs(20), || {
                node.cmd::<String>(&["RAFT.INFO"]).ok().filter(|info| info.contains(&line)).map(|_| ())
            });
        }
        let _: () = cluster.leader().cmd(&["SET", "after", &key]).unwrap();
        cluster.assert_same_dataset(&[0, 1, 2]);
        assert_eq!(cluster.nodes[moved].cmd::<i64>(&["EXISTS", &key, "after"]).unwrap(), 2);
    }
}

/// A write whose log entry would be over max-entry-size is refused at once, whole, through the
/// leader or a follower, and changes nothing; a transaction counts as one entry.
#[test]
fn a_write_over_max_entry_size_is_refused_whole_and_changes_nothing() {
    let cluster = Cluster::start(3, &["follower-proxy=yes", "max-entry-size=1mb"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let big = "x".repeat(2 << 20);
    let part = "y".repeat(600 << 10);
    for node in [leader, follower] {
        let err = cluster.nodes[node].cmd::<()>(&["SET", "big", &big]).unwrap_err().to_string();
        assert!(err.contains("too large for the Raft log") && err.contains("over max-entry-size (1048576 bytes)"), "{err}");
    }
    // Each write fits alone; the transaction holding both does not.
    let mut conn = cluster.nodes[leader].client().unwrap();
    let err =
        redis::pipe().atomic().cmd("SET").arg("a").arg(&part).cmd("SET").arg("b").arg(&part).query::<Vec<Value>>(&mut conn).unwrap_err();
    assert!(err.to_string().contains("too large for the Raft log"), "{err}");
    assert_eq!(cluster.nodes[leader].cmd::<i64>(&["EXISTS", "a", "b"]).unwrap(), 0);
    let _: () = redis::cmd("SET").arg("a").arg(&part).query(&mut conn).unwrap();
    // Raised at runtime, the limit lets the large write through.
    cluster.config_set("max-entry-size", "4mb");
    let got: Vec<String> = cluster.nodes[leader].cmd(&["RAFT.CONFIG", "GET", "max-entry-size"]).unwrap();
    assert_eq!(got, ["max-entry-size", "4194304"]);
    let _: () = cluster.nodes[follower].cmd(&["SET", "big", &big]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    let exist: i64 = cluster.nodes[leader].cmd(&["EXISTS", "a", "b", "big"]).unwrap();
    assert_eq!(exist, 2, "a and big, not b");
    let err = cluster.nodes[leader].cmd::<()>(&["RAFT.CONFIG", "SET", "max-entry-size", "1gb"]).unwrap_err().to_string();
    assert!(err.contains("1kb to 255mb"), "{err}");
    // A pipeline of writes that each fit, sent to a follower, which forwards what it reads at
    // once as one batch: every one goes through, though together they are over the limit.
    cluster.config_set("max-entry-size", "1kb");
    let mut via_follower = cluster.nodes[follower].client().unwrap();
    let mut pipeline = redis::pipe();
    for i in 0..20 {
        pipeline.cmd("SET").arg(format!("piped:{i}")).arg("z".repeat(200));
    }
    let replies: Vec<Value> = pipeline.query(&mut via_follower).unwrap();
    assert_eq!(replies, vec![Value::Okay; 20]);
}

#[test]
fn with_durability_high_killing_every_node_right_after_a_write_loses_nothing() {
    let mut cluster = Cluster::start(3, &["durability=high"]).unwrap();
    let mut acked = 0;
    {
        let mut conn = cluster.leader().client().unwrap();
        for i in 0..500 {
            let _: i64 = redis::cmd("INCR").arg("counter").query(&mut conn).unwrap();
            acked = i + 1;
        }
    }
    // No pause between the last acknowledgement and the kills.
    for n in cluster.nodes.iter_mut() {
        n.kill9();
    }
    for n in cluster.nodes.iter_mut() {
        n.restart().unwrap();
    }
    let leader = cluster.leader();
    let v: i64 = leader.cmd(&["GET", "counter"]).unwrap();
    assert_eq!(v, acked);
}

#[test]
fn a_paused_leader_never_serves_a_stale_linearizable_read_after_it_resumes() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let old = cluster.wait_leader();
    let _: () = cluster.nodes[old].cmd(&["SET", "k", "old"]).unwrap();
    // A connection to the old leader made before the pause; its request waits in the socket.
    let mut stale_conn = cluster.nodes[old].client().unwrap();
    cluster.nodes[old].pause();
    let new = wait_for("a new leader while the old one is frozen", Duration::from_secs(15), || {
        (0..3).filter(|i| *i != old).find(|i| cluster.nodes[*i].state() == "leader")
    });
    let mut conn = cluster.nodes[new].client().unwrap();
    wait_for("the new leader to accept writes", Duration::from_secs(10), || {
        redis::cmd("SET").arg("k").arg("new").query::<()>(&mut conn).ok()
    });
    cluster.nodes[old].resume();
    // The old leader still believes it leads when it wakes up; ReadIndex must catch that.
    // A read it already ran on its stale dataset is never answered: its connection is closed.
    match redis::cmd("GET").arg("k").query::<String>(&mut stale_conn) {
        Ok(v) => assert_eq!(v, "new", "a linearizable read returned a stale value"),
        Err(e) => {
            assert!(matches!(e.code(), Some("MOVED") | Some("TIMEOUT") | Some("CLUSTERDOWN")) || e.is_io_error(), "unexpected error: {e}")
        }
    }
    // The cluster settles on one leader and nothing acknowledged is lost.
    let leader = cluster.wait_leader();
    let v: String = cluster.nodes[leader].cmd(&["GET", "k"]).unwrap();
    assert_eq!(v, "new");
}

#[test]
fn with_follower_proxy_a_follower_runs_writes_and_reads_through_the_leader() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];

    // Writes and linearizable reads on a follower: the leader runs them, the follower relays.
    let set: String = follower.cmd(&["SET", "proxied", "1"]).unwrap();
    assert_eq!(set, "OK");
    let incr: i64 = follower.cmd(&["INCR", "proxied"]).unwrap();
    assert_eq!(incr, 2);
    let got: String = follower.cmd(&["GET", "proxied"]).unwrap();
    assert_eq!(got, "2", "a forwarded read sees the forwarded write");
    let _: i64 = follower.cmd(&["HSET", "h", "a", "1", "b", "2"]).unwrap();
    let mut all: Vec<String> = follower.cmd(&["HGETALL", "h"]).unwrap();
    all.sort();
    assert_eq!(all, ["1", "2", "a", "b"]);
    let _: i64 = follower.cmd(&["RPUSH", "l", "x", "y"]).unwrap();
    let l: Vec<String> = follower.cmd(&["LRANGE", "l", "0", "-1"]).unwrap();
    assert_eq!(l, ["x", "y"]);
    let missing: Option<String> = follower.cmd(&["GET", "nothing-here"]).unwrap();
    assert_eq!(missing, None);
    // The command's own error comes back as it is.
    let err = follower.cmd::<i64>(&["INCR", "h"]).unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    // SELECT on the follower's connection travels with the command.
    let mut conn = follower.client().unwrap();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut conn).unwrap();
    let _: () = redis::cmd("SET").arg("in-db-3").arg("yes").query(&mut conn).unwrap();
    let mut on_leader = cluster.nodes[leader].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut on_leader).unwrap();
    let v: String = redis::cmd("GET").arg("in-db-3").query(&mut on_leader).unwrap();
    assert_eq!(v, "yes");

    // RESP3 replies (a map, a double) are relayed in RESP3, byte for byte what the leader sends.
    let hgetall = b"*2\r\n$7\r\nHGETALL\r\n$1\r\nh\r\n";
    let via_follower = resp3_exchange(follower.port, hgetall, 28);
    assert_eq!(via_follower, resp3_exchange(cluster.nodes[leader].port, hgetall, 28));
    assert!(via_follower.starts_with(b"%2\r\n"), "{}", String::from_utf8_lossy(&via_follower));
    let zincrby = b"*4\r\n$7\r\nZINCRBY\r\n$1\r\nz\r\n$3\r\n1.5\r\n$1\r\nm\r\n";
    assert_eq!(resp3_exchange(follower.port, zincrby, 6), b",1.5\r\n");

    // Switched off at runtime, the follower redirects again.
    let _: String = follower.cmd(&["RAFT.CONFIG", "SET", "follower-proxy", "no"]).unwrap();
    let err = follower.cmd::<String>(&["SET", "proxied", "3"]).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");

    // Every node applied the forwarded writes like any other.
    cluster.wait_converged(&[0, 1, 2]);
    let digests: Vec<String> = cluster.nodes.iter().map(raftis_integration::digest).collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
}

/// With the proxy, a follower's clients ride through changes of leader: a command the node it
/// went to ran none of (that node no longer leads, or its leadership was moving) goes again to
/// the next leader, so they never see a redirect, only `-TIMEOUT` for a write that may have run.
#[test]
fn with_follower_proxy_a_followers_clients_ride_through_changes_of_leader() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    // Leadership moves between nodes 0 and 1; the clients write through node 2.
    let leader = cluster.wait_leader();
    if leader == 2 {
        let _: String = cluster.nodes[2].cmd(&["RAFT.TRANSFERLEADER", &cluster.nodes[0].node_id().to_string()]).unwrap();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let (acknowledged, unknown) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut conn = cluster.nodes[2].client().unwrap();
                    let (mut acknowledged, mut unknown) = (0, 0);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        match redis::cmd("INCR").arg("n").query::<i64>(&mut conn) {
                            Ok(_) => acknowledged += 1,
                            Err(e) if e.code() == Some("TIMEOUT") => unknown += 1,
                            Err(e) => panic!("a write through the follower: {e}"),
                        }
                    }
                    (acknowledged, unknown)
                })
            })
            .collect();
        for _ in 0..4 {
            let from = cluster.wait_leader();
            assert_ne!(from, 2, "the follower the clients write through took over");
            let to = cluster.nodes[1 - from].node_id().to_string();
            let _: String = cluster.nodes[from].cmd(&["RAFT.TRANSFERLEADER", &to]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().unwrap()).fold((0, 0), |(a, u), (wa, wu)| (a + wa, u + wu))
    });
    let leader = cluster.wait_leader();
    let n: i64 = cluster.nodes[leader].cmd(&["GET", "n"]).unwrap();
    assert!(acknowledged > 0);
    assert!((acknowledged..=acknowledged + unknown).contains(&n), "n = {n} after {acknowledged} acknowledged and {unknown} unknown");
}

/// A pipeline sent to a follower with the proxy reaches the leader whole, not a command at a time:
/// its replies come back in order, reads see the writes before them, and the leader proposes a
/// handful of entries for it rather than one per write (none for a pipeline of reads).
#[test]
fn with_follower_proxy_a_pipeline_goes_to_the_leader_in_one_piece() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    let mut conn = follower.client().unwrap();
    let writes = 100;
    let mut pipe = redis::pipe();
    for i in 0..writes {
        pipe.cmd("INCR").arg("counter");
        pipe.cmd("GET").arg("counter");
        pipe.cmd("SET").arg(format!("k{i}")).arg(i);
    }
    // SELECT travels with the commands after it.
    pipe.cmd("SELECT").arg(5).cmd("SET").arg("k0").arg("in-db-5").cmd("SELECT").arg(0).cmd("GET").arg("k0");
    let before = client_proposals(&cluster.nodes[leader]);
    let replies: Vec<Value> = pipe.query(&mut conn).unwrap();
    let proposed = client_proposals(&cluster.nodes[leader]) - before;
    for i in 0..writes {
        let n = i as i64 + 1;
        assert_eq!(replies[3 * i], Value::Int(n), "INCR number {n}");
        assert_eq!(replies[3 * i + 1], Value::Data(n.to_string().into_bytes()), "GET after INCR number {n}");
        assert_eq!(replies[3 * i + 2], Value::Okay);
    }
    assert_eq!(replies[3 * writes + 1], Value::Okay);
    assert_eq!(replies[3 * writes + 3], Value::Data(b"0".to_vec()), "db 0's k0, not db 5's");
    // One entry if Redis read the whole pipeline at once; a few if it came in pieces.
    assert!((1..=10).contains(&proposed), "{proposed} entries for a pipeline of {} writes", 2 * writes + 1);
    let mut on_leader = cluster.nodes[leader].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(5).query(&mut on_leader).unwrap();
    let v: String = redis::cmd("GET").arg("k0").query(&mut on_leader).unwrap();
    assert_eq!(v, "in-db-5");
    // A pipeline of reads is no entry at all: the leader confirms a read index and runs them.
    let mut reads = redis::pipe();
    for i in 0..writes {
        reads.cmd("GET").arg(format!("k{i}"));
    }
    let before = client_proposals(&cluster.nodes[leader]);
    let values: Vec<String> = reads.query(&mut conn).unwrap();
    assert_eq!(client_proposals(&cluster.nodes[leader]) - before, 0);
    assert_eq!(values, (0..writes).map(|i| i.to_string()).collect::<Vec<_>>());
    // Large values: the batch is cut by size, the commands past it go alone, in order.
    let big = |i: usize| char::from(b'a' + i as u8).to_string().repeat(1 << 20);
    let mut large = redis::pipe();
    for i in 0..12 {
        large.cmd("SET").arg(format!("big{}", i % 3)).arg(big(i)).ignore();
    }
    large.cmd("STRLEN").arg("big2").cmd("GET").arg("big0");
    let (len, last): (i64, String) = large.query(&mut conn).unwrap();
    assert_eq!(len, 1 << 20);
    assert_eq!(last, big(9), "the last SET of big0 wins");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// On a fresh RESP3 connection (`HELLO 3`), sends `request` and returns `len` bytes of its reply.
fn resp3_exchange(port: u16, request: &[u8], len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(buf[0], b'%', "HELLO 3 answers a map: {:?}", String::from_utf8_lossy(&buf[..n]));
    s.write_all(request).unwrap();
    let mut out = vec![0u8; len];
    s.read_exact(&mut out).unwrap();
    out
}

#[test]
fn raft_stats_show_the_journal_and_its_checkpoints() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = cluster.leader();
    let before = stat_field(node, "checkpoints");
    // An append checkpoints the journal once 100 ms passed since the last checkpoint.
    wait_for("a checkpoint", Duration::from_secs(10), || {
        let _: () = node.cmd(&["SET", "k", "v"]).unwrap();
        (stat_field(node, "checkpoints") > before).then_some(())
    });
    assert!(stat_field(node, "checkpoint_micros") > 0);
    let journal = stat_field(node, "journal_bytes");
    assert!(journal < 4 << 20, "a checkpoint runs before the journal is half full: {journal}");
}

/// Writes and reads interleaved in one pipeline, and the replies that show every read saw the
/// writes sent before it (53 writes). Keys `k` and `n` must not exist yet.
fn interleaved_pipeline() -> (Vec<u8>, Vec<u8>) {
    let mut request = Vec::new();
    let mut expected = Vec::new();
    for i in 0..50 {
        request.extend_from_slice(format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{i}\r\n", i.to_string().len()).as_bytes());
        request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        expected.extend_from_slice(format!("+OK\r\n${}\r\n{i}\r\n", i.to_string().len()).as_bytes());
    }
    request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n*2\r\n$4\r\nLLEN\r\n$1\r\nk\r\n");
    expected.extend_from_slice(b"$-1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
    // Connection commands run at once but answer in order; SELECT moves the writes after it.
    request.extend_from_slice(b"PING\r\nINCR n\r\nSELECT 1\r\nGET k\r\nINCR n\r\nSELECT 0\r\nINCR n\r\nGET n\r\n");
    expected.extend_from_slice(b"+PONG\r\n:1\r\n+OK\r\n$-1\r\n:1\r\n+OK\r\n:2\r\n$1\r\n2\r\n");
    (request, expected)
}

/// [`interleaved_pipeline`] in database `db` of its own (and `db + 1`), so that `k` and `n` start
/// absent: it begins with `SELECT db`, and its `SELECT 1` and `SELECT 0` become `db + 1` and `db`.
fn interleaved_pipeline_in(db: u32) -> (Vec<u8>, Vec<u8>) {
    let (request, expected) = interleaved_pipeline();
    let request =
        String::from_utf8(request).unwrap().replace("SELECT 1", &format!("SELECT {}", db + 1)).replace("SELECT 0", &format!("SELECT {db}"));
    ([format!("SELECT {db}\r\n").into_bytes(), request.into_bytes()].concat(), [b"+OK\r\n".to_vec(), expected].concat())
}

/// Through a follower with the proxy too: its writes go to the leader, and a read behind them
/// goes with them, also at `low`, where the follower could otherwise read before it has applied
/// them itself.
#[test]
fn through_a_follower_a_pipeline_reads_its_own_writes_at_every_consistency_level() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    for (db, level) in [(2, "high"), (4, "medium"), (6, "low")] {
        cluster.config_set("consistency", level);
        let (request, expected) = interleaved_pipeline_in(db);
        let got = raw_exchange(follower.port, &request, expected.len());
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&expected), "consistency {level}");
    }
}

/// At `low` a follower reads its own dataset, which learns of a write a moment after the leader
/// has applied and answered it. Through the proxy, a write is answered only once the follower's
/// dataset holds it, so a client that reads after that answer reads its write. Here the leader's
/// news is held back from the follower for a moment during each write, which is every time
/// without the wait.
#[test]
fn at_low_a_client_of_a_follower_reads_its_own_write_once_it_is_answered() {
    let cluster = Cluster::start_partitionable(3, &["follower-proxy=yes", "consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let f = (leader + 1) % 3;
    let follower = &cluster.nodes[f];
    let network = cluster.network.as_ref().unwrap();
    let rounds = 5;
    for round in 0..rounds {
        let value = format!("v{round}");
        // Well under the follower's election timeout: it stays a follower.
        network.block(leader, f);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                network.heal();
            });
            let set: String = follower.cmd(&["SET", "mine", &value]).unwrap();
            assert_eq!(set, "OK");
            let read: Option<String> = follower.cmd(&["GET", "mine"]).unwrap();
            assert_eq!(read.as_deref(), Some(value.as_str()), "round {round}: the follower read before its dataset held the write");
        });
    }
    assert!(stat_field(follower, "forward_catch_ups") >= rounds, "{}", raftis_integration::raft_stats(follower));
    assert_eq!(stat_field(follower, "forward_catch_ups_late"), 0);
}

/// The same while the leadership moves: a new leader's answers say what its dataset held, which
/// a follower whose news comes from another leader than before must still wait for. Two clients
/// on every node check their own writes ([`own_writes`]).
#[test]
fn at_low_clients_of_followers_read_their_own_writes_while_the_leadership_moves() {
    let mut cluster = Cluster::start(3, &["follower-proxy=yes", "consistency=low"]).unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let violations = own_writes::check_while(&ports, 2, |progress| {
        for round in 0..4 {
            let leader = cluster.wait_leader();
            let before = progress.mark();
            if round % 2 == 0 {
                let _: String = cluster.nodes[leader].cmd(&["RAFT.TRANSFERLEADER"]).unwrap();
            } else {
                cluster.nodes[leader].kill9();
                cluster.wait_leader();
                cluster.nodes[leader].restart().unwrap();
            }
            progress.wait_past(&before, "every client to check a read after the change");
        }
    });
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn a_pipeline_of_writes_and_reads_keeps_flowing_in_order_and_shares_leadership_checks() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let (request, expected) = interleaved_pipeline();
    let writes0 = stat_field(leader, "writes_held");
    assert_eq!(String::from_utf8_lossy(&raw_exchange(leader.port, &request, expected.len())), String::from_utf8_lossy(&expected));
    assert_eq!(stat_field(leader, "writes_held") - writes0, 53, "every write kept the pipeline flowing");

    // A deep pipeline of reads costs a few leadership checks, not one each.
    let (reads0, rounds0) = (stat_field(leader, "reads_held"), stat_field(leader, "read_index_rounds"));
    let mut request = Vec::new();
    for _ in 0..500 {
        request.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
    let expected = b"$2\r\n49\r\n".repeat(500);
    assert_eq!(raw_exchange(leader.port, &request, expected.len()), expected);
    let (reads, rounds) = (stat_field(leader, "reads_held") - reads0, stat_field(leader, "read_index_rounds") - rounds0);
    assert_eq!(reads, 500, "every read ran on the leader at once");
    assert!(rounds * 10 <= reads, "{rounds} leadership checks for {reads} pipelined reads");

    // RESP3 replies are held and sent the same way.
    let _: () = leader.cmd(&["HSET", "h", "f", "1.5"]).unwrap();
    let map = b"%1\r\n$1\r\nf\r\n$3\r\n1.5\r\n";
    assert_eq!(resp3_exchange(leader.port, b"*2\r\n$7\r\nHGETALL\r\n$1\r\nh\r\n", map.len()), map);
    assert_eq!(stat_field(leader, "held_clients_closed"), 0);
}

/// Below consistency high reads normally run untouched, yet a pipeline's writes still keep it
/// flowing, and its reads still see its own writes; also a read that finds its connection with
/// as many writes in flight as it may hold.
#[test]
fn pipelines_keep_flowing_and_read_their_own_writes_at_every_consistency_level() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    for (db, level) in [(2, "high"), (4, "medium"), (6, "low")] {
        cluster.config_set("consistency", level);
        let (request, expected) = interleaved_pipeline_in(db);
        let writes0 = stat_field(leader, "writes_held");
        let got = raw_exchange(leader.port, &request, expected.len());
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&expected), "consistency {level}");
        assert_eq!(stat_field(leader, "writes_held") - writes0, 53, "consistency {level}: every write kept the pipeline flowing");

        // 1024 writes in flight fill the connection's slots: the read after them waits for them
        // with its client blocked, and the pipeline goes on after it.
        let mut request = format!("SELECT {db}\r\n").into_bytes();
        let mut expected = b"+OK\r\n".to_vec();
        for i in 1..=1024 {
            request.extend_from_slice(b"INCR c\r\n");
            expected.extend_from_slice(format!(":{i}\r\n").as_bytes());
        }
        request.extend_from_slice(b"GET c\r\nINCR c\r\nGET c\r\n");
        expected.extend_from_slice(b"$4\r\n1024\r\n:1025\r\n$4\r\n1025\r\n");
        let got = raw_exchange(leader.port, &request, expected.len());
        // The replies that matter are the last few; show those when they differ.
        let tail = |r: &[u8]| String::from_utf8_lossy(&r[r.len().saturating_sub(40)..]).into_owned();
        assert_eq!(tail(&got), tail(&expected), "consistency {level}, a full pipeline");
        assert!(got == expected, "consistency {level}, a full pipeline: the 1024 writes' replies differ");
    }
}

/// A write refused as its entry is applied (here a `SORT` that would store tied elements in a
/// different order on every node) fills its slot at once, as a write that succeeds does: a read
/// queued behind it reads the dataset as it stood there, not after the writes the pipeline sent
/// after the read.
#[test]
fn a_read_behind_a_write_refused_as_it_is_applied_does_not_see_the_writes_after_it() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let _: i64 = leader.cmd(&["SADD", "s", "a", "b"]).unwrap();
    let mut conn = RespConn::connect(leader.port).unwrap();
    for level in ["high", "medium", "low"] {
        cluster.config_set("consistency", level);
        for i in 0..10 {
            let (old, new) = (format!("old{i}"), format!("new{i}"));
            call(&mut conn, &["SET", "k", &old]);
            let replies = conn
                .pipeline(&[args(&["SORT", "s", "BY", "w_*", "ALPHA", "STORE", "d"]), args(&["GET", "k"]), args(&["SET", "k", &new])])
                .unwrap();
            assert!(replies[0].text().is_some_and(|e| e.starts_with("ERR SORT of a set")), "{:?}", replies[0]);
            assert_eq!(replies[1], Reply::Blob(b'$', old.into_bytes()), "consistency {level}, round {i}");
        }
    }
}

/// At medium only a ready leader serves reads. A read that waited behind its pipeline's write on
/// a leader that stepped down meanwhile is redirected, not served from the old leader's dataset.
#[test]
fn at_medium_a_read_queued_on_a_leader_that_stepped_down_is_redirected() {
    let cluster = Cluster::start_partitionable(3, &["consistency=medium", "write-timeout=30000"]).unwrap();
    let old = cluster.wait_leader();
    let _: () = cluster.nodes[old].cmd(&["SET", "w", "1"]).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let net = cluster.network.as_ref().unwrap();
    net.partition(&[vec![old], others.clone()]);
    let mut conn = TcpStream::connect(("127.0.0.1", cluster.nodes[old].port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The write cannot commit; the read waits behind it.
    conn.write_all(b"SET w 2\r\nGET w\r\n").unwrap();
    let new = wait_for("the majority to elect a new leader", Duration::from_secs(30), || {
        others.iter().copied().find(|i| cluster.nodes[*i].state() == "leader")
    });
    // Healed, the old leader hears of the new term and steps down: its write fails, and the read
    // behind it must not be served from its dataset.
    net.heal();
    let got = String::from_utf8_lossy(&read_lines(&mut conn, 2)).into_owned();
    let (write, read) = got.split_once("\r\n").unwrap();
    assert!(write.starts_with('-'), "the write did not commit: {got:?}");
    // Which error depends on the message that deposed it: one from the new leader names it, a
    // higher term from elsewhere leaves the leader unknown for a moment.
    let slot = redis::cluster_routing::get_slot(b"w");
    let to_new_leader = read.starts_with(&format!("-MOVED {slot} ")) && read.ends_with(&format!(":{}\r\n", cluster.nodes[new].port));
    assert!(to_new_leader || read == "-CLUSTERDOWN No raft leader\r\n", "the read is redirected, not served: {got:?}");
}

/// Reads until `lines` reply lines have come; panics if the connection closes first.
fn read_lines(conn: &mut TcpStream, lines: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.iter().filter(|b| **b == b'\n').count() < lines {
        let n = conn.read(&mut buf).expect("the commands are answered");
        assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Runs `f` while every node but `leader` is stopped (SIGSTOP), then lets them continue.
fn with_followers_paused<T>(cluster: &Cluster, leader: usize, f: impl FnOnce() -> T) -> T {
    let followers: Vec<usize> = (0..cluster.nodes.len()).filter(|i| *i != leader).collect();
    for &i in &followers {
        cluster.nodes[i].pause();
    }
    let result = f();
    for &i in &followers {
        cluster.nodes[i].resume();
    }
    result
}

#[test]
fn a_leader_that_cannot_confirm_closes_a_reader_and_answers_a_writer_with_an_error() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let l = cluster.wait_leader();
    let _: () = cluster.nodes[l].cmd(&["SET", "k", "v"]).unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", cluster.nodes[l].port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 64];
    // The leader still believes it leads: the read runs, but no majority can confirm it.
    let got = with_followers_paused(&cluster, l, || {
        conn.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap();
        conn.read(&mut buf)
    });
    match got {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed unanswered, got {other:?} {:?}", String::from_utf8_lossy(&buf)),
    }
    assert_eq!(stat_field(&cluster.nodes[l], "held_clients_closed"), 1);

    // Once the followers are back, reads are answered again.
    let l = cluster.wait_leader();
    let v: String = wait_for("a read after the cluster healed", Duration::from_secs(15), || cluster.nodes[l].cmd(&["GET", "k"]).ok());
    assert_eq!(v, "v");

    // A pipelined write that cannot commit gets an error in its place, after the replies before it.
    let _: () = wait_for("the healed leader to accept writes", Duration::from_secs(15), || cluster.nodes[l].cmd(&["SET", "w", "1"]).ok());
    let mut conn = TcpStream::connect(("127.0.0.1", cluster.nodes[l].port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let got = with_followers_paused(&cluster, l, || {
        conn.write_all(b"PING\r\nSET w 2\r\nPING\r\n").unwrap();
        read_lines(&mut conn, 3)
    });
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("+PONG\r\n-TIMEOUT ") && got.ends_with("\r\n+PONG\r\n"), "{got:?}");
    // "May or may not have taken effect": either way every node agrees.
    let leader = cluster.wait_leader();
    let v: String = wait_for("a read after the cluster healed", Duration::from_secs(15), || cluster.nodes[leader].cmd(&["GET", "w"]).ok());
    assert!(v == "1" || v == "2", "{v}");
    cluster.wait_converged(&[0, 1, 2]);
}

#[test]
fn a_client_that_disconnects_with_writes_in_flight_leaves_the_server_healthy() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let mut request = Vec::new();
    for i in 0..2000 {
        request.extend_from_slice(format!("SET gone:{i} {i}\r\nGET gone:{i}\r\n").as_bytes());
    }
    for _ in 0..5 {
        let mut conn = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
        conn.write_all(&request).unwrap();
        drop(conn);
    }
    // Every write that was read before the close was proposed; the server keeps serving.
    let pong: String = leader.cmd(&["PING"]).unwrap();
    assert_eq!(pong, "PONG");
    wait_for("the held clients to be released", Duration::from_secs(15), || {
        let clients: String = leader.cmd(&["CLIENT", "LIST"]).ok()?;
        (clients.lines().count() == 1).then_some(())
    });
    let v: String = leader.cmd(&["SET", "after", "1"]).unwrap();
    assert_eq!(v, "OK");
    cluster.wait_converged(&[0, 1, 2]);
}

/// A leader elected while a node is down has never heard from it. Its leadership checks (one
/// heartbeat each) pile up for that node and reach it in one go once it is back. Answered one by
/// one, every answer made the leader send the node the same full append from its log: thousands
/// of megabyte reads that once kept a leader's loop busy until the others deposed it. The
/// backlog is coalesced now: the leader keeps its term and the node catches up.
#[test]
fn a_node_coming_back_to_a_backlog_of_heartbeats_does_not_stall_the_leader() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let first = cluster.wait_leader();
    let down = (first + 1) % 3;
    cluster.nodes[down].kill9();
    // Far more log than one append carries (1 MiB), so every append to it is a full one.
    let value = "v".repeat(100);
    let mut conn = cluster.nodes[first].client().unwrap();
    for chunk in 0..40 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET").arg(format!("k{}", chunk * 1000 + i)).arg(&value).ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
    // A new term whose leader has never heard from the node that is down.
    cluster.nodes[first].kill9();
    cluster.nodes[first].restart().unwrap();
    let leader = cluster.wait_leader();
    let term = info_field_of_live(&cluster.nodes[leader], "term");
    let mut conn = cluster.nodes[leader].client().unwrap();
    // A thousand leadership checks for the node to come back to, however slow this machine is.
    let rounds0 = stat_field(&cluster.nodes[leader], "read_index_rounds");
    let started = Instant::now();
    while stat_field(&cluster.nodes[leader], "read_index_rounds") - rounds0 <= 1000 {
        assert!(started.elapsed() < Duration::from_secs(120), "the leader stopped answering reads");
        for _ in 0..100 {
            let v: String = redis::cmd("GET").arg("k0").query(&mut conn).unwrap();
            assert_eq!(v, value);
        }
    }
    cluster.nodes[down].restart().unwrap();

    let commit = info_field_of_live(&cluster.nodes[leader], "commit_index");
    wait_for("the restarted node to catch up", Duration::from_secs(30), || {
        (info_field(&cluster.nodes[down], "applied_index") >= commit).then_some(())
    });
    assert_eq!(cluster.wait_leader(), leader, "the leader was deposed");
    assert_eq!(info_field(&cluster.nodes[leader], "term"), term, "an election happened");
    assert_eq!(digest(&cluster.nodes[down]), digest(&cluster.nodes[leader]));
}

/// The same with the write in a snapshot: the node loads it at start, and stops rather than put
/// the key in another database.
#[test]
fn a_node_restarted_with_fewer_databases_than_its_snapshot_holds_stops() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let mut conn = cluster.nodes[0].client().unwrap();
    for db in [10, 7] {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut conn).unwrap();
        let _: () = redis::cmd("SET").arg("x").arg(format!("in-db-{db}")).query(&mut conn).unwrap();
    }
    let _: Value = cluster.nodes[0].cmd(&["RAFT.SNAPSHOT"]).unwrap();

    cluster.nodes[0].redis_args = vec!["--databases".into(), "8".into()];
    cluster.nodes[0].restart().unwrap();
    let node = &cluster.nodes[0];
    wait_for("the node to stop", Duration::from_secs(10), || (node.state() == "stopped").then_some(()));
    let err = node.cmd::<String>(&["GET", "x"]).unwrap_err().to_string();
    assert!(err.contains("holds keys of database 10, and this node has 8 (databases 8)"), "{err}");
}

/// Whether MOVE, COPY ... DB or SWAPDB runs depends on the node's `databases`, which a restart
/// may change (README): one naming a database the leader lacks never enters the log, so its
/// replay cannot run where it failed before. Nor does a peer's forwarded command in such a
/// database, which would have stopped every node that applied it. And of COPY's `DB` options
/// the last is the one written to, for WATCH as in Redis.
#[test]
fn a_database_number_out_of_range_never_enters_the_log() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let _: () = node.cmd(&["SET", "k", "v"]).unwrap();
    let before = client_proposals(node);
    for command in [&["MOVE", "k", "16"][..], &["COPY", "k", "k2", "DB", "1", "DB", "16"], &["SWAPDB", "0", "16"]] {
        let err = node.cmd::<Value>(command).unwrap_err().to_string();
        assert!(err.contains("DB index is out of range"), "{command:?}: {err}");
    }
    assert_eq!(client_proposals(node), before, "nothing was proposed");
    let forward = b"*5\r\n$7\r\nFORWARD\r\n$2\r\n99\r\n$1\r\n2\r\n$4\r\nINCR\r\n$1\r\nn\r\n";
    let mut side = std::net::TcpStream::connect(("127.0.0.1", node.port + 10000)).unwrap();
    let reply = raftis_integration::exchange_until(&mut side, forward, b"\r\n");
    assert!(reply.contains("DB index is out of range"), "{reply}");
    assert_eq!(client_proposals(node), before, "nothing was proposed");
    assert_eq!(node.state(), "leader");

    let mut watcher = RespConn::connect(node.port).unwrap();
    call(&mut watcher, &["SELECT", "2"]);
    call(&mut watcher, &["WATCH", "dst"]);
    let copied: i64 = node.cmd(&["COPY", "k", "dst", "DB", "1", "DB", "2"]).unwrap();
    assert_eq!(copied, 1);
    let replies = watcher.pipeline(&[resp_conn::args(&["MULTI"]), resp_conn::args(&["GET", "dst"]), resp_conn::args(&["EXEC"])]).unwrap();
    assert!(matches!(replies[2], resp_conn::Reply::Null(_)), "the copy touched the watched key: {replies:?}");
}

/// A join that fails after making the node a learner (here the leader hands over while the node
/// cannot catch up) leaves it a learner; joining again goes on from there and makes it a voter.
#[test]
fn a_node_a_failed_join_left_a_learner_joins_again() {
    let mut cluster = Cluster::start_partitionable(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let (x, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let removed: String = cluster.nodes[leader].cmd(&["RAFT.REMOVEPEER", &cluster.nodes[x].node_id().to_string()]).unwrap();
    assert_eq!(removed, "OK");
    cluster.nodes[x].restart_empty().unwrap();
    let network = cluster.network.as_ref().unwrap();
    network.block(leader, x);
    network.block(other, x);

    let (leader_port, x_addr) = (cluster.nodes[leader].port, cluster.nodes[x].addr());
    let adding = std::thread::spawn(move || {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{leader_port}")).unwrap().get_connection().unwrap();
        redis::cmd("RAFT.ADDPEER").arg(&x_addr).query::<Value>(&mut conn)
    });
    wait_for("the node to be a learner", Duration::from_secs(10), || {
        let peers: Vec<Vec<Value>> = cluster.nodes[leader].cmd(&["RAFT.PEERS"]).ok()?;
        peers.iter().any(|p| p.get(1) == Some(&Value::Data(b"learner".to_vec()))).then_some(())
    });
    let moved: String = cluster.nodes[leader].cmd(&["RAFT.TRANSFERLEADER", &cluster.nodes[other].node_id().to_string()]).unwrap();
    assert_eq!(moved, "OK");
    assert!(adding.join().unwrap().is_err(), "the leader that was adding it stepped down");
    network.heal();
    wait_for("the learner to catch up", Duration::from_secs(10), || (cluster.nodes[x].state() == "learner").then_some(()));

    cluster.join(x, other).unwrap();
    wait_for("the node to be a voter", Duration::from_secs(10), || (cluster.nodes[x].state() == "follower").then_some(()));
    let _: () = cluster.nodes[other].cmd(&["SET", "k", "v"]).unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// RAFT.DIGEST covers what DEBUG DIGEST leaves out and nodes must still agree on: expiry times
/// and streams' consumer groups. Nodes that applied the same index give the same digest.
#[test]
fn raft_digest_sees_expiry_times_and_consumer_groups_and_is_the_same_on_every_node() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let n = &cluster.nodes[leader];
    let raft_digest = |node: &Server| -> (u64, u64, String) { node.cmd(&["RAFT.DIGEST"]).unwrap() };
    let debug_digest = |node: &Server| -> String { node.cmd(&["DEBUG", "DIGEST"]).unwrap() };
    let in_an_hour = (std::time::SystemTime::now() + Duration::from_secs(3600)).duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let _: () = n.cmd(&["SET", "k", "v", "PXAT", &in_an_hour.to_string()]).unwrap();
    let _: String = n.cmd(&["XADD", "s", "1-1", "f", "v"]).unwrap();
    let _: () = n.cmd(&["XGROUP", "CREATE", "s", "g", "0"]).unwrap();
    let (applied, keys, first) = raft_digest(n);
    assert!(applied > 0);
    assert_eq!(keys, n.cmd::<u64>(&["DBSIZE"]).unwrap());
    let debug_first = debug_digest(n);

    let _: i64 = n.cmd(&["PEXPIREAT", "k", &(in_an_hour + 1000).to_string()]).unwrap();
    let (_, _, moved_deadline) = raft_digest(n);
    assert_eq!(debug_digest(n), debug_first, "DEBUG DIGEST does not see the deadline move");
    assert_ne!(moved_deadline, first, "RAFT.DIGEST does");

    let _: Value = n.cmd(&["XREADGROUP", "GROUP", "g", "alice", "STREAMS", "s", ">"]).unwrap();
    let (_, _, delivered) = raft_digest(n);
    assert_eq!(debug_digest(n), debug_first, "nor a delivery to a consumer");
    assert_ne!(delivered, moved_deadline);

    // Every node, once it has applied as far, gives the leader's.
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        assert_eq!(raft_digest(node).2, delivered, "node {}", node.port);
    }
    let err = n.cmd::<Value>(&["RAFT.DIGEST", "x"]).unwrap_err().to_string();
    assert!(err.contains("wrong number of arguments"), "{err}");
}
