//! AgentService.Connect: authenticate the agent, register its cluster, then run the stream:
//! [`super::stream`] decides, this module does the I/O (inventory records, health signals,
//! outbox, imports). Runs on the leader only;
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
use tracing::Instrument;

use crate::controllers::Leadership;
use crate::controllers::health::{HealthCtl, log_transition};
use crate::discovery::exports::HeldExports;
use crate::fleet::outbox::OutboxReader;
use crate::fleet::stream::{self, Action, Input, Stream as Machine};
use crate::metrics::HubMetrics;
use crate::security::audit::Decision;
use crate::security::authz::Caller;
use crate::store::{keys, records};

/// Largest message an agent may send (a 5,000-node snapshot with every GPU resource fits);
/// a larger one ends the stream with OUT_OF_RANGE naming this limit.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The agent-facing service.
pub struct AgentSvc<B> {
    /// Messages per second one stream may send.
    pub message_rate: u32,
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
    /// TLS and the CA, revocations, the audit log.
    pub security: Arc<super::FleetSecurity>,
}

/// How a stream was admitted, and what every later message is checked against.
#[derive(Debug, Clone)]
struct Admitted {
    /// When its credential was issued (Unix seconds): a revocation after this ends it.
    issued_at_s: i64,
    /// When its certificate expires (Unix ms), if it has one.
    not_after_ms: Option<i64>,
    /// The certificate signed for the hello's CSR (a bootstrap over TLS).
    certificate: Option<v1::IssuedCertificate>,
    /// The join token it was admitted with, if any (`token <id>`, for the audit log).
    token: Option<String>,
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
    /// Who may open this stream: the cluster its certificate names; over TLS without one, a
    /// join token (one use spent) with a CSR, signed here; without TLS, a join token.
    async fn admit(&self, hello: &v1::Hello, caller: &Caller) -> Result<Admitted, Status> {
        use flotilla_core::security::{JoinToken, Principal};
        conv::cluster_name("hello.cluster", &hello.cluster).map_err(|e| e.to_status())?;
        let now = self.health.clock().unix_ms();
        if let Principal::Cluster(name) = &caller.principal {
            if *name != hello.cluster {
                return Err(Status::permission_denied(format!(
                    "hello.cluster: this certificate is for cluster {name:?}, not {:?}",
                    hello.cluster
                )));
            }
            let not_after = caller.not_after.map(|s| s * 1000);
            let issued = caller
                .not_before
                .map_or(0, |s| s + flotilla_api::pki::SKEW_SECS);
            if self.security.revocations.revoked(name, issued) {
                return Err(Status::permission_denied(format!(
                    "cluster {name:?} was removed from the fleet; rejoin it with a new token \
                     (flotctl join {name})"
                )));
            }
            return Ok(Admitted {
                issued_at_s: issued,
                not_after_ms: not_after,
                certificate: None,
                token: None,
            });
        }
        let tls =
            match caller.principal {
                Principal::Anonymous => Some(self.security.tls.as_ref().ok_or_else(|| {
                    Status::internal("an anonymous TLS peer on a hub without TLS")
                })?),
                Principal::Unauthenticated => None,
                _ => {
                    return Err(Status::permission_denied(
                        "only member clusters' agents connect here",
                    ));
                }
            };
        if hello.token.is_empty() {
            let why = match tls {
                Some(_) => {
                    "hello.token: no client certificate and no join token: start the agent \
                            with a join string (flotctl join), or, if its certificate expired while \
                            it was offline, with a new one"
                }
                None => "hello.token: a join token is required (flotctl join)",
            };
            return Err(Status::unauthenticated(why));
        }
        let token = JoinToken::parse(&hello.token)
            .map_err(|e| Status::unauthenticated(format!("hello.token: {e}")))?;
        if tls.is_some() && hello.csr.is_empty() {
            return Err(Status::invalid_argument(
                "hello.csr: a join over TLS sends a certificate request",
            ));
        }
        if hello.csr.len() > super::stream::MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "hello.csr: at most {} bytes",
                super::stream::MAX_CSR_BYTES
            )));
        }
        let refused = |e: crate::security::tokens::Refused| match e {
            crate::security::tokens::Refused::Token(t) => match t {
                flotilla_core::security::TokenRefused::OtherCluster { .. } => {
                    Status::permission_denied(format!("hello.token: {t}"))
                }
                _ => Status::unauthenticated(format!("hello.token: {t}")),
            },
            crate::security::tokens::Refused::Store(e) => store_err(e),
        };
        // Checked without spending first, so a join waiting for approval keeps its use.
        let rec = crate::security::tokens::admit(&self.backend, &token, &hello.cluster, now, false)
            .await
            .map_err(refused)?;
        if rec.require_approval {
            self.await_approval(&hello.cluster, &token.id, caller, now)
                .await?;
        }
        let issued = self
            .security
            .revocations
            .issue_time(&hello.cluster, now / 1000);
        let Some(tls) = tls else {
            // Without TLS there is no identity to issue: the token is the credential on every
            // connect until it expires.
            return Ok(Admitted {
                issued_at_s: issued,
                not_after_ms: None,
                certificate: None,
                token: Some(format!("token {}", token.id)),
            });
        };
        // Signed before the use is spent: a malformed CSR must not cost the operator a token.
        let (pem, not_after) = tls
            .sign_cluster(&hello.cluster, &hello.csr, issued)
            .map_err(|e| Status::invalid_argument(format!("hello.{e}")))?;
        crate::security::tokens::admit(&self.backend, &token, &hello.cluster, now, true)
            .await
            .map_err(refused)?;
        Ok(Admitted {
            issued_at_s: issued,
            not_after_ms: Some(not_after * 1000),
            certificate: Some(v1::IssuedCertificate {
                certificate_pem: pem,
                ca_bundle_pem: tls.bundle(),
                not_after_unix: not_after,
            }),
            token: Some(format!("token {}", token.id)),
        })
    }

    /// A join whose token asks for approval: recorded as waiting until an admin approves it.
    async fn await_approval(
        &self,
        cluster: &str,
        token_id: &str,
        caller: &Caller,
        now: i64,
    ) -> Result<(), Status> {
        let key = keys::approval_key(cluster);
        let (cur, _) = records::get::<B, v1::ApprovalRecord>(&self.backend, &key)
            .await
            .map_err(store_err)?;
        if cur
            .as_ref()
            .is_some_and(|a| a.approved && a.token_id == token_id)
        {
            return Ok(());
        }
        if cur.is_none() {
            let rec = v1::ApprovalRecord {
                cluster: cluster.to_string(),
                approved: false,
                token_id: token_id.to_string(),
                requested_at_unix_ms: now,
                from: caller.remote.map(|a| a.to_string()).unwrap_or_default(),
            };
            records::put_if(&self.backend, &key, &rec, 0)
                .await
                .map_err(store_err)?;
        }
        Err(Status::failed_precondition(format!(
            "cluster {cluster:?} is waiting for approval: an admin runs `flotctl cluster approve {cluster}`"
        )))
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
        let req_caller = tonic::Request::new(());
        let mut req_caller = req_caller;
        if let Some(c) = req.extensions().get::<Caller>() {
            req_caller.extensions_mut().insert(c.clone());
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
        let caller = Caller::of(&req_caller);
        let admitted = match self.admit(&hello, &caller).await {
            Ok(a) => a,
            Err(s) => {
                self.metrics.denied.inc();
                self.security.audit.record(
                    Some(&caller),
                    "flotilla.v1.AgentService/Connect:join",
                    &format!("cluster/{}", hello.cluster),
                    Decision::Denied(s.message().to_string()),
                    s.code(),
                );
                return Err(s);
            }
        };
        // From here on the stream speaks for its cluster, whatever its credential.
        let mut caller = caller;
        caller.principal = flotilla_core::security::Principal::Cluster(hello.cluster.clone());
        if let Some(t) = &admitted.token {
            caller.credential = Some(t.clone());
        }
        self.security.audit.record(
            Some(&caller),
            "flotilla.v1.AgentService/Connect:join",
            &format!("cluster/{}", hello.cluster),
            Decision::Allowed,
            tonic::Code::Ok,
        );
        let cluster = hello.cluster.clone();
        let joined = self.health.joined(&cluster);
        self.register(&hello, joined.as_ref()).await?;
        // What the store holds (read linearizably: the stream compares against it to skip
        // writes), so the agent resends only what differs.
        let (stored, _) =
            records::get::<B, v1::Inventory>(&self.backend, &keys::inventory_key(&cluster))
                .await
                .map_err(store_err)?;
        let held = match stored {
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
        let exports = HeldExports::load(&self.backend, &cluster)
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
                certificate: admitted.certificate.clone(),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        tracing::info!(cluster = %cluster, agent = %hello.agent_version, "agent connected");

        let discovery = self.discovery.clone();
        let builds = discovery.status_changes(&cluster);
        let routes = discovery.import_changes();
        let exec = Exec {
            backend: self.backend.clone(),
            health: self.health.clone(),
            leader: self.leader.clone(),
            limits: self.limits,
            metrics: self.metrics.clone(),
            discovery,
            campaigns: self.campaigns.clone(),
            // What leader-side producers want this agent to have (campaign steps).
            outbox: self.campaigns.outboxes.of(&cluster).reader(),
            imports: crate::discovery::imports::SentImports::default(),
            permit: Some(permit),
            tx,
            cluster: cluster.clone(),
            held,
            exports,
            security: self.security.clone(),
            caller,
            admitted,
            rate: {
                let r = f64::from(self.message_rate.max(1));
                flotilla_core::rate::Buckets::new(r, (4.0 * r).max(100.0), 1)
            },
            message_rate: self.message_rate,
        };
        let machine = Machine::new(&hello);
        self.metrics.agents_connected.inc();
        // Messages are read as they arrive, and each one counts as a sign of life then, even
        // while an earlier report is still being written (a slow store must not make a live
        // cluster Unreachable). Processing follows in order.
        let (arrived, messages) = tokio::sync::mpsc::channel(ARRIVED_BUFFER);
        {
            let (health, cluster) = (self.health.clone(), cluster.clone());
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
        let span = tracing::info_span!("agent_stream", cluster = %cluster);
        tokio::spawn(run_stream(exec, machine, (messages, builds, routes)).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The I/O behind one stream's [`Action`]s.
struct Exec<B> {
    backend: B,
    health: Arc<HealthCtl>,
    leader: Arc<dyn Leadership>,
    limits: ReportLimits,
    metrics: Arc<HubMetrics>,
    discovery: Arc<crate::discovery::Discovery>,
    campaigns: Arc<crate::campaigns::Campaigns>,
    outbox: OutboxReader,
    imports: crate::discovery::imports::SentImports,
    /// The join slot, held until the first report is stored or its time is up.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    tx: tokio::sync::mpsc::Sender<Result<v1::HubMessage, Status>>,
    cluster: String,
    held: Held,
    exports: HeldExports,
    security: Arc<super::FleetSecurity>,
    caller: Caller,
    admitted: Admitted,
    /// This stream's message budget.
    rate: flotilla_core::rate::Buckets<()>,
    message_rate: u32,
}

/// What the stream does after an action.
enum Flow {
    Go,
    /// Give this result back to the machine.
    Feed(Box<Input>),
    Stop,
}

impl<B: KvBackend + Clone> Exec<B> {
    async fn send(&self, m: v1::HubMessage) -> Flow {
        match self.tx.send(Ok(m)).await {
            Ok(()) => Flow::Go,
            Err(_) => Flow::Stop,
        }
    }

    async fn perform(&mut self, action: Action) -> Flow {
        match action {
            Action::Send(m) => self.send(m).await,
            Action::SendOutbox => {
                for m in self.outbox.take() {
                    if let Flow::Stop = self.send(m).await {
                        return Flow::Stop;
                    }
                }
                Flow::Go
            }
            Action::SendImports(keys) => {
                let table = self.discovery.table().load_full();
                let update = self.imports.update(
                    (&table, &self.discovery.import_cache),
                    &self.cluster,
                    keys.as_deref(),
                );
                match update {
                    Some(u) => {
                        self.send(v1::HubMessage {
                            msg: Some(v1::hub_message::Msg::Imports(u)),
                        })
                        .await
                    }
                    None => Flow::Go,
                }
            }
            Action::SetNamespaces(set) => {
                self.imports.set_namespaces(set);
                Flow::Go
            }
            Action::Store(msg) => {
                let started = std::time::Instant::now();
                let timed = matches!(stream::kind(&msg), "snapshot" | "delta");
                let r = handle(
                    (&self.backend, &self.health, &self.metrics, &self.limits),
                    &self.cluster,
                    (&mut self.held, &mut self.exports),
                    msg,
                )
                .await;
                if timed {
                    self.metrics
                        .report_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Flow::Feed(Box::new(Input::Done(r)))
            }
            Action::Observe(l) => {
                let now = self.health.clock().unix_ms();
                let r = self
                    .discovery
                    .samples
                    .observe(&self.cluster, &l, now)
                    .map(|()| None)
                    .map_err(|e| e.to_status());
                Flow::Feed(Box::new(Input::Done(r)))
            }
            Action::Health(s) => {
                self.health.report(&self.cluster, s);
                Flow::Go
            }
            Action::Leave => {
                self.security.audit.record(
                    Some(&self.caller),
                    "flotilla.v1.AgentService/Connect:leave",
                    &format!("cluster/{}", self.cluster),
                    Decision::Allowed,
                    tonic::Code::Ok,
                );
                self.health.left(&self.cluster);
                Flow::Go
            }
            Action::Forward(r) => {
                self.security.audit.record(
                    Some(&self.caller),
                    "flotilla.v1.AgentService/Connect:step_status",
                    &format!("campaign/{}#{} cluster/{}", r.campaign, r.seq, self.cluster),
                    Decision::Allowed,
                    tonic::Code::Ok,
                );
                self.campaigns.status(&self.cluster, r).await;
                Flow::Go
            }
            Action::Renew(csr) => {
                let Some(tls) = &self.security.tls else {
                    let _ = self
                        .tx
                        .send(Err(Status::failed_precondition(
                            "renew: this hub runs without TLS",
                        )))
                        .await;
                    return Flow::Stop;
                };
                let now = self.health.clock().unix_ms() / 1000;
                let issued = self.security.revocations.issue_time(&self.cluster, now);
                let signed = tls.sign_cluster(&self.cluster, &csr, issued);
                let code = signed
                    .as_ref()
                    .map_or(tonic::Code::InvalidArgument, |_| tonic::Code::Ok);
                self.security.audit.record(
                    Some(&self.caller),
                    "flotilla.v1.AgentService/Connect:renew",
                    &format!("cluster/{}", self.cluster),
                    match &signed {
                        Ok(_) => Decision::Allowed,
                        Err(e) => Decision::Denied(e.to_string()),
                    },
                    code,
                );
                match signed {
                    Ok((pem, not_after)) => {
                        self.send(v1::HubMessage {
                            msg: Some(v1::hub_message::Msg::Certificate(v1::IssuedCertificate {
                                certificate_pem: pem,
                                ca_bundle_pem: tls.bundle(),
                                not_after_unix: not_after,
                            })),
                        })
                        .await
                    }
                    Err(e) => {
                        let _ = self
                            .tx
                            .send(Err(Status::invalid_argument(format!("renew.{e}"))))
                            .await;
                        Flow::Stop
                    }
                }
            }
            Action::ReleaseJoinSlot => {
                self.permit.take();
                Flow::Go
            }
            Action::Count(kind) => {
                self.metrics.message(kind);
                Flow::Go
            }
            Action::NotLeader => {
                let _ = self.tx.send(Err(not_leader(&*self.leader))).await;
                Flow::Stop
            }
            Action::Reject(s) => {
                let _ = self.tx.send(Err(s)).await;
                Flow::Stop
            }
            Action::Close => Flow::Stop,
        }
    }
}

impl<B> Exec<B> {
    /// Why this stream's credential no longer holds, if it does not.
    fn credential_refusal(&self) -> Option<Status> {
        if self
            .security
            .revocations
            .revoked(&self.cluster, self.admitted.issued_at_s)
        {
            return Some(Status::permission_denied(format!(
                "cluster {:?} was removed from the fleet; its identity is revoked",
                self.cluster
            )));
        }
        let now = self.health.clock().unix_ms();
        match self.admitted.not_after_ms {
            // Aborted, not Unauthenticated: the agent reconnects with its renewed certificate
            // rather than stopping.
            Some(t) if now >= t => Some(Status::aborted(
                "the agent's certificate expired; reconnect with the renewed one",
            )),
            _ => None,
        }
    }
}

/// Resolves when a certificate valid until `not_after_ms` expires (never without one).
async fn expiry(not_after_ms: Option<i64>, health: &HealthCtl) {
    match not_after_ms {
        Some(t) => {
            let left = (t - health.clock().unix_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(left)).await;
        }
        None => std::future::pending().await,
    }
}

/// What a stream waits on besides its machine: the agent's messages, its cluster's export
/// status builds, and import batches.
type Feeds = (
    tokio::sync::mpsc::Receiver<Result<Option<v1::AgentMessage>, Status>>,
    tokio::sync::watch::Receiver<u64>,
    tokio::sync::broadcast::Receiver<crate::discovery::ImportsChanged>,
);

/// Run one stream: turn what arrives into inputs, and the machine's actions into I/O.
async fn run_stream<B: KvBackend + Clone>(
    mut exec: Exec<B>,
    mut machine: Machine,
    (mut messages, mut builds, mut routes): Feeds,
) {
    use tokio::sync::broadcast::error::RecvError;
    // An agent that never reports does not keep its join slot.
    let join_deadline = tokio::time::sleep(JOIN_SLOT_TIMEOUT);
    tokio::pin!(join_deadline);
    let (discovery, cluster) = (exec.discovery.clone(), exec.cluster.clone());
    let mut revocations = exec.security.revocations.changes();
    let mut next = Some(Input::Opened);
    'stream: loop {
        // The identity is checked before every input, not only at the handshake: a revoked
        // cluster's stream ends at once, an expired certificate's at its expiry.
        if let Some(refusal) = exec.credential_refusal() {
            exec.metrics.denied.inc();
            exec.security.audit.record(
                Some(&exec.caller),
                "flotilla.v1.AgentService/Connect:message",
                &format!("cluster/{cluster}"),
                Decision::Denied(refusal.message().to_string()),
                refusal.code(),
            );
            tracing::warn!(reason = %refusal.message(), "agent stream closed");
            let _ = exec.tx.send(Err(refusal)).await;
            break 'stream;
        }
        while let Some(input) = next.take() {
            for action in machine.on(input) {
                match exec.perform(action).await {
                    Flow::Go => {}
                    Flow::Feed(i) => next = Some(*i),
                    Flow::Stop => break 'stream,
                }
            }
        }
        next = Some(tokio::select! {
            m = messages.recv() => match m {
                Some(Ok(Some(msg))) => {
                    let now = exec.health.clock().monotonic().as_millis() as u64;
                    if !exec.rate.take(&(), now) {
                        let s = Status::resource_exhausted(format!(
                            "agent messages: over {} per second (--agent-message-rate); \
                             this stream is closed, other clusters are unaffected",
                            exec.message_rate
                        ));
                        exec.metrics.denied.inc();
                        exec.security.audit.record(
                            Some(&exec.caller),
                            "flotilla.v1.AgentService/Connect:message",
                            &format!("cluster/{cluster}"),
                            Decision::Denied(s.message().to_string()),
                            s.code(),
                        );
                        tracing::warn!(reason = %s.message(), "agent stream closed");
                        let _ = exec.tx.send(Err(s)).await;
                        break 'stream;
                    }
                    Input::Message { msg, leads: exec.leader.is_leader() }
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "agent stream ended");
                    // A message the hub could not take (over the size limit, undecodable):
                    // tell the agent why, rather than only closing.
                    if matches!(
                        e.code(),
                        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
                    ) {
                        exec.metrics.denied.inc();
                        let _ = exec.tx.send(Err(e)).await;
                    }
                    Input::Ended
                }
                Some(Ok(None)) | None => Input::Ended,
            },
            _ = &mut join_deadline, if machine.holds_join_slot() => Input::JoinDeadline,
            Ok(()) = builds.changed() => Input::Statuses(discovery.statuses_for(&cluster)),
            // Checked at the top of the loop; nothing to feed the machine.
            Ok(()) = revocations.changed() => continue 'stream,
            () = expiry(exec.admitted.not_after_ms, &exec.health) => continue 'stream,
            () = exec.outbox.changed() => Input::Outbox,
            r = routes.recv(), if machine.wants_imports() => match r {
                Ok(keys) => Input::Imports(keys),
                // Missed batches: send the whole set again.
                Err(RecvError::Lagged(_)) => Input::Imports(None),
                Err(RecvError::Closed) => Input::ImportsClosed,
            },
        });
    }
    exec.metrics.agents_connected.dec();
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

/// Store one report (snapshot, delta, exports, networks). Writes touch only this cluster's
/// keys.
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
        // The stream's machine sends only reports here.
        _ => return Err(Status::internal("not a report")),
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
