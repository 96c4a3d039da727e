//! Reads under the consistency levels.
//!
//! - `low`: the filter leaves reads alone; every node serves its local dataset.
//! - `medium`: the filter leaves reads alone on a leader whose dataset has applied the first
//!   entry of its term; anything else comes here.
//! - `high`: every read comes here (`RAFT._READ <command ...>`). A ready leader runs it at once
//!   and holds the reply until a ReadIndex round confirms it still leads (see `held`).
//!   Otherwise (a leader not ready yet, or a Redis without the hooks) the client is blocked: the
//!   leader confirms it still leads with a ReadIndex round (all reads of one Raft round share
//!   it), waits until its dataset has applied that index, then runs the read and replies.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, RedisModuleCtx};
use crate::state;
use raftis_core::config::Consistency;
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
    let s = state::get();
    let node = s.node().ok_or_else(crate::write::not_initialized)?;
    if let Some(why) = s.fatal() {
        return Err(format!("CLUSTERDOWN this node stopped serving: {why}"));
    }
    if !node.is_leader() {
        if s.follower_proxy() {
            return crate::forward::to_leader(ctx, ffi::owned_args(argv));
        }
        return Err(state::redirect(&node.status()));
    }
    if crate::held::read(ctx, argv, &node) {
        return Ok(());
    }
    let timeout = s.write_timeout();
    let resp3 = ffi::client_is_resp3(ctx);
    let argv = ffi::owned_args(argv);
    let blocked = Blocked::new(ctx, timeout + Duration::from_secs(1));
    let progress = s.progress.clone();
    node.read_index(
        Box::new(move |confirmed| match confirmed {
            Ok(index) => progress.when_applied(index, Box::new(move || blocked.finish(Outcome::Run { argv, resp3 }))),
            Err(e) => blocked.finish(Outcome::Error(state::error_reply(&e))),
        }),
        Instant::now() + timeout,
    );
    Ok(())
}
