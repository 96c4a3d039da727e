//! Linearizable reads that keep a client's pipeline moving.
//!
//! Redis stops reading a blocked client's pipeline until it is unblocked, so the usual way of a
//! linearizable read (block the client, confirm leadership, run the read) costs every connection
//! one Raft round per command, however deep its pipeline. A ready leader does better: it runs the
//! read at once and holds its reply back. The client is *protected* (Redis' own mechanism, used
//! while a slow script runs: nothing is read from or written to its socket) until a ReadIndex
//! round that started after the read, in the same term, confirms this node still leads. Every
//! read of one event-loop turn shares that round, and a pipeline is run in one go.
//!
//! Why this is linearizable. Any write acknowledged before the read arrived was either
//! acknowledged by this leader, which answers only after applying it here, or committed before
//! this leader's term, and a ready leader has applied its term's first entry, which comes after
//! all of those. So the dataset the read ran on holds every acknowledged write, unless another
//! leader has been elected meanwhile. The confirming round rules that out: a majority answered
//! this term's heartbeat after the read ran, and a majority that had elected a newer leader would
//! not have. The reply leaves only after that confirmation.
//!
//! If the round fails (leadership lost, no quorum before the write timeout), the held replies
//! must never leave: the connection is closed. A read changes nothing, so the client only sees a
//! dropped connection and may retry against the new leader.
//!
//! Protecting a client is not part of the module API. Redis exports the functions (it links with
//! -rdynamic), and they are looked up at load; without them reads take the blocking path.

use crate::ffi::{self, api, RedisModuleCtx};
use redis_module::raw::{self, RedisModuleEvent};
use crate::state::{self, RaftNode};
use raftis_core::Term;
use std::collections::HashMap;
use std::ffi::c_void;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type ClientId = u64;

/// Redis internals, by their exported names.
struct Hooks {
    lookup_client: unsafe extern "C" fn(u64) -> *mut c_void,
    protect: unsafe extern "C" fn(*mut c_void),
    unprotect: unsafe extern "C" fn(*mut c_void),
    free_async: unsafe extern "C" fn(*mut c_void),
}

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

fn hooks() -> Option<&'static Hooks> {
    static HOOKS: OnceLock<Option<Hooks>> = OnceLock::new();
    HOOKS
        .get_or_init(|| {
            // RTLD_DEFAULT (a null handle): the executable and everything it loaded.
            let find = |name: &str| {
                let name = ffi::cstr(name);
                let f = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
                (!f.is_null()).then_some(f)
            };
            let hooks = unsafe {
                Hooks {
                    lookup_client: std::mem::transmute(find("lookupClientByID")?),
                    protect: std::mem::transmute(find("protectClient")?),
                    unprotect: std::mem::transmute(find("unprotectClient")?),
                    free_async: std::mem::transmute(find("freeClientAsync")?),
                }
            };
            Some(hooks)
        })
        .as_ref()
}

/// Says at load which path linearizable reads take.
pub fn describe() -> &'static str {
    match hooks() {
        Some(_) => "linearizable reads on the leader run at once and their replies wait for a shared ReadIndex round",
        None => "this Redis does not export protectClient: linearizable reads block their client until confirmed",
    }
}

/// Reads served this way, and connections closed because their reads could not be confirmed
/// (RAFT.STATS).
static READS_HELD: AtomicU64 = AtomicU64::new(0);
static CLIENTS_CLOSED: AtomicU64 = AtomicU64::new(0);

pub fn stats() -> (u64, u64) {
    (READS_HELD.load(Ordering::Relaxed), CLIENTS_CLOSED.load(Ordering::Relaxed))
}

/// Only touched on Redis' main thread; the lock is never contended.
static HELD: Mutex<Held> = Mutex::new(Held { clients: None, open: None, next_round: 1, in_turn: false });

struct Held {
    /// Clients whose replies are held back, and what they wait for.
    clients: Option<HashMap<ClientId, Waiting>>,
    /// Reads run since the last round was asked for; they share the next one.
    open: Option<Round>,
    next_round: u64,
    /// Redis is processing events and will call [`before_sleep`] when done: a round opened now
    /// is closed there. Outside (e.g. a pipeline resumed by an unblocked write, which Redis runs
    /// after the hook), a one-shot closes it on the next turn instead.
    in_turn: bool,
}

struct Waiting {
    /// Rounds that must confirm before the client's replies may leave.
    rounds: u32,
    /// The latest round it joined, so a pipeline joins each round once.
    last_round: u64,
}

struct Round {
    id: u64,
    term: Term,
    clients: Vec<ClientId>,
}

/// Runs the read `argv` for the client of `ctx` now and holds its reply until confirmed.
/// Returns false, having done nothing, when the read must take the blocking path instead.
pub fn serve(ctx: *mut RedisModuleCtx, argv: &[Vec<u8>], node: &RaftNode) -> bool {
    let Some(hooks) = hooks() else { return false };
    let (Some(term), Some(ready)) = (node.leading_term(), node.leader_ready_index()) else { return false };
    if state::get().progress.applied() < ready {
        return false;
    }
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let client = if id == 0 { std::ptr::null_mut() } else { unsafe { (hooks.lookup_client)(id) } };
    if client.is_null() {
        return false;
    }
    let reply = ffi::call(ctx, argv, ffi::client_is_resp3(ctx));
    if reply.is_null() {
        ffi::reply_error(ctx, "ERR command could not be executed");
    } else {
        ffi::reply_call_reply(ctx, reply);
        ffi::free_call_reply(reply);
    }
    hold(hooks, client, id, term);
    READS_HELD.fetch_add(1, Ordering::Relaxed);
    true
}

fn hold(hooks: &Hooks, client: *mut c_void, id: ClientId, term: Term) {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let held = &mut *held;
    // Reads of another term cannot share a round with these: ask for theirs now.
    if held.open.as_ref().map_or(false, |r| r.term != term) {
        ask_confirmation(held.open.take());
    }
    let round = match &mut held.open {
        Some(round) => round,
        None => {
            let round = held.open.insert(Round { id: held.next_round, term, clients: Vec::new() });
            held.next_round += 1;
            // The round is asked for once this event-loop turn has run every command it read.
            if !held.in_turn {
                unsafe { api!(RedisModule_EventLoopAddOneShot)(Some(close_round), std::ptr::null_mut()) };
            }
            round
        }
    };
    let waiting = held.clients.get_or_insert_with(HashMap::new).entry(id).or_insert(Waiting { rounds: 0, last_round: 0 });
    if waiting.rounds == 0 {
        unsafe { (hooks.protect)(client) };
    }
    if waiting.last_round != round.id {
        waiting.last_round = round.id;
        waiting.rounds += 1;
        round.clients.push(id);
    }
}

/// Subscribed to Redis' event-loop event (see `lib.rs`).
pub extern "C" fn on_event_loop(_ctx: *mut RedisModuleCtx, _event: RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    let result = std::panic::catch_unwind(|| {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if subevent == raw::REDISMODULE_SUBEVENT_EVENTLOOP_AFTER_SLEEP {
            held.in_turn = true;
            return;
        }
        held.in_turn = false;
        let open = held.open.take();
        drop(held);
        ask_confirmation(open);
    });
    if result.is_err() {
        log::error!("panic in the event-loop hook for held reads");
    }
}

extern "C" fn close_round(_data: *mut c_void) {
    let result = std::panic::catch_unwind(|| {
        let open = HELD.lock().unwrap_or_else(|p| p.into_inner()).open.take();
        ask_confirmation(open);
    });
    if result.is_err() {
        log::error!("panic while asking to confirm held reads");
    }
}

/// Starts the ReadIndex round for `round`; its clients are released when it ends, one way or
/// the other.
fn ask_confirmation(round: Option<Round>) {
    let Some(round) = round else { return };
    let s = state::get();
    let outcome = Outcome { clients: round.clients, confirmed: false };
    let Some(node) = s.node() else { return drop(outcome) };
    node.read_index_in_term(
        round.term,
        Box::new(move |confirmed| {
            let mut outcome = outcome;
            outcome.confirmed = confirmed.is_ok();
        }),
        Instant::now() + s.write_timeout(),
    );
}

/// The end of a round. Dropping it hands the verdict to the main thread, so a round that ends
/// without an answer (the node went away) counts as not confirmed: held replies never leave
/// unconfirmed, and no client stays held.
struct Outcome {
    clients: Vec<ClientId>,
    confirmed: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if self.clients.is_empty() {
            return;
        }
        let verdict = Box::new((std::mem::take(&mut self.clients), self.confirmed));
        unsafe { api!(RedisModule_EventLoopAddOneShot)(Some(round_ended), Box::into_raw(verdict) as *mut c_void) };
    }
}

extern "C" fn round_ended(data: *mut c_void) {
    let verdict = unsafe { Box::from_raw(data as *mut (Vec<ClientId>, bool)) };
    let (clients, confirmed) = *verdict;
    if std::panic::catch_unwind(move || release(clients, confirmed)).is_err() {
        log::error!("panic while releasing held reads");
    }
}

/// On the main thread: a round ended. Confirmed, each client whose every round is confirmed gets
/// its replies; not confirmed, each of its clients is disconnected with the replies unsent.
fn release(clients: Vec<ClientId>, confirmed: bool) {
    let Some(hooks) = hooks() else { return };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(waiting) = held.clients.as_mut() else { return };
    for id in clients {
        let Some(w) = waiting.get_mut(&id) else { continue };
        w.rounds -= 1;
        if confirmed && w.rounds > 0 {
            continue;
        }
        waiting.remove(&id);
        let client = unsafe { (hooks.lookup_client)(id) };
        if client.is_null() {
            continue;
        }
        if !confirmed {
            // Marked to close first: Redis writes nothing more to a client that is closing.
            unsafe { (hooks.free_async)(client) };
            CLIENTS_CLOSED.fetch_add(1, Ordering::Relaxed);
            log::warn!("closing client {id}: a leadership check for its reads failed, their replies must not be sent");
        }
        unsafe { (hooks.unprotect)(client) };
    }
}
