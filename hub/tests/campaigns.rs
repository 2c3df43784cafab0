//! Campaigns through the hub: a real hub (Raft store, gRPC), simulated clusters with real
//! agents (`--dev` with a scenario), the campaign API.
//!
//! - a dry run plans and pre-flights every cluster and writes nothing;
//! - a two-stage campaign with an approval gate and traffic shift runs to Succeeded; the
//!   second stage waits for the approval; afterwards only green nodes are left and every GPU
//!   pod runs on them;
//! - bad specs are refused naming the field; commands that do not fit are refused.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_api::v1::discovery_service_client::DiscoveryServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Three simulated clusters (`canary` in ring `canary`, `east` and `west` in ring `main`),
/// each a Cluster API pool of three H100 nodes with an exported, PDB-guarded workload.
fn scenario() -> String {
    let mut s = String::from("clusters:\n");
    for (name, ring) in [("canary", "canary"), ("east", "main"), ("west", "main")] {
        s.push_str(&format!(
            "  - name: {name}
    provider: cluster-api
    labels: {{ring: {ring}}}
    timing: {{node_ready_ms: 20, device_plugin_ms: 20, pod_start_ms: 20, grace_second_ms: 1}}
    pools:
      - {{name: gpu, count: 3, gpu: {{vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}}}
    workloads:
      - {{name: llm, namespace: ml, replicas: 2, gpus: 4, pdb: {{max_unavailable: 1}}, service: {{port: 8000, type: LoadBalancer}}, export: true}}
"
        ));
    }
    s
}

const SPEC: &str = r#"{
  "name": "k8s-135",
  "pool": {"machineDeployment": "gpu"},
  "green": {"clusterApi": {"version": "v1.35.0"}},
  "surge": 1,
  "stages": [
    {"name": "canary", "clusters": {"matchLabels": {"ring": "canary"}}, "afterGates": ["approval"]},
    {"name": "main", "maxConcurrency": "100%"}
  ],
  "blueGreen": {"batch": 1, "batchSoak": "0s", "finalSoak": "0s"},
  "trafficShift": true
}"#;

struct Hub {
    addr: String,
    data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    running: Option<flotilla_hub::RunningHub>,
    _dir: tempfile::TempDir,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shutdown.cancel();
        drop(self.running.take());
    }
}

async fn hub() -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let scenario_path = dir.path().join("scenario.yaml");
    std::fs::write(&scenario_path, scenario()).unwrap();
    let data = dir.path().join("data");
    let args = flotilla_hub::Args::parse_from([
        "flotilla-hub",
        "--dev",
        "--dev-scenario",
        scenario_path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let shutdown = CancellationToken::new();
    let running = flotilla_hub::start(args, shutdown.clone()).await.unwrap();
    Hub {
        addr: format!("http://{}", running.addr),
        data_dir: running.data_dir.clone(),
        shutdown,
        running: Some(running),
        _dir: dir,
    }
}

async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn kube(data_dir: &Path, cluster: &str) -> kube::Client {
    let text = std::fs::read_to_string(data_dir.join(format!("kubeconfigs/{cluster}.kubeconfig")))
        .unwrap();
    let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

async fn until<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every cluster joined, Ready, and able to run campaigns.
async fn fleet_ready(addr: &str) {
    let mut fleet = FleetServiceClient::new(channel(addr).await);
    until("three Ready clusters that run campaigns", 60, async || {
        let cs = fleet
            .list_clusters(v1::ListClustersRequest {})
            .await
            .ok()?
            .into_inner()
            .clusters;
        (cs.len() == 3
            && cs
                .iter()
                .all(|c| c.campaigns && c.health == v1::ClusterHealth::Ready as i32))
        .then_some(())
    })
    .await;
}

async fn get(c: &mut CampaignServiceClient<Channel>, id: &str) -> v1::CampaignInfo {
    c.get_campaign(v1::GetCampaignRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_two_stage_campaign_with_an_approval_gate_runs_to_green() {
    let hub = hub().await;
    fleet_ready(&hub.addr).await;
    let mut api = CampaignServiceClient::new(channel(&hub.addr).await);

    // Refusals name the field.
    let bad = api
        .create_campaign(v1::CreateCampaignRequest {
            spec_json: SPEC.replace(r#""surge": 1"#, r#""surge": "150%""#),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("spec.surge"), "{}", bad.message());

    // A dry run pre-flights every cluster and writes nothing.
    let plan = api
        .create_campaign(v1::CreateCampaignRequest {
            spec_json: SPEC.into(),
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(plan.preflight_missing.is_empty(), "{plan:?}");
    let planned =
        flotilla_api::convert::campaign::campaign_from_info(plan.campaign.as_ref().unwrap())
            .unwrap();
    for (_, r) in planned.clusters() {
        assert_eq!(r.counts.blue, 3, "{r:?}");
        assert_eq!(r.baseline.blue_gpu_allocatable, 24);
    }
    let listed = api
        .list_campaigns(v1::ListCampaignsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.campaigns.is_empty(), "a dry run writes nothing");

    // Watch the service's answers while the campaign runs: the canary must leave them while
    // its pool drains, and come back.
    let watching = CancellationToken::new();
    let resolver = {
        let (addr, stop) = (hub.addr.clone(), watching.clone());
        tokio::spawn(async move {
            let mut d = DiscoveryServiceClient::new(channel(&addr).await);
            let (mut shifted_seen, mut answered_after) = (false, false);
            while !stop.is_cancelled() {
                if let Ok(r) = d
                    .resolve(v1::ResolveRequest {
                        namespace: "ml".into(),
                        name: "llm".into(),
                        ..Default::default()
                    })
                    .await
                {
                    let r = r.into_inner();
                    let canary = r.verdicts.iter().find(|v| v.cluster == "canary");
                    if let Some(v) = canary {
                        if v.class.starts_with("shifted") {
                            assert!(!v.chosen, "a shifted cluster answered: {v:?}");
                            shifted_seen = true;
                        } else if shifted_seen && v.chosen {
                            answered_after = true;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (shifted_seen, answered_after)
        })
    };
    let id = api
        .create_campaign(v1::CreateCampaignRequest {
            spec_json: SPEC.into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .campaign
        .unwrap()
        .id;
    // The canary runs; the main stage waits for the approval.
    let info = until("the canary done and the gate waiting", 120, async || {
        let i = get(&mut api, &id).await;
        (i.waiting_approvals == ["canary-after-0"]).then_some(i)
    })
    .await;
    assert_eq!(info.clusters_by_phase.get("Done"), Some(&1), "{info:?}");
    assert_eq!(info.clusters_by_phase.get("Pending"), Some(&2), "{info:?}");
    let pause = api
        .act_on_campaign(v1::CampaignActionRequest {
            id: id.clone(),
            action: v1::CampaignAction::Rollback as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(pause.code(), tonic::Code::FailedPrecondition);
    api.act_on_campaign(v1::CampaignActionRequest {
        id: id.clone(),
        action: v1::CampaignAction::Approve as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let done = until("the campaign to succeed", 180, async || {
        let i = get(&mut api, &id).await;
        (i.state != v1::CampaignState::Running as i32).then_some(i)
    })
    .await;
    assert_eq!(
        done.state,
        v1::CampaignState::Succeeded as i32,
        "{}",
        done.detail_json
    );
    assert_eq!(done.clusters_by_phase.get("Done"), Some(&3));
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.cancel();
    let (shifted_seen, answered_after) = resolver.await.unwrap();
    assert!(
        shifted_seen,
        "the canary never left the answers while it drained"
    );
    assert!(
        answered_after,
        "the canary did not come back after its rollout"
    );

    // Only green nodes are left, and every GPU pod runs on them: none lost.
    for cluster in ["canary", "east", "west"] {
        let client = kube(&hub.data_dir, cluster).await;
        until(
            &format!("{cluster}: green only, pods Running"),
            60,
            async || {
                let nodes = Api::<Node>::all(client.clone())
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items;
                let all_green = nodes.iter().all(|n| {
                    n.metadata.labels.as_ref().unwrap()["cluster.x-k8s.io/deployment-name"]
                        == "gpu-green"
                });
                let pods = Api::<Pod>::namespaced(client.clone(), "ml")
                    .list(&ListParams::default().labels("app=llm"))
                    .await
                    .ok()?
                    .items;
                let running = pods
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count();
                (all_green && nodes.len() == 3 && running == 2 && pods.len() == 2).then_some(())
            },
        )
        .await;
    }
}
