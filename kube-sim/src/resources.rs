//! The resource types the simulated API server serves, and their discovery documents.

use serde_json::{Value, json};

/// One served resource type (a group/version/plural with its kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name used in URLs.
    pub plural: &'static str,
    /// Singular name (discovery).
    pub singular: &'static str,
    /// Object kind.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `status` is a subresource (main-resource writes keep the stored status).
    pub has_status: bool,
    /// Short names kubectl accepts.
    pub short_names: &'static [&'static str],
    /// Field selector labels supported beyond `metadata.name` / `metadata.namespace`.
    pub field_labels: &'static [&'static str],
}

impl ResourceType {
    /// `apiVersion` of objects of this type.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether the type is a custom resource on a real cluster (the MCS and Cluster API
    /// CRDs): no protobuf, no strategic merge patch.
    pub fn is_custom(&self) -> bool {
        matches!(self.group, "multicluster.x-k8s.io" | "cluster.x-k8s.io")
    }

    /// Whether the type has a `scale` subresource (autoscaling/v1 Scale).
    pub fn has_scale(&self) -> bool {
        matches!(self.kind, "Deployment" | "ReplicaSet" | "MachineDeployment")
    }

    /// Whether `label` may be used in a field selector for this type.
    pub fn supports_field(&self, label: &str) -> bool {
        label == "metadata.name"
            || (self.namespaced && label == "metadata.namespace")
            || self.field_labels.contains(&label)
    }
}

const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    has_status: bool,
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        has_status,
        short_names: &[],
        field_labels: &[],
    }
}

const fn with(
    mut r: ResourceType,
    short_names: &'static [&'static str],
    field_labels: &'static [&'static str],
) -> ResourceType {
    r.short_names = short_names;
    r.field_labels = field_labels;
    r
}

/// Index of each type in [`RESOURCES`], for code that names a type directly.
pub mod idx {
    /// core/v1 namespaces
    pub const NAMESPACES: usize = 0;
    /// core/v1 nodes
    pub const NODES: usize = 1;
    /// core/v1 pods
    pub const PODS: usize = 2;
    /// core/v1 services
    pub const SERVICES: usize = 3;
    /// core/v1 events
    pub const EVENTS: usize = 4;
    /// core/v1 configmaps
    pub const CONFIGMAPS: usize = 5;
    /// apps/v1 deployments
    pub const DEPLOYMENTS: usize = 6;
    /// apps/v1 replicasets
    pub const REPLICASETS: usize = 7;
    /// apps/v1 daemonsets
    pub const DAEMONSETS: usize = 8;
    /// discovery.k8s.io/v1 endpointslices
    pub const ENDPOINTSLICES: usize = 9;
    /// policy/v1 poddisruptionbudgets
    pub const PDBS: usize = 10;
    /// multicluster.x-k8s.io/v1beta1 serviceexports
    pub const SERVICEEXPORTS: usize = 11;
    /// multicluster.x-k8s.io/v1beta1 serviceimports
    pub const SERVICEIMPORTS: usize = 12;
    /// resource.k8s.io/v1 resourceslices
    pub const RESOURCESLICES: usize = 13;
    /// resource.k8s.io/v1 resourceclaims
    pub const RESOURCECLAIMS: usize = 14;
    /// resource.k8s.io/v1 deviceclasses
    pub const DEVICECLASSES: usize = 15;
    /// cluster.x-k8s.io/v1beta1 machinedeployments
    pub const MACHINEDEPLOYMENTS: usize = 16;
    /// coordination.k8s.io/v1 leases
    pub const LEASES: usize = 17;
    /// core/v1 secrets
    pub const SECRETS: usize = 18;
}

/// Every served type. Order matches [`idx`].
pub static RESOURCES: [ResourceType; 19] = [
    with(
        rt(
            "",
            "v1",
            "namespaces",
            "namespace",
            "Namespace",
            false,
            true,
        ),
        &["ns"],
        &["status.phase"],
    ),
    with(
        rt("", "v1", "nodes", "node", "Node", false, true),
        &["no"],
        &["spec.unschedulable"],
    ),
    with(
        rt("", "v1", "pods", "pod", "Pod", true, true),
        &["po"],
        &[
            "spec.nodeName",
            "status.phase",
            "status.podIP",
            "spec.schedulerName",
            "spec.serviceAccountName",
        ],
    ),
    with(
        rt("", "v1", "services", "service", "Service", true, true),
        &["svc"],
        &[],
    ),
    with(
        rt("", "v1", "events", "event", "Event", true, false),
        &["ev"],
        &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
    ),
    with(
        rt(
            "",
            "v1",
            "configmaps",
            "configmap",
            "ConfigMap",
            true,
            false,
        ),
        &["cm"],
        &[],
    ),
    with(
        rt(
            "apps",
            "v1",
            "deployments",
            "deployment",
            "Deployment",
            true,
            true,
        ),
        &["deploy"],
        &[],
    ),
    with(
        rt(
            "apps",
            "v1",
            "replicasets",
            "replicaset",
            "ReplicaSet",
            true,
            true,
        ),
        &["rs"],
        &[],
    ),
    with(
        rt(
            "apps",
            "v1",
            "daemonsets",
            "daemonset",
            "DaemonSet",
            true,
            true,
        ),
        &["ds"],
        &[],
    ),
    with(
        rt(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "endpointslice",
            "EndpointSlice",
            true,
            false,
        ),
        &[],
        &["addressType"],
    ),
    with(
        rt(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "poddisruptionbudget",
            "PodDisruptionBudget",
            true,
            true,
        ),
        &["pdb"],
        &[],
    ),
    with(
        rt(
            "multicluster.x-k8s.io",
            "v1beta1",
            "serviceexports",
            "serviceexport",
            "ServiceExport",
            true,
            true,
        ),
        &["svcex"],
        &[],
    ),
    with(
        rt(
            "multicluster.x-k8s.io",
            "v1beta1",
            "serviceimports",
            "serviceimport",
            "ServiceImport",
            true,
            true,
        ),
        &["svcim"],
        &[],
    ),
    with(
        rt(
            "resource.k8s.io",
            "v1",
            "resourceslices",
            "resourceslice",
            "ResourceSlice",
            false,
            false,
        ),
        &[],
        &["spec.nodeName", "spec.driver"],
    ),
    rt(
        "resource.k8s.io",
        "v1",
        "resourceclaims",
        "resourceclaim",
        "ResourceClaim",
        true,
        true,
    ),
    rt(
        "resource.k8s.io",
        "v1",
        "deviceclasses",
        "deviceclass",
        "DeviceClass",
        false,
        false,
    ),
    with(
        rt(
            "cluster.x-k8s.io",
            "v1beta1",
            "machinedeployments",
            "machinedeployment",
            "MachineDeployment",
            true,
            true,
        ),
        &["md"],
        &[],
    ),
    rt(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        false,
    ),
    rt("", "v1", "secrets", "secret", "Secret", true, false),
];

/// Find a type by group, version and plural.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Distinct (group, version) pairs in served order, core first.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in &RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// `/api`: the legacy core group versions.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_entry(group: &str) -> Value {
    if group == AUTHZ_GROUP {
        let v = json!({"groupVersion": format!("{AUTHZ_GROUP}/v1"), "version": "v1"});
        return json!({"name": group, "versions": [v.clone()], "preferredVersion": v});
    }
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions[0].clone(),
    })
}

/// The group of the access reviews (`kubectl auth can-i`), served as requests only.
pub const AUTHZ_GROUP: &str = "authorization.k8s.io";

/// `/apis`: every named group.
pub fn group_list() -> Value {
    let mut groups: Vec<&str> = vec![AUTHZ_GROUP];
    for (g, _) in group_versions() {
        if !g.is_empty() && !groups.contains(&g) {
            groups.push(g);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": groups.iter().map(|g| group_entry(g)).collect::<Vec<_>>(),
    })
}

/// `/apis/{group}`: one group, if served.
pub fn group(group: &str) -> Option<Value> {
    if group.is_empty() || !(group == AUTHZ_GROUP || RESOURCES.iter().any(|r| r.group == group)) {
        return None;
    }
    let mut v = group_entry(group);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/api/v1` or `/apis/{group}/{version}`: the resources of one group version.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if (group, version) == (AUTHZ_GROUP, "v1") {
        let review = |name: &str, kind: &str| json!({"name": name, "singularName": "", "namespaced": false, "kind": kind, "verbs": ["create"]});
        return Some(json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{AUTHZ_GROUP}/v1"),
            "resources": [review("selfsubjectaccessreviews", "SelfSubjectAccessReview"),
                          review("selfsubjectrulesreviews", "SelfSubjectRulesReview")],
        }));
    }
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
            "shortNames": r.short_names,
        });
        // `kubectl get all` expands the category from discovery.
        if matches!(
            r.kind,
            "Pod" | "Service" | "Deployment" | "ReplicaSet" | "DaemonSet"
        ) {
            entry["categories"] = json!(["all"]);
        }
        resources.push(entry);
        if r.has_status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.has_scale() {
            // kubectl scale and the cluster autoscaler's Cluster API provider use it.
            resources.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.kind == "Pod" {
            // kubectl drain looks for this subresource before it evicts.
            resources.push(json!({
                "name": "pods/eviction",
                "singularName": "",
                "namespaced": true,
                "group": "policy",
                "version": "v1",
                "kind": "Eviction",
                "verbs": ["create"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_constants_match_the_table() {
        assert_eq!(RESOURCES[idx::NAMESPACES].kind, "Namespace");
        assert_eq!(RESOURCES[idx::NODES].kind, "Node");
        assert_eq!(RESOURCES[idx::PODS].kind, "Pod");
        assert_eq!(RESOURCES[idx::SERVICES].kind, "Service");
        assert_eq!(RESOURCES[idx::EVENTS].kind, "Event");
        assert_eq!(RESOURCES[idx::CONFIGMAPS].kind, "ConfigMap");
        assert_eq!(RESOURCES[idx::DEPLOYMENTS].kind, "Deployment");
        assert_eq!(RESOURCES[idx::REPLICASETS].kind, "ReplicaSet");
        assert_eq!(RESOURCES[idx::DAEMONSETS].kind, "DaemonSet");
        assert_eq!(RESOURCES[idx::ENDPOINTSLICES].kind, "EndpointSlice");
        assert_eq!(RESOURCES[idx::PDBS].kind, "PodDisruptionBudget");
        assert_eq!(RESOURCES[idx::SERVICEEXPORTS].kind, "ServiceExport");
        assert_eq!(RESOURCES[idx::SERVICEIMPORTS].kind, "ServiceImport");
        assert_eq!(RESOURCES[idx::RESOURCESLICES].kind, "ResourceSlice");
        assert_eq!(RESOURCES[idx::RESOURCECLAIMS].kind, "ResourceClaim");
        assert_eq!(RESOURCES[idx::DEVICECLASSES].kind, "DeviceClass");
        assert_eq!(RESOURCES[idx::MACHINEDEPLOYMENTS].kind, "MachineDeployment");
        assert_eq!(RESOURCES[idx::LEASES].kind, "Lease");
        assert_eq!(RESOURCES[idx::SECRETS].kind, "Secret");
    }

    #[test]
    fn discovery_lists_eviction_and_status() {
        let core = resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"pods/eviction"));
        assert!(names.contains(&"nodes/status"));
        assert!(!names.contains(&"configmaps/status"));
        assert!(resource_list("nope", "v1").is_none());
        let groups = group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"resource.k8s.io") && names.contains(&"policy"));
        assert!(!names.contains(&""));
    }
}
