//! Snapshot files by name: what a name says (complete, being written, being downloaded), the
//! newest complete one, and the clean-up of what a newer one makes useless.

use super::*;

pub fn snapshot_path(dir: &Path, index: LogIndex, term: Term) -> PathBuf {
    dir.join(format!("snapshot-{:020}-{}.{EXTENSION}", index.get(), term.get()))
}

/// What a file in a snapshot directory is, judged by its name alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Complete,
    Tmp,
    Part,
    PartInfo,
}

/// `(kind, index, term)` of one of our file names; `None` for anything else.
pub(super) fn parse_name(name: &str) -> Option<(Kind, u64, u64)> {
    let rest = name.strip_prefix("snapshot-")?;
    let (stem, kind) = if let Some(s) = rest.strip_suffix(".rsnap") {
        (s, Kind::Complete)
    } else if let Some(s) = rest.strip_suffix(".rsnap.tmp") {
        (s, Kind::Tmp)
    } else if let Some(s) = rest.strip_suffix(".rsnap.part") {
        (s, Kind::Part)
    } else if let Some(s) = rest.strip_suffix(".rsnap.part.info") {
        (s, Kind::PartInfo)
    } else {
        return None;
    };
    let (index, term) = stem.split_once('-')?;
    let number = |s: &str| if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) { s.parse().ok() } else { None };
    Some((kind, number(index)?, number(term)?))
}

pub(super) fn parse_path(path: &Path) -> Option<(Kind, u64, u64)> {
    parse_name(path.file_name()?.to_str()?)
}

/// Our files in `dir`, with what their names say.
fn listing(dir: &Path) -> io::Result<Vec<(PathBuf, Kind, u64, u64)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some((kind, index, term)) = parse_path(&path) {
            out.push((path, kind, index, term));
        }
    }
    Ok(out)
}

/// The complete snapshot file with the highest index in `dir` (the higher term on a tie), or
/// `None` if there is none or `dir` does not exist. Files being written (`.tmp`) or downloaded
/// (`.part`) never count: only a finished file gets the final name. Contents are not verified
/// here; that is [`verify`]'s job and reads the whole file.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let files = match listing(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(files
        .into_iter()
        .filter(|(_, kind, _, _)| *kind == Kind::Complete)
        .max_by_key(|(_, _, index, term)| (*index, *term))
        .map(|(path, _, _, _)| path))
}

/// Deletes what `keep` (a complete snapshot in `dir`) makes useless, and returns how many files
/// went:
/// - complete snapshots at a lower index, or at the same index under another name;
/// - `.tmp` writes and `.part`/`.part.info` downloads at an index up to `keep`'s. Raft never
///   goes back to an older snapshot, so these can never be used; if a writer or a download is
///   still at work on one, its final rename fails and it reports an error, losing nothing.
///
/// Anything at a higher index stays: that may be a snapshot a child process has just finished
/// (and is about to be recorded), a live writer's `.tmp`, or a download in flight.
/// `keep` must carry a name from [`snapshot_path`]; otherwise nothing is deleted (`InvalidInput`).
pub fn remove_older_than(dir: &Path, keep: &Path) -> io::Result<usize> {
    let keep_name = keep.file_name();
    let Some((Kind::Complete, keep_index, _)) = parse_path(keep) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a snapshot file name; refusing to clean up around it", keep.display()),
        ));
    };
    let mut removed = 0;
    for (path, kind, index, _) in listing(dir)? {
        let stale = match kind {
            Kind::Complete => index < keep_index || (index == keep_index && path.file_name() != keep_name),
            Kind::Tmp | Kind::Part | Kind::PartInfo => index <= keep_index,
        };
        if stale {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                // Someone else (a finishing writer's rename, a concurrent cleanup) got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// At start-up, before any snapshot is being written: half-written files of a crashed writer.
/// Downloads (`.part`) stay, they resume.
pub fn remove_leftovers(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for (path, kind, _, _) in listing(dir)? {
        if kind == Kind::Tmp {
            fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Where the snapshot that will be `path` is written until it is sealed.
pub fn temp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A rename is only durable once the directory itself is synced.
pub fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
