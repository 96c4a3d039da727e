//! Blocking commands: the pops (BLPOP, BRPOP, BRPOPLPUSH, BLMOVE, BLMPOP, BZPOPMIN, BZPOPMAX,
//! BZMPOP) and the stream reads with `BLOCK` (XREAD, XREADGROUP).
//!
//! Redis serves a blocked client the moment a push (or an XADD) makes one of its keys ready, and
//! sends its replicas the pop it made. Under Raft a pop has to be a log entry, so a leader runs a
//! blocking command as a series of attempts: each attempt is the client's command itself, proposed
//! and applied on every node, where it cannot block (Redis answers a client that may not block at
//! once, with a null when nothing is there). Between attempts the client waits until one of its
//! keys holds something for it again. The module's `blocking` does the waiting; this file knows
//! the commands' shapes.

use crate::stream_read::StreamRead;
use std::time::Duration;

/// What a blocking command waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waits {
    List,
    SortedSet,
    /// `XREAD`: entries newer than the IDs it names. It only reads.
    Stream(StreamRead),
    /// `XREADGROUP`: entries its group has not been given yet.
    Group(StreamRead),
}

/// The unit a blocking command's timeout is given in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Milliseconds,
}

/// A blocking command, as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingCommand {
    /// Positions of the keys it waits on (not BLMOVE's destination).
    pub keys: Vec<usize>,
    /// Position of the timeout.
    pub timeout: usize,
    pub unit: Unit,
    pub waits: Waits,
}

/// The lower-case names of the blocking pops.
pub const NAMES: &[&str] = &["blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin", "bzpopmax", "bzmpop"];

impl BlockingCommand {
    /// The blocking command `argv` is; None for another command, one too short to have a
    /// timeout, or a stream read without `BLOCK`. Arguments Redis would refuse (a bad `numkeys`,
    /// unbalanced streams and IDs) name no keys: the first attempt answers Redis' error.
    pub fn of(argv: &[&[u8]]) -> Option<BlockingCommand> {
        let name = std::str::from_utf8(argv.first()?).ok()?.to_ascii_lowercase();
        if name == "xread" || name == "xreadgroup" {
            let read = StreamRead::parse(argv);
            let waits = if name == "xread" { Waits::Stream(read) } else { Waits::Group(read) };
            return Some(BlockingCommand { keys: read.keys(argv.len()).collect(), timeout: read.block?, unit: Unit::Milliseconds, waits });
        }
        let last = argv.len().checked_sub(1).filter(|l| *l >= 2)?;
        let waits = if name.starts_with("bz") { Waits::SortedSet } else { Waits::List };
        let (keys, timeout) = match name.as_str() {
            "blpop" | "brpop" | "bzpopmin" | "bzpopmax" => ((1..last).collect(), last),
            "brpoplpush" | "blmove" => (vec![1], last),
            // BLMPOP timeout numkeys key [key ...] LEFT|RIGHT [COUNT count]
            "blmpop" | "bzmpop" => {
                let numkeys = std::str::from_utf8(argv[2]).ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
                let end = 3usize.saturating_add(numkeys).min(argv.len());
                ((3..end).collect(), 1)
            }
            _ => return None,
        };
        Some(BlockingCommand { keys, timeout, unit: Unit::Seconds, waits })
    }

    /// Whether it only reads (`XREAD`): its attempts change nothing.
    pub fn reads_only(&self) -> bool {
        matches!(self.waits, Waits::Stream(_))
    }

    /// A pop `argv` (of this shape) narrowed to the keys at `ready`, a part of [`Self::keys`] in
    /// the same order, for an attempt on the keys that hold something. Redis serves a waiting
    /// client from a key that gets elements, whatever its other keys hold meanwhile; an attempt
    /// that named them all would answer `-WRONGTYPE` for one that turned into another type
    /// before the ready one. (The first attempt names them all: Redis checks every key when the
    /// command comes in.)
    pub fn narrowed_to(&self, argv: &[Vec<u8>], ready: &[usize]) -> Vec<Vec<u8>> {
        let (Some(&first), Some(&last)) = (self.keys.first(), self.keys.last()) else { return argv.to_vec() };
        if ready.is_empty() || ready.len() == self.keys.len() || !matches!(self.waits, Waits::List | Waits::SortedSet) {
            return argv.to_vec();
        }
        let mut out: Vec<Vec<u8>> = argv[..first].to_vec();
        out.extend(ready.iter().map(|&at| argv[at].clone()));
        out.extend_from_slice(&argv[last + 1..]);
        // BLMPOP and BZMPOP count their keys, in the argument before them.
        if [&b"blmpop"[..], b"bzmpop"].iter().any(|name| argv[0].eq_ignore_ascii_case(name)) {
            out[first - 1] = ready.len().to_string().into_bytes();
        }
        out
    }
}

/// How long a client may wait, as Redis reads a blocking command's timeout: seconds with decimals
/// for the pops, whole milliseconds for the stream reads; 0 waits for ever (None). The errors are
/// Redis' own.
pub fn parse_timeout(arg: &[u8], unit: Unit) -> Result<Option<Duration>, String> {
    let text = std::str::from_utf8(arg).ok().filter(|s| !s.starts_with(|c: char| c.is_ascii_whitespace()));
    let millis = match unit {
        Unit::Seconds => {
            let seconds = text
                .and_then(|s| s.parse::<f64>().ok().or_else(|| hex_float(s)).map(|v| (s, v)))
                .filter(|(_, v)| !v.is_nan())
                .map(|(s, v)| match v == 0.0 && has_nonzero_digit(s) {
                    // Too small for a double, not for Redis' long double: a wait of a millisecond
                    // once rounded up (negative ones round to zero).
                    true => f64::MIN_POSITIVE.copysign(if s.starts_with('-') { -1.0 } else { 1.0 }),
                    false => v,
                })
                .ok_or_else(|| "ERR timeout is not a float or out of range".to_string())?;
            let millis = (seconds * 1000.0).ceil();
            // Redis converts to a 64-bit integer: what does not fit comes out as the most negative one.
            if !(millis > -9.2e18 && millis < 9.2e18) || millis < 0.0 {
                return Err("ERR timeout is negative".into());
            }
            millis as i64
        }
        Unit::Milliseconds => {
            text.and_then(|s| s.parse::<i64>().ok()).ok_or_else(|| "ERR timeout is not an integer or out of range".to_string())?
        }
    };
    if millis < 0 {
        return Err("ERR timeout is negative".into());
    }
    Ok((millis > 0).then(|| Duration::from_millis(millis as u64)))
}

/// The hexadecimal form of a float that `strtold`, and so Redis, reads:
/// `[+-]0x<hex digits>[.<hex digits>][p[+-]<decimal exponent>]`.
fn hex_float(s: &str) -> Option<f64> {
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let digits = unsigned.strip_prefix("0x").or_else(|| unsigned.strip_prefix("0X"))?;
    let (mantissa, exponent) = match digits.split_once(['p', 'P']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i32>().ok()?),
        None => (digits, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut value = 0.0f64;
    for c in whole.chars() {
        value = value * 16.0 + f64::from(c.to_digit(16)?);
    }
    let mut scale = 1.0 / 16.0;
    for c in fraction.chars() {
        value += f64::from(c.to_digit(16)?) * scale;
        scale /= 16.0;
    }
    let value = value * 2f64.powi(exponent);
    Some(if negative { -value } else { value })
}

/// Whether a float's digits (before its exponent) are not all zeros.
fn has_nonzero_digit(s: &str) -> bool {
    let unsigned = s.trim_start_matches(['+', '-']);
    match unsigned.strip_prefix("0x").or_else(|| unsigned.strip_prefix("0X")) {
        Some(hex) => hex.split(['p', 'P']).next().unwrap_or("").chars().any(|c| c.is_ascii_hexdigit() && c != '0'),
        None => unsigned.split(['e', 'E']).next().unwrap_or("").chars().any(|c| ('1'..='9').contains(&c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pop(args: &[&str]) -> Option<BlockingCommand> {
        BlockingCommand::of(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())
    }

    #[test]
    fn keys_and_timeout_are_found_for_every_shape() {
        let blpop = pop(&["BLPOP", "a", "b", "1.5"]).unwrap();
        assert_eq!((blpop.keys, blpop.timeout, blpop.waits), (vec![1, 2], 3, Waits::List));
        let blmove = pop(&["blmove", "src", "dst", "LEFT", "RIGHT", "0"]).unwrap();
        assert_eq!((blmove.keys, blmove.timeout), (vec![1], 5));
        assert_eq!(pop(&["BRPOPLPUSH", "src", "dst", "0"]).unwrap().keys, vec![1]);
        let bzmpop = pop(&["BZMPOP", "0", "2", "z1", "z2", "MIN", "COUNT", "3"]).unwrap();
        assert_eq!((bzmpop.keys, bzmpop.timeout, bzmpop.waits), (vec![3, 4], 1, Waits::SortedSet));
        assert_eq!(pop(&["BZPOPMAX", "z", "0"]).unwrap().waits, Waits::SortedSet);
    }

    #[test]
    fn a_retry_names_only_the_keys_that_are_ready() {
        let narrowed = |args: &[&str], ready: &[usize]| {
            let argv: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
            let shape = pop(args).unwrap();
            let out = shape.narrowed_to(&argv, ready);
            out.into_iter().map(|a| String::from_utf8(a).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(narrowed(&["BLPOP", "a", "b", "c", "0"], &[2]), ["BLPOP", "b", "0"]);
        assert_eq!(narrowed(&["BZPOPMIN", "a", "b", "c", "1.5"], &[1, 3]), ["BZPOPMIN", "a", "c", "1.5"]);
        assert_eq!(
            narrowed(&["BLMPOP", "0", "3", "a", "b", "c", "LEFT", "COUNT", "2"], &[4, 5]),
            ["BLMPOP", "0", "2", "b", "c", "LEFT", "COUNT", "2"]
        );
        assert_eq!(narrowed(&["BZMPOP", "0", "2", "a", "b", "MAX"], &[4]), ["BZMPOP", "0", "1", "b", "MAX"]);
        // Unchanged: every key is ready, none is, or there is one key only.
        assert_eq!(narrowed(&["BRPOP", "a", "b", "0"], &[1, 2]), ["BRPOP", "a", "b", "0"]);
        assert_eq!(narrowed(&["BRPOP", "a", "b", "0"], &[]), ["BRPOP", "a", "b", "0"]);
        assert_eq!(narrowed(&["BLMOVE", "a", "d", "LEFT", "RIGHT", "0"], &[1]), ["BLMOVE", "a", "d", "LEFT", "RIGHT", "0"]);
    }

    #[test]
    fn malformed_pops_name_no_key_past_their_end() {
        assert_eq!(pop(&["BLMPOP", "0", "x", "l", "LEFT"]).unwrap().keys, Vec::<usize>::new(), "numkeys is not a number");
        assert_eq!(pop(&["BLMPOP", "0", "9", "l", "LEFT"]).unwrap().keys, vec![3, 4]);
        assert_eq!(pop(&["BLPOP", "l"]), None, "no timeout");
        assert_eq!(pop(&["LPOP", "l", "1"]), None, "not a blocking pop");
    }

    fn parse_timeout_s(arg: &[u8]) -> Result<Option<Duration>, String> {
        parse_timeout(arg, Unit::Seconds)
    }

    #[test]
    fn stream_reads_block_only_with_block() {
        let read = pop(&["XREAD", "COUNT", "2", "BLOCK", "100", "STREAMS", "a", "b", "$", "0"]).unwrap();
        assert_eq!((read.keys, read.timeout, read.unit), (vec![6, 7], 4, Unit::Milliseconds));
        assert!(
            matches!(read.waits, Waits::Stream(r) if r.count) && pop(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]).unwrap().reads_only()
        );
        let group = pop(&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"]).unwrap();
        assert_eq!((group.keys, group.timeout), (vec![7], 5));
        assert!(matches!(group.waits, Waits::Group(r) if r.group == Some(2)));
        assert!(!pop(&["XREADGROUP", "GROUP", "g", "c", "BLOCK", "0", "STREAMS", "s", ">"]).unwrap().reads_only());
        assert_eq!(pop(&["XREAD", "STREAMS", "s", "$"]), None, "it does not block");
        assert_eq!(pop(&["XREAD", "BLOCK", "0", "STREAMS", "s", "t", "$"]).unwrap().keys, Vec::<usize>::new(), "unbalanced");
    }

    #[test]
    fn stream_read_timeouts_are_whole_milliseconds() {
        let ms = |arg: &str| parse_timeout(arg.as_bytes(), Unit::Milliseconds);
        assert_eq!(ms("0"), Ok(None));
        assert_eq!(ms("250"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(ms("-1").unwrap_err(), "ERR timeout is negative");
        for bad in ["1.5", "abc", "", " 1", "99999999999999999999"] {
            assert_eq!(ms(bad).unwrap_err(), "ERR timeout is not an integer or out of range", "{bad:?}");
        }
    }

    #[test]
    fn timeouts_read_as_redis_reads_them() {
        assert_eq!(parse_timeout_s(b"0"), Ok(None), "0 waits for ever");
        assert_eq!(parse_timeout_s(b"1.5"), Ok(Some(Duration::from_millis(1500))));
        assert_eq!(parse_timeout_s(b"0.0001"), Ok(Some(Duration::from_millis(1))), "rounded up to a millisecond");
        assert_eq!(parse_timeout_s(b"-0.0001"), Ok(None), "rounds to zero, as in Redis");
        assert_eq!(parse_timeout_s(b"1e1"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_timeout_s(b"-1").unwrap_err(), "ERR timeout is negative");
        assert_eq!(parse_timeout_s(b"inf").unwrap_err(), "ERR timeout is negative", "Redis' integer conversion overflows");
        // strtold's hexadecimal floats, and values below a double's range but not a long double's.
        assert_eq!(parse_timeout_s(b"0x1p-1"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_timeout_s(b"0X1.8P1"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(parse_timeout_s(b"0xa"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(parse_timeout_s(b"-0x1p-20"), Ok(None), "rounds to zero");
        assert_eq!(parse_timeout_s(b"0x0"), Ok(None));
        assert_eq!(parse_timeout_s(b"1e-400"), Ok(Some(Duration::from_millis(1))));
        assert_eq!(parse_timeout_s(b"0x1p-2000"), Ok(Some(Duration::from_millis(1))));
        assert_eq!(parse_timeout_s(b"0e-400"), Ok(None));
        assert_eq!(parse_timeout_s(b"-1e-400"), Ok(None));
        for bad in ["0x", "0x1p", "0xg", "0x1.2.3", "0x1p1.5", "x1"] {
            assert_eq!(parse_timeout_s(bad.as_bytes()).unwrap_err(), "ERR timeout is not a float or out of range", "{bad:?}");
        }
        for bad in [&b"abc"[..], b"", b" 1", b"1 ", b"nan", b"\xff"] {
            assert_eq!(parse_timeout_s(bad).unwrap_err(), "ERR timeout is not a float or out of range", "{bad:?}");
        }
    }
}
