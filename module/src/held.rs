//! Held replies: a leader keeps a client's pipeline moving while the cluster confirms its commands.
//!
//! Redis stops reading a blocked client's pipeline until it is unblocked, so blocking a client for
//! every replicated write and every linearizable read costs each connection one Raft round per
//! command, however deep its pipeline. Instead, a leader answers into the client's output buffer
//! and holds that output back: the client is *protected* (Redis' own mechanism, used while a slow
//! script runs: nothing is read from or written to its socket) until every reply in it may leave.
//!
//! - A read runs at once; its reply may leave once a ReadIndex round that started after it, in the
//!   same term, confirms this node still leads. Every read of one event-loop turn shares a round.
//! - A write is proposed at once and leaves an empty slot in the output (Redis' deferred reply);
//!   the slot is filled with the reply Redis produced when the entry was applied, or an error.
//!   Writes of one client are proposed, and so applied, in pipeline order.
//! - A read behind a write of the same client still in flight waits for it (a pipeline reads its
//!   own writes): it gets a slot and runs when the writes before it are done.
//! - Below consistency high, writes are held the same way; reads need no confirmation and pass
//!   here only to wait behind their own client's writes.
//!
//! Replies go into the output buffer in command order, slots included, so the client sees them in
//! order. The client is released when nothing it waits for is left.
//!
//! A lone write needs none of that. A write from a client with nothing else in flight (a
//! connection that sends one command and waits for its answer, the usual case) gets no slot and
//! its client is not protected: the reply is appended once it is known. Protecting and releasing
//! a client costs Redis two `epoll_ctl` calls, about a fifth of the leader's main-thread time per
//! write when every connection has one write in flight. The reply still comes in order if
//! nothing else enters the client's output before it, so before any other command of that client
//! runs, its lone write gets its slot after all, at the end of the output, and the client is
//! protected (see [`before_command`]). Out-of-band output (a RESP3 push) may pass the reply.
//!
//! Why a held read is linearizable. Any write acknowledged before the read arrived was either
//! acknowledged by this leader, which answers only after applying it here, or committed before
//! this leader's term, and a ready leader has applied its term's first entry, which comes after
//! all of those. So the dataset the read ran on holds every acknowledged write, unless another
//! leader has been elected meanwhile. The confirming round rules that out: a majority answered
//! this term's heartbeat after the read ran, and a majority that had elected a newer leader would
//! not have. The reply leaves only after that confirmation.
//!
//! If a round fails (leadership lost, no quorum before the write timeout), the held replies must
//! never leave: the connection is closed. A read changes nothing; writes held with it get the
//! usual "unknown outcome" of a broken connection.
//!
//! Protecting a client and deferred replies are not part of the module API. Redis exports the
//! functions (it links with -rdynamic); they are looked up at load. Without them, or with
//! threaded I/O (whose writer does not skip protected clients), commands take the blocking path.

mod redis_hooks;

pub use redis_hooks::{describe, init, transactions_available};
use redis_hooks::{exported, hooks, Hooks};

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, ClientId, RedisModuleCtx};
use crate::state::{self, RaftNode};
use raftis_core::config::Consistency;
use raftis_core::Term;
use redis_module::raw::{self, RedisModuleEvent};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A client with this many commands in flight blocks for the next one instead: Redis stops
/// reading its pipeline until it is answered, which bounds the memory one client can tie up.
const MAX_IN_FLIGHT_PER_CLIENT: usize = 1024;

/// RAFT.STATS: reads and writes answered through held replies, and connections closed because
/// their reads could not be confirmed.
static READS_HELD: AtomicU64 = AtomicU64::new(0);
static WRITES_HELD: AtomicU64 = AtomicU64::new(0);
static CLIENTS_CLOSED: AtomicU64 = AtomicU64::new(0);
/// Held writes that were lone writes when proposed (see the module doc).
static LONE_WRITES: AtomicU64 = AtomicU64::new(0);

pub fn stats() -> [(&'static str, u64); 4] {
    [
        ("reads_held", READS_HELD.load(Ordering::Relaxed)),
        ("writes_held", WRITES_HELD.load(Ordering::Relaxed)),
        ("lone_writes", LONE_WRITES.load(Ordering::Relaxed)),
        ("held_clients_closed", CLIENTS_CLOSED.load(Ordering::Relaxed)),
    ]
}

/// Only touched on Redis' main thread; the lock is never contended.
static HELD: Mutex<Held> = Mutex::new(Held { clients: None, lone: 0, open: None, next_round: 1, next_slot: 1, in_turn: false });

struct Held {
    /// Looked up for every held reply; client ids are Redis' own counter, so a fast hash is safe.
    clients: Option<FxHashMap<ClientId, HeldClient>>,
    /// How many of them have a lone write (are not protected).
    lone: usize,
    /// Reads run since the last round was asked for; they share the next one.
    open: Option<Round>,
    next_round: u64,
    next_slot: u64,
    /// Redis is processing events and will call [`on_event_loop`] before it sleeps: a round
    /// opened now is closed there. Outside (a pipeline resumed after a blocked command, which
    /// Redis runs after the hook), a one-shot closes it on the next turn instead.
    in_turn: bool,
}

/// A client with replies held: protected while `rounds > 0` or `slots` is not empty, unless its
/// one slot is a lone write.
struct HeldClient {
    /// False while its one slot is a lone write.
    protected: bool,
    /// Read rounds that must confirm before its output may leave.
    rounds: u32,
    /// The latest round it joined, so a pipeline joins each round once.
    last_round: u64,
    /// Empty reply slots, in output order.
    slots: VecDeque<Slot>,
    /// A read that came when the client already had as many slots as it may: the client is
    /// blocked (Redis reads no more of its pipeline), and this runs the read once every slot
    /// before it is filled.
    when_drained: Option<Box<dyn FnOnce() + Send>>,
}

struct Slot {
    id: u64,
    /// Redis' placeholder in the client's output list. Null for a lone write, or if the client
    /// stopped taking replies before a lone write got its slot (its reply then goes nowhere).
    node: *mut c_void,
    what: SlotFor,
}

enum SlotFor {
    /// A write in flight; the reply once it is known.
    Write(Option<Vec<u8>>),
    /// A read waiting for the writes before it.
    Read { argv: Vec<Vec<u8>>, db: u32, resp3: bool },
}

// Slots hold pointers into Redis' client structures; they are only used on the main thread.
unsafe impl Send for Slot {}

struct Round {
    id: u64,
    term: Term,
    clients: Vec<ClientId>,
}

/// Only a ready leader holds replies: its term, if this node is one.
pub fn ready_term(node: &RaftNode) -> Option<Term> {
    let (term, ready) = (node.leading_term()?, node.leader_ready_index()?);
    (state::get().progress.applied() >= ready).then_some(term)
}

/// Whether any client has replies held. Below consistency high, the filter then sends reads
/// through RAFT._READ, so a read cannot overtake its own pipeline's writes (see
/// [`read_behind_writes`]); otherwise reads there run untouched.
pub fn any_held() -> bool {
    HELD.lock().unwrap_or_else(|p| p.into_inner()).clients.as_ref().is_some_and(|c| !c.is_empty())
}

/// Below consistency high: queues the read `argv` behind the writes of its client still in flight,
/// to run once they are applied. False, having done nothing, if the client has none: the read
/// may run now.
pub fn read_behind_writes(ctx: *mut RedisModuleCtx, argv: &[&[u8]]) -> bool {
    let Some(hooks) = hooks() else { return false };
    let Some((id, client)) = client_of(ctx, hooks) else { return false };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if slots_of(&held, id) == 0 {
        return false;
    }
    // Once the writes are answered the read may simply run, unless this leader was deposed
    // meanwhile (as in `run_read`).
    queue_read(&mut held, hooks, ctx, (id, client), argv, |blocked, argv, resp3| match deposed_at_medium(&argv) {
        Some(redirect) => blocked.finish(Outcome::Error(redirect)),
        None => blocked.finish(Outcome::Run { argv, resp3 }),
    })
}

/// Whether the client of `ctx` has replies in flight (writes, or reads behind them).
pub fn has_replies_in_flight(ctx: *mut RedisModuleCtx) -> bool {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    slots_of(&HELD.lock().unwrap_or_else(|p| p.into_inner()), id) > 0
}

/// The client of `ctx`, if replies can be held for it.
fn client_of(ctx: *mut RedisModuleCtx, hooks: &Hooks) -> Option<(ClientId, *mut c_void)> {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let client = if id == 0 { std::ptr::null_mut() } else { unsafe { (hooks.lookup_client)(id) } };
    (!client.is_null()).then_some((id, client))
}

/// Consistency high: runs the read `argv` for the client of `ctx` (or queues it behind the
/// client's writes) and holds its reply until confirmed. False, having done nothing: take the
/// blocking path.
pub fn read(ctx: *mut RedisModuleCtx, argv: &[&[u8]], node: &RaftNode) -> bool {
    let Some(hooks) = hooks() else { return false };
    let Some(term) = ready_term(node) else { return false };
    let Some((id, client)) = client_of(ctx, hooks) else { return false };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if slots_of(&held, id) > 0 {
        // Behind the client's writes. Should it be blocked instead (too many in flight), it
        // takes the blocking path once they are answered: a leadership check started then
        // covers them.
        if !queue_read(&mut held, hooks, ctx, (id, client), argv, crate::read::confirm_then_run) {
            return false;
        }
    } else {
        crate::expiry::reading(ctx, argv, || ffi::call_and_reply(ctx, argv, ffi::client_is_resp3(ctx)));
        join_round(&mut held, hooks, id, client, term);
    }
    READS_HELD.fetch_add(1, Ordering::Relaxed);
    crate::reply_arranged::mark();
    true
}

/// Runs `then` once every reply the client of `ctx` has held is in its output: at once if it has
/// none, else when the last one is filled. The caller has blocked the client, so nothing else of
/// its pipeline runs meanwhile.
pub fn after_own_replies(ctx: *mut RedisModuleCtx, then: Box<dyn FnOnce() + Send>) {
    let mut then = Some(then);
    if let Some((id, _)) = hooks().and_then(|hooks| client_of(ctx, hooks)) {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)).filter(|c| !c.slots.is_empty()) {
            c.when_drained = then.take();
        }
    }
    if let Some(then) = then {
        then();
    }
}

/// A write about to be proposed for the client of `ctx`: its reply gets a slot in the output.
/// None: take the blocking path.
pub fn write_slot(ctx: *mut RedisModuleCtx, node: &RaftNode) -> Option<HeldReply> {
    let hooks = hooks()?;
    ready_term(node)?;
    reply_slot(ctx, hooks, Limit::PerClient, Lone::Allowed)
}

/// A command a follower forwards to the leader for the client of `ctx` (see `transaction`): its
/// reply gets a slot in the output. None: take the blocking path.
pub fn forward_slot(ctx: *mut RedisModuleCtx) -> Option<HeldReply> {
    reply_slot(ctx, hooks()?, Limit::PerClient, Lone::NotAllowed)
}

/// A command of a transaction being run by EXEC on a ready leader: its reply gets a slot in the
/// output, whatever the client already has in flight (the transaction is already in memory, and
/// a client cannot be blocked in the middle of EXEC). None if the client takes no replies.
pub fn transaction_slot(ctx: *mut RedisModuleCtx) -> Option<HeldReply> {
    reply_slot(ctx, hooks()?, Limit::None, Lone::NotAllowed)
}

/// Whether a write may be a lone write. Only a plain client write may: a forwarded command or
/// one inside EXEC can have output Redis adds behind it without a command of its own.
#[derive(PartialEq)]
enum Lone {
    Allowed,
    NotAllowed,
}

fn reply_slot(ctx: *mut RedisModuleCtx, hooks: &Hooks, limit: Limit, lone: Lone) -> Option<HeldReply> {
    let (id, client) = client_of(ctx, hooks)?;
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let has_held = held.clients.as_ref().is_some_and(|c| c.contains_key(&id));
    let slot = if lone == Lone::Allowed && !has_held {
        lone_write(&mut held, hooks, id, client)?
    } else {
        queue_slot(&mut held, hooks, id, client, SlotFor::Write(None), limit)?
    };
    WRITES_HELD.fetch_add(1, Ordering::Relaxed);
    crate::reply_arranged::mark();
    Some(HeldReply { client: id, slot, done: false })
}

/// MULTI for the client of `ctx`, exactly as Redis runs it (the client queues its next commands
/// and gets +OK). Opened even where EXEC cannot run a transaction (see
/// [`transactions_available`]): its commands then fail inside EXEC, together. A refused MULTI
/// would let the client's next commands run one by one, outside any transaction.
pub fn begin_multi(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let (hooks, client) = redis_client(ctx, "MULTI")?;
    unsafe { (hooks.multi)(client) };
    Ok(())
}

/// Redis' own client behind `ctx`, for running Redis' `command` on it (whether or not replies
/// can be held here).
fn redis_client(ctx: *mut RedisModuleCtx, command: &str) -> Result<(&'static Hooks, *mut c_void), String> {
    let hooks = exported().map_err(|why| format!("ERR {command} is not available here: {why}"))?;
    let (_, client) = client_of(ctx, hooks).ok_or_else(|| format!("ERR {command} needs a client connection"))?;
    Ok((hooks, client))
}

/// Redis' own client behind `ctx`, for another function Redis exports (see `tracking`).
pub fn redis_client_of(ctx: *mut RedisModuleCtx) -> Option<*mut c_void> {
    redis_client(ctx, "this").ok().map(|(_, client)| client)
}

/// Whether UNWATCH can run as Redis runs it, from the module ([`unwatch`]).
pub fn unwatch_available() -> bool {
    exported().is_ok()
}

/// UNWATCH for the client of `ctx`, exactly as Redis runs it (it answers +OK).
pub fn unwatch(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let hooks = exported().map_err(|why| format!("ERR UNWATCH is not available here: {why}"))?;
    match client_of(ctx, hooks) {
        Some((_, client)) => unsafe { (hooks.unwatch)(client) },
        // Another module's call: its client, made for the call, watches nothing.
        None => _ = ffi::reply_simple(ctx, "OK"),
    }
    crate::reply_arranged::mark();
    Ok(())
}

/// Whether WATCH can run for the client of `ctx` ([`watch_keys`] needs Redis' own functions).
pub fn can_watch(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    redis_client(ctx, "WATCH").map(|_| ())
}

/// WATCH of `keys` for the client `id`, in its selected database, as Redis does it: from now on
/// Redis marks the client's transaction dirty whenever one of them is modified. False if the
/// client has gone.
pub fn watch_keys(id: ClientId, keys: &[Vec<u8>]) -> bool {
    let Ok(hooks) = exported() else { return false };
    let client = unsafe { (hooks.lookup_client)(id) };
    if client.is_null() {
        return false;
    }
    for key in keys {
        // Redis keeps its own reference to the key.
        let key = ffi::new_string(key);
        unsafe { (hooks.watch_key)(client, key as *mut c_void) };
        ffi::free_string(key);
    }
    true
}

/// Whether Redis is running the commands of an event-loop turn (its hook will run before it
/// sleeps), rather than a pipeline resumed after the hook.
pub fn in_turn() -> bool {
    HELD.lock().unwrap_or_else(|p| p.into_inner()).in_turn
}

/// The held state of a client, protected: new, or its lone write given its slot.
fn protected_client<'a>(held: &'a mut Held, hooks: &Hooks, id: ClientId, client: *mut c_void) -> &'a mut HeldClient {
    protect_lone(held, hooks, id);
    held.clients.get_or_insert_with(FxHashMap::default).entry(id).or_insert_with(|| {
        unsafe { (hooks.protect)(client) };
        HeldClient { protected: true, rounds: 0, last_round: 0, slots: VecDeque::new(), when_drained: None }
    })
}

/// A write of a client with nothing else in flight: no slot, no protection (see the module doc).
/// None if the client takes no reply now (CLIENT REPLY OFF or SKIP, closing).
fn lone_write(held: &mut Held, hooks: &Hooks, id: ClientId, client: *mut c_void) -> Option<u64> {
    // The check Redis makes before adding any reply. It also queues the client to have its output
    // written, which finds nothing to write.
    if unsafe { (hooks.prepare_to_write)(client) } != redis_hooks::C_OK {
        return None;
    }
    let slot = held.next_slot;
    held.next_slot += 1;
    held.lone += 1;
    let lone = Slot { id: slot, node: std::ptr::null_mut(), what: SlotFor::Write(None) };
    let c = HeldClient { protected: false, rounds: 0, last_round: 0, slots: VecDeque::from([lone]), when_drained: None };
    held.clients.get_or_insert_with(FxHashMap::default).insert(id, c);
    LONE_WRITES.fetch_add(1, Ordering::Relaxed);
    Some(slot)
}

/// Before a module command of the client of `ctx` runs (see `lib.rs`): a lone write of that
/// client gets its slot, so that nothing the command answers overtakes its reply.
pub fn before_command(ctx: *mut RedisModuleCtx) {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(hooks) = hooks().filter(|_| held.lone > 0) else { return };
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    protect_lone(&mut held, hooks, id);
}

/// From the filter, before every client command. Whose command it is cannot be known there, so
/// every lone write gets its slot, unless the command goes to `RAFT._CMD` or `RAFT._READ`
/// (`to_held_path`), which see to their own client's (see [`before_command`]) and take slots
/// themselves. Redis may refuse even those before they run, with an error that would overtake a
/// lone write's reply; then every lone write gets its slot too.
pub fn before_filtered_command(to_held_path: bool) {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(hooks) = hooks().filter(|_| held.lone > 0) else { return };
    if to_held_path && !redis_may_refuse(hooks) {
        return;
    }
    protect_every_lone(&mut held, hooks);
}

/// Before the log applies a command during which Redis may serve clients (a script past
/// `busy-reply-threshold`). Redis then answers their commands itself, and the filter does not
/// see them: Redis skips it while the module is inside a call of its own. So every lone write
/// gets its slot first.
pub fn before_long_command() {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(hooks) = hooks().filter(|_| held.lone > 0) {
        protect_every_lone(&mut held, hooks);
    }
}

fn protect_every_lone(held: &mut Held, hooks: &Hooks) {
    let lone: Vec<ClientId> = held.clients.iter().flatten().filter(|(_, c)| !c.protected).map(|(id, _)| *id).collect();
    for id in lone {
        protect_lone(held, hooks, id);
    }
}

/// Whether Redis may answer `RAFT._CMD` or `RAFT._READ` with an error of its own instead of
/// running it (see `processCommand`): while busy, after a disk error, while loading, and where
/// a user has key patterns, which Redis checks against the keys `RAFT._READ` names. It refuses
/// them for no other reason Raftis allows: ACL rules and logins change through commands, which
/// give every lone write its slot on the way.
fn redis_may_refuse(hooks: &Hooks) -> bool {
    let busy_or_disk_error = unsafe { (hooks.yielding)() != 0 || (hooks.disk_error)() != 0 };
    busy_or_disk_error || crate::acl::may_restrict() || ffi::redis_is_loading(state::get().main_thread_ctx())
}

/// If client `id` has a lone write, gives it its slot at the end of the output, where its reply
/// belongs as nothing has entered the output since, and protects the client.
fn protect_lone(held: &mut Held, hooks: &Hooks, id: ClientId) {
    // Every held write of a pipeline passes here: with no lone write anywhere, skip the lookup.
    if held.lone == 0 || held.clients.as_ref().and_then(|c| c.get(&id)).is_none_or(|c| c.protected) {
        return;
    }
    let client = unsafe { (hooks.lookup_client)(id) };
    if client.is_null() {
        forget(held, id);
        return;
    }
    held.lone -= 1;
    let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)) else { return };
    for slot in c.slots.iter_mut().filter(|s| s.node.is_null()) {
        slot.node = unsafe { (hooks.deferred_slot)(client) };
    }
    unsafe { (hooks.protect)(client) };
    c.protected = true;
}

/// Drops the held state of client `id`; releasing the client is the caller's business.
fn forget(held: &mut Held, id: ClientId) -> Option<HeldClient> {
    let c = held.clients.as_mut()?.remove(&id)?;
    if !c.protected {
        held.lone -= 1;
    }
    Some(c)
}

/// How many replies of this client wait in its output: writes in flight and reads behind them.
fn slots_of(held: &Held, id: ClientId) -> usize {
    held.clients.as_ref().and_then(|c| c.get(&id)).map_or(0, |c| c.slots.len())
}

fn is_full(held: &Held, id: ClientId) -> bool {
    slots_of(held, id) >= MAX_IN_FLIGHT_PER_CLIENT
}

/// Whether a slot respects [`MAX_IN_FLIGHT_PER_CLIENT`].
#[derive(PartialEq)]
enum Limit {
    PerClient,
    None,
}

/// Appends an empty reply slot to the client's output; its id, or None if the client cannot
/// take one (too many in flight, or it takes no replies).
fn queue_slot(held: &mut Held, hooks: &Hooks, id: ClientId, client: *mut c_void, what: SlotFor, limit: Limit) -> Option<u64> {
    if limit == Limit::PerClient && is_full(held, id) {
        return None;
    }
    let node = unsafe { (hooks.deferred_slot)(client) };
    if node.is_null() {
        // The client takes no replies (CLIENT REPLY OFF, closing): nothing to hold.
        return None;
    }
    let slot = held.next_slot;
    held.next_slot += 1;
    protected_client(held, hooks, id, client).slots.push_back(Slot { id: slot, node, what });
    crate::reply_arranged::mark();
    Some(slot)
}

/// Queues the read `argv` of the client of `ctx` behind its writes in flight. If the client has
/// no slot left, it is blocked instead and `run_blocked` gets the read once the writes are
/// answered. False, having done nothing, if the client takes no replies.
fn queue_read(
    held: &mut Held,
    hooks: &Hooks,
    ctx: *mut RedisModuleCtx,
    (id, client): (ClientId, *mut c_void),
    argv: &[&[u8]],
    run_blocked: fn(Blocked, Vec<Vec<u8>>, bool),
) -> bool {
    let (argv, resp3) = (ffi::owned_args(argv), ffi::client_is_resp3(ctx));
    // A client that tracks keys waits blocked, too. Run from a slot, its read would run on the
    // module's own client, and Redis would not remember the keys for it again once its own write
    // before the read had made Redis forget them (see `tracking`).
    if is_full(held, id) || crate::tracking::tracks_keys(id) {
        // Long enough for the writes before it and a leadership check of its own.
        let blocked = Blocked::new(ctx, 2 * state::get().write_timeout() + Duration::from_secs(1));
        if let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)) {
            c.when_drained = Some(Box::new(move || run_blocked(blocked, argv, resp3)));
        }
        return true;
    }
    let read = SlotFor::Read { argv, db: ffi::selected_db(ctx), resp3 };
    queue_slot(held, hooks, id, client, read, Limit::PerClient).is_some()
}

fn join_round(held: &mut Held, hooks: &Hooks, id: ClientId, client: *mut c_void, term: Term) {
    // Reads of another term cannot share a round with these: ask for theirs now.
    if held.open.as_ref().is_some_and(|r| r.term != term) {
        ask_confirmation(held.open.take());
    }
    if held.open.is_none() {
        held.open = Some(Round { id: held.next_round, term, clients: Vec::new() });
        held.next_round += 1;
        // The round is asked for once this event-loop turn has run every command it read.
        if !held.in_turn {
            unsafe { api!(RedisModule_EventLoopAddOneShot)(Some(close_round), std::ptr::null_mut()) };
        }
    }
    let round_id = held.open.as_ref().map_or(0, |r| r.id);
    let c = protected_client(held, hooks, id, client);
    if c.last_round != round_id {
        c.last_round = round_id;
        c.rounds += 1;
        if let Some(round) = held.open.as_mut() {
            round.clients.push(id);
        }
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
        log::error!("panic in the event-loop hook for held replies");
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
    let outcome = RoundOutcome { clients: round.clients, confirmed: false };
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
struct RoundOutcome {
    clients: Vec<ClientId>,
    confirmed: bool,
}

impl Drop for RoundOutcome {
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
    if std::panic::catch_unwind(move || round_ended_on_main_thread(clients, confirmed)).is_err() {
        log::error!("panic while releasing held replies");
    }
}

fn round_ended_on_main_thread(clients: Vec<ClientId>, confirmed: bool) {
    let Some(hooks) = hooks() else { return };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    for id in clients {
        if !confirmed {
            close(&mut held, hooks, id);
            continue;
        }
        if let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)) {
            c.rounds -= 1;
        }
        release_if_done(&mut held, hooks, id);
    }
}

/// Unconfirmed reads: the client's held output must never leave. Marked to close first, so
/// Redis writes nothing more to it, then unprotected so Redis can free it.
fn close(held: &mut Held, hooks: &Hooks, id: ClientId) {
    let Some(c) = forget(held, id) else { return };
    let client = unsafe { (hooks.lookup_client)(id) };
    if client.is_null() {
        return;
    }
    unsafe { (hooks.free_async)(client) };
    CLIENTS_CLOSED.fetch_add(1, Ordering::Relaxed);
    log::warn!("closing client {id}: a leadership check for its reads failed, their replies must not be sent");
    if c.protected {
        unsafe { (hooks.unprotect)(client) };
    }
}

fn release_if_done(held: &mut Held, hooks: &Hooks, id: ClientId) {
    let done = held.clients.as_ref().and_then(|c| c.get(&id)).is_some_and(|c| c.rounds == 0 && c.slots.is_empty());
    if !done {
        return;
    }
    if forget(held, id).is_some_and(|c| c.protected) {
        let client = unsafe { (hooks.lookup_client)(id) };
        if !client.is_null() {
            unsafe { (hooks.unprotect)(client) };
        }
    }
}

/// A held write's way back to its slot. Finished on the main thread with the applied reply, or
/// failed from anywhere; dropped unfinished, it fills the slot with an error.
pub struct HeldReply {
    client: ClientId,
    slot: u64,
    done: bool,
}

impl HeldReply {
    /// On the main thread: the write's reply as Redis produced it (raw RESP).
    pub fn finish(mut self, reply: Vec<u8>) {
        self.done = true;
        fill_write(self.client, self.slot, reply);
    }

    /// From any thread: the reply, as raw RESP (a forwarded transaction's, from the leader).
    pub fn finish_from_any_thread(mut self, reply: Vec<u8>) {
        self.done = true;
        send_reply(self.client, self.slot, reply);
    }

    /// From any thread: the write failed with `error` (no leading '-').
    pub fn fail(mut self, error: &str) {
        self.done = true;
        send_failure(self.client, self.slot, error);
    }
}

impl Drop for HeldReply {
    fn drop(&mut self) {
        if !self.done {
            send_failure(self.client, self.slot, "ERR internal error: request abandoned");
        }
    }
}

fn send_failure(client: ClientId, slot: u64, error: &str) {
    send_reply(client, slot, crate::forward::error_proto(error));
}

/// Fills the slot on the main thread, from any thread.
fn send_reply(client: ClientId, slot: u64, reply: Vec<u8>) {
    let reply: Box<ArrivedReply> = Box::new((client, slot, reply));
    unsafe { api!(RedisModule_EventLoopAddOneShot)(Some(reply_arrived), Box::into_raw(reply) as *mut c_void) };
}

extern "C" fn reply_arrived(data: *mut c_void) {
    let reply = unsafe { Box::from_raw(data as *mut ArrivedReply) };
    let (client, slot, bytes) = *reply;
    let fill = move || match hooks() {
        Some(hooks) if unsafe { (hooks.yielding)() != 0 } => put_off((client, slot, bytes)),
        _ => fill_write(client, slot, bytes),
    };
    if std::panic::catch_unwind(fill).is_err() {
        log::error!("panic while filling a held reply");
    }
}

/// A write's reply on its way to the main thread: the client, its slot, the raw reply.
type ArrivedReply = (ClientId, u64, Vec<u8>);

/// Replies that arrived while Redis ran a long command, in the order they arrived.
static PUT_OFF: Mutex<Vec<ArrivedReply>> = Mutex::new(Vec::new());

/// Keeps a reply until the long command running now is done. Redis runs one-shots while a
/// script applied from the log yields to the event loop (past busy-reply-threshold); filling the
/// reply then would run the reads waiting behind it on half of the script's writes. Redis fires
/// no timer meanwhile, only file events: a timer due at once fires when the command is over.
fn put_off(reply: ArrivedReply) {
    let mut put_off = PUT_OFF.lock().unwrap_or_else(|p| p.into_inner());
    put_off.push(reply);
    if put_off.len() == 1 {
        unsafe { api!(RedisModule_CreateTimer)(state::get().main_thread_ctx(), 0, Some(put_off_due), std::ptr::null_mut()) };
    }
}

extern "C" fn put_off_due(ctx: *mut RedisModuleCtx, _data: *mut c_void) {
    let result = std::panic::catch_unwind(|| {
        if hooks().is_some_and(|hooks| unsafe { (hooks.yielding)() != 0 }) {
            // Not expected (see `put_off`), but the replies must wait all the same.
            unsafe { api!(RedisModule_CreateTimer)(ctx, 1, Some(put_off_due), std::ptr::null_mut()) };
            return;
        }
        let replies = std::mem::take(&mut *PUT_OFF.lock().unwrap_or_else(|p| p.into_inner()));
        for (client, slot, bytes) in replies {
            fill_write(client, slot, bytes);
        }
    });
    if result.is_err() {
        log::error!("panic while filling held replies put off by a long command");
    }
}

/// On the main thread: records a write's reply, then fills every slot at the front of the
/// client's output that can be filled, running the reads that were waiting for those writes.
fn fill_write(id: ClientId, slot: u64, reply: Vec<u8>) {
    let Some(hooks) = hooks() else { return };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)) else { return };
    if let Some(s) = c.slots.iter_mut().find(|s| s.id == slot) {
        s.what = SlotFor::Write(Some(reply));
    }
    let client = unsafe { (hooks.lookup_client)(id) };
    if client.is_null() {
        forget(&mut held, id);
        return;
    }
    let mut ran_reads = false;
    while let Some(c) = held.clients.as_mut().and_then(|c| c.get_mut(&id)) {
        let Some(front) = c.slots.front_mut() else { break };
        let bytes = match &mut front.what {
            SlotFor::Write(None) => break,
            SlotFor::Write(Some(reply)) => std::mem::take(reply),
            SlotFor::Read { argv, db, resp3 } => {
                ran_reads = true;
                run_read(argv, *db, *resp3)
            }
        };
        let (ptr, len) = (bytes.as_ptr() as *const c_char, bytes.len());
        if !c.protected {
            unsafe { (hooks.add_reply)(client, ptr, len) };
        } else if !front.node.is_null() {
            unsafe { (hooks.fill_slot)(client, front.node, ptr, len) };
        }
        c.slots.pop_front();
    }
    // Reads that ran just now still need their own confirmation (at consistency high).
    if ran_reads && state::get().consistency() == Consistency::High {
        match state::get().node().as_deref().and_then(ready_term) {
            Some(term) => join_round(&mut held, hooks, id, client, term),
            None => return close(&mut held, hooks, id),
        }
    }
    let drained = held.clients.as_mut().and_then(|c| c.get_mut(&id)).filter(|c| c.slots.is_empty()).and_then(|c| c.when_drained.take());
    release_if_done(&mut held, hooks, id);
    drop(held);
    if let Some(run) = drained {
        run();
    }
}

/// At medium only a ready leader serves reads, and one whose read waited behind writes may have
/// stepped down meanwhile: its redirection. (At high the read is confirmed after it runs; at low
/// any node serves it.)
fn deposed_at_medium(argv: &[Vec<u8>]) -> Option<String> {
    let s = state::get();
    if s.consistency() != Consistency::Medium || !crate::read::needs_confirmation() {
        return None;
    }
    let slot = crate::cluster_view::slot_of(s.main_thread_ctx(), argv);
    Some(s.node().map_or_else(crate::write::not_initialized, |n| state::redirect(&n.status(), slot)))
}

/// A read that waited behind writes, run on the main thread in the client's database of the
/// moment it was sent.
fn run_read(argv: &[Vec<u8>], db: u32, resp3: bool) -> Vec<u8> {
    if let Some(redirect) = deposed_at_medium(argv) {
        return crate::forward::error_proto(&redirect);
    }
    let s = state::get();
    let ctx = s.main_thread_ctx();
    if !ffi::select_db(ctx, db) {
        return b"-ERR invalid database\r\n".to_vec();
    }
    // This may run while entries are applied: the read sees keys as a client's read does.
    let reply = crate::expiry::reading(ctx, argv, || ffi::call(ctx, argv, resp3));
    crate::forward::take_proto(reply).unwrap_or_else(|e| crate::forward::error_proto(&e))
}
