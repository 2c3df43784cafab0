//! Hub metrics (Prometheus, on the HTTP port): agents, clusters by health, report rate and
//! processing latency, store write latency, Raft leadership and term.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The hub's metric handles.
pub struct HubMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Agent streams open on this replica.
    pub agents_connected: Gauge,
    /// Agent messages by kind (`snapshot`, `delta`, `heartbeat`, `leave`, `rejected`).
    pub reports: Family<Labels, Counter>,
    /// Time to validate and store one snapshot or delta.
    pub report_seconds: Histogram,
    /// Time of one inventory write to the store.
    pub store_write_seconds: Histogram,
    /// Member clusters by health, refreshed at each scrape.
    pub clusters: Family<Labels, Gauge>,
    /// 1 when this replica leads the store.
    pub leader: Gauge,
    /// Current Raft term.
    pub leader_term: Gauge,
    /// One counter per message kind, looked up without allocating (thousands per second).
    kinds: Vec<(&'static str, Counter)>,
}

/// Message kinds counted in `agent_messages`.
const KINDS: [&str; 6] = [
    "snapshot",
    "delta",
    "heartbeat",
    "leave",
    "rejected",
    "other",
];

impl HubMetrics {
    /// Register every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("flotilla_hub");
        let agents_connected = Gauge::default();
        let reports = Family::<Labels, Counter>::default();
        let report_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let store_write_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let clusters = Family::<Labels, Gauge>::default();
        let leader = Gauge::default();
        let leader_term = Gauge::default();
        registry.register(
            "agents_connected",
            "Agent streams open on this replica",
            agents_connected.clone(),
        );
        registry.register(
            "agent_messages",
            "Agent messages received, by kind",
            reports.clone(),
        );
        registry.register(
            "report_processing_seconds",
            "Time to validate and store a snapshot or delta",
            report_seconds.clone(),
        );
        registry.register(
            "store_write_seconds",
            "Time of one inventory write to the store",
            store_write_seconds.clone(),
        );
        registry.register(
            "clusters",
            "Member clusters by health (this replica's view)",
            clusters.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica leads the store",
            leader.clone(),
        );
        registry.register(
            "leader_term",
            "Term of the current leadership (Raft term, or the etcd leader key's revision)",
            leader_term.clone(),
        );
        let kinds = KINDS
            .iter()
            .map(|k| {
                (
                    *k,
                    reports
                        .get_or_create(&vec![("kind".into(), k.to_string())])
                        .clone(),
                )
            })
            .collect();
        Arc::new(Self {
            kinds,
            registry,
            agents_connected,
            reports,
            report_seconds,
            store_write_seconds,
            clusters,
            leader,
            leader_term,
        })
    }

    /// Count one agent message (`kind` is one of `snapshot`, `delta`, `heartbeat`, `leave`,
    /// `rejected`; anything else counts as `other`).
    pub fn message(&self, kind: &str) {
        let counter = self
            .kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .or_else(|| self.kinds.last())
            .map(|(_, c)| c);
        if let Some(c) = counter {
            c.inc();
        }
    }
}
