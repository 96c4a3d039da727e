//! Reads under the consistency levels.
//!
//! - `low`: every node serves its local dataset.
//! - `medium`: a leader whose dataset has applied the first entry of its term serves its local
//!   dataset; anything else comes here.
//! - At both, the filter leaves reads alone unless some client's writes are in flight on this
//!   leader with their replies held: then reads come here, and a read of such a client waits
//!   for its writes (a pipeline reads its own writes), like at `high`. On a follower that
//!   forwards its clients' writes, such a read goes to the leader with them. A node that is not
//!   current (see `expiry`) sends its local reads here too, to read as of its log.
//! - Inside EXEC a read joins its transaction, whatever the level (see `transaction`).
//! - `high`: every read comes here (`RAFT._READ <command ...>`). A ready leader runs it at once
//!   and holds the reply until a ReadIndex round confirms it still leads (see `held`).
//!   Otherwise (a leader not ready yet, or a Redis without the hooks) the client is blocked: the
//!   leader confirms it still leads with a ReadIndex round (all reads of one Raft round share
//!   it), waits until its dataset has applied that index, then runs the read and replies.
//! - A follower answers the reads that come here `-MOVED`, or sends them to the leader: all of
//!   them with `follower-proxy yes`, those of a `READONLY` connection always (see
//!   `replica_reads`).

use crate::blocked::{Blocked, Outcome};
use crate::cluster_view::slot_of;
use crate::ffi::{self, RedisModuleCtx};
use crate::state;
use raftis_core::config::Consistency;
use raftis_core::routing::Route;
use std::time::{Duration, Instant};

pub const READ_COMMAND: &str = "raft._read";

/// Should the filter send this read through RAFT._READ?
pub fn needs_confirmation() -> bool {
    let s = state::get();
    match s.consistency() {
        Consistency::Low => false,
        Consistency::Medium => match s.node().and_then(|n| n.leader_ready_index()) {
            Some(ready) => s.progress.applied() < ready,
            None => true,
        },
        Consistency::High => true,
    }
}

pub fn read(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let argv = &args[1..];
    if argv.is_empty() {
        return Err("ERR wrong number of arguments for 'raft._read' command".into());
    }
    // A client may call it too: whatever is not a read would run here alone, outside the log.
    match state::get().route(argv) {
        Route::Read => {}
        Route::Refuse(e) => return Err(e),
        _ => return Err("ERR RAFT._READ only takes read commands (it is used internally)".into()),
    }
    if crate::transaction::in_exec(ctx) {
        return crate::transaction::join(ctx, ffi::selected_db(ctx), ffi::owned_args(argv), None);
    }
    // Also at consistency low: a stopped node's dataset falls further behind for good, and one
    // in no cluster yet holds nobody's data.
    state::get().serving_node()?;
    if !needs_confirmation() {
        // Here only because some client has writes in flight or a transaction open (see the
        // filter): the read waits for its own client's writes, if it has any, and otherwise
        // runs now. On a follower that forwards them, this node may apply them only after the
        // leader has answered: the read goes to the leader with them, to read them.
        if forwards_to_leader() && crate::held::has_replies_in_flight(ctx) {
            return crate::forward::to_leader(ctx, ffi::owned_args(argv));
        }
        if let Some(until) = state::get().replaying_to() {
            // A restarted node, still replaying its log: the read waits until it has.
            crate::blocked::refuse_if_caller_cannot_wait(ctx)?;
            let s = state::get();
            let blocked = Blocked::new(ctx, s.write_timeout() + Duration::from_secs(1));
            let (argv, resp3) = (ffi::owned_args(argv), ffi::client_is_resp3(ctx));
            s.progress.when_applied(until, Box::new(move || blocked.finish(Outcome::Run { argv, resp3 })));
            return Ok(());
        }
        if !crate::held::read_behind_writes(ctx, argv) {
            // Or because this node may not delete keys by its clock now (see `expiry`).
            crate::expiry::reading(ctx, argv, || ffi::call_and_reply(ctx, argv, ffi::client_is_resp3(ctx)));
        }
        return Ok(());
    }
    let s = state::get();
    let node = s.serving_node()?;
    if !node.is_leader() {
        if s.follower_proxy() || crate::replica_reads::through_leader(ctx) {
            return crate::forward::to_leader(ctx, ffi::owned_args(argv));
        }
        return Err(state::redirect(&node.status(), slot_of(ctx, argv)));
    }
    if crate::held::read(ctx, argv, &node) {
        return Ok(());
    }
    crate::blocked::refuse_if_caller_cannot_wait(ctx)?;
    let blocked = Blocked::new(ctx, s.write_timeout() + Duration::from_secs(1));
    confirm_then_run(blocked, ffi::owned_args(argv), ffi::client_is_resp3(ctx));
    Ok(())
}

/// Whether this node runs its clients' writes through the leader (a follower with the proxy).
fn forwards_to_leader() -> bool {
    let s = state::get();
    s.follower_proxy() && s.node().is_some_and(|n| !n.is_leader())
}

/// The blocking path: confirms this node still leads with a ReadIndex round, waits until the
/// dataset has applied the read index, then runs `argv` for the blocked client.
pub fn confirm_then_run(blocked: Blocked, argv: Vec<Vec<u8>>, resp3: bool) {
    let s = state::get();
    let Some(node) = s.node() else {
        return blocked.finish(Outcome::Error(crate::write::not_initialized()));
    };
    let progress = s.progress.clone();
    let slot = slot_of(s.main_thread_ctx(), &argv);
    node.read_index(
        Box::new(move |confirmed| match confirmed {
            Ok(index) => progress.when_applied(index, Box::new(move || blocked.finish(Outcome::Run { argv, resp3 }))),
            Err(e) => blocked.finish(Outcome::Error(state::error_reply(&e, slot))),
        }),
        Instant::now() + s.write_timeout(),
    );
}
