//! Timers whose work is over before they fire (a blocked client answered before its backstop, a
//! pop served before its timeout). Redis' timers may only be stopped on its main thread, and the
//! work may end on another, so they are stopped before Redis next sleeps. Left to fire, a client
//! popping in a loop with a long timeout would leave one behind each time.

use crate::ffi::{self, api, RedisModuleCtx};
use redis_module::raw::RedisModuleTimerID;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A timer to stop, as it was created: Redis' timer ids are times, which a later timer may get
/// again once this one has fired, so its data tells them apart.
pub struct StaleTimer {
    pub id: RedisModuleTimerID,
    pub data: *mut c_void,
    /// Given the data once the timer is stopped (not if it fired first: its callback had it).
    pub stopped: fn(*mut c_void),
}

// Only the main thread stops them or calls `stopped`.
unsafe impl Send for StaleTimer {}

static STALE: Mutex<Vec<StaleTimer>> = Mutex::new(Vec::new());
static ANY: AtomicBool = AtomicBool::new(false);

/// From any thread: `timer` is stopped before Redis next sleeps, unless it fires first.
pub fn stop_later(timer: StaleTimer) {
    STALE.lock().unwrap_or_else(|p| p.into_inner()).push(timer);
    ANY.store(true, Ordering::Release);
}

/// Before Redis sleeps: stops them.
pub fn before_sleep(ctx: *mut RedisModuleCtx) {
    if !ANY.swap(false, Ordering::AcqRel) {
        return;
    }
    let timers = std::mem::take(&mut *STALE.lock().unwrap_or_else(|p| p.into_inner()));
    for timer in timers {
        let (mut remaining, mut data): (u64, *mut c_void) = (0, std::ptr::null_mut());
        let found = unsafe { api!(RedisModule_GetTimerInfo)(ctx, timer.id, &mut remaining, &mut data) } == ffi::OK;
        if !found || data != timer.data {
            continue;
        }
        if unsafe { api!(RedisModule_StopTimer)(ctx, timer.id, &mut data) } == ffi::OK {
            (timer.stopped)(data);
        }
    }
}
