//! Health: `core::health::Tracker` on the leader, fed by agent streams and a clock, its
//! transitions persisted into cluster records. [`HealthCtl`] is the shared state the agent
//! streams report to; [`HealthController`] is the leader's loop. Followers hold no tracker.
//!
//! Every transition the tracker makes (except a join's, which goes into the registration
//! write) is queued, in the tracker's own order, and written by one task of the term that
//! retries until the write succeeds: the record never says Ready for a cluster the tracker
//! saw die because one write failed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::convert::fleet::{cluster_from_wire, cluster_to_wire, health_from_wire};
use flotilla_api::v1;
use flotilla_core::health::{Policy, Signals, Tracker, Transition};
use flotilla_core::kv::{KvBackend, KvError};
use flotilla_core::membership;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Clock, Controller, Leading};
use crate::fleet::view::FleetView;
use crate::store::{keys, records};

/// The tracker of this replica's term, and where its transitions go to be written.
struct Term {
    tracker: Tracker,
    writes: mpsc::UnboundedSender<Transition>,
}

/// Health bookkeeping on the leader, shared with the agent streams.
pub struct HealthCtl {
    policy: Policy,
    clock: Arc<dyn Clock>,
    term: Mutex<Option<Term>>,
}

impl HealthCtl {
    /// A controller with this policy and clock (no tracker until this replica leads).
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            policy,
            clock,
            term: Mutex::new(None),
        })
    }

    /// The clock transitions are stamped with.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The clock, shared (for other controllers on the same time).
    pub fn clock_arc(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Runs `f` on the tracker; the transitions it returns are queued for writing under the
    /// same lock, so the queue keeps the tracker's order.
    fn with_queued(
        &self,
        f: impl FnOnce(&mut Tracker, Duration) -> Vec<Transition>,
    ) -> Vec<Transition> {
        let now = self.clock.monotonic();
        let mut g = self.term.lock().expect("tracker");
        let Some(term) = g.as_mut() else {
            return Vec::new();
        };
        let trs = f(&mut term.tracker, now);
        for tr in &trs {
            log_transition(tr);
            let _ = term.writes.send(tr.clone());
        }
        trs
    }

    /// A cluster (re)connected. The transition is returned, not queued: the registration
    /// writes it together with the cluster's identity.
    pub fn joined(&self, cluster: &str) -> Option<Transition> {
        let now = self.clock.monotonic();
        let mut g = self.term.lock().expect("tracker");
        g.as_mut().and_then(|t| t.tracker.joined(cluster, now))
    }

    /// A message from the cluster's agent arrived: it is alive, whatever the message is and
    /// however long its processing takes.
    pub fn seen(&self, cluster: &str) -> Option<Transition> {
        self.with_queued(|t, now| t.heartbeat(cluster, now).into_iter().collect())
            .pop()
    }

    /// A report or heartbeat with signals.
    pub fn report(&self, cluster: &str, signals: Signals) -> Option<Transition> {
        self.with_queued(|t, now| t.report(cluster, now, signals).into_iter().collect())
            .pop()
    }

    /// An explicit leave.
    pub fn left(&self, cluster: &str) -> Option<Transition> {
        self.with_queued(|t, _| t.left(cluster).into_iter().collect())
            .pop()
    }

    /// Whether this replica currently tracks health (it leads).
    pub fn active(&self) -> bool {
        self.term.lock().expect("tracker").is_some()
    }

    fn set(&self, term: Option<Term>) {
        *self.term.lock().expect("tracker") = term;
    }
}

/// The leader's health loop: seeds a tracker from the view (with the grace period), judges
/// liveness every `tick`, writes every transition (retrying until each is stored), and
/// drops the tracker when the term ends.
pub struct HealthController<B> {
    /// Shared health state.
    pub ctl: Arc<HealthCtl>,
    /// The store.
    pub backend: B,
    /// The replica's view (the persisted health a new leader starts from).
    pub view: Arc<FleetView>,
    /// How often liveness is judged.
    pub tick: Duration,
}

/// Longest wait between attempts to write a transition while the store fails.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Clusters whose transitions are written at once (a join storm makes thousands).
const WRITERS: usize = 64;

/// Most transitions taken from the queue for one round of writes.
const BATCH: usize = 4096;

impl<B: KvBackend + Clone> HealthController<B> {
    /// Writes queued transitions: each cluster's in order, different clusters' concurrently,
    /// each retried until it is stored or the term ends (the next leader starts from what is
    /// stored, with a grace period). A round finishes before the next starts, so a cluster's
    /// order holds across rounds too.
    async fn write_all(
        &self,
        mut queue: mpsc::UnboundedReceiver<Transition>,
        term: &CancellationToken,
    ) {
        use futures::StreamExt;
        while let Some(first) = tokio::select! {
            _ = term.cancelled() => None,
            tr = queue.recv() => tr,
        } {
            let mut by_cluster: std::collections::BTreeMap<String, Vec<Transition>> =
                Default::default();
            by_cluster
                .entry(first.cluster.clone())
                .or_default()
                .push(first);
            for _ in 1..BATCH {
                let Ok(tr) = queue.try_recv() else { break };
                by_cluster.entry(tr.cluster.clone()).or_default().push(tr);
            }
            futures::stream::iter(by_cluster.into_values())
                .for_each_concurrent(WRITERS, |trs| self.write_in_order(trs, term))
                .await;
        }
    }

    /// Writes one cluster's transitions in order, retrying each until it is stored.
    async fn write_in_order(&self, trs: Vec<Transition>, term: &CancellationToken) {
        for tr in trs {
            let mut wait = Duration::from_millis(50);
            while let Err(e) = persist(&self.backend, &tr, self.ctl.clock.unix_ms()).await {
                tracing::warn!(cluster = %tr.cluster, to = ?tr.to, error = %e, "writing a health transition failed; retrying");
                tokio::select! {
                    _ = term.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

impl<B: KvBackend + Clone> Controller for HealthController<B> {
    fn name(&self) -> &'static str {
        "health"
    }

    fn lead(self: Arc<Self>, term: CancellationToken) -> Leading {
        Box::pin(async move {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = self.view.loaded() => {}
            }
            let persisted = self
                .view
                .clusters()
                .into_iter()
                .filter_map(|c| health_from_wire(c.health).map(|h| (c.name, h)));
            let now = self.ctl.clock.monotonic();
            let (writes, queue) = mpsc::unbounded_channel();
            self.ctl.set(Some(Term {
                tracker: Tracker::new(self.ctl.policy, now, persisted),
                writes,
            }));
            tracing::info!("health tracking started with a grace period");
            let judge = async {
                let mut every = tokio::time::interval(self.tick);
                loop {
                    tokio::select! {
                        _ = term.cancelled() => break,
                        _ = every.tick() => {}
                    }
                    self.ctl.with_queued(|t, now| t.tick(now));
                }
            };
            tokio::join!(judge, self.write_all(queue, &term));
            self.ctl.set(None);
            tracing::info!("health tracking stopped");
        })
    }
}

/// Log a transition.
pub fn log_transition(tr: &Transition) {
    tracing::info!(cluster = %tr.cluster, from = ?tr.from, to = ?tr.to, reason = %tr.reason, "health transition");
}

/// Write a transition into the cluster record, stamped `at_unix_ms` (nothing, when the
/// record has moved on: see `membership::transition_applies`).
pub async fn persist<B: KvBackend>(b: &B, tr: &Transition, at_unix_ms: i64) -> Result<(), KvError> {
    records::update::<B, v1::Cluster, _>(b, &keys::cluster_key(&tr.cluster), |cur| {
        let mut c = cluster_from_wire(&cur?);
        if !membership::transition_applies(&c, tr) {
            return None;
        }
        membership::record_transition(&mut c, tr, at_unix_ms);
        Some(cluster_to_wire(&c))
    })
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use flotilla_core::kv::{
        KeyValue, Op, OpResult, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult,
        WatchRequest, WatchStream,
    };
    use prost::Message;

    use super::*;
    use crate::controllers::SystemClock;
    use crate::store::mirror::Subscriber;
    use crate::store::records::Change;

    /// The fake's revision and records.
    type Table = (Revision, BTreeMap<Vec<u8>, KeyValue>);

    /// Single keys and puts only: what the health controller's writes need.
    #[derive(Clone, Default)]
    struct Keys(Arc<Mutex<Table>>);

    impl KvBackend for Keys {
        async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
            let g = self.0.lock().unwrap();
            Ok(RangeResult {
                kvs: g.1.get(&req.range.key).cloned().into_iter().collect(),
                revision: g.0,
                ..Default::default()
            })
        }

        async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
            let mut g = self.0.lock().unwrap();
            let ok = req.compare.iter().all(|c| c.holds(g.1.get(&c.key)));
            let ops = if ok { &req.success } else { &req.failure };
            if ops.iter().any(Op::is_write) {
                g.0 += 1;
            }
            let rev = g.0;
            for op in ops {
                if let Op::Put { key, value, .. } = op {
                    let prev = g.1.get(key).cloned().unwrap_or_default();
                    g.1.insert(
                        key.clone(),
                        KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: if prev.version == 0 {
                                rev
                            } else {
                                prev.create_revision
                            },
                            mod_revision: rev,
                            version: prev.version + 1,
                        },
                    );
                }
            }
            Ok(TxnResult {
                succeeded: ok,
                revision: rev,
                results: ops
                    .iter()
                    .map(|_| OpResult::Put { prev_kv: None })
                    .collect(),
            })
        }

        async fn watch(&self, _: WatchRequest) -> Result<WatchStream, KvError> {
            Err(KvError::Unavailable("not in this fake".into()))
        }

        async fn compact(&self, r: Revision) -> Result<Revision, KvError> {
            Ok(r)
        }
    }

    fn health_of(store: &Keys, name: &str) -> v1::ClusterHealth {
        let g = store.0.lock().unwrap();
        let kv = &g.1[keys::cluster_key(name).as_bytes()];
        v1::Cluster::decode(kv.value.as_slice()).unwrap().health()
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_waits_out_the_grace_period_then_marks_silent_clusters_unreachable() {
        let store = Keys::default();
        let ready = v1::Cluster {
            name: "a".into(),
            health: v1::ClusterHealth::Ready as i32,
            ..Default::default()
        };
        store
            .txn(TxnRequest::put(
                keys::cluster_key("a"),
                ready.encode_to_vec(),
            ))
            .await
            .unwrap();
        let view = FleetView::new();
        view.reset(
            1,
            vec![Change::Cluster {
                name: "a".into(),
                record: Some(Box::new(ready)),
            }],
        );
        let policy = Policy {
            unreachable_after: Duration::from_secs(3),
            leader_grace: Duration::from_secs(10),
        };
        let ctl = HealthCtl::new(policy, Arc::new(SystemClock::default()));
        let controller = Arc::new(HealthController {
            ctl: ctl.clone(),
            backend: store.clone(),
            view,
            tick: Duration::from_millis(100),
        });
        let term = CancellationToken::new();
        let task = tokio::spawn(controller.lead(term.clone()));
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(ctl.active());
        assert_eq!(
            health_of(&store, "a"),
            v1::ClusterHealth::Ready,
            "nobody is judged within grace + unreachable_after"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(health_of(&store, "a"), v1::ClusterHealth::Unreachable);
        term.cancel();
        task.await.unwrap();
        assert!(!ctl.active(), "the tracker goes with the term");
    }
}
