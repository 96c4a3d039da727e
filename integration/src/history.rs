//! Operation histories for Jepsen-style checking.
//!
//! Client threads call [`History::invoke`] *before* sending a request and
//! [`OpHandle::complete`] *after* the reply (or the failure) is known. Timestamps are
//! nanoseconds on a monotonic clock, relative to the history's creation, and are taken while
//! the history's lock is held, so the recorded order of invocations matches their timestamps.
//!
//! Completion outcomes:
//! * [`Outcome::Ok`]: the operation took effect (with the reply value, if any);
//! * [`Outcome::Fail`]: the operation definitely did not take effect (e.g. `-MOVED`,
//!   `-CLUSTERDOWN`, connection refused before the request was sent);
//! * [`Outcome::Unknown`]: it may or may not have taken effect (e.g. `-TIMEOUT`, connection
//!   dropped after sending, client-side timeout). The checker treats such an operation as never
//!   completing: concurrent with everything invoked after it.
//!
//! An [`OpHandle`] dropped without `complete` (e.g. the client thread panicked) records
//! `Unknown("abandoned")`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// A logical client ("process" in Jepsen terms). Each process runs its operations one at a time.
pub type ProcessId = usize;

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `GET key`: a register read.
    Read { key: String },
    /// `SET key value`: a register write.
    Write { key: String, value: i64 },
    /// `INCR key`: a counter increment (the Ok value, if recorded, is the new value).
    Incr { key: String },
    /// `RPUSH key value`: append to a list.
    Append { key: String, value: i64 },
    /// `LRANGE key 0 -1`: read a whole list.
    ReadList { key: String },
}

impl Op {
    /// The key the operation is on.
    pub fn key(&self) -> &str {
        match self {
            Op::Read { key } | Op::Write { key, .. } | Op::Incr { key } | Op::Append { key, .. } | Op::ReadList { key } => key,
        }
    }

    /// True for operations that only observe state (`Read`, `ReadList`).
    pub fn is_read(&self) -> bool {
        matches!(self, Op::Read { .. } | Op::ReadList { .. })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Read { key } => write!(f, "read {key}"),
            Op::Write { key, value } => write!(f, "write {key} {value}"),
            Op::Incr { key } => write!(f, "incr {key}"),
            Op::Append { key, value } => write!(f, "append {key} {value}"),
            Op::ReadList { key } => write!(f, "readlist {key}"),
        }
    }
}

/// A value returned by a successful operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Nil,
    List(Vec<i64>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Nil => write!(f, "nil"),
            Value::List(items) => {
                write!(f, "[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, " ")?;
                    }
                    write!(f, "{v}")?;
                }
                write!(f, "]")
            }
        }
    }
}

/// How an operation completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Took effect; the reply value if the operation returns one (reads must record one; a read
    /// recorded as `Ok(None)` is taken as having read `Nil`).
    Ok(Option<Value>),
    /// Definitely did not take effect; the string says why.
    Fail(String),
    /// May or may not have taken effect; the string says why.
    Unknown(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
    pub fn is_fail(&self) -> bool {
        matches!(self, Outcome::Fail(_))
    }
    pub fn is_unknown(&self) -> bool {
        matches!(self, Outcome::Unknown(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(Some(v)) => write!(f, "ok {v}"),
            Outcome::Ok(None) => write!(f, "ok"),
            Outcome::Fail(why) => write!(f, "FAIL ({why})"),
            Outcome::Unknown(why) => write!(f, "UNKNOWN ({why})"),
        }
    }
}

/// One operation: its invocation and (once known) its completion.
///
/// Times are nanoseconds since the history started. `outcome == None` means the operation is
/// still in flight; checkers treat that like `Unknown`. Checkers only look at `completed_at`
/// for `Ok` operations (a missing `completed_at` there means "completed at an unknown time",
/// i.e. concurrent with everything after its invocation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub process: ProcessId,
    pub op: Op,
    pub invoked_at: u64,
    pub completed_at: Option<u64>,
    pub outcome: Option<Outcome>,
}

impl Event {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Ok(_)))
    }
    pub fn is_fail(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Fail(_)))
    }
    /// `Unknown`, or still in flight.
    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, None | Some(Outcome::Unknown(_)))
    }
    /// The value of an `Ok` outcome, if any.
    pub fn ok_value(&self) -> Option<&Value> {
        match &self.outcome {
            Some(Outcome::Ok(v)) => v.as_ref(),
            _ => None,
        }
    }
}

fn fmt_nanos(n: u64) -> String {
    format!("{}.{:06}ms", n / 1_000_000, n % 1_000_000)
}

impl fmt::Display for Event {
    /// e.g. `p3   12.000250ms ..   13.100000ms  write x 5 => ok`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let completed = match self.completed_at {
            Some(t) => fmt_nanos(t),
            None => "?".to_string(),
        };
        let outcome = match &self.outcome {
            Some(o) => o.to_string(),
            None => "(in flight)".to_string(),
        };
        write!(f, "p{:<3} {:>16} .. {:>16}  {} => {}", self.process, fmt_nanos(self.invoked_at), completed, self.op, outcome)
    }
}

struct Inner {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Inner {
    /// Survives a client thread that panicked while holding the lock.
    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A shared, append-only record of operations. Cloning is cheap (all clones record into the
/// same history); `Send + Sync`.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("len", &self.len()).finish()
    }
}

impl History {
    /// An empty history; its clock starts now.
    pub fn new() -> Self {
        History { inner: Arc::new(Inner { start: Instant::now(), events: Mutex::new(Vec::new()) }) }
    }

    /// Records the invocation of `op` by `process`, timestamped now. Call this before sending
    /// the request; complete the returned handle once the outcome is known.
    pub fn invoke(&self, process: ProcessId, op: Op) -> OpHandle {
        let mut events = self.inner.lock();
        let invoked_at = self.inner.now();
        let index = events.len();
        events.push(Event { process, op, invoked_at, completed_at: None, outcome: None });
        OpHandle { inner: Some(self.inner.clone()), index }
    }

    /// Nanoseconds since the history started (the clock used for all timestamps).
    pub fn now_nanos(&self) -> u64 {
        self.inner.now()
    }

    /// A snapshot of all events, in invocation order. Operations still in flight have
    /// `outcome == None`.
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().clone()
    }

    /// The processes with an operation invoked at `since` or later that succeeded. Cheap enough
    /// to poll: it reads only the events invoked since then.
    pub fn acknowledged_since(&self, since: u64) -> BTreeSet<ProcessId> {
        let events = self.inner.lock();
        events.iter().rev().take_while(|e| e.invoked_at >= since).filter(|e| e.is_ok()).map(|e| e.process).collect()
    }

    /// Number of recorded invocations.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One readable line per event, in invocation order, for failure reports.
    pub fn dump(&self) -> String {
        dump_events(&self.events())
    }
}

/// How the operations ended, with failures and unknown outcomes counted by reason: the error
/// code of an error reply (`MOVED`, `TIMEOUT`, ...) or the client's own error, numbers left out.
/// For the report of a run, so that a reader sees what the faults did to the clients.
pub fn outcome_summary(events: &[Event]) -> String {
    let mut by_reason: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut ok = 0;
    for e in events {
        let (kind, why) = match &e.outcome {
            Some(Outcome::Ok(_)) => {
                ok += 1;
                continue;
            }
            Some(Outcome::Fail(why)) => ("fail", why.as_str()),
            Some(Outcome::Unknown(why)) => ("unknown", why.as_str()),
            None => ("unknown", "in flight"),
        };
        // An error reply reads "CODE: text"; a client error is kept whole, without its numbers.
        let reason = match why.split_once(':') {
            Some((code, _)) if !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase()) => code.to_string(),
            _ => why.chars().filter(|c| !c.is_ascii_digit()).take(48).collect(),
        };
        *by_reason.entry((kind, reason)).or_default() += 1;
    }
    let mut out = format!("{ok} ok");
    for ((kind, reason), n) in by_reason {
        out.push_str(&format!(", {n} {kind} ({reason})"));
    }
    out
}

/// One line per event (see `Event`'s `Display`), each ending in a newline.
pub fn dump_events(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        out.push_str(&e.to_string());
        out.push('\n');
    }
    out
}

/// An invoked, not yet completed operation. Dropping it without calling
/// [`complete`](OpHandle::complete) records `Unknown("abandoned")`.
#[must_use = "complete the operation with its outcome; dropping it records Unknown(\"abandoned\")"]
pub struct OpHandle {
    inner: Option<Arc<Inner>>,
    index: usize,
}

impl fmt::Debug for OpHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpHandle").field("index", &self.index).finish()
    }
}

impl OpHandle {
    /// Records the completion, timestamped now.
    pub fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    /// Position of this operation's event in [`History::events`].
    pub fn index(&self) -> usize {
        self.index
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(inner) = self.inner.take() {
            let mut events = inner.lock();
            let now = inner.now();
            let e = &mut events[self.index];
            e.completed_at = Some(now);
            e.outcome = Some(outcome);
        }
    }
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        self.finish(Outcome::Unknown("abandoned".to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn records_invocations_and_completions() {
        assert_send_sync::<History>();
        assert_send_sync::<OpHandle>();
        let h = History::new();
        assert!(h.is_empty());
        let w = h.invoke(1, Op::Write { key: "x".into(), value: 5 });
        let r = h.invoke(2, Op::Read { key: "x".into() });
        assert_eq!(h.len(), 2);
        // In flight.
        let evs = h.events();
        assert!(evs.iter().all(|e| e.outcome.is_none() && e.completed_at.is_none()));
        assert!(evs[0].is_unknown());
        w.complete(Outcome::Ok(None));
        r.complete(Outcome::Ok(Some(Value::Int(5))));
        let f = h.invoke(3, Op::Incr { key: "c".into() });
        f.complete(Outcome::Fail("MOVED".into()));
        let evs = h.events();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].process, 1);
        assert_eq!(evs[0].op, Op::Write { key: "x".into(), value: 5 });
        assert_eq!(evs[0].outcome, Some(Outcome::Ok(None)));
        assert_eq!(evs[1].ok_value(), Some(&Value::Int(5)));
        assert!(evs[2].is_fail());
        for e in &evs {
            assert!(e.completed_at.unwrap() >= e.invoked_at);
        }
        assert!(evs[0].invoked_at <= evs[1].invoked_at && evs[1].invoked_at <= evs[2].invoked_at);
        // Completions happened after both invocations.
        assert!(evs[0].completed_at.unwrap() >= evs[1].invoked_at);
    }

    #[test]
    fn dropped_handle_records_abandoned() {
        let h = History::new();
        {
            let _handle = h.invoke(7, Op::Append { key: "l".into(), value: 1 });
        }
        let evs = h.events();
        assert_eq!(evs[0].outcome, Some(Outcome::Unknown("abandoned".into())));
        assert!(evs[0].completed_at.is_some());
        assert!(evs[0].is_unknown());
    }

    #[test]
    fn dump_is_one_line_per_event() {
        let h = History::new();
        h.invoke(0, Op::Write { key: "k".into(), value: 3 }).complete(Outcome::Ok(None));
        h.invoke(1, Op::ReadList { key: "l".into() }).complete(Outcome::Ok(Some(Value::List(vec![1, 2]))));
        h.invoke(2, Op::Read { key: "k".into() }).complete(Outcome::Unknown("TIMEOUT".into()));
        let _in_flight = h.invoke(3, Op::Incr { key: "c".into() });
        let d = h.dump();
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 4, "{d}");
        assert!(lines[0].contains("p0") && lines[0].contains("write k 3 => ok"), "{d}");
        assert!(lines[1].contains("readlist l => ok [1 2]"), "{d}");
        assert!(lines[2].contains("UNKNOWN (TIMEOUT)"), "{d}");
        assert!(lines[3].contains("incr c => (in flight)") && lines[3].contains(".. "), "{d}");
    }

    #[test]
    fn many_threads_record_concurrently() {
        let h = History::new();
        let threads: Vec<_> = (0..8)
            .map(|p| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let op = h.invoke(p, Op::Write { key: format!("k{}", i % 3), value: i });
                        if i % 10 == 0 {
                            drop(op);
                        } else {
                            op.complete(Outcome::Ok(None));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let evs = h.events();
        assert_eq!(evs.len(), 1600);
        assert!(evs.windows(2).all(|w| w[0].invoked_at <= w[1].invoked_at));
        assert_eq!(evs.iter().filter(|e| e.is_unknown()).count(), 8 * 20);
        assert!(evs.iter().all(|e| e.completed_at.is_some()));
        for p in 0..8 {
            // Each process's operations are sequential.
            let mine: Vec<&Event> = evs.iter().filter(|e| e.process == p).collect();
            assert!(mine.windows(2).all(|w| w[0].completed_at.unwrap() <= w[1].invoked_at));
        }
    }
}
