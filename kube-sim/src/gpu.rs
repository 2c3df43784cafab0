//! What simulated GPU nodes look like through the API: the labels GPU Feature Discovery and
//! the providers set, capacity/allocatable as device plugins advertise it, and the DRA
//! ResourceSlices the NVIDIA DRA driver publishes.

use serde_json::{Map, Value, json};

use crate::scenario::{
    CAPI_POOL_LABEL, ClusterSpec, GpuSpec, MigStrategy, PoolSpec, SharingStrategy, Vendor,
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
}

/// The extended resources a node with these GPUs advertises (none for DRA).
pub fn gpu_resources(g: &GpuSpec) -> Vec<GpuResource> {
    let one = |name: &str, per_gpu: i64| GpuResource {
        name: name.into(),
        per_gpu,
    };
    if g.dra {
        return vec![];
    }
    match g.vendor {
        Vendor::Amd => vec![one("amd.com/gpu", 1)],
        Vendor::Intel => vec![one("gpu.intel.com/i915", 1)],
        Vendor::Nvidia => {
            if let Some(m) = &g.mig {
                match m.strategy {
                    MigStrategy::Single => {
                        let n = *m.profiles.values().next().unwrap_or(&1);
                        vec![one("nvidia.com/gpu", i64::from(n))]
                    }
                    MigStrategy::Mixed => m
                        .profiles
                        .iter()
                        .map(|(p, n)| one(&format!("nvidia.com/mig-{p}"), i64::from(*n)))
                        .collect(),
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
                            (g.count * n).to_string(),
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
        }
        Vendor::Intel => {
            put("intel.feature.node.kubernetes.io/gpu", "true".into());
            put("gpu.intel.com/product", g.product.clone());
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
                crate::scenario::Provider::Aks => put("kubernetes.azure.com/accelerator", "nvidia"),
                crate::scenario::Provider::Gke => {
                    let acc = format!("nvidia-{}", g.product.to_lowercase());
                    put("cloud.google.com/gke-accelerator", &acc)
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
            capacity[&r.name] = json!((i64::from(g.count) * r.per_gpu).to_string());
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
    let devices: Vec<Value> = (0..healthy)
        .map(|i| {
            json!({
                "name": format!("gpu-{i}"),
                "attributes": {
                    "type": {"string": "gpu"},
                    "uuid": {"string": format!("GPU-{node}-{i}")},
                    "index": {"int": i},
                    "minor": {"int": i},
                    "productName": {"string": product},
                    "brand": {"string": "Nvidia"},
                    "architecture": {"string": arch},
                    "cudaComputeCapability": {"version": format!("{major}.{minor}.0")},
                    "driverVersion": {"version": driver},
                },
                "capacity": {"memory": {"value": format!("{}Mi", g.memory_mib)}},
            })
        })
        .collect();
    json!({
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
    })
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
        }
    }

    #[test]
    fn resources_per_mode() {
        assert_eq!(
            gpu_resources(&gpu()),
            vec![GpuResource {
                name: "nvidia.com/gpu".into(),
                per_gpu: 1
            }]
        );
        let mut mixed = gpu();
        mixed.mig = Some(MigSpec {
            strategy: MigStrategy::Mixed,
            profiles: [("1g.10gb".to_string(), 3), ("2g.20gb".to_string(), 2)].into(),
        });
        let r = gpu_resources(&mixed);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "nvidia.com/mig-1g.10gb");
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
