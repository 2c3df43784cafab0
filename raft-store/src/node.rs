//! A store member: the Raft instance, its storage, its gRPC server, and the [`KvBackend`]
//! implementation that any member serves (followers forward writes and linearizable reads to
//! the leader).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use flotilla_core::kv::{
    KvBackend, KvError, Limits, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult,
    WatchRequest, WatchStream, validate_range, validate_txn, validate_watch,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::data_dir::{CacheSizes, DataDir};
use crate::error::StoreError;
use crate::network::{Faults, NetCtx, NetworkFactory};
use crate::state_machine::{SmConfig, SmReader};
use crate::types::{Applied, Command, NodeId, Raft};

/// Metadata key marking a request forwarded by another member (forwarded at most once).
pub(crate) const FORWARDED_KEY: &str = "flotilla-forwarded";

/// Timing and retention knobs.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept in the log behind a snapshot (so slightly lagging followers need no snapshot).
    pub logs_kept_after_snapshot: u64,
    /// History window for watches and past reads, in revisions.
    pub history_revisions: i64,
    /// How long a write may wait for commit before its outcome is reported unknown.
    pub write_timeout: Duration,
    /// Largest snapshot chunk sent in one InstallSnapshot message, in bytes.
    pub snapshot_chunk_bytes: u64,
    /// Page cache of the redb files.
    pub cache: CacheSizes,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            snapshot_after_logs: 20_000,
            logs_kept_after_snapshot: 2_000,
            history_revisions: SmConfig::default().history_revisions,
            write_timeout: Duration::from_secs(5),
            snapshot_chunk_bytes: 3 * 1024 * 1024,
            cache: CacheSizes::default(),
        }
    }
}

/// Everything a member needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This member's id (>= 1, unique in the cluster, fixed for the data directory's life).
    pub node_id: NodeId,
    /// Where the log and state machine live.
    pub data_dir: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address other members use to reach this one (default: the bound listen address).
    pub advertise: Option<String>,
    /// A member of an existing cluster to join; `None` bootstraps a new single-node cluster
    /// when the data directory is empty.
    pub join: Option<String>,
    /// Timing and retention.
    pub tuning: Tuning,
    /// Request size limits.
    pub limits: Limits,
    /// Injected network faults (tests only).
    pub faults: Option<Arc<Faults>>,
    /// More gRPC services to serve on this member's port (the hub's fleet API).
    pub extra_services: Option<ExtraServices>,
}

/// Builds more gRPC services for a member's port, given the member (so they can use it).
#[derive(Clone)]
pub struct ExtraServices(pub Arc<dyn Fn(StoreNode) -> tonic::service::Routes + Send + Sync>);

impl std::fmt::Debug for ExtraServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraServices")
    }
}

impl NodeConfig {
    /// A config with defaults for everything but identity and location.
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            listen,
            advertise: None,
            join: None,
            tuning: Tuning::default(),
            limits: Limits::default(),
            faults: None,
            extra_services: None,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) addr: String,
    pub(crate) raft: Raft,
    pub(crate) reader: Arc<SmReader>,
    pub(crate) net: Arc<NetCtx>,
    pub(crate) limits: Limits,
    pub(crate) write_timeout: Duration,
    pub(crate) cluster_id: Arc<RwLock<Option<String>>>,
    pub(crate) data: std::sync::Mutex<DataDir>,
    proposals: mpsc::Sender<Proposal>,
}

/// A client transaction waiting to be proposed, with where to send its outcome.
type Proposal = (TxnRequest, oneshot::Sender<Result<TxnResult, WriteError>>);

/// Most transactions proposed in one log entry.
const MAX_BATCH: usize = 512;
/// Log entries of transactions in flight at once. One gives the largest batches; openraft 0.9
/// serializes appends anyway (measured: 2 was ~5% slower at 256 clients).
const MAX_IN_FLIGHT: usize = 1;

/// Group commit: drains queued transactions into one log entry each round, so one fsync (and
/// one replication round trip) serves many writes. openraft 0.9 fsyncs once per entry.
async fn propose_loop(node: StoreNode, mut rx: mpsc::Receiver<Proposal>, token: CancellationToken) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let first = tokio::select! {
            _ = token.cancelled() => return,
            p = rx.recv() => match p { Some(p) => p, None => return },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Whatever queued while we waited for a slot joins this entry.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let node = node.clone();
        tokio::spawn(
            async move {
                let (reqs, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let n = reqs.len();
                let outcome = node.write(Command::Txns(reqs)).await;
                drop(permit);
                match outcome {
                    Ok(Applied::Txns(results)) if results.len() == n => {
                        for (w, r) in waiters.into_iter().zip(results) {
                            let _ = w.send(Ok(r));
                        }
                    }
                    Ok(other) => {
                        let e = KvError::Internal(format!("unexpected apply result {other:?}"));
                        for w in waiters {
                            let _ = w.send(Err(WriteError::Kv(e.clone())));
                        }
                    }
                    Err(e) => {
                        for w in waiters {
                            let _ = w.send(Err(e.clone()));
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// A handle to a running member. Cheap to clone.
#[derive(Clone)]
pub struct StoreNode {
    pub(crate) inner: Arc<Inner>,
}

/// A started member: its handle and the task serving gRPC.
pub struct RunningNode {
    /// The member.
    pub node: StoreNode,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    token: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// Stops Raft and the server, and waits until the data directory is released.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.token.cancel();
        self.wait().await
    }

    /// Resolves when the server stops (after the shutdown token fires).
    pub async fn wait(self) -> Result<(), StoreError> {
        let raft = self.node.inner.raft.clone();
        let served = self.server.await;
        raft.shutdown()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        served
            .map_err(|e| StoreError::Network(e.to_string()))?
            .map_err(|e| StoreError::Network(e.to_string()))
    }
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(40)
}

async fn admin_client(
    addr: &str,
) -> Result<v1::store_admin_client::StoreAdminClient<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(v1::store_admin_client::StoreAdminClient::new(channel))
}

impl StoreNode {
    /// Opens the data directory, starts Raft and the gRPC server, and bootstraps or joins.
    pub async fn start(
        config: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<RunningNode, StoreError> {
        let NodeConfig {
            node_id,
            data_dir,
            listen,
            advertise,
            join,
            tuning,
            limits,
            faults,
            extra_services,
        } = config;
        if node_id == 0 {
            return Err(StoreError::Config("node id must be >= 1".into()));
        }
        let mut data = DataDir::open_with(&data_dir, node_id, tuning.cache)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| StoreError::Network(format!("bind {listen}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| StoreError::Network(e.to_string()))?;
        let addr = advertise.unwrap_or_else(|| bound.to_string());

        // Before touching the cluster, make sure this directory is not another cluster's.
        if let Some(j) = &join {
            let status = (|| async {
                let mut c = admin_client(j).await?;
                c.status(v1::StatusRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| e.to_string())
            })
            .retry(retry_policy())
            .await
            .map_err(|e| StoreError::Network(format!("join {j}: {e}")))?;
            match &data.cluster_id {
                Some(c) if !status.cluster_id.is_empty() && *c != status.cluster_id => {
                    return Err(StoreError::WrongCluster {
                        dir: data_dir.clone(),
                        stored: c.clone(),
                        requested: status.cluster_id,
                    });
                }
                Some(_) => {}
                None if status.cluster_id.is_empty() => {
                    return Err(StoreError::Network(format!(
                        "join {j}: that member has no cluster yet"
                    )));
                }
                None => {
                    // A fresh directory under an id the cluster already knows means this
                    // member lost its data: rejoining would revert a log the leader counted on.
                    if status.members.iter().any(|m| m.node_id == node_id) {
                        return Err(StoreError::Config(format!(
                            "node id {node_id} is already a member of cluster {} but {} holds no \
                             data for it (data lost?); remove it with StoreAdmin.ChangeMembership \
                             and rejoin under a new --node-id",
                            status.cluster_id,
                            data_dir.display()
                        )));
                    }
                    data.set_cluster_id(&status.cluster_id)?
                }
            }
        }

        let raft_config = openraft::Config {
            cluster_name: "flotilla".into(),
            heartbeat_interval: tuning.heartbeat.as_millis() as u64,
            election_timeout_min: tuning.election_timeout_min.as_millis() as u64,
            election_timeout_max: tuning.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_after_logs),
            max_in_snapshot_log_to_keep: tuning.logs_kept_after_snapshot,
            install_snapshot_timeout: 10_000,
            snapshot_max_chunk_size: tuning.snapshot_chunk_bytes,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::Config(e.to_string()))?;

        let cluster_id = Arc::new(RwLock::new(data.cluster_id.clone()));
        let net = Arc::new(NetCtx::new(node_id, cluster_id.clone(), faults));
        let log_store = data.log_store();
        let sm = data.state_machine(SmConfig {
            history_revisions: tuning.history_revisions,
        })?;
        let reader = sm.reader();
        let raft = Raft::new(
            node_id,
            Arc::new(raft_config),
            NetworkFactory { ctx: net.clone() },
            log_store,
            sm,
        )
        .await
        .map_err(|e| StoreError::Raft(e.to_string()))?;

        let (proposals_tx, proposals_rx) = mpsc::channel(4 * MAX_BATCH);
        let node = StoreNode {
            inner: Arc::new(Inner {
                id: node_id,
                addr: addr.clone(),
                raft: raft.clone(),
                reader,
                net,
                limits,
                write_timeout: tuning.write_timeout,
                cluster_id,
                data: std::sync::Mutex::new(data),
                proposals: proposals_tx,
            }),
        };
        let token = shutdown.child_token();
        tokio::spawn(
            propose_loop(node.clone(), proposals_rx, token.clone())
                .instrument(info_span!("store-proposer", node = node_id)),
        );
        let server = tokio::spawn(
            crate::service::serve(node.clone(), listener, token.clone(), extra_services)
                .instrument(info_span!("store-grpc", node = node_id)),
        );
        info!(node = node_id, %addr, "store member listening");

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        if !initialized {
            match &join {
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    node.set_cluster_id(&id)?;
                    let members = BTreeMap::from([(node_id, BasicNode::new(addr.clone()))]);
                    raft.initialize(members)
                        .await
                        .map_err(|e| StoreError::Raft(e.to_string()))?;
                    info!(node = node_id, cluster = %id, "bootstrapped a new single-member cluster");
                }
                Some(j) => {
                    let join_once = || async {
                        let mut c = admin_client(j).await?;
                        c.add_learner(v1::AddLearnerRequest {
                            node_id,
                            addr: addr.clone(),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                        c.change_membership(v1::ChangeMembershipRequest {
                            add_voters: vec![node_id],
                            remove: vec![],
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                        Ok::<_, String>(())
                    };
                    join_once
                        .retry(retry_policy())
                        .notify(|e, d| warn!(error = %e, retry_in = ?d, "join failed; retrying"))
                        .await
                        .map_err(|e| StoreError::Network(format!("join {j}: {e}")))?;
                    info!(node = node_id, via = %j, "joined the cluster as a voter");
                }
            }
        }
        Ok(RunningNode {
            node,
            addr: bound,
            token,
            server,
        })
    }

    /// The address other members and clients reach this member at.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The underlying Raft handle (metrics, triggers).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Local read access to the state machine.
    pub fn reader(&self) -> &Arc<SmReader> {
        &self.inner.reader
    }

    /// The cluster id, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.inner
            .cluster_id
            .read()
            .expect("cluster id lock")
            .clone()
    }

    pub(crate) fn set_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        self.inner
            .data
            .lock()
            .expect("data dir lock")
            .set_cluster_id(id)?;
        *self.inner.cluster_id.write().expect("cluster id lock") = Some(id.to_string());
        Ok(())
    }

    /// The address of the leader as this member knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.addr.clone()))
    }

    fn forward_target(
        &self,
        f: &ForwardToLeader<NodeId, BasicNode>,
    ) -> Result<(NodeId, String), KvError> {
        match (f.leader_id, &f.leader_node) {
            (Some(id), Some(n)) if id != self.inner.id => Ok((id, n.addr.clone())),
            _ => Err(KvError::Unavailable(
                "no leader elected yet; retry shortly".into(),
            )),
        }
    }

    async fn kv_client(
        &self,
        to: NodeId,
        addr: &str,
    ) -> Result<v1::kv_client::KvClient<tonic::transport::Channel>, KvError> {
        // Not sent when the link is cut: the outcome is known (not applied).
        self.inner
            .net
            .outbound(to)
            .await
            .map_err(KvError::Unavailable)?;
        let ch = self
            .inner
            .net
            .channel(addr)
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        Ok(v1::kv_client::KvClient::new(ch))
    }

    fn forwarded<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(FORWARDED_KEY, self.inner.id.into());
        r.set_timeout(self.inner.write_timeout + Duration::from_secs(1));
        r
    }

    /// Reads; `forwarded` is set when another member already forwarded this request.
    pub(crate) async fn range_inner(
        &self,
        req: RangeRequest,
        forwarded: bool,
    ) -> Result<RangeResult, KvError> {
        validate_range("", &req, &self.inner.limits)?;
        if req.consistency == flotilla_core::kv::Consistency::Serializable {
            return self.inner.reader.range(&req);
        }
        let check = tokio::time::timeout(
            self.inner.write_timeout,
            self.inner.raft.ensure_linearizable(),
        )
        .await;
        match check {
            Ok(Ok(_)) => self.inner.reader.range(&req),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) if !forwarded => {
                let (to, addr) = self.forward_target(&f)?;
                let mut c = self.kv_client(to, &addr).await?;
                let res = c.range(self.forwarded(v1::RangeRequest::from(req))).await;
                self.inner.net.inbound(to).map_err(KvError::Unavailable)?;
                res.map(|r| conv::range_result(r.into_inner()))
                    .map_err(|s| conv::from_status(&s, false))
            }
            Ok(Err(e)) => Err(KvError::Unavailable(format!(
                "cannot confirm leadership: {e}"
            ))),
            Err(_) => Err(KvError::Unavailable(
                "timed out confirming leadership with a quorum".into(),
            )),
        }
    }

    /// Writes through the log; `forwarded` as for reads.
    pub(crate) async fn txn_inner(
        &self,
        req: TxnRequest,
        forwarded: bool,
    ) -> Result<TxnResult, KvError> {
        validate_txn(&req, &self.inner.limits)?;
        let (tx, rx) = oneshot::channel();
        if self.inner.proposals.send((req.clone(), tx)).await.is_err() {
            return Err(KvError::Unavailable("member is shutting down".into()));
        }
        let outcome = rx.await.unwrap_or_else(|_| {
            Err(WriteError::Kv(KvError::OutcomeUnknown(
                "member stopped".into(),
            )))
        });
        match outcome {
            Ok(r) => Ok(r),
            Err(WriteError::Forward(f)) if !forwarded => {
                let (to, addr) = self.forward_target(&f)?;
                let mut c = self.kv_client(to, &addr).await?;
                let res = c.txn(self.forwarded(v1::TxnRequest::from(req))).await;
                // The leader may have applied it even if its reply is lost.
                self.inner
                    .net
                    .inbound(to)
                    .map_err(KvError::OutcomeUnknown)?;
                res.map(|r| conv::txn_result(r.into_inner()))
                    .map_err(|s| conv::from_status(&s, true))
            }
            Err(WriteError::Forward(_)) => {
                Err(KvError::Unavailable("leadership moved; retry".into()))
            }
            Err(WriteError::Kv(e)) => Err(e),
        }
    }

    async fn write(&self, cmd: Command) -> Result<Applied, WriteError> {
        let res =
            tokio::time::timeout(self.inner.write_timeout, self.inner.raft.client_write(cmd)).await;
        match res {
            Ok(Ok(r)) => Ok(r.data),
            // Truncated or never proposed: certainly not applied here.
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(WriteError::Forward(f))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(WriteError::Kv(KvError::Internal(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(WriteError::Kv(KvError::OutcomeUnknown(format!(
                "member stopped: {e}"
            )))),
            Err(_) => Err(WriteError::Kv(KvError::OutcomeUnknown(format!(
                "not committed within {:?} (no quorum reachable?)",
                self.inner.write_timeout
            )))),
        }
    }

    /// Compacts history before `revision` (through the log, so every member compacts).
    pub(crate) async fn compact_inner(
        &self,
        revision: Revision,
        forwarded: bool,
    ) -> Result<Revision, KvError> {
        if revision < 0 {
            return Err(KvError::invalid("revision", "must not be negative"));
        }
        match self.write(Command::Compact(revision)).await {
            Ok(Applied::Compacted(r)) => Ok(r),
            Ok(Applied::Rejected(e)) => Err(e),
            Ok(other) => Err(KvError::Internal(format!(
                "unexpected apply result {other:?}"
            ))),
            Err(WriteError::Forward(f)) if !forwarded => {
                let (to, addr) = self.forward_target(&f)?;
                let mut c = self.kv_client(to, &addr).await?;
                let res = c
                    .compact(self.forwarded(v1::CompactRequest { revision }))
                    .await;
                res.map(|r| r.into_inner().header.map_or(0, |h| h.compact_revision))
                    .map_err(|s| conv::from_status(&s, true))
            }
            Err(WriteError::Forward(_)) => {
                Err(KvError::Unavailable("leadership moved; retry".into()))
            }
            Err(WriteError::Kv(e)) => Err(e),
        }
    }

    /// Current members: id → (address, is voter).
    pub fn members(&self) -> BTreeMap<NodeId, (String, bool)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        mem.nodes()
            .map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id))))
            .collect()
    }

    /// Adds a learner (on the leader; a follower forwards).
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<u64, AdminError> {
        if id == 0 {
            return Err(AdminError::Invalid {
                field: "node_id".into(),
                reason: "must be >= 1".into(),
            });
        }
        if addr.is_empty() || addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
            return Err(AdminError::Invalid {
                field: "addr".into(),
                reason: format!("{addr:?} is not host:port"),
            });
        }
        match self
            .inner
            .raft
            .add_learner(id, BasicNode::new(addr.clone()), true)
            .await
        {
            Ok(r) => Ok(r.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let r = self
                    .leader_admin(&f)
                    .await?
                    .add_learner(v1::AddLearnerRequest { node_id: id, addr })
                    .await
                    .map_err(AdminError::Remote)?;
                Ok(r.into_inner().log_index)
            }
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    }

    /// Promotes learners and removes members (on the leader; a follower forwards).
    pub async fn change_membership(
        &self,
        add_voters: Vec<NodeId>,
        remove: Vec<NodeId>,
    ) -> Result<u64, AdminError> {
        let members = self.members();
        for (i, id) in add_voters.iter().enumerate() {
            if !members.contains_key(id) {
                return Err(AdminError::Invalid {
                    field: format!("add_voters[{i}]"),
                    reason: format!("node {id} is not a member; add it as a learner first"),
                });
            }
        }
        for (i, id) in remove.iter().enumerate() {
            if !members.contains_key(id) {
                return Err(AdminError::Invalid {
                    field: format!("remove[{i}]"),
                    reason: format!("node {id} is not a member"),
                });
            }
        }
        let voters_after: BTreeSet<NodeId> = members
            .iter()
            .filter(|(id, (_, v))| (*v || add_voters.contains(id)) && !remove.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if voters_after.is_empty() {
            return Err(AdminError::Invalid {
                field: "remove".into(),
                reason: "would leave the cluster without voters".into(),
            });
        }
        let request = v1::ChangeMembershipRequest {
            add_voters: add_voters.clone(),
            remove: remove.clone(),
        };
        let leader_forward = |f: ForwardToLeader<NodeId, BasicNode>| async move {
            let r = self
                .leader_admin(&f)
                .await?
                .change_membership(request)
                .await
                .map_err(AdminError::Remote)?;
            Ok(r.into_inner().log_index)
        };
        let mut last = 0;
        let remove_learners: BTreeSet<NodeId> = remove
            .iter()
            .copied()
            .filter(|id| !members.get(id).is_some_and(|(_, v)| *v))
            .collect();
        let steps = [
            (!voters_after.is_empty())
                .then(|| ChangeMembers::ReplaceAllVoters(voters_after.clone())),
            (!remove_learners.is_empty())
                .then(|| ChangeMembers::RemoveNodes(remove_learners.clone())),
        ];
        for change in steps.into_iter().flatten() {
            match self.inner.raft.change_membership(change, false).await {
                Ok(r) => last = r.log_id.index,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return leader_forward(f).await;
                }
                Err(e) => return Err(AdminError::Unavailable(e.to_string())),
            }
        }
        Ok(last)
    }

    /// This member's status.
    pub fn status(&self) -> v1::StatusResponse {
        let m = self.inner.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let (revision, compact_revision) = self.inner.reader.revisions().unwrap_or((0, 0));
        let leader = self.leader();
        v1::StatusResponse {
            node_id: self.inner.id,
            cluster_id: self.cluster_id().unwrap_or_default(),
            role: role.into(),
            leader_id: leader.as_ref().map_or(0, |l| l.0),
            leader_addr: leader.map(|l| l.1).unwrap_or_default(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            revision,
            compact_revision,
            members: self.wire_members(),
        }
    }

    /// Current members as wire messages.
    pub(crate) fn wire_members(&self) -> Vec<v1::Member> {
        self.members()
            .into_iter()
            .map(|(node_id, (addr, voter))| v1::Member {
                node_id,
                addr,
                voter,
            })
            .collect()
    }

    /// An admin client for the leader named in `f`.
    async fn leader_admin(
        &self,
        f: &ForwardToLeader<NodeId, BasicNode>,
    ) -> Result<v1::store_admin_client::StoreAdminClient<tonic::transport::Channel>, AdminError>
    {
        let (_, leader) = self
            .forward_target(f)
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        admin_client(&leader).await.map_err(AdminError::Unavailable)
    }
}

#[derive(Clone)]
enum WriteError {
    Forward(ForwardToLeader<NodeId, BasicNode>),
    Kv(KvError),
}

/// Errors of membership administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input, with the field named.
    #[error("invalid argument: {field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No leader, or the change could not be made now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The leader refused the forwarded request.
    #[error("leader: {0}")]
    Remote(tonic::Status),
}

impl KvBackend for StoreNode {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        self.range_inner(req, false).await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        self.txn_inner(req, false).await
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        validate_watch(&req, &self.inner.limits)?;
        self.inner.reader.watch(req)
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        self.compact_inner(revision, false).await
    }
}
