//! What the keys hold for the clients that wait, looked at after each applied batch: elements
//! for a pop, entries newer than an `XREAD`'s ID, entries a group has not been given. Each key is
//! read once per batch, by the log's clock, and the attempts already in flight are counted in.

use super::Waiter;
use crate::ffi::{self, RedisModuleCtx};
use crate::stream_probe::{self, Newest};
use raftis_core::blocking::Waits;
use raftis_core::stream_read::{has_entries_after, StreamId};
use rustc_hash::{FxHashMap, FxHashSet};

/// What a waiting `XREADGROUP` can get now.
pub(super) enum GroupNews {
    Nothing,
    /// An entry its group has not been given: an attempt.
    Entries,
    /// Its stream or its group is gone: Redis' error.
    Gone(&'static str),
}

/// What [`super::after_apply`] finds in the keys, each looked at once per batch, by the log's
/// clock as an attempt will see it: a key the node's clock has passed but the log has not is still
/// there (and the attempt expires it first, on every node).
pub(super) struct Look {
    ctx: *mut RedisModuleCtx,
    /// Elements left in each list or sorted set once the attempts already in flight have taken
    /// theirs (0: missing, or another type).
    left: FxHashMap<(u32, Vec<u8>), usize>,
    /// The newest entry of each stream.
    newest: FxHashMap<(u32, Vec<u8>), Newest>,
    /// The last entry given to each group of a stream (None: no such group).
    delivered: FxHashMap<(u32, Vec<u8>, Vec<u8>), Option<StreamId>>,
    /// Groups of a stream with an attempt in flight: their other consumers wait for its outcome.
    pub(super) busy: FxHashSet<(u32, Vec<u8>, Vec<u8>)>,
}

impl Look {
    pub(super) fn new(ctx: *mut RedisModuleCtx) -> Look {
        Look { ctx, left: FxHashMap::default(), newest: FxHashMap::default(), delivered: FxHashMap::default(), busy: FxHashSet::default() }
    }

    /// How many elements `key` holds for a pop that waits for `waits`.
    pub(super) fn elements(&mut self, db: u32, key: &[u8], waits: Waits) -> usize {
        let ctx = self.ctx;
        *self.left.entry((db, key.to_vec())).or_insert_with(|| elements(ctx, db, key, waits))
    }

    /// One element of `key` is spoken for.
    pub(super) fn take(&mut self, db: u32, key: &[u8]) {
        if let Some(left) = self.left.get_mut(&(db, key.to_vec())) {
            *left = left.saturating_sub(1);
        }
    }

    fn newest(&mut self, db: u32, key: &[u8]) -> Newest {
        let ctx = self.ctx;
        *self.newest.entry((db, key.to_vec())).or_insert_with(|| {
            if !ffi::select_db(ctx, db) {
                return Newest::NoStream;
            }
            crate::expiry::suspended(|| stream_probe::newest_entry(ctx, key))
        })
    }

    /// An `XREAD` can read something: a stream it reads has an entry after its ID.
    pub(super) fn stream_has_news(&mut self, waiter: &Waiter) -> bool {
        let keys = waiter.keys.iter().zip(&waiter.after);
        keys.into_iter().any(|(key, after)| has_entries_after(self.newest(waiter.db, key).entry(), *after))
    }

    /// What an `XREADGROUP` can get: an attempt once a stream it reads has an entry newer than the
    /// last one its group was given, unless another attempt for the group is in flight.
    pub(super) fn group_news(&mut self, waiter: &Waiter) -> GroupNews {
        let Some(group) = &waiter.group else { return GroupNews::Nothing };
        if waiter.keys.iter().any(|key| self.busy.contains(&(waiter.db, key.clone(), group.clone()))) {
            return GroupNews::Nothing;
        }
        for key in &waiter.keys {
            let newest = match self.newest(waiter.db, key) {
                // Redis answers its waiting consumers as soon as the stream is deleted.
                Newest::NoStream => return GroupNews::Gone("UNBLOCKED the stream key no longer exists"),
                newest => newest.entry(),
            };
            let ctx = self.ctx;
            let delivered = *self.delivered.entry((waiter.db, key.clone(), group.clone())).or_insert_with(|| {
                let look = || stream_probe::last_delivered(ctx, key, group);
                crate::expiry::suspended(|| ffi::select_db(ctx, waiter.db).then(look).flatten())
            });
            match (newest, delivered) {
                (_, None) => return GroupNews::Gone("NOGROUP the consumer group this client was blocked on no longer exists"),
                (Some(newest), Some(delivered)) if newest > delivered => return GroupNews::Entries,
                _ => {}
            }
        }
        GroupNews::Nothing
    }
}

/// The (database, stream, group) of each key an `XREADGROUP` reads.
pub(super) fn group_keys(waiter: &Waiter) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
    let Some(group) = &waiter.group else { return Vec::new() };
    waiter.keys.iter().map(|key| (waiter.db, key.clone(), group.clone())).collect()
}

/// How many elements `key` holds for a pop that waits for `waits` (0: missing, or another type).
fn elements(ctx: *mut RedisModuleCtx, db: u32, key: &[u8], waits: Waits) -> usize {
    if !ffi::select_db(ctx, db) {
        return 0;
    }
    let (kind, len) = crate::expiry::suspended(|| ffi::key_type_and_length(ctx, key));
    let wanted = match waits {
        Waits::List => redis_module::raw::REDISMODULE_KEYTYPE_LIST,
        Waits::SortedSet => redis_module::raw::REDISMODULE_KEYTYPE_ZSET,
        Waits::Stream(_) | Waits::Group(_) => return 0,
    };
    if kind as isize == wanted {
        len
    } else {
        0
    }
}
