use super::files::{parse_name, parse_path, Kind};
use super::*;
use crate::membership::NodeInfo;
use crate::NodeId;
use rand::{Rng, RngCore, SeedableRng};

fn meta(index: u64) -> SnapshotMeta {
    let mut members = Members::new();
    for id in [1u64, 2, 4] {
        members.insert(
            NodeId(id),
            NodeInfo { id: NodeId(id), raft_addr: format!("10.0.0.{id}:17000"), client_addr: format!("10.0.0.{id}:7000") },
        );
    }
    SnapshotMeta {
        index: LogIndex(index),
        term: Term(3),
        conf_state: ConfState { voters: vec![1, 2], learners: vec![4], ..Default::default() },
        members,
    }
}

/// Binary keys and payloads (every byte value, empty ones), every kind of expiry.
fn records(n: usize) -> Vec<Record> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    (0..n)
        .map(|i| {
            let mut key = format!("k\0{i}\u{ff}").into_bytes();
            key.push((i % 256) as u8);
            let mut payload = vec![0u8; rng.gen_range(0..300)];
            rng.fill_bytes(&mut payload);
            Record {
                db: (i % 16) as u32,
                key: if i == 7 { Vec::new() } else { key },
                expire_at_ms: match i % 4 {
                    0 | 1 => -1,
                    2 => 1_700_000_000_000 + i as i64,
                    _ => i64::MAX,
                },
                payload,
            }
        })
        .collect()
}

fn write_at(dir: &Path, index: u64, term: u64, recs: &[Record]) -> SnapshotSummary {
    let path = snapshot_path(dir, LogIndex(index), Term(term));
    let mut w = SnapshotWriter::create(&path, &SnapshotMeta { term: Term(term), ..meta(index) }, b"").unwrap();
    for r in recs {
        w.add(r).unwrap();
    }
    w.finish().unwrap()
}

fn write(dir: &Path, index: u64, recs: &[Record]) -> SnapshotSummary {
    write_at(dir, index, 3, recs)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Neither entry point may accept the file or yield a record from it.
fn assert_refused(path: &Path, what: &str) {
    assert!(verify(path).is_err(), "verify accepted {what}");
    if let Ok((_, reader)) = SnapshotReader::open(path) {
        panic!("open accepted {what} (would yield {} items)", reader.count());
    }
}

#[test]
fn round_trip_of_thousands_of_binary_records() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(3000);
    let s = write(dir.path(), 42, &recs);
    assert_eq!(s.path, snapshot_path(dir.path(), LogIndex(42), Term(3)));
    assert_eq!(s.records, 3000);
    assert_eq!(fs::metadata(&s.path).unwrap().len(), s.size);
    assert_eq!(names(dir.path()), vec!["snapshot-00000000000000000042-3.rsnap"], "no .tmp left behind");

    let (m, reader) = SnapshotReader::open(&s.path).unwrap();
    assert_eq!(m, meta(42));
    let back: Vec<Record> = reader.map(|r| r.unwrap()).collect();
    assert_eq!(back, recs);
    assert_eq!(verify(&s.path).unwrap(), s);
}

#[test]
fn an_empty_snapshot_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 1, &[]);
    assert_eq!(s.records, 0);
    let (m, mut reader) = SnapshotReader::open(&s.path).unwrap();
    assert_eq!(m, meta(1));
    assert!(reader.next().is_none());
    assert!(reader.next().is_none(), "stays finished");
}

#[test]
fn function_libraries_travel_beside_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot_path(dir.path(), LogIndex(9), Term(3));
    let libraries = b"\xf5\xc3@X@\0binary dump payload\xff".to_vec();
    let mut w = SnapshotWriter::create(&path, &meta(9), &libraries).unwrap();
    for r in records(5) {
        w.add(&r).unwrap();
    }
    let s = w.finish().unwrap();
    assert_eq!(s.records, 5, "the libraries are not a key");
    assert_eq!(verify(&path).unwrap(), s);
    assert_eq!(read_meta(&path).unwrap(), meta(9));
    let (m, reader) = SnapshotReader::open(&path).unwrap();
    assert_eq!(m, meta(9));
    assert_eq!(reader.functions(), libraries.as_slice());
    assert_eq!(reader.map(|r| r.unwrap()).collect::<Vec<_>>(), records(5));
}

/// A file written before snapshots carried functions: no functions field, version 1.
#[test]
fn a_version_1_file_is_still_read_and_has_no_functions() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 5, &records(4));
    let v2 = fs::read(&s.path).unwrap();
    // The empty functions field is the 4 zero bytes right after the members field.
    let members_len_at = 8 + 4 + 8 + 8 + 4 + u32::from_be_bytes(v2[28..32].try_into().unwrap()) as usize;
    let functions_at = members_len_at + 4 + u32::from_be_bytes(v2[members_len_at..members_len_at + 4].try_into().unwrap()) as usize;
    assert_eq!(&v2[functions_at..functions_at + 4], &[0, 0, 0, 0]);
    let mut v1 = [&v2[..functions_at], &v2[functions_at + 4..v2.len() - 4]].concat();
    v1[8..12].copy_from_slice(&1u32.to_be_bytes());
    let crc = crc32fast::hash(&v1);
    v1.extend_from_slice(&crc.to_be_bytes());
    let old = dir.path().join("old");
    fs::write(&old, &v1).unwrap();

    assert_eq!(verify(&old).unwrap().records, 4);
    let (m, reader) = SnapshotReader::open(&old).unwrap();
    assert_eq!(m, meta(5));
    assert!(reader.functions().is_empty());
    assert_eq!(reader.map(|r| r.unwrap()).collect::<Vec<_>>(), records(4));
}

#[test]
fn read_meta_reads_the_header_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 77, &records(100));
    assert_eq!(read_meta(&s.path).unwrap(), meta(77));
    // Damage far past the header: read_meta does not look there, verify does.
    let mut bytes = fs::read(&s.path).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x10;
    fs::write(&s.path, &bytes).unwrap();
    assert_eq!(read_meta(&s.path).unwrap(), meta(77));
    assert!(matches!(verify(&s.path), Err(SnapshotError::Corrupt(_))));
}

#[test]
fn magic_and_version_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 5, &records(3));
    let good = fs::read(&s.path).unwrap();
    let bad = dir.path().join("x");

    fs::write(&bad, b"REDIS0011 and more bytes than the magic").unwrap();
    assert!(matches!(read_meta(&bad), Err(SnapshotError::BadMagic)));
    assert!(matches!(verify(&bad), Err(SnapshotError::BadMagic)));
    fs::write(&bad, b"").unwrap();
    assert!(matches!(verify(&bad), Err(SnapshotError::Truncated)));
    fs::write(&bad, b"RAFT").unwrap();
    assert!(matches!(verify(&bad), Err(SnapshotError::Truncated)));

    let mut b = good.clone();
    b[8..12].copy_from_slice(&3u32.to_be_bytes());
    fs::write(&bad, &b).unwrap();
    assert!(matches!(read_meta(&bad), Err(SnapshotError::UnsupportedVersion(3))));
    assert!(matches!(SnapshotReader::open(&bad), Err(SnapshotError::UnsupportedVersion(3))));
    b[8..12].copy_from_slice(&0u32.to_be_bytes());
    fs::write(&bad, &b).unwrap();
    assert!(matches!(verify(&bad), Err(SnapshotError::UnsupportedVersion(0))));
}

#[test]
fn a_huge_length_is_refused_without_allocating_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 5, &records(3));
    let mut b = fs::read(&s.path).unwrap();
    // The conf_state length sits right after magic, version, index and term.
    b[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
    fs::write(&s.path, &b).unwrap();
    let e = read_meta(&s.path).unwrap_err();
    assert!(matches!(&e, SnapshotError::Corrupt(m) if m.contains("conf_state length")), "{e}");
    // Within the bound but far beyond the file: reads what is there, then says truncated.
    b[28..32].copy_from_slice(&(MAX_FIELD as u32).to_be_bytes());
    fs::write(&s.path, &b).unwrap();
    assert!(matches!(read_meta(&s.path), Err(SnapshotError::Truncated)));
    assert!(matches!(verify(&s.path), Err(SnapshotError::Truncated)));
}

#[test]
fn every_flipped_byte_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.rsnap");
    // A small file at every offset (header, tags, lengths, trailer, CRC), a bigger one sampled.
    for (count, step) in [(6usize, 1usize), (400, 331)] {
        let s = write(dir.path(), 7, &records(count));
        let good = fs::read(&s.path).unwrap();
        let mut offsets: Vec<usize> = (0..good.len()).step_by(step).collect();
        offsets.extend(good.len().saturating_sub(16)..good.len());
        for offset in offsets {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut b = good.clone();
                b[offset] ^= mask;
                fs::write(&bad, &b).unwrap();
                assert_refused(&bad, &format!("a flip of {mask:#04x} at {offset} of {}", good.len()));
                let _ = read_meta(&bad); // may or may not notice, must not panic
            }
        }
    }
}

#[test]
fn every_truncation_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 7, &records(60));
    let good = fs::read(&s.path).unwrap();
    let bad = dir.path().join("short.rsnap");
    let mut lengths: Vec<usize> = (0..good.len()).step_by(11).collect();
    lengths.extend(0..64);
    lengths.extend(good.len() - 32..good.len());
    for len in lengths {
        fs::write(&bad, &good[..len]).unwrap();
        assert_refused(&bad, &format!("a truncation to {len} of {}", good.len()));
        let _ = read_meta(&bad);
    }
    // And bytes appended after a valid trailer.
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&bad, &longer).unwrap();
    assert_refused(&bad, "a trailing byte");
}

#[test]
fn random_garbage_and_random_damage_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = write(dir.path(), 9, &records(40));
    let good = fs::read(&s.path).unwrap();
    let bad = dir.path().join("fuzz.rsnap");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..300 {
        let b = if round % 3 == 0 {
            let mut g = vec![0u8; rng.gen_range(0..2000)];
            rng.fill_bytes(&mut g);
            if round % 2 == 0 && g.len() >= 12 {
                g[..8].copy_from_slice(MAGIC);
                g[8..12].copy_from_slice(&VERSION.to_be_bytes());
            }
            g
        } else {
            let mut g = good.clone();
            for _ in 0..rng.gen_range(1..5) {
                let i = rng.gen_range(0..g.len());
                g[i] = rng.gen();
            }
            if g == good {
                continue;
            }
            g
        };
        fs::write(&bad, &b).unwrap();
        assert_refused(&bad, &format!("fuzz round {round}"));
        let _ = read_meta(&bad);
    }
}

#[test]
fn a_writer_dropped_unfinished_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = snapshot_path(dir.path(), LogIndex(3), Term(1));
    let mut w = SnapshotWriter::create(&path, &meta(3), b"").unwrap();
    w.add(&records(1)[0]).unwrap();
    assert_eq!(names(dir.path()), vec!["snapshot-00000000000000000003-1.rsnap.tmp"]);
    drop(w);
    assert!(names(dir.path()).is_empty());
}

#[test]
fn latest_picks_the_highest_complete_index() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(latest(dir.path()).unwrap(), None);
    assert_eq!(latest(&dir.path().join("missing")).unwrap(), None);
    write(dir.path(), 5, &records(3));
    write(dir.path(), 100, &records(3));
    write_at(dir.path(), 12, 9, &records(3));
    let best = write_at(dir.path(), 100, 4, &records(3));
    // Higher indexes, but not complete; and things that are not ours at all.
    for name in [
        "snapshot-00000000000000000999-4.rsnap.tmp",
        "snapshot-00000000000000000998-4.rsnap.part",
        "snapshot-00000000000000000998-4.rsnap.part.info",
        "snapshot-x-4.rsnap",
        "snapshot-00000000000000000997.rsnap",
        "dump.rdb",
    ] {
        fs::write(dir.path().join(name), b"x").unwrap();
    }
    assert_eq!(latest(dir.path()).unwrap(), Some(best.path));
}

#[test]
fn remove_older_than_keeps_the_kept_and_anything_newer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, 5, &records(3));
    write_at(d, 12, 2, &records(3));
    let keep = write(d, 12, &records(3));
    let newer = write(d, 20, &records(3));
    for name in [
        "snapshot-00000000000000000010-3.rsnap.tmp",
        "snapshot-00000000000000000012-3.rsnap.tmp",
        "snapshot-00000000000000000011-3.rsnap.part",
        "snapshot-00000000000000000011-3.rsnap.part.info",
        "snapshot-00000000000000000030-3.rsnap.tmp",
        "snapshot-00000000000000000031-3.rsnap.part",
        "snapshot-00000000000000000031-3.rsnap.part.info",
        "dump.rdb",
    ] {
        fs::write(d.join(name), b"x").unwrap();
    }
    assert_eq!(remove_older_than(d, &keep.path).unwrap(), 6);
    assert_eq!(
        names(d),
        vec![
            "dump.rdb",
            "snapshot-00000000000000000012-3.rsnap",
            "snapshot-00000000000000000020-3.rsnap",
            "snapshot-00000000000000000030-3.rsnap.tmp",
            "snapshot-00000000000000000031-3.rsnap.part",
            "snapshot-00000000000000000031-3.rsnap.part.info",
        ]
    );
    assert_eq!(remove_older_than(d, &keep.path).unwrap(), 0, "idempotent");
    assert_eq!(remove_older_than(d, &newer.path).unwrap(), 1);
    assert!(remove_older_than(d, &d.join("dump.rdb")).is_err(), "refuses a keep it cannot place");
    // At start-up every .tmp is a crashed writer's; downloads stay to resume.
    assert_eq!(remove_leftovers(d).unwrap(), 1);
    assert_eq!(
        names(d),
        vec![
            "dump.rdb",
            "snapshot-00000000000000000020-3.rsnap",
            "snapshot-00000000000000000031-3.rsnap.part",
            "snapshot-00000000000000000031-3.rsnap.part.info",
        ]
    );
}

fn send(src: &Path, inc: &mut IncomingSnapshot, until: u64) {
    while inc.offset() < until {
        let chunk = read_chunk(&File::open(src).unwrap(), inc.offset(), 7).unwrap();
        assert!(!chunk.is_empty() && chunk.len() <= 7);
        inc.write_chunk(inc.offset(), &chunk).unwrap();
    }
}

#[test]
fn chunked_transfer_resumes_and_verifies() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let s = write(src.path(), 9, &records(200));
    let file = File::open(&s.path).unwrap();
    assert!(read_chunk(&file, s.size, 7).unwrap().is_empty());
    assert!(read_chunk(&file, s.size + 100, usize::MAX).unwrap().is_empty());
    assert_eq!(read_chunk(&file, s.size - 3, usize::MAX).unwrap().len(), 3);

    let target = dst.path().join(s.path.file_name().unwrap());
    let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
    assert_eq!(inc.offset(), 0);
    send(&s.path, &mut inc, s.size / 2);
    let halfway = inc.offset();
    drop(inc); // interrupted

    let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
    assert_eq!(inc.offset(), halfway, "resumes where it stopped");
    assert!(matches!(inc.write_chunk(0, b"x"), Err(SnapshotError::UnexpectedOffset { expected, got: 0 }) if expected == halfway));
    assert!(matches!(inc.write_chunk(halfway + 7, b"x"), Err(SnapshotError::UnexpectedOffset { .. })));
    send(&s.path, &mut inc, s.size);
    assert!(matches!(inc.write_chunk(s.size, b"x"), Err(SnapshotError::SizeMismatch { .. })), "nothing past the end");
    let got = inc.finish().unwrap();
    assert_eq!(got.checksum, s.checksum);
    assert_eq!(got.path, target);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&s.path).unwrap());
    assert_eq!(names(dst.path()), vec![s.path.file_name().unwrap().to_string_lossy().into_owned()], "no .part left");
    assert_eq!(SnapshotReader::open(&target).unwrap().1.count(), 200);
}

#[test]
fn a_different_transfer_starts_over_and_a_short_one_stays_resumable() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let a = write(src.path(), 9, &records(50));
    let target = dst.path().join("snapshot-00000000000000000009-3.rsnap");
    let mut inc = IncomingSnapshot::begin(&target, a.size, a.checksum).unwrap();
    send(&a.path, &mut inc, 98);
    // Finishing early: refused, but the bytes stay for a resume.
    assert!(matches!(inc.finish(), Err(SnapshotError::SizeMismatch { actual: 98, .. })));
    let inc = IncomingSnapshot::begin(&target, a.size, a.checksum).unwrap();
    assert_eq!(inc.offset(), 98);
    drop(inc);
    // Another file under the same name (a new leader's): the old bytes are discarded.
    let inc = IncomingSnapshot::begin(&target, a.size + 1, a.checksum).unwrap();
    assert_eq!(inc.offset(), 0);
    drop(inc);
    let inc = IncomingSnapshot::begin(&target, a.size, a.checksum ^ 1).unwrap();
    assert_eq!(inc.offset(), 0);
}

#[test]
fn a_mismatched_checksum_or_damaged_transfer_leaves_no_final_file() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let s = write(src.path(), 9, &records(50));
    let bytes = fs::read(&s.path).unwrap();

    // A sound file, but not the one announced.
    let target = dst.path().join("snapshot-00000000000000000010-3.rsnap");
    let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum ^ 1).unwrap();
    inc.write_chunk(0, &bytes).unwrap();
    let e = inc.finish().unwrap_err();
    assert!(matches!(&e, SnapshotError::Corrupt(m) if m.contains("announced")), "{e}");
    assert!(!target.exists());
    assert!(names(dst.path()).is_empty(), "the bad .part is gone: {:?}", names(dst.path()));

    // Bytes damaged in transit.
    let mut damaged = bytes.clone();
    damaged[bytes.len() / 2] ^= 0x20;
    let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
    inc.write_chunk(0, &damaged).unwrap();
    assert!(matches!(inc.finish(), Err(SnapshotError::Corrupt(_))));
    assert!(!target.exists());
    // The next attempt starts from scratch and succeeds.
    let mut inc = IncomingSnapshot::begin(&target, s.size, s.checksum).unwrap();
    assert_eq!(inc.offset(), 0);
    inc.write_chunk(0, &bytes).unwrap();
    inc.finish().unwrap();
    assert!(target.exists());
}

#[test]
fn names_parse_strictly() {
    let p = snapshot_path(Path::new("/d"), LogIndex(42), Term(7));
    assert_eq!(p, Path::new("/d/snapshot-00000000000000000042-7.rsnap"));
    assert_eq!(parse_path(&p), Some((Kind::Complete, 42, 7)));
    assert_eq!(parse_name("snapshot-00000000000000000042-7.rsnap.tmp"), Some((Kind::Tmp, 42, 7)));
    for bad in ["snapshot--7.rsnap", "snapshot-1-.rsnap", "snapshot-+1-2.rsnap", "snapshot-1-2.rsnapx", "other-1-2.rsnap"] {
        assert_eq!(parse_name(bad), None, "{bad}");
    }
}
