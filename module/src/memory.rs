//! The memory limit, on the node that readies commands for the log (see
//! `raftis_core::memory_limit` for why Redis' own `maxmemory` is not used). It measures memory as
//! Redis does for `maxmemory` (`used_memory`: what Redis allocated; a Raftis node has no replica
//! buffers or AOF buffer to leave out) and answers as Redis' `processCommand` would.
//!
//! Redis' allocation counter is not module API: `zmalloc_used_memory` is looked up at load.
//! Without it no limit can be set.

use crate::ffi::{self, RedisModuleCtx};
use crate::state;
use raftis_core::determinism::Args;
use raftis_core::memory_limit::{ScriptFlags, OOM_ERROR};
use std::sync::OnceLock;

type UsedMemory = unsafe extern "C" fn() -> usize;

static USED_MEMORY: OnceLock<Result<UsedMemory, String>> = OnceLock::new();

/// At load: finds Redis' allocation counter. An error says why no limit can be set.
pub fn init() -> Result<(), String> {
    USED_MEMORY.get_or_init(|| unsafe { ffi::find_function::<UsedMemory>("zmalloc_used_memory") }).clone().map(|_| ())
}

/// Whether a limit of `bytes` can be held here: an error naming why not.
pub fn check_limit(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    match USED_MEMORY.get() {
        Some(Ok(_)) => Ok(()),
        Some(Err(why)) => Err(format!("a memory limit cannot be held on this Redis: {why}")),
        None => Err("a memory limit cannot be held: the module is not initialised".into()),
    }
}

/// The memory Redis has allocated, as `INFO memory` reports `used_memory`.
fn used() -> Option<u64> {
    match USED_MEMORY.get() {
        Some(Ok(f)) => Some(unsafe { f() } as u64),
        _ => None,
    }
}

/// Whether this node is over its limit now.
pub fn over_limit() -> bool {
    let limit = state::get().maxmemory();
    limit != 0 && used().is_some_and(|used| used > limit)
}

/// A client's command, readied for the log by the leader: over the limit, a command that may grow
/// memory is refused with Redis' `-OOM` error. A script that decides inside itself passes: true
/// says its entry must carry [`raftis_core::memory_limit::OVER_LIMIT`], for every node to decide
/// alike.
pub fn admit(argv: &Args) -> Result<bool, String> {
    if !over_limit() {
        return Ok(false);
    }
    let Some(name) = argv.first() else { return Ok(false) };
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    // `EVALSHA` is `EVAL` of its text by now (see `scripts::prepare`), `EVALSHA_RO` `EVAL_RO`.
    let flags = if is(b"eval") || is(b"eval_ro") {
        argv.get(1).map(|text| ScriptFlags::of_script(text))
    } else if is(b"fcall") || is(b"fcall_ro") {
        argv.get(1).and_then(|function| function_flags(state::get().main_thread_ctx(), function))
    } else {
        None
    };
    match flags {
        // A read-only script without flags can write nothing, so nothing of it is refused.
        Some(ScriptFlags::Compatible) if is(b"eval_ro") => Ok(false),
        Some(ScriptFlags::Compatible) => Ok(true),
        Some(ScriptFlags::MayRunOverLimit) => Ok(false),
        Some(ScriptFlags::RefusedOverLimit) => Err(OOM_ERROR.into()),
        // An unknown function (Redis' own error when it applies), or no script at all.
        None => refuse_if_grows(&argv.iter().map(|a| a.as_ref()).collect::<Vec<_>>()).map(|()| false),
    }
}

/// A command that is never a script (a blocking pop): refused over the limit if it may grow memory.
pub fn refuse_if_over_limit(argv: &[&[u8]]) -> Result<(), String> {
    if over_limit() {
        refuse_if_grows(argv)?;
    }
    Ok(())
}

/// Over the limit (the caller checked): Redis' error for a command that may grow memory.
fn refuse_if_grows(argv: &[&[u8]]) -> Result<(), String> {
    if state::get().grows_memory(argv) {
        return Err(OOM_ERROR.into());
    }
    Ok(())
}

/// The flags of `function` from `FUNCTION LIST`; None if no library defines it. Asked only over
/// the limit, so its cost does not matter.
fn function_flags(ctx: *mut RedisModuleCtx, function: &[u8]) -> Option<ScriptFlags> {
    let reply = ffi::call_strs(ctx, &["FUNCTION", "LIST"]);
    let flags = find_function_flags(reply, function);
    ffi::free_call_reply(reply);
    flags.map(ScriptFlags::of_flags)
}

/// In `FUNCTION LIST`'s reply (libraries, each `library_name`, `engine`, `functions` as field and
/// value; each function `name`, `description`, `flags` likewise), the flags of `function`. Redis
/// matches function names case-insensitively.
fn find_function_flags(reply: *mut ffi::RedisModuleCallReply, function: &[u8]) -> Option<Vec<String>> {
    let field = |map: *mut ffi::RedisModuleCallReply, name: &[u8]| {
        (0..ffi::reply_len(map) / 2)
            .find(|i| ffi::reply_bytes(ffi::reply_element(map, 2 * i)) == name)
            .map(|i| ffi::reply_element(map, 2 * i + 1))
    };
    if !ffi::is_array(reply) {
        return None;
    }
    for l in 0..ffi::reply_len(reply) {
        let library = ffi::reply_element(reply, l);
        let Some(functions) = field(library, b"functions").filter(|f| ffi::is_array(*f)) else { continue };
        for f in 0..ffi::reply_len(functions) {
            let info = ffi::reply_element(functions, f);
            if field(info, b"name").is_some_and(|name| ffi::reply_bytes(name).eq_ignore_ascii_case(function)) {
                let flags = field(info, b"flags").filter(|f| ffi::is_array(*f))?;
                return Some(
                    (0..ffi::reply_len(flags))
                        .map(|i| String::from_utf8_lossy(ffi::reply_bytes(ffi::reply_element(flags, i))).into_owned())
                        .collect(),
                );
            }
        }
    }
    None
}
