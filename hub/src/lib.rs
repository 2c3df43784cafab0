//! The Flotilla hub. For now it runs one member of the replicated fleet store and serves the
//! store's gRPC API (Kv, StoreAdmin, health, reflection); the fleet services arrive with the
//! membership issue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flotilla_core::kv::Limits;
use flotilla_raft_store::{NodeConfig, StoreNode, Tuning};
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
        ..Tuning::default()
    };
    config.limits = Limits {
        max_key_bytes,
        max_value_bytes,
        ..Limits::default()
    };
    let running = StoreNode::start(config, shutdown.clone()).await?;
    info!(node = node_id, addr = %running.addr, data_dir = %data_dir.display(), "flotilla-hub ready");
    let mut sims = None;
    if dev {
        let scenario = match &dev_scenario {
            Some(p) => flotilla_kube_sim::Scenario::from_file(p)?,
            None => flotilla_kube_sim::Scenario::dev(),
        };
        let fleet = flotilla_kube_sim::SimFleet::start(&scenario, Default::default()).await?;
        let paths = fleet.write_kubeconfigs(&data_dir.join("kubeconfigs"))?;
        println!(
            "flotilla-hub --dev: store member {node_id} on {} (data in {})",
            running.addr,
            data_dir.display()
        );
        println!("simulated clusters (kube-sim, a test double, not real Kubernetes):");
        for (c, p) in fleet.clusters().iter().zip(&paths) {
            println!("  {:<20} {}  kubeconfig {}", c.name(), c.url(), p.display());
        }
        println!("try: grpcurl -plaintext {} list", running.addr);
        if let Some(p) = paths.first() {
            println!("try: KUBECONFIG={} kubectl get nodes", p.display());
        }
        sims = Some(fleet);
    }
    running.wait().await?;
    if let Some(f) = sims {
        f.shutdown().await;
    }
    Ok(())
}
