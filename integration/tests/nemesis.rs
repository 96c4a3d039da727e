//! Jepsen-style runs: clients record every operation against a real cluster while the nemesis
//! kills, pauses, partitions and re-members nodes, and cuts the power of one node or all; then the history is checked (linearizable
//! registers, counter bounds, list appends, transfer ledgers, and balances that add up in every
//! transactional snapshot) and every node must hold the same dataset. At `consistency=low`, where
//! reads may be stale by design, each connection must still read its own writes.
//!
//! The CI profile is short. `scripts/faults` runs the long one; these variables tune a run:
//! `RAFTIS_FAULT_SECS` (fault phase length, default 15), `RAFTIS_FAULT_NODES` (3 or 5),
//! `RAFTIS_FAULT_CLIENTS` (default 4), `RAFTIS_FAULT_OPS` (operations per client at most, spread
//! over the run, default 40,000), `RAFTIS_FAULT_SEED` (default: random, printed), `RAFTIS_FAULT_MODULE_ARGS` (more
//! module arguments for every node, e.g. `durability=medium`, after the run's own).

use raftis_integration::checker::{check_counter, check_list_append, check_register, Violation};
use raftis_integration::history::{dump_events, outcome_summary, History};
use raftis_integration::nemesis::{Fault, Nemesis};
use raftis_integration::own_writes;
use raftis_integration::workload::{Clients, Mix, COUNTER_KEY};
use raftis_integration::{info_field, stat_field, wait_for, Cluster};
use std::time::Duration;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs the workloads under `faults` and checks everything; panics with a report on failure.
fn run(faults: &[Fault]) {
    run_with(faults, &[]);
}

/// Returns the healed cluster, its dataset checked, for more checks.
fn run_with(faults: &[Fault], module_args: &[&str]) -> Cluster {
    let secs = env("RAFTIS_FAULT_SECS", 15);
    let nodes = env("RAFTIS_FAULT_NODES", 3) as usize;
    let clients = env("RAFTIS_FAULT_CLIENTS", 4) as usize;
    let max_ops = env("RAFTIS_FAULT_OPS", 40_000) as usize;
    let seed = env("RAFTIS_FAULT_SEED", rand::random::<u32>() as u64);
    let extra = std::env::var("RAFTIS_FAULT_MODULE_ARGS").unwrap_or_default();
    let module_args: Vec<&str> = module_args.iter().copied().chain(extra.split_whitespace()).collect();
    let module_args = module_args.as_slice();
    eprintln!(
        "fault run: {nodes} nodes, {clients} clients, {secs} s of {faults:?}, module arguments {module_args:?}, RAFTIS_FAULT_SEED={seed}"
    );

    let partitions = faults.iter().any(|f| Fault::NETWORK.contains(f));
    let mut cluster = if faults.iter().any(|f| matches!(f, Fault::PowerCut | Fault::PowerCutRandom)) {
        Cluster::start_on_disk(nodes, module_args, partitions)
    } else if partitions {
        Cluster::start_partitionable(nodes, module_args)
    } else {
        Cluster::start(nodes, module_args)
    }
    .unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    // The faults, the last one's hold and healing, and the wait for every client below.
    let spread_over = Duration::from_secs(secs + 40);
    let mut load = Clients::start(&ports, clients, Mix::ALL, seed, max_ops, spread_over);
    let mut nemesis = Nemesis::new(seed, load.history.clone());
    nemesis.run(&mut cluster, faults, Duration::from_secs(secs));
    // The healed cluster serves every client again. A client may first have to give up on a
    // request a fault left without an answer (its read timeout is 8 s).
    let healed_at = load.history.now_nanos();
    wait_for(
        "every client to get an answer from the healed cluster (a client that ran all RAFTIS_FAULT_OPS never does)",
        Duration::from_secs(30),
        || {
            let answered = load.history.acknowledged_since(healed_at);
            // The pinned readers (processes from `clients` on) get -MOVED from followers.
            (0..clients).all(|p| answered.contains(&p)).then_some(())
        },
    );
    load.stop();
    load.final_reads(&ports);

    let events = load.history.events();
    eprintln!("{} operations: {}; {} faults", events.len(), outcome_summary(&events), nemesis.log.len());
    let ok = events.iter().filter(|e| e.is_ok()).count();
    let report = |what: &str, v: Violation| -> ! {
        let file = cluster.root.path().join("history.txt");
        let _ = std::fs::write(&file, dump_events(&events));
        panic!(
            "{what}: {v}\nfaults:\n  {}\nthe full history is in {} (kept with the nodes' data and logs)",
            nemesis.log.join("\n  "),
            file.display()
        )
    };
    // The counter's INCRs are checked by their bounds below; searching linearizations of tens of
    // thousands of increments on one key would only exhaust the search budget.
    let registers: Vec<_> = events.iter().filter(|e| e.op.key() != COUNTER_KEY).cloned().collect();
    if let Err(v) = check_register(&registers) {
        report("registers are not linearizable", v);
    }
    match check_counter(&events, COUNTER_KEY) {
        Ok(c) => eprintln!("counter: {c:?}"),
        Err(v) => report("counter out of bounds", v),
    }
    match check_list_append(&events) {
        Ok(l) => eprintln!("lists and ledgers: {} acknowledged appends, {} reads", l.acknowledged, l.reads),
        Err(v) => report("list appends inconsistent", v),
    }
    if let Some(first) = load.unexpected_errors().first() {
        let v = Violation { key: String::new(), message: first.clone(), minimal: Vec::new() };
        report("a node answered an error no fault explains", v);
    }
    if let Some(first) = load.anomalies().first() {
        let v = Violation { key: "transfers".into(), message: first.clone(), minimal: Vec::new() };
        report("a transaction was seen in part", v);
    }
    assert!(ok > 200, "the cluster made too little progress under faults: {ok} acknowledged operations");

    // Every node, healed, converges on the same dataset.
    let all: Vec<usize> = (0..nodes).collect();
    cluster.assert_same_dataset(&all);
    // A node that crashed, or stopped on its own, during the run would be hidden by the next
    // restart a fault gave it. Its redis.log spans the restarts. (Below durability high a power
    // cut may leave a node that lost less than the others, which then stops by design.)
    let below_high = module_args.iter().any(|a| a.starts_with("durability=") && *a != "durability=high");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let log = node.log();
        let mut signs = vec!["panic", "BUG REPORT", "Guru Meditation"];
        if !below_high {
            signs.push("this node stops serving");
        }
        for sign in signs {
            if let Some(line) = log.lines().find(|l| l.contains(sign)) {
                report(
                    &format!("node {i} logged {sign:?}"),
                    Violation { key: String::new(), message: line.to_string(), minimal: Vec::new() },
                );
            }
        }
    }
    cluster
}

#[test]
fn power_cuts_lose_nothing_acknowledged() {
    if !raftis_integration::power_cut::can_run_here() {
        return;
    }
    run(&[
        Fault::PowerCutRandom,
        Fault::PowerCut,
        Fault::PowerCutRandom,
        Fault::PowerCut,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::IsolateLeader,
        Fault::Overlap,
    ]);
}

/// Every node snapshots and compacts its log every few thousand entries while nodes are killed
/// and lose power: a node restarts whatever step of a snapshot the fault cut short (the child
/// writing, the file being recorded, the log being compacted, the commit index not yet written
/// past the snapshot).
#[test]
fn snapshots_all_along_under_kills_and_power_cuts_lose_nothing() {
    if !raftis_integration::power_cut::can_run_here() {
        return;
    }
    let cluster = run_with(
        &[Fault::PowerCut, Fault::PowerCutRandom, Fault::KillRandom, Fault::KillLeader, Fault::PauseRandom],
        &["snapshot-threshold=2000", "trailing-logs=200"],
    );
    // A slow run may have written too little for a second snapshot, or be compacting still:
    // more writes until each node's log starts past one (a node compacts a step per round).
    let mut filler = 0;
    raftis_integration::wait_for("every node to snapshot and compact", Duration::from_secs(120), || {
        if cluster.nodes.iter().all(|node| info_field(node, "first_log_index") > 2000) {
            return Some(());
        }
        let mut pipe = redis::pipe();
        for _ in 0..500 {
            filler += 1;
            pipe.cmd("SET").arg("filler").arg(filler).ignore();
        }
        pipe.query::<()>(&mut cluster.leader().client().unwrap()).unwrap();
        None
    });
    // Those snapshots are what a restart loads now: a node restarted from one holds the
    // cluster's dataset (the checks of the run itself came before them).
    let mut cluster = cluster;
    let follower = (cluster.wait_leader() + 1) % cluster.nodes.len();
    cluster.nodes[follower].restart().unwrap();
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    cluster.assert_same_dataset(&all);
}

#[test]
fn kills_and_pauses_lose_nothing_acknowledged() {
    let mut faults = Fault::PROCESS.to_vec();
    faults.push(Fault::Overlap);
    run(&faults);
}

#[test]
fn partitions_never_split_the_brain() {
    // Overlaps pair a partition with a kill, or a pause (never two partitions).
    let mut faults = Fault::NETWORK.to_vec();
    faults.extend([Fault::Overlap, Fault::Overlap, Fault::KillRandom, Fault::PauseRandom]);
    run(&faults);
}

/// Clients stay on whichever node they reach; followers forward to the leader for them.
#[test]
fn the_follower_proxy_keeps_every_guarantee_under_faults() {
    run_with(
        &[Fault::KillLeader, Fault::PauseLeader, Fault::IsolateLeader, Fault::KillRandom, Fault::TransferLeader, Fault::Overlap],
        &["follower-proxy=yes"],
    );
}

/// At `consistency=low` any node serves reads from its own dataset, so the registers above would
/// be stale by design; what must hold there is that a connection reads its own acknowledged
/// writes, through the proxy, whatever the faults ([`own_writes`]).
#[test]
fn at_low_every_connection_reads_its_own_writes_under_faults() {
    let secs = env("RAFTIS_FAULT_SECS", 15);
    let nodes = env("RAFTIS_FAULT_NODES", 3) as usize;
    let seed = env("RAFTIS_FAULT_SEED", rand::random::<u32>() as u64);
    let faults = [
        Fault::PauseRandom,
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::IsolateLeader,
        Fault::SplitMajority,
        Fault::Bridge,
        Fault::TransferLeader,
        Fault::Overlap,
    ];
    eprintln!("fault run: {nodes} nodes, 2 clients each, {secs} s of {faults:?}, RAFTIS_FAULT_SEED={seed}");
    let mut cluster = Cluster::start_partitionable(nodes, &["follower-proxy=yes", "consistency=low"]).unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let mut nemesis = Nemesis::new(seed, History::new());
    let mut checked = 0;
    let violations = own_writes::check_while(&ports, 2, |progress| {
        nemesis.run(&mut cluster, &faults, Duration::from_secs(secs));
        progress.wait_past(&progress.mark(), "every client to check a read on the healed cluster");
        checked = progress.total();
    });
    let late: Vec<u64> = cluster.nodes.iter().map(|n| stat_field(n, "forward_catch_ups_late")).collect();
    eprintln!("{checked} reads checked; answers relayed before catching up, per node: {late:?}");
    assert!(violations.is_empty(), "{violations:#?}\nfaults:\n  {}", nemesis.log.join("\n  "));
}

#[test]
fn membership_changes_under_load_mixed_with_every_other_fault() {
    let mut faults = vec![Fault::RemoveAndReAdd, Fault::RemoveAndReAdd];
    faults.extend_from_slice(Fault::ALL);
    run(&faults);
}

/// The harness itself must be able to fail: with `consistency=low` a follower cut off by the
/// proxy serves its old value, and the checker has to call that history non-linearizable.
#[test]
fn the_checker_catches_a_stale_read_from_a_cut_off_follower() {
    use raftis_integration::history::{Op, Outcome, Value};
    let cluster = Cluster::start_partitionable(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let history = History::new();
    let write = |value: i64| {
        let op = history.invoke(0, Op::Write { key: "r".into(), value });
        cluster.nodes[leader].cmd::<String>(&["SET", "r", &value.to_string()]).unwrap();
        op.complete(Outcome::Ok(None));
    };
    write(1);
    raftis_integration::wait_for("the follower to apply the first write", Duration::from_secs(10), || {
        (cluster.nodes[follower].cmd::<Option<String>>(&["GET", "r"]).ok().flatten().as_deref() == Some("1")).then_some(())
    });
    cluster.network.as_ref().unwrap().partition(&[vec![follower], (0..3).filter(|i| *i != follower).collect()]);
    write(2);
    let op = history.invoke(1, Op::Read { key: "r".into() });
    let seen: i64 = cluster.nodes[follower].cmd::<String>(&["GET", "r"]).unwrap().parse().unwrap();
    op.complete(Outcome::Ok(Some(Value::Int(seen))));
    assert_eq!(seen, 1, "the cut-off follower cannot have seen the second write");
    let violation = check_register(&history.events()).expect_err("a stale read must be caught");
    assert!(violation.message.contains('r'), "{violation}");
    cluster.network.as_ref().unwrap().heal();
    cluster.wait_converged(&[0, 1, 2]);
}

/// The harness must see a deposed leader's stale reads. At `consistency=medium` a leader cut off
/// from the others serves reads until it notices (README, *Guarantees*); with a long election
/// timeout of its own that is seconds after the majority has a new leader taking writes. The
/// readers pinned to it are still asking it then, and the checker has to call that history
/// non-linearizable.
#[test]
fn the_workload_catches_a_deposed_leader_serving_stale_reads() {
    let cluster = Cluster::start_partitionable(3, &["consistency=medium", "election-ticks=100"]).unwrap();
    let old = cluster.wait_leader();
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    for i in &others {
        cluster.nodes[*i].cmd::<String>(&["RAFT.CONFIG", "SET", "election-ticks", "10"]).unwrap();
    }
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let mix = Mix { register: true, counter: false, list: false, transfer: false };
    let mut load = Clients::start(&ports, 4, mix, rand::random(), usize::MAX, Duration::ZERO);
    wait_for("the clients to get answers", Duration::from_secs(10), || (load.history.acknowledged_since(0).len() >= 4).then_some(()));

    let net = cluster.network.as_ref().unwrap();
    net.partition(&[vec![old], others.clone()]);
    // Its quorum check, every 100 ticks (10 s), has the old leader step down at the second one.
    let violation = wait_for("the checker to find a stale read", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(500));
        check_register(&load.history.events()).err()
    });
    assert_eq!(cluster.nodes[old].state(), "leader", "the stale read must come from a leader that has not noticed yet");
    net.heal();
    load.stop();
    eprintln!("caught: {violation}");
}
