//! What simulated GPU nodes look like through the API: the labels GPU Feature Discovery and
//! the providers set, capacity/allocatable as device plugins advertise it, and the DRA
//! ResourceSlices the NVIDIA DRA driver publishes.

use serde_json::{Map, Value, json};

use crate::scenario::{
    AmdNaming, CAPI_POOL_LABEL, ClusterSpec, GpuSpec, MigStrategy, PoolSpec, Provider,
    SharingStrategy, Vendor,
};

/// The DRA driver name used for simulated NVIDIA GPUs.
pub const NVIDIA_DRA_DRIVER: &str = "gpu.nvidia.com";

/// Annotation every simulated object carries, so nobody mistakes it for a real cluster.
pub const SIMULATED_ANNOTATION: &str = "sim.flotilla.dev/simulated";

/// One advertised extended resource of a GPU node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuResource {
    /// Resource name, e.g. `nvidia.com/mig-1g.10gb`.
    pub name: String,
    /// Advertised units per physical GPU (MIG slices or sharing replicas; 1 otherwise).
    pub per_gpu: i64,
    /// Units per node when not `count × per_gpu` (MIG mixed with some GPUs whole: a
    /// resource kept at 0 is still advertised, as the kubelet keeps it).
    pub per_node: Option<i64>,
}

impl GpuResource {
    /// Units advertised on a node of `count` GPUs of which `failed` have failed.
    pub fn units(&self, count: u32, failed: u32) -> i64 {
        let total = self.per_node.unwrap_or(i64::from(count) * self.per_gpu);
        if count == 0 {
            return 0;
        }
        // Failures take GPUs, and with them their share of the units.
        (total - total * i64::from(failed.min(count)) / i64::from(count)).max(0)
    }
}

/// The extended resources a node with these GPUs advertises (none for DRA).
pub fn gpu_resources(g: &GpuSpec) -> Vec<GpuResource> {
    let one = |name: &str, per_gpu: i64| GpuResource {
        name: name.into(),
        per_gpu,
        per_node: None,
    };
    if g.dra {
        return vec![];
    }
    match g.vendor {
        Vendor::Amd => {
            let per = i64::from(g.amd_partitions());
            match (&g.partition, g.naming) {
                (Some(mode), AmdNaming::Mixed) if per > 1 => {
                    vec![one(&format!("amd.com/{mode}"), per)]
                }
                // The default `single` naming advertises partitions as `amd.com/gpu`.
                _ => vec![one("amd.com/gpu", per)],
            }
        }
        Vendor::Intel => {
            let mut r = vec![one("gpu.intel.com/i915", 1)];
            if g.resource_management {
                r.push(one("gpu.intel.com/millicores", 1000));
                r.push(one("gpu.intel.com/memory.max", (g.memory_mib << 20) as i64));
                r.push(one("gpu.intel.com/tiles", 1));
            }
            r
        }
        Vendor::Nvidia => {
            if let Some(m) = &g.mig {
                match m.strategy {
                    MigStrategy::Single => {
                        let n = *m.profiles.values().next().unwrap_or(&1);
                        vec![one("nvidia.com/gpu", i64::from(n))]
                    }
                    // Resources per node, not per GPU, here: only `mig.gpus` of the GPUs are
                    // split; the others stay whole.
                    MigStrategy::Mixed => {
                        let split = i64::from(m.split_gpus(g.count));
                        let whole = i64::from(g.count) - split;
                        let mut r = vec![GpuResource {
                            name: "nvidia.com/gpu".into(),
                            per_gpu: 0,
                            per_node: Some(whole),
                        }];
                        r.extend(m.profiles.iter().map(|(p, n)| GpuResource {
                            name: format!("nvidia.com/mig-{p}"),
                            per_gpu: i64::from(*n),
                            per_node: Some(split * i64::from(*n)),
                        }));
                        r
                    }
                }
            } else if let Some(s) = &g.sharing {
                let name = if s.rename {
                    "nvidia.com/gpu.shared"
                } else {
                    "nvidia.com/gpu"
                };
                vec![one(name, i64::from(s.replicas))]
            } else {
                vec![one("nvidia.com/gpu", 1)]
            }
        }
    }
}

/// GiB of a MIG profile name such as `3g.40gb`.
fn mig_profile_gb(p: &str) -> u64 {
    p.split('.')
        .nth(1)
        .and_then(|m| m.split('+').next())
        .and_then(|m| m.strip_suffix("gb"))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

fn compute_capability(family: &str) -> (u32, u32) {
    match family {
        "blackwell" => (10, 0),
        "hopper" => (9, 0),
        "ada-lovelace" => (8, 9),
        "ampere" => (8, 0),
        "turing" => (7, 5),
        "volta" => (7, 0),
        _ => (8, 0),
    }
}

/// Node labels for a GPU pool's nodes (GFD, AMD/Intel device plugins).
fn gpu_labels(g: &GpuSpec, labels: &mut Map<String, Value>) {
    let mut put = |k: &str, v: String| {
        labels.insert(k.into(), Value::String(v));
    };
    match g.vendor {
        Vendor::Nvidia if !g.gfd => {}
        Vendor::Nvidia => {
            let (major, minor) = compute_capability(&g.family);
            put("nvidia.com/gpu.present", "true".into());
            put("nvidia.com/gpu.family", g.family.clone());
            put("nvidia.com/gpu.compute.major", major.to_string());
            put("nvidia.com/gpu.compute.minor", minor.to_string());
            put(
                "nvidia.com/cuda.driver-version.full",
                g.driver_version.clone(),
            );
            put("nvidia.com/cuda.runtime-version.full", "12.5".into());
            let mig_capable = ["A100", "A30", "H100", "H200", "B200"]
                .iter()
                .any(|p| g.product.contains(p));
            put("nvidia.com/mig.capable", mig_capable.to_string());
            let mut replicas = 1;
            let mut strategy = "none";
            if let Some(s) = &g.sharing {
                replicas = s.replicas;
                strategy = match s.strategy {
                    SharingStrategy::TimeSlicing => "time-slicing",
                    SharingStrategy::Mps => "mps",
                };
            }
            put("nvidia.com/gpu.replicas", replicas.to_string());
            put("nvidia.com/gpu.sharing-strategy", strategy.into());
            match &g.mig {
                Some(m) if m.strategy == MigStrategy::Single => {
                    let (p, n) = m.profiles.iter().next().expect("validated");
                    put("nvidia.com/mig.strategy", "single".into());
                    put("nvidia.com/gpu.product", format!("{}-MIG-{p}", g.product));
                    put(
                        "nvidia.com/gpu.memory",
                        (mig_profile_gb(p) * 983).to_string(),
                    );
                    put("nvidia.com/gpu.count", (g.count * n).to_string());
                }
                Some(m) => {
                    put("nvidia.com/mig.strategy", "mixed".into());
                    put("nvidia.com/gpu.product", g.product.clone());
                    put("nvidia.com/gpu.memory", g.memory_mib.to_string());
                    put("nvidia.com/gpu.count", g.count.to_string());
                    for (p, n) in &m.profiles {
                        put(
                            &format!("nvidia.com/mig-{p}.count"),
                            (m.split_gpus(g.count) * n).to_string(),
                        );
                        put(
                            &format!("nvidia.com/mig-{p}.memory"),
                            (mig_profile_gb(p) * 983).to_string(),
                        );
                    }
                }
                None => {
                    put("nvidia.com/gpu.product", g.product.clone());
                    put("nvidia.com/gpu.memory", g.memory_mib.to_string());
                    put("nvidia.com/gpu.count", g.count.to_string());
                }
            }
        }
        Vendor::Amd => {
            put("amd.com/gpu.product-name", g.product.clone());
            put("amd.com/gpu.vram", format!("{}G", g.memory_mib / 1024));
            put("amd.com/gpu.family", g.family.clone());
            put("amd.com/gpu.cu-count", "304".into());
            put("amd.com/gpu.device-id", "74a1".into());
            if let Some(mode) = &g.partition {
                put("amd.com/compute-partitioning-supported", "true".into());
                put("amd.com/memory-partitioning-supported", "true".into());
                put("amd.com/compute-memory-partition", mode.clone());
            }
        }
        Vendor::Intel => {
            put("intel.feature.node.kubernetes.io/gpu", "true".into());
            put("gpu.intel.com/product", g.product.clone());
            put("gpu.intel.com/device.count", g.count.to_string());
        }
    }
}

/// Inputs for building one node.
pub struct NodeParams<'a> {
    /// The cluster.
    pub cluster: &'a ClusterSpec,
    /// The machine template (pool) the node is built from.
    pub pool: &'a PoolSpec,
    /// The MachineDeployment (pool label value).
    pub machine_deployment: &'a str,
    /// Node name.
    pub name: &'a str,
    /// Zone, if the cluster has zones.
    pub zone: Option<&'a str>,
    /// Kubelet version.
    pub version: &'a str,
    /// InternalIP.
    pub ip: &'a str,
}

/// A new node as the kubelet registers it: NotReady, GPU allocatable 0.
pub fn new_node(p: &NodeParams<'_>) -> Value {
    let mut labels = Map::new();
    let mut put = |k: &str, v: &str| {
        labels.insert(k.into(), Value::String(v.into()));
    };
    put("kubernetes.io/hostname", p.name);
    put("kubernetes.io/os", "linux");
    put("kubernetes.io/arch", "amd64");
    put("beta.kubernetes.io/os", "linux");
    put("beta.kubernetes.io/arch", "amd64");
    put(p.cluster.provider.pool_label(), p.machine_deployment);
    put(CAPI_POOL_LABEL, p.machine_deployment);
    if !p.pool.instance_type.is_empty() {
        put("node.kubernetes.io/instance-type", &p.pool.instance_type);
    }
    if !p.cluster.region.is_empty() {
        put("topology.kubernetes.io/region", &p.cluster.region);
    }
    if let Some(z) = p.zone {
        put("topology.kubernetes.io/zone", z);
    }
    for (k, v) in &p.pool.labels {
        put(k, v);
    }
    if let Some(g) = &p.pool.gpu {
        if g.vendor == Vendor::Nvidia {
            match p.cluster.provider {
                Provider::Aks => put("kubernetes.azure.com/accelerator", "nvidia"),
                Provider::Gke => {
                    let acc = format!("nvidia-{}", g.product.to_lowercase());
                    put("cloud.google.com/gke-accelerator", &acc);
                    // GKE's own sharing multiplies `nvidia.com/gpu` and says so here.
                    if let Some(s) = &g.sharing {
                        let strategy = match s.strategy {
                            SharingStrategy::TimeSlicing => "time-sharing",
                            SharingStrategy::Mps => "mps",
                        };
                        put("cloud.google.com/gke-gpu-sharing-strategy", strategy);
                        put(
                            "cloud.google.com/gke-max-shared-clients-per-gpu",
                            &s.replicas.to_string(),
                        );
                    }
                }
                Provider::Karpenter => {
                    put("karpenter.k8s.aws/instance-gpu-manufacturer", "nvidia");
                    put(
                        "karpenter.k8s.aws/instance-gpu-name",
                        &g.product.to_lowercase(),
                    );
                    put("karpenter.k8s.aws/instance-gpu-count", &g.count.to_string());
                    put(
                        "karpenter.k8s.aws/instance-gpu-memory",
                        &g.memory_mib.to_string(),
                    );
                }
                _ => {}
            }
        }
        gpu_labels(g, &mut labels);
    }
    let mut capacity = json!({
        "cpu": p.pool.cpu.to_string(),
        "memory": format!("{}Gi", p.pool.memory_gib),
        "pods": "110",
        "ephemeral-storage": "500Gi",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    let mut allocatable = json!({
        "cpu": format!("{}m", u64::from(p.pool.cpu) * 1000 - 200),
        "memory": format!("{}Mi", u64::from(p.pool.memory_gib) * 1024 - 1024),
        "pods": "110",
        "ephemeral-storage": "450Gi",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    if let Some(g) = &p.pool.gpu {
        for r in gpu_resources(g) {
            capacity[&r.name] = json!(r.units(g.count, 0).to_string());
            allocatable[&r.name] = json!("0");
        }
    }
    let taints: Vec<Value> = p
        .pool
        .taints
        .iter()
        .map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect}))
        .collect();
    let mut spec = json!({"providerID": format!("sim://{}/{}", p.cluster.name, p.name)});
    if !taints.is_empty() {
        spec["taints"] = json!(taints);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": p.name,
            "labels": labels,
            "annotations": {
                SIMULATED_ANNOTATION: "true",
                "node.alpha.kubernetes.io/ttl": "0",
                "cluster.x-k8s.io/cluster-name": p.cluster.name,
            },
        },
        "spec": spec,
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": node_conditions("False", "KubeletNotReady", "container runtime network not ready (simulated start-up)"),
            "addresses": [
                {"type": "InternalIP", "address": p.ip},
                {"type": "Hostname", "address": p.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": uuid::Uuid::new_v4().to_string(),
                "containerRuntimeVersion": "containerd://1.7.22 (simulated)",
                "kernelVersion": "6.8.0-sim",
                "kubeProxyVersion": p.version,
                "kubeletVersion": p.version,
                "machineID": uuid::Uuid::new_v4().simple().to_string(),
                "operatingSystem": "linux",
                "osImage": "kube-sim simulated node",
                "systemUUID": uuid::Uuid::new_v4().to_string(),
            },
        },
    })
}

/// The four standard node conditions with Ready = `ready` ("True", "False" or "Unknown";
/// Unknown, as the node lifecycle controller sets for a silent kubelet, applies to all four).
pub fn node_conditions(ready: &str, reason: &str, message: &str) -> Value {
    let now = crate::store::now_rfc3339();
    let other = if ready == "Unknown" {
        "Unknown"
    } else {
        "False"
    };
    let pressure = |t: &str, r: &str| {
        json!({"type": t, "status": other, "reason": r, "message": "simulated",
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        pressure("MemoryPressure", "KubeletHasSufficientMemory"),
        pressure("DiskPressure", "KubeletHasNoDiskPressure"),
        pressure("PIDPressure", "KubeletHasSufficientPID"),
        {"type": "Ready", "status": ready, "reason": reason,
         "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now},
    ])
}

/// The DRA ResourceSlice a node's driver publishes; failed GPUs are left out.
pub fn resource_slice(node: &str, g: &GpuSpec, failed: u32, generation: i64) -> Value {
    let (major, minor) = compute_capability(&g.family);
    let arch = {
        let mut c = g.family.chars();
        c.next()
            .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
            .unwrap_or_default()
    };
    let product = g.product.replace('-', " ");
    let driver = {
        let parts: Vec<u64> = g
            .driver_version
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        format!(
            "{}.{}.{}",
            parts.first().unwrap_or(&0),
            parts.get(1).unwrap_or(&0),
            parts.get(2).unwrap_or(&0)
        )
    };
    let healthy = g.count.saturating_sub(failed);
    let mut devices: Vec<Value> = Vec::new();
    let mut counter_sets: Vec<Value> = Vec::new();
    let memory = |mib: u64| json!({"value": format!("{mib}Mi")});
    for i in 0..healthy {
        let uuid = format!("GPU-{node}-{i}");
        let mut gpu = json!({
            "name": format!("gpu-{i}"),
            "attributes": {
                "type": {"string": "gpu"},
                "uuid": {"string": uuid},
                "index": {"int": i},
                "minor": {"int": i},
                "productName": {"string": product},
                "brand": {"string": "Nvidia"},
                "architecture": {"string": arch},
                "cudaComputeCapability": {"version": format!("{major}.{minor}.0")},
                "driverVersion": {"version": driver},
            },
            "capacity": {"memory": memory(g.memory_mib)},
        });
        // Partitionable: the GPU and its MIG partitions draw on one counter set, so
        // allocating either takes (part of) the other.
        if let Some(m) = &g.mig {
            let set = format!("gpu-{i}-counters");
            counter_sets.push(json!({"name": set, "counters": {"memory": memory(g.memory_mib)}}));
            gpu["consumesCounters"] =
                json!([{"counterSet": set, "counters": {"memory": memory(g.memory_mib)}}]);
            devices.push(gpu);
            for (p, n) in &m.profiles {
                // A profile's share of the GPU, so that `n` of them fill it.
                let share = g.memory_mib / u64::from((*n).max(1));
                for j in 0..*n {
                    devices.push(json!({
                        "name": format!("gpu-{i}-mig-{}-{j}", p.replace('.', "-")),
                        "attributes": {
                            "type": {"string": "mig"},
                            "uuid": {"string": format!("MIG-{node}-{i}-{p}-{j}")},
                            "parentUUID": {"string": uuid},
                            "profile": {"string": p},
                            "productName": {"string": product},
                        },
                        "capacity": {"memory": memory(share)},
                        "consumesCounters": [{"counterSet": set, "counters": {"memory": memory(share)}}],
                    }));
                }
            }
        } else {
            devices.push(gpu);
        }
    }
    let mut slice = json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {
            "name": format!("{node}-{}", NVIDIA_DRA_DRIVER.replace('.', "-")),
            "annotations": {SIMULATED_ANNOTATION: "true"},
        },
        "spec": {
            "driver": NVIDIA_DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    });
    if !counter_sets.is_empty() {
        slice["spec"]["sharedCounters"] = json!(counter_sets);
    }
    slice
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{MigSpec, SharingSpec};

    fn gpu() -> GpuSpec {
        GpuSpec {
            vendor: Vendor::Nvidia,
            product: "NVIDIA-A100-SXM4-80GB".into(),
            memory_mib: 81920,
            count: 8,
            family: "ampere".into(),
            driver_version: "550.107.02".into(),
            mig: None,
            sharing: None,
            dra: false,
            gfd: true,
            plugin_crashed: false,
            partition: None,
            naming: AmdNaming::Single,
            resource_management: false,
        }
    }

    fn units(g: &GpuSpec) -> Vec<(String, i64)> {
        gpu_resources(g)
            .into_iter()
            .map(|r| (r.name.clone(), r.units(g.count, 0)))
            .collect()
    }

    #[test]
    fn resources_per_mode() {
        assert_eq!(
            gpu_resources(&gpu()),
            vec![GpuResource {
                name: "nvidia.com/gpu".into(),
                per_gpu: 1,
                per_node: None,
            }]
        );
        let mut mixed = gpu();
        mixed.mig = Some(MigSpec {
            strategy: MigStrategy::Mixed,
            profiles: [("1g.10gb".to_string(), 3), ("2g.20gb".to_string(), 2)].into(),
            gpus: None,
        });
        assert_eq!(
            units(&mixed),
            [
                ("nvidia.com/gpu".to_string(), 0),
                ("nvidia.com/mig-1g.10gb".to_string(), 24),
                ("nvidia.com/mig-2g.20gb".to_string(), 16)
            ],
            "a fully split node keeps nvidia.com/gpu at 0"
        );
        let mut partly = mixed.clone();
        partly.mig.as_mut().unwrap().gpus = Some(6);
        assert_eq!(units(&partly)[0], ("nvidia.com/gpu".to_string(), 2));
        assert_eq!(
            units(&partly)[1],
            ("nvidia.com/mig-1g.10gb".to_string(), 18)
        );
        let mut shared = gpu();
        shared.sharing = Some(SharingSpec {
            strategy: SharingStrategy::TimeSlicing,
            replicas: 10,
            rename: false,
        });
        assert_eq!(gpu_resources(&shared)[0].per_gpu, 10);
        let mut dra = gpu();
        dra.dra = true;
        assert!(gpu_resources(&dra).is_empty());
    }

    #[test]
    fn mig_single_renames_the_product() {
        let mut single = gpu();
        single.mig = Some(MigSpec {
            strategy: MigStrategy::Single,
            profiles: [("1g.10gb".to_string(), 7)].into(),
            gpus: None,
        });
        let mut labels = Map::new();
        gpu_labels(&single, &mut labels);
        assert_eq!(
            labels["nvidia.com/gpu.product"],
            "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"
        );
        assert_eq!(labels["nvidia.com/gpu.count"], "56");
    }

    #[test]
    fn vendor_modes_advertise_what_their_plugins_do() {
        let mut amd = gpu();
        amd.vendor = Vendor::Amd;
        amd.partition = Some("cpx_nps4".into());
        assert_eq!(
            units(&amd),
            [("amd.com/gpu".to_string(), 64)],
            "single naming"
        );
        amd.naming = AmdNaming::Mixed;
        assert_eq!(units(&amd), [("amd.com/cpx_nps4".to_string(), 64)]);
        let mut labels = Map::new();
        gpu_labels(&amd, &mut labels);
        assert_eq!(labels["amd.com/compute-memory-partition"], "cpx_nps4");
        let mut intel = gpu();
        intel.vendor = Vendor::Intel;
        intel.count = 2;
        intel.resource_management = true;
        let u = units(&intel);
        assert_eq!(u[0], ("gpu.intel.com/i915".to_string(), 2));
        assert_eq!(u[1], ("gpu.intel.com/millicores".to_string(), 2000));
        let mut bare = gpu();
        bare.gfd = false;
        let mut labels = Map::new();
        gpu_labels(&bare, &mut labels);
        assert!(labels.is_empty(), "no GFD: no nvidia.com labels");
    }

    #[test]
    fn slices_leave_out_failed_gpus() {
        let mut g = gpu();
        g.dra = true;
        let s = resource_slice("n1", &g, 2, 3);
        assert_eq!(s["spec"]["devices"].as_array().unwrap().len(), 6);
        assert_eq!(s["spec"]["pool"]["generation"], 3);
        assert_eq!(
            s["spec"]["devices"][0]["attributes"]["driverVersion"]["version"],
            "550.107.2"
        );
    }
}
