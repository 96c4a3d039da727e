//! Free space on the disk holding a path, for error messages. A full disk reaches the log as an
//! I/O error (LMDB reports a short write as `EIO`), which alone does not tell an operator why.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    Some(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// `"0 bytes free on the disk holding /data/raft-log"`, said of a write that failed there.
pub fn describe(path: &Path) -> String {
    match free_bytes(path) {
        Some(free) if free >= 1 << 20 => format!("{} MB free on the disk holding {}", free >> 20, path.display()),
        Some(free) => format!("{free} bytes free on the disk holding {}", path.display()),
        None => format!("free space on the disk holding {} unknown", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_where_the_path_lives() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some());
        assert!(describe(dir.path()).ends_with(&format!("free on the disk holding {}", dir.path().display())));
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
        assert!(describe(&dir.path().join("missing")).contains("unknown"));
    }
}
