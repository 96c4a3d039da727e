//! `RESTORE` carries a serialized value (`DUMP`'s payload) that Redis decodes only when the
//! command runs. When the payload turns out malformed inside (its checksum is right), Redis
//! answers an error only if a client's command is running; anywhere else it takes the payload
//! for a corrupt RDB file and exits (`rdbReportError`). Every node applies the log from Redis'
//! event loop, outside any client's command: one such `RESTORE` in the log would stop every node,
//! and again each time they replay it.
//!
//! So a client's payload is tried where the client's command runs, before it goes into the log:
//! a `RESTORE` into a key that does not exist, with a deadline long past, decodes the payload as
//! the real one will and then stores nothing (Redis drops a value restored already expired). A
//! payload refused here gets Redis' own error and never reaches the log; one taken here is taken
//! by every node, which all check payloads whole (`sanitize-dump-payload`, see `redis_settings`).
//! Scripts cannot be tried so: `RESTORE` is refused inside them (see `raftis_core::routing`).
//! Nor can `FUNCTION RESTORE`, which would change the libraries: its payload is read instead
//! (see `raftis_core::function_payload`).

use crate::ffi::{self, RedisModuleCtx};
use raftis_core::function_payload;

/// Keys the trial restores into, tried in turn: only a key that does not exist takes the trial
/// (Redis answers `BUSYKEY` before decoding anything otherwise).
const TRIAL_KEYS: [&[u8]; 3] = [b"raftis:restore-trial", b"raftis:restore-trial:1", b"raftis:restore-trial:2"];

/// The client's command `argv`, about to be readied for the log (or forwarded to the leader) from
/// the client's own command `ctx`: if it is a `RESTORE` whose payload Redis would refuse, or a
/// `FUNCTION RESTORE` whose payload would stop it, that refusal.
pub fn check(ctx: *mut RedisModuleCtx, argv: &[&[u8]]) -> Result<(), String> {
    if let [function, restore, payload, ..] = argv {
        if function.eq_ignore_ascii_case(b"function") && restore.eq_ignore_ascii_case(b"restore") {
            return function_payload::check(payload);
        }
    }
    let [name, _key, _ttl, payload, ..] = argv else { return Ok(()) };
    if !name.eq_ignore_ascii_case(b"restore") {
        return Ok(());
    }
    for key in TRIAL_KEYS {
        // An absolute deadline of 1 ms after the epoch: long past on every clock.
        let reply = ffi::call(ctx, &[&b"RESTORE"[..], key, b"1", payload, b"ABSTTL"], false);
        let error = ffi::is_error(reply).then(|| String::from_utf8_lossy(ffi::reply_bytes(reply)).into_owned());
        ffi::free_call_reply(reply);
        match error {
            None => return Ok(()),
            Some(e) if e.starts_with("BUSYKEY") => continue,
            Some(e) => return Err(e),
        }
    }
    Err("ERR the RESTORE payload could not be checked: the keys Raftis tries it on exist".into())
}
