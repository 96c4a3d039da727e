//! Which cluster a node belongs to. Node ids are only unique within one cluster (the node that
//! runs `RAFT.CLUSTER INIT` is always node 1), and a side port says nothing else about whose
//! messages it carries. So a node of an earlier cluster left running at an address a new one
//! reuses (a test cluster torn down by hand, say) would go on sending Raft messages to whichever
//! server now answers there: with a higher term, it takes over the new cluster's node, whose log
//! it then rewrites or, being ahead of it, stops.
//!
//! `RAFT.CLUSTER INIT` therefore draws a random cluster id, kept with the log. Every `HELLO`
//! says it, and a node refuses a peer of another cluster. A node that joins has none until it
//! follows a leader: it then takes the one its leader's `HELLO` said. Clusters made before
//! there were cluster ids have none, and check nothing.

use crate::storage::LogStore;

/// Where the id is kept, beside the log.
pub const META_CLUSTER_ID: &str = "cluster_id";

/// A cluster's id; 0 means not known (yet).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct ClusterId(pub u64);

impl ClusterId {
    pub const UNKNOWN: ClusterId = ClusterId(0);

    pub fn random() -> ClusterId {
        ClusterId(rand::random::<u64>().max(1))
    }

    pub fn is_known(self) -> bool {
        self.0 != 0
    }

    /// As `HELLO` carries it: 16 hex digits.
    pub fn parse(text: &str) -> Option<ClusterId> {
        u64::from_str_radix(text, 16).ok().map(ClusterId)
    }

    /// The id kept in `store`, if any.
    pub fn load(store: &LogStore) -> anyhow::Result<ClusterId> {
        let Some(bytes) = store.get_meta(META_CLUSTER_ID)? else { return Ok(ClusterId::UNKNOWN) };
        // Read as unknown, a damaged id would let this node talk to any cluster.
        let raw = bytes.as_slice().try_into().map_err(|_| anyhow::anyhow!("the stored cluster id is corrupt ({} bytes)", bytes.len()))?;
        Ok(ClusterId(u64::from_be_bytes(raw)))
    }

    pub fn save(self, store: &LogStore) -> anyhow::Result<()> {
        store.put_meta(META_CLUSTER_ID, &self.to_meta())?;
        Ok(())
    }

    /// As it is kept under [`META_CLUSTER_ID`].
    pub fn to_meta(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Why a peer that says `theirs` is refused by a node of cluster `self`, if it is.
    pub fn refuses(self, theirs: ClusterId, from: impl std::fmt::Display) -> Option<String> {
        (self.is_known() && theirs.is_known() && self != theirs).then(|| {
            format!(
                "node {from} belongs to another cluster (cluster id {theirs}; this node's is {self}): a node of an \
                 earlier cluster still running at an address this one reuses? Stop it, or empty its dir and join it \
                 to this cluster"
            )
        })
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_said_in_hex_and_only_two_known_different_ids_refuse() {
        let (a, b) = (ClusterId(0x1234), ClusterId(0xabcd_ef01_2345_6789));
        assert_eq!(a.to_string(), "0000000000001234");
        assert_eq!(ClusterId::parse(&b.to_string()), Some(b));
        assert_eq!(ClusterId::parse("xyz"), None);
        let why = a.refuses(b, 7).unwrap();
        assert!(
            why.starts_with("node 7 belongs to another cluster (cluster id abcdef0123456789; this node's is 0000000000001234)"),
            "{why}"
        );
        assert_eq!(a.refuses(a, 7), None);
        assert_eq!(a.refuses(ClusterId::UNKNOWN, 7), None, "a joining node, or one of an older cluster");
        assert_eq!(ClusterId::UNKNOWN.refuses(b, 7), None);
        assert!(ClusterId::random().is_known());
    }

    #[test]
    fn it_is_kept_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(ClusterId::load(&store).unwrap(), ClusterId::UNKNOWN);
        ClusterId(42).save(&store).unwrap();
        drop(store);
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(ClusterId::load(&store).unwrap(), ClusterId(42));
        store.put_meta(META_CLUSTER_ID, &[0, 42]).unwrap();
        let err = ClusterId::load(&store).unwrap_err().to_string();
        assert!(err.contains("cluster id is corrupt"), "a damaged id is not taken for none: {err}");
    }
}
