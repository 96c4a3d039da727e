//! SPOP: replies as Redis gives them, and the same members popped on every node, also when the
//! members the leader drew are gone by the time the pop applies, and on a node that applies the
//! entries again after a restart.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{free_port_pair, Cluster, Server};
use std::collections::BTreeSet;

fn members(n: usize) -> BTreeSet<Vec<u8>> {
    (0..n).map(|i| format!("m{i}").into_bytes()).collect()
}

fn fill(conn: &mut RespConn, key: &str, n: usize) {
    let mut sadd = vec!["SADD".to_string(), key.to_string()];
    sadd.extend((0..n).map(|i| format!("m{i}")));
    let sadd: Vec<&str> = sadd.iter().map(String::as_str).collect();
    assert_eq!(call(conn, &sadd).integer(), Some(n as i64));
}

/// The members a pop's reply names, checked to be new: none popped twice.
fn popped(reply: &Reply, taken: &mut BTreeSet<Vec<u8>>) -> usize {
    let names: Vec<&[u8]> = match reply {
        Reply::Blob(b'$', member) => vec![member.as_slice()],
        Reply::Aggregate(_, items) => items.iter().map(|i| i.bytes().expect("a member")).collect(),
        other => panic!("not a pop's reply: {other:?}"),
    };
    for name in &names {
        assert!(taken.insert(name.to_vec()), "{} popped twice", String::from_utf8_lossy(name));
    }
    names.len()
}

#[test]
fn spop_answers_as_redis_does_through_the_leader_and_a_follower() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    for protocol in ["2", "3"] {
        let mut redis = RespConn::connect(plain.port).unwrap();
        let mut nodes = [RespConn::connect(cluster.nodes[leader].port).unwrap(), RespConn::connect(cluster.nodes[follower].port).unwrap()];
        call(&mut redis, &["HELLO", protocol]);
        nodes.iter_mut().for_each(|n| drop(call(n, &["HELLO", protocol])));
        for (i, node) in nodes.iter_mut().enumerate() {
            let (s, str_key) = (format!("s{protocol}{i}"), format!("str{protocol}{i}"));
            for conn in [&mut redis, &mut *node] {
                fill(conn, &s, 20);
                call(conn, &["SET", &str_key, "x"]);
            }
            // Nothing left to chance: Redis' own replies, byte for byte.
            let (s, str_key) = (s.as_str(), str_key.as_str());
            for fixed in [
                &["SPOP", "nokey"][..],
                &["SPOP", "nokey", "2"],
                &["SPOP", s, "0"],
                &["SPOP", s, "-1"],
                &["SPOP", s, "05"],
                &["SPOP", s, "+1"],
                &["SPOP", s, "1", "2"],
                &["SPOP", s, "HINT"],
                &["SPOP", s, "HINT", "m1"],
                &["SPOP", str_key],
                &["SPOP", str_key, "0"],
                &["SPOP", str_key, "-1"],
                &["SPOP"],
            ] {
                assert_eq!(call(node, fixed), call(&mut redis, fixed), "protocol {protocol}, node {i}: {fixed:?}");
            }
            // Chosen members: the same kind of reply, distinct members, and the set runs out
            // exactly as Redis' does.
            let mut taken = BTreeSet::new();
            for (pop, count) in [(&["SPOP", s][..], 1), (&["SPOP", s, "3"], 3), (&["SPOP", s, "15"], 15), (&["SPOP", s, "5"], 1)] {
                let (ours, redis_reply) = (call(node, pop), call(&mut redis, pop));
                assert_eq!(std::mem::discriminant(&ours), std::mem::discriminant(&redis_reply), "{pop:?}: {ours:?} / {redis_reply:?}");
                if let (Reply::Aggregate(kind, _), Reply::Aggregate(redis_kind, _)) = (&ours, &redis_reply) {
                    assert_eq!(kind, redis_kind, "{pop:?}");
                }
                assert_eq!(popped(&ours, &mut taken), count, "{pop:?}: {ours:?}");
            }
            assert_eq!(taken, members(20));
            assert_eq!(call(node, &["EXISTS", s]).integer(), Some(0));
            // Inside a transaction too.
            fill(node, s, 4);
            let replies = node
                .pipeline(&[args(&["MULTI"]), args(&["SPOP", s, "2"]), args(&["SPOP", s]), args(&["SCARD", s]), args(&["EXEC"])])
                .unwrap();
            let Some([two, one, left]) = replies[4].items() else { panic!("{replies:?}") };
            let mut taken = BTreeSet::new();
            assert_eq!((popped(two, &mut taken), popped(one, &mut taken), left.integer()), (2, 1, Some(1)), "{replies:?}");
        }
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

#[test]
fn every_node_pops_the_same_members_also_when_it_applies_them_again() {
    let mut cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (leader + 1) % 3;
    let mut conn = RespConn::connect(cluster.nodes[leader].port).unwrap();
    let mut through_follower = RespConn::connect(cluster.nodes[follower].port).unwrap();
    for key in ["a", "b", "big"] {
        fill(&mut conn, key, if key == "big" { 300 } else { 100 });
    }
    // Two equal sets, one pop each: the pops choose independently.
    let picks: Vec<BTreeSet<Vec<u8>>> = ["a", "b"]
        .iter()
        .map(|key| {
            let mut taken = BTreeSet::new();
            popped(&call(&mut conn, &["SPOP", key, "5"]), &mut taken);
            taken
        })
        .collect();
    assert_ne!(picks[0], picks[1], "two pops of equal sets chose the same 5 of 100 members");

    // A stopped follower applies the pops later, from its log, and must choose as the others did.
    let restarted = (leader + 2) % 3;
    cluster.nodes[restarted].kill9();
    let mut taken = BTreeSet::new();
    for round in 0..40 {
        let count = (round % 4).to_string();
        let pop: &[&str] = if round % 4 == 0 { &["SPOP", "big"][..] } else { &["SPOP", "big", &count][..] };
        let via = if round % 2 == 0 { &mut conn } else { &mut through_follower };
        popped(&call(via, pop), &mut taken);
    }
    // Members the leader draws for a pop may be gone by the time it applies: a removal just
    // before it in the pipeline is still on its way when the pop is proposed. The pop then
    // chooses among what is left, the same on every node.
    fill(&mut conn, "c", 100);
    let mut srem = vec!["SREM".to_string(), "c".to_string()];
    srem.extend((0..95).map(|i| format!("m{i}")));
    let replies = conn.pipeline(&[srem.iter().map(|a| a.as_bytes().to_vec()).collect(), args(&["SPOP", "c", "3"])]).unwrap();
    assert_eq!(replies[0].integer(), Some(95));
    let mut from_the_rest = BTreeSet::new();
    assert_eq!(popped(&replies[1], &mut from_the_rest), 3);
    let rest: BTreeSet<Vec<u8>> = (95..100).map(|i| format!("m{i}").into_bytes()).collect();
    assert!(from_the_rest.is_subset(&rest), "popped {from_the_rest:?}, which the pipeline had removed");
    assert_eq!(call(&mut conn, &["SCARD", "c"]).integer(), Some(2));

    cluster.nodes[restarted].restart().unwrap();
    let left = call(&mut conn, &["SCARD", "big"]).integer().unwrap();
    assert_eq!(left as usize + taken.len(), 300);
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// `SORT ... BY pattern ALPHA`: elements whose BY keys are missing or equal tie, and Redis keeps
/// them in the order it found them, for a set or a sorted set its hash table's, which differs
/// from node to node. Stored, such a sort is refused on every node alike; a list, a numeric sort
/// and a sort without BY are stored as Redis stores them. Inside a script it is refused whatever
/// the key, since its reply could feed a write.
#[test]
fn a_sort_whose_ties_follow_a_hash_table_is_not_stored() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.wait_leader();
    let mut conn = RespConn::connect(cluster.nodes[leader].port).unwrap();
    fill(&mut conn, "s", 50);
    call(&mut conn, &["ZADD", "z", "1", "a", "1", "b", "1", "c"]);
    call(&mut conn, &["RPUSH", "l", "c", "a", "b"]);
    for key in ["s", "z"] {
        let refused = call(&mut conn, &["SORT", key, "BY", "nosuchkey_*", "ALPHA", "STORE", "out"]);
        assert!(refused.is_error() && refused.text().unwrap().contains("Raftis refuses it"), "{key}: {refused:?}");
    }
    assert_eq!(call(&mut conn, &["EXISTS", "out"]).integer(), Some(0));
    assert_eq!(call(&mut conn, &["SORT", "l", "BY", "nosuchkey_*", "ALPHA", "STORE", "from-list"]).integer(), Some(3));
    assert_eq!(call(&mut conn, &["SORT", "s", "BY", "nosuchkey_*", "STORE", "numeric"]).integer(), Some(50));
    assert_eq!(call(&mut conn, &["SORT", "s", "ALPHA", "STORE", "alpha"]).integer(), Some(50));
    let script = "return redis.call('SORT', KEYS[1], 'BY', 'w_*', 'ALPHA')";
    let in_script = call(&mut conn, &["EVAL", script, "1", "l"]);
    assert!(in_script.is_error() && in_script.text().unwrap().contains("refuses it in scripts"), "{in_script:?}");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// `SORT ... ALPHA` compares by the process's collation, which Redis takes from its environment:
/// nodes started in different locales stored `SORT ... ALPHA STORE` in different orders. A node
/// compares bytes whatever its locale. (Skipped where `localedef` cannot make en_US.UTF-8.)
#[test]
fn sort_alpha_compares_bytes_whatever_the_locale() {
    let root = tempfile::tempdir().unwrap();
    let locales = root.path().join("locales");
    std::fs::create_dir_all(&locales).unwrap();
    let made = std::process::Command::new("localedef")
        .args(["-i", "en_US", "-f", "UTF-8"])
        .arg(locales.join("en_US.UTF-8"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !locales.join("en_US.UTF-8").join("LC_COLLATE").exists() {
        eprintln!("skipped: localedef could not make the en_US.UTF-8 locale ({made:?})");
        return;
    }
    let locpath = locales.display().to_string();
    let env = [("LOCPATH", locpath.as_str()), ("LC_ALL", "en_US.UTF-8")];
    let node = Server::start_with_env(free_port_pair(), &root.path().join("node"), &env, &[]).unwrap();
    let _: () = node.cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    raftis_integration::wait_for("a leader", std::time::Duration::from_secs(10), || (node.state() == "leader").then_some(()));
    let mut conn = RespConn::connect(node.port).unwrap();
    assert_eq!(call(&mut conn, &["RPUSH", "l", "b", "_", "a", "B", "A"]).integer(), Some(5));
    let bytewise = ["A", "B", "_", "a", "b"].map(|s| Reply::Blob(b'$', s.into()));
    assert_eq!(call(&mut conn, &["SORT", "l", "ALPHA"]).items(), Some(&bytewise[..]));
    assert_eq!(call(&mut conn, &["SORT", "l", "ALPHA", "STORE", "sorted"]).integer(), Some(5));
    assert_eq!(call(&mut conn, &["LRANGE", "sorted", "0", "-1"]).items(), Some(&bytewise[..]));
    assert!(node.log().contains("LC_COLLATE was 'en_US.UTF-8'"), "the node ran in the locale:\n{}", node.log_tail());
}
