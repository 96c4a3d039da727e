//! `WAIT numreplicas timeout`: how many other nodes hold this client's writes.
//!
//! Redis answers how many replicas acknowledged every write the client made before WAIT, waiting
//! up to `timeout` milliseconds (0: for ever) until `numreplicas` of them have. Under Raft a write
//! is acknowledged only once a majority has it, so WAIT tells about the other nodes: the leader
//! counts the members, followers and learners, whose log holds every entry it had proposed when
//! WAIT came (the client's writes are among them), as its replication progress shows. It looks
//! again every few milliseconds until enough do, or answers the count it has when the timeout
//! passes. Inside MULTI it answers at once, as in Redis. A follower redirects it, or with the
//! proxy sends it to wait at the leader like a blocking command (see `forward_blocking`), once its
//! client's earlier writes are in; inside a transaction it goes with the transaction, and the
//! leader answers it at once there.

use crate::blocked::{Blocked, Outcome, Requester};
use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleString};
use crate::reply::Reply;
use crate::state::{self, RaftNode};
use raftis_core::blocking::{parse_timeout, Unit};
use raftis_core::cluster_view::HashSlot;
use raftis_core::forward::{Abandoned, ForwardDone};
use raftis_core::status::Status;
use raftis_core::LogIndex;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const WAIT_COMMAND: &str = "raft._wait";

/// How often waiting clients are looked at.
const CHECK_EVERY_MS: i64 = 2;

/// Clients waiting in WAIT. Changed on the main thread, and on the Raft thread when a client's
/// index is known.
static WAITING: Mutex<Vec<Waiting>> = Mutex::new(Vec::new());
/// Whether the timer that looks at them runs. Main thread only.
static TIMER: Mutex<bool> = Mutex::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Waiting {
    /// Told apart by this, not by Redis' handle, which a later client may get again.
    id: u64,
    client: Requester,
    /// What every counted node must hold: None until the Raft loop says.
    index: Option<LogIndex>,
    wanted: i64,
    /// When it answers the count it has.
    deadline: Option<Instant>,
}

/// RAFT.STATS: clients in WAIT (this node's and followers'), and those of them whose index the
/// Raft loop has named, which count the nodes that hold it (before, a count is 0).
pub fn stats() -> [(&'static str, u64); 2] {
    let waiting = lock();
    let counting = waiting.iter().filter(|w| w.index.is_some()).count();
    [("wait_clients", waiting.len() as u64), ("wait_clients_counting", counting as u64)]
}

/// WAIT's arguments, read in Redis' order with Redis' errors: how many nodes, and for how long.
fn parse(argv: &[&[u8]]) -> Result<(i64, Option<Duration>), String> {
    let [_, numreplicas, timeout] = argv else {
        return Err("ERR wrong number of arguments for 'wait' command".into());
    };
    let wanted = std::str::from_utf8(numreplicas)
        .ok()
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| "ERR value is not an integer or out of range".to_string())?;
    Ok((wanted, parse_timeout(timeout, Unit::Milliseconds)?))
}

/// `RAFT._WAIT WAIT numreplicas timeout`, which the filter makes of WAIT.
pub fn wait(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<Reply, String> {
    if !args.get(1).is_some_and(|name| name.eq_ignore_ascii_case(b"wait")) {
        return Err("ERR RAFT._WAIT only takes WAIT numreplicas timeout (it is used internally)".into());
    }
    let argv = &args[1..];
    let (wanted, timeout) = parse(argv)?;
    let s = state::get();
    let node = s.serving_node()?;
    if !node.is_leader() {
        if !s.follower_proxy() {
            return Err(state::redirect(&node.status(), HashSlot::NO_KEY));
        }
        if crate::transaction::in_exec(ctx) {
            // It goes with the transaction, and the leader answers it in place ([`at_once`]).
            let argv = ffi::owned_args(argv);
            crate::transaction::join(ctx, ffi::selected_db(ctx), argv, None)?;
        } else {
            crate::forward_blocking::to_leader(ctx, &node, argv, (2, Unit::Milliseconds))?;
        }
        return Ok(Reply::Blocked);
    }
    if crate::transaction::in_exec(ctx) {
        return Ok(Reply::Integer(at_once(&node)));
    }
    // The timeout answers the count at that moment; zero waits for ever. It is this module's
    // timer that keeps it: Redis' own, a second later, is a backstop (in Redis 7.0 a client whose
    // timer fires after the module answered it, before Redis took that answer, gets no reply).
    let deadline = timeout.map(|t| Instant::now() + t);
    let backstop = timeout.map_or(Duration::ZERO, |t| t + Duration::from_secs(1));
    let blocked = Blocked::with_backstop(ctx, backstop, Some(timed_out), count_at_backstop);
    blocked.on_disconnect(disconnected);
    start(&node, Requester::Here(blocked), wanted, deadline);
    Ok(Reply::Blocked)
}

/// Leader side of the follower proxy: a follower's client's WAIT. Its timeout is the follower's
/// to keep (it hangs up then); this node answers once enough nodes hold the log.
pub fn serve_forwarded(node: &RaftNode, argv: Vec<Vec<u8>>, done: ForwardDone, abandoned: Abandoned) {
    let refs: Vec<&[u8]> = argv.iter().map(Vec::as_slice).collect();
    match parse(&refs) {
        Ok((wanted, timeout)) => {
            let deadline = timeout.map(|t| Instant::now() + t);
            start(node, Requester::Forwarded { done, abandoned }, wanted, deadline)
        }
        Err(e) => done(Err(e)),
    }
}

/// `client` waits until `wanted` nodes hold every entry proposed so far.
fn start(node: &RaftNode, client: Requester, wanted: i64, deadline: Option<Instant>) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock().push(Waiting { id, client, index: None, wanted, deadline });
    start_timer(state::get().main_thread_ctx());
    // A transaction EXEC has just built (in this pipeline, say) is proposed at the end of the
    // event-loop turn: it goes first, so that WAIT counts it.
    crate::transaction::flush();
    node.last_proposed_index(Box::new(move |last| {
        let mut waiting = lock();
        let Some(at) = waiting.iter().position(|w| w.id == id) else { return };
        match last {
            Ok(index) => waiting[at].index = Some(index),
            Err(e) => {
                let w = waiting.remove(at);
                drop(waiting);
                w.client.finish(Outcome::Error(state::error_reply(&e, HashSlot::NO_KEY)), false);
            }
        }
    }));
}

/// WAIT inside a transaction, which does not wait, as in Redis: how many members other than the
/// leader hold every entry proposed so far.
pub fn at_once(node: &RaftNode) -> i64 {
    let status = node.status();
    holding(&status, status.last_index)
}

/// How many members other than the leader hold the log up to `index`.
fn holding(status: &Status, index: LogIndex) -> i64 {
    status.progress.iter().filter(|p| p.matched >= index).count() as i64
}

fn start_timer(ctx: *mut RedisModuleCtx) {
    let mut running = TIMER.lock().unwrap_or_else(|p| p.into_inner());
    if !*running {
        *running = true;
        unsafe { api!(RedisModule_CreateTimer)(ctx, CHECK_EVERY_MS, Some(check), std::ptr::null_mut()) };
    }
}

/// Redis' timer: answers the clients enough nodes caught up with, or whose leader is deposed.
extern "C" fn check(ctx: *mut RedisModuleCtx, _data: *mut c_void) {
    let run = || {
        let node = state::get().node();
        let status = node.as_ref().map(|node| node.status());
        let mut waiting = lock();
        let mut i = 0;
        while i < waiting.len() {
            let answer = match (&status, waiting[i].index) {
                _ if waiting[i].client.is_abandoned() => Some(Outcome::Error("ERR the follower hung up".into())),
                (Some(status), _) if !status.is_leader() => Some(Outcome::Error(state::redirect(status, HashSlot::NO_KEY))),
                (Some(status), index) => {
                    let count = index.map_or(0, |index| holding(status, index));
                    let over = waiting[i].deadline.is_some_and(|at| Instant::now() >= at);
                    (index.is_some() && count >= waiting[i].wanted || over).then_some(Outcome::Integer(count))
                }
                _ => None,
            };
            match answer {
                Some(answer) => waiting.remove(i).client.finish(answer, false),
                None => i += 1,
            }
        }
        let more = !waiting.is_empty();
        drop(waiting);
        let mut running = TIMER.lock().unwrap_or_else(|p| p.into_inner());
        *running = more;
        if more {
            unsafe { api!(RedisModule_CreateTimer)(ctx, CHECK_EVERY_MS, Some(check), std::ptr::null_mut()) };
        }
    };
    if std::panic::catch_unwind(run).is_err() {
        log::error!("panic in WAIT's timer");
        *TIMER.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

/// `CLIENT UNBLOCK` (with TIMEOUT): the count as it stands (0 before the Raft loop named the
/// index).
extern "C" fn timed_out(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    ffi::reply_integer(ctx, count_now(bc))
}

/// The backstop, a second after the timeout the module's timer keeps: the count as it stands.
fn count_at_backstop(bc: *mut RedisModuleBlockedClient) -> Outcome {
    Outcome::Integer(count_now(bc))
}

/// Forgets the client `bc` and counts the members holding what it waited for.
fn count_now(bc: *mut RedisModuleBlockedClient) -> i64 {
    let run = || {
        let index = forget(bc)?;
        let status = state::get().node()?.status();
        Some(holding(&status, index?))
    };
    std::panic::catch_unwind(run).ok().flatten().unwrap_or(0)
}

extern "C" fn disconnected(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    if std::panic::catch_unwind(|| forget(bc)).is_err() {
        log::error!("panic in WAIT's disconnect callback");
    }
}

/// Forgets the client `bc` (its `Blocked` is finished, for Redis to free): its index, if known.
fn forget(bc: *mut RedisModuleBlockedClient) -> Option<Option<LogIndex>> {
    let mut waiting = lock();
    let at = waiting.iter().position(|w| w.client.is(bc))?;
    let w = waiting.remove(at);
    drop(waiting);
    let index = w.index;
    w.client.finish(Outcome::Error("ERR the client stopped waiting".into()), false);
    Some(index)
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Waiting>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}
