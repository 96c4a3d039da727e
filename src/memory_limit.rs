//! The memory limit (`maxmemory=` of the module), as Redis' own `maxmemory` with `noeviction`
//! would apply it, but decided once, by the leader, for every node.
//!
//! Redis' own `maxmemory` cannot be used on a Raftis node. Redis judges it by each server's memory
//! at the moment a command starts, and a script replayed from the log looks at that judgement too
//! (its first write that may grow memory fails when the server was over the limit when the last
//! client command arrived): one node over its limit would refuse a script's write that the others
//! applied. So Redis' `maxmemory` stays 0 and the leader, when it readies a client's command for
//! the log, does what Redis' `processCommand` would: over the limit, a command flagged `denyoom`
//! is refused with Redis' own `-OOM` error, before it reaches the log. A script is the exception,
//! because Redis decides inside it:
//!
//! - a plain `EVAL` (no `#!` line) runs, and only its first call that may grow memory, if it comes
//!   before any write, fails. The leader marks the entry ([`OVER_LIMIT`] before the command) and
//!   every node fails that same call;
//! - a script with a `#!` line, or a function, is refused whole unless its flags say `allow-oom`
//!   or `no-writes` ([`ScriptFlags`]), with the same error as any command (Redis derives the
//!   command's `denyoom` from those flags).
//!
//! Once in the log, an entry is applied on every node whatever its memory, as Redis replicas
//! apply what their master sends.

use crate::script_shebang;

/// Redis' reply to a command refused over the limit (`shared.oomerr`), without the leading '-'.
pub const OOM_ERROR: &str = "OOM command not allowed when used memory > 'maxmemory'.";

/// Put by the leader before a script's command in a log entry: it was proposed while the leader
/// was over its limit. No client can send it: the filter keeps `RAFT.*` names local.
pub const OVER_LIMIT: &[u8] = b"raft.over-maxmemory";

/// Splits the leader's mark off a command of the log: whether it was there, and the command.
pub fn split_mark<'a, 'b>(argv: &'b [&'a [u8]]) -> (bool, &'b [&'a [u8]]) {
    match argv.split_first() {
        Some((first, rest)) if *first == OVER_LIMIT => (true, rest),
        _ => (false, argv),
    }
}

/// What a script's own flags let it do over the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptFlags {
    /// No `#!` line: Redis' compatibility mode, checked call by call.
    Compatible,
    /// `allow-oom` or `no-writes`: it runs as if there were no limit.
    MayRunOverLimit,
    /// Flags without either: refused before it starts.
    RefusedOverLimit,
}

impl ScriptFlags {
    /// From a script's text, as Redis reads its first line: `#!lua [flags=a,b,...]`. A first line
    /// Redis cannot read leaves the script as it is, as in Redis (which then refuses it, over the
    /// limit or not, with an error about its first line).
    pub fn of_script(text: &[u8]) -> ScriptFlags {
        match script_shebang::flags(text) {
            Some(flags) => Self::of_flags(flags),
            None => ScriptFlags::Compatible,
        }
    }

    /// From a function's flags, as `FUNCTION LIST` names them.
    pub fn of_flags<S: AsRef<str>>(flags: impl IntoIterator<Item = S>) -> ScriptFlags {
        let allowed = flags.into_iter().any(|f| f.as_ref() == "allow-oom" || f.as_ref() == "no-writes");
        if allowed {
            ScriptFlags::MayRunOverLimit
        } else {
            ScriptFlags::RefusedOverLimit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_is_judged_by_its_first_line() {
        assert_eq!(ScriptFlags::of_script(b"return redis.call('set', 'k', 'v')"), ScriptFlags::Compatible);
        assert_eq!(ScriptFlags::of_script(b"#!lua\nreturn 1"), ScriptFlags::RefusedOverLimit);
        assert_eq!(ScriptFlags::of_script(b"#!lua flags=no-writes\nreturn 1"), ScriptFlags::MayRunOverLimit);
        assert_eq!(ScriptFlags::of_script(b"#!lua flags=allow-stale,allow-oom\nreturn 1"), ScriptFlags::MayRunOverLimit);
        assert_eq!(ScriptFlags::of_script(b"#!lua flags=allow-stale\nreturn 1 -- allow-oom"), ScriptFlags::RefusedOverLimit);
        assert_eq!(ScriptFlags::of_script(b"#!lua flags=allow-oom"), ScriptFlags::Compatible, "no newline: Redis' error");
        assert_eq!(ScriptFlags::of_script(b"#!python\nreturn 1"), ScriptFlags::Compatible, "another engine: Redis' error");
        assert_eq!(ScriptFlags::of_script(b"#!lua flags=no-such\nreturn 1"), ScriptFlags::Compatible, "unknown flag: Redis' error");
        assert_eq!(ScriptFlags::of_script(b"#!lua name=x\nreturn 1"), ScriptFlags::Compatible, "unknown option: Redis' error");
        assert_eq!(ScriptFlags::of_script(b" #!lua\nreturn 1"), ScriptFlags::Compatible, "the mark must open the script");
    }

    #[test]
    fn functions_are_judged_by_their_flags() {
        assert_eq!(ScriptFlags::of_flags(["no-writes"]), ScriptFlags::MayRunOverLimit);
        assert_eq!(ScriptFlags::of_flags(["allow-oom", "allow-stale"]), ScriptFlags::MayRunOverLimit);
        assert_eq!(ScriptFlags::of_flags(Vec::<String>::new()), ScriptFlags::RefusedOverLimit);
    }

    #[test]
    fn the_mark_comes_off_before_the_command() {
        let marked: Vec<&[u8]> = vec![OVER_LIMIT, b"EVAL", b"return 1", b"0"];
        assert_eq!(split_mark(&marked), (true, &marked[1..]));
        let plain: Vec<&[u8]> = vec![b"EVAL", b"return 1", b"0"];
        assert_eq!(split_mark(&plain), (false, &plain[..]));
        assert_eq!(split_mark(&[]), (false, &[][..]));
    }
}
