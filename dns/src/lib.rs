//! Flotilla DNS: `clusterset.local` per the MCS DNS specification, and a global zone, answered
//! from an immutable routing table snapshot swapped atomically on every change. Embedded in
//! every hub replica, or standalone beside a cluster's CoreDNS.

pub mod answer;
pub mod follow;
pub mod server;

pub use answer::{Asker, Reply, SCHEMA_VERSION, Zones, answer};
pub use server::{DnsError, DnsServer, DnsStats, MAX_UDP_PAYLOAD, SharedTable};

/// The DNS wire types the server speaks (hickory-proto), for clients and tests.
pub use hickory_proto as proto;
