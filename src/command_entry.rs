//! The payload of a replicated write: the database it runs in and its arguments, exactly as the
//! leader will have every node execute them. Layout (all integers big-endian):
//! `kind u8 = 1 | db u32 | argc u32 | (len u32 | bytes) * argc`.

const KIND_COMMAND: u8 = 1;

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("log entry is truncated")]
    Truncated,
    #[error("log entry has unknown kind {0}")]
    UnknownKind(u8),
    #[error("log entry has no command")]
    Empty,
}

impl CommandEntry {
    pub fn encode(&self) -> Vec<u8> {
        encode_command(self.db, &self.argv)
    }
}

/// The log entry for a command in database `db`, from arguments of any form (borrowed from a
/// client's command, or rewritten): the one copy a proposal needs.
pub fn encode_command<A: AsRef<[u8]>>(db: u32, argv: &[A]) -> Vec<u8> {
    let size = 9 + argv.iter().map(|a| 4 + a.as_ref().len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(KIND_COMMAND);
    out.extend_from_slice(&db.to_be_bytes());
    out.extend_from_slice(&(argv.len() as u32).to_be_bytes());
    for arg in argv {
        let arg = arg.as_ref();
        out.extend_from_slice(&(arg.len() as u32).to_be_bytes());
        out.extend_from_slice(arg);
    }
    out
}

impl<'a> CommandView<'a> {
    pub fn decode(mut data: &'a [u8]) -> Result<CommandView<'a>, EntryError> {
        let kind = take(&mut data, 1)?[0];
        if kind != KIND_COMMAND {
            return Err(EntryError::UnknownKind(kind));
        }
        let db = read_u32(&mut data)?;
        let argc = read_u32(&mut data)? as usize;
        // Never trust a count to size an allocation: each argument needs at least 4 bytes.
        let mut argv = Vec::with_capacity(argc.min(data.len() / 4));
        for _ in 0..argc {
            let len = read_u32(&mut data)? as usize;
            argv.push(take(&mut data, len)?);
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
    fn round_trips_binary_arguments() {
        let e = CommandEntry { db: 3, argv: vec![b"SET".to_vec(), b"k\r\n\0".to_vec(), Vec::new()] };
        let bytes = e.encode();
        let view = CommandView::decode(&bytes).unwrap();
        assert_eq!((view.db, view.argv), (e.db, e.argv.iter().map(|a| a.as_slice()).collect()));
    }

    #[test]
    fn truncated_or_foreign_data_is_an_error_not_a_panic() {
        let bytes = CommandEntry { db: 0, argv: vec![b"INCR".to_vec(), b"x".to_vec()] }.encode();
        for n in 0..bytes.len() {
            assert!(CommandView::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        assert_eq!(CommandView::decode(&[9, 0, 0]), Err(EntryError::UnknownKind(9)));
        assert_eq!(CommandView::decode(&[1, 0, 0, 0, 0, 255, 255, 255, 255]), Err(EntryError::Truncated));
    }
}
