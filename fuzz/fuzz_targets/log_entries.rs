//! Log entries, as a node reads them back from its log or from a leader's append: decoding must
//! never panic (nor allocate by a count it was not given the bytes for), and an entry that
//! decodes must encode back to the bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftis::command_entry::{encode_command, encode_transaction, Entry, EntryView};

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = Entry::decode(data) else { return };
    let again = match &entry.view {
        EntryView::Command(c) => encode_command(entry.at, c.db, &c.argv),
        EntryView::Transaction(commands) => {
            let commands: Vec<(u32, Vec<&[u8]>)> = commands.iter().map(|c| (c.db, c.argv.clone())).collect();
            encode_transaction(entry.at, &commands)
        }
    };
    // Bytes after the entry are not read: what was read is a prefix.
    assert!(data.starts_with(&again), "re-encoded entry differs from the bytes it was decoded from");
    assert_eq!(Entry::decode(&again), Ok(entry));
});
