//! Redis' wall clock, pinned to a log entry's time while that entry runs.
//!
//! A few writes record or compare the time by Redis' own clock: `XREADGROUP` stamps each message
//! it delivers with a delivery time, `XCLAIM` and `XAUTOCLAIM` claim the messages idle for at least
//! so long, and consumers remember when they were last seen. Applied by each node at its own
//! moment, they would give each node its own pending-entries list, and `XAUTOCLAIM` could claim a
//! message on one node and not on another. Run with the clock pinned to the entry's time (the
//! moment the leader proposed it), they do the same thing on every node however late it applies.
//!
//! Redis reads the wall clock with `gettimeofday` (its `ustime`, `mstime` and cached time all come
//! from it). Redis has no module API to set it, so the module points `redis-server`'s own import
//! of `gettimeofday` (its GOT slot, found through the executable's dynamic relocations) at
//! [`hooked_gettimeofday`], which answers the pinned time on Redis' main thread while [`pinned`]
//! runs and defers to libc otherwise. Nothing else in the process is touched: libraries, the
//! module's own threads and Redis' other threads read the real clock. Without the hook (an
//! executable linked some other way), the commands that need it are refused ([`available`]).
//!
//! Only the commands in `raftis_core::determinism::RUN_BY_THE_LOG_CLOCK` run pinned, so only their
//! timings are lost: Redis times a command by the same clock, and `INFO commandstats` and the slow
//! log count 0 µs for them; every other command keeps the real clock.

use std::ffi::{c_void, CStr};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Milliseconds since the epoch that the main thread's clock reads, or -1 for the real clock.
static PINNED_MS: AtomicI64 = AtomicI64::new(-1);
/// `pthread_self()` of Redis' main thread (the thread the module is loaded on).
static MAIN_THREAD: AtomicU64 = AtomicU64::new(0);
/// libc's `gettimeofday`, as the slot held it before the hook.
static ORIGINAL: AtomicUsize = AtomicUsize::new(0);
/// The address of the hooked slot, 0 before the hook.
static SLOT: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

type GetTimeOfDay = unsafe extern "C" fn(*mut libc::timeval, *mut c_void) -> c_int;

/// At load, on the main thread: installs the hook. Returns how the clock works here, for the log.
pub fn init() -> String {
    let installed = INSTALLED.get_or_init(|| {
        MAIN_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
        unsafe { install() }.and_then(|()| self_test())
    });
    match installed {
        Ok(()) => "stream consumer groups run by the log's clock".into(),
        Err(why) => format!("{why}: XREADGROUP, XCLAIM and XAUTOCLAIM are refused"),
    }
}

/// Whether writes that read the clock can be run by the log's clock here.
pub fn available() -> Result<(), String> {
    match INSTALLED.get() {
        Some(Ok(())) => Ok(()),
        Some(Err(why)) => Err(why.clone()),
        None => Err("the clock hook is not initialised".into()),
    }
}

/// Runs `f` with Redis' wall clock reading `ms` on this (the main) thread.
pub fn pinned<T>(ms: i64, f: impl FnOnce() -> T) -> T {
    struct Unpin(i64);
    impl Drop for Unpin {
        fn drop(&mut self) {
            PINNED_MS.store(self.0, Ordering::Relaxed);
        }
    }
    let _unpin = Unpin(PINNED_MS.swap(ms.max(0), Ordering::Relaxed));
    f()
}

/// How far behind the real clock the main thread's clock runs, in microseconds (0: not behind),
/// and the time it never passes meanwhile: see [`behind`].
static BEHIND_US: AtomicI64 = AtomicI64::new(0);
static BEHIND_CAP_US: AtomicI64 = AtomicI64::new(i64::MAX);

/// Runs `f` with Redis' wall clock on this (the main) thread reading `until_ms - lead` now,
/// running on from there, but never past `until_ms`. Redis' background expiry runs this way (see
/// `expiry`): it deletes by the time it reads, and stops by the time that passes, which still
/// passes as it should until it has had `lead`.
pub fn behind<T>(until_ms: i64, lead: std::time::Duration, f: impl FnOnce() -> T) -> T {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            BEHIND_US.store(0, Ordering::Relaxed);
            BEHIND_CAP_US.store(i64::MAX, Ordering::Relaxed);
        }
    }
    let now_us = real_now_us(std::time::SystemTime::now());
    let start_us = until_ms.saturating_mul(1000).saturating_sub(lead.as_micros() as i64);
    BEHIND_CAP_US.store(until_ms.saturating_mul(1000), Ordering::Relaxed);
    BEHIND_US.store((now_us - start_us).max(1), Ordering::Relaxed);
    let _restore = Restore;
    f()
}

/// The real wall clock in milliseconds since the epoch, whatever Redis' main thread reads now.
pub fn real_now_ms() -> i64 {
    real_now_us(std::time::SystemTime::now()) / 1000
}

fn real_now_us(now: std::time::SystemTime) -> i64 {
    now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

unsafe extern "C" fn hooked_gettimeofday(tv: *mut libc::timeval, tz: *mut c_void) -> c_int {
    let behind_us = BEHIND_US.load(Ordering::Relaxed);
    if behind_us != 0 && !tv.is_null() && libc::pthread_self() as u64 == MAIN_THREAD.load(Ordering::Relaxed) {
        let original: GetTimeOfDay = std::mem::transmute(ORIGINAL.load(Ordering::Relaxed));
        let result = original(tv, tz);
        if result == 0 {
            let real = (*tv).tv_sec * 1_000_000 + (*tv).tv_usec;
            let shown = (real - behind_us).min(BEHIND_CAP_US.load(Ordering::Relaxed));
            (*tv).tv_sec = shown.div_euclid(1_000_000) as libc::time_t;
            (*tv).tv_usec = shown.rem_euclid(1_000_000) as libc::suseconds_t;
        }
        return result;
    }
    let ms = PINNED_MS.load(Ordering::Relaxed);
    // pthread_self is a register read and safe in a signal handler, unlike thread-locals of a
    // dlopen'ed library (which may allocate on first use).
    if ms >= 0 && !tv.is_null() && libc::pthread_self() as u64 == MAIN_THREAD.load(Ordering::Relaxed) {
        (*tv).tv_sec = (ms / 1000) as libc::time_t;
        (*tv).tv_usec = ((ms % 1000) * 1000) as libc::suseconds_t;
        return 0;
    }
    let original: GetTimeOfDay = std::mem::transmute(ORIGINAL.load(Ordering::Relaxed));
    original(tv, tz)
}

/// Pins the clock, reads it through Redis' own `mstime`, and checks both ways.
fn self_test() -> Result<(), String> {
    let mstime: unsafe extern "C" fn() -> i64 = unsafe { crate::ffi::find_function("mstime")? };
    let pinned_read = pinned(1_234_567, || unsafe { mstime() });
    let real = unsafe { mstime() };
    let now = real_now_ms();
    if pinned_read != 1_234_567 || (real - now).abs() > 60_000 {
        return Err(format!("the clock hook does not take (pinned read {pinned_read}, real {real}, now {now})"));
    }
    Ok(())
}

// The executable's dynamic section, as far as finding one import's GOT slot needs it.
const DT_NULL: i64 = 0;
const DT_PLTRELSZ: i64 = 2;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_RELA: i64 = 7;
const DT_RELASZ: i64 = 8;
const DT_JMPREL: i64 = 23;

#[repr(C)]
struct Dyn {
    tag: i64,
    value: u64,
}

#[repr(C)]
struct Rela {
    offset: u64,
    info: u64,
    addend: i64,
}

#[repr(C)]
struct Sym {
    name: u32,
    info: u8,
    other: u8,
    section: u16,
    value: u64,
    size: u64,
}

/// Where the main executable is loaded and where its dynamic section is.
struct Executable {
    base: usize,
    dynamic: *const Dyn,
}

unsafe extern "C" fn first_object(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
    let found = &mut *(data as *mut Option<Executable>);
    let info = &*info;
    let headers = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
    *found = headers
        .iter()
        .find(|h| h.p_type == libc::PT_DYNAMIC)
        .map(|h| Executable { base: info.dlpi_addr as usize, dynamic: (info.dlpi_addr as usize + h.p_vaddr as usize) as *const Dyn });
    1 // the first object is the executable: stop there
}

/// Points the executable's GOT slot for `gettimeofday` at the hook.
unsafe fn install() -> Result<(), String> {
    if !cfg!(all(target_os = "linux", target_pointer_width = "64")) {
        return Err("the clock hook needs 64-bit Linux".into());
    }
    let mut exe: Option<Executable> = None;
    libc::dl_iterate_phdr(Some(first_object), &mut exe as *mut Option<Executable> as *mut c_void);
    let exe = exe.ok_or("redis-server has no dynamic section")?;
    // Depending on the loader, addresses in the dynamic section are absolute or load-relative.
    let address = |value: u64| if (value as usize) < exe.base { exe.base + value as usize } else { value as usize };
    let (mut strtab, mut symtab, mut tables) = (0, 0, [(0usize, 0usize); 2]);
    let mut entry = exe.dynamic;
    while (*entry).tag != DT_NULL {
        let value = (*entry).value;
        match (*entry).tag {
            DT_STRTAB => strtab = address(value),
            DT_SYMTAB => symtab = address(value),
            DT_JMPREL => tables[0].0 = address(value),
            DT_PLTRELSZ => tables[0].1 = value as usize,
            DT_RELA => tables[1].0 = address(value),
            DT_RELASZ => tables[1].1 = value as usize,
            _ => {}
        }
        entry = entry.add(1);
    }
    if strtab == 0 || symtab == 0 {
        return Err("redis-server's dynamic section has no symbol table".into());
    }
    let slot = tables
        .iter()
        .filter(|(at, len)| *at != 0 && *len != 0)
        .flat_map(|(at, len)| std::slice::from_raw_parts(*at as *const Rela, len / std::mem::size_of::<Rela>()))
        .find(|r| {
            let sym = &*((symtab as *const Sym).add((r.info >> 32) as usize));
            sym.name != 0 && CStr::from_ptr((strtab + sym.name as usize) as *const libc::c_char).to_bytes() == b"gettimeofday"
        })
        .map(|r| (exe.base + r.offset as usize) as *mut usize)
        .ok_or("redis-server does not import gettimeofday")?;
    let original = *slot;
    if original == 0 {
        return Err("redis-server's gettimeofday slot is not bound".into());
    }
    ORIGINAL.store(original, Ordering::Relaxed);
    write_protected(slot, hooked_gettimeofday as GetTimeOfDay as usize)?;
    SLOT.store(slot as usize, Ordering::Relaxed);
    Ok(())
}

/// A load that failed after [`init`]: `redis-server`'s slot points at libc's `gettimeofday`
/// again, not into a module Redis lets go of. (For good: the process must restart to load the
/// module again, whose hook stays recorded as installed.)
pub fn unhook() {
    let slot = SLOT.swap(0, Ordering::Relaxed);
    if slot != 0 {
        if let Err(why) = unsafe { write_protected(slot as *mut usize, ORIGINAL.load(Ordering::Relaxed)) } {
            log::warn!("could not give gettimeofday back to redis-server: {why}");
        }
    }
}

/// Stores `value` at `slot`, which may lie in memory the loader made read-only after binding
/// (RELRO): the page is made writable for the store, then given its protection back.
unsafe fn write_protected(slot: *mut usize, value: usize) -> Result<(), String> {
    let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
    let start = (slot as usize) & !(page - 1);
    let protection = protection_of(slot as usize)?;
    let writable = protection & libc::PROT_WRITE != 0;
    if !writable && libc::mprotect(start as *mut c_void, page, libc::PROT_READ | libc::PROT_WRITE) != 0 {
        return Err(format!("cannot make the GOT writable: {}", std::io::Error::last_os_error()));
    }
    // An aligned word store: a thread calling through the slot meanwhile sees the old or the new
    // function, both of which answer the real time.
    std::ptr::write_volatile(slot, value);
    if !writable && libc::mprotect(start as *mut c_void, page, protection) != 0 {
        log::warn!("could not restore the GOT's protection: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The protection of the mapping holding `address`, from /proc/self/maps.
fn protection_of(address: usize) -> Result<c_int, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let Some((from, to)) = range.split_once('-') else { continue };
        let (Ok(from), Ok(to)) = (usize::from_str_radix(from, 16), usize::from_str_radix(to, 16)) else { continue };
        if (from..to).contains(&address) {
            let flag = |c: char, p: c_int| if perms.contains(c) { p } else { 0 };
            return Ok(flag('r', libc::PROT_READ) | flag('w', libc::PROT_WRITE) | flag('x', libc::PROT_EXEC));
        }
    }
    Err(format!("no mapping holds address {address:#x}"))
}
