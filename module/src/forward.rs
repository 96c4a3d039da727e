//! The follower proxy (`follower-proxy yes`): a follower that gets a command only the leader may
//! serve sends it to the leader over the side port (`FORWARD`, see `raftis_core::forward`) and
//! relays the reply, so clients that ignore `-MOVED` still work.
//!
//! - Follower side: [`to_leader`] blocks the client and hands the command to the transport; the
//!   leader's raw reply comes back and [`relay`] replays it to the client through the module API.
//! - Leader side: [`handler`] receives forwarded commands on the transport thread and queues them
//!   for the main thread, where [`serve`] runs them exactly like a client's: writes are pinned,
//!   proposed and answered once applied; reads are linearizable (ReadIndex) whatever the
//!   leader's own consistency level. A leader never forwards again: if it lost leadership the
//!   follower gets the `-MOVED`/`-CLUSTERDOWN` a client would have.

use crate::apply::{Job, ReplyTo, WriteWaiter};
use crate::blocked::{Blocked, Outcome};
use crate::ffi::{self, api, RedisModuleCtx};
use crate::state;
use raftis_core::command_entry::encode_command;
use raftis_core::determinism::{self, Args};
use raftis_core::forward::{ForwardDone, ForwardHandler, ForwardRequest};
use raftis_core::routing::Route;
use std::borrow::Cow;
use std::os::raw::{c_char, c_int, c_long};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Extra time the follower's client waits beyond write-timeout (the leader answers first).
const BACKSTOP: Duration = Duration::from_secs(2);

/// Follower side: sends the client's command to the leader and blocks the client until the
/// answer comes back. Errs (with the usual redirect) when no leader is known.
pub fn to_leader(ctx: *mut RedisModuleCtx, argv: Vec<Vec<u8>>) -> Result<(), String> {
    let s = state::get();
    let node = s.node().ok_or_else(crate::write::not_initialized)?;
    let status = node.status();
    let leader = status.leader.and_then(|l| status.members.get(&l)).ok_or_else(|| state::redirect(&status))?;
    let req = ForwardRequest { db: ffi::selected_db(ctx), resp3: ffi::client_is_resp3(ctx), argv };
    let timeout = s.write_timeout() + Duration::from_secs(1);
    let blocked = Blocked::new(ctx, timeout + BACKSTOP);
    node.transport().forward(
        leader.raft_addr.clone(),
        &req,
        timeout,
        Box::new(move |reply| {
            blocked.finish(match reply {
                Ok(raw) => Outcome::Relay(raw),
                Err(e) => Outcome::Error(e),
            })
        }),
    );
    Ok(())
}

/// Leader side: what the transport calls for each `FORWARD`.
pub fn handler() -> ForwardHandler {
    Arc::new(|req, done| {
        if let Err(e) = state::get().send_to_apply(Job::Forward { req, done }) {
            log::warn!("cannot serve a forwarded command: {e}");
        }
    })
}

/// Leader side, on the main thread: runs one forwarded command like a client's.
pub fn serve(req: ForwardRequest, done: ForwardDone) {
    let s = state::get();
    let Some(node) = s.node() else { return done(Err(crate::write::not_initialized())) };
    if !node.is_leader() {
        return done(Err(state::redirect(&node.status())));
    }
    let refs: Vec<&[u8]> = req.argv.iter().map(|a| a.as_slice()).collect();
    let route = s.table.read().unwrap_or_else(|p| p.into_inner()).route(&refs);
    let timeout = s.write_timeout();
    match route {
        Route::Write => {
            let mut argv: Args = req.argv.iter().map(|a| Cow::Borrowed(a.as_slice())).collect();
            if let Err(e) = determinism::pin(&mut argv, ffi::now_ms()) {
                return done(Err(e.0));
            }
            let entry = encode_command(req.db, &argv);
            let waiter = WriteWaiter { reply_to: ReplyTo::Forwarded(done), resp3: req.resp3 };
            node.propose(entry, waiter, Instant::now() + timeout);
        }
        Route::Read => {
            let progress = s.progress.clone();
            node.read_index(
                Box::new(move |confirmed| match confirmed {
                    Ok(index) => progress.when_applied(
                        index,
                        Box::new(move || {
                            if let Err(e) = state::get().send_to_apply(Job::RunForwarded { req, done }) {
                                log::warn!("cannot run a forwarded read: {e}");
                            }
                        }),
                    ),
                    Err(e) => done(Err(state::error_reply(&e))),
                }),
                Instant::now() + timeout,
            );
        }
        Route::Refuse(e) => done(Err(e)),
        // The follower runs these itself; a peer sending one is confused, not a client.
        Route::Local | Route::BeginTransaction => done(Err("ERR only writes and reads are forwarded".into())),
    }
}

/// Leader side, on the main thread: a forwarded read whose ReadIndex is applied.
pub fn run_read(ctx: *mut RedisModuleCtx, req: ForwardRequest, done: ForwardDone) {
    if !ffi::select_db(ctx, req.db) {
        return done(Err(format!("ERR DB index {} is out of range", req.db)));
    }
    done(take_proto(ffi::call(ctx, &req.argv, req.resp3)));
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
    let mut pos = 0;
    if emit(ctx, raw, &mut pos).is_none() || pos != raw.len() {
        // Only reachable with a corrupt reply; the client must still get exactly one reply, and
        // nothing has been emitted unless the first value parsed.
        log::warn!("could not relay a forwarded reply ({} bytes)", raw.len());
        if pos == 0 {
            return ffi::reply_error(ctx, "ERR could not relay the leader's reply");
        }
    }
    ffi::OK
}

/// Emits one RESP value starting at `pos` (RESP2 and RESP3 types), advancing `pos` past it.
fn emit(ctx: *mut RedisModuleCtx, buf: &[u8], pos: &mut usize) -> Option<()> {
    let kind = *buf.get(*pos)?;
    let line_end = *pos + buf[*pos..].windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[*pos + 1..line_end];
    *pos = line_end + 2;
    let text = std::str::from_utf8(line).ok();
    let number = || text?.parse::<i64>().ok();
    unsafe {
        match kind {
            b'+' => {
                api!(RedisModule_ReplyWithSimpleString)(ctx, ffi::cstr(text?).as_ptr());
            }
            b'-' => {
                api!(RedisModule_ReplyWithError)(ctx, ffi::cstr(text?).as_ptr());
            }
            b':' => {
                api!(RedisModule_ReplyWithLongLong)(ctx, number()?);
            }
            b'$' => match number()? {
                n if n < 0 => {
                    api!(RedisModule_ReplyWithNull)(ctx);
                }
                n => {
                    let data = blob(buf, pos, n)?;
                    api!(RedisModule_ReplyWithStringBuffer)(ctx, data.as_ptr() as *const c_char, data.len());
                }
            },
            b'=' => {
                // `txt:` (or another 3-letter format) precedes the text.
                let data = blob(buf, pos, number()?)?;
                let (format, body) = (data.get(..3)?, data.get(4..)?);
                let format = ffi::cstr(std::str::from_utf8(format).ok()?);
                api!(RedisModule_ReplyWithVerbatimStringType)(ctx, body.as_ptr() as *const c_char, body.len(), format.as_ptr());
            }
            b'*' | b'>' | b'~' | b'%' | b'|' => {
                let n = number()?;
                if n < 0 {
                    api!(RedisModule_ReplyWithNullArray)(ctx);
                    return Some(());
                }
                let children = match kind {
                    b'%' | b'|' => n * 2,
                    _ => n,
                };
                match kind {
                    b'~' => api!(RedisModule_ReplyWithSet)(ctx, n as c_long),
                    b'%' => api!(RedisModule_ReplyWithMap)(ctx, n as c_long),
                    b'|' => api!(RedisModule_ReplyWithAttribute)(ctx, n as c_long),
                    _ => api!(RedisModule_ReplyWithArray)(ctx, n as c_long),
                };
                for _ in 0..children {
                    emit(ctx, buf, pos)?;
                }
                if kind == b'|' {
                    // An attribute annotates the value that follows it.
                    return emit(ctx, buf, pos);
                }
            }
            b'_' => {
                api!(RedisModule_ReplyWithNull)(ctx);
            }
            b'#' => {
                api!(RedisModule_ReplyWithBool)(ctx, (line == b"t") as c_int);
            }
            b',' => {
                let v = match text? {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    t => t.parse().ok()?,
                };
                api!(RedisModule_ReplyWithDouble)(ctx, v);
            }
            b'(' => {
                api!(RedisModule_ReplyWithBigNumber)(ctx, line.as_ptr() as *const c_char, line.len());
            }
            _ => return None,
        }
    }
    Some(())
}

/// The `n` bytes of a bulk or verbatim string at `pos` (followed by CRLF), advancing past them.
fn blob<'a>(buf: &'a [u8], pos: &mut usize, n: i64) -> Option<&'a [u8]> {
    let n = usize::try_from(n).ok()?;
    let data = buf.get(*pos..pos.checked_add(n)?)?;
    *pos += n + 2;
    Some(data)
}
