//! Which server speaks for each node id on the connections dialed into this node.
//!
//! A node's id lives in its raft dir, so a copy of that dir started elsewhere (a cloned VM, a
//! backup restored beside the original) is a second server with the same id. The cluster cannot
//! tell the two apart by id: the leader moves the member to whichever address said `HELLO` last
//! (see `membership::Readdress`), the other one is orphaned without a word, and Raft, which counts
//! one vote per id, could count the two as one voter. So every transport picks a random
//! *incarnation* when it starts and says it in its `HELLO`; a connection that says hello for an
//! id while a connection of another incarnation is open and speaking for it is refused, and both
//! servers' logs say why.
//!
//! A restarted node is a new incarnation too. Its old connection normally closes with the old
//! process; one that stays open (the old host is gone and its close never arrived) gives way
//! once it has been silent for [`LIVE_WINDOW`], and is refused if it ever speaks again.

use crate::ids::NodeId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a connection that has sent nothing still holds its id against a new incarnation.
/// Followers hear from the leader every heartbeat and answer it, so on the leader a live
/// server's connection is never silent this long; between followers it may well be, and there
/// the newer server is let in (the leader is the one that notices).
pub(super) const LIVE_WINDOW: Duration = Duration::from_secs(3);

/// One transport's identity in `HELLO`: random, so two servers started from one raft dir differ.
pub(super) fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

/// The server currently speaking for one id.
struct Claim {
    incarnation: u64,
    /// Its side-port address, as its `HELLO` said.
    addr: String,
    /// Its connections still open here.
    open: usize,
    last_heard: Instant,
}

#[derive(Default)]
pub(super) struct Claims {
    by_id: Mutex<HashMap<NodeId, Claim>>,
}

impl Claims {
    fn by_id(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Claim>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection said hello as `id`, incarnation `incarnation`, at `addr`. `Err` is why it is
    /// refused; otherwise it speaks for `id` until [`Claims::closed`].
    pub(super) fn hello(&self, id: NodeId, incarnation: u64, addr: &str, now: Instant) -> Result<(), String> {
        let mut by_id = self.by_id();
        match by_id.get_mut(&id) {
            Some(claim) if claim.incarnation == incarnation => {
                claim.open += 1;
                claim.last_heard = now;
                claim.addr = addr.to_string();
            }
            Some(claim) if claim.open > 0 && now.duration_since(claim.last_heard) < LIVE_WINDOW => {
                return Err(format!(
                    "another server is already node {id} here, connected from {}: two servers with one node id \
                     (is one's raft dir a copy of the other's?); stop one of them",
                    claim.addr
                ));
            }
            _ => {
                by_id.insert(id, Claim { incarnation, addr: addr.to_string(), open: 1, last_heard: now });
            }
        }
        Ok(())
    }

    /// A connection that said hello as `id`, `incarnation`, sent more: `Err` if another server
    /// has taken the id over meanwhile.
    pub(super) fn heard(&self, id: NodeId, incarnation: u64, now: Instant) -> Result<(), String> {
        let mut by_id = self.by_id();
        match by_id.get_mut(&id) {
            Some(claim) if claim.incarnation == incarnation => {
                claim.last_heard = now;
                Ok(())
            }
            Some(claim) => Err(format!(
                "another server is now node {id} here, connected from {}: two servers with one node id \
                 (is one's raft dir a copy of the other's?); stop one of them",
                claim.addr
            )),
            // Only after a `closed` that emptied the claim, which a connection does last.
            None => Ok(()),
        }
    }

    /// A connection that said hello as `id`, `incarnation`, has closed.
    pub(super) fn closed(&self, id: NodeId, incarnation: u64) {
        let mut by_id = self.by_id();
        if let Some(claim) = by_id.get_mut(&id).filter(|c| c.incarnation == incarnation) {
            claim.open = claim.open.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: NodeId = NodeId(3);

    #[test]
    fn a_second_server_with_a_live_ones_id_is_refused_until_the_first_is_gone() {
        let claims = Claims::default();
        let t0 = Instant::now();
        claims.hello(ID, 7, "10.0.0.3:17001", t0).unwrap();
        let why = claims.hello(ID, 8, "10.0.0.9:17001", t0 + Duration::from_millis(10)).unwrap_err();
        assert!(why.contains("already node 3") && why.contains("10.0.0.3:17001"), "{why}");
        claims.hello(NodeId(4), 8, "10.0.0.4:17001", t0).expect("other ids are not concerned");

        claims.closed(ID, 8);
        claims.heard(ID, 7, t0 + Duration::from_millis(20)).expect("the refused one's close changes nothing");
        claims.closed(ID, 7);
        claims.hello(ID, 8, "10.0.0.9:17001", t0 + Duration::from_millis(30)).expect("the first one has closed");
        assert!(claims.heard(ID, 7, t0 + Duration::from_millis(40)).is_err(), "its leftover speaks no more");
    }

    #[test]
    fn a_restart_is_let_in_over_a_connection_that_stayed_open_but_went_silent() {
        let claims = Claims::default();
        let t0 = Instant::now();
        claims.hello(ID, 7, "10.0.0.3:17001", t0).unwrap();
        claims.heard(ID, 7, t0 + Duration::from_secs(1)).unwrap();
        assert!(claims.hello(ID, 8, "10.0.0.3:17001", t0 + Duration::from_secs(2)).is_err(), "heard 1 s ago");
        claims.hello(ID, 8, "10.0.0.3:17001", t0 + Duration::from_secs(1) + LIVE_WINDOW).expect("silent long enough");
        let why = claims.heard(ID, 7, t0 + Duration::from_secs(5)).unwrap_err();
        assert!(why.contains("now node 3"), "{why}");
        claims.closed(ID, 7);
        claims.heard(ID, 8, t0 + Duration::from_secs(6)).expect("the old one's close is not the new one's");
    }

    #[test]
    fn the_same_server_reconnecting_is_always_let_in() {
        let claims = Claims::default();
        let t0 = Instant::now();
        claims.hello(ID, 7, "10.0.0.3:17001", t0).unwrap();
        claims.hello(ID, 7, "10.0.0.3:17001", t0 + Duration::from_millis(1)).expect("a redial before the old close");
        claims.closed(ID, 7);
        assert!(claims.hello(ID, 9, "x:1", t0 + Duration::from_millis(2)).is_err(), "one of its two is still open");
        claims.closed(ID, 7);
        claims.hello(ID, 9, "x:1", t0 + Duration::from_millis(3)).expect("both closed");
    }
}
