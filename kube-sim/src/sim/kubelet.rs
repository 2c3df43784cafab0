//! Kubelets and device plugins: node conditions, capacity and allocatable as the plugin advertises them, GPU failures.

use super::*;

impl SimState {
    /// The node lifecycle controller's record of a node going NotReady: on the node, and a
    /// warning on each pod it runs.
    fn node_not_ready_events(&mut self, node: &Value) {
        let name = meta_str(node, "name").to_string();
        let msg = format!("Node {name} status is now: NodeNotReady");
        self.event(node, false, "NodeNotReady", &msg, events::NODE_CONTROLLER);
        let pods: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| p["spec"]["nodeName"] == name.as_str() && !is_terminal(p))
            .cloned()
            .collect();
        for p in pods {
            self.event(
                &p,
                true,
                "NodeNotReady",
                "Node is not ready",
                events::NODE_CONTROLLER,
            );
        }
    }

    pub(super) fn kubelets(&mut self, now: Instant, next: &mut Option<Instant>) {
        let t = self.spec.timing.clone();
        let ready_after = Duration::from_millis(t.node_ready_ms);
        let plugin_after = ready_after + Duration::from_millis(t.device_plugin_ms);
        let mut want_slices: HashMap<String, Value> = HashMap::new();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let sim = self.nodes[&name].clone();
            let Some(pool) = self.templates.get(&sim.template).cloned() else {
                continue;
            };
            let Ok(node) = self.store.get(idx::NODES, "", &name) else {
                self.nodes.remove(&name);
                continue;
            };
            let age = now.saturating_duration_since(sim.born);
            let booted = age >= ready_after;
            let plugin = age >= plugin_after;
            if !booted {
                merge_deadline(next, sim.born + ready_after);
            } else if !plugin {
                merge_deadline(next, sim.born + plugin_after);
            }
            let ready = booted && !sim.not_ready;
            let mut allocatable = node["status"]["allocatable"].clone();
            if let Some(g) = &pool.gpu {
                for r in gpu::gpu_resources(g) {
                    // A node that stops reporting keeps its last status (allocatable stays).
                    // A crashed plugin never advertises: allocatable stays 0 after Ready.
                    let units = if plugin && !g.plugin_crashed {
                        r.units(g.count, sim.failed_gpus)
                    } else {
                        0
                    };
                    allocatable[&r.name] = json!(units.to_string());
                }
                if g.dra && plugin && !g.plugin_crashed {
                    want_slices.insert(name.clone(), json!(sim.failed_gpus));
                }
            }
            let was_ready = node_ready(&node);
            if was_ready != ready || node["status"]["allocatable"] != allocatable {
                let mut status = node["status"].clone();
                status["allocatable"] = allocatable;
                if was_ready != ready {
                    status["conditions"] = if ready {
                        gpu::node_conditions(
                            "True",
                            "KubeletReady",
                            "kubelet is posting ready status",
                        )
                    } else if sim.not_ready && sim.born_bad {
                        // A bad image: the kubelet runs and reports, but its network never does.
                        gpu::node_conditions(
                            "False",
                            "KubeletNotReady",
                            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized",
                        )
                    } else if sim.not_ready {
                        gpu::node_conditions(
                            "Unknown",
                            "NodeStatusUnknown",
                            "Kubelet stopped posting node status.",
                        )
                    } else {
                        gpu::node_conditions(
                            "False",
                            "KubeletNotReady",
                            "container runtime network not ready (simulated start-up)",
                        )
                    };
                }
                self.set_status(idx::NODES, "", &name, status);
                if ready && !was_ready {
                    let msg = format!("Node {name} status is now: NodeReady");
                    self.event(&node, false, "NodeReady", &msg, events::kubelet(&name));
                } else if was_ready && !ready {
                    self.node_not_ready_events(&node);
                }
            }
        }
        // DRA: one slice per ready GPU node, regenerated when its healthy devices change.
        let existing = self.all(idx::RESOURCESLICES);
        for s in &existing {
            let node = s["spec"]["nodeName"].as_str().unwrap_or("");
            if s["spec"]["driver"] == gpu::NVIDIA_DRA_DRIVER
                && s["metadata"]["annotations"][SIMULATED_ANNOTATION] == "true"
                && !want_slices.contains_key(node)
            {
                let _ = self
                    .store
                    .delete(idx::RESOURCESLICES, "", meta_str(s, "name"));
            }
        }
        for (node, failed) in want_slices {
            let failed = failed.as_u64().unwrap_or(0) as u32;
            let sim = self.nodes.get(&node).cloned().expect("node sim");
            let g = self.templates[&sim.template].gpu.clone().expect("gpu");
            let current = existing
                .iter()
                .find(|s| s["spec"]["nodeName"] == node.as_str());
            let want = gpu::resource_slice(&node, &g, failed, 0);
            match current {
                Some(s) if s["spec"]["devices"] == want["spec"]["devices"] => {}
                Some(s) => {
                    let generation = sim.slice_generation + 1;
                    self.nodes.get_mut(&node).expect("sim").slice_generation = generation;
                    let mut new = gpu::resource_slice(&node, &g, failed, generation);
                    new["metadata"]["resourceVersion"] = s["metadata"]["resourceVersion"].clone();
                    let _ =
                        self.store
                            .update(idx::RESOURCESLICES, "", meta_str(s, "name"), new, false);
                }
                None => {
                    let generation = sim.slice_generation + 1;
                    self.nodes.get_mut(&node).expect("sim").slice_generation = generation;
                    let _ = self.store.create(
                        idx::RESOURCESLICES,
                        "",
                        gpu::resource_slice(&node, &g, failed, generation),
                    );
                }
            }
        }
    }
}
