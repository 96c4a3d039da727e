//! Moving snapshot files between nodes. A Raft snapshot message carries only a small descriptor
//! (file name, size, checksum); the follower fetches the file itself from the sender's side port
//! in chunks (`SNAPSHOT.CHUNK`), resuming a partial download, verifies it, and only then lets raft
//! see the snapshot. The Raft loop never waits for the network.

use crate::disk_space;
use crate::ids::NodeId;
use crate::peer_auth::{self, Password};
use crate::resp::{self, Frame};
use crate::snapshot_file::{self, IncomingSnapshot};
use anyhow::{bail, Context as _};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

const CHUNK: u64 = 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDescriptor {
    /// Plain file name inside the node's snapshot directory.
    pub file: String,
    pub size: u64,
    pub checksum: u32,
}

impl SnapshotDescriptor {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("descriptor serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<SnapshotDescriptor> {
        let d: SnapshotDescriptor = serde_json::from_slice(bytes).ok()?;
        is_plain_name(&d.file).then_some(d)
    }
}

/// A name we are willing to create or serve: no directories, no hidden files.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.ends_with(".rsnap")
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
}

/// A snapshot file being downloaded, as RAFT.INFO shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchProgress {
    pub file: String,
    pub from: NodeId,
    /// Bytes on disk so far, including those of an earlier, interrupted attempt.
    pub received: u64,
    pub size: u64,
}

/// Room the log keeps while a snapshot is downloaded, beyond the file's own.
const FETCH_HEADROOM: u64 = 16 << 20;

/// Makes sure `dir` holds the verified file `desc` describes, fetching it from `peer` if needed
/// (with `password`, the cluster's `raft-password`, if it has one). `progress` hears how many
/// bytes of the file are on disk, before the first chunk and after each one.
pub fn fetch(
    peer: &str,
    password: Option<&Password>,
    desc: &SnapshotDescriptor,
    dir: &Path,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    let final_path = dir.join(&desc.file);
    if let Ok(summary) = snapshot_file::verify(&final_path) {
        if summary.checksum == desc.checksum && summary.size == desc.size {
            // An earlier fetch may have renamed it in and failed to sync the directory.
            snapshot_file::sync_dir_of(&final_path).with_context(|| format!("syncing the directory of {}", final_path.display()))?;
            progress(desc.size);
            return Ok(());
        }
    }
    let mut incoming = IncomingSnapshot::begin(&final_path, desc.size, desc.checksum)?;
    // A download that fills the disk fails at its end, and meanwhile takes the room the log's
    // next write needs: refused before it starts, the leader offers the snapshot again later.
    let missing = desc.size.saturating_sub(incoming.offset());
    if let Some(free) = disk_space::free_bytes(dir) {
        if free < missing.saturating_add(FETCH_HEADROOM) {
            // What an earlier attempt left takes room too.
            incoming.abandon();
            bail!(
                "no room to fetch snapshot {}: {} MB free on the disk holding {}, and it needs {} MB more (and {} MB for the log meanwhile)",
                desc.file,
                free >> 20,
                dir.display(),
                missing.div_ceil(1 << 20),
                FETCH_HEADROOM >> 20
            );
        }
    }
    progress(incoming.offset());
    let addr =
        peer.to_socket_addrs().with_context(|| format!("resolving {peer}"))?.next().with_context(|| format!("{peer} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connecting to {peer}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    if let Some(password) = password {
        peer_auth::authenticate_blocking(&mut stream, password).with_context(|| format!("authenticating with {peer}"))?;
    }
    let mut buf = BytesMut::with_capacity(2 * CHUNK as usize);
    while incoming.offset() < desc.size {
        let offset = incoming.offset();
        let mut out = BytesMut::new();
        let (off, len) = (offset.to_string(), CHUNK.to_string());
        resp::encode_command(&[b"SNAPSHOT.CHUNK", desc.file.as_bytes(), off.as_bytes(), len.as_bytes()], &mut out);
        stream.write_all(&out)?;
        let frame = resp::read_frame(&mut stream, &mut buf)?;
        match frame {
            Frame::Bulk(bytes) if !bytes.is_empty() => {
                incoming.write_chunk(offset, &bytes)?;
                progress(incoming.offset());
            }
            Frame::Bulk(_) => bail!("{peer} sent an empty chunk at offset {offset} of {}", desc.file),
            Frame::Error(e) => bail!("{peer} refused a chunk of {}: {e}", desc.file),
            other => bail!("{peer} answered SNAPSHOT.CHUNK with {other:?}"),
        }
    }
    incoming.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_and_refuse_paths() {
        let d = SnapshotDescriptor { file: "snapshot-00000000000000000042-3.rsnap".into(), size: 10, checksum: 7 };
        assert_eq!(SnapshotDescriptor::decode(&d.encode()), Some(d));
        for bad in ["../etc/passwd", "/abs.rsnap", ".hidden.rsnap", "a/b.rsnap", "x.txt", ""] {
            let d = SnapshotDescriptor { file: bad.into(), size: 1, checksum: 1 };
            assert_eq!(SnapshotDescriptor::decode(&d.encode()), None, "{bad}");
        }
    }
}
