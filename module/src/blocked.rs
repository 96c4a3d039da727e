//! Blocked clients: a client waiting for the cluster. Whatever thread finishes the work calls
//! [`Blocked::finish`]; Redis then runs [`reply_callback`] on its main thread to send the reply.
//! A `Blocked` that is dropped unfinished still unblocks its client with an error, and every
//! client is blocked with a timeout, so none waits forever (but one whose command asked to).
//!
//! A backstop timeout is this module's own timer, never Redis': Redis 7.0 runs the timeouts of
//! blocked clients before it takes the answers modules gave, and a client whose timeout passed
//! in between (the main thread held up by a long script, say) would get no reply at all. Redis
//! only hears of `CLIENT UNBLOCK`, through the callback each kind of wait gives.

use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx, RedisModuleString};
use crate::stale_timers::StaleTimer;
use raftis_core::forward::{Abandoned, ForwardDone};
use redis_module::raw::RedisModuleTimerID;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The reply a blocked client will get.
pub enum Outcome {
    /// A reply produced by Redis itself (forwarded byte for byte).
    Call(*mut RedisModuleCallReply),
    Error(String),
    Simple(String),
    Integer(i64),
    /// Two integers (e.g. a snapshot's index and size).
    Pair(i64, i64),
    /// Run this command for the client now, on the main thread, and send its reply (a read whose
    /// consistency conditions were just met).
    Run {
        argv: Vec<Vec<u8>>,
        resp3: bool,
    },
    /// A reply the leader produced for a forwarded command, as raw RESP (follower proxy).
    Relay(Vec<u8>),
    /// A null array: `*-1` in RESP2, `_` in RESP3 (what Redis answers a blocking pop that timed out).
    NullArray,
    /// Run this on the main thread, as the client is answered, then answer `+OK` (a step that
    /// touches Redis' own state for the client, decided on another thread).
    ThenOk(std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>),
}

/// Who waits for a long-running command's answer (a blocking command, WAIT): a client of this
/// node, blocked, or a follower's (follower proxy), whose answer goes back over the side port, raw.
pub enum Requester {
    Here(Blocked),
    /// The follower hangs up if its client stops waiting ([`Abandoned`]).
    Forwarded {
        done: ForwardDone,
        abandoned: Abandoned,
    },
}

impl Requester {
    /// Answers it; a forwarded answer in the client's protocol (`resp3`).
    pub fn finish(self, outcome: Outcome, resp3: bool) {
        let done = match self {
            Requester::Here(blocked) => return blocked.finish(outcome),
            Requester::Forwarded { done, .. } => done,
        };
        done(match outcome {
            Outcome::NullArray => Ok(if resp3 { b"_\r\n".to_vec() } else { b"*-1\r\n".to_vec() }),
            Outcome::Integer(n) => Ok(format!(":{n}\r\n").into_bytes()),
            other => crate::apply::raw_reply(other),
        })
    }

    /// The follower it waits for hung up.
    pub fn is_abandoned(&self) -> bool {
        matches!(self, Requester::Forwarded { abandoned, .. } if abandoned.is_set())
    }

    /// Whether it is the client Redis knows by `bc`. One its backstop answered is not: Redis
    /// frees that handle and may give it to a later client. (While its backstop is answering,
    /// it still is: the handle is freed only once that answer is handed to Redis.)
    pub fn is(&self, bc: *mut RedisModuleBlockedClient) -> bool {
        matches!(self, Requester::Here(blocked) if blocked.handle() == bc
            && (!blocked.is_answered() || ANSWERING_BACKSTOP.with(|a| a.get()) == bc))
    }
}

/// Another module's `RedisModule_Call` may not wait: Redis asserts that its client never blocks,
/// and aborts the server. Checked before blocking a client. (Inside `EXEC` and scripts, which
/// may not block either, the handlers answer at once by themselves.)
pub fn refuse_if_caller_cannot_wait(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    if ffi::caller_may_not_block(ctx) {
        return Err("ERR Raftis cannot serve this command to another module's RedisModule_Call: its answer waits \
                    for the cluster, and Redis does not let such a caller wait"
            .into());
    }
    Ok(())
}

pub struct Blocked {
    bc: *mut RedisModuleBlockedClient,
    /// With a backstop: set by whichever answers the client first, the work or the backstop's
    /// timer (the other then leaves the handle alone: Redis may have freed it); and the timer
    /// and its data, stopped once the work answered first (see `stale_timers`).
    backstop: Option<(Arc<AtomicBool>, RedisModuleTimerID, usize)>,
    /// When the backstop passes (None: no backstop).
    backstop_at: Option<Instant>,
}

thread_local! {
    /// The client whose backstop is working out its answer, on the main thread.
    static ANSWERING_BACKSTOP: std::cell::Cell<*mut RedisModuleBlockedClient> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Backstop timers set and not yet fired or stopped: RAFT.STATS.
static BACKSTOPS: AtomicUsize = AtomicUsize::new(0);

/// RAFT.STATS: backstop timers of blocked clients, pending.
pub fn backstops() -> usize {
    BACKSTOPS.load(Ordering::Relaxed)
}

// Redis documents blocked-client handles as usable from any thread until unblocked.
unsafe impl Send for Blocked {}

/// What the backstop's timer holds.
struct Backstop {
    bc: *mut RedisModuleBlockedClient,
    answered: Arc<AtomicBool>,
    /// Ends the wait and says what the client gets.
    answer: fn(*mut RedisModuleBlockedClient) -> Outcome,
}

impl Blocked {
    /// Blocks the client of `ctx` (on the main thread). `timeout` is a backstop: the work
    /// normally finishes (or fails with its own error) before it. (`CLIENT UNBLOCK` ends the wait
    /// as a timeout.)
    pub fn new(ctx: *mut RedisModuleCtx, timeout: Duration) -> Blocked {
        Blocked::with_backstop(ctx, timeout, Some(timeout_callback), |_| Outcome::Error(TIMED_OUT.into()))
    }

    /// Blocks the client of `ctx` (on the main thread). Once `backstop` has passed (zero, or
    /// past a century: never, for a client that asked to wait for ever), `on_backstop` ends the
    /// wait and says what the client gets, unless it was answered; Redis runs `on_unblock` for
    /// `CLIENT UNBLOCK`.
    pub fn with_backstop(
        ctx: *mut RedisModuleCtx,
        backstop: Duration,
        on_unblock: redis_module::raw::RedisModuleCmdFunc,
        on_backstop: fn(*mut RedisModuleBlockedClient) -> Outcome,
    ) -> Blocked {
        let bc = unsafe { api!(RedisModule_BlockClient)(ctx, Some(reply_callback), on_unblock, Some(free_outcome), 0) };
        crate::reply_arranged::mark();
        let Some(ms) = ffi::timer_period(backstop).filter(|_| !backstop.is_zero()) else {
            return Blocked { bc, backstop: None, backstop_at: None };
        };
        let answered = Arc::new(AtomicBool::new(false));
        let timer = Box::new(Backstop { bc, answered: answered.clone(), answer: on_backstop });
        let data = Box::into_raw(timer) as *mut c_void;
        let id = unsafe { api!(RedisModule_CreateTimer)(ctx, ms, Some(backstop_fired), data) };
        BACKSTOPS.fetch_add(1, Ordering::Relaxed);
        Blocked { bc, backstop: Some((answered, id, data as usize)), backstop_at: Some(Instant::now() + backstop) }
    }

    /// Has Redis call `callback` if the client disconnects while blocked (or `CLIENT UNBLOCK ...
    /// ERROR` ends its wait); it replaces any callback set before.
    pub fn on_disconnect(&self, callback: extern "C" fn(*mut RedisModuleCtx, *mut RedisModuleBlockedClient)) {
        unsafe { api!(RedisModule_SetDisconnectCallback)(self.bc, Some(callback)) };
    }

    /// Whether the client was answered already (by its backstop: `finish` consumes it).
    pub fn is_answered(&self) -> bool {
        self.backstop.as_ref().is_some_and(|(answered, _, _)| answered.load(Ordering::Acquire))
    }

    /// When its backstop passes, if it has one: work handed on must answer before.
    pub fn backstop_at(&self) -> Option<Instant> {
        self.backstop_at
    }

    /// Redis' handle of the blocked client, to recognise it in Redis' callbacks.
    pub fn handle(&self) -> *mut RedisModuleBlockedClient {
        self.bc
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.answer(outcome);
    }

    /// Unblocks the client with `outcome`, unless the backstop already answered it.
    fn answer(&mut self, outcome: Outcome) {
        let bc = std::mem::replace(&mut self.bc, std::ptr::null_mut());
        if bc.is_null() {
            return;
        }
        if let Some((answered, id, data)) = &self.backstop {
            if answered.swap(true, Ordering::AcqRel) {
                if let Outcome::Call(reply) = outcome {
                    ffi::free_call_reply(reply);
                }
                return;
            }
            crate::stale_timers::stop_later(StaleTimer { id: *id, data: *data as *mut c_void, stopped: backstop_stopped });
        }
        unblock(bc, outcome);
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        self.answer(Outcome::Error("ERR internal error: request abandoned".into()));
    }
}

/// A backstop timer stopped before it fired: its data.
fn backstop_stopped(data: *mut c_void) {
    drop(unsafe { Box::from_raw(data as *mut Backstop) });
    BACKSTOPS.fetch_sub(1, Ordering::Relaxed);
}

/// A client's backstop has passed: unless it was answered, its wait ends (whatever answer the
/// work still gives is dropped) with what the backstop says.
extern "C" fn backstop_fired(_ctx: *mut RedisModuleCtx, data: *mut c_void) {
    let backstop = unsafe { Box::from_raw(data as *mut Backstop) };
    BACKSTOPS.fetch_sub(1, Ordering::Relaxed);
    if backstop.answered.swap(true, Ordering::AcqRel) {
        return;
    }
    let answer = backstop.answer;
    ANSWERING_BACKSTOP.with(|a| a.set(backstop.bc));
    let outcome = std::panic::catch_unwind(|| answer(backstop.bc)).unwrap_or_else(|_| {
        log::error!("panic in a blocked client's backstop");
        Outcome::Error(TIMED_OUT.into())
    });
    ANSWERING_BACKSTOP.with(|a| a.set(std::ptr::null_mut()));
    unblock(backstop.bc, outcome);
}

const TIMED_OUT: &str = "TIMEOUT the cluster did not answer in time; the request may or may not have taken effect";

fn unblock(bc: *mut RedisModuleBlockedClient, outcome: Outcome) {
    let privdata = Box::into_raw(Box::new(outcome)) as *mut c_void;
    unsafe { api!(RedisModule_UnblockClient)(bc, privdata) };
}

extern "C" fn reply_callback(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
    let privdata = unsafe { api!(RedisModule_GetBlockedClientPrivateData)(ctx) } as *const Outcome;
    if privdata.is_null() {
        return ffi::reply_error(ctx, "ERR internal error: no reply");
    }
    let outcome = unsafe { &*privdata };
    // Redis calls this; a panic must not unwind into it. One in the middle of an array already
    // begun leaves that client's reply short, which is still better than a server abort.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let replied = reply_with(ctx, outcome);
        // A read's value, run now or relayed from the leader, is what the client caches.
        let ran_a_read = matches!(outcome, Outcome::Run { .. } | Outcome::Relay(_))
            && argc > 0
            && ffi::string_bytes(unsafe { *argv }).eq_ignore_ascii_case(crate::read::READ_COMMAND.as_bytes());
        if ran_a_read {
            crate::tracking::remember_read_keys(ctx);
        }
        replied
    }))
    .unwrap_or_else(|_| {
        log::error!("panic while replying to an unblocked client");
        ffi::reply_error(ctx, "ERR internal error while replying")
    })
}

fn reply_with(ctx: *mut RedisModuleCtx, outcome: &Outcome) -> c_int {
    match outcome {
        Outcome::Call(reply) if !reply.is_null() => ffi::reply_call_reply(ctx, *reply),
        Outcome::Call(_) => ffi::reply_error(ctx, "ERR command could not be executed"),
        Outcome::Error(e) => ffi::reply_error(ctx, e),
        Outcome::Simple(s) => ffi::reply_simple(ctx, s),
        Outcome::Integer(i) => ffi::reply_integer(ctx, *i),
        Outcome::Pair(a, b) => {
            ffi::reply_array(ctx, 2);
            ffi::reply_integer(ctx, *a);
            ffi::reply_integer(ctx, *b)
        }
        Outcome::Relay(raw) => crate::forward::relay(ctx, raw),
        Outcome::NullArray => unsafe { api!(RedisModule_ReplyWithNullArray)(ctx) },
        Outcome::ThenOk(step) => {
            if let Some(step) = step.lock().unwrap_or_else(|p| p.into_inner()).take() {
                step();
            }
            ffi::reply_simple(ctx, "OK")
        }
        Outcome::Run { argv, resp3 } => {
            // The context's client is the blocked client, so the call runs in its database;
            // deleting nothing the log may still meet alive (see `expiry`), as every local read.
            crate::expiry::reading(ctx, argv, || ffi::call_and_reply(ctx, argv, *resp3));
            ffi::OK
        }
    }
}

/// `CLIENT UNBLOCK` of a [`Blocked::new`] client.
extern "C" fn timeout_callback(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    ffi::reply_error(ctx, TIMED_OUT)
}

extern "C" fn free_outcome(_ctx: *mut RedisModuleCtx, privdata: *mut c_void) {
    if privdata.is_null() {
        return;
    }
    let outcome = unsafe { Box::from_raw(privdata as *mut Outcome) };
    if let Outcome::Call(reply) = *outcome {
        ffi::free_call_reply(reply);
    }
}
