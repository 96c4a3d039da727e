//! Lone writes: a write from a connection with nothing else in flight is not held back on the
//! leader (see `held` in the module), yet everything the connection sends after it, whichever way
//! it is answered, answers after it.

use raftis_integration::resp_conn::{args, Reply, RespConn};
use raftis_integration::{info_field, raw_exchange, stat_field, wait_for, Cluster};
use redis::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The next `n` reply lines on `conn` (simple replies and errors), as text.
fn read_lines(conn: &mut TcpStream, n: usize) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while got.windows(2).filter(|w| w == b"\r\n").count() < n {
        match conn.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn whatever_a_connection_sends_after_a_lone_write_answers_after_it() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let lone0 = stat_field(leader, "lone_writes");
    assert_eq!(raw_exchange(leader.port, b"SET alone v\r\n", 5), b"+OK\r\n");
    assert_eq!(stat_field(leader, "lone_writes") - lone0, 1, "a write with nothing else in flight is a lone write");

    let cases: [(&str, &[u8]); 10] = [
        // Commands Redis runs untouched, and one it does not know.
        ("PING", b"+PONG\r\n"),
        ("NOSUCHCOMMAND", b"-ERR unknown command 'NOSUCHCOMMAND', with args beginning with: \r\n"),
        // Commands the module answers itself.
        ("RAFT.STATE", b"+leader\r\n"),
        ("CLUSTER KEYSLOT a", b":15495\r\n"),
        ("CONFIG SET appendonly yes", b"-ERR CONFIG SET failed (possibly related to argument 'appendonly') - the Raft log is the source of truth; appendonly must stay 'no'\r\n"),
        // A read, a write and a write that fails when applied, all behind the lone write.
        ("GET {k}", b"$1\r\nv\r\n"),
        ("SET {k} w", b"+OK\r\n"),
        ("LPUSH {k} x", b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
        // A transaction, and the end of the connection.
        ("MULTI\r\nINCR {k}.n\r\nEXEC", b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n"),
        ("QUIT", b"+OK\r\n"),
    ];
    for (i, (next, reply)) in cases.iter().enumerate() {
        let next = next.replace("{k}", &format!("k{i}"));
        let request = format!("SET k{i} v\r\n{next}\r\n");
        let expected = [b"+OK\r\n".as_slice(), reply].concat();
        let got = raw_exchange(leader.port, request.as_bytes(), expected.len());
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&expected), "SET then {next}");
    }

    // A connection that asked for no reply to its write gets none, and no lone write.
    let lone = stat_field(leader, "lone_writes");
    assert_eq!(raw_exchange(leader.port, b"CLIENT REPLY SKIP\r\nSET skipped v\r\nPING\r\n", 7), b"+PONG\r\n");
    assert_eq!(raw_exchange(leader.port, b"CLIENT REPLY OFF\r\nSET off v\r\nCLIENT REPLY ON\r\n", 5), b"+OK\r\n");
    assert_eq!(stat_field(leader, "lone_writes"), lone);
    for key in ["skipped", "off"] {
        assert_eq!(leader.cmd::<String>(&["GET", key]).unwrap(), "v");
    }
}

/// Many connections at once, each sending its own keys a random mix of lone writes, short
/// pipelines, reads and commands the module does not see: every reply is the one expected, in
/// order. Here one connection's command also gives other connections' lone writes their slots.
#[test]
fn concurrent_connections_mixing_lone_writes_and_other_commands_get_their_replies_in_order() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    let (lone0, held0) = (stat_field(leader, "lone_writes"), stat_field(leader, "writes_held"));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    let port = leader.port;
    let workers: Vec<_> = (0..8u64).map(|c| std::thread::spawn(move || mixed_connection(port, c, seed.wrapping_add(c * 7919)))).collect();
    for w in workers {
        w.join().unwrap();
    }
    let (lone, held) = (stat_field(leader, "lone_writes") - lone0, stat_field(leader, "writes_held") - held0);
    assert!(lone > 100, "lone writes happened: {lone} of {held}");
    assert!(held > lone, "and writes held behind others: {lone} of {held}");
}

/// What a command of [`mixed_connection`] must answer.
enum Expect {
    Status(&'static str),
    Integer(i64),
    Bulk(String),
    Nil,
}

fn mixed_connection(port: u16, c: u64, seed: u64) {
    let mut conn = RespConn::connect(port).unwrap();
    let mut rng = seed | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (key, counter) = (format!("mix:{c}:k"), format!("mix:{c}:n"));
    let (mut value, mut count): (Option<String>, i64) = (None, 0);
    for round in 0..200 {
        // Mostly one command at a time, as most clients send them: lone writes.
        let batch = [1, 1, 1, 2, 3][next(5) as usize];
        let mut commands = Vec::new();
        let mut expected = Vec::new();
        for i in 0..batch {
            match next(6) {
                0 | 1 => {
                    let v = format!("{round}.{i}");
                    commands.push(args(&["SET", &key, &v]));
                    expected.push(Expect::Status("OK"));
                    value = Some(v);
                }
                2 => {
                    count += 1;
                    commands.push(args(&["INCR", &counter]));
                    expected.push(Expect::Integer(count));
                }
                3 => {
                    commands.push(args(&["GET", &key]));
                    expected.push(value.clone().map_or(Expect::Nil, Expect::Bulk));
                }
                4 => {
                    commands.push(args(&["PING"]));
                    expected.push(Expect::Status("PONG"));
                }
                _ => {
                    commands.push(args(&["RAFT.STATE"]));
                    expected.push(Expect::Status("leader"));
                }
            }
        }
        let replies = conn.pipeline(&commands).unwrap();
        for ((command, reply), expect) in commands.iter().zip(&replies).zip(&expected) {
            let ok = match (expect, reply) {
                (Expect::Status(s), Reply::Line(b'+', text)) => text == s.as_bytes(),
                (Expect::Integer(n), reply) => reply.integer() == Some(*n),
                (Expect::Bulk(v), reply) => !reply.is_error() && reply.bytes() == Some(v.as_bytes()),
                (Expect::Nil, Reply::Null(_)) => true,
                _ => false,
            };
            let command: Vec<String> = command.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            assert!(ok, "connection {c}, round {round}: {command:?} answered {reply:?} (seed {seed})");
        }
    }
}

/// While the log applies a long script, Redis serves clients between the script's steps and
/// answers their commands itself (-LOADING), without the module seeing whose they are. A client
/// whose lone write is to be applied after the script still gets that write's reply first.
///
/// Any command that reaches the module ends every lone write (see `held`), so this test watches
/// the leader without sending it one until the script runs: through what is left unread on the
/// writer's connection, and through the leader's log.
#[test]
fn a_command_redis_refuses_during_a_long_script_answers_after_the_lone_write_before_it() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    for node in &cluster.nodes {
        let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    }
    let followers: Vec<_> = (0..3).filter(|i| *i != leader_index).map(|i| &cluster.nodes[i]).collect();

    // With the followers paused nothing commits: the script is proposed, then the write behind it.
    for f in &followers {
        f.pause();
    }
    let writes0 = stat_field(leader, "writes_held");
    let mut scripted = leader.client().unwrap();
    let runner = std::thread::spawn(move || redis::cmd("EVAL").arg("while true do end").arg(0).query::<Value>(&mut scripted));
    wait_for("the script to be proposed", Duration::from_secs(10), || (stat_field(leader, "writes_held") > writes0).then_some(()));
    let mut writer = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    writer.write_all(b"SET behind 1\r\n").unwrap();
    let port = writer.local_addr().unwrap().port();
    wait_for("the leader to read the write", Duration::from_secs(10), || (unread_by_server(leader.port, port)? == 0).then_some(()));
    for f in &followers {
        f.resume();
    }

    // The leader applies the script and serves clients meanwhile, refusing their commands.
    wait_for("the script to hold the leader", Duration::from_secs(10), || leader.log().contains("Slow script detected").then_some(()));
    writer.write_all(b"GET behind\r\n").unwrap();
    // Redis handles ready connections in the order they became ready: once a command sent after
    // the writer's is refused, the writer's has been read, unless Redis reads nothing from it now.
    let mut other = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    other.write_all(b"GET other\r\n").unwrap();
    let refused = read_lines(&mut other, 1);
    assert!(refused.starts_with("-LOADING") || refused.starts_with("-BUSY"), "{refused:?}");

    for node in &cluster.nodes {
        let reply: String = wait_for("the script to run here", Duration::from_secs(10), || node.quick_cmd(&["SCRIPT", "KILL"]).ok());
        assert_eq!(reply, "OK");
    }
    assert!(runner.join().unwrap().is_err(), "the script was killed");
    let got = read_lines(&mut writer, 2);
    let (first, second) = got.trim_end().split_once("\r\n").unwrap_or_else(|| panic!("two replies: {got:?}"));
    assert_eq!(first, "+OK", "the write's reply comes first: {got:?}");
    // The read, refused while the script ran, or run once it was killed.
    assert!(second.starts_with("-LOADING") || second.starts_with("-BUSY") || second == "$1", "then the read's: {got:?}");
    assert_eq!(leader.cmd::<String>(&["GET", "behind"]).unwrap(), "1");
}

/// Bytes a client on local port `client_port` has sent that the server on `server_port` has not
/// read yet (from /proc/net/tcp); None if there is no such connection.
fn unread_by_server(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, remote) = (format!("0100007F:{server_port:04X}"), format!("0100007F:{client_port:04X}"));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// A read waiting behind a write runs when the write's reply is in. The log may be applying a
/// long script then, one that hands control back to the event loop between its steps; the read
/// must not run in the middle of it: it would see half of the script's writes.
///
/// Here the write is a script call the operator told every node to skip (`skip-entry`), just
/// before the long script in the log. Its error fills its slot as it is applied, as a reply
/// does, so the read runs there, before the script. (It was once handed over through the event
/// loop, and the read ran after the script: not half of it, but after a write another client
/// sent after the read.)
#[test]
fn a_read_waiting_behind_a_write_never_sees_half_of_a_script() {
    const SKIPPED: u64 = 40;
    let cluster = Cluster::start(3, &[&format!("skip-entry={SKIPPED}")]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    for node in &cluster.nodes {
        let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    }
    let _: () = leader.cmd(&["SET", "k", "before"]).unwrap();
    while info_field(leader, "last_log_index") < SKIPPED - 1 {
        let _: () = leader.cmd(&["SET", "filler", "1"]).unwrap();
    }
    assert_eq!(info_field(leader, "last_log_index"), SKIPPED - 1);
    let followers: Vec<_> = (0..3).filter(|i| *i != leader_index).map(|i| &cluster.nodes[i]).collect();

    // With the followers paused nothing commits: the skipped call, then the long script, are
    // proposed in this order.
    for f in &followers {
        f.pause();
    }
    let mut reader = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    reader.write_all(b"EVAL \"return 1\" 0\r\nGET k\r\n").unwrap();
    wait_for("the skipped call to be proposed", Duration::from_secs(10), || {
        (info_field(leader, "last_log_index") == SKIPPED).then_some(())
    });
    let mut scripted = leader.client().unwrap();
    // Its reply waits for the leader's sleep below and then the script itself.
    scripted.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let script = "redis.call('SET', KEYS[1], 'half') \
                  local n = 0 for i = 1, 50000000 do n = n + 1 end \
                  redis.call('SET', KEYS[1], 'whole') return n";
    let runner = std::thread::spawn(move || redis::cmd("EVAL").arg(script).arg(1).arg("k").query::<i64>(&mut scripted));
    wait_for("the script to be proposed", Duration::from_secs(10), || (info_field(leader, "last_log_index") == SKIPPED + 1).then_some(()));

    // Both commit while the leader's main thread sleeps: it then applies them in one go.
    let mut sleeper = TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    // Long enough for two resumed followers to commit on a loaded machine.
    sleeper.write_all(b"DEBUG SLEEP 10\r\n").unwrap();
    // Its main thread's system call says so; that Redis has read the command did not always.
    wait_for("the leader to start sleeping", Duration::from_secs(10), || leader.main_thread_sleeps().then_some(()));
    for f in &followers {
        f.resume();
    }
    for f in &followers {
        wait_for("both to commit", Duration::from_secs(10), || (info_field(f, "commit_index") > SKIPPED).then_some(()));
    }
    sleeper.set_nonblocking(true).unwrap();
    let still_asleep = matches!(sleeper.read(&mut [0u8; 8]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(still_asleep, "the leader woke before both entries committed");

    assert_eq!(runner.join().unwrap().unwrap(), 50000000);
    assert!(leader.log().contains("Slow script detected"), "the script handed control to the event loop");
    let got = read_lines(&mut reader, 3);
    let lines: Vec<&str> = got.split("\r\n").collect();
    assert!(lines[0].starts_with("-ERR") && lines[0].contains("skip-entry"), "{got:?}");
    assert_eq!(lines[2], "before", "the read ran where it stands in the log, before the script: {got:?}");
}
