//! What the module reads of a client's command before Redis does: the rewrites that make a write
//! deterministic, the shape of blocking commands, stream reads, SORT's patterns and SPOP, and
//! the module's own settings (load arguments and `RAFT.CONFIG SET`). Any argument vector must
//! leave these without a panic and with positions inside the command; pinning a write twice
//! (the follower proxy's leader pins again, with its own clock) must change nothing more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftis::blocking::{parse_timeout, BlockingCommand, Unit};
use raftis::determinism::{pin, Args};
use raftis::set_pop;
use raftis::settings::{parse_size, Settings};
use raftis::sort_patterns;
use raftis::stream_read::{StreamId, StreamRead};
use std::borrow::Cow;

fuzz_target!(|data: &[u8]| {
    // The first byte separates the arguments of the rest; the second picks the clock.
    let Some((&separator, rest)) = data.split_first() else { return };
    let Some((&clock, rest)) = rest.split_first() else { return };
    let argv: Vec<&[u8]> = rest.split(|b| *b == separator).collect();

    pinning(&argv, clock);
    blocking(&argv);
    let read = StreamRead::parse(&argv);
    let keys = read.keys(argv.len());
    assert!(keys.end <= argv.len() && keys.start <= keys.end, "{keys:?} of {} arguments", argv.len());
    for id in &argv {
        if let Some(parsed) = StreamId::parse(id) {
            assert_eq!(StreamId::parse(parsed.to_string().as_bytes()), Some(parsed));
        }
    }
    for pattern in sort_patterns::lookups(&argv) {
        for element in &argv {
            let _ = sort_patterns::key_for(pattern, element);
        }
    }
    let (client, candidates) = set_pop::split_hint(&argv);
    assert!(client.len() + candidates.len() <= argv.len());
    let _ = set_pop::requested(client);
    settings(&argv);
});

fn pinning(argv: &[&[u8]], clock: u8) {
    let now_ms = 1_700_000_000_000 + i64::from(clock) * 1_000;
    let mut once: Args = argv.iter().map(|a| Cow::Borrowed(*a)).collect();
    pin(&mut once, now_ms);
    let mut twice = once.clone();
    pin(&mut twice, now_ms + 86_400_000);
    assert_eq!(once, twice, "pinned again with a later clock");
}

fn blocking(argv: &[&[u8]]) {
    let Some(command) = BlockingCommand::of(argv) else { return };
    assert!(command.timeout < argv.len());
    assert!(command.keys.iter().all(|k| *k < argv.len() && *k > 0));
    let _ = parse_timeout(argv[command.timeout], command.unit);
    let _ = parse_timeout(argv[command.timeout], Unit::Seconds);
    let _ = parse_timeout(argv[command.timeout], Unit::Milliseconds);
    // Every subset of the keys, by their order: an attempt on the keys that hold something.
    let owned: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
    for mask in 0u32..(1 << command.keys.len().min(4)) {
        let ready: Vec<usize> = command.keys.iter().enumerate().filter(|(i, _)| *i < 32 && mask & (1 << i) != 0).map(|(_, k)| *k).collect();
        let narrowed = command.narrowed_to(&owned, &ready);
        assert!(narrowed.len() <= owned.len());
    }
}

fn settings(argv: &[&[u8]]) {
    let Ok(words) = argv.iter().map(|a| std::str::from_utf8(a)).collect::<Result<Vec<&str>, _>>() else { return };
    let _ = Settings::parse(&words);
    for word in &words {
        let _ = parse_size(word);
    }
    if let Ok(mut s) = Settings::parse(&["dir=/nonexistent"]) {
        for pair in words.chunks(2) {
            if let [key, value] = pair {
                let _ = s.set(key, value);
            }
        }
    }
}
