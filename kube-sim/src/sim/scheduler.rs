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
            .filter(|p| p["spec"]["nodeName"].as_str().is_none_or(str::is_empty) && is_active(p))
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
            // What the claims ask for: whole GPUs, or MIG partitions of one profile.
            let dra_profile: Option<String> = claims.first().and_then(|c| {
                let ex = &c["spec"]["devices"]["requests"][0]["exactly"];
                (ex["deviceClassName"] == NVIDIA_MIG_CLASS).then(|| {
                    let cel = ex["selectors"][0]["cel"]["expression"]
                        .as_str()
                        .unwrap_or("");
                    cel.rsplit("== '")
                        .next()
                        .unwrap_or("")
                        .trim_end_matches('\'')
                        .to_string()
                })
            });
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut best: Option<(f64, String, Vec<DeviceKey>)> = None;
            for node in &nodes {
                let node_name = meta_str(node, "name");
                let sel = LabelSelector::from_map(&pod["spec"]["nodeSelector"]);
                // The filters in the real scheduler's order; a node reports its first failure.
                if node["spec"]["unschedulable"].as_bool().unwrap_or(false) {
                    *reasons
                        .entry("node(s) were unschedulable".into())
                        .or_default() += 1;
                    continue;
                }
                let mut taints = node["spec"]["taints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !node_ready(node) {
                    // A NotReady node is refused by its lifecycle taint, set or about to be.
                    let key = match condition(node, "Ready").as_deref() {
                        Some("Unknown") => node_lifecycle::UNREACHABLE_TAINT,
                        _ => node_lifecycle::NOT_READY_TAINT,
                    };
                    taints.insert(0, json!({"key": key, "effect": "NoSchedule"}));
                }
                if let Some(t) = taints
                    .iter()
                    .find(|t| t["effect"] != "PreferNoSchedule" && !tolerates(&pod, t))
                {
                    let reason = format!(
                        "node(s) had untolerated taint {{{}: {}}}",
                        t["key"].as_str().unwrap_or(""),
                        t["value"].as_str().unwrap_or("")
                    );
                    *reasons.entry(reason).or_default() += 1;
                    continue;
                }
                if !sel.matches(node) {
                    *reasons
                        .entry("node(s) didn't match Pod's node affinity/selector".into())
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
                    match self.pick_devices(node_name, dra_want, dra_profile.as_deref(), &dra_used)
                    {
                        Some(p) => picked = p,
                        None => {
                            *reasons
                                .entry("cannot allocate all claims".into())
                                .or_default() += 1;
                            continue;
                        }
                    }
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
                    let msg = format!("Successfully assigned {ns}/{name} to {node_name}");
                    self.event(&pod, false, "Scheduled", &msg, events::SCHEDULER);
                    let mut status = pod["status"].clone();
                    status["conditions"] = json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]);
                    self.set_status(idx::PODS, &ns, &name, status);
                }
                None => {
                    let message = unschedulable_message(nodes.len(), &reasons);
                    let current = pod["status"]["conditions"][0]["message"]
                        .as_str()
                        .unwrap_or("");
                    if current != message {
                        let mut status = pod["status"].clone();
                        status["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": message, "lastTransitionTime": now_rfc3339()}]);
                        self.set_status(idx::PODS, &ns, &name, status);
                        self.event(&pod, true, "FailedScheduling", &message, events::SCHEDULER);
                    }
                }
            }
        }
    }
}

/// The scheduler's FailedScheduling message: the filter failures by count, then what
/// preemption could do (only resource shortages can be helped by evicting lower priorities,
/// and this simulation has none to evict).
fn unschedulable_message(total: usize, reasons: &BTreeMap<String, usize>) -> String {
    // The scheduler sorts the "N reason" strings as text.
    let sorted = |m: &BTreeMap<&str, usize>| {
        let mut v: Vec<String> = m.iter().map(|(r, n)| format!("{n} {r}")).collect();
        v.sort();
        v.join(", ")
    };
    let detail = sorted(&reasons.iter().map(|(r, n)| (r.as_str(), *n)).collect());
    let mut preemption: BTreeMap<&str, usize> = BTreeMap::new();
    for (r, n) in reasons {
        let why = if r.starts_with("Insufficient") || r.starts_with("Too many") {
            "No preemption victims found for incoming pod"
        } else {
            "Preemption is not helpful for scheduling"
        };
        *preemption.entry(why).or_default() += n;
    }
    format!(
        "0/{total} nodes are available: {detail}. preemption: 0/{total} nodes are available: {}.",
        sorted(&preemption)
    )
}

/// One device of a node's slices, with what it draws from shared counters.
struct Device {
    key: DeviceKey,
    kind: String,
    profile: String,
    /// (counter set, counter) → amount, milli-units.
    consumes: Vec<((String, String), i128)>,
}

type Counters = HashMap<(String, String), i128>;

impl SimState {
    /// `want` free devices on `node`: whole GPUs, or MIG partitions of `profile`, such that
    /// no shared counter is overdrawn (a GPU with a partition allocated is not free, and a
    /// partition of an allocated GPU is not either).
    fn pick_devices(
        &self,
        node: &str,
        want: i64,
        profile: Option<&str>,
        used: &DeviceSet,
    ) -> Option<Vec<DeviceKey>> {
        let mut devices = Vec::new();
        let mut capacity = Counters::new();
        let milli = |v: &Value| {
            v["value"]
                .as_str()
                .and_then(|q| parse_milli(q).ok())
                .unwrap_or(0)
        };
        for s in self
            .store
            .iter(idx::RESOURCESLICES, None, None)
            .filter(|s| {
                s["spec"]["nodeName"] == node && s["spec"]["driver"] == gpu::NVIDIA_DRA_DRIVER
            })
        {
            let pool = s["spec"]["pool"]["name"].as_str().unwrap_or("").to_string();
            for set in s["spec"]["sharedCounters"].as_array().into_iter().flatten() {
                let name = set["name"].as_str().unwrap_or("").to_string();
                for (c, v) in set["counters"].as_object().into_iter().flatten() {
                    capacity.insert((name.clone(), c.clone()), milli(v));
                }
            }
            for d in s["spec"]["devices"].as_array().into_iter().flatten() {
                let mut consumes = Vec::new();
                for cc in d["consumesCounters"].as_array().into_iter().flatten() {
                    let set = cc["counterSet"].as_str().unwrap_or("").to_string();
                    for (c, v) in cc["counters"].as_object().into_iter().flatten() {
                        consumes.push(((set.clone(), c.clone()), milli(v)));
                    }
                }
                devices.push(Device {
                    key: (pool.clone(), d["name"].as_str().unwrap_or("").to_string()),
                    kind: d["attributes"]["type"]["string"]
                        .as_str()
                        .unwrap_or("gpu")
                        .to_string(),
                    profile: d["attributes"]["profile"]["string"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    consumes,
                });
            }
        }
        let draw = |d: &Device, drawn: &mut Counters| {
            for (k, v) in &d.consumes {
                *drawn.entry(k.clone()).or_default() += v;
            }
        };
        let mut drawn = Counters::new();
        for d in devices.iter().filter(|d| used.contains(&d.key)) {
            draw(d, &mut drawn);
        }
        let fits = |d: &Device, drawn: &Counters| {
            d.consumes.iter().all(|(k, v)| {
                drawn.get(k).copied().unwrap_or(0) + v
                    <= capacity.get(k).copied().unwrap_or(i128::MAX)
            })
        };
        let mut picked = Vec::new();
        for d in &devices {
            if picked.len() as i64 == want {
                break;
            }
            let right_kind = match profile {
                None => d.kind == "gpu",
                Some(p) => d.kind == "mig" && d.profile == p,
            };
            if right_kind && !used.contains(&d.key) && fits(d, &drawn) {
                draw(d, &mut drawn);
                picked.push(d.key.clone());
            }
        }
        (picked.len() as i64 == want).then_some(picked)
    }
}

/// The NodeResourcesFit plugin's reason: `Insufficient <resource name>`, or `Too many pods`.
fn insufficient(resource: &str) -> String {
    match resource {
        "pods" => "Too many pods".to_string(),
        r => format!("Insufficient {r}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_scheduling_reads_as_the_scheduler_writes_it() {
        let mut reasons = BTreeMap::new();
        reasons.insert("Insufficient nvidia.com/gpu".to_string(), 2);
        reasons.insert("node(s) were unschedulable".to_string(), 1);
        assert_eq!(
            unschedulable_message(3, &reasons),
            "0/3 nodes are available: 1 node(s) were unschedulable, 2 Insufficient nvidia.com/gpu. \
             preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, \
             2 No preemption victims found for incoming pod."
        );
        assert_eq!(
            insufficient("nvidia.com/gpu"),
            "Insufficient nvidia.com/gpu"
        );
        assert_eq!(insufficient("pods"), "Too many pods");
    }
}
