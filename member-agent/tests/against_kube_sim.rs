//! The agent's cluster watch against simulated clusters (kube-sim), through real kube-rs.

use std::time::Duration;

use flotilla_agent::{ClusterWatch, WatchOptions};
use flotilla_core::inventory::{ClusterInventory, GpuCondition};
use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SCENARIO: &str = r#"
clusters:
  - name: agent-test
    region: westeurope
    provider: aks
    timing: {node_ready_ms: 100, device_plugin_ms: 100, pod_start_ms: 50}
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
      - name: a100
        count: 1
        gpu:
          vendor: nvidia
          product: NVIDIA-A100-SXM4-80GB
          memory_mib: 81920
          count: 8
          family: ampere
          mig: {strategy: mixed, profiles: {1g.10gb: 7}}
"#;

async fn watch(c: &SimCluster, shutdown: &CancellationToken) -> ClusterWatch {
    watch_with(c, WatchOptions::default(), shutdown).await
}

async fn client(c: &SimCluster) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

async fn watch_with(
    c: &SimCluster,
    opts: WatchOptions,
    shutdown: &CancellationToken,
) -> ClusterWatch {
    let w = ClusterWatch::start(client(c).await, opts, shutdown.clone());
    tokio::time::timeout(Duration::from_secs(30), w.ready())
        .await
        .unwrap();
    w
}

async fn until(
    w: &ClusterWatch,
    what: &str,
    f: impl Fn(&ClusterInventory) -> bool,
) -> ClusterInventory {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut changes = w.changes();
    loop {
        let inv = w.inventory();
        if f(&inv) {
            return inv;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}\n{inv:#?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
    }
}

fn pool<'a>(
    inv: &'a ClusterInventory,
    name: &str,
) -> Option<&'a flotilla_core::inventory::PoolInventory> {
    inv.pools.iter().find(|p| p.name == name)
}

#[tokio::test]
async fn nodes_gpus_and_allocations_follow_the_cluster() {
    let fleet = SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let c = &fleet.clusters()[0];
    let shutdown = CancellationToken::new();
    let w = watch(c, &shutdown).await;

    let inv = until(&w, "two H100 nodes with 16 free GPUs", |i| {
        pool(i, "h100").is_some_and(|p| p.usable_nodes == 2 && p.free_gpus == 16)
    })
    .await;
    let a100 = pool(&inv, "a100").unwrap();
    assert_eq!(a100.physical_gpus, 8);
    // A fully split node keeps `nvidia.com/gpu` at 0 beside its slices.
    let names: Vec<&str> = a100.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb"]);
    assert_eq!((a100.resources[0].capacity, a100.free_gpus), (0, 0));
    let n = inv
        .nodes
        .iter()
        .find(|n| n.pool.as_deref() == Some("h100"))
        .unwrap();
    assert_eq!(n.product.as_deref(), Some("NVIDIA-H100-80GB-HBM3"));
    assert_eq!(n.gpu_memory_mib, Some(81559));
    assert_eq!(n.region.as_deref(), Some("westeurope"));

    // A node added to the pool (MachineDeployment scale) appears once its GPUs are advertised.
    c.with_state(|s| {
        let idx = flotilla_kube_sim::resources::idx::MACHINEDEPLOYMENTS;
        let mut md = (*s.store.get(idx, "default", "h100").unwrap()).clone();
        md["spec"]["replicas"] = json!(3);
        s.store.update(idx, "default", "h100", md, false).unwrap();
    });
    until(&w, "a third H100 node", |i| {
        pool(i, "h100").is_some_and(|p| p.nodes == 3 && p.free_gpus == 24)
    })
    .await;

    // A pod scheduled onto GPUs moves them from free to allocated.
    c.create(
        "pods",
        "default",
        json!({"metadata": {"name": "job"}, "spec": {
            "nodeSelector": {"kubernetes.azure.com/agentpool": "h100"},
            "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}}),
    )
    .unwrap();
    let inv = until(&w, "4 GPUs allocated", |i| {
        pool(i, "h100").is_some_and(|p| p.resources[0].allocated == 4 && p.free_gpus == 20)
    })
    .await;
    assert_eq!(pool(&inv, "h100").unwrap().resources[0].allocatable, 24);

    // Failed GPUs lower allocatable: the node is Degraded in the inventory.
    let node = inv
        .nodes
        .iter()
        .find(|n| n.pool.as_deref() == Some("h100"))
        .unwrap()
        .name
        .clone();
    c.inject(&Fault::GpuFailure {
        node: node.clone(),
        count: 2,
    })
    .unwrap();
    let inv = until(&w, "a degraded node", |i| {
        i.nodes
            .iter()
            .any(|n| n.name == node && n.condition == GpuCondition::Degraded)
    })
    .await;
    let n = inv.nodes.iter().find(|n| n.name == node).unwrap();
    assert_eq!(n.resources[0].capacity - n.resources[0].allocatable, 2);

    // The API made unreachable: the watch reports it, and recovers after restore.
    c.inject(&Fault::Unreachable).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while w.api_reachable() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "unreachable API not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.clear(&Fault::Unreachable);
    while !w.api_reachable() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "recovery not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    fleet.shutdown().await;
}
