//! The operator's `RAFT.*` commands and the internal ones nodes send each other. Reply formats are
//! documented in the README.

use crate::blocked::Blocked;
use crate::cluster_ops;
use crate::ffi::{self, RedisModuleCtx};
use crate::peer_user;
use crate::reply::Reply;
use crate::state::{self, Raftis, Start};
use crate::write::not_initialized;
use raftis_core::cluster_view::HashSlot;
use raftis_core::health_report;
use raftis_core::membership::NodeInfo;
use raftis_core::shared_settings::SharedSettings;
use raftis_core::status::Status;
use raftis_core::NodeId;
use std::fmt::Write as _;

type Result = std::result::Result<Reply, String>;

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

fn wrong_args(cmd: &str) -> String {
    format!("ERR wrong number of arguments for '{cmd}' command")
}

fn valid_addr(addr: &str) -> std::result::Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(format!("ERR invalid address '{addr}', expected host:port")),
    }
}

/// True when the node already belongs to a cluster (as voter or learner).
fn is_member(s: &Raftis) -> bool {
    s.node().is_some_and(|n| {
        let st = n.status();
        st.voters.contains(&st.id) || st.learners.contains(&st.id)
    })
}

/// True when the node already votes in a cluster. A learner may be added again: a join that
/// failed after making it one (a catch-up past the timeout, a leader change) left it there, and
/// adding it again goes on from that step.
fn is_voter(s: &Raftis) -> bool {
    s.node().is_some_and(|n| {
        let st = n.status();
        st.voters.contains(&st.id)
    })
}

const INIT: &str = "RAFT.CLUSTER INIT";

/// A node that is in no cluster yet may still hold keys: Redis loads its own dump file at start
/// (clients cannot write before the node is in a cluster). Creating or joining a cluster replaces
/// the dataset with the log's, so `action` is refused rather than let them vanish unasked, as
/// Redis Cluster refuses to add a node that holds keys.
fn refuse_if_holding_keys(ctx: *mut RedisModuleCtx, s: &Raftis, action: &str) -> std::result::Result<(), String> {
    if s.node().is_some() || s.store.is_initialized() {
        return Ok(());
    }
    let held = data_held(ctx)?;
    if held.is_empty() {
        return Ok(());
    }
    let keep = if action == INIT {
        "RAFT.CLUSTER INIT KEEPDATA to make them the new cluster's dataset"
    } else {
        "copy them into the cluster through its leader (scripts/import, and FUNCTION DUMP / FUNCTION RESTORE)"
    };
    Err(format!(
        "ERR this node holds {held}, which Redis loaded from its own files, and {action} would discard them: \
         restart it without them (move its dump file out of Redis' dir), or, to keep them, {keep}"
    ))
}

/// What a node in no cluster yet holds: keys, and function libraries (a dump file holds both).
struct DataHeld {
    keys: u64,
    libraries: usize,
}

impl DataHeld {
    fn is_empty(&self) -> bool {
        self.keys == 0 && self.libraries == 0
    }
}

impl std::fmt::Display for DataHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.keys, self.libraries) {
            (keys, 0) => write!(f, "{keys} keys"),
            (0, libraries) => write!(f, "{libraries} function libraries"),
            (keys, libraries) => write!(f, "{keys} keys and {libraries} function libraries"),
        }
    }
}

fn data_held(ctx: *mut RedisModuleCtx) -> std::result::Result<DataHeld, String> {
    let keys = keys_held(ctx).ok_or("ERR cannot count the keys this node holds: INFO keyspace failed")?;
    let list = ffi::call_strs(ctx, &["FUNCTION", "LIST"]);
    let libraries = ffi::is_array(list).then(|| ffi::reply_len(list));
    ffi::free_call_reply(list);
    let libraries = libraries.ok_or("ERR cannot count the function libraries this node holds: FUNCTION LIST failed")?;
    Ok(DataHeld { keys, libraries })
}

/// How many keys the node holds, in every database (`INFO keyspace`).
fn keys_held(ctx: *mut RedisModuleCtx) -> Option<u64> {
    let reply = ffi::call_strs(ctx, &["INFO", "keyspace"]);
    if reply.is_null() {
        return None;
    }
    let text = String::from_utf8_lossy(ffi::reply_bytes(reply)).into_owned();
    ffi::free_call_reply(reply);
    Some(keys_in_keyspace(&text))
}

/// The keys `INFO keyspace` counts: `db0:keys=3,expires=0,avg_ttl=0` lines, added up.
fn keys_in_keyspace(info: &str) -> u64 {
    info.lines()
        .filter(|line| line.starts_with("db"))
        .filter_map(|line| line.split_once(":keys=")?.1.split(',').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// Starts an empty node that a leader can add, reusing the id of an earlier attempt.
fn start_joining_node(s: &Raftis) -> std::result::Result<NodeId, String> {
    if let Some(node) = s.node() {
        return Ok(node.status().id);
    }
    let id = match s.stored_node_id().map_err(|e| format!("ERR {e:#}"))? {
        Some(id) => id,
        None => s.settings().node_id.unwrap_or_else(|| NodeId(rand::random::<u32>() as u64 + 1)),
    };
    s.start_node(id, Start::AsIs).map_err(|e| format!("ERR cannot start the raft node: {e:#}"))?;
    Ok(id)
}

/// `RAFT.CLUSTER INIT` | `RAFT.CLUSTER JOIN host:port [host:port ...]` | `RAFT.CLUSTER RECOVER`
pub fn cluster(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    let s = state::get();
    let sub = args.get(1).map(|a| text(a).to_ascii_lowercase()).unwrap_or_default();
    if matches!(sub.as_str(), "init" | "join" | "recover") {
        // Its Raft loop is gone for good (a removed node, a failed disk): it can neither lead a
        // new cluster nor catch up with one.
        s.refuse_if_stopped()?;
    }
    match sub.as_str() {
        "init" if args.len() == 2 || (args.len() == 3 && args[2].eq_ignore_ascii_case(b"keepdata")) => {
            if is_member(s) || s.store.is_initialized() {
                return Err("ERR this node already belongs to a cluster".into());
            }
            if s.node().is_some() {
                // A JOIN (or an ADDPEER of this node) started its Raft node, waiting to be added;
                // one that failed may still be finished by the cluster it asked.
                return Err("ERR this node is waiting to be added to a cluster (by RAFT.CLUSTER JOIN or RAFT.ADDPEER): \
                            JOIN again, or restart it to start a new cluster with INIT"
                    .into());
            }
            let id = s.settings().node_id.unwrap_or(NodeId(1));
            if args.len() == 2 {
                refuse_if_holding_keys(ctx, s, INIT)?;
            } else {
                let held = data_held(ctx)?;
                // With nothing to keep, it is an INIT like any other.
                if !held.is_empty() {
                    refuse_in_transaction(ctx, "RAFT.CLUSTER INIT KEEPDATA")?;
                    log::info!("RAFT.CLUSTER INIT KEEPDATA: writing the {held} Redis loaded into the first snapshot");
                    let blocked = Blocked::new(ctx, std::time::Duration::from_secs(3600));
                    s.snapshots.seed(ctx, &crate::cluster_ops::seed_point(s.info(id)), blocked);
                    return Ok(Reply::Blocked);
                }
            }
            s.start_node(id, Start::NewCluster).map_err(|e| format!("ERR cannot create the cluster: {e:#}"))?;
            log::info!("created a new cluster with node {id} as its first member");
            Ok(Reply::ok())
        }
        "join" if args.len() >= 3 => {
            refuse_in_transaction(ctx, "RAFT.CLUSTER JOIN")?;
            if is_voter(s) {
                return Err("ERR this node already belongs to a cluster".into());
            }
            let seeds: Vec<String> = args[2..].iter().map(|a| text(a)).collect();
            for seed in &seeds {
                valid_addr(seed)?;
            }
            refuse_if_holding_keys(ctx, s, "joining a cluster")?;
            let id = start_joining_node(s)?;
            let me = s.info(id);
            let blocked = Blocked::new(ctx, cluster_ops::JOIN_TIMEOUT + std::time::Duration::from_secs(5));
            cluster_ops::in_background(blocked, "raft-join", move || cluster_ops::join(seeds, me));
            Ok(Reply::Blocked)
        }
        "recover" if args.len() == 2 => {
            refuse_in_transaction(ctx, "RAFT.CLUSTER RECOVER")?;
            let node = s.node().filter(|_| is_member(s)).ok_or("ERR this node is not part of a cluster: there is nothing to recover")?;
            let blocked = Blocked::new(ctx, cluster_ops::RECOVER_TIMEOUT + std::time::Duration::from_secs(5));
            cluster_ops::in_background(blocked, "raft-recover", move || cluster_ops::recover(node));
            Ok(Reply::Blocked)
        }
        "init" if args.len() == 3 => {
            Err(format!("ERR syntax error: RAFT.CLUSTER INIT takes KEEPDATA or nothing, not '{}'", text(&args[2])))
        }
        "help" if args.len() == 2 => Ok(crate::help::of("RAFT.CLUSTER")),
        "init" | "join" | "recover" | "help" => Err(wrong_args(&format!("raft.cluster|{sub}"))),
        _ if args.len() < 2 => Err(wrong_args("raft.cluster")),
        _ => Err(format!(
            "ERR unknown subcommand '{}'. Try RAFT.CLUSTER INIT [KEEPDATA], RAFT.CLUSTER JOIN host:port [host:port ...] \
             or RAFT.CLUSTER RECOVER (RAFT.CLUSTER HELP describes them).",
            text(&args[1])
        )),
    }
}

/// The commands that block their client until they are done cannot block inside EXEC: Redis
/// would answer an error while the work went on. They are refused there before they start.
fn refuse_in_transaction(ctx: *mut RedisModuleCtx, name: &str) -> std::result::Result<(), String> {
    if crate::transaction::in_exec(ctx) {
        return Err(format!("ERR {name} cannot run inside MULTI: it blocks until it is done"));
    }
    Ok(())
}

fn leader_node(s: &Raftis) -> std::result::Result<std::sync::Arc<state::RaftNode>, String> {
    let node = s.node().ok_or_else(not_initialized)?;
    let status = node.status();
    if !status.is_leader() {
        return Err(state::redirect(&status, HashSlot::NO_KEY));
    }
    Ok(node)
}

/// `RAFT._JOIN id raft-addr client-addr [settings]` (sent by a joining node to the leader; the
/// settings every node must share, see `raftis_core::shared_settings`).
pub fn internal_join(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if !(4..=5).contains(&args.len()) {
        return Err(wrong_args("raft._join"));
    }
    refuse_in_transaction(ctx, "RAFT._JOIN")?;
    peer_user::require_peer(ctx, "joining it")?;
    let id = text(&args[1]).parse::<u64>().ok().filter(|v| *v > 0).ok_or("ERR invalid node id")?;
    let (raft_addr, client_addr) = (text(&args[2]), text(&args[3]));
    valid_addr(&raft_addr)?;
    valid_addr(&client_addr)?;
    let node = leader_node(state::get())?;
    if let Some(theirs) = args.get(4) {
        if let Some(differ) = state::get().shared.differences(&SharedSettings::decode(&text(theirs))) {
            return Err(format!("ERR the joining node's Redis settings differ from this cluster's: {differ}"));
        }
    }
    let info = NodeInfo { id: NodeId(id), raft_addr, client_addr };
    if let Some(existing) = node.status().members.get(&info.id) {
        if existing != &info {
            return Err(format!("ERR node id {id} is already used by the member at {}", existing.client_addr));
        }
    }
    let blocked = Blocked::new(ctx, cluster_ops::JOIN_TIMEOUT + std::time::Duration::from_secs(5));
    cluster_ops::in_background(blocked, "raft-add-member", move || cluster_ops::add_member(node, info));
    Ok(Reply::Blocked)
}

/// `RAFT._IDENTIFY`: an empty node tells a leader who it is, so the leader can add it.
pub fn identify(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft._identify"));
    }
    peer_user::require_peer(ctx, "adding it to a cluster")?;
    let s = state::get();
    s.refuse_if_stopped()?;
    if is_voter(s) {
        return Err("ERR this node already belongs to a cluster".into());
    }
    refuse_if_holding_keys(ctx, s, "joining a cluster")?;
    let id = start_joining_node(s)?;
    Ok(Reply::Array(vec![
        Reply::Integer(id.get() as i64),
        Reply::bulk(s.raft_addr.clone()),
        Reply::bulk(s.client_addr.clone()),
        Reply::bulk(s.shared.encode()),
    ]))
}

/// `RAFT.ADDPEER host:port` (on the leader): adds the empty node at that client address.
pub fn add_peer(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if args.len() != 2 {
        return Err(wrong_args("raft.addpeer"));
    }
    refuse_in_transaction(ctx, "RAFT.ADDPEER")?;
    let addr = text(&args[1]);
    valid_addr(&addr)?;
    let node = leader_node(state::get())?;
    let blocked = Blocked::new(ctx, cluster_ops::JOIN_TIMEOUT + std::time::Duration::from_secs(10));
    cluster_ops::in_background(blocked, "raft-add-peer", move || cluster_ops::add_peer(node, addr));
    Ok(Reply::Blocked)
}

/// `RAFT.REMOVEPEER node-id|host:port` (on the leader).
pub fn remove_peer(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if args.len() != 2 {
        return Err(wrong_args("raft.removepeer"));
    }
    refuse_in_transaction(ctx, "RAFT.REMOVEPEER")?;
    let node = leader_node(state::get())?;
    let status = node.status();
    let id = member_named(&status, &text(&args[1]))?;
    if id == status.id {
        // A leader cannot safely remove itself: hand leadership to the most up-to-date voter.
        return match status.successor() {
            Some(to) => {
                node.transfer_leader(to);
                Err(format!("TRYAGAIN node {id} is the leader; leadership is moving to node {to}: run RAFT.REMOVEPEER {id} there"))
            }
            None => Err("ERR cannot remove the only voter of the cluster".into()),
        };
    }
    let blocked = Blocked::new(ctx, cluster_ops::CHANGE_TIMEOUT + std::time::Duration::from_secs(5));
    cluster_ops::in_background(blocked, "raft-remove-peer", move || cluster_ops::remove(node, id));
    Ok(Reply::Blocked)
}

/// The member `target` names: its node id, or its client or side-port address.
fn member_named(status: &Status, target: &str) -> std::result::Result<NodeId, String> {
    let id = match target.parse::<u64>() {
        Ok(id) => NodeId(id),
        Err(_) => status
            .members
            .values()
            .find(|m| m.client_addr == target || m.raft_addr == target)
            .map(|m| m.id)
            .ok_or_else(|| format!("ERR no member has the address {target}"))?,
    };
    if !status.members.contains_key(&id) && !status.voters.contains(&id) && !status.learners.contains(&id) {
        return Err(format!("ERR node {id} is not a member"));
    }
    Ok(id)
}

/// `RAFT.TRANSFERLEADER [node-id|host:port]` (on the leader): hands leadership to that voter, or
/// to the most up-to-date one, and answers once it leads (before maintenance on this node, say).
pub fn transfer_leader(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if args.len() > 2 {
        return Err(wrong_args("raft.transferleader"));
    }
    refuse_in_transaction(ctx, "RAFT.TRANSFERLEADER")?;
    let s = state::get();
    let node = leader_node(s)?;
    let status = node.status();
    let to = match args.get(1) {
        Some(target) => member_named(&status, &text(target))?,
        None => status.successor().ok_or("ERR no other voter to hand leadership to")?,
    };
    if to == status.id {
        return Ok(Reply::ok());
    }
    if !status.voters.contains(&to) {
        return Err(format!("ERR node {to} is a learner: only a voter can lead"));
    }
    // Raft refuses writes while a transfer is under way: not for an election timeout's worth
    // of waiting on a node that is most likely down.
    if let Some(silent) = status.progress_of(to).filter(|p| status.is_missing(p)).map(|p| p.silent_for) {
        return Err(format!(
            "ERR node {to} has not answered for {} ms: is it up? Leadership stays with node {}",
            silent.as_millis(),
            status.id
        ));
    }
    let patience = cluster_ops::transfer_patience(status.election_timeout());
    let blocked = Blocked::new(ctx, patience + std::time::Duration::from_secs(5));
    cluster_ops::in_background(blocked, "raft-transfer", move || cluster_ops::transfer_leadership(node, to, patience));
    Ok(Reply::Blocked)
}

/// `RAFT.SNAPSHOT`: takes a snapshot now; answers `[index, size in bytes]` when it is on disk.
pub fn snapshot(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft.snapshot"));
    }
    refuse_in_transaction(ctx, "RAFT.SNAPSHOT")?;
    let s = state::get();
    s.node().ok_or_else(not_initialized)?;
    let blocked = Blocked::new(ctx, std::time::Duration::from_secs(3600));
    s.send_to_apply(crate::apply::Job::TakeSnapshot(blocked))?;
    Ok(Reply::Blocked)
}

/// `RAFT.HELP`: every operator command, with its arguments and what it does.
pub fn help(args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft.help"));
    }
    Ok(crate::help::all())
}

/// `RAFT.PEERS`: one entry per member: id, suffrage, client address, raft address, and on the
/// leader the replication progress (match index, raft progress state); -1 / "" elsewhere.
pub fn peers(args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft.peers"));
    }
    let node = state::get().node().ok_or_else(not_initialized)?;
    let st = node.status();
    let entries = st
        .members
        .values()
        .map(|m| {
            let suffrage = if st.leader == Some(m.id) {
                "leader"
            } else if st.learners.contains(&m.id) {
                "learner"
            } else {
                "voter"
            };
            let progress = st.progress_of(m.id);
            let matched = if m.id == st.id { st.last_index.get() as i64 } else { progress.map_or(-1, |p| p.matched.get() as i64) };
            Reply::Array(vec![
                Reply::Integer(m.id.get() as i64),
                Reply::bulk(suffrage),
                Reply::bulk(m.client_addr.clone()),
                Reply::bulk(m.raft_addr.clone()),
                Reply::Integer(matched),
                Reply::bulk(if m.id == st.id { "self".to_string() } else { progress.map(|p| p.state.clone()).unwrap_or_default() }),
            ])
        })
        .collect();
    Ok(Reply::Array(entries))
}

/// `RAFT.LEADER`: `[id, client address]` of the leader.
pub fn leader(args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft.leader"));
    }
    let node = state::get().node().ok_or_else(not_initialized)?;
    state::get().refuse_if_stopped()?;
    let st = node.status();
    let leader = st.leader_member().ok_or(state::NO_LEADER)?;
    Ok(Reply::Array(vec![Reply::Integer(leader.id.get() as i64), Reply::bulk(leader.client_addr.clone())]))
}

/// `RAFT.STATE`: leader, follower, candidate, pre-candidate, learner, stopped or uninitialized.
pub fn role(args: &[Vec<u8>]) -> Result {
    if args.len() != 1 {
        return Err(wrong_args("raft.state"));
    }
    Ok(Reply::Simple(match state::get().node() {
        Some(node) => role_name(&node.status()),
        None => "uninitialized".into(),
    }))
}

/// A node that stopped serving (`fatal_error` in RAFT.INFO) is `stopped`, whatever Raft role it
/// held last; one started to join that no leader has added yet (no membership at all, as after
/// a join that timed out) is still `uninitialized`.
fn role_name(status: &Status) -> String {
    if state::get().stopped() {
        return "stopped".into();
    }
    if status.voters.is_empty() && status.learners.is_empty() {
        return "uninitialized".into();
    }
    status.role.to_string()
}

/// Whether a snapshot is being taken, in which phase, and how the attempts went.
fn snapshot_attempts(s: &Raftis, put: &mut impl FnMut(&str, String)) {
    let phase = s.snapshots.phase();
    put("snapshot_in_progress", if phase == "none" { "no" } else { "yes" }.to_string());
    put("snapshot_phase", phase.to_string());
    put("snapshots_started", s.snapshots.started().to_string());
    let last = s.snapshots.last_ended();
    put("last_snapshot_status", last.map_or("none", |e| if e.ok { "ok" } else { "failed" }).to_string());
    put("last_snapshot_duration_ms", last.map_or(-1, |e| e.took.as_millis() as i64).to_string());
    put("snapshots_failed", s.snapshots.failed().to_string());
}

/// `key:value` lines describing this node, for RAFT.INFO and INFO raft.
pub fn info_fields() -> Vec<(String, String)> {
    let s = state::get();
    let settings = s.settings();
    let mut f: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| f.push((k.to_string(), v));
    put("client_addr", s.client_addr.clone());
    put("raft_addr", s.raft_addr.clone());
    put("consistency", settings.consistency.to_string());
    put("durability", settings.durability.to_string());
    put("write_timeout_ms", settings.write_timeout.as_millis().to_string());
    let Some(node) = s.node() else {
        put("node_id", "0".into());
        put("role", "uninitialized".into());
        // RAFT.CLUSTER INIT KEEPDATA writes the first snapshot before there is a node.
        snapshot_attempts(s, &mut put);
        return f;
    };
    let st = node.status();
    put("node_id", st.id.to_string());
    // Empty until a joining node follows a leader, and in clusters made before cluster ids.
    put("cluster_id", if st.cluster.is_known() { st.cluster.to_string() } else { String::new() });
    put("role", role_name(&st));
    put("term", st.term.to_string());
    put("leader_id", st.leader.map_or("0".into(), |l| l.to_string()));
    put("leader_addr", st.leader_member().map_or(String::new(), |m| m.client_addr.clone()));
    let failed_after = st.failed_after();
    if !st.is_leader() {
        // The members' health this node shows comes from the leader's newest report.
        let age = st.leader_view.as_ref().map_or(-1, |v| v.received.elapsed().as_millis() as i64);
        put("leader_report_age_ms", age.to_string());
    }
    put("election_ticks", st.election_ticks.to_string());
    put("heartbeat_ticks", st.heartbeat_ticks.to_string());
    put("commit_index", st.commit.to_string());
    put("commit_index_stored", st.commit_stored.to_string());
    put("applied_index", s.progress.applied().to_string());
    // Only seen while an entry holds the main thread: RAFT.INFO answers then (see `runaway`).
    let (applying, running) = crate::runaway::applying().map_or((0, 0), |(i, d)| (i.get(), d.as_millis()));
    put("applying_index", applying.to_string());
    put("applying_for_ms", running.to_string());
    for (k, v) in crate::expiry::info_fields() {
        put(&k, v);
    }
    // A node that recovered its cluster alone (RAFT.CLUSTER RECOVER): where, whom it left behind,
    // and whether it still drops the log from before (no node can join until it has).
    if let Some(rec) = &st.recovered {
        put("recovered_at_index", rec.at.to_string());
        put("recovered_left_behind", rec.left_behind.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(","));
        put("recovery_pending", if st.recovery_pending() { "yes" } else { "no" }.into());
    }
    put("first_log_index", st.first_index.to_string());
    put("last_log_index", st.last_index.to_string());
    put("log_entries", (st.last_index.get() + 1).saturating_sub(st.first_index.get()).to_string());
    put("log_size_bytes", s.store.stats().size_bytes.to_string());
    let (snap_index, snap_size) = s.snapshots.latest().map_or((0, 0), |(i, b)| (i.get(), b));
    put("snapshot_index", snap_index.to_string());
    put("snapshot_size_bytes", snap_size.to_string());
    put("applied_bytes_since_snapshot", s.snapshots.applied_bytes().to_string());
    snapshot_attempts(s, &mut put);
    match node.snapshot_fetch() {
        None => put("snapshot_fetch_in_progress", "no".into()),
        Some(f) => {
            put("snapshot_fetch_in_progress", "yes".into());
            put("snapshot_fetch_file", f.file);
            put("snapshot_fetch_from", f.from.to_string());
            put("snapshot_fetch_received_bytes", f.received.to_string());
            put("snapshot_fetch_size_bytes", f.size.to_string());
        }
    }
    put("voters", st.voters.len().to_string());
    put("learners", st.learners.len().to_string());
    put("pending_proposals", st.pending_proposals.to_string());
    if let Some(fatal) = s.fatal() {
        put("fatal_error", fatal);
    }
    let transport = node.transport().stats();
    for (i, m) in st.members.values().enumerate() {
        let suffrage = if st.learners.contains(&m.id) { "learner" } else { "voter" };
        let mut line = format!("id={},addr={},raft_addr={},suffrage={}", m.id, m.client_addr, m.raft_addr, suffrage);
        if m.id == st.id {
            line.push_str(",self=yes");
        }
        if let Some(p) = st.progress_of(m.id) {
            let heard = p.silent_for.as_millis();
            let _ = write!(line, ",match_index={},next_index={},state={},last_heard_ms={heard}", p.matched, p.next, p.state);
        }
        if let Some(health) = health_report::health_of(&st, m.id, failed_after) {
            let _ = write!(line, ",health={}", health.as_str());
        }
        let link = transport.iter().find(|t| t.id == m.id);
        if let Some(t) = link {
            let _ = write!(
                line,
                ",connected={},queued={},queued_bytes={},dropped={}",
                if t.connected { "yes" } else { "no" },
                t.queued,
                t.queued_bytes,
                t.dropped
            );
        }
        put(&format!("peer{i}"), line);
        // Why it is down, on a line of its own: the text has commas and spaces of its own.
        if let Some(why) = link.filter(|t| !t.connected).and_then(|t| t.last_error.as_ref()) {
            put(&format!("peer{i}_last_error"), why.replace(['\r', '\n'], " "));
        }
    }
    f
}

fn render(fields: &[(String, String)]) -> String {
    let mut out = String::from("# Raft\r\n");
    for (k, v) in fields {
        let _ = write!(out, "{k}:{v}\r\n");
    }
    out
}

/// The field patterns after a command's name (`RAFT.INFO role peer*`).
fn patterns(args: &[Vec<u8>]) -> Vec<String> {
    args.iter().skip(1).map(|a| text(a)).collect()
}

/// `RAFT.INFO [pattern ...]`: identity, role and cluster view as INFO-style lines; with patterns,
/// only the fields they match.
pub fn info(args: &[Vec<u8>]) -> Result {
    Ok(Reply::Bulk(crate::glob::info_lines(&render(&info_fields()), &patterns(args)).into_bytes()))
}

/// `RAFT.STATS [pattern ...]`: counters, as INFO-style lines.
pub fn stats(args: &[Vec<u8>]) -> Result {
    let s = state::get();
    let log = s.store.stats();
    let mut out = String::from("# Raft stats\r\n");
    let _ = write!(out, "entries_applied:{}\r\n", s.progress.entries_applied());
    let _ = write!(out, "apply_batches:{}\r\n", s.progress.batches_applied());
    let _ = write!(out, "applied_index:{}\r\n", s.progress.applied());
    let _ = write!(out, "log_first_index:{}\r\nlog_last_index:{}\r\n", log.first_index, log.last_index);
    let _ = write!(out, "log_entries:{}\r\nlog_size_bytes:{}\r\n", log.entries, log.size_bytes);
    let _ = write!(out, "journal_bytes:{}\r\n", log.journal_bytes);
    let _ = write!(out, "checkpoints:{}\r\ncheckpoint_micros:{}\r\n", log.checkpoints, log.checkpoint_micros);
    if let Some(node) = s.node() {
        let st = node.status();
        let c = node.counters();
        let _ = write!(out, "pending_proposals:{}\r\n", st.pending_proposals);
        let _ = write!(out, "raft_rounds:{}\r\nraft_readies:{}\r\n", c.rounds, c.readies);
        let _ = write!(out, "proposals_requested:{}\r\nproposals:{}\r\n", c.proposals_requested, c.proposals);
        let _ = write!(out, "entries_persisted:{}\r\nfsyncs:{}\r\n", c.entries_persisted, c.fsyncs);
        let _ = write!(out, "background_fsyncs:{}\r\n", c.background_fsyncs);
        let _ = write!(out, "persist_micros:{}\r\n", c.persist_micros);
        let _ = write!(out, "read_index_rounds:{}\r\nreads_confirmed:{}\r\n", c.read_index_rounds, c.reads);
        let _ = write!(out, "heartbeats_coalesced:{}\r\n", c.heartbeats_coalesced);
        let _ = write!(out, "slow_rounds:{}\r\nmax_round_micros:{}\r\n", c.slow_rounds, c.max_round_micros);
        let _ = write!(out, "compaction_steps:{}\r\n", c.compaction_steps);
        let _ = write!(out, "snapshots_fetched:{}\r\nsnapshot_fetch_failures:{}\r\n", c.snapshots_fetched, c.snapshot_fetch_failures);
        let _ = write!(out, "snapshot_bytes_fetched:{}\r\n", c.snapshot_bytes_fetched);
        for (name, value) in crate::held::stats() {
            let _ = write!(out, "{name}:{value}\r\n");
        }
        let _ = write!(out, "watching_clients:{}\r\n", crate::watch::clients());
        for (name, value) in crate::blocking::stats().into_iter().chain(crate::forward_blocking::stats()).chain(crate::wait::stats()) {
            let _ = write!(out, "{name}:{value}\r\n");
        }
        let _ = write!(out, "blocked_backstops:{}\r\n", crate::blocked::backstops());
        let _ = write!(out, "known_scripts:{}\r\n", crate::scripts::known_scripts());
        let _ = write!(out, "readonly_clients:{}\r\n", crate::replica_reads::count());
        let _ = write!(out, "clock_entries_proposed:{}\r\n", crate::expiry::clock_entries_proposed());
        let (catch_ups, late) = node.transport().catch_up_stats();
        let _ = write!(out, "forward_catch_ups:{catch_ups}\r\nforward_catch_ups_late:{late}\r\n");
        for t in node.transport().stats() {
            let _ = write!(out, "peer_{}_sent:{}\r\npeer_{}_dropped:{}\r\n", t.id, t.sent, t.id, t.dropped);
        }
    }
    Ok(Reply::Bulk(crate::glob::info_lines(&out, &patterns(args)).into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::keys_in_keyspace;

    #[test]
    fn keys_are_added_up_over_every_database() {
        assert_eq!(keys_in_keyspace("# Keyspace\r\n"), 0);
        let info =
            "# Keyspace\r\ndb0:keys=30,expires=1,avg_ttl=0\r\ndb1:keys=47,expires=0,avg_ttl=0\r\ndb15:keys=3,expires=0,avg_ttl=0\r\n";
        assert_eq!(keys_in_keyspace(info), 80);
    }
}
