//! Access control. ACL users: Redis checks the internal command the filter turned a client's
//! command into, so the module checks the client's own command against the user's rules, as Redis
//! would have. And the cluster's `raft-password`, which nodes prove to each other.

use raftis_integration::resp_conn::{args, RespConn};
use raftis_integration::{caller_module_path, exchange_until, field_in, free_port_pair, raw_exchange, wait_for, Cluster, Server};
use redis::Value;
use std::time::Duration;

/// The internal commands a restricted user's traffic becomes (README, *ACL users*).
const GRANTS: &[&str] = &[
    "+raft._cmd",
    "+raft._read",
    "+raft._block",
    "+raft._multi",
    "+raft._watch",
    "+raft._wait",
    "+raft._refuse",
    "+raft._error",
    "+raft._scriptkill",
    "+raft._unwatch",
];

fn connect_as(node: &Server, user: &str, password: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{}/", node.port)).unwrap();
    client.get_connection().unwrap()
}

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

fn run(conn: &mut redis::Connection, args: &[&str]) -> redis::RedisResult<Value> {
    command(args).query(conn)
}

fn refused(result: redis::RedisResult<Value>, reason: &str) {
    let err = result.expect_err("refused");
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    assert!(err.to_string().contains(reason), "{err}");
}

#[test]
fn a_restricted_user_runs_what_its_rules_allow_and_nothing_else() {
    let cluster = Cluster::start(2, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    let follower = &cluster.nodes[1 - leader];
    let mut setuser = vec!["ACL", "SETUSER", "app", "on", ">pw", "+@read", "+set", "+multi", "+exec", "+eval", "~app:*"];
    setuser.extend_from_slice(GRANTS);
    // ACL users are per node, as in Redis.
    for n in [node, follower] {
        let _: () = n.cmd(&setuser).unwrap();
    }
    let _: () = node.cmd(&["SET", "other", "secret"]).unwrap();
    let mut app = connect_as(node, "app", "pw");

    assert_eq!(run(&mut app, &["SET", "app:1", "x"]).unwrap(), Value::Okay);
    refused(run(&mut app, &["SET", "other", "y"]), "access one of the keys used as arguments");
    refused(run(&mut app, &["DEL", "app:1"]), "run the 'del' command");
    // A linearizable read goes through the module too.
    assert_eq!(run(&mut app, &["GET", "app:1"]).unwrap(), Value::Data(b"x".to_vec()));
    refused(run(&mut app, &["GET", "other"]), "access one of the keys used as arguments");
    // Redis refuses a read of a key outside the user's patterns itself, before the module runs:
    // its error still comes after the reply of the write before it.
    let mut raw = RespConn::connect(node.port).unwrap();
    assert_eq!(raw.call(&[b"AUTH", b"app", b"pw"]).unwrap().text().as_deref(), Some("OK"));
    let replies = raw.pipeline(&[args(&["SET", "app:order", "x"]), args(&["GET", "other"])]).unwrap();
    assert_eq!(replies[0].text().as_deref(), Some("OK"), "{replies:?}");
    assert!(replies[1].is_error() && replies[1].text().is_some_and(|t| t.starts_with("NOPERM")), "{replies:?}");
    // A transaction with a command the user may not run is discarded whole.
    let err =
        redis::pipe().atomic().cmd("SET").arg("app:2").arg("y").cmd("SET").arg("other").arg("z").query::<Vec<Value>>(&mut app).unwrap_err();
    assert!(err.to_string().contains("no permissions to access one of the keys"), "{err}");
    // A script's calls cannot be checked as Redis would: refused to a restricted user.
    refused(run(&mut app, &["EVAL", "return redis.call('GET', 'other')", "0"]), "scripts and functions are refused");

    // Through a follower that forwards to the leader, the follower checks.
    let mut via_follower = connect_as(follower, "app", "pw");
    assert_eq!(run(&mut via_follower, &["SET", "app:f", "x"]).unwrap(), Value::Okay);
    refused(run(&mut via_follower, &["SET", "other", "y"]), "access one of the keys used as arguments");
    refused(run(&mut via_follower, &["GET", "other"]), "access one of the keys used as arguments");
    // In one pipeline through the follower, a transaction it discards takes nothing else with
    // it: not the write before MULTI, nor the one after EXEC.
    let pipeline: Vec<&[&str]> = vec![
        &["AUTH", "app", "pw"],
        &["SET", "app:p1", "1"],
        &["MULTI"],
        &["SET", "other", "z"],
        &["EXEC"],
        &["SET", "app:p2", "2"],
        &["GET", "app:p2"],
    ];
    let request: Vec<u8> = pipeline.iter().flat_map(|args| command(args).get_packed_command()).collect();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", follower.port)).unwrap();
    let replies = exchange_until(&mut stream, &request, b"$1\r\n2\r\n");
    assert!(replies.starts_with("+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n"), "{replies}");
    assert!(replies.ends_with("+OK\r\n$1\r\n2\r\n"), "{replies}");
    assert!(replies.contains("no permissions to access one of the keys"), "{replies}");

    // Each refusal is in ACL LOG, as Redis logs its own.
    let log: Vec<Vec<Value>> = node.cmd(&["ACL", "LOG"]).unwrap();
    let objects: Vec<String> = log
        .iter()
        .filter_map(|entry| {
            let at = entry.iter().position(|v| *v == Value::Data(b"object".to_vec()))?;
            redis::from_redis_value::<String>(&entry[at + 1]).ok()
        })
        .collect();
    assert!(objects.contains(&"other".to_string()) && objects.contains(&"del".to_string()), "{log:?}");

    let plain = |args: &[&str]| node.cmd::<Value>(args).unwrap();
    assert_eq!(plain(&["GET", "other"]), Value::Data(b"secret".to_vec()), "nothing refused was written");
    assert_eq!(plain(&["EXISTS", "app:1", "app:2", "app:f"]), Value::Int(2), "app:1 and app:f: the transaction ran none of its commands");
    assert_eq!(plain(&["EXISTS", "app:p1", "app:p2"]), Value::Int(2), "the pipeline's writes around the discarded transaction");
    // The default user is not restricted: its scripts run.
    assert_eq!(plain(&["EVAL", "return redis.call('GET', 'other')", "0"]), Value::Data(b"secret".to_vec()));

    // Without the internal commands, Redis itself refuses the user's writes (module commands are
    // in no category in Redis 7.0; the README says what to grant). `+@all` covers them.
    let _: () = node.cmd(&["ACL", "SETUSER", "bare", "on", ">pw", "+@write", "+@read", "~*"]).unwrap();
    let mut bare = connect_as(node, "bare", "pw");
    refused(run(&mut bare, &["SET", "app:3", "x"]), "'raft._cmd'");
    // A monitoring user: the INFO that shows the Cluster section runs as `raft._info` (see
    // *Redis Cluster clients*), still checked against the user's `+info`.
    let _: () = node.cmd(&["ACL", "SETUSER", "monitor", "on", ">pw", "+info", "+raft._info"]).unwrap();
    let mut monitor = connect_as(node, "monitor", "pw");
    let info: String = redis::from_redis_value(&run(&mut monitor, &["INFO"]).unwrap()).unwrap();
    assert!(info.contains("cluster_enabled:1\r\n"), "{info}");
    let _: () = node.cmd(&["ACL", "SETUSER", "monitor", "-info"]).unwrap();
    refused(run(&mut monitor, &["INFO", "cluster"]), "run the 'info' command");
    refused(run(&mut bare, &["INFO"]), "'raft._info'");
    // Once the users are gone, nothing is checked any more, and the default user's writes go on.
    let _: () = node.cmd(&["ACL", "DELUSER", "app", "bare", "monitor"]).unwrap();
    let _: () = node.cmd(&["SET", "after", "1"]).unwrap();
}

/// A user whose key patterns allow reads only (`%R~`) reads through the log, as in Redis: the
/// keys RAFT._READ names to Redis are read keys. And a RAFT._READ nested in itself names none.
#[test]
fn a_user_allowed_to_read_keys_only_reads_them() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let _: () = node.cmd(&["SET", "app:1", "x"]).unwrap();
    let mut setuser = vec!["ACL", "SETUSER", "reader", "on", ">pw", "+@read", "+set", "%R~app:*"];
    setuser.extend_from_slice(GRANTS);
    let _: () = node.cmd(&setuser).unwrap();
    let mut reader = connect_as(node, "reader", "pw");
    assert_eq!(run(&mut reader, &["GET", "app:1"]).unwrap(), Value::Data(b"x".to_vec()));
    refused(run(&mut reader, &["SET", "app:1", "y"]), "key");
    let nested: Vec<String> = node.cmd(&["COMMAND", "GETKEYS", "RAFT._READ", "RAFT._READ", "GET", "app:1"]).unwrap_or_default();
    assert!(nested.is_empty(), "{nested:?}");
    let keys: Vec<String> = node.cmd(&["COMMAND", "GETKEYS", "RAFT._READ", "MGET", "a", "b"]).unwrap();
    assert_eq!(keys, ["a", "b"]);
}

/// A transaction that restricts the open default user halfway through: the commands after it,
/// in the transaction and after it, are checked against the new rules (the module's note that
/// nothing needs checking was learnt again inside EXEC, before the `ACL SETUSER` ran, and kept).
#[test]
fn an_acl_change_inside_a_transaction_applies_to_what_follows_it() {
    let cluster = Cluster::start(1, &[]).unwrap();
    let node = &cluster.nodes[0];
    let mut conn = node.client().unwrap();
    let exec: redis::RedisResult<Vec<Value>> = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("x")
        .arg("1")
        .cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-flushall")
        .cmd("FLUSHALL")
        .query(&mut conn);
    // Redis' own check of FLUSHALL inside EXEC sees RAFT._CMD, which +@all still grants: the
    // module refuses it and discards the transaction, or it runs and empties the dataset.
    let emptied = exec.is_ok() && node.cmd::<Option<String>>(&["GET", "x"]).unwrap().is_none();
    assert!(!emptied, "FLUSHALL ran after the user lost it: {exec:?}");
    refused(run(&mut conn, &["FLUSHALL"]), "flushall");
    let _: () = node.cmd(&["ACL", "SETUSER", "default", "+flushall"]).unwrap();
    assert_eq!(run(&mut conn, &["FLUSHALL"]).unwrap(), Value::Okay);
}

/// Redis' own password, set on every node once the cluster is formed (the harness' checks of a
/// starting server know none).
const REDIS_PASSWORD: &str = "redis-pw";
const WITH_RAFT_PASSWORD: &[&str] = &["raft-password=cluster-pw", "consistency=low", "trailing-logs=100", "follower-proxy=yes"];

fn protect(node: &Server) {
    let _: () = node.cmd(&["CONFIG", "SET", "requirepass", REDIS_PASSWORD]).unwrap();
}

fn as_default(node: &Server, args: &[&str]) -> redis::RedisResult<Value> {
    run(&mut connect_as(node, "default", REDIS_PASSWORD), args)
}

fn error_of(result: redis::RedisResult<Value>) -> String {
    result.expect_err("refused").to_string()
}

/// A node started with `extra` and Redis' password, that is not in the cluster yet.
fn newcomer(cluster: &Cluster, name: &str, extra: &[&str]) -> Server {
    let node = Server::start(free_port_pair(), &cluster.root.path().join(name), extra).unwrap();
    protect(&node);
    node
}

#[test]
fn with_a_raft_password_nodes_that_know_it_form_a_cluster_behind_requirepass_and_no_one_else_gets_in() {
    // INIT and JOIN: the joining nodes log in to the leader's client port as peers.
    let cluster = Cluster::start(3, WITH_RAFT_PASSWORD).unwrap();
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    for i in 0..300 {
        let _: () = node.cmd(&["SET", &format!("k{i}"), &i.to_string()]).unwrap();
    }
    // Compacted past the first entries: a node that joins now needs the snapshot file, which it
    // fetches from the leader's side port.
    let _: Value = node.cmd(&["RAFT.SNAPSHOT"]).unwrap();
    for n in &cluster.nodes {
        protect(n);
    }
    assert_eq!(
        as_default(node, &["RAFT.CONFIG", "GET", "raft-password"]).unwrap(),
        Value::Bulk(vec![Value::Data(b"raft-password".to_vec()), Value::Data(b"(set)".to_vec())])
    );

    // Behind requirepass, a node with the password joins, and one is added with RAFT.ADDPEER.
    let joiner = newcomer(&cluster, "joiner", WITH_RAFT_PASSWORD);
    assert_eq!(as_default(&joiner, &["RAFT.CLUSTER", "JOIN", &node.addr()]).unwrap(), Value::Okay);
    let added = newcomer(&cluster, "added", WITH_RAFT_PASSWORD);
    assert!(matches!(as_default(node, &["RAFT.ADDPEER", &added.addr()]).unwrap(), Value::Int(id) if id > 0));
    let _: () = redis::cmd("SET").arg("after").arg("joins").query(&mut connect_as(node, "default", REDIS_PASSWORD)).unwrap();
    for n in [&joiner, &added] {
        let mut conn = connect_as(n, "default", REDIS_PASSWORD);
        wait_for("the new node to catch up", Duration::from_secs(60), || {
            let got: Option<String> = redis::cmd("GET").arg("after").query(&mut conn).unwrap();
            got.is_some().then_some(())
        });
        assert_eq!(redis::cmd("GET").arg("k0").query::<String>(&mut conn).unwrap(), "0");
        let stats: String = redis::cmd("RAFT.STATS").query(&mut conn).unwrap();
        assert_eq!(field_in(&stats, "snapshots_fetched"), Some("1"), "{stats}");
        // Writes sent to it go through the leader's side port (follower-proxy).
        assert!(redis::cmd("INCR").arg("through-followers").query::<i64>(&mut conn).unwrap() > 0);
    }

    // A node with another password, or none, cannot join, nor be added, and hears why.
    let stranger = newcomer(&cluster, "stranger", &["raft-password=guess"]);
    let err = error_of(as_default(&stranger, &["RAFT.CLUSTER", "JOIN", &node.addr()]));
    assert!(err.contains("refused the join") && err.contains("WRONGPASS"), "{err}");
    let err = error_of(as_default(node, &["RAFT.ADDPEER", &stranger.addr()]));
    assert!(err.contains("cannot be added") && err.contains("WRONGPASS"), "{err}");
    let open = newcomer(&cluster, "open", &[]);
    let err = error_of(as_default(&open, &["RAFT.CLUSTER", "JOIN", &node.addr()]));
    assert!(err.contains("NOAUTH") && err.contains("raft-password=..."), "{err}");
    let err = error_of(as_default(node, &["RAFT.ADDPEER", &open.addr()]));
    assert!(err.contains("this node has no raft-password"), "{err}");
    // An admin's own connection is no peer: RAFT._JOIN wants the password proven.
    let err = error_of(as_default(node, &["RAFT._JOIN", "99", "127.0.0.1:1", "127.0.0.1:2"]));
    assert!(err.starts_with("NOAUTH") && err.contains("this node has a raft-password"), "{err}");
    // A peer's login allows the two internal commands and nothing else.
    let mut login = redis::Client::open(format!("redis://127.0.0.1:{}/", node.port)).unwrap().get_connection().unwrap();
    assert_eq!(run(&mut login, &["RAFT._AUTH", "cluster-pw"]).unwrap(), Value::Okay);
    refused(run(&mut login, &["GET", "k0"]), "'get'");
    refused(run(&mut login, &["CONFIG", "GET", "requirepass"]), "'config|get'");
    assert!(error_of(run(&mut login, &["RAFT._AUTH", "guess"])).contains("WRONGPASS"));

    // The side port serves nothing before AUTH, and nothing after a wrong one.
    let side = node.port + 10000;
    let forward = b"*6\r\n$7\r\nFORWARD\r\n$1\r\n0\r\n$1\r\n2\r\n$3\r\nSET\r\n$2\r\nk0\r\n$5\r\npwned\r\n";
    let reply = raw_exchange(side, forward, usize::MAX);
    assert_eq!(String::from_utf8_lossy(&reply), "-NOAUTH Authentication required.\r\n");
    let mut wrong = b"*2\r\n$4\r\nAUTH\r\n$5\r\nguess\r\n".to_vec();
    wrong.extend_from_slice(forward);
    let reply = raw_exchange(side, &wrong, usize::MAX);
    assert_eq!(String::from_utf8_lossy(&reply), "-WRONGPASS invalid raft-password\r\n");
    assert_eq!(as_default(node, &["GET", "k0"]).unwrap(), Value::Data(b"0".to_vec()), "nothing forwarded ran");
    let good = b"*2\r\n$4\r\nAUTH\r\n$10\r\ncluster-pw\r\n*1\r\n$4\r\nPING\r\n";
    assert_eq!(String::from_utf8_lossy(&raw_exchange(side, good, 12)), "+OK\r\n+PONG\r\n");
}

/// Another module's `RedisModule_Call` runs on a client Redis makes for the call, which has no
/// user (Redis' root: no ACL rules apply) and may not block. Raftis serves it what it can at once,
/// refuses what would wait for the cluster, and never crashes the server, ACL users or not (with
/// users defined, asking Redis for that client's user name crashed it).
#[test]
fn another_modules_calls_are_served_or_refused_and_never_crash_the_server() {
    let root = tempfile::tempdir().unwrap();
    let caller = caller_module_path().display().to_string();
    let mut node = Server::start_with_redis_args(free_port_pair(), root.path(), &["--loadmodule", &caller], &[]).unwrap();
    let _: () = node.cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    wait_for("the node to lead", Duration::from_secs(10), || (node.cmd::<String>(&["RAFT.STATE"]).ok()? == "leader").then_some(()));
    let _: () = node.cmd(&["SET", "k", "v"]).unwrap();
    for users in [false, true] {
        if users {
            let _: () = node.cmd(&["ACL", "SETUSER", "app", "on", ">pw", "~app:*", "+@all"]).unwrap();
        }
        let info: String = node.cmd(&["CALLER.CALL", "INFO", "server"]).unwrap();
        assert!(info.contains("redis_version"), "users {users}: {info}");
        // A linearizable read and a write wait for the cluster: refused, not blocked.
        for command in [&["CALLER.CALL", "GET", "k"][..], &["CALLER.CALL", "SET", "k", "w"]] {
            let err = node.cmd::<Value>(command).unwrap_err();
            assert!(err.to_string().contains("another module's RedisModule_Call"), "users {users}: {command:?}: {err}");
        }
        // A local read needs no waiting, and the caller has no user's rules to meet.
        let _: () = node.cmd(&["RAFT.CONFIG", "SET", "consistency", "low"]).unwrap();
        assert_eq!(node.cmd::<String>(&["CALLER.CALL", "GET", "k"]).unwrap(), "v", "users {users}");
        let _: () = node.cmd(&["RAFT.CONFIG", "SET", "consistency", "high"]).unwrap();
    }
    // A call the module runs as its client's user (`C`) meets that user's rules.
    let _: () = node.cmd(&["ACL", "SETUSER", "nohgetall", "on", ">pw", "~*", "&*", "+@all", "-hgetall"]).unwrap();
    let _: i64 = node.cmd(&["HSET", "h", "f", "v"]).unwrap();
    let mut limited = connect_as(&node, "nohgetall", "pw");
    let err = command(&["CALLER.CALLASME", "HGETALL", "h"]).query::<Value>(&mut limited).unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    let err = command(&["CALLER.CALL", "HGETALL", "h"]).query::<Value>(&mut limited).unwrap_err();
    assert!(err.to_string().contains("another module's RedisModule_Call"), "as root, refused only for waiting: {err}");
    assert!(node.is_running());
    assert_eq!(node.cmd::<String>(&["GET", "k"]).unwrap(), "v", "the refused write changed nothing");
}
