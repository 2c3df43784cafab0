//! The import side of MCS: for every fleet-wide service the hub sends, the agent keeps the
//! derived `ServiceImport` and one EndpointSlice per exporting cluster (labelled
//! `multicluster.kubernetes.io/source-cluster`) in each namespace the cluster has, for the
//! tools that read MCS objects (CoreDNS `multicluster`, Cilium's MCS-API support). They go
//! when the last export goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::v1;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::exports::{ExportWatch, MCS_GROUP, now_rfc3339};

/// Labels every object the agent derives, so it finds (and deletes) only its own.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "flotilla-agent";
/// The EndpointSlice controller label; not `endpointslice-controller.k8s.io`, so the
/// cluster's own controller leaves these slices alone.
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The value of [`SLICE_MANAGED_BY_LABEL`].
pub const SLICE_MANAGED_BY: &str = "flotilla.io/agent";
/// The MCS label naming an imported slice's service.
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
/// The MCS label naming an imported slice's exporting cluster.
pub const SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";

/// Imported services by `(namespace, name)`.
pub type Imports = BTreeMap<(String, String), v1::ImportedService>;

/// What the hub says the cluster imports, and the writer that keeps the cluster's objects so.
#[derive(Clone)]
pub struct ImportSync {
    desired: Arc<watch::Sender<Option<Arc<Imports>>>>,
    /// The cluster's namespaces (not terminating), once listed.
    namespaces: watch::Receiver<Option<Vec<String>>>,
}

impl ImportSync {
    /// Start the namespace reflector and the writer; they run until `shutdown`. The
    /// ServiceImport version follows the ServiceExports' (`exports`).
    pub fn start(client: Client, exports: ExportWatch, shutdown: CancellationToken) -> Self {
        let (desired, _) = watch::channel(None);
        let desired = Arc::new(desired);
        let (tx, ns_changes) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let namespaces = crate::exports::reflect::<Namespace>(
            Api::all(client.clone()),
            (),
            "namespaces",
            &tx,
            &shutdown,
        );
        let (names_tx, names) = watch::channel(None);
        tokio::spawn(
            namespace_names(
                namespaces.clone(),
                ns_changes.clone(),
                names_tx,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("agent-namespaces")),
        );
        let w = Writer {
            client,
            exports,
            namespaces,
            ns_changes,
            desired: desired.subscribe(),
            applied: BTreeMap::new(),
        };
        tokio::spawn(
            w.run(shutdown)
                .instrument(tracing::info_span!("agent-imports")),
        );
        Self {
            desired,
            namespaces: names,
        }
    }

    /// The cluster's namespaces, sorted (`None` until listed): the hub sends only their
    /// services.
    pub fn namespaces(&self) -> watch::Receiver<Option<Vec<String>>> {
        self.namespaces.clone()
    }

    /// Apply an update from the hub.
    pub fn apply(&self, u: v1::ImportsUpdate) {
        self.desired.send_modify(|d| {
            let mut next = match (u.full, d.as_deref()) {
                (false, Some(cur)) => cur.clone(),
                _ => Imports::new(),
            };
            for r in &u.remove {
                if let Some((ns, name)) = r.split_once('/') {
                    next.remove(&(ns.to_string(), name.to_string()));
                }
            }
            for i in u.upsert {
                next.insert((i.namespace.clone(), i.name.clone()), i);
            }
            *d = Some(Arc::new(next));
        });
    }
}

/// Keeps `out` equal to the cluster's namespace names (not terminating) once the reflector
/// has listed them.
async fn namespace_names(
    store: Store<Namespace>,
    mut changes: watch::Receiver<u64>,
    out: watch::Sender<Option<Vec<String>>>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        r = store.wait_until_ready() => if r.is_err() { return },
    }
    loop {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        names.sort();
        out.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&names);
            if changed {
                *cur = Some(names);
            }
            changed
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// The derived objects for one imported service: the ServiceImport (without status), its
/// status, and the EndpointSlices by name (without the owner reference, added at write time).
/// Pure.
pub fn derived(
    i: &v1::ImportedService,
    api_version: &str,
) -> (Value, Value, BTreeMap<String, Value>) {
    let headless = i.r#type == v1::ServiceType::Headless as i32;
    let mut labels: BTreeMap<String, String> = i.labels.clone().into_iter().collect();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let annotations: BTreeMap<String, String> = i.annotations.clone().into_iter().collect();
    let ports: Vec<Value> = i.ports.iter().map(port_json).collect();
    let mut families: Vec<&str> = i
        .ips
        .iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|a| if a.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    families.dedup();
    let import = json!({
        "apiVersion": api_version,
        "kind": "ServiceImport",
        "metadata": {"name": i.name, "namespace": i.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "type": if headless { "Headless" } else { "ClusterSetIP" },
            "ports": ports,
            "ips": i.ips,
            "ipFamilies": families,
            "sessionAffinity": if i.session_affinity_client_ip { "ClientIP" } else { "None" },
        },
    });
    let ready = i
        .clusters
        .iter()
        .any(|c| c.endpoints.iter().any(|e| e.ready));
    let status = json!({
        "clusters": i.clusters.iter().map(|c| json!({"cluster": c.cluster})).collect::<Vec<_>>(),
        "conditions": [{
            "type": "Ready",
            "status": if ready { "True" } else { "False" },
            "reason": if ready { "Ready" } else { "Pending" },
            "message": if ready { "imported from the fleet".to_string() } else { "no exporting cluster has a ready endpoint".to_string() },
        }],
    });
    let mut slices = BTreeMap::new();
    for c in &i.clusters {
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let endpoints: Vec<Value> = c
                .endpoints
                .iter()
                .filter(|e| e.address.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6() == v6))
                .map(|e| {
                    let mut v = json!({
                        "addresses": [e.address],
                        "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                    });
                    if !e.hostname.is_empty() {
                        v["hostname"] = json!(e.hostname);
                    }
                    if !e.zone.is_empty() {
                        v["zone"] = json!(e.zone);
                    }
                    v
                })
                .collect();
            // An IPv4 slice always (it names the cluster even with no endpoints); IPv6 only
            // when there are IPv6 endpoints.
            if v6 && endpoints.is_empty() {
                continue;
            }
            let name = slice_name(&i.name, &c.cluster, v6);
            slices.insert(
                name.clone(),
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": name, "namespace": i.namespace, "labels": {
                        MCS_SERVICE_NAME_LABEL: i.name,
                        SOURCE_CLUSTER_LABEL: c.cluster,
                        SLICE_MANAGED_BY_LABEL: SLICE_MANAGED_BY,
                        MANAGED_BY_LABEL: MANAGED_BY,
                    }},
                    "addressType": family,
                    "endpoints": endpoints,
                    "ports": c.ports.iter().map(port_json).collect::<Vec<_>>(),
                }),
            );
        }
    }
    (import, status, slices)
}

fn port_json(p: &v1::ServicePort) -> Value {
    let mut v = json!({"name": p.name, "protocol": if p.protocol.is_empty() { "TCP" } else { &p.protocol }, "port": p.port});
    if !p.app_protocol.is_empty() {
        v["appProtocol"] = json!(p.app_protocol);
    }
    v
}

/// A slice name unique per service and cluster: `<service>-<cluster>-<hash>` (the hash
/// separates `a-b`+`c` from `a`+`b-c`), cut to fit the 253-character limit.
pub fn slice_name(service: &str, cluster: &str, v6: bool) -> String {
    // FNV-1a over both names, separated.
    let mut h: u32 = 0x811c_9dc5;
    for b in service.bytes().chain([0]).chain(cluster.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let suffix = format!("-{h:08x}{}", if v6 { "-v6" } else { "" });
    let mut base = format!("{service}-{cluster}");
    base.truncate(253 - suffix.len());
    base + &suffix
}

struct Writer {
    client: Client,
    exports: ExportWatch,
    namespaces: Store<Namespace>,
    ns_changes: watch::Receiver<u64>,
    desired: watch::Receiver<Option<Arc<Imports>>>,
    /// What was last written per service (skips unchanged writes).
    applied: BTreeMap<(String, String), v1::ImportedService>,
}

impl Writer {
    async fn run(mut self, shutdown: CancellationToken) {
        // Failed writes are retried on the next pass; a pass runs at least this often.
        let mut retry = tokio::time::interval(Duration::from_secs(10));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.desired.changed() => if r.is_err() { return },
                r = self.ns_changes.changed() => if r.is_err() { return },
                _ = retry.tick() => {}
            }
            // Coalesce a burst of updates.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let Some(want) = self.desired.borrow_and_update().clone() else {
                continue;
            };
            self.ns_changes.borrow_and_update();
            let Some(version) = self.exports.version().map(String::from) else {
                continue;
            };
            if let Err(e) = self.pass(&want, &version).await {
                tracing::warn!(error = %e, "could not bring the ServiceImports up to date; retrying");
            }
        }
    }

    async fn pass(&mut self, want: &Imports, version: &str) -> Result<(), kube::Error> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(MCS_GROUP, version, "ServiceImport"),
            "serviceimports",
        );
        // Namespace sameness: only where the namespace exists (and is not going away).
        let namespaces: BTreeSet<String> = self
            .namespaces
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let wanted: Vec<(&(String, String), &v1::ImportedService)> = want
            .iter()
            .filter(|(k, _)| namespaces.contains(&k.0))
            .collect();
        self.applied
            .retain(|k, _| namespaces.contains(&k.0) && want.contains_key(k));
        let mut slice_names: BTreeSet<(String, String)> = BTreeSet::new();
        for (key, i) in &wanted {
            let (import, status, slices) = derived(i, &resource.api_version);
            slice_names.extend(slices.keys().map(|n| (key.0.clone(), n.clone())));
            if self.applied.get(*key) == Some(*i) {
                continue;
            }
            match self.write(&resource, import, status, slices).await {
                Ok(()) => {
                    self.applied.insert((*key).clone(), (*i).clone());
                }
                Err(e) => {
                    tracing::warn!(import = %format!("{}/{}", key.0, key.1), error = %e, "could not write a ServiceImport")
                }
            }
        }
        // What is ours and no longer wanted goes.
        let mine = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let imports: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        for o in imports.list(&mine).await? {
            let (ns, name) = (
                o.metadata.namespace.unwrap_or_default(),
                o.metadata.name.unwrap_or_default(),
            );
            if !namespaces.contains(&ns) || !want.contains_key(&(ns.clone(), name.clone())) {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &ns, &resource);
                ignore_missing(
                    api.delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )?;
            }
        }
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::all(self.client.clone());
        for o in slices.list(&mine).await? {
            let (ns, name) = (
                o.metadata.namespace.unwrap_or_default(),
                o.metadata.name.unwrap_or_default(),
            );
            if !slice_names.contains(&(ns.clone(), name.clone())) {
                let api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                    Api::namespaced(self.client.clone(), &ns);
                ignore_missing(
                    api.delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )?;
            }
        }
        Ok(())
    }

    /// Create or replace the ServiceImport, set its status, then its slices (owned by it, so
    /// the cluster's garbage collector removes them with it).
    async fn write(
        &self,
        resource: &ApiResource,
        mut import: Value,
        status: Value,
        slices: BTreeMap<String, Value>,
    ) -> Result<(), kube::Error> {
        let ns = import["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = import["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, resource);
        let obj: DynamicObject =
            serde_json::from_value(import.clone()).map_err(kube::Error::SerdeError)?;
        let stored = match api.get_opt(&name).await? {
            None => api.create(&PostParams::default(), &obj).await?,
            Some(cur) => {
                let same = cur.data.get("spec") == import.get("spec")
                    && cur.metadata.labels.as_ref().map(|l| json!(l))
                        == Some(import["metadata"]["labels"].clone())
                    && json!(cur.metadata.annotations.clone().unwrap_or_default())
                        == import["metadata"]["annotations"];
                if same {
                    cur
                } else {
                    import["metadata"]["resourceVersion"] = json!(cur.metadata.resource_version);
                    let obj: DynamicObject =
                        serde_json::from_value(import).map_err(kube::Error::SerdeError)?;
                    api.replace(&name, &PostParams::default(), &obj).await?
                }
            }
        };
        // Keep the condition's transition time while its status holds.
        let mut status = status;
        let now = now_rfc3339();
        if let Some(c) = status["conditions"][0].as_object_mut() {
            let kept = stored.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|old| old["type"] == "Ready" && old["status"] == c["status"])
                .and_then(|old| old["lastTransitionTime"].as_str().map(String::from));
            c.insert("lastTransitionTime".into(), json!(kept.unwrap_or(now)));
        }
        if stored.data.get("status") != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await?;
        }
        let owner = json!([{
            "apiVersion": resource.api_version,
            "kind": "ServiceImport",
            "name": name,
            "uid": stored.metadata.uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
        let sapi: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(self.client.clone(), &ns);
        for (sname, mut s) in slices {
            s["metadata"]["ownerReferences"] = owner.clone();
            match sapi.get_opt(&sname).await? {
                None => {
                    let obj = serde_json::from_value(s).map_err(kube::Error::SerdeError)?;
                    sapi.create(&PostParams::default(), &obj).await?;
                }
                Some(cur) => {
                    let cur_v = serde_json::to_value(&cur).map_err(kube::Error::SerdeError)?;
                    if cur_v["endpoints"] == s["endpoints"]
                        && cur_v["ports"] == s["ports"]
                        && cur_v["metadata"]["ownerReferences"] == s["metadata"]["ownerReferences"]
                    {
                        continue;
                    }
                    s["metadata"]["resourceVersion"] = json!(cur.metadata.resource_version);
                    let obj = serde_json::from_value(s).map_err(kube::Error::SerdeError)?;
                    sapi.replace(&sname, &PostParams::default(), &obj).await?;
                }
            }
        }
        Ok(())
    }
}

fn ignore_missing(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(headless: bool) -> v1::ImportedService {
        v1::ImportedService {
            namespace: "ml".into(),
            name: "llm".into(),
            r#type: if headless {
                v1::ServiceType::Headless
            } else {
                v1::ServiceType::ClusterSetIp
            } as i32,
            ports: vec![v1::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8000,
                app_protocol: String::new(),
            }],
            ips: if headless {
                vec![]
            } else {
                vec!["198.18.0.1".into()]
            },
            session_affinity_client_ip: false,
            labels: [("team".to_string(), "a".to_string())]
                .into_iter()
                .collect(),
            annotations: Default::default(),
            clusters: vec![
                v1::ImportedCluster {
                    cluster: "eu-a".into(),
                    ports: vec![],
                    endpoints: vec![
                        v1::ServiceEndpoint {
                            address: "10.0.0.1".into(),
                            hostname: "llm-0".into(),
                            zone: "z1".into(),
                            ready: true,
                            serving: true,
                            terminating: false,
                        },
                        v1::ServiceEndpoint {
                            address: "fd00::1".into(),
                            ready: false,
                            ..Default::default()
                        },
                    ],
                },
                v1::ImportedCluster {
                    cluster: "us".into(),
                    ports: vec![],
                    endpoints: vec![],
                },
            ],
        }
    }

    #[test]
    fn an_import_derives_its_service_import_and_a_slice_per_cluster_and_family() {
        let (si, status, slices) = derived(&import(false), "multicluster.x-k8s.io/v1beta1");
        assert_eq!(si["spec"]["type"], "ClusterSetIP");
        assert_eq!(si["spec"]["ips"], json!(["198.18.0.1"]));
        assert_eq!(si["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(si["metadata"]["labels"]["team"], "a");
        assert_eq!(si["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            status["clusters"],
            json!([{"cluster": "eu-a"}, {"cluster": "us"}])
        );
        assert_eq!(status["conditions"][0]["status"], "True");
        // eu-a: IPv4 and IPv6; us: an empty IPv4 slice that still names it.
        assert_eq!(slices.len(), 3);
        let v4 = &slices[&slice_name("llm", "eu-a", false)];
        assert_eq!(v4["metadata"]["labels"][SOURCE_CLUSTER_LABEL], "eu-a");
        assert_eq!(v4["metadata"]["labels"][MCS_SERVICE_NAME_LABEL], "llm");
        assert!(
            v4["metadata"]["labels"]
                .get("kubernetes.io/service-name")
                .is_none()
        );
        assert_eq!(v4["endpoints"][0]["hostname"], "llm-0");
        assert_eq!(v4["endpoints"][0]["zone"], "z1");
        assert_eq!(
            slices[&slice_name("llm", "eu-a", true)]["addressType"],
            "IPv6"
        );
        assert_eq!(
            slices[&slice_name("llm", "us", false)]["endpoints"],
            json!([])
        );
    }

    #[test]
    fn a_headless_import_has_no_ips_and_is_pending_without_ready_endpoints() {
        let mut i = import(true);
        i.clusters[0].endpoints[0].ready = false;
        let (si, status, _) = derived(&i, "multicluster.x-k8s.io/v1alpha1");
        assert_eq!(si["spec"]["type"], "Headless");
        assert_eq!(si["spec"]["ips"], json!([]));
        assert_eq!(si["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
        assert_eq!(status["conditions"][0]["reason"], "Pending");
    }

    #[test]
    fn slice_names_do_not_collide_across_dashes_and_fit() {
        assert_ne!(slice_name("a-b", "c", false), slice_name("a", "b-c", false));
        assert!(slice_name(&"x".repeat(250), "c", true).len() <= 253);
    }

    #[test]
    fn updates_replace_when_full_and_merge_otherwise() {
        let (tx, _) = watch::channel(None);
        let s = ImportSync {
            desired: Arc::new(tx),
            namespaces: watch::channel(None).1,
        };
        let mut a = import(false);
        s.apply(v1::ImportsUpdate {
            full: true,
            upsert: vec![a.clone()],
            remove: vec![],
        });
        a.name = "other".into();
        s.apply(v1::ImportsUpdate {
            full: false,
            upsert: vec![a.clone()],
            remove: vec![],
        });
        assert_eq!(s.desired.borrow().as_ref().unwrap().len(), 2);
        s.apply(v1::ImportsUpdate {
            full: false,
            upsert: vec![],
            remove: vec!["ml/llm".into()],
        });
        let d = s.desired.borrow().clone().unwrap();
        assert_eq!(
            d.keys().cloned().collect::<Vec<_>>(),
            vec![("ml".to_string(), "other".to_string())]
        );
        s.apply(v1::ImportsUpdate {
            full: true,
            upsert: vec![],
            remove: vec![],
        });
        assert!(s.desired.borrow().as_ref().unwrap().is_empty());
    }
}
