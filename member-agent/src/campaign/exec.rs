//! What each campaign step does to the cluster, through its API server: nodes found by pool,
//! green provisioned as a Cluster API MachineDeployment cloned from blue (or waited for when
//! something else provisions it), cordons, drains through the Eviction API with kubectl's
//! rules (`flotilla_core::campaign::drain`), retirement with Cluster API's delete-machine
//! annotation, health checks and rollback. Every step is idempotent: run twice, it does the
//! work once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::campaign as conv;
use flotilla_api::v1;
use flotilla_core::campaign::drain::{self, Disposition, Owner, PodFacts, PodPhase};
use flotilla_core::campaign::spec::{DrainRules, OnUndrainable, PoolRef, Provisioner};
use flotilla_core::campaign::step::{
    BlockedPod, BlockingPdb, DrainReport, FailureKind, HealthReport, HeldNode, PreflightReport,
    Step, StepKind, StepOutput, StepStatus,
};
use flotilla_core::selector::Selector;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    Api, DeleteParams, DynamicObject, EvictParams, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use tokio::sync::mpsc;

/// When step `step` (`<campaign>/<seq>`) first started draining a node, from its annotation
/// (another step's record does not count).
fn drain_started(v: &str, step: &str) -> Option<jiff::Timestamp> {
    let (s, t) = v.split_once('@')?;
    (s == step).then(|| t.parse().ok()).flatten()
}

/// The label Cluster API puts on a MachineDeployment's nodes.
pub const MD_LABEL: &str = "cluster.x-k8s.io/deployment-name";
/// Cluster API's scale-down victim annotation (on the Machine; kube-sim reads it on the node).
pub const DELETE_MACHINE: &str = "cluster.x-k8s.io/delete-machine";
/// Cluster API's annotation naming a node's Machine.
pub const MACHINE_ANNOTATION: &str = "cluster.x-k8s.io/machine";
/// The campaign that cordoned a node (so rollback uncordons only its own, and pre-flight
/// tells our cordons from another maintainer's).
pub const CAMPAIGN_ANNOTATION: &str = "flotilla.io/campaign";
/// Where a node is in its campaign: `cordoned`, `draining`, `drained` or `quarantined`.
pub const NODE_STATE_ANNOTATION: &str = "flotilla.io/campaign-node";
/// When a drain step first started on the node (`<campaign>/<seq>@<RFC 3339>`): the same step
/// resumed by a restarted agent counts its timeout from here, not from the restart. A new
/// step (`resume` after a pause sends one) starts afresh.
pub const DRAIN_STARTED_ANNOTATION: &str = "flotilla.io/drain-started";
/// The campaign's last step on its green MachineDeployment (`<seq> <step> <state>`), for
/// whoever reads the cluster (and the agent after a restart) to see where it was.
pub const STEP_ANNOTATION: &str = "flotilla.io/campaign-step";
/// Set on a node a drain left in place (onUndrainable: quarantine).
pub const QUARANTINE_LABEL: &str = "flotilla.io/upgrade-status";
/// The pool's quota in nodes, as a cloud integration publishes it on the MachineDeployment.
pub const QUOTA_ANNOTATION: &str = "flotilla.io/quota-nodes";
/// Nodes of the template in use against that quota.
pub const QUOTA_USED_ANNOTATION: &str = "flotilla.io/quota-used";
/// NVIDIA GPU Operator's driver upgrade state label.
pub const GPU_UPGRADE_STATE: &str = "nvidia.com/gpu-driver-upgrade-state";

/// How often a drain or a wait looks again, at most.
const POLL: Duration = Duration::from_millis(500);
/// The first look again: a fast cluster is not kept waiting (evicted pods often go at once).
const FIRST_POLL: Duration = Duration::from_millis(50);

/// Waits between looks: `FIRST_POLL`, doubling up to `POLL`.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(FIRST_POLL)
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(POLL);
    }
}
/// How long retired nodes may take to go.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long pods deleted past their budget (forceAfter) may take to terminate.
const FORCED_GRACE: Duration = Duration::from_secs(5 * 60);
/// Most blocked pods one status carries.
const MAX_BLOCKED: usize = 50;

/// Sends progress for one step.
pub struct Progress {
    out: mpsc::Sender<v1::StepStatusReport>,
    campaign: String,
    seq: u64,
    last: std::sync::Mutex<Option<(String, Vec<BlockedPod>)>>,
}

impl Progress {
    /// For step `seq` of `campaign`.
    pub fn new(out: mpsc::Sender<v1::StepStatusReport>, campaign: String, seq: u64) -> Self {
        Self {
            out,
            campaign,
            seq,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Say where the step is (only when it changed).
    pub async fn say(&self, message: String, blocked: Vec<BlockedPod>) {
        {
            let mut last = self.last.lock().expect("progress lock");
            if last.as_ref() == Some(&(message.clone(), blocked.clone())) {
                return;
            }
            *last = Some((message.clone(), blocked.clone()));
        }
        let st = StepStatus::Progress { message, blocked };
        let _ = self
            .out
            .send(conv::status_to_wire(&self.campaign, self.seq, &st))
            .await;
    }
}

/// Why a step failed.
struct Fail {
    kind: FailureKind,
    reason: String,
    blocked: Vec<BlockedPod>,
}

fn fail(kind: FailureKind, reason: impl Into<String>) -> Fail {
    Fail {
        kind,
        reason: reason.into(),
        blocked: Vec::new(),
    }
}

impl From<kube::Error> for Fail {
    fn from(e: kube::Error) -> Self {
        fail(FailureKind::Other, format!("the cluster's API: {e}"))
    }
}

type Outcome = Result<StepOutput, Fail>;

/// Runs steps against one cluster.
pub struct Exec {
    client: kube::Client,
    /// `--pool-label`, as the inventory names pools.
    pool_label: Option<String>,
    /// Ready endpoints of the cluster's exported services now.
    ready_endpoints: Arc<dyn Fn() -> u32 + Send + Sync>,
    /// The agent's identity, for Events.
    component: String,
}

fn md_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta1", "MachineDeployment"),
        "machinedeployments",
    )
}

fn labels(n: &Node) -> BTreeMap<String, String> {
    n.metadata.labels.clone().unwrap_or_default()
}

fn name(n: &Node) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether an extended resource is a GPU or a share of one (whole GPUs, MIG slices,
/// time-sliced replicas, vendor partitions).
fn is_gpu_resource(name: &str) -> bool {
    name.starts_with("nvidia.com/")
        || name.starts_with("amd.com/")
        || name.starts_with("gpu.intel.com/")
}

/// GPU units (of every GPU resource) the node has, by capacity or allocatable.
fn gpus(n: &Node, which: &str) -> i64 {
    let s = n.status.as_ref();
    let q = match which {
        "capacity" => s.and_then(|s| s.capacity.as_ref()),
        _ => s.and_then(|s| s.allocatable.as_ref()),
    };
    q.map(|m| {
        m.iter()
            .filter(|(k, _)| is_gpu_resource(k))
            .filter_map(|(_, v)| v.0.parse::<i64>().ok())
            .sum()
    })
    .unwrap_or(0)
}

/// Ready, with every GPU it has allocatable.
fn ready_with_gpus(n: &Node) -> bool {
    ready(n) && gpus(n, "allocatable") >= gpus(n, "capacity")
}

fn cordoned(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn pod_facts(p: &Pod) -> PodFacts {
    let m = &p.metadata;
    let owner = if m
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        Owner::Mirror
    } else {
        match m
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.controller == Some(true)))
        {
            Some(r) if r.kind == "DaemonSet" => Owner::DaemonSet,
            Some(_) => Owner::Controller,
            None => Owner::None,
        }
    };
    let phase = match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        _ => PodPhase::Unknown,
    };
    PodFacts {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        phase,
        deleting: m.deletion_timestamp.is_some(),
        owner,
        empty_dir: p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some())),
    }
}

fn requests_gpu(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| {
            c.resources.as_ref().is_some_and(|r| {
                let any = |q: &std::collections::BTreeMap<String, _>| {
                    q.keys().any(|k| is_gpu_resource(k))
                };
                r.requests.as_ref().is_some_and(any) || r.limits.as_ref().is_some_and(any)
            })
        })
    })
}

/// A PDB's label selector in core's form (the same matchLabels/matchExpressions shape).
fn pdb_selector(pdb: &PodDisruptionBudget) -> Option<Selector> {
    let s = pdb.spec.as_ref()?.selector.as_ref()?;
    serde_json::from_value(serde_json::to_value(s).ok()?).ok()
}

impl Exec {
    /// An executor over `client`.
    pub fn new(
        client: kube::Client,
        pool_label: Option<String>,
        ready_endpoints: Arc<dyn Fn() -> u32 + Send + Sync>,
    ) -> Self {
        Self {
            client,
            pool_label,
            ready_endpoints,
            component: "flotilla-agent".into(),
        }
    }

    /// Run one step to its end.
    pub async fn run(&self, step: &Step, progress: &Progress) -> StepStatus {
        self.record_step(step, "Running").await;
        let out = match &step.kind {
            StepKind::Preflight { pool, green } => self.preflight(pool, green).await,
            StepKind::ProvisionGreen {
                pool,
                green,
                target,
            } => self.provision(&step.campaign, pool, green, *target).await,
            StepKind::WaitGreenReady {
                green,
                target,
                timeout,
            } => self.wait_green(green, *target, *timeout, progress).await,
            StepKind::CordonBlue { nodes } => self.cordon(&step.campaign, nodes, true).await,
            StepKind::DrainBatch {
                index,
                nodes,
                rules,
            } => self.drain(step, *index, nodes, rules, progress).await,
            StepKind::RetireBlue { pool, nodes, last } => {
                self.retire(pool, nodes, *last, progress).await
            }
            StepKind::CheckHealth { pool, green } => self.health(pool, green).await,
            StepKind::RollBack {
                pool,
                green,
                blue,
                rules,
            } => {
                self.roll_back(&step.campaign, pool, green, *blue, rules, progress)
                    .await
            }
        };
        self.record_step(step, if out.is_ok() { "Done" } else { "Failed" })
            .await;
        match out {
            Ok(o) => StepStatus::Done(o),
            Err(f) => StepStatus::Failed {
                kind: f.kind,
                reason: f.reason,
                blocked: f.blocked,
            },
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    async fn list_nodes(&self) -> Result<Vec<Node>, Fail> {
        Ok(self.nodes().list(&ListParams::default()).await?.items)
    }

    /// Look at the nodes until `pending` says nothing is left to wait for (`None`), saying
    /// what it waits for as progress; past `timeout`, fail with that.
    async fn wait_nodes(
        &self,
        timeout: Duration,
        kind: FailureKind,
        progress: &Progress,
        mut pending: impl FnMut(&[Node]) -> Option<String>,
    ) -> Result<(), Fail> {
        let until = tokio::time::Instant::now() + timeout;
        let mut poll = Backoff::new();
        loop {
            let Some(what) = pending(&self.list_nodes().await?) else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= until {
                return Err(fail(kind, format!("{what} after {}s", timeout.as_secs())));
            }
            progress.say(what, Vec::new()).await;
            poll.wait().await;
        }
    }

    fn in_pool(&self, pool: &PoolRef, n: &Node) -> bool {
        let l = labels(n);
        match pool {
            PoolRef::Name(p) => {
                flotilla_core::inventory::node_pool(&l, self.pool_label.as_deref()).as_deref()
                    == Some(p.as_str())
            }
            PoolRef::MachineDeployment(md) => l.get(MD_LABEL) == Some(md),
            PoolRef::Selector(s) => s.matches(&l),
        }
    }

    /// The blue pool's nodes, oldest first (drain order). Never a campaign's own green nodes,
    /// which carry blue's template labels too.
    async fn blue_nodes(&self, pool: &PoolRef) -> Result<Vec<Node>, Fail> {
        let green = self.green_mds().await?;
        let mut v: Vec<Node> = self
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| self.in_pool(pool, n))
            .filter(|n| !labels(n).get(MD_LABEL).is_some_and(|m| green.contains(m)))
            .collect();
        v.sort_by_key(|n| (n.metadata.creation_timestamp.clone().map(|t| t.0), name(n)));
        Ok(v)
    }

    /// Blue's MachineDeployment: named, or the one its nodes belong to.
    async fn blue_md(&self, pool: &PoolRef) -> Result<Option<DynamicObject>, Fail> {
        let md_name = match pool {
            PoolRef::MachineDeployment(md) => Some(md.clone()),
            _ => self
                .blue_nodes(pool)
                .await?
                .first()
                .and_then(|n| labels(n).get(MD_LABEL).cloned()),
        };
        let Some(md_name) = md_name else {
            return Ok(None);
        };
        self.find_md(&md_name).await
    }

    async fn find_md(&self, md_name: &str) -> Result<Option<DynamicObject>, Fail> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
        let list = api.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some(md_name)))
    }

    fn md_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &md_resource())
    }

    fn green_name(blue: &str, given: &Option<String>) -> String {
        given.clone().unwrap_or_else(|| format!("{blue}-green"))
    }

    /// The green nodes: of green's MachineDeployment, or matching the external selector.
    async fn green_nodes(&self, pool: &PoolRef, green: &Provisioner) -> Result<Vec<Node>, Fail> {
        let all = self.list_nodes().await?;
        Ok(match green {
            Provisioner::External { node_selector } => all
                .into_iter()
                .filter(|n| node_selector.matches(&labels(n)))
                .collect(),
            Provisioner::ClusterApi { name, .. } => {
                let blue = match pool {
                    PoolRef::MachineDeployment(md) => Some(md.clone()),
                    _ => all
                        .iter()
                        .filter(|n| self.in_pool(pool, n))
                        .find_map(|n| labels(n).get(MD_LABEL).cloned()),
                };
                // After the last retirement blue has no nodes to name it by: green is then
                // found by the campaign's annotation on its MachineDeployment's nodes.
                let green_name = match (blue, name) {
                    (Some(b), _) => Self::green_name(&b, name),
                    (None, Some(n)) => n.clone(),
                    (None, None) => return Ok(Vec::new()),
                };
                all.into_iter()
                    .filter(|n| labels(n).get(MD_LABEL) == Some(&green_name))
                    .collect()
            }
        })
    }

    async fn preflight(&self, pool: &PoolRef, green: &Provisioner) -> Outcome {
        let blue = self.blue_nodes(pool).await?;
        let mut report = PreflightReport::default();
        if blue.is_empty() {
            report.unsupported = Some(format!("no node is in the pool {pool:?}"));
            return Ok(StepOutput::Preflight(report));
        }
        if let Provisioner::ClusterApi { .. } = green {
            let mds: BTreeSet<String> = blue
                .iter()
                .filter_map(|n| labels(n).get(MD_LABEL).cloned())
                .collect();
            if mds.len() > 1 {
                report.unsupported = Some(format!(
                    "the pool spans MachineDeployments {}: name one per campaign (pool.machineDeployment or a narrower selector)",
                    mds.into_iter().collect::<Vec<_>>().join(", ")
                ));
                return Ok(StepOutput::Preflight(report));
            }
            match self.blue_md(pool).await? {
                None => {
                    report.unsupported = Some(
                        "the pool's nodes belong to no Cluster API MachineDeployment (use green.external)"
                            .into(),
                    );
                    return Ok(StepOutput::Preflight(report));
                }
                Some(md) => {
                    let ann = md.metadata.annotations.clone().unwrap_or_default();
                    let quota = ann
                        .get(QUOTA_ANNOTATION)
                        .and_then(|q| q.parse::<u32>().ok());
                    let used = ann
                        .get(QUOTA_USED_ANNOTATION)
                        .and_then(|q| q.parse::<u32>().ok())
                        .unwrap_or(blue.len() as u32);
                    report.quota_headroom = quota.map(|q| q.saturating_sub(used));
                }
            }
        }
        for n in &blue {
            let l = labels(n);
            let ours = n
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(CAMPAIGN_ANNOTATION));
            let held = match l.get(GPU_UPGRADE_STATE) {
                Some(s) if s != "upgrade-done" => Some(format!(
                    "the GPU Operator's driver upgrade holds it ({GPU_UPGRADE_STATE}={s})"
                )),
                _ if cordoned(n) && !ours => Some("cordoned by someone else".into()),
                _ => None,
            };
            match held {
                Some(reason) => report.held.push(HeldNode {
                    node: name(n),
                    reason,
                }),
                None => {
                    report.blue_nodes.push(name(n));
                    report.blue_gpu_allocatable += gpus(n, "allocatable");
                }
            }
        }
        // PDBs that allow no disruption now, with their pods on blue.
        let on_blue: BTreeSet<String> = report.blue_nodes.iter().cloned().collect();
        let pods: Vec<Pod> = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| on_blue.contains(n))
            })
            .collect();
        let pdbs = Api::<PodDisruptionBudget>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        for pdb in pdbs {
            let allowed = pdb.status.as_ref().map_or(0, |s| s.disruptions_allowed);
            let Some(sel) = pdb_selector(&pdb) else {
                continue;
            };
            let ns = pdb.metadata.namespace.clone().unwrap_or_default();
            let covered: Vec<String> = pods
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|p| sel.matches(&p.metadata.labels.clone().unwrap_or_default()))
                .map(|p| format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()))
                .collect();
            if allowed == 0 && !covered.is_empty() {
                report.blocking_pdbs.push(BlockingPdb {
                    pdb: format!("{ns}/{}", pdb.metadata.name.clone().unwrap_or_default()),
                    pods: covered.into_iter().take(5).collect(),
                });
            }
        }
        report.ready_endpoints = (self.ready_endpoints)();
        Ok(StepOutput::Preflight(report))
    }

    async fn provision(
        &self,
        campaign: &str,
        pool: &PoolRef,
        green: &Provisioner,
        target: u32,
    ) -> Outcome {
        let Provisioner::ClusterApi {
            name,
            version,
            template,
        } = green
        else {
            // Something else provisions green; WaitGreenReady waits for it.
            return Ok(StepOutput::None);
        };
        let Some(blue) = self.blue_md(pool).await? else {
            return Err(fail(
                FailureKind::Provisioning,
                "the blue pool's MachineDeployment is gone",
            ));
        };
        let ns = blue.metadata.namespace.clone().unwrap_or_default();
        let blue_name = blue.metadata.name.clone().unwrap_or_default();
        let green_name = Self::green_name(&blue_name, name);
        let api = self.md_api(&ns);
        if api.get_opt(&green_name).await?.is_some() {
            let patch = json!({"spec": {"replicas": target}});
            api.patch(&green_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            return Ok(StepOutput::None);
        }
        // Green is blue's MachineDeployment under a new name, with the changed fields.
        let mut spec = blue.data["spec"].clone();
        spec["replicas"] = json!(target);
        spec["selector"]["matchLabels"][MD_LABEL] = json!(green_name);
        spec["template"]["metadata"]["labels"][MD_LABEL] = json!(green_name);
        if let Some(v) = version {
            spec["template"]["spec"]["version"] = json!(v);
        }
        if let Some(t) = template {
            json_patch::merge(&mut spec["template"]["spec"], t);
        }
        let mut labels = blue.metadata.labels.clone().unwrap_or_default();
        labels.insert(MD_LABEL.into(), green_name.clone());
        let mut annotations = BTreeMap::new();
        annotations.insert(CAMPAIGN_ANNOTATION.to_string(), campaign.to_string());
        annotations.insert("flotilla.io/blue".to_string(), blue_name);
        let mut obj = DynamicObject::new(&green_name, &md_resource()).within(&ns);
        obj.metadata.labels = Some(labels);
        obj.metadata.annotations = Some(annotations);
        obj.data = json!({"spec": spec});
        api.create(&PostParams::default(), &obj).await?;
        Ok(StepOutput::None)
    }

    async fn wait_green(
        &self,
        green: &Provisioner,
        target: u32,
        timeout: Duration,
        progress: &Progress,
    ) -> Outcome {
        let until = tokio::time::Instant::now() + timeout;
        // The pool reference only matters for naming green of a Cluster API pool, which the
        // MachineDeployment label on the nodes already does here.
        let mut poll = Backoff::new();
        loop {
            let nodes = self.green_nodes_any(green).await?;
            let good = nodes.iter().filter(|n| ready_with_gpus(n)).count() as u32;
            if good >= target {
                return Ok(StepOutput::None);
            }
            let why = self.green_pending_reason(green).await;
            progress
                .say(
                    format!("{good} of {target} green nodes Ready with their GPUs{why}"),
                    Vec::new(),
                )
                .await;
            if tokio::time::Instant::now() >= until {
                return Err(fail(
                    FailureKind::Provisioning,
                    format!(
                        "{good} of {target} green nodes Ready with their GPUs after {}s{why}",
                        timeout.as_secs()
                    ),
                ));
            }
            poll.wait().await;
        }
    }

    /// Green's nodes without knowing blue: by the campaign's MachineDeployment label.
    async fn green_nodes_any(&self, green: &Provisioner) -> Result<Vec<Node>, Fail> {
        match green {
            Provisioner::External { .. } => {
                self.green_nodes(&PoolRef::Name(String::new()), green).await
            }
            Provisioner::ClusterApi { .. } => {
                let mds = self.green_mds().await?;
                Ok(self
                    .list_nodes()
                    .await?
                    .into_iter()
                    .filter(|n| labels(n).get(MD_LABEL).is_some_and(|m| mds.contains(m)))
                    .collect())
            }
        }
    }

    /// MachineDeployments a campaign created (green ones).
    async fn green_mds(&self) -> Result<BTreeSet<String>, Fail> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|m| {
                m.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(CAMPAIGN_ANNOTATION))
            })
            .filter_map(|m| m.metadata.name)
            .collect())
    }

    /// Why green is not there yet, from its MachineDeployment's Ready condition.
    async fn green_pending_reason(&self, green: &Provisioner) -> String {
        if !matches!(green, Provisioner::ClusterApi { .. }) {
            return String::new();
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
        let Ok(list) = api.list(&ListParams::default()).await else {
            return String::new();
        };
        list.items
            .iter()
            .filter(|m| {
                m.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(CAMPAIGN_ANNOTATION))
            })
            .filter_map(|m| m.data["status"]["conditions"].as_array())
            .flatten()
            .find(|c| c["type"] == "Ready" && c["status"] == "False")
            .and_then(|c| c["message"].as_str())
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    }

    async fn cordon(&self, campaign: &str, nodes: &[String], on: bool) -> Outcome {
        for n in nodes {
            let patch = if on {
                json!({"metadata": {"annotations": {
                           CAMPAIGN_ANNOTATION: campaign,
                           NODE_STATE_ANNOTATION: "cordoned"}},
                       "spec": {"unschedulable": true}})
            } else {
                json!({"metadata": {"annotations": {
                           CAMPAIGN_ANNOTATION: null,
                           NODE_STATE_ANNOTATION: null,
                           DRAIN_STARTED_ANNOTATION: null}},
                       "spec": {"unschedulable": null}})
            };
            match self
                .nodes()
                .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let (reason, what) = if on {
                        ("Cordoned", "cordoned for an upgrade campaign")
                    } else {
                        ("Uncordoned", "uncordoned: the upgrade campaign rolled back")
                    };
                    self.event(n, reason, &format!("{what} ({campaign})")).await;
                }
                // A node that is gone needs no cordon.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(StepOutput::None)
    }

    /// Mark `nodes` as draining for `step` (`<campaign>/<seq>`), recording when each started
    /// unless it already did; how long ago the earliest recorded start was.
    async fn mark_draining(&self, step: &str, nodes: &[String]) -> Result<Duration, Fail> {
        let now = jiff::Timestamp::now();
        let mut earliest = now;
        for n in nodes {
            let Some(node) = self.nodes().get_opt(n).await? else {
                continue;
            };
            let recorded = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DRAIN_STARTED_ANNOTATION))
                .and_then(|v| drain_started(v, step));
            let patch = match recorded {
                Some(t) => {
                    earliest = earliest.min(t);
                    json!({"metadata": {"annotations": {NODE_STATE_ANNOTATION: "draining"}}})
                }
                None => json!({"metadata": {"annotations": {
                    NODE_STATE_ANNOTATION: "draining",
                    DRAIN_STARTED_ANNOTATION: format!("{step}@{now}")}}}),
            };
            self.nodes()
                .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(Duration::try_from(now.duration_since(earliest)).unwrap_or_default())
    }

    /// Record where a node is in its campaign.
    async fn node_state(&self, node: &str, state: &str) -> Result<(), Fail> {
        let patch = json!({"metadata": {"annotations": {NODE_STATE_ANNOTATION: state}}});
        match self
            .nodes()
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Record the campaign's step on its green MachineDeployments (best effort: the record
    /// is for readers; the hub's store is the campaign's truth).
    async fn record_step(&self, step: &Step, state: &str) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
        let Ok(list) = api.list(&ListParams::default()).await else {
            return;
        };
        let value = format!("{} {} {state}", step.seq, step.kind.name());
        for md in list.items {
            let ours = md
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(CAMPAIGN_ANNOTATION))
                .is_some_and(|c| *c == step.campaign);
            let (Some(name), Some(ns)) = (md.metadata.name, md.metadata.namespace) else {
                continue;
            };
            if !ours {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {STEP_ANNOTATION: value}}});
            if let Err(e) = self
                .md_api(&ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(error = %e, md = %name, "could not record the step");
            }
        }
    }

    /// Write an Event on a node, as Cluster API does on the nodes it drains.
    async fn event(&self, node: &str, reason: &str, message: &str) {
        use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let now = Time(jiff::Timestamp::now());
        let ev = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!("{node}.")),
                namespace: Some("default".into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some("Node".into()),
                name: Some(node.into()),
                api_version: Some("v1".into()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some("Normal".into()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                ..Default::default()
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::debug!(error = %e, "could not write an event");
        }
    }

    async fn pods_on(&self, node: &str) -> Result<Vec<Pod>, Fail> {
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        Ok(Api::<Pod>::all(self.client.clone()).list(&lp).await?.items)
    }

    /// The PDB that selects `pod` (for saying what blocks an eviction).
    async fn pdb_of(&self, pod: &PodFacts) -> Option<String> {
        let pdbs = Api::<PodDisruptionBudget>::namespaced(self.client.clone(), &pod.namespace)
            .list(&ListParams::default())
            .await
            .ok()?;
        pdbs.items.iter().find_map(|pdb| {
            pdb_selector(pdb)
                .filter(|s| !s.is_empty() && s.matches(&pod.labels))
                .map(|_| {
                    let allowed = pdb.status.as_ref().map_or(0, |s| s.disruptions_allowed);
                    format!(
                        "PodDisruptionBudget {}/{} allows {allowed} disruption(s)",
                        pod.namespace,
                        pdb.metadata.name.clone().unwrap_or_default()
                    )
                })
        })
    }

    async fn drain(
        &self,
        step: &Step,
        index: u32,
        nodes: &[String],
        rules: &DrainRules,
        progress: &Progress,
    ) -> Outcome {
        let campaign = step.campaign.as_str();
        // Cordoned already (CordonBlue), but a node drained on its own is cordoned here too.
        self.cordon(campaign, nodes, true).await?;
        for n in nodes {
            self.event(
                n,
                "Draining",
                &format!("draining for an upgrade campaign ({campaign}, batch {index})"),
            )
            .await;
        }
        // The timeout counts from the first start recorded on the nodes (a restarted agent
        // resumes the drain, it does not get a fresh budget).
        let already = self
            .mark_draining(&format!("{campaign}/{}", step.seq), nodes)
            .await?;
        let started = tokio::time::Instant::now()
            .checked_sub(already)
            .unwrap_or_else(tokio::time::Instant::now);
        let mut report = DrainReport::default();
        let mut pending: BTreeSet<String> = nodes.iter().cloned().collect();
        let mut poll = Backoff::new();
        loop {
            let mut blocked = Vec::new();
            for n in pending.clone() {
                match self
                    .drain_pass(&n, rules, started.elapsed(), &mut report)
                    .await?
                {
                    Pass::Empty => {
                        pending.remove(&n);
                        self.node_state(&n, "drained").await?;
                        report.drained.push(n.clone());
                        self.event(&n, "Drained", &format!("drained ({campaign})"))
                            .await;
                    }
                    Pass::Busy(b) => blocked.extend(b),
                }
            }
            if pending.is_empty() {
                return Ok(StepOutput::Drain(report));
            }
            blocked.truncate(MAX_BLOCKED);
            let elapsed = started.elapsed();
            if elapsed >= rules.timeout_per_node {
                match rules.on_undrainable {
                    OnUndrainable::Quarantine => {
                        for n in &pending {
                            let patch = json!({"metadata": {
                                "labels": {QUARANTINE_LABEL: "Quarantined"},
                                "annotations": {NODE_STATE_ANNOTATION: "quarantined"}}});
                            self.nodes()
                                .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                                .await?;
                            self.event(
                                n,
                                "Quarantined",
                                "left cordoned with its pods: it could not be drained in time",
                            )
                            .await;
                        }
                        report.quarantined.extend(pending);
                        return Ok(StepOutput::Drain(report));
                    }
                    // Forced pods still terminate within their grace period.
                    OnUndrainable::ForceAfter(d)
                        if elapsed < rules.timeout_per_node + d + FORCED_GRACE => {}
                    _ => {
                        return Err(Fail {
                            kind: FailureKind::Undrainable,
                            reason: format!(
                                "{} not drained within {}s",
                                pending.iter().cloned().collect::<Vec<_>>().join(", "),
                                rules.timeout_per_node.as_secs()
                            ),
                            blocked,
                        });
                    }
                }
            }
            progress
                .say(
                    format!(
                        "batch {index}: {} of {} node(s) drained",
                        nodes.len() - pending.len(),
                        nodes.len()
                    ),
                    blocked,
                )
                .await;
            poll.wait().await;
        }
    }

    /// One pass over a node: evict what may go; whether it is empty now.
    async fn drain_pass(
        &self,
        node: &str,
        rules: &DrainRules,
        elapsed: Duration,
        report: &mut DrainReport,
    ) -> Result<Pass, Fail> {
        let mut blocked = Vec::new();
        let force = match rules.on_undrainable {
            OnUndrainable::ForceAfter(d) => elapsed >= rules.timeout_per_node + d,
            _ => false,
        };
        for p in self.pods_on(node).await? {
            let f = pod_facts(&p);
            let api = Api::<Pod>::namespaced(self.client.clone(), &f.namespace);
            let block = |reason: String| BlockedPod {
                pod: f.key(),
                node: node.to_string(),
                reason,
            };
            match drain::decide(&f, rules) {
                Disposition::Leave(_) => {}
                Disposition::AwaitGone => blocked.push(block("terminating".into())),
                Disposition::Refuse(why) => blocked.push(block(why)),
                Disposition::WaitCompleted(deadline) if elapsed < deadline => {
                    blocked.push(block(format!(
                        "waiting for it to complete (up to {}s)",
                        deadline.as_secs()
                    )));
                }
                Disposition::WaitCompleted(_) | Disposition::Evict => {
                    if force {
                        // forceAfter: the explicit opt-in to delete past the budget.
                        match api.delete(&f.name, &self.delete_params(rules)).await {
                            Ok(_) => report.forced.push(f.key()),
                            Err(kube::Error::Api(e)) if e.code == 404 => {}
                            Err(e) => return Err(e.into()),
                        }
                        blocked.push(block("deleted past its budget (forceAfter)".into()));
                        continue;
                    }
                    let ep = EvictParams {
                        delete_options: Some(self.delete_params(rules)),
                        ..Default::default()
                    };
                    match api.evict(&f.name, &ep).await {
                        Ok(_) => blocked.push(block("evicted; terminating".into())),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(kube::Error::Api(e)) if e.code == 429 => {
                            let why = self
                                .pdb_of(&f)
                                .await
                                .unwrap_or_else(|| "a PodDisruptionBudget".into());
                            blocked.push(block(why));
                        }
                        Err(kube::Error::Api(e)) if e.code == 500 => {
                            blocked.push(block(format!("cannot be evicted: {}", e.message)));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(if blocked.is_empty() {
            Pass::Empty
        } else {
            Pass::Busy(blocked)
        })
    }

    fn delete_params(&self, rules: &DrainRules) -> DeleteParams {
        DeleteParams {
            grace_period_seconds: rules.grace_period.map(|d| d.as_secs() as u32),
            ..Default::default()
        }
    }

    async fn retire(
        &self,
        pool: &PoolRef,
        nodes: &[String],
        last: bool,
        progress: &Progress,
    ) -> Outcome {
        let md = self.blue_md(pool).await?;
        // Mark the drained nodes as the ones to remove, so Cluster API does not pick others.
        for n in nodes {
            let patch = json!({"metadata": {"annotations": {DELETE_MACHINE: "true"}}});
            match self
                .nodes()
                .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(node) => self.mark_machine(&node).await?,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(md) = &md {
            let ns = md.metadata.namespace.clone().unwrap_or_default();
            let md_name = md.metadata.name.clone().unwrap_or_default();
            let present = self.blue_nodes(pool).await?;
            let gone_already = nodes
                .iter()
                .filter(|n| !present.iter().any(|p| name(p) == **n))
                .count() as i64;
            let replicas = md.data["spec"]["replicas"].as_i64().unwrap_or(0);
            let want = if last {
                // Only nodes left in place (quarantined) stay.
                present.iter().filter(|n| !nodes.contains(&name(n))).count() as i64
            } else {
                (replicas - (nodes.len() as i64 - gone_already)).max(0)
            };
            if want != replicas {
                let patch = json!({"spec": {"replicas": want}});
                self.md_api(&ns)
                    .patch(&md_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
        // Done when the nodes are gone (Cluster API drains and deletes them; they are empty).
        self.wait_nodes(RETIRE_TIMEOUT, FailureKind::Other, progress, |all| {
            let present: BTreeSet<String> = all.iter().map(name).collect();
            let left = nodes.iter().filter(|n| present.contains(*n)).count();
            (left > 0).then(|| format!("{left} retired blue node(s) still present"))
        })
        .await?;
        Ok(StepOutput::None)
    }

    /// Put the delete-machine annotation on the node's Machine too, when it names one (real
    /// Cluster API reads it there; kube-sim, which has no Machines, on the node).
    async fn mark_machine(&self, node: &Node) -> Result<(), Fail> {
        let ann = node.metadata.annotations.clone().unwrap_or_default();
        let (Some(machine), Some(ns)) = (
            ann.get(MACHINE_ANNOTATION),
            ann.get("cluster.x-k8s.io/cluster-namespace"),
        ) else {
            return Ok(());
        };
        let res = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta1", "Machine"),
            "machines",
        );
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &res);
        let patch = json!({"metadata": {"annotations": {DELETE_MACHINE: "true"}}});
        match api
            .patch(machine, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn health(&self, pool: &PoolRef, green: &Provisioner) -> Outcome {
        let green_nodes = self.green_nodes(pool, green).await?;
        let green_nodes = if green_nodes.is_empty() {
            self.green_nodes_any(green).await?
        } else {
            green_nodes
        };
        let now = jiff::Timestamp::now();
        let pending: Vec<u64> = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().fields("status.phase=Pending"))
            .await?
            .items
            .iter()
            .filter(|p| requests_gpu(p) && p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| now.duration_since(t.0).as_secs().max(0) as u64)
            })
            .collect();
        Ok(StepOutput::Health(HealthReport {
            green_nodes: green_nodes.len() as u32,
            green_ready: green_nodes.iter().filter(|n| ready_with_gpus(n)).count() as u32,
            green_gpu_allocatable: green_nodes.iter().map(|n| gpus(n, "allocatable")).sum(),
            ready_endpoints: (self.ready_endpoints)(),
            gpu_pods_pending: pending.len() as u32,
            longest_gpu_pending_secs: pending.into_iter().max().unwrap_or(0),
        }))
    }

    async fn roll_back(
        &self,
        campaign: &str,
        pool: &PoolRef,
        green: &Provisioner,
        blue: u32,
        rules: &DrainRules,
        progress: &Progress,
    ) -> Outcome {
        // Blue first: uncordon what this campaign cordoned, and bring back retired nodes.
        let ours: Vec<String> = self
            .list_nodes()
            .await?
            .iter()
            .filter(|n| self.in_pool(pool, n))
            .filter(|n| {
                n.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(CAMPAIGN_ANNOTATION))
                    .is_some_and(|c| c == campaign)
            })
            .map(name)
            .collect();
        self.cordon(campaign, &ours, false).await?;
        if let Some(md) = self.blue_md_by_campaign(pool, green).await? {
            let ns = md.metadata.namespace.clone().unwrap_or_default();
            let md_name = md.metadata.name.clone().unwrap_or_default();
            if md.data["spec"]["replicas"].as_i64().unwrap_or(0) < i64::from(blue) {
                let patch = json!({"spec": {"replicas": blue}});
                self.md_api(&ns)
                    .patch(&md_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            // Blue serves again before green goes.
            self.wait_nodes(
                rules.timeout_per_node,
                FailureKind::Provisioning,
                progress,
                |all| {
                    let good = all
                        .iter()
                        .filter(|n| labels(n).get(MD_LABEL) == Some(&md_name))
                        .filter(|n| ready_with_gpus(n) && !cordoned(n))
                        .count() as u32;
                    (good < blue).then(|| format!("rollback: {good} of {blue} blue nodes back"))
                },
            )
            .await?;
        }
        // Then green: Cluster API drains a deleted MachineDeployment's nodes within PDBs.
        if let Provisioner::ClusterApi { .. } = green {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
            let mine: Vec<DynamicObject> = api
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|m| {
                    m.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(CAMPAIGN_ANNOTATION))
                        .is_some_and(|c| c == campaign)
                })
                .collect();
            for m in &mine {
                let ns = m.metadata.namespace.clone().unwrap_or_default();
                let n = m.metadata.name.clone().unwrap_or_default();
                match self.md_api(&ns).delete(&n, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let names: BTreeSet<String> = mine
                .iter()
                .filter_map(|m| m.metadata.name.clone())
                .collect();
            self.wait_nodes(
                rules.timeout_per_node,
                FailureKind::Undrainable,
                progress,
                |all| {
                    let left = all
                        .iter()
                        .filter(|n| labels(n).get(MD_LABEL).is_some_and(|m| names.contains(m)))
                        .count();
                    (left > 0).then(|| format!("rollback: {left} green node(s) not removed yet"))
                },
            )
            .await?;
        }
        Ok(StepOutput::None)
    }

    /// Blue's MachineDeployment during a rollback: named, found by blue's nodes, or (when
    /// every blue node was retired) named on green's `flotilla.io/blue` annotation.
    async fn blue_md_by_campaign(
        &self,
        pool: &PoolRef,
        green: &Provisioner,
    ) -> Result<Option<DynamicObject>, Fail> {
        if let Some(md) = self.blue_md(pool).await? {
            return Ok(Some(md));
        }
        if !matches!(green, Provisioner::ClusterApi { .. }) {
            return Ok(None);
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &md_resource());
        let blue = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find_map(|m| {
                m.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("flotilla.io/blue").cloned())
            });
        match blue {
            Some(b) => self.find_md(&b).await,
            None => Ok(None),
        }
    }
}

enum Pass {
    Empty,
    Busy(Vec<BlockedPod>),
}
