//! Replies built as values, written to the client in one place, so command handlers are plain
//! functions returning `Result<Reply, String>` (the error text is the `-ERR ...` line).

use crate::ffi::{self, RedisModuleCtx};

pub enum Reply {
    Simple(String),
    Bulk(Vec<u8>),
    /// Text for people (INFO and the like): a verbatim string in RESP3, as Redis' own replies
    /// of that kind, and a bulk string in RESP2.
    Verbatim(Vec<u8>),
    Integer(i64),
    Array(Vec<Reply>),
    /// A map in RESP3; its keys and values in turn, as an array, in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// The client was blocked; its reply comes later.
    Blocked,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    pub fn bulk(s: impl Into<String>) -> Reply {
        Reply::Bulk(s.into().into_bytes())
    }

    pub fn send(&self, ctx: *mut RedisModuleCtx) {
        match self {
            Reply::Simple(s) => {
                ffi::reply_simple(ctx, s);
            }
            Reply::Bulk(b) => {
                ffi::reply_bulk(ctx, b);
            }
            Reply::Verbatim(text) => {
                ffi::reply_verbatim(ctx, text);
            }
            Reply::Integer(i) => {
                ffi::reply_integer(ctx, *i);
            }
            Reply::Array(items) => {
                ffi::reply_array(ctx, items.len());
                for item in items {
                    item.send(ctx);
                }
            }
            Reply::Map(pairs) => {
                ffi::reply_map(ctx, pairs.len());
                for (key, value) in pairs {
                    key.send(ctx);
                    value.send(ctx);
                }
            }
            Reply::Blocked => {}
        }
    }
}
