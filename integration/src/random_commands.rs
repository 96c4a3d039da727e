//! Random commands drawn from Redis' own command table, for tests that hold Raftis to what plain
//! Redis answers. Arguments mix a few keys, Redis' option words, edge-case numbers and junk: most
//! commands fail on their arguments, as a careless client's would, and a good share reach the code
//! that runs them.
//!
//! What would make plain Redis and Raftis differ for reasons that are not Raftis' is kept out, so
//! that any difference left is one to look at:
//! - what Redis itself tips as nondeterministic is marked ([`Output`]) for the caller to compare
//!   loosely;
//! - `XADD *` (an ID from each server's clock) is never generated, nor `math.random` in scripts;
//! - relative TTLs are long enough that nothing expires while a test runs: the two servers' clocks
//!   agree to milliseconds, not exactly, and a key expiring between them would be noise;
//! - numbers stay below what would make a server allocate hundreds of megabytes (`SETBIT k 2^31`).
//!
//! `SPOP` is drawn: which members it pops is each server's choice ([`Output::Popped`]).
//! Blocking pops and stream reads are, with timeouts of a few milliseconds: an empty key answers
//! null after the same wait on both servers.

use crate::resp_conn::Reply;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// How far a command's reply can be compared between two servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Byte for byte.
    Exact,
    /// The same elements in an order that depends on a hash table's seed (Redis' tip
    /// `nondeterministic_output_order`: SMEMBERS, HGETALL ...).
    Unordered,
    /// Only whether it failed and how (Redis' tip `nondeterministic_output`: TTL, SRANDMEMBER ...).
    ErrorsOnly,
    /// A key's expiry time (EXPIRETIME, PEXPIRETIME): the same when there is none, otherwise close,
    /// as the servers pinned a relative TTL at slightly different moments.
    Deadline,
    /// `SPOP`: the members it pops are each server's (random) choice. The caller runs it on Raftis
    /// first and has plain Redis remove what Raftis popped ([`as_removal`]), so the two datasets
    /// stay the same.
    Popped,
}

/// One command of Redis' table that may be drawn.
#[derive(Clone, Debug)]
struct Spec {
    /// `["set"]`, or `["object", "encoding"]` for a subcommand.
    words: Vec<String>,
    /// Redis arity (of the whole command line): positive is exact, negative is a minimum.
    arity: i64,
    output: Output,
}

/// A drawn command and how its reply compares.
#[derive(Clone, Debug)]
pub struct Drawn {
    pub args: Vec<Vec<u8>>,
    pub output: Output,
}

/// Categories whose commands are never drawn: server administration and connection state, what the
/// test does itself (transactions, SELECT) and blocking commands (but see [`BLOCKING_POPS`]).
const EXCLUDED_CATEGORIES: &[&str] = &["@admin", "@connection", "@pubsub", "@scripting", "@blocking", "@transaction", "@dangerous"];
/// `@blocking` commands that are drawn all the same, with a short timeout ([`POP_TIMEOUTS`]).
const BLOCKING_POPS: &[&str] = &["blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin", "bzpopmax", "bzmpop"];
/// What a blocking pop's timeout is made: short waits, and the errors Redis gives. Never 0 (or
/// what rounds to it), which would wait for ever.
const POP_TIMEOUTS: &[&str] = &["0.01", "0.02", "0.001", "0x1p-7", "-1", "x"];
/// `@dangerous` commands that are plain data commands after all.
const DANGEROUS_BUT_DRAWN: &[&str] = &["sort", "sort_ro", "flushdb", "flushall", "swapdb"];
/// Flagged `@blocking`, but they block only with `BLOCK`, which is drawn for them with a short
/// timeout ([`STREAM_TIMEOUTS`]).
const BLOCKS_ONLY_WHEN_ASKED: &[&str] = &["xread", "xreadgroup"];
/// What a stream read's `BLOCK` is given: short waits in milliseconds, and the errors Redis gives.
/// Never 0, which would wait for ever.
const STREAM_TIMEOUTS: &[&str] = &["1", "2", "5", "-1", "x"];
/// What `XCLAIM` and `XAUTOCLAIM` want idle: nothing, or more than any delivery drawn can be (a
/// delivery time far back or ahead, by `IDLE` or `TIME`, stays on one side of each of these
/// whether measured by plain Redis or by Raftis, a few milliseconds apart).
const MIN_IDLE: &[&str] = &["0", "4294967296", "1700000000000", "4102444800000", "x"];
/// Server administration outside `@admin` (`ACL GENPASS` answers at random).
const ADMINISTRATION: &[&str] = &["acl"];
/// Redis Cluster's commands: Raftis answers `CLUSTER SLOTS`, `SHARDS`, `NODES`, `KEYSLOT` and the like as a
/// cluster of one shard, on purpose, where plain Redis has no cluster support (see
/// `tests/cluster_clients.rs`).
const CLUSTER: &[&str] = &["cluster"];
/// Not tipped, but compared like `nondeterministic_output`: MEMORY USAGE samples a hash table's
/// elements in its seed's order; DBSIZE counts a key set with a past `PXAT` until Redis'
/// background expiry deletes it, whenever that runs.
const LOOSE: &[&str] = &["memory|usage", "dbsize"];
/// Answer a key's expiry time.
const DEADLINES: &[&str] = &["expiretime", "pexpiretime"];
/// Wipe the dataset: drawn rarely, or little would be left to compare.
const WIPING: &[&str] = &["flushdb", "flushall"];

const KEYS: &[&str] = &["k0", "k1", "k2", "k3", "k4", "k5", "{t}a", "{t}b"];
const WORDS: &[&str] = &[
    "EX",
    "PX",
    "EXAT",
    "PXAT",
    "KEEPTTL",
    "NX",
    "XX",
    "GT",
    "LT",
    "CH",
    "INCR",
    "GET",
    "LIMIT",
    "WITHSCORES",
    "BY",
    "STORE",
    "ALPHA",
    "DESC",
    "ASC",
    "COUNT",
    "MATCH",
    "TYPE",
    "LEFT",
    "RIGHT",
    "BEFORE",
    "AFTER",
    "REV",
    "BYSCORE",
    "BYLEX",
    "WEIGHTS",
    "AGGREGATE",
    "SUM",
    "MIN",
    "MAX",
    "MAXLEN",
    "MINID",
    "~",
    "=",
    "$",
    ">",
    "-",
    "+",
    "0-1",
    "FIELDS",
    "IDLE",
    "RETRYCOUNT",
    "FORCE",
    "JUSTID",
    "NOMKSTREAM",
    "GROUP",
    "g",
    "c",
    "ID",
    "REPLACE",
    "ABSTTL",
    "FREQ",
    "DB",
    "1",
    "OVERFLOW",
    "WRAP",
    "SAT",
    "FAIL",
    "SET",
    "INCRBY",
    "u8",
    "i16",
    "#1",
    "BIT",
    "BYTE",
    "ENCODING",
    "FROMMEMBER",
    "FROMLONLAT",
    "BYRADIUS",
    "BYBOX",
    "km",
    "m",
    "WITHCOORD",
    "WITHDIST",
    "WITHHASH",
    "ANY",
    "STOREDIST",
    "CREATE",
    "DESTROY",
    "SETID",
    "DELCONSUMER",
    "CREATECONSUMER",
    "MKSTREAM",
    "ENTRIESREAD",
    "STREAMS",
    "NOACK",
    "RANK",
    "LEN",
    "IDX",
    "MINMATCHLEN",
    "WITHMATCHLEN",
    "PERSIST",
];
/// Edge cases for counts, offsets, scores and times. Absolute times are either long past or far
/// ahead (1.7e12 is 2023 in milliseconds and the distant future in seconds); no bit or byte offset
/// here is both valid and large.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "10",
    "100",
    "1000",
    "5000",
    "4294967296",
    "-9223372036854775808",
    "18446744073709551616",
    "1700000000000",
    "4102444800000",
];
const ODD_NUMBERS: &[&str] = &["1.5", "-inf", "+inf", "(1", "[a", "-", "+", "nan", "1e400", "0x10", ""];
/// Scripts whose effect and reply depend only on their keys, arguments and data. Redis keeps every
/// script `EVAL` ran in its cache, so `EVALSHA` finds it afterwards, until `SCRIPT FLUSH`.
const SCRIPTS: &[&str] = &[
    "return redis.call('INCR', KEYS[1])",
    "for i = 1, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end return redis.call('LLEN', KEYS[1])",
    "local v = redis.call('GET', KEYS[1]); if v then redis.call('SET', KEYS[2], v) end return v",
    "return redis.pcall('HSET', KEYS[1], 'f', ARGV[1] or 'none')",
    "redis.call('EXPIRE', KEYS[1], 100000); return redis.call('EXISTS', KEYS[1])",
    "redis.call('SET', KEYS[1], 'x', 'EX', 100000); return redis.call('STRLEN', KEYS[1])",
    "return redis.call('LPOP', KEYS[1])",
    "return redis.call('ZADD', KEYS[1], ARGV[1] or 1, 'm')",
];
/// Function libraries: two versions of `lib1` (loading the second needs `REPLACE`), and `lib3`,
/// which cannot load beside `lib1` (it registers a function of the same name).
const LIBRARIES: &[&str] = &[
    "#!lua name=lib1\nredis.register_function('f_incr', function(keys) return redis.call('INCR', keys[1]) end)\nredis.register_function('f_push', function(keys, args) return redis.call('RPUSH', keys[1], args[1] or 'x') end)",
    "#!lua name=lib1\nredis.register_function('f_incr', function(keys) return redis.call('INCRBY', keys[1], 2) end)",
    "#!lua name=lib2\nredis.register_function{function_name='f_get', callback=function(keys) return redis.call('GET', keys[1]) end, flags={'no-writes'}}\nredis.register_function('f_hset', function(keys, args) return redis.call('HSET', keys[1], 'f', args[1] or 'v') end)",
    "#!lua name=lib3\nredis.register_function('f_incr', function() return 0 end)",
];
const LIBRARY_NAMES: &[&str] = &["lib1", "lib2", "lib3", "nolib"];
const FUNCTIONS: &[&str] = &["f_incr", "f_push", "f_get", "f_hset", "f_none"];
/// A relative TTL shorter than this (seconds or milliseconds) is stretched to it.
const LONG_TTL: i64 = 100_000;

pub struct RandomCommands {
    rng: StdRng,
    specs: Vec<Spec>,
    /// The SHA1 of each of [`SCRIPTS`], once the caller has learnt them (see [`Self::know_shas`]).
    shas: Vec<Vec<u8>>,
    /// The last stream ID [`Self::consumer_group`] drew.
    stream_ids: u64,
}

impl RandomCommands {
    /// From the reply to `COMMAND` of a plain Redis, with a seed (the same seed draws the same
    /// commands).
    pub fn new(command_table: &Reply, seed: u64) -> RandomCommands {
        let Some(entries) = command_table.items() else { panic!("COMMAND answered {command_table:?}") };
        let mut specs = Vec::new();
        for entry in entries {
            let subcommands = match field(entry, 9).and_then(Reply::items) {
                Some(subs) if !subs.is_empty() => subs.to_vec(),
                _ => vec![entry.clone()],
            };
            for sub in &subcommands {
                if let Some(spec) = spec_of(sub) {
                    specs.push(spec);
                }
            }
        }
        specs.sort_by(|a, b| a.words.cmp(&b.words));
        RandomCommands { rng: StdRng::seed_from_u64(seed), specs, shas: Vec::new(), stream_ids: 0 }
    }

    /// The scripts this draws from, for the caller to learn their SHA1s (from `SCRIPT LOAD`).
    pub fn scripts() -> &'static [&'static str] {
        SCRIPTS
    }

    /// The SHA1 of each of [`Self::scripts`], in order: from now on scripts are also loaded with
    /// `SCRIPT LOAD`, run with `EVALSHA` (`-NOSCRIPT` when the script cache does not hold them)
    /// and flushed with `SCRIPT FLUSH`.
    pub fn know_shas(&mut self, shas: Vec<Vec<u8>>) {
        assert_eq!(shas.len(), SCRIPTS.len());
        self.shas = shas;
    }

    /// The generator's randomness, for the caller's own choices (so one seed replays a whole run).
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// A command; now and then a script, a function or a consumer group's command.
    pub fn draw(&mut self) -> Drawn {
        if self.rng.gen_bool(0.03) {
            return self.script();
        }
        if self.rng.gen_bool(0.03) {
            return self.consumer_group();
        }
        if self.rng.gen_bool(0.02) {
            return self.set_pop();
        }
        let spec = loop {
            let spec = self.specs.choose(&mut self.rng).unwrap().clone();
            if !WIPING.contains(&spec.words[0].as_str()) || self.rng.gen_bool(0.1) {
                break spec;
            }
        };
        let mut args: Vec<Vec<u8>> = spec.words.iter().map(|w| w.clone().into_bytes()).collect();
        let needed = spec.arity.unsigned_abs() as usize - args.len().min(spec.arity.unsigned_abs() as usize);
        let mut extra = if spec.arity > 0 { needed } else { needed + [0, 0, 1, 2, 3, 5].choose(&mut self.rng).unwrap() };
        // Sometimes the wrong number of arguments, for the error.
        if self.rng.gen_bool(0.05) {
            extra = if self.rng.gen() { extra + 1 } else { extra.saturating_sub(1) };
        }
        for _ in 0..extra {
            let a = self.argument();
            args.push(a);
        }
        stretch_ttls(&mut args);
        let mut drawn = Drawn { args, output: spec.output };
        match spec.words[0].as_str() {
            "xread" | "xreadgroup" => {
                if self.rng.gen_bool(0.3) {
                    drawn.args.splice(1..1, [b"BLOCK".to_vec(), b"0".to_vec()]);
                }
                for i in 1..drawn.args.len().saturating_sub(1) {
                    if drawn.args[i].eq_ignore_ascii_case(b"block") {
                        drawn.args[i + 1] = STREAM_TIMEOUTS.choose(&mut self.rng).unwrap().as_bytes().to_vec();
                    }
                }
            }
            "xclaim" | "xautoclaim" if drawn.args.len() > 4 => drawn.args[4] = MIN_IDLE.choose(&mut self.rng).unwrap().as_bytes().to_vec(),
            _ => {}
        }
        if BLOCKING_POPS.iter().any(|n| drawn.args[0].eq_ignore_ascii_case(n.as_bytes())) {
            // BLPOP key [key ...] timeout; BLMPOP timeout numkeys key ...
            let at = if drawn.args[0].ends_with(b"mpop") { 1 } else { drawn.args.len() - 1 };
            if at > 0 && at < drawn.args.len() {
                drawn.args[at] = POP_TIMEOUTS.choose(&mut self.rng).unwrap().as_bytes().to_vec();
            }
        }
        drawn
    }

    fn script(&mut self) -> Drawn {
        if self.rng.gen_bool(0.4) {
            return self.function();
        }
        let which = self.rng.gen_range(0..SCRIPTS.len());
        let body = SCRIPTS[which].as_bytes().to_vec();
        if !self.shas.is_empty() {
            let r: f64 = self.rng.gen();
            if r < 0.15 {
                return Drawn { args: vec![b"SCRIPT".to_vec(), b"LOAD".to_vec(), body], output: Output::Exact };
            }
            if r < 0.2 {
                return Drawn { args: vec![b"SCRIPT".to_vec(), b"FLUSH".to_vec()], output: Output::Exact };
            }
        }
        let by_sha = !self.shas.is_empty() && self.rng.gen_bool(0.5);
        let (name, script) = if by_sha { (b"EVALSHA".to_vec(), self.shas[which].clone()) } else { (b"EVAL".to_vec(), body) };
        let nkeys = self.rng.gen_range(1..=2);
        let mut args = vec![name, script, nkeys.to_string().into_bytes()];
        for _ in 0..nkeys {
            args.push(KEYS.choose(&mut self.rng).unwrap().as_bytes().to_vec());
        }
        for _ in 0..self.rng.gen_range(0..3) {
            let a = self.argument();
            args.push(a);
        }
        Drawn { args, output: Output::Exact }
    }

    /// A well-formed consumer group command on a stream key (random arguments seldom make one):
    /// groups are created, read through, acknowledged and claimed from, and streams read with a
    /// short `BLOCK`.
    fn consumer_group(&mut self) -> Drawn {
        // Keys of their own, which other commands leave streams.
        let key = *["s1", "s2"].choose(&mut self.rng).unwrap();
        let consumer = *["c1", "c2", "c3"].choose(&mut self.rng).unwrap();
        let min_idle = *MIN_IDLE[..4].choose(&mut self.rng).unwrap();
        let count = self.rng.gen_range(1..4).to_string();
        self.stream_ids += 1;
        let id = format!("{}-1", self.stream_ids);
        let previous = format!("{}-1", self.stream_ids.saturating_sub(3));
        let args: Vec<&str> = match self.rng.gen_range(0..11) {
            0 => vec!["XGROUP", "CREATE", key, "g", *["$", "0"].choose(&mut self.rng).unwrap(), "MKSTREAM"],
            // Explicit IDs: an automatic one is each server's clock.
            1 | 2 => vec!["XADD", key, &id, "f", consumer],
            3 => vec!["XREADGROUP", "GROUP", "g", consumer, "COUNT", &count, "STREAMS", key, ">"],
            4 => vec!["XREADGROUP", "GROUP", "g", consumer, "BLOCK", *["1", "2"].choose(&mut self.rng).unwrap(), "STREAMS", key, ">"],
            5 => vec!["XREADGROUP", "GROUP", "g", consumer, "NOACK", "STREAMS", key, *[">", "0"].choose(&mut self.rng).unwrap()],
            6 => vec!["XAUTOCLAIM", key, "g", consumer, min_idle, "0", "COUNT", &count],
            7 => vec!["XAUTOCLAIM", key, "g", consumer, min_idle, "0", "JUSTID"],
            8 => vec!["XPENDING", key, "g"],
            9 => vec!["XGROUP", "CREATECONSUMER", key, "g", consumer],
            _ => vec![
                "XREAD",
                "BLOCK",
                *["1", "2"].choose(&mut self.rng).unwrap(),
                "STREAMS",
                key,
                *["$", "0", &previous].choose(&mut self.rng).unwrap(),
            ],
        };
        Drawn { args: args.iter().map(|a| a.as_bytes().to_vec()).collect(), output: Output::Exact }
    }

    /// Sets filled and popped: a random command seldom finds a set to pop from.
    fn set_pop(&mut self) -> Drawn {
        // Keys of their own, which other commands leave sets.
        let key = *["p1", "p2"].choose(&mut self.rng).unwrap();
        let count = self.rng.gen_range(0..6).to_string();
        let (args, output) = match self.rng.gen_range(0..6) {
            0 | 1 => {
                let n = self.rng.gen_range(1..9);
                let members: Vec<String> = (0..n).map(|_| format!("m{}", self.rng.gen_range(0..20))).collect();
                (["SADD", key].into_iter().map(String::from).chain(members).collect(), Output::Exact)
            }
            2 => (vec!["SPOP".to_string(), key.to_string()], Output::Popped),
            3 | 4 => (vec!["SPOP".to_string(), key.to_string(), count], Output::Popped),
            _ => (vec!["SMEMBERS".to_string(), key.to_string()], Output::Unordered),
        };
        Drawn { args: args.into_iter().map(String::into_bytes).collect(), output }
    }

    /// A function call, or now and then a change to the libraries.
    fn function(&mut self) -> Drawn {
        let r: f64 = self.rng.gen();
        let words = |w: &[&str]| Drawn { args: w.iter().map(|a| a.as_bytes().to_vec()).collect(), output: Output::Exact };
        let pick = |list: &[&'static str], rng: &mut StdRng| *list.choose(rng).unwrap();
        if r < 0.15 {
            let library = pick(LIBRARIES, &mut self.rng);
            return if self.rng.gen() { words(&["FUNCTION", "LOAD", "REPLACE", library]) } else { words(&["FUNCTION", "LOAD", library]) };
        }
        if r < 0.2 {
            return words(&["FUNCTION", "DELETE", pick(LIBRARY_NAMES, &mut self.rng)]);
        }
        if r < 0.22 {
            return words(&["FUNCTION", "FLUSH"]);
        }
        let name = if self.rng.gen_bool(0.2) { "FCALL_RO" } else { "FCALL" };
        let mut args = vec![name.as_bytes().to_vec(), pick(FUNCTIONS, &mut self.rng).as_bytes().to_vec(), b"1".to_vec()];
        args.push(pick(KEYS, &mut self.rng).as_bytes().to_vec());
        for _ in 0..self.rng.gen_range(0..2) {
            let a = self.argument();
            args.push(a);
        }
        Drawn { args, output: Output::Exact }
    }

    fn argument(&mut self) -> Vec<u8> {
        let r: f64 = self.rng.gen();
        let word = |list: &[&str], rng: &mut StdRng| list.choose(rng).unwrap().as_bytes().to_vec();
        if r < 0.35 {
            word(KEYS, &mut self.rng)
        } else if r < 0.6 {
            word(WORDS, &mut self.rng)
        } else if r < 0.8 {
            word(NUMBERS, &mut self.rng)
        } else if r < 0.88 {
            word(ODD_NUMBERS, &mut self.rng)
        } else if r < 0.95 {
            format!("v{}", self.rng.gen_range(0..100)).into_bytes()
        } else {
            let len = self.rng.gen_range(1..8);
            (0..len).map(|_| self.rng.gen()).collect()
        }
    }
}

/// The `i`-th element of a COMMAND entry.
fn field(entry: &Reply, i: usize) -> Option<&Reply> {
    entry.items()?.get(i)
}

/// The strings in a list of a COMMAND entry (flags, categories, tips).
fn texts(list: Option<&Reply>) -> Vec<String> {
    list.and_then(Reply::items).map_or_else(Vec::new, |items| items.iter().filter_map(Reply::text).collect())
}

/// A drawable command from its COMMAND entry, or None if it is never drawn.
fn spec_of(entry: &Reply) -> Option<Spec> {
    let name = texts(Some(entry)).into_iter().next()?.to_ascii_lowercase();
    let arity = field(entry, 1)?.integer()?;
    let words: Vec<String> = name.split('|').map(str::to_string).collect();
    let categories = texts(field(entry, 6));
    let dangerous_but_drawn = DANGEROUS_BUT_DRAWN.contains(&name.as_str());
    let excluded = |c: &String| {
        EXCLUDED_CATEGORIES.contains(&c.as_str())
            && !(c == "@dangerous" && dangerous_but_drawn)
            && !(c == "@blocking" && (BLOCKING_POPS.contains(&name.as_str()) || BLOCKS_ONLY_WHEN_ASKED.contains(&name.as_str())))
    };
    if categories.iter().any(excluded) || ADMINISTRATION.contains(&words[0].as_str()) || CLUSTER.contains(&words[0].as_str()) {
        return None;
    }
    let tips = texts(field(entry, 7));
    let output = if name == "spop" {
        Output::Popped
    } else if DEADLINES.contains(&name.as_str()) {
        Output::Deadline
    } else if tips.iter().any(|t| t == "nondeterministic_output") || LOOSE.contains(&name.as_str()) {
        Output::ErrorsOnly
    } else if tips.iter().any(|t| t == "nondeterministic_output_order") {
        Output::Unordered
    } else {
        Output::Exact
    };
    Some(Spec { words, arity, output })
}

/// Makes every relative TTL in `args` at least [`LONG_TTL`] (see the module's comment).
fn stretch_ttls(args: &mut [Vec<u8>]) {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
    let ttl_positions: Vec<usize> = match name.as_str() {
        "expire" | "pexpire" | "setex" | "psetex" => vec![2],
        "set" | "getex" => (2..args.len().saturating_sub(1))
            .filter(|i| args[*i].eq_ignore_ascii_case(b"ex") || args[*i].eq_ignore_ascii_case(b"px"))
            .map(|i| i + 1)
            .collect(),
        _ => Vec::new(),
    };
    let argc = args.len();
    for i in ttl_positions.into_iter().filter(|i| *i < argc) {
        let short = std::str::from_utf8(&args[i]).ok().and_then(|s| s.parse::<i64>().ok()).is_some_and(|t| (1..LONG_TTL).contains(&t));
        if short {
            args[i] = LONG_TTL.to_string().into_bytes();
        }
    }
}

/// What plain Redis runs in place of the `SPOP` `args` that Raftis answered `popped`: the removal of
/// the members Raftis popped (`SREM`, which answers how many it removed), so that both datasets
/// lose the same members; None when Raftis popped nothing (an error, a missing key, a count of
/// zero), which plain Redis must answer the same.
pub fn as_removal(args: &[Vec<u8>], popped: &Reply) -> Option<(Vec<Vec<u8>>, usize)> {
    let members: Vec<Vec<u8>> = match popped {
        Reply::Blob(b'$', member) => vec![member.clone()],
        Reply::Aggregate(_, items) if !items.is_empty() => items.iter().map(|i| i.bytes().map(<[u8]>::to_vec)).collect::<Option<_>>()?,
        _ => return None,
    };
    let n = members.len();
    Some(([b"SREM".to_vec(), args.get(1)?.clone()].into_iter().chain(members).collect(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn short_relative_ttls_are_stretched_and_absolute_ones_kept() {
        let mut a = args(&["SET", "k", "v", "EX", "10", "PXAT", "10"]);
        stretch_ttls(&mut a);
        assert_eq!(a, args(&["SET", "k", "v", "EX", "100000", "PXAT", "10"]));
        let mut a = args(&["pexpire", "k", "0"]);
        stretch_ttls(&mut a);
        assert_eq!(a, args(&["pexpire", "k", "0"]), "zero deletes at once on both servers");
        let mut a = args(&["SETEX", "k", "3", "v"]);
        stretch_ttls(&mut a);
        assert_eq!(a, args(&["SETEX", "k", "100000", "v"]));
    }
}
