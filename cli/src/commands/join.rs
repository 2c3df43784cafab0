//! `flotctl join CLUSTER`: the agent install manifest with a new join token.

use clap::Args;
use flotilla_api::v1;

use super::{Ctx, Failure};

/// Who joins, and how.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Cluster name (a DNS label).
    cluster: String,
    /// Hub address the agent should use (default: --hub).
    #[arg(long, env = "FLOTILLA_AGENT_HUB")]
    agent_hub: Option<String>,
    /// Token lifetime in seconds (0 = the hub's default, 24 h).
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// The join waits for `flotctl cluster approve CLUSTER`.
    #[arg(long)]
    require_approval: bool,
}

/// Runs `join`.
pub async fn run(ctx: &mut Ctx, a: JoinArgs) -> Result<(), Failure> {
    let t = ctx
        .client
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: a.cluster.clone(),
            ttl_seconds: a.ttl,
            uses: 1,
            require_approval: a.require_approval,
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let manifest = include_str!("../../../deploy/agent.yaml")
        .replace("{{TOKEN}}", &t.join)
        .replace("{{CLUSTER}}", &a.cluster)
        .replace("{{HUB}}", a.agent_hub.as_deref().unwrap_or(&ctx.hub))
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"));
    print!("{manifest}");
    Ok(())
}
