//! Raftis answers what plain Redis answers. The same random commands (see
//! `raftis_integration::random_commands`) go to a plain redis-server and to a node of a 3-node
//! cluster, the leader or a follower that forwards them, alone, pipelined or in transactions.
//! Every reply must be plain Redis' own, and in the end every node must hold plain Redis' dataset,
//! also a follower restarted to replay the whole log.
//!
//! `RAFTIS_DIFF_SEED=N` replays one seed (a failure names its seed), `RAFTIS_DIFF_STEPS=N` runs
//! longer.

use bytes::Bytes;
use raftis::resp::Frame;
use raftis_integration::random_commands::{Drawn, Output, RandomCommands};
use raftis_integration::resp_conn::RespConn;
use raftis_integration::{free_port_pair, Cluster, Server};
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};

/// Seeds run when none is given: different mixes, the same ones every run.
const SEEDS: &[u64] = &[1, 2];
const STEPS: usize = 1500;
/// Relative TTLs are pinned by plain Redis and by the leader at moments a little apart.
const TTL_TOLERANCE_MS: i64 = 60_000;
/// The key `Cluster::wait_leader` writes to probe the leader.
const PROBE_KEY: &str = "__raftis_probe";

#[test]
fn random_commands_get_plain_redis_answers_and_leave_its_dataset_on_every_node() {
    let seeds: Vec<u64> = match std::env::var("RAFTIS_DIFF_SEED") {
        Ok(s) => vec![s.parse().expect("RAFTIS_DIFF_SEED is a number")],
        Err(_) => SEEDS.to_vec(),
    };
    let steps = std::env::var("RAFTIS_DIFF_STEPS").map_or(STEPS, |s| s.parse().expect("RAFTIS_DIFF_STEPS is a number"));
    for seed in seeds {
        run(seed, steps);
    }
}

fn run(seed: u64, steps: usize) {
    let mut cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut reference = RespConn::connect(plain.port).unwrap();
    ok(reference.call(&[b"SET", PROBE_KEY.as_bytes(), b"1"]).unwrap());
    let mut nodes: Vec<RespConn> = cluster.nodes.iter().map(|n| RespConn::connect(n.port).unwrap()).collect();
    let table = reference.call(&[b"COMMAND"]).unwrap();
    let mut commands = RandomCommands::new(&table, seed);
    let mut recent: VecDeque<String> = VecDeque::new();

    for step in 0..steps {
        let node = commands.rng().gen_range(0..nodes.len());
        let roll: f64 = commands.rng().gen();
        let batch: Vec<Drawn> = if roll < 0.02 {
            // SELECT is connection state: every connection moves together.
            let db = commands.rng().gen_range(0..3).to_string();
            for conn in nodes.iter_mut().chain(std::iter::once(&mut reference)) {
                ok(conn.call(&[b"SELECT", db.as_bytes()]).unwrap());
            }
            remember(&mut recent, format!("{step}: SELECT {db} everywhere"));
            continue;
        } else if roll < 0.07 {
            transaction(&mut commands)
        } else if roll < 0.15 {
            let n = commands.rng().gen_range(2..6);
            (0..n).map(|_| commands.draw()).collect()
        } else {
            vec![commands.draw()]
        };
        let args: Vec<Vec<Vec<u8>>> = batch.iter().map(|d| d.args.clone()).collect();
        let expected = reference.pipeline(&args).unwrap();
        let got = nodes[node].pipeline(&args).unwrap_or_else(|e| {
            panic!("seed {seed} step {step}: node {node} failed on {}: {e}\n{}", show_batch(&batch), cluster.nodes[node].log_tail())
        });
        let role = if node == leader { "leader" } else { "follower" };
        remember(&mut recent, format!("{step} ({role}): {}", show_batch(&batch)));
        for (i, drawn) in batch.iter().enumerate() {
            if !same(drawn.output, &expected[i], &got[i]) {
                panic!(
                    "seed {seed} step {step}: the {role} answered `{}`\n  plain Redis: {:?}\n  Raftis:      {:?}\nrecent steps:\n{}",
                    show(&drawn.args),
                    expected[i],
                    got[i],
                    recent.iter().cloned().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    // A follower killed and restarted replays the whole log, later than the others applied it:
    // it must reach the same dataset.
    drop(nodes);
    let replayed = (leader + 1) % cluster.nodes.len();
    cluster.nodes[replayed].restart().unwrap();
    // Each node's own dataset against plain Redis' (consistency=low: a follower answers from its
    // own), then all of them against each other, expiry times included.
    cluster.wait_converged(&[0, 1, 2]);
    cluster.config_set("consistency", "low");
    // wait_leader probed the leader again (a FLUSHALL may have removed the first probe).
    ok(reference.call(&[b"SELECT", b"0"]).unwrap());
    ok(reference.call(&[b"SET", PROBE_KEY.as_bytes(), b"1"]).unwrap());
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut conn = RespConn::connect(node.port).unwrap();
        for db in 0..16 {
            let want = dataset(&mut reference, db);
            let have = dataset(&mut conn, db);
            let keys = |d: &BTreeMap<Bytes, KeyState>| d.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&have), keys(&want), "seed {seed}: node {i}'s db {db} holds other keys than plain Redis");
            for (key, w) in &want {
                let h = &have[key];
                assert!(
                    w.kind == h.kind && w.digest == h.digest && deadlines_agree(w.expires_at_ms, h.expires_at_ms),
                    "seed {seed}: node {i}'s db {db} key {key:?} differs: plain Redis {w:?}, Raftis {h:?}"
                );
            }
        }
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// MULTI, a few commands, then EXEC (or now and then DISCARD). Only commands whose replies compare
/// exactly go inside: EXEC's reply is compared as a whole.
fn transaction(commands: &mut RandomCommands) -> Vec<Drawn> {
    let exact = |args: &[&str]| Drawn { args: args.iter().map(|a| a.as_bytes().to_vec()).collect(), output: Output::Exact };
    let mut batch = vec![exact(&["MULTI"])];
    let n = commands.rng().gen_range(0..5);
    while batch.len() <= n {
        let drawn = commands.draw();
        if drawn.output == Output::Exact {
            batch.push(drawn);
        }
    }
    let end = if commands.rng().gen_bool(0.8) { "EXEC" } else { "DISCARD" };
    batch.push(exact(&[end]));
    batch
}

/// Whether two replies agree as far as `output` says they can.
fn same(output: Output, expected: &Frame, got: &Frame) -> bool {
    match (output, expected, got) {
        (Output::Exact, ..) => expected == got,
        (_, Frame::Error(_), _) | (_, _, Frame::Error(_)) => expected == got,
        (Output::Unordered, ..) => leaves(expected) == leaves(got),
        (Output::ErrorsOnly, ..) => true,
        (Output::Deadline, Frame::Integer(a), Frame::Integer(b)) => deadlines_agree(*a, *b),
        (Output::Deadline, ..) => expected == got,
    }
}

/// Two expiry times (or -1, -2 for none) from servers that pinned the same relative TTL.
fn deadlines_agree(a: i64, b: i64) -> bool {
    if a < 0 || b < 0 {
        a == b
    } else {
        (a - b).abs() < TTL_TOLERANCE_MS
    }
}

/// Every scalar in a reply, sorted: what an unordered reply must agree on.
fn leaves(frame: &Frame) -> Vec<String> {
    fn walk(frame: &Frame, out: &mut Vec<String>) {
        match frame {
            Frame::Array(items) => items.iter().for_each(|i| walk(i, out)),
            other => out.push(format!("{other:?}")),
        }
    }
    let mut out = Vec::new();
    walk(frame, &mut out);
    out.sort();
    out
}

#[derive(Debug, PartialEq, Eq)]
struct KeyState {
    kind: Frame,
    digest: Frame,
    /// PEXPIRETIME: -1 without a TTL.
    expires_at_ms: i64,
}

/// Every key of database `db` with its type, value digest and expiry time.
fn dataset(conn: &mut RespConn, db: usize) -> BTreeMap<Bytes, KeyState> {
    ok(conn.call(&[b"SELECT", db.to_string().as_bytes()]).unwrap());
    let mut out = BTreeMap::new();
    let mut cursor = Bytes::from_static(b"0");
    loop {
        let reply = conn.call(&[b"SCAN", &cursor, b"COUNT", b"1000"]).unwrap();
        let Frame::Array(parts) = reply else { panic!("SCAN answered {reply:?}") };
        let [Frame::Bulk(next), Frame::Array(keys)] = parts.as_slice() else { panic!("SCAN answered {parts:?}") };
        for key in keys {
            let Frame::Bulk(key) = key else { panic!("SCAN listed {key:?}") };
            let expires_at_ms = match conn.call(&[b"PEXPIRETIME", key]).unwrap() {
                Frame::Integer(t) => t,
                other => panic!("PEXPIRETIME answered {other:?}"),
            };
            let state = KeyState {
                kind: conn.call(&[b"TYPE", key]).unwrap(),
                digest: conn.call(&[b"DEBUG", b"DIGEST-VALUE", key]).unwrap(),
                expires_at_ms,
            };
            out.insert(key.clone(), state);
        }
        if next.as_ref() == b"0" {
            return out;
        }
        cursor = next.clone();
    }
}

fn ok(reply: Frame) {
    assert_eq!(reply, Frame::Simple("OK".into()));
}

fn remember(recent: &mut VecDeque<String>, line: String) {
    if recent.len() == 30 {
        recent.pop_front();
    }
    recent.push_back(line);
}

fn show(args: &[Vec<u8>]) -> String {
    args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>().join(" ")
}

fn show_batch(batch: &[Drawn]) -> String {
    batch.iter().map(|d| show(&d.args)).collect::<Vec<_>>().join(" | ")
}
