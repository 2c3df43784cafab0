//! The ReplicaSet controller: pods (and DRA claims) to match replicas.

use super::*;

impl SimState {
    pub(super) fn replicasets(&mut self) {
        let sets = self.all(idx::REPLICASETS);
        for rs in sets {
            let (ns, name) = ns_name(&rs);
            let uid = meta_str(&rs, "uid").to_string();
            let want = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            let mut pods: Vec<Obj> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && is_active(p))
                .cloned()
                .collect();
            let template = &rs["spec"]["template"];
            while pods.len() < want {
                let mut pod = json!({
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "labels": template["metadata"]["labels"],
                        "annotations": template["metadata"]["annotations"],
                        "ownerReferences": owner_ref(&rs),
                    },
                    "spec": template["spec"],
                });
                if pod["metadata"]["annotations"].is_null() {
                    pod["metadata"]
                        .as_object_mut()
                        .expect("meta")
                        .remove("annotations");
                }
                let dra = template["metadata"]["annotations"][DRA_GPUS_ANNOTATION]
                    .as_str()
                    .and_then(|n| n.parse::<i64>().ok());
                let profile = template["metadata"]["annotations"][DRA_PROFILE_ANNOTATION]
                    .as_str()
                    .map(str::to_string);
                let Ok(created) = self.create(idx::PODS, &ns, pod) else {
                    break;
                };
                let msg = format!("Created pod: {}", meta_str(&created, "name"));
                self.event(&rs, false, "SuccessfulCreate", &msg, events::RS_CONTROLLER);
                if let Some(count) = dra {
                    self.create_claim(&ns, &created, count, profile.as_deref());
                }
                pods.push(created);
            }
            if pods.len() > want {
                // Remove unscheduled, then not-ready pods first, as the ReplicaSet controller does.
                pods.sort_by_key(|p| (p["spec"]["nodeName"].is_string(), pod_ready(p)));
                for p in pods.iter().take(pods.len() - want) {
                    self.delete_gracefully(idx::PODS, &ns, meta_str(p, "name"));
                    let msg = format!("Deleted pod: {}", meta_str(p, "name"));
                    self.event(&rs, false, "SuccessfulDelete", &msg, events::RS_CONTROLLER);
                }
                pods.truncate(want);
            }
            let count = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && is_active(p))
                .count();
            let ready = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| {
                    owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && is_active(p) && pod_ready(p)
                })
                .count();
            let status = json!({
                "observedGeneration": rs["metadata"]["generation"],
                "replicas": count,
                "fullyLabeledReplicas": count,
                "readyReplicas": ready,
                "availableReplicas": ready,
            });
            self.set_status(idx::REPLICASETS, &ns, &name, status);
        }
    }

    /// A claim for `count` whole GPUs, or MIG partitions of `profile`, for the pod.
    pub(super) fn create_claim(&mut self, ns: &str, pod: &Obj, count: i64, profile: Option<&str>) {
        let pod_name = meta_str(pod, "name").to_string();
        let claim_name = format!("{pod_name}-gpu");
        let mut exactly = json!({"deviceClassName": gpu::NVIDIA_DRA_DRIVER,
            "allocationMode": "ExactCount", "count": count});
        if let Some(p) = profile {
            exactly["deviceClassName"] = json!(NVIDIA_MIG_CLASS);
            exactly["selectors"] = json!([{"cel": {"expression":
                format!("device.attributes['{}'].profile == '{p}'", gpu::NVIDIA_DRA_DRIVER)}}]);
        }
        let claim = json!({
            "metadata": {"name": claim_name, "ownerReferences": owner_ref(pod)},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}},
        });
        if self.create(idx::RESOURCECLAIMS, ns, claim).is_ok() {
            let mut p = (**pod).clone();
            p["spec"]["resourceClaims"] = json!([{"name": "gpu", "resourceClaimName": claim_name}]);
            let _ = self.store.update(idx::PODS, ns, &pod_name, p, false);
            let mut st = (**pod).clone();
            st["status"]["resourceClaimStatuses"] =
                json!([{"name": "gpu", "resourceClaimName": claim_name}]);
            let _ = self.store.update(
                idx::PODS,
                ns,
                &pod_name,
                json!({"status": st["status"]}),
                true,
            );
        }
    }
}
