//! `flotilla-store-bench`: the same write workload against a 3-member Flotilla store and (with
//! the `etcd` feature and an `etcd` binary) a 3-member etcd, both on loopback, in one run.
//!
//! Closed loop at each client count (256-byte values, fsync on), then an open loop at a fixed
//! offered rate for tail latency. Prints writes/s, p50/p99 and the Flotilla/etcd ratios.
//!
//!     cargo run --release -p flotilla-hub --features etcd --bin flotilla-store-bench

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_core::kv::{KvBackend, TxnRequest};
use flotilla_raft_store::client::StoreClient;
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use procs::Procs;

#[derive(Parser, Debug)]
#[command(about = "Write benchmark: Flotilla store vs etcd, 3 members each on loopback")]
struct Args {
    /// Concurrent clients for the closed-loop runs.
    #[arg(
        long,
        env = "BENCH_CLIENTS",
        value_delimiter = ',',
        default_value = "1,16,256"
    )]
    clients: Vec<usize>,
    /// Seconds per closed-loop run.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 10)]
    seconds: u64,
    /// Value size in bytes.
    #[arg(long, env = "BENCH_VALUE_BYTES", default_value_t = 256)]
    value_bytes: usize,
    /// Offered rate (writes/s) of the open-loop latency run (0 = skip).
    #[arg(long, env = "BENCH_RATE", default_value_t = 1000)]
    rate: u64,
    /// The etcd binary (with the `etcd` feature).
    #[arg(long, env = "BENCH_ETCD", default_value = "etcd")]
    etcd: String,
    /// Flotilla members to run (1 or 3; the comparison uses 3).
    #[arg(long, env = "BENCH_MEMBERS", default_value_t = 3)]
    members: usize,
    /// Send every Flotilla write to member 1 (usually the leader) instead of spreading them.
    #[arg(long, env = "BENCH_LEADER_ONLY")]
    leader_only: bool,
    /// Skip etcd even when the feature is built.
    #[arg(long, env = "BENCH_NO_ETCD")]
    no_etcd: bool,
    /// Flotilla with mutual TLS between the members and from the clients (an admin identity
    /// from a CA the benchmark makes).
    #[arg(long, env = "BENCH_TLS")]
    tls: bool,
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Stats {
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl Stats {
    /// Summarizes a run: successful writes per second and latency quantiles (histogram in µs).
    fn of(h: &Histogram<u64>, elapsed: Duration, errors: &std::sync::atomic::AtomicU64) -> Self {
        Stats {
            writes_per_sec: h.len() as f64 / elapsed.as_secs_f64(),
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Something that can take one write.
trait Writer: Clone + Send + Sync + 'static {
    fn put(&self, key: String, value: Vec<u8>) -> impl std::future::Future<Output = bool> + Send;
}

#[derive(Clone)]
struct FlotillaWriter(Vec<StoreClient>);

impl Writer for FlotillaWriter {
    async fn put(&self, key: String, value: Vec<u8>) -> bool {
        // Spread clients over members as etcd's client balances over endpoints.
        let i = key.len() + key.bytes().map(usize::from).sum::<usize>();
        self.0[i % self.0.len()]
            .txn(TxnRequest::put(key, value))
            .await
            .is_ok()
    }
}

async fn closed_loop<W: Writer>(w: W, clients: usize, seconds: u64, value_bytes: usize) -> Stats {
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (w, hist, errors) = (w.clone(), hist.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).expect("histogram");
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if w.put(format!("/bench/{c}/{i}"), vec![b'x'; value_bytes])
                    .await
                {
                    local
                        .record(t.elapsed().as_micros() as u64)
                        .expect("record");
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                i += 1;
            }
            hist.lock().await.add(&local).expect("merge");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    Stats::of(&*hist.lock().await, start.elapsed(), &errors)
}

/// Offers `rate` writes/s for `seconds`; latency counts from the scheduled send time.
async fn open_loop<W: Writer>(w: W, rate: u64, seconds: u64, value_bytes: usize) -> Stats {
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let total = rate * seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(at.into()).await;
        let (w, hist, errors) = (w.clone(), hist.clone(), errors.clone());
        tasks.spawn(async move {
            if w.put(format!("/open/{i}"), vec![b'x'; value_bytes]).await {
                hist.lock()
                    .await
                    .record(at.elapsed().as_micros() as u64)
                    .expect("record");
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Stats::of(&*hist.lock().await, start.elapsed(), &errors)
}

async fn start_flotilla(dir: &Path, members: usize) -> anyhow::Result<(Procs, Vec<String>)> {
    let (procs, ports, _) = procs::start_members(dir, members).await?;
    Ok((
        procs,
        ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
    ))
}

#[cfg(feature = "etcd")]
mod etcd {
    use std::process::{Command, Stdio};

    use anyhow::Context;

    use super::procs::{free_port, wait_for};
    use super::*;

    #[derive(Clone)]
    pub struct EtcdWriter(pub etcd_client::Client);

    impl Writer for EtcdWriter {
        async fn put(&self, key: String, value: Vec<u8>) -> bool {
            let mut c = self.0.clone();
            c.put(key, value, None).await.is_ok()
        }
    }

    pub async fn start(bin: &str, dir: &Path) -> anyhow::Result<(Procs, Vec<String>)> {
        let client_ports = [free_port(), free_port(), free_port()];
        let peer_ports = [free_port(), free_port(), free_port()];
        let cluster = (0..3)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peer_ports[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Procs(Vec::new());
        for i in 0..3 {
            let c = format!("http://127.0.0.1:{}", client_ports[i]);
            let p = format!("http://127.0.0.1:{}", peer_ports[i]);
            let child = Command::new(bin)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-{i}")))
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args([
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                ])
                .args([
                    "--initial-cluster-token",
                    "flotilla-bench",
                    "--log-level",
                    "error",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("spawn {bin}"))?;
            procs.0.push(child);
        }
        let eps: Vec<String> = client_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        wait_for("etcd cluster", || async {
            match etcd_client::Client::connect(&eps, None).await {
                Ok(mut c) => c.put("/ready", "1", None).await.is_ok(),
                Err(_) => false,
            }
        })
        .await?;
        Ok((procs, eps))
    }
}

fn line(system: &str, what: &str, s: &Stats) {
    println!(
        "| {system} | {what} | {:.0} | {:.2} | {:.2} | {} |",
        s.writes_per_sec, s.p50_ms, s.p99_ms, s.errors
    );
}

/// Runs every closed-loop client count, then the open loop, printing and recording each.
async fn run_workloads<W: Writer>(
    system: &str,
    w: W,
    args: &Args,
    results: &mut Vec<(String, String, Stats)>,
) {
    for &n in &args.clients {
        let s = closed_loop(w.clone(), n, args.seconds, args.value_bytes).await;
        line(system, &format!("{n} clients"), &s);
        results.push((system.into(), format!("{n} clients"), s));
    }
    if args.rate > 0 {
        let s = open_loop(w.clone(), args.rate, args.seconds, args.value_bytes).await;
        line(system, &format!("open loop {}/s", args.rate), &s);
        results.push((system.into(), format!("open loop {}/s", args.rate), s));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-")
        .tempdir()?;
    println!(
        "machine: {} cores; values {} bytes; {} s per run",
        std::thread::available_parallelism()?.get(),
        args.value_bytes,
        args.seconds
    );
    println!("| system | workload | writes/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|");

    let mut results: Vec<(String, String, Stats)> = Vec::new();
    if args.tls {
        procs::BenchTls::install(dir.path())?;
    }
    {
        let (_procs, eps) = start_flotilla(dir.path(), args.members).await?;
        let spread = if args.leader_only { 1 } else { eps.len() };
        let clients = (0..spread)
            .map(|i| {
                let mut e = eps.clone();
                e.rotate_left(i);
                let dial = flotilla_api::grpc::Dial {
                    security: procs::security(),
                    ..flotilla_api::grpc::Dial::plaintext(Duration::from_secs(1))
                };
                StoreClient::with_dial(&e, &dial).map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name = if args.tls {
            "flotilla (mTLS)"
        } else {
            "flotilla"
        };
        run_workloads(name, FlotillaWriter(clients), &args, &mut results).await;
    }

    #[cfg(feature = "etcd")]
    if !args.no_etcd {
        let (_procs, eps) = etcd::start(&args.etcd, dir.path()).await?;
        let w = etcd::EtcdWriter(etcd_client::Client::connect(&eps, None).await?);
        run_workloads("etcd", w, &args, &mut results).await;
        println!();
        println!("| workload | flotilla/etcd writes/s | flotilla/etcd p99 |");
        println!("|---|---|---|");
        for (sys, what, f) in &results {
            if !sys.starts_with("flotilla") {
                continue;
            }
            if let Some((_, _, e)) = results.iter().find(|(s, w, _)| s == "etcd" && w == what) {
                println!(
                    "| {what} | {:.2} | {:.2} |",
                    f.writes_per_sec / e.writes_per_sec,
                    f.p99_ms / e.p99_ms
                );
            }
        }
    }
    #[cfg(not(feature = "etcd"))]
    println!(
        "\netcd comparison not built: rebuild with --features etcd (needs protoc) and an etcd binary"
    );
    Ok(())
}
