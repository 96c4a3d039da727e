//! The payload of a replicated write: the database it runs in and its arguments, exactly as the
//! leader will have every node execute them; or a transaction (MULTI/EXEC), several such commands
//! that every node runs back to back. Layout (all integers big-endian):
//! - a command: `kind u8 = 1 | body`
//! - a transaction: `kind u8 = 2 | count u32 | body * count`
//! - either, at a time: `kind u8 = 3 | at i64 | command or transaction`
//!
//! where `body` is `db u32 | argc u32 | (len u32 | bytes) * argc`.
//!
//! The leader proposes every entry at a time (its clock when it proposed it): every node applies
//! the entry as of that moment, so keys expire by the log's clock rather than each node's (see the
//! module's `expiry`). Entries without one come from logs written before entries carried it.

const KIND_COMMAND: u8 = 1;
const KIND_TRANSACTION: u8 = 2;
const KIND_AT: u8 = 3;

/// The moment an entry happens, for every node that applies it: the proposing leader's clock, in
/// milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryTime(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandEntry {
    pub db: u32,
    pub argv: Vec<Vec<u8>>,
}

/// A decoded entry that borrows its arguments from the log entry: applying one needs no copy.
#[derive(Debug, PartialEq, Eq)]
pub struct CommandView<'a> {
    pub db: u32,
    pub argv: Vec<&'a [u8]>,
}

/// A decoded log entry and the time it happens at, if it carries one.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub at: Option<EntryTime>,
    pub view: EntryView<'a>,
}

/// What a log entry runs.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryView<'a> {
    Command(CommandView<'a>),
    /// Commands to run one after the other with nothing in between.
    Transaction(Vec<CommandView<'a>>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("log entry is truncated")]
    Truncated,
    #[error("log entry has unknown kind {0}")]
    UnknownKind(u8),
    #[error("log entry has no command")]
    Empty,
    #[error("log entry carries two times")]
    TwoTimes,
}

impl CommandEntry {
    pub fn encode(&self) -> Vec<u8> {
        encode_command(None, self.db, &self.argv)
    }
}

/// The log entry for a command in database `db`, from arguments of any form (borrowed from a
/// client's command, or rewritten): the one copy a proposal needs.
pub fn encode_command<A: AsRef<[u8]>>(at: Option<EntryTime>, db: u32, argv: &[A]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + body_size(argv));
    encode_time(&mut out, at);
    out.push(KIND_COMMAND);
    encode_body(&mut out, db, argv);
    out
}

/// The log entry for a transaction: each command with its database, in the order they run.
pub fn encode_transaction<A: AsRef<[u8]>>(at: Option<EntryTime>, commands: &[(u32, Vec<A>)]) -> Vec<u8> {
    let size = 14 + commands.iter().map(|(_, argv)| body_size(argv)).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    encode_time(&mut out, at);
    out.push(KIND_TRANSACTION);
    out.extend_from_slice(&(commands.len() as u32).to_be_bytes());
    for (db, argv) in commands {
        encode_body(&mut out, *db, argv);
    }
    out
}

/// An entry that only carries a time: an empty transaction, which runs nothing. An idle leader
/// proposes one now and then so that its followers keep applying recent entries (the module's
/// `expiry` lets a follower's Redis expire keys only then).
pub fn encode_clock(at: EntryTime) -> Vec<u8> {
    encode_transaction::<&[u8]>(Some(at), &[])
}

/// The time `data` (an encoded entry) happens at, if it carries one.
pub fn time_of(data: &[u8]) -> Option<EntryTime> {
    match data {
        [KIND_AT, rest @ ..] if rest.len() >= 8 => Some(EntryTime(i64::from_be_bytes(rest[..8].try_into().expect("8 bytes")))),
        _ => None,
    }
}

/// Moves the time of `data` (an encoded entry) up to `floor` if it is earlier, and returns the
/// time it then carries (None: it carries none). The leader does this to every entry it
/// appends, so that times never go back along the log, however its proposals raced each other
/// between stamping and appending: a node that expires keys by the newest time it applied must
/// never apply an earlier one afterwards (see the module's `expiry`).
pub fn raise_time(data: &mut [u8], floor: EntryTime) -> Option<EntryTime> {
    let at = time_of(data)?;
    if at < floor {
        data[1..9].copy_from_slice(&floor.0.to_be_bytes());
        return Some(floor);
    }
    Some(at)
}

fn encode_time(out: &mut Vec<u8>, at: Option<EntryTime>) {
    if let Some(EntryTime(ms)) = at {
        out.push(KIND_AT);
        out.extend_from_slice(&ms.to_be_bytes());
    }
}

fn body_size<A: AsRef<[u8]>>(argv: &[A]) -> usize {
    8 + argv.iter().map(|a| 4 + a.as_ref().len()).sum::<usize>()
}

fn encode_body<A: AsRef<[u8]>>(out: &mut Vec<u8>, db: u32, argv: &[A]) {
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(&(argv.len() as u32).to_be_bytes());
    for arg in argv {
        let arg = arg.as_ref();
        out.extend_from_slice(&(arg.len() as u32).to_be_bytes());
        out.extend_from_slice(arg);
    }
}

impl<'a> Entry<'a> {
    pub fn decode(mut data: &'a [u8]) -> Result<Entry<'a>, EntryError> {
        let mut at = None;
        if data.first() == Some(&KIND_AT) {
            let bytes = take(&mut data, 9)?;
            at = Some(EntryTime(i64::from_be_bytes(bytes[1..].try_into().expect("8 bytes"))));
            if data.first() == Some(&KIND_AT) {
                return Err(EntryError::TwoTimes);
            }
        }
        Ok(Entry { at, view: EntryView::decode(data)? })
    }
}

impl<'a> EntryView<'a> {
    /// A command or transaction without a time (the time, if any, is [`Entry`]'s to read).
    pub fn decode(mut data: &'a [u8]) -> Result<EntryView<'a>, EntryError> {
        match take(&mut data, 1)?[0] {
            KIND_COMMAND => CommandView::decode_body(&mut data).map(EntryView::Command),
            KIND_TRANSACTION => {
                let count = read_u32(&mut data)? as usize;
                // Never trust a count to size an allocation: each command needs at least 8 bytes.
                let mut commands = Vec::with_capacity(count.min(data.len() / 8));
                for _ in 0..count {
                    commands.push(CommandView::decode_body(&mut data)?);
                }
                Ok(EntryView::Transaction(commands))
            }
            kind => Err(EntryError::UnknownKind(kind)),
        }
    }
}

impl<'a> CommandView<'a> {
    fn decode_body(data: &mut &'a [u8]) -> Result<CommandView<'a>, EntryError> {
        let db = read_u32(data)?;
        let argc = read_u32(data)? as usize;
        // Each argument needs at least 4 bytes.
        let mut argv = Vec::with_capacity(argc.min(data.len() / 4));
        for _ in 0..argc {
            let len = read_u32(data)? as usize;
            argv.push(take(data, len)?);
        }
        if argv.is_empty() {
            return Err(EntryError::Empty);
        }
        Ok(CommandView { db, argv })
    }
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], EntryError> {
    if data.len() < n {
        return Err(EntryError::Truncated);
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Ok(head)
}

fn read_u32(data: &mut &[u8]) -> Result<u32, EntryError> {
    let b = take(data, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_a_time_moves_only_an_earlier_one() {
        let mut entry = encode_command(Some(EntryTime(1_000)), 0, &[&b"SET"[..], b"k", b"v"]);
        assert_eq!(raise_time(&mut entry, EntryTime(900)), Some(EntryTime(1_000)));
        assert_eq!(raise_time(&mut entry, EntryTime(1_500)), Some(EntryTime(1_500)));
        let decoded = Entry::decode(&entry).unwrap();
        assert_eq!(decoded.at, Some(EntryTime(1_500)));
        let EntryView::Command(view) = decoded.view else { panic!("not a command") };
        assert_eq!(view.argv, [&b"SET"[..], b"k", b"v"]);
        let mut untimed = encode_command::<&[u8]>(None, 0, &[b"SET", b"k", b"v"]);
        let before = untimed.clone();
        assert_eq!(raise_time(&mut untimed, EntryTime(1_500)), None);
        assert_eq!(untimed, before);
        assert_eq!(time_of(&encode_clock(EntryTime(7))), Some(EntryTime(7)));
        assert_eq!(time_of(&[KIND_AT, 0, 0]), None, "truncated");
    }

    #[test]
    fn round_trips_binary_arguments() {
        let e = CommandEntry { db: 3, argv: vec![b"SET".to_vec(), b"k\r\n\0".to_vec(), Vec::new()] };
        let bytes = e.encode();
        let EntryView::Command(view) = EntryView::decode(&bytes).unwrap() else { panic!("not a command") };
        assert_eq!((view.db, view.argv), (e.db, e.argv.iter().map(|a| a.as_slice()).collect()));
    }

    #[test]
    fn a_transaction_round_trips_its_commands_in_order() {
        let commands = vec![(0, vec![&b"SET"[..], b"a", b"1"]), (5, vec![&b"INCR"[..], b"\r\n"]), (0, vec![&b"GET"[..], b""])];
        let bytes = encode_transaction(None, &commands);
        let EntryView::Transaction(views) = EntryView::decode(&bytes).unwrap() else { panic!("not a transaction") };
        let decoded: Vec<(u32, Vec<&[u8]>)> = views.into_iter().map(|v| (v.db, v.argv)).collect();
        assert_eq!(decoded, commands);
        for n in 0..bytes.len() {
            assert!(EntryView::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        // A huge count with nothing behind it is an error, not a huge allocation.
        assert_eq!(EntryView::decode(&[2, 255, 255, 255, 255]), Err(EntryError::Truncated));
    }

    #[test]
    fn truncated_or_foreign_data_is_an_error_not_a_panic() {
        let bytes = CommandEntry { db: 0, argv: vec![b"INCR".to_vec(), b"x".to_vec()] }.encode();
        for n in 0..bytes.len() {
            assert!(EntryView::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        assert_eq!(EntryView::decode(&[9, 0, 0]), Err(EntryError::UnknownKind(9)));
        assert_eq!(EntryView::decode(&[1, 0, 0, 0, 0, 255, 255, 255, 255]), Err(EntryError::Truncated));
    }

    #[test]
    fn an_entry_carries_its_time_and_older_entries_have_none() {
        let at = Some(EntryTime(1_700_000_000_123));
        let command = encode_command(at, 2, &[b"INCR".as_slice(), b"k"]);
        let decoded = Entry::decode(&command).unwrap();
        assert_eq!(decoded.at, at);
        assert_eq!(decoded.view, EntryView::Command(CommandView { db: 2, argv: vec![b"INCR", b"k"] }));
        let transaction = encode_transaction(at, &[(0, vec![b"GET".as_slice(), b"k"])]);
        assert_eq!(Entry::decode(&transaction).unwrap().at, at);
        // Entries written before entries carried a time still decode, without one.
        let old = CommandEntry { db: 0, argv: vec![b"DEL".to_vec(), b"k".to_vec()] }.encode();
        assert_eq!(Entry::decode(&old).unwrap().at, None);
        for n in 0..command.len() {
            assert!(Entry::decode(&command[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut twice = vec![KIND_AT; 1];
        twice.extend_from_slice(&0i64.to_be_bytes());
        twice.extend_from_slice(&command);
        assert_eq!(Entry::decode(&twice), Err(EntryError::TwoTimes));
    }

    #[test]
    fn a_clock_entry_is_a_time_and_nothing_to_run() {
        let at = EntryTime(1_700_000_000_456);
        let clock = encode_clock(at);
        assert_eq!(Entry::decode(&clock).unwrap(), Entry { at: Some(at), view: EntryView::Transaction(Vec::new()) });
    }
}
