//! Short fault-injection runs: clients record every operation while the leader is killed and
//! restarted, then the history is checked (linearizable registers, counter bounds).

use raftis_integration::checker::{check_counter, check_register};
use raftis_integration::history::{History, Op, Outcome, Value};
use raftis_integration::{wait_for, Cluster};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A client that follows -MOVED and moves on from dead nodes.
struct Client {
    ports: Vec<u16>,
    current: usize,
    conn: Option<redis::Connection>,
}

impl Client {
    fn connect(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() {
            let url = format!("redis://127.0.0.1:{}/", self.ports[self.current]);
            let conn = redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
            conn.set_read_timeout(Some(Duration::from_secs(8))).ok()?;
            self.conn = Some(conn);
        }
        self.conn.as_mut()
    }

    fn next_node(&mut self) {
        self.conn = None;
        self.current = (self.current + 1) % self.ports.len();
    }

    /// Runs `cmd`, classifying the result the way the history needs it.
    fn run(&mut self, cmd: &redis::Cmd) -> Result<redis::Value, Outcome> {
        let Some(conn) = self.connect() else {
            self.next_node();
            return Err(Outcome::Fail("connection refused".into()));
        };
        match cmd.query::<redis::Value>(conn) {
            Ok(v) => Ok(v),
            Err(e) if e.code() == Some("MOVED") => {
                let target = e.to_string().split_whitespace().last().and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
                if let Some(pos) = target.and_then(|p| self.ports.iter().position(|x| *x == p)) {
                    self.current = pos;
                    self.conn = None;
                }
                Err(Outcome::Fail("MOVED".into()))
            }
            Err(e) if e.code() == Some("CLUSTERDOWN") => Err(Outcome::Fail(e.to_string())),
            Err(e) if e.code() == Some("TIMEOUT") => Err(Outcome::Unknown(e.to_string())),
            Err(e) => {
                // The request may have reached the node before the connection broke.
                self.next_node();
                Err(Outcome::Unknown(e.to_string()))
            }
        }
    }
}

fn as_int(v: &redis::Value) -> Value {
    match v {
        redis::Value::Nil => Value::Nil,
        redis::Value::Int(i) => Value::Int(*i),
        redis::Value::Data(b) => String::from_utf8_lossy(b).parse().map(Value::Int).unwrap_or(Value::Nil),
        _ => Value::Nil,
    }
}

#[test]
fn registers_stay_linearizable_and_counters_bounded_while_the_leader_is_killed() {
    let mut cluster = Cluster::start(3, &[]).unwrap();
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let next_value = Arc::new(AtomicI64::new(1));
    let run_for = Duration::from_secs(10);

    let clients: Vec<_> = (0..4)
        .map(|process| {
            let (history, stop, next_value, ports) = (history.clone(), stop.clone(), next_value.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut client = Client { current: process % ports.len(), ports, conn: None };
                let mut rng = rand::thread_rng();
                let mut ops = 0;
                while !stop.load(Ordering::Relaxed) && ops < 5_000 {
                    ops += 1;
                    let key = format!("r{}", rng.gen_range(0..3));
                    match rng.gen_range(0..5) {
                        0 | 1 => {
                            let value = next_value.fetch_add(1, Ordering::Relaxed);
                            let op = history.invoke(process, Op::Write { key: key.clone(), value });
                            let outcome = match client.run(redis::cmd("SET").arg(&key).arg(value)) {
                                Ok(_) => Outcome::Ok(None),
                                Err(o) => o,
                            };
                            op.complete(outcome);
                        }
                        2 | 3 => {
                            let op = history.invoke(process, Op::Read { key: key.clone() });
                            let outcome = match client.run(redis::cmd("GET").arg(&key)) {
                                Ok(v) => Outcome::Ok(Some(as_int(&v))),
                                Err(o) => o,
                            };
                            op.complete(outcome);
                        }
                        _ => {
                            let op = history.invoke(process, Op::Incr { key: "counter".into() });
                            let outcome = match client.run(redis::cmd("INCR").arg("counter")) {
                                Ok(v) => Outcome::Ok(Some(as_int(&v))),
                                Err(o) => o,
                            };
                            op.complete(outcome);
                        }
                    }
                    if client.conn.is_none() {
                        // Between nodes (dead one, or redirected): back off like a real client.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();

    // The nemesis: kill -9 the leader, wait for a new one, bring the old one back.
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < run_for {
        std::thread::sleep(Duration::from_millis(2500));
        let leader = cluster.wait_leader();
        cluster.nodes[leader].kill9();
        kills += 1;
        wait_for("a new leader", Duration::from_secs(15), || {
            (0..3).filter(|i| *i != leader).find(|i| cluster.nodes[*i].state() == "leader")
        });
        cluster.nodes[leader].restart().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    // Heal, then read the counter once more (a final, fault-free read).
    let leader = cluster.wait_leader();
    let op = history.invoke(99, Op::Read { key: "counter".into() });
    match cluster.nodes[leader].cmd::<Option<i64>>(&["GET", "counter"]) {
        Ok(v) => op.complete(Outcome::Ok(Some(v.map_or(Value::Nil, Value::Int)))),
        Err(e) => op.complete(Outcome::Unknown(e.to_string())),
    }

    let events = history.events();
    let ok = events.iter().filter(|e| e.is_ok()).count();
    eprintln!("{} operations, {ok} acknowledged, {kills} leader kills", events.len());
    assert!(ok > 100, "the cluster made progress under faults");
    if let Err(v) = check_register(&events) {
        panic!("not linearizable: {v}\nnodes' logs kept in {}", cluster.root.path().display());
    }
    let counter = check_counter(&events, "counter").unwrap_or_else(|v| panic!("counter violated: {v}"));
    eprintln!("counter: {counter:?}");
}
