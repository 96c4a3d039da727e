//! WATCH: optimistic locking for MULTI/EXEC, served by the leader.
//!
//! Redis marks a client's transaction dirty when a key it watches is modified, and a dirty EXEC
//! answers nil and runs nothing. Here a write changes the dataset only once it is committed,
//! while EXEC's transaction enters the log behind every write this leader has proposed by then.
//! Counting a key as modified only when a write to it is applied would let a transaction commit
//! behind a write its client's reads never saw. So:
//! - WATCH waits until every write proposed before it has been applied (a barrier behind them,
//!   `last_proposed_index`), then registers the keys with Redis' own mechanism (applied writes
//!   mark the client dirty, as always) and answers. Those writes come before the WATCH, as in
//!   Redis (the client's own pipelined `SET k` before `WATCH k` included), and the reads the client
//!   makes next see them.
//! - From then on, the leader tells Redis about the keys of every write as it *proposes* it
//!   ([`touch`]), which marks the clients watching them dirty at once. A write without keys
//!   (FLUSHDB, FLUSHALL, SWAPDB) touches every key any client watches.
//! - EXEC's check is Redis' own; a dirty transaction is never proposed.
//!
//! The mark goes through a *stand-in* key per watched key and client ([`stand_in`]), watched
//! along with it, rather than through the key itself: Redis records whether a key was already
//! expired when it was watched, and ignores a signal for such a key while it is still there. In
//! Redis the write would first delete the expired key, and then mark the client; here the write
//! is only proposed, and the key is deleted when it is applied, maybe after the client's EXEC was
//! checked. (A lease lock on such a key, `WATCH lock; GET lock; MULTI; SET lock me PX ...; EXEC`,
//! could then be taken by two clients.) A stand-in never exists, and Redis unwatches it with the
//! key, so marking it marks exactly the clients that still watch the key.
//!
//! Only the leader serves WATCH (followers redirect, follower proxy or not): EXEC has to run where
//! writes are proposed. Redis does not tell a module when a client stops watching, so the keys
//! are remembered here until the client's next transaction is over (EXEC and DISCARD unwatch
//! everything), its UNWATCH (run here, see [`unwatch`]), or until the client is gone; RESET
//! alone leaves them until then (the filter cannot tell whose it is, nor queue it as Redis does
//! not). While any are remembered, every write costs a little more.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, ClientId, RedisModuleCtx};
use crate::state;
use raftis_core::cluster_view::HashSlot;
use raftis_core::script_shebang;
use redis_module::raw;
use rustc_hash::FxHashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients that may be watching keys, with the keys. Only touched on Redis' main thread.
static WATCHERS: Mutex<Watchers> = Mutex::new(Watchers { clients: None, pruned: None });
/// How many: the write path's cheap check.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// How often the clients whose watch is over are forgotten.
const PRUNE_EVERY: Duration = Duration::from_millis(100);

struct Watchers {
    clients: Option<FxHashMap<ClientId, Watched>>,
    pruned: Option<Instant>,
}

type Key = (u32, Vec<u8>);

/// What one client watches, as far as this module can tell.
#[derive(Default)]
struct Watched {
    /// Keys watched since the client's last MULTI.
    current: HashSet<Key>,
    /// Keys watched before the transaction the client has open: its EXEC or DISCARD unwatches them.
    ending: HashSet<Key>,
    /// A WATCH waiting for the writes proposed before it to be applied: Redis does not watch its
    /// keys yet, so a write proposed meanwhile is noted here instead.
    awaiting: Option<Awaiting>,
}

struct Awaiting {
    keys: Vec<Key>,
    /// A write to one of them (or to every key) was proposed after the WATCH.
    touched: bool,
}

/// RAFT.STATS: clients whose watched keys every proposed write is checked against.
pub fn clients() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// `RAFT._WATCH WATCH <key> ...`, which the filter makes of WATCH.
pub fn watch(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    if !args.get(1).is_some_and(|name| name.eq_ignore_ascii_case(b"watch")) {
        return Err("ERR RAFT._WATCH only takes WATCH key [key ...] (it is used internally)".into());
    }
    let keys = args.get(2..).unwrap_or_default();
    if keys.is_empty() {
        return Err("ERR wrong number of arguments for 'watch' command".into());
    }
    if crate::transaction::in_exec(ctx) {
        // Queued by Redis because the client is in a transaction; Redis' own WATCH says this.
        return Err("ERR WATCH inside MULTI is not allowed".into());
    }
    let s = state::get();
    let node = s.serving_node()?;
    let slot = HashSlot::of_key(keys[0]);
    if !node.is_leader() {
        return Err(state::redirect(&node.status(), slot));
    }
    crate::held::can_watch(ctx)?;
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let db = ffi::selected_db(ctx);
    let watched: Vec<Key> = keys.iter().map(|k| (db, k.to_vec())).collect();
    let mut w = lock();
    let clients = w.clients.get_or_insert_with(FxHashMap::default);
    let client = clients.entry(id).or_default();
    client.current.extend(watched.iter().cloned());
    client.awaiting = Some(Awaiting { keys: watched.clone(), touched: false });
    let keys = watched;
    COUNT.store(clients.len(), Ordering::Relaxed);
    drop(w);
    // A transaction EXEC has just built goes into the log before the barrier.
    crate::transaction::flush();
    let blocked = Blocked::new(ctx, s.write_timeout() + Duration::from_secs(1));
    let progress = s.progress.clone();
    node.last_proposed_index(Box::new(move |last| match last {
        // (This may run on the Raft loop's thread: Redis watches the keys on its own.)
        Ok(index) => progress.when_applied(
            index,
            Box::new(move || blocked.finish(Outcome::ThenOk(std::sync::Mutex::new(Some(Box::new(move || start_watching(id, keys))))))),
        ),
        Err(e) => blocked.finish(Outcome::Error(state::error_reply(&e, slot))),
    }));
    Ok(())
}

/// On the main thread, once the writes proposed before the WATCH of client `id` are applied
/// (others may have been applied since): they came before it, as in
/// Redis (the client's own pipelined `SET k` before `WATCH k` included), and Redis now watches
/// the keys. A write proposed since, which may have been applied in the same batch as the last of
/// them, marks the transaction dirty (and, through the key it touches, any other watching it).
/// Gone from the registry (this node stopped leading meanwhile, see [`deposed`]), or on a node
/// that no longer leads, the watch cannot be kept: the keys count as modified.
fn start_watching(id: ClientId, keys: Vec<Key>) {
    let awaiting = lock().clients.as_mut().and_then(|c| c.get_mut(&id)).and_then(|c| c.awaiting.take());
    let leads = state::get().node().is_some_and(|n| n.is_leader());
    let touched = !leads || awaiting.is_none_or(|a| a.touched);
    let names: Vec<Vec<u8>> = keys.iter().flat_map(|(_, key)| [key.clone(), stand_in(id, key)]).collect();
    if crate::held::watch_keys(id, &names) && touched {
        let (db, key) = &keys[0];
        ffi::signal_modified_key(state::get().main_thread_ctx(), *db, &stand_in(id, key));
    }
}

/// The key watched for client `id` along with `key`, and marked in its place (see the module's
/// comment): a name no client writes, made of the client and the key.
fn stand_in(id: ClientId, key: &[u8]) -> Vec<u8> {
    let mut name = format!("\0raftis-watch\0{id}\0").into_bytes();
    name.extend_from_slice(key);
    name
}

/// A write of `argv` in database `db` is being proposed (or joins a transaction) on this node:
/// clients watching its keys are marked dirty now, not when it is applied.
pub fn touch(db: u32, argv: &[impl AsRef<[u8]>]) {
    if COUNT.load(Ordering::Relaxed) == 0 || changes_no_key(argv) {
        return;
    }
    let ctx = state::get().main_thread_ctx();
    // `MOVE key db` and `COPY ... DB db` write a key of another database, which Redis' key
    // positions do not name.
    let argv_bytes: Vec<&[u8]> = argv.iter().map(AsRef::as_ref).collect();
    let mut touched: Vec<(u32, &[u8])> = ffi::CommandKeys::of(ctx, argv).positions().iter().map(|&i| (db, argv_bytes[i])).collect();
    if let Some((other_db, key)) = raftis_core::determinism::key_in_another_database(&argv_bytes) {
        touched.push((other_db, key));
    }
    // A write that names no key may change any key of the databases it works on: FLUSHDB its
    // own, SWAPDB its two, anything else (FLUSHALL, a keyless script) every one.
    let databases = databases_changed(db, &argv_bytes);
    let in_scope = |d: u32| databases.as_ref().is_none_or(|dbs| dbs.contains(&d));
    let hit = |(d, k): &Key| match touched.is_empty() {
        true => in_scope(*d),
        false => touched.contains(&(*d, k.as_slice())),
    };
    let mut w = lock();
    for (id, client) in w.clients.iter_mut().flat_map(|c| c.iter_mut()) {
        if let Some(awaiting) = client.awaiting.as_mut() {
            awaiting.touched |= awaiting.keys.iter().any(hit);
        }
        // (A key in both sets is marked twice: the second mark changes nothing.)
        for (db, key) in client.current.iter().chain(&client.ending).filter(|k| hit(k)) {
            ffi::signal_modified_key(ctx, *db, &stand_in(*id, key));
        }
    }
}

/// The databases a keyless write in `db` changes, where Redis limits it to some (FLUSHDB, SWAPDB);
/// None for every database.
fn databases_changed(db: u32, argv: &[&[u8]]) -> Option<Vec<u32>> {
    let name = argv.first()?;
    if name.eq_ignore_ascii_case(b"flushdb") {
        return Some(vec![db]);
    }
    if name.eq_ignore_ascii_case(b"swapdb") {
        let dbs = raftis_core::determinism::database_indexes(argv);
        return dbs.iter().map(|d| u32::try_from(*d).ok()).collect::<Option<Vec<u32>>>().filter(|dbs| dbs.len() == 2);
    }
    None
}

/// `RAFT._UNWATCH UNWATCH`, which the filter makes of UNWATCH: Redis' own UNWATCH, and the keys
/// are forgotten here too (they would otherwise be remembered until the client's next
/// transaction, and every write would keep being checked against them). Inside MULTI it is queued
/// and runs at EXEC, as Redis' own.
pub fn unwatch(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    if !matches!(args, [_, unwatch] if unwatch.eq_ignore_ascii_case(b"unwatch")) {
        return Err("ERR RAFT._UNWATCH only takes UNWATCH (it is used internally)".into());
    }
    crate::held::unwatch(ctx)?;
    if COUNT.load(Ordering::Relaxed) > 0 {
        let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
        if let Some(watched) = lock().clients.as_mut().and_then(|c| c.get_mut(&id)) {
            watched.current.clear();
            watched.ending.clear();
        }
    }
    Ok(())
}

/// Replicated commands that change no key: those that name none (a message, the script cache,
/// the function libraries), for which a write without keys would count for every watched key,
/// and the reads that go through the log (read-only scripts, and PFCOUNT, which may only
/// refresh its cached count).
fn changes_no_key(argv: &[impl AsRef<[u8]>]) -> bool {
    const NO_KEYS: &[&[u8]] = &[b"publish", b"spublish", b"script", b"function", b"eval_ro", b"evalsha_ro", b"fcall_ro", b"pfcount"];
    let Some(name) = argv.first().map(AsRef::as_ref) else { return false };
    if NO_KEYS.iter().any(|n| name.eq_ignore_ascii_case(n)) {
        return true;
    }
    // A script whose first line says `no-writes` (`EVALSHA` is `EVAL` of its text by now).
    name.eq_ignore_ascii_case(b"eval") && argv.get(1).is_some_and(|text| script_shebang::writes_nothing(text.as_ref()))
}

/// The client `id` has just opened a transaction: what it watches so far stops being watched
/// when the transaction ends (its keys are remembered until then).
pub fn transaction_opened(id: ClientId) {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    if let Some(c) = lock().clients.as_mut().and_then(|c| c.get_mut(&id)) {
        let current = std::mem::take(&mut c.current);
        c.ending.extend(current);
    }
}

/// Whether the client `id` watches keys this module knows of (its transaction's included).
pub fn watches(id: ClientId) -> bool {
    COUNT.load(Ordering::Relaxed) > 0 && lock().clients.as_ref().is_some_and(|c| c.contains_key(&id))
}

/// Before Redis sleeps: on a node that no longer leads, every watched key counts as modified
/// (the next leader knows nothing of these watches, and its writes reach this node only once
/// applied, maybe after its client's EXEC went there), and the watches are forgotten. Then, at
/// most every [`PRUNE_EVERY`], forgets the keys of transactions that are over, and clients that
/// have gone or watch nothing left.
pub fn before_sleep() {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    if state::get().node().is_some_and(|n| !n.is_leader()) {
        return deposed();
    }
    let mut w = lock();
    if w.pruned.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
        return;
    }
    w.pruned = Some(Instant::now());
    let Some(clients) = w.clients.as_mut() else { return };
    clients.retain(|id, watched| {
        let Some(flags) = ffi::client_flags(*id) else { return false };
        if flags & raw::REDISMODULE_CLIENTINFO_FLAG_MULTI as u64 == 0 {
            watched.ending.clear();
        }
        !(watched.current.is_empty() && watched.ending.is_empty())
    });
    COUNT.store(clients.len(), Ordering::Relaxed);
}

/// This node stopped leading: its watchers' transactions cannot be checked any more.
fn deposed() {
    let clients = lock().clients.take().unwrap_or_default();
    COUNT.store(0, Ordering::Relaxed);
    let ctx = state::get().main_thread_ctx();
    for (id, client) in &clients {
        for (db, key) in client.current.iter().chain(&client.ending) {
            ffi::signal_modified_key(ctx, *db, &stand_in(*id, key));
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Watchers> {
    WATCHERS.lock().unwrap_or_else(|p| p.into_inner())
}
