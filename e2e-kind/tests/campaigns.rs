//! An upgrade campaign end to end with the real binaries: `flotilla-kube-sim` serving six
//! simulated clusters, three `flotilla-hub` replicas on their Raft store, six `flotilla-agent`
//! processes.
//!
//! - three stages, an approval gate after the first, traffic shift on;
//! - the hub leader is killed while the second stage runs: the new leader continues from the
//!   store; every cluster ends Done;
//! - the agents' logs are the step log: no step ran twice, and every cluster drained each of
//!   its blue nodes once;
//! - a surviving hub's DNS answers the service throughout.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_e2e::{
    Backend, agents, binaries, clusters, dns_a, free_udp_port, health, hub, kube_sim, leader,
};
use flotilla_test_support::{Procs, channel, free_port, store_status as status, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

const NAMES: [&str; 6] = ["one-a", "one-b", "two-a", "two-b", "three-a", "three-b"];

fn scenario() -> String {
    let mut s = String::from("clusters:\n");
    for n in NAMES {
        let ring = n.split('-').next().unwrap();
        s.push_str(&format!(
            "  - name: {n}
    provider: cluster-api
    labels: {{ring: {ring}}}
    timing: {{node_ready_ms: 200, device_plugin_ms: 200, pod_start_ms: 100, grace_second_ms: 1}}
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
  "name": "e2e",
  "pool": {"machineDeployment": "gpu"},
  "green": {"clusterApi": {"version": "v1.35.0"}},
  "surge": 1,
  "stages": [
    {"name": "one", "clusters": {"matchLabels": {"ring": "one"}}, "maxConcurrency": "100%",
     "afterGates": ["approval"]},
    {"name": "two", "clusters": {"matchLabels": {"ring": "two"}}, "maxConcurrency": 1},
    {"name": "three", "maxConcurrency": "100%"}
  ],
  "blueGreen": {"batch": 1, "batchSoak": "0s", "finalSoak": "0s"},
  "trafficShift": true,
  "failureBudget": {"perStage": 0}
}"#;

async fn campaign(port: u16, id: &str) -> Option<v1::CampaignInfo> {
    let mut c = CampaignServiceClient::new(channel(port).await?);
    c.get_campaign(v1::GetCampaignRequest { id: id.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `(seq, kind)` of every step an agent's log says it finished.
fn steps_done(log: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for line in log.lines() {
        // Without the terminal colours tracing writes.
        let mut plain = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        if !plain.contains("step done") {
            continue;
        }
        let field = |name: &str| {
            let at = plain.find(&format!("{name}="))? + name.len() + 1;
            let rest = &plain[at..];
            let end = rest.find([' ', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim_matches('"').to_string())
        };
        if let (Some(seq), Some(kind)) = (field("seq"), field("kind")) {
            out.push((seq.parse().unwrap_or(0), kind));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_survives_the_hub_leader_being_killed() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let bin = binaries();
    let mut procs = Procs(Vec::new());
    let scenario_path = dir.join("scenario.yaml");
    std::fs::write(&scenario_path, scenario()).unwrap();
    let kc = dir.join("kc");
    procs.0.push(kube_sim(&bin, &scenario_path, &kc));
    let ports = [free_port(), free_port(), free_port()];
    let http = [free_port(), free_port(), free_port()];
    let dns = [free_udp_port(), free_udp_port(), free_udp_port()];
    let backend = Backend::Raft;
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
    for i in 1..3 {
        procs.0.push(hub(
            &bin,
            backend,
            i as u64 + 1,
            dir,
            (ports[i], http[i], dns[i]),
            Some(ports[0]),
        ));
    }
    wait_until("three voters", LIMIT, || async {
        status(ports[0])
            .await
            .is_some_and(|s| s.members.iter().filter(|m| m.voter).count() == 3)
    })
    .await;
    // Killed on drop like the rest, so a failed assertion leaves no agent running.
    let _agents = Procs(agents(&bin, &NAMES, &ports, ports[0], &kc, LIMIT).await.0);
    wait_until(
        "six clusters Ready and able to run campaigns",
        LIMIT,
        || async {
            clusters(ports[1]).await.is_some_and(|cs| {
                NAMES.iter().all(|n| {
                    health(&cs, n) == Some(v1::ClusterHealth::Ready)
                        && cs.iter().any(|c| c.name == *n && c.campaigns)
                })
            })
        },
    )
    .await;

    // The leader serves campaign writes.
    let lead = leader(backend, (&ports, &http), &[0, 1, 2]).await.unwrap();
    let mut api = CampaignServiceClient::new(channel(ports[lead]).await.unwrap());
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

    // A hub that will survive answers DNS throughout.
    let survivor = (lead + 1) % 3;
    let stop = tokio_util_stop();
    let dns_watch = {
        let (d, stop) = (dns[survivor], stop.clone());
        tokio::spawn(async move {
            let (mut asked, mut unanswered) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                asked += 1;
                if dns_a(d).await.is_none_or(|a| a.is_empty()) {
                    unanswered += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (asked, unanswered)
        })
    };

    wait_until("stage one done, its gate waiting", LIMIT, || async {
        campaign(ports[lead], &id)
            .await
            .is_some_and(|c| c.waiting_approvals == ["one-after-0"])
    })
    .await;
    api.act_on_campaign(v1::CampaignActionRequest {
        id: id.clone(),
        action: v1::CampaignAction::Approve as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    // Kill the leader while stage two rolls (or, on a fast machine, soon after it began).
    let seen = wait_until_some("stage two rolling", LIMIT, || async {
        let c = campaign(ports[lead], &id).await?;
        let done = c.clusters_by_phase.get("Done").copied().unwrap_or(0);
        (c.current_stage != "one" || done > 2 || c.state != v1::CampaignState::Running as i32)
            .then_some(c)
    })
    .await;
    assert_eq!(
        seen.state,
        v1::CampaignState::Running as i32,
        "the campaign ended before the leader could be killed: {}",
        seen.detail_json
    );
    // Hub replicas are procs 1..=3 (kube-sim is 0).
    procs.0[lead + 1].kill().unwrap();
    procs.0[lead + 1].wait().unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != lead).collect();
    wait_until("a new leader", LIMIT, || async {
        leader(backend, (&ports, &http), &others)
            .await
            .is_some_and(|l| l != lead)
    })
    .await;
    let info = wait_until_some("the campaign to end", Duration::from_secs(180), || async {
        let c = campaign(ports[survivor], &id).await?;
        (c.state != v1::CampaignState::Running as i32).then_some(c)
    })
    .await;
    assert_eq!(
        info.state,
        v1::CampaignState::Succeeded as i32,
        "{}",
        info.detail_json
    );
    assert_eq!(info.clusters_by_phase.get("Done"), Some(&6));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (asked, unanswered) = dns_watch.await.unwrap();
    assert!(asked > 20, "DNS was asked {asked} times");
    assert_eq!(
        unanswered, 0,
        "{unanswered} of {asked} DNS queries unanswered"
    );

    // The step log: no step ran twice; every cluster drained each blue node once.
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    for n in NAMES {
        let log = std::fs::read_to_string(kc.join(format!("{n}.agent.log"))).unwrap();
        let done = steps_done(&log);
        for (seq, kind) in &done {
            if let Some(other) = seen.insert(*seq, format!("{n} {kind}")) {
                panic!("step {seq} ran twice: {other} and {n} {kind}");
            }
        }
        let drains = done.iter().filter(|(_, k)| k == "drain-batch").count();
        assert_eq!(drains, 3, "{n}: {done:?}");
        assert!(
            done.iter().any(|(_, k)| k == "retire-blue"),
            "{n}: {done:?}"
        );
    }
}

fn tokio_util_stop() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// Wait until `f` gives a value, up to `limit`.
async fn wait_until_some<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + limit;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(tokio::time::Instant::now() < until, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
