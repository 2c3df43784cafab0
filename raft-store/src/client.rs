//! A client for the store's gRPC API that talks to any members and implements
//! [`KvBackend`].
//!
//! Retries: reads, and writes the server reports as not applied (UNAVAILABLE with Flotilla's
//! error label), are retried on the next member with jittered exponential backoff (backon). A
//! write whose outcome is unknown (connection lost after sending, timeout) is never retried: it
//! returns [`KvError::OutcomeUnknown`] so the caller decides. Watches resume after a broken
//! stream from the revision after the last one delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use flotilla_api::v1::kv_client::KvClient;
use flotilla_core::kv::{
    KvBackend, KvError, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult, WatchBatch,
    WatchRequest, WatchStream,
};
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// A client for one store cluster.
#[derive(Clone)]
pub struct StoreClient {
    endpoints: Arc<Vec<String>>,
    channels: Arc<Vec<Channel>>,
    next: Arc<AtomicUsize>,
    timeout: Duration,
    backoff: ExponentialBuilder,
}

impl StoreClient {
    /// A client for the members at `endpoints` (host:port). Connections are made lazily.
    pub fn new(endpoints: &[String]) -> Result<Self, KvError> {
        if endpoints.is_empty() {
            return Err(KvError::invalid(
                "endpoints",
                "at least one member address is needed",
            ));
        }
        let channels = endpoints
            .iter()
            .map(|e| {
                let uri = if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                };
                Endpoint::from_shared(uri)
                    .map(|ep| {
                        flotilla_api::grpc::client(
                            ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true),
                        )
                        .connect_lazy()
                    })
                    .map_err(|err| KvError::invalid("endpoints", format!("{e:?}: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect();
        Ok(Self {
            endpoints: Arc::new(endpoints),
            channels: Arc::new(channels),
            next: Arc::new(AtomicUsize::new(0)),
            timeout: Duration::from_secs(8),
            backoff: ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(12),
        })
    }

    /// Sets the per-request deadline (default 8 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how many times a retryable failure is retried (default 12).
    pub fn with_max_retries(mut self, n: usize) -> Self {
        self.backoff = self.backoff.with_max_times(n);
        self
    }

    fn client(&self) -> KvClient<Channel> {
        let i = self.next.load(Ordering::Relaxed) % self.channels.len();
        KvClient::new(self.channels[i].clone())
    }

    /// Follows the server's leader hint when the leader is one of our endpoints, so writes and
    /// linearizable reads skip the forwarding hop.
    fn follow_hint(&self, md: &tonic::metadata::MetadataMap) {
        let Some(hint) = md.get(conv::LEADER_HINT_KEY).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let cur = self.next.load(Ordering::Relaxed) % self.channels.len();
        if self.endpoints[cur] != hint
            && let Some(i) = self.endpoints.iter().position(|e| e == hint)
        {
            self.next.store(i, Ordering::Relaxed);
        }
    }

    /// After a failure, prefer the next member.
    fn rotate(&self) {
        self.next.fetch_add(1, Ordering::Relaxed);
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    async fn retry<T, F, Fut>(&self, f: F) -> Result<T, KvError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KvError>>,
    {
        f.retry(self.backoff)
            .when(|e| matches!(e, KvError::Unavailable(_)))
            .notify(|_, _| self.rotate())
            .await
    }
}

impl KvBackend for StoreClient {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        self.retry(|| async {
            let r = self
                .client()
                .range(self.request(v1::RangeRequest::from(req.clone())))
                .await;
            r.map(|r| {
                self.follow_hint(r.metadata());
                conv::range_result(r.into_inner())
            })
            .map_err(|s| conv::from_status(&s, false))
        })
        .await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        self.retry(|| async {
            let r = self
                .client()
                .txn(self.request(v1::TxnRequest::from(req.clone())))
                .await;
            r.map(|r| {
                self.follow_hint(r.metadata());
                conv::txn_result(r.into_inner())
            })
            .map_err(|s| conv::from_status(&s, true))
        })
        .await
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        let client = self.clone();
        // Pin the start so a resumed watch continues exactly where the first one began.
        let start = if req.start_revision == 0 {
            let r = client.range(RangeRequest::new(req.range.clone())).await?;
            r.revision + 1
        } else {
            req.start_revision
        };
        let first = client.open_watch(&req, start).await?;
        let state = (client, req, start, Some(first));
        Ok(Box::pin(futures::stream::unfold(
            Some(state),
            |st| async move {
                let (client, req, mut next, mut stream) = st?;
                loop {
                    let s = match stream.as_mut() {
                        Some(s) => s,
                        None => match client.open_watch(&req, next).await {
                            Ok(s) => stream.insert(s),
                            Err(e) => return Some((Err(e), None)),
                        },
                    };
                    match s.next().await {
                        Some(Ok(b)) => {
                            next = b.revision + 1;
                            return Some((Ok(b), Some((client, req, next, stream))));
                        }
                        // A broken stream: resume on another member from the next revision.
                        Some(Err(KvError::Unavailable(_))) | None => {
                            client.rotate();
                            stream = None;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Some(Err(e)) => return Some((Err(e), None)),
                    }
                }
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        self.retry(|| async {
            let r = self
                .client()
                .compact(self.request(v1::CompactRequest { revision }))
                .await;
            r.map(|r| r.into_inner().header.map_or(0, |h| h.compact_revision))
                .map_err(|s| conv::from_status(&s, true))
        })
        .await
    }
}

impl StoreClient {
    async fn open_watch(
        &self,
        req: &WatchRequest,
        start: Revision,
    ) -> Result<WatchStream, KvError> {
        let wire = v1::WatchRequest {
            start_revision: start,
            ..req.clone().into()
        };
        let stream = self
            .retry(|| async {
                // No deadline on a watch: it lives until dropped.
                self.client()
                    .watch(wire.clone())
                    .await
                    .map_err(|s| conv::from_status(&s, false))
            })
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|item| match item {
            Ok(r) => Ok(WatchBatch {
                revision: r.revision,
                events: r.events.into_iter().map(Into::into).collect(),
            }),
            Err(s) => Err(conv::from_status(&s, false)),
        })))
    }
}
