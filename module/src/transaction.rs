//! MULTI/EXEC: a transaction is one log entry.
//!
//! Redis itself queues the commands sent between MULTI and EXEC (answering `+QUEUED`, aborting on
//! an unknown command) and runs them at EXEC, each as the filter routed it: writes reach
//! `RAFT._CMD`, reads `RAFT._READ`, connection commands (SELECT, PING) run natively. On the
//! leader, each data command of the EXEC leaves a held reply slot and joins the transaction's
//! batch instead of running. Once EXEC is over, the batch is proposed as one entry, and every node
//! runs its commands back to back: nothing interleaves with them, and a read inside sees the
//! writes before it. The leader fills the slots with the replies its own apply produced.
//!
//! For reads to reach `RAFT._READ` at consistency low and medium, the filter must know that a
//! transaction may be open, and it cannot tell clients apart. So MULTI goes through
//! `RAFT._MULTI`, which knows the client, opens the transaction the way Redis does and records
//! the client; while any client is recorded, the filter routes every read through the module.
//!
//! On a follower with `follower-proxy yes`, the transaction is queued and run the same way, and
//! the batch goes whole to the leader (see `forward`), which proposes it as one entry and sends
//! every command's reply back for the slots. The commands a client sends there outside MULTI
//! join its batch too ([`join_forwarded`]): a pipeline sent to a follower reaches the leader in
//! one piece instead of one round trip per command.
//!
//! WATCH is Redis' own check at EXEC, with writes counted from when they are proposed (see
//! `watch`): a dirty transaction never reaches this module.

use crate::apply::{ReplyTo, TransactionSlot, WriteWaiter};
use crate::ffi::{api, ClientId, RedisModuleCtx};
use crate::gate::{Gate, OpensOnDrop};
use crate::held::{self, HeldReply};
use crate::state;
use raftis_core::cluster_view::HashSlot;
use raftis_core::command_entry::{encode_transaction, EntryTime};
use raftis_core::memory_limit;
use redis_module::raw;
use rustc_hash::FxHashSet;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Only touched on Redis' main thread; the lock is never contended.
static TRANSACTIONS: Mutex<Transactions> = Mutex::new(Transactions { open: None, batch: None });
/// How many clients may have a transaction open: the filter's cheap check.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// A batch waits to be proposed: the write path's cheap check.
static BATCH: AtomicBool = AtomicBool::new(false);
/// A pipeline's command joins its client's batch for the leader (see [`join_forwarded`]) only
/// while the batch stays under this size, and under half of `max-entry-size`: a batch travels as
/// one message and becomes one log entry (which the leader's rewrites, absolute expiry times
/// and the like, make a little larger), and the leader reads no bulk string over 256 MB. A
/// command past it goes alone, after the batch's replies.
const MAX_FORWARDED_BATCH_BYTES: usize = 8 << 20;

struct Transactions {
    /// Clients that ran MULTI and may still be queueing commands.
    open: Option<FxHashSet<ClientId>>,
    /// The transaction EXEC is running (or has just run): its commands so far.
    batch: Option<Batch>,
}

struct Batch {
    client: ClientId,
    /// Decided by its first command, so that every command of one EXEC joins, or none does:
    /// leadership can change while EXEC runs, and a part of a transaction must never commit.
    verdict: Result<Destination, String>,
    commands: Vec<(u32, Vec<Vec<u8>>)>,
    /// How many of the commands, from the first, are the EXEC's; on a follower, the client's
    /// pipeline after EXEC joins the batch too (see [`join_forwarded`]), and MULTI starts a new
    /// batch, so the EXEC's come first.
    exec: usize,
    /// The size of the commands' arguments.
    bytes: usize,
    /// One per command; None when the client takes no replies.
    slots: Vec<Option<HeldReply>>,
    /// The protocol of each command: a HELLO that EXEC runs (or that the client pipelines)
    /// switches it for the commands after it, and each answers in its own, as in Redis.
    protocols: Vec<bool>,
    /// The time the entry happens at: that of its first write (see `expiry`).
    at: Option<EntryTime>,
    /// Forwarded, it waits behind the client's batch before it (see `gate`).
    after: Option<Gate>,
}

/// The last batch this follower forwarded, with its client: the client's next batch, split from
/// it by a MULTI in one pipeline, waits for its replies (see `gate`). One is enough: a client's
/// whole pipeline is read before another client's, and once the turn ends its output is held
/// until the replies are in.
static LAST_FORWARDED: Mutex<Option<(ClientId, Gate)>> = Mutex::new(None);

/// Whether some client may have a transaction open (see the module comment).
pub fn any_open() -> bool {
    OPEN.load(Ordering::Relaxed) > 0
}

/// Whether the command of `ctx` runs inside EXEC.
pub fn in_exec(ctx: *mut RedisModuleCtx) -> bool {
    let flags = unsafe { api!(RedisModule_GetContextFlags)(ctx) };
    flags & raw::REDISMODULE_CTX_FLAGS_MULTI as i32 != 0
}

/// Where a transaction's batch goes.
#[derive(Clone, Copy, Debug)]
enum Destination {
    /// Proposed by this node, a ready leader.
    Log,
    /// Forwarded to the leader by this follower (follower proxy).
    Leader,
}

/// `RAFT._MULTI`, which the filter makes of MULTI. Transactions run on the leader, or through a
/// follower that forwards them.
pub fn begin(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    if in_exec(ctx) {
        // Queued by Redis because the client was already in a transaction.
        return Err("ERR MULTI calls can not be nested".into());
    }
    let s = state::get();
    let node = s.serving_node()?;
    if !node.is_leader() && !s.follower_proxy() {
        // MULTI names no key: the client is to learn the leader, whatever the slot.
        return Err(state::redirect(&node.status(), HashSlot::NO_KEY));
    }
    held::begin_multi(ctx)?;
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    crate::watch::transaction_opened(id);
    let mut t = lock();
    // The pipeline's commands before MULTI (a follower forwards them in one batch) go first:
    // a command of the transaction that is refused discards the transaction, not them.
    if t.batch.is_some() {
        propose(t.batch.take());
    }
    if t.open.get_or_insert_with(FxHashSet::default).insert(id) {
        OPEN.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A data command of the transaction EXEC is running for the client of `ctx`: it joins the
/// batch, and its reply comes once the batch is applied. An error is this command's reply.
/// A write comes pinned for time `at` on the leader; as its client sent it, `None`, on a follower.
pub fn join(ctx: *mut RedisModuleCtx, db: u32, argv: Vec<Vec<u8>>, at: Option<EntryTime>) -> Result<(), String> {
    let mut t = lock();
    let batch = batch_of(&mut t, ctx, &argv);
    batch.verdict.clone()?;
    batch.at = batch.at.or(at);
    batch.slots.push(held::transaction_slot(ctx));
    batch.protocols.push(crate::ffi::client_is_resp3(ctx));
    batch.bytes += size_of(&argv);
    if batch.exec == batch.commands.len() {
        batch.exec += 1;
    }
    batch.commands.push((db, argv));
    Ok(())
}

/// The time a write of the transaction EXEC runs for the client of `ctx` is pinned to: the
/// entry's, which is its first write's. Every command of the entry then reads one clock, as the
/// entry applies at that time: a deadline a later command sets "now" (`EXPIRE k 0`) is due at
/// once, however many milliseconds EXEC took to get there.
pub fn entry_time(ctx: *mut RedisModuleCtx) -> EntryTime {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let t = lock();
    t.batch.as_ref().filter(|b| b.client == id).and_then(|b| b.at).unwrap_or_else(crate::expiry::stamp)
}

/// A command of the EXEC that `ctx`'s client runs now was refused before it could join (its user
/// may not run it, see `acl`): nothing of the transaction runs, as Redis refuses such a command
/// when it is queued and then discards the transaction. Commands that joined already, and those
/// after it, answer why.
pub fn abort(ctx: *mut RedisModuleCtx, refused: &str) {
    discard(ctx, format!("EXECABORT Transaction discarded because a command was refused: {refused}"));
}

/// A command of the EXEC that `ctx`'s client runs now may grow memory, and this leader is over
/// its limit (see `memory`): nothing of the transaction runs, as Redis discards it at EXEC. The
/// reply for it, as for every other command of the transaction.
pub fn abort_over_memory_limit(ctx: *mut RedisModuleCtx) -> String {
    discard(ctx, exec_abort(memory_limit::OOM_ERROR))
}

/// The error of the transaction EXEC is running for `ctx`'s client, if it was discarded.
pub fn refuse_if_discarded(ctx: *mut RedisModuleCtx) -> Result<(), String> {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    match lock().batch.as_ref().filter(|b| b.client == id) {
        Some(Batch { verdict: Err(e), .. }) => Err(e.clone()),
        _ => Ok(()),
    }
}

/// Redis' error for an EXEC it discards for `why` (its `execCommandAbort`).
pub fn exec_abort(why: &str) -> String {
    format!("EXECABORT Transaction discarded because of: {why}")
}

/// Discards the transaction EXEC is running for `ctx`'s client, for `error` unless it was
/// discarded already: the error its commands answer.
fn discard(ctx: *mut RedisModuleCtx, error: String) -> String {
    let mut t = lock();
    let batch = batch_of(&mut t, ctx, &[]);
    match &batch.verdict {
        Err(first) => first.clone(),
        Ok(_) => {
            batch.verdict = Err(error.clone());
            error
        }
    }
}

fn size_of(argv: &[Vec<u8>]) -> usize {
    argv.iter().map(|a| a.len() + 8).sum()
}

/// What became of a command a follower sends to the leader (see [`join_forwarded`]).
pub enum Forwarding {
    /// It joined its client's batch; its reply fills a slot.
    Joined,
    /// Its reply: it cannot be forwarded (no leader known).
    Refused(String),
    /// Not here: forward it on its own, blocking the client.
    Alone(Vec<Vec<u8>>),
}

/// Follower proxy: a command the client of `ctx` sends outside MULTI, for the leader, joins the
/// client's batch as a command of EXEC does, with a reply slot of its own, so that the client's
/// pipeline keeps flowing. Everything a client sends in one event-loop turn goes to the leader
/// together and in order (its EXECs included), as one entry: the commands of a pipeline may run
/// back to back, which no client can tell from a pipeline's usual order. The client's output is
/// held until the replies are in, so Redis reads nothing more from it meanwhile, and its next
/// batch cannot overtake this one.
pub fn join_forwarded(ctx: *mut RedisModuleCtx, db: u32, argv: Vec<Vec<u8>>) -> Forwarding {
    if held::transactions_available().is_err() {
        return Forwarding::Alone(argv);
    }
    let mut t = lock();
    if t.batch.as_ref().is_some_and(|b| b.verdict.is_err()) && !in_exec(ctx) {
        // A transaction discarded just before (see `abort`): its error answers its own
        // commands, not the pipeline's commands after its EXEC.
        propose(t.batch.take());
    }
    let batch = batch_of(&mut t, ctx, &argv);
    match batch.verdict.clone() {
        Ok(Destination::Leader) => {}
        Ok(Destination::Log) => return Forwarding::Alone(argv),
        Err(e) => return Forwarding::Refused(e),
    }
    let size = size_of(&argv);
    let max_entry = state::get().node().map_or(u64::MAX, |n| n.max_entry_bytes());
    let limit = MAX_FORWARDED_BATCH_BYTES.min(usize::try_from(max_entry / 2).unwrap_or(usize::MAX));
    if !batch.commands.is_empty() && batch.bytes + size > limit {
        return Forwarding::Alone(argv);
    }
    // A client with too many replies in flight blocks instead (see `held`).
    let Some(slot) = held::forward_slot(ctx) else { return Forwarding::Alone(argv) };
    batch.slots.push(Some(slot));
    batch.protocols.push(crate::ffi::client_is_resp3(ctx));
    batch.bytes += size;
    batch.commands.push((db, argv));
    Forwarding::Joined
}

/// The batch of the client of `ctx`, opened if need be for its command `first`. Another client's
/// batch is complete (its EXEC is over, or its pipeline read): it goes first.
fn batch_of<'a>(t: &'a mut Transactions, ctx: *mut RedisModuleCtx, first: &[Vec<u8>]) -> &'a mut Batch {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    if t.batch.as_ref().is_some_and(|b| b.client != id) {
        propose(t.batch.take());
    }
    if t.batch.is_none() {
        t.batch = Some(Batch {
            client: id,
            verdict: destination(ctx, first),
            commands: Vec::new(),
            exec: 0,
            bytes: 0,
            slots: Vec::new(),
            protocols: Vec::new(),
            at: None,
            after: LAST_FORWARDED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|(client, _)| *client == id)
                .map(|(_, gate)| gate.clone()),
        });
        BATCH.store(true, Ordering::Release);
        // Proposed when this event-loop turn ends; an EXEC run outside one (a pipeline resumed
        // after a blocked command) gets a turn of its own.
        if !held::in_turn() {
            unsafe { api!(RedisModule_EventLoopAddOneShot)(Some(flush_later), std::ptr::null_mut()) };
        }
    }
    t.batch.as_mut().expect("opened above")
}

/// Where the batch that starts with the command `first` goes; `-MOVED` names its key's slot.
fn destination(ctx: *mut RedisModuleCtx, first: &[Vec<u8>]) -> Result<Destination, String> {
    held::transactions_available()?;
    let s = state::get();
    let node = s.node().ok_or_else(crate::write::not_initialized)?;
    if held::ready_term(&node).is_some() {
        return Ok(Destination::Log);
    }
    let status = node.status();
    if node.is_leader() {
        return Err("CLUSTERDOWN the leader is still applying the log of its term; retry".into());
    }
    // A read of a `READONLY` connection may start a batch too (see `replica_reads`).
    if s.follower_proxy() || crate::replica_reads::through_leader(ctx) {
        // Its WATCH was served here, when this node led (followers refuse WATCH); the next
        // leader could not check it.
        if crate::watch::watches(unsafe { api!(RedisModule_GetClientId)(ctx) }) {
            return Err("EXECABORT the leader changed after WATCH; WATCH again, on the new leader".into());
        }
        return Ok(Destination::Leader);
    }
    Err(state::redirect(&status, crate::cluster_view::slot_of(ctx, first)))
}

/// Proposes the transaction EXEC has built, if any. Every write proposed on this node calls
/// this first, so a client's transaction is in the log before the commands it sent after EXEC.
pub fn flush() {
    if BATCH.load(Ordering::Acquire) {
        let batch = lock().batch.take();
        propose(batch);
    }
}

fn propose(batch: Option<Batch>) {
    BATCH.store(false, Ordering::Release);
    let Some(batch) = batch else { return };
    let destination = match batch.verdict {
        Ok(destination) if !batch.commands.is_empty() => destination,
        Ok(_) => return,
        Err(error) => {
            // Aborted after some commands joined (see `abort`): they get the reason too.
            batch.slots.into_iter().flatten().for_each(|slot| slot.fail(&error));
            return;
        }
    };
    if let Destination::Leader = destination {
        let gate = Gate::closed();
        *LAST_FORWARDED.lock().unwrap_or_else(|p| p.into_inner()) = Some((batch.client, gate.clone()));
        let send = crate::forward::transaction_to_leader(batch.commands, batch.exec, batch.slots, batch.protocols, OpensOnDrop(gate));
        return match batch.after {
            Some(before) => before.then(send),
            None => send(),
        };
    }
    let s = state::get();
    let Some(node) = s.node() else {
        // Dropped slots answer with an error.
        return;
    };
    let at = batch.at.unwrap_or_else(crate::expiry::stamp);
    let entry = encode_transaction(Some(at), &batch.commands);
    let first_resp3 = batch.protocols[0];
    let slots = batch.slots.into_iter().zip(batch.protocols).map(|(held, resp3)| TransactionSlot { held, resp3 }).collect();
    let waiter = WriteWaiter { reply_to: ReplyTo::Transaction(slots), resp3: first_resp3 };
    node.propose(entry, waiter, Instant::now() + s.write_timeout());
}

extern "C" fn flush_later(_data: *mut c_void) {
    if std::panic::catch_unwind(flush).is_err() {
        log::error!("panic while proposing a transaction");
    }
}

/// Before Redis sleeps: proposes the last EXEC's transaction and forgets clients that are no
/// longer in one (EXEC, DISCARD, RESET, or gone).
pub fn before_sleep() {
    flush();
    if OPEN.load(Ordering::Relaxed) == 0 {
        return;
    }
    let mut t = lock();
    let Some(open) = t.open.as_mut() else { return };
    open.retain(|id| in_multi(*id));
    OPEN.store(open.len(), Ordering::Relaxed);
}

fn in_multi(id: ClientId) -> bool {
    crate::ffi::client_flags(id).is_some_and(|flags| flags & raw::REDISMODULE_CLIENTINFO_FLAG_MULTI as u64 != 0)
}

fn lock() -> std::sync::MutexGuard<'static, Transactions> {
    TRANSACTIONS.lock().unwrap_or_else(|p| p.into_inner())
}
