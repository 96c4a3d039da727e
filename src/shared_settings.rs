//! Redis settings that change what a command does, so every node must have the same values.
//!
//! Each node runs every write itself, so a setting that changes a write's outcome makes a node
//! that differs reach another dataset, silently: with `stream-node-max-entries` 10 on one node
//! and 100 on another, `XTRIM s MAXLEN ~ 150` kept 150 entries on one and 200 on the other;
//! `hll-sparse-max-bytes` changes a HyperLogLog's bytes, `proto-max-bulk-len` whether an `APPEND`
//! or `SETRANGE` fits, `databases` whether a `SELECT` does. Nodes compare them when they connect
//! (`HELLO`) and before one joins: a node that differs is refused, with what differs.

use std::collections::BTreeMap;

/// The settings compared, by their `CONFIG GET` names.
pub const NAMES: &[&str] = &["databases", "proto-max-bulk-len", "stream-node-max-bytes", "stream-node-max-entries", "hll-sparse-max-bytes"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedSettings(BTreeMap<String, String>);

impl SharedSettings {
    /// The settings, each read with `value_of`.
    pub fn read(mut value_of: impl FnMut(&str) -> String) -> SharedSettings {
        SharedSettings(NAMES.iter().map(|name| (name.to_string(), value_of(name))).collect())
    }

    /// One setting's value, as read.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `name=value` words, as `HELLO` and `RAFT._JOIN` carry them.
    pub fn encode(&self) -> String {
        self.0.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join(" ")
    }

    pub fn decode(text: &str) -> SharedSettings {
        SharedSettings(
            text.split_whitespace()
                .filter_map(|word| word.split_once('='))
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        )
    }

    /// What differs between this node's settings and another's, for an error; None if nothing.
    pub fn differences(&self, theirs: &SharedSettings) -> Option<String> {
        let names: std::collections::BTreeSet<&String> = self.0.keys().chain(theirs.0.keys()).collect();
        let shown = |v: Option<&String>| v.map_or("unset".to_string(), |v| v.clone());
        let differ: Vec<String> = names
            .into_iter()
            .filter(|name| self.0.get(*name) != theirs.0.get(*name))
            .map(|name| format!("{name} is {} there and {} here", shown(theirs.0.get(name)), shown(self.0.get(name))))
            .collect();
        (!differ.is_empty()).then(|| format!("{}; every node needs the same values", differ.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_name_what_differs() {
        let ours = SharedSettings::read(|name| if name == "databases" { "16".into() } else { "1".into() });
        assert_eq!(SharedSettings::decode(&ours.encode()), ours);
        assert_eq!(ours.differences(&ours), None);
        let theirs = SharedSettings::read(|name| if name == "databases" { "32".into() } else { "1".into() });
        assert_eq!(ours.differences(&theirs).unwrap(), "databases is 32 there and 16 here; every node needs the same values");
        let fewer = SharedSettings::decode("databases=16");
        assert!(ours.differences(&fewer).unwrap().contains("hll-sparse-max-bytes is unset there and 1 here"));
    }
}
