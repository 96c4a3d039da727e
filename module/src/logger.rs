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
        log_panics();
    }
}

/// Panics go to the Redis log too. Rust prints them on stderr, which a daemonized redis-server
/// has pointed at /dev/null, so a panic caught on its way (a command handler's, the Raft
/// loop's) would otherwise leave no trace of where it happened.
fn log_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let message = raftis_core::unwind::panic_message(info.payload());
        log::error!("panic on thread '{}'{location}: {message}", thread.name().unwrap_or("unnamed"));
        previous(info);
    }));
}
