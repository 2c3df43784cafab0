//! The cluster's MCS exports: reflectors on ServiceExports (in whichever of
//! `multicluster.x-k8s.io/v1beta1` and `v1alpha1` the cluster serves), Services and
//! EndpointSlices; the export records sent to the hub; and the MCS conditions written back to
//! each ServiceExport, so `kubectl describe serviceexport` says what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flotilla_core::export::{
    Endpoint, Export, InvalidReason, Port, Protocol, ServiceType, SessionAffinity,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The ServiceExport annotation that opts in; its value is the pods' metrics port (a number
/// or a container port name).
pub const METRICS_ANNOTATION: &str = "flotilla.io/inference-metrics";
/// Optional annotation: the metrics path (default `/metrics`).
pub const PATH_ANNOTATION: &str = "flotilla.io/inference-metrics-path";
/// One opted-in export and its ready pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// The pods' metrics port.
    pub port: String,
    /// The metrics path.
    pub path: String,
    /// Ready pods.
    pub pods: Vec<String>,
}

/// The MCS API group.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// MCS versions the agent reads, preferred first (mcs-api v0.5 stores v1beta1).
pub const MCS_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// The label EndpointSlices carry naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the hub said about one export (its MCS conflict state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubStatus {
    /// `NoConflicts` or the reasons joined with commas.
    pub conflict_reason: String,
    /// The conflicts in words.
    pub conflict_message: String,
    /// Whether the export's endpoints are in the fleet-wide service.
    pub included: bool,
}

/// The hub's status per `(namespace, name)`.
pub type HubStatuses = BTreeMap<(String, String), HubStatus>;

struct McsStores {
    version: String,
    resource: ApiResource,
    exports: Store<DynamicObject>,
}

/// Reflector caches for exports.
#[derive(Clone)]
pub struct ExportWatch {
    client: Client,
    mcs: Arc<OnceLock<McsStores>>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    changed: watch::Receiver<u64>,
    tx: Arc<watch::Sender<u64>>,
    flat_network: bool,
    hub: Arc<Mutex<Option<HubStatuses>>>,
}

impl ExportWatch {
    /// Start discovery of the MCS version, the reflectors and the status writer; they run
    /// until `shutdown`. `flat_network`: other clusters reach cluster IPs directly.
    pub fn start(client: Client, flat_network: bool, shutdown: CancellationToken) -> Self {
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let services = reflect::<Service>(Api::all(client.clone()), (), "services", &tx, &shutdown);
        let slices = reflect::<EndpointSlice>(
            Api::all(client.clone()),
            (),
            "endpointslices",
            &tx,
            &shutdown,
        );
        let w = Self {
            client: client.clone(),
            mcs: Arc::new(OnceLock::new()),
            services,
            slices,
            changed,
            tx: tx.clone(),
            flat_network,
            hub: Arc::new(Mutex::new(None)),
        };
        tokio::spawn(
            discover(w.clone(), shutdown.clone())
                .instrument(tracing::info_span!("agent-mcs-discovery")),
        );
        tokio::spawn(
            write_status(w.clone(), shutdown)
                .instrument(tracing::info_span!("agent-export-status")),
        );
        w
    }

    /// Changes of any export, Service or EndpointSlice (and of the hub's status).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// The MCS version watched, once discovered.
    pub fn version(&self) -> Option<&str> {
        self.mcs.get().map(|m| m.version.as_str())
    }

    /// Every ServiceExport as an export record. `pool_of` names a node's GPU pool.
    pub fn exports(&self, pool_of: &dyn Fn(&str) -> Option<String>) -> Vec<Export> {
        let Some(m) = self.mcs.get() else {
            return Vec::new();
        };
        let slices = self.slices.state();
        let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for s in &slices {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            if let Some(name) = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                by_service.entry((ns, name.clone())).or_default().push(s);
            }
        }
        let mut out: Vec<Export> = m
            .exports
            .state()
            .iter()
            .filter(|se| se.metadata.deletion_timestamp.is_none())
            .map(|se| {
                let ns = se.metadata.namespace.clone().unwrap_or_default();
                let name = se.metadata.name.clone().unwrap_or_default();
                let svc = self
                    .services
                    .get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns));
                let slices = by_service
                    .get(&(ns, name))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                export_of(se, svc.as_deref(), slices, pool_of, self.flat_network)
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// The exports that opt in to inference load sampling
    /// ([`METRICS_ANNOTATION`]), with their ready pods.
    pub fn inference_targets(&self) -> Vec<Target> {
        let Some(m) = self.mcs.get() else {
            return Vec::new();
        };
        let slices = self.slices.state();
        let mut out = Vec::new();
        for se in m.exports.state().iter() {
            let Some(port) = se
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(METRICS_ANNOTATION))
            else {
                continue;
            };
            let ns = se.metadata.namespace.clone().unwrap_or_default();
            let name = se.metadata.name.clone().unwrap_or_default();
            let path = se
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PATH_ANNOTATION))
                .cloned()
                .unwrap_or_else(|| "/metrics".into());
            let mut pods: Vec<String> = slices
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        == Some(&name)
                })
                .flat_map(|s| s.endpoints.iter())
                // Only pods that serve: an unready pod's metrics say nothing of the service.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .filter_map(|e| {
                    let t = e.target_ref.as_ref()?;
                    (t.kind.as_deref() == Some("Pod")).then(|| t.name.clone())?
                })
                .collect();
            pods.sort();
            pods.dedup();
            out.push(Target {
                namespace: ns,
                name,
                port: port.clone(),
                path,
                pods,
            });
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// The hub's latest word on this cluster's exports; the status writer applies it.
    pub fn set_hub_status(&self, statuses: HubStatuses) {
        *self.hub.lock().expect("hub status") = Some(statuses);
        self.tx.send_modify(|v| *v += 1);
    }
}

/// An export record from a ServiceExport, its Service (if any) and the Service's
/// EndpointSlices. Pure.
pub fn export_of(
    se: &DynamicObject,
    svc: Option<&Service>,
    slices: &[&EndpointSlice],
    pool_of: &dyn Fn(&str) -> Option<String>,
    flat_network: bool,
) -> Export {
    let mut e = Export {
        namespace: se.metadata.namespace.clone().unwrap_or_default(),
        name: se.metadata.name.clone().unwrap_or_default(),
        created_at_unix_ms: se
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_millisecond()),
        ..Export::default()
    };
    let map = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    };
    e.labels = map(&se.data["spec"]["exportedLabels"]);
    e.annotations = map(&se.data["spec"]["exportedAnnotations"]);
    let Some(svc) = svc else {
        e.invalid = Some(InvalidReason::NoService);
        return e;
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        e.invalid = Some(InvalidReason::InvalidServiceType);
        return e;
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    e.service_type = Some(if headless {
        ServiceType::Headless
    } else {
        ServiceType::ClusterSetIp
    });
    e.session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => SessionAffinity::ClientIp,
        _ => SessionAffinity::None,
    };
    e.ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(Port {
                name: p.name.clone().unwrap_or_default(),
                protocol: match p.protocol.as_deref() {
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    _ => Protocol::Tcp,
                },
                port: u16::try_from(p.port).ok()?,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    if !headless {
        let mut addrs: Vec<IpAddr> = Vec::new();
        let status = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        // A hostname-only ingress (an AWS ELB) has no address to answer with.
        addrs.extend(
            status
                .iter()
                .flat_map(|i| i.iter())
                .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok()),
        );
        addrs.extend(
            spec.external_ips
                .iter()
                .flatten()
                .filter_map(|a| a.parse::<IpAddr>().ok()),
        );
        if flat_network {
            addrs.extend(
                spec.cluster_ips
                    .iter()
                    .flatten()
                    .filter_map(|a| a.parse::<IpAddr>().ok()),
            );
            if let Some(ip) = spec.cluster_ip.as_deref().and_then(|a| a.parse().ok()) {
                addrs.push(ip);
            }
        }
        let mut seen = BTreeSet::new();
        addrs.retain(|a| seen.insert(*a));
        e.addresses = addrs;
    }
    let mut pools = BTreeSet::new();
    let mut endpoint_ports: BTreeSet<Port> = BTreeSet::new();
    for s in slices {
        for p in s.ports.iter().flatten() {
            let Some(port) = p
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
            else {
                continue;
            };
            endpoint_ports.insert(Port {
                name: p.name.clone().unwrap_or_default(),
                protocol: match p.protocol.as_deref() {
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    _ => Protocol::Tcp,
                },
                port,
                app_protocol: p.app_protocol.clone(),
            });
        }
        for ep in &s.endpoints {
            let c = ep.conditions.clone().unwrap_or_default();
            // Nil means ready (the EndpointSlice API); serving follows ready when unset.
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            if let Some(p) = ep.node_name.as_deref().and_then(pool_of) {
                pools.insert(p);
            }
            for a in &ep.addresses {
                let Ok(address) = a.parse() else { continue };
                e.endpoints.push(Endpoint {
                    address,
                    hostname: ep.hostname.clone().unwrap_or_default(),
                    zone: ep.zone.clone().unwrap_or_default(),
                    ready,
                    serving,
                    terminating,
                });
            }
        }
    }
    e.endpoints.sort();
    e.endpoints.dedup();
    e.gpu_pools = pools.into_iter().collect();
    // One per name and protocol (slices of one Service agree; the first wins if not).
    let mut seen = BTreeSet::new();
    e.endpoint_ports = endpoint_ports
        .into_iter()
        .filter(|p| seen.insert((p.name.clone(), p.protocol)))
        .collect();
    e
}

/// The MCS conditions an export should carry, given the hub's word on it. Pure.
pub fn conditions(e: &Export, hub: Option<&HubStatus>) -> Vec<(String, String, String, String)> {
    let c = |t: &str, s: &str, r: &str, m: String| (t.to_string(), s.to_string(), r.to_string(), m);
    let mut out = Vec::new();
    match e.invalid {
        Some(InvalidReason::NoService) => {
            out.push(c(
                "Valid",
                "False",
                "NoService",
                format!("no Service {} in namespace {}", e.name, e.namespace),
            ));
            out.push(c(
                "Ready",
                "False",
                "Pending",
                "waiting for the Service to exist".into(),
            ));
            return out;
        }
        Some(InvalidReason::InvalidServiceType) => {
            out.push(c(
                "Valid",
                "False",
                "InvalidServiceType",
                "an ExternalName Service cannot be exported".into(),
            ));
            out.push(c(
                "Ready",
                "False",
                "Failed",
                "the Service cannot be exported".into(),
            ));
            return out;
        }
        None => out.push(c(
            "Valid",
            "True",
            "Valid",
            "the Service can be exported".into(),
        )),
    }
    match hub {
        None => {
            out.push(c(
                "Ready",
                "False",
                "Pending",
                "waiting for the fleet hub".into(),
            ));
        }
        Some(h) => {
            match h.included {
                true => out.push(c(
                    "Ready",
                    "True",
                    "Exported",
                    "exported to the fleet: answered in clusterset.local".into(),
                )),
                false => out.push(c(
                    "Ready",
                    "False",
                    "Failed",
                    format!("left out of the fleet-wide service: {}", h.conflict_message),
                )),
            }
            match h.conflict_reason.as_str() {
                "NoConflicts" | "" => out.push(c(
                    "Conflict",
                    "False",
                    "NoConflicts",
                    "no conflicts with other clusters' exports".into(),
                )),
                r => out.push(c("Conflict", "True", r, h.conflict_message.clone())),
            }
        }
    }
    out
}

pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Keep every ServiceExport's conditions current: written only when they differ, keeping a
/// condition's `lastTransitionTime` while its status stays.
async fn write_status(w: ExportWatch, shutdown: CancellationToken) {
    let mut changes = w.changes();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.borrow_and_update();
        let Some(m) = w.mcs.get() else { continue };
        let hub = w.hub.lock().expect("hub status").clone();
        for e in w.exports(&|_| None) {
            let key = (e.namespace.clone(), e.name.clone());
            let want = conditions(&e, hub.as_ref().and_then(|h| h.get(&key)));
            let Some(obj) = m.exports.get(
                &kube::runtime::reflector::ObjectRef::new_with(&e.name, m.resource.clone())
                    .within(&e.namespace),
            ) else {
                continue;
            };
            let current: Vec<Value> = obj.data["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let same = current.len() == want.len()
                && want.iter().all(|(t, s, r, msg)| {
                    current.iter().any(|c| {
                        c["type"] == t.as_str()
                            && c["status"] == s.as_str()
                            && c["reason"] == r.as_str()
                            && c["message"] == msg.as_str()
                    })
                });
            if same {
                continue;
            }
            let generation = obj.metadata.generation.unwrap_or(0);
            let conds: Vec<Value> = want
                .iter()
                .map(|(t, s, r, msg)| {
                    let kept = current.iter().find(|c| c["type"] == t.as_str() && c["status"] == s.as_str()).and_then(|c| c["lastTransitionTime"].as_str().map(String::from));
                    json!({"type": t, "status": s, "reason": r, "message": msg,
                           "lastTransitionTime": kept.unwrap_or_else(now_rfc3339), "observedGeneration": generation})
                })
                .collect();
            let api: Api<DynamicObject> =
                Api::namespaced_with(w.client.clone(), &e.namespace, &m.resource);
            let patch = json!({"status": {"conditions": conds}});
            if let Err(err) = api
                .patch_status(&e.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(export = %format!("{}/{}", e.namespace, e.name), error = %err, "could not write the ServiceExport's status");
            }
        }
    }
}

/// Find the MCS version served and start the ServiceExport reflector; a cluster without the
/// MCS CRDs is asked again every minute (they may be installed later).
async fn discover(w: ExportWatch, shutdown: CancellationToken) {
    loop {
        let found = match w.client.list_api_groups().await {
            Ok(groups) => groups
                .groups
                .iter()
                .find(|g| g.name == MCS_GROUP)
                .and_then(|g| {
                    MCS_VERSIONS
                        .iter()
                        .find(|v| g.versions.iter().any(|gv| gv.version == **v))
                })
                .map(|v| v.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "API discovery failed; retrying");
                None
            }
        };
        if let Some(version) = found {
            tracing::info!(%version, "watching ServiceExports in {MCS_GROUP}/{version}");
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(MCS_GROUP, &version, "ServiceExport"),
                "serviceexports",
            );
            let exports = reflect::<DynamicObject>(
                Api::all_with(w.client.clone(), &resource),
                resource.clone(),
                "serviceexports",
                &w.tx,
                &shutdown,
            );
            let _ = w.mcs.set(McsStores {
                version,
                resource,
                exports,
            });
            w.tx.send_modify(|v| *v += 1);
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// A reflector on `api` that bumps `tx` on every event, until `shutdown`.
pub(crate) fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    what: &'static str,
    tx: &Arc<watch::Sender<u64>>,
    shutdown: &CancellationToken,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let writer = kube::runtime::reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = kube::runtime::reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let (tx, shutdown) = (tx.clone(), shutdown.clone());
    tokio::spawn(
        async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(_)) => tx.send_modify(|v| *v += 1),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watch failed; retrying with backoff")
                    }
                    None => return,
                }
            }
        }
        .instrument(tracing::info_span!("agent-watch", resource = what)),
    );
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
            "metadata": {"name": "llm", "namespace": "ml", "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn svc(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(eps: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "llm-x", "namespace": "ml", "labels": {SERVICE_NAME_LABEL: "llm"}},
            "addressType": "IPv4", "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    #[test]
    fn a_load_balancer_service_exports_its_ingress_ports_and_endpoints() {
        let s = svc(json!({"metadata": {"name": "llm", "namespace": "ml"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"], "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 8000, "protocol": "TCP", "appProtocol": "http"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.1"}, {"hostname": "elb.example"}]}}}));
        let sl = slice(json!([
            {"addresses": ["10.16.0.1"], "conditions": {"ready": true}, "nodeName": "n1", "zone": "z1"},
            {"addresses": ["10.16.0.2"], "conditions": {"ready": false, "terminating": true}, "nodeName": "n2"},
            {"addresses": ["10.16.0.3"], "nodeName": "n1"},
        ]));
        let pool = |n: &str| {
            Some(if n == "n1" {
                "h100".to_string()
            } else {
                "l4".to_string()
            })
        };
        let e = export_of(
            &se(json!({"exportedLabels": {"tier": "gold"}})),
            Some(&s),
            &[&sl],
            &pool,
            false,
        );
        assert_eq!(e.service_type, Some(ServiceType::ClusterSetIp));
        assert_eq!(
            e.addresses,
            vec!["198.18.0.1".parse::<IpAddr>().unwrap()],
            "no cluster IP off a flat network"
        );
        assert_eq!(e.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(e.session_affinity, SessionAffinity::ClientIp);
        assert_eq!(e.labels["tier"], "gold");
        assert_eq!(e.created_at_unix_ms, 1_767_323_045_000);
        assert_eq!(e.ready_endpoints().count(), 2, "nil ready is ready");
        assert!(e.endpoints.iter().any(|x| x.terminating && !x.ready));
        assert_eq!(e.gpu_pools, ["h100", "l4"]);
        // The slices' target port, not the Service's port.
        assert_eq!(e.endpoint_ports.len(), 1);
        assert_eq!(
            (e.endpoint_ports[0].name.as_str(), e.endpoint_ports[0].port),
            ("http", 8080)
        );
        let flat = export_of(&se(json!({})), Some(&s), &[], &pool, true);
        assert_eq!(
            flat.addresses.len(),
            2,
            "the cluster IP too on a flat network"
        );
    }

    #[test]
    fn missing_and_external_name_services_are_invalid_and_say_so() {
        let e = export_of(&se(json!({})), None, &[], &|_| None, false);
        assert_eq!(e.invalid, Some(InvalidReason::NoService));
        let conds = conditions(&e, None);
        assert_eq!(
            (conds[0].1.as_str(), conds[0].2.as_str()),
            ("False", "NoService")
        );
        let s = svc(
            json!({"metadata": {"name": "llm"}, "spec": {"type": "ExternalName", "externalName": "x.example"}}),
        );
        let e = export_of(&se(json!({})), Some(&s), &[], &|_| None, false);
        assert_eq!(e.invalid, Some(InvalidReason::InvalidServiceType));
    }

    #[test]
    fn headless_services_have_no_addresses_and_conditions_follow_the_hub() {
        let s = svc(
            json!({"metadata": {"name": "llm"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
        );
        let e = export_of(&se(json!({})), Some(&s), &[], &|_| None, true);
        assert_eq!(e.service_type, Some(ServiceType::Headless));
        assert!(e.addresses.is_empty());
        let pending = conditions(&e, None);
        assert_eq!(
            pending[1],
            (
                "Ready".into(),
                "False".into(),
                "Pending".into(),
                "waiting for the fleet hub".into()
            )
        );
        let conflict = HubStatus {
            conflict_reason: "PortConflict".into(),
            conflict_message: "port 80 differs".into(),
            included: true,
        };
        let c = conditions(&e, Some(&conflict));
        assert_eq!(c[1].2, "Exported");
        assert_eq!(
            (c[2].0.as_str(), c[2].1.as_str(), c[2].2.as_str()),
            ("Conflict", "True", "PortConflict")
        );
    }
}
