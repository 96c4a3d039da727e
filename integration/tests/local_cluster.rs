//! `scripts/cluster`, the README's first command: it starts three nodes and forms a cluster that
//! takes writes, `stop` keeps the data for the next `start`, and `clean` removes everything. Run on
//! free ports (`RAFTIS_CLUSTER_PORTS`) and in a temporary directory, so it never meets a cluster a
//! developer runs on 7001-7003.

use raftis_integration::{free_port_pair, wait_for, workspace};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The script, run with this test's ports and directory; `clean` when dropped, whatever happened.
struct LocalCluster {
    ports: Vec<u16>,
    dir: PathBuf,
}

impl LocalCluster {
    /// Runs `scripts/cluster <action>`; panics with its output unless it succeeds. Its stdout.
    fn run(&self, action: &str) -> String {
        let out = self.command(action).output().expect("scripts/cluster runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "scripts/cluster {action}: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        stdout
    }

    fn command(&self, action: &str) -> Command {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let mut command = Command::new(workspace().join("scripts/cluster"));
        command.arg(action).env("RAFTIS_CLUSTER_DIR", &self.dir).env("RAFTIS_CLUSTER_PORTS", ports.join(" "));
        command
    }

    /// The role `status` gives each port, in port order.
    fn roles(&self) -> Vec<String> {
        let status = self.run("status");
        self.ports
            .iter()
            .map(|p| {
                let line = status
                    .lines()
                    .find(|l| l.starts_with(&format!("127.0.0.1:{p} ")))
                    .unwrap_or_else(|| panic!("no line for {p}:\n{status}"));
                line.split_whitespace().nth(1).unwrap_or_default().to_string()
            })
            .collect()
    }

    /// The port of the node `status` names leader, once there is one with two followers.
    fn wait_leader(&self) -> u16 {
        wait_for("one leader and two followers", Duration::from_secs(20), || {
            let roles = self.roles();
            let followers = roles.iter().filter(|r| *r == "follower").count();
            let leader = roles.iter().position(|r| r == "leader")?;
            (followers == 2).then_some(self.ports[leader])
        })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.command("clean").output();
    }
}

fn connect(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap()
}

fn serving(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_cluster_script_starts_a_cluster_that_keeps_its_data_across_stop_and_start() {
    let root = tempfile::tempdir().unwrap();
    let cluster = LocalCluster { ports: (0..3).map(|_| free_port_pair()).collect(), dir: root.path().join("cluster") };

    let started = cluster.run("start");
    let leader = cluster.wait_leader();
    assert!(started.contains("Raftis is running"), "{started}");
    assert!(started.contains(&format!("redis-cli -h 127.0.0.1 -p {leader}")), "it names the leader ({leader}):\n{started}");

    let _: () = redis::cmd("SET").arg("greeting").arg("hello").query(&mut connect(leader)).unwrap();
    let follower = *cluster.ports.iter().find(|p| **p != leader).unwrap();
    let moved = redis::cmd("SET").arg("greeting").arg("bye").query::<()>(&mut connect(follower)).unwrap_err();
    let slot = redis::cluster_routing::get_slot(b"greeting");
    let leader_addr = format!("127.0.0.1:{leader}");
    assert_eq!(moved.redirect_node(), Some((leader_addr.as_str(), slot)), "a follower redirects to the leader: {moved}");

    // `stop` waits for every node to exit.
    cluster.run("stop");
    for port in &cluster.ports {
        assert!(!serving(*port), "port {port} still serves after stop");
    }
    assert!(cluster.roles().iter().all(|r| r == "down"));
    assert!(dir_has_nodes(&cluster.dir, &cluster.ports), "stop keeps the data");

    // Started again, the same cluster elects a leader that has the write.
    cluster.run("start");
    let leader = cluster.wait_leader();
    let value: String = redis::cmd("GET").arg("greeting").query(&mut connect(leader)).unwrap();
    assert_eq!(value, "hello");

    // A node lost with its data is rebuilt by `start`: it joins again as an empty node.
    let lost = *cluster.ports.iter().find(|p| **p != leader).unwrap();
    kill_hard(&cluster.dir, lost);
    std::fs::remove_dir_all(cluster.dir.join(lost.to_string()).join("raft")).unwrap();
    let restarted = cluster.run("start");
    assert!(restarted.contains(&format!("127.0.0.1:{lost} joins the cluster")), "{restarted}");
    cluster.wait_leader();

    // A server killed with -9 leaves its pidfile; `clean` leaves whatever has that pid now alone.
    kill_hard(&cluster.dir, lost);
    let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(cluster.dir.join(lost.to_string()).join("redis.pid"), stranger.id().to_string()).unwrap();
    cluster.run("clean");
    assert!(stranger.try_wait().unwrap().is_none(), "clean killed a process that was not one of its servers");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    for port in &cluster.ports {
        assert!(!serving(*port), "port {port} still serves after clean");
    }
    assert!(!cluster.dir.exists(), "clean deletes the data");
}

/// Whether `dir` holds each node's data directory.
fn dir_has_nodes(dir: &Path, ports: &[u16]) -> bool {
    ports.iter().all(|p| dir.join(p.to_string()).join("raft").is_dir())
}

/// Kills the node on `port` with SIGKILL, as a crash would, and waits until its port is closed.
fn kill_hard(dir: &Path, port: u16) {
    let pid = std::fs::read_to_string(dir.join(port.to_string()).join("redis.pid")).unwrap();
    let status = Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    assert!(status.success());
    wait_for("the port to close after kill -9", Duration::from_secs(10), || (!serving(port)).then_some(()));
}
