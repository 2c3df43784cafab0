//! Graceful deletion as the API server and the kubelet do it: `DeleteOptions`,
//! `deletionTimestamp` and grace periods, finalizers, pods Terminating until their kubelet
//! has stopped them, and the namespace controller emptying a Terminating namespace.

use super::*;
use crate::resources::RESOURCES;
use crate::store::has_finalizers;

/// What a DELETE asked for (its body, or the query's `gracePeriodSeconds`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeleteOptions {
    /// Overrides the pod's `terminationGracePeriodSeconds`; 0 deletes at once (`--force`).
    pub grace_period_seconds: Option<i64>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
}

impl DeleteOptions {
    /// From a `DeleteOptions` body (`Null` when there was none) and the query string's
    /// `gracePeriodSeconds`.
    pub fn parse(body: &Value, query_grace: Option<&str>) -> Result<Self, ApiError> {
        let grace =
            match (&body["gracePeriodSeconds"], query_grace) {
                (Value::Null, None) => None,
                (Value::Null, Some(q)) => Some(q.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("gracePeriodSeconds: invalid value {q:?}"))
                })?),
                (v, _) => Some(v.as_i64().ok_or_else(|| {
                    ApiError::bad_request("gracePeriodSeconds: must be an integer")
                })?),
            };
        let pre = &body["preconditions"];
        Ok(Self {
            grace_period_seconds: grace.map(|g| g.max(0)),
            uid: pre["uid"].as_str().map(String::from),
            resource_version: pre["resourceVersion"].as_str().map(String::from),
        })
    }
}

/// Whether the object is being deleted.
pub fn deleting(o: &Value) -> bool {
    !o["metadata"]["deletionTimestamp"].is_null()
}

/// The grace period a pod's deletion gets: none for a pod no kubelet runs (unbound) or one
/// that has finished, else the asked one or the pod's own (30 s by default).
fn pod_grace(pod: &Value, asked: Option<i64>) -> i64 {
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) || is_terminal(pod) {
        return 0;
    }
    asked
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0)
}

impl SimState {
    /// DELETE as the API server does it: preconditions, then either gone at once, or marked
    /// with `deletionTimestamp` while a grace period runs (pods) or finalizers remain (any
    /// object; a namespace always, for its controller empties it first).
    pub fn delete_object(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
        dry_run: bool,
    ) -> Result<Obj, ApiError> {
        let cur = self.store.get(res, ns, name)?;
        if opts
            .uid
            .as_ref()
            .is_some_and(|u| cur["metadata"]["uid"] != *u)
            || opts
                .resource_version
                .as_ref()
                .is_some_and(|rv| cur["metadata"]["resourceVersion"] != *rv)
        {
            return Err(ApiError::conflict(res, name));
        }
        if dry_run {
            return Ok(cur);
        }
        let grace = match res {
            idx::PODS => pod_grace(&cur, opts.grace_period_seconds),
            _ => 0,
        };
        if grace == 0 && !has_finalizers(&cur) && res != idx::NAMESPACES {
            self.terminating.remove(&ns_name(&cur));
            return self.store.delete(res, ns, name);
        }
        if deleting(&cur) && res != idx::PODS {
            return Ok(cur);
        }
        self.store.mark_deleted(res, ns, name, grace)
    }

    /// A controller's delete (ReplicaSet scale-down, garbage collection): the object's own
    /// grace period. Already gone is fine.
    pub(super) fn delete_gracefully(&mut self, res: usize, ns: &str, name: &str) {
        let _ = self.delete_object(res, ns, name, &DeleteOptions::default(), false);
    }

    /// The kubelet's side: a pod being deleted stops its containers (a `Killing` event each),
    /// stays Terminating for its grace period (scaled by `timing.grace_second_ms`), then is
    /// removed, or, with finalizers left, kept at grace period 0 until they are. A silent
    /// kubelet (NotReady fault) stops nothing: its pods stay Terminating.
    pub(super) fn pod_termination(&mut self, now: Instant, next: &mut Option<Instant>) {
        let second = Duration::from_millis(self.spec.timing.grace_second_ms);
        let pods: Vec<Obj> = self
            .store
            .iter(idx::PODS, None, None)
            .filter(|p| {
                deleting(p) && p["metadata"]["deletionGracePeriodSeconds"].as_i64() != Some(0)
            })
            .cloned()
            .collect();
        for pod in pods {
            let key = ns_name(&pod);
            let node = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            if self.nodes.get(&node).is_some_and(|n| n.not_ready) {
                continue;
            }
            let grace = pod["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                .max(0) as u32;
            let deadline = now + second * grace;
            let due = match self.terminating.get_mut(&key) {
                Some(d) => {
                    *d = (*d).min(deadline);
                    *d
                }
                None => {
                    self.terminating.insert(key.clone(), deadline);
                    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
                        let msg =
                            format!("Stopping container {}", c["name"].as_str().unwrap_or(""));
                        self.event(&pod, false, "Killing", &msg, events::kubelet(&node));
                    }
                    deadline
                }
            };
            if now < due {
                merge_deadline(next, due);
                continue;
            }
            self.terminating.remove(&key);
            if has_finalizers(&pod) {
                let _ = self.store.mark_deleted(idx::PODS, &key.0, &key.1, 0);
            } else {
                let _ = self.store.delete(idx::PODS, &key.0, &key.1);
            }
        }
    }

    /// The namespace controller: a Terminating namespace has its objects deleted (each with
    /// its own grace period and finalizers) and goes once it is empty.
    pub(super) fn namespaces(&mut self) {
        let doomed: Vec<String> = self
            .store
            .iter(idx::NAMESPACES, None, None)
            .filter(|n| deleting(n) && !has_finalizers(n))
            .map(|n| meta_str(n, "name").to_string())
            .collect();
        for ns in doomed {
            let mut left = 0;
            for res in (0..RESOURCES.len()).filter(|r| RESOURCES[*r].namespaced) {
                let names: Vec<(String, bool)> = self
                    .store
                    .iter(res, Some(&ns), None)
                    .map(|o| (meta_str(o, "name").to_string(), deleting(o)))
                    .collect();
                for (name, marked) in names {
                    if !marked {
                        self.delete_gracefully(res, &ns, &name);
                    }
                }
                left += self.store.iter(res, Some(&ns), None).count();
            }
            if left == 0 {
                let _ = self.store.delete(idx::NAMESPACES, "", &ns);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_options_from_body_and_query() {
        let o = DeleteOptions::parse(
            &json!({"gracePeriodSeconds": 5, "preconditions": {"uid": "u"}}),
            None,
        )
        .unwrap();
        assert_eq!(o.grace_period_seconds, Some(5));
        assert_eq!(o.uid.as_deref(), Some("u"));
        let o = DeleteOptions::parse(&Value::Null, Some("0")).unwrap();
        assert_eq!(o.grace_period_seconds, Some(0));
        assert!(DeleteOptions::parse(&Value::Null, Some("soon")).is_err());
    }

    #[test]
    fn unbound_and_finished_pods_have_no_grace() {
        let bound = json!({"spec": {"nodeName": "n", "terminationGracePeriodSeconds": 60}, "status": {"phase": "Running"}});
        assert_eq!(pod_grace(&bound, None), 60);
        assert_eq!(pod_grace(&bound, Some(3)), 3);
        let pending = json!({"spec": {}, "status": {"phase": "Pending"}});
        assert_eq!(pod_grace(&pending, None), 0);
        let done = json!({"spec": {"nodeName": "n"}, "status": {"phase": "Succeeded"}});
        assert_eq!(pod_grace(&done, None), 0);
    }
}
