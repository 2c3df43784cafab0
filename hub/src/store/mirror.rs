//! One in-memory mirror of the store per replica: load the mirrored prefixes at one revision,
//! then follow one watch in revision order, and hand typed changes to every subscriber in that
//! order. The fleet view subscribes; the routing table and the campaign controller are next.

use std::sync::Arc;
use std::time::Duration;

use flotilla_core::kv::{EventKind, KeyRange, KvBackend, KvError, Op, OpResult, RangeRequest};
use flotilla_core::kv::{TxnRequest, WatchRequest};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::keys::MIRRORED;
use super::records::Change;

/// Receives the mirror's changes, synchronously and in revision order. Implementations keep
/// the work short (update an in-memory structure, or hand off to a channel of their own).
pub trait Subscriber: Send + Sync + 'static {
    /// The whole mirrored state at `revision`, replacing anything received before (first
    /// load, and reloads after the watch broke).
    fn reset(&self, revision: i64, records: Vec<Change>);
    /// The changes of one revision, after everything already received.
    fn apply(&self, revision: i64, changes: Vec<Change>);
}

/// The replica's mirror of the store.
pub struct StoreMirror {
    subscribers: Vec<Arc<dyn Subscriber>>,
    revision: watch::Sender<i64>,
}

impl StoreMirror {
    /// A mirror feeding `subscribers`.
    pub fn new(subscribers: Vec<Arc<dyn Subscriber>>) -> Self {
        Self {
            subscribers,
            revision: watch::Sender::new(0),
        }
    }

    /// The revision every subscriber has seen (0 before the first load).
    pub fn revision(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    /// Load and follow until `shutdown`, reloading after errors.
    pub async fn run<B: KvBackend>(self, backend: B, shutdown: CancellationToken) {
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&backend) => r,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "store mirror lost the watch; reloading");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    fn decoded(key: &[u8], value: Option<&[u8]>) -> Option<Change> {
        match Change::decode(key, value)? {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a record");
                None
            }
        }
    }

    /// Hand `v` to every subscriber: copies for all but the last, which takes it.
    fn fan_out(&self, v: Vec<Change>, f: impl Fn(&dyn Subscriber, Vec<Change>)) {
        if let Some((last, rest)) = self.subscribers.split_last() {
            for s in rest {
                f(&**s, v.clone());
            }
            f(&**last, v);
        }
    }

    async fn follow<B: KvBackend>(&self, b: &B) -> Result<(), KvError> {
        let load = b
            .txn(TxnRequest {
                compare: vec![],
                success: MIRRORED
                    .iter()
                    .map(|p| Op::Range(RangeRequest::new(KeyRange::prefix(*p))))
                    .collect(),
                failure: vec![],
            })
            .await?;
        let mut records = Vec::new();
        for r in &load.results {
            if let OpResult::Range(r) = r {
                records.extend(
                    r.kvs
                        .iter()
                        .filter_map(|kv| Self::decoded(&kv.key, Some(&kv.value))),
                );
            }
        }
        self.fan_out(records, |s, r| s.reset(load.revision, r));
        self.revision.send_replace(load.revision);
        // One watch over the whole keyspace keeps every prefix in one revision order; keys
        // that are not mirrored are dropped by prefix before anything is decoded.
        let mut watch = b
            .watch(WatchRequest {
                range: KeyRange::prefix("/"),
                start_revision: load.revision + 1,
                prev_kv: false,
            })
            .await?;
        while let Some(batch) = watch.next().await {
            let batch = batch?;
            let changes: Vec<Change> = batch
                .events
                .iter()
                .filter_map(|e| {
                    let value = matches!(e.kind, EventKind::Put).then_some(e.kv.value.as_slice());
                    Self::decoded(&e.kv.key, value)
                })
                .collect();
            if !changes.is_empty() {
                self.fan_out(changes, |s, c| s.apply(batch.revision, c));
            }
            self.revision.send_replace(batch.revision);
        }
        Err(KvError::Unavailable("watch ended".into()))
    }
}
