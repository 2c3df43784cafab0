//! Events as the real components record them: one `core/v1` Event per (object, reason,
//! message, component), its `count` raised when it happens again (client-go's recorder
//! deduplicates the same way), and the oldest dropped past a bound (the API server's TTL).

use super::*;

/// Events kept per cluster; older ones are deleted first, as their TTL (an hour) would. An
/// event holds about 4 KiB here, so the bound keeps a fleet of 1,000 busy clusters within a
/// gigabyte of them.
const EVENT_LIMIT: usize = 250;

/// Who records an event: `source.component` (and `reportingComponent`), and the node for
/// kubelets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    pub component: &'a str,
    pub host: Option<&'a str>,
}

/// The default scheduler.
pub(super) const SCHEDULER: Source<'static> = Source {
    component: "default-scheduler",
    host: None,
};
/// The node lifecycle controller.
pub(super) const NODE_CONTROLLER: Source<'static> = Source {
    component: "node-controller",
    host: None,
};
/// The ReplicaSet controller.
pub(super) const RS_CONTROLLER: Source<'static> = Source {
    component: "replicaset-controller",
    host: None,
};
/// The Deployment controller.
pub(super) const DEPLOYMENT_CONTROLLER: Source<'static> = Source {
    component: "deployment-controller",
    host: None,
};
/// Cluster API's MachineDeployment and Machine controllers.
pub(super) const CAPI_CONTROLLER: Source<'static> = Source {
    component: "machinedeployment-controller",
    host: None,
};

/// A kubelet on `node`.
pub(super) fn kubelet(node: &str) -> Source<'_> {
    Source {
        component: "kubelet",
        host: Some(node),
    }
}

impl SimState {
    /// Record `reason` about `obj` (type `Normal` or `Warning`).
    pub(super) fn event(
        &mut self,
        obj: &Value,
        warning: bool,
        reason: &str,
        message: &str,
        source: Source<'_>,
    ) {
        let ns = match meta_str(obj, "namespace") {
            "" => "default".to_string(),
            ns => ns.to_string(),
        };
        let uid = meta_str(obj, "uid");
        let now = now_rfc3339();
        let same = self
            .store
            .iter(idx::EVENTS, Some(&ns), None)
            .find(|e| {
                e["involvedObject"]["uid"] == uid
                    && e["reason"] == reason
                    && e["message"] == message
                    && e["source"]["component"] == source.component
            })
            .cloned();
        if let Some(e) = same {
            let mut e = (*e).clone();
            e["count"] = json!(e["count"].as_i64().unwrap_or(1) + 1);
            e["lastTimestamp"] = json!(now);
            let name = meta_str(&e, "name").to_string();
            let _ = self.store.update(idx::EVENTS, &ns, &name, e, false);
            return;
        }
        self.event_seq += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            + u128::from(self.event_seq);
        let name = format!("{}.{nanos:x}", meta_str(obj, "name"));
        let mut involved = json!({
            "kind": obj["kind"], "name": obj["metadata"]["name"], "uid": uid,
            "apiVersion": obj["apiVersion"], "resourceVersion": obj["metadata"]["resourceVersion"],
        });
        if !meta_str(obj, "namespace").is_empty() {
            involved["namespace"] = json!(ns);
        }
        let mut src = json!({"component": source.component});
        if let Some(h) = source.host {
            src["host"] = json!(h);
        }
        let event = json!({
            "metadata": {"name": name},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": src,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": if warning { "Warning" } else { "Normal" },
            "eventTime": null,
            "reportingComponent": source.component,
            "reportingInstance": source.host.unwrap_or(""),
        });
        if self.store.create(idx::EVENTS, &ns, event).is_ok() {
            self.event_log.push_back((ns, name));
            while self.event_log.len() > EVENT_LIMIT {
                if let Some((ns, name)) = self.event_log.pop_front() {
                    let _ = self.store.delete(idx::EVENTS, &ns, &name);
                }
            }
        }
    }
}
