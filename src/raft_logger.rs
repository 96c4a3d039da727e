//! raft-rs logs through `slog`; the rest of Raftis (and the Redis module's log) uses the `log`
//! facade. This drain forwards records, with their key-value pairs, so elections and term changes
//! show up in the Redis log.

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};
use std::fmt::{self, Write};

struct ToLog;

struct KvLine(String);

impl Serializer for KvLine {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {}={}", key, val);
        Ok(())
    }
}

impl Drain for ToLog {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => log::Level::Error,
            slog::Level::Warning => log::Level::Warn,
            slog::Level::Info => log::Level::Info,
            slog::Level::Debug => log::Level::Debug,
            slog::Level::Trace => log::Level::Trace,
        };
        if !log::log_enabled!(target: "raft", level) {
            return Ok(());
        }
        let mut kv = KvLine(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        log::log!(target: "raft", level, "{}{}", record.msg(), kv.0);
        Ok(())
    }
}

pub fn logger(node: u64) -> slog::Logger {
    slog::Logger::root(ToLog.fuse(), slog::o!("raft_id" => node))
}
