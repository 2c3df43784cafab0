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
    timing: {grace_second_ms: 10}
    pools:
      - name: h100
        count: 2
        quota: 3
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
    workloads:
      - {name: llm, namespace: inference, replicas: 2, gpus: 4, pdb: {min_available: 2}, service: {port: 8000}}
      - {name: cache, namespace: batch, replicas: 1, gpus: 1, empty_dir: true}
"#;

/// The kubectl binaries to test with: the oldest and newest `kubectl.1.NN` installed beside
/// the `kubectl` on PATH (as the Google Cloud SDK installs them), or every one of them with
/// `FLOTILLA_KUBECTL_ALL=1`, or that `kubectl` alone. Empty (with a printed reason) when
/// kubectl is not installed.
fn kubectls() -> Vec<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
    });
    let Some(kubectl) = on_path else {
        eprintln!(
            "SKIPPED: kubectl is not on PATH (install it to run the kubectl compatibility tests)"
        );
        return Vec::new();
    };
    let dir = std::fs::canonicalize(&kubectl)
        .ok()
        .and_then(|k| k.parent().map(PathBuf::from));
    let mut versioned: Vec<(u32, PathBuf)> = dir
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let minor = name.strip_prefix("kubectl.1.")?.parse().ok()?;
            Some((minor, e.path()))
        })
        .collect();
    versioned.sort();
    if versioned.is_empty() {
        return vec![kubectl];
    }
    if std::env::var("FLOTILLA_KUBECTL_ALL").is_ok_and(|v| v == "1") {
        return versioned.into_iter().map(|(_, p)| p).collect();
    }
    let oldest = versioned.first().cloned().expect("non-empty");
    let newest = versioned.last().cloned().expect("non-empty");
    let mut out = vec![oldest.1];
    if newest.0 != oldest.0 {
        out.push(newest.1);
    }
    out
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    text: String,
}

impl Kubectl {
    fn new(c: &SimCluster, bin: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        std::fs::write(&kubeconfig, c.kubeconfig()).unwrap();
        let cache = dir.path().join("cache");
        eprintln!("with {}", bin.display());
        Self {
            bin: bin.to_path_buf(),
            kubeconfig,
            cache,
            _dir: dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Out {
        let o = tokio::process::Command::new(&self.bin)
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
        assert!(o.ok, "{} {args:?} failed:\n{}", self.bin.display(), o.text);
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
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_honours_daemonsets_emptydir_and_pdbs() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_and_updates() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        let k = Kubectl::new(c, &bin);
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
            out.contains("configmap/settings created")
                && out.contains("deployment.apps/web created"),
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
}

impl Kubectl {
    /// The client's minor version (`32` for 1.32).
    async fn minor(&self) -> u32 {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["version", "--client", "-o", "json"]).await).unwrap();
        v["clientVersion"]["minor"]
            .as_str()
            .unwrap()
            .trim_end_matches('+')
            .parse()
            .unwrap()
    }
}

fn pods_on(c: &SimCluster, node: &str) -> Vec<String> {
    c.list("pods", None)
        .unwrap()
        .into_iter()
        .filter(|p| p["spec"]["nodeName"] == node)
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .filter(|n| !n.starts_with("nvidia-device-plugin"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_writes_work_in_json_and_protobuf() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        // kubectl 1.32 and later send built-in types in protobuf; older ones in JSON.
        let out = k.ok(&["create", "namespace", "team-a", "-v=8"]).await;
        assert_eq!(
            out.contains("Content-Type: application/vnd.kubernetes.protobuf"),
            k.minor().await >= 32,
            "{out}"
        );
        assert!(c.get("namespaces", "", "team-a").is_ok());
        k.ok(&[
            "create",
            "deployment",
            "web",
            "--image=nginx",
            "--replicas=2",
            "-n",
            "team-a",
        ])
        .await;
        let d = c.get("deployments", "team-a", "web").unwrap();
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx"
        );
        k.ok(&[
            "create",
            "configmap",
            "cfg",
            "--from-literal=model=llama",
            "-n",
            "team-a",
        ])
        .await;
        assert_eq!(
            c.get("configmaps", "team-a", "cfg").unwrap()["data"]["model"],
            "llama"
        );
        // drain --disable-eviction deletes each pod with DeleteOptions in the body.
        let node = node_of(c, "batch", "cache");
        let out = k
            .ok(&[
                "drain",
                &node,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--disable-eviction",
                "--timeout=30s",
            ])
            .await;
        assert!(out.contains("drained"), "{out}");
        assert_eq!(pods_on(c, &node), Vec::<String>::new());
        fleet.shutdown().await;
    }
}

fn taints(c: &SimCluster, node: &str) -> Vec<String> {
    c.get("nodes", "", node).unwrap()["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            format!(
                "{}={}:{}",
                t["key"].as_str().unwrap(),
                t["value"].as_str().unwrap_or(""),
                t["effect"].as_str().unwrap()
            )
        })
        .collect()
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taints_are_replaced_and_the_lifecycle_controller_taints_nodes() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        let node = node_of(c, "inference", "llm");
        k.ok(&["taint", "nodes", &node, "upgrade=blue:NoSchedule"])
            .await;
        k.ok(&["taint", "nodes", &node, "drain=soon:NoExecute"])
            .await;
        let mut both = taints(c, &node);
        both.sort();
        assert_eq!(both, ["drain=soon:NoExecute", "upgrade=blue:NoSchedule"]);
        // Removing one taint sends the remaining list; the list is replaced.
        let out = k
            .ok(&["taint", "nodes", &node, "upgrade:NoSchedule-"])
            .await;
        assert!(out.contains("untainted"), "{out}");
        assert_eq!(taints(c, &node), ["drain=soon:NoExecute"]);
        k.ok(&["taint", "nodes", &node, "drain-"]).await;
        assert_eq!(taints(c, &node), Vec::<String>::new());

        // Cordon: the unschedulable taint comes and goes with spec.unschedulable.
        k.ok(&["cordon", &node]).await;
        until("the unschedulable taint", || {
            taints(c, &node) == ["node.kubernetes.io/unschedulable=:NoSchedule"]
        })
        .await;
        k.ok(&["uncordon", &node]).await;
        until("no taints after uncordon", || taints(c, &node).is_empty()).await;

        // A silent kubelet: every condition Unknown, and the unreachable taints.
        let fault = flotilla_kube_sim::faults::Fault::NodeNotReady { node: node.clone() };
        c.inject(&fault).unwrap();
        until("the unreachable taints", || {
            let mut t = taints(c, &node);
            t.sort();
            t == [
                "node.kubernetes.io/unreachable=:NoExecute",
                "node.kubernetes.io/unreachable=:NoSchedule",
            ]
        })
        .await;
        let n = c.get("nodes", "", &node).unwrap();
        assert!(
            n["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["status"] == "Unknown"),
            "{n}"
        );
        let shown = k.ok(&["describe", "node", &node]).await;
        assert!(
            shown.contains("node.kubernetes.io/unreachable:NoExecute"),
            "{shown}"
        );
        // The node lifecycle controller's events: on the node, and a warning on its pods.
        let events = k
            .ok(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                "reason=NodeNotReady",
            ])
            .await;
        assert!(
            events.contains(&format!("Node {node} status is now: NodeNotReady"))
                && events.contains("Node is not ready"),
            "{events}"
        );
        c.clear(&fault);
        until("no taints once Ready", || taints(c, &node).is_empty()).await;
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_quantities_are_stored_as_strings_and_scheduled() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        // 12 one-GPU pods written with `nvidia.com/gpu: 1` (a YAML number). The two 8-GPU
        // nodes have 16 GPUs and 9 are taken (llm 2×4, cache 1): 7 fit, 5 wait.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gpu.yaml");
        std::fs::write(
            &file,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: one-gpu, namespace: batch}\n\
             spec:\n  replicas: 12\n  selector: {matchLabels: {app: one-gpu}}\n  template:\n    \
             metadata: {labels: {app: one-gpu}}\n    spec:\n      \
             tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n      \
             containers:\n      - name: c\n        image: cuda\n        resources:\n          \
             requests: {nvidia.com/gpu: 1, cpu: 0.5}\n          limits: {nvidia.com/gpu: 1}\n",
        )
        .unwrap();
        k.ok(&["apply", "--validate=false", "-f", file.to_str().unwrap()])
            .await;
        let d = c.get("deployments", "batch", "one-gpu").unwrap();
        let req = &d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"];
        assert_eq!(req["nvidia.com/gpu"], "1");
        assert_eq!(req["cpu"], "500m");
        let one_gpu = || {
            c.list("pods", Some("batch"))
                .unwrap()
                .into_iter()
                .filter(|p| p["metadata"]["labels"]["app"] == "one-gpu")
                .collect::<Vec<_>>()
        };
        until("12 pods", || one_gpu().len() == 12).await;
        until("7 bound", || {
            one_gpu()
                .iter()
                .filter(|p| p["spec"]["nodeName"].is_string())
                .count()
                == 7
        })
        .await;
        let mut per_node: std::collections::HashMap<String, i64> = Default::default();
        for p in c.list("pods", None).unwrap() {
            if let Some(n) = p["spec"]["nodeName"].as_str() {
                let g = p["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
                    .as_str()
                    .map_or(0, |g| g.parse::<i64>().unwrap());
                *per_node.entry(n.to_string()).or_default() += g;
            }
        }
        assert!(per_node.values().all(|g| *g <= 8), "{per_node:?}");
        let bad_file = dir.path().join("bad.yaml");
        std::fs::write(
            &bad_file,
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: batch}\nspec:\n  \
             containers: [{name: c, image: x, resources: {requests: {cpu: lots}}}]\n",
        )
        .unwrap();
        let bad = k
            .run(&[
                "create",
                "--validate=false",
                "-f",
                bad_file.to_str().unwrap(),
            ])
            .await;
        assert!(
            !bad.ok
                && bad.text.contains("cannot be handled as a Pod")
                && bad
                    .text
                    .contains("spec.containers[0].resources.requests[cpu]"),
            "{}",
            bad.text
        );
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_subresource_for_deployments_and_machine_deployments() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        let out = k
            .ok(&[
                "scale",
                "deployment",
                "llm",
                "-n",
                "inference",
                "--replicas=1",
            ])
            .await;
        assert!(out.contains("scaled"), "{out}");
        assert_eq!(
            c.get("deployments", "inference", "llm").unwrap()["spec"]["replicas"],
            1
        );
        // --current-replicas is a precondition the Scale carries.
        let o = k
            .run(&[
                "scale",
                "deployment",
                "llm",
                "-n",
                "inference",
                "--current-replicas=3",
                "--replicas=2",
            ])
            .await;
        assert!(
            !o.ok && o.text.contains("Expected replicas to be 3"),
            "{}",
            o.text
        );
        k.ok(&["scale", "machinedeployment", "h100", "--replicas=3"])
            .await;
        until("three h100 nodes", || {
            c.list("nodes", None)
                .unwrap()
                .iter()
                .filter(|n| n["metadata"]["name"].as_str().unwrap().starts_with("h100"))
                .count()
                == 3
        })
        .await;
        let s: serde_json::Value = serde_json::from_str(
            &k.ok(&[
                "get",
                "--raw",
                "/apis/cluster.x-k8s.io/v1beta1/namespaces/default/machinedeployments/h100/scale",
            ])
            .await,
        )
        .unwrap();
        assert_eq!(s["kind"], "Scale");
        assert_eq!(s["spec"]["replicas"], 3);
        assert!(
            s["status"]["selector"].as_str().unwrap().contains("h100"),
            "{s}"
        );
        fleet.shutdown().await;
    }
}

fn pod_names(c: &SimCluster, ns: &str, app: &str) -> Vec<String> {
    c.list("pods", Some(ns))
        .unwrap()
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["app"] == app)
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_is_graceful_and_finalizers_hold_objects() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        // A pod with a long grace period stays Terminating, then goes; its ReplicaSet
        // replaces it at once (a terminating pod is not counted).
        let pod = pod_names(c, "batch", "cache")[0].clone();
        k.ok(&[
            "delete",
            "pod",
            &pod,
            "-n",
            "batch",
            "--grace-period=200",
            "--wait=false",
        ])
        .await;
        let shown = k.ok(&["get", "pod", &pod, "-n", "batch"]).await;
        assert!(shown.contains("Terminating"), "{shown}");
        let p = c.get("pods", "batch", &pod).unwrap();
        assert!(p["metadata"]["deletionTimestamp"].is_string(), "{p}");
        assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 200);
        until("a replacement pod", || {
            pod_names(c, "batch", "cache").len() == 2
        })
        .await;
        // --wait (the default) returns once the pod is gone: 200 s × 10 ms.
        k.ok(&["delete", "pod", &pod, "-n", "batch", "--timeout=30s"])
            .await;
        assert!(c.get("pods", "batch", &pod).is_err());
        let events = k
            .ok(&[
                "get",
                "events",
                "-n",
                "batch",
                "--field-selector",
                &format!("involvedObject.name={pod}"),
            ])
            .await;
        assert!(
            events.contains("Killing") && events.contains("Stopping container server"),
            "{events}"
        );

        // A finalizer holds an object until it is removed.
        c.create(
            "configmaps",
            "batch",
            json!({"metadata": {"name": "held", "finalizers": ["example.com/keep"]}}),
        )
        .unwrap();
        k.ok(&["delete", "configmap", "held", "-n", "batch", "--wait=false"])
            .await;
        let cm = c.get("configmaps", "batch", "held").unwrap();
        assert!(cm["metadata"]["deletionTimestamp"].is_string(), "{cm}");
        k.ok(&[
            "patch",
            "configmap",
            "held",
            "-n",
            "batch",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .await;
        assert!(c.get("configmaps", "batch", "held").is_err());

        // A namespace is Terminating until its objects are gone; nothing new may be created.
        k.ok(&["delete", "namespace", "batch", "--wait=false"])
            .await;
        let ns = k.ok(&["get", "namespace", "batch"]).await;
        assert!(ns.contains("Terminating"), "{ns}");
        let o = k.run(&["create", "configmap", "late", "-n", "batch"]).await;
        assert!(
            !o.ok
                && o.text.contains(
                    "unable to create new content in namespace batch because it is being terminated"
                ),
            "{}",
            o.text
        );
        k.ok(&["wait", "--for=delete", "namespace/batch", "--timeout=30s"])
            .await;
        assert!(c.list("pods", Some("batch")).unwrap().is_empty());
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_roll_with_revisions_history_and_undo() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        let ns = ["-n", "default"];
        k.ok(&[
            &[
                "create",
                "deployment",
                "web",
                "--image=nginx:1.27",
                "--replicas=4",
            ][..],
            &ns[..],
        ]
        .concat())
            .await;
        k.ok(&[
            &["rollout", "status", "deployment/web", "--timeout=30s"][..],
            &ns[..],
        ]
        .concat())
            .await;
        k.ok(&[
            &[
                "wait",
                "--for=condition=Available",
                "deployment/web",
                "--timeout=30s",
            ][..],
            &ns[..],
        ]
        .concat())
            .await;
        k.ok(&[
            &["set", "image", "deployment/web", "nginx=nginx:1.28"][..],
            &ns[..],
        ]
        .concat())
            .await;
        let out = k
            .ok(&[
                &["rollout", "status", "deployment/web", "--timeout=30s"][..],
                &ns[..],
            ]
            .concat())
            .await;
        assert!(out.contains("successfully rolled out"), "{out}");
        // Two ReplicaSets, one per template, the old one scaled to 0.
        let rs: Vec<serde_json::Value> = c
            .list("replicasets", Some("default"))
            .unwrap()
            .into_iter()
            .filter(|r| r["metadata"]["name"].as_str().unwrap().starts_with("web-"))
            .collect();
        assert_eq!(rs.len(), 2, "{rs:?}");
        let by_rev = |rev: &str| {
            rs.iter()
                .find(|r| r["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == rev)
                .unwrap_or_else(|| panic!("no revision {rev}: {rs:?}"))
                .clone()
        };
        assert_eq!(by_rev("1")["spec"]["replicas"], 0);
        assert_eq!(by_rev("2")["spec"]["replicas"], 4);
        let d = c.get("deployments", "default", "web").unwrap();
        assert_eq!(
            d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
            "2"
        );
        let history = k
            .ok(&[&["rollout", "history", "deployment/web"][..], &ns[..]].concat())
            .await;
        assert!(
            history.contains("1 ") && history.contains("2 "),
            "{history}"
        );
        let events = k
            .ok(&[
                &[
                    "get",
                    "events",
                    "--field-selector",
                    "involvedObject.name=web",
                ][..],
                &ns[..],
            ]
            .concat())
            .await;
        assert!(
            events.contains("ScalingReplicaSet") && events.contains("Scaled down replica set"),
            "{events}"
        );

        // Undo: back to the first template, which becomes revision 3.
        k.ok(&[&["rollout", "undo", "deployment/web"][..], &ns[..]].concat())
            .await;
        k.ok(&[
            &["rollout", "status", "deployment/web", "--timeout=30s"][..],
            &ns[..],
        ]
        .concat())
            .await;
        let d = c.get("deployments", "default", "web").unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:1.27"
        );
        assert_eq!(
            d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
            "3"
        );
        let pods: Vec<serde_json::Value> = c
            .list("pods", Some("default"))
            .unwrap()
            .into_iter()
            .filter(|p| {
                p["metadata"]["labels"]["app"] == "web"
                    && p["metadata"]["deletionTimestamp"].is_null()
            })
            .collect();
        assert_eq!(pods.len(), 4);
        assert!(
            pods.iter()
                .all(|p| p["spec"]["containers"][0]["image"] == "nginx:1.27")
        );
        let conds = &d["status"]["conditions"];
        assert!(
            conds.to_string().contains("NewReplicaSetAvailable"),
            "{conds}"
        );

        // A rollout that cannot progress: its pods never fit, and the deadline passes.
        k.ok(&[
            &[
                "create",
                "deployment",
                "huge",
                "--image=cuda",
                "--replicas=1",
            ][..],
            &ns[..],
        ]
        .concat())
            .await;
        k.ok(&[&["patch", "deployment", "huge", "-p",
                 r#"{"spec":{"progressDeadlineSeconds":1,"template":{"spec":{"containers":[{"name":"cuda","resources":{"limits":{"nvidia.com/gpu":"64"}}}]}}}}"#][..], &ns[..]].concat())
            .await;
        let o = k
            .run(
                &[
                    &["rollout", "status", "deployment/huge", "--timeout=30s"][..],
                    &ns[..],
                ]
                .concat(),
            )
            .await;
        assert!(
            !o.ok && o.text.contains("exceeded its progress deadline"),
            "{}",
            o.text
        );
        let events = k
            .ok(&[
                &[
                    "get",
                    "events",
                    "--field-selector",
                    "reason=FailedScheduling",
                ][..],
                &ns[..],
            ]
            .concat())
            .await;
        assert!(events.contains("Insufficient nvidia.com/gpu"), "{events}");
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_deployments_drain_before_deleting_and_stop_at_the_quota() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        // The quota for h100 is 3 nodes: a scale to 5 leaves 2 machines pending.
        k.ok(&["scale", "machinedeployment", "h100", "--replicas=5"])
            .await;
        until("a QuotaExceeded condition", || {
            c.get("machinedeployments", "default", "h100").unwrap()["status"]["conditions"][0]["reason"]
                == "QuotaExceeded"
        })
        .await;
        let md = c.get("machinedeployments", "default", "h100").unwrap();
        assert_eq!(md["status"]["replicas"], 3, "{md}");
        assert!(
            md["status"]["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("2 of 5 machines pending"),
            "{md}"
        );
        let events = k
            .ok(&["get", "events", "--field-selector", "reason=QuotaExceeded"])
            .await;
        assert!(events.contains("quota exceeded"), "{events}");

        // New nodes from a bad image come up NotReady.
        k.ok(&["scale", "machinedeployment", "h100", "--replicas=2"])
            .await;
        until("two h100 nodes", || {
            c.list("nodes", None)
                .unwrap()
                .iter()
                .filter(|n| n["metadata"]["name"].as_str().unwrap().starts_with("h100"))
                .count()
                == 2
        })
        .await;
        let fault = flotilla_kube_sim::faults::Fault::BadNewNodes {
            pool: "h100".into(),
            not_ready: true,
            failed_gpus: 0,
        };
        c.inject(&fault).unwrap();
        k.ok(&["scale", "machinedeployment", "h100", "--replicas=3"])
            .await;
        until("a NotReady h100 node", || {
            let nodes = k_nodes(c);
            nodes.len() == 3 && nodes.iter().filter(|n| !ready(n)).count() == 1
        })
        .await;
        let shown = k.ok(&["get", "nodes"]).await;
        assert!(shown.contains("NotReady"), "{shown}");
        c.clear(&fault);
        until("every node Ready", || k_nodes(c).iter().all(ready)).await;

        // Scale-down drains: the node running an llm pod is chosen (delete-machine), cordoned,
        // and kept while the PDB (minAvailable 2 of 2) refuses the eviction.
        let node = node_of(c, "inference", "llm");
        k.ok(&[
            "annotate",
            "node",
            &node,
            "cluster.x-k8s.io/delete-machine=yes",
        ])
        .await;
        k.ok(&["scale", "machinedeployment", "h100", "--replicas=2"])
            .await;
        until("the node cordoned", || {
            c.get("nodes", "", &node).unwrap()["spec"]["unschedulable"] == true
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(c.get("nodes", "", &node).is_ok(), "the PDB holds the node");
        let shown = k.ok(&["get", "node", &node]).await;
        assert!(shown.contains("SchedulingDisabled"), "{shown}");
        // Cluster API's nodeDrainTimeout ends the wait: the node goes with its pod on it, and
        // the pod is replaced elsewhere. (A relaxed PDB ends it too: kube_rs.rs.)
        k.ok(&[
            "patch",
            "machinedeployment",
            "h100",
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"nodeDrainTimeout":"1s"}}}}"#,
        ])
        .await;
        until("the node deleted after its drain timeout", || {
            c.get("nodes", "", &node).is_err()
        })
        .await;
        until("llm Ready elsewhere", || {
            c.list("pods", Some("inference"))
                .unwrap()
                .iter()
                .filter(|p| {
                    p["metadata"]["labels"]["app"] == "llm"
                        && p["spec"]["nodeName"] != node.as_str()
                        && ready(p)
                })
                .count()
                == 2
        })
        .await;
        fleet.shutdown().await;
    }
}

fn k_nodes(c: &SimCluster) -> Vec<serde_json::Value> {
    c.list("nodes", None)
        .unwrap()
        .into_iter()
        .filter(|n| n["metadata"]["name"].as_str().unwrap().starts_with("h100"))
        .collect()
}

/// Whether a node's or a pod's Ready condition is True.
fn ready(o: &serde_json::Value) -> bool {
    o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

impl Kubectl {
    /// Run a `get -w` for `secs` seconds while `during` runs; what it printed.
    async fn watch_while(
        &self,
        args: &[&str],
        secs: u64,
        during: impl std::future::Future<Output = ()>,
    ) -> String {
        let child = tokio::process::Command::new(&self.bin)
            .args(args)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let out = tokio::spawn(child.wait_with_output());
        tokio::time::sleep(Duration::from_millis(700)).await;
        during.await;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        // SIGTERM ends the watch; what it printed until then is the answer.
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        let o = out.await.unwrap().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

fn header(out: &str) -> String {
    out.lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_page_sort_and_watch_with_the_real_columns() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        // Columns as the real printers write them.
        for (args, want) in [
            (
                &["get", "nodes", "-o", "wide"][..],
                "NAME STATUS ROLES AGE VERSION INTERNAL-IP EXTERNAL-IP OS-IMAGE KERNEL-VERSION CONTAINER-RUNTIME",
            ),
            (
                &["get", "deployments", "-n", "inference"][..],
                "NAME READY UP-TO-DATE AVAILABLE AGE",
            ),
            (
                &["get", "replicasets", "-n", "inference", "-o", "wide"][..],
                "NAME DESIRED CURRENT READY AGE CONTAINERS IMAGES SELECTOR",
            ),
            (
                &["get", "daemonsets", "-n", "kube-system"][..],
                "NAME DESIRED CURRENT READY UP-TO-DATE AVAILABLE NODE SELECTOR AGE",
            ),
            (
                &["get", "pdb", "-n", "inference"][..],
                "NAME MIN AVAILABLE MAX UNAVAILABLE ALLOWED DISRUPTIONS AGE",
            ),
            (&["get", "namespaces"][..], "NAME STATUS AGE"),
            (
                &["get", "machinedeployments"][..],
                "NAME CLUSTER REPLICAS READY UPDATED UNAVAILABLE PHASE AGE VERSION",
            ),
            (
                &["get", "endpointslices", "-n", "inference"][..],
                "NAME ADDRESSTYPE PORTS ENDPOINTS AGE",
            ),
            (
                &["get", "services", "-n", "inference"][..],
                "NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE",
            ),
            (
                &["get", "pods", "-n", "inference", "-o", "wide"][..],
                "NAME READY STATUS RESTARTS AGE IP NODE NOMINATED NODE READINESS GATES",
            ),
            (
                &["get", "events", "-n", "inference"][..],
                "LAST SEEN TYPE REASON OBJECT MESSAGE",
            ),
        ] {
            let out = k.ok(args).await;
            assert_eq!(header(&out), want, "{args:?}:\n{out}");
        }
        let pdb = k
            .ok(&["get", "pdb", "llm", "-n", "inference", "--no-headers"])
            .await;
        assert_eq!(
            pdb.split_whitespace().collect::<Vec<_>>()[..4],
            ["llm", "2", "N/A", "0"],
            "{pdb}"
        );
        let md = k.ok(&["get", "md", "h100", "--no-headers"]).await;
        assert_eq!(
            md.split_whitespace().collect::<Vec<_>>()[..7],
            ["h100", "kubectl-test", "2", "2", "2", "0", "Running"],
            "{md}"
        );
        // `get all` expands the category from discovery.
        let all = k.ok(&["get", "all", "-n", "inference"]).await;
        for want in [
            "pod/llm-",
            "service/llm",
            "deployment.apps/llm",
            "replicaset.apps/llm-",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
        // Pages: every object arrives, in as many requests as the chunk size needs.
        for i in 0..7 {
            c.create(
                "configmaps",
                "batch",
                json!({"metadata": {"name": format!("cm-{i}")}}),
            )
            .unwrap();
        }
        let out = k
            .ok(&["get", "configmaps", "-n", "batch", "--chunk-size=2", "-v=6"])
            .await;
        for i in 0..7 {
            assert!(out.contains(&format!("cm-{i} ")), "cm-{i}: {out}");
        }
        assert!(out.matches("continue=").count() >= 3, "{out}");
        // --sort-by needs whole objects in the rows (includeObject=Object).
        let mut nodes: Vec<(String, String)> = c
            .list("nodes", None)
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["status"]["addresses"][0]["address"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    n["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        nodes.sort();
        let out = k
            .ok(&[
                "get",
                "nodes",
                "--sort-by=.status.addresses[0].address",
                "--no-headers",
            ])
            .await;
        let shown: Vec<&str> = out
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        let want: Vec<&str> = nodes.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(shown, want, "{out}");
        // Watches print table rows: a deleted pod shows Terminating.
        let pod = pod_names(c, "batch", "cache")[0].clone();
        let watched = k
            .watch_while(&["get", "pods", "-n", "batch", "-w"], 1, async {
                c.with_state(|s| {
                    let opts = flotilla_kube_sim::sim::DeleteOptions {
                        grace_period_seconds: Some(60),
                        ..Default::default()
                    };
                    s.delete_object(
                        flotilla_kube_sim::resources::idx::PODS,
                        "batch",
                        &pod,
                        &opts,
                        false,
                    )
                    .unwrap();
                });
            })
            .await;
        assert!(
            header(&watched).starts_with("NAME READY STATUS"),
            "{watched}"
        );
        assert!(
            watched
                .lines()
                .any(|l| l.starts_with(&pod) && l.contains("Terminating")),
            "{watched}"
        );
        // Selectors: integer comparisons on labels, and an absent bool reads false.
        let big = k
            .ok(&[
                "get",
                "nodes",
                "-l",
                "nvidia.com/gpu.count>4",
                "--no-headers",
            ])
            .await;
        assert_eq!(big.lines().count(), 2, "{big}");
        let o = k
            .run(&["get", "nodes", "-l", "nvidia.com/gpu.count<4"])
            .await;
        assert!(o.ok && o.text.contains("No resources found"), "{}", o.text);
        let node = node_of(c, "inference", "llm");
        k.ok(&["cordon", &node]).await;
        let schedulable = k
            .ok(&[
                "get",
                "nodes",
                "--field-selector",
                "spec.unschedulable=false",
                "--no-headers",
            ])
            .await;
        assert_eq!(schedulable.lines().count(), 1, "{schedulable}");
        assert!(!schedulable.contains(&node), "{schedulable}");
        // A missing object in a missing namespace: the server names the object.
        let o = k
            .run(&[
                "get",
                "--raw",
                "/apis/apps/v1/namespaces/missing/deployments/x",
            ])
            .await;
        assert!(
            !o.ok && o.text.contains(r#"deployments.apps "x" not found"#),
            "{}",
            o.text
        );
        // Events the scheduler wrote for the workload.
        let events = k.ok(&["events", "-n", "inference"]).await;
        assert!(
            events.contains("Scheduled") && events.contains("Successfully assigned inference/llm-"),
            "{events}"
        );
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_can_i_answers_from_the_tokens_permissions() {
    const LOCKED: &str = "clusters:\n  - name: locked\n    rbac_deny: [resourceslices]\n    pools:\n      - name: dra\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, dra: true}\n";
    for bin in kubectls() {
        let fleet = SimFleet::start(&Scenario::from_yaml(LOCKED).unwrap(), SimOptions::default())
            .await
            .unwrap();
        let c = &fleet.clusters()[0];
        let k = Kubectl::new(c, &bin);
        let out = k.ok(&["auth", "can-i", "list", "pods"]).await;
        assert_eq!(out.trim(), "yes");
        let o = k
            .run(&["auth", "can-i", "list", "resourceslices.resource.k8s.io"])
            .await;
        assert!(!o.ok && o.text.starts_with("no"), "{}", o.text);
        let list = k.ok(&["auth", "can-i", "--list"]).await;
        assert!(
            list.contains("deviceclasses.resource.k8s.io") && !list.contains("resourceslices"),
            "{list}"
        );
        // The DRA driver's DeviceClasses exist.
        let classes = k.ok(&["get", "deviceclasses"]).await;
        assert!(
            classes.contains("gpu.nvidia.com") && classes.contains("mig.nvidia.com"),
            "{classes}"
        );
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_validates_fields_and_explain_reads_the_schemas() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        let k = Kubectl::new(c, &bin);
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let f = dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            f.to_str().unwrap().to_string()
        };
        let deploy = |extra: &str, replicas: &str| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
                 replicas: {replicas}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    \
                 metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: web\n        \
                 image: nginx\n{extra}        resources: {{limits: {{nvidia.com/gpu: 1}}}}\n"
            )
        };
        // Valid manifests apply with validation on (the default): the server validates.
        let good = write("good.yaml", &deploy("", "1"));
        let out = k.ok(&["apply", "-f", &good, "-v=6"]).await;
        assert!(
            out.contains("fieldValidation=Strict") && out.contains("deployment.apps/web created"),
            "{out}"
        );
        // An unknown field is refused, naming it; --validate=false lets it through.
        let typo = write(
            "typo.yaml",
            &deploy("        imagePullPolcy: Always\n", "1"),
        );
        let o = k.run(&["apply", "-f", &typo]).await;
        assert!(
            !o.ok && o.text.contains(r#"strict decoding error: unknown field "spec.template.spec.containers[0].imagePullPolcy""#),
            "{}",
            o.text
        );
        let o = k.run(&["apply", "-f", &typo, "--validate=warn"]).await;
        assert!(
            o.ok && o.text.contains("Warning: unknown field"),
            "{}",
            o.text
        );
        // A value of the wrong type is refused whatever the validation asked.
        let wrong = write("wrong.yaml", &deploy("", "two"));
        let o = k.run(&["apply", "-f", &wrong, "--validate=false"]).await;
        assert!(
            !o.ok && o.text.contains("cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32"),
            "{}",
            o.text
        );
        // explain reads the published schemas.
        let out = k.ok(&["explain", "deployment.spec.strategy"]).await;
        assert!(
            out.contains("rollingUpdate") && out.contains("KIND:       Deployment"),
            "{out}"
        );
        let out = k.ok(&["explain", "pods.spec.containers"]).await;
        assert!(
            out.contains("imagePullPolicy") && out.contains("resources"),
            "{out}"
        );
        fleet.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_machine_template_rolls_the_pool_within_pdbs_and_quota() {
    for bin in kubectls() {
        let fleet = start().await;
        let c = &fleet.clusters()[0];
        settled(c).await;
        let k = Kubectl::new(c, &bin);
        let old: Vec<String> = k_nodes(c)
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        k.ok(&[
            "patch",
            "machinedeployment",
            "h100",
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"version":"v1.35.0"}}}}"#,
        ])
        .await;
        // maxSurge 1: one new node first; the PDB (minAvailable 2 of 2) holds the old
        // node running an llm pod, so the roll waits there.
        until("a surge node on the new version", || {
            k_nodes(c)
                .iter()
                .any(|n| n["status"]["nodeInfo"]["kubeletVersion"] == "v1.35.0")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            old.iter().any(|n| c.get("nodes", "", n).is_ok()),
            "the PDB holds an old node"
        );
        assert!(k_nodes(c).len() <= 3, "never past the quota of 3");
        k.ok(&[
            "patch",
            "pdb",
            "llm",
            "-n",
            "inference",
            "--type=merge",
            "-p",
            r#"{"spec":{"minAvailable":1}}"#,
        ])
        .await;
        until("every h100 node on v1.35.0", || {
            let nodes = k_nodes(c);
            nodes.len() == 2
                && nodes
                    .iter()
                    .all(|n| n["status"]["nodeInfo"]["kubeletVersion"] == "v1.35.0" && ready(n))
        })
        .await;
        let md = k.ok(&["get", "md", "h100", "--no-headers"]).await;
        let cols: Vec<&str> = md.split_whitespace().collect();
        assert_eq!(
            (cols[4], cols[8]),
            ("2", "v1.35.0"),
            "UPDATED and VERSION: {md}"
        );
        let nodes = k
            .ok(&[
                "get",
                "nodes",
                "-l",
                "cluster.x-k8s.io/deployment-name=h100",
            ])
            .await;
        assert_eq!(nodes.matches("v1.35.0").count(), 2, "{nodes}");
        until("llm Ready on the new nodes", || {
            c.list("pods", Some("inference"))
                .unwrap()
                .iter()
                .filter(|p| {
                    p["metadata"]["labels"]["app"] == "llm"
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && !old.iter().any(|o| p["spec"]["nodeName"] == o.as_str())
                        && ready(p)
                })
                .count()
                == 2
        })
        .await;
        fleet.shutdown().await;
    }
}
