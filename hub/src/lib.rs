//! The Flotilla hub: one member of the replicated fleet store, serving the store's gRPC API
//! (Kv, StoreAdmin, health, reflection) and the fleet API (AgentService, FleetService) on the
//! same port.

pub mod fleet;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::kv::Limits;
use flotilla_raft_store::{ExtraServices, NodeConfig, StoreNode, Tuning};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Command-line flags (every flag also reads an environment variable).
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "flotilla-hub",
    version,
    about = "Flotilla hub: the replicated fleet control plane"
)]
pub struct Args {
    /// Run a single-member hub for development: data in a temporary directory (unless
    /// --data-dir is given), gRPC on 127.0.0.1:7400.
    #[arg(long, env = "FLOTILLA_DEV")]
    pub dev: bool,
    /// This member's id (>= 1, unique in the cluster, fixed for the data directory's life).
    #[arg(long, env = "FLOTILLA_NODE_ID", default_value_t = 1)]
    pub node_id: u64,
    /// Directory for the Raft log and state (required unless --dev).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Address other members reach this one at (default: the listen address).
    #[arg(long, env = "FLOTILLA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Address of an existing member to join; without it an empty data directory bootstraps a
    /// new single-member cluster.
    #[arg(long, env = "FLOTILLA_JOIN")]
    pub join: Option<String>,
    /// Revisions of history kept for watches and past reads.
    #[arg(long, env = "FLOTILLA_HISTORY_REVISIONS", default_value_t = 100_000)]
    pub history_revisions: i64,
    /// Build a snapshot (and purge the log behind it) every this many log entries.
    #[arg(long, env = "FLOTILLA_SNAPSHOT_AFTER_LOGS", default_value_t = 20_000)]
    pub snapshot_after_logs: u64,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_VALUE_BYTES", default_value_t = Limits::default().max_value_bytes)]
    pub max_value_bytes: usize,
    /// Largest key accepted, in bytes.
    #[arg(long, env = "FLOTILLA_MAX_KEY_BYTES", default_value_t = Limits::default().max_key_bytes)]
    pub max_key_bytes: usize,
    /// Raft heartbeat interval in milliseconds (elections time out after 4–8 heartbeats).
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Scenario of simulated clusters for --dev (default: three clusters in three regions).
    #[arg(long, env = "FLOTILLA_DEV_SCENARIO")]
    pub dev_scenario: Option<PathBuf>,
    /// A cluster with no heartbeat for this long is Unreachable (e.g. 3s, 1500ms).
    #[arg(long, env = "FLOTILLA_UNREACHABLE_AFTER", default_value = "3s", value_parser = parse_duration)]
    pub unreachable_after: Duration,
    /// Grace period a new leader gives every cluster before judging liveness.
    #[arg(long, env = "FLOTILLA_LEADER_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub leader_grace: Duration,
    /// Heartbeat interval agents are told to use.
    #[arg(long, env = "FLOTILLA_AGENT_HEARTBEAT", default_value = "1s", value_parser = parse_duration)]
    pub agent_heartbeat: Duration,
    /// HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLOTILLA_HTTP", default_value = "127.0.0.1:7480")]
    pub http: SocketAddr,
    /// Most nodes one cluster may report.
    #[arg(long, env = "FLOTILLA_MAX_REPORT_NODES", default_value_t = 5_000)]
    pub max_report_nodes: usize,
    /// Page cache of the store's state file, in MiB (the log file gets a quarter of this).
    #[arg(long, env = "FLOTILLA_STORE_CACHE_MIB", default_value_t = 128)]
    pub store_cache_mib: usize,
    /// Agents admitted to the join handshake (hello to first acknowledged report) at once;
    /// the rest wait their turn, so a reconnect storm queues instead of timing out.
    #[arg(long, env = "FLOTILLA_MAX_CONCURRENT_JOINS", default_value_t = 256)]
    pub max_concurrent_joins: usize,
}

/// Parse `3s`, `1500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3s or 500ms"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Args {
        dev,
        node_id,
        data_dir,
        listen,
        advertise,
        join,
        history_revisions,
        snapshot_after_logs,
        max_value_bytes,
        max_key_bytes,
        heartbeat_ms,
        dev_scenario,
        unreachable_after,
        leader_grace,
        agent_heartbeat,
        max_report_nodes,
        http,
        store_cache_mib,
        max_concurrent_joins,
    } = args;
    // Keep a temporary directory alive for the whole run in --dev mode.
    let mut _temp = None;
    let data_dir = match (data_dir, dev) {
        (Some(d), _) => d,
        (None, true) => {
            let t = tempfile::Builder::new().prefix("flotilla-dev-").tempdir()?;
            let p = t.path().to_path_buf();
            _temp = Some(t);
            p
        }
        (None, false) => {
            anyhow::bail!("--data-dir (FLOTILLA_DATA_DIR) is required unless --dev is given")
        }
    };
    let heartbeat = Duration::from_millis(heartbeat_ms.max(10));
    let mut config = NodeConfig::new(node_id, &data_dir, listen);
    config.advertise = advertise;
    config.join = join;
    config.tuning = Tuning {
        heartbeat,
        election_timeout_min: heartbeat * 4,
        election_timeout_max: heartbeat * 8,
        history_revisions,
        snapshot_after_logs,
        cache: flotilla_raft_store::data_dir::CacheSizes {
            log_bytes: (store_cache_mib << 20) / 4,
            sm_bytes: store_cache_mib << 20,
        },
        ..Tuning::default()
    };
    config.limits = Limits {
        max_key_bytes,
        max_value_bytes,
        ..Limits::default()
    };
    let fleet = fleet::Fleet::new(fleet::FleetConfig {
        policy: flotilla_core::health::Policy {
            unreachable_after,
            leader_grace,
        },
        heartbeat: agent_heartbeat,
        limits: flotilla_api::convert::fleet::ReportLimits {
            max_nodes: max_report_nodes,
            ..Default::default()
        },
        max_concurrent_joins,
    });
    let routes_fleet = fleet.clone();
    config.extra_services = Some(ExtraServices(std::sync::Arc::new(move |node| {
        routes_fleet.routes(node)
    })));
    let running = StoreNode::start(config, shutdown.clone()).await?;
    let mut fleet_tasks = fleet.spawn(running.node.clone(), shutdown.clone());
    let http_listener = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|e| anyhow::anyhow!("--http {http}: {e}"))?;
    let http_addr = http_listener.local_addr()?;
    let probe = std::sync::Arc::new(metrics::HubProbe {
        metrics: fleet.metrics.clone(),
        view: fleet.view.clone(),
        node: running.node.clone(),
    });
    fleet_tasks.push(tokio::spawn(tracing::Instrument::instrument(
        flotilla_api::http::serve(http_listener, probe, shutdown.clone()),
        tracing::info_span!("hub-http"),
    )));
    info!(addr = %http_addr, "metrics and health on HTTP");
    info!(node = node_id, addr = %running.addr, data_dir = %data_dir.display(), "flotilla-hub ready");
    let mut sims = None;
    if dev {
        let scenario = match &dev_scenario {
            Some(p) => flotilla_kube_sim::Scenario::from_file(p)?,
            None => flotilla_kube_sim::Scenario::dev(),
        };
        let sim = flotilla_kube_sim::SimFleet::start(&scenario, Default::default()).await?;
        let paths = sim.write_kubeconfigs(&data_dir.join("kubeconfigs"))?;
        println!(
            "flotilla-hub --dev: store member {node_id} on {} (data in {})",
            running.addr,
            data_dir.display()
        );
        println!("metrics and health: http://{http_addr}/metrics, /healthz, /readyz");
        println!("simulated clusters (kube-sim, a test double, not real Kubernetes):");
        for (c, p) in sim.clusters().iter().zip(&paths) {
            println!("  {:<20} {}  kubeconfig {}", c.name(), c.url(), p.display());
        }
        println!("an in-process agent per cluster reports to the hub; try:");
        println!("  cargo run -p flotctl -- get clusters");
        println!("  cargo run -p flotctl -- get gpus --by region");
        println!(
            "  cargo run -p flotctl -- fit --gpus 4 --min-memory 80Gi --product H100 --replicas 2"
        );
        if let Some(p) = paths.first() {
            println!("  KUBECONFIG={} kubectl get nodes", p.display());
        }
        // An in-process agent per simulated cluster, each with its own join token.
        for c in sim.clusters() {
            let token = format!("flt_dev_{}", uuid::Uuid::new_v4().simple());
            let rec = flotilla_api::v1::JoinTokenRecord {
                cluster: c.name().to_string(),
                expires_at_unix_ms: i64::MAX,
            };
            fleet::records::put_if(&running.node, &fleet::records::token_key(&token), &rec, 0)
                .await?;
            let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig())?;
            let client = kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
            )?;
            let opts = flotilla_agent::AgentOptions {
                cluster: c.name().to_string(),
                hubs: vec![running.addr.to_string()],
                token,
                pool_label: None,
                region: String::new(),
                labels: scenario
                    .clusters
                    .iter()
                    .find(|s| s.name == c.name())
                    .map(|s| s.labels.clone())
                    .unwrap_or_default(),
            };
            let s = shutdown.clone();
            let span = tracing::info_span!("dev-agent", cluster = %c.name());
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    if let Err(e) = flotilla_agent::run(client, opts, None, s).await {
                        tracing::error!(error = %e, "dev agent stopped");
                    }
                },
                span,
            ));
        }
        sims = Some(sim);
    }
    running.wait().await?;
    for t in fleet_tasks {
        let _ = t.await;
    }
    if let Some(f) = sims {
        f.shutdown().await;
    }
    Ok(())
}
