//! `flotctl get clusters`, `flotctl get gpus`, `flotctl get services`.

use crate::{cluster_json, health_name, table};
use clap::{Subcommand, ValueEnum};
use flotilla_api::v1;
use serde_json::{Value, json};

use super::{Ctx, Failure};

/// What to list.
#[derive(Debug, Subcommand)]
pub enum Get {
    /// Member clusters and their health.
    Clusters,
    /// GPU capacity grouped by product, region, cluster or pool.
    Gpus {
        /// Grouping.
        #[arg(long, value_enum, default_value_t = GroupBy::Product)]
        by: GroupBy,
    },
    /// Exported services, merged fleet-wide: exporting clusters, ready endpoints, conflicts.
    Services {
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

/// How `get gpus` groups rows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GroupBy {
    /// By GPU product.
    Product,
    /// By region.
    Region,
    /// By cluster.
    Cluster,
    /// By cluster and pool.
    Pool,
}

/// Runs `get`.
pub async fn run(ctx: &mut Ctx, what: Get) -> Result<(), Failure> {
    match what {
        Get::Clusters => clusters(ctx).await,
        Get::Gpus { by } => gpus(ctx, by).await,
        Get::Services { namespace } => super::services::list(ctx, namespace).await,
    }
}

async fn clusters(ctx: &mut Ctx) -> Result<(), Failure> {
    let list = ctx
        .client
        .list_clusters(v1::ListClustersRequest {})
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = Value::Array(list.clusters.iter().map(cluster_json).collect());
    ctx.print(&v, || {
        table(
            // WHOLE-FREE: GPUs a pod can still request whole (what fit places on); a GPU
            // split into MIG slices counts 0 here. `get gpus` shows idle hardware instead.
            &[
                "NAME",
                "HEALTH",
                "REGION",
                "K8S",
                "NODES",
                "GPUS",
                "WHOLE-FREE",
                "REASON",
            ],
            list.clusters
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        health_name(c.health).into(),
                        c.region.clone(),
                        c.kubernetes_version.clone(),
                        c.nodes.to_string(),
                        c.physical_gpus.to_string(),
                        c.free_gpus.to_string(),
                        c.health_reason.clone(),
                    ]
                })
                .collect(),
        )
    });
    Ok(())
}

async fn gpus(ctx: &mut Ctx, by: GroupBy) -> Result<(), Failure> {
    let group_by = match by {
        GroupBy::Product => v1::CapacityGroupBy::Product,
        GroupBy::Region => v1::CapacityGroupBy::Region,
        GroupBy::Cluster => v1::CapacityGroupBy::Cluster,
        GroupBy::Pool => v1::CapacityGroupBy::Pool,
    };
    let cap = ctx
        .client
        .capacity(v1::CapacityRequest {
            group_by: group_by as i32,
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = Value::Array(
        cap.rows
            .iter()
            .map(|r| {
                json!({"key": r.key, "total": r.gpus_total, "allocatable": r.gpus_allocatable,
                       "allocated": r.gpus_allocated, "idle": r.gpus_free,
                       "memory_total_mib": r.memory_total_mib, "memory_idle_mib": r.memory_free_mib,
                       "nodes_gpus_unknown": r.nodes_gpus_unknown})
            })
            .collect(),
    );
    let key = format!("{by:?}").to_uppercase();
    ctx.print(&v, || {
        table(
            // IDLE: physical GPUs with nothing in use on usable nodes (for MIG, no slice in
            // use), which is not the same count as `get clusters`' WHOLE-FREE.
            &[
                &key,
                "TOTAL",
                "ALLOCATABLE",
                "ALLOCATED",
                "IDLE",
                "MEMORY-TOTAL",
                "MEMORY-IDLE",
            ],
            cap.rows
                .iter()
                .map(|r| {
                    vec![
                        r.key.clone(),
                        // Nodes that do not say how many GPUs they have (MIG single without a
                        // hardware count) are not in the total; say so.
                        match r.nodes_gpus_unknown {
                            0 => r.gpus_total.to_string(),
                            n => format!("{}+? ({n} nodes unknown)", r.gpus_total),
                        },
                        r.gpus_allocatable.to_string(),
                        r.gpus_allocated.to_string(),
                        r.gpus_free.to_string(),
                        format!("{}Gi", r.memory_total_mib / 1024),
                        format!("{}Gi", r.memory_free_mib / 1024),
                    ]
                })
                .collect(),
        )
    });
    Ok(())
}
