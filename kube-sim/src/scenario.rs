//! Scenario files: the simulated clusters, their GPU node pools, workloads and timing.
//!
//! Parsing is strict (`deny_unknown_fields`); YAML errors carry the line and column, and
//! semantic errors name the field path (`clusters[1].pools[0].gpu.mig.profiles`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A whole scenario: one or more clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The simulated clusters.
    pub clusters: Vec<ClusterSpec>,
}

/// The cloud or tool that manages node pools, which decides the pool label.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// AKS: `kubernetes.azure.com/agentpool`
    Aks,
    /// GKE: `cloud.google.com/gke-nodepool`
    Gke,
    /// EKS managed node groups: `eks.amazonaws.com/nodegroup`
    Eks,
    /// Karpenter: `karpenter.sh/nodepool`
    Karpenter,
    /// Cluster API only: `cluster.x-k8s.io/deployment-name`
    #[default]
    ClusterApi,
}

impl Provider {
    /// The node label that names a node's pool.
    pub fn pool_label(self) -> &'static str {
        match self {
            Self::Aks => "kubernetes.azure.com/agentpool",
            Self::Gke => "cloud.google.com/gke-nodepool",
            Self::Eks => "eks.amazonaws.com/nodegroup",
            Self::Karpenter => "karpenter.sh/nodepool",
            Self::ClusterApi => CAPI_POOL_LABEL,
        }
    }
}

/// The label Cluster API puts on nodes of a MachineDeployment.
pub const CAPI_POOL_LABEL: &str = "cluster.x-k8s.io/deployment-name";

/// One simulated cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Cluster name (a DNS label).
    pub name: String,
    /// `topology.kubernetes.io/region` of every node.
    #[serde(default)]
    pub region: String,
    /// Zones; nodes are spread across them round-robin.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Kubelet and API server version, e.g. `v1.34.2`.
    #[serde(default = "default_version")]
    pub kubernetes_version: String,
    /// Which provider's pool label nodes carry.
    #[serde(default)]
    pub provider: Provider,
    /// Free-form cluster labels (reported by agents, not put on nodes).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node pools. Each becomes a MachineDeployment with that many nodes.
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    /// Workloads (a Deployment with optional PDB, Service and ServiceExport).
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Delays of simulated kubelets, device plugins and containers.
    #[serde(default)]
    pub timing: Timing,
    /// Run a device-plugin DaemonSet with a pod on every GPU node (what `kubectl drain`
    /// must skip with `--ignore-daemonsets`).
    #[serde(default = "yes")]
    pub device_plugin_daemonset: bool,
    /// Resources (plurals, e.g. `resourceslices`) the cluster's token may not access: every
    /// request for them gets 403 Forbidden, as from an RBAC role that leaves them out.
    #[serde(default)]
    pub rbac_deny: Vec<String>,
    /// MCS API versions the cluster's CRDs serve (`v1beta1`, `v1alpha1`); empty: both, as
    /// mcs-api v0.5 installs them. `[v1alpha1]` is a cluster with the older CRDs.
    #[serde(default)]
    pub mcs_versions: Vec<String>,
}

fn default_version() -> String {
    "v1.34.2".into()
}

fn yes() -> bool {
    true
}

/// A node pool (also a machine template new MachineDeployments can name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Pool name (a DNS label); the pool label's value.
    pub name: String,
    /// Number of nodes.
    pub count: u32,
    /// `node.kubernetes.io/instance-type`.
    #[serde(default)]
    pub instance_type: String,
    /// CPU cores per node.
    #[serde(default = "default_cpu")]
    pub cpu: u32,
    /// Memory per node in GiB.
    #[serde(default = "default_memory_gib")]
    pub memory_gib: u32,
    /// GPUs on each node, if any.
    #[serde(default)]
    pub gpu: Option<GpuSpec>,
    /// Extra node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    #[serde(default)]
    pub taints: Vec<TaintSpec>,
    /// The cloud's quota for this machine template: at most this many nodes from it at once,
    /// over every MachineDeployment that names it (blue and green pools share it). A scale-up
    /// beyond it leaves machines pending with the reason, as a cloud quota would.
    #[serde(default)]
    pub quota: Option<u32>,
}

fn default_cpu() -> u32 {
    96
}

fn default_memory_gib() -> u32 {
    1024
}

/// GPU vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// NVIDIA (`nvidia.com/gpu`, GFD labels, DRA driver `gpu.nvidia.com`).
    Nvidia,
    /// AMD (`amd.com/gpu`).
    Amd,
    /// Intel (`gpu.intel.com/i915`).
    Intel,
}

/// The GPUs of each node in a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Vendor.
    pub vendor: Vendor,
    /// Product name as GFD labels it, e.g. `NVIDIA-H100-80GB-HBM3`.
    pub product: String,
    /// Memory per physical GPU in MiB.
    pub memory_mib: u64,
    /// Physical GPUs per node.
    pub count: u32,
    /// Architecture family (`hopper`, `ampere`, `ada-lovelace`, `cdna3`).
    #[serde(default)]
    pub family: String,
    /// Driver version label.
    #[serde(default = "default_driver")]
    pub driver_version: String,
    /// MIG partitioning (NVIDIA only).
    #[serde(default)]
    pub mig: Option<MigSpec>,
    /// Time-slicing or MPS sharing (NVIDIA only).
    #[serde(default)]
    pub sharing: Option<SharingSpec>,
    /// Publish the GPUs as DRA ResourceSlices instead of a device-plugin resource. With
    /// `mig` (strategy mixed) the slice offers each GPU and its partitions as partitionable
    /// devices drawing on the GPU's shared counters.
    #[serde(default)]
    pub dra: bool,
    /// GPU Feature Discovery runs (its `nvidia.com/gpu.*` labels). Off: only the provider's
    /// own labels say what the GPUs are, as on GKE or EKS without the GPU operator.
    #[serde(default = "yes")]
    pub gfd: bool,
    /// The device plugin crashed: allocatable stays 0 after the node is Ready.
    #[serde(default)]
    pub plugin_crashed: bool,
    /// AMD compute/memory partition mode, e.g. `cpx_nps4` (8 partitions per MI300X).
    #[serde(default)]
    pub partition: Option<String>,
    /// AMD device plugin resource naming: `single` (its default: partitions are
    /// `amd.com/gpu`) or `mixed` (`amd.com/<partition>`).
    #[serde(default)]
    pub naming: AmdNaming,
    /// Intel GPU plugin resource management: also advertise `gpu.intel.com/millicores`,
    /// `memory.max` and `tiles`.
    #[serde(default)]
    pub resource_management: bool,
}

/// How the AMD device plugin names partitioned GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmdNaming {
    /// Every partition is an `amd.com/gpu`.
    #[default]
    Single,
    /// Partitions are `amd.com/<mode>`, e.g. `amd.com/cpx_nps4`.
    Mixed,
}

impl GpuSpec {
    /// AMD partitions per GPU in this spec's mode (1 when not partitioned).
    pub fn amd_partitions(&self) -> u32 {
        match self.partition.as_deref().and_then(|p| p.split('_').next()) {
            Some("dpx") => 2,
            Some("tpx") => 3,
            Some("qpx") => 4,
            Some("cpx") => 8,
            _ => 1,
        }
    }
}

fn default_driver() -> String {
    "550.107.02".into()
}

/// MIG strategy as the NVIDIA device plugin names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigStrategy {
    /// Slices exposed as `nvidia.com/gpu` (one profile only).
    Single,
    /// Slices exposed as `nvidia.com/mig-<profile>`.
    Mixed,
}

/// MIG layout applied to the node's GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigSpec {
    /// `single` or `mixed`.
    pub strategy: MigStrategy,
    /// Profile (e.g. `1g.10gb`) → slices per GPU.
    pub profiles: BTreeMap<String, u32>,
    /// GPUs of each node that are MIG-enabled (mixed only; default all). The others stay
    /// whole `nvidia.com/gpu`.
    #[serde(default)]
    pub gpus: Option<u32>,
}

impl MigSpec {
    /// MIG-enabled GPUs of a node with `count` GPUs.
    pub fn split_gpus(&self, count: u32) -> u32 {
        self.gpus.unwrap_or(count).min(count)
    }
}

/// GPU sharing strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharingStrategy {
    /// Time-slicing.
    TimeSlicing,
    /// CUDA MPS.
    Mps,
}

/// Sharing: each physical GPU is advertised `replicas` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingSpec {
    /// Strategy label value.
    pub strategy: SharingStrategy,
    /// Advertised replicas per GPU.
    pub replicas: u32,
    /// Advertise as `nvidia.com/gpu.shared` instead of `nvidia.com/gpu`.
    #[serde(default)]
    pub rename: bool,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintSpec {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// A workload: a Deployment of GPU pods, with optional PDB, Service and ServiceExport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Deployment name.
    pub name: String,
    /// Namespace (created if missing).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Replicas.
    pub replicas: u32,
    /// GPUs requested per replica.
    #[serde(default)]
    pub gpus: u32,
    /// Extended resource to request (default `nvidia.com/gpu`), e.g. `nvidia.com/mig-3g.40gb`.
    #[serde(default)]
    pub resource: Option<String>,
    /// Request GPUs through a DRA ResourceClaim (driver `gpu.nvidia.com`) instead.
    #[serde(default)]
    pub dra: bool,
    /// With `dra`: claim MIG partitions of this profile (DeviceClass `mig.nvidia.com`)
    /// instead of whole GPUs.
    #[serde(default)]
    pub dra_profile: Option<String>,
    /// GPUs held by a sidecar (a restartable init container) in each pod, besides `gpus`.
    #[serde(default)]
    pub sidecar_gpus: u32,
    /// Pod `nodeSelector`.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// PodDisruptionBudget.
    #[serde(default)]
    pub pdb: Option<PdbSpec>,
    /// Service in front of the pods.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    /// Export the Service with a ServiceExport (needs `service`).
    #[serde(default)]
    pub export: bool,
    /// Give pods an emptyDir volume (drain then needs `--delete-emptydir-data`).
    #[serde(default)]
    pub empty_dir: bool,
    /// Pods serve vLLM's metrics through the pod proxy (idle until set through the control
    /// API), and the ServiceExport opts in to inference load sampling.
    #[serde(default)]
    pub inference: bool,
}

fn default_namespace() -> String {
    "default".into()
}

/// An int or a percentage, as PDBs take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    /// Absolute count.
    Int(i64),
    /// Percentage such as `"50%"`.
    Str(String),
}

/// PodDisruptionBudget: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdbSpec {
    /// `minAvailable`.
    #[serde(default)]
    pub min_available: Option<IntOrPercent>,
    /// `maxUnavailable`.
    #[serde(default)]
    pub max_unavailable: Option<IntOrPercent>,
}

/// A ClusterIP Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service port.
    pub port: u16,
    /// Container port (defaults to `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// `ClusterIP` (default), `LoadBalancer` (kube-sim's load-balancer controller gives it an
    /// ingress address in 198.18.0.0/15, as a cloud's would) or `ExternalName`.
    #[serde(default, rename = "type")]
    pub service_type: Option<String>,
    /// `clusterIP: None`: a headless Service.
    #[serde(default)]
    pub headless: bool,
}

/// Simulated delays, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Node creation → Ready.
    #[serde(default)]
    pub node_ready_ms: u64,
    /// Ready → device plugin advertises GPUs (allocatable stays 0 until then).
    #[serde(default)]
    pub device_plugin_ms: u64,
    /// Pod bound → Running and Ready.
    #[serde(default)]
    pub pod_start_ms: u64,
    /// How long one second of a pod's termination grace period lasts: a pod being deleted
    /// stays Terminating for `terminationGracePeriodSeconds` × this (30 s × 10 ms = 300 ms).
    #[serde(default)]
    pub grace_second_ms: u64,
}

/// Limits that keep a scenario within what one process can hold.
pub const MAX_CLUSTERS: usize = 10_000;
/// Most nodes in one pool.
pub const MAX_POOL_NODES: u32 = 5_000;
/// Most GPUs on one node.
pub const MAX_GPUS_PER_NODE: u32 = 64;

/// A scenario that failed to parse or validate.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The YAML did not parse or had an unknown/missing field (message has line and column).
    #[error("scenario: {0}")]
    Yaml(String),
    /// A value is out of range or inconsistent.
    #[error("scenario: {field}: {reason}")]
    Invalid {
        /// Field path, e.g. `clusters[0].pools[1].count`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("scenario file {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Whether `s` is a DNS label (RFC 1123).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_mig_profile(p: &str) -> bool {
    // e.g. 1g.10gb, 3g.40gb, 1g.10gb+me
    let base = p.split('+').next().unwrap_or("");
    let Some((g, mem)) = base.split_once('.') else {
        return false;
    };
    g.strip_suffix('g')
        .is_some_and(|n| n.parse::<u32>().is_ok())
        && mem
            .strip_suffix("gb")
            .is_some_and(|n| n.parse::<u32>().is_ok())
}

impl Scenario {
    /// Parse and validate YAML.
    pub fn from_yaml(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario =
            serde_saphyr::from_str(text).map_err(|e| ScenarioError::Yaml(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Read, parse and validate a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// The `--dev` scenario: three clusters in three regions with H100, A100 (MIG mixed) and
    /// L4 pools and exported inference services.
    pub fn dev() -> Self {
        Self::from_yaml(include_str!("../scenarios/dev.yaml")).expect("built-in scenario is valid")
    }

    /// Check everything serde cannot: names, ranges and combinations.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.clusters.is_empty() {
            return Err(invalid("clusters", "at least one cluster is required"));
        }
        if self.clusters.len() > MAX_CLUSTERS {
            return Err(invalid(
                "clusters",
                format!("at most {MAX_CLUSTERS} clusters"),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (ci, c) in self.clusters.iter().enumerate() {
            let at = format!("clusters[{ci}]");
            if !is_dns_label(&c.name) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("{:?} is not a DNS label", c.name),
                ));
            }
            if !names.insert(&c.name) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("duplicate cluster {:?}", c.name),
                ));
            }
            if !c.kubernetes_version.starts_with('v') {
                return Err(invalid(
                    format!("{at}.kubernetes_version"),
                    "must look like v1.34.2",
                ));
            }
            let mut pools = std::collections::HashSet::new();
            for (pi, p) in c.pools.iter().enumerate() {
                let at = format!("{at}.pools[{pi}]");
                if !is_dns_label(&p.name) {
                    return Err(invalid(
                        format!("{at}.name"),
                        format!("{:?} is not a DNS label", p.name),
                    ));
                }
                if !pools.insert(&p.name) {
                    return Err(invalid(
                        format!("{at}.name"),
                        format!("duplicate pool {:?}", p.name),
                    ));
                }
                if p.count > MAX_POOL_NODES {
                    return Err(invalid(
                        format!("{at}.count"),
                        format!("at most {MAX_POOL_NODES}"),
                    ));
                }
                for (ti, t) in p.taints.iter().enumerate() {
                    if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&t.effect.as_str())
                    {
                        return Err(invalid(
                            format!("{at}.taints[{ti}].effect"),
                            "must be NoSchedule, PreferNoSchedule or NoExecute",
                        ));
                    }
                }
                if let Some(g) = &p.gpu {
                    validate_gpu(g, &format!("{at}.gpu"))?;
                }
            }
            for (wi, w) in c.workloads.iter().enumerate() {
                let at = format!("{at}.workloads[{wi}]");
                if !is_dns_label(&w.name) {
                    return Err(invalid(
                        format!("{at}.name"),
                        format!("{:?} is not a DNS label", w.name),
                    ));
                }
                if !is_dns_label(&w.namespace) {
                    return Err(invalid(format!("{at}.namespace"), "must be a DNS label"));
                }
                if w.export && w.service.is_none() {
                    return Err(invalid(format!("{at}.export"), "exporting needs a service"));
                }
                if w.dra_profile.is_some() && !w.dra {
                    return Err(invalid(format!("{at}.dra_profile"), "needs dra: true"));
                }
                if w.dra && w.sidecar_gpus > 0 {
                    return Err(invalid(
                        format!("{at}.sidecar_gpus"),
                        "sidecars request extended resources; not with dra",
                    ));
                }
                if w.dra && w.resource.is_some() {
                    return Err(invalid(
                        format!("{at}.resource"),
                        "set either dra or resource, not both",
                    ));
                }
                if let Some(pdb) = &w.pdb
                    && pdb.min_available.is_some() == pdb.max_unavailable.is_some()
                {
                    return Err(invalid(
                        format!("{at}.pdb"),
                        "set exactly one of min_available and max_unavailable",
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_gpu(g: &GpuSpec, at: &str) -> Result<(), ScenarioError> {
    if g.count == 0 || g.count > MAX_GPUS_PER_NODE {
        return Err(invalid(
            format!("{at}.count"),
            format!("must be 1..={MAX_GPUS_PER_NODE}"),
        ));
    }
    if g.memory_mib == 0 {
        return Err(invalid(format!("{at}.memory_mib"), "must be positive"));
    }
    if g.product.is_empty() {
        return Err(invalid(format!("{at}.product"), "is required"));
    }
    if (g.mig.is_some() || g.sharing.is_some()) && g.vendor != Vendor::Nvidia {
        return Err(invalid(
            format!("{at}.vendor"),
            "MIG and sharing are NVIDIA features",
        ));
    }
    if g.mig.is_some() && g.sharing.is_some() {
        return Err(invalid(
            format!("{at}.sharing"),
            "cannot be combined with mig here",
        ));
    }
    if g.dra
        && (g.sharing.is_some()
            || g.vendor != Vendor::Nvidia
            || g.mig
                .as_ref()
                .is_some_and(|m| m.strategy != MigStrategy::Mixed))
    {
        return Err(invalid(
            format!("{at}.dra"),
            "DRA is simulated for NVIDIA GPUs, whole or with mixed MIG partitions",
        ));
    }
    if g.partition.is_some() && g.vendor != Vendor::Amd {
        return Err(invalid(
            format!("{at}.partition"),
            "partition modes are AMD's",
        ));
    }
    if let Some(p) = &g.partition {
        let (compute, memory) = p.split_once('_').unwrap_or((p, ""));
        if !["spx", "dpx", "tpx", "qpx", "cpx"].contains(&compute) || !memory.starts_with("nps") {
            return Err(invalid(
                format!("{at}.partition"),
                format!("{p:?} is not a mode like cpx_nps4"),
            ));
        }
    }
    if g.resource_management && g.vendor != Vendor::Intel {
        return Err(invalid(
            format!("{at}.resource_management"),
            "resource management is Intel's",
        ));
    }
    if let Some(m) = &g.mig {
        if m.profiles.is_empty() {
            return Err(invalid(
                format!("{at}.mig.profiles"),
                "at least one profile",
            ));
        }
        if m.strategy == MigStrategy::Single && m.profiles.len() != 1 {
            return Err(invalid(
                format!("{at}.mig.profiles"),
                "strategy single takes exactly one profile",
            ));
        }
        if m.gpus.is_some() && m.strategy != MigStrategy::Mixed {
            return Err(invalid(
                format!("{at}.mig.gpus"),
                "only strategy mixed leaves some GPUs whole",
            ));
        }
        for (p, n) in &m.profiles {
            if !is_mig_profile(p) {
                return Err(invalid(
                    format!("{at}.mig.profiles.{p}"),
                    "not a MIG profile like 1g.10gb",
                ));
            }
            if *n == 0 || *n > 7 {
                return Err(invalid(
                    format!("{at}.mig.profiles.{p}"),
                    "slices per GPU must be 1..=7",
                ));
            }
        }
    }
    if let Some(s) = &g.sharing
        && (s.replicas < 2 || s.replicas > 48)
    {
        return Err(invalid(format!("{at}.sharing.replicas"), "must be 2..=48"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_scenario_is_valid() {
        let s = Scenario::dev();
        assert_eq!(s.clusters.len(), 3);
    }

    #[test]
    fn unknown_fields_name_the_field_and_line() {
        let err = Scenario::from_yaml("clusters:\n  - name: a\n    colour: blue\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("colour"), "{msg}");
        assert!(msg.contains('3'), "line number missing: {msg}");
    }

    #[test]
    fn semantic_errors_name_the_path() {
        let err = Scenario::from_yaml(
            "clusters:\n  - name: a\n    pools:\n      - name: p\n        count: 1\n        gpu: {vendor: nvidia, product: X, memory_mib: 1, count: 8, mig: {strategy: mixed, profiles: {big: 1}}}\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("clusters[0].pools[0].gpu.mig.profiles.big"),
            "{err}"
        );
        let err = Scenario::from_yaml("clusters:\n  - name: Bad_Name\n").unwrap_err();
        assert!(err.to_string().contains("clusters[0].name"), "{err}");
        let err = Scenario::from_yaml("clusters:\n  - name: a\n  - name: a\n").unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let err = Scenario::from_yaml(
            "clusters:\n  - name: a\n    workloads:\n      - {name: w, replicas: 1, export: true}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("workloads[0].export"), "{err}");
    }
}
