//! In-process clusters of real nodes: real LMDB directories, real loopback TCP side ports.
//! Conditions are polled with deadlines; no test sleeps to synchronise.

use raftis::command_entry::{self, EntryTime};
use raftis::config::{Durability, Timing};
use raftis::membership::{MembershipChange, NodeInfo};
use raftis::node::{ApplyBatch, Node, NodeConfig, StateMachine, CLAIM_LEAD};
use raftis::proposal::{Callback, ProposeError};
use raftis::status::Role;
use raftis::storage::LogStore;
use raftis::{LogIndex, NodeId, Term};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records every applied entry; completes the proposer's waiter with the entry's index.
struct Recorder {
    applied: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl StateMachine for Recorder {
    type Waiter = Callback<LogIndex>;

    fn apply(&mut self, batch: ApplyBatch<Self::Waiter>) {
        let mut applied = self.applied.lock().unwrap();
        for e in batch.entries {
            // A way to make one loop round slow on purpose.
            if let Some(ms) = e.data.strip_prefix(b"sleep-ms:").and_then(|ms| std::str::from_utf8(ms).ok()?.parse().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            applied.push(e.data);
            if let Some(w) = e.waiter {
                w(Ok(e.index));
            }
        }
    }

    fn restore(&mut self, _index: LogIndex, data: &[u8]) {
        assert!(data.is_empty(), "these tests never snapshot application data");
        self.applied.lock().unwrap().clear();
    }
}

struct TestNode {
    id: NodeId,
    dir: PathBuf,
    port: u16,
    node: Node<Recorder>,
    applied: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn fast_timing() -> Timing {
    Timing { tick_interval: Duration::from_millis(20), election_ticks: 10, heartbeat_ticks: 2 }
}

fn info(id: NodeId, port: u16) -> NodeInfo {
    NodeInfo { id, raft_addr: format!("127.0.0.1:{port}"), client_addr: format!("127.0.0.1:{}", port + 1) }
}

fn start(id: NodeId, dir: &Path, port: u16, bootstrap: bool, durability: Durability) -> TestNode {
    let _ = env_logger::builder().is_test(true).try_init();
    let store = LogStore::open(dir).unwrap();
    if bootstrap {
        Node::<Recorder>::bootstrap(&store, &info(id, port)).unwrap();
    }
    let applied = Arc::new(Mutex::new(Vec::new()));
    let node = Node::start(config(id, dir, port, durability), store, Recorder { applied: applied.clone() }).unwrap();
    TestNode { id, dir: dir.to_path_buf(), port, node, applied }
}

/// How these tests run a node: fast ticks, on loopback, with its snapshots beside its log.
fn config(id: NodeId, dir: &Path, port: u16, durability: Durability) -> NodeConfig {
    NodeConfig {
        id,
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        info: info(id, port),
        timing: fast_timing(),
        durability,
        snapshot_dir: dir.to_path_buf(),
        trailing_logs: 100,
        trailing_bytes: 0,
        max_entry_bytes: raftis::settings::DEFAULT_MAX_ENTRY_BYTES,
        password: None,
        shared: None,
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn leader_of(nodes: &[&TestNode]) -> Option<NodeId> {
    let leaders: Vec<NodeId> = nodes.iter().filter(|n| n.node.status().role == Role::Leader).map(|n| n.id).collect();
    (leaders.len() == 1).then(|| leaders[0])
}

fn wait_leader(nodes: &[&TestNode]) -> NodeId {
    wait_for("a single leader", Duration::from_secs(10), || {
        let leader = leader_of(nodes)?;
        let node = nodes.iter().find(|n| n.id == leader).unwrap();
        node.node.status().leader_ready.then_some(leader)
    })
}

fn current_leader(nodes: &[TestNode]) -> &TestNode {
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let id = wait_leader(&refs);
    nodes.iter().find(|n| n.id == id).unwrap()
}

/// Proposes all values at once (so they batch), then waits for every acknowledgement.
fn propose_all(leader: &TestNode, values: impl IntoIterator<Item = Vec<u8>>) -> Vec<Result<LogIndex, ProposeError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut n = 0;
    for (i, v) in values.into_iter().enumerate() {
        let tx = tx.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        leader.node.propose(v, Box::new(move |r| tx.send((i, r)).unwrap()), deadline);
        n += 1;
    }
    let mut results = vec![Err(ProposeError::Timeout); n];
    for _ in 0..n {
        let (i, r) = rx.recv_timeout(Duration::from_secs(20)).expect("every proposal completes");
        results[i] = r;
    }
    results
}

fn assert_acked(results: Vec<Result<LogIndex, ProposeError>>) {
    for r in results {
        r.expect("acknowledged");
    }
}

fn values(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{prefix}-{i}").into_bytes()).collect()
}

fn wait_applied(node: &TestNode, expected: &[Vec<u8>]) {
    wait_for(&format!("node {} to apply {} entries", node.id, expected.len()), Duration::from_secs(15), || {
        (node.applied.lock().unwrap().len() >= expected.len()).then_some(())
    });
    assert_eq!(&*node.applied.lock().unwrap(), expected, "node {} applied a different sequence", node.id);
}

/// Proposes `n` more values through `leader` and checks that every node in `nodes` applied
/// `earlier` followed by them, in order. Returns the whole sequence.
fn append_and_check<'a>(
    leader: &TestNode,
    nodes: impl IntoIterator<Item = &'a TestNode>,
    earlier: Vec<Vec<u8>>,
    prefix: &str,
    n: usize,
) -> Vec<Vec<u8>> {
    let more = values(prefix, n);
    assert_acked(propose_all(leader, more.clone()));
    let all: Vec<Vec<u8>> = earlier.into_iter().chain(more).collect();
    for node in nodes {
        wait_applied(node, &all);
    }
    all
}

/// Node 1 bootstraps, 2 and 3 join through the real membership path.
fn three_node_cluster(root: &Path, durability: Durability) -> Vec<TestNode> {
    let n1 = start(NodeId(1), &root.join("n1"), free_port(), true, durability);
    wait_leader(&[&n1]);
    let mut nodes = vec![n1];
    for id in [2, 3] {
        let n = start(NodeId(id), &root.join(format!("n{id}")), free_port(), false, durability);
        let deadline = Instant::now() + Duration::from_secs(10);
        nodes[0].node.add_member(info(n.id, n.port), deadline).expect("member added");
        nodes.push(n);
    }
    let status = nodes[0].node.status();
    assert_eq!(status.voters, vec![NodeId(1), NodeId(2), NodeId(3)]);
    nodes
}

#[test]
fn three_nodes_elect_one_leader_and_apply_1000_entries_in_the_same_order() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);

    let expected = values("v", 1000);
    let results = propose_all(leader, expected.clone());
    let indexes: Vec<LogIndex> = results.into_iter().map(|r| r.expect("acknowledged")).collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "entries were given increasing indexes");
    for n in &nodes {
        wait_applied(n, &expected);
    }
    // Followers answer NotLeader, naming the leader.
    let follower = nodes.iter().find(|n| n.id != leader.id).unwrap();
    let r = propose_all(follower, vec![b"x".to_vec()]);
    assert_eq!(r[0], Err(ProposeError::NotLeader { leader: Some(leader.id) }));
}

#[test]
fn a_new_leader_takes_over_and_the_old_one_catches_up_after_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::High);
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let first_leader = wait_leader(&refs);
    let pos = nodes.iter().position(|n| n.id == first_leader).unwrap();
    let before = values("before", 100);
    assert_acked(propose_all(&nodes[pos], before.clone()));

    // "Kill" the leader: its thread stops, its side port closes.
    let old = nodes.remove(pos);
    let (old_id, old_dir, old_port) = (old.id, old.dir.clone(), old.port);
    drop(old);

    let refs: Vec<&TestNode> = nodes.iter().collect();
    let new_leader = wait_leader(&refs);
    assert_ne!(new_leader, old_id);
    let leader = nodes.iter().find(|n| n.id == new_leader).unwrap();
    let after = values("after", 100);
    assert_acked(propose_all(leader, after.clone()));

    let restarted = start(old_id, &old_dir, old_port, false, Durability::High);
    let all: Vec<Vec<u8>> = before.into_iter().chain(after).collect();
    wait_applied(&restarted, &all);
    for n in &nodes {
        wait_applied(n, &all);
    }
}

#[test]
fn restarting_every_node_from_disk_keeps_every_acknowledged_entry() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);
    let expected = values("durable", 300);
    assert_acked(propose_all(leader, expected.clone()));

    let places: Vec<(NodeId, PathBuf, u16)> = nodes.iter().map(|n| (n.id, n.dir.clone(), n.port)).collect();
    drop(nodes);
    let nodes: Vec<TestNode> = places.iter().map(|(id, dir, port)| start(*id, dir, *port, false, Durability::High)).collect();
    for n in &nodes {
        wait_applied(n, &expected);
        let status = n.node.status();
        assert_eq!(status.voters, vec![NodeId(1), NodeId(2), NodeId(3)], "membership survives restart");
    }
    append_and_check(current_leader(&nodes), &nodes, expected, "more", 10);
}

/// A leader's claim of a time to expire keys by (`Node::claim_time`) is not in the log. It stays
/// under `CLAIM_LEAD` past the newest committed entry's time, and the next leader stamps its first
/// entry that far past the newest time in its log: so no later entry happens before a claim,
/// whatever the new leader's clock says.
#[test]
fn a_new_leader_stamps_its_entries_past_any_time_its_predecessor_could_claim() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);
    let at = EntryTime(1_000_000);
    let entry = |at: EntryTime| command_entry::encode_command(Some(at), 0, &["SET", "k", "v"]);
    let applied = propose_all(leader, [entry(at)]).remove(0).expect("acknowledged");
    let lead = CLAIM_LEAD.0;
    assert_eq!(leader.node.claim_time(EntryTime(at.0 + lead), applied), None, "a claim as far as the lead");
    let claimed = EntryTime(at.0 + lead - 1);
    assert_eq!(leader.node.claim_time(claimed, applied), Some(claimed));

    let pos = nodes.iter().position(|n| n.id == leader.id).unwrap();
    drop(nodes.remove(pos));
    let next = current_leader(&nodes);
    let index = propose_all(next, [entry(at)]).remove(0).expect("acknowledged");
    let applied = next.applied.lock().unwrap().clone();
    let stamped = command_entry::time_of(applied.last().unwrap()).unwrap();
    assert!(stamped > claimed, "entry {index} stamped {stamped:?}, not after the claim {claimed:?}");
}

#[test]
fn garbage_on_the_side_port_does_not_stop_the_node() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::Medium);
    let leader = current_leader(&nodes);

    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"*2\r\n$4\r\nMSGS\r\n$5\r\nxxxxx\r\n", b"*1\r\n$-7\r\n", b"\x00\xff\xfe"] {
        let mut s = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        // The node closes the connection (after an -ERR); reading reaches end of stream.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let expected = values("still-alive", 50);
    assert_acked(propose_all(leader, expected.clone()));
    for n in &nodes {
        wait_applied(n, &expected);
    }
}

#[test]
fn a_fourth_node_joins_as_learner_is_promoted_and_a_voter_is_removed() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::Low);
    let refs: Vec<&TestNode> = nodes.iter().collect();
    let leader_id = wait_leader(&refs);
    let first = values("first", 200);
    {
        let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
        assert_acked(propose_all(leader, first.clone()));
    }

    let n4 = start(NodeId(4), &root.path().join("n4"), free_port(), false, Durability::Low);
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    leader.node.change_membership_blocking(MembershipChange::AddLearner(info(n4.id, n4.port)), deadline).unwrap();
    wait_for("node 4 to report itself a learner", Duration::from_secs(10), || (n4.node.status().role == Role::Learner).then_some(()));
    wait_applied(&n4, &first);
    leader.node.add_member(info(n4.id, n4.port), deadline).expect("promoted");
    assert_eq!(leader.node.status().voters, vec![NodeId(1), NodeId(2), NodeId(3), NodeId(4)]);

    // Remove a follower; the remaining three keep committing.
    let removed = nodes.remove(nodes.iter().position(|n| n.id != leader_id).unwrap());
    let victim = removed.id;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let term = leader.node.status().term;
    leader.node.change_membership_blocking(MembershipChange::Remove(victim), deadline).unwrap();
    let status = leader.node.status();
    assert!(!status.voters.contains(&victim));
    assert!(!status.members.contains_key(&victim));
    append_and_check(leader, nodes.iter().chain(std::iter::once(&n4)), first, "second", 200);

    // The removed node, still running, learns it (raft alone would leave it campaigning for
    // ever) and stops, without ever having disturbed the others' leader.
    let why = wait_for("the removed node to stop", Duration::from_secs(10), || removed.node.status().fatal);
    assert!(why.starts_with("removed from the cluster: "), "{why}");
    let status = leader.node.status();
    assert_eq!((status.role, status.term), (Role::Leader, term), "no election");

    // It stays stopped across a restart, at once.
    let (dir, port) = (removed.dir.clone(), removed.port);
    drop(removed);
    let restarted = start(victim, &dir, port, false, Durability::Low);
    let again = wait_for("the restarted node to stop", Duration::from_secs(10), || restarted.node.status().fatal);
    assert_eq!(again, why);
}

#[test]
fn linearizable_reads_get_a_read_index_at_least_the_last_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);
    let acked = propose_all(leader, values("w", 20));
    let last = acked.iter().map(|r| *r.as_ref().unwrap()).max().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..100 {
        let tx = tx.clone();
        leader.node.read_index(Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(5));
    }
    for _ in 0..100 {
        let index = rx.recv_timeout(Duration::from_secs(10)).unwrap().expect("leader confirms reads");
        assert!(index >= last, "read index {index} is older than acknowledged write {last}");
    }
    let follower = nodes.iter().find(|n| n.id != leader.id).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    follower.node.read_index(Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(5));
    assert!(matches!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Err(ProposeError::NotLeader { .. })));
}

/// Proposals still in flight when the barrier is asked for are at or below its index; a read
/// index would not cover them (they are not committed yet).
#[test]
fn the_last_proposed_index_is_behind_every_earlier_proposal() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);
    let (tx, rx) = std::sync::mpsc::channel();
    for v in values("pending", 50) {
        let tx = tx.clone();
        leader.node.propose(v, Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(10));
    }
    let (btx, brx) = std::sync::mpsc::channel();
    leader.node.last_proposed_index(Box::new(move |r| btx.send(r).unwrap()));
    let barrier = brx.recv_timeout(Duration::from_secs(10)).unwrap().expect("the leader answers");
    let last = (0..50).map(|_| rx.recv_timeout(Duration::from_secs(20)).unwrap().expect("acknowledged")).max();
    assert_eq!(last, Some(barrier), "the barrier is the index of the last proposal before it");
    let follower = nodes.iter().find(|n| n.id != leader.id).unwrap();
    let (ftx, frx) = std::sync::mpsc::channel();
    follower.node.last_proposed_index(Box::new(move |r| ftx.send(r).unwrap()));
    assert!(matches!(frx.recv_timeout(Duration::from_secs(10)).unwrap(), Err(ProposeError::NotLeader { .. })));
}

#[test]
fn a_read_index_bound_to_a_term_is_confirmed_only_in_that_term() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let leader = current_leader(&nodes);
    let term = leader.node.leading_term().expect("the leader knows its term");
    for n in nodes.iter().filter(|n| n.id != leader.id) {
        assert_eq!(n.node.leading_term(), None, "a follower does not lead");
    }
    let ask = |term| {
        let (tx, rx) = std::sync::mpsc::channel();
        leader.node.read_index_in_term(term, Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(5));
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    };
    assert!(ask(term).is_ok(), "confirmed in the leader's own term");
    assert!(matches!(ask(Term(term.get() - 1)), Err(ProposeError::LeadershipLost)), "an older term is not confirmed");
    assert!(matches!(ask(Term(term.get() + 1)), Err(ProposeError::LeadershipLost)), "nor a newer one");
}

/// raft drops a ReadIndex request that reaches a leader before the first entry of its term is
/// committed. A single node that changes its ticks elects itself again at once, and the reads of
/// the round after that election are in that window: they must still be answered, not left to
/// their deadline.
#[test]
fn reads_reaching_a_new_leader_before_its_first_commit_are_answered() {
    let root = tempfile::tempdir().unwrap();
    let node = start(NodeId(1), root.path(), free_port(), true, Durability::High);
    let nodes = [node];
    let leader = current_leader(&nodes);
    let term_before = leader.node.status().term;
    let (tx, rx) = std::sync::mpsc::channel();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (reader_tx, done) = (tx.clone(), &done);
        scope.spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let tx = reader_tx.clone();
                leader.node.read_index(Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(3));
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        leader.node.set_ticks(30, 5).unwrap();
        wait_for("the node to lead again with its new ticks", Duration::from_secs(10), || {
            let s = leader.node.status();
            (s.election_ticks == 30 && s.term > term_before && s.leader_ready && s.commit >= s.last_index).then_some(())
        });
        // Reads keep going a little longer, into the new term.
        let more = leader.node.status().commit;
        wait_for("a read confirmed in the new term", Duration::from_secs(10), || {
            let (tx, rx) = std::sync::mpsc::channel();
            leader.node.read_index(Box::new(move |r| tx.send(r).unwrap()), Instant::now() + Duration::from_secs(3));
            rx.recv_timeout(Duration::from_secs(5)).unwrap().ok().filter(|i| *i >= more)
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    drop(tx);
    let results: Vec<_> = rx.iter().collect();
    let timed_out = results.iter().filter(|r| matches!(r, Err(ProposeError::Timeout))).count();
    assert_eq!(timed_out, 0, "{timed_out} of {} reads timed out", results.len());
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(ProposeError::NotLeader { .. }) | Err(ProposeError::LeadershipLost))));
}

#[test]
fn a_slow_loop_round_is_counted_and_its_length_recorded() {
    let root = tempfile::tempdir().unwrap();
    let node = start(NodeId(1), root.path(), free_port(), true, Durability::High);
    let nodes = [node];
    let leader = current_leader(&nodes);
    assert_acked(propose_all(leader, values("quick", 10)));
    let quick = leader.node.counters();
    assert!(quick.max_round_micros > 0, "{quick:?}");

    // Applying runs inside a round: an apply that takes 700 ms makes that round slow.
    assert_acked(propose_all(leader, [b"sleep-ms:700".to_vec()]));
    // The round is accounted once it ends, just after the entry was acknowledged.
    let slow = wait_for("the slow round to be counted", Duration::from_secs(5), || {
        Some(leader.node.counters()).filter(|c| c.slow_rounds > quick.slow_rounds)
    });
    assert!(slow.max_round_micros >= 700_000, "{slow:?}");
}

#[test]
fn a_large_log_is_compacted_in_steps_after_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let node = start(NodeId(1), root.path(), free_port(), true, Durability::Low);
    let nodes = [node];
    let leader = current_leader(&nodes);
    let written = values("c", 50_000);
    assert_acked(propose_all(leader, written.clone()));
    wait_applied(leader, &written);

    let status = leader.node.status();
    let members: raftis::membership::Members = [(leader.id, info(leader.id, leader.port))].into_iter().collect();
    let taken = raftis::node::TakenSnapshot {
        index: status.applied,
        term: status.term,
        conf_state: raft::eraftpb::ConfState { voters: vec![leader.id.get()], ..Default::default() },
        members: Arc::new(members),
        descriptor: raftis::snapshot_transfer::SnapshotDescriptor { file: "snapshot-test".into(), size: 0, checksum: 0 },
    };
    let before = leader.node.counters().compaction_steps;
    assert!(leader.node.snapshot_taken(taken), "the snapshot is recorded");

    // 100 trailing entries are kept; the ~50k before them go a bounded number per round.
    let keep_from = status.applied.get() + 1 - 100;
    wait_for("the log to be compacted", Duration::from_secs(10), || (leader.node.status().first_index.get() == keep_from).then_some(()));
    let steps = leader.node.counters().compaction_steps - before;
    assert!(steps >= 3, "50k entries were dropped in {steps} step(s)");

    // The node keeps working on the compacted log.
    assert_acked(propose_all(leader, values("after", 10)));
}

#[test]
fn election_and_heartbeat_ticks_change_on_a_running_cluster_without_losing_its_leader_for_long() {
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let first = values("before", 200);
    assert_acked(propose_all(current_leader(&nodes), first.clone()));
    let old_term = current_leader(&nodes).node.status().term;

    assert!(nodes[0].node.set_ticks(3, 3).is_err(), "a heartbeat as long as the election timeout is refused");
    for n in &nodes {
        n.node.set_ticks(16, 3).unwrap();
    }
    for n in &nodes {
        wait_for("the new timeouts", Duration::from_secs(10), || {
            let s = n.node.status();
            (s.election_ticks == 16 && s.heartbeat_ticks == 3).then_some(())
        });
    }
    // (The old leader hands leadership over first; whether the hand-over or an election settles
    // it depends on timing on a busy machine, so only the outcome is checked.) Nothing was lost,
    // and the cluster keeps committing and applying in the same order.
    let leader = current_leader(&nodes);
    assert!(leader.node.status().term > old_term, "leadership changed hands, in a later term");
    append_and_check(leader, &nodes, first, "after", 200);
}

#[test]
fn a_single_node_changes_its_ticks_and_leads_again() {
    let root = tempfile::tempdir().unwrap();
    let node = start(NodeId(1), root.path(), free_port(), true, Durability::High);
    let nodes = [node];
    let leader = current_leader(&nodes);
    let first = values("one", 50);
    assert_acked(propose_all(leader, first.clone()));
    leader.node.set_ticks(30, 5).unwrap();
    let status = wait_for("the new timeouts", Duration::from_secs(10), || {
        Some(leader.node.status()).filter(|s| s.election_ticks == 30 && s.heartbeat_ticks == 5 && s.leader_ready)
    });
    assert_eq!(status.role, Role::Leader);
    append_and_check(leader, [leader], first, "two", 50);
}

/// Node 1 leads a cluster of its own; node 2 is started empty, for the test to add.
fn a_leader_and_an_empty_node(root: &Path) -> (TestNode, TestNode) {
    let n1 = start(NodeId(1), &root.join("n1"), free_port(), true, Durability::Low);
    wait_leader(&[&n1]);
    let n2 = start(NodeId(2), &root.join("n2"), free_port(), false, Durability::Low);
    (n1, n2)
}

/// Removes `member` through `leader` and waits for it to stop on applying that removal itself.
fn remove_and_see_it_stop(leader: &TestNode, member: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(10);
    leader.node.change_membership_blocking(MembershipChange::Remove(member.id), deadline).unwrap();
    let why = wait_for("the removed node to stop", Duration::from_secs(10), || member.node.status().fatal);
    assert!(why.starts_with("removed from the cluster: its removal was committed at index "), "{why}");
}

#[test]
fn a_voter_that_applies_its_own_removal_stops() {
    let root = tempfile::tempdir().unwrap();
    let (n1, n2) = a_leader_and_an_empty_node(root.path());
    n1.node.add_member(info(n2.id, n2.port), Instant::now() + Duration::from_secs(10)).expect("member added");
    // With two voters the removal needs node 2's own acknowledgement, and the leader announces
    // the new commit index to both before it applies the change and stops writing to node 2.
    remove_and_see_it_stop(&n1, &n2);
    assert_eq!(n1.node.status().voters, vec![NodeId(1)]);
}

/// Node 1 leads, node 2 is its learner.
fn a_leader_and_a_learner(root: &Path) -> (TestNode, TestNode) {
    let (n1, n2) = a_leader_and_an_empty_node(root);
    let deadline = Instant::now() + Duration::from_secs(10);
    n1.node.change_membership_blocking(MembershipChange::AddLearner(info(n2.id, n2.port)), deadline).unwrap();
    wait_for("node 2 to be a learner", Duration::from_secs(10), || (n2.node.status().role == Role::Learner).then_some(()));
    (n1, n2)
}

#[test]
fn a_learner_removed_while_it_runs_stops_too() {
    let root = tempfile::tempdir().unwrap();
    let (n1, n2) = a_leader_and_a_learner(root.path());
    // A learner never asks for votes: running, it learns from the commit of its removal, sent as
    // it is removed.
    remove_and_see_it_stop(&n1, &n2);
}

#[test]
fn a_learner_removed_while_it_was_down_learns_it_when_it_comes_back() {
    let root = tempfile::tempdir().unwrap();
    let (n1, n2) = a_leader_and_a_learner(root.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = values("first", 20);
    assert_acked(propose_all(&n1, first.clone()));
    wait_applied(&n2, &first);
    let (dir, port) = (n2.dir.clone(), n2.port);
    drop(n2);
    n1.node.change_membership_blocking(MembershipChange::Remove(NodeId(2)), deadline).unwrap();

    // A learner asks nobody for votes, and nobody writes to it any more: only the answer to its
    // HELLO, which says how far its log goes, can tell it.
    let restarted = start(NodeId(2), &dir, port, false, Durability::Low);
    let why = wait_for("the restarted learner to stop", Duration::from_secs(10), || restarted.node.status().fatal);
    assert!(why.starts_with("removed from the cluster: "), "{why}");
    assert_eq!(n1.node.status().voters, vec![NodeId(1)]);
}

#[test]
fn a_node_joining_where_a_removed_member_lived_is_not_taken_for_it() {
    let root = tempfile::tempdir().unwrap();
    let (n1, n2) = a_leader_and_a_learner(root.path());
    // Node 2 was a member for more history than one append carries (1 MiB): a newcomer at its
    // address applies that history in steps, and dials node 2 (itself) while it does, long
    // before it reaches its own addition.
    let history: Vec<Vec<u8>> = (0..3000).map(|i| format!("{i:01024}").into_bytes()).collect();
    assert_acked(propose_all(&n1, history.clone()));
    wait_applied(&n2, &history);
    n1.node.change_membership_blocking(MembershipChange::Remove(n2.id), Instant::now() + Duration::from_secs(10)).unwrap();
    let port = n2.port;
    drop(n2);
    let n3 = start(NodeId(3), &root.path().join("n3"), port, false, Durability::Low);
    n1.node.add_member(info(n3.id, port), Instant::now() + Duration::from_secs(20)).expect("node 3 joins");
    wait_applied(&n3, &history);
    assert_eq!(n3.node.status().fatal, None);
    assert_eq!(n1.node.status().voters, vec![NodeId(1), NodeId(3)]);
}

#[test]
fn a_survivor_recovers_a_cluster_that_lost_its_majority_and_commits_its_whole_log() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::High);
    let first = append_and_check(current_leader(&nodes), &nodes, Vec::new(), "first", 50);
    let leader = current_leader(&nodes).id;
    nodes.retain(|n| n.id == leader);
    let survivor = nodes.pop().unwrap();
    // Appended by the survivor once the others are gone: in its log, never committed.
    let stranded = values("stranded", 5);
    let results = propose_all(&survivor, stranded.clone());
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");

    wait_for("the survivor to step down", Duration::from_secs(10), || (!survivor.node.is_leader()).then_some(()));
    let at = wait_for("RECOVER to be accepted", Duration::from_secs(10), || match survivor.node.recover() {
        Ok(at) => Some(at),
        Err(why) if why.contains("spoke to this node moments ago") || why.contains("leads this cluster") => None,
        Err(why) => panic!("{why}"),
    });
    assert!(at >= LogIndex(first.len() as u64 + stranded.len() as u64), "{at}");
    wait_leader(&[&survivor]);
    let status = survivor.node.status();
    assert_eq!(status.voters, vec![survivor.id]);
    assert_eq!(status.recovered.as_ref().map(|r| r.at), Some(at));
    let mut left = status.recovered.unwrap().left_behind.clone();
    left.sort();
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&survivor.id));
    let all = append_and_check(&survivor, [&survivor], [first, stranded].concat(), "after", 10);
    assert!(survivor.node.recover().unwrap_err().contains("leads"));

    // A crash between the recovery's record and the new membership: the next start finishes it.
    let (id, dir, port) = (survivor.id, survivor.dir.clone(), survivor.port);
    drop(survivor);
    let store = LogStore::open(&dir).unwrap();
    let record = raftis::recovery::Recovery { at, left_behind: left, done: false };
    store.put_meta(raftis::recovery::META_RECOVERY, &record.encode()).unwrap();
    let old = raft::eraftpb::ConfState { voters: vec![1, 2, 3], ..Default::default() };
    store.set_conf_state(&old).unwrap();
    store.sync().unwrap();
    drop(store);
    let again = start(id, &dir, port, false, Durability::High);
    wait_leader(&[&again]);
    assert_eq!(again.node.status().voters, vec![id]);
    append_and_check(&again, [&again], all, "restarted", 5);
}

/// A copy of a stopped node's directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn a_node_restarted_from_an_older_copy_of_its_dir_stops_with_why_and_the_others_go_on() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::High);
    let leader_id = current_leader(&nodes).id;
    let first = append_and_check(current_leader(&nodes), &nodes, Vec::new(), "first", 20);

    // A follower is stopped and its dir copied as it is now (a backup, or a clone of its VM).
    let follower = nodes.remove(nodes.iter().position(|n| n.id != leader_id).unwrap());
    let (id, dir, port) = (follower.id, follower.dir.clone(), follower.port);
    drop(follower);
    let old_copy = root.path().join("old-copy");
    copy_dir(&dir, &old_copy);
    // It comes back and acknowledges more entries; then it is started from the old copy.
    nodes.push(start(id, &dir, port, false, Durability::High));
    let all = append_and_check(current_leader(&nodes), &nodes, first, "second", 50);
    drop(nodes.pop());
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&old_copy, &dir);
    let restored = start(id, &dir, port, false, Durability::High);

    // raft would panic on the leader's first heartbeat; the node stops and says why.
    let why = wait_for("the restored node to stop", Duration::from_secs(10), || restored.node.status().fatal);
    assert!(why.contains("entries it acknowledged are gone"), "{why}");
    assert!(why.contains(&format!("RAFT.REMOVEPEER {id}")), "{why}");
    let refused = propose_all(&restored, values("on-the-copy", 1));
    assert!(refused[0].is_err(), "a stopped node takes no proposals: {refused:?}");
    // The two others carry on.
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    append_and_check(leader, &nodes, all, "third", 20);
}

#[test]
fn a_node_that_kept_entries_the_others_lost_after_they_were_committed_stops_with_why() {
    // What a power loss on every node can leave below durability high: two nodes lost entries
    // the cluster had committed, the third kept them (and applied them).
    let root = tempfile::tempdir().unwrap();
    let nodes = three_node_cluster(root.path(), Durability::High);
    let first = append_and_check(current_leader(&nodes), &nodes, Vec::new(), "first", 20);
    let members: Vec<(NodeId, PathBuf, u16)> = nodes.iter().map(|n| (n.id, n.dir.clone(), n.port)).collect();
    drop(nodes);
    let (lost, kept) = (&members[..2], &members[2]);
    for (_, dir, _) in lost {
        copy_dir(dir, &dir.with_extension("before"));
    }
    let nodes: Vec<TestNode> = members.iter().map(|(id, dir, port)| start(*id, dir, *port, false, Durability::High)).collect();
    append_and_check(current_leader(&nodes), &nodes, first.clone(), "second", 20);
    drop(nodes);
    for (_, dir, _) in lost {
        std::fs::remove_dir_all(dir).unwrap();
        copy_dir(&dir.with_extension("before"), dir);
    }

    // The two that lost them elect a leader and commit other entries in their place.
    let two: Vec<TestNode> = lost.iter().map(|(id, dir, port)| start(*id, dir, *port, false, Durability::High)).collect();
    let after = append_and_check(current_leader(&two), &two, first, "instead", 5);
    // raft would leave the third waiting for ever; it stops and says why.
    let (id, dir, port) = kept;
    let third = start(*id, dir, *port, false, Durability::High);
    let why = wait_for("the node that kept them to stop", Duration::from_secs(10), || third.node.status().fatal);
    assert!(why.contains("the cluster lost entries it had committed"), "{why}");
    assert!(why.contains(&format!("RAFT.REMOVEPEER {id}")), "{why}");
    // The two others carry on.
    append_and_check(current_leader(&two), &two, after, "more", 5);
}

#[test]
fn the_nodes_that_join_take_the_cluster_id_of_the_one_that_made_the_cluster_and_keep_it() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::Medium);
    let made = nodes[0].node.status().cluster;
    assert!(made.is_known());
    for n in &nodes[1..] {
        wait_for(&format!("node {} to take the cluster id", n.id), Duration::from_secs(10), || {
            (n.node.status().cluster == made).then_some(())
        });
    }
    let (id, dir, port) = (nodes[2].id, nodes[2].dir.clone(), nodes[2].port);
    drop(nodes.pop());
    let restarted = start(id, &dir, port, false, Durability::Medium);
    assert_eq!(restarted.node.status().cluster, made, "kept with the log");
}

#[test]
fn a_node_that_joins_again_at_a_lost_members_address_replaces_it_but_not_a_live_one() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_node_cluster(root.path(), Durability::Medium);
    let leader_id = current_leader(&nodes).id;
    let first = append_and_check(current_leader(&nodes), &nodes, Vec::new(), "first", 20);

    // A live member's address given by a node that is not there: refused, nothing removed.
    let live = nodes.iter().find(|n| n.id != leader_id).unwrap();
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let refused = leader.node.add_member(info(NodeId(9), live.port), Instant::now() + Duration::from_secs(20));
    match refused {
        Err(ProposeError::Refused(why)) => assert!(why.contains(&format!("node {}, a member, is at", live.id)), "{why}"),
        other => panic!("joining at a live member's address: {other:?}"),
    }
    assert_eq!(leader.node.status().voters.len(), 3);

    // A follower loses its dir and joins again from the same address, as a new node.
    let lost = nodes.remove(nodes.iter().position(|n| n.id != leader_id).unwrap());
    let (old_id, dir, port) = (lost.id, lost.dir.clone(), lost.port);
    drop(lost);
    std::fs::remove_dir_all(&dir).unwrap();
    let new_id = NodeId(old_id.get() + 100);
    let fresh = start(new_id, &dir, port, false, Durability::Medium);
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    leader.node.add_member(info(new_id, port), Instant::now() + Duration::from_secs(20)).expect("joined in its place");
    let status = leader.node.status();
    assert_eq!(status.voters.len(), 3, "{:?}", status.voters);
    assert!(!status.voters.contains(&old_id) && !status.members.contains_key(&old_id), "{:?}", status.voters);
    nodes.push(fresh);
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    append_and_check(leader, &nodes, first, "second", 20);
}

#[test]
fn a_cluster_made_from_a_seed_snapshot_has_a_log_that_starts_after_it() {
    let root = tempfile::tempdir().unwrap();
    let me = info(NodeId(1), free_port());
    let seed = |index: u64, voters: Vec<u64>| raftis::node::TakenSnapshot {
        index: LogIndex(index),
        term: Term(1),
        conf_state: raft::eraftpb::ConfState { voters, ..Default::default() },
        members: Arc::new([(me.id, me.clone())].into_iter().collect()),
        descriptor: raftis::snapshot_transfer::SnapshotDescriptor { file: "snapshot-seed.rsnap".into(), size: 7, checksum: 9 },
    };
    let store = LogStore::open(root.path()).unwrap();
    assert!(Node::<Recorder>::bootstrap_from(&store, &me, &seed(5, vec![1])).is_err(), "not at index 1");
    assert!(Node::<Recorder>::bootstrap_from(&store, &me, &seed(1, vec![1, 2])).is_err(), "another voter");
    assert!(!store.is_initialized(), "a refused seed leaves no cluster");

    Node::<Recorder>::bootstrap_from(&store, &me, &seed(1, vec![1])).unwrap();
    assert_eq!((store.first_index(), store.conf_state().voters), (2, vec![1]));
    let snapshot = raft::Storage::snapshot(&store, 0, 0).unwrap();
    assert_eq!((snapshot.get_metadata().index, snapshot.get_metadata().term), (1, 1));
    let (members, app) = raftis::snapshot_data::decode(&snapshot.data).unwrap();
    assert_eq!(members.get(&me.id), Some(&me));
    assert_eq!(raftis::snapshot_transfer::SnapshotDescriptor::decode(app).unwrap().file, "snapshot-seed.rsnap");
    assert!(Node::<Recorder>::bootstrap_from(&store, &me, &seed(1, vec![1])).is_err(), "only once");
    drop(store);
    // Reopened, as after a crash right after it: still there.
    let store = LogStore::open(root.path()).unwrap();
    assert_eq!((store.first_index(), store.is_initialized()), (2, true));
    assert!(raftis::cluster_id::ClusterId::load(&store).unwrap().is_known());
}

/// A new cluster's first node has, once `bootstrap` returns, everything it serves with: its
/// first entry, its membership, and a cluster id.
#[test]
fn a_bootstrapped_node_has_its_entry_its_membership_and_a_cluster_id() {
    let root = tempfile::tempdir().unwrap();
    let me = info(NodeId(1), free_port());
    {
        let store = LogStore::open(root.path()).unwrap();
        Node::<Recorder>::bootstrap(&store, &me).unwrap();
        assert!(Node::<Recorder>::bootstrap(&store, &me).is_err(), "only once");
    }
    let store = LogStore::open(root.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index(), store.conf_state().voters), (1, 1, vec![1]));
    assert_eq!(store.hard_state().commit, 1);
    let members: raftis::membership::Members = serde_json::from_slice(&store.get_meta("members").unwrap().unwrap()).unwrap();
    assert_eq!(members.get(&me.id), Some(&me));
    assert!(raftis::cluster_id::ClusterId::load(&store).unwrap().is_known());
}

/// A Raft loop stuck in one round (here an apply that takes a minute; a write to a disk that no
/// longer answers is the real case) does not hold up the node's shutdown, so a Redis asked to
/// exit does exit: the node waits its loop-stop timeout, then leaves the threads behind.
#[test]
fn a_stuck_loop_does_not_hold_shutdown_up_for_ever() {
    let root = tempfile::tempdir().unwrap();
    let node = start(NodeId(1), root.path(), free_port(), true, Durability::High);
    let nodes = [node];
    let leader = current_leader(&nodes);
    leader.node.propose(b"sleep-ms:60000".to_vec(), Box::new(|_| {}), Instant::now() + Duration::from_secs(120));
    // The recorder holds its list for the whole batch it applies, the minute's sleep included.
    wait_for("the slow entry to be applying", Duration::from_secs(10), || leader.applied.try_lock().is_err().then_some(()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            leader.node.shutdown();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(40)).expect("shutdown waited for the stuck round to end");
    });
}

/// Records where each batch ends and the learners it says are in force there: what a snapshot
/// taken right after it would record.
struct Points {
    points: Arc<Mutex<Vec<Point>>>,
}

/// A batch's last index, and the learners in force there.
type Point = (LogIndex, Vec<u64>);

impl StateMachine for Points {
    type Waiter = Callback<LogIndex>;

    fn apply(&mut self, batch: ApplyBatch<Self::Waiter>) {
        for e in batch.entries {
            if let Some(w) = e.waiter {
                w(Ok(e.index));
            }
        }
        self.points.lock().unwrap().push((batch.applied_to, batch.conf_state.learners.clone()));
    }

    fn restore(&mut self, _index: LogIndex, _data: &[u8]) {}
}

/// A node killed just after it applied a membership change may have stored a commit index from
/// before it (the index is written lazily). Raft restarts with the membership after the change:
/// the replay must not stop below the change with that membership, or a snapshot taken there
/// would record members that were not members at its index.
#[test]
fn a_replay_from_before_the_last_membership_change_never_pairs_an_index_with_a_later_membership() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n1");
    let port = free_port();
    let n1 = start(NodeId(1), &dir, port, true, Durability::High);
    wait_leader(&[&n1]);
    assert_acked(propose_all(&n1, values("before", 5)));
    let before_change = n1.node.status().commit;
    let deadline = Instant::now() + Duration::from_secs(10);
    n1.node.change_membership_blocking(MembershipChange::AddLearner(info(NodeId(2), free_port())), deadline).unwrap();
    let change = n1.node.status().commit;
    assert!(change > before_change);
    drop(n1);
    // What a kill -9 within the commit index's write interval leaves.
    LogStore::open(&dir).unwrap().set_commit(before_change.get(), true).unwrap();

    let points = Arc::new(Mutex::new(Vec::new()));
    let store = LogStore::open(&dir).unwrap();
    let node = Node::start(config(NodeId(1), &dir, port, Durability::High), store, Points { points: points.clone() }).unwrap();
    wait_for("the replay past the change", Duration::from_secs(10), || (node.status().applied >= change).then_some(()));
    let points = points.lock().unwrap().clone();
    for (index, learners) in &points {
        assert!(*index >= change || learners.is_empty(), "index {index} paired with learners {learners:?} added at {change}: {points:?}");
    }
}

/// A node whose log holds only its first entry (what a crash in the middle of a bootstrap left
/// before Raftis wrote it in one commit) applies it at its next start, and so becomes its
/// cluster's one voter, with its address, and serves.
#[test]
fn a_node_whose_bootstrap_stopped_after_its_first_entry_starts_as_its_one_voter() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n1");
    let port = free_port();
    {
        let store = LogStore::open(&dir).unwrap();
        let (cc, context) = MembershipChange::AddVoter(info(NodeId(1), port)).to_raft();
        let mut entry = raft::eraftpb::Entry::default();
        entry.set_entry_type(raft::eraftpb::EntryType::EntryConfChangeV2);
        (entry.index, entry.term) = (1, 1);
        entry.data = prost::Message::encode_to_vec(&cc);
        entry.context = context;
        let hard_state = raft::eraftpb::HardState { term: 1, vote: 0, commit: 1 };
        store.append(&[entry], Some(&hard_state), true).unwrap();
        assert!(store.is_initialized(), "a node with its first entry belongs to a cluster");
    }
    let n1 = start(NodeId(1), &dir, port, false, Durability::High);
    wait_leader(&[&n1]);
    let status = n1.node.status();
    assert_eq!(status.voters, vec![NodeId(1)]);
    assert_eq!(status.members.get(&NodeId(1)), Some(&info(NodeId(1), port)));
    assert_acked(propose_all(&n1, values("after", 3)));
}

/// A term or vote is on disk before the node acts on it, at every durability level: a node that
/// forgot its vote in a power loss could vote again in the same term and elect a second leader.
/// Writes below `high` are not flushed one by one.
#[test]
fn votes_are_flushed_at_every_durability_level_and_writes_at_low_are_not() {
    let root = tempfile::tempdir().unwrap();
    let n1 = start(NodeId(1), root.path(), free_port(), true, Durability::Low);
    wait_leader(&[&n1]);
    let after_election = n1.node.counters().fsyncs;
    assert!(after_election >= 1, "the election's term and vote were flushed");
    assert_acked(propose_all(&n1, values("w", 20)));
    assert_eq!(n1.node.counters().fsyncs, after_election, "writes at low wait for no flush");
}
