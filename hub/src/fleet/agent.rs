//! AgentService.Connect: authenticate the agent, register its cluster, and turn its snapshot,
//! deltas and heartbeats into inventory records and health signals. Runs on the leader only;
//! other replicas answer UNAVAILABLE with the leader's address.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::fleet::{self as conv, ReportLimits};
use flotilla_api::convert::kv::LEADER_HINT_KEY;
use flotilla_api::v1;
use flotilla_core::health::Transition;
use flotilla_core::inventory::{NodeInventory, PoolTotals};
use flotilla_core::kv::KvBackend;
use flotilla_core::membership::{self, Identity};
use flotilla_core::report;
use futures::Stream;
use prost::Message;
use prost::bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::controllers::Leadership;
use crate::controllers::health::{HealthCtl, log_transition};
use crate::discovery::exports::HeldExports;
use crate::metrics::HubMetrics;
use crate::store::{keys, records};

/// The agent-facing service.
pub struct AgentSvc<B> {
    /// Store.
    pub backend: B,
    /// Health controller.
    pub health: Arc<HealthCtl>,
    /// Leadership.
    pub leader: Arc<dyn Leadership>,
    /// Report limits.
    pub limits: ReportLimits,
    /// Heartbeat interval the hub asks for.
    pub heartbeat: Duration,
    /// Metrics.
    pub metrics: Arc<HubMetrics>,
    /// Admission to the join handshake (see `--max-concurrent-joins`).
    pub joins: Arc<tokio::sync::Semaphore>,
    /// Discovery, whose export status goes back to the agent.
    pub discovery: Arc<crate::discovery::Discovery>,
    /// Campaigns: the cluster's outbox, and where step statuses go.
    pub campaigns: Arc<crate::campaigns::Campaigns>,
}

/// UNAVAILABLE naming the leader's address (in `flotilla-leader`), when this replica knows it.
pub fn not_leader(leader: &dyn Leadership) -> Status {
    let mut s = Status::unavailable("this hub replica is not the leader; reconnect to the leader");
    if let Some(addr) = leader.leader_addr()
        && let Ok(v) = addr.parse()
    {
        s.metadata_mut().insert(LEADER_HINT_KEY, v);
    }
    s
}

/// The namespaces an `ImportNamespaces` names, validated: DNS labels, at most
/// [`crate::discovery::imports::MAX_IMPORT_NAMESPACES`].
fn import_namespaces(
    n: &v1::ImportNamespaces,
) -> Result<std::collections::HashSet<String>, Status> {
    use crate::discovery::imports::MAX_IMPORT_NAMESPACES;
    if n.names.len() > MAX_IMPORT_NAMESPACES {
        return Err(conv::Invalid {
            field: "import_namespaces.names".into(),
            reason: format!(
                "{} namespaces, over the limit of {MAX_IMPORT_NAMESPACES}",
                n.names.len()
            ),
        }
        .to_status());
    }
    n.names
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            if conv::is_dns_label(ns) {
                Ok(ns.clone())
            } else {
                Err(conv::Invalid {
                    field: format!("import_namespaces.names[{i}]"),
                    reason: format!("{ns:?} is not a namespace name (a DNS label)"),
                }
                .to_status())
            }
        })
        .collect()
}

fn store_err(e: flotilla_core::kv::KvError) -> Status {
    flotilla_api::convert::kv::to_status(e)
}

/// Messages read ahead of processing per stream (heartbeats keep arriving while a report is
/// written).
const ARRIVED_BUFFER: usize = 64;

/// How long a connected agent may hold a join slot before its first report.
const JOIN_SLOT_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream's copy of its cluster's nodes: each node encoded (a fraction of the memory of a
/// decoded one, and what the stored record is assembled from) and the pool totals, so a delta
/// touches only the nodes it carries.
#[derive(Clone, Default)]
struct Held {
    nodes: BTreeMap<String, Bytes>,
    pools: PoolTotals,
    /// Whether the store holds this state (false until the first write of a new cluster).
    stored: bool,
}

/// The bytes a node is held and stored as: as the agent sent it, unless validation found its
/// numbers impossible, in which case the record says so (and counts nothing) for every
/// reader.
fn stored_bytes(w: &v1::NodeInventory, c: &NodeInventory) -> Bytes {
    match (&c.problem, w.problem.is_empty()) {
        (Some(_), true) => Bytes::from(conv::node_to_wire(c).encode_to_vec()),
        _ => Bytes::from(w.encode_to_vec()),
    }
}

impl Held {
    /// From validated wire nodes and their core form.
    fn from_nodes(wire: &[v1::NodeInventory], core: &[NodeInventory]) -> Self {
        let mut pools = PoolTotals::default();
        for n in core {
            pools.add(n);
        }
        Self {
            nodes: wire
                .iter()
                .zip(core)
                .map(|(w, c)| (w.name.clone(), stored_bytes(w, c)))
                .collect(),
            pools,
            stored: false,
        }
    }

    /// Take a held node out of the pool totals (decoding only that node).
    fn uncount(&mut self, name: &str) -> Result<(), Status> {
        let Some(b) = self.nodes.get(name) else {
            return Ok(());
        };
        let wire = v1::NodeInventory::decode(b.clone())
            .map_err(|e| Status::internal(format!("a held node no longer decodes: {e}")))?;
        let core = conv::node_from_wire(&wire, "held", &ReportLimits::unlimited())
            .map_err(|e| Status::internal(format!("a held node no longer validates: {e}")))?;
        self.pools.remove(&core);
        Ok(())
    }

    /// Apply a validated delta; returns whether anything changed.
    fn apply_delta(
        &mut self,
        remove: &[String],
        wire: &[v1::NodeInventory],
        core: &[NodeInventory],
    ) -> Result<bool, Status> {
        let mut changed = false;
        for r in remove {
            if self.nodes.contains_key(r) {
                self.uncount(r)?;
                self.nodes.remove(r);
                changed = true;
            }
        }
        for (w, c) in wire.iter().zip(core) {
            let b = stored_bytes(w, c);
            if self.nodes.get(&w.name) == Some(&b) {
                continue;
            }
            self.uncount(&w.name)?;
            self.pools.add(c);
            self.nodes.insert(w.name.clone(), b);
            changed = true;
        }
        Ok(changed)
    }

    /// The stored inventory record's bytes, stamped `now_unix_ms`.
    fn record(&self, cluster: &str, now_unix_ms: i64) -> Vec<u8> {
        let pools: Vec<v1::PoolInventory> =
            self.pools.pools().iter().map(conv::pool_to_wire).collect();
        records::encode_inventory(cluster, self.nodes.values(), &pools, now_unix_ms)
    }
}

impl<B: KvBackend + Clone> AgentSvc<B> {
    async fn authenticate(&self, hello: &v1::Hello) -> Result<(), Status> {
        conv::cluster_name("hello.cluster", &hello.cluster).map_err(|e| e.to_status())?;
        if hello.token.is_empty() {
            return Err(Status::unauthenticated(
                "hello.token: a join token is required (flotctl join)",
            ));
        }
        // Locally first; a token this replica has not applied yet is looked up linearizably.
        let key = keys::token_key(&hello.token);
        let (mut rec, _) = records::get_local::<B, v1::JoinTokenRecord>(&self.backend, &key)
            .await
            .map_err(store_err)?;
        if rec.is_none() {
            rec = records::get::<B, v1::JoinTokenRecord>(&self.backend, &key)
                .await
                .map_err(store_err)?
                .0;
        }
        let Some(rec) = rec else {
            return Err(Status::unauthenticated("hello.token: unknown join token"));
        };
        if rec.expires_at_unix_ms <= self.health.clock().unix_ms() {
            return Err(Status::unauthenticated(
                "hello.token: the join token has expired; create a new one with flotctl join",
            ));
        }
        if rec.cluster != hello.cluster {
            return Err(Status::permission_denied(format!(
                "hello.token: this token is for cluster {:?}, not {:?}",
                rec.cluster, hello.cluster
            )));
        }
        Ok(())
    }

    /// Create or refresh the cluster record, with the (re)join's health transition, in one
    /// write.
    async fn register(&self, hello: &v1::Hello, tr: Option<&Transition>) -> Result<(), Status> {
        if let Some(tr) = tr {
            log_transition(tr);
        }
        let now = self.health.clock().unix_ms();
        let identity = Identity {
            region: hello.region.clone(),
            kubernetes_version: hello.kubernetes_version.clone(),
            agent_version: hello.agent_version.clone(),
            labels: hello
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            campaigns: hello.campaigns,
        };
        records::update::<B, v1::Cluster, _>(
            &self.backend,
            &keys::cluster_key(&hello.cluster),
            |cur| {
                let cur = cur.as_ref().map(conv::cluster_from_wire);
                membership::register(cur.as_ref(), &hello.cluster, &identity, tr, now)
                    .map(|c| conv::cluster_to_wire(&c))
            },
        )
        .await
        .map_err(store_err)?;
        Ok(())
    }
}

type HubStream = Pin<Box<dyn Stream<Item = Result<v1::HubMessage, Status>> + Send>>;

/// How long a connect waits for this replica's leadership to settle before refusing.
const LEADERSHIP_SETTLE: Duration = Duration::from_secs(2);

impl<B: KvBackend + Clone> AgentSvc<B> {
    /// Whether this replica leads with its health tracking running. While that is about to be
    /// true (it leads but the controllers have not started yet, or no leader is known at all)
    /// the agent is held for a moment rather than sent away to come straight back.
    async fn settled_leader(&self) -> bool {
        let until = tokio::time::Instant::now() + LEADERSHIP_SETTLE;
        loop {
            let leads = self.leader.is_leader();
            if leads && self.health.active() {
                return true;
            }
            let settling = leads || self.leader.leader_addr().is_none();
            if !settling || tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl<B: KvBackend + Clone> v1::agent_service_server::AgentService for AgentSvc<B> {
    type ConnectStream = HubStream;

    async fn connect(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<HubStream>, Status> {
        if !self.settled_leader().await {
            return Err(not_leader(&*self.leader));
        }
        // Wait for a turn before the hello timeout starts; the permit is held until the
        // first report is stored.
        let permit = self
            .joins
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the hub is shutting down"))?;
        if !self.leader.is_leader() {
            return Err(not_leader(&*self.leader));
        }
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "msg: the first message must be a hello",
            ));
        };
        self.authenticate(&hello).await?;
        let cluster = hello.cluster.clone();
        let joined = self.health.joined(&cluster);
        self.register(&hello, joined.as_ref()).await?;
        // What the store holds (read linearizably: the stream compares against it to skip
        // writes), so the agent resends only what differs.
        let (stored, _) =
            records::get::<B, v1::Inventory>(&self.backend, &keys::inventory_key(&cluster))
                .await
                .map_err(store_err)?;
        let mut held = match stored {
            Some(inv) => {
                let core = conv::nodes_from_wire(&inv.nodes, "stored", &ReportLimits::unlimited())
                    .map_err(|e| Status::internal(format!("the stored inventory: {e}")))?;
                Held {
                    stored: true,
                    ..Held::from_nodes(&inv.nodes, &core)
                }
            }
            None => Held::default(),
        };
        let mut exports = HeldExports::load(&self.backend, &cluster)
            .await
            .map_err(store_err)?;
        let digests: std::collections::HashMap<String, Vec<u8>> = held
            .nodes
            .iter()
            .map(|(name, b)| (name.clone(), report::digest(b).to_vec()))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let welcome = v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Welcome(v1::Welcome {
                heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
                held: digests,
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        tracing::info!(cluster = %cluster, agent = %hello.agent_version, "agent connected");

        let (backend, health, leader, limits) = (
            self.backend.clone(),
            self.health.clone(),
            self.leader.clone(),
            self.limits,
        );
        let metrics = self.metrics.clone();
        let discovery = self.discovery.clone();
        let mut builds = discovery.status_changes(&cluster);
        // Imports, for an agent that maintains ServiceImports: the whole set now, then what
        // each import batch changed.
        let mut want_imports = hello.imports;
        // An agent reporting its namespaces gets nothing until the first report names them.
        let by_namespace = hello.imports_by_namespace;
        let mut routes = discovery.import_changes();
        let mut imports = crate::discovery::imports::SentImports::default();
        if want_imports
            && imports.ready(by_namespace)
            && let Some(u) = imports.update(
                (&discovery.table().load(), &discovery.import_cache),
                &cluster,
                None,
            )
        {
            let m = v1::HubMessage {
                msg: Some(v1::hub_message::Msg::Imports(u)),
            };
            tx.send(Ok(m))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
        }
        // What leader-side producers want this agent to have (campaign steps): everything held
        // now, then each change.
        let mut outbox = self.campaigns.outboxes.of(&cluster).reader();
        for m in outbox.take() {
            tx.send(Ok(m))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
        }
        let campaigns = self.campaigns.clone();
        // What was last sent, so an unchanged status is not sent again.
        let mut sent_status: Option<Vec<v1::ExportStatus>> = None;
        metrics.agents_connected.inc();
        let mut permit = Some(permit);
        // An agent that never reports does not keep its join slot.
        let join_deadline = tokio::time::sleep(JOIN_SLOT_TIMEOUT);
        // Messages are read as they arrive, and each one counts as a sign of life then, even
        // while an earlier report is still being written (a slow store must not make a live
        // cluster Unreachable). Processing follows in order.
        let (arrived, mut messages) = tokio::sync::mpsc::channel(ARRIVED_BUFFER);
        {
            let (health, cluster) = (health.clone(), cluster.clone());
            tokio::spawn(async move {
                loop {
                    let m = inbound.message().await;
                    let more = matches!(m, Ok(Some(_)));
                    if more {
                        health.seen(&cluster);
                    }
                    if arrived.send(m).await.is_err() || !more {
                        break;
                    }
                }
            });
        }
        tokio::spawn(async move {
            tokio::pin!(join_deadline);
            loop {
                let next = tokio::select! {
                    m = messages.recv() => m.unwrap_or(Ok(None)),
                    _ = &mut join_deadline, if permit.is_some() => {
                        permit.take();
                        continue;
                    }
                    // A build changed one of this cluster's services: tell the agent if its
                    // exports' status changed.
                    Ok(()) = builds.changed() => {
                        let status = discovery.statuses_for(&cluster);
                        if sent_status.as_ref() != Some(&status) && !(status.is_empty() && sent_status.is_none()) {
                            let m = v1::HubMessage {
                                msg: Some(v1::hub_message::Msg::ExportStatus(v1::ExportStatuses { exports: status.clone() })),
                            };
                            if tx.send(Ok(m)).await.is_err() {
                                break;
                            }
                            sent_status = Some(status);
                        }
                        continue;
                    }
                    () = outbox.changed() => {
                        let mut gone = false;
                        for m in outbox.take() {
                            if tx.send(Ok(m)).await.is_err() {
                                gone = true;
                                break;
                            }
                        }
                        if gone {
                            break;
                        }
                        continue;
                    }
                    r = routes.recv(), if want_imports && imports.ready(by_namespace) => {
                        let keys = match r {
                            Ok(keys) => keys,
                            // Missed batches: send the whole set again.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                want_imports = false;
                                continue;
                            }
                        };
                        let table = discovery.table().load_full();
                        if let Some(u) = imports.update((&table, &discovery.import_cache), &cluster, keys.as_deref()) {
                            let m = v1::HubMessage { msg: Some(v1::hub_message::Msg::Imports(u)) };
                            if tx.send(Ok(m)).await.is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(cluster = %cluster, error = %e, "agent stream ended");
                        break;
                    }
                };
                if !leader.is_leader() {
                    let _ = tx.send(Err(not_leader(&*leader))).await;
                    break;
                }
                let started = std::time::Instant::now();
                let kind = match &msg.msg {
                    Some(v1::agent_message::Msg::Snapshot(_)) => "snapshot",
                    Some(v1::agent_message::Msg::Delta(_)) => "delta",
                    Some(v1::agent_message::Msg::Heartbeat(_)) => "heartbeat",
                    Some(v1::agent_message::Msg::Leave(_)) => "leave",
                    Some(v1::agent_message::Msg::Exports(_)) => "exports",
                    Some(v1::agent_message::Msg::ExportsDelta(_)) => "exports_delta",
                    Some(v1::agent_message::Msg::Loads(_)) => "loads",
                    Some(v1::agent_message::Msg::Networks(_)) => "networks",
                    Some(v1::agent_message::Msg::ImportNamespaces(_)) => "import_namespaces",
                    Some(v1::agent_message::Msg::StepStatus(_)) => "step_status",
                    _ => "other",
                };
                // Step statuses go to the campaign controller, named by this stream's cluster.
                if let Some(v1::agent_message::Msg::StepStatus(report)) = msg.msg {
                    metrics.message(kind);
                    campaigns.status(&cluster, report).await;
                    continue;
                }
                // The namespaces to import for: stream state only; the whole set under them
                // goes now.
                if let Some(v1::agent_message::Msg::ImportNamespaces(n)) = &msg.msg {
                    match import_namespaces(n) {
                        Ok(set) => {
                            metrics.message(kind);
                            imports.set_namespaces(set);
                            if want_imports
                                && let Some(u) = imports.update(
                                    (&discovery.table().load(), &discovery.import_cache),
                                    &cluster,
                                    None,
                                )
                            {
                                let m = v1::HubMessage {
                                    msg: Some(v1::hub_message::Msg::Imports(u)),
                                };
                                if tx.send(Ok(m)).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            metrics.message("rejected");
                            let _ = tx.send(Err(e)).await;
                            break;
                        }
                    }
                    continue;
                }
                // Load samples are soft state: no store write, no reply.
                if let Some(v1::agent_message::Msg::Loads(l)) = &msg.msg {
                    let r = discovery
                        .samples
                        .observe(&cluster, l, health.clock().unix_ms());
                    metrics.message(if r.is_err() { "rejected" } else { kind });
                    if let Err(e) = r {
                        let _ = tx.send(Err(e.to_status())).await;
                        break;
                    }
                    continue;
                }
                let result = handle(
                    (&backend, &health, &metrics, &limits),
                    &cluster,
                    (&mut held, &mut exports),
                    msg,
                )
                .await;
                metrics.message(if result.is_err() { "rejected" } else { kind });
                if matches!(kind, "snapshot" | "delta") {
                    metrics
                        .report_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                match result {
                    Ok(Some(reply)) => {
                        // The join is done once its first report is stored.
                        permit.take();
                        if tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(s) => {
                        // A bad report is rejected whole; the stream stays usable.
                        if tx.send(Err(s)).await.is_err() {
                            break;
                        }
                        break;
                    }
                }
            }
            metrics.agents_connected.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Most networks one cluster may report.
pub const MAX_NETWORKS: usize = 4096;

/// A cluster's networks, validated (each a CIDR), in canonical form.
fn networks_from_wire(n: &v1::Networks) -> Result<Vec<String>, Status> {
    if n.cidrs.len() > MAX_NETWORKS {
        return Err(conv::Invalid {
            field: "networks.cidrs".into(),
            reason: format!("at most {MAX_NETWORKS}, got {}", n.cidrs.len()),
        }
        .to_status());
    }
    let mut out = n
        .cidrs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<flotilla_core::routing::Cidr>()
                .map(|c| c.to_string())
                .map_err(|e| {
                    conv::Invalid {
                        field: format!("networks.cidrs[{i}]"),
                        reason: e,
                    }
                    .to_status()
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Process one message after the hello. Writes touch only this cluster's keys.
async fn handle<B: KvBackend>(
    ctx: (&B, &HealthCtl, &HubMetrics, &ReportLimits),
    cluster: &str,
    (held, exports): (&mut Held, &mut HeldExports),
    msg: v1::AgentMessage,
) -> Result<Option<v1::HubMessage>, Status> {
    use v1::agent_message::Msg;
    let (backend, health, metrics, limits) = ctx;
    let (snapshot, upsert, remove, at) = match &msg.msg {
        Some(Msg::Exports(s)) => (Some(s.exports.as_slice()), &[][..], &[][..], "exports"),
        Some(Msg::ExportsDelta(d)) => (
            None,
            d.upsert.as_slice(),
            d.remove.as_slice(),
            "exports_delta",
        ),
        _ => (None, &[][..], &[][..], ""),
    };
    if !at.is_empty() {
        let (ops, next) =
            crate::discovery::exports::plan(cluster, exports, snapshot, upsert, remove, at)
                .map_err(|e| e.to_status())?;
        let revision = crate::discovery::exports::write(backend, ops)
            .await
            .map_err(store_err)?;
        *exports = next;
        return Ok(Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Ack(v1::Ack { revision })),
        }));
    }
    // Health transitions are queued by `health` and written by the health controller,
    // retried until stored; a slow or failed write never ends the agent's stream.
    let (next, changed, signals) = match msg.msg {
        Some(Msg::Hello(_)) => return Err(Status::invalid_argument("msg: hello was already sent")),
        Some(Msg::Heartbeat(hb)) => {
            let s = conv::signals_from_wire(hb.signals.as_ref(), "heartbeat.signals")
                .map_err(|e| e.to_status())?;
            health.report(cluster, s);
            return Ok(None);
        }
        Some(Msg::Leave(_)) => {
            health.left(cluster);
            return Ok(None);
        }
        Some(Msg::Snapshot(s)) => {
            // Validated into core types once, here; the pool totals come from them.
            let core = conv::nodes_from_wire(&s.nodes, "snapshot.nodes", limits)
                .map_err(|e| e.to_status())?;
            let signals = conv::signals_from_wire(s.signals.as_ref(), "snapshot.signals")
                .map_err(|e| e.to_status())?;
            let next = Held::from_nodes(&s.nodes, &core);
            let changed = next.nodes != held.nodes;
            (next, changed, signals)
        }
        Some(Msg::Delta(d)) => {
            let core = conv::nodes_from_wire(&d.upsert, "delta.upsert", limits)
                .map_err(|e| e.to_status())?;
            let signals = conv::signals_from_wire(d.signals.as_ref(), "delta.signals")
                .map_err(|e| e.to_status())?;
            let mut next = held.clone();
            let changed = next.apply_delta(&d.remove, &d.upsert, &core)?;
            if next.nodes.len() > limits.max_nodes {
                return Err(conv::Invalid {
                    field: "delta.upsert".into(),
                    reason: format!(
                        "the cluster would have {} nodes, over the limit of {}",
                        next.nodes.len(),
                        limits.max_nodes
                    ),
                }
                .to_status());
            }
            (next, changed, signals)
        }
        Some(
            Msg::Exports(_)
            | Msg::ExportsDelta(_)
            | Msg::Loads(_)
            | Msg::ImportNamespaces(_)
            | Msg::StepStatus(_),
        ) => {
            unreachable!("handled above")
        }
        Some(Msg::Networks(n)) => {
            let cidrs = networks_from_wire(&n)?;
            records::update::<B, v1::Cluster, _>(backend, &keys::cluster_key(cluster), |cur| {
                let mut c = cur?;
                (c.networks != cidrs).then(|| {
                    c.networks = cidrs.clone();
                    c
                })
            })
            .await
            .map_err(store_err)?;
            return Ok(None);
        }
        None => return Err(Status::invalid_argument("msg: empty message")),
    };
    // A resync that matches what the hub holds writes nothing (0: no new revision).
    let mut revision = 0;
    if changed || !held.stored {
        let write_started = std::time::Instant::now();
        // Only this stream writes this cluster's inventory, so no compare is needed.
        revision = records::put_bytes(
            backend,
            &keys::inventory_key(cluster),
            next.record(cluster, health.clock().unix_ms()),
        )
        .await
        .map_err(store_err)?;
        metrics
            .store_write_seconds
            .observe(write_started.elapsed().as_secs_f64());
        *held = Held {
            stored: true,
            ..next
        };
    }
    health.report(cluster, signals);
    Ok(Some(v1::HubMessage {
        msg: Some(v1::hub_message::Msg::Ack(v1::Ack { revision })),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_namespaces_are_dns_labels_within_the_limit() {
        let ok = import_namespaces(&v1::ImportNamespaces {
            names: vec!["ml".into(), "web".into()],
        })
        .unwrap();
        assert_eq!(ok.len(), 2);
        let bad = import_namespaces(&v1::ImportNamespaces {
            names: vec!["ml".into(), "Not_A_Label".into()],
        })
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(
            bad.message().contains("import_namespaces.names[1]"),
            "{}",
            bad.message()
        );
        let many = import_namespaces(&v1::ImportNamespaces {
            names: (0..=crate::discovery::imports::MAX_IMPORT_NAMESPACES)
                .map(|i| format!("ns{i}"))
                .collect(),
        })
        .unwrap_err();
        assert!(
            many.message().contains("over the limit"),
            "{}",
            many.message()
        );
    }
}
