//! PUBLISH goes through the log, as Redis sends it to its replicas: the subscribers of every node
//! get each message, in the order it was published. A node that applies a message long after it
//! was published (replaying its log, catching up) does not deliver it.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::Cluster;
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
