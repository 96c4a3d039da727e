//! Read-your-writes, checked: a client increments its own counter and reads it back on the same
//! connection, again and again. The read may never be below what the increment answered. At
//! consistency `low` through the follower proxy, that holds only because a follower answers a
//! forwarded write once its own dataset holds it.
//!
//! A connection that broke starts over: a node restarted after a crash may start behind what it
//! had applied (see the README), and what one connection wrote another may read stale.
//!
//! [`check_while`] runs such clients on every node while a test does its faults.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Runs one client on `port` with the counter `key` until `stop`, counting in `checks` the reads
/// it compared; returns what it saw go wrong.
fn client(port: u16, key: &str, stop: &AtomicBool, checks: &AtomicU64) -> Vec<String> {
    let mut violations = Vec::new();
    let mut conn: Option<redis::Connection> = None;
    // What this connection's last answered increment said.
    let mut floor = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.as_mut() else {
            conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|c| c.set_read_timeout(Some(Duration::from_secs(10))).map(|()| c))
                .ok();
            floor = 0;
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        };
        let incr: redis::RedisResult<u64> = redis::cmd("INCR").arg(key).query(c);
        let read: redis::RedisResult<Option<u64>> = incr.and_then(|n| {
            floor = n;
            redis::cmd("GET").arg(key).query(c)
        });
        match read {
            Ok(got) => {
                if got.unwrap_or(0) < floor {
                    violations.push(format!("{key} on port {port}: read {got:?} after INCR answered {floor}"));
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_io_error() || e.is_connection_dropped() => conn = None,
            // An election under way, or an outcome it cannot know: the next increment says more.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    violations
}

/// How many reads each client of [`check_while`] has compared so far.
pub struct Progress {
    checks: Vec<AtomicU64>,
}

impl Progress {
    /// Each client's count now, to wait past with [`Progress::wait_past`].
    pub fn mark(&self) -> Vec<u64> {
        self.checks.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Waits, up to 30 s, until every client has compared a read since `mark` (a client may
    /// first have to give up on a request a fault left unanswered).
    pub fn wait_past(&self, mark: &[u64], what: &str) {
        crate::wait_for(what, Duration::from_secs(30), || self.mark().iter().zip(mark).all(|(now, then)| now > then).then_some(()));
    }

    /// Reads compared by all clients.
    pub fn total(&self) -> u64 {
        self.mark().iter().sum()
    }
}

/// Runs `per_node` [`client`]s on every node of `ports`, each with a counter of its own, while
/// `faults` does what it does to the cluster; returns what the clients saw go wrong.
pub fn check_while(ports: &[u16], per_node: usize, faults: impl FnOnce(&Progress)) -> Vec<String> {
    let progress = Progress { checks: (0..ports.len() * per_node).map(|_| AtomicU64::new(0)).collect() };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..progress.checks.len())
            .map(|c| {
                let (port, stop, checks) = (ports[c % ports.len()], &stop, &progress.checks[c]);
                s.spawn(move || client(port, &format!("counter-{c}"), stop, checks))
            })
            .collect();
        faults(&progress);
        stop.store(true, Ordering::Relaxed);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    })
}
