//! Garbage collection: dependents of deleted owners, pods of deleted nodes.

use super::*;

impl SimState {
    pub(super) fn garbage_collect(&mut self) {
        // Objects whose controlling owner is gone are deleted (background cascading deletion).
        let uids = |s: &Store, res: usize| -> HashSet<String> {
            s.iter(res, None, None)
                .map(|o| meta_str(o, "uid").to_string())
                .collect()
        };
        let owners: HashMap<&str, HashSet<String>> = [
            ("Deployment", uids(&self.store, idx::DEPLOYMENTS)),
            ("ReplicaSet", uids(&self.store, idx::REPLICASETS)),
            ("DaemonSet", uids(&self.store, idx::DAEMONSETS)),
            ("Pod", uids(&self.store, idx::PODS)),
            ("ServiceImport", uids(&self.store, idx::SERVICEIMPORTS)),
        ]
        .into_iter()
        .collect();
        for res in [
            idx::REPLICASETS,
            idx::PODS,
            idx::RESOURCECLAIMS,
            idx::ENDPOINTSLICES,
        ] {
            let doomed: Vec<(String, String)> = self
                .store
                .iter(res, None, None)
                .filter(|o| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|r| {
                            let kind = r["kind"].as_str().unwrap_or("");
                            owners
                                .get(kind)
                                .is_some_and(|u| !u.contains(r["uid"].as_str().unwrap_or("")))
                        })
                })
                .map(|o| ns_name(o))
                .collect();
            for (ns, name) in doomed {
                self.delete_gracefully(res, &ns, &name);
            }
        }
        // Pods bound to nodes that no longer exist (pod GC).
        let nodes: HashSet<String> = self
            .store
            .iter(idx::NODES, None, None)
            .map(|n| meta_str(n, "name").to_string())
            .collect();
        let lost: Vec<(String, String)> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| !nodes.contains(n))
            })
            .map(|p| ns_name(p))
            .collect();
        for (ns, name) in lost {
            let _ = self.store.delete(idx::PODS, &ns, &name);
        }
        self.bound
            .retain(|k, _| self.store.get(idx::PODS, &k.0, &k.1).is_ok());
        self.terminating
            .retain(|k, _| self.store.get(idx::PODS, &k.0, &k.1).is_ok());
        let pods = &self.store;
        self.unready_pods
            .retain(|k| pods.get(idx::PODS, &k.0, &k.1).is_ok());
    }
}
