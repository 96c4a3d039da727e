//! A node whose disk fills up stops serving and says why; the others go on without it, and once
//! there is room again it catches up. The small disk is a tmpfs, which takes root to mount: where
//! that is not possible the test says so and does nothing.

use raftis_integration::{field_in, wait_for, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs of a few megabytes, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, megabytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).ok()?;
        let size = format!("size={megabytes}m");
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(path).output().ok()?;
        mounted.status.success().then(|| SmallDisk { path: path.to_path_buf() })
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
fn a_node_whose_disk_fills_stops_with_a_clear_error_and_catches_up_once_there_is_room() {
    // consistency=low: each node would serve reads from its own dataset.
    let mut cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let Some(disk) = SmallDisk::mount(&cluster.root.path().join("small-disk"), 24) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let leader = cluster.wait_leader();
    let victim = (leader + 1) % 3;

    // The victim, a follower, moves onto the small disk with everything it holds.
    let node = &mut cluster.nodes[victim];
    node.kill9();
    let moved = disk.path.join("node");
    let copied = Command::new("cp").arg("-a").arg(&node.dir).arg(&moved).status().unwrap();
    assert!(copied.success());
    node.dir = moved;
    node.restart().unwrap();

    // ~40 MB of writes, more than its disk holds: the other two are a majority and acknowledge
    // every one of them.
    let value = "v".repeat(100_000);
    let writes = 400;
    let mut conn = cluster.nodes[leader].client().unwrap();
    for i in 0..writes {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(&value).query(&mut conn).unwrap();
    }

    // The victim stopped, and every reply says why, at every consistency level (no stale reads
    // from a node that no longer follows the log, and no -MOVED to itself).
    let node = &cluster.nodes[victim];
    wait_for("the node with the full disk to stop", Duration::from_secs(20), || (node.state() == "stopped").then_some(()));
    let info: String = node.cmd(&["RAFT.INFO"]).unwrap();
    let why = field_in(&info, "fatal_error").unwrap_or_else(|| panic!("no fatal_error in\n{info}")).to_string();
    assert!(why.contains("bytes free on the disk holding"), "{why}");
    assert_eq!(field_in(&info, "role"), Some("stopped"));
    for command in [&["GET", "k0"][..], &["SET", "k0", "x"], &["RAFT.LEADER"]] {
        let err = node.cmd::<redis::Value>(command).unwrap_err();
        assert_eq!(err.code(), Some("CLUSTERDOWN"), "{command:?}: {err}");
        assert!(err.to_string().contains("stopped serving"), "{command:?}: {err}");
    }
    // The others go on.
    let _: () = redis::cmd("SET").arg("after").arg("1").query(&mut conn).unwrap();

    // Room again, and a restart: the node catches up, and nothing acknowledged is missing.
    disk.grow(96);
    cluster.nodes[victim].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
    let node = &cluster.nodes[victim];
    for i in [0, writes / 2, writes - 1] {
        assert_eq!(node.cmd::<String>(&["GET", &format!("k{i}")]).unwrap().len(), value.len(), "k{i}");
    }
    assert_eq!(node.cmd::<String>(&["GET", "after"]).unwrap(), "1");
}
