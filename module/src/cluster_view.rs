//! `RAFT._CLUSTER`: the Redis Cluster commands a cluster-aware client asks, answered with the
//! map of `raftis_core::cluster_view` (one shard, the leader its master). Plain Redis answers
//! them `-ERR This instance has cluster support disabled`, and such a client then gives up. The
//! subcommands that manage a Redis Cluster's slots and nodes are refused with what does their
//! job here.
//! `READONLY` and `READWRITE` answer `+OK`; what a follower serves is still the node's
//! `consistency` (see `replica_reads`). `CLUSTER KEYSLOT` answers as Redis Cluster does, and
//! [`slot_of`] gives the slot a `-MOVED` names.
//!
//! Some clients (redis-py before 5) also read `cluster_enabled` in `INFO` before they ask for
//! the map, and refuse a server that says 0, which Redis always says here (its own cluster mode
//! must stay off: Raftis routes the commands). So an `INFO` that shows the Cluster section goes
//! to [`INFO_COMMAND`], which runs Redis' own and says 1 instead.

use crate::ffi::{self, CommandKeys, RedisModuleCtx};
use crate::reply::Reply;
use crate::state;
use raftis_core::cluster_view::{self, ClusterNode, ClusterView, HashSlot, SLOTS};
use raftis_core::routing::KeyPositions;
use raftis_core::status::Status;
use raftis_core::LogIndex;

pub const CLUSTER_COMMAND: &str = "raft._cluster";
pub const INFO_COMMAND: &str = "raft._info";

/// The slot a `-MOVED` for `argv` names: that of its first key, as in Redis Cluster (where every
/// key of a command shares one slot), or [`HashSlot::NO_KEY`]. Main thread only: Redis finds the
/// keys of commands like `EVAL` from their arguments.
pub fn slot_of(ctx: *mut RedisModuleCtx, argv: &[impl AsRef<[u8]>]) -> HashSlot {
    let refs: Vec<&[u8]> = argv.iter().map(AsRef::as_ref).collect();
    if refs.is_empty() {
        return HashSlot::NO_KEY;
    }
    let first = match state::get().key_positions(&refs) {
        KeyPositions::At(positions) => positions.first().copied(),
        KeyPositions::AskRedis => CommandKeys::of(ctx, &refs).positions().first().copied(),
    };
    first.and_then(|i| refs.get(i)).map_or(HashSlot::NO_KEY, |key| HashSlot::of_key(key))
}

/// The slot for a batch of commands (a transaction): that of the first with a key.
pub fn slot_of_first(ctx: *mut RedisModuleCtx, commands: &[(u32, Vec<Vec<u8>>)]) -> HashSlot {
    commands.iter().map(|(_, argv)| slot_of(ctx, argv)).find(|slot| *slot != HashSlot::NO_KEY).unwrap_or(HashSlot::NO_KEY)
}

/// Whether the filter hands `argv` to [`CLUSTER_COMMAND`]: every `CLUSTER` subcommand (those
/// Raftis does not answer get an error saying why, rather than Redis' `cluster support
/// disabled`, which contradicts `CLUSTER INFO`), `READONLY` and `READWRITE`. A bare `CLUSTER`
/// is Redis' to refuse.
pub fn answers(argv: &[&[u8]]) -> bool {
    let is = |i: usize, word: &str| argv.get(i).is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()));
    match argv.len() {
        1 => is(0, "readonly") || is(0, "readwrite"),
        2.. => is(0, "cluster"),
        _ => false,
    }
}

/// What `CLUSTER HELP` lists.
const HELP: &[&str] = &[
    "CLUSTER <subcommand> [<arg> ...]. Raftis answers as a Redis Cluster of one shard that owns every slot, led by the Raft leader:",
    "INFO",
    "    State of the cluster: ok, or fail while no leader is known.",
    "KEYSLOT <key>",
    "    The hash slot of <key>.",
    "MYID",
    "    This node's id: its Raft node id in 40 hex digits.",
    "NODES",
    "    The map in Redis Cluster's text format; the leader is the master.",
    "SHARDS",
    "    The map as Redis 7 gives it.",
    "SLOTS",
    "    The map as slot ranges.",
    "HELP",
    "    This text.",
    "Members are added and removed with RAFT.CLUSTER JOIN, RAFT.ADDPEER and RAFT.REMOVEPEER, and leadership moved with RAFT.TRANSFERLEADER.",
];

/// Why Raftis does not run the Redis Cluster subcommand `sub` (`given` by the client, in any
/// case), with what does the job here.
fn refusal(sub: &str, given: &str) -> String {
    let upper = sub.to_ascii_uppercase();
    let instead = match sub {
        "failover" => "leadership moves with RAFT.TRANSFERLEADER [node-id] on the leader",
        "meet" | "forget" | "replicate" | "reset" => "members change with RAFT.CLUSTER JOIN, RAFT.ADDPEER and RAFT.REMOVEPEER",
        "countkeysinslot" | "getkeysinslot" => {
            "every slot is in the one shard, where Redis keeps no index of keys by slot: DBSIZE counts the keys and SCAN lists them"
        }
        "addslots"
        | "addslotsrange"
        | "delslots"
        | "delslotsrange"
        | "flushslots"
        | "setslot"
        | "bumpepoch"
        | "set-config-epoch"
        | "saveconfig"
        | "count-failure-reports"
        | "links"
        | "replicas"
        | "slaves" => {
            "Raftis answers as a Redis Cluster of one shard that owns every slot; it has no slots to move, epochs to set, \
             cluster bus links or replication of its own to show (RAFT.INFO shows each member's)"
        }
        _ => return format!("ERR unknown subcommand '{given}'. Try CLUSTER HELP."),
    };
    format!("ERR CLUSTER {upper} is not supported by Raftis: {instead}")
}

/// Whether the `INFO` of `argv` shows the Cluster section, so the filter hands it to
/// [`INFO_COMMAND`]. Other sections stay Redis' own business.
pub fn info_shows_cluster(argv: &[&[u8]]) -> bool {
    const WITH_CLUSTER: [&[u8]; 4] = [b"default", b"all", b"everything", b"cluster"];
    let Some((name, sections)) = argv.split_first() else { return false };
    name.eq_ignore_ascii_case(b"info")
        && (sections.is_empty() || sections.iter().any(|s| WITH_CLUSTER.iter().any(|w| s.eq_ignore_ascii_case(w))))
}

/// `RAFT._INFO INFO [section ...]`: Redis' own `INFO`, with `cluster_enabled:1`.
pub fn info(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<Reply, String> {
    if !args.get(1..).is_some_and(info_shows_cluster) {
        return Err("ERR RAFT._INFO only takes an INFO that shows the Cluster section (it is used internally)".into());
    }
    let reply = ffi::call(ctx, &args[1..], false);
    if reply.is_null() {
        return Err("ERR INFO could not be run".into());
    }
    let text = ffi::reply_bytes(reply).to_vec();
    let failed = ffi::is_error(reply);
    ffi::free_call_reply(reply);
    if failed {
        return Err(String::from_utf8_lossy(&text).into_owned());
    }
    Ok(Reply::Verbatim(with_cluster_enabled(text)))
}

/// INFO's text with its Cluster section's `cluster_enabled:0` made 1.
fn with_cluster_enabled(mut text: Vec<u8>) -> Vec<u8> {
    const DISABLED: &[u8] = b"# Cluster\r\ncluster_enabled:0\r\n";
    if let Some(at) = text.windows(DISABLED.len()).position(|w| w == DISABLED) {
        text[at + DISABLED.len() - 3] = b'1';
    }
    text
}

/// `args` is `RAFT._CLUSTER` followed by what the client sent.
pub fn cluster(ctx: *mut RedisModuleCtx, args: &[&[u8]]) -> Result<Reply, String> {
    if !answers(&args[1..]) {
        return Err("ERR RAFT._CLUSTER only takes CLUSTER <subcommand>, READONLY or READWRITE (it is used internally)".into());
    }
    let name = String::from_utf8_lossy(args[1]).to_ascii_lowercase();
    if name == "readonly" || name == "readwrite" {
        crate::replica_reads::set(ctx, name == "readonly");
        return Ok(Reply::ok());
    }
    let given = String::from_utf8_lossy(args[2]);
    let sub = given.to_ascii_lowercase();
    let wanted_args = match sub.as_str() {
        "keyslot" => 1,
        "slots" | "shards" | "nodes" | "myid" | "info" | "help" => 0,
        _ => return Err(refusal(&sub, &given)),
    };
    if args.len() != 3 + wanted_args {
        return Err(format!("ERR wrong number of arguments for 'cluster|{sub}' command"));
    }
    match sub.as_str() {
        // Needs no cluster: the slot depends on the key alone.
        "keyslot" => return Ok(Reply::Integer(HashSlot::of_key(args[3]).0.into())),
        "help" => return Ok(Reply::Array(HELP.iter().map(|line| Reply::Simple(line.to_string())).collect())),
        _ => {}
    }
    let s = state::get();
    let node = s.node().ok_or_else(crate::write::not_initialized)?;
    s.refuse_if_stopped()?;
    let st = node.status();
    let failed_after = st.failed_after();
    let view = ClusterView::new(&st, failed_after);
    let no_leader = || state::NO_LEADER.to_string();
    match sub.as_str() {
        "myid" => Ok(Reply::bulk(cluster_view::node_name(st.id))),
        "info" => Ok(Reply::Verbatim(cluster_view::info_text(view.as_ref(), st.voters.len(), st.term).into_bytes())),
        "nodes" => Ok(Reply::Verbatim(view.ok_or_else(no_leader)?.nodes_text().into_bytes())),
        "slots" => {
            let view = view.ok_or_else(no_leader)?;
            // Redis 7.0's four fields: the last one, a map of the node's other endpoints, is
            // empty (every node is known by its IP address only).
            let entry = |n: &ClusterNode| {
                Reply::Array(vec![
                    Reply::bulk(n.host.clone()),
                    Reply::Integer(n.port.into()),
                    Reply::bulk(n.name.clone()),
                    Reply::Map(Vec::new()),
                ])
            };
            let mut range = vec![Reply::Integer(0), Reply::Integer(i64::from(SLOTS) - 1), entry(&view.leader)];
            range.extend(view.live_replicas().map(entry));
            Ok(Reply::Array(vec![Reply::Array(range)]))
        }
        "shards" => Ok(shards(&view.ok_or_else(no_leader)?, &st)),
        _ => Err(format!("ERR unknown subcommand '{sub}'")),
    }
}

/// `CLUSTER SHARDS`, Redis 7's form of the map, as this node (of status `st`) knows it.
fn shards(view: &ClusterView, st: &Status) -> Reply {
    // How far each node has the log, as far as this node knows: its own applied index, the
    // leader's commit index, and on the leader its followers' matched index (else 0).
    let offset = |n: &ClusterNode| {
        let index = match st.progress_of(n.id) {
            _ if n.myself => st.applied,
            _ if Some(n.id) == st.leader => st.commit,
            Some(progress) => progress.matched,
            None => LogIndex(0),
        };
        Reply::Integer(index.0 as i64)
    };
    let node = |n: &ClusterNode, role: &str| {
        let field = |name: &str, value: Reply| (Reply::bulk(name), value);
        Reply::Map(vec![
            field("id", Reply::bulk(n.name.clone())),
            field("port", Reply::Integer(n.port.into())),
            field("ip", Reply::bulk(n.host.clone())),
            field("endpoint", Reply::bulk(n.host.clone())),
            field("role", Reply::bulk(role)),
            field("replication-offset", offset(n)),
            field("health", Reply::bulk(n.health.as_str())),
        ])
    };
    let mut nodes = vec![node(&view.leader, "master")];
    nodes.extend(view.replicas.iter().map(|n| node(n, "replica")));
    let shard = Reply::Map(vec![
        (Reply::bulk("slots"), Reply::Array(vec![Reply::Integer(0), Reply::Integer(i64::from(SLOTS) - 1)])),
        (Reply::bulk("nodes"), Reply::Array(nodes)),
    ]);
    Reply::Array(vec![shard])
}
