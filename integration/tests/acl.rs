//! ACL users: Redis checks the internal command the filter turned a client's command into, so the
//! module checks the client's own command against the user's rules, as Redis would have.

use raftis_integration::{Cluster, Server};
use redis::Value;

/// The internal commands a restricted user's traffic becomes (README, *ACL users*).
const GRANTS: &[&str] =
    &["+raft._cmd", "+raft._read", "+raft._block", "+raft._multi", "+raft._watch", "+raft._wait", "+raft._refuse", "+raft._error", "+raft._scriptkill"];

fn connect_as(node: &Server, user: &str, password: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{}/", node.port)).unwrap();
    client.get_connection().unwrap()
}

fn run(conn: &mut redis::Connection, args: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(conn)
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
    // A transaction with a command the user may not run is discarded whole.
    let err = redis::pipe().atomic().cmd("SET").arg("app:2").arg("y").cmd("SET").arg("other").arg("z").query::<Vec<Value>>(&mut app).unwrap_err();
    assert!(err.to_string().contains("no permissions to access one of the keys"), "{err}");
    // A script's calls cannot be checked as Redis would: refused to a restricted user.
    refused(run(&mut app, &["EVAL", "return redis.call('GET', 'other')", "0"]), "scripts and functions are refused");

    // Through a follower that forwards to the leader, the follower checks.
    let mut via_follower = connect_as(follower, "app", "pw");
    assert_eq!(run(&mut via_follower, &["SET", "app:f", "x"]).unwrap(), Value::Okay);
    refused(run(&mut via_follower, &["SET", "other", "y"]), "access one of the keys used as arguments");
    refused(run(&mut via_follower, &["GET", "other"]), "access one of the keys used as arguments");

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
    // The default user is not restricted: its scripts run.
    assert_eq!(plain(&["EVAL", "return redis.call('GET', 'other')", "0"]), Value::Data(b"secret".to_vec()));

    // Without the internal commands, Redis itself refuses the user's writes (module commands are
    // in no category in Redis 7.0; the README says what to grant). `+@all` covers them.
    let _: () = node.cmd(&["ACL", "SETUSER", "bare", "on", ">pw", "+@write", "+@read", "~*"]).unwrap();
    let mut bare = connect_as(node, "bare", "pw");
    refused(run(&mut bare, &["SET", "app:3", "x"]), "'raft._cmd'");
    // Once the users are gone, nothing is checked any more, and the default user's writes go on.
    let _: () = node.cmd(&["ACL", "DELUSER", "app", "bare"]).unwrap();
    let _: () = node.cmd(&["SET", "after", "1"]).unwrap();
}
