//! `RAFT.DIGEST`: a fingerprint of this node's dataset, to compare nodes that have applied the
//! same index. Nodes that applied the same entries must hold the same data, and `DEBUG DIGEST`
//! alone cannot show it all: it counts whether a key has an expiry, not when, and of a stream
//! only its entries, not its consumer groups, their pending entries and delivery times. Those
//! are exactly what Raftis makes deterministic (deadlines fixed by the leader, stream times by
//! the log's clock), so this digest covers, for every key of every database: its name, its value
//! (`DEBUG DIGEST-VALUE`), its absolute deadline (`PEXPIRETIME`) and, for a stream,
//! `XINFO STREAM ... FULL`; and the function libraries with their code.
//!
//! Like `DEBUG DIGEST` it walks the whole dataset on the main thread: a diagnostic, O(N).

use crate::ffi::{self, RedisModuleCtx};
use crate::reply::Reply;
use crate::state;
use bytes::BytesMut;
use raftis_core::resp::{self, Frame};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// The order-independent sum of records' hashes: 128 bits, two differently seeded SipHashes.
#[derive(Default)]
struct Fingerprint {
    parts: [u64; 2],
}

impl Fingerprint {
    fn add(&mut self, record: &[&[u8]]) {
        for (seed, part) in self.parts.iter_mut().enumerate() {
            // SipHash with fixed keys: the same on every node running this build.
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            record.hash(&mut h);
            *part ^= h.finish();
        }
    }

    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.parts[0], self.parts[1])
    }
}

/// `RAFT.DIGEST`: `[applied index, keys, digest]`.
pub fn digest(ctx: *mut RedisModuleCtx, args: &[Vec<u8>]) -> Result<Reply, String> {
    if args.len() != 1 {
        return Err("ERR wrong number of arguments for 'raft.digest' command".into());
    }
    let s = state::get();
    let applied = s.progress.applied();
    // Expiry suspended: the walk must neither delete keys whose deadline passed nor skip them
    // (a node deletes those by the log, at its own pace).
    let (fingerprint, keys) = crate::expiry::suspended(|| walk(ctx, s.databases))?;
    Ok(Reply::Array(vec![Reply::Integer(applied.get() as i64), Reply::Integer(keys as i64), Reply::Bulk(fingerprint.hex().into_bytes())]))
}

fn walk(ctx: *mut RedisModuleCtx, databases: u32) -> Result<(Fingerprint, u64), String> {
    let mut fingerprint = Fingerprint::default();
    let mut keys = 0;
    for db in 0..databases {
        let db_bytes = db.to_le_bytes();
        let walked = ffi::in_db(ctx, db, || -> Result<(), String> {
            for name in keys_of(ctx)? {
                let record = key_record(ctx, &name)?;
                let parts: Vec<&[u8]> = std::iter::once(&db_bytes[..]).chain(record.iter().map(Vec::as_slice)).collect();
                fingerprint.add(&parts);
                keys += 1;
            }
            Ok(())
        });
        walked.ok_or_else(|| format!("ERR cannot select database {db}"))??;
    }
    // A library is its name and code: Redis lists its functions in the order of a hash table
    // seeded per process, so the listing itself differs between nodes holding the same.
    for library in call(ctx, &["FUNCTION", "LIST", "WITHCODE"])?.into_array()? {
        let fields = library.into_array()?;
        let field = |name: &[u8]| {
            fields.chunks(2).find(|kv| matches!(&kv[0], Frame::Bulk(k) if k == name)).and_then(|kv| match kv.get(1) {
                Some(Frame::Bulk(v)) => Some(v.to_vec()),
                _ => None,
            })
        };
        let (Some(name), Some(code)) = (field(b"library_name"), field(b"library_code")) else {
            return Err("ERR unexpected FUNCTION LIST reply".into());
        };
        fingerprint.add(&[b"library", &name, &code]);
    }
    Ok((fingerprint, keys))
}

/// Every key of the selected database, once (SCAN may return a key twice).
fn keys_of(ctx: *mut RedisModuleCtx) -> Result<HashSet<Vec<u8>>, String> {
    let mut keys = HashSet::new();
    let mut cursor = b"0".to_vec();
    loop {
        let cursor_text = String::from_utf8_lossy(&cursor).into_owned();
        let mut reply = call(ctx, &["SCAN", &cursor_text, "COUNT", "1000"])?.into_array()?.into_iter();
        let (Some(next), Some(batch)) = (reply.next(), reply.next()) else { return Err("ERR unexpected SCAN reply".into()) };
        keys.extend(batch.into_array()?.into_iter().map(Frame::into_bytes).collect::<Result<Vec<_>, _>>()?);
        cursor = next.into_bytes()?;
        if cursor == b"0" {
            return Ok(keys);
        }
    }
}

/// What the digest takes of one key: name, value digest, absolute deadline, and a stream's
/// groups.
fn key_record(ctx: *mut RedisModuleCtx, name: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let value = call_raw(ctx, &[b"DEBUG", b"DIGEST-VALUE", name])?;
    let deadline = call_raw(ctx, &[b"PEXPIRETIME", name])?;
    let kind = call_raw(ctx, &[b"TYPE", name])?;
    let mut record = vec![name.to_vec(), value, deadline];
    if kind == b"+stream\r\n" {
        record.push(call_raw(ctx, &[b"XINFO", b"STREAM", name, b"FULL", b"COUNT", b"0"])?);
    }
    Ok(record)
}

fn call(ctx: *mut RedisModuleCtx, argv: &[&str]) -> Result<Frame, String> {
    let raw = call_raw(ctx, &argv.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())?;
    match resp::parse(&mut BytesMut::from(&raw[..])) {
        Ok(Some(frame)) => Ok(frame),
        _ => Err(format!("ERR {} gave an unreadable reply", argv.join(" "))),
    }
}

/// The reply as RESP2 bytes; an error reply is an error.
fn call_raw(ctx: *mut RedisModuleCtx, argv: &[&[u8]]) -> Result<Vec<u8>, String> {
    let raw = crate::forward::take_proto(ffi::call(ctx, argv, false))?;
    if raw.first() == Some(&b'-') {
        let text = String::from_utf8_lossy(&raw[1..]).trim_end().to_string();
        return Err(format!("ERR {} failed: {text}", String::from_utf8_lossy(argv[0])));
    }
    Ok(raw)
}

trait FrameExt: Sized {
    fn into_array(self) -> Result<Vec<Frame>, String>;
    fn into_bytes(self) -> Result<Vec<u8>, String>;
}

impl FrameExt for Frame {
    fn into_array(self) -> Result<Vec<Frame>, String> {
        match self {
            Frame::Array(items) => Ok(items),
            other => Err(format!("ERR expected an array, got {other:?}")),
        }
    }

    fn into_bytes(self) -> Result<Vec<u8>, String> {
        match self {
            Frame::Bulk(b) => Ok(b.to_vec()),
            other => Err(format!("ERR expected a bulk string, got {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Fingerprint;

    #[test]
    fn a_fingerprint_ignores_order_and_sees_every_part() {
        let (mut a, mut b, mut c) = (Fingerprint::default(), Fingerprint::default(), Fingerprint::default());
        a.add(&[b"k1", b"v"]);
        a.add(&[b"k2", b"v"]);
        b.add(&[b"k2", b"v"]);
        b.add(&[b"k1", b"v"]);
        c.add(&[b"k1", b"v"]);
        c.add(&[b"k2", b"w"]);
        assert_eq!(a.hex(), b.hex());
        assert_ne!(a.hex(), c.hex());
        let (mut split, mut joined) = (Fingerprint::default(), Fingerprint::default());
        split.add(&[b"ab", b"c"]);
        joined.add(&[b"a", b"bc"]);
        assert_ne!(split.hex(), joined.hex(), "parts are hashed with their lengths");
    }
}
