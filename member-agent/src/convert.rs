//! Kubernetes API objects → the pure inventory inputs in `flotilla_core::inventory`.

use std::collections::BTreeMap;

use flotilla_core::inventory::{
    Attr, DeviceInput, DeviceRef, InitContainer, NodeInput, PodInput, Requests, SliceInput, Taint,
};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

fn quantities(m: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<String, String> {
    m.map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

/// What the inventory needs from a Node.
pub fn node(n: &Node) -> NodeInput {
    let status = n.status.as_ref();
    let ready_cond = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"));
    let ready = ready_cond.is_some();
    let ready_since_ms = ready_cond
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.as_millisecond());
    let spec = n.spec.as_ref();
    NodeInput {
        name: n.metadata.name.clone().unwrap_or_default(),
        labels: n.metadata.labels.clone().unwrap_or_default(),
        capacity: quantities(status.and_then(|s| s.capacity.as_ref())),
        allocatable: quantities(status.and_then(|s| s.allocatable.as_ref())),
        ready,
        ready_since_ms,
        unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        taints: spec
            .and_then(|s| s.taints.as_ref())
            .map(|t| {
                t.iter()
                    .map(|t| Taint {
                        key: t.key.clone(),
                        value: t.value.clone().unwrap_or_default(),
                        effect: t.effect.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        kubelet_version: status
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kubelet_version.clone())
            .unwrap_or_default(),
    }
}

fn requests(c: &Container) -> Requests {
    let r = c.resources.as_ref();
    // A limit without a request is a request of the same amount (API-server defaulting; the
    // objects we read are already defaulted, this only guards hand-written fixtures).
    let mut out = quantities(r.and_then(|r| r.limits.as_ref()));
    out.extend(quantities(r.and_then(|r| r.requests.as_ref())));
    out
}

/// What the inventory needs from a Pod.
pub fn pod(p: &Pod) -> PodInput {
    let spec = p.spec.as_ref();
    PodInput {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()),
        phase: p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        containers: spec
            .map(|s| s.containers.iter().map(requests).collect())
            .unwrap_or_default(),
        init_containers: spec
            .and_then(|s| s.init_containers.as_ref())
            .map(|cs| {
                cs.iter()
                    .map(|c| InitContainer {
                        requests: requests(c),
                        restartable: c.restart_policy.as_deref() == Some("Always"),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        overhead: quantities(spec.and_then(|s| s.overhead.as_ref())),
    }
}

/// A DRA device attribute (`{"int": 1}`, `{"string": "gpu"}`, …) as the inventory holds it.
fn attr(v: &Value) -> Option<Attr> {
    if let Some(i) = v.get("int").and_then(Value::as_i64) {
        Some(Attr::Int(i))
    } else if let Some(b) = v.get("bool").and_then(Value::as_bool) {
        Some(Attr::Bool(b))
    } else if let Some(s) = v.get("string").and_then(Value::as_str) {
        Some(Attr::Str(s.to_string()))
    } else {
        v.get("version")
            .and_then(Value::as_str)
            .map(|s| Attr::Version(s.to_string()))
    }
}

/// What the inventory needs from a ResourceSlice, in any served version: `v1` and `v1beta2`
/// list a device's fields directly, `v1beta1` nests them under `basic`.
pub fn slice(obj: &Value) -> SliceInput {
    let spec = &obj["spec"];
    let devices = spec["devices"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    let body = d.get("basic").unwrap_or(d);
                    DeviceInput {
                        name: d["name"].as_str().unwrap_or_default().to_string(),
                        attributes: body["attributes"]
                            .as_object()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|(k, v)| Some((k.clone(), attr(v)?)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        // `{"value": "80Gi"}`; a bare quantity in older alphas.
                        capacity: body["capacity"]
                            .as_object()
                            .map(|c| {
                                c.iter()
                                    .filter_map(|(k, v)| {
                                        let q = v.get("value").unwrap_or(v).as_str()?;
                                        Some((k.clone(), q.to_string()))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        consumes: body["consumesCounters"]
                            .as_array()
                            .map(|cs| {
                                cs.iter()
                                    .filter_map(|c| c["counterSet"].as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    SliceInput {
        driver: spec["driver"].as_str().unwrap_or_default().to_string(),
        node_name: spec["nodeName"].as_str().map(str::to_string),
        pool: spec["pool"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        generation: spec["pool"]["generation"].as_i64().unwrap_or(0),
        slice_count: spec["pool"]["resourceSliceCount"].as_i64().unwrap_or(1),
        devices,
    }
}

/// The devices a claim (any served version) has been allocated.
pub fn claim(obj: &Value) -> Vec<DeviceRef> {
    obj["status"]["allocation"]["devices"]["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| DeviceRef {
                    driver: r["driver"].as_str().unwrap_or_default().to_string(),
                    pool: r["pool"].as_str().unwrap_or_default().to_string(),
                    device: r["device"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slices_read_the_same_in_every_served_version() {
        let device = json!({
            "attributes": {"type": {"string": "gpu"}, "index": {"int": 0}},
            "capacity": {"memory": {"value": "80Gi"}},
            "consumesCounters": [{"counterSet": "gpu-0", "counters": {"memory": {"value": "80Gi"}}}],
        });
        let mut nested = json!({"name": "gpu-0", "basic": device.clone()});
        let mut flat = device;
        flat["name"] = json!("gpu-0");
        let spec = |d: &Value| {
            json!({"spec": {"driver": "gpu.nvidia.com", "nodeName": "n",
            "pool": {"name": "n", "generation": 2, "resourceSliceCount": 1}, "devices": [d]}})
        };
        let v1 = slice(&spec(&flat));
        let v1beta1 = slice(&spec(&nested));
        assert_eq!(v1, v1beta1);
        let d = &v1.devices[0];
        assert_eq!(d.attributes["type"], Attr::Str("gpu".into()));
        assert_eq!(d.capacity["memory"], "80Gi");
        assert_eq!(d.consumes, ["gpu-0"]);
        assert_eq!((v1.generation, v1.node_name.as_deref()), (2, Some("n")));
        nested["basic"]["attributes"] = json!({"type": {"string": "mig"}});
        assert_eq!(
            slice(&spec(&nested)).devices[0].attributes["type"],
            Attr::Str("mig".into())
        );
        let c = json!({"status": {"allocation": {"devices": {"results": [
            {"request": "gpu", "driver": "gpu.nvidia.com", "pool": "n", "device": "gpu-0"}]}}}});
        assert_eq!(claim(&c)[0].device, "gpu-0");
        assert!(claim(&json!({})).is_empty());
    }
}
