//! Discovery end to end on a one-member hub: real agents export services from simulated
//! clusters, the hub merges them, and its DNS (real UDP) answers by the routing policy as
//! endpoints turn unready and an agent dies. Conflicts reach `ServiceExport` status.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::discovery_service_client::DiscoveryServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const SIM: &str = r#"
clusters:
  - name: eu-a
    region: eu-west
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, gpus: 1, service: {port: 8000, type: LoadBalancer}, export: true}
      - {name: web, namespace: ml, replicas: 1, service: {port: 80, type: LoadBalancer}, export: true}
  - name: eu-b
    region: eu-west
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, gpus: 1, service: {port: 8000, type: LoadBalancer}, export: true}
  - name: us
    region: us-east
    provider: eks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, gpus: 1, service: {port: 8000, type: LoadBalancer}, export: true}
      - {name: web, namespace: ml, replicas: 1, service: {port: 8080, type: LoadBalancer}, export: true}
  - name: edge
    region: ap-south
    provider: eks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
"#;

const LIMIT: Duration = Duration::from_secs(60);

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let last = match f().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never happened; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A records for `name` from the hub's DNS over UDP, sorted; the rcode on failure.
async fn dns_a(addr: SocketAddr, name: &str) -> Result<Vec<String>, ResponseCode> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&m.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("DNS answers")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    if r.metadata.response_code != ResponseCode::NoError {
        return Err(r.metadata.response_code);
    }
    let mut v: Vec<String> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    Ok(v)
}

async fn kube_config(c: &SimCluster) -> kube::Config {
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap()
}

async fn kube_client(c: &SimCluster) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

async fn lb_ip(c: &SimCluster, name: &str) -> String {
    let svc: Api<Service> = Api::namespaced(kube_client(c).await, "ml");
    let s = svc.get(name).await.unwrap();
    s.status.unwrap().load_balancer.unwrap().ingress.unwrap()[0]
        .ip
        .clone()
        .unwrap()
}

fn imports_api(client: kube::Client, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1beta1", "ServiceImport"),
        "serviceimports",
    );
    match ns {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    }
}

/// The imported slices of `service` in `c`'s namespace `ml`: source cluster → endpoints'
/// (address, ready).
async fn imported_slices(
    c: &SimCluster,
    service: &str,
) -> std::collections::BTreeMap<String, Vec<(String, bool)>> {
    let api: Api<EndpointSlice> = Api::namespaced(kube_client(c).await, "ml");
    let lp = ListParams::default().labels(&format!(
        "multicluster.kubernetes.io/service-name={service}"
    ));
    let mut out = std::collections::BTreeMap::new();
    for s in api.list(&lp).await.unwrap() {
        let src = s.metadata.labels.as_ref().unwrap()["multicluster.kubernetes.io/source-cluster"]
            .clone();
        let eps: &mut Vec<(String, bool)> = out.entry(src).or_default();
        for e in s.endpoints {
            let ready = e.conditions.and_then(|c| c.ready).unwrap_or(true);
            eps.extend(e.addresses.into_iter().map(|a| (a, ready)));
        }
    }
    out
}

async fn export_condition(c: &SimCluster, name: &str, kind: &str) -> Option<(String, String)> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1beta1", "ServiceExport"),
        "serviceexports",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(kube_client(c).await, "ml", &ar);
    let se = api.get(name).await.ok()?;
    let conds = se.data["status"]["conditions"].as_array()?.clone();
    let c = conds.iter().find(|c| c["type"] == kind)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

fn mine_params() -> ListParams {
    ListParams::default().labels("app.kubernetes.io/managed-by=flotilla-agent")
}

/// `kubectl get serviceimports` lists them (skipped, saying so, without kubectl).
async fn kubectl_shows_imports(c: &SimCluster) {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, c.kubeconfig()).unwrap();
    // Off the runtime thread: the simulated API server answers on it.
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["get", "serviceimports", "-n", "ml"])
            .output()
    });
    let out = match run.await.unwrap() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping the kubectl check: kubectl not runnable ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("TYPE")
            && text
                .lines()
                .any(|l| l.starts_with("llm ") && l.contains("ClusterSetIP")),
        "{text}"
    );
}

/// A one-member hub with DNS, and a real agent per simulated cluster of `sim`.
struct Fleet {
    hub: flotilla_hub::RunningHub,
    dns: SocketAddr,
    fleet: FleetServiceClient<Channel>,
    disc: DiscoveryServiceClient<Channel>,
    sims: SimFleet,
    agents: std::collections::BTreeMap<String, CancellationToken>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn start_fleet(sim: &str) -> Fleet {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let args = flotilla_hub::Args::parse_from([
        "flotilla-hub",
        "--insecure",
        "--data-dir",
        &d,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--unreachable-after",
        "600ms",
        "--leader-grace",
        "100ms",
        "--agent-heartbeat",
        "100ms",
    ]);
    let shutdown = CancellationToken::new();
    let hub = flotilla_hub::start(args, shutdown.clone()).await.unwrap();
    let dns = hub.dns_addr.expect("--dns serves");
    while !hub.fleet.health.active() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}", hub.addr);
    let ch: Channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut fleet = FleetServiceClient::new(ch.clone());
    let disc = DiscoveryServiceClient::new(ch);

    let sims = SimFleet::start(&Scenario::from_yaml(sim).unwrap(), SimOptions::default())
        .await
        .unwrap();
    let mut agents = std::collections::BTreeMap::new();
    for c in sims.clusters() {
        let token = fleet
            .create_join_token(v1::CreateJoinTokenRequest {
                cluster: c.name().into(),
                ttl_seconds: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let stop = shutdown.child_token();
        let opts = flotilla_agent::AgentOptions::simulated(
            c.name(),
            &hub.addr.to_string(),
            token,
            Default::default(),
        );
        tokio::spawn(flotilla_agent::run(
            kube_config(c).await,
            opts,
            None,
            stop.clone(),
        ));
        agents.insert(c.name().to_string(), stop);
    }
    Fleet {
        hub,
        dns,
        fleet,
        disc,
        sims,
        agents,
        shutdown,
        _dir: dir,
    }
}

#[tokio::test]
async fn exports_answer_in_dns_by_policy_as_endpoints_and_agents_fail() {
    let Fleet {
        hub,
        dns,
        fleet: _fleet,
        mut disc,
        sims,
        agents,
        shutdown,
        _dir,
    } = start_fleet(SIM).await;
    let (eu_a, eu_b, us) = (
        sims.cluster("eu-a").unwrap(),
        sims.cluster("eu-b").unwrap(),
        sims.cluster("us").unwrap(),
    );
    let (ip_a, ip_b, ip_us) = (
        lb_ip(eu_a, "llm").await,
        lb_ip(eu_b, "llm").await,
        lb_ip(us, "llm").await,
    );

    // eu-west first, then us-east.
    let policy = r#"{"tiers":[{"selector":{"matchLabels":{"region":"eu-west"}}},{"selector":{"matchLabels":{"region":"us-east"}}}]}"#;
    disc.set_policy(v1::SetPolicyRequest {
        namespace: "ml".into(),
        name: "llm".into(),
        spec_json: policy.into(),
    })
    .await
    .unwrap();
    let bad = disc
        .set_policy(v1::SetPolicyRequest {
            namespace: "ml".into(),
            name: "llm".into(),
            spec_json: r#"{"ttlSeconds":0}"#.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        bad.metadata().get("flotilla-field").unwrap(),
        "spec.ttlSeconds"
    );

    let name = "llm.ml.svc.clusterset.local.";
    let mut want = vec![ip_a.clone(), ip_b.clone()];
    want.sort();
    eventually("both eu-west clusters answer", || {
        let want = want.clone();
        async move {
            match dns_a(dns, name).await {
                Ok(v) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // A standalone DNS (flotilla-dns --hub) follows the hub's WatchRoutes and answers alike.
    let follower_table = flotilla_dns::follow::empty_table();
    tokio::spawn(flotilla_dns::follow::follow(
        hub.addr.to_string(),
        None,
        flotilla_api::grpc::Security::Plaintext,
        follower_table.clone(),
        shutdown.clone(),
    ));
    let follower = flotilla_dns::DnsServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        flotilla_dns::Zones::new(None).unwrap(),
        follower_table,
    )
    .await
    .unwrap();
    let follower_dns = follower.local_addr();
    tokio::spawn(follower.run(shutdown.clone()));
    eventually("the standalone DNS answers as the hub does", || {
        let want = want.clone();
        async move {
            match dns_a(follower_dns, name).await {
                Ok(v) if v == want => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // One beside cluster `us` (`flotilla-dns --cluster us`) answers as `us`'s clients are
    // answered. With local-first on, that is `us` itself, while a client of unknown location
    // (the test, from 127.0.0.1) still gets the tiers; with it off again, the tiers too.
    let local_table = flotilla_dns::follow::empty_table();
    tokio::spawn(flotilla_dns::follow::follow(
        hub.addr.to_string(),
        Some("us".into()),
        flotilla_api::grpc::Security::Plaintext,
        local_table.clone(),
        shutdown.clone(),
    ));
    let local = flotilla_dns::DnsServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        flotilla_dns::Zones::new(None).unwrap(),
        local_table,
    )
    .await
    .unwrap();
    let local_dns = local.local_addr();
    tokio::spawn(local.run(shutdown.clone()));
    let local_first = policy.replacen('{', r#"{"localFirst":true,"#, 1);
    for (spec, in_us) in [
        (local_first.as_str(), vec![ip_us.clone()]),
        (policy, want.clone()),
    ] {
        disc.set_policy(v1::SetPolicyRequest {
            namespace: "ml".into(),
            name: "llm".into(),
            spec_json: spec.into(),
        })
        .await
        .unwrap();
        eventually(&format!("the DNS in `us` answers {in_us:?}"), || {
            let in_us = in_us.clone();
            async move {
                match dns_a(local_dns, name).await {
                    Ok(v) if v == in_us => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        assert_eq!(
            dns_a(dns, name).await,
            Ok(want.clone()),
            "unknown location: the tiers"
        );
    }
    let bad = disc
        .watch_routes(v1::WatchRoutesRequest {
            prefix: String::new(),
            from_cluster: "Not A Cluster".into(),
        })
        .await
        .expect_err("an invalid from_cluster is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        bad.metadata().get("flotilla-field").unwrap(),
        "from_cluster"
    );

    // Conflicting ports on `web`: both sides are marked, the oldest wins.
    for c in [eu_a, us] {
        eventually(
            &format!("{} sees the port conflict", c.name()),
            || async move {
                match export_condition(c, "web", "Conflict").await {
                    Some((s, r)) if s == "True" && r == "PortConflict" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
    assert_eq!(
        export_condition(eu_b, "llm", "Ready").await,
        Some(("True".into(), "Exported".into()))
    );
    let svc = disc
        .get_service(v1::GetServiceRequest {
            namespace: "ml".into(),
            name: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        svc.clusters
            .iter()
            .all(|c| c.conflict_reason == "PortConflict"),
        "{svc:?}"
    );

    // Imports: every cluster with the namespace holds the ServiceImport and one slice per
    // exporting cluster; its ClusterSetIP is the routing decision's first address.
    for c in [eu_a, eu_b, us] {
        let (ip_a, ip_b) = (ip_a.clone(), ip_b.clone());
        eventually(
            &format!("{} imports llm from every exporter", c.name()),
            || {
                let (ip_a, ip_b) = (ip_a.clone(), ip_b.clone());
                async move {
                    let si = imports_api(kube_client(c).await, Some("ml"))
                        .get("llm")
                        .await
                        .map_err(|e| e.to_string())?;
                    let clusters: Vec<&str> = si.data["status"]["clusters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c["cluster"].as_str())
                        .collect();
                    let ip = si.data["spec"]["ips"][0]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let slices = imported_slices(c, "llm").await;
                    let sources: Vec<&String> = slices.keys().collect();
                    match (
                        si.data["spec"]["type"].as_str(),
                        clusters.as_slice(),
                        sources.as_slice(),
                    ) {
                        (Some("ClusterSetIP"), ["eu-a", "eu-b", "us"], [a, b, u])
                            if *a == "eu-a"
                                && *b == "eu-b"
                                && *u == "us"
                                && (ip == ip_a || ip == ip_b)
                                && slices["eu-a"].len() == 2 =>
                        {
                            Ok(())
                        }
                        _ => Err(format!("{:?} {slices:?}", si.data)),
                    }
                }
            },
        )
        .await;
    }
    // Agents report their pod and node networks: a pod's address locates its cluster.
    let us_pods: Api<Pod> = Api::namespaced(kube_client(us).await, "ml");
    let pod_ip = us_pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
        .items[0]
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .clone()
        .unwrap();
    eventually("a pod address locates its cluster", || {
        let (mut disc, pod_ip) = (disc.clone(), pod_ip.clone());
        async move {
            let r = disc
                .resolve(v1::ResolveRequest {
                    namespace: "ml".into(),
                    name: "llm".into(),
                    client_ip: pod_ip,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match r.client_cluster.as_str() {
                "us" => Ok(()),
                other => Err(format!("located in {other:?}")),
            }
        }
    })
    .await;

    // edge has no `ml` namespace: nothing is imported there until it has one.
    let edge = sims.cluster("edge").unwrap();
    let mine = ListParams::default().labels("app.kubernetes.io/managed-by=flotilla-agent");
    assert!(
        imports_api(kube_client(edge).await, None)
            .list(&mine)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube_client(edge).await);
    ns.create(
        &Default::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "ml"}})).unwrap(),
    )
    .await
    .unwrap();
    eventually(
        "edge imports llm and web once it has the namespace",
        || async move {
            let names: Vec<String> = imports_api(kube_client(edge).await, Some("ml"))
                .list(&mine_params())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect();
            match names.as_slice() {
                [a, b] if a == "llm" && b == "web" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    kubectl_shows_imports(edge).await;
    // The last export of `web` goes: its import and slices go everywhere.
    for c in [eu_a, us] {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("multicluster.x-k8s.io", "v1beta1", "ServiceExport"),
            "serviceexports",
        );
        let api: Api<DynamicObject> = Api::namespaced_with(kube_client(c).await, "ml", &ar);
        api.delete("web", &Default::default()).await.unwrap();
    }
    eventually("web's import leaves eu-b", || async move {
        let gone = imports_api(kube_client(eu_b).await, Some("ml"))
            .get_opt("web")
            .await
            .map_err(|e| e.to_string())?
            .is_none();
        let slices = imported_slices(eu_b, "web").await;
        match (gone, slices.is_empty()) {
            (true, true) => Ok(()),
            other => Err(format!("{other:?} {slices:?}")),
        }
    })
    .await;

    // eu-a's agent dies: after --unreachable-after its clusters are not answered.
    agents["eu-a"].cancel();
    eventually("eu-a leaves the answer", || {
        let ip_b = ip_b.clone();
        async move {
            match dns_a(dns, name).await {
                Ok(v) if v == [ip_b.clone()] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // The imported slices follow: eu-a's endpoints are not ready in every other cluster.
    eventually("us imports eu-a's endpoints as not ready", || async move {
        let slices = imported_slices(us, "llm").await;
        match slices.get("eu-a") {
            Some(eps)
                if !eps.is_empty()
                    && eps.iter().all(|(_, r)| !r)
                    && slices["eu-b"].iter().all(|(_, r)| *r) =>
            {
                Ok(())
            }
            _ => Err(format!("{slices:?}")),
        }
    })
    .await;

    // Every eu-b endpoint turns unready: the next tier answers.
    let pods: Api<Pod> = Api::namespaced(kube_client(eu_b).await, "ml");
    for p in pods
        .list(&ListParams::default().labels("app=llm"))
        .await
        .unwrap()
    {
        let pod = p.metadata.name.unwrap();
        eu_b.inject(&Fault::PodUnready {
            namespace: "ml".into(),
            pod,
        })
        .unwrap();
    }
    eventually("us-east answers", || {
        let ip_us = ip_us.clone();
        async move {
            match dns_a(dns, name).await {
                Ok(v) if v == [ip_us.clone()] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    eventually("the standalone DNS follows the failover", || {
        let ip_us = ip_us.clone();
        async move {
            match dns_a(follower_dns, name).await {
                Ok(v) if v == [ip_us.clone()] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let explain = disc
        .resolve(v1::ResolveRequest {
            namespace: "ml".into(),
            name: "llm".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let why = |c: &str| {
        explain
            .verdicts
            .iter()
            .find(|v| v.cluster == c)
            .unwrap()
            .reason
            .clone()
    };
    assert!(why("eu-a").contains("Unreachable"), "{}", why("eu-a"));
    assert!(
        why("eu-b").contains("no ready endpoints"),
        "{}",
        why("eu-b")
    );
    assert!(why("us").starts_with("chosen: tier 2"), "{}", why("us"));

    shutdown.cancel();
    sims.shutdown().await;
}

const SAT: &str = r#"
clusters:
  - name: sat-a
    region: eu-west
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: chat, namespace: ml, replicas: 2, gpus: 1, inference: true, service: {port: 80, target_port: 8000, type: LoadBalancer}, export: true}
  - name: sat-b
    region: eu-west
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: chat, namespace: ml, replicas: 2, gpus: 1, inference: true, service: {port: 80, target_port: 8000, type: LoadBalancer}, export: true}
"#;

#[tokio::test]
async fn inference_saturation_moves_answers_away_and_back() {
    let Fleet {
        dns,
        mut disc,
        sims,
        shutdown,
        _dir,
        ..
    } = start_fleet(SAT).await;
    let (a, b) = (
        sims.cluster("sat-a").unwrap(),
        sims.cluster("sat-b").unwrap(),
    );
    let chat_ip = |c: &'static str| {
        let sims = &sims;
        async move {
            let svc: Api<Service> =
                Api::namespaced(kube_client(sims.cluster(c).unwrap()).await, "ml");
            svc.get("chat")
                .await
                .unwrap()
                .status
                .unwrap()
                .load_balancer
                .unwrap()
                .ingress
                .unwrap()[0]
                .ip
                .clone()
                .unwrap()
        }
    };
    let (ip_a, ip_b) = (chat_ip("sat-a").await, chat_ip("sat-b").await);
    disc.set_policy(v1::SetPolicyRequest {
        namespace: "ml".into(),
        name: "chat".into(),
        spec_json: r#"{"saturation":{"inference":true}}"#.into(),
    })
    .await
    .unwrap();
    let name = "chat.ml.svc.clusterset.local.";
    let mut both = vec![ip_a.clone(), ip_b.clone()];
    both.sort();
    let answers = |want: Vec<String>| async move {
        match dns_a(dns, name).await {
            Ok(v) if v == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    };
    eventually("both idle clusters answer", || answers(both.clone())).await;
    let explain = |disc: &mut DiscoveryServiceClient<Channel>| {
        let mut disc = disc.clone();
        async move {
            disc.resolve(v1::ResolveRequest {
                namespace: "ml".into(),
                name: "chat".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let r = explain(&mut disc).await;
    assert!(r.verdicts.iter().all(|v| v.chosen), "{r:?}");

    // sat-a's vLLM queues build up (through the simulated pod proxy): it is skipped while
    // sat-b has headroom.
    let set = |c: &SimCluster, waiting: f64| {
        c.set_pod_metrics(flotilla_kube_sim::sim::metrics::MetricsRule {
            namespace: "ml".into(),
            pod: None,
            selector: Some("app=chat".into()),
            values: [("vllm:num_requests_waiting".to_string(), Some(waiting))]
                .into_iter()
                .collect(),
        })
        .unwrap()
    };
    set(a, 12.0);
    eventually("only sat-b answers", || answers(vec![ip_b.clone()])).await;
    let r = explain(&mut disc).await;
    let va = r.verdicts.iter().find(|v| v.cluster == "sat-a").unwrap();
    assert!(
        !va.chosen && va.reason.contains("queue depth 12.0"),
        "{va:?}"
    );

    // sat-b saturates too: nobody has headroom, so both answer again rather than none.
    set(b, 9.0);
    eventually("both answer when both are saturated", || {
        answers(both.clone())
    })
    .await;

    // sat-a drains: traffic comes back to it, and only to it.
    set(a, 0.0);
    eventually("only sat-a answers", || answers(vec![ip_a.clone()])).await;
    set(b, 0.0);
    eventually("both answer again", || answers(both.clone())).await;

    shutdown.cancel();
    sims.shutdown().await;
}
