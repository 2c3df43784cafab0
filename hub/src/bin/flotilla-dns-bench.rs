//! DNS throughput and latency: Flotilla's DNS server (one core, one thread, answering from a
//! routing table of N services × C clusters, a weighted shuffle per query) against NSD serving
//! a static zone with the same records, both on loopback, with `dnsperf` on the other core.
//!
//! ```text
//! cargo build --release -p flotilla-hub
//! ./target/release/flotilla-dns-bench --services 10000 --clusters 5 --seconds 20
//! ```
//!
//! Two runs per server: an open-loop throughput run (dnsperf as fast as it can), and a
//! latency run at a fixed rate with dnsperf's per-query log, from which p50/p99 are taken.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use clap::Parser;
use flotilla_core::export::{Endpoint, Export, Port, Protocol, ServiceKey, ServiceType, aggregate};
use flotilla_core::health::Health;
use flotilla_core::routing::{ClusterState, RoutingPolicy};
use flotilla_core::routing_table::{RoutingTable, TableInputs};

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

#[derive(Parser, Debug)]
#[command(about = "Flotilla DNS against NSD, with dnsperf")]
struct Args {
    /// Services in the table.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Exporting clusters per service (one address each).
    #[arg(long, default_value_t = 5)]
    clusters: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Queries per second of the latency runs.
    #[arg(long, default_value_t = 20_000)]
    latency_qps: u64,
    /// Core the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// Core dnsperf is pinned to.
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Response rate limit of both servers, answers per second per client /24 and name (0:
    /// off); NSD's default and Flotilla's are 200.
    #[arg(long, default_value_t = 200)]
    rate_limit: u32,
    /// Internal: serve Flotilla DNS on this port (the benchmark starts itself this way).
    #[arg(long, hide = true)]
    serve: Option<u16>,
}

fn addr(svc: usize, cluster: usize) -> IpAddr {
    let n = svc * 8 + cluster;
    IpAddr::from([198, 18 + ((n >> 16) & 1) as u8, (n >> 8) as u8, n as u8])
}

fn name(svc: usize) -> (String, String) {
    (format!("ns{}", svc % 100), format!("svc{svc}"))
}

fn table(services: usize, clusters: usize) -> RoutingTable {
    let mut exports = Vec::with_capacity(services * clusters);
    for s in 0..services {
        let (ns, n) = name(s);
        for c in 0..clusters {
            exports.push(Export {
                cluster: format!("c{c}"),
                namespace: ns.clone(),
                name: n.clone(),
                service_type: Some(ServiceType::ClusterSetIp),
                ports: vec![Port {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8000,
                    app_protocol: None,
                }],
                addresses: vec![addr(s, c)],
                endpoints: vec![Endpoint {
                    address: IpAddr::from([10, c as u8, (s >> 8) as u8, s as u8]),
                    hostname: String::new(),
                    zone: String::new(),
                    ready: true,
                    serving: true,
                    terminating: false,
                }],
                created_at_unix_ms: 1,
                ..Export::default()
            });
        }
    }
    let merged: BTreeMap<ServiceKey, _> = aggregate(&exports);
    let states: BTreeMap<String, ClusterState> = (0..clusters)
        .map(|c| {
            let n = format!("c{c}");
            (
                n.clone(),
                ClusterState {
                    name: n,
                    health: Some(Health::Ready),
                    region: format!("r{}", c % 3),
                    ..Default::default()
                },
            )
        })
        .collect();
    let regions: Arc<BTreeMap<String, String>> = Arc::new(
        states
            .values()
            .map(|c| (c.name.clone(), c.region.clone()))
            .collect(),
    );
    RoutingTable::build(
        1,
        TableInputs {
            services: &merged,
            policies: &BTreeMap::new(),
            default_policy: &RoutingPolicy::default(),
            clusters: &states,
            regions: &regions,
            loads: &BTreeMap::new(),
            networks: &Default::default(),
            now_unix_ms: 0,
        },
        None,
    )
}

fn serve(port: u16, services: usize, clusters: usize, rate_limit: u32) -> anyhow::Result<()> {
    // One core, one thread: the runtime the measurement is about.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let t = table(services, clusters);
        let shared = Arc::new(ArcSwap::from_pointee(t));
        let zones = flotilla_dns::Zones::new(None).map_err(anyhow::Error::msg)?;
        let server =
            flotilla_dns::DnsServer::bind(SocketAddr::from(([127, 0, 0, 1], port)), zones, shared)
                .await?
                .with_rate_limit(flotilla_dns::RrlConfig {
                    rate: rate_limit,
                    ..Default::default()
                });
        println!("ready");
        std::io::stdout().flush()?;
        server
            .run(tokio_util::sync::CancellationToken::new())
            .await?;
        Ok(())
    })
}

fn write_inputs(
    dir: &Path,
    services: usize,
    clusters: usize,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let zone = dir.join("clusterset.local.zone");
    let mut z = std::io::BufWriter::new(std::fs::File::create(&zone)?);
    writeln!(z, "$ORIGIN clusterset.local.\n$TTL 5")?;
    writeln!(
        z,
        "@ IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 7200 1800 86400 5"
    )?;
    writeln!(z, "@ IN NS ns.dns.clusterset.local.\nns.dns IN A 127.0.0.1")?;
    writeln!(z, "dns-version IN TXT \"1.0.0\"")?;
    for s in 0..services {
        let (ns, n) = name(s);
        for c in 0..clusters {
            writeln!(z, "{n}.{ns}.svc 5 IN A {}", addr(s, c))?;
        }
    }
    z.flush()?;
    let queries = dir.join("queries.txt");
    let mut q = std::io::BufWriter::new(std::fs::File::create(&queries)?);
    // A fixed pseudo-random order over every service, repeated.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (ns, n) = name((x % services as u64) as usize);
        writeln!(q, "{n}.{ns}.svc.clusterset.local A")?;
    }
    q.flush()?;
    Ok((zone, queries))
}

fn start_nsd(
    dir: &Path,
    zone: &Path,
    port: u16,
    core: usize,
    rate_limit: u32,
) -> anyhow::Result<procs::Procs> {
    let conf = dir.join("nsd.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  server-count: 1\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  rrl-ratelimit: {rate_limit}\nremote-control:\n  control-enable: no\nzone:\n  name: clusterset.local\n  zonefile: \"{z}\"\n",
            d = dir.display(),
            z = zone.display()
        ),
    )?;
    let child = Command::new("taskset")
        .args(["-c", &core.to_string(), "nsd", "-d", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nsd (apt-get install nsd)")?;
    Ok(procs::Procs(vec![child]))
}

fn wait_answering(port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "+short",
                "+tries=1",
                "+time=1",
                "-p",
                &port.to_string(),
                "@127.0.0.1",
                "svc0.ns0.svc.clusterset.local",
            ])
            .output();
        if let Ok(o) = out
            && !o.stdout.is_empty()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the server on port {port} never answered")
}

struct Run {
    qps: f64,
    avg_ms: f64,
    lost: String,
}

fn dnsperf(port: u16, queries: &Path, seconds: u64, core: usize) -> anyhow::Result<Run> {
    let out = Command::new("taskset")
        .args([
            "-c",
            &core.to_string(),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-l",
            &seconds.to_string(),
            "-c",
            "20",
            "-T",
            "1",
            "-q",
            "1000",
            "-d",
        ])
        .arg(queries)
        .output()
        .context("dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    };
    let qps: f64 = field("Queries per second")
        .and_then(|v| v.parse().ok())
        .context(format!("dnsperf output:\n{text}"))?;
    let avg: f64 = field("Average Latency (s)")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Run {
        qps,
        avg_ms: avg * 1e3,
        lost: field("Queries lost").unwrap_or_default(),
    })
}

/// p50 and p99 latency (ms) at a fixed rate, from dnsperf's per-query log.
fn latency(port: u16, queries: &Path, qps: u64, core: usize) -> anyhow::Result<(f64, f64, usize)> {
    let mut child = Command::new("taskset")
        .args([
            "-c",
            &core.to_string(),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-l",
            "5",
            "-c",
            "20",
            "-T",
            "1",
            "-Q",
            &qps.to_string(),
            "-v",
            "-d",
        ])
        .arg(queries)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lat: Vec<f64> = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line?;
        // "> NOERROR svc1.ns1.svc.clusterset.local A 0.000123"
        if let Some(rest) = line.strip_prefix("> ")
            && let Some(v) = rest
                .split_whitespace()
                .last()
                .and_then(|v| v.parse::<f64>().ok())
        {
            lat.push(v * 1e3);
        }
    }
    child.wait()?;
    if lat.is_empty() {
        bail!("dnsperf -v logged no queries");
    }
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Ok((p(0.5), p(0.99), lat.len()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(port) = args.serve {
        return serve(port, args.services, args.clusters, args.rate_limit);
    }
    let dir = tempfile::tempdir()?;
    let (zone, queries) = write_inputs(dir.path(), args.services, args.clusters)?;
    println!(
        "# {} services × {} clusters ({} A records), servers on core {}, dnsperf on core {}, \
         response rate limit {}/s per /24 and name",
        args.services,
        args.clusters,
        args.services * args.clusters,
        args.server_core,
        args.client_core,
        args.rate_limit
    );

    let port = procs::free_port();
    let me = std::env::current_exe()?;
    let mut child = Command::new("taskset")
        .args(["-c", &args.server_core.to_string()])
        .arg(&me)
        .args([
            "--services",
            &args.services.to_string(),
            "--clusters",
            &args.clusters.to_string(),
            "--rate-limit",
            &args.rate_limit.to_string(),
            "--serve",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut ready)?;
    let _flotilla = procs::Procs(vec![child]);
    wait_answering(port)?;
    let f = dnsperf(port, &queries, args.seconds, args.client_core)?;
    let (f50, f99, fn_) = latency(port, &queries, args.latency_qps, args.client_core)?;
    drop(_flotilla);

    let nsd_port = procs::free_port();
    let _nsd = start_nsd(
        dir.path(),
        &zone,
        nsd_port,
        args.server_core,
        args.rate_limit,
    )?;
    wait_answering(nsd_port)?;
    let n = dnsperf(nsd_port, &queries, args.seconds, args.client_core)?;
    let (n50, n99, nn) = latency(nsd_port, &queries, args.latency_qps, args.client_core)?;

    println!(
        "| server | QPS (max) | avg latency at max (ms) | lost | p50 at {} QPS (ms) | p99 (ms) | samples |",
        args.latency_qps
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| Flotilla DNS | {:.0} | {:.3} | {} | {f50:.3} | {f99:.3} | {fn_} |",
        f.qps, f.avg_ms, f.lost
    );
    println!(
        "| NSD {} | {:.0} | {:.3} | {} | {n50:.3} | {n99:.3} | {nn} |",
        nsd_version(),
        n.qps,
        n.avg_ms,
        n.lost
    );
    println!("ratio Flotilla/NSD (max QPS): {:.2}", f.qps / n.qps);
    Ok(())
}

fn nsd_version() -> String {
    Command::new("nsd")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .replace("NSD version ", "")
        })
        .unwrap_or_default()
}
