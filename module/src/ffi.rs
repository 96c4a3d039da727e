//! The few Redis module API calls Raftis needs, wrapped once so the rest of the module reads as
//! ordinary Rust. Everything here is a thin shim over `redis_module::raw`; the safe crate lacks
//! command filters, per-protocol `RedisModule_Call` and reply forwarding.

use redis_module::raw;
use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_long, c_longlong};
use std::ptr;

pub use raw::{RedisModuleBlockedClient, RedisModuleCallReply, RedisModuleCtx, RedisModuleString};

pub const OK: c_int = raw::REDISMODULE_OK as c_int;
pub const ERR: c_int = raw::REDISMODULE_ERR as c_int;

/// Fetches an API function pointer. Every function used here exists since Redis 7.0, which the
/// module requires at load (Export_RedisModule_Init fails otherwise).
macro_rules! api {
    ($name:ident) => {{
        #[allow(unused_unsafe)]
        let f = unsafe { ::redis_module::raw::$name }.expect(concat!(stringify!($name), " is missing from this Redis"));
        f
    }};
}
pub(crate) use api;

extern "C" {
    fn dlsym(handle: *mut std::ffi::c_void, symbol: *const std::os::raw::c_char) -> *mut std::ffi::c_void;
    fn close(fd: c_int) -> c_int;
}

/// In a forked child: closes every socket it inherited. Redis closes its own listening sockets in
/// its children, but not the module's: a snapshot child would keep the side port bound, so a
/// node killed while its child writes could not be restarted on the same ports until the child
/// finished, and its peers' connections would stay open that long. The child needs no socket.
pub fn close_inherited_sockets() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    // Listed first, closed after: the listing holds a descriptor of its own.
    let sockets: Vec<c_int> = entries
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in sockets {
        unsafe { close(fd) };
    }
}

/// A function Redis exports but the module API does not offer, looked up by name in the
/// executable and everything it loaded (RTLD_DEFAULT, a null handle).
pub fn find_symbol(name: &str) -> Result<*mut std::ffi::c_void, String> {
    let c_name = cstr(name);
    let f = unsafe { dlsym(ptr::null_mut(), c_name.as_ptr()) };
    if f.is_null() {
        Err(format!("this Redis does not export {name}"))
    } else {
        Ok(f)
    }
}

/// The function Redis exports as `name` (see [`find_symbol`]), as a pointer of type `F`.
///
/// # Safety
/// `F` must be an `unsafe extern "C" fn` type with that function's signature.
pub unsafe fn find_function<F: Copy>(name: &str) -> Result<F, String> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut std::ffi::c_void>()) };
    find_symbol(name).map(|f| unsafe { std::mem::transmute_copy::<*mut std::ffi::c_void, F>(&f) })
}

/// A C string for the API; interior NULs (never in our own literals) are cut off.
pub fn cstr(s: &str) -> CString {
    CString::new(s.split('\0').next().unwrap_or("")).expect("no NUL left")
}

pub fn string_bytes<'a>(s: *const RedisModuleString) -> &'a [u8] {
    let mut len = 0usize;
    let p = unsafe { api!(RedisModule_StringPtrLen)(s, &mut len) };
    if p.is_null() {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(p as *const u8, len) }
}

pub fn args_of(argv: *mut *mut RedisModuleString, argc: c_int) -> Vec<Vec<u8>> {
    owned_args(&borrowed_args(argv, argc))
}

/// Copies of borrowed arguments, for work that outlives the command (blocked clients, queued
/// reads, forwarding).
pub fn owned_args(args: &[&[u8]]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.to_vec()).collect()
}

/// A command's arguments without copying them: valid while the command runs.
pub fn borrowed_args<'a>(argv: *mut *mut RedisModuleString, argc: c_int) -> Vec<&'a [u8]> {
    (0..argc.max(0) as usize).map(|i| string_bytes(unsafe { *argv.add(i) })).collect()
}

/// A string owned by nobody: for APIs that take ownership (command filter arguments), or to be
/// released with [`free_string`].
pub fn new_string(bytes: &[u8]) -> *mut RedisModuleString {
    unsafe { api!(RedisModule_CreateString)(ptr::null_mut(), bytes.as_ptr() as *const c_char, bytes.len()) }
}

/// Releases a [`new_string`] (Redis may still hold references of its own).
pub fn free_string(s: *mut RedisModuleString) {
    unsafe { api!(RedisModule_FreeString)(ptr::null_mut(), s) };
}

/// How the module opens keys only to look at them (or to expire them). Opened for writing, because
/// a key that is due is deleted; but a look is not a modification (the module sets no implicit
/// modified signal, see `lib.rs`), not an access (no LRU update), and not a keyspace miss (no
/// `keymiss` event, which a read would send for a missing key).
pub const QUIET_PROBE: c_int = (raw::REDISMODULE_WRITE | raw::REDISMODULE_OPEN_KEY_NOTOUCH) as c_int;

/// The type of `key` in the selected database (`REDISMODULE_KEYTYPE_*`, EMPTY when missing) and
/// how many elements it holds (its length for a string), looked at quietly ([`QUIET_PROBE`]).
pub fn key_type_and_length(ctx: *mut RedisModuleCtx, key: &[u8]) -> (c_int, usize) {
    let name = new_string(key);
    let opened = unsafe { api!(RedisModule_OpenKey)(ctx, name, QUIET_PROBE) };
    free_string(name);
    if opened.is_null() {
        return (raw::REDISMODULE_KEYTYPE_EMPTY as c_int, 0);
    }
    let found = unsafe { (api!(RedisModule_KeyType)(opened), api!(RedisModule_ValueLength)(opened)) };
    unsafe { api!(RedisModule_CloseKey)(opened) };
    found
}

/// The keys of a command, as Redis' key specs find them (none for a command without keys, or one
/// Redis does not know), as module strings.
pub struct CommandKeys {
    strings: Vec<*mut RedisModuleString>,
    positions: Vec<usize>,
}

impl CommandKeys {
    pub fn of(ctx: *mut RedisModuleCtx, argv: &[impl AsRef<[u8]>]) -> CommandKeys {
        let mut strings: Vec<*mut RedisModuleString> = argv.iter().map(|a| new_string(a.as_ref())).collect();
        let mut count: c_int = 0;
        let found = unsafe { api!(RedisModule_GetCommandKeys)(ctx, strings.as_mut_ptr(), strings.len() as c_int, &mut count) };
        let mut positions = Vec::new();
        if !found.is_null() {
            let found_slice = unsafe { std::slice::from_raw_parts(found, count.max(0) as usize) };
            positions.extend(found_slice.iter().map(|&i| i as usize).filter(|&i| i < strings.len()));
            unsafe { api!(RedisModule_Free)(found as *mut std::ffi::c_void) };
        }
        CommandKeys { strings, positions }
    }

    pub fn iter(&self) -> impl Iterator<Item = *mut RedisModuleString> + '_ {
        self.positions.iter().map(|&i| self.strings[i])
    }

    /// Where the keys are among the arguments.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }
}

impl Drop for CommandKeys {
    fn drop(&mut self) {
        for s in self.strings.drain(..) {
            free_string(s);
        }
    }
}

/// Tells Redis that `key` of database `db` is modified: clients watching it get their
/// transaction marked dirty.
pub fn signal_modified_key(ctx: *mut RedisModuleCtx, db: u32, key: &[u8]) {
    if select_db(ctx, db) {
        let key = new_string(key);
        unsafe { api!(RedisModule_SignalModifiedKey)(ctx, key) };
        free_string(key);
    }
}

pub fn reply_error(ctx: *mut RedisModuleCtx, msg: &str) -> c_int {
    let m = cstr(msg);
    unsafe { api!(RedisModule_ReplyWithError)(ctx, m.as_ptr()) };
    OK
}

pub fn reply_simple(ctx: *mut RedisModuleCtx, msg: &str) -> c_int {
    let m = cstr(msg);
    unsafe { api!(RedisModule_ReplyWithSimpleString)(ctx, m.as_ptr()) };
    OK
}

pub fn reply_bulk(ctx: *mut RedisModuleCtx, bytes: &[u8]) -> c_int {
    unsafe { api!(RedisModule_ReplyWithStringBuffer)(ctx, bytes.as_ptr() as *const c_char, bytes.len()) };
    OK
}

/// A verbatim string of format `txt` (a bulk string to a RESP2 client).
pub fn reply_verbatim(ctx: *mut RedisModuleCtx, text: &[u8]) -> c_int {
    unsafe { api!(RedisModule_ReplyWithVerbatimStringType)(ctx, text.as_ptr() as *const c_char, text.len(), c"txt".as_ptr()) };
    OK
}

pub fn reply_integer(ctx: *mut RedisModuleCtx, v: i64) -> c_int {
    unsafe { api!(RedisModule_ReplyWithLongLong)(ctx, v as c_longlong) };
    OK
}

pub fn reply_array(ctx: *mut RedisModuleCtx, len: usize) {
    unsafe { api!(RedisModule_ReplyWithArray)(ctx, len as c_long) };
}

/// A map of `len` pairs (an array of `2 * len` items to a RESP2 client).
pub fn reply_map(ctx: *mut RedisModuleCtx, len: usize) {
    unsafe { api!(RedisModule_ReplyWithMap)(ctx, len as c_long) };
}

pub fn reply_call_reply(ctx: *mut RedisModuleCtx, reply: *mut RedisModuleCallReply) -> c_int {
    crate::reply_arranged::mark();
    unsafe { api!(RedisModule_ReplyWithCallReply)(ctx, reply) }
}

/// Runs `argv` in the context's client and replies with what it returned.
pub fn call_and_reply<A: AsRef<[u8]>>(ctx: *mut RedisModuleCtx, argv: &[A], resp3: bool) -> c_int {
    let reply = call(ctx, argv, resp3);
    if reply.is_null() {
        return reply_error(ctx, "ERR command could not be executed");
    }
    let rc = reply_call_reply(ctx, reply);
    free_call_reply(reply);
    rc
}

pub fn free_call_reply(reply: *mut RedisModuleCallReply) {
    if !reply.is_null() {
        unsafe { api!(RedisModule_FreeCallReply)(reply) };
    }
}

/// Redis' id of a client (`RedisModule_GetClientId`): never reused while the server runs.
pub type ClientId = u64;

pub fn selected_db(ctx: *mut RedisModuleCtx) -> u32 {
    unsafe { api!(RedisModule_GetSelectedDb)(ctx) as u32 }
}

pub fn select_db(ctx: *mut RedisModuleCtx, db: u32) -> bool {
    unsafe { api!(RedisModule_SelectDb)(ctx, db as c_int) == OK }
}

/// Runs `f` in database `db`, then goes back to the database selected before; None, without
/// running `f`, if there is no such database.
pub fn in_db<R>(ctx: *mut RedisModuleCtx, db: u32, f: impl FnOnce() -> R) -> Option<R> {
    let before = selected_db(ctx);
    let result = select_db(ctx, db).then(f);
    select_db(ctx, before);
    result
}

/// Whether Redis is loading: a file of its own at start, or the log's entries (see `expiry`).
pub fn redis_is_loading(ctx: *mut RedisModuleCtx) -> bool {
    let flags = unsafe { api!(RedisModule_GetContextFlags)(ctx) };
    flags & raw::REDISMODULE_CTX_FLAGS_LOADING as c_int != 0
}

/// The `REDISMODULE_CLIENTINFO_FLAG_*` flags of client `id`; None if it is not connected.
pub fn client_flags(id: u64) -> Option<u64> {
    let mut info: raw::RedisModuleClientInfo = unsafe { std::mem::zeroed() };
    info.version = 1;
    let rc = unsafe { api!(RedisModule_GetClientInfoById)(&mut info as *mut _ as *mut std::ffi::c_void, id) };
    (rc == OK).then_some(info.flags)
}

pub fn client_is_resp3(ctx: *mut RedisModuleCtx) -> bool {
    let flags = unsafe { api!(RedisModule_GetContextFlags)(ctx) };
    flags & raw::REDISMODULE_CTX_FLAGS_RESP3 as c_int != 0
}

/// Whether the client of `ctx` may not be blocked though it is neither in `EXEC` nor in a script:
/// another module's `RedisModule_Call`.
pub fn caller_may_not_block(ctx: *mut RedisModuleCtx) -> bool {
    let flags = unsafe { api!(RedisModule_GetContextFlags)(ctx) };
    let inside = (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA) as c_int;
    flags & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING as c_int != 0 && flags & inside == 0
}

pub fn now_ms() -> i64 {
    unsafe { api!(RedisModule_Milliseconds)() }
}

/// The period in ms to give `RedisModule_CreateTimer` for `wait` (at least 1), or None past a
/// century: Redis adds `period * 1000` to its clock in microseconds unchecked, so a period near
/// `i64::MAX` wraps into the past and the timer fires at once.
pub fn timer_period(wait: std::time::Duration) -> Option<i64> {
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    (wait <= LONGEST).then(|| wait.as_millis().max(1) as i64)
}

/// Up to this many arguments after the command name go to `RedisModule_Call` one by one (`b`
/// specifiers): Redis then builds the command's argv in one allocation, where a vector (`v`)
/// costs our strings, their reference counts and a reallocation of that argv. This is every
/// applied log entry of common commands, on every node.
const ARGS_ONE_BY_ONE: usize = 6;

/// Runs a command through `RedisModule_Call` with binary-safe arguments (`argv[0]` is the
/// command). Errors come back as error replies ('E'), so callers can forward them verbatim.
/// `resp3` picks the protocol of the reply. Returns null only if Redis could not run it at all.
pub fn call<A: AsRef<[u8]>>(ctx: *mut RedisModuleCtx, argv: &[A], resp3: bool) -> *mut RedisModuleCallReply {
    let Some((name, rest)) = argv.split_first() else { return ptr::null_mut() };
    let name = name.as_ref();
    if name.contains(&0) {
        return ptr::null_mut();
    }
    // Command names are short: a NUL-terminated copy on the stack, not on the heap.
    let mut name_buf = [0u8; 64];
    let owned_name;
    let name_ptr = if name.len() < name_buf.len() {
        name_buf[..name.len()].copy_from_slice(name);
        name_buf.as_ptr() as *const c_char
    } else {
        owned_name = CString::new(name).expect("checked for NUL above");
        owned_name.as_ptr()
    };
    let redis_call = api!(RedisModule_Call);
    if rest.len() > ARGS_ONE_BY_ONE {
        let strings: Vec<*mut RedisModuleString> = rest
            .iter()
            .map(|a| {
                let a = a.as_ref();
                unsafe { api!(RedisModule_CreateString)(ctx, a.as_ptr() as *const c_char, a.len()) }
            })
            .collect();
        let fmt: &[u8] = if resp3 { b"vE3\0" } else { b"vE\0" };
        let fmt = fmt.as_ptr() as *const c_char;
        let reply = unsafe { redis_call(ctx, name_ptr, fmt, strings.as_ptr(), strings.len()) };
        for s in strings {
            unsafe { api!(RedisModule_FreeString)(ctx, s) };
        }
        return reply;
    }
    // "b" per argument, then the flags.
    let mut fmt_buf = [0u8; ARGS_ONE_BY_ONE + 3];
    fmt_buf[..rest.len()].fill(b'b');
    fmt_buf[rest.len()] = b'E';
    if resp3 {
        fmt_buf[rest.len() + 1] = b'3';
    }
    let fmt = fmt_buf.as_ptr() as *const c_char;
    let p = |i: usize| rest[i].as_ref().as_ptr() as *const c_char;
    let l = |i: usize| rest[i].as_ref().len();
    unsafe {
        match rest.len() {
            0 => redis_call(ctx, name_ptr, fmt),
            1 => redis_call(ctx, name_ptr, fmt, p(0), l(0)),
            2 => redis_call(ctx, name_ptr, fmt, p(0), l(0), p(1), l(1)),
            3 => redis_call(ctx, name_ptr, fmt, p(0), l(0), p(1), l(1), p(2), l(2)),
            4 => redis_call(ctx, name_ptr, fmt, p(0), l(0), p(1), l(1), p(2), l(2), p(3), l(3)),
            5 => redis_call(ctx, name_ptr, fmt, p(0), l(0), p(1), l(1), p(2), l(2), p(3), l(3), p(4), l(4)),
            // ARGS_ONE_BY_ONE: more went the vector way above.
            _ => redis_call(ctx, name_ptr, fmt, p(0), l(0), p(1), l(1), p(2), l(2), p(3), l(3), p(4), l(4), p(5), l(5)),
        }
    }
}

/// Convenience for the module's own admin calls (CONFIG GET and friends).
pub fn call_strs(ctx: *mut RedisModuleCtx, argv: &[&str]) -> *mut RedisModuleCallReply {
    call(ctx, argv, false)
}

pub fn reply_type(reply: *mut RedisModuleCallReply) -> c_int {
    unsafe { api!(RedisModule_CallReplyType)(reply) }
}

pub fn reply_len(reply: *mut RedisModuleCallReply) -> usize {
    unsafe { api!(RedisModule_CallReplyLength)(reply) }
}

pub fn reply_element(reply: *mut RedisModuleCallReply, i: usize) -> *mut RedisModuleCallReply {
    unsafe { api!(RedisModule_CallReplyArrayElement)(reply, i) }
}

pub fn reply_integer_value(reply: *mut RedisModuleCallReply) -> i64 {
    unsafe { api!(RedisModule_CallReplyInteger)(reply) }
}

/// The bytes of a string, status or error reply; empty for other types.
pub fn reply_bytes<'a>(reply: *mut RedisModuleCallReply) -> &'a [u8] {
    let mut len = 0usize;
    let p = unsafe { api!(RedisModule_CallReplyStringPtr)(reply, &mut len) };
    if p.is_null() {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(p as *const u8, len) }
}

pub fn is_error(reply: *mut RedisModuleCallReply) -> bool {
    !reply.is_null() && reply_type(reply) == raw::REDISMODULE_REPLY_ERROR as c_int
}

pub fn is_array(reply: *mut RedisModuleCallReply) -> bool {
    !reply.is_null() && reply_type(reply) == raw::REDISMODULE_REPLY_ARRAY as c_int
}

/// `CONFIG GET name` as a string.
pub fn config_get(ctx: *mut RedisModuleCtx, name: &str) -> Option<String> {
    let reply = call_strs(ctx, &["CONFIG", "GET", name]);
    let value =
        (is_array(reply) && reply_len(reply) >= 2).then(|| String::from_utf8_lossy(reply_bytes(reply_element(reply, 1))).into_owned());
    free_call_reply(reply);
    value
}

pub fn log_line(level: &str, msg: &str) {
    let level = cstr(level);
    let fmt = cstr("%s");
    let msg = cstr(msg);
    unsafe { api!(RedisModule_Log)(ptr::null_mut(), level.as_ptr(), fmt.as_ptr(), msg.as_ptr()) };
}

/// A context tied to no client, for calls the module makes on the main thread on its own behalf
/// (applying committed entries).
pub struct DetachedContext(pub *mut RedisModuleCtx);

// The pointer is only dereferenced by Redis on its main thread.
unsafe impl Send for DetachedContext {}
unsafe impl Sync for DetachedContext {}

impl DetachedContext {
    pub fn new(ctx: *mut RedisModuleCtx) -> DetachedContext {
        DetachedContext(unsafe { api!(RedisModule_GetDetachedThreadSafeContext)(ctx) })
    }
}
