//! Raftis answers what plain Redis answers. The same random commands (see
//! `raftis_integration::random_commands`) go to a plain redis-server and to a node of a 3-node
//! cluster, the leader or a follower that forwards them, alone, pipelined or in transactions.
//! Every reply must be plain Redis' own, and in the end every node must hold plain Redis' dataset
//! and function libraries, also a follower restarted to replay the whole log.
//!
//! Runs are in RESP2 and in RESP3 (`HELLO 3` on every connection), where Redis' replies carry
//! their types (maps, sets, doubles) that a relayed or held reply must keep.
//!
//! `RAFTIS_DIFF_SEED=N` replays one seed (a failure names its seed, protocol and read
//! consistency), `RAFTIS_DIFF_PROTOCOL=2|3` and `RAFTIS_DIFF_CONSISTENCY=high|medium|low` pick
//! them for it (default RESP2 and high; at `low` a follower may answer a read before it has
//! applied a write the leader already acknowledged, which is `low`'s documented staleness, not a
//! failure), `RAFTIS_DIFF_STEPS=N` runs longer.

use raftis_integration::random_commands::{as_removal, Drawn, Output, RandomCommands};
use raftis_integration::resp_conn::{Reply, RespConn};
use raftis_integration::{free_port_pair, info_field, libraries, redis, Cluster, Server, PROBE_KEY};
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};

/// Seeds, protocols and read consistency levels run when none is given: different mixes, the
/// same ones every run.
const RUNS: &[(u64, u8, &str)] = &[(1, 2, "high"), (2, 3, "high"), (3, 2, "medium")];
const STEPS: usize = 1500;
/// Relative TTLs are pinned by plain Redis and by the leader at moments a little apart.
const TTL_TOLERANCE_MS: i64 = 60_000;

#[test]
fn random_commands_get_plain_redis_answers_and_leave_its_dataset_on_every_node() {
    let runs: Vec<(u64, u8, String)> = match std::env::var("RAFTIS_DIFF_SEED") {
        Ok(s) => {
            let protocol = std::env::var("RAFTIS_DIFF_PROTOCOL").map_or(2, |p| p.parse().expect("RAFTIS_DIFF_PROTOCOL is 2 or 3"));
            let consistency = std::env::var("RAFTIS_DIFF_CONSISTENCY").unwrap_or_else(|_| "high".into());
            vec![(s.parse().expect("RAFTIS_DIFF_SEED is a number"), protocol, consistency)]
        }
        Err(_) => RUNS.iter().map(|(seed, protocol, consistency)| (*seed, *protocol, consistency.to_string())).collect(),
    };
    let steps = std::env::var("RAFTIS_DIFF_STEPS").map_or(STEPS, |s| s.parse().expect("RAFTIS_DIFF_STEPS is a number"));
    for (seed, protocol, consistency) in runs {
        run(seed, protocol, &consistency, steps);
    }
}

/// A connection speaking `protocol`.
fn connect(port: u16, protocol: u8) -> RespConn {
    let mut conn = RespConn::connect(port).unwrap();
    if protocol == 3 {
        let hello = conn.call(&[b"HELLO", b"3"]).unwrap();
        assert!(!hello.is_error(), "HELLO 3 answered {hello:?}");
    }
    conn
}

fn run(seed: u64, first_protocol: u8, consistency: &str, steps: usize) {
    let mut protocol = first_protocol;
    // Snapshots every few hundred entries: the restarted follower loads one and replays the rest.
    let mut cluster = Cluster::start(3, &["follower-proxy=yes", "snapshot-threshold=400"]).unwrap();
    let leader = cluster.wait_leader();
    cluster.config_set("consistency", consistency);
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut reference = connect(plain.port, protocol);
    ok(reference.call(&[b"SET", PROBE_KEY.as_bytes(), b"1"]).unwrap());
    let mut nodes: Vec<RespConn> = cluster.nodes.iter().map(|n| connect(n.port, protocol)).collect();
    let table = reference.call(&[b"COMMAND"]).unwrap();
    let mut commands = RandomCommands::new(&table, seed);
    // The scripts' SHA1s, from plain Redis, whose cache is then emptied again.
    let shas = RandomCommands::scripts()
        .iter()
        .map(|body| reference.call(&[b"SCRIPT", b"LOAD", body.as_bytes()]).unwrap().bytes().unwrap().to_vec())
        .collect();
    ok(reference.call(&[b"SCRIPT", b"FLUSH"]).unwrap());
    commands.know_shas(shas);
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
            let mut pipeline: Vec<Drawn> = (0..n).map(|_| commands.draw()).collect();
            if commands.rng().gen_bool(0.2) {
                // The protocol changes in the middle of the pipeline: the replies behind HELLO
                // come in the other one (HELLO's own reply names the server and the client).
                protocol = 5 - protocol;
                let hello = Drawn { args: vec![b"HELLO".to_vec(), protocol.to_string().into_bytes()], output: Output::ErrorsOnly };
                let at = commands.rng().gen_range(0..=pipeline.len());
                pipeline.insert(at, hello);
                for (i, conn) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != node) {
                    let hello = conn.call(&[b"HELLO", protocol.to_string().as_bytes()]).unwrap();
                    assert!(!hello.is_error(), "HELLO {protocol} on node {i}: {hello:?}");
                }
            }
            pipeline
        } else {
            vec![commands.draw()]
        };
        let args: Vec<Vec<Vec<u8>>> = batch.iter().map(|d| d.args.clone()).collect();
        let mut on_raftis = |args: &[Vec<Vec<u8>>]| {
            nodes[node].pipeline(args).unwrap_or_else(|e| {
                let recent = recent.iter().cloned().collect::<Vec<_>>().join("\n");
                let log = cluster.nodes[node].log_tail();
                panic!("seed {seed} (RESP{first_protocol}, {consistency}) step {step}: node {node} failed on {}: {e}\nrecent steps:\n{recent}\n{log}", show_batch(&batch))
            })
        };
        let (expected, got) = if batch.iter().any(|d| d.output == Output::Popped) {
            // Raftis pops first; plain Redis then removes the members Raftis popped, and must
            // find every one of them there.
            let got = on_raftis(&args);
            let removals: Vec<Option<(Vec<Vec<u8>>, usize)>> =
                batch.iter().zip(&got).map(|(d, g)| if d.output == Output::Popped { as_removal(&d.args, g) } else { None }).collect();
            let instead: Vec<Vec<Vec<u8>>> =
                removals.iter().zip(&args).map(|(r, a)| r.as_ref().map_or_else(|| a.clone(), |(srem, _)| srem.clone())).collect();
            let mut expected = reference.pipeline(&instead).unwrap();
            for (i, removal) in removals.iter().enumerate() {
                if let Some((_, n)) = removal {
                    assert_eq!(
                        expected[i].integer(),
                        Some(*n as i64),
                        "seed {seed} step {step}: `{}` popped {:?}, which plain Redis' set did not all hold",
                        show(&args[i]),
                        got[i]
                    );
                    expected[i] = got[i].clone();
                }
            }
            (expected, got)
        } else {
            (reference.pipeline(&args).unwrap(), on_raftis(&args))
        };
        let role = if node == leader { "leader" } else { "follower" };
        remember(&mut recent, format!("{step} ({role}): {}", show_batch(&batch)));
        for (i, drawn) in batch.iter().enumerate() {
            if !same(drawn.output, &expected[i], &got[i]) {
                panic!(
                    "seed {seed} (RESP{first_protocol}, {consistency}) step {step}: the {role} answered `{}`\n  plain Redis: {:?}\n  Raftis:      {:?}\nrecent steps:\n{}",
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
    if info_field(&cluster.nodes[replayed], "snapshot_index") == 0 {
        // A short run wrote too little for one: it loads a snapshot all the same.
        let _: redis::Value = cluster.nodes[replayed].cmd(&["RAFT.SNAPSHOT"]).unwrap();
    }
    cluster.nodes[replayed].restart().unwrap();
    // Each node's own dataset against plain Redis' (consistency=low: a follower answers from its
    // own), then all of them against each other, expiry times included.
    cluster.wait_converged(&[0, 1, 2]);
    cluster.config_set("consistency", "low");
    // wait_leader probed the leader again (a FLUSHALL may have removed the first probe).
    ok(reference.call(&[b"SELECT", b"0"]).unwrap());
    ok(reference.call(&[b"SET", PROBE_KEY.as_bytes(), b"1"]).unwrap());
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut conn = connect(node.port, protocol);
        for db in 0..16 {
            let want = dataset(&mut reference, db);
            let have = dataset(&mut conn, db);
            let keys = |d: &BTreeMap<Vec<u8>, KeyState>| d.keys().cloned().collect::<Vec<_>>();
            assert_eq!(
                keys(&have),
                keys(&want),
                "seed {seed} (RESP{first_protocol}, {consistency}): node {i}'s db {db} holds other keys than plain Redis"
            );
            for (key, w) in &want {
                let h = &have[key];
                assert!(
                    w.kind == h.kind && w.digest == h.digest && deadlines_agree(w.expires_at_ms, h.expires_at_ms),
                    "seed {seed} (RESP{first_protocol}, {consistency}): node {i}'s db {db} key {key:?} differs: plain Redis {w:?}, Raftis {h:?}"
                );
            }
        }
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert_eq!(
        libraries(&cluster.nodes[0]),
        libraries(&plain),
        "seed {seed} (RESP{first_protocol}, {consistency}): the function libraries differ"
    );
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
fn same(output: Output, expected: &Reply, got: &Reply) -> bool {
    if matches!(output, Output::Exact | Output::Popped) || expected.is_error() || got.is_error() {
        return expected == got;
    }
    match output {
        Output::Unordered => expected.sorted_leaves() == got.sorted_leaves(),
        Output::Deadline => match (expected.integer(), got.integer()) {
            (Some(a), Some(b)) => deadlines_agree(a, b),
            _ => expected == got,
        },
        Output::ErrorsOnly | Output::Exact | Output::Popped => true,
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

#[derive(Debug, PartialEq, Eq)]
struct KeyState {
    kind: Reply,
    digest: Reply,
    /// PEXPIRETIME: -1 without a TTL.
    expires_at_ms: i64,
}

/// Every key of database `db` with its type, value digest and expiry time.
fn dataset(conn: &mut RespConn, db: usize) -> BTreeMap<Vec<u8>, KeyState> {
    ok(conn.call(&[b"SELECT", db.to_string().as_bytes()]).unwrap());
    let mut out = BTreeMap::new();
    let mut cursor = b"0".to_vec();
    loop {
        let reply = conn.call(&[b"SCAN", &cursor, b"COUNT", b"1000"]).unwrap();
        let (next, keys) = match reply.items() {
            Some([next, keys]) => (next.bytes().expect("a cursor").to_vec(), keys.items().expect("keys").to_vec()),
            _ => panic!("SCAN answered {reply:?}"),
        };
        for key in keys {
            let key = key.bytes().unwrap_or_else(|| panic!("SCAN listed {key:?}")).to_vec();
            let expires_at = conn.call(&[b"PEXPIRETIME", &key]).unwrap();
            let state = KeyState {
                kind: conn.call(&[b"TYPE", &key]).unwrap(),
                digest: conn.call(&[b"DEBUG", b"DIGEST-VALUE", &key]).unwrap(),
                expires_at_ms: expires_at.integer().unwrap_or_else(|| panic!("PEXPIRETIME answered {expires_at:?}")),
            };
            out.insert(key, state);
        }
        if next == b"0" {
            return out;
        }
        cursor = next;
    }
}

fn ok(reply: Reply) {
    assert_eq!(reply, Reply::Line(b'+', b"OK".to_vec()));
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
