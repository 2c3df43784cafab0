//! A replicated, persistent, revisioned key-value store: openraft 0.9 over redb, with a tonic
//! transport. It knows nothing about fleets.
//!
//! - [`node::StoreNode`] runs one member and implements [`flotilla_core::kv::KvBackend`].
//! - [`client::StoreClient`] talks to any members over gRPC and implements the same trait.
//! - Durability and consistency guarantees: `docs/raft-store.md`.

pub mod client;
pub mod data_dir;
pub mod error;
pub mod log_store;
pub mod network;
pub mod node;
mod service;
pub mod state_machine;
pub mod types;

pub use error::StoreError;
pub use network::Faults;
pub use node::{ExtraServices, NodeConfig, RunningNode, StoreNode, Tuning};
