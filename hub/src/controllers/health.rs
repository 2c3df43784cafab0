//! Health: `core::health::Tracker` on the leader, fed by agent streams and a clock, its
//! transitions persisted into cluster records. [`HealthCtl`] is the shared state the agent
//! streams report to; [`HealthController`] is the leader's loop. Followers hold no tracker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::convert::fleet::{cluster_from_wire, cluster_to_wire, health_from_wire};
use flotilla_api::v1;
use flotilla_core::health::{Policy, Signals, Tracker, Transition};
use flotilla_core::kv::{KvBackend, KvError};
use flotilla_core::membership;
use tokio_util::sync::CancellationToken;

use super::{Clock, Controller, Leading};
use crate::fleet::view::FleetView;
use crate::store::{keys, records};

/// Health bookkeeping on the leader, shared with the agent streams.
pub struct HealthCtl {
    policy: Policy,
    clock: Arc<dyn Clock>,
    tracker: Mutex<Option<Tracker>>,
}

impl HealthCtl {
    /// A controller with this policy and clock (no tracker until this replica leads).
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            policy,
            clock,
            tracker: Mutex::new(None),
        })
    }

    /// The clock transitions are stamped with.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tracker, Duration) -> T) -> Option<T> {
        let now = self.clock.monotonic();
        self.tracker
            .lock()
            .expect("tracker")
            .as_mut()
            .map(|t| f(t, now))
    }

    /// A cluster (re)connected.
    pub fn joined(&self, cluster: &str) -> Option<Transition> {
        self.with(|t, now| t.joined(cluster, now)).flatten()
    }

    /// A report or heartbeat with signals.
    pub fn report(&self, cluster: &str, signals: Signals) -> Option<Transition> {
        self.with(|t, now| t.report(cluster, now, signals))
            .flatten()
    }

    /// An explicit leave.
    pub fn left(&self, cluster: &str) -> Option<Transition> {
        self.with(|t, _| t.left(cluster)).flatten()
    }

    /// Whether this replica currently tracks health (it leads).
    pub fn active(&self) -> bool {
        self.tracker.lock().expect("tracker").is_some()
    }

    fn set(&self, tracker: Option<Tracker>) {
        *self.tracker.lock().expect("tracker") = tracker;
    }
}

/// The leader's health loop: seeds a tracker from the view (with the grace period), judges
/// liveness every `tick`, persists the transitions, and drops the tracker when the term ends.
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
            self.ctl
                .set(Some(Tracker::new(self.ctl.policy, now, persisted)));
            tracing::info!("health tracking started with a grace period");
            let mut every = tokio::time::interval(self.tick);
            loop {
                tokio::select! {
                    _ = term.cancelled() => break,
                    _ = every.tick() => {}
                }
                let transitions = self.ctl.with(|t, now| t.tick(now)).unwrap_or_default();
                for tr in transitions {
                    if let Err(e) = persist(&self.backend, &tr, self.ctl.clock.unix_ms()).await {
                        tracing::warn!(cluster = %tr.cluster, error = %e, "persisting a health transition failed");
                    }
                }
            }
            self.ctl.set(None);
            tracing::info!("health tracking stopped");
        })
    }
}

/// Log a transition.
pub fn log_transition(tr: &Transition) {
    tracing::info!(cluster = %tr.cluster, from = ?tr.from, to = ?tr.to, reason = %tr.reason, "health transition");
}

/// Write a transition into the cluster record, stamped `at_unix_ms`.
pub async fn persist<B: KvBackend>(b: &B, tr: &Transition, at_unix_ms: i64) -> Result<(), KvError> {
    log_transition(tr);
    records::update::<B, v1::Cluster, _>(b, &keys::cluster_key(&tr.cluster), |cur| {
        let mut c = cluster_from_wire(&cur?);
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
                record: Some(ready),
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
