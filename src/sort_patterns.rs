//! The keys `SORT` reads without naming them as keys: its `BY` and `GET` patterns.
//!
//! `SORT list BY weight_* GET obj_*->name` looks up `weight_<e>` and the hash `obj_<e>` for every
//! element `e` of `list`. Redis' key positions name only `list` (and a `STORE` destination), so
//! expiring a command's keys by its entry's time (the module's `expiry`) would miss these: a node
//! applying the entry late would see a weight key its clock has passed but the log has not, and
//! sort, or store, differently. This module finds the patterns that look keys up and derives the
//! key name for an element exactly as Redis does (`lookupKeyByPattern` in `sort.c`).

/// What a `SORT` or `SORT_RO` asks for, its options read the way Redis reads them (`sortCommand`):
/// at the first word that is not an option, or lacks its arguments, Redis stops with a syntax
/// error and runs nothing.
#[derive(Default)]
struct Options<'a> {
    /// The `BY` and `GET` patterns that look keys up, in argument order.
    lookups: Vec<&'a [u8]>,
    alpha: bool,
    /// The last `BY` has a `*`, so it sorts by it, and no `BY` lacks one (Redis does not sort
    /// then, whatever comes after: its `dontsort` stays set).
    by_pattern: bool,
    store: bool,
    /// Every word was read: Redis runs the command (a syntax error answers before anything).
    complete: bool,
}

fn options<'a>(argv: &[&'a [u8]]) -> Option<Options<'a>> {
    let name = argv.first()?;
    let read_only = name.eq_ignore_ascii_case(b"sort_ro");
    if !read_only && !name.eq_ignore_ascii_case(b"sort") {
        return None;
    }
    let mut found = Options::default();
    let mut dontsort = false;
    let mut j = 2;
    while j < argv.len() {
        let option = argv[j];
        let left = argv.len() - j - 1;
        let is = |word: &[u8]| option.eq_ignore_ascii_case(word);
        if is(b"alpha") {
            found.alpha = true;
        } else if is(b"asc") || is(b"desc") {
        } else if is(b"limit") && left >= 2 {
            j += 2;
        } else if is(b"store") && !read_only && left >= 1 {
            found.store = true;
            j += 1;
        } else if (is(b"by") || is(b"get")) && left >= 1 {
            let pattern = argv[j + 1];
            let looks_up = star_of(pattern).is_some();
            if looks_up {
                found.lookups.push(pattern);
            }
            if is(b"by") {
                dontsort |= !c_string(pattern).contains(&b'*');
                found.by_pattern = looks_up && !dontsort;
            }
            j += 1;
        } else {
            return Some(found);
        }
        j += 1;
    }
    found.complete = true;
    Some(found)
}

/// The `BY` and `GET` patterns of a `SORT` or `SORT_RO` command that look keys up, in argument
/// order; empty for any other command, or a `SORT` whose patterns are all constant or `#`. At a
/// syntax error, the patterns found before it are harmless extra lookups.
pub fn lookups<'a>(argv: &[&'a [u8]]) -> Vec<&'a [u8]> {
    options(argv).map(|o| o.lookups).unwrap_or_default()
}

/// Whether a `SORT` or `SORT_RO` may keep equal elements in the order they are stored in: `ALPHA`
/// with a `BY` pattern that looks keys up. Elements whose keys are missing, or hold the same
/// string, compare equal there, and Redis breaks no such tie (`sortCompare`); for a set or a
/// sorted set that order is its hash table's, which differs from node to node (each process
/// seeds its hash function at random). The numeric sort breaks ties by the elements themselves,
/// `ALPHA` without `BY` compares the elements, and a `BY` without `*` does not sort at all
/// (a set is then sorted as `ALPHA` when stored).
pub fn ties_keep_stored_order(argv: &[&[u8]]) -> bool {
    options(argv).is_some_and(|o| o.complete && o.alpha && o.by_pattern)
}

/// Whether a `SORT` stores its result (`STORE destination`).
pub fn stores(argv: &[&[u8]]) -> bool {
    options(argv).is_some_and(|o| o.complete && o.store)
}

/// The key `pattern` reads for the element `element`: the first `*` replaced by the element and,
/// for a hash field dereference (`->field` after the `*`), the part before the arrow. `None` for
/// patterns that read no key: `#` (the element itself) and patterns without a `*`.
pub fn key_for(pattern: &[u8], element: &[u8]) -> Option<Vec<u8>> {
    let star = star_of(pattern)?;
    let after_star = &c_string(pattern)[star + 1..];
    // A dereference needs a field name after the arrow; a trailing "->" is part of the key.
    let field_len = find(after_star, b"->")
        .filter(|&arrow| arrow + 2 < after_star.len())
        .map(|arrow| pattern.len() - (star + 1 + arrow) - 2)
        .unwrap_or(0);
    let postfix_len = pattern.len() - (star + 1) - if field_len > 0 { field_len + 2 } else { 0 };
    let mut key = Vec::with_capacity(star + element.len() + postfix_len);
    key.extend_from_slice(&pattern[..star]);
    key.extend_from_slice(element);
    key.extend_from_slice(&pattern[star + 1..star + 1 + postfix_len]);
    Some(key)
}

/// Where the `*` of a pattern that reads a key is; `None` for `#` and patterns without a `*`.
/// Redis searches the pattern as a C string: nothing after a NUL byte is seen by the search.
fn star_of(pattern: &[u8]) -> Option<usize> {
    let searched = c_string(pattern);
    if searched == b"#" {
        return None;
    }
    searched.iter().position(|&b| b == b'*')
}

fn c_string(bytes: &[u8]) -> &[u8] {
    bytes.iter().position(|&b| b == 0).map_or(bytes, |nul| &bytes[..nul])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ties_keep_the_stored_order_only_with_alpha_and_a_by_pattern() {
        use super::{stores, ties_keep_stored_order as ties};
        assert!(ties(&[b"SORT", b"s", b"BY", b"w_*", b"ALPHA", b"STORE", b"d"]));
        assert!(ties(&[b"sort_ro", b"s", b"alpha", b"LIMIT", b"0", b"2", b"by", b"h_*->f"]));
        assert!(!ties(&[b"SORT", b"s", b"BY", b"w_*", b"STORE", b"d"]), "numeric: ties by element");
        assert!(!ties(&[b"SORT", b"s", b"ALPHA", b"STORE", b"d"]), "no BY: the elements compare");
        assert!(!ties(&[b"SORT", b"s", b"BY", b"nosort", b"ALPHA"]), "no star: no sort");
        assert!(!ties(&[b"SORT", b"s", b"BY", b"w_*", b"BY", b"nosort", b"ALPHA"]), "the last BY counts");
        assert!(!ties(&[b"SORT", b"s", b"BY", b"nosort", b"BY", b"w_*", b"ALPHA"]), "a BY without * stops the sort for good");
        assert!(!stores(&[b"SORT", b"s", b"STORE", b"d", b"FROB"]), "a syntax error runs nothing");
        assert!(!ties(&[b"SORT", b"s", b"GET", b"w_*", b"ALPHA"]), "GET does not order");
        assert!(!ties(&[b"SORT", b"s", b"ALPHA", b"BY"]), "a syntax error runs nothing");
        assert!(stores(&[b"SORT", b"s", b"BY", b"w_*", b"ALPHA", b"STORE", b"d"]));
        assert!(!stores(&[b"SORT", b"s", b"BY", b"w_*", b"ALPHA"]));
        assert!(!stores(&[b"SORT_RO", b"s", b"STORE", b"d"]));
    }

    use super::*;

    fn patterns(args: &str) -> Vec<String> {
        let argv: Vec<&[u8]> = args.split(' ').map(str::as_bytes).collect();
        lookups(&argv).into_iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect()
    }

    fn key(pattern: &str, element: &str) -> Option<String> {
        key_for(pattern.as_bytes(), element.as_bytes()).map(|k| String::from_utf8(k).unwrap())
    }

    #[test]
    fn by_and_get_patterns_with_a_star_are_lookups() {
        assert_eq!(patterns("SORT l BY w_* GET o_*->name GET # GET c"), ["w_*", "o_*->name"]);
        assert_eq!(patterns("sort l limit 0 10 by w_* desc alpha store dst get o_*"), ["w_*", "o_*"]);
        assert_eq!(patterns("SORT_RO l BY w_*"), ["w_*"]);
        assert!(patterns("SORT l BY nosort").is_empty());
        assert!(patterns("SORT l").is_empty());
        assert!(patterns("GET w_*").is_empty());
    }

    #[test]
    fn options_are_read_as_redis_reads_them() {
        // LIMIT takes two arguments: "get" here is its count, not an option.
        assert_eq!(patterns("SORT l LIMIT 0 get GET o_*"), ["o_*"]);
        // SORT_RO has no STORE: Redis stops at it with a syntax error.
        assert!(patterns("SORT_RO l STORE by GET o_*").is_empty());
        // A BY without its pattern is a syntax error; nothing after it counts.
        assert!(patterns("SORT l BY").is_empty());
    }

    #[test]
    fn the_first_star_takes_the_element() {
        assert_eq!(key("w_*", "3").as_deref(), Some("w_3"));
        assert_eq!(key("a*b*c", "X").as_deref(), Some("aXb*c"));
        assert_eq!(key("*", "k").as_deref(), Some("k"));
    }

    #[test]
    fn a_hash_dereference_reads_the_key_before_the_arrow() {
        assert_eq!(key("obj_*->name", "7").as_deref(), Some("obj_7"));
        assert_eq!(key("obj_*:x->a->b", "7").as_deref(), Some("obj_7:x"));
        // An arrow with no field after it, or before the star, is part of the key name.
        assert_eq!(key("obj_*->", "7").as_deref(), Some("obj_7->"));
        assert_eq!(key("a->*", "7").as_deref(), Some("a->7"));
    }

    #[test]
    fn patterns_that_read_no_key() {
        assert_eq!(key("#", "7"), None);
        assert_eq!(key("constant", "7"), None);
        // Redis does not see past a NUL byte when it looks for the star.
        assert_eq!(key("w\0*", "7"), None);
    }
}
