//! Cluster health as a pure state machine. The leader feeds it heartbeats, reports and clock
//! ticks; it returns the transitions to persist. Liveness (last heartbeat) stays in memory;
//! only transitions are stored. Time is a `Duration` since an arbitrary origin, so tests drive
//! it explicitly.
//!
//! ```text
//! Joining ──first report──▶ Ready ⇄ Degraded
//!    │                        │        │
//!    └────────── no heartbeat for `unreachable_after` ──▶ Unreachable ──heartbeat──▶ Ready/Degraded
//! any ──explicit leave──▶ Left (terminal until the cluster joins again)
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Health of one member cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Registered; no inventory report yet.
    Joining,
    /// Reporting, nothing wrong.
    Ready,
    /// Reporting, but something is wrong (see the reasons).
    Degraded,
    /// No heartbeat within `unreachable_after`.
    Unreachable,
    /// Left the fleet explicitly.
    Left,
}

/// What an agent says about its cluster, reduced to what health needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// The agent cannot reach its cluster's API server.
    pub api_unreachable: bool,
    /// Nodes whose Ready condition is not True.
    pub nodes_not_ready: u32,
    /// Failed GPUs (unhealthy devices, plugins silent past the start-up bound).
    pub gpus_failed: i64,
    /// Nodes with failed GPUs (bounded by the agent).
    pub failed_nodes: Vec<String>,
    /// Resources the agent has not listed yet: its inventory is incomplete.
    pub incomplete: Vec<String>,
    /// Resources the agent's credentials may not read (403).
    pub forbidden: Vec<String>,
}

/// Most node names a reason lists.
const NAMES_SHOWN: usize = 5;

fn names(v: &[String]) -> String {
    let mut s = v
        .iter()
        .take(NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if v.len() > NAMES_SHOWN {
        s.push_str(&format!(" and {} more", v.len() - NAMES_SHOWN));
    }
    s
}

impl Signals {
    /// Nothing wrong: exactly when [`Signals::reasons`] is empty.
    pub fn healthy(&self) -> bool {
        !self.api_unreachable
            && self.nodes_not_ready == 0
            && self.gpus_failed <= 0
            && self.incomplete.is_empty()
            && self.forbidden.is_empty()
    }

    /// Why these signals make a cluster Degraded (empty: healthy).
    pub fn reasons(&self) -> Vec<String> {
        let mut r = Vec::new();
        if self.api_unreachable {
            r.push("agent cannot reach the cluster's API server".to_string());
        }
        if self.nodes_not_ready > 0 {
            r.push(format!("{} node(s) not Ready", self.nodes_not_ready));
        }
        if self.gpus_failed > 0 {
            let on = match self.failed_nodes.is_empty() {
                true => String::new(),
                false => format!(" on {}", names(&self.failed_nodes)),
            };
            r.push(format!("{} GPU(s) failed{on}", self.gpus_failed));
        }
        if !self.forbidden.is_empty() {
            r.push(format!(
                "agent may not read {} (403 Forbidden: grant it in the agent's RBAC)",
                self.forbidden.join(", ")
            ));
        }
        if !self.incomplete.is_empty() {
            r.push(format!(
                "inventory incomplete: {} not listed yet",
                self.incomplete.join(", ")
            ));
        }
        r
    }
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Cluster name.
    pub cluster: String,
    /// Previous state; `None` for a cluster the fleet has not seen before.
    pub from: Option<Health>,
    /// New state.
    pub to: Health,
    /// Why, for people.
    pub reason: String,
    /// Resources the agent had not listed when this was decided (its inventory cannot be
    /// placed on until it has).
    #[serde(default)]
    pub incomplete: Vec<String>,
}

/// Timing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A cluster without a heartbeat for this long is Unreachable.
    pub unreachable_after: Duration,
    /// After becoming leader, clusters get this long (plus `unreachable_after`) to reconnect.
    pub leader_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            unreachable_after: Duration::from_secs(3),
            leader_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    health: Health,
    /// Last heartbeat seen by this leader, if any.
    last_seen: Option<Duration>,
    /// The most recent signals (to restore Ready vs Degraded after Unreachable).
    signals: Option<Signals>,
}

/// The leader's view of every cluster's health.
#[derive(Debug, Clone)]
pub struct Tracker {
    policy: Policy,
    leader_since: Duration,
    clusters: BTreeMap<String, Entry>,
}

impl Tracker {
    /// A tracker for a leader elected at `now`, seeded with persisted states. No cluster can be
    /// judged Unreachable before `now + leader_grace + unreachable_after`.
    pub fn new(
        policy: Policy,
        now: Duration,
        persisted: impl IntoIterator<Item = (String, Health)>,
    ) -> Self {
        let clusters = persisted
            .into_iter()
            .map(|(name, health)| {
                (
                    name,
                    Entry {
                        health,
                        last_seen: None,
                        signals: None,
                    },
                )
            })
            .collect();
        Self {
            policy,
            leader_since: now,
            clusters,
        }
    }

    /// Current state of a cluster.
    pub fn health(&self, cluster: &str) -> Option<Health> {
        self.clusters.get(cluster).map(|e| e.health)
    }

    /// `reason` is built only for a transition: most calls (every heartbeat) change nothing.
    fn set(
        &mut self,
        cluster: &str,
        to: Health,
        reason: impl FnOnce() -> String,
    ) -> Option<Transition> {
        let e = self.clusters.get_mut(cluster)?;
        if e.health == to {
            return None;
        }
        let from = e.health;
        e.health = to;
        Some(Transition {
            cluster: cluster.to_string(),
            from: Some(from),
            to,
            reason: reason(),
            incomplete: Vec::new(),
        })
    }

    /// A cluster registered (or re-joined after leaving).
    pub fn joined(&mut self, cluster: &str, now: Duration) -> Option<Transition> {
        let Some(e) = self.clusters.get_mut(cluster) else {
            self.clusters.insert(
                cluster.to_string(),
                Entry {
                    health: Health::Joining,
                    last_seen: Some(now),
                    signals: None,
                },
            );
            return Some(Transition {
                cluster: cluster.to_string(),
                from: None,
                to: Health::Joining,
                reason: "joined the fleet".into(),
                incomplete: Vec::new(),
            });
        };
        e.last_seen = Some(now);
        if e.health == Health::Left {
            return self.set(cluster, Health::Joining, || "joined the fleet".into());
        }
        None
    }

    /// A heartbeat (or any message) arrived.
    pub fn heartbeat(&mut self, cluster: &str, now: Duration) -> Option<Transition> {
        let e = self.clusters.get_mut(cluster)?;
        if e.health == Health::Left {
            return None;
        }
        e.last_seen = Some(now);
        if e.health == Health::Unreachable {
            let signals = e.signals.clone();
            return match signals {
                Some(s) => self.apply(cluster, &s),
                None => self.set(cluster, Health::Joining, || {
                    "heartbeat resumed; waiting for a report".into()
                }),
            };
        }
        None
    }

    /// An inventory report with health signals arrived (also counts as a heartbeat).
    pub fn report(&mut self, cluster: &str, now: Duration, signals: Signals) -> Option<Transition> {
        let e = self.clusters.get_mut(cluster)?;
        if e.health == Health::Left {
            return None;
        }
        e.last_seen = Some(now);
        let changed = e.signals.as_ref() != Some(&signals);
        e.signals = Some(signals.clone());
        if e.health == Health::Degraded && !signals.healthy() && changed {
            // Still Degraded, for other reasons: a transition keeps the stored reason true.
            return Some(Transition {
                cluster: cluster.to_string(),
                from: Some(Health::Degraded),
                to: Health::Degraded,
                reason: signals.reasons().join("; "),
                incomplete: signals.incomplete.clone(),
            });
        }
        self.apply(cluster, &signals)
    }

    fn apply(&mut self, cluster: &str, s: &Signals) -> Option<Transition> {
        let tr = if s.healthy() {
            self.set(cluster, Health::Ready, || "reporting, no problems".into())
        } else {
            self.set(cluster, Health::Degraded, || s.reasons().join("; "))
        };
        tr.map(|mut t| {
            t.incomplete = s.incomplete.clone();
            t
        })
    }

    /// The cluster left explicitly.
    pub fn left(&mut self, cluster: &str) -> Option<Transition> {
        self.set(cluster, Health::Left, || "left the fleet".into())
    }

    /// When a silent cluster becomes Unreachable: nobody is judged before the grace period
    /// ends; after it, silence counts from the later of the last heartbeat and the end of the
    /// grace period.
    fn deadline(&self, e: &Entry) -> Duration {
        let grace_end = self.leader_since + self.policy.leader_grace;
        let since = e.last_seen.unwrap_or(grace_end);
        grace_end.max(since + self.policy.unreachable_after)
    }

    /// Judge liveness at `now`. Returns Unreachable transitions.
    pub fn tick(&mut self, now: Duration) -> Vec<Transition> {
        let overdue: Vec<String> = self
            .clusters
            .iter()
            .filter(|(_, e)| !matches!(e.health, Health::Unreachable | Health::Left))
            .filter(|(_, e)| now >= self.deadline(e))
            .map(|(n, _)| n.clone())
            .collect();
        let after = self.policy.unreachable_after;
        overdue
            .into_iter()
            .filter_map(|c| {
                self.set(&c, Health::Unreachable, || {
                    format!("no heartbeat for {after:?}")
                })
            })
            .collect()
    }

    /// The earliest time `tick` could change something (for the caller's timer).
    pub fn next_deadline(&self) -> Option<Duration> {
        self.clusters
            .values()
            .filter(|e| !matches!(e.health, Health::Unreachable | Health::Left))
            .map(|e| self.deadline(e))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_degraded_cluster_whose_reasons_change_gets_a_new_reason() {
        let mut t = Tracker::new(policy(), S(0), []);
        t.joined("a", S(0));
        let not_ready = |n| Signals {
            nodes_not_ready: n,
            ..Default::default()
        };
        let tr = t.report("a", S(1), not_ready(1)).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Joining), Health::Degraded));
        let tr = t.report("a", S(2), not_ready(3)).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Degraded), Health::Degraded));
        assert!(tr.reason.contains("3 node(s) not Ready"), "{}", tr.reason);
        assert_eq!(t.report("a", S(3), not_ready(3)), None);
        let tr = t.report("a", S(4), Signals::default()).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Degraded), Health::Ready));
    }

    #[test]
    fn healthy_exactly_when_there_is_no_reason() {
        for api_unreachable in [false, true] {
            for nodes_not_ready in [0, 2] {
                for gpus_failed in [0, 1] {
                    let s = Signals {
                        api_unreachable,
                        nodes_not_ready,
                        gpus_failed,
                        ..Default::default()
                    };
                    assert_eq!(s.healthy(), s.reasons().is_empty(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn an_incomplete_or_forbidden_inventory_degrades_and_says_which() {
        let mut t = Tracker::new(policy(), S(0), []);
        t.joined("a", S(0));
        let partial = Signals {
            incomplete: vec!["pods".into()],
            forbidden: vec!["resourceslices".into()],
            ..Default::default()
        };
        let tr = t.report("a", S(1), partial).unwrap();
        assert_eq!(tr.to, Health::Degraded);
        assert_eq!(tr.incomplete, ["pods"]);
        assert!(
            tr.reason
                .contains("inventory incomplete: pods not listed yet"),
            "{}",
            tr.reason
        );
        assert!(
            tr.reason.contains("may not read resourceslices (403"),
            "{}",
            tr.reason
        );
        let failed = Signals {
            gpus_failed: 8,
            failed_nodes: (0..7).map(|i| format!("n{i}")).collect(),
            ..Default::default()
        };
        let tr = t.report("a", S(2), failed).unwrap();
        assert!(tr.incomplete.is_empty());
        assert!(
            tr.reason
                .contains("8 GPU(s) failed on n0, n1, n2, n3, n4 and 2 more"),
            "{}",
            tr.reason
        );
    }

    fn policy() -> Policy {
        Policy {
            unreachable_after: S(3),
            leader_grace: S(10),
        }
    }

    #[test]
    fn join_report_degrade_recover_leave() {
        let mut t = Tracker::new(policy(), S(0), []);
        let tr = t.joined("a", S(0)).unwrap();
        assert_eq!(
            (tr.from, tr.to),
            (None, Health::Joining),
            "a new cluster has no past"
        );
        assert_eq!(
            t.report("a", S(1), Signals::default()).unwrap().to,
            Health::Ready
        );
        assert_eq!(
            t.report("a", S(2), Signals::default()),
            None,
            "no transition without change"
        );
        let bad = Signals {
            gpus_failed: 2,
            ..Default::default()
        };
        let tr = t.report("a", S(3), bad).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Ready), Health::Degraded));
        assert!(tr.reason.contains("2 GPU(s) failed"), "{}", tr.reason);
        let api = Signals {
            api_unreachable: true,
            ..Default::default()
        };
        let tr = t.report("a", S(4), api).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Degraded), Health::Degraded));
        assert!(tr.reason.contains("API server"), "new reasons are recorded");
        assert_eq!(t.left("a").unwrap().to, Health::Left);
        t.joined("a", S(4));
        let api = Signals {
            api_unreachable: true,
            ..Default::default()
        };
        let tr = t.report("a", S(4), api).unwrap();
        assert_eq!(
            (tr.to, tr.reason.as_str()),
            (
                Health::Degraded,
                "agent cannot reach the cluster's API server"
            )
        );
        assert_eq!(
            t.report("a", S(5), Signals::default()).unwrap().to,
            Health::Ready
        );
        assert_eq!(t.left("a").unwrap().to, Health::Left);
        assert_eq!(
            t.heartbeat("a", S(6)),
            None,
            "a cluster that left stays Left"
        );
        let tr = t.joined("a", S(7)).unwrap();
        assert_eq!((tr.from, tr.to), (Some(Health::Left), Health::Joining));
    }

    #[test]
    fn silence_makes_unreachable_and_a_heartbeat_restores_the_last_state() {
        let mut t = Tracker::new(policy(), S(0), []);
        t.joined("a", S(20));
        t.report(
            "a",
            S(20),
            Signals {
                nodes_not_ready: 1,
                ..Default::default()
            },
        );
        assert!(t.tick(S(22)).is_empty());
        let tr = t.tick(S(23));
        assert_eq!(tr.len(), 1);
        assert_eq!(tr[0].to, Health::Unreachable);
        assert!(t.tick(S(30)).is_empty(), "reported once");
        assert_eq!(
            t.heartbeat("a", S(31)).unwrap().to,
            Health::Degraded,
            "back to the last reported state"
        );
    }

    #[test]
    fn a_new_leader_gives_a_grace_period() {
        // Persisted Ready clusters; the new leader has heard nothing from them yet.
        let mut t = Tracker::new(
            policy(),
            S(100),
            [
                ("a".to_string(), Health::Ready),
                ("b".to_string(), Health::Ready),
            ],
        );
        assert!(
            t.tick(S(104)).is_empty(),
            "unreachable_after alone must not flap clusters"
        );
        assert!(t.tick(S(110)).is_empty(), "still within grace");
        t.heartbeat("a", S(111));
        assert!(t.tick(S(112)).is_empty());
        let tr = t.tick(S(113));
        assert_eq!(
            tr.iter().map(|t| t.cluster.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(t.health("a"), Some(Health::Ready));
        assert_eq!(t.next_deadline(), Some(S(114)));
    }

    #[test]
    fn unknown_clusters_are_ignored() {
        let mut t = Tracker::new(policy(), S(0), []);
        assert_eq!(t.heartbeat("ghost", S(1)), None);
        assert_eq!(t.report("ghost", S(1), Signals::default()), None);
        assert_eq!(t.health("ghost"), None);
    }
}
