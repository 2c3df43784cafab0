//! `flotctl` against a real one-member hub with an agent reporting a simulated cluster.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use flotilla_api::v1;
use flotilla_kube_sim::{Scenario, SimFleet, SimOptions};
use tokio_util::sync::CancellationToken;

const FLOTCTL: &str = env!("CARGO_BIN_EXE_flotctl");

const SIM: &str = r#"
clusters:
  - name: cli-test
    region: westeurope
    provider: aks
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, service: {port: 8000, type: LoadBalancer}, export: true}
"#;

fn flotctl(hub: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(FLOTCTL)
        .arg("--hub")
        .arg(hub)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_describe_fit_join_and_errors() {
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
        "--agent-heartbeat",
        "200ms",
    ]);
    let shutdown = CancellationToken::new();
    let running = flotilla_hub::start(args, shutdown.clone()).await.unwrap();
    let fleet = running.fleet.clone();
    let hub = running.addr.to_string();
    while !fleet.health.active() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `join` prints a manifest with a working token; an agent uses it.
    let h = hub.clone();
    let (code, manifest, err) =
        tokio::task::spawn_blocking(move || flotctl(&h, &["join", "cli-test"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let token = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(manifest.contains("value: \"cli-test\"") && manifest.contains("kind: ClusterRole"));
    let sims = SimFleet::start(&Scenario::from_yaml(SIM).unwrap(), SimOptions::default())
        .await
        .unwrap();
    let kc = kube::config::Kubeconfig::from_yaml(&sims.clusters()[0].kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let opts = flotilla_agent::AgentOptions::simulated("cli-test", &hub, token, Default::default());
    tokio::spawn(flotilla_agent::run(config, opts, None, shutdown.clone()));

    let h = hub.clone();
    let out = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, out, _) = flotctl(&h, &["get", "clusters"]);
            if out.contains("Ready") && out.contains(" 16 ") {
                return out;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cluster never Ready with 16 GPUs:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(out.starts_with("NAME"), "{out}");

    let h = hub.clone();
    tokio::task::spawn_blocking(move || {
        let (code, out, _) = flotctl(&h, &["get", "gpus"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("NVIDIA-H100-80GB-HBM3") && out.contains("16"),
            "{out}"
        );
        let (code, out, _) = flotctl(&h, &["-o", "json", "get", "gpus", "--by", "region"]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["key"], "westeurope");
        assert_eq!(v[0]["total"], 16);
        let (code, out, _) = flotctl(&h, &["-o", "yaml", "describe", "cluster", "cli-test"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("name: cli-test") && out.contains("health: Ready"),
            "{out}"
        );
        let (code, out, _) = flotctl(&h, &["describe", "cluster", "cli-test"]);
        assert_eq!(code, 0);
        assert!(out.contains("Pools:") && out.contains("h100"), "{out}");
        // Times as RFC 3339 with an age; a new cluster's first transition is from nothing.
        let year = format!("{}-", 1970 + flotctl::unix_ms_now() / 31_556_952_000);
        assert!(out.contains(&year) && out.contains("s ago)"), "{out}");
        assert!(out.contains("new -> Joining: joined the fleet"), "{out}");
        assert!(out.contains("Joining -> Ready"), "{out}");
        let (_, out, _) = flotctl(&h, &["get", "clusters"]);
        assert!(out.contains("WHOLE-FREE"), "{out}");
        // `watch` prints the fleet as it is before any change.
        let mut w = std::process::Command::new(env!("CARGO_BIN_EXE_flotctl"))
            .args(["--hub", &h, "watch"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(w.stdout.take().unwrap()),
            &mut first,
        )
        .unwrap();
        w.kill().unwrap();
        let _ = w.wait();
        assert!(
            first.starts_with("cli-test") && first.contains("current") && first.contains("Ready"),
            "{first}"
        );
        let (code, out, _) = flotctl(
            &h,
            &[
                "fit",
                "--gpus",
                "4",
                "--min-memory",
                "80Gi",
                "--product",
                "H100",
                "--replicas",
                "3",
            ],
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("cli-test") && out.contains("h100"), "{out}");
        // Nothing fits: a distinct exit code and the reason.
        let (code, out, err) = flotctl(&h, &["fit", "--gpus", "8", "--replicas", "5"]);
        assert_eq!(code, 5, "{out}{err}");
        assert!(out.contains("only 2 of 5 replicas"), "{out}");
        // Errors a person can act on.
        let (code, _, err) = flotctl(&h, &["describe", "cluster", "missing"]);
        assert_eq!(code, 3);
        assert!(err.contains("no cluster \"missing\""), "{err}");
        let (code, _, err) = flotctl(&h, &["fit", "--gpus", "1", "--min-memory", "lots"]);
        assert_eq!(code, 2);
        assert!(err.contains("--min-memory"), "{err}");
        let (code, _, err) = flotctl(&h, &["join", "Not_A_Label"]);
        assert_eq!(code, 2);
        assert!(err.contains("invalid cluster"), "{err}");
        let (code, _, err) = flotctl("127.0.0.1:1", &["get", "clusters"]);
        assert_eq!(code, 4);
        assert!(err.contains("FLOTILLA_HUB"), "{err}");

        // Discovery: the exported service, its route and why, policies and their errors.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, out, _) = flotctl(&h, &["get", "services"]);
            if out.contains("llm") && out.contains("2/2") {
                assert!(
                    out.contains("ClusterSetIP") && out.contains("http:8000/TCP"),
                    "{out}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the export never arrived:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, out, err) = flotctl(&h, &["explain", "route", "llm.ml", "--from", "cli-test"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("cli-test") && out.contains("chosen: tier 1"),
            "{out}"
        );
        let (code, out, _) = flotctl(&h, &["-o", "json", "resolve", "ml/llm"]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["answers"][0]["cluster"], "cli-test", "{out}");
        let file = std::env::temp_dir().join(format!("flotctl-policy-{}.yaml", std::process::id()));
        std::fs::write(&file, "maxAnswers: 100\n").unwrap();
        let (code, _, err) = flotctl(
            &h,
            &["policy", "set", "-f", file.to_str().unwrap(), "llm.ml"],
        );
        assert_eq!(code, 2, "{err}");
        assert_eq!(
            err.trim(),
            "flotctl: invalid spec.maxAnswers: must be within 1–64, got 100"
        );
        std::fs::write(&file, "tierz: []\n").unwrap();
        let (code, _, err) = flotctl(
            &h,
            &["policy", "set", "-f", file.to_str().unwrap(), "llm.ml"],
        );
        assert_eq!(code, 2);
        assert!(err.contains("unknown field `tierz`"), "{err}");
        std::fs::write(&file, "localFirst: true\nttlSeconds: 30\n").unwrap();
        let (code, _, err) = flotctl(
            &h,
            &["policy", "set", "-f", file.to_str().unwrap(), "llm.ml"],
        );
        assert_eq!(code, 0, "{err}");
        let (code, out, _) = flotctl(&h, &["-o", "json", "policy", "get", "llm.ml"]);
        assert_eq!(code, 0);
        assert!(out.contains("\"ttlSeconds\": 30"), "{out}");
        let (code, out, _) = flotctl(&h, &["policy", "delete", "llm.ml"]);
        assert_eq!((code, out.trim()), (0, "deleted"));
        let (code, _, err) = flotctl(&h, &["describe", "service", "nope.ml"]);
        assert_eq!(code, 3, "{err}");
        let (code, out, _) = flotctl(&h, &["routes", "export", "llm.ml", "--format", "llm-d"]);
        assert_eq!(code, 0);
        assert!(
            out.starts_with("clusters:") && out.contains("cluster: cli-test"),
            "{out}"
        );
        let _ = std::fs::remove_file(&file);
    })
    .await
    .unwrap();
    // The fleet watch streams events (a quick look, then stop).
    let mut c = v1::fleet_service_client::FleetServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{hub}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let _ = c.watch(v1::WatchFleetRequest {}).await.unwrap();
    // Campaigns: a bad spec names its field; a dry run prints the plan and writes nothing.
    let h = hub.clone();
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let spec = |surge: &str| {
            format!(
                "name: cli\npool: {{machineDeployment: h100}}\ngreen: {{clusterApi: {{version: v1.35.0}}}}\nsurge: {surge}\nstages: [{{name: all}}]\n"
            )
        };
        let bad = dir_path.join("bad.yaml");
        std::fs::write(&bad, spec("\"150%\"")).unwrap();
        let (code, _, err) = flotctl(&h, &["campaign", "create", "-f", bad.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("invalid spec.surge"), "{err}");
        let good = dir_path.join("good.yaml");
        std::fs::write(&good, spec("1")).unwrap();
        let (code, out, err) = flotctl(
            &h,
            &["campaign", "create", "-f", good.to_str().unwrap(), "--dry-run"],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("Plan (dry run)")
                && out.contains("2 blue node(s), surge 1")
                && out.contains("nothing was written"),
            "{out}"
        );
        let (code, out, _) = flotctl(&h, &["campaign", "list"]);
        assert_eq!(code, 0);
        assert_eq!(out.lines().count(), 1, "only the header: {out}");
        let (code, _, err) = flotctl(&h, &["campaign", "approve", "nope-1234"]);
        assert_eq!(code, 3, "{err}");
    })
    .await
    .unwrap();

    shutdown.cancel();
    sims.shutdown().await;
}
