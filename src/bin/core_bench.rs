//! Proposals per second for three in-process nodes (real LMDB directories, real loopback TCP),
//! at each durability level. No Redis involved: this measures the Raft core alone.
//!
//!     cargo run --release --bin raftis-core-bench [proposals] [in-flight] [bytes]

use raftis::config::{Durability, Timing};
use raftis::membership::NodeInfo;
use raftis::node::{ApplyBatch, Node, NodeConfig, StateMachine};
use raftis::proposal::Callback;
use raftis::storage::LogStore;
use raftis::{LogIndex, NodeId};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Applies nothing; answers the proposer.
struct Sink;

impl StateMachine for Sink {
    type Waiter = Callback<LogIndex>;

    fn apply(&mut self, batch: ApplyBatch<Self::Waiter>) {
        for e in batch.entries {
            if let Some(w) = e.waiter {
                w(Ok(e.index));
            }
        }
    }

    fn restore(&mut self, _index: LogIndex, _data: &[u8]) {}
}

fn start(id: u64, dir: &Path, port: u16, durability: Durability, bootstrap: bool) -> anyhow::Result<Node<Sink>> {
    let info = NodeInfo { id: NodeId(id), raft_addr: format!("127.0.0.1:{port}"), client_addr: format!("127.0.0.1:{port}") };
    let store = LogStore::open(dir)?;
    if bootstrap {
        Node::<Sink>::bootstrap(&store, &info)?;
    }
    let cfg = NodeConfig {
        id: NodeId(id),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        info,
        timing: Timing { tick_interval: Duration::from_millis(20), ..Timing::default() },
        durability,
        snapshot_dir: dir.to_path_buf(),
        trailing_logs: 1000,
        trailing_bytes: 0,
        max_entry_bytes: raftis::settings::DEFAULT_MAX_ENTRY_BYTES,
        password: None,
        shared: None,
    };
    Node::start(cfg, store, Sink)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn run(durability: Durability, proposals: usize, in_flight: usize, size: usize) -> anyhow::Result<f64> {
    let root = std::env::temp_dir().join(format!("raftis-core-bench-{}-{durability}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let rate = measure(&root, durability, proposals, in_flight, size);
    let _ = std::fs::remove_dir_all(&root);
    rate
}

fn measure(root: &Path, durability: Durability, proposals: usize, in_flight: usize, size: usize) -> anyhow::Result<f64> {
    let leader = start(1, &root.join("n1"), free_port(), durability, true)?;
    wait_until("node 1 to lead", || leader.status().leader_ready)?;
    let mut others = Vec::new();
    for id in [2, 3] {
        let port = free_port();
        let node = start(id, &root.join(format!("n{id}")), port, durability, false)?;
        let info = NodeInfo { id: NodeId(id), raft_addr: format!("127.0.0.1:{port}"), client_addr: String::new() };
        leader.add_member(info, Instant::now() + Duration::from_secs(20)).map_err(|e| anyhow::anyhow!("{e}"))?;
        others.push(node);
    }

    let (tx, rx) = mpsc::channel();
    let payload = vec![b'x'; size.max(1)];
    let started = Instant::now();
    let (mut sent, mut done) = (0, 0);
    while done < proposals {
        while sent < proposals && sent - done < in_flight {
            let tx = tx.clone();
            leader.propose(
                payload.clone(),
                Box::new(move |r| {
                    let _ = tx.send(r.is_ok());
                }),
                Instant::now() + Duration::from_secs(10),
            );
            sent += 1;
        }
        let ok = rx.recv_timeout(Duration::from_secs(20))?;
        anyhow::ensure!(ok, "a proposal failed");
        done += 1;
    }
    Ok(proposals as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (proposals, in_flight, size) = (arg(1, 50_000), arg(2, 256), arg(3, 64));
    println!("3 in-process nodes, {proposals} proposals of {size} bytes, {in_flight} in flight");
    for durability in [Durability::High, Durability::Medium, Durability::Low] {
        let rate = run(durability, proposals, in_flight, size)?;
        println!("durability={durability:<6} {rate:>10.0} proposals/s");
    }
    Ok(())
}
