//! The journal's records and the sealed form of an entry (encoded once, with its checksum),
//! which the checkpoint then puts into LMDB as it is.

use super::*;

/// A journal record: the entries appended (each in its stored form) and the hard state if it
/// had to be stored, `[count u32]([len u32][sealed entry])*[has_hs u8]([term][vote][commit] u64)`;
/// returned with each entry's sealed form as a slice of it.
pub(super) fn encode_record(entries: &[Entry], hs: Option<&HardState>) -> (Sealed, Vec<Sealed>) {
    let mut out = Vec::with_capacity(32 + entries.iter().map(|e| 8 + e.encoded_len()).sum::<usize>());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut spans = Vec::with_capacity(entries.len());
    for entry in entries {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        seal_into(entry, &mut out);
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        spans.push(len_at + 4..out.len());
    }
    match hs {
        Some(hs) => {
            out.push(1);
            for v in [hs.term, hs.vote, hs.commit] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        None => out.push(0),
    }
    let record = Sealed::from(out);
    let sealed = spans.into_iter().map(|span| record.slice(span)).collect();
    (record, sealed)
}

pub(super) fn decode_record(record: &Sealed) -> Result<(Vec<TailEntry>, Option<HardState>)> {
    let mut data: &[u8] = record;
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if data.len() < n {
            return Err(StorageError::Corrupt("a journal record is truncated".into()));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let count = u32_at(take(&mut data, 4)?) as usize;
    let mut entries = Vec::with_capacity(count.min(data.len() / 8));
    for _ in 0..count {
        let len = u32_at(take(&mut data, 4)?) as usize;
        let sealed = record.slice_ref(take(&mut data, len)?);
        let entry = Entry::decode(unseal(0, &sealed)?)?;
        entries.push(TailEntry { entry, sealed });
    }
    let hs = match take(&mut data, 1)?[0] {
        0 => None,
        _ => Some(HardState { term: u64_at(take(&mut data, 8)?), vote: u64_at(take(&mut data, 8)?), commit: u64_at(take(&mut data, 8)?) }),
    };
    Ok((entries, hs))
}

/// Appends an entry's stored form to `out`: its prost encoding followed by a CRC32 of it (LMDB
/// keeps no checksums of its own, and a flipped bit could still decode as a valid entry).
fn seal_into(entry: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    // Only fails for lack of space, and a Vec grows as needed.
    let _ = entry.encode(out);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

pub(super) fn unseal(index: u64, stored: &[u8]) -> Result<&[u8]> {
    let Some(split) = stored.len().checked_sub(4) else {
        return Err(StorageError::Corrupt(format!("entry {index} is truncated")));
    };
    let (body, crc) = stored.split_at(split);
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(StorageError::Corrupt(format!("entry {index} fails its checksum")));
    }
    Ok(body)
}
