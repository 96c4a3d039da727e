//! A disk whose power can be cut: a small ext4 file system on a loop device.
//!
//! Killing a process (`kill -9`) loses nothing it wrote: the kernel keeps its page cache and
//! writes it back later. A power loss also loses every page the file system had not handed to the
//! disk yet, which is what fsync is for. [`PowerCutDisk::cut_power`] models that: it copies the
//! loop device's backing file, which holds what the file system has written to the device so
//! far, and mounts the copy in place of the original. Dirty pages that only sat in the page
//! cache are gone, as after a real power loss.
//!
//! The model is kinder than a real disk in one way: every write the device completed survives,
//! even one no flush covered (a disk with a volatile cache may lose those). So it catches data
//! that was never flushed at all, not writes flushed in the wrong order.
//!
//! It needs root and loop devices (`losetup`, `mkfs.ext4`, `mount`).

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PowerCutDisk {
    /// Holds the image (and the mount point, unless one was given).
    dir: tempfile::TempDir,
    mount: PathBuf,
    device: Option<String>,
}

/// Why this machine cannot run a [`PowerCutDisk`], if it cannot.
pub fn unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (losetup, mount)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("needs loop devices (/dev/loop-control)".into());
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount", "cp"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

/// Whether a test that needs a [`PowerCutDisk`] can run here. If not, it says why and the test
/// passes without running, except under CI (`CI` set), where it fails.
pub fn can_run_here() -> bool {
    let Some(why) = unavailable() else { return true };
    assert!(std::env::var_os("CI").is_none(), "CI must run the power-cut tests, but a power cut {why} here");
    eprintln!("skipped: a power cut {why}");
    false
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl PowerCutDisk {
    /// Makes an empty file system of `megabytes` (sparse on the host) and mounts it.
    pub fn create(megabytes: u64) -> anyhow::Result<PowerCutDisk> {
        let dir = tempfile::Builder::new().prefix("raftis-disk-").tempdir()?;
        let mount = dir.path().join("mnt");
        Self::create_at(megabytes, dir, mount)
    }

    /// The same, mounted on `mount` (made here: a directory that does not exist yet).
    pub fn create_mounted_on(megabytes: u64, mount: PathBuf) -> anyhow::Result<PowerCutDisk> {
        let dir = tempfile::Builder::new().prefix("raftis-disk-").tempdir()?;
        Self::create_at(megabytes, dir, mount)
    }

    fn create_at(megabytes: u64, dir: tempfile::TempDir, mount: PathBuf) -> anyhow::Result<PowerCutDisk> {
        let mut disk = PowerCutDisk { dir, mount, device: None };
        std::fs::create_dir(disk.path())?;
        std::fs::File::create(disk.image())?.set_len(megabytes << 20)?;
        let image = disk.image_str();
        // Inode tables and the journal are initialised now, not by a kernel thread writing to
        // the device while a test runs.
        run("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", &image])?;
        disk.attach()?;
        Ok(disk)
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> PathBuf {
        self.mount.clone()
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn image_str(&self) -> String {
        self.image().display().to_string()
    }

    fn attach(&mut self) -> anyhow::Result<()> {
        let device = run("losetup", &["--find", "--show", &self.image_str()])?;
        self.device = Some(device.clone());
        // The file system's own journal commits only when something is fsynced (every 300 s
        // otherwise, not every 5 s), so the device holds no more than what was flushed, and
        // nothing writes to it while it is copied.
        let mount = self.path().display().to_string();
        run("mount", &["-t", "ext4", "-o", "commit=300,noinit_itable", &device, &mount])?;
        Ok(())
    }

    fn detach(&mut self) -> anyhow::Result<()> {
        if let Some(device) = self.device.clone() {
            run("umount", &[&self.path().display().to_string()])?;
            self.device = None;
            run("losetup", &["-d", &device])?;
        }
        Ok(())
    }

    /// Cuts the power: the file system comes back with only what had reached the device. A
    /// test kills the servers it started first (`kill -9`: nothing a process left in the page
    /// cache is written by its death), and reaps them.
    pub fn cut_power(&mut self) -> anyhow::Result<()> {
        // Whatever still runs on the disk dies with the power: a snapshot child outlives its
        // server's kill -9, for one.
        self.kill_users()?;
        let image = self.image_str();
        let cut = format!("{image}.cut");
        // Read through the backing file: what the loop device has written, nothing more.
        run("cp", &["--sparse=always", &image, &cut])?;
        // Unmounting writes the dirty pages back, into the image that is now thrown away.
        self.detach()?;
        std::fs::rename(&cut, self.image())?;
        self.attach().context("mounting the disk after the power cut")
    }

    /// Kills every other process with its directory, a file or a mapping on the disk, and waits
    /// until none is left (a zombie holds nothing).
    fn kill_users(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let users = self.users();
            if users.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("processes {users:?} still use {} after SIGKILL", self.path().display());
            }
            for pid in &users {
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn users(&self) -> Vec<i32> {
        let mount = self.path();
        let on_disk = |link: PathBuf| std::fs::read_link(link).is_ok_and(|target| target.starts_with(&mount));
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|p| Some((p.file_name().to_str()?.parse::<i32>().ok()?, p.path())))
            .filter(|(pid, _)| *pid != std::process::id() as i32)
            .filter(|(_, proc)| {
                on_disk(proc.join("cwd"))
                    || std::fs::read_dir(proc.join("fd")).is_ok_and(|mut fds| fds.any(|fd| fd.is_ok_and(|fd| on_disk(fd.path()))))
                    || std::fs::read_to_string(proc.join("maps")).is_ok_and(|maps| maps.contains(&*mount.to_string_lossy()))
            })
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for PowerCutDisk {
    /// A failing test keeps the image for the post-mortem (`mount -o loop IMAGE DIR`).
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("could not unmount {}, detaching it lazily: {e:#}", self.path().display());
            let _ = run("umount", &["-l", &self.path().display().to_string()]);
            if let Some(device) = self.device.take() {
                let _ = run("losetup", &["-d", &device]);
            }
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("test failed: the nodes' disk is kept in {}", self.image().display());
        }
    }
}
