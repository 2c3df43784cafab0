//! The member agent: watches one cluster through kube-rs and computes its GPU inventory.
//! (The hub connection comes with the rest of the membership issue.)

pub mod convert;
pub mod watch;

pub use watch::ClusterWatch;
