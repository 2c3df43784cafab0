//! The campaign machine, driven by a scripted agent and explicit time.
//!
//! - every cluster goes through the phases in order and the campaign succeeds;
//! - bounded surge never exceeds its cap (counted from the steps sent, as a cluster would);
//! - gates (approval, wait, healthy) hold a stage until they pass;
//! - failure budgets stop new clusters and fail the stage;
//! - failed health gates, missed deadlines and undrainable nodes do what the spec says;
//! - a new leader continues from the stored record without repeating or skipping a step;
//! - people's commands (abort, rollback, complete, retry, pause) and their refusals.

use super::*;
use crate::campaign::plan::{Member, snapshot};
use crate::campaign::spec::RawSpec;
use crate::campaign::step::{DrainReport, HealthReport, PreflightReport};

const MIN: i64 = 60_000;

fn spec(extra: serde_json::Value) -> Spec {
    let mut v = serde_json::json!({
        "name": "upgrade",
        "pool": {"name": "gpu"},
        "green": {"clusterApi": {"version": "v1.31.2"}},
        "stages": [{"name": "all", "maxConcurrency": 1}],
        "blueGreen": {"batch": 2, "batchSoak": "0s", "finalSoak": "0s"},
        "healthGates": {"window": "0s"},
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::from_value::<RawSpec>(v)
        .unwrap()
        .validate()
        .unwrap()
}

/// A fleet as the agents would show it: blue nodes per cluster, and what the agent does.
struct Sim {
    c: Campaign,
    members: BTreeMap<String, MemberInfo>,
    now: i64,
    term: u64,
    blue: u32,
    /// Every step sent, in order.
    sent: Vec<(String, Step)>,
    /// Nodes present per cluster (blue + green), to check the surge cap.
    nodes: BTreeMap<String, (u32, u32)>,
    unhealthy_green: bool,
}

impl Sim {
    fn new(spec: Spec, clusters: &[&str], blue: u32) -> Self {
        let members: Vec<Member> = clusters
            .iter()
            .map(|n| Member {
                name: n.to_string(),
                labels: [("ring".to_string(), n.to_string())].into(),
            })
            .collect();
        let snap = snapshot(&spec, &members);
        let mut s = Self {
            c: Campaign::new("c1".into(), spec, snap, 0),
            members: clusters
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        MemberInfo {
                            health: Health::Ready,
                            campaigns: true,
                        },
                    )
                })
                .collect(),
            now: 0,
            term: 1,
            blue,
            sent: Vec::new(),
            nodes: clusters
                .iter()
                .map(|n| (n.to_string(), (blue, 0)))
                .collect(),
            unhealthy_green: false,
        };
        s.tick();
        s
    }

    fn record(&mut self, actions: Vec<Action>) {
        for Action::Send { cluster, step } in actions {
            assert_eq!(step.term, self.term);
            self.sent.push((cluster, step));
        }
    }

    fn tick(&mut self) {
        let ctx = Ctx {
            now_ms: self.now,
            term: self.term,
            members: &self.members,
        };
        let a = self.c.tick(&ctx);
        self.record(a);
    }

    fn at(&mut self, ms: i64) {
        self.now = ms;
        self.tick();
    }

    fn command(&mut self, cmd: Command) -> Result<(), Refusal> {
        let ctx = Ctx {
            now_ms: self.now,
            term: self.term,
            members: &self.members,
        };
        let a = self.c.command(&ctx, cmd)?;
        self.record(a);
        Ok(())
    }

    fn status(&mut self, cluster: &str, seq: u64, st: StepStatus) {
        let ctx = Ctx {
            now_ms: self.now,
            term: self.term,
            members: &self.members,
        };
        let a = self.c.on_status(&ctx, cluster, seq, st);
        self.record(a);
    }

    fn cluster(&self, name: &str) -> &ClusterRun {
        self.c
            .clusters()
            .map(|(_, c)| c)
            .find(|c| c.name == name)
            .unwrap()
    }

    /// What a well-behaved agent answers, applying the step to the simulated nodes.
    fn agent(&mut self, cluster: &str, kind: &StepKind) -> StepStatus {
        let (blue, green) = self.nodes.get_mut(cluster).unwrap();
        let out = match kind {
            StepKind::Preflight { .. } => StepOutput::Preflight(PreflightReport {
                blue_nodes: (0..self.blue)
                    .map(|i| format!("{cluster}-blue-{i}"))
                    .collect(),
                blue_gpu_allocatable: i64::from(self.blue) * 8,
                ready_endpoints: 4,
                ..PreflightReport::default()
            }),
            StepKind::ProvisionGreen { target, .. } => {
                *green = *target;
                StepOutput::None
            }
            StepKind::RetireBlue { nodes, last, .. } => {
                *blue -= if *last { *blue } else { nodes.len() as u32 };
                StepOutput::None
            }
            StepKind::CheckHealth { .. } => StepOutput::Health(HealthReport {
                green_nodes: *green,
                green_ready: if self.unhealthy_green { 0 } else { *green },
                green_gpu_allocatable: i64::from(*green) * 8,
                ready_endpoints: 4,
                ..HealthReport::default()
            }),
            StepKind::RollBack { blue: b, .. } => {
                *blue = *b;
                *green = 0;
                StepOutput::None
            }
            StepKind::DrainBatch { .. } => StepOutput::Drain(DrainReport::default()),
            _ => StepOutput::None,
        };
        StepStatus::Done(out)
    }

    /// Answer every step in flight until none is left (or `limit` answers).
    fn run(&mut self, limit: usize) {
        for _ in 0..limit {
            let Some((cluster, step)) = self
                .c
                .in_flight()
                .map(|(c, s)| (c.to_string(), s.clone()))
                .next()
            else {
                return;
            };
            let st = self.agent(&cluster, &step.kind);
            self.status(&cluster, step.seq, st);
        }
    }

    fn kinds(&self, cluster: &str) -> Vec<&'static str> {
        self.sent
            .iter()
            .filter(|(c, _)| c == cluster)
            .map(|(_, s)| s.kind.name())
            .collect()
    }
}

#[test]
fn clusters_run_one_at_a_time_through_every_phase_to_success() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a", "b"], 4);
    assert_eq!(s.cluster("a").phase, Phase::Preflight);
    assert_eq!(s.cluster("b").phase, Phase::Pending, "concurrency 1");
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded, "{:?}", s.c.reason);
    for name in ["a", "b"] {
        let c = s.cluster(name);
        assert_eq!(c.phase, Phase::Done, "{c:?}");
        assert_eq!(
            s.kinds(name),
            [
                "preflight",
                "provision-green",
                "wait-green-ready",
                "cordon-blue",
                "drain-batch",
                "check-health",
                "drain-batch",
                "check-health",
                "retire-blue"
            ]
        );
        assert_eq!(s.nodes[name], (0, 4), "blue gone, green serves");
    }
    // a ran entirely before b started.
    let first_b = s.sent.iter().position(|(c, _)| c == "b").unwrap();
    assert!(s.sent[first_b..].iter().all(|(c, _)| c == "b"));
    // Sequence numbers are unique and increasing.
    assert!(s.sent.windows(2).all(|w| w[0].1.seq < w[1].1.seq));
}

#[test]
fn bounded_surge_never_exceeds_its_cap_and_retires_only_for_room() {
    let mut s = Sim::new(spec(serde_json::json!({"surge": 2})), &["a"], 5);
    let mut max_extra = 0;
    for _ in 0..200 {
        s.run(1);
        let (blue, green) = s.nodes["a"];
        max_extra = max_extra.max((blue + green).saturating_sub(5));
        assert!(
            blue + green <= 5 + 2,
            "over the cap: {blue} blue + {green} green"
        );
    }
    assert_eq!(s.c.state, RunState::Succeeded);
    assert_eq!(max_extra, 2, "the cap is used");
    assert_eq!(
        s.kinds("a")
            .iter()
            .filter(|k| **k == "provision-green")
            .count(),
        3
    );
}

#[test]
fn batch_and_final_soaks_wait_on_the_clock() {
    let mut s = Sim::new(
        spec(
            serde_json::json!({"blueGreen": {"batch": "100%", "batchSoak": "10m", "finalSoak": "1h"}}),
        ),
        &["a"],
        2,
    );
    s.run(100);
    assert_eq!(s.cluster("a").phase, Phase::BatchSoaking);
    s.at(10 * MIN - 1);
    assert_eq!(s.cluster("a").phase, Phase::BatchSoaking);
    s.at(10 * MIN);
    assert_eq!(s.cluster("a").phase, Phase::VerifyingHealth);
    s.run(1);
    assert_eq!(s.cluster("a").phase, Phase::FinalSoaking);
    s.at(69 * MIN);
    assert_eq!(s.cluster("a").phase, Phase::FinalSoaking);
    s.at(70 * MIN);
    s.run(1);
    assert_eq!(s.cluster("a").phase, Phase::Done);
}

#[test]
fn gates_hold_the_stage_until_they_pass() {
    let mut s = Sim::new(
        spec(serde_json::json!({"stages": [
            {"name": "one", "clusters": {"matchLabels": {"ring": "a"}},
             "afterGates": [{"healthy": "5m"}, {"approval": {"name": "go"}}]},
            {"name": "two", "beforeGates": [{"wait": "10m"}]}
        ]})),
        &["a", "b"],
        2,
    );
    s.run(100);
    assert_eq!(s.c.stages[0].phase, StagePhase::AfterGate(0));
    // b turns unhealthy for a while: the healthy window starts again when it recovers... but
    // only stage one's clusters count.
    s.members.get_mut("a").unwrap().health = Health::Degraded;
    s.at(3 * MIN);
    s.members.get_mut("a").unwrap().health = Health::Ready;
    s.at(4 * MIN);
    s.at(8 * MIN);
    assert_eq!(
        s.c.stages[0].phase,
        StagePhase::AfterGate(0),
        "healthy only since 4m"
    );
    s.at(9 * MIN);
    assert_eq!(s.c.stages[0].phase, StagePhase::AfterGate(1));
    assert_eq!(s.c.waiting_approvals(), ["go"]);
    s.at(60 * MIN);
    assert_eq!(
        s.c.stages[0].phase,
        StagePhase::AfterGate(1),
        "approval never times out"
    );
    s.command(Command::Approve(None)).unwrap();
    assert_eq!(s.c.current, 1);
    assert_eq!(s.c.stages[1].phase, StagePhase::BeforeGate(0));
    assert!(s.kinds("b").is_empty());
    s.at(70 * MIN);
    assert_eq!(s.kinds("b"), ["preflight"]);
    assert!(matches!(
        s.command(Command::Approve(Some("nope".into()))),
        Err(Refusal::NotFound(_))
    ));
}

#[test]
fn an_approval_given_ahead_is_kept() {
    let mut s = Sim::new(
        spec(serde_json::json!({"stages": [{"name": "one", "beforeGates": ["approval"]}]})),
        &["a"],
        2,
    );
    assert!(s.kinds("a").is_empty());
    s.command(Command::Approve(Some("one-before-0".into())))
        .unwrap();
    assert_eq!(s.kinds("a"), ["preflight"]);
}

/// An agent whose health check fails for the named clusters.
fn run_with_failures(s: &mut Sim, failing: &[&str]) {
    for _ in 0..500 {
        let Some((cluster, step)) =
            s.c.in_flight()
                .map(|(c, st)| (c.to_string(), st.clone()))
                .next()
        else {
            return;
        };
        s.unhealthy_green = failing.contains(&cluster.as_str());
        let st = s.agent(&cluster, &step.kind);
        s.status(&cluster, step.seq, st);
    }
}

#[test]
fn a_failed_health_gate_rolls_the_cluster_back() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 4);
    run_with_failures(&mut s, &["a"]);
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::RolledBack);
    assert!(a.failed);
    assert!(a.reason.contains("health gates failed"), "{}", a.reason);
    assert_eq!(s.nodes["a"], (4, 0), "blue restored, green removed");
    assert_eq!(s.c.state, RunState::Failed, "default budget 0");
    assert!(s.c.reason.contains("failure budget of 0"), "{}", s.c.reason);
}

#[test]
fn the_failure_budget_stops_new_clusters_only_when_exceeded() {
    let budget_one = serde_json::json!({"failureBudget": {"perStage": 1}});
    let mut s = Sim::new(spec(budget_one), &["a", "b", "c"], 2);
    run_with_failures(&mut s, &["a"]);
    assert_eq!(s.cluster("a").phase, Phase::RolledBack);
    assert_eq!(s.cluster("b").phase, Phase::Done);
    assert_eq!(s.cluster("c").phase, Phase::Done);
    assert_eq!(
        s.c.state,
        RunState::Succeeded,
        "one failure is within the budget"
    );

    let mut s = Sim::new(spec(serde_json::json!({})), &["a", "b", "c"], 2);
    run_with_failures(&mut s, &["a"]);
    assert_eq!(
        s.cluster("b").phase,
        Phase::Pending,
        "no new cluster after the budget"
    );
    assert!(s.kinds("b").is_empty());
    assert_eq!(s.c.stages[0].phase, StagePhase::Failed);
    assert_eq!(s.c.state, RunState::Failed);
}

#[test]
fn members_that_left_or_cannot_run_campaigns_are_skipped_without_counting() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a", "b", "c", "d"], 2);
    // `a` started before anything changed; the others are judged at their turn.
    s.members.remove("b");
    s.members.get_mut("c").unwrap().health = Health::Unreachable;
    s.members.get_mut("d").unwrap().campaigns = false;
    s.run(200);
    assert_eq!(s.c.state, RunState::Succeeded);
    assert_eq!(s.cluster("a").phase, Phase::Done);
    for (n, words) in [
        ("b", "no longer a member"),
        ("c", "unreachable"),
        ("d", "cannot run campaigns"),
    ] {
        let c = s.cluster(n);
        assert_eq!(c.phase, Phase::Skipped, "{n}");
        assert!(c.reason.contains(words), "{n}: {}", c.reason);
        assert!(!c.failed);
    }
}

#[test]
fn a_stuck_agent_times_out_and_counts_as_failed() {
    let mut s = Sim::new(
        spec(serde_json::json!({"failureBudget": {"perStage": 1}})),
        &["a", "b"],
        2,
    );
    s.run(3); // preflight, provision, wait-green-ready: green exists now
    assert_eq!(s.cluster("a").phase, Phase::CordoningBlue);
    // The agent stays connected but never finishes: the step's deadline passes.
    s.at(STEP_TIMEOUT.as_millis() as i64 + 1);
    assert_eq!(s.cluster("a").phase, Phase::RollingBack);
    assert!(s.cluster("a").failed);
    // The rollback does not finish either.
    let deadline = s.cluster("a").step_deadline_ms.unwrap();
    s.at(deadline);
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::Failed);
    assert!(a.reason.contains("rollback failed too"), "{}", a.reason);
    // b runs: one failure is within the stage's budget.
    assert_eq!(s.kinds("b"), ["preflight"]);
}

#[test]
fn a_partitioned_cluster_fails_where_it_is_after_the_unreachable_timeout() {
    let mut s = Sim::new(
        spec(serde_json::json!({
            "failureBudget": {"perStage": 1},
            "unreachableTimeout": "30s",
        })),
        &["a", "b"],
        2,
    );
    s.run(3);
    assert_eq!(s.cluster("a").phase, Phase::CordoningBlue);
    let sent = s.kinds("a").len();
    s.members.get_mut("a").unwrap().health = Health::Unreachable;
    s.at(1_000);
    s.at(30_000);
    assert_eq!(s.cluster("a").phase, Phase::CordoningBlue, "not yet");
    // Back for a moment: the clock starts again.
    s.members.get_mut("a").unwrap().health = Health::Ready;
    s.at(30_500);
    s.members.get_mut("a").unwrap().health = Health::Unreachable;
    s.at(31_000);
    s.at(60_999);
    assert_eq!(s.cluster("a").phase, Phase::CordoningBlue, "29.999 s");
    s.at(61_000);
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::Failed);
    assert!(a.failed, "counts against the budget");
    assert!(a.reason.contains("unreachable for 30s"), "{}", a.reason);
    assert!(a.step.is_none());
    // Nothing more is sent to it (a rollback could not reach it).
    assert_eq!(s.kinds("a").len(), sent);
    // Within the stage's budget, b runs.
    assert_eq!(s.kinds("b"), ["preflight"]);
    // Over it, nothing new would start: a second partition fails the stage.
    s.members.get_mut("b").unwrap().health = Health::Unreachable;
    s.at(62_000);
    s.at(92_000);
    assert_eq!(s.cluster("b").phase, Phase::Failed);
    assert_eq!(s.c.state, RunState::Failed);
}

#[test]
fn an_undrainable_node_pauses_the_cluster_until_resumed() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 2);
    s.run(4);
    let (cluster, step) =
        s.c.in_flight()
            .map(|(c, st)| (c.to_string(), st.clone()))
            .next()
            .unwrap();
    assert_eq!(step.kind.name(), "drain-batch");
    let blocked = vec![BlockedPod {
        pod: "ml/llama-0".into(),
        node: "a-blue-0".into(),
        reason: "PodDisruptionBudget ml/llama allows 0 disruptions".into(),
    }];
    s.status(
        &cluster,
        step.seq,
        StepStatus::Failed {
            kind: FailureKind::Undrainable,
            reason: "a-blue-0 not drained within 30m".into(),
            blocked: blocked.clone(),
        },
    );
    let a = s.cluster("a");
    assert!(a.held.is_some() && !a.failed);
    assert_eq!(a.blocked, blocked);
    s.at(100 * MIN);
    assert_eq!(
        s.kinds("a").iter().filter(|k| **k == "drain-batch").count(),
        1,
        "held"
    );
    s.command(Command::Resume).unwrap();
    let drains: Vec<u64> = s
        .sent
        .iter()
        .filter(|(_, st)| st.kind.name() == "drain-batch")
        .map(|(_, st)| st.seq)
        .collect();
    assert_eq!(drains.len(), 2, "the drain is sent again");
    assert!(drains[1] > drains[0], "with a new seq");
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);
}

#[test]
fn quarantine_continues_until_max_blocked_nodes() {
    let mut s = Sim::new(
        spec(
            serde_json::json!({"blueGreen": {"batch": 1, "batchSoak": "0s", "finalSoak": "0s",
            "onUndrainable": "quarantine", "maxBlockedNodes": 1}}),
        ),
        &["a"],
        3,
    );
    let mut quarantines = 0;
    for _ in 0..100 {
        let Some((cluster, step)) =
            s.c.in_flight()
                .map(|(c, st)| (c.to_string(), st.clone()))
                .next()
        else {
            break;
        };
        let st = match &step.kind {
            StepKind::DrainBatch { nodes, .. } => {
                quarantines += 1;
                StepStatus::Done(StepOutput::Drain(DrainReport {
                    quarantined: nodes.clone(),
                    ..DrainReport::default()
                }))
            }
            k => s.agent(&cluster, k),
        };
        s.status(&cluster, step.seq, st);
    }
    assert_eq!(quarantines, 2);
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::RolledBack);
    assert!(a.reason.contains("maxBlockedNodes"), "{}", a.reason);
}

#[test]
fn a_new_leader_continues_from_the_record_without_repeating_or_skipping() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 4);
    s.run(4);
    let (_, before) =
        s.c.in_flight()
            .map(|(c, st)| (c.to_string(), st.clone()))
            .next()
            .unwrap();
    // The old leader is gone; the new one reads the record (as stored) under a new term.
    let stored = serde_json::to_string(&s.c).unwrap();
    s.c = serde_json::from_str(&stored).unwrap();
    s.term = 2;
    s.tick();
    let (_, after) =
        s.c.in_flight()
            .map(|(c, st)| (c.to_string(), st.clone()))
            .next()
            .unwrap();
    assert_eq!(
        before, after,
        "the same step is in flight: the new leader sends it again"
    );
    let sent_before = s.sent.len();
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);
    // Nothing repeated: every kind in order exactly as a campaign without failover.
    assert_eq!(
        s.kinds("a"),
        [
            "preflight",
            "provision-green",
            "wait-green-ready",
            "cordon-blue",
            "drain-batch",
            "check-health",
            "drain-batch",
            "check-health",
            "retire-blue"
        ]
    );
    assert!(s.sent[sent_before..].iter().all(|(_, st)| st.term == 2));
}

#[test]
fn statuses_for_another_step_are_ignored() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 2);
    let seq = s.c.in_flight().next().unwrap().1.seq;
    s.run(1);
    let before = s.c.clone();
    s.status("a", seq, StepStatus::Done(StepOutput::None));
    s.status("nobody", 99, StepStatus::Accepted);
    assert_eq!(s.c, before);
}

#[test]
fn abort_rolls_back_clusters_in_flight_and_skips_the_rest() {
    let mut s = Sim::new(
        spec(serde_json::json!({"stages": [{"name": "all", "maxConcurrency": 2}]})),
        &["a", "b", "c"],
        2,
    );
    s.run(2); // a: provisioned; b: pre-flight done
    s.command(Command::Abort).unwrap();
    assert_eq!(s.cluster("c").phase, Phase::Skipped);
    s.run(100);
    assert_eq!(s.c.state, RunState::Aborted);
    for n in ["a", "b"] {
        let c = s.cluster(n);
        assert!(
            matches!(c.phase, Phase::RolledBack | Phase::Skipped),
            "{n}: {c:?}"
        );
        assert!(!c.failed, "an abort is not a failure");
    }
    assert_eq!(s.nodes["a"], (2, 0));
    assert!(s.command(Command::Resume).is_err());
}

#[test]
fn rollback_and_complete_act_inside_the_final_soak_only() {
    let mut s = Sim::new(
        spec(
            serde_json::json!({"stages": [{"name": "all", "maxConcurrency": 2}],
            "blueGreen": {"batch": 2, "batchSoak": "0s", "finalSoak": "1h"}}),
        ),
        &["a", "b"],
        2,
    );
    assert!(matches!(
        s.command(Command::Rollback(None)),
        Err(Refusal::NotNow(_))
    ));
    assert!(matches!(
        s.command(Command::Complete),
        Err(Refusal::NotNow(_))
    ));
    s.run(100);
    assert_eq!(s.cluster("a").phase, Phase::FinalSoaking);
    s.command(Command::Rollback(Some("a".into()))).unwrap();
    assert!(matches!(
        s.command(Command::Rollback(Some("zz".into()))),
        Err(Refusal::NotFound(_))
    ));
    s.command(Command::Complete).unwrap();
    s.run(100);
    assert_eq!(s.cluster("a").phase, Phase::RolledBack);
    assert_eq!(s.nodes["a"], (2, 0), "blue back");
    assert_eq!(s.cluster("b").phase, Phase::Done);
    assert_eq!(s.nodes["b"], (0, 2));
}

#[test]
fn retry_runs_failed_and_skipped_clusters_again_with_the_same_snapshot() {
    let mut s = Sim::new(
        spec(
            serde_json::json!({"stages": [{"name": "all", "maxConcurrency": 2}],
        "failureBudget": {"perStage": 2, "perCampaign": 2}}),
        ),
        &["a", "b", "c"],
        2,
    );
    s.members.get_mut("c").unwrap().health = Health::Unreachable;
    run_with_failures(&mut s, &["a"]);
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);
    assert_eq!(s.cluster("a").phase, Phase::RolledBack);
    assert_eq!(s.cluster("c").phase, Phase::Skipped);
    assert!(matches!(s.command(Command::Pause), Err(Refusal::NotNow(_))));
    s.members.get_mut("c").unwrap().health = Health::Ready;
    // A cluster that joined after the snapshot is not part of the retry.
    s.members.insert(
        "late".into(),
        MemberInfo {
            health: Health::Ready,
            campaigns: true,
        },
    );
    s.command(Command::Retry).unwrap();
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);
    for n in ["a", "b", "c"] {
        assert_eq!(s.cluster(n).phase, Phase::Done, "{n}");
    }
    assert!(s.kinds("late").is_empty());
    assert_eq!(
        s.kinds("b").iter().filter(|k| **k == "preflight").count(),
        1,
        "b is not rerun"
    );
}

#[test]
fn pause_sends_nothing_new_until_resumed() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 2);
    s.command(Command::Pause).unwrap();
    let n = s.sent.len();
    s.run(1); // the pre-flight in flight finishes
    assert_eq!(s.sent.len(), n, "nothing new while paused");
    assert_eq!(s.cluster("a").phase, Phase::Preflight);
    s.command(Command::Resume).unwrap();
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);
}

#[test]
fn quota_lowers_the_surge_or_fails_before_anything_changes() {
    for (headroom, phase) in [(0, Phase::Failed), (1, Phase::Done)] {
        let mut s = Sim::new(spec(serde_json::json!({})), &["a"], 3);
        let (_, step) =
            s.c.in_flight()
                .map(|(c, st)| (c.to_string(), st.clone()))
                .next()
                .unwrap();
        let report = PreflightReport {
            blue_nodes: vec!["n0".into(), "n1".into(), "n2".into()],
            quota_headroom: Some(headroom),
            blue_gpu_allocatable: 24,
            ready_endpoints: 4,
            ..PreflightReport::default()
        };
        s.status(
            "a",
            step.seq,
            StepStatus::Done(StepOutput::Preflight(report)),
        );
        s.run(100);
        let a = s.cluster("a");
        assert_eq!(a.phase, phase, "{headroom}: {}", a.reason);
        if headroom == 0 {
            assert!(a.reason.contains("nothing was changed"), "{}", a.reason);
            assert_eq!(s.kinds("a"), ["preflight"]);
        } else {
            assert_eq!(a.surge, 1);
            assert!(s.sent.iter().all(|(_, st)| !matches!(
                st.kind,
                StepKind::ProvisionGreen { target, .. } if target > 1 + a.counts.retired
            )));
        }
    }
}

#[test]
fn traffic_is_shifted_away_before_blue_is_touched_and_back_after_the_last_batch() {
    let mut s = Sim::new(spec(serde_json::json!({"trafficShift": true})), &["a"], 2);
    s.run(3);
    assert_eq!(s.cluster("a").phase, Phase::ShiftingTraffic);
    assert_eq!(s.c.shifted_away().collect::<Vec<_>>(), ["a"]);
    assert!(s.kinds("a").iter().all(|k| *k != "cordon-blue"));
    s.at(TRAFFIC_SETTLE.as_millis() as i64);
    assert_eq!(s.cluster("a").phase, Phase::CordoningBlue);
    s.run(3); // cordon, drain, health
    assert_eq!(s.cluster("a").phase, Phase::RetiringBlue);
    assert_eq!(
        s.c.shifted_away().count(),
        0,
        "back once the last batch is healthy"
    );
}

#[test]
fn failing_health_gates_are_checked_again_until_their_window_closes() {
    let window = serde_json::json!({"healthGates": {"window": "1m"}});
    // Unhealthy at first (pods still starting), healthy before the window closes: continues.
    let mut s = Sim::new(spec(window.clone()), &["a"], 2);
    s.unhealthy_green = true;
    s.run(5); // preflight, provision, wait, cordon, drain
    s.run(1); // the first check fails
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::VerifyingHealth);
    assert!(a.progress.contains("not met yet"), "{}", a.progress);
    assert!(a.step.is_none(), "the next check waits");
    s.at(HEALTH_RECHECK.as_millis() as i64);
    assert_eq!(
        s.kinds("a")
            .iter()
            .filter(|k| **k == "check-health")
            .count(),
        2
    );
    s.unhealthy_green = false;
    s.run(100);
    assert_eq!(s.c.state, RunState::Succeeded);

    // Unhealthy throughout: rolled back once the window has passed, not before.
    let mut s = Sim::new(spec(window), &["a"], 2);
    s.unhealthy_green = true;
    let mut now = 0;
    while now < 2 * MIN && !s.cluster("a").phase.is_final() {
        s.run(1);
        now += 1000;
        s.at(now);
        if now < 59_000 {
            assert_ne!(s.cluster("a").phase, Phase::RollingBack, "at {now} ms");
        }
    }
    let a = s.cluster("a");
    assert_eq!(a.phase, Phase::RolledBack, "{a:?}");
    assert!(a.reason.contains("for 60s"), "{}", a.reason);
}

#[test]
fn the_header_has_no_runs_and_copy_into_makes_an_equal_copy() {
    let mut s = Sim::new(spec(serde_json::json!({})), &["a", "b", "c"], 2);
    let stored = s.c.clone();
    let h = s.c.header();
    assert!(h.stages.iter().all(|st| st.clusters.is_empty()));
    assert_eq!(h.stages.len(), s.c.stages.len());
    assert_eq!(
        Campaign {
            stages: s.c.stages.iter().map(StageRun::header).collect(),
            ..s.c.clone()
        },
        h
    );
    s.run(5);
    assert_ne!(s.c, stored);
    let mut copy = stored.clone();
    s.c.copy_into(&mut copy);
    assert_eq!(copy, s.c);
    // A different shape is copied whole.
    let mut other = Sim::new(spec(serde_json::json!({})), &["x"], 1).c;
    s.c.copy_into(&mut other);
    assert_eq!(other, s.c);
}
