//! Agent metrics (Prometheus): watch events, report sizes, hub connection state.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ClusterWatch;

/// The agent's metric handles.
pub struct AgentMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// 1 while a hub session is established.
    pub hub_connected: Gauge,
    /// Hub sessions established.
    pub hub_connects: Counter,
    /// Nodes carried by each snapshot or delta sent.
    pub report_nodes: Histogram,
    /// Encoded bytes of each snapshot or delta sent.
    pub report_bytes: Histogram,
    watch_events: Gauge,
    api_reachable: Gauge,
}

impl AgentMetrics {
    /// Register every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("flotilla_agent");
        let hub_connected = Gauge::default();
        let hub_connects = Counter::default();
        let report_nodes = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let report_bytes = Histogram::new(exponential_buckets(64.0, 2.0, 18));
        let watch_events = Gauge::default();
        let api_reachable = Gauge::default();
        registry.register(
            "hub_connected",
            "1 while a hub session is established",
            hub_connected.clone(),
        );
        registry.register(
            "hub_connects",
            "Hub sessions established",
            hub_connects.clone(),
        );
        registry.register(
            "report_nodes",
            "Nodes carried by each snapshot or delta",
            report_nodes.clone(),
        );
        registry.register(
            "report_bytes",
            "Encoded size of each snapshot or delta",
            report_bytes.clone(),
        );
        registry.register(
            "watch_events",
            "Kubernetes watch events received",
            watch_events.clone(),
        );
        registry.register(
            "cluster_api_reachable",
            "1 when the cluster's API server answers",
            api_reachable.clone(),
        );
        Arc::new(Self {
            registry,
            hub_connected,
            hub_connects,
            report_nodes,
            report_bytes,
            watch_events,
            api_reachable,
        })
    }
}

/// `/metrics`, `/healthz`, `/readyz` for an agent.
pub struct AgentProbe {
    /// Metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The cluster watch.
    pub watch: ClusterWatch,
}

impl flotilla_api::http::Probe for AgentProbe {
    fn refresh(&self) {
        self.metrics.watch_events.set(self.watch.events() as i64);
        self.metrics
            .api_reachable
            .set(i64::from(self.watch.api_reachable()));
    }

    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn ready(&self) -> Result<(), String> {
        if self.metrics.hub_connected.get() == 0 {
            return Err("not connected to the hub".into());
        }
        Ok(())
    }
}
