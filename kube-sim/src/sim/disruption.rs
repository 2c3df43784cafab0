//! The disruption controller and the Eviction API: PDB health and the evictions it allows.

use super::*;

/// A PDB's health as the disruption controller computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PdbHealth {
    /// Pods the PDB covers.
    pub expected: i64,
    /// Ready pods it covers.
    pub current_healthy: i64,
    /// Ready pods it requires.
    pub desired_healthy: i64,
    /// Evictions allowed now.
    pub disruptions_allowed: i64,
}

impl SimState {
    pub(super) fn pdb_health(&self, pdb: &Value) -> PdbHealth {
        let ns = meta_str(pdb, "namespace");
        let Ok(sel) = LabelSelector::from_object(&pdb["spec"]["selector"]) else {
            return PdbHealth {
                expected: 0,
                current_healthy: 0,
                desired_healthy: 0,
                disruptions_allowed: 0,
            };
        };
        let pods: Vec<&Obj> = self
            .store
            .iter(idx::PODS, Some(ns), None)
            .filter(|p| !is_terminal(p) && sel.matches(p))
            .collect();
        // Pods being deleted are not healthy (the disruption controller skips them).
        let healthy = pods.iter().filter(|p| !deleting(p) && pod_ready(p)).count() as i64;
        // Expected count comes from the owning controllers' scale, as the disruption
        // controller computes it; bare pods count as themselves.
        let mut expected = 0i64;
        let mut seen = HashSet::new();
        for p in &pods {
            match owner_uid(p, "ReplicaSet") {
                Some(uid) => {
                    if seen.insert(uid.to_string()) {
                        let rs = self
                            .store
                            .iter(idx::REPLICASETS, Some(ns), None)
                            .find(|r| meta_str(r, "uid") == uid);
                        expected += rs.and_then(|r| r["spec"]["replicas"].as_i64()).unwrap_or(1);
                    }
                }
                None => expected += 1,
            }
        }
        let desired = if let Some(min) = pdb["spec"].get("minAvailable") {
            scaled(min, expected, true)
        } else if let Some(max) = pdb["spec"].get("maxUnavailable") {
            (expected - scaled(max, expected, true)).max(0)
        } else {
            expected
        };
        PdbHealth {
            expected,
            current_healthy: healthy,
            desired_healthy: desired,
            disruptions_allowed: (healthy - desired).max(0),
        }
    }

    /// The eviction subresource: delete the pod (gracefully, with `opts`) unless a PDB
    /// forbids it (429).
    pub fn evict(
        &mut self,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
        dry_run: bool,
    ) -> Result<(), ApiError> {
        let pod = self.store.get(idx::PODS, ns, name)?;
        let pdbs: Vec<Obj> = self
            .store
            .iter(idx::PDBS, Some(ns), None)
            .filter(|pdb| {
                LabelSelector::from_object(&pdb["spec"]["selector"])
                    .is_ok_and(|s| !s.is_empty() && s.matches(&pod))
            })
            .cloned()
            .collect();
        if pdbs.len() > 1 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        // A pod that is finished, Pending or already being deleted needs no budget
        // (the eviction REST's canIgnorePDB).
        let ignore_pdb = is_terminal(&pod) || pod["status"]["phase"] == "Pending" || deleting(&pod);
        if let Some(pdb) = pdbs.first()
            && !ignore_pdb
        {
            let h = self.pdb_health(pdb);
            let allowed = if pod_ready(&pod) {
                h.disruptions_allowed > 0
            } else {
                // unhealthyPodEvictionPolicy IfHealthyBudget (the default).
                h.current_healthy >= h.desired_healthy
            };
            if !allowed {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                // No Retry-After, as the API server (clients retry on their own schedule).
                e.details = Some(json!({"causes": [{
                    "reason": "DisruptionBudget",
                    "message": format!(
                        "The disruption budget {} needs {} healthy pods and has {} currently",
                        meta_str(pdb, "name"), h.desired_healthy, h.current_healthy
                    ),
                }]}));
                return Err(e);
            }
        }
        self.delete_object(idx::PODS, ns, name, opts, dry_run)?;
        Ok(())
    }

    pub(super) fn pdb_status(&mut self) {
        let pdbs = self.all(idx::PDBS);
        for pdb in pdbs {
            let h = self.pdb_health(&pdb);
            let (ns, name) = ns_name(&pdb);
            let status = json!({
                "observedGeneration": pdb["metadata"]["generation"],
                "expectedPods": h.expected,
                "currentHealthy": h.current_healthy,
                "desiredHealthy": h.desired_healthy,
                "disruptionsAllowed": h.disruptions_allowed,
            });
            if pdb["status"] != status {
                self.set_status(idx::PDBS, &ns, &name, status);
            }
        }
    }

    /// PDB health, for tests and the control API.
    pub fn pdb(&self, ns: &str, name: &str) -> Result<PdbHealth, ApiError> {
        let pdb = self.store.get(idx::PDBS, ns, name)?;
        Ok(self.pdb_health(&pdb))
    }
}
