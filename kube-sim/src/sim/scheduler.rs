//! The scheduler: requests, taints, selectors and DRA devices, in the order the real one filters.

use super::*;

impl SimState {
    /// Requests already placed on each node, and DRA devices in use, by node.
    pub(super) fn node_usage(&self) -> (NodeUsage, DeviceSet) {
        let mut used: HashMap<String, BTreeMap<String, i128>> = HashMap::new();
        for p in self.store.iter(idx::PODS, None, None) {
            if let Some(n) = p["spec"]["nodeName"].as_str()
                && !is_terminal(p)
            {
                let e = used.entry(n.to_string()).or_default();
                for (k, v) in pod_requests(p) {
                    *e.entry(k).or_default() += v;
                }
                *e.entry("pods".into()).or_default() += 1000;
            }
        }
        let mut devices = HashSet::new();
        for c in self.store.iter(idx::RESOURCECLAIMS, None, None) {
            for r in c["status"]["allocation"]["devices"]["results"]
                .as_array()
                .into_iter()
                .flatten()
            {
                devices.insert((
                    r["pool"].as_str().unwrap_or("").to_string(),
                    r["device"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        (used, devices)
    }

    pub(super) fn schedule(&mut self, now: Instant) {
        let pending: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| p["spec"]["nodeName"].as_str().is_none_or(str::is_empty) && !is_terminal(p))
            .cloned()
            .collect();
        if pending.is_empty() {
            return;
        }
        let nodes = self.all(idx::NODES);
        let (mut used, mut dra_used) = self.node_usage();
        for pod in pending {
            let (ns, name) = ns_name(&pod);
            let req = pod_requests(&pod);
            let claims: Vec<Obj> = pod["spec"]["resourceClaims"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["resourceClaimName"].as_str())
                .filter_map(|c| self.store.get(idx::RESOURCECLAIMS, &ns, c).ok())
                .collect();
            let dra_want: i64 = claims
                .iter()
                .flat_map(|c| {
                    c["spec"]["devices"]["requests"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|r| r["exactly"]["count"].as_i64().unwrap_or(1))
                .sum();
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            let mut best: Option<(f64, String, Vec<DeviceKey>)> = None;
            for node in &nodes {
                let node_name = meta_str(node, "name");
                let sel = LabelSelector::from_map(&pod["spec"]["nodeSelector"]);
                if !node_ready(node) {
                    *reasons.entry("node(s) were not ready").or_default() += 1;
                    continue;
                }
                if node["spec"]["unschedulable"].as_bool().unwrap_or(false) {
                    *reasons.entry("node(s) were unschedulable").or_default() += 1;
                    continue;
                }
                if !sel.matches(node) {
                    *reasons
                        .entry("node(s) didn't match Pod's node affinity/selector")
                        .or_default() += 1;
                    continue;
                }
                let taints = node["spec"]["taints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !taints.iter().all(|t| tolerates(&pod, t)) {
                    *reasons
                        .entry("node(s) had untolerated taint(s)")
                        .or_default() += 1;
                    continue;
                }
                let alloc = &node["status"]["allocatable"];
                let u = used.get(node_name).cloned().unwrap_or_default();
                let mut fits = true;
                let mut score = 0.0;
                for (r, want) in req
                    .iter()
                    .chain(std::iter::once((&"pods".to_string(), &1000)))
                {
                    if *want == 0 {
                        continue;
                    }
                    let have = alloc[r]
                        .as_str()
                        .and_then(|q| parse_milli(q).ok())
                        .unwrap_or(0);
                    let in_use = u.get(r).copied().unwrap_or(0);
                    if in_use + want > have {
                        fits = false;
                        *reasons.entry(insufficient(r)).or_default() += 1;
                        break;
                    }
                    if r.contains('/') && have > 0 {
                        score += (in_use + want) as f64 / have as f64;
                    }
                }
                if !fits {
                    continue;
                }
                let mut picked = Vec::new();
                if dra_want > 0 {
                    let free: Vec<(String, String)> = self
                        .store
                        .iter(idx::RESOURCESLICES, None, None)
                        .filter(|s| {
                            s["spec"]["nodeName"] == node_name
                                && s["spec"]["driver"] == gpu::NVIDIA_DRA_DRIVER
                        })
                        .flat_map(|s| {
                            let pool = s["spec"]["pool"]["name"].as_str().unwrap_or("").to_string();
                            s["spec"]["devices"]
                                .as_array()
                                .cloned()
                                .unwrap_or_default()
                                .into_iter()
                                .map(move |d| {
                                    (pool.clone(), d["name"].as_str().unwrap_or("").to_string())
                                })
                        })
                        .filter(|k| !dra_used.contains(k))
                        .collect();
                    if (free.len() as i64) < dra_want {
                        *reasons.entry("cannot allocate all claims").or_default() += 1;
                        continue;
                    }
                    picked = free.into_iter().take(dra_want as usize).collect();
                }
                // Least-allocated wins (the default scheduler's spreading); name breaks ties.
                if best
                    .as_ref()
                    .is_none_or(|(s, n, _)| score < *s || (score == *s && node_name < n.as_str()))
                {
                    best = Some((score, node_name.to_string(), picked));
                }
            }
            match best {
                Some((_, node_name, picked)) => {
                    let mut bound = (*pod).clone();
                    bound["spec"]["nodeName"] = json!(node_name);
                    if self
                        .store
                        .update(idx::PODS, &ns, &name, bound, false)
                        .is_err()
                    {
                        continue;
                    }
                    let e = used.entry(node_name.clone()).or_default();
                    for (k, v) in &req {
                        *e.entry(k.clone()).or_default() += v;
                    }
                    *e.entry("pods".into()).or_default() += 1000;
                    // Allocate DRA devices to the pod's claims.
                    let mut devs = picked.into_iter();
                    for c in &claims {
                        let n = c["spec"]["devices"]["requests"][0]["exactly"]["count"]
                            .as_i64()
                            .unwrap_or(1);
                        let results: Vec<Value> = devs
                            .by_ref()
                            .take(n as usize)
                            .map(|(pool, device)| {
                                dra_used.insert((pool.clone(), device.clone()));
                                json!({"request": "gpu", "driver": gpu::NVIDIA_DRA_DRIVER, "pool": pool, "device": device})
                            })
                            .collect();
                        let status = json!({
                            "allocation": {
                                "devices": {"results": results},
                                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                                    {"key": "metadata.name", "operator": "In", "values": [node_name]}]}]},
                            },
                            "reservedFor": [{"resource": "pods", "name": name, "uid": pod["metadata"]["uid"]}],
                        });
                        self.set_status(idx::RESOURCECLAIMS, &ns, meta_str(c, "name"), status);
                    }
                    self.bound.insert((ns.clone(), name.clone()), now);
                    let mut status = pod["status"].clone();
                    status["conditions"] = json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]);
                    self.set_status(idx::PODS, &ns, &name, status);
                }
                None => {
                    let total = nodes.len();
                    let detail: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let message = format!("0/{total} nodes are available: {}.", detail.join(", "));
                    let current = pod["status"]["conditions"][0]["message"]
                        .as_str()
                        .unwrap_or("");
                    if current != message {
                        let mut status = pod["status"].clone();
                        status["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": message, "lastTransitionTime": now_rfc3339()}]);
                        self.set_status(idx::PODS, &ns, &name, status);
                    }
                }
            }
        }
    }
}

fn insufficient(resource: &str) -> &'static str {
    match resource {
        "cpu" => "Insufficient cpu",
        "memory" => "Insufficient memory",
        "pods" => "Too many pods",
        r if r.starts_with("nvidia.com/") => "Insufficient nvidia.com GPU resources",
        _ => "Insufficient extended resources",
    }
}
