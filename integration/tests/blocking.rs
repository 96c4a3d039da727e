//! Blocking pops (BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP): a client
//! waits on the leader until a push, and the pop that serves it goes through the log, so every
//! node pops the same element, clients are served in the order they came, and nothing pushed is
//! lost or popped twice.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{consumer_conn, produce, refused, stat_field, wait_for, waiting_clients, Cluster, Server};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn bulk(s: &str) -> Reply {
    Reply::Blob(b'$', s.as_bytes().to_vec())
}

fn popped(key: &str, value: &str) -> Reply {
    Reply::Aggregate(b'*', vec![bulk(key), bulk(value)])
}

fn waiting(server: &Server) -> u64 {
    stat_field(server, "blocked_pops_waiting")
}

/// Sends a blocking pop on `conn` and returns once the leader counts `expected` clients waiting.
fn block(conn: &mut RespConn, pop: &[&str], leader: &Server, expected: u64) {
    conn.send(&[args(pop)]).unwrap();
    wait_for("the pop to wait", WAIT, || (waiting(leader) == expected).then_some(()));
}

/// Makes the leader `old` hand leadership over (a leader given new tick counts does, to rebuild its
/// Raft state), and returns the new leader.
fn step_down(cluster: &Cluster, old: usize, election_ticks: &str) -> usize {
    let _: () = cluster.nodes[old].cmd(&["RAFT.CONFIG", "SET", "election-ticks", election_ticks]).unwrap();
    wait_for("a new leader", WAIT, || {
        let leader = cluster.wait_leader();
        (leader != old).then_some(leader)
    })
}

#[test]
fn waiting_pops_are_served_in_arrival_order_and_every_node_pops_the_same() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let mut waiters: Vec<RespConn> = (0..3).map(|_| RespConn::connect(leader.port).unwrap()).collect();
    for (i, w) in waiters.iter_mut().enumerate() {
        block(w, &["BLPOP", "jobs", "other", "0"], leader, i as u64 + 1);
    }
    let mut producer = RespConn::connect(leader.port).unwrap();
    assert_eq!(call(&mut producer, &["RPUSH", "jobs", "a", "b"]), Reply::Line(b':', b"2".to_vec()));
    assert_eq!(waiters[0].reply().unwrap(), popped("jobs", "a"), "the first to come is served first");
    assert_eq!(waiters[1].reply().unwrap(), popped("jobs", "b"));
    assert_eq!(waiting(leader), 1, "two elements serve two clients");
    // The third was not served meanwhile: it gets what comes next, on another of its keys.
    assert_eq!(call(&mut producer, &["LPUSH", "other", "c"]), Reply::Line(b':', b"1".to_vec()));
    assert_eq!(waiters[2].reply().unwrap(), popped("other", "c"));
    assert_eq!(waiting(leader), 0);
    // Every attempt, those that found nothing included, went through the log.
    assert!(stat_field(leader, "blocked_pop_attempts") >= 5);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// Timeouts, errors, transactions and pipelines answer exactly as plain Redis does, in RESP2
/// and RESP3, on the leader and through a follower with the proxy.
#[test]
fn replies_are_those_of_plain_redis() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    let follower = &cluster.nodes[(leader_index + 1) % 3];
    let plain_dir = cluster.root.path().join("plain");
    let plain = Server::start_plain(raftis_integration::free_port_pair(), &plain_dir).unwrap();
    let steps: &[&[&[&str]]] = &[
        // Timeouts: a null array, or a null bulk string for the pops that move an element.
        &[&["BLPOP", "l", "0.05"]],
        &[&["BRPOPLPUSH", "l", "d", "0.05"]],
        &[&["BLMOVE", "l", "d", "LEFT", "RIGHT", "0.05"]],
        &[&["BZPOPMIN", "z", "0.05"]],
        &[&["BLMPOP", "0.05", "1", "l", "LEFT"]],
        &[&["BZMPOP", "0.05", "1", "z", "MIN"]],
        // As strtold reads them: hexadecimal, and below a double's range.
        &[&["BLPOP", "l", "0x1p-5"]],
        &[&["BZPOPMIN", "z", "1e-400"]],
        // Errors, with nothing proposed or with the attempt's own.
        &[&["BLPOP", "l", "-1"]],
        &[&["BLPOP", "l", "abc"]],
        &[&["BLMPOP", "0", "x", "l", "LEFT"]],
        // Redis checks a pop's other arguments before its timeout, or after it, by command.
        &[&["BZMPOP", "x", "y", "z", "MIN"]],
        &[&["BLMOVE", "l", "d", "UP", "LEFT", "x"]],
        &[&["BLPOP", "l", "x"]],
        &[&["SET", "s", "v"]],
        &[&["BLPOP", "s", "0"]],
        // Served at once.
        &[&["RPUSH", "l", "a", "b", "c", "d"]],
        &[&["BLPOP", "nothing", "l", "0"]],
        &[&["BRPOP", "l", "0"]],
        &[&["BLMOVE", "l", "d", "RIGHT", "LEFT", "0"]],
        &[&["BLMPOP", "0", "2", "nothing", "d", "RIGHT", "COUNT", "5"]],
        &[&["ZADD", "z", "1", "a", "2", "b", "3", "c"]],
        &[&["BZPOPMAX", "z", "0"]],
        &[&["BZMPOP", "0", "1", "z", "MIN", "COUNT", "5"]],
        // Inside MULTI nothing blocks: an empty key answers null at once.
        &[&["MULTI"], &["BLPOP", "l", "0"], &["RPUSH", "l", "x"], &["BRPOP", "l", "0"], &["EXEC"]],
        // A pipeline's pop sees the push before it, and the next command sees the pop.
        &[&["RPUSH", "p", "1"], &["BLPOP", "p", "0"], &["LLEN", "p"], &["BLPOP", "p", "0.05"], &["LLEN", "p"]],
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
    }
    assert_eq!(waiting(leader), 0);
    assert_eq!(stat_field(follower, "blocked_forwarded_waiting"), 0);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A waiting pop is served from the key that gets elements, as in Redis, though another of its
/// keys turned into another type meanwhile (a retry naming every key would meet that one first).
#[test]
fn a_waiting_pop_passes_over_keys_that_changed_type_as_in_redis() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = &cluster.nodes[cluster.wait_leader()];
    let plain = Server::start_plain(raftis_integration::free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let cases: &[(&[&str], &[&[&str]])] = &[
        (&["BLPOP", "a", "b", "0"], &[&["SET", "a", "str"], &["RPUSH", "b", "x"]]),
        (&["BLMPOP", "0", "3", "a", "b", "c", "RIGHT", "COUNT", "2"], &[&["SET", "a", "str"], &["RPUSH", "c", "x", "y", "z"]]),
        (&["BZPOPMIN", "a", "b", "0"], &[&["SET", "a", "str"], &["ZADD", "b", "1", "m"]]),
        (&["BZMPOP", "0", "2", "a", "b", "MAX"], &[&["SET", "a", "str"], &["ZADD", "b", "1", "m", "2", "n"]]),
    ];
    let mut replies = Vec::new();
    for (server, is_plain) in [(&plain, true), (leader, false)] {
        let mut other = RespConn::connect(server.port).unwrap();
        let mut w = RespConn::connect(server.port).unwrap();
        for (pop, changes) in cases {
            call(&mut other, &["FLUSHALL"]);
            w.send(&[args(pop)]).unwrap();
            wait_for("the pop to wait", WAIT, || (waiting_clients(server, is_plain) == 1).then_some(()));
            for change in *changes {
                call(&mut other, change);
            }
            replies.push((pop.to_vec(), w.reply().unwrap()));
        }
    }
    let (redis, raftis) = replies.split_at(cases.len());
    assert_eq!(raftis, redis);
    assert!(raftis.iter().all(|(_, reply)| !reply.is_error()), "{raftis:?}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// On the leader, and through a follower with the proxy (which hangs up on the leader, so that it
/// forgets the wait too).
#[test]
fn a_pop_whose_client_leaves_takes_nothing_and_client_unblock_answers_as_in_redis() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    for via in [leader, &cluster.nodes[(leader_index + 1) % 3]] {
        let mut other = RespConn::connect(via.port).unwrap();
        let (q, empty) = (format!("q{}", via.port), format!("empty{}", via.port));

        let mut gone = RespConn::connect(via.port).unwrap();
        block(&mut gone, &["BLPOP", &q, "0"], leader, 1);
        drop(gone);
        wait_for("the pop of a closed connection to be forgotten", WAIT, || (waiting(leader) == 0).then_some(()));
        call(&mut other, &["RPUSH", &q, "kept"]);

        let mut w = RespConn::connect(via.port).unwrap();
        let id = call(&mut w, &["CLIENT", "ID"]).integer().unwrap().to_string();
        block(&mut w, &["BLPOP", &empty, "0"], leader, 1);
        assert_eq!(call(&mut other, &["CLIENT", "UNBLOCK", &id]).integer(), Some(1));
        assert_eq!(w.reply().unwrap(), Reply::Null(b'*'), "unblocked as by its timeout");
        block(&mut w, &["BRPOPLPUSH", &empty, "dst", "0"], leader, 1);
        assert_eq!(call(&mut other, &["CLIENT", "UNBLOCK", &id, "ERROR"]).integer(), Some(1));
        let error = w.reply().unwrap();
        assert_eq!(error.text().as_deref(), Some("UNBLOCKED client unblocked via CLIENT UNBLOCK"), "{error:?}");
        wait_for("the unblocked pops to be forgotten", WAIT, || (waiting(leader) == 0).then_some(()));
        call(&mut other, &["RPUSH", &empty, "kept"]);

        // Nothing was popped for the clients that are not waiting any more.
        for key in [&q, &empty] {
            assert_eq!(call(&mut other, &["LRANGE", key, "0", "-1"]), Reply::Aggregate(b'*', vec![bulk("kept")]), "{key}");
        }
        assert_eq!(stat_field(via, "blocked_forwarded_waiting"), 0);
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A pop whose timeout comes while Redis' main thread is held up past its backstop (timeout,
/// write-timeout and 2 s; here by DEBUG SLEEP) still gets its null reply. (The backstop was
/// Redis' own timer, and Redis 7.0 runs those before it takes modules' answers: the client got
/// no reply at all.)
#[test]
fn a_pop_that_times_out_while_the_main_thread_is_held_up_still_gets_its_reply() {
    let cluster = Cluster::start(1, &["write-timeout=200"]).unwrap();
    let node = &cluster.nodes[0];
    let mut waiter = RespConn::connect(node.port).unwrap();
    block(&mut waiter, &["BLPOP", "q", "2"], node, 1);
    let mut sleeper = RespConn::connect(node.port).unwrap();
    sleeper.send(&[args(&["DEBUG", "SLEEP", "6"])]).unwrap();
    assert_eq!(waiter.reply().unwrap(), Reply::Null(b'*'));
    assert_eq!(sleeper.reply().unwrap(), Reply::Line(b'+', b"OK".to_vec()));
    // A client popping in a loop with a long timeout, served at once each time, leaves no
    // backstop timer behind.
    let mut producer = RespConn::connect(node.port).unwrap();
    for i in 0..200 {
        call(&mut producer, &["RPUSH", "jobs", &i.to_string()]);
        assert_eq!(call(&mut waiter, &["BLPOP", "jobs", "3600"]), popped("jobs", &i.to_string()));
    }
    wait_for("the backstops of answered pops to be stopped", WAIT, || (stat_field(node, "blocked_backstops") == 0).then_some(()));
}

/// A forwarded pop the leader does not answer long after its timeout (its main thread held up,
/// here by DEBUG SLEEP) may have run there: the follower's backstop says so. (Redis' own timer
/// once fired with the backstop and, Redis 7.0 taking the module's answer after its own timeout,
/// the client got no reply at all.)
#[test]
fn a_forwarded_pop_that_the_leader_never_answers_may_or_may_not_have_run() {
    let cluster = Cluster::start(3, &["follower-proxy=yes", "write-timeout=500"]).unwrap();
    let leader_index = cluster.wait_leader();
    let leader = &cluster.nodes[leader_index];
    let mut waiter = RespConn::connect(cluster.nodes[(leader_index + 1) % 3].port).unwrap();
    // The pop's own timeout leaves a loaded machine time to start the sleep before it.
    block(&mut waiter, &["BLPOP", "q", "3"], leader, 1);
    // Its backstop: 3 s, twice write-timeout and a second each, and 2 s: 8 s.
    let mut sleeper = RespConn::connect(leader.port).unwrap();
    sleeper.send(&[args(&["DEBUG", "SLEEP", "12"])]).unwrap();
    let reply = waiter.reply().unwrap();
    let text = reply.text().unwrap_or_default();
    // (Or, should the others elect a new leader meanwhile, the follower's word for that.)
    assert!(text.starts_with("TIMEOUT the leader") && text.ends_with("may or may not have taken effect"), "{reply:?}");
    assert_eq!(sleeper.reply().unwrap(), Reply::Line(b'+', b"OK".to_vec()));
}

/// A follower's client keeps waiting across a change of leader: the leader that steps down says
/// the pop did not run there, and the follower sends it to the next one, for what is left of its
/// timeout.
#[test]
fn a_forwarded_pop_follows_the_leader_when_it_steps_down() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let old = cluster.wait_leader();
    let via = &cluster.nodes[(old + 1) % 3];
    let mut forever = RespConn::connect(via.port).unwrap();
    let mut briefly = RespConn::connect(via.port).unwrap();
    block(&mut forever, &["BLPOP", "q", "0"], &cluster.nodes[old], 1);
    // Long enough to outlast the hand-over on a slow machine: it must still wait at the next
    // leader.
    block(&mut briefly, &["BLPOP", "empty", "8"], &cluster.nodes[old], 2);
    let new = step_down(&cluster, old, "12");
    wait_for("the pops to wait at the new leader", WAIT, || (waiting(&cluster.nodes[new]) == 2).then_some(()));
    let mut producer = RespConn::connect(cluster.nodes[new].port).unwrap();
    call(&mut producer, &["RPUSH", "q", "x"]);
    assert_eq!(forever.reply().unwrap(), popped("q", "x"));
    assert_eq!(briefly.reply().unwrap(), Reply::Null(b'*'), "its timeout, not an error");
    assert_eq!(stat_field(via, "blocked_forwarded_waiting"), 0);
}

/// Many clients of a follower (job workers, say) wait at the leader, which hands over to a node
/// the follower does not hear from for a while: each pop, refused by the old leader, waits for
/// the follower to learn the new one, in one queue rather than on a thread of its own, and then
/// waits on at the new leader and pops there.
#[test]
fn many_forwarded_pops_wait_for_the_next_leader_without_a_thread_each() {
    const CLIENTS: usize = 200;
    let cluster = Cluster::start_partitionable(3, &["follower-proxy=yes"]).unwrap();
    let old = cluster.wait_leader();
    let (via, next) = ((old + 1) % 3, (old + 2) % 3);
    let threads_before = cluster.nodes[via].threads();
    let mut workers: Vec<RespConn> = (0..CLIENTS)
        .map(|i| {
            let mut w = RespConn::connect(cluster.nodes[via].port).unwrap();
            w.send(&[args(&["BLPOP", &format!("job:{i}"), "0"])]).unwrap();
            w
        })
        .collect();
    wait_for("the pops to wait at the leader", WAIT, || (waiting(&cluster.nodes[old]) == CLIENTS as u64).then_some(()));
    // The follower keeps taking the old leader for the leader: the new one's messages are held.
    cluster.network.as_ref().unwrap().block(next, via);
    let next_id = cluster.nodes[next].node_id().to_string();
    let _: () = cluster.nodes[old].cmd(&["RAFT.TRANSFERLEADER", &next_id]).unwrap();
    wait_for("the old leader to refuse the pops", WAIT, || (waiting(&cluster.nodes[old]) == 0).then_some(()));
    assert_eq!(stat_field(&cluster.nodes[via], "blocked_forwarded_waiting"), CLIENTS as u64, "the clients still wait");
    let most = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(30));
            cluster.nodes[via].threads()
        })
        .max()
        .unwrap();
    assert!(most <= threads_before + 2, "{most} threads while the pops wait for the next leader, {threads_before} before");
    cluster.network.as_ref().unwrap().heal();
    wait_for("the pops to wait at the new leader", WAIT, || (waiting(&cluster.nodes[next]) == CLIENTS as u64).then_some(()));
    let mut producer = RespConn::connect(cluster.nodes[next].port).unwrap();
    for i in 0..CLIENTS {
        call(&mut producer, &["RPUSH", &format!("job:{i}"), &i.to_string()]);
    }
    for (i, w) in workers.iter_mut().enumerate() {
        assert_eq!(w.reply().unwrap(), popped(&format!("job:{i}"), &i.to_string()));
    }
    assert_eq!(stat_field(&cluster.nodes[via], "blocked_forwarded_waiting"), 0);
}

/// A leader's waiting client, sent on to the next leader when this one steps down (proxy), keeps
/// the backstop it got here: the next leader's answer must come before it. Here the next leader
/// pops for it while this node's main thread is held up past that backstop; the element still
/// reaches the client, which is never told that nothing was popped.
#[test]
fn a_pop_sent_on_to_the_next_leader_is_delivered_though_its_first_leader_is_held_up_past_its_backstop() {
    let cluster = Cluster::start(3, &["follower-proxy=yes", "consistency=low", "write-timeout=1000"]).unwrap();
    let old = cluster.wait_leader();
    let next = (old + 1) % 3;
    let mut w = RespConn::connect(cluster.nodes[old].port).unwrap();
    // Its backstop: the 3 s timeout, write-timeout and 2 s more, from now.
    block(&mut w, &["BLPOP", "q", "3"], &cluster.nodes[old], 1);
    let next_id = cluster.nodes[next].node_id().to_string();
    let _: () = cluster.nodes[old].cmd(&["RAFT.TRANSFERLEADER", &next_id]).unwrap();
    wait_for("the pop to wait at the next leader", WAIT, || (waiting(&cluster.nodes[next]) == 1).then_some(()));
    let mut sleeper = RespConn::connect(cluster.nodes[old].port).unwrap();
    sleeper.send(&[args(&["DEBUG", "SLEEP", "7"])]).unwrap();
    wait_for("the main thread to sleep", WAIT, || cluster.nodes[old].main_thread_sleeps().then_some(()));
    let mut producer = RespConn::connect(cluster.nodes[next].port).unwrap();
    call(&mut producer, &["RPUSH", "q", "x"]);
    assert_eq!(w.reply().unwrap(), popped("q", "x"));
    assert_eq!(sleeper.reply().unwrap(), Reply::Line(b'+', b"OK".to_vec()));
}

/// A pop that a follower could not deliver (its leader was just killed) has not run yet: at the
/// next leader it runs once, as its first attempt, even if its timeout is over by then, and takes
/// the element that was there all along, as Redis would have at once.
#[test]
fn a_pop_that_missed_a_killed_leader_runs_at_the_next_one_though_its_timeout_is_over() {
    let mut cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let old = cluster.wait_leader();
    let via = (old + 1) % 3;
    let _: i64 = cluster.nodes[old].cmd(&["RPUSH", "q", "x"]).unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    cluster.nodes[old].kill9();
    // The follower still takes the dead node for the leader: it cannot reach it, and the pop
    // goes to the next leader once one is elected, well past its 100 ms.
    let mut w = RespConn::connect(cluster.nodes[via].port).unwrap();
    assert_eq!(call(&mut w, &["BLPOP", "q", "0.1"]), popped("q", "x"));
}

/// A leader that cannot answer (stopped here) cannot tell a follower's waiting client that it
/// stepped down: the follower ends the wait itself once another node leads, and the stopped
/// leader, resumed, pops nothing for it.
#[test]
fn a_follower_ends_a_forwarded_wait_when_its_leader_is_replaced() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let old = cluster.wait_leader();
    let via = &cluster.nodes[(old + 1) % 3];
    let mut w = RespConn::connect(via.port).unwrap();
    block(&mut w, &["BLPOP", "q", "0"], &cluster.nodes[old], 1);
    cluster.nodes[old].pause();
    let error = w.reply().unwrap();
    cluster.nodes[old].resume();
    let new = cluster.wait_leader();
    assert_eq!(
        error.text().as_deref(),
        Some("TIMEOUT the leader changed while the command waited; it may or may not have taken effect"),
        "{error:?}"
    );
    assert_eq!(stat_field(via, "blocked_forwarded_waiting"), 0);
    wait_for("the old leader to forget the wait", WAIT, || (waiting(&cluster.nodes[old]) == 0).then_some(()));
    let mut producer = RespConn::connect(cluster.nodes[new].port).unwrap();
    call(&mut producer, &["RPUSH", "q", "kept"]);
    assert_eq!(call(&mut producer, &["LRANGE", "q", "0", "-1"]), Reply::Aggregate(b'*', vec![bulk("kept")]));
    // Waiting again, the client is forwarded to the new leader.
    assert_eq!(call(&mut w, &["BLPOP", "q", "0"]), popped("q", "kept"));
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A leader that steps down answers its waiting clients `-MOVED`; with the proxy they wait on at
/// the next leader instead, and a follower forwards the pops it gets.
#[test]
fn a_leader_that_steps_down_answers_its_waiting_pops_with_moved_or_sends_them_on_with_the_proxy() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let first = cluster.wait_leader();
    let mut w = RespConn::connect(cluster.nodes[first].port).unwrap();
    block(&mut w, &["BLPOP", "q", "0"], &cluster.nodes[first], 1);
    let second = step_down(&cluster, first, "12");
    let moved = w.reply().unwrap();
    assert!(moved.text().is_some_and(|t| t.starts_with("MOVED ") || t.starts_with("CLUSTERDOWN")), "{moved:?}");
    assert_eq!(waiting(&cluster.nodes[first]), 0);

    cluster.config_set("follower-proxy", "yes");
    let mut w = RespConn::connect(cluster.nodes[second].port).unwrap();
    block(&mut w, &["BLPOP", "q", "0"], &cluster.nodes[second], 1);
    let third = step_down(&cluster, second, "14");
    wait_for("the pop to wait on at the new leader", WAIT, || (waiting(&cluster.nodes[third]) == 1).then_some(()));
    assert_eq!(stat_field(&cluster.nodes[second], "blocked_forwarded_waiting"), 1);
    let mut producer = RespConn::connect(cluster.nodes[third].port).unwrap();
    call(&mut producer, &["RPUSH", "q", "a"]);
    assert_eq!(w.reply().unwrap(), popped("q", "a"), "the client waited on, through the change");

    // The old leader, a follower now, forwards a pop with the proxy, to wait at the new leader.
    block(&mut w, &["BLPOP", "q", "0"], &cluster.nodes[third], 1);
    call(&mut producer, &["RPUSH", "q", "b"]);
    assert_eq!(w.reply().unwrap(), popped("q", "b"));
    assert_eq!(stat_field(&cluster.nodes[second], "blocked_forwarded_waiting"), 0);
    // Without the proxy it redirects.
    let _: () = cluster.nodes[second].cmd(&["RAFT.CONFIG", "SET", "follower-proxy", "no"]).unwrap();
    let redirect = call(&mut w, &["BLPOP", "q", "0"]);
    let expected = format!("MOVED {} {}", redis::cluster_routing::get_slot(b"q"), cluster.nodes[third].addr());
    assert_eq!(redirect.text(), Some(expected), "{redirect:?}");
    let _: () = cluster.nodes[second].cmd(&["RAFT.CONFIG", "SET", "follower-proxy", "yes"]).unwrap();
    // Inside a transaction a pop does not block, and the follower forwards it with the rest.
    let replies = w.pipeline(&[args(&["MULTI"]), args(&["RPUSH", "q", "x"]), args(&["BLPOP", "q", "0"]), args(&["EXEC"])]).unwrap();
    assert_eq!(replies[3], Reply::Aggregate(b'*', vec![Reply::Line(b':', b"1".to_vec()), popped("q", "x")]));
}

/// Consumers and producers on several connections: every element pushed is popped exactly once,
/// and every node, one of them restarted from its log, holds the same dataset afterwards.
#[test]
fn producers_and_consumers_lose_and_duplicate_nothing() {
    const ITEMS: usize = 300;
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let port = cluster.nodes[leader].port;
    let consumed = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let consumers: Vec<_> = (0..4)
        .map(|c| {
            let (consumed, count) = (consumed.clone(), count.clone());
            std::thread::spawn(move || {
                let mut conn = RespConn::connect(port).unwrap();
                // Each waits on a key of its own too, which nobody pushes to.
                let own = format!("idle-{c}");
                while count.load(Ordering::SeqCst) < ITEMS {
                    let reply = call(&mut conn, &["BLPOP", &own, "work", "zwork", "0.5"]);
                    let Some(items) = reply.items() else { continue };
                    let item = String::from_utf8(items[1].bytes().unwrap().to_vec()).unwrap();
                    consumed.lock().unwrap().push(item);
                    count.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..2)
        .map(|p| {
            std::thread::spawn(move || {
                let mut conn = RespConn::connect(port).unwrap();
                for i in (p..ITEMS).step_by(2) {
                    let reply = call(&mut conn, &["RPUSH", "work", &i.to_string()]);
                    assert!(reply.integer().is_some(), "{reply:?}");
                }
            })
        })
        .collect();
    for t in producers.into_iter().chain(consumers) {
        t.join().unwrap();
    }
    let mut items: Vec<usize> = consumed.lock().unwrap().iter().map(|i| i.parse().unwrap()).collect();
    items.sort_unstable();
    assert_eq!(items, (0..ITEMS).collect::<Vec<_>>(), "every element popped exactly once");
    assert_eq!(waiting(&cluster.nodes[leader]), 0);

    let follower = (0..3).find(|i| *i != leader).unwrap();
    cluster.nodes[follower].kill9();
    cluster.nodes[follower].restart().unwrap();
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// The leader is killed while consumers wait in BLMOVE and a producer pushes: clients move to the
/// new leader, and still no element is taken twice, none appears that was not pushed, and every
/// acknowledged push is either still in the list or in exactly one consumer's list. Each
/// consumer moves what it takes into a list of its own, so even a pop whose outcome the consumer
/// never learnt (its connection broke, or it timed out, with an attempt in the log) is accounted
/// for: nothing acknowledged may go missing.
#[test]
fn a_killed_leader_loses_and_duplicates_nothing_its_consumers_popped() {
    consumers_outlive_a_killed_leader(false);
}

/// The same with consumers on the followers, which send their pops to the leader (follower
/// proxy): a follower's connection to the killed leader breaks under its waiting clients.
#[test]
fn a_killed_leader_loses_and_duplicates_nothing_consumers_popped_through_followers() {
    consumers_outlive_a_killed_leader(true);
}

fn consumers_outlive_a_killed_leader(through_followers: bool) {
    const ITEMS: usize = 300;
    let mut cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let first = cluster.wait_leader();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let pushed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (ports, pushed) = (ports.clone(), pushed.clone());
        std::thread::spawn(move || {
            let push = |i: &usize| args(&["RPUSH", "work", &i.to_string()]);
            produce(&ports, 0..ITEMS, push, |_, reply| reply.integer().is_some(), &pushed)
        })
    };
    let consumers: Vec<_> = (0..3)
        .map(|k| {
            let (ports, stop) = (ports.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut popped, mut unknown) = (Vec::new(), 0);
                let mut conn = None;
                let own = format!("got-{k}");
                while !stop.load(Ordering::SeqCst) {
                    let c = conn.get_or_insert_with(|| consumer_conn(&ports, first, k, through_followers));
                    match c.call(&[b"BLMOVE", b"work", own.as_bytes(), b"LEFT", b"RIGHT", b"0.5"]) {
                        Ok(Reply::Blob(b'$', item)) => popped.push(String::from_utf8(item).unwrap().parse::<usize>().unwrap()),
                        Ok(Reply::Null(_)) => {}
                        Ok(reply) if refused(&reply) => conn = None,
                        Ok(_) | Err(_) => {
                            unknown += 1;
                            conn = None;
                        }
                    }
                }
                (popped, unknown)
            })
        })
        .collect();

    cluster.kill_leader_midway(first, &pushed, ITEMS);
    let (acknowledged, unknown_pushes) = producer.join().unwrap();
    assert!(acknowledged.len() >= ITEMS / 3, "only {} items acknowledged", acknowledged.len());
    let leader = cluster.wait_leader();
    wait_for("the consumers to empty the list", Duration::from_secs(30), || {
        (cluster.nodes[leader].cmd::<i64>(&["LLEN", "work"]).ok()? == 0).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let list = |key: &str| -> Vec<usize> {
        let items: Vec<String> = cluster.nodes[leader].cmd(&["LRANGE", key, "0", "-1"]).unwrap();
        items.iter().map(|i| i.parse().unwrap()).collect()
    };
    let (mut everywhere, mut unknown_pops, mut popped) = (list("work"), 0, 0);
    for (k, c) in consumers.into_iter().enumerate() {
        let (answered, unknown) = c.join().unwrap();
        let got = list(&format!("got-{k}"));
        // What a consumer was told it took is in its list, in that order; what else is there
        // came from pops it never heard the end of.
        let mut rest = got.iter();
        for item in &answered {
            assert!(rest.any(|g| g == item), "consumer {k} took {item}, which is not in order in its list {got:?}");
        }
        assert!(got.len() - answered.len() <= unknown, "consumer {k} holds {got:?}, more than its {answered:?} and {unknown} unknown pops");
        (unknown_pops, popped) = (unknown_pops + unknown, popped + answered.len());
        everywhere.extend(got);
    }

    let mut seen = std::collections::HashSet::new();
    for item in &everywhere {
        assert!(seen.insert(*item), "{item} was taken twice");
        assert!(acknowledged.contains(item) || unknown_pushes.contains(item), "{item} was never pushed");
    }
    let lost: Vec<&usize> = acknowledged.iter().filter(|i| !seen.contains(i)).collect();
    assert!(lost.is_empty(), "acknowledged pushes {lost:?} are gone");
    eprintln!("{popped} popped, {unknown_pops} unknown pops, {} unknown pushes", unknown_pushes.len());
    cluster.wait_converged(&[0, 1, 2]);
    cluster.assert_same_dataset(&[0, 1, 2]);
}
