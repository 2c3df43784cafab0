//! Membership end to end with the real binaries: `flotilla-kube-sim` serving three simulated
//! clusters, three `flotilla-hub` replicas, three `flotilla-agent` processes; once with the
//! hubs on their embedded Raft store, once on an external etcd (with this package's `etcd`
//! feature and an `etcd` binary; skipped with the reason otherwise).
//!
//! - killing an agent makes its cluster Unreachable after `--unreachable-after`; restarting it
//!   makes it Ready again;
//! - killing the hub leader: agents reconnect to the new leader and no cluster goes Unreachable,
//!   and every surviving hub's DNS keeps answering the service all three clusters export;
//! - a report over the limits is rejected naming the field, and the stored state stays intact.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_api::v1;
use flotilla_e2e::status;
use flotilla_e2e::{
    Backend, agent, agents, binaries, clusters, dns_a, free_udp_port, health, hub, kube_sim, leader,
};
use flotilla_test_support::{Procs, free_port, wait_until};

/// Liveness bound for every wait in this test.
const LIMIT: Duration = Duration::from_secs(90);

const SCENARIO: &str = r#"
clusters:
  - name: east
    region: eastus
    provider: aks
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
    workloads:
      - {name: llm, namespace: ml, replicas: 1, service: {port: 8000, type: LoadBalancer}, export: true}
  - name: west
    region: westus
    provider: eks
    pools:
      - name: l4
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-L4, memory_mib: 23034, count: 4, family: ada-lovelace}
    workloads:
      - {name: llm, namespace: ml, replicas: 1, service: {port: 8000, type: LoadBalancer}, export: true}
  - name: north
    region: northeurope
    provider: gke
    pools:
      - name: a100
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-A100-SXM4-80GB, memory_mib: 81920, count: 8, family: ampere}
    workloads:
      - {name: llm, namespace: ml, replicas: 1, service: {port: 8000, type: LoadBalancer}, export: true}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_three_agents_survive_kills() {
    let dir = tempfile::tempdir().unwrap();
    survive_kills(Backend::Raft, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hubs_on_etcd_three_agents_survive_kills() {
    if !cfg!(feature = "etcd") {
        println!(
            "SKIP: built without the `etcd` feature (cargo test -p flotilla-e2e --features etcd)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((_etcd, url)) = flotilla_test_support::start_etcd(dir.path()).await else {
        return;
    };
    survive_kills(Backend::Etcd(&url), dir.path()).await;
}

async fn survive_kills(backend: Backend<'_>, dir: &Path) {
    let bin = binaries();
    let mut procs = Procs(Vec::new());

    // Simulated clusters.
    let scenario = dir.join("scenario.yaml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let kc = dir.join("kc");
    procs.0.push(kube_sim(&bin, &scenario, &kc));

    // Three hub replicas.
    let ports = [free_port(), free_port(), free_port()];
    let http = [free_port(), free_port(), free_port()];
    let dns = [free_udp_port(), free_udp_port(), free_udp_port()];
    procs.0.push(hub(
        &bin,
        backend,
        1,
        dir,
        (ports[0], http[0], dns[0]),
        None,
    ));
    wait_until("hub 1 leads", LIMIT, || async {
        leader(backend, (&ports, &http), &[0]).await == Some(0)
    })
    .await;
    let join = (backend == Backend::Raft).then_some(ports[0]);
    for i in 1..3 {
        procs.0.push(hub(
            &bin,
            backend,
            i as u64 + 1,
            dir,
            (ports[i], http[i], dns[i]),
            join,
        ));
    }
    match backend {
        Backend::Raft => {
            wait_until("three voters", LIMIT, || async {
                status(ports[0])
                    .await
                    .is_some_and(|s| s.members.iter().filter(|m| m.voter).count() == 3)
            })
            .await
        }
        Backend::Etcd(_) => {
            wait_until("three replicas serving", LIMIT, || async {
                let mut up = 0;
                for p in ports {
                    up += usize::from(clusters(p).await.is_some());
                }
                up == 3
            })
            .await
        }
    }

    // Tokens and agents, killed on drop like the rest, so a failed assertion leaves no agent
    // running.
    let names = ["east", "west", "north"];
    let (children, tokens) = agents(
        &bin,
        (&names, &|_| String::new()),
        &ports,
        ports[1],
        &kc,
        LIMIT,
    )
    .await;
    let mut agents = Procs(children);
    wait_until("all three clusters Ready", LIMIT, || async {
        clusters(ports[2]).await.is_some_and(|cs| {
            names
                .iter()
                .all(|n| health(&cs, n) == Some(v1::ClusterHealth::Ready))
                && cs.iter().all(|c| c.physical_gpus > 0)
        })
    })
    .await;

    // Every replica answers the service all three clusters export.
    for d in dns {
        wait_until(
            "every hub's DNS answers with three clusters",
            LIMIT,
            || async move { dns_a(d).await.is_some_and(|a| a.len() == 3) },
        )
        .await;
    }

    // Kill an agent: Unreachable after --unreachable-after; restart: Ready.
    agents.0[0].kill().unwrap();
    agents.0[0].wait().unwrap();
    let killed = Instant::now();
    wait_until("east Unreachable", LIMIT, || async {
        clusters(ports[1])
            .await
            .is_some_and(|cs| health(&cs, "east") == Some(v1::ClusterHealth::Unreachable))
    })
    .await;
    // The window runs from the last heartbeat heard, up to one interval (300 ms) before the kill.
    assert!(
        killed.elapsed() >= Duration::from_millis(1500 - 300),
        "judged before --unreachable-after: {:?} after the kill",
        killed.elapsed()
    );
    agents.0[0] = agent(
        &bin,
        "east",
        &ports,
        &tokens[0],
        &kc.join("east.kubeconfig"),
    );
    wait_until("east Ready again", LIMIT, || async {
        clusters(ports[1])
            .await
            .is_some_and(|cs| health(&cs, "east") == Some(v1::ClusterHealth::Ready))
    })
    .await;

    // Kill the hub leader: agents move to the new leader and nobody flaps to Unreachable.
    let leader_idx = leader(backend, (&ports, &http), &[0, 1, 2])
        .await
        .expect("a leader");
    // procs.0[0] is kube-sim; hubs follow in id order.
    procs.0[leader_idx + 1].kill().unwrap();
    procs.0[leader_idx + 1].wait().unwrap();
    let survivor = ports[(leader_idx + 1) % 3];
    let alive: Vec<usize> = (0..3).filter(|i| *i != leader_idx).collect();
    let watch_until = Instant::now() + Duration::from_secs(10);
    let mut new_leader_seen = false;
    let (mut asked, mut unanswered) = (0, Vec::new());
    while Instant::now() < watch_until {
        // DNS on the survivors answers throughout the election, from their own tables.
        for i in &alive {
            asked += 1;
            match dns_a(dns[*i]).await {
                Some(a) if a.len() == 3 => {}
                other => unanswered.push(format!(
                    "hub {} at {:?}: {other:?}",
                    i + 1,
                    watch_until.saturating_duration_since(Instant::now())
                )),
            }
        }
        if let Some(cs) = clusters(survivor).await {
            for n in names {
                if health(&cs, n) == Some(v1::ClusterHealth::Unreachable) {
                    let mut logs: Vec<std::path::PathBuf> =
                        (1..=3).map(|id| dir.join(format!("hub{id}.log"))).collect();
                    logs.extend(names.iter().map(|c| kc.join(format!("{c}.agent.log"))));
                    for p in logs {
                        let log = std::fs::read_to_string(&p).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(40).collect();
                        eprintln!(
                            "--- {} (last 40 lines, newest first)\n{}",
                            p.display(),
                            tail.join("\n")
                        );
                    }
                    panic!("{n} flapped to Unreachable after a hub failover");
                }
            }
        }
        if leader(backend, (&ports, &http), &alive)
            .await
            .is_some_and(|l| l != leader_idx)
        {
            new_leader_seen = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(new_leader_seen, "no new leader was elected");
    assert!(
        unanswered.is_empty(),
        "{} of {asked} DNS queries to the surviving hubs went unanswered during the failover: {unanswered:?}",
        unanswered.len()
    );
    // Past the grace period, heartbeats reach the new leader: still all Ready.
    let cs = clusters(survivor).await.unwrap();
    for n in names {
        assert_eq!(
            health(&cs, n),
            Some(v1::ClusterHealth::Ready),
            "{n} after failover"
        );
    }

    // A report over the limits is rejected and the previous state stays.
    let new_leader = leader(backend, (&ports, &http), &alive)
        .await
        .expect("a leader");
    let leader_port = ports[new_leader];
    let before = clusters(leader_port)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == "west")
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let m = |msg| v1::AgentMessage { msg: Some(msg) };
    // As the west cluster's agent: its certificate, no token.
    tx.send(m(v1::agent_message::Msg::Hello(v1::Hello {
        cluster: "west".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let west = flotilla_e2e::channel_as(leader_port, flotilla_e2e::cluster_security("west"));
    let mut a = v1::agent_service_client::AgentServiceClient::new(west.await.unwrap());
    let mut replies = a
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    let too_many: Vec<v1::NodeInventory> = (0..6000)
        .map(|i| v1::NodeInventory {
            name: format!("n{i}"),
            condition: v1::GpuCondition::Healthy as i32,
            ..Default::default()
        })
        .collect();
    tx.send(m(v1::agent_message::Msg::Snapshot(v1::InventorySnapshot {
        nodes: too_many,
        signals: None,
    })))
    .await
    .unwrap();
    // The hub may push this cluster's export status at any time; the rejection follows.
    let e = loop {
        match replies.message().await {
            Ok(Some(v1::HubMessage {
                msg: Some(v1::hub_message::Msg::ExportStatus(_)),
            })) => continue,
            Ok(other) => panic!("expected the report to be rejected, got {other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("limit of 5000"), "{}", e.message());
    let after = clusters(leader_port)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == "west")
        .unwrap();
    assert_eq!(
        (after.nodes, after.physical_gpus),
        (before.nodes, before.physical_gpus)
    );

    // A single-use join token raced: two attempts at every live replica at once. Exactly one
    // gets a certificate (followers send agents to the leader; the leader spends the use
    // with a compare-and-swap), and the rest are told why.
    let join = flotilla_e2e::join_token(leader_port, "raced").await;
    let tries = alive
        .iter()
        .flat_map(|&i| [ports[i], ports[i]])
        .map(|p| flotilla_e2e::bootstrap(p, "raced", &join));
    let results = futures::future::join_all(tries).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .any(|s| s.message().contains("used up")),
        "{results:?}"
    );
    drop(agents);
}
