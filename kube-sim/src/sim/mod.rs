//! The simulated control plane of one cluster: API-server defaulting, and kwok-like
//! controllers (MachineDeployments, kubelets, device plugins, DaemonSets, Deployments,
//! ReplicaSets, the scheduler, EndpointSlices, PDB status, garbage collection) plus eviction.
//!
//! Each controller is a file of its own in this folder, as an `impl SimState` block; this file
//! holds the state, defaulting, faults and the reconcile loop that runs them in turn.
//!
//! Controllers run as one reconcile pass over the in-memory store, repeated until nothing
//! changes; they only write when an object's meaningful content differs, so an idle cluster
//! produces no watch events.

mod daemonsets;
pub mod deletion;
pub mod deployments;
mod disruption;
mod endpoints;
mod events;
mod gc;
mod kubelet;
mod machine_deployments;
pub mod metrics;
pub mod node_lifecycle;
mod pods;
mod scheduler;
mod workloads;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::faults::Fault;
use crate::gpu::{self, NodeParams, SIMULATED_ANNOTATION};
use crate::quantity::parse_milli;
use crate::resources::idx;
use crate::scenario::{CAPI_POOL_LABEL, ClusterSpec, IntOrPercent, PoolSpec, WorkloadSpec};
use crate::selector::LabelSelector;
use crate::store::{ApiError, Obj, Store, now_rfc3339, random_suffix};

pub use deletion::{DeleteOptions, deleting};
pub use disruption::PdbHealth;

/// Namespace of the MachineDeployments that back scenario pools.
pub const MD_NAMESPACE: &str = "default";
/// A pool's quota in nodes, on its MachineDeployment (read by upgrade pre-flights).
pub const QUOTA_ANNOTATION: &str = "flotilla.io/quota-nodes";
/// The ServiceExport annotation by which a service opts in to inference load sampling (its
/// value: the pods' metrics port), as Flotilla's agent reads it.
pub const INFERENCE_METRICS_ANNOTATION: &str = "flotilla.io/inference-metrics";
/// Annotation on a pod template asking for N GPUs through a DRA ResourceClaim.
pub const DRA_GPUS_ANNOTATION: &str = "sim.flotilla.dev/dra-gpus";
/// Pod-template annotation: claim MIG partitions of this profile instead of whole GPUs.
pub const DRA_PROFILE_ANNOTATION: &str = "sim.flotilla.dev/dra-profile";
/// The DeviceClass of MIG partitions published by the NVIDIA DRA driver.
pub const NVIDIA_MIG_CLASS: &str = "mig.nvidia.com";
/// Cluster API's annotation naming a Machine (here: its node) to remove first on scale-down.
pub const DELETE_MACHINE_ANNOTATION: &str = "cluster.x-k8s.io/delete-machine";
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
    /// The hash of its MachineDeployment's template when it was created (a changed template
    /// rolls the pool).
    template_hash: String,
    md: (String, String),
    failed_gpus: u32,
    not_ready: bool,
    slice_generation: i64,
    /// Chosen for removal by its MachineDeployment (when): cordoned, drained, then deleted.
    removing: Option<Instant>,
    /// Broken at birth by a `bad-new-nodes` fault (cleared with it).
    born_bad: bool,
    /// The next host number to give a pod from the node's pod range.
    next_pod_host: u32,
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
    /// Pods whose kubelet is stopping them, and when it will be done.
    terminating: HashMap<(String, String), Instant>,
    /// Events written, oldest first (for the retention bound).
    event_log: VecDeque<(String, String)>,
    event_seq: u64,
    /// `bad-new-nodes` faults by machine template: (NotReady, failed GPUs).
    bad_new_nodes: HashMap<String, (bool, u32)>,
    /// Deployments rolling out: their last counts and when they last changed.
    progress: HashMap<(String, String), (deployments::Counts, Instant)>,
    metric_rules: Vec<metrics::MetricsRule>,
    md_counter: HashMap<(String, String), u32>,
    next_node_ip: u32,
    next_pod_ip: u32,
    next_lb_ip: u32,
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

/// A pod's effective requests as the scheduler computes them, milli-units: the larger of
/// the steady phase (app containers plus every sidecar, i.e. restartable init container) and
/// each init step (that init container plus the sidecars started before it), plus overhead.
pub fn pod_requests(pod: &Value) -> BTreeMap<String, i128> {
    type Sum = BTreeMap<String, i128>;
    let read = |c: &Value| -> Sum {
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
    let add = |sum: &mut Sum, other: &Sum| {
        for (k, v) in other {
            *sum.entry(k.clone()).or_default() += v;
        }
    };
    let max_into = |acc: &mut Sum, other: &Sum| {
        for (k, v) in other {
            let e = acc.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    };
    let mut sidecars = Sum::new();
    let mut init = Sum::new();
    for c in pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let mut step = sidecars.clone();
        add(&mut step, &read(c));
        if c["restartPolicy"] == "Always" {
            sidecars = step.clone();
        }
        max_into(&mut init, &step);
    }
    let mut sum = sidecars;
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        add(&mut sum, &read(c));
    }
    max_into(&mut sum, &init);
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

/// A pod that counts for its controller: neither finished nor being deleted (the
/// ReplicaSet controller's `FilterActivePods`).
fn is_active(pod: &Value) -> bool {
    !is_terminal(pod) && !deleting(pod)
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
            terminating: HashMap::new(),
            event_log: VecDeque::new(),
            event_seq: 0,
            bad_new_nodes: HashMap::new(),
            progress: HashMap::new(),
            metric_rules: Vec::new(),
            md_counter: HashMap::new(),
            next_node_ip: 10,
            next_pod_ip: 10,
            next_svc_ip: 10,
            next_lb_ip: 0,
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
            let mut md = json!({
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
            // The cloud's quota, published as a cloud integration would, so an upgrade's
            // pre-flight can see how many extra nodes it may ask for.
            if let Some(q) = p.quota {
                md["metadata"]["annotations"][QUOTA_ANNOTATION] = json!(q.to_string());
            }
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
        // The DeviceClasses the NVIDIA DRA driver's chart installs, where its pools run.
        let dra = spec
            .pools
            .iter()
            .any(|p| p.gpu.as_ref().is_some_and(|g| g.dra))
            && !crate::versions::dra_versions(&spec.kubernetes_version).is_empty();
        if dra {
            for (class, kind) in [(gpu::NVIDIA_DRA_DRIVER, "gpu"), (NVIDIA_MIG_CLASS, "mig")] {
                let expression = format!(
                    "device.driver == '{d}' && device.attributes['{d}'].type == '{kind}'",
                    d = gpu::NVIDIA_DRA_DRIVER
                );
                let dc = json!({"metadata": {"name": class},
                    "spec": {"selectors": [{"cel": {"expression": expression}}]}});
                self.create(idx::DEVICECLASSES, "", dc)
                    .expect("seed deviceclass");
            }
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
        let mut pod_labels = labels.clone();
        if w.inference {
            pod_labels[metrics::VLLM_LABEL] = json!("true");
        }
        let mut container = json!({
            "name": "server",
            "image": format!("registry.sim/{}:latest", w.name),
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        });
        let mut annotations = json!({});
        let mut init_containers = vec![];
        if w.gpus > 0 {
            if w.dra {
                annotations[DRA_GPUS_ANNOTATION] = json!(w.gpus.to_string());
                if let Some(p) = &w.dra_profile {
                    annotations[DRA_PROFILE_ANNOTATION] = json!(p);
                }
            } else {
                let r = w
                    .resource
                    .clone()
                    .unwrap_or_else(|| "nvidia.com/gpu".into());
                container["resources"]["requests"][&r] = json!(w.gpus.to_string());
                container["resources"]["limits"][&r] = json!(w.gpus.to_string());
            }
        }
        if w.sidecar_gpus > 0 {
            // A native sidecar: a restartable init container, running beside the app.
            let r = w
                .resource
                .clone()
                .unwrap_or_else(|| "nvidia.com/gpu".into());
            let n = w.sidecar_gpus.to_string();
            init_containers.push(json!({
                "name": "gpu-sidecar",
                "image": "registry.sim/gpu-sidecar:latest",
                "restartPolicy": "Always",
                "resources": {"requests": {"cpu": "100m", &r: n}, "limits": {&r: n}},
            }));
        }
        if let Some(svc) = &w.service {
            container["ports"] = json!([{"name": "http", "containerPort": svc.target_port.unwrap_or(svc.port), "protocol": "TCP"}]);
        }
        let mut pod_spec = json!({
            "containers": [container],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        });
        if !init_containers.is_empty() {
            pod_spec["initContainers"] = json!(init_containers);
        }
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
                "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
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
            let mut s = json!({
                "metadata": {"name": w.name, "labels": labels},
                "spec": {"selector": labels, "ports": [{"name": "http", "port": svc.port,
                         "targetPort": svc.target_port.unwrap_or(svc.port), "protocol": "TCP"}]},
            });
            if let Some(t) = &svc.service_type {
                s["spec"]["type"] = json!(t);
                if t == "ExternalName" {
                    s["spec"] = json!({"type": "ExternalName", "externalName": "example.invalid"});
                }
            }
            if svc.headless {
                s["spec"]["clusterIP"] = json!("None");
            }
            self.create(idx::SERVICES, &w.namespace, s).expect("svc");
            if w.export {
                let mut se = json!({"metadata": {"name": w.name}});
                if w.inference {
                    // Opt in to inference load sampling, on the pods' metrics port.
                    se["metadata"]["annotations"] = json!({INFERENCE_METRICS_ANNOTATION:
                        svc.target_port.unwrap_or(svc.port).to_string()});
                }
                self.create(idx::SERVICEEXPORTS, &w.namespace, se)
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
                    // The DefaultTolerationSeconds admission plugin: 5 minutes on a NotReady
                    // or unreachable node before the taint manager would evict.
                    let mut tolerations =
                        spec["tolerations"].as_array().cloned().unwrap_or_default();
                    for key in [
                        node_lifecycle::NOT_READY_TAINT,
                        node_lifecycle::UNREACHABLE_TAINT,
                    ] {
                        let has = tolerations.iter().any(|t| {
                            (t["key"] == key || t["key"].is_null() && t["operator"] == "Exists")
                                && (t["effect"] == "NoExecute" || t["effect"].is_null())
                        });
                        if !has {
                            tolerations.push(json!({"key": key, "operator": "Exists",
                                "effect": "NoExecute", "tolerationSeconds": 300}));
                        }
                    }
                    spec["tolerations"] = json!(tolerations);
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
                // The load-balancer controller a cloud runs: one ingress address per Service.
                if spec["type"] == "LoadBalancer"
                    && !obj["status"]["loadBalancer"]["ingress"].is_array()
                {
                    let n = self.next_lb_ip;
                    self.next_lb_ip += 1;
                    let ip = format!(
                        "198.{}.{}.{}",
                        18 + (self.index / 256) % 2,
                        self.index % 256,
                        n % 250 + 1
                    );
                    obj["status"] =
                        json!({"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}});
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
            Fault::BadNewNodes {
                pool,
                not_ready,
                failed_gpus,
            } => {
                let Some(t) = self.templates.get(pool) else {
                    return Err(ApiError::bad_request(format!(
                        "pool: no machine template {pool:?} (templates are the scenario's pool names)"
                    )));
                };
                let gpus = t.gpu.as_ref().map_or(0, |g| g.count);
                if *failed_gpus > gpus {
                    return Err(ApiError::bad_request(format!(
                        "failed_gpus: pool {pool} has {gpus} GPUs per node, cannot fail {failed_gpus}"
                    )));
                }
                self.bad_new_nodes
                    .insert(pool.clone(), (*not_ready, *failed_gpus));
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
            Fault::BadNewNodes { pool, .. } => {
                self.bad_new_nodes.remove(pool);
                for n in self.nodes.values_mut() {
                    if n.born_bad && n.template == *pool {
                        n.born_bad = false;
                        n.not_ready = false;
                        n.failed_gpus = 0;
                    }
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
            n.born_bad = false;
        }
        self.bad_new_nodes.clear();
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
    ///
    /// A pass is bounded (eight rounds, so that API requests get the lock in between); a
    /// cluster still changing after them asks to be run again at once.
    pub fn reconcile(&mut self, now: Instant) -> Option<Instant> {
        for _ in 0..8 {
            let before = self.store.revision();
            let mut next = None;
            self.machine_deployments(now, &mut next);
            self.kubelets(now, &mut next);
            self.node_lifecycle();
            self.daemonsets();
            self.deployments(now, &mut next);
            self.replicasets();
            self.garbage_collect();
            self.schedule(now);
            self.pod_lifecycle(now, &mut next);
            self.pod_termination(now, &mut next);
            self.namespaces();
            self.endpoint_slices();
            self.pdb_status();
            if self.store.revision() == before {
                return next;
            }
        }
        Some(now)
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

    fn scheduled(st: &SimState) -> (usize, usize) {
        let pods: Vec<&Obj> = st.store.iter(idx::PODS, Some("default"), None).collect();
        let bound = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"].is_string())
            .count();
        (bound, pods.len() - bound)
    }

    #[test]
    fn a_sidecars_gpus_count_beside_the_apps() {
        // 2 app GPUs + 2 sidecar GPUs = 4 per pod: two pods fill one 8-GPU node, the third
        // waits (counted without the sidecar, all three would fit).
        let st = cluster(
            "clusters:\n  - name: c\n    pools:\n      - name: gpu\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-L4, memory_mib: 23034, count: 8}\n    workloads:\n      - {name: llm, replicas: 3, gpus: 2, sidecar_gpus: 2}\n",
        );
        assert_eq!(scheduled(&st), (2, 1));
        let p = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .next()
            .unwrap();
        assert_eq!(p["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(pod_requests(p)["nvidia.com/gpu"], 4000);
    }

    #[test]
    fn a_crashed_plugin_never_advertises() {
        let st = cluster(
            "clusters:\n  - name: c\n    pools:\n      - name: gpu\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-L4, memory_mib: 23034, count: 8, plugin_crashed: true}\n",
        );
        let n = st.store.iter(idx::NODES, None, None).next().unwrap();
        assert!(node_ready(n));
        assert_eq!(n["status"]["capacity"]["nvidia.com/gpu"], "8");
        assert_eq!(n["status"]["allocatable"]["nvidia.com/gpu"], "0");
    }

    #[test]
    fn an_allocated_partition_takes_its_gpu() {
        // One GPU offered whole and as two 3g.40gb partitions on shared counters.
        let mut st = cluster(
            "clusters:\n  - name: c\n    pools:\n      - name: dra\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-A100-SXM4-80GB, memory_mib: 81920, count: 1, dra: true, mig: {strategy: mixed, profiles: {3g.40gb: 2}}}\n    workloads:\n      - {name: small, replicas: 1, gpus: 1, dra: true, dra_profile: 3g.40gb}\n",
        );
        let slice = st
            .store
            .iter(idx::RESOURCESLICES, None, None)
            .next()
            .unwrap();
        assert_eq!(slice["spec"]["devices"].as_array().unwrap().len(), 3);
        assert_eq!(slice["spec"]["sharedCounters"][0]["name"], "gpu-0-counters");
        assert_eq!(scheduled(&st), (1, 0), "the partition is allocated");
        // A whole-GPU claim now finds no GPU: its counters are partly drawn.
        let w = crate::scenario::Scenario::from_yaml("clusters:\n  - name: c\n    workloads:\n      - {name: big, replicas: 1, gpus: 1, dra: true}\n").unwrap();
        st.seed_workload(&w.clusters[0].workloads[0]);
        st.reconcile(Instant::now());
        let big = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .find(|p| p["metadata"]["name"].as_str().unwrap().starts_with("big"))
            .unwrap();
        assert!(big["spec"]["nodeName"].is_null(), "{big}");
        // The second partition still fits.
        let w = crate::scenario::Scenario::from_yaml("clusters:\n  - name: c\n    workloads:\n      - {name: small2, replicas: 1, gpus: 1, dra: true, dra_profile: 3g.40gb}\n").unwrap();
        st.seed_workload(&w.clusters[0].workloads[0]);
        st.reconcile(Instant::now());
        let small2 = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .find(|p| {
                p["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("small2")
            })
            .unwrap();
        assert!(small2["spec"]["nodeName"].is_string(), "{small2}");
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
        st.evict("default", &names[0], &DeleteOptions::default(), false)
            .unwrap();
        // The replacement cannot fit (only 4 GPUs were freed... it can), so reconcile and the
        // budget is exhausted until the replacement is Ready again.
        let e = st
            .evict("default", &names[1], &DeleteOptions::default(), false)
            .unwrap_err();
        assert_eq!(e.code, 429);
        assert!(
            e.details.unwrap()["causes"][0]["message"]
                .as_str()
                .unwrap()
                .contains("needs 2 healthy pods and has 2")
        );
        st.reconcile(Instant::now());
        st.evict("default", &names[1], &DeleteOptions::default(), false)
            .unwrap();
        assert_eq!(
            st.evict("default", "gone", &DeleteOptions::default(), false)
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn bad_new_nodes_come_up_with_failed_gpus_until_cleared() {
        let mut st = cluster(ONE);
        let fault = Fault::BadNewNodes {
            pool: "gpu".into(),
            not_ready: false,
            failed_gpus: 3,
        };
        st.inject(&fault).unwrap();
        let old: HashSet<String> = st.nodes.keys().cloned().collect();
        let mut md = (*st
            .store
            .get(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, "gpu")
            .unwrap())
        .clone();
        md["spec"]["replicas"] = json!(3);
        st.store
            .update(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, "gpu", md, false)
            .unwrap();
        st.reconcile(Instant::now());
        let new = st.nodes.keys().find(|n| !old.contains(*n)).unwrap().clone();
        let alloc = |st: &SimState, n: &str| {
            st.store.get(idx::NODES, "", n).unwrap()["status"]["allocatable"]["nvidia.com/gpu"]
                .clone()
        };
        assert_eq!(alloc(&st, &new), "5");
        assert!(
            old.iter().all(|n| alloc(&st, n) == "8"),
            "only new nodes are broken"
        );
        st.clear(&fault);
        st.reconcile(Instant::now());
        assert_eq!(alloc(&st, &new), "8");
        let too_many = Fault::BadNewNodes {
            pool: "gpu".into(),
            not_ready: false,
            failed_gpus: 9,
        };
        assert!(
            st.inject(&too_many)
                .unwrap_err()
                .message
                .contains("failed_gpus")
        );
    }

    #[test]
    fn a_pod_with_a_finalizer_waits_for_it_after_its_grace_period() {
        let mut st = cluster(ONE);
        let pod = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .next()
            .unwrap()
            .clone();
        let name = meta_str(&pod, "name").to_string();
        let mut p = (*pod).clone();
        p["metadata"]["finalizers"] = json!(["example.com/keep"]);
        st.store
            .update(idx::PODS, "default", &name, p, false)
            .unwrap();
        let marked = st
            .delete_object(
                idx::PODS,
                "default",
                &name,
                &DeleteOptions::default(),
                false,
            )
            .unwrap();
        assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
        // Grace seconds last 0 ms in this scenario: the kubelet is done at once, the
        // finalizer keeps the object, at grace period 0.
        st.reconcile(Instant::now());
        let held = st.store.get(idx::PODS, "default", &name).unwrap();
        assert_eq!(held["metadata"]["deletionGracePeriodSeconds"], 0);
        assert_eq!(
            st.store
                .iter(idx::PODS, Some("default"), None)
                .filter(|p| !deleting(p))
                .count(),
            3,
            "the ReplicaSet replaced it"
        );
        let mut p = (*held).clone();
        p["metadata"]["finalizers"] = json!([]);
        st.store
            .update(idx::PODS, "default", &name, p, false)
            .unwrap();
        assert!(st.store.get(idx::PODS, "default", &name).is_err());
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
        // The driver's DeviceClasses exist for the claims to name.
        let dc = st
            .store
            .get(idx::DEVICECLASSES, "", "gpu.nvidia.com")
            .unwrap();
        assert!(
            dc["spec"]["selectors"][0]["cel"]["expression"]
                .as_str()
                .unwrap()
                .contains("'gpu'")
        );
        assert!(
            st.store
                .get(idx::DEVICECLASSES, "", NVIDIA_MIG_CLASS)
                .is_ok()
        );
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
