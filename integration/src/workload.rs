//! Client workloads for fault-injection runs: each client thread runs one operation at a time,
//! recording its invocation before sending and its outcome after, against a cluster whose nodes
//! may be dead, paused or cut off. Clients follow `-MOVED` and move on from nodes that fail them.
//!
//! Four workloads, mixed in one run on disjoint keys:
//! - register: `SET rN <unique>` / `GET rN` (checked for linearizability), plus one reader per
//!   node that stays on it (see [`Client::pinned`]): a node that was paused or cut off and still
//!   takes itself for the leader gets asked at once, where a stale answer would show;
//! - counter: `INCR counter` (final value between acknowledged and attempted increments);
//! - list append: `RPUSH lN <unique>` / `LRANGE lN 0 -1` (every acknowledged value present once,
//!   reads prefixes of each other). Appends move on to a new key every [`LIST_CHUNK`] values, so
//!   lists (and the reads the checker compares) stay short however long a run is.
//! - transfers: MULTI/EXEC transactions between accounts, with a ledger (see [`transfers`]).

use crate::history::{History, Op, Outcome, ProcessId, Value};
use crate::transfers;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const REGISTER_KEYS: usize = 4;
/// Appends per list key before the workload moves on to the next key.
pub const LIST_CHUNK: i64 = 200;
pub const COUNTER_KEY: &str = "counter";
/// How long a pinned reader waits for an answer (see [`Client::pinned`]).
pub const PINNED_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long any other client waits: longer than the module's write-timeout, so a slow cluster
/// answers -TIMEOUT itself.
const READ_TIMEOUT: Duration = Duration::from_secs(8);

/// Which workloads a run mixes.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub register: bool,
    pub counter: bool,
    pub list: bool,
    pub transfer: bool,
}

impl Mix {
    pub const ALL: Mix = Mix { register: true, counter: true, list: true, transfer: true };
}

/// Error codes a cluster under faults may answer: redirects and refusals before anything was
/// proposed, timeouts whose outcome is unknown, a restarted node loading its dataset, and a
/// transaction discarded because a command in it was refused.
const EXPECTED_CODES: &[&str] = &["MOVED", "CLUSTERDOWN", "TRYAGAIN", "TIMEOUT", "LOADING", "EXECABORT"];

/// A connection to "the cluster" as a plain Redis client sees it.
pub struct Client {
    ports: Vec<u16>,
    current: usize,
    conn: Option<redis::Connection>,
    /// Stays on its node whatever it answers (see [`Client::pinned`]).
    pinned: bool,
    /// Errors no fault explains (see [`EXPECTED_CODES`]), shared by the clients of a run: each
    /// is still recorded as an unknown outcome, and the run fails on any of them.
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl Client {
    pub fn new(ports: Vec<u16>, start_at: usize, unexpected: Arc<Mutex<Vec<String>>>) -> Client {
        Client { current: start_at % ports.len(), ports, conn: None, pinned: false, unexpected }
    }

    /// A client that only ever talks to the node on `port`: it never follows `-MOVED` and gives
    /// up on an answer after [`PINNED_READ_TIMEOUT`], so it asks that node again the moment it
    /// is back from a fault, while it may still take itself for the leader.
    pub fn pinned(port: u16, unexpected: Arc<Mutex<Vec<String>>>) -> Client {
        Client { current: 0, ports: vec![port], conn: None, pinned: true, unexpected }
    }

    /// Notes an error that no fault explains: a wrong reply to a well-formed command, or one
    /// the client could not parse.
    fn check_expected(&self, e: &redis::RedisError) {
        let expected = match e.code() {
            Some(code) => EXPECTED_CODES.contains(&code),
            None => e.is_io_error(),
        };
        if !expected {
            let port = self.ports[self.current];
            self.unexpected.lock().unwrap_or_else(|p| p.into_inner()).push(format!("node on port {port}: {}", reason(e)));
        }
    }

    fn connect(&mut self) -> Option<&mut redis::Connection> {
        if self.conn.is_none() {
            let url = format!("redis://127.0.0.1:{}/", self.ports[self.current]);
            let conn = redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_millis(500)).ok()?;
            conn.set_read_timeout(Some(if self.pinned { PINNED_READ_TIMEOUT } else { READ_TIMEOUT })).ok()?;
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
        self.run_with(|conn| cmd.query(conn))
    }

    /// Runs a MULTI/EXEC pipeline. An error anywhere in it classifies the whole transaction: it
    /// ran all or nothing.
    pub fn run_transaction(&mut self, pipe: &redis::Pipeline) -> Result<redis::Value, Outcome> {
        self.run_with(|conn| pipe.query(conn))
    }

    fn run_with(
        &mut self,
        request: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<redis::Value>,
    ) -> Result<redis::Value, Outcome> {
        let Some(conn) = self.connect() else {
            self.next_node();
            return Err(Outcome::Fail("connection refused".into()));
        };
        let reply = request(conn);
        if let Err(e) = &reply {
            self.check_expected(e);
        }
        match reply {
            Ok(v) => Ok(v),
            Err(e) if e.code() == Some("MOVED") && self.pinned => Err(Outcome::Fail("MOVED".into())),
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
                Err(Outcome::Fail(reason(&e)))
            }
            // Proposed, outcome unknown (timeout, leadership lost while in flight, ...).
            Err(e) if e.code().is_some() => {
                self.next_node();
                Err(Outcome::Unknown(reason(&e)))
            }
            Err(e) => {
                // The request may have reached the node before the connection broke.
                self.next_node();
                Err(Outcome::Unknown(reason(&e)))
            }
        }
    }
}

/// Why a request failed, as the history records it: `CODE: text` for an error reply, whichever
/// way the client library spells it, or the client's own error.
fn reason(e: &redis::RedisError) -> String {
    match e.code() {
        Some(code) => format!("{code}: {}", e.detail().unwrap_or_default()),
        None => e.to_string(),
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

/// What the client threads share: where they record, and the next unique values.
struct Shared {
    history: History,
    mix: Mix,
    stop: AtomicBool,
    /// The next register value.
    next_value: AtomicI64,
    /// The next list value; list `lN` holds values `N * LIST_CHUNK ..`.
    next_list_value: AtomicI64,
    /// The next transfer id (see [`transfers`]).
    next_transfer: AtomicI64,
    /// What the transfer snapshots found wrong, as they found it.
    anomalies: Mutex<Vec<String>>,
    /// Errors no fault explains, from every client (see [`Client`]).
    unexpected: Arc<Mutex<Vec<String>>>,
}

/// Client threads working until `stop` is set or each has run `max_ops` operations: `count`
/// clients (processes `0..count`) and, with the register workload, one pinned reader per node
/// (processes `count..`). Each spreads its operations over `spread_over` at most (see [`Pace`]),
/// so that it still works when the last fault comes, however fast the cluster answers.
pub struct Clients {
    pub history: History,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    pub fn start(ports: &[u16], count: usize, mix: Mix, seed: u64, max_ops: usize, spread_over: Duration) -> Clients {
        let history = History::new();
        let shared = Arc::new(Shared {
            history: history.clone(),
            mix,
            stop: AtomicBool::new(false),
            next_value: AtomicI64::new(1),
            next_list_value: AtomicI64::new(0),
            next_transfer: AtomicI64::new(0),
            anomalies: Mutex::new(Vec::new()),
            unexpected: Arc::default(),
        });
        // Each thread runs `work` until stopped or out of operations, paced (see [`Pace`]).
        let worker = |process: ProcessId, mut client: Client, work: Work| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(process as u64));
                let pace = Pace::new(max_ops, spread_over);
                for op in 0..max_ops {
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    pace.wait_turn(op);
                    work(&mut client, &mut rng, &shared, process);
                }
            })
        };
        let clients = (0..count).map(|p| worker(p, Client::new(ports.to_vec(), p, shared.unexpected.clone()), client_step));
        let pinned = ports.iter().enumerate().filter(|_| mix.register);
        let pinned = pinned.map(|(node, port)| worker(count + node, Client::pinned(*port, shared.unexpected.clone()), pinned_read));
        let threads = clients.chain(pinned).collect();
        Clients { history, shared, threads }
    }

    /// Stops the clients and waits for their last operations to complete.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// What the transfer snapshots found wrong (balances that do not add up to their ledger).
    pub fn anomalies(&self) -> Vec<String> {
        self.shared.anomalies.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Error replies no fault explains (see [`Client`]), each with the node that gave it.
    pub fn unexpected_errors(&self) -> Vec<String> {
        self.shared.unexpected.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After healing: one final read of the counter, of every list and of every ledger (with its
    /// accounts), retried on any node until one answers (the list checker needs a final read to
    /// find lost appends).
    pub fn final_reads(&self, ports: &[u16]) {
        let mix = self.shared.mix;
        let mut client = Client::new(ports.to_vec(), 0, self.shared.unexpected.clone());
        let mut reads: Vec<Read> = Vec::new();
        // Without a read at the end, a lost acknowledged SET whose key was only written after it
        // would go unseen.
        if mix.register {
            reads.extend((0..REGISTER_KEYS).map(Read::register));
        }
        if mix.counter {
            reads.push(Read::Command(Op::Read { key: COUNTER_KEY.into() }, redis::cmd("GET").arg(COUNTER_KEY).clone()));
        }
        if mix.list {
            for i in 0..=self.shared.next_list_value.load(Ordering::Relaxed) / LIST_CHUNK {
                let key = format!("l{i}");
                reads.push(Read::Command(Op::ReadList { key: key.clone() }, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone()));
            }
        }
        if mix.transfer {
            reads.extend((0..=transfers::chunk_of(self.shared.next_transfer.load(Ordering::Relaxed))).map(Read::snapshot));
        }
        for read in reads {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !read.run(&mut client, &self.shared, usize::MAX / 2) {
                assert!(Instant::now() < deadline, "no node answered the final `{}` for 30 s", read.op());
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

/// One operation of a worker thread.
type Work = fn(&mut Client, &mut StdRng, &Shared, ProcessId);

/// A client's operation: any of the run's workloads, on whichever node leads.
fn client_step(client: &mut Client, rng: &mut StdRng, shared: &Shared, process: ProcessId) {
    one_op(client, rng, shared, process);
    if !client.connected() {
        // Between nodes (dead one, or redirected): back off like a real client.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pinned reader's operation: a register read, on its node.
fn pinned_read(client: &mut Client, rng: &mut StdRng, shared: &Shared, process: ProcessId) {
    if !Read::register(rng.gen_range(0..REGISTER_KEYS)).run(client, shared, process) {
        // A follower's -MOVED comes back at once: no need to ask 1,000 times a second.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keeps a client from running through its operations before the run ends: operation `n` starts
/// no earlier than `n / max_ops` of the way through `spread_over`. A client held up by a fault
/// catches up at full speed afterwards.
struct Pace {
    start: Instant,
    interval: Duration,
}

impl Pace {
    fn new(max_ops: usize, spread_over: Duration) -> Pace {
        let interval = spread_over.checked_div(max_ops.try_into().unwrap_or(u32::MAX)).unwrap_or_default();
        Pace { start: Instant::now(), interval }
    }

    fn wait_turn(&self, op: usize) {
        let turn = self.start + self.interval * op.try_into().unwrap_or(u32::MAX);
        if let Some(early) = turn.checked_duration_since(Instant::now()) {
            std::thread::sleep(early);
        }
    }
}

/// One read, recorded in the history.
enum Read {
    Command(Op, redis::Cmd),
    /// The accounts and ledger of a chunk of transfers, in one transaction.
    Snapshot {
        chunk: i64,
        op: Op,
        pipe: redis::Pipeline,
    },
}

impl Read {
    /// `GET rN`.
    fn register(n: usize) -> Read {
        let key = format!("r{n}");
        Read::Command(Op::Read { key: key.clone() }, redis::cmd("GET").arg(&key).clone())
    }

    fn snapshot(chunk: i64) -> Read {
        let (op, pipe) = transfers::snapshot(chunk);
        Read::Snapshot { chunk, op, pipe }
    }

    fn op(&self) -> &Op {
        match self {
            Read::Command(op, _) | Read::Snapshot { op, .. } => op,
        }
    }

    /// Runs and records the read; whether it got an answer.
    fn run(&self, client: &mut Client, shared: &Shared, process: usize) -> bool {
        let handle = shared.history.invoke(process, self.op().clone());
        let outcome = match self {
            Read::Command(_, cmd) => client.run(cmd).map(|v| as_value(&v)),
            Read::Snapshot { chunk, pipe, .. } => client.run_transaction(pipe).map(|v| match transfers::check_snapshot(*chunk, &v) {
                Ok(ledger) => Value::List(ledger),
                Err(anomaly) => {
                    shared.anomalies.lock().unwrap_or_else(|p| p.into_inner()).push(format!("p{process}: {anomaly}"));
                    // Still recorded as read, for the list checker.
                    as_value(v.as_sequence().and_then(|items| items.last()).unwrap_or(&redis::Value::Nil))
                }
            }),
        };
        let answered = outcome.is_ok();
        handle.complete(match outcome {
            Ok(v) => Outcome::Ok(Some(v)),
            // A read that failed observed nothing, whatever the reason.
            Err(Outcome::Unknown(why)) => Outcome::Fail(why),
            Err(o) => o,
        });
        answered
    }
}

/// One operation of the workload.
enum Step {
    Read(Read),
    /// A single-command write (or increment).
    Write(Op, redis::Cmd),
    /// A transfer, by id.
    Transfer(i64),
}

fn one_op(client: &mut Client, rng: &mut StdRng, shared: &Shared, process: usize) {
    let mix = shared.mix;
    let kinds: Vec<u8> = [(mix.register, 0), (mix.counter, 1), (mix.list, 2), (mix.transfer, 3)]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
        .collect();
    let step = match kinds[rng.gen_range(0..kinds.len())] {
        0 => {
            let n = rng.gen_range(0..REGISTER_KEYS);
            if rng.gen_bool(0.5) {
                let (key, value) = (format!("r{n}"), shared.next_value.fetch_add(1, Ordering::Relaxed));
                Step::Write(Op::Write { key: key.clone(), value }, redis::cmd("SET").arg(&key).arg(value).clone())
            } else {
                Step::Read(Read::register(n))
            }
        }
        1 => Step::Write(Op::Incr { key: COUNTER_KEY.into() }, redis::cmd("INCR").arg(COUNTER_KEY).clone()),
        2 => {
            if rng.gen_bool(0.7) {
                let value = shared.next_list_value.fetch_add(1, Ordering::Relaxed);
                let key = format!("l{}", value / LIST_CHUNK);
                Step::Write(Op::Append { key: key.clone(), value }, redis::cmd("RPUSH").arg(&key).arg(value).clone())
            } else {
                // The list being appended to now, or the one just finished.
                let current = shared.next_list_value.load(Ordering::Relaxed) / LIST_CHUNK;
                let key = format!("l{}", (current - rng.gen_range(0..2)).max(0));
                Step::Read(Read::Command(Op::ReadList { key: key.clone() }, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone()))
            }
        }
        _ => {
            if rng.gen_bool(0.7) {
                Step::Transfer(shared.next_transfer.fetch_add(1, Ordering::Relaxed))
            } else {
                // The chunk being transferred in now, or the one just finished.
                let current = transfers::chunk_of(shared.next_transfer.load(Ordering::Relaxed));
                Step::Read(Read::snapshot((current - rng.gen_range(0..2)).max(0)))
            }
        }
    };
    match step {
        Step::Read(read) => {
            read.run(client, shared, process);
        }
        Step::Write(op, cmd) => {
            let handle = shared.history.invoke(process, op.clone());
            handle.complete(match client.run(&cmd) {
                // A write's reply carries nothing the checkers need (RPUSH's length is not checked).
                Ok(_) if matches!(op, Op::Write { .. } | Op::Append { .. }) => Outcome::Ok(None),
                Ok(v) => Outcome::Ok(Some(as_value(&v))),
                Err(o) => o,
            });
        }
        Step::Transfer(id) => {
            let (op, pipe) = transfers::transfer(id);
            let handle = shared.history.invoke(process, op);
            handle.complete(client.run_transaction(&pipe).map_or_else(|o| o, |_| Outcome::Ok(None)));
        }
    }
}
