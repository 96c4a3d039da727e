use super::*;
use raft::util::limit_size;

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("payload {index}").into_bytes(), ..Default::default() }
}

fn entries_with_terms(first: u64, terms: &[u64]) -> Vec<Entry> {
    terms.iter().enumerate().map(|(i, &term)| entry(first + i as u64, term)).collect()
}

fn snapshot(index: u64, term: u64, voters: Vec<u64>, data: &[u8]) -> Snapshot {
    Snapshot {
        data: data.to_vec(),
        metadata: Some(SnapshotMetadata { index, term, conf_state: Some(ConfState { voters, ..Default::default() }) }),
    }
}

fn get(store: &LogStore, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
    Storage::entries(store, low, high, None, GetEntriesContext::empty(false))
}

fn store_err(e: RaftStorageError) -> raft::Error {
    raft::Error::Store(e)
}

#[test]
fn store_is_clone_send_sync() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<LogStore>();
}

#[test]
fn fresh_store_is_empty_and_uninitialized() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert!(!store.is_initialized());
    assert_eq!((store.first_index(), store.last_index()), (1, 0));
    assert_eq!(store.term(0), Ok(0));
    assert_eq!(store.term(1), Err(store_err(RaftStorageError::Unavailable)));
    assert_eq!(get(&store, 1, 1), Ok(vec![]));
    assert_eq!(store.snapshot(0, 2), Err(store_err(RaftStorageError::SnapshotTemporarilyUnavailable)));
    let initial = store.initial_state().unwrap();
    assert_eq!(initial.hard_state, HardState::default());
    assert_eq!(initial.conf_state, ConfState::default());
    assert!(dir.path().join("raft-log").is_dir());
}

#[test]
fn append_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let ents = entries_with_terms(1, &[1, 1, 2, 2, 3]);
    let hs = HardState { term: 3, vote: 2, commit: 4 };
    store.append(&ents, Some(&hs), true).unwrap();

    assert!(store.is_initialized());
    assert_eq!((store.first_index(), store.last_index()), (1, 5));
    assert_eq!(get(&store, 1, 6).unwrap(), ents);
    assert_eq!(get(&store, 2, 4).unwrap(), ents[1..3].to_vec());
    for e in &ents {
        assert_eq!(store.term(e.index), Ok(e.term));
    }
    assert_eq!(store.term(0), Ok(0));
    assert_eq!(store.term(6), Err(store_err(RaftStorageError::Unavailable)));
    assert_eq!(get(&store, 1, 7), Err(store_err(RaftStorageError::Unavailable)));
    assert_eq!(store.hard_state(), hs);
    assert_eq!(store.initial_state().unwrap().hard_state, hs);

    let stats = store.stats();
    assert_eq!((stats.first_index, stats.last_index, stats.entries), (1, 5, 5));
    assert!(stats.size_bytes > 0);
}

#[test]
fn appending_into_the_log_replaces_the_conflicting_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append(&entries_with_terms(1, &[1, 1, 1, 1, 1]), None, false).unwrap();

    // A new leader disagrees from index 3 on, and sends a shorter log.
    let newer = entries_with_terms(3, &[2]);
    store.append(&newer, None, false).unwrap();
    assert_eq!(store.last_index(), 3);
    let terms: Vec<u64> = get(&store, 1, 4).unwrap().iter().map(|e| e.term).collect();
    assert_eq!(terms, vec![1, 1, 2]);
    assert_eq!(store.term(4), Err(store_err(RaftStorageError::Unavailable)));

    // Appending right at the end just extends.
    store.append(&entries_with_terms(4, &[2, 2]), None, false).unwrap();
    assert_eq!(store.last_index(), 5);
    assert_eq!(store.term(5), Ok(2));
}

#[test]
fn bad_appends_are_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append(&entries_with_terms(1, &[1, 1, 1]), None, false).unwrap();

    let gap = store.append(&entries_with_terms(5, &[1]), None, false);
    assert!(matches!(gap, Err(StorageError::Gap { index: 5, last_index: 3 })), "{gap:?}");

    let holes = store.append(&[entry(4, 1), entry(6, 1)], None, false);
    assert!(matches!(holes, Err(StorageError::NotConsecutive { previous: 4, found: 6 })), "{holes:?}");

    store.set_snapshot(snapshot(2, 1, vec![1], b"")).unwrap();
    store.compact(3).unwrap();
    let compacted = store.append(&entries_with_terms(2, &[2]), None, false);
    assert!(matches!(compacted, Err(StorageError::Compacted { index: 2, first_index: 3 })), "{compacted:?}");

    // A failed append must not half-apply its hard state either.
    let hs = HardState { term: 9, vote: 1, commit: 3 };
    assert!(store.append(&entries_with_terms(9, &[9]), Some(&hs), true).is_err());
    assert_eq!(store.hard_state(), HardState::default());
    assert_eq!((store.first_index(), store.last_index()), (3, 3));
}

#[test]
fn max_size_limits_like_raft() {
    // Entries read from the tail, from LMDB, and from both.
    for checkpoint_after in [None, Some(6), Some(3)] {
        max_size_limits_like_raft_with(checkpoint_after);
    }
}

/// Entries 1..=6, moved into LMDB up to `checkpoint_after`, the rest in the tail.
fn max_size_limits_like_raft_with(checkpoint_after: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let ents: Vec<Entry> = (1..=6).map(|i| Entry { index: i, term: 1, data: vec![7; 10 * i as usize], ..Default::default() }).collect();
    let stored = checkpoint_after.unwrap_or(0);
    store.append(&ents[..stored], None, false).unwrap();
    store.checkpoint(&mut store.tail()).unwrap();
    store.append(&ents[stored..], None, false).unwrap();

    let size = |e: &Entry| e.encoded_len() as u64;
    let mut limits = vec![0, 1, raft::NO_LIMIT, u64::MAX - 1];
    let (a, b, c) = (size(&ents[1]), size(&ents[2]), size(&ents[3]));
    limits.extend([a, a + b - 1, a + b, a + b + c / 2, a + b + c, a + b + c + 1]);
    for max in limits {
        let got = Storage::entries(&store, 2, 7, max, GetEntriesContext::empty(false)).unwrap();
        let mut want = ents[1..6].to_vec();
        limit_size(&mut want, Some(max));
        assert_eq!(got, want, "max_size {max}, checkpoint after {checkpoint_after:?}");
    }
    // Zero still yields the first entry, so Raft always makes progress.
    assert_eq!(Storage::entries(&store, 2, 7, 0, GetEntriesContext::empty(false)).unwrap().len(), 1);
    assert_eq!(Storage::entries(&store, 2, 7, a + b, GetEntriesContext::empty(false)).unwrap().len(), 2);
}

#[test]
fn start_within_bytes_keeps_the_newest_entries_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let sized = |index: u64, len: usize| Entry { index, term: 1, data: vec![b'x'; len], ..Default::default() };
    store.append(&[sized(1, 100), sized(2, 100), sized(3, 1000), sized(4, 100), sized(5, 100)], None, false).unwrap();
    let weight = |i: u64| get(&store, i, i + 1).unwrap()[0].encoded_len() as u64 + 4;
    let (small, big) = (weight(1), weight(3));
    assert_eq!(store.start_within_bytes(1, 5, 2 * small).unwrap(), 4);
    assert_eq!(store.start_within_bytes(1, 5, 2 * small + big - 1).unwrap(), 4);
    assert_eq!(store.start_within_bytes(1, 5, 2 * small + big).unwrap(), 3);
    assert_eq!(store.start_within_bytes(1, 5, u64::MAX).unwrap(), 1);
    assert_eq!(store.start_within_bytes(2, 5, u64::MAX).unwrap(), 2, "never below the floor");
    assert_eq!(store.start_within_bytes(1, 5, small - 1).unwrap(), 6, "not even the last one fits");
    assert_eq!(store.start_within_bytes(1, 3, big - 1).unwrap(), 4);
    assert_eq!(store.start_within_bytes(6, 5, 0).unwrap(), 6);
}

#[test]
fn compaction_keeps_the_term_before_the_first_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append(&entries_with_terms(1, &[1, 1, 2, 2, 3]), None, false).unwrap();

    // Nothing may be compacted past what the stored snapshot covers.
    let err = store.compact(3);
    assert!(matches!(err, Err(StorageError::CompactBeyondSnapshot { compact_index: 3, snapshot_index: 0 })), "{err:?}");

    store.set_snapshot(snapshot(4, 2, vec![1], b"state at 4")).unwrap();
    store.compact(4).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (4, 5));
    assert_eq!(store.term(3), Ok(2));
    assert_eq!(store.term(2), Err(store_err(RaftStorageError::Compacted)));
    assert_eq!(get(&store, 3, 5), Err(store_err(RaftStorageError::Compacted)));
    assert_eq!(get(&store, 4, 6).unwrap(), entries_with_terms(4, &[2, 3]));
    assert_eq!(store.stats().entries, 2);

    // Compacting to or below the first index is a no-op; past the log's end is an error.
    store.compact(2).unwrap();
    store.compact(4).unwrap();
    assert_eq!(store.first_index(), 4);
    assert!(matches!(store.compact(7), Err(StorageError::Unavailable { index: 6, last_index: 5 })));

    // Everything but one entry may go; the log then starts right after the snapshot.
    store.compact(5).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (5, 5));
    assert_eq!(store.term(4), Ok(2));

    // The truncation point survives a restart.
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (5, 5));
    assert_eq!(store.term(4), Ok(2));
    assert_eq!(store.term(5), Ok(3));
    assert_eq!(store.snapshot(4, 1).unwrap().data, b"state at 4".to_vec());
    // A peer missing from the snapshot's membership would drop it: refuse, and ask the
    // application for a newer one.
    assert!(store.snapshot(4, 2).is_err());
    assert!(store.take_snapshot_wanted());
    assert!(!store.take_snapshot_wanted(), "reported once");
}

#[test]
fn apply_snapshot_resets_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.append(&entries_with_terms(1, &[1, 1, 2, 2, 3]), Some(&HardState { term: 5, vote: 1, commit: 3 }), false).unwrap();

    store.apply_snapshot(snapshot(10, 4, vec![1, 2, 3], b"dataset"), &[], true).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (11, 10));
    assert_eq!(store.term(10), Ok(4));
    assert_eq!(store.term(5), Err(store_err(RaftStorageError::Compacted)));
    assert_eq!(store.term(11), Err(store_err(RaftStorageError::Unavailable)));
    assert_eq!(get(&store, 11, 11), Ok(vec![]));
    // Term never goes backwards; commit jumps to the snapshot; the vote is kept.
    assert_eq!(store.hard_state(), HardState { term: 5, vote: 1, commit: 10 });
    assert_eq!(store.conf_state().voters, vec![1, 2, 3]);

    let stored = store.snapshot(10, 2).unwrap();
    assert_eq!(stored, snapshot(10, 4, vec![1, 2, 3], b"dataset"));
    assert_eq!(store.snapshot(11, 2), Err(store_err(RaftStorageError::SnapshotTemporarilyUnavailable)));

    // A snapshot that does not reach our first entry is refused.
    let old = store.apply_snapshot(snapshot(9, 4, vec![1], b""), &[], false);
    assert!(matches!(old, Err(StorageError::SnapshotOutOfDate { index: 9, min_index: 11 })), "{old:?}");
    assert_eq!(raft::Error::from(old.unwrap_err()), store_err(RaftStorageError::SnapshotOutOfDate));

    // The log continues after the snapshot.
    store.append(&entries_with_terms(11, &[4, 4]), None, false).unwrap();
    assert_eq!(get(&store, 11, 13).unwrap(), entries_with_terms(11, &[4, 4]));
}

#[test]
fn what_is_stored_with_a_snapshot_lands_with_it_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.put_meta("members", b"before").unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1]), Some(&HardState { term: 1, vote: 1, commit: 3 }), false).unwrap();
        store.apply_snapshot(snapshot(10, 2, vec![1, 2], b"dataset"), &[("members", b"at 10"), ("conf_applied", b"10")], true).unwrap();
        // A refused snapshot writes none of what came with it.
        let old = store.apply_snapshot(snapshot(9, 2, vec![1], b""), &[("members", b"at 9")], true);
        assert!(matches!(old, Err(StorageError::SnapshotOutOfDate { .. })), "{old:?}");
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.snapshot(10, 2).unwrap(), snapshot(10, 2, vec![1, 2], b"dataset"));
    assert_eq!(store.get_meta("members").unwrap().as_deref(), Some(&b"at 10"[..]));
    assert_eq!(store.get_meta("conf_applied").unwrap().as_deref(), Some(&b"10"[..]));
}

#[test]
fn bootstrap_then_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let hs = HardState { term: 3, vote: 2, commit: 7 };
    let cs = ConfState { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() };
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.bootstrap(snapshot(5, 2, vec![1, 2, 3], b"initial"), &[("members", b"seed")]).unwrap();
        assert!(store.is_initialized());
        assert_eq!((store.first_index(), store.last_index()), (6, 5));
        assert_eq!(store.hard_state(), HardState { term: 2, vote: 0, commit: 5 });

        store.append(&entries_with_terms(6, &[2, 3, 3]), Some(&hs), true).unwrap();
        store.set_conf_state(&cs).unwrap();
        store.sync().unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert!(store.is_initialized());
    assert_eq!((store.first_index(), store.last_index()), (6, 8));
    assert_eq!(get(&store, 6, 9).unwrap(), entries_with_terms(6, &[2, 3, 3]));
    assert_eq!(store.term(5), Ok(2));
    assert_eq!(store.hard_state(), hs);
    assert_eq!(store.conf_state(), cs);
    assert_eq!(store.initial_state().unwrap().conf_state, cs);
    assert_eq!(store.snapshot(0, 2).unwrap().data, b"initial".to_vec());
    assert_eq!(store.get_meta("members").unwrap().as_deref(), Some(&b"seed"[..]));

    let again = store.bootstrap(snapshot(1, 1, vec![1], b""), &[]);
    assert!(matches!(again, Err(StorageError::AlreadyInitialized)), "{again:?}");
}

#[test]
fn a_log_started_with_its_first_entry_keeps_it_its_metadata_and_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let hs = HardState { term: 1, vote: 0, commit: 1 };
    let cs = ConfState { voters: vec![1], ..Default::default() };
    {
        let store = LogStore::open(dir.path()).unwrap();
        let refused = store.start_log(&entry(1, 1), &hs, &ConfState::default(), &[("members", b"one")]);
        assert!(matches!(refused, Err(StorageError::NoVoters)), "{refused:?}");
        assert!(!store.is_initialized());
        assert_eq!(store.get_meta("members").unwrap(), None, "a refused start writes nothing");

        store.start_log(&entry(1, 1), &hs, &cs, &[("members", b"one"), ("conf_applied", b"1")]).unwrap();
        assert!(store.is_initialized());
        assert_eq!((store.first_index(), store.last_index(), store.hard_state()), (1, 1, hs.clone()));
        // The journal takes over from there.
        store.append(&entries_with_terms(2, &[1, 2]), Some(&HardState { term: 2, vote: 1, commit: 3 }), true).unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (1, 3));
    assert_eq!(get(&store, 1, 4).unwrap(), entries_with_terms(1, &[1, 1, 2]));
    assert_eq!(store.conf_state(), cs);
    assert_eq!(store.hard_state(), HardState { term: 2, vote: 1, commit: 3 });
    assert_eq!(store.get_meta("members").unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(store.get_meta("conf_applied").unwrap().as_deref(), Some(&b"1"[..]));
    let again = store.start_log(&entry(1, 1), &hs, &cs, &[]);
    assert!(again.is_err(), "{again:?}");
}

#[test]
fn bootstrap_needs_a_voter() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert!(matches!(store.bootstrap(snapshot(1, 1, vec![], b""), &[]), Err(StorageError::NoVoters)));
    assert!(matches!(store.bootstrap(Snapshot::default(), &[]), Err(StorageError::MissingSnapshotMetadata)));
    assert!(!store.is_initialized());
}

#[test]
fn appends_in_the_journal_survive_a_reopen_and_overwrite_stored_entries() {
    let dir = tempfile::tempdir().unwrap();
    let hs = |term, commit| HardState { term, vote: 1, commit };
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1, 1, 1]), Some(&hs(1, 2)), true).unwrap();
        store.checkpoint(&mut store.tail()).unwrap();
        // In the journal only: more entries, then a new leader overwriting 4.. (stored in
        // LMDB) and 6.. (in the journal).
        store.append(&entries_with_terms(6, &[1, 1, 1]), None, true).unwrap();
        store.append(&entries_with_terms(4, &[2, 2]), Some(&hs(2, 3)), true).unwrap();
        assert_eq!(store.last_index(), 5);
        assert_eq!(get(&store, 1, 6).unwrap(), entries_with_terms(1, &[1, 1, 1, 2, 2]));
        assert_eq!(store.term(4), Ok(2));
        // Dropped without a checkpoint, as a crash would.
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (1, 5));
    assert_eq!(get(&store, 1, 6).unwrap(), entries_with_terms(1, &[1, 1, 1, 2, 2]));
    assert_eq!(store.hard_state(), hs(2, 3));
    // The reopen moved everything into LMDB and started a new journal: a second reopen reads
    // the same log, not the old records again.
    store.append(&entries_with_terms(6, &[2]), None, true).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 7).unwrap(), entries_with_terms(1, &[1, 1, 1, 2, 2, 2]));
}

#[test]
fn a_journal_generation_the_stored_log_already_holds_is_not_replayed() {
    // Below durability high nothing orders a checkpoint's LMDB commit before the journal's next
    // header on disk: a power loss can keep the first and not the second. The journal then
    // holds an older generation, whose records end before the stored log does and carry an
    // older term and vote.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(LOG_DIR).join("journal");
    let old = HardState { term: 1, vote: 1, commit: 1 };
    let new = HardState { term: 2, vote: 2, commit: 4 };
    let stale;
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1]), Some(&old), false).unwrap();
        stale = std::fs::read(&journal).unwrap();
        store.checkpoint(&mut store.tail()).unwrap();
        store.append(&entries_with_terms(4, &[2, 2]), Some(&new), false).unwrap();
        store.checkpoint(&mut store.tail()).unwrap();
    }
    std::fs::write(&journal, &stale).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 6).unwrap(), entries_with_terms(1, &[1, 1, 1, 2, 2]), "the log is not cut back");
    assert_eq!(store.hard_state(), new, "no older term or vote comes back");
    // What is appended now goes to a newer generation, replayed as usual after a crash.
    store.append(&entries_with_terms(6, &[2]), None, false).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 7).unwrap(), entries_with_terms(1, &[1, 1, 1, 2, 2, 2]));
}

#[test]
fn a_commit_index_written_alone_never_covers_entries_only_the_journal_holds() {
    // Below durability high LMDB's commits and the journal's records reach the disk in no set
    // order. A new leader's entries that replaced a suffix sit in the journal until the next
    // checkpoint; a power loss that kept a commit index covering them and lost their record would
    // leave the replaced entries under it, applied as if the cluster had committed them.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(LOG_DIR).join("journal");
    let emptied;
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        store.set_commit_store_every(Duration::ZERO);
        store.append(&entries_with_terms(1, &[1, 1, 1, 1, 1]), Some(&HardState { term: 1, vote: 1, commit: 2 }), false).unwrap();
        store.checkpoint(&mut store.tail()).unwrap();
        emptied = std::fs::read(&journal).unwrap();
        store.append(&entries_with_terms(4, &[2, 2, 2]), Some(&HardState { term: 2, vote: 0, commit: 3 }), false).unwrap();
        store.set_commit(6, false).unwrap();
        assert_eq!(store.hard_state().commit, 6, "the node itself knows its commit index");
    }
    // The power loss: the journal as the checkpoint left it.
    std::fs::write(&journal, &emptied).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 6).unwrap(), entries_with_terms(1, &[1, 1, 1, 1, 1]));
    assert!(store.hard_state().commit <= 3, "entries 4 and 5 of term 1 were never committed: {:?}", store.hard_state());

    // With nothing in the journal, a commit index is written whole.
    store.set_commit(5, true).unwrap();
    drop(store);
    assert_eq!(LogStore::open(dir.path()).unwrap().hard_state().commit, 5);
}

#[test]
fn a_snapshot_record_is_stored_with_the_entries_it_was_taken_at() {
    // Below durability high a power loss can keep an LMDB commit and lose the journal's records.
    // A snapshot record stored alone could then outlive the entries it was taken at, and Raft
    // cannot resume the dataset at an index past its log: the record goes into LMDB in one
    // commit with them.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(LOG_DIR).join("journal");
    let empty_journal;
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        empty_journal = std::fs::read(&journal).unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1]), Some(&HardState { term: 1, vote: 1, commit: 3 }), false).unwrap();
        store.set_snapshot(snapshot(3, 1, vec![1], b"dataset")).unwrap();
    }
    std::fs::write(&journal, &empty_journal).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 4).unwrap(), entries_with_terms(1, &[1, 1, 1]));
    assert_eq!(store.snapshot(0, 0).unwrap(), snapshot(3, 1, vec![1], b"dataset"));
}

#[test]
fn an_append_larger_than_the_journal_goes_straight_into_lmdb() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = entries_with_terms(1, &[1, 1]);
    big[1].data = vec![7u8; JOURNAL_BYTES as usize];
    let hs = HardState { term: 1, vote: 1, commit: 1 };
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        let before = store.inner.durable_commits.load(Ordering::Relaxed);
        store.append(&big, Some(&hs), true).unwrap();
        assert_eq!(store.inner.durable_commits.load(Ordering::Relaxed) - before, 1, "one durable commit");
        assert!(store.tail().entries.is_empty(), "nothing left in the tail");
        assert_eq!(store.tail().journal.used(), 0, "nothing in the journal");
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(get(&store, 1, 3).unwrap(), big);
    assert_eq!(store.hard_state(), hs);
}

#[test]
fn stats_show_what_the_journal_holds_and_what_checkpoints_cost() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let before = store.stats();
    assert_eq!(before.journal_bytes, 0, "a store opens with its journal checkpointed");
    store.append(&entries_with_terms(1, &[1, 1, 1]), None, false).unwrap();
    let appended = store.stats();
    assert_eq!(appended.journal_bytes, store.tail().journal.used());
    assert!(appended.journal_bytes > 0);
    assert_eq!(appended.checkpoints, before.checkpoints, "no checkpoint yet");
    store.checkpoint(&mut store.tail()).unwrap();
    let after = store.stats();
    assert_eq!(after.journal_bytes, 0, "the checkpoint emptied the journal");
    assert_eq!(after.checkpoints, before.checkpoints + 1);
    assert!(after.checkpoint_micros > before.checkpoint_micros, "a checkpoint takes some time");
    store.checkpoint(&mut store.tail()).unwrap();
    assert_eq!(store.stats().checkpoints, after.checkpoints, "an empty journal needs no checkpoint");
}

#[test]
fn with_ordered_commits_every_lmdb_commit_is_durable_and_without_none_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    store.set_commit_store_every(Duration::ZERO);
    let durable = |store: &LogStore| store.inner.durable_commits.load(Ordering::Relaxed);
    let hs = |commit| HardState { term: 2, vote: 1, commit };
    let snap = Snapshot { metadata: Some(SnapshotMetadata { index: 2, term: 2, ..Default::default() }), ..Default::default() };
    // An append (journal only), then three LMDB writes that need not be durable themselves.
    let writes = |store: &LogStore, first: u64| {
        store.append(&entries_with_terms(first, &[2, 2, 2]), Some(&hs(first)), false).unwrap();
        store.set_commit(first + 1, false).unwrap();
        store.set_conf_state(&ConfState { voters: vec![1, 2, 3], ..Default::default() }).unwrap();
        store.put_meta("members", b"1,2,3").unwrap();
    };

    // The default, and durability high: nothing is committed without LMDB's flushes.
    let before = durable(&store);
    writes(&store, 1);
    store.set_snapshot(snap).unwrap();
    store.compact(3).unwrap();
    assert_eq!(durable(&store) - before, 5, "3 writes, the snapshot record with the checkpoint, the compaction");

    // Durability medium or low: nothing, checkpoints included (the flush thread syncs).
    store.set_ordered_commits(false).unwrap();
    let before = durable(&store);
    writes(&store, 4);
    store.checkpoint(&mut store.tail()).unwrap();
    assert_eq!(durable(&store) - before, 0, "nothing flushed");
    assert_eq!(store.last_index(), 6);

    // Once a flush made journal records durable (medium's background flush, a vote), the
    // checkpoint that absorbs them is durable itself: the journal forgets them only then.
    store.append(&entries_with_terms(7, &[2]), None, false).unwrap();
    store.sync().unwrap();
    let before = durable(&store);
    store.checkpoint(&mut store.tail()).unwrap();
    assert_eq!(durable(&store) - before, 1, "the checkpoint after a flush");
    store.append(&entries_with_terms(8, &[2]), None, false).unwrap();
    let before = durable(&store);
    store.checkpoint(&mut store.tail()).unwrap();
    assert_eq!(durable(&store) - before, 0, "and that one only");
}

#[test]
fn metadata_stored_with_the_log_never_outlives_its_entries() {
    // What is derived from entries (the membership they applied, and where) goes into LMDB with
    // them: below durability high a value stored alone could survive a power loss that took the
    // journal's records of the entries.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(LOG_DIR).join("journal");
    let emptied;
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        emptied = std::fs::read(&journal).unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1]), Some(&HardState { term: 1, vote: 1, commit: 3 }), false).unwrap();
        store.put_metas_with_log(&[("conf_applied", b"3")]).unwrap();
    }
    std::fs::write(&journal, &emptied).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.get_meta("conf_applied").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(get(&store, 1, 4).unwrap(), entries_with_terms(1, &[1, 1, 1]), "the entries it was derived from");
}

#[test]
fn a_replayed_record_never_takes_the_term_or_vote_back() {
    // LMDB takes the term and vote with any commit index written after the record that changed
    // them; below durability high the journal may lose that record and keep an earlier one.
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join(LOG_DIR).join("journal");
    let older_record;
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_ordered_commits(false).unwrap();
        store.set_commit_store_every(Duration::ZERO);
        store.append(&entries_with_terms(1, &[1, 1]), Some(&HardState { term: 1, vote: 1, commit: 1 }), false).unwrap();
        older_record = std::fs::read(&journal).unwrap();
        store.append(&[], Some(&HardState { term: 3, vote: 2, commit: 1 }), false).unwrap();
        store.set_commit(2, false).unwrap();
    }
    std::fs::write(&journal, &older_record).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), HardState { term: 3, vote: 2, commit: 1 });
}

#[test]
fn a_commit_index_that_moved_alone_is_written_lazily_and_never_behind_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let hs = |commit| HardState { term: 2, vote: 1, commit };
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_commit_store_every(Duration::from_secs(3600));
        store.append(&entries_with_terms(1, &[2, 2, 2, 2, 2, 2]), Some(&hs(1)), true).unwrap();
        // Only the commit index moves: kept in memory, not written.
        store.append(&[], Some(&hs(3)), true).unwrap();
        store.set_commit(4, false).unwrap();
        assert_eq!(store.hard_state(), hs(4));
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), hs(1), "the commit index on disk may trail, never lead");

    // A term or vote change is written at once, with the newest commit index.
    store.set_commit_store_every(Duration::from_secs(3600));
    store.set_commit(5, false).unwrap();
    store.append(&[], Some(&HardState { term: 3, vote: 2, commit: 5 }), false).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), HardState { term: 3, vote: 2, commit: 5 });

    // A snapshot past the stored commit index (5) lifts it on open, compacted or not: it holds
    // applied entries only. Raft refuses to resume a dataset at an index past the commit index.
    store.set_commit_store_every(Duration::from_secs(3600));
    store.set_commit(6, false).unwrap();
    let snap = Snapshot { metadata: Some(SnapshotMetadata { index: 6, term: 2, ..Default::default() }), ..Default::default() };
    store.set_snapshot(snap).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state().commit, 6, "not compacted");
    // What a node does at start: resume at the snapshot's index (raft panics if it is past the
    // commit index).
    let config = raft::Config { id: 1, applied: 6, ..Default::default() };
    let logger = crate::raft_logger::logger(1);
    raft::RawNode::new(&config, store.clone(), &logger).expect("raft resumes at the snapshot");

    // Compaction past the stored commit index lifts it on open: compacted means applied.
    store.compact(7).unwrap();
    drop(store);
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state().commit, 6);

    // store_commit writes the newest on demand (a clean shutdown).
    store.set_commit_store_every(Duration::from_secs(3600));
    store.append(&entries_with_terms(7, &[3]), None, true).unwrap();
    store.set_commit(7, false).unwrap();
    store.store_commit().unwrap();
    drop(store);
    assert_eq!(LogStore::open(dir.path()).unwrap().hard_state().commit, 7);
}

#[test]
fn a_commit_index_left_unwritten_when_the_cluster_goes_quiet_is_written_once_its_interval_passes() {
    let dir = tempfile::tempdir().unwrap();
    let hs = |commit| HardState { term: 2, vote: 1, commit };
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.set_commit_store_every(Duration::from_secs(3600));
        store.append(&entries_with_terms(1, &[2, 2, 2]), Some(&hs(1)), true).unwrap();
        // The last advance comes right after a write: kept in memory, and nothing else arrives.
        store.set_commit(3, false).unwrap();
        assert!(!store.store_commit_if_behind().unwrap(), "not before the interval has passed");
        // A zero interval stands in for the hour passing, with no clock for a loaded machine to miss.
        store.set_commit_store_every(Duration::ZERO);
        assert!(store.store_commit_if_behind().unwrap());
        assert!(!store.store_commit_if_behind().unwrap(), "nothing new to write");
    }
    assert_eq!(LogStore::open(dir.path()).unwrap().hard_state(), hs(3));

    // A checkpoint writes the newest hard state too: nothing is left to catch up after it.
    let store = LogStore::open(dir.path()).unwrap();
    store.set_commit_store_every(Duration::from_secs(3600));
    store.append(&entries_with_terms(4, &[2]), None, true).unwrap();
    store.set_commit(4, false).unwrap();
    store.checkpoint(&mut store.tail()).unwrap();
    store.set_commit_store_every(Duration::ZERO);
    assert!(!store.store_commit_if_behind().unwrap());
    drop(store);
    assert_eq!(LogStore::open(dir.path()).unwrap().hard_state(), hs(4));
}

#[test]
fn hard_state_and_commit_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&entries_with_terms(1, &[1, 1, 1]), None, false).unwrap();
        store.set_hard_state(&HardState { term: 1, vote: 1, commit: 1 }, false).unwrap();
        store.set_commit(3, true).unwrap();
        assert_eq!(store.hard_state(), HardState { term: 1, vote: 1, commit: 3 });
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.hard_state(), HardState { term: 1, vote: 1, commit: 3 });
}

#[test]
fn meta_survives_restart_and_cannot_clobber_raft_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.get_meta("node_id").unwrap(), None);
        store.put_meta("node_id", b"7").unwrap();
        store.put_meta("hard_state", b"not a protobuf").unwrap();
        store.put_meta("node_id", b"8").unwrap();
        store.sync().unwrap();
    }
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.get_meta("node_id").unwrap(), Some(b"8".to_vec()));
    assert_eq!(store.get_meta("hard_state").unwrap(), Some(b"not a protobuf".to_vec()));
    assert_eq!(store.hard_state(), HardState::default());
}

#[test]
fn a_directory_is_open_once_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert!(matches!(LogStore::open(dir.path()), Err(StorageError::AlreadyOpen(_))));
    let clone = store.clone();
    drop(store);
    assert!(matches!(LogStore::open(dir.path()), Err(StorageError::AlreadyOpen(_))));
    drop(clone);
    LogStore::open(dir.path()).unwrap();
}

/// A store holding entries of these terms from index 1, moved into LMDB (where the tests below
/// damage them).
fn checkpointed(dir: &Path, terms: &[u64]) -> LogStore {
    let store = LogStore::open(dir).unwrap();
    store.append(&entries_with_terms(1, terms), None, false).unwrap();
    store.checkpoint(&mut store.tail()).unwrap();
    store
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointed(dir.path(), &[1, 1]);
    let inner = &store.inner;
    let mut txn = inner.env.write_txn().unwrap();
    inner.entries.put(&mut txn, &2, &[0xff, 0xff, 0xff]).unwrap();
    inner.meta.put(&mut txn, key::TRUNCATED, &[0xff, 0xff]).unwrap();
    txn.commit().unwrap();

    assert!(matches!(get(&store, 1, 3), Err(raft::Error::Store(RaftStorageError::Other(_)))));
    assert!(store.term(2).is_err());
    drop(store);
    assert!(matches!(LogStore::open(dir.path()), Err(StorageError::Decode(_))));
}

#[test]
fn a_flipped_bit_in_a_stored_entry_is_caught_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointed(dir.path(), &[1, 1, 1]);
    let mut txn = store.inner.env.write_txn().unwrap();
    let mut damaged = store.inner.entries.get(&txn, &2).unwrap().unwrap().to_vec();
    damaged[0] ^= 0x01;
    store.inner.entries.put(&mut txn, &2, &damaged).unwrap();
    txn.commit().unwrap();
    assert!(get(&store, 1, 4).is_err());
    drop(store);
    match LogStore::open(dir.path()) {
        Err(StorageError::Corrupt(why)) => assert!(why.contains("entry 2 fails its checksum"), "{why}"),
        other => panic!("a damaged log must not open: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_hole_in_the_stored_log_is_reported_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointed(dir.path(), &[1, 1, 1]);
    let mut txn = store.inner.env.write_txn().unwrap();
    store.inner.entries.delete(&mut txn, &2).unwrap();
    txn.commit().unwrap();
    assert!(matches!(get(&store, 1, 4), Err(raft::Error::Store(RaftStorageError::Other(_)))));
    drop(store);
    assert!(matches!(LogStore::open(dir.path()), Err(StorageError::Corrupt(_))));
}

#[test]
fn term_view_matches_entry_encoding() {
    let e = Entry { index: 42, term: 7, data: vec![1; 1000], context: vec![2; 10], ..Default::default() };
    assert_eq!(EntryTerm::decode(e.encode_to_vec().as_slice()).unwrap().term, 7);
}

#[test]
fn readers_on_other_threads_see_a_consistent_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || {
            for _ in 0..2000 {
                let (first, last) = (store.first_index(), store.last_index());
                // Cached indexes may move between calls; only Compacted/Unavailable are fine.
                match get(&store, first, last + 1) {
                    Ok(_) => {}
                    Err(raft::Error::Store(RaftStorageError::Compacted | RaftStorageError::Unavailable)) => {}
                    Err(e) => panic!("unexpected error {e:?}"),
                }
            }
        })
    };
    for i in 1..=200u64 {
        store.append(&[entry(i, 1)], Some(&HardState { term: 1, vote: 1, commit: i }), false).unwrap();
        if i % 50 == 0 {
            store.set_snapshot(snapshot(i - 10, 1, vec![1], b"")).unwrap();
            store.compact(i - 10).unwrap();
        }
    }
    reader.join().unwrap();
    assert_eq!((store.first_index(), store.last_index()), (190, 200));
}
