//! Long membership operations, run on background threads while the operator's client is blocked:
//! joining a cluster through any member (following redirects to the leader), adding a node by its
//! address, removing one, handing leadership over. Nodes reach each other's client port with a tiny RESP client.

use crate::blocked::{Blocked, Outcome};
use crate::peer_user;
use crate::snapshot::AppliedPoint;
use crate::state::{self, RaftNode, Start};
use bytes::BytesMut;
use raft::eraftpb::ConfState;
use raftis_core::cluster_view::HashSlot;
use raftis_core::membership::{MembershipChange, NodeInfo};
use raftis_core::node::{HandOverError, TakenSnapshot};
use raftis_core::resp::{self, Frame};
use raftis_core::shared_settings::SharedSettings;
use raftis_core::{LogIndex, NodeId, Term};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Joining includes the new node catching up with the whole log: allow for a big one.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A recovered node elects itself at once; this bounds the wait for it to lead, ready.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a join waits for a cluster in which no member knows a leader (an election takes an
/// election timeout or two, 1-4 s by default).
const NO_LEADER_PATIENCE: Duration = Duration::from_secs(15);
const MAX_REDIRECTS: usize = 8;

/// One request/response exchange with another node's client port, logged in as a peer first
/// when the cluster has a raft-password (see `peer_user`). A refused login is the reply.
pub fn request_as_peer(addr: &str, parts: &[&[u8]], timeout: Duration) -> anyhow::Result<Frame> {
    match state::get().settings().raft_password {
        Some(password) => request(addr, &[&[peer_user::AUTH_COMMAND.as_bytes(), password.as_bytes()], parts], timeout),
        None => request(addr, &[parts], timeout),
    }
}

/// Sends `commands` to a Redis-speaking server in one go and returns the last one's reply, or
/// the first error an earlier one got.
pub fn request(addr: &str, commands: &[&[&[u8]]], timeout: Duration) -> anyhow::Result<Frame> {
    let sock =
        addr.to_socket_addrs().map_err(|e| anyhow::anyhow!("{addr}: {e}"))?.next().ok_or_else(|| anyhow::anyhow!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout.min(Duration::from_secs(3))).map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut out = BytesMut::new();
    for parts in commands {
        resp::encode_command(parts, &mut out);
    }
    stream.write_all(&out)?;
    let mut buf = BytesMut::with_capacity(1024);
    for left in (0..commands.len()).rev() {
        let frame = resp::read_frame(&mut stream, &mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                let start = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
                anyhow::anyhow!("{addr}: not a Redis server (it answered {start:?}: {e})")
            }
            std::io::ErrorKind::UnexpectedEof => anyhow::anyhow!("{addr}: connection closed"),
            _ => anyhow::anyhow!("{addr}: {e}"),
        })?;
        if left == 0 || matches!(frame, Frame::Error(_)) {
            return Ok(frame);
        }
    }
    anyhow::bail!("{addr}: no command to send")
}

/// Where a new cluster made by `RAFT.CLUSTER INIT KEEPDATA` starts: index 1 of term 1, the node
/// `me` its only voter, as after the first entry of a cluster made by a plain INIT.
pub fn seed_point(me: NodeInfo) -> AppliedPoint {
    AppliedPoint {
        index: LogIndex(1),
        term: Term(1),
        conf_state: ConfState { voters: vec![me.id.get()], ..Default::default() },
        members: Arc::new([(me.id, me)].into_iter().collect()),
    }
}

/// `RAFT.CLUSTER INIT KEEPDATA`, once the dataset Redis loaded is written as `seed` (on the
/// thread that verified the file): records it as the first snapshot of a new cluster and starts
/// the node. The node loads it back like any snapshot, so Redis then holds exactly what every
/// node that joins will load. Nothing is recorded if the snapshot could not be written: the
/// command can be run again.
pub fn create_from(seed: TakenSnapshot) -> Result<(), String> {
    let s = state::get();
    let Some(&id) = seed.conf_state.voters.first() else {
        return Err("ERR internal error: a first snapshot without a voter".into());
    };
    let id = NodeId(id);
    s.start_node(id, Start::Seeded(&seed)).map_err(|e| format!("ERR cannot create the cluster: {e:#}"))?;
    let file = &seed.descriptor.file;
    log::info!("created a new cluster with node {id} as its first member, from the dataset in snapshot {file}");
    Ok(())
}

/// Runs `work` on a new thread and answers the blocked client with its outcome.
pub fn in_background(blocked: Blocked, name: &str, work: impl FnOnce() -> Outcome + Send + 'static) {
    let result = std::thread::Builder::new().name(name.into()).spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Outcome::Error("ERR internal error (panic); see the Redis log".into()));
        blocked.finish(outcome);
    });
    if let Err(e) = result {
        log::error!("cannot spawn a thread: {e}");
    }
}

/// The joining side: ask the members at `seeds` (client addresses) to add `me`.
pub fn join(seeds: Vec<String>, me: NodeInfo) -> Outcome {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let id = me.id.get().to_string();
    let shared = state::get().shared.encode();
    let parts: [&[u8]; 5] = [b"RAFT._JOIN", id.as_bytes(), me.raft_addr.as_bytes(), me.client_addr.as_bytes(), shared.as_bytes()];
    let mut last_error = String::new();
    let mut leaderless_since: Option<Instant> = None;
    loop {
        let mut reachable = false;
        // Whether every member that answered this round said it knows no leader.
        let (mut leaderless, mut leader_known) = (false, false);
        for seed in &seeds {
            let mut addr = seed.clone();
            for _ in 0..MAX_REDIRECTS {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match request_as_peer(&addr, &parts, remaining.max(Duration::from_millis(100))) {
                    Ok(Frame::Simple(_)) => return Outcome::Simple("OK".into()),
                    Ok(Frame::Error(e)) if e.starts_with("MOVED ") => {
                        reachable = true;
                        leader_known = true;
                        match e.split_whitespace().nth(2) {
                            Some(leader) => addr = raftis_core::cluster_view::dialable(leader),
                            None => return Outcome::Error(format!("ERR {addr} answered a malformed redirect: {e}")),
                        }
                        continue;
                    }
                    // No leader right now, or a timeout: the cluster may recover; retry.
                    Ok(Frame::Error(e)) if e.starts_with("CLUSTERDOWN") || e.starts_with("TIMEOUT") => {
                        reachable = true;
                        leaderless |= e.starts_with("CLUSTERDOWN");
                        leader_known |= e.starts_with("TIMEOUT");
                        last_error = format!("{addr}: {e}");
                    }
                    Ok(Frame::Error(e)) => return Outcome::Error(format!("ERR {addr} refused the join: {}", peer_user::explain(&e))),
                    Ok(other) => return Outcome::Error(format!("ERR {addr} answered unexpectedly: {other:?}")),
                    Err(e) => last_error = e.to_string(),
                }
                break;
            }
        }
        if !reachable {
            return Outcome::Error(format!("ERR cannot reach any of the given nodes ({last_error})"));
        }
        if !leaderless || leader_known {
            leaderless_since = None;
        } else if leaderless_since.get_or_insert_with(Instant::now).elapsed() >= NO_LEADER_PATIENCE {
            let waited = NO_LEADER_PATIENCE.as_secs();
            return Outcome::Error(format!(
                "CLUSTERDOWN the cluster has had no leader for {waited} s ({last_error}); join once it has one"
            ));
        }
        if Instant::now() >= deadline {
            return Outcome::Error(format!("TIMEOUT could not join the cluster in time ({last_error})"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The leader's side of a join: learner, catch-up, voter.
pub fn add_member(node: Arc<RaftNode>, info: NodeInfo) -> Outcome {
    let id = info.id;
    match node.add_member(info, Instant::now() + JOIN_TIMEOUT) {
        Ok(()) => {
            log::info!("node {id} is now a voting member");
            Outcome::Simple("OK".into())
        }
        Err(e) => Outcome::Error(state::error_reply(&e, HashSlot::NO_KEY)),
    }
}

/// `RAFT.ADDPEER host:port`: ask the server there who it is, then add it.
pub fn add_peer(node: Arc<RaftNode>, addr: String) -> Outcome {
    let reply = match request_as_peer(&addr, &[b"RAFT._IDENTIFY"], Duration::from_secs(5)) {
        Ok(r) => r,
        Err(e) => return Outcome::Error(format!("ERR cannot add {e}")),
    };
    let info = match reply {
        Frame::Array(items) if (3..=4).contains(&items.len()) => {
            let text = |f: &Frame| match f {
                Frame::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
                Frame::Simple(s) => Some(s.clone()),
                _ => None,
            };
            let info = match (&items[0], text(&items[1]), text(&items[2])) {
                (Frame::Integer(id), Some(raft_addr), Some(client_addr)) if *id > 0 => {
                    NodeInfo { id: NodeId(*id as u64), raft_addr, client_addr }
                }
                _ => return Outcome::Error(format!("ERR {addr} answered RAFT._IDENTIFY with a malformed reply")),
            };
            let differ = items.get(3).and_then(text).and_then(|theirs| state::get().shared.differences(&SharedSettings::decode(&theirs)));
            if let Some(differ) = differ {
                return Outcome::Error(format!("ERR {addr} cannot be added: its Redis settings differ from this cluster's: {differ}"));
            }
            info
        }
        Frame::Error(e) => return Outcome::Error(format!("ERR {addr} cannot be added: {}", peer_user::explain(&e))),
        other => return Outcome::Error(format!("ERR {addr} is not a Raftis node (answered {other:?})")),
    };
    let id = info.id;
    match add_member(node, info) {
        Outcome::Simple(_) => Outcome::Integer(id.get() as i64),
        other => other,
    }
}

pub fn remove(node: Arc<RaftNode>, id: NodeId) -> Outcome {
    match node.change_membership_blocking(MembershipChange::Remove(id), Instant::now() + CHANGE_TIMEOUT) {
        Ok(()) => {
            log::info!("node {id} was removed from the cluster");
            Outcome::Simple("OK".into())
        }
        Err(e) => Outcome::Error(state::error_reply(&e, HashSlot::NO_KEY)),
    }
}

/// How long `RAFT.TRANSFERLEADER` waits for the new leader: raft gives a transfer up after one
/// election timeout (the target has to catch up and win its election within it); twice that
/// leaves time for this node to hear from the winner.
pub fn transfer_patience(election_timeout: Duration) -> Duration {
    (2 * election_timeout).clamp(Duration::from_millis(500), Duration::from_secs(30))
}

/// `RAFT.TRANSFERLEADER`: hands leadership to `to` and waits, `patience` at most, until this
/// node hears from it as the leader.
pub fn transfer_leadership(node: Arc<RaftNode>, to: NodeId, patience: Duration) -> Outcome {
    let me = node.status().id;
    let ms = patience.as_millis();
    log::info!("handing leadership to node {to} (RAFT.TRANSFERLEADER)");
    Outcome::Error(match node.transfer_leadership(to, Instant::now() + patience) {
        Ok(leader) if leader == to => {
            log::info!("node {to} took leadership over");
            return Outcome::Simple("OK".into());
        }
        Ok(other) => format!("ERR node {other} was elected leader, not node {to}"),
        Err(HandOverError::StillLeading) => {
            log::warn!("node {to} did not take leadership over; this node still leads");
            format!(
                "ERR node {to} did not take over within {ms} ms (it must be up and catch up with the log); \
                 node {me} still leads. RAFT.PEERS shows how far each member is"
            )
        }
        Err(HandOverError::NoLeaderYet) => {
            format!("TIMEOUT no leader yet {ms} ms after handing leadership to node {to}; the election may still end")
        }
        Err(HandOverError::NotLeader | HandOverError::NoOtherVoter | HandOverError::Stopped(_)) => {
            state::redirect(&node.status(), HashSlot::NO_KEY)
        }
    })
}

/// Redis is exiting (nothing can cancel the shutdown any more). A leader that simply vanished
/// would leave the cluster without one for an election timeout (1-2 s by default) and fail every
/// write meanwhile; handing leadership to the most up-to-date voter first takes a round trip or
/// two, as for `RAFT.REMOVEPEER` of the leader. Then the node stops. Runs on Redis' main thread,
/// which is done serving clients by now (Redis itself saves its RDB file at this point); the
/// hand-over is bounded by one election timeout, after which raft gives it up anyway.
pub fn before_exit() {
    let Some(node) = state::get().node() else { return };
    hand_over_before(&node, "shutting down", "the others elect a leader after an election timeout");
    // Redis exits after this event whatever happens: the Raft loop stops first, which writes
    // the newest commit index, so that a restart applies the whole log this node knew committed
    // before it hears from a leader.
    node.shutdown();
}

/// Redis is about to save its dump file on the main thread, which then serves nobody for as long
/// as the save takes (seconds for a large dataset): a leader would keep its leadership all that
/// time (heartbeats go out from the network thread) and every write in the cluster would wait
/// for it. So a leader hands leadership over first, as before it exits.
pub fn before_blocking_save() {
    let Some(node) = state::get().node() else { return };
    hand_over_before(&node, "saving the dump file on the main thread", "writes wait for the save");
}

/// A leader (of a cluster with another voter) about to stop serving, for good or for a while,
/// hands leadership over first; `doing` says what for, `otherwise` what a failure means, in the
/// log.
fn hand_over_before(node: &RaftNode, doing: &str, otherwise: &str) {
    let status = node.status();
    if status.is_leader() && status.voters.len() >= 2 {
        match state::get().hand_over_leadership(node) {
            Ok(to) => log::info!("handed leadership to node {to} before {doing}"),
            Err(why) => log::warn!("{doing} as the leader: {why}; {otherwise}"),
        }
    }
}

/// `RAFT.CLUSTER RECOVER`: makes this node the only voter of a cluster that lost its majority
/// (see `raftis_core::recovery`), then waits until it leads, ready to serve.
pub fn recover(node: Arc<RaftNode>) -> Outcome {
    let at = match node.recover() {
        Ok(at) => at,
        Err(why) => return Outcome::Error(format!("ERR cannot recover: {why}")),
    };
    let deadline = Instant::now() + RECOVER_TIMEOUT;
    loop {
        let status = node.status();
        if status.is_leader() && status.leader_ready {
            log::warn!("recovered the cluster at index {at}: node {} leads it alone", status.id);
            return Outcome::Simple("OK".into());
        }
        if let Some(why) = status.fatal {
            return Outcome::Error(format!("ERR the recovery was recorded, but the node stopped: {why}"));
        }
        if Instant::now() >= deadline {
            return Outcome::Error(format!(
                "TIMEOUT the recovery was recorded at index {at}, but this node does not lead yet; see RAFT.INFO"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
