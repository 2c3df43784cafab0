//! Standalone DNS (`flotilla-dns --hub ADDR`): follow a hub's `WatchRoutes` and serve the
//! decisions it streams, to run beside a cluster's CoreDNS (which forwards
//! `clusterset.local` here). Given its cluster (`--cluster`), the stream carries each
//! service's decision for clients in that cluster, so local-first policies answer it first;
//! without, the decision for a client of unknown location. While the hub is unreachable the last table keeps answering (the answers' TTLs are
//! short), and the stream is resumed with backoff.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use backon::{BackoffBuilder, ExponentialBuilder};
use flotilla_api::v1;
use flotilla_core::export::{Port, Protocol, Service, ServiceKey, ServiceType};
use flotilla_core::routing::{Choice, Decision, RoutingPolicy};
use flotilla_core::routing_table::{RoutingTable, ServiceRoutes, host_label};
use tokio_util::sync::CancellationToken;

use crate::server::SharedTable;

/// One streamed service as the table holds it. `None` when the update is malformed.
pub fn routes_from_update(u: &v1::RouteUpdate) -> Option<ServiceRoutes> {
    let key = ServiceKey::new(&u.namespace, &u.name);
    let service_type = match v1::ServiceType::try_from(u.r#type).ok()? {
        v1::ServiceType::ClusterSetIp => ServiceType::ClusterSetIp,
        v1::ServiceType::Headless => ServiceType::Headless,
        v1::ServiceType::Unspecified => return None,
    };
    let ports = u
        .ports
        .iter()
        .map(|p| {
            Some(Port {
                name: p.name.clone(),
                protocol: match p.protocol.as_str() {
                    "UDP" => Protocol::Udp,
                    "SCTP" => Protocol::Sctp,
                    _ => Protocol::Tcp,
                },
                port: u16::try_from(p.port).ok()?,
                app_protocol: Some(p.app_protocol.clone()).filter(|a| !a.is_empty()),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let mut hosts: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
    let mut chosen = Vec::with_capacity(u.choices.len());
    for c in &u.choices {
        let mut addresses = Vec::with_capacity(c.addresses.len());
        for a in &c.addresses {
            let ip: IpAddr = a.address.parse().ok()?;
            if service_type == ServiceType::Headless {
                hosts
                    .entry((c.cluster.to_ascii_lowercase(), host_label(&a.hostname, ip)))
                    .or_default()
                    .push(ip);
            }
            addresses.push((ip, a.hostname.clone()));
        }
        chosen.push(Choice {
            cluster: c.cluster.clone(),
            weight: c.weight.max(1),
            addresses,
        });
    }
    let decision = Decision {
        chosen,
        ttl_seconds: u.ttl_seconds.max(1),
        max_answers: u.max_answers.max(1),
        tiers: Vec::new(),
        verdicts: Vec::new(),
    };
    Some(ServiceRoutes {
        service: Service {
            key: Some(key),
            service_type: Some(service_type),
            ports,
            ..Service::default()
        },
        policy: RoutingPolicy {
            ttl_seconds: decision.ttl_seconds,
            max_answers: decision.max_answers,
            ..RoutingPolicy::default()
        },
        own_policy: false,
        default: decision,
        by_cluster: BTreeMap::new(),
        by_region: BTreeMap::new(),
        hosts,
    })
}

/// A table from streamed services.
pub fn table_of(
    generation: u64,
    services: &BTreeMap<ServiceKey, Arc<ServiceRoutes>>,
) -> RoutingTable {
    RoutingTable {
        generation,
        built_at_unix_ms: 0,
        services: services
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        by_dns: services
            .iter()
            .map(|(k, v)| (format!("{}.{}", k.name, k.namespace), v.clone()))
            .collect(),
        namespaces: services.keys().map(|k| k.namespace.clone()).collect(),
        networks: Default::default(),
        regions: Default::default(),
    }
}

/// Follow `hub`'s routes, as answered to clients in `cluster` (if given), into `table` until
/// `shutdown`, reconnecting with backoff; dialled as `security` says.
pub async fn follow(
    hub: String,
    cluster: Option<String>,
    security: flotilla_api::grpc::Security,
    table: SharedTable,
    shutdown: CancellationToken,
) {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream_once(&hub, cluster.as_deref(), &security, &table) => r,
        };
        match r {
            Ok(()) => tracing::info!(%hub, "the hub ended the route stream; resuming"),
            Err(e) => {
                tracing::warn!(%hub, error = %e, "route stream failed; the last table keeps answering")
            }
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn stream_once(
    hub: &str,
    cluster: Option<&str>,
    security: &flotilla_api::grpc::Security,
    table: &SharedTable,
) -> Result<(), String> {
    // A long-lived watch: pings find a partition that drops packets.
    let dial = flotilla_api::grpc::Dial {
        security: security.clone(),
        ..flotilla_api::grpc::Dial::plaintext(Duration::from_secs(3))
    }
    .with_keepalive(Duration::from_secs(5));
    let ch = flotilla_api::grpc::connect(hub, &dial)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = v1::discovery_service_client::DiscoveryServiceClient::new(ch);
    let mut stream = client
        .watch_routes(v1::WatchRoutesRequest {
            prefix: String::new(),
            from_cluster: cluster.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    // The initial list replaces everything once it is complete; then each update applies.
    let mut services: BTreeMap<ServiceKey, Arc<ServiceRoutes>> = BTreeMap::new();
    let mut synced = false;
    let mut generation = 0;
    loop {
        let u = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(s) => return Err(s.message().to_string()),
        };
        generation = generation.max(u.generation);
        if u.synced {
            synced = true;
            tracing::info!(services = services.len(), "routes synced from the hub");
        } else {
            let key = ServiceKey::new(&u.namespace, &u.name);
            match (u.removed, routes_from_update(&u)) {
                (true, _) => {
                    services.remove(&key);
                }
                (false, Some(r)) => {
                    services.insert(key, Arc::new(r));
                }
                (false, None) => {
                    tracing::warn!(service = %key, "skipping a malformed route update")
                }
            }
        }
        if synced {
            table.store(Arc::new(table_of(generation, &services)));
        }
    }
}

/// A fresh shared table, empty.
pub fn empty_table() -> SharedTable {
    Arc::new(ArcSwap::from_pointee(RoutingTable::default()))
}
