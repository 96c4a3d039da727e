//! The patterns operators give `RAFT.CONFIG GET`, `RAFT.INFO` and `RAFT.STATS`: `*` only,
//! case-insensitive, as with CONFIG GET.

/// Whether `name` (lower case) matches `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
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
    fn info_lines_keep_the_header_and_the_matching_fields() {
        let text = "# Raft\r\nrole:leader\r\npeer1:a=b:c\r\npeer1_last_error:x\r\nterm:3\r\n";
        assert_eq!(info_lines(text, &[]), text);
        assert_eq!(info_lines(text, &["ROLE".into()]), "# Raft\r\nrole:leader\r\n");
        assert_eq!(info_lines(text, &["peer1*".into(), "term".into()]), "# Raft\r\npeer1:a=b:c\r\npeer1_last_error:x\r\nterm:3\r\n");
        assert_eq!(info_lines(text, &["nothing".into()]), "# Raft\r\n");
    }
}
