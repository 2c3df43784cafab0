//! The DaemonSet controller: one pod per matching node.

use super::*;

impl SimState {
    pub(super) fn daemonsets(&mut self) {
        let dss = self.all(idx::DAEMONSETS);
        let nodes = self.all(idx::NODES);
        for ds in dss {
            let (ns, name) = ns_name(&ds);
            let uid = meta_str(&ds, "uid").to_string();
            let template = &ds["spec"]["template"];
            let sel = LabelSelector::from_map(&template["spec"]["nodeSelector"]);
            let pods: Vec<Obj> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "DaemonSet") == Some(uid.as_str()))
                .cloned()
                .collect();
            let mut desired = 0;
            for node in nodes.iter().filter(|n| sel.matches(n)) {
                desired += 1;
                let node_name = meta_str(node, "name");
                if pods.iter().any(|p| p["spec"]["nodeName"] == node_name) {
                    continue;
                }
                let mut pod = json!({
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": template["metadata"]["labels"],
                        "ownerReferences": owner_ref(&ds),
                    },
                    "spec": template["spec"],
                });
                pod["spec"]["nodeName"] = json!(node_name);
                let _ = self.create(idx::PODS, &ns, pod);
            }
            // Pods whose node is gone or no longer selected.
            for p in &pods {
                let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                if !nodes
                    .iter()
                    .any(|n| meta_str(n, "name") == node && sel.matches(n))
                {
                    self.delete_gracefully(idx::PODS, &ns, meta_str(p, "name"));
                }
            }
            let ready = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "DaemonSet") == Some(uid.as_str()) && pod_ready(p))
                .count();
            let status = json!({
                "observedGeneration": ds["metadata"]["generation"],
                "desiredNumberScheduled": desired,
                "currentNumberScheduled": desired,
                "numberMisscheduled": 0,
                "numberReady": ready,
                "numberAvailable": ready,
                "updatedNumberScheduled": desired,
            });
            self.set_status(idx::DAEMONSETS, &ns, &name, status);
        }
    }
}
