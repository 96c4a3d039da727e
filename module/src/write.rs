//! `RAFT._CMD <command ...>`: a client write. On the leader it is pinned (relative times made
//! absolute) and proposed; the reply is the one Redis produced when applying it here. A ready
//! leader leaves a slot for it in the client's output and keeps reading its pipeline (see
//! `held`); otherwise the client blocks until the entry is applied. Elsewhere the client is
//! redirected (or forwarded, with follower-proxy). Inside EXEC the write joins its transaction
//! (see `transaction`). Over the memory limit, the leader refuses what may grow memory (see
//! `memory`), and discards a transaction that holds such a command, as Redis does at EXEC.

use crate::apply::{ReplyTo, WriteWaiter};
use crate::blocked::Blocked;
use crate::ffi::{self, RedisModuleCtx};
use crate::state;
use raftis_core::command_entry::{encode_command, EntryTime};
use raftis_core::determinism::{self, Args};
use raftis_core::memory_limit;
use raftis_core::routing::Route;
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// How much longer than write-timeout Redis' own backstop timer waits.
const BACKSTOP: Duration = Duration::from_secs(1);

pub fn write(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let command = &args[1..];
    let s = state::get();
    match s.route(command) {
        Route::Write => {}
        // Only inside EXEC (see `blocking`), where it does not block.
        Route::Blocking if crate::transaction::in_exec(ctx) => {}
        Route::Refuse(e) => return Err(e),
        _ => return Err("ERR RAFT._CMD only takes write commands (it is used internally)".into()),
    }
    if crate::transaction::in_exec(ctx) {
        // Readied, a command of a discarded transaction would tell WATCH of a write that never
        // happens.
        crate::transaction::refuse_if_discarded(ctx)?;
        crate::restore_trial::check(ctx, command)?;
        let db = ffi::selected_db(ctx);
        // A follower forwards the transaction as its client sent it: the leader readies it
        // (see `forward`), pinning its times with the leader's clock, the one the entry
        // applies by (this node's may be off it), and holding the memory limit.
        if !s.node().is_some_and(|n| n.is_leader()) {
            return crate::transaction::join(ctx, db, ffi::owned_args(command), None);
        }
        let mut argv: Args = command.iter().map(|a| Cow::Borrowed(*a)).collect();
        let at = crate::transaction::entry_time(ctx);
        prepare_admitted(db, &mut argv, at).map_err(|e| match e == memory_limit::OOM_ERROR {
            true => crate::transaction::abort_over_memory_limit(ctx),
            false => e,
        })?;
        let argv = argv.into_iter().map(Cow::into_owned).collect();
        return crate::transaction::join(ctx, db, argv, Some(at));
    }
    let node = s.serving_node()?;
    if !node.is_leader() {
        let status = node.status();
        if s.follower_proxy() {
            crate::restore_trial::check(ctx, command)?;
            return crate::forward::to_leader(ctx, ffi::owned_args(command));
        }
        return Err(state::redirect(&status, crate::cluster_view::slot_of(ctx, command)));
    }
    crate::restore_trial::check(ctx, command)?;
    let mut argv: Args = command.iter().map(|a| Cow::Borrowed(*a)).collect();
    let db = ffi::selected_db(ctx);
    let at = crate::expiry::stamp();
    prepare_admitted(db, &mut argv, at)?;
    let entry = encode_command(Some(at), db, &argv);
    let timeout = s.write_timeout();
    let resp3 = ffi::client_is_resp3(ctx);
    // A transaction this client (or another) just ran goes into the log first.
    crate::transaction::flush();
    let reply_to = match crate::held::write_slot(ctx, &node) {
        Some(slot) => ReplyTo::Held(slot),
        None => ReplyTo::Client(Blocked::new(ctx, timeout + BACKSTOP)),
    };
    node.propose(entry, WriteWaiter { reply_to, resp3 }, Instant::now() + timeout);
    Ok(())
}

/// Readies a write in database `db` for the log entry of time `at` (see `expiry::stamp`):
/// relative times are made absolute from `at` (see `determinism`), an `SPOP` gets the members it
/// will pop (see `set_pop`), and clients watching its keys learn it is coming (see `watch`). An
/// error is the write's reply: it cannot be replicated.
pub fn prepare(db: u32, argv: &mut Args, at: EntryTime) -> Result<(), String> {
    ready(db, argv, at, false)
}

/// [`prepare`] for a client's command on the leader, which also holds the memory limit: over it,
/// a write that may grow memory is refused, and a script is marked (see `memory`).
pub fn prepare_admitted(db: u32, argv: &mut Args, at: EntryTime) -> Result<(), String> {
    ready(db, argv, at, true)
}

fn ready(db: u32, argv: &mut Args, at: EntryTime, hold_memory_limit: bool) -> Result<(), String> {
    crate::scripts::prepare(argv)?;
    if determinism::database_indexes(argv).iter().any(|n| *n >= i64::from(state::get().databases)) {
        return Err(DB_OUT_OF_RANGE.into());
    }
    if argv.first().is_some_and(|name| determinism::runs_by_the_log_clock(name)) {
        crate::clock::available().map_err(|why| {
            format!("ERR {} needs the log's clock, which this Redis cannot give: {why}", String::from_utf8_lossy(&argv[0]).to_uppercase())
        })?;
    }
    determinism::pin(argv, at.0);
    if crate::clock::available().is_err() {
        determinism::pin_automatic_stream_id(argv, at.0);
    }
    crate::set_pop::draw_candidates(db, argv)?;
    // Refused before WATCH hears of it: a write that never happens must not abort a transaction.
    let mark = hold_memory_limit && crate::memory::admit(argv)?;
    crate::scripts::proposing(argv);
    crate::watch::touch(db, argv);
    if mark {
        argv.insert(0, Cow::Borrowed(memory_limit::OVER_LIMIT));
    }
    Ok(())
}

/// Redis' error for a database number it does not have.
pub const DB_OUT_OF_RANGE: &str = "ERR DB index is out of range";

/// `RAFT._REFUSE <command ...>`: the error for a command Raftis does not support.
pub fn refuse(args: Vec<Vec<u8>>) -> String {
    let refs: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
    match state::get().route(&refs) {
        Route::Refuse(e) => e,
        _ => "ERR command refused".into(),
    }
}

pub fn not_initialized() -> String {
    "CLUSTERDOWN this node is not part of a cluster yet; use RAFT.CLUSTER INIT or RAFT.CLUSTER JOIN".into()
}
