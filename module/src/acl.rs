//! ACL rules for commands the filter hands to the module.
//!
//! Redis checks a client's ACL rules against the command it runs, and after the filter that is
//! `RAFT._CMD` (or `RAFT._READ`, ...), not the command the client sent. Module commands belong to
//! no ACL category in Redis 7.0, so a restricted user must be granted them by name (see the
//! README), and then Redis no longer checks the real command: `+raft._cmd` would let a user
//! limited to `+set ~app:*` run `DEL other`. So each internal command checks the client's command
//! against the client's user itself, with Redis' own `ACL DRYRUN`, and refuses it with the
//! `-NOPERM` reply Redis would have given.
//!
//! `ACL DRYRUN` costs a command call: when the only user is an unrestricted `default` (Redis' own
//! default, and what a deployment without ACL has), nothing can be refused and nothing is
//! checked. Which of the two holds is learnt from `ACL LIST` again after any `ACL` command or
//! `EXEC` has passed the filter. Inside EXEC it is learnt afresh for every check and not kept: a
//! transaction may hold an `ACL SETUSER` that changes the users halfway through, and the commands
//! EXEC runs do not pass the filter.
//!
//! Inside MULTI, Redis refuses a command at queueing and discards the transaction at EXEC; here the
//! refusal comes at EXEC, and discards the whole transaction just the same.
//!
//! A script's own calls run when the log applies it, without the caller's user, so Redis could
//! not check them as it would: scripts and functions are refused to users with any restriction.

use crate::ffi::{self, api, RedisModuleCtx};
use redis_module::raw;
use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
/// Only an unrestricted `default` user.
const OPEN: u8 = 1;
const RESTRICTED: u8 = 2;

static USERS: AtomicU8 = AtomicU8::new(UNKNOWN);
/// What was last learnt of the users (`OPEN` or `RESTRICTED`), kept across an `EXEC`, which
/// only may have changed them; forgotten at an `ACL` command (see [`may_restrict`]).
static LAST_LEARNT: AtomicU8 = AtomicU8::new(UNKNOWN);

/// From the filter, for every command: an `ACL` command (or an `EXEC`, which may hold one) is
/// about to change the users, so they are looked at again before the next check.
pub fn command_seen(name: &[u8]) {
    if name.eq_ignore_ascii_case(b"acl") {
        USERS.store(UNKNOWN, Ordering::Relaxed);
        LAST_LEARNT.store(UNKNOWN, Ordering::Relaxed);
    } else if name.eq_ignore_ascii_case(b"exec") {
        USERS.store(UNKNOWN, Ordering::Relaxed);
    }
}

/// Whether some user may have restrictions (or the users changed since they were last looked
/// at): Redis itself may then refuse a command for its keys before the module runs it.
pub fn may_restrict() -> bool {
    // After an EXEC the users are looked at again before the next check, but one that held an
    // `ACL SETUSER` is rare: until then, what was last learnt stands (every lone write given a
    // slot after each EXEC would undo what lone writes save).
    match USERS.load(Ordering::Relaxed) {
        UNKNOWN => LAST_LEARNT.load(Ordering::Relaxed) != OPEN,
        users => users != OPEN,
    }
}

/// Checks that the calling client's user may run `argv`: `Err` is the `-NOPERM` reply. Inside
/// EXEC, a refusal discards the whole transaction (see `transaction::abort`).
pub fn check(ctx: *mut RedisModuleCtx, argv: &[&[u8]]) -> Result<(), String> {
    let verdict = check_user(ctx, argv);
    if let Err(refused) = &verdict {
        if crate::transaction::in_exec(ctx) {
            crate::transaction::abort(ctx, refused);
        }
    }
    verdict
}

fn check_user(ctx: *mut RedisModuleCtx, argv: &[&[u8]]) -> Result<(), String> {
    if !restricted(ctx) || argv.is_empty() {
        return Ok(());
    }
    // Redis checks no ACL rules for a caller without a user.
    let Some(user) = current_user(ctx) else { return Ok(()) };
    if crate::scripts::runs_lua(argv[0]) && !is_unrestricted(ctx, &user) {
        return Err(format!(
            "NOPERM Raftis runs a script's calls when the log applies it, without the ACL rules of user '{}'; \
             scripts and functions are refused to users with restrictions",
            String::from_utf8_lossy(&user)
        ));
    }
    let mut dryrun: Vec<&[u8]> = vec![b"ACL", b"DRYRUN", &user];
    dryrun.extend_from_slice(argv);
    let reply = ffi::call(ctx, &dryrun, false);
    // Anything but a refusal (OK, or an error about the command itself, which Redis will answer
    // when it runs it) lets the command through.
    let verdict = if reply.is_null() || ffi::is_error(reply) { None } else { refusal(ffi::reply_bytes(reply)) };
    ffi::free_call_reply(reply);
    let Some(refused) = verdict else { return Ok(()) };
    log_refusal(ctx, &user, &refused);
    Err(refused.reply)
}

/// What `ACL DRYRUN` refused and why.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    /// Redis' own `-NOPERM` reply (without the '-').
    reply: String,
    /// For `ACL LOG`: what was refused (a command, key or channel name) and which kind it is.
    object: String,
    kind: raw::RedisModuleACLLogEntryReason,
}

/// Redis' own `-NOPERM` reply for `ACL DRYRUN`'s reason, or None for `OK`.
fn refusal(reason: &[u8]) -> Option<Refusal> {
    if reason == b"OK" {
        return None;
    }
    let reason = String::from_utf8_lossy(reason);
    // The reason names what it refuses between quotes: "... the 'other' key".
    let object = reason.split('\'').nth(1).unwrap_or_default().to_string();
    let (what, kind) = if reason.starts_with("This user has no permissions to access the") {
        if reason.ends_with(" channel") {
            ("access one of the channels used as arguments".to_string(), raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_CHANNEL)
        } else {
            ("access one of the keys used as arguments".to_string(), raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_KEY)
        }
    } else if let Some(run) = reason.strip_prefix("This user has no permissions to ") {
        (run.to_string(), raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_CMD)
    } else {
        let kind = raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_CMD;
        return Some(Refusal { reply: format!("NOPERM {reason}"), object, kind });
    };
    Some(Refusal { reply: format!("NOPERM this user has no permissions to {what}"), object, kind })
}

/// An entry in `ACL LOG`, as Redis makes for a command it refuses.
fn log_refusal(ctx: *mut RedisModuleCtx, user: &[u8], refused: &Refusal) {
    let name = ffi::new_string(user);
    let module_user = unsafe { api!(RedisModule_GetModuleUserFromUserName)(name) };
    ffi::free_string(name);
    if module_user.is_null() {
        return;
    }
    let object = ffi::new_string(refused.object.as_bytes());
    unsafe { api!(RedisModule_ACLAddLogEntry)(ctx, module_user, object, refused.kind) };
    ffi::free_string(object);
    unsafe { api!(RedisModule_FreeModuleUser)(module_user) };
}

fn restricted(ctx: *mut RedisModuleCtx) -> bool {
    let in_exec = crate::transaction::in_exec(ctx);
    match USERS.load(Ordering::Relaxed) {
        OPEN if !in_exec => false,
        RESTRICTED if !in_exec => true,
        _ => {
            let users = ffi::call(ctx, &[&b"ACL"[..], b"LIST"], false);
            let lines: Vec<Vec<u8>> = if ffi::is_array(users) {
                (0..ffi::reply_len(users)).map(|i| ffi::reply_bytes(ffi::reply_element(users, i)).to_vec()).collect()
            } else {
                Vec::new()
            };
            ffi::free_call_reply(users);
            let open = matches!(lines.as_slice(), [only] if is_open_default(only));
            LAST_LEARNT.store(if open { OPEN } else { RESTRICTED }, Ordering::Relaxed);
            // Within EXEC the users may change after this check: what is learnt is not kept,
            // and the next check outside EXEC learns it again.
            USERS.store(
                if in_exec {
                    UNKNOWN
                } else if open {
                    OPEN
                } else {
                    RESTRICTED
                },
                Ordering::Relaxed,
            );
            !open
        }
    }
}

/// `user default on nopass sanitize-payload ~* &* +@all` (or with passwords): every command, key
/// and channel, as Redis starts without ACL configuration.
fn is_open_default(line: &[u8]) -> bool {
    let line = String::from_utf8_lossy(line);
    let words: Vec<&str> = line.split_whitespace().collect();
    let grants_everything = words.ends_with(&["~*", "&*", "+@all"]);
    words.get(..3) == Some(&["user", "default", "on"][..]) && grants_everything && !line.contains('(')
}

/// Whether `user` may run every command on every key and channel (`ACL GETUSER`).
fn is_unrestricted(ctx: *mut RedisModuleCtx, user: &[u8]) -> bool {
    let reply = ffi::call(ctx, &[&b"ACL"[..], b"GETUSER", user], false);
    let mut fields = std::collections::HashMap::new();
    if ffi::is_array(reply) {
        let n = ffi::reply_len(reply);
        for i in (0..n.saturating_sub(1)).step_by(2) {
            let value = ffi::reply_element(reply, i + 1);
            let value = if ffi::is_array(value) {
                format!("[{}]", ffi::reply_len(value))
            } else {
                String::from_utf8_lossy(ffi::reply_bytes(value)).into_owned()
            };
            fields.insert(String::from_utf8_lossy(ffi::reply_bytes(ffi::reply_element(reply, i))).into_owned(), value);
        }
    }
    ffi::free_call_reply(reply);
    let is = |field: &str, wanted: &str| fields.get(field).is_some_and(|v| v == wanted);
    is("commands", "+@all") && is("keys", "~*") && is("channels", "&*") && is("selectors", "[0]")
}

/// The user the client of `ctx` runs as; None for a client that has none, which Redis treats as
/// its root user: the client another module's `RedisModule_Call` runs on, unless that module asked
/// to run the call as a user (its `C` flag).
pub fn current_user(ctx: *mut RedisModuleCtx) -> Option<Vec<u8>> {
    let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
    let name = unsafe { api!(RedisModule_GetClientUserNameById)(ctx, id) };
    if name.is_null() {
        // Not a connection (Redis finds only those by id): another module's call. Redis'
        // `RedisModule_GetCurrentUserName` would dereference a missing user and crash, so ask
        // Redis to run something as this client's user first: it refuses, saying so, if there is
        // none. (Any other answer, an ACL refusal included, means there is one.)
        if !has_user(ctx) {
            return None;
        }
        return Some(string_of(unsafe { api!(RedisModule_GetCurrentUserName)(ctx) }));
    }
    Some(string_of(name))
}

fn string_of(name: *mut ffi::RedisModuleString) -> Vec<u8> {
    let bytes = ffi::string_bytes(name).to_vec();
    ffi::free_string(name);
    bytes
}

/// Whether the client of `ctx` has a user attached (see [`current_user`]).
fn has_user(ctx: *mut RedisModuleCtx) -> bool {
    // "c": one C string argument; "C": as the context's user; "E": errors as replies.
    let reply = unsafe { api!(RedisModule_Call)(ctx, c"ACL".as_ptr(), c"cCE".as_ptr(), c"WHOAMI".as_ptr()) };
    let no_user = reply.is_null() || (ffi::is_error(reply) && ffi::reply_bytes(reply).windows(18).any(|w| w == b"cannot run as user"));
    ffi::free_call_reply(reply);
    !no_user
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dryrun_reasons_become_redis_own_noperm_replies() {
        assert_eq!(refusal(b"OK"), None);
        let command = refusal(b"This user has no permissions to run the 'del' command").unwrap();
        assert_eq!(command.reply, "NOPERM this user has no permissions to run the 'del' command");
        assert_eq!((command.object.as_str(), command.kind), ("del", raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_CMD));
        let key = refusal(b"This user has no permissions to access the 'other' key").unwrap();
        assert_eq!(key.reply, "NOPERM this user has no permissions to access one of the keys used as arguments");
        assert_eq!((key.object.as_str(), key.kind), ("other", raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_KEY));
        let channel = refusal(b"This user has no permissions to access the 'news' channel").unwrap();
        assert_eq!(channel.reply, "NOPERM this user has no permissions to access one of the channels used as arguments");
        assert_eq!(channel.kind, raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_CHANNEL);
    }

    #[test]
    fn only_an_unrestricted_default_user_leaves_nothing_to_check() {
        assert!(is_open_default(b"user default on nopass sanitize-payload ~* &* +@all"));
        assert!(is_open_default(b"user default on #5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 ~* &* +@all"));
        assert!(!is_open_default(b"user default on nopass ~app:* &* +@all"));
        assert!(!is_open_default(b"user default on nopass ~* &* +@all -flushall"));
        assert!(!is_open_default(b"user default off nopass ~* &* +@all"));
        assert!(!is_open_default(b"user default on nopass ~* &* +@all (~x +get)"));
    }
}
