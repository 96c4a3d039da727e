//! Bringing an existing Redis dataset into Raftis. A node that is in no cluster yet but holds keys
//! (Redis loaded its dump file at start) refuses to create or join a cluster, which would replace
//! them; `scripts/import` copies a Redis server's keys and function libraries into a running
//! cluster through its leader, and every node ends with exactly the source's dataset. The other
//! way, a node's `BGSAVE` writes a dump file a plain Redis loads (the README's backup).

use raftis_integration::{
    deadlines, digest, field_in, free_port_pair, incompressible, info_field, info_text, stat_field, wait_for, workspace, Cluster, Server,
    PROBE_KEY,
};
use std::process::Command;
use std::time::Duration;

/// A plain Redis holding a bit of everything (see [`fill`]).
fn source(dir: &std::path::Path) -> Server {
    let plain = Server::start_plain(free_port_pair(), dir).unwrap();
    fill(&mut plain.client().unwrap());
    plain
}

/// Writes a bit of everything, in two databases, with expiry times and a library.
fn fill(conn: &mut redis::Connection) {
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("SET").arg(format!("s{i}")).arg(format!("value {i}")).ignore();
        pipe.cmd("SADD").arg("set").arg(format!("member {i}")).ignore();
        pipe.cmd("HSET").arg("hash").arg(format!("f{i}")).arg(i).ignore();
        pipe.cmd("ZADD").arg("zset").arg(i).arg(format!("m{i}")).ignore();
        pipe.cmd("RPUSH").arg("list").arg(i).ignore();
        pipe.cmd("XADD").arg("stream").arg("*").arg("n").arg(i).ignore();
    }
    pipe.cmd("SET").arg("soon").arg("gone").arg("EX").arg(3600).ignore();
    pipe.cmd("PEXPIRE").arg("hash").arg(7_200_000).ignore();
    pipe.cmd("SELECT").arg(2).ignore();
    pipe.cmd("SET").arg("elsewhere").arg("db2").ignore();
    pipe.cmd("SELECT").arg(0).ignore();
    pipe.cmd("FUNCTION")
        .arg("LOAD")
        .arg("#!lua name=imported\nredis.register_function('imported_f', function(keys, args) return 1 end)")
        .ignore();
    pipe.query::<()>(conn).unwrap();
}

#[test]
fn a_node_holding_keys_refuses_to_form_or_join_a_cluster_and_the_import_script_copies_them_in() {
    let root = tempfile::tempdir().unwrap();
    let plain = source(&root.path().join("plain"));
    let keys = 307;
    let _: () = plain.cmd(&["SAVE"]).unwrap();

    // A node started on that dump file holds its keys, and will not let them vanish.
    let loaded_dir = root.path().join("loaded");
    std::fs::create_dir_all(&loaded_dir).unwrap();
    std::fs::copy(root.path().join("plain/dump.rdb"), loaded_dir.join("dump.rdb")).unwrap();
    let loaded = Server::start(free_port_pair(), &loaded_dir, &[]).unwrap();
    let init = loaded.cmd::<()>(&["RAFT.CLUSTER", "INIT"]).unwrap_err().to_string();
    assert!(init.contains(&format!("this node holds {keys} keys")) && init.contains("RAFT.CLUSTER INIT would discard them"), "{init}");

    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let join = loaded.cmd::<()>(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap_err().to_string();
    assert!(join.contains("joining a cluster would discard them"), "{join}");
    let added = cluster.nodes[leader].cmd::<()>(&["RAFT.ADDPEER", &loaded.addr()]).unwrap_err().to_string();
    assert!(added.contains(&format!("this node holds {keys} keys")), "RAFT.ADDPEER passes the refusal on: {added}");
    let state: String = loaded.cmd(&["RAFT.STATE"]).unwrap();
    assert_eq!(state, "uninitialized");
    let info: String = loaded.cmd(&["INFO", "keyspace"]).unwrap();
    assert!(info.contains("db0:keys=306") && info.contains("db2:keys=1"), "the keys are still there:\n{info}");

    // The import script, given any node, copies everything in through the leader.
    let follower = (leader + 1) % cluster.nodes.len();
    let out = Command::new(workspace().join("scripts/import")).arg(plain.addr()).arg(cluster.nodes[follower].addr()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scripts/import: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("imported {keys} keys")) && stdout.contains("1 function libraries"), "{stdout}");

    // Values, types, expiry times and the library: the same on every node as in the source, given
    // the key `Cluster::wait_leader` writes to find the leader.
    let imported = cluster.assert_same_dataset(&[0, 1, 2]);
    let _: () = plain.cmd(&["SET", PROBE_KEY, "1"]).unwrap();
    assert_eq!(imported, digest(&plain), "the cluster holds the source's dataset");
    assert_eq!(deadlines(&cluster.nodes[leader]), deadlines(&plain), "and its expiry times, to the millisecond");
}

/// `RAFT.CLUSTER INIT KEEPDATA` makes the keys Redis loaded the new cluster's dataset: they are
/// written into its first snapshot, at index 1, and its log starts after that, so every node that
/// joins loads them. Restarted, the node that made the cluster holds the cluster's dataset, not
/// its dump file's again.
#[test]
fn init_keepdata_makes_the_keys_redis_loaded_the_clusters_dataset() {
    let root = tempfile::tempdir().unwrap();
    let plain = source(&root.path().join("plain"));
    let _: () = plain.cmd(&["SAVE"]).unwrap();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("n{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        if i == 0 {
            std::fs::copy(root.path().join("plain/dump.rdb"), dir.join("dump.rdb")).unwrap();
        }
        nodes.push(Server::start(free_port_pair(), &dir, &[]).unwrap());
    }
    let refused = nodes[0].cmd::<()>(&["RAFT.CLUSTER", "INIT"]).unwrap_err().to_string();
    assert!(refused.contains("RAFT.CLUSTER INIT KEEPDATA to make them the new cluster's dataset"), "{refused}");
    // Before a node exists, RAFT.INFO already shows where a snapshot stands.
    assert_eq!(info_text(&nodes[0], "snapshot_phase"), "none");
    let ok: String = nodes[0].cmd(&["RAFT.CLUSTER", "INIT", "KEEPDATA"]).unwrap();
    assert_eq!(ok, "OK");
    assert_eq!(info_text(&nodes[0], "last_snapshot_status"), "ok");
    let again = nodes[0].cmd::<()>(&["RAFT.CLUSTER", "INIT", "KEEPDATA"]).unwrap_err().to_string();
    assert!(again.contains("already belongs to a cluster"), "{again}");
    let mut cluster = Cluster::of(nodes, root);
    let leader = cluster.wait_leader();
    assert_eq!(leader, 0);
    assert_eq!(info_field(&cluster.nodes[0], "snapshot_index"), 1);
    assert_eq!(info_field(&cluster.nodes[0], "first_log_index"), 2, "no entry from before the snapshot");
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();
    let _: () = plain.cmd(&["SET", PROBE_KEY, "1"]).unwrap();
    let kept = cluster.assert_same_dataset(&[0, 1, 2]);
    assert_eq!(kept, digest(&plain), "every node holds what Redis loaded, expiry times and libraries included");
    assert_eq!(deadlines(&cluster.nodes[leader]), deadlines(&plain), "the expiry times to the millisecond");
    for joined in &cluster.nodes[1..] {
        assert!(stat_field(joined, "snapshots_fetched") >= 1, "a joining node loads the first snapshot");
    }

    // The cluster goes on from there, and a restart does not bring the dump file's keys back.
    let _: () = cluster.nodes[0].cmd(&["DEL", "s0", "list"]).unwrap();
    let _: () = cluster.nodes[0].cmd(&["SET", "after", "init"]).unwrap();
    let changed = cluster.assert_same_dataset(&[0, 1, 2]);
    assert_ne!(changed, kept);
    cluster.nodes[0].restart().unwrap();
    cluster.wait_leader();
    // Node 0's digest among them: with its dump file's keys back it would differ.
    assert_eq!(cluster.assert_same_dataset(&[0, 1, 2]), changed, "the restarted node holds the cluster's dataset");
}

/// The README's backup: `BGSAVE` on the leader writes a dump file that a plain Redis loads as the
/// cluster's dataset, expiry times and function libraries included.
#[test]
fn bgsave_on_the_leader_writes_a_dump_file_that_plain_redis_loads_as_the_clusters_dataset() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    fill(&mut leader.client().unwrap());
    let started: String = leader.cmd(&["BGSAVE"]).unwrap();
    assert!(started.contains("started"), "{started}");
    let persistence = wait_for("the dump file to be written", Duration::from_secs(30), || {
        let persistence: String = leader.cmd(&["INFO", "persistence"]).ok()?;
        (field_in(&persistence, "rdb_bgsave_in_progress") == Some("0")).then_some(persistence)
    });
    assert_eq!(field_in(&persistence, "rdb_last_bgsave_status"), Some("ok"), "{persistence}");

    let restored_dir = cluster.root.path().join("restored");
    std::fs::create_dir_all(&restored_dir).unwrap();
    std::fs::copy(leader.dir.join("dump.rdb"), restored_dir.join("dump.rdb")).unwrap();
    let restored = Server::start_plain(free_port_pair(), &restored_dir).unwrap();
    let keys: i64 = restored.cmd(&["DBSIZE"]).unwrap();
    assert!(keys > 300, "only {keys} keys in db 0");
    assert_eq!(digest(&restored), digest(leader), "the dump holds the cluster's dataset");
    assert_eq!(deadlines(&restored), deadlines(leader), "with its expiry times");
    assert_eq!(cluster.assert_same_dataset(&[0, 1, 2]), digest(leader));
}

/// Redis loads a dump file it finds in its dir after loading the module, and runs the event loop
/// every 2 MB of it meanwhile. A node restarted beside the dump file `INIT KEEPDATA` made its
/// cluster from must not restore its own dataset in the middle of that load (Redis would then
/// meet the dump's keys again and abort), and must end with the cluster's dataset, not the dump's.
#[test]
fn a_node_restarted_beside_a_large_dump_file_holds_the_clusters_dataset() {
    let root = tempfile::tempdir().unwrap();
    let plain = Server::start_plain(free_port_pair(), &root.path().join("plain")).unwrap();
    let mut conn = plain.client().unwrap();
    // Values that do not compress: the dump file's size is what Redis reads.
    let mut seed = 1u64;
    for chunk in 0..6 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("SET").arg(format!("big{chunk}-{i}")).arg(incompressible(2000, &mut seed)).ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let _: () = plain.cmd(&["SAVE"]).unwrap();
    let dir = root.path().join("node");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root.path().join("plain/dump.rdb"), dir.join("dump.rdb")).unwrap();
    assert!(std::fs::metadata(dir.join("dump.rdb")).unwrap().len() > 10 << 20, "a dump Redis loads in several steps");

    let mut node = Server::start(free_port_pair(), &dir, &[]).unwrap();
    let ok: String = node.cmd(&["RAFT.CLUSTER", "INIT", "KEEPDATA"]).unwrap();
    assert_eq!(ok, "OK");
    wait_for("the node to lead", Duration::from_secs(10), || (info_text(&node, "role") == "leader").then_some(()));
    let _: () = node.cmd(&["DEL", "big0-0"]).unwrap();
    let _: () = node.cmd(&["SET", "after", "init"]).unwrap();
    let cluster_dataset = digest(&node);

    node.restart().unwrap();
    wait_for("the node to lead again", Duration::from_secs(20), || (info_text(&node, "role") == "leader").then_some(()));
    assert_eq!(digest(&node), cluster_dataset, "the restarted node holds the cluster's dataset");
    assert_eq!(node.cmd::<i64>(&["EXISTS", "big0-0"]).unwrap(), 0, "not the dump file's key");
}

/// Function libraries are data, as keys are: a node in no cluster yet refuses to drop those Redis
/// loaded from its dump file, `INIT KEEPDATA` keeps them, and a member restarted beside a dump file
/// before any snapshot holds the log's libraries, not the file's (FLUSHALL leaves libraries, so
/// the file's stayed, and the log's own `FUNCTION LOAD` of a library of that name then failed on
/// that node alone).
#[test]
fn function_libraries_redis_loaded_are_kept_or_refused_as_keys_are() {
    let root = tempfile::tempdir().unwrap();
    let plain = Server::start_plain(free_port_pair(), &root.path().join("plain")).unwrap();
    let old = "#!lua name=lib\nredis.register_function('which', function() return 'the dump file' end)";
    let _: String = plain.cmd(&["FUNCTION", "LOAD", old]).unwrap();
    let _: () = plain.cmd(&["SAVE"]).unwrap();
    let dump = root.path().join("plain/dump.rdb");

    let dir = root.path().join("loaded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&dump, dir.join("dump.rdb")).unwrap();
    let loaded = Server::start(free_port_pair(), &dir, &[]).unwrap();
    let refused = loaded.cmd::<()>(&["RAFT.CLUSTER", "INIT"]).unwrap_err().to_string();
    assert!(refused.contains("holds 1 function libraries") && refused.contains("KEEPDATA"), "{refused}");
    let ok: String = loaded.cmd(&["RAFT.CLUSTER", "INIT", "KEEPDATA"]).unwrap();
    assert_eq!(ok, "OK");
    wait_for("the node to lead", Duration::from_secs(10), || (loaded.cmd::<String>(&["RAFT.STATE"]).ok()? == "leader").then_some(()));
    assert_eq!(loaded.cmd::<String>(&["FCALL", "which", "0"]).unwrap(), "the dump file", "kept");

    // A cluster formed empty, whose log loads a library of the same name.
    let mut cluster = Cluster::start(1, &[]).unwrap();
    cluster.wait_leader();
    let new = "#!lua name=lib\nredis.register_function('which', function() return 'the log' end)";
    let _: String = cluster.nodes[0].cmd(&["FUNCTION", "LOAD", new]).unwrap();
    std::fs::copy(&dump, cluster.nodes[0].dir.join("dump.rdb")).unwrap();
    cluster.nodes[0].restart().unwrap();
    cluster.wait_leader();
    assert_eq!(cluster.nodes[0].cmd::<String>(&["FCALL", "which", "0"]).unwrap(), "the log");
}
