//! Campaign steps in the member cluster. The hub sends a step (`StepCommand`); the runner
//! here fences it (a term older than one seen is refused), deduplicates it (the same
//! campaign and seq is the same step: a re-sent one gets the step's final status again, or
//! `Accepted` while it still runs) and runs it with `exec`. Steps are idempotent, so a
//! restarted agent that receives the step in flight again resumes it: a drained node has
//! nothing left to evict, a pool already at its size is not scaled again.

pub mod exec;

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_api::convert::campaign as conv;
use flotilla_api::v1;
use flotilla_core::campaign::step::{FailureKind, Step, StepStatus};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use exec::Exec;

/// What the executor does through the API: `(group, resource, subresource, verb)`. These are
/// exactly the rules of `deploy/agent.yaml`'s `flotilla-agent-campaigns` ClusterRole.
pub const PERMISSIONS: &[(&str, &str, &str, &str)] = &[
    ("", "nodes", "", "patch"),
    ("", "pods", "eviction", "create"),
    ("", "pods", "", "delete"),
    ("", "events", "", "create"),
    ("policy", "poddisruptionbudgets", "", "list"),
    ("cluster.x-k8s.io", "machinedeployments", "", "create"),
    ("cluster.x-k8s.io", "machinedeployments", "", "patch"),
    ("cluster.x-k8s.io", "machinedeployments", "", "delete"),
    ("cluster.x-k8s.io", "machines", "", "patch"),
];

/// Whether the agent's credentials allow everything the executor does (asked with
/// SelfSubjectAccessReviews); the missing permissions otherwise.
pub async fn permitted(client: &kube::Client) -> Result<(), Vec<String>> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client.clone());
    let mut missing = Vec::new();
    for (group, resource, sub, verb) in PERMISSIONS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: (!sub.is_empty()).then(|| sub.to_string()),
                    verb: Some(verb.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .ok()
            .and_then(|r| r.status)
            .is_some_and(|s| s.allowed);
        if !allowed {
            let what = match sub.is_empty() {
                true => resource.to_string(),
                false => format!("{resource}/{sub}"),
            };
            missing.push(format!("{verb} {what}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing)
    }
}

/// The agent's side of campaigns: steps in, statuses out.
#[derive(Clone)]
pub struct Steps {
    submit: mpsc::Sender<v1::StepCommand>,
    statuses: Arc<Mutex<mpsc::Receiver<v1::StepStatusReport>>>,
}

/// Statuses waiting for a hub stream (kept across reconnects).
const STATUSES: usize = 1024;

impl Steps {
    /// Start the runner over `exec`.
    pub fn start(exec: Arc<Exec>, shutdown: CancellationToken) -> Self {
        let (submit, rx) = mpsc::channel(64);
        let (out, statuses) = mpsc::channel(STATUSES);
        tokio::spawn(
            runner(exec, rx, out, shutdown).instrument(tracing::info_span!("agent-campaigns")),
        );
        Self {
            submit,
            statuses: Arc::new(Mutex::new(statuses)),
        }
    }

    /// Hand a step from the hub to the runner.
    pub async fn submit(&self, cmd: v1::StepCommand) {
        let _ = self.submit.send(cmd).await;
    }

    /// Statuses to send; one hub session holds this at a time.
    pub fn statuses(&self) -> Arc<Mutex<mpsc::Receiver<v1::StepStatusReport>>> {
        self.statuses.clone()
    }
}

/// One campaign's step on this cluster: the newest seq, and its final status once known.
struct Current {
    seq: u64,
    cancel: CancellationToken,
    last: Arc<std::sync::Mutex<Option<StepStatus>>>,
}

/// What the runner decides about an incoming step. Pure, so the fencing and deduplication
/// rules are tested without a cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Refuse: its term is older than one seen.
    Stale {
        /// The newest term seen.
        seen: u64,
    },
    /// The step already running or done: answer with its status (`None`: still running).
    Again(Option<StepStatus>),
    /// An older step of the campaign, superseded by a newer one: ignore.
    Old,
    /// Run it (cancelling the campaign's previous step, if any).
    Run,
}

/// Decide about `step` given the newest term seen and the campaign's current step.
pub fn admit(step: &Step, seen_term: u64, current: Option<(u64, Option<StepStatus>)>) -> Admit {
    if step.term < seen_term {
        return Admit::Stale { seen: seen_term };
    }
    match current {
        Some((seq, last)) if seq == step.seq => Admit::Again(last),
        Some((seq, _)) if seq > step.seq => Admit::Old,
        _ => Admit::Run,
    }
}

async fn runner(
    exec: Arc<Exec>,
    mut rx: mpsc::Receiver<v1::StepCommand>,
    out: mpsc::Sender<v1::StepStatusReport>,
    shutdown: CancellationToken,
) {
    let mut seen_term = 0u64;
    let mut current: HashMap<String, Current> = HashMap::new();
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = rx.recv() => match c { Some(c) => c, None => break },
        };
        let step = match conv::step_from_wire(&cmd) {
            Ok(s) => s,
            Err(e) => {
                let st = StepStatus::Failed {
                    kind: FailureKind::Refused,
                    reason: format!("this agent cannot run the step: {e}"),
                    blocked: Vec::new(),
                };
                let _ = out
                    .send(conv::status_to_wire(&cmd.campaign, cmd.seq, &st))
                    .await;
                continue;
            }
        };
        let cur = current.get(&step.campaign).map(|c| {
            let last = c.last.lock().expect("status lock").clone();
            (c.seq, last)
        });
        match admit(&step, seen_term, cur) {
            Admit::Stale { seen } => {
                tracing::warn!(campaign = %step.campaign, seq = step.seq, term = step.term, seen, "refusing a step from an older leader term");
                let st = StepStatus::Failed {
                    kind: FailureKind::Refused,
                    reason: format!(
                        "term {} is older than term {seen} this agent has seen",
                        step.term
                    ),
                    blocked: Vec::new(),
                };
                let _ = out
                    .send(conv::status_to_wire(&step.campaign, step.seq, &st))
                    .await;
                continue;
            }
            Admit::Again(last) => {
                let st = last.unwrap_or(StepStatus::Accepted);
                let _ = out
                    .send(conv::status_to_wire(&step.campaign, step.seq, &st))
                    .await;
                continue;
            }
            Admit::Old => continue,
            Admit::Run => {}
        }
        seen_term = seen_term.max(step.term);
        if let Some(prev) = current.remove(&step.campaign) {
            prev.cancel.cancel();
        }
        let cancel = shutdown.child_token();
        let last = Arc::new(std::sync::Mutex::new(None));
        current.insert(
            step.campaign.clone(),
            Current {
                seq: step.seq,
                cancel: cancel.clone(),
                last: last.clone(),
            },
        );
        let (exec, out) = (exec.clone(), out.clone());
        let span = tracing::info_span!("step", campaign = %step.campaign, seq = step.seq, kind = step.kind.name());
        tokio::spawn(
            async move {
                let report = |st: &StepStatus| conv::status_to_wire(&step.campaign, step.seq, st);
                tracing::info!("step started");
                let _ = out.send(report(&StepStatus::Accepted)).await;
                let progress = exec::Progress::new(out.clone(), step.campaign.clone(), step.seq);
                let st = tokio::select! {
                    _ = cancel.cancelled() => return,
                    st = exec.run(&step, &progress) => st,
                };
                match &st {
                    StepStatus::Failed { reason, .. } => tracing::warn!(%reason, "step failed"),
                    _ => tracing::info!("step done"),
                }
                *last.lock().expect("status lock") = Some(st.clone());
                let _ = out.send(report(&st)).await;
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use flotilla_core::campaign::step::{StepKind, StepOutput};

    use super::*;

    fn step(seq: u64, term: u64) -> Step {
        Step {
            campaign: "c".into(),
            seq,
            term,
            kind: StepKind::CordonBlue { nodes: vec![] },
        }
    }

    #[test]
    fn fencing_and_deduplication() {
        let done = StepStatus::Done(StepOutput::None);
        // (step, newest term seen, current (seq, final status), decision)
        let cases = [
            (step(5, 3), 4, None, Admit::Stale { seen: 4 }),
            (step(5, 4), 4, None, Admit::Run),
            (step(5, 4), 4, Some((5, None)), Admit::Again(None)),
            (
                step(5, 4),
                4,
                Some((5, Some(done.clone()))),
                Admit::Again(Some(done.clone())),
            ),
            (step(4, 4), 4, Some((5, None)), Admit::Old),
            (step(6, 5), 4, Some((5, Some(done))), Admit::Run),
        ];
        for (s, seen, cur, want) in cases {
            assert_eq!(admit(&s, seen, cur.clone()), want, "{s:?} {seen} {cur:?}");
        }
    }
}

#[cfg(test)]
mod rbac_tests {
    use super::PERMISSIONS;

    /// Every permission the executor checks for is granted by the manifest's campaign
    /// ClusterRole, and the role grants nothing the executor does not use.
    #[test]
    fn the_campaign_cluster_role_grants_exactly_what_the_executor_uses() {
        let manifest = include_str!("../../../deploy/agent.yaml");
        let role: serde_json::Value = manifest
            .split("\n---\n")
            .filter_map(|d| serde_saphyr::from_str::<serde_json::Value>(d).ok())
            .find(|d| {
                d["kind"] == "ClusterRole" && d["metadata"]["name"] == "flotilla-agent-campaigns"
            })
            .expect("deploy/agent.yaml has the flotilla-agent-campaigns ClusterRole");
        let mut granted = std::collections::BTreeSet::new();
        for rule in role["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        granted.insert(format!(
                            "{}/{}/{}",
                            g.as_str().unwrap(),
                            r.as_str().unwrap(),
                            v.as_str().unwrap()
                        ));
                    }
                }
            }
        }
        let used: std::collections::BTreeSet<String> = PERMISSIONS
            .iter()
            .map(|(g, r, sub, v)| match sub.is_empty() {
                true => format!("{g}/{r}/{v}"),
                false => format!("{g}/{r}/{sub}/{v}"),
            })
            .collect();
        for u in &used {
            assert!(
                granted.contains(u),
                "the executor uses {u}, which the role does not grant"
            );
        }
        // Reads the executor needs besides its checked writes.
        let reads = [
            "policy/poddisruptionbudgets/get",
            "cluster.x-k8s.io/machinedeployments/get",
            "cluster.x-k8s.io/machinedeployments/list",
        ];
        for g in &granted {
            assert!(
                used.contains(g) || reads.contains(&g.as_str()),
                "the role grants {g}, which the executor does not use"
            );
        }
    }
}
