//! The fleet's GPU figures as metric series, with bounded cardinality: one row per cluster
//! and pool (labelled with the pool's products), and MIG profile for slices; never per node
//! unless asked. Pure, and cheap: rows come from the pool totals the leader already keeps in
//! each stored inventory, so the hub builds them when an inventory arrives without looking at
//! its nodes.

use crate::inventory::{GpuUnit, PoolInventory};

/// One pool's GPU figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolGpus {
    /// Pool (`""` for nodes without one).
    pub pool: String,
    /// The pool's products, comma-separated (`unknown` when the nodes do not say).
    pub product: String,
    /// Physical GPUs of the nodes that say how many they have.
    pub physical: i64,
    /// Physical GPUs the nodes can hand out.
    pub allocatable: i64,
    /// Allocatable GPUs with something in use.
    pub allocated: i64,
    /// Requestable whole GPUs free on usable nodes.
    pub free: i64,
    /// Idle physical GPUs (lower bound) on usable nodes.
    pub idle: i64,
    /// Failed GPUs.
    pub failed: i64,
    /// Time-sliced/MPS replicas advertised.
    pub shared_replicas: i64,
    /// Shared replicas free on usable nodes.
    pub shared_replicas_free: i64,
    /// MIG slices by profile: (profile, advertised, free on usable nodes).
    pub mig_slices: Vec<(String, i64, i64)>,
}

/// Rows for one cluster's pools, in pool order.
pub fn pool_gpus(pools: &[PoolInventory]) -> Vec<PoolGpus> {
    pools
        .iter()
        .map(|p| {
            let mut r = PoolGpus {
                pool: p.name.clone(),
                product: match p.products.is_empty() {
                    true => "unknown".to_string(),
                    false => p.products.join(","),
                },
                physical: p.physical_gpus,
                allocatable: p.allocatable_gpus,
                allocated: p.allocated_gpus,
                free: p.free_gpus,
                idle: p.idle_gpus,
                failed: p.failed_gpus,
                ..Default::default()
            };
            // Pool resource sums count `free` on usable nodes only.
            for res in &p.resources {
                match &res.unit {
                    GpuUnit::Shared(_) => {
                        r.shared_replicas += res.capacity;
                        r.shared_replicas_free += res.free;
                    }
                    GpuUnit::MigSlice(profile) => {
                        let profile = if profile.is_empty() {
                            "unknown"
                        } else {
                            profile
                        };
                        match r.mig_slices.iter_mut().find(|(q, _, _)| q == profile) {
                            Some(m) => {
                                m.1 += res.capacity;
                                m.2 += res.free;
                            }
                            None => {
                                r.mig_slices
                                    .push((profile.to_string(), res.capacity, res.free))
                            }
                        }
                    }
                    _ => {}
                }
            }
            r.mig_slices.sort();
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{NodeInput, compute};

    fn node(name: &str, pool: &str, labels: &[(&str, &str)], res: &[(&str, &str)]) -> NodeInput {
        let mut l: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("kubernetes.azure.com/agentpool".into(), pool.into());
        let r: std::collections::BTreeMap<String, String> = res
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        NodeInput {
            name: name.into(),
            labels: l,
            capacity: r.clone(),
            allocatable: r,
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn rows_are_per_pool_and_product_with_shares_and_slices_apart() {
        let h100 = ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3");
        let nodes = [
            node(
                "a",
                "h100",
                &[h100, ("nvidia.com/gpu.count", "8")],
                &[("nvidia.com/gpu", "8")],
            ),
            node(
                "b",
                "h100",
                &[h100, ("nvidia.com/gpu.count", "8")],
                &[("nvidia.com/gpu", "8")],
            ),
            node(
                "m",
                "a100",
                &[
                    ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB"),
                    ("nvidia.com/mig.strategy", "mixed"),
                    ("nvidia.com/gpu.count", "8"),
                ],
                &[
                    ("nvidia.com/mig-1g.10gb", "28"),
                    ("nvidia.com/mig-3g.40gb", "8"),
                ],
            ),
            node(
                "s",
                "l4",
                &[
                    ("nvidia.com/gpu.product", "NVIDIA-L4"),
                    ("nvidia.com/gpu.replicas", "4"),
                ],
                &[("nvidia.com/gpu", "16")],
            ),
        ];
        let inv = compute(&nodes, &[], &[], &[], None);
        let rows = pool_gpus(&inv.pools);
        let pools: Vec<&str> = rows.iter().map(|r| r.pool.as_str()).collect();
        assert_eq!(pools, ["a100", "h100", "l4"]);
        assert_eq!(
            (
                rows[1].physical,
                rows[1].allocatable,
                rows[1].free,
                rows[1].idle
            ),
            (16, 16, 16, 16)
        );
        assert_eq!(rows[1].product, "NVIDIA-H100-80GB-HBM3");
        assert_eq!(
            rows[0].mig_slices,
            [
                ("1g.10gb".to_string(), 28, 28),
                ("3g.40gb".to_string(), 8, 8)
            ]
        );
        assert_eq!((rows[0].physical, rows[0].free), (8, 0));
        assert_eq!(
            (rows[2].physical, rows[2].shared_replicas, rows[2].free),
            (4, 16, 0)
        );
    }
}
