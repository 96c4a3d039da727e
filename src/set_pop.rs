//! `SPOP`, popping the same members on every node.
//!
//! Redis pops members at random, from a hash table whose layout (and hash seed) differs on every
//! node: applied as it is, one entry would pop different members on each node and the datasets
//! would part. So the leader draws the members when it proposes the pop (`SRANDMEMBER` on its own
//! dataset) and writes them into the entry as *candidates*, after the client's arguments:
//! `SPOP key [count] HINT member...`. Every node pops the candidates the set still holds when it
//! applies the entry. Writes still on their way when the leader drew them may have taken some;
//! then the rest is chosen by a rule every node computes alike: each member gets a score from its
//! bytes and the entry's log index, and the lowest scores go (a scan of the whole set, so only
//! when candidates are missing).
//!
//! Pops whose outcome leaves nothing to chance (an error, a missing key, a count of zero, a count
//! that takes every member) carry no candidates and are Redis' own `SPOP`. A client's `SPOP` with
//! more arguments than Redis takes never reaches the log (the leader answers Redis' syntax error),
//! so an entry's `HINT` is always the leader's.
//!
//! The scores are part of what the log means: a node that scored differently would pop other
//! members for the same entry. [`score`] must stay as it is, in every version that may share a
//! cluster.

use crate::resp;
use bytes::BytesMut;
use std::collections::BTreeSet;

/// What an `SPOP` asks for, before the set is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    /// How many members it pops at most.
    pub count: usize,
    /// `SPOP key count` (an array or set reply) rather than `SPOP key` (one bulk string).
    pub with_count: bool,
}

/// Separates an entry's candidates from the client's arguments.
pub const HINT: &[u8] = b"HINT";

/// Splits an `SPOP` entry's arguments into the client's (`SPOP key [count]`) and the leader's
/// candidates (empty when it wrote none).
pub fn split_hint<'a, 'b>(argv: &'b [&'a [u8]]) -> (&'b [&'a [u8]], &'b [&'a [u8]]) {
    // After the key, and before at least one candidate (the leader writes none without one): a
    // count is digits, so `HINT` in its place means there is none, and a client's `SPOP key HINT`
    // is a count Redis refuses.
    match (2..argv.len().min(4)).find(|&at| argv[at] == HINT && at + 1 < argv.len()) {
        Some(at) => (&argv[..at], &argv[at + 1..]),
        None => (argv, &[]),
    }
}

/// Whether a client's `SPOP` has more arguments than Redis takes (Redis answers a syntax error).
pub fn has_too_many_arguments(argv: &[&[u8]]) -> bool {
    argv.len() > 3
}

/// The pop `argv` (`SPOP key [count]`) asks for; None where Redis itself must answer: a syntax
/// error, a count it refuses, a count of zero.
pub fn requested(argv: &[&[u8]]) -> Option<Requested> {
    match argv.len() {
        2 => Some(Requested { count: 1, with_count: false }),
        3 => positive_count(argv[2]).map(|count| Requested { count, with_count: true }),
        _ => None,
    }
}

/// A count as Redis reads one (`string2ll`: no sign, no leading zero, no spaces), above zero.
fn positive_count(arg: &[u8]) -> Option<usize> {
    let digits = arg.first().is_some_and(|d| (b'1'..=b'9').contains(d)) && arg.iter().all(u8::is_ascii_digit);
    let count: i64 = std::str::from_utf8(arg).ok().filter(|_| digits)?.parse().ok()?;
    usize::try_from(count).ok()
}

/// The `count` members the entry at log index `seed` chooses, besides those it already `taken`,
/// from a set whose members are offered one by one ([`Choice::offer`]). Each node lists its set
/// in its own order, and a scan may offer a member twice: neither changes the choice. Keeps only
/// the `count` best members seen so far.
pub struct Choice {
    count: usize,
    seed: u64,
    /// Members already popped by this entry (its candidates): never chosen again.
    taken: BTreeSet<Vec<u8>>,
    best: BTreeSet<(u64, Vec<u8>)>,
}

impl Choice {
    pub fn new(count: usize, seed: u64, taken: BTreeSet<Vec<u8>>) -> Choice {
        Choice { count, seed, taken, best: BTreeSet::new() }
    }

    pub fn offer(&mut self, member: &[u8]) {
        if self.count == 0 || self.taken.contains(member) {
            return;
        }
        let score = score(member, self.seed);
        // Equal scores (distinct members, so practically never) are ordered by the members' bytes.
        if self.best.len() == self.count && self.best.last().is_some_and(|(s, m)| (score, member) >= (*s, m.as_slice())) {
            return;
        }
        if self.best.insert((score, member.to_vec())) && self.best.len() > self.count {
            self.best.pop_last();
        }
    }

    /// The members chosen, in the order the reply lists them.
    pub fn popped(self) -> Vec<Vec<u8>> {
        self.best.into_iter().map(|(_, member)| member).collect()
    }
}

/// A member's score for the entry at log index `seed`: FNV-1a over its bytes, mixed with the seed
/// by SplitMix64's finaliser, so that each seed orders the members differently.
fn score(member: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(seed))
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Redis' reply to a pop of `popped`: one bulk string for `SPOP key`; for `SPOP key count` an
/// array in RESP2 and a set in RESP3.
pub fn reply(popped: &[impl AsRef<[u8]>], with_count: bool, resp3: bool) -> Vec<u8> {
    let mut out = BytesMut::new();
    if with_count {
        out.extend_from_slice(format!("{}{}\r\n", if resp3 { '~' } else { '*' }, popped.len()).as_bytes());
    }
    for member in popped {
        resp::encode_bulk(member.as_ref(), &mut out);
    }
    out.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("member:{i}").into_bytes()).collect()
    }

    fn chosen(set: &[Vec<u8>], count: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut choice = Choice::new(count, seed, BTreeSet::new());
        set.iter().for_each(|m| choice.offer(m));
        choice.popped()
    }

    #[test]
    fn counts_are_read_as_redis_reads_them() {
        let req = |args: &[&str]| requested(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        assert_eq!(req(&["SPOP", "s"]), Some(Requested { count: 1, with_count: false }));
        assert_eq!(req(&["SPOP", "s", "3"]), Some(Requested { count: 3, with_count: true }));
        assert_eq!(req(&["SPOP", "s", "9223372036854775807"]).map(|r| r.count), Some(i64::MAX as usize));
        // Redis answers these itself: an empty reply, a range error, a syntax error.
        for refused in [
            &["SPOP", "s", "0"][..],
            &["SPOP", "s", "-1"],
            &["SPOP", "s", "05"],
            &["SPOP", "s", "+1"],
            &["SPOP", "s", " 1"],
            &["SPOP", "s", "1.0"],
            &["SPOP", "s", "9223372036854775808"],
            &["SPOP", "s", "1", "2"],
            &["SPOP"],
        ] {
            assert_eq!(req(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn every_node_chooses_the_same_members_whatever_order_it_lists_them_in() {
        let set = members(50);
        let mut shuffled = set.clone();
        shuffled.reverse();
        shuffled.swap(3, 40);
        // A scan may hand a member over twice.
        shuffled.extend_from_slice(&set[10..30]);
        for seed in [1, 2, 977, u64::MAX] {
            assert_eq!(chosen(&set, 7, seed), chosen(&shuffled, 7, seed));
        }
    }

    #[test]
    fn each_entry_chooses_afresh() {
        let set = members(100);
        let picks: std::collections::HashSet<Vec<Vec<u8>>> = (1..=20).map(|seed| chosen(&set, 5, seed)).collect();
        // Twenty fixed picks out of C(100, 5) = 75 million: any repeat would mean the seed is ignored.
        assert_eq!(picks.len(), 20);
        // And over many entries every member gets popped first now and then.
        let firsts: std::collections::HashSet<Vec<u8>> = (1..=2000).map(|seed| chosen(&set, 1, seed).remove(0)).collect();
        assert!(firsts.len() > 90, "only {} of 100 members were ever chosen first", firsts.len());
    }

    #[test]
    fn a_pop_takes_distinct_members_and_no_more_than_the_set_holds() {
        let set = members(10);
        let all = chosen(&set, 10, 5);
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10);
        assert_eq!(chosen(&set, 25, 5).len(), 10);
        assert!(chosen(&set, 0, 5).is_empty());
        // The first three of a pop of five are a pop of three.
        assert_eq!(chosen(&set, 5, 8)[..3], chosen(&set, 3, 8)[..]);
    }

    #[test]
    fn members_already_taken_are_not_chosen_again() {
        let set = members(10);
        let taken: BTreeSet<Vec<u8>> = chosen(&set, 4, 3).into_iter().collect();
        let mut choice = Choice::new(6, 3, taken.clone());
        set.iter().for_each(|m| choice.offer(m));
        let rest = choice.popped();
        assert_eq!(rest.len(), 6);
        assert!(rest.iter().all(|m| !taken.contains(m)));
    }

    #[test]
    fn candidates_follow_the_clients_arguments() {
        let split = |args: &[&str]| {
            let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            let (client, hint) = split_hint(&argv);
            (client.len(), hint.iter().map(|h| String::from_utf8(h.to_vec()).unwrap()).collect::<Vec<_>>())
        };
        assert_eq!(split(&["SPOP", "s"]), (2, vec![]));
        assert_eq!(split(&["SPOP", "s", "2"]), (3, vec![]));
        assert_eq!(split(&["SPOP", "s", "HINT", "a"]), (2, vec!["a".to_string()]));
        // A client's count of HINT is no marker: Redis refuses the count.
        assert_eq!(split(&["SPOP", "s", "HINT"]), (3, vec![]));
        assert_eq!(split(&["SPOP", "s", "2", "HINT", "a", "HINT"]), (3, vec!["a".to_string(), "HINT".to_string()]));
        // A key called HINT is the key.
        assert_eq!(split(&["SPOP", "HINT", "2", "HINT", "b"]), (3, vec!["b".to_string()]));
        assert!(has_too_many_arguments(&[b"SPOP", b"s", b"1", b"2"]));
        assert!(!has_too_many_arguments(&[b"SPOP", b"s", b"1"]));
    }

    #[test]
    fn replies_are_redis_own() {
        assert_eq!(reply(&[b"a"], false, false), b"$1\r\na\r\n");
        assert_eq!(reply(&[b"a"], false, true), b"$1\r\na\r\n");
        assert_eq!(reply(&[&b"a"[..], b"bc"], true, false), b"*2\r\n$1\r\na\r\n$2\r\nbc\r\n");
        assert_eq!(reply(&[&b"a"[..], b"bc"], true, true), b"~2\r\n$1\r\na\r\n$2\r\nbc\r\n");
    }
}
