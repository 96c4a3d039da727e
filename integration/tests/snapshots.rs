//! Snapshots, log compaction, and catch-up from a snapshot, with real redis-server processes.

use raftis_integration::{
    digest, field_in, free_port_pair, info_field, info_field_of_live, info_text, raft_stats, stat_field, wait_for, Cluster, Server,
};
use redis::Value;
use std::time::Duration;

/// Small thresholds so a few thousand writes produce several snapshots.
const SNAPSHOTTING: &[&str] = &["snapshot-threshold=5000", "trailing-logs=500", "consistency=low"];

/// `n` writes in pipelined batches, every one acknowledged.
fn write_many(server: &Server, prefix: &str, n: usize) {
    let mut conn = server.client().unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            match i % 4 {
                0 => pipe.cmd("SET").arg(format!("{prefix}:s{i}")).arg(i).ignore(),
                1 => pipe.cmd("HSET").arg(format!("{prefix}:h{}", i % 100)).arg(i).arg(i).ignore(),
                2 => pipe.cmd("RPUSH").arg(format!("{prefix}:l{}", i % 10)).arg(i).ignore(),
                _ => pipe.cmd("SET").arg(format!("{prefix}:ttl{i}")).arg(i).arg("EX").arg(3600).ignore(),
            };
        }
        let () = pipe.query(&mut conn).unwrap();
    }
}

#[test]
fn many_writes_take_snapshots_compact_the_log_and_a_late_node_catches_up_from_one() {
    let cluster = Cluster::start(3, SNAPSHOTTING).unwrap();
    let leader = cluster.wait_leader();
    // A key in another database, with a deadline: the snapshot carries every database and
    // each key's expiry (the digests below cover both).
    let mut conn = cluster.nodes[leader].client().unwrap();
    let _: () = redis::cmd("SELECT").arg(2).query(&mut conn).unwrap();
    let _: () = redis::cmd("SET").arg("in-db-2").arg("yes").arg("EX").arg(3600).query(&mut conn).unwrap();
    drop(conn);
    write_many(&cluster.nodes[leader], "a", 50_000);
    cluster.assert_same_dataset(&[0, 1, 2]);
    // One snapshot per 5000 entries at most: a snapshot whose file is still being verified
    // and recorded must not look overdue and start another.
    for node in &cluster.nodes {
        wait_for("snapshots to finish", Duration::from_secs(20), || (info_text(node, "snapshot_in_progress") == "no").then_some(()));
        let started = info_field(node, "snapshots_started");
        assert!((1..=10).contains(&started), "node {}: {started} snapshots for 50000 entries", node.port);
    }
    for node in &cluster.nodes {
        let snap = wait_for("a snapshot", Duration::from_secs(20), || {
            let i = info_field(node, "snapshot_index");
            (i >= 40_000).then_some(i)
        });
        let entries = wait_for("the log to be compacted", Duration::from_secs(20), || {
            let e = info_field(node, "log_entries");
            (e < 6_000).then_some(e)
        });
        eprintln!("node {}: snapshot at {snap} ({} bytes), {entries} log entries left", node.port, info_field(node, "snapshot_size_bytes"));
    }
    // RAFT.SNAPSHOT on demand answers [index, size].
    let (index, size): (i64, i64) = cluster.nodes[leader].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    assert!(index > 50_000 && size > 0, "{index} {size}");

    // A fourth node joins long after the log was compacted: it must get a snapshot.
    let fourth = Server::start(free_port_pair(), &cluster.root.path().join("n3"), SNAPSHOTTING).unwrap();
    let reply: String = fourth.cmd(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap();
    assert_eq!(reply, "OK");
    assert_eq!(stat_field(&fourth, "snapshots_fetched"), 1, "the new node caught up from a snapshot:\n{}", fourth.log_tail());
    let commit = info_field_of_live(&cluster.nodes[leader], "commit_index");
    wait_for("the fourth node to apply", Duration::from_secs(20), || (info_field(&fourth, "applied_index") >= commit).then_some(()));
    assert_eq!(digest(&fourth), digest(&cluster.nodes[leader]));
    let deadline_on = |server: &Server| -> i64 {
        let mut conn = server.client().unwrap();
        let _: () = redis::cmd("SELECT").arg(2).query(&mut conn).unwrap();
        redis::cmd("PEXPIRETIME").arg("in-db-2").query(&mut conn).unwrap()
    };
    let deadline = deadline_on(&cluster.nodes[leader]);
    assert!(deadline > 0, "{deadline}");
    assert_eq!(deadline_on(&fourth), deadline, "the snapshot keeps each key's deadline to the millisecond");
}

#[test]
fn a_node_down_during_20000_writes_catches_up_and_restart_from_snapshot_keeps_the_dataset() {
    let mut cluster = Cluster::start(3, SNAPSHOTTING).unwrap();
    let leader = cluster.wait_leader();
    let down = (leader + 1) % 3;
    write_many(&cluster.nodes[leader], "before", 2_000);
    cluster.nodes[down].kill9();
    write_many(&cluster.nodes[leader], "during", 20_000);
    cluster.nodes[down].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);

    // Every node restarts from its newest snapshot plus the log after it.
    let before = digest(&cluster.nodes[leader]);
    for n in cluster.nodes.iter_mut() {
        n.kill9();
    }
    for n in cluster.nodes.iter_mut() {
        n.restart().unwrap();
    }
    cluster.wait_leader();
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert_eq!(digest(&cluster.nodes[0]), before, "same dataset after restarting from snapshots");
    let log = std::fs::read_to_string(cluster.nodes[0].dir.join("redis.log")).unwrap();
    assert!(log.contains("loaded snapshot"), "restart used the snapshot:\n{}", cluster.nodes[0].log_tail());
}

/// A node that was down while a member was removed learns of the removal inside the snapshot it
/// catches up from, not as an entry it applies: it must stop dialing that member all the same.
#[test]
fn a_node_that_catches_up_from_a_snapshot_stops_dialing_a_member_removed_meanwhile() {
    let mut cluster = Cluster::start(4, &["trailing-logs=10"]).unwrap();
    let leader = cluster.wait_leader();
    // Four voters: with one down and one removed, the other two still make a majority.
    let (down, removed) = ((leader + 1) % 4, (leader + 2) % 4);
    let _: () = cluster.nodes[leader].cmd(&["SET", "before", "1"]).unwrap();
    cluster.wait_converged(&[0, 1, 2, 3]);
    let dials = format!("peer_{}_sent", cluster.nodes[removed].node_id());
    assert!(raft_stats(&cluster.nodes[down]).contains(&dials), "the node dials every member");
    cluster.kill_behind(down);
    let removed_id = cluster.nodes[removed].node_id().to_string();
    let _: String = cluster.nodes[leader].cmd(&["RAFT.REMOVEPEER", &removed_id]).unwrap();
    write_many(&cluster.nodes[leader], "after", 100);
    let _: Value = cluster.nodes[leader].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    wait_for("the leader's log to be compacted past the removal", Duration::from_secs(10), || {
        (info_field(&cluster.nodes[leader], "first_log_index") > 20).then_some(())
    });
    cluster.nodes[down].restart().unwrap();
    let node = &cluster.nodes[down];
    wait_for("the node to catch up from the snapshot", Duration::from_secs(20), || {
        (stat_field(node, "snapshots_fetched") >= 1).then_some(())
    });
    wait_for("the node to stop dialing the removed member", Duration::from_secs(10), || (!raft_stats(node).contains(&dials)).then_some(()));
}

/// A node restarted beside a dump file restores its own snapshot only once Redis has loaded the
/// file. A leader that meanwhile sends it a newer snapshot (the node lagged behind a compaction)
/// makes it delete the older file: the node loads the newer one, instead of stopping over the
/// older one's missing file.
#[test]
fn a_snapshot_replaced_while_redis_loads_a_dump_file_is_not_missed() {
    let root = tempfile::tempdir().unwrap();
    let plain = Server::start_plain(free_port_pair(), &root.path().join("plain")).unwrap();
    let _: () = plain.cmd(&["DEBUG", "POPULATE", "20000", "dumped"]).unwrap();
    let _: () = plain.cmd(&["SAVE"]).unwrap();

    let mut cluster = Cluster::start(3, &["trailing-logs=10"]).unwrap();
    let leader = cluster.wait_leader();
    let lagging = (leader + 1) % 3;
    write_many(&cluster.nodes[leader], "first", 100);
    cluster.wait_converged(&[0, 1, 2]);
    let _: Value = cluster.nodes[lagging].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    cluster.kill_behind(lagging);
    write_many(&cluster.nodes[leader], "second", 100);
    let _: Value = cluster.nodes[leader].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    let first = info_field_of_live(&cluster.nodes[leader], "commit_index") - 20;
    wait_for("the leader's log to be compacted", Duration::from_secs(10), || {
        (info_field(&cluster.nodes[leader], "first_log_index") > first).then_some(())
    });

    let target = info_field_of_live(&cluster.nodes[leader], "commit_index");
    let node = &mut cluster.nodes[lagging];
    std::fs::copy(root.path().join("plain/dump.rdb"), node.dir.join("dump.rdb")).unwrap();
    // Redis takes its time over each key of the file (some 5 s in all; the node must answer
    // PING within 15 s of its start): the newer snapshot arrives meanwhile.
    node.redis_args = vec!["--key-load-delay".into(), "200".into()];
    node.restart().unwrap();
    let node = &cluster.nodes[lagging];
    wait_for("the node to catch up", Duration::from_secs(60), || (info_field(node, "applied_index") >= target).then_some(()));
    assert_ne!(node.state(), "stopped", "{}", info_text(node, "fatal_error"));
    assert_eq!(stat_field(node, "snapshots_fetched"), 1, "the node caught up from a snapshot, not from entries sent before the kill");
    let log = node.log();
    assert!(log.contains("is not loaded: a newer one replaces it"), "the newer snapshot came while Redis loaded:\n{log}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A relative `dir=` is resolved at load: `CONFIG SET dir` (allowed with
/// `enable-protected-configs`) later moves Redis' working directory, and snapshots are still
/// written (and found) where the log is.
#[test]
fn a_relative_dir_stays_where_it_was_when_redis_changes_directory() {
    let root = tempfile::tempdir().unwrap();
    let protected_configs = ["--enable-protected-configs", "yes"];
    let node = Server::start_with_redis_args(free_port_pair(), &root.path().join("n"), &protected_configs, &["dir=rel"]).unwrap();
    let _: String = node.cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    wait_for("the node to lead", Duration::from_secs(10), || (node.state() == "leader").then_some(()));
    let raft_dir = root.path().join("n").join("rel").canonicalize().unwrap();
    let shown: Vec<String> = node.cmd(&["RAFT.CONFIG", "GET", "dir"]).unwrap();
    assert_eq!(shown[1], raft_dir.display().to_string());
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let _: () = node.cmd(&["CONFIG", "SET", "dir", &elsewhere.display().to_string()]).unwrap();
    let _: () = node.cmd(&["SET", "k", "v"]).unwrap();
    let _: Value = node.cmd(&["RAFT.SNAPSHOT"]).unwrap();
    let in_dir = |dir: &std::path::Path| {
        std::fs::read_dir(dir).map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "rsnap"))).unwrap_or(false)
    };
    assert!(in_dir(&raft_dir), "no snapshot in {}", raft_dir.display());
    assert!(!in_dir(&elsewhere.join("rel")));
}

#[test]
fn a_corrupted_snapshot_file_is_refused_with_a_clear_message() {
    let mut cluster = Cluster::start(1, &["snapshot-threshold=0"]).unwrap();
    write_many(&cluster.nodes[0], "x", 1_000);
    let (_, size): (i64, i64) = cluster.nodes[0].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    assert!(size > 0);
    cluster.nodes[0].kill9();
    let raft_dir = cluster.nodes[0].dir.join("raft");
    let file = std::fs::read_dir(&raft_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "rsnap"))
        .expect("a snapshot file");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&file, bytes).unwrap();
    let err = cluster.nodes[0].restart().expect_err("a node with a corrupt snapshot must not start");
    let text = format!("{err:#}");
    assert!(text.contains("refusing to start with bad data"), "{text}");
}

#[test]
fn a_failed_snapshot_is_reported_and_the_next_one_succeeds() {
    let cluster = Cluster::start(1, &["snapshot-threshold=0"]).unwrap();
    let node = &cluster.nodes[0];
    assert_eq!(info_text(node, "last_snapshot_status"), "none");
    assert_eq!(info_text(node, "last_snapshot_duration_ms"), "-1");
    write_many(node, "f", 1_000);
    // A single node proposes nothing by itself: the next snapshot is at the applied index now. A
    // directory where the child must create its file makes it fail, as a full disk would.
    let (index, term) = (info_field(node, "applied_index"), info_field(node, "term"));
    let raft_dir = node.dir.join("raft");
    let in_the_way = raft_dir.join(format!("snapshot-{index:020}-{term}.rsnap.tmp"));
    std::fs::create_dir(&in_the_way).unwrap();
    let err = node.cmd::<Value>(&["RAFT.SNAPSHOT"]).expect_err("the snapshot cannot be written");
    assert!(err.to_string().contains("snapshot failed"), "{err}");
    assert_eq!(info_text(node, "last_snapshot_status"), "failed");
    assert_eq!(info_field(node, "snapshots_failed"), 1);
    assert_eq!(info_field(node, "snapshot_index"), 0);

    std::fs::remove_dir(&in_the_way).unwrap();
    let (at, size): (i64, i64) = node.cmd(&["RAFT.SNAPSHOT"]).unwrap();
    assert_eq!((at as u64, size > 0), (index, true));
    assert_eq!(info_text(node, "last_snapshot_status"), "ok");
    assert_eq!(info_field(node, "snapshots_failed"), 1);
    let took: i64 = info_text(node, "last_snapshot_duration_ms").parse().unwrap();
    assert!(took >= 0, "{took}");
}

#[test]
fn a_node_killed_while_its_snapshot_child_writes_restarts_at_once() {
    let mut cluster = Cluster::start(1, &["snapshot-threshold=0"]).unwrap();
    // Enough keys for the child to take about a second.
    let keys = 500_000;
    let mut conn = cluster.nodes[0].client().unwrap();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(10_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET").arg(format!("k{i}")).arg(i).ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
    drop(conn);
    let port = cluster.nodes[0].port;
    // RAFT.SNAPSHOT blocks its caller until the snapshot is recorded: asked from a thread whose
    // connection the kill below breaks.
    let asking = std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let _ = client.get_connection().and_then(|mut c| redis::cmd("RAFT.SNAPSHOT").query::<Value>(&mut c));
    });
    let log = cluster.nodes[0].dir.join("redis.log");
    let child = wait_for("the snapshot child", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let pid = text.lines().rev().find_map(|l| l.split("started (child pid ").nth(1)?.strip_suffix(')')?.parse::<u32>().ok())?;
        Some(pid)
    });
    let child_proc = std::path::PathBuf::from(format!("/proc/{child}"));
    cluster.nodes[0].kill9();
    assert!(child_proc.exists(), "the child finished before its server was killed: nothing tested");
    // Its ports are free at once, not when the orphaned child is done: it holds no socket.
    cluster.nodes[0]
        .restart()
        .unwrap_or_else(|e| panic!("restart while the old child still writes: {e:#}\n{}", cluster.nodes[0].log_tail()));
    asking.join().unwrap();
    cluster.wait_leader();
    // Every key, plus the harness' own probe key.
    let n: i64 = cluster.nodes[0].cmd(&["DBSIZE"]).unwrap();
    assert_eq!(n, keys as i64 + 1);
    let last: String = cluster.nodes[0].cmd(&["GET", &format!("k{}", keys - 1)]).unwrap();
    assert_eq!(last, (keys - 1).to_string());
}

/// A snapshot child killed by a signal (the OOM killer, say) cannot remove its half-written
/// file: the server does, or that much disk would stay taken until the next start.
#[test]
fn a_killed_snapshot_child_leaves_no_file_behind() {
    let cluster = Cluster::start(1, &["snapshot-threshold=0"]).unwrap();
    let node = &cluster.nodes[0];
    write_many(node, "k", 300_000);
    let port = node.port;
    let asking = std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        client.get_connection().and_then(|mut c| redis::cmd("RAFT.SNAPSHOT").query::<Value>(&mut c))
    });
    let log = node.dir.join("redis.log");
    let child = wait_for("the snapshot child", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().rev().find_map(|l| l.split("started (child pid ").nth(1)?.strip_suffix(')')?.parse::<i32>().ok())
    });
    let tmp_files = || {
        std::fs::read_dir(node.dir.join("raft")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count()
    };
    wait_for("the child to create its file", Duration::from_secs(10), || (tmp_files() == 1).then_some(()));
    assert_eq!(unsafe { libc::kill(child, libc::SIGKILL) }, 0, "the child finished before it was killed: nothing tested");
    let err = asking.join().unwrap().expect_err("the snapshot failed");
    assert!(err.to_string().contains("snapshot failed"), "{err}");
    assert_eq!(tmp_files(), 0, "the killed child's file was removed");
    let (_, size): (i64, i64) = node.cmd(&["RAFT.SNAPSHOT"]).unwrap();
    assert!(size > 0, "the next one succeeds");
}

/// A RAFT.SNAPSHOT that arrives while the last snapshot's file is being verified and recorded
/// waits for it instead of forking a second child, which would race its publication.
#[test]
fn a_snapshot_asked_for_while_the_last_one_is_published_waits_for_it() {
    let cluster = Cluster::start(1, &["snapshot-threshold=0"]).unwrap();
    let node = &cluster.nodes[0];
    // Large enough that verifying the file takes a while: ~60 MB of values DUMP cannot compress.
    let mut conn = node.client().unwrap();
    for chunk in (0..150_000).collect::<Vec<_>>().chunks(2000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let value: String = (0..12).map(|_| format!("{:032x}", rand::random::<u128>())).collect();
            pipe.cmd("SET").arg(format!("key:{i}")).arg(value).ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }
    let first = {
        let mut conn = node.client().unwrap();
        std::thread::spawn(move || redis::cmd("RAFT.SNAPSHOT").query::<(i64, i64)>(&mut conn).unwrap())
    };
    wait_for("the snapshot to be published", Duration::from_secs(60), || {
        let info: String = redis::cmd("RAFT.INFO").query(&mut conn).unwrap();
        (field_in(&info, "snapshot_phase") == Some("publishing")).then_some(())
    });
    let second: (i64, i64) = redis::cmd("RAFT.SNAPSHOT").query(&mut conn).unwrap();
    let first = first.join().unwrap();
    assert_eq!(second, first, "nothing was applied in between: the same snapshot answers both");
    assert_eq!(info_field(node, "snapshots_started"), 1, "one child, not a second racing the first");
    assert_eq!(info_text(node, "snapshot_phase"), "none");

    // A node joining now downloads a snapshot (the leader takes a new one that includes the
    // joiner as a learner), and RAFT.INFO shows the download while it runs.
    let joiner = Server::start(free_port_pair(), &cluster.root.path().join("joiner"), &["snapshot-threshold=0"]).unwrap();
    let join = {
        let (mut joiner_conn, leader) = (joiner.client().unwrap(), node.addr());
        std::thread::spawn(move || redis::cmd("RAFT.CLUSTER").arg("JOIN").arg(leader).query::<String>(&mut joiner_conn))
    };
    let mut watch = joiner.client().unwrap();
    let seen = wait_for("the download to show in RAFT.INFO", Duration::from_secs(60), || {
        let info: String = redis::cmd("RAFT.INFO").query(&mut watch).unwrap();
        (field_in(&info, "snapshot_fetch_in_progress")? == "yes").then(|| {
            let number = |name: &str| field_in(&info, name).and_then(|v| v.parse::<u64>().ok()).unwrap();
            let file = field_in(&info, "snapshot_fetch_file").unwrap().to_string();
            (file, number("snapshot_fetch_from"), number("snapshot_fetch_received_bytes"), number("snapshot_fetch_size_bytes"))
        })
    });
    assert_eq!(join.join().unwrap().unwrap(), "OK");
    let size = info_field(node, "snapshot_size_bytes");
    let (file, from, received, fetch_size) = seen;
    assert!(file.ends_with(".rsnap"), "{file}");
    assert_eq!((from, fetch_size), (node.node_id(), size), "the leader's snapshot, from the leader");
    assert!(received <= size);
    assert_eq!(info_text(&joiner, "snapshot_fetch_in_progress"), "no");
    assert_eq!(stat_field(&joiner, "snapshots_fetched"), 1);
    assert_eq!(stat_field(&joiner, "snapshot_fetch_failures"), 0);
    assert_eq!(stat_field(&joiner, "snapshot_bytes_fetched"), size, "every byte fetched once");
    assert_eq!(info_field(&joiner, "snapshot_size_bytes"), size, "the joiner loaded it");
}

/// Large values reach `snapshot-log-size` long before `snapshot-threshold` entries: the log is
/// snapshotted by bytes, and the tail kept behind a snapshot is bounded by bytes too (the default
/// `trailing-logs` of 5000 entries would keep all of these).
#[test]
fn large_values_snapshot_by_log_size_and_bound_the_kept_tail() {
    let cluster = Cluster::start(3, &["snapshot-log-size=1mb", "consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let value = "x".repeat(64 * 1024);
    let write_values = |prefix: &str| {
        let mut conn = cluster.nodes[leader].client().unwrap();
        let mut pipe = redis::pipe();
        for i in 0..64 {
            pipe.cmd("SET").arg(format!("{prefix}{i}")).arg(&value).ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    };
    write_values("big:");
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        wait_for("a snapshot taken by size", Duration::from_secs(20), || {
            (info_field(node, "snapshot_index") > 0 && info_text(node, "snapshot_in_progress") == "no").then_some(())
        });
        // About 4 MiB written: at most 1 MiB kept behind the last snapshot, less than 1 MiB after.
        let entries = wait_for("the log to be compacted by size", Duration::from_secs(20), || {
            let e = info_field(node, "log_entries");
            (e <= 40).then_some(e)
        });
        let since = info_field(node, "applied_bytes_since_snapshot");
        assert!(since < 1 << 20, "{since} bytes applied since the last snapshot, over the 1 MiB limit");
        eprintln!("node {}: {entries} log entries left, {since} bytes since the snapshot", node.port);
    }

    // 0 turns the size limit off (per node, at runtime): the entry threshold alone is far away.
    let leader_node = &cluster.nodes[leader];
    let bad = leader_node.cmd::<String>(&["RAFT.CONFIG", "SET", "snapshot-log-size", "lots"]).unwrap_err();
    assert!(bad.to_string().contains("512mb"), "{bad}");
    let ok: String = leader_node.cmd(&["RAFT.CONFIG", "SET", "snapshot-log-size", "0"]).unwrap();
    assert_eq!(ok, "OK");
    let got: Vec<String> = leader_node.cmd(&["RAFT.CONFIG", "GET", "snapshot-log-size"]).unwrap();
    assert_eq!(got, ["snapshot-log-size", "0"]);
    // One may have started before the limit went off (the last one's end starts the next at once
    // if the log outgrew the limit meanwhile): it counts as taken with the limit on.
    wait_for("no snapshot in progress", Duration::from_secs(20), || (info_text(leader_node, "snapshot_in_progress") == "no").then_some(()));
    let before = info_field_of_live(leader_node, "snapshot_index");
    write_values("more:");
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert_eq!(info_field(leader_node, "snapshot_index"), before, "a snapshot was taken with the size limit off");
    assert!(info_field(leader_node, "applied_bytes_since_snapshot") > 4 << 20);
}
