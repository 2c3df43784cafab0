//! The fleet API on a one-member hub over real gRPC: join tokens, the agent stream
//! (hello, snapshot, delta, heartbeats), validation at the edge, health transitions, and the
//! read API (clusters, inventory, capacity, fit).

use std::time::Duration;

use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::agent_service_client::AgentServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

struct Hub {
    addr: String,
    shutdown: CancellationToken,
    _running: flotilla_hub::RunningHub,
    _dir: tempfile::TempDir,
}

async fn hub() -> Hub {
    hub_with(16).await
}

async fn hub_with(max_concurrent_joins: usize) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let joins = max_concurrent_joins.to_string();
    let args = flotilla_hub::Args::parse_from([
        "flotilla-hub",
        "--insecure",
        "--data-dir",
        &d,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--unreachable-after",
        "400ms",
        "--leader-grace",
        "100ms",
        "--agent-heartbeat",
        "100ms",
        "--max-concurrent-joins",
        &joins,
    ]);
    let shutdown = CancellationToken::new();
    let running = flotilla_hub::start(args, shutdown.clone()).await.unwrap();
    let fleet = running.fleet.clone();
    let addr = format!("http://{}", running.addr);
    // Wait until this member leads and the health controller is active.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !fleet.health.active() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hub never became leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Hub {
        addr,
        shutdown,
        _running: running,
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

fn node(name: &str, gpus: i64, free: i64) -> v1::NodeInventory {
    v1::NodeInventory {
        name: name.into(),
        pool: "h100".into(),
        ready: true,
        schedulable: true,
        region: "eu".into(),
        product: "NVIDIA-H100-80GB-HBM3".into(),
        family: "hopper".into(),
        gpu_memory_mib: 81559,
        physical_gpus: gpus,
        free_gpus: free,
        idle_gpus: free,
        resources: vec![v1::GpuResource {
            name: "nvidia.com/gpu".into(),
            vendor: v1::GpuVendor::Nvidia as i32,
            unit: v1::GpuUnitKind::Whole as i32,
            capacity: gpus,
            allocatable: gpus,
            allocated: gpus - free,
            free,
            ..Default::default()
        }],
        condition: v1::GpuCondition::Healthy as i32,
        ..Default::default()
    }
}

fn msg(m: v1::agent_message::Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

fn hello(cluster: &str, token: &str) -> v1::AgentMessage {
    msg(v1::agent_message::Msg::Hello(v1::Hello {
        cluster: cluster.into(),
        token: token.into(),
        agent_version: "test".into(),
        kubernetes_version: "v1.34.2".into(),
        region: "eu".into(),
        ..Default::default()
    }))
}

/// Open an agent stream: returns the sender and the hub's replies (or the connect error).
async fn connect(
    addr: &str,
    first: v1::AgentMessage,
) -> Result<
    (
        mpsc::Sender<v1::AgentMessage>,
        tonic::Streaming<v1::HubMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut c = AgentServiceClient::new(channel(addr).await);
    let resp = c.connect(ReceiverStream::new(rx)).await?;
    Ok((tx, resp.into_inner()))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_health(fleet: &mut FleetServiceClient<Channel>, name: &str, want: v1::ClusterHealth) {
    wait_reason(fleet, name, want, "").await
}

async fn token(fleet: &mut FleetServiceClient<Channel>, cluster: &str) -> String {
    fleet
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: cluster.into(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// One cluster's inventory, or one node of it (`node` non-empty).
async fn inventory(
    fleet: &mut FleetServiceClient<Channel>,
    cluster: &str,
    node: &str,
) -> Result<v1::Inventory, tonic::Status> {
    fleet
        .get_inventory(v1::GetInventoryRequest {
            cluster: cluster.into(),
            node: node.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn agents_join_report_and_are_judged() {
    let hub = hub().await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    let token = token(&mut fleet, "alpha").await;

    // Authentication and naming errors tell the caller what to fix.
    let e = connect(&hub.addr, hello("alpha", "flt_wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = connect(&hub.addr, hello("beta", &token)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("alpha"));
    let e = connect(&hub.addr, hello("Bad_Name", &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.metadata().get("flotilla-field").unwrap(), "hello.cluster");
    let e = fleet
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: "UPPER".into(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Join: welcome, then a snapshot is stored and acknowledged; the cluster turns Ready.
    let (tx, mut rx) = connect(&hub.addr, hello("alpha", &token)).await.unwrap();
    let welcome = rx.message().await.unwrap().unwrap();
    match welcome.msg {
        Some(v1::hub_message::Msg::Welcome(w)) => {
            assert_eq!(w.heartbeat_interval_ms, 100);
            assert!(w.held.is_empty());
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes: vec![node("n1", 8, 8), node("n2", 8, 2)],
            signals: Some(v1::HealthSignals::default()),
        },
    )))
    .await
    .unwrap();
    let ack = rx.message().await.unwrap().unwrap();
    assert!(matches!(ack.msg, Some(v1::hub_message::Msg::Ack(a)) if a.revision > 0));
    wait_health(&mut fleet, "alpha", v1::ClusterHealth::Ready).await;

    let inv = inventory(&mut fleet, "alpha", "").await.unwrap();
    assert_eq!(inv.nodes.len(), 2);
    assert_eq!(inv.pools[0].free_gpus, 10);
    let cap = fleet
        .capacity(v1::CapacityRequest {
            group_by: v1::CapacityGroupBy::Product as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.rows.len(), 1);
    assert_eq!(
        (
            cap.rows[0].gpus_total,
            cap.rows[0].gpus_free,
            cap.rows[0].gpus_allocated
        ),
        (16, 10, 6)
    );
    let fit = fleet
        .fit(v1::FitRequest {
            replicas: 2,
            gpus_per_replica: 4,
            min_memory_mib: 80_000,
            product: "h100".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fit.candidates.len(), 1, "{fit:?}");
    assert_eq!(fit.candidates[0].cluster, "alpha");
    let fit = fleet
        .fit(v1::FitRequest {
            replicas: 3,
            gpus_per_replica: 8,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(fit.candidates.is_empty());
    assert!(fit.rejections[0].reason.contains("only 1 of 3"), "{fit:?}");

    // Metrics and health endpoints on HTTP.
    let http = hub._running.http_addr;
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.contains("flotilla_hub_agents_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"flotilla_hub_clusters{health="Ready"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"flotilla_hub_agent_messages_total{kind="snapshot"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("flotilla_hub_leader 1"), "{metrics}");
    // The fleet's GPUs, per cluster, pool and product.
    let pool = r#"{cluster="alpha",pool="h100",product="NVIDIA-H100-80GB-HBM3"}"#;
    for (name, value) in [
        ("flotilla_hub_fleet_gpus_physical", 16),
        ("flotilla_hub_fleet_gpus_free", 10),
        ("flotilla_hub_fleet_gpus_idle", 10),
        ("flotilla_hub_fleet_gpus_failed", 0),
    ] {
        let line = format!("{name}{pool} {value}\n");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    assert!(
        metrics.contains(r#"flotilla_hub_fleet_cluster_health{cluster="alpha",state="Ready"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"flotilla_hub_fleet_cluster_health{cluster="alpha",state="Degraded"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"flotilla_hub_fleet_inventory_age_seconds{cluster="alpha"}"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("fleet_node_gpus"),
        "per-node series only when asked"
    );
    assert!(
        metrics.contains("flotilla_hub_report_processing_seconds_count 1"),
        "{metrics}"
    );
    assert!(http_get(http, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(http, "/healthz").await.starts_with("HTTP/1.1 200"));

    // A delta with failed GPUs: Degraded with the reason.
    tx.send(msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
        upsert: vec![node("n3", 8, 8)],
        remove: vec!["n1".into()],
        signals: Some(v1::HealthSignals {
            gpus_failed: 2,
            ..Default::default()
        }),
    })))
    .await
    .unwrap();
    rx.message().await.unwrap().unwrap();
    wait_health(&mut fleet, "alpha", v1::ClusterHealth::Degraded).await;
    let c = fleet
        .get_cluster(v1::GetClusterRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        c.health_reason.contains("2 GPU(s) failed"),
        "{}",
        c.health_reason
    );
    assert_eq!(c.nodes, 2);
    assert!(c.history.len() >= 2);
    // The pools kept up to date from the delta's nodes equal a recount of every node.
    let inv = fleet
        .get_inventory(v1::GetInventoryRequest {
            cluster: "alpha".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let core = flotilla_api::convert::fleet::nodes_from_wire(
        &inv.nodes,
        "nodes",
        &flotilla_api::convert::fleet::ReportLimits::unlimited(),
    )
    .unwrap();
    let recount: Vec<v1::PoolInventory> = flotilla_core::inventory::pools(&core)
        .iter()
        .map(flotilla_api::convert::fleet::pool_to_wire)
        .collect();
    assert_eq!(inv.pools, recount);
    assert_eq!((inv.pools[0].nodes, inv.pools[0].physical_gpus), (2, 16));

    // A node whose numbers make no sense is kept with the reason and counts for nothing;
    // the rest of the report stands.
    let mut bad = node("n9", 8, 8);
    bad.resources[0].capacity = -3;
    tx.send(msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
        upsert: vec![bad],
        ..Default::default()
    })))
    .await
    .unwrap();
    let ack = rx.message().await;
    assert!(
        matches!(
            &ack,
            Ok(Some(v1::HubMessage {
                msg: Some(v1::hub_message::Msg::Ack(_))
            }))
        ),
        "{ack:?}"
    );
    let inv = inventory(&mut fleet, "alpha", "").await.unwrap();
    let n9 = inv.nodes.iter().find(|n| n.name == "n9").unwrap();
    assert!(
        n9.problem.contains("resources[0].capacity is negative"),
        "{}",
        n9.problem
    );
    assert_eq!((n9.physical_unknown, n9.free_gpus), (true, 0));
    assert_eq!(
        (inv.pools[0].physical_gpus, inv.pools[0].free_gpus),
        (16, 10),
        "n9 adds nothing"
    );
    tx.send(msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
        remove: vec!["n9".into()],
        ..Default::default()
    })))
    .await
    .unwrap();
    rx.message().await.unwrap().unwrap();

    // A malformed report is rejected naming the field; the stored state stays intact.
    let mut bad = node("n9", 8, 8);
    bad.resources[0].unit = 99;
    tx.send(msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
        upsert: vec![bad],
        ..Default::default()
    })))
    .await
    .unwrap();
    let e = rx.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.metadata().get("flotilla-field").unwrap(),
        "delta.upsert[0].resources[0].unit"
    );
    let inv = inventory(&mut fleet, "alpha", "").await.unwrap();
    let names: Vec<&str> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n2", "n3"]);

    // Silence: Unreachable after --unreachable-after; a reconnect with a heartbeat recovers it,
    // and the hub tells the agent what it already holds.
    drop(tx);
    wait_health(&mut fleet, "alpha", v1::ClusterHealth::Unreachable).await;
    let (tx, mut rx) = connect(&hub.addr, hello("alpha", &token)).await.unwrap();
    match rx.message().await.unwrap().unwrap().msg {
        Some(v1::hub_message::Msg::Welcome(w)) => {
            let mut held: Vec<&String> = w.held.keys().collect();
            held.sort();
            assert_eq!(held, ["n2", "n3"]);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    tx.send(msg(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
        signals: Some(v1::HealthSignals::default()),
    })))
    .await
    .unwrap();
    wait_health(&mut fleet, "alpha", v1::ClusterHealth::Ready).await;

    // An explicit leave.
    tx.send(msg(v1::agent_message::Msg::Leave(v1::Leave {})))
        .await
        .unwrap();
    wait_health(&mut fleet, "alpha", v1::ClusterHealth::Left).await;
    let list = fleet
        .list_clusters(v1::ListClustersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.clusters.len(), 1);
    let e = fleet
        .get_cluster(v1::GetClusterRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    hub.shutdown.cancel();
}

fn ack_revision(m: Option<v1::HubMessage>) -> i64 {
    match m.and_then(|m| m.msg) {
        Some(v1::hub_message::Msg::Ack(a)) => a.revision,
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test]
async fn joins_wait_their_turn_and_an_unchanged_resync_writes_nothing() {
    let hub = hub_with(1).await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    let (ta, tb) = (
        token(&mut fleet, "alpha").await,
        token(&mut fleet, "beta").await,
    );

    // alpha holds the only join slot until its first report is stored.
    let (tx, mut rx) = connect(&hub.addr, hello("alpha", &ta)).await.unwrap();
    assert!(matches!(
        rx.message().await.unwrap().unwrap().msg,
        Some(v1::hub_message::Msg::Welcome(_))
    ));
    let addr = hub.addr.clone();
    let beta = tokio::spawn(async move { connect(&addr, hello("beta", &tb)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!beta.is_finished(), "beta was admitted while alpha joined");
    let nodes = vec![node("n1", 8, 8), node("n2", 8, 2)];
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes: nodes.clone(),
            signals: Some(v1::HealthSignals::default()),
        },
    )))
    .await
    .unwrap();
    let first = ack_revision(rx.message().await.unwrap());
    assert!(first > 0);
    let (beta_tx, mut beta_rx) = tokio::time::timeout(Duration::from_secs(30), beta)
        .await
        .expect("beta admitted once alpha's report was stored")
        .unwrap()
        .unwrap();
    assert!(matches!(
        beta_rx.message().await.unwrap().unwrap().msg,
        Some(v1::hub_message::Msg::Welcome(_))
    ));
    beta_tx
        .send(msg(v1::agent_message::Msg::Snapshot(
            v1::InventorySnapshot {
                nodes: vec![node("b1", 8, 8)],
                signals: Some(v1::HealthSignals::default()),
            },
        )))
        .await
        .unwrap();
    assert!(ack_revision(beta_rx.message().await.unwrap()) > first);

    // alpha reconnects: resending what the hub holds writes nothing; a real change does.
    drop((tx, rx));
    let (tx, mut rx) = connect(&hub.addr, hello("alpha", &ta)).await.unwrap();
    match rx.message().await.unwrap().unwrap().msg {
        Some(v1::hub_message::Msg::Welcome(w)) => assert_eq!(w.held.len(), 2),
        other => panic!("expected welcome, got {other:?}"),
    }
    let delta = |upsert| {
        msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
            upsert,
            remove: vec![],
            signals: Some(v1::HealthSignals::default()),
        }))
    };
    tx.send(delta(vec![])).await.unwrap();
    assert_eq!(ack_revision(rx.message().await.unwrap()), 0);
    tx.send(delta(vec![nodes[0].clone()])).await.unwrap();
    assert_eq!(ack_revision(rx.message().await.unwrap()), 0);
    tx.send(delta(vec![node("n1", 8, 4)])).await.unwrap();
    assert!(ack_revision(rx.message().await.unwrap()) > first);
    // The view follows the store asynchronously; the acknowledged write arrives shortly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let inv = inventory(&mut fleet, "alpha", "n1").await.unwrap();
        if inv.nodes[0].free_gpus == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change never reached the view"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.shutdown.cancel();
}

const SIM: &str = r#"
clusters:
  - name: sim-one
    region: westeurope
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
"#;

async fn inventory_nodes(fleet: &mut FleetServiceClient<Channel>, cluster: &str) -> usize {
    inventory(fleet, cluster, "")
        .await
        .map_or(0, |i| i.nodes.len())
}

async fn wait_reason(
    fleet: &mut FleetServiceClient<Channel>,
    name: &str,
    want: v1::ClusterHealth,
    reason: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = fleet
            .get_cluster(v1::GetClusterRequest { name: name.into() })
            .await
        {
            let c = c.into_inner();
            if c.health == want as i32 && c.health_reason.contains(reason) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never became {want:?} ({reason})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_real_agent_reports_a_simulated_cluster() {
    use flotilla_kube_sim::{Fault, Scenario, SimFleet, SimOptions};
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()))
        .try_init();
    let hub = hub().await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    let sims = SimFleet::start(&Scenario::from_yaml(SIM).unwrap(), SimOptions::default())
        .await
        .unwrap();
    let c = &sims.clusters()[0];
    let token = token(&mut fleet, "sim-one").await;
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let agent_stop = CancellationToken::new();
    let opts = flotilla_agent::AgentOptions::simulated(
        "sim-one",
        hub.addr.trim_start_matches("http://"),
        token,
        Default::default(),
    );
    let agent_http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_http_addr = agent_http.local_addr().unwrap();
    let agent = tokio::spawn(flotilla_agent::run(
        config,
        opts,
        Some(agent_http),
        agent_stop.clone(),
    ));

    wait_health(&mut fleet, "sim-one", v1::ClusterHealth::Ready).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while inventory_nodes(&mut fleet, "sim-one").await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "inventory never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agent_metrics = http_get(agent_http_addr, "/metrics").await;
    assert!(
        agent_metrics.contains("flotilla_agent_hub_connected 1"),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("flotilla_agent_cluster_api_reachable 1"),
        "{agent_metrics}"
    );
    assert!(
        !agent_metrics.contains("flotilla_agent_watch_events 0\n"),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("flotilla_agent_report_nodes_count"),
        "{agent_metrics}"
    );
    assert!(
        http_get(agent_http_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let got = fleet
        .get_cluster(v1::GetClusterRequest {
            name: "sim-one".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.region, "westeurope", "region from node labels");
    assert_eq!(got.kubernetes_version, "v1.34.2");

    // A node added in the simulated cluster appears in the hub's inventory.
    c.with_state(|s| {
        let idx = flotilla_kube_sim::resources::idx::MACHINEDEPLOYMENTS;
        let mut md = (*s.store.get(idx, "default", "h100").unwrap()).clone();
        md["spec"]["replicas"] = serde_json::json!(3);
        s.store.update(idx, "default", "h100", md, false).unwrap();
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while inventory_nodes(&mut fleet, "sim-one").await != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new node never reached the hub"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Failed GPUs make the cluster Degraded; recovery makes it Ready.
    let node = c.list("nodes", None).unwrap()[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    c.inject(&Fault::GpuFailure {
        node: node.clone(),
        count: 2,
    })
    .unwrap();
    wait_reason(
        &mut fleet,
        "sim-one",
        v1::ClusterHealth::Degraded,
        "2 GPU(s) failed",
    )
    .await;
    c.clear_all();
    wait_health(&mut fleet, "sim-one", v1::ClusterHealth::Ready).await;

    // The cluster's API made unreachable: Degraded, not silently stale.
    c.inject(&Fault::Unreachable).unwrap();
    wait_reason(
        &mut fleet,
        "sim-one",
        v1::ClusterHealth::Degraded,
        "cannot reach",
    )
    .await;
    c.clear_all();
    wait_health(&mut fleet, "sim-one", v1::ClusterHealth::Ready).await;

    // The agent stops: Unreachable after --unreachable-after.
    agent_stop.cancel();
    let _ = agent.await;
    wait_health(&mut fleet, "sim-one", v1::ClusterHealth::Unreachable).await;
    sims.shutdown().await;
    hub.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_serves_store_fleet_health_reflection_and_the_bundled_cli() {
    use futures::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let hub = hub().await;
    let channel = channel(&hub.addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "flotilla.v1.Kv".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let names: std::collections::BTreeSet<String> =
        list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "flotilla.v1.Kv",
        "flotilla.v1.StoreAdmin",
        "flotilla.v1.Raft",
        "flotilla.v1.AgentService",
        "flotilla.v1.FleetService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(s), "{s} listed by reflection: {names:?}");
    }
    drop(stream);
    // `flotilla-hub ctl` is flotctl, in the binary `--dev` builds.
    let addr = hub.addr.trim_start_matches("http://").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-hub"))
            .args(["ctl", "--hub", &addr, "get", "clusters"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("NAME"),
        "{out:?}"
    );
    hub.shutdown.cancel();
}

#[tokio::test]
async fn an_incomplete_report_is_shown_as_such_and_not_placed_on() {
    let hub = hub().await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    let token = token(&mut fleet, "partial").await;
    let (tx, mut rx) = connect(&hub.addr, hello("partial", &token)).await.unwrap();
    rx.message().await.unwrap().unwrap();
    // The agent's pod cache has not listed: every GPU looks free in what it sends.
    let incomplete = v1::HealthSignals {
        incomplete: vec!["pods".into()],
        ..Default::default()
    };
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes: vec![node("n1", 8, 8)],
            signals: Some(incomplete.clone()),
        },
    )))
    .await
    .unwrap();
    rx.message().await.unwrap().unwrap();
    wait_reason(
        &mut fleet,
        "partial",
        v1::ClusterHealth::Degraded,
        "inventory incomplete: pods not listed yet",
    )
    .await;
    let c = fleet
        .get_cluster(v1::GetClusterRequest {
            name: "partial".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.inventory_incomplete, ["pods"]);
    let fit = |fleet: &mut FleetServiceClient<Channel>| {
        let mut fleet = fleet.clone();
        async move {
            fleet
                .fit(v1::FitRequest {
                    replicas: 1,
                    gpus_per_replica: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let r = fit(&mut fleet).await;
    assert!(r.candidates.is_empty(), "{r:?}");
    assert!(
        r.rejections[0]
            .reason
            .contains("inventory incomplete (pods not listed yet)"),
        "{r:?}"
    );
    // Once the cache has listed, the same GPUs are placed on.
    tx.send(msg(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
        signals: Some(v1::HealthSignals::default()),
    })))
    .await
    .unwrap();
    wait_health(&mut fleet, "partial", v1::ClusterHealth::Ready).await;
    let r = fit(&mut fleet).await;
    assert_eq!(r.candidates.len(), 1, "{r:?}");
    assert_eq!(r.candidates[0].resource, "nvidia.com/gpu");
}

#[tokio::test]
async fn a_flooding_agent_is_cut_off_and_the_others_are_not() {
    let hub = hub().await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    let (quiet_tx, mut quiet_rx) =
        connect(&hub.addr, hello("quiet", &token(&mut fleet, "quiet").await))
            .await
            .unwrap();
    quiet_rx.message().await.unwrap().expect("welcome");
    let (flood_tx, mut flood_rx) =
        connect(&hub.addr, hello("flood", &token(&mut fleet, "flood").await))
            .await
            .unwrap();
    flood_rx.message().await.unwrap().expect("welcome");
    // Far over 50 a second with bursts of 200.
    let flooding = tokio::spawn(async move {
        for _ in 0..2_000 {
            let hb = msg(v1::agent_message::Msg::Heartbeat(v1::Heartbeat::default()));
            if flood_tx.send(hb).await.is_err() {
                break;
            }
        }
        flood_tx
    });
    let cut = loop {
        match flood_rx.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the flooding stream ended without a reason"),
            Err(s) => break s,
        }
    };
    assert_eq!(cut.code(), tonic::Code::ResourceExhausted, "{cut}");
    assert!(cut.message().contains("per second"), "{cut}");
    drop(flooding.await.unwrap());
    // The quiet cluster's stream is untouched: its report is stored and acknowledged.
    quiet_tx
        .send(msg(v1::agent_message::Msg::Snapshot(
            v1::InventorySnapshot {
                nodes: vec![node("q1", 8, 8)],
                signals: None,
            },
        )))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), quiet_rx.message())
        .await
        .expect("the quiet agent is answered")
        .unwrap();
    assert!(ack_revision(m) > 0);
    // Nothing of the flood was stored as the flooding cluster's inventory.
    assert_eq!(inventory_nodes(&mut fleet, "flood").await, 0);
}

#[tokio::test]
async fn oversized_reports_are_refused_naming_the_limit_and_nothing_is_stored() {
    let hub = hub().await;
    let mut fleet = FleetServiceClient::new(channel(&hub.addr).await);
    // More nodes than --max-report-nodes (5,000).
    let (tx, mut rx) = connect(&hub.addr, hello("big", &token(&mut fleet, "big").await))
        .await
        .unwrap();
    rx.message().await.unwrap().expect("welcome");
    let nodes = (0..5_001).map(|i| node(&format!("n{i}"), 8, 8)).collect();
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes,
            signals: None,
        },
    )))
    .await
    .unwrap();
    let e = rx.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("5000"), "{e}");
    assert_eq!(inventory_nodes(&mut fleet, "big").await, 0);

    // A message over the stream's byte limit: one node with a 17 MiB name.
    let (tx, mut rx) = connect(&hub.addr, hello("huge", &token(&mut fleet, "huge").await))
        .await
        .unwrap();
    rx.message().await.unwrap().expect("welcome");
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes: vec![node(&"x".repeat(17 << 20), 8, 8)],
            signals: None,
        },
    )))
    .await
    .unwrap();
    let e = rx.message().await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e}"
    );
    assert!(e.message().contains(&(16usize << 20).to_string()), "{e}");
    assert_eq!(inventory_nodes(&mut fleet, "huge").await, 0);
}
