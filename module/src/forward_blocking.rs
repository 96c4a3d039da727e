//! The follower proxy for commands that wait (`BLPOP`, `XREADGROUP ... BLOCK`, ..., and `WAIT`): a
//! follower with `follower-proxy yes` sends one to the leader as `FORWARD-BLOCK`, where it waits
//! like one of the leader's own clients (see `blocking` and `wait`), and its client waits for the
//! leader's answer, however long that takes: the leader answers the command's own timeout.
//!
//! The wait is a connection to the leader that carries nothing else. The follower hangs it up
//! when its client stops waiting, so that the leader forgets the wait instead of popping for a
//! client that is gone:
//! - the client disconnects, or `CLIENT UNBLOCK` ends its wait;
//! - its backstop comes: the command's timeout, plus time for the attempt in flight then and
//!   for the answer's way back, has passed without an answer;
//! - another node leads and the old leader has not said, within a second, that it stepped down:
//!   it is cut off or stopped, and the client gets `-TIMEOUT`, since an attempt already in its
//!   log may still have popped.
//!
//! A leader that steps down answers its waiting clients `-MOVED` (nothing ran for them), and so
//! does a node that is not the leader any more when the command arrives. The follower then sends
//! the command to the next leader, for what is left of its timeout ([`Forward::refused`]), so its
//! client keeps waiting across a change of leader. Until this node knows that leader, the
//! commands wait in one queue, looked at by one thread: a change of leader under thousands of
//! waiting clients (job workers) costs no thread per client.

use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleString};
use crate::state::{self, RaftNode};
use raftis_core::blocking::{parse_timeout, Unit};
use raftis_core::forward::{ForwardCancel, ForwardRequest};
use std::collections::BTreeMap;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Clients waiting for a blocking command forwarded to the leader, by Redis' blocked-client handle.
static WAITING: Mutex<BTreeMap<usize, Waiting>> = Mutex::new(BTreeMap::new());
/// How many: the event loop's cheap check, and RAFT.STATS.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// When [`before_sleep`] last compared their leader with this node's.
static CHECKED: Mutex<Option<Instant>> = Mutex::new(None);

/// How often a follower looks whether the leader its clients wait on still leads.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How much longer than the command's own timeout the client waits for the leader's answer, on
/// top of two forwards' time (an attempt in flight at the timeout is answered first).
const BACKSTOP: Duration = Duration::from_secs(2);
/// How long after the transport gives up on the leader's answer the client's backstop comes.
const AFTER_THE_TRANSPORT: Duration = Duration::from_secs(1);

struct Waiting {
    /// Which registration it is ([`Registered`]).
    serial: u64,
    /// It is `WAIT`, whose timeout answers a count.
    is_wait: bool,
    /// The side-port address of the leader it was sent to (None while it is not on its way).
    leader: Option<String>,
    /// Since when this node has known another leader than that one.
    replaced_since: Option<Instant>,
    cancel: ForwardCancel,
}

/// RAFT.STATS: this follower's clients waiting for a blocking command at the leader.
pub fn stats() -> [(&'static str, u64); 1] {
    [("blocked_forwarded_waiting", COUNT.load(Ordering::Relaxed) as u64)]
}

/// Where a command's timeout is, and in what unit, so that a re-sent command waits only what is
/// left of it.
pub type TimeoutArg = (usize, Unit);

/// Sends the blocking `command` of the client of `ctx` to the leader, once the client's earlier
/// replies are in, and blocks the client until the leader answers. Its timeout is the argument at
/// `timeout_arg`. Errs with the redirect when no leader is known.
pub fn to_leader(ctx: *mut RedisModuleCtx, node: &RaftNode, command: &[&[u8]], timeout_arg: TimeoutArg) -> Result<(), String> {
    crate::forward::leader_addr(node)?;
    let (at, unit) = timeout_arg;
    let timeout = parse_timeout(command.get(at).copied().unwrap_or_default(), unit);
    let backstop = match timeout {
        Ok(None) => None,
        Ok(Some(t)) => Some(answer_within(t)),
        // The leader answers Redis' error for it at once.
        Err(_) => Some(answer_within(Duration::ZERO)),
    };
    // The client's own backstop comes a while after the transport's, which answers first.
    let client_backstop = backstop.map_or(Duration::ZERO, |b| b + AFTER_THE_TRANSPORT);
    let blocked = Blocked::with_backstop(ctx, client_backstop, Some(timed_out), timeout_at_backstop);
    let deadline = timeout.ok().flatten().map(|t| Instant::now() + t);
    let (resp3, db) = (ffi::client_is_resp3(ctx), ffi::selected_db(ctx));
    let forward = Forward::new(blocked, resp3, db, ffi::owned_args(command), deadline, timeout_arg, backstop);
    crate::held::after_own_replies(ctx, Box::new(move || forward.send()));
    Ok(())
}

/// With the proxy, a client of this node that waited in a blocking command while this node led,
/// now that it leads no more (`was_leader`: its side-port address): its command, as its next
/// attempt would have run it, goes to the next leader for what is left of its timeout (until
/// `deadline`), instead of the client getting `redirect`. (Nothing ran for it yet: a client with
/// an attempt in flight gets that attempt's outcome.) The client keeps the backstop it got as a
/// leader's client, so the transport gives up on the next leader's answer a while before it.
#[allow(clippy::too_many_arguments)]
pub fn take_over(
    blocked: Blocked,
    db: u32,
    resp3: bool,
    argv: Vec<Vec<u8>>,
    deadline: Option<Instant>,
    timeout_arg: TimeoutArg,
    was_leader: String,
    redirect: String,
) {
    let now = Instant::now();
    let backstop = deadline.map(|at| {
        let wanted = answer_within(at.saturating_duration_since(now));
        let left = blocked.backstop_at().map_or(wanted, |at| at.saturating_duration_since(now).saturating_sub(AFTER_THE_TRANSPORT));
        wanted.min(left)
    });
    Forward::new(blocked, resp3, db, argv, deadline, timeout_arg, backstop).refused(was_leader, redirect);
}

/// How long a client whose command waits `wait` at the leader waits for the answer: an attempt
/// in flight at the timeout is answered first, and the answer has its way back.
fn answer_within(wait: Duration) -> Duration {
    wait + 2 * crate::forward::forward_timeout() + BACKSTOP
}

/// A client's command on its way to the leader, and what it takes to send it again.
struct Forward {
    resp3: bool,
    db: u32,
    argv: Vec<Vec<u8>>,
    /// When the command's own timeout ends (None: it waits for ever).
    deadline: Option<Instant>,
    timeout_arg: TimeoutArg,
    /// How long the transport waits for the answer.
    backstop: Option<Duration>,
    cancel: ForwardCancel,
    registered: Registered,
    blocked: Blocked,
    /// When a leader first answered that it did not run it, in the refusals since it last
    /// waited at one (None: none has).
    refused_since: Option<Instant>,
}

/// How long a leader that says `-CLUSTERDOWN` (not ready yet, or not reachable) is given before a
/// command goes to it again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long after this node knows a new leader the one a command waits on has to say it stepped
/// down before the client is told it may or may not have run.
const STEP_DOWN_ANSWER: Duration = Duration::from_secs(1);
/// How long a follower keeps sending a command that leaders answer did not run, waiting to learn
/// of one that runs it, before it gives the last answer to its client.
const NEW_LEADER_WAIT: Duration = Duration::from_secs(5);
/// A `-MOVED` that comes this long after the command was sent is a leader that took it and
/// stepped down while it waited, not one that refused it: a refusal comes within a round trip.
const WAITED_THERE: Duration = Duration::from_secs(1);

impl Forward {
    /// The client behind `blocked` waits for `argv` at the leader; this node now hears when it
    /// leaves, and keeps it in [`WAITING`] until it is answered.
    fn new(
        blocked: Blocked,
        resp3: bool,
        db: u32,
        argv: Vec<Vec<u8>>,
        deadline: Option<Instant>,
        timeout_arg: TimeoutArg,
        backstop: Option<Duration>,
    ) -> Forward {
        blocked.on_disconnect(disconnected);
        let cancel = ForwardCancel::default();
        let is_wait = argv.first().is_some_and(|name| name.eq_ignore_ascii_case(b"wait"));
        let registered = Registered::new(
            blocked.handle() as usize,
            Waiting { serial: 0, is_wait, leader: None, replaced_since: None, cancel: cancel.clone() },
        );
        Forward { resp3, db, argv, deadline, timeout_arg, backstop, cancel, registered, blocked, refused_since: None }
    }

    /// Sends it to the leader this node knows; the answer goes to the client, but for an answer
    /// that says the command did not run there (`-MOVED`, `-CLUSTERDOWN`: a leader that stepped
    /// down while it waited, or one that was not the leader any more): then it goes to the next
    /// leader, for what is left of its timeout ([`Forward::refused`]).
    fn send(self) {
        // Its client stopped waiting (it left, or was answered): a pop sent now could take an
        // element nobody would get.
        if let Some(reason) = self.cancel.reason() {
            return self.finish(Outcome::Error(reason));
        }
        let found = state::get().node().ok_or_else(crate::write::not_initialized);
        let (node, addr) = match found.and_then(|node| Ok((crate::forward::leader_addr(&node)?, node))) {
            Ok((addr, node)) => (node, addr),
            Err(e) => return self.finish(Outcome::Error(e)),
        };
        self.registered.sent_to(Some(&addr));
        let req = ForwardRequest::Blocking { db: self.db, argv: self.argv.clone(), resp3: self.resp3 };
        let (backstop, cancel, sent_to, sent_at) = (self.backstop, self.cancel.clone(), addr.clone(), Instant::now());
        let answer = Box::new(move |reply: Result<Vec<u8>, String>| {
            let mut this = self;
            if reply.as_ref().is_err_and(|e| e.starts_with("MOVED ")) && sent_at.elapsed() >= WAITED_THERE {
                // A leader that took the command and stepped down while it waited: the refusals
                // before it are over, and the next leader gets the time it deserves.
                this.refused_since = None;
            }
            match reply {
                Ok(raw) => this.finish(Outcome::Relay(raw)),
                Err(e) if did_not_run(&e) && this.may_send_again() => this.refused(sent_to, e),
                Err(e) => this.finish(Outcome::Error(e)),
            }
        });
        node.transport().forward_until(addr, &req, backstop, cancel, answer);
    }

    /// The leader at `refused_by` answered `error` without running the command: it waits in the
    /// [`Resend`] queue for the next leader.
    fn refused(mut self, refused_by: String, error: String) {
        self.registered.sent_to(None);
        let refused_at = Instant::now();
        self.refused_since.get_or_insert(refused_at);
        Resend { forward: self, refused_by, error, refused_at }.queue();
    }

    /// Sends it again, for what is left of its timeout (at least a millisecond).
    fn resend(mut self) {
        if let Some(deadline) = self.deadline {
            // Nothing ran yet, so the command still gets its first attempt, which serves it if it
            // can, as Redis would have at once: a timeout that is over waits a millisecond (zero
            // would mean for ever).
            let ms = deadline.saturating_duration_since(Instant::now()).as_millis().max(1);
            let (at, unit) = self.timeout_arg;
            if let Some(arg) = self.argv.get_mut(at) {
                *arg = match unit {
                    Unit::Seconds => format!("{}.{:03}", ms / 1000, ms % 1000).into_bytes(),
                    Unit::Milliseconds => ms.to_string().into_bytes(),
                };
            }
        }
        self.send();
    }

    /// Its client still waits, and leaders have not refused it for [`NEW_LEADER_WAIT`] yet.
    fn may_send_again(&self) -> bool {
        self.cancel.reason().is_none() && self.refused_since.is_none_or(|since| since.elapsed() <= NEW_LEADER_WAIT)
    }

    fn finish(self, outcome: Outcome) {
        // Gone from the registry before Redis may reuse the handle.
        drop(self.registered);
        self.blocked.finish(outcome);
    }
}

/// A command a leader refused, until this node knows a leader to send it to, or leaders have
/// refused it for [`NEW_LEADER_WAIT`] (its client then gets the last refusal).
struct Resend {
    forward: Forward,
    refused_by: String,
    error: String,
    refused_at: Instant,
}

/// The commands waiting to be sent again, and the thread that sends them ([`resend_loop`]).
static RESENDS: Mutex<Vec<Resend>> = Mutex::new(Vec::new());
static RESEND_QUEUED: Condvar = Condvar::new();
/// The thread, started with the first command a leader refuses (or why it could not start).
static RESENDER: OnceLock<Result<(), String>> = OnceLock::new();
/// How often the queue looks for a leader to send its commands to.
const RESEND_EVERY: Duration = Duration::from_millis(20);

impl Resend {
    fn queue(self) {
        let started = RESENDER.get_or_init(|| {
            let spawned = std::thread::Builder::new().name("raft-forward-again".into()).spawn(resend_loop);
            spawned.map(drop).map_err(|e| e.to_string())
        });
        if let Err(why) = started {
            log::error!("cannot start the thread that sends refused forwarded commands again: {why}");
            return self.forward.finish(Outcome::Error(self.error));
        }
        resends().push(self);
        RESEND_QUEUED.notify_one();
    }

    /// Whether `leader` (this node's view, None: unknown) may take it now. `-MOVED`: another node
    /// leads, which this one may not know yet. `-CLUSTERDOWN`: the leader was not ready or could
    /// not be reached (killed, say, before an election); a moment later it may be, or another may
    /// lead.
    fn may_go_to(&self, leader: Option<&String>) -> bool {
        leader.is_some_and(|addr| {
            *addr != self.refused_by || (self.error.starts_with("CLUSTERDOWN") && self.refused_at.elapsed() >= RETRY_PAUSE)
        })
    }
}

/// Sends each queued command once this node knows a leader that may take it, or answers its
/// client the last refusal once it may not be sent again; looks again every [`RESEND_EVERY`].
fn resend_loop() {
    loop {
        {
            let mut queue = resends();
            while queue.is_empty() {
                queue = RESEND_QUEUED.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
        }
        let leader = state::get().node().and_then(|node| crate::forward::leader_addr(&node).ok());
        let queued = std::mem::take(&mut *resends());
        let mut still = Vec::new();
        for resend in queued {
            if resend.may_go_to(leader.as_ref()) {
                resend.forward.resend();
            } else if !resend.forward.may_send_again() {
                resend.forward.finish(Outcome::Error(resend.error));
            } else {
                still.push(resend);
            }
        }
        resends().extend(still);
        std::thread::sleep(RESEND_EVERY);
    }
}

fn resends() -> std::sync::MutexGuard<'static, Vec<Resend>> {
    RESENDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a leader's `error` says that the command did not run there.
fn did_not_run(error: &str) -> bool {
    error.starts_with("MOVED ") || error.starts_with("CLUSTERDOWN ")
}

/// Before Redis sleeps, now and then: clients waiting on a node that no longer leads stop.
pub fn before_sleep() {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    {
        let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
        if checked.is_some_and(|at| at.elapsed() < CHECK_EVERY) {
            return;
        }
        *checked = Some(Instant::now());
    }
    let Some(node) = state::get().node() else { return };
    // No known leader is no news: an election may still confirm the one they wait on.
    let Ok(leader) = crate::forward::leader_addr(&node) else { return };
    for waiting in lock().values_mut() {
        if waiting.leader.as_ref().is_none_or(|sent_to| *sent_to == leader) {
            waiting.replaced_since = None;
            continue;
        }
        // A leader that stepped down says so itself, and the command goes to the next one; one
        // that says nothing is stopped or cut off.
        let since = *waiting.replaced_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= STEP_DOWN_ANSWER {
            waiting.cancel.cancel("TIMEOUT the leader changed while the command waited; it may or may not have taken effect");
        }
    }
}

/// A client's entry in [`WAITING`], removed when this is dropped: once answered, or if the
/// forward is dropped unsent (its `Blocked` then answers the client an error).
/// By Redis' handle, which Redis frees once the client is answered (its backstop may answer it
/// while the forward is still on its way) and may give a later client: the serial tells this
/// registration's entry from a later one under the same handle.
struct Registered {
    handle: usize,
    serial: u64,
}

impl Registered {
    fn new(handle: usize, mut entry: Waiting) -> Registered {
        static SERIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let serial = SERIALS.fetch_add(1, Ordering::Relaxed);
        entry.serial = serial;
        let mut waiting = lock();
        waiting.insert(handle, entry);
        COUNT.store(waiting.len(), Ordering::Relaxed);
        Registered { handle, serial }
    }

    /// On its way to `leader`, or (None) waiting to be sent again.
    fn sent_to(&self, leader: Option<&str>) {
        if let Some(waiting) = lock().get_mut(&self.handle).filter(|w| w.serial == self.serial) {
            waiting.leader = leader.map(str::to_string);
            waiting.replaced_since = None;
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut waiting = lock();
        if waiting.get(&self.handle).is_some_and(|w| w.serial == self.serial) {
            waiting.remove(&self.handle);
        }
        COUNT.store(waiting.len(), Ordering::Relaxed);
    }
}

/// Ends the forward of the client `bc`, if it is still on its way.
pub fn cancel(bc: *mut RedisModuleBlockedClient, reason: &str) {
    if let Some(waiting) = lock().get(&(bc as usize)) {
        waiting.cancel.cancel(reason);
    }
}

/// The client disconnected (or `CLIENT UNBLOCK ... ERROR`, which Redis answered).
extern "C" fn disconnected(_ctx: *mut RedisModuleCtx, bc: *mut RedisModuleBlockedClient) {
    if std::panic::catch_unwind(|| cancel(bc, "ERR client disconnected")).is_err() {
        log::error!("panic in a forwarded blocking command's disconnect callback");
    }
}

/// `CLIENT UNBLOCK` (with TIMEOUT): answered as the command's own timeout is, a null array (for
/// `WAIT`, a count: 0, as the follower cannot tell how many nodes hold the log); the leader is
/// told to stop waiting.
extern "C" fn timed_out(ctx: *mut RedisModuleCtx, _argv: *mut *mut RedisModuleString, _argc: c_int) -> c_int {
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    let is_wait = std::panic::catch_unwind(|| {
        let is_wait = lock().get(&(bc as usize)).is_some_and(|w| w.is_wait);
        cancel(bc, "ERR timed out");
        is_wait
    })
    .unwrap_or_else(|_| {
        log::error!("panic in a forwarded blocking command's timeout callback");
        false
    });
    if is_wait {
        return unsafe { api!(RedisModule_ReplyWithLongLong)(ctx, 0) };
    }
    unsafe { api!(RedisModule_ReplyWithNullArray)(ctx) }
}

/// Whether the client `bc` waits for a blocking command at the leader, sent there by this node.
pub fn waits(bc: *mut RedisModuleBlockedClient) -> bool {
    lock().contains_key(&(bc as usize))
}

/// The client's backstop, past the transport's, which normally answers first (an attempt may
/// have run at a leader held up by a long script, say): the same answer, `-TIMEOUT`, rather
/// than the null array that would say nothing was popped.
pub fn timeout_at_backstop(bc: *mut RedisModuleBlockedClient) -> Outcome {
    cancel(bc, "ERR timed out");
    Outcome::Error(BACKSTOP_REPLY.into())
}

/// A forwarded command the leader has not answered long after its own timeout.
const BACKSTOP_REPLY: &str = "TIMEOUT the leader did not answer in time; the command may or may not have taken effect";

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<usize, Waiting>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}
