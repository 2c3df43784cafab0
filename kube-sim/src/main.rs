//! `flotilla-kube-sim`: serve the simulated clusters of a scenario file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use flotilla_kube_sim::{Scenario, SimFleet, SimOptions, control};

/// Serve SIMULATED Kubernetes clusters (a test double) described by a scenario file.
#[derive(Debug, Parser)]
#[command(name = "flotilla-kube-sim", version)]
struct Args {
    /// Scenario YAML; the built-in three-cluster dev scenario when absent.
    #[arg(long, env = "FLOTILLA_SIM_SCENARIO")]
    scenario: Option<PathBuf>,
    /// Address the API servers listen on.
    #[arg(long, env = "FLOTILLA_SIM_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// First API port (cluster i gets first-port + i); 0 picks free ports.
    #[arg(long, env = "FLOTILLA_SIM_FIRST_PORT", default_value_t = 0)]
    first_port: u16,
    /// Control API address (faults, kubeconfigs).
    #[arg(long, env = "FLOTILLA_SIM_CONTROL", default_value = "127.0.0.1:7490")]
    control: SocketAddr,
    /// Directory for one kubeconfig per cluster.
    #[arg(
        long,
        env = "FLOTILLA_SIM_KUBECONFIG_DIR",
        default_value = "kube-sim-kubeconfigs"
    )]
    kubeconfig_dir: PathBuf,
    /// Watch history per cluster (changes); older resumes get 410 Gone.
    #[arg(long, env = "FLOTILLA_SIM_HISTORY", default_value_t = 2000)]
    history: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let scenario = match &args.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::dev(),
    };
    let opts = SimOptions {
        host: args.host,
        first_port: args.first_port,
        history: args.history,
        ..Default::default()
    };
    let fleet = Arc::new(
        SimFleet::start(&scenario, opts)
            .await
            .context("binding API ports")?,
    );
    let paths = fleet
        .write_kubeconfigs(&args.kubeconfig_dir)
        .context("writing kubeconfigs")?;
    let control = tokio::net::TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding the control API on {}", args.control))?;
    println!("kube-sim: SIMULATED Kubernetes clusters (a test double, not real Kubernetes)");
    for (c, p) in fleet.clusters().iter().zip(&paths) {
        println!("  {:<24} {}  kubeconfig {}", c.name(), c.url(), p.display());
    }
    println!(
        "control API: http://{} (POST /v1/clusters/NAME/faults)",
        args.control
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctl = tokio::spawn(control::serve(control, fleet.clone(), shutdown.clone()));
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    let _ = ctl.await;
    if let Ok(f) = Arc::try_unwrap(fleet) {
        f.shutdown().await;
    }
    Ok(())
}
