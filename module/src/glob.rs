//! The patterns operators give `RAFT.CONFIG GET`, `RAFT.INFO` and `RAFT.STATS`: Redis' glob
//! (`*`, `?`, `[abc]`, `[a-z]`, `[^x]`, `\` to escape), case-insensitive, as with CONFIG GET.

/// Whether `name` matches `pattern`, ignoring ASCII case.
pub fn matches(pattern: &str, name: &str) -> bool {
    glob(pattern.to_ascii_lowercase().as_bytes(), name.to_ascii_lowercase().as_bytes())
}

/// Matches with one backtracking point, the newest `*`: on a mismatch it takes one more byte.
/// Linear in practice, never exponential (unlike a naive recursion on every star).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            star = Some((p, t));
            continue;
        }
        if let Some(next) = one(pattern, p, text[t]) {
            (p, t) = (next, t + 1);
            continue;
        }
        match star {
            Some((after_star, from)) => {
                (p, t) = (after_star, from + 1);
                star = Some((after_star, from + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// Where the pattern goes on if its token at `p` (not a `*`) matches byte `c`.
fn one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'?' => Some(p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b'[' => class(pattern, p + 1, c),
        literal => (literal == c).then_some(p + 1),
    }
}

/// A `[...]` class starting after its `[`; one left open runs to the end of the pattern.
fn class(pattern: &[u8], mut p: usize, c: u8) -> Option<usize> {
    let negated = pattern.get(p) == Some(&b'^');
    if negated {
        p += 1;
    }
    let mut found = false;
    while p < pattern.len() && pattern[p] != b']' {
        if pattern[p] == b'\\' && p + 1 < pattern.len() {
            found |= pattern[p + 1] == c;
            p += 2;
        } else if p + 2 < pattern.len() && pattern[p + 1] == b'-' && pattern[p + 2] != b']' {
            let (a, b) = (pattern[p].min(pattern[p + 2]), pattern[p].max(pattern[p + 2]));
            found |= (a..=b).contains(&c);
            p += 3;
        } else {
            found |= pattern[p] == c;
            p += 1;
        }
    }
    let after = (p + 1).min(pattern.len());
    (found != negated).then_some(after)
}

/// The lines of an INFO-style text whose field matches one of `patterns`, with its `#` headers;
/// all of it when there are none.
pub fn info_lines(text: &str, patterns: &[String]) -> String {
    if patterns.is_empty() {
        return text.to_string();
    }
    text.split_inclusive("\r\n")
        .filter(|line| line.starts_with('#') || line.split_once(':').is_some_and(|(field, _)| patterns.iter().any(|p| matches(p, field))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{info_lines, matches};

    #[test]
    fn globs_match_like_config_get() {
        assert!(matches("*", "durability"));
        assert!(matches("dur*", "durability"));
        assert!(matches("*ticks", "election-ticks"));
        assert!(matches("CONSISTENCY", "consistency"));
        assert!(!matches("dur", "durability"));
        assert!(matches("*-*", "tick-ms"));
    }

    #[test]
    fn globs_take_redis_classes_wildcards_and_escapes() {
        assert!(matches("?ir", "dir"));
        assert!(!matches("?", "dir"));
        assert!(matches("[dn]*", "node-id") && matches("[dn]*", "dir") && !matches("[dn]*", "raft-port"));
        assert!(matches("[^dn]*", "raft-port") && !matches("[^dn]*", "dir"));
        assert!(matches("*-[a-m]*", "tick-ms") && !matches("*-[n-z]*", "tick-ms"));
        assert!(matches("[z-a]ir", "dir"), "a range given backwards, as Redis takes it");
        assert!(matches("a\\*b", "a*b") && !matches("a\\*b", "axb"));
        assert!(matches("[*]", "*") && !matches("[*]", "x"));
        assert!(matches("max*-size", "max-entry-size") && matches("*a*a*", "snapshot-threshold-a"));
        assert!(matches("[D]IR", "dir"), "case-insensitive in classes too");
        assert!(matches("**", "") && !matches("?", ""));
        assert!(matches("[ab", "a"), "a class left open runs to the end");
        // A long run of stars does not take exponential time.
        assert!(!matches(&"*a".repeat(30), &"a".repeat(29)));
    }

    #[test]
    fn info_lines_keep_the_header_and_the_matching_fields() {
        let text = "# Raft\r\nrole:leader\r\npeer1:a=b:c\r\npeer1_last_error:x\r\nterm:3\r\n";
        assert_eq!(info_lines(text, &[]), text);
        assert_eq!(info_lines(text, &["ROLE".into()]), "# Raft\r\nrole:leader\r\n");
        assert_eq!(info_lines(text, &["peer1*".into(), "term".into()]), "# Raft\r\npeer1:a=b:c\r\npeer1_last_error:x\r\nterm:3\r\n");
        assert_eq!(info_lines(text, &["nothing".into()]), "# Raft\r\n");
    }
}
