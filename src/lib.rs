//! Raftis core: a durable Raft node (tikv `raft` + LMDB through `heed`) whose members talk over a
//! RESP side port. Nothing here knows about the Redis module API; the module in `module/` plugs a
//! state machine into [`node::Node`].

pub mod blocking;
pub mod cluster_id;
pub mod cluster_view;
pub mod command_entry;
pub mod config;
pub mod determinism;
pub mod dir_lock;
pub mod disk_space;
pub mod forward;
pub mod function_payload;
pub mod health_report;
mod heartbeats;
pub mod ids;
pub mod journal;
pub mod membership;
pub mod memory_limit;
pub mod node;
pub mod peer_auth;
pub mod proposal;
mod raft_logger;
pub mod recovery;
pub mod resp;
pub mod routing;
pub mod script_shebang;
pub mod set_pop;
pub mod settings;
pub mod shared_settings;
pub mod snapshot_data;
pub mod snapshot_file;
pub mod snapshot_transfer;
pub mod sort_patterns;
pub mod status;
pub mod storage;
pub mod stream_read;
pub mod transport;
pub mod unwind;

pub use ids::{LogIndex, NodeId, Term};
