//! `RAFT._BLOCK <command ...>`: blocking pops (BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN,
//! BZPOPMAX, BZMPOP), served by the leader.
//!
//! Redis pops for a blocked client the moment a push fills one of its keys. Here a pop must be a
//! log entry, so the leader blocks the client and proposes its command as an *attempt*: applied
//! on every node, where a module's call never blocks, it pops if it can and answers null if every
//! key is empty. A null leaves the client waiting. After every batch of entries the leader has
//! applied, it looks at the keys its waiting clients want and proposes one more attempt for as
//! many of them, oldest first, as the keys hold elements ([`after_apply`]). The attempt that pops
//! answers the client, with the reply Redis produced.
//!
//! An attempt only pops for a client that still waits. A client whose timeout comes while an
//! attempt is in flight gets that attempt's outcome: the element, a little late, if it popped
//! one, rather than the element vanishing; a null otherwise. A client that disconnects (or is
//! unblocked by `CLIENT UNBLOCK`) with an attempt in flight loses what the attempt pops, as any
//! write's reply is lost with its connection; otherwise its pop is simply forgotten. A leader
//! that loses leadership answers its waiting clients `-MOVED` (as Redis Cluster does when a
//! blocked client's slot moves). Inside MULTI the pops never reach here: they run once, without
//! blocking, as in Redis (scripts may not call them at all, Redis' own rule).

use crate::apply::{ReplyTo, WriteWaiter};
use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleString};
use crate::state::{self, RaftNode};
use raftis_core::blocking::{self as shape, BlockingPop, Waits};
use raftis_core::command_entry::encode_command;
use raftis_core::determinism::Args;
use raftis_core::routing::Route;
use redis_module::raw::RedisModuleTimerID;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BLOCK_COMMAND: &str = "raft._block";

/// Clients waiting in a blocking pop, oldest first. Changed on the main thread, and on the Raft
/// thread when an attempt's proposal fails.
static WAITING: Mutex<Waiting> = Mutex::new(Waiting { pops: BTreeMap::new(), next: 1, stale_timers: Vec::new() });
/// How many: the apply path's cheap check.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Timers of pops that are over wait to be stopped (see [`Waiting::stale_timers`]).
static STALE_TIMERS: AtomicBool = AtomicBool::new(false);
/// RAFT.STATS: attempts proposed, the first of each pop included.
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// How much longer than its own timeout Redis' backstop timer lets a client wait: the attempt in
/// flight when the timeout came may still be answered by the log.
const BACKSTOP: Duration = Duration::from_secs(2);

struct Waiting {
    /// By id: ids grow, so this is the order the clients came in.
    pops: BTreeMap<u64, Pop>,
    next: u64,
    /// The timeout timers of pops answered before their timeout. Redis' timers may only be
    /// stopped on its main thread, and a pop can end on the Raft thread (a failed attempt): they
    /// are stopped before Redis next sleeps, so that a client popping in a loop with a long
    /// timeout does not leave a timer behind each time.
    stale_timers: Vec<RedisModuleTimerID>,
}

struct Pop {
    blocked: Blocked,
    argv: Vec<Vec<u8>>,
    db: u32,
    resp3: bool,
    /// The keys it pops from.
    keys: Vec<Vec<u8>>,
    waits: Waits,
    /// How long it may wait, as read from its command (an error if it could not be read).
    timeout: Result<Option<Duration>, String>,
    arrived: Instant,
    /// Its timeout's timer, once its first attempt found nothing, if it has a timeout.
    timer: Option<RedisModuleTimerID>,
    /// Its first attempt is in flight.
    first: bool,
    /// An attempt is in the log, not applied yet.
    in_flight: bool,
    /// Its timeout came, or its client went, while an attempt was in flight: it is answered (or
    /// forgotten) once the attempt is, unless the attempt pops.
    over: bool,
}

/// RAFT.STATS: clients waiting in a blocking pop now, and attempts proposed so far.
pub fn stats() -> [(&'static str, u64); 2] {
    [("blocked_pops_waiting", COUNT.load(Ordering::Relaxed) as u64), ("blocked_pop_attempts", ATTEMPTS.load(Ordering::Relaxed))]
}

/// `RAFT._BLOCK <command ...>`, which the filter makes of a blocking pop.
pub fn block(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let command = &args[1..];
    let s = state::get();
    match s.route(command) {
        Route::BlockingPop => {}
        Route::Refuse(e) => return Err(e),
        _ => return Err("ERR RAFT._BLOCK only takes blocking pops (it is used internally)".into()),
    }
    if crate::transaction::in_exec(ctx) {
        // Redis runs a blocking command of a transaction without blocking: a plain write.
        return crate::write::write(ctx, args);
    }
    let node = s.serving_node()?;
    if !node.is_leader() {
        // Also with follower-proxy: a pop may wait for ever, longer than a forwarded request.
        return Err(state::redirect(&node.status()));
    }
    let Some(pop) = BlockingPop::of(command) else {
        return Err("ERR wrong number of arguments for a blocking pop".into());
    };
    // Errors, a bad timeout's included, are Redis' to answer, in its own order: the first
    // attempt answers them. The timeout counts from now, but only matters once it found nothing.
    let timeout = shape::parse_timeout(command[pop.timeout]);
    let backstop = match &timeout {
        Ok(None) => Duration::ZERO,
        Ok(Some(t)) => *t + s.write_timeout() + BACKSTOP,
        Err(_) => s.write_timeout() + BACKSTOP,
    };
    let blocked = Blocked::with_timeout_reply(ctx, backstop, Some(timed_out_by_redis));
    unsafe { api!(RedisModule_SetDisconnectCallback)(blocked.handle(), Some(disconnected)) };
    let waiter = Pop {
        blocked,
        argv: ffi::owned_args(command),
        db: ffi::selected_db(ctx),
        resp3: ffi::client_is_resp3(ctx),
        keys: pop.keys.iter().map(|&i| command[i].to_vec()).collect(),
        waits: pop.waits,
        timeout,
        arrived: Instant::now(),
        timer: None,
        first: true,
        in_flight: true,
        over: false,
    };
    let attempt = Attempt { argv: waiter.argv.clone(), db: waiter.db, resp3: waiter.resp3 };
    let mut w = lock();
    let id = w.next;
    w.next += 1;
    w.pops.insert(id, waiter);
    COUNT.store(w.pops.len(), Ordering::Relaxed);
    drop(w);
    propose(&node, id, attempt);
    Ok(())
}

/// What an attempt proposes.
struct Attempt {
    argv: Vec<Vec<u8>>,
    db: u32,
    resp3: bool,
}

fn propose(node: &RaftNode, id: u64, attempt: Attempt) {
    let mut argv: Args = attempt.argv.iter().map(|a| Cow::Borrowed(a.as_slice())).collect();
    let at = crate::expiry::stamp();
    if let Err(e) = crate::write::prepare(attempt.db, &mut argv, at) {
        return attempted(id, Outcome::Error(e));
    }
    let entry = encode_command(Some(at), attempt.db, &argv);
    // A transaction EXEC has just built goes into the log first.
    crate::transaction::flush();
    ATTEMPTS.fetch_add(1, Ordering::Relaxed);
    let waiter = WriteWaiter { reply_to: ReplyTo::Pop(id), resp3: attempt.resp3 };
    node.propose(entry, waiter, Instant::now() + state::get().write_timeout());
}

/// An attempt of the pop `id` was applied (on the main thread) or failed (on any thread).
pub fn attempted(id: u64, outcome: Outcome) {
    let mut w = lock();
    let Some(pop) = w.pops.get_mut(&id) else {
        drop(w);
        return crate::apply::discard(outcome);
    };
    pop.in_flight = false;
    let first = std::mem::replace(&mut pop.first, false);
    let answer = match outcome {
        Outcome::Call(reply) if is_null(reply) => {
            ffi::free_call_reply(reply);
            match (pop.over, first) {
                (true, _) => Outcome::NullArray,
                // Still waiting; the batch this attempt came in is looked at next (see
                // `after_apply`).
                (false, false) => return,
                (false, true) => match start_timer(id, pop) {
                    Ok(()) => return,
                    Err(answer) => answer,
                },
            }
        }
        popped_or_failed => popped_or_failed,
    };
    let pop = remove(&mut w, id);
    drop(w);
    if let Some(pop) = pop {
        pop.blocked.finish(answer);
    }
}

/// The first attempt of the pop `id` found nothing (on the main thread): it now waits, until its
/// timeout if it has one. Errs with the answer if it may not wait.
fn start_timer(id: u64, pop: &mut Pop) -> Result<(), Outcome> {
    // Redis accepted a timeout this module cannot read (a hexadecimal float): nothing was popped.
    let timeout = pop.timeout.clone().map_err(Outcome::Error)?;
    let Some(timeout) = timeout else { return Ok(()) };
    let left = (pop.arrived + timeout).saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Outcome::NullArray);
    }
    let ms = left.as_millis().clamp(1, i64::MAX as u128) as i64;
    let ctx = state::get().main_thread_ctx();
    pop.timer = Some(unsafe { api!(RedisModule_CreateTimer)(ctx, ms, Some(deadline_passed), id as usize as *mut c_void) });
    Ok(())
}

/// After the main thread applied a batch of entries: proposes an attempt for each waiting client,
/// oldest first, whose keys hold an element no older client's attempt is already after; answers
/// the clients of a leader that is one no more.
pub fn after_apply(ctx: *mut RedisModuleCtx) {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let Some(node) = state::get().node() else { return };
    if !node.is_leader() {
        return answer_if_deposed();
    }
    let mut attempts = Vec::new();
    let mut w = lock();
    // Elements left in each key once the attempts already in flight have taken theirs.
    let mut left: FxHashMap<(u32, &[u8]), usize> = FxHashMap::default();
    for (id, pop) in w.pops.iter_mut() {
        if pop.over {
            continue;
        }
        let ready = pop.keys.iter().find(|key| {
            *left.entry((pop.db, key.as_slice())).or_insert_with(|| elements(ctx, pop.db, key, pop.waits)) > 0
        });
        let Some(key) = ready else { continue };
        *left.get_mut(&(pop.db, key.as_slice())).expect("counted above") -= 1;
        if !pop.in_flight {
            pop.in_flight = true;
            attempts.push((*id, Attempt { argv: pop.argv.clone(), db: pop.db, resp3: pop.resp3 }));
        }
    }
    drop(w);
    for (id, attempt) in attempts {
        propose(&node, id, attempt);
    }
}

/// Before Redis sleeps: clients waiting on a leader that lost its leadership get `-MOVED` (or
/// `-CLUSTERDOWN`); those with an attempt in flight get its outcome first.
pub fn before_sleep() {
    if COUNT.load(Ordering::Relaxed) > 0 {
        answer_if_deposed();
    }
    if STALE_TIMERS.swap(false, Ordering::AcqRel) {
        let timers = std::mem::take(&mut lock().stale_timers);
        let ctx = state::get().main_thread_ctx();
        for timer in timers {
            // One that has fired already is simply not found.
            unsafe { api!(RedisModule_StopTimer)(ctx, timer, std::ptr::null_mut()) };
        }
    }
}

/// A leader that lost its leadership and got it back meanwhile keeps its waiting clients: an
/// attempt is an entry like any other, whichever term it is proposed in.
fn answer_if_deposed() {
    let Some(node) = state::get().node() else { return };
    if node.is_leader() {
        return;
    }
    let mut w = lock();
    let deposed: Vec<u64> = w.pops.iter().filter(|(_, p)| !p.in_flight).map(|(id, _)| *id).collect();
    if deposed.is_empty() {
        return;
    }
    let pops: Vec<Pop> = deposed.into_iter().filter_map(|id| remove(&mut w, id)).collect();
    drop(w);
    let error = state::redirect(&node.status());
    for pop in pops {
        pop.blocked.finish(Outcome::Error(error.clone()));
    }
}

/// How many elements `key` holds for a pop that waits for `waits` (0: missing, or another type).
fn elements(ctx: *mut RedisModuleCtx, db: u32, key: &[u8], waits: Waits) -> usize {
    if !ffi::select_db(ctx, db) {
        return 0;
    }
    // By the log's clock, as the attempt will see it: a key the node's clock has passed but the
    // log has not is still there (and the attempt expires it first, on every node).
    let (kind, len) = crate::expiry::suspended(|| ffi::key_type_and_length(ctx, key));
    let wanted = match waits {
        Waits::List => redis_module::raw::REDISMODULE_KEYTYPE_LIST,
        Waits::SortedSet => redis_module::raw::REDISMODULE_KEYTYPE_ZSET,
    };
    if kind as isize == wanted as isize {
        len
    } else {
        0
    }
}

/// Redis' timer for a pop's own timeout.
extern "C" fn deadline_passed(_ctx: *mut RedisModuleCtx, data: *mut c_void) {
    let id = data as usize as u64;
    let run = || give_up(|pops| pops.get(&id).map(|_| id), Outcome::NullArray);
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking pop's timer");
    }
}

/// The client of a waiting pop disconnected (or `CLIENT UNBLOCK ... ERROR`): it is forgotten, and
/// so is the pop, unless an attempt is in flight.
extern "C" fn disconnected(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    let run = || give_up(|pops| by_handle(pops, bc), Outcome::Error("ERR client disconnected".into()));
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking pop's disconnect callback");
    }
}

/// Redis' own timeout for a pop's client: its backstop, or `CLIENT UNBLOCK` (with TIMEOUT). It
/// answers as a timeout of the pop does (a null array, whichever the pop, as in Redis); the pop
/// itself is over.
extern "C" fn timed_out_by_redis(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    let run = || give_up(|pops| by_handle(pops, bc), Outcome::Error("ERR timed out".into()));
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking pop's timeout callback");
    }
    unsafe { api!(RedisModule_ReplyWithNullArray)(ctx) }
}

/// Ends the pop `find` picks: at once, with `answer`, if no attempt is in flight; otherwise once
/// the attempt is applied, unless it pops.
fn give_up(find: impl FnOnce(&BTreeMap<u64, Pop>) -> Option<u64>, answer: Outcome) {
    let mut w = lock();
    let Some(id) = find(&w.pops) else { return };
    let Some(pop) = w.pops.get_mut(&id) else { return };
    if pop.in_flight {
        pop.over = true;
        return;
    }
    let pop = remove(&mut w, id);
    drop(w);
    if let Some(pop) = pop {
        pop.blocked.finish(answer);
    }
}

fn by_handle(pops: &BTreeMap<u64, Pop>, bc: *mut RedisModuleBlockedClient) -> Option<u64> {
    pops.iter().find(|(_, p)| p.blocked.handle() == bc).map(|(id, _)| *id)
}

fn remove(w: &mut Waiting, id: u64) -> Option<Pop> {
    let pop = w.pops.remove(&id);
    COUNT.store(w.pops.len(), Ordering::Relaxed);
    if let Some(timer) = pop.as_ref().and_then(|p| p.timer) {
        w.stale_timers.push(timer);
        STALE_TIMERS.store(true, Ordering::Release);
    }
    pop
}

fn is_null(reply: *mut ffi::RedisModuleCallReply) -> bool {
    !reply.is_null() && ffi::reply_type(reply) == redis_module::raw::REDISMODULE_REPLY_NULL as c_int
}

fn lock() -> std::sync::MutexGuard<'static, Waiting> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}
