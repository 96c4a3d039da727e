//! What the leader tells followers of every member's health, so that any node's cluster map flags
//! the members the cluster has lost, as every Redis Cluster node flags the ones it cannot reach.
//!
//! Only the leader hears from every member. A follower asks it on the side port (`HEALTH`, a few
//! times per failure timeout, see the node's `leader_health`) and keeps the newest answer as a
//! [`LeaderView`]. The answer is text an operator can read with `redis-cli -p <side port> HEALTH`:
//!
//! ```text
//! leader 1
//! term 4
//! 2 online
//! 3 fail
//! ```
//!
//! A view counts only while it is younger than the failure timeout and from the leader and term
//! the follower knows now: an old one would keep flagging a member that came back, or keep showing
//! online one that has gone since. Without a current view a follower shows every member online,
//! as before it had any.

use crate::cluster_view::Health;
use crate::ids::{NodeId, Term};
use crate::status::Status;
use std::time::{Duration, Instant};

/// The side-port request a follower sends.
pub const HEALTH: &[u8] = b"HEALTH";

/// The leader's answer to [`HEALTH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub leader: NodeId,
    pub term: Term,
    /// Every member but the leader, in id order.
    pub members: Vec<(NodeId, Health)>,
}

/// A report as a follower received it.
#[derive(Clone, Debug)]
pub struct LeaderView {
    pub report: HealthReport,
    pub received: Instant,
}

impl HealthReport {
    /// What the node of status `st` answers: its view of the others if it leads, else nothing.
    pub fn of(st: &Status, failed_after: Duration) -> Option<HealthReport> {
        if !st.is_leader() {
            return None;
        }
        let mut ids: Vec<NodeId> = st.voters.iter().chain(&st.learners).copied().filter(|id| *id != st.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let members = ids.into_iter().map(|id| (id, seen_by_leader(st, id, failed_after))).collect();
        Some(HealthReport { leader: st.id, term: st.term, members })
    }

    pub fn encode(&self) -> String {
        let mut text = format!("leader {}\nterm {}\n", self.leader, self.term);
        for (id, health) in &self.members {
            text.push_str(&format!("{id} {}\n", health.as_str()));
        }
        text
    }

    pub fn parse(text: &[u8]) -> Result<HealthReport, String> {
        let text = std::str::from_utf8(text).map_err(|_| "a health report that is not UTF-8".to_string())?;
        let mut lines = text.lines();
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("a health report without its '{name}' line: {text:?}"))
        };
        let (leader, term) = (NodeId(field("leader")?), Term(field("term")?));
        let members = lines
            .map(|line| {
                let (id, health) = line.split_once(' ').ok_or_else(|| format!("a malformed health line {line:?}"))?;
                let id = id.parse::<u64>().map_err(|_| format!("a malformed node id in {line:?}"))?;
                let health = Health::parse(health).ok_or_else(|| format!("an unknown health in {line:?}"))?;
                Ok((NodeId(id), health))
            })
            .collect::<Result<_, String>>()?;
        Ok(HealthReport { leader, term, members })
    }
}

impl LeaderView {
    /// How `id` is doing by this view, if the view still counts for the node of status `st`.
    pub fn health_of(&self, st: &Status, id: NodeId, failed_after: Duration) -> Option<Health> {
        let current = st.leader == Some(self.report.leader) && st.term == self.report.term && self.received.elapsed() < failed_after;
        if !current {
            return None;
        }
        self.report.members.iter().find(|(m, _)| *m == id).map(|(_, health)| *health)
    }
}

/// How member `id` is doing as the node of status `st` knows it: by its own ears on the leader,
/// from the leader's current report on a follower. `None` for itself (it is answering), and on
/// a follower for the leader and whenever it has no current report.
pub fn health_of(st: &Status, id: NodeId, failed_after: Duration) -> Option<Health> {
    if id == st.id {
        None
    } else if st.is_leader() {
        Some(seen_by_leader(st, id, failed_after))
    } else {
        st.leader_view.as_ref()?.health_of(st, id, failed_after)
    }
}

/// How the leader of status `st` sees member `id`: failed once it has heard nothing from it for
/// `failed_after`, loading while it sends it a snapshot.
pub fn seen_by_leader(st: &Status, id: NodeId, failed_after: Duration) -> Health {
    match st.progress_of(id) {
        Some(p) if p.silent_for >= failed_after => Health::Failed,
        Some(p) if p.state == "snapshot" => Health::Loading,
        _ => Health::Online,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::LogIndex;
    use crate::status::{PeerProgress, Role};

    const FAILED_AFTER: Duration = Duration::from_secs(2);

    fn leader_status() -> Status {
        let peer = |id: u64, state: &str, silent_ms: u64| PeerProgress {
            id: NodeId(id),
            matched: LogIndex(5),
            next: LogIndex(6),
            state: state.into(),
            is_learner: id == 5,
            silent_for: Duration::from_millis(silent_ms),
        };
        let mut st = Status::initial(NodeId(1));
        st.role = Role::Leader;
        st.leader = Some(NodeId(1));
        st.term = Term(4);
        st.voters = vec![NodeId(1), NodeId(3), NodeId(2), NodeId(4)];
        st.learners = vec![NodeId(5)];
        st.progress = vec![peer(2, "replicate", 10), peer(3, "probe", 2_500), peer(4, "snapshot", 10), peer(5, "replicate", 10)];
        st
    }

    #[test]
    fn the_leader_reports_every_other_member_and_the_report_reads_back() {
        let report = HealthReport::of(&leader_status(), FAILED_AFTER).unwrap();
        let text = report.encode();
        assert_eq!(text, "leader 1\nterm 4\n2 online\n3 fail\n4 loading\n5 online\n");
        assert_eq!(HealthReport::parse(text.as_bytes()), Ok(report));
        // A follower has nothing to report.
        let mut follower = leader_status();
        follower.role = Role::Follower;
        assert_eq!(HealthReport::of(&follower, FAILED_AFTER), None);
    }

    #[test]
    fn malformed_reports_are_refused() {
        for bad in [
            "",
            "leader 1\n",
            "term 4\nleader 1\n",
            "leader 1\nterm 4\n2\n",
            "leader 1\nterm 4\nx online\n",
            "leader 1\nterm 4\n2 sleepy\n",
        ] {
            assert!(HealthReport::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(HealthReport::parse(b"leader 1\nterm 4\n").is_ok_and(|r| r.members.is_empty()));
    }

    #[test]
    fn a_view_counts_only_while_it_is_recent_and_from_the_current_leader_and_term() {
        let report = HealthReport::of(&leader_status(), FAILED_AFTER).unwrap();
        let view = |age: Duration| LeaderView { report: report.clone(), received: Instant::now() - age };
        let mut follower = Status::initial(NodeId(2));
        follower.leader = Some(NodeId(1));
        follower.term = Term(4);
        let fresh = view(Duration::ZERO);
        assert_eq!(fresh.health_of(&follower, NodeId(3), FAILED_AFTER), Some(Health::Failed));
        // Through the node's own status: never itself, never the leader (not in the report).
        let mut with_view = follower.clone();
        with_view.leader_view = Some(std::sync::Arc::new(fresh.clone()));
        let known = |id: u64| health_of(&with_view, NodeId(id), FAILED_AFTER);
        assert_eq!([known(1), known(2), known(3)], [None, None, Some(Health::Failed)]);
        assert_eq!(health_of(&leader_status(), NodeId(3), FAILED_AFTER), Some(Health::Failed));
        assert_eq!(health_of(&leader_status(), NodeId(1), FAILED_AFTER), None);
        assert_eq!(fresh.health_of(&follower, NodeId(4), FAILED_AFTER), Some(Health::Loading));
        assert_eq!(fresh.health_of(&follower, NodeId(9), FAILED_AFTER), None);
        assert_eq!(view(FAILED_AFTER).health_of(&follower, NodeId(3), FAILED_AFTER), None);
        let mut later = follower.clone();
        later.term = Term(5);
        assert_eq!(fresh.health_of(&later, NodeId(3), FAILED_AFTER), None);
        let mut other_leader = follower;
        other_leader.leader = Some(NodeId(4));
        assert_eq!(fresh.health_of(&other_leader, NodeId(3), FAILED_AFTER), None);
    }
}
