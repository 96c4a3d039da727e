//! Both ends of the health report (see [`crate::health_report`]): the leader answers `HEALTH`
//! from its status, and a follower asks its leader a few times per failure timeout, keeping the
//! newest answer for its own cluster map.

use super::*;
use crate::cluster_view::failed_after;
use crate::health_report::{HealthReport, LeaderView};

/// Asks per failure timeout: a view stays current for one timeout, so a few asks in it keep it
/// current through a lost answer or two.
const ASKS_PER_TIMEOUT: u32 = 4;
/// How long a follower waits before asking again a leader that does not know `HEALTH` (a node of
/// an earlier build, during an upgrade): each ask costs it a refused connection and a log line.
const UNSUPPORTED_BACKOFF: Duration = Duration::from_secs(60);

/// A follower's asks: at most one in flight, and none before `not_before`.
#[derive(Default)]
pub(super) struct HealthAsks {
    in_flight: AtomicBool,
    not_before: Mutex<Option<Instant>>,
}

/// What the node answers to `HEALTH`, from the status the loop last published.
pub(super) fn answer(shared: &Shared) -> Result<String, String> {
    let st = shared.status.lock().unwrap_or_else(|p| p.into_inner());
    let report = HealthReport::of(&st, st.failed_after());
    report.map(|r| r.encode()).ok_or_else(|| match st.leader {
        Some(leader) => format!("ERR node {} is not the leader; node {leader} is", st.id),
        None => format!("ERR node {} is not the leader and knows none", st.id),
    })
}

impl<S: StateMachine> RaftLoop<S> {
    /// On a follower, at a tick: asks the leader for its report if it is time to.
    pub(super) fn ask_leader_health(&mut self) {
        let raft = &self.raw.raft;
        let leader = NodeId(raft.leader_id);
        if raft.state == StateRole::Leader || raft.leader_id == 0 {
            // A leader sees for itself; a node without one has no map to show.
            return;
        }
        let asks = self.health_asks.clone();
        let every = failed_after(self.tick_interval(), raft.election_timeout()) / ASKS_PER_TIMEOUT;
        let now = Instant::now();
        {
            let mut not_before = asks.not_before.lock().unwrap_or_else(|p| p.into_inner());
            if not_before.is_some_and(|at| now < at) || asks.in_flight.load(Ordering::Acquire) {
                return;
            }
            *not_before = Some(now + every);
        }
        let Some(addr) = self.transport.peer_addr(leader) else { return };
        asks.in_flight.store(true, Ordering::Release);
        let shared = self.shared.clone();
        self.transport.ask_health(
            addr,
            every * 2,
            Box::new(move |answer| {
                asks.in_flight.store(false, Ordering::Release);
                let report = answer.and_then(|raw| HealthReport::parse(&raw));
                match report {
                    Ok(report) if report.leader == leader => {
                        let view = LeaderView { report, received: Instant::now() };
                        shared.status.lock().unwrap_or_else(|p| p.into_inner()).leader_view = Some(Arc::new(view));
                    }
                    Ok(report) => log::debug!("node {leader} answered HEALTH as node {}", report.leader),
                    Err(e) if e.contains("unknown command") => {
                        log::info!("node {leader} does not report members' health (an earlier build?); asking again in a minute");
                        *asks.not_before.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + UNSUPPORTED_BACKOFF);
                    }
                    Err(e) => log::debug!("asking node {leader} for its health report: {e}"),
                }
            }),
        );
    }
}
