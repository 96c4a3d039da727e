//! `RAFT.CONFIG GET pattern [pattern ...]` and `RAFT.CONFIG SET name value [name value ...]`, in
//! the manner of Redis 7's CONFIG GET/SET. A SET is validated whole on a copy of the settings
//! first: an invalid value (or pair of values) changes nothing.

use crate::reply::Reply;
use crate::state;
use raftis_core::settings::Settings;

/// Changeable while running.
const RUNTIME: &[&str] = &[
    "consistency",
    "durability",
    "write-timeout",
    "tick-ms",
    "election-ticks",
    "heartbeat-ticks",
    "snapshot-threshold",
    "snapshot-log-size",
    "follower-proxy",
    "maxmemory",
    "max-entry-size",
];
/// Only as module arguments (they shape the node's identity or its log).
const LOAD_ONLY: &[&str] = &["dir", "raft-port", "node-id", "advertise-addr", "trailing-logs", "skip-entry", "raft-password"];

fn values(s: &Settings) -> Vec<(&'static str, String)> {
    vec![
        ("consistency", s.consistency.to_string()),
        ("durability", s.durability.to_string()),
        ("write-timeout", s.write_timeout.as_millis().to_string()),
        ("tick-ms", s.timing.tick_interval.as_millis().to_string()),
        ("election-ticks", s.timing.election_ticks.to_string()),
        ("heartbeat-ticks", s.timing.heartbeat_ticks.to_string()),
        ("snapshot-threshold", s.snapshot_threshold.to_string()),
        ("snapshot-log-size", s.snapshot_log_bytes.to_string()),
        ("trailing-logs", s.trailing_logs.to_string()),
        ("follower-proxy", if s.follower_proxy { "yes" } else { "no" }.to_string()),
        ("maxmemory", s.maxmemory.to_string()),
        ("max-entry-size", s.max_entry_bytes.to_string()),
        ("dir", s.dir.display().to_string()),
        ("raft-port", state::get().raft_addr.rsplit(':').next().unwrap_or_default().to_string()),
        // The id this node runs as; before it is in a cluster, the one asked for at load, if any.
        ("node-id", state::get().node().map(|n| n.status().id).or(s.node_id).map_or(String::new(), |n| n.to_string())),
        ("advertise-addr", state::get().client_addr.clone()),
        ("skip-entry", s.skip_entry.map_or(String::new(), |i| i.to_string())),
        // Whether there is one, never the password itself.
        ("raft-password", if s.raft_password.is_some() { "(set)" } else { "" }.to_string()),
    ]
}

pub fn config(args: &[Vec<u8>]) -> Result<Reply, String> {
    let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
    let sub = if args.len() > 1 { text(1).to_ascii_lowercase() } else { String::new() };
    let s = state::get();
    match sub.as_str() {
        "get" if args.len() >= 3 => {
            let patterns: Vec<String> = (2..args.len()).map(text).collect();
            // A map, as `CONFIG GET` answers in RESP3 (in RESP2, name and value after each other);
            // each setting once, however many patterns match it.
            let pairs = values(&s.settings()).into_iter().filter(|(k, _)| patterns.iter().any(|p| crate::glob::matches(p, k)));
            Ok(Reply::Map(pairs.map(|(k, v)| (Reply::bulk(k), Reply::bulk(v))).collect()))
        }
        "set" if args.len() >= 4 && args.len().is_multiple_of(2) => {
            let pairs: Vec<(String, String)> = (2..args.len()).step_by(2).map(|i| (text(i).to_ascii_lowercase(), text(i + 1))).collect();
            for (i, (name, _)) in pairs.iter().enumerate() {
                if LOAD_ONLY.contains(&name.as_str()) {
                    return Err(format!("ERR {name} can only be set as a module argument at load time"));
                }
                if !RUNTIME.contains(&name.as_str()) {
                    return Err(format!("ERR unknown setting '{name}' (runtime settings: {})", RUNTIME.join(", ")));
                }
                if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                    return Err(format!("ERR {name} is given more than once"));
                }
            }
            let _config = s.config_change.lock().unwrap_or_else(|p| p.into_inner());
            let before = s.settings();
            let mut next = before.clone();
            for (name, value) in &pairs {
                next.set(name, value).map_err(|e| format!("ERR {e}"))?;
            }
            // Checked once all are in, so that election-ticks and heartbeat-ticks can move together.
            next.check_ticks().map_err(|e| format!("ERR {e}"))?;
            if next.maxmemory != before.maxmemory {
                crate::memory::check_limit(next.maxmemory).map_err(|e| format!("ERR {e}"))?;
            }
            if let Some(node) = s.node() {
                push_to_node(&node, &before, &next)?;
            }
            for (name, _) in &pairs {
                match name.as_str() {
                    "consistency" => s.set_consistency(next.consistency),
                    "snapshot-threshold" => s.set_snapshot_threshold(next.snapshot_threshold),
                    "maxmemory" => s.set_maxmemory(next.maxmemory),
                    "snapshot-log-size" => s.set_snapshot_log_bytes(next.snapshot_log_bytes),
                    _ => {}
                }
            }
            *s.settings.write().unwrap_or_else(|p| p.into_inner()) = next;
            for (name, value) in &pairs {
                log::info!("RAFT.CONFIG SET {name} {value}");
            }
            Ok(Reply::ok())
        }
        "help" if args.len() == 2 => Ok(crate::help::of("RAFT.CONFIG")),
        "get" | "set" | "help" => Err(format!("ERR wrong number of arguments for 'raft.config|{sub}' command")),
        _ if args.len() < 2 => Err("ERR wrong number of arguments for 'raft.config' command".into()),
        _ => Err(format!(
            "ERR unknown subcommand '{}'. Try RAFT.CONFIG GET pattern [pattern ...] or RAFT.CONFIG SET name value [name value ...], or RAFT.CONFIG HELP.",
            text(1)
        )),
    }
}

/// Hands `node`, running on the settings `before`, those of `after` that differ and that it
/// reads itself. The tick counts go first: only raft can refuse them, and then nothing changes.
pub fn push_to_node(node: &state::RaftNode, before: &Settings, after: &Settings) -> Result<(), String> {
    let (was, now) = (&before.timing, &after.timing);
    if (was.election_ticks, was.heartbeat_ticks) != (now.election_ticks, now.heartbeat_ticks) {
        node.set_ticks(now.election_ticks, now.heartbeat_ticks).map_err(|e| format!("ERR {e}"))?;
    }
    if was.tick_interval != now.tick_interval {
        node.set_tick_interval(now.tick_interval);
    }
    if before.durability != after.durability {
        node.set_durability(after.durability);
    }
    if before.max_entry_bytes != after.max_entry_bytes {
        node.set_max_entry_bytes(after.max_entry_bytes);
    }
    if before.snapshot_log_bytes != after.snapshot_log_bytes {
        node.set_trailing_bytes(after.snapshot_log_bytes);
    }
    Ok(())
}
