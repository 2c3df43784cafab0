//! Exported services (MCS `ServiceExport`) and how the exports of one name/namespace from many
//! clusters merge into one fleet-wide service, by the MCS rules: the oldest export wins a
//! conflict, ports are the union, and every side of a conflict is marked. Pure.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Name and namespace of an exported service: the MCS "sameness" key across clusters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How an exported service is reached: one set of addresses, or each endpoint by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// A Service with a cluster IP: answered with addresses other clusters can reach.
    ClusterSetIp,
    /// `clusterIP: None`: answered with each ready endpoint.
    Headless,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterSetIp => "ClusterSetIP",
            Self::Headless => "Headless",
        })
    }
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lower-case label used in SRV names (`_tcp`).
    pub fn srv_label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    /// Port name; empty for the single unnamed port (no SRV record).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number.
    pub port: u16,
    /// `appProtocol`, if set.
    pub app_protocol: Option<String>,
}

/// Session affinity of a service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum SessionAffinity {
    /// None.
    #[default]
    None,
    /// `ClientIP`.
    ClientIp,
}

/// One endpoint of an exported service, as its EndpointSlice says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Address.
    pub address: IpAddr,
    /// `hostname` (headless services name endpoints by it), else empty.
    pub hostname: String,
    /// Zone, if known.
    pub zone: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

/// The service's own inference load, as the agent last sampled it from the export's pods
/// (vLLM metrics; averages over the sampled pods, as llm-d's pool metrics are).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct InferenceLoad {
    /// Mean `vllm:num_requests_waiting` over the sampled pods.
    pub queue_depth: f64,
    /// Mean `vllm:kv_cache_usage_perc` (0–1) over the sampled pods.
    pub kv_cache_usage: f64,
    /// Pods sampled.
    pub pods: u32,
    /// When the agent took the sample, in Unix milliseconds (hub clock: the receive time).
    pub sampled_at_unix_ms: i64,
}

/// One cluster's export of one service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Export {
    /// The exporting cluster.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Name (of both the ServiceExport and the Service).
    pub name: String,
    /// The service type; `None` when the export is not valid (see `invalid`).
    pub service_type: Option<ServiceType>,
    /// Ports.
    pub ports: Vec<Port>,
    /// The endpoints' own ports (from the EndpointSlices: resolved target ports).
    pub endpoint_ports: Vec<Port>,
    /// `spec.exportedLabels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.exportedAnnotations`.
    pub annotations: BTreeMap<String, String>,
    /// Session affinity.
    pub session_affinity: SessionAffinity,
    /// Addresses other clusters can reach the service at (LoadBalancer ingress, external IPs;
    /// the cluster IP only on a flat network).
    pub addresses: Vec<IpAddr>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The ServiceExport's `creationTimestamp`, Unix milliseconds: the oldest wins conflicts.
    pub created_at_unix_ms: i64,
    /// GPU pools the service's pods run on.
    pub gpu_pools: Vec<String>,
    /// Why the export is not valid (`NoService`, `InvalidServiceType`), else `None`.
    pub invalid: Option<InvalidReason>,
}

impl Export {
    /// Ready endpoints.
    pub fn ready_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.ready)
    }

    /// The service key.
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }
}

/// Why a ServiceExport is not valid (MCS `Valid` condition reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InvalidReason {
    /// No Service of that name in the namespace.
    NoService,
    /// An ExternalName Service cannot be exported.
    InvalidServiceType,
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoService => "NoService",
            Self::InvalidServiceType => "InvalidServiceType",
        })
    }
}

/// A property on which two exports of one service disagree (MCS `Conflict` reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConflictKind {
    /// A port of one name differs in protocol, number or appProtocol.
    Port,
    /// ClusterSetIP against Headless.
    Type,
    /// Session affinity differs.
    SessionAffinity,
    /// An exported label has different values.
    Labels,
    /// An exported annotation has different values.
    Annotations,
}

impl ConflictKind {
    /// The MCS condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Port => "PortConflict",
            Self::Type => "TypeConflict",
            Self::SessionAffinity => "SessionAffinityConflict",
            Self::Labels => "LabelsConflict",
            Self::Annotations => "AnnotationsConflict",
        }
    }
}

/// What the fleet says back to one export: the MCS conditions its ServiceExport should carry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExportStatus {
    /// Conflicts this export is part of, each with a human message.
    pub conflicts: BTreeMap<ConflictKind, String>,
    /// Whether its endpoints are in the merged service (a type conflict leaves them out).
    pub included: bool,
}

impl ExportStatus {
    /// The `Conflict` condition's reason: the kinds joined with commas, or `NoConflicts`.
    pub fn conflict_reason(&self) -> String {
        match self.conflicts.is_empty() {
            true => "NoConflicts".into(),
            false => self
                .conflicts
                .keys()
                .map(|k| k.reason())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The `Conflict` condition's message.
    pub fn conflict_message(&self) -> String {
        self.conflicts
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One service as the fleet sees it: the merge of every cluster's export.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Service {
    /// Name and namespace.
    pub key: Option<ServiceKey>,
    /// The winning (oldest) export's type.
    pub service_type: Option<ServiceType>,
    /// The union of ports, merged by name; on a conflict the oldest export's definition.
    pub ports: Vec<Port>,
    /// The oldest export's session affinity.
    pub session_affinity: SessionAffinity,
    /// Exported labels (the union; on a conflict the oldest export's value).
    pub labels: BTreeMap<String, String>,
    /// Exported annotations (likewise).
    pub annotations: BTreeMap<String, String>,
    /// Exports in the merged service, oldest first (a type conflict leaves an export out).
    pub exports: Vec<Export>,
    /// What each exporting cluster's ServiceExport should say, by cluster (valid exports only).
    pub status: BTreeMap<String, ExportStatus>,
}

impl Service {
    /// Whether any export took part in a conflict.
    pub fn has_conflicts(&self) -> bool {
        self.status.values().any(|s| !s.conflicts.is_empty())
    }

    /// The export from `cluster`, if it is in the merged service.
    pub fn export(&self, cluster: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.cluster == cluster)
    }
}

/// Merge valid exports into services by the MCS rules. Invalid exports are left out (their own
/// cluster reports `Valid=False`). Precedence: the oldest `creationTimestamp`, then the cluster
/// name, so every replica merges alike.
pub fn aggregate<'a>(
    exports: impl IntoIterator<Item = &'a Export>,
) -> BTreeMap<ServiceKey, Service> {
    let mut by_key: BTreeMap<ServiceKey, Vec<&Export>> = BTreeMap::new();
    for e in exports {
        if e.invalid.is_none() && e.service_type.is_some() {
            by_key.entry(e.key()).or_default().push(e);
        }
    }
    by_key
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| {
                (a.created_at_unix_ms, &a.cluster).cmp(&(b.created_at_unix_ms, &b.cluster))
            });
            let s = merge(k.clone(), &v);
            (k, s)
        })
        .collect()
}

fn merge(key: ServiceKey, exports: &[&Export]) -> Service {
    let oldest = exports[0];
    let mut s = Service {
        key: Some(key),
        service_type: oldest.service_type,
        session_affinity: oldest.session_affinity,
        ..Service::default()
    };
    let mut ports: BTreeMap<&str, (&Port, &str)> = BTreeMap::new();
    let mut labels: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    let mut annotations: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    // Conflicts found, by (cluster, kind): both sides are marked, so the winner's entry is
    // collected too.
    let mut conflicts: BTreeMap<&str, BTreeMap<ConflictKind, String>> = BTreeMap::new();
    fn mark<'a>(
        conflicts: &mut BTreeMap<&'a str, BTreeMap<ConflictKind, String>>,
        a: &'a str,
        b: &'a str,
        kind: ConflictKind,
        msg: String,
    ) {
        conflicts
            .entry(a)
            .or_default()
            .entry(kind)
            .or_insert_with(|| msg.clone());
        conflicts.entry(b).or_default().entry(kind).or_insert(msg);
    }
    let winner = oldest.cluster.as_str();
    for e in exports {
        let c = e.cluster.as_str();
        if e.service_type != s.service_type {
            mark(
                &mut conflicts,
                winner,
                c,
                ConflictKind::Type,
                format!(
                    "type {} in cluster {c} conflicts with {} in cluster {winner}, the oldest export; {c}'s endpoints are left out",
                    fmt_type(e.service_type),
                    fmt_type(s.service_type)
                ),
            );
            s.status.insert(
                c.to_string(),
                ExportStatus {
                    included: false,
                    ..Default::default()
                },
            );
            continue;
        }
        s.status.insert(
            c.to_string(),
            ExportStatus {
                included: true,
                ..Default::default()
            },
        );
        if e.session_affinity != s.session_affinity {
            mark(
                &mut conflicts,
                winner,
                c,
                ConflictKind::SessionAffinity,
                format!(
                    "session affinity {:?} in cluster {c} conflicts with {:?} in cluster {winner}, the oldest export",
                    e.session_affinity, s.session_affinity
                ),
            );
        }
        for p in &e.ports {
            match ports.get(p.name.as_str()) {
                None => {
                    ports.insert(&p.name, (p, c));
                }
                Some((q, owner)) if !same_port(p, q) => {
                    mark(
                        &mut conflicts,
                        owner,
                        c,
                        ConflictKind::Port,
                        format!(
                            "port {:?} is {}/{} in cluster {c} but {}/{} in cluster {owner}, the oldest export",
                            p.name, p.port, p.protocol, q.port, q.protocol
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        for (map, out, kind, what) in [
            (&e.labels, &mut labels, ConflictKind::Labels, "label"),
            (
                &e.annotations,
                &mut annotations,
                ConflictKind::Annotations,
                "annotation",
            ),
        ] {
            for (k, v) in map {
                match out.get(k.as_str()) {
                    None => {
                        out.insert(k, (v, c));
                    }
                    Some((w, owner)) if *w != v.as_str() => mark(
                        &mut conflicts,
                        owner,
                        c,
                        kind,
                        format!(
                            "{what} {k}={v} in cluster {c} conflicts with {k}={w} in cluster {owner}, the oldest export"
                        ),
                    ),
                    Some(_) => {}
                }
            }
        }
        s.exports.push((*e).clone());
    }
    for (c, kinds) in conflicts {
        if let Some(st) = s.status.get_mut(c) {
            st.conflicts.extend(kinds);
        }
    }
    s.ports = ports.into_values().map(|(p, _)| p.clone()).collect();
    s.ports
        .sort_by(|a, b| (&a.name, a.port).cmp(&(&b.name, b.port)));
    s.labels = labels
        .into_iter()
        .map(|(k, (v, _))| (k.to_string(), v.to_string()))
        .collect();
    s.annotations = annotations
        .into_iter()
        .map(|(k, (v, _))| (k.to_string(), v.to_string()))
        .collect();
    s
}

fn same_port(a: &Port, b: &Port) -> bool {
    a.protocol == b.protocol && a.port == b.port && a.app_protocol == b.app_protocol
}

fn fmt_type(t: Option<ServiceType>) -> String {
    t.map_or_else(|| "none".into(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, port: u16) -> Port {
        Port {
            name: name.into(),
            protocol: Protocol::Tcp,
            port,
            app_protocol: None,
        }
    }

    fn export(cluster: &str, at: i64) -> Export {
        Export {
            cluster: cluster.into(),
            namespace: "ml".into(),
            name: "llm".into(),
            service_type: Some(ServiceType::ClusterSetIp),
            ports: vec![port("http", 8000)],
            created_at_unix_ms: at,
            ..Export::default()
        }
    }

    fn one(exports: &[Export]) -> Service {
        let mut m = aggregate(exports);
        assert_eq!(m.len(), 1);
        m.pop_first().unwrap().1
    }

    #[test]
    fn agreeing_exports_merge_without_conflicts() {
        let s = one(&[export("b", 2), export("a", 1)]);
        assert_eq!(
            s.exports
                .iter()
                .map(|e| e.cluster.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(!s.has_conflicts());
        assert_eq!(s.status["a"].conflict_reason(), "NoConflicts");
        assert_eq!(s.ports, vec![port("http", 8000)]);
    }

    #[test]
    fn ports_are_the_union_by_name() {
        let mut b = export("b", 2);
        b.ports.push(port("metrics", 9090));
        let s = one(&[export("a", 1), b]);
        assert_eq!(s.ports, vec![port("http", 8000), port("metrics", 9090)]);
        assert!(!s.has_conflicts());
    }

    #[test]
    fn the_oldest_export_wins_a_port_conflict_and_both_sides_are_marked() {
        let mut newer = export("a", 5);
        newer.ports = vec![port("http", 8080)];
        let s = one(&[newer, export("z", 1)]);
        assert_eq!(
            s.ports,
            vec![port("http", 8000)],
            "z is older: its port wins"
        );
        for c in ["a", "z"] {
            assert_eq!(s.status[c].conflict_reason(), "PortConflict", "{c}");
            assert!(s.status[c].included, "a port conflict keeps the endpoints");
        }
        assert!(
            s.status["a"]
                .conflict_message()
                .contains("8080/TCP in cluster a but 8000/TCP in cluster z")
        );
    }

    #[test]
    fn a_type_conflict_leaves_the_newer_exports_endpoints_out() {
        let mut headless = export("b", 2);
        headless.service_type = Some(ServiceType::Headless);
        let s = one(&[export("a", 1), headless, export("c", 3)]);
        assert_eq!(s.service_type, Some(ServiceType::ClusterSetIp));
        assert_eq!(
            s.exports
                .iter()
                .map(|e| e.cluster.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert!(!s.status["b"].included);
        assert_eq!(s.status["b"].conflict_reason(), "TypeConflict");
        assert_eq!(s.status["a"].conflict_reason(), "TypeConflict");
        assert_eq!(s.status["c"].conflict_reason(), "NoConflicts");
    }

    #[test]
    fn several_conflicts_are_joined_with_commas() {
        let mut b = export("b", 2);
        b.session_affinity = SessionAffinity::ClientIp;
        b.ports = vec![port("http", 1)];
        b.labels.insert("tier".into(), "gold".into());
        let mut a = export("a", 1);
        a.labels.insert("tier".into(), "silver".into());
        let s = one(&[a, b]);
        assert_eq!(
            s.status["b"].conflict_reason(),
            "PortConflict,SessionAffinityConflict,LabelsConflict"
        );
        assert_eq!(s.labels["tier"], "silver");
        assert_eq!(s.session_affinity, SessionAffinity::None);
    }

    #[test]
    fn ties_on_creation_time_are_broken_by_cluster_name() {
        let mut b = export("b", 1);
        b.ports = vec![port("http", 1)];
        let s = one(&[b, export("a", 1)]);
        assert_eq!(s.ports, vec![port("http", 8000)]);
    }

    #[test]
    fn invalid_exports_are_not_merged() {
        let mut a = export("a", 1);
        a.invalid = Some(InvalidReason::NoService);
        a.service_type = None;
        assert!(aggregate(&[a]).is_empty());
    }
}
