//! The rules for a member cluster's stored record: what a (re)join writes, and how a health
//! transition is recorded with a bounded history.

use std::collections::BTreeMap;

use crate::health::{Health, Transition};

/// Transitions kept in a cluster record, most recent first.
pub const HISTORY: usize = 20;

/// What an agent says about its cluster when it connects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Region the cluster runs in.
    pub region: String,
    /// The cluster's Kubernetes version.
    pub kubernetes_version: String,
    /// The agent's version.
    pub agent_version: String,
    /// The cluster's labels.
    pub labels: BTreeMap<String, String>,
    /// Its agent can run campaign steps (the executor's permissions are installed).
    pub campaigns: bool,
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Previous state (`None`: the cluster was new).
    pub from: Option<Health>,
    /// New state.
    pub to: Health,
    /// Why.
    pub reason: String,
    /// When, in Unix milliseconds.
    pub at_unix_ms: i64,
}

/// A member cluster as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRecord {
    /// Cluster name.
    pub name: String,
    /// Current health.
    pub health: Health,
    /// Why it has that health.
    pub health_reason: String,
    /// What its agent last said about it.
    pub identity: Identity,
    /// When it (last) joined, in Unix milliseconds.
    pub joined_at_unix_ms: i64,
    /// Recent transitions, most recent first, at most [`HISTORY`].
    pub history: Vec<HistoryEntry>,
    /// Resources its agent has not listed: the inventory is incomplete, Fit skips it.
    pub inventory_incomplete: Vec<String>,
    /// The pod and node networks (CIDRs) its agent last reported.
    pub networks: Vec<String>,
}

/// Whether `tr` still applies to the stored record `c`: it starts from the health the record
/// holds. A transition queued while the store was failing can be overtaken (the agent
/// reconnected and its registration wrote a newer state); written late, it would put the
/// record back in the past.
pub fn transition_applies(c: &ClusterRecord, tr: &Transition) -> bool {
    tr.from.is_none_or(|from| from == c.health)
}

/// Record `tr` at `at_unix_ms`: health, reason and the bounded history.
pub fn record_transition(c: &mut ClusterRecord, tr: &Transition, at_unix_ms: i64) {
    c.health = tr.to;
    c.health_reason = tr.reason.clone();
    c.inventory_incomplete = tr.incomplete.clone();
    c.history.insert(
        0,
        HistoryEntry {
            from: tr.from,
            to: tr.to,
            reason: tr.reason.clone(),
            at_unix_ms,
        },
    );
    c.history.truncate(HISTORY);
}

/// The record after an agent for `name` connected with `identity` at `now_unix_ms`, with the
/// join's transition (if any), or `None` when the stored record `cur` needs no write.
///
/// A new cluster starts Joining and joined now; one that had left has joined again now; the
/// identity is refreshed from the agent.
pub fn register(
    cur: Option<&ClusterRecord>,
    name: &str,
    identity: &Identity,
    tr: Option<&Transition>,
    now_unix_ms: i64,
) -> Option<ClusterRecord> {
    let mut next = match cur {
        Some(c) => c.clone(),
        None => ClusterRecord {
            name: name.to_string(),
            health: Health::Joining,
            health_reason: String::new(),
            identity: Identity::default(),
            joined_at_unix_ms: now_unix_ms,
            history: Vec::new(),
            inventory_incomplete: Vec::new(),
            networks: Vec::new(),
        },
    };
    if next.health == Health::Left {
        next.joined_at_unix_ms = now_unix_ms;
    }
    next.identity = identity.clone();
    if let Some(tr) = tr {
        record_transition(&mut next, tr, now_unix_ms);
    }
    (cur != Some(&next)).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(region: &str) -> Identity {
        Identity {
            region: region.into(),
            agent_version: "0.1.0".into(),
            ..Default::default()
        }
    }

    fn tr(from: Option<Health>, to: Health) -> Transition {
        Transition {
            cluster: "a".into(),
            from,
            to,
            reason: "r".into(),
            incomplete: vec![],
        }
    }

    #[test]
    fn a_new_cluster_is_joining_from_nothing() {
        let t = tr(None, Health::Joining);
        let c = register(None, "a", &id("eu"), Some(&t), 1_000).unwrap();
        assert_eq!((c.health, c.joined_at_unix_ms), (Health::Joining, 1_000));
        assert_eq!(c.history[0].from, None);
        assert_eq!(c.identity.region, "eu");
    }

    #[test]
    fn an_unchanged_reconnect_writes_nothing_and_a_changed_identity_does() {
        let c = register(None, "a", &id("eu"), None, 1_000).unwrap();
        assert_eq!(register(Some(&c), "a", &id("eu"), None, 2_000), None);
        let moved = register(Some(&c), "a", &id("us"), None, 2_000).unwrap();
        assert_eq!(
            (moved.identity.region.as_str(), moved.joined_at_unix_ms),
            ("us", 1_000),
            "a reconnect keeps the join time"
        );
    }

    #[test]
    fn a_cluster_that_left_joins_again_now() {
        let mut c = register(None, "a", &id("eu"), None, 1_000).unwrap();
        record_transition(&mut c, &tr(Some(Health::Ready), Health::Left), 5_000);
        let t = tr(Some(Health::Left), Health::Joining);
        let back = register(Some(&c), "a", &id("eu"), Some(&t), 9_000).unwrap();
        assert_eq!(
            (back.health, back.joined_at_unix_ms),
            (Health::Joining, 9_000)
        );
        assert_eq!(back.history.len(), 2);
    }

    #[test]
    fn a_transition_records_whether_the_inventory_is_complete() {
        let mut c = register(None, "a", &id("eu"), None, 0).unwrap();
        let mut t = tr(Some(Health::Joining), Health::Degraded);
        t.incomplete = vec!["pods".into()];
        record_transition(&mut c, &t, 1);
        assert_eq!(c.inventory_incomplete, ["pods"]);
        record_transition(&mut c, &tr(Some(Health::Degraded), Health::Ready), 2);
        assert!(
            c.inventory_incomplete.is_empty(),
            "the next transition clears it"
        );
    }

    #[test]
    fn history_is_bounded_most_recent_first() {
        let mut c = register(None, "a", &id("eu"), None, 0).unwrap();
        for i in 0..(HISTORY as i64 + 5) {
            record_transition(&mut c, &tr(Some(Health::Ready), Health::Degraded), i);
        }
        assert_eq!(c.history.len(), HISTORY);
        assert_eq!(c.history[0].at_unix_ms, HISTORY as i64 + 4);
    }

    #[test]
    fn a_transition_applies_only_from_the_stored_health() {
        let mut c = ClusterRecord {
            name: "a".into(),
            health: Health::Ready,
            health_reason: String::new(),
            identity: Identity::default(),
            joined_at_unix_ms: 0,
            history: Vec::new(),
            inventory_incomplete: Vec::new(),
            networks: Vec::new(),
        };
        let down = Transition {
            cluster: "a".into(),
            from: Some(Health::Ready),
            to: Health::Unreachable,
            reason: "no heartbeat".into(),
            incomplete: vec![],
        };
        assert!(transition_applies(&c, &down));
        // Overtaken: the record moved on (the agent rejoined) before this was written.
        c.health = Health::Joining;
        assert!(!transition_applies(&c, &down));
        let new = Transition {
            from: None,
            to: Health::Joining,
            ..down
        };
        assert!(transition_applies(&c, &new));
    }
}
