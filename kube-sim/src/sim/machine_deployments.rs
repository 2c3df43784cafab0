//! MachineDeployments (Cluster API node pools): nodes created to match replicas (within the
//! cloud's quota for their template), and removed as Cluster API removes a Machine: cordon,
//! drain through the Eviction API (PDBs honoured), then delete the node.

use super::*;

impl SimState {
    pub(super) fn machine_deployments(&mut self, now: Instant) {
        // Machines chosen for removal drain first; the node goes when nothing evictable is left.
        let removing: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, s)| s.removing)
            .map(|(n, _)| n.clone())
            .collect();
        for n in removing {
            if self.drain_step(&n) {
                self.delete_node(&n);
            }
        }
        let mds = self.all(idx::MACHINEDEPLOYMENTS);
        let live: HashSet<(String, String)> = mds.iter().map(|m| ns_name(m)).collect();
        // Nodes of deleted MachineDeployments go too, drained first, as Cluster API deletes
        // their machines.
        for s in self.nodes.values_mut() {
            if !live.contains(&s.md) {
                s.removing = true;
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
                .filter(|(_, s)| s.md == key && !s.removing)
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
                            removing: false,
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
                        s.removing = true;
                    }
                }
            }
            let draining = self
                .nodes
                .values()
                .filter(|s| s.md == key && s.removing)
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
