//! The follower proxy for commands that wait (`BLPOP`, `XREADGROUP ... BLOCK`, ..., and `WAIT`): a
//! follower with `follower-proxy yes` sends one to the leader as `FORWARD-BLOCK`, where it waits
//! like one of the leader's own clients (see `blocking` and `wait`), and its client waits for the
//! leader's answer, however long that takes: the leader answers the command's own timeout.
//!
//! The wait is a connection to the leader that carries nothing else. The follower hangs it up
//! when its client stops waiting, so that the leader forgets the wait instead of popping for a
//! client that is gone:
//! - the client disconnects, or `CLIENT UNBLOCK` ends its wait;
//! - Redis' backstop fires: the command's timeout, plus time for the attempt in flight then and
//!   for the answer's way back, has passed without an answer;
//! - another node leads now. A leader that steps down answers its waiting clients `-MOVED`
//!   itself, but one that is cut off or stopped cannot; its client then gets `-TIMEOUT`, since an
//!   attempt already in its log may still have popped.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleString};
use crate::state::{self, RaftNode};
use raftis_core::forward::{ForwardCancel, ForwardRequest, Forwarded};
use std::collections::BTreeMap;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients waiting for a blocking command forwarded to the leader, by Redis' blocked-client handle.
static WAITING: Mutex<BTreeMap<usize, Waiting>> = Mutex::new(BTreeMap::new());
/// How many: the event loop's cheap check, and RAFT.STATS.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// When [`before_sleep`] last compared their leader with this node's.
static CHECKED: Mutex<Option<Instant>> = Mutex::new(None);

/// How often a follower looks whether the leader its clients wait on still leads.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How much longer than the command's own timeout the client waits for the leader's answer, on
/// top of two forwards' time (an attempt in flight at the timeout is answered first).
const BACKSTOP: Duration = Duration::from_secs(2);

struct Waiting {
    /// The side-port address of the leader it was sent to (None until it is sent).
    leader: Option<String>,
    cancel: ForwardCancel,
}

/// RAFT.STATS: this follower's clients waiting for a blocking command at the leader.
pub fn stats() -> [(&'static str, u64); 1] {
    [("blocked_forwarded_waiting", COUNT.load(Ordering::Relaxed) as u64)]
}

/// Sends the blocking `command` of the client of `ctx` to the leader, once the client's earlier
/// replies are in, and blocks the client until the leader answers. `timeout` is the command's, as
/// read from it (None: for ever). Errs with the redirect when no leader is known.
pub fn to_leader(
    ctx: *mut RedisModuleCtx,
    node: &RaftNode,
    command: &[&[u8]],
    timeout: Result<Option<Duration>, String>,
) -> Result<(), String> {
    crate::forward::leader_addr(node)?;
    let req = ForwardRequest {
        resp3: ffi::client_is_resp3(ctx),
        what: Forwarded::Blocking { db: ffi::selected_db(ctx), argv: ffi::owned_args(command) },
    };
    let extra = 2 * crate::forward::forward_timeout() + BACKSTOP;
    let backstop = match timeout {
        Ok(None) => None,
        Ok(Some(t)) => Some(t + extra),
        // The leader answers Redis' error for it at once.
        Err(_) => Some(extra),
    };
    let blocked = Blocked::with_timeout_reply(ctx, backstop.unwrap_or(Duration::ZERO), Some(timed_out));
    unsafe { api!(RedisModule_SetDisconnectCallback)(blocked.handle(), Some(disconnected)) };
    let cancel = ForwardCancel::default();
    let registered = Registered::new(blocked.handle() as usize, cancel.clone());
    let send = move || {
        let found = state::get().node().ok_or_else(crate::write::not_initialized);
        let (node, addr) = match found.and_then(|node| Ok((crate::forward::leader_addr(&node)?, node))) {
            Ok((addr, node)) => (node, addr),
            Err(e) => {
                // Gone from the registry before Redis may reuse the handle.
                drop(registered);
                return blocked.finish(Outcome::Error(e));
            }
        };
        registered.sent_to(&addr);
        let answer = Box::new(move |reply: Result<Vec<u8>, String>| {
            drop(registered);
            blocked.finish(match reply {
                Ok(raw) => Outcome::Relay(raw),
                Err(e) => Outcome::Error(e),
            })
        });
        node.transport().forward_until(addr, &req, backstop, cancel, answer);
    };
    crate::held::after_own_replies(ctx, Box::new(send));
    Ok(())
}

/// Before Redis sleeps, now and then: clients waiting on a node that no longer leads stop.
pub fn before_sleep() {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    {
        let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
        if checked.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
            return;
        }
        *checked = Some(Instant::now());
    }
    let Some(node) = state::get().node() else { return };
    // No known leader is no news: an election may still confirm the one they wait on.
    let Ok(leader) = crate::forward::leader_addr(&node) else { return };
    for waiting in lock().values() {
        if waiting.leader.as_ref().is_some_and(|sent_to| *sent_to != leader) {
            waiting.cancel.cancel("TIMEOUT the leader changed while the command waited; it may or may not have taken effect");
        }
    }
}

/// A client's entry in [`WAITING`], removed when this is dropped: once answered, or if the
/// forward is dropped unsent (its `Blocked` then answers the client an error).
struct Registered(usize);

impl Registered {
    fn new(handle: usize, cancel: ForwardCancel) -> Registered {
        let mut waiting = lock();
        waiting.insert(handle, Waiting { leader: None, cancel });
        COUNT.store(waiting.len(), Ordering::Relaxed);
        Registered(handle)
    }

    fn sent_to(&self, leader: &str) {
        if let Some(waiting) = lock().get_mut(&self.0) {
            waiting.leader = Some(leader.to_string());
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut waiting = lock();
        waiting.remove(&self.0);
        COUNT.store(waiting.len(), Ordering::Relaxed);
    }
}

/// Ends the forward of the client `bc`, if it is still on its way.
fn cancel(bc: *mut RedisModuleBlockedClient, reason: &str) {
    if let Some(waiting) = lock().get(&(bc as usize)) {
        waiting.cancel.cancel(reason);
    }
}

/// The client disconnected (or `CLIENT UNBLOCK ... ERROR`, which Redis answered).
extern "C" fn disconnected(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    if std::panic::catch_unwind(|| cancel(bc, "ERR client disconnected")).is_err() {
        log::error!("panic in a forwarded blocking command's disconnect callback");
    }
}

/// Redis' backstop, or `CLIENT UNBLOCK` (with TIMEOUT): answered as the command's own timeout is
/// (a null array, as in Redis); the leader is told to stop waiting.
extern "C" fn timed_out(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    if std::panic::catch_unwind(|| cancel(bc, "ERR timed out")).is_err() {
        log::error!("panic in a forwarded blocking command's timeout callback");
    }
    unsafe { api!(RedisModule_ReplyWithNullArray)(ctx) }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<usize, Waiting>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}
