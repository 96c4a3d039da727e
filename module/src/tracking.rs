//! Client-side caching (`CLIENT TRACKING`) for reads that run after their command returned.
//!
//! Redis remembers a tracking client's keys when a read-only command returns, so `RAFT._READ`
//! has them remembered at once, even when the read itself waits (for a ReadIndex round, or for a
//! restarted node's replay) and runs later on a client of the module's own, which tracks
//! nothing. A change applied meanwhile sends the client its invalidation and makes Redis forget
//! the keys: the value read after the change would then stay in the client's cache for good. So
//! the keys are remembered again when the read runs, as Redis does after a read it runs itself.

use crate::ffi::{self, api, RedisModuleCtx};
use redis_module::raw;
use std::ffi::c_void;
use std::sync::OnceLock;

/// Redis' own: the keys of the client's current command (here still `RAFT._READ`, whose keys the
/// module names), remembered for the client.
type RememberKeys = unsafe extern "C" fn(*mut c_void);

static REMEMBER_KEYS: OnceLock<Option<RememberKeys>> = OnceLock::new();

/// For the read that has just run for the blocked client of `ctx` (in its reply callback, where
/// Redis still holds the client's `RAFT._READ` arguments): remembers its keys for the client, if
/// it tracks keys. (A client in `BCAST` mode, which Redis would skip, cannot be told apart here:
/// its keys are remembered too, and never invalidated for it; they take room in the tracking
/// table until a change to them.)
pub fn remember_read_keys(ctx: *mut RedisModuleCtx) {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    if !tracks_keys(id) {
        return;
    }
    let Some(remember_keys) = *REMEMBER_KEYS.get_or_init(|| unsafe { ffi::find_function("trackingRememberKeys").ok() }) else {
        return;
    };
    if let Some(client) = crate::held::redis_client_of(ctx) {
        unsafe { remember_keys(client) };
    }
}

/// Whether the client `id` has `CLIENT TRACKING` on.
pub fn tracks_keys(id: u64) -> bool {
    let tracking = raw::REDISMODULE_CLIENTINFO_FLAG_TRACKING as u64;
    id != 0 && ffi::client_flags(id).is_some_and(|flags| flags & tracking != 0)
}
