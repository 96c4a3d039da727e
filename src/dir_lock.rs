//! One running node per Raft log directory.
//!
//! LMDB lets several processes open one environment, and nothing else in a `dir` says who owns
//! it: two `redis-server`s given the same `dir=` (a copied config, an old process still running
//! when a new one starts) would both run as the same node on the same log and journal, each
//! overwriting what the other wrote. So a node holds an exclusive lock on `dir/LOCK` for as long
//! as it runs, and a second one refuses to start.
//!
//! The lock is a POSIX record lock (`fcntl`): the kernel drops it when the process dies, even by
//! `kill -9`, and a forked child (the snapshot writer) does not inherit it, so a node restarted
//! while its old snapshot child still finishes is not locked out. Such a lock is also dropped
//! when the process closes any descriptor of the file, so nothing else opens it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error("{} is in use by another running node (pid {pid}): two servers must never share a Raft log", .dir.display())]
    Held { dir: PathBuf, pid: i32 },
    #[error("cannot lock {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Held for as long as the node runs; dropping it releases the directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes `dir`'s lock, or says which process holds it.
pub fn lock(dir: &Path) -> Result<DirLock, DirLockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| DirLockError::Io { path: path.clone(), source };
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    let mut request = whole_file(libc::F_WRLCK);
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &request) } == 0 {
        return Ok(DirLock { _file: file });
    }
    let error = std::io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) {
        return Err(io(error));
    }
    // Who holds it (it may have gone meanwhile: then the pid is unknown, and 0 says so).
    let pid = if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut request) } == 0 { request.l_pid } else { 0 };
    Err(DirLockError::Held { dir: dir.to_path_buf(), pid })
}

fn whole_file(kind: i32) -> libc::flock {
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // to the end of the file, however it grows
    lock
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record locks exclude other processes only, so the one that looks is a child process. It
    /// must not allocate (the test process has other threads), so it only asks the kernel who
    /// holds the lock; the refusal itself is tested end to end with two redis-servers.
    #[test]
    fn the_lock_is_held_against_other_processes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::ffi::CString::new(dir.path().join(LOCK_FILE).into_os_string().into_encoded_bytes()).unwrap();
        let holder_seen_by_child = || {
            let mut probe = whole_file(libc::F_WRLCK);
            match unsafe { libc::fork() } {
                0 => unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_RDWR);
                    let asked = fd >= 0 && libc::fcntl(fd, libc::F_GETLK, &mut probe) == 0;
                    let held_by_parent = probe.l_type != libc::F_UNLCK as libc::c_short && probe.l_pid == libc::getppid();
                    libc::_exit(match (asked, held_by_parent) {
                        (false, _) => 2,
                        (true, true) => 0,
                        (true, false) => 1,
                    });
                },
                child => {
                    assert!(child > 0, "fork failed");
                    let mut status = 0;
                    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
                    assert!(libc::WIFEXITED(status), "{status}");
                    match libc::WEXITSTATUS(status) {
                        0 => true,
                        1 => false,
                        other => panic!("the child could not ask ({other})"),
                    }
                }
            }
        };
        let held = lock(dir.path()).unwrap();
        assert!(holder_seen_by_child(), "another process sees this one holding the lock");
        drop(held);
        assert!(!holder_seen_by_child(), "released when dropped");
        let _again = lock(dir.path()).expect("free again");
    }
}
