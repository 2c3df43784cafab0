//! The hub's use of the store: which backend holds the fleet (`backend`: the embedded Raft
//! store, or etcd with the `etcd` feature), the schema (`keys`), typed records and helpers
//! (`records`), and the replica's in-memory mirror (`mirror`).

pub mod backend;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod keys;
pub mod mirror;
pub mod records;
