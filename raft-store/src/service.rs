//! gRPC services of a store member: `Kv`, `Raft` (internal) and `StoreAdmin`, built as tonic
//! services that the embedding program mounts on its own server.

use std::pin::Pin;

use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use futures::{Stream, StreamExt};
use openraft::error::{InstallSnapshotError, RaftError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::admin::AdminError;
use crate::node::{FORWARDED_KEY, StoreNode};
use crate::types::NodeId;

/// A member's gRPC services, for the embedding program to mount on its server.
pub struct StoreServices {
    /// The client key-value API.
    pub kv: v1::kv_server::KvServer<KvService>,
    /// The Raft transport between members.
    pub raft: v1::raft_server::RaftServer<RaftService>,
    /// Membership administration and status.
    pub admin: v1::store_admin_server::StoreAdminServer<AdminService>,
}

impl StoreServices {
    /// The three services as one route set.
    pub fn routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.kv)
            .add_service(self.raft)
            .add_service(self.admin)
    }
}

impl StoreNode {
    /// This member's services; `shutdown` ends their open watch streams (a graceful server
    /// shutdown would otherwise wait on them forever).
    pub fn services(&self, shutdown: CancellationToken) -> StoreServices {
        StoreServices {
            kv: v1::kv_server::KvServer::new(KvService {
                node: self.clone(),
                token: shutdown,
            }),
            raft: v1::raft_server::RaftServer::new(RaftService { node: self.clone() })
                .max_decoding_message_size(256 * 1024 * 1024),
            admin: v1::store_admin_server::StoreAdminServer::new(AdminService {
                node: self.clone(),
            }),
        }
    }
}

/// Forwarded by another member already, or sent by a client that follows hints itself.
fn is_forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED_KEY) || r.metadata().contains_key(conv::NO_FORWARD_KEY)
}

/// The client key-value API.
pub struct KvService {
    node: StoreNode,
    // Ends open watch streams on shutdown; graceful shutdown would otherwise wait on them forever.
    token: CancellationToken,
}

impl KvService {
    fn header(&self, revision: i64) -> v1::ResponseHeader {
        let term = self.node.raft().metrics().borrow().current_term;
        let compact = self.node.reader().compact_revision();
        conv::header(revision, term, self.node.id(), compact)
    }

    /// An error as a status; "unavailable" carries the leader's address, so the client can
    /// go there next.
    fn err(&self, e: flotilla_core::kv::KvError) -> Status {
        let unavailable = matches!(e, flotilla_core::kv::KvError::Unavailable(_));
        let mut s = conv::to_status(e);
        if unavailable
            && let Some((_, addr)) = self.node.leader()
            && let Ok(v) = addr.parse()
        {
            s.metadata_mut().insert(conv::LEADER_HINT_KEY, v);
        }
        s
    }

    /// Wraps a reply with the leader's address, so clients can send the next request there
    /// directly instead of through a forwarding member.
    fn reply<T>(&self, msg: T) -> Response<T> {
        let mut r = Response::new(msg);
        if let Some((_, addr)) = self.node.leader()
            && let Ok(v) = addr.parse()
        {
            r.metadata_mut().insert(conv::LEADER_HINT_KEY, v);
        }
        r
    }
}

type WatchResponseStream = Pin<Box<dyn Stream<Item = Result<v1::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<v1::RangeRequest>,
    ) -> Result<Response<v1::RangeResponse>, Status> {
        let fwd = is_forwarded(&request);
        let res = self
            .node
            .range_inner(request.into_inner().into(), fwd)
            .await
            .map_err(|e| self.err(e))?;
        let h = self.header(res.revision);
        Ok(self.reply(conv::range_response(res, h)))
    }

    async fn put(
        &self,
        request: Request<v1::PutRequest>,
    ) -> Result<Response<v1::PutResponse>, Status> {
        let fwd = is_forwarded(&request);
        let p = request.into_inner();
        let txn = flotilla_core::kv::TxnRequest {
            success: vec![flotilla_core::kv::Op::Put {
                key: p.key,
                value: p.value,
                prev_kv: p.prev_kv,
            }],
            ..Default::default()
        };
        let res = self
            .node
            .txn_inner(txn, fwd)
            .await
            .map_err(|e| self.err(e))?;
        let prev_kv = match res.results.into_iter().next() {
            Some(flotilla_core::kv::OpResult::Put { prev_kv }) => prev_kv.map(Into::into),
            _ => None,
        };
        Ok(self.reply(v1::PutResponse {
            header: Some(self.header(res.revision)),
            prev_kv,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let fwd = is_forwarded(&request);
        let d = request.into_inner();
        let txn = flotilla_core::kv::TxnRequest {
            success: vec![flotilla_core::kv::Op::Delete {
                range: flotilla_core::kv::KeyRange {
                    key: d.key,
                    prefix: d.prefix,
                },
                prev_kv: d.prev_kv,
            }],
            ..Default::default()
        };
        let res = self
            .node
            .txn_inner(txn, fwd)
            .await
            .map_err(|e| self.err(e))?;
        let (deleted, prev_kvs) = match res.results.into_iter().next() {
            Some(flotilla_core::kv::OpResult::Delete { deleted, prev_kvs }) => (deleted, prev_kvs),
            _ => (0, Vec::new()),
        };
        Ok(self.reply(v1::DeleteResponse {
            header: Some(self.header(res.revision)),
            deleted,
            prev_kvs: prev_kvs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn txn(
        &self,
        request: Request<v1::TxnRequest>,
    ) -> Result<Response<v1::TxnResponse>, Status> {
        let fwd = is_forwarded(&request);
        let txn = conv::txn_from_wire(request.into_inner()).map_err(|e| self.err(e))?;
        let res = self
            .node
            .txn_inner(txn, fwd)
            .await
            .map_err(|e| self.err(e))?;
        let h = self.header(res.revision);
        Ok(self.reply(conv::txn_response(res, h)))
    }

    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use flotilla_core::kv::KvBackend;
        let stream = self
            .node
            .watch(request.into_inner().into())
            .await
            .map_err(|e| self.err(e))?;
        let node = self.node.clone();
        let out = stream.map(move |item| match item {
            Ok(b) => {
                let term = node.raft().metrics().borrow().current_term;
                let compact = node.reader().compact_revision();
                Ok(v1::WatchResponse {
                    header: Some(conv::header(b.revision, term, node.id(), compact)),
                    revision: b.revision,
                    events: b.events.into_iter().map(Into::into).collect(),
                })
            }
            Err(e) => Err(conv::to_status(e)),
        });
        Ok(Response::new(Box::pin(
            out.take_until(self.token.clone().cancelled_owned()),
        )))
    }

    async fn compact(
        &self,
        request: Request<v1::CompactRequest>,
    ) -> Result<Response<v1::CompactResponse>, Status> {
        let fwd = is_forwarded(&request);
        let rev = request.into_inner().revision;
        let compacted = self
            .node
            .compact_inner(rev, fwd)
            .await
            .map_err(|e| self.err(e))?;
        let mut h = self.header(self.node.reader().revisions().map_or(0, |(r, _)| r));
        h.compact_revision = compacted;
        Ok(Response::new(v1::CompactResponse { header: Some(h) }))
    }
}

/// The internal Raft transport's server side.
pub struct RaftService {
    node: StoreNode,
}

fn encode<T: Serialize>(v: &T) -> Result<Response<v1::RaftMessage>, Status> {
    let payload = postcard::to_allocvec(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(v1::RaftMessage {
        cluster_id: String::new(),
        payload,
    }))
}

impl RaftService {
    /// Refuses messages from another cluster; a member that has none yet adopts the sender's.
    fn check_cluster<T: serde::de::DeserializeOwned>(
        &self,
        m: v1::RaftMessage,
    ) -> Result<T, Status> {
        match self.node.cluster_id() {
            Some(ours) if !m.cluster_id.is_empty() && ours != m.cluster_id => {
                return Err(Status::failed_precondition(format!(
                    "member {} belongs to cluster {ours}, not {}",
                    self.node.id(),
                    m.cluster_id
                )));
            }
            None if !m.cluster_id.is_empty() => {
                self.node
                    .set_cluster_id(&m.cluster_id)
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            _ => {}
        }
        postcard::from_bytes(&m.payload)
            .map_err(|e| Status::invalid_argument(format!("payload: {e}")))
    }
}

#[tonic::async_trait]
impl v1::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<v1::RaftMessage>,
    ) -> Result<Response<v1::RaftMessage>, Status> {
        let req = self.check_cluster(request.into_inner())?;
        let res: Result<_, RaftError<NodeId>> = self.node.raft().append_entries(req).await;
        encode(&res)
    }

    async fn vote(
        &self,
        request: Request<v1::RaftMessage>,
    ) -> Result<Response<v1::RaftMessage>, Status> {
        let req = self.check_cluster(request.into_inner())?;
        let res: Result<_, RaftError<NodeId>> = self.node.raft().vote(req).await;
        encode(&res)
    }

    async fn install_snapshot(
        &self,
        request: Request<v1::RaftMessage>,
    ) -> Result<Response<v1::RaftMessage>, Status> {
        let req = self.check_cluster(request.into_inner())?;
        let res: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.node.raft().install_snapshot(req).await;
        encode(&res)
    }
}

/// Membership administration and status.
pub struct AdminService {
    node: StoreNode,
}

fn admin_status(e: AdminError) -> Status {
    match e {
        AdminError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{field}: {reason}"))
        }
        AdminError::Unavailable(m) => Status::unavailable(m),
        AdminError::Remote(s) => s,
    }
}

impl AdminService {
    fn members_response(&self, log_index: u64) -> v1::MembershipResponse {
        v1::MembershipResponse {
            members: self.node.wire_members(),
            log_index,
            cluster_id: self.node.cluster_id().unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl v1::store_admin_server::StoreAdmin for AdminService {
    async fn add_learner(
        &self,
        request: Request<v1::AddLearnerRequest>,
    ) -> Result<Response<v1::MembershipResponse>, Status> {
        let r = request.into_inner();
        let idx = self
            .node
            .add_learner(r.node_id, r.addr)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(self.members_response(idx)))
    }

    async fn change_membership(
        &self,
        request: Request<v1::ChangeMembershipRequest>,
    ) -> Result<Response<v1::MembershipResponse>, Status> {
        let r = request.into_inner();
        let idx = self
            .node
            .change_membership(r.add_voters, r.remove)
            .await
            .map_err(admin_status)?;
        Ok(Response::new(self.members_response(idx)))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }

    async fn trigger_snapshot(
        &self,
        _request: Request<v1::TriggerSnapshotRequest>,
    ) -> Result<Response<v1::TriggerSnapshotResponse>, Status> {
        self.node
            .raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::TriggerSnapshotResponse {}))
    }
}
