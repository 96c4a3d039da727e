//! `RAFT.HELP`, and `HELP` of the `RAFT.*` commands that have subcommands: what each command does,
//! in the shape of Redis' own `CONFIG HELP` (a syntax line, then its description indented), so an
//! operator at `redis-cli` need not open the README to recall a command's arguments.

use crate::reply::Reply;

/// `(syntax, description)` of every operator command, in the README's order.
const COMMANDS: &[(&str, &str)] = &[
    ("RAFT.CLUSTER INIT [KEEPDATA]", "Make this node the only member of a new cluster (KEEPDATA: its keys become the dataset)."),
    ("RAFT.CLUSTER JOIN <host:port> [<host:port> ...]", "Join the cluster of those nodes; answers once this node is a voter."),
    ("RAFT.CLUSTER RECOVER", "Make this survivor of a cluster that lost its majority for good its only voter."),
    ("RAFT.ADDPEER <host:port>", "On the leader: add the empty node at that client address; answers its id."),
    ("RAFT.REMOVEPEER <node-id|host:port>", "On the leader: remove that member."),
    ("RAFT.TRANSFERLEADER [<node-id|host:port>]", "On the leader: hand leadership to that voter (default: the most up-to-date one)."),
    ("RAFT.PEERS", "One entry per member: id, role, client and side-port addresses, match index, replication state."),
    ("RAFT.LEADER", "The leader's id and client address."),
    ("RAFT.STATE", "This node's role: leader, follower, candidate, pre-candidate, learner, stopped or uninitialized."),
    ("RAFT.INFO [<pattern> ...]", "This node's state as INFO-style lines (only the fields matching the patterns)."),
    ("RAFT.STATS [<pattern> ...]", "This node's counters as INFO-style lines (only the fields matching the patterns)."),
    ("RAFT.SNAPSHOT", "Take a snapshot of the dataset now; answers its log index and size once it is on disk."),
    (
        "RAFT.DIGEST",
        "Applied index, key count and a fingerprint of the whole dataset (expiry times and stream groups included), to compare nodes.",
    ),
    ("RAFT.CONFIG GET <pattern> [<pattern> ...]", "The module settings matching any of the glob-style patterns, and their values."),
    ("RAFT.CONFIG SET <name> <value> [<name> <value> ...]", "Change module settings at runtime: all of them, or none if one is invalid."),
    ("RAFT.HELP", "Print this help."),
];

/// The help lines of the commands whose syntax starts with `prefix` (all of them for `RAFT.`).
fn lines(title: &str, prefix: &str) -> Reply {
    let mut lines = vec![Reply::Simple(title.into())];
    for (syntax, description) in COMMANDS.iter().filter(|(syntax, _)| syntax.starts_with(prefix)) {
        lines.push(Reply::Simple((*syntax).into()));
        lines.push(Reply::Simple(format!("    {description}")));
    }
    Reply::Array(lines)
}

/// `RAFT.HELP`.
pub fn all() -> Reply {
    lines("RAFT.<command> [<arg> ...]. Commands are:", "RAFT.")
}

/// `<command> HELP` of a command with subcommands (`RAFT.CLUSTER`, `RAFT.CONFIG`).
pub fn of(command: &str) -> Reply {
    lines(&format!("{command} <subcommand> [<arg> ...]. Subcommands are:"), &format!("{command} "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(reply: Reply) -> Vec<String> {
        let Reply::Array(lines) = reply else { panic!("not an array") };
        lines.into_iter().map(|l| if let Reply::Simple(s) = l { s } else { panic!("not a simple string") }).collect()
    }

    #[test]
    fn help_pairs_each_syntax_with_its_indented_description() {
        let all = texts(all());
        assert_eq!(all.len(), 1 + 2 * COMMANDS.len());
        assert!(all[1..].chunks(2).all(|pair| pair[0].starts_with("RAFT.") && pair[1].starts_with("    ")));
        // A simple string may not hold a line break.
        assert!(all.iter().all(|l| !l.contains(['\r', '\n'])));
    }

    #[test]
    fn a_commands_help_lists_only_its_subcommands() {
        let cluster = texts(of("RAFT.CLUSTER"));
        assert_eq!(cluster[0], "RAFT.CLUSTER <subcommand> [<arg> ...]. Subcommands are:");
        assert_eq!(cluster.len(), 1 + 2 * 3);
        assert!(texts(of("RAFT.CONFIG"))[1..].iter().step_by(2).all(|l| l.starts_with("RAFT.CONFIG ")));
    }
}
