//! WAIT: the leader counts the other nodes whose log holds a client's writes, waiting up to the
//! timeout for as many as the client asks.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{free_port_pair, Cluster, Server};
use std::time::{Duration, Instant};

#[test]
fn wait_counts_the_followers_that_hold_the_clients_writes() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let mut raftis = RespConn::connect(cluster.nodes[leader].port).unwrap();
    let mut redis = RespConn::connect(plain.port).unwrap();
    // Arguments are read as Redis reads them.
    for bad in [&["WAIT", "x", "0"][..], &["WAIT", "1", "-1"], &["WAIT", "1", "1.5"], &["WAIT", "1"], &["WAIT", "1", "0", "2"]] {
        let expected = call(&mut redis, bad);
        assert!(expected.is_error(), "{bad:?}: {expected:?}");
        assert_eq!(call(&mut raftis, bad), expected, "{bad:?}");
    }

    // Both followers take a write at once: the wait ends without a timeout.
    call(&mut raftis, &["SET", "k", "v"]);
    assert_eq!(call(&mut raftis, &["WAIT", "2", "0"]).integer(), Some(2));
    // Asked for more nodes than there are, it answers the count at its timeout.
    let began = Instant::now();
    assert_eq!(call(&mut raftis, &["WAIT", "3", "100"]).integer(), Some(2));
    assert!(began.elapsed() >= Duration::from_millis(100));

    // A stopped follower does not get the next write: the other one is all the leader counts.
    cluster.nodes[follower].pause();
    call(&mut raftis, &["SET", "k", "w"]);
    let counted = call(&mut raftis, &["WAIT", "2", "2000"]);
    cluster.nodes[follower].resume();
    assert_eq!(counted.integer(), Some(1));
    assert_eq!(call(&mut raftis, &["WAIT", "2", "0"]).integer(), Some(2), "it caught up");
    // So does a transaction just before WAIT in the same pipeline, which the leader proposes
    // at the end of its event-loop turn.
    cluster.nodes[follower].pause();
    let pipeline = [args(&["MULTI"]), args(&["SET", "k", "m"]), args(&["EXEC"]), args(&["WAIT", "2", "2000"])];
    let replies = raftis.pipeline(&pipeline);
    cluster.nodes[follower].resume();
    let replies = replies.unwrap();
    assert_eq!(replies[3].integer(), Some(1), "WAIT counted a node without the transaction: {replies:?}");
    assert_eq!(call(&mut raftis, &["WAIT", "2", "0"]).integer(), Some(2), "it caught up");

    // Inside MULTI it answers at once, as in Redis.
    let replies = raftis.pipeline(&[args(&["MULTI"]), args(&["SET", "k", "x"]), args(&["WAIT", "5", "0"]), args(&["EXEC"])]).unwrap();
    let Reply::Aggregate(_, exec) = &replies[3] else { panic!("{replies:?}") };
    assert!(exec[1].integer().is_some_and(|n| (0..=2).contains(&n)), "{exec:?}");

    // A follower redirects it: it is about the leader's log.
    let mut on_follower = RespConn::connect(cluster.nodes[follower].port).unwrap();
    let moved = call(&mut on_follower, &["WAIT", "1", "0"]);
    assert!(moved.text().is_some_and(|t| t.starts_with("MOVED")), "{moved:?}");

    // With the proxy, the follower sends it to wait at the leader, behind its client's writes.
    call(&mut on_follower, &["RAFT.CONFIG", "SET", "follower-proxy", "yes"]);
    let replies = on_follower.pipeline(&[args(&["SET", "k", "y"]), args(&["WAIT", "2", "0"])]).unwrap();
    assert_eq!(replies[1].integer(), Some(2), "{replies:?}");
    let began = Instant::now();
    assert_eq!(call(&mut on_follower, &["WAIT", "3", "100"]).integer(), Some(2), "the count at its timeout");
    assert!(began.elapsed() >= Duration::from_millis(100));
    for bad in [&["WAIT", "x", "0"][..], &["WAIT", "1", "-1"]] {
        assert_eq!(call(&mut on_follower, bad), call(&mut redis, bad), "{bad:?}");
    }
    // Inside a transaction it goes with the transaction, and the leader answers it at once, with
    // the followers that hold what it proposed before (a clock entry may be on its way).
    let replies = on_follower
        .pipeline(&[args(&["MULTI"]), args(&["SET", "k", "t"]), args(&["WAIT", "2", "0"]), args(&["GET", "k"]), args(&["EXEC"])])
        .unwrap();
    let Reply::Aggregate(_, exec) = &replies[4] else { panic!("{replies:?}") };
    assert_eq!(exec.len(), 3, "{exec:?}");
    assert!(exec[1].integer().is_some_and(|n| (0..=2).contains(&n)), "{exec:?}");
    assert_eq!(exec[2].text().as_deref(), Some("t"), "{exec:?}");
    let replies = on_follower.pipeline(&[args(&["MULTI"]), args(&["WAIT", "1", "0"]), args(&["WAIT", "x", "0"]), args(&["EXEC"])]).unwrap();
    let Reply::Aggregate(_, exec) = &replies[3] else { panic!("{replies:?}") };
    assert!(exec[0].integer().is_some_and(|n| (0..=2).contains(&n)), "{exec:?}");
    assert!(exec[1].is_error(), "{exec:?}");
    assert_eq!(raftis_integration::stat_field(&cluster.nodes[follower], "blocked_forwarded_waiting"), 0);

    // CLIENT UNBLOCK ends a WAIT with a count, as in Redis: the leader's as it stands, and 0 from
    // a follower, which cannot tell.
    for (node, expected) in [(leader, 2), (follower, 0)] {
        let mut waiter = RespConn::connect(cluster.nodes[node].port).unwrap();
        let id = call(&mut waiter, &["CLIENT", "ID"]).integer().unwrap().to_string();
        if node == leader {
            // Both followers hold everything proposed so far: a commit needs only one of them.
            assert_eq!(call(&mut waiter, &["WAIT", "2", "0"]).integer(), Some(2));
        }
        waiter.send(&[args(&["WAIT", "3", "0"])]).unwrap();
        // Until the Raft loop names the index a WAIT is about, its count is 0.
        raftis_integration::wait_for("WAIT to count", Duration::from_secs(10), || {
            (raftis_integration::stat_field(&cluster.nodes[leader], "wait_clients_counting") == 1).then_some(())
        });
        let mut other = RespConn::connect(cluster.nodes[node].port).unwrap();
        raftis_integration::wait_for("WAIT to block", Duration::from_secs(10), || {
            (call(&mut other, &["CLIENT", "UNBLOCK", &id]).integer() == Some(1)).then_some(())
        });
        assert_eq!(waiter.reply().unwrap().integer(), Some(expected), "node {node}");
    }

    // A timeout longer than Redis' timers can hold waits (their period would wrap into the past
    // and answer at once, leaving the wait counted for good); unblocked, it leaves nothing behind.
    let mut waiter = RespConn::connect(cluster.nodes[leader].port).unwrap();
    let id = call(&mut waiter, &["CLIENT", "ID"]).integer().unwrap().to_string();
    waiter.send(&[args(&["WAIT", "3", "9223372036854775000"])]).unwrap();
    let mut other = RespConn::connect(cluster.nodes[leader].port).unwrap();
    raftis_integration::wait_for("the long WAIT to count", Duration::from_secs(10), || {
        (raftis_integration::stat_field(&cluster.nodes[leader], "wait_clients_counting") == 1).then_some(())
    });
    raftis_integration::wait_for("the long WAIT to be blocked", Duration::from_secs(10), || {
        (call(&mut other, &["CLIENT", "UNBLOCK", &id]).integer() == Some(1)).then_some(())
    });
    assert_eq!(waiter.reply().unwrap().integer(), Some(2));
    raftis_integration::wait_for("the WAIT to be forgotten", Duration::from_secs(10), || {
        (raftis_integration::stat_field(&cluster.nodes[leader], "wait_clients") == 0).then_some(())
    });
}
