//! Errors from opening a data directory and running a store node.

use std::path::PathBuf;

/// Why a store node could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory holds files that are not a Flotilla store, or are damaged.
    #[error(
        "data directory {dir}: {file} is corrupt or not a Flotilla store ({reason}); \
         move it aside or point --data-dir elsewhere"
    )]
    CorruptDataDir {
        /// The data directory.
        dir: PathBuf,
        /// The file inside it.
        file: String,
        /// What was wrong.
        reason: String,
    },
    /// The data directory belongs to another node.
    #[error("data directory {dir} belongs to node {stored}, not node {requested}")]
    WrongNode {
        /// The data directory.
        dir: PathBuf,
        /// The node id stored in it.
        stored: u64,
        /// The node id requested with --node-id.
        requested: u64,
    },
    /// The data directory belongs to another cluster.
    #[error(
        "data directory {dir} belongs to cluster {stored}, but the cluster joined is {requested}"
    )]
    WrongCluster {
        /// The data directory.
        dir: PathBuf,
        /// The cluster id stored in it.
        stored: String,
        /// The cluster id of the cluster being joined.
        requested: String,
    },
    /// An I/O error on the data directory.
    #[error("data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A storage engine failure.
    #[error("storage: {0}")]
    Storage(String),
    /// Raft failed to start or stopped.
    #[error("raft: {0}")]
    Raft(String),
    /// A network failure (bind, join).
    #[error("network: {0}")]
    Network(String),
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
}
