//! Network partitions made for real: a TCP proxy in front of every node's side port.
//!
//! Each node advertises its side port on a second loopback address (`advertise-addr=127.0.0.2:..`)
//! where a [`Network`] proxy listens and forwards to the node's real side port on 127.0.0.1, so
//! every byte between two nodes crosses the proxy. Raft connections start with
//! `HELLO <node-id> ...`, which tells the proxy who is talking to whom; a blocked link simply stops
//! being read, so the sender's socket buffer fills and its writes stall exactly as they do when a
//! cable is pulled (nothing is reset, nothing is refused). Healing lets the held bytes through.
//!
//! Connections that do not start with HELLO (snapshot downloads) have no known source; they are
//! held while any link into their destination is blocked.
//!
//! Clients keep talking to the nodes' client ports directly, like clients on either side of a
//! real partition.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Index of a node in the cluster (not its raft id).
pub type Slot = usize;

const POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Links {
    /// `(from, to)`: bytes from `from` to `to` are held.
    blocked: HashSet<(Slot, Slot)>,
    /// Raft node id -> slot, learned from the cluster (ids change when a node is re-added).
    ids: HashMap<u64, Slot>,
}

#[derive(Default)]
struct Shared {
    links: Mutex<Links>,
    stop: AtomicBool,
}

impl Shared {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the bytes of a connection from raft id `sender` (None: not a raft connection) to
    /// node `node` are held now: going to the node if `to_node`, coming back from it otherwise.
    /// The sender's slot is looked up every time: its id may be learnt after it connected.
    fn holds(&self, sender: Option<u64>, node: Slot, to_node: bool) -> bool {
        let links = self.links();
        match sender.and_then(|id| links.ids.get(&id).copied()) {
            Some(peer) if to_node => links.blocked.contains(&(peer, node)),
            Some(peer) => links.blocked.contains(&(node, peer)),
            // An unknown source is held while any link into the node is cut.
            None => links.blocked.iter().any(|(_, to)| *to == node),
        }
    }
}

/// The proxies of one cluster and the table of blocked links between its nodes.
pub struct Network {
    shared: Arc<Shared>,
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

impl Network {
    pub fn new() -> Network {
        Network { shared: Arc::new(Shared::default()) }
    }

    /// Starts forwarding `listen` to node `slot`'s real side port `target`.
    pub fn add_proxy(&self, slot: Slot, listen: SocketAddr, target: SocketAddr) -> io::Result<()> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        std::thread::Builder::new().name(format!("proxy-{slot}")).spawn(move || {
            while !shared.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let shared = shared.clone();
                        std::thread::spawn(move || {
                            let _ = relay(shared, conn, slot, target);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        })?;
        Ok(())
    }

    /// Tells the proxies which slot a raft node id lives in.
    pub fn set_id(&self, raft_id: u64, slot: Slot) {
        let mut links = self.shared.links();
        links.ids.retain(|_, s| *s != slot);
        links.ids.insert(raft_id, slot);
    }

    /// Holds traffic from `from` to `to` (one direction).
    pub fn block(&self, from: Slot, to: Slot) {
        self.shared.links().blocked.insert((from, to));
    }

    /// Cuts every link between nodes of different groups, both ways; links inside a group stay.
    /// Nodes in no group are left connected to everyone.
    pub fn partition(&self, groups: &[Vec<Slot>]) {
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                for x in a {
                    for y in b {
                        self.block(*x, *y);
                        self.block(*y, *x);
                    }
                }
            }
        }
    }

    /// Lets everything through again.
    pub fn heal(&self) {
        self.shared.links().blocked.clear();
    }

    /// The blocked links, for the nemesis' log.
    pub fn describe(&self) -> String {
        let mut v: Vec<_> = self.shared.links().blocked.iter().copied().collect();
        v.sort();
        v.iter().map(|(a, b)| format!("{a}->{b}")).collect::<Vec<_>>().join(" ")
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards one accepted connection to `to`'s side port until either side closes.
fn relay(shared: Arc<Shared>, inbound: TcpStream, to: Slot, target: SocketAddr) -> io::Result<()> {
    inbound.set_read_timeout(Some(POLL * 5))?;
    let (first, sender) = identify(&inbound)?;
    let outbound = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    outbound.set_read_timeout(Some(POLL * 5))?;
    for s in [&inbound, &outbound] {
        s.set_write_timeout(Some(POLL * 5))?;
        s.set_nodelay(true)?;
    }
    let (in2, out2) = (inbound.try_clone()?, outbound.try_clone()?);
    let back_shared = shared.clone();
    // Replies (PONG, snapshot chunks) flow back; they are held when the reverse link is cut.
    let back = std::thread::spawn(move || pump(&back_shared, out2, in2, Vec::new(), |s| s.holds(sender, to, false)));
    let _ = pump(&shared, inbound, outbound, first, |s| s.holds(sender, to, true));
    let _ = back.join();
    Ok(())
}

/// Reads the connection's first bytes and, if they are a HELLO, who sent it. Returns the bytes
/// read (they still have to be forwarded) and the sender's raft id.
fn identify(conn: &TcpStream) -> io::Result<(Vec<u8>, Option<u64>)> {
    let mut first = Vec::new();
    let mut buf = [0u8; 256];
    let mut conn = conn;
    for _ in 0..50 {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => first.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
        // `*3\r\n$5\r\nHELLO\r\n$<n>\r\n<id>\r\n`: five CRLF-terminated lines name the sender.
        let lines: Vec<&[u8]> = first.split(|b| *b == b'\n').collect();
        if lines.len() > 5 || first.len() >= 200 {
            let hello = lines.get(2).is_some_and(|l| l.trim_ascii().eq_ignore_ascii_case(b"HELLO"));
            let id = lines.get(4).and_then(|l| std::str::from_utf8(l.trim_ascii()).ok()?.parse::<u64>().ok());
            return Ok((first, if hello { id } else { None }));
        }
        if !first.is_empty() && !first.starts_with(b"*") {
            break;
        }
    }
    Ok((first, None))
}

/// Copies `src` to `dst`, pausing while `held` says so. Ends both sockets when either side
/// closes or the network is dropped.
fn pump(shared: &Shared, mut src: TcpStream, mut dst: TcpStream, mut pending: Vec<u8>, held: impl Fn(&Shared) -> bool) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let result = (|| loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if held(shared) {
            std::thread::sleep(POLL);
            continue;
        }
        if !pending.is_empty() {
            write_all(shared, &mut dst, &pending)?;
            pending.clear();
        }
        match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    })();
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
    result
}

/// `write_all` that gives up when the network is dropped instead of blocking on a stopped peer.
fn write_all(shared: &Shared, dst: &mut TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        if shared.stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("network stopped"));
        }
        match dst.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    #[test]
    fn holds_a_blocked_link_and_delivers_after_healing() {
        let net = Network::new();
        let listen = free_addr();
        net.add_proxy(1, listen, echo_server()).unwrap();
        net.set_id(7, 0);
        let mut c = TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let hello = b"*3\r\n$5\r\nHELLO\r\n$1\r\n7\r\n$11\r\n127.0.0.2:1\r\n";
        c.write_all(hello).unwrap();
        let mut got = vec![0u8; hello.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, hello, "an open link forwards both ways");

        net.partition(&[vec![0], vec![1]]);
        std::thread::sleep(Duration::from_millis(150));
        c.write_all(b"ping").unwrap();
        let mut one = [0u8; 4];
        assert!(c.read_exact(&mut one).is_err(), "a cut link delivers nothing");

        net.heal();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"ping", "held bytes arrive once healed");
    }

    #[test]
    fn a_cut_elsewhere_leaves_this_link_alone() {
        let net = Network::new();
        let listen = free_addr();
        net.add_proxy(2, listen, echo_server()).unwrap();
        net.set_id(5, 0);
        net.partition(&[vec![1], vec![2]]);
        let mut c = TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let hello = b"*3\r\n$5\r\nHELLO\r\n$1\r\n5\r\n$11\r\n127.0.0.2:1\r\n";
        c.write_all(hello).unwrap();
        let mut got = vec![0u8; hello.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, hello);
    }

    /// Regression: a sender whose id was learnt only after it connected used to stay "unknown"
    /// for the life of its connection, and so was cut by any partition touching its destination
    /// (in a 3-node run, isolating one follower cut the leader off from the other follower too).
    #[test]
    fn a_sender_identified_after_connecting_is_judged_by_its_own_links() {
        let net = Network::new();
        let listen = free_addr();
        net.add_proxy(1, listen, echo_server()).unwrap();
        let mut c = TcpStream::connect(listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let hello = b"*3\r\n$5\r\nHELLO\r\n$1\r\n9\r\n$11\r\n127.0.0.2:1\r\n";
        c.write_all(hello).unwrap();
        let mut got = vec![0u8; hello.len()];
        c.read_exact(&mut got).unwrap();
        net.set_id(9, 0);
        net.partition(&[vec![2], vec![0, 1]]);
        c.write_all(b"more").unwrap();
        let mut more = [0u8; 4];
        c.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"more", "0 -> 1 is not cut, only 2 is");
    }
}
