//! **kube-sim: a SIMULATED Kubernetes API server.** It is a test double for Flotilla's tests,
//! benchmarks and `flotilla-hub --dev`, not a Kubernetes implementation.
//!
//! It speaks the real REST wire format (JSON objects, `resourceVersion`, list/watch with
//! bookmarks and 410 Gone, selectors, pagination, merge/strategic/JSON patches, the status and
//! eviction subresources, discovery) so that kube-rs and kubectl run against it unchanged,
//! and it simulates GPU node pools, kubelets, device plugins, DRA, a scheduler and workload
//! controllers in memory. Faults can be injected through [`SimCluster::inject`] or the
//! control API. See `docs/kube-sim.md`.

pub mod cluster;
pub mod cluster_core;
pub mod control;
pub mod faults;
pub mod gpu;
pub mod patch;
pub mod protobuf;
pub mod quantity;
pub mod resources;
pub mod scenario;
pub mod selector;
pub mod server;
pub mod sim;
pub mod store;
pub mod table;
pub mod versions;

pub use cluster::{SimCluster, SimFleet, SimOptions};
pub use faults::Fault;
pub use scenario::Scenario;
pub use store::ApiError;
