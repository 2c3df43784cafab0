//! A replicated, persistent, revisioned key-value store: openraft 0.9 over redb, with a tonic
//! transport. It knows nothing about fleets.
//!
//! - [`StoreNode`] is one member and implements [`flotilla_core::kv::KvBackend`]. The embedding
//!   program opens it ([`StoreNode::open`]), mounts its gRPC services ([`StoreNode::services`])
//!   on its own server, then bootstraps or joins ([`OpenMember::bootstrap_or_join`]).
//!   [`StoreNode::start`] does all of that with a server of its own, for tests and tools.
//! - [`client::StoreClient`] talks to any members over gRPC and implements the same trait.
//! - Durability and consistency guarantees: `docs/raft-store.md`.

pub mod admin;
pub mod client;
pub mod data_dir;
pub mod error;
pub mod log_store;
pub mod network;
pub mod node;
mod proposer;
pub mod service;
pub mod standalone;
pub mod start;
pub mod state_machine;
pub mod transport;
pub mod types;

pub use admin::AdminError;
pub use error::StoreError;
pub use network::Faults;
pub use node::StoreNode;
pub use service::StoreServices;
pub use standalone::{RunningNode, nodelay_incoming};
pub use start::{NodeConfig, OpenMember, Tuning};
pub use transport::{DialTransport, Transport};
