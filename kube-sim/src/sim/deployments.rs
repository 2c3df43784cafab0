//! The Deployment controller: a ReplicaSet per pod-template hash, rolled by `maxSurge` and
//! `maxUnavailable` (or Recreate), revisions kept on the ReplicaSets so that `rollout
//! history` and `undo` work, and the `Available` and `Progressing` conditions that `kubectl
//! rollout status` and `kubectl wait` read.

use super::*;

/// The label carrying a ReplicaSet's pod-template hash.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation on Deployments and their ReplicaSets.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
const DESIRED_ANNOTATION: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_ANNOTATION: &str = "deployment.kubernetes.io/max-replicas";
/// A rollout's counts (updated, available, ready, replicas): a change is progress.
pub type Counts = (i64, i64, i64, i64);

/// Deployment annotations a ReplicaSet does not copy.
const NOT_COPIED: &[&str] = &[
    REVISION_ANNOTATION,
    DESIRED_ANNOTATION,
    MAX_ANNOTATION,
    "deployment.kubernetes.io/revision-history",
    "kubectl.kubernetes.io/last-applied-configuration",
];

/// The pod-template hash as the controller writes it: FNV-32a of the template, its decimal
/// digits mapped onto the alphabet of generated names (`rand.SafeEncodeString`).
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in serde_json::to_vec(template).expect("json") {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

/// A template without the hash label, for comparing a ReplicaSet's with its Deployment's.
fn without_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(l) = t["metadata"]["labels"].as_object_mut() {
        l.remove(TEMPLATE_HASH_LABEL);
    }
    t
}

fn revision(o: &Value) -> i64 {
    o["metadata"]["annotations"][REVISION_ANNOTATION]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(o: &Value) -> i64 {
    o["spec"]["replicas"].as_i64().unwrap_or(1).max(0)
}

fn status_count(o: &Value, field: &str) -> i64 {
    o["status"][field].as_i64().unwrap_or(0)
}

/// `maxSurge` and `maxUnavailable` resolved against `replicas` (surge rounded up,
/// unavailable down; both 0 would stall, so unavailable becomes 1, as the controller does).
pub fn fenceposts(d: &Value, replicas: i64) -> (i64, i64) {
    let ru = &d["spec"]["strategy"]["rollingUpdate"];
    let or_default = |v: &Value| match v {
        Value::Null => json!("25%"),
        v => v.clone(),
    };
    let surge = scaled(&or_default(&ru["maxSurge"]), replicas, true);
    let unavailable = scaled(&or_default(&ru["maxUnavailable"]), replicas, false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// What one rolling step sets each ReplicaSet's replicas to: the new one grows within
/// `replicas + maxSurge`, the old ones shrink while `replicas - maxUnavailable` stay
/// available (unavailable old pods go first). `old` is oldest first: (replicas, available).
pub fn rolling_step(
    replicas: i64,
    (surge, unavailable): (i64, i64),
    new: (i64, i64),
    old: &[(i64, i64)],
) -> (i64, Vec<i64>) {
    let mut new_replicas = new.0;
    let mut old_replicas: Vec<i64> = old.iter().map(|o| o.0).collect();
    let total = |n: i64, o: &[i64]| n + o.iter().sum::<i64>();
    // Scale up the new ReplicaSet.
    if new_replicas > replicas {
        new_replicas = replicas;
    } else if new_replicas < replicas {
        let room = replicas + surge - total(new_replicas, &old_replicas);
        if room > 0 {
            new_replicas = replicas.min(new_replicas + room);
        }
    }
    // Scale down old ones: first their unavailable pods, then available ones while the
    // minimum stays available.
    let min_available = replicas - unavailable;
    let new_unavailable = (new.0 - new.1).max(0);
    let mut cleanup = total(new.0, &old_replicas) - min_available - new_unavailable;
    for (i, (r, avail)) in old.iter().enumerate() {
        if cleanup <= 0 {
            break;
        }
        let unhealthy = (r - avail).max(0).min(cleanup);
        old_replicas[i] -= unhealthy;
        cleanup -= unhealthy;
    }
    let available: i64 = new.1 + old.iter().map(|o| o.1).sum::<i64>();
    let mut budget = available - min_available;
    for r in old_replicas.iter_mut() {
        if budget <= 0 {
            break;
        }
        let down = (*r).min(budget);
        *r -= down;
        budget -= down;
    }
    (new_replicas, old_replicas)
}

impl SimState {
    pub(super) fn deployments(&mut self, now: Instant, next: &mut Option<Instant>) {
        for d in self.all(idx::DEPLOYMENTS) {
            self.deployment(&d, now, next);
        }
    }

    fn deployment(&mut self, d: &Obj, now: Instant, next: &mut Option<Instant>) {
        let (ns, name) = ns_name(d);
        let uid = meta_str(d, "uid").to_string();
        let replicas = spec_replicas(d);
        let paused = d["spec"]["paused"].as_bool().unwrap_or(false);
        let recreate = d["spec"]["strategy"]["type"] == "Recreate";
        let posts = fenceposts(d, replicas);
        let mut rss: Vec<Obj> = self
            .store
            .iter(idx::REPLICASETS, Some(&ns), None)
            .filter(|r| owner_uid(r, "Deployment") == Some(uid.as_str()))
            .cloned()
            .collect();
        rss.sort_by_key(|r| (revision(r), meta_str(r, "creationTimestamp").to_string()));
        let max_revision = rss.iter().map(|r| revision(r)).max().unwrap_or(0);
        let template = without_hash(&d["spec"]["template"]);
        let mut new_rs = rss
            .iter()
            .find(|r| without_hash(&r["spec"]["template"]) == template)
            .cloned();
        let mut progress_reason = ("FoundNewReplicaSet", "Found new replica set");
        if paused && new_rs.is_none() {
            return self.deployment_status(d, &rss, None, posts, now, next, None);
        }
        let surge = if recreate { 0 } else { posts.0 };
        let annotations = |r: &Value, rev: i64| {
            let mut a = d["metadata"]["annotations"].clone();
            if let Some(m) = a.as_object_mut() {
                m.retain(|k, _| !NOT_COPIED.contains(&k.as_str()));
            } else {
                a = json!({});
            }
            for (k, v) in r["metadata"]["annotations"]
                .as_object()
                .into_iter()
                .flatten()
            {
                if NOT_COPIED.contains(&k.as_str()) {
                    a[k] = v.clone();
                }
            }
            a[REVISION_ANNOTATION] = json!(rev.to_string());
            a[DESIRED_ANNOTATION] = json!(replicas.to_string());
            a[MAX_ANNOTATION] = json!((replicas + surge).to_string());
            a
        };
        match &new_rs {
            None => {
                let hash = template_hash(&template);
                let mut t = template.clone();
                t["metadata"]["labels"][TEMPLATE_HASH_LABEL] = json!(hash);
                let mut selector = d["spec"]["selector"].clone();
                selector["matchLabels"][TEMPLATE_HASH_LABEL] = json!(hash);
                let rs = json!({
                    "metadata": {"name": format!("{name}-{hash}"), "labels": t["metadata"]["labels"],
                                 "annotations": annotations(&json!({}), max_revision + 1),
                                 "ownerReferences": owner_ref(d)},
                    "spec": {"replicas": 0, "selector": selector, "template": t},
                });
                match self.create(idx::REPLICASETS, &ns, rs) {
                    Ok(created) => {
                        rss.push(created.clone());
                        new_rs = Some(created);
                        progress_reason = ("NewReplicaSetCreated", "Created new replica set");
                    }
                    Err(_) => return,
                }
            }
            Some(rs) if revision(rs) < max_revision || revision(rs) == 0 => {
                // Rolled back to an older template: it becomes the newest revision.
                let mut r = (**rs).clone();
                r["metadata"]["annotations"] = annotations(rs, max_revision.max(revision(rs)) + 1);
                if let Ok(u) =
                    self.store
                        .update(idx::REPLICASETS, &ns, meta_str(rs, "name"), r, false)
                {
                    new_rs = Some(u);
                }
            }
            Some(_) => {}
        }
        let new_rs = new_rs.expect("found or created");
        let new_name = meta_str(&new_rs, "name").to_string();
        let old: Vec<Obj> = rss
            .iter()
            .filter(|r| meta_str(r, "name") != new_name)
            .cloned()
            .collect();
        // The revision the Deployment shows is its new ReplicaSet's.
        let rev = revision(
            &self
                .store
                .get(idx::REPLICASETS, &ns, &new_name)
                .unwrap_or(new_rs.clone()),
        );
        if d["metadata"]["annotations"][REVISION_ANNOTATION] != rev.to_string().as_str() {
            let mut nd = (**d).clone();
            nd["metadata"]["annotations"][REVISION_ANNOTATION] = json!(rev.to_string());
            let _ = self.store.update(idx::DEPLOYMENTS, &ns, &name, nd, false);
        }
        if !paused {
            let new_target;
            let old_targets: Vec<i64>;
            if recreate {
                // Old pods all gone (terminating ones too) before the new ones start.
                let old_uids: HashSet<&str> = old.iter().map(|r| meta_str(r, "uid")).collect();
                let old_pods = self
                    .store
                    .iter(idx::PODS, Some(&ns), None)
                    .any(|p| owner_uid(p, "ReplicaSet").is_some_and(|u| old_uids.contains(u)));
                old_targets = vec![0; old.len()];
                new_target = if old_pods { 0 } else { replicas };
            } else {
                let olds: Vec<(i64, i64)> = old
                    .iter()
                    .map(|r| (spec_replicas(r), status_count(r, "availableReplicas")))
                    .collect();
                (new_target, old_targets) = rolling_step(
                    replicas,
                    posts,
                    (
                        spec_replicas(&new_rs),
                        status_count(&new_rs, "availableReplicas"),
                    ),
                    &olds,
                );
            }
            for (r, target) in old.iter().zip(old_targets) {
                self.scale_rs(d, r, target);
            }
            self.scale_rs(d, &new_rs, new_target);
        }
        // Old ReplicaSets beyond revisionHistoryLimit go, oldest first, once empty.
        let limit = d["spec"]["revisionHistoryLimit"]
            .as_i64()
            .unwrap_or(10)
            .max(0) as usize;
        let empty: Vec<String> = old
            .iter()
            .filter_map(|r| {
                self.store
                    .get(idx::REPLICASETS, &ns, meta_str(r, "name"))
                    .ok()
            })
            .filter(|r| spec_replicas(r) == 0 && status_count(r, "replicas") == 0)
            .map(|r| meta_str(&r, "name").to_string())
            .collect();
        if empty.len() > limit {
            for n in &empty[..empty.len() - limit] {
                let _ = self.store.delete(idx::REPLICASETS, &ns, n);
            }
        }
        let rss: Vec<Obj> = self
            .store
            .iter(idx::REPLICASETS, Some(&ns), None)
            .filter(|r| owner_uid(r, "Deployment") == Some(uid.as_str()))
            .cloned()
            .collect();
        let new_rs = self.store.get(idx::REPLICASETS, &ns, &new_name).ok();
        self.deployment_status(
            d,
            &rss,
            new_rs.as_ref(),
            posts,
            now,
            next,
            Some(progress_reason),
        );
    }

    /// Set a ReplicaSet's replicas, with the controller's ScalingReplicaSet event.
    fn scale_rs(&mut self, d: &Value, rs: &Value, target: i64) {
        let (ns, name) = ns_name(rs);
        let Ok(cur) = self.store.get(idx::REPLICASETS, &ns, &name) else {
            return;
        };
        let from = spec_replicas(&cur);
        if from == target {
            return;
        }
        let mut r = (*cur).clone();
        r["spec"]["replicas"] = json!(target);
        if self
            .store
            .update(idx::REPLICASETS, &ns, &name, r, false)
            .is_ok()
        {
            let dir = if target > from { "up" } else { "down" };
            let msg = format!("Scaled {dir} replica set {name} from {from} to {target}");
            self.event(
                d,
                false,
                "ScalingReplicaSet",
                &msg,
                events::DEPLOYMENT_CONTROLLER,
            );
        }
    }

    /// The Deployment's status: counts over its ReplicaSets, `Available`, and `Progressing`
    /// (with `ProgressDeadlineExceeded` once `progressDeadlineSeconds` pass without progress).
    #[allow(clippy::too_many_arguments)]
    fn deployment_status(
        &mut self,
        d: &Value,
        rss: &[Obj],
        new_rs: Option<&Obj>,
        (_, max_unavailable): (i64, i64),
        now: Instant,
        next: &mut Option<Instant>,
        found: Option<(&str, &str)>,
    ) {
        let (ns, name) = ns_name(d);
        let replicas = spec_replicas(d);
        let sum = |f: &str| rss.iter().map(|r| status_count(r, f)).sum::<i64>();
        let available = sum("availableReplicas");
        let total_spec: i64 = rss.iter().map(|r| spec_replicas(r)).sum();
        let updated = new_rs.map_or(0, |r| status_count(r, "replicas"));
        let mut status = json!({
            "observedGeneration": d["metadata"]["generation"],
            "replicas": sum("replicas"),
            "updatedReplicas": updated,
            "readyReplicas": sum("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": (total_spec - available).max(0),
        });
        let old = &d["status"]["conditions"];
        let ts = now_rfc3339();
        let keep = |t: &str, s: &str, reason: &str, message: &str| {
            let prev = old
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == t)
                .cloned()
                .unwrap_or(Value::Null);
            let same_status = prev["status"] == s;
            let same = same_status && prev["reason"] == reason && prev["message"] == message;
            json!({
                "type": t, "status": s, "reason": reason, "message": message,
                "lastUpdateTime": if same { prev["lastUpdateTime"].clone() } else { json!(ts) },
                "lastTransitionTime": if same_status { prev["lastTransitionTime"].clone() } else { json!(ts) },
            })
        };
        let available_cond = if available >= replicas - max_unavailable {
            keep(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        } else {
            keep(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        };
        let key = (ns.clone(), name.clone());
        let counts = (updated, available, sum("readyReplicas"), sum("replicas"));
        let moved = self.progress.get(&key).is_none_or(|(c, _)| *c != counts);
        if moved {
            self.progress.insert(key.clone(), (counts, now));
        }
        let last_progress = self.progress[&key].1;
        let deadline =
            Duration::from_secs(d["spec"]["progressDeadlineSeconds"].as_u64().unwrap_or(600));
        let rs_name = new_rs.map_or(String::new(), |r| meta_str(r, "name").to_string());
        let complete =
            new_rs.is_some() && updated == replicas && available >= replicas && counts.3 == updated;
        let progressing = if d["spec"]["paused"] == true {
            keep(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
            )
        } else if complete {
            self.progress.remove(&key);
            let m = format!("ReplicaSet \"{rs_name}\" has successfully progressed.");
            keep("Progressing", "True", "NewReplicaSetAvailable", &m)
        } else if now.saturating_duration_since(last_progress) >= deadline {
            let m = format!("ReplicaSet \"{rs_name}\" has timed out progressing.");
            keep("Progressing", "False", "ProgressDeadlineExceeded", &m)
        } else {
            merge_deadline(next, last_progress + deadline);
            let prev = old
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Progressing");
            match (found, prev) {
                (Some(("NewReplicaSetCreated", m)), _) => keep(
                    "Progressing",
                    "True",
                    "NewReplicaSetCreated",
                    &format!("{m} \"{rs_name}\""),
                ),
                (_, Some(_)) if moved => {
                    let m = format!("ReplicaSet \"{rs_name}\" is progressing.");
                    keep("Progressing", "True", "ReplicaSetUpdated", &m)
                }
                (_, Some(p)) => p.clone(),
                (found, None) => {
                    let (r, m) = found.unwrap_or(("FoundNewReplicaSet", "Found new replica set"));
                    keep("Progressing", "True", r, &format!("{m} \"{rs_name}\""))
                }
            }
        };
        status["conditions"] = json!([available_cond, progressing]);
        self.set_status(idx::DEPLOYMENTS, &ns, &name, status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenceposts_round_surge_up_and_unavailable_down() {
        let d = json!({"spec": {}});
        assert_eq!(fenceposts(&d, 4), (1, 1));
        assert_eq!(fenceposts(&d, 2), (1, 0));
        let d =
            json!({"spec": {"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}});
        assert_eq!(fenceposts(&d, 3), (0, 1));
    }

    #[test]
    fn a_rolling_update_surges_then_retires_old_pods() {
        // 4 replicas, surge 1, unavailable 1: the new set may grow to 1 at once (5 in all),
        // and one old pod may go while 3 stay available.
        let (new, old) = rolling_step(4, (1, 1), (0, 0), &[(4, 4)]);
        assert_eq!((new, old), (1, vec![3]));
        // The new pod is not ready yet: nothing more may go.
        let (new, old) = rolling_step(4, (1, 1), (1, 0), &[(3, 3)]);
        assert_eq!((new, old), (2, vec![3]));
        // Unavailable old pods go first, whatever the budget.
        let (_, old) = rolling_step(4, (0, 1), (0, 0), &[(4, 2)]);
        assert_eq!(old, vec![3]);
        // Done: the old set is empty.
        let (new, old) = rolling_step(4, (1, 1), (4, 4), &[(1, 1)]);
        assert_eq!((new, old), (4, vec![0]));
    }

    #[test]
    fn the_hash_is_stable_and_uses_the_name_alphabet() {
        let t = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}});
        let h = template_hash(&t);
        assert_eq!(h, template_hash(&t.clone()));
        assert!(
            h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)),
            "{h}"
        );
        assert_ne!(
            h,
            template_hash(&json!({"metadata": {"labels": {"app": "api"}}}))
        );
    }
}
