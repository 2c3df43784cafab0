//! The hub's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use flotilla_api::convert::fleet::health_from_wire;
use prometheus_client::registry::Registry;

use crate::controllers::Leadership;
use crate::fleet::view::FleetView;
use crate::metrics::HubMetrics;
use crate::store::backend::HubStore;

/// `/metrics`, `/healthz`, `/readyz` for a hub replica.
pub struct HubProbe {
    /// Metrics.
    pub metrics: Arc<HubMetrics>,
    /// Fleet view.
    pub view: Arc<FleetView>,
    /// The store (and who leads).
    pub store: HubStore,
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
        self.metrics.leader.set(i64::from(self.store.is_leader()));
        self.metrics.leader_term.set(self.store.term() as i64);
    }

    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn ready(&self) -> Result<(), String> {
        if !self.store.leader_known() {
            return Err(format!("the {} store has no leader", self.store.kind()));
        }
        if !self.view.is_loaded() {
            return Err("the fleet view has not loaded yet".into());
        }
        Ok(())
    }
}
