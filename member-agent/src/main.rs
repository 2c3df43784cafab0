//! `flotilla-agent`: runs in a member cluster and reports its GPU inventory to the hub.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flotilla_agent::AgentOptions;

/// Flotilla member agent.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version)]
struct Args {
    /// This cluster's name in the fleet (a DNS label).
    #[arg(long, env = "FLOTILLA_CLUSTER")]
    cluster: String,
    /// Hub gRPC addresses, comma-separated (any replica; the agent follows the leader).
    #[arg(
        long,
        env = "FLOTILLA_HUB",
        value_delimiter = ',',
        default_value = "127.0.0.1:7400"
    )]
    hub: Vec<String>,
    /// Join string from `flotctl join` / `flotctl token create`
    /// (`<id>.<secret>@sha256:<CA hash>`: the agent trusts only that CA). A bare token means a
    /// hub without TLS. Not needed once the agent's identity is in its Secret.
    #[arg(long, env = "FLOTILLA_TOKEN", default_value = "")]
    token: String,
    /// The Secret (`namespace/name`) the agent keeps its certificate in, so a restart needs no
    /// new token ("" to keep it in memory only).
    #[arg(
        long,
        env = "FLOTILLA_IDENTITY_SECRET",
        default_value = "flotilla-system/flotilla-agent-identity"
    )]
    identity_secret: String,
    /// Kubeconfig to use (default: in-cluster, then ~/.kube/config).
    #[arg(long, env = "FLOTILLA_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Node label that names node pools (default: provider labels).
    #[arg(long, env = "FLOTILLA_POOL_LABEL")]
    pool_label: Option<String>,
    /// Region (default: the most common node region label).
    #[arg(long, env = "FLOTILLA_REGION", default_value = "")]
    region: String,
    /// HTTP address for /metrics, /healthz and /readyz ("" to disable).
    #[arg(long, env = "FLOTILLA_AGENT_HTTP", default_value = "0.0.0.0:7481")]
    http: String,
    /// Cluster labels, key=value, comma-separated.
    #[arg(long = "labels", env = "FLOTILLA_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// How long after a node turned Ready its GPUs may stay unadvertised (allocatable 0)
    /// before they count as failed, e.g. `5m`, `90s`.
    #[arg(long, env = "FLOTILLA_GPU_ADVERTISE_BOUND", default_value = "5m", value_parser = flotilla_core::duration::parse)]
    gpu_advertise_bound: std::time::Duration,
    /// Other clusters reach this cluster's Service IPs directly (one flat network, e.g.
    /// Cilium Cluster Mesh or a shared VPC): export cluster IPs, not only LoadBalancer and
    /// external addresses.
    #[arg(long, env = "FLOTILLA_FLAT_NETWORK")]
    flat_network: bool,
    /// Maintain the fleet's derived ServiceImports and per-cluster EndpointSlices here
    /// (`--imports=false` to leave them to another MCS implementation).
    #[arg(long, env = "FLOTILLA_IMPORTS", default_value_t = true, action = clap::ArgAction::Set)]
    imports: bool,
    /// How often to sample the vLLM metrics of exports annotated
    /// `flotilla.io/inference-metrics`, e.g. `1s`.
    #[arg(long, env = "FLOTILLA_INFERENCE_SAMPLE_INTERVAL", default_value = "1s", value_parser = flotilla_core::duration::parse)]
    inference_sample_interval: std::time::Duration,
    /// Run fleet upgrade campaign steps (cordon, drain, provision green) when the credentials
    /// allow them (`--campaigns=false` to opt out; leaving out the campaign ClusterRole does
    /// the same).
    #[arg(long, env = "FLOTILLA_CAMPAIGNS", default_value_t = true, action = clap::ArgAction::Set)]
    campaigns: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut labels = BTreeMap::new();
    // An empty value (FLOTILLA_LABELS="" in a manifest) means no labels.
    for l in args.labels.iter().filter(|l| !l.is_empty()) {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--labels: {l:?} is not key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let config = match &args.kubeconfig {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--kubeconfig {}", p.display()))?;
            let kc = kube::config::Kubeconfig::from_yaml(&text)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config or kubeconfig")?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    let opts = AgentOptions {
        cluster: args.cluster,
        hubs: args.hub,
        token: args.token,
        identity_secret: match args.identity_secret.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                Some((ns.to_string(), name.to_string()))
            }
            _ if args.identity_secret.is_empty() => None,
            _ => anyhow::bail!(
                "--identity-secret {:?}: namespace/name",
                args.identity_secret
            ),
        },
        pool_label: args.pool_label,
        region: args.region,
        labels,
        gpu_advertise_bound: args.gpu_advertise_bound,
        flat_network: args.flat_network,
        imports: args.imports,
        inference_interval: args.inference_sample_interval,
        campaigns: args.campaigns,
        security: flotilla_api::grpc::Security::Plaintext,
    };
    let http = if args.http.is_empty() {
        None
    } else {
        Some(
            tokio::net::TcpListener::bind(&args.http)
                .await
                .with_context(|| format!("--http {}", args.http))?,
        )
    };
    flotilla_agent::run(config, opts, http, shutdown).await?;
    Ok(())
}
