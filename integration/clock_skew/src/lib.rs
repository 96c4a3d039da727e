//! Preloaded into a process (`LD_PRELOAD`), moves its wall clock by `RAFTIS_CLOCK_SKEW_MS`
//! milliseconds (negative: behind): every reading of `CLOCK_REALTIME` through `clock_gettime`,
//! `gettimeofday` or `time`, Redis' and the module's alike. Monotonic clocks are left alone, so
//! timeouts and Raft's ticks run as on any machine whose clock is off.
//!
//! Readings go straight to the kernel rather than through libc's functions: finding those would
//! take `dlsym`, which allocates, and jemalloc (Redis' allocator) reads the clock while it sets
//! itself up. (That is why libfaketime hangs redis-server.) Nothing here allocates or panics.

use libc::{c_int, c_long, clockid_t, time_t, timespec, timeval};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

const VARIABLE: &[u8] = b"RAFTIS_CLOCK_SKEW_MS\0";

static SKEW_MS: AtomicI64 = AtomicI64::new(0);
static READ: AtomicBool = AtomicBool::new(false);

/// The skew, read from the environment once (a race only reads it twice).
fn skew_ms() -> i64 {
    if !READ.load(Ordering::Acquire) {
        let value = unsafe { libc::getenv(VARIABLE.as_ptr().cast()) };
        let ms = if value.is_null() { 0 } else { parse(unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes()) };
        SKEW_MS.store(ms, Ordering::Relaxed);
        READ.store(true, Ordering::Release);
    }
    SKEW_MS.load(Ordering::Relaxed)
}

/// A decimal number of milliseconds, maybe signed; 0 for anything else.
fn parse(text: &[u8]) -> i64 {
    let (sign, digits) = match text.split_first() {
        Some((b'-', rest)) => (-1, rest),
        Some((b'+', rest)) => (1, rest),
        _ => (1, text),
    };
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    sign * digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
}

/// `seconds` and `nanos` moved by `skew_ms`, the nanoseconds kept within a second.
fn shifted(seconds: i64, nanos: i64, skew_ms: i64) -> (i64, i64) {
    let total = nanos + (skew_ms % 1000) * 1_000_000;
    (seconds + skew_ms / 1000 + total.div_euclid(1_000_000_000), total.rem_euclid(1_000_000_000))
}

/// # Safety
/// As libc's: `tp` is null or points to a `timespec`.
#[no_mangle]
pub unsafe extern "C" fn clock_gettime(clock: clockid_t, tp: *mut timespec) -> c_int {
    let result = libc::syscall(libc::SYS_clock_gettime, clock as c_long, tp) as c_int;
    if result == 0 && !tp.is_null() && matches!(clock, libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE) {
        let (seconds, nanos) = shifted((*tp).tv_sec, (*tp).tv_nsec, skew_ms());
        (*tp).tv_sec = seconds;
        (*tp).tv_nsec = nanos;
    }
    result
}

/// # Safety
/// As libc's: `tv` is null or points to a `timeval`; `tz` is ignored by Linux but passed on.
#[no_mangle]
pub unsafe extern "C" fn gettimeofday(tv: *mut timeval, tz: *mut libc::c_void) -> c_int {
    let result = libc::syscall(libc::SYS_gettimeofday, tv, tz) as c_int;
    if result == 0 && !tv.is_null() {
        let (seconds, nanos) = shifted((*tv).tv_sec, (*tv).tv_usec * 1000, skew_ms());
        (*tv).tv_sec = seconds;
        (*tv).tv_usec = nanos / 1000;
    }
    result
}

/// # Safety
/// As libc's: `out` is null or points to a `time_t`.
#[no_mangle]
pub unsafe extern "C" fn time(out: *mut time_t) -> time_t {
    let mut now = timespec { tv_sec: 0, tv_nsec: 0 };
    if clock_gettime(libc::CLOCK_REALTIME, &mut now) != 0 {
        return -1;
    }
    if !out.is_null() {
        *out = now.tv_sec;
    }
    now.tv_sec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_moves_seconds_and_keeps_nanoseconds_within_a_second() {
        assert_eq!(shifted(100, 900_000_000, 250), (101, 150_000_000));
        assert_eq!(shifted(100, 100_000_000, -250), (99, 850_000_000));
        assert_eq!(shifted(100, 0, 5000), (105, 0));
        assert_eq!(shifted(100, 0, -5000), (95, 0));
    }

    #[test]
    fn the_skew_is_a_signed_number_of_milliseconds_or_none() {
        assert_eq!(parse(b"5000"), 5000);
        assert_eq!(parse(b"+5000"), 5000);
        assert_eq!(parse(b"-250"), -250);
        for bad in [&b""[..], b"-", b"5s", b"1e3", b"99999999999999999999"] {
            assert_eq!(parse(bad), 0, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
