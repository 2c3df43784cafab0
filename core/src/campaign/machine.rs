//! The campaign state machine. The leader's controller feeds it clock ticks, the agents' step
//! statuses and people's commands; it changes the [`Campaign`] (which the controller persists
//! before anything else) and returns the steps to send. Everything it needs to continue is in
//! the `Campaign` value, so a new leader carries on from the stored record: the step in flight
//! keeps its `seq` and is sent again, and the agent resumes it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::gates::{self, Baseline};
use super::plan::Snapshot;
use super::rollout::{self, Counts, Move};
use super::spec::{GateKind, OnUndrainable, PodAction, Spec};
use super::step::{
    BlockedPod, BlockingPdb, FailureKind, HeldNode, Step, StepKind, StepOutput, StepStatus,
};
use crate::health::Health;

/// How long an agent may take to answer a step that only talks to its API server.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How often failing health gates are checked again within their window.
pub const HEALTH_RECHECK: Duration = Duration::from_secs(2);
/// How long routing gets to move clients away before blue is touched (answers change within
/// about a second; this covers DNS caching by clients that honour the TTL).
pub const TRAFFIC_SETTLE: Duration = Duration::from_secs(5);

/// The campaign as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Moving.
    Running,
    /// Paused by a person: nothing new is sent; steps in flight finish.
    Paused,
    /// Every stage is done.
    Succeeded,
    /// A failure budget ran out.
    Failed,
    /// Aborted by a person; clusters in flight were rolled back.
    Aborted,
}

impl RunState {
    /// Whether nothing more will happen (unless retried).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Aborted
        )
    }
}

/// Where a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StagePhase {
    /// Not reached.
    Pending,
    /// Waiting on before-gate `i`.
    BeforeGate(usize),
    /// Clusters are running.
    Running,
    /// Waiting on after-gate `i`.
    AfterGate(usize),
    /// Every cluster ended within the budget and the gates passed.
    Done,
    /// The budget ran out.
    Failed,
}

/// Where one cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Phase {
    /// Not started.
    #[default]
    Pending,
    /// Picked to run.
    UpdateStarted,
    /// Looking at the pool, PDBs and quota; nothing changed yet.
    Preflight,
    /// Green is being created or grown.
    ProvisioningGreen,
    /// Waiting for green nodes Ready with their GPUs allocatable.
    WaitingGreenReady,
    /// The cluster is out of global routing for services others can serve.
    ShiftingTraffic,
    /// Cordoning blue, so evicted pods land on green.
    CordoningBlue,
    /// Draining a batch of blue nodes.
    DrainingBatch,
    /// Waiting after a batch.
    BatchSoaking,
    /// Checking the health gates.
    VerifyingHealth,
    /// Waiting after the last batch, with blue still there to come back to.
    FinalSoaking,
    /// Removing drained blue nodes.
    RetiringBlue,
    /// Green serves; blue is gone.
    Done,
    /// Undoing.
    RollingBack,
    /// Undone after a failure (counts as failed).
    RolledBack,
    /// Failed with nothing to undo, or the undo itself failed.
    Failed,
    /// Not run (left the fleet, unreachable at its turn, cannot run campaigns, aborted).
    Skipped,
}

impl Phase {
    /// Whether the cluster is finished with (for this run).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::RolledBack | Phase::Failed | Phase::Skipped
        )
    }
}

/// One cluster's run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterRun {
    /// Cluster name.
    pub name: String,
    /// Phase.
    pub phase: Phase,
    /// When the phase began (Unix ms).
    pub phase_since_ms: i64,
    /// When the cluster started and ended.
    pub started_ms: Option<i64>,
    /// When it reached a final phase.
    pub finished_ms: Option<i64>,
    /// Node counts.
    pub counts: Counts,
    /// Blue nodes in drain order (from pre-flight).
    pub blue_nodes: Vec<String>,
    /// Quarantined nodes (left cordoned with their pods; outside the rollout from then on).
    pub quarantined: Vec<String>,
    /// Pre-flight's baseline.
    pub baseline: Baseline,
    /// Nodes another maintainer holds (pre-flight).
    pub held_nodes: Vec<HeldNode>,
    /// PDBs allowing no disruption at pre-flight.
    pub blocking_pdbs: Vec<BlockingPdb>,
    /// Extra nodes allowed at once: the spec's surge, lowered to the pool's quota when
    /// pre-flight found less.
    pub surge: u32,
    /// Batches drained so far.
    pub batch: u32,
    /// Blue is cordoned.
    pub cordoned: bool,
    /// The cluster is out of global routing.
    pub traffic_shifted: bool,
    /// The step in flight, and when it must have ended (Unix ms).
    pub step: Option<Step>,
    /// Deadline of the step in flight.
    pub step_deadline_ms: Option<i64>,
    /// The last thing the agent said about the step.
    pub progress: String,
    /// Pods holding the drain now.
    pub blocked: Vec<BlockedPod>,
    /// Waiting for a person (`resume`) because a drain could not finish.
    pub held: Option<String>,
    /// A step's end that arrived while the campaign was paused, acted on when it resumes.
    pub parked: Option<StepStatus>,
    /// The final soak was cut short by `complete`.
    pub soak_skipped: bool,
    /// Failing health gates are checked again at this time (Unix ms).
    pub recheck_ms: Option<i64>,
    /// Why it failed, was skipped or rolled back.
    pub reason: String,
    /// This run counts against the failure budgets.
    pub failed: bool,
    /// Since when the cluster's agent has been unreachable mid-rollout (Unix ms).
    #[serde(default)]
    pub unreachable_since_ms: Option<i64>,
}

impl ClusterRun {
    fn new(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// Started and not final.
    pub fn active(&self) -> bool {
        !matches!(self.phase, Phase::Pending) && !self.phase.is_final()
    }

    /// Whether anything in the cluster was changed (so a failure must roll back).
    fn touched(&self) -> bool {
        self.counts.green > 0
            || self.cordoned
            || self.counts.drained > 0
            || matches!(
                self.phase,
                Phase::ProvisioningGreen | Phase::WaitingGreenReady
            )
    }
}

/// One stage's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRun {
    /// Stage name.
    pub name: String,
    /// Phase.
    pub phase: StagePhase,
    /// When the phase began (Unix ms).
    pub phase_since_ms: i64,
    /// Since when every cluster of the stage has been healthy (for `healthy` gates).
    pub healthy_since_ms: Option<i64>,
    /// Clusters at once.
    pub concurrency: u32,
    /// Failures allowed.
    pub budget: u32,
    /// The clusters, in run order.
    pub clusters: Vec<ClusterRun>,
}

impl StageRun {
    /// Clusters of the stage that failed.
    pub fn failures(&self) -> u32 {
        self.clusters.iter().filter(|c| c.failed).count() as u32
    }

    /// The stage without its clusters' runs, cloned without them.
    pub fn header(&self) -> StageRun {
        StageRun {
            name: self.name.clone(),
            phase: self.phase,
            phase_since_ms: self.phase_since_ms,
            healthy_since_ms: self.healthy_since_ms,
            concurrency: self.concurrency,
            budget: self.budget,
            clusters: Vec::new(),
        }
    }
}

/// A whole campaign: the spec and member snapshot it was created with, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    /// Id (assigned by the hub).
    pub id: String,
    /// The validated spec.
    pub spec: Spec,
    /// Members no stage selected at creation.
    pub unselected: Vec<String>,
    /// When it was created (Unix ms).
    pub created_ms: i64,
    /// Overall state.
    pub state: RunState,
    /// Why it failed or was aborted.
    pub reason: String,
    /// Aborting: clusters in flight roll back, no new ones start.
    pub aborting: bool,
    /// The stage running (or the last one).
    pub current: usize,
    /// Stages.
    pub stages: Vec<StageRun>,
    /// Failures the whole campaign allows.
    pub budget: u32,
    /// Gates approved so far.
    pub approvals: BTreeSet<String>,
    /// The next step's sequence number.
    pub next_seq: u64,
    /// When it ended (Unix ms).
    pub finished_ms: Option<i64>,
}

impl Campaign {
    /// The campaign without its clusters' runs (a record's header), cloned without them:
    /// O(stages), not O(clusters).
    pub fn header(&self) -> Campaign {
        Campaign {
            id: self.id.clone(),
            spec: self.spec.clone(),
            unselected: self.unselected.clone(),
            created_ms: self.created_ms,
            state: self.state,
            reason: self.reason.clone(),
            aborting: self.aborting,
            current: self.current,
            stages: self.stages.iter().map(StageRun::header).collect(),
            budget: self.budget,
            approvals: self.approvals.clone(),
            next_seq: self.next_seq,
            finished_ms: self.finished_ms,
        }
    }

    /// Make `other` equal to this campaign, cloning only the cluster runs that differ (how a
    /// controller keeps its copy of what is stored after each write: a write changes a few
    /// runs, and cloning every run each time grew with the fleet times its steps).
    pub fn copy_into(&self, other: &mut Campaign) {
        let same_shape = other.stages.len() == self.stages.len()
            && other
                .stages
                .iter()
                .zip(&self.stages)
                .all(|(a, b)| a.clusters.len() == b.clusters.len());
        if !same_shape {
            *other = self.clone();
            return;
        }
        let mut stages = std::mem::take(&mut other.stages);
        *other = self.header();
        for (dst, src) in stages.iter_mut().zip(&self.stages) {
            let mut runs = std::mem::take(&mut dst.clusters);
            for (d, s) in runs.iter_mut().zip(&src.clusters) {
                if d != s {
                    *d = s.clone();
                }
            }
            *dst = src.header();
            dst.clusters = runs;
        }
        other.stages = stages;
    }
}

/// What a member looks like to the campaign now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberInfo {
    /// Health as the hub judges it.
    pub health: Health,
    /// Its agent can run campaign steps (the executor's permissions were installed).
    pub campaigns: bool,
}

/// What the machine sees of the world at each call.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// Now, Unix ms (the injected clock).
    pub now_ms: i64,
    /// The leader's term, stamped on every step.
    pub term: u64,
    /// Members by name; a missing one is not a member any more.
    pub members: &'a BTreeMap<String, MemberInfo>,
}

/// Something to do outside the machine, after the campaign is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this step to this cluster's agent.
    Send {
        /// Cluster.
        cluster: String,
        /// The step.
        step: Step,
    },
}

/// A person's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Approve a gate by name, or (`None`) the gate the campaign waits on.
    Approve(Option<String>),
    /// Send nothing new until resumed.
    Pause,
    /// Continue; clusters held by an undrainable node retry their drain.
    Resume,
    /// Roll back clusters in flight and start no more.
    Abort,
    /// Roll back clusters inside their final soak (one, or all of them).
    Rollback(Option<String>),
    /// Run failed and skipped clusters again with the same snapshot.
    Retry,
    /// Skip the rest of the final soak.
    Complete,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The campaign's state does not allow it.
    #[error("{0}")]
    NotNow(String),
    /// It names something the campaign does not have.
    #[error("{0}")]
    NotFound(String),
}

impl Campaign {
    /// A new campaign over `snapshot`, not yet started.
    pub fn new(id: String, spec: Spec, snapshot: Snapshot, now_ms: i64) -> Self {
        let stages = spec
            .stages
            .iter()
            .zip(snapshot.stages)
            .map(|(s, p)| StageRun {
                name: s.name.clone(),
                phase: StagePhase::Pending,
                phase_since_ms: now_ms,
                healthy_since_ms: None,
                concurrency: p.concurrency,
                budget: p.budget,
                clusters: p.clusters.into_iter().map(ClusterRun::new).collect(),
            })
            .collect();
        Self {
            id,
            spec,
            unselected: snapshot.unselected,
            created_ms: now_ms,
            state: RunState::Running,
            reason: String::new(),
            aborting: false,
            current: 0,
            stages,
            budget: snapshot.budget,
            approvals: BTreeSet::new(),
            next_seq: 1,
            finished_ms: None,
        }
    }

    /// Failures so far in the whole campaign.
    pub fn failures(&self) -> u32 {
        self.stages.iter().map(StageRun::failures).sum()
    }

    /// Every cluster run, with its stage index.
    pub fn clusters(&self) -> impl Iterator<Item = (usize, &ClusterRun)> {
        self.stages
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.clusters.iter().map(move |c| (i, c)))
    }

    fn find(&mut self, cluster: &str) -> Option<(usize, usize)> {
        self.stages.iter().enumerate().find_map(|(i, s)| {
            s.clusters
                .iter()
                .position(|c| c.name == cluster)
                .map(|j| (i, j))
        })
    }

    /// The steps in flight, to send again after a reconnect or a leader change.
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, &Step)> {
        self.clusters()
            .filter_map(|(_, c)| c.step.as_ref().map(|s| (c.name.as_str(), s)))
    }

    /// Clusters whose traffic is shifted away now.
    pub fn shifted_away(&self) -> impl Iterator<Item = &str> {
        self.clusters()
            .filter(|(_, c)| c.traffic_shifted)
            .map(|(_, c)| c.name.as_str())
    }

    /// The gates the campaign waits on for an approval now.
    pub fn waiting_approvals(&self) -> Vec<String> {
        let Some(stage) = self.stages.get(self.current) else {
            return Vec::new();
        };
        let spec = &self.spec.stages[self.current];
        let gate = match stage.phase {
            StagePhase::BeforeGate(i) => spec.before_gates.get(i),
            StagePhase::AfterGate(i) => spec.after_gates.get(i),
            _ => None,
        };
        gate.filter(|g| g.kind == GateKind::Approval && !self.approvals.contains(&g.name))
            .map(|g| vec![g.name.clone()])
            .unwrap_or_default()
    }

    /// An agent's word on a step. Statuses for a step no longer in flight are ignored.
    pub fn on_status(
        &mut self,
        ctx: &Ctx<'_>,
        cluster: &str,
        seq: u64,
        status: StepStatus,
    ) -> Vec<Action> {
        let Some((i, j)) = self.find(cluster) else {
            return Vec::new();
        };
        let c = &mut self.stages[i].clusters[j];
        if c.step.as_ref().map(|s| s.seq) != Some(seq) || c.parked.is_some() {
            return Vec::new();
        }
        match status {
            StepStatus::Accepted => c.progress = "accepted".into(),
            StepStatus::Progress { message, blocked } => {
                c.progress = message;
                c.blocked = blocked;
            }
            // While paused the step's end waits, so nothing follows it until resume.
            end => {
                c.parked = Some(end);
                return self.tick(ctx);
            }
        }
        Vec::new()
    }

    /// Act on a finished step.
    fn settle(&mut self, ctx: &Ctx<'_>, (i, j): (usize, usize), actions: &mut Vec<Action>) {
        let c = &mut self.stages[i].clusters[j];
        if c.parked.is_none() {
            return;
        }
        let (Some(end), Some(step)) = (c.parked.take(), c.step.take()) else {
            return;
        };
        c.step_deadline_ms = None;
        match end {
            StepStatus::Done(out) => {
                c.blocked.clear();
                c.progress.clear();
                self.step_done(ctx, (i, j), step.kind, out, actions);
            }
            StepStatus::Failed {
                kind,
                reason,
                blocked,
            } => {
                c.blocked = blocked;
                self.step_failed(ctx, (i, j), &step.kind, kind, reason, actions);
            }
            StepStatus::Accepted | StepStatus::Progress { .. } => {}
        }
    }

    /// A person's command; the steps it causes.
    pub fn command(&mut self, ctx: &Ctx<'_>, cmd: Command) -> Result<Vec<Action>, Refusal> {
        let mut actions = Vec::new();
        let over = |what: &str| {
            Refusal::NotNow(format!(
                "the campaign has ended ({:?}); {what} has nothing to act on",
                self.state
            ))
        };
        match cmd {
            Command::Approve(gate) => {
                if self.state.is_final() {
                    return Err(over("approve"));
                }
                let name = match gate {
                    Some(g) => {
                        if self.spec.gate(&g).is_none() {
                            return Err(Refusal::NotFound(format!(
                                "the campaign has no gate named {g:?}"
                            )));
                        }
                        g
                    }
                    None => self.waiting_approvals().into_iter().next().ok_or_else(|| {
                        Refusal::NotNow(
                            "no approval gate is waiting now; name one with --gate to approve it ahead"
                                .into(),
                        )
                    })?,
                };
                self.approvals.insert(name);
            }
            Command::Pause => match self.state {
                RunState::Running => self.state = RunState::Paused,
                RunState::Paused => {}
                _ => return Err(over("pause")),
            },
            Command::Resume => {
                if self.state.is_final() {
                    return Err(over("resume"));
                }
                self.state = RunState::Running;
                for (i, j) in self.positions() {
                    let c = &mut self.stages[i].clusters[j];
                    if c.held.take().is_some() && c.phase == Phase::DrainingBatch {
                        // The drain is sent again with a new seq: the agent starts it afresh.
                        self.next((i, j), ctx, &mut actions);
                    }
                }
            }
            Command::Abort => {
                if self.state.is_final() {
                    return Err(over("abort"));
                }
                self.aborting = true;
                self.state = RunState::Running;
                for (i, j) in self.positions() {
                    let c = &mut self.stages[i].clusters[j];
                    if c.phase == Phase::Pending {
                        finish(c, Phase::Skipped, "the campaign was aborted", ctx.now_ms);
                    } else if c.active() && c.phase != Phase::RollingBack {
                        let why = "the campaign was aborted".to_string();
                        self.roll_back((i, j), ctx, why, false, &mut actions);
                    }
                }
            }
            Command::Rollback(cluster) => {
                let targets: Vec<(usize, usize)> = self
                    .positions()
                    .into_iter()
                    .filter(|&(i, j)| {
                        let c = &self.stages[i].clusters[j];
                        c.phase == Phase::FinalSoaking
                            && cluster.as_ref().is_none_or(|n| *n == c.name)
                    })
                    .collect();
                if targets.is_empty() {
                    return Err(match cluster {
                        Some(n) if self.clusters().all(|(_, c)| c.name != n) => {
                            Refusal::NotFound(format!("the campaign has no cluster {n:?}"))
                        }
                        Some(n) => Refusal::NotNow(format!(
                            "{n} is not in its final soak: a rollback is possible only while blue is still there"
                        )),
                        None => Refusal::NotNow("no cluster is in its final soak".into()),
                    });
                }
                for at in targets {
                    let why = "rolled back by request".to_string();
                    self.roll_back(at, ctx, why, false, &mut actions);
                }
            }
            Command::Retry => {
                if !matches!(self.state, RunState::Failed | RunState::Succeeded) {
                    return Err(Refusal::NotNow(format!(
                        "retry is for a campaign that has ended ({:?} now)",
                        self.state
                    )));
                }
                let again: Vec<(usize, usize)> = self
                    .positions()
                    .into_iter()
                    .filter(|&(i, j)| {
                        let c = &self.stages[i].clusters[j];
                        matches!(c.phase, Phase::Failed | Phase::RolledBack | Phase::Skipped)
                    })
                    .collect();
                let Some(&(first, _)) = again.first() else {
                    return Err(Refusal::NotNow(
                        "no cluster failed or was skipped: nothing to retry".into(),
                    ));
                };
                for &(i, j) in &again {
                    let c = &mut self.stages[i].clusters[j];
                    *c = ClusterRun::new(std::mem::take(&mut c.name));
                    self.stages[i].phase = StagePhase::Running;
                    self.stages[i].phase_since_ms = ctx.now_ms;
                }
                self.current = first;
                self.state = RunState::Running;
                self.reason.clear();
                self.finished_ms = None;
            }
            Command::Complete => {
                let mut any = false;
                for (i, j) in self.positions() {
                    let c = &mut self.stages[i].clusters[j];
                    if c.phase == Phase::FinalSoaking {
                        c.soak_skipped = true;
                        any = true;
                    }
                }
                if !any {
                    return Err(Refusal::NotNow("no cluster is in its final soak".into()));
                }
            }
        }
        actions.extend(self.tick(ctx));
        Ok(actions)
    }

    fn positions(&self) -> Vec<(usize, usize)> {
        self.stages
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.clusters.len()).map(move |j| (i, j)))
            .collect()
    }

    /// Advance with the clock: gates, soaks, deadlines, new clusters. Call it on every tick and
    /// after anything changed.
    pub fn tick(&mut self, ctx: &Ctx<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state != RunState::Running {
            return actions;
        }
        // Each pass moves at least one thing or ends the loop; the bound is a guard.
        for _ in 0..10_000 {
            let before = self.fingerprint();
            self.pass(ctx, &mut actions);
            if self.fingerprint() == before {
                break;
            }
        }
        actions
    }

    /// What a pass can change that another pass may act on.
    fn fingerprint(&self) -> (RunState, usize, u64, Vec<StagePhase>, Vec<(Phase, bool)>) {
        (
            self.state,
            self.current,
            self.next_seq,
            self.stages.iter().map(|s| s.phase).collect(),
            self.clusters()
                .map(|(_, c)| (c.phase, c.step.is_some() && c.parked.is_none()))
                .collect(),
        )
    }

    fn pass(&mut self, ctx: &Ctx<'_>, actions: &mut Vec<Action>) {
        if self.state != RunState::Running {
            return;
        }
        let now = ctx.now_ms;
        // Clusters in flight advance in every stage (a retry or abort can leave some behind
        // the current stage).
        for (i, j) in self.positions() {
            self.settle(ctx, (i, j), actions);
            self.advance((i, j), ctx, actions);
        }
        if self.aborting {
            if self.clusters().all(|(_, c)| !c.active()) {
                self.end(RunState::Aborted, "aborted by request".into(), now);
            }
            return;
        }
        let i = self.current;
        let spec = self.spec.stages[i].clone();
        let campaign_over_budget = self.failures() > self.budget;
        let stage = &mut self.stages[i];
        let healthy = stage.clusters.iter().all(|c| {
            c.phase == Phase::Skipped
                || ctx
                    .members
                    .get(&c.name)
                    .is_some_and(|m| m.health == Health::Ready)
        });
        match (healthy, stage.healthy_since_ms) {
            (true, None) => stage.healthy_since_ms = Some(now),
            (false, Some(_)) => stage.healthy_since_ms = None,
            _ => {}
        }
        let gate_passed =
            |gate: &super::spec::Gate, since: i64, healthy_since: Option<i64>| match gate.kind {
                GateKind::Approval => self.approvals.contains(&gate.name),
                GateKind::Wait(d) => now >= since + d.as_millis() as i64,
                GateKind::Healthy(d) => {
                    healthy_since.is_some_and(|h| now >= h.max(since) + d.as_millis() as i64)
                }
            };
        let set = |stage: &mut StageRun, phase| {
            stage.phase = phase;
            stage.phase_since_ms = now;
        };
        match stage.phase {
            StagePhase::Pending => {
                let next = match spec.before_gates.is_empty() {
                    true => StagePhase::Running,
                    false => StagePhase::BeforeGate(0),
                };
                set(stage, next);
            }
            StagePhase::BeforeGate(g) => {
                if gate_passed(
                    &spec.before_gates[g],
                    stage.phase_since_ms,
                    stage.healthy_since_ms,
                ) {
                    let next = match g + 1 < spec.before_gates.len() {
                        true => StagePhase::BeforeGate(g + 1),
                        false => StagePhase::Running,
                    };
                    set(stage, next);
                }
            }
            StagePhase::Running => {
                let over_budget = stage.failures() > stage.budget || campaign_over_budget;
                if !over_budget {
                    // Start clusters up to the stage's concurrency, in order.
                    let mut active = stage.clusters.iter().filter(|c| c.active()).count() as u32;
                    for c in stage.clusters.iter_mut() {
                        if active >= stage.concurrency {
                            break;
                        }
                        if c.phase != Phase::Pending {
                            continue;
                        }
                        match ctx.members.get(&c.name) {
                            None => {
                                finish(c, Phase::Skipped, "no longer a member of the fleet", now)
                            }
                            Some(m) if m.health == Health::Left => {
                                finish(c, Phase::Skipped, "left the fleet", now)
                            }
                            Some(m) if m.health == Health::Unreachable => finish(
                                c,
                                Phase::Skipped,
                                "unreachable when its turn came (retry runs it again)",
                                now,
                            ),
                            Some(m) if !m.campaigns => finish(
                                c,
                                Phase::Skipped,
                                "its agent cannot run campaigns (the campaign permissions are not installed)",
                                now,
                            ),
                            Some(_) => {
                                set_phase(c, Phase::UpdateStarted, now);
                                c.started_ms = Some(now);
                                active += 1;
                            }
                        }
                    }
                }
                let settled = stage.clusters.iter().all(|c| c.phase.is_final())
                    || (over_budget && !stage.clusters.iter().any(|c| c.active()));
                if settled {
                    if over_budget {
                        let reason = if stage.failures() > stage.budget {
                            format!(
                                "stage {}: {} cluster(s) failed, over its failure budget of {}",
                                stage.name,
                                stage.failures(),
                                stage.budget
                            )
                        } else {
                            format!(
                                "{} cluster(s) failed, over the campaign's failure budget of {}",
                                self.failures(),
                                self.budget
                            )
                        };
                        let stage = &mut self.stages[i];
                        set(stage, StagePhase::Failed);
                        self.end(RunState::Failed, reason, now);
                        return;
                    }
                    let next = match spec.after_gates.is_empty() {
                        true => StagePhase::Done,
                        false => StagePhase::AfterGate(0),
                    };
                    set(stage, next);
                }
            }
            StagePhase::AfterGate(g) => {
                if gate_passed(
                    &spec.after_gates[g],
                    stage.phase_since_ms,
                    stage.healthy_since_ms,
                ) {
                    let next = match g + 1 < spec.after_gates.len() {
                        true => StagePhase::AfterGate(g + 1),
                        false => StagePhase::Done,
                    };
                    set(stage, next);
                }
            }
            StagePhase::Done => {
                // The next stage not already done (a retry can leave later ones done).
                match (i + 1..self.stages.len()).find(|&k| self.stages[k].phase != StagePhase::Done)
                {
                    Some(k) => self.current = k,
                    None => self.end(RunState::Succeeded, String::new(), now),
                }
            }
            StagePhase::Failed => {}
        }
    }

    fn end(&mut self, state: RunState, reason: String, now: i64) {
        self.state = state;
        self.reason = reason;
        self.finished_ms = Some(now);
        self.aborting = false;
    }

    fn send(
        &mut self,
        (i, j): (usize, usize),
        ctx: &Ctx<'_>,
        kind: StepKind,
        actions: &mut Vec<Action>,
    ) {
        let timeout = match &kind {
            StepKind::WaitGreenReady { timeout, .. } => *timeout + STEP_TIMEOUT,
            StepKind::DrainBatch { rules, .. } => {
                // The agent enforces each node's timeout; this bounds a silent agent.
                let wait = rules
                    .pod_rules
                    .iter()
                    .map(|r| match r.action {
                        PodAction::WaitCompleted(d) => d,
                        PodAction::Skip => Duration::ZERO,
                    })
                    .max()
                    .unwrap_or_default();
                let force = match rules.on_undrainable {
                    OnUndrainable::ForceAfter(d) => d,
                    _ => Duration::ZERO,
                };
                rules.timeout_per_node + wait + force + STEP_TIMEOUT
            }
            StepKind::RollBack { rules, .. } => {
                self.spec.green_ready_timeout + rules.timeout_per_node + STEP_TIMEOUT
            }
            _ => STEP_TIMEOUT,
        };
        let step = Step {
            campaign: self.id.clone(),
            seq: self.next_seq,
            term: ctx.term,
            kind,
        };
        self.next_seq += 1;
        let c = &mut self.stages[i].clusters[j];
        c.step = Some(step.clone());
        c.step_deadline_ms = Some(ctx.now_ms + timeout.as_millis() as i64);
        c.progress = "sent".into();
        actions.push(Action::Send {
            cluster: c.name.clone(),
            step,
        });
    }

    /// Move one cluster on if it is not waiting for a step.
    fn advance(&mut self, at: (usize, usize), ctx: &Ctx<'_>, actions: &mut Vec<Action>) {
        let now = ctx.now_ms;
        let (i, j) = at;
        let c = &self.stages[i].clusters[j];
        if !c.active() || c.held.is_some() {
            return;
        }
        // An agent cut off from the hub (partitioned, or down) for too long: the cluster fails
        // where it is. Nothing can be done or undone there until it is back (`retry`).
        let unreachable = ctx
            .members
            .get(&c.name)
            .is_some_and(|m| m.health == Health::Unreachable);
        let timeout = self.spec.unreachable_timeout;
        let c = &mut self.stages[i].clusters[j];
        if !unreachable {
            c.unreachable_since_ms = None;
        } else {
            let since = *c.unreachable_since_ms.get_or_insert(now);
            if now >= since + timeout.as_millis() as i64 {
                c.step = None;
                c.step_deadline_ms = None;
                c.failed = true;
                let reason = format!(
                    "its agent was unreachable for {}s during {:?}; left as it was (retry runs it again)",
                    timeout.as_secs(),
                    c.phase
                );
                finish(c, Phase::Failed, &reason, now);
                return;
            }
        }
        let c = &self.stages[i].clusters[j];
        // A step in flight: wait for it, or for its deadline.
        if let (Some(step), Some(deadline)) = (&c.step, c.step_deadline_ms) {
            if now >= deadline {
                let kind = step.kind.clone();
                let reason = format!(
                    "the agent did not finish {} in time (unreachable, or stuck)",
                    kind.name()
                );
                let c = &mut self.stages[i].clusters[j];
                c.step = None;
                c.step_deadline_ms = None;
                self.step_failed(ctx, at, &kind, FailureKind::Other, reason, actions);
            }
            return;
        }
        // A cluster that left the fleet mid-run cannot be finished or undone from here.
        if ctx
            .members
            .get(&c.name)
            .is_none_or(|m| m.health == Health::Left)
        {
            let c = &mut self.stages[i].clusters[j];
            finish(c, Phase::Skipped, "left the fleet during its rollout", now);
            return;
        }
        let spec = &self.spec;
        let pool = spec.pool.clone();
        let green = spec.green.clone();
        let since = c.phase_since_ms;
        let elapsed = |d: Duration| now >= since + d.as_millis() as i64;
        match c.phase {
            Phase::UpdateStarted => {
                set_phase(&mut self.stages[i].clusters[j], Phase::Preflight, now);
                self.send(at, ctx, StepKind::Preflight { pool, green }, actions);
            }
            // These wait for their step's answer (handled in `step_done`).
            Phase::Preflight
            | Phase::ProvisioningGreen
            | Phase::WaitingGreenReady
            | Phase::CordoningBlue
            | Phase::RetiringBlue => {}
            Phase::ShiftingTraffic => {
                if elapsed(TRAFFIC_SETTLE) {
                    self.next(at, ctx, actions);
                }
            }
            Phase::DrainingBatch => {}
            Phase::VerifyingHealth => {
                if c.recheck_ms.is_some_and(|t| now >= t) {
                    self.stages[i].clusters[j].recheck_ms = None;
                    self.send(at, ctx, StepKind::CheckHealth { pool, green }, actions);
                }
            }
            Phase::BatchSoaking => {
                if elapsed(self.spec.batch_soak) {
                    set_phase(&mut self.stages[i].clusters[j], Phase::VerifyingHealth, now);
                    self.send(at, ctx, StepKind::CheckHealth { pool, green }, actions);
                }
            }
            Phase::FinalSoaking => {
                if c.soak_skipped || elapsed(self.spec.final_soak) {
                    let c = &mut self.stages[i].clusters[j];
                    let rest: Vec<String> = c
                        .blue_nodes
                        .iter()
                        .filter(|n| !c.quarantined.contains(n))
                        .skip((c.counts.retired as usize).saturating_sub(c.quarantined.len()))
                        .cloned()
                        .collect();
                    set_phase(c, Phase::RetiringBlue, now);
                    self.send(
                        at,
                        ctx,
                        StepKind::RetireBlue {
                            pool,
                            nodes: rest,
                            last: true,
                        },
                        actions,
                    );
                }
            }
            Phase::Pending
            | Phase::Done
            | Phase::RolledBack
            | Phase::Failed
            | Phase::Skipped
            | Phase::RollingBack => {}
        }
    }

    /// The next move after a step, from the counts.
    fn next(&mut self, at: (usize, usize), ctx: &Ctx<'_>, actions: &mut Vec<Action>) {
        let now = ctx.now_ms;
        let (i, j) = at;
        let spec = &self.spec;
        let c = &self.stages[i].clusters[j];
        let (pool, green, rules) = (spec.pool.clone(), spec.green.clone(), spec.drain.clone());
        let batch = spec.batch_size(c.counts.blue);
        let surge = c.surge;
        // Before blue is touched: traffic away, then blue cordoned.
        if c.counts.green > 0
            && spec.traffic_shift
            && !c.traffic_shifted
            && c.counts.drained < c.counts.blue
        {
            let c = &mut self.stages[i].clusters[j];
            c.traffic_shifted = true;
            set_phase(c, Phase::ShiftingTraffic, now);
            return;
        }
        if c.counts.green > 0 && !c.cordoned {
            let nodes: Vec<String> = c.blue_nodes.clone();
            set_phase(&mut self.stages[i].clusters[j], Phase::CordoningBlue, now);
            self.send(at, ctx, StepKind::CordonBlue { nodes }, actions);
            return;
        }
        match rollout::next_move(c.counts, batch, surge) {
            Move::Provision { to } => {
                set_phase(
                    &mut self.stages[i].clusters[j],
                    Phase::ProvisioningGreen,
                    now,
                );
                self.send(
                    at,
                    ctx,
                    StepKind::ProvisionGreen {
                        pool,
                        green,
                        target: to,
                    },
                    actions,
                );
            }
            Move::Drain { count } => {
                let c = &mut self.stages[i].clusters[j];
                let from = c.counts.drained as usize;
                let nodes = c.blue_nodes[from..from + count as usize].to_vec();
                let index = c.batch;
                set_phase(c, Phase::DrainingBatch, now);
                self.send(
                    at,
                    ctx,
                    StepKind::DrainBatch {
                        index,
                        nodes,
                        rules,
                    },
                    actions,
                );
            }
            Move::Retire { count } => {
                let c = &mut self.stages[i].clusters[j];
                let nodes: Vec<String> = retirable(c).take(count as usize).cloned().collect();
                set_phase(c, Phase::RetiringBlue, now);
                self.send(
                    at,
                    ctx,
                    StepKind::RetireBlue {
                        pool,
                        nodes,
                        last: false,
                    },
                    actions,
                );
            }
            Move::Finish => {
                // Health gates passed after the last batch: traffic comes back, then the
                // final soak with blue still there.
                let c = &mut self.stages[i].clusters[j];
                c.traffic_shifted = false;
                set_phase(c, Phase::FinalSoaking, now);
            }
        }
    }

    fn step_done(
        &mut self,
        ctx: &Ctx<'_>,
        at: (usize, usize),
        kind: StepKind,
        out: StepOutput,
        actions: &mut Vec<Action>,
    ) {
        let now = ctx.now_ms;
        let (i, j) = at;
        let c = &mut self.stages[i].clusters[j];
        match (kind, out) {
            (StepKind::Preflight { .. }, StepOutput::Preflight(p)) => {
                match record_preflight(&self.spec, c, p) {
                    Some((phase, why)) => {
                        c.failed = phase == Phase::Failed;
                        finish(c, phase, &why, now);
                    }
                    None => self.next(at, ctx, actions),
                }
            }
            (StepKind::ProvisionGreen { green, target, .. }, _) => {
                set_phase(c, Phase::WaitingGreenReady, now);
                let timeout = self.spec.green_ready_timeout;
                let kind = StepKind::WaitGreenReady {
                    green,
                    target,
                    timeout,
                };
                self.send(at, ctx, kind, actions);
            }
            (StepKind::WaitGreenReady { target, .. }, _) => {
                c.counts.green = target;
                self.next(at, ctx, actions);
            }
            (StepKind::CordonBlue { .. }, _) => {
                c.cordoned = true;
                self.next(at, ctx, actions);
            }
            (StepKind::DrainBatch { nodes, .. }, out) => {
                let quarantined = match out {
                    StepOutput::Drain(d) => d.quarantined,
                    _ => Vec::new(),
                };
                c.counts.drained += nodes.len() as u32;
                // A quarantined node stays, with its pods, outside the rollout from now on.
                c.counts.retired += quarantined.len() as u32;
                c.quarantined.extend(quarantined);
                c.batch += 1;
                if c.quarantined.len() as u32 > self.spec.drain.max_blocked_nodes {
                    let reason = format!(
                        "{} node(s) quarantined, over maxBlockedNodes {}",
                        c.quarantined.len(),
                        self.spec.drain.max_blocked_nodes
                    );
                    self.roll_back(at, ctx, reason, true, actions);
                    return;
                }
                set_phase(c, Phase::BatchSoaking, now);
            }
            (StepKind::CheckHealth { .. }, StepOutput::Health(h)) => {
                match gates::judge(&self.spec.health, &c.baseline, &c.counts, &h) {
                    Ok(()) => {
                        c.progress.clear();
                        self.next(at, ctx, actions)
                    }
                    // Pods may still be starting: look again until the window closes.
                    Err(failed)
                        if now + (HEALTH_RECHECK.as_millis() as i64)
                            < c.phase_since_ms + self.spec.health.window.as_millis() as i64 =>
                    {
                        c.progress = format!("health gates not met yet: {}", failed.join("; "));
                        c.recheck_ms = Some(now + HEALTH_RECHECK.as_millis() as i64);
                    }
                    Err(failed) => {
                        let reason = format!(
                            "health gates failed for {}s after batch {}: {}",
                            self.spec.health.window.as_secs(),
                            c.batch,
                            failed.join("; ")
                        );
                        self.roll_back(at, ctx, reason, true, actions);
                    }
                }
            }
            (StepKind::RetireBlue { nodes, last, .. }, _) => {
                if last {
                    c.counts.retired = c.counts.blue;
                    finish(c, Phase::Done, "", now);
                } else {
                    c.counts.retired += nodes.len() as u32;
                    self.next(at, ctx, actions);
                }
            }
            (StepKind::RollBack { .. }, _) => {
                c.counts.green = 0;
                c.cordoned = false;
                c.traffic_shifted = false;
                let reason = c.reason.clone();
                finish(c, Phase::RolledBack, &reason, now);
            }
            (kind, out) => {
                let reason = format!("the agent answered {} with {out:?}", kind.name());
                self.roll_back(at, ctx, reason, true, actions);
            }
        }
    }

    fn step_failed(
        &mut self,
        ctx: &Ctx<'_>,
        at: (usize, usize),
        step: &StepKind,
        kind: FailureKind,
        reason: String,
        actions: &mut Vec<Action>,
    ) {
        let (i, j) = at;
        let c = &mut self.stages[i].clusters[j];
        if matches!(step, StepKind::RollBack { .. }) {
            c.failed = true;
            finish(
                c,
                Phase::Failed,
                &format!("{}; the rollback failed too: {reason}", c.reason),
                ctx.now_ms,
            );
            return;
        }
        if kind == FailureKind::Undrainable
            && self.spec.drain.on_undrainable == OnUndrainable::Pause
            && !self.aborting
        {
            c.held = Some(format!("{reason} (resume retries the drain)"));
            c.progress = "paused: undrainable".into();
            return;
        }
        self.roll_back(at, ctx, format!("{}: {reason}", step.name()), true, actions);
    }

    /// Fail or undo a cluster. `failure` counts it against the budgets.
    fn roll_back(
        &mut self,
        at: (usize, usize),
        ctx: &Ctx<'_>,
        reason: String,
        failure: bool,
        actions: &mut Vec<Action>,
    ) {
        let (i, j) = at;
        let c = &mut self.stages[i].clusters[j];
        c.failed |= failure;
        c.held = None;
        if !c.touched() {
            let phase = if failure {
                Phase::Failed
            } else {
                Phase::Skipped
            };
            finish(
                c,
                phase,
                &format!("{reason}; nothing was changed"),
                ctx.now_ms,
            );
            return;
        }
        c.reason = reason;
        let blue = c.counts.blue;
        set_phase(c, Phase::RollingBack, ctx.now_ms);
        let kind = StepKind::RollBack {
            pool: self.spec.pool.clone(),
            green: self.spec.green.clone(),
            blue,
            rules: self.spec.drain.clone(),
        };
        self.send(at, ctx, kind, actions);
    }
}

/// Take in pre-flight's findings; `Some` when the cluster ends here (skipped, or failed
/// before anything was changed).
fn record_preflight(
    spec: &Spec,
    c: &mut ClusterRun,
    p: super::step::PreflightReport,
) -> Option<(Phase, String)> {
    c.baseline = Baseline::from(&p);
    c.held_nodes = p.held;
    c.blocking_pdbs = p.blocking_pdbs;
    if let Some(why) = p.unsupported {
        return Some((Phase::Skipped, why));
    }
    if p.blue_nodes.is_empty() {
        return Some((
            Phase::Skipped,
            "the pool has no blue nodes to replace".into(),
        ));
    }
    c.blue_nodes = p.blue_nodes;
    c.counts = Counts {
        blue: c.blue_nodes.len() as u32,
        ..Counts::default()
    };
    c.surge = spec.surge_nodes(c.counts.blue);
    // A GPU SKU's quota is often below a classic blue-green's doubling: roll within what the
    // quota allows rather than fail.
    match p.quota_headroom {
        Some(0) => {
            return Some((
                Phase::Failed,
                "pre-flight: the pool's quota allows no extra node; nothing was changed".into(),
            ));
        }
        Some(q) if q < c.surge => {
            c.reason = format!(
                "surge lowered from {} to {q} node(s): the pool's quota allows no more",
                c.surge
            );
            c.surge = q;
        }
        _ => {}
    }
    None
}

impl Campaign {
    /// A dry run's view of one cluster: pre-flight's findings recorded, and where the cluster
    /// would end if pre-flight alone decides it (skipped, or failed on quota).
    pub fn preview(&mut self, cluster: &str, report: super::step::PreflightReport) {
        let Some((i, j)) = self.find(cluster) else {
            return;
        };
        let spec = self.spec.clone();
        let c = &mut self.stages[i].clusters[j];
        if let Some((phase, why)) = record_preflight(&spec, c, report) {
            c.phase = phase;
            c.reason = why;
        }
    }
}

fn retirable(c: &ClusterRun) -> impl Iterator<Item = &String> {
    let drained = c.counts.drained as usize;
    c.blue_nodes[..drained.min(c.blue_nodes.len())]
        .iter()
        .filter(|n| !c.quarantined.contains(n))
        .skip((c.counts.retired as usize).saturating_sub(c.quarantined.len()))
}

fn set_phase(c: &mut ClusterRun, phase: Phase, now: i64) {
    if c.phase != phase {
        c.phase = phase;
        c.phase_since_ms = now;
    }
}

fn finish(c: &mut ClusterRun, phase: Phase, reason: &str, now: i64) {
    set_phase(c, phase, now);
    if !reason.is_empty() {
        c.reason = reason.to_string();
    }
    c.finished_ms = Some(now);
    c.step = None;
    c.step_deadline_ms = None;
    c.traffic_shifted = false;
}

#[cfg(test)]
mod tests;
