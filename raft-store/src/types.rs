//! openraft type configuration: what the log carries and what applying it returns.

use std::io::Cursor;

use flotilla_core::kv::{KvError, Revision, TxnRequest, TxnResult};
use serde::{Deserialize, Serialize};

/// A Raft node id.
pub type NodeId = u64;
/// A Raft node's address record.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The store's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft instance type.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Storage error type.
pub type StorageError = openraft::StorageError<NodeId>;
/// Stored membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;

/// A state-machine command carried by one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Validated transactions, applied in order, each with its own revision. Many client
    /// writes share one entry (group commit): openraft 0.9 fsyncs once per entry.
    Txns(Vec<TxnRequest>),
    /// Discard history before this revision.
    Compact(Revision),
}

/// What applying one log entry produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A blank or membership entry.
    None,
    /// One result per transaction of a [`Command::Txns`].
    Txns(Vec<TxnResult>),
    /// A compaction, with the resulting oldest available revision.
    Compacted(Revision),
    /// The command was rejected deterministically (e.g. compacting a future revision).
    Rejected(KvError),
}
