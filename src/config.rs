//! Settings of a node that an operator chooses: durability and read consistency levels,
//! timing. Parsing lives here so that the module and the tests accept exactly the same words.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When a write reaches the disk, relative to when it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync before any message or reply that depends on the write (group commit: one fsync per
    /// batch of proposals). A node that crashes loses nothing it acknowledged.
    High,
    /// fsync once a second from a background thread. A power loss on a majority can lose up to
    /// about a second of acknowledged writes; a process crash loses nothing (the OS has the pages).
    Medium,
    /// Never fsync explicitly; the OS writes back dirty pages when it likes (typically within 30 s).
    /// A process crash loses nothing; a power loss on a majority can lose tens of seconds.
    Low,
}

/// Which reads a node serves, and how fresh they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable: the leader confirms leadership with a ReadIndex round before serving.
    High,
    /// Leader-local reads once the leader has applied an entry of its own term.
    Medium,
    /// Every node serves from its local dataset, possibly stale.
    Low,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} '{got}', valid values are: {valid}")]
pub struct InvalidLevel {
    pub what: &'static str,
    pub got: String,
    pub valid: &'static str,
}

macro_rules! level_words {
    ($ty:ident, $what:literal) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $ty::High => "high",
                    $ty::Medium => "medium",
                    $ty::Low => "low",
                }
            }
        }

        impl FromStr for $ty {
            type Err = InvalidLevel;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.to_ascii_lowercase().as_str() {
                    "high" => Ok($ty::High),
                    "medium" => Ok($ty::Medium),
                    "low" => Ok($ty::Low),
                    _ => Err(InvalidLevel { what: $what, got: s.to_string(), valid: "high, medium, low" }),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

level_words!(Durability, "durability");
level_words!(Consistency, "consistency");

/// Raft timing. One tick is `tick_interval`; elections time out after a random number of ticks
/// in `[election_ticks, 2 * election_ticks)`.
#[derive(Clone, Debug)]
pub struct Timing {
    pub tick_interval: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

impl Default for Timing {
    fn default() -> Self {
        // 100 ms ticks, elections after 1-2 s, heartbeats every 200 ms: quick failover on a LAN
        // without spurious elections when a node is briefly busy (a fork, a slow fsync).
        Timing { tick_interval: Duration::from_millis(100), election_ticks: 10, heartbeat_ticks: 2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_case_insensitively_and_name_valid_values_on_error() {
        assert_eq!("HIGH".parse::<Durability>(), Ok(Durability::High));
        assert_eq!("low".parse::<Consistency>(), Ok(Consistency::Low));
        let err = "fast".parse::<Durability>().unwrap_err();
        assert_eq!(err.to_string(), "invalid durability 'fast', valid values are: high, medium, low");
    }
}
