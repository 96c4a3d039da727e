//! `SORT ... ALPHA` compares strings with `strcoll`, that is by the process's `LC_COLLATE`, which
//! Redis takes from its environment when it starts. Nodes started in different locales (one by
//! systemd, one from a shell with `LANG=en_US.UTF-8`) would store a `SORT ... ALPHA STORE` in
//! different orders, and a script that acts on such a sort would act differently on each. Every
//! node compares bytes instead: the `C` collation, Redis' own in a process with no locale set.

use std::ffi::{CStr, CString};

/// At load: collation by bytes. Returns the collation the process had, to put back should the
/// load fail.
pub fn bytewise() -> Option<CString> {
    let previous = current();
    set(c"C");
    if let Some(name) = previous.as_deref().filter(|n| !matches!(n.to_bytes(), b"C" | b"POSIX")) {
        log::warn!(
            "LC_COLLATE was '{}': SORT ... ALPHA compares bytes instead (the C locale), alike on every node",
            name.to_string_lossy()
        );
    }
    previous
}

/// Puts back the collation [`bytewise`] found.
pub fn restore(previous: &CStr) {
    set(previous);
}

fn current() -> Option<CString> {
    // A null locale asks for the current one without changing it.
    let name = unsafe { libc::setlocale(libc::LC_COLLATE, std::ptr::null()) };
    (!name.is_null()).then(|| unsafe { CStr::from_ptr(name) }.to_owned())
}

fn set(name: &CStr) {
    if unsafe { libc::setlocale(libc::LC_COLLATE, name.as_ptr()) }.is_null() {
        log::warn!("could not set LC_COLLATE to '{}'", name.to_string_lossy());
    }
}
