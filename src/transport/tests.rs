use super::*;
use crate::cluster_id::ClusterId;
use raft::eraftpb::{Entry, MessageType};
use std::io::{Read, Write};
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

const DEADLINE: Duration = Duration::from_secs(10);

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A message that is easy to check for order (`index`) and integrity (the entry's payload).
fn msg(from: u64, to: u64, index: u64) -> Message {
    let entry = Entry { index, term: 3, data: format!("payload {index}").into_bytes(), ..Default::default() };
    Message { msg_type: MessageType::MsgAppend as i32, from, to, term: 3, index, entries: vec![entry], ..Default::default() }
}

/// A transport whose callback forwards into a channel, and remembers whether it ever ran on a
/// thread other than the transport's own.
struct Node {
    transport: Transport,
    rx: std_mpsc::Receiver<Inbound>,
    off_thread: Arc<AtomicBool>,
}

impl Node {
    fn start(me: u64, listen: SocketAddr, queue_limit: usize) -> Node {
        let mut cfg = TransportConfig::new(NodeId(me), listen, format!("node-{me}.test:7000"));
        cfg.queue_limit = queue_limit;
        Node::with_config(cfg)
    }

    /// A node on any port whose cluster has the `raft-password` `password`.
    fn with_password(me: u64, password: &str) -> Node {
        let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("node-{me}.test:7000"));
        cfg.password = Password::new(password.as_bytes());
        Node::with_config(cfg)
    }

    fn with_config(cfg: TransportConfig) -> Node {
        init_log();
        let me = cfg.me;
        let (tx, rx) = std_mpsc::channel();
        let tx = Mutex::new(tx);
        let off_thread = Arc::new(AtomicBool::new(false));
        let flag = off_thread.clone();
        let transport = Transport::start(cfg, move |inbound| {
            let name = std::thread::current().name().unwrap_or_default().to_string();
            if name != format!("raft-net-{me}") {
                flag.store(true, Ordering::Relaxed);
            }
            let _ = tx.lock().unwrap().send(inbound);
        })
        .unwrap();
        Node { transport, rx, off_thread }
    }

    fn on_any_port(me: u64) -> Node {
        Node::start(me, loopback(0), DEFAULT_QUEUE_LIMIT)
    }

    fn addr(&self) -> String {
        self.transport.local_addr().to_string()
    }

    /// Waits for the next event that `pick` accepts, skipping the others.
    fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(Inbound) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(inbound) => {
                    if let Some(found) = pick(inbound) {
                        return found;
                    }
                }
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// Collects raft messages until `n` have arrived.
    fn raft_messages(&self, n: usize) -> Vec<Message> {
        let mut all = Vec::new();
        while all.len() < n {
            all.extend(self.wait_for("raft messages", |i| match i {
                Inbound::Raft(msgs) => Some(msgs),
                _ => None,
            }));
        }
        all
    }

    fn peer(&self, id: u64) -> PeerStats {
        self.transport.stats().into_iter().find(|s| s.id == NodeId(id)).expect("peer is known")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(!self.off_thread.load(Ordering::Relaxed), "callbacks run on the transport thread only");
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A loopback port with nothing listening on it (for now).
fn unused_port() -> u16 {
    std::net::TcpListener::bind(loopback(0)).unwrap().local_addr().unwrap().port()
}

/// Node 1, told that node 2 is at `port` where nothing listens, once it has found that out.
fn with_dead_peer(port: u16) -> Node {
    let a = Node::on_any_port(1);
    a.transport.set_peer_addr(NodeId(2), loopback(port).to_string());
    a.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    a
}

/// Polls `cond` until it holds; for state that is not announced through a channel.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it.
fn raw_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("the server closes the connection");
    reply
}

fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = BytesMut::new();
    resp::encode_command(parts, &mut out);
    out.to_vec()
}

#[test]
fn two_transports_exchange_messages_both_ways() {
    let a = Node::on_any_port(1);
    let b = Node::on_any_port(2);
    a.transport.set_peer_addr(NodeId(2), b.addr());
    b.transport.set_peer_addr(NodeId(1), a.addr());
    assert_eq!(a.transport.peer_addr(NodeId(2)), Some(b.addr()));

    let to_b: Vec<Message> = (1..=5).map(|i| msg(1, 2, i)).collect();
    let to_a: Vec<Message> = (10..=12).map(|i| msg(2, 1, i)).collect();
    a.transport.send(to_b.clone());
    b.transport.send(to_a.clone());

    let hello = b.wait_for("a HELLO", |i| match i {
        Inbound::Hello { from, addr, .. } => Some((from, addr)),
        _ => None,
    });
    assert_eq!(hello, (NodeId(1), "node-1.test:7000".to_string()));
    assert_eq!(b.raft_messages(5), to_b, "in order and intact");
    assert_eq!(a.raft_messages(3), to_a);
    wait_until("counters", || a.peer(2).sent == 5 && b.peer(1).sent == 3);
    let stats = a.peer(2);
    assert!(stats.connected);
    assert_eq!((stats.addr, stats.queued, stats.dropped), (b.addr(), 0, 0));
}

#[test]
fn a_removed_node_asking_for_votes_is_told_so_and_its_other_messages_pass() {
    let a = Node::on_any_port(1);
    let b = Node::on_any_port(2);
    b.transport.set_removed_check(Arc::new(|from, last_index| {
        (from == NodeId(1) && last_index <= 40).then(|| format!("node 2 has applied the removal of node {from}"))
    }));
    a.transport.set_peer_addr(NodeId(2), b.addr());
    let vote =
        |msg_type: MessageType, index: u64| Message { msg_type: msg_type as i32, from: 1, to: 2, term: 4, index, ..Default::default() };

    // Appends, and votes from a log the check cannot judge, reach raft.
    let passed = vec![msg(1, 2, 7), vote(MessageType::MsgRequestPreVote, 41)];
    a.transport.send(passed.clone());
    assert_eq!(b.raft_messages(2), passed);

    for msg_type in [MessageType::MsgRequestPreVote, MessageType::MsgRequestVote] {
        a.transport.send(vec![vote(msg_type, 40)]);
        let (by, why) = a.wait_for("Removed", |i| match i {
            Inbound::Removed { by, why } => Some((by, why)),
            _ => None,
        });
        assert_eq!((by, why.as_str()), (NodeId(2), "node 2 has applied the removal of node 1"));
    }
    assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_))), "the refused votes never reach raft");
}

#[test]
fn ten_thousand_messages_all_arrive_in_order() {
    let a = Node::on_any_port(1);
    let b = Node::on_any_port(2);
    a.transport.set_peer_addr(NodeId(2), b.addr());
    // Paced so the default queue never overflows: none may be lost while the receiver is up.
    let chunk = 500;
    for start in (0..10_000).step_by(chunk) {
        wait_until("room in the queue", || a.peer(2).queued + chunk <= DEFAULT_QUEUE_LIMIT);
        a.transport.send((start..start + chunk as u64).map(|i| msg(1, 2, i)).collect());
    }
    let got = b.raft_messages(10_000);
    assert_eq!(got.len(), 10_000);
    assert!(got.iter().enumerate().all(|(i, m)| *m == msg(1, 2, i as u64)), "in order and intact");
    wait_until("all counted as sent", || a.peer(2).sent == 10_000);
    assert_eq!(a.peer(2).dropped, 0);
}

#[test]
fn a_dead_peer_costs_a_bounded_queue_and_catches_up_when_it_comes_up() {
    let port = unused_port();
    let a = with_dead_peer(port);

    for start in (0..100_000).step_by(1000) {
        a.transport.send((start..start + 1000).map(|i| msg(1, 2, i)).collect());
    }
    let stats = a.peer(2);
    assert!(!stats.connected);
    assert_eq!(stats.queued, DEFAULT_QUEUE_LIMIT, "{stats:?}");
    assert_eq!(stats.dropped, 100_000 - DEFAULT_QUEUE_LIMIT as u64, "{stats:?}");

    // The peer comes up on that address; the backoff retries find it.
    let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
    wait_until("the queue to drain", || a.peer(2).queued == 0);
    a.transport.send(vec![msg(1, 2, 1_000_000)]);
    let got = b.raft_messages(DEFAULT_QUEUE_LIMIT + 1);
    let indexes: Vec<u64> = got.iter().map(|m| m.index).collect();
    let expected: Vec<u64> = (0..DEFAULT_QUEUE_LIMIT as u64).chain([1_000_000]).collect();
    assert_eq!(indexes, expected, "what fitted in the queue, then the new message");
}

#[test]
fn a_peer_that_dials_us_is_dialed_back_at_once_not_after_the_backoff() {
    let port = unused_port();
    let a = with_dead_peer(port);
    // Let the dial attempts fail until the wait between them is at its longest.
    let mut wait = dial::MIN_BACKOFF;
    while wait < dial::MAX_BACKOFF {
        a.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
        wait *= 2;
    }
    a.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    // Node 1 has just started a wait of MAX_BACKOFF. Node 2 comes up and dials it.
    let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
    b.transport.set_peer_addr(NodeId(1), a.addr());
    let started = Instant::now();
    wait_until("node 1 to dial node 2 back", || a.peer(2).connected);
    assert!(started.elapsed() < dial::MAX_BACKOFF / 2, "dialed back after {:?}", started.elapsed());
    a.transport.send(vec![msg(1, 2, 7)]);
    assert_eq!(b.raft_messages(1), [msg(1, 2, 7)]);
}

#[test]
fn a_leadership_transfer_to_a_dead_peer_is_dropped_not_queued_for_its_return() {
    let port = unused_port();
    let a = with_dead_peer(port);
    let timeout_now = Message { msg_type: MessageType::MsgTimeoutNow as i32, from: 1, to: 2, term: 3, ..Default::default() };
    a.transport.send(vec![msg(1, 2, 1), timeout_now.clone(), msg(1, 2, 2)]);
    assert_eq!(a.peer(2).dropped, 1, "{:?}", a.peer(2));

    let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
    wait_until("the connection", || a.peer(2).connected);
    a.transport.send(vec![timeout_now, msg(1, 2, 3)]);
    let got: Vec<(MessageType, u64)> = b.raft_messages(4).iter().map(|m| (m.msg_type(), m.index)).collect();
    let append = MessageType::MsgAppend;
    assert_eq!(got, [(append, 1), (append, 2), (MessageType::MsgTimeoutNow, 0), (append, 3)], "one sent while connected goes out");
}

#[test]
fn a_dead_peer_queues_at_most_its_byte_limit_of_large_messages() {
    let port = unused_port();
    let a = with_dead_peer(port);

    let big = |index: u64, len: usize| {
        let mut m = msg(1, 2, index);
        m.entries[0].data = vec![b'x'; len];
        m
    };
    // One message larger than the whole limit still goes when the queue is empty.
    a.transport.send(vec![big(0, MAX_QUEUE_BYTES + 1)]);
    a.transport.send(vec![big(1, 10)]);
    let stats = a.peer(2);
    assert_eq!((stats.queued, stats.dropped), (1, 1), "{stats:?}");
    assert!(stats.queued_bytes > MAX_QUEUE_BYTES);

    let b = Node::start(2, loopback(port), DEFAULT_QUEUE_LIMIT);
    assert_eq!(b.raft_messages(1)[0].index, 0);
    wait_until("the queue to drain", || a.peer(2).queued == 0);
    assert_eq!(a.peer(2).queued_bytes, 0);
    drop(b);
    wait_until("the connection to drop", || !a.peer(2).connected);

    // 200 messages of 1 MiB: about 64 fit, the rest are dropped and counted.
    let dropped_before = a.peer(2).dropped;
    for i in 0..200 {
        a.transport.send(vec![big(100 + i, 1 << 20)]);
    }
    let stats = a.peer(2);
    assert!(stats.queued_bytes <= MAX_QUEUE_BYTES, "{stats:?}");
    assert!((60..=64).contains(&stats.queued), "{stats:?}");
    assert_eq!(stats.dropped - dropped_before, 200 - stats.queued as u64, "{stats:?}");
}

#[test]
fn peers_can_be_moved_and_removed() {
    let port = unused_port();
    let a = Node::on_any_port(1);
    let b = Node::on_any_port(2);
    a.transport.set_peer_addr(NodeId(2), loopback(port).to_string());
    a.transport.send(vec![msg(1, 2, 1)]);
    a.transport.set_peer_addr(NodeId(2), b.addr());
    a.transport.set_peer_addr(NodeId(2), b.addr()); // same address: no reconnect
    a.transport.send(vec![msg(1, 2, 2)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 2)], "the old address's queue went with it");
    assert_eq!(a.transport.peer_addr(NodeId(2)), Some(b.addr()));

    a.transport.set_peer_addr(NodeId(1), "127.0.0.1:1".into());
    assert_eq!(a.transport.peer_addr(NodeId(1)), None, "a node never dials itself");

    a.transport.remove_peer(NodeId(2));
    assert_eq!(a.transport.peer_addr(NodeId(2)), None);
    assert!(a.transport.stats().is_empty());
    a.transport.send(vec![msg(1, 2, 3), msg(1, 9, 1)]);
    // Reports from the first, dead address may still be queued: collect until both show up.
    let mut unreachable = std::collections::BTreeSet::new();
    while !(unreachable.contains(&NodeId(2)) && unreachable.contains(&NodeId(9))) {
        unreachable.insert(a.wait_for("Unreachable", |i| match i {
            Inbound::Unreachable(id) => Some(id),
            _ => None,
        }));
    }
    assert_eq!(unreachable.into_iter().collect::<Vec<_>>(), vec![NodeId(2), NodeId(9)]);
}

#[test]
fn garbage_closes_only_that_connection() {
    let b = Node::on_any_port(2);
    // Keep a well-behaved peer connected throughout, to see it is unaffected.
    let a = Node::on_any_port(1);
    a.transport.set_peer_addr(NodeId(2), b.addr());
    a.transport.send(vec![msg(1, 2, 1)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);

    let undecodable = command(&[b"MSGS", &[0xff; 11]]);
    let mut good_then_bad = command(&[b"PING"]);
    good_then_bad.extend_from_slice(b"!");
    let cases: Vec<(&[u8], &str)> = vec![
        (b"hello world\r\n", "-ERR protocol error: unknown frame type"),
        (b"GET / HTTP/1.0\r\n\r\n", "-ERR protocol error"),
        (&[0xff; 64], "-ERR protocol error"),
        (b"$-5\r\n", "-ERR protocol error: negative length"),
        (b"*2\r\n$x\r\n", "-ERR protocol error: invalid length"),
        (b"*3\r\n$4\r\nMSGS\r\n$3\r\nabc\r\n$-9\r\n", "-ERR protocol error"),
        (&undecodable, "-ERR MSGS argument 1 is not a raft message"),
        (b"*2\r\n$4\r\nMSGS\r\n:1\r\n", "-ERR MSGS argument 1 is not a bulk string"),
        (b"*1\r\n$4\r\nNOPE\r\n", "-ERR unknown command 'NOPE'"),
        (b":5\r\n", "-ERR expected a command"),
        (b"*2\r\n$5\r\nHELLO\r\n$1\r\n0\r\n", "-ERR usage: HELLO"),
        (b"*3\r\n$5\r\nHELLO\r\n$1\r\n0\r\n$1\r\nx\r\n", "-ERR HELLO: invalid node id"),
        (b"*4\r\n$5\r\nHELLO\r\n$1\r\n7\r\n$1\r\nx\r\n:1\r\n", "-ERR usage: HELLO"),
        (&good_then_bad, "+PONG\r\n-ERR protocol error"),
    ];
    for (garbage, expected) in cases {
        let reply = raw_exchange(&b.addr(), garbage);
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with(expected), "{:?} got {reply:?}", String::from_utf8_lossy(garbage));
    }

    // A new, well-formed connection is served...
    let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    // (with an incarnation, no cluster id, and a word of a later build, which is ignored)
    let mut good = command(&[b"HELLO", b"7", b"node-7:1", b"node-7:2", b"", b"0", b"99", b"0", b"later"]);
    let encoded = msg(7, 2, 42).encode_to_vec();
    good.extend(command(&[b"MSGS", &encoded]));
    good.extend(command(&[b"PING"]));
    s.write_all(&good).unwrap();
    let mut pong = [0u8; 7];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let hello = b.wait_for("HELLO from 7", |i| match i {
        Inbound::Hello { from, addr, client_addr } => Some((from, addr, client_addr)),
        _ => None,
    });
    assert_eq!(hello, (NodeId(7), "node-7:1".to_string(), Some("node-7:2".to_string())));
    assert_eq!(b.raft_messages(1), vec![msg(7, 2, 42)]);

    // ... and so is the peer connected all along.
    a.transport.send(vec![msg(1, 2, 2)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 2)]);
    assert_eq!(a.peer(2).dropped, 0);
}

#[test]
fn ping_answers_pong_and_misrouted_messages_are_dropped() {
    let b = Node::on_any_port(2);
    let mut s = std::net::TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    // Messages for node 3 must not reach node 2's raft; the connection stays up.
    let mut request = command(&[b"MSGS", &msg(1, 3, 1).encode_to_vec()]);
    request.extend(command(&[b"PING"]));
    request.extend(command(&[b"ping", b"hi"]));
    s.write_all(&request).unwrap();
    let mut reply = [0u8; 7 + 8];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n$2\r\nhi\r\n");
    s.write_all(&command(&[b"MSGS", &msg(1, 2, 5).encode_to_vec()])).unwrap();
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 5)], "nothing before it: the misrouted one was dropped");
}

#[test]
fn shutdown_is_prompt_idempotent_and_frees_the_port() {
    let dead_port = unused_port();
    let a = Node::on_any_port(1);
    let b = Node::on_any_port(2);
    a.transport.set_peer_addr(NodeId(2), b.addr());
    a.transport.set_peer_addr(NodeId(3), loopback(dead_port).to_string());
    a.transport.send(vec![msg(1, 2, 1), msg(1, 3, 1)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
    // An idle inbound connection must not hold shutdown up either.
    let _idle = std::net::TcpStream::connect(a.addr()).unwrap();

    let began = Instant::now();
    a.transport.shutdown();
    assert!(began.elapsed() < Duration::from_secs(2), "took {:?}", began.elapsed());
    a.transport.shutdown();
    let clone = a.transport.clone();
    clone.send(vec![msg(1, 2, 2)]);
    clone.set_peer_addr(NodeId(2), b.addr());
    assert!(clone.stats().is_empty());
    std::net::TcpListener::bind(a.transport.local_addr()).expect("the port is free again");

    // Dropping the last handle shuts down too.
    let addr = b.transport.local_addr();
    drop(b);
    std::net::TcpListener::bind(addr).expect("the port is free after the last handle is gone");
}

fn forwarded(argv: &[&str]) -> ForwardRequest {
    let argv = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
    ForwardRequest::Command { db: 0, argv, resp3: false }
}

/// Forwards `req` from `from` to `to_addr` and waits for the outcome.
fn forward_and_wait(from: &Node, to_addr: &str, argv: &[&str]) -> forward::ForwardReply {
    let (tx, rx) = std_mpsc::channel();
    let req = forwarded(argv);
    from.transport.forward(to_addr.to_string(), &req, DEADLINE, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(DEADLINE * 2).expect("forward answers")
}

#[test]
fn forwarded_commands_reach_the_handler_and_their_replies_come_back() {
    let leader = Node::on_any_port(1);
    let follower = Node::on_any_port(2);
    // Before the module installs a handler the leader refuses politely.
    let refused = forward_and_wait(&follower, &leader.addr(), &["GET", "k"]).unwrap_err();
    assert!(refused.contains("does not serve forwarded commands"), "{refused}");

    // The handler answers later, from another thread, like the main thread would.
    leader.transport.set_forward_handler(Arc::new(|req: ForwardRequest, done: ForwardDone, _: Abandoned| {
        std::thread::spawn(move || {
            let ForwardRequest::Command { argv, .. } = req else { return done(Err("ERR not a command".into())) };
            let name = String::from_utf8_lossy(&argv[0]).to_string();
            done(match name.as_str() {
                "ECHO" => Ok(format!("${}\r\n{}\r\n", argv[1].len(), String::from_utf8_lossy(&argv[1])).into_bytes()),
                _ => Err("MOVED 0 elsewhere:1".into()),
            })
        });
    }));
    for i in 0..20 {
        let word = format!("w{i}");
        let reply = forward_and_wait(&follower, &leader.addr(), &["ECHO", &word]).unwrap();
        assert_eq!(reply, format!("${}\r\n{word}\r\n", word.len()).into_bytes());
    }
    assert_eq!(forward_and_wait(&follower, &leader.addr(), &["SET", "k", "v"]).unwrap_err(), "MOVED 0 elsewhere:1");
    // Pipelined on one raw connection, replies keep the order of the requests.
    let mut pipelined = Vec::new();
    for word in ["a", "bb", "ccc"] {
        let mut out = BytesMut::new();
        forwarded(&["ECHO", word]).encode(&mut out);
        pipelined.extend_from_slice(&out);
    }
    let mut s = std::net::TcpStream::connect(leader.addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(&pipelined).unwrap();
    // Each with the index the leader's dataset reflected: 0 here, where none is set.
    let expected = b"*2\r\n$7\r\n$1\r\na\r\n\r\n:0\r\n*2\r\n$8\r\n$2\r\nbb\r\n\r\n:0\r\n*2\r\n$9\r\n$3\r\nccc\r\n\r\n:0\r\n";
    let mut got = vec![0u8; expected.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
}

/// A dataset as a test drives it: it reflects a fixed index, and keeps what waits to see one.
#[derive(Default)]
struct TestDataset {
    reflects: u64,
    waiting: Mutex<Vec<(LogIndex, forward::CaughtUp)>>,
}

impl Dataset for TestDataset {
    fn reflects(&self) -> LogIndex {
        LogIndex(self.reflects)
    }

    fn when_reflects(&self, index: LogIndex, then: forward::CaughtUp) {
        self.waiting.lock().unwrap().push((index, then));
    }
}

#[test]
fn a_forwarded_reply_waits_until_the_followers_dataset_reflects_the_leaders() {
    let leader = Node::on_any_port(1);
    let follower = Node::on_any_port(2);
    leader.transport.set_forward_handler(Arc::new(|_: ForwardRequest, done: ForwardDone, _: Abandoned| done(Ok(b"+OK\r\n".to_vec()))));
    leader.transport.set_dataset(Arc::new(TestDataset { reflects: 7, ..TestDataset::default() }));
    let dataset = Arc::new(TestDataset::default());
    follower.transport.set_dataset(dataset.clone());
    let forward = |timeout: Duration| {
        let (tx, rx) = std_mpsc::channel();
        follower.transport.forward(leader.addr(), &forwarded(&["SET", "k", "v"]), timeout, Box::new(move |r| tx.send(r).unwrap()));
        rx
    };

    // Relayed only once the follower's dataset holds what the leader's did when it answered.
    let answered = forward(DEADLINE);
    let deadline = Instant::now() + DEADLINE;
    let then = loop {
        if let Some((index, then)) = dataset.waiting.lock().unwrap().pop() {
            assert_eq!(index, LogIndex(7));
            break then;
        }
        assert!(Instant::now() < deadline, "the follower never asked its dataset");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(answered.try_recv().is_err(), "relayed before the follower's dataset caught up");
    then();
    assert_eq!(answered.recv_timeout(DEADLINE).unwrap(), Ok(b"+OK\r\n".to_vec()));
    assert_eq!(follower.transport.catch_up_stats(), (1, 0));

    // A dataset that never catches up holds the reply no longer than the forward's own time, or
    // the half second every answer gets at the least.
    let answered = forward(Duration::from_millis(300));
    assert_eq!(answered.recv_timeout(DEADLINE).unwrap(), Ok(b"+OK\r\n".to_vec()));
    assert_eq!(follower.transport.catch_up_stats(), (2, 1));
}

#[test]
fn an_answer_waits_for_the_catch_up_within_its_forwards_time_and_a_moment_past_it() {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    assert_eq!(forwarding::catch_up_limit(Some(s(6)), s(1)), s(5));
    // An answer that came late (this node was paused, say) still gets a moment.
    assert_eq!(forwarding::catch_up_limit(Some(s(6)), ms(5990)), ms(500));
    assert_eq!(forwarding::catch_up_limit(Some(s(6)), s(9)), ms(500));
    // A blocking command, which waits for ever, has a bound of its own.
    assert_eq!(forwarding::catch_up_limit(None, s(3600)), s(5));
}

#[test]
fn a_raft_password_keeps_out_whoever_does_not_know_it() {
    let a = Node::with_password(1, "s3cret");
    let b = Node::with_password(2, "s3cret");
    let stranger = Node::with_password(3, "guess");
    let open = Node::on_any_port(4);
    for node in [&a, &stranger, &open] {
        node.transport.set_peer_addr(NodeId(2), b.addr());
    }
    b.transport.set_forward_handler(Arc::new(|_: ForwardRequest, done: ForwardDone, _: Abandoned| done(Ok(b"+OK\r\n".to_vec()))));

    // The other member's messages and forwarded commands get through.
    a.transport.send(vec![msg(1, 2, 1)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
    assert_eq!(forward_and_wait(&a, &b.addr(), &["SET", "k", "v"]).unwrap(), b"+OK\r\n");

    // A wrong password or none: nothing arrives, and the sender hears why.
    stranger.transport.send(vec![msg(3, 2, 7)]);
    open.transport.send(vec![msg(4, 2, 8)]);
    stranger.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    open.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    let refused = forward_and_wait(&stranger, &b.addr(), &["FLUSHALL"]).unwrap_err();
    assert!(refused.starts_with("CLUSTERDOWN") && refused.contains("WRONGPASS"), "{refused}");
    let refused = forward_and_wait(&open, &b.addr(), &["FLUSHALL"]).unwrap_err();
    assert!(refused.contains("NOAUTH"), "{refused}");
    // The same by hand: every command before AUTH is refused, the snapshot files included.
    for request in [command(&[b"PING"]), command(&[b"SNAPSHOT.CHUNK", b"x.rsnap", b"0", b"10"]), command(&[b"HELLO", b"9", b"x:1"])] {
        assert_eq!(raw_exchange(&b.addr(), &request), b"-NOAUTH Authentication required.\r\n");
    }
    let mut good = command(&[b"AUTH", b"s3cret"]);
    good.extend(command(&[b"PING"]));
    good.extend(command(&[b"AUTH", b"guess"]));
    assert_eq!(raw_exchange(&b.addr(), &good), b"+OK\r\n+PONG\r\n-WRONGPASS invalid raft-password\r\n");
    // A node without a password says so rather than accept any.
    let refused = String::from_utf8(raw_exchange(&open.addr(), &command(&[b"AUTH", b"s3cret"]))).unwrap();
    assert!(refused.starts_with("-ERR AUTH: this node has no raft-password"), "{refused}");
    assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_) | Inbound::Hello { from: NodeId(3 | 4 | 9), .. })));
}

/// Before it logs in, a connection may send little, for a short while, and only so many may be
/// waiting to: a stranger cannot make the node buffer a huge frame or hold its descriptors.
#[test]
fn a_connection_that_has_not_logged_in_is_held_to_little_and_briefly() {
    let b = Node::with_password(2, "s3cret");
    let noauth = b"-NOAUTH Authentication required.\r\n";
    // The start of a frame that declares a 200 MB bulk, and more of it than may wait.
    let mut huge = b"*2\r\n$4\r\nAUTH\r\n$200000000\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 100 * 1024));
    assert_eq!(raw_exchange(&b.addr(), &huge), noauth);
    // Silence: closed once the time to log in is up.
    let began = Instant::now();
    assert_eq!(raw_exchange(&b.addr(), b""), noauth);
    assert!(began.elapsed() >= Duration::from_millis(900), "{:?}", began.elapsed());
    // Too many waiting to log in: the next is refused at once.
    let waiting: Vec<std::net::TcpStream> =
        (0..listen::MAX_WAITING_FOR_AUTH).map(|_| std::net::TcpStream::connect(b.addr()).unwrap()).collect();
    let refused = String::from_utf8(raw_exchange(&b.addr(), &command(&[b"AUTH", b"s3cret"]))).unwrap();
    assert_eq!(refused, "-ERR too many connections waiting to log in\r\n");
    drop(waiting);
    // Once they are gone (or logged in), a peer gets in again.
    wait_until("the waiting connections to be gone", || {
        let mut good = command(&[b"AUTH", b"s3cret"]);
        good.extend(command(&[b"PING"]));
        // A wrong password closes the connection.
        good.extend(command(&[b"AUTH", b"guess"]));
        raw_exchange(&b.addr(), &good).starts_with(b"+OK\r\n+PONG\r\n")
    });
}

#[test]
fn a_node_whose_shared_settings_differ_is_refused_with_what_differs() {
    let with = |me: u64, databases: &str| {
        let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("node-{me}.test:7000"));
        cfg.advertise_client = Some(format!("client-{me}.test:6379"));
        cfg.shared = Some(SharedSettings::read(|name| if name == "databases" { databases.into() } else { "1".into() }));
        Node::with_config(cfg)
    };
    let (a, b, odd) = (with(1, "16"), with(2, "16"), with(3, "32"));
    a.transport.set_peer_addr(NodeId(2), b.addr());
    odd.transport.set_peer_addr(NodeId(2), b.addr());
    a.transport.send(vec![msg(1, 2, 1)]);
    assert_eq!(b.raft_messages(1), vec![msg(1, 2, 1)]);
    odd.transport.send(vec![msg(3, 2, 1)]);
    odd.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    let why = odd.peer(2).last_error.expect("the refusal is kept");
    assert!(why.contains("Redis settings differ from this node's: databases is 32 there and 16 here"), "{why}");
    let hello = command(&[b"HELLO", b"3", b"x:1", b"y:2", SharedSettings::decode("databases=32").encode().as_bytes()]);
    let refused = String::from_utf8(raw_exchange(&b.addr(), &hello)).unwrap();
    assert!(refused.starts_with("-ERR node 3's Redis settings differ from this node's: databases is 32 there and 16 here"), "{refused}");
    assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Raft(_) | Inbound::Hello { from: NodeId(3), .. })));
}

#[test]
fn a_peer_that_refuses_us_right_after_connecting_is_retried_with_backoff() {
    // A peer that accepts, answers an error and hangs up (as one with another raft-password
    // does): each attempt "connects", but must not count as a working connection.
    let peer = std::net::TcpListener::bind(loopback(0)).unwrap();
    peer.set_nonblocking(true).unwrap();
    let a = Node::on_any_port(1);
    a.transport.set_peer_addr(NodeId(2), peer.local_addr().unwrap().to_string());
    a.transport.send(vec![msg(1, 2, 1)]);
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(3) {
        match peer.accept() {
            Ok((mut s, _)) => {
                attempts += 1;
                let _ = s.write_all(b"-NOAUTH Authentication required.\r\n");
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("accept: {e}"),
        }
    }
    // Backing off from 50 ms, doubling: 6 attempts in 3 s; every 50 ms would be ~50.
    assert!((2..=10).contains(&attempts), "{attempts} connection attempts in 3 s");
    assert!(!a.peer(2).connected);
}

#[test]
fn forwarding_to_a_dead_leader_says_nothing_was_sent() {
    let follower = Node::on_any_port(2);
    let dead = loopback(unused_port()).to_string();
    let err = forward_and_wait(&follower, &dead, &["SET", "k", "v"]).unwrap_err();
    assert!(err.starts_with("CLUSTERDOWN cannot reach the leader"), "{err}");
}

#[test]
fn a_pooled_connection_the_leader_closed_is_not_used_again() {
    // A leader that answers one command per connection, then closes it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (closed_tx, closed) = std_mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request).unwrap();
            conn.write_all(b"*2\r\n$4\r\n:1\r\n\r\n:3\r\n").unwrap();
            drop(conn);
            let _ = closed_tx.send(());
        }
    });
    let follower = Node::on_any_port(2);
    for i in 0..3 {
        assert_eq!(forward_and_wait(&follower, &addr, &["INCR", "k"]), Ok(b":1\r\n".to_vec()), "forward {i}");
        closed.recv_timeout(DEADLINE).expect("the leader closed the connection");
    }
}

#[test]
fn a_blocking_forward_waits_past_any_backstop_until_answered_or_cancelled() {
    let leader = Node::on_any_port(1);
    let follower = Node::on_any_port(2);
    // The handler hands each request's answer and hang-up flag to the test.
    let (handed_tx, handed) = std_mpsc::channel::<(ForwardDone, Abandoned)>();
    let handed_tx = Mutex::new(handed_tx);
    leader.transport.set_forward_handler(Arc::new(move |_req: ForwardRequest, done: ForwardDone, abandoned: Abandoned| {
        handed_tx.lock().unwrap().send((done, abandoned)).unwrap();
    }));
    let blpop = || {
        let argv = ["BLPOP", "q", "0"].iter().map(|a| a.as_bytes().to_vec()).collect();
        ForwardRequest::Blocking { db: 0, argv, resp3: false }
    };
    let start = |cancel: ForwardCancel| {
        let (tx, rx) = std_mpsc::channel();
        follower.transport.forward_until(leader.addr(), &blpop(), None, cancel, Box::new(move |r| tx.send(r).unwrap()));
        let (done, abandoned) = handed.recv_timeout(DEADLINE).expect("the leader gets the request");
        (rx, done, abandoned)
    };

    // Answered: the reply comes back, and nothing was abandoned.
    let (replies, done, abandoned) = start(ForwardCancel::default());
    done(Ok(b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n".to_vec()));
    assert_eq!(replies.recv_timeout(DEADLINE).unwrap().unwrap(), b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
    assert!(!abandoned.is_set());

    // Cancelled: the follower's client gets the reason at once, and the leader sees the
    // hang-up.
    let cancel = ForwardCancel::default();
    let (replies, _done, abandoned) = start(cancel.clone());
    assert!(replies.recv_timeout(Duration::from_millis(50)).is_err(), "it waits");
    assert!(!abandoned.is_set());
    cancel.cancel("TIMEOUT gave up");
    assert_eq!(replies.recv_timeout(DEADLINE).unwrap().unwrap_err(), "TIMEOUT gave up");
    wait_until("the leader to see the hang-up", || abandoned.is_set());
}

#[test]
fn a_second_server_with_a_connected_ones_node_id_is_refused_until_the_first_is_gone() {
    // Two servers started from copies of one raft dir: both are node 3, with addresses of their own.
    let node = |me: u64, client: &str| {
        let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("{client}.test:17000"));
        cfg.advertise_client = Some(format!("{client}.test:7000"));
        Node::with_config(cfg)
    };
    let (b, first, copy) = (node(2, "b"), node(3, "original"), node(3, "copy"));
    first.transport.set_peer_addr(NodeId(2), b.addr());
    first.transport.send(vec![msg(3, 2, 1)]);
    assert_eq!(b.raft_messages(1), vec![msg(3, 2, 1)]);

    copy.transport.set_peer_addr(NodeId(2), b.addr());
    copy.transport.send(vec![msg(3, 2, 2)]);
    copy.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    let why = copy.peer(2).last_error.expect("the refusal is kept");
    assert!(why.contains("another server is already node 3 here, connected from original.test:17000"), "{why}");
    first.transport.send(vec![msg(3, 2, 3)]);
    assert_eq!(b.raft_messages(1), vec![msg(3, 2, 3)], "the first one keeps the id; the copy's message is not delivered");
    assert!(b.rx.try_iter().all(|i| !matches!(i, Inbound::Hello { ref addr, .. } if addr.starts_with("copy"))));

    // The first one stops (its connection closes): the copy is let in at its next attempt.
    drop(first);
    copy.transport.send(vec![msg(3, 2, 4)]);
    let delivered = b.raft_messages(1);
    assert_eq!(delivered.last(), Some(&msg(3, 2, 4)), "{delivered:?}");
}

#[test]
fn a_node_of_another_cluster_is_refused_and_one_without_a_cluster_id_is_heard() {
    let node = |me: u64, cluster: u64| {
        let mut cfg = TransportConfig::new(NodeId(me), loopback(0), format!("node-{me}.test:17000"));
        cfg.advertise_client = Some(format!("node-{me}.test:7000"));
        cfg.cluster = ClusterId(cluster);
        Node::with_config(cfg)
    };
    let (b, same, other, joining) = (node(2, 0xb), node(1, 0xb), node(4, 0xa), node(3, 0));
    for n in [&same, &other, &joining] {
        n.transport.set_peer_addr(NodeId(2), b.addr());
    }
    other.transport.send(vec![msg(4, 2, 1)]);
    other.wait_for("Unreachable(2)", |i| matches!(i, Inbound::Unreachable(NodeId(2))).then_some(()));
    let why = other.peer(2).last_error.expect("the refusal is kept");
    assert!(why.contains("node 4 belongs to another cluster (cluster id 000000000000000a; this node's is 000000000000000b)"), "{why}");
    assert_eq!(b.transport.cluster_said_by(NodeId(4)), None, "a refused HELLO is not recorded");

    same.transport.send(vec![msg(1, 2, 2)]);
    joining.transport.send(vec![msg(3, 2, 3)]);
    let mut got = b.raft_messages(2);
    got.sort_by_key(|m| m.index);
    assert_eq!(got, vec![msg(1, 2, 2), msg(3, 2, 3)], "the other cluster's message is not delivered");
    assert_eq!(b.transport.cluster_said_by(NodeId(1)), Some(ClusterId(0xb)));
    assert_eq!(b.transport.cluster_said_by(NodeId(3)), Some(ClusterId::UNKNOWN));

    // A joining node that learnt its cluster says it from its next connection on.
    joining.transport.set_cluster_id(ClusterId(0xb));
    assert_eq!(joining.transport.cluster_id(), ClusterId(0xb));
}

#[test]
fn a_panic_on_a_peers_connection_ends_that_connection_not_the_peer() {
    init_log();
    // The callback panics the first time a peer says it removed us (a stand-in for any bug
    // while a connection is pumped); the peer must still be dialed again and get its messages.
    let peer = std::net::TcpListener::bind(loopback(0)).unwrap();
    peer.set_nonblocking(true).unwrap();
    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    let transport = Transport::start(TransportConfig::new(NodeId(1), loopback(0), "node-1.test:7000"), move |inbound| {
        if matches!(inbound, Inbound::Removed { .. }) && !flag.swap(true, Ordering::SeqCst) {
            panic!("a bug while a connection is pumped");
        }
    })
    .unwrap();
    transport.set_peer_addr(NodeId(2), peer.local_addr().unwrap().to_string());
    transport.send(vec![msg(1, 2, 1)]);
    let accept = || {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match peer.accept() {
                Ok((s, _)) => return s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    };
    let mut first = accept();
    first.write_all(b"-REMOVED node 2 has removed node 1\r\n").unwrap();
    wait_until("the callback to panic", || panicked.load(Ordering::SeqCst));

    let mut second = accept();
    second.set_nonblocking(false).unwrap();
    second.set_read_timeout(Some(DEADLINE)).unwrap();
    transport.send(vec![msg(1, 2, 2)]);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(b"payload 2".len()).any(|w| w == b"payload 2") {
        let n = second.read(&mut buf).expect("the second connection carries the next message");
        assert!(n > 0, "the second connection closed: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    transport.shutdown();
}

/// A loopback TCP socket as /proc/net/tcp reports it: its ports, and its timer's kind (2 is
/// keepalive) and when that fires, in 1/100 s.
struct SocketRow {
    local: u16,
    remote: u16,
    timer: u8,
    fires_in: u64,
}

fn loopback_sockets() -> Vec<SocketRow> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |field: &str| field.strip_prefix("0100007F:").and_then(|p| u16::from_str_radix(p, 16).ok());
    let row = |line: &str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (timer, fires_in) = fields.get(5)?.split_once(':')?;
        Some(SocketRow {
            local: port(fields.get(1)?)?,
            remote: port(fields.get(2)?)?,
            timer: u8::from_str_radix(timer, 16).ok()?,
            fires_in: u64::from_str_radix(fires_in, 16).ok()?,
        })
    };
    table.lines().skip(1).filter_map(row).collect()
}

/// Whether this idle socket has keepalive armed with [`keepalive::IDLE`].
fn probes_when_idle(socket: &SocketRow) -> bool {
    let idle = keepalive::IDLE.as_secs() * 100;
    socket.timer == 2 && socket.fires_in > idle - 1000 && socket.fires_in <= idle
}

fn socket_probes(local: u16, remote: u16) -> bool {
    loopback_sockets().iter().any(|s| s.local == local && s.remote == remote && probes_when_idle(s))
}

#[test]
fn every_side_port_connection_probes_its_peer_when_idle() {
    let a = Node::on_any_port(1);
    let a_port = a.transport.local_addr().port();
    // Accepted: the node's end of a connection to its listener. The test's own end has no
    // keepalive, which shows what the check tells apart.
    let client = std::net::TcpStream::connect(a.addr()).unwrap();
    let client_port = client.local_addr().unwrap().port();
    wait_until("the accepted connection to probe", || socket_probes(a_port, client_port));
    assert!(!socket_probes(client_port, a_port), "the test's end does not probe");

    // Dialed: the node's connection to a peer, once its message has been sent.
    let peer = std::net::TcpListener::bind(loopback(0)).unwrap();
    let peer_port = peer.local_addr().unwrap().port();
    a.transport.set_peer_addr(NodeId(2), loopback(peer_port).to_string());
    a.transport.send(vec![msg(1, 2, 1)]);
    let (_dialed, from) = peer.accept().unwrap();
    wait_until("the dialed connection to probe", || socket_probes(from.port(), peer_port));

    // Forwarding: a follower's pooled connection to the leader, after a request.
    let follower = Node::on_any_port(2);
    assert!(forward_and_wait(&follower, &a.addr(), &["GET", "k"]).is_err(), "no handler: refused, the connection pooled");
    wait_until("the forwarding connection to probe", || {
        loopback_sockets().iter().any(|s| s.remote == a_port && s.local != client_port && probes_when_idle(s))
    });
}

/// A download keeps reading the snapshot file it started, on its connection, after a newer
/// snapshot deleted it; another connection finds it gone.
#[test]
fn a_snapshot_file_deleted_during_its_download_is_still_served_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let name = "snapshot-00000000000000000005-1.rsnap";
    std::fs::write(dir.path().join(name), b"0123456789").unwrap();
    let mut cfg = TransportConfig::new(NodeId(1), loopback(0), "node-1.test:7000".to_string());
    cfg.snapshot_dir = Some(dir.path().to_path_buf());
    let a = Node::with_config(cfg);
    let connect = || {
        let s = std::net::TcpStream::connect(a.addr()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    };
    // The reply to one chunk request: a bulk string (two lines) or an error (one).
    let chunk = |s: &mut std::net::TcpStream, offset: &str| {
        s.write_all(&command(&[b"SNAPSHOT.CHUNK", name.as_bytes(), offset.as_bytes(), b"4"])).unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while got.windows(2).filter(|w| w == b"\r\n").count() < if got.starts_with(b"-") { 1 } else { 2 } {
            s.read_exact(&mut byte).unwrap();
            got.push(byte[0]);
        }
        String::from_utf8(got).unwrap()
    };
    let mut download = connect();
    assert_eq!(chunk(&mut download, "0"), "$4\r\n0123\r\n");
    std::fs::remove_file(dir.path().join(name)).unwrap();
    assert_eq!(chunk(&mut download, "4"), "$4\r\n4567\r\n");
    assert_eq!(chunk(&mut download, "8"), "$2\r\n89\r\n");
    let gone = chunk(&mut connect(), "0");
    assert!(gone.starts_with(&format!("-ERR cannot read {name}")), "{gone}");
}
