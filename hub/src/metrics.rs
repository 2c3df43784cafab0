//! Hub metrics (Prometheus, on the HTTP port): agents, clusters by health, report rate and
//! processing latency, store write latency, Raft leadership and term, and the fleet's GPUs
//! (per cluster, pool, product and MIG profile; per node only when asked), which every
//! replica exports from its own view.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A series' labels, in order.
pub(crate) type Labels = Vec<(String, String)>;

use crate::fleet::view::FleetView;

/// The fleet's GPU series, encoded from the view at scrape time (a consistent snapshot, no
/// stale series left behind when a cluster or pool goes).
#[derive(Debug)]
struct FleetGpus {
    view: Arc<FleetView>,
    per_node: bool,
}

impl std::fmt::Debug for FleetView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetView")
    }
}

/// One gauge family from rows of labels and values, encoded at scrape time.
pub(crate) fn gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const HEALTH_STATES: [(i32, &str); 5] = [
    (1, "Joining"),
    (2, "Ready"),
    (3, "Degraded"),
    (4, "Unreachable"),
    (5, "Left"),
];

impl Collector for FleetGpus {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let clusters = self.view.gpu_rows();
        let now = unix_ms_now();
        type Pick = fn(&flotilla_core::gpu_metrics::PoolGpus) -> i64;
        let pool_metrics: [(&str, &str, Pick); 8] = [
            (
                "fleet_gpus_physical",
                "Physical GPUs (of nodes that say how many)",
                |p| p.physical,
            ),
            (
                "fleet_gpus_allocatable",
                "Physical GPUs the nodes can hand out",
                |p| p.allocatable,
            ),
            (
                "fleet_gpus_allocated",
                "Allocatable GPUs with something in use",
                |p| p.allocated,
            ),
            (
                "fleet_gpus_free",
                "Whole GPUs a pod can still request, on usable nodes",
                |p| p.free,
            ),
            (
                "fleet_gpus_idle",
                "Physical GPUs with nothing in use (lower bound), on usable nodes",
                |p| p.idle,
            ),
            ("fleet_gpus_failed", "Failed GPUs", |p| p.failed),
            (
                "fleet_gpu_shared_replicas",
                "Time-sliced/MPS GPU replicas advertised",
                |p| p.shared_replicas,
            ),
            (
                "fleet_gpu_shared_replicas_free",
                "Shared GPU replicas free on usable nodes",
                |p| p.shared_replicas_free,
            ),
        ];
        let labels = |c: &str, p: &flotilla_core::gpu_metrics::PoolGpus| -> Labels {
            vec![
                ("cluster".into(), c.to_string()),
                ("pool".into(), p.pool.clone()),
                ("product".into(), p.product.clone()),
            ]
        };
        for (name, help, pick) in pool_metrics {
            let rows: Vec<(Labels, i64)> = clusters
                .iter()
                .flat_map(|c| c.pools.iter().map(move |p| (labels(&c.name, p), pick(p))))
                .collect();
            gauges(&mut enc, name, help, &rows)?;
        }
        for (name, help, free) in [
            (
                "fleet_mig_slices",
                "MIG slices advertised, by profile",
                false,
            ),
            (
                "fleet_mig_slices_free",
                "MIG slices free on usable nodes, by profile",
                true,
            ),
        ] {
            let mut rows = Vec::new();
            for c in &clusters {
                for p in c.pools.iter() {
                    for (profile, advertised, available) in &p.mig_slices {
                        let mut l = labels(&c.name, p);
                        l.push(("profile".into(), profile.clone()));
                        rows.push((l, if free { *available } else { *advertised }));
                    }
                }
            }
            gauges(&mut enc, name, help, &rows)?;
        }
        let health: Vec<(Labels, i64)> = clusters
            .iter()
            .flat_map(|c| {
                HEALTH_STATES.iter().map(move |(v, s)| {
                    let l = vec![
                        ("cluster".into(), c.name.clone()),
                        ("state".into(), s.to_string()),
                    ];
                    (l, i64::from(c.health == *v))
                })
            })
            .collect();
        gauges(
            &mut enc,
            "fleet_cluster_health",
            "1 for the cluster's health state, 0 for the others",
            &health,
        )?;
        let age: Vec<(Labels, i64)> = clusters
            .iter()
            .filter(|c| c.updated_at_unix_ms > 0)
            .map(|c| {
                let l = vec![("cluster".into(), c.name.clone())];
                (l, ((now - c.updated_at_unix_ms) / 1000).max(0))
            })
            .collect();
        gauges(
            &mut enc,
            "fleet_inventory_age_seconds",
            "Seconds since the cluster's stored inventory last changed",
            &age,
        )?;
        if self.per_node {
            self.encode_nodes(&mut enc)?;
        }
        Ok(())
    }
}

impl FleetGpus {
    /// Per-node series (`--metrics-per-node`): one inventory decoded at a time.
    fn encode_nodes(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        type Pick = fn(&flotilla_api::v1::NodeInventory) -> i64;
        let picks: [(&str, &str, Pick); 4] = [
            ("fleet_node_gpus_physical", "Physical GPUs of a node", |n| {
                n.physical_gpus
            }),
            (
                "fleet_node_gpus_free",
                "Whole GPUs a pod can still request on a node",
                |n| n.free_gpus,
            ),
            (
                "fleet_node_gpus_idle",
                "Physical GPUs with nothing in use on a node",
                |n| n.idle_gpus,
            ),
            ("fleet_node_gpus_failed", "Failed GPUs of a node", |n| {
                n.failed_gpus
            }),
        ];
        let mut rows: Vec<Vec<(Labels, i64)>> = vec![Vec::new(); picks.len()];
        for name in self.view.inventory_names() {
            let Some(inv) = self.view.inventory(&name) else {
                continue;
            };
            for n in &inv.nodes {
                let l: Labels = vec![
                    ("cluster".into(), name.clone()),
                    ("pool".into(), n.pool.clone()),
                    ("node".into(), n.name.clone()),
                ];
                for (i, (_, _, pick)) in picks.iter().enumerate() {
                    rows[i].push((l.clone(), pick(n)));
                }
            }
        }
        for ((name, help, _), rows) in picks.iter().zip(rows) {
            gauges(enc, name, help, &rows)?;
        }
        Ok(())
    }
}

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
    /// Audit records dropped because the writer's queue was full.
    pub audit_dropped: Counter,
    /// Requests and agent messages refused by authentication, authorization or a limit.
    pub denied: Counter,
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
    /// Register every metric; the fleet's GPU series come from `view` at each scrape, and
    /// `collectors` (campaigns) add theirs.
    pub fn new(
        view: Arc<FleetView>,
        per_node: bool,
        collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("flotilla_hub");
        registry.register_collector(Box::new(FleetGpus { view, per_node }));
        for c in collectors {
            registry.register_collector(c);
        }
        let agents_connected = Gauge::default();
        let reports = Family::<Labels, Counter>::default();
        let report_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let store_write_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let clusters = Family::<Labels, Gauge>::default();
        let leader = Gauge::default();
        let leader_term = Gauge::default();
        let audit_dropped = Counter::default();
        let denied = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the store fell behind (see docs/security.md)",
            audit_dropped.clone(),
        );
        registry.register(
            "denied",
            "Requests and agent messages refused (authentication, role, limit, rate)",
            denied.clone(),
        );
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
            audit_dropped,
            denied,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mirror::Subscriber;
    use crate::store::records::Change;
    use flotilla_api::v1;
    use prost::Message;

    fn text(m: &HubMetrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        out
    }

    #[test]
    fn gpu_series_follow_the_view_and_per_node_series_only_when_asked() {
        let view = FleetView::new();
        let node = |name: &str| v1::NodeInventory {
            name: name.into(),
            pool: "a100".into(),
            ready: true,
            schedulable: true,
            product: "NVIDIA-A100-SXM4-80GB".into(),
            physical_gpus: 8,
            idle_gpus: 8,
            resources: vec![v1::GpuResource {
                name: "nvidia.com/mig-1g.10gb".into(),
                vendor: v1::GpuVendor::Nvidia as i32,
                unit: v1::GpuUnitKind::MigSlice as i32,
                mig_profile: "1g.10gb".into(),
                capacity: 56,
                allocatable: 56,
                allocated: 6,
                free: 50,
                ..Default::default()
            }],
            condition: v1::GpuCondition::Healthy as i32,
            ..Default::default()
        };
        let nodes = vec![node("n1"), node("n2")];
        // Pool totals as the leader computes them for the stored record.
        let core = flotilla_api::convert::fleet::nodes_from_wire(
            &nodes,
            "n",
            &flotilla_api::convert::fleet::ReportLimits::default(),
        )
        .unwrap();
        let inv = v1::Inventory {
            cluster: "c".into(),
            nodes,
            pools: flotilla_core::inventory::pools(&core)
                .iter()
                .map(flotilla_api::convert::fleet::pool_to_wire)
                .collect(),
            updated_at_unix_ms: 1,
        };
        let cluster = v1::Cluster {
            name: "c".into(),
            health: v1::ClusterHealth::Degraded as i32,
            ..Default::default()
        };
        view.reset(
            1,
            vec![
                Change::Cluster {
                    name: "c".into(),
                    record: Some(Box::new(cluster)),
                },
                Change::Inventory {
                    name: "c".into(),
                    encoded: Some(inv.encode_to_vec().into()),
                },
            ],
        );
        let pool = r#"cluster="c",pool="a100",product="NVIDIA-A100-SXM4-80GB""#;
        let plain = text(&HubMetrics::new(view.clone(), false, vec![]));
        for line in [
            format!("flotilla_hub_fleet_gpus_physical{{{pool}}} 16\n"),
            format!("flotilla_hub_fleet_gpus_free{{{pool}}} 0\n"),
            format!("flotilla_hub_fleet_mig_slices{{{pool},profile=\"1g.10gb\"}} 112\n"),
            format!("flotilla_hub_fleet_mig_slices_free{{{pool},profile=\"1g.10gb\"}} 100\n"),
            "flotilla_hub_fleet_cluster_health{cluster=\"c\",state=\"Degraded\"} 1\n".into(),
        ] {
            assert!(plain.contains(&line), "{line}\n{plain}");
        }
        assert!(!plain.contains("fleet_node_gpus"));
        let per_node = text(&HubMetrics::new(view, true, vec![]));
        assert!(
            per_node.contains(
                "flotilla_hub_fleet_node_gpus_physical{cluster=\"c\",pool=\"a100\",node=\"n2\"} 8\n"
            ),
            "{per_node}"
        );
    }
}

#[cfg(test)]
mod dashboard {
    use super::*;

    /// The shipped Grafana dashboard queries only series the hub exports.
    #[test]
    fn the_grafana_dashboard_uses_exported_metrics() {
        let text = include_str!("../../deploy/grafana/flotilla-fleet-gpus.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
        let mut exported = String::new();
        prometheus_client::encoding::text::encode(
            &mut exported,
            &HubMetrics::new(FleetView::new(), true, vec![]).registry,
        )
        .unwrap();
        let mut exprs = Vec::new();
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                exprs.push(t["expr"].as_str().unwrap().to_string());
            }
        }
        assert!(exprs.len() >= 10, "{exprs:?}");
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("flotilla_hub_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&format!("# TYPE {name} ")),
                    "the dashboard queries {name}, which the hub does not export"
                );
                rest = &rest[i + name.len()..];
            }
        }
    }
}
