//! Test harness: real `redis-server` processes with the real `libraftis.so`, on loopback ports,
//! each with its own data directory. Every wait polls a condition with a deadline.
pub mod checker;
pub mod history;
pub mod nemesis;
pub mod netproxy;
pub mod own_writes;
pub mod power_cut;
pub mod random_commands;
pub mod resp_conn;
pub mod transfers;
pub mod workload;

use anyhow::{bail, Context as _};
use std::hash::{Hash as _, Hasher as _};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

pub use redis;

/// The workspace root (this crate lives in `integration/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Path of the module, built in release mode once per test binary.
pub fn module_path() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| build_release("raftis-module"));
    workspace().join("target/release/libraftis.so")
}

/// Path of `integration/caller` (`CALLER.CALL`, a second module that runs commands through
/// `RedisModule_Call`), built in release mode once per test binary.
pub fn caller_module_path() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| build_release("raftis-test-caller"));
    workspace().join("target/release/libcaller.so")
}

/// Path of `integration/clock_skew`, the library that moves a process' wall clock when preloaded
/// (see [`Server::start_with_clock_skew`]), built in release mode once per test binary.
pub fn clock_skew_library_path() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| build_release("raftis-test-clock-skew"));
    workspace().join("target/release/libclockskew.so")
}

fn build_release(package: &str) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", package])
        .current_dir(workspace())
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building {package} failed");
}

/// Polls `f` until it returns Some, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client port whose side port (+10000) is free too.
///
/// Both come from below the kernel's ephemeral range, from which every outgoing connection (and
/// the tests make many) takes its local port: a port picked there could be taken between the
/// check and redis-server's bind. A counter keeps the tests of one process apart, and the start
/// of its walk depends on the process id, so test binaries run one after the other rarely meet
/// each other's lingering ports.
pub fn free_port_pair() -> u16 {
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    // Client ports in [LOWEST, ephemeral_start - 10000), side ports right above them.
    let span = ephemeral_start.saturating_sub(10_000).saturating_sub(LOWEST);
    assert!(span >= 1_000, "the ephemeral port range starts at {ephemeral_start}: too low to keep test ports out of it");
    let offset = std::process::id() * 7_919 % span;
    let _ = NEXT.compare_exchange(0, offset + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = (LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of ports below {ephemeral_start}");
}

pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    /// Module arguments (`key=value`).
    pub extra: Vec<String>,
    /// Where Redis listens (`--bind`).
    pub bind: String,
    /// Redis' own settings (`--name value` words), beyond those every server gets.
    pub redis_args: Vec<String>,
    /// Without the module: plain Redis, the reference a test compares Raftis with.
    plain: bool,
    /// Environment variables of its own (`LC_ALL`, say).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Server {
    /// Starts redis-server with the module on `port`, data under `dir`.
    pub fn start(port: u16, dir: &Path, extra: &[&str]) -> anyhow::Result<Server> {
        Self::start_bound(port, dir, "127.0.0.1", extra)
    }

    /// Like [`Server::start`], listening on the addresses in `bind` (the first one also carries
    /// the side port).
    pub fn start_bound(port: u16, dir: &Path, bind: &str, extra: &[&str]) -> anyhow::Result<Server> {
        Self::start_with(port, dir, bind, &[], extra, false)
    }

    /// Plain redis-server, without the module, set up like the others (same Redis settings).
    pub fn start_plain(port: u16, dir: &Path) -> anyhow::Result<Server> {
        Self::start_with(port, dir, "127.0.0.1", &[], &[], true)
    }

    /// Plain redis-server with Redis settings of its own (`["--cluster-enabled", "yes"]`).
    pub fn start_plain_with_redis_args(port: u16, dir: &Path, redis_args: &[&str]) -> anyhow::Result<Server> {
        Self::start_with(port, dir, "127.0.0.1", redis_args, &[], true)
    }

    /// Like [`Server::start`], with Redis settings of its own (`["--databases", "32"]`).
    pub fn start_with_redis_args(port: u16, dir: &Path, redis_args: &[&str], extra: &[&str]) -> anyhow::Result<Server> {
        Self::start_with(port, dir, "127.0.0.1", redis_args, extra, false)
    }

    /// Like [`Server::start`], with environment variables of its own (`("LC_ALL", "C")`).
    pub fn start_with_env(port: u16, dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> anyhow::Result<Server> {
        let mut s = Self::unstarted(port, dir, "127.0.0.1", extra, false);
        s.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        s.spawn()?;
        Ok(s)
    }

    /// Like [`Server::start`], on a wall clock `skew_ms` milliseconds ahead of the machine's
    /// (behind, if negative), Redis' and the module's alike; its monotonic clock is the machine's.
    pub fn start_with_clock_skew(port: u16, dir: &Path, skew_ms: i64, extra: &[&str]) -> anyhow::Result<Server> {
        let library = clock_skew_library_path();
        let skew = skew_ms.to_string();
        Self::start_with_env(
            port,
            dir,
            &[("LD_PRELOAD", library.to_str().context("library path")?), ("RAFTIS_CLOCK_SKEW_MS", &skew)],
            extra,
        )
    }

    fn start_with(port: u16, dir: &Path, bind: &str, redis_args: &[&str], extra: &[&str], plain: bool) -> anyhow::Result<Server> {
        let mut s = Self::unstarted(port, dir, bind, extra, plain);
        s.redis_args = redis_args.iter().map(|a| a.to_string()).collect();
        s.spawn()?;
        Ok(s)
    }

    fn unstarted(port: u16, dir: &Path, bind: &str, extra: &[&str], plain: bool) -> Server {
        Server {
            port,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|e| e.to_string()).collect(),
            bind: bind.to_string(),
            redis_args: Vec::new(),
            plain,
            env: Vec::new(),
            child: None,
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg(&self.bind)
            .args(["--save", "", "--appendonly", "no", "--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.redis_args);
        if self.plain {
            // A test may load the module into it at runtime (MODULE LOAD).
            cmd.args(["--enable-module-command", "yes"]);
        } else {
            cmd.arg("--loadmodule").arg(module_path()).arg(format!("dir={}", self.dir.join("raft").display())).args(&self.extra);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // If the test process dies (a failed assertion is fine, kill -9 of the runner is not),
        // its servers die with it instead of lingering on their ports. The signal follows the
        // spawning thread, which is the test's own thread for every server started here.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawning redis-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("redis-server on {} exited with {status}; log:\n{}", self.port, self.log_tail());
            }
            if self.client().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).map_err(Into::into)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server on {} did not answer PING; log:\n{}", self.port, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> anyhow::Result<redis::Connection> {
        Ok(self.connect(Duration::from_secs(2), Duration::from_secs(15))?)
    }

    fn connect(&self, connect_timeout: Duration, read_timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let conn = client.get_connection_with_timeout(connect_timeout)?;
        conn.set_read_timeout(Some(read_timeout))?;
        Ok(conn)
    }

    /// Runs one command on a fresh connection.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        query_through_interrupts(args, &mut self.connect(Duration::from_secs(2), Duration::from_secs(15))?)
    }

    /// Runs one command with a short deadline, for polling a node that may be paused or dead.
    pub fn quick_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        query_through_interrupts(args, &mut self.connect(Duration::from_millis(500), Duration::from_secs(1))?)
    }

    pub fn state(&self) -> String {
        self.quick_cmd::<String>(&["RAFT.STATE"]).unwrap_or_else(|e| format!("error: {e}"))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGSTOP / SIGCONT: the process freezes with its sockets open, like a long GC pause.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// How many threads the process has now (0 if it is not running).
    pub fn threads(&self) -> usize {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else { return 0 };
        std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |tasks| tasks.count())
    }

    /// Whether Redis' main thread is asleep in a `DEBUG SLEEP` (in `nanosleep` or
    /// `clock_nanosleep`, which its event loop never calls), as /proc tells.
    pub fn main_thread_sleeps(&self) -> bool {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else { return false };
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        matches!(syscall.split_whitespace().next(), Some("35" | "230"))
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill").arg(sig).arg(c.id().to_string()).status().is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} failed");
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A server that died before the test killed it is worth a line in a failing test's
            // output: it names the signal (9: killed from outside, 6: an abort) or exit code.
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("redis-server on port {} had already exited: {status}", self.port);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Kills the server and starts it again on the same port with an empty data directory: a
    /// brand-new, uninitialized node (its old log and redis.log are kept aside for post-mortems).
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.kill9();
        if self.dir.exists() {
            let mut n = 0;
            let aside = loop {
                let p = self.dir.with_extension(format!("old{n}"));
                if !p.exists() {
                    break p;
                }
                n += 1;
            };
            std::fs::rename(&self.dir, aside)?;
        }
        self.spawn()
    }

    /// This node's raft id (0 while uninitialized), from a node that must answer: a slow answer
    /// on a loaded machine is waited for, where [`info_field`] would read 0.
    pub fn node_id(&self) -> u64 {
        info_field_of_live(self, "node_id")
    }

    /// This node's whole redis.log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The key [`Cluster::wait_leader`] writes (value `1`) to probe the leader: a test that compares
/// a cluster's dataset with another server's writes it there too.
pub const PROBE_KEY: &str = "__raftis_probe";

pub struct Cluster {
    pub nodes: Vec<Server>,
    /// The proxies between side ports, for clusters started with [`Cluster::start_partitionable`].
    pub network: Option<netproxy::Network>,
    pub root: tempfile::TempDir,
    /// For clusters started with [`Cluster::start_on_disk`], node `i`'s disk, mounted on
    /// `root/disk-i` (node `i`'s directory is `n{i}` on it).
    disks: Vec<power_cut::PowerCutDisk>,
}

/// The loopback address partitionable nodes advertise; the proxies listen there.
const PROXY_HOST: &str = "127.0.0.2";

impl Cluster {
    /// Starts `n` servers and forms a cluster: INIT on the first, JOIN on the others.
    pub fn start(n: usize, extra: &[&str]) -> anyhow::Result<Cluster> {
        Self::start_with(Self::new_root()?, Vec::new(), n, extra, false)
    }

    /// Like [`Cluster::start`], with every side-port connection going through a proxy that can
    /// cut links between nodes (see [`netproxy`]).
    pub fn start_partitionable(n: usize, extra: &[&str]) -> anyhow::Result<Cluster> {
        Self::start_with(Self::new_root()?, Vec::new(), n, extra, true)
    }

    /// Like [`Cluster::start`] or [`Cluster::start_partitionable`], with each node's directory
    /// on a disk of its own whose power can be cut ([`Cluster::cut_power`],
    /// [`Cluster::cut_power_of`]). Separate file systems: one node's fsync commits nothing of
    /// another's (one ext4 journal would).
    pub fn start_on_disk(n: usize, extra: &[&str], partitionable: bool) -> anyhow::Result<Cluster> {
        let root = Self::new_root()?;
        let disks = (0..n).map(|i| Self::disk_for(&root, i)).collect::<anyhow::Result<Vec<_>>>()?;
        Self::start_with(root, disks, n, extra, partitionable)
    }

    fn disk_for(root: &tempfile::TempDir, i: usize) -> anyhow::Result<power_cut::PowerCutDisk> {
        power_cut::PowerCutDisk::create_mounted_on(1024, root.path().join(format!("disk-{i}")))
    }

    /// Where node `i` keeps its data: for a cluster on disks, on a disk of its own (made here
    /// for a node added to the cluster).
    pub fn node_dir(&mut self, i: usize) -> anyhow::Result<PathBuf> {
        while !self.disks.is_empty() && self.disks.len() <= i {
            let disk = Self::disk_for(&self.root, self.disks.len())?;
            self.disks.push(disk);
        }
        Ok(Self::dir_of(&self.root, &self.disks, i))
    }

    /// Kills every node and cuts the power of their disks at once: what was not flushed is
    /// gone. The nodes stay down until [`Cluster::restart_all`].
    pub fn cut_power(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.disks.is_empty(), "a power cut needs Cluster::start_on_disk");
        for node in self.nodes.iter_mut() {
            node.kill9();
        }
        for disk in self.disks.iter_mut() {
            disk.cut_power()?;
        }
        Ok(())
    }

    /// Node `i` alone loses power: it is killed and its disk keeps only what was flushed. It
    /// stays down until restarted.
    pub fn cut_power_of(&mut self, i: usize) -> anyhow::Result<()> {
        let disk = self.disks.get_mut(i).context("a power cut needs Cluster::start_on_disk")?;
        self.nodes[i].kill9();
        disk.cut_power()
    }

    /// Starts every node again, after [`Cluster::cut_power`].
    pub fn restart_all(&mut self) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.restart().with_context(|| format!("restarting node {i}"))?;
        }
        Ok(())
    }

    /// A cluster of servers a test started itself, in directories under `root` (or anywhere
    /// it removes itself), formed or not.
    pub fn of(nodes: Vec<Server>, root: tempfile::TempDir) -> Cluster {
        Cluster { nodes, network: None, root, disks: Vec::new() }
    }

    fn new_root() -> anyhow::Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new().prefix("raftis-it-").tempdir()?)
    }

    /// Node `i`'s directory: on its disk, for a cluster on disks.
    fn dir_of(root: &tempfile::TempDir, disks: &[power_cut::PowerCutDisk], i: usize) -> PathBuf {
        disks.get(i).map_or_else(|| root.path().to_path_buf(), |disk| disk.path()).join(format!("n{i}"))
    }

    fn start_with(
        root: tempfile::TempDir,
        disks: Vec<power_cut::PowerCutDisk>,
        n: usize,
        extra: &[&str],
        partitionable: bool,
    ) -> anyhow::Result<Cluster> {
        let network = partitionable.then(netproxy::Network::new);
        let mut nodes = Vec::new();
        for i in 0..n {
            let dir = Self::dir_of(&root, &disks, i);
            let server = match &network {
                None => Server::start(free_port_pair(), &dir, extra)?,
                Some(net) => {
                    // A port found free can be taken before the proxy binds it (seen once in
                    // CI, by whom is not known): then another one is tried.
                    let mut found = None;
                    for _ in 0..100 {
                        let p = free_port_pair();
                        // Redis binds the client port there too; the proxy's bind below checks its own.
                        if TcpListener::bind((PROXY_HOST, p)).is_err() {
                            continue;
                        }
                        let listen: std::net::SocketAddr = format!("{PROXY_HOST}:{}", p + 10000).parse()?;
                        let target: std::net::SocketAddr = format!("127.0.0.1:{}", p + 10000).parse()?;
                        match net.add_proxy(i, listen, target) {
                            Ok(()) => {
                                found = Some(p);
                                break;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let port = found.ok_or_else(|| anyhow::anyhow!("no free ports for node {i}'s proxy after 100 tries"))?;
                    let advertise = format!("advertise-addr={PROXY_HOST}:{port}");
                    let mut args: Vec<&str> = extra.to_vec();
                    args.push(&advertise);
                    Server::start_bound(port, &dir, &format!("127.0.0.1 {PROXY_HOST}"), &args)?
                }
            };
            nodes.push(server);
        }
        let c = Cluster { nodes, network, root, disks };
        let init: String = c.nodes[0].cmd(&["RAFT.CLUSTER", "INIT"])?;
        anyhow::ensure!(init == "OK", "INIT answered {init}");
        c.wait_leader();
        c.learn_id(0);
        for i in 1..n {
            c.join(i, 0)?;
        }
        Ok(c)
    }

    /// `RAFT.CLUSTER JOIN` of node `i` through node `via`.
    pub fn join(&self, i: usize, via: usize) -> anyhow::Result<()> {
        let reply: String = self.nodes[i].cmd(&["RAFT.CLUSTER", "JOIN", &self.nodes[via].addr()])?;
        anyhow::ensure!(reply == "OK", "JOIN answered {reply}");
        self.learn_id(i);
        Ok(())
    }

    /// Tells the proxies node `i`'s raft id.
    fn learn_id(&self, i: usize) {
        if let Some(net) = &self.network {
            net.set_id(self.nodes[i].node_id(), i);
        }
    }

    /// Kills the leader `leader` with SIGKILL once `done` reaches a third of `total` (a producer's
    /// progress), waits for another node to lead, and restarts it.
    pub fn kill_leader_midway(&mut self, leader: usize, done: &std::sync::atomic::AtomicUsize, total: usize) {
        wait_for("a third of the producer's items", Duration::from_secs(30), || (done.load(Ordering::SeqCst) >= total / 3).then_some(()));
        self.nodes[leader].kill9();
        wait_for("a new leader", Duration::from_secs(20), || {
            (0..self.nodes.len()).filter(|i| *i != leader).find(|i| self.nodes[*i].state() == "leader")
        });
        self.nodes[leader].restart().unwrap();
    }

    /// Kills node `i` (not the leader) and returns once the leader has stopped streaming entries
    /// to it, so that what is written from then on reaches it only in answer to it, after its
    /// restart: past a compaction, only in a snapshot.
    ///
    /// Entries sent before the leader hears of the kill wait in its queue for the node and reach
    /// it as soon as it is back. Once the leader probes the node instead, one write's append goes
    /// out and the next waits for an answer that does not come; that write is made here.
    pub fn kill_behind(&mut self, i: usize) {
        let leader = self.wait_leader();
        assert_ne!(i, leader, "kill_behind is for a follower");
        let id = self.nodes[i].node_id().to_string();
        self.nodes[i].kill9();
        wait_for(&format!("the leader to probe the killed node {i}"), Duration::from_secs(10), || {
            (peer_state(&self.nodes[leader], &id).as_deref() == Some("probe")).then_some(())
        });
        let _: () = self.nodes[leader].cmd(&["SET", PROBE_KEY, "behind"]).unwrap();
    }

    /// Index of the leader once exactly one running node says it leads and it accepts writes
    /// (it answers a write of `PROBE_KEY`).
    pub fn wait_leader(&self) -> usize {
        wait_for("a leader", Duration::from_secs(20), || {
            let leaders: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].state() == "leader").collect();
            if leaders.len() != 1 {
                return None;
            }
            // The leader serves writes once it has committed an entry of its term.
            self.nodes[leaders[0]].cmd::<String>(&["SET", PROBE_KEY, "1"]).ok().map(|_| leaders[0])
        })
    }

    pub fn leader(&self) -> &Server {
        &self.nodes[self.wait_leader()]
    }

    /// RAFT.CONFIG SET `name` `value` on every node, in node order; panics if one refuses.
    pub fn config_set(&self, name: &str, value: &str) {
        for (i, node) in self.nodes.iter().enumerate() {
            node.cmd::<()>(&["RAFT.CONFIG", "SET", name, value])
                .unwrap_or_else(|e| panic!("RAFT.CONFIG SET {name} {value} on node {i}: {e}"));
        }
    }

    /// Waits until every running node has applied as far as the leader has committed.
    pub fn wait_converged(&self, alive: &[usize]) {
        let leader = self.wait_leader();
        let commit = info_field_of_live(&self.nodes[leader], "commit_index");
        for i in alive {
            wait_for(&format!("node {i} to apply index {commit}"), Duration::from_secs(20), || {
                (info_field(&self.nodes[*i], "applied_index") >= commit).then_some(())
            });
        }
    }
}

impl Cluster {
    /// Waits until `nodes` have applied everything committed, then asserts they hold the same
    /// dataset ([`digest`]: keys and function libraries), printing each one's size, RAFT.INFO
    /// and log if not. The digest.
    ///
    /// A key whose deadline has passed but that nothing has looked up since (`SET k v PXAT 1`
    /// keeps it, as in Redis) counts in the digest until each node's background expiry deletes it,
    /// at that node's own pace; so differing digests are polled for a few seconds before they
    /// count as different datasets.
    pub fn assert_same_dataset(&self, nodes: &[usize]) -> String {
        self.wait_converged(nodes);
        let deadline = Instant::now() + Duration::from_secs(5);
        let digests = loop {
            let digests: Vec<(String, String)> = nodes.iter().map(|i| (digest(&self.nodes[*i]), node_digest(&self.nodes[*i]))).collect();
            if digests.iter().all(|d| *d == digests[0]) {
                return digests[0].0.clone();
            }
            if Instant::now() > deadline {
                break digests;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for i in nodes {
            let n = &self.nodes[*i];
            let size: i64 = n.cmd(&["DBSIZE"]).unwrap_or(-1);
            let info: String = n.cmd(&["RAFT.INFO"]).unwrap_or_default();
            eprintln!("node {} dbsize {size}\n{info}\n{}", n.port, n.log_tail());
        }
        panic!("datasets differ: {digests:?}");
    }
}

impl Drop for Cluster {
    /// A failing test keeps every node's data directory and redis.log for the post-mortem.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("RAFTIS_KEEP_TEST_DIRS").is_some() {
            self.root.disable_cleanup(true);
            eprintln!("test failed: nodes' data and logs kept in {}", self.root.path().display());
        }
        // The disks are mounted inside `root`: the nodes go first, then the disks (unmounted;
        // a failing test keeps their images), and `root` can be removed after them.
        self.nodes.clear();
        self.disks.clear();
    }
}

/// Sends one command and waits for its reply, going on waiting when the read is interrupted.
/// A socket read with a timeout fails with EINTR when the test process is stopped and
/// continued, even with no signal handler (signal(7)); the machine running the tests can do
/// that. Sending again could run a write twice, so only the wait is repeated: the parser keeps
/// whatever part of the reply it had already read.
fn query_through_interrupts<T: redis::FromRedisValue>(args: &[&str], conn: &mut redis::Connection) -> redis::RedisResult<T> {
    conn.send_packed_command(&command(args).get_packed_command())?;
    loop {
        match conn.recv_response() {
            Err(e) if was_interrupted(&e) => continue,
            reply => return redis::from_owned_redis_value(reply?),
        }
    }
}

/// redis-rs keeps the I/O error to itself (`as_io_error` is private, `source` is not given), so
/// the interruption is known by the OS error its message names.
fn was_interrupted(e: &redis::RedisError) -> bool {
    e.is_io_error() && e.to_string().ends_with(&format!("(os error {})", libc::EINTR))
}

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd
}

/// A connection to whichever node leads now (asked with `RAFT.STATE`), within 30 s.
pub fn leader_conn(ports: &[u16]) -> resp_conn::RespConn {
    wait_for("a leader to connect to", Duration::from_secs(30), || {
        ports.iter().find_map(|port| {
            let mut conn = resp_conn::RespConn::connect(*port).ok()?;
            let role = conn.call(&[b"RAFT.STATE"]).ok()?;
            (role.text().as_deref() == Some("leader")).then_some(conn)
        })
    })
}

/// A producer for tests that kill nodes under load: sends `command(item)` for each of `items`, one
/// at a time, to whichever node leads, again on a node that says it did not take it (`-MOVED`,
/// `-CLUSTERDOWN`), and counts each item done in `done`. Returns the items `acknowledges` says
/// were applied, and those whose outcome is unknown (another reply, or a broken connection).
pub fn produce<T>(
    ports: &[u16],
    items: impl IntoIterator<Item = T>,
    command: impl Fn(&T) -> Vec<Vec<u8>>,
    acknowledges: impl Fn(&T, &resp_conn::Reply) -> bool,
    done: &std::sync::atomic::AtomicUsize,
) -> (Vec<T>, Vec<T>) {
    let (mut acknowledged, mut unknown) = (Vec::new(), Vec::new());
    let mut conn = None;
    for item in items {
        let args = command(&item);
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let outcome = loop {
            let c = conn.get_or_insert_with(|| leader_conn(ports));
            match c.call(&args) {
                Ok(reply) if acknowledges(&item, &reply) => break &mut acknowledged,
                // Not applied: the same again, on the leader.
                Ok(reply) if refused(&reply) => conn = None,
                Ok(_) | Err(_) => {
                    conn = None;
                    break &mut unknown;
                }
            }
        };
        outcome.push(item);
        done.fetch_add(1, Ordering::SeqCst);
    }
    (acknowledged, unknown)
}

/// Clients waiting in a blocking command on `server`: Redis' own count on plain Redis, the
/// module's on a Raftis node.
pub fn waiting_clients(server: &Server, plain: bool) -> u64 {
    if plain {
        let info: String = server.cmd(&["INFO", "clients"]).unwrap_or_else(|e| panic!("INFO on port {}: {e}", server.port));
        field_in(&info, "blocked_clients").and_then(|v| v.parse().ok()).unwrap()
    } else {
        stat_field(server, "blocked_pops_waiting")
    }
}

/// A consumer's connection in a test that kills the leader `first` under load: to whichever node
/// leads now, or, `through_followers`, to one of the two other nodes (by the consumer's number
/// `k`), a follower at first, which sends what waits to the leader (follower proxy).
pub fn consumer_conn(ports: &[u16], first: usize, k: usize, through_followers: bool) -> resp_conn::RespConn {
    match through_followers {
        true => resp_conn::RespConn::connect(ports[(first + 1 + k % 2) % ports.len()]).unwrap(),
        false => leader_conn(ports),
    }
}

/// An error that says the request did not take effect (`-MOVED`, `-CLUSTERDOWN`).
pub fn refused(reply: &resp_conn::Reply) -> bool {
    reply.is_error() && reply.text().is_some_and(|t| t.starts_with("MOVED") || t.starts_with("CLUSTERDOWN"))
}

/// The value of `field` in INFO-style `key:value` lines (RAFT.INFO, RAFT.STATS), trimmed.
pub fn field_in<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

/// How the leader `server` replicates to node `id` (`probe`, `replicate`, `snapshot`), from the
/// node's line in RAFT.INFO.
pub fn peer_state(server: &Server, id: &str) -> Option<String> {
    let info: String = server.quick_cmd(&["RAFT.INFO"]).ok()?;
    let line = info.lines().find(|l| l.contains(&format!(":id={id},")))?;
    line.split(',').find_map(|kv| kv.strip_prefix("state=")).map(str::to_string)
}

/// A numeric field of RAFT.INFO.
pub fn info_field(server: &Server, field: &str) -> u64 {
    let info: String = server.quick_cmd(&["RAFT.INFO"]).unwrap_or_default();
    field_in(&info, field).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A numeric field of RAFT.INFO that a test goes on from, read from a node that must answer: a
/// slow answer on a loaded machine is waited for, where [`info_field`] would read 0.
pub fn info_field_of_live(server: &Server, field: &str) -> u64 {
    let info: String = server.cmd(&["RAFT.INFO"]).unwrap_or_else(|e| panic!("RAFT.INFO on port {}: {e}", server.port));
    field_in(&info, field).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("RAFT.INFO has no {field}:\n{info}"))
}

/// A field of RAFT.INFO as text (empty if the node does not answer or report it).
pub fn info_text(server: &Server, field: &str) -> String {
    let info: String = server.quick_cmd(&["RAFT.INFO"]).unwrap_or_default();
    field_in(&info, field).unwrap_or_default().to_string()
}

/// `n` bytes of hex digits that do not compress (RDB and snapshot files keep their size), from
/// a generator `seed` carries on.
pub fn incompressible(n: usize, seed: &mut u64) -> String {
    (0..n / 8)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            format!("{:08x}", *seed >> 32)
        })
        .collect()
}

/// RAFT.STATS, from a node that must answer (a slow answer on a loaded machine is waited for).
pub fn raft_stats(server: &Server) -> String {
    server.cmd(&["RAFT.STATS"]).unwrap_or_else(|e| panic!("RAFT.STATS on port {}: {e}", server.port))
}

/// A counter from RAFT.STATS, from a node that must answer (a slow answer on a loaded machine is
/// waited for); panics if the node does not report it.
pub fn stat_field(server: &Server, field: &str) -> u64 {
    let stats = raft_stats(server);
    field_in(&stats, field).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("RAFT.STATS has no {field}:\n{stats}"))
}

/// Entries a leader proposed for clients: all its proposals but an idle leader's clock entries.
/// Both counts are the main thread's, from one RAFT.STATS: raft's own count of the proposals it
/// appended may lag a clock entry the main thread has just counted.
pub fn client_proposals(leader: &Server) -> i64 {
    let stats = raft_stats(leader);
    let field = |name| field_in(&stats, name).and_then(|v| v.parse::<i64>().ok()).unwrap_or_else(|| panic!("RAFT.STATS has no {name}"));
    field("proposals_requested") - field("clock_entries_proposed")
}

/// `RAFT.DIGEST` of a node: its whole dataset, what `digest` covers and also expiry times and
/// streams' consumer groups, which nodes must agree on as well.
pub fn node_digest(server: &Server) -> String {
    let (_applied, _keys, digest): (u64, u64, String) = server.cmd(&["RAFT.DIGEST"]).expect("RAFT.DIGEST");
    digest
}

/// One fingerprint of the whole dataset that plain Redis can give too: `DEBUG DIGEST` (values,
/// and whether each key has an expiry) and the function libraries, which the log replicates and
/// snapshots carry too. Nodes are compared with [`node_digest`] as well.
pub fn digest(server: &Server) -> String {
    let keys: String = server.cmd(&["DEBUG", "DIGEST"]).expect("DEBUG DIGEST");
    let libraries = libraries(server);
    if libraries.is_empty() {
        return keys;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    libraries.hash(&mut hasher);
    format!("{keys} + {} libraries {:016x}", libraries.len(), hasher.finish())
}

/// Every key that has an expiry time, with its deadline (`PEXPIRETIME`), as `(db, key, ms)`, in
/// order: what `DEBUG DIGEST` leaves out of the comparison with a plain Redis. Read through the
/// client port, so only from a plain Redis or a node that serves reads (the leader at `high`).
pub fn deadlines(server: &Server) -> Vec<(u32, String, i64)> {
    let mut conn = server.client().expect("connecting for the deadlines");
    let databases: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("databases").query(&mut conn).expect("CONFIG GET databases");
    let databases: u32 = databases[1].parse().unwrap();
    let mut out = Vec::new();
    for db in 0..databases {
        let _: () = redis::cmd("SELECT").arg(db).query(&mut conn).expect("SELECT");
        let keys: Vec<String> = redis::cmd("SCAN").cursor_arg(0).clone().iter(&mut conn).expect("SCAN").collect();
        for key in keys {
            let deadline: i64 = redis::cmd("PEXPIRETIME").arg(&key).query(&mut conn).expect("PEXPIRETIME");
            if deadline >= 0 {
                out.push((db, key, deadline));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The function libraries, `(name, code)`, by name (Redis lists them in an order that follows
/// each server's hash seed).
pub fn libraries(server: &Server) -> Vec<(String, String)> {
    let listed: Vec<Vec<redis::Value>> = server.cmd(&["FUNCTION", "LIST", "WITHCODE"]).expect("FUNCTION LIST");
    let mut libraries: Vec<(String, String)> = listed
        .iter()
        .map(|fields| {
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| matches!(&kv[0], redis::Value::Data(d) if d == name.as_bytes()))
                    .and_then(|kv| redis::from_redis_value::<String>(kv.get(1)?).ok())
                    .unwrap_or_else(|| panic!("FUNCTION LIST without {name}: {fields:?}"))
            };
            (field("library_name"), field("library_code"))
        })
        .collect();
    libraries.sort();
    libraries
}

/// Sends raw RESP on a new connection and reads until `expect_len` bytes arrived (or the peer
/// closed).
pub fn raw_exchange(port: u16, request: &[u8], expect_len: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    exchange_on(&mut s, request, expect_len)
}

/// Sends `request` on `s` and reads the replies until they end with `last`; panics if the
/// connection ends (or stays silent for 10 s) before.
pub fn exchange_until(s: &mut TcpStream, request: &[u8], last: &[u8]) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(last) {
        match s.read(&mut buf) {
            // A signal, not the server (see `RespConn::reply`).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => panic!("the connection ended after {:?}", String::from_utf8_lossy(&out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// [`raw_exchange`] on a connection of the caller's (which keeps its state: WATCH, SELECT ...).
pub fn exchange_on(s: &mut TcpStream, request: &[u8], expect_len: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < expect_len {
        match s.read(&mut buf) {
            // A signal, not the server (see `RespConn::reply`).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::was_interrupted;

    #[test]
    fn an_interrupted_read_is_told_from_other_failures() {
        let interrupted = redis::RedisError::from(std::io::Error::from_raw_os_error(libc::EINTR));
        let timed_out = redis::RedisError::from(std::io::Error::from_raw_os_error(libc::EAGAIN));
        let refused =
            redis::RedisError::from((redis::ErrorKind::ResponseError, "An error was signalled by the server", "(os error 4)".to_string()));
        assert!(was_interrupted(&interrupted));
        assert!(!was_interrupted(&timed_out));
        assert!(!was_interrupted(&refused));
    }
}
