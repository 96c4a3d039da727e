//! Routes the `log` facade (core, raft, module) into the Redis log, so an operator finds Raft
//! events next to Redis' own.

use crate::ffi;
use log::{Level, LevelFilter, Log, Metadata, Record};

struct RedisLog;

impl Log for RedisLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // raft-rs is chatty at info level about every probe; keep its warnings and elections.
        metadata.level() <= Level::Info
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error | Level::Warn => "warning",
            Level::Info => "notice",
            Level::Debug => "verbose",
            Level::Trace => "debug",
        };
        ffi::log_line(level, &format!("<raft> {}", record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: RedisLog = RedisLog;

pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}
