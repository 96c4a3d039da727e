//! The client-port side of `raft-password` (see `raftis_core::peer_auth` for the side port).
//!
//! Two exchanges between nodes go through the client port, because the operator names nodes by
//! their client address: a joining node asks a member to add it (`RAFT._JOIN`), and a leader asks
//! a node it adds who it is (`RAFT._IDENTIFY`). A Redis with `requirepass` or ACL users would
//! answer both with `-NOAUTH`, and nodes know no Redis password of each other. So a node first
//! sends `RAFT._AUTH <raft-password>` (which needs no login), and a good password logs that
//! connection in as the module user `raftis-peer`, who may run those two commands and nothing
//! else. With a raft-password set, the two commands serve only that user: a node without the
//! password could be added to the cluster but never talk to it.

use crate::ffi::{self, api, RedisModuleCtx};
use crate::reply::Reply;
use crate::state;
use raftis_core::peer_auth;
use redis_module::raw;
use std::sync::OnceLock;

/// The name peers are logged in as (not an ACL user: `ACL LIST` does not show it).
pub const USER: &str = "raftis-peer";
pub const AUTH_COMMAND: &str = "raft._auth";

/// The module user, created at load when the node has a raft-password.
struct PeerUser(*mut raw::RedisModuleUser);
// Only used on Redis' main thread (in command handlers).
unsafe impl Send for PeerUser {}
unsafe impl Sync for PeerUser {}

static PEER: OnceLock<PeerUser> = OnceLock::new();

/// Creates the peer user; after the commands it may run are registered.
pub fn init() -> anyhow::Result<()> {
    if state::get().settings().raft_password.is_none() {
        return Ok(());
    }
    let name = ffi::cstr(USER);
    let user = unsafe { api!(RedisModule_CreateModuleUser)(name.as_ptr()) };
    anyhow::ensure!(!user.is_null(), "cannot create the module user {USER}");
    for rule in ["on", "+raft._join", "+raft._identify"] {
        let rule = ffi::cstr(rule);
        let rc = unsafe { api!(RedisModule_SetModuleUserACL)(user, rule.as_ptr()) };
        anyhow::ensure!(rc == ffi::OK, "cannot set the rules of the module user {USER}");
    }
    let _ = PEER.set(PeerUser(user));
    Ok(())
}

/// `RAFT._AUTH <raft-password>`: logs this connection in as [`USER`].
pub fn auth(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result<Reply, String> {
    if args.len() != 2 {
        return Err("ERR wrong number of arguments for 'raft._auth' command".into());
    }
    let Some(password) = state::get().settings().raft_password else {
        return Err("ERR this node has no raft-password; give every node of the cluster the same one".into());
    };
    if !password.matches(&args[1]) {
        return Err(peer_auth::WRONGPASS.into());
    }
    let user = PEER.get().ok_or("ERR the peer user is missing")?;
    let rc = unsafe { api!(RedisModule_AuthenticateClientWithUser)(ctx, user.0, None, std::ptr::null_mut(), std::ptr::null_mut()) };
    if rc != ffi::OK {
        return Err("ERR cannot log this connection in as a peer".into());
    }
    Ok(Reply::ok())
}

/// With a raft-password set, only a connection that proved it may run `RAFT._JOIN` or
/// `RAFT._IDENTIFY`; `what` says what the caller needs it for.
pub fn require_peer(ctx: *mut RedisModuleCtx, what: &str) -> Result<(), String> {
    if state::get().settings().raft_password.is_none() || crate::acl::current_user(ctx).as_deref() == Some(USER.as_bytes()) {
        return Ok(());
    }
    Err(format!("NOAUTH this node has a raft-password: {what} needs the same raft-password"))
}

/// Another node's refusal as told to the operator: Redis' own `-NOAUTH` there means that its
/// Redis asks for a password and this node has no raft-password to log in with instead.
pub fn explain(refusal: &str) -> String {
    if refusal.starts_with("NOAUTH Authentication required") && state::get().settings().raft_password.is_none() {
        return format!("{refusal} (nodes log in to each other with raft-password=..., the same on every node)");
    }
    refusal.to_string()
}
