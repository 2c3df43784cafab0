//! Campaign throughput: a whole upgrade campaign over many simulated clusters, end to end. A
//! one-member hub with `--dev` over a generated scenario (kube-sim clusters, a real agent
//! each, in-process), three stages of 20%, 30% and 50% of the clusters (as KubeFleet's scale
//! report), each `--concurrency` at once, zero soaks and delays. Reports the whole campaign's
//! time, each stage transition (last cluster of a stage done → first of the next started)
//! and per-cluster durations.
//!
//! ```text
//! cargo build --release -p flotilla-hub
//! ./target/release/flotilla-campaign-bench --clusters 100 --nodes 10
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "A whole upgrade campaign over simulated clusters")]
struct Args {
    /// Member clusters.
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// GPU nodes per cluster (the blue pool).
    #[arg(long, default_value_t = 10)]
    nodes: u32,
    /// Clusters of a stage at once (count or %).
    #[arg(long, default_value = "50%")]
    concurrency: String,
    /// Blue nodes per batch (count or %).
    #[arg(long, default_value = "10%")]
    batch: String,
    /// Extra nodes at once (count or %).
    #[arg(long, default_value = "100%")]
    surge: String,
    /// Give up after this long.
    #[arg(long, default_value = "30m", value_parser = flotilla_core::duration::parse)]
    timeout: Duration,
}

fn scenario(clusters: usize, nodes: u32) -> String {
    let mut s = String::from("clusters:\n");
    for i in 0..clusters {
        // Stages of 20%, 30%, 50% by label.
        let ring = match i * 10 / clusters.max(1) {
            0 | 1 => "first",
            2..=4 => "second",
            _ => "third",
        };
        s.push_str(&format!(
            "  - name: c{i:04}
    provider: cluster-api
    labels: {{ring: {ring}}}
    timing: {{node_ready_ms: 10, device_plugin_ms: 10, pod_start_ms: 10, grace_second_ms: 0}}
    pools:
      - {{name: gpu, count: {nodes}, gpu: {{vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}}}
    workloads:
      - {{name: llm, namespace: ml, replicas: {replicas}, gpus: 4, pdb: {{max_unavailable: 1}}}}
",
            replicas = nodes.max(1)
        ));
    }
    s
}

fn spec(a: &Args) -> String {
    serde_json::json!({
        "name": "bench",
        "pool": {"machineDeployment": "gpu"},
        "green": {"clusterApi": {"version": "v1.35.0"}},
        "surge": a.surge,
        "stages": [
            {"name": "first", "clusters": {"matchLabels": {"ring": "first"}}, "maxConcurrency": a.concurrency},
            {"name": "second", "clusters": {"matchLabels": {"ring": "second"}}, "maxConcurrency": a.concurrency},
            {"name": "third", "clusters": {"matchLabels": {"ring": "third"}}, "maxConcurrency": a.concurrency},
        ],
        "blueGreen": {"batch": a.batch, "batchSoak": "0s", "finalSoak": "0s"},
        "healthGates": {"endpointsReadyPercent": 0},
        "failureBudget": {"perStage": 0},
    })
    .to_string()
}

fn pct(v: &mut [i64], p: f64) -> i64 {
    v.sort();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,flotilla_dns=error".into()),
        )
        .init();
    let dir = tempfile::tempdir()?;
    let scenario_path = dir.path().join("scenario.yaml");
    std::fs::write(&scenario_path, scenario(a.clusters, a.nodes))?;
    let data = dir.path().join("data");
    let args = <flotilla_hub::Args as clap::Parser>::parse_from([
        "flotilla-hub",
        "--dev",
        "--dev-scenario",
        scenario_path.to_str().context("path")?,
        "--data-dir",
        data.to_str().context("path")?,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let hub = flotilla_hub::start(args, shutdown.clone()).await?;
    let addr = format!("http://{}", hub.addr);
    let ch = tonic::transport::Endpoint::from_shared(addr)?
        .connect()
        .await?;
    let mut fleet = FleetServiceClient::new(ch.clone());
    let mut api = CampaignServiceClient::new(ch);
    loop {
        let cs = fleet
            .list_clusters(v1::ListClustersRequest {})
            .await?
            .into_inner()
            .clusters;
        let ready = cs
            .iter()
            .filter(|c| c.campaigns && c.health == v1::ClusterHealth::Ready as i32)
            .count();
        if ready == a.clusters {
            break;
        }
        if started.elapsed() > a.timeout {
            bail!("only {ready} of {} clusters Ready", a.clusters);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} clusters × {} GPU nodes Ready in {:.1} s; starting the campaign",
        a.clusters,
        a.nodes,
        started.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let id = api
        .create_campaign(v1::CreateCampaignRequest {
            spec_json: spec(&a),
            dry_run: false,
        })
        .await?
        .into_inner()
        .campaign
        .context("no campaign")?
        .id;
    let info = loop {
        let i = api
            .get_campaign(v1::GetCampaignRequest { id: id.clone() })
            .await?
            .into_inner();
        if i.state != v1::CampaignState::Running as i32 {
            break i;
        }
        if t0.elapsed() > a.timeout {
            bail!(
                "the campaign did not end in {:?}: {:?}",
                a.timeout,
                i.clusters_by_phase
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total = t0.elapsed();
    let c = flotilla_api::convert::campaign::campaign_from_info(&info)?;
    println!(
        "campaign: {} clusters × {} nodes, 3 stages, concurrency {}, batch {}, surge {}",
        a.clusters, a.nodes, a.concurrency, a.batch, a.surge
    );
    println!(
        "state {:?}; clusters by phase {:?}",
        c.state, info.clusters_by_phase
    );
    println!("total: {:.2} s", total.as_secs_f64());
    for w in c.stages.windows(2) {
        let last_done = w[0].clusters.iter().filter_map(|r| r.finished_ms).max();
        let first_start = w[1].clusters.iter().filter_map(|r| r.started_ms).min();
        if let (Some(d), Some(s)) = (last_done, first_start) {
            println!(
                "stage transition {} → {}: {} ms",
                w[0].name,
                w[1].name,
                s - d
            );
        }
    }
    let mut per: Vec<i64> = c
        .clusters()
        .filter_map(|(_, r)| Some(r.finished_ms? - r.started_ms?))
        .collect();
    println!(
        "per cluster: p50 {} ms, p90 {} ms, max {} ms",
        pct(&mut per, 0.5),
        pct(&mut per, 0.9),
        pct(&mut per, 1.0)
    );
    for s in &c.stages {
        let start = s.clusters.iter().filter_map(|r| r.started_ms).min();
        let end = s.clusters.iter().filter_map(|r| r.finished_ms).max();
        if let (Some(b), Some(e)) = (start, end) {
            println!(
                "stage {}: {} clusters, {} at once, {:.2} s",
                s.name,
                s.clusters.len(),
                s.concurrency,
                (e - b) as f64 / 1000.0
            );
        }
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), hub.wait()).await;
    if c.state != flotilla_core::campaign::machine::RunState::Succeeded {
        bail!("the campaign ended {:?}: {}", c.state, c.reason);
    }
    Ok(())
}
