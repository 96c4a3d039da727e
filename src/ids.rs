//! Typed identifiers. Raft speaks in bare `u64`s; inside Raftis we keep them apart so that a
//! log index can never be passed where a node id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }
    };
}

id_type!(
    /// A Raft member. Never 0: raft-rs uses 0 for "no node".
    NodeId
);
id_type!(
    /// Position of an entry in the replicated log (first real entry is 1).
    LogIndex
);
id_type!(
    /// A Raft election term.
    Term
);
