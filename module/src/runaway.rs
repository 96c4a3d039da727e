//! A log entry that does not end.
//!
//! Every node applies every entry in turn on Redis' main thread, so a script (or function) that
//! loops forever hangs every node at the same entry. Unlike plain Redis, a restart does not get
//! rid of it: the node replays its log and runs the script again. `SCRIPT KILL` stops it only
//! while it has not written (Redis' rule). Without a way out, the cluster would be lost.
//!
//! - The entry being applied, and since when, are kept here. `RAFT.INFO`, which answers even while
//!   a script holds the main thread, shows them, and a watchdog thread logs an entry that has run
//!   for [`SLOW_AFTER`], naming its index, its command and the way out.
//! - The way out: every node shut down (`SHUTDOWN NOSAVE`, which Redis takes while a script runs)
//!   and started again with `skip-entry=N`. The entry at index N then answers an error instead of
//!   running, if it calls a script, and the node takes a snapshot right after it, so a later
//!   restart no longer replays it, with or without the argument. A node started without it runs
//!   the script and hangs again; it cannot diverge, since the script ends nowhere. A script that
//!   would have ended is another matter (skipped on some nodes, run on others, it leaves datasets
//!   that differ), which is why only script calls are skipped and the log says so loudly.

use crate::state;
use raft::{GetEntriesContext, Storage};
use raftis_core::command_entry::{Entry, EntryView};
use raftis_core::memory_limit;
use raftis_core::LogIndex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

/// How long an entry runs before the watchdog reports it (Redis' own busy-reply-threshold is 5 s).
pub const SLOW_AFTER: Duration = Duration::from_secs(10);
/// How often it reports the same entry again.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// `skip-entry`, 0 for none.
static SKIP: AtomicU64 = AtomicU64::new(0);
/// The entry at `SKIP` was skipped and no snapshot covers it yet.
static SKIPPED: AtomicBool = AtomicBool::new(false);
/// The index being applied, 0 for none, and when it began (coarse monotonic milliseconds).
static APPLYING: AtomicU64 = AtomicU64::new(0);
static SINCE_MS: AtomicU64 = AtomicU64::new(0);

/// At load: remembers `skip-entry` and starts the watchdog.
pub fn init(skip: Option<LogIndex>) {
    SKIP.store(skip.map_or(0, LogIndex::get), Ordering::Relaxed);
    if let Some(index) = skip {
        log::warn!("skip-entry={index}: the entry at index {index}, if it calls a script or a function, is not run on this node");
    }
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        let spawned = std::thread::Builder::new().name("raftis-watchdog".into()).spawn(watch);
        if let Err(e) = spawned {
            log::warn!("cannot start the watchdog thread, slow entries will not be reported: {e}");
        }
    });
}

/// The main thread begins applying the entry at `index`.
pub fn begin(index: LogIndex) {
    SINCE_MS.store(now_ms(), Ordering::Relaxed);
    APPLYING.store(index.get(), Ordering::Release);
}

/// The main thread is done applying for now.
pub fn end() {
    APPLYING.store(0, Ordering::Release);
}

/// The entry being applied and for how long, if one is.
pub fn applying() -> Option<(LogIndex, Duration)> {
    let index = APPLYING.load(Ordering::Acquire);
    let since = SINCE_MS.load(Ordering::Relaxed);
    // Read again: a new entry may have begun between the two loads.
    (index != 0 && APPLYING.load(Ordering::Acquire) == index)
        .then(|| (LogIndex(index), Duration::from_millis(now_ms().saturating_sub(since))))
}

/// Whether the entry at `index` must not run on this node (`skip-entry`). Only an entry that
/// calls a script or a function is skipped.
pub fn skips(index: LogIndex, view: &EntryView) -> bool {
    if SKIP.load(Ordering::Relaxed) != index.get() {
        return false;
    }
    let skip = calls_a_script(view);
    if skip {
        log::warn!("skip-entry={index}: not running the entry at index {index} ({}); its client, if any, gets an error", describe(view));
        SKIPPED.store(true, Ordering::Relaxed);
    } else {
        log::warn!("skip-entry={index}: the entry at index {index} ({}) calls no script and is applied as usual", describe(view));
    }
    skip
}

/// The reply to the client of a skipped entry.
pub fn skipped_error(index: LogIndex) -> String {
    format!("ERR not run: the log entry at index {index} was skipped at the operator's request (skip-entry={index})")
}

/// Whether the node should take a snapshot: it skipped an entry that its latest snapshot (at
/// the index `latest` gives) does not cover yet; one already running when the entry was skipped
/// may not.
pub fn snapshot_wanted(latest: impl FnOnce() -> LogIndex) -> bool {
    if !SKIPPED.load(Ordering::Relaxed) {
        return false;
    }
    let covered = latest().get() >= SKIP.load(Ordering::Relaxed);
    if covered {
        SKIPPED.store(false, Ordering::Relaxed);
    }
    !covered
}

/// The command an entry's `argv` runs, behind the memory limit's mark if it carries one.
fn command_name<'a>(argv: &[&'a [u8]]) -> Option<&'a [u8]> {
    memory_limit::split_mark(argv).1.first().copied()
}

fn calls_a_script(view: &EntryView) -> bool {
    let runs_lua = |argv: &[&[u8]]| command_name(argv).is_some_and(crate::scripts::runs_lua);
    match view {
        EntryView::Command(command) => runs_lua(&command.argv),
        EntryView::Transaction(commands) => commands.iter().any(|command| runs_lua(&command.argv)),
    }
}

/// `EVAL`, or `MULTI/EXEC of SET, FCALL`: what a log line can say about an entry.
fn describe(view: &EntryView) -> String {
    let name = |argv: &[&[u8]]| command_name(argv).map_or(String::from("?"), |n| String::from_utf8_lossy(n).to_uppercase());
    match view {
        EntryView::Command(command) => name(&command.argv),
        EntryView::Transaction(commands) => {
            let names: Vec<String> = commands.iter().map(|c| name(&c.argv)).collect();
            format!("MULTI/EXEC of {}", names.join(", "))
        }
    }
}

/// The watchdog: once a second, looks at what the main thread applies.
fn watch() {
    let mut reported: Option<(u64, std::time::Instant)> = None;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some((index, running)) = applying() else { continue };
        if running < SLOW_AFTER {
            continue;
        }
        let due = match reported {
            Some((i, at)) => i != index.get() || at.elapsed() >= REPORT_EVERY,
            None => true,
        };
        if due {
            report(index, running);
            reported = Some((index.get(), std::time::Instant::now()));
        }
    }
}

fn report(index: LogIndex, running: Duration) {
    let entry = state::get().store.entries(index.get(), index.get() + 1, None, GetEntriesContext::empty(false));
    let (what, script) = match entry.as_ref().ok().and_then(|e| e.first()).map(|e| Entry::decode(&e.data)) {
        Some(Ok(Entry { view, .. })) => (describe(&view), calls_a_script(&view)),
        _ => ("unreadable here".to_string(), false),
    };
    let mut line = format!(
        "the log entry at index {index} ({what}) has been running for {} s; no later entry is applied on this node until it ends",
        running.as_secs()
    );
    if script {
        line.push_str(&format!(
            ". If the script never ends and has written (SCRIPT KILL answers UNKILLABLE), shut every node down with \
             SHUTDOWN NOSAVE and start each again with the module argument skip-entry={index}"
        ));
    }
    log::warn!("{line}");
}

fn now_ms() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // The coarse clock costs no system call; its few milliseconds of resolution are plenty here.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftis_core::command_entry::CommandView;

    fn command<'a>(argv: &[&'a [u8]]) -> CommandView<'a> {
        CommandView { db: 0, argv: argv.to_vec() }
    }

    #[test]
    fn only_entries_that_call_a_script_can_be_skipped() {
        let eval = command(&[b"eval", b"while true do end", b"0"]);
        assert!(calls_a_script(&EntryView::Command(eval)));
        let marked = command(&[memory_limit::OVER_LIMIT, b"FCALL", b"f", b"0"]);
        assert!(calls_a_script(&EntryView::Command(marked)));
        assert!(!calls_a_script(&EntryView::Command(command(&[b"SET", b"k", b"eval"]))));
        let in_exec = vec![command(&[b"SET", b"k", b"v"]), command(&[b"EVAL", b"return 1", b"0"])];
        assert!(calls_a_script(&EntryView::Transaction(in_exec)));
        assert_eq!(describe(&EntryView::Transaction(vec![command(&[b"set"]), command(&[b"fcall_ro"])])), "MULTI/EXEC of SET, FCALL_RO");
    }
}
