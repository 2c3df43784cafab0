//! `--dev`: a development fleet of simulated clusters (kube-sim, a test double) with an
//! in-process agent each, next to a single-member hub. Behind the default cargo feature `dev`;
//! `cargo build -p flotilla-hub --no-default-features` builds a hub without it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flotilla_kube_sim::{Scenario, SimFleet};
use tokio_util::sync::CancellationToken;

use crate::store::backend::HubStore;

/// The campaign `--dev` suggests (`examples/campaigns/dev.yaml`).
const DEV_CAMPAIGN: &str = include_str!("../../examples/campaigns/dev.yaml");

/// The running development fleet.
pub struct DevFleet {
    sim: SimFleet,
}

impl DevFleet {
    /// Stops the simulated clusters (the agents stop with the shutdown token).
    pub async fn shutdown(self) {
        self.sim.shutdown().await;
    }
}

/// How a newcomer runs `flotctl` against this hub at once: this very binary's `ctl`, by the
/// path it was started from (relative to the working directory when it is under it). Building
/// `flotctl` on its own would compile the dependencies again with other features.
fn flotctl(grpc: SocketAddr, tls: Option<&crate::security::HubTls>) -> String {
    let hub = if grpc.to_string() == "127.0.0.1:7400" {
        String::new()
    } else {
        format!(" --hub {grpc}")
    };
    let exe = std::env::current_exe()
        .ok()
        .map(|p| {
            let rel = std::env::current_dir()
                .ok()
                .and_then(|d| p.strip_prefix(d).ok().map(|r| format!("./{}", r.display())));
            rel.unwrap_or_else(|| p.display().to_string())
        })
        .unwrap_or_else(|| "flotilla-hub".into());
    // With --tls-dir: the CA, and the admin identity `flotctl ca init` left beside it.
    let tls = match tls {
        None => String::new(),
        Some(t) => {
            let d = t.dir();
            let mut f = format!(" --ca {}", d.join("ca.crt").display());
            if d.join("admin.crt").exists() {
                f.push_str(&format!(
                    " --cert {} --key {}",
                    d.join("admin.crt").display(),
                    d.join("admin.key").display()
                ));
            }
            f
        }
    };
    format!("{exe} ctl{hub}{tls}")
}

/// Starts the scenario's clusters (default: three clusters in three regions), prints what to
/// try, and starts an agent per cluster with its own join token.
pub async fn start(
    store: &HubStore,
    store_desc: &str,
    scenario: Option<&Path>,
    data_dir: &Path,
    (grpc, http, dns): (SocketAddr, SocketAddr, Option<SocketAddr>),
    tls: Option<&crate::security::HubTls>,
    shutdown: &CancellationToken,
) -> anyhow::Result<DevFleet> {
    let scenario = match scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::dev(),
    };
    let sim = SimFleet::start(&scenario, Default::default()).await?;
    let paths: Vec<PathBuf> = sim.write_kubeconfigs(&data_dir.join("kubeconfigs"))?;
    println!("flotilla-hub --dev: hub on {grpc}, fleet state in {store_desc}");
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("metrics and health: {scheme}://{http}/metrics, /healthz, /readyz");
    println!("simulated clusters (kube-sim, a test double, not real Kubernetes):");
    for (c, p) in sim.clusters().iter().zip(&paths) {
        println!("  {:<20} {}  kubeconfig {}", c.name(), c.url(), p.display());
    }
    let ctl = flotctl(grpc, tls);
    println!("an in-process agent per cluster reports to the hub; try (`ctl` is flotctl):");
    println!("  {ctl} get clusters");
    println!("  {ctl} get gpus --by region");
    println!("  {ctl} describe cluster {}", sim.clusters()[0].name());
    println!("  {ctl} fit --gpus 4 --min-memory 80Gi --product H100 --replicas 2");
    println!("  {ctl} fit --gpus 2 --mig-profile 1g.10gb    (or --shared: time-sliced GPUs)");
    println!("  {ctl} get services");
    println!(
        "  {ctl} explain route llama-70b.inference --from {}",
        sim.clusters()[0].name()
    );
    if let Some(d) = dns {
        println!(
            "  dig @{} -p {} llama-70b.inference.svc.clusterset.local",
            d.ip(),
            d.port()
        );
    }
    println!("  {ctl} watch");
    if let Some(p) = paths.first() {
        println!("  KUBECONFIG={} kubectl get nodes", p.display());
    }
    // The newcomer's campaign, written beside the kubeconfigs so the path works from any
    // directory (the same file as examples/campaigns/dev.yaml).
    let campaign = data_dir.join("campaigns/dev.yaml");
    std::fs::create_dir_all(data_dir.join("campaigns"))?;
    std::fs::write(&campaign, DEV_CAMPAIGN)?;
    println!("an upgrade campaign of the GPU pools (blue-green, two stages, one approval gate):");
    println!(
        "  {ctl} campaign create -f {} --dry-run",
        campaign.display()
    );
    println!("  {ctl} campaign create -f {}", campaign.display());
    println!(
        "  {ctl} campaign describe <id>     (then: campaign approve <id>; campaign get <id> -w)"
    );
    for c in sim.clusters() {
        let mint = crate::security::tokens::Mint {
            cluster: c.name(),
            ttl: std::time::Duration::from_secs(365 * 24 * 3600),
            uses: 1,
            require_approval: false,
            by: "dev",
        };
        let (token, _) =
            crate::security::tokens::mint(store, &mint, crate::controllers::unix_ms()).await?;
        // With TLS the agent pins the CA, as a real one started from a join string does.
        let token = match tls {
            Some(t) => flotilla_core::security::JoinString {
                token,
                ca_hash: t.pin(),
            }
            .reveal(),
            None => token.reveal(),
        };
        let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let labels = scenario
            .clusters
            .iter()
            .find(|s| s.name == c.name())
            .map(|s| s.labels.clone())
            .unwrap_or_default();
        let opts =
            flotilla_agent::AgentOptions::simulated(c.name(), &grpc.to_string(), token, labels);
        let s = shutdown.clone();
        let span = tracing::info_span!("dev-agent", cluster = %c.name());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = flotilla_agent::run(config, opts, None, s).await {
                    tracing::error!(error = %e, "dev agent stopped");
                }
            },
            span,
        ));
    }
    Ok(DevFleet { sim })
}
