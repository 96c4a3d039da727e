//! The command filter: every client command passes here first, on Redis' main thread. Writes are
//! redirected to `RAFT._CMD` (replicated), blocking commands to `RAFT._BLOCK`, MULTI to `RAFT._MULTI`,
//! WATCH to `RAFT._WATCH`, WAIT to `RAFT._WAIT`, the Redis Cluster commands a cluster-aware client
//! asks (`CLUSTER SLOTS`, `READONLY`, ...) to `RAFT._CLUSTER` and an `INFO` that shows the
//! Cluster section to `RAFT._INFO`,
//! unsupported commands to `RAFT._REFUSE`, a `CONFIG SET` Raftis cannot allow to an error (see
//! `redis_settings`), and reads to `RAFT._READ` when they must wait or be
//! confirmed; everything else runs untouched. Our own `RedisModule_Call`s are not filtered (NOSELF), so applying an
//! entry never re-enters this path.

use crate::ffi::{self, api};
use crate::state;
use raftis_core::routing::Route;
use redis_module::raw::RedisModuleCommandFilterCtx;

pub const WRITE_COMMAND: &str = "raft._cmd";
pub const REFUSE_COMMAND: &str = "raft._refuse";
pub const MULTI_COMMAND: &str = "raft._multi";
pub const WATCH_COMMAND: &str = "raft._watch";
pub const UNWATCH_COMMAND: &str = "raft._unwatch";
/// What a refused command becomes (a `CONFIG SET` here, a call inside a script in `scripts`): it
/// answers its argument as an error.
pub const ERROR_COMMAND: &str = "raft._error";

pub extern "C" fn filter(fctx: *mut RedisModuleCommandFilterCtx) {
    // A panic must not unwind into Redis; a command we fail to classify runs unchanged.
    let classified = std::panic::catch_unwind(|| classify(fctx));
    // Even then, no lone write may be overtaken by this command's reply (see `held`).
    let to_held_path = classified.as_ref().is_ok_and(|to| *to == Destination::HeldPath);
    if std::panic::catch_unwind(|| crate::held::before_filtered_command(to_held_path)).is_err() || classified.is_err() {
        log::error!("panic in the command filter; command left unchanged");
    }
}

/// A client's command while Redis serves clients in the middle of a script the log applies: the
/// filter above is skipped then (the module is inside its own call), and Redis runs only the
/// commands flagged `allow-busy`. Two of those must not run natively: a MULTI the module did not
/// record would run its transaction's reads outside the log, before the transaction's own
/// writes, and a WATCH would skip the leader's barrier (see `watch`). Routed as usual, they are
/// refused like any data command now. `SCRIPT KILL` and `FUNCTION KILL` reach this node's script,
/// and `FUNCTION STATS` describes it.
pub fn while_applying_a_long_command(fctx: *mut RedisModuleCommandFilterCtx) {
    if crate::scripts::route_kill(fctx)
        || crate::scripts::route_stats(fctx)
        || unsafe { api!(RedisModule_CommandFilterArgsCount)(fctx) } <= 0
    {
        return;
    }
    let name = ffi::string_bytes(unsafe { api!(RedisModule_CommandFilterArgGet)(fctx, 0) });
    let redirect_to = if name.eq_ignore_ascii_case(b"multi") {
        MULTI_COMMAND
    } else if name.eq_ignore_ascii_case(b"watch") {
        WATCH_COMMAND
    } else {
        return;
    };
    unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(redirect_to.as_bytes())) };
}

/// Where a command goes: to `RAFT._CMD` or `RAFT._READ`, whose replies may be held, or elsewhere.
#[derive(PartialEq)]
enum Destination {
    HeldPath,
    Elsewhere,
}

fn classify(fctx: *mut RedisModuleCommandFilterCtx) -> Destination {
    let argc = unsafe { api!(RedisModule_CommandFilterArgsCount)(fctx) };
    if argc <= 0 {
        return Destination::Elsewhere;
    }
    let arg = |i: i32| ffi::string_bytes(unsafe { api!(RedisModule_CommandFilterArgGet)(fctx, i) });
    let name = arg(0);
    if name.len() >= 5 && name[..5].eq_ignore_ascii_case(b"raft.") {
        let held_path =
            name.eq_ignore_ascii_case(WRITE_COMMAND.as_bytes()) || name.eq_ignore_ascii_case(crate::read::READ_COMMAND.as_bytes());
        return if held_path { Destination::HeldPath } else { Destination::Elsewhere };
    }
    crate::acl::command_seen(name);
    if crate::scripts::has_kill(name) && crate::scripts::route_kill(fctx) {
        return Destination::Elsewhere;
    }
    // The module forgets the keys with Redis (see `watch::unwatch`), when it remembers any.
    if argc == 1 && name.eq_ignore_ascii_case(b"unwatch") && crate::watch::clients() > 0 && crate::held::unwatch_available() {
        unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(UNWATCH_COMMAND.as_bytes())) };
        return Destination::Elsewhere;
    }
    let argv: Vec<&[u8]> = (0..argc).map(arg).collect();
    if name.eq_ignore_ascii_case(b"config") {
        if let Some(error) = crate::redis_settings::refuse_config_set(&argv) {
            answer_error(fctx, &error);
        }
        return Destination::Elsewhere;
    }
    if crate::cluster_view::answers(&argv) {
        unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(crate::cluster_view::CLUSTER_COMMAND.as_bytes())) };
        return Destination::Elsewhere;
    }
    if crate::cluster_view::info_shows_cluster(&argv) {
        unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(crate::cluster_view::INFO_COMMAND.as_bytes())) };
        return Destination::Elsewhere;
    }
    let route = state::get().route(&argv);
    let redirect_to = match route {
        Route::Write => WRITE_COMMAND,
        Route::Refuse(_) => REFUSE_COMMAND,
        Route::BeginTransaction => MULTI_COMMAND,
        Route::Watch => WATCH_COMMAND,
        Route::Wait => crate::wait::WAIT_COMMAND,
        Route::Blocking | Route::BlockingRead => crate::blocking::BLOCK_COMMAND,
        Route::Read
            if crate::read::needs_confirmation()
                || crate::held::any_held()
                || crate::transaction::any_open()
                || !state::get().may_read_locally()
                || !crate::expiry::reads_by_own_clock() =>
        {
            crate::read::READ_COMMAND
        }
        Route::Read | Route::Local => return Destination::Elsewhere,
    };
    unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(redirect_to.as_bytes())) };
    if redirect_to == WRITE_COMMAND || redirect_to == crate::read::READ_COMMAND {
        Destination::HeldPath
    } else {
        Destination::Elsewhere
    }
}

/// Makes the command answer `error`: it becomes [`ERROR_COMMAND`] (inside MULTI it is queued and
/// answers at EXEC, as a `CONFIG SET` Redis refuses does).
pub fn answer_error(fctx: *mut RedisModuleCommandFilterCtx, error: &str) {
    replace_args(fctx, &[ERROR_COMMAND.as_bytes(), error.as_bytes()]);
}

/// Replaces the command and all its arguments.
pub fn replace_args<A: AsRef<[u8]>>(fctx: *mut RedisModuleCommandFilterCtx, args: &[A]) {
    let count = unsafe { api!(RedisModule_CommandFilterArgsCount)(fctx) };
    for i in (0..count).rev() {
        unsafe { api!(RedisModule_CommandFilterArgDelete)(fctx, i) };
    }
    for (i, a) in args.iter().enumerate() {
        unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, i as i32, ffi::new_string(a.as_ref())) };
    }
}
