//! Keys expire by the log's clock, not by each node's.
//!
//! Redis expires a key once its own clock passes the key's deadline: lazily, when a command looks
//! the key up, and in the background. Applying the log under that rule, the same committed write
//! could meet a live key on one node and an expired one on another, and the datasets would part
//! for good. `SET k 5 PX 1000` then `INCR k`, applied at once, leave no key once the second is
//! up; replayed a minute later (a restart, a follower catching up) the SET's key is already dead,
//! and the INCR creates `k = 1` with no expiry.
//!
//! So every entry carries the moment the leader proposed it at ([`EntryTime`], [`stamp`]), and
//! every node applies it as of that moment:
//! - While a command of the log runs, Redis' own expiry is suspended: Redis is told it is
//!   loading, the state in which it expires nothing. Before the command, the keys it names are
//!   expired by the entry's time ([`expire_due`]), and so are the keys `SORT` reads through its
//!   `BY` and `GET` patterns. What a write meets is then the same on every node, however late it
//!   applies the entry.
//! - Redis' background expiry, which deletes keys by the node's own clock, runs only while the
//!   node is current: the leader once it has applied all it committed, a follower while it
//!   applies entries proposed in the last 250 ms ([`before_sleep`]). A node that replays its log,
//!   catches up, or is cut off keeps every key until the log expires it. An idle leader proposes
//!   an entry carrying only its clock once a second, so that its followers stay current part of
//!   the time, and expire keys, without writes.
//! - Snapshots are written and loaded with expiry suspended, so they keep keys whose deadline the
//!   clock has passed but the log has not.
//!
//! - A node that is not current serves its clients' local reads (consistency `low`) through the
//!   module, with Redis' expiry suspended ([`as_of_log`]): a read must not delete a key either.
//!
//! What remains: a key can still be deleted by a node's own clock on a node that is current, by
//! the background expiry or by a read that finds it expired, while a write to it, proposed before
//! its deadline, is still on its way to that node. That is the time an entry takes from proposal
//! to apply, milliseconds, where before it was a restart or a partition.
//!
//! Telling Redis it is loading is not module API: `startLoading` and `stopLoading` are looked up
//! at load. Without them, keys expire by each node's clock, as before (logged at load).

use crate::apply::{ReplyTo, WriteWaiter};
use crate::ffi::{self, api, CommandKeys, RedisModuleCtx};
use crate::state;
use raftis_core::command_entry::{encode_clock, EntryTime};
use raftis_core::determinism;
use raftis_core::routing::KeyPositions;
use raftis_core::sort_patterns;
use redis_module::raw;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A follower counts as current while its newest applied entry is this recent.
const FRESH: Duration = Duration::from_millis(250);
/// How often [`before_sleep`] looks again.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// A leader that has proposed nothing for this long proposes an entry carrying only its clock:
/// its followers then apply a recent entry and run the background expiry for [`FRESH`] after it,
/// as they do under writes. (Redis' own master pings its replicas through the replication
/// stream the same way.)
const CLOCK_EVERY: Duration = Duration::from_secs(1);

/// The latest time this node proposed or applied an entry at: stamps never go back, also across
/// a change of leader (a new leader has applied its predecessors' entries, or will before it
/// serves reads).
static LATEST: AtomicI64 = AtomicI64::new(i64::MIN);
/// The time of the newest entry applied here (i64::MIN: none yet, or one without a time).
static APPLIED_AT: AtomicI64 = AtomicI64::new(i64::MIN);
/// Whether Redis' background expiry runs now. Only changed on the main thread.
static ACTIVE: AtomicBool = AtomicBool::new(true);
/// Whether Redis' own expiry is suspended right now (only touched on the main thread).
static SUSPENDED: AtomicBool = AtomicBool::new(false);
static LAST_CHECK: Mutex<Option<Instant>> = Mutex::new(None);
/// RAFT.STATS: clock entries this node proposed (they count among its `proposals`).
static CLOCK_ENTRIES: AtomicU64 = AtomicU64::new(0);

struct Hooks {
    start_loading: unsafe extern "C" fn(usize, c_int, c_int),
    stop_loading: unsafe extern "C" fn(c_int),
}

static HOOKS: OnceLock<Result<Hooks, String>> = OnceLock::new();

/// At load, on the main thread: finds Redis' loading switch and stops its background expiry
/// until this node is current. Returns how keys expire here, for the log.
pub fn init(ctx: *mut RedisModuleCtx) -> String {
    let hooks = HOOKS.get_or_init(|| {
        Ok(unsafe { Hooks { start_loading: ffi::find_function("startLoading")?, stop_loading: ffi::find_function("stopLoading")? } })
    });
    match hooks {
        Ok(_) => {
            set_active(ctx, false);
            "keys expire by the log's clock: every node applies an entry as of the time it was proposed".into()
        }
        Err(why) => format!("{why}: keys expire by each node's own clock, and a node that replays old entries may differ"),
    }
}

/// The time a new entry happens at: this node's clock, but never before an entry proposed or
/// applied here.
pub fn stamp() -> EntryTime {
    let now = ffi::now_ms();
    EntryTime(LATEST.fetch_max(now, Ordering::AcqRel).max(now))
}

/// Runs `f`, commands of the log (or a snapshot load), with Redis' own expiry suspended. A read
/// for a client that runs meanwhile goes through [`resumed`]: it must not see keys whose
/// deadline has passed.
pub fn suspended<T>(f: impl FnOnce() -> T) -> T {
    let Some(Ok(hooks)) = HOOKS.get() else { return f() };
    if SUSPENDED.load(Ordering::Acquire) {
        return f();
    }
    let _resume = Switch::suspend(hooks);
    f()
}

/// Runs `f`, a client's read, with Redis' own expiry working, also in the middle of applying.
pub fn resumed<T>(f: impl FnOnce() -> T) -> T {
    let Some(Ok(hooks)) = HOOKS.get() else { return f() };
    if !SUSPENDED.load(Ordering::Acquire) {
        return f();
    }
    let _suspend_again = Switch::resume(hooks);
    f()
}

/// Flips Redis' loading state, and flips it back when dropped.
struct Switch {
    hooks: &'static Hooks,
    suspended: bool,
}

impl Switch {
    fn suspend(hooks: &'static Hooks) -> Switch {
        unsafe { (hooks.start_loading)(0, 0, 0) };
        SUSPENDED.store(true, Ordering::Release);
        Switch { hooks, suspended: true }
    }

    fn resume(hooks: &'static Hooks) -> Switch {
        unsafe { (hooks.stop_loading)(1) };
        SUSPENDED.store(false, Ordering::Release);
        Switch { hooks, suspended: false }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if self.suspended {
            unsafe { (self.hooks.stop_loading)(1) };
        } else {
            unsafe { (self.hooks.start_loading)(0, 0, 0) };
        }
        SUSPENDED.store(!self.suspended, Ordering::Release);
    }
}

/// Whether this node expires keys by its own clock now: it is current (see [`before_sleep`]), or
/// Redis could not be told to stop.
pub fn by_own_clock() -> bool {
    !matches!(HOOKS.get(), Some(Ok(_))) || ACTIVE.load(Ordering::Acquire)
}

/// Runs `f`, a client's read that a node not current serves from its own data (at consistency
/// `low`), as of the log it has applied: the keys `argv` names that the newest applied entry's
/// time has expired are deleted first (every later entry finds them expired too), and no other
/// key is, whatever this node's clock says. A key deleted by it could still meet a write the
/// leader made before its deadline, which this node has not applied yet.
pub fn as_of_log<T>(ctx: *mut RedisModuleCtx, argv: &[&[u8]], f: impl FnOnce() -> T) -> T {
    if by_own_clock() {
        return f();
    }
    suspended(|| {
        let at = APPLIED_AT.load(Ordering::Acquire);
        if at != i64::MIN {
            expire_due(ctx, argv, EntryTime(at));
        }
        f()
    })
}

/// Records that an entry of time `at` was applied.
pub fn applied(at: Option<EntryTime>) {
    if let Some(EntryTime(ms)) = at {
        APPLIED_AT.store(ms, Ordering::Release);
        LATEST.fetch_max(ms, Ordering::AcqRel);
    }
}

/// After a command of the log: a command that gave its key a deadline the entry's time has passed
/// (`EXPIREAT k 1`, `GETEX k PXAT 1`, `EXPIRE k 0`) deletes the key now, as Redis does when it is
/// not loading. Redis is loading here (see the module comment), so it left the key with a deadline
/// in the past, which `DBSIZE` and `SCAN` would count until each node's background expiry found
/// it, and which a script's next call would still see (`EXPIRE k 0` leaves a deadline equal to the
/// entry's time, not past it). `SET` is left alone: Redis itself keeps a key set with a past `PXAT`
/// until something looks it up.
pub fn delete_if_already_expired(ctx: *mut RedisModuleCtx, argv: &[&[u8]], at: EntryTime) {
    if let Some(key) = deadline_key(argv) {
        delete_key_if_already_expired(ctx, key, at);
    }
}

/// The key `argv` may give a deadline that has already passed, for [`delete_if_already_expired`].
pub fn deadline_key<'a>(argv: &[&'a [u8]]) -> Option<&'a [u8]> {
    const SETS_A_DEADLINE: &[&[u8]] = &[b"expire", b"pexpire", b"expireat", b"pexpireat", b"getex", b"restore"];
    let name = argv.first()?;
    SETS_A_DEADLINE.iter().any(|n| name.eq_ignore_ascii_case(n)).then(|| argv.get(1).copied()).flatten()
}

pub fn delete_key_if_already_expired(ctx: *mut RedisModuleCtx, key: &[u8], at: EntryTime) {
    expire_named_if_due(ctx, key, at, Due::AtDeadline);
}

/// Deletes the keys the command `argv` names, in the selected database, whose deadline is before
/// `at`: the keys Redis would find expired if its clock read `at`. Run before each command of the
/// log. (A key a command leaves with a deadline already past is deleted right after it, see
/// [`delete_if_already_expired`], or, set by `SET ... PXAT`, found by the next command that names
/// it, whose time is no earlier, or by the background expiry.)
pub fn expire_due(ctx: *mut RedisModuleCtx, argv: &[&[u8]], at: EntryTime) {
    match state::get().key_positions(argv) {
        KeyPositions::At(positions) => {
            for i in positions {
                expire_named_if_due(ctx, argv[i], at, Due::PastDeadline);
            }
        }
        KeyPositions::AskRedis => {
            let keys = CommandKeys::of(ctx, argv);
            for name in keys.iter() {
                expire_if_due(ctx, name, at, Due::PastDeadline);
            }
        }
    }
    let patterns = sort_patterns::lookups(argv);
    if !patterns.is_empty() {
        expire_sort_lookups(ctx, argv[1], &patterns, at);
    }
    if let Some((db, key)) = determinism::key_in_another_database(argv) {
        ffi::in_db(ctx, db, || expire_named_if_due(ctx, key, at, Due::PastDeadline));
    }
}

/// `SORT key BY/GET pattern`: the keys the patterns read for each element of `key`, which Redis
/// does not count among the command's keys. Expiring a key that the sort then does not read (a
/// `LIMIT`, a `BY` that a later one overrides) changes nothing: it was expired as of `at` anyway.
fn expire_sort_lookups(ctx: *mut RedisModuleCtx, key: &[u8], patterns: &[&[u8]], at: EntryTime) {
    let (kind, _) = ffi::key_type_and_length(ctx, key);
    let read_all: &[&[u8]] = match kind as isize {
        raw::REDISMODULE_KEYTYPE_LIST => &[b"LRANGE", key, b"0", b"-1"],
        raw::REDISMODULE_KEYTYPE_SET => &[b"SMEMBERS", key],
        raw::REDISMODULE_KEYTYPE_ZSET => &[b"ZRANGE", key, b"0", b"-1"],
        _ => return, // nothing to sort, or a type SORT refuses
    };
    let elements = ffi::call(ctx, read_all, false);
    if elements.is_null() {
        return;
    }
    if ffi::is_array(elements) {
        for i in 0..ffi::reply_len(elements) {
            let element = ffi::reply_bytes(ffi::reply_element(elements, i));
            for pattern in patterns {
                if let Some(looked_up) = sort_patterns::key_for(pattern, element) {
                    expire_named_if_due(ctx, &looked_up, at, Due::PastDeadline);
                }
            }
        }
    }
    ffi::free_call_reply(elements);
}

/// When a key's deadline counts as passed, in Redis' two rules.
#[derive(Clone, Copy)]
enum Due {
    /// A key is expired once the clock is past its deadline (`keyIsExpired`).
    PastDeadline,
    /// A deadline being set is already passed when the clock has reached it (`checkAlreadyExpired`:
    /// `EXPIRE k 0` deletes the key).
    AtDeadline,
}

fn expire_named_if_due(ctx: *mut RedisModuleCtx, key: &[u8], at: EntryTime, rule: Due) {
    let name = ffi::new_string(key);
    expire_if_due(ctx, name, at, rule);
    ffi::free_string(name);
}

fn expire_if_due(ctx: *mut RedisModuleCtx, name: *mut ffi::RedisModuleString, at: EntryTime, rule: Due) {
    let key = unsafe { api!(RedisModule_OpenKey)(ctx, name, ffi::QUIET_PROBE) };
    if key.is_null() {
        return;
    }
    // A missing key has no deadline.
    let deadline = unsafe { api!(RedisModule_GetAbsExpire)(key) };
    let due = deadline != raw::REDISMODULE_NO_EXPIRE as i64
        && match rule {
            Due::PastDeadline => at.0 > deadline,
            Due::AtDeadline => at.0 >= deadline,
        };
    if due {
        unsafe { api!(RedisModule_DeleteKey)(key) };
    }
    unsafe { api!(RedisModule_CloseKey)(key) };
    if due {
        // What Redis does when it deletes the key itself: WATCH and client tracking learn the key
        // changed, and keyspace notifications say `expired` (or `del`, for a deadline set in the
        // past).
        let (class, event) = match rule {
            Due::PastDeadline => (raw::REDISMODULE_NOTIFY_EXPIRED, ffi::cstr("expired")),
            Due::AtDeadline => (raw::REDISMODULE_NOTIFY_GENERIC, ffi::cstr("del")),
        };
        unsafe {
            api!(RedisModule_SignalModifiedKey)(ctx, name);
            api!(RedisModule_NotifyKeyspaceEvent)(ctx, class as c_int, event.as_ptr(), name);
        }
    }
}

/// Called before Redis sleeps: lets Redis' background expiry run only while this node is current.
pub fn before_sleep(ctx: *mut RedisModuleCtx) {
    if !matches!(HOOKS.get(), Some(Ok(_))) {
        return;
    }
    {
        let mut last = LAST_CHECK.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
            return;
        }
        *last = Some(Instant::now());
    }
    propose_clock_if_idle();
    let current = is_current();
    if current != ACTIVE.load(Ordering::Acquire) {
        set_active(ctx, current);
    }
}

/// On a ready leader with followers that has proposed nothing for [`CLOCK_EVERY`]: proposes a
/// clock entry (nobody waits for it; a failure to commit it is retried a period later).
fn propose_clock_if_idle() {
    let s = state::get();
    let Some(node) = s.node() else { return };
    if !node.is_leader() {
        return;
    }
    let idle_ms = ffi::now_ms().saturating_sub(LATEST.load(Ordering::Acquire));
    if idle_ms < CLOCK_EVERY.as_millis() as i64 {
        return;
    }
    let status = node.status();
    if !status.leader_ready || status.voters.len() + status.learners.len() < 2 {
        return;
    }
    // Like every proposal here: a transaction EXEC just built, stamped earlier, goes first.
    crate::transaction::flush();
    let waiter = WriteWaiter { reply_to: ReplyTo::Nobody, resp3: false };
    node.propose(encode_clock(stamp()), waiter, Instant::now() + s.write_timeout());
    CLOCK_ENTRIES.fetch_add(1, Ordering::Relaxed);
}

pub fn clock_entries_proposed() -> u64 {
    CLOCK_ENTRIES.load(Ordering::Relaxed)
}

/// Whether this node's dataset is as recent as the log: it is the leader and has applied all it
/// committed, or it follows a leader and has applied an entry proposed within [`FRESH`]. Only
/// then can Redis' clock delete a key without the log disagreeing later, but for writes still on
/// their way. (A follower cannot tell from a heartbeat that it has every committed entry: the
/// commit index a leader sends a follower is capped at what that follower has.)
fn is_current() -> bool {
    let s = state::get();
    let Some(node) = s.node() else { return false };
    let status = node.status();
    if status.leader.is_none() || status.fatal.is_some() {
        return false;
    }
    if status.is_leader() && s.progress.applied() >= status.commit {
        return true;
    }
    let applied_at = APPLIED_AT.load(Ordering::Acquire);
    ffi::now_ms().saturating_sub(applied_at) <= FRESH.as_millis() as i64
}

/// A load that failed after [`init`]: Redis' background expiry runs again, as before the module.
pub fn resume(ctx: *mut RedisModuleCtx) {
    set_active(ctx, true);
}

fn set_active(ctx: *mut RedisModuleCtx, on: bool) {
    let flag = if on { "1" } else { "0" };
    ffi::free_call_reply(ffi::call_strs(ctx, &["DEBUG", "SET-ACTIVE-EXPIRE", flag]));
    ACTIVE.store(on, Ordering::Release);
    // At debug level: a follower of an idle cluster switches twice a second (see CLOCK_EVERY).
    log::debug!("Redis' background expiry {}", if on { "resumed: this node is current" } else { "paused until this node is current" });
}

/// RAFT.INFO: the time of the newest entry applied here, and whether Redis' background expiry runs.
pub fn info_fields() -> Vec<(String, String)> {
    let applied_at = APPLIED_AT.load(Ordering::Acquire);
    vec![
        ("applied_entry_time_ms".into(), if applied_at == i64::MIN { "-1".into() } else { applied_at.to_string() }),
        ("background_expiry".into(), if ACTIVE.load(Ordering::Acquire) { "on" } else { "off" }.into()),
    ]
}
