//! The payload of a Raft snapshot: the cluster's address book at the snapshot's index, followed by
//! the state machine's own bytes. Layout: `u32 BE length | members JSON | application bytes`.

use crate::membership::Members;

#[derive(Debug, thiserror::Error)]
#[error("malformed snapshot payload: {0}")]
pub struct MalformedSnapshot(String);

pub fn encode(members: &Members, app: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(members).expect("members serialize");
    let mut out = Vec::with_capacity(4 + json.len() + app.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(app);
    out
}

pub fn decode(data: &[u8]) -> Result<(Members, &[u8]), MalformedSnapshot> {
    if data.is_empty() {
        return Ok((Members::new(), data));
    }
    let len_bytes: [u8; 4] = data.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(|| MalformedSnapshot("too short".into()))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let json = data.get(4..4 + len).ok_or_else(|| MalformedSnapshot("members truncated".into()))?;
    let members = serde_json::from_slice(json).map_err(|e| MalformedSnapshot(e.to_string()))?;
    Ok((members, &data[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{membership::NodeInfo, NodeId};

    #[test]
    fn round_trip_and_truncation_is_an_error() {
        let mut m = Members::new();
        m.insert(NodeId(1), NodeInfo { id: NodeId(1), raft_addr: "a:1".into(), client_addr: "a:2".into() });
        let bytes = encode(&m, b"dataset");
        let (back, app) = decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(app, b"dataset");
        assert!(decode(&bytes[..6]).is_err());
    }
}
