//! Where a client command goes: replicated through Raft, served as a read, run locally, or
//! refused. The decision comes from Redis' own command table (the flags `COMMAND INFO` reports),
//! so new Redis commands are classified without a list to maintain; only the commands that must
//! never be replicated and those not supported yet are named here.

use std::collections::HashMap;

/// What Redis says about a command (one entry of `COMMAND`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandInfo {
    /// Redis arity: positive is exact, negative is a minimum.
    pub arity: i64,
    pub write: bool,
    pub readonly: bool,
    pub blocking: bool,
    /// Has subcommands ("container" commands such as CONFIG or OBJECT).
    pub container: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Run by this node alone, untouched (connection state, admin, pub/sub, unknown commands).
    Local,
    /// Replicated through the log and applied on every node.
    Write,
    /// Served according to the read consistency level.
    Read,
    /// MULTI: the module starts the transaction, so it knows which clients have one open.
    BeginTransaction,
    /// WATCH: the module registers the keys and waits for the writes already proposed.
    Watch,
    /// Answered with this error (without the leading '-').
    Refuse(String),
}

/// Connection state, introspection and our own commands: never through the log.
const NEVER_REPLICATED: &[&str] = &[
    "select", "client", "auth", "hello", "monitor", "ping", "echo", "quit", "reset", "readonly", "readwrite",
    "command", "info", "config", "debug", "shutdown", "save", "bgsave", "bgrewriteaof", "slowlog", "latency",
    "memory", "module", "acl", "subscribe", "unsubscribe", "psubscribe", "punsubscribe", "ssubscribe",
    "sunsubscribe", "publish", "spublish", "pubsub", "time", "lastsave", "role", "lolwut", "script",
    // Redis queues a transaction's commands and runs them at EXEC, each one through this module.
    "exec", "discard", "unwatch",
];

/// Not supported yet: refused outright rather than half working.
const REFUSED: &[(&str, &str)] = &[
    ("eval", "scripts"),
    ("evalsha", "scripts"),
    ("eval_ro", "scripts"),
    ("evalsha_ro", "scripts"),
    ("fcall", "functions"),
    ("fcall_ro", "functions"),
    ("function", "functions"),
    ("wait", "WAIT (every acknowledged write is already on a majority)"),
    ("waitaof", "WAITAOF"),
    ("migrate", "MIGRATE"),
    ("replicaof", "Redis replication (Raftis replaces it)"),
    ("slaveof", "Redis replication (Raftis replaces it)"),
    ("failover", "Redis replication (Raftis replaces it)"),
    ("sync", "Redis replication (Raftis replaces it)"),
    ("psync", "Redis replication (Raftis replaces it)"),
];

/// Redis' command table, keyed by lower-case name; subcommands as `container|sub`.
#[derive(Clone, Debug, Default)]
pub struct CommandTable {
    commands: HashMap<String, CommandInfo>,
}

impl CommandTable {
    pub fn insert(&mut self, name: &str, info: CommandInfo) {
        self.commands.insert(name.to_ascii_lowercase(), info);
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&CommandInfo> {
        self.commands.get(name)
    }

    /// Classifies `argv` (the command and its arguments as the client sent them).
    pub fn route(&self, argv: &[&[u8]]) -> Route {
        let Some(first) = argv.first() else { return Route::Local };
        // Every client command passes here, some twice: lower-case short names on the stack.
        let mut stack = [0u8; 32];
        let owned;
        let name: &str = if first.len() <= stack.len() {
            let lower = &mut stack[..first.len()];
            lower.copy_from_slice(first);
            lower.make_ascii_lowercase();
            let Ok(name) = std::str::from_utf8(lower) else { return Route::Local };
            name
        } else {
            let Ok(name) = std::str::from_utf8(first) else { return Route::Local };
            owned = name.to_ascii_lowercase();
            &owned
        };
        if name == "multi" {
            return Route::BeginTransaction;
        }
        if name == "watch" {
            return Route::Watch;
        }
        if name.starts_with("raft.") || NEVER_REPLICATED.contains(&name) {
            return Route::Local;
        }
        if let Some((_, what)) = REFUSED.iter().find(|(n, _)| *n == name) {
            return Route::Refuse(format!("ERR {what} not supported by Raftis yet"));
        }
        let Some(mut info) = self.commands.get(name) else { return Route::Local };
        // The name errors use: the subcommand's, for a container whose subcommand we know.
        let mut subcommand = None;
        if info.container && argv.len() >= 2 {
            if let Ok(sub) = std::str::from_utf8(argv[1]) {
                let full = format!("{name}|{}", sub.to_ascii_lowercase());
                if let Some(sub_info) = self.commands.get(&full) {
                    info = sub_info;
                    subcommand = Some(full);
                }
            }
        }
        let display = subcommand.as_deref().unwrap_or(name);
        let argc = argv.len() as i64;
        let arity_ok = if info.arity >= 0 { argc == info.arity } else { argc >= -info.arity };
        if info.write {
            if !arity_ok {
                return Route::Refuse(format!("ERR wrong number of arguments for '{display}' command"));
            }
            if info.blocking {
                return Route::Refuse(format!("ERR blocking command '{display}' is not supported by Raftis yet"));
            }
            return Route::Write;
        }
        if info.readonly {
            // XREAD may block; only its non-blocking form is a plain read.
            if info.blocking && argv.iter().any(|a| a.eq_ignore_ascii_case(b"block")) {
                return Route::Refuse(format!("ERR blocking command '{display}' is not supported by Raftis yet"));
            }
            return Route::Read;
        }
        Route::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CommandTable {
        let mut t = CommandTable::default();
        t.insert("set", CommandInfo { arity: -3, write: true, ..Default::default() });
        t.insert("get", CommandInfo { arity: 2, readonly: true, ..Default::default() });
        t.insert("blpop", CommandInfo { arity: -3, write: true, blocking: true, ..Default::default() });
        t.insert("xread", CommandInfo { arity: -4, readonly: true, blocking: true, ..Default::default() });
        t.insert("object", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("object|encoding", CommandInfo { arity: 3, readonly: true, ..Default::default() });
        t.insert("flushall", CommandInfo { arity: -1, write: true, ..Default::default() });
        t
    }

    fn route(args: &[&str]) -> Route {
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        table().route(&argv)
    }

    #[test]
    fn flags_decide_write_read_local() {
        assert_eq!(route(&["SET", "k", "v"]), Route::Write);
        assert_eq!(route(&["flushall"]), Route::Write);
        assert_eq!(route(&["GET", "k"]), Route::Read);
        assert_eq!(route(&["OBJECT", "ENCODING", "k"]), Route::Read);
        assert_eq!(route(&["SELECT", "1"]), Route::Local);
        assert_eq!(route(&["RAFT.INFO"]), Route::Local);
        assert_eq!(route(&["NOSUCHCOMMAND", "x"]), Route::Local, "Redis answers unknown commands itself");
        assert_eq!(route(&["XREAD", "STREAMS", "s", "0"]), Route::Read);
        assert_eq!(route(&["sEt", "k", "v"]), Route::Write, "names are case-insensitive");
        let long = "X".repeat(40);
        assert_eq!(route(&[long.as_str()]), Route::Local, "a name too long for the stack buffer still routes");
        assert_eq!(table().route(&[b"SET\xff".as_slice(), b"k", b"v"]), Route::Local, "not UTF-8: Redis answers");
    }

    #[test]
    fn unsupported_and_malformed_writes_are_refused_with_redis_style_errors() {
        assert_eq!(route(&["SET", "k"]), Route::Refuse("ERR wrong number of arguments for 'set' command".into()));
        assert_eq!(route(&["multi"]), Route::BeginTransaction);
        assert_eq!(route(&["EXEC"]), Route::Local, "Redis runs the queued commands, each through the filter's route");
        assert_eq!(route(&["WATCH", "k"]), Route::Watch);
        assert_eq!(route(&["UNWATCH"]), Route::Local);
        assert!(matches!(route(&["eval", "return 1", "0"]), Route::Refuse(e) if e.starts_with("ERR scripts")));
        assert!(matches!(route(&["BLPOP", "l", "0"]), Route::Refuse(e) if e.contains("blocking")));
        assert!(matches!(route(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]), Route::Refuse(_)));
        let long_set = format!("SET{}", " ".repeat(40));
        assert_eq!(route(&[long_set.as_str(), "k", "v"]), Route::Local, "only the exact name matches");
    }
}
