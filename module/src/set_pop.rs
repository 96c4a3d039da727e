//! `SPOP` with the same outcome on every node (see `raftis_core::set_pop`): the leader writes
//! candidates into the entry ([`draw_candidates`]), and every node pops those the set still holds,
//! choosing any others it needs by the entry's log index, removes them with `SREM` and answers
//! Redis' own reply for them ([`apply`]). A pop that leaves nothing to chance (an error, a missing
//! key, a count of zero or one that takes the whole set) is Redis' own `SPOP`.

use crate::blocked::Outcome;
use crate::ffi::{self, api, RedisModuleCtx};
use crate::state;
use raftis_core::determinism::Args;
use raftis_core::set_pop::{self, Choice, HINT};
use raftis_core::LogIndex;
use redis_module::raw;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::ffi::c_void;
use std::os::raw::c_char;

/// On the leader, before an `SPOP` in database `db` is proposed: draws the members it will pop from
/// this node's dataset (`SRANDMEMBER`) and appends them to `argv` as candidates. Errs, on any node,
/// with Redis' reply to an `SPOP` with too many arguments, which must not reach the log: there,
/// arguments after the client's are the leader's candidates. A follower that readies a transaction
/// for the leader (see `forward`) draws nothing: the leader readies the pop again.
pub fn draw_candidates(db: u32, argv: &mut Args) -> Result<(), String> {
    if !argv.first().is_some_and(|name| name.eq_ignore_ascii_case(b"spop")) {
        return Ok(());
    }
    let refs: Vec<&[u8]> = argv.iter().map(|a| a.as_ref()).collect();
    if set_pop::has_too_many_arguments(&refs) {
        return Err("ERR syntax error".into());
    }
    if !state::get().node().is_some_and(|node| node.is_leader()) {
        return Ok(());
    }
    let Some(requested) = set_pop::requested(&refs) else { return Ok(()) };
    let ctx = state::get().main_thread_ctx();
    // Only a hint for the entry, read without deleting anything by this node's clock (see
    // `expiry`): the entry itself meets the set as of its time.
    let drawn = crate::expiry::suspended(|| {
        if !ffi::select_db(ctx, db) || !holds_more_than(ctx, refs[1], requested.count) {
            return None;
        }
        Some(ffi::call(ctx, &[&b"SRANDMEMBER"[..], refs[1], requested.count.to_string().as_bytes()], false))
    });
    let Some(drawn) = drawn else { return Ok(()) };
    if ffi::is_array(drawn) && ffi::reply_len(drawn) > 0 {
        let candidates: Vec<Vec<u8>> =
            (0..ffi::reply_len(drawn)).map(|i| ffi::reply_bytes(ffi::reply_element(drawn, i)).to_vec()).collect();
        argv.push(Cow::Borrowed(HINT));
        argv.extend(candidates.into_iter().map(Cow::Owned));
    }
    ffi::free_call_reply(drawn);
    Ok(())
}

/// Applies the `SPOP` entry `argv` at log index `index`; None if it is not one.
pub fn apply(ctx: *mut RedisModuleCtx, index: LogIndex, argv: &[&[u8]], resp3: bool) -> Option<Outcome> {
    if !argv.first()?.eq_ignore_ascii_case(b"spop") {
        return None;
    }
    let (client, candidates) = set_pop::split_hint(argv);
    let chance = set_pop::requested(client).filter(|r| holds_more_than(ctx, client[1], r.count));
    let Some(requested) = chance else { return Some(Outcome::Call(ffi::call(ctx, client, resp3))) };
    let key = client[1];
    let mut popped = still_held(ctx, key, candidates, requested.count);
    if popped.len() < requested.count {
        let taken: BTreeSet<Vec<u8>> = popped.iter().cloned().collect();
        popped.extend(choose(ctx, key, Choice::new(requested.count - popped.len(), index.get(), taken)));
    }
    let remove: Vec<&[u8]> = [&b"SREM"[..], key].into_iter().chain(popped.iter().map(Vec::as_slice)).collect();
    ffi::free_call_reply(ffi::call(ctx, &remove, false));
    Some(Outcome::Relay(set_pop::reply(&popped, requested.with_count, resp3)))
}

/// Whether `key` is a set of more than `count` members: a pop of `count` then leaves some.
fn holds_more_than(ctx: *mut RedisModuleCtx, key: &[u8], count: usize) -> bool {
    let (kind, len) = ffi::key_type_and_length(ctx, key);
    kind as isize == raw::REDISMODULE_KEYTYPE_SET && count < len
}

/// The first `count` distinct `candidates` the set at `key` holds, in their order.
fn still_held(ctx: *mut RedisModuleCtx, key: &[u8], candidates: &[&[u8]], count: usize) -> Vec<Vec<u8>> {
    if candidates.is_empty() {
        return Vec::new();
    }
    let ask: Vec<&[u8]> = [&b"SMISMEMBER"[..], key].into_iter().chain(candidates.iter().copied()).collect();
    let answers = ffi::call(ctx, &ask, false);
    let mut held: Vec<Vec<u8>> = Vec::new();
    // A pop of most of a big set has as many candidates: a set, not a scan of `held`, per one.
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(candidates.len());
    if ffi::is_array(answers) && ffi::reply_len(answers) == candidates.len() {
        for (i, candidate) in candidates.iter().enumerate() {
            let is_member = ffi::reply_integer_value(ffi::reply_element(answers, i)) == 1;
            if held.len() < count && is_member && seen.insert(candidate) {
                held.push(candidate.to_vec());
            }
        }
    }
    ffi::free_call_reply(answers);
    held
}

/// What `choice` takes from the set at `key`, its members offered by a scan of the set (no reply
/// to build for a whole set).
fn choose(ctx: *mut RedisModuleCtx, key: &[u8], mut choice: Choice) -> Vec<Vec<u8>> {
    let name = ffi::new_string(key);
    let opened = unsafe { api!(RedisModule_OpenKey)(ctx, name, ffi::QUIET_PROBE) };
    ffi::free_string(name);
    if opened.is_null() {
        return Vec::new();
    }
    let cursor = unsafe { api!(RedisModule_ScanCursorCreate)() };
    let privdata = &mut choice as *mut Choice as *mut c_void;
    while unsafe { api!(RedisModule_ScanKey)(opened, cursor, Some(offer), privdata) } != 0 {}
    unsafe { api!(RedisModule_ScanCursorDestroy)(cursor) };
    unsafe { api!(RedisModule_CloseKey)(opened) };
    choice.popped()
}

extern "C" fn offer(
    _key: *mut raw::RedisModuleKey,
    member: *mut raw::RedisModuleString,
    _value: *mut raw::RedisModuleString,
    privdata: *mut c_void,
) {
    let choice = unsafe { &mut *(privdata as *mut Choice) };
    let mut len = 0usize;
    let ptr = unsafe { api!(RedisModule_StringPtrLen)(member, &mut len) } as *const c_char;
    if !ptr.is_null() {
        choice.offer(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) });
    }
}
