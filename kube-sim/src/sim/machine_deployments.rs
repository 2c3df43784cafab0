//! MachineDeployments (Cluster API node pools): nodes created and deleted to match replicas, boot delays.

use super::*;

impl SimState {
    pub(super) fn machine_deployments(&mut self, now: Instant) {
        let mds = self.all(idx::MACHINEDEPLOYMENTS);
        let live: HashSet<(String, String)> = mds.iter().map(|m| ns_name(m)).collect();
        // Nodes of deleted MachineDeployments go away, as Cluster API deletes their machines.
        let orphans: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, s)| !live.contains(&s.md))
            .map(|(n, _)| n.clone())
            .collect();
        for n in orphans {
            self.delete_node(&n);
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
                .filter(|(_, s)| s.md == key)
                .map(|(n, s)| (s.born, n.clone()))
                .collect();
            mine.sort();
            let Some(pool) = self.templates.get(&template).cloned() else {
                let status = json!({"phase": "Failed", "replicas": mine.len(),
                    "failureMessage": format!("machine template {template:?} does not exist; templates are the scenario's pool names")});
                self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
                continue;
            };
            while mine.len() < want {
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
                    self.nodes.insert(
                        name.clone(),
                        NodeSim {
                            born: now,
                            template: template.clone(),
                            md: key.clone(),
                            failed_gpus: 0,
                            not_ready: false,
                            slice_generation: 0,
                            next_pod_host: 2,
                        },
                    );
                    mine.push((now, name));
                }
            }
            while mine.len() > want {
                let (_, n) = mine.pop().expect("non-empty");
                self.delete_node(&n);
            }
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
            } else {
                "Running"
            };
            let status = json!({
                "observedGeneration": md["metadata"]["generation"],
                "replicas": mine.len(),
                "updatedReplicas": mine.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": mine.len().saturating_sub(ready),
                "phase": phase,
                "selector": format!("{CAPI_POOL_LABEL}={}", key.1),
            });
            self.set_status(idx::MACHINEDEPLOYMENTS, &key.0, &key.1, status);
        }
    }

    pub(super) fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        let _ = self.store.delete(idx::NODES, "", name);
    }
}
