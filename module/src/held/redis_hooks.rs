//! The Redis internals held replies rest on, found by their exported names at load: protecting a
//! client, deferred replies, and (for transactions) MULTI and WATCH of one key. Redis links with
//! -rdynamic, so they can be looked up; whether they can be used also depends on threaded I/O.

use crate::ffi::{self, RedisModuleCtx};
use std::ffi::c_void;
use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

/// What Redis' internal functions return on success.
pub(super) const C_OK: c_int = 0;

/// Redis internals, by their exported names.
pub(super) struct Hooks {
    pub(super) lookup_client: unsafe extern "C" fn(u64) -> *mut c_void,
    pub(super) protect: unsafe extern "C" fn(*mut c_void),
    pub(super) unprotect: unsafe extern "C" fn(*mut c_void),
    pub(super) free_async: unsafe extern "C" fn(*mut c_void),
    /// Appends an empty slot to the client's output; null if the client takes no replies.
    pub(super) deferred_slot: unsafe extern "C" fn(*mut c_void) -> *mut c_void,
    pub(super) fill_slot: unsafe extern "C" fn(*mut c_void, *mut c_void, *const c_char, usize),
    /// Redis' check that a client takes a reply now (not CLIENT REPLY OFF or SKIP, not closing);
    /// 0 if it does, and the client is then queued to have its output written.
    pub(super) prepare_to_write: unsafe extern "C" fn(*mut c_void) -> c_int,
    /// Appends raw RESP to the client's output, and queues it to be written.
    pub(super) add_reply: unsafe extern "C" fn(*mut c_void, *const c_char, usize),
    /// Whether Redis is inside a long script or module command, serving clients meanwhile: it
    /// refuses their commands with -BUSY (or -LOADING while the log applies a script).
    pub(super) yielding: unsafe extern "C" fn() -> c_int,
    /// Whether Redis refuses writes for a failed save or AOF write (-MISCONF); 0 if not.
    pub(super) disk_error: unsafe extern "C" fn() -> c_int,
    /// Redis' MULTI: opens a transaction on the client and answers +OK.
    pub(super) multi: unsafe extern "C" fn(*mut c_void),
    /// Redis' WATCH of one key (a string object) in the client's database.
    pub(super) watch_key: unsafe extern "C" fn(*mut c_void, *mut c_void),
    /// Redis' UNWATCH: forgets the client's watched keys and answers +OK.
    pub(super) unwatch: unsafe extern "C" fn(*mut c_void),
    /// Why replies cannot be held on this Redis although it exports all of the above.
    cannot_hold: Option<String>,
}

static HOOKS: OnceLock<Result<Hooks, String>> = OnceLock::new();

/// At load, on the main thread: decides whether replies can be held on this Redis.
pub fn init(ctx: *mut RedisModuleCtx) {
    HOOKS.get_or_init(|| {
        let io_threads = ffi::config_get(ctx, "io-threads").unwrap_or_default();
        // Threaded I/O's writer does not skip protected clients.
        let cannot_hold = (io_threads.trim() != "1").then(|| format!("io-threads is {io_threads}"));
        Ok(unsafe {
            Hooks {
                lookup_client: ffi::find_function("lookupClientByID")?,
                protect: ffi::find_function("protectClient")?,
                unprotect: ffi::find_function("unprotectClient")?,
                free_async: ffi::find_function("freeClientAsync")?,
                deferred_slot: ffi::find_function("addReplyDeferredLen")?,
                fill_slot: ffi::find_function("setDeferredReply")?,
                prepare_to_write: ffi::find_function("prepareClientToWrite")?,
                add_reply: ffi::find_function("addReplyProto")?,
                yielding: ffi::find_function("isInsideYieldingLongCommand")?,
                disk_error: ffi::find_function("writeCommandsDeniedByDiskError")?,
                multi: ffi::find_function("multiCommand")?,
                watch_key: ffi::find_function("watchForKey")?,
                unwatch: ffi::find_function("unwatchCommand")?,
                cannot_hold,
            }
        })
    });
}

/// The hooks, if replies can be held here.
pub(super) fn hooks() -> Option<&'static Hooks> {
    HOOKS.get().and_then(|h| h.as_ref().ok()).filter(|h| h.cannot_hold.is_none())
}

/// The hooks, if Redis exports them all, whether or not replies can be held: MULTI and WATCH
/// need only the functions.
pub(super) fn exported() -> Result<&'static Hooks, String> {
    match HOOKS.get() {
        None => Err("held replies are not initialised".into()),
        Some(Err(why)) => Err(why.clone()),
        Some(Ok(hooks)) => Ok(hooks),
    }
}

/// Why replies cannot be held here, if they cannot.
fn cannot_hold() -> Option<String> {
    match exported() {
        Err(why) => Some(why),
        Ok(hooks) => hooks.cannot_hold.clone(),
    }
}

/// Says at load how the leader answers pipelines.
pub fn describe() -> String {
    match cannot_hold() {
        None => "the leader holds replies while the cluster confirms them: pipelines keep flowing".into(),
        Some(why) => format!("{why}: writes and linearizable reads block their client until confirmed"),
    }
}

/// Whether EXEC can run a transaction here: its commands answer from the log, into held slots.
pub fn transactions_available() -> Result<(), String> {
    match cannot_hold() {
        None => Ok(()),
        Some(why) => Err(format!("ERR transactions (MULTI/EXEC) need held replies, not available here: {why}")),
    }
}
