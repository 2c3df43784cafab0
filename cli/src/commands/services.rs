//! Discovery commands: `get services`, `describe service`, `resolve`, `explain route`,
//! `policy set|get|delete` and `routes export`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use flotilla_api::v1;
use flotilla_api::v1::discovery_service_client::DiscoveryServiceClient;
use serde_json::{Value, json};

use super::{Ctx, Failure};
use crate::table;

/// A service named `name.namespace` (as in DNS) or `namespace/name`.
pub fn parse_service(s: &str) -> Result<(String, String), Failure> {
    let (ns, name) = match (s.split_once('/'), s.split_once('.')) {
        (Some((ns, name)), _) => (ns, name),
        (None, Some((name, ns))) => (ns, name),
        _ => {
            return Err((
                format!(
                    "SERVICE {s:?}: write it as name.namespace (llama-70b.inference) or namespace/name"
                ),
                2,
            ));
        }
    };
    if ns.is_empty() || name.is_empty() || name.contains('.') || ns.contains('.') {
        return Err((
            format!("SERVICE {s:?}: write it as name.namespace or namespace/name"),
            2,
        ));
    }
    Ok((ns.to_string(), name.to_string()))
}

fn client(ctx: &Ctx) -> DiscoveryServiceClient<tonic::transport::Channel> {
    DiscoveryServiceClient::new(ctx.channel.clone())
}

fn type_name(t: i32) -> &'static str {
    match v1::ServiceType::try_from(t) {
        Ok(v1::ServiceType::ClusterSetIp) => "ClusterSetIP",
        Ok(v1::ServiceType::Headless) => "Headless",
        _ => "-",
    }
}

fn ports_text(ports: &[v1::ServicePort]) -> String {
    let v: Vec<String> = ports
        .iter()
        .map(|p| match p.name.is_empty() {
            true => format!("{}/{}", p.port, p.protocol),
            false => format!("{}:{}/{}", p.name, p.port, p.protocol),
        })
        .collect();
    match v.is_empty() {
        true => "-".into(),
        false => v.join(","),
    }
}

/// A service as JSON.
pub fn service_json(s: &v1::ServiceInfo) -> Value {
    json!({
        "namespace": s.namespace,
        "name": s.name,
        "type": type_name(s.r#type),
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.port, "appProtocol": p.app_protocol})).collect::<Vec<_>>(),
        "clusters": s.clusters.iter().map(|c| json!({
            "cluster": c.cluster, "readyEndpoints": c.ready_endpoints, "endpoints": c.endpoints,
            "addresses": c.addresses, "included": c.included,
            "conflict": {"reason": c.conflict_reason, "message": c.conflict_message},
        })).collect::<Vec<_>>(),
        "answering": s.answering,
        "policy": serde_json::from_str::<Value>(&s.policy_json).unwrap_or(Value::Null),
        "ownPolicy": s.own_policy,
    })
}

/// `get services`.
pub async fn list(ctx: &mut Ctx, namespace: Option<String>) -> Result<(), Failure> {
    let list = client(ctx)
        .list_services(v1::ListServicesRequest {
            namespace: namespace.unwrap_or_default(),
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = Value::Array(list.services.iter().map(service_json).collect());
    ctx.print(&v, || {
        table(
            &[
                "NAMESPACE",
                "NAME",
                "TYPE",
                "PORTS",
                "CLUSTERS",
                "READY",
                "ANSWERING",
                "CONFLICTS",
            ],
            list.services
                .iter()
                .map(|s| {
                    let ready: u32 = s.clusters.iter().map(|c| c.ready_endpoints).sum();
                    let all: u32 = s.clusters.iter().map(|c| c.endpoints).sum();
                    let mut conflicts: Vec<&str> = s
                        .clusters
                        .iter()
                        .map(|c| c.conflict_reason.as_str())
                        .filter(|r| !r.is_empty() && *r != "NoConflicts")
                        .collect();
                    conflicts.sort();
                    conflicts.dedup();
                    vec![
                        s.namespace.clone(),
                        s.name.clone(),
                        type_name(s.r#type).into(),
                        ports_text(&s.ports),
                        s.clusters
                            .iter()
                            .map(|c| c.cluster.clone())
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{ready}/{all}"),
                        if s.answering.is_empty() {
                            "-".into()
                        } else {
                            s.answering.join(",")
                        },
                        if conflicts.is_empty() {
                            "-".into()
                        } else {
                            conflicts.join(",")
                        },
                    ]
                })
                .collect(),
        )
    });
    Ok(())
}

/// `describe service SERVICE`.
pub async fn describe(ctx: &mut Ctx, service: &str) -> Result<(), Failure> {
    let (namespace, name) = parse_service(service)?;
    let s = client(ctx)
        .get_service(v1::GetServiceRequest { namespace, name })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = service_json(&s);
    ctx.print(&v, || {
        let mut out = format!(
            "Service:    {}/{}\nType:       {}\nPorts:      {}\nDNS:        {}.{}.svc.clusterset.local\nAnswering:  {}\nPolicy:     {} {}\n\nExports:\n",
            s.namespace,
            s.name,
            type_name(s.r#type),
            ports_text(&s.ports),
            s.name,
            s.namespace,
            if s.answering.is_empty() { "nobody".into() } else { s.answering.join(", ") },
            if s.own_policy { "own" } else { "fleet default" },
            s.policy_json,
        );
        out.push_str(&table(
            &["CLUSTER", "READY", "ADDRESSES", "IN-SERVICE", "CONFLICT"],
            s.clusters
                .iter()
                .map(|c| {
                    vec![
                        c.cluster.clone(),
                        format!("{}/{}", c.ready_endpoints, c.endpoints),
                        if c.addresses.is_empty() { "-".into() } else { c.addresses.join(",") },
                        if c.included { "yes".into() } else { "no".into() },
                        match c.conflict_reason.as_str() {
                            "NoConflicts" | "" => "-".into(),
                            r => format!("{r}: {}", c.conflict_message),
                        },
                    ]
                })
                .collect(),
        ));
        out
    });
    Ok(())
}

/// Who is asking, for `resolve` and `explain route`.
#[derive(Debug, Args)]
pub struct From {
    /// The client's cluster.
    #[arg(long)]
    pub from: Option<String>,
    /// The client's address (located by the networks agents report).
    #[arg(long, conflicts_with = "from")]
    pub client_ip: Option<String>,
}

async fn resolve_raw(
    ctx: &mut Ctx,
    service: &str,
    from: &From,
) -> Result<v1::ResolveResponse, Failure> {
    let (namespace, name) = parse_service(service)?;
    client(ctx)
        .resolve(v1::ResolveRequest {
            namespace,
            name,
            from_cluster: from.from.clone().unwrap_or_default(),
            client_ip: from.client_ip.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| ctx.explain(s))
        .map(|r| r.into_inner())
}

fn route_json(r: &v1::ResolveResponse) -> Value {
    json!({
        "answers": r.answers.iter().map(|a| json!({"cluster": a.cluster, "address": a.address, "hostname": a.hostname})).collect::<Vec<_>>(),
        "ttlSeconds": r.ttl_seconds,
        "clientCluster": r.client_cluster,
        "tiers": r.tiers,
        "verdicts": r.verdicts.iter().map(|v| json!({
            "cluster": v.cluster, "chosen": v.chosen, "class": v.class,
            "tier": if v.tier < 0 { Value::Null } else { json!(v.tier + 1) },
            "readyEndpoints": v.ready_endpoints, "endpoints": v.endpoints, "weight": v.weight, "reason": v.reason,
        })).collect::<Vec<_>>(),
    })
}

/// `resolve SERVICE`.
pub async fn resolve(ctx: &mut Ctx, service: &str, from: &From) -> Result<(), Failure> {
    let r = resolve_raw(ctx, service, from).await?;
    ctx.print(&route_json(&r), || {
        let mut out = table(
            &["ADDRESS", "CLUSTER", "HOSTNAME"],
            r.answers
                .iter()
                .map(|a| {
                    vec![
                        a.address.clone(),
                        a.cluster.clone(),
                        if a.hostname.is_empty() {
                            "-".into()
                        } else {
                            a.hostname.clone()
                        },
                    ]
                })
                .collect(),
        );
        if r.answers.is_empty() {
            out = "no cluster answers for this service now (see `flotctl explain route`)\n".into();
        }
        out.push_str(&format!("TTL {}s\n", r.ttl_seconds));
        out
    });
    Ok(())
}

/// `explain route SERVICE`.
pub async fn explain(ctx: &mut Ctx, service: &str, from: &From) -> Result<(), Failure> {
    let r = resolve_raw(ctx, service, from).await?;
    ctx.print(&route_json(&r), || {
        let who = match r.client_cluster.as_str() {
            "" => "a client of unknown location".to_string(),
            c => format!("a client in cluster {c}"),
        };
        let mut out = format!(
            "Route for {service} asked by {who}\nTiers: {}\n\n",
            r.tiers
                .iter()
                .enumerate()
                .map(|(i, t)| format!("{}. {t}", i + 1))
                .collect::<Vec<_>>()
                .join("  ")
        );
        out.push_str(&table(
            &[
                "CLUSTER", "ANSWERED", "CLASS", "TIER", "READY", "WEIGHT", "WHY",
            ],
            r.verdicts
                .iter()
                .map(|v| {
                    vec![
                        v.cluster.clone(),
                        if v.chosen { "yes".into() } else { "no".into() },
                        v.class.clone(),
                        if v.tier < 0 {
                            "-".into()
                        } else {
                            (v.tier + 1).to_string()
                        },
                        format!("{}/{}", v.ready_endpoints, v.endpoints),
                        v.weight.to_string(),
                        v.reason.clone(),
                    ]
                })
                .collect(),
        ));
        out.push_str(&format!(
            "\nAnswer: {}\n",
            if r.answers.is_empty() {
                "none".into()
            } else {
                r.answers
                    .iter()
                    .map(|a| format!("{} ({})", a.address, a.cluster))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        out
    });
    Ok(())
}

/// `policy ...`.
#[derive(Debug, Subcommand)]
pub enum Policy {
    /// Set a service's routing policy (or the fleet default) from a YAML or JSON file.
    Set {
        /// The policy file (`-`: standard input).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The service (name.namespace); omit with --default.
        service: Option<String>,
        /// Set the fleet-wide default instead.
        #[arg(long, conflicts_with = "service")]
        default: bool,
    },
    /// Show a service's policy (or the fleet default).
    Get {
        /// The service (name.namespace); omit with --default.
        service: Option<String>,
        /// The fleet-wide default.
        #[arg(long, conflicts_with = "service")]
        default: bool,
    },
    /// Delete a service's policy: the fleet default applies again.
    Delete {
        /// The service (name.namespace); omit with --default.
        service: Option<String>,
        /// Reset the fleet-wide default.
        #[arg(long, conflicts_with = "service")]
        default: bool,
    },
}

fn policy_target(service: Option<&str>, default: bool) -> Result<(String, String), Failure> {
    match (service, default) {
        (Some(s), false) => parse_service(s),
        (None, true) => Ok((String::new(), String::new())),
        _ => Err(("give SERVICE (name.namespace) or --default".into(), 2)),
    }
}

/// Read a policy file (YAML or JSON) as JSON text.
pub fn read_policy(file: &Path) -> Result<String, Failure> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| (format!("stdin: {e}"), 2))?
    } else {
        std::fs::read_to_string(file).map_err(|e| (format!("{}: {e}", file.display()), 2))?
    };
    let v: Value = serde_saphyr::from_str(&text)
        .map_err(|e| (format!("{}: not YAML or JSON: {e}", file.display()), 2))?;
    Ok(v.to_string())
}

/// Runs `policy`.
pub async fn policy(ctx: &mut Ctx, p: Policy) -> Result<(), Failure> {
    let print_rec = |ctx: &Ctx, rec: &v1::RoutingPolicyRecord| {
        let spec: Value = serde_json::from_str(&rec.spec_json).unwrap_or(Value::Null);
        let v = json!({"namespace": rec.namespace, "name": rec.name, "spec": spec});
        ctx.print(&v, || serde_saphyr::to_string(&spec).unwrap_or_default());
    };
    match p {
        Policy::Set {
            file,
            service,
            default,
        } => {
            let (namespace, name) = policy_target(service.as_deref(), default)?;
            let spec_json = read_policy(&file)?;
            let rec = client(ctx)
                .set_policy(v1::SetPolicyRequest {
                    namespace,
                    name,
                    spec_json,
                })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            print_rec(ctx, &rec);
        }
        Policy::Get { service, default } => {
            let (namespace, name) = policy_target(service.as_deref(), default)?;
            let rec = client(ctx)
                .get_policy(v1::GetPolicyRequest { namespace, name })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            print_rec(ctx, &rec);
        }
        Policy::Delete { service, default } => {
            let (namespace, name) = policy_target(service.as_deref(), default)?;
            let r = client(ctx)
                .delete_policy(v1::GetPolicyRequest { namespace, name })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            ctx.print(&json!({"deleted": r.deleted}), || match r.deleted {
                true => "deleted\n".into(),
                false => "there was no such policy\n".into(),
            });
        }
    }
    Ok(())
}

/// Formats `routes export` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RouteFormat {
    /// The llm-d router's multi-cluster peer file (`clusters.yaml`).
    LlmD,
    /// The routes as JSON.
    Json,
}

/// `routes export SERVICE --format llm-d [--watch FILE]`.
#[derive(Debug, Args)]
pub struct Export {
    /// The service (name.namespace).
    pub service: String,
    /// What to write.
    #[arg(long, value_enum, default_value_t = RouteFormat::LlmD)]
    pub format: RouteFormat,
    /// Keep this file current (written by atomic rename on every change) until interrupted;
    /// without it, print once.
    #[arg(long)]
    pub watch: Option<PathBuf>,
    /// The routes as clients in this cluster get them (a gateway running there: local-first
    /// policies answer its own cluster first); without, as a client of unknown location.
    #[arg(long)]
    pub from: Option<String>,
}

/// The llm-d peer file for one service's routes: one peer per answered cluster address, with
/// the cluster's name and weight as labels, in the current order of preference. Pure.
pub fn llm_d_peers(u: &v1::RouteUpdate, format: RouteFormat) -> String {
    let port = u.ports.first().map_or(0, |p| p.port);
    let peers: Vec<Value> = u
        .choices
        .iter()
        .flat_map(|c| {
            c.addresses.iter().map(move |a| {
                json!({"name": format!("{}-{}", c.cluster, a.address.replace([':', '.'], "-")), "address": a.address, "port": port,
                       "labels": {"cluster": c.cluster, "weight": c.weight.to_string()}})
            })
        })
        .collect();
    match format {
        RouteFormat::LlmD => serde_saphyr::to_string(&json!({"clusters": peers})).unwrap_or_default(),
        RouteFormat::Json => serde_json::to_string_pretty(&json!({"service": format!("{}/{}", u.namespace, u.name), "removed": u.removed, "clusters": peers})).unwrap_or_default(),
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("routes")
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Runs `routes export`.
pub async fn export(ctx: &mut Ctx, a: Export) -> Result<(), Failure> {
    let (namespace, name) = parse_service(&a.service)?;
    let mut stream = client(ctx)
        .watch_routes(v1::WatchRoutesRequest {
            prefix: format!("{namespace}/{name}"),
            from_cluster: a.from.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let mut current: Option<String> = None;
    loop {
        let u = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Err(("the hub ended the route stream".into(), 4)),
            Err(s) => return Err(ctx.explain(s)),
        };
        if u.synced {
            if current.is_none() {
                let none = v1::RouteUpdate {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    removed: true,
                    ..Default::default()
                };
                current = Some(llm_d_peers(&none, a.format));
                if let Some(p) = &a.watch {
                    write_atomic(p, current.as_deref().unwrap_or_default())
                        .map_err(|e| (format!("{}: {e}", p.display()), 1))?;
                }
            }
            if a.watch.is_none() {
                let text = current.unwrap_or_default();
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                return Ok(());
            }
            continue;
        }
        let text = llm_d_peers(&u, a.format);
        if current.as_ref() == Some(&text) {
            continue;
        }
        if let Some(p) = &a.watch {
            write_atomic(p, &text).map_err(|e| (format!("{}: {e}", p.display()), 1))?;
            eprintln!(
                "flotctl: {} now lists {} peer(s)",
                p.display(),
                u.choices.iter().map(|c| c.addresses.len()).sum::<usize>()
            );
        }
        current = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_named_like_dns_or_like_kubectl() {
        assert_eq!(
            parse_service("llama-70b.inference").unwrap(),
            ("inference".into(), "llama-70b".into())
        );
        assert_eq!(
            parse_service("inference/llama-70b").unwrap(),
            ("inference".into(), "llama-70b".into())
        );
        assert!(parse_service("llama").is_err());
        assert!(parse_service("a.b.c").is_err());
    }

    #[test]
    fn the_llm_d_file_lists_answered_addresses_in_order() {
        let u = v1::RouteUpdate {
            namespace: "inference".into(),
            name: "llm".into(),
            ports: vec![v1::ServicePort {
                name: "http".into(),
                protocol: "TCP".into(),
                port: 8000,
                app_protocol: String::new(),
            }],
            choices: vec![v1::RouteChoice {
                cluster: "eu".into(),
                weight: 3,
                addresses: vec![v1::ResolvedAddress {
                    cluster: "eu".into(),
                    address: "198.18.0.1".into(),
                    hostname: String::new(),
                }],
            }],
            ..Default::default()
        };
        let text = llm_d_peers(&u, RouteFormat::LlmD);
        let v: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(v["clusters"][0]["address"], "198.18.0.1");
        assert_eq!(v["clusters"][0]["port"], 8000);
        assert_eq!(v["clusters"][0]["labels"]["cluster"], "eu");
    }
}
