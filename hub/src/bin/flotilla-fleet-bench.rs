//! Membership load benchmark: N simulated agents speaking the real `AgentService.Connect`
//! protocol against one `flotilla-hub` process on this machine.
//!
//! Phases: join (tokens, hello, 50-node snapshot each) until every cluster is Ready; steady
//! state (heartbeat every `--heartbeat`, `--change-fraction` of clusters sending a delta each
//! second) measuring hub CPU, RSS and delta acknowledgement latency; then SIGKILL and restart
//! the hub and measure the time until every cluster is Ready again, watching for any
//! Unreachable.
//!
//! With `--store etcd` the hub keeps the fleet in a single-member etcd the benchmark starts
//! (`--etcd-bin`), and the steady-state figures name the hub's and etcd's CPU and memory
//! apart: on Raft the hub does the storing itself.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use flotilla_api::v1;
use flotilla_core::report::digest;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;
use procs::{free_port, proc_stat};

#[derive(Debug, Parser)]
#[command(name = "flotilla-fleet-bench")]
struct Args {
    /// Simulated clusters (agents).
    #[arg(long, env = "BENCH_CLUSTERS", default_value_t = 10_000)]
    clusters: usize,
    /// GPU nodes per cluster.
    #[arg(long, env = "BENCH_NODES", default_value_t = 50)]
    nodes: usize,
    /// Heartbeat interval agents are told to use.
    #[arg(long, env = "BENCH_HEARTBEAT", default_value = "2s", value_parser = flotilla_hub::parse_duration)]
    heartbeat: Duration,
    /// Fraction of clusters that change inventory each second.
    #[arg(long, env = "BENCH_CHANGE_FRACTION", default_value_t = 0.01)]
    change_fraction: f64,
    /// Every cluster exports one service (shared by ten clusters, four endpoints each), and
    /// this fraction of clusters flips an endpoint's readiness each second (0: no exports).
    #[arg(long, env = "BENCH_ENDPOINT_CHANGE_FRACTION", default_value_t = 0.0)]
    endpoint_change_fraction: f64,
    /// Agents ask for imports (as real agents do by default) for the namespaces they have:
    /// each cluster has its own export's namespace (1,000 services in 100 namespaces), so it
    /// imports ten services.
    #[arg(long, env = "BENCH_IMPORTS")]
    imports: bool,
    /// With --imports: every cluster imports every service (the worst case: all clusters
    /// have all namespaces).
    #[arg(long, env = "BENCH_IMPORTS_ALL", requires = "imports")]
    imports_all: bool,
    /// Seconds of steady state.
    #[arg(long, env = "BENCH_STEADY_SECONDS", default_value_t = 30)]
    steady_seconds: u64,
    /// HTTP/2 connections the agents share (0: one per 100 agents; a server allows a bounded
    /// number of concurrent streams per connection, and real agents each have their own).
    #[arg(long, env = "BENCH_CONNECTIONS", default_value_t = 0)]
    connections: usize,
    /// The hub's store: `raft` (embedded) or `etcd` (needs a hub built with `--features etcd`).
    #[arg(long, env = "BENCH_STORE", default_value = "raft")]
    store: String,
    /// The etcd binary, with `--store etcd`.
    #[arg(long, env = "BENCH_ETCD", default_value = "etcd")]
    etcd_bin: String,
    /// Mutual TLS: the hub on a fleet CA the benchmark makes, every agent with its own
    /// cluster certificate and its own connection (as real agents), the benchmark's own calls
    /// as an admin.
    #[arg(long, env = "BENCH_TLS")]
    tls: bool,
}

/// A single-member etcd in `dir`, with its client URL.
fn start_etcd(bin: &str, dir: &std::path::Path) -> anyhow::Result<(HubProc, String)> {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "e0", "--log-level", "error"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("e0={peer_url}")])
        // The hub's largest value (1.5 MiB) plus its key fits in one request.
        .args([
            "--max-request-bytes",
            "2097152",
            "--quota-backend-bytes",
            "8589934592",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {bin} (install etcd-server, or set --etcd-bin)"))?;
    Ok((HubProc(child), url))
}

/// The hub child process; killed and reaped when dropped (also on early returns).
struct HubProc(Child);

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the hub keeps the fleet: its data directory, or etcd's URL.
enum Store<'a> {
    Raft(&'a std::path::Path),
    Etcd(&'a str),
}

fn start_hub(
    exe: &PathBuf,
    store: &Store<'_>,
    (port, http): (u16, u16),
    heartbeat: Duration,
    tls: Option<&std::path::Path>,
) -> HubProc {
    let mut cmd = Command::new(exe);
    match tls {
        Some(dir) => cmd.arg("--tls-dir").arg(dir).args(["--fleet", "bench"]),
        None => cmd.arg("--insecure"),
    };
    match store {
        Store::Raft(data) => cmd.arg("--data-dir").arg(data),
        Store::Etcd(url) => cmd.args(["--store", "etcd", "--etcd-endpoints", url]),
    };
    HubProc(
        cmd.args([
            "--node-id",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--agent-heartbeat", &format!("{}ms", heartbeat.as_millis())])
        .args([
            "--unreachable-after",
            &format!("{}ms", heartbeat.as_millis() * 3),
        ])
        .args(["--leader-grace", "10s"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla-hub"),
    )
}

async fn channel(port: u16) -> anyhow::Result<Channel> {
    let dial = flotilla_api::grpc::Dial {
        security: procs::security(),
        ..flotilla_api::grpc::Dial::plaintext(Duration::from_secs(5))
    };
    Ok(flotilla_api::grpc::connect(&format!("127.0.0.1:{port}"), &dial).await?)
}

/// Waits until the hub says it leads (`flotilla_hub_leader 1`, on either store).
async fn wait_leader(http: u16) {
    loop {
        if metrics(http)
            .await
            .lines()
            .any(|l| l == "flotilla_hub_leader 1")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub's `/metrics` text, or empty while it does not answer.
async fn metrics(http: u16) -> String {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn get(mut s: impl AsyncRead + AsyncWrite + Unpin) -> String {
        let req = "GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n";
        let mut body = String::new();
        if s.write_all(req.as_bytes()).await.is_err() || s.read_to_string(&mut body).await.is_err()
        {
            return String::new();
        }
        body
    }
    match procs::METRICS_TLS.get() {
        Some(tls) => match tls.dial("127.0.0.1", http).await {
            Ok(s) => get(s).await,
            Err(_) => String::new(),
        },
        None => match tokio::net::TcpStream::connect(("127.0.0.1", http)).await {
            Ok(s) => get(s).await,
            Err(_) => String::new(),
        },
    }
}

fn nodes(cluster: usize, n: usize) -> Vec<v1::NodeInventory> {
    (0..n)
        .map(|i| v1::NodeInventory {
            name: format!("c{cluster}-n{i}"),
            pool: format!("pool-{}", i % 3),
            ready: true,
            schedulable: true,
            region: format!("region-{}", cluster % 10),
            zone: format!("zone-{}", i % 3),
            instance_type: "Standard_ND96isr_H100_v5".into(),
            kubelet_version: "v1.34.2".into(),
            product: "NVIDIA-H100-80GB-HBM3".into(),
            family: "hopper".into(),
            gpu_memory_mib: 81559,
            physical_gpus: 8,
            free_gpus: 8,
            idle_gpus: 8,
            resources: vec![v1::GpuResource {
                name: "nvidia.com/gpu".into(),
                vendor: v1::GpuVendor::Nvidia as i32,
                unit: v1::GpuUnitKind::Whole as i32,
                capacity: 8,
                allocatable: 8,
                allocated: 0,
                free: 8,
                ..Default::default()
            }],
            condition: v1::GpuCondition::Healthy as i32,
            ..Default::default()
        })
        .collect()
}

/// Cumulative buckets (upper bound in seconds, count) of the hub's report processing
/// histogram, from its `/metrics`.
async fn processing_buckets(http: u16) -> Vec<(f64, u64)> {
    metrics(http)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("flotilla_hub_report_processing_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which 99% of the reports between two scrapes were processed.
fn p99_bound(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<(f64, u64)> {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0, |(_, n)| *n);
            (*le, n.saturating_sub(b))
        })
        .collect();
    let total = diff.last()?.1;
    let want = (total as f64 * 0.99).ceil() as u64;
    diff.iter()
        .find(|(_, n)| *n >= want)
        .map(|(le, _)| (*le, total))
}

/// A reconnect delay (computed outside any await: the thread RNG is not `Send`).
fn jitter() -> Duration {
    Duration::from_millis(rand::rng().random_range(100..2000))
}

struct Shared {
    joined: AtomicUsize,
    sessions: AtomicU64,
    latencies: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    change_fraction: f64,
    endpoint_change_fraction: f64,
    exports: bool,
    imports: bool,
    imports_all: bool,
    endpoint_changes: AtomicU64,
    /// Imported services received (upserts and removals), while measuring.
    imports_received: AtomicU64,
    measuring: std::sync::atomic::AtomicBool,
}

/// The namespace of the service a simulated cluster exports: 1,000 services in 100.
fn namespace(id: usize) -> String {
    format!("team-{:02}", id % 100)
}

/// The one service a simulated cluster exports.
fn export(id: usize) -> v1::ServiceExport {
    v1::ServiceExport {
        namespace: namespace(id),
        name: format!("svc-{:04}", id % 1000),
        r#type: v1::ServiceType::ClusterSetIp as i32,
        ports: vec![v1::ServicePort {
            name: "http".into(),
            protocol: "TCP".into(),
            port: 8000,
            app_protocol: String::new(),
        }],
        addresses: vec![format!("198.18.{}.{}", (id >> 8) & 255, id & 255)],
        endpoints: (0..4)
            .map(|e| v1::ServiceEndpoint {
                address: format!("10.{}.{}.{e}", (id >> 8) & 255, id & 255),
                ready: true,
                serving: true,
                ..Default::default()
            })
            .collect(),
        created_at_unix_ms: 1_700_000_000_000 + id as i64,
        ..Default::default()
    }
}

/// The stream's reader: a task that reads everything the hub sends, as a real agent does
/// (imports and export status arrive unasked), and passes acknowledgements on.
struct Inbound {
    acks: tokio::sync::mpsc::UnboundedReceiver<()>,
    reader: tokio::task::JoinHandle<()>,
}

impl Inbound {
    fn start(mut stream: tonic::Streaming<v1::HubMessage>, shared: Arc<Shared>) -> Self {
        let (tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                match m.msg {
                    Some(v1::hub_message::Msg::ExportStatus(_)) => {}
                    Some(v1::hub_message::Msg::Imports(u)) => {
                        if shared.measuring.load(Ordering::Relaxed) {
                            shared.imports_received.fetch_add(
                                (u.upsert.len() + u.remove.len()) as u64,
                                Ordering::Relaxed,
                            );
                        }
                    }
                    _ => {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self { acks, reader }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The next acknowledgement on the stream.
async fn next_ack(inbound: &mut Inbound) -> bool {
    inbound.acks.recv().await.is_some()
}

/// One simulated agent: connect, resync, heartbeat and change until the process ends.
async fn agent(
    id: usize,
    token: String,
    channels: Arc<Vec<Channel>>,
    nnodes: usize,
    shared: Arc<Shared>,
) {
    let mut inventory = nodes(id, nnodes);
    let mut first = true;
    loop {
        let ch = channels[id % channels.len()].clone();
        let mut client = v1::agent_service_client::AgentServiceClient::new(ch);
        let (tx, rx) = mpsc::channel(8);
        let m = |msg| v1::AgentMessage { msg: Some(msg) };
        let _ = tx
            .send(m(v1::agent_message::Msg::Hello(v1::Hello {
                cluster: format!("bench-{id:05}"),
                token: token.clone(),
                agent_version: "bench".into(),
                kubernetes_version: "v1.34.2".into(),
                region: format!("region-{}", id % 10),
                imports: shared.imports,
                imports_by_namespace: shared.imports && !shared.imports_all,
                ..Default::default()
            })))
            .await;
        if shared.imports && !shared.imports_all {
            let _ = tx
                .send(m(v1::agent_message::Msg::ImportNamespaces(
                    v1::ImportNamespaces {
                        names: vec![namespace(id)],
                    },
                )))
                .await;
        }
        let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                tokio::time::sleep(jitter()).await;
                continue;
            }
        };
        let Ok(Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Welcome(w)),
        })) = inbound.message().await
        else {
            tokio::time::sleep(jitter()).await;
            continue;
        };
        let mut inbound = Inbound::start(inbound, shared.clone());
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        let upsert: Vec<v1::NodeInventory> = inventory
            .iter()
            .filter(|n| {
                w.held.get(&n.name).map(Vec::as_slice) != Some(&digest(&n.encode_to_vec())[..])
            })
            .cloned()
            .collect();
        let report = if w.held.is_empty() {
            v1::agent_message::Msg::Snapshot(v1::InventorySnapshot {
                nodes: upsert,
                signals: Some(Default::default()),
            })
        } else {
            v1::agent_message::Msg::Delta(v1::InventoryDelta {
                upsert,
                remove: vec![],
                signals: Some(Default::default()),
            })
        };
        if tx.send(m(report)).await.is_err() || !next_ack(&mut inbound).await {
            continue;
        }
        let mut exported = export(id);
        if shared.exports {
            let snap = m(v1::agent_message::Msg::Exports(v1::ExportsSnapshot {
                exports: vec![exported.clone()],
            }));
            if tx.send(snap).await.is_err() || !next_ack(&mut inbound).await {
                continue;
            }
        }
        if first {
            shared.joined.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let heartbeat = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(100)));
        let mut hb = tokio::time::interval_at(
            tokio::time::Instant::now() + heartbeat.mul_f64(rand::rng().random_range(0.0..1.0)),
            heartbeat,
        );
        let mut change = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(rand::rng().random_range(0..1000)),
            Duration::from_secs(1),
        );
        let mut flip = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_millis(rand::rng().random_range(0..1000)),
            Duration::from_secs(1),
        );
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    let beat = m(v1::agent_message::Msg::Heartbeat(v1::Heartbeat { signals: Some(Default::default()) }));
                    if tx.send(beat).await.is_err() { break; }
                }
                _ = change.tick() => {
                    if rand::rng().random_bool(shared.change_fraction) {
                        let i = rand::rng().random_range(0..inventory.len());
                        let n = &mut inventory[i];
                        n.free_gpus = (n.free_gpus + 7) % 9;
                        n.resources[0].free = n.free_gpus;
                        n.idle_gpus = n.free_gpus;
                        n.resources[0].allocated = 8 - n.free_gpus;
                        let d = m(v1::agent_message::Msg::Delta(v1::InventoryDelta { upsert: vec![n.clone()], remove: vec![], signals: Some(Default::default()) }));
                        let t = Instant::now();
                        if tx.send(d).await.is_err() { break; }
                        if !next_ack(&mut inbound).await { break; }
                        if shared.measuring.load(Ordering::Relaxed) {
                            let _ = shared.latencies.lock().expect("hist").record(t.elapsed().as_micros() as u64);
                        }
                    }
                }
                _ = flip.tick(), if shared.exports => {
                    if rand::rng().random_bool(shared.endpoint_change_fraction) {
                        let e = &mut exported.endpoints[0];
                        e.ready = !e.ready;
                        e.serving = e.ready;
                        let d = m(v1::agent_message::Msg::ExportsDelta(v1::ExportsDelta { upsert: vec![exported.clone()], remove: vec![] }));
                        if tx.send(d).await.is_err() || !next_ack(&mut inbound).await { break; }
                        if shared.measuring.load(Ordering::Relaxed) {
                            shared.endpoint_changes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(jitter()).await;
    }
}

async fn health_counts(port: u16) -> Option<(usize, usize)> {
    let mut c = v1::fleet_service_client::FleetServiceClient::new(channel(port).await.ok()?);
    let l = c
        .list_clusters(v1::ListClustersRequest {})
        .await
        .ok()?
        .into_inner();
    let ready = l
        .clusters
        .iter()
        .filter(|c| c.health == v1::ClusterHealth::Ready as i32)
        .count();
    let unreachable = l
        .clusters
        .iter()
        .filter(|c| c.health == v1::ClusterHealth::Unreachable as i32)
        .count();
    Some((ready, unreachable))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("flotilla-hub");
    anyhow::ensure!(
        exe.exists(),
        "build flotilla-hub first (cargo build --release -p flotilla-hub)"
    );
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("hub");
    let tls = match args.tls {
        true => Some(procs::BenchTls::install(dir.path())?),
        false => None,
    };
    let tls_dir = tls.as_ref().map(|t| t.dir.clone());
    let port = free_port();
    let http = free_port();
    let etcd = match args.store.as_str() {
        "raft" => None,
        "etcd" => Some(start_etcd(&args.etcd_bin, dir.path())?),
        other => anyhow::bail!("--store {other:?}: raft or etcd"),
    };
    let store = match &etcd {
        Some((_, url)) => Store::Etcd(url),
        None => Store::Raft(&data),
    };
    let etcd_pid = etcd.as_ref().map(|(p, _)| p.0.id());
    // etcd takes a moment to serve; the hub exits if it cannot reach it, so retry.
    let mut hub = start_hub(
        &exe,
        &store,
        (port, http),
        args.heartbeat,
        tls_dir.as_deref(),
    );
    let started = Instant::now();
    while tokio::time::timeout(Duration::from_secs(5), wait_leader(http))
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the hub never led"
        );
        if hub.0.try_wait()?.is_some() {
            hub = start_hub(
                &exe,
                &store,
                (port, http),
                args.heartbeat,
                tls_dir.as_deref(),
            );
        }
    }
    println!(
        "machine: {} cores; store {}; hub pid {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.store,
        hub.0.id()
    );

    // Tokens.
    let fleet = v1::fleet_service_client::FleetServiceClient::new(channel(port).await?);
    let t0 = Instant::now();
    let mut tokens = Vec::with_capacity(args.clusters);
    let mut pending = futures::stream::FuturesOrdered::new();
    for i in 0..args.clusters {
        let mut f = fleet.clone();
        pending.push_back(async move {
            f.create_join_token(v1::CreateJoinTokenRequest {
                cluster: format!("bench-{i:05}"),
                ttl_seconds: 3600,
                ..Default::default()
            })
            .await
        });
        if pending.len() >= 64 {
            use futures::StreamExt;
            tokens.push(pending.next().await.expect("pending")?.into_inner().token);
        }
    }
    {
        use futures::StreamExt;
        while let Some(t) = pending.next().await {
            tokens.push(t?.into_inner().token);
        }
    }
    println!(
        "tokens: {} in {:.1} s",
        tokens.len(),
        t0.elapsed().as_secs_f64()
    );

    // Join.
    let mut chans = Vec::new();
    match &tls {
        // Each agent its own identity, so its own connection (made on first use).
        Some(t) => {
            let t0 = Instant::now();
            for i in 0..args.clusters {
                let dial = flotilla_api::grpc::Dial {
                    security: t.cluster(i)?,
                    ..flotilla_api::grpc::Dial::plaintext(Duration::from_secs(10))
                };
                chans.push(flotilla_api::grpc::lazy(
                    &format!("127.0.0.1:{port}"),
                    &dial,
                )?);
            }
            println!(
                "tls: {} cluster certificates in {:.1} s, one connection each",
                args.clusters,
                t0.elapsed().as_secs_f64()
            );
        }
        None => {
            let conns = if args.connections == 0 {
                args.clusters.div_ceil(100).max(1)
            } else {
                args.connections
            };
            for _ in 0..conns {
                chans.push(channel(port).await?);
            }
        }
    }
    let channels = Arc::new(chans);
    let shared = Arc::new(Shared {
        joined: AtomicUsize::new(0),
        sessions: AtomicU64::new(0),
        latencies: std::sync::Mutex::new(hdrhistogram::Histogram::new(3)?),
        change_fraction: args.change_fraction,
        endpoint_change_fraction: args.endpoint_change_fraction,
        exports: args.endpoint_change_fraction > 0.0,
        imports: args.imports,
        imports_all: args.imports_all,
        endpoint_changes: AtomicU64::new(0),
        imports_received: AtomicU64::new(0),
        measuring: std::sync::atomic::AtomicBool::new(false),
    });
    let t_join = Instant::now();
    for (i, t) in tokens.into_iter().enumerate() {
        tokio::spawn(agent(i, t, channels.clone(), args.nodes, shared.clone()));
    }
    while shared.joined.load(Ordering::Relaxed) < args.clusters {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked = t_join.elapsed().as_secs_f64();
    loop {
        if let Some((ready, _)) = health_counts(port).await
            && ready == args.clusters
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "join: {} clusters x {} nodes: all snapshots acknowledged in {:.1} s, all Ready in {:.1} s",
        args.clusters,
        args.nodes,
        acked,
        t_join.elapsed().as_secs_f64()
    );

    // Steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let (cpu0, _) = proc_stat(hub.0.id());
    let etcd_cpu0 = etcd_pid.map_or(0.0, |p| proc_stat(p).0);
    let buckets0 = processing_buckets(http).await;
    let ts = Instant::now();
    // Sampled each second: a snapshot or a compaction shows as a peak, not in the average.
    let mut peak_rss = 0f64;
    let mut etcd_peak_rss = 0f64;
    while ts.elapsed() < Duration::from_secs(args.steady_seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(proc_stat(hub.0.id()).1);
        if let Some(p) = etcd_pid {
            etcd_peak_rss = etcd_peak_rss.max(proc_stat(p).1);
        }
    }
    let (cpu1, rss) = proc_stat(hub.0.id());
    if let Some(p) = etcd_pid {
        let (etcd_cpu1, etcd_rss) = proc_stat(p);
        println!(
            "steady: etcd CPU {:.2} cores, RSS {:.0} MiB (peak {:.0} MiB)",
            (etcd_cpu1 - etcd_cpu0) / ts.elapsed().as_secs_f64(),
            etcd_rss,
            etcd_peak_rss.max(etcd_rss)
        );
    }
    let buckets1 = processing_buckets(http).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let cores = (cpu1 - cpu0) / ts.elapsed().as_secs_f64();
    {
        let h = shared.latencies.lock().expect("hist");
        println!(
            "steady: heartbeat every {:?}, {:.1}% of clusters change per second: hub CPU {:.2} cores, RSS {:.0} MiB (peak {:.0} MiB); delta ack latency p50 {:.2} ms p99 {:.2} ms ({} deltas)",
            args.heartbeat,
            args.change_fraction * 100.0,
            cores,
            rss,
            peak_rss.max(rss),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.len()
        );
        if shared.exports {
            println!(
                "steady: exports: {} services from {} clusters; {:.1}% of clusters flip an endpoint per second: {} endpoint changes in {:.0} s",
                args.clusters.min(1000),
                args.clusters,
                args.endpoint_change_fraction * 100.0,
                shared.endpoint_changes.load(Ordering::Relaxed),
                ts.elapsed().as_secs_f64()
            );
        }
        if shared.imports {
            println!(
                "steady: imports ({}): {:.0} imported-service updates received per second across all agents",
                if shared.imports_all {
                    "every cluster imports every service"
                } else {
                    "each cluster imports the services of its export's namespace"
                },
                shared.imports_received.load(Ordering::Relaxed) as f64 / ts.elapsed().as_secs_f64()
            );
        }
        match p99_bound(&buckets0, &buckets1) {
            Some((le, n)) => println!(
                "steady: hub report processing (validate + store write, {n} reports): p99 <= {:.1} ms (histogram bucket bound)",
                le * 1000.0
            ),
            None => println!("steady: the hub's processing histogram could not be read"),
        }
    }

    // Restart: every agent must reconnect and resync; nobody may be judged Unreachable,
    // including after the new leader's grace period has passed.
    let sessions_before = shared.sessions.load(Ordering::Relaxed);
    drop(hub);
    let t_restart = Instant::now();
    let hub = start_hub(
        &exe,
        &store,
        (port, http),
        args.heartbeat,
        tls_dir.as_deref(),
    );
    wait_leader(http).await;
    let mut worst_unreachable = 0;
    let mut reconnected = None;
    let observe_until = Duration::from_secs(10) + args.heartbeat * 3 + Duration::from_secs(5);
    loop {
        if let Some((_, unreachable)) = health_counts(port).await {
            worst_unreachable = worst_unreachable.max(unreachable);
        }
        if reconnected.is_none()
            && shared.sessions.load(Ordering::Relaxed) >= sessions_before + args.clusters as u64
        {
            reconnected = Some(t_restart.elapsed());
        }
        if reconnected.is_some() && t_restart.elapsed() > observe_until {
            break;
        }
        anyhow::ensure!(
            t_restart.elapsed() < Duration::from_secs(300),
            "agents never all reconnected after the restart"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ready, _) = health_counts(port).await.unwrap_or((0, 0));
    println!(
        "restart: SIGKILL + restart -> all {} agents reconnected and resynced in {:.1} s; {} Ready {:.0} s after the restart; most clusters Unreachable at once: {}",
        args.clusters,
        reconnected.expect("set").as_secs_f64(),
        ready,
        t_restart.elapsed().as_secs_f64(),
        worst_unreachable
    );
    drop(hub);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::p99_bound;

    #[test]
    fn p99_is_the_first_bucket_holding_99_percent_of_the_new_reports() {
        let before = [(0.001, 10), (0.002, 10), (f64::INFINITY, 10)];
        // 200 new reports: 197 under 1 ms, 2 more under 2 ms, 1 slower.
        let after = [(0.001, 207), (0.002, 209), (f64::INFINITY, 210)];
        assert_eq!(p99_bound(&before, &after), Some((0.002, 200)));
        assert_eq!(p99_bound(&[], &[]), None);
    }
}
