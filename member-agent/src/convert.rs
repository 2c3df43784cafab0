//! Kubernetes API objects → the pure inventory inputs in `flotilla_core::inventory`.

use std::collections::BTreeMap;

use flotilla_core::inventory::{
    Attr, DeviceInput, DeviceRef, InitContainer, NodeInput, PodInput, Requests, SliceInput, Taint,
};
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

fn quantities(m: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<String, String> {
    m.map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

/// What the inventory needs from a Node.
pub fn node(n: &Node) -> NodeInput {
    let status = n.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let spec = n.spec.as_ref();
    NodeInput {
        name: n.metadata.name.clone().unwrap_or_default(),
        labels: n.metadata.labels.clone().unwrap_or_default(),
        capacity: quantities(status.and_then(|s| s.capacity.as_ref())),
        allocatable: quantities(status.and_then(|s| s.allocatable.as_ref())),
        ready,
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

/// What the inventory needs from a ResourceSlice.
pub fn slice(s: &ResourceSlice) -> SliceInput {
    let devices = s
        .spec
        .devices
        .as_ref()
        .map(|ds| {
            ds.iter()
                .map(|d| DeviceInput {
                    name: d.name.clone(),
                    attributes: d
                        .attributes
                        .as_ref()
                        .map(|a| {
                            a.iter()
                                .filter_map(|(k, v)| {
                                    let attr = if let Some(i) = v.int {
                                        Attr::Int(i)
                                    } else if let Some(b) = v.bool {
                                        Attr::Bool(b)
                                    } else if let Some(s) = &v.string {
                                        Attr::Str(s.clone())
                                    } else {
                                        Attr::Version(v.version.clone()?)
                                    };
                                    Some((k.clone(), attr))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    capacity: d
                        .capacity
                        .as_ref()
                        .map(|c| {
                            c.iter()
                                .map(|(k, v)| (k.clone(), v.value.0.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    SliceInput {
        driver: s.spec.driver.clone(),
        node_name: s.spec.node_name.clone(),
        pool: s.spec.pool.name.clone(),
        generation: s.spec.pool.generation,
        slice_count: s.spec.pool.resource_slice_count,
        devices,
    }
}

/// The devices a claim has been allocated.
pub fn claim(c: &ResourceClaim) -> Vec<DeviceRef> {
    c.status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .map(|r| {
            r.iter()
                .map(|r| DeviceRef {
                    driver: r.driver.clone(),
                    pool: r.pool.clone(),
                    device: r.device.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}
