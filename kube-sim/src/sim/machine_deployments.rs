//! MachineDeployments (Cluster API node pools): nodes created to match replicas (within the
//! cloud's quota for their template), and removed as Cluster API removes a Machine: cordon,
//! drain through the Eviction API (PDBs honoured), then delete the node.

use super::*;

impl SimState {
    pub(super) fn machine_deployments(&mut self, now: Instant, next: &mut Option<Instant>) {
        let mds = self.all(idx::MACHINEDEPLOYMENTS);
        let live: HashSet<(String, String)> = mds.iter().map(|m| ns_name(m)).collect();
        // Nodes of deleted MachineDeployments go too, drained first, as Cluster API deletes
        // their machines.
        for s in self.nodes.values_mut() {
            if !live.contains(&s.md) && s.removing.is_none() {
                s.removing = Some(now);
            }
        }
        for md in mds {
            self.machine_deployment(&md, now);
        }
        // Machines chosen for removal (in this pass too: choosing writes nothing, so the
        // drain must start now) drain; the node goes when nothing evictable is left, or once
        // the template's nodeDrainTimeout has passed (Cluster API then deletes the node with
        // its pods still on it).
        let removing: Vec<(String, Instant, (String, String))> = self
            .nodes
            .iter()
            .filter_map(|(n, s)| s.removing.map(|since| (n.clone(), since, s.md.clone())))
            .collect();
        for (n, since, (md_ns, md)) in removing {
            let timeout = self
                .store
                .get(idx::MACHINEDEPLOYMENTS, &md_ns, &md)
                .ok()
                .and_then(|m| {
                    m["spec"]["template"]["spec"]["nodeDrainTimeout"]
                        .as_str()
                        .and_then(parse_go_duration)
                })
                .filter(|t| !t.is_zero());
            let timed_out = timeout.is_some_and(|t| now.saturating_duration_since(since) >= t);
            if self.drain_step(&n) || timed_out {
                self.delete_node(&n);
            } else if let Some(t) = timeout {
                merge_deadline(next, since + t);
            }
        }
    }

    fn machine_deployment(&mut self, md: &Value, now: Instant) {
        let key = ns_name(md);
        let want = md["spec"]["replicas"].as_i64().unwrap_or(1).max(0);
        let template = md["spec"]["template"]["spec"]["infrastructureRef"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let hash = machine_template_hash(md);
        let mut active: Vec<(Instant, String, bool)> = self
            .nodes
            .iter()
            .filter(|(_, s)| s.md == key && s.removing.is_none())
            .map(|(n, s)| (s.born, n.clone(), s.template_hash == hash))
            .collect();
        active.sort();
        let Some(pool) = self.templates.get(&template).cloned() else {
            let status = json!({"phase": "Failed", "replicas": active.len(),
                "failureMessage": format!("machine template {template:?} does not exist; templates are the scenario's pool names")});
            self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
            return;
        };
        let is_ready = |st: &Self, n: &str| {
            st.store
                .get(idx::NODES, "", n)
                .is_ok_and(|o| node_ready(&o))
        };
        let count = |st: &Self, updated: bool| {
            let nodes: Vec<&(Instant, String, bool)> =
                active.iter().filter(|a| a.2 == updated).collect();
            (
                nodes.len() as i64,
                nodes.iter().filter(|a| is_ready(st, &a.1)).count() as i64,
            )
        };
        let (new, old) = (count(self, true), count(self, false));
        // A changed template rolls the pool as Cluster API does (maxSurge 1, maxUnavailable 0
        // by default): new machines first, old ones drained as the budget allows; OnDelete
        // replaces a machine only once someone deletes it.
        let (new_target, old_target) = match md["spec"]["strategy"]["type"].as_str() {
            Some("OnDelete") => on_delete_targets(want, new.0, old.0),
            _ => {
                let ru = &md["spec"]["strategy"]["rollingUpdate"];
                let surge = scaled(&or(&ru["maxSurge"], json!(1)), want, true);
                let unavailable = scaled(&or(&ru["maxUnavailable"], json!(0)), want, false);
                let posts = if surge == 0 && unavailable == 0 {
                    (0, 1)
                } else {
                    (surge, unavailable)
                };
                let (n, o) = deployments::rolling_step(want, posts, new, &[old]);
                (n, o[0])
            }
        };
        let mut pending = 0;
        let mut created = 0;
        while new.0 + created < new_target {
            // The cloud's quota counts every node of the template, draining ones too.
            let used = self
                .nodes
                .values()
                .filter(|s| s.template == template)
                .count();
            if pool.quota.is_some_and(|q| used >= q as usize) {
                pending = new_target - new.0 - created;
                break;
            }
            if !self.create_machine(md, &key, &pool, &template, &hash, now) {
                break;
            }
            created += 1;
        }
        for (updated, excess) in [(false, old.0 - old_target), (true, new.0 - new_target)] {
            if excess > 0 {
                let candidates: Vec<(Instant, String)> = active
                    .iter()
                    .filter(|a| a.2 == updated)
                    .map(|a| (a.0, a.1.clone()))
                    .collect();
                self.remove_machines(candidates, excess as usize, now);
            }
        }
        self.machine_deployment_status(md, &key, want, &hash, &pool, &template, pending);
    }

    /// Create one machine's node from the pool's template; false when the store refused it.
    fn create_machine(
        &mut self,
        md: &Value,
        key: &(String, String),
        pool: &PoolSpec,
        template: &str,
        hash: &str,
        now: Instant,
    ) -> bool {
        let version = md["spec"]["template"]["spec"]["version"]
            .as_str()
            .unwrap_or(&self.spec.kubernetes_version)
            .to_string();
        let name = format!("{}-{}", key.1, random_suffix(5));
        let counter = self.md_counter.entry(key.clone()).or_default();
        let zone = if self.spec.zones.is_empty() {
            None
        } else {
            Some(self.spec.zones[*counter as usize % self.spec.zones.len()].clone())
        };
        *counter += 1;
        let n = self.next_node_ip;
        self.next_node_ip += 1;
        let ip = format!("172.{}.{}.{}", 16 + self.index % 16, n / 256, n % 256);
        let mut node = gpu::new_node(&NodeParams {
            cluster: &self.spec,
            pool,
            machine_deployment: &key.1,
            name: &name,
            zone: zone.as_deref(),
            version: &version,
            ip: &ip,
        });
        // Each node's own pod range, as the node IPAM controller assigns it.
        let pod_cidr = format!("10.{}.{}.0/24", 16 + self.index % 200, n % 256);
        node["spec"]["podCIDR"] = json!(pod_cidr);
        node["spec"]["podCIDRs"] = json!([pod_cidr]);
        if self.store.create(idx::NODES, "", node).is_err() {
            return false;
        }
        let bad = self.bad_new_nodes.get(template).copied();
        self.nodes.insert(
            name,
            NodeSim {
                born: now,
                template: template.to_string(),
                template_hash: hash.to_string(),
                md: key.clone(),
                failed_gpus: bad.map_or(0, |b| b.1),
                not_ready: bad.is_some_and(|b| b.0),
                slice_generation: 0,
                next_pod_host: 2,
                removing: None,
                born_bad: bad.is_some(),
            },
        );
        true
    }

    /// Choose `count` of `candidates` for removal, in Cluster API's order: machines marked
    /// for deletion, then unhealthy ones, then the newest.
    fn remove_machines(
        &mut self,
        mut candidates: Vec<(Instant, String)>,
        count: usize,
        now: Instant,
    ) {
        let rank = |n: &str| {
            let node = self.store.get(idx::NODES, "", n).ok();
            let marked = node.as_ref().is_some_and(|o| {
                !o["metadata"]["annotations"][DELETE_MACHINE_ANNOTATION].is_null()
            });
            let healthy = node.as_ref().is_some_and(|o| node_ready(o));
            (marked, !healthy)
        };
        candidates.sort_by_key(|(born, n)| (rank(n), *born));
        let keep = candidates.len().saturating_sub(count);
        for (_, n) in candidates.split_off(keep) {
            if let Some(s) = self.nodes.get_mut(&n) {
                s.removing = Some(now);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn machine_deployment_status(
        &mut self,
        md: &Value,
        key: &(String, String),
        want: i64,
        hash: &str,
        pool: &PoolSpec,
        template: &str,
        pending: i64,
    ) {
        let mine: Vec<(&String, &NodeSim)> =
            self.nodes.iter().filter(|(_, s)| s.md == *key).collect();
        let active: Vec<&(&String, &NodeSim)> =
            mine.iter().filter(|(_, s)| s.removing.is_none()).collect();
        let draining = mine.len() - active.len();
        let updated = active
            .iter()
            .filter(|(_, s)| s.template_hash == hash)
            .count() as i64;
        let ready = active
            .iter()
            .filter(|(n, _)| {
                self.store
                    .get(idx::NODES, "", n)
                    .is_ok_and(|o| node_ready(&o))
            })
            .count() as i64;
        let total = active.len() as i64;
        let phase = if total < want || ready < want {
            "ScalingUp"
        } else if draining > 0 || total > want {
            "ScalingDown"
        } else {
            "Running"
        };
        let mut status = json!({
            "observedGeneration": md["metadata"]["generation"],
            "replicas": mine.len(),
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": (want - ready).max(0),
            "phase": phase,
            "selector": format!("{CAPI_POOL_LABEL}={}", key.1),
        });
        if pending > 0 {
            let message = format!(
                "{pending} of {want} machines pending: quota exceeded for machine template {template} (instance type {}): limit {} nodes",
                pool.instance_type,
                pool.quota.unwrap_or(0)
            );
            status["conditions"] = json!([{"type": "Ready", "status": "False", "severity": "Warning",
                "reason": "QuotaExceeded", "message": message, "lastTransitionTime": now_rfc3339()}]);
            if md["status"]["conditions"][0]["message"] != message.as_str() {
                self.event(md, true, "QuotaExceeded", &message, events::CAPI_CONTROLLER);
            } else {
                status["conditions"][0]["lastTransitionTime"] =
                    md["status"]["conditions"][0]["lastTransitionTime"].clone();
            }
        }
        self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
    }

    /// One drain pass over a node being removed: cordon it, evict what a drain evicts (not
    /// DaemonSet or mirror pods, nor pods labelled `cluster.x-k8s.io/drain: skip`; a PDB's 429
    /// is retried on the next pass, as Cluster API retries), and say whether it is empty,
    /// every evicted pod gone.
    fn drain_step(&mut self, node: &str) -> bool {
        if let Ok(n) = self.store.get(idx::NODES, "", node)
            && n["spec"]["unschedulable"] != true
        {
            let mut cordoned = (*n).clone();
            cordoned["spec"]["unschedulable"] = json!(true);
            let _ = self.store.update(idx::NODES, "", node, cordoned, false);
        }
        let pods: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                p["spec"]["nodeName"] == node
                    && !is_terminal(p)
                    && owner_uid(p, "DaemonSet").is_none()
                    && p["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null()
                    && p["metadata"]["labels"]["cluster.x-k8s.io/drain"] != "skip"
            })
            .cloned()
            .collect();
        for p in &pods {
            if !deleting(p) {
                let (ns, name) = ns_name(p);
                let _ = self.evict(&ns, &name, &DeleteOptions::default(), false);
            }
        }
        pods.is_empty()
    }

    pub(super) fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        let _ = self.store.delete(idx::NODES, "", name);
    }
}

/// A Go `time.Duration` as Cluster API's fields write it (`90s`, `1h30m`, `500ms`); `None` if
/// it does not parse.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest == "0" {
        return Some(total);
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|i| *i > 0)?;
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += Duration::from_secs_f64(n * secs);
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// OnDelete: no machine is replaced for its template; a scale-down takes old machines first,
/// and a missing machine is built from the new template. (new, old) targets.
fn on_delete_targets(want: i64, new: i64, old: i64) -> (i64, i64) {
    let excess = (new + old - want).max(0);
    let old_target = old - excess.min(old);
    let new_target = new - (excess - (old - old_target)) + (want - new - old).max(0);
    (new_target, old_target)
}

fn or(v: &Value, default: Value) -> Value {
    match v {
        Value::Null => default,
        v => v.clone(),
    }
}

/// Fields Cluster API changes on existing machines in place; a change to any other part of
/// the template rolls the pool.
const IN_PLACE: &[&str] = &[
    "nodeDrainTimeout",
    "nodeVolumeDetachTimeout",
    "nodeDeletionTimeout",
];

/// The hash of what a machine is built from: the template's spec without the in-place fields.
fn machine_template_hash(md: &Value) -> String {
    let mut spec = md["spec"]["template"]["spec"].clone();
    if let Some(m) = spec.as_object_mut() {
        m.retain(|k, _| !IN_PLACE.contains(&k.as_str()));
    }
    deployments::template_hash(&spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_delete_keeps_old_machines_and_shrinks_them_first() {
        assert_eq!(
            on_delete_targets(3, 0, 3),
            (0, 3),
            "a template change replaces nothing"
        );
        assert_eq!(
            on_delete_targets(2, 1, 2),
            (1, 1),
            "scale-down takes an old one"
        );
        assert_eq!(on_delete_targets(1, 2, 1), (1, 0));
        assert_eq!(
            on_delete_targets(4, 1, 2),
            (2, 2),
            "a missing machine is built new"
        );
    }

    #[test]
    fn a_changed_template_rolls_the_pool_and_in_place_fields_do_not() {
        let scenario = "clusters:\n  - name: c\n    pools:\n      - name: gpu\n        count: 2\n        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8}\n    workloads:\n      - {name: llm, replicas: 3, gpus: 4, pdb: {min_available: 2}}\n";
        let s = crate::scenario::Scenario::from_yaml(scenario).unwrap();
        let mut st = SimState::new(s.clusters[0].clone(), 0, 1000);
        st.reconcile(Instant::now());
        let before: HashSet<String> = st.nodes.keys().cloned().collect();
        let edit = |st: &mut SimState, f: &dyn Fn(&mut Value)| {
            let mut md = (*st
                .store
                .get(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, "gpu")
                .unwrap())
            .clone();
            f(&mut md);
            st.store
                .update(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, "gpu", md, false)
                .unwrap();
        };
        edit(&mut st, &|md| {
            md["spec"]["template"]["spec"]["nodeDrainTimeout"] = json!("10m")
        });
        st.reconcile(Instant::now());
        assert_eq!(
            st.nodes.keys().cloned().collect::<HashSet<_>>(),
            before,
            "in place"
        );
        edit(&mut st, &|md| {
            md["spec"]["template"]["spec"]["version"] = json!("v1.35.0")
        });
        // One pass: maxSurge 1, maxUnavailable 0: one new machine, no old one removed while
        // the new one is not Ready.
        st.machine_deployments(Instant::now(), &mut None);
        assert_eq!(
            st.nodes.values().filter(|n| n.removing.is_none()).count(),
            3
        );
        assert_eq!(
            st.nodes.values().filter(|n| n.removing.is_some()).count(),
            0
        );
        for _ in 0..50 {
            st.reconcile(Instant::now());
        }
        let versions: Vec<String> = st
            .store
            .iter(idx::NODES, None, None)
            .map(|n| {
                n["status"]["nodeInfo"]["kubeletVersion"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(versions, ["v1.35.0", "v1.35.0"]);
        assert!(st.nodes.keys().all(|n| !before.contains(n)));
        let ready = st
            .store
            .iter(idx::PODS, Some("default"), None)
            .filter(|p| pod_ready(p) && !deleting(p))
            .count();
        assert_eq!(ready, 3, "the workload survived the roll");
        let md = st
            .store
            .get(idx::MACHINEDEPLOYMENTS, MD_NAMESPACE, "gpu")
            .unwrap();
        assert_eq!(md["status"]["updatedReplicas"], 2);
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("10x"), None);
    }
}
