//! The follower proxy's wire format. With `follower-proxy yes`, a follower that receives a command
//! only the leader may serve sends it to the leader's side port as
//! `FORWARD <db> <2|3> <command> <arg>...` and relays what comes back to its client:
//! a two-element array, a bulk string holding the command's reply exactly as Redis produced it
//! (RESP2 or RESP3, as the client speaks) and the index of the last log entry the leader's
//! dataset had applied or was applying when it answered; or an error line when the cluster could
//! not run it (`MOVED`, `CLUSTERDOWN`, `TIMEOUT`: the same errors a client talking to the leader
//! would get).
//!
//! The index is for read-your-writes at consistency `low`, where a follower serves reads from its
//! own dataset: the follower relays the reply only once its own dataset has applied that far
//! (see [`Dataset`]), so a read its client sends after the answer of a write sees the write.
//!
//! A transaction (MULTI/EXEC) goes whole, so that it stays one log entry:
//! `FORWARD-TX <protocols> <transaction>`, the transaction encoded as its log entry would be (see
//! `command_entry`), and `protocols` either one digit, `2` or `3`, for all its commands, or one
//! digit per command when a `HELLO` switched the client's protocol between them. Its reply is a bulk string holding an array of bulk strings, each one
//! command's raw reply ([`encode_replies`]); or one error line for the whole transaction.
//!
//! A blocking command (`BLPOP`, `XREAD ... BLOCK`, ...) goes as
//! `FORWARD-BLOCK <db> <2|3> <command> <arg>...` and is answered like `FORWARD`, but only when the
//! command is: it may wait for ever. Its connection carries nothing else meanwhile, so the
//! follower cancels it by hanging up (its client left or gave up, or another node leads now), and
//! the leader, which watches the connection while it waits ([`Abandoned`]), forgets the wait.

use crate::command_entry::{encode_transaction, EntryView};
use crate::ids::LogIndex;
use crate::resp::{self, Frame};
use bytes::BytesMut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What runs once this node's dataset has caught up (see [`Dataset::when_reflects`]).
pub type CaughtUp = Box<dyn FnOnce() + Send>;

/// How far this node's dataset has come, as the follower proxy needs to know it (given to the
/// transport by the module).
pub trait Dataset: Send + Sync {
    /// Leader: the index of the last entry whose effects a reply produced now may show (the
    /// entry being applied, if one is). Called where the reply is produced.
    fn reflects(&self) -> LogIndex;

    /// Follower: calls `then` once this node's reads see every entry up to `index`: at once if
    /// they already do, or if its reads do not come from its own dataset.
    fn when_reflects(&self, index: LogIndex, then: CaughtUp);
}

/// What a follower forwards on behalf of its client. `resp3`: the client speaks RESP3, so the
/// reply must be produced in RESP3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardRequest {
    /// One command, in the client's selected database.
    Command { db: u32, argv: Vec<Vec<u8>>, resp3: bool },
    /// A blocking command, in the client's selected database: answered when it is, however late.
    Blocking { db: u32, argv: Vec<Vec<u8>>, resp3: bool },
    /// The data commands of a transaction, each with its database, in the order EXEC ran them,
    /// and the protocol each one answers in: a `HELLO` between them (run by the follower)
    /// switches it for the commands after it, as in Redis. `exec`: how many of them, from the
    /// first, are one EXEC's; the others are the client's pipeline after it (see the module's
    /// `transaction::join_forwarded`). Those of the EXEC run together or not at all: the leader
    /// discards them whole when one may not run (over its memory limit), as Redis does at EXEC.
    Transaction { commands: Vec<(u32, Vec<Vec<u8>>)>, resp3: Vec<bool>, exec: usize },
}

/// The raw reply, or an error line (without the leading `-`).
pub type ForwardReply = Result<Vec<u8>, String>;

/// Called once with the outcome of a forwarded command.
pub type ForwardDone = Box<dyn FnOnce(ForwardReply) + Send>;

/// What the leader does with a forwarded command (given to the transport by the module). The
/// [`Abandoned`] flag tells it when the follower stops waiting for the answer.
pub type ForwardHandler = Arc<dyn Fn(ForwardRequest, ForwardDone, Abandoned) + Send + Sync>;

pub const FORWARD: &[u8] = b"FORWARD";
pub const FORWARD_TX: &[u8] = b"FORWARD-TX";
pub const FORWARD_BLOCK: &[u8] = b"FORWARD-BLOCK";

/// Leader side: set once the follower that forwarded a request hangs up before its answer.
#[derive(Clone, Debug, Default)]
pub struct Abandoned(Arc<AtomicBool>);

/// How many forwarded requests have been abandoned so far: waiters need looking at only when it
/// moved.
static ABANDONED: AtomicU64 = AtomicU64::new(0);

/// See [`ABANDONED`].
pub fn abandoned_so_far() -> u64 {
    ABANDONED.load(Ordering::Acquire)
}

impl Abandoned {
    pub fn set(&self) {
        if !self.0.swap(true, Ordering::AcqRel) {
            ABANDONED.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Follower side: ends a forwarded request before its answer comes, with the error to give its
/// client; the connection it travelled on is closed, which tells the leader.
#[derive(Clone, Default)]
pub struct ForwardCancel(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    reason: Mutex<Option<String>>,
    wake: Notify,
}

impl ForwardCancel {
    /// The first reason given is the one the request ends with.
    pub fn cancel(&self, reason: impl Into<String>) {
        self.0.reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| reason.into());
        // A permit is kept if nobody waits yet, so a cancel before the wait starts still counts.
        self.0.wake.notify_one();
    }

    /// The reason it was cancelled with, if it was.
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves, with the reason, once [`ForwardCancel::cancel`] was called.
    pub async fn cancelled(&self) -> String {
        loop {
            if let Some(reason) = self.0.reason.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return reason;
            }
            self.0.wake.notified().await;
        }
    }
}

impl ForwardRequest {
    pub fn encode(&self, out: &mut BytesMut) {
        let protocol = |resp3: bool| if resp3 { b'3' } else { b'2' };
        match self {
            ForwardRequest::Command { db, argv, resp3 } | ForwardRequest::Blocking { db, argv, resp3 } => {
                let verb = if matches!(self, ForwardRequest::Blocking { .. }) { FORWARD_BLOCK } else { FORWARD };
                let db = db.to_string();
                let protocol = [protocol(*resp3)];
                let mut parts: Vec<&[u8]> = vec![verb, db.as_bytes(), &protocol];
                parts.extend(argv.iter().map(|a| a.as_slice()));
                resp::encode_command(&parts, out);
            }
            ForwardRequest::Transaction { commands, resp3, exec } => {
                // One digit when every command speaks the same protocol, one per command when a
                // HELLO switched it on the way.
                let protocols: Vec<u8> = match resp3.split_first() {
                    Some((first, rest)) if rest.iter().all(|r| r == first) => vec![protocol(*first)],
                    _ => resp3.iter().map(|r| protocol(*r)).collect(),
                };
                let entry = encode_transaction(None, commands);
                // Named only when there is one, as builds before it sent a pipeline.
                let exec = exec.to_string();
                let mut parts: Vec<&[u8]> = vec![FORWARD_TX, &protocols, &entry];
                if exec != "0" {
                    parts.push(exec.as_bytes());
                }
                resp::encode_command(&parts, out);
            }
        }
    }

    /// Whether `verb` names a forwarded request.
    pub fn is_verb(verb: &[u8]) -> bool {
        [FORWARD, FORWARD_TX, FORWARD_BLOCK].iter().any(|v| verb.eq_ignore_ascii_case(v))
    }

    /// Whether it may wait for ever (a blocking command): it has no backstop.
    pub fn is_blocking(&self) -> bool {
        matches!(self, ForwardRequest::Blocking { .. })
    }

    /// Parses the arguments after `verb` ([`FORWARD`], [`FORWARD_TX`] or [`FORWARD_BLOCK`]).
    pub fn decode(verb: &[u8], args: &[Frame]) -> Result<ForwardRequest, String> {
        let transaction = verb.eq_ignore_ascii_case(FORWARD_TX);
        let blocking = verb.eq_ignore_ascii_case(FORWARD_BLOCK);
        let usage = || match transaction {
            true => "usage: FORWARD-TX <2|3, or one of them per command> <transaction> [<commands of its EXEC>]".to_string(),
            false => format!("usage: {} <db> <2|3> <command> [arg ...]", String::from_utf8_lossy(verb).to_uppercase()),
        };
        let bulk = |f: &Frame| match f {
            Frame::Bulk(b) => Ok(b.to_vec()),
            _ => Err(usage()),
        };
        let protocol = |digit: u8| match digit {
            b'2' => Ok(false),
            b'3' => Ok(true),
            _ => Err(usage()),
        };
        if transaction {
            let (protocols, entry, exec) = match args {
                [protocols, entry] => (protocols, entry, None),
                [protocols, entry, exec] => (protocols, entry, Some(exec)),
                _ => return Err(usage()),
            };
            let commands: Vec<(u32, Vec<Vec<u8>>)> = match EntryView::decode(&bulk(entry)?) {
                Ok(EntryView::Transaction(commands)) if !commands.is_empty() => {
                    commands.into_iter().map(|c| (c.db, c.argv.into_iter().map(<[u8]>::to_vec).collect())).collect()
                }
                _ => return Err("FORWARD-TX: malformed transaction".into()),
            };
            let resp3 = match bulk(protocols)?.as_slice() {
                [one] => vec![protocol(*one)?; commands.len()],
                each if each.len() == commands.len() => each.iter().map(|d| protocol(*d)).collect::<Result<_, _>>()?,
                _ => return Err(usage()),
            };
            let exec = match exec {
                None => 0,
                Some(count) => {
                    let count = std::str::from_utf8(&bulk(count)?).ok().and_then(|s| s.parse::<usize>().ok());
                    count.filter(|n| (1..=commands.len()).contains(n)).ok_or_else(usage)?
                }
            };
            return Ok(ForwardRequest::Transaction { commands, resp3, exec });
        }
        if args.len() < 3 {
            return Err(usage());
        }
        let db = std::str::from_utf8(&bulk(&args[0])?).ok().and_then(|s| s.parse().ok()).ok_or_else(usage)?;
        let resp3 = match bulk(&args[1])?.as_slice() {
            [digit] => protocol(*digit)?,
            _ => return Err(usage()),
        };
        let argv = args[2..].iter().map(bulk).collect::<Result<Vec<_>, _>>()?;
        Ok(if blocking { ForwardRequest::Blocking { db, argv, resp3 } } else { ForwardRequest::Command { db, argv, resp3 } })
    }
}

/// A forwarded transaction's replies, one raw reply per command, as one reply.
pub fn encode_replies(replies: &[Vec<u8>]) -> Vec<u8> {
    let mut out = BytesMut::new();
    resp::encode_array_len(replies.len(), &mut out);
    for reply in replies {
        resp::encode_bulk(reply, &mut out);
    }
    out.to_vec()
}

/// The replies [`encode_replies`] packed; None if `raw` is not such a packing.
pub fn decode_replies(raw: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut buf = BytesMut::from(raw);
    let Ok(Some(Frame::Array(items))) = resp::parse(&mut buf) else { return None };
    if !buf.is_empty() {
        return None;
    }
    items
        .into_iter()
        .map(|item| match item {
            Frame::Bulk(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect()
}

/// The frame that carries a forwarded command's outcome back, with the index the leader's
/// dataset `reflects` as it answered.
pub fn reply_frame(reply: ForwardReply, reflects: LogIndex) -> Frame {
    reply_frame_within(reply, reflects, resp::MAX_BULK)
}

/// A reply over `limit` bytes would not be read by the follower (the side port reads no bulk
/// string longer), which would then report a lost connection and an unknown outcome: it gets an
/// error saying so instead. (A value that big is read with a plain Redis `GET` of over 256 MB,
/// possible with `proto-max-bulk-len` at its 512 MB default.)
fn reply_frame_within(reply: ForwardReply, reflects: LogIndex, limit: usize) -> Frame {
    match reply {
        Ok(raw) if raw.len() > limit => Frame::Error(format!(
            "ERR the reply is {} bytes, over the {} MB the follower proxy carries; the command ran on the leader \
             (a write in it took effect): send it to the leader to read its reply",
            raw.len(),
            limit >> 20
        )),
        Ok(raw) => Frame::Array(vec![Frame::Bulk(raw.into()), Frame::Integer(reflects.get() as i64)]),
        Err(e) => Frame::Error(e),
    }
}

/// Follower side: the reply and the index the leader's dataset reflected, from what
/// [`reply_frame`] sent; or the error line to give the client.
pub fn read_reply_frame(frame: Frame) -> Result<(Vec<u8>, LogIndex), String> {
    match frame {
        Frame::Array(items) => match <[Frame; 2]>::try_from(items) {
            Ok([Frame::Bulk(raw), Frame::Integer(index)]) if index >= 0 => Ok((raw.to_vec(), LogIndex(index as u64))),
            Ok(other) => Err(format!("ERR the leader answered a forwarded command with {other:?}")),
            Err(items) => Err(format!("ERR the leader answered a forwarded command with {} values", items.len())),
        },
        Frame::Error(e) => Err(e),
        other => Err(format!("ERR the leader answered a forwarded command with {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_too_large_for_the_side_port_becomes_an_error_that_says_so() {
        let at = LogIndex(9);
        let Frame::Error(e) = reply_frame_within(Ok(vec![b'x'; 5 << 20]), at, 4 << 20) else { panic!("not an error") };
        assert!(e.starts_with("ERR the reply is 5242880 bytes, over the 4 MB"), "{e}");
        assert_eq!(read_reply_frame(reply_frame_within(Ok(vec![b'x'; 4]), at, 4)), Ok((b"xxxx".to_vec(), at)));
    }

    #[test]
    fn a_reply_comes_back_with_the_index_the_leader_had_applied() {
        let on_the_wire = |reply: ForwardReply| {
            let mut out = BytesMut::new();
            resp::encode(&reply_frame(reply, LogIndex(41)), &mut out);
            read_reply_frame(resp::parse(&mut out).unwrap().unwrap())
        };
        // A command's own error is a reply like any other; the cluster's errors come alone.
        assert_eq!(on_the_wire(Ok(b"-WRONGTYPE no\r\n".to_vec())), Ok((b"-WRONGTYPE no\r\n".to_vec(), LogIndex(41))));
        assert_eq!(on_the_wire(Err("MOVED 0 a:1".into())), Err("MOVED 0 a:1".into()));
        // What an earlier build sent, or a confused peer.
        assert!(read_reply_frame(Frame::Bulk(b"+OK\r\n".to_vec().into())).is_err());
        assert!(read_reply_frame(Frame::Array(vec![Frame::Bulk(b"+OK\r\n".to_vec().into())])).is_err());
        assert!(read_reply_frame(Frame::Array(vec![Frame::Bulk(b"+OK\r\n".to_vec().into()), Frame::Integer(-1)])).is_err());
    }

    fn round_trip(req: &ForwardRequest, verb: &str) -> ForwardRequest {
        let mut out = BytesMut::new();
        req.encode(&mut out);
        let Some(Frame::Array(items)) = resp::parse(&mut out).unwrap() else { panic!("not an array") };
        assert_eq!(items[0], Frame::Bulk(verb.to_string().into()));
        let Frame::Bulk(verb) = &items[0] else { unreachable!() };
        ForwardRequest::decode(verb, &items[1..]).unwrap()
    }

    #[test]
    fn a_request_survives_the_wire() {
        let argv = vec![b"SET".to_vec(), b"k".to_vec(), b"v\r\n".to_vec()];
        let req = ForwardRequest::Command { db: 3, argv: argv.clone(), resp3: true };
        assert_eq!(round_trip(&req, "FORWARD"), req);
        let blocking = ForwardRequest::Blocking { db: 1, argv, resp3: false };
        assert_eq!(round_trip(&blocking, "FORWARD-BLOCK"), blocking);
    }

    #[test]
    fn a_cancel_keeps_its_first_reason_and_counts_before_anyone_waits() {
        let cancel = ForwardCancel::default();
        cancel.cancel("first");
        cancel.cancel("second");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(runtime.block_on(cancel.clone().cancelled()), "first");
    }

    #[test]
    fn a_transaction_survives_the_wire_in_order() {
        let commands = vec![
            (0, vec![b"INCRBY".to_vec(), b"a".to_vec(), b"-5".to_vec()]),
            (3, vec![b"GET".to_vec(), b"b\r\n".to_vec()]),
            (0, vec![b"INCRBY".to_vec(), b"b".to_vec(), b"5".to_vec()]),
        ];
        let req = ForwardRequest::Transaction { commands: commands.clone(), resp3: vec![false; 3], exec: 0 };
        assert_eq!(round_trip(&req, "FORWARD-TX"), req);
        // A HELLO between them: each command keeps its own protocol.
        let switched = ForwardRequest::Transaction { commands: commands.clone(), resp3: vec![false, true, true], exec: 0 };
        assert_eq!(round_trip(&switched, "FORWARD-TX"), switched);
        // An EXEC's two commands, then the pipeline's third.
        let exec = ForwardRequest::Transaction { commands, resp3: vec![false; 3], exec: 2 };
        assert_eq!(round_trip(&exec, "FORWARD-TX"), exec);
    }

    #[test]
    fn a_transaction_in_one_protocol_names_it_once_as_earlier_builds_did() {
        let commands = vec![(0, vec![b"GET".to_vec(), b"a".to_vec()]), (0, vec![b"GET".to_vec(), b"b".to_vec()])];
        let protocols_sent = |resp3: Vec<bool>| {
            let mut out = BytesMut::new();
            ForwardRequest::Transaction { commands: commands.clone(), resp3, exec: 0 }.encode(&mut out);
            let Some(Frame::Array(items)) = resp::parse(&mut out).unwrap() else { panic!("not an array") };
            items[1].clone()
        };
        assert_eq!(protocols_sent(vec![true, true]), Frame::Bulk(b"3".to_vec().into()));
        assert_eq!(protocols_sent(vec![true, false]), Frame::Bulk(b"32".to_vec().into()));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let b = |s: &str| Frame::Bulk(s.to_string().into());
        assert!(ForwardRequest::decode(FORWARD, &[b("0"), b("2")]).is_err());
        assert!(ForwardRequest::decode(FORWARD, &[b("x"), b("2"), b("GET")]).is_err());
        assert!(ForwardRequest::decode(FORWARD, &[b("0"), b("4"), b("GET")]).is_err());
        assert!(ForwardRequest::decode(FORWARD, &[b("0"), b("2"), Frame::Integer(1)]).is_err());
        assert!(ForwardRequest::decode(FORWARD_BLOCK, &[b("0"), b("2")]).unwrap_err().contains("FORWARD-BLOCK"));
        // A transaction must be a non-empty transaction entry.
        let single = crate::command_entry::encode_command(None, 0, &[b"GET".as_slice(), b"k"]);
        let empty = encode_transaction::<Vec<u8>>(None, &[]);
        for entry in [single, empty, b"junk".to_vec()] {
            assert!(ForwardRequest::decode(FORWARD_TX, &[b("2"), Frame::Bulk(entry.into())]).is_err());
        }
        let good = encode_transaction(None, &[(0, vec![b"GET".to_vec(), b"k".to_vec()])]);
        assert!(ForwardRequest::decode(FORWARD_TX, &[b("5"), Frame::Bulk(good.clone().into())]).is_err());
        assert!(ForwardRequest::decode(FORWARD_TX, &[b("2")]).is_err());
        // One protocol per command, or one for all: nothing in between.
        assert!(ForwardRequest::decode(FORWARD_TX, &[b("23"), Frame::Bulk(good.clone().into())]).is_err());
        // An EXEC of no command, or of more commands than there are.
        for exec in ["0", "2", "-1", "x"] {
            assert!(ForwardRequest::decode(FORWARD_TX, &[b("2"), Frame::Bulk(good.clone().into()), b(exec)]).is_err(), "{exec}");
        }
        assert!(ForwardRequest::decode(FORWARD_TX, &[b("2"), Frame::Bulk(good.clone().into()), b("1")]).is_ok());
        assert!(ForwardRequest::decode(FORWARD, &[b("0"), b("23"), b("GET")]).is_err());
        assert!(ForwardRequest::decode(FORWARD_TX, &[b("2"), Frame::Bulk(good.into())]).is_ok());
    }

    #[test]
    fn transaction_replies_come_apart_as_they_were_packed() {
        // RESP3 values, errors and CRLF inside replies are opaque to the packing.
        let replies = vec![b":1\r\n".to_vec(), b"-ERR no\r\n".to_vec(), b"%1\r\n+a\r\n,1.5\r\n".to_vec(), Vec::new()];
        assert_eq!(decode_replies(&encode_replies(&replies)), Some(replies.clone()));
        let mut trailing = encode_replies(&replies);
        trailing.extend_from_slice(b":1\r\n");
        assert_eq!(decode_replies(&trailing), None);
        assert_eq!(decode_replies(b":1\r\n"), None);
        assert_eq!(decode_replies(b"*1\r\n:1\r\n"), None);
    }
}
