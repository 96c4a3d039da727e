//! A script's first line, `#!lua [flags=a,b,...]`, read exactly as Redis 7.0 reads it
//! (`evalExtractShebangFlags`): the line is split into words by `sdssplitargs`, so quotes and
//! escapes count, and any word Redis would not accept makes the whole script an error on every
//! node. The leader judges a script by these flags before it is proposed (the memory limit,
//! WATCH), so reading them any other way than Redis does would judge a script Redis runs
//! differently.

/// The flags a script's first line may name (Redis 7.0's `scripts_flags_def`).
const KNOWN_FLAGS: &[&str] = &["no-writes", "allow-oom", "allow-stale", "no-cluster", "allow-cross-slot-keys"];

/// The flags of a script's first line. None without such a line, or with one Redis refuses (the
/// script then fails on every node alike).
pub fn flags(text: &[u8]) -> Option<Vec<&'static str>> {
    if !text.starts_with(b"#!") {
        return None;
    }
    // Redis looks for the newline with `strchr`, which stops at a NUL byte.
    let end = text.iter().position(|b| *b == b'\n' || *b == 0)?;
    if text[end] == 0 {
        return None;
    }
    let words = split_args(&text[..end])?;
    let (engine, options) = words.split_first()?;
    if c_str(engine) != b"#!lua" {
        return None;
    }
    let mut flags = Vec::new();
    for option in options {
        // Redis matches the prefix with `strncmp`, then splits the whole rest (past any NUL) on
        // commas, and compares each piece with `strcmp` (up to its NUL).
        let list = option.strip_prefix(b"flags=")?;
        if list.is_empty() {
            continue;
        }
        // `sdssplitlen` keeps empty pieces, and Redis refuses them as unknown flags.
        for flag in list.split(|b| *b == b',') {
            flags.push(*KNOWN_FLAGS.iter().find(|known| known.as_bytes() == c_str(flag))?);
        }
    }
    Some(flags)
}

/// Whether a script's first line says `no-writes`: Redis then refuses every write it calls.
pub fn writes_nothing(text: &[u8]) -> bool {
    flags(text).is_some_and(|flags| flags.contains(&"no-writes"))
}

/// A word as Redis' `strcmp` sees it: up to its first NUL byte (a quoted `\x00` can put one there).
fn c_str(word: &[u8]) -> &[u8] {
    word.split(|b| *b == 0).next().unwrap_or_default()
}

/// Splits a line into words as Redis' `sdssplitargs` does: blanks separate words, double quotes
/// take `\xHH` and C escapes, single quotes take `\'`, and a closing quote must end its word.
/// None where Redis finds the line malformed (an unterminated quote, or text right after one).
fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // The C loop walks a NUL-terminated string.
    let line = c_str(line);
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    // A closing quote must end its word: a blank or the end of the line follows it.
    let ends_word = |i: usize| at(i + 1) == 0 || is_space(at(i + 1));
    let mut words = Vec::new();
    let mut i = 0;
    loop {
        while is_space(at(i)) {
            i += 1;
        }
        if at(i) == 0 {
            return Some(words);
        }
        let mut word = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(i);
            if in_double {
                if c == b'\\' && at(i + 1) == b'x' && at(i + 2).is_ascii_hexdigit() && at(i + 3).is_ascii_hexdigit() {
                    word.push(hex(at(i + 2)) * 16 + hex(at(i + 3)));
                    i += 3;
                } else if c == b'\\' && at(i + 1) != 0 {
                    i += 1;
                    word.push(match at(i) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if !ends_word(i) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    word.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(i + 1) == b'\'' {
                    i += 1;
                    word.push(b'\'');
                } else if c == b'\'' {
                    if !ends_word(i) {
                        return None;
                    }
                    i += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    word.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            i += 1;
                        }
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    other => word.push(other),
                }
            }
            i += 1;
        }
        words.push(word);
    }
}

/// C's `isspace`: Rust's ASCII whitespace leaves out the vertical tab.
fn is_space(c: u8) -> bool {
    c.is_ascii_whitespace() || c == 0x0b
}

fn hex(c: u8) -> u8 {
    (c as char).to_digit(16).unwrap_or(0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Option<Vec<String>> {
        split_args(line.as_bytes()).map(|words| words.into_iter().map(|w| String::from_utf8(w).unwrap()).collect())
    }

    #[test]
    fn lines_split_as_sdssplitargs_splits_them() {
        assert_eq!(words("  a b\tc  ").unwrap(), ["a", "b", "c"]);
        assert_eq!(words(r#""a b" 'c d'"#).unwrap(), ["a b", "c d"]);
        assert_eq!(words(r#""\x41\n" 'it\'s'"#).unwrap(), ["A\n", "it's"]);
        assert_eq!(words(r#"x"y z" w"#).unwrap(), ["xy z", "w"], "a quote may open inside a word");
        assert_eq!(words("a\x0bb").unwrap(), ["a\x0bb"], "a vertical tab does not end a word");
        assert_eq!(words(""), Some(vec![]));
        assert_eq!(words(r#""a"b"#), None, "text right after a closing quote");
        assert_eq!(words(r#""open"#), None);
        assert_eq!(words("'open"), None);
    }

    #[test]
    fn flags_are_read_from_the_first_line_only() {
        assert_eq!(flags(b"return 1"), None);
        assert_eq!(flags(b"#!lua\nreturn 1"), Some(vec![]));
        assert_eq!(flags(b"#!lua flags=no-writes,allow-oom\nreturn 1"), Some(vec!["no-writes", "allow-oom"]));
        assert_eq!(flags(b"#!lua flags=\nreturn 1"), Some(vec![]), "an empty list is no flags");
        assert_eq!(flags(b"#!lua \"flags=allow-oom\"\nreturn 1"), Some(vec!["allow-oom"]), "quotes come off");
        assert_eq!(flags(b"\"#!lua\" flags=no-writes\nreturn 1"), None, "the mark must open the script unquoted");
        assert_eq!(flags(b"#!lua flags=no-writes,\nreturn 1"), None, "an empty flag is unknown to Redis");
        assert_eq!(flags(b"#!lua flags=no-writes\"\nreturn 1"), None, "an unterminated quote");
        assert_eq!(flags(b"#!lua flags=allow-oom"), None, "no newline");
        assert_eq!(flags(b"#!lua\0 flags=allow-oom\nreturn 1"), None, "a NUL before the newline");
        assert_eq!(flags(b"#!lua \"flags=no-writes\\x00,bogus\"\nreturn 1"), None, "the piece past the NUL counts");
        assert_eq!(flags(b"#!lua \"flags=no-writes\\x00junk\"\nreturn 1"), Some(vec!["no-writes"]), "compared up to the NUL");
        assert_eq!(flags(b"#!python\nreturn 1"), None);
        assert_eq!(flags(b"#!lua name=x\nreturn 1"), None);
    }

    #[test]
    fn a_script_writes_nothing_only_if_its_first_line_says_so() {
        assert!(writes_nothing(b"#!lua flags=no-writes\nreturn 1"));
        assert!(writes_nothing(b"#!lua flags=allow-stale,no-writes\nreturn 1"));
        assert!(writes_nothing(b"#!lua 'flags=no-writes'\nreturn 1"));
        assert!(!writes_nothing(b"#!lua\nreturn 1"));
        assert!(!writes_nothing(b"return 1 -- flags=no-writes"));
        assert!(!writes_nothing(b"#!lua flags=no-writes,no-such\nreturn 1"), "refused by Redis");
    }
}
