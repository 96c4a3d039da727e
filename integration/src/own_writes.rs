//! Read-your-writes, checked: a client increments its own counter and reads it back on the same
//! connection, again and again. The read may never be below what the increment answered. At
//! consistency `low` through the follower proxy, that holds only because a follower answers a
//! forwarded write once its own dataset holds it.
//!
//! A connection that broke starts over: a node restarted after a crash may start behind what it
//! had applied (see the README), and what one connection wrote another may read stale.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Runs one client on `port` with the counter `key` until `stop`, counting in `checks` the reads
/// it compared; returns what it saw go wrong.
pub fn client(port: u16, key: &str, stop: &AtomicBool, checks: &AtomicU64) -> Vec<String> {
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
