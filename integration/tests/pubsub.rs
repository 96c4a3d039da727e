//! PUBLISH goes through the log, as Redis sends it to its replicas: the subscribers of every node
//! get each message, in the order it was published. A node that applies a message long after it
//! was published (replaying its log, catching up) does not deliver it.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{info_field, info_field_of_live, wait_for, Cluster};
use std::time::{Duration, Instant};

/// How old a message may be when a node applies it (the module's `OLD_NEWS`), and some margin.
const OLD_NEWS: Duration = Duration::from_secs(5);

fn message(channel: &str, text: &str) -> Reply {
    let bulk = |s: &str| Reply::Blob(b'$', s.as_bytes().to_vec());
    Reply::Aggregate(b'*', vec![bulk("message"), bulk(channel), bulk(text)])
}

#[test]
fn subscribers_on_every_node_get_what_is_published() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let mut subscribers: Vec<RespConn> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut conn = RespConn::connect(node.port).unwrap();
            conn.send(&[args(&["SUBSCRIBE", "news"])]).unwrap();
            let confirmed = conn.reply().unwrap();
            assert!(format!("{confirmed:?}").contains("subscribe"), "{confirmed:?}");
            conn
        })
        .collect();
    let mut on_leader = RespConn::connect(cluster.nodes[leader].port).unwrap();
    let mut on_follower = RespConn::connect(cluster.nodes[follower].port).unwrap();

    // The reply counts the leader's own subscribers, as Redis' counts the master's.
    assert_eq!(call(&mut on_leader, &["PUBLISH", "news", "m1"]).integer(), Some(1));
    // Through a follower (with the proxy), in the order published.
    let replies = on_follower.pipeline(&[args(&["PUBLISH", "news", "m2"]), args(&["PUBLISH", "news", "m3"])]).unwrap();
    assert_eq!(replies.iter().map(Reply::integer).collect::<Vec<_>>(), [Some(1), Some(1)]);
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        for text in ["m1", "m2", "m3"] {
            assert_eq!(subscriber.reply().unwrap(), message("news", text), "node {i}");
        }
    }

    // A follower stopped for longer than a message stays news gets it on resuming, too late to
    // deliver it; the next one it delivers.
    cluster.nodes[follower].pause();
    call(&mut on_leader, &["PUBLISH", "news", "while stopped"]);
    let published = Instant::now();
    while published.elapsed() <= OLD_NEWS + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.nodes[follower].resume();
    cluster.wait_converged(&[0, 1, 2]);
    call(&mut on_leader, &["PUBLISH", "news", "after"]);
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        if i != follower {
            assert_eq!(subscriber.reply().unwrap(), message("news", "while stopped"), "node {i}");
        }
        assert_eq!(subscriber.reply().unwrap(), message("news", "after"), "node {i}");
    }
}

/// `CLIENT TRACKING`: a client that read keys through the log (at consistency high every read
/// is `RAFT._READ`, which names its command's keys to Redis) is told when they change, as by
/// Redis itself.
#[test]
fn client_side_caching_hears_of_changes_to_keys_read_through_the_log() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let mut writer = RespConn::connect(cluster.nodes[leader].port).unwrap();
    call(&mut writer, &["MSET", "a", "1", "b", "1"]);
    let mut cache = RespConn::connect(cluster.nodes[leader].port).unwrap();
    call(&mut cache, &["HELLO", "3"]);
    assert_eq!(call(&mut cache, &["CLIENT", "TRACKING", "ON"]), Reply::Line(b'+', b"OK".to_vec()));
    assert_eq!(call(&mut cache, &["MGET", "a", "b"]).items().map(|items| items.len()), Some(2));
    call(&mut writer, &["SET", "b", "2"]);
    let invalidate = |key: &str| {
        let bulk = |s: &str| Reply::Blob(b'$', s.as_bytes().to_vec());
        Reply::Aggregate(b'>', vec![bulk("invalidate"), Reply::Aggregate(b'*', vec![bulk(key)])])
    };
    assert_eq!(cache.reply().unwrap(), invalidate("b"));
    call(&mut writer, &["DEL", "a"]);
    assert_eq!(cache.reply().unwrap(), invalidate("a"));
}

/// A tracking client's read that waits behind its own write in a pipeline (`SET k 1`, `GET k`)
/// is tracked as of when it ran, as in Redis. Redis remembers the keys when `RAFT._READ` returns
/// and forgets them when the write sends its invalidation; with the invalidations redirected to
/// another connection, the value read after that stayed cached for good: no invalidation came
/// for the next change.
#[test]
fn a_read_behind_its_own_pipelines_write_is_told_of_the_next_change() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let port = cluster.nodes[cluster.wait_leader()].port;
    let bulk = |s: &str| Reply::Blob(b'$', s.as_bytes().to_vec());
    let invalidated =
        |key: &str| Reply::Aggregate(b'*', vec![bulk("message"), bulk("__redis__:invalidate"), Reply::Aggregate(b'*', vec![bulk(key)])]);
    let mut invalidations = RespConn::connect(port).unwrap();
    let id = call(&mut invalidations, &["CLIENT", "ID"]).integer().unwrap().to_string();
    invalidations.send(&[args(&["SUBSCRIBE", "__redis__:invalidate"])]).unwrap();
    assert!(format!("{:?}", invalidations.reply().unwrap()).contains("subscribe"));
    invalidations.set_read_timeout(Duration::from_secs(5)).unwrap();
    let mut cache = RespConn::connect(port).unwrap();
    assert_eq!(call(&mut cache, &["CLIENT", "TRACKING", "ON", "REDIRECT", &id]).text().as_deref(), Some("OK"));
    let mut writer = RespConn::connect(port).unwrap();
    for level in ["high", "medium", "low"] {
        cluster.config_set("consistency", level);
        let key = format!("k-{level}");
        assert_eq!(call(&mut cache, &["GET", &key]), Reply::Null(b'$'));
        let replies = cache.pipeline(&[args(&["SET", &key, "1"]), args(&["GET", &key])]).unwrap();
        assert_eq!(replies, vec![Reply::Line(b'+', b"OK".to_vec()), bulk("1")], "consistency {level}");
        assert_eq!(invalidations.reply().unwrap(), invalidated(&key), "consistency {level}: the pipeline's own change");
        call(&mut writer, &["SET", &key, "2"]);
        let next = invalidations.reply();
        assert_eq!(next.as_ref().ok(), Some(&invalidated(&key)), "consistency {level}: the next change: {next:?}");
    }
}

/// A read that waits before it runs (on a leader with threaded I/O, where replies cannot be held,
/// every read at consistency high waits for its ReadIndex round) is tracked as of when it ran.
/// Redis remembers the keys when `RAFT._READ` returns; a change applied while the read waits
/// sends the invalidation and makes Redis forget them, and the value read after that change
/// stayed cached for good: no invalidation came for the next change.
#[test]
fn a_read_that_waited_behind_a_change_is_told_of_the_next_one() {
    let cluster = Cluster::start(3, &["--io-threads", "2"]).unwrap();
    // Followers are paused below for longer than an election timeout.
    cluster.config_set("election-ticks", "100");
    // A leader given new ticks hands leadership over first: the leader below is the one that
    // stays, once every node runs on them.
    for n in &cluster.nodes {
        wait_for("the new ticks", Duration::from_secs(20), || (info_field(n, "election_ticks") == 100).then_some(()));
    }
    let leader = cluster.wait_leader();
    let node = &cluster.nodes[leader];
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut writer = RespConn::connect(node.port).unwrap();
    let mut sleeper = RespConn::connect(node.port).unwrap();
    let bulk = |s: &str| Reply::Blob(b'$', s.as_bytes().to_vec());
    let invalidate = |key: &str| Reply::Aggregate(b'>', vec![bulk("invalidate"), Reply::Aggregate(b'*', vec![bulk(key)])]);

    // The change is proposed but cannot commit; Redis' main thread then sleeps, the read arrives,
    // and the change commits: when Redis wakes, the read usually comes first (its socket was
    // ready first) and the change is applied while the read waits for its round. Not always: a
    // module event that came with the DEBUG SLEEP runs right after it and applies the change
    // before the read, or on a slow machine the change commits only after Redis woke. Then the
    // scenario is tried again on another key, with a new client (nothing left from the last).
    let mut attempt = |key: &str| -> Option<RespConn> {
        let mut cache = RespConn::connect(node.port).unwrap();
        call(&mut cache, &["HELLO", "3"]);
        assert_eq!(call(&mut cache, &["CLIENT", "TRACKING", "ON"]).text().as_deref(), Some("OK"));
        cache.set_read_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(call(&mut writer, &["SET", key, "1"]).text().as_deref(), Some("OK"));
        for f in &followers {
            cluster.nodes[*f].pause();
        }
        let last = info_field_of_live(node, "last_log_index");
        writer.send(&[args(&["SET", key, "2"])]).unwrap();
        wait_for("the change to be proposed", Duration::from_secs(10), || (info_field(node, "last_log_index") > last).then_some(()));
        let change = info_field_of_live(node, "last_log_index");
        sleeper.send(&[args(&["DEBUG", "SLEEP", "2"])]).unwrap();
        wait_for("Redis to sleep", Duration::from_secs(10), || node.main_thread_sleeps().then_some(()));
        cache.send(&[args(&["GET", key])]).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // the read's bytes reach the socket first
        for f in &followers {
            cluster.nodes[*f].resume();
        }
        wait_for("the change to commit", Duration::from_secs(10), || {
            followers.iter().any(|f| info_field(&cluster.nodes[*f], "commit_index") >= change).then_some(())
        });
        let in_time = node.main_thread_sleeps();
        assert_eq!(sleeper.reply().unwrap().text().as_deref(), Some("OK"));
        assert_eq!(writer.reply().unwrap().text().as_deref(), Some("OK"));
        if !in_time {
            eprintln!("{key}: the change committed after Redis woke; trying again");
            return None;
        }
        let first = cache.reply().unwrap();
        if first == bulk("2") {
            eprintln!("{key}: the change was applied before the read came; trying again");
            return None;
        }
        assert_eq!(first, invalidate(key), "the change was applied while the read waited");
        assert_eq!(cache.reply().unwrap(), bulk("2"));
        Some(cache)
    };
    let (key, mut cache) = (0..10)
        .map(|i| format!("k{i}"))
        .find_map(|key| attempt(&key).map(|cache| (key, cache)))
        .expect("in ten tries, the read never waited behind the change");
    assert_eq!(call(&mut writer, &["SET", &key, "3"]).text().as_deref(), Some("OK"));
    assert_eq!(cache.reply().unwrap(), invalidate(&key), "the next change is told");
}
