//! A client for the store's gRPC API that talks to any members and implements
//! [`KvBackend`].
//!
//! Deadlines: each attempt has its own deadline (default 1 s), shorter than the call's (default
//! 8 s), so a member that stops answering (paused, partitioned away, dead) costs one attempt,
//! not the whole call.
//!
//! Retries: reads, and writes the server reports as not applied (UNAVAILABLE with Flotilla's
//! error label), are retried on the next member with jittered exponential backoff (backon). A
//! write whose outcome is unknown (connection lost after sending, timeout) is never retried: it
//! returns [`KvError::OutcomeUnknown`] so the caller decides. Watches resume after a broken
//! stream from the revision after the last one delivered.
//!
//! After any failure the client moves to the next member, and a member that timed out or was
//! unreachable is avoided for a moment: leader hints naming it are ignored meanwhile, so a
//! paused leader does not pull every request back to itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use flotilla_api::convert::kv as conv;
use flotilla_api::v1;
use flotilla_api::v1::kv_client::KvClient;
use flotilla_core::kv::{
    KvBackend, KvError, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult, WatchBatch,
    WatchRequest, WatchStream,
};
use futures::StreamExt;
use tonic::transport::Channel;

/// A client for one store cluster.
#[derive(Clone)]
pub struct StoreClient {
    endpoints: Arc<Vec<String>>,
    channels: Arc<Vec<Channel>>,
    next: Arc<AtomicUsize>,
    /// Until when each member is avoided after it stopped answering.
    avoid: Arc<Mutex<Vec<Option<Instant>>>>,
    /// Whether members may forward to the leader: only when the client cannot reach the
    /// leader itself (one endpoint, or a leader outside its endpoints).
    forward: Arc<AtomicBool>,
    timeout: Duration,
    attempt_timeout: Duration,
    backoff: ExponentialBuilder,
}

/// How long a member that stopped answering is avoided.
const AVOID_FOR: Duration = Duration::from_secs(3);

impl StoreClient {
    /// A plaintext client for the members at `endpoints` (host:port). Connections are made
    /// lazily.
    pub fn new(endpoints: &[String]) -> Result<Self, KvError> {
        Self::with_dial(
            endpoints,
            &flotilla_api::grpc::Dial::plaintext(Duration::from_secs(1)),
        )
    }

    /// A client for the members at `endpoints`, dialled as `dial` says.
    pub fn with_dial(
        endpoints: &[String],
        dial: &flotilla_api::grpc::Dial,
    ) -> Result<Self, KvError> {
        if endpoints.is_empty() {
            return Err(KvError::invalid(
                "endpoints",
                "at least one member address is needed",
            ));
        }
        let channels = endpoints
            .iter()
            .map(|e| {
                flotilla_api::grpc::lazy(e, dial)
                    .map_err(|err| KvError::invalid("endpoints", err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect();
        Ok(Self {
            avoid: Arc::new(Mutex::new(vec![None; channels.len()])),
            forward: Arc::new(AtomicBool::new(channels.len() == 1)),
            endpoints: Arc::new(endpoints),
            channels: Arc::new(channels),
            next: Arc::new(AtomicUsize::new(0)),
            timeout: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(1),
            backoff: ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(20))
                // Short: during a failover the next attempt should follow the new leader soon.
                .with_max_delay(Duration::from_millis(250))
                .with_max_times(20),
        })
    }

    /// Sets the deadline of a whole call, retries included (default 8 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the deadline of one attempt on one member (default 1 s; at most the call's).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets how many times a retryable failure is retried (default 12).
    pub fn with_max_retries(mut self, n: usize) -> Self {
        self.backoff = self.backoff.with_max_times(n);
        self
    }

    fn current(&self) -> usize {
        self.next.load(Ordering::Relaxed) % self.channels.len()
    }

    fn client(&self) -> (usize, KvClient<Channel>) {
        let i = self.current();
        (i, KvClient::new(self.channels[i].clone()))
    }

    fn avoided(&self, i: usize, now: Instant) -> bool {
        self.avoid.lock().expect("avoid list")[i].is_some_and(|until| now < until)
    }

    /// Follows the server's leader hint when the leader is one of our endpoints, so writes and
    /// linearizable reads skip the forwarding hop.
    fn follow_hint(&self, md: &tonic::metadata::MetadataMap) {
        let Some(hint) = md.get(conv::LEADER_HINT_KEY).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let cur = self.current();
        if self.endpoints[cur] != hint
            && let Some(i) = self.endpoints.iter().position(|e| e == hint)
            && !self.avoided(i, Instant::now())
        {
            self.next.store(i, Ordering::Relaxed);
        }
    }

    /// After a failure on member `from`, move to the next member not being avoided (unless
    /// a concurrent caller has moved already).
    fn rotate(&self, from: usize) {
        if self.current() != from {
            return;
        }
        let n = self.channels.len();
        let now = Instant::now();
        let to = (1..n)
            .map(|k| (from + k) % n)
            .find(|i| !self.avoided(*i, now))
            .unwrap_or((from + 1) % n);
        self.next.store(to, Ordering::Relaxed);
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.attempt_timeout.min(self.timeout));
        // With the leader among its endpoints the client follows hints itself: a follower
        // answers "not me, try X" instead of holding the request on a forward to a leader
        // that may have stopped answering.
        if !self.forward.load(Ordering::Relaxed) {
            r.metadata_mut().insert(
                conv::NO_FORWARD_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        r
    }

    /// What a failed attempt on member `i` says about that member: a client mistake says
    /// nothing; anything else moves on. Silence (a timeout, a lost connection: no Flotilla
    /// error label) or a member that cannot commit (`outcome_unknown`: no quorum there) also
    /// makes the member avoided for a moment.
    fn failed(&self, i: usize, s: &tonic::Status) {
        use tonic::Code;
        if matches!(
            s.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::NotFound
        ) {
            return;
        }
        let label = s
            .metadata()
            .get(conv::ERROR_LABEL_KEY)
            .and_then(|v| v.to_str().ok());
        if matches!(label, None | Some("outcome_unknown")) {
            self.avoid.lock().expect("avoid list")[i] = Some(Instant::now() + AVOID_FOR);
        }
        let hint = s
            .metadata()
            .get(conv::LEADER_HINT_KEY)
            .and_then(|v| v.to_str().ok());
        if let Some(h) = hint
            && !self.endpoints.iter().any(|e| e == h)
        {
            // The leader is not one of ours: only a member's forward reaches it.
            self.forward.store(true, Ordering::Relaxed);
        }
        self.follow_hint(s.metadata());
        self.rotate(i);
    }

    /// Runs `f` (one attempt on the current member) until it succeeds, fails for good, or the
    /// call's deadline passes. Only errors that certainly did not apply are retried.
    async fn retry<T, F, Fut>(&self, f: F) -> Result<T, KvError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KvError>>,
    {
        let attempts = f
            .retry(self.backoff)
            .when(|e| matches!(e, KvError::Unavailable(_)));
        match tokio::time::timeout(self.timeout, attempts).await {
            Ok(r) => r,
            Err(_) => Err(KvError::Unavailable(format!(
                "no member could serve this within {:?}",
                self.timeout
            ))),
        }
    }
}

impl KvBackend for StoreClient {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        self.retry(|| async {
            let (i, mut c) = self.client();
            let r = c
                .range(self.request(v1::RangeRequest::from(req.clone())))
                .await;
            r.map(|r| {
                self.follow_hint(r.metadata());
                conv::range_result(r.into_inner())
            })
            .map_err(|s| {
                self.failed(i, &s);
                conv::from_status(&s, false)
            })
        })
        .await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        self.retry(|| async {
            let (i, mut c) = self.client();
            let r = c.txn(self.request(v1::TxnRequest::from(req.clone()))).await;
            r.map(|r| {
                self.follow_hint(r.metadata());
                conv::txn_result(r.into_inner())
            })
            .map_err(|s| {
                self.failed(i, &s);
                conv::from_status(&s, true)
            })
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
                            client.rotate(client.current());
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
            let (i, mut c) = self.client();
            let r = c
                .compact(self.request(v1::CompactRequest { revision }))
                .await;
            r.map(|r| r.into_inner().header.map_or(0, |h| h.compact_revision))
                .map_err(|s| {
                    self.failed(i, &s);
                    conv::from_status(&s, true)
                })
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
                let (i, mut c) = self.client();
                c.watch(wire.clone()).await.map_err(|s| {
                    self.failed(i, &s);
                    conv::from_status(&s, false)
                })
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
