//! The store's gRPC `Kv` API over any [`KvBackend`], for hubs whose store is not the Raft
//! member (which serves its own, with forwarding and leader hints). With it, `flotctl store
//! snapshot` and every other `Kv` client work the same against a hub on etcd.

use std::pin::Pin;

use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use flotilla_core::kv::{KeyRange, KvBackend, Op, OpResult, TxnRequest};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// `Kv` over `B`. Headers carry the store's revision; term and member id are 0 (there is no
/// Raft member behind them).
pub struct BackendKv<B> {
    backend: B,
    // Ends open watch streams on shutdown (graceful shutdown waits on them otherwise).
    token: CancellationToken,
}

impl<B: KvBackend + Clone> BackendKv<B> {
    /// The service, mountable with `v1::kv_server::KvServer::new`.
    pub fn new(backend: B, token: CancellationToken) -> v1::kv_server::KvServer<Self> {
        v1::kv_server::KvServer::new(Self { backend, token })
    }
}

fn header(revision: i64) -> v1::ResponseHeader {
    conv::header(revision, 0, 0, 0)
}

type WatchResponseStream = Pin<Box<dyn Stream<Item = Result<v1::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: KvBackend + Clone> v1::kv_server::Kv for BackendKv<B> {
    async fn range(
        &self,
        request: Request<v1::RangeRequest>,
    ) -> Result<Response<v1::RangeResponse>, Status> {
        let res =
            (self.backend.range(request.into_inner().into()).await).map_err(conv::to_status)?;
        let h = header(res.revision);
        Ok(Response::new(conv::range_response(res, h)))
    }

    async fn put(
        &self,
        request: Request<v1::PutRequest>,
    ) -> Result<Response<v1::PutResponse>, Status> {
        let p = request.into_inner();
        let txn = TxnRequest {
            success: vec![Op::Put {
                key: p.key,
                value: p.value,
                prev_kv: p.prev_kv,
            }],
            ..Default::default()
        };
        let res = self.backend.txn(txn).await.map_err(conv::to_status)?;
        let prev_kv = match res.results.into_iter().next() {
            Some(OpResult::Put { prev_kv }) => prev_kv.map(Into::into),
            _ => None,
        };
        Ok(Response::new(v1::PutResponse {
            header: Some(header(res.revision)),
            prev_kv,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let d = request.into_inner();
        let txn = TxnRequest {
            success: vec![Op::Delete {
                range: KeyRange {
                    key: d.key,
                    prefix: d.prefix,
                },
                prev_kv: d.prev_kv,
            }],
            ..Default::default()
        };
        let res = self.backend.txn(txn).await.map_err(conv::to_status)?;
        let (deleted, prev_kvs) = match res.results.into_iter().next() {
            Some(OpResult::Delete { deleted, prev_kvs }) => (deleted, prev_kvs),
            _ => (0, Vec::new()),
        };
        Ok(Response::new(v1::DeleteResponse {
            header: Some(header(res.revision)),
            deleted,
            prev_kvs: prev_kvs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn txn(
        &self,
        request: Request<v1::TxnRequest>,
    ) -> Result<Response<v1::TxnResponse>, Status> {
        let txn = conv::txn_from_wire(request.into_inner()).map_err(conv::to_status)?;
        let res = self.backend.txn(txn).await.map_err(conv::to_status)?;
        let h = header(res.revision);
        Ok(Response::new(conv::txn_response(res, h)))
    }

    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream =
            (self.backend.watch(request.into_inner().into()).await).map_err(conv::to_status)?;
        let out = stream.map(|item| match item {
            Ok(b) => Ok(v1::WatchResponse {
                header: Some(header(b.revision)),
                revision: b.revision,
                events: b.events.into_iter().map(Into::into).collect(),
            }),
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
        let rev = request.into_inner().revision;
        let compacted = self.backend.compact(rev).await.map_err(conv::to_status)?;
        let mut h = header(0);
        h.compact_revision = compacted;
        Ok(Response::new(v1::CompactResponse { header: Some(h) }))
    }
}
