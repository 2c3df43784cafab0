//! Pod lifecycle: Pending to Running to Ready, and completion.

use super::*;

impl SimState {
    pub(super) fn pod_lifecycle(&mut self, now: Instant, next: &mut Option<Instant>) {
        let start = Duration::from_millis(self.spec.timing.pod_start_ms);
        let pods: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
                    && is_active(p)
            })
            .cloned()
            .collect();
        for pod in pods {
            let (ns, name) = ns_name(&pod);
            let node_name = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            let Ok(node) = self.store.get(idx::NODES, "", &node_name) else {
                continue;
            };
            // Pods created already bound (DaemonSets, static placement) start counting now.
            let bound_at = *self.bound.entry((ns.clone(), name.clone())).or_insert(now);
            let started = now.saturating_duration_since(bound_at) >= start;
            if !started {
                merge_deadline(next, bound_at + start);
            }
            let running = started || pod["status"]["phase"] == "Running";
            let ready = running
                && node_ready(&node)
                && !self.unready_pods.contains(&(ns.clone(), name.clone()));
            let phase = if running { "Running" } else { "Pending" };
            if pod["status"]["phase"] == phase
                && pod_ready(&pod) == ready
                && pod["status"]["hostIP"].is_string()
            {
                continue;
            }
            let ts = now_rfc3339();
            let host_ip = node["status"]["addresses"][0]["address"].clone();
            let mut status = pod["status"].clone();
            status["phase"] = json!(phase);
            status["hostIP"] = host_ip.clone();
            status["hostIPs"] = json!([{"ip": host_ip}]);
            if status.get("startTime").is_none() {
                status["startTime"] = json!(ts);
            }
            let r = if ready { "True" } else { "False" };
            let cond = |t: &str, s: &str| json!({"type": t, "status": s, "lastTransitionTime": ts});
            status["conditions"] = json!([
                cond(
                    "PodReadyToStartContainers",
                    if running { "True" } else { "False" }
                ),
                cond("Initialized", "True"),
                cond("Ready", r),
                cond("ContainersReady", r),
                cond("PodScheduled", "True"),
            ]);
            if running {
                if !status["podIP"].is_string() {
                    // From the node's pod range (its /24), else the cluster's.
                    let base = node["spec"]["podCIDR"]
                        .as_str()
                        .and_then(|c| c.strip_suffix(".0/24"))
                        .map(String::from);
                    let host = self.nodes.get_mut(&node_name).map(|n| {
                        let h = n.next_pod_host;
                        // .2–.254, reused round the range (kubelets cap pods well below).
                        n.next_pod_host = if h >= 254 { 2 } else { h + 1 };
                        h
                    });
                    let ip = match (base, host) {
                        (Some(b), Some(h)) => format!("{b}.{h}"),
                        _ => {
                            let n = self.next_pod_ip;
                            self.next_pod_ip += 1;
                            format!(
                                "10.{}.{}.{}",
                                16 + self.index % 200,
                                128 + n / 256 % 128,
                                n % 256
                            )
                        }
                    };
                    status["podIP"] = json!(ip);
                    status["podIPs"] = json!([{"ip": ip}]);
                }
                let containers: Vec<Value> = pod["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        json!({"name": c["name"], "image": c["image"], "imageID": format!("sim://{}", c["image"].as_str().unwrap_or("")),
                               "containerID": format!("containerd://{}", uuid::Uuid::new_v4().simple()),
                               "ready": ready, "started": true, "restartCount": 0,
                               "state": {"running": {"startedAt": ts}}})
                    })
                    .collect();
                status["containerStatuses"] = json!(containers);
            }
            self.set_status(idx::PODS, &ns, &name, status);
        }
    }
}
