//! Stream reads that block (`XREAD ... BLOCK`, `XREADGROUP ... BLOCK`): a client waits on the
//! leader until a stream gets what it reads, and gets what plain Redis would give it. A consumer
//! group's delivery goes through the log, so every node delivers the same entries to the same
//! consumers.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{consumer_conn, produce, stat_field, wait_for, waiting_clients, Cluster, Server};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// Sends a blocking read on `conn` and returns once `server` counts `expected` clients waiting.
fn block(conn: &mut RespConn, read: &[&str], server: &Server, plain: bool, expected: u64) {
    conn.send(&[args(read)]).unwrap();
    wait_for("the read to wait", WAIT, || (waiting_clients(server, plain) == expected).then_some(()));
}

/// Readers waiting on `$` and consumers of one group waiting on `>` are served by each new entry
/// as plain Redis serves them: every reader gets it, the first consumer to come gets it alone.
/// Every node delivers the same entries to the same consumers.
#[test]
fn waiting_reads_get_what_plain_redis_gives_them() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let plain = Server::start_plain(raftis_integration::free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut replies: Vec<Vec<Reply>> = Vec::new();
    for (server, is_plain) in [(&plain, true), (leader, false)] {
        let mut producer = RespConn::connect(server.port).unwrap();
        call(&mut producer, &["XADD", "s", "1-1", "f", "old"]);
        call(&mut producer, &["XGROUP", "CREATE", "s", "g", "$"]);
        let reads: &[&[&str]] = &[
            &["XREAD", "BLOCK", "0", "STREAMS", "s", "t", "$", "$"],
            &["XREAD", "BLOCK", "0", "COUNT", "5", "STREAMS", "t", "s", "0", "1-1"],
            &["XREADGROUP", "GROUP", "g", "c1", "BLOCK", "0", "STREAMS", "s", ">"],
            &["XREADGROUP", "GROUP", "g", "c2", "BLOCK", "0", "STREAMS", "s", ">"],
        ];
        let mut readers: Vec<RespConn> = (0..reads.len()).map(|_| RespConn::connect(server.port).unwrap()).collect();
        call(&mut readers[1], &["HELLO", "3"]);
        for (i, (reader, read)) in readers.iter_mut().zip(reads).enumerate() {
            block(reader, read, server, is_plain, i as u64 + 1);
        }
        // One entry at a time: Redis serves its waiting clients after each command.
        call(&mut producer, &["XADD", "s", "2-1", "f", "new"]);
        let mut got: Vec<Reply> = readers[..3].iter_mut().map(|r| r.reply().unwrap()).collect();
        assert_eq!(waiting_clients(server, is_plain), 1, "the second consumer still waits");
        call(&mut producer, &["XADD", "t", "3-1", "f", "other key"]);
        call(&mut producer, &["XADD", "s", "4-1", "f", "next"]);
        got.push(readers[3].reply().unwrap());
        got.push(call(&mut producer, &["XINFO", "CONSUMERS", "s", "g"]));

        // A consumer whose group is destroyed, or whose stream is deleted, gets Redis' error; a
        // reader of the deleted stream goes on waiting.
        for stream in ["d1", "d2"] {
            call(&mut producer, &["XADD", stream, "1-1", "f", "v"]);
            call(&mut producer, &["XGROUP", "CREATE", stream, "g", "$"]);
        }
        block(&mut readers[0], &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "d1", ">"], server, is_plain, 1);
        block(&mut readers[1], &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "d2", ">"], server, is_plain, 2);
        block(&mut readers[2], &["XREAD", "BLOCK", "0", "STREAMS", "d2", "$"], server, is_plain, 3);
        call(&mut producer, &["XGROUP", "DESTROY", "d1", "g"]);
        got.push(readers[0].reply().unwrap());
        call(&mut producer, &["DEL", "d2"]);
        got.push(readers[1].reply().unwrap());
        assert_eq!(waiting_clients(server, is_plain), 1, "the reader still waits");
        call(&mut producer, &["XADD", "d2", "2-1", "f", "again"]);
        got.push(readers[2].reply().unwrap());
        replies.push(got);
    }
    let raftis = replies.pop().unwrap();
    for (i, (r, p)) in raftis.iter().zip(&replies[0]).enumerate() {
        if i != 4 {
            assert_eq!(r, p, "reply {i}");
        }
    }
    assert!(raftis[5].text().is_some_and(|e| e.starts_with("NOGROUP")) && raftis[6].text().is_some_and(|e| e.starts_with("UNBLOCKED")));
    // Each consumer has the entry it was given (idle times differ from plain Redis).
    let consumers = format!("{:?}", raftis[4]);
    assert!(consumers.contains("c1") && consumers.contains("c2"), "{consumers}");
    assert_eq!(waiting_clients(leader, false), 0);
    // The first attempt of each, then one per delivery: a consumer whose group has had the new
    // entry already does not try for it.
    assert_eq!(stat_field(leader, "blocked_pop_attempts"), 6 + 3);
    cluster.config_set("consistency", "low");
    wait_for("every node to deliver the same", WAIT, || {
        let states: Vec<String> =
            cluster.nodes.iter().map(|n| format!("{:?}", n.cmd::<redis::Value>(&["XINFO", "STREAM", "s", "FULL"]).unwrap())).collect();
        states.iter().all(|s| *s == states[0]).then_some(())
    });
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// Timeouts, errors, transactions, pipelines and Redis' limit on what a read served after
/// blocking gets: exactly the replies of plain Redis, in RESP2 and RESP3.
#[test]
fn replies_are_those_of_plain_redis() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    let follower = &cluster.nodes[(leader_index + 1) % 3];
    let plain = Server::start_plain(raftis_integration::free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let steps: &[&[&[&str]]] = &[
        &[&["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]],
        // Timeouts: a null.
        &[&["XREAD", "BLOCK", "50", "STREAMS", "s", "$"]],
        &[&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "50", "STREAMS", "s", ">"]],
        &[&["XREAD", "BLOCK", "50", "STREAMS", "missing", "0"]],
        // Errors.
        &[&["XREAD", "BLOCK", "-1", "STREAMS", "s", "$"]],
        &[&["XREAD", "BLOCK", "1.5", "STREAMS", "s", "$"]],
        &[&["XREAD", "BLOCK", "0", "STREAMS", "s", "t", "$"]],
        &[&["XREAD", "BLOCK", "0", "STREAMS", "s", ">"]],
        &[&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", "$"]],
        &[&["XREADGROUP", "GROUP", "nogroup", "c", "BLOCK", "0", "STREAMS", "s", ">"]],
        &[&["SET", "str", "v"]],
        &[&["XREAD", "BLOCK", "0", "STREAMS", "str", "0"]],
        // Served at once: what is there, and a consumer's own history.
        &[&["XADD", "s", "1-1", "f", "a"], &["XADD", "s", "1-2", "f", "b"]],
        &[&["XREAD", "BLOCK", "0", "STREAMS", "s", "0"]],
        &[&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "COUNT", "1", "STREAMS", "s", ">"]],
        &[&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", "0"]],
        // Inside MULTI nothing blocks.
        &[
            &["MULTI"],
            &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
            &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"],
            &["XADD", "s", "2-1", "f", "c"],
            &["EXEC"],
        ],
        // A pipeline's read sees the entry before it.
        &[
            &["XADD", "s", "3-1", "f", "d"],
            &["XREAD", "BLOCK", "0", "STREAMS", "s", "2-1"],
            &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "50", "STREAMS", "s", ">"],
        ],
    ];
    for (node, protocol) in [(leader, "2"), (leader, "3"), (follower, "2"), (follower, "3")] {
        let mut raftis = RespConn::connect(node.port).unwrap();
        let mut redis = RespConn::connect(plain.port).unwrap();
        for conn in [&mut raftis, &mut redis] {
            call(conn, &["HELLO", protocol]);
            call(conn, &["FLUSHALL"]);
        }
        for step in steps {
            let commands: Vec<Vec<Vec<u8>>> = step.iter().map(|c| args(c)).collect();
            let expected = redis.pipeline(&commands).unwrap();
            assert_eq!(raftis.pipeline(&commands).unwrap(), expected, "port {} RESP{protocol}: {step:?}", node.port);
        }
        // An error quoting the client's bytes, which need not be UTF-8, comes back as they are.
        let mut read = args(&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"]);
        read[2] = b"\xff\xfe".to_vec();
        let expected = redis.pipeline(&[read.clone()]).unwrap();
        assert!(expected[0].is_error());
        assert_eq!(raftis.pipeline(&[read]).unwrap(), expected, "port {} RESP{protocol}", node.port);
        // A read served after blocking gets at most 1000 entries unless it has a COUNT: a
        // transaction adds 1500 at once.
        let mut batch = vec![args(&["MULTI"])];
        batch.extend((1..=1500).map(|i| args(&["XADD", "s", &format!("{}-1", 100 + i), "f", "x"])));
        batch.push(args(&["EXEC"]));
        let mut got = Vec::new();
        // Readers on `server`, waiting where `waits_on` counts them.
        for (server, waits_on, conn, is_plain) in [(&plain, &plain, &mut redis, true), (node, leader, &mut raftis, false)] {
            let mut readers: Vec<RespConn> = (0..2).map(|_| RespConn::connect(server.port).unwrap()).collect();
            for reader in readers.iter_mut() {
                call(reader, &["HELLO", protocol]);
            }
            block(&mut readers[0], &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"], waits_on, is_plain, 1);
            block(&mut readers[1], &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"], waits_on, is_plain, 2);
            conn.pipeline(&batch).unwrap();
            got.push(readers.iter_mut().map(|r| r.reply().unwrap()).collect::<Vec<_>>());
            // RESP2: [[stream, entries]]; RESP3: {stream: entries}.
            let entries = |reply: &Reply| {
                let top = reply.items()?;
                let entries = match top.first()?.items() {
                    Some(pair) => pair.get(1)?,
                    None => top.get(1)?,
                };
                entries.items().map(<[Reply]>::len)
            };
            let counts: Vec<Option<usize>> = got.last().unwrap().iter().map(entries).collect();
            assert_eq!(counts, [Some(1000), Some(1000)], "port {} RESP{protocol}, plain: {is_plain}", server.port);
        }
        assert_eq!(got[1], got[0], "port {} RESP{protocol}", node.port);
    }
    assert_eq!(waiting_clients(leader, false), 0);
    assert_eq!(stat_field(follower, "blocked_forwarded_waiting"), 0);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// At consistency `low`, every node serves `XREAD ... BLOCK` from its own dataset, followers
/// included, without the log; a consumer group's reads still go to the leader.
#[test]
fn at_low_consistency_every_node_serves_blocking_reads() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = &cluster.nodes[(leader + 1) % 3];
    let mut producer = RespConn::connect(cluster.nodes[leader].port).unwrap();
    call(&mut producer, &["XADD", "s", "1-1", "f", "old"]);
    cluster.wait_converged(&[0, 1, 2]);
    let attempts = stat_field(&cluster.nodes[leader], "blocked_pop_attempts");
    let mut reader = RespConn::connect(follower.port).unwrap();
    assert_eq!(call(&mut reader, &["XREAD", "BLOCK", "10", "STREAMS", "s", "$"]), Reply::Null(b'*'), "timed out, on the follower");
    let got = format!("{:?}", call(&mut reader, &["XREAD", "BLOCK", "0", "STREAMS", "s", "0"]));
    assert!(got.contains("1-1"), "served at once: {got}");
    block(&mut reader, &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"], follower, false, 1);
    call(&mut producer, &["XADD", "s", "2-1", "f", "new"]);
    let got = format!("{:?}", reader.reply().unwrap());
    assert!(got.contains("2-1") && !got.contains("1-1"), "{got}");
    assert_eq!(waiting_clients(follower, false), 0);
    assert_eq!(stat_field(&cluster.nodes[leader], "blocked_pop_attempts"), attempts, "no attempt went through the log");
    call(&mut producer, &["XGROUP", "CREATE", "s", "g", "$"]);
    let moved = call(&mut reader, &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"]);
    assert!(moved.text().is_some_and(|t| t.starts_with("MOVED")), "a group's read delivers: a write, {moved:?}");
    // With the proxy, the follower sends it to wait at the leader.
    call(&mut reader, &["RAFT.CONFIG", "SET", "follower-proxy", "yes"]);
    block(&mut reader, &["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"], &cluster.nodes[leader], false, 1);
    assert_eq!(stat_field(follower, "blocked_forwarded_waiting"), 1);
    call(&mut producer, &["XADD", "s", "3-1", "f", "newer"]);
    let got = format!("{:?}", reader.reply().unwrap());
    assert!(got.contains("3-1") && got.contains("newer") && !got.contains("2-1"), "{got}");
    assert_eq!(stat_field(follower, "blocked_forwarded_waiting"), 0);
}

/// A leader that steps down answers its waiting readers `-MOVED`; followers redirect blocking
/// reads; a reader that leaves is forgotten and its group gives its entry to the next consumer.
#[test]
fn readers_are_redirected_moved_and_forgotten() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let old = cluster.wait_leader();
    let leader = &cluster.nodes[old];
    let mut admin = RespConn::connect(leader.port).unwrap();
    call(&mut admin, &["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]);
    let mut leaving = RespConn::connect(leader.port).unwrap();
    block(&mut leaving, &["XREADGROUP", "GROUP", "g", "gone", "BLOCK", "0", "STREAMS", "s", ">"], leader, false, 1);
    drop(leaving);
    wait_for("the reader that left to be forgotten", WAIT, || (waiting_clients(leader, false) == 0).then_some(()));
    let mut consumer = RespConn::connect(leader.port).unwrap();
    block(&mut consumer, &["XREADGROUP", "GROUP", "g", "stays", "BLOCK", "0", "STREAMS", "s", ">"], leader, false, 1);
    call(&mut admin, &["XADD", "s", "1-1", "f", "v"]);
    let got = format!("{:?}", consumer.reply().unwrap());
    assert!(got.contains("1-1"), "{got}");
    let pending = call(&mut admin, &["XPENDING", "s", "g"]);
    assert!(format!("{pending:?}").contains("stays") && !format!("{pending:?}").contains("gone"), "{pending:?}");

    let mut reader = RespConn::connect(leader.port).unwrap();
    block(&mut reader, &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"], leader, false, 1);
    // New tick counts make a leader hand leadership over.
    assert_eq!(call(&mut admin, &["RAFT.CONFIG", "SET", "election-ticks", "12"]).text().as_deref(), Some("OK"));
    let moved = reader.reply().unwrap();
    assert!(moved.text().is_some_and(|t| t.starts_with("MOVED ") || t.starts_with("CLUSTERDOWN")), "{moved:?}");
    let new = wait_for("another leader", WAIT, || {
        let leader = cluster.wait_leader();
        (leader != old).then_some(leader)
    });
    assert_eq!(waiting_clients(leader, false), 0);
    let redirect = call(&mut reader, &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]);
    let slot = redis::cluster_routing::get_slot(b"s");
    assert_eq!(redirect.text(), Some(format!("MOVED {slot} {}", cluster.nodes[new].addr())));
    // The new leader serves it.
    let mut reader = RespConn::connect(cluster.nodes[new].port).unwrap();
    block(&mut reader, &["XREAD", "BLOCK", "0", "STREAMS", "s", "1-1"], &cluster.nodes[new], false, 1);
    let mut producer = RespConn::connect(cluster.nodes[new].port).unwrap();
    call(&mut producer, &["XADD", "s", "2-1", "f", "v"]);
    assert!(format!("{:?}", reader.reply().unwrap()).contains("2-1"));
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// The leader is killed while consumers of one group wait in `XREADGROUP ... BLOCK` and a producer
/// adds entries: consumers move to the new leader and, as stream consumers do after a failure,
/// first read their own pending entries again. Every acknowledged entry then reaches exactly one
/// consumer, and none reaches two: an entry delivered by an attempt whose reply was lost is in its
/// consumer's pending list, on every node.
#[test]
fn a_killed_leader_delivers_every_entry_to_exactly_one_consumer() {
    consumers_outlive_a_killed_leader(false);
}

/// The same with the consumers on the followers, which send their reads to wait at the leader
/// (follower proxy): a follower's connection to the killed leader breaks under them.
#[test]
fn a_killed_leader_delivers_every_entry_to_exactly_one_consumer_through_followers() {
    consumers_outlive_a_killed_leader(true);
}

fn consumers_outlive_a_killed_leader(through_followers: bool) {
    const ENTRIES: usize = 300;
    let mut cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let first = cluster.wait_leader();
    let _: () = cluster.nodes[first].cmd(&["XGROUP", "CREATE", "jobs", "g", "$", "MKSTREAM"]).unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let added = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (ports, added) = (ports.clone(), added.clone());
        std::thread::spawn(move || {
            let ids = (1..=ENTRIES).map(|i| format!("{i}-1"));
            let add = |id: &String| args(&["XADD", "jobs", id, "n", id]);
            produce(&ports, ids, add, |id, reply| reply.text().as_deref() == Some(id.as_str()), &added)
        })
    };
    let consumers: Vec<_> = (0..3)
        .map(|k| {
            let (ports, stop) = (ports.clone(), stop.clone());
            std::thread::spawn(move || {
                let name = format!("c{k}");
                let mut received: Vec<String> = Vec::new();
                let mut conn: Option<RespConn> = None;
                while !stop.load(Ordering::SeqCst) {
                    let fresh = conn.is_none();
                    let c = conn.get_or_insert_with(|| consumer_conn(&ports, first, k, through_followers));
                    // After a failure a consumer reads what it was given and did not acknowledge.
                    let from: &[u8] = if fresh { b"0" } else { b">" };
                    let read = c.call(&[
                        b"XREADGROUP",
                        b"GROUP",
                        b"g",
                        name.as_bytes(),
                        b"COUNT",
                        b"10",
                        b"BLOCK",
                        b"500",
                        b"STREAMS",
                        b"jobs",
                        from,
                    ]);
                    let ids = match read {
                        Ok(Reply::Null(_)) => continue,
                        Ok(reply) => match entry_ids(&reply) {
                            Some(ids) => ids,
                            None => {
                                conn = None;
                                continue;
                            }
                        },
                        Err(_) => {
                            conn = None;
                            continue;
                        }
                    };
                    received.extend(ids.iter().cloned());
                    if !ids.is_empty() {
                        let mut ack: Vec<&[u8]> = vec![b"XACK", b"jobs", b"g"];
                        ack.extend(ids.iter().map(|id| id.as_bytes()));
                        if !matches!(c.call(&ack), Ok(reply) if reply.integer().is_some()) {
                            conn = None;
                        }
                    }
                }
                (name, received)
            })
        })
        .collect();

    cluster.kill_leader_midway(first, &added, ENTRIES);
    let (acknowledged, unknown) = producer.join().unwrap();
    assert!(acknowledged.len() >= ENTRIES / 3, "only {} entries acknowledged", acknowledged.len());
    let leader = cluster.wait_leader();
    let mut admin = RespConn::connect(cluster.nodes[leader].port).unwrap();
    wait_for("every entry delivered and acknowledged", Duration::from_secs(30), || {
        let groups = admin.call(&[b"XINFO", b"GROUPS", b"jobs"]).ok()?;
        let group = groups.items()?.first()?.items()?.to_vec();
        let field = |name: &str| group.chunks(2).find(|kv| kv[0].text().as_deref() == Some(name)).and_then(|kv| kv[1].integer());
        (field("lag") == Some(0) && field("pending") == Some(0)).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let mut owner: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for c in consumers {
        let (name, received) = c.join().unwrap();
        for id in received {
            if let Some(other) = owner.insert(id.clone(), name.clone()) {
                assert_eq!(other, name, "{id} was delivered to {other} and to {name}");
            }
        }
    }
    for id in owner.keys() {
        assert!(acknowledged.contains(id) || unknown.contains(id), "{id} was never added");
    }
    let lost: Vec<&String> = acknowledged.iter().filter(|id| !owner.contains_key(*id)).collect();
    assert!(lost.is_empty(), "acknowledged entries {lost:?} reached no consumer");
    eprintln!("{} delivered, {} entries of unknown outcome", owner.len(), unknown.len());
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// The IDs of the entries in an `XREADGROUP` reply (RESP2); None for an error.
fn entry_ids(reply: &Reply) -> Option<Vec<String>> {
    let streams = reply.items()?;
    let entries = streams.first()?.items()?.get(1)?.items()?;
    Some(entries.iter().filter_map(|e| e.items()?.first()?.text()).collect())
}

/// With the proxy, a leader's own client waiting in `XREADGROUP ... BLOCK` waits on at the next
/// leader after a hand-over, as the same consumer; and again after a second hand-over, however
/// long after the first. (Waiting, the read gets Redis' `COUNT 1000`, which moves its other
/// arguments: the remaining timeout must still replace the timeout, not the consumer's name.)
#[test]
fn a_group_read_waits_on_as_the_same_consumer_across_hand_overs() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let first = cluster.wait_leader();
    call(&mut RespConn::connect(cluster.nodes[first].port).unwrap(), &["XGROUP", "CREATE", "s", "g", "$", "MKSTREAM"]);
    let mut reader = RespConn::connect(cluster.nodes[first].port).unwrap();
    block(&mut reader, &["XREADGROUP", "GROUP", "g", "alice", "BLOCK", "60000", "STREAMS", "s", ">"], &cluster.nodes[first], false, 1);

    let mut leader = first;
    for round in 0..2 {
        if round > 0 {
            // Longer than a follower keeps sending a command that leaders refuse.
            std::thread::sleep(Duration::from_secs(6));
        }
        let ok = call(&mut RespConn::connect(cluster.nodes[leader].port).unwrap(), &["RAFT.TRANSFERLEADER"]);
        assert_eq!(ok.text().as_deref(), Some("OK"), "{ok:?}");
        let next = wait_for("another leader", WAIT, || Some(cluster.wait_leader()).filter(|l| *l != leader));
        wait_for("the read to wait at the new leader", WAIT, || (waiting_clients(&cluster.nodes[next], false) == 1).then_some(()));
        leader = next;
    }

    let mut producer = RespConn::connect(cluster.nodes[leader].port).unwrap();
    call(&mut producer, &["XADD", "s", "5-1", "f", "v"]);
    let got = reader.reply().unwrap();
    assert!(format!("{got:?}").contains("5-1"), "{got:?}");
    let consumers = call(&mut producer, &["XINFO", "CONSUMERS", "s", "g"]);
    let names: Vec<String> = consumers.items().unwrap().iter().map(|c| c.items().unwrap()[1].text().unwrap()).collect();
    assert_eq!(names, ["alice"], "{consumers:?}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}
