//! "Where can this model run?": rank (cluster, pool) placements for `replicas × gpus` units
//! (whole GPUs, shared replicas or MIG slices of one profile), and say why the other
//! clusters do not fit. Pure. A whole-GPU request never lands on shared replicas or slices.

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::inventory::{ClusterInventory, GpuResource, GpuUnit, NodeInventory};

/// What each replica asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FitUnit {
    /// Whole GPUs (`nvidia.com/gpu` on an unshared node, or a DRA GPU).
    #[default]
    Whole,
    /// Time-sliced or MPS replicas: no memory or fault isolation.
    Shared,
    /// MIG slices of this profile (`1g.10gb`).
    Mig(String),
}

impl FitUnit {
    /// Whether resource `r` hands out this unit.
    pub fn matches(&self, r: &GpuResource) -> bool {
        match (self, &r.unit) {
            (Self::Whole, GpuUnit::Whole) => true,
            (Self::Shared, GpuUnit::Shared(_)) => true,
            (Self::Mig(want), GpuUnit::MigSlice(p)) => want.eq_ignore_ascii_case(p),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Whole => "whole GPUs".into(),
            Self::Shared => "shared GPU replicas".into(),
            Self::Mig(p) => format!("MIG {p} slices"),
        }
    }
}

/// The free units of `unit` on a node.
pub fn free_units(n: &NodeInventory, unit: &FitUnit) -> i64 {
    if n.problem.is_some() {
        return 0;
    }
    n.resources
        .iter()
        .filter(|r| unit.matches(r))
        .map(|r| r.free)
        .sum()
}

/// What a node's GPUs are, for a rejection: `shared (time-slicing x4)`, `MIG 1g.10gb`.
fn kinds(nodes: &[&NodeInventory]) -> String {
    let mut k: Vec<String> = nodes
        .iter()
        .flat_map(|n| n.resources.iter())
        .filter(|r| r.capacity > 0)
        .map(|r| match &r.unit {
            GpuUnit::Whole => "whole GPUs".to_string(),
            GpuUnit::Shared(k) => format!("shared replicas (x{k} per GPU)"),
            GpuUnit::MigSlice(p) if p.is_empty() => "MIG slices".to_string(),
            GpuUnit::MigSlice(p) => format!("MIG {p} slices"),
            GpuUnit::Partition => format!("partitions ({})", r.name),
        })
        .collect();
    k.sort();
    k.dedup();
    k.join(", ")
}

/// What the caller needs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FitRequest {
    /// Replicas (each placed on a single node).
    pub replicas: u32,
    /// Units per replica (whole GPUs unless `unit` says otherwise).
    pub gpus_per_replica: u32,
    /// What a unit is.
    pub unit: FitUnit,
    /// Minimum memory per GPU, MiB.
    pub min_memory_mib: u64,
    /// Product substring, case-insensitive (`H100`).
    pub product: Option<String>,
    /// Architecture family (`hopper`).
    pub family: Option<String>,
    /// Region.
    pub region: Option<String>,
}

/// One cluster as Fit sees it.
#[derive(Debug, Clone)]
pub struct FitCluster<'a> {
    /// Name.
    pub name: &'a str,
    /// Health.
    pub health: Health,
    /// Region (cluster-level; nodes may also carry one).
    pub region: Option<&'a str>,
    /// Inventory.
    pub inventory: &'a ClusterInventory,
    /// Resources the agent has not (yet) listed: its free counts are not known.
    pub incomplete: &'a [String],
}

/// A placement that fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Cluster.
    pub cluster: String,
    /// Pool.
    pub pool: String,
    /// Product of the matching nodes.
    pub product: String,
    /// Replicas that fit in this pool now.
    pub replicas_fit: u32,
    /// Free matching GPUs in the pool.
    pub free_gpus: i64,
    /// Free matching GPUs left after placing the request (headroom).
    pub headroom_gpus: i64,
    /// Whether the cluster is Degraded (ranked after Ready ones).
    pub degraded: bool,
    /// What a replica's pod should request: an extended resource (`nvidia.com/gpu`), or,
    /// for DRA GPUs, a ResourceClaim of `device_class`.
    pub resource: String,
    /// The DRA DeviceClass to claim from, when the GPUs are DRA devices.
    pub device_class: Option<String>,
}

/// A cluster that does not fit, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Cluster.
    pub cluster: String,
    /// Why, for people.
    pub reason: String,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FitResult {
    /// Pools that can take every replica, best first.
    pub candidates: Vec<Candidate>,
    /// Clusters with no pool that can.
    pub rejections: Vec<Rejection>,
}

/// GPU memory labels report usable memory, a little below the marketed size (an "80 GB"
/// H100 reports 81,559 MiB, under 80 GiB): accept GPUs within 2% below the minimum.
pub fn memory_fits(have_mib: u64, min_mib: u64) -> bool {
    have_mib.saturating_mul(100) >= min_mib.saturating_mul(98)
}

/// The words of a product name, lowercased, without vendor and brand words:
/// `NVIDIA-H100-80GB-HBM3` → `h100 80gb hbm3`, GKE's `nvidia-tesla-t4` → `t4`.
fn product_words(name: &str) -> Vec<String> {
    const BRANDS: [&str; 7] = [
        "nvidia", "tesla", "amd", "instinct", "intel", "data", "center",
    ];
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .filter(|w| !BRANDS.contains(&w.as_str()))
        .collect()
}

/// Whether a requested product names this node's GPU. Words are compared whole, so `A10` is
/// not an `A100`, `L4` not an `L40S`, `H20` not an `H200`. The request's first word must be
/// the product's model word, and every further word must appear too (`A100 80GB` matches
/// `NVIDIA-A100-SXM4-80GB`). A request that is the GPU's family (`hopper`) matches it as well.
pub fn product_matches(requested: &str, product: &str, family: Option<&str>) -> bool {
    if family.is_some_and(|f| f.eq_ignore_ascii_case(requested.trim())) {
        return true;
    }
    let want = product_words(requested);
    let have = product_words(product);
    match (want.first(), have.first()) {
        (Some(w), Some(h)) => w == h && want.iter().all(|w| have.contains(w)),
        _ => false,
    }
}

/// What a replica should request on these nodes: the resource with the most free units
/// (a DRA driver's GPUs are claimed through its DeviceClass, named after the driver).
fn how_to_request(nodes: &[&NodeInventory], unit: &FitUnit, per: i64) -> (String, Option<String>) {
    let mut by_name: std::collections::BTreeMap<&str, i64> = Default::default();
    for n in nodes {
        for r in n
            .resources
            .iter()
            .filter(|r| unit.matches(r) && r.free >= per)
        {
            *by_name.entry(&r.name).or_default() += r.free;
        }
    }
    let best = by_name
        .into_iter()
        .max_by_key(|(_, free)| *free)
        .map(|(name, _)| name.to_string())
        .unwrap_or_default();
    match best.strip_prefix("dra:") {
        Some(driver) => ("resourceclaim".to_string(), Some(driver.to_string())),
        None => (best, None),
    }
}

/// Rank placements. Best: Ready before Degraded, then the most headroom left, then name.
pub fn fit(req: &FitRequest, clusters: &[FitCluster<'_>]) -> FitResult {
    let mut out = FitResult::default();
    let per = i64::from(req.gpus_per_replica.max(1));
    let want = req.replicas.max(1);
    for c in clusters {
        let reject = |reason: String| Rejection {
            cluster: c.name.to_string(),
            reason,
        };
        if !matches!(c.health, Health::Ready | Health::Degraded) {
            out.rejections
                .push(reject(format!("cluster is {:?}", c.health)));
            continue;
        }
        if !c.incomplete.is_empty() {
            out.rejections.push(reject(format!(
                "inventory incomplete ({} not listed yet): its free GPUs are not known",
                c.incomplete.join(", ")
            )));
            continue;
        }
        // A node's region is its own label; the cluster's (the agent's `--region`, or the
        // most common node region at its start) stands in only for nodes without one.
        let region_of = |n: &crate::inventory::NodeInventory| -> Option<String> {
            n.region.clone().or(c.region.map(str::to_string))
        };
        let in_region = |n: &crate::inventory::NodeInventory| {
            req.region
                .as_ref()
                .is_none_or(|r| region_of(n).is_some_and(|nr| nr.eq_ignore_ascii_case(r)))
        };
        if let Some(r) = &req.region
            && !c.inventory.nodes.iter().any(in_region)
        {
            let mut regions: Vec<String> = c.inventory.nodes.iter().filter_map(region_of).collect();
            regions.sort();
            regions.dedup();
            let has = match regions.is_empty() {
                true => "no region is known".to_string(),
                false => format!("its nodes are in {}", regions.join(", ")),
            };
            out.rejections
                .push(reject(format!("no nodes in region {r} ({has})")));
            continue;
        }
        let mut why_pools: Vec<String> = Vec::new();
        let mut found = false;
        for pool in &c.inventory.pools {
            let nodes: Vec<_> = c
                .inventory
                .nodes
                .iter()
                .filter(|n| n.pool.clone().unwrap_or_default() == pool.name)
                .filter(|n| in_region(n))
                .collect();
            if nodes.is_empty() {
                continue;
            }
            // Narrowed step by step, so a rejection says what stopped this pool.
            let right_kind: Vec<_> = (nodes.iter().copied())
                .filter(|n| {
                    let product_ok = req.product.as_ref().is_none_or(|p| {
                        n.product
                            .as_ref()
                            .is_some_and(|np| product_matches(p, np, n.family.as_deref()))
                    });
                    let family_ok = req.family.as_ref().is_none_or(|f| {
                        n.family
                            .as_ref()
                            .is_some_and(|nf| nf.eq_ignore_ascii_case(f))
                    });
                    product_ok && family_ok
                })
                .collect();
            let big_enough: Vec<_> = (right_kind.iter().copied())
                .filter(|n| {
                    // A slice's size is its profile; the GPU memory label is the GPU's.
                    matches!(req.unit, FitUnit::Mig(_))
                        || memory_fits(n.gpu_memory_mib.unwrap_or(0), req.min_memory_mib)
                })
                .collect();
            let right_unit: Vec<_> = (big_enough.iter().copied())
                .filter(|n| {
                    n.resources
                        .iter()
                        .any(|r| r.capacity > 0 && req.unit.matches(r))
                })
                .collect();
            let matching: Vec<_> = (right_unit.iter().copied())
                .filter(|n| n.usable())
                .collect();
            let free_of = |n: &NodeInventory| free_units(n, &req.unit);
            let free: i64 = matching.iter().map(|n| free_of(n)).sum();
            let fit: u32 = matching.iter().map(|n| (free_of(n) / per) as u32).sum();
            if fit >= want && !matching.is_empty() {
                found = true;
                let (resource, device_class) = how_to_request(&matching, &req.unit, per);
                out.candidates.push(Candidate {
                    cluster: c.name.to_string(),
                    pool: pool.name.clone(),
                    product: matching[0].product.clone().unwrap_or_default(),
                    replicas_fit: fit,
                    free_gpus: free,
                    headroom_gpus: free - i64::from(want) * per,
                    degraded: c.health == Health::Degraded,
                    resource,
                    device_class,
                });
                continue;
            }
            let why = if right_kind.is_empty() {
                let products: Vec<&str> = (nodes.iter())
                    .filter_map(|n| n.product.as_deref())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                match products.is_empty() {
                    true => "wrong product or family (the product is not known)".to_string(),
                    false => format!("wrong product or family ({})", products.join(", ")),
                }
            } else if big_enough.is_empty() {
                let mib = right_kind.iter().filter_map(|n| n.gpu_memory_mib).max();
                format!(
                    "GPUs too small ({} MiB, {} MiB required)",
                    mib.unwrap_or(0),
                    req.min_memory_mib
                )
            } else if right_unit.is_empty() {
                format!(
                    "no {} here: its GPUs are {}",
                    req.unit.describe(),
                    kinds(&big_enough)
                )
            } else if matching.is_empty() {
                match right_unit.iter().find_map(|n| n.problem.as_deref()) {
                    Some(p) if right_unit.iter().all(|n| n.problem.is_some()) => {
                        format!("node numbers make no sense ({p})")
                    }
                    _ => "no Ready, schedulable node (NotReady, cordoned or leaving)".to_string(),
                }
            } else if fit > 0 {
                format!(
                    "busy: only {fit} of {want} replicas fit (each needs {per} free {} on one node)",
                    req.unit.describe()
                )
            } else {
                let most = matching.iter().map(|n| free_of(n)).max().unwrap_or(0);
                format!(
                    "busy: at most {most} free {} on one node, {per} needed",
                    req.unit.describe()
                )
            };
            why_pools.push(format!("pool {}: {why}", pool.name));
        }
        if !found {
            let reason = match why_pools.is_empty() {
                true => "no GPU nodes".to_string(),
                false => why_pools.join("; "),
            };
            out.rejections.push(reject(reason));
        }
    }
    out.candidates.sort_by(|a, b| {
        (a.degraded, -a.headroom_gpus, &a.cluster, &a.pool).cmp(&(
            b.degraded,
            -b.headroom_gpus,
            &b.cluster,
            &b.pool,
        ))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{NodeInput, compute};
    use std::collections::BTreeMap;

    fn inv(pools: &[(&str, &str, u64, usize, i64)]) -> ClusterInventory {
        // (pool, product, memory MiB, nodes, free GPUs per node of 8)
        let mut nodes = Vec::new();
        for (pool, product, mem, count, free) in pools {
            for i in 0..*count {
                let labels: BTreeMap<String, String> = [
                    ("kubernetes.azure.com/agentpool", pool.to_string()),
                    ("nvidia.com/gpu.product", product.to_string()),
                    ("nvidia.com/gpu.memory", mem.to_string()),
                    ("nvidia.com/gpu.family", "hopper".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                nodes.push(NodeInput {
                    name: format!("{pool}-{i}"),
                    labels,
                    capacity: [("nvidia.com/gpu".to_string(), "8".to_string())].into(),
                    allocatable: [("nvidia.com/gpu".to_string(), free.to_string())].into(),
                    ready: true,
                    ..Default::default()
                });
            }
        }
        compute(&nodes, &[], &[], &[], None)
    }

    fn req(replicas: u32, gpus: u32, mem: u64) -> FitRequest {
        FitRequest {
            replicas,
            gpus_per_replica: gpus,
            min_memory_mib: mem,
            ..Default::default()
        }
    }

    #[test]
    fn ranks_ready_then_headroom_and_explains_rejections() {
        let a = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 2, 8)]);
        let b = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 4, 8)]);
        let c = inv(&[("l4", "NVIDIA-L4", 23034, 4, 4)]);
        // (a and b report 81,559 MiB: within the 2% allowance of 80 GiB.)
        let d = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 1, 8)]);
        let clusters = [
            FitCluster {
                name: "a",
                health: Health::Ready,
                region: Some("eu"),
                inventory: &a,
                incomplete: &[],
            },
            FitCluster {
                name: "b",
                health: Health::Degraded,
                region: Some("us"),
                inventory: &b,
                incomplete: &[],
            },
            FitCluster {
                name: "c",
                health: Health::Ready,
                region: Some("us"),
                inventory: &c,
                incomplete: &[],
            },
            FitCluster {
                name: "d",
                health: Health::Ready,
                region: Some("us"),
                inventory: &d,
                incomplete: &[],
            },
            FitCluster {
                name: "e",
                health: Health::Unreachable,
                region: Some("us"),
                inventory: &b,
                incomplete: &[],
            },
        ];
        let r = fit(&req(2, 4, 80 * 1024), &clusters);
        let order: Vec<&str> = r.candidates.iter().map(|c| c.cluster.as_str()).collect();
        assert_eq!(
            order,
            ["a", "d", "b"],
            "Ready first, then by headroom; Degraded last"
        );
        assert_eq!(r.candidates[0].headroom_gpus, 8);
        let why: BTreeMap<&str, &str> = r
            .rejections
            .iter()
            .map(|x| (x.cluster.as_str(), x.reason.as_str()))
            .collect();
        assert!(why["c"].contains("23034 MiB"), "{}", why["c"]);
        assert!(why["e"].contains("Unreachable"), "{}", why["e"]);

        let r = fit(&req(3, 8, 0), &clusters[..1]);
        assert!(r.candidates.is_empty());
        assert!(
            r.rejections[0].reason.contains("only 2 of 3 replicas"),
            "{}",
            r.rejections[0].reason
        );

        let mut only_eu = req(1, 1, 0);
        only_eu.region = Some("eu".into());
        let r = fit(&only_eu, &clusters);
        assert_eq!(
            r.candidates
                .iter()
                .map(|c| c.cluster.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );

        let mut l4 = req(1, 1, 0);
        l4.product = Some("l4".into());
        let r = fit(&l4, &clusters);
        assert_eq!(
            r.candidates
                .iter()
                .map(|c| c.cluster.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert!(
            r.rejections
                .iter()
                .any(|x| x.cluster == "a" && x.reason.contains("product"))
        );
    }

    fn one_node(labels: &[(&str, &str)], resources: &[(&str, &str)]) -> ClusterInventory {
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("kubernetes.azure.com/agentpool".into(), "p".into());
        let r: BTreeMap<String, String> = resources
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let n = NodeInput {
            name: "n".into(),
            labels: l,
            capacity: r.clone(),
            allocatable: r,
            ready: true,
            ..Default::default()
        };
        compute(&[n], &[], &[], &[], None)
    }

    #[test]
    fn each_request_unit_fits_only_its_own_kind_of_gpu() {
        let a100 = ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB");
        let whole = one_node(
            &[a100, ("nvidia.com/gpu.count", "8")],
            &[("nvidia.com/gpu", "8")],
        );
        let shared = one_node(
            &[
                ("nvidia.com/gpu.product", "NVIDIA-L4"),
                ("nvidia.com/gpu.replicas", "4"),
            ],
            &[("nvidia.com/gpu", "32")],
        );
        let single = one_node(
            &[
                ("nvidia.com/mig.strategy", "single"),
                (
                    "nvidia.com/gpu.product",
                    "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb",
                ),
            ],
            &[("nvidia.com/gpu", "56")],
        );
        let mixed = one_node(
            &[
                a100,
                ("nvidia.com/mig.strategy", "mixed"),
                ("nvidia.com/gpu.count", "8"),
            ],
            &[("nvidia.com/gpu", "2"), ("nvidia.com/mig-3g.40gb", "12")],
        );
        let cluster = |name, inventory| FitCluster {
            name,
            health: Health::Ready,
            region: None,
            inventory,
            incomplete: &[],
        };
        let clusters = [
            cluster("whole", &whole),
            cluster("shared", &shared),
            cluster("single", &single),
            cluster("mixed", &mixed),
        ];
        let placed = |unit: FitUnit, gpus: u32| {
            let mut r = req(1, gpus, 0);
            r.unit = unit;
            let out = fit(&r, &clusters);
            let mut c: Vec<String> = out.candidates.iter().map(|c| c.cluster.clone()).collect();
            c.sort();
            (c, out)
        };
        // (unit, units per replica, clusters that fit)
        let cases = [
            (FitUnit::Whole, 1, vec!["mixed", "whole"]),
            (FitUnit::Whole, 4, vec!["whole"]),
            (FitUnit::Shared, 1, vec!["shared"]),
            (FitUnit::Mig("1g.10gb".into()), 1, vec!["single"]),
            (FitUnit::Mig("3g.40gb".into()), 2, vec!["mixed"]),
        ];
        for (unit, gpus, want) in cases {
            let (got, _) = placed(unit.clone(), gpus);
            assert_eq!(got, want, "{unit:?} x{gpus}");
        }
        // `fit --gpus 1 --product A100` never lands on a slice, and says why.
        let mut r = req(1, 1, 0);
        r.product = Some("A100".into());
        let out = fit(&r, &clusters);
        let why = |c: &str| {
            out.rejections
                .iter()
                .find(|x| x.cluster == c)
                .map(|x| x.reason.clone())
                .unwrap_or_default()
        };
        assert!(
            why("single").contains("no whole GPUs here: its GPUs are MIG 1g.10gb slices"),
            "{}",
            why("single")
        );
        let (_, out) = placed(FitUnit::Whole, 1);
        let shared_why = out
            .rejections
            .iter()
            .find(|x| x.cluster == "shared")
            .unwrap();
        assert!(
            shared_why.reason.contains("shared replicas (x4 per GPU)"),
            "{}",
            shared_why.reason
        );
        assert_eq!(out.candidates[0].resource, "nvidia.com/gpu");
    }

    #[test]
    fn an_incomplete_inventory_is_not_placed_on() {
        let a = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 2, 8)]);
        let missing = ["pods".to_string()];
        let clusters = [FitCluster {
            name: "a",
            health: Health::Ready,
            region: None,
            inventory: &a,
            incomplete: &missing,
        }];
        let out = fit(&req(1, 1, 0), &clusters);
        assert!(out.candidates.is_empty());
        assert_eq!(
            out.rejections[0].reason,
            "inventory incomplete (pods not listed yet): its free GPUs are not known"
        );
    }

    #[test]
    fn dra_gpus_are_requested_through_a_claim() {
        let n = NodeInput {
            name: "n".into(),
            labels: [(
                "kubernetes.azure.com/agentpool".to_string(),
                "dra".to_string(),
            )]
            .into(),
            ready: true,
            ..Default::default()
        };
        let s = crate::inventory::SliceInput {
            driver: "gpu.nvidia.com".into(),
            node_name: Some("n".into()),
            pool: "n".into(),
            generation: 1,
            slice_count: 1,
            devices: (0..4)
                .map(|i| crate::inventory::DeviceInput {
                    name: format!("gpu-{i}"),
                    ..Default::default()
                })
                .collect(),
        };
        let inventory = compute(&[n], &[], &[s], &[], None);
        let clusters = [FitCluster {
            name: "a",
            health: Health::Ready,
            region: None,
            inventory: &inventory,
            incomplete: &[],
        }];
        let out = fit(&req(1, 2, 0), &clusters);
        let c = &out.candidates[0];
        assert_eq!(
            (c.resource.as_str(), c.device_class.as_deref()),
            ("resourceclaim", Some("gpu.nvidia.com"))
        );
    }

    #[test]
    fn marketed_memory_sizes_match() {
        assert!(
            memory_fits(81_559, 80 * 1024),
            "an 80 GB H100 satisfies 80Gi"
        );
        assert!(!memory_fits(40_960, 80 * 1024));
        assert!(!memory_fits(78_000, 80 * 1024));
        assert!(memory_fits(0, 0));
    }

    #[test]
    fn a_replica_must_fit_on_one_node() {
        // Two nodes with 4 free GPUs each: 8 free, but an 8-GPU replica fits nowhere.
        let a = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 2, 4)]);
        let clusters = [FitCluster {
            name: "a",
            health: Health::Ready,
            region: None,
            inventory: &a,
            incomplete: &[],
        }];
        let r = fit(&req(1, 8, 0), &clusters);
        assert!(r.candidates.is_empty());
        assert_eq!(
            r.rejections[0].reason,
            "pool h100: busy: at most 4 free whole GPUs on one node, 8 needed"
        );
    }

    #[test]
    fn a_rejection_gives_each_pools_own_reason() {
        let mut a = inv(&[
            ("l4", "NVIDIA-L4", 23034, 1, 8),
            ("h100", "NVIDIA-H100-80GB-HBM3", 81559, 1, 8),
            ("h100b", "NVIDIA-H100-80GB-HBM3", 81559, 1, 8),
        ]);
        // The second H100 pool's node is leaving; the first has room for 8, not 16.
        for n in &mut a.nodes {
            if n.pool.as_deref() == Some("h100b") {
                n.schedulable = false;
            }
        }
        let clusters = [FitCluster {
            name: "a",
            health: Health::Ready,
            region: None,
            inventory: &a,
            incomplete: &[],
        }];
        let mut r = req(2, 8, 81920);
        r.product = Some("H100".into());
        let out = fit(&r, &clusters);
        assert!(out.candidates.is_empty());
        assert_eq!(
            out.rejections[0].reason,
            "pool h100: busy: only 1 of 2 replicas fit (each needs 8 free whole GPUs on one node); \
             pool h100b: no Ready, schedulable node (NotReady, cordoned or leaving); \
             pool l4: wrong product or family (NVIDIA-L4)"
        );
        r.product = None;
        r.min_memory_mib = 40_000;
        r.replicas = 3;
        let out = fit(&r, &clusters);
        assert!(
            out.rejections[0]
                .reason
                .contains("pool l4: GPUs too small (23034 MiB, 40000 MiB required)"),
            "{}",
            out.rejections[0].reason
        );
    }

    #[test]
    fn products_match_by_whole_words_never_by_substring() {
        // (requested, node's product, family, matches)
        let cases = [
            ("H100", "NVIDIA-H100-80GB-HBM3", Some("hopper"), true),
            ("h100", "NVIDIA H100 80GB HBM3", None, true),
            ("A100", "NVIDIA-A100-SXM4-80GB", Some("ampere"), true),
            ("A100-80GB", "NVIDIA-A100-SXM4-80GB", None, true),
            ("A100 40GB", "NVIDIA-A100-SXM4-80GB", None, false),
            ("A10", "NVIDIA-A100-SXM4-80GB", None, false),
            ("A10", "NVIDIA-A10", None, true),
            ("L4", "NVIDIA-L40S", None, false),
            ("L4", "NVIDIA-L4", None, true),
            ("H20", "NVIDIA-H200", None, false),
            ("T4", "nvidia-tesla-t4", None, true),
            ("MI300X", "AMD Instinct MI300X", None, true),
            ("hopper", "NVIDIA-H100-80GB-HBM3", Some("hopper"), true),
            ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-80GB-HBM3", None, true),
            ("", "NVIDIA-H100-80GB-HBM3", None, false),
        ];
        for (want, have, family, ok) in cases {
            assert_eq!(
                product_matches(want, have, family),
                ok,
                "{want:?} vs {have:?}"
            );
        }
    }

    #[test]
    fn the_region_filter_uses_each_nodes_region() {
        // One cluster whose agent knew no region, with nodes in two regions.
        let mut inventory = inv(&[("h100", "NVIDIA-H100-80GB-HBM3", 81559, 2, 8)]);
        inventory.nodes[0].region = Some("westeurope".into());
        inventory.nodes[1].region = Some("northeurope".into());
        let clusters = [FitCluster {
            name: "a",
            region: None,
            health: Health::Ready,
            inventory: &inventory,
            incomplete: &[],
        }];
        let mut r = req(1, 8, 0);
        r.region = Some("westeurope".into());
        let out = fit(&r, &clusters);
        assert_eq!(out.candidates.len(), 1);
        assert_eq!(
            out.candidates[0].replicas_fit, 1,
            "only the node in westeurope counts"
        );
        r.region = Some("eastus".into());
        let out = fit(&r, &clusters);
        assert!(out.candidates.is_empty());
        assert_eq!(
            out.rejections[0].reason,
            "no nodes in region eastus (its nodes are in northeurope, westeurope)"
        );
    }
}
