//! MachineDeployments (Cluster API node pools): nodes created to match replicas (within the
//! cloud's quota for their template), and removed as Cluster API removes a Machine: cordon,
//! drain through the Eviction API (PDBs honoured), then delete the node.

use super::*;

impl SimState {
    pub(super) fn machine_deployments(&mut self, now: Instant, next: &mut Option<Instant>) {
        // Machines chosen for removal drain first; the node goes when nothing evictable is
        // left, or once the template's nodeDrainTimeout has passed (Cluster API then deletes
        // the node with its pods still on it).
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
            let key = ns_name(&md);
            let want = md["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            let template = md["spec"]["template"]["spec"]["infrastructureRef"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let version = md["spec"]["template"]["spec"]["version"]
                .as_str()
                .unwrap_or(&self.spec.kubernetes_version)
                .to_string();
            let mut mine: Vec<(Instant, String)> = self
                .nodes
                .iter()
                .filter(|(_, s)| s.md == key && s.removing.is_none())
                .map(|(n, s)| (s.born, n.clone()))
                .collect();
            mine.sort();
            let Some(pool) = self.templates.get(&template).cloned() else {
                let status = json!({"phase": "Failed", "replicas": mine.len(),
                    "failureMessage": format!("machine template {template:?} does not exist; templates are the scenario's pool names")});
                self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
                continue;
            };
            let mut pending = 0;
            while mine.len() < want {
                // The cloud's quota counts every node of the template, draining ones too.
                if let Some(q) = pool.quota
                    && self
                        .nodes
                        .values()
                        .filter(|s| s.template == template)
                        .count()
                        >= q as usize
                {
                    pending = want - mine.len();
                    break;
                }
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
                    pool: &pool,
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
                if self.store.create(idx::NODES, "", node).is_ok() {
                    let bad = self.bad_new_nodes.get(&template).copied();
                    self.nodes.insert(
                        name.clone(),
                        NodeSim {
                            born: now,
                            template: template.clone(),
                            md: key.clone(),
                            failed_gpus: bad.map_or(0, |b| b.1),
                            not_ready: bad.is_some_and(|b| b.0),
                            slice_generation: 0,
                            next_pod_host: 2,
                            removing: None,
                            born_bad: bad.is_some(),
                        },
                    );
                    mine.push((now, name));
                }
            }
            if mine.len() > want {
                // Cluster API's delete priority: machines marked for deletion, then unhealthy
                // ones, then the newest.
                let rank = |n: &str| {
                    let node = self.store.get(idx::NODES, "", n).ok();
                    let marked = node.as_ref().is_some_and(|o| {
                        !o["metadata"]["annotations"][DELETE_MACHINE_ANNOTATION].is_null()
                    });
                    let healthy = node.as_ref().is_some_and(|o| node_ready(o));
                    (marked, !healthy)
                };
                mine.sort_by_key(|(born, n)| (rank(n), *born));
                for (_, n) in mine.split_off(want) {
                    if let Some(s) = self.nodes.get_mut(&n) {
                        s.removing = Some(now);
                    }
                }
            }
            let draining = self
                .nodes
                .values()
                .filter(|s| s.md == key && s.removing.is_some())
                .count();
            let ready = mine
                .iter()
                .filter(|(_, n)| {
                    self.store
                        .get(idx::NODES, "", n)
                        .is_ok_and(|o| node_ready(&o))
                })
                .count();
            let phase = if mine.len() < want || ready < want {
                "ScalingUp"
            } else if draining > 0 {
                "ScalingDown"
            } else {
                "Running"
            };
            let mut status = json!({
                "observedGeneration": md["metadata"]["generation"],
                "replicas": mine.len() + draining,
                "updatedReplicas": mine.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": want.saturating_sub(ready),
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
                    self.event(
                        &md,
                        true,
                        "QuotaExceeded",
                        &message,
                        events::CAPI_CONTROLLER,
                    );
                } else {
                    status["conditions"][0]["lastTransitionTime"] =
                        md["status"]["conditions"][0]["lastTransitionTime"].clone();
                }
            }
            self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
        }
    }

    /// One drain pass over a node being removed: cordon it, evict what a drain evicts (not
    /// DaemonSet or mirror pods; a PDB's 429 is retried on the next pass, as Cluster API
    /// retries), and say whether it is empty, every evicted pod gone.
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

#[cfg(test)]
mod tests {
    use super::*;

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
