//! An upgrade campaign end to end with the real binaries: `flotilla-kube-sim` serving nine
//! simulated clusters, three `flotilla-hub` replicas on their Raft store, nine
//! `flotilla-agent` processes.
//!
//! - three stages, an approval gate after the first, traffic shift on;
//! - at the gate, no agent of a later stage has been sent a step;
//! - the hub leader is killed while the second stage runs: the new leader continues from the
//!   store;
//! - one cluster of the third stage (its kube-sim and agent in their own network namespace)
//!   is partitioned from every hub mid-rollout: its cluster fails after `unreachableTimeout`
//!   and counts against the stage's budget of one; the others end Done (without root, the
//!   partition is skipped with a printed reason and all nine end Done);
//! - the agents' logs are the step log: no step ran twice, every step of a stage came after
//!   every step of the stage before, and every cluster drained each of its blue nodes once;
//! - a surviving hub's DNS answers the service throughout;
//! - healed, the partitioned cluster is retried (`flotctl campaign retry` sent to a follower,
//!   which names the leader) and ends Done.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_api::v1;
use flotilla_api::v1::campaign_service_client::CampaignServiceClient;
use flotilla_e2e::{
    Backend, Netns, agent_in, agents, binaries, clusters, dns_a, free_udp_port, health, hub_on,
    join_token, kube_sim, kube_sim_in, leader,
};
use flotilla_e2e::{channel, status};
use flotilla_test_support::{Procs, free_port, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

const NAMES: [&str; 9] = [
    "one-a", "one-b", "one-c", "two-a", "two-b", "two-c", "three-a", "three-b", "three-c",
];

/// The cluster partitioned mid-rollout: it has twice the blue nodes, so its rollout is still
/// going when the test sees it start.
const CUT: &str = "three-c";

/// A cluster's labels: its ring, which selects its stage.
fn ring(name: &str) -> String {
    format!("ring={}", name.split('-').next().unwrap())
}

fn scenario(names: &[&str]) -> String {
    let mut s = String::from("clusters:\n");
    for n in names {
        let ring = n.split('-').next().unwrap();
        let count = if *n == CUT { 6 } else { 3 };
        s.push_str(&format!(
            "  - name: {n}
    provider: cluster-api
    labels: {{ring: {ring}}}
    timing: {{node_ready_ms: 200, device_plugin_ms: 200, pod_start_ms: 100, grace_second_ms: 1}}
    pools:
      - {{name: gpu, count: {count}, gpu: {{vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}}}
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
  "failureBudget": {"perStage": 1},
  "unreachableTimeout": "3s"
}"#;

async fn campaign(port: u16, id: &str) -> Option<v1::CampaignInfo> {
    let mut c = CampaignServiceClient::new(channel(port).await?);
    c.get_campaign(v1::GetCampaignRequest { id: id.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `(seq, kind)` of every step an agent's log says `what` of (`step started`, `step done`).
fn steps(log: &str, what: &str) -> Vec<(u64, String)> {
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
        if !plain.contains(what) {
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
async fn a_campaign_survives_a_hub_leader_kill_and_a_partitioned_agent() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let bin = binaries();
    let mut procs = Procs(Vec::new());
    // The partitioned cluster and its agent live in their own network namespace (with root);
    // without one, it runs with the others and nothing is partitioned.
    let ns = match Netns::create() {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("skipping the partition ({why}); nine clusters run without it");
            None
        }
    };
    let main_names: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| ns.is_none() || *n != CUT)
        .collect();
    let scenario_path = dir.join("scenario.yaml");
    std::fs::write(&scenario_path, scenario(&main_names)).unwrap();
    let kc = dir.join("kc");
    procs.0.push(kube_sim(&bin, &scenario_path, &kc));
    let kc_cut = dir.join("kc-cut");
    let ports = [free_port(), free_port(), free_port()];
    let http = [free_port(), free_port(), free_port()];
    let dns = [free_udp_port(), free_udp_port(), free_udp_port()];
    let backend = Backend::Raft;
    let expose = ns.as_ref().map(|n| n.host_ip.as_str());
    procs.0.push(hub_on(
        &bin,
        backend,
        1,
        dir,
        (ports[0], http[0], dns[0]),
        None,
        expose,
    ));
    wait_until("hub 1 leads", LIMIT, || async {
        leader(backend, (&ports, &http), &[0]).await == Some(0)
    })
    .await;
    for i in 1..3 {
        procs.0.push(hub_on(
            &bin,
            backend,
            i as u64 + 1,
            dir,
            (ports[i], http[i], dns[i]),
            Some(ports[0]),
            expose,
        ));
    }
    wait_until("three voters", LIMIT, || async {
        status(ports[0])
            .await
            .is_some_and(|s| s.members.iter().filter(|m| m.voter).count() == 3)
    })
    .await;
    // Killed on drop like the rest, so a failed assertion leaves no agent running.
    let mut running = agents(&bin, (&main_names, &ring), &ports, ports[0], &kc, LIMIT)
        .await
        .0;
    if let Some(ns) = &ns {
        let path = dir.join("cut.yaml");
        std::fs::write(&path, scenario(&[CUT])).unwrap();
        running.push(kube_sim_in(Some(ns), &bin, &path, &kc_cut));
        let kubeconfig = kc_cut.join(format!("{CUT}.kubeconfig"));
        wait_until("the partitioned cluster's kubeconfig", LIMIT, || async {
            kubeconfig.exists()
        })
        .await;
        let hubs: Vec<String> = ports
            .iter()
            .map(|p| format!("{}:{p}", ns.host_ip))
            .collect();
        let token = join_token(ports[0], CUT).await;
        running.push(agent_in(
            Some(ns),
            &bin,
            (CUT, &ring(CUT)),
            &hubs,
            &token,
            &kubeconfig,
        ));
    }
    let _agents = Procs(running);
    wait_until(
        "nine clusters Ready and able to run campaigns",
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
    let log = |n: &str| {
        let dir = if ns.is_some() && n == CUT {
            &kc_cut
        } else {
            &kc
        };
        std::fs::read_to_string(dir.join(format!("{n}.agent.log"))).unwrap()
    };

    wait_until("stage one done, its gate waiting", LIMIT, || async {
        campaign(ports[lead], &id)
            .await
            .is_some_and(|c| c.waiting_approvals == ["one-after-0"])
    })
    .await;
    // The first stage ran its own three clusters, and nothing outside it has been touched.
    let info = campaign(ports[lead], &id).await.unwrap();
    assert_eq!(
        info.clusters_by_phase.get("Done"),
        Some(&3),
        "{:?}",
        info.clusters_by_phase
    );
    for n in NAMES.iter().filter(|n| !n.starts_with("one-")) {
        let started = steps(&log(n), "step started");
        assert!(started.is_empty(), "{n} ran {started:?} during stage one");
    }
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
        (c.current_stage != "one" || done > 3 || c.state != v1::CampaignState::Running as i32)
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
    // Partition the third stage's slow cluster once its rollout has begun.
    if let Some(ns) = &ns {
        let phase = wait_until_some(
            "the partitioned cluster to start",
            Duration::from_secs(180),
            || async {
                let c = campaign(ports[survivor], &id).await?;
                let p = cluster_phase(&c, CUT)?;
                (p != "Pending").then_some(p)
            },
        )
        .await;
        assert!(
            !matches!(phase.as_str(), "Done" | "Failed" | "RolledBack" | "Skipped"),
            "{CUT} ended ({phase}) before it could be partitioned"
        );
        ns.partition(true);
    }
    let info = wait_until_some("the campaign to end", Duration::from_secs(180), || async {
        let c = campaign(ports[survivor], &id).await?;
        (c.state != v1::CampaignState::Running as i32).then_some(c)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        info.state,
        v1::CampaignState::Succeeded as i32,
        "{}",
        info.detail_json
    );
    if ns.is_some() {
        // One failure is within the stage's budget: the campaign completes around it.
        assert_eq!(
            info.clusters_by_phase.get("Done"),
            Some(&8),
            "{:?}",
            info.clusters_by_phase
        );
        assert_eq!(info.clusters_by_phase.get("Failed"), Some(&1));
        let detail: serde_json::Value = serde_json::from_str(&info.detail_json).unwrap();
        let cut = cluster_run(&detail, CUT).unwrap();
        assert_eq!(cut["failed"], true, "counts against the budget: {cut}");
        assert!(
            cut["reason"]
                .as_str()
                .unwrap()
                .contains("unreachable for 3s"),
            "{cut}"
        );
    } else {
        assert_eq!(info.clusters_by_phase.get("Done"), Some(&9));
    }
    let (asked, unanswered) = dns_watch.await.unwrap();
    assert!(asked > 20, "DNS was asked {asked} times");
    assert_eq!(
        unanswered, 0,
        "{unanswered} of {asked} DNS queries unanswered"
    );

    // The step log: no step ran twice; every stage's steps came after the stage before's;
    // every cluster drained each blue node once.
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut stages: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for n in NAMES {
        let log = log(n);
        let done = steps(&log, "step done");
        for (seq, kind) in &done {
            if let Some(other) = seen.insert(*seq, format!("{n} {kind}")) {
                panic!("step {seq} ran twice: {other} and {n} {kind}");
            }
        }
        let stage = ["one-", "two-", "three-"]
            .iter()
            .position(|p| n.starts_with(p))
            .unwrap();
        for (seq, _) in steps(&log, "step started") {
            let (lo, hi) = stages.entry(stage).or_insert((u64::MAX, 0));
            *lo = (*lo).min(seq);
            *hi = (*hi).max(seq);
        }
        if ns.is_some() && n == CUT {
            continue;
        }
        let drains = done.iter().filter(|(_, k)| k == "drain-batch").count();
        assert_eq!(drains, 3, "{n}: {done:?}");
        assert!(
            done.iter().any(|(_, k)| k == "retire-blue"),
            "{n}: {done:?}"
        );
    }
    assert!(
        stages[&0].1 < stages[&1].0 && stages[&1].1 < stages[&2].0,
        "stages overlapped (first and last seq per stage): {stages:?}"
    );

    // Healed, the cluster comes back and a retry finishes it.
    let Some(ns) = &ns else { return };
    ns.partition(false);
    // Ready, and staying so: the stream cut by the partition may deliver its buffered
    // heartbeats and then end, leaving the cluster Unreachable until the agent's new session
    // (a retry landing then would skip it, as it skips any cluster unreachable at its turn).
    let stable = std::cell::Cell::new(None::<tokio::time::Instant>);
    wait_until(&format!("{CUT} Ready for 3 s"), LIMIT, || async {
        let ready = clusters(ports[survivor])
            .await
            .is_some_and(|cs| health(&cs, CUT) == Some(v1::ClusterHealth::Ready));
        let since = if ready {
            stable.get().unwrap_or_else(tokio::time::Instant::now)
        } else {
            stable.set(None);
            return false;
        };
        stable.set(Some(since));
        since.elapsed() >= Duration::from_secs(3)
    })
    .await;
    // flotctl (the hub binary's `ctl`) pointed at a follower: the write goes to the leader.
    let new_lead = leader(backend, (&ports, &http), &others).await.unwrap();
    let follower = others.iter().copied().find(|i| *i != new_lead).unwrap();
    let out = std::process::Command::new(bin.join("flotilla-hub"))
        .args(["ctl", "--hub", &format!("127.0.0.1:{}", ports[follower])])
        .args(flotilla_e2e::ctl_tls_args(dir))
        .args(["campaign", "retry", &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flotctl campaign retry via a follower: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = wait_until_some("the retry to end", Duration::from_secs(180), || async {
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
    let detail: serde_json::Value = serde_json::from_str(&info.detail_json).unwrap();
    assert_eq!(
        info.clusters_by_phase.get("Done"),
        Some(&9),
        "{:?}; {CUT}: {}",
        info.clusters_by_phase,
        cluster_run(&detail, CUT).unwrap()
    );
}

/// One cluster's run in a campaign's detail.
fn cluster_run<'a>(detail: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    detail["stages"]
        .as_array()?
        .iter()
        .filter_map(|s| s["clusters"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
}

/// One cluster's phase, from the campaign's detail.
fn cluster_phase(c: &v1::CampaignInfo, name: &str) -> Option<String> {
    let detail: serde_json::Value = serde_json::from_str(&c.detail_json).ok()?;
    cluster_run(&detail, name)?["phase"]
        .as_str()
        .map(str::to_string)
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
