//! The campaign step executor against kube-sim, driven by the core campaign machine as the
//! hub drives it (without the hub: each step in flight is run by the real executor through
//! kube-rs, and its status fed back):
//!
//! - a bounded-surge rollout moves every GPU pod to green, never over the cap, never past the
//!   PDB after any step, none lost;
//! - a PDB that never allows an eviction: the 429 path, then pause, quarantine or forceAfter;
//! - a bare pod refuses the drain unless `force`; the rules' words name the setting;
//! - DaemonSet and mirror pods stay, emptyDir data holds the drain unless
//!   `deleteEmptyDirData`, a `waitCompleted` pod is waited for until its deadline, then evicted;
//! - green that never becomes Ready rolls back: green removed, blue untouched and uncordoned;
//! - quota: pre-flight lowers the surge to what the quota allows;
//! - an agent restart mid-drain: the same step finishes the drain, counting its timeout from
//!   the start recorded on the node; the nodes and the green MachineDeployment say where the
//!   campaign is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_agent::campaign::Exec;
use flotilla_agent::campaign::exec::Progress;
use flotilla_core::campaign::machine::{Campaign, Ctx, MemberInfo, Phase, RunState};
use flotilla_core::campaign::plan::{Member, snapshot};
use flotilla_core::campaign::step::{StepKind, StepStatus};
use flotilla_core::health::Health;
use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

fn scenario(quota: Option<u32>, pdb: &str, replicas: u32) -> String {
    let quota = quota.map(|q| format!("quota: {q}")).unwrap_or_default();
    format!(
        r#"
clusters:
  - name: east
    provider: cluster-api
    timing: {{node_ready_ms: 20, device_plugin_ms: 20, pod_start_ms: 20, grace_second_ms: 1}}
    pools:
      - name: gpu
        count: 4
        {quota}
        gpu: {{vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - name: llm
        namespace: ml
        replicas: {replicas}
        gpus: 4
        {pdb}
"#
    )
}

async fn client(c: &SimCluster) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn spec(extra: serde_json::Value) -> flotilla_core::campaign::spec::Spec {
    let mut v = serde_json::json!({
        "name": "upgrade",
        "pool": {"machineDeployment": "gpu"},
        "green": {"clusterApi": {"version": "v1.35.0"}},
        "stages": [{"name": "all"}],
        "blueGreen": {"batch": 1, "batchSoak": "0s", "finalSoak": "0s", "drainTimeoutPerNode": "3s",
                      "greenReadyTimeout": "5s"},
        "healthGates": {"endpointsReadyPercent": 0},
    });
    for (k, val) in extra.as_object().unwrap() {
        if let (Some(a), Some(b)) = (v[k].as_object_mut(), val.as_object()) {
            for (kk, vv) in b {
                a.insert(kk.clone(), vv.clone());
            }
        } else {
            v[k] = val.clone();
        }
    }
    flotilla_core::campaign::spec::parse_json(&v.to_string()).unwrap()
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Nodes now: (blue, green) counts by MachineDeployment label.
async fn pools(client: &kube::Client) -> (usize, usize, Vec<Node>) {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let md = |n: &Node, m: &str| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("cluster.x-k8s.io/deployment-name"))
            .is_some_and(|v| v == m)
    };
    let blue = nodes.iter().filter(|n| md(n, "gpu")).count();
    let green = nodes.iter().filter(|n| md(n, "gpu-green")).count();
    (blue, green, nodes)
}

async fn llm_pods(client: &kube::Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "ml")
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items
}

/// Run the campaign to its end (or until `stop` says so) with the real executor; after every
/// step, `check` looks at the cluster: blue and green nodes, and the workload's running pods.
async fn drive(
    c: &mut Campaign,
    exec: &Exec,
    client: &kube::Client,
    mut check: impl FnMut(usize, usize, usize),
    stop: impl Fn(&Campaign) -> bool,
) {
    let members: BTreeMap<String, MemberInfo> = [(
        "east".to_string(),
        MemberInfo {
            health: Health::Ready,
            campaigns: true,
        },
    )]
    .into();
    let (out, mut rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ctx = Ctx {
            now_ms: now_ms(),
            term: 1,
            members: &members,
        };
        c.tick(&ctx);
        if c.state.is_final() || stop(c) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no end: {:?} {:#?}",
            c.state,
            c.stages[0].clusters[0]
        );
        let Some((cluster, step)) = c
            .in_flight()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .next()
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let progress = Progress::new(out.clone(), step.campaign.clone(), step.seq);
        eprintln!("step {} {}", step.seq, step.kind.name());
        let st = exec.run(&step, &progress).await;
        eprintln!("  -> {st:?}");
        let ctx = Ctx {
            now_ms: now_ms(),
            term: 1,
            members: &members,
        };
        c.on_status(&ctx, &cluster, step.seq, st);
        let (blue, green, _) = pools(client).await;
        let running = llm_pods(client)
            .await
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        check(blue, green, running);
    }
}

async fn setup(scenario_text: &str) -> (SimFleet, kube::Client, Exec) {
    let fleet = SimFleet::start(
        &Scenario::from_yaml(scenario_text).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let client = client(fleet.cluster("east").unwrap()).await;
    // As the agent builds it: no retry layer under the drain's own 429 handling.
    let kc = Kubeconfig::from_yaml(&fleet.cluster("east").unwrap().kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = false;
    let exec_client = kube::Client::try_from(config).unwrap();
    // Wait for the workload to run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pods = llm_pods(&client).await;
        let running = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if running > 0 && running == pods.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workload not running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exec = Exec::new(exec_client, None, Arc::new(|| 0));
    (fleet, client, exec)
}

fn campaign(spec: flotilla_core::campaign::spec::Spec) -> Campaign {
    let members = [Member {
        name: "east".into(),
        labels: BTreeMap::new(),
    }];
    let snap = snapshot(&spec, &members);
    Campaign::new("c1".into(), spec, snap, now_ms())
}

#[tokio::test]
async fn a_bounded_surge_rollout_moves_gpu_pods_to_green_within_the_cap() {
    let (_fleet, client, exec) = setup(&scenario(None, "pdb: {max_unavailable: 1}", 3)).await;
    let mut c = campaign(spec(serde_json::json!({"surge": 2})));
    let mut max_total = 0;
    drive(
        &mut c,
        &exec,
        &client,
        |b, g, running| {
            max_total = max_total.max(b + g);
            assert!(b + g <= 4 + 2, "over the surge cap: {b} blue + {g} green");
            // maxUnavailable 1 of 3: no step took more than the budget allows.
            assert!(running >= 2, "{running} of 3 pods running: past the PDB");
        },
        |_| false,
    )
    .await;
    assert_eq!(c.state, RunState::Succeeded, "{c:#?}");
    assert_eq!(max_total, 6, "the cap is used");
    // The green MachineDeployment records the campaign's last step, as the agent ran it.
    let mds: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta1", "MachineDeployment"),
            "machinedeployments",
        ),
    );
    let green = mds
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|m| m.metadata.name.as_deref() == Some("gpu-green"))
        .expect("green MachineDeployment");
    let step = green.metadata.annotations.unwrap()["flotilla.io/campaign-step"].clone();
    assert!(step.ends_with(" Done"), "{step}");
    // Only green is left, and every GPU pod runs on it: none lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (blue, green, nodes) = pools(&client).await;
        let green_names: Vec<String> = nodes
            .iter()
            .filter(|n| {
                n.metadata.labels.as_ref().unwrap()["cluster.x-k8s.io/deployment-name"]
                    == "gpu-green"
            })
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        let pods = llm_pods(&client).await;
        let on_green = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| green_names.contains(n))
            })
            .count();
        if blue == 0 && green == 4 && on_green == 3 && pods.len() == 3 {
            // Green runs the new version.
            assert!(nodes.iter().all(|n| {
                n.status
                    .as_ref()
                    .unwrap()
                    .node_info
                    .as_ref()
                    .unwrap()
                    .kubelet_version
                    == "v1.35.0"
            }));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "blue {blue}, green {green}, {on_green} of {} pods Running on green",
            pods.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_pdb_that_never_allows_eviction_pauses_quarantines_or_forces() {
    // One replica with minAvailable 1: every eviction is a 429.
    for policy in ["pause", "quarantine", "forceAfter(1s)"] {
        eprintln!("onUndrainable: {policy}");
        let (_fleet, client, exec) = setup(&scenario(None, "pdb: {min_available: 1}", 1)).await;
        let mut c = campaign(spec(serde_json::json!({
            "blueGreen": {"onUndrainable": policy},
            "surge": "100%",
        })));
        // Drain the node the pod runs on first, so it is the one blocked.
        drive(
            &mut c,
            &exec,
            &client,
            |_, _, _| {},
            |c| {
                let r = &c.stages[0].clusters[0];
                r.held.is_some() || r.phase.is_final() || r.batch >= 4
            },
        )
        .await;
        let r = &c.stages[0].clusters[0];
        match policy {
            "pause" => {
                let held = r.held.as_ref().expect("held by the PDB");
                assert!(held.contains("not drained within 3s"), "{held}");
                assert!(
                    r.blocked
                        .iter()
                        .any(|b| b.reason.contains("PodDisruptionBudget ml/llm")),
                    "{:?}",
                    r.blocked
                );
                assert!(!r.failed);
                // Nothing was evicted past the budget.
                assert_eq!(llm_pods(&client).await.len(), 1);
            }
            "quarantine" => {
                assert_eq!(r.quarantined.len(), 1, "{r:#?}");
                let node = Api::<Node>::all(client.clone())
                    .get(&r.quarantined[0])
                    .await
                    .unwrap();
                assert_eq!(
                    node.metadata.labels.unwrap()["flotilla.io/upgrade-status"],
                    "Quarantined"
                );
            }
            _ => {
                assert!(r.held.is_none() && !r.failed, "{r:#?}");
                assert!(r.batch >= 1);
            }
        }
    }
}

#[tokio::test]
async fn green_that_never_becomes_ready_rolls_back_leaving_blue_serving() {
    let (fleet, client, exec) = setup(&scenario(None, "pdb: {max_unavailable: 1}", 3)).await;
    fleet
        .cluster("east")
        .unwrap()
        .inject(&Fault::BadNewNodes {
            pool: "gpu".into(),
            not_ready: true,
            failed_gpus: 0,
        })
        .unwrap();
    let mut c = campaign(spec(serde_json::json!({"surge": 2})));
    drive(&mut c, &exec, &client, |_, _, _| {}, |_| false).await;
    let r = &c.stages[0].clusters[0];
    assert_eq!(r.phase, Phase::RolledBack, "{r:#?}");
    assert!(r.reason.contains("green nodes Ready"), "{}", r.reason);
    let (blue, green, nodes) = pools(&client).await;
    assert_eq!((blue, green), (4, 0));
    assert!(
        nodes
            .iter()
            .all(|n| n.spec.as_ref().unwrap().unschedulable != Some(true))
    );
    assert_eq!(llm_pods(&client).await.len(), 3);
}

#[tokio::test]
async fn preflight_sees_the_quota_and_lowers_the_surge() {
    let (_fleet, client, exec) = setup(&scenario(Some(5), "pdb: {max_unavailable: 1}", 2)).await;
    let mut c = campaign(spec(serde_json::json!({})));
    let mut max_total = 0;
    drive(
        &mut c,
        &exec,
        &client,
        |b, g, _| max_total = max_total.max(b + g),
        |_| false,
    )
    .await;
    let r = &c.stages[0].clusters[0];
    assert_eq!(r.surge, 1, "{r:#?}");
    assert!(r.reason.contains("quota"), "{}", r.reason);
    assert_eq!(c.state, RunState::Succeeded);
    assert!(max_total <= 5);
}

#[tokio::test]
async fn a_bare_pod_refuses_the_drain_unless_forced() {
    let (_fleet, client, exec) = setup(&scenario(None, "pdb: {max_unavailable: 1}", 1)).await;
    let first = first_node(&client).await;
    let bare: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "scratch", "namespace": "ml"},
        "spec": {"nodeName": first, "containers": [{"name": "c", "image": "busybox"}],
                 "tolerations": [{"operator": "Exists"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &bare)
        .await
        .unwrap();
    let step = drain_step(1, &first, spec(serde_json::json!({})).drain);
    let (out, _rx) = tokio::sync::mpsc::channel(1024);
    let st = exec
        .run(&step, &Progress::new(out.clone(), "c1".into(), 1))
        .await;
    let StepStatus::Failed { blocked, .. } = st else {
        panic!("{st:?}")
    };
    assert!(
        blocked
            .iter()
            .any(|b| b.pod == "ml/scratch" && b.reason.contains("blueGreen.force")),
        "{blocked:?}"
    );
    // The hub sends a changed drain as a new step.
    let mut forced = step.clone();
    forced.seq = 2;
    if let StepKind::DrainBatch { rules, .. } = &mut forced.kind {
        rules.force = true;
    }
    let st = exec.run(&forced, &Progress::new(out, "c1".into(), 1)).await;
    assert!(matches!(st, StepStatus::Done(_)), "{st:?}");
}

/// Step `seq` of campaign `c1`: drain `node` under `rules`.
fn drain_step(
    seq: u64,
    node: &str,
    rules: flotilla_core::campaign::spec::DrainRules,
) -> flotilla_core::campaign::step::Step {
    flotilla_core::campaign::step::Step {
        campaign: "c1".into(),
        seq,
        term: 1,
        kind: StepKind::DrainBatch {
            index: 0,
            nodes: vec![node.to_string()],
            rules,
        },
    }
}

/// The cluster's first node by name.
async fn first_node(client: &kube::Client) -> String {
    let (_, _, nodes) = pools(client).await;
    nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .min()
        .unwrap()
}

/// Step `seq` of campaign `c1`: drain the node the PDB-held pod runs on, within `timeout`;
/// the node and the step.
async fn held_drain(
    client: &kube::Client,
    seq: u64,
    timeout: Duration,
) -> (String, flotilla_core::campaign::step::Step) {
    let pod = llm_pods(client).await.remove(0);
    let node = pod.spec.unwrap().node_name.unwrap();
    let mut rules = spec(serde_json::json!({})).drain;
    rules.timeout_per_node = timeout;
    let step = drain_step(seq, &node, rules);
    (node, step)
}

#[tokio::test]
async fn a_drain_cut_short_by_an_agent_restart_is_finished_by_the_same_step() {
    let (fleet, client, exec) = setup(&scenario(None, "pdb: {min_available: 1}", 1)).await;
    let (node, step) = held_drain(&client, 7, Duration::from_secs(60)).await;
    let (out, _rx) = tokio::sync::mpsc::channel(1024);
    // The agent dies while the PDB holds the drain: the node is cordoned, the pod stays.
    let cut = tokio::time::timeout(
        Duration::from_secs(1),
        exec.run(&step, &Progress::new(out.clone(), "c1".into(), 7)),
    )
    .await;
    assert!(cut.is_err(), "the drain should still be held: {cut:?}");
    drop(exec);
    let n = Api::<Node>::all(client.clone()).get(&node).await.unwrap();
    // Where the node is, recorded on it for the next agent.
    let ann = n.metadata.annotations.clone().unwrap();
    assert_eq!(ann["flotilla.io/campaign-node"], "draining");
    let started = ann["flotilla.io/drain-started"].clone();
    assert!(started.starts_with("c1/7@"), "{started}");
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    assert_eq!(llm_pods(&client).await.len(), 1);
    // The budget allows it now; a new agent gets the same step (the hub sends it again).
    let patch = serde_json::json!({"spec": {"minAvailable": 0}});
    Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(client.clone(), "ml")
        .patch(
            "llm",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let kc = Kubeconfig::from_yaml(&fleet.cluster("east").unwrap().kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = false;
    let restarted = Exec::new(
        kube::Client::try_from(config).unwrap(),
        None,
        Arc::new(|| 0),
    );
    let st = restarted
        .run(&step, &Progress::new(out, "c1".into(), 7))
        .await;
    let StepStatus::Done(flotilla_core::campaign::step::StepOutput::Drain(d)) = st else {
        panic!("{st:?}")
    };
    assert_eq!(d.drained, std::slice::from_ref(&node));
    let ann = Api::<Node>::all(client.clone())
        .get(&node)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    assert_eq!(ann["flotilla.io/campaign-node"], "drained");
    assert_eq!(
        ann["flotilla.io/drain-started"], started,
        "the first start is kept"
    );
    let on_node = llm_pods(&client)
        .await
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    assert_eq!(
        on_node, 0,
        "nothing of the workload is left on the drained node"
    );
}

#[tokio::test]
async fn a_resumed_drain_counts_its_timeout_from_the_first_start() {
    let (_fleet, client, exec) = setup(&scenario(None, "pdb: {min_available: 1}", 1)).await;
    let (_, step) = held_drain(&client, 3, Duration::from_secs(2)).await;
    let (out, _rx) = tokio::sync::mpsc::channel(1024);
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        exec.run(&step, &Progress::new(out, "c1".into(), 3)),
    )
    .await;
    assert!(cut.is_err(), "held by the PDB: {cut:?}");
    // The agent is away past the node's timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (out, mut rx) = tokio::sync::mpsc::channel(1024);
    let st = exec.run(&step, &Progress::new(out, "c1".into(), 3)).await;
    let StepStatus::Failed { reason, .. } = st else {
        panic!("{st:?}")
    };
    assert!(reason.contains("not drained within 2s"), "{reason}");
    // It failed on its first look, without waiting a fresh timeout (no progress was said).
    assert!(rx.try_recv().is_err(), "the resumed drain waited again");
    // A new step (what `resume` sends after a pause) starts its own timeout.
    let again = flotilla_core::campaign::step::Step { seq: 4, ..step };
    let (out, mut rx) = tokio::sync::mpsc::channel(1024);
    let _ = tokio::time::timeout(
        Duration::from_millis(1500),
        exec.run(&again, &Progress::new(out, "c1".into(), 4)),
    )
    .await;
    assert!(rx.try_recv().is_ok(), "the new step waits its own timeout");
}

#[tokio::test]
async fn daemonset_mirror_emptydir_and_wait_completed_pods_follow_the_rules() {
    let (_fleet, client, exec) = setup(&scenario(None, "", 1)).await;
    let node = first_node(&client).await;
    let owned = |kind: &str| {
        serde_json::json!([{"apiVersion": "batch/v1", "kind": kind, "name": "owner",
                            "uid": format!("{kind}-uid"), "controller": true}])
    };
    let pods: [serde_json::Value; 3] = [
        // A static pod's mirror: the kubelet owns it.
        serde_json::json!({"metadata": {"name": "static-probe", "namespace": "ml",
                              "annotations": {"kubernetes.io/config.mirror": "probe"}},
                           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}],
                                    "tolerations": [{"operator": "Exists"}]}}),
        // A controller's pod with emptyDir data.
        serde_json::json!({"metadata": {"name": "cache", "namespace": "ml",
                              "ownerReferences": owned("StatefulSet")},
                           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}],
                                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                                    "tolerations": [{"operator": "Exists"}]}}),
        // A training job's pod, which a rule lets finish first (up to its deadline).
        serde_json::json!({"metadata": {"name": "train", "namespace": "ml",
                              "labels": {"job": "train"}, "ownerReferences": owned("Job")},
                           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}],
                                    "tolerations": [{"operator": "Exists"}]}}),
    ];
    let api = Api::<Pod>::namespaced(client.clone(), "ml");
    for p in pods {
        api.create(&PostParams::default(), &serde_json::from_value(p).unwrap())
            .await
            .unwrap();
    }
    let on_node = || async {
        Api::<Pod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    let daemonset_pods = |names: &[String]| {
        names
            .iter()
            .filter(|n| n.starts_with("nvidia-device-plugin"))
            .count()
    };
    assert_eq!(daemonset_pods(&on_node().await), 1, "{:?}", on_node().await);
    let rules = |extra: serde_json::Value| {
        let mut bg = serde_json::json!({
            "podRules": [{"selector": {"matchLabels": {"job": "train"}},
                          "action": "waitCompleted", "deadline": "1s"}]});
        for (k, v) in extra.as_object().unwrap() {
            bg[k] = v.clone();
        }
        spec(serde_json::json!({ "blueGreen": bg })).drain
    };
    let step = |seq, rules| drain_step(seq, &node, rules);
    let (out, mut rx) = tokio::sync::mpsc::channel(1024);
    let st = exec
        .run(
            &step(1, rules(serde_json::json!({}))),
            &Progress::new(out, "c1".into(), 1),
        )
        .await;
    // The emptyDir pod holds the drain past its timeout, and says which setting frees it.
    let StepStatus::Failed { blocked, .. } = &st else {
        panic!("{st:?}")
    };
    assert!(
        blocked
            .iter()
            .any(|b| b.pod == "ml/cache" && b.reason.contains("deleteEmptyDirData")),
        "{blocked:?}"
    );
    // The training pod was waited for while its deadline lasted, then evicted.
    let mut waited = false;
    while let Ok(r) = rx.try_recv() {
        waited |= r.status_json.contains("waiting for it to complete");
    }
    assert!(waited, "the training pod was not waited for");
    let left = on_node().await;
    assert!(!left.contains(&"train".to_string()), "{left:?}");
    assert!(left.contains(&"cache".to_string()), "{left:?}");
    // With the setting, the drain finishes; the mirror and DaemonSet pods stay.
    let (out, _rx) = tokio::sync::mpsc::channel(1024);
    let st = exec
        .run(
            &step(2, rules(serde_json::json!({"deleteEmptyDirData": true}))),
            &Progress::new(out, "c1".into(), 2),
        )
        .await;
    assert!(matches!(st, StepStatus::Done(_)), "{st:?}");
    let left = on_node().await;
    assert!(left.contains(&"static-probe".to_string()), "{left:?}");
    assert_eq!(daemonset_pods(&left), 1, "{left:?}");
    assert!(!left.contains(&"cache".to_string()), "{left:?}");
}
