//! The agent's inventory of clusters in every GPU mode real clusters show, through real
//! kube-rs against kube-sim: MIG single, sharing (GKE time-sharing without GFD), vendor
//! partitions, Kubernetes versions that serve different DRA APIs, RBAC that denies a
//! resource, a crashed device plugin, and caches that have not listed yet.

use std::time::Duration;

use flotilla_agent::{ClusterWatch, Listing, WatchOptions};
use flotilla_core::inventory::{ClusterInventory, GpuCondition, GpuUnit};
use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

const SCENARIO: &str = r#"
clusters:
  - name: mig-single
    provider: aks
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: a100
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-A100-SXM4-80GB, memory_mib: 81920, count: 8, family: ampere,
              mig: {strategy: single, profiles: {1g.10gb: 7}}}
  - name: gke-shared
    provider: gke
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: l4
        count: 1
        gpu: {vendor: nvidia, product: L4, memory_mib: 23034, count: 4, gfd: false,
              sharing: {strategy: time-slicing, replicas: 48}}
  - name: amd-cpx
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: mi300x
        count: 1
        gpu: {vendor: amd, product: AMD_Instinct_MI300X, memory_mib: 196608, count: 8, family: cdna3,
              partition: cpx_nps4}
  - name: intel-rm
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: flex
        count: 1
        gpu: {vendor: intel, product: Flex_170, memory_mib: 16384, count: 2, resource_management: true}
  - name: k8s-133
    kubernetes_version: v1.33.5
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: dra
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper, dra: true}
  - name: k8s-131
    kubernetes_version: v1.31.4
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: h100
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
    workloads:
      - {name: llm, replicas: 1, gpus: 2, sidecar_gpus: 1}
  - name: rbac
    rbac_deny: [resourceslices]
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: h100
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
  - name: crashed
    timing: {node_ready_ms: 20, device_plugin_ms: 20}
    pools:
      - name: h100
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper,
              plugin_crashed: true}
"#;

async fn client(c: &SimCluster) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

async fn watch(c: &SimCluster, opts: WatchOptions, shutdown: &CancellationToken) -> ClusterWatch {
    let w = ClusterWatch::start(client(c).await, opts, shutdown.clone());
    tokio::time::timeout(Duration::from_secs(30), w.ready())
        .await
        .expect("every resource listed, forbidden or not served");
    w
}

async fn until(
    w: &ClusterWatch,
    what: &str,
    f: impl Fn(&ClusterWatch, &ClusterInventory) -> bool,
) -> ClusterInventory {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut changes = w.changes();
    loop {
        let inv = w.inventory();
        if f(w, &inv) {
            return inv;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}\n{inv:#?}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
    }
}

fn advertised(_: &ClusterWatch, i: &ClusterInventory) -> bool {
    !i.nodes.is_empty()
        && i.nodes
            .iter()
            .all(|n| n.ready && n.resources.iter().all(|r| r.allocatable > 0))
}

#[tokio::test]
async fn every_gpu_mode_is_reported_as_what_it_is() {
    let fleet = SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let cluster = |name: &str| fleet.cluster(name).unwrap();

    // 1. MIG single: 56 slices are not 56 GPUs, and nothing says how many GPUs there are.
    let w = watch(cluster("mig-single"), WatchOptions::default(), &shutdown).await;
    let inv = until(&w, "slices advertised", advertised).await;
    let n = &inv.nodes[0];
    assert_eq!(n.resources[0].unit, GpuUnit::MigSlice("1g.10gb".into()));
    assert_eq!((n.physical_gpus, n.free_gpus), (None, 0), "{n:#?}");
    assert_eq!(inv.pools[0].physical_unknown_nodes, 1);

    // 3 and 4. GKE time-sharing without GFD: 4 GPUs x 48 clients are 4 shared GPUs.
    let w = watch(cluster("gke-shared"), WatchOptions::default(), &shutdown).await;
    let inv = until(&w, "replicas advertised", advertised).await;
    let n = &inv.nodes[0];
    assert_eq!(n.resources[0].capacity, 192);
    assert_eq!(n.resources[0].unit, GpuUnit::Shared(48));
    assert_eq!((n.physical_gpus, n.free_gpus, n.idle_gpus), (Some(4), 0, 4));
    assert_eq!(
        n.product.as_deref(),
        Some("nvidia-l4"),
        "from gke-accelerator"
    );
    assert_eq!(
        n.problem, None,
        "192 units are not 192 GPUs over the per-node limit"
    );

    // 4. AMD CPX in the default single naming: 64 `amd.com/gpu` are 8 GPUs' partitions.
    let w = watch(cluster("amd-cpx"), WatchOptions::default(), &shutdown).await;
    let inv = until(&w, "partitions advertised", advertised).await;
    let n = &inv.nodes[0];
    assert_eq!(n.resources[0].unit, GpuUnit::Partition);
    assert_eq!((n.physical_gpus, n.free_gpus, n.idle_gpus), (Some(8), 0, 8));

    // 4. Intel resource management: millicores, memory.max and tiles are not GPUs.
    let w = watch(cluster("intel-rm"), WatchOptions::default(), &shutdown).await;
    let inv = until(&w, "i915 advertised", advertised).await;
    let n = &inv.nodes[0];
    let names: Vec<&str> = n.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["gpu.intel.com/i915"]);
    assert_eq!((n.physical_gpus, n.free_gpus), (Some(2), 2));

    // 9. Kubernetes 1.33 serves resource.k8s.io v1beta1/v1beta2: the agent watches v1beta2
    // and counts the DRA GPUs.
    let w = watch(cluster("k8s-133"), WatchOptions::default(), &shutdown).await;
    assert_eq!(w.dra_version().as_deref(), Some("v1beta2"));
    let inv = until(&w, "DRA GPUs", |_, i| {
        i.nodes.first().is_some_and(|n| n.free_gpus == 8)
    })
    .await;
    assert_eq!(inv.nodes[0].resources[0].name, "dra:gpu.nvidia.com");
    // 8. A GPU the driver leaves out of its slice is failed: the hardware labels count it.
    let node = inv.nodes[0].name.clone();
    cluster("k8s-133")
        .inject(&Fault::GpuFailure {
            node: node.clone(),
            count: 2,
        })
        .unwrap();
    let inv = until(&w, "2 DRA GPUs failed", |_, i| {
        i.nodes.first().is_some_and(|n| n.failed_gpus == 2)
    })
    .await;
    assert_eq!(inv.nodes[0].condition, GpuCondition::Degraded);
    assert_eq!(
        (inv.nodes[0].physical_gpus, inv.nodes[0].free_gpus),
        (Some(8), 6)
    );

    // 9. Kubernetes 1.31 serves no DRA API: nothing to list, and the API is not "unreachable".
    let w = watch(cluster("k8s-131"), WatchOptions::default(), &shutdown).await;
    assert_eq!(w.listing("resourceslices"), Listing::NotServed);
    assert_eq!(w.dra_version(), None);
    until(&w, "whole GPUs", advertised).await;
    // 7. The pod's sidecar holds a GPU beside the app's two.
    until(&w, "the pod's 3 GPUs allocated", |_, i| {
        i.nodes
            .first()
            .is_some_and(|n| n.resources[0].allocated == 3 && n.free_gpus == 5)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(w.api_reachable(), "a missing API version is not an outage");
    assert!(w.incomplete().is_empty(), "{:?}", w.incomplete());

    // 9 and 13. A 403 is missing permission for that resource, not an unreachable API, and
    // the report says it is incomplete.
    let w = watch(cluster("rbac"), WatchOptions::default(), &shutdown).await;
    until(&w, "slices forbidden", |w, _| {
        w.forbidden() == ["resourceslices"]
    })
    .await;
    assert!(w.api_reachable());
    assert_eq!(w.incomplete(), ["resourceslices"]);

    // 10. A plugin that never advertises is "starting" until the bound after Ready, then a
    // failure of all 8 GPUs.
    let opts = WatchOptions {
        not_advertised_bound: Duration::from_secs(1),
        ..WatchOptions::default()
    };
    let w = watch(cluster("crashed"), opts, &shutdown).await;
    until(&w, "the node Ready", |_, i| {
        i.nodes.first().is_some_and(|n| n.ready)
    })
    .await;
    // Seen from the moment it turned Ready (the clock an hour back), it is only starting.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let early = w.inventory_at(now - 3_600_000);
    assert_eq!(early.nodes[0].condition, GpuCondition::NotAdvertised);
    assert_eq!(early.failed_gpus(), 0);
    let inv = until(&w, "the GPUs failed", |_, i| {
        i.nodes
            .first()
            .is_some_and(|n| n.condition == GpuCondition::Failed)
    })
    .await;
    assert_eq!(inv.failed_gpus(), 8);
    assert_eq!(inv.failed_nodes(), [inv.nodes[0].name.clone()]);
    assert!(w.next_deadline().is_none(), "nothing left to wait for");

    shutdown.cancel();
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_cache_that_has_not_listed_makes_the_report_incomplete() {
    let fleet = SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let c = fleet.cluster("k8s-131").unwrap();
    let slow_pods = Fault::ApiError {
        verb: Some("list".into()),
        resource: Some("pods".into()),
        code: 503,
    };
    c.inject(&slow_pods).unwrap();
    let shutdown = CancellationToken::new();
    let w = ClusterWatch::start(client(c).await, WatchOptions::default(), shutdown.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Every GPU looks free in these caches: the report must never claim to be whole. The
    // other caches list in their own time (the DRA ones after discovery), so wait for them.
    while w.listing("nodes") != Listing::Listed || w.incomplete() != ["pods"] {
        assert!(
            w.incomplete().iter().any(|r| r == "pods"),
            "pods missing from {:?} while their list fails",
            w.incomplete()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other caches never listed: {:?}",
            w.incomplete()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.clear(&slow_pods);
    tokio::time::timeout(Duration::from_secs(60), w.ready())
        .await
        .expect("pods listed after the fault cleared");
    assert!(w.incomplete().is_empty());
    shutdown.cancel();
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_version_that_stops_being_served_is_not_an_outage() {
    let fleet = SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let c = fleet.cluster("k8s-133").unwrap();
    // Discovery lists v1beta2, but the API server answers 404 for slices (the version was
    // disabled after the document was read).
    let gone = Fault::ApiError {
        verb: None,
        resource: Some("resourceslices".into()),
        code: 404,
    };
    c.inject(&gone).unwrap();
    let shutdown = CancellationToken::new();
    let w = watch(c, WatchOptions::default(), &shutdown).await;
    assert_eq!(w.listing("resourceslices"), Listing::NotServed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        w.api_reachable(),
        "a 404 is an answer, not an unreachable API"
    );
    assert!(w.incomplete().is_empty(), "{:?}", w.incomplete());
    c.clear(&gone);
    until(&w, "slices listed again", |w, _| {
        w.listing("resourceslices") == Listing::Listed
    })
    .await;
    shutdown.cancel();
    fleet.shutdown().await;
}
