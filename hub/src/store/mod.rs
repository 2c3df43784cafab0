//! The hub's use of the store: which backend holds the fleet (`backend`: the embedded Raft
//! store, or etcd with the `etcd` feature), the schema (`keys`), typed records and helpers
//! (`records`), the replica's in-memory mirror (`mirror`), and the `Kv` gRPC API over any
//! backend (`kv_service`).

pub mod backend;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod keys;
pub mod kv_service;
pub mod mirror;
pub mod records;
