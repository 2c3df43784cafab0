//! `flotctl campaign`: fleet upgrade campaigns: create (or plan with `--dry-run`), list, get
//! (`-w` to follow), describe, and the commands that steer one.

use std::path::PathBuf;

use clap::Subcommand;
use flotilla_api::convert::campaign::campaign_from_info;
use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_core::campaign::machine::{Campaign as Run, ClusterRun, Phase, StagePhase};
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::{Ctx, Failure, Output};
use crate::{age, table, unix_ms_now, when};

/// The campaign commands.
#[derive(Debug, Subcommand)]
pub enum Campaign {
    /// Start a campaign from a spec file (YAML or JSON, `-` for stdin); prints its id.
    Create {
        /// The spec.
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Plan and pre-flight every cluster, change nothing, and print the plan.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every campaign, newest first.
    List,
    /// One campaign's state (`-o json|yaml` for all of it; `-w` to follow its changes).
    Get {
        /// Campaign id.
        id: String,
        /// Print the state, then every change.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Stages, clusters, phases, batches, timings, and the pods that block drains.
    Describe {
        /// Campaign id.
        id: String,
    },
    /// Approve the gate the campaign waits on (or name one, also ahead of time).
    Approve {
        /// Campaign id.
        id: String,
        /// The gate's name.
        #[arg(long)]
        gate: Option<String>,
    },
    /// Send nothing new; steps in flight finish.
    Pause {
        /// Campaign id.
        id: String,
    },
    /// Continue a paused campaign; clusters held by an undrainable node drain again.
    Resume {
        /// Campaign id.
        id: String,
    },
    /// Roll back the clusters in flight and start no more.
    Abort {
        /// Campaign id.
        id: String,
    },
    /// Roll back clusters inside their final soak (one with --cluster).
    Rollback {
        /// Campaign id.
        id: String,
        /// Only this cluster.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Run the failed and skipped clusters again, with the same spec and member snapshot.
    Retry {
        /// Campaign id.
        id: String,
    },
    /// Skip the rest of the final soak.
    Complete {
        /// Campaign id.
        id: String,
    },
}

fn client(ctx: &Ctx) -> CampaignServiceClient<Channel> {
    CampaignServiceClient::new(ctx.channel.clone())
}

/// A campaign write: only the leader takes one, so a replica's answer naming the leader sends
/// it there once (any replica's address works for `--hub`).
async fn write<T, F, Fut>(ctx: &Ctx, call: F) -> Result<T, Failure>
where
    F: Fn(CampaignServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let s = match call(client(ctx)).await {
        Ok(r) => return Ok(r.into_inner()),
        Err(s) => s,
    };
    let leader = s
        .metadata()
        .get(flotilla_api::convert::kv::LEADER_HINT_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|_| s.code() == tonic::Code::Unavailable)
        .map(str::to_string);
    let Some(leader) = leader else {
        return Err(ctx.explain(s));
    };
    let lead = Ctx::connect(leader, ctx.output, ctx.security.clone()).await?;
    call(client(&lead))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| lead.explain(s))
}

fn state_name(s: i32) -> &'static str {
    match v1::CampaignState::try_from(s) {
        Ok(v1::CampaignState::Running) => "Running",
        Ok(v1::CampaignState::Paused) => "Paused",
        Ok(v1::CampaignState::Succeeded) => "Succeeded",
        Ok(v1::CampaignState::Failed) => "Failed",
        Ok(v1::CampaignState::Aborted) => "Aborted",
        _ => "Unknown",
    }
}

fn decode(info: &v1::CampaignInfo) -> Result<Run, Failure> {
    campaign_from_info(info).map_err(|e| (e.to_string(), 1))
}

/// The campaign as JSON: the whole record, as the hub keeps it.
fn as_json(info: &v1::CampaignInfo) -> Value {
    let detail: Value = serde_json::from_str(&info.detail_json).unwrap_or(Value::Null);
    json!({
        "id": info.id,
        "name": info.name,
        "state": state_name(info.state),
        "reason": info.reason,
        "currentStage": info.current_stage,
        "waitingApprovals": info.waiting_approvals,
        "clustersByPhase": info.clusters_by_phase,
        "revision": info.revision,
        "campaign": detail,
    })
}

fn done_count(info: &v1::CampaignInfo) -> (u32, u32) {
    let total = info.clusters_by_phase.values().sum();
    let ended = ["Done", "RolledBack", "Failed", "Skipped"]
        .iter()
        .filter_map(|p| info.clusters_by_phase.get(*p))
        .sum();
    (ended, total)
}

fn row(info: &v1::CampaignInfo, now: i64) -> Vec<String> {
    let (ended, total) = done_count(info);
    let waiting = match info.waiting_approvals.is_empty() {
        true => String::new(),
        false => format!("approve {}", info.waiting_approvals.join(",")),
    };
    vec![
        info.id.clone(),
        state_name(info.state).into(),
        info.current_stage.clone(),
        format!("{ended}/{total}"),
        age(now, info.created_at_unix_ms),
        waiting,
    ]
}

const HEADER: [&str; 6] = ["ID", "STATE", "STAGE", "ENDED", "AGE", "WAITING"];

/// Runs `campaign`.
pub async fn run(ctx: &mut Ctx, c: Campaign) -> Result<(), Failure> {
    let now = unix_ms_now();
    let act =
        |id: String, action: v1::CampaignAction, gate: Option<String>, cluster: Option<String>| {
            v1::CampaignActionRequest {
                id,
                action: action as i32,
                gate: gate.unwrap_or_default(),
                cluster: cluster.unwrap_or_default(),
            }
        };
    let req = match c {
        Campaign::Create { file, dry_run } => {
            let spec_json = super::services::read_policy(&file)?;
            let req = v1::CreateCampaignRequest { spec_json, dry_run };
            let r = write(ctx, |mut c| {
                let req = req.clone();
                async move { c.create_campaign(req).await }
            })
            .await?;
            let info = r.campaign.unwrap_or_default();
            if dry_run {
                let mut v = as_json(&info);
                v["preflightMissing"] = json!(r.preflight_missing);
                let plan = decode(&info)?;
                ctx.print(&v, || {
                    let mut s = describe_text(&plan, &info, now, true);
                    if !r.preflight_missing.is_empty() {
                        s.push_str(&format!(
                            "\nNo pre-flight answer from: {}\n",
                            r.preflight_missing.join(", ")
                        ));
                    }
                    s.push_str("\nDry run: nothing was written or changed.\n");
                    s
                });
            } else {
                ctx.print(&as_json(&info), || format!("{}\n", info.id));
            }
            return Ok(());
        }
        Campaign::List => {
            let r = client(ctx)
                .list_campaigns(v1::ListCampaignsRequest {})
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let v = Value::Array(r.campaigns.iter().map(as_json).collect());
            ctx.print(&v, || {
                table(&HEADER, r.campaigns.iter().map(|i| row(i, now)).collect())
            });
            return Ok(());
        }
        Campaign::Get { id, watch: false } => {
            let info = client(ctx)
                .get_campaign(v1::GetCampaignRequest { id })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            ctx.print(&as_json(&info), || table(&HEADER, vec![row(&info, now)]));
            return Ok(());
        }
        Campaign::Get { id, watch: true } => {
            let mut stream = client(ctx)
                .watch_campaign(v1::GetCampaignRequest { id })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let mut first = true;
            // Most stored changes move one cluster's step; a row is printed when what it shows
            // (besides its age) changed.
            let mut shown: Option<Vec<String>> = None;
            while let Some(info) = stream.message().await.map_err(|s| ctx.explain(s))? {
                match ctx.output {
                    Output::Table => {
                        let r = row(&info, unix_ms_now());
                        let mut key = r.clone();
                        key.remove(4);
                        if shown.as_ref() != Some(&key) {
                            let t = table(&HEADER, vec![r]);
                            // The header once, then a row per change, as kubectl get -w does.
                            let text: String = if first {
                                t
                            } else {
                                t.lines().skip(1).map(|l| format!("{l}\n")).collect()
                            };
                            print!("{text}");
                            shown = Some(key);
                            first = false;
                        }
                    }
                    _ => ctx.print(&as_json(&info), String::new),
                }
                if v1::CampaignState::try_from(info.state).is_ok_and(|s| {
                    matches!(
                        s,
                        v1::CampaignState::Succeeded
                            | v1::CampaignState::Failed
                            | v1::CampaignState::Aborted
                    )
                }) {
                    break;
                }
            }
            return Ok(());
        }
        Campaign::Describe { id } => {
            let info = client(ctx)
                .get_campaign(v1::GetCampaignRequest { id })
                .await
                .map_err(|s| ctx.explain(s))?
                .into_inner();
            let run = decode(&info)?;
            ctx.print(&as_json(&info), || describe_text(&run, &info, now, false));
            return Ok(());
        }
        Campaign::Approve { id, gate } => act(id, v1::CampaignAction::Approve, gate, None),
        Campaign::Pause { id } => act(id, v1::CampaignAction::Pause, None, None),
        Campaign::Resume { id } => act(id, v1::CampaignAction::Resume, None, None),
        Campaign::Abort { id } => act(id, v1::CampaignAction::Abort, None, None),
        Campaign::Rollback { id, cluster } => act(id, v1::CampaignAction::Rollback, None, cluster),
        Campaign::Retry { id } => act(id, v1::CampaignAction::Retry, None, None),
        Campaign::Complete { id } => act(id, v1::CampaignAction::Complete, None, None),
    };
    let info = write(ctx, |mut c| {
        let req = req.clone();
        async move { c.act_on_campaign(req).await }
    })
    .await?;
    ctx.print(&as_json(&info), || table(&HEADER, vec![row(&info, now)]));
    Ok(())
}

/// The pool as the spec names it.
fn pool_text(p: &flotilla_core::campaign::spec::PoolRef) -> String {
    use flotilla_core::campaign::spec::PoolRef;
    match p {
        PoolRef::Name(n) => format!("pool {n}"),
        PoolRef::MachineDeployment(m) => format!("MachineDeployment {m}"),
        PoolRef::Selector(s) => format!("nodes {}", s.describe()),
    }
}

fn ms(d: i64) -> String {
    let s = d.max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        _ => format!("{}m{:02}s", s / 60, s % 60),
    }
}

fn cluster_row(c: &ClusterRun, now: i64) -> Vec<String> {
    let nodes = match c.counts.blue {
        0 => "-".to_string(),
        b => format!(
            "{}/{b} drained, {} green",
            c.counts.drained.min(b),
            c.counts.green
        ),
    };
    let took = match (c.started_ms, c.finished_ms) {
        (Some(s), Some(f)) => ms(f - s),
        (Some(s), None) => format!("{} so far", ms(now - s)),
        _ => String::new(),
    };
    let step = c
        .step
        .as_ref()
        .map(|s| format!("{} #{}", s.kind.name(), s.seq))
        .unwrap_or_default();
    let note = match (&c.held, c.reason.is_empty(), c.progress.is_empty()) {
        (Some(h), _, _) => format!("HELD: {h}"),
        (None, false, _) => c.reason.clone(),
        (None, true, false) => c.progress.clone(),
        _ => String::new(),
    };
    vec![
        c.name.clone(),
        format!("{:?}", c.phase),
        nodes,
        step,
        took,
        note,
    ]
}

/// The describe text: header, then each stage with its gates and clusters, then what holds
/// drains and what pre-flight found. A plan (dry run) says so in place of a state.
fn describe_text(c: &Run, info: &v1::CampaignInfo, now: i64, plan: bool) -> String {
    let mut s = String::new();
    s.push_str(&format!("Campaign:   {} ({})\n", c.id, c.spec.name));
    let state = match plan {
        true => "Plan (dry run): pre-flight's findings below",
        false => state_name(info.state),
    };
    s.push_str(&format!("State:      {state}"));
    if !c.reason.is_empty() {
        s.push_str(&format!(": {}", c.reason));
    }
    s.push('\n');
    s.push_str(&format!("Created:    {}\n", when(now, c.created_ms)));
    if let Some(f) = c.finished_ms {
        s.push_str(&format!("Took:       {}\n", ms(f - c.created_ms)));
    }
    s.push_str(&format!(
        "Pool:       {}; surge {}; batch {}; soaks {}s/{}s\n",
        pool_text(&c.spec.pool),
        c.spec.surge.describe(),
        c.spec.batch.describe(),
        c.spec.batch_soak.as_secs(),
        c.spec.final_soak.as_secs()
    ));
    s.push_str(&format!(
        "Failures:   {} (campaign budget {})\n",
        c.failures(),
        c.budget
    ));
    if !c.unselected.is_empty() {
        s.push_str(&format!("Not in any stage: {}\n", c.unselected.join(", ")));
    }
    for (i, st) in c.stages.iter().enumerate() {
        let spec = &c.spec.stages[i];
        let phase = match st.phase {
            StagePhase::BeforeGate(g) => format!(
                "waiting on gate {}",
                spec.before_gates.get(g).map_or("?", |g| g.name.as_str())
            ),
            StagePhase::AfterGate(g) => format!(
                "waiting on gate {}",
                spec.after_gates.get(g).map_or("?", |g| g.name.as_str())
            ),
            p => format!("{p:?}"),
        };
        s.push_str(&format!(
            "\nStage {} ({}): {phase}; {} at once; failures {}/{} allowed\n",
            i + 1,
            st.name,
            st.concurrency,
            st.failures(),
            st.budget
        ));
        let gates: Vec<String> = spec
            .before_gates
            .iter()
            .map(|g| format!("before {} {:?}", g.name, g.kind))
            .chain(
                spec.after_gates
                    .iter()
                    .map(|g| format!("after {} {:?}", g.name, g.kind)),
            )
            .map(
                |g| match c.approvals.iter().any(|a| g.contains(a.as_str())) {
                    true => format!("{g} (approved)"),
                    false => g,
                },
            )
            .collect();
        if !gates.is_empty() {
            s.push_str(&format!("  Gates: {}\n", gates.join("; ")));
        }
        if st.clusters.is_empty() {
            s.push_str("  (no clusters)\n");
            continue;
        }
        let rows = st.clusters.iter().map(|r| cluster_row(r, now)).collect();
        for line in table(&["CLUSTER", "PHASE", "NODES", "STEP", "TOOK", "NOTE"], rows).lines() {
            s.push_str(&format!("  {line}\n"));
        }
    }
    let blocked: Vec<Vec<String>> = c
        .clusters()
        .flat_map(|(_, r)| {
            r.blocked.iter().map(move |b| {
                vec![
                    r.name.clone(),
                    b.node.clone(),
                    b.pod.clone(),
                    b.reason.clone(),
                ]
            })
        })
        .collect();
    if !blocked.is_empty() {
        s.push_str("\nBlocked pods:\n");
        for line in table(&["CLUSTER", "NODE", "POD", "WHY"], blocked).lines() {
            s.push_str(&format!("  {line}\n"));
        }
    }
    let mut findings = Vec::new();
    for (_, r) in c.clusters() {
        for h in &r.held_nodes {
            findings.push(vec![
                r.name.clone(),
                "held node".into(),
                h.node.clone(),
                h.reason.clone(),
            ]);
        }
        for p in &r.blocking_pdbs {
            findings.push(vec![
                r.name.clone(),
                "PDB allows 0".into(),
                p.pdb.clone(),
                p.pods.join(", "),
            ]);
        }
        if !r.quarantined.is_empty() {
            findings.push(vec![
                r.name.clone(),
                "quarantined".into(),
                r.quarantined.join(", "),
                String::new(),
            ]);
        }
        if r.phase == Phase::Pending && r.counts.blue > 0 {
            findings.push(vec![
                r.name.clone(),
                "plan".into(),
                format!("{} blue node(s), surge {}", r.counts.blue, r.surge),
                r.reason.clone(),
            ]);
        }
    }
    if !findings.is_empty() {
        s.push_str("\nPre-flight findings:\n");
        for line in table(&["CLUSTER", "WHAT", "WHICH", "DETAIL"], findings).lines() {
            s.push_str(&format!("  {line}\n"));
        }
    }
    if !info.waiting_approvals.is_empty() {
        s.push_str(&format!(
            "\nWaiting for approval: flotctl campaign approve {} --gate {}\n",
            c.id, info.waiting_approvals[0]
        ));
    }
    s
}
