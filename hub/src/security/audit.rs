//! The audit log: every mutation and every denial, from an API caller or an agent stream,
//! appended to the store under `/audit/` in time order, read back with `flotctl audit`, and
//! trimmed by the leader after the retention.
//!
//! Recording never waits on the store: a record goes to a bounded queue that one writer per
//! replica drains in batches (one transaction each). If the store falls so far behind that the
//! queue fills, records are dropped, counted in `flotilla_audit_dropped_total` and logged: an
//! audit backlog must not stop agents reporting or operators acting. Records name the
//! principal and its credential's serial or token id, never a secret.

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::v1;
use flotilla_core::kv::{KeyRange, KvBackend, Op, RangeRequest, TxnRequest};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::controllers::Clock;
use crate::security::caller::Caller;
use crate::store::keys;

/// Records waiting for the writer before new ones are dropped.
pub const QUEUE: usize = 8192;
/// Records per write.
pub const BATCH: usize = 256;

/// Whether a request was let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allowed,
    /// Denied, and why.
    Denied(String),
}

/// Where records go; cheap to clone. `Audit::off()` records nothing (unit tests).
#[derive(Clone)]
pub struct Audit {
    tx: Option<mpsc::Sender<v1::AuditRecord>>,
    clock: Arc<dyn Clock>,
    dropped: prometheus_client::metrics::counter::Counter,
}

impl Audit {
    /// An audit handle and the receiver its writer drains.
    pub fn new(
        clock: Arc<dyn Clock>,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> (Audit, mpsc::Receiver<v1::AuditRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Audit {
                tx: Some(tx),
                clock,
                dropped,
            },
            rx,
        )
    }

    /// A handle that records nothing.
    pub fn off() -> Audit {
        Audit {
            tx: None,
            clock: Arc::new(crate::controllers::SystemClock::default()),
            dropped: Default::default(),
        }
    }

    /// Records one decision about `action` (a method path or stream event) on `target`.
    pub fn record(
        &self,
        who: Option<&Caller>,
        action: &str,
        target: &str,
        decision: Decision,
        code: tonic::Code,
    ) {
        let Some(tx) = &self.tx else { return };
        let (decision, reason) = match decision {
            Decision::Allowed => ("allowed", String::new()),
            Decision::Denied(r) => ("denied", r),
        };
        let rec = v1::AuditRecord {
            id: uuid::Uuid::new_v4().simple().to_string(),
            at_unix_ms: self.clock.unix_ms(),
            principal: who.map_or("unknown".into(), |c| c.principal.to_string()),
            credential: who.and_then(|c| c.credential.clone()).unwrap_or_default(),
            source: who
                .and_then(|c| c.remote)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            action: action.trim_start_matches('/').to_string(),
            target: target.to_string(),
            decision: decision.into(),
            reason,
            code: format!("{code:?}"),
        };
        if tx.try_send(rec).is_err() {
            self.dropped.inc();
            tracing::warn!(action, "audit queue full: a record was dropped");
        }
    }
}

/// Drains `rx` into the store until `shutdown` (then writes what is queued).
pub async fn run_writer<B: KvBackend>(
    backend: B,
    mut rx: mpsc::Receiver<v1::AuditRecord>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shutdown.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, QUEUE).await
            }
        };
        if n == 0 {
            return;
        }
        let success = batch
            .drain(..)
            .map(|r| Op::put(keys::audit_key(r.at_unix_ms, &r.id), r.encode_to_vec()))
            .collect();
        let txn = TxnRequest {
            success,
            ..Default::default()
        };
        if let Err(e) = backend.txn(txn).await {
            tracing::warn!(error = %e, records = n, "audit records could not be written");
        }
        if shutdown.is_cancelled() && rx.is_empty() {
            return;
        }
    }
}

/// Deletes records older than `retention` (keys are in time order, so it reads keys only,
/// oldest first, a page at a time). Returns how many went.
pub async fn trim<B: KvBackend>(
    backend: &B,
    clock: &dyn Clock,
    retention: Duration,
) -> Result<usize, flotilla_core::kv::KvError> {
    let cutoff = keys::audit_key(clock.unix_ms() - retention.as_millis() as i64, "");
    let mut deleted = 0;
    loop {
        let mut req = RangeRequest::new(KeyRange::prefix(keys::AUDIT));
        req.keys_only = true;
        req.limit = 1000;
        let page = backend.range(req).await?;
        let old: Vec<Op> = page
            .kvs
            .iter()
            .take_while(|kv| kv.key.as_slice() < cutoff.as_bytes())
            .map(|kv| Op::delete(kv.key.clone()))
            .collect();
        let (n, full) = (old.len(), page.kvs.len() == 1000);
        if n > 0 {
            backend
                .txn(TxnRequest {
                    success: old,
                    ..Default::default()
                })
                .await?;
        }
        deleted += n;
        if n < 1000 || !full {
            return Ok(deleted);
        }
    }
}

/// Records at or after `since` whose principal contains `who`, oldest first, at most `limit`
/// (the newest `limit` when there are more).
pub async fn list<B: KvBackend>(
    backend: &B,
    since_unix_ms: i64,
    who: &str,
    limit: usize,
) -> Result<Vec<v1::AuditRecord>, flotilla_core::kv::KvError> {
    let since = keys::audit_key(since_unix_ms, "");
    let r = backend
        .range(RangeRequest::new(KeyRange::prefix(keys::AUDIT)))
        .await?;
    let mut out: Vec<v1::AuditRecord> = r
        .kvs
        .iter()
        .filter(|kv| kv.key.as_slice() >= since.as_bytes())
        .filter_map(|kv| v1::AuditRecord::decode(kv.value.as_slice()).ok())
        .filter(|a| who.is_empty() || a.principal.contains(who))
        .collect();
    if out.len() > limit {
        out.drain(..out.len() - limit);
    }
    Ok(out)
}

/// How often the leader trims the audit log.
pub const TRIM_EVERY: Duration = Duration::from_secs(600);

/// The leader's audit trimmer: deletes records past the retention every [`TRIM_EVERY`].
pub struct TrimController<B> {
    /// Store.
    pub backend: B,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// How long records are kept.
    pub retention: Duration,
}

impl<B: KvBackend + Clone> crate::controllers::Controller for TrimController<B> {
    fn name(&self) -> &'static str {
        "audit-trim"
    }

    fn lead(self: Arc<Self>, term: CancellationToken) -> crate::controllers::Leading {
        Box::pin(async move {
            loop {
                match trim(&self.backend, &*self.clock, self.retention).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(records = n, "audit records past the retention deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "audit trim failed; retrying later"),
                }
                tokio::select! {
                    _ = term.cancelled() => return,
                    _ = tokio::time::sleep(TRIM_EVERY) => {}
                }
            }
        })
    }
}
