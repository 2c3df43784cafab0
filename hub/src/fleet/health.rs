//! The leader's health controller: `core::health::Tracker` fed by agent streams and a clock,
//! transitions persisted into cluster records. Followers hold no tracker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_api::convert::fleet::{health_from_wire, health_to_wire};
use flotilla_api::v1;
use flotilla_core::health::{Policy, Signals, Tracker, Transition};
use flotilla_core::kv::KvBackend;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use super::records;
use super::view::FleetView;

/// Transitions kept in a cluster record.
const HISTORY: usize = 20;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Health bookkeeping on the leader.
pub struct HealthCtl {
    policy: Policy,
    origin: Instant,
    tracker: Mutex<Option<Tracker>>,
}

impl HealthCtl {
    /// A controller with this policy (no tracker until this replica leads).
    pub fn new(policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            origin: Instant::now(),
            tracker: Mutex::new(None),
        })
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tracker, Duration) -> T) -> Option<T> {
        let now = self.now();
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

    /// Follow leadership: seed a tracker (with the grace period) on becoming leader, drop it on
    /// losing leadership, and judge liveness every `tick`.
    pub async fn run<B: KvBackend + Clone>(
        self: Arc<Self>,
        backend: B,
        view: Arc<FleetView>,
        leader: Arc<dyn Leadership>,
        tick: Duration,
        shutdown: CancellationToken,
    ) {
        let mut every = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let leads = leader.is_leader();
            let active = self.active();
            if leads && !active {
                // Judge from the store's view as of now, with a grace period for every cluster.
                view.loaded().await;
                let persisted = view
                    .clusters()
                    .into_iter()
                    .filter_map(|c| health_from_wire(c.health).map(|h| (c.name, h)));
                *self.tracker.lock().expect("tracker") =
                    Some(Tracker::new(self.policy, self.now(), persisted));
                tracing::info!("leading: health tracking started with a grace period");
            } else if !leads && active {
                *self.tracker.lock().expect("tracker") = None;
                tracing::info!("no longer leading: health tracking stopped");
            }
            let transitions = self.with(|t, now| t.tick(now)).unwrap_or_default();
            for tr in transitions {
                if let Err(e) = persist(&backend, &tr).await {
                    tracing::warn!(cluster = %tr.cluster, error = %e, "persisting a health transition failed");
                }
            }
        }
    }
}

/// Record a transition in a cluster record: health, reason, and bounded history.
pub fn record_transition(c: &mut v1::Cluster, tr: &Transition, at_unix_ms: i64) {
    c.health = health_to_wire(tr.to) as i32;
    c.health_reason = tr.reason.clone();
    c.history.insert(
        0,
        v1::HealthTransition {
            from: health_to_wire(tr.from) as i32,
            to: health_to_wire(tr.to) as i32,
            reason: tr.reason.clone(),
            at_unix_ms,
        },
    );
    c.history.truncate(HISTORY);
}

/// Log a transition.
pub fn log_transition(tr: &Transition) {
    tracing::info!(cluster = %tr.cluster, from = ?tr.from, to = ?tr.to, reason = %tr.reason, "health transition");
}

/// Write a transition into the cluster record.
pub async fn persist<B: KvBackend>(
    b: &B,
    tr: &Transition,
) -> Result<(), flotilla_core::kv::KvError> {
    log_transition(tr);
    let at = unix_ms();
    records::update::<B, v1::Cluster, _>(b, &records::cluster_key(&tr.cluster), |cur| {
        let mut c = cur?;
        record_transition(&mut c, tr, at);
        Some(c)
    })
    .await
    .map(|_| ())
}
