//! TCP keepalive on every side-port connection, both ends.
//!
//! Raft connections carry heartbeats, but some connections stay silent for as long as they wait:
//! a follower's forwarded blocking command waits on the leader, with nothing sent either way,
//! until an element arrives. If the follower's host vanishes without closing the connection (a
//! power cut, a cut cable), nothing but the kernel's probes would ever notice: the leader would
//! keep the command waiting and hand it the next element, which nobody would receive. With the
//! probes, the leader's read fails within about a minute and the command is abandoned. Redis
//! does the same for its clients (`tcp-keepalive`).

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// How long a connection may be silent before the first probe.
pub(super) const IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
const INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the connection is dead: its reads and writes fail.
const PROBES: u32 = 3;

pub(super) fn enable(stream: &impl AsFd) -> io::Result<()> {
    let probes = socket2::TcpKeepalive::new().with_time(IDLE).with_interval(INTERVAL).with_retries(PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&probes)
}
