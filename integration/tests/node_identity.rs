//! A node is its raft dir: the dir holds its id and its log. A copy of that dir started as a
//! second server (a cloned VM, a backup restored beside the original) must neither take the
//! node's place while the node runs nor rejoin with a log that went back in time; each case is
//! refused with an error that says what happened and what to do.

use raftis_integration::{digest, free_port_pair, info_field, info_text, wait_for, Cluster, Server};
use std::path::Path;
use std::time::Duration;

/// A copy of a stopped server's dir, without its Redis log.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "redis.log" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A 3-node cluster holding `n` keys named `prefix-i`, and its leader's index.
fn cluster_holding(prefix: &str, n: usize) -> (Cluster, usize) {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    for i in 0..n {
        let _: () = cluster.nodes[leader].cmd(&["SET", &format!("{prefix}-{i}"), "1"]).unwrap();
    }
    (cluster, leader)
}

fn raft_info(server: &Server) -> String {
    server.quick_cmd::<String>(&["RAFT.INFO"]).unwrap_or_default()
}

#[test]
fn a_copy_of_a_nodes_dir_is_refused_while_the_node_runs_and_stops_with_why_once_it_is_behind() {
    let (mut cluster, leader) = cluster_holding("before", 20);
    let original = (leader + 1) % 3;
    cluster.wait_converged(&[0, 1, 2]);
    let id = cluster.nodes[original].node_id();

    // The follower stops, its dir is copied, and both the follower and the copy start.
    cluster.nodes[original].kill9();
    let copy_dir_path = cluster.nodes[original].dir.with_extension("copy");
    copy_dir(&cluster.nodes[original].dir, &copy_dir_path);
    cluster.nodes[original].restart().unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    let mut copy = Server::start(free_port_pair(), &copy_dir_path, &[]).unwrap();

    // The copy is refused by the leader, which keeps the original in its place.
    let refused = format!("another server is already node {id} here");
    wait_for("the copy to be refused", Duration::from_secs(20), || raft_info(&copy).contains(&refused).then_some(()));
    assert!(cluster.nodes[leader].log().contains(&refused), "the leader's log says it too");
    for i in 0..20 {
        let _: () = cluster.nodes[leader].cmd(&["SET", &format!("after-{i}"), "1"]).unwrap();
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    let nodes: String = cluster.nodes[leader].cmd(&["CLUSTER", "NODES"]).unwrap();
    let original_port = cluster.nodes[original].port;
    assert!(nodes.contains(&format!(":{original_port}@")), "{nodes}");
    assert!(!nodes.contains(&format!(":{}@", copy.port)), "{nodes}");

    // The original goes for good: the copy is let in, but its log misses entries that node id
    // acknowledged since the copy was made, so it stops and says what to do.
    cluster.nodes[original].kill9();
    let why = wait_for("the copy to stop", Duration::from_secs(20), || {
        let info = raft_info(&copy);
        info.contains("role:stopped").then_some(info)
    });
    assert!(why.contains("entries it acknowledged are gone"), "{why}");
    assert!(why.contains(&format!("RAFT.REMOVEPEER {id}")), "{why}");
    let err = copy.cmd::<String>(&["GET", "before-1"]).unwrap_err();
    assert_eq!(err.kind(), redis::ErrorKind::ClusterDown, "{err}");
    assert!(err.to_string().contains("entries it acknowledged are gone"), "{err}");
    assert!(!copy.log().contains("panic"), "{}", copy.log_tail());

    // What it says works: removed, emptied and joined again, it catches up.
    let _: () = cluster.nodes[leader].cmd(&["RAFT.REMOVEPEER", &id.to_string()]).unwrap();
    copy.restart_empty().unwrap();
    let joined: String = copy.cmd(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap();
    assert_eq!(joined, "OK");
    let expected = digest(&cluster.nodes[leader]);
    wait_for("the rejoined copy to catch up", Duration::from_secs(20), || (digest(&copy) == expected).then_some(()));
    assert_ne!(copy.node_id(), id, "it is a new member");
}

#[test]
fn a_node_made_into_a_new_cluster_is_not_taken_over_by_the_old_clusters_nodes() {
    let (mut cluster, _) = cluster_holding("old", 10);
    cluster.wait_converged(&[0, 1, 2]);
    let old_id = info_text(&cluster.nodes[0], "cluster_id");
    assert_eq!(old_id.len(), 16, "{old_id}");
    for n in &cluster.nodes[1..] {
        assert_eq!(info_text(n, "cluster_id"), old_id, "the nodes that joined took it");
    }

    // The node that made the cluster (node id 1, as every INIT makes) is wiped and made into a
    // new cluster at the same address, while the other two go on as the old one.
    cluster.nodes[0].restart_empty().unwrap();
    let init: String = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(init, "OK");
    let fresh = &cluster.nodes[0];
    wait_for("the new cluster's leader", Duration::from_secs(10), || (fresh.state() == "leader").then_some(()));
    let _: () = wait_for("a write to the new cluster", Duration::from_secs(10), || fresh.cmd(&["SET", "new", "1"]).ok());
    let new_id = info_text(fresh, "cluster_id");
    assert!(new_id.len() == 16 && new_id != old_id, "{new_id} {old_id}");

    // The old cluster elects a leader, which goes on sending to node 1's address: refused.
    let old_leader =
        wait_for("the old cluster's leader", Duration::from_secs(20), || (1..3).find(|i| cluster.nodes[*i].state() == "leader"));
    let old = &cluster.nodes[old_leader];
    let refusal = format!("node {} belongs to another cluster", old.node_id());
    let said = wait_for("the old leader to be refused", Duration::from_secs(20), || {
        let info: String = old.quick_cmd(&["RAFT.INFO"]).ok()?;
        info.lines().find(|l| l.contains("last_error") && l.contains("another cluster")).map(str::to_string)
    });
    assert!(said.contains(&refusal) && said.contains(&format!("this node's is {new_id}")), "{said}");
    assert!(fresh.log().contains("belongs to another cluster"), "{}", fresh.log_tail());

    // The new cluster is untouched: still its own leader, in its first terms, with its own data.
    assert_eq!(fresh.state(), "leader");
    assert!(info_field(fresh, "term") <= 2, "the old cluster's terms never reached it");
    assert_eq!(fresh.cmd::<Option<String>>(&["GET", "new"]).unwrap().as_deref(), Some("1"));
    assert_eq!(fresh.cmd::<Option<String>>(&["GET", "old-1"]).unwrap(), None);
}

#[test]
fn a_node_that_lost_its_dir_and_joins_again_takes_its_old_selfs_place() {
    let (mut cluster, leader) = cluster_holding("k", 10);
    let lost = (leader + 1) % 3;
    let old_id = cluster.nodes[lost].node_id();
    cluster.nodes[lost].restart_empty().unwrap();
    let joined: String = cluster.nodes[lost].cmd(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap();
    assert_eq!(joined, "OK");
    let new_id = cluster.nodes[lost].node_id();
    assert_ne!(new_id, old_id);

    let leader_node = &cluster.nodes[leader];
    assert_eq!(info_field(leader_node, "voters"), 3, "the old id is no voter any more");
    let nodes: String = leader_node.cmd(&["CLUSTER", "NODES"]).unwrap();
    let port = format!(":{}@", cluster.nodes[lost].port);
    assert_eq!(nodes.matches(&port).count(), 1, "{nodes}");
    assert!(leader_node.log().contains(&format!("where node {old_id} was: removing node {old_id}")), "{}", leader_node.log_tail());
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A new server configured with the node-id of a member that runs elsewhere is refused when it is
/// added, with what to do: RAFT.ADDPEER answered OK and did nothing, and it waited for ever (a
/// JOIN was refused already).
#[test]
fn a_server_given_a_running_members_node_id_is_refused_when_added() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let member = (leader + 1) % 3;
    let id = cluster.nodes[member].node_id().to_string();
    let twin = Server::start(free_port_pair(), &cluster.root.path().join("twin"), &[&format!("node-id={id}")]).unwrap();
    let err = cluster.nodes[leader].cmd::<String>(&["RAFT.ADDPEER", &twin.addr()]).unwrap_err().to_string();
    assert!(err.contains(&format!("node {id} is already a member")) && err.contains("give it another"), "{err}");
    let err = twin.cmd::<String>(&["RAFT.CLUSTER", "JOIN", &cluster.nodes[leader].addr()]).unwrap_err().to_string();
    assert!(err.contains(&format!("node id {id} is already used by the member")), "{err}");
    assert_eq!(info_field(&cluster.nodes[leader], "voters"), 3);
}

/// A restart with a `node-id=` other than the one its log belongs to (two nodes' dirs mixed up,
/// most likely) is refused, naming both ids, instead of running as the log's node under this
/// server's address. With the right id, or none, it starts.
#[test]
fn a_restart_with_a_node_id_other_than_its_logs_is_refused() {
    let mut cluster = Cluster::start(1, &[]).unwrap();
    let _: () = cluster.nodes[0].cmd(&["SET", "k", "v"]).unwrap();
    let id = cluster.nodes[0].node_id();
    let node = &mut cluster.nodes[0];
    node.extra.push(format!("node-id={}", id + 1));
    let err = node.restart().unwrap_err().to_string();
    assert!(err.contains(&format!("node-id={} but the raft log", id + 1)) && err.contains(&format!("belongs to node {id}")), "{err}");
    node.extra.pop();
    node.extra.push(format!("node-id={id}"));
    node.restart().unwrap();
    assert_eq!(node.node_id(), id);
    let value = wait_for("the node to serve again", Duration::from_secs(10), || node.cmd::<String>(&["GET", "k"]).ok());
    assert_eq!(value, "v");
}
