//! The side port: how Raft nodes talk to each other, in RESP over TCP.
//!
//! Each node dials one long-lived connection to every peer and only writes on it: first
//! `HELLO <id> <advertised addr>`, then frames `MSGS <msg> <msg> ...`, each bulk a prost-encoded
//! Raft message. Whatever is queued for a peer when its connection is free goes out as one frame
//! and one write. Queues are bounded: a dead or paused peer costs at most `queue_limit` messages,
//! beyond which messages are dropped (Raft retransmits). Inbound connections are only read; a peer
//! that sends anything malformed gets `-ERR`, a log line, and its connection closed.

use crate::ids::NodeId;
use crate::resp::{self, Frame};
use bytes::BytesMut;
use prost::Message as _;
use raft::eraftpb::Message;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Messages in one outgoing frame at most (and bytes, roughly).
const MAX_BATCH_MESSAGES: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What arrives on the side port, or what the transport learns about peers.
#[derive(Debug)]
pub enum Inbound {
    Raft(Vec<Message>),
    Hello { from: NodeId, addr: String },
    /// Sending to this peer failed; raft should slow down replication to it.
    Unreachable(NodeId),
}

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub me: NodeId,
    pub listen: SocketAddr,
    /// `host:port` peers dial to reach this node.
    pub advertise: String,
    /// Messages queued per peer at most.
    pub queue_limit: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub id: NodeId,
    pub addr: String,
    pub connected: bool,
    pub queued: usize,
    pub sent: u64,
    pub dropped: u64,
}

type InboundFn = Arc<dyn Fn(Inbound) + Send + Sync>;

#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    sent: AtomicU64,
    dropped: AtomicU64,
}

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
}

struct Inner {
    cfg: TransportConfig,
    local_addr: SocketAddr,
    inbound: InboundFn,
    handle: tokio::runtime::Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    peers: Mutex<HashMap<NodeId, Peer>>,
}

/// Handle to the side port. Clones share it; [`Transport::shutdown`] stops it for all.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Binds the side port (a bind error is returned here) and starts serving it.
    pub fn start(cfg: TransportConfig, inbound: impl Fn(Inbound) + Send + Sync + 'static) -> anyhow::Result<Transport> {
        let std_listener = std::net::TcpListener::bind(cfg.listen)?;
        std_listener.set_nonblocking(true)?;
        let local_addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raft-net-{}", cfg.me))
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let inbound: InboundFn = Arc::new(inbound);
        let listener = {
            let _enter = handle.enter();
            TcpListener::from_std(std_listener)?
        };
        handle.spawn(accept_loop(listener, inbound.clone()));
        let inner = Inner {
            cfg,
            local_addr,
            inbound,
            handle,
            runtime: Mutex::new(Some(runtime)),
            peers: Mutex::new(HashMap::new()),
        };
        Ok(Transport { inner: Arc::new(inner) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Peer>> {
        self.inner.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a peer, or points it at a new address (which reconnects).
    pub fn set_peer_addr(&self, id: NodeId, addr: String) {
        if id == self.inner.cfg.me {
            return;
        }
        let mut peers = self.peers();
        if peers.get(&id).map_or(false, |p| p.addr == addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(self.inner.cfg.queue_limit.max(1));
        let counters = Arc::new(Counters::default());
        let link = Link {
            id,
            addr: addr.clone(),
            hello: hello_frame(self.inner.cfg.me, &self.inner.cfg.advertise),
            counters: counters.clone(),
            inbound: self.inner.inbound.clone(),
        };
        let task = self.inner.handle.spawn(link.run(rx));
        if let Some(old) = peers.insert(id, Peer { addr, tx, task, counters }) {
            old.task.abort();
        }
    }

    pub fn remove_peer(&self, id: NodeId) {
        if let Some(p) = self.peers().remove(&id) {
            p.task.abort();
        }
    }

    pub fn peer_addr(&self, id: NodeId) -> Option<String> {
        self.peers().get(&id).map(|p| p.addr.clone())
    }

    /// Queues messages for their peers; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        let mut unknown = HashSet::new();
        {
            let peers = self.peers();
            for m in msgs {
                let to = NodeId(m.to);
                match peers.get(&to) {
                    Some(p) => {
                        if p.tx.try_send(m).is_err() {
                            p.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        unknown.insert(to);
                    }
                }
            }
        }
        // Outside the lock: the callback may call back into the transport.
        for id in unknown {
            log::debug!("no address for node {id}; message dropped");
            (self.inner.inbound)(Inbound::Unreachable(id));
        }
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        let mut stats: Vec<PeerStats> = self
            .peers()
            .iter()
            .map(|(id, p)| PeerStats {
                id: *id,
                addr: p.addr.clone(),
                connected: p.counters.connected.load(Ordering::Relaxed),
                queued: p.tx.max_capacity() - p.tx.capacity(),
                sent: p.counters.sent.load(Ordering::Relaxed),
                dropped: p.counters.dropped.load(Ordering::Relaxed),
            })
            .collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    /// Closes the listener and every connection. Idempotent.
    pub fn shutdown(&self) {
        for (_, p) in self.peers().drain() {
            p.task.abort();
        }
        let runtime = self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rt) = runtime {
            // Waits for the worker to drop every task, so the port is free when this returns.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rt.shutdown_background();
        }
    }
}

fn hello_frame(me: NodeId, advertise: &str) -> BytesMut {
    let mut out = BytesMut::new();
    resp::encode_command(&[b"HELLO", me.to_string().as_bytes(), advertise.as_bytes()], &mut out);
    out
}

/// The outgoing connection to one peer.
struct Link {
    id: NodeId,
    addr: String,
    hello: BytesMut,
    counters: Arc<Counters>,
    inbound: InboundFn,
}

impl Link {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut stream = match self.connect().await {
                Ok(s) => s,
                Err(e) => {
                    log::debug!("cannot reach node {} at {}: {e}", self.id, self.addr);
                    (self.inbound)(Inbound::Unreachable(self.id));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            self.counters.connected.store(true, Ordering::Relaxed);
            let result = self.pump(&mut stream, &mut rx).await;
            self.counters.connected.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return, // the peer was removed
                Err(e) => {
                    log::debug!("connection to node {} at {} lost: {e}", self.id, self.addr);
                    (self.inbound)(Inbound::Unreachable(self.id));
                }
            }
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        stream.write_all(&self.hello).await?;
        Ok(stream)
    }

    /// Sends queued messages until the connection fails (Err) or the queue closes (Ok).
    async fn pump(&self, stream: &mut TcpStream, rx: &mut mpsc::Receiver<Message>) -> std::io::Result<()> {
        let mut frame = BytesMut::with_capacity(64 * 1024);
        let mut encoded = Vec::new();
        loop {
            let Some(first) = rx.recv().await else { return Ok(()) };
            let mut batch = vec![first];
            let mut bytes = 0;
            while batch.len() < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        bytes += m.encoded_len();
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            frame.clear();
            resp::encode_array_len(batch.len() + 1, &mut frame);
            resp::encode_bulk(b"MSGS", &mut frame);
            for m in &batch {
                encoded.clear();
                m.encode(&mut encoded).expect("a Vec grows as needed");
                resp::encode_bulk(&encoded, &mut frame);
            }
            if let Err(e) = stream.write_all(&frame).await {
                self.counters.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                return Err(e);
            }
            self.counters.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}

async fn accept_loop(listener: TcpListener, inbound: InboundFn) {
    loop {
        match listener.accept().await {
            Ok((sock, remote)) => {
                let _ = sock.set_nodelay(true);
                tokio::spawn(serve(sock, remote, inbound.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                log::warn!("side port accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads frames from one inbound connection until it closes or misbehaves.
async fn serve(mut sock: TcpStream, remote: SocketAddr, inbound: InboundFn) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            let frame = match resp::parse(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return reject(sock, remote, &format!("protocol error: {e}")).await,
            };
            match handle_frame(frame, &inbound) {
                Ok(Some(reply)) => {
                    if sock.write_all(&reply).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(why) => return reject(sock, remote, &why).await,
            }
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn reject(mut sock: TcpStream, remote: SocketAddr, why: &str) {
    log::warn!("closing side-port connection from {remote}: {why}");
    let mut out = BytesMut::new();
    resp::encode(&Frame::Error(format!("ERR {why}")), &mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(&out)).await;
    let _ = sock.shutdown().await;
}

/// Handles one command; `Ok(Some(bytes))` is a reply to write back.
fn handle_frame(frame: Frame, inbound: &InboundFn) -> Result<Option<BytesMut>, String> {
    let Frame::Array(items) = frame else { return Err("expected a command (array of bulk strings)".into()) };
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Frame::Bulk(b) => parts.push(b),
            _ => return Err("expected a command (array of bulk strings)".into()),
        }
    }
    let Some(name) = parts.first() else { return Err("empty command".into()) };
    match name.to_ascii_uppercase().as_slice() {
        b"MSGS" => {
            let mut msgs = Vec::with_capacity(parts.len() - 1);
            for p in &parts[1..] {
                msgs.push(Message::decode(p.as_ref()).map_err(|e| format!("undecodable raft message: {e}"))?);
            }
            if !msgs.is_empty() {
                inbound(Inbound::Raft(msgs));
            }
            Ok(None)
        }
        b"HELLO" if parts.len() == 3 => {
            let from = std::str::from_utf8(&parts[1])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|id| *id > 0)
                .ok_or("HELLO with an invalid node id")?;
            let addr = String::from_utf8(parts[2].to_vec()).map_err(|_| "HELLO with an invalid address")?;
            inbound(Inbound::Hello { from: NodeId(from), addr });
            Ok(None)
        }
        b"PING" => {
            let mut out = BytesMut::new();
            resp::encode(&Frame::Simple("PONG".into()), &mut out);
            Ok(Some(out))
        }
        other => Err(format!("unknown side-port command '{}'", String::from_utf8_lossy(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc as std_mpsc;
    use std::time::Instant;

    fn msg(to: u64, index: u64) -> Message {
        Message { to, from: 1, index, ..Default::default() }
    }

    fn start(me: u64, port: u16, queue_limit: usize) -> (Transport, std_mpsc::Receiver<Inbound>) {
        let (tx, rx) = std_mpsc::channel();
        let tx = Mutex::new(tx);
        let cfg = TransportConfig {
            me: NodeId(me),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            advertise: format!("127.0.0.1:{port}"),
            queue_limit,
        };
        let t = Transport::start(cfg, move |i| drop(tx.lock().unwrap().send(i))).unwrap();
        (t, rx)
    }

    /// Collects raft messages (ignoring other events) until `n` arrived.
    fn collect(rx: &std_mpsc::Receiver<Inbound>, n: usize) -> (Vec<Message>, Vec<(NodeId, String)>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut msgs, mut hellos) = (Vec::new(), Vec::new());
        while msgs.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left).expect("messages arrive in time") {
                Inbound::Raft(m) => msgs.extend(m),
                Inbound::Hello { from, addr } => hellos.push((from, addr)),
                Inbound::Unreachable(_) => {}
            }
        }
        (msgs, hellos)
    }

    #[test]
    fn two_transports_exchange_messages_in_order_after_a_hello() {
        let (a, rx_a) = start(1, 0, 20_000);
        let (b, rx_b) = start(2, 0, 4096);
        a.set_peer_addr(NodeId(2), b.local_addr().to_string());
        b.set_peer_addr(NodeId(1), a.local_addr().to_string());
        a.send((0..10_000).map(|i| msg(2, i)).collect());
        b.send(vec![msg(1, 7)]);
        let (got, hellos) = collect(&rx_b, 10_000);
        assert_eq!(hellos, vec![(NodeId(1), "127.0.0.1:0".to_string())], "the advertised address, once");
        assert_eq!(got.iter().map(|m| m.index).collect::<Vec<_>>(), (0..10_000).collect::<Vec<_>>());
        let (got, _) = collect(&rx_a, 1);
        assert_eq!(got[0].index, 7);
        assert_eq!(a.stats()[0].sent, 10_000);
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn a_dead_peer_costs_bounded_memory_and_messages_flow_once_it_is_up() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (a, _rx_a) = start(1, 0, 100);
        a.set_peer_addr(NodeId(2), format!("127.0.0.1:{port}"));
        for chunk in 0..100 {
            a.send((0..1000).map(|i| msg(2, chunk * 1000 + i)).collect());
        }
        let s = &a.stats()[0];
        assert!(s.queued <= 100, "queue is bounded: {s:?}");
        assert!(s.dropped >= 99_000, "overflow is counted: {s:?}");
        let (b, rx_b) = start(2, port, 100);
        // Retry until the reconnecting link delivers something new.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            a.send(vec![msg(2, 1_000_000)]);
            if let Ok(Inbound::Raft(m)) = rx_b.recv_timeout(Duration::from_millis(100)) {
                if m.iter().any(|m| m.to == 2) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "peer never received anything");
        }
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn garbage_closes_only_that_connection() {
        let (b, rx_b) = start(2, 0, 16);
        let addr = b.local_addr();
        for garbage in [&b"hello world\r\n"[..], b"$-5\r\n", b"*2\r\n$4\r\nMSGS\r\n$3\r\n\xff\xff\xff\r\n", b"*1\r\n$4\r\nNOPE\r\n"] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(garbage).unwrap();
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            assert!(reply.starts_with(b"-ERR"), "{:?} got {:?}", String::from_utf8_lossy(garbage), String::from_utf8_lossy(&reply));
        }
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut pong = [0u8; 7];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        let (a, _rx_a) = start(1, 0, 16);
        a.set_peer_addr(NodeId(2), addr.to_string());
        a.send(vec![msg(2, 5)]);
        let (got, _) = collect(&rx_b, 1);
        assert_eq!(got[0].index, 5);
        a.shutdown();
        b.shutdown();
    }

    #[test]
    fn shutdown_frees_the_port_promptly() {
        let (a, _rx) = start(1, 0, 16);
        let addr = a.local_addr();
        let started = Instant::now();
        a.shutdown();
        a.shutdown();
        assert!(started.elapsed() < Duration::from_secs(3));
        std::net::TcpListener::bind(addr).expect("port is free again");
    }
}
