//! `flotctl`: the Flotilla command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flotctl::{cluster_json, health_name, inventory_json, parse_memory_mib, table};
use flotilla_api::v1;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Flotilla fleet CLI.
#[derive(Debug, Parser)]
#[command(name = "flotctl", version)]
struct Cli {
    /// Hub gRPC address.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_HUB",
        default_value = "127.0.0.1:7400"
    )]
    hub: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List things.
    Get {
        #[command(subcommand)]
        what: Get,
    },
    /// One cluster in detail: pools, nodes, GPUs, health history.
    Describe {
        #[command(subcommand)]
        what: Describe,
    },
    /// Where can replicas × GPUs run?
    Fit {
        /// GPUs per replica.
        #[arg(long)]
        gpus: u32,
        /// Replicas.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Minimum memory per GPU, e.g. 80Gi, 40960Mi.
        #[arg(long)]
        min_memory: Option<String>,
        /// Product substring, e.g. H100.
        #[arg(long)]
        product: Option<String>,
        /// Architecture family, e.g. hopper.
        #[arg(long)]
        family: Option<String>,
        /// Region.
        #[arg(long)]
        region: Option<String>,
    },
    /// Stream fleet events.
    Watch,
    /// Print the agent install manifest for a cluster, with a new join token.
    Join {
        /// Cluster name (a DNS label).
        cluster: String,
        /// Hub address the agent should use (default: --hub).
        #[arg(long, env = "FLOTILLA_AGENT_HUB")]
        agent_hub: Option<String>,
        /// Token lifetime in seconds (0 = the hub's default, 24 h).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
    },
}

#[derive(Debug, Subcommand)]
enum Get {
    /// Member clusters and their health.
    Clusters,
    /// GPU capacity grouped by product, region, cluster or pool.
    Gpus {
        /// Grouping.
        #[arg(long, value_enum, default_value_t = GroupBy::Product)]
        by: GroupBy,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GroupBy {
    Product,
    Region,
    Cluster,
    Pool,
}

#[derive(Debug, Subcommand)]
enum Describe {
    /// A member cluster.
    Cluster {
        /// Cluster name.
        name: String,
    },
}

fn print(output: Output, v: &Value, table_text: impl FnOnce() -> String) {
    match output {
        Output::Table => print!("{}", table_text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(v).expect("json")),
        Output::Yaml => print!(
            "{}",
            serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# yaml error: {e}\n"))
        ),
    }
}

/// A hub error a person can act on, and its exit code.
fn explain(hub: &str, s: &tonic::Status) -> (String, u8) {
    use tonic::Code;
    let field = s
        .metadata()
        .get("flotilla-field")
        .and_then(|v| v.to_str().ok());
    let msg = match (s.code(), field) {
        (Code::Unavailable, _) => format!(
            "hub {hub} is unavailable ({}); is it running? set --hub or FLOTILLA_HUB",
            s.message()
        ),
        (Code::NotFound, _) => s.message().to_string(),
        (Code::InvalidArgument, Some(f)) => format!("invalid {f}: {}", s.message()),
        _ => format!("{:?}: {}", s.code(), s.message()),
    };
    let code = match s.code() {
        Code::NotFound => 3,
        Code::InvalidArgument => 2,
        Code::Unavailable | Code::DeadlineExceeded => 4,
        _ => 1,
    };
    (msg, code)
}

async fn connect(hub: &str) -> Result<FleetServiceClient<Channel>, (String, u8)> {
    let url = if hub.starts_with("http") {
        hub.to_string()
    } else {
        format!("http://{hub}")
    };
    let ch = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| (format!("--hub {hub}: {e}"), 2))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| {
            (
                format!(
                    "cannot reach the hub at {hub}: {e}; is it running? set --hub or FLOTILLA_HUB"
                ),
                4,
            )
        })?;
    Ok(FleetServiceClient::new(ch))
}

async fn run(cli: Cli) -> Result<(), (String, u8)> {
    let hub = cli.hub.clone();
    let mut c = connect(&hub).await?;
    let err = |s: tonic::Status| explain(&hub, &s);
    match cli.command {
        Command::Get {
            what: Get::Clusters,
        } => {
            let list = c
                .list_clusters(v1::ListClustersRequest {})
                .await
                .map_err(err)?
                .into_inner();
            let v = Value::Array(list.clusters.iter().map(cluster_json).collect());
            print(cli.output, &v, || {
                table(
                    &[
                        "NAME", "HEALTH", "REGION", "K8S", "NODES", "GPUS", "FREE", "REASON",
                    ],
                    list.clusters
                        .iter()
                        .map(|c| {
                            vec![
                                c.name.clone(),
                                health_name(c.health).into(),
                                c.region.clone(),
                                c.kubernetes_version.clone(),
                                c.nodes.to_string(),
                                c.physical_gpus.to_string(),
                                c.free_gpus.to_string(),
                                c.health_reason.clone(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Get {
            what: Get::Gpus { by },
        } => {
            let group_by = match by {
                GroupBy::Product => v1::CapacityGroupBy::Product,
                GroupBy::Region => v1::CapacityGroupBy::Region,
                GroupBy::Cluster => v1::CapacityGroupBy::Cluster,
                GroupBy::Pool => v1::CapacityGroupBy::Pool,
            };
            let cap = c
                .capacity(v1::CapacityRequest {
                    group_by: group_by as i32,
                })
                .await
                .map_err(err)?
                .into_inner();
            let v = Value::Array(
                cap.rows
                    .iter()
                    .map(|r| {
                        json!({"key": r.key, "total": r.gpus_total, "allocatable": r.gpus_allocatable,
                               "allocated": r.gpus_allocated, "free": r.gpus_free,
                               "memory_total_mib": r.memory_total_mib, "memory_free_mib": r.memory_free_mib})
                    })
                    .collect(),
            );
            let key = format!("{by:?}").to_uppercase();
            print(cli.output, &v, || {
                table(
                    &[
                        &key,
                        "TOTAL",
                        "ALLOCATABLE",
                        "ALLOCATED",
                        "FREE",
                        "MEMORY-TOTAL",
                        "MEMORY-FREE",
                    ],
                    cap.rows
                        .iter()
                        .map(|r| {
                            vec![
                                r.key.clone(),
                                r.gpus_total.to_string(),
                                r.gpus_allocatable.to_string(),
                                r.gpus_allocated.to_string(),
                                r.gpus_free.to_string(),
                                format!("{}Gi", r.memory_total_mib / 1024),
                                format!("{}Gi", r.memory_free_mib / 1024),
                            ]
                        })
                        .collect(),
                )
            });
        }
        Command::Describe {
            what: Describe::Cluster { name },
        } => {
            let cl = c
                .get_cluster(v1::GetClusterRequest { name: name.clone() })
                .await
                .map_err(err)?
                .into_inner();
            let inv = c
                .get_inventory(v1::GetInventoryRequest {
                    cluster: name,
                    ..Default::default()
                })
                .await
                .map_err(err)?
                .into_inner();
            let mut v = cluster_json(&cl);
            v["inventory"] = inventory_json(&inv);
            print(cli.output, &v, || flotctl::describe_text(&cl, &inv));
        }
        Command::Fit {
            gpus,
            replicas,
            min_memory,
            product,
            family,
            region,
        } => {
            let min_memory_mib = match &min_memory {
                Some(m) => parse_memory_mib(m).map_err(|e| (format!("--min-memory: {e}"), 2))?,
                None => 0,
            };
            let r = c
                .fit(v1::FitRequest {
                    replicas,
                    gpus_per_replica: gpus,
                    min_memory_mib,
                    product: product.unwrap_or_default(),
                    family: family.unwrap_or_default(),
                    region: region.unwrap_or_default(),
                })
                .await
                .map_err(err)?
                .into_inner();
            let v = json!({
                "candidates": r.candidates.iter().map(|c| json!({"cluster": c.cluster, "pool": c.pool, "product": c.product,
                    "replicas_fit": c.replicas_fit, "free_gpus": c.free_gpus, "headroom_gpus": c.headroom_gpus, "degraded": c.degraded})).collect::<Vec<_>>(),
                "rejections": r.rejections.iter().map(|x| json!({"cluster": x.cluster, "reason": x.reason})).collect::<Vec<_>>(),
            });
            print(cli.output, &v, || {
                let mut out = table(
                    &[
                        "RANK", "CLUSTER", "POOL", "PRODUCT", "FITS", "FREE", "HEADROOM",
                    ],
                    r.candidates
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            vec![
                                (i + 1).to_string(),
                                c.cluster.clone(),
                                c.pool.clone(),
                                c.product.clone(),
                                c.replicas_fit.to_string(),
                                c.free_gpus.to_string(),
                                c.headroom_gpus.to_string(),
                            ]
                        })
                        .collect(),
                );
                if !r.rejections.is_empty() {
                    out.push_str("\nDoes not fit:\n");
                    for x in &r.rejections {
                        out.push_str(&format!("  {}: {}\n", x.cluster, x.reason));
                    }
                }
                out
            });
            if r.candidates.is_empty() {
                return Err(("no cluster can run this request now".into(), 5));
            }
        }
        Command::Watch => {
            let mut s = c
                .watch(v1::WatchFleetRequest {})
                .await
                .map_err(err)?
                .into_inner();
            while let Some(e) = s.next().await {
                let e = e.map_err(err)?;
                let (kind, detail) = match &e.event {
                    Some(v1::fleet_event::Event::Joined(_)) => ("joined", String::new()),
                    Some(v1::fleet_event::Event::Left(_)) => ("left", String::new()),
                    Some(v1::fleet_event::Event::Health(h)) => (
                        "health",
                        format!(
                            "{} -> {}: {}",
                            health_name(h.from),
                            health_name(h.to),
                            h.reason
                        ),
                    ),
                    Some(v1::fleet_event::Event::Inventory(i)) => {
                        ("inventory", format!("{} GPU nodes", i.nodes.len()))
                    }
                    None => ("unknown", String::new()),
                };
                match cli.output {
                    Output::Table => println!("{:<24} {:<10} {}", e.cluster, kind, detail),
                    _ => println!(
                        "{}",
                        json!({"cluster": e.cluster, "event": kind, "detail": detail})
                    ),
                }
            }
        }
        Command::Join {
            cluster,
            agent_hub,
            ttl,
        } => {
            let t = c
                .create_join_token(v1::CreateJoinTokenRequest {
                    cluster: cluster.clone(),
                    ttl_seconds: ttl,
                })
                .await
                .map_err(err)?
                .into_inner();
            let manifest = include_str!("../../deploy/agent.yaml")
                .replace("{{TOKEN}}", &t.token)
                .replace("{{CLUSTER}}", &cluster)
                .replace("{{HUB}}", agent_hub.as_deref().unwrap_or(&hub))
                .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"));
            print!("{manifest}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("flotctl: {msg}");
            ExitCode::from(code)
        }
    }
}
