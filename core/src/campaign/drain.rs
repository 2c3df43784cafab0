//! Drain planning with kubectl's semantics (`k8s.io/kubectl/pkg/drain`) and the campaign's pod
//! rules: for each pod on a node, whether it is evicted, left, waited for, or refuses the
//! drain. The agent gathers the pods' facts and evicts; this decides.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::spec::{DrainRules, PodAction};

/// What controls a pod, as far as a drain cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// No controller: evicting it loses it for good.
    None,
    /// A DaemonSet: its controller ignores cordons, so it is never evicted.
    DaemonSet,
    /// A static pod's mirror (annotation `kubernetes.io/config.mirror`): the kubelet owns it.
    Mirror,
    /// Any other controller (ReplicaSet, Job, StatefulSet…): it is recreated elsewhere.
    Controller,
}

/// A pod's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodPhase {
    /// Not yet running.
    Pending,
    /// Running.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished badly.
    Failed,
    /// The kubelet does not say.
    Unknown,
}

/// The facts about one pod a drain decision needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Phase.
    pub phase: PodPhase,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// What controls it.
    pub owner: Owner,
    /// Has an emptyDir volume (its data goes with the pod).
    pub empty_dir: bool,
}

/// What the drain does with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Evict through the Eviction API (PDBs decide; 429 is retried).
    Evict,
    /// Leave it on the node; the drain does not wait for it.
    Leave(&'static str),
    /// Already terminating: wait until it is gone.
    AwaitGone,
    /// Wait until it finishes, up to the deadline (then `onUndrainable`).
    WaitCompleted(Duration),
    /// kubectl would refuse to drain the node because of this pod; the reason names the
    /// setting that would allow it.
    Refuse(String),
}

impl PodFacts {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn finished(&self) -> bool {
        matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// Decide one pod. Order follows kubectl's filters, with the campaign's pod rules (first
/// match wins) ahead of them, as Cluster API's MachineDrainRules are.
pub fn decide(pod: &PodFacts, rules: &DrainRules) -> Disposition {
    if pod.deleting {
        return Disposition::AwaitGone;
    }
    // Mirror and DaemonSet pods are never evicted, whatever a rule says.
    match pod.owner {
        Owner::Mirror => return Disposition::Leave("mirror pod (the kubelet owns it)"),
        Owner::DaemonSet if rules.ignore_daemon_sets => {
            return Disposition::Leave("DaemonSet pod");
        }
        Owner::DaemonSet => {
            return Disposition::Refuse(format!(
                "{} is a DaemonSet pod (set blueGreen.ignoreDaemonSets: true)",
                pod.key()
            ));
        }
        _ => {}
    }
    if let Some(rule) = rules
        .pod_rules
        .iter()
        .find(|r| r.selector.matches(&pod.labels))
    {
        match rule.action {
            PodAction::Skip => return Disposition::Leave("a pod rule skips it"),
            PodAction::WaitCompleted(d) if !pod.finished() => {
                return Disposition::WaitCompleted(d);
            }
            PodAction::WaitCompleted(_) => {}
        }
    }
    // A finished pod is always removable: its eviction ignores PDBs.
    if pod.finished() {
        return Disposition::Evict;
    }
    if pod.empty_dir && !rules.delete_empty_dir_data {
        return Disposition::Refuse(format!(
            "{} uses emptyDir data that eviction deletes (set blueGreen.deleteEmptyDirData: true)",
            pod.key()
        ));
    }
    if pod.owner == Owner::None && !rules.force {
        return Disposition::Refuse(format!(
            "{} has no controller and would not come back (set blueGreen.force: true)",
            pod.key()
        ));
    }
    Disposition::Evict
}

/// Whether a node with these pods is drained: nothing left that the drain evicts or waits for.
pub fn is_drained<'a>(pods: impl IntoIterator<Item = &'a PodFacts>, rules: &DrainRules) -> bool {
    pods.into_iter()
        .all(|p| matches!(decide(p, rules), Disposition::Leave(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::spec::{OnUndrainable, PodRule};
    use crate::selector::Selector;

    fn rules() -> DrainRules {
        DrainRules {
            timeout_per_node: Duration::from_secs(1800),
            on_undrainable: OnUndrainable::Pause,
            max_blocked_nodes: 1,
            grace_period: None,
            ignore_daemon_sets: true,
            delete_empty_dir_data: false,
            force: false,
            pod_rules: vec![
                PodRule {
                    selector: sel("app", "trainer"),
                    action: PodAction::WaitCompleted(Duration::from_secs(3600)),
                },
                PodRule {
                    selector: sel("app", "cache"),
                    action: PodAction::Skip,
                },
            ],
        }
    }

    fn sel(k: &str, v: &str) -> Selector {
        Selector {
            match_labels: [(k.to_string(), v.to_string())].into(),
            ..Selector::default()
        }
    }

    fn pod(app: &str, owner: Owner) -> PodFacts {
        PodFacts {
            namespace: "ml".into(),
            name: format!("{app}-0"),
            labels: [("app".to_string(), app.to_string())].into(),
            phase: PodPhase::Running,
            deleting: false,
            owner,
            empty_dir: false,
        }
    }

    #[test]
    fn kubectl_filters_and_rules() {
        let r = rules();
        let mut finished_bare = pod("once", Owner::None);
        finished_bare.phase = PodPhase::Succeeded;
        let mut finished_trainer = pod("trainer", Owner::Controller);
        finished_trainer.phase = PodPhase::Failed;
        let mut deleting = pod("web", Owner::Controller);
        deleting.deleting = true;
        let mut scratch = pod("web", Owner::Controller);
        scratch.empty_dir = true;
        type Check = fn(&Disposition) -> bool;
        let cases: Vec<(PodFacts, Check)> = vec![
            (pod("web", Owner::Controller), |d| *d == Disposition::Evict),
            (pod("agent", Owner::DaemonSet), |d| {
                matches!(d, Disposition::Leave(_))
            }),
            (pod("etcd", Owner::Mirror), |d| {
                matches!(d, Disposition::Leave(_))
            }),
            (pod("cache", Owner::Controller), |d| {
                matches!(d, Disposition::Leave(_))
            }),
            // A skip rule never makes a DaemonSet pod block, nor a mirror pod evictable.
            (pod("cache", Owner::Mirror), |d| {
                matches!(d, Disposition::Leave(_))
            }),
            (pod("trainer", Owner::Controller), |d| {
                *d == Disposition::WaitCompleted(Duration::from_secs(3600))
            }),
            (finished_trainer, |d| *d == Disposition::Evict),
            (finished_bare, |d| *d == Disposition::Evict),
            (deleting, |d| *d == Disposition::AwaitGone),
            (
                scratch,
                |d| matches!(d, Disposition::Refuse(m) if m.contains("deleteEmptyDirData")),
            ),
            (
                pod("bare", Owner::None),
                |d| matches!(d, Disposition::Refuse(m) if m.contains("blueGreen.force")),
            ),
        ];
        for (p, ok) in cases {
            let d = decide(&p, &r);
            assert!(ok(&d), "{p:?} → {d:?}");
        }
    }

    #[test]
    fn settings_allow_what_kubectl_flags_allow() {
        let mut r = rules();
        r.force = true;
        r.delete_empty_dir_data = true;
        r.ignore_daemon_sets = false;
        let mut scratch = pod("web", Owner::None);
        scratch.empty_dir = true;
        assert_eq!(decide(&scratch, &r), Disposition::Evict);
        assert!(matches!(
            decide(&pod("agent", Owner::DaemonSet), &r),
            Disposition::Refuse(m) if m.contains("ignoreDaemonSets")
        ));
    }

    #[test]
    fn a_node_is_drained_when_only_left_pods_remain() {
        let r = rules();
        let left = [
            pod("agent", Owner::DaemonSet),
            pod("cache", Owner::Controller),
        ];
        assert!(is_drained(&left, &r));
        let busy = [
            pod("agent", Owner::DaemonSet),
            pod("web", Owner::Controller),
        ];
        assert!(!is_drained(&busy, &r));
    }
}
