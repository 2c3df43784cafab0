//! Member start-up: open the data directory, check it belongs to the cluster being joined,
//! start Raft and the proposer; then, once the member is served, bootstrap or join.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use flotilla_api::v1;
use flotilla_core::kv::Limits;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::admin::admin_client;
use crate::data_dir::{CacheSizes, DataDir};
use crate::error::StoreError;
use crate::network::{Faults, NetCtx, NetworkFactory};
use crate::node::{Inner, StoreNode};
use crate::proposer::{MAX_BATCH, propose_loop};
use crate::state_machine::SmConfig;
use crate::transport::{DialTransport, Transport};
use crate::types::{NodeId, Raft};

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
    /// gRPC listen address (port 0 picks a free port). The program that serves the member binds
    /// it and passes the bound address to [`StoreNode::open`].
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
    /// How this member reaches the others.
    pub transport: Arc<dyn Transport>,
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
            transport: Arc::new(DialTransport::default()),
        }
    }
}

/// Before joining through `j`: the target's cluster must be this directory's (if it has one
/// already), and a fresh directory must not claim an id the cluster already counts on. Only a
/// member that is not yet part of a cluster asks; one with state starts from its own data,
/// and Raft messages carry the cluster id (a member refuses another cluster's).
async fn check_join_target(node: &StoreNode, j: &str) -> Result<(), StoreError> {
    let node_id = node.id();
    let status = (|| async {
        let mut c = admin_client(&*node.inner.net.transport, j).await?;
        c.status(v1::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| e.to_string())
    })
    .retry(retry_policy())
    .await
    .map_err(|e| StoreError::Network(format!("join {j}: {e}")))?;
    let dir = node.inner.data.lock().expect("data dir lock").path.clone();
    match node.cluster_id() {
        Some(c) if !status.cluster_id.is_empty() && c != status.cluster_id => {
            Err(StoreError::WrongCluster {
                dir,
                stored: c,
                requested: status.cluster_id,
            })
        }
        Some(_) => Ok(()),
        None if status.cluster_id.is_empty() => Err(StoreError::Network(format!(
            "join {j}: that member has no cluster yet"
        ))),
        None => {
            // A fresh directory under an id the cluster already knows means this member lost
            // its data: rejoining would revert a log the leader counted on.
            if status.members.iter().any(|m| m.node_id == node_id) {
                return Err(StoreError::Config(format!(
                    "node id {node_id} is already a member of cluster {} but {} holds no \
                     data for it (data lost?); remove it with StoreAdmin.ChangeMembership \
                     and rejoin under a new --node-id",
                    status.cluster_id,
                    dir.display()
                )));
            }
            node.set_cluster_id(&status.cluster_id)
        }
    }
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(40)
}

impl StoreNode {
    /// Opens the data directory and starts Raft and the proposer; serves nothing. The caller
    /// mounts [`StoreNode::services`] on a server listening at `bound`, then calls
    /// [`OpenMember::bootstrap_or_join`].
    pub async fn open(
        config: NodeConfig,
        bound: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<OpenMember, StoreError> {
        let NodeConfig {
            node_id,
            data_dir,
            listen: _,
            advertise,
            join,
            tuning,
            limits,
            faults,
            transport,
        } = config;
        if node_id == 0 {
            return Err(StoreError::Config("node id must be >= 1".into()));
        }
        let data = DataDir::open_with(&data_dir, node_id, tuning.cache)?;
        let addr = advertise.unwrap_or_else(|| bound.to_string());

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
        let net = Arc::new(NetCtx::new(node_id, cluster_id.clone(), faults, transport));
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
            propose_loop(
                raft.clone(),
                tuning.write_timeout,
                proposals_rx,
                token.clone(),
            )
            .instrument(info_span!("store-proposer", node = node_id)),
        );
        Ok(OpenMember { node, join })
    }
}

/// A member whose Raft runs but which has not bootstrapped or joined a cluster yet.
pub struct OpenMember {
    node: StoreNode,
    join: Option<String>,
}

impl OpenMember {
    /// The member, for mounting its services.
    pub fn node(&self) -> &StoreNode {
        &self.node
    }

    /// Bootstraps a new single-member cluster (empty directory, no join target), joins the
    /// target as a voter (empty directory), or does nothing (the member has state). Call once
    /// the member's services are being served: joining needs the leader to reach it.
    pub async fn bootstrap_or_join(self) -> Result<StoreNode, StoreError> {
        let OpenMember { node, join } = self;
        let (node_id, addr, raft) = (node.id(), node.addr().to_string(), node.raft().clone());
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
                    check_join_target(&node, j).await?;
                    let join_once = || async {
                        let mut c = admin_client(&*node.inner.net.transport, j).await?;
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
        Ok(node)
    }
}
