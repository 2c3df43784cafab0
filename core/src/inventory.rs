//! A cluster's GPU inventory, computed from what the Kubernetes API says about nodes, pods,
//! DRA ResourceSlices and ResourceClaims. Pure: the member agent converts API objects into the
//! `*Input` types and calls [`compute`].
//!
//! The rules follow `../shared/reference/gpu-in-kubernetes.md`: allocated = requests of
//! non-terminal pods as `kubectl describe node` sums them; MIG and partition resources are
//! counted under their own names; time-slicing replicas are not physical GPUs; DRA devices are
//! counted from the highest complete slice generation and allocated from claims, not pod
//! requests.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Parse a Kubernetes quantity into milli-units (`"1"` → 1000, `"500m"` → 500, `"1Ki"` →
/// 1_024_000). `None` for malformed input.
pub fn parse_quantity_milli(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    if num.is_empty() {
        return None;
    }
    let mul: i128 = match suffix {
        "" => 1000,
        "m" => 1,
        "k" => 1_000_000,
        "M" => 1_000_000_000,
        "G" => 1_000_000_000_000,
        "T" => 1_000_000_000_000_000,
        "Ki" => 1000 << 10,
        "Mi" => 1000 << 20,
        "Gi" => 1000 << 30,
        "Ti" => 1000 << 40,
        s if s.starts_with(['e', 'E']) => 1000 * 10i128.checked_pow(s[1..].parse().ok()?)?,
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let neg = int.starts_with('-');
    let int_abs: i128 = int.trim_start_matches(['+', '-']).parse().unwrap_or(0);
    let mut v = int_abs.checked_mul(mul)?;
    if !frac.is_empty() {
        let digits: i128 = frac.parse().ok()?;
        v += digits * mul / 10i128.pow(frac.len() as u32);
    }
    Some(if neg { -v } else { v })
}

fn count(q: &str) -> i64 {
    parse_quantity_milli(q).map_or(0, |m| (m / 1000) as i64)
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// Effect.
    pub effect: String,
}

/// What the agent reads from a Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInput {
    /// Name.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.capacity`.
    pub capacity: BTreeMap<String, String>,
    /// `status.allocatable`.
    pub allocatable: BTreeMap<String, String>,
    /// Ready condition is True.
    pub ready: bool,
    /// When the Ready condition last turned True (Unix ms), if it is True.
    pub ready_since_ms: Option<i64>,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// `spec.taints`.
    pub taints: Vec<Taint>,
    /// `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
}

/// Resource requests of one container (or the pod overhead).
pub type Requests = BTreeMap<String, String>;

/// What the agent reads from a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInput {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: String,
    /// Requests of each container.
    pub containers: Vec<Requests>,
    /// Each init container, in order.
    pub init_containers: Vec<InitContainer>,
    /// `spec.overhead`.
    pub overhead: Requests,
}

/// An init container: its requests, and whether it is a sidecar (`restartPolicy: Always`,
/// which keeps running beside the app containers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitContainer {
    /// Requests.
    pub requests: Requests,
    /// A restartable init container (sidecar).
    pub restartable: bool,
}

/// A DRA device attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// `int`
    Int(i64),
    /// `bool`
    Bool(bool),
    /// `string`
    Str(String),
    /// `version`
    Version(String),
}

/// A device in a ResourceSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInput {
    /// Device name, unique in its pool.
    pub name: String,
    /// Attributes (unqualified names as drivers publish them).
    pub attributes: BTreeMap<String, Attr>,
    /// Capacities (e.g. `memory` → `"80Gi"`).
    pub capacity: BTreeMap<String, String>,
    /// Names of the shared counter sets this device draws on (partitionable devices: a
    /// GPU and its partitions draw on the same set, so allocating one takes the others).
    pub consumes: Vec<String>,
}

/// What the agent reads from a ResourceSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceInput {
    /// `spec.driver`.
    pub driver: String,
    /// `spec.nodeName` (slices for node-local devices).
    pub node_name: Option<String>,
    /// `spec.pool.name`.
    pub pool: String,
    /// `spec.pool.generation`.
    pub generation: i64,
    /// `spec.pool.resourceSliceCount`.
    pub slice_count: i64,
    /// `spec.devices`.
    pub devices: Vec<DeviceInput>,
}

/// One allocated device from `ResourceClaim.status.allocation.devices.results`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceRef {
    /// Driver.
    pub driver: String,
    /// Pool.
    pub pool: String,
    /// Device.
    pub device: String,
}

/// GPU vendor, from the resource name or DRA driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Vendor {
    /// NVIDIA.
    Nvidia,
    /// AMD.
    Amd,
    /// Intel.
    Intel,
}

/// How a GPU resource maps to physical GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuUnit {
    /// One unit is one physical GPU.
    Whole,
    /// One unit is a MIG slice of this profile (e.g. `1g.10gb`).
    MigSlice(String),
    /// One unit is a time-sliced/MPS share; `replicas` units per physical GPU.
    Shared(u32),
    /// An AMD or other vendor partition (e.g. `amd.com/cpx_nps4`).
    Partition,
}

/// Usage of one GPU resource on a node (or summed over a pool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuResource {
    /// Resource name (`nvidia.com/gpu`, `nvidia.com/mig-3g.40gb`, `amd.com/gpu`, or
    /// `dra:<driver>` for DRA devices).
    pub name: String,
    /// Vendor.
    pub vendor: Vendor,
    /// What one unit is.
    pub unit: GpuUnit,
    /// `status.capacity` (or devices published).
    pub capacity: i64,
    /// `status.allocatable` (or devices published; 0 while the device plugin starts).
    pub allocatable: i64,
    /// Requested by non-terminal pods (or allocated in claims).
    pub allocated: i64,
    /// `allocatable - allocated`, never negative.
    pub free: i64,
}

/// Why a node's GPUs are not all usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuCondition {
    /// All advertised.
    Healthy,
    /// Capacity present but allocatable 0: device plugin not (yet) advertising.
    NotAdvertised,
    /// Allocatable below capacity: the plugin marked devices unhealthy (or a DRA slice lists
    /// fewer GPUs than the node's hardware labels say it has).
    Degraded,
    /// Capacity present but allocatable 0 for longer than the start-up bound after the node
    /// turned Ready: a crashed plugin or failed devices, not a slow start.
    Failed,
}

/// One node's inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// Node name.
    pub name: String,
    /// Node pool, from provider labels.
    pub pool: Option<String>,
    /// Ready condition.
    pub ready: bool,
    /// Not cordoned.
    pub schedulable: bool,
    /// Taints.
    pub taints: Vec<Taint>,
    /// `topology.kubernetes.io/region`.
    pub region: Option<String>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `node.kubernetes.io/instance-type`.
    pub instance_type: Option<String>,
    /// Kubelet version.
    pub kubelet_version: String,
    /// GPU product (GFD/AMD labels or the DRA `productName`).
    pub product: Option<String>,
    /// Architecture family.
    pub family: Option<String>,
    /// Memory per physical GPU in MiB.
    pub gpu_memory_mib: Option<u64>,
    /// Physical GPUs on the node (not sharing replicas, not MIG slices or partitions);
    /// `None` when nothing on the node says (MIG `single` without a hardware count).
    pub physical_gpus: Option<i64>,
    /// Whole GPUs a pod can still request (free units of whole-GPU resources). Shared
    /// replicas, MIG slices and partitions are not whole GPUs and never count here.
    pub free_gpus: i64,
    /// Physical GPUs with nothing in use, a lower bound: each allocated replica, slice or
    /// partition may sit on a different GPU.
    pub idle_gpus: i64,
    /// Physical GPUs that failed (unhealthy devices, a plugin down past the start-up bound,
    /// DRA devices missing from the slice).
    pub failed_gpus: i64,
    /// Per-resource usage.
    pub resources: Vec<GpuResource>,
    /// GPU health as advertised.
    pub condition: GpuCondition,
    /// Why the node's numbers cannot be used, when they make no sense (its GPUs then count
    /// for nothing, and the rest of the report stands).
    pub problem: Option<String>,
}

impl NodeInventory {
    /// Ready, schedulable and with usable numbers: its free GPUs are capacity.
    pub fn usable(&self) -> bool {
        self.ready && self.schedulable && self.problem.is_none()
    }
}

impl ClusterInventory {
    /// Failed physical GPUs. Nodes whose plugin is still starting do not count.
    pub fn failed_gpus(&self) -> i64 {
        self.nodes.iter().map(|n| n.failed_gpus).sum()
    }

    /// Nodes whose GPUs failed, by name (for the health reason).
    pub fn failed_nodes(&self) -> Vec<String> {
        (self.nodes.iter())
            .filter(|n| n.failed_gpus > 0)
            .map(|n| n.name.clone())
            .collect()
    }
}

/// A pool's totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolInventory {
    /// Pool name (`""` for nodes with no pool label).
    pub name: String,
    /// Nodes.
    pub nodes: u32,
    /// Ready and schedulable nodes.
    pub usable_nodes: u32,
    /// Products seen in the pool.
    pub products: Vec<String>,
    /// Physical GPUs of the nodes that say how many they have.
    pub physical_gpus: i64,
    /// Nodes whose physical GPU count is not known.
    pub physical_unknown_nodes: u32,
    /// Requestable whole GPUs free on usable nodes.
    pub free_gpus: i64,
    /// Idle physical GPUs (lower bound) on usable nodes.
    pub idle_gpus: i64,
    /// Failed physical GPUs.
    pub failed_gpus: i64,
    /// Physical GPUs the nodes can hand out ([`allocatable_gpus`]).
    pub allocatable_gpus: i64,
    /// Allocatable GPUs with something in use.
    pub allocated_gpus: i64,
    /// Per-resource sums.
    pub resources: Vec<GpuResource>,
}

/// The whole cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInventory {
    /// Nodes with GPUs (nodes without any GPU resource are left out).
    pub nodes: Vec<NodeInventory>,
    /// Pools of those nodes.
    pub pools: Vec<PoolInventory>,
}

/// Physical GPUs a node can hand out: its GPUs less the failed ones, or, while its plugin
/// is not advertising, what is advertised. 0 when the node does not say how many it has.
pub fn allocatable_gpus(n: &NodeInventory) -> i64 {
    let Some(physical) = n.physical_gpus else {
        return 0;
    };
    match n.condition {
        GpuCondition::Healthy | GpuCondition::Degraded => (physical - n.failed_gpus).max(0),
        GpuCondition::NotAdvertised | GpuCondition::Failed => (n.resources.iter())
            .map(|r| match r.unit {
                GpuUnit::Whole => r.allocatable,
                GpuUnit::Shared(k) => r.allocatable / i64::from(k.max(1)),
                _ => 0,
            })
            .sum::<i64>()
            .min(physical),
    }
}

/// Pool labels, most specific first; the bare `agentpool` label is AKS's deprecated one.
const POOL_LABELS: &[&str] = &[
    "kubernetes.azure.com/agentpool",
    "cloud.google.com/gke-nodepool",
    "eks.amazonaws.com/nodegroup",
    "karpenter.sh/nodepool",
    "cluster.x-k8s.io/deployment-name",
    "agentpool",
];

/// The node's pool: the `--pool-label` override if given, else the first provider label.
pub fn node_pool(labels: &BTreeMap<String, String>, pool_label: Option<&str>) -> Option<String> {
    match pool_label {
        Some(l) => labels.get(l).cloned(),
        None => POOL_LABELS.iter().find_map(|l| labels.get(*l).cloned()),
    }
}

/// The MIG profile of a node in MIG `single` mode, where GFD renames the product
/// (`NVIDIA-A100-SXM4-40GB-MIG-1g.5gb`) and the slices are advertised as `nvidia.com/gpu`.
/// `Some("")` when the strategy label says single but the product does not name a profile.
pub fn mig_single_profile(labels: &BTreeMap<String, String>) -> Option<String> {
    let product = labels.get("nvidia.com/gpu.product").map(String::as_str);
    let from_product = product
        .and_then(|p| p.split_once("-MIG-"))
        .map(|(_, profile)| profile.to_string());
    let single = labels
        .get("nvidia.com/mig.strategy")
        .is_some_and(|s| s == "single");
    match (from_product, single) {
        (Some(p), _) => Some(p),
        (None, true) => Some(String::new()),
        (None, false) => None,
    }
}

/// Partitions per physical GPU of an AMD node whose device plugin names partitions
/// `amd.com/gpu` (its default `single` naming), from the node labeller's
/// `amd.com/compute-memory-partition` (e.g. `cpx_nps4`). `None`: not partitioned (SPX), or
/// a mode whose factor is not known.
fn amd_partitions_per_gpu(labels: &BTreeMap<String, String>) -> Option<Option<i64>> {
    let mode = labels.get("amd.com/compute-memory-partition")?;
    let compute = mode.split('_').next().unwrap_or("").to_ascii_lowercase();
    // MI300A has 6 accelerator dies, the rest of the MI300/MI350 family 8.
    let dies = match labels.get("amd.com/gpu.product-name") {
        Some(p) if p.to_ascii_uppercase().contains("MI300A") => 6,
        _ => 8,
    };
    match compute.as_str() {
        "" | "spx" => None,
        "dpx" => Some(Some(2)),
        "tpx" => Some(Some(3)),
        "qpx" => Some(Some(4)),
        "cpx" => Some(Some(dies)),
        _ => Some(None),
    }
}

/// Classify an extended resource name as a GPU resource, given its node's labels (which say
/// whether `nvidia.com/gpu` is whole GPUs, sharing replicas or MIG slices).
pub fn classify(resource: &str, labels: &BTreeMap<String, String>) -> Option<(Vendor, GpuUnit)> {
    if resource == "nvidia.com/gpu" || resource == "nvidia.com/gpu.shared" {
        if resource == "nvidia.com/gpu"
            && let Some(profile) = mig_single_profile(labels)
        {
            return Some((Vendor::Nvidia, GpuUnit::MigSlice(profile)));
        }
        // GFD says how many replicas share a GPU; GKE's own sharing sets no GFD label but
        // multiplies `nvidia.com/gpu` by its clients per GPU (2-48).
        let gke_shared = labels
            .get("cloud.google.com/gke-gpu-sharing-strategy")
            .is_some_and(|s| !s.is_empty());
        let replicas: u32 = labels
            .get("nvidia.com/gpu.replicas")
            .and_then(|r| r.parse().ok())
            .or_else(|| {
                gke_shared
                    .then(|| labels.get("cloud.google.com/gke-max-shared-clients-per-gpu"))
                    .flatten()
                    .and_then(|r| r.parse().ok())
            })
            .unwrap_or(1);
        let unit = if replicas > 1 || resource.ends_with(".shared") || gke_shared {
            GpuUnit::Shared(replicas.max(1))
        } else {
            GpuUnit::Whole
        };
        return Some((Vendor::Nvidia, unit));
    }
    if let Some(profile) = resource.strip_prefix("nvidia.com/mig-") {
        return Some((Vendor::Nvidia, GpuUnit::MigSlice(profile.to_string())));
    }
    if resource == "amd.com/gpu" {
        // In the default `single` naming a partitioned GPU's partitions are `amd.com/gpu`.
        return Some(match amd_partitions_per_gpu(labels) {
            Some(_) => (Vendor::Amd, GpuUnit::Partition),
            None => (Vendor::Amd, GpuUnit::Whole),
        });
    }
    if resource.starts_with("amd.com/") {
        return Some((Vendor::Amd, GpuUnit::Partition));
    }
    // Intel's GPUs are `i915` and `xe`; its resource management adds `millicores`,
    // `memory.max` and `tiles`, which are shares of those GPUs, not GPUs.
    if resource == "gpu.intel.com/i915" || resource == "gpu.intel.com/xe" {
        return Some((Vendor::Intel, GpuUnit::Whole));
    }
    None
}

/// Taints that say a node is going away (scale-down, consolidation, out of service,
/// cordoned): its GPUs are not free capacity. The GPU dedication taint
/// (`nvidia.com/gpu=present:NoSchedule`) is tolerated by GPU workloads and is not one.
pub const LEAVING_TAINTS: [&str; 4] = [
    "ToBeDeletedByClusterAutoscaler",
    "karpenter.sh/disrupted",
    "node.kubernetes.io/out-of-service",
    "node.kubernetes.io/unschedulable",
];

/// Whether `t` says its node is going away.
pub fn is_leaving(t: &Taint) -> bool {
    t.effect != "PreferNoSchedule" && LEAVING_TAINTS.contains(&t.key.as_str())
}

/// A pod's effective requests as the scheduler computes them, milli-units: the larger of
/// the steady phase (app containers plus every sidecar) and each init step (that init
/// container plus the sidecars started before it), plus overhead.
pub fn pod_requests(p: &PodInput) -> BTreeMap<String, i128> {
    type Sum = BTreeMap<String, i128>;
    let add = |sum: &mut Sum, r: &Requests| {
        for (k, v) in r {
            *sum.entry(k.clone()).or_default() += parse_quantity_milli(v).unwrap_or(0);
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
    for c in &p.init_containers {
        let mut step = sidecars.clone();
        add(&mut step, &c.requests);
        if c.restartable {
            sidecars = step.clone();
        }
        max_into(&mut init, &step);
    }
    let mut sum = sidecars;
    for c in &p.containers {
        add(&mut sum, c);
    }
    max_into(&mut sum, &init);
    add(&mut sum, &p.overhead);
    sum
}

fn is_terminal(phase: &str) -> bool {
    phase == "Succeeded" || phase == "Failed"
}

/// GPU drivers known to publish DRA devices, by vendor.
fn dra_vendor(driver: &str) -> Option<Vendor> {
    match driver {
        "gpu.nvidia.com" => Some(Vendor::Nvidia),
        "gpu.amd.com" => Some(Vendor::Amd),
        "gpu.intel.com" => Some(Vendor::Intel),
        _ => None,
    }
}

/// Slices of complete pools at their highest generation, grouped by node.
fn usable_slices(slices: &[SliceInput]) -> BTreeMap<String, Vec<&SliceInput>> {
    let mut best: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for s in slices {
        let g = best.entry((&s.driver, &s.pool)).or_insert(s.generation);
        *g = (*g).max(s.generation);
    }
    let mut out: BTreeMap<String, Vec<&SliceInput>> = BTreeMap::new();
    for ((driver, pool), generation) in best {
        let current: Vec<&SliceInput> = slices
            .iter()
            .filter(|s| s.driver == driver && s.pool == pool && s.generation == generation)
            .collect();
        // A pool is complete when all its slices of that generation are present.
        let expected = current.iter().map(|s| s.slice_count).max().unwrap_or(1);
        if (current.len() as i64) < expected {
            continue;
        }
        for s in current {
            if let Some(n) = &s.node_name {
                out.entry(n.clone()).or_default().push(s);
            }
        }
    }
    out
}

/// What [`compute`] needs besides the API objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Node label naming pools, overriding provider detection.
    pub pool_label: Option<String>,
    /// Now, Unix ms; with `not_advertised_bound_ms`, turns a plugin that never advertised
    /// into a failure. `None`: never (no clock).
    pub now_ms: Option<i64>,
    /// How long after a node turned Ready its GPUs may stay unadvertised before they count
    /// as failed.
    pub not_advertised_bound_ms: i64,
}

/// The default start-up bound: five minutes after Ready.
pub const NOT_ADVERTISED_BOUND_MS: i64 = 5 * 60 * 1000;

/// Most physical GPUs a node can plausibly have; a report above is a broken number.
pub const MAX_PLAUSIBLE_GPUS_PER_NODE: i64 = 64;

/// Compute the inventory without a clock. `pool_label` overrides provider pool detection.
pub fn compute(
    nodes: &[NodeInput],
    pods: &[PodInput],
    slices: &[SliceInput],
    claims: &[DeviceRef],
    pool_label: Option<&str>,
) -> ClusterInventory {
    let opts = Options {
        pool_label: pool_label.map(str::to_string),
        ..Options::default()
    };
    compute_with(nodes, pods, slices, claims, &opts)
}

/// The earliest time (Unix ms) at which a node's unadvertised GPUs turn into failures, if
/// any node is waiting for that: the agent recomputes then.
pub fn next_deadline(nodes: &[NodeInput], opts: &Options) -> Option<i64> {
    nodes
        .iter()
        .filter(|n| {
            n.capacity.iter().any(|(r, c)| {
                classify(r, &n.labels).is_some()
                    && count(c) > 0
                    && n.allocatable.get(r).is_none_or(|a| count(a) == 0)
            })
        })
        .filter_map(|n| n.ready_since_ms)
        .map(|t| t + opts.not_advertised_bound_ms)
        .filter(|d| opts.now_ms.is_none_or(|now| *d > now))
        .min()
}

/// Compute the inventory.
pub fn compute_with(
    nodes: &[NodeInput],
    pods: &[PodInput],
    slices: &[SliceInput],
    claims: &[DeviceRef],
    opts: &Options,
) -> ClusterInventory {
    let mut requested: BTreeMap<&str, BTreeMap<String, i128>> = BTreeMap::new();
    for p in pods.iter().filter(|p| !is_terminal(&p.phase)) {
        if let Some(n) = &p.node_name {
            let e = requested.entry(n.as_str()).or_default();
            for (k, v) in pod_requests(p) {
                *e.entry(k).or_default() += v;
            }
        }
    }
    let claimed: BTreeSet<&DeviceRef> = claims.iter().collect();
    let dra = usable_slices(slices);
    let empty = BTreeMap::new();
    let out: Vec<NodeInventory> = nodes
        .iter()
        .filter_map(|n| {
            let req = requested.get(n.name.as_str()).unwrap_or(&empty);
            let node_slices = dra.get(&n.name).map(Vec::as_slice).unwrap_or(&[]);
            node_inventory(n, req, node_slices, &claimed, opts)
        })
        .collect();
    let pools = pools(&out);
    ClusterInventory { nodes: out, pools }
}

/// What a node's DRA slices hold for the inventory.
#[derive(Default)]
struct DraDevices {
    product: Option<String>,
    memory_mib: Option<u64>,
}

/// Add a node's DRA GPUs to `resources`: whole GPUs (not partitions), allocated from claims;
/// a GPU whose counters a partition draws on is taken too.
fn dra_resources(
    slices: &[&SliceInput],
    claimed: &BTreeSet<&DeviceRef>,
    resources: &mut Vec<GpuResource>,
) -> DraDevices {
    let mut out = DraDevices::default();
    for s in slices {
        let Some(vendor) = dra_vendor(&s.driver) else {
            continue;
        };
        let is_claimed = |d: &DeviceInput| {
            claimed.contains(&DeviceRef {
                driver: s.driver.clone(),
                pool: s.pool.clone(),
                device: d.name.clone(),
            })
        };
        let is_gpu =
            |d: &DeviceInput| !matches!(d.attributes.get("type"), Some(Attr::Str(t)) if t != "gpu");
        // Counter sets with any allocated device on them: every device there is taken.
        let busy_sets: BTreeSet<&str> = (s.devices.iter())
            .filter(|d| is_claimed(d))
            .flat_map(|d| d.consumes.iter().map(String::as_str))
            .collect();
        let whole: Vec<&DeviceInput> = s.devices.iter().filter(|d| is_gpu(d)).collect();
        let used = (whole.iter())
            .filter(|d| is_claimed(d) || d.consumes.iter().any(|c| busy_sets.contains(c.as_str())))
            .count() as i64;
        let total = whole.len() as i64;
        if let Some(d) = whole.first() {
            if let Some(Attr::Str(p)) = d.attributes.get("productName") {
                out.product = Some(p.replace(' ', "-"));
            }
            out.memory_mib = d
                .capacity
                .get("memory")
                .and_then(|m| parse_quantity_milli(m))
                .map(|b| (b / 1000 / (1 << 20)) as u64);
        }
        let name = format!("dra:{}", s.driver);
        match resources.iter_mut().find(|r| r.name == name) {
            Some(r) => {
                r.capacity += total;
                r.allocatable += total;
                r.allocated += used;
                r.free = (r.allocatable - r.allocated).max(0);
            }
            None => resources.push(GpuResource {
                name,
                vendor,
                unit: GpuUnit::Whole,
                capacity: total,
                allocatable: total,
                allocated: used,
                free: (total - used).max(0),
            }),
        }
    }
    out
}

/// GPUs the node's hardware labels say it has, independent of what is advertised.
fn hardware_count(labels: &BTreeMap<String, String>, mig_single: bool) -> Option<i64> {
    let label = |k: &str| labels.get(k).and_then(|v| v.parse::<i64>().ok());
    label("karpenter.k8s.aws/instance-gpu-count")
        .or_else(|| label("gpu.intel.com/device.count"))
        // In MIG `single` mode GFD overwrites `gpu.count` with the slice count.
        .or_else(|| {
            (!mig_single)
                .then(|| label("nvidia.com/gpu.count"))
                .flatten()
        })
}

fn node_inventory(
    n: &NodeInput,
    requested: &BTreeMap<String, i128>,
    slices: &[&SliceInput],
    claimed: &BTreeSet<&DeviceRef>,
    opts: &Options,
) -> Option<NodeInventory> {
    let mut resources = Vec::new();
    // A resource the kubelet keeps at capacity 0 (gone after re-partitioning) is kept: zero
    // is an answer, not missing information.
    for (name, cap) in &n.capacity {
        let Some((vendor, unit)) = classify(name, &n.labels) else {
            continue;
        };
        let capacity = count(cap);
        let allocatable = n.allocatable.get(name).map_or(0, |a| count(a));
        let allocated = requested.get(name).map_or(0, |m| (*m / 1000) as i64);
        resources.push(GpuResource {
            name: name.clone(),
            vendor,
            unit,
            capacity,
            allocatable,
            allocated,
            free: (allocatable - allocated).max(0),
        });
    }
    let has_device_plugin_gpus = resources.iter().any(|r| r.capacity > 0);
    let dra = dra_resources(slices, claimed, &mut resources);
    if resources.is_empty() {
        return None;
    }
    let label = |k: &str| n.labels.get(k).cloned();
    let mig_single = mig_single_profile(&n.labels).is_some();
    let hardware = hardware_count(&n.labels, mig_single);

    // Physical GPUs: the hardware count when the node states one; otherwise what the
    // advertised units add up to, where a unit's size in GPUs is known.
    let whole_units: i64 = (resources.iter())
        .filter(|r| r.unit == GpuUnit::Whole)
        .map(|r| r.capacity)
        .sum();
    let shared_gpus: i64 = (resources.iter())
        .filter_map(|r| match r.unit {
            GpuUnit::Shared(k) => Some(r.capacity / i64::from(k.max(1))),
            _ => None,
        })
        .sum();
    let split: Vec<&GpuResource> = (resources.iter())
        .filter(|r| matches!(r.unit, GpuUnit::MigSlice(_) | GpuUnit::Partition))
        .filter(|r| r.capacity > 0)
        .collect();
    let amd_factor = amd_partitions_per_gpu(&n.labels).flatten();
    let split_units: i64 = split.iter().map(|r| r.capacity).sum();
    let physical = match hardware {
        Some(h) => Some(h),
        None if split.is_empty() => Some(whole_units + shared_gpus),
        // AMD partitions of a known mode add up to GPUs; MIG slices do not (a GPU's slices
        // depend on its layout).
        None => match (split.iter().all(|r| r.vendor == Vendor::Amd), amd_factor) {
            (true, Some(f)) => Some(whole_units + shared_gpus + split_units / f),
            _ => None,
        },
    };
    // GPUs given over to slices or partitions, when the total is known.
    let split_gpus = physical.map(|p| (p - whole_units - shared_gpus).max(0));

    // Condition and failures.
    let not_advertised = resources
        .iter()
        .any(|r| r.capacity > 0 && r.allocatable == 0 && !r.name.starts_with("dra:"));
    let past_bound = match (opts.now_ms, n.ready_since_ms) {
        (Some(now), Some(since)) if n.ready => now - since >= opts.not_advertised_bound_ms,
        _ => false,
    };
    let dra_gpus: i64 = (resources.iter())
        .filter(|r| r.name.starts_with("dra:"))
        .map(|r| r.capacity)
        .sum();
    // A DRA driver leaves an unhealthy GPU out of its slice; the hardware labels still
    // count it.
    let dra_missing = match hardware {
        Some(h) if !has_device_plugin_gpus && dra_gpus > 0 => (h - dra_gpus).max(0),
        _ => 0,
    };
    let units_to_gpus = |missing: i64, r: &GpuResource| -> i64 {
        match &r.unit {
            GpuUnit::Whole => missing,
            GpuUnit::Shared(k) => (missing + i64::from(*k) - 1) / i64::from((*k).max(1)),
            _ => match split_gpus {
                // Units per GPU = advertised units / GPUs split; round up.
                Some(g) if g > 0 && split_units > 0 => {
                    (missing * g + split_units - 1) / split_units
                }
                _ => 0,
            },
        }
    };
    let unhealthy: i64 = (resources.iter())
        .filter(|r| r.allocatable > 0)
        .map(|r| units_to_gpus((r.capacity - r.allocatable).max(0), r))
        .sum::<i64>()
        + dra_missing;
    let silent: i64 = (resources.iter())
        .filter(|r| r.capacity > 0 && r.allocatable == 0)
        .map(|r| units_to_gpus(r.capacity, r))
        .sum();
    let condition = if not_advertised && past_bound {
        GpuCondition::Failed
    } else if not_advertised {
        GpuCondition::NotAdvertised
    } else if unhealthy > 0 || resources.iter().any(|r| r.allocatable < r.capacity) {
        GpuCondition::Degraded
    } else {
        GpuCondition::Healthy
    };
    let failed_gpus = match condition {
        GpuCondition::Failed => unhealthy + silent,
        GpuCondition::Degraded => unhealthy,
        _ => 0,
    };

    // Free whole GPUs and idle physical GPUs.
    let free_gpus: i64 = (resources.iter())
        .filter(|r| r.unit == GpuUnit::Whole)
        .map(|r| r.free)
        .sum();
    let shared_idle: i64 = (resources.iter())
        .filter_map(|r| match r.unit {
            // Replicas spread over GPUs: each one in use may hold a different GPU.
            GpuUnit::Shared(k) => Some((r.allocatable / i64::from(k.max(1)) - r.allocated).max(0)),
            _ => None,
        })
        .sum();
    let split_idle = match split_gpus {
        Some(g) if split.iter().any(|r| r.allocatable > 0) => {
            let used: i64 = split.iter().map(|r| r.allocated).sum();
            let down: i64 = (split.iter())
                .map(|r| units_to_gpus((r.capacity - r.allocatable).max(0), r))
                .sum();
            (g - used - down).max(0)
        }
        _ => 0,
    };
    let idle_gpus = free_gpus + shared_idle + split_idle;

    let problem = implausible(&resources, physical);
    let mut inv = NodeInventory {
        name: n.name.clone(),
        pool: node_pool(&n.labels, opts.pool_label.as_deref()),
        ready: n.ready,
        schedulable: !n.unschedulable && !n.taints.iter().any(is_leaving),
        taints: n.taints.clone(),
        region: label("topology.kubernetes.io/region"),
        zone: label("topology.kubernetes.io/zone"),
        instance_type: label("node.kubernetes.io/instance-type"),
        kubelet_version: n.kubelet_version.clone(),
        // GFD's labels first; managed clusters without GFD say it their own way.
        product: label("nvidia.com/gpu.product")
            .or(label("amd.com/gpu.product-name"))
            .or(label("gpu.intel.com/product"))
            .or(label("cloud.google.com/gke-accelerator"))
            .or(label("karpenter.k8s.aws/instance-gpu-name"))
            .or(dra.product),
        family: label("nvidia.com/gpu.family").or(label("amd.com/gpu.family")),
        gpu_memory_mib: label("nvidia.com/gpu.memory")
            .and_then(|m| m.parse().ok())
            .or_else(|| {
                label("amd.com/gpu.vram").and_then(|v| {
                    v.trim_end_matches('G')
                        .parse::<u64>()
                        .ok()
                        .map(|g| g * 1024)
                })
            })
            // Karpenter's `instance-gpu-memory` is MiB per GPU.
            .or_else(|| label("karpenter.k8s.aws/instance-gpu-memory").and_then(|m| m.parse().ok()))
            .or(dra.memory_mib),
        physical_gpus: physical,
        free_gpus,
        idle_gpus: idle_gpus.min(physical.unwrap_or(i64::MAX)),
        failed_gpus,
        resources,
        condition,
        problem: None,
    };
    if let Some(p) = problem {
        inv.quarantine(p);
    }
    Some(inv)
}

/// Why a node's numbers cannot be true, if they cannot.
fn implausible(resources: &[GpuResource], physical: Option<i64>) -> Option<String> {
    if let Some(p) = physical.filter(|p| *p > MAX_PLAUSIBLE_GPUS_PER_NODE) {
        return Some(format!(
            "reports {p} physical GPUs, more than {MAX_PLAUSIBLE_GPUS_PER_NODE} per node"
        ));
    }
    if let Some(r) = resources.iter().find(|r| r.allocatable > r.capacity) {
        return Some(format!(
            "{}: allocatable {} is above capacity {}",
            r.name, r.allocatable, r.capacity
        ));
    }
    None
}

impl NodeInventory {
    /// Keep the node, with `reason`, and count none of its GPUs: numbers that make no sense
    /// must not make the fleet look bigger, nor reject the rest of the report.
    pub fn quarantine(&mut self, reason: String) {
        self.problem = Some(reason);
        self.physical_gpus = None;
        self.free_gpus = 0;
        self.idle_gpus = 0;
        self.failed_gpus = 0;
    }
}

/// Per-pool totals of the nodes added, in pool order.
pub fn pools(nodes: &[NodeInventory]) -> Vec<PoolInventory> {
    let mut t = PoolTotals::default();
    for n in nodes {
        t.add(n);
    }
    t.pools()
}

/// Pool totals that nodes are added to and removed from, so that a delta updates them from
/// the nodes it touches without revisiting the rest. Products and resources are kept with
/// counts, so removing a node undoes exactly what adding it did. The leader holds one per
/// connected cluster, so the maps are sorted vectors: a cluster has a few pools, and a
/// `BTreeMap` node reserves room for eleven entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolTotals {
    pools: Vec<(String, PoolSums)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PoolSums {
    nodes: u32,
    usable_nodes: u32,
    physical_gpus: i64,
    physical_unknown_nodes: u32,
    free_gpus: i64,
    idle_gpus: i64,
    failed_gpus: i64,
    allocatable_gpus: i64,
    allocated_gpus: i64,
    /// Product and the nodes with it, by product.
    products: Vec<(String, u32)>,
    /// Summed resource (free counted on usable nodes only) and the nodes with it, by name.
    resources: Vec<(GpuResource, u32)>,
}

/// The entry for `key` in a vector sorted by key, inserted with `new` when absent.
fn entry<'a, T>(
    v: &'a mut Vec<T>,
    key: &str,
    key_of: impl Fn(&T) -> &str,
    new: impl FnOnce() -> T,
) -> (usize, &'a mut T) {
    let i = match v.binary_search_by(|x| key_of(x).cmp(key)) {
        Ok(i) => i,
        Err(i) => {
            v.insert(i, new());
            i
        }
    };
    (i, &mut v[i])
}

impl PoolTotals {
    /// Count `n` in its pool.
    pub fn add(&mut self, n: &NodeInventory) {
        self.change(n, 1);
    }

    /// Undo a previous [`PoolTotals::add`] of the same node record.
    pub fn remove(&mut self, n: &NodeInventory) {
        self.change(n, -1);
    }

    fn change(&mut self, n: &NodeInventory, sign: i64) {
        let step = |x: &mut u32| {
            *x = if sign > 0 {
                *x + 1
            } else {
                x.saturating_sub(1)
            };
        };
        let key = n.pool.as_deref().unwrap_or_default();
        let (pi, (_, p)) = entry(
            &mut self.pools,
            key,
            |(k, _)| k,
            || (key.to_string(), PoolSums::default()),
        );
        let usable = n.usable();
        step(&mut p.nodes);
        if usable {
            step(&mut p.usable_nodes);
            p.free_gpus += sign * n.free_gpus;
            p.idle_gpus += sign * n.idle_gpus;
        }
        match n.physical_gpus {
            Some(g) => p.physical_gpus += sign * g,
            None => step(&mut p.physical_unknown_nodes),
        }
        p.failed_gpus += sign * n.failed_gpus;
        let alloc = allocatable_gpus(n);
        p.allocatable_gpus += sign * alloc;
        p.allocated_gpus += sign * (alloc - n.idle_gpus.min(alloc)).max(0);
        if let Some(prod) = &n.product {
            let (i, (_, c)) = entry(&mut p.products, prod, |(k, _)| k, || (prod.clone(), 0));
            step(c);
            if *c == 0 {
                p.products.remove(i);
            }
        }
        // A quarantined node's numbers are shown on the node, never summed.
        let summed: &[GpuResource] = match n.problem {
            None => &n.resources,
            Some(_) => &[],
        };
        for r in summed {
            let zero = || {
                let x = GpuResource {
                    capacity: 0,
                    allocatable: 0,
                    allocated: 0,
                    free: 0,
                    ..r.clone()
                };
                (x, 0)
            };
            let (i, (x, count)) = entry(&mut p.resources, &r.name, |(x, _)| &x.name, zero);
            x.capacity += sign * r.capacity;
            x.allocatable += sign * r.allocatable;
            x.allocated += sign * r.allocated;
            x.free += if usable { sign * r.free } else { 0 };
            step(count);
            if *count == 0 {
                p.resources.remove(i);
            }
        }
        if p.nodes == 0 {
            self.pools.remove(pi);
        }
    }

    /// The totals as pool records.
    pub fn pools(&self) -> Vec<PoolInventory> {
        self.pools
            .iter()
            .map(|(name, p)| PoolInventory {
                name: name.clone(),
                nodes: p.nodes,
                usable_nodes: p.usable_nodes,
                products: p.products.iter().map(|(k, _)| k.clone()).collect(),
                physical_gpus: p.physical_gpus,
                physical_unknown_nodes: p.physical_unknown_nodes,
                free_gpus: p.free_gpus,
                idle_gpus: p.idle_gpus,
                failed_gpus: p.failed_gpus,
                allocatable_gpus: p.allocatable_gpus,
                allocated_gpus: p.allocated_gpus,
                resources: p.resources.iter().map(|(r, _)| r.clone()).collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn node(
        name: &str,
        labels: &[(&str, &str)],
        cap: &[(&str, &str)],
        alloc: &[(&str, &str)],
    ) -> NodeInput {
        NodeInput {
            name: name.into(),
            labels: map(labels),
            capacity: map(cap),
            allocatable: map(alloc),
            ready: true,
            kubelet_version: "v1.34.2".into(),
            ..Default::default()
        }
    }

    fn pod(node: &str, phase: &str, gpus: &[(&str, &str)]) -> PodInput {
        PodInput {
            namespace: "d".into(),
            name: format!("p-{node}-{phase}"),
            node_name: Some(node.into()),
            phase: phase.into(),
            containers: vec![map(gpus)],
            ..Default::default()
        }
    }

    fn res<'a>(inv: &'a ClusterInventory, node: &str, r: &str) -> &'a GpuResource {
        inv.nodes
            .iter()
            .find(|n| n.name == node)
            .unwrap()
            .resources
            .iter()
            .find(|x| x.name == r)
            .unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity_milli("8"), Some(8000));
        assert_eq!(parse_quantity_milli("500m"), Some(500));
        assert_eq!(parse_quantity_milli("80Gi"), Some(80 * (1 << 30) * 1000));
        assert_eq!(parse_quantity_milli("1.5"), Some(1500));
        assert_eq!(parse_quantity_milli("x"), None);
    }

    #[test]
    fn allocated_counts_only_non_terminal_pods() {
        let n = node(
            "n",
            &[],
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        let pods = [
            pod("n", "Running", &[("nvidia.com/gpu", "4")]),
            pod("n", "Pending", &[("nvidia.com/gpu", "2")]),
            pod("n", "Succeeded", &[("nvidia.com/gpu", "2")]),
            pod("n", "Failed", &[("nvidia.com/gpu", "2")]),
        ];
        let inv = compute(&[n], &pods, &[], &[], None);
        let r = res(&inv, "n", "nvidia.com/gpu");
        assert_eq!(
            (r.capacity, r.allocatable, r.allocated, r.free),
            (8, 8, 6, 2)
        );
        assert_eq!(inv.nodes[0].free_gpus, 2);
    }

    #[test]
    fn init_containers_are_a_floor_and_overhead_adds() {
        let p = PodInput {
            containers: vec![
                map(&[("nvidia.com/gpu", "1")]),
                map(&[("nvidia.com/gpu", "1")]),
            ],
            init_containers: vec![InitContainer {
                requests: map(&[("nvidia.com/gpu", "4")]),
                restartable: false,
            }],
            overhead: map(&[("cpu", "250m")]),
            ..Default::default()
        };
        let r = pod_requests(&p);
        assert_eq!(r["nvidia.com/gpu"], 4000);
        assert_eq!(r["cpu"], 250);
    }

    #[test]
    fn a_node_that_is_going_away_offers_no_free_gpus_and_a_dedicated_one_does() {
        let taint = |key: &str, effect: &str| Taint {
            key: key.into(),
            value: String::new(),
            effect: effect.into(),
        };
        // (taint, still schedulable)
        let cases = [
            (taint("ToBeDeletedByClusterAutoscaler", "NoSchedule"), false),
            (taint("karpenter.sh/disrupted", "NoSchedule"), false),
            (
                taint("node.kubernetes.io/out-of-service", "NoExecute"),
                false,
            ),
            (
                taint("node.kubernetes.io/unschedulable", "NoSchedule"),
                false,
            ),
            (taint("nvidia.com/gpu", "NoSchedule"), true),
            (
                taint("ToBeDeletedByClusterAutoscaler", "PreferNoSchedule"),
                true,
            ),
        ];
        for (t, schedulable) in cases {
            let mut n = node(
                "n1",
                &[("nvidia.com/gpu.count", "8")],
                &[("nvidia.com/gpu", "8")],
                &[("nvidia.com/gpu", "8")],
            );
            n.taints = vec![t.clone()];
            let inv = compute(&[n], &[], &[], &[], None);
            assert_eq!(inv.nodes[0].schedulable, schedulable, "{t:?}");
            let free: i64 = inv.pools.iter().map(|p| p.free_gpus).sum();
            assert_eq!(free, if schedulable { 8 } else { 0 }, "{t:?}");
        }
    }

    #[test]
    fn managed_clusters_without_gfd_are_counted_right() {
        // GKE time-sharing: 4 L4s shared by 8 clients each advertise 32 `nvidia.com/gpu`,
        // with GKE's labels and no GFD.
        let gke = node(
            "gke",
            &[
                ("cloud.google.com/gke-accelerator", "nvidia-l4"),
                ("cloud.google.com/gke-gpu-sharing-strategy", "time-sharing"),
                ("cloud.google.com/gke-max-shared-clients-per-gpu", "8"),
            ],
            &[("nvidia.com/gpu", "32")],
            &[("nvidia.com/gpu", "32")],
        );
        // Intel with resource management: 2 GPUs, and shares of them that are not GPUs.
        let intel = node(
            "intel",
            &[("gpu.intel.com/product", "Flex-170")],
            &[
                ("gpu.intel.com/i915", "2"),
                ("gpu.intel.com/millicores", "2000"),
                ("gpu.intel.com/memory.max", "34359738368"),
                ("gpu.intel.com/tiles", "2"),
            ],
            &[
                ("gpu.intel.com/i915", "2"),
                ("gpu.intel.com/millicores", "2000"),
                ("gpu.intel.com/memory.max", "34359738368"),
                ("gpu.intel.com/tiles", "2"),
            ],
        );
        // EKS with Karpenter's instance labels and no GFD.
        let eks = node(
            "eks",
            &[
                ("karpenter.k8s.aws/instance-gpu-name", "a10g"),
                ("karpenter.k8s.aws/instance-gpu-memory", "24576"),
            ],
            &[("nvidia.com/gpu", "4")],
            &[("nvidia.com/gpu", "4")],
        );
        let inv = compute(&[gke, intel, eks], &[], &[], &[], None);
        let n = |name: &str| inv.nodes.iter().find(|n| n.name == name).unwrap();
        // (node, physical GPUs, product, memory MiB, GPU resources)
        let cases = [
            ("gke", 4, Some("nvidia-l4"), None, 1),
            ("intel", 2, Some("Flex-170"), None, 1),
            ("eks", 4, Some("a10g"), Some(24576), 1),
        ];
        for (name, physical, product, memory, resources) in cases {
            let got = n(name);
            assert_eq!(got.physical_gpus, Some(physical), "{name}: physical");
            assert_eq!(got.product.as_deref(), product, "{name}: product");
            assert_eq!(got.gpu_memory_mib, memory, "{name}: memory");
            assert_eq!(
                got.resources.len(),
                resources,
                "{name}: {:?}",
                got.resources
            );
        }
        assert_eq!(n("gke").resources[0].unit, GpuUnit::Shared(8));
    }

    /// One row of the GPU-mode table: what a node shows, and what Flotilla counts.
    struct Mode {
        what: &'static str,
        labels: Vec<(&'static str, &'static str)>,
        /// (resource, capacity, allocatable)
        resources: Vec<(&'static str, &'static str, &'static str)>,
        /// (resource, requested by one running pod)
        used: Vec<(&'static str, &'static str)>,
        physical: Option<i64>,
        free_whole: i64,
        idle: i64,
        failed: i64,
        /// The unit of the first resource named in `resources`.
        unit: GpuUnit,
    }

    fn run(m: &Mode) -> NodeInventory {
        let cap: Vec<(&str, &str)> = m.resources.iter().map(|(r, c, _)| (*r, *c)).collect();
        let alloc: Vec<(&str, &str)> = m.resources.iter().map(|(r, _, a)| (*r, *a)).collect();
        let n = node("n", &m.labels, &cap, &alloc);
        let pods: Vec<PodInput> = m
            .used
            .iter()
            .map(|(r, q)| pod("n", "Running", &[(r, q)]))
            .collect();
        compute(&[n], &pods, &[], &[], None).nodes.remove(0)
    }

    #[test]
    fn every_gpu_mode_is_counted_as_what_it_is() {
        let modes = [
            Mode {
                what: "whole GPUs",
                labels: vec![("nvidia.com/gpu.count", "8")],
                resources: vec![("nvidia.com/gpu", "8", "8")],
                used: vec![("nvidia.com/gpu", "3")],
                physical: Some(8),
                free_whole: 5,
                idle: 5,
                failed: 0,
                unit: GpuUnit::Whole,
            },
            // Case 1: GFD in MIG single overwrites gpu.count with the slice count.
            Mode {
                what: "MIG single, no hardware count",
                labels: vec![
                    ("nvidia.com/mig.strategy", "single"),
                    ("nvidia.com/gpu.count", "56"),
                    (
                        "nvidia.com/gpu.product",
                        "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb",
                    ),
                ],
                resources: vec![("nvidia.com/gpu", "56", "56")],
                used: vec![],
                physical: None,
                free_whole: 0,
                idle: 0,
                failed: 0,
                unit: GpuUnit::MigSlice("1g.10gb".into()),
            },
            Mode {
                what: "MIG single on Karpenter (instance GPU count)",
                labels: vec![
                    ("nvidia.com/mig.strategy", "single"),
                    (
                        "nvidia.com/gpu.product",
                        "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb",
                    ),
                    ("karpenter.k8s.aws/instance-gpu-count", "8"),
                ],
                resources: vec![("nvidia.com/gpu", "16", "16")],
                used: vec![("nvidia.com/gpu", "2")],
                physical: Some(8),
                free_whole: 0,
                idle: 6,
                failed: 0,
                unit: GpuUnit::MigSlice("3g.20gb".into()),
            },
            // Case 2: two GPUs left whole beside six split ones.
            Mode {
                what: "MIG mixed, two GPUs whole",
                labels: vec![
                    ("nvidia.com/mig.strategy", "mixed"),
                    ("nvidia.com/gpu.count", "8"),
                ],
                resources: vec![
                    ("nvidia.com/gpu", "2", "2"),
                    ("nvidia.com/mig-1g.10gb", "42", "42"),
                ],
                used: vec![("nvidia.com/mig-1g.10gb", "4")],
                physical: Some(8),
                free_whole: 2,
                idle: 4,
                failed: 0,
                unit: GpuUnit::Whole,
            },
            Mode {
                what: "MIG mixed, re-partitioned (nvidia.com/gpu kept at 0)",
                labels: vec![
                    ("nvidia.com/mig.strategy", "mixed"),
                    ("nvidia.com/gpu.count", "8"),
                ],
                resources: vec![
                    ("nvidia.com/gpu", "0", "0"),
                    ("nvidia.com/mig-3g.40gb", "16", "16"),
                ],
                used: vec![],
                physical: Some(8),
                free_whole: 0,
                idle: 8,
                failed: 0,
                unit: GpuUnit::Whole,
            },
            // Case 3: replicas are neither whole GPUs nor a bound on idle ones.
            Mode {
                what: "time-slicing x4",
                labels: vec![
                    ("nvidia.com/gpu.count", "4"),
                    ("nvidia.com/gpu.replicas", "4"),
                ],
                resources: vec![("nvidia.com/gpu", "16", "16")],
                used: vec![("nvidia.com/gpu", "1")],
                physical: Some(4),
                free_whole: 0,
                idle: 3,
                failed: 0,
                unit: GpuUnit::Shared(4),
            },
            // Case 4: GKE time-sharing, 8 GPUs x 48 clients, no GFD.
            Mode {
                what: "GKE time-sharing x48",
                labels: vec![
                    ("cloud.google.com/gke-accelerator", "nvidia-l4"),
                    ("cloud.google.com/gke-gpu-sharing-strategy", "time-sharing"),
                    ("cloud.google.com/gke-max-shared-clients-per-gpu", "48"),
                ],
                resources: vec![("nvidia.com/gpu", "384", "384")],
                used: vec![],
                physical: Some(8),
                free_whole: 0,
                idle: 8,
                failed: 0,
                unit: GpuUnit::Shared(48),
            },
            Mode {
                what: "AMD MI300X in CPX, default single naming",
                labels: vec![
                    ("amd.com/gpu.product-name", "AMD_Instinct_MI300X"),
                    ("amd.com/compute-memory-partition", "cpx_nps4"),
                ],
                resources: vec![("amd.com/gpu", "64", "64")],
                used: vec![("amd.com/gpu", "9")],
                physical: Some(8),
                free_whole: 0,
                idle: 0,
                failed: 0,
                unit: GpuUnit::Partition,
            },
            Mode {
                what: "AMD MI300X unpartitioned",
                labels: vec![
                    ("amd.com/gpu.product-name", "AMD_Instinct_MI300X"),
                    ("amd.com/compute-memory-partition", "spx_nps1"),
                ],
                resources: vec![("amd.com/gpu", "8", "8")],
                used: vec![],
                physical: Some(8),
                free_whole: 8,
                idle: 8,
                failed: 0,
                unit: GpuUnit::Whole,
            },
            Mode {
                what: "Intel with resource management",
                labels: vec![("gpu.intel.com/device.count", "2")],
                resources: vec![
                    ("gpu.intel.com/i915", "2", "2"),
                    ("gpu.intel.com/millicores", "2000", "2000"),
                    ("gpu.intel.com/tiles", "2", "2"),
                ],
                used: vec![],
                physical: Some(2),
                free_whole: 2,
                idle: 2,
                failed: 0,
                unit: GpuUnit::Whole,
            },
            Mode {
                what: "two devices unhealthy",
                labels: vec![("nvidia.com/gpu.count", "8")],
                resources: vec![("nvidia.com/gpu", "8", "6")],
                used: vec![],
                physical: Some(8),
                free_whole: 6,
                idle: 6,
                failed: 2,
                unit: GpuUnit::Whole,
            },
        ];
        for m in &modes {
            let n = run(m);
            let got = (n.physical_gpus, n.free_gpus, n.idle_gpus, n.failed_gpus);
            assert_eq!(
                got,
                (m.physical, m.free_whole, m.idle, m.failed),
                "{}: (physical, free whole, idle, failed)",
                m.what
            );
            assert_eq!(n.resources[0].unit, m.unit, "{}: unit", m.what);
            assert_eq!(n.problem, None, "{}", m.what);
        }
    }

    #[test]
    fn a_node_with_impossible_numbers_is_kept_with_a_reason_and_counts_nothing() {
        let broken = node(
            "broken",
            &[("nvidia.com/gpu.count", "512")],
            &[("nvidia.com/gpu", "512")],
            &[("nvidia.com/gpu", "512")],
        );
        let over = node(
            "over",
            &[],
            &[("nvidia.com/gpu", "4")],
            &[("nvidia.com/gpu", "8")],
        );
        let fine = node(
            "fine",
            &[],
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        let inv = compute(&[broken, over, fine], &[], &[], &[], None);
        assert_eq!(inv.nodes.len(), 3, "the report stands");
        let why = |name: &str| {
            let n = inv.nodes.iter().find(|n| n.name == name).unwrap();
            (n.problem.clone(), n.physical_gpus, n.free_gpus)
        };
        assert!(why("broken").0.unwrap().contains("512 physical GPUs"));
        assert!(why("over").0.unwrap().contains("above capacity"));
        assert_eq!(why("fine"), (None, Some(8), 8));
        let p = &inv.pools[0];
        assert_eq!((p.physical_gpus, p.free_gpus, p.usable_nodes), (8, 8, 1));
        assert_eq!(
            p.resources[0].capacity, 8,
            "quarantined numbers are not summed"
        );
    }

    #[test]
    fn gpus_unadvertised_past_the_bound_after_ready_are_failures() {
        let minute = 60_000;
        let n = |ready_since: Option<i64>| NodeInput {
            ready_since_ms: ready_since,
            ready: ready_since.is_some(),
            ..node(
                "n",
                &[("nvidia.com/gpu.count", "8")],
                &[("nvidia.com/gpu", "8")],
                &[("nvidia.com/gpu", "0")],
            )
        };
        let opts = Options {
            now_ms: Some(100 * minute),
            not_advertised_bound_ms: 5 * minute,
            ..Options::default()
        };
        // (Ready since, condition, failed)
        let cases = [
            (Some(99 * minute), GpuCondition::NotAdvertised, 0),
            (Some(95 * minute), GpuCondition::Failed, 8),
            (Some(10 * minute), GpuCondition::Failed, 8),
            (None, GpuCondition::NotAdvertised, 0),
        ];
        for (since, condition, failed) in cases {
            let inv = compute_with(&[n(since)], &[], &[], &[], &opts);
            let got = &inv.nodes[0];
            assert_eq!(
                (got.condition, got.failed_gpus),
                (condition, failed),
                "{since:?}"
            );
        }
        // The agent wakes when the first bound passes, and not for one already past.
        assert_eq!(
            next_deadline(&[n(Some(99 * minute)), n(Some(98 * minute))], &opts),
            Some(103 * minute)
        );
        assert_eq!(next_deadline(&[n(Some(10 * minute))], &opts), None);
        // Without a clock nothing turns into a failure.
        assert_eq!(
            compute(&[n(Some(0))], &[], &[], &[], None).nodes[0].condition,
            GpuCondition::NotAdvertised
        );
    }

    fn device(name: &str, kind: &str, consumes: &[&str]) -> DeviceInput {
        DeviceInput {
            name: name.into(),
            attributes: [("type".to_string(), Attr::Str(kind.into()))].into(),
            capacity: BTreeMap::new(),
            consumes: consumes.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn dra_missing_devices_fail_and_an_allocated_partition_takes_its_parent() {
        let claim = |d: &str| DeviceRef {
            driver: "gpu.nvidia.com".into(),
            pool: "n".into(),
            device: d.into(),
        };
        // Two GPUs, each also offered as two partitions drawing on the GPU's counters.
        let s = SliceInput {
            driver: "gpu.nvidia.com".into(),
            node_name: Some("n".into()),
            pool: "n".into(),
            generation: 1,
            slice_count: 1,
            devices: vec![
                device("gpu-0", "gpu", &["gpu-0-counters"]),
                device("gpu-0-mig-0", "mig", &["gpu-0-counters"]),
                device("gpu-0-mig-1", "mig", &["gpu-0-counters"]),
                device("gpu-1", "gpu", &["gpu-1-counters"]),
                device("gpu-1-mig-0", "mig", &["gpu-1-counters"]),
            ],
        };
        let hw = node(
            "n",
            &[("nvidia.com/gpu.count", "3")],
            &[("cpu", "96")],
            &[("cpu", "96")],
        );
        // (claims, free whole GPUs)
        let cases = [
            (vec![], 2),
            (vec![claim("gpu-0-mig-1")], 1),
            (vec![claim("gpu-1")], 1),
            (vec![claim("gpu-0-mig-0"), claim("gpu-1-mig-0")], 0),
        ];
        for (claims, free) in cases {
            let inv = compute(
                std::slice::from_ref(&hw),
                &[],
                std::slice::from_ref(&s),
                &claims,
                None,
            );
            let n = &inv.nodes[0];
            assert_eq!(n.free_gpus, free, "{claims:?}");
            // The hardware says 3 GPUs; the driver publishes 2: one failed.
            assert_eq!((n.physical_gpus, n.failed_gpus), (Some(3), 1));
            assert_eq!(n.condition, GpuCondition::Degraded);
        }
    }

    #[test]
    fn sidecars_count_in_the_init_and_the_steady_phase() {
        let init = |gpus: &str, restartable| InitContainer {
            requests: map(&[("nvidia.com/gpu", gpus)]),
            restartable,
        };
        // (init containers in order, app container GPUs, effective GPUs)
        let cases = [
            // A sidecar holding 1 GPU runs beside the app's 2: 3.
            (vec![init("1", true)], "2", 3000),
            // An init container after the sidecar runs beside it: 1 + 4 = 5 > 1 + 2.
            (vec![init("1", true), init("4", false)], "2", 5000),
            // Before the sidecar starts it does not: max(4, 1 + 2) = 4.
            (vec![init("4", false), init("1", true)], "2", 4000),
            // A plain init container is only a floor: max(1, 2) = 2.
            (vec![init("1", false)], "2", 2000),
        ];
        for (inits, app, want) in cases {
            let p = PodInput {
                containers: vec![map(&[("nvidia.com/gpu", app)])],
                init_containers: inits.clone(),
                ..Default::default()
            };
            assert_eq!(
                pod_requests(&p)["nvidia.com/gpu"],
                want,
                "{inits:?} + {app}"
            );
        }
    }

    #[test]
    fn time_slicing_does_not_multiply_physical_gpus() {
        let labels = [
            ("nvidia.com/gpu.count", "2"),
            ("nvidia.com/gpu.replicas", "4"),
            ("nvidia.com/gpu.product", "NVIDIA-L4"),
        ];
        let n = node(
            "n",
            &labels,
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        let inv = compute(
            &[n],
            &[pod("n", "Running", &[("nvidia.com/gpu", "3")])],
            &[],
            &[],
            None,
        );
        let node = &inv.nodes[0];
        assert_eq!(
            node.physical_gpus,
            Some(2),
            "8 advertised replicas are 2 GPUs"
        );
        assert_eq!(node.resources[0].unit, GpuUnit::Shared(4));
        assert_eq!(node.resources[0].free, 5);
        assert_eq!(node.free_gpus, 0, "a replica is not a whole GPU");
        assert_eq!(
            node.idle_gpus, 0,
            "3 replicas in use may sit on both GPUs: none is surely idle"
        );
        // Without GFD labels, a .shared resource still isn't counted as whole GPUs.
        let bare = node_with_shared();
        assert_eq!(
            compute(&[bare], &[], &[], &[], None).nodes[0].resources[0].unit,
            GpuUnit::Shared(1)
        );
    }

    fn node_with_shared() -> NodeInput {
        node(
            "s",
            &[],
            &[("nvidia.com/gpu.shared", "4")],
            &[("nvidia.com/gpu.shared", "4")],
        )
    }

    #[test]
    fn mig_mixed_profiles_are_summed_separately() {
        let labels = [
            ("nvidia.com/mig.strategy", "mixed"),
            ("nvidia.com/gpu.count", "8"),
        ];
        let n = node(
            "n",
            &labels,
            &[
                ("nvidia.com/mig-1g.10gb", "24"),
                ("nvidia.com/mig-2g.20gb", "16"),
            ],
            &[
                ("nvidia.com/mig-1g.10gb", "24"),
                ("nvidia.com/mig-2g.20gb", "16"),
            ],
        );
        let inv = compute(
            &[n],
            &[pod("n", "Running", &[("nvidia.com/mig-1g.10gb", "2")])],
            &[],
            &[],
            None,
        );
        assert_eq!(res(&inv, "n", "nvidia.com/mig-1g.10gb").free, 22);
        assert_eq!(res(&inv, "n", "nvidia.com/mig-2g.20gb").free, 16);
        assert_eq!(
            res(&inv, "n", "nvidia.com/mig-2g.20gb").unit,
            GpuUnit::MigSlice("2g.20gb".into())
        );
        assert_eq!(inv.nodes[0].physical_gpus, Some(8));
        assert_eq!(inv.nodes[0].free_gpus, 0, "MIG slices are never whole GPUs");
        assert_eq!(
            inv.nodes[0].idle_gpus, 6,
            "2 slices in use hold at most 2 GPUs"
        );
    }

    #[test]
    fn amd_partitions_have_their_own_names() {
        let n = node(
            "n",
            &[
                ("amd.com/gpu.product-name", "MI300X"),
                ("amd.com/gpu.vram", "192G"),
            ],
            &[("amd.com/gpu", "8"), ("amd.com/cpx_nps4", "0")],
            &[("amd.com/gpu", "8"), ("amd.com/cpx_nps4", "0")],
        );
        let inv = compute(&[n], &[], &[], &[], None);
        assert_eq!(res(&inv, "n", "amd.com/cpx_nps4").unit, GpuUnit::Partition);
        assert_eq!(res(&inv, "n", "amd.com/gpu").vendor, Vendor::Amd);
        assert_eq!(inv.nodes[0].gpu_memory_mib, Some(192 * 1024));
        assert_eq!(inv.nodes[0].product.as_deref(), Some("MI300X"));
    }

    #[test]
    fn allocatable_zero_after_ready_is_not_advertised_and_below_capacity_is_degraded() {
        let starting = node(
            "a",
            &[],
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "0")],
        );
        let sick = node(
            "b",
            &[],
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "6")],
        );
        let inv = compute(&[starting, sick], &[], &[], &[], None);
        assert_eq!(inv.nodes[0].condition, GpuCondition::NotAdvertised);
        assert_eq!(inv.nodes[0].free_gpus, 0);
        assert_eq!(inv.nodes[1].condition, GpuCondition::Degraded);
        assert_eq!(inv.nodes[1].free_gpus, 6);
        assert_eq!(inv.failed_gpus(), 2, "the starting node is not a failure");
    }

    fn slice(node: &str, generation: i64, count: i64, devices: usize) -> SliceInput {
        SliceInput {
            driver: "gpu.nvidia.com".into(),
            node_name: Some(node.into()),
            pool: node.into(),
            generation,
            slice_count: count,
            devices: (0..devices)
                .map(|i| DeviceInput {
                    name: format!("gpu-{i}"),
                    attributes: [
                        ("type".to_string(), Attr::Str("gpu".into())),
                        (
                            "productName".to_string(),
                            Attr::Str("NVIDIA H100 80GB HBM3".into()),
                        ),
                    ]
                    .into(),
                    capacity: map(&[("memory", "81559Mi")]),
                    consumes: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn dra_devices_come_from_the_newest_complete_generation_and_claims() {
        let n = node("n", &[], &[("cpu", "96")], &[("cpu", "96")]);
        let slices = [slice("n", 1, 1, 8), slice("n", 2, 1, 6)];
        let claims = [DeviceRef {
            driver: "gpu.nvidia.com".into(),
            pool: "n".into(),
            device: "gpu-0".into(),
        }];
        // A pod requesting nvidia.com/gpu must not count against DRA devices.
        let pods = [pod("n", "Running", &[("nvidia.com/gpu", "4")])];
        let inv = compute(std::slice::from_ref(&n), &pods, &slices, &claims, None);
        let r = res(&inv, "n", "dra:gpu.nvidia.com");
        assert_eq!((r.capacity, r.allocated, r.free), (6, 1, 5));
        assert_eq!(
            inv.nodes[0].product.as_deref(),
            Some("NVIDIA-H100-80GB-HBM3")
        );
        assert_eq!(inv.nodes[0].gpu_memory_mib, Some(81559));
        assert_eq!(inv.nodes[0].physical_gpus, Some(6));
        // An incomplete newest generation (1 of 2 slices) is not used; the node has no GPUs.
        let partial = [slice("n", 3, 2, 8)];
        assert!(compute(&[n], &[], &partial, &[], None).nodes.is_empty());
    }

    #[test]
    fn pools_from_provider_labels_or_override() {
        let aks = map(&[
            ("kubernetes.azure.com/agentpool", "gpu"),
            ("agentpool", "old"),
        ]);
        assert_eq!(node_pool(&aks, None).as_deref(), Some("gpu"));
        assert_eq!(
            node_pool(&map(&[("agentpool", "old")]), None).as_deref(),
            Some("old")
        );
        assert_eq!(
            node_pool(&map(&[("cloud.google.com/gke-nodepool", "p")]), None).as_deref(),
            Some("p")
        );
        assert_eq!(
            node_pool(&map(&[("eks.amazonaws.com/nodegroup", "e")]), None).as_deref(),
            Some("e")
        );
        assert_eq!(
            node_pool(&map(&[("karpenter.sh/nodepool", "k")]), None).as_deref(),
            Some("k")
        );
        assert_eq!(
            node_pool(&map(&[("cluster.x-k8s.io/deployment-name", "md")]), None).as_deref(),
            Some("md")
        );
        assert_eq!(
            node_pool(&map(&[("team/pool", "t")]), Some("team/pool")).as_deref(),
            Some("t")
        );
        assert_eq!(node_pool(&map(&[]), None), None);
    }

    #[test]
    fn pool_totals_count_free_only_on_usable_nodes() {
        let l = [
            ("kubernetes.azure.com/agentpool", "h100"),
            ("nvidia.com/gpu.count", "8"),
        ];
        let a = node(
            "a",
            &l,
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        let mut b = node(
            "b",
            &l,
            &[("nvidia.com/gpu", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        b.unschedulable = true;
        let cpu_only = node("c", &l, &[("cpu", "8")], &[("cpu", "8")]);
        let inv = compute(
            &[a, b, cpu_only],
            &[pod("a", "Running", &[("nvidia.com/gpu", "2")])],
            &[],
            &[],
            None,
        );
        assert_eq!(inv.nodes.len(), 2, "nodes without GPUs are left out");
        let p = &inv.pools[0];
        assert_eq!(
            (p.nodes, p.usable_nodes, p.physical_gpus, p.free_gpus),
            (2, 1, 16, 6)
        );
        assert_eq!(p.resources[0].allocated, 2);
    }

    #[test]
    fn removing_a_node_from_pool_totals_undoes_adding_it() {
        let h100 = [
            ("kubernetes.azure.com/agentpool", "h100"),
            ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),
        ];
        let a100 = [
            ("kubernetes.azure.com/agentpool", "h100"),
            ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB"),
        ];
        let g = [("nvidia.com/gpu", "8")];
        let mut b = node("b", &a100, &g, &g);
        b.unschedulable = true;
        let inv = compute(
            &[node("a", &h100, &g, &g), b, node("c", &h100, &g, &g)],
            &[pod("a", "Running", &[("nvidia.com/gpu", "3")])],
            &[],
            &[],
            None,
        );
        let mut t = PoolTotals::default();
        for n in &inv.nodes {
            t.add(n);
        }
        assert_eq!(t.pools(), inv.pools, "adding every node gives pools()");
        t.remove(&inv.nodes[1]);
        assert_eq!(
            t.pools(),
            pools(&[inv.nodes[0].clone(), inv.nodes[2].clone()])
        );
        assert_eq!(
            t.pools()[0].products.len(),
            1,
            "the A100 left with its only node"
        );
        t.remove(&inv.nodes[0]);
        t.remove(&inv.nodes[2]);
        assert!(t.pools().is_empty(), "an emptied pool disappears");
        assert_eq!(t, PoolTotals::default());
    }
}
