//! Lua scripts (`EVAL`, `EVALSHA` and their `_RO` forms) and functions (`FCALL`, `FCALL_RO`) run
//! on every node, each call as one log entry, the way Redis replicated scripts before 5.0:
//! verbatim. That only works if a script does the same thing on every node, however late a node
//! applies it, so:
//!
//! - The log carries the script's text, never its SHA1: the leader turns `EVALSHA` into `EVAL`
//!   from the scripts it knows (those its log loaded), so a node that lost its script cache (a
//!   restart, a snapshot) still runs it. An unknown SHA1 gets Redis' `NOSCRIPT` at once.
//!   `SCRIPT LOAD` and `SCRIPT FLUSH` go through the log too, so that every node knows the same
//!   scripts and any of them can take over as leader.
//! - Functions need no such care: `FUNCTION LOAD`, `DELETE`, `FLUSH` and `RESTORE` are writes of
//!   the log, so every node holds the same libraries at every index, and snapshots carry them
//!   (`FUNCTION DUMP`, see `snapshot`). `FCALL` names a function those libraries define.
//! - `math.random` starts from the same seed at every script and function call (Redis' own
//!   generator, reseeded before each run, as Redis did when it replicated scripts verbatim).
//! - What the script calls passes a second command filter: a command whose answer could differ
//!   between nodes (Redis tips it `nondeterministic_output`: `TIME`, `RANDOMKEY`, `TTL`; or
//!   `nondeterministic_output_order`: `SMEMBERS`, `HGETALL`, whose order follows a hash table
//!   seeded differently on each node; `SPOP` among them: a script's would be Redis' own pop, at
//!   random on each node) raises an error in the script instead; relative times are made
//!   absolute from the entry's time (`SET k v EX 10` inside a script gets the same deadline
//!   everywhere), and the keys it names are expired by that time, as a client's command's are
//!   (see `expiry`). A script the leader proposed over its memory limit fails its first call that
//!   may grow memory, if that comes before any write, on every node (see `memory`).
//!
//! `SCRIPT KILL` and `FUNCTION KILL` stay local: they stop the script on the node they are sent to
//! (Redis' rule holds: not once the script has written). That is the way out of a script that
//! never ends, which would hang every node and hang it again when the log is replayed; for one
//! that has written, see `runaway`.
//!
//! Seeding Redis' generator and hashing a script are not module API: `redisSrand48` and `sha1hex`
//! are looked up at load. Without them, scripts and functions are refused.

use crate::ffi::{self, api, RedisModuleCtx};
use crate::state;
use raftis_core::command_entry::EntryTime;
use raftis_core::determinism::{self, Args};
use raftis_core::memory_limit;
use redis_module::raw::RedisModuleCommandFilterCtx;
use rustc_hash::FxHashMap;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::os::raw::{c_char, c_int};
use std::sync::{Mutex, OnceLock};

/// What `SCRIPT KILL` and `FUNCTION KILL` become (see [`kill`]).
pub const KILL_COMMAND: &str = "raft._scriptkill";
/// `FUNCTION STATS` while the log applies a long script (see [`stats`]).
pub const STATS_COMMAND: &str = "raft._functionstats";

struct Hooks {
    /// Seeds the generator behind Lua's `math.random`.
    srand: unsafe extern "C" fn(i32),
    /// Redis' script SHA1: 40 hex digits and a NUL into the first argument.
    sha1hex: unsafe extern "C" fn(*mut c_char, *const c_char, usize),
    /// Redis' SCRIPT KILL for a client (it answers the client itself).
    kill: unsafe extern "C" fn(*mut c_void, c_int),
    lookup_client: unsafe extern "C" fn(u64) -> *mut c_void,
    /// Redis' flag: it is serving clients in the middle of a long command (a script past
    /// busy-reply-threshold). A command the filter sees then is a client's, not the script's.
    serving_clients: *const c_int,
}

// The flag's address is Redis' own global, read only on the main thread.
unsafe impl Send for Hooks {}
unsafe impl Sync for Hooks {}

static HOOKS: OnceLock<Result<Hooks, String>> = OnceLock::new();

/// The scripts this node's log loaded, by lower-case SHA1.
static KNOWN: Mutex<Option<FxHashMap<String, Vec<u8>>>> = Mutex::new(None);

/// The script being applied right now: its entry's time, its database, and the context that
/// applies it (only touched on the main thread).
#[derive(Clone, Copy)]
struct Running {
    at: EntryTime,
    db: u32,
    ctx: *mut RedisModuleCtx,
    /// The leader was over its memory limit when it proposed the script (see `memory`).
    over_limit: bool,
    /// A call of the script was a write.
    wrote: bool,
}

thread_local! {
    static RUNNING: Cell<Option<Running>> = const { Cell::new(None) };
    /// The database and key of the running script's last call if that call set a deadline,
    /// which may have passed already (see [`settle_deadline`]).
    static SET_DEADLINE: RefCell<Option<(u32, Vec<u8>)>> = const { RefCell::new(None) };
}

/// At load: finds the hooks. Returns how scripts run here, for the log.
pub fn init() -> String {
    let hooks = HOOKS.get_or_init(|| {
        Ok(unsafe {
            Hooks {
                srand: ffi::find_function("redisSrand48")?,
                sha1hex: ffi::find_function("sha1hex")?,
                kill: ffi::find_function("scriptKill")?,
                lookup_client: ffi::find_function("lookupClientByID")?,
                serving_clients: ffi::find_symbol("ProcessingEventsWhileBlocked")? as *const c_int,
            }
        })
    });
    match hooks {
        Ok(_) => "scripts run on every node from the log, with their nondeterministic calls refused".into(),
        Err(why) => format!("{why}: scripts are refused"),
    }
}

fn hooks() -> Result<&'static Hooks, String> {
    match HOOKS.get() {
        Some(Ok(hooks)) => Ok(hooks),
        Some(Err(why)) => Err(format!("ERR scripts not supported by Raftis on this Redis: {why}")),
        None => Err("ERR scripts not supported by Raftis: not initialised".into()),
    }
}

/// `EVAL` and its forms: the second argument is the script's text or SHA1.
fn is_eval(name: &[u8]) -> bool {
    [&b"eval"[..], b"eval_ro", b"evalsha", b"evalsha_ro"].iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// A script or a function call: Lua runs, and its calls are policed.
pub fn runs_lua(name: &[u8]) -> bool {
    is_eval(name) || name.eq_ignore_ascii_case(b"fcall") || name.eq_ignore_ascii_case(b"fcall_ro")
}

/// On the leader, before proposing: `EVALSHA sha ...` becomes `EVAL <its text> ...`.
///
/// What is proposed next must see the script cache as the commands proposed before it leave it,
/// not as the log has applied it so far: in a pipeline, `EVAL` then `EVALSHA` of the same script
/// finds it, and `SCRIPT FLUSH` then `EVALSHA` does not, as in Redis, though none of them has been
/// applied yet. So scripts are remembered (and forgotten) as they are proposed ([`proposing`]), and
/// again when applied. (A script that does not compile is remembered too: its `EVALSHA` gets the
/// compile error where Redis would answer `NOSCRIPT`.)
pub fn prepare(argv: &mut Args) -> Result<(), String> {
    let Some(name) = argv.first() else { return Ok(()) };
    if !is_eval(name) && !name.eq_ignore_ascii_case(b"script") {
        return Ok(());
    }
    hooks()?;
    let by_sha = if name.eq_ignore_ascii_case(b"evalsha") {
        b"EVAL".as_slice()
    } else if name.eq_ignore_ascii_case(b"evalsha_ro") {
        b"EVAL_RO".as_slice()
    } else {
        return Ok(());
    };
    let sha = String::from_utf8_lossy(&argv[1]).to_ascii_lowercase();
    let known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(text) = known.as_ref().and_then(|k| k.get(&sha)) else {
        return Err("NOSCRIPT No matching script. Please use EVAL.".into());
    };
    argv[0] = Cow::Borrowed(by_sha);
    argv[1] = Cow::Owned(text.clone());
    Ok(())
}

/// On the leader, once `argv` ([`prepare`]d) is admitted to the log: the scripts it loads are
/// known from now on, or none after a `SCRIPT FLUSH`. (Not before: a script refused on its way,
/// over the memory limit say, never reaches Redis' cache, nor this one.)
pub fn proposing(argv: &Args) {
    let (Some(name), Ok(hooks)) = (argv.first(), hooks()) else { return };
    if is_eval(name) && argv.len() >= 2 {
        remember(hooks, &argv[1]);
    } else if name.eq_ignore_ascii_case(b"script") {
        if argv.len() == 3 && argv[1].eq_ignore_ascii_case(b"load") {
            remember(hooks, &argv[2]);
        } else if flushes_scripts(argv) {
            forget_all();
        }
    }
}

/// Applies `argv`, a command of the log, through `call`; scripts and functions run as described
/// above, and the script cache commands keep [`KNOWN`] in step with Redis' own cache.
///
/// `over_limit`: the leader proposed the script while over its memory limit. As in Redis, the
/// script's first call that may grow memory then fails, unless the script wrote before it.
pub fn apply<T>(ctx: *mut RedisModuleCtx, db: u32, at: Option<EntryTime>, argv: &[&[u8]], over_limit: bool, call: impl FnOnce() -> T) -> T {
    let Some(name) = argv.first() else { return call() };
    if runs_lua(name) && argv.len() >= 2 {
        let Ok(hooks) = hooks() else { return call() };
        unsafe { (hooks.srand)(0) };
        let previous = RUNNING.with(|r| r.replace(at.map(|at| Running { at, db, ctx, over_limit, wrote: false })));
        let result = call();
        if let Some(at) = at {
            settle_deadline(ctx, at);
        }
        RUNNING.with(|r| r.set(previous));
        if is_eval(name) {
            remember_if_cached(ctx, hooks, argv[1]);
        }
        return result;
    }
    if name.eq_ignore_ascii_case(b"function") {
        // A library's code runs once as it loads; should it draw random numbers, it draws the
        // same ones everywhere.
        if let Ok(hooks) = hooks() {
            unsafe { (hooks.srand)(0) };
        }
        return call();
    }
    if name.eq_ignore_ascii_case(b"script") && argv.len() >= 2 {
        let result = call();
        if let Ok(hooks) = hooks() {
            if argv[1].eq_ignore_ascii_case(b"load") && argv.len() == 3 {
                remember_if_cached(ctx, hooks, argv[2]);
            } else if flushes_scripts(argv) {
                forget_all();
            }
        }
        return result;
    }
    call()
}

/// `SCRIPT FLUSH [SYNC|ASYNC]` (`argv` after `SCRIPT`'s name check): what Redis runs; it
/// refuses any other option and keeps its cache.
fn flushes_scripts<A: AsRef<[u8]>>(argv: &[A]) -> bool {
    match argv {
        [_, flush] => flush.as_ref().eq_ignore_ascii_case(b"flush"),
        [_, flush, mode] => {
            let mode = mode.as_ref();
            flush.as_ref().eq_ignore_ascii_case(b"flush") && (mode.eq_ignore_ascii_case(b"sync") || mode.eq_ignore_ascii_case(b"async"))
        }
        _ => false,
    }
}

/// `SCRIPT KILL` or `FUNCTION KILL` (`args` is `[KILL_COMMAND, SCRIPT|FUNCTION, KILL]`), also
/// while the log applies a script. Redis considers itself loading then (see `expiry`) and answers
/// `-LOADING` to its own kill; this command is allowed while loading and runs Redis' own kill,
/// with its rules and replies (`-UNKILLABLE` once the script wrote, `-NOTBUSY` when none runs,
/// and neither kill stops the other's kind). It stops the script on this node only.
pub fn kill(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let is_eval = !args.get(1).is_some_and(|kind| kind.eq_ignore_ascii_case(b"function"));
    let hooks = hooks()?;
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let client = unsafe { (hooks.lookup_client)(id) };
    if client.is_null() {
        return Err("ERR SCRIPT KILL from a client Redis does not know".into());
    }
    if RUNNING.with(|r| r.get()).is_some() {
        log::warn!("SCRIPT KILL of a script the log is applying: only this node stops it");
    }
    unsafe { (hooks.kill)(client, is_eval as c_int) };
    Ok(())
}

/// `FUNCTION STATS` (`args` is `[STATS_COMMAND, FUNCTION, STATS]`) while the log applies a long
/// script or function: Redis considers itself loading then (see `expiry`) and would answer
/// `-LOADING`, where plain Redis describes the running function, which is what an operator asks
/// it for then. Run from this command, allowed while loading, Redis answers as it would.
pub fn stats(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    // Nothing else: a client could name this command itself, and must not run a write past the log.
    if !matches!(args, [_, function, stats] if function.eq_ignore_ascii_case(b"function") && stats.eq_ignore_ascii_case(b"stats")) {
        return Err("ERR RAFT._FUNCTIONSTATS only takes FUNCTION STATS (it is used internally)".into());
    }
    // The filter that routed the client's FUNCTION STATS here sees this call too (it watches the
    // module's own calls while the log applies): it must let it through, not route it back.
    struct Calling;
    impl Drop for Calling {
        // Also if the call panics (caught further up): the filter must route the next one.
        fn drop(&mut self) {
            IN_STATS.with(|s| s.set(false));
        }
    }
    IN_STATS.with(|s| s.set(true));
    let _calling = Calling;
    ffi::call_and_reply(ctx, &args[1..], ffi::client_is_resp3(ctx));
    Ok(())
}

thread_local! {
    /// [`stats`] is running Redis' own FUNCTION STATS (only on the main thread).
    static IN_STATS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `FUNCTION STATS` becomes [`STATS_COMMAND`] (true); anything else is left alone.
pub fn route_stats(fctx: *mut RedisModuleCommandFilterCtx) -> bool {
    !IN_STATS.with(|s| s.get())
        && route_two_words(fctx, STATS_COMMAND, |name, sub| name.eq_ignore_ascii_case(b"function") && sub.eq_ignore_ascii_case(b"stats"))
}

/// A two-word command `is` recognises becomes `to` followed by it (true); anything else is left
/// alone.
fn route_two_words(fctx: *mut RedisModuleCommandFilterCtx, to: &str, is: impl Fn(&[u8], &[u8]) -> bool) -> bool {
    let argc = unsafe { api!(RedisModule_CommandFilterArgsCount)(fctx) };
    let arg = |i: c_int| ffi::string_bytes(unsafe { api!(RedisModule_CommandFilterArgGet)(fctx, i) });
    if argc == 2 && is(arg(0), arg(1)) {
        unsafe { api!(RedisModule_CommandFilterArgInsert)(fctx, 0, ffi::new_string(to.as_bytes())) };
        return true;
    }
    false
}

fn sha1(hooks: &Hooks, text: &[u8]) -> String {
    let mut digest = [0u8; 41];
    unsafe { (hooks.sha1hex)(digest.as_mut_ptr() as *mut c_char, text.as_ptr() as *const c_char, text.len()) };
    String::from_utf8_lossy(&digest[..40]).into_owned()
}

/// Records a script Redis kept in its cache (it does not keep one that fails to compile, which
/// [`prepare`] may have remembered: it is forgotten here, as on the other nodes).
fn remember_if_cached(ctx: *mut RedisModuleCtx, hooks: &Hooks, text: &[u8]) {
    let sha = sha1(hooks, text);
    let reply = ffi::call(ctx, &[&b"SCRIPT"[..], b"EXISTS", sha.as_bytes()], false);
    let cached = ffi::is_array(reply) && ffi::reply_len(reply) == 1 && ffi::reply_integer_value(ffi::reply_element(reply, 0)) == 1;
    ffi::free_call_reply(reply);
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    if cached {
        known.get_or_insert_with(FxHashMap::default).insert(sha, text.to_vec());
    } else if let Some(known) = known.as_mut() {
        known.remove(&sha);
    }
}

fn remember(hooks: &Hooks, text: &[u8]) {
    let sha = sha1(hooks, text);
    KNOWN.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(FxHashMap::default).insert(sha, text.to_vec());
}

fn forget_all() {
    *KNOWN.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// RAFT.STATS: how many scripts this node knows.
pub fn known_scripts() -> usize {
    KNOWN.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |k| k.len())
}

/// The second command filter: it sees the commands a script calls (the first one skips them,
/// being registered NOSELF), and acts only while a script of the log runs.
pub extern "C" fn filter(fctx: *mut RedisModuleCommandFilterCtx) {
    let Some(running) = RUNNING.with(|r| r.get()) else { return };
    if let Ok(hooks) = hooks() {
        if unsafe { std::ptr::read_volatile(hooks.serving_clients) } != 0 {
            // A client's command while the script runs. The module's own filter is skipped while
            // it applies (NOSELF), and Redis answers -LOADING to every data command now (see
            // `expiry`); only the few commands it still runs need routing.
            crate::filter::while_applying_a_long_command(fctx);
            return;
        }
    }
    // Cleared while policing: the module's own calls made meanwhile (expiring a `SORT`'s
    // lookups) are not the script's.
    RUNNING.with(|r| r.set(None));
    let running = match std::panic::catch_unwind(|| police(fctx, running)) {
        Ok(next) => next,
        Err(_) => {
            log::error!("panic in the script command filter; the call is refused");
            crate::filter::answer_error(fctx, "ERR internal error checking a command inside a script");
            running
        }
    };
    RUNNING.with(|r| r.set(Some(running)));
}

/// Checks and pins one call of the running script; returns the script's state after it.
fn police(fctx: *mut RedisModuleCommandFilterCtx, running: Running) -> Running {
    let argc = unsafe { api!(RedisModule_CommandFilterArgsCount)(fctx) };
    if argc <= 0 {
        return running;
    }
    settle_deadline(running.ctx, running.at);
    let arg = |i: c_int| ffi::string_bytes(unsafe { api!(RedisModule_CommandFilterArgGet)(fctx, i) }).to_vec();
    let argv: Vec<Vec<u8>> = (0..argc).map(arg).collect();
    let refs: Vec<&[u8]> = argv.iter().map(|a| a.as_slice()).collect();
    if refs[0].eq_ignore_ascii_case(b"select") {
        // The script's own database from here on, for the keys its next calls name.
        return match determinism::selected_db(&refs, state::get().databases) {
            Some(db) => Running { db, ..running },
            None => running,
        };
    }
    let is_ours = refs[0].len() >= 5 && refs[0][..5].eq_ignore_ascii_case(b"raft.");
    if is_ours && !refs[0].eq_ignore_ascii_case(crate::filter::ERROR_COMMAND.as_bytes()) {
        crate::filter::answer_error(fctx, "ERR Raftis' own commands cannot be called from a script");
        return running;
    }
    let s = state::get();
    if let Some(error) = s.refused_in_scripts(&refs) {
        crate::filter::answer_error(fctx, &error);
        return running;
    }
    // Only a script proposed over the limit needs to know whether it wrote yet.
    let running = if running.over_limit && !running.wrote {
        if s.grows_memory(&refs) {
            crate::filter::answer_error(fctx, memory_limit::OOM_ERROR);
            return running;
        }
        Running { wrote: s.writes(&refs), ..running }
    } else {
        running
    };
    let mut pinned: Args = refs.iter().map(|a| Cow::Borrowed(*a)).collect();
    determinism::pin(&mut pinned, running.at.0);
    if pinned.iter().map(|a| a.as_ref()).ne(refs.iter().copied()) {
        crate::filter::replace_args(fctx, &pinned);
    }
    // Keys are expired by the entry's time, as before a client's command (Redis' own expiry is
    // suspended while the log applies).
    let ctx = running.ctx;
    ffi::in_db(ctx, running.db, || {
        let pinned: Vec<&[u8]> = pinned.iter().map(|a| a.as_ref()).collect();
        crate::expiry::expire_due(ctx, &pinned, running.at);
        if let Some(key) = crate::expiry::deadline_key(&pinned) {
            SET_DEADLINE.with(|d| *d.borrow_mut() = Some((running.db, key.to_vec())));
        }
    });
    running
}

/// A deadline the script's last call set may have passed already: Redis, loading, kept the key
/// (see `expiry::delete_if_already_expired`). It is deleted before anything else can see it: the
/// script's next call, or the end of the script.
fn settle_deadline(ctx: *mut RedisModuleCtx, at: EntryTime) {
    let Some((db, key)) = SET_DEADLINE.with(|d| d.borrow_mut().take()) else { return };
    ffi::in_db(ctx, db, || crate::expiry::delete_key_if_already_expired(ctx, &key, at));
}

/// Whether `name` is a command with a `KILL` subcommand ([`route_kill`] routes it).
pub fn has_kill(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"script") || name.eq_ignore_ascii_case(b"function")
}

/// `SCRIPT KILL` and `FUNCTION KILL` become [`KILL_COMMAND`] (true); anything else is left alone.
pub fn route_kill(fctx: *mut RedisModuleCommandFilterCtx) -> bool {
    route_two_words(fctx, KILL_COMMAND, |name, sub| has_kill(name) && sub.eq_ignore_ascii_case(b"kill"))
}
