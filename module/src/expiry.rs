//! Keys expire by the log's clock, not by each node's.
//!
//! Redis expires a key once its own clock passes the key's deadline: lazily, when a command looks
//! the key up, and in the background. Applying the log under that rule, the same committed write
//! could meet a live key on one node and an expired one on another, and the datasets would part
//! for good. `SET k 5 PX 1000` then `INCR k`, applied at once, leave no key once the second is
//! up; replayed a minute later (a restart, a follower catching up) the SET's key is already dead,
//! and the INCR creates `k = 1` with no expiry. The same happens, in milliseconds, to any write
//! on its way to a node when the key's deadline passes there.
//!
//! So every entry carries the moment the leader proposed it at ([`EntryTime`], [`stamp`]), and
//! every node applies it as of that moment:
//! - While a command of the log runs, Redis' own expiry is suspended: Redis is told it is
//!   loading, the state in which it expires nothing. Before the command, the keys it names are
//!   expired by the entry's time ([`expire_due`]), and so are the keys `SORT` reads through its
//!   `BY` and `GET` patterns. What a write meets is then the same on every node, however late it
//!   applies the entry.
//! - Outside the log, a node deletes a key only once its deadline is before the node's
//!   *horizon* ([`horizon`]): a time no entry it applies later happens before. Times never go
//!   back along the log (the leader raises an entry's time to the one ahead of it), so a
//!   follower's horizon is the time of the newest entry it applied. The leader's is its clock,
//!   once it has applied every entry in its log; the Raft loop then appends nothing that happens
//!   before that time (`Node::claim_time`). Before, its horizon is the newest applied time too.
//! - Redis' background expiry never runs by itself: the module runs it ([`before_sleep`]) with
//!   Redis' clock reading the horizon (`clock::behind`), so it deletes just what the log will
//!   never see alive again. An idle leader proposes an entry carrying only its clock once a
//!   second, so that its followers' horizon moves on without writes.
//! - A client's read deletes by Redis' clock only on a leader whose horizon is its clock: those
//!   go straight to Redis. Elsewhere the module serves the read ([`reading`]): the keys it names
//!   that the horizon has expired are deleted first, and the read runs with Redis' clients
//!   paused for writes, the state in which Redis answers that a key past its deadline is gone
//!   without deleting it (as a replica does).
//! - Snapshots are written and loaded with expiry suspended, so they keep keys whose deadline the
//!   clock has passed but the log has not.
//!
//! Telling Redis it is loading, pausing its clients and running its expiry cycle are not module
//! API: `startLoading`, `stopLoading`, `pauseClients`, `unpauseClients` and `activeExpireCycle`
//! are looked up at load, and the clock is Redis' own as `clock` hooks it. Without them, keys
//! expire by each node's clock, as plain Redis does (logged at load).

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

/// A leader that has proposed nothing for this long proposes an entry carrying only its clock:
/// its followers' horizon then moves on, and they expire keys, without writes. (Redis' own
/// master pings its replicas through the replication stream the same way.) It keeps an idle
/// leader's claims within their lead, too.
const CLOCK_EVERY: Duration = Duration::from_secs(1);
const _: () = assert!(CLOCK_EVERY.as_millis() < raftis_core::node::CLAIM_LEAD.0 as u128);

/// The latest time this node proposed or applied an entry at: stamps never go back, also across
/// a change of leader (a new leader has applied its predecessors' entries, or will before it
/// serves reads; the Raft loop raises an entry to the one ahead of it anyway).
static LATEST: AtomicI64 = AtomicI64::new(i64::MIN);
/// When this node last proposed an entry (its stamp), for [`propose_clock_if_idle`].
static PROPOSED_AT: AtomicI64 = AtomicI64::new(i64::MIN);
/// The time of the newest entry applied here (i64::MIN: none yet, or one without a time).
static APPLIED_AT: AtomicI64 = AtomicI64::new(i64::MIN);
/// The horizon the background expiry last ran to (i64::MIN: it has not run), for RAFT.INFO.
static EXPIRED_TO: AtomicI64 = AtomicI64::new(i64::MIN);
/// Whether Redis' own expiry is suspended right now (only touched on the main thread).
static SUSPENDED: AtomicBool = AtomicBool::new(false);
/// When [`before_sleep`] last ran the background expiry, and at what pace.
static CYCLES: Mutex<Cycles> = Mutex::new(Cycles { last: None, pace: None });
/// RAFT.STATS: clock entries this node proposed (they count among its `proposals`).
static CLOCK_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// `activeExpireCycle`'s slow kind (server.h).
const ACTIVE_EXPIRE_CYCLE_SLOW: c_int = 0;
/// `pauseClients`' purpose and kind (server.h): Raftis refuses `FAILOVER`, so the failover's
/// purpose is never Redis' own here, and a client's `CLIENT PAUSE` is left alone.
const PAUSE_DURING_FAILOVER: c_int = 2;
const CLIENT_PAUSE_WRITE: c_int = 1;

struct Hooks {
    start_loading: unsafe extern "C" fn(usize, c_int, c_int),
    stop_loading: unsafe extern "C" fn(c_int),
    active_expire_cycle: unsafe extern "C" fn(c_int),
    pause_clients: unsafe extern "C" fn(c_int, i64, c_int),
    unpause_clients: unsafe extern "C" fn(c_int),
}

static HOOKS: OnceLock<Result<Hooks, String>> = OnceLock::new();

fn hooks() -> Option<&'static Hooks> {
    HOOKS.get().and_then(|h| h.as_ref().ok())
}

/// At load, on the main thread, after `clock::init`: finds Redis' functions and stops Redis'
/// background expiry for good (the module runs it, see [`before_sleep`]). Returns how keys
/// expire here, for the log.
pub fn init(ctx: *mut RedisModuleCtx) -> String {
    let hooks = HOOKS.get_or_init(|| {
        crate::clock::available()?;
        Ok(unsafe {
            Hooks {
                start_loading: ffi::find_function("startLoading")?,
                stop_loading: ffi::find_function("stopLoading")?,
                active_expire_cycle: ffi::find_function("activeExpireCycle")?,
                pause_clients: ffi::find_function("pauseClients")?,
                unpause_clients: ffi::find_function("unpauseClients")?,
            }
        })
    });
    match hooks {
        Ok(_) => {
            set_redis_background_expiry(ctx, false);
            "keys expire by the log's clock: every node applies an entry as of the time it was proposed".into()
        }
        Err(why) => format!("{why}: keys expire by each node's own clock, and a node that replays old entries may differ"),
    }
}

/// The time a new entry happens at: this node's clock, but never before an entry proposed or
/// applied here.
pub fn stamp() -> EntryTime {
    let now = ffi::now_ms();
    let at = LATEST.fetch_max(now, Ordering::AcqRel).max(now);
    PROPOSED_AT.fetch_max(at, Ordering::AcqRel);
    EntryTime(at)
}

/// Runs `f`, commands of the log (or a snapshot load), with Redis' own expiry suspended. A read
/// for a client that runs meanwhile goes through [`reading`].
pub fn suspended<T>(f: impl FnOnce() -> T) -> T {
    let Some(hooks) = hooks() else { return f() };
    if SUSPENDED.load(Ordering::Acquire) {
        return f();
    }
    let _resume = Switch::suspend(hooks);
    f()
}

/// Runs `f` with Redis' own expiry working, also in the middle of applying.
fn resumed<T>(f: impl FnOnce() -> T) -> T {
    let Some(hooks) = hooks() else { return f() };
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

/// Runs `f` with Redis' clients paused for writes: Redis then answers that a key past its
/// deadline is gone, and keeps it. Nothing else runs meanwhile (this is the main thread), so no
/// client's command waits on the pause.
fn hiding<T>(hooks: &'static Hooks, f: impl FnOnce() -> T) -> T {
    struct Unpause(&'static Hooks);
    impl Drop for Unpause {
        fn drop(&mut self) {
            unsafe { (self.0.unpause_clients)(PAUSE_DURING_FAILOVER) };
        }
    }
    unsafe { (hooks.pause_clients)(PAUSE_DURING_FAILOVER, i64::MAX, CLIENT_PAUSE_WRITE) };
    let _unpause = Unpause(hooks);
    f()
}

/// Whether a client's read may go straight to Redis, which deletes the keys it finds expired by
/// its own clock: on a leader whose horizon is its clock. The time is claimed for the read.
pub fn reads_by_own_clock() -> bool {
    hooks().is_none() || claim_now().is_some()
}

/// Runs `f`, a client's read that the module serves (`argv`, its command), so that it deletes
/// nothing the log may still meet alive: on a leader whose horizon is its clock, as Redis
/// would; elsewhere the keys it names that the horizon has expired are deleted first, and the
/// read sees a key past its deadline as gone without deleting it. `RANDOMKEY` and scripts read
/// as of the horizon instead (a key past its deadline but not the horizon is still there): with
/// clients paused, Redis 7.0's `RANDOMKEY` spins for good on a database whose keys have all
/// passed their deadline.
pub fn reading<A: AsRef<[u8]>, T>(ctx: *mut RedisModuleCtx, argv: &[A], f: impl FnOnce() -> T) -> T {
    let Some(hooks) = hooks() else { return f() };
    if claim_now().is_some() {
        return resumed(f);
    }
    let argv: Vec<&[u8]> = argv.iter().map(AsRef::as_ref).collect();
    if let Some(at) = horizon_of_log() {
        suspended(|| expire_due(ctx, &argv, at));
    }
    if may_spin_while_paused(&argv) {
        return suspended(f);
    }
    resumed(|| hiding(hooks, f))
}

/// Commands that may call `RANDOMKEY`: itself, and scripts.
fn may_spin_while_paused(argv: &[&[u8]]) -> bool {
    const SPINS: &[&[u8]] = &[b"randomkey", b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"];
    argv.first().is_some_and(|name| SPINS.iter().any(|s| name.eq_ignore_ascii_case(s)))
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

/// Called before Redis sleeps: runs Redis' background expiry up to this node's horizon, at
/// Redis' pace (`hz` slow cycles a second; Redis' fast cycles in between are left out).
pub fn before_sleep(ctx: *mut RedisModuleCtx) {
    let Some(hooks) = hooks() else { return };
    let Some(pace) = CYCLES.lock().unwrap_or_else(|p| p.into_inner()).due(ctx) else { return };
    propose_clock_if_idle();
    let Some(horizon) = horizon() else { return };
    // Redis' cycle stops by the time that passes: a clock that reaches the horizon only once the
    // cycle's time is up, and stays there, lets it stop as it should and delete nothing later.
    let lead = pace.slow_limit + Duration::from_millis(1);
    crate::clock::behind(horizon.0, lead, || unsafe { (hooks.active_expire_cycle)(ACTIVE_EXPIRE_CYCLE_SLOW) });
    EXPIRED_TO.fetch_max(horizon.0, Ordering::AcqRel);
}

/// How often Redis runs its background expiry and for how long at most (expire.c).
#[derive(Clone, Copy)]
struct Pace {
    period: Duration,
    slow_limit: Duration,
}

/// The background expiry's last cycle, and its pace as last read.
struct Cycles {
    last: Option<Instant>,
    pace: Option<(Instant, Pace)>,
}

impl Cycles {
    /// The pace of a cycle due now (recorded as run), or None if the last one was too recent.
    fn due(&mut self, ctx: *mut RedisModuleCtx) -> Option<Pace> {
        let pace = self.pace(ctx);
        if self.last.is_some_and(|t| t.elapsed() < pace.period) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(pace)
    }

    /// From `hz` and `active-expire-effort`, read every few seconds.
    fn pace(&mut self, ctx: *mut RedisModuleCtx) -> Pace {
        match self.pace {
            Some((read_at, pace)) if read_at.elapsed() < Duration::from_secs(5) => pace,
            _ => {
                let config = |name: &str| ffi::config_get(ctx, name).and_then(|v| v.parse::<i64>().ok());
                let hz = config("hz").unwrap_or(10).clamp(1, 500);
                let effort = config("active-expire-effort").unwrap_or(1).clamp(1, 10) - 1;
                let slow_percent = 25 + 2 * effort;
                let pace = Pace {
                    period: Duration::from_micros((1_000_000 / hz) as u64),
                    slow_limit: Duration::from_micros((slow_percent * 1_000_000 / hz / 100).max(1) as u64),
                };
                self.pace = Some((Instant::now(), pace));
                pace
            }
        }
    }
}

/// On a ready leader that has proposed nothing for [`CLOCK_EVERY`]: proposes a clock entry
/// (nobody waits for it; a failure to commit it is retried a period later). A leader without
/// followers needs one too when it has entries its horizon waits for.
fn propose_clock_if_idle() {
    let s = state::get();
    let Some(node) = s.node() else { return };
    if !node.is_leader() {
        return;
    }
    let idle_ms = ffi::now_ms().saturating_sub(PROPOSED_AT.load(Ordering::Acquire));
    if idle_ms < CLOCK_EVERY.as_millis() as i64 {
        return;
    }
    let status = node.status();
    let alone = status.voters.len() + status.learners.len() < 2;
    if !status.leader_ready || (alone && claim_now().is_some()) {
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

/// The time before which this node may delete a key whose deadline has passed: no entry it
/// applies later happens before it. The leader's clock, claimed (see [`claim_now`]), or the time
/// of the newest entry applied here. None before any.
fn horizon() -> Option<EntryTime> {
    claim_now().or_else(horizon_of_log)
}

fn horizon_of_log() -> Option<EntryTime> {
    state::get().node()?;
    let at = APPLIED_AT.load(Ordering::Acquire);
    (at != i64::MIN).then_some(EntryTime(at))
}

/// On a leader that has applied every entry in its log: its clock, which no entry appended from
/// now on happens before (`Node::claim_time`).
fn claim_now() -> Option<EntryTime> {
    let s = state::get();
    let node = s.node()?;
    let applied = s.progress.applied();
    if !node.is_leader() || applied < node.leader_ready_index()? {
        return None;
    }
    let now = crate::clock::real_now_ms().max(LATEST.load(Ordering::Acquire));
    node.claim_time(EntryTime(now), applied)
}

/// A load that failed after [`init`]: Redis' background expiry runs again, as before the module.
pub fn resume(ctx: *mut RedisModuleCtx) {
    set_redis_background_expiry(ctx, true);
}

fn set_redis_background_expiry(ctx: *mut RedisModuleCtx, on: bool) {
    let flag = if on { "1" } else { "0" };
    ffi::free_call_reply(ffi::call_strs(ctx, &["DEBUG", "SET-ACTIVE-EXPIRE", flag]));
}

/// RAFT.INFO: the time of the newest entry applied here, and the horizon the background expiry
/// last ran to (both -1 before any).
pub fn info_fields() -> Vec<(String, String)> {
    let field = |at: i64| if at == i64::MIN { "-1".into() } else { at.to_string() };
    vec![
        ("applied_entry_time_ms".into(), field(APPLIED_AT.load(Ordering::Acquire))),
        ("expired_up_to_ms".into(), field(EXPIRED_TO.load(Ordering::Acquire))),
    ]
}
