//! The member agent: watches one cluster through kube-rs, computes its GPU inventory, and
//! reports it to the hub over one `AgentService.Connect` stream.

pub mod campaign;
pub mod convert;
pub mod exports;
pub mod identity;
pub mod imports;
pub mod inference;
pub mod metrics;
pub mod reconnect;
pub mod session;
pub mod stream;
pub mod watch;

pub use watch::{ClusterWatch, Listing, WatchOptions};

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The default start-up bound for GPU advertising (`--gpu-advertise-bound`).
pub const DEFAULT_GPU_ADVERTISE_BOUND: Duration =
    Duration::from_millis(flotilla_core::inventory::NOT_ADVERTISED_BOUND_MS as u64);

/// How often the agent pings the hub on its stream; a hub silent as long is taken as gone.
pub const STREAM_KEEPALIVE: Duration = Duration::from_secs(5);

/// Everything an agent needs besides the Kubernetes client.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Cluster name.
    pub cluster: String,
    /// Hub addresses.
    pub hubs: Vec<String>,
    /// Join string (`<id>.<secret>@sha256:<CA hash>`), or a bare token for a hub without TLS.
    pub token: String,
    /// The Secret (`namespace/name`) the agent keeps its identity in; `None`: memory only.
    pub identity_secret: Option<(String, String)>,
    /// Node label naming pools, overriding provider detection.
    pub pool_label: Option<String>,
    /// Region; when empty, the most common node region.
    pub region: String,
    /// Cluster labels.
    pub labels: BTreeMap<String, String>,
    /// How long after a node turned Ready its GPUs may stay unadvertised before they count
    /// as failed.
    pub gpu_advertise_bound: Duration,
    /// Other clusters reach this cluster's Service IPs directly (a flat network): export
    /// cluster IPs as reachable addresses too.
    pub flat_network: bool,
    /// Maintain the derived ServiceImports and EndpointSlices of the fleet's services.
    pub imports: bool,
    /// How often opted-in exports' inference metrics are sampled.
    pub inference_interval: Duration,
    /// Run campaign steps when the credentials allow it (`--campaigns`).
    pub campaigns: bool,
    /// How the hub is dialled.
    pub security: flotilla_api::grpc::Security,
}

impl AgentOptions {
    /// What `--dev` gives its in-process agents (and the benchmarks theirs): every feature on,
    /// the defaults otherwise.
    pub fn simulated(
        cluster: &str,
        hub: &str,
        token: String,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            cluster: cluster.to_string(),
            hubs: vec![hub.to_string()],
            token,
            identity_secret: None,
            pool_label: None,
            region: String::new(),
            labels,
            gpu_advertise_bound: DEFAULT_GPU_ADVERTISE_BOUND,
            flat_network: false,
            imports: true,
            inference_interval: inference::DEFAULT_INTERVAL,
            campaigns: true,
            security: flotilla_api::grpc::Security::Plaintext,
        }
    }
}

/// Watch the cluster (through a client built from `config`) and report to the hub until
/// `shutdown`.
pub async fn run(
    config: kube::Config,
    opts: AgentOptions,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), session::SessionError> {
    let client = kube::Client::try_from(config.clone())
        .map_err(|e| session::SessionError::Retry(format!("kube client: {e}")))?;
    // The executor sees every 429 itself: kube's default retry would hold a PDB-blocked
    // eviction for minutes inside one call, where the drain loop must judge its timeout.
    let mut no_retry = config;
    no_retry.default_retry = false;
    let exec_client = kube::Client::try_from(no_retry)
        .map_err(|e| session::SessionError::Retry(format!("kube client: {e}")))?;
    let version = match client.apiserver_version().await {
        Ok(v) => v.git_version,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API server version yet");
            String::new()
        }
    };
    let exports = exports::ExportWatch::start(client.clone(), opts.flat_network, shutdown.clone());
    let imports = opts
        .imports
        .then(|| imports::ImportSync::start(client.clone(), exports.clone(), shutdown.clone()));
    let loads = inference::start(
        client.clone(),
        exports.clone(),
        opts.inference_interval,
        shutdown.clone(),
    );
    // Campaign steps only with every permission the executor uses, so a half-installed
    // agent never starts a rollout it cannot finish.
    let steps = if opts.campaigns {
        match campaign::permitted(&client).await {
            Ok(()) => {
                let x = exports.clone();
                let ready = std::sync::Arc::new(move || {
                    x.exports(&|_| None)
                        .iter()
                        .map(|e| e.ready_endpoints().count() as u32)
                        .sum()
                });
                let exec = campaign::Exec::new(exec_client, opts.pool_label.clone(), ready);
                Some(campaign::Steps::start(
                    std::sync::Arc::new(exec),
                    shutdown.clone(),
                ))
            }
            Err(missing) => {
                tracing::warn!(missing = %missing.join(", "), "campaign permissions are not installed: this cluster will not run campaigns");
                None
            }
        }
    } else {
        None
    };
    let watch = ClusterWatch::start(
        client.clone(),
        WatchOptions {
            pool_label: opts.pool_label.clone(),
            not_advertised_bound: opts.gpu_advertise_bound,
        },
        shutdown.clone(),
    );
    let metrics = metrics::AgentMetrics::new();
    if let Some(l) = http {
        let probe = std::sync::Arc::new(metrics::AgentProbe {
            metrics: metrics.clone(),
            watch: watch.clone(),
        });
        tokio::spawn(flotilla_api::http::serve(l, probe, shutdown.clone()));
    }
    // Report as soon as the caches are filled; an unreachable API is reported, not waited
    // on, and a report from caches still listing says it is incomplete.
    let _ = tokio::time::timeout(Duration::from_secs(10), watch.ready()).await;
    let region = if opts.region.is_empty() {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for n in watch.inventory().nodes {
            if let Some(r) = n.region {
                *count.entry(r).or_default() += 1;
            }
        }
        count
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .map(|(r, _)| r)
            .unwrap_or_default()
    } else {
        opts.region.clone()
    };
    let keeper = opts
        .identity_secret
        .as_ref()
        .map(|(ns, name)| identity::Keeper::new(client.clone(), ns, name));
    let credentials = identity::Credentials::load(&opts.cluster, &opts.token, keeper).await?;
    let cfg = session::SessionConfig {
        cluster: opts.cluster,
        hubs: opts.hubs,
        credentials,
        region,
        labels: opts.labels,
        kubernetes_version: version,
        coalesce: Duration::from_millis(100),
        metrics,
        exports: Some(exports),
        imports,
        loads: Some(loads),
        steps,
        // The stream lives for hours: pings find a partition that drops packets.
        dial: flotilla_api::grpc::Dial {
            security: opts.security,
            connect_timeout: Duration::from_secs(3),
            keepalive: Some(STREAM_KEEPALIVE),
        },
    };
    session::run(cfg, watch, shutdown).await
}
