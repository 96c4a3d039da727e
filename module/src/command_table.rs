//! Loads Redis' own command table (`COMMAND`) into the core's routing table, so writes are told
//! from reads by the flags Redis itself declares.

use crate::ffi::{self, RedisModuleCallReply, RedisModuleCtx};
use raftis_core::routing::{CommandInfo, CommandTable, KeySpan};

pub fn load(ctx: *mut RedisModuleCtx) -> anyhow::Result<CommandTable> {
    let reply = ffi::call_strs(ctx, &["COMMAND"]);
    if !ffi::is_array(reply) {
        ffi::free_call_reply(reply);
        anyhow::bail!("COMMAND did not return the command table");
    }
    let mut table = CommandTable::default();
    for i in 0..ffi::reply_len(reply) {
        add_entry(&mut table, ffi::reply_element(reply, i), None);
    }
    ffi::free_call_reply(reply);
    anyhow::ensure!(!table.is_empty(), "COMMAND returned no commands");
    Ok(table)
}

/// One `COMMAND` entry: [name, arity, flags, first, last, step, acl, tips, keyspecs, subcommands].
/// Redis flags `movablekeys` every command whose keys its first/last/step cannot describe.
fn add_entry(table: &mut CommandTable, entry: *mut RedisModuleCallReply, parent: Option<&str>) {
    if !ffi::is_array(entry) || ffi::reply_len(entry) < 3 {
        return;
    }
    let name = String::from_utf8_lossy(ffi::reply_bytes(ffi::reply_element(entry, 0))).to_ascii_lowercase();
    let arity = ffi::reply_integer_value(ffi::reply_element(entry, 1));
    let flags = ffi::reply_element(entry, 2);
    let mut info = CommandInfo { arity, ..Default::default() };
    let mut movable_keys = false;
    if ffi::is_array(flags) {
        for j in 0..ffi::reply_len(flags) {
            match ffi::reply_bytes(ffi::reply_element(flags, j)) {
                b"write" => info.write = true,
                b"readonly" => info.readonly = true,
                b"denyoom" => info.denyoom = true,
                b"blocking" => info.blocking = true,
                b"movablekeys" => movable_keys = true,
                _ => {}
            }
        }
    }
    let tips = (ffi::reply_len(entry) > 7).then(|| ffi::reply_element(entry, 7));
    if let Some(tips) = tips.filter(|t| ffi::is_array(*t)) {
        info.nondeterministic =
            (0..ffi::reply_len(tips)).any(|j| ffi::reply_bytes(ffi::reply_element(tips, j)).starts_with(b"nondeterministic_output"));
    }
    if !movable_keys && ffi::reply_len(entry) > 5 {
        let at = |i| ffi::reply_integer_value(ffi::reply_element(entry, i));
        info.keys = Some(KeySpan { first: at(3), last: at(4), step: at(5) });
    }
    let subcommands = (ffi::reply_len(entry) > 9).then(|| ffi::reply_element(entry, 9));
    if let Some(subs) = subcommands.filter(|s| ffi::is_array(*s) && ffi::reply_len(*s) > 0) {
        info.container = true;
        for j in 0..ffi::reply_len(subs) {
            add_entry(table, ffi::reply_element(subs, j), Some(&name));
        }
    }
    // Subcommand entries are already named "container|sub" by Redis.
    let _ = parent;
    table.insert(&name, info);
}
