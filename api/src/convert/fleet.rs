//! Fleet wire types ↔ `flotilla_core` inventory and health, with the edge validation every
//! agent report goes through: limits, known enum values, no negative quantities, DNS-label
//! names. A malformed report (missing names, unknown enum values, too many nodes) is
//! rejected whole, naming the field; a node whose numbers make no sense is kept with the
//! reason, and counts for nothing.

use flotilla_core::health::{Health, Signals};
use flotilla_core::inventory::{self as inv, GpuCondition, GpuUnit, Vendor};
use flotilla_core::membership::{ClusterRecord, HistoryEntry, Identity};

use crate::v1;

/// A report field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// Field path, e.g. `snapshot.nodes[3].resources[0].capacity`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Invalid {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// `INVALID_ARGUMENT` naming the field (also in the `flotilla-field` metadata).
    pub fn to_status(&self) -> tonic::Status {
        let mut s = tonic::Status::invalid_argument(self.to_string());
        if let Ok(v) = self.field.parse() {
            s.metadata_mut().insert(super::kv::ERROR_FIELD_KEY, v);
        }
        s
    }
}

/// Size limits on agent reports (hub flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLimits {
    /// Nodes per cluster.
    pub max_nodes: usize,
    /// GPU resources per node.
    pub max_resources_per_node: usize,
    /// Physical GPUs per node.
    pub max_gpus_per_node: i64,
    /// Bytes of any name or label value.
    pub max_string_bytes: usize,
}

impl Default for ReportLimits {
    fn default() -> Self {
        Self {
            max_nodes: 5_000,
            max_resources_per_node: 32,
            max_gpus_per_node: 64,
            max_string_bytes: 253,
        }
    }
}

impl ReportLimits {
    /// No limits: for reading records that were validated when written.
    pub fn unlimited() -> Self {
        Self {
            max_nodes: usize::MAX,
            max_resources_per_node: usize::MAX,
            max_gpus_per_node: i64::MAX,
            max_string_bytes: usize::MAX,
        }
    }
}

/// Whether `s` is an RFC 1123 DNS label (cluster names must be).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Check a cluster name.
pub fn cluster_name(field: &str, name: &str) -> Result<(), Invalid> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            format!("{name:?} is not a DNS label (lowercase letters, digits, '-', at most 63)"),
        ))
    }
}

fn vendor_to_wire(v: Vendor) -> v1::GpuVendor {
    match v {
        Vendor::Nvidia => v1::GpuVendor::Nvidia,
        Vendor::Amd => v1::GpuVendor::Amd,
        Vendor::Intel => v1::GpuVendor::Intel,
    }
}

fn condition_to_wire(c: GpuCondition) -> v1::GpuCondition {
    match c {
        GpuCondition::Healthy => v1::GpuCondition::Healthy,
        GpuCondition::NotAdvertised => v1::GpuCondition::NotAdvertised,
        GpuCondition::Degraded => v1::GpuCondition::Degraded,
        GpuCondition::Failed => v1::GpuCondition::Failed,
    }
}

/// Core resource → wire.
pub fn resource_to_wire(r: &inv::GpuResource) -> v1::GpuResource {
    let (unit, mig_profile, shared_replicas) = match &r.unit {
        GpuUnit::Whole => (v1::GpuUnitKind::Whole, String::new(), 0),
        GpuUnit::MigSlice(p) => (v1::GpuUnitKind::MigSlice, p.clone(), 0),
        GpuUnit::Shared(k) => (v1::GpuUnitKind::Shared, String::new(), *k),
        GpuUnit::Partition => (v1::GpuUnitKind::Partition, String::new(), 0),
    };
    v1::GpuResource {
        name: r.name.clone(),
        vendor: vendor_to_wire(r.vendor) as i32,
        unit: unit as i32,
        mig_profile,
        shared_replicas,
        capacity: r.capacity,
        allocatable: r.allocatable,
        allocated: r.allocated,
        free: r.free,
    }
}

/// Core node → wire.
pub fn node_to_wire(n: &inv::NodeInventory) -> v1::NodeInventory {
    v1::NodeInventory {
        name: n.name.clone(),
        pool: n.pool.clone().unwrap_or_default(),
        ready: n.ready,
        schedulable: n.schedulable,
        taints: n
            .taints
            .iter()
            .map(|t| v1::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: t.effect.clone(),
            })
            .collect(),
        region: n.region.clone().unwrap_or_default(),
        zone: n.zone.clone().unwrap_or_default(),
        instance_type: n.instance_type.clone().unwrap_or_default(),
        kubelet_version: n.kubelet_version.clone(),
        product: n.product.clone().unwrap_or_default(),
        family: n.family.clone().unwrap_or_default(),
        gpu_memory_mib: n.gpu_memory_mib.unwrap_or(0),
        physical_gpus: n.physical_gpus.unwrap_or(0),
        physical_unknown: n.physical_gpus.is_none(),
        free_gpus: n.free_gpus,
        idle_gpus: n.idle_gpus,
        failed_gpus: n.failed_gpus,
        resources: n.resources.iter().map(resource_to_wire).collect(),
        condition: condition_to_wire(n.condition) as i32,
        problem: n.problem.clone().unwrap_or_default(),
    }
}

/// Core pool → wire.
pub fn pool_to_wire(p: &inv::PoolInventory) -> v1::PoolInventory {
    v1::PoolInventory {
        name: p.name.clone(),
        nodes: p.nodes,
        usable_nodes: p.usable_nodes,
        products: p.products.clone(),
        physical_gpus: p.physical_gpus,
        physical_unknown_nodes: p.physical_unknown_nodes,
        free_gpus: p.free_gpus,
        idle_gpus: p.idle_gpus,
        failed_gpus: p.failed_gpus,
        allocatable_gpus: p.allocatable_gpus,
        allocated_gpus: p.allocated_gpus,
        resources: p.resources.iter().map(resource_to_wire).collect(),
    }
}

/// A stored pool record → core (validated when written; a resource that no longer
/// validates is left out).
pub fn pool_from_wire(p: &v1::PoolInventory) -> inv::PoolInventory {
    let limits = ReportLimits::unlimited();
    inv::PoolInventory {
        name: p.name.clone(),
        nodes: p.nodes,
        usable_nodes: p.usable_nodes,
        products: p.products.clone(),
        physical_gpus: p.physical_gpus,
        physical_unknown_nodes: p.physical_unknown_nodes,
        free_gpus: p.free_gpus,
        idle_gpus: p.idle_gpus,
        failed_gpus: p.failed_gpus,
        allocatable_gpus: p.allocatable_gpus,
        allocated_gpus: p.allocated_gpus,
        resources: (p.resources.iter())
            .filter_map(|r| resource_from_wire(r, "stored", &limits).ok())
            .collect(),
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// A field path built only when there is an error to report (validation runs on every
/// report, and formatting paths eagerly was a measurable share of the hub's CPU).
type At<'a> = &'a dyn Fn() -> String;

fn text(field: impl FnOnce() -> String, s: &str, limits: &ReportLimits) -> Result<(), Invalid> {
    if s.len() > limits.max_string_bytes {
        return Err(Invalid::new(
            field(),
            format!("longer than {} bytes", limits.max_string_bytes),
        ));
    }
    Ok(())
}

fn non_negative(field: impl FnOnce() -> String, v: i64) -> Result<(), Invalid> {
    if v < 0 {
        Err(Invalid::new(
            field(),
            format!("must not be negative (got {v})"),
        ))
    } else {
        Ok(())
    }
}

/// Wire resource → core, validated.
pub fn resource_from_wire(
    r: &v1::GpuResource,
    at: &str,
    limits: &ReportLimits,
) -> Result<inv::GpuResource, Invalid> {
    resource_at(r, &|| at.to_string(), limits)
}

fn resource_at(
    r: &v1::GpuResource,
    at: At<'_>,
    limits: &ReportLimits,
) -> Result<inv::GpuResource, Invalid> {
    if r.name.is_empty() {
        return Err(Invalid::new(format!("{}.name", at()), "is required"));
    }
    text(|| format!("{}.name", at()), &r.name, limits)?;
    let vendor = match v1::GpuVendor::try_from(r.vendor) {
        Ok(v1::GpuVendor::Nvidia) => Vendor::Nvidia,
        Ok(v1::GpuVendor::Amd) => Vendor::Amd,
        Ok(v1::GpuVendor::Intel) => Vendor::Intel,
        _ => {
            return Err(Invalid::new(
                format!("{}.vendor", at()),
                format!("unknown GPU vendor {}", r.vendor),
            ));
        }
    };
    let unit = match v1::GpuUnitKind::try_from(r.unit) {
        Ok(v1::GpuUnitKind::Whole) => GpuUnit::Whole,
        Ok(v1::GpuUnitKind::MigSlice) => GpuUnit::MigSlice(r.mig_profile.clone()),
        Ok(v1::GpuUnitKind::Shared) => GpuUnit::Shared(r.shared_replicas.max(1)),
        Ok(v1::GpuUnitKind::Partition) => GpuUnit::Partition,
        _ => {
            return Err(Invalid::new(
                format!("{}.unit", at()),
                format!("unknown GPU unit kind {}", r.unit),
            ));
        }
    };
    Ok(inv::GpuResource {
        name: r.name.clone(),
        vendor,
        unit,
        capacity: r.capacity,
        allocatable: r.allocatable,
        allocated: r.allocated,
        free: r.free,
    })
}

/// Wire node → core, validated. `at` is the field path of this node.
pub fn node_from_wire(
    n: &v1::NodeInventory,
    at: &str,
    limits: &ReportLimits,
) -> Result<inv::NodeInventory, Invalid> {
    node_at(n, &|| at.to_string(), limits)
}

fn node_at(
    n: &v1::NodeInventory,
    at: At<'_>,
    limits: &ReportLimits,
) -> Result<inv::NodeInventory, Invalid> {
    if n.name.is_empty() {
        return Err(Invalid::new(format!("{}.name", at()), "is required"));
    }
    for (f, v) in [
        ("name", &n.name),
        ("pool", &n.pool),
        ("region", &n.region),
        ("zone", &n.zone),
        ("instance_type", &n.instance_type),
        ("kubelet_version", &n.kubelet_version),
        ("product", &n.product),
        ("family", &n.family),
    ] {
        text(|| format!("{}.{f}", at()), v, limits)?;
    }
    let condition = match v1::GpuCondition::try_from(n.condition) {
        Ok(v1::GpuCondition::Healthy) => GpuCondition::Healthy,
        Ok(v1::GpuCondition::NotAdvertised) => GpuCondition::NotAdvertised,
        Ok(v1::GpuCondition::Degraded) => GpuCondition::Degraded,
        Ok(v1::GpuCondition::Failed) => GpuCondition::Failed,
        _ => {
            return Err(Invalid::new(
                format!("{}.condition", at()),
                format!("unknown GPU condition {}", n.condition),
            ));
        }
    };
    let too_many = n.resources.len() > limits.max_resources_per_node;
    let resources = n
        .resources
        .iter()
        .take(limits.max_resources_per_node)
        .enumerate()
        .map(|(i, r)| resource_at(r, &|| format!("{}.resources[{i}]", at()), limits))
        .collect::<Result<Vec<_>, _>>()?;
    let mut node = inv::NodeInventory {
        name: n.name.clone(),
        pool: opt(&n.pool),
        ready: n.ready,
        schedulable: n.schedulable,
        taints: n
            .taints
            .iter()
            .map(|t| inv::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: t.effect.clone(),
            })
            .collect(),
        region: opt(&n.region),
        zone: opt(&n.zone),
        instance_type: opt(&n.instance_type),
        kubelet_version: n.kubelet_version.clone(),
        product: opt(&n.product),
        family: opt(&n.family),
        gpu_memory_mib: (n.gpu_memory_mib > 0).then_some(n.gpu_memory_mib),
        physical_gpus: (!n.physical_unknown).then_some(n.physical_gpus),
        free_gpus: n.free_gpus,
        idle_gpus: n.idle_gpus,
        failed_gpus: n.failed_gpus,
        resources,
        condition,
        problem: opt(&n.problem),
    };
    text(|| format!("{}.problem", at()), &n.problem, limits)?;
    let problem = if too_many {
        Some(format!(
            "{} GPU resources exceed the limit of {}",
            n.resources.len(),
            limits.max_resources_per_node
        ))
    } else {
        numbers_problem(n, limits)
    };
    if let Some(p) = problem {
        node.quarantine(p);
    }
    Ok(node)
}

/// Why a node's numbers cannot be true (negative, or above the per-node GPU limit), naming
/// the field. The node is then kept with the reason instead of failing the whole report.
fn numbers_problem(n: &v1::NodeInventory, limits: &ReportLimits) -> Option<String> {
    let node_fields = [
        ("physical_gpus", n.physical_gpus),
        ("free_gpus", n.free_gpus),
        ("idle_gpus", n.idle_gpus),
        ("failed_gpus", n.failed_gpus),
    ];
    if let Some((f, v)) = node_fields.iter().find(|(_, v)| *v < 0) {
        return Some(format!("{f} is negative ({v})"));
    }
    for (i, r) in n.resources.iter().enumerate() {
        let fields = [
            ("capacity", r.capacity),
            ("allocatable", r.allocatable),
            ("allocated", r.allocated),
            ("free", r.free),
        ];
        if let Some((f, v)) = fields.iter().find(|(_, v)| *v < 0) {
            return Some(format!("resources[{i}].{f} is negative ({v})"));
        }
    }
    if n.physical_gpus > limits.max_gpus_per_node {
        return Some(format!(
            "physical_gpus {} exceeds the limit of {} GPUs per node",
            n.physical_gpus, limits.max_gpus_per_node
        ));
    }
    None
}

/// A whole node list (snapshot or delta upserts), validated: limits, duplicates, each node.
pub fn nodes_from_wire(
    nodes: &[v1::NodeInventory],
    at: &str,
    limits: &ReportLimits,
) -> Result<Vec<inv::NodeInventory>, Invalid> {
    if nodes.len() > limits.max_nodes {
        return Err(Invalid::new(
            at,
            format!(
                "{} nodes exceed the limit of {}",
                nodes.len(),
                limits.max_nodes
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        let path = || format!("{at}[{i}]");
        if !seen.insert(n.name.as_str()) {
            return Err(Invalid::new(
                format!("{}.name", path()),
                format!("duplicate node {:?}", n.name),
            ));
        }
        out.push(node_at(n, &path, limits)?);
    }
    Ok(out)
}

/// Core health → wire.
pub fn health_to_wire(h: Health) -> v1::ClusterHealth {
    match h {
        Health::Joining => v1::ClusterHealth::Joining,
        Health::Ready => v1::ClusterHealth::Ready,
        Health::Degraded => v1::ClusterHealth::Degraded,
        Health::Unreachable => v1::ClusterHealth::Unreachable,
        Health::Left => v1::ClusterHealth::Left,
    }
}

/// Wire health → core (`None` for unspecified or unknown values).
pub fn health_from_wire(h: i32) -> Option<Health> {
    Some(match v1::ClusterHealth::try_from(h).ok()? {
        v1::ClusterHealth::Joining => Health::Joining,
        v1::ClusterHealth::Ready => Health::Ready,
        v1::ClusterHealth::Degraded => Health::Degraded,
        v1::ClusterHealth::Unreachable => Health::Unreachable,
        v1::ClusterHealth::Left => Health::Left,
        v1::ClusterHealth::Unspecified => return None,
    })
}

/// A stored cluster record → core (an unknown health reads as Joining).
pub fn cluster_from_wire(c: &v1::Cluster) -> ClusterRecord {
    ClusterRecord {
        name: c.name.clone(),
        health: health_from_wire(c.health).unwrap_or(Health::Joining),
        health_reason: c.health_reason.clone(),
        identity: Identity {
            region: c.region.clone(),
            kubernetes_version: c.kubernetes_version.clone(),
            agent_version: c.agent_version.clone(),
            labels: c
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            campaigns: c.campaigns,
        },
        joined_at_unix_ms: c.joined_at_unix_ms,
        history: c
            .history
            .iter()
            .map(|h| HistoryEntry {
                from: health_from_wire(h.from),
                to: health_from_wire(h.to).unwrap_or(Health::Joining),
                reason: h.reason.clone(),
                at_unix_ms: h.at_unix_ms,
            })
            .collect(),
        inventory_incomplete: c.inventory_incomplete.clone(),
        networks: c.networks.clone(),
    }
}

/// Core cluster record → the stored wire record (totals are left to the fleet view).
pub fn cluster_to_wire(c: &ClusterRecord) -> v1::Cluster {
    v1::Cluster {
        name: c.name.clone(),
        health: health_to_wire(c.health) as i32,
        health_reason: c.health_reason.clone(),
        region: c.identity.region.clone(),
        kubernetes_version: c.identity.kubernetes_version.clone(),
        agent_version: c.identity.agent_version.clone(),
        labels: c
            .identity
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        joined_at_unix_ms: c.joined_at_unix_ms,
        history: c
            .history
            .iter()
            .map(|h| v1::HealthTransition {
                from: h
                    .from
                    .map_or(v1::ClusterHealth::Unspecified, health_to_wire)
                    as i32,
                to: health_to_wire(h.to) as i32,
                reason: h.reason.clone(),
                at_unix_ms: h.at_unix_ms,
            })
            .collect(),
        inventory_incomplete: c.inventory_incomplete.clone(),
        networks: c.networks.clone(),
        campaigns: c.identity.campaigns,
        ..Default::default()
    }
}

/// Most names a signal list may carry.
pub const MAX_SIGNAL_NAMES: usize = 20;

/// Wire signals → core, validated.
pub fn signals_from_wire(s: Option<&v1::HealthSignals>, at: &str) -> Result<Signals, Invalid> {
    let Some(s) = s else {
        return Ok(Signals::default());
    };
    non_negative(|| format!("{at}.gpus_failed"), s.gpus_failed)?;
    let list = |f: &str, v: &[String]| -> Result<Vec<String>, Invalid> {
        if v.len() > MAX_SIGNAL_NAMES {
            return Err(Invalid::new(
                format!("{at}.{f}"),
                format!("{} names exceed the limit of {MAX_SIGNAL_NAMES}", v.len()),
            ));
        }
        for (i, name) in v.iter().enumerate() {
            text(|| format!("{at}.{f}[{i}]"), name, &ReportLimits::default())?;
        }
        Ok(v.to_vec())
    };
    Ok(Signals {
        api_unreachable: s.api_unreachable,
        nodes_not_ready: s.nodes_not_ready,
        gpus_failed: s.gpus_failed,
        failed_nodes: list("failed_nodes", &s.failed_nodes)?,
        incomplete: list("incomplete", &s.incomplete)?,
        forbidden: list("forbidden", &s.forbidden)?,
    })
}

/// Core signals → wire.
pub fn signals_to_wire(s: &Signals) -> v1::HealthSignals {
    v1::HealthSignals {
        api_unreachable: s.api_unreachable,
        nodes_not_ready: s.nodes_not_ready,
        gpus_failed: s.gpus_failed,
        failed_nodes: s.failed_nodes.clone(),
        incomplete: s.incomplete.clone(),
        forbidden: s.forbidden.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> inv::NodeInventory {
        inv::NodeInventory {
            name: "n1".into(),
            pool: Some("h100".into()),
            ready: true,
            schedulable: true,
            taints: vec![inv::Taint {
                key: "nvidia.com/gpu".into(),
                value: "present".into(),
                effect: "NoSchedule".into(),
            }],
            region: Some("eu".into()),
            zone: None,
            instance_type: Some("nd96".into()),
            kubelet_version: "v1.34.2".into(),
            product: Some("NVIDIA-H100-80GB-HBM3".into()),
            family: Some("hopper".into()),
            gpu_memory_mib: Some(81559),
            physical_gpus: Some(8),
            free_gpus: 4,
            idle_gpus: 2,
            failed_gpus: 1,
            problem: None,
            resources: vec![
                inv::GpuResource {
                    name: "nvidia.com/gpu".into(),
                    vendor: Vendor::Nvidia,
                    unit: GpuUnit::Shared(4),
                    capacity: 32,
                    allocatable: 32,
                    allocated: 16,
                    free: 16,
                },
                inv::GpuResource {
                    name: "nvidia.com/mig-1g.10gb".into(),
                    vendor: Vendor::Nvidia,
                    unit: GpuUnit::MigSlice("1g.10gb".into()),
                    capacity: 7,
                    allocatable: 7,
                    allocated: 0,
                    free: 7,
                },
            ],
            condition: GpuCondition::Degraded,
        }
    }

    #[test]
    fn nodes_round_trip() {
        let mut n = node();
        let back = node_from_wire(&node_to_wire(&n), "n", &ReportLimits::default()).unwrap();
        assert_eq!(back, n);
        n.physical_gpus = None;
        n.condition = GpuCondition::Failed;
        let back = node_from_wire(&node_to_wire(&n), "n", &ReportLimits::default()).unwrap();
        assert_eq!(back, n, "an unknown GPU count stays unknown");
    }

    #[test]
    fn a_node_with_impossible_numbers_is_kept_with_the_reason() {
        let limits = ReportLimits::default();
        // (change, the reason names)
        type Change = fn(&mut v1::NodeInventory);
        let cases: [(Change, &str); 4] = [
            (
                |w| w.resources[1].capacity = -1,
                "resources[1].capacity is negative",
            ),
            (|w| w.free_gpus = -3, "free_gpus is negative"),
            (
                |w| w.physical_gpus = 1000,
                "exceeds the limit of 64 GPUs per node",
            ),
            (
                |w| w.resources = vec![w.resources[0].clone(); 40],
                "40 GPU resources exceed the limit of 32",
            ),
        ];
        for (change, reason) in cases {
            let mut w = node_to_wire(&node());
            change(&mut w);
            let mut other = node_to_wire(&node());
            other.name = "n2".into();
            let nodes = nodes_from_wire(&[w, other], "snapshot.nodes", &limits).unwrap();
            let bad = &nodes[0];
            assert!(
                bad.problem.as_deref().unwrap_or("").contains(reason),
                "{:?}",
                bad.problem
            );
            assert_eq!(
                (bad.physical_gpus, bad.free_gpus, bad.idle_gpus),
                (None, 0, 0)
            );
            assert_eq!(
                nodes[1],
                {
                    let mut n = node();
                    n.name = "n2".into();
                    n
                },
                "the rest of the report stands"
            );
        }
    }

    #[test]
    fn invalid_reports_name_the_field() {
        let limits = ReportLimits::default();
        let mut w = node_to_wire(&node());
        w.resources[1].unit = 42;
        let e = nodes_from_wire(&[w], "snapshot.nodes", &limits).unwrap_err();
        assert_eq!(e.field, "snapshot.nodes[0].resources[1].unit");
        let mut w = node_to_wire(&node());
        w.resources[0].vendor = 42;
        assert_eq!(
            node_from_wire(&w, "n", &limits).unwrap_err().field,
            "n.resources[0].vendor"
        );
        let mut w = node_to_wire(&node());
        w.condition = 9;
        assert_eq!(
            node_from_wire(&w, "n", &limits).unwrap_err().field,
            "n.condition"
        );
        let many = vec![node_to_wire(&node()); 2];
        let e = nodes_from_wire(&many, "s", &limits).unwrap_err();
        assert!(e.reason.contains("duplicate"), "{e}");
        let tight = ReportLimits {
            max_nodes: 1,
            ..limits
        };
        let mut two = vec![node_to_wire(&node()), node_to_wire(&node())];
        two[1].name = "n2".into();
        assert_eq!(nodes_from_wire(&two, "s", &tight).unwrap_err().field, "s");
        let status = e.to_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status
                .metadata()
                .get(crate::convert::kv::ERROR_FIELD_KEY)
                .unwrap(),
            "s[1].name"
        );
    }

    #[test]
    fn names_and_health() {
        assert!(cluster_name("hello.cluster", "gke-eu-1").is_ok());
        assert_eq!(
            cluster_name("hello.cluster", "Bad_Name").unwrap_err().field,
            "hello.cluster"
        );
        assert!(cluster_name("c", &"a".repeat(64)).is_err());
        for h in [
            Health::Joining,
            Health::Ready,
            Health::Degraded,
            Health::Unreachable,
            Health::Left,
        ] {
            assert_eq!(health_from_wire(health_to_wire(h) as i32), Some(h));
        }
        assert_eq!(health_from_wire(0), None);
        assert_eq!(health_from_wire(77), None);
        assert!(
            signals_from_wire(
                Some(&v1::HealthSignals {
                    gpus_failed: -1,
                    ..Default::default()
                }),
                "hb.signals"
            )
            .is_err()
        );
        let many = v1::HealthSignals {
            failed_nodes: vec!["n".into(); 21],
            ..Default::default()
        };
        assert_eq!(
            signals_from_wire(Some(&many), "hb.signals")
                .unwrap_err()
                .field,
            "hb.signals.failed_nodes"
        );
        let s = Signals {
            incomplete: vec!["pods".into()],
            forbidden: vec!["resourceslices".into()],
            failed_nodes: vec!["n1".into()],
            gpus_failed: 8,
            ..Default::default()
        };
        assert_eq!(
            signals_from_wire(Some(&signals_to_wire(&s)), "s").unwrap(),
            s
        );
    }

    #[test]
    fn cluster_records_round_trip() {
        let c = ClusterRecord {
            name: "a".into(),
            health: Health::Degraded,
            health_reason: "1 node(s) not Ready".into(),
            identity: Identity {
                region: "eu".into(),
                kubernetes_version: "v1.33.0".into(),
                agent_version: "0.1.0".into(),
                labels: [("tier".to_string(), "gold".to_string())].into(),
                campaigns: true,
            },
            joined_at_unix_ms: 7,
            history: vec![HistoryEntry {
                from: None,
                to: Health::Joining,
                reason: "joined the fleet".into(),
                at_unix_ms: 7,
            }],
            inventory_incomplete: vec!["pods".into()],
            networks: vec!["10.16.0.0/24".into()],
        };
        let w = cluster_to_wire(&c);
        assert_eq!(w.history[0].from, v1::ClusterHealth::Unspecified as i32);
        assert_eq!(cluster_from_wire(&w), c);
    }
}
