//! The nemesis: real faults injected into a running cluster, each healed before the next, or
//! (an [`Fault::Overlap`]) two at once. Every fault is logged with its start and end (history
//! clock) so a failure report can be read against the operations.

use crate::history::History;
use crate::{wait_for, Cluster};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 the leader; restart it after a while.
    KillLeader,
    /// kill -9 any node; restart it after a while.
    KillRandom,
    /// SIGSTOP the leader (it keeps its sockets, like a long GC pause); SIGCONT later.
    PauseLeader,
    /// SIGSTOP any node.
    PauseRandom,
    /// Cut the leader off from every other node.
    IsolateLeader,
    /// A random minority on one side, the majority on the other.
    SplitMajority,
    /// Two halves that only one node (the bridge) can talk to both of.
    Bridge,
    /// Remove a follower from the cluster, wipe it, and join it again as a new node.
    RemoveAndReAdd,
    /// Change raft's election and heartbeat ticks on every node at runtime (followers first):
    /// each rebuilds its raft state, the leader after handing leadership over.
    Retime,
    /// `RAFT.TRANSFERLEADER` from the leader to another node, one to three times in a row, while
    /// clients write: proposals are refused during each hand-over, and reads and writes in flight
    /// straddle it.
    TransferLeader,
    /// Every node loses power at once: their disks keep only what was flushed. They all start
    /// again after a while. Needs [`Cluster::start_on_disk`].
    PowerCut,
    /// One node, any, loses power while the others go on; it starts again after a while.
    /// Needs [`Cluster::start_on_disk`].
    PowerCutRandom,
    /// Two of the run's other faults that last (process, network, one node's power) at once:
    /// the second starts while the first holds, on another node, and they end in either order.
    Overlap,
}

impl Fault {
    /// A fault that holds until healed, which can overlap another.
    fn lasts(self) -> bool {
        Fault::PROCESS.contains(&self) || self.is_network() || self == Fault::PowerCutRandom
    }

    fn is_network(self) -> bool {
        Fault::NETWORK.contains(&self)
    }

    pub const PROCESS: &'static [Fault] = &[Fault::KillLeader, Fault::KillRandom, Fault::PauseLeader, Fault::PauseRandom];
    pub const NETWORK: &'static [Fault] = &[Fault::IsolateLeader, Fault::SplitMajority, Fault::Bridge];
    pub const ALL: &'static [Fault] = &[
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::IsolateLeader,
        Fault::SplitMajority,
        Fault::Bridge,
        Fault::RemoveAndReAdd,
        Fault::Retime,
        Fault::TransferLeader,
        Fault::Overlap,
    ];
}

pub struct Nemesis {
    rng: StdRng,
    history: History,
    /// How long a fault lasts before it is healed.
    pub hold: (Duration, Duration),
    /// One line per fault: when, what, on which nodes.
    pub log: Vec<String>,
}

impl Nemesis {
    pub fn new(seed: u64, history: History) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(seed),
            history,
            hold: (Duration::from_millis(1500), Duration::from_millis(4000)),
            log: Vec::new(),
        }
    }

    /// Injects faults from `faults` until `run_for` has passed, healing each one and waiting
    /// for a leader before the next: the first one first (so a short run surely has it), then
    /// random picks (list a fault twice to make it likelier).
    pub fn run(&mut self, cluster: &mut Cluster, faults: &[Fault], run_for: Duration) {
        let started = Instant::now();
        let mut first = faults.first().copied();
        while started.elapsed() < run_for {
            std::thread::sleep(Duration::from_millis(self.rng.gen_range(300..1200)));
            let fault = first.take().unwrap_or_else(|| *faults.choose(&mut self.rng).expect("at least one fault"));
            self.inject(cluster, fault, faults);
        }
    }

    /// A moment in the history's clock, for the log.
    fn now(&self) -> String {
        format!("{:.3}s", self.history.now_nanos() as f64 / 1e9)
    }

    fn hold(&mut self) {
        let (lo, hi) = self.hold;
        std::thread::sleep(self.rng.gen_range(lo..=hi));
    }

    fn note(&mut self, started: String, what: String) {
        self.log.push(format!("{started} .. {}  {what}", self.now()));
    }

    /// Injects `fault`; an [`Fault::Overlap`] picks its two faults from `choices`.
    pub fn inject(&mut self, cluster: &mut Cluster, fault: Fault, choices: &[Fault]) {
        let n = cluster.nodes.len();
        let started = self.now();
        let leader = cluster.wait_leader();
        match fault {
            f if f.lasts() => {
                let all: Vec<usize> = (0..n).collect();
                let (active, what) = self.begin(cluster, fault, leader, &all);
                self.hold();
                self.end(cluster, active);
                self.note(started, format!("{fault:?}: {what}, then healed"));
            }
            Fault::Overlap => self.overlap(cluster, choices, leader, started),
            Fault::PowerCut => {
                cluster.cut_power().expect("cutting the power");
                self.hold();
                cluster.restart_all().expect("starting the nodes after a power cut");
                self.note(started, format!("{fault:?}: every node lost power and started again"));
            }
            Fault::TransferLeader => {
                let mut moves = Vec::new();
                let mut from = leader;
                for _ in 0..self.rng.gen_range(1..=3) {
                    let to = (from + self.rng.gen_range(1..n)) % n;
                    let id = cluster.nodes[to].node_id().to_string();
                    // Not asserted: a node that is still catching up after the last fault may
                    // not win in time, which the command reports as an error.
                    let answer = cluster.nodes[from].cmd::<String>(&["RAFT.TRANSFERLEADER", &id]).unwrap_or_else(|e| e.to_string());
                    moves.push(format!("node {from} to node {to}: {answer}"));
                    std::thread::sleep(Duration::from_millis(self.rng.gen_range(100..800)));
                    from = cluster.wait_leader();
                }
                self.note(started, format!("{fault:?}: {}", moves.join("; ")));
            }
            Fault::Retime => {
                let election = self.rng.gen_range(8..=14);
                let heartbeat = self.rng.gen_range(1..=3);
                let order: Vec<usize> = (0..n).filter(|i| *i != leader).chain([leader]).collect();
                for i in order {
                    for (name, value) in [("election-ticks", election), ("heartbeat-ticks", heartbeat)] {
                        let set = cluster.nodes[i].cmd::<String>(&["RAFT.CONFIG", "SET", name, &value.to_string()]);
                        set.unwrap_or_else(|e| panic!("RAFT.CONFIG SET {name} {value} on node {i}: {e}"));
                    }
                }
                self.hold();
                self.note(started, format!("{fault:?}: election {election} ticks, heartbeat {heartbeat} on every node"));
            }
            Fault::RemoveAndReAdd => {
                let followers: Vec<usize> = (0..n).filter(|i| *i != leader).collect();
                let victim = *followers.choose(&mut self.rng).unwrap();
                let id = cluster.nodes[victim].node_id();
                let removed = cluster.nodes[leader].cmd::<String>(&["RAFT.REMOVEPEER", &id.to_string()]);
                match removed {
                    Ok(_) => {
                        cluster.nodes[victim].restart_empty().expect("restarting a removed node empty");
                        self.hold();
                        wait_for("the removed node to join again", Duration::from_secs(30), || {
                            let via = cluster.wait_leader();
                            cluster.join(victim, via).ok()
                        });
                        let new_id = cluster.nodes[victim].node_id();
                        self.note(started, format!("{fault:?}: node {victim} (id {id}) removed, wiped, joined again as id {new_id}"));
                    }
                    // A leadership change in between is fine: this fault simply did not happen.
                    Err(e) => self.note(started, format!("{fault:?}: REMOVEPEER {id} refused ({e}); skipped")),
                }
            }
            _ => unreachable!("{fault:?} lasts"),
        }
        let after = cluster.wait_leader();
        if let Some(line) = self.log.last_mut() {
            line.push_str(&format!(" [leader: node {leader} before, node {after} after]"));
            eprintln!("nemesis: {line}");
        }
    }

    /// Two faults that last, the second starting while the first holds (on another node, and
    /// never two cuts of the network at once), healed in either order.
    fn overlap(&mut self, cluster: &mut Cluster, choices: &[Fault], leader: usize, started: String) {
        let lasting: Vec<Fault> = choices.iter().copied().filter(|f| f.lasts()).collect();
        let Some(&first) = lasting.choose(&mut self.rng) else {
            return self.note(started, "Overlap: no fault of this run lasts; skipped".into());
        };
        let seconds: Vec<Fault> = lasting.iter().copied().filter(|f| !(f.is_network() && first.is_network())).collect();
        let Some(&second) = seconds.choose(&mut self.rng) else {
            return self.note(started, "Overlap: no second fault fits; skipped".into());
        };
        let all: Vec<usize> = (0..cluster.nodes.len()).collect();
        let (a, what_a) = self.begin(cluster, first, leader, &all);
        std::thread::sleep(Duration::from_millis(self.rng.gen_range(300..1500)));
        let spare: Vec<usize> = all.iter().copied().filter(|i| Some(*i) != a.node()).collect();
        // Whoever leads now, if anybody does yet (a paused or cut-off leader is not replaced at once).
        let leader_now = spare.iter().copied().find(|i| cluster.nodes[*i].state() == "leader");
        let leader_now = leader_now.unwrap_or_else(|| *spare.choose(&mut self.rng).unwrap());
        let (b, what_b) = self.begin(cluster, second, leader_now, &spare);
        self.hold();
        let (a_first, pause) = (self.rng.gen_bool(0.5), Duration::from_millis(self.rng.gen_range(0..1000)));
        let (x, y) = if a_first { (a, b) } else { (b, a) };
        self.end(cluster, x);
        std::thread::sleep(pause);
        self.end(cluster, y);
        let order = if a_first { "first healed first" } else { "second healed first" };
        self.note(started, format!("Overlap: {first:?}: {what_a}; while it held, {second:?}: {what_b}; {order}"));
    }

    /// Starts a fault that lasts, on a node of `spare` (the leader's, if it is one of them);
    /// returns it, to be ended, and what it did, for the log.
    fn begin(&mut self, cluster: &mut Cluster, fault: Fault, leader: usize, spare: &[usize]) -> (Active, String) {
        let random = *spare.choose(&mut self.rng).expect("a node to fault");
        let victim = match fault {
            Fault::KillLeader | Fault::PauseLeader | Fault::IsolateLeader if spare.contains(&leader) => leader,
            _ => random,
        };
        let n = cluster.nodes.len();
        match fault {
            Fault::KillLeader | Fault::KillRandom => {
                cluster.nodes[victim].kill9();
                (Active::Down(victim), format!("node {victim} killed -9"))
            }
            Fault::PowerCutRandom => {
                cluster.cut_power_of(victim).expect("cutting a node's power");
                (Active::Down(victim), format!("node {victim} lost power"))
            }
            Fault::PauseLeader | Fault::PauseRandom => {
                cluster.nodes[victim].pause();
                (Active::Paused(victim), format!("node {victim} stopped"))
            }
            Fault::IsolateLeader | Fault::SplitMajority | Fault::Bridge => {
                let net = cluster.network.as_ref().expect("network faults need Cluster::start_partitionable");
                let mut slots: Vec<usize> = (0..n).collect();
                slots.shuffle(&mut self.rng);
                let groups: Vec<Vec<usize>> = match fault {
                    Fault::IsolateLeader => vec![vec![victim], (0..n).filter(|i| *i != victim).collect()],
                    Fault::SplitMajority => {
                        let minority = (n - 1) / 2;
                        vec![slots[..minority].to_vec(), slots[minority..].to_vec()]
                    }
                    _ => {
                        // The bridge (slots[0]) is in no group, so it keeps both sides.
                        let half = (n - 1) / 2;
                        vec![slots[1..1 + half].to_vec(), slots[1 + half..].to_vec()]
                    }
                };
                net.partition(&groups);
                (Active::Partitioned, format!("groups {groups:?} (cut {})", net.describe()))
            }
            _ => unreachable!("{fault:?} does not last"),
        }
    }

    fn end(&mut self, cluster: &mut Cluster, active: Active) {
        match active {
            Active::Down(i) => cluster.nodes[i].restart().expect("restarting a node"),
            Active::Paused(i) => cluster.nodes[i].resume(),
            Active::Partitioned => cluster.network.as_ref().expect("a partitionable cluster").heal(),
        }
    }
}

/// A fault in force, until [`Nemesis::end`] heals it.
enum Active {
    /// Killed, or its power cut: it starts again.
    Down(usize),
    /// SIGSTOPped: it continues.
    Paused(usize),
    /// Links cut: every one is restored.
    Partitioned,
}

impl Active {
    /// The node this fault took out, for one that is about a single node.
    fn node(&self) -> Option<usize> {
        match self {
            Active::Down(i) | Active::Paused(i) => Some(*i),
            Active::Partitioned => None,
        }
    }
}
