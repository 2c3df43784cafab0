//! Capacity benchmark for kube-sim: how many simulated GPU clusters one process holds while
//! agents (kube-rs watchers, in a separate process) watch them, and how quickly watch events
//! reach those watchers.
//!
//! `flotilla-kube-sim-bench --clusters 1000 --nodes 50` starts the fleet, measures its RSS,
//! spawns itself in `--watcher` mode with one Node watcher and one Pod watcher per cluster,
//! measures RSS again once every watcher has listed, then changes nodes at a fixed rate and
//! reports the latency from write to watcher receipt.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use flotilla_kube_sim::resources::idx;
use flotilla_kube_sim::{Scenario, SimFleet, SimOptions};
use futures::StreamExt;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "flotilla-kube-sim-bench")]
struct Args {
    /// Simulated clusters.
    #[arg(long, env = "BENCH_CLUSTERS", default_value_t = 1000)]
    clusters: usize,
    /// GPU nodes per cluster.
    #[arg(long, env = "BENCH_NODES", default_value_t = 50)]
    nodes: u32,
    /// Node changes per second during the latency phase.
    #[arg(long, env = "BENCH_RATE", default_value_t = 100)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 20)]
    seconds: u64,
    /// Watch history per cluster.
    #[arg(long, env = "BENCH_HISTORY", default_value_t = flotilla_kube_sim::store::DEFAULT_HISTORY)]
    history: usize,
    /// Internal: run as the watcher process, reading kubeconfig paths from stdin.
    #[arg(long, hide = true)]
    watcher: bool,
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn scenario(clusters: usize, nodes: u32) -> Scenario {
    let mut yaml = String::from("clusters:\n");
    for i in 0..clusters {
        yaml.push_str(&format!(
            "  - name: bench-{i:05}\n    region: region-{r}\n    zones: [z1, z2, z3]\n    provider: aks\n    pools:\n      \
             - name: h100\n        count: {nodes}\n        instance_type: Standard_ND96isr_H100_v5\n        \
             gpu: {{vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}\n    \
             workloads:\n      - {{name: llm, namespace: inference, replicas: 4, gpus: 4, pdb: {{min_available: 2}}, service: {{port: 8000}}, export: true}}\n",
            r = i % 10
        ));
    }
    Scenario::from_yaml(&yaml).expect("generated scenario")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.watcher {
        return watcher_main().await;
    }
    let t0 = Instant::now();
    let base_rss = rss_mib();
    let s = scenario(args.clusters, args.nodes);
    let opts = SimOptions {
        history: args.history,
        ..Default::default()
    };
    let fleet = SimFleet::start(&s, opts)
        .await
        .context("starting the fleet")?;
    // Wait until every cluster has its nodes Ready and its pods Running.
    loop {
        let settled = fleet.clusters().iter().all(|c| {
            c.with_state(|st| {
                st.store.count(idx::NODES) == args.nodes as usize
                    && st
                        .store
                        .iter(idx::PODS, Some("inference"), None)
                        .filter(|p| p["status"]["phase"] == "Running")
                        .count()
                        == 4
            })
        });
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start_secs = t0.elapsed().as_secs_f64();
    let sim_rss = rss_mib();
    println!(
        "fleet: {} clusters x {} GPU nodes ({} nodes) settled in {:.1} s; RSS {:.0} MiB (base {:.0} MiB)",
        args.clusters,
        args.nodes,
        args.clusters * args.nodes as usize,
        start_secs,
        sim_rss,
        base_rss
    );

    let dir = tempfile::tempdir()?;
    let paths = fleet.write_kubeconfigs(dir.path())?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("--watcher")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawning the watcher process")?;
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for p in &paths {
            writeln!(stdin, "{}", p.display())?;
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let t_watch = Instant::now();
    loop {
        let line = line_rx.recv().await.context("watcher exited early")?;
        println!("{line}");
        if line.starts_with("watchers: synced") {
            break;
        }
    }
    let watch_sync = t_watch.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let watched_rss = rss_mib();
    println!(
        "with {} watches connected (synced in {:.1} s): RSS {:.0} MiB = {:.2} MiB per cluster",
        2 * args.clusters,
        watch_sync,
        watched_rss,
        watched_rss / args.clusters as f64
    );

    // Latency phase: change one node's annotation at `rate` per second across the fleet.
    let cpu0 = cpu_secs();
    let t_phase = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_micros(1_000_000 / args.rate.max(1));
    let mut tick = tokio::time::interval(interval);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut i = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        let c = &fleet.clusters()[i % fleet.clusters().len()];
        let n = (i / fleet.clusters().len()) % args.nodes as usize;
        c.with_state(|st| {
            let node = st
                .store
                .iter(idx::NODES, None, None)
                .nth(n)
                .cloned()
                .expect("node");
            let mut v = (*node).clone();
            v["metadata"]["annotations"]["bench.flotilla.dev/sent-us"] =
                json!(now_micros().to_string());
            let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
            st.store
                .update(idx::NODES, "", &name, v, false)
                .expect("update node");
        });
        sent.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    let cores = (cpu_secs() - cpu0) / t_phase.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = child.kill();
    let mut summary = None;
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(3), line_rx.recv()).await {
        if line.starts_with("latency:") {
            summary = Some(line);
        }
    }
    let busy = rss_mib();
    println!(
        "changes sent: {} at {}/s; sim CPU {:.2} cores during the phase; sim RSS after it {:.0} MiB",
        sent.load(Ordering::Relaxed),
        args.rate,
        cores,
        busy
    );
    if let Some(s) = summary {
        println!("{s}");
    }
    let _ = child.wait();
    fleet.shutdown().await;
    Ok(())
}

/// Watcher process: one kube-rs Node watcher and Pod watcher per cluster, as an agent runs.
async fn watcher_main() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::runtime::watcher;
    let paths: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .collect();
    let synced = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new(3).expect("hist"),
    ));
    for p in &paths {
        let text = std::fs::read_to_string(p)?;
        let kc = kube::config::Kubeconfig::from_yaml(&text)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(cfg)?;
        let nodes: kube::Api<Node> = kube::Api::all(client.clone());
        let pods: kube::Api<Pod> = kube::Api::all(client);
        let (s1, h) = (synced.clone(), hist.clone());
        tokio::spawn(async move {
            let mut w = watcher(nodes, watcher::Config::default()).boxed();
            while let Some(e) = w.next().await {
                match e {
                    Ok(watcher::Event::InitDone) => {
                        s1.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        let sent = n
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get("bench.flotilla.dev/sent-us"))
                            .and_then(|v| v.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            let _ = h
                                .lock()
                                .expect("hist")
                                .record(now_micros().saturating_sub(sent));
                        }
                    }
                    _ => {}
                }
            }
        });
        let s2 = synced.clone();
        tokio::spawn(async move {
            let mut w = watcher(
                pods,
                watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
            )
            .boxed();
            while let Some(e) = w.next().await {
                if let Ok(watcher::Event::InitDone) = e {
                    s2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let want = 2 * paths.len() as u64;
    while synced.load(Ordering::Relaxed) < want {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "watchers: synced {want} watches; watcher process RSS {:.0} MiB",
        rss_mib()
    );
    // Report latency every second; the parent keeps the last line.
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let h = hist.lock().expect("hist");
        if !h.is_empty() {
            println!(
                "latency: events {} p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                h.len(),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            );
        }
        let _ = std::io::stdout().flush();
    }
}
