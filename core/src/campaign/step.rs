//! The steps a campaign sends a cluster's agent, and what the agent answers. A step is
//! idempotent and named by `(campaign, seq)`: a re-sent step (lost stream, restarted agent,
//! new leader) is resumed, not redone. Each step carries the leader term that sent it; an
//! agent refuses a term older than one it has seen (fencing).

use serde::{Deserialize, Serialize};

use super::spec::{DrainRules, PoolRef, Provisioner};

/// One step for one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The campaign's id.
    pub campaign: String,
    /// Increases with every step the campaign sends, across all its clusters.
    pub seq: u64,
    /// The leader term (store-backend leadership epoch) that sent it.
    pub term: u64,
    /// What to do.
    pub kind: StepKind,
}

/// What a step asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    /// Look, change nothing: the blue pool's nodes, PDB headroom, quota, held nodes.
    Preflight {
        /// The blue pool.
        pool: PoolRef,
        /// How green will be provisioned.
        green: Provisioner,
    },
    /// Grow (or create) green to `target` nodes: the API accepted it.
    ProvisionGreen {
        /// The blue pool (green is cloned from it).
        pool: PoolRef,
        /// The provisioner.
        green: Provisioner,
        /// Green's size.
        target: u32,
    },
    /// Wait until green has `target` nodes Ready with their GPUs allocatable, at most
    /// `timeout` from when the agent first received this step.
    WaitGreenReady {
        /// The provisioner, to find green nodes.
        green: Provisioner,
        /// Green's size.
        target: u32,
        /// `greenReadyTimeout`.
        timeout: std::time::Duration,
    },
    /// Cordon these blue nodes, so evicted pods land on green.
    CordonBlue {
        /// Node names.
        nodes: Vec<String>,
    },
    /// Drain these blue nodes through the Eviction API by the rules.
    DrainBatch {
        /// Batch index (0-based), for progress and Events.
        index: u32,
        /// Node names.
        nodes: Vec<String>,
        /// The rules.
        rules: DrainRules,
    },
    /// Remove these drained blue nodes (marked for deletion, then blue scaled down by as
    /// many); `last` removes the rest of blue and its MachineDeployment.
    RetireBlue {
        /// The blue pool.
        pool: PoolRef,
        /// Node names.
        nodes: Vec<String>,
        /// Whether this is the end of blue.
        last: bool,
    },
    /// Report what the health gates judge.
    CheckHealth {
        /// The blue pool, for the green/blue comparison.
        pool: PoolRef,
        /// The provisioner, to find green nodes.
        green: Provisioner,
    },
    /// Undo: uncordon blue (and bring retired blue back), then cordon, drain and remove green.
    RollBack {
        /// The blue pool.
        pool: PoolRef,
        /// The provisioner.
        green: Provisioner,
        /// Blue's size to restore.
        blue: u32,
        /// The drain rules for green.
        rules: DrainRules,
    },
}

impl StepKind {
    /// A short name for logs, metrics and tables.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Preflight { .. } => "preflight",
            StepKind::ProvisionGreen { .. } => "provision-green",
            StepKind::WaitGreenReady { .. } => "wait-green-ready",
            StepKind::CordonBlue { .. } => "cordon-blue",
            StepKind::DrainBatch { .. } => "drain-batch",
            StepKind::RetireBlue { .. } => "retire-blue",
            StepKind::CheckHealth { .. } => "check-health",
            StepKind::RollBack { .. } => "roll-back",
        }
    }
}

/// A PDB that allows no disruption now, and the pods on blue it covers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlockingPdb {
    /// `namespace/name`.
    pub pdb: String,
    /// Its pods on the blue pool (`namespace/name`, at most a few).
    pub pods: Vec<String>,
}

/// A node left alone because another maintainer holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeldNode {
    /// Node name.
    pub node: String,
    /// Who holds it and why (GPU Operator upgrade state, cordoned by someone else).
    pub reason: String,
}

/// What pre-flight found in one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PreflightReport {
    /// The blue pool's nodes, in drain order.
    pub blue_nodes: Vec<String>,
    /// Nodes another maintainer holds (not part of the rollout).
    pub held: Vec<HeldNode>,
    /// PDBs allowing zero disruptions now.
    pub blocking_pdbs: Vec<BlockingPdb>,
    /// More nodes the pool's quota allows now (`None`: no quota known).
    pub quota_headroom: Option<u32>,
    /// Blue's GPU allocatable, the baseline for the green comparison.
    pub blue_gpu_allocatable: i64,
    /// Ready endpoints of the cluster's exported services, the baseline for the endpoint
    /// gate.
    pub ready_endpoints: u32,
    /// Why the cluster cannot run this campaign at all (no such pool, no permission).
    pub unsupported: Option<String>,
}

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthReport {
    /// Green nodes, and of those Ready with every GPU allocatable.
    pub green_nodes: u32,
    /// Green nodes Ready with their GPUs allocatable.
    pub green_ready: u32,
    /// Green GPU allocatable.
    pub green_gpu_allocatable: i64,
    /// Ready endpoints of exported services now.
    pub ready_endpoints: u32,
    /// GPU pods Pending, with how long the longest has waited (seconds).
    pub gpu_pods_pending: u32,
    /// The longest a GPU pod has been Pending (seconds).
    pub longest_gpu_pending_secs: u64,
}

/// How a drain ended for the nodes it could not empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DrainReport {
    /// Nodes drained empty (of what the rules evict).
    pub drained: Vec<String>,
    /// Nodes quarantined (cordoned, labelled, left with their pods).
    pub quarantined: Vec<String>,
    /// Pods deleted past their PDBs by `forceAfter`.
    pub forced: Vec<String>,
}

/// What a finished step produced.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StepOutput {
    /// Nothing to report.
    #[default]
    None,
    /// Pre-flight findings.
    Preflight(PreflightReport),
    /// A health check.
    Health(HealthReport),
    /// A drain.
    Drain(DrainReport),
}

/// Why a step failed, as far as the campaign's rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// Green could not be provisioned (quota, capacity) or did not become ready in time.
    Provisioning,
    /// A node could not be drained within its timeout (PDB, waitCompleted deadline).
    Undrainable,
    /// The agent refused the step (older term, unsupported).
    Refused,
    /// Anything else (API errors past their retries).
    Other,
}

/// A pod that holds a drain, and what holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BlockedPod {
    /// `namespace/name`.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Why (`PodDisruptionBudget ml/llama-pdb allows 0 disruptions`, `waiting for completion`).
    pub reason: String,
}

/// What the agent says about a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    /// Received and started (or resumed).
    Accepted,
    /// Still running: a line for people and the pods that hold it.
    Progress {
        /// What is happening.
        message: String,
        /// Pods that block it now.
        blocked: Vec<BlockedPod>,
    },
    /// Finished.
    Done(StepOutput),
    /// Failed; the campaign's rules decide what follows.
    Failed {
        /// Which kind of failure.
        kind: FailureKind,
        /// Why, for people.
        reason: String,
        /// Pods that blocked it.
        blocked: Vec<BlockedPod>,
    },
}
