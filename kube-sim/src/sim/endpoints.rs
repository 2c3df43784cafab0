//! EndpointSlices for Services. (ServiceExport status is the MCS controller's: Flotilla's
//! agent writes it, as on a real cluster.)

use super::*;

impl SimState {
    pub(super) fn endpoint_slices(&mut self) {
        let services = self.all(idx::SERVICES);
        let mut keep: HashSet<(String, String)> = HashSet::new();
        for svc in services {
            let Some(selector) = svc["spec"]["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let sel = LabelSelector::from_map(&Value::Object(selector.clone()));
            let (ns, name) = ns_name(&svc);
            let slice_name = format!("{name}-sim");
            keep.insert((ns.clone(), slice_name.clone()));
            let mut endpoints: Vec<Value> = self
                .store
                .iter(idx::PODS, Some(&ns), None)
                .filter(|p| sel.matches(p) && p["status"]["podIP"].is_string() && !is_terminal(p))
                .map(|p| {
                    let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                    let zone = self
                        .store
                        .get(idx::NODES, "", node)
                        .ok()
                        .and_then(|n| n["metadata"]["labels"]["topology.kubernetes.io/zone"].as_str().map(String::from));
                    // A terminating endpoint is not ready, but may still serve.
                    let terminating = deleting(p);
                    let serving = pod_ready(p);
                    let mut e = json!({
                        "addresses": [p["status"]["podIP"]],
                        "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
                        "nodeName": node,
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]},
                    });
                    if let Some(z) = zone {
                        e["zone"] = json!(z);
                    }
                    e
                })
                .collect();
            endpoints.sort_by(|a, b| {
                a["targetRef"]["name"]
                    .as_str()
                    .cmp(&b["targetRef"]["name"].as_str())
            });
            let ports: Vec<Value> = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p["targetPort"].as_i64().or(p["port"].as_i64()).unwrap_or(0);
                    json!({"name": p["name"].as_str().unwrap_or(""), "port": port, "protocol": p["protocol"].as_str().unwrap_or("TCP")})
                })
                .collect();
            let desired = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name,
                    "labels": {"kubernetes.io/service-name": name,
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                    "ownerReferences": owner_ref(&svc),
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            });
            match self.store.get(idx::ENDPOINTSLICES, &ns, &slice_name) {
                Ok(cur) => {
                    if cur["endpoints"] != desired["endpoints"] || cur["ports"] != desired["ports"]
                    {
                        let mut new = desired;
                        new["metadata"]["resourceVersion"] =
                            cur["metadata"]["resourceVersion"].clone();
                        let _ =
                            self.store
                                .update(idx::ENDPOINTSLICES, &ns, &slice_name, new, false);
                    }
                }
                Err(_) => {
                    let _ = self.store.create(idx::ENDPOINTSLICES, &ns, desired);
                }
            }
        }
        let stale: Vec<(String, String)> = self
            .store
            .iter(idx::ENDPOINTSLICES, None, None)
            .filter(|s| {
                s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                    == "endpointslice-controller.k8s.io"
            })
            .map(|s| ns_name(s))
            .filter(|k| !keep.contains(k))
            .collect();
        for (ns, name) in stale {
            let _ = self.store.delete(idx::ENDPOINTSLICES, &ns, &name);
        }
    }
}
