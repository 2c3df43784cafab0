//! The campaign spec: what a user writes (`RawSpec`, deserialized from YAML or JSON with unknown
//! fields denied) and what the controller runs ([`Spec`], validated, with every default filled
//! in). Validation names the field path of the first problem (`stages[1].maxConcurrency`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// A spec problem: the field path and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// Field path, as the spec spells it (`blueGreen.batch`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// A count or a percentage, as written: `3`, `"3"` or `"25%"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawAmount {
    /// A bare number.
    Number(u64),
    /// `"3"` or `"25%"`.
    Text(String),
}

/// A count, or a percentage of some total resolved when it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Amount {
    /// Exactly this many.
    Count(u32),
    /// This percentage (0–100) of a total.
    Percent(u32),
}

/// How a percentage is rounded to a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Down, as Fleet's and KubeFleet's `maxConcurrency` do.
    Down,
    /// Up, as AKS's `drainBatchSize` and Fleet's `maxAllowedFailures` do.
    Up,
}

impl Amount {
    /// Parse `text` (at `field`); percentages above 100 are refused.
    pub fn parse(field: &str, raw: &RawAmount) -> Result<Self, SpecError> {
        let text = match raw {
            RawAmount::Number(n) => {
                return u32::try_from(*n)
                    .map(Amount::Count)
                    .or_else(|_| err(field, format!("{n} is too large")));
            }
            RawAmount::Text(t) => t.trim(),
        };
        let bad = || SpecError {
            field: field.to_string(),
            reason: format!("{text:?} is not a count (3) or a percentage (25%)"),
        };
        match text.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| bad())?;
                if p > 100 {
                    return err(field, format!("{p}% is over 100%"));
                }
                Ok(Amount::Percent(p))
            }
            None => text.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }

    /// The count this amount stands for out of `total`, rounded as `round` says.
    pub fn of(self, total: u32, round: Round) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => {
                let scaled = u64::from(total) * u64::from(p);
                let n = match round {
                    Round::Down => scaled / 100,
                    Round::Up => scaled.div_ceil(100),
                };
                n as u32
            }
        }
    }

    /// As written: `3` or `25%`.
    pub fn describe(self) -> String {
        match self {
            Amount::Count(n) => n.to_string(),
            Amount::Percent(p) => format!("{p}%"),
        }
    }
}

/// Which nodes of each cluster are the blue pool.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPool {
    /// The pool's name (the node label `flotilla.io/pool`, as the inventory reports pools).
    #[serde(default)]
    pub name: Option<String>,
    /// The Cluster API MachineDeployment whose machines are the pool.
    #[serde(default)]
    pub machine_deployment: Option<String>,
    /// A node label selector.
    #[serde(default)]
    pub node_selector: Option<Selector>,
}

/// How green comes to exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawGreen {
    /// A new MachineDeployment cloned from blue with these template changes.
    #[serde(default)]
    pub cluster_api: Option<RawClusterApi>,
    /// Something else provisions green; wait for nodes that match.
    #[serde(default)]
    pub external: Option<RawExternal>,
}

/// The `clusterApi` provisioner's changes to blue's template.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawClusterApi {
    /// `spec.template.spec.version` (the Kubernetes version).
    #[serde(default)]
    pub version: Option<String>,
    /// Fields of `spec.template.spec` to set, as a JSON merge patch.
    #[serde(default)]
    pub template: Option<serde_json::Value>,
    /// The green MachineDeployment's name (default: blue's with `-green`).
    #[serde(default)]
    pub name: Option<String>,
}

/// The `external` provisioner: nodes that something else creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawExternal {
    /// The green nodes' labels.
    pub node_selector: Selector,
}

/// A gate, as written: `approval`, `{wait: 10m}`, `{healthy: 5m}` (optionally named).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawGate {
    /// `approval` or `wait`/`healthy` without a duration (refused).
    Word(String),
    /// `{approval: {name: x}}`, `{wait: 10m}`, `{healthy: 5m}`.
    Map(BTreeMap<String, RawGateBody>),
}

/// The value under a gate's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawGateBody {
    /// A duration (`10m`).
    Duration(String),
    /// `{name: …, duration: …}`.
    Fields(RawGateFields),
}

/// A gate's fields in long form.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawGateFields {
    /// The gate's name (what `approve --gate` names).
    #[serde(default)]
    pub name: Option<String>,
    /// The duration of a `wait` or `healthy` gate.
    #[serde(default)]
    pub duration: Option<String>,
}

/// One stage as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawStage {
    /// Stage name (a DNS label).
    pub name: String,
    /// Which clusters (by label); empty: every cluster not taken by an earlier stage.
    #[serde(default)]
    pub clusters: Selector,
    /// Clusters run in the order of this label's value, then by name.
    #[serde(default)]
    pub sort_by: Option<String>,
    /// How many of the stage's clusters run at once (count or %, rounded down, at least 1).
    #[serde(default)]
    pub max_concurrency: Option<RawAmount>,
    /// Gates before the stage's first cluster starts.
    #[serde(default)]
    pub before_gates: Vec<RawGate>,
    /// Gates after its last cluster ends, before the next stage.
    #[serde(default)]
    pub after_gates: Vec<RawGate>,
}

/// A pod rule as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPodRule {
    /// Pods whose labels match.
    pub selector: Selector,
    /// `skip` (left on the node) or `waitCompleted` (wait for the pod to finish).
    pub action: String,
    /// With `waitCompleted`: how long to wait before `onUndrainable` applies.
    #[serde(default)]
    pub deadline: Option<String>,
}

/// The blue-green timings and drain rules as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawBlueGreen {
    /// Blue nodes drained per batch (count or % of blue at start, rounded up). Default 10%.
    #[serde(default)]
    pub batch: Option<RawAmount>,
    /// Wait after each batch. Default 15m.
    #[serde(default)]
    pub batch_soak: Option<String>,
    /// Wait after the last batch, before blue is retired. Default 1h.
    #[serde(default)]
    pub final_soak: Option<String>,
    /// How long green may take to be Ready with GPUs allocatable. Default 20m.
    #[serde(default)]
    pub green_ready_timeout: Option<String>,
    /// How long one node's drain may take. Default 30m; never infinite.
    #[serde(default)]
    pub drain_timeout_per_node: Option<String>,
    /// `pause` (default), `quarantine`, or `forceAfter(<duration>)`.
    #[serde(default)]
    pub on_undrainable: Option<String>,
    /// With `quarantine`: most nodes per cluster left blocked before the cluster fails.
    #[serde(default)]
    pub max_blocked_nodes: Option<u32>,
    /// Pods' termination grace period for evictions (default: each pod's own).
    #[serde(default)]
    pub grace_period: Option<String>,
    /// Leave DaemonSet pods (default true; false makes them block the drain).
    #[serde(default)]
    pub ignore_daemon_sets: Option<bool>,
    /// Evict pods with emptyDir volumes (their data is lost). Default false.
    #[serde(default)]
    pub delete_empty_dir_data: Option<bool>,
    /// Delete pods without a controller (they do not come back). Default false.
    #[serde(default)]
    pub force: Option<bool>,
    /// Rules by pod label, first match wins.
    #[serde(default)]
    pub pod_rules: Vec<RawPodRule>,
}

/// Health gates as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawHealthGates {
    /// Green GPU allocatable at least this % of blue's at start. Default 100.
    #[serde(default)]
    pub green_gpu_allocatable_percent: Option<u32>,
    /// Exported services' ready endpoints at least this % of the count before the rollout.
    /// Default 100.
    #[serde(default)]
    pub endpoints_ready_percent: Option<u32>,
    /// No GPU pod Pending longer than this. Default 5m.
    #[serde(default)]
    pub max_gpu_pod_pending: Option<String>,
    /// How long after a batch the gates may keep failing (pods still starting) before the
    /// cluster rolls back; checked every few seconds. Default 5m.
    #[serde(default)]
    pub window: Option<String>,
}

/// The failure budget as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawFailureBudget {
    /// Clusters per stage that may fail (count or % of the stage, rounded up). Default 0.
    #[serde(default)]
    pub per_stage: Option<RawAmount>,
    /// Clusters in the whole campaign that may fail (count or %, rounded up). Default: the
    /// sum of the stages' budgets.
    #[serde(default)]
    pub per_campaign: Option<RawAmount>,
}

/// A campaign spec as a user writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSpec {
    /// Campaign name (a DNS label); the id is assigned by the hub.
    pub name: String,
    /// The blue pool.
    pub pool: RawPool,
    /// How green comes to exist.
    pub green: RawGreen,
    /// Extra nodes allowed at once (count or % of blue, rounded up, at least 1). Default 100%.
    #[serde(default)]
    pub surge: Option<RawAmount>,
    /// The stages, in order.
    pub stages: Vec<RawStage>,
    /// Timings and drain rules.
    #[serde(default)]
    pub blue_green: RawBlueGreen,
    /// Take the cluster out of global routing while its blue pool drains. Default false.
    #[serde(default)]
    pub traffic_shift: Option<bool>,
    /// When a cluster's rollout counts as healthy.
    #[serde(default)]
    pub health_gates: RawHealthGates,
    /// How many clusters may fail.
    #[serde(default)]
    pub failure_budget: RawFailureBudget,
    /// How long a cluster's agent may be unreachable mid-rollout before the cluster fails
    /// (left as it is; counts against the budgets). Default 5m.
    #[serde(default)]
    pub unreachable_timeout: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated spec.

/// Which nodes are the blue pool in each cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolRef {
    /// Nodes of the inventory pool with this name.
    Name(String),
    /// Machines of this MachineDeployment.
    MachineDeployment(String),
    /// Nodes with these labels.
    Selector(Selector),
}

/// How green is provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provisioner {
    /// Clone blue's MachineDeployment with changes.
    ClusterApi {
        /// The green MachineDeployment's name; `None`: blue's name with `-green`.
        name: Option<String>,
        /// The new Kubernetes version, if it changes.
        version: Option<String>,
        /// A JSON merge patch onto `spec.template.spec`.
        template: Option<serde_json::Value>,
    },
    /// Wait for nodes matching this selector.
    External {
        /// The green nodes' labels.
        node_selector: Selector,
    },
}

/// What a gate waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateKind {
    /// Someone runs `flotctl campaign approve`.
    Approval,
    /// Time passes.
    Wait(Duration),
    /// Every cluster of the stage stays healthy for this long.
    Healthy(Duration),
}

/// A validated gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// Unique within the campaign: given, or `<stage>-before-<i>` / `<stage>-after-<i>`.
    pub name: String,
    /// What it waits for.
    pub kind: GateKind,
}

/// A validated stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Name.
    pub name: String,
    /// Which clusters.
    pub clusters: Selector,
    /// Order label.
    pub sort_by: Option<String>,
    /// Clusters at once (resolved against the stage's size at snapshot).
    pub max_concurrency: Amount,
    /// Gates before.
    pub before_gates: Vec<Gate>,
    /// Gates after.
    pub after_gates: Vec<Gate>,
}

/// What to do with a node that cannot be drained within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnUndrainable {
    /// The cluster's rollout pauses until someone acts (resume retries the drain).
    Pause,
    /// Cordon and label the node, leave it, and continue; at most `max_blocked_nodes`.
    Quarantine,
    /// Delete the remaining pods past their PDBs after this long (explicit opt-in).
    ForceAfter(Duration),
}

/// What a pod rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodAction {
    /// The pod stays on the node; the drain does not wait for it.
    Skip,
    /// Wait for the pod to finish (Succeeded/Failed) up to the deadline, then `onUndrainable`.
    WaitCompleted(Duration),
}

/// A validated pod rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRule {
    /// Pods whose labels match.
    pub selector: Selector,
    /// What happens to them.
    pub action: PodAction,
}

/// How blue drains, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRules {
    /// Per node.
    pub timeout_per_node: Duration,
    /// Past the timeout.
    pub on_undrainable: OnUndrainable,
    /// Quarantined nodes per cluster before it fails.
    pub max_blocked_nodes: u32,
    /// Eviction grace period override.
    pub grace_period: Option<Duration>,
    /// Leave DaemonSet pods.
    pub ignore_daemon_sets: bool,
    /// Evict emptyDir pods.
    pub delete_empty_dir_data: bool,
    /// Delete bare pods.
    pub force: bool,
    /// First match wins.
    pub pod_rules: Vec<PodRule>,
}

/// Health gates with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthGates {
    /// Green GPU allocatable ≥ this % of blue's at start.
    pub green_gpu_allocatable_percent: u32,
    /// Ready endpoints ≥ this % of the count before the rollout.
    pub endpoints_ready_percent: u32,
    /// No GPU pod Pending longer than this.
    pub max_gpu_pod_pending: Duration,
    /// How long the gates may keep failing after a batch before the cluster rolls back.
    pub window: Duration,
}

/// A validated campaign spec: what the controller runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Name.
    pub name: String,
    /// The blue pool.
    pub pool: PoolRef,
    /// The provisioner.
    pub green: Provisioner,
    /// Extra nodes at once.
    pub surge: Amount,
    /// Stages in order.
    pub stages: Vec<Stage>,
    /// Blue nodes per batch (of blue at start, rounded up).
    pub batch: Amount,
    /// After each batch.
    pub batch_soak: Duration,
    /// After the last batch.
    pub final_soak: Duration,
    /// Green readiness bound.
    pub green_ready_timeout: Duration,
    /// Drain rules.
    pub drain: DrainRules,
    /// Shift traffic away while draining.
    pub traffic_shift: bool,
    /// Health gates.
    pub health: HealthGates,
    /// Failures allowed per stage (of the stage's clusters, rounded up).
    pub failure_budget_per_stage: Amount,
    /// Failures allowed in the campaign (of all its clusters, rounded up); `None`: the sum of
    /// the stages' budgets (no limit beyond theirs).
    pub failure_budget_per_campaign: Option<Amount>,
    /// A cluster unreachable this long mid-rollout fails.
    #[serde(default = "default_unreachable_timeout")]
    pub unreachable_timeout: Duration,
}

/// The default `unreachableTimeout`.
pub const DEFAULT_UNREACHABLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

fn default_unreachable_timeout() -> Duration {
    DEFAULT_UNREACHABLE_TIMEOUT
}

/// Most stages a campaign may have (KubeFleet allows 31).
pub const MAX_STAGES: usize = 32;
/// Most gates before or after one stage.
pub const MAX_GATES: usize = 8;
/// Most pod rules.
pub const MAX_POD_RULES: usize = 32;
/// The longest soak or wait (AKS allows 7 days for the final soak).
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

fn dns_label(field: &str, s: &str) -> Result<(), SpecError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!("{s:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"),
        )
    }
}

fn duration(field: &str, raw: &Option<String>, default: Duration) -> Result<Duration, SpecError> {
    let Some(text) = raw else {
        return Ok(default);
    };
    let d = crate::duration::parse(text).or_else(|e| err(field, e))?;
    if d > MAX_WAIT {
        return err(field, format!("{text} is longer than the limit of 30 days"));
    }
    Ok(d)
}

fn gate(field: &str, raw: &RawGate, default_name: String) -> Result<Gate, SpecError> {
    let (word, body) = match raw {
        RawGate::Word(w) => (w.as_str(), None),
        RawGate::Map(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().expect("one entry");
            (k.as_str(), Some(v))
        }
        RawGate::Map(_) => {
            return err(field, "a gate has exactly one of approval, wait or healthy");
        }
    };
    let (name, duration_text) = match body {
        None => (None, None),
        Some(RawGateBody::Duration(d)) => (None, Some(d.clone())),
        Some(RawGateBody::Fields(f)) => (f.name.clone(), f.duration.clone()),
    };
    let dur = |what: &str| -> Result<Duration, SpecError> {
        let at = format!("{field}.{what}");
        match &duration_text {
            None => err(at, format!("{what} needs a duration ({what}: 10m)")),
            Some(_) => duration(&at, &duration_text, Duration::ZERO),
        }
    };
    let kind = match word {
        "approval" => {
            if duration_text.is_some() {
                return err(format!("{field}.approval"), "an approval takes no duration");
            }
            GateKind::Approval
        }
        "wait" => GateKind::Wait(dur("wait")?),
        "healthy" => GateKind::Healthy(dur("healthy")?),
        other => {
            return err(
                field,
                format!("unknown gate {other:?} (approval, wait or healthy)"),
            );
        }
    };
    let name = name.unwrap_or(default_name);
    dns_label(&format!("{field}.name"), &name)?;
    Ok(Gate { name, kind })
}

fn on_undrainable(field: &str, raw: &Option<String>) -> Result<OnUndrainable, SpecError> {
    let Some(text) = raw else {
        return Ok(OnUndrainable::Pause);
    };
    match text.trim() {
        "pause" => Ok(OnUndrainable::Pause),
        "quarantine" => Ok(OnUndrainable::Quarantine),
        t => match t
            .strip_prefix("forceAfter(")
            .and_then(|r| r.strip_suffix(')'))
        {
            Some(d) => Ok(OnUndrainable::ForceAfter(duration(
                field,
                &Some(d.to_string()),
                Duration::ZERO,
            )?)),
            None => err(
                field,
                format!("{t:?}: use pause, quarantine or forceAfter(<duration>)"),
            ),
        },
    }
}

fn percent(field: &str, raw: Option<u32>, default: u32) -> Result<u32, SpecError> {
    let p = raw.unwrap_or(default);
    if p > 100 {
        return err(field, format!("{p} is over 100"));
    }
    Ok(p)
}

impl RawSpec {
    /// Validate and fill in defaults; the error names the first bad field.
    pub fn validate(&self) -> Result<Spec, SpecError> {
        dns_label("name", &self.name)?;
        let pool = match (
            &self.pool.name,
            &self.pool.machine_deployment,
            &self.pool.node_selector,
        ) {
            (Some(n), None, None) => {
                if n.is_empty() {
                    return err("pool.name", "must not be empty");
                }
                PoolRef::Name(n.clone())
            }
            (None, Some(md), None) => {
                dns_subdomain("pool.machineDeployment", md)?;
                PoolRef::MachineDeployment(md.clone())
            }
            (None, None, Some(s)) => {
                selector("pool.nodeSelector", s)?;
                if s.is_empty() {
                    return err(
                        "pool.nodeSelector",
                        "an empty selector would take every node",
                    );
                }
                PoolRef::Selector(s.clone())
            }
            _ => {
                return err(
                    "pool",
                    "exactly one of name, machineDeployment or nodeSelector",
                );
            }
        };
        let green = match (&self.green.cluster_api, &self.green.external) {
            (Some(c), None) => {
                if let Some(n) = &c.name {
                    dns_subdomain("green.clusterApi.name", n)?;
                }
                if c.version.is_none() && c.template.is_none() {
                    return err("green.clusterApi", "change something: version or template");
                }
                if let Some(t) = &c.template
                    && !matches!(t, serde_json::Value::Object(_))
                {
                    return err("green.clusterApi.template", "must be a map of fields");
                }
                Provisioner::ClusterApi {
                    name: c.name.clone(),
                    version: c.version.clone(),
                    template: c.template.clone(),
                }
            }
            (None, Some(x)) => {
                selector("green.external.nodeSelector", &x.node_selector)?;
                if x.node_selector.is_empty() {
                    return err(
                        "green.external.nodeSelector",
                        "an empty selector would take every node, blue ones too",
                    );
                }
                Provisioner::External {
                    node_selector: x.node_selector.clone(),
                }
            }
            _ => return err("green", "exactly one of clusterApi or external"),
        };
        let surge = match &self.surge {
            None => Amount::Percent(100),
            Some(r) => Amount::parse("surge", r)?,
        };
        if matches!(surge, Amount::Count(0) | Amount::Percent(0)) {
            return err("surge", "must allow at least one extra node");
        }
        if self.stages.is_empty() {
            return err("stages", "at least one stage");
        }
        if self.stages.len() > MAX_STAGES {
            return err(
                "stages",
                format!(
                    "{} stages, over the limit of {MAX_STAGES}",
                    self.stages.len()
                ),
            );
        }
        let mut stages = Vec::with_capacity(self.stages.len());
        let mut gate_names = std::collections::BTreeSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}]");
            dns_label(&format!("{at}.name"), &s.name)?;
            if stages.iter().any(|x: &Stage| x.name == s.name) {
                return err(format!("{at}.name"), format!("{:?} is used twice", s.name));
            }
            selector(&format!("{at}.clusters"), &s.clusters)?;
            let max_concurrency = match &s.max_concurrency {
                None => Amount::Count(1),
                Some(r) => Amount::parse(&format!("{at}.maxConcurrency"), r)?,
            };
            if matches!(max_concurrency, Amount::Count(0) | Amount::Percent(0)) {
                return err(format!("{at}.maxConcurrency"), "must be at least 1 (or 1%)");
            }
            let mut gates = |list: &[RawGate], side: &str| -> Result<Vec<Gate>, SpecError> {
                let field = format!("{at}.{side}Gates");
                if list.len() > MAX_GATES {
                    return err(field, format!("over the limit of {MAX_GATES} gates"));
                }
                let mut out = Vec::new();
                for (j, g) in list.iter().enumerate() {
                    let g = gate(
                        &format!("{field}[{j}]"),
                        g,
                        format!("{}-{side}-{j}", s.name),
                    )?;
                    if !gate_names.insert(g.name.clone()) {
                        return err(
                            format!("{field}[{j}].name"),
                            format!("gate {:?} is named twice in the campaign", g.name),
                        );
                    }
                    out.push(g);
                }
                Ok(out)
            };
            let before_gates = gates(&s.before_gates, "before")?;
            let after_gates = gates(&s.after_gates, "after")?;
            stages.push(Stage {
                name: s.name.clone(),
                clusters: s.clusters.clone(),
                sort_by: s.sort_by.clone(),
                max_concurrency,
                before_gates,
                after_gates,
            });
        }
        let bg = &self.blue_green;
        let batch = match &bg.batch {
            None => Amount::Percent(10),
            Some(r) => Amount::parse("blueGreen.batch", r)?,
        };
        if matches!(batch, Amount::Count(0) | Amount::Percent(0)) {
            return err("blueGreen.batch", "must drain at least one node per batch");
        }
        let timeout_per_node = duration(
            "blueGreen.drainTimeoutPerNode",
            &bg.drain_timeout_per_node,
            Duration::from_secs(30 * 60),
        )?;
        if timeout_per_node.is_zero() {
            return err(
                "blueGreen.drainTimeoutPerNode",
                "must be longer than 0 (a drain is never allowed forever)",
            );
        }
        let on_undrainable = on_undrainable("blueGreen.onUndrainable", &bg.on_undrainable)?;
        if bg.max_blocked_nodes.is_some() && on_undrainable != OnUndrainable::Quarantine {
            return err(
                "blueGreen.maxBlockedNodes",
                "applies only with onUndrainable: quarantine",
            );
        }
        if bg.pod_rules.len() > MAX_POD_RULES {
            return err(
                "blueGreen.podRules",
                format!("over the limit of {MAX_POD_RULES} rules"),
            );
        }
        let mut pod_rules = Vec::new();
        for (i, r) in bg.pod_rules.iter().enumerate() {
            let at = format!("blueGreen.podRules[{i}]");
            selector(&format!("{at}.selector"), &r.selector)?;
            let action = match (r.action.as_str(), &r.deadline) {
                ("skip", None) => PodAction::Skip,
                ("skip", Some(_)) => {
                    return err(format!("{at}.deadline"), "skip takes no deadline");
                }
                ("waitCompleted", None) => {
                    return err(
                        format!("{at}.deadline"),
                        "waitCompleted needs a deadline (jobs must not hold a node forever)",
                    );
                }
                ("waitCompleted", d) => PodAction::WaitCompleted(duration(
                    &format!("{at}.deadline"),
                    d,
                    Duration::ZERO,
                )?),
                (other, _) => {
                    return err(
                        format!("{at}.action"),
                        format!("{other:?}: use skip or waitCompleted"),
                    );
                }
            };
            pod_rules.push(PodRule {
                selector: r.selector.clone(),
                action,
            });
        }
        let drain = DrainRules {
            timeout_per_node,
            on_undrainable,
            max_blocked_nodes: bg.max_blocked_nodes.unwrap_or(1),
            grace_period: match &bg.grace_period {
                None => None,
                some => Some(duration("blueGreen.gracePeriod", some, Duration::ZERO)?),
            },
            ignore_daemon_sets: bg.ignore_daemon_sets.unwrap_or(true),
            delete_empty_dir_data: bg.delete_empty_dir_data.unwrap_or(false),
            force: bg.force.unwrap_or(false),
            pod_rules,
        };
        let hg = &self.health_gates;
        let health = HealthGates {
            green_gpu_allocatable_percent: percent(
                "healthGates.greenGpuAllocatablePercent",
                hg.green_gpu_allocatable_percent,
                100,
            )?,
            endpoints_ready_percent: percent(
                "healthGates.endpointsReadyPercent",
                hg.endpoints_ready_percent,
                100,
            )?,
            max_gpu_pod_pending: duration(
                "healthGates.maxGpuPodPending",
                &hg.max_gpu_pod_pending,
                Duration::from_secs(300),
            )?,
            window: duration("healthGates.window", &hg.window, Duration::from_secs(300))?,
        };
        let budget = |field: &str, raw: &Option<RawAmount>| match raw {
            None => Ok(Amount::Count(0)),
            Some(r) => Amount::parse(field, r),
        };
        Ok(Spec {
            name: self.name.clone(),
            pool,
            green,
            surge,
            stages,
            batch,
            batch_soak: duration(
                "blueGreen.batchSoak",
                &bg.batch_soak,
                Duration::from_secs(15 * 60),
            )?,
            final_soak: duration(
                "blueGreen.finalSoak",
                &bg.final_soak,
                Duration::from_secs(3600),
            )?,
            green_ready_timeout: duration(
                "blueGreen.greenReadyTimeout",
                &bg.green_ready_timeout,
                Duration::from_secs(20 * 60),
            )?,
            drain,
            traffic_shift: self.traffic_shift.unwrap_or(false),
            health,
            failure_budget_per_stage: budget(
                "failureBudget.perStage",
                &self.failure_budget.per_stage,
            )?,
            failure_budget_per_campaign: match &self.failure_budget.per_campaign {
                None => None,
                Some(r) => Some(Amount::parse("failureBudget.perCampaign", r)?),
            },
            unreachable_timeout: duration(
                "unreachableTimeout",
                &self.unreachable_timeout,
                DEFAULT_UNREACHABLE_TIMEOUT,
            )?,
        })
    }
}

/// Validate a selector; its error already starts with the field path.
fn selector(field: &str, s: &Selector) -> Result<(), SpecError> {
    s.validate(field).map_err(|e| match e.split_once(": ") {
        Some((f, reason)) => SpecError {
            field: f.to_string(),
            reason: reason.to_string(),
        },
        None => SpecError {
            field: field.to_string(),
            reason: e,
        },
    })
}

fn dns_subdomain(field: &str, s: &str) -> Result<(), SpecError> {
    for part in s.split('.') {
        dns_label(field, part).or_else(|_| {
            err(
                field,
                format!("{s:?} is not a Kubernetes object name (a DNS subdomain)"),
            )
        })?;
    }
    if s.len() > 253 {
        return err(field, "longer than 253 characters");
    }
    Ok(())
}

/// Parse and validate a spec written as JSON; structural errors (an unknown or mistyped
/// field) name their path too.
pub fn parse_json(text: &str) -> Result<Spec, SpecError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        SpecError {
            field: if path == "." { "spec".into() } else { path },
            reason: e.into_inner().to_string(),
        }
    })?;
    raw.validate()
}

impl Spec {
    /// The blue nodes drained per batch, for a pool of `blue` nodes: rounded up, at least 1,
    /// at most the pool.
    pub fn batch_size(&self, blue: u32) -> u32 {
        self.batch.of(blue, Round::Up).clamp(1, blue.max(1))
    }

    /// The extra nodes allowed at once for a pool of `blue` nodes: rounded up, at least 1.
    pub fn surge_nodes(&self, blue: u32) -> u32 {
        self.surge.of(blue, Round::Up).max(1)
    }

    /// Every gate of the campaign by name, with its stage's index.
    pub fn gate(&self, name: &str) -> Option<(usize, &Gate)> {
        self.stages.iter().enumerate().find_map(|(i, s)| {
            s.before_gates
                .iter()
                .chain(&s.after_gates)
                .find(|g| g.name == name)
                .map(|g| (i, g))
        })
    }
}

#[cfg(test)]
mod tests;
