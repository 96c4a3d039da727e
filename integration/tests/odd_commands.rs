//! Every command in Redis' table, with odd arguments, on a three-node cluster: whatever Redis or
//! Raftis answers, no server may crash, no handler may panic, no connection may be dropped or left
//! without an answer, and in the end every node must hold the same dataset, also a follower
//! killed and restarted, which replays its log (after the snapshot a drawn `RAFT.SNAPSHOT` made).
//!
//! `differential.rs` sends well-formed commands and compares replies with plain Redis'. These are
//! not well formed: the arity is Redis' own, sometimes one off, and the arguments are words from
//! other commands' syntax, numbers at the limits, binary and long strings. They go to the leader
//! and to followers (which forward), in RESP2 and RESP3, alone and inside MULTI, and include the
//! module's own `RAFT.*` commands and the internal `RAFT._*` ones a client could call directly.
//!
//! A second run does the same while nodes are killed and restarted.
//!
//! `RAFTIS_ODD_SEED=N` replays a seed (a failure names it), `RAFTIS_ODD_STEPS=N` runs longer,
//! `RAFTIS_ODD_KILL_EVERY=N` kills more or less often in the second run.

use raftis_core::function_payload::crc64;
use raftis_integration::resp_conn::{Reply, RespConn};
use raftis_integration::{info_field, info_field_of_live, Cluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const STEPS: usize = 2500;
const SEED: u64 = 1;

/// Commands left out, whole or as `name|subcommand`: they end the server or the connection, stop
/// every client (`CLIENT PAUSE`), stop replies (`CLIENT REPLY`, `REPLCONF ACK`), turn the connection
/// into something that answers more than once per command (subscriptions, `MONITOR`, `SYNC`), or
/// change the membership, which the final comparison counts on.
const LEFT_OUT: &[&str] = &[
    "shutdown",
    "debug",
    "module",
    "monitor",
    "quit",
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
    "sync",
    "psync",
    "replconf",
    "client|pause",
    "client|reply",
    "client|kill",
    "acl|setuser",
    "acl|deluser",
    "acl|load",
    "raft.addpeer",
    "raft.removepeer",
];

/// What arguments are drawn from.
const WORDS: &[&[u8]] = &[
    b"k1",
    b"k2",
    b"{t}a",
    b"{t}b",
    b"",
    b"0",
    b"1",
    b"-1",
    b"2",
    b"3",
    b"100",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551616",
    b"1.5",
    b"inf",
    b"-inf",
    b"nan",
    b"EX",
    b"PX",
    b"EXAT",
    b"PXAT",
    b"NX",
    b"XX",
    b"KEEPTTL",
    b"GET",
    b"BLOCK",
    b"STREAMS",
    b"$",
    b">",
    b"*",
    b"+",
    b"-",
    b"COUNT",
    b"LIMIT",
    b"BY",
    b"STORE",
    b"WITHSCORES",
    b"MAXLEN",
    b"~",
    b"=",
    b"GROUP",
    b"LEFT",
    b"RIGHT",
    b"WEIGHTS",
    b"AGGREGATE",
    b"SUM",
    b"MIN",
    b"MAX",
    b"0-1",
    b"1-0",
    b"\x00\xff\xfe",
    b"REPLACE",
    b"ABSTTL",
    b"IDLETIME",
    b"FREQ",
    b"MATCH",
    b"TYPE",
    b"LEN",
    b"RANK",
    b"IDX",
    b"MINMATCHLEN",
    b"SCHEDULE",
    b"ASYNC",
    b"consistency",
    b"durability",
    b"follower-proxy",
    b"low",
    b"medium",
    b"high",
    b"yes",
    b"no",
];

/// How long a blocking command may wait before its connection is dropped and opened anew; any
/// other command must answer within the connection's usual 15 s.
const BLOCKING_WAIT: Duration = Duration::from_millis(300);

struct Command {
    name: Vec<u8>,
    arity: i64,
    subcommands: Vec<Vec<u8>>,
    blocking: bool,
}

#[test]
fn every_command_with_odd_arguments_leaves_every_node_running_and_alike() {
    run(None);
}

/// The same while a node, the leader half the time, is killed and restarted every 500 commands:
/// what was cut short by a kill or a change of leader may have been applied or not, but every node
/// must end with the same dataset, and nothing may panic.
#[test]
fn odd_commands_while_nodes_are_killed_leave_every_node_alike() {
    run(Some(std::env::var("RAFTIS_ODD_KILL_EVERY").map_or(500, |s| s.parse().expect("RAFTIS_ODD_KILL_EVERY is a number"))));
}

fn run(kill_every: Option<usize>) {
    let seed = std::env::var("RAFTIS_ODD_SEED").map_or(SEED, |s| s.parse().expect("RAFTIS_ODD_SEED is a number"));
    let steps = std::env::var("RAFTIS_ODD_STEPS").map_or(STEPS, |s| s.parse().expect("RAFTIS_ODD_STEPS is a number"));
    eprintln!("RAFTIS_ODD_SEED={seed} RAFTIS_ODD_STEPS={steps}, a kill every {kill_every:?} commands");
    let mut cluster = Cluster::start(3, &["follower-proxy=yes", "write-timeout=2000"]).unwrap();
    let mut leader = cluster.wait_leader();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let term = info_field_of_live(&cluster.nodes[leader], "term");
    let table = command_table(ports[leader]);
    assert!(table.len() > 200 && table.iter().any(|c| c.name == b"raft._cmd"), "{} commands", table.len());

    let mut rng = StdRng::seed_from_u64(seed);
    let mut conns: Vec<RespConn> = ports.iter().map(|p| connect(*p, &mut rng)).collect();
    let (mut answered, mut errors, mut gave_up_waiting) = (0usize, 0usize, 0usize);
    let mut kills = 0;
    for step in 0..steps {
        if kill_every.is_some_and(|every| step % every == every - 1) {
            let victim = if rng.gen_bool(0.5) { leader } else { rng.gen_range(0..ports.len()) };
            cluster.nodes[victim].kill9();
            cluster.nodes[victim].restart().unwrap();
            leader = cluster.wait_leader();
            conns[victim] = connect(ports[victim], &mut rng);
            kills += 1;
        }
        // Most go to the leader, whose dataset every write goes through.
        let node = if rng.gen_bool(0.6) { leader } else { rng.gen_range(0..ports.len()) };
        let mut batch = vec![draw(&table, &mut rng)];
        if rng.gen_bool(0.05) {
            batch = std::iter::once(vec![b"MULTI".to_vec()])
                .chain((0..rng.gen_range(1..5)).map(|_| draw(&table, &mut rng)))
                .chain(std::iter::once(vec![b"EXEC".to_vec()]))
                .collect();
        }
        let blocking = batch.len() == 1 && table.iter().any(|c| c.blocking && c.name.eq_ignore_ascii_case(&batch[0][0]));
        let what = || format!("step {step} (RAFTIS_ODD_SEED={seed}), port {}: {}", ports[node], shown(&batch));
        let conn = &mut conns[node];
        conn.set_read_timeout(if blocking { BLOCKING_WAIT } else { Duration::from_secs(15) }).unwrap();
        let replies = conn.pipeline(&batch);
        match replies {
            Ok(replies) => {
                for reply in &replies {
                    let text = reply.text().unwrap_or_default();
                    assert!(!text.contains("internal error"), "{}: {reply:?}", what());
                    if reply.is_error() {
                        errors += 1;
                    } else {
                        answered += 1;
                    }
                }
            }
            Err(e) => {
                let waited = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
                // A leader that lost its leadership closes the connections whose reads it cannot
                // confirm, and a killed node closes them all; nothing else may drop one, and only a
                // blocking command may wait.
                let new_term = info_field(&cluster.nodes[leader], "term") != term;
                assert!((waited && blocking) || new_term || kills > 0, "{}: {e:#}", what());
                gave_up_waiting += 1;
                conns[node] = connect(ports[node], &mut rng);
            }
        }
    }
    eprintln!("{answered} replies, {errors} errors, {gave_up_waiting} connections given up on, {kills} kills");
    // Enough of the commands did something for the comparison to mean something.
    assert!(answered > steps / 4, "{answered} of {steps} commands answered without an error");

    for (i, node) in cluster.nodes.iter().enumerate() {
        let pong: String = node.cmd(&["PING"]).unwrap_or_else(|e| panic!("node {i} after the run: {e}"));
        assert_eq!(pong, "PONG");
        assert!(!node.log().contains("panic"), "node {i} logged a panic:\n{}", node.log_tail());
    }
    cluster.assert_same_dataset(&[0, 1, 2]);

    // What the log holds, replayed, makes the same dataset again.
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % cluster.nodes.len();
    cluster.nodes[follower].kill9();
    cluster.nodes[follower].restart().unwrap();
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A connection to `port`, in RESP3 (`HELLO 3`) half the time.
fn connect(port: u16, rng: &mut StdRng) -> RespConn {
    let mut conn = RespConn::connect(port).unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    if rng.gen_bool(0.5) {
        let hello = conn.call(&[b"HELLO", b"3"]).unwrap();
        assert!(!hello.is_error(), "HELLO 3 on {port}: {hello:?}");
    }
    conn
}

/// One command: a name from the table (and a subcommand, mostly), then as many arguments as its
/// arity asks, or a few more where it takes any number, and now and then one too few or too many.
fn draw(table: &[Command], rng: &mut StdRng) -> Vec<Vec<u8>> {
    let command = &table[rng.gen_range(0..table.len())];
    let mut args = vec![command.name.clone()];
    if !command.subcommands.is_empty() && rng.gen_bool(0.9) {
        args.push(command.subcommands[rng.gen_range(0..command.subcommands.len())].clone());
    }
    let mut wanted = command.arity.unsigned_abs() as i64 - args.len() as i64;
    if command.arity < 0 {
        wanted += [0, 0, 1, 2, 3, 4, 6][rng.gen_range(0..7)];
    }
    if rng.gen_bool(0.05) {
        wanted += if rng.gen_bool(0.5) { 1 } else { -1 };
    }
    for _ in 0..wanted.max(0) {
        let word = if rng.gen_bool(0.01) { vec![b'x'; 300] } else { WORDS[rng.gen_range(0..WORDS.len())].to_vec() };
        args.push(word);
    }
    args
}

/// Redis' command table, as `COMMAND` lists it on `port`, without [`LEFT_OUT`].
fn command_table(port: u16) -> Vec<Command> {
    let mut conn = RespConn::connect(port).unwrap();
    let listed = conn.call(&[b"COMMAND"]).unwrap();
    let mut table = Vec::new();
    for entry in listed.items().expect("COMMAND lists commands") {
        let fields = entry.items().expect("a command is an array");
        let name = fields[0].bytes().unwrap().to_ascii_lowercase();
        if LEFT_OUT.contains(&String::from_utf8_lossy(&name).as_ref()) {
            continue;
        }
        let flags: Vec<String> = fields[2].items().unwrap().iter().filter_map(Reply::text).collect();
        let subcommands = fields.get(9).and_then(Reply::items).unwrap_or_default();
        let subcommands = subcommands
            .iter()
            .filter_map(|sub| sub.items()?.first()?.text())
            .filter(|full| !LEFT_OUT.contains(&full.to_ascii_lowercase().as_str()))
            .filter_map(|full| Some(full.split_once('|')?.1.as_bytes().to_vec()))
            .collect();
        let blocking = flags.iter().any(|f| f == "blocking") || name == b"wait";
        table.push(Command { name, arity: fields[1].integer().unwrap(), subcommands, blocking });
    }
    table
}

fn shown(batch: &[Vec<Vec<u8>>]) -> String {
    let shown: Vec<String> =
        batch.iter().map(|args| args.iter().map(|a| format!("{:?}", String::from_utf8_lossy(a))).collect::<Vec<_>>().join(" ")).collect();
    shown.join(" | ")
}

/// `RESTORE` payloads that pass Redis' checksum and shallow checks but are malformed inside: a
/// hash listing one field twice, and one whose entry claims to run past the end. Redis decodes a
/// payload only as the command runs, and where no client's command runs (as every node applies
/// the log) a decoding error makes it exit; with its default `sanitize-dump-payload no` it takes
/// both payloads, and the second crashes a server once anything reads the key. One such command
/// would have stopped every node, and again as they replayed their logs. Now each is refused,
/// to the leader's client, a follower's (forwarding) and inside `MULTI`, and inside a script, a
/// `RESTORE` is refused whatever its payload; every node keeps running.
#[test]
fn malformed_restore_payloads_are_refused_on_every_node() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let mut conns = [RespConn::connect(cluster.leader().port).unwrap(), RespConn::connect(cluster.nodes[(leader + 1) % 3].port).unwrap()];
    assert_eq!(conns[0].call(&[b"HSET", b"src", b"a", b"1", b"b", b"2"]).unwrap().integer(), Some(2));
    let dump = conns[0].call(&[b"DUMP", b"src"]).unwrap().bytes().expect("DUMP's payload").to_vec();
    let field_b = dump.windows(2).position(|w| w == b"\x81b").expect("field b in the listpack");
    let crafted = |entry: &[u8]| {
        // The payload ends with its RDB version and the CRC-64 of everything before it.
        let mut body = dump[..dump.len() - 8].to_vec();
        body[field_b..field_b + 2].copy_from_slice(entry);
        let crc = crc64(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        body
    };
    assert_eq!(crafted(b"\x81b"), dump, "the payload is rebuilt as Redis made it");
    for (via, conn) in ["leader", "follower"].into_iter().zip(&mut conns) {
        for (key, entry) in [(&b"twice"[..], b"\x81a"), (b"overrun", b"\x8ab")] {
            let name = format!("{via}: {}", String::from_utf8_lossy(key));
            let reply = conn.call(&[b"RESTORE", key, b"0", &crafted(entry)]).unwrap();
            assert_eq!(reply.text().as_deref(), Some("ERR Bad data format"), "{name}: {reply:?}");
            // Inside a transaction, the others still run, as in Redis.
            let replies = conn
                .pipeline(&[
                    vec![b"MULTI".to_vec()],
                    vec![b"RESTORE".to_vec(), key.to_vec(), b"0".to_vec(), crafted(entry)],
                    vec![b"INCR".to_vec(), b"n".to_vec()],
                    vec![b"EXEC".to_vec()],
                ])
                .unwrap();
            let exec = replies[3].items().unwrap_or_else(|| panic!("{name}: {replies:?}"));
            assert_eq!(exec[0].text().as_deref(), Some("ERR Bad data format"), "{name}: {exec:?}");
            assert!(exec[1].integer().is_some(), "{name}: {exec:?}");
            // A write to the key runs on every node: over the payload Redis took, it would crash them.
            assert_eq!(conn.call(&[b"HSET", key, b"c", b"3"]).unwrap().integer(), Some(1), "{name}");
            assert_eq!(conn.call(&[b"DEL", key]).unwrap().integer(), Some(1), "{name}");
        }
        let script = conn.call(&[b"EVAL", b"return redis.call('RESTORE', KEYS[1], 0, ARGV[1])", b"1", b"scripted", &dump]).unwrap();
        assert!(script.text().is_some_and(|e| e.contains("RESTORE inside a script")), "{via}: {script:?}");
        // A sound payload is still taken.
        assert_eq!(conn.call(&[b"RESTORE", b"copy", b"0", &dump, b"REPLACE"]).unwrap().text().as_deref(), Some("OK"), "{via}");
        assert_eq!(conn.call(&[b"HGETALL", b"copy"]).unwrap(), conn.call(&[b"HGETALL", b"src"]).unwrap(), "{via}");
    }
    assert_eq!(conns[0].call(&[b"GET", b"n"]).unwrap().text().as_deref(), Some("4"));
    assert_eq!(conns[0].call(&[b"EXISTS", b"scripted"]).unwrap().integer(), Some(0));
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A `FUNCTION RESTORE` payload whose LZF-compressed library code does not decompress to its
/// stated length: to a client Redis answers an error, but where the log is applied (outside any
/// client's command) it takes it for a corrupt RDB file and exits, so one such command would
/// stop every node, and again as they replayed their logs. It is refused before it reaches the
/// log; a real dump, its code LZF-compressed by Redis, is still taken.
#[test]
fn a_malformed_function_restore_payload_is_refused_before_the_log() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let plain = raftis_integration::Server::start_plain(raftis_integration::free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut redis = RespConn::connect(plain.port).unwrap();
    let mut body = vec![245u8, 0xc3, 2, 5, 0x00, b'a'];
    body.extend_from_slice(&10u16.to_le_bytes());
    let crc = crc64(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    let to_redis = redis.call(&[b"FUNCTION", b"RESTORE", &body]).unwrap();
    assert!(to_redis.is_error(), "plain Redis refuses it to a client: {to_redis:?}");
    let code =
        format!("#!lua name=long\n{}redis.register_function('f', function() return 1 end)", "-- padding padding padding\n".repeat(20));
    for node in [leader, (leader + 1) % 3] {
        let mut conn = RespConn::connect(cluster.nodes[node].port).unwrap();
        let reply = conn.call(&[b"FUNCTION", b"RESTORE", &body]).unwrap();
        assert!(reply.text().is_some_and(|e| e.contains("FUNCTION RESTORE payload is malformed")), "node {node}: {reply:?}");
        assert_eq!(conn.call(&[b"FUNCTION", b"LOAD", b"REPLACE", code.as_bytes()]).unwrap().text().as_deref(), Some("long"));
        let dump = conn.call(&[b"FUNCTION", b"DUMP"]).unwrap().bytes().expect("FUNCTION DUMP's payload").to_vec();
        assert!(dump.len() < code.len(), "Redis compressed the code: {} bytes for {}", dump.len(), code.len());
        assert_eq!(conn.call(&[b"FUNCTION", b"RESTORE", &dump, b"REPLACE"]).unwrap().text().as_deref(), Some("OK"), "node {node}");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}
