//! `READONLY`: a cluster-mode client sends it to the replicas it means to read from (redis-py's
//! `read_from_replicas`, for one). A Redis Cluster replica then serves that connection's reads
//! from its own, possibly stale, data. A Raftis follower at consistency `medium` or `high` must
//! not, and a `-MOVED` to the leader, which the client's map already names as master, confuses
//! some clients (redis-py 4 takes it for a failover, marks the master a replica and loses its
//! map). So on a follower, the reads of a connection that sent `READONLY` go to the leader over
//! the side port, as with `follower-proxy yes`, and keep the node's consistency. Its writes still
//! get `-MOVED`, as on a Redis Cluster replica. `READWRITE` ends it; a `RESET` does not (its
//! reads only keep taking the longer way).

use crate::ffi::{api, ClientId, RedisModuleCtx};
use redis_module::raw;
use rustc_hash::FxHashSet;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Connections that sent `READONLY` (and not `READWRITE` since). Only touched on Redis' main
/// thread; the lock is never contended.
static CLIENTS: Mutex<Option<FxHashSet<ClientId>>> = Mutex::new(None);
/// How many there are: the read path's cheap check.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// `READONLY` (`true`) or `READWRITE` (`false`) from the client of `ctx`.
pub fn set(ctx: *mut RedisModuleCtx, readonly: bool) {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let mut clients = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    let ids = clients.get_or_insert_with(FxHashSet::default);
    if readonly {
        ids.insert(id);
    } else {
        ids.remove(&id);
    }
    COUNT.store(ids.len(), Ordering::Relaxed);
}

/// Whether the client of `ctx` sent `READONLY`: on a follower, its reads go to the leader.
pub fn through_leader(ctx: *mut RedisModuleCtx) -> bool {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    CLIENTS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|ids| ids.contains(&id))
}

/// Server event: a client disconnected; it is forgotten.
pub extern "C" fn on_client_change(_ctx: *mut RedisModuleCtx, _event: raw::RedisModuleEvent, subevent: u64, data: *mut c_void) {
    if subevent != raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_DISCONNECTED || data.is_null() || COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let id = unsafe { (*(data as *const raw::RedisModuleClientInfo)).id };
    let _ = std::panic::catch_unwind(|| {
        let mut clients = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ids) = clients.as_mut() {
            ids.remove(&id);
            COUNT.store(ids.len(), Ordering::Relaxed);
        }
    });
}

/// RAFT.STATS: connections whose reads a follower sends to the leader.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}
