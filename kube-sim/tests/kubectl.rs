//! The real `kubectl` as a second, independent client. Where kubectl and kube-sim disagree,
//! kube-sim is wrong. Skips (with a printed reason) where kubectl is not installed.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_kube_sim::{Scenario, SimCluster, SimFleet, SimOptions};
use serde_json::json;

const SCENARIO: &str = r#"
clusters:
  - name: kubectl-test
    region: westeurope
    zones: [westeurope-1]
    provider: aks
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
    workloads:
      - {name: llm, namespace: inference, replicas: 2, gpus: 4, pdb: {min_available: 2}, service: {port: 8000}}
      - {name: cache, namespace: batch, replicas: 1, gpus: 1, empty_dir: true}
"#;

fn kubectl_available() -> bool {
    match std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(o) if o.status.success() => true,
        _ => {
            eprintln!(
                "SKIPPED: kubectl is not on PATH (install it to run the kubectl compatibility tests)"
            );
            false
        }
    }
}

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    text: String,
}

impl Kubectl {
    fn new(c: &SimCluster) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        std::fs::write(&kubeconfig, c.kubeconfig()).unwrap();
        let cache = dir.path().join("cache");
        Self {
            kubeconfig,
            cache,
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        let o = tokio::process::Command::new("kubectl")
            .args(args)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Out {
            ok: o.status.success(),
            text,
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(o.ok, "kubectl {args:?} failed:\n{}", o.text);
        o.text
    }
}

async fn start() -> SimFleet {
    SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap()
}

async fn settled(c: &SimCluster) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pods = c.list("pods", None).unwrap();
        let ready = pods.iter().filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
        if pods.len() >= 5 && ready.count() == pods.len() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_of(c: &SimCluster, ns: &str, app: &str) -> String {
    c.list("pods", Some(ns))
        .unwrap()
        .into_iter()
        .find(|p| p["metadata"]["labels"]["app"] == app)
        .unwrap()["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_describe_label_cordon() {
    if !kubectl_available() {
        return;
    }
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    settled(c).await;
    let k = Kubectl::new(c);
    let nodes = k.ok(&["get", "nodes"]).await;
    for n in c.list("nodes", None).unwrap() {
        assert!(
            nodes.contains(n["metadata"]["name"].as_str().unwrap()),
            "{nodes}"
        );
    }
    assert!(
        nodes.contains("Ready") && nodes.contains("v1.34.2"),
        "{nodes}"
    );
    let pods = k.ok(&["get", "pods", "-A", "-o", "wide"]).await;
    assert!(
        pods.contains("Running") && pods.contains("nvidia-device-plugin-daemonset"),
        "{pods}"
    );

    let node = node_of(c, "inference", "llm");
    let d = k.ok(&["describe", "node", &node]).await;
    assert!(d.contains("Allocated resources:"), "{d}");
    let line = d
        .lines()
        .skip_while(|l| !l.contains("Allocated resources:"))
        .find(|l| l.trim_start().starts_with("nvidia.com/gpu"));
    let line = line.unwrap_or_else(|| panic!("no GPU row in the allocated table:\n{d}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "4", "requests column: {line}");
    assert!(
        d.contains("nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"),
        "{d}"
    );

    k.ok(&["label", "node", &node, "team=ml"]).await;
    assert_eq!(
        c.get("nodes", "", &node).unwrap()["metadata"]["labels"]["team"],
        "ml"
    );
    k.ok(&["label", "node", &node, "team-"]).await;
    assert!(
        c.get("nodes", "", &node).unwrap()["metadata"]["labels"]
            .get("team")
            .is_none()
    );
    k.ok(&["cordon", &node]).await;
    assert_eq!(
        c.get("nodes", "", &node).unwrap()["spec"]["unschedulable"],
        true
    );
    let shown = k.ok(&["get", "node", &node]).await;
    assert!(shown.contains("SchedulingDisabled"), "{shown}");
    k.ok(&["uncordon", &node]).await;
    assert_ne!(
        c.get("nodes", "", &node).unwrap()["spec"]["unschedulable"],
        true
    );
    let missing = k.run(&["get", "node", "no-such-node"]).await;
    assert!(
        !missing.ok && missing.text.contains("not found"),
        "{}",
        missing.text
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_honours_daemonsets_emptydir_and_pdbs() {
    if !kubectl_available() {
        return;
    }
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    settled(c).await;
    let k = Kubectl::new(c);
    let node = node_of(c, "inference", "llm");

    // DaemonSet pods are refused without --ignore-daemonsets.
    let o = k.run(&["drain", &node, "--timeout=5s"]).await;
    assert!(!o.ok && o.text.contains("DaemonSet"), "{}", o.text);

    // Pods with emptyDir volumes are refused without --delete-emptydir-data, before any eviction.
    let cache_node = node_of(c, "batch", "cache");
    let o = k
        .run(&["drain", &cache_node, "--ignore-daemonsets", "--timeout=5s"])
        .await;
    assert!(!o.ok && o.text.contains("local storage"), "{}", o.text);
    k.ok(&["uncordon", &cache_node]).await;

    // PDB minAvailable 2 with 2 ready: kubectl gets 429s, retries, and gives up at the timeout.
    let o = k
        .run(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=3s",
        ])
        .await;
    assert!(!o.ok, "drain should time out: {}", o.text);
    assert!(o.text.contains("disruption budget"), "{}", o.text);

    // A mirror pod (static pod) on the node: kubectl identifies it by the annotation and
    // leaves it alone.
    c.create(
        "pods",
        "kube-system",
        json!({"metadata": {"name": format!("static-{node}"), "annotations": {"kubernetes.io/config.mirror": "abc"}},
               "spec": {"nodeName": node, "containers": [{"name": "s", "image": "static"}]}}),
    )
    .unwrap();

    // With the budget relaxed the drain completes; the evicted pod is rescheduled elsewhere.
    c.with_state(|s| {
        let mut pdb = (*s
            .store
            .get(flotilla_kube_sim::resources::idx::PDBS, "inference", "llm")
            .unwrap())
        .clone();
        pdb["spec"]["minAvailable"] = json!(1);
        s.store
            .update(
                flotilla_kube_sim::resources::idx::PDBS,
                "inference",
                "llm",
                pdb,
                false,
            )
            .unwrap();
    });
    let out = k
        .ok(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=30s",
        ])
        .await;
    assert!(out.contains("drained"), "{out}");
    let on_node: Vec<String> = c
        .list("pods", None)
        .unwrap()
        .into_iter()
        .filter(|p| p["spec"]["nodeName"] == node.as_str())
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        on_node
            .iter()
            .all(|p| p.starts_with("nvidia-device-plugin") || p.starts_with("static-")),
        "left on node: {on_node:?}"
    );
    assert!(
        on_node.iter().any(|p| p.starts_with("static-")),
        "the mirror pod must stay: {on_node:?}"
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_and_updates() {
    if !kubectl_available() {
        return;
    }
    let fleet = start().await;
    let c = &fleet.clusters()[0];
    let k = Kubectl::new(c);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    let manifest = |model: &str, replicas: u32| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: inference\ndata:\n  model: {model}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  replicas: {replicas}\n  \
             selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      \
             containers:\n      - name: web\n        image: nginx\n"
        )
    };
    std::fs::write(&file, manifest("llama-70b", 1)).unwrap();
    let out = k
        .ok(&["apply", "--validate=false", "-f", file.to_str().unwrap()])
        .await;
    assert!(
        out.contains("configmap/settings created") && out.contains("deployment.apps/web created"),
        "{out}"
    );
    std::fs::write(&file, manifest("llama-405b", 2)).unwrap();
    let out = k
        .ok(&["apply", "--validate=false", "-f", file.to_str().unwrap()])
        .await;
    assert!(out.contains("configmap/settings configured"), "{out}");
    assert_eq!(
        c.get("configmaps", "inference", "settings").unwrap()["data"]["model"],
        "llama-405b"
    );
    assert_eq!(
        c.get("deployments", "default", "web").unwrap()["spec"]["replicas"],
        2
    );
    let out = k
        .ok(&["apply", "--validate=false", "-f", file.to_str().unwrap()])
        .await;
    assert!(out.contains("unchanged"), "{out}");
    fleet.shutdown().await;
}
