//! The simulated control plane of one cluster: API-server defaulting, and kwok-like
//! controllers (MachineDeployments, kubelets, device plugins, DaemonSets, Deployments,
//! ReplicaSets, the scheduler, EndpointSlices, PDB status, garbage collection) plus eviction.
//!
//! Controllers run as one reconcile pass over the in-memory store, repeated until nothing
//! changes; they only write when an object's meaningful content differs, so an idle cluster
//! produces no watch events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::faults::Fault;
use crate::gpu::{self, NodeParams, SIMULATED_ANNOTATION};
use crate::quantity::parse_milli;
use crate::resources::idx;
use crate::scenario::{CAPI_POOL_LABEL, ClusterSpec, IntOrPercent, PoolSpec, WorkloadSpec};
use crate::selector::LabelSelector;
use crate::store::{ApiError, Obj, Store, now_rfc3339, random_suffix};

/// Namespace of the MachineDeployments that back scenario pools.
pub const MD_NAMESPACE: &str = "default";
/// Annotation on a pod template asking for N GPUs through a DRA ResourceClaim.
pub const DRA_GPUS_ANNOTATION: &str = "sim.flotilla.dev/dra-gpus";
/// The device plugin DaemonSet every GPU cluster runs (when the scenario asks for it).
pub const DEVICE_PLUGIN_DS: &str = "nvidia-device-plugin-daemonset";

/// Requests placed on each node (milli-units by resource).
type NodeUsage = HashMap<String, BTreeMap<String, i128>>;
/// A DRA device: (pool, device name).
type DeviceKey = (String, String);
/// DRA devices already allocated.
type DeviceSet = HashSet<DeviceKey>;

/// Simulator bookkeeping for a node it created.
#[derive(Debug, Clone)]
struct NodeSim {
    born: Instant,
    template: String,
    md: (String, String),
    failed_gpus: u32,
    not_ready: bool,
    slice_generation: i64,
}

/// The state of one simulated cluster behind its lock.
pub struct SimState {
    /// The object store.
    pub store: Store,
    spec: ClusterSpec,
    index: u32,
    templates: BTreeMap<String, PoolSpec>,
    nodes: HashMap<String, NodeSim>,
    bound: HashMap<(String, String), Instant>,
    unready_pods: HashSet<(String, String)>,
    md_counter: HashMap<(String, String), u32>,
    next_node_ip: u32,
    next_pod_ip: u32,
    next_svc_ip: u32,
}

fn meta_str<'a>(o: &'a Value, f: &str) -> &'a str {
    o["metadata"][f].as_str().unwrap_or("")
}

fn ns_name(o: &Value) -> (String, String) {
    (
        meta_str(o, "namespace").to_string(),
        meta_str(o, "name").to_string(),
    )
}

/// Sum of a pod's requests as `kubectl describe node` computes them: containers summed,
/// max'd against each init container, plus overhead. Values in milli-units.
pub fn pod_requests(pod: &Value) -> BTreeMap<String, i128> {
    let mut sum: BTreeMap<String, i128> = BTreeMap::new();
    let read = |c: &Value| -> BTreeMap<String, i128> {
        let mut m = BTreeMap::new();
        if let Some(r) = c["resources"]["requests"].as_object() {
            for (k, v) in r {
                if let Some(q) = v.as_str().and_then(|s| parse_milli(s).ok()) {
                    m.insert(k.clone(), q);
                }
            }
        }
        m
    };
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for (k, v) in read(c) {
            *sum.entry(k).or_default() += v;
        }
    }
    for c in pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for (k, v) in read(c) {
            let e = sum.entry(k).or_default();
            *e = (*e).max(v);
        }
    }
    if let Some(o) = pod["spec"]["overhead"].as_object() {
        for (k, v) in o {
            if let Some(q) = v.as_str().and_then(|s| parse_milli(s).ok()) {
                *sum.entry(k.clone()).or_default() += q;
            }
        }
    }
    sum
}

fn is_terminal(pod: &Value) -> bool {
    matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

fn condition(o: &Value, t: &str) -> Option<String> {
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .and_then(|c| c["status"].as_str().map(String::from))
}

/// Whether a node's Ready condition is True.
pub fn node_ready(node: &Value) -> bool {
    condition(node, "Ready").as_deref() == Some("True")
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &Value) -> bool {
    condition(pod, "Ready").as_deref() == Some("True")
}

fn tolerates(pod: &Value, taint: &Value) -> bool {
    let effect = taint["effect"].as_str().unwrap_or("");
    if effect == "PreferNoSchedule" {
        return true;
    }
    pod["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| {
            let key_ok = match t["operator"].as_str().unwrap_or("Equal") {
                "Exists" => t["key"].as_str().unwrap_or("").is_empty() || t["key"] == taint["key"],
                _ => {
                    t["key"] == taint["key"]
                        && t["value"].as_str().unwrap_or("")
                            == taint["value"].as_str().unwrap_or("")
                }
            };
            let effect_ok =
                t["effect"].as_str().unwrap_or("").is_empty() || t["effect"] == taint["effect"];
            key_ok && effect_ok
        })
}

fn owner_uid<'a>(o: &'a Value, kind: &str) -> Option<&'a str> {
    o["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["controller"].as_bool().unwrap_or(false))
        .and_then(|r| r["uid"].as_str())
}

fn owner_ref(owner: &Value) -> Value {
    json!([{
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

fn scaled(v: &Value, total: i64, round_up: bool) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => {
            if let Some(p) = s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
                let x = p * total;
                if round_up { (x + 99) / 100 } else { x / 100 }
            } else {
                s.parse().unwrap_or(0)
            }
        }
        _ => 0,
    }
}

/// A PDB's health as the disruption controller computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdbHealth {
    /// Pods the PDB covers.
    pub expected: i64,
    /// Ready pods it covers.
    pub current_healthy: i64,
    /// Ready pods it requires.
    pub desired_healthy: i64,
    /// Evictions allowed now.
    pub disruptions_allowed: i64,
}

impl SimState {
    /// A cluster built from its spec: namespaces, pools (as MachineDeployments) and workloads.
    pub fn new(spec: ClusterSpec, index: u32, history: usize) -> Self {
        let mut s = Self {
            store: Store::new(history),
            templates: spec
                .pools
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            spec,
            index,
            nodes: HashMap::new(),
            bound: HashMap::new(),
            unready_pods: HashSet::new(),
            md_counter: HashMap::new(),
            next_node_ip: 10,
            next_pod_ip: 10,
            next_svc_ip: 10,
        };
        s.seed();
        s
    }

    /// The cluster's spec.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    fn seed(&mut self) {
        let spec = self.spec.clone();
        for p in &spec.pools {
            let md = json!({
                "apiVersion": "cluster.x-k8s.io/v1beta1",
                "kind": "MachineDeployment",
                "metadata": {"name": p.name, "labels": {"cluster.x-k8s.io/cluster-name": spec.name},
                             "annotations": {SIMULATED_ANNOTATION: "true"}},
                "spec": {
                    "clusterName": spec.name,
                    "replicas": p.count,
                    "selector": {"matchLabels": {CAPI_POOL_LABEL: p.name}},
                    "template": {
                        "metadata": {"labels": {CAPI_POOL_LABEL: p.name}},
                        "spec": {
                            "clusterName": spec.name,
                            "version": spec.kubernetes_version,
                            "bootstrap": {"dataSecretName": format!("{}-bootstrap", p.name)},
                            "infrastructureRef": {
                                "apiVersion": "infrastructure.sim.flotilla.dev/v1alpha1",
                                "kind": "SimMachineTemplate",
                                "name": p.name,
                            },
                        },
                    },
                },
            });
            self.create(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, md)
                .expect("seed md");
        }
        if spec.device_plugin_daemonset && spec.pools.iter().any(|p| p.gpu.is_some()) {
            let ds = json!({
                "metadata": {"name": DEVICE_PLUGIN_DS, "labels": {"app": "nvidia-device-plugin"}},
                "spec": {
                    "selector": {"matchLabels": {"app": "nvidia-device-plugin"}},
                    "template": {
                        "metadata": {"labels": {"app": "nvidia-device-plugin"}},
                        "spec": {
                            "nodeSelector": {"nvidia.com/gpu.present": "true"},
                            "tolerations": [{"operator": "Exists"}],
                            "priorityClassName": "system-node-critical",
                            "containers": [{"name": "nvidia-device-plugin-ctr",
                                            "image": "nvcr.io/nvidia/k8s-device-plugin:v0.17.0",
                                            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}}],
                        },
                    },
                },
            });
            self.create(idx::DAEMONSETS, "kube-system", ds)
                .expect("seed ds");
        }
        for w in &spec.workloads {
            self.seed_workload(w);
        }
    }

    fn seed_workload(&mut self, w: &WorkloadSpec) {
        if self.store.get(idx::NAMESPACES, "", &w.namespace).is_err() {
            self.create(
                idx::NAMESPACES,
                "",
                json!({"metadata": {"name": w.namespace}}),
            )
            .expect("ns");
        }
        let labels = json!({"app": w.name});
        let mut container = json!({
            "name": "server",
            "image": format!("registry.sim/{}:latest", w.name),
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        });
        let mut annotations = json!({});
        if w.gpus > 0 {
            if w.dra {
                annotations[DRA_GPUS_ANNOTATION] = json!(w.gpus.to_string());
            } else {
                let r = w
                    .resource
                    .clone()
                    .unwrap_or_else(|| "nvidia.com/gpu".into());
                container["resources"]["requests"][&r] = json!(w.gpus.to_string());
                container["resources"]["limits"][&r] = json!(w.gpus.to_string());
            }
        }
        if let Some(svc) = &w.service {
            container["ports"] = json!([{"name": "http", "containerPort": svc.target_port.unwrap_or(svc.port), "protocol": "TCP"}]);
        }
        let mut pod_spec = json!({
            "containers": [container],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        });
        if !w.node_selector.is_empty() {
            pod_spec["nodeSelector"] = json!(w.node_selector);
        }
        if w.empty_dir {
            pod_spec["volumes"] = json!([{"name": "model-cache", "emptyDir": {}}]);
            pod_spec["containers"][0]["volumeMounts"] =
                json!([{"name": "model-cache", "mountPath": "/cache"}]);
        }
        let deploy = json!({
            "metadata": {"name": w.name, "labels": labels},
            "spec": {
                "replicas": w.replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
            },
        });
        self.create(idx::DEPLOYMENTS, &w.namespace, deploy)
            .expect("deploy");
        if let Some(pdb) = &w.pdb {
            let mut spec = json!({"selector": {"matchLabels": labels}});
            let iop = |v: &IntOrPercent| match v {
                IntOrPercent::Int(i) => json!(i),
                IntOrPercent::Str(s) => json!(s),
            };
            if let Some(v) = &pdb.min_available {
                spec["minAvailable"] = iop(v);
            }
            if let Some(v) = &pdb.max_unavailable {
                spec["maxUnavailable"] = iop(v);
            }
            self.create(
                idx::PDBS,
                &w.namespace,
                json!({"metadata": {"name": w.name}, "spec": spec}),
            )
            .expect("pdb");
        }
        if let Some(svc) = &w.service {
            let s = json!({
                "metadata": {"name": w.name, "labels": labels},
                "spec": {"selector": labels, "ports": [{"name": "http", "port": svc.port,
                         "targetPort": svc.target_port.unwrap_or(svc.port), "protocol": "TCP"}]},
            });
            self.create(idx::SERVICES, &w.namespace, s).expect("svc");
            if w.export {
                self.create(
                    idx::SERVICEEXPORTS,
                    &w.namespace,
                    json!({"metadata": {"name": w.name}}),
                )
                .expect("export");
            }
        }
    }

    // ----- writes with API-server defaulting -----

    /// Create with the API server's defaulting (pod status, limits→requests, ClusterIP).
    pub fn create(&mut self, res: usize, ns: &str, mut obj: Value) -> Result<Obj, ApiError> {
        self.default_object(res, &mut obj);
        self.store.create(res, ns, obj)
    }

    fn default_object(&mut self, res: usize, obj: &mut Value) {
        if !obj.is_object() {
            return;
        }
        match res {
            idx::PODS => {
                let spec = &mut obj["spec"];
                if spec.is_object() {
                    for c in spec["containers"].as_array_mut().into_iter().flatten() {
                        // Extended resources: a limit with no request means request == limit.
                        if let Some(limits) = c["resources"]["limits"].as_object().cloned() {
                            for (k, v) in limits {
                                if c["resources"]["requests"].get(&k).is_none() {
                                    c["resources"]["requests"][&k] = v;
                                }
                            }
                        }
                    }
                    if spec.get("schedulerName").is_none() {
                        spec["schedulerName"] = json!("default-scheduler");
                    }
                    if spec.get("restartPolicy").is_none() {
                        spec["restartPolicy"] = json!("Always");
                    }
                    if spec.get("terminationGracePeriodSeconds").is_none() {
                        spec["terminationGracePeriodSeconds"] = json!(30);
                    }
                }
                if obj.get("status").is_none_or(|s| s.get("phase").is_none()) {
                    obj["status"] = json!({"phase": "Pending", "qosClass": "Burstable"});
                }
            }
            idx::SERVICES => {
                let spec = &mut obj["spec"];
                if spec.get("type").is_none() {
                    spec["type"] = json!("ClusterIP");
                }
                if spec["type"] != "ExternalName" && spec.get("clusterIP").is_none() {
                    let n = self.next_svc_ip;
                    self.next_svc_ip += 1;
                    let ip = format!("10.96.{}.{}", n / 256, n % 256);
                    spec["clusterIP"] = json!(ip);
                    spec["clusterIPs"] = json!([ip]);
                }
                for p in spec["ports"].as_array_mut().into_iter().flatten() {
                    if p.get("protocol").is_none() {
                        p["protocol"] = json!("TCP");
                    }
                    if p.get("targetPort").is_none() {
                        p["targetPort"] = p["port"].clone();
                    }
                }
                if spec.get("sessionAffinity").is_none() {
                    spec["sessionAffinity"] = json!("None");
                }
            }
            _ => {}
        }
    }

    // ----- faults -----

    /// Apply a node or pod fault (API faults live outside the lock).
    pub fn inject(&mut self, fault: &Fault) -> Result<(), ApiError> {
        match fault {
            Fault::NodeNotReady { node } => self.node_sim(node)?.not_ready = true,
            Fault::GpuFailure { node, count } => {
                let gpus = self.gpus_on(node)?;
                if *count > gpus {
                    return Err(ApiError::bad_request(format!(
                        "count: node {node} has {gpus} GPUs, cannot fail {count}"
                    )));
                }
                self.node_sim(node)?.failed_gpus = *count;
            }
            Fault::PodUnready { namespace, pod } => {
                self.store.get(idx::PODS, namespace, pod)?;
                self.unready_pods.insert((namespace.clone(), pod.clone()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Undo a node or pod fault.
    pub fn clear(&mut self, fault: &Fault) {
        match fault {
            Fault::NodeNotReady { node } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.not_ready = false;
                }
            }
            Fault::GpuFailure { node, .. } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.failed_gpus = 0;
                }
            }
            Fault::PodUnready { namespace, pod } => {
                self.unready_pods.remove(&(namespace.clone(), pod.clone()));
            }
            _ => {}
        }
    }

    /// Undo every node and pod fault.
    pub fn clear_all(&mut self) {
        for n in self.nodes.values_mut() {
            n.not_ready = false;
            n.failed_gpus = 0;
        }
        self.unready_pods.clear();
    }

    fn node_sim(&mut self, node: &str) -> Result<&mut NodeSim, ApiError> {
        self.nodes
            .get_mut(node)
            .ok_or_else(|| ApiError::not_found(idx::NODES, node))
    }

    fn gpus_on(&self, node: &str) -> Result<u32, ApiError> {
        let sim = self
            .nodes
            .get(node)
            .ok_or_else(|| ApiError::not_found(idx::NODES, node))?;
        Ok(self
            .templates
            .get(&sim.template)
            .and_then(|t| t.gpu.as_ref())
            .map_or(0, |g| g.count))
    }

    // ----- eviction -----

    fn pdb_health(&self, pdb: &Value) -> PdbHealth {
        let ns = meta_str(pdb, "namespace");
        let Ok(sel) = LabelSelector::from_object(&pdb["spec"]["selector"]) else {
            return PdbHealth {
                expected: 0,
                current_healthy: 0,
                desired_healthy: 0,
                disruptions_allowed: 0,
            };
        };
        let pods: Vec<&Obj> = self
            .store
            .iter(idx::PODS, Some(ns), None)
            .filter(|p| !is_terminal(p) && sel.matches(p))
            .collect();
        let healthy = pods.iter().filter(|p| pod_ready(p)).count() as i64;
        // Expected count comes from the owning controllers' scale, as the disruption
        // controller computes it; bare pods count as themselves.
        let mut expected = 0i64;
        let mut seen = HashSet::new();
        for p in &pods {
            match owner_uid(p, "ReplicaSet") {
                Some(uid) => {
                    if seen.insert(uid.to_string()) {
                        let rs = self
                            .store
                            .iter(idx::REPLICASETS, Some(ns), None)
                            .find(|r| meta_str(r, "uid") == uid);
                        expected += rs.and_then(|r| r["spec"]["replicas"].as_i64()).unwrap_or(1);
                    }
                }
                None => expected += 1,
            }
        }
        let desired = if let Some(min) = pdb["spec"].get("minAvailable") {
            scaled(min, expected, true)
        } else if let Some(max) = pdb["spec"].get("maxUnavailable") {
            (expected - scaled(max, expected, true)).max(0)
        } else {
            expected
        };
        PdbHealth {
            expected,
            current_healthy: healthy,
            desired_healthy: desired,
            disruptions_allowed: (healthy - desired).max(0),
        }
    }

    /// The eviction subresource: delete the pod unless a PDB forbids it (429).
    pub fn evict(&mut self, ns: &str, name: &str, dry_run: bool) -> Result<(), ApiError> {
        let pod = self.store.get(idx::PODS, ns, name)?;
        let pdbs: Vec<Obj> = self
            .store
            .iter(idx::PDBS, Some(ns), None)
            .filter(|pdb| {
                LabelSelector::from_object(&pdb["spec"]["selector"])
                    .is_ok_and(|s| !s.is_empty() && s.matches(&pod))
            })
            .cloned()
            .collect();
        if pdbs.len() > 1 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some(pdb) = pdbs.first()
            && !is_terminal(&pod)
        {
            let h = self.pdb_health(pdb);
            let allowed = if pod_ready(&pod) {
                h.disruptions_allowed > 0
            } else {
                // unhealthyPodEvictionPolicy IfHealthyBudget (the default).
                h.current_healthy >= h.desired_healthy
            };
            if !allowed {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                // No Retry-After, as the API server (clients retry on their own schedule).
                e.details = Some(json!({"causes": [{
                    "reason": "DisruptionBudget",
                    "message": format!(
                        "The disruption budget {} needs {} healthy pods and has {} currently",
                        meta_str(pdb, "name"), h.desired_healthy, h.current_healthy
                    ),
                }]}));
                return Err(e);
            }
        }
        if !dry_run {
            self.store.delete(idx::PODS, ns, name)?;
        }
        Ok(())
    }

    // ----- controllers -----

    /// Every object of a type (a snapshot the controller can iterate while writing).
    fn all(&self, res: usize) -> Vec<Obj> {
        self.store.iter(res, None, None).cloned().collect()
    }

    /// Write an object's status; a no-op write does not bump the revision.
    fn set_status(&mut self, res: usize, ns: &str, name: &str, status: Value) {
        let _ = self
            .store
            .update(res, ns, name, json!({ "status": status }), true);
    }

    /// Run every controller until nothing changes. Returns when the next timed transition is due.
    pub fn reconcile(&mut self, now: Instant) -> Option<Instant> {
        let mut next = None;
        for _ in 0..8 {
            let before = self.store.revision();
            next = None;
            self.machine_deployments(now);
            self.kubelets(now, &mut next);
            self.daemonsets();
            self.deployments();
            self.replicasets();
            self.garbage_collect();
            self.schedule(now);
            self.pod_lifecycle(now, &mut next);
            self.endpoint_slices();
            self.pdb_status();
            self.export_status();
            if self.store.revision() == before {
                break;
            }
        }
        next
    }

    fn machine_deployments(&mut self, now: Instant) {
        let mds = self.all(idx::MACHINEDEPLOYMENTS);
        let live: HashSet<(String, String)> = mds.iter().map(|m| ns_name(m)).collect();
        // Nodes of deleted MachineDeployments go away, as Cluster API deletes their machines.
        let orphans: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, s)| !live.contains(&s.md))
            .map(|(n, _)| n.clone())
            .collect();
        for n in orphans {
            self.delete_node(&n);
        }
        for md in mds {
            let key = ns_name(&md);
            let want = md["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            let template = md["spec"]["template"]["spec"]["infrastructureRef"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let version = md["spec"]["template"]["spec"]["version"]
                .as_str()
                .unwrap_or(&self.spec.kubernetes_version)
                .to_string();
            let mut mine: Vec<(Instant, String)> = self
                .nodes
                .iter()
                .filter(|(_, s)| s.md == key)
                .map(|(n, s)| (s.born, n.clone()))
                .collect();
            mine.sort();
            let Some(pool) = self.templates.get(&template).cloned() else {
                let status = json!({"phase": "Failed", "replicas": mine.len(),
                    "failureMessage": format!("machine template {template:?} does not exist; templates are the scenario's pool names")});
                self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
                continue;
            };
            while mine.len() < want {
                let name = format!("{}-{}", key.1, random_suffix(5));
                let counter = self.md_counter.entry(key.clone()).or_default();
                let zone = if self.spec.zones.is_empty() {
                    None
                } else {
                    Some(self.spec.zones[*counter as usize % self.spec.zones.len()].clone())
                };
                *counter += 1;
                let n = self.next_node_ip;
                self.next_node_ip += 1;
                let ip = format!("172.{}.{}.{}", 16 + self.index % 16, n / 256, n % 256);
                let node = gpu::new_node(&NodeParams {
                    cluster: &self.spec,
                    pool: &pool,
                    machine_deployment: &key.1,
                    name: &name,
                    zone: zone.as_deref(),
                    version: &version,
                    ip: &ip,
                });
                if self.store.create(idx::NODES, "", node).is_ok() {
                    self.nodes.insert(
                        name.clone(),
                        NodeSim {
                            born: now,
                            template: template.clone(),
                            md: key.clone(),
                            failed_gpus: 0,
                            not_ready: false,
                            slice_generation: 0,
                        },
                    );
                    mine.push((now, name));
                }
            }
            while mine.len() > want {
                let (_, n) = mine.pop().expect("non-empty");
                self.delete_node(&n);
            }
            let ready = mine
                .iter()
                .filter(|(_, n)| {
                    self.store
                        .get(idx::NODES, "", n)
                        .is_ok_and(|o| node_ready(&o))
                })
                .count();
            let phase = if mine.len() < want || ready < want {
                "ScalingUp"
            } else {
                "Running"
            };
            let status = json!({
                "observedGeneration": md["metadata"]["generation"],
                "replicas": mine.len(),
                "updatedReplicas": mine.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": mine.len().saturating_sub(ready),
                "phase": phase,
                "selector": format!("{CAPI_POOL_LABEL}={}", key.1),
            });
            self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
        }
    }

    fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        let _ = self.store.delete(idx::NODES, "", name);
    }

    fn kubelets(&mut self, now: Instant, next: &mut Option<Instant>) {
        let t = self.spec.timing.clone();
        let ready_after = Duration::from_millis(t.node_ready_ms);
        let plugin_after = ready_after + Duration::from_millis(t.device_plugin_ms);
        let mut want_slices: HashMap<String, Value> = HashMap::new();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let sim = self.nodes[&name].clone();
            let Some(pool) = self.templates.get(&sim.template).cloned() else {
                continue;
            };
            let Ok(node) = self.store.get(idx::NODES, "", &name) else {
                self.nodes.remove(&name);
                continue;
            };
            let age = now.saturating_duration_since(sim.born);
            let booted = age >= ready_after;
            let plugin = age >= plugin_after;
            if !booted {
                merge_deadline(next, sim.born + ready_after);
            } else if !plugin {
                merge_deadline(next, sim.born + plugin_after);
            }
            let ready = booted && !sim.not_ready;
            let mut allocatable = node["status"]["allocatable"].clone();
            if let Some(g) = &pool.gpu {
                for r in gpu::gpu_resources(g) {
                    // A node that stops reporting keeps its last status (allocatable stays).
                    let units = if plugin {
                        (i64::from(g.count) - i64::from(sim.failed_gpus)).max(0) * r.per_gpu
                    } else {
                        0
                    };
                    allocatable[&r.name] = json!(units.to_string());
                }
                if g.dra && plugin {
                    want_slices.insert(name.clone(), json!(sim.failed_gpus));
                }
            }
            let was_ready = node_ready(&node);
            if was_ready != ready || node["status"]["allocatable"] != allocatable {
                let mut status = node["status"].clone();
                status["allocatable"] = allocatable;
                if was_ready != ready {
                    status["conditions"] = if ready {
                        gpu::node_conditions(
                            "True",
                            "KubeletReady",
                            "kubelet is posting ready status",
                        )
                    } else if sim.not_ready {
                        gpu::node_conditions(
                            "Unknown",
                            "NodeStatusUnknown",
                            "Kubelet stopped posting node status.",
                        )
                    } else {
                        gpu::node_conditions(
                            "False",
                            "KubeletNotReady",
                            "container runtime network not ready (simulated start-up)",
                        )
                    };
                }
                self.set_status(idx::NODES, "", &name, status);
            }
        }
        // DRA: one slice per ready GPU node, regenerated when its healthy devices change.
        let existing = self.all(idx::RESOURCESLICES);
        for s in &existing {
            let node = s["spec"]["nodeName"].as_str().unwrap_or("");
            if s["spec"]["driver"] == gpu::NVIDIA_DRA_DRIVER
                && s["metadata"]["annotations"][SIMULATED_ANNOTATION] == "true"
                && !want_slices.contains_key(node)
            {
                let _ = self
                    .store
                    .delete(idx::RESOURCESLICES, "", meta_str(s, "name"));
            }
        }
        for (node, failed) in want_slices {
            let failed = failed.as_u64().unwrap_or(0) as u32;
            let sim = self.nodes.get(&node).cloned().expect("node sim");
            let g = self.templates[&sim.template].gpu.clone().expect("gpu");
            let current = existing
                .iter()
                .find(|s| s["spec"]["nodeName"] == node.as_str());
            let healthy = g.count.saturating_sub(failed) as usize;
            match current {
                Some(s) if s["spec"]["devices"].as_array().map_or(0, Vec::len) == healthy => {}
                Some(s) => {
                    let generation = sim.slice_generation + 1;
                    self.nodes.get_mut(&node).expect("sim").slice_generation = generation;
                    let mut new = gpu::resource_slice(&node, &g, failed, generation);
                    new["metadata"]["resourceVersion"] = s["metadata"]["resourceVersion"].clone();
                    let _ =
                        self.store
                            .update(idx::RESOURCESLICES, "", meta_str(s, "name"), new, false);
                }
                None => {
                    let generation = sim.slice_generation + 1;
                    self.nodes.get_mut(&node).expect("sim").slice_generation = generation;
                    let _ = self.store.create(
                        idx::RESOURCESLICES,
                        "",
                        gpu::resource_slice(&node, &g, failed, generation),
                    );
                }
            }
        }
    }

    fn daemonsets(&mut self) {
        let dss = self.all(idx::DAEMONSETS);
        let nodes = self.all(idx::NODES);
        for ds in dss {
            let (ns, name) = ns_name(&ds);
            let uid = meta_str(&ds, "uid").to_string();
            let template = &ds["spec"]["template"];
            let sel = LabelSelector::from_map(&template["spec"]["nodeSelector"]);
            let pods: Vec<Obj> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "DaemonSet") == Some(uid.as_str()))
                .cloned()
                .collect();
            let mut desired = 0;
            for node in nodes.iter().filter(|n| sel.matches(n)) {
                desired += 1;
                let node_name = meta_str(node, "name");
                if pods.iter().any(|p| p["spec"]["nodeName"] == node_name) {
                    continue;
                }
                let mut pod = json!({
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": template["metadata"]["labels"],
                        "ownerReferences": owner_ref(&ds),
                    },
                    "spec": template["spec"],
                });
                pod["spec"]["nodeName"] = json!(node_name);
                let _ = self.create(idx::PODS, &ns, pod);
            }
            // Pods whose node is gone or no longer selected.
            for p in &pods {
                let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                if !nodes
                    .iter()
                    .any(|n| meta_str(n, "name") == node && sel.matches(n))
                {
                    let _ = self.store.delete(idx::PODS, &ns, meta_str(p, "name"));
                }
            }
            let ready = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "DaemonSet") == Some(uid.as_str()) && pod_ready(p))
                .count();
            let status = json!({
                "observedGeneration": ds["metadata"]["generation"],
                "desiredNumberScheduled": desired,
                "currentNumberScheduled": desired,
                "numberMisscheduled": 0,
                "numberReady": ready,
                "numberAvailable": ready,
                "updatedNumberScheduled": desired,
            });
            self.set_status(idx::DAEMONSETS, &ns, &name, status);
        }
    }

    fn deployments(&mut self) {
        let deps = self.all(idx::DEPLOYMENTS);
        for d in deps {
            let (ns, name) = ns_name(&d);
            let uid = meta_str(&d, "uid").to_string();
            let rs_name = format!("{name}-{}", &uid.replace('-', "")[..10]);
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let mut template = d["spec"]["template"].clone();
            template["metadata"]["labels"]["pod-template-hash"] =
                json!(&uid.replace('-', "")[..10]);
            let rs_status = match self.store.get(idx::REPLICASETS, &ns, &rs_name) {
                Ok(rs) => {
                    if rs["spec"]["replicas"] != json!(replicas)
                        || rs["spec"]["template"] != template
                    {
                        let mut new = (*rs).clone();
                        new["spec"]["replicas"] = json!(replicas);
                        new["spec"]["template"] = template;
                        let _ = self
                            .store
                            .update(idx::REPLICASETS, &ns, &rs_name, new, false);
                    }
                    rs["status"].clone()
                }
                Err(_) => {
                    let mut selector = d["spec"]["selector"].clone();
                    selector["matchLabels"]["pod-template-hash"] =
                        template["metadata"]["labels"]["pod-template-hash"].clone();
                    let rs = json!({
                        "metadata": {"name": rs_name, "labels": template["metadata"]["labels"],
                                     "ownerReferences": owner_ref(&d)},
                        "spec": {"replicas": replicas, "selector": selector, "template": template},
                    });
                    let _ = self.create(idx::REPLICASETS, &ns, rs);
                    json!({})
                }
            };
            let ready = rs_status["readyReplicas"].as_i64().unwrap_or(0);
            let have = rs_status["replicas"].as_i64().unwrap_or(0);
            let status = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": have,
                "updatedReplicas": have,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": (replicas - ready).max(0),
            });
            self.set_status(idx::DEPLOYMENTS, &ns, &name, status);
        }
    }

    fn replicasets(&mut self) {
        let sets = self.all(idx::REPLICASETS);
        for rs in sets {
            let (ns, name) = ns_name(&rs);
            let uid = meta_str(&rs, "uid").to_string();
            let want = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            let mut pods: Vec<Obj> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && !is_terminal(p))
                .cloned()
                .collect();
            let template = &rs["spec"]["template"];
            while pods.len() < want {
                let mut pod = json!({
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": template["metadata"]["labels"],
                        "annotations": template["metadata"]["annotations"],
                        "ownerReferences": owner_ref(&rs),
                    },
                    "spec": template["spec"],
                });
                if pod["metadata"]["annotations"].is_null() {
                    pod["metadata"]
                        .as_object_mut()
                        .expect("meta")
                        .remove("annotations");
                }
                let dra = template["metadata"]["annotations"][DRA_GPUS_ANNOTATION]
                    .as_str()
                    .and_then(|n| n.parse::<i64>().ok());
                let Ok(created) = self.create(idx::PODS, &ns, pod) else {
                    break;
                };
                if let Some(count) = dra {
                    self.create_claim(&ns, &created, count);
                }
                pods.push(created);
            }
            if pods.len() > want {
                // Remove unscheduled, then not-ready pods first, as the ReplicaSet controller does.
                pods.sort_by_key(|p| (p["spec"]["nodeName"].is_string(), pod_ready(p)));
                for p in pods.iter().take(pods.len() - want) {
                    let _ = self.store.delete(idx::PODS, &ns, meta_str(p, "name"));
                }
                pods.truncate(want);
            }
            let count = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && !is_terminal(p))
                .count();
            let ready = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && pod_ready(p))
                .count();
            let status = json!({
                "observedGeneration": rs["metadata"]["generation"],
                "replicas": count,
                "fullyLabeledReplicas": count,
                "readyReplicas": ready,
                "availableReplicas": ready,
            });
            self.set_status(idx::REPLICASETS, &ns, &name, status);
        }
    }

    fn create_claim(&mut self, ns: &str, pod: &Obj, count: i64) {
        let pod_name = meta_str(pod, "name").to_string();
        let claim_name = format!("{pod_name}-gpu");
        let claim = json!({
            "metadata": {"name": claim_name, "ownerReferences": owner_ref(pod)},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                "deviceClassName": gpu::NVIDIA_DRA_DRIVER, "allocationMode": "ExactCount", "count": count}}]}},
        });
        if self.create(idx::RESOURCECLAIMS, ns, claim).is_ok() {
            let mut p = (**pod).clone();
            p["spec"]["resourceClaims"] = json!([{"name": "gpu", "resourceClaimName": claim_name}]);
            let _ = self.store.update(idx::PODS, ns, &pod_name, p, false);
            let mut st = (**pod).clone();
            st["status"]["resourceClaimStatuses"] =
                json!([{"name": "gpu", "resourceClaimName": claim_name}]);
            let _ = self.store.update(
                idx::PODS,
                ns,
                &pod_name,
                json!({"status": st["status"]}),
                true,
            );
        }
    }

    fn garbage_collect(&mut self) {
        // Objects whose controlling owner is gone are deleted (background cascading deletion).
        let uids = |s: &Store, res: usize| -> HashSet<String> {
            s.iter(res, None, None)
                .map(|o| meta_str(o, "uid").to_string())
                .collect()
        };
        let owners: HashMap<&str, HashSet<String>> = [
            ("Deployment", uids(&self.store, idx::DEPLOYMENTS)),
            ("ReplicaSet", uids(&self.store, idx::REPLICASETS)),
            ("DaemonSet", uids(&self.store, idx::DAEMONSETS)),
            ("Pod", uids(&self.store, idx::PODS)),
        ]
        .into_iter()
        .collect();
        for res in [idx::REPLICASETS, idx::PODS, idx::RESOURCECLAIMS] {
            let doomed: Vec<(String, String)> = self
                .store
                .iter(res, None, None)
                .filter(|o| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|r| {
                            let kind = r["kind"].as_str().unwrap_or("");
                            owners
                                .get(kind)
                                .is_some_and(|u| !u.contains(r["uid"].as_str().unwrap_or("")))
                        })
                })
                .map(|o| ns_name(o))
                .collect();
            for (ns, name) in doomed {
                let _ = self.store.delete(res, &ns, &name);
            }
        }
        // Pods bound to nodes that no longer exist (pod GC).
        let nodes: HashSet<String> = self
            .store
            .iter(idx::NODES, None, None)
            .map(|n| meta_str(n, "name").to_string())
            .collect();
        let lost: Vec<(String, String)> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !nodes.contains(n))
            })
            .map(|p| ns_name(p))
            .collect();
        for (ns, name) in lost {
            let _ = self.store.delete(idx::PODS, &ns, &name);
        }
        self.bound
            .retain(|k, _| self.store.get(idx::PODS, &k.0, &k.1).is_ok());
        let pods = &self.store;
        self.unready_pods
            .retain(|k| pods.get(idx::PODS, &k.0, &k.1).is_ok());
    }

    /// Requests already placed on each node, and DRA devices in use, by node.
    fn node_usage(&self) -> (NodeUsage, DeviceSet) {
        let mut used: HashMap<String, BTreeMap<String, i128>> = HashMap::new();
        for p in self.store.iter(idx::PODS, None, None) {
            if let Some(n) = p["spec"]["nodeName"].as_str()
                && !is_terminal(p)
            {
                let e = used.entry(n.to_string()).or_default();
                for (k, v) in pod_requests(p) {
                    *e.entry(k).or_default() += v;
                }
                *e.entry("pods".into()).or_default() += 1000;
            }
        }
        let mut devices = HashSet::new();
        for c in self.store.iter(idx::RESOURCECLAIMS, None, None) {
            for r in c["status"]["allocation"]["devices"]["results"]
                .as_array()
                .into_iter()
                .flatten()
            {
                devices.insert((
                    r["pool"].as_str().unwrap_or("").to_string(),
                    r["device"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        (used, devices)
    }

    fn schedule(&mut self, now: Instant) {
        let pending: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| p["spec"]["nodeName"].as_str().is_none_or(str::is_empty) && !is_terminal(p))
            .cloned()
            .collect();
        if pending.is_empty() {
            return;
        }
        let nodes = self.all(idx::NODES);
        let (mut used, mut dra_used) = self.node_usage();
        for pod in pending {
            let (ns, name) = ns_name(&pod);
            let req = pod_requests(&pod);
            let claims: Vec<Obj> = pod["spec"]["resourceClaims"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["resourceClaimName"].as_str())
                .filter_map(|c| self.store.get(idx::RESOURCECLAIMS, &ns, c).ok())
                .collect();
            let dra_want: i64 = claims
                .iter()
                .flat_map(|c| {
                    c["spec"]["devices"]["requests"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|r| r["exactly"]["count"].as_i64().unwrap_or(1))
                .sum();
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            let mut best: Option<(f64, String, Vec<DeviceKey>)> = None;
            for node in &nodes {
                let node_name = meta_str(node, "name");
                let sel = LabelSelector::from_map(&pod["spec"]["nodeSelector"]);
                if !node_ready(node) {
                    *reasons.entry("node(s) were not ready").or_default() += 1;
                    continue;
                }
                if node["spec"]["unschedulable"].as_bool().unwrap_or(false) {
                    *reasons.entry("node(s) were unschedulable").or_default() += 1;
                    continue;
                }
                if !sel.matches(node) {
                    *reasons
                        .entry("node(s) didn't match Pod's node affinity/selector")
                        .or_default() += 1;
                    continue;
                }
                let taints = node["spec"]["taints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !taints.iter().all(|t| tolerates(&pod, t)) {
                    *reasons
                        .entry("node(s) had untolerated taint(s)")
                        .or_default() += 1;
                    continue;
                }
                let alloc = &node["status"]["allocatable"];
                let u = used.get(node_name).cloned().unwrap_or_default();
                let mut fits = true;
                let mut score = 0.0;
                for (r, want) in req
                    .iter()
                    .chain(std::iter::once((&"pods".to_string(), &1000)))
                {
                    if *want == 0 {
                        continue;
                    }
                    let have = alloc[r]
                        .as_str()
                        .and_then(|q| parse_milli(q).ok())
                        .unwrap_or(0);
                    let in_use = u.get(r).copied().unwrap_or(0);
                    if in_use + want > have {
                        fits = false;
                        *reasons.entry(insufficient(r)).or_default() += 1;
                        break;
                    }
                    if r.contains('/') && have > 0 {
                        score += (in_use + want) as f64 / have as f64;
                    }
                }
                if !fits {
                    continue;
                }
                let mut picked = Vec::new();
                if dra_want > 0 {
                    let free: Vec<(String, String)> = self
                        .store
                        .iter(idx::RESOURCESLICES, None, None)
                        .filter(|s| {
                            s["spec"]["nodeName"] == node_name
                                && s["spec"]["driver"] == gpu::NVIDIA_DRA_DRIVER
                        })
                        .flat_map(|s| {
                            let pool = s["spec"]["pool"]["name"].as_str().unwrap_or("").to_string();
                            s["spec"]["devices"]
                                .as_array()
                                .cloned()
                                .unwrap_or_default()
                                .into_iter()
                                .map(move |d| {
                                    (pool.clone(), d["name"].as_str().unwrap_or("").to_string())
                                })
                        })
                        .filter(|k| !dra_used.contains(k))
                        .collect();
                    if (free.len() as i64) < dra_want {
                        *reasons.entry("cannot allocate all claims").or_default() += 1;
                        continue;
                    }
                    picked = free.into_iter().take(dra_want as usize).collect();
                }
                // Least-allocated wins (the default scheduler's spreading); name breaks ties.
                if best
                    .as_ref()
                    .is_none_or(|(s, n, _)| score < *s || (score == *s && node_name < n.as_str()))
                {
                    best = Some((score, node_name.to_string(), picked));
                }
            }
            match best {
                Some((_, node_name, picked)) => {
                    let mut bound = (*pod).clone();
                    bound["spec"]["nodeName"] = json!(node_name);
                    if self
                        .store
                        .update(idx::PODS, &ns, &name, bound, false)
                        .is_err()
                    {
                        continue;
                    }
                    let e = used.entry(node_name.clone()).or_default();
                    for (k, v) in &req {
                        *e.entry(k.clone()).or_default() += v;
                    }
                    *e.entry("pods".into()).or_default() += 1000;
                    // Allocate DRA devices to the pod's claims.
                    let mut devs = picked.into_iter();
                    for c in &claims {
                        let n = c["spec"]["devices"]["requests"][0]["exactly"]["count"]
                            .as_i64()
                            .unwrap_or(1);
                        let results: Vec<Value> = devs
                            .by_ref()
                            .take(n as usize)
                            .map(|(pool, device)| {
                                dra_used.insert((pool.clone(), device.clone()));
                                json!({"request": "gpu", "driver": gpu::NVIDIA_DRA_DRIVER, "pool": pool, "device": device})
                            })
                            .collect();
                        let status = json!({
                            "allocation": {
                                "devices": {"results": results},
                                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                                    {"key": "metadata.name", "operator": "In", "values": [node_name]}]}]},
                            },
                            "reservedFor": [{"resource": "pods", "name": name, "uid": pod["metadata"]["uid"]}],
                        });
                        self.set_status(idx::RESOURCECLAIMS, &ns, meta_str(c, "name"), status);
                    }
                    self.bound.insert((ns.clone(), name.clone()), now);
                    let mut status = pod["status"].clone();
                    status["conditions"] = json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]);
                    self.set_status(idx::PODS, &ns, &name, status);
                }
                None => {
                    let total = nodes.len();
                    let detail: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let message = format!("0/{total} nodes are available: {}.", detail.join(", "));
                    let current = pod["status"]["conditions"][0]["message"]
                        .as_str()
                        .unwrap_or("");
                    if current != message {
                        let mut status = pod["status"].clone();
                        status["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": message, "lastTransitionTime": now_rfc3339()}]);
                        self.set_status(idx::PODS, &ns, &name, status);
                    }
                }
            }
        }
    }

    fn pod_lifecycle(&mut self, now: Instant, next: &mut Option<Instant>) {
        let start = Duration::from_millis(self.spec.timing.pod_start_ms);
        let pods: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
                    && !is_terminal(p)
            })
            .cloned()
            .collect();
        for pod in pods {
            let (ns, name) = ns_name(&pod);
            let node_name = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            let Ok(node) = self.store.get(idx::NODES, "", &node_name) else {
                continue;
            };
            // Pods created already bound (DaemonSets, static placement) start counting now.
            let bound_at = *self.bound.entry((ns.clone(), name.clone())).or_insert(now);
            let started = now.saturating_duration_since(bound_at) >= start;
            if !started {
                merge_deadline(next, bound_at + start);
            }
            let running = started || pod["status"]["phase"] == "Running";
            let ready = running
                && node_ready(&node)
                && !self.unready_pods.contains(&(ns.clone(), name.clone()));
            let phase = if running { "Running" } else { "Pending" };
            if pod["status"]["phase"] == phase
                && pod_ready(&pod) == ready
                && pod["status"]["hostIP"].is_string()
            {
                continue;
            }
            let ts = now_rfc3339();
            let host_ip = node["status"]["addresses"][0]["address"].clone();
            let mut status = pod["status"].clone();
            status["phase"] = json!(phase);
            status["hostIP"] = host_ip.clone();
            status["hostIPs"] = json!([{"ip": host_ip}]);
            if status.get("startTime").is_none() {
                status["startTime"] = json!(ts);
            }
            let r = if ready { "True" } else { "False" };
            let cond = |t: &str, s: &str| json!({"type": t, "status": s, "lastTransitionTime": ts});
            status["conditions"] = json!([
                cond(
                    "PodReadyToStartContainers",
                    if running { "True" } else { "False" }
                ),
                cond("Initialized", "True"),
                cond("Ready", r),
                cond("ContainersReady", r),
                cond("PodScheduled", "True"),
            ]);
            if running {
                if !status["podIP"].is_string() {
                    let n = self.next_pod_ip;
                    self.next_pod_ip += 1;
                    let ip = format!("10.{}.{}.{}", 16 + self.index % 200, n / 256, n % 256);
                    status["podIP"] = json!(ip);
                    status["podIPs"] = json!([{"ip": ip}]);
                }
                let containers: Vec<Value> = pod["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        json!({"name": c["name"], "image": c["image"], "imageID": format!("sim://{}", c["image"].as_str().unwrap_or("")),
                               "containerID": format!("containerd://{}", uuid::Uuid::new_v4().simple()),
                               "ready": ready, "started": true, "restartCount": 0,
                               "state": {"running": {"startedAt": ts}}})
                    })
                    .collect();
                status["containerStatuses"] = json!(containers);
            }
            self.set_status(idx::PODS, &ns, &name, status);
        }
    }

    fn endpoint_slices(&mut self) {
        let services = self.all(idx::SERVICES);
        let mut keep: HashSet<(String, String)> = HashSet::new();
        for svc in services {
            let Some(selector) = svc["spec"]["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let sel = LabelSelector::from_map(&Value::Object(selector.clone()));
            let (ns, name) = ns_name(&svc);
            let slice_name = format!("{name}-sim");
            keep.insert((ns.clone(), slice_name.clone()));
            let mut endpoints: Vec<Value> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| sel.matches(p) && p["status"]["podIP"].is_string() && !is_terminal(p))
                .map(|p| {
                    let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                    let zone = self
                        .store
                        .get(idx::NODES, "", node)
                        .ok()
                        .and_then(|n| n["metadata"]["labels"]["topology.kubernetes.io/zone"].as_str().map(String::from));
                    let ready = pod_ready(p);
                    let mut e = json!({
                        "addresses": [p["status"]["podIP"]],
                        "conditions": {"ready": ready, "serving": ready, "terminating": false},
                        "nodeName": node,
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]},
                    });
                    if let Some(z) = zone {
                        e["zone"] = json!(z);
                    }
                    e
                })
                .collect();
            endpoints.sort_by(|a, b| {
                a["targetRef"]["name"]
                    .as_str()
                    .cmp(&b["targetRef"]["name"].as_str())
            });
            let ports: Vec<Value> = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p["targetPort"].as_i64().or(p["port"].as_i64()).unwrap_or(0);
                    json!({"name": p["name"].as_str().unwrap_or(""), "port": port, "protocol": p["protocol"].as_str().unwrap_or("TCP")})
                })
                .collect();
            let desired = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "labels": {"kubernetes.io/service-name": name,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                    "ownerReferences": owner_ref(&svc),
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            });
            match self.store.get(idx::ENDPOINTSLICES, &ns, &slice_name) {
                Ok(cur) => {
                    if cur["endpoints"] != desired["endpoints"] || cur["ports"] != desired["ports"]
                    {
                        let mut new = desired;
                        new["metadata"]["resourceVersion"] =
                            cur["metadata"]["resourceVersion"].clone();
                        let _ =
                            self.store
                                .update(idx::ENDPOINTSLICES, &ns, &slice_name, new, false);
                    }
                }
                Err(_) => {
                    let _ = self.store.create(idx::ENDPOINTSLICES, &ns, desired);
                }
            }
        }
        let stale: Vec<(String, String)> = self
            .store
            .iter(idx::ENDPOINTSLICES, None, None)
            .filter(|s| {
                s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                    == "endpointslice-controller.k8s.io"
            })
            .map(|s| ns_name(s))
            .filter(|k| !keep.contains(k))
            .collect();
        for (ns, name) in stale {
            let _ = self.store.delete(idx::ENDPOINTSLICES, &ns, &name);
        }
    }

    fn pdb_status(&mut self) {
        let pdbs = self.all(idx::PDBS);
        for pdb in pdbs {
            let h = self.pdb_health(&pdb);
            let (ns, name) = ns_name(&pdb);
            let status = json!({
                "observedGeneration": pdb["metadata"]["generation"],
                "expectedPods": h.expected,
                "currentHealthy": h.current_healthy,
                "desiredHealthy": h.desired_healthy,
                "disruptionsAllowed": h.disruptions_allowed,
            });
            if pdb["status"] != status {
                self.set_status(idx::PDBS, &ns, &name, status);
            }
        }
    }

    fn export_status(&mut self) {
        let exports = self.all(idx::SERVICEEXPORTS);
        for e in exports {
            let (ns, name) = ns_name(&e);
            let exists = self.store.get(idx::SERVICES, &ns, &name).is_ok();
            let (status, reason, message) = if exists {
                ("True", "Exported", "service is exported")
            } else {
                ("False", "NoService", "service not found")
            };
            if e["status"]["conditions"][0]["status"] == status {
                continue;
            }
            let s = json!({"conditions": [{"type": "Valid", "status": status, "reason": reason,
                "message": message, "lastTransitionTime": now_rfc3339()}]});
            let _ = self
                .store
                .update(idx::SERVICEEXPORTS, &ns, &name, json!({"status": s}), true);
        }
    }

    /// PDB health, for tests and the control API.
    pub fn pdb(&self, ns: &str, name: &str) -> Result<PdbHealth, ApiError> {
        let pdb = self.store.get(idx::PDBS, ns, name)?;
        Ok(self.pdb_health(&pdb))
    }
}

fn insufficient(resource: &str) -> &'static str {
    match resource {
        "cpu" => "Insufficient cpu",
        "memory" => "Insufficient memory",
        "pods" => "Too many pods",
        r if r.starts_with("nvidia.com/") => "Insufficient nvidia.com GPU resources",
        _ => "Insufficient extended resources",
    }
}

fn merge_deadline(next: &mut Option<Instant>, at: Instant) {
    if next.is_none_or(|n| at < n) {
        *next = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn cluster(yaml: &str) -> SimState {
        let s = Scenario::from_yaml(yaml).unwrap();
        let mut st = SimState::new(s.clusters[0].clone(), 0, 1000);
        st.reconcile(Instant::now());
        st
    }

    const ONE: &str = "clusters:\n  - name: c\n    pools:\n      - name: gpu\n        count: 2\n        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}\n    workloads:\n      - {name: llm, replicas: 3, gpus: 4, pdb: {min_available: 2}, service: {port: 80}}\n";

    #[test]
    fn pools_become_ready_nodes_and_pods_fill_gpus() {
        let st = cluster(ONE);
        assert_eq!(st.store.count(idx::NODES), 2);
        let pods: Vec<&Obj> = st.store.iter(idx::PODS, Some("default"), None).collect();
        assert_eq!(pods.len(), 3);
        assert!(pods.iter().all(|p| pod_ready(p)));
        // 3 pods × 4 GPUs over two 8-GPU nodes: never more than 8 per node.
        let mut per_node: HashMap<&str, i64> = HashMap::new();
        for p in &pods {
            *per_node
                .entry(p["spec"]["nodeName"].as_str().unwrap())
                .or_default() += 4;
        }
        assert!(per_node.values().all(|g| *g <= 8), "{per_node:?}");
        let slice = st
            .store
            .get(idx::ENDPOINTSLICES, "default", "llm-sim")
            .unwrap();
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn pods_stay_pending_when_nothing_fits() {
        let mut st = cluster(ONE);
        let mut d = (*st.store.get(idx::DEPLOYMENTS, "default", "llm").unwrap()).clone();
        d["spec"]["replicas"] = json!(5);
        st.store
            .update(idx::DEPLOYMENTS, "default", "llm", d, false)
            .unwrap();
        st.reconcile(Instant::now());
        let pending: Vec<&Obj> = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .filter(|p| p["spec"]["nodeName"].is_null())
            .collect();
        assert_eq!(pending.len(), 1);
        let msg = pending[0]["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap();
        assert!(msg.starts_with("0/2 nodes are available"), "{msg}");
    }

    #[test]
    fn eviction_honours_the_pdb() {
        let mut st = cluster(ONE);
        assert_eq!(st.pdb("default", "llm").unwrap().disruptions_allowed, 1);
        let names: Vec<String> = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .map(|p| meta_str(p, "name").to_string())
            .collect();
        st.evict("default", &names[0], false).unwrap();
        // The replacement cannot fit (only 4 GPUs were freed... it can), so reconcile and the
        // budget is exhausted until the replacement is Ready again.
        let e = st.evict("default", &names[1], false).unwrap_err();
        assert_eq!(e.code, 429);
        assert!(
            e.details.unwrap()["causes"][0]["message"]
                .as_str()
                .unwrap()
                .contains("needs 2 healthy pods and has 2")
        );
        st.reconcile(Instant::now());
        st.evict("default", &names[1], false).unwrap();
        assert_eq!(st.evict("default", "gone", false).unwrap_err().code, 404);
    }

    #[test]
    fn gpu_failure_lowers_allocatable() {
        let mut st = cluster(ONE);
        let node = st.nodes.keys().next().unwrap().clone();
        st.inject(&Fault::GpuFailure {
            node: node.clone(),
            count: 3,
        })
        .unwrap();
        st.reconcile(Instant::now());
        let n = st.store.get(idx::NODES, "", &node).unwrap();
        assert_eq!(n["status"]["allocatable"]["nvidia.com/gpu"], "5");
        assert_eq!(n["status"]["capacity"]["nvidia.com/gpu"], "8");
        assert!(
            st.inject(&Fault::GpuFailure {
                node: node.clone(),
                count: 9
            })
            .is_err()
        );
        st.clear(&Fault::GpuFailure {
            node: node.clone(),
            count: 0,
        });
        st.reconcile(Instant::now());
        assert_eq!(
            st.store.get(idx::NODES, "", &node).unwrap()["status"]["allocatable"]["nvidia.com/gpu"],
            "8"
        );
    }

    #[test]
    fn idle_cluster_is_quiet() {
        let mut st = cluster(ONE);
        let rv = st.store.revision();
        st.reconcile(Instant::now());
        st.reconcile(Instant::now());
        assert_eq!(
            st.store.revision(),
            rv,
            "reconcile of a settled cluster must not write"
        );
    }

    #[test]
    fn requests_follow_describe_node_rules() {
        let pod = json!({"spec": {
            "containers": [{"resources": {"requests": {"nvidia.com/gpu": "2", "cpu": "500m"}}},
                           {"resources": {"requests": {"nvidia.com/gpu": "1"}}}],
            "initContainers": [{"resources": {"requests": {"nvidia.com/gpu": "4"}}}],
            "overhead": {"cpu": "100m"}}});
        let r = pod_requests(&pod);
        assert_eq!(r["nvidia.com/gpu"], 4000);
        assert_eq!(r["cpu"], 600);
    }

    #[test]
    fn dra_claims_get_devices_from_slices() {
        let st = cluster(
            "clusters:\n  - name: c\n    pools:\n      - name: dra\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper, dra: true}\n    workloads:\n      - {name: job, replicas: 3, gpus: 3, dra: true}\n",
        );
        assert_eq!(st.store.count(idx::RESOURCESLICES), 1);
        let claims: Vec<&Obj> = st
            .store
            .iter(idx::RESOURCECLAIMS, Some("default"), None)
            .collect();
        assert_eq!(claims.len(), 3);
        let allocated: Vec<usize> = claims
            .iter()
            .map(|c| {
                c["status"]["allocation"]["devices"]["results"]
                    .as_array()
                    .map_or(0, Vec::len)
            })
            .collect();
        // 8 devices: two claims of 3 fit, the third waits.
        assert_eq!(
            allocated.iter().filter(|n| **n == 3).count(),
            2,
            "{allocated:?}"
        );
        let node = st.store.iter(idx::NODES, None, None).next().unwrap();
        assert!(
            node["status"]["allocatable"]
                .get("nvidia.com/gpu")
                .is_none()
        );
    }
}
