//! The agent's connection to the hub: one `AgentService.Connect` stream. Hello, then only
//! what the hub does not already hold, then deltas when the inventory changes (coalesced) and
//! heartbeats at the hub's interval. Reconnects as [`crate::reconnect`] decides, following the
//! leader hint when a follower turns it away.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::convert::fleet as conv;
use flotilla_api::convert::kv::LEADER_HINT_KEY;
use flotilla_api::v1;
use flotilla_core::health::Signals;
use flotilla_core::report::{self, Digest};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::ClusterWatch;
use crate::reconnect::{Outcome, Reconnect};

/// Identity and addresses for the hub session.
#[derive(Clone)]
pub struct SessionConfig {
    /// Cluster name (a DNS label).
    pub cluster: String,
    /// Hub gRPC addresses (`host:port`), any replica.
    pub hubs: Vec<String>,
    /// Join token.
    pub token: String,
    /// Cluster region.
    pub region: String,
    /// Cluster labels.
    pub labels: BTreeMap<String, String>,
    /// The cluster's Kubernetes version.
    pub kubernetes_version: String,
    /// Wait this long after a change before sending, to coalesce bursts.
    pub coalesce: Duration,
    /// Metrics.
    pub metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
    /// The cluster's MCS exports, if they are watched.
    pub exports: Option<crate::exports::ExportWatch>,
    /// The writer of the cluster's ServiceImports, if the agent maintains them.
    pub imports: Option<crate::imports::ImportSync>,
    /// Inference load samples to send, if sampled.
    pub loads: Option<crate::inference::Latest>,
    /// The campaign step runner, if this agent runs campaigns.
    pub steps: Option<crate::campaign::Steps>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The hub rejected the agent for good (bad token, bad name): retrying will not help.
    #[error("the hub refused this agent: {0}")]
    Refused(tonic::Status),
    /// Transport or hub trouble; the agent retries.
    #[error("hub session failed: {0}")]
    Retry(String),
    /// The replica could not be dialled; the agent tries another.
    #[error("cannot connect: {0}")]
    Unreachable(String),
    /// A live replica does not lead (and names the leader, if it knows one).
    #[error("not the leader ({message}); leader: {hint:?}")]
    NotLeader {
        /// The leader's address, from the replica.
        hint: Option<String>,
        /// The replica's message.
        message: String,
    },
}

/// Failed GPUs and the nodes they are on, as the signals carry them.
#[derive(Debug, Clone, Default)]
struct Failed {
    gpus: i64,
    nodes: Vec<String>,
}

impl Failed {
    fn of(inv: &flotilla_core::inventory::ClusterInventory) -> Self {
        let mut nodes = inv.failed_nodes();
        nodes.truncate(conv::MAX_SIGNAL_NAMES);
        Self {
            gpus: inv.failed_gpus(),
            nodes,
        }
    }
}

fn signals(w: &ClusterWatch, failed: &Failed) -> v1::HealthSignals {
    conv::signals_to_wire(&Signals {
        api_unreachable: !w.api_reachable(),
        nodes_not_ready: w.nodes_not_ready(),
        gpus_failed: failed.gpus,
        failed_nodes: failed.nodes.clone(),
        incomplete: w.incomplete(),
        forbidden: w.forbidden(),
    })
}

/// The cluster's nodes now: wire records and their digests by name, and the failed GPUs.
struct Current {
    nodes: BTreeMap<String, v1::NodeInventory>,
    digests: BTreeMap<String, Digest>,
    failed: Failed,
}

fn current(w: &ClusterWatch) -> Current {
    let inv = w.inventory();
    let nodes: BTreeMap<String, v1::NodeInventory> = inv
        .nodes
        .iter()
        .map(|n| (n.name.clone(), conv::node_to_wire(n)))
        .collect();
    let digests = nodes
        .iter()
        .map(|(name, n)| (name.clone(), report::digest(&n.encode_to_vec())))
        .collect();
    Current {
        nodes,
        digests,
        failed: Failed::of(&inv),
    }
}

/// The delta from `held` digests to `now`, as the message's node lists.
fn delta_lists(
    held: &BTreeMap<String, Digest>,
    now: &Current,
) -> (Vec<v1::NodeInventory>, Vec<String>) {
    let d = report::delta(held, &now.digests);
    (
        d.upsert.iter().map(|n| now.nodes[*n].clone()).collect(),
        d.remove.iter().map(|n| n.to_string()).collect(),
    )
}

/// The cluster's exports now, as sent: by `namespace/name`.
fn current_exports(
    cfg: &SessionConfig,
    watch: &ClusterWatch,
) -> BTreeMap<String, v1::ServiceExport> {
    let Some(x) = &cfg.exports else {
        return BTreeMap::new();
    };
    let pools: BTreeMap<String, String> = watch
        .inventory()
        .nodes
        .into_iter()
        .filter_map(|n| Some((n.name, n.pool?)))
        .collect();
    x.exports(&|node| pools.get(node).cloned())
        .iter()
        .map(|e| {
            (
                format!("{}/{}", e.namespace, e.name),
                flotilla_api::convert::discovery::export_to_wire(e),
            )
        })
        .collect()
}

/// The exports delta from `sent` to `now`, unless nothing changed.
fn exports_delta(
    sent: &BTreeMap<String, v1::ServiceExport>,
    now: &BTreeMap<String, v1::ServiceExport>,
) -> Option<v1::AgentMessage> {
    let upsert: Vec<v1::ServiceExport> = now
        .iter()
        .filter(|(k, v)| sent.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let remove: Vec<String> = sent
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    if upsert.is_empty() && remove.is_empty() {
        return None;
    }
    Some(v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::ExportsDelta(v1::ExportsDelta {
            upsert,
            remove,
        })),
    })
}

/// Hand the hub's export status to the status writer.
fn apply_status(cfg: &SessionConfig, s: v1::ExportStatuses) {
    if let Some(x) = &cfg.exports {
        x.set_hub_status(
            s.exports
                .into_iter()
                .map(|e| {
                    (
                        (e.namespace, e.name),
                        crate::exports::HubStatus {
                            conflict_reason: e.conflict_reason,
                            conflict_message: e.conflict_message,
                            included: e.included,
                        },
                    )
                })
                .collect(),
        );
    }
}

/// Run sessions until `shutdown`, reconnecting on failure (see [`crate::reconnect`] for which
/// replica is dialled next and how long the agent waits). Returns only on shutdown or when the
/// hub refuses the agent.
pub async fn run(
    cfg: SessionConfig,
    watch: ClusterWatch,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let mut policy = Reconnect::new(cfg.hubs.clone());
    loop {
        let addr = policy.next_addr().to_string();
        let began = tokio::time::Instant::now();
        let mut heartbeat = None;
        let outcome = match session(&cfg, &addr, &watch, &shutdown, &mut heartbeat).await {
            Ok(()) => return Ok(()),
            Err(SessionError::Refused(s)) => return Err(SessionError::Refused(s)),
            Err(e) => {
                tracing::info!(hub = %addr, reason = %e, "hub session ended; reconnecting");
                match e {
                    SessionError::Unreachable(_) => Outcome::Unreachable,
                    SessionError::NotLeader { hint, .. } => Outcome::NotLeader { hint },
                    _ => Outcome::Ended,
                }
            }
        };
        if let Some(h) = heartbeat {
            policy.set_heartbeat(h);
        }
        let delay = policy.after(&addr, outcome, began.elapsed(), rand::random::<f64>());
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long export changes are gathered before one delta goes.
const EXPORT_COALESCE: Duration = Duration::from_millis(20);

fn classify(s: tonic::Status) -> SessionError {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument => SessionError::Refused(s),
        tonic::Code::Unavailable => SessionError::NotLeader {
            hint: s
                .metadata()
                .get(LEADER_HINT_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            message: s.message().to_string(),
        },
        _ => SessionError::Retry(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn session(
    cfg: &SessionConfig,
    addr: &str,
    watch: &ClusterWatch,
    shutdown: &CancellationToken,
    learned_heartbeat: &mut Option<Duration>,
) -> Result<(), SessionError> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map(flotilla_api::grpc::client)
        .map_err(|e| SessionError::Retry(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| SessionError::Unreachable(e.to_string()))?;
    let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
    let send = |m: v1::agent_message::Msg| v1::AgentMessage { msg: Some(m) };
    tx.send(send(v1::agent_message::Msg::Hello(v1::Hello {
        cluster: cfg.cluster.clone(),
        token: cfg.token.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kubernetes_version: cfg.kubernetes_version.clone(),
        labels: cfg.labels.clone().into_iter().collect(),
        region: cfg.region.clone(),
        imports: cfg.imports.is_some(),
        imports_by_namespace: cfg.imports.is_some(),
        campaigns: cfg.steps.is_some(),
    })))
    .await
    .map_err(|_| SessionError::Retry("stream closed".into()))?;
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(classify)?
        .into_inner();
    let welcome = match inbound.message().await.map_err(classify)? {
        Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Welcome(w)),
        }) => w,
        other => {
            return Err(SessionError::Retry(format!(
                "expected a welcome, got {other:?}"
            )));
        }
    };
    tracing::info!(hub = %addr, "connected to the hub");
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    *learned_heartbeat = Some(heartbeat);
    // Send only what the hub does not hold already. A malformed digest matches nothing, so
    // that node is sent again.
    let now = current(watch);
    let held: BTreeMap<String, Digest> = welcome
        .held
        .into_iter()
        .map(|(name, d)| (name, d.as_slice().try_into().unwrap_or([0; 32])))
        .collect();
    let (upsert, remove) = delta_lists(&held, &now);
    let first = if held.is_empty() {
        v1::agent_message::Msg::Snapshot(v1::InventorySnapshot {
            nodes: upsert,
            signals: Some(signals(watch, &now.failed)),
        })
    } else {
        v1::agent_message::Msg::Delta(v1::InventoryDelta {
            upsert,
            remove,
            signals: Some(signals(watch, &now.failed)),
        })
    };
    let first = send(first);
    observe(cfg, &first);
    tx.send(first)
        .await
        .map_err(|_| SessionError::Retry("stream closed".into()))?;
    // Every export, once per session: the hub writes only what differs from its store.
    let exports = current_exports(cfg, watch);
    if cfg.exports.is_some() {
        let m = send(v1::agent_message::Msg::Exports(v1::ExportsSnapshot {
            exports: exports.values().cloned().collect(),
        }));
        tx.send(m)
            .await
            .map_err(|_| SessionError::Retry("stream closed".into()))?;
    }
    let networks = watch.networks();
    tx.send(send(v1::agent_message::Msg::Networks(v1::Networks {
        cidrs: networks.clone(),
    })))
    .await
    .map_err(|_| SessionError::Retry("stream closed".into()))?;
    cfg.metrics.hub_connected.set(1);
    cfg.metrics.hub_connects.inc();
    let r = follow(
        cfg,
        watch,
        shutdown,
        &tx,
        &mut inbound,
        (now, exports, networks),
        heartbeat,
    )
    .await;
    cfg.metrics.hub_connected.set(0);
    r
}

/// Count what a report carries.
fn observe(cfg: &SessionConfig, m: &v1::AgentMessage) {
    let nodes = match &m.msg {
        Some(v1::agent_message::Msg::Snapshot(s)) => s.nodes.len(),
        Some(v1::agent_message::Msg::Delta(d)) => d.upsert.len() + d.remove.len(),
        _ => return,
    };
    cfg.metrics.report_nodes.observe(nodes as f64);
    cfg.metrics.report_bytes.observe(m.encoded_len() as f64);
}

/// After the first report: deltas on change, heartbeats on the timer, acks and errors in.
async fn follow(
    cfg: &SessionConfig,
    watch: &ClusterWatch,
    shutdown: &CancellationToken,
    tx: &mpsc::Sender<v1::AgentMessage>,
    inbound: &mut tonic::Streaming<v1::HubMessage>,
    (first, mut sent_exports, mut sent_networks): (
        Current,
        BTreeMap<String, v1::ServiceExport>,
        Vec<String>,
    ),
    heartbeat: Duration,
) -> Result<(), SessionError> {
    let send = |m: v1::agent_message::Msg| v1::AgentMessage { msg: Some(m) };
    let mut last_signals = signals(watch, &first.failed);
    let mut sent = first.digests;
    let mut changes = watch.changes();
    // Without an export watch this never changes.
    let (_idle, idle_rx) = tokio::sync::watch::channel(0u64);
    let mut export_changes = cfg.exports.as_ref().map_or(idle_rx, |x| x.changes());
    export_changes.borrow_and_update();
    let (_idle_loads, idle_loads_rx) = tokio::sync::watch::channel(None);
    let mut loads = cfg.loads.clone().unwrap_or(idle_loads_rx);
    loads.borrow_and_update();
    // The namespaces to import for: now if listed, then on every change.
    let (_idle_ns, idle_ns_rx) = tokio::sync::watch::channel(None);
    let mut namespaces = cfg.imports.as_ref().map_or(idle_ns_rx, |i| i.namespaces());
    let current = namespaces.borrow_and_update().clone();
    if let Some(names) = current {
        let m = send(v1::agent_message::Msg::ImportNamespaces(
            v1::ImportNamespaces { names },
        ));
        tx.send(m)
            .await
            .map_err(|_| SessionError::Retry("stream closed".into()))?;
    }
    // Step statuses wait here across reconnects; this session sends them while it lives.
    let (_idle_steps, idle_steps_rx) = mpsc::channel::<v1::StepStatusReport>(1);
    let statuses = cfg.steps.as_ref().map(|s| s.statuses());
    let mut idle_steps_rx = idle_steps_rx;
    let mut statuses_guard = match &statuses {
        Some(s) => Some(s.lock().await),
        None => None,
    };
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    loop {
        let status_rx = match statuses_guard.as_mut() {
            Some(g) => &mut **g,
            None => &mut idle_steps_rx,
        };
        // A node's start-up bound passing changes the inventory with no watch event.
        let clock = watch.next_deadline().unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = changes.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("cluster watch ended".into()));
                }
                // Coalesce a burst of watch events into one delta.
                tokio::time::sleep(cfg.coalesce).await;
                changes.borrow_and_update();
                // Nodes come and go with their pod ranges.
                let networks = watch.networks();
                if networks != sent_networks {
                    let m = send(v1::agent_message::Msg::Networks(v1::Networks { cidrs: networks.clone() }));
                    tx.send(m).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                    sent_networks = networks;
                }
                let (d, now, sig) = match delta(watch, &sent, &last_signals) {
                    Some(x) => x,
                    None => continue,
                };
                observe(cfg, &d);
                tx.send(d).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                sent = now.digests;
                last_signals = sig;
            }
            _ = tokio::time::sleep(clock + Duration::from_millis(10)) => {
                let Some((d, now, sig)) = delta(watch, &sent, &last_signals) else { continue };
                observe(cfg, &d);
                tx.send(d).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                sent = now.digests;
                last_signals = sig;
            }
            _ = tick.tick() => {
                let failed = Failed::of(&watch.inventory());
                let sig = signals(watch, &failed);
                let hb = v1::agent_message::Msg::Heartbeat(v1::Heartbeat { signals: Some(sig.clone()) });
                tx.send(send(hb)).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                last_signals = sig;
            }
            r = export_changes.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("export watch ended".into()));
                }
                // Endpoint readiness changes fast: a short coalescing window keeps answers
                // within the convergence target.
                tokio::time::sleep(EXPORT_COALESCE).await;
                export_changes.borrow_and_update();
                let now = current_exports(cfg, watch);
                if let Some(d) = exports_delta(&sent_exports, &now) {
                    tx.send(d).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                    sent_exports = now;
                }
            }
            r = namespaces.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("namespace watch ended".into()));
                }
                let current = namespaces.borrow_and_update().clone();
                if let Some(names) = current {
                    let m = send(v1::agent_message::Msg::ImportNamespaces(v1::ImportNamespaces { names }));
                    tx.send(m).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                }
            }
            r = loads.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("inference sampler ended".into()));
                }
                let latest = loads.borrow_and_update().clone();
                if let Some(l) = latest {
                    let m = send(v1::agent_message::Msg::Loads((*l).clone()));
                    tx.send(m).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
                }
            }
            Some(report) = status_rx.recv() => {
                let m = send(v1::agent_message::Msg::StepStatus(report));
                tx.send(m).await.map_err(|_| SessionError::Retry("stream closed".into()))?;
            }
            m = inbound.message() => match m {
                Ok(Some(v1::HubMessage { msg: Some(v1::hub_message::Msg::ExportStatus(s)) })) => apply_status(cfg, s),
                Ok(Some(v1::HubMessage { msg: Some(v1::hub_message::Msg::Command(c)) })) => {
                    match &cfg.steps {
                        Some(steps) => steps.submit(c).await,
                        None => tracing::warn!(campaign = %c.campaign, "the hub sent a campaign step to an agent that does not run campaigns"),
                    }
                }
                Ok(Some(v1::HubMessage { msg: Some(v1::hub_message::Msg::Imports(u)) })) => {
                    if let Some(i) = &cfg.imports {
                        i.apply(u);
                    }
                }
                Ok(Some(_ack)) => {}
                Ok(None) => return Err(SessionError::Retry("the hub closed the stream".into())),
                Err(s) => return Err(classify(s)),
            },
        }
    }
}

/// The delta message from what was `sent` to the caches now, unless nothing changed.
fn delta(
    watch: &ClusterWatch,
    sent: &BTreeMap<String, Digest>,
    last_signals: &v1::HealthSignals,
) -> Option<(v1::AgentMessage, Current, v1::HealthSignals)> {
    let now = current(watch);
    let sig = signals(watch, &now.failed);
    let (upsert, remove) = delta_lists(sent, &now);
    if upsert.is_empty() && remove.is_empty() && &sig == last_signals {
        return None;
    }
    let d = v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Delta(v1::InventoryDelta {
            upsert,
            remove,
            signals: Some(sig.clone()),
        })),
    };
    Some((d, now, sig))
}
