//! Coalescing of heartbeat backlogs.
//!
//! A heartbeat, and a heartbeat's response, only matters as the latest one from its sender: it
//! carries the newest commit index and read-index context, and a read confirmed by a later
//! context releases every read queued before it. Yet backlogs of them do build up: the leader
//! broadcasts a heartbeat for every read-index round (hundreds a second under read load), so a
//! follower paused for a few seconds comes back to thousands of them in its socket and its
//! leader's queue. Stepping each one is worse than wasted work: raft answers every heartbeat,
//! and a leader sends a lagging follower a full append (up to `max_size_per_msg` bytes read from
//! the log) for every heartbeat response. Thousands of those kept a leader's loop busy for
//! tens of seconds in the nemesis tests, long enough for the others to elect a new leader it
//! never heard of.
//!
//! Raft tolerates lost messages, so dropping all but the last heartbeat (or response) per
//! sender and term in a batch is just a well-chosen loss.

use raft::eraftpb::{Message, MessageType};
use std::collections::HashSet;

fn is_heartbeat(m: &Message) -> bool {
    matches!(m.get_msg_type(), MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse)
}

/// Removes every heartbeat and heartbeat response that a later one in `batches` (taken in order,
/// as one stream) supersedes: same type, same sender, same receiver, same term. Everything else
/// keeps its place. Returns how many were removed.
pub fn drop_superseded<'a>(batches: impl DoubleEndedIterator<Item = &'a mut Vec<Message>>) -> usize {
    let mut latest: HashSet<(i32, u64, u64, u64)> = HashSet::new();
    let mut dropped = 0;
    for batch in batches.rev() {
        if !batch.iter().any(is_heartbeat) {
            continue;
        }
        // Walk backwards so the first one seen per key is the one that stays.
        let keep: Vec<bool> = batch.iter().rev().map(|m| !is_heartbeat(m) || latest.insert((m.msg_type, m.from, m.to, m.term))).collect();
        let before = batch.len();
        let mut keep = keep.into_iter().rev();
        batch.retain(|_| keep.next().unwrap_or(true));
        dropped += before - batch.len();
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: MessageType, from: u64, term: u64, commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = from;
        m.to = 9;
        m.term = term;
        m.commit = commit;
        m
    }

    fn shape(batch: &[Message]) -> Vec<(MessageType, u64, u64, u64)> {
        batch.iter().map(|m| (m.get_msg_type(), m.from, m.term, m.commit)).collect()
    }

    #[test]
    fn keeps_only_the_last_heartbeat_per_sender_and_term_in_place() {
        use MessageType::*;
        let mut batch = vec![
            msg(MsgHeartbeat, 1, 3, 10),
            msg(MsgAppend, 1, 3, 11),
            msg(MsgHeartbeat, 1, 3, 12),
            msg(MsgHeartbeat, 2, 3, 5),
            msg(MsgHeartbeatResponse, 1, 3, 0),
            msg(MsgHeartbeat, 1, 4, 13),
            msg(MsgHeartbeatResponse, 1, 3, 0),
        ];
        assert_eq!(drop_superseded(std::iter::once(&mut batch)), 2);
        assert_eq!(
            shape(&batch),
            vec![
                (MsgAppend, 1, 3, 11),
                (MsgHeartbeat, 1, 3, 12),
                (MsgHeartbeat, 2, 3, 5),
                (MsgHeartbeat, 1, 4, 13),
                (MsgHeartbeatResponse, 1, 3, 0),
            ]
        );
    }

    #[test]
    fn a_later_batch_supersedes_an_earlier_one() {
        use MessageType::*;
        let mut first = vec![msg(MsgHeartbeat, 1, 3, 10), msg(MsgAppend, 1, 3, 11)];
        let mut second = vec![msg(MsgHeartbeat, 1, 3, 12)];
        let mut third = vec![msg(MsgAppendResponse, 2, 3, 0)];
        assert_eq!(drop_superseded([&mut first, &mut second, &mut third].into_iter()), 1);
        assert_eq!(shape(&first), vec![(MsgAppend, 1, 3, 11)]);
        assert_eq!(shape(&second), vec![(MsgHeartbeat, 1, 3, 12)]);
        assert_eq!(third.len(), 1);
    }

    #[test]
    fn a_backlog_of_thousands_becomes_one() {
        let mut batch: Vec<Message> = (0..3000).map(|i| msg(MessageType::MsgHeartbeatResponse, 2, 7, i)).collect();
        assert_eq!(drop_superseded(std::iter::once(&mut batch)), 2999);
        assert_eq!(shape(&batch), vec![(MessageType::MsgHeartbeatResponse, 2, 7, 2999)]);
    }
}
