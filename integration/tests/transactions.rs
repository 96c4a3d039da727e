//! MULTI/EXEC end to end: a transaction is one log entry, applied back to back on every node.

use raftis_integration::resp_conn::{args, call, Reply, RespConn};
use raftis_integration::{client_proposals, exchange_until, free_port_pair, raw_exchange, stat_field, wait_for, Cluster, Server};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Redis' own replies to a transaction: `+QUEUED` while queueing, EXEC's array in command order,
/// SELECT inside it, an error inside it that does not stop the rest, DISCARD, queueing errors
/// that abort it (an unknown command, a wrong number of arguments); then UNWATCH. In database `db` (and `db + 1`).
fn transaction_pipeline(db: u32) -> (String, String) {
    let other = db + 1;
    let request = format!(
        "SELECT {db}\r\nSET k old\r\n\
         MULTI\r\nGET k\r\nSET k v\r\nGET k\r\nINCR n\r\nPING\r\nSELECT {other}\r\nSET k other\r\nSELECT {db}\r\nLPUSH k x\r\nEXEC\r\n\
         GET k\r\nMULTI\r\nSET k discarded\r\nDISCARD\r\nMULTI\r\nSET k aborted\r\nNOSUCHCOMMAND\r\nEXEC\r\n\
         MULTI\r\nSET k aborted\r\nSET onlykey\r\nEXEC\r\nGET k\r\nUNWATCH\r\n"
    );
    let expected = [
        "+OK\r\n+OK\r\n",
        "+OK\r\n",
        &"+QUEUED\r\n".repeat(9),
        "*9\r\n$3\r\nold\r\n+OK\r\n$1\r\nv\r\n:1\r\n+PONG\r\n+OK\r\n+OK\r\n+OK\r\n",
        "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        "$1\r\nv\r\n",
        "+OK\r\n+QUEUED\r\n+OK\r\n",
        "+OK\r\n+QUEUED\r\n-ERR unknown command 'NOSUCHCOMMAND', with args beginning with: \r\n",
        "-EXECABORT Transaction discarded because of previous errors.\r\n",
        "+OK\r\n+QUEUED\r\n-ERR wrong number of arguments for 'set' command\r\n",
        "-EXECABORT Transaction discarded because of previous errors.\r\n",
        "$1\r\nv\r\n",
        "+OK\r\n",
    ]
    .concat();
    (request, expected)
}

/// Sends [`transaction_pipeline`] to `via`: Redis' replies byte for byte, and `entries` proposals
/// on the leader, two either way: SET k old, then the whole transaction (a follower sends the
/// commands before MULTI on their own, so that a transaction discarded at EXEC takes nothing
/// else with it).
fn assert_transaction_pipeline(leader: &Server, via: &Server, db: u32, level: &str, entries: i64) {
    let (request, expected) = transaction_pipeline(db);
    let proposals = client_proposals(leader);
    let got = raw_exchange(via.port, request.as_bytes(), expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected, "consistency {level}");
    assert_eq!(client_proposals(leader) - proposals, entries, "consistency {level}: a transaction is one entry");
}

#[test]
fn a_transaction_answers_like_redis_and_is_one_entry_on_every_node_at_every_consistency_level() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader = cluster.leader();
    for (db, level) in [(2, "high"), (4, "medium"), (6, "low")] {
        cluster.config_set("consistency", level);
        assert_transaction_pipeline(leader, leader, db, level, 2);
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    let follower = cluster.nodes.iter().find(|n| n.port != leader.port).unwrap();
    // Consistency is still low from the last round: the follower answers from its own dataset.
    let mut conn = follower.client().unwrap();
    let _: () = redis::cmd("SELECT").arg(7).query(&mut conn).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut conn).unwrap();
    assert_eq!(v, "other", "SELECT inside EXEC chose the database of the commands after it");

    // Transactions run on the leader: a follower redirects MULTI, so nothing gets queued there.
    let err = follower.cmd::<String>(&["MULTI"]).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");
}

/// With the follower proxy, a follower forwards a transaction whole: the client sees exactly what
/// the leader would have answered, and the transaction is still one entry.
#[test]
fn a_follower_with_the_proxy_forwards_a_transaction_whole() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.leader();
    let follower = cluster.nodes.iter().find(|n| n.port != leader.port).unwrap();
    // At low a follower's reads run on its own dataset, which may lag the replies it relays.
    for (db, level) in [(2, "high"), (4, "medium")] {
        cluster.config_set("consistency", level);
        assert_transaction_pipeline(leader, follower, db, level, 2);
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
    assert_atomic_against_concurrent_writers(&cluster, follower);

    // A MULTI splits a pipeline in two batches for the leader: the transaction still sees the
    // writes sent before it (its batch waits for their replies).
    cluster.config_set("consistency", "high");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", follower.port)).unwrap();
    for i in 0..50 {
        let request = format!("SET before{i} v{i}\r\nMULTI\r\nGET before{i}\r\nEXEC\r\nSET n{i} 1\r\nMULTI\r\nINCR n{i}\r\nEXEC\r\n");
        let value = format!("v{i}");
        let expected = format!("+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n${}\r\n{value}\r\n+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n:2\r\n", value.len());
        assert_eq!(exchange_until(&mut conn, request.as_bytes(), b":2\r\n"), expected, "round {i}");
    }
}

/// A follower whose clock runs ahead of the leader's forwards a transaction with its times as the
/// client gave them: the leader makes them absolute by its own clock, the one the entry applies
/// by. (Pinned by the follower's, `EXPIRE k 0` would leave `k` there for the skew, and every TTL
/// set would be longer by it.)
#[test]
fn a_follower_ahead_of_the_leaders_clock_forwards_a_transactions_times_as_sent() {
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let dir = |i: usize| root.path().join(format!("n{i}"));
    let proxy = ["follower-proxy=yes"];
    let nodes = vec![
        Server::start(free_port_pair(), &dir(0), &proxy).unwrap(),
        Server::start_with_clock_skew(free_port_pair(), &dir(1), 5000, &proxy).unwrap(),
    ];
    let cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    let (leader, follower) = (&cluster.nodes[0], &cluster.nodes[1]);
    let time = |node: &Server| node.cmd::<Vec<i64>>(&["TIME"]).unwrap()[0];
    assert!(time(follower) >= time(leader) + 4, "the follower's clock is not ahead");
    let mut conn = RespConn::connect(follower.port).unwrap();
    let commands =
        [&["MULTI"][..], &["SET", "k", "1"], &["EXPIRE", "k", "0"], &["EXISTS", "k"], &["SET", "t", "1", "PX", "10000"], &["EXEC"]];
    let replies = conn.pipeline(&commands.map(args)).unwrap();
    assert_eq!(format!("{:?}", replies[5]), r#"*[+"OK", :"1", :"0", +"OK"]"#);
    let ttl: i64 = leader.cmd(&["PTTL", "t"]).unwrap();
    assert!((0..=10_000).contains(&ttl), "PTTL {ttl} after PX 10000");
}

/// Clients INCR a counter while another reads and resets it in transactions (the way clients
/// send them: `redis::pipe().atomic()`). A GET that ran on the dataset while increments were
/// still on their way through the log, with its SET applied after them, would lose them.
#[test]
fn a_transaction_is_atomic_against_concurrent_writers() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    assert_atomic_against_concurrent_writers(&cluster, cluster.leader());
}

/// The check above, with the transactions sent to `via`.
fn assert_atomic_against_concurrent_writers(cluster: &Cluster, via: &Server) {
    let leader = cluster.leader();
    let writers = 3;
    let per_writer = 1500;
    let done = Arc::new(AtomicBool::new(false));
    let incrementers: Vec<_> = (0..writers)
        .map(|_| {
            let mut conn = leader.client().unwrap();
            std::thread::spawn(move || {
                for _ in 0..per_writer {
                    let _: i64 = redis::cmd("INCR").arg("counter").query(&mut conn).unwrap();
                }
            })
        })
        .collect();
    let reset = {
        let mut conn = via.client().unwrap();
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut taken, mut rounds) = (0i64, 0);
            while !done.load(Ordering::Acquire) {
                let (v,): (Option<i64>,) =
                    redis::pipe().atomic().cmd("GET").arg("counter").cmd("SET").arg("counter").arg(0).ignore().query(&mut conn).unwrap();
                taken += v.unwrap_or(0);
                rounds += 1;
            }
            (taken, rounds)
        })
    };
    for t in incrementers {
        t.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let (taken, rounds) = reset.join().unwrap();
    let left: i64 = leader.cmd(&["GET", "counter"]).unwrap();
    assert!(rounds > 10, "the transactions ran while the writers did ({rounds} rounds)");
    assert_eq!(taken + left, (writers * per_writer) as i64, "every increment was either taken by a transaction or is left");
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// With threaded I/O, replies cannot be held, so EXEC cannot run a transaction. MULTI still opens
/// it: refused, it would have let the commands after it run one by one. They fail together.
#[test]
fn without_held_replies_a_transaction_fails_whole_and_changes_nothing() {
    // Arguments after the module's own start a Redis directive of their own.
    let cluster = Cluster::start(1, &["--io-threads", "2"]).unwrap();
    let unavailable = "-ERR transactions (MULTI/EXEC) need held replies, not available here: io-threads is 2\r\n";
    let request = "MULTI\r\nSET k 1\r\nGET k\r\nPING\r\nEXEC\r\nGET k\r\n";
    let expected = ["+OK\r\n", &"+QUEUED\r\n".repeat(3), "*3\r\n", unavailable, unavailable, "+PONG\r\n", "$-1\r\n"].concat();
    let got = raw_exchange(cluster.leader().port, request.as_bytes(), expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

/// WATCH as in Redis: a write to a watched key between WATCH and EXEC makes EXEC answer nil and
/// run nothing; otherwise the transaction runs. Followers redirect WATCH.
#[test]
fn watch_aborts_a_transaction_whose_watched_key_was_written_and_lets_the_others_run() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.leader();
    let _: () = leader.cmd(&["SET", "k", "1"]).unwrap();
    let mut watcher = std::net::TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    let exchange = |s: &mut std::net::TcpStream, request: &str, expected: &str| {
        let got = raftis_integration::exchange_on(s, request.as_bytes(), expected.len());
        assert_eq!(String::from_utf8_lossy(&got), expected, "after {request:?}");
    };
    exchange(&mut watcher, "WATCH k other\r\nGET k\r\n", "+OK\r\n$1\r\n1\r\n");
    let _: () = leader.cmd(&["SET", "k", "2"]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 3\r\nEXEC\r\nGET k\r\n", "+OK\r\n+QUEUED\r\n*-1\r\n$1\r\n2\r\n");
    // EXEC unwatched everything: the next transaction runs.
    exchange(&mut watcher, "WATCH k\r\nMULTI\r\nSET k 4\r\nEXEC\r\n", "+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    exchange(&mut watcher, "MULTI\r\nWATCH k\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n-ERR WATCH inside MULTI is not allowed\r\n");
    // A write to another database's `k` does not touch this one.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let mut other_db = leader.client().unwrap();
    let _: () = redis::cmd("SELECT").arg(1).query(&mut other_db).unwrap();
    let _: () = redis::cmd("SET").arg("k").arg("x").query(&mut other_db).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 5\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // Nor does another client's transaction that reads `k` (it goes through the log too).
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let mut reader = std::net::TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
    exchange(&mut reader, "MULTI\r\nGET k\r\nSORT k_list BY w_*\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$1\r\n5\r\n*0\r\n");
    exchange(&mut watcher, "MULTI\r\nSET k 5\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // The client's own write counts too, as in Redis, though it is still on its way through the
    // log when EXEC runs (it is proposed in the same event-loop turn); so does a flush.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    exchange(&mut watcher, "SET k 6\r\nMULTI\r\nSET k 7\r\nEXEC\r\nGET k\r\n", "+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n$1\r\n6\r\n");
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    exchange(&mut watcher, "FLUSHALL\r\nMULTI\r\nSET k 8\r\nEXEC\r\nGET k\r\n", "+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n$-1\r\n");
    // A flush or swap of other databases touches no key of this one, as in Redis.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let _: () = redis::cmd("FLUSHDB").query(&mut other_db).unwrap();
    let _: () = leader.cmd(&["SWAPDB", "1", "2"]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 8\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let _: () = leader.cmd(&["SWAPDB", "0", "2"]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 8\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*-1\r\n");
    let _: () = leader.cmd(&["SWAPDB", "0", "2"]).unwrap();
    // Writes that change no key (a message, the script cache) touch nothing watched, as in Redis.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let _: i64 = leader.cmd(&["PUBLISH", "news", "m"]).unwrap();
    let _: String = leader.cmd(&["SCRIPT", "LOAD", "return 1"]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 9\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // Nor do the reads that go through the log: a read-only script, and PFCOUNT of a key whose
    // count is cached (one whose count it refreshes is changed, in Redis too).
    let _: i64 = leader.cmd(&["PFADD", "hll", "a"]).unwrap();
    let _: i64 = leader.cmd(&["PFCOUNT", "hll"]).unwrap();
    exchange(&mut watcher, "WATCH k hll\r\n", "+OK\r\n");
    let got: String = leader.cmd(&["EVAL_RO", "return redis.call('GET', KEYS[1])", "1", "k"]).unwrap();
    assert_eq!(got, "9");
    assert_eq!(leader.cmd::<i64>(&["PFCOUNT", "hll"]).unwrap(), 1);
    exchange(&mut watcher, "MULTI\r\nSET k 10\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // Nor does a script whose first line says it writes nothing, keys declared or not.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let no_writes = "#!lua flags=no-writes\nreturn redis.call('GET', KEYS[1])";
    assert_eq!(leader.cmd::<String>(&["EVAL", no_writes, "1", "k"]).unwrap(), "10");
    assert_eq!(leader.cmd::<i64>(&["EVAL", "#!lua flags=no-writes\nreturn 1", "0"]).unwrap(), 1);
    exchange(&mut watcher, "MULTI\r\nSET k 10\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // A script that declares no keys and may write counts for every watched key, as a FLUSHALL:
    // what it writes is known only once it runs, and a transaction whose EXEC came in between
    // would commit behind it.
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    assert_eq!(leader.cmd::<i64>(&["EVAL", "return 1", "0"]).unwrap(), 1);
    exchange(&mut watcher, "MULTI\r\nSET k 11\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*-1\r\n");
    // A client's own write sent before its WATCH comes before it, as in Redis, however late the
    // log applies it.
    exchange(&mut watcher, "SET k 11\r\nWATCH k\r\nMULTI\r\nSET k 12\r\nEXEC\r\n", "+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    // Once its transactions are over the leader forgets the watcher's keys, and after UNWATCH;
    // after RESET alone it cannot tell, and remembers them until the client is gone.
    let watching = || stat_field(leader, "watching_clients");
    wait_for("the leader to forget a watch that EXEC ended", Duration::from_secs(5), || (watching() == 0).then_some(()));
    exchange(&mut watcher, "WATCH k\r\nUNWATCH\r\n", "+OK\r\n+OK\r\n");
    wait_for("the leader to forget a watch that UNWATCH ended", Duration::from_secs(5), || (watching() == 0).then_some(()));
    // UNWATCH is still Redis' own: a write after it fails nothing, and inside MULTI it is queued.
    let _: () = leader.cmd(&["SET", "k", "13"]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k 14\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    exchange(
        &mut watcher,
        "WATCH k\r\nMULTI\r\nUNWATCH\r\nSET k 15\r\nEXEC\r\n",
        "+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n",
    );
    exchange(&mut watcher, "WATCH k\r\nRESET\r\n", "+OK\r\n+RESET\r\n");
    assert_eq!(watching(), 1);
    drop(watcher);
    wait_for("the leader to forget a client that has gone", Duration::from_secs(5), || (watching() == 0).then_some(()));
    let follower = cluster.nodes.iter().find(|n| n.port != leader.port).unwrap();
    let err = follower.cmd::<String>(&["WATCH", "k"]).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");
}

/// A key that has expired but is still there when it is watched: Redis notes that, and ignores
/// a signal for the key while it is there; in Redis a write to it deletes it first, and so still
/// fails the EXEC. Here the write is only proposed when EXEC is checked (the followers are stopped
/// meanwhile), and the key is deleted only when the write is applied. A lease lock taken with
/// WATCH, MULTI, SET and EXEC must not be taken by two clients.
#[test]
fn a_write_proposed_after_watch_of_an_expired_key_fails_the_exec() {
    // hz 1: the leader's background expiry, which would delete the expired lock before the
    // WATCH (the case Redis does not ignore), runs once a second.
    let root = tempfile::Builder::new().prefix("raftis-it-").tempdir().unwrap();
    let start =
        |i: usize| Server::start_with_redis_args(free_port_pair(), &root.path().join(format!("n{i}")), &["--hz", "1"], &[]).unwrap();
    let nodes = (0..3).map(start).collect();
    let cluster = Cluster::of(nodes, root);
    let _: () = cluster.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"]).unwrap();
    assert_eq!(cluster.wait_leader(), 0);
    cluster.join(1, 0).unwrap();
    cluster.join(2, 0).unwrap();
    let leader = &cluster.nodes[0];
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let deadline = now() + Duration::from_millis(100);
    let _: () = leader.cmd(&["SET", "lock", "old", "PXAT", &deadline.as_millis().to_string()]).unwrap();
    wait_for("the lock to expire", Duration::from_secs(5), || (now() > deadline + Duration::from_millis(2)).then_some(()));
    let mut watcher = RespConn::connect(leader.port).unwrap();
    let watcher_id = call(&mut watcher, &["CLIENT", "ID"]).integer().unwrap();
    assert_eq!(call(&mut watcher, &["WATCH", "lock"]).text().as_deref(), Some("OK"));
    // Another client takes the lock: its write is proposed, and cannot commit.
    for follower in &cluster.nodes[1..] {
        follower.pause();
    }
    let mut taker = RespConn::connect(leader.port).unwrap();
    let taker_id = call(&mut taker, &["CLIENT", "ID"]).integer().unwrap();
    taker.send(&[args(&["SET", "lock", "theirs", "PX", "60000"])]).unwrap();
    let client_info = |id: i64| leader.cmd::<String>(&["CLIENT", "LIST", "ID", &id.to_string()]).unwrap();
    // (Its reply is held for it, the client is not blocked.)
    wait_for("the taker's write to be proposed", Duration::from_secs(5), || client_info(taker_id).contains("cmd=raft._cmd").then_some(()));
    watcher.send(&[args(&["MULTI"]), args(&["SET", "lock", "mine", "PX", "60000"]), args(&["EXEC"])]).unwrap();
    wait_for("the watcher's EXEC to run", Duration::from_secs(5), || client_info(watcher_id).contains("cmd=exec").then_some(()));
    for follower in &cluster.nodes[1..] {
        follower.resume();
    }
    assert_eq!(watcher.reply().unwrap().text().as_deref(), Some("OK"));
    assert_eq!(watcher.reply().unwrap().text().as_deref(), Some("QUEUED"));
    assert_eq!(watcher.reply().unwrap(), Reply::Null(b'*'), "the EXEC after another client took the lock");
    assert_eq!(taker.reply().unwrap().text().as_deref(), Some("OK"));
    assert_eq!(leader.cmd::<String>(&["GET", "lock"]).unwrap(), "theirs");
    // Nobody else writes an expired key watched: the EXEC runs, as in Redis, whether or not the
    // key has been deleted meanwhile.
    let deadline = now() + Duration::from_millis(50);
    let _: () = leader.cmd(&["SET", "lease", "old", "PXAT", &deadline.as_millis().to_string()]).unwrap();
    wait_for("the lease to expire", Duration::from_secs(5), || (now() > deadline + Duration::from_millis(2)).then_some(()));
    let replies =
        watcher.pipeline(&[args(&["WATCH", "lease"]), args(&["MULTI"]), args(&["SET", "lease", "mine"]), args(&["EXEC"])]).unwrap();
    assert_eq!(format!("{:?}", replies[3]), r#"*[+"OK"]"#);
}

/// `MOVE` and `COPY ... DB` write a key of another database, which Redis' key positions do not
/// name: a client watching that key there learns of the write when it is proposed, as of any
/// other, not only once the log applies it (a transaction queued behind it would then run).
#[test]
fn watch_sees_a_move_into_its_database_as_soon_as_it_is_proposed() {
    let cluster = Cluster::start(3, &[]).unwrap();
    let leader_at = cluster.wait_leader();
    let leader = &cluster.nodes[leader_at];
    let _: () = leader.cmd(&["SET", "k", "a"]).unwrap();
    let _: () = leader.cmd(&["SET", "c", "b"]).unwrap();
    let exchange = |s: &mut std::net::TcpStream, request: &str, expected: &str| {
        let got = raftis_integration::exchange_on(s, request.as_bytes(), expected.len());
        assert_eq!(String::from_utf8_lossy(&got), expected, "after {request:?}");
    };
    let followers: Vec<&Server> = cluster.nodes.iter().filter(|n| n.port != leader.port).collect();
    for (write, watched) in [("MOVE k 1", "k"), ("COPY c c2 DB 1", "c2")] {
        let mut watcher = std::net::TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
        exchange(&mut watcher, &format!("SELECT 1\r\nWATCH {watched}\r\n"), "+OK\r\n+OK\r\n");
        // Without followers nothing commits: the write stays proposed while EXEC runs.
        let before = client_proposals(leader);
        for f in &followers {
            f.pause();
        }
        let mut writer = std::net::TcpStream::connect(("127.0.0.1", leader.port)).unwrap();
        std::io::Write::write_all(&mut writer, format!("{write}\r\n").as_bytes()).unwrap();
        wait_for("the write to be proposed", Duration::from_secs(10), || (client_proposals(leader) > before).then_some(()));
        let request = format!("MULTI\r\nSET {watched} mine\r\nEXEC\r\n");
        let aborted = "+OK\r\n+QUEUED\r\n*-1\r\n";
        let got = raftis_integration::exchange_on(&mut watcher, request.as_bytes(), aborted.len());
        for f in &followers {
            f.resume();
        }
        assert_eq!(String::from_utf8_lossy(&got), aborted, "EXEC ran after {write}");
        exchange(&mut writer, "", ":1\r\n");
    }
    let mut conn = leader.client().unwrap();
    let _: () = redis::cmd("SELECT").arg(1).query(&mut conn).unwrap();
    let got: (String, String) = redis::cmd("MGET").arg("k").arg("c2").query(&mut conn).unwrap();
    assert_eq!(got, ("a".to_string(), "b".to_string()));
}

/// A WATCH served by a leader that then steps down cannot be checked by the next one, which
/// knows nothing of it, and whose writes reach the old leader only once applied there, maybe after
/// its client's EXEC went to it through the proxy. So the transaction does not run: EXEC answers
/// nil, as for a watched key that changed, and the client watches again, on the new leader.
#[test]
fn a_watch_does_not_outlive_the_leadership_it_was_served_by() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let old = cluster.wait_leader();
    let exchange = |s: &mut std::net::TcpStream, request: &str, expected: &str| {
        let got = raftis_integration::exchange_on(s, request.as_bytes(), expected.len());
        assert_eq!(String::from_utf8_lossy(&got), expected, "after {request:?}");
    };
    let _: () = cluster.nodes[old].cmd(&["SET", "k", "1"]).unwrap();
    let mut watcher = std::net::TcpStream::connect(("127.0.0.1", cluster.nodes[old].port)).unwrap();
    exchange(&mut watcher, "SET j 1\r\nWATCH k\r\nMULTI\r\nSET k 2\r\nEXEC\r\n", "+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    exchange(&mut watcher, "WATCH k\r\n", "+OK\r\n");
    let new = (old + 1) % 3;
    let _: String = cluster.nodes[old].cmd(&["RAFT.TRANSFERLEADER", &cluster.nodes[new].addr()]).unwrap();
    exchange(&mut watcher, "MULTI\r\nSET k mine\r\nEXEC\r\nGET k\r\n", "+OK\r\n+QUEUED\r\n*-1\r\n$1\r\n2\r\n");
    // Watched again, on the new leader, it runs.
    let mut watcher = std::net::TcpStream::connect(("127.0.0.1", cluster.nodes[new].port)).unwrap();
    exchange(&mut watcher, "WATCH k\r\nMULTI\r\nSET k mine\r\nEXEC\r\n", "+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
}

/// Read-modify-write with WATCH (redis::transaction, which retries on nil) while other clients
/// INCR the same key, on the leader and through a follower with the proxy: every increment of
/// either kind must be in the final value. A write proposed but not yet applied when a
/// transaction's client read the key, and committed before that transaction, would be
/// overwritten by it; so would a forwarded write proposed after EXEC checked the WATCH but
/// before the transaction entered the log.
#[test]
fn optimistic_increments_under_watch_lose_nothing_to_concurrent_writers() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.leader();
    let follower = cluster.nodes.iter().find(|n| n.port != leader.port).unwrap();
    for level in ["high", "low"] {
        cluster.config_set("consistency", level);
        let key = format!("c-{level}");
        let (optimists, per_optimist, incrementers, per_incrementer) = (3, 150, 2, 400);
        let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..optimists {
            let (mut conn, key, retries) = (leader.client().unwrap(), key.clone(), retries.clone());
            threads.push(std::thread::spawn(move || {
                for _ in 0..per_optimist {
                    let _: () = redis::transaction(&mut conn, &[&key], |conn, pipe| {
                        let v: Option<i64> = redis::cmd("GET").arg(&key).query(conn)?;
                        let done: Option<()> = pipe.cmd("SET").arg(&key).arg(v.unwrap_or(0) + 1).ignore().query(conn)?;
                        if done.is_none() {
                            retries.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(done)
                    })
                    .unwrap();
                }
            }));
        }
        for i in 0..incrementers {
            let via = if i % 2 == 0 { leader } else { follower };
            let (mut conn, key) = (via.client().unwrap(), key.clone());
            threads.push(std::thread::spawn(move || {
                for _ in 0..per_incrementer {
                    let _: i64 = redis::cmd("INCR").arg(&key).query(&mut conn).unwrap();
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let total: i64 = leader.cmd(&["GET", &key]).unwrap();
        assert_eq!(total, optimists * per_optimist + incrementers * per_incrementer, "consistency {level}");
        assert!(retries.load(Ordering::Relaxed) > 0, "consistency {level}: no transaction ever had to retry; the test did not race");
    }
    cluster.assert_same_dataset(&[0, 1, 2]);
}

/// A HELLO inside a transaction switches the protocol for the commands behind it, as in Redis:
/// each reply in EXEC's array comes in the protocol its command ran in (here a map, RESP3's null,
/// then RESP2's array of fields and values again). So does a HELLO in the middle of a pipeline.
/// On the leader, and through a follower that sends it all to the leader in one piece.
#[test]
fn a_hello_inside_a_transaction_switches_the_protocol_of_the_commands_after_it() {
    let cluster = Cluster::start(3, &["follower-proxy=yes"]).unwrap();
    let leader = cluster.wait_leader();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let plain = Server::start_plain(free_port_pair(), &cluster.root.path().join("plain")).unwrap();
    let commands: Vec<Vec<Vec<u8>>> = [
        &["HSET", "h", "f", "v"][..],
        &["MULTI"],
        &["HGETALL", "h"],
        &["HELLO", "3"],
        &["HGETALL", "h"],
        &["GET", "missing"],
        &["HGETALL", "missing"],
        &["HELLO", "2"],
        &["HGETALL", "h"],
        &["GET", "missing"],
        &["EXEC"],
        &["HGETALL", "h"],
        &["HELLO", "3"],
        &["HGETALL", "h"],
        &["GET", "missing"],
        &["HELLO", "2"],
        &["HGETALL", "h"],
    ]
    .iter()
    .map(|command| args(command))
    .collect();
    const EXEC: usize = 10;
    // HELLO's own replies name the server's modules and the client's id: they differ by design.
    let without_hello = |replies: &[Reply]| -> Vec<String> {
        let exec = replies[EXEC].items().unwrap_or_else(|| panic!("EXEC answered {:?}", replies[EXEC]));
        assert_eq!(exec.len(), 8, "{exec:?}");
        let is_hello = |i: usize| commands[i][0] == b"HELLO";
        let mut shown: Vec<String> =
            replies.iter().enumerate().filter(|(i, _)| *i != EXEC && !is_hello(*i)).map(|(_, r)| format!("{r:?}")).collect();
        shown.extend(exec.iter().enumerate().filter(|(i, _)| !is_hello(i + EXEC - 8)).map(|(_, r)| format!("{r:?}")));
        shown
    };
    let expected = RespConn::connect(plain.port).unwrap().pipeline(&commands).unwrap();
    for via in [leader, follower] {
        cluster.nodes[leader].cmd::<i64>(&["DEL", "h"]).unwrap();
        let got = RespConn::connect(cluster.nodes[via].port).unwrap().pipeline(&commands).unwrap();
        assert_eq!(without_hello(&got), without_hello(&expected), "via node {via} (leader {leader})");
        let exec = got[EXEC].items().unwrap();
        assert!(matches!(&exec[2], Reply::Aggregate(b'%', _)), "a map after HELLO 3: {:?}", exec[2]);
        assert!(matches!(&exec[3], Reply::Null(b'_')), "RESP3's null: {:?}", exec[3]);
        assert!(matches!(&exec[6], Reply::Aggregate(b'*', _)), "an array again after HELLO 2: {:?}", exec[6]);
        assert!(matches!(&got[13], Reply::Aggregate(b'%', _)), "a map after HELLO 3 in the pipeline: {:?}", got[13]);
        assert!(matches!(&got[16], Reply::Aggregate(b'*', _)), "an array after HELLO 2 in the pipeline: {:?}", got[16]);
    }
}

/// While a node applies a long script, Redis serves clients between the script's steps and runs
/// the few commands it allows then (MULTI and WATCH among them) without the module's filter. A
/// transaction opened that way would run its reads outside the log, on the dataset as it was
/// before the transaction's own writes; a WATCH would skip the leader's barrier. They are
/// refused like every other data command then.
#[test]
fn multi_and_watch_sent_while_a_long_script_applies_are_refused() {
    let cluster = Cluster::start(3, &["consistency=low"]).unwrap();
    let leader = cluster.leader();
    for node in &cluster.nodes {
        let _: () = node.cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"]).unwrap();
    }
    let _: () = leader.cmd(&["SET", "k", "old"]).unwrap();
    let mut conn = RespConn::connect(leader.port).unwrap();
    let mut scripted = leader.client().unwrap();
    // Seconds on a quiet machine, every node running it; far longer on a loaded one.
    scripted.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let script = "local n = 0 for i = 1, 100000000 do n = n + 1 end return n";
    let runner = std::thread::spawn(move || redis::cmd("EVAL").arg(script).arg(0).query::<i64>(&mut scripted));
    wait_for("the script to hold the leader", Duration::from_secs(10), || leader.log().contains("Slow script detected").then_some(()));

    for command in [&["MULTI"][..], &["WATCH", "k"]] {
        let reply = call(&mut conn, command);
        let refused = reply.text().is_some_and(|e| e.starts_with("LOADING") || e.starts_with("BUSY"));
        assert!(reply.is_error() && refused, "{command:?} while the script runs: {reply:?}");
    }
    assert_eq!(runner.join().unwrap().unwrap(), 100000000);

    // No transaction was opened: these run one by one, and the read sees the write.
    let replies = conn.pipeline(&[args(&["SET", "k", "new"]), args(&["GET", "k"]), args(&["EXEC"])]).unwrap();
    assert_eq!(replies[0], Reply::Line(b'+', b"OK".to_vec()), "{replies:?}");
    assert_eq!(replies[1].bytes(), Some(&b"new"[..]), "{replies:?}");
    assert!(replies[2].text().is_some_and(|e| e.contains("EXEC without MULTI")), "{replies:?}");
}
