//! `flotctl describe cluster NAME`, `flotctl describe service SERVICE`.

use crate::{cluster_json, describe_text, inventory_json, unix_ms_now};
use clap::Subcommand;
use flotilla_api::v1;

use super::{Ctx, Failure};

/// What to describe.
#[derive(Debug, Subcommand)]
pub enum Describe {
    /// A member cluster.
    Cluster {
        /// Cluster name.
        name: String,
    },
    /// A fleet-wide service: its exports, conflicts and policy.
    Service {
        /// The service, as name.namespace or namespace/name.
        name: String,
    },
}

/// Runs `describe`.
pub async fn run(ctx: &mut Ctx, what: Describe) -> Result<(), Failure> {
    let name = match what {
        Describe::Cluster { name } => name,
        Describe::Service { name } => return super::services::describe(ctx, &name).await,
    };
    let cl = ctx
        .client
        .get_cluster(v1::GetClusterRequest { name: name.clone() })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let inv = ctx
        .client
        .get_inventory(v1::GetInventoryRequest {
            cluster: name,
            ..Default::default()
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let mut v = cluster_json(&cl);
    v["inventory"] = inventory_json(&inv);
    ctx.print(&v, || describe_text(&cl, &inv, unix_ms_now()));
    Ok(())
}
