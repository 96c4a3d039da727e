//! `RAFT._BLOCK <command ...>`: blocking commands, served by the leader: the pops (BLPOP, BRPOP,
//! BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP) and the stream reads with `BLOCK`
//! (XREADGROUP, XREAD).
//!
//! Redis pops for a blocked client the moment a push fills one of its keys. Here a pop must be a
//! log entry, so the leader blocks the client and proposes its command as an *attempt*: applied
//! on every node, where a module's call never blocks, it pops if it can and answers null if every
//! key is empty. A null leaves the client waiting. After every batch of entries the leader has
//! applied, it looks at the keys its waiting clients want and proposes one more attempt for as
//! many of them, oldest first, as the keys hold elements ([`after_apply`]). The attempt that pops
//! answers the client, with the reply Redis produced.
//!
//! Stream reads wait the same way, for what Redis would serve them:
//! - `XREADGROUP ... BLOCK` delivers entries to a consumer: its attempts are entries, as a pop's
//!   are. It is ready once a stream it reads has an entry newer than the last one its group was
//!   given. One attempt per group is in flight at a time, so that a group's waiting consumers do
//!   not all propose an attempt for the entry only the first of them will get. As in Redis, a
//!   consumer whose stream is deleted, or whose group is destroyed, is answered an error.
//! - `XREAD ... BLOCK` only reads. Its first attempt is an entry, so that it is linearizable and
//!   its `$` means the last ID as of that point of the log; if it finds nothing, `$` becomes that
//!   ID. From then on the leader runs it locally, without the log, once a stream it reads has an
//!   entry newer than the ID it reads after. Everything the leader applied is committed, and what
//!   it applied after the first attempt was committed after the client asked: the answer is the
//!   dataset as it stood at a moment while the client waited.
//! - Where every node serves reads (consistency `low`), `XREAD ... BLOCK` runs on the node it was
//!   sent to, follower or leader, without the log: at once, then whenever a batch this node
//!   applies brings a stream it reads a newer entry ([`wait_locally`]). Only a client with writes
//!   still in flight goes through the leader, to read behind them.
//! - A read served after blocking gets at most 1000 entries unless it has a `COUNT`, as in Redis.
//!
//! An attempt only pops for a client that still waits. A client whose timeout comes while an
//! attempt is in flight gets that attempt's outcome: the element, a little late, if it popped
//! one, rather than the element vanishing; a null otherwise. A client that disconnects (or is
//! unblocked by `CLIENT UNBLOCK`) with an attempt in flight loses what the attempt pops, as any
//! write's reply is lost with its connection; otherwise its wait is simply forgotten. A leader
//! that loses leadership answers its waiting clients `-MOVED` (as Redis Cluster does when a
//! blocked client's slot moves), or with the proxy sends their commands on to the next leader
//! (see `forward_blocking::take_over`). Inside MULTI the blocking commands never reach here: they run
//! once, without blocking, as in Redis (scripts may not call them at all, Redis' own rule).
//!
//! A follower with `follower-proxy yes` sends its clients' blocking commands here (see
//! `forward_blocking`): they wait like this node's own clients, and their answers go back over
//! the side port ([`serve_forwarded`]). A follower that hangs up stops its client's wait, as a
//! client that disconnects does.

mod readiness;

use crate::apply::{ReplyTo, WriteWaiter};
use crate::blocked::{Blocked, Outcome, Requester};
use crate::cluster_view::slot_of;
use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleString};
use crate::stale_timers::StaleTimer;
use crate::state::{self, RaftNode};
use crate::stream_probe;
use raftis_core::blocking::{self as shape, BlockingCommand, Waits};
use raftis_core::command_entry::encode_command;
use raftis_core::config::Consistency;
use raftis_core::determinism::Args;
use raftis_core::forward::{Abandoned, ForwardDone};
use raftis_core::routing::Route;
use raftis_core::stream_read::{StreamId, StreamRead};
use readiness::{group_keys, GroupNews, Look};
use redis_module::raw::RedisModuleTimerID;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BLOCK_COMMAND: &str = "raft._block";

/// Clients waiting in a blocking command, oldest first. Changed on the main thread, and on the
/// Raft thread when an attempt's proposal fails.
static WAITING: Mutex<Waiting> = Mutex::new(Waiting { clients: BTreeMap::new(), next: 1 });
/// How many: the apply path's cheap check.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// RAFT.STATS: attempts proposed, the first of each wait included.
static ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// How much longer than its own timeout the backstop lets a client wait: the attempt in
/// flight when the timeout came may still be answered by the log.
const BACKSTOP: Duration = Duration::from_secs(2);

struct Waiting {
    /// By id: ids grow, so this is the order the clients came in.
    clients: BTreeMap<u64, Waiter>,
    next: u64,
}

/// A client waiting in a blocking command.
struct Waiter {
    client: Requester,
    /// Its command, as its next attempt runs it.
    argv: Vec<Vec<u8>>,
    db: u32,
    resp3: bool,
    /// The keys it waits on.
    keys: Vec<Vec<u8>>,
    /// What it waits for, where its keys are in `argv` (a retry narrows a pop to its ready
    /// keys), its timeout's.
    shape: BlockingCommand,
    /// `XREAD`, for each key: the ID it reads after (None: one this module cannot read, so the
    /// stream is looked at after every batch). Empty until its first attempt found nothing.
    after: Vec<Option<StreamId>>,
    /// `XREADGROUP`'s group.
    group: Option<Vec<u8>>,
    /// Served from this node's own dataset, whether it leads or not (see [`wait_locally`]).
    local: bool,
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
    /// forgotten) once the attempt is, unless the attempt gets something.
    over: bool,
}

/// Blocks the client of `ctx`, Redis giving up on it after `backstop` (zero: never).
fn block_client(ctx: *mut RedisModuleCtx, backstop: Duration) -> Requester {
    let blocked = Blocked::with_backstop(ctx, backstop, Some(timed_out_by_redis), null_at_backstop);
    blocked.on_disconnect(disconnected);
    Requester::Here(blocked)
}

/// RAFT.STATS: clients waiting in a blocking command now, and attempts proposed so far.
pub fn stats() -> [(&'static str, u64); 2] {
    [("blocked_pops_waiting", COUNT.load(Ordering::Relaxed) as u64), ("blocked_pop_attempts", ATTEMPTS.load(Ordering::Relaxed))]
}

/// `RAFT._BLOCK <command ...>`, which the filter makes of a blocking command.
pub fn block(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let command = &args[1..];
    let s = state::get();
    let reads_only = match s.route(command) {
        Route::Blocking => false,
        Route::BlockingRead => true,
        Route::Refuse(e) => return Err(e),
        _ => return Err("ERR RAFT._BLOCK only takes blocking commands (it is used internally)".into()),
    };
    if crate::transaction::in_exec(ctx) {
        // Redis runs a blocking command of a transaction without blocking: a plain write or read.
        if reads_only {
            return crate::transaction::join(ctx, ffi::selected_db(ctx), ffi::owned_args(command), None);
        }
        return crate::write::write(ctx, args);
    }
    let node = s.serving_node()?;
    let Some(shape) = BlockingCommand::of(command) else {
        return Err("ERR wrong number of arguments for a blocking command".into());
    };
    if reads_only && s.consistency() == Consistency::Low && !crate::held::has_replies_in_flight(ctx) {
        return wait_locally(ctx, command, shape);
    }
    if !node.is_leader() {
        if s.follower_proxy() || (reads_only && crate::replica_reads::through_leader(ctx)) {
            return crate::forward_blocking::to_leader(ctx, &node, command, (shape.timeout, shape.unit));
        }
        return Err(state::redirect(&node.status(), slot_of(ctx, command)));
    }
    if !reads_only {
        crate::memory::refuse_if_over_limit(command)?;
    }
    // Errors, a bad timeout's included, are Redis' to answer, in its own order: the first
    // attempt answers them. The timeout counts from now, but only matters once it found nothing.
    let timeout = shape::parse_timeout(command[shape.timeout], shape.unit);
    let backstop = match &timeout {
        Ok(None) => Duration::ZERO,
        Ok(Some(t)) => *t + s.write_timeout() + BACKSTOP,
        Err(_) => s.write_timeout() + BACKSTOP,
    };
    let (db, resp3) = (ffi::selected_db(ctx), ffi::client_is_resp3(ctx));
    let waiter = Waiter::new(block_client(ctx, backstop), db, resp3, command, &shape, timeout, false);
    first_attempt(&node, waiter);
    Ok(())
}

/// Leader side of the follower proxy: a blocking command a follower's client sent, waiting here
/// like one of this node's clients, its answer going back to the follower whenever it comes.
/// Reads included: a forwarded `XREAD ... BLOCK` goes through the log, whatever the consistency.
pub fn serve_forwarded(node: &RaftNode, db: u32, argv: Vec<Vec<u8>>, resp3: bool, done: ForwardDone, abandoned: Abandoned) {
    if abandoned.is_set() {
        // The follower hung up before this node got to it: nobody waits any more.
        return;
    }
    let command: Vec<&[u8]> = argv.iter().map(Vec::as_slice).collect();
    if let Err(e) = crate::memory::refuse_if_over_limit(&command) {
        return done(Err(e));
    }
    let Some(shape) = BlockingCommand::of(&command) else {
        return done(Err("ERR wrong number of arguments for a blocking command".into()));
    };
    let timeout = shape::parse_timeout(command[shape.timeout], shape.unit);
    let waiter = Waiter::new(Requester::Forwarded { done, abandoned }, db, resp3, &command, &shape, timeout, false);
    first_attempt(node, waiter);
}

/// Registers `waiter` and proposes its first attempt.
fn first_attempt(node: &RaftNode, waiter: Waiter) {
    let attempt = Attempt::of(&waiter);
    let id = lock().add(waiter);
    propose(node, id, attempt);
}

impl Waiting {
    /// Registers a waiting client: its id.
    fn add(&mut self, waiter: Waiter) -> u64 {
        let id = self.next;
        self.next += 1;
        self.clients.insert(id, waiter);
        COUNT.store(self.clients.len(), Ordering::Relaxed);
        id
    }
}

impl Waiter {
    /// `client`, which sent `command` in database `db`, waits; its first attempt is in flight,
    /// unless it waits `local`ly (see [`wait_locally`]).
    fn new(
        client: Requester,
        db: u32,
        resp3: bool,
        command: &[&[u8]],
        shape: &BlockingCommand,
        timeout: Result<Option<Duration>, String>,
        local: bool,
    ) -> Waiter {
        let group = match shape.waits {
            Waits::Group(StreamRead { group: Some(at), .. }) => Some(command[at].to_vec()),
            _ => None,
        };
        Waiter {
            client,
            argv: ffi::owned_args(command),
            db,
            resp3,
            keys: shape.keys.iter().map(|&i| command[i].to_vec()).collect(),
            shape: shape.clone(),
            after: Vec::new(),
            group,
            local,
            timeout,
            arrived: Instant::now(),
            timer: None,
            first: !local,
            in_flight: !local,
            over: false,
        }
    }

    /// Answers the client; its wait is over.
    fn finish(self, outcome: Outcome) {
        self.client.finish(outcome, self.resp3);
    }
}

/// `XREAD ... BLOCK` at consistency `low`, from a client with no write in flight: it runs on this
/// node's dataset now, and if it finds nothing it waits here, for a batch this node applies to
/// bring one of its streams an entry after its ID ([`after_apply`]), whether this node leads or
/// not, as any read at `low` is served.
fn wait_locally(ctx: *mut RedisModuleCtx, command: &[&[u8]], shape: BlockingCommand) -> Result<(), String> {
    let resp3 = ffi::client_is_resp3(ctx);
    // The module's own call never blocks: a null when there is nothing to read yet. (Deleting
    // nothing the log may still meet alive, see `expiry`.)
    let reply = crate::expiry::reading(ctx, command, || ffi::call(ctx, command, resp3));
    if !is_null(reply) {
        ffi::reply_call_reply(ctx, reply);
        ffi::free_call_reply(reply);
        return Ok(());
    }
    ffi::free_call_reply(reply);
    let timeout = shape::parse_timeout(command[shape.timeout], shape.unit);
    let backstop = match &timeout {
        Ok(Some(t)) => *t + BACKSTOP,
        _ => Duration::ZERO,
    };
    let (db, resp3) = (ffi::selected_db(ctx), ffi::client_is_resp3(ctx));
    let mut waiter = Waiter::new(block_client(ctx, backstop), db, resp3, command, &shape, timeout, true);
    // Nothing runs between the read above and this: `$` is the last ID it saw. Its probe of the
    // streams reads them as the read did (Redis would otherwise delete a stream its own clock has
    // expired, on this node alone).
    crate::expiry::reading(ctx, command, || found_nothing(state::get().main_thread_ctx(), &mut waiter));
    let mut w = lock();
    // The id `add` gives it next, under the same lock.
    let id = w.next;
    let answer = start_timer(id, &mut waiter).err();
    w.add(waiter);
    if let Some(answer) = answer {
        let waiter = remove(&mut w, id);
        drop(w);
        if let Some(waiter) = waiter {
            waiter.finish(answer);
        }
    }
    Ok(())
}

/// What an attempt proposes.
struct Attempt {
    argv: Vec<Vec<u8>>,
    db: u32,
    resp3: bool,
    reads_only: bool,
}

impl Attempt {
    fn of(waiter: &Waiter) -> Attempt {
        Attempt::running(waiter, waiter.argv.clone())
    }

    /// `waiter`'s attempt, running `argv` (its command narrowed to the keys that are ready).
    fn running(waiter: &Waiter, argv: Vec<Vec<u8>>) -> Attempt {
        let reads_only = matches!(waiter.shape.waits, Waits::Stream(_));
        Attempt { argv, db: waiter.db, resp3: waiter.resp3, reads_only }
    }
}

fn propose(node: &RaftNode, id: u64, attempt: Attempt) {
    let mut argv: Args = attempt.argv.iter().map(|a| Cow::Borrowed(a.as_slice())).collect();
    let at = crate::expiry::stamp();
    // A read has nothing to pin, and watchers of its keys nothing to learn.
    if !attempt.reads_only {
        if let Err(e) = crate::write::prepare(attempt.db, &mut argv, at) {
            return attempted(id, Outcome::Error(e));
        }
    }
    let entry = encode_command(Some(at), attempt.db, &argv);
    // A transaction EXEC has just built goes into the log first.
    crate::transaction::flush();
    ATTEMPTS.fetch_add(1, Ordering::Relaxed);
    let waiter = WriteWaiter { reply_to: ReplyTo::Attempt(id), resp3: attempt.resp3 };
    node.propose(entry, waiter, Instant::now() + state::get().write_timeout());
}

/// An attempt for the client `id` was applied (on the main thread, right after its entry) or
/// failed (on any thread).
pub fn attempted(id: u64, outcome: Outcome) {
    let mut w = lock();
    let Some(waiter) = w.clients.get_mut(&id) else {
        drop(w);
        return crate::apply::discard(outcome);
    };
    waiter.in_flight = false;
    let first = std::mem::replace(&mut waiter.first, false);
    let answer = match outcome {
        Outcome::Call(reply) if is_null(reply) => {
            ffi::free_call_reply(reply);
            if first && !waiter.over {
                found_nothing(state::get().main_thread_ctx(), waiter);
            }
            match (waiter.over, first) {
                (true, _) => Outcome::NullArray,
                // Still waiting; the batch this attempt came in is looked at next (see
                // `after_apply`).
                (false, false) => return,
                (false, true) => match start_timer(id, waiter) {
                    Ok(()) => return,
                    Err(answer) => answer,
                },
            }
        }
        got_something_or_failed => got_something_or_failed,
    };
    let waiter = remove(&mut w, id);
    drop(w);
    if let Some(waiter) = waiter {
        waiter.finish(answer);
    }
}

/// The first attempt of a stream read found nothing (on the main thread, as of its entry): what
/// it waits for from now on, and how it is served.
fn found_nothing(ctx: *mut RedisModuleCtx, waiter: &mut Waiter) {
    let (Waits::Stream(read) | Waits::Group(read)) = waiter.shape.waits else { return };
    if let Waits::Stream(_) = waiter.shape.waits {
        if !ffi::select_db(ctx, waiter.db) {
            return;
        }
        // Each key's ID follows the keys.
        let ids = read.keys(waiter.argv.len()).map(|at| at + waiter.keys.len());
        waiter.after = ids
            .zip(&waiter.keys)
            .map(|(at, key)| {
                if waiter.argv[at] == b"$" {
                    waiter.argv[at] = stream_probe::last_generated_id(ctx, key);
                }
                StreamId::parse(&waiter.argv[at])
            })
            .collect();
    }
    let served = read.served_after_blocking(&waiter.argv);
    // A `COUNT` put in front moves the timeout, which a hand-over rewrites (`answer_if_deposed`).
    waiter.shape.timeout += served.len() - waiter.argv.len();
    waiter.argv = served;
}

/// The first attempt for the client `id` found nothing (on the main thread): it now waits, until
/// its timeout if it has one. Errs with the answer if it may not wait.
fn start_timer(id: u64, waiter: &mut Waiter) -> Result<(), Outcome> {
    // Redis accepted a timeout this module cannot read (a hexadecimal float): nothing was popped.
    let timeout = waiter.timeout.clone().map_err(Outcome::Error)?;
    let Some(timeout) = timeout else { return Ok(()) };
    let left = (waiter.arrived + timeout).saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Outcome::NullArray);
    }
    // A timeout past a century waits for ever.
    let Some(ms) = ffi::timer_period(left) else { return Ok(()) };
    let ctx = state::get().main_thread_ctx();
    waiter.timer = Some(unsafe { api!(RedisModule_CreateTimer)(ctx, ms, Some(deadline_passed), id as usize as *mut c_void) });
    Ok(())
}

/// After the main thread applied a batch of entries: proposes an attempt for each waiting client,
/// oldest first, whose keys hold something for it that no older client's attempt is already
/// after, and serves the `XREAD`s that can read something; answers the clients of a leader that
/// is one no more.
pub fn after_apply(ctx: *mut RedisModuleCtx) {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let Some(node) = state::get().node() else { return };
    let leader = node.is_leader();
    if !leader {
        answer_if_deposed();
    }
    let mut attempts = Vec::new();
    let mut reads = Vec::new();
    let mut answers = Vec::new();
    let mut look = Look::new(ctx);
    let mut w = lock();
    for waiter in w.clients.values().filter(|w| w.in_flight) {
        look.busy.extend(group_keys(waiter));
    }
    for (id, waiter) in w.clients.iter_mut() {
        if waiter.over || !(leader || waiter.local) {
            continue;
        }
        match waiter.shape.waits {
            Waits::List | Waits::SortedSet => {
                // Attempts in flight count too: each takes an element.
                let ready: Vec<usize> =
                    (0..waiter.keys.len()).filter(|&i| look.elements(waiter.db, &waiter.keys[i], waiter.shape.waits) > 0).collect();
                let Some(&first) = ready.first() else { continue };
                look.take(waiter.db, &waiter.keys[first]);
                if !waiter.in_flight {
                    waiter.in_flight = true;
                    let positions: Vec<usize> = ready.iter().map(|&i| waiter.shape.keys[i]).collect();
                    let argv = waiter.shape.narrowed_to(&waiter.argv, &positions);
                    attempts.push((*id, Attempt::running(waiter, argv)));
                }
            }
            Waits::Group(_) if !waiter.in_flight => match look.group_news(waiter) {
                GroupNews::Nothing => {}
                GroupNews::Entries => {
                    look.busy.extend(group_keys(waiter));
                    waiter.in_flight = true;
                    attempts.push((*id, Attempt::of(waiter)));
                }
                GroupNews::Gone(error) => answers.push((*id, error)),
            },
            Waits::Group(_) => {}
            Waits::Stream(_) => {
                if !waiter.in_flight && look.stream_has_news(waiter) {
                    reads.push(*id);
                }
            }
        }
    }
    let answered: Vec<(Waiter, &str)> = answers.into_iter().filter_map(|(id, e)| Some((remove(&mut w, id)?, e))).collect();
    drop(w);
    for (waiter, error) in answered {
        waiter.finish(Outcome::Error(error.into()));
    }
    for (id, attempt) in attempts {
        propose(&node, id, attempt);
    }
    for id in reads {
        read_now(ctx, id);
    }
}

/// Serves the `XREAD` of the client `id` from this leader's dataset, if it reads something now.
fn read_now(ctx: *mut RedisModuleCtx, id: u64) {
    let (argv, db, resp3) = match lock().clients.get(&id) {
        Some(waiter) => (waiter.argv.clone(), waiter.db, waiter.resp3),
        None => return,
    };
    if !ffi::select_db(ctx, db) {
        return;
    }
    // The module's own call never blocks: a null when there is nothing after its IDs after all.
    let reply = crate::expiry::reading(ctx, &argv, || ffi::call(ctx, &argv, resp3));
    if is_null(reply) {
        return ffi::free_call_reply(reply);
    }
    let mut w = lock();
    let waiter = remove(&mut w, id);
    drop(w);
    match waiter {
        Some(waiter) => waiter.finish(Outcome::Call(reply)),
        None => ffi::free_call_reply(reply),
    }
}

/// Before Redis sleeps: clients waiting on a leader that lost its leadership get `-MOVED` (or
/// `-CLUSTERDOWN`); those with an attempt in flight get its outcome first.
pub fn before_sleep() {
    if COUNT.load(Ordering::Relaxed) > 0 {
        answer_if_deposed();
        forget_abandoned();
    }
}

/// A leader that lost its leadership and got it back meanwhile keeps its waiting clients: an
/// attempt is an entry like any other, whichever term it is proposed in. Clients served locally
/// (see [`wait_locally`]) wait on, whoever leads.
fn answer_if_deposed() {
    let Some(node) = state::get().node() else { return };
    if node.is_leader() {
        return;
    }
    let mut w = lock();
    let deposed: Vec<u64> = w.clients.iter().filter(|(_, c)| !c.in_flight && !c.local).map(|(id, _)| *id).collect();
    if deposed.is_empty() {
        return;
    }
    let waiters: Vec<Waiter> = deposed.into_iter().filter_map(|id| remove(&mut w, id)).collect();
    drop(w);
    let status = node.status();
    let ctx = state::get().main_thread_ctx();
    // With the proxy, this node's own clients wait on at the next leader, as its followers' do.
    let me = status.members.get(&status.id).map(|m| m.raft_addr.clone()).filter(|_| state::get().follower_proxy());
    for waiter in waiters {
        let error = state::redirect(&status, slot_of(ctx, &waiter.argv));
        match (&me, waiter.client, waiter.timeout) {
            (Some(me), Requester::Here(blocked), Ok(timeout)) => {
                let deadline = timeout.map(|t| waiter.arrived + t);
                let timeout_arg = (waiter.shape.timeout, waiter.shape.unit);
                crate::forward_blocking::take_over(blocked, waiter.db, waiter.resp3, waiter.argv, deadline, timeout_arg, me.clone(), error);
            }
            (_, client, _) => client.finish(Outcome::Error(error), waiter.resp3),
        }
    }
}

/// Redis' timer for a client's own timeout.
extern "C" fn deadline_passed(_ctx: *mut RedisModuleCtx, data: *mut c_void) {
    let id = data as usize as u64;
    let run = || give_up(|clients| clients.get(&id).map(|_| id), Outcome::NullArray);
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking command's timer");
    }
}

/// A waiting client disconnected (or `CLIENT UNBLOCK ... ERROR`): it is forgotten, and so is its
/// wait, unless an attempt is in flight.
extern "C" fn disconnected(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    let run = || {
        give_up(|clients| by_handle(clients, bc), Outcome::Error("ERR client disconnected".into()));
        // It may wait at another leader now (see `forward_blocking::take_over`).
        crate::forward_blocking::cancel(bc, "ERR client disconnected");
    };
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking command's disconnect callback");
    }
}

/// `CLIENT UNBLOCK` (with TIMEOUT) of a waiting client. It answers as a timeout of the command
/// does (a null array, whichever the command, as in Redis); the wait itself is over.
extern "C" fn timed_out_by_redis(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    stop_waiting(bc);
    unsafe { api!(RedisModule_ReplyWithNullArray)(ctx) }
}

/// The backstop of a waiting client, well after its own timeout: answered as that timeout. One
/// that waits at another leader now (see `forward_blocking::take_over`) may have popped there: it
/// gets the proxy's `-TIMEOUT`, not the null array that says nothing was popped.
fn null_at_backstop(bc: *mut RedisModuleBlockedClient) -> Outcome {
    if crate::forward_blocking::waits(bc) {
        return crate::forward_blocking::timeout_at_backstop(bc);
    }
    stop_waiting(bc);
    Outcome::NullArray
}

fn stop_waiting(bc: *mut RedisModuleBlockedClient) {
    let run = || {
        give_up(|clients| by_handle(clients, bc), Outcome::Error("ERR timed out".into()));
        crate::forward_blocking::cancel(bc, "ERR timed out");
    };
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in a blocking command's timeout callback");
    }
}

/// Ends the wait `find` picks: at once, with `answer`, if no attempt is in flight; otherwise once
/// the attempt is applied, unless it gets something.
fn give_up(find: impl FnOnce(&BTreeMap<u64, Waiter>) -> Option<u64>, answer: Outcome) {
    let mut w = lock();
    let Some(id) = find(&w.clients) else { return };
    let Some(waiter) = w.clients.get_mut(&id) else { return };
    if waiter.in_flight {
        waiter.over = true;
        return;
    }
    let waiter = remove(&mut w, id);
    drop(w);
    if let Some(waiter) = waiter {
        waiter.finish(answer);
    }
}

fn by_handle(clients: &BTreeMap<u64, Waiter>, bc: *mut RedisModuleBlockedClient) -> Option<u64> {
    clients.iter().find(|(_, c)| c.client.is(bc)).map(|(id, _)| *id)
}

/// Forgets the waits of forwarded clients whose follower hung up (their client left or gave up,
/// or the follower stopped waiting on this node): as for a client of this node that leaves.
fn forget_abandoned() {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let now = raftis_core::forward::abandoned_so_far();
    if SEEN.swap(now, Ordering::AcqRel) == now {
        return;
    }
    let abandoned: Vec<u64> = {
        let w = lock();
        w.clients.iter().filter(|(_, c)| c.client.is_abandoned()).map(|(id, _)| *id).collect()
    };
    for id in abandoned {
        give_up(|clients| clients.get(&id).map(|_| id), Outcome::Error("ERR the follower hung up".into()));
    }
}

fn remove(w: &mut Waiting, id: u64) -> Option<Waiter> {
    let waiter = w.clients.remove(&id);
    COUNT.store(w.clients.len(), Ordering::Relaxed);
    if let Some(timer) = waiter.as_ref().and_then(|c| c.timer) {
        // Its data is the wait's id (see `start_timer`), and owns nothing.
        crate::stale_timers::stop_later(StaleTimer { id: timer, data: id as usize as *mut c_void, stopped: |_| {} });
    }
    waiter
}

fn is_null(reply: *mut ffi::RedisModuleCallReply) -> bool {
    !reply.is_null() && ffi::reply_type(reply) == redis_module::raw::REDISMODULE_REPLY_NULL as c_int
}

fn lock() -> std::sync::MutexGuard<'static, Waiting> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}
