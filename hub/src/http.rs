//! The hub's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use flotilla_api::convert::fleet::health_from_wire;
use flotilla_raft_store::StoreNode;
use prometheus_client::registry::Registry;

use crate::controllers::Leadership;
use crate::fleet::view::FleetView;
use crate::metrics::HubMetrics;

/// `/metrics`, `/healthz`, `/readyz` for a hub replica.
pub struct HubProbe {
    /// Metrics.
    pub metrics: Arc<HubMetrics>,
    /// Fleet view.
    pub view: Arc<FleetView>,
    /// Store member.
    pub node: StoreNode,
}

impl flotilla_api::http::Probe for HubProbe {
    fn refresh(&self) {
        let mut counts = std::collections::BTreeMap::<&str, i64>::new();
        for h in ["Joining", "Ready", "Degraded", "Unreachable", "Left"] {
            counts.insert(h, 0);
        }
        for c in self.view.clusters() {
            if let Some(h) = health_from_wire(c.health) {
                let name = match h {
                    flotilla_core::health::Health::Joining => "Joining",
                    flotilla_core::health::Health::Ready => "Ready",
                    flotilla_core::health::Health::Degraded => "Degraded",
                    flotilla_core::health::Health::Unreachable => "Unreachable",
                    flotilla_core::health::Health::Left => "Left",
                };
                *counts.entry(name).or_default() += 1;
            }
        }
        for (h, n) in counts {
            self.metrics
                .clusters
                .get_or_create(&vec![("health".into(), h.into())])
                .set(n);
        }
        let status = self.node.status();
        self.metrics
            .raft_leader
            .set(i64::from(self.node.is_leader()));
        self.metrics.raft_term.set(status.term as i64);
    }

    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn ready(&self) -> Result<(), String> {
        if self.node.leader().is_none() {
            return Err("the store has no leader".into());
        }
        if !self.view.is_loaded() {
            return Err("the fleet view has not loaded yet".into());
        }
        Ok(())
    }
}
