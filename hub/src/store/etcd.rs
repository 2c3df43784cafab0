//! The fleet store on an external etcd (feature `etcd`): [`EtcdKv`] maps the [`KvBackend`]
//! model onto etcd's (which it follows already: one revision, versions, compares) under a key
//! prefix, and [`EtcdLeadership`] decides which hub replica runs the controllers with an etcd
//! election (a lease and a campaign) — decision 0012.
//!
//! Keys: the hub's key `/clusters/x` is stored at `{prefix}clusters/x` (prefix `/flotilla/`
//! by default), so several fleets, or other tenants, can share one etcd. Hub keys start with
//! `/`, and this backend refuses any that does not (it could not map it back).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client as etcd;
use flotilla_core::kv::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyRange, KeyValue, KvBackend, KvError,
    Limits, Op, OpResult, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult, WatchBatch,
    WatchRequest, WatchStream, prefix_end, validate_range, validate_txn, validate_watch,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::controllers::Leadership;

/// How to reach etcd and where the fleet lives in it (hub flags).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet (default `/flotilla/`).
    pub prefix: String,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// TTL of the leadership lease: a dead leader's controllers move after at most this.
    pub lease_ttl: Duration,
    /// TLS to etcd (`https://` endpoints): the CA that signed etcd's certificate and the
    /// hub's client certificate, when etcd asks for one (`--client-cert-auth`).
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd, as PEM text.
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA etcd's serving certificate chains to.
    pub ca_pem: String,
    /// The hub's client certificate and key.
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdConfig {
    /// `endpoints` with the defaults: prefix `/flotilla/`, 5 s requests, 3 s lease.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/flotilla/".into(),
            request_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(3),
            tls: None,
        }
    }
}

/// The largest etcd response accepted (a whole-fleet load is one response).
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// The store model on etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdKv {
    kv: etcd::KvClient,
    watches: etcd::WatchClient,
    /// The prefix without its trailing `/`: hub key `/a` is etcd key `{ns}/a`.
    ns: Arc<Vec<u8>>,
    limits: Limits,
    sent: Arc<Sent>,
}

/// Requests this backend has sent to etcd, by kind.
#[derive(Debug, Default)]
pub struct Sent {
    /// Ranges.
    pub ranges: std::sync::atomic::AtomicU64,
    /// Transactions.
    pub txns: std::sync::atomic::AtomicU64,
    /// Watches opened.
    pub watches: std::sync::atomic::AtomicU64,
}

fn count(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl EtcdKv {
    /// Connects to etcd (fails if no endpoint answers within the request timeout).
    pub async fn connect(config: &EtcdConfig, limits: Limits) -> Result<Self, KvError> {
        if !config.prefix.starts_with('/') {
            return Err(KvError::invalid(
                "etcd-prefix",
                format!("{:?} must start with '/'", config.prefix),
            ));
        }
        let client = etcd::Client::connect(&config.endpoints, Some(options(config, true)))
            .await
            .map_err(|e| KvError::Unavailable(format!("etcd {:?}: {e}", config.endpoints)))?;
        let ns = config.prefix.trim_end_matches('/').as_bytes().to_vec();
        // A mirror's first load reads every cluster and inventory at once: far beyond the
        // 4 MiB tonic allows a response by default.
        Ok(Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            watches: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            ns: Arc::new(ns),
            limits,
            sent: Arc::default(),
        })
    }

    /// What this backend (and its clones) sent to etcd so far.
    pub fn sent(&self) -> &Sent {
        &self.sent
    }

    fn key(&self, field: &str, k: &[u8]) -> Result<Vec<u8>, KvError> {
        if !k.starts_with(b"/") {
            return Err(KvError::invalid(
                field,
                "keys on the etcd backend start with '/'",
            ));
        }
        Ok([self.ns.as_slice(), k].concat())
    }

    /// The etcd key and range end of `r` (an empty prefix is the whole namespace).
    fn range_of(&self, field: &str, r: &KeyRange) -> Result<(Vec<u8>, Option<Vec<u8>>), KvError> {
        if r.prefix {
            let start = match r.key.is_empty() {
                true => [self.ns.as_slice(), b"/"].concat(),
                false => self.key(field, &r.key)?,
            };
            let end = prefix_end(&start).unwrap_or_else(|| vec![0]);
            Ok((start, Some(end)))
        } else {
            Ok((self.key(field, &r.key)?, None))
        }
    }

    fn unkey(&self, k: &[u8]) -> Vec<u8> {
        k.strip_prefix(self.ns.as_slice()).unwrap_or(k).to_vec()
    }

    fn kv(&self, kv: &etcd::KeyValue) -> KeyValue {
        KeyValue {
            key: self.unkey(kv.key()),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
        }
    }

    fn get_options(&self, req: &RangeRequest) -> Result<(Vec<u8>, etcd::GetOptions), KvError> {
        let (key, end) = self.range_of("key", &req.range)?;
        let mut o = etcd::GetOptions::new()
            .with_limit(req.limit)
            .with_revision(req.revision);
        if let Some(end) = end {
            o = o.with_range(end);
        }
        if req.keys_only {
            o = o.with_keys_only();
        }
        if req.consistency == flotilla_core::kv::Consistency::Serializable {
            o = o.with_serializable();
        }
        Ok((key, o))
    }

    fn range_result(&self, r: &etcd::GetResponse, fallback_revision: Revision) -> RangeResult {
        RangeResult {
            kvs: r.kvs().iter().map(|kv| self.kv(kv)).collect(),
            more: r.more(),
            count: r.count(),
            revision: r
                .header()
                .map(|h| h.revision())
                .filter(|r| *r > 0)
                .unwrap_or(fallback_revision),
        }
    }

    fn compare(&self, i: usize, c: &Compare) -> Result<etcd::Compare, KvError> {
        use etcd::CompareOp as E;
        let key = self.key(&format!("compare[{i}].key"), &c.key)?;
        let op = match c.op {
            CompareOp::Equal => E::Equal,
            CompareOp::NotEqual => E::NotEqual,
            CompareOp::Greater => E::Greater,
            CompareOp::Less => E::Less,
        };
        Ok(match &c.target {
            CompareTarget::Version(v) => etcd::Compare::version(key, op, *v),
            CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(key, op, *r),
            CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(key, op, *r),
            CompareTarget::Value(v) => etcd::Compare::value(key, op, v.clone()),
            // etcd has no existence compare: a key exists when its version is not 0.
            CompareTarget::Exists(want) => {
                let exists = matches!(c.op, CompareOp::Equal) == *want;
                let op = if exists { E::NotEqual } else { E::Equal };
                etcd::Compare::version(key, op, 0)
            }
        })
    }

    fn op(&self, field: &str, op: &Op) -> Result<etcd::TxnOp, KvError> {
        Ok(match op {
            Op::Range(r) => {
                let (key, o) = self.get_options(r)?;
                etcd::TxnOp::get(key, Some(o))
            }
            Op::Put {
                key,
                value,
                prev_kv,
            } => {
                let o = prev_kv.then(|| etcd::PutOptions::new().with_prev_key());
                etcd::TxnOp::put(
                    self.key(&format!("{field}.put.key"), key)?,
                    value.clone(),
                    o,
                )
            }
            Op::Delete { range, prev_kv } => {
                let (key, end) = self.range_of(&format!("{field}.delete.key"), range)?;
                let mut o = etcd::DeleteOptions::new();
                if let Some(end) = end {
                    o = o.with_range(end);
                }
                if *prev_kv {
                    o = o.with_prev_key();
                }
                etcd::TxnOp::delete(key, Some(o))
            }
        })
    }

    /// The compaction revision, learnt the one way etcd tells it: a watch from revision 1 is
    /// refused with it.
    async fn compact_revision(&self) -> Revision {
        let mut c = self.watches.clone();
        let o = etcd::WatchOptions::new().with_start_revision(1);
        let Ok(mut s) = c.watch(self.ns.to_vec(), Some(o)).await else {
            return 0;
        };
        let found = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(m)) = s.message().await {
                if m.compact_revision() > 0 || m.canceled() {
                    return m.compact_revision();
                }
                if !m.created() || !m.events().is_empty() {
                    return 0;
                }
            }
            0
        })
        .await;
        found.unwrap_or(0)
    }

    /// An etcd error as a store error; `write` says whether it could have been applied.
    async fn error(&self, e: etcd::Error, write: bool, requested: Revision) -> KvError {
        let status = match e {
            etcd::Error::GRpcStatus(s) => s,
            etcd::Error::TransportError(e) => return KvError::Unavailable(format!("etcd: {e}")),
            other => return KvError::Unavailable(format!("etcd: {other}")),
        };
        let msg = status.message().to_string();
        use tonic::Code;
        match status.code() {
            _ if msg.contains("required revision has been compacted") => KvError::Compacted {
                requested,
                oldest: self.compact_revision().await,
            },
            _ if msg.contains("required revision is a future revision") => KvError::invalid(
                "revision",
                format!("{requested} is in the future (etcd: {msg})"),
            ),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                KvError::invalid("request", format!("etcd refused it: {msg}"))
            }
            Code::ResourceExhausted => KvError::invalid("request", format!("etcd: {msg}")),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                if write =>
            {
                KvError::OutcomeUnknown(format!("etcd: {msg}"))
            }
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                KvError::Unavailable(format!("etcd: {msg}"))
            }
            _ => KvError::Internal(format!("etcd: {:?}: {msg}", status.code())),
        }
    }
}

/// Client options: deadlines for requests (`timeout`), none for long calls (campaigns).
fn options(config: &EtcdConfig, timeout: bool) -> etcd::ConnectOptions {
    let o = etcd::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        // etcd enforces gRPC's ping policy (`--grpc-keepalive-min-time`, default 5 s, and no
        // pings without a stream): a client that pings more often is sent GOAWAY
        // (too_many_pings) and loses every watch and request on the connection. Pinging every
        // 2 s dropped the hubs' connections every few seconds. Dead connections are found by
        // the leadership lease's own keep-alives (every TTL/3) and request deadlines.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(false)
        .with_require_leader(true);
    let o = match &config.tls {
        Some(t) => {
            let mut tls =
                etcd::TlsOptions::new().ca_certificate(etcd::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.identity {
                tls = tls.identity(etcd::Identity::from_pem(cert, key));
            }
            o.with_tls(tls)
        }
        None => o,
    };
    match timeout {
        true => o.with_timeout(config.request_timeout),
        false => o,
    }
}

impl KvBackend for EtcdKv {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        validate_range("", &req, &self.limits)?;
        let (key, o) = self.get_options(&req)?;
        let mut c = self.kv.clone();
        count(&self.sent.ranges);
        match c.get(key, Some(o)).await {
            Ok(r) => Ok(self.range_result(&r, 0)),
            Err(e) => Err(self.error(e, false, req.revision).await),
        }
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        validate_txn(&req, &self.limits)?;
        let compare = (req.compare.iter().enumerate())
            .map(|(i, c)| self.compare(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let branch = |name: &str, ops: &[Op]| {
            (ops.iter().enumerate())
                .map(|(i, o)| self.op(&format!("{name}[{i}]"), o))
                .collect::<Result<Vec<_>, _>>()
        };
        let txn = etcd::Txn::new()
            .when(compare)
            .and_then(branch("success", &req.success)?)
            .or_else(branch("failure", &req.failure)?);
        let mut c = self.kv.clone();
        count(&self.sent.txns);
        let r = match c.txn(txn).await {
            Ok(r) => r,
            Err(e) => return Err(self.error(e, req.writes(), 0).await),
        };
        let revision = r.header().map_or(0, |h| h.revision());
        let results = r
            .op_responses()
            .into_iter()
            .map(|o| match o {
                etcd::TxnOpResponse::Get(g) => OpResult::Range(self.range_result(&g, revision)),
                etcd::TxnOpResponse::Put(p) => OpResult::Put {
                    prev_kv: p.prev_key().map(|kv| self.kv(kv)),
                },
                etcd::TxnOpResponse::Delete(d) => OpResult::Delete {
                    deleted: d.deleted(),
                    prev_kvs: d.prev_kvs().iter().map(|kv| self.kv(kv)).collect(),
                },
                // Never sent: the model has no nested transactions.
                etcd::TxnOpResponse::Txn(_) => OpResult::Delete {
                    deleted: 0,
                    prev_kvs: Vec::new(),
                },
            })
            .collect();
        Ok(TxnResult {
            succeeded: r.succeeded(),
            revision,
            results,
        })
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        validate_watch(&req, &self.limits)?;
        let (key, end) = self.range_of("key", &req.range)?;
        let mut o = etcd::WatchOptions::new().with_start_revision(req.start_revision);
        if let Some(end) = end {
            o = o.with_range(end);
        }
        if req.prev_kv {
            o = o.with_prev_key();
        }
        let mut c = self.watches.clone();
        count(&self.sent.watches);
        let stream = match c.watch(key, Some(o)).await {
            Ok(s) => s,
            Err(e) => return Err(self.error(e, false, req.start_revision).await),
        };
        let me = self.clone();
        let pending: std::collections::VecDeque<WatchBatch> = Default::default();
        Ok(Box::pin(futures::stream::unfold(
            Some((me, stream, pending, req.start_revision)),
            |st| async move {
                let (me, mut stream, mut pending, start) = st?;
                loop {
                    if let Some(b) = pending.pop_front() {
                        return Some((Ok(b), Some((me, stream, pending, start))));
                    }
                    let m = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            let e = KvError::Unavailable("etcd watch ended".into());
                            return Some((Err(e), None));
                        }
                        Err(e) => {
                            let e = me.error(e, false, start).await;
                            return Some((Err(e), None));
                        }
                    };
                    if m.compact_revision() > 0 {
                        let e = KvError::Compacted {
                            requested: start,
                            oldest: m.compact_revision(),
                        };
                        return Some((Err(e), None));
                    }
                    if m.canceled() {
                        let e = KvError::Unavailable(format!(
                            "etcd canceled the watch: {}",
                            m.cancel_reason()
                        ));
                        return Some((Err(e), None));
                    }
                    // One response can carry several revisions: one batch per revision.
                    for e in m.events() {
                        let Some(kv) = e.kv() else { continue };
                        let event = Event {
                            kind: match e.event_type() {
                                etcd::EventType::Put => EventKind::Put,
                                etcd::EventType::Delete => EventKind::Delete,
                            },
                            kv: me.kv(kv),
                            prev_kv: e.prev_kv().map(|p| me.kv(p)),
                        };
                        let rev = kv.mod_revision();
                        match pending.back_mut() {
                            Some(b) if b.revision == rev => b.events.push(event),
                            _ => pending.push_back(WatchBatch {
                                revision: rev,
                                events: vec![event],
                            }),
                        }
                    }
                }
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        let mut c = self.kv.clone();
        match c.compact(revision, None).await {
            Ok(_) => Ok(revision),
            Err(e) => match self.error(e, true, revision).await {
                // Already compacted past it: as the model says, a no-op.
                KvError::Compacted { oldest, .. } => Ok(oldest),
                e => Err(e),
            },
        }
    }
}

/// This replica's view of the etcd election.
#[derive(Debug, Default)]
struct ElectionState {
    /// Leading until this instant (the lease's TTL from the last keep-alive sent that etcd
    /// acknowledged, less a margin), while elected.
    leading_until: Option<Instant>,
    /// The leader's advertised gRPC address, as its campaign value says.
    leader: Option<String>,
    /// The leader key's create revision: a fencing number that grows with each leadership.
    term: i64,
}

/// Leadership by etcd election: a lease kept alive every third of its TTL, a campaign under
/// it, and the leader's address observed by every replica. Cheap to clone.
#[derive(Clone)]
pub struct EtcdLeadership {
    state: Arc<Mutex<ElectionState>>,
}

impl EtcdLeadership {
    /// Joins the election `{prefix without '/'}.election` with `advertise` as this replica's
    /// address; runs until `shutdown`, then resigns so another replica takes over at once.
    pub async fn start(
        config: &EtcdConfig,
        advertise: String,
        shutdown: CancellationToken,
    ) -> Result<Self, KvError> {
        let client = etcd::Client::connect(&config.endpoints, Some(options(config, false)))
            .await
            .map_err(|e| KvError::Unavailable(format!("etcd {:?}: {e}", config.endpoints)))?;
        let name = format!("{}.election", config.prefix.trim_end_matches('/'));
        let me = Self {
            state: Arc::default(),
        };
        let ttl = config.lease_ttl.max(Duration::from_secs(2));
        tokio::spawn(
            campaign_loop(
                client.clone(),
                name.clone(),
                advertise,
                ttl,
                me.clone(),
                shutdown.clone(),
            )
            .instrument(info_span!("etcd-election")),
        );
        tokio::spawn(
            observe_loop(client, name, me.clone(), shutdown).instrument(info_span!("etcd-observe")),
        );
        Ok(me)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ElectionState> {
        self.state.lock().expect("election state lock")
    }

    /// The current leadership's fencing number (0 before any leader is known).
    pub fn term(&self) -> i64 {
        self.state().term
    }

    /// Whether some replica is known to lead.
    pub fn leader_known(&self) -> bool {
        self.state().leader.is_some()
    }
}

impl Leadership for EtcdLeadership {
    fn is_leader(&self) -> bool {
        self.state()
            .leading_until
            .is_some_and(|t| Instant::now() < t)
    }

    fn leader_addr(&self) -> Option<String> {
        self.state().leader.clone()
    }
}

/// Grants a lease, campaigns under it and keeps it alive; on losing it (etcd unreachable for
/// the TTL, or the lease expired) steps down and starts over with a new lease.
async fn campaign_loop(
    client: etcd::Client,
    name: String,
    advertise: String,
    ttl: Duration,
    me: EtcdLeadership,
    shutdown: CancellationToken,
) {
    // Stop acting this long before etcd would expire the lease: process and clock slack.
    let margin = ttl / 4;
    while !shutdown.is_cancelled() {
        let mut c = client.clone();
        let lease = match c.lease_grant(ttl.as_secs() as i64, None).await {
            Ok(l) => l.id(),
            Err(e) => {
                warn!(error = %e, "etcd lease grant failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let (mut keeper, mut acks) = match c.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(e) => {
                warn!(error = %e, "etcd lease keep-alive failed; retrying");
                continue;
            }
        };
        let mut election = client.clone();
        let campaign = election.campaign(name.as_bytes().to_vec(), advertise.clone(), lease);
        tokio::pin!(campaign);
        let mut elected = false;
        let mut valid_until = Instant::now() + ttl - margin;
        let mut every = tokio::time::interval(ttl / 3);
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                r = &mut campaign, if !elected => match r {
                    Ok(r) => {
                        let term = r.header().map_or(0, |h| h.revision());
                        info!(term, "elected: leading the fleet's controllers");
                        let mut s = me.state();
                        s.leading_until = Some(valid_until);
                        s.term = term;
                        s.leader = Some(advertise.clone());
                        drop(s);
                        elected = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "etcd campaign failed; starting over");
                        break true;
                    }
                },
                _ = every.tick() => {
                    let sent = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        break true;
                    }
                    match tokio::time::timeout(ttl / 3, acks.message()).await {
                        Ok(Ok(Some(a))) if a.ttl() > 0 => {
                            valid_until = sent + Duration::from_secs(a.ttl() as u64) - margin;
                            if elected {
                                me.state().leading_until = Some(valid_until);
                            }
                        }
                        Ok(Ok(Some(_))) => {
                            warn!("etcd lease expired; stepping down");
                            break true;
                        }
                        Ok(_) => break true,
                        // No answer in time: keep the old deadline, try again next tick.
                        Err(_) => {}
                    }
                    if Instant::now() >= valid_until {
                        warn!("etcd lease not renewed within its TTL; stepping down");
                        break true;
                    }
                }
            }
        };
        me.state().leading_until = None;
        if elected {
            info!("no longer leading");
        }
        if !lost {
            // Shutdown: hand leadership over now instead of after the TTL.
            let _ = tokio::time::timeout(Duration::from_secs(2), c.lease_revoke(lease)).await;
        }
    }
}

/// Follows who leads, for redirects and readiness.
async fn observe_loop(
    client: etcd::Client,
    name: String,
    me: EtcdLeadership,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut c = client.clone();
        let follow = async {
            let mut s = c.observe(name.as_bytes().to_vec()).await?;
            while let Some(r) = s.message().await? {
                let leader = r
                    .kv()
                    .and_then(|kv| kv.value_str().ok())
                    .map(str::to_string);
                let term = r.kv().map_or(0, |kv| kv.create_revision());
                let mut st = me.state();
                st.leader = leader;
                st.term = st.term.max(term);
            }
            Ok::<_, etcd::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "observing the etcd election; retrying");
                }
                me.state().leader = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
