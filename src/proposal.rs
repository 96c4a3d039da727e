//! What a proposer gets back. Every proposal ends exactly once: with its apply result (delivered
//! by the state machine through its waiter) or with a [`ProposeError`] from the node. Nothing
//! waits forever: each pending proposal carries a deadline that the Raft loop enforces.

use crate::ids::{LogIndex, NodeId, Term};
use std::collections::BTreeMap;
use std::time::Instant;

/// Why a proposal or read did not complete.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    /// This node is not the leader. `leader` is the one it knows of, if any.
    #[error("not the leader")]
    NotLeader { leader: Option<NodeId> },
    /// Leadership changed while the entry was in flight: it may or may not commit later.
    #[error("leadership lost while the request was in flight; its outcome is unknown")]
    LeadershipLost,
    /// Another entry was committed at this index (the entry was overwritten by a new leader).
    #[error("entry was overwritten by a new leader")]
    Overwritten,
    /// The deadline passed before the entry was applied. It may still commit later.
    #[error("timed out waiting for the cluster")]
    Timeout,
    /// Raft refused the proposal (e.g. a leadership transfer or a pending membership change).
    #[error("proposal dropped: {0}")]
    Dropped(String),
    /// The cluster will not make this change, however often asked (a member still talks at the
    /// joining node's address, an id a recovery left behind).
    #[error("refused: {0}")]
    Refused(String),
    /// The node is shutting down.
    #[error("node is shutting down")]
    Shutdown,
    /// The entry is larger than the node takes (`max-entry-size`): refused before Raft saw it.
    #[error("entry of {bytes} bytes is over the limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: u64 },
}

/// The completion side of a proposal, chosen by the state machine. The node calls `fail` when it
/// gives up on the entry; otherwise the waiter travels with the committed entry to
/// [`crate::node::StateMachine::apply`], which completes it with the real result.
pub trait Waiter: Send + 'static {
    fn fail(self, err: ProposeError);
}

/// A plain callback is a waiter: handy for reads and membership changes.
pub type Callback<T> = Box<dyn FnOnce(Result<T, ProposeError>) + Send + 'static>;

impl<T: 'static> Waiter for Callback<T> {
    fn fail(self, err: ProposeError) {
        self(Err(err))
    }
}

/// Waiters of entries this leader proposed, keyed by the index the entry got.
pub(crate) struct PendingProposals<W> {
    by_index: BTreeMap<LogIndex, Pending<W>>,
}

pub(crate) struct Pending<W> {
    pub term: Term,
    pub deadline: Instant,
    pub waiter: W,
}

impl<W: Waiter> PendingProposals<W> {
    pub fn new() -> Self {
        PendingProposals { by_index: BTreeMap::new() }
    }

    pub fn insert(&mut self, index: LogIndex, pending: Pending<W>) {
        // An older waiter at the same index belongs to an entry a newer leader overwrote.
        if let Some(old) = self.by_index.insert(index, pending) {
            old.waiter.fail(ProposeError::Overwritten);
        }
    }

    /// The waiter for the entry committed at `index` with `term`, if this node proposed it.
    /// A waiter registered at that index under another term lost its entry.
    pub fn take_committed(&mut self, index: LogIndex, term: Term) -> Option<W> {
        let pending = self.by_index.remove(&index)?;
        if pending.term == term {
            Some(pending.waiter)
        } else {
            pending.waiter.fail(ProposeError::Overwritten);
            None
        }
    }

    pub fn fail_all(&mut self, err: ProposeError) {
        for (_, p) in std::mem::take(&mut self.by_index) {
            p.waiter.fail(err.clone());
        }
    }

    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<LogIndex> = self.by_index.iter().filter(|(_, p)| p.deadline <= now).map(|(i, _)| *i).collect();
        for index in expired {
            if let Some(p) = self.by_index.remove(&index) {
                p.waiter.fail(ProposeError::Timeout);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn waiter(tx: &mpsc::Sender<Result<(), ProposeError>>) -> Callback<()> {
        let tx = tx.clone();
        Box::new(move |r| tx.send(r).unwrap())
    }

    #[test]
    fn committed_with_same_term_hands_back_waiter_other_term_fails_it() {
        let (tx, rx) = mpsc::channel();
        let mut p = PendingProposals::new();
        let later = Instant::now() + Duration::from_secs(60);
        p.insert(LogIndex(5), Pending { term: Term(2), deadline: later, waiter: waiter(&tx) });
        p.insert(LogIndex(6), Pending { term: Term(2), deadline: later, waiter: waiter(&tx) });
        assert!(p.take_committed(LogIndex(5), Term(2)).is_some());
        assert!(p.take_committed(LogIndex(6), Term(3)).is_none());
        assert_eq!(rx.try_recv().unwrap(), Err(ProposeError::Overwritten));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn expire_fails_only_past_deadlines() {
        let (tx, rx) = mpsc::channel();
        let mut p = PendingProposals::new();
        let now = Instant::now();
        p.insert(LogIndex(1), Pending { term: Term(1), deadline: now, waiter: waiter(&tx) });
        p.insert(LogIndex(2), Pending { term: Term(1), deadline: now + Duration::from_secs(9), waiter: waiter(&tx) });
        p.expire(now);
        assert_eq!(rx.try_recv().unwrap(), Err(ProposeError::Timeout));
        assert!(rx.try_recv().is_err());
        assert_eq!(p.len(), 1);
    }
}
