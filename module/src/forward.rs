//! The follower proxy (`follower-proxy yes`): a follower that gets a command only the leader may
//! serve sends it to the leader over the side port (`FORWARD`, see `raftis_core::forward`) and
//! relays the reply, so clients that ignore `-MOVED` still work.
//!
//! - Follower side: [`to_leader`] puts the command in its client's batch, which goes to the
//!   leader whole at the end of the event-loop turn ([`transaction_to_leader`], `FORWARD-TX`)
//!   with every transaction the client ran in that turn; the replies fill the slots left for
//!   them in the client's output (see `transaction` and `held`). Where replies cannot be held
//!   (too many in flight, or a Redis without the hooks) it blocks the client and sends the
//!   command alone; the leader's raw reply comes back and [`relay`] replays it to the client
//!   through the module API. Such a command waits until the client's earlier replies are in, so
//!   it cannot overtake them (forwarded requests travel on separate connections). At consistency
//!   `low`, where this node serves reads from its own dataset, a reply is relayed only once that
//!   dataset has applied as far as the leader's had when it answered ([`DatasetProgress`]), so
//!   the client reads its own write afterwards.
//! - Leader side: [`handler`] receives forwarded commands on the transport thread and queues them
//!   for the main thread, where [`serve`] runs them exactly like a client's: writes are pinned,
//!   proposed and answered once applied; reads are linearizable (ReadIndex) whatever the
//!   leader's own consistency level; a transaction is proposed as one entry. A leader never
//!   forwards again: if it lost leadership it answers the `-MOVED`/`-CLUSTERDOWN` a client would
//!   get, and the follower's transport sends the command on to the next leader it learns of
//!   (nothing of it ran; see `raftis_core::transport`).

use crate::apply::{Job, ReplyTo, WriteWaiter};
use crate::blocked::{Blocked, Outcome};
use crate::cluster_view::{slot_of, slot_of_first};
use crate::ffi::{self, api, RedisModuleCtx};
use crate::gate::OpensOnDrop;
use crate::held::HeldReply;
use crate::state::{self, RaftNode};
use crate::transaction::Forwarding;
use raftis_core::cluster_view::HashSlot;
use raftis_core::command_entry::{encode_command, encode_transaction};
use raftis_core::config::Consistency;
use raftis_core::determinism::Args;
use raftis_core::forward::{decode_replies, encode_replies, Abandoned, CaughtUp, Dataset, ForwardDone, ForwardHandler, ForwardRequest};
use raftis_core::memory_limit;
use raftis_core::routing::Route;
use raftis_core::LogIndex;
use std::borrow::Cow;
use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_long};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Extra time the follower's client waits beyond write-timeout (the leader answers first).
const BACKSTOP: Duration = Duration::from_secs(2);

/// Follower side: sends the client's command to the leader and blocks the client until the
/// answer comes back; after the client's forwarded transaction, if that is still on its way.
/// Errs (with the usual redirect) when no leader is known.
pub fn to_leader(ctx: *mut RedisModuleCtx, argv: Vec<Vec<u8>>) -> Result<(), String> {
    crate::blocked::refuse_if_caller_cannot_wait(ctx)?;
    let s = state::get();
    let node = s.node().ok_or_else(crate::write::not_initialized)?;
    leader_addr(&node)?;
    // The leader would refuse it too, but it could not even travel: a side-port frame is limited.
    let (bytes, limit) = (argv.iter().map(|a| a.len() as u64).sum::<u64>(), node.max_entry_bytes());
    if bytes > limit {
        return Err(state::too_large(bytes, limit));
    }
    let db = ffi::selected_db(ctx);
    let argv = match crate::transaction::join_forwarded(ctx, db, argv) {
        Forwarding::Joined => return Ok(()),
        Forwarding::Refused(e) => return Err(e),
        Forwarding::Alone(argv) => argv,
    };
    let req = ForwardRequest::Command { db, argv, resp3: ffi::client_is_resp3(ctx) };
    let timeout = forward_timeout();
    // Long enough for what is ahead of it as well: the client's batches, of which the one a
    // MULTI split off waits for the one before it (see `gate`).
    let blocked = Blocked::new(ctx, 3 * timeout + BACKSTOP);
    let send = move || {
        if blocked.is_answered() {
            // Its backstop answered while it waited for the client's earlier commands: sent now,
            // it would run after commands the client sent since.
            return;
        }
        let Some(node) = state::get().node() else {
            return blocked.finish(Outcome::Error(crate::write::not_initialized()));
        };
        let leader = match leader_addr(&node) {
            Ok(addr) => addr,
            Err(e) => return blocked.finish(Outcome::Error(e)),
        };
        let relay = Box::new(move |reply: Result<Vec<u8>, String>| {
            blocked.finish(match reply {
                Ok(raw) => Outcome::Relay(raw),
                Err(e) => Outcome::Error(e),
            })
        });
        node.transport().forward(leader, &req, timeout, relay);
    };
    crate::held::after_own_replies(ctx, Box::new(send));
    Ok(())
}

/// Follower side: what sends a transaction EXEC ran here to the leader; each command's reply, in
/// the protocol of `resp3` (one per command), fills its slot (all of them get the error if the
/// transaction could not run), and then `done` opens the gate of what waits behind it.
pub fn transaction_to_leader(
    commands: Vec<(u32, Vec<Vec<u8>>)>,
    exec: usize,
    slots: Vec<Option<HeldReply>>,
    resp3: Vec<bool>,
    done: OpensOnDrop,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let fail = |slots: Vec<Option<HeldReply>>, error: &str| slots.into_iter().flatten().for_each(|slot| slot.fail(error));
        let Some(node) = state::get().node() else { return fail(slots, &crate::write::not_initialized()) };
        let leader = match leader_addr(&node) {
            Ok(addr) => addr,
            Err(e) => return fail(slots, &e),
        };
        let req = ForwardRequest::Transaction { commands, resp3, exec };
        let fill = Box::new(move |reply: Result<Vec<u8>, String>| {
            // Opened once the slots are filled, whichever way this ends.
            let _done = done;
            let replies = match reply.map(|raw| decode_replies(&raw)) {
                Ok(Some(replies)) if replies.len() == slots.len() => replies,
                // (More than the side port's 1,048,576 replies in one array: possible only with a
                // max-entry-size well over its 16 MB default.)
                Ok(_) => return fail(slots, "ERR the transaction ran on the leader, but its replies could not be read here"),
                Err(e) => return fail(slots, &e),
            };
            for (slot, reply) in slots.into_iter().zip(replies) {
                if let Some(slot) = slot {
                    slot.finish_from_any_thread(reply);
                }
            }
        });
        node.transport().forward(leader, &req, forward_timeout(), fill);
    })
}

pub fn forward_timeout() -> Duration {
    state::get().write_timeout() + Duration::from_secs(1)
}

/// The leader's side-port address, or the redirect to answer when no leader is known.
pub fn leader_addr(node: &RaftNode) -> Result<String, String> {
    let status = node.status();
    match status.leader_member() {
        Some(leader) => Ok(leader.raft_addr.clone()),
        None => Err(state::redirect(&status, HashSlot::NO_KEY)),
    }
}

/// How far this node's dataset has come, for read-your-writes through a follower at consistency
/// `low` (see `raftis_core::forward`).
pub struct DatasetProgress;

impl Dataset for DatasetProgress {
    /// The entry being applied counts: a write's reply is produced while its entry is applied,
    /// before the applied index moves past the whole batch.
    fn reflects(&self) -> LogIndex {
        let applied = state::get().progress.applied();
        crate::runaway::applying().map_or(applied, |(applying, _)| applied.max(applying))
    }

    /// Only at `low` does a follower read its own dataset; otherwise its reads go to the leader.
    fn when_reflects(&self, index: LogIndex, then: CaughtUp) {
        let s = state::get();
        if s.consistency() != Consistency::Low {
            return then();
        }
        s.progress.when_applied(index, then);
    }
}

/// Leader side: what the transport calls for each `FORWARD`.
pub fn handler() -> ForwardHandler {
    Arc::new(|req, done, abandoned| {
        if let Err(e) = state::get().send_to_apply(Job::Forward { req, done, abandoned }) {
            log::warn!("cannot serve a forwarded command: {e}");
        }
    })
}

/// Leader side, on the main thread: runs one forwarded command (or transaction) like a client's.
pub fn serve(req: ForwardRequest, done: ForwardDone, abandoned: Abandoned) {
    let s = state::get();
    let Some(node) = s.node() else { return done(Err(crate::write::not_initialized())) };
    if !node.is_leader() {
        let slot = match &req {
            ForwardRequest::Command { argv, .. } | ForwardRequest::Blocking { argv, .. } => slot_of(s.main_thread_ctx(), argv),
            ForwardRequest::Transaction { commands, .. } => slot_of_first(s.main_thread_ctx(), commands),
        };
        return done(Err(state::redirect(&node.status(), slot)));
    }
    // A peer names the database; one this node lacks would stop every node that applies it.
    let dbs: Vec<u32> = match &req {
        ForwardRequest::Command { db, .. } | ForwardRequest::Blocking { db, .. } => vec![*db],
        ForwardRequest::Transaction { commands, .. } => commands.iter().map(|(db, _)| *db).collect(),
    };
    if dbs.iter().any(|db| *db >= s.databases) {
        return done(Err(crate::write::DB_OUT_OF_RANGE.into()));
    }
    let (db, argv, resp3) = match req {
        ForwardRequest::Command { db, argv, resp3 } => (db, argv, resp3),
        ForwardRequest::Transaction { commands, resp3, exec } => return serve_transaction(&node, commands, exec, resp3, done),
        ForwardRequest::Blocking { db, argv, resp3 } => {
            let refs: Vec<&[u8]> = argv.iter().map(Vec::as_slice).collect();
            return match s.route(&refs) {
                Route::Blocking | Route::BlockingRead => crate::blocking::serve_forwarded(&node, db, argv, resp3, done, abandoned),
                Route::Wait => crate::wait::serve_forwarded(&node, argv, done, abandoned),
                Route::Refuse(e) => done(Err(e)),
                _ => done(Err("ERR only blocking commands are forwarded to wait".into())),
            };
        }
    };
    let refs: Vec<&[u8]> = argv.iter().map(|a| a.as_slice()).collect();
    let route = s.route(&refs);
    let timeout = s.write_timeout();
    match route {
        Route::Write => {
            let mut pinned: Args = argv.iter().map(|a| Cow::Borrowed(a.as_slice())).collect();
            let at = crate::expiry::stamp();
            if let Err(e) = crate::write::prepare_admitted(db, &mut pinned, at) {
                return done(Err(e));
            }
            let entry = encode_command(Some(at), db, &pinned);
            let waiter = WriteWaiter { reply_to: ReplyTo::Forwarded(done), resp3 };
            // A transaction EXEC has just checked against its WATCH goes into the log first.
            crate::transaction::flush();
            node.propose(entry, waiter, Instant::now() + timeout);
        }
        Route::Read => confirm_then_run(&node, vec![(db, argv)], false, vec![resp3], done),
        Route::Refuse(e) => done(Err(e)),
        // The follower runs these itself, or forwards them to wait (`FORWARD-BLOCK`); a peer
        // sending one here is confused, not a client.
        Route::Local | Route::BeginTransaction | Route::Watch | Route::Wait | Route::Blocking | Route::BlockingRead => {
            done(Err("ERR only writes and reads are forwarded".into()))
        }
    }
}

/// Leader side: forwarded reads, linearizable. Once a ReadIndex round has confirmed this node
/// still leads and its dataset has applied the read index, they run back to back on the main
/// thread (nothing runs between them); `batch` sends their replies back together, as a forwarded
/// transaction expects them, rather than the one reply of a forwarded command. `resp3`: the
/// protocol of each.
fn confirm_then_run(node: &RaftNode, reads: Vec<(u32, Vec<Vec<u8>>)>, batch: bool, resp3: Vec<bool>, done: ForwardDone) {
    let s = state::get();
    let progress = s.progress.clone();
    let slot = slot_of_first(s.main_thread_ctx(), &reads);
    node.read_index(
        Box::new(move |confirmed| match confirmed {
            Ok(index) => progress.when_applied(
                index,
                Box::new(move || {
                    if let Err(e) = state::get().send_to_apply(Job::RunForwarded { reads, batch, resp3, done }) {
                        log::warn!("cannot run a forwarded read: {e}");
                    }
                }),
            ),
            Err(e) => done(Err(state::error_reply(&e, slot))),
        }),
        Instant::now() + s.write_timeout(),
    );
}

/// Leader side: a follower's transaction (an EXEC, or a client's pipeline) becomes one entry, its
/// reads included (they run where the entry is applied); one that only reads needs no entry and
/// runs at a confirmed read index instead. Its writes are readied here, as the leader's own
/// clients' (times pinned by this leader's clock). Each command answers in its
/// own protocol (`resp3`). The first `exec` commands are an EXEC's: over the memory limit, one of
/// them that may grow memory discards them all, as on the leader's own clients.
fn serve_transaction(node: &RaftNode, commands: Vec<(u32, Vec<Vec<u8>>)>, exec: usize, resp3: Vec<bool>, done: ForwardDone) {
    let s = state::get();
    let routes: Vec<Route> = commands.iter().map(|(_, argv)| s.route(&argv.iter().map(Vec::as_slice).collect::<Vec<_>>())).collect();
    if routes.iter().all(|route| matches!(route, Route::Read | Route::BlockingRead)) {
        return confirm_then_run(node, commands, true, resp3, done);
    }
    let at = crate::expiry::stamp();
    let mut pinned = Vec::with_capacity(commands.len());
    let mut pinned_resp3 = Vec::with_capacity(commands.len());
    // Answered here, in their own place, rather than in the entry: writes that cannot enter the
    // log (an EVALSHA of a script nobody loaded, a write over the memory limit) with their error, as on the leader's own
    // clients, and WAIT, which does not wait inside a transaction. The others still run.
    let mut in_place = Vec::new();
    let mut exec_discarded = false;
    // How many of the EXEC's commands are in `pinned`, ahead of the pipeline's.
    let mut exec_pinned = 0;
    for (i, (((db, argv), route), resp3)) in commands.iter().zip(routes).zip(resp3).enumerate() {
        if exec_discarded && i < exec {
            // Answered below with the rest of the EXEC; readied, it would tell WATCH of a write
            // that never happens.
            in_place.push((i, Vec::new()));
            continue;
        }
        let mut args: Args = argv.iter().map(|a| Cow::Borrowed(a.as_slice())).collect();
        match route {
            // Inside a transaction a blocking command does not block: a plain write or read.
            Route::Write | Route::Blocking => {
                if let Err(e) = crate::write::prepare_admitted(*db, &mut args, at) {
                    exec_discarded |= i < exec && e == memory_limit::OOM_ERROR;
                    in_place.push((i, error_proto(&e)));
                    continue;
                }
            }
            Route::Read | Route::BlockingRead => {}
            Route::Wait => {
                in_place.push((i, format!(":{}\r\n", crate::wait::at_once(node)).into_bytes()));
                continue;
            }
            _ => return done(Err("ERR a forwarded transaction holds only writes and reads".into())),
        }
        pinned.push((*db, args));
        pinned_resp3.push(resp3);
        exec_pinned += usize::from(i < exec);
    }
    if exec_discarded {
        // Every command of the EXEC answers why, those readied already included; the pipeline's
        // after it still run.
        pinned.drain(..exec_pinned);
        pinned_resp3.drain(..exec_pinned);
        let error = error_proto(&crate::transaction::exec_abort(memory_limit::OOM_ERROR));
        in_place.retain(|(i, _)| *i >= exec);
        in_place.splice(0..0, (0..exec).map(|i| (i, error.clone())));
    }
    if pinned.is_empty() {
        let replies: Vec<Vec<u8>> = in_place.into_iter().map(|(_, reply)| reply).collect();
        return done(Ok(encode_replies(&replies)));
    }
    let done = if in_place.is_empty() { done } else { with_in_place(done, in_place) };
    let entry = encode_transaction(Some(at), &pinned);
    let first_resp3 = pinned_resp3[0];
    let waiter = WriteWaiter { reply_to: ReplyTo::ForwardedTransaction { done, resp3: pinned_resp3 }, resp3: first_resp3 };
    crate::transaction::flush();
    node.propose(entry, waiter, Instant::now() + s.write_timeout());
}

/// `done`, once the replies of the commands answered `in_place` (by position, in order) are put
/// back among the replies of those that ran.
fn with_in_place(done: ForwardDone, in_place: Vec<(usize, Vec<u8>)>) -> ForwardDone {
    Box::new(move |reply| {
        let Ok(raw) = reply else { return done(reply) };
        let Some(mut replies) = decode_replies(&raw) else { return done(Ok(raw)) };
        for (i, answer) in in_place {
            replies.insert(i.min(replies.len()), answer);
        }
        done(Ok(encode_replies(&replies)))
    })
}

/// Leader side, on the main thread: forwarded reads whose read index is applied (see
/// [`confirm_then_run`]), each in its own protocol (`resp3`).
pub fn run_reads(ctx: *mut RedisModuleCtx, reads: Vec<(u32, Vec<Vec<u8>>)>, batch: bool, resp3: Vec<bool>, done: ForwardDone) {
    let mut replies = Vec::with_capacity(reads.len());
    for ((db, argv), resp3) in reads.into_iter().zip(resp3) {
        let reply = if ffi::select_db(ctx, db) {
            take_proto(crate::expiry::reading(ctx, &argv, || ffi::call(ctx, &argv, resp3)))
        } else {
            Err(format!("ERR DB index {db} is out of range"))
        };
        if !batch {
            return done(reply);
        }
        replies.push(reply.unwrap_or_else(|e| error_proto(&e)));
    }
    done(Ok(encode_replies(&replies)));
}

/// An error as a raw RESP reply line (`-ERR ...`), on one line whatever the message holds.
pub fn error_proto(error: &str) -> Vec<u8> {
    format!("-{}\r\n", error.replace(['\r', '\n'], " ")).into_bytes()
}

/// A call's reply as raw RESP, freeing it; the error to answer instead if there is none.
pub fn take_proto(reply: *mut ffi::RedisModuleCallReply) -> Result<Vec<u8>, String> {
    let raw = proto_of(reply).ok_or_else(|| "ERR command could not be executed".to_string());
    ffi::free_call_reply(reply);
    raw
}

/// The reply exactly as Redis would have sent it to a client.
pub fn proto_of(reply: *mut ffi::RedisModuleCallReply) -> Option<Vec<u8>> {
    if reply.is_null() {
        return None;
    }
    let mut len = 0usize;
    let p = unsafe { api!(RedisModule_CallReplyProto)(reply, &mut len) };
    (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec())
}

/// Follower side, in the reply callback: replays the leader's raw reply to the client.
pub fn relay(ctx: *mut RedisModuleCtx, raw: &[u8]) -> c_int {
    // Checked whole before anything is emitted: the client must get exactly one reply, and a
    // value half emitted cannot be taken back. Only a corrupt reply fails here.
    let mut pos = 0;
    if emit(None, raw, &mut pos).is_none() || pos != raw.len() {
        let start = String::from_utf8_lossy(&raw[..raw.len().min(120)]).escape_debug().to_string();
        log::warn!("could not relay a forwarded reply ({} bytes, starting \"{start}\")", raw.len());
        return ffi::reply_error(ctx, "ERR could not relay the leader's reply");
    }
    emit(Some(ctx), raw, &mut 0);
    ffi::OK
}

/// Walks one RESP value starting at `pos` (RESP2 and RESP3 types), advancing `pos` past it, and
/// emits it to the client of `ctx` if there is one (None: only checks it).
fn emit(ctx: Option<*mut RedisModuleCtx>, buf: &[u8], pos: &mut usize) -> Option<()> {
    let kind = *buf.get(*pos)?;
    let line_end = *pos + buf[*pos..].windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[*pos + 1..line_end];
    *pos = line_end + 2;
    let number = || std::str::from_utf8(line).ok()?.parse::<i64>().ok();
    // Runs the module API call that emits the value, when there is a client to emit to.
    let out = |f: &dyn Fn(*mut RedisModuleCtx)| {
        if let Some(ctx) = ctx {
            f(ctx);
        }
    };
    unsafe {
        match kind {
            // Status and error lines may hold any byte but CR and LF (an error quoting a
            // client's argument, say).
            b'+' => {
                let text = line_cstr(line);
                out(&|ctx| {
                    api!(RedisModule_ReplyWithSimpleString)(ctx, text.as_ptr());
                });
            }
            b'-' => {
                let text = line_cstr(line);
                out(&|ctx| {
                    api!(RedisModule_ReplyWithError)(ctx, text.as_ptr());
                });
            }
            b':' => {
                let n = number()?;
                out(&|ctx| {
                    api!(RedisModule_ReplyWithLongLong)(ctx, n);
                });
            }
            b'$' => match number()? {
                n if n < 0 => out(&|ctx| {
                    api!(RedisModule_ReplyWithNull)(ctx);
                }),
                n => {
                    let data = blob(buf, pos, n)?;
                    out(&|ctx| {
                        api!(RedisModule_ReplyWithStringBuffer)(ctx, data.as_ptr() as *const c_char, data.len());
                    });
                }
            },
            b'=' => {
                // `txt:` (or another 3-letter format) precedes the text.
                let data = blob(buf, pos, number()?)?;
                let (format, body) = (data.get(..3)?, data.get(4..)?);
                let format = ffi::cstr(std::str::from_utf8(format).ok()?);
                out(&|ctx| {
                    api!(RedisModule_ReplyWithVerbatimStringType)(ctx, body.as_ptr() as *const c_char, body.len(), format.as_ptr());
                });
            }
            b'*' | b'>' | b'~' | b'%' | b'|' => {
                let n = number()?;
                if n < 0 {
                    out(&|ctx| {
                        api!(RedisModule_ReplyWithNullArray)(ctx);
                    });
                    return Some(());
                }
                let children = match kind {
                    b'%' | b'|' => n * 2,
                    _ => n,
                };
                out(&|ctx| {
                    match kind {
                        b'~' => api!(RedisModule_ReplyWithSet)(ctx, n as c_long),
                        b'%' => api!(RedisModule_ReplyWithMap)(ctx, n as c_long),
                        b'|' => api!(RedisModule_ReplyWithAttribute)(ctx, n as c_long),
                        _ => api!(RedisModule_ReplyWithArray)(ctx, n as c_long),
                    };
                });
                for _ in 0..children {
                    emit(ctx, buf, pos)?;
                }
                if kind == b'|' {
                    // An attribute annotates the value that follows it.
                    return emit(ctx, buf, pos);
                }
            }
            b'_' => out(&|ctx| {
                api!(RedisModule_ReplyWithNull)(ctx);
            }),
            b'#' => {
                let b = match line {
                    b"t" => 1,
                    b"f" => 0,
                    _ => return None,
                };
                out(&|ctx| {
                    api!(RedisModule_ReplyWithBool)(ctx, b);
                });
            }
            b',' => {
                let v = match std::str::from_utf8(line).ok()? {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    t => t.parse().ok()?,
                };
                out(&|ctx| {
                    api!(RedisModule_ReplyWithDouble)(ctx, v);
                });
            }
            b'(' => out(&|ctx| {
                api!(RedisModule_ReplyWithBigNumber)(ctx, line.as_ptr() as *const c_char, line.len());
            }),
            _ => return None,
        }
    }
    Some(())
}

/// A status or error line as a C string (cut at a NUL, which Redis' own lines never hold).
fn line_cstr(line: &[u8]) -> CString {
    let end = line.iter().position(|&b| b == 0).unwrap_or(line.len());
    CString::new(&line[..end]).expect("no NUL left")
}

/// The `n` bytes of a bulk or verbatim string at `pos` (followed by CRLF), advancing past them.
fn blob<'a>(buf: &'a [u8], pos: &mut usize, n: i64) -> Option<&'a [u8]> {
    let n = usize::try_from(n).ok()?;
    let data = buf.get(*pos..pos.checked_add(n)?)?;
    *pos += n + 2;
    Some(data)
}
