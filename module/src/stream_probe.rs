//! Looks at a stream without reading it as a client would: its newest entry, the ID `$` stands
//! for, and how far a consumer group has been served. Blocking stream reads (see `blocking`) use
//! them to tell whether an attempt could get anything. Each works in the selected database, on
//! Redis' main thread.

use crate::ffi::{self, api, RedisModuleCtx};
use raftis_core::stream_read::StreamId;
use redis_module::raw;

/// What a key holds, as a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Newest {
    /// No stream: the key is missing or of another type.
    NoStream,
    /// A stream without entries.
    Empty,
    /// A stream whose newest entry has this ID.
    Entry(StreamId),
}

impl Newest {
    pub fn entry(self) -> Option<StreamId> {
        match self {
            Newest::Entry(id) => Some(id),
            Newest::NoStream | Newest::Empty => None,
        }
    }
}

/// The newest entry of stream `key`, looked at quietly (see [`ffi::QUIET_PROBE`]).
pub fn newest_entry(ctx: *mut RedisModuleCtx, key: &[u8]) -> Newest {
    let name = ffi::new_string(key);
    let opened = unsafe { api!(RedisModule_OpenKey)(ctx, name, ffi::QUIET_PROBE) };
    ffi::free_string(name);
    if opened.is_null() {
        return Newest::NoStream;
    }
    let reverse = raw::REDISMODULE_STREAM_ITERATOR_REVERSE as i32;
    let mut newest = Newest::NoStream;
    // Fails for a key that is not a stream.
    if unsafe { api!(RedisModule_StreamIteratorStart)(opened, reverse, std::ptr::null_mut(), std::ptr::null_mut()) } == ffi::OK {
        let mut id = raw::RedisModuleStreamID { ms: 0, seq: 0 };
        let mut fields = 0;
        newest = match unsafe { api!(RedisModule_StreamIteratorNextID)(opened, &mut id, &mut fields) } == ffi::OK {
            true => Newest::Entry(StreamId { ms: id.ms, seq: id.seq }),
            false => Newest::Empty,
        };
        unsafe { api!(RedisModule_StreamIteratorStop)(opened) };
    }
    unsafe { api!(RedisModule_CloseKey)(opened) };
    newest
}

/// What `$` means in an `XREAD` of `key` now: the last ID the stream has given out (which an
/// entry deleted since may have had), `0-0` for a missing key.
pub fn last_generated_id(ctx: *mut RedisModuleCtx, key: &[u8]) -> Vec<u8> {
    let reply = ffi::call(ctx, &[&b"XINFO"[..], b"STREAM", key], false);
    let id = field(reply, b"last-generated-id").map(<[u8]>::to_vec);
    ffi::free_call_reply(reply);
    id.unwrap_or_else(|| b"0-0".to_vec())
}

/// The last entry delivered to `group` of stream `key` (None: no such group or stream).
pub fn last_delivered(ctx: *mut RedisModuleCtx, key: &[u8], group: &[u8]) -> Option<StreamId> {
    let reply = ffi::call(ctx, &[&b"XINFO"[..], b"GROUPS", key], false);
    let mut delivered = None;
    if ffi::is_array(reply) {
        for i in 0..ffi::reply_len(reply) {
            let info = ffi::reply_element(reply, i);
            if field(info, b"name") == Some(group) {
                delivered = field(info, b"last-delivered-id").and_then(StreamId::parse);
                break;
            }
        }
    }
    ffi::free_call_reply(reply);
    delivered
}

/// The value of `name` in a RESP2 reply of alternating names and values.
fn field<'a>(reply: *mut ffi::RedisModuleCallReply, name: &[u8]) -> Option<&'a [u8]> {
    if !ffi::is_array(reply) {
        return None;
    }
    let len = ffi::reply_len(reply);
    (0..len / 2)
        .find(|i| ffi::reply_bytes(ffi::reply_element(reply, 2 * i)) == name)
        .map(|i| ffi::reply_bytes(ffi::reply_element(reply, 2 * i + 1)))
}
