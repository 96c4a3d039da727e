//! Client workloads for fault-injection runs: each client thread runs one operation at a time,
//! recording its invocation before sending and its outcome after, against a cluster whose nodes
//! may be dead, paused or cut off. Clients follow `-MOVED` and move on from nodes that fail them.
//!
//! Three workloads, mixed in one run on disjoint keys:
//! - register: `SET rN <unique>` / `GET rN` (checked for linearizability);
//! - counter: `INCR counter` (final value between acknowledged and attempted increments);
//! - list append: `RPUSH lN <unique>` / `LRANGE lN 0 -1` (every acknowledged value present once,
//!   reads prefixes of each other). Appends move on to a new key every [`LIST_CHUNK`] values, so
//!   lists (and the reads the checker compares) stay short however long a run is.

use crate::history::{History, Op, Outcome, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const REGISTER_KEYS: usize = 4;
/// Appends per list key before the workload moves on to the next key.
pub const LIST_CHUNK: i64 = 200;
pub const COUNTER_KEY: &str = "counter";

/// Which workloads a run mixes.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub register: bool,
    pub counter: bool,
    pub list: bool,
}

impl Mix {
    pub const ALL: Mix = Mix { register: true, counter: true, list: true };
}

/// A connection to "the cluster" as a plain Redis client sees it.
pub struct Client {
    ports: Vec<u16>,
    current: usize,
    conn: Option<redis::Connection>,
}

impl Client {
    pub fn new(ports: Vec<u16>, start_at: usize) -> Client {
        Client { current: start_at % ports.len(), ports, conn: None }
    }

    fn connect(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() {
            let url = format!("redis://127.0.0.1:{}/", self.ports[self.current]);
            let conn = redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
            // Longer than the module's write-timeout, so a slow cluster answers -TIMEOUT itself.
            conn.set_read_timeout(Some(Duration::from_secs(8))).ok()?;
            self.conn = Some(conn);
        }
        self.conn.as_mut()
    }

    fn next_node(&mut self) {
        self.conn = None;
        self.current = (self.current + 1) % self.ports.len();
    }

    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Runs `cmd`, classifying a failure as definite (`Fail`) or not (`Unknown`).
    pub fn run(&mut self, cmd: &redis::Cmd) -> Result<redis::Value, Outcome> {
        let Some(conn) = self.connect() else {
            self.next_node();
            return Err(Outcome::Fail("connection refused".into()));
        };
        match cmd.query::<redis::Value>(conn) {
            Ok(v) => Ok(v),
            Err(e) if e.code() == Some("MOVED") => {
                let target = e.to_string().split_whitespace().last().and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
                match target.and_then(|p| self.ports.iter().position(|x| *x == p)) {
                    Some(pos) => {
                        self.current = pos;
                        self.conn = None;
                    }
                    None => self.next_node(),
                }
                Err(Outcome::Fail("MOVED".into()))
            }
            // Refused before anything was proposed.
            Err(e) if matches!(e.code(), Some("CLUSTERDOWN") | Some("TRYAGAIN")) => {
                self.next_node();
                Err(Outcome::Fail(e.to_string()))
            }
            // Proposed, outcome unknown (timeout, leadership lost while in flight, ...).
            Err(e) if e.code().is_some() => {
                self.next_node();
                Err(Outcome::Unknown(e.to_string()))
            }
            Err(e) => {
                // The request may have reached the node before the connection broke.
                self.next_node();
                Err(Outcome::Unknown(e.to_string()))
            }
        }
    }
}

fn as_value(v: &redis::Value) -> Value {
    match v {
        redis::Value::Nil => Value::Nil,
        redis::Value::Int(i) => Value::Int(*i),
        redis::Value::Data(b) => String::from_utf8_lossy(b).parse().map(Value::Int).unwrap_or(Value::Nil),
        redis::Value::Bulk(items) => Value::List(
            items
                .iter()
                .filter_map(|i| match as_value(i) {
                    Value::Int(n) => Some(n),
                    _ => None,
                })
                .collect(),
        ),
        _ => Value::Nil,
    }
}

/// Client threads working until `stop` is set or each has run `max_ops` operations.
pub struct Clients {
    pub history: History,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The next list value; list `lN` holds values `N * LIST_CHUNK ..`.
    next_list_value: Arc<AtomicI64>,
}

impl Clients {
    pub fn start(ports: &[u16], count: usize, mix: Mix, seed: u64, max_ops: usize) -> Clients {
        let history = History::new();
        let stop = Arc::new(AtomicBool::new(false));
        let next_value = Arc::new(AtomicI64::new(1));
        let next_list_value = Arc::new(AtomicI64::new(0));
        let threads = (0..count)
            .map(|process| {
                let (history, stop, ports) = (history.clone(), stop.clone(), ports.to_vec());
                let counters = (next_value.clone(), next_list_value.clone());
                std::thread::spawn(move || {
                    let mut client = Client::new(ports, process);
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(process as u64));
                    let mut ops = 0;
                    while !stop.load(Ordering::Relaxed) && ops < max_ops {
                        ops += 1;
                        one_op(&mut client, &mut rng, &history, process, mix, &counters.0, &counters.1);
                        if !client.connected() {
                            // Between nodes (dead one, or redirected): back off like a real client.
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        Clients { history, stop, threads, next_list_value }
    }

    /// Stops the clients and waits for their last operations to complete.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// After healing: one final read of the counter and of every list, retried on any node until
    /// one answers (the list checker needs a final read to find lost appends).
    pub fn final_reads(&self, ports: &[u16], mix: Mix) {
        let mut client = Client::new(ports.to_vec(), 0);
        let mut reads: Vec<(Op, redis::Cmd)> = Vec::new();
        if mix.counter {
            reads.push((Op::Read { key: COUNTER_KEY.into() }, redis::cmd("GET").arg(COUNTER_KEY).clone()));
        }
        if mix.list {
            for i in 0..=self.next_list_value.load(Ordering::Relaxed) / LIST_CHUNK {
                let key = format!("l{i}");
                reads.push((Op::ReadList { key: key.clone() }, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone()));
            }
        }
        for (op, cmd) in reads {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let handle = self.history.invoke(usize::MAX / 2, op.clone());
                match client.run(&cmd) {
                    Ok(v) => {
                        handle.complete(Outcome::Ok(Some(as_value(&v))));
                        break;
                    }
                    Err(o) => handle.complete(o),
                }
                assert!(Instant::now() < deadline, "no node answered the final `{op}` for 30 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

fn one_op(
    client: &mut Client,
    rng: &mut StdRng,
    history: &History,
    process: usize,
    mix: Mix,
    next: &AtomicI64,
    next_list: &AtomicI64,
) {
    let mut kinds = Vec::new();
    if mix.register {
        kinds.push(0);
    }
    if mix.counter {
        kinds.push(1);
    }
    if mix.list {
        kinds.push(2);
    }
    let (op, cmd) = match kinds[rng.gen_range(0..kinds.len())] {
        0 => {
            let key = format!("r{}", rng.gen_range(0..REGISTER_KEYS));
            if rng.gen_bool(0.5) {
                let value = next.fetch_add(1, Ordering::Relaxed);
                (Op::Write { key: key.clone(), value }, redis::cmd("SET").arg(&key).arg(value).clone())
            } else {
                (Op::Read { key: key.clone() }, redis::cmd("GET").arg(&key).clone())
            }
        }
        1 => (Op::Incr { key: COUNTER_KEY.into() }, redis::cmd("INCR").arg(COUNTER_KEY).clone()),
        _ => {
            if rng.gen_bool(0.7) {
                let value = next_list.fetch_add(1, Ordering::Relaxed);
                let key = format!("l{}", value / LIST_CHUNK);
                (Op::Append { key: key.clone(), value }, redis::cmd("RPUSH").arg(&key).arg(value).clone())
            } else {
                // The list being appended to now, or the one just finished.
                let current = next_list.load(Ordering::Relaxed) / LIST_CHUNK;
                let key = format!("l{}", (current - rng.gen_range(0..2)).max(0));
                (Op::ReadList { key: key.clone() }, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone())
            }
        }
    };
    let handle = history.invoke(process, op.clone());
    let outcome = match client.run(&cmd) {
        // A write's reply carries nothing the checkers need (RPUSH's length is not checked).
        Ok(_) if matches!(op, Op::Write { .. } | Op::Append { .. }) => Outcome::Ok(None),
        Ok(v) => Outcome::Ok(Some(as_value(&v))),
        // A read that failed observed nothing, whatever the reason.
        Err(Outcome::Unknown(why)) if op.is_read() => Outcome::Fail(why),
        Err(o) => o,
    };
    handle.complete(outcome);
}
