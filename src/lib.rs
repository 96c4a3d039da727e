//! Raftis core: a durable Raft node (tikv `raft` + LMDB through `heed`) whose members talk over a
//! RESP side port. Nothing here knows about the Redis module API; the module in `module/` plugs a
//! state machine into [`node::Node`].

pub mod config;
pub mod ids;
pub mod storage;
pub mod resp;
pub mod transport;

pub use ids::{LogIndex, NodeId, Term};
