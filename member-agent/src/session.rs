//! The agent's connection to the hub: one `AgentService.Connect` stream. Hello, then only
//! what the hub does not already hold, then deltas when the inventory changes (coalesced) and
//! heartbeats at the hub's interval; [`crate::stream`] decides what goes, this module reads
//! the caches and does the I/O. Reconnects as [`crate::reconnect`] decides, following the
//! leader hint when a follower turns it away.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::convert::fleet as conv;
use flotilla_api::v1;
use flotilla_core::health::Signals;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::ClusterWatch;
use crate::reconnect::{Outcome, Reconnect};
use crate::stream::{Action, Input, Machine, Now, Opening, classify};

/// Identity and addresses for the hub session.
#[derive(Clone)]
pub struct SessionConfig {
    /// Cluster name (a DNS label).
    pub cluster: String,
    /// Hub gRPC addresses (`host:port`), any replica.
    pub hubs: Vec<String>,
    /// How each connection identifies itself (certificate, or join token).
    pub credentials: std::sync::Arc<crate::identity::Credentials>,
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
    /// How the hub is dialled.
    pub dial: flotilla_api::grpc::Dial,
}

pub use crate::stream::SessionError;

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

/// The cluster's nodes and signals now.
fn current(w: &ClusterWatch) -> Now {
    let inv = w.inventory();
    let nodes = inv
        .nodes
        .iter()
        .map(|n| (n.name.clone(), conv::node_to_wire(n)))
        .collect();
    Now::new(nodes, signals(w, &Failed::of(&inv)))
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

async fn session(
    cfg: &SessionConfig,
    addr: &str,
    watch: &ClusterWatch,
    shutdown: &CancellationToken,
    learned_heartbeat: &mut Option<Duration>,
) -> Result<(), SessionError> {
    use flotilla_api::grpc::DialError;
    let attempt = cfg.credentials.attempt(unix_secs())?;
    let dial = flotilla_api::grpc::Dial {
        security: attempt.security,
        ..cfg.dial.clone()
    };
    let channel = flotilla_api::grpc::connect(addr, &dial)
        .await
        .map_err(|e| match e {
            DialError::Address { .. } => SessionError::Retry(e.to_string()),
            DialError::Connect { .. } => SessionError::Unreachable(e.to_string()),
        })?;
    let mut client = v1::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(16);
    let send = |m: v1::agent_message::Msg| v1::AgentMessage { msg: Some(m) };
    tx.send(send(v1::agent_message::Msg::Hello(v1::Hello {
        cluster: cfg.cluster.clone(),
        token: attempt.token,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kubernetes_version: cfg.kubernetes_version.clone(),
        labels: cfg.labels.clone().into_iter().collect(),
        region: cfg.region.clone(),
        imports: cfg.imports.is_some(),
        imports_by_namespace: cfg.imports.is_some(),
        campaigns: cfg.steps.is_some(),
        csr: attempt.csr,
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
    if let Some(c) = &welcome.certificate
        && let Err(e) = cfg.credentials.accept(c).await
    {
        tracing::error!(error = %e, "the hub's certificate could not be used");
    }
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    *learned_heartbeat = Some(heartbeat);
    // Send only what the hub does not hold already. A malformed digest matches nothing, so
    // that node is sent again.
    let held = welcome
        .held
        .into_iter()
        .map(|(name, d)| (name, d.as_slice().try_into().unwrap_or([0; 32])))
        .collect();
    // Subscribed first: a change while the opening reads the caches is not missed.
    let subs = Subscriptions::new(cfg, watch);
    let opening = Opening {
        held,
        now: current(watch),
        exports: cfg.exports.as_ref().map(|_| current_exports(cfg, watch)),
        networks: watch.networks(),
        namespaces: subs.namespaces.borrow().clone(),
    };
    let (machine, opened) = Machine::open(opening);
    cfg.metrics.hub_connected.set(1);
    cfg.metrics.hub_connects.inc();
    let r = follow(
        cfg,
        (watch, subs),
        shutdown,
        &tx,
        &mut inbound,
        (machine, opened),
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

/// Do what the machine decided.
async fn perform(
    cfg: &SessionConfig,
    tx: &mpsc::Sender<v1::AgentMessage>,
    actions: Vec<Action>,
) -> Result<(), SessionError> {
    for a in actions {
        match a {
            Action::Send(m) => {
                observe(cfg, &m);
                tx.send(m)
                    .await
                    .map_err(|_| SessionError::Retry("stream closed".into()))?;
            }
            Action::ApplyStatus(s) => apply_status(cfg, s),
            Action::Submit(c) => match &cfg.steps {
                Some(steps) => steps.submit(c).await,
                None => tracing::warn!(
                    campaign = %c.campaign,
                    "the hub sent a campaign step to an agent that does not run campaigns"
                ),
            },
            Action::ApplyImports(u) => {
                if let Some(i) = &cfg.imports {
                    i.apply(u);
                }
            }
            Action::Certificate(c) => {
                // A failed renewal keeps the current certificate; the next try comes later.
                if let Err(e) = cfg.credentials.accept(&c).await {
                    tracing::error!(error = %e, "the renewed certificate could not be used");
                }
            }
            Action::End(e) => return Err(e),
        }
    }
    Ok(())
}

/// After the welcome: the opening messages, then deltas on change, heartbeats on the timer,
/// and what the hub sends. The watches were subscribed before the opening read the caches,
/// so no change falls between the two.
async fn follow(
    cfg: &SessionConfig,
    (watch, mut subs): (&ClusterWatch, Subscriptions),
    shutdown: &CancellationToken,
    tx: &mpsc::Sender<v1::AgentMessage>,
    inbound: &mut tonic::Streaming<v1::HubMessage>,
    (mut machine, opened): (Machine, Vec<Action>),
    heartbeat: Duration,
) -> Result<(), SessionError> {
    perform(cfg, tx, opened).await?;
    // Step statuses wait here across reconnects; this session sends them while it lives.
    let (_idle_steps, mut idle_steps_rx) = mpsc::channel::<v1::StepStatusReport>(1);
    let statuses = cfg.steps.as_ref().map(|s| s.statuses());
    let mut statuses_guard = match &statuses {
        Some(s) => Some(s.lock().await),
        None => None,
    };
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    // The next renewal try (Unix seconds): when the certificate says, then every minute
    // until one succeeds.
    let mut renew_try = cfg.credentials.renew_at();
    loop {
        let status_rx = match statuses_guard.as_mut() {
            Some(g) => &mut **g,
            None => &mut idle_steps_rx,
        };
        // A node's start-up bound passing changes the inventory with no watch event.
        let clock = watch.next_deadline().unwrap_or(Duration::from_secs(3600));
        let inputs = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = subs.nodes.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("cluster watch ended".into()));
                }
                // Coalesce a burst of watch events into one delta.
                tokio::time::sleep(cfg.coalesce).await;
                subs.nodes.borrow_and_update();
                // Nodes come and go with their pod ranges.
                vec![Input::Networks(watch.networks()), Input::Inventory(current(watch))]
            }
            _ = tokio::time::sleep(clock + Duration::from_millis(10)) => {
                vec![Input::Inventory(current(watch))]
            }
            _ = tick.tick() => {
                let failed = Failed::of(&watch.inventory());
                vec![Input::Tick(signals(watch, &failed))]
            }
            r = subs.exports.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("export watch ended".into()));
                }
                // Endpoint readiness changes fast: a short coalescing window keeps answers
                // within the convergence target.
                tokio::time::sleep(EXPORT_COALESCE).await;
                subs.exports.borrow_and_update();
                vec![Input::Exports(current_exports(cfg, watch))]
            }
            r = subs.namespaces.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("namespace watch ended".into()));
                }
                let current = subs.namespaces.borrow_and_update().clone();
                current.map(Input::Namespaces).into_iter().collect()
            }
            r = subs.loads.changed() => {
                if r.is_err() {
                    return Err(SessionError::Retry("inference sampler ended".into()));
                }
                let latest = subs.loads.borrow_and_update().clone();
                latest.map(|l| Input::Loads((*l).clone())).into_iter().collect()
            }
            Some(report) = status_rx.recv() => vec![Input::StepStatus(report)],
            () = until_unix(renew_try) => {
                let now = unix_secs();
                match cfg.credentials.renew_at() {
                    Some(at) if at > now => {
                        // Renewed since: wait for the new certificate's time.
                        renew_try = Some(at);
                        Vec::new()
                    }
                    _ => {
                        renew_try = Some(now + RENEW_RETRY_SECS);
                        match cfg.credentials.renewal() {
                            Ok(csr) => {
                                tracing::info!("renewing the agent's certificate");
                                vec![Input::Renew(csr)]
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot make a renewal request");
                                Vec::new()
                            }
                        }
                    }
                }
            }
            m = inbound.message() => vec![Input::Hub(m)],
        };
        for input in inputs {
            perform(cfg, tx, machine.on(input)).await?;
        }
    }
}

/// Seconds between renewal tries after one failed.
const RENEW_RETRY_SECS: i64 = 60;

/// Seconds since the Unix epoch.
fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Resolves at `at` (Unix seconds); never without one.
async fn until_unix(at: Option<i64>) {
    match at {
        Some(at) => {
            let left = (at - unix_secs()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(left)).await;
        }
        None => std::future::pending().await,
    }
}

/// The caches a session follows, subscribed before it reads them. A cache the agent does not
/// run is a channel that never changes.
struct Subscriptions {
    nodes: tokio::sync::watch::Receiver<u64>,
    exports: tokio::sync::watch::Receiver<u64>,
    namespaces: tokio::sync::watch::Receiver<Option<Vec<String>>>,
    loads: tokio::sync::watch::Receiver<Option<std::sync::Arc<v1::InferenceLoads>>>,
    /// The idle channels' senders, kept alive with them.
    _idle: Idle,
}

/// Senders of channels that never change.
struct Idle {
    _changes: tokio::sync::watch::Sender<u64>,
    _namespaces: tokio::sync::watch::Sender<Option<Vec<String>>>,
    _loads: tokio::sync::watch::Sender<Option<std::sync::Arc<v1::InferenceLoads>>>,
}

impl Subscriptions {
    fn new(cfg: &SessionConfig, watch: &ClusterWatch) -> Self {
        let (idle, idle_rx) = tokio::sync::watch::channel(0u64);
        let (idle_ns, idle_ns_rx) = tokio::sync::watch::channel(None);
        let (idle_loads, idle_loads_rx) = tokio::sync::watch::channel(None);
        let mut s = Self {
            nodes: watch.changes(),
            exports: cfg.exports.as_ref().map_or(idle_rx, |x| x.changes()),
            namespaces: cfg.imports.as_ref().map_or(idle_ns_rx, |i| i.namespaces()),
            loads: cfg.loads.clone().unwrap_or(idle_loads_rx),
            _idle: Idle {
                _changes: idle,
                _namespaces: idle_ns,
                _loads: idle_loads,
            },
        };
        s.nodes.borrow_and_update();
        s.exports.borrow_and_update();
        s.namespaces.borrow_and_update();
        s.loads.borrow_and_update();
        s
    }
}
