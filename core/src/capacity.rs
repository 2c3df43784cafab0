//! Fleet GPU capacity: per-node counts of allocatable and unused GPUs, summed into rows
//! grouped by product, region, cluster or pool.

use std::collections::BTreeMap;

use crate::health::Health;
use crate::inventory::NodeInventory;

/// How capacity rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// By GPU product (`unknown` when the node does not say).
    Product,
    /// By the node's region, else the cluster's (`unknown` when neither says).
    Region,
    /// By cluster.
    Cluster,
    /// By `cluster/pool`.
    Pool,
}

/// One cluster's input to [`capacity`].
#[derive(Debug, Clone, Copy)]
pub struct CapacityCluster<'a> {
    /// Cluster name.
    pub name: &'a str,
    /// Health (Left clusters count for nothing).
    pub health: Health,
    /// The cluster's region, if it reported one.
    pub region: Option<&'a str>,
    /// Its GPU nodes.
    pub nodes: &'a [NodeInventory],
}

/// One row of capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapacityRow {
    /// The group's key.
    pub key: String,
    /// Physical GPUs.
    pub gpus_total: i64,
    /// Physical GPUs the nodes can hand out.
    pub gpus_allocatable: i64,
    /// Allocatable GPUs with something in use.
    pub gpus_allocated: i64,
    /// GPUs with nothing in use on Ready, schedulable nodes.
    pub gpus_free: i64,
    /// GPU memory of all physical GPUs, in MiB.
    pub memory_total_mib: u64,
    /// GPU memory of the free GPUs, in MiB.
    pub memory_free_mib: u64,
    /// Nodes that do not say how many physical GPUs they have (not in the totals).
    pub nodes_gpus_unknown: u32,
}

pub use crate::inventory::allocatable_gpus;

fn key(c: &CapacityCluster<'_>, n: &NodeInventory, by: GroupBy) -> String {
    let unknown = || "unknown".to_string();
    match by {
        GroupBy::Product => n.product.clone().unwrap_or_else(unknown),
        GroupBy::Region => n
            .region
            .clone()
            .or_else(|| c.region.map(str::to_string))
            .unwrap_or_else(unknown),
        GroupBy::Cluster => c.name.to_string(),
        GroupBy::Pool => format!("{}/{}", c.name, n.pool.as_deref().unwrap_or_default()),
    }
}

/// Capacity rows in key order. Clusters that left count for nothing; an Unreachable
/// cluster's GPUs still count as installed, but none as free: its inventory is as old as its
/// last report.
pub fn capacity<'a>(
    clusters: impl IntoIterator<Item = CapacityCluster<'a>>,
    by: GroupBy,
) -> Vec<CapacityRow> {
    let mut rows: BTreeMap<String, CapacityRow> = BTreeMap::new();
    for c in clusters {
        if c.health == Health::Left {
            continue;
        }
        for n in c.nodes {
            let k = key(&c, n, by);
            let row = rows.entry(k.clone()).or_insert_with(|| CapacityRow {
                key: k,
                ..Default::default()
            });
            let alloc = allocatable_gpus(n);
            let unused = n.idle_gpus.min(alloc);
            let live = c.health != Health::Unreachable;
            let free = if live && n.usable() { unused } else { 0 };
            let mem = n.gpu_memory_mib.unwrap_or(0);
            let physical = n.physical_gpus.unwrap_or(0);
            if n.physical_gpus.is_none() {
                row.nodes_gpus_unknown += 1;
            }
            row.gpus_total += physical;
            row.gpus_allocatable += alloc;
            row.gpus_allocated += (alloc - unused).max(0);
            row.gpus_free += free;
            row.memory_total_mib += mem * physical.max(0) as u64;
            row.memory_free_mib += mem * free.max(0) as u64;
        }
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{NodeInput, PodInput, compute};

    /// A node of `physical` GPUs advertising `alloc` units of `resource`, `used` of them
    /// requested, through the inventory's own computation.
    fn node_of(
        name: &str,
        labels: &[(&str, &str)],
        resource: &str,
        alloc: i64,
        used: i64,
    ) -> NodeInventory {
        let mut l: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("kubernetes.azure.com/agentpool".into(), "p".into());
        l.insert("nvidia.com/gpu.product".into(), "H100".into());
        l.insert("nvidia.com/gpu.memory".into(), "81559".into());
        let n = NodeInput {
            name: name.into(),
            labels: l,
            capacity: [(resource.to_string(), alloc.to_string())].into(),
            allocatable: [(resource.to_string(), alloc.to_string())].into(),
            ready: true,
            ..Default::default()
        };
        let p = PodInput {
            node_name: Some(name.into()),
            phase: "Running".into(),
            containers: vec![[(resource.to_string(), used.to_string())].into()],
            ..Default::default()
        };
        compute(&[n], &[p], &[], &[], None).nodes.remove(0)
    }

    fn node(name: &str, physical: i64, used: i64) -> NodeInventory {
        let count = physical.to_string();
        node_of(
            name,
            &[("nvidia.com/gpu.count", &count)],
            "nvidia.com/gpu",
            physical,
            used,
        )
    }

    #[test]
    fn whole_gpus_count_free_and_memory_only_where_schedulable() {
        let a = node("a", 8, 3);
        let mut b = node("b", 8, 0);
        b.schedulable = false;
        let nodes = [a, b];
        let rows = capacity(
            [CapacityCluster {
                name: "c1",
                health: Health::Ready,
                region: Some("eu"),
                nodes: &nodes,
            }],
            GroupBy::Region,
        );
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.key, "eu", "the cluster's region stands in for the node's");
        assert_eq!(
            (
                r.gpus_total,
                r.gpus_allocatable,
                r.gpus_allocated,
                r.gpus_free
            ),
            (16, 16, 3, 5)
        );
        assert_eq!(r.memory_free_mib, 5 * 81_559);
    }

    #[test]
    fn mig_counts_physical_gpus_and_a_lower_bound_of_unused_ones() {
        let n = node_of(
            "m",
            &[
                ("nvidia.com/gpu.count", "8"),
                ("nvidia.com/mig.strategy", "mixed"),
            ],
            "nvidia.com/mig-1g.10gb",
            56,
            3,
        );
        assert_eq!(allocatable_gpus(&n), 8);
        assert_eq!(n.idle_gpus, 5, "each used slice may be on a different GPU");
        // MIG single without a hardware count: the GPUs are not known, nor counted.
        let single = node_of(
            "s",
            &[
                ("nvidia.com/mig.strategy", "single"),
                ("nvidia.com/gpu.count", "56"),
            ],
            "nvidia.com/gpu",
            56,
            3,
        );
        let rows = capacity(
            [CapacityCluster {
                name: "c",
                health: Health::Ready,
                region: None,
                nodes: std::slice::from_ref(&single),
            }],
            GroupBy::Cluster,
        );
        assert_eq!(
            (
                rows[0].gpus_total,
                rows[0].gpus_free,
                rows[0].nodes_gpus_unknown
            ),
            (0, 0, 1)
        );
    }

    #[test]
    fn clusters_that_left_count_for_nothing() {
        let nodes = [node("a", 8, 0)];
        let c = |health| CapacityCluster {
            name: "c1",
            health,
            region: None,
            nodes: &nodes,
        };
        assert!(capacity([c(Health::Left)], GroupBy::Cluster).is_empty());
        let rows = capacity([c(Health::Degraded)], GroupBy::Pool);
        assert_eq!((rows[0].key.as_str(), rows[0].gpus_free), ("c1/p", 8));
    }

    #[test]
    fn an_unreachable_clusters_stale_inventory_is_not_free() {
        let nodes = [node("a", 8, 0)];
        let row = |health| {
            capacity(
                [CapacityCluster {
                    name: "c",
                    health,
                    region: None,
                    nodes: &nodes,
                }],
                GroupBy::Cluster,
            )[0]
            .clone()
        };
        assert_eq!(row(Health::Ready).gpus_free, 8);
        let stale = row(Health::Unreachable);
        assert_eq!(
            (stale.gpus_total, stale.gpus_free, stale.memory_free_mib),
            (8, 0, 0)
        );
    }
}
