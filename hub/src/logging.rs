//! The hub's log output. openraft logs some expected conditions at ERROR once per request:
//! while one voter is down, every linearizable read logs "timeout while confirming leadership"
//! (36,000 lines in three minutes were seen). Its ERROR and WARN events are therefore let
//! through at most once per call site per [`OPENRAFT_EVERY`]; everything else is untouched.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::subscriber::Interest;
use tracing_subscriber::filter::{DynFilterFn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// How often one openraft call site may log at WARN or ERROR.
pub const OPENRAFT_EVERY: Duration = Duration::from_secs(10);

/// At most one event per key per interval.
#[derive(Debug)]
pub struct RateLimit<K> {
    every: Duration,
    last: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq> RateLimit<K> {
    /// A limit of one event per `every` for each key.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an event for `key` at `now` goes through (and if so, it counts).
    pub fn allow(&self, key: K, now: Instant) -> bool {
        let mut last = self.last.lock().expect("rate limit");
        match last.get(&key) {
            Some(t) if now.duration_since(*t) < self.every => false,
            _ => {
                last.insert(key, now);
                true
            }
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` (or `default`) as the filter (hickory's
/// per-request lines at WARN unless named), openraft's WARN and ERROR events rate-limited per
/// call site.
pub fn init(default: &str) {
    let env = EnvFilter::new(flotilla_dns::log_filter(
        std::env::var("RUST_LOG").ok().as_deref(),
        default,
    ));
    let limit = RateLimit::new(OPENRAFT_EVERY);
    fn noisy(m: &tracing::Metadata<'_>) -> bool {
        m.is_event() && m.target().starts_with("openraft") && *m.level() <= tracing::Level::WARN
    }
    let openraft =
        DynFilterFn::new(move |m, _| !noisy(m) || limit.allow(m.callsite(), Instant::now()))
            // Asked per event for the noisy call sites (the default would cache the first answer).
            .with_callsite_filter(|m| {
                if noisy(m) {
                    Interest::sometimes()
                } else {
                    Interest::always()
                }
            });
    tracing_subscriber::registry()
        .with(fmt::layer().with_filter(env).with_filter(openraft))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_key_per_interval() {
        let l = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(l.allow("a", t0));
        assert!(
            !l.allow("a", t0 + Duration::from_secs(9)),
            "within the interval"
        );
        assert!(
            l.allow("b", t0 + Duration::from_secs(9)),
            "keys are separate"
        );
        assert!(
            l.allow("a", t0 + Duration::from_secs(10)),
            "the next interval"
        );
        assert!(!l.allow("a", t0 + Duration::from_secs(11)));
    }
}
