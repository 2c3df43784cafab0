//! kube-rs as the client under test: the simulated API must behave like a real one for the
//! code paths the member agent and rollout executor use.

use std::time::Duration;

use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{
    Api, ApiResource, DynamicObject, EvictParams, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Config};
use serde_json::json;

const SCENARIO: &str = r#"
clusters:
  - name: test
    region: eu-west
    zones: [eu-west-a, eu-west-b]
    provider: aks
    timing: {node_ready_ms: 150, device_plugin_ms: 150, pod_start_ms: 50}
    pools:
      - name: h100
        count: 2
        instance_type: nd96
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
      - name: dra
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 4, family: hopper, dra: true}
    workloads:
      - name: llm
        namespace: inference
        replicas: 2
        gpus: 4
        pdb: {min_available: 2}
        service: {port: 8000}
        export: true
"#;

async fn start() -> SimFleet {
    let s = Scenario::from_yaml(SCENARIO).unwrap();
    SimFleet::start(&s, SimOptions::default()).await.unwrap()
}

async fn client(c: &SimCluster) -> Client {
    let kc = Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    // kube retries 429/503 up to 15 times by default; these tests want to see the status.
    cfg.default_retry = false;
    Client::try_from(cfg).unwrap()
}

/// Poll until `f` is true (liveness only; generous timeout, no timing assertion).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn gpus(n: &Node, field: &str) -> i64 {
    let q = match field {
        "capacity" => n.status.as_ref().and_then(|s| s.capacity.as_ref()),
        _ => n.status.as_ref().and_then(|s| s.allocatable.as_ref()),
    };
    q.and_then(|m| m.get("nvidia.com/gpu"))
        .map_or(0, |q| q.0.parse().unwrap())
}

fn is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn ready_pods(pods: &Api<Pod>) -> usize {
    pods.list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| pod_is_ready(p))
        .count()
}

/// A fleet whose `llm` workload has both replicas Ready, and a client for it.
async fn start_settled() -> (SimFleet, Client) {
    let fleet = start().await;
    let client = client(&fleet.clusters()[0]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inference");
    eventually("workload ready", || {
        let p = pods.clone();
        async move { ready_pods(&p).await == 2 }
    })
    .await;
    (fleet, client)
}

fn md_api(client: Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "cluster.x-k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "cluster.x-k8s.io/v1beta1".into(),
        kind: "MachineDeployment".into(),
        plural: "machinedeployments".into(),
    };
    Api::namespaced_with(client, "default", &ar)
}

#[tokio::test]
async fn reflector_follows_nodes_through_a_machine_deployment_scale() {
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(
            nodes.clone(),
            watcher::Config::default().labels("kubernetes.azure.com/agentpool=h100"),
        ),
    )
    .applied_objects()
    .boxed();
    let task = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    reader.wait_until_ready().await.unwrap();
    eventually("two Ready H100 nodes with 8 allocatable GPUs", || {
        let r = reader.clone();
        async move {
            r.state().len() == 2
                && r.state()
                    .iter()
                    .all(|n| is_ready(n) && gpus(n, "allocatable") == 8)
        }
    })
    .await;

    // Scaling the pool's MachineDeployment creates nodes that start NotReady with no GPUs.
    let first_seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        (bool, i64),
    >::new()));
    let seen = first_seen.clone();
    let mut raw = watcher(nodes.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let spy = tokio::spawn(async move {
        while let Some(Ok(n)) = raw.next().await {
            let name = n.metadata.name.clone().unwrap();
            seen.lock()
                .unwrap()
                .entry(name)
                .or_insert((is_ready(&n), gpus(&n, "allocatable")));
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before: std::collections::HashSet<String> =
        first_seen.lock().unwrap().keys().cloned().collect();
    md_api(client.clone())
        .patch(
            "h100",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    eventually("four nodes in the reflector", || {
        let r = reader.clone();
        async move { r.state().len() == 4 }
    })
    .await;
    eventually("new nodes Ready with GPUs advertised", || {
        let r = reader.clone();
        async move {
            r.state()
                .iter()
                .all(|n| is_ready(n) && gpus(n, "allocatable") == 8 && gpus(n, "capacity") == 8)
        }
    })
    .await;
    let new_nodes: Vec<(String, (bool, i64))> = first_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| !before.contains(*n) && n.starts_with("h100-"))
        .map(|(n, s)| (n.clone(), *s))
        .collect();
    assert_eq!(new_nodes.len(), 2, "{new_nodes:?}");
    for (n, (ready, alloc)) in &new_nodes {
        assert!(
            !ready && *alloc == 0,
            "{n} was first seen ready={ready} allocatable={alloc}"
        );
    }
    spy.abort();
    let md = md_api(client.clone()).get("h100").await.unwrap();
    eventually("MachineDeployment status counts ready replicas", || {
        let api = md_api(client.clone());
        async move { api.get("h100").await.unwrap().data["status"]["readyReplicas"] == 4 }
    })
    .await;
    assert_eq!(md.data["spec"]["replicas"], 4);
    // Every node carries the labels the agent reads.
    for n in reader.state() {
        let l = n.metadata.labels.as_ref().unwrap();
        assert_eq!(l["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
        assert_eq!(l["topology.kubernetes.io/region"], "eu-west");
        assert!(l.contains_key("topology.kubernetes.io/zone"));
        assert_eq!(l["node.kubernetes.io/instance-type"], "nd96");
    }
    // Scale down drains each machine's node first, as Cluster API does. A node running an
    // llm pod is marked for deletion first (the delete-machine annotation); its PDB
    // (minAvailable 2 of 2) refuses the eviction, so it stays, cordoned, while the others
    // go and the reflector sees the deletions.
    let llm_node = Api::<Pod>::namespaced(client.clone(), "inference")
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items[0]
        .spec
        .as_ref()
        .unwrap()
        .node_name
        .clone()
        .unwrap();
    nodes
        .patch(
            &llm_node,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"cluster.x-k8s.io/delete-machine": "yes"}}}),
            ),
        )
        .await
        .unwrap();
    md_api(client.clone())
        .patch(
            "h100",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let cordoned = |n: &Node| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    eventually("only the kept node and nodes held by the PDB left", || {
        let r = reader.clone();
        async move {
            let state = r.state();
            state.len() < 4 && state.iter().filter(|n| !cordoned(n)).count() == 1
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = reader
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(llm_node.as_str()))
        .expect("the PDB holds the marked node");
    assert!(cordoned(&held), "a node being removed is cordoned");
    // With the budget relaxed the drain finishes and the node goes.
    Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(
        client.clone(),
        "inference",
    )
    .patch(
        "llm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
    )
    .await
    .unwrap();
    eventually("one node left", || {
        let r = reader.clone();
        async move { r.state().len() == 1 }
    })
    .await;
    task.abort();
    fleet.shutdown().await;
}

#[tokio::test]
async fn watch_from_a_compacted_revision_gets_410_and_the_watcher_relists() {
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "default");
    let old = c.revision();
    for i in 0..3 {
        let cm = serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    c.compact();
    // A raw watch from before the compaction gets an ERROR event with 410 Expired.
    let mut s = cms
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    match s.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 error event, got {other:?}"),
    }

    // A watcher whose connection drops while history is compacted relists (a second Init).
    let events = watcher(cms.clone(), watcher::Config::default()).boxed();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut events = events;
        while let Some(e) = events.next().await {
            if let Ok(e) = e {
                let _ = tx.send(e);
            }
        }
    });
    let mut inits = 0;
    let mut saw = std::collections::HashSet::new();
    // Drain until the initial list completes.
    while let Some(e) = rx.recv().await {
        match e {
            watcher::Event::Init => inits += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    c.inject(&Fault::Unreachable).unwrap();
    let cm = serde_json::from_value(json!({"metadata": {"name": "during-outage"}})).unwrap();
    c.create(
        "configmaps",
        "default",
        serde_json::to_value::<k8s_openapi::api::core::v1::ConfigMap>(cm).unwrap(),
    )
    .unwrap();
    c.compact();
    c.clear(&Fault::Unreachable);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while inits < 2 || !saw.contains("during-outage") {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("watcher recovered")
            .unwrap();
        match e {
            watcher::Event::Init => inits += 1,
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                saw.insert(o.metadata.name.unwrap());
            }
            _ => {}
        }
    }
    assert!(inits >= 2, "the watcher relisted after 410");
    task.abort();
    fleet.shutdown().await;
}

#[tokio::test]
async fn cordon_by_patch_and_the_scheduler_respects_it_and_free_gpus() {
    let (fleet, client) = start_settled().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inference");
    let h100 = nodes
        .list(&ListParams::default().labels("kubernetes.azure.com/agentpool=h100"))
        .await
        .unwrap();
    let cordoned = h100.items[0].metadata.name.clone().unwrap();
    let before: std::collections::HashSet<String> = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={cordoned}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    // kubectl cordon sends exactly this strategic merge patch.
    let n = nodes
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    // Ask for far more GPUs than exist: 6 replicas × 4 GPUs against one schedulable 8-GPU node.
    let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "inference");
    deploys
        .patch(
            "llm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 6}})),
        )
        .await
        .unwrap();
    eventually("six pods exist", || {
        let p = pods.clone();
        async move {
            p.list(&ListParams::default().labels("app=llm"))
                .await
                .unwrap()
                .items
                .len()
                == 6
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items;
    let mut per_node = std::collections::HashMap::<String, i64>::new();
    for p in &all {
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *per_node.entry(node).or_default() += 4;
        }
    }
    for (node, used) in &per_node {
        assert!(*used <= 8, "{node} has {used} GPUs placed on 8");
    }
    // Pods already on the cordoned node stay; no new pod may land there.
    let after: std::collections::HashSet<String> = all
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(cordoned.as_str()))
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert!(
        after.is_subset(&before),
        "cordoned node received new pods: {after:?} vs {before:?}"
    );
    let pending: Vec<&Pod> = all
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().node_name.is_none())
        .collect();
    assert!(!pending.is_empty(), "some pods must stay Pending");
    let msg = pending[0]
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()[0]
        .message
        .clone()
        .unwrap();
    assert!(
        msg.contains("unschedulable") || msg.contains("Insufficient"),
        "{msg}"
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn the_cordoned_node_gets_no_new_pods() {
    let (fleet, client) = start_settled().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inference");
    // Cordon every H100 node, then delete the workload's pods: replacements must stay Pending.
    for n in nodes
        .list(&ListParams::default().labels("kubernetes.azure.com/agentpool=h100"))
        .await
        .unwrap()
    {
        nodes
            .patch(
                &n.metadata.name.unwrap(),
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"unschedulable": true}})),
            )
            .await
            .unwrap();
    }
    pods.delete_collection(
        &Default::default(),
        &ListParams::default().labels("app=llm"),
    )
    .await
    .unwrap();
    eventually("two replacement pods", || {
        let p = pods.clone();
        async move {
            p.list(&ListParams::default().labels("app=llm"))
                .await
                .unwrap()
                .items
                .len()
                == 2
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
    {
        assert_eq!(
            p.spec.unwrap().node_name,
            None,
            "a pod was placed on a cordoned node"
        );
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn evictions_honour_the_pdb() {
    let (fleet, client) = start_settled().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inference");
    let names: Vec<String> = pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    // minAvailable 2 with 2 healthy: no disruption allowed.
    match pods.evict(&names[0], &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 429);
            assert!(s.message.contains("disruption budget"), "{}", s.message);
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // Relax the budget; the eviction then succeeds and the pod is gone.
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(client.clone(), "inference");
    pdbs.patch(
        "llm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
    )
    .await
    .unwrap();
    pods.evict(&names[0], &EvictParams::default())
        .await
        .unwrap();
    assert_eq!(
        pods.get_opt(&names[0])
            .await
            .unwrap()
            .map(|p| p.metadata.name),
        None
    );
    // The PDB status is maintained like the disruption controller's.
    eventually("replacement ready and PDB status current", || {
        let api = pdbs.clone();
        async move {
            let st = api.get("llm").await.unwrap().status.unwrap();
            st.current_healthy == 2 && st.disruptions_allowed == 1
        }
    })
    .await;
    match pods.evict("no-such-pod", &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    fleet.shutdown().await;
}

#[tokio::test]
async fn lists_paginate_select_and_conflict_like_the_api_server() {
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "default");
    for i in 0..7 {
        let cm = serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}"), "labels": {"parity": if i % 2 == 0 { "even" } else { "odd" }}}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(3);
    loop {
        let page = cms.list(&lp).await.unwrap();
        assert!(page.items.len() <= 3);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(names.len(), 7);
    let odd = cms
        .list(&ListParams::default().labels("parity in (odd)"))
        .await
        .unwrap();
    assert_eq!(odd.items.len(), 3);
    let not_even = cms
        .list(&ListParams::default().labels("parity!=even"))
        .await
        .unwrap();
    assert_eq!(not_even.items.len(), 3);
    let one = cms
        .list(&ListParams::default().fields("metadata.name=cm-4"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    match cms
        .list(&ListParams::default().fields("data.colour=red"))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert!(s.code == 400 && s.message.contains("data.colour"), "{s:?}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
    // Optimistic concurrency: a replace with a stale resourceVersion gets 409.
    let mut a = cms.get("cm-0").await.unwrap();
    let b = a.clone();
    a.data = Some([("k".to_string(), "v".to_string())].into());
    cms.replace("cm-0", &PostParams::default(), &a)
        .await
        .unwrap();
    match cms.replace("cm-0", &PostParams::default(), &b).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected 409, got {other:?}"),
    }
    match cms.get("missing").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    // Pods by field selector, as the agent lists non-terminal pods.
    let pods: Api<Pod> = Api::all(client.clone());
    let running = pods
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await
        .unwrap();
    assert!(!running.items.is_empty());
    fleet.shutdown().await;
}

#[tokio::test]
async fn dra_slices_and_endpoint_slices_are_served_typed() {
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    eventually("a DRA slice for the DRA node", || {
        let s = slices.clone();
        async move {
            s.list(&ListParams::default().fields("spec.driver=gpu.nvidia.com"))
                .await
                .unwrap()
                .items
                .len()
                == 1
        }
    })
    .await;
    let s = slices
        .list(&ListParams::default().fields("spec.driver=gpu.nvidia.com"))
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(s.spec.devices.as_ref().unwrap().len(), 4);
    assert_eq!(s.spec.pool.resource_slice_count, 1);
    // Failing a GPU on the DRA node republishes the slice with fewer devices and a new generation.
    let node = s.spec.node_name.clone().unwrap();
    c.inject(&Fault::GpuFailure {
        node: node.clone(),
        count: 1,
    })
    .unwrap();
    eventually("slice shrinks", || {
        let s = slices.clone();
        let node = node.clone();
        async move {
            let l = s
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .unwrap();
            l.items.len() == 1
                && l.items[0].spec.devices.as_ref().unwrap().len() == 3
                && l.items[0].spec.pool.generation == 2
        }
    })
    .await;
    let eps: Api<EndpointSlice> = Api::namespaced(client.clone(), "inference");
    eventually("endpoints ready", || {
        let e = eps.clone();
        async move {
            let l = e
                .list(&ListParams::default().labels("kubernetes.io/service-name=llm"))
                .await
                .unwrap();
            l.items.len() == 1
                && l.items[0]
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
                    .count()
                    == 2
        }
    })
    .await;
    fleet.shutdown().await;
}

#[tokio::test]
async fn node_and_pod_faults() {
    let (fleet, client) = start_settled().await;
    let c = &fleet.clusters()[0];
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "inference");
    let eps: Api<EndpointSlice> = Api::namespaced(client.clone(), "inference");
    let pod = pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items
        .remove(0);
    let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
    let pod_name = pod.metadata.name.clone().unwrap();

    // GPU failure: allocatable drops, capacity stays.
    c.inject(&Fault::GpuFailure {
        node: node.clone(),
        count: 3,
    })
    .unwrap();
    eventually("allocatable 5", || {
        let n = nodes.clone();
        let name = node.clone();
        async move { gpus(&n.get(&name).await.unwrap(), "allocatable") == 5 }
    })
    .await;
    assert_eq!(gpus(&nodes.get(&node).await.unwrap(), "capacity"), 8);
    c.clear(&Fault::GpuFailure {
        node: node.clone(),
        count: 3,
    });
    eventually("allocatable back to 8", || {
        let n = nodes.clone();
        let name = node.clone();
        async move { gpus(&n.get(&name).await.unwrap(), "allocatable") == 8 }
    })
    .await;

    // Pod unready: the EndpointSlice marks it not ready.
    c.inject(&Fault::PodUnready {
        namespace: "inference".into(),
        pod: pod_name.clone(),
    })
    .unwrap();
    let ready_endpoints = |eps: Api<EndpointSlice>| async move {
        let l = eps
            .list(&ListParams::default().labels("kubernetes.io/service-name=llm"))
            .await
            .unwrap();
        l.items[0]
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
            .count()
    };
    eventually("one ready endpoint", || {
        let e = eps.clone();
        async move { ready_endpoints(e).await == 1 }
    })
    .await;
    c.clear(&Fault::PodUnready {
        namespace: "inference".into(),
        pod: pod_name.clone(),
    });
    eventually("two ready endpoints", || {
        let e = eps.clone();
        async move { ready_endpoints(e).await == 2 }
    })
    .await;

    // Node NotReady: node condition False, its pods unready.
    c.inject(&Fault::NodeNotReady { node: node.clone() })
        .unwrap();
    eventually("node NotReady and its pod unready", || {
        let (n, p, name, pn) = (nodes.clone(), pods.clone(), node.clone(), pod_name.clone());
        async move {
            !is_ready(&n.get(&name).await.unwrap()) && !pod_is_ready(&p.get(&pn).await.unwrap())
        }
    })
    .await;
    c.clear_all();
    eventually("node Ready again", || {
        let (n, name) = (nodes.clone(), node.clone());
        async move { is_ready(&n.get(&name).await.unwrap()) }
    })
    .await;
    assert!(
        c.inject(&Fault::NodeNotReady {
            node: "nope".into()
        })
        .is_err()
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn api_faults_latency_errors_and_unreachable() {
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());

    c.inject(&Fault::ApiError {
        verb: Some("list".into()),
        resource: Some("nodes".into()),
        code: 503,
    })
    .unwrap();
    match nodes.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503),
        other => panic!("expected 503, got {other:?}"),
    }
    pods.list(&ListParams::default())
        .await
        .expect("other resources unaffected");
    c.clear(&Fault::ApiError {
        verb: Some("list".into()),
        resource: Some("nodes".into()),
        code: 503,
    });
    nodes.list(&ListParams::default()).await.unwrap();

    // Latency: the request cannot complete before the injected delay (a lower bound).
    c.inject(&Fault::ApiLatency { millis: 300 }).unwrap();
    let t = std::time::Instant::now();
    nodes.list(&ListParams::default()).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    c.clear(&Fault::ApiLatency { millis: 0 });

    // Unreachable: connections are refused until restored.
    c.inject(&Fault::Unreachable).unwrap();
    eventually("connection refused", || {
        let addr = c.addr();
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    })
    .await;
    assert!(nodes.list(&ListParams::default()).await.is_err());
    c.clear(&Fault::Unreachable);
    eventually("reachable again", || {
        let n = nodes.clone();
        async move { n.list(&ListParams::default()).await.is_ok() }
    })
    .await;
    assert!(
        c.inject(&Fault::ApiError {
            verb: None,
            resource: None,
            code: 200
        })
        .is_err()
    );
    fleet.shutdown().await;
}

#[tokio::test]
async fn bookmarks_and_streaming_lists() {
    let s = Scenario::from_yaml(SCENARIO).unwrap();
    let opts = SimOptions {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let fleet = SimFleet::start(&s, opts).await.unwrap();
    let c = &fleet.clusters()[0];
    let client = client(c).await;
    let nodes: Api<Node> = Api::all(client.clone());
    // A watch that allows bookmarks gets them, carrying a current resourceVersion.
    let rv = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = nodes
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, w.try_next())
            .await
            .expect("a bookmark")
            .unwrap()
        {
            Some(WatchEvent::Bookmark(b)) => {
                assert!(
                    b.metadata.resource_version.parse::<u64>().unwrap()
                        >= rv.parse::<u64>().unwrap()
                );
                break;
            }
            Some(_) => continue,
            None => panic!("watch ended"),
        }
    }
    // Streaming lists (sendInitialEvents): the watcher syncs from the watch alone.
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(nodes, watcher::Config::default().streaming_lists()),
    )
    .applied_objects()
    .boxed();
    let task = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    tokio::time::timeout(Duration::from_secs(30), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), c.list("nodes", None).unwrap().len());
    task.abort();
    fleet.shutdown().await;
}

fn mcs_api(client: Client, version: &str, plural: &str, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "multicluster.x-k8s.io".into(),
        version: version.into(),
        api_version: format!("multicluster.x-k8s.io/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client, "inference", &ar)
}

#[tokio::test]
async fn mcs_objects_are_served_in_v1beta1_and_v1alpha1_or_only_the_older_crds() {
    let fleet = start().await;
    let c = client(fleet.cluster("test").unwrap()).await;
    for v in ["v1beta1", "v1alpha1"] {
        let exports = mcs_api(c.clone(), v, "serviceexports", "ServiceExport");
        let list = exports.list(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 1, "{v}");
        assert_eq!(
            list.items[0].types.as_ref().unwrap().api_version,
            format!("multicluster.x-k8s.io/{v}")
        );
    }
    // Written in v1alpha1, read in v1beta1.
    let old = mcs_api(c.clone(), "v1alpha1", "serviceexports", "ServiceExport");
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "other", "namespace": "inference"}}))
    .unwrap();
    old.create(&PostParams::default(), &obj).await.unwrap();
    let got = mcs_api(c.clone(), "v1beta1", "serviceexports", "ServiceExport")
        .get("other")
        .await
        .unwrap();
    assert_eq!(
        got.types.unwrap().api_version,
        "multicluster.x-k8s.io/v1beta1"
    );

    let older = Scenario::from_yaml(&SCENARIO.replace(
        "provider: aks",
        "provider: aks\n    mcs_versions: [v1alpha1]",
    ))
    .unwrap();
    let fleet = SimFleet::start(&older, SimOptions::default())
        .await
        .unwrap();
    let c = client(fleet.cluster("test").unwrap()).await;
    let e = mcs_api(c.clone(), "v1beta1", "serviceexports", "ServiceExport")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 404), "{e}");
    assert_eq!(
        mcs_api(c, "v1alpha1", "serviceexports", "ServiceExport")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn load_balancer_services_get_an_ingress_address() {
    let s = Scenario::from_yaml(&SCENARIO.replace(
        "service: {port: 8000}",
        "service: {port: 8000, type: LoadBalancer}",
    ))
    .unwrap();
    let fleet = SimFleet::start(&s, SimOptions::default()).await.unwrap();
    let c = client(fleet.cluster("test").unwrap()).await;
    let svc: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(c, "inference");
    let got = svc.get("llm").await.unwrap();
    let ingress = got.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    assert!(
        ingress[0].ip.as_deref().unwrap().starts_with("198.18."),
        "{ingress:?}"
    );
}
