//! Campaign throughput: a whole upgrade campaign over many simulated clusters, end to end. A
//! one-member hub with `--dev` over a generated scenario (kube-sim clusters, a real agent
//! each, in-process), three stages of 20%, 30% and 50% of the clusters (as KubeFleet's scale
//! report), each `--concurrency` at once, zero soaks and delays. Reports the whole campaign's
//! time (creation to end, from the record's timestamps), each stage transition (last cluster of a stage done → first of the next started)
//! and per-cluster durations.
//!
//! With `--split`, kube-sim and the agents run in processes of their own (the hub stays in
//! this one), for fleets whose sockets exceed one process's open-file limit, and each
//! process's CPU time is reported apart: where the time goes.
//!
//! ```text
//! cargo build --release -p flotilla-hub -p flotilla-kube-sim
//! ./target/release/flotilla-campaign-bench --clusters 100 --nodes 10
//! ./target/release/flotilla-campaign-bench --clusters 1000 --nodes 10 --split
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use tokio_util::sync::CancellationToken;

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;
use procs::{Procs, proc_stat};

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
    /// Run kube-sim (`flotilla-kube-sim` beside this binary) and the agents in processes of
    /// their own, and report each process's CPU.
    #[arg(long)]
    split: bool,
    /// Internal (`--split`): run the agents this file lists, until killed.
    #[arg(long, hide = true)]
    run_agents: Option<PathBuf>,
}

/// One agent a `--split` agent process runs: a line `cluster token ring kubeconfig` of its
/// file (after the hub's address on the first).
struct AgentEntry {
    cluster: String,
    token: String,
    ring: String,
    kubeconfig: PathBuf,
}

/// A cluster's stage label: stages of 20%, 30% and 50% of the clusters.
fn ring(i: usize, clusters: usize) -> &'static str {
    match i * 10 / clusters.max(1) {
        0 | 1 => "first",
        2..=4 => "second",
        _ => "third",
    }
}

/// The agent process of `--split`: every agent the file lists, as `--dev` runs them.
async fn run_agents(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)?;
    let mut lines = text.lines();
    let hub = lines.next().context("the hub's address")?.to_string();
    let shutdown = CancellationToken::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let [cluster, token, ring, kubeconfig] = f[..] else {
            bail!("a bad agent line: {line:?}");
        };
        let a = AgentEntry {
            cluster: cluster.into(),
            token: token.into(),
            ring: ring.into(),
            kubeconfig: kubeconfig.into(),
        };
        let kc = kube::config::Kubeconfig::read_from(&a.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let labels = [("ring".to_string(), a.ring)].into();
        let opts = flotilla_agent::AgentOptions::simulated(&a.cluster, &hub, a.token, labels);
        let s = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = flotilla_agent::run(config, opts, None, s).await {
                eprintln!("agent stopped: {e}");
            }
        });
    }
    // Until the benchmark kills this process.
    std::future::pending::<()>().await;
    Ok(())
}

/// `--split`: kube-sim as a child process; once every kubeconfig is written, join tokens
/// from the hub and the agents in a second child. The children, in that order.
async fn split_fleet(
    a: &Args,
    dir: &Path,
    scenario_path: &Path,
    hub: std::net::SocketAddr,
) -> anyhow::Result<Procs> {
    let me = std::env::current_exe()?;
    let sim_bin = me.with_file_name("flotilla-kube-sim");
    if !sim_bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p flotilla-kube-sim)",
            sim_bin.display()
        );
    }
    let kc = dir.join("kc");
    let mut procs = Procs(vec![
        Command::new(&sim_bin)
            .arg("--scenario")
            .arg(scenario_path)
            .arg("--kubeconfig-dir")
            .arg(&kc)
            .args(["--control", &format!("127.0.0.1:{}", procs::free_port())])
            .stdout(Stdio::null())
            .spawn()
            .context("starting flotilla-kube-sim")?,
    ]);
    let names: Vec<String> = (0..a.clusters).map(|i| format!("c{i:04}")).collect();
    let started = Instant::now();
    while !names
        .iter()
        .all(|n| kc.join(format!("{n}.kubeconfig")).exists())
    {
        if started.elapsed() > a.timeout {
            bail!("kube-sim did not write every kubeconfig");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{hub}"))?
        .connect()
        .await?;
    let mut fleet = FleetServiceClient::new(ch);
    let mut agents = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let token = fleet
            .create_join_token(v1::CreateJoinTokenRequest {
                cluster: n.clone(),
                ttl_seconds: 3600,
                ..Default::default()
            })
            .await?
            .into_inner()
            .token;
        agents.push(AgentEntry {
            cluster: n.clone(),
            token,
            ring: ring(i, a.clusters).to_string(),
            kubeconfig: kc.join(format!("{n}.kubeconfig")),
        });
    }
    let file = dir.join("agents.tsv");
    let mut text = format!("{hub}\n");
    for e in &agents {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            e.cluster,
            e.token,
            e.ring,
            e.kubeconfig.display()
        ));
    }
    std::fs::write(&file, text)?;
    procs.0.push(
        Command::new(&me)
            .arg("--run-agents")
            .arg(&file)
            .spawn()
            .context("starting the agent process")?,
    );
    Ok(procs)
}

fn scenario(clusters: usize, nodes: u32) -> String {
    let mut s = String::from("clusters:\n");
    for i in 0..clusters {
        let ring = ring(i, clusters);
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
    if let Some(file) = &a.run_agents {
        return run_agents(file).await;
    }
    let dir = tempfile::tempdir()?;
    let scenario_path = dir.path().join("scenario.yaml");
    std::fs::write(&scenario_path, scenario(a.clusters, a.nodes))?;
    let data = dir.path().join("data");
    let mut hub_args = vec![
        "flotilla-hub".to_string(),
        "--insecure".into(),
        "--data-dir".into(),
        data.to_str().context("path")?.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    if !a.split {
        hub_args.extend([
            "--dev".into(),
            "--dev-scenario".into(),
            scenario_path.to_str().context("path")?.into(),
        ]);
    }
    let args = <flotilla_hub::Args as clap::Parser>::parse_from(hub_args);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let hub = flotilla_hub::start(args, shutdown.clone()).await?;
    let children = match a.split {
        true => Some(split_fleet(&a, dir.path(), &scenario_path, hub.addr).await?),
        false => None,
    };
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
    let cpu = |children: &Option<Procs>| {
        let mut v = vec![proc_stat(std::process::id()).0];
        if let Some(p) = children {
            v.extend(p.0.iter().map(|c| proc_stat(c.id()).0));
        }
        v
    };
    let cpu0 = cpu(&children);
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
        // Reading a whole campaign costs the hub O(clusters): ask seldom, and take the end
        // from the record's own timestamps.
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let polled = t0.elapsed();
    let cpu1 = cpu(&children);
    let c = flotilla_api::convert::campaign::campaign_from_info(&info)?;
    let total = c
        .finished_ms
        .map(|f| Duration::from_millis((f - c.created_ms).max(0) as u64))
        .unwrap_or(polled);
    println!(
        "campaign: {} clusters × {} nodes, 3 stages, concurrency {}, batch {}, surge {}",
        a.clusters, a.nodes, a.concurrency, a.batch, a.surge
    );
    println!(
        "state {:?}; clusters by phase {:?}",
        c.state, info.clusters_by_phase
    );
    println!("total: {:.2} s", total.as_secs_f64());
    let spent: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect();
    match spent.as_slice() {
        [hub, sim, agents] => println!(
            "CPU during the campaign: hub {hub:.1} s, kube-sim {sim:.1} s, agents {agents:.1} s \
             ({:.2} cores of 2)",
            (hub + sim + agents) / polled.as_secs_f64()
        ),
        [all] => println!(
            "CPU during the campaign: {all:.1} s in one process (hub, kube-sim and agents; \
             --split tells them apart), {:.2} cores",
            all / polled.as_secs_f64()
        ),
        _ => {}
    }
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
    // The agents go first, so the hub has no streams to wait for.
    drop(children);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), hub.wait()).await;
    if c.state != flotilla_core::campaign::machine::RunState::Succeeded {
        bail!("the campaign ended {:?}: {}", c.state, c.reason);
    }
    Ok(())
}
