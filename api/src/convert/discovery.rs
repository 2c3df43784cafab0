//! Discovery wire types ↔ `flotilla_core` exports and routes, with the edge validation every
//! export from an agent goes through: DNS-label names, parseable addresses, known protocols,
//! bounded sizes. A malformed export is rejected naming the field; nothing of it is stored.

use std::collections::BTreeSet;
use std::net::IpAddr;

use flotilla_core::export::{
    Endpoint, Export, ExportStatus, InvalidReason, Port, Protocol, Service, ServiceType,
    SessionAffinity,
};
use flotilla_core::routing::{Class, Decision, Route};

use super::fleet::{Invalid, is_dns_label};
use crate::v1;

/// Ports in one export (a Service allows far fewer in practice).
pub const MAX_PORTS: usize = 100;
/// Endpoints in one export.
pub const MAX_ENDPOINTS: usize = 5_000;
/// Exports per cluster.
pub const MAX_EXPORTS: usize = 2_000;
/// Exported labels or annotations per export.
pub const MAX_METADATA: usize = 64;
/// Bytes of one exported annotation value.
pub const MAX_ANNOTATION_BYTES: usize = 4_096;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Service type to the wire.
pub fn type_to_wire(t: Option<ServiceType>) -> i32 {
    match t {
        None => v1::ServiceType::Unspecified as i32,
        Some(ServiceType::ClusterSetIp) => v1::ServiceType::ClusterSetIp as i32,
        Some(ServiceType::Headless) => v1::ServiceType::Headless as i32,
    }
}

fn protocol_from(s: &str) -> Option<Protocol> {
    match s {
        "TCP" | "" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A port to the wire.
pub fn port_to_wire(p: &Port) -> v1::ServicePort {
    v1::ServicePort {
        name: p.name.clone(),
        protocol: p.protocol.to_string(),
        port: u32::from(p.port),
        app_protocol: p.app_protocol.clone().unwrap_or_default(),
    }
}

/// An export to the wire (and to the store: the record under `/exports/<cluster>/`).
pub fn export_to_wire(e: &Export) -> v1::ServiceExport {
    v1::ServiceExport {
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        r#type: type_to_wire(e.service_type),
        ports: e.ports.iter().map(port_to_wire).collect(),
        labels: e.labels.clone().into_iter().collect(),
        annotations: e.annotations.clone().into_iter().collect(),
        session_affinity_client_ip: e.session_affinity == SessionAffinity::ClientIp,
        addresses: e.addresses.iter().map(|a| a.to_string()).collect(),
        endpoints: e.endpoints.iter().map(endpoint_to_wire).collect(),
        created_at_unix_ms: e.created_at_unix_ms,
        gpu_pools: e.gpu_pools.clone(),
        invalid: match e.invalid {
            None => v1::ExportInvalid::None as i32,
            Some(InvalidReason::NoService) => v1::ExportInvalid::NoService as i32,
            Some(InvalidReason::InvalidServiceType) => v1::ExportInvalid::ServiceType as i32,
        },
        cluster: e.cluster.clone(),
        endpoint_ports: e.endpoint_ports.iter().map(port_to_wire).collect(),
    }
}

fn endpoint_to_wire(p: &flotilla_core::export::Endpoint) -> v1::ServiceEndpoint {
    v1::ServiceEndpoint {
        address: p.address.to_string(),
        hostname: p.hostname.clone(),
        zone: p.zone.clone(),
        ready: p.ready,
        serving: p.serving,
        terminating: p.terminating,
    }
}

/// A merged service as one member cluster imports it, with `decision` (the routing decision
/// from that cluster's point of view) naming its ClusterSetIP addresses.
pub fn import_to_wire(s: &Service, decision: &Decision) -> v1::ImportedService {
    let key = s
        .key
        .clone()
        .unwrap_or_else(|| flotilla_core::export::ServiceKey::new("", ""));
    let headless = s.service_type == Some(ServiceType::Headless);
    // Endpoints of clusters the decision does not answer (unhealthy, below a threshold, a
    // lower tier) are imported as not ready, so the tools reading the slices fail over too.
    let answered: BTreeSet<&str> = decision.chosen.iter().map(|c| c.cluster.as_str()).collect();
    v1::ImportedService {
        namespace: key.namespace,
        name: key.name,
        r#type: type_to_wire(s.service_type),
        ports: s.ports.iter().map(port_to_wire).collect(),
        ips: match headless {
            true => Vec::new(),
            false => decision
                .preferred_ips()
                .iter()
                .map(|a| a.to_string())
                .collect(),
        },
        session_affinity_client_ip: s.session_affinity == SessionAffinity::ClientIp,
        labels: s.labels.clone().into_iter().collect(),
        annotations: s.annotations.clone().into_iter().collect(),
        clusters: s
            .exports
            .iter()
            .map(|e| v1::ImportedCluster {
                cluster: e.cluster.clone(),
                // The endpoints' own ports; the Service's when the slices named none.
                ports: match e.endpoint_ports.is_empty() {
                    true => e.ports.iter().map(port_to_wire).collect(),
                    false => e.endpoint_ports.iter().map(port_to_wire).collect(),
                },
                endpoints: e
                    .endpoints
                    .iter()
                    .map(|p| v1::ServiceEndpoint {
                        ready: p.ready && answered.contains(e.cluster.as_str()),
                        ..endpoint_to_wire(p)
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Ports, validated: names are DNS labels (or empty), unique per protocol; `at` is the field.
fn ports_from_wire(ports: &[v1::ServicePort], at: &str) -> Result<Vec<Port>, Invalid> {
    if ports.len() > MAX_PORTS {
        return Err(invalid(
            at.to_string(),
            format!("at most {MAX_PORTS}, got {}", ports.len()),
        ));
    }
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{at}[{i}]");
        let protocol = protocol_from(&p.protocol).ok_or_else(|| {
            invalid(
                format!("{f}.protocol"),
                format!("{:?}: want TCP, UDP or SCTP", p.protocol),
            )
        })?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                invalid(
                    format!("{f}.port"),
                    format!("{} is not a port (1–65535)", p.port),
                )
            })?;
        if !p.name.is_empty() && !is_dns_label(&p.name) {
            return Err(invalid(
                format!("{f}.name"),
                format!("{:?} is not a DNS label", p.name),
            ));
        }
        if !names.insert((p.name.clone(), protocol)) {
            return Err(invalid(
                format!("{f}.name"),
                format!("port {:?}/{protocol} appears twice", p.name),
            ));
        }
        out.push(Port {
            name: p.name.clone(),
            protocol,
            port,
            app_protocol: Some(p.app_protocol.clone()).filter(|a| !a.is_empty()),
        });
    }
    Ok(out)
}

/// An export from `cluster`'s agent (or from the store), validated; `at` is the field path.
/// The cluster comes from the session, never from the message.
pub fn export_from_wire(w: &v1::ServiceExport, cluster: &str, at: &str) -> Result<Export, Invalid> {
    for (f, v) in [("namespace", &w.namespace), ("name", &w.name)] {
        if !is_dns_label(v) {
            return Err(invalid(
                format!("{at}.{f}"),
                format!("{v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"),
            ));
        }
    }
    let invalid_reason = match v1::ExportInvalid::try_from(w.invalid) {
        Ok(v1::ExportInvalid::None) => None,
        Ok(v1::ExportInvalid::NoService) => Some(InvalidReason::NoService),
        Ok(v1::ExportInvalid::ServiceType) => Some(InvalidReason::InvalidServiceType),
        Err(_) => {
            return Err(invalid(
                format!("{at}.invalid"),
                format!("unknown value {}", w.invalid),
            ));
        }
    };
    let service_type = match v1::ServiceType::try_from(w.r#type) {
        Ok(v1::ServiceType::ClusterSetIp) => Some(ServiceType::ClusterSetIp),
        Ok(v1::ServiceType::Headless) => Some(ServiceType::Headless),
        Ok(v1::ServiceType::Unspecified) if invalid_reason.is_some() => None,
        Ok(v1::ServiceType::Unspecified) => {
            return Err(invalid(
                format!("{at}.type"),
                "a valid export needs CLUSTER_SET_IP or HEADLESS",
            ));
        }
        Err(_) => {
            return Err(invalid(
                format!("{at}.type"),
                format!("unknown value {}", w.r#type),
            ));
        }
    };
    let ports = ports_from_wire(&w.ports, &format!("{at}.ports"))?;
    let endpoint_ports = ports_from_wire(&w.endpoint_ports, &format!("{at}.endpoint_ports"))?;
    for (f, m, max_value) in [
        ("labels", &w.labels, 63usize),
        ("annotations", &w.annotations, MAX_ANNOTATION_BYTES),
    ] {
        if m.len() > MAX_METADATA {
            return Err(invalid(
                format!("{at}.{f}"),
                format!("at most {MAX_METADATA}, got {}", m.len()),
            ));
        }
        for (k, v) in m {
            if k.is_empty() || k.len() > 253 || v.len() > max_value {
                return Err(invalid(
                    format!("{at}.{f}[{k:?}]"),
                    format!("key 1–253 bytes, value at most {max_value}"),
                ));
            }
        }
    }
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<IpAddr>().map_err(|_| {
                invalid(
                    format!("{at}.addresses[{i}]"),
                    format!("{a:?} is not an IP address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.len() > MAX_PORTS {
        return Err(invalid(
            format!("{at}.addresses"),
            format!("at most {MAX_PORTS}, got {}", addresses.len()),
        ));
    }
    if w.endpoints.len() > MAX_ENDPOINTS {
        return Err(invalid(
            format!("{at}.endpoints"),
            format!("at most {MAX_ENDPOINTS}, got {}", w.endpoints.len()),
        ));
    }
    let mut endpoints = Vec::with_capacity(w.endpoints.len());
    for (i, e) in w.endpoints.iter().enumerate() {
        let f = format!("{at}.endpoints[{i}]");
        let address = e.address.parse().map_err(|_| {
            invalid(
                format!("{f}.address"),
                format!("{:?} is not an IP address", e.address),
            )
        })?;
        if !e.hostname.is_empty() && !is_dns_label(&e.hostname) {
            return Err(invalid(
                format!("{f}.hostname"),
                format!("{:?} is not a DNS label", e.hostname),
            ));
        }
        if e.zone.len() > 253 {
            return Err(invalid(format!("{f}.zone"), "at most 253 bytes"));
        }
        endpoints.push(Endpoint {
            address,
            hostname: e.hostname.clone(),
            zone: e.zone.clone(),
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
        });
    }
    for (i, p) in w.gpu_pools.iter().enumerate() {
        if p.len() > 253 {
            return Err(invalid(format!("{at}.gpu_pools[{i}]"), "at most 253 bytes"));
        }
    }
    Ok(Export {
        cluster: cluster.to_string(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        service_type,
        ports,
        endpoint_ports,
        labels: w.labels.clone().into_iter().collect(),
        annotations: w.annotations.clone().into_iter().collect(),
        session_affinity: match w.session_affinity_client_ip {
            true => SessionAffinity::ClientIp,
            false => SessionAffinity::None,
        },
        addresses,
        endpoints,
        created_at_unix_ms: w.created_at_unix_ms,
        gpu_pools: w.gpu_pools.clone(),
        invalid: invalid_reason,
    })
}

/// A whole snapshot from `cluster`'s agent: every export valid, no key twice, bounded.
pub fn exports_from_wire(
    exports: &[v1::ServiceExport],
    cluster: &str,
    at: &str,
) -> Result<Vec<Export>, Invalid> {
    if exports.len() > MAX_EXPORTS {
        return Err(invalid(
            at,
            format!(
                "at most {MAX_EXPORTS} exports per cluster, got {}",
                exports.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    exports
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let e = export_from_wire(w, cluster, &format!("{at}[{i}]"))?;
            if !seen.insert((e.namespace.clone(), e.name.clone())) {
                return Err(invalid(
                    format!("{at}[{i}]"),
                    format!("{}/{} appears twice", e.namespace, e.name),
                ));
            }
            Ok(e)
        })
        .collect()
}

/// The status to send back for one export.
pub fn status_to_wire(namespace: &str, name: &str, s: &ExportStatus) -> v1::ExportStatus {
    v1::ExportStatus {
        namespace: namespace.into(),
        name: name.into(),
        conflict_reason: s.conflict_reason(),
        conflict_message: s.conflict_message(),
        included: s.included,
    }
}

/// A merged service for the read API.
pub fn service_to_wire(
    s: &Service,
    policy_json: String,
    own_policy: bool,
    answering: Vec<String>,
) -> v1::ServiceInfo {
    let key = s
        .key
        .clone()
        .unwrap_or_else(|| flotilla_core::export::ServiceKey::new("", ""));
    let mut clusters: Vec<v1::ServiceCluster> = s
        .exports
        .iter()
        .map(|e| {
            let st = s.status.get(&e.cluster).cloned().unwrap_or_default();
            v1::ServiceCluster {
                cluster: e.cluster.clone(),
                ready_endpoints: e.ready_endpoints().count() as u32,
                endpoints: e.endpoints.len() as u32,
                addresses: e.addresses.iter().map(|a| a.to_string()).collect(),
                conflict_reason: st.conflict_reason(),
                conflict_message: st.conflict_message(),
                included: st.included,
                created_at_unix_ms: e.created_at_unix_ms,
            }
        })
        .collect();
    // Exports left out by a type conflict are still shown, marked.
    for (c, st) in &s.status {
        if !st.included {
            clusters.push(v1::ServiceCluster {
                cluster: c.clone(),
                conflict_reason: st.conflict_reason(),
                conflict_message: st.conflict_message(),
                included: false,
                ..Default::default()
            });
        }
    }
    v1::ServiceInfo {
        namespace: key.namespace,
        name: key.name,
        r#type: type_to_wire(s.service_type),
        ports: s.ports.iter().map(port_to_wire).collect(),
        clusters,
        policy_json,
        own_policy,
        answering,
    }
}

fn class_name(c: Class) -> String {
    c.to_string()
}

/// A route for the Resolve API.
pub fn route_to_wire(r: &Route, client_cluster: Option<&str>) -> v1::ResolveResponse {
    v1::ResolveResponse {
        answers: r
            .answers
            .iter()
            .map(|a| v1::ResolvedAddress {
                cluster: a.cluster.clone(),
                address: a.address.to_string(),
                hostname: a.hostname.clone(),
            })
            .collect(),
        ttl_seconds: r.ttl_seconds,
        tiers: r.tiers.clone(),
        verdicts: r
            .verdicts
            .iter()
            .map(|v| v1::RouteVerdict {
                cluster: v.cluster.clone(),
                chosen: v.chosen,
                class: class_name(v.class),
                tier: v.tier.map_or(-1, |t| t as i32),
                ready_endpoints: v.ready_endpoints,
                endpoints: v.endpoints,
                weight: v.weight,
                reason: v.reason.clone(),
            })
            .collect(),
        client_cluster: client_cluster.unwrap_or_default().to_string(),
    }
}

/// A decision for `WatchRoutes`.
pub fn decision_to_wire(d: &Decision) -> Vec<v1::RouteChoice> {
    d.chosen
        .iter()
        .map(|c| v1::RouteChoice {
            cluster: c.cluster.clone(),
            weight: c.weight,
            addresses: c
                .addresses
                .iter()
                .map(|(a, h)| v1::ResolvedAddress {
                    cluster: c.cluster.clone(),
                    address: a.to_string(),
                    hostname: h.clone(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::ServiceExport {
        v1::ServiceExport {
            namespace: "ml".into(),
            name: "llm".into(),
            r#type: v1::ServiceType::ClusterSetIp as i32,
            ports: vec![v1::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8000,
                app_protocol: String::new(),
            }],
            addresses: vec!["192.0.2.1".into()],
            endpoints: vec![v1::ServiceEndpoint {
                address: "10.0.0.1".into(),
                ready: true,
                ..Default::default()
            }],
            created_at_unix_ms: 5,
            cluster: "spoofed".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_export_round_trips_and_takes_its_cluster_from_the_session() {
        let e = export_from_wire(&wire(), "a", "exports[0]").unwrap();
        assert_eq!(e.cluster, "a", "never the message's own claim");
        let back = export_from_wire(&export_to_wire(&e), "a", "x").unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn bad_fields_are_named() {
        type Edit = Box<dyn Fn(&mut v1::ServiceExport)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|w| w.name = "Bad_Name".into()), "exports[0].name"),
            (
                Box::new(|w| w.ports[0].protocol = "HTTP".into()),
                "exports[0].ports[0].protocol",
            ),
            (
                Box::new(|w| w.ports[0].port = 70000),
                "exports[0].ports[0].port",
            ),
            (
                Box::new(|w| w.ports.push(w.ports[0].clone())),
                "exports[0].ports[1].name",
            ),
            (
                Box::new(|w| w.addresses[0] = "nope".into()),
                "exports[0].addresses[0]",
            ),
            (
                Box::new(|w| w.endpoints[0].address = "10.0.0".into()),
                "exports[0].endpoints[0].address",
            ),
            (Box::new(|w| w.r#type = 0), "exports[0].type"),
            (Box::new(|w| w.r#type = 9), "exports[0].type"),
        ];
        for (f, field) in cases {
            let mut w = wire();
            f(&mut w);
            assert_eq!(
                export_from_wire(&w, "a", "exports[0]").unwrap_err().field,
                field
            );
        }
        let twice = exports_from_wire(&[wire(), wire()], "a", "exports").unwrap_err();
        assert_eq!(twice.field, "exports[1]");
    }

    #[test]
    fn an_invalid_export_needs_no_type() {
        let mut w = wire();
        w.r#type = 0;
        w.invalid = v1::ExportInvalid::NoService as i32;
        let e = export_from_wire(&w, "a", "x").unwrap();
        assert_eq!(e.invalid, Some(InvalidReason::NoService));
    }
}
