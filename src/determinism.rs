//! Every node executes each replicated write itself, so a write must mean the same thing on every
//! node at whatever moment it applies it. The leader rewrites time-relative arguments into
//! absolute ones before proposing (`EXPIRE k 10` becomes `PEXPIREAT k <now+10s>`). A write whose
//! effect Redis chooses at random (`SPOP`) gets its outcome drawn by the leader instead, and settled
//! alike on every node (see `set_pop`).
//!
//! A rewrite is only made where the original would succeed; malformed arguments are left alone so
//! that every node answers with the same error Redis would have given.

use std::borrow::Cow;

/// A command's arguments: borrowed from the client's command, owned where a rewrite replaced one.
pub type Args<'a> = Vec<Cow<'a, [u8]>>;

/// Writes that read Redis' own clock as they run, and so run with it pinned to their entry's time
/// on every node (the module's `clock`): `XREADGROUP` stamps the messages it delivers,
/// `XCLAIM` and `XAUTOCLAIM` compare those stamps with the time, and each of them (and
/// `XGROUP CREATECONSUMER`) stamps the consumer's last-seen time.
pub const RUN_BY_THE_LOG_CLOCK: &[&str] = &["xreadgroup", "xclaim", "xautoclaim", "xgroup"];

/// Whether a command named `name` must run by the log's clock (see [`RUN_BY_THE_LOG_CLOCK`]).
pub fn runs_by_the_log_clock(name: &[u8]) -> bool {
    RUN_BY_THE_LOG_CLOCK.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// Rewrites `argv` in place for the leader's clock `now_ms` (milliseconds since the Unix epoch).
pub fn pin(argv: &mut Args, now_ms: i64) {
    let Some(name) = argv.first().map(|n| n.to_ascii_lowercase()) else { return };
    match name.as_slice() {
        b"set" => pin_set_options(argv, 3, now_ms),
        b"getex" => pin_set_options(argv, 2, now_ms),
        b"setex" | b"psetex" if argv.len() == 4 => {
            let unit = if name == b"setex" { 1000 } else { 1 };
            if let Some(at) = deadline(&argv[2], unit, now_ms) {
                let (key, value) = (argv[1].clone(), argv[3].clone());
                *argv = vec![Cow::Borrowed(b"SET"), key, value, Cow::Borrowed(b"PXAT"), owned(at)];
            }
        }
        b"expire" | b"pexpire" if argv.len() >= 3 => {
            let unit = if name == b"expire" { 1000 } else { 1 };
            // EXPIRE accepts zero and negative times (the key is deleted); so does PEXPIREAT.
            if let Some(at) = offset(&argv[2], unit, now_ms) {
                argv[0] = Cow::Borrowed(b"PEXPIREAT");
                argv[2] = owned(at.max(0));
            } else if overflows(&argv[2], unit, now_ms) {
                // Past `LLONG_MAX` once added to any clock after 1970: refused on every node.
                argv[2] = owned(i64::MAX);
            }
        }
        b"expireat" | b"pexpireat" if argv.len() >= 3 => {
            // Redis deletes the key for any deadline already past, negative ones included. While
            // the log applies, Redis does not (see the module's `expiry`), and a deadline of -1 left
            // on a key reads as none at all: the key would live on. Every past deadline does the
            // same as 0, which is past too (the NX/XX/GT/LT conditions compare it alike).
            let unit = if name == b"expireat" { 1000 } else { 1 };
            if parse_i64(&argv[2]).is_some_and(|t| t < 0 && t.checked_mul(unit).is_some()) {
                argv[2] = owned(0);
            }
        }
        b"restore" if argv.len() >= 4 => {
            let absolute = argv[4..].iter().any(|a| a.eq_ignore_ascii_case(b"absttl"));
            if !absolute {
                if let Some(at) = deadline(&argv[2], 1, now_ms) {
                    argv[2] = owned(at);
                    argv.push(Cow::Borrowed(b"ABSTTL"));
                }
            }
        }
        _ => {}
    }
}

/// SET/GETEX: `EX s` and `PX ms` become `PXAT now+ttl`. Left alone with more than one time
/// option, which Redis refuses (`SET k v EX 10 PX 5`): pinned, they would be two `PXAT`s, which
/// it accepts.
fn pin_set_options(argv: &mut Args, first_option: usize, now_ms: i64) {
    const TIMES: &[&[u8]] = &[b"ex", b"px", b"exat", b"pxat", b"keepttl", b"persist"];
    let is = |arg: &[u8], names: &[&[u8]]| names.iter().any(|n| arg.eq_ignore_ascii_case(n));
    let (mut i, mut times) = (first_option, 0);
    while i < argv.len() {
        if is(&argv[i], TIMES) {
            times += 1;
        }
        // As Redis reads them: these four take the next argument as their value.
        i += if is(&argv[i], &TIMES[..4]) { 2 } else { 1 };
    }
    if times > 1 {
        return;
    }
    let mut i = first_option;
    while i + 1 < argv.len() {
        let unit = if argv[i].eq_ignore_ascii_case(b"ex") {
            Some(1000)
        } else if argv[i].eq_ignore_ascii_case(b"px") {
            Some(1)
        } else {
            None
        };
        if let Some(unit) = unit {
            if let Some(at) = deadline(&argv[i + 1], unit, now_ms) {
                argv[i] = Cow::Borrowed(b"PXAT");
                argv[i + 1] = owned(at);
            } else if overflows(&argv[i + 1], unit, now_ms) {
                // Refused on every node alike (`EX` past `LLONG_MAX / 1000`), not by each one's clock.
                argv[i] = Cow::Borrowed(b"EX");
                argv[i + 1] = owned(i64::MAX);
            }
            i += 2;
        } else {
            i += 1;
        }
    }
}

/// XADD with an automatic id (`*`) takes its milliseconds from the leader's clock: the fallback
/// where Redis' clock cannot be pinned for the command as it applies (the module's `clock`),
/// which gives what Redis gives. Pinned so, an XADD after a stream's top has gone past the
/// leader's clock (an explicit ID ahead of it, a new leader whose clock is behind) fails
/// where Redis' `*` would take the next ID.
pub fn pin_automatic_stream_id(argv: &mut Args, now_ms: i64) {
    if let Some(i) = xadd_id_at(argv).filter(|&i| *argv[i] == *b"*") {
        argv[i] = Cow::Owned(format!("{now_ms}-*").into_bytes());
    }
}

/// Whether `argv` is an `XADD` with an automatic id (`*`), which reads Redis' clock.
pub fn is_xadd_with_automatic_id<A: AsRef<[u8]>>(argv: &[A]) -> bool {
    xadd_id_at(argv).is_some_and(|i| argv[i].as_ref() == b"*")
}

/// Where the id of `XADD` `argv` is, past its options.
fn xadd_id_at<A: AsRef<[u8]>>(argv: &[A]) -> Option<usize> {
    if !argv.first().is_some_and(|name| name.as_ref().eq_ignore_ascii_case(b"xadd")) {
        return None;
    }
    let mut i = 2;
    while i < argv.len() {
        let a = argv[i].as_ref();
        if a.eq_ignore_ascii_case(b"nomkstream") {
            i += 1;
        } else if a.eq_ignore_ascii_case(b"maxlen") || a.eq_ignore_ascii_case(b"minid") {
            i += 1;
            if argv.get(i).is_some_and(|t| t.as_ref() == b"=" || t.as_ref() == b"~") {
                i += 1;
            }
            i += 1; // threshold
        } else if a.eq_ignore_ascii_case(b"limit") {
            i += 2;
        } else {
            return Some(i);
        }
    }
    None
}

fn owned(n: i64) -> Cow<'static, [u8]> {
    Cow::Owned(n.to_string().into_bytes())
}

/// An integer as Redis reads one (`string2ll`): an optional '-', no '+', no leading zero, no
/// space, and no "-0". Anything else is left unchanged, for Redis to refuse.
fn parse_i64(arg: &[u8]) -> Option<i64> {
    let canonical = match arg.strip_prefix(b"-").unwrap_or(arg) {
        [b'0'] => arg.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    std::str::from_utf8(arg).ok().filter(|_| canonical)?.parse().ok()
}

/// A strictly positive relative time turned into an absolute one; None where Redis would refuse.
fn deadline(arg: &[u8], unit_ms: i64, now_ms: i64) -> Option<i64> {
    let v = parse_i64(arg)?;
    (v > 0).then(|| v.checked_mul(unit_ms)?.checked_add(now_ms)).flatten()
}

/// A positive relative time that overflows once made absolute: Redis refuses it by its own
/// clock, so a node whose clock is behind the leader's could take it. See [`pin`].
fn overflows(arg: &[u8], unit_ms: i64, now_ms: i64) -> bool {
    parse_i64(arg).is_some_and(|v| v > 0 && v.checked_mul(unit_ms).and_then(|ms| ms.checked_add(now_ms)).is_none())
}

/// Any relative time (zero and negative included) as an absolute one.
fn offset(arg: &[u8], unit_ms: i64, now_ms: i64) -> Option<i64> {
    parse_i64(arg)?.checked_mul(unit_ms)?.checked_add(now_ms)
}

/// The key a command writes in another database than the selected one, with that database:
/// `MOVE key db`'s key there, `COPY source destination DB db`'s destination. Redis does not count
/// them among the command's keys, yet whether they exist decides what the command does. None
/// where Redis refuses the command's arguments.
pub fn key_in_another_database<'a>(argv: &[&'a [u8]]) -> Option<(u32, &'a [u8])> {
    let name = argv.first()?;
    if name.eq_ignore_ascii_case(b"move") && argv.len() == 3 {
        return Some((u32::try_from(db_index(argv[2])?).ok()?, argv[1]));
    }
    if name.eq_ignore_ascii_case(b"copy") && argv.len() >= 3 {
        let (dbs, complete) = copy_databases(argv);
        // The last `DB` option is the one Redis copies to.
        return Some((u32::try_from(*dbs.last().filter(|_| complete)?).ok()?, argv[2]));
    }
    None
}

/// The database numbers a command names besides the selected one, as Redis reads them, up to
/// the first argument it refuses for another reason: `MOVE`'s, each `DB` option of `COPY`,
/// `SWAPDB`'s two. Whether each is below `databases` decides whether the command runs, so the
/// leader refuses one that is not before it enters the log: replayed after a restart that
/// raised `databases`, the entry would have run where it failed on every node before.
pub fn database_indexes<A: AsRef<[u8]>>(argv: &[A]) -> Vec<i64> {
    let Some(name) = argv.first().map(AsRef::as_ref) else { return Vec::new() };
    if name.eq_ignore_ascii_case(b"move") && argv.len() == 3 {
        return db_index(argv[2].as_ref()).into_iter().collect();
    }
    if name.eq_ignore_ascii_case(b"swapdb") && argv.len() == 3 {
        // Both are read as numbers before either is looked up.
        return match (db_index(argv[1].as_ref()), db_index(argv[2].as_ref())) {
            (Some(a), Some(b)) => vec![a, b],
            _ => Vec::new(),
        };
    }
    if name.eq_ignore_ascii_case(b"copy") && argv.len() >= 3 {
        return copy_databases(argv).0;
    }
    Vec::new()
}

/// A database number as Redis' `getIntFromObjectOrReply` reads it: an exact decimal within C's
/// `int` (negative ones included: Redis finds them out of range on every node alike).
fn db_index(arg: &[u8]) -> Option<i64> {
    parse_i64(arg).filter(|n| i32::try_from(*n).is_ok())
}

/// `COPY`'s options read as `copyCommand` reads them, one after the other: the databases its
/// `DB` options name, up to the first option Redis refuses, and whether it read them all. A
/// negative database ends the reading, as Redis refuses it there.
fn copy_databases<A: AsRef<[u8]>>(argv: &[A]) -> (Vec<i64>, bool) {
    let mut dbs = Vec::new();
    let mut j = 3;
    while j < argv.len() {
        if argv[j].as_ref().eq_ignore_ascii_case(b"replace") {
            j += 1;
        } else if argv[j].as_ref().eq_ignore_ascii_case(b"db") && j + 1 < argv.len() {
            let Some(db) = db_index(argv[j + 1].as_ref()) else { return (dbs, false) };
            dbs.push(db);
            if db < 0 {
                return (dbs, false);
            }
            j += 2;
        } else {
            return (dbs, false);
        }
    }
    (dbs, true)
}

/// The database `SELECT` `argv` switches to, as Redis reads it: a plain decimal (no sign, no
/// leading zero) below `databases`. None when Redis refuses it and the database stays: a script
/// that tracked it anyway would expire keys in the wrong database, or in none.
pub fn selected_db(argv: &[&[u8]], databases: u32) -> Option<u32> {
    let [_, db] = argv else { return None };
    let plain = !db.is_empty() && db.iter().all(u8::is_ascii_digit) && (db.len() == 1 || db[0] != b'0');
    let db: u32 = std::str::from_utf8(db).ok()?.parse().ok().filter(|_| plain)?;
    (db < databases).then_some(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_as_redis_reads_them() {
        for (arg, expected) in [("0", Some(0)), ("10", Some(10)), ("-5", Some(-5)), ("9223372036854775807", Some(i64::MAX))] {
            assert_eq!(parse_i64(arg.as_bytes()), expected, "{arg}");
        }
        for arg in ["+10", "010", "-0", "-05", " 1", "1 ", "", "-", "1e3", "9223372036854775808", "00"] {
            assert_eq!(parse_i64(arg.as_bytes()), None, "{arg}");
        }
    }

    #[test]
    fn move_and_copy_name_a_key_in_another_database() {
        let other = |args: &[&str]| {
            let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            key_in_another_database(&argv).map(|(db, key)| (db, String::from_utf8_lossy(key).into_owned()))
        };
        assert_eq!(other(&["MOVE", "k", "3"]), Some((3, "k".into())));
        assert_eq!(other(&["copy", "src", "dst", "db", "2", "REPLACE"]), Some((2, "dst".into())));
        assert_eq!(other(&["COPY", "src", "dst", "REPLACE", "DB", "4"]), Some((4, "dst".into())));
        assert_eq!(other(&["COPY", "src", "dst"]), None, "the selected database: Redis names both keys");
        assert_eq!(other(&["MOVE", "k", "x"]), None, "Redis refuses it");
        assert_eq!(other(&["MOVE", "k", "+1"]), None, "not a number to Redis");
        assert_eq!(other(&["MOVE", "k", "01"]), None, "not a number to Redis");
        assert_eq!(other(&["COPY", "src", "dst", "DB", "1", "DB", "2"]), Some((2, "dst".into())), "the last one counts");
        assert_eq!(other(&["COPY", "src", "dst", "DB", "1", "NOPE"]), None, "a syntax error");
        assert_eq!(other(&["COPY", "src", "dst", "DB"]), None, "a syntax error");
        assert_eq!(other(&["SET", "k", "3"]), None);
    }

    #[test]
    fn the_databases_a_command_names_are_read_as_redis_reads_them() {
        let named = |args: &[&str]| database_indexes(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        assert_eq!(named(&["MOVE", "k", "20"]), [20]);
        assert_eq!(named(&["move", "k", "-1"]), [-1]);
        assert_eq!(named(&["MOVE", "k", "99999999999"]), [0i64; 0], "not an int: another error");
        assert_eq!(named(&["SWAPDB", "1", "30"]), [1, 30]);
        assert_eq!(named(&["SWAPDB", "x", "30"]), [0i64; 0], "the first is not a number: another error");
        assert_eq!(named(&["COPY", "a", "b", "REPLACE", "DB", "3", "DB", "40"]), [3, 40]);
        assert_eq!(named(&["COPY", "a", "b", "BAD", "DB", "40"]), [0i64; 0], "a syntax error comes first");
        assert_eq!(named(&["COPY", "a", "b", "DB", "40", "BAD"]), [40], "the range comes first");
        assert_eq!(named(&["COPY", "a", "b", "DB", "-2", "DB", "40"]), [-2], "refused at the first");
        assert_eq!(named(&["GET", "20"]), [0i64; 0]);
    }

    #[test]
    fn a_select_counts_only_as_redis_reads_it() {
        let select = |args: &[&str]| selected_db(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>(), 16);
        assert_eq!(select(&["SELECT", "0"]), Some(0));
        assert_eq!(select(&["select", "15"]), Some(15));
        for refused in [&["SELECT", "16"][..], &["SELECT", "99"], &["SELECT", "01"], &["SELECT", "+1"], &["SELECT", "-1"]] {
            assert_eq!(select(refused), None, "{refused:?}");
        }
        assert_eq!(select(&["SELECT", "1", "2"]), None, "wrong arity");
        assert_eq!(select(&["SELECT", ""]), None);
        assert_eq!(select(&["SELECT", "99999999999"]), None);
    }

    fn run(args: &[&str]) -> Vec<String> {
        let mut argv: Args = args.iter().map(|a| Cow::Borrowed(a.as_bytes())).collect();
        pin(&mut argv, 1_000_000);
        argv.into_iter().map(|a| String::from_utf8(a.into_owned()).unwrap()).collect()
    }

    #[test]
    fn times_that_overflow_are_refused_on_every_node() {
        let max = i64::MAX.to_string();
        // Past LLONG_MAX once the leader's clock (1,000,000 here) is added: some node's clock
        // behind the leader's would take it.
        let near = (i64::MAX - 999_999).to_string();
        assert_eq!(run(&["PEXPIRE", "k", &near]), ["PEXPIRE", "k", &max]);
        assert_eq!(run(&["EXPIRE", "k", &(i64::MAX / 1000 + 1).to_string()]), ["EXPIRE", "k", &max]);
        assert_eq!(run(&["SET", "k", "v", "PX", &near, "NX"]), ["SET", "k", "v", "EX", &max, "NX"]);
        assert_eq!(run(&["GETEX", "k", "EX", &(i64::MAX / 1000).to_string()]), ["GETEX", "k", "EX", &max]);
        // Negative ones Redis takes or refuses alike everywhere.
        assert_eq!(run(&["EXPIRE", "k", &(i64::MIN / 1000 - 1).to_string()]), ["EXPIRE", "k", &(i64::MIN / 1000 - 1).to_string()]);
    }

    #[test]
    fn relative_expirations_become_absolute() {
        assert_eq!(run(&["SET", "k", "v", "EX", "10"]), ["SET", "k", "v", "PXAT", "1010000"]);
        assert_eq!(run(&["set", "k", "v", "NX", "px", "5"]), ["set", "k", "v", "NX", "PXAT", "1000005"]);
        assert_eq!(run(&["SETEX", "k", "2", "v"]), ["SET", "k", "v", "PXAT", "1002000"]);
        assert_eq!(run(&["PSETEX", "k", "2", "v"]), ["SET", "k", "v", "PXAT", "1000002"]);
        assert_eq!(run(&["EXPIRE", "k", "3", "NX"]), ["PEXPIREAT", "k", "1003000", "NX"]);
        assert_eq!(run(&["PEXPIRE", "k", "-1"]), ["PEXPIREAT", "k", "999999"]);
        assert_eq!(run(&["GETEX", "k", "EX", "1"]), ["GETEX", "k", "PXAT", "1001000"]);
        assert_eq!(run(&["RESTORE", "k", "50", "payload"]), ["RESTORE", "k", "1000050", "payload", "ABSTTL"]);
        assert_eq!(run(&["RESTORE", "k", "0", "payload"]), ["RESTORE", "k", "0", "payload"]);
    }

    #[test]
    fn arguments_redis_would_reject_are_left_for_redis_to_reject() {
        assert_eq!(run(&["SET", "k", "v", "EX", "0"]), ["SET", "k", "v", "EX", "0"]);
        assert_eq!(run(&["SET", "k", "v", "EX", "ten"]), ["SET", "k", "v", "EX", "ten"]);
        assert_eq!(run(&["SETEX", "k", "-5", "v"]), ["SETEX", "k", "-5", "v"]);
        let huge = i64::MAX.to_string();
        assert_eq!(run(&["EXPIRE", "k", &huge]), ["EXPIRE", "k", huge.as_str()]);
    }

    #[test]
    fn deadlines_before_the_epoch_become_zero() {
        // -1 left on a key would read as "no deadline" while Redis deletes the key at once.
        assert_eq!(run(&["PEXPIREAT", "k", "-1"]), ["PEXPIREAT", "k", "0"]);
        assert_eq!(run(&["expireat", "k", "-5", "GT"]), ["expireat", "k", "0", "GT"]);
        assert_eq!(run(&["EXPIRE", "k", "-5000"]), ["PEXPIREAT", "k", "0"]);
        assert_eq!(run(&["PEXPIREAT", "k", "5"]), ["PEXPIREAT", "k", "5"]);
        // Past what Redis accepts: its own error.
        let too_small = (i64::MIN / 1000 - 1).to_string();
        assert_eq!(run(&["EXPIREAT", "k", &too_small]), ["EXPIREAT", "k", too_small.as_str()]);
    }

    #[test]
    fn xadd_automatic_ids_run_by_the_log_clock_or_else_take_the_leaders() {
        assert_eq!(run(&["XADD", "s", "*", "f", "v"]), ["XADD", "s", "*", "f", "v"], "left for the log's clock");
        let fallback = |args: &[&str]| {
            let mut argv: Args = args.iter().map(|a| Cow::Borrowed(a.as_bytes())).collect();
            pin_automatic_stream_id(&mut argv, 1_000_000);
            pin_automatic_stream_id(&mut argv, 9_000_000);
            argv.into_iter().map(|a| String::from_utf8(a.into_owned()).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(fallback(&["XADD", "s", "*", "f", "v"]), ["XADD", "s", "1000000-*", "f", "v"]);
        assert_eq!(
            fallback(&["XADD", "s", "NOMKSTREAM", "MAXLEN", "~", "10", "LIMIT", "5", "*", "f", "v"]),
            ["XADD", "s", "NOMKSTREAM", "MAXLEN", "~", "10", "LIMIT", "5", "1000000-*", "f", "v"]
        );
        assert_eq!(fallback(&["XADD", "s", "5-1", "f", "v"]), ["XADD", "s", "5-1", "f", "v"]);
        assert_eq!(fallback(&["SET", "s", "*"]), ["SET", "s", "*"]);
    }

    #[test]
    fn random_writes_pass_unchanged_to_be_chosen_alike_where_applied() {
        assert_eq!(run(&["SPOP", "s", "2"]), ["SPOP", "s", "2"]);
    }

    #[test]
    fn clock_reading_writes_pass_unchanged_to_run_by_the_log_clock() {
        assert_eq!(run(&["xclaim", "s", "g", "c", "10", "1-1"]), ["xclaim", "s", "g", "c", "10", "1-1"]);
        assert!(runs_by_the_log_clock(b"XREADGROUP"));
        assert!(runs_by_the_log_clock(b"xautoclaim"));
        assert!(!runs_by_the_log_clock(b"XADD"), "not refused where the clock cannot be pinned (see pin_automatic_stream_id)");
    }

    #[test]
    fn two_time_options_are_left_for_redis_to_refuse() {
        for args in [
            &["SET", "k", "v", "EX", "10", "PX", "5"][..],
            &["SET", "k", "v", "PX", "5", "PXAT", "1"],
            &["set", "k", "v", "keepttl", "ex", "3"],
            &["GETEX", "k", "EX", "1", "PERSIST"],
        ] {
            assert_eq!(run(args), args, "{args:?}");
        }
        assert_eq!(run(&["SET", "k", "v", "NX", "GET", "PX", "5"]), ["SET", "k", "v", "NX", "GET", "PXAT", "1000005"]);
        assert_eq!(run(&["SET", "k", "v", "EX", "PX"]), ["SET", "k", "v", "EX", "PX"], "PX is EX's (bad) value");
    }

    #[test]
    fn pinning_again_with_another_clock_changes_nothing() {
        // The follower proxy's leader pins a follower's pinned writes again (and `scripts/fuzz`'s
        // `client_commands` checks this on arbitrary commands).
        for args in [
            &["SET", "k", "v", "EX", "10", "GET"][..],
            &["GETEX", "k", "PX", "7"],
            &["SETEX", "k", "2", "v"],
            &["EXPIRE", "k", "-3", "GT"],
            &["PEXPIREAT", "k", "-1"],
            &["RESTORE", "k", "50", "payload"],
        ] {
            let mut once: Args = args.iter().map(|a| Cow::Borrowed(a.as_bytes())).collect();
            pin(&mut once, 1_000_000);
            let mut twice = once.clone();
            pin(&mut twice, 9_000_000);
            assert_eq!(once, twice, "{args:?}");
            assert_ne!(once, args.iter().map(|a| Cow::Borrowed(a.as_bytes())).collect::<Args>(), "{args:?} was pinned");
        }
    }
}
