//! The Redis settings a Raftis node depends on, held at load and against `CONFIG SET` later: each
//! of them, changed on one node, would make that node apply the log differently from the others,
//! or load a dataset the log then replays on top of.
//!
//! - `appendonly` stays `no` and `save` empty: the log is the source of truth, and Redis' own
//!   files would either be loaded under it or cost forks for nothing (a failed background save
//!   would also make that node refuse the writes of scripts, `MISCONF`).
//! - `maxmemory-policy` stays `noeviction`: eviction picks keys on each node independently.
//! - `maxmemory` stays 0: Raftis holds the limit itself (`maxmemory=` of the module; see
//!   `raftis_core::memory_limit`).
//! - `maxmemory-clients` stays 0 (or a percentage, of a `maxmemory` of 0): Redis evicts the
//!   biggest clients first, but only marks a protected one (a client whose replies the leader
//!   holds, see `held`) to be freed later, so its memory stays counted and Redis goes on to evict
//!   every other client. Measured: 21 idle connections evicted for one held `GET` of 6 MB.
//! - `min-replicas-to-write` stays 0: a Raftis node has no Redis replicas, so Redis would refuse
//!   every write, and on that node alone a script's.
//! - `port`, and the address of `bind` the side port listens on, keep the values they had at
//!   load: the others know this node's client address, and its side port listens there.
//! - the settings every node must share (`raftis_core::shared_settings`) keep their values:
//!   nodes compare them only when they connect.
//! - `sanitize-dump-payload` is `yes`, whatever the configuration says: `RESTORE` then checks a
//!   payload whole before it takes it. With Redis' default `no`, it takes a payload that is
//!   malformed inside, and a server crashes as soon as something reads the key; in a cluster every
//!   node applies the `RESTORE`, so all of them would crash, and again as they replay their log.
//!   The same value everywhere also makes every node take or refuse a payload alike.
//! - no command is renamed or disabled (`rename-command`): every node must be able to run every
//!   command of the log under its own name (a script's calls included), and the module calls
//!   some itself (`FLUSHALL` before loading a snapshot, `CONFIG`, `DEBUG SET-ACTIVE-EXPIRE`...).
//!   A write renamed on one node would also run there alone, past the log.

use crate::ffi::{self, RedisModuleCtx};
use raftis_core::settings::parse_size;
use raftis_core::shared_settings;
use std::sync::atomic::{AtomicU16, Ordering};

/// What `sanitize-dump-payload` is set to at load and must stay.
const SANITIZE_DUMP_PAYLOAD: &str = "yes";

/// The port Redis listened on at load: the one this node's client address names.
static PORT_AT_LOAD: AtomicU16 = AtomicU16::new(0);

/// The address of Redis' `bind` at load that the side port listens on (see
/// [`side_port_address`]); without `advertise-addr`, this node's client address names it.
static BIND_AT_LOAD: std::sync::Mutex<Option<Option<String>>> = std::sync::Mutex::new(None);

/// Records the port this node's client address (and `-MOVED` replies to it) was built from.
pub fn remember_port(port: u16) {
    PORT_AT_LOAD.store(port, Ordering::Relaxed);
}

/// The address of a `bind` value the side port listens on: its first that is `*` or an IP
/// address, without Redis' optional `-` (Redis also takes host names there); None if none is.
pub fn side_port_address(bind: &str) -> Option<&str> {
    bind.split_whitespace().map(|b| b.trim_start_matches('-')).find(|b| *b == "*" || b.parse::<std::net::IpAddr>().is_ok())
}

/// Records Redis' `bind` at load (see [`BIND_AT_LOAD`]).
pub fn remember_bind(bind: &str) {
    *BIND_AT_LOAD.lock().unwrap_or_else(|p| p.into_inner()) = Some(side_port_address(bind).map(str::to_string));
}

/// `bind` may change, but not the address the side port listens on: the others know this node
/// by it.
fn bind_refusal(value: &str) -> Option<String> {
    let at_load = BIND_AT_LOAD.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
    if side_port_address(value) == at_load.as_deref() {
        return None;
    }
    Some(format!(
        "this node's side port listens on {}, from its bind at load, and the cluster knows it there; restart it with the new bind instead",
        at_load.as_deref().unwrap_or("every address")
    ))
}

/// `port` may be set again to what it is, not changed: the other nodes, and the `-MOVED` replies
/// they give out, know this node by the address it had at load.
fn port_refusal(value: &str) -> Option<String> {
    let at_load = PORT_AT_LOAD.load(Ordering::Relaxed);
    if at_load == 0 || value.trim().parse::<u16>() == Ok(at_load) {
        return None;
    }
    Some(format!(
        "the cluster knows this node at port {at_load}; restart it with the new port instead (it tells the others its new address as it dials them)"
    ))
}

/// Why `value` cannot be given to `name` (lower case) on a Raftis node; None if it can.
fn refusal(name: &str, value: &str) -> Option<&'static str> {
    let value = value.trim();
    match name {
        "appendonly" if !value.eq_ignore_ascii_case("no") => Some("the Raft log is the source of truth; appendonly must stay 'no'"),
        "save" if !value.is_empty() => Some("the dataset is rebuilt from the Raft log (RAFT.SNAPSHOT snapshots it); save must stay empty"),
        "maxmemory-policy" if !value.eq_ignore_ascii_case("noeviction") => {
            Some("eviction would delete keys on one node only; maxmemory-policy must stay 'noeviction'")
        }
        // Anything but a plain 0: Redis multiplies a size by its unit without checking for
        // overflow, so `18014398509481985kb` is 1024 bytes to it.
        "maxmemory" if parse_size(value) != Some(0) => {
            Some("Raftis holds the memory limit itself, on the leader: give it to the module (maxmemory= at load, RAFT.CONFIG SET maxmemory at runtime); Redis' own must stay 0")
        }
        // A percentage is of Redis' `maxmemory`, which stays 0: no limit either.
        "maxmemory-clients" if !value.ends_with('%') && parse_size(value) != Some(0) => Some(
            "the leader protects a client while it holds its replies, and Redis cannot evict a protected client: \
             it would evict every other client instead; maxmemory-clients must stay 0",
        ),
        "min-replicas-to-write" | "min-slaves-to-write" if value.parse::<i64>() != Ok(0) => {
            Some("a Raftis node has no Redis replicas; min-replicas-to-write must stay 0")
        }
        "sanitize-dump-payload" if !value.eq_ignore_ascii_case(SANITIZE_DUMP_PAYLOAD) => Some(
            "RESTORE must check a payload whole on every node, or a malformed one would crash them all; \
             sanitize-dump-payload must stay 'yes'",
        ),
        _ if shared_settings::NAMES.contains(&name) => Some(
            "every node must have the same value (they compare them when they connect): set it in every node's \
             configuration and restart them one at a time",
        ),
        _ => None,
    }
}

/// Refuses to load when `rename-command` renamed or disabled any of Redis' commands. `ACL CAT`
/// lists Redis' original command table, `COMMAND INFO` looks names up in the current one.
pub fn check_commands_at_load(ctx: *mut RedisModuleCtx) -> anyhow::Result<()> {
    const ADVICE: &str = "rename-command cannot be used with Raftis: every node must run every command of the log \
                          alike, and the module calls some itself; restrict commands with ACL rules instead \
                          (ACL SETUSER default -flushall -keys, say)";
    let mut names = std::collections::BTreeSet::new();
    for category in ["fast", "slow"] {
        let reply = ffi::call_strs(ctx, &["ACL", "CAT", category]);
        let listed = ffi::is_array(reply);
        for i in 0..if listed { ffi::reply_len(reply) } else { 0 } {
            let name = String::from_utf8_lossy(ffi::reply_bytes(ffi::reply_element(reply, i))).to_ascii_lowercase();
            if !name.contains('|') {
                names.insert(name);
            }
        }
        ffi::free_call_reply(reply);
        anyhow::ensure!(listed, "ACL CAT does not answer, so Redis' commands cannot be checked: {ADVICE}");
    }
    let mut argv = vec!["COMMAND", "INFO"];
    argv.extend(names.iter().map(String::as_str));
    let reply = ffi::call_strs(ctx, &argv);
    let answered = ffi::is_array(reply) && ffi::reply_len(reply) == names.len();
    let missing: Vec<String> = match answered {
        true => {
            names.iter().enumerate().filter(|(i, _)| !ffi::is_array(ffi::reply_element(reply, *i))).map(|(_, n)| n.to_uppercase()).collect()
        }
        false => Vec::new(),
    };
    ffi::free_call_reply(reply);
    anyhow::ensure!(answered, "COMMAND INFO does not answer, so Redis' commands cannot be checked: {ADVICE}");
    anyhow::ensure!(missing.is_empty(), "{} renamed or disabled here: {ADVICE}", missing.join(", "));
    Ok(())
}

/// At load: Redis' settings as Raftis needs them, or the reason the module cannot load.
pub fn check_at_load(ctx: *mut RedisModuleCtx) -> anyhow::Result<()> {
    // RDB snapshots are pointless (the dataset is rebuilt from the log) and cost forks.
    ffi::free_call_reply(ffi::call_strs(ctx, &["CONFIG", "SET", "save", ""]));
    let sanitize = ffi::config_get(ctx, "sanitize-dump-payload").unwrap_or_default();
    if !sanitize.eq_ignore_ascii_case(SANITIZE_DUMP_PAYLOAD) {
        let set = ffi::call_strs(ctx, &["CONFIG", "SET", "sanitize-dump-payload", SANITIZE_DUMP_PAYLOAD]);
        let failed = ffi::is_error(set);
        ffi::free_call_reply(set);
        anyhow::ensure!(!failed, "sanitize-dump-payload is '{sanitize}' and cannot be set to 'yes'");
        log::info!("sanitize-dump-payload set to 'yes' (it was '{sanitize}'): RESTORE checks a payload whole on every node");
    }
    for name in
        ["appendonly", "save", "maxmemory-policy", "maxmemory", "maxmemory-clients", "min-replicas-to-write", "sanitize-dump-payload"]
    {
        let value = ffi::config_get(ctx, name).unwrap_or_default();
        if let Some(why) = refusal(name, &value) {
            anyhow::bail!("{name} is '{value}': {why}");
        }
    }
    // REPLICAOF is refused to clients, but a configuration file can still name a master.
    let master = ffi::config_get(ctx, "replicaof").unwrap_or_default();
    anyhow::ensure!(
        master.trim().is_empty(),
        "replicaof is '{master}': a Redis replica's master replaces its dataset (a full sync) behind the log's back; \
         remove replicaof from this node's configuration"
    );
    Ok(())
}

/// `CONFIG SET name value [name value ...]` (`argv` as the client sent it): the error that
/// refuses it whole, as Redis refuses a `CONFIG SET` with one bad pair; None to let Redis run it.
pub fn refuse_config_set(argv: &[&[u8]]) -> Option<String> {
    let is_set = argv.len() >= 2 && argv[0].eq_ignore_ascii_case(b"config") && argv[1].eq_ignore_ascii_case(b"set");
    if !is_set {
        return None;
    }
    argv[2..].chunks_exact(2).find_map(|pair| {
        let name = String::from_utf8_lossy(pair[0]).to_ascii_lowercase();
        let value = String::from_utf8_lossy(pair[1]);
        let why = match name.as_str() {
            "port" => port_refusal(&value)?,
            "bind" => bind_refusal(&value)?,
            _ => refusal(&name, &value)?.to_string(),
        };
        Some(format!("ERR CONFIG SET failed (possibly related to argument '{name}') - {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: &[&str]) -> Option<String> {
        refuse_config_set(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())
    }

    #[test]
    fn settings_the_log_depends_on_cannot_change() {
        assert!(refused(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]).unwrap().contains("'maxmemory-policy'"));
        assert!(refused(&["config", "set", "appendonly", "YES"]).is_some());
        assert!(refused(&["CONFIG", "SET", "save", "3600 1"]).is_some());
        assert!(refused(&["CONFIG", "SET", "maxmemory", "1gb"]).unwrap().contains("RAFT.CONFIG SET maxmemory"));
        assert!(refused(&["CONFIG", "SET", "min-slaves-to-write", "1"]).is_some());
        assert!(refused(&["CONFIG", "SET", "sanitize-dump-payload", "no"]).unwrap().contains("RESTORE"));
        assert!(refused(&["CONFIG", "SET", "sanitize-dump-payload", "clients"]).is_some());
        assert!(refused(&["CONFIG", "SET", "sanitize-dump-payload", "YES"]).is_none());
        // Redis' unit multiplication wraps: this is 1024 bytes to it.
        assert!(refused(&["CONFIG", "SET", "maxmemory", "18014398509481985kb"]).is_some());
        assert!(refused(&["CONFIG", "SET", "maxmemory", "18446744073709551616"]).is_some());
        assert!(refused(&["CONFIG", "SET", "maxmemory", "lots"]).is_some());
        assert!(refused(&["CONFIG", "SET", "hz", "20", "MAXMEMORY-POLICY", "volatile-ttl"]).is_some(), "any pair refuses all");
        assert!(refused(&["CONFIG", "SET", "maxmemory-clients", "4mb"]).unwrap().contains("protected"));
        assert!(refused(&["CONFIG", "SET", "maxmemory-clients", "1"]).is_some());
    }

    #[test]
    fn the_port_the_cluster_knows_may_be_set_again_but_not_changed() {
        remember_port(7002);
        assert_eq!(refused(&["CONFIG", "SET", "port", "7002"]), None);
        let err = refused(&["CONFIG", "SET", "hz", "20", "PORT", "7005"]).unwrap();
        assert!(err.contains("'port'") && err.contains("port 7002"), "{err}");
    }

    #[test]
    fn the_side_ports_bind_address_stays() {
        remember_bind("localhost -127.0.0.1 -::1");
        assert_eq!(refused(&["CONFIG", "SET", "bind", "127.0.0.1 10.0.0.5"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "bind", "-127.0.0.1"]), None);
        let err = refused(&["CONFIG", "SET", "bind", "10.0.0.5 127.0.0.1"]).unwrap();
        assert!(err.contains("'bind'") && err.contains("listens on 127.0.0.1"), "{err}");
        assert_eq!(side_port_address("* -::*"), Some("*"));
        assert_eq!(side_port_address("localhost"), None);
    }

    #[test]
    fn harmless_values_and_other_settings_pass() {
        assert_eq!(refused(&["CONFIG", "SET", "maxmemory-policy", "NoEviction"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "appendonly", "no"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "save", ""]), None);
        assert_eq!(refused(&["CONFIG", "SET", "maxmemory", "0mb"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "maxmemory-clients", "0"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "maxmemory-clients", "10%"]), None, "of a maxmemory of 0: no limit");
        assert_eq!(refused(&["CONFIG", "SET", "min-replicas-to-write", "0"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "hz", "20"]), None);
        assert_eq!(refused(&["CONFIG", "GET", "maxmemory-policy"]), None);
        assert_eq!(refused(&["CONFIG", "SET", "appendonly"]), None, "a missing value is Redis' to answer");
    }
}
