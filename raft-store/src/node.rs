//! The handle to a member, and what every member serves: reads, writes and compactions,
//! with followers forwarding writes and linearizable reads to the leader once.
//!
//! Start-up and join are in `start.rs`, the group-commit proposer in `proposer.rs`,
//! membership administration in `admin.rs`, the gRPC services in `service.rs`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use flotilla_core::kv::{
    KvBackend, KvError, Limits, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult,
    WatchRequest, WatchStream, validate_range, validate_txn, validate_watch,
};
use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use tokio::sync::{mpsc, oneshot};

use crate::data_dir::DataDir;
use crate::error::StoreError;
use crate::network::NetCtx;
use crate::proposer::{Proposal, WriteError, write};
use crate::state_machine::SmReader;
use crate::types::{Applied, Command, NodeId, Raft};

/// Metadata key marking a request forwarded by another member (forwarded at most once).
pub(crate) const FORWARDED_KEY: &str = "flotilla-forwarded";

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
    pub(crate) proposals: mpsc::Sender<Proposal>,
}

/// A handle to a running member. Cheap to clone.
#[derive(Clone)]
pub struct StoreNode {
    pub(crate) inner: Arc<Inner>,
}

impl StoreNode {
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

    pub(crate) fn forward_target(
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

    /// Compacts history before `revision` (through the log, so every member compacts).
    pub(crate) async fn compact_inner(
        &self,
        revision: Revision,
        forwarded: bool,
    ) -> Result<Revision, KvError> {
        if revision < 0 {
            return Err(KvError::invalid("revision", "must not be negative"));
        }
        let compacted = write(
            &self.inner.raft,
            self.inner.write_timeout,
            Command::Compact(revision),
        );
        match compacted.await {
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

    /// Stops Raft (after the server that mounted this member's services has stopped), and
    /// waits until the data directory's files are free to open again.
    pub async fn shutdown_raft(&self) -> Result<(), StoreError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        // openraft's replication and state-machine tasks can outlive `shutdown` by a moment,
        // each with a handle to a redb file; a restart right after would find it locked.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.inner.data.lock().expect("data dir lock").released() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("raft tasks still hold the data directory 5 s after shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
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
