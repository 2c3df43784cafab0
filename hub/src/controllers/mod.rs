//! Controllers: the parts of the hub that cause side effects, and so act only while this
//! replica leads. Health is here now; routing and campaign controllers join it. Each one runs
//! under [`run_while_leader`], which starts it on gaining leadership and cancels it on losing
//! it, and reads time from an injectable [`Clock`] so its tests run with paused time.

pub mod health;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_raft_store::StoreNode;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Who leads the store (side effects and agent streams happen only there).
pub trait Leadership: Send + Sync + 'static {
    /// Whether this replica leads.
    fn is_leader(&self) -> bool;
    /// The leader's gRPC address, if known.
    fn leader_addr(&self) -> Option<String>;
}

impl Leadership for StoreNode {
    fn is_leader(&self) -> bool {
        self.leader().is_some_and(|(id, _)| id == self.id())
    }

    fn leader_addr(&self) -> Option<String> {
        self.leader().map(|(_, a)| a)
    }
}

/// Time as controllers see it.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time since an arbitrary origin.
    fn monotonic(&self) -> Duration;
    /// Wall-clock time in Unix milliseconds (for records people read).
    fn unix_ms(&self) -> i64;
}

/// The real clock. Monotonic time comes from tokio, so tests with paused time control it.
#[derive(Debug)]
pub struct SystemClock {
    origin: tokio::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn unix_ms(&self) -> i64 {
        unix_ms()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A controller's work while leading.
pub type Leading = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A controller that acts only while this replica leads.
pub trait Controller: Send + Sync + 'static {
    /// Name for logs and the task's span.
    fn name(&self) -> &'static str;
    /// Work while leading; must return soon after `term` is cancelled (leadership lost, or
    /// shutdown). Called again on the next term.
    fn lead(self: Arc<Self>, term: CancellationToken) -> Leading;
}

/// Follows leadership every `poll`: starts every controller when this replica becomes leader
/// and cancels them when it stops leading, waiting for each to finish before the next term.
pub async fn run_while_leader(
    leadership: Arc<dyn Leadership>,
    controllers: Vec<Arc<dyn Controller>>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(poll);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term: Option<(CancellationToken, Vec<tokio::task::JoinHandle<()>>)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = every.tick() => {}
        }
        let leads = leadership.is_leader();
        match (&term, leads) {
            (None, true) => {
                tracing::info!("leading: starting controllers");
                let token = shutdown.child_token();
                let tasks = controllers
                    .iter()
                    .map(|c| {
                        let span = tracing::info_span!("controller", name = c.name());
                        tokio::spawn(c.clone().lead(token.clone()).instrument(span))
                    })
                    .collect();
                term = Some((token, tasks));
            }
            (Some(_), false) => {
                tracing::info!("no longer leading: stopping controllers");
                if let Some((token, tasks)) = term.take() {
                    stop(token, tasks).await;
                }
            }
            _ => {}
        }
    }
    if let Some((token, tasks)) = term.take() {
        stop(token, tasks).await;
    }
}

async fn stop(token: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    token.cancel();
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Leadership for Flag {
        fn is_leader(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
        fn leader_addr(&self) -> Option<String> {
            None
        }
    }

    #[derive(Default)]
    struct Counting {
        started: AtomicUsize,
        running: AtomicUsize,
    }

    impl Controller for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn lead(self: Arc<Self>, term: CancellationToken) -> Leading {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.running.fetch_add(1, Ordering::SeqCst);
                term.cancelled().await;
                self.running.fetch_sub(1, Ordering::SeqCst);
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn controllers_run_only_while_leading_one_term_at_a_time() {
        let flag = Arc::new(Flag::default());
        let c = Arc::new(Counting::default());
        let shutdown = CancellationToken::new();
        let runner = tokio::spawn(run_while_leader(
            flag.clone(),
            vec![c.clone()],
            Duration::from_millis(50),
            shutdown.clone(),
        ));
        let wait = || tokio::time::sleep(Duration::from_millis(200));
        wait().await;
        assert_eq!(
            c.started.load(Ordering::SeqCst),
            0,
            "not leading: not started"
        );
        flag.0.store(true, Ordering::SeqCst);
        wait().await;
        assert_eq!(c.running.load(Ordering::SeqCst), 1);
        flag.0.store(false, Ordering::SeqCst);
        wait().await;
        assert_eq!(
            c.running.load(Ordering::SeqCst),
            0,
            "stopped on losing leadership"
        );
        flag.0.store(true, Ordering::SeqCst);
        wait().await;
        assert_eq!(
            (
                c.started.load(Ordering::SeqCst),
                c.running.load(Ordering::SeqCst)
            ),
            (2, 1),
            "a new term starts it again"
        );
        shutdown.cancel();
        runner.await.unwrap();
        assert_eq!(c.running.load(Ordering::SeqCst), 0, "shutdown stops it");
    }
}
