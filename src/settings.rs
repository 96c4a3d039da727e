//! The `key=value` arguments given to `MODULE LOAD` / `--loadmodule`, parsed and validated in one
//! place. The module refuses to load on any error, and the message names what is valid.

use crate::config::{Consistency, Durability, Timing};
use crate::ids::{LogIndex, NodeId};
use crate::peer_auth::Password;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the Raft log (LMDB) and node metadata live.
    pub dir: PathBuf,
    /// Side port; `None` means the Redis port + 10000.
    pub raft_port: Option<u16>,
    pub node_id: Option<NodeId>,
    pub consistency: Consistency,
    pub durability: Durability,
    /// `host:port` that clients and peers are told to use for this node's Redis port.
    pub advertise_addr: Option<String>,
    /// How long a write may wait for its commit before the client gets -TIMEOUT.
    pub write_timeout: Duration,
    pub follower_proxy: bool,
    pub timing: Timing,
    /// Take a snapshot once the log has this many entries past the last one (0: only on
    /// RAFT.SNAPSHOT).
    pub snapshot_threshold: u64,
    /// Also take one once this many bytes of entries were applied since the last one (0: no
    /// limit). Counting entries alone lets a log of large values outgrow the disk.
    pub snapshot_log_bytes: u64,
    /// Entries kept behind a snapshot for slightly lagging followers.
    pub trailing_logs: u64,
    /// The memory limit the leader holds writes to, in bytes (0: none); see `memory_limit`.
    pub maxmemory: u64,
    /// The largest log entry a write may make (a command, or a whole transaction). raft copies
    /// an entry several times on every node in one loop round, which holds up heartbeats.
    pub max_entry_bytes: u64,
    /// A log entry calling a script that never ends, which this node does not run (the way out
    /// when it hangs every node, even after a restart).
    pub skip_entry: Option<LogIndex>,
    /// The cluster's shared secret (see [`crate::peer_auth`]); `None` leaves the side port open.
    pub raft_password: Option<Password>,
}

pub const KEYS: &str = "dir, raft-port, node-id, consistency, durability, advertise-addr, write-timeout, \
                        follower-proxy, tick-ms, election-ticks, heartbeat-ticks, snapshot-threshold, snapshot-log-size, trailing-logs, maxmemory, max-entry-size, skip-entry, raft-password";

/// `max-entry-size`: 16 MB by default. On the 2-core test VM one loop round took ~0.3 s for a 16 MB
/// entry and 0.5-1.2 s for 32-64 MB, where a follower's election timeout (1-2 s) is near.
pub const DEFAULT_MAX_ENTRY_BYTES: u64 = 16 << 20;
const MIN_MAX_ENTRY_BYTES: u64 = 1 << 10;
/// Below the side port's largest frame (`resp::MAX_BULK`), with room for the message around it.
const MAX_MAX_ENTRY_BYTES: u64 = 255 << 20;

/// Upper bounds for the timing settings: far beyond any sensible value, and low enough that no
/// timeout computed from them overflows (`Instant + Duration` panics, raft counts ticks in u32).
const MAX_TICK_MS: u64 = 60_000;
const MAX_TICKS: usize = 100_000;
const MAX_WRITE_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("missing required argument dir=PATH")]
    MissingDir,
    #[error("argument '{0}' is not of the form key=value (valid keys: {KEYS})")]
    NotKeyValue(String),
    #[error("unknown argument '{0}' (valid keys: {KEYS})")]
    UnknownKey(String),
    #[error("invalid value '{value}' for {key}: {why}")]
    BadValue { key: String, value: String, why: String },
    #[error("heartbeat-ticks ({heartbeat}) must be less than election-ticks ({election})")]
    HeartbeatNotBelowElection { heartbeat: usize, election: usize },
}

impl Settings {
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Settings, SettingsError> {
        let mut s = Settings {
            dir: PathBuf::new(),
            raft_port: None,
            node_id: None,
            consistency: Consistency::High,
            durability: Durability::High,
            advertise_addr: None,
            write_timeout: Duration::from_secs(5),
            follower_proxy: false,
            timing: Timing::default(),
            snapshot_threshold: 1_000_000,
            snapshot_log_bytes: 1 << 30,
            trailing_logs: 5_000,
            maxmemory: 0,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            skip_entry: None,
            raft_password: None,
        };
        let mut have_dir = false;
        for arg in args {
            let arg = arg.as_ref();
            let (key, value) = arg.split_once('=').ok_or_else(|| SettingsError::NotKeyValue(arg.to_string()))?;
            s.set(key, value)?;
            have_dir |= key.eq_ignore_ascii_case("dir");
        }
        if !have_dir {
            return Err(SettingsError::MissingDir);
        }
        // Once all are in: the order the ticks were given in does not matter.
        s.check_ticks()?;
        Ok(s)
    }

    /// Whether the tick settings fit together; `set` checks each alone, so that load arguments
    /// may come in any order.
    pub fn check_ticks(&self) -> Result<(), SettingsError> {
        let Timing { election_ticks: election, heartbeat_ticks: heartbeat, .. } = self.timing;
        if heartbeat >= election {
            return Err(SettingsError::HeartbeatNotBelowElection { heartbeat, election });
        }
        Ok(())
    }

    /// Sets one setting by name; used for load arguments and for RAFT.CONFIG SET.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SettingsError> {
        let bad = |why: &str| SettingsError::BadValue { key: key.to_string(), value: value.to_string(), why: why.into() };
        match key.to_ascii_lowercase().as_str() {
            "dir" if value.is_empty() => return Err(bad("must not be empty")),
            "dir" => self.dir = PathBuf::from(value),
            "raft-port" => self.raft_port = Some(value.parse().ok().filter(|p| *p > 0).ok_or_else(|| bad("expected a port 1-65535"))?),
            "node-id" => {
                self.node_id = Some(NodeId(value.parse().ok().filter(|v| *v > 0).ok_or_else(|| bad("expected a positive integer"))?))
            }
            "consistency" => {
                self.consistency = value.parse().map_err(|e: crate::config::InvalidLevel| bad(&format!("valid values are {}", e.valid)))?
            }
            "durability" => {
                self.durability = value.parse().map_err(|e: crate::config::InvalidLevel| bad(&format!("valid values are {}", e.valid)))?
            }
            "advertise-addr" => {
                let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
                if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(bad("expected host:port"));
                }
                self.advertise_addr = Some(value.to_string());
            }
            "write-timeout" => {
                let ms = positive_ms(value).filter(|ms| *ms <= MAX_WRITE_TIMEOUT_MS);
                self.write_timeout = Duration::from_millis(ms.ok_or_else(|| bad("expected milliseconds from 1 to 86400000 (a day)"))?)
            }
            "follower-proxy" => {
                self.follower_proxy = match value.to_ascii_lowercase().as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(bad("expected yes or no")),
                }
            }
            "tick-ms" => {
                let ms = positive_ms(value).filter(|ms| *ms <= MAX_TICK_MS);
                self.timing.tick_interval = Duration::from_millis(ms.ok_or_else(|| bad("expected milliseconds from 1 to 60000"))?)
            }
            "election-ticks" => {
                let v = value.parse().ok().filter(|v| (2..=MAX_TICKS).contains(v));
                self.timing.election_ticks = v.ok_or_else(|| bad("expected an integer from 2 to 100000, above heartbeat-ticks"))?;
            }
            "heartbeat-ticks" => {
                let v = value.parse().ok().filter(|v| (1..MAX_TICKS).contains(v));
                self.timing.heartbeat_ticks = v.ok_or_else(|| bad("expected an integer from 1 to 99999, below election-ticks"))?;
            }
            "snapshot-threshold" => {
                self.snapshot_threshold = value.parse().map_err(|_| bad("expected a number of entries (0 disables)"))?
            }
            "snapshot-log-size" => {
                self.snapshot_log_bytes = parse_size(value).ok_or_else(|| bad("expected a size such as 512mb or 2gb (0 disables)"))?
            }
            "trailing-logs" => self.trailing_logs = value.parse().map_err(|_| bad("expected a number of entries"))?,
            "maxmemory" => self.maxmemory = parse_size(value).ok_or_else(|| bad("expected a size such as 512mb or 2gb (0: no limit)"))?,
            "max-entry-size" => {
                self.max_entry_bytes = parse_size(value)
                    .filter(|v| (MIN_MAX_ENTRY_BYTES..=MAX_MAX_ENTRY_BYTES).contains(v))
                    .ok_or_else(|| bad("expected a size from 1kb to 255mb, such as 16mb"))?
            }
            "skip-entry" => {
                self.skip_entry =
                    Some(LogIndex(value.parse().ok().filter(|v| *v > 0).ok_or_else(|| bad("expected a log index (a positive integer)"))?))
            }
            "raft-password" => self.raft_password = Password::new(value.as_bytes()),
            _ => return Err(SettingsError::UnknownKey(key.to_string())),
        }
        Ok(())
    }
}

/// A size the way redis.conf writes them: bytes, or with k/m/g (powers of 1000) or kb/mb/gb
/// (powers of 1024), in any case.
pub fn parse_size(value: &str) -> Option<u64> {
    let lower = value.trim().to_ascii_lowercase();
    let digits = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits);
    let factor: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1 << 10,
        "m" => 1000 * 1000,
        "mb" => 1 << 20,
        "g" => 1000 * 1000 * 1000,
        "gb" => 1 << 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(factor)
}

fn positive_ms(value: &str) -> Option<u64> {
    value.parse::<u64>().ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::parse(&["dir=/tmp/x"]).unwrap();
        assert_eq!(s.consistency, Consistency::High);
        assert_eq!(s.durability, Durability::High);
        assert_eq!(s.write_timeout, Duration::from_secs(5));
        let s = Settings::parse(&["dir=d", "raft-port=17001", "node-id=3", "durability=low", "advertise-addr=10.0.0.1:7001"]).unwrap();
        assert_eq!(s.raft_port, Some(17001));
        assert_eq!(s.node_id, Some(NodeId(3)));
        assert_eq!(s.durability, Durability::Low);
        assert_eq!(s.advertise_addr.as_deref(), Some("10.0.0.1:7001"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(Settings::parse::<&str>(&[]).unwrap_err(), SettingsError::MissingDir);
        assert!(matches!(Settings::parse(&["dir=d", "colour=red"]).unwrap_err(), SettingsError::UnknownKey(k) if k == "colour"));
        assert!(matches!(Settings::parse(&["dir"]).unwrap_err(), SettingsError::NotKeyValue(_)));
        let e = Settings::parse(&["dir=d", "durability=fast"]).unwrap_err().to_string();
        assert_eq!(e, "invalid value 'fast' for durability: valid values are high, medium, low");
        assert!(Settings::parse(&["dir=d", "raft-port=0"]).is_err());
        assert!(Settings::parse(&["dir=d", "advertise-addr=nohost"]).is_err());
        assert!(Settings::parse(&["dir=d", "heartbeat-ticks=50"]).is_err());
        assert!(Settings::parse(&["dir=d", "follower-proxy=yes"]).unwrap().follower_proxy);
        assert!(Settings::parse(&["dir=d", "follower-proxy=maybe"]).is_err());
        assert_eq!(Settings::parse(&["dir=d"]).unwrap().max_entry_bytes, 16 << 20);
        assert_eq!(Settings::parse(&["dir=d", "max-entry-size=64mb"]).unwrap().max_entry_bytes, 64 << 20);
        for bad in ["1000", "256mb", "1gb", "big"] {
            let e = Settings::parse(&["dir=d", &format!("max-entry-size={bad}")]).unwrap_err().to_string();
            assert!(e.contains("1kb to 255mb"), "{bad}: {e}");
        }
        assert_eq!(Settings::parse(&["dir=d"]).unwrap().skip_entry, None);
        assert_eq!(Settings::parse(&["dir=d", "skip-entry=42"]).unwrap().skip_entry, Some(LogIndex(42)));
        assert!(Settings::parse(&["dir=d", "skip-entry=0"]).unwrap_err().to_string().contains("log index"));
        let e = Settings::parse(&["dir=d", "snapshot-log-size=lots"]).unwrap_err().to_string();
        assert!(e.contains("512mb"), "{e}");
        assert_eq!(Settings::parse(&["dir=d"]).unwrap().raft_password, None);
        assert_eq!(Settings::parse(&["dir=d", "raft-password="]).unwrap().raft_password, None);
        assert!(Settings::parse(&["dir=d", "raft-password=a=b"]).unwrap().raft_password.unwrap().matches(b"a=b"));
    }

    #[test]
    fn ticks_may_come_in_any_order_and_are_checked_together() {
        let s = Settings::parse(&["dir=d", "heartbeat-ticks=20", "election-ticks=100"]).unwrap();
        assert_eq!((s.timing.election_ticks, s.timing.heartbeat_ticks), (100, 20));
        let s = Settings::parse(&["dir=d", "election-ticks=2", "heartbeat-ticks=1"]).unwrap();
        assert_eq!((s.timing.election_ticks, s.timing.heartbeat_ticks), (2, 1));
        let e = Settings::parse(&["dir=d", "election-ticks=5", "heartbeat-ticks=5"]).unwrap_err();
        assert_eq!(e, SettingsError::HeartbeatNotBelowElection { heartbeat: 5, election: 5 });
        assert_eq!(e.to_string(), "heartbeat-ticks (5) must be less than election-ticks (5)");
    }

    #[test]
    fn timing_settings_have_bounds_that_keep_timeouts_computable() {
        for (key, ok, bad) in [
            ("tick-ms", "60000", ["0", "60001", "-5"]),
            ("election-ticks", "100000", ["1", "100001", "4294967306"]),
            ("heartbeat-ticks", "1", ["0", "100000", "x"]),
            ("write-timeout", "86400000", ["0", "86400001", "9223372036854775808"]),
        ] {
            let mut s = Settings::parse(&["dir=d"]).unwrap();
            s.set(key, ok).unwrap_or_else(|e| panic!("{key}={ok}: {e}"));
            for value in bad {
                let before = format!("{:?}", s.timing);
                assert!(s.set(key, value).is_err(), "{key}={value}");
                assert_eq!(format!("{:?}", s.timing), before, "{key}={value} changed something");
            }
        }
    }

    #[test]
    fn sizes_read_like_redis_conf() {
        assert_eq!(Settings::parse(&["dir=d"]).unwrap().snapshot_log_bytes, 1 << 30);
        assert_eq!(Settings::parse(&["dir=d", "snapshot-log-size=512MB"]).unwrap().snapshot_log_bytes, 512 << 20);
        assert_eq!(Settings::parse(&["dir=d"]).unwrap().maxmemory, 0);
        assert_eq!(Settings::parse(&["dir=d", "maxmemory=2gb"]).unwrap().maxmemory, 2 << 30);
        assert!(Settings::parse(&["dir=d", "maxmemory=much"]).unwrap_err().to_string().contains("0: no limit"));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1k"), Some(1000));
        assert_eq!(parse_size("1kb"), Some(1024));
        assert_eq!(parse_size("3g"), Some(3_000_000_000));
        assert_eq!(parse_size("2Gb"), Some(2 << 30));
        for bad in ["", "mb", "1.5gb", "-1", "1tb", "1 gb", "99999999999999999999", "18446744073709551615gb"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
