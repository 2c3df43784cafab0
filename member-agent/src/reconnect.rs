//! Which hub replica the agent dials next, and how long it waits first.
//!
//! The wait is bounded so that an agent finds a new leader well inside that leader's grace
//! period: a new leader judges liveness after `--leader-grace` plus `--unreachable-after`, and an
//! agent that slept through two long backoffs in a row was marked Unreachable after a failover
//! it had nothing to do with. So the backoff grows only while no replica answers at all; a live
//! replica that turns the agent away ("not the leader") is polled about once per heartbeat
//! interval, which costs the replicas no more than the heartbeats of a led fleet.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The replica could not be dialled.
    Unreachable,
    /// A live replica does not lead; `hint` is the leader it names, if any.
    NotLeader {
        /// The leader's address as the replica knows it.
        hint: Option<String>,
    },
    /// A session ended, or the hub answered with trouble other than "not the leader".
    Ended,
}

/// Hint-following redirects taken at once before they wait a poll interval like the rest
/// (two replicas that disagree for a moment must not ping-pong the agent).
pub const QUICK_REDIRECTS: u32 = 3;

/// A session that lasted this long was a success: the backoff starts over.
pub const SESSION_RESETS_BACKOFF: Duration = Duration::from_secs(10);

/// The reconnect policy's state (pure apart from the jitter drawn by the caller).
#[derive(Debug)]
pub struct Reconnect {
    hubs: Vec<String>,
    /// The next replica in rotation.
    target: usize,
    /// The address to dial next instead of the rotation (a leader hint).
    hint: Option<String>,
    /// A hinted address that could not be dialled: replicas still naming it are stale.
    dead_hint: Option<String>,
    /// Quick redirects taken since the last session.
    quick: u32,
    /// Replicas in a row that could not be dialled.
    unreachable_run: usize,
    heartbeat: Option<Duration>,
    backoff: ExponentialBackoff,
}

impl Reconnect {
    /// A policy over `hubs` (at least one address).
    pub fn new(hubs: Vec<String>) -> Self {
        assert!(!hubs.is_empty(), "at least one hub address");
        Self {
            hubs,
            target: 0,
            hint: None,
            dead_hint: None,
            quick: 0,
            unreachable_run: 0,
            heartbeat: None,
            backoff: backoff(None),
        }
    }

    /// The hub's heartbeat interval, once a hub has said it.
    pub fn set_heartbeat(&mut self, h: Duration) {
        if self.heartbeat != Some(h) {
            self.heartbeat = Some(h);
            self.backoff = backoff(self.heartbeat);
        }
    }

    /// The address to dial now.
    pub fn next_addr(&self) -> &str {
        self.hint
            .as_deref()
            .unwrap_or_else(|| &self.hubs[self.target % self.hubs.len()])
    }

    /// Records how dialling `dialled` ended, `lasted` after it began; returns how long to wait
    /// before the next attempt. `jitter` is uniform in [0, 1).
    pub fn after(
        &mut self,
        dialled: &str,
        outcome: Outcome,
        lasted: Duration,
        jitter: f64,
    ) -> Duration {
        let hinted = self.hint.take().is_some();
        if lasted > SESSION_RESETS_BACKOFF {
            self.quick = 0;
            self.backoff = backoff(self.heartbeat);
        }
        match outcome {
            Outcome::Unreachable => {
                if hinted {
                    // The rotation's own replica has not been tried yet: no advance.
                    self.dead_hint = Some(dialled.to_string());
                } else {
                    self.target += 1;
                }
                self.unreachable_run += 1;
                if self.unreachable_run < self.hubs.len() {
                    // Another replica may answer: try it promptly.
                    quick(jitter)
                } else {
                    self.backoff.next().unwrap_or(cap(self.heartbeat))
                }
            }
            Outcome::NotLeader { hint } => {
                self.unreachable_run = 0;
                match hint {
                    Some(h)
                        if !same_hub(&h, dialled)
                            && self.dead_hint.as_deref().is_none_or(|d| !same_hub(d, &h)) =>
                    {
                        // Should the hint prove dead, the rotation goes on past this replica.
                        if !hinted {
                            self.target += 1;
                        }
                        self.hint = Some(h);
                        if self.quick < QUICK_REDIRECTS {
                            self.quick += 1;
                            quick(jitter)
                        } else {
                            self.poll(jitter)
                        }
                    }
                    // No leader it knows of (or one already found dead, or itself about to
                    // lead): poll the next replica.
                    _ => {
                        if !hinted {
                            self.target += 1;
                        }
                        self.poll(jitter)
                    }
                }
            }
            Outcome::Ended => {
                self.unreachable_run = 0;
                self.dead_hint = None;
                if !hinted {
                    self.target += 1;
                }
                self.backoff.next().unwrap_or(cap(self.heartbeat))
            }
        }
    }

    /// About one heartbeat interval (half to all of it).
    fn poll(&self, jitter: f64) -> Duration {
        let h = self.heartbeat.unwrap_or(Duration::from_secs(1));
        h.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// 50–150 ms.
fn quick(jitter: f64) -> Duration {
    Duration::from_millis(50 + (jitter.clamp(0.0, 1.0) * 100.0) as u64)
}

/// The longest wait, jitter included: four heartbeat intervals, between 1 and 5 s.
pub fn cap(heartbeat: Option<Duration>) -> Duration {
    heartbeat.map_or(Duration::from_secs(5), |h| {
        (h * 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
    })
}

/// Exponential from 100 ms; backon's jitter adds up to the delay again, so the base stops at
/// half the cap.
fn backoff(heartbeat: Option<Duration>) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(cap(heartbeat) / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether two hub addresses name the same replica (with or without a scheme).
pub fn same_hub(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        s.trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string()
    };
    bare(a) == bare(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn hubs() -> Vec<String> {
        vec!["h1:1".into(), "h2:1".into(), "h3:1".into()]
    }

    /// Drives the policy through a failover: h1 led and died; h2 and h3 name h1 until the
    /// election ends after `election` attempts, then name h3.
    fn failover(election: usize, jitter: f64) -> (Vec<Duration>, usize) {
        let mut r = Reconnect::new(hubs());
        r.set_heartbeat(Duration::from_secs(1));
        let mut waits = Vec::new();
        let mut attempt = 0;
        let mut addr = "h1:1".to_string();
        let mut outcome = Outcome::Ended;
        let mut lasted = Duration::from_secs(60);
        loop {
            waits.push(r.after(&addr, outcome, lasted, jitter));
            lasted = Duration::from_millis(1);
            attempt += 1;
            addr = r.next_addr().to_string();
            let leader = if attempt > election { "h3:1" } else { "h1:1" };
            outcome = match addr.as_str() {
                "h1:1" => Outcome::Unreachable,
                a if a == leader => return (waits, attempt),
                _ => Outcome::NotLeader {
                    hint: Some(leader.into()),
                },
            };
        }
    }

    #[test]
    fn while_a_replica_answers_no_wait_exceeds_a_heartbeat() {
        for election in [0, 1, 2, 5, 20] {
            for jitter in [0.0, 0.5, 0.999] {
                let (waits, attempts) = failover(election, jitter);
                assert!(
                    waits.iter().all(|w| *w <= Duration::from_secs(1)),
                    "election after {election}: {waits:?}"
                );
                assert!(
                    attempts <= election + 4,
                    "found the new leader within a few attempts of the election: {attempts}"
                );
            }
        }
    }

    #[test]
    fn a_dead_hint_is_not_followed_again() {
        let mut r = Reconnect::new(hubs());
        let w = r.after(
            "h2:1",
            Outcome::NotLeader {
                hint: Some("h1:1".into()),
            },
            MS,
            0.5,
        );
        assert_eq!(r.next_addr(), "h1:1");
        assert!(w < Duration::from_millis(200), "a redirect is quick: {w:?}");
        r.after("h1:1", Outcome::Unreachable, MS, 0.5);
        let next = r.next_addr().to_string();
        assert_ne!(next, "h1:1");
        r.after(
            &next,
            Outcome::NotLeader {
                hint: Some("http://h1:1".into()),
            },
            MS,
            0.5,
        );
        assert_ne!(r.next_addr(), "h1:1", "the stale hint is ignored");
    }

    #[test]
    fn redirects_that_ping_pong_slow_to_a_poll() {
        let mut r = Reconnect::new(hubs());
        r.set_heartbeat(Duration::from_millis(400));
        let mut waits = Vec::new();
        for i in 0..6 {
            let (from, to) = if i % 2 == 0 {
                ("h1:1", "h2:1")
            } else {
                ("h2:1", "h1:1")
            };
            waits.push(r.after(
                from,
                Outcome::NotLeader {
                    hint: Some(to.into()),
                },
                MS,
                0.5,
            ));
        }
        assert!(waits[..3].iter().all(|w| *w < Duration::from_millis(200)));
        assert!(
            waits[3..].iter().all(|w| *w >= Duration::from_millis(200)),
            "{waits:?}"
        );
    }

    #[test]
    fn backoff_grows_only_when_no_replica_answers_and_stays_under_the_cap() {
        let mut r = Reconnect::new(hubs());
        r.set_heartbeat(Duration::from_millis(300));
        let mut waits = Vec::new();
        for _ in 0..30 {
            let a = r.next_addr().to_string();
            waits.push(r.after(&a, Outcome::Unreachable, MS, 0.5));
        }
        assert!(waits[..2].iter().all(|w| *w < Duration::from_millis(200)));
        assert!(
            waits
                .iter()
                .all(|w| *w <= cap(Some(Duration::from_millis(300))))
        );
        assert!(
            waits[20..]
                .iter()
                .all(|w| *w >= cap(Some(Duration::from_millis(300))) / 2),
            "grown to half the cap or more: {waits:?}"
        );
        // Every replica was tried in turn.
        let mut r = Reconnect::new(hubs());
        let mut seen = Vec::new();
        for _ in 0..3 {
            let a = r.next_addr().to_string();
            seen.push(a.clone());
            r.after(&a, Outcome::Unreachable, MS, 0.5);
        }
        seen.sort();
        assert_eq!(seen, hubs());
    }

    #[test]
    fn a_long_session_starts_the_backoff_over() {
        let mut r = Reconnect::new(vec!["only:1".into()]);
        for _ in 0..10 {
            r.after("only:1", Outcome::Unreachable, MS, 0.5);
        }
        let w = r.after("only:1", Outcome::Ended, Duration::from_secs(60), 0.5);
        assert!(w <= Duration::from_millis(200), "{w:?}");
    }

    #[test]
    fn reconnect_waits_stay_within_a_few_heartbeats() {
        let ms = Duration::from_millis;
        // (heartbeat the hub asked for, longest wait, jitter included)
        let cases = [
            (None, ms(5000)),
            (Some(ms(100)), ms(1000)),
            (Some(ms(300)), ms(1200)),
            (Some(ms(1000)), ms(4000)),
            (Some(ms(2000)), ms(5000)),
        ];
        for (hb, want) in cases {
            assert_eq!(cap(hb), want, "{hb:?}");
        }
    }

    #[test]
    fn addresses_compare_without_a_scheme() {
        assert!(same_hub("http://a:1", "a:1"));
        assert!(same_hub("https://a:1", "a:1"));
        assert!(!same_hub("a:1", "a:2"));
    }
}
