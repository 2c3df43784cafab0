//! `flotilla-dns`: standalone DNS for `clusterset.local` (and a global zone), fed by a hub's
//! `WatchRoutes`, to run beside a cluster's CoreDNS with a forward of `clusterset.local`.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Command-line flags (every flag also reads an environment variable).
#[derive(Debug, Parser)]
#[command(
    name = "flotilla-dns",
    version,
    about = "Flotilla DNS, following a hub's routes"
)]
struct Args {
    /// Hub gRPC address (any replica).
    #[arg(long, env = "FLOTILLA_HUB", default_value = "127.0.0.1:7400")]
    hub: String,
    /// DNS listen address, UDP and TCP.
    #[arg(long, env = "FLOTILLA_DNS_LISTEN", default_value = "127.0.0.1:7453")]
    listen: SocketAddr,
    /// A global zone served besides clusterset.local (`<svc>.<ns>.<zone>`).
    #[arg(long, env = "FLOTILLA_GLOBAL_ZONE")]
    global_zone: Option<String>,
    /// The cluster this server runs in: answers are the ones its clients get (local-first
    /// policies answer this cluster, then its region, first). Without it, the answers for a
    /// client of unknown location.
    #[arg(long, env = "FLOTILLA_CLUSTER")]
    cluster: Option<String>,
    /// UDP answers per second per client /24 (IPv4) or /56 (IPv6) and name; over it, every
    /// `--slip`-th answer is an empty truncated one and the rest are dropped (0: off).
    #[arg(long, env = "FLOTILLA_DNS_RATE_LIMIT", default_value_t = 200)]
    rate_limit: u32,
    /// Every this many rate-limited answers, one is sent truncated (0: never).
    #[arg(long, env = "FLOTILLA_DNS_SLIP", default_value_t = 2)]
    slip: u32,
    /// The fleet CA (PEM) the hub's certificate is checked against; turns TLS on.
    #[arg(long, env = "FLOTILLA_CA")]
    ca: Option<std::path::PathBuf>,
    /// This server's client certificate (PEM; a viewer identity: `flotctl ca issue --role viewer`).
    #[arg(long, env = "FLOTILLA_CERT")]
    cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "FLOTILLA_KEY")]
    key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            flotilla_dns::log_filter(std::env::var("RUST_LOG").ok().as_deref(), "info"),
        ))
        .init();
    let args = Args::parse();
    let security = flotilla_api::grpc::Security::from_files(
        args.ca.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let zones =
        flotilla_dns::Zones::new(args.global_zone.as_deref()).map_err(anyhow::Error::msg)?;
    let table = flotilla_dns::follow::empty_table();
    let server = flotilla_dns::DnsServer::bind(args.listen, zones, table.clone())
        .await
        .with_context(|| format!("--listen {}", args.listen))?
        .with_rate_limit(flotilla_dns::RrlConfig {
            rate: args.rate_limit,
            slip: args.slip,
            ..Default::default()
        });
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    tokio::spawn(flotilla_dns::follow::follow(
        args.hub.clone(),
        args.cluster.clone(),
        security,
        table,
        shutdown.clone(),
    ));
    tracing::info!(listen = %server.local_addr(), hub = %args.hub, cluster = ?args.cluster, "flotilla-dns following the hub's routes");
    server.run(shutdown).await?;
    Ok(())
}
