//! Deployments and ReplicaSets: pods (and DRA claims) to match replicas.

use super::*;

impl SimState {
    pub(super) fn deployments(&mut self) {
        let deps = self.all(idx::DEPLOYMENTS);
        for d in deps {
            let (ns, name) = ns_name(&d);
            let uid = meta_str(&d, "uid").to_string();
            let rs_name = format!("{name}-{}", &uid.replace('-', "")[..10]);
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let mut template = d["spec"]["template"].clone();
            template["metadata"]["labels"]["pod-template-hash"] =
                json!(&uid.replace('-', "")[..10]);
            let rs_status = match self.store.get(idx::REPLICASETS, &ns, &rs_name) {
                Ok(rs) => {
                    if rs["spec"]["replicas"] != json!(replicas)
                        || rs["spec"]["template"] != template
                    {
                        let mut new = (*rs).clone();
                        new["spec"]["replicas"] = json!(replicas);
                        new["spec"]["template"] = template;
                        let _ = self
                            .store
                            .update(idx::REPLICASETS, &ns, &rs_name, new, false);
                    }
                    rs["status"].clone()
                }
                Err(_) => {
                    let mut selector = d["spec"]["selector"].clone();
                    selector["matchLabels"]["pod-template-hash"] =
                        template["metadata"]["labels"]["pod-template-hash"].clone();
                    let rs = json!({
                        "metadata": {"name": rs_name, "labels": template["metadata"]["labels"],
                                     "ownerReferences": owner_ref(&d)},
                        "spec": {"replicas": replicas, "selector": selector, "template": template},
                    });
                    let _ = self.create(idx::REPLICASETS, &ns, rs);
                    json!({})
                }
            };
            let ready = rs_status["readyReplicas"].as_i64().unwrap_or(0);
            let have = rs_status["replicas"].as_i64().unwrap_or(0);
            let status = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": have,
                "updatedReplicas": have,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": (replicas - ready).max(0),
            });
            self.set_status(idx::DEPLOYMENTS, &ns, &name, status);
        }
    }

    pub(super) fn replicasets(&mut self) {
        let sets = self.all(idx::REPLICASETS);
        for rs in sets {
            let (ns, name) = ns_name(&rs);
            let uid = meta_str(&rs, "uid").to_string();
            let want = rs["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
            let mut pods: Vec<Obj> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && !is_terminal(p))
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
                if let Some(count) = dra {
                    self.create_claim(&ns, &created, count, profile.as_deref());
                }
                pods.push(created);
            }
            if pods.len() > want {
                // Remove unscheduled, then not-ready pods first, as the ReplicaSet controller does.
                pods.sort_by_key(|p| (p["spec"]["nodeName"].is_string(), pod_ready(p)));
                for p in pods.iter().take(pods.len() - want) {
                    let _ = self.store.delete(idx::PODS, &ns, meta_str(p, "name"));
                }
                pods.truncate(want);
            }
            let count = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && !is_terminal(p))
                .count();
            let ready = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| owner_uid(p, "ReplicaSet") == Some(uid.as_str()) && pod_ready(p))
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
