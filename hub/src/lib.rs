//! The Flotilla hub: one member of the replicated fleet store and the fleet's control plane.
//!
//! - `server`: the one gRPC server (store, fleet, health, reflection on one port).
//! - `store`: the schema, typed records, and the replica's mirror of the store.
//! - `fleet`: agent streams, the fleet view and the read API.
//! - `discovery`: exports, the routing table, DNS and the discovery API.
//! - `campaigns`: fleet upgrade campaigns (the leader's controller, records, API).
//! - `controllers`: leader-only work (health, inference loads, campaigns).
//! - `metrics`, `http`: Prometheus metrics and `/metrics`, `/healthz`, `/readyz`.
//! - `logging`: the log subscriber (openraft's per-request errors rate-limited).
//! - `dev` (feature `dev`): the simulated development fleet of `--dev`.

pub mod campaigns;
pub mod controllers;
#[cfg(feature = "dev")]
pub mod dev;
pub mod discovery;
pub mod fleet;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod security;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flotilla_core::kv::Limits;
use flotilla_raft_store::{NodeConfig, StoreNode, Tuning};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::controllers::{Controller, run_while_leader};
use crate::store::backend::HubStore;
use crate::store::mirror::StoreMirror;

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
    /// Raft heartbeat interval in milliseconds. A follower that hears nothing campaigns after
    /// 9–12 heartbeats (openraft waits the longest election timeout, 6 heartbeats, as a leader
    /// lease, then a random 3–6 more).
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
    /// Also export per-node GPU series on /metrics (one series per node and figure: mind
    /// the cardinality on a large fleet).
    #[arg(long, env = "FLOTILLA_METRICS_PER_NODE")]
    pub metrics_per_node: bool,
    /// Most nodes one cluster may report.
    #[arg(long, env = "FLOTILLA_MAX_REPORT_NODES", default_value_t = 5_000)]
    pub max_report_nodes: usize,
    /// Page cache of the store's state file, in MiB (the log file gets a quarter of this).
    #[arg(long, env = "FLOTILLA_STORE_CACHE_MIB", default_value_t = 128)]
    pub store_cache_mib: usize,
    /// Messages per second one agent may send on its stream (bursts of four times as many); a
    /// flooding agent's stream is closed with RESOURCE_EXHAUSTED and the others are unaffected.
    #[arg(long, env = "FLOTILLA_AGENT_MESSAGE_RATE", default_value_t = 50)]
    pub agent_message_rate: u32,
    /// Agents admitted to the join handshake (hello to first acknowledged report) at once;
    /// the rest wait their turn, so a reconnect storm queues instead of timing out.
    #[arg(long, env = "FLOTILLA_MAX_CONCURRENT_JOINS", default_value_t = 256)]
    pub max_concurrent_joins: usize,
    /// Where the fleet state lives: `raft` (embedded, replicated by the hubs) or `etcd` (an
    /// existing etcd; needs a hub built with the `etcd` feature).
    #[arg(long, env = "FLOTILLA_STORE", value_enum, default_value_t = StoreKind::Raft)]
    pub store: StoreKind,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(
        long,
        env = "FLOTILLA_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// The CA (PEM) etcd's serving certificate is checked against, for `https://` endpoints
    /// (with --store etcd).
    #[arg(long, env = "FLOTILLA_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// The hub's client certificate (PEM) for an etcd with `--client-cert-auth`.
    #[arg(long, env = "FLOTILLA_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FLOTILLA_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Key prefix of this fleet in etcd (with --store etcd).
    #[arg(long, env = "FLOTILLA_ETCD_PREFIX", default_value = "/flotilla/")]
    pub etcd_prefix: String,
    /// TTL of the etcd leadership lease: a dead leader's controllers move after at most this.
    #[arg(long, env = "FLOTILLA_ETCD_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    pub etcd_lease_ttl: Duration,
    /// Serve DNS (`clusterset.local` and the global zone) on this address, UDP and TCP.
    /// Default: off, except with --dev (127.0.0.1:7453, or a free port when --listen's is 0).
    #[arg(long, env = "FLOTILLA_DNS")]
    pub dns: Option<SocketAddr>,
    /// Serve and dial without TLS, and let every caller do anything. Only on a network where
    /// everything that can reach the hub is trusted; the hub warns at every start.
    #[arg(long, env = "FLOTILLA_INSECURE")]
    pub insecure: bool,
    /// Directory with the fleet CA, `ca.crt` and `ca.key` (made by `flotctl ca init`, the same
    /// on every replica). Default: `<data-dir>/tls`. Changes are picked up without a restart.
    #[arg(long, env = "FLOTILLA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The fleet's name: the trust domain every certificate names (`spiffe://<fleet>/...`).
    /// Default: the name `flotctl ca init` wrote beside the CA (`<tls-dir>/fleet`), else
    /// `flotilla`.
    #[arg(long, env = "FLOTILLA_FLEET")]
    pub fleet: Option<String>,
    /// Lifetime of the certificates the hub signs for agents and itself (agents renew at a
    /// jittered 60-90% of it).
    #[arg(long, env = "FLOTILLA_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// More names (DNS names or IP addresses) the hub's own certificate is valid for,
    /// comma-separated (the --advertise host, localhost and 127.0.0.1 always are).
    #[arg(long, env = "FLOTILLA_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// A file holding a bearer token Prometheus may scrape /metrics with instead of a client
    /// certificate (with TLS; the hub keeps only its hash).
    #[arg(long, env = "FLOTILLA_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// How long audit records are kept (e.g. 30d, 720h).
    #[arg(long, env = "FLOTILLA_AUDIT_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub audit_retention: Duration,
    /// DNS answers per second per client /24 (IPv4) or /56 (IPv6) and name over UDP; over it,
    /// every --dns-slip-th answer is an empty truncated one and the rest are dropped, so the
    /// hub amplifies no spoofed flood (0: off).
    #[arg(long, env = "FLOTILLA_DNS_RATE_LIMIT", default_value_t = 200)]
    pub dns_rate_limit: u32,
    /// Every this many rate-limited DNS answers, one is sent truncated (0: never).
    #[arg(long, env = "FLOTILLA_DNS_SLIP", default_value_t = 2)]
    pub dns_slip: u32,
    /// A global DNS zone for clients outside the clusters: `<svc>.<ns>.<zone>` (e.g.
    /// fleet.example.com, delegated to the hubs).
    #[arg(long, env = "FLOTILLA_GLOBAL_ZONE")]
    pub global_zone: Option<String>,
}

/// The DNS address in force: `--dns`, or with `--dev` the dev default.
fn dns_addr(args: &Args) -> Option<SocketAddr> {
    match (args.dns, args.dev) {
        (Some(a), _) => Some(a),
        (None, true) if args.listen.port() == 0 => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        (None, true) => Some(SocketAddr::from(([127, 0, 0, 1], 7453))),
        (None, false) => None,
    }
}

/// Which store holds the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded Raft store.
    Raft,
    /// An external etcd.
    Etcd,
}

/// Parse `3s`, `1500ms`, `2m`, `1h` or a bare number of seconds.
pub use flotilla_core::duration::parse as parse_duration;

/// A started hub.
pub struct RunningHub {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound DNS address (UDP and TCP), if DNS is served.
    pub dns_addr: Option<SocketAddr>,
    /// The store.
    pub store: HubStore,
    /// The fleet's shared parts.
    pub fleet: fleet::Fleet,
    /// The data directory.
    pub data_dir: PathBuf,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
    #[cfg(feature = "dev")]
    dev: Option<dev::DevFleet>,
    _temp: Option<tempfile::TempDir>,
}

impl RunningHub {
    /// Resolves once `shutdown` has stopped the server and every task, and Raft is down.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.server.await;
        for t in self.tasks {
            let _ = t.await;
        }
        #[cfg(feature = "dev")]
        if let Some(d) = self.dev {
            d.shutdown().await;
        }
        self.store.shutdown().await?;
        served??;
        Ok(())
    }
}

/// Runs the hub until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(args, shutdown).await?.wait().await
}

/// Starts the hub: the store (a Raft member, or a connection to etcd), the one gRPC server,
/// the store mirror, the leader's controllers, HTTP, and with `--dev` the simulated fleet.
pub async fn start(args: Args, shutdown: CancellationToken) -> anyhow::Result<RunningHub> {
    if args.dev && !cfg!(feature = "dev") {
        anyhow::bail!("--dev: this hub was built without the `dev` feature");
    }
    check_liveness_flags(args.agent_heartbeat, args.unreachable_after)?;
    let zones =
        flotilla_dns::Zones::new(args.global_zone.as_deref()).map_err(anyhow::Error::msg)?;
    // Keep a temporary directory alive for the whole run in --dev mode (on etcd it holds
    // only the dev fleet's kubeconfigs).
    let mut temp = None;
    let data_dir = match (&args.data_dir, args.dev, args.store) {
        (Some(d), _, _) => d.clone(),
        (None, true, _) | (None, false, StoreKind::Etcd) => {
            let t = tempfile::Builder::new().prefix("flotilla-dev-").tempdir()?;
            let p = t.path().to_path_buf();
            temp = Some(t);
            p
        }
        (None, false, StoreKind::Raft) => {
            anyhow::bail!("--data-dir (FLOTILLA_DATA_DIR) is required unless --dev is given")
        }
    };
    let tls = security_mode(&args, &data_dir)?;
    let fleet = fleet::Fleet::new(fleet::FleetConfig {
        policy: flotilla_core::health::Policy {
            unreachable_after: args.unreachable_after,
            leader_grace: args.leader_grace,
        },
        heartbeat: args.agent_heartbeat,
        limits: flotilla_api::convert::fleet::ReportLimits {
            max_nodes: args.max_report_nodes,
            ..Default::default()
        },
        max_concurrent_joins: args.max_concurrent_joins,
        metrics_per_node: args.metrics_per_node,
        message_rate: args.agent_message_rate,
    });
    let fleet = match &tls {
        Some(t) => fleet.with_tls(t.clone()),
        None => fleet,
    };
    let limits = Limits {
        max_key_bytes: args.max_key_bytes,
        max_value_bytes: args.max_value_bytes,
        ..Limits::default()
    };
    let (store, addr, server, store_desc) = match args.store {
        StoreKind::Raft => open_raft(&args, &data_dir, limits, &fleet, &shutdown).await?,
        StoreKind::Etcd => open_etcd(&args, limits, &fleet, &shutdown).await?,
    };

    // The view first: discovery reads cluster records when it decides.
    let mirror = StoreMirror::new(vec![
        fleet.view.clone(),
        fleet.discovery.clone(),
        fleet.security.revocations.clone(),
        fleet.security.api_tokens.clone(),
    ]);
    let mut tasks = vec![tokio::spawn(
        mirror
            .run(store.clone(), shutdown.clone())
            .instrument(info_span!("store-mirror")),
    )];
    let queue = fleet
        .security
        .audit_queue
        .lock()
        .expect("audit queue")
        .take();
    if let Some(queue) = queue {
        tasks.push(tokio::spawn(
            security::audit::run_writer(store.clone(), queue, shutdown.clone())
                .instrument(info_span!("audit-writer")),
        ));
    }
    if let Some(t) = &tls {
        tasks.push(tokio::spawn(
            t.clone()
                .maintain(shutdown.clone())
                .instrument(info_span!("tls")),
        ));
    }
    tasks.push(tokio::spawn(
        fleet
            .discovery
            .clone()
            .run(shutdown.clone())
            .instrument(info_span!("routing-table")),
    ));
    tasks.push(tokio::spawn(
        fleet
            .discovery
            .clone()
            .batch_imports(shutdown.clone())
            .instrument(info_span!("import-batches")),
    ));
    let dns_addr = match dns_addr(&args) {
        None => None,
        Some(a) => {
            let server = flotilla_dns::DnsServer::bind(a, zones, fleet.discovery.table())
                .await
                .with_context(|| format!("--dns {a}"))?
                .with_rate_limit(flotilla_dns::RrlConfig {
                    rate: args.dns_rate_limit,
                    slip: args.dns_slip,
                    ..Default::default()
                });
            let bound = server.local_addr();
            let s = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server.run(s).await {
                    tracing::error!(error = %e, "DNS stopped");
                }
            }));
            info!(addr = %bound, "DNS for clusterset.local on UDP and TCP");
            Some(bound)
        }
    };
    let controllers: Vec<Arc<dyn Controller>> = vec![
        Arc::new(fleet.health_controller(store.clone())),
        Arc::new(discovery::loads::LoadController {
            discovery: fleet.discovery.clone(),
            backend: store.clone(),
        }),
        Arc::new(fleet.campaign_controller(store.clone())),
        Arc::new(security::audit::TrimController {
            backend: store.clone(),
            clock: fleet.health.clock_arc(),
            retention: args.audit_retention,
        }),
    ];
    tasks.push(tokio::spawn(
        run_while_leader(
            Arc::new(store.clone()),
            controllers,
            fleet.tick(),
            shutdown.clone(),
        )
        .instrument(info_span!("controllers")),
    ));

    let http_listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("--http {}", args.http))?;
    let http_addr = http_listener.local_addr()?;
    let probe = Arc::new(http::HubProbe {
        metrics: fleet.metrics.clone(),
        view: fleet.view.clone(),
        store: store.clone(),
    });
    let metrics_auth = flotilla_api::http::MetricsAuth {
        token_sha256: match &args.metrics_token_file {
            Some(f) => {
                use sha2::Digest;
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("--metrics-token-file {}", f.display()))?;
                Some(flotilla_core::security::hex(&sha2::Sha256::digest(
                    t.trim().as_bytes(),
                )))
            }
            None => None,
        },
    };
    tasks.push(tokio::spawn(
        flotilla_api::http::serve_tls(
            http_listener,
            probe,
            tls.as_ref().map(|t| t.http.clone()),
            metrics_auth,
            shutdown.clone(),
        )
        .instrument(info_span!("hub-http")),
    ));
    info!(addr = %http_addr, "metrics and health on HTTP");
    info!(addr = %addr, store = %store_desc, "flotilla-hub ready");

    #[cfg(feature = "dev")]
    if args.dev {
        // The dev agents connect at once; on etcd the election may still be under way, and an
        // agent that meets a follower only bounces off it. Wait a moment for it.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !controllers::Leadership::is_leader(&store) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    #[cfg(feature = "dev")]
    let dev = match args.dev {
        true => Some(
            dev::start(
                &store,
                &store_desc,
                args.dev_scenario.as_deref(),
                &data_dir,
                (addr, http_addr, dns_addr),
                tls.as_deref(),
                &shutdown,
            )
            .await?,
        ),
        false => None,
    };
    Ok(RunningHub {
        addr,
        http_addr,
        dns_addr,
        store,
        fleet,
        data_dir,
        server,
        tasks,
        #[cfg(feature = "dev")]
        dev,
        _temp: temp,
    })
}

/// The hub's TLS: none with `--insecure` (warned) or `--dev` without a CA (plaintext on
/// loopback, said so); otherwise the fleet CA from `--tls-dir`, which must exist.
fn security_mode(
    args: &Args,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<Arc<security::HubTls>>> {
    let dir = args.tls_dir.clone().unwrap_or_else(|| data_dir.join("tls"));
    if args.insecure {
        tracing::warn!(
            "--insecure: no TLS, and every caller may do anything (read the fleet, drain its \
             nodes, steer its traffic); use it only where everything that can reach this hub \
             is trusted"
        );
        return Ok(None);
    }
    if args.dev && args.tls_dir.is_none() {
        info!(
            "--dev: plaintext on loopback, every caller allowed (give --tls-dir to try TLS; \
             docs/security.md)"
        );
        return Ok(None);
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Some(a) = &args.advertise {
        let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
        names.push(host.trim_matches(['[', ']']).to_string());
    }
    if !args.listen.ip().is_unspecified() {
        names.push(args.listen.ip().to_string());
    }
    names.extend(args.tls_san.iter().cloned());
    names.sort();
    names.dedup();
    let written = std::fs::read_to_string(dir.join("fleet"))
        .ok()
        .map(|f| f.trim().to_string());
    let fleet = match (&args.fleet, written) {
        (Some(f), Some(w)) if *f != w => anyhow::bail!(
            "--fleet {f:?}, but the CA in {} was made for fleet {w:?}",
            dir.display()
        ),
        (Some(f), _) => f.clone(),
        (None, Some(w)) => w,
        (None, None) => "flotilla".to_string(),
    };
    let tls = security::HubTls::load(
        &dir,
        &fleet,
        &args.node_id.to_string(),
        names,
        args.cert_ttl,
    )?;
    info!(%fleet, ca = %format!("sha256:{}", tls.pin()), "TLS on, every caller authenticated");
    Ok(Some(tls))
}

/// Refuses an agent heartbeat that is not well below the Unreachable threshold: with less
/// than two heartbeats per window, one late heartbeat makes a live cluster Unreachable.
pub fn check_liveness_flags(
    heartbeat: Duration,
    unreachable_after: Duration,
) -> anyhow::Result<()> {
    if heartbeat.is_zero() || heartbeat * 2 > unreachable_after {
        anyhow::bail!(
            "--agent-heartbeat {heartbeat:?} must be more than zero and at most half of \
             --unreachable-after {unreachable_after:?}: with fewer than two heartbeats in that \
             window, one late heartbeat makes a live cluster Unreachable"
        );
    }
    Ok(())
}

/// What opening a store gives the hub: the store, the bound gRPC address, the running
/// server, and a description for people.
type Opened = (
    HubStore,
    SocketAddr,
    JoinHandle<Result<(), tonic::transport::Error>>,
    String,
);

/// Binds the gRPC listener.
async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}"))
}

/// Opens this replica's Raft member, serves it with the fleet services, and bootstraps or
/// joins.
async fn open_raft(
    args: &Args,
    data_dir: &std::path::Path,
    limits: Limits,
    fleet: &fleet::Fleet,
    shutdown: &CancellationToken,
) -> anyhow::Result<Opened> {
    let heartbeat = Duration::from_millis(args.heartbeat_ms.max(10));
    let mut config = NodeConfig::new(args.node_id, data_dir, args.listen);
    config.advertise = args.advertise.clone();
    config.join = args.join.clone();
    if let Some(tls) = &fleet.security.tls {
        config.transport = Arc::new(flotilla_raft_store::DialTransport {
            dial: flotilla_api::grpc::Dial {
                security: flotilla_api::grpc::Security::Tls(tls.client.clone()),
                ..flotilla_api::grpc::Dial::plaintext(Duration::from_secs(1))
            },
        });
    }
    config.tuning = Tuning {
        heartbeat,
        // openraft adds the longest timeout as a leader lease before a follower campaigns, so
        // failover takes max + rand(min, max): 0.9-1.2 s at the default 100 ms (decision 0013).
        election_timeout_min: heartbeat * 3,
        election_timeout_max: heartbeat * 6,
        history_revisions: args.history_revisions,
        snapshot_after_logs: args.snapshot_after_logs,
        cache: flotilla_raft_store::data_dir::CacheSizes {
            log_bytes: (args.store_cache_mib << 20) / 4,
            sm_bytes: args.store_cache_mib << 20,
        },
        ..Tuning::default()
    };
    config.limits = limits;
    // The port is bound only once the member has opened (a restart re-applies its log first):
    // until then clients are refused and try another member, rather than wait on a port that
    // accepts but does not answer. Port 0 has to be bound first to learn the address.
    let early = match args.listen.port() {
        0 => Some(bind(args.listen).await?),
        _ => None,
    };
    let addr = match &early {
        Some(l) => l.local_addr()?,
        None => args.listen,
    };
    let open = StoreNode::open(config, addr, shutdown.clone()).await?;
    let listener = match early {
        Some(l) => l,
        None => bind(args.listen).await?,
    };
    let node = open.node().clone();
    let store = HubStore::Raft(node.clone());
    let routes = server::routes(node.services(shutdown.clone()).routes(), fleet, &store);
    let server = tokio::spawn(
        server::serve(listener, routes, fleet.clone(), shutdown.clone())
            .instrument(info_span!("hub-grpc", node = args.node_id)),
    );
    info!(node = args.node_id, addr = %node.addr(), "store member listening");
    if let Err(e) = open.bootstrap_or_join().await {
        shutdown.cancel();
        return Err(e.into());
    }
    let desc = format!(
        "the Raft store (member {}, data in {})",
        args.node_id,
        data_dir.display()
    );
    Ok((store, addr, server, desc))
}

/// Connects to etcd, joins the leadership election, and serves the fleet services.
#[cfg(feature = "etcd")]
async fn open_etcd(
    args: &Args,
    limits: Limits,
    fleet: &fleet::Fleet,
    shutdown: &CancellationToken,
) -> anyhow::Result<Opened> {
    use crate::store::etcd::{EtcdConfig, EtcdKv, EtcdLeadership};
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("{flag} {}", p.display()))
    };
    let tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => Some(crate::store::etcd::EtcdTls {
            ca_pem: read("--etcd-ca", ca)?,
            identity: match (cert, key) {
                (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                _ => None,
            },
        }),
        (None, _, _) => anyhow::bail!(
            "--etcd-cert needs --etcd-ca: the CA etcd's certificate is checked against"
        ),
    };
    let config = EtcdConfig {
        prefix: args.etcd_prefix.clone(),
        lease_ttl: args.etcd_lease_ttl,
        tls,
        ..EtcdConfig::new(args.etcd_endpoints.clone())
    };
    let kv = EtcdKv::connect(&config, limits)
        .await
        .context("--etcd-endpoints")?;
    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let advertise = args.advertise.clone().unwrap_or_else(|| addr.to_string());
    let leadership = EtcdLeadership::start(&config, advertise, shutdown.clone())
        .await
        .context("--etcd-endpoints")?;
    let store = HubStore::Etcd(Box::new(kv), leadership);
    let kv = tonic::service::Routes::default().add_service(
        crate::store::kv_service::BackendKv::new(store.clone(), shutdown.clone()),
    );
    let routes = server::routes(kv, fleet, &store);
    let server = tokio::spawn(
        server::serve(listener, routes, fleet.clone(), shutdown.clone())
            .instrument(info_span!("hub-grpc")),
    );
    let desc = format!(
        "etcd {} under {}",
        args.etcd_endpoints.join(","),
        args.etcd_prefix
    );
    Ok((store, addr, server, desc))
}

/// Without the `etcd` feature, `--store etcd` is refused with what to do instead.
#[cfg(not(feature = "etcd"))]
async fn open_etcd(
    _: &Args,
    _: Limits,
    _: &fleet::Fleet,
    _: &CancellationToken,
) -> anyhow::Result<Opened> {
    anyhow::bail!(
        "--store etcd: this hub was built without the `etcd` feature \
         (cargo build --release -p flotilla-hub --features etcd; it needs protoc)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_heartbeat_must_be_well_below_the_unreachable_threshold() {
        let s = Duration::from_secs;
        check_liveness_flags(s(1), s(3)).unwrap();
        check_liveness_flags(Duration::from_millis(1500), s(3)).unwrap();
        let e = check_liveness_flags(s(2), s(3)).unwrap_err().to_string();
        assert!(
            e.contains("--agent-heartbeat") && e.contains("--unreachable-after"),
            "{e}"
        );
        check_liveness_flags(Duration::ZERO, s(3)).unwrap_err();
    }
}
