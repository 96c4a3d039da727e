//! Where a client command goes: replicated through Raft, served as a read, run locally, or
//! refused. The decision comes from Redis' own command table (the flags `COMMAND INFO` reports),
//! so new Redis commands are classified without a list to maintain; only the commands that must
//! never be replicated and those not supported yet are named here.

use rustc_hash::FxHashMap;
use std::borrow::Cow;

/// What Redis says about a command (one entry of `COMMAND`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandInfo {
    /// Redis arity: positive is exact, negative is a minimum.
    pub arity: i64,
    pub write: bool,
    pub readonly: bool,
    /// May grow memory: refused over the memory limit (see `memory_limit`).
    pub denyoom: bool,
    pub blocking: bool,
    /// Redis tips it as `nondeterministic_output` (TIME, RANDOMKEY, TTL, ...) or
    /// `nondeterministic_output_order` (SMEMBERS, HGETALL, ...: the order of a hash table, whose
    /// hash seed differs on every node).
    pub nondeterministic: bool,
    /// Has subcommands ("container" commands such as CONFIG or OBJECT).
    pub container: bool,
    /// Where the keys are, as COMMAND's first key, last key (negative: from the end) and step;
    /// None when they move with the arguments (`movablekeys`).
    pub keys: Option<KeySpan>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeySpan {
    pub first: i64,
    pub last: i64,
    pub step: i64,
}

/// Where a command's keys are.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyPositions {
    /// At these argument positions (none for a command without keys).
    At(Vec<usize>),
    /// Only Redis can tell, from the arguments (or the command is not in the table).
    AskRedis,
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
    /// WAIT: the leader counts the followers that hold every write proposed before it.
    Wait,
    /// A blocking pop (BLPOP and the like) or `XREADGROUP ... BLOCK`: replicated, and retried
    /// until it gets something or times out (see `blocking`). Inside MULTI it does not block, as
    /// in Redis: a plain write.
    Blocking,
    /// `XREAD ... BLOCK`: served by the leader, at the first attempt or once a stream it reads
    /// gets newer entries (see `blocking`). Inside MULTI it does not block: a plain read.
    BlockingRead,
    /// Answered with this error (without the leading '-').
    Refuse(String),
}

/// Connection state, introspection and our own commands: never through the log.
const NEVER_REPLICATED: &[&str] = &[
    "select",
    "client",
    "auth",
    "hello",
    "monitor",
    "ping",
    "echo",
    "quit",
    "reset",
    "readonly",
    "readwrite",
    "command",
    "info",
    "config",
    "debug",
    "shutdown",
    "save",
    "bgsave",
    "bgrewriteaof",
    "slowlog",
    "latency",
    "module",
    "acl",
    "subscribe",
    "unsubscribe",
    "psubscribe",
    "punsubscribe",
    "ssubscribe",
    "sunsubscribe",
    "pubsub",
    "time",
    "lastsave",
    "role",
    "lolwut",
    // Redis queues a transaction's commands and runs them at EXEC, each one through this module.
    "exec",
    "discard",
    "unwatch",
];

/// Refused outright rather than half working, with the error's text (without the leading '-').
const REFUSED: &[(&str, &str)] = &[
    ("waitaof", "ERR WAITAOF not supported by Raftis yet"),
    ("migrate", "ERR MIGRATE not supported by Raftis yet"),
    // Redis Cluster's form of RESTORE, which Raftis would not make absolute (see `determinism`).
    ("restore-asking", "ERR RESTORE-ASKING is refused by Raftis: it is Redis Cluster's internal form of RESTORE; use RESTORE"),
    // A container's subcommand, by its full name.
    ("script|debug", "ERR SCRIPT DEBUG not supported by Raftis yet"),
    // Redis' own replication would copy another server's dataset over this one behind the log's
    // back, or make this node a master of replicas the log knows nothing of.
    ("replicaof", REPLICATION_REFUSED),
    ("slaveof", REPLICATION_REFUSED),
    ("failover", REPLICATION_REFUSED),
    ("sync", REPLICATION_REFUSED),
    ("psync", REPLICATION_REFUSED),
];

const REPLICATION_REFUSED: &str = "ERR Redis replication is refused by Raftis: the Raft log replicates every node \
     (RAFT.CLUSTER JOIN adds a node to a cluster, RAFT.PEERS lists the members)";

/// `DEBUG` stays local, but these subcommands would change one node's dataset, or how it follows
/// the log, behind the log's back: `RELOAD` and `LOADAOF` load files of this node's own,
/// `POPULATE` adds keys, `SET-ACTIVE-EXPIRE` is the module's to switch (see `expiry` in the
/// module), `SET-DISABLE-DENY-SCRIPTS` lets scripts run commands that would answer differently
/// on every node, and `SET-SKIP-CHECKSUM-VALIDATION` would let one node accept a `RESTORE`
/// payload the others refuse.
const DEBUG_REFUSED: &[&str] =
    &["reload", "loadaof", "populate", "set-active-expire", "set-disable-deny-scripts", "set-skip-checksum-validation"];

/// Replicated whatever Redis' flags say: a script or a function runs on every node, as one entry
/// (see the module's `scripts`), and the script cache changes on every node. (`FUNCTION LOAD`,
/// `DELETE`, `FLUSH` and `RESTORE` need no mention: Redis flags them `write`.) PFCOUNT is a read that
/// rewrites the HyperLogLog's cached cardinality (Redis flags it `may_replicate` and replicates
/// it): run as a read on one node, that node's bytes would part from the others'.
///
/// `PUBLISH` among them: Redis sends it to its replicas, whose subscribers get the message too; so
/// does the log, to every node's.
const REPLICATED: &[&str] =
    &["eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "script|load", "script|flush", "pfcount", "publish", "spublish"];

/// Commands whose answers differ between nodes although Redis does not tip them so: what a node's
/// clients subscribe to (`PUBSUB`), keys past their deadline that one node's background expiry
/// has deleted and another's not (`DBSIZE`), memory layouts (`MEMORY`), `rand()` (`LOLWUT`). A
/// script that wrote what they answer would part the nodes' datasets. (`PUBLISH` answers how
/// many of this node's clients got the message too, but is what scripts publish with: its count
/// is not to be written.)
const ANSWERS_DIFFER_IN_SCRIPTS: &[&str] = &["pubsub", "dbsize", "memory", "lolwut"];

/// Redis' command table, keyed by lower-case name; subcommands as `container|sub`.
///
/// Every client command and every applied entry is looked up here, so each name's fate under
/// Raftis (see [`Special`]) is decided once, when it is inserted, and the map hashes with
/// `FxHash` (names are short and come from Redis' own table, not from an attacker's choice of
/// map keys).
#[derive(Clone, Debug, Default)]
pub struct CommandTable {
    commands: FxHashMap<Box<str>, Known>,
}

#[derive(Clone, Debug)]
struct Known {
    info: CommandInfo,
    special: Special,
}

/// What Raftis decides about a command by its name alone, before Redis' flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Special {
    /// Decided by Redis' flags.
    None,
    BeginTransaction,
    Watch,
    Wait,
    Local,
    Replicated,
    Refused(&'static str),
}

impl Special {
    fn of(name: &str) -> Special {
        if name == "multi" {
            Special::BeginTransaction
        } else if name == "watch" {
            Special::Watch
        } else if name == "wait" {
            Special::Wait
        } else if name.starts_with("raft.") || NEVER_REPLICATED.contains(&name) {
            Special::Local
        } else if let Some((_, what)) = REFUSED.iter().find(|(n, _)| *n == name) {
            Special::Refused(what)
        } else if REPLICATED.contains(&name) {
            Special::Replicated
        } else {
            Special::None
        }
    }
}

impl CommandTable {
    pub fn insert(&mut self, name: &str, info: CommandInfo) {
        let name = name.to_ascii_lowercase();
        let special = Special::of(&name);
        self.commands.insert(name.into_boxed_str(), Known { info, special });
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&CommandInfo> {
        self.commands.get(name).map(|k| &k.info)
    }

    /// Where the keys of `argv` are, when the command's fixed key span tells without reading
    /// its arguments.
    pub fn key_positions(&self, argv: &[&[u8]]) -> KeyPositions {
        let Some(first) = argv.first() else { return KeyPositions::AskRedis };
        with_lower_case(first, |name| {
            let Some(KeySpan { first, last, step }) = name.and_then(|n| self.get(n)).filter(|i| !i.container).and_then(|i| i.keys) else {
                return KeyPositions::AskRedis;
            };
            let argc = argv.len() as i64;
            if first <= 0 || step <= 0 {
                return KeyPositions::At(Vec::new());
            }
            let last = if last < 0 { argc + last } else { last.min(argc - 1) };
            KeyPositions::At((first..=last).step_by(step as usize).map(|i| i as usize).collect())
        })
    }

    /// Classifies `argv` (the command and its arguments as the client sent them).
    pub fn route(&self, argv: &[&[u8]]) -> Route {
        let Some(first) = argv.first() else { return Route::Local };
        with_lower_case(first, |name| match name {
            Some(name) => self.route_named(name, argv),
            None => Route::Local,
        })
    }

    fn route_named(&self, name: &str, argv: &[&[u8]]) -> Route {
        // A name Redis does not know is still ours to refuse or keep local (WAITAOF on 7.0).
        let special = self.commands.get(name).map_or_else(|| Special::of(name), |known| known.special);
        match special {
            Special::BeginTransaction => return Route::BeginTransaction,
            Special::Watch => return Route::Watch,
            Special::Wait => return Route::Wait,
            Special::Local if name == "debug" => return debug_route(argv),
            Special::Local => return Route::Local,
            Special::Refused(what) => return refused(what),
            Special::None | Special::Replicated => {}
        }
        let Some((known, display)) = self.resolve(name, argv) else { return Route::Local };
        let info = &known.info;
        let argc = argv.len() as i64;
        let arity_ok = if info.arity >= 0 { argc == info.arity } else { argc >= -info.arity };
        if let Special::Refused(what) = known.special {
            return refused(what);
        }
        if !arity_ok {
            // Redis rejects it itself, with its own error, before anything runs; inside MULTI it
            // also marks the transaction so that EXEC aborts it, as it must.
            return Route::Local;
        }
        if known.special == Special::Replicated {
            return Route::Write;
        }
        let blocking_refused = || Route::Refuse(format!("ERR blocking command '{display}' is not supported by Raftis yet"));
        if info.write {
            if info.blocking {
                if crate::blocking::NAMES.contains(&name) {
                    return Route::Blocking;
                }
                // XREADGROUP blocks only with BLOCK; without, it is a write like any other.
                if name == "xreadgroup" {
                    return if stream_read_blocks(argv) { Route::Blocking } else { Route::Write };
                }
                return blocking_refused();
            }
            return Route::Write;
        }
        if info.readonly {
            // XREAD blocks only with BLOCK; without, it is a read like any other.
            if info.blocking && stream_read_blocks(argv) {
                return if name == "xread" { Route::BlockingRead } else { blocking_refused() };
            }
            return Route::Read;
        }
        Route::Local
    }

    /// The entry `argv` runs under, and the name errors give it: a container's subcommand when
    /// Redis' table has it, the command itself otherwise; None for a name Redis does not know.
    fn resolve<'a>(&'a self, name: &'a str, argv: &[&[u8]]) -> Option<(&'a Known, Cow<'a, str>)> {
        let known = self.commands.get(name)?;
        if known.info.container && argv.len() >= 2 {
            if let Ok(sub) = std::str::from_utf8(argv[1]) {
                let full = format!("{name}|{}", sub.to_ascii_lowercase());
                if let Some(sub_known) = self.commands.get(full.as_str()) {
                    return Some((sub_known, Cow::Owned(full)));
                }
            }
        }
        Some((known, Cow::Borrowed(name)))
    }

    /// Whether `argv` may grow memory (Redis flags it `denyoom`): refused over the memory limit.
    pub fn grows_memory(&self, argv: &[&[u8]]) -> bool {
        self.flag(argv, |info| info.denyoom)
    }

    /// Whether `argv` is flagged a write.
    pub fn writes(&self, argv: &[&[u8]]) -> bool {
        self.flag(argv, |info| info.write)
    }

    fn flag(&self, argv: &[&[u8]], flag: impl Fn(&CommandInfo) -> bool) -> bool {
        let Some(first) = argv.first() else { return false };
        with_lower_case(first, |name| name.and_then(|n| self.resolve(n, argv)).is_some_and(|(known, _)| flag(&known.info)))
    }

    /// Whether a script may run `argv` (a command it calls): the error to raise in the script
    /// instead. Refused are the commands Raftis refuses anyway, those whose answer could differ
    /// between nodes, and those that read Redis' clock (a script does not run by the log's clock,
    /// see `determinism::RUN_BY_THE_LOG_CLOCK`). See the module's `scripts`.
    pub fn refused_in_scripts(&self, argv: &[&[u8]]) -> Option<String> {
        let nondeterministic = with_lower_case(argv.first()?, |name| {
            let (known, display) = self.resolve(name?, argv)?;
            let shown = display.replace('|', " ").to_uppercase();
            let container = display.split('|').next().unwrap_or_default();
            // Redis tips XADD for its `*` id, and XTRIM for the approximate trim, which depends
            // only on the stream's nodes: the same on every node (shared `stream-node-max-*`).
            let same_everywhere = display == "xtrim" || (display == "xadd" && !crate::determinism::is_xadd_with_automatic_id(argv));
            if (known.info.nondeterministic && !same_everywhere) || ANSWERS_DIFFER_IN_SCRIPTS.contains(&container) {
                return Some(format!("ERR {shown} inside a script could answer differently on every node; Raftis refuses it in scripts"));
            }
            if crate::sort_patterns::ties_keep_stored_order(argv) {
                return Some(format!(
                    "ERR {shown} BY a pattern with ALPHA inside a script could order the elements that tie differently on every node; Raftis refuses it in scripts"
                ));
            }
            if display == "restore" {
                // Its payload is tried before a client's RESTORE enters the log; a script's
                // cannot be, and a malformed one makes Redis exit where the log is applied (see
                // the module's `restore_trial`).
                return Some(
                    "ERR RESTORE inside a script cannot have its payload checked before every node applies it; Raftis refuses it in scripts"
                        .into(),
                );
            }
            let reads_clock = display == "xreadgroup" || display == "xgroup|createconsumer";
            reads_clock.then(|| format!("ERR {shown} inside a script would read each node's clock; Raftis refuses it in scripts"))
        });
        nondeterministic.or_else(|| match self.route(argv) {
            Route::Refuse(error) => Some(error),
            _ => None,
        })
    }
}

/// Whether `XREAD`/`XREADGROUP` `argv` asks to block: a `BLOCK` among the options before
/// `STREAMS` (not a group, consumer or key that happens to be named so).
fn stream_read_blocks(argv: &[&[u8]]) -> bool {
    crate::stream_read::StreamRead::parse(argv).block.is_some()
}

fn debug_route(argv: &[&[u8]]) -> Route {
    let Some(sub) = argv.get(1) else { return Route::Local };
    match DEBUG_REFUSED.iter().find(|refused| sub.eq_ignore_ascii_case(refused.as_bytes())) {
        Some(refused) => Route::Refuse(format!(
            "ERR DEBUG {} is refused by Raftis: it would change this node's dataset, or how the node follows the log, behind the log's back",
            refused.to_uppercase()
        )),
        None => Route::Local,
    }
}

fn refused(error: &str) -> Route {
    Route::Refuse(error.to_owned())
}

/// Calls `f` with the command name in lower case (None if it is not UTF-8). Every client command
/// and every applied entry passes here: short names are lowered on the stack.
fn with_lower_case<T>(name: &[u8], f: impl FnOnce(Option<&str>) -> T) -> T {
    let mut stack = [0u8; 32];
    if name.len() <= stack.len() {
        let lower = &mut stack[..name.len()];
        lower.copy_from_slice(name);
        lower.make_ascii_lowercase();
        return f(std::str::from_utf8(lower).ok());
    }
    f(std::str::from_utf8(name).ok().map(|n| n.to_ascii_lowercase()).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CommandTable {
        let mut t = CommandTable::default();
        let span = |first, last, step| Some(KeySpan { first, last, step });
        t.insert("set", CommandInfo { arity: -3, write: true, denyoom: true, keys: span(1, 1, 1), ..Default::default() });
        t.insert("del", CommandInfo { arity: -2, write: true, keys: span(1, -1, 1), ..Default::default() });
        t.insert("mset", CommandInfo { arity: -3, write: true, keys: span(1, -1, 2), ..Default::default() });
        t.insert("zunionstore", CommandInfo { arity: -4, write: true, keys: None, ..Default::default() });
        t.insert("get", CommandInfo { arity: 2, readonly: true, ..Default::default() });
        t.insert("pfcount", CommandInfo { arity: -2, readonly: true, ..Default::default() });
        t.insert("blpop", CommandInfo { arity: -3, write: true, blocking: true, ..Default::default() });
        t.insert("xreadgroup", CommandInfo { arity: -7, write: true, blocking: true, ..Default::default() });
        t.insert("xread", CommandInfo { arity: -4, readonly: true, blocking: true, ..Default::default() });
        t.insert("xgroup", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("xgroup|createconsumer", CommandInfo { arity: 5, write: true, ..Default::default() });
        t.insert("xgroup|create", CommandInfo { arity: -5, write: true, denyoom: true, ..Default::default() });
        t.insert("xgroup|destroy", CommandInfo { arity: 4, write: true, ..Default::default() });
        t.insert("object", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("object|encoding", CommandInfo { arity: 3, readonly: true, ..Default::default() });
        t.insert("memory", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("memory|usage", CommandInfo { arity: -3, readonly: true, keys: span(2, 2, 1), ..Default::default() });
        t.insert("memory|stats", CommandInfo { arity: 2, ..Default::default() });
        t.insert("flushall", CommandInfo { arity: -1, write: true, keys: span(0, 0, 0), ..Default::default() });
        t.insert("restore", CommandInfo { arity: -4, write: true, denyoom: true, keys: span(1, 1, 1), ..Default::default() });
        // Redis' own entries for names Raftis decides about by name, flags and all.
        t.insert("MULTI", CommandInfo { arity: 1, ..Default::default() });
        t.insert("watch", CommandInfo { arity: -2, keys: span(1, -1, 1), ..Default::default() });
        t.insert("exec", CommandInfo { arity: 1, ..Default::default() });
        t.insert("eval", CommandInfo { arity: -3, keys: None, ..Default::default() });
        t.insert("script", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("script|load", CommandInfo { arity: 3, ..Default::default() });
        t.insert("script|exists", CommandInfo { arity: -3, ..Default::default() });
        t.insert("script|debug", CommandInfo { arity: 3, ..Default::default() });
        t.insert("fcall", CommandInfo { arity: -3, keys: None, ..Default::default() });
        t.insert("function", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("function|load", CommandInfo { arity: -3, write: true, ..Default::default() });
        t.insert("function|list", CommandInfo { arity: -2, ..Default::default() });
        t.insert("function|kill", CommandInfo { arity: 2, ..Default::default() });
        t.insert("time", CommandInfo { arity: 1, nondeterministic: true, ..Default::default() });
        t.insert("xadd", CommandInfo { arity: -5, write: true, nondeterministic: true, ..Default::default() });
        t.insert("xtrim", CommandInfo { arity: -4, write: true, nondeterministic: true, ..Default::default() });
        t.insert("smembers", CommandInfo { arity: 2, readonly: true, nondeterministic: true, ..Default::default() });
        t.insert("publish", CommandInfo { arity: 3, ..Default::default() });
        t.insert("lolwut", CommandInfo { arity: -1, write: true, ..Default::default() });
        t.insert("dbsize", CommandInfo { arity: 1, readonly: true, ..Default::default() });
        t.insert("pubsub", CommandInfo { arity: -2, container: true, ..Default::default() });
        t.insert("pubsub|numsub", CommandInfo { arity: -2, ..Default::default() });
        t.insert("restore-asking", CommandInfo { arity: -4, write: true, keys: span(1, 1, 1), ..Default::default() });
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
        // Whether the key exists shows in MEMORY USAGE's answer: a read like any other. The rest
        // of MEMORY is about this node.
        assert_eq!(route(&["MEMORY", "USAGE", "k"]), Route::Read);
        assert_eq!(route(&["memory", "stats"]), Route::Local);
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
    fn debug_stays_local_but_what_would_change_one_nodes_dataset_is_refused() {
        assert_eq!(route(&["DEBUG", "DIGEST"]), Route::Local);
        assert_eq!(route(&["debug", "sleep", "0"]), Route::Local);
        assert_eq!(route(&["DEBUG"]), Route::Local, "Redis answers the wrong arity itself");
        for sub in ["POPULATE", "reload", "LoadAof", "SET-ACTIVE-EXPIRE", "set-disable-deny-scripts", "set-skip-checksum-validation"] {
            let Route::Refuse(e) = route(&["DEBUG", sub, "1"]) else { panic!("DEBUG {sub} not refused") };
            assert!(e.starts_with(&format!("ERR DEBUG {} is refused by Raftis", sub.to_uppercase())), "{e}");
        }
    }

    #[test]
    fn scripts_may_not_call_commands_whose_answer_differs_between_nodes() {
        let refused = |args: &[&str]| table().refused_in_scripts(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        assert!(refused(&["TIME"]).unwrap().starts_with("ERR TIME inside a script"));
        assert!(refused(&["smembers", "s"]).unwrap().contains("SMEMBERS"));
        assert_eq!(refused(&["SET", "k", "v"]), None);
        assert_eq!(refused(&["GET", "k"]), None);
        assert_eq!(refused(&["NOSUCH"]), None, "Redis answers unknown commands itself");
        assert_eq!(refused(&["XREAD", "BLOCK", "1", "STREAMS", "s", "$"]), None, "Redis refuses BLOCK in scripts itself");
        assert!(refused(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]).unwrap().contains("each node's clock"));
        assert!(refused(&["XGROUP", "CREATECONSUMER", "s", "g", "c"]).unwrap().contains("XGROUP CREATECONSUMER inside a script"));
        assert_eq!(refused(&["XGROUP", "CREATE", "s", "g", "$"]), None);
        assert_eq!(refused(&["BLPOP", "l", "0"]), None, "Redis refuses it in scripts itself (its noscript flag)");
        // Untipped, yet what they answer depends on the node.
        assert!(refused(&["DBSIZE"]).unwrap().starts_with("ERR DBSIZE inside a script"));
        assert!(refused(&["PUBSUB", "NUMSUB", "ch"]).unwrap().starts_with("ERR PUBSUB NUMSUB inside a script"));
        assert!(refused(&["LOLWUT"]).unwrap().contains("LOLWUT"));
        assert_eq!(refused(&["PUBLISH", "ch", "m"]), None, "what scripts publish with");
        assert!(refused(&["RESTORE-ASKING", "k", "0", "x"]).unwrap().contains("use RESTORE"));
        assert!(refused(&["restore", "k", "0", "x"]).unwrap().starts_with("ERR RESTORE inside a script cannot have its payload checked"));
        // Tipped by Redis for an automatic id, and for approximate trimming, which depends only
        // on the stream's nodes.
        assert!(refused(&["XADD", "s", "MAXLEN", "~", "10", "*", "f", "v"]).unwrap().contains("XADD inside a script"));
        assert_eq!(refused(&["XADD", "s", "MAXLEN", "~", "10", "5-1", "f", "v"]), None);
        assert_eq!(refused(&["XADD", "s", "NOMKSTREAM", "5-*", "f", "v"]), None);
        assert_eq!(refused(&["XTRIM", "s", "MAXLEN", "~", "10"]), None);
    }

    #[test]
    fn flags_are_read_for_the_subcommand_too() {
        let t = table();
        let argv = |args: &[&'static str]| args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>();
        assert!(t.grows_memory(&argv(&["set", "k", "v"])));
        assert!(!t.grows_memory(&argv(&["DEL", "k"])));
        assert!(t.writes(&argv(&["DEL", "k"])));
        assert!(t.grows_memory(&argv(&["XGROUP", "create", "s", "g", "$"])));
        assert!(!t.grows_memory(&argv(&["XGROUP", "DESTROY", "s", "g"])));
        assert!(!t.writes(&argv(&["GET", "k"])));
        assert!(!t.grows_memory(&argv(&["NOSUCH"])) && !t.grows_memory(&[]));
    }

    #[test]
    fn key_positions_come_from_the_key_span_or_from_redis() {
        let at = |args: &[&str]| table().key_positions(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        assert_eq!(at(&["SET", "k", "v", "PX", "10"]), KeyPositions::At(vec![1]));
        assert_eq!(at(&["mset", "a", "1", "b", "2", "c", "3"]), KeyPositions::At(vec![1, 3, 5]));
        assert_eq!(at(&["FLUSHALL"]), KeyPositions::At(vec![]));
        assert_eq!(at(&["ZUNIONSTORE", "d", "2", "a", "b"]), KeyPositions::AskRedis, "movable keys");
        assert_eq!(at(&["OBJECT", "ENCODING", "k"]), KeyPositions::AskRedis, "a container's keys are its subcommand's");
        assert_eq!(at(&["NOSUCH", "k"]), KeyPositions::AskRedis);
        assert_eq!(at(&["SET"]), KeyPositions::At(vec![]), "a malformed command names no key past its end");
    }

    #[test]
    fn unsupported_writes_are_refused_and_malformed_ones_left_to_redis() {
        assert_eq!(route(&["SET", "k"]), Route::Local, "Redis answers a wrong arity itself (and aborts a transaction)");
        assert_eq!(route(&["multi"]), Route::BeginTransaction);
        assert_eq!(route(&["EXEC"]), Route::Local, "Redis runs the queued commands, each through the filter's route");
        assert_eq!(route(&["WATCH", "k"]), Route::Watch);
        assert_eq!(route(&["WAIT", "1", "0"]), Route::Wait);
        assert_eq!(route(&["UNWATCH"]), Route::Local);
        assert_eq!(route(&["eval", "return 1", "0"]), Route::Write, "a script runs on every node");
        assert_eq!(route(&["eval", "return 1"]), Route::Local, "a wrong arity is Redis' to answer");
        assert_eq!(route(&["SCRIPT", "LOAD", "return 1"]), Route::Write, "every node caches the script");
        assert_eq!(route(&["PFCOUNT", "h"]), Route::Write, "it rewrites the HyperLogLog's cache");
        assert_eq!(route(&["script", "exists", "abc"]), Route::Local);
        assert_eq!(route(&["FCALL", "f", "0"]), Route::Write, "a function runs on every node, whatever its flags");
        assert_eq!(route(&["FUNCTION", "LOAD", "#!lua name=l"]), Route::Write, "every node loads the library");
        assert_eq!(route(&["function", "list"]), Route::Local);
        assert_eq!(route(&["FUNCTION", "KILL"]), Route::Local, "it stops the function on the node it is sent to");
        assert!(matches!(route(&["SCRIPT", "DEBUG", "yes"]), Route::Refuse(e) if e == "ERR SCRIPT DEBUG not supported by Raftis yet"));
        assert!(matches!(route(&["MIGRATE", "h", "1", "k", "0", "5"]), Route::Refuse(e) if e.starts_with("ERR MIGRATE not supported")));
        for replication in [&["REPLICAOF", "h", "1"][..], &["slaveof", "no", "one"], &["FAILOVER"], &["SYNC"], &["PSYNC", "?", "-1"]] {
            let Route::Refuse(e) = route(replication) else { panic!("{replication:?} not refused") };
            assert!(e.starts_with("ERR Redis replication is refused by Raftis: the Raft log replicates"), "{e}");
        }
        assert_eq!(route(&["BLPOP", "l", "0"]), Route::Blocking);
        assert_eq!(route(&["blpop", "l"]), Route::Local, "a wrong arity is Redis' to answer");
        assert_eq!(route(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]), Route::Write, "it does not block");
        assert_eq!(route(&["xreadgroup", "GROUP", "block", "block", "COUNT", "block", "STREAMS", "block", ">"]), Route::Write);
        assert_eq!(route(&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"]), Route::Blocking);
        assert_eq!(route(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]), Route::BlockingRead);
        assert_eq!(route(&["XREAD", "COUNT", "2", "STREAMS", "block", "$"]), Route::Read, "a stream may be named block");
        assert_eq!(route(&["LOLWUT"]), Route::Local, "never replicated, whatever its flags say");
        assert_eq!(route(&["PUBLISH", "ch", "m"]), Route::Write, "every node's subscribers get it");
        assert!(
            matches!(route(&["waitaof", "1", "0", "0"]), Route::Refuse(e) if e.starts_with("ERR WAITAOF")),
            "a name missing from Redis' table is still refused by name"
        );
        let long_set = format!("SET{}", " ".repeat(40));
        assert_eq!(route(&[long_set.as_str(), "k", "v"]), Route::Local, "only the exact name matches");
    }
}
