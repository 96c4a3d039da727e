//! The shape of `XREAD` and `XREADGROUP`: their options, the streams they read and the IDs they
//! read after; and stream IDs, to compare them the way Redis does.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;

/// What Redis reads in a stream read's options, before `STREAMS`. Positions are argument indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRead {
    /// `BLOCK`'s value.
    pub block: Option<usize>,
    /// A `COUNT` was given.
    pub count: bool,
    /// `XREADGROUP`'s group name (the consumer follows it).
    pub group: Option<usize>,
    /// The word `STREAMS`.
    pub streams: Option<usize>,
}

/// How many entries Redis gives a stream read it serves after blocking, unless it has a `COUNT`
/// (`XREAD_BLOCKED_DEFAULT_COUNT`): a client that blocked behind a low ID does not get a whole
/// stream at once.
pub const BLOCKED_DEFAULT_COUNT: &str = "1000";

impl StreamRead {
    /// Reads the options of `XREAD`/`XREADGROUP` `argv`, as Redis does: a group, consumer, count
    /// or key that happens to be named `block` is not an option.
    pub fn parse(argv: &[&[u8]]) -> StreamRead {
        let mut read = StreamRead { block: None, count: false, group: None, streams: None };
        let mut i = 1;
        while i < argv.len() {
            let word = argv[i];
            let more = argv.len() - i - 1;
            if word.eq_ignore_ascii_case(b"streams") {
                read.streams = Some(i);
                break;
            }
            if word.eq_ignore_ascii_case(b"block") && more >= 1 {
                read.block = Some(i + 1);
                i += 2;
            } else if word.eq_ignore_ascii_case(b"count") && more >= 1 {
                read.count = true;
                i += 2;
            } else if word.eq_ignore_ascii_case(b"group") && more >= 2 {
                read.group = Some(i + 1);
                i += 3;
            } else {
                i += 1;
            }
        }
        read
    }

    /// Where its keys are: the first half of what follows `STREAMS` (none when the rest does not
    /// split in two, which Redis refuses).
    pub fn keys(&self, argc: usize) -> Range<usize> {
        let Some(streams) = self.streams else { return 0..0 };
        let rest = argc - streams - 1;
        if rest == 0 || !rest.is_multiple_of(2) {
            return 0..0;
        }
        streams + 1..streams + 1 + rest / 2
    }

    /// `argv` as Redis serves it once it has blocked: with `COUNT 1000` unless it has a count.
    pub fn served_after_blocking(&self, argv: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut served = argv.to_vec();
        if !self.count {
            served.splice(1..1, [b"COUNT".to_vec(), BLOCKED_DEFAULT_COUNT.as_bytes().to_vec()]);
        }
        served
    }
}

/// A stream entry's ID: milliseconds, then a sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// An ID as a read names it: `<ms>-<seq>`, or `<ms>` for `<ms>-0`. None for anything else
    /// (`$`, `>`, a malformed ID).
    pub fn parse(s: &[u8]) -> Option<StreamId> {
        let s = std::str::from_utf8(s).ok()?;
        let number = |n: &str| n.bytes().all(|b| b.is_ascii_digit()).then(|| n.parse::<u64>().ok()).flatten();
        match s.split_once('-') {
            Some((ms, seq)) => Some(StreamId { ms: number(ms)?, seq: number(seq)? }),
            None => Some(StreamId { ms: number(s)?, seq: 0 }),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Whether a stream whose newest entry is `top` holds an entry after `after` (None: an ID that
/// could not be read, so it may).
pub fn has_entries_after(top: Option<StreamId>, after: Option<StreamId>) -> bool {
    match (top, after) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(top), Some(after)) => top.cmp(&after) == Ordering::Greater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> StreamRead {
        StreamRead::parse(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())
    }

    #[test]
    fn options_are_read_up_to_streams() {
        let read = parse(&["XREADGROUP", "GROUP", "block", "count", "COUNT", "5", "BLOCK", "100", "STREAMS", "a", "b", ">", ">"]);
        assert_eq!(read, StreamRead { block: Some(7), count: true, group: Some(2), streams: Some(8) });
        assert_eq!(read.keys(13), 9..11);
        let read = parse(&["XREAD", "STREAMS", "block", "0"]);
        assert_eq!((read.block, read.count, read.keys(4)), (None, false, 2..3), "a stream named block");
        assert_eq!(parse(&["XREAD", "BLOCK"]).block, None, "BLOCK without a value is Redis' error");
        assert_eq!(parse(&["XREAD", "BLOCK", "0", "STREAMS", "a", "b", "0"]).keys(7), 0..0, "unbalanced");
        assert_eq!(parse(&["XREAD", "BLOCK", "0", "STREAMS"]).keys(4), 0..0);
        assert_eq!(parse(&["XREAD", "BLOCK", "0"]).streams, None);
    }

    #[test]
    fn a_read_served_after_blocking_gets_redis_default_count() {
        let argv: Vec<Vec<u8>> = ["XREAD", "BLOCK", "0", "STREAMS", "s", "0"].iter().map(|a| a.as_bytes().to_vec()).collect();
        let read = StreamRead::parse(&argv.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let served = read.served_after_blocking(&argv);
        assert_eq!(served[..3], [b"XREAD".to_vec(), b"COUNT".to_vec(), b"1000".to_vec()]);
        assert_eq!(served[3..], argv[1..]);
        let counted = StreamRead { count: true, ..read };
        assert_eq!(counted.served_after_blocking(&argv), argv);
    }

    #[test]
    fn ids_parse_and_order_as_in_redis() {
        assert_eq!(StreamId::parse(b"5-3"), Some(StreamId { ms: 5, seq: 3 }));
        assert_eq!(StreamId::parse(b"5"), Some(StreamId { ms: 5, seq: 0 }));
        for bad in [&b"$"[..], b">", b"-", b"5-", b"-3", b"+5", b"a-1", b"1-2-3", b""] {
            assert_eq!(StreamId::parse(bad), None, "{bad:?}");
        }
        assert!(StreamId { ms: 2, seq: 0 } > StreamId { ms: 1, seq: 99 });
        assert_eq!(StreamId { ms: 7, seq: 1 }.to_string(), "7-1");
        let id = |s: &str| StreamId::parse(s.as_bytes());
        assert!(has_entries_after(id("5-1"), id("5-0")));
        assert!(!has_entries_after(id("5-0"), id("5-0")));
        assert!(!has_entries_after(None, id("0-0")), "an empty or missing stream");
        assert!(has_entries_after(id("1-0"), None), "an unreadable ID: look");
    }
}
