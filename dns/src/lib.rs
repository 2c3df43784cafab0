//! Flotilla DNS: `clusterset.local` per the MCS DNS specification, and a global zone, answered
//! from an immutable routing table snapshot swapped atomically on every change. Embedded in
//! every hub replica, or standalone beside a cluster's CoreDNS.

pub mod answer;
pub mod follow;
pub mod server;

pub use answer::{Asker, Reply, SCHEMA_VERSION, Zones, answer};
pub use flotilla_core::rate::RrlConfig;
pub use server::{DnsError, DnsServer, DnsStats, MAX_UDP_PAYLOAD, SharedTable};

/// The DNS wire types the server speaks (hickory-proto), for clients and tests.
pub use hickory_proto as proto;

/// The log filter for a process that serves DNS: `env` (`RUST_LOG`) or `default`, with
/// hickory-server's one-line-per-request INFO events turned down to WARN unless the filter
/// names hickory itself. At thousands of queries a second those lines would bury everything
/// else (and cost more than the answers).
pub fn log_filter(env: Option<&str>, default: &str) -> String {
    let f = env.filter(|e| !e.trim().is_empty()).unwrap_or(default);
    if f.contains("hickory") {
        f.to_string()
    } else {
        format!("{f},hickory_server=warn")
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn per_request_dns_logs_are_quiet_unless_asked_for() {
        assert_eq!(log_filter(None, "info"), "info,hickory_server=warn");
        assert_eq!(
            log_filter(Some("debug"), "info"),
            "debug,hickory_server=warn"
        );
        assert_eq!(log_filter(Some(""), "info"), "info,hickory_server=warn");
        assert_eq!(
            log_filter(Some("info,hickory_server=info"), "info"),
            "info,hickory_server=info"
        );
    }
}
