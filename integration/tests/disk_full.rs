//! A leader whose disk fills up stops serving and says why; the others elect a leader and go on
//! without it, and once there is room again it catches up. The small disk is a tmpfs, which takes root to mount: where
//! that is not possible the test says so and does nothing.

use raftis_integration::{field_in, free_port_pair, incompressible, info_field, info_text, wait_for, Cluster, Server};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A tmpfs of a few megabytes on a mount point of its own, unmounted (then the mount point
/// removed) when dropped.
struct SmallDisk {
    path: PathBuf,
    _mount_point: tempfile::TempDir,
}

impl SmallDisk {
    /// None, having said so, where a tmpfs cannot be mounted (it needs root).
    fn mount(megabytes: u64) -> Option<SmallDisk> {
        let mount_point = tempfile::Builder::new().prefix("raftis-small-disk-").tempdir().unwrap();
        let path = mount_point.path().to_path_buf();
        let size = format!("size={megabytes}m");
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(&path).output();
        if !mounted.is_ok_and(|m| m.status.success()) {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { path, _mount_point: mount_point })
    }

    /// Room again: the same files, a larger disk.
    fn grow(&self, megabytes: u64) {
        let options = format!("remount,size={megabytes}m");
        let status = Command::new("mount").args(["-o", &options]).arg(&self.path).status().unwrap();
        assert!(status.success(), "remounting {} larger", self.path.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_leader_whose_disk_fills_stops_with_a_clear_error_and_catches_up_once_there_is_room() {
    // Dropped in reverse: the cluster (its servers, then its data), then the disk.
    let Some(disk) = SmallDisk::mount(24) else { return };
    // consistency=low: each node would serve reads from its own dataset. Node 0, on the small
    // disk, starts the cluster and leads it.
    let args = ["consistency=low"];
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let nodes = vec![
        Server::start(free_port_pair(), &disk.path.join("n0"), &args).unwrap(),
        Server::start(free_port_pair(), &root.path().join("n1"), &args).unwrap(),
        Server::start(free_port_pair(), &root.path().join("n2"), &args).unwrap(),
    ];
    let mut cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();

    // 100 KB writes until the leader's disk is full: an acknowledged write is kept, and the
    // one in flight when it stopped is told so, its outcome unknown.
    let value = "v".repeat(100_000);
    let mut conn = cluster.nodes[0].client().unwrap();
    let mut acknowledged = Vec::new();
    let err = loop {
        let key = format!("k{}", acknowledged.len());
        match redis::cmd("SET").arg(&key).arg(&value).query::<()>(&mut conn) {
            Ok(()) => acknowledged.push(key),
            Err(e) => break e,
        }
        assert!(acknowledged.len() < 1000, "100 MB written to a 24 MB disk");
    };
    assert!(matches!(err.code(), Some("TIMEOUT" | "CLUSTERDOWN")) && err.to_string().contains("stopped serving"), "{err}");
    let in_flight = format!("k{}", acknowledged.len());

    // It says why, and answers nothing else (no stale reads, no -MOVED to itself).
    let node = &cluster.nodes[0];
    assert_eq!(node.state(), "stopped");
    let info: String = node.cmd(&["RAFT.INFO"]).unwrap();
    let why = field_in(&info, "fatal_error").unwrap_or_else(|| panic!("no fatal_error in\n{info}")).to_string();
    assert!(why.contains("bytes free on the disk holding"), "{why}");
    assert_eq!(field_in(&info, "role"), Some("stopped"));
    for command in [&["GET", "k0"][..], &["SET", "k0", "x"], &["RAFT.LEADER"]] {
        let err = node.cmd::<redis::Value>(command).unwrap_err();
        assert_eq!(err.code(), Some("CLUSTERDOWN"), "{command:?}: {err}");
        assert!(err.to_string().contains("stopped serving"), "{command:?}: {err}");
    }
    // The other two elect a leader and go on.
    let leader = wait_for("a new leader", Duration::from_secs(20), || (1..3).find(|i| cluster.nodes[*i].state() == "leader"));
    wait_for("writes on the new leader", Duration::from_secs(20), || cluster.nodes[leader].cmd::<()>(&["SET", "after", "1"]).ok());

    // Room again, and a restart: it catches up, and nothing acknowledged is missing anywhere.
    disk.grow(128);
    cluster.nodes[0].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    for node in &cluster.nodes {
        for key in acknowledged.iter().chain([&"after".to_string()]) {
            assert_eq!(node.cmd::<i64>(&["EXISTS", key]).unwrap(), 1, "{key} on {}", node.port);
        }
        // -CLUSTERDOWN promises the write did not take effect (-TIMEOUT leaves it open).
        if err.code() == Some("CLUSTERDOWN") {
            assert_eq!(node.cmd::<i64>(&["EXISTS", &in_flight]).unwrap(), 0, "{in_flight} on {}, answered {err}", node.port);
        }
    }
}

/// A snapshot without room for its file (about the last one's size) and for the log meanwhile is
/// not started: written, it would fill the disk the log needs, and the node would stop serving.
/// It counts as failed and is not tried again at every write: the node goes on serving, and tries
/// again a few seconds later.
#[test]
fn a_snapshot_that_fails_for_want_of_room_is_not_tried_again_at_every_write() {
    let Some(disk) = SmallDisk::mount(64) else { return };
    let node = Server::start(free_port_pair(), &disk.path.join("n0"), &[]).unwrap();
    let _: () = node.cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    wait_for("the node to lead", Duration::from_secs(10), || (node.state() == "leader").then_some(()));
    let mut seed = 7;
    for i in 0..60 {
        let _: () = node.cmd(&["SET", &format!("k{i}"), &incompressible(100_000, &mut seed)]).unwrap();
    }
    // Fill the disk, then give 2 MB back: room for small writes, not for a 6 MB snapshot.
    let filler: Vec<PathBuf> =
        (0..).map(|i| disk.path.join(format!("filler{i}"))).take_while(|f| std::fs::write(f, vec![0u8; 1 << 20]).is_ok()).collect();
    for f in filler.iter().rev().take(3) {
        std::fs::remove_file(f).unwrap();
    }

    let started = |node: &Server| info_field(node, "snapshots_started");
    let status = |node: &Server| info_text(node, "last_snapshot_status");
    let before = started(&node);
    let _: () = node.cmd(&["RAFT.CONFIG", "SET", "snapshot-threshold", "1"]).unwrap();
    let _: () = node.cmd(&["SET", "first", "1"]).unwrap();
    wait_for("the snapshot to fail", Duration::from_secs(10), || (status(&node) == "failed").then_some(()));
    assert_eq!(started(&node), before + 1);
    assert!(node.log().contains("not started: no room for a snapshot"), "{}", node.log_tail());
    for i in 0..30 {
        let _: () = node.cmd(&["SET", &format!("small{i}"), "1"]).unwrap();
    }
    assert_eq!(started(&node), before + 1, "no snapshot tried again right after one failed");
    assert_eq!(node.state(), "leader");

    // With room again, a later write brings the next try, which succeeds.
    for f in &filler {
        let _ = std::fs::remove_file(f);
    }
    wait_for("a snapshot to succeed", Duration::from_secs(20), || {
        let _: () = node.cmd(&["SET", "tick", "1"]).unwrap();
        (status(&node) == "ok").then_some(())
    });
}

/// A node that must catch up from a snapshot too large for the room its disk has left does not
/// start the download: filling the disk, it would fail at the end and leave the log no room, and
/// its half-file would keep that room taken. It goes on as a follower, and fetches the snapshot
/// once there is room.
#[test]
fn a_snapshot_download_without_room_is_not_started() {
    let Some(disk) = SmallDisk::mount(64) else { return };
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let args = ["trailing-logs=10"];
    let nodes = vec![
        Server::start(free_port_pair(), &root.path().join("n0"), &args).unwrap(),
        Server::start(free_port_pair(), &root.path().join("n1"), &args).unwrap(),
        Server::start(free_port_pair(), &disk.path.join("n2"), &args).unwrap(),
    ];
    let mut cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();
    cluster.kill_behind(2);
    let mut seed = 11;
    for i in 0..100 {
        let _: () = cluster.nodes[0].cmd(&["SET", &format!("k{i}"), &incompressible(100_000, &mut seed)]).unwrap();
    }
    let _: redis::Value = cluster.nodes[0].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    wait_for("the leader's log to be compacted", Duration::from_secs(10), || {
        (info_field(&cluster.nodes[0], "first_log_index") > 50).then_some(())
    });
    // Room for the node's own small log, not for a 10 MB snapshot.
    let filler: Vec<PathBuf> =
        (0..).map(|i| disk.path.join(format!("filler{i}"))).take_while(|f| std::fs::write(f, vec![0u8; 1 << 20]).is_ok()).collect();
    for f in filler.iter().rev().take(4) {
        std::fs::remove_file(f).unwrap();
    }

    cluster.nodes[2].restart().unwrap();
    let node = &cluster.nodes[2];
    wait_for("the download to be refused", Duration::from_secs(20), || node.log().contains("no room to fetch snapshot").then_some(()));
    assert_eq!(node.state(), "follower", "{}", info_text(node, "fatal_error"));
    let parts =
        std::fs::read_dir(node.dir.join("raft")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".part")).count();
    assert_eq!(parts, 0, "nothing downloaded");

    let target = raftis_integration::info_field_of_live(&cluster.nodes[0], "commit_index");
    for f in &filler {
        let _ = std::fs::remove_file(f);
    }
    wait_for("the node to catch up", Duration::from_secs(60), || (info_field(&cluster.nodes[2], "applied_index") >= target).then_some(()));
    cluster.assert_same_dataset(&[0, 1, 2]);
}
