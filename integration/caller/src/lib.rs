//! `CALLER.CALL command [arg ...]`: runs the command through `RedisModule_Call` and answers what
//! it returned; `CALLER.CALLASME` runs it as the calling client's user (the call's `C` flag). Raftis filters other modules' calls as it does clients' commands, but they come
//! from a client Redis makes for the call (no user, never blocked), so the end-to-end tests load
//! this module beside Raftis to reach those paths.
//!
//! Raw module API, as Raftis uses it: the crate's `redis_module!` registration asks for API
//! functions Redis 7.0 does not have.

use redis_module::raw::{self, RedisModuleCtx, RedisModuleString};
use std::os::raw::{c_char, c_int};

const FLAGS: &[u8] = b"\0";

extern "C" fn call(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
    // "v": the arguments as a vector of module strings; "E": errors as replies.
    call_with(ctx, argv, argc, c"vE")
}

extern "C" fn call_as_me(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int) -> c_int {
    call_with(ctx, argv, argc, c"vEC")
}

fn call_with(ctx: *mut RedisModuleCtx, argv: *mut *mut RedisModuleString, argc: c_int, format: &std::ffi::CStr) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut len = 0;
        let name = raw::RedisModule_StringPtrLen.unwrap()(*argv.add(1), &mut len);
        let name = std::ffi::CString::new(std::slice::from_raw_parts(name as *const u8, len)).unwrap_or_default();
        let reply = raw::RedisModule_Call.unwrap()(ctx, name.as_ptr(), format.as_ptr(), argv.add(2), (argc - 2) as usize);
        if reply.is_null() {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"ERR the call failed".as_ptr());
        }
        raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, reply);
        raw::RedisModule_FreeCallReply.unwrap()(reply);
    }
    raw::REDISMODULE_OK as c_int
}

/// Redis' entry point when it loads the module.
///
/// # Safety
/// Called by Redis only, on its main thread.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn RedisModule_OnLoad(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    if raw::Export_RedisModule_Init(ctx, c"caller".as_ptr(), 1, raw::REDISMODULE_APIVER_1 as c_int) == raw::REDISMODULE_ERR as c_int {
        return raw::REDISMODULE_ERR as c_int;
    }
    let create = raw::RedisModule_CreateCommand.unwrap();
    if create(ctx, c"caller.call".as_ptr(), Some(call), FLAGS.as_ptr() as *const c_char, 0, 0, 0) == raw::REDISMODULE_ERR as c_int {
        return raw::REDISMODULE_ERR as c_int;
    }
    create(ctx, c"caller.callasme".as_ptr(), Some(call_as_me), FLAGS.as_ptr() as *const c_char, 0, 0, 0)
}
