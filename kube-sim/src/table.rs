//! Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for, with the
//! columns the real API server's printers (and the CRDs' printer columns) give each type.

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::selector::LabelSelector;
use crate::store::{Obj, parse_rfc3339};

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// Nothing.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object (kubectl asks for it to `--sort-by` a field).
    Object,
}

impl IncludeObject {
    /// From the `includeObject` query parameter.
    pub fn parse(q: Option<&str>) -> Result<Self, String> {
        match q {
            None | Some("" | "Metadata") => Ok(Self::Metadata),
            Some("None") => Ok(Self::None),
            Some("Object") => Ok(Self::Object),
            Some(other) => Err(format!(
                "includeObject: Unsupported value: \"{other}\": supported values: \"None\", \"Metadata\", \"Object\""
            )),
        }
    }
}

fn since(ts: &Value) -> String {
    let Some(t) = ts.as_str().and_then(parse_rfc3339) else {
        return "<unknown>".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(t);
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=10_799 => format!("{}m", s / 60),
        10_800..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn age(o: &Value) -> Value {
    json!(since(&o["metadata"]["creationTimestamp"]))
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn name(o: &Value) -> Value {
    o["metadata"]["name"].clone()
}

fn or_none(v: &Value) -> Value {
    match v.as_str() {
        Some(s) if !s.is_empty() => json!(s),
        _ => json!("<none>"),
    }
}

/// A string map as `k=v,k2=v2` (a selector), or `<none>`.
fn key_values(map: &Value) -> Value {
    let pairs: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    or_none(&json!(pairs.join(",")))
}

fn int(v: &Value) -> Value {
    json!(v.as_i64().unwrap_or(0))
}

fn node_row(o: &Value) -> Vec<Value> {
    // Ready True reads Ready; False and Unknown read NotReady; no condition, Unknown.
    let mut status = match node_condition(o).as_str() {
        "True" => "Ready",
        "" => "Unknown",
        _ => "NotReady",
    }
    .to_string();
    if o["spec"]["unschedulable"].as_bool().unwrap_or(false) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<&str> = o["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    let address = |t: &str| {
        o["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == t)
            .map_or(json!("<none>"), |a| a["address"].clone())
    };
    let info = &o["status"]["nodeInfo"];
    vec![
        name(o),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        age(o),
        info["kubeletVersion"].clone(),
        address("InternalIP"),
        address("ExternalIP"),
        or_none(&info["osImage"]),
        or_none(&info["kernelVersion"]),
        or_none(&info["containerRuntimeVersion"]),
    ]
}

fn node_condition(o: &Value) -> String {
    o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

fn pod_row(o: &Value) -> Vec<Value> {
    let statuses = o["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|c| c["restartCount"].as_i64())
        .sum();
    // The printer's order: a pod being deleted reads Terminating (Unknown on a lost node).
    let phase = match (
        crate::sim::deleting(o),
        o["status"]["reason"].as_str(),
        o["status"]["phase"].as_str(),
    ) {
        (true, Some("NodeLost"), _) => "Unknown",
        (true, _, _) => "Terminating",
        (false, Some(r), _) => r,
        (false, None, p) => p.unwrap_or("Unknown"),
    };
    vec![
        name(o),
        json!(format!("{ready}/{total}")),
        json!(phase),
        json!(restarts),
        age(o),
        or_none(&o["status"]["podIP"]),
        or_none(&o["spec"]["nodeName"]),
        or_none(&o["status"]["nominatedNodeName"]),
        json!("<none>"),
    ]
}

/// Container names, images and the selector: the wide columns of workload controllers.
fn workload_wide(o: &Value) -> [Value; 3] {
    let containers = o["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let join = |f: &str| {
        containers
            .iter()
            .filter_map(|c| c[f].as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let selector = LabelSelector::from_object(&o["spec"]["selector"])
        .map(|s| s.to_string())
        .unwrap_or_default();
    [
        json!(join("name")),
        json!(join("image")),
        or_none(&json!(selector)),
    ]
}

fn with_wide(mut cells: Vec<Value>, o: &Value) -> Vec<Value> {
    cells.extend(workload_wide(o));
    cells
}

fn wide_columns() -> [Value; 3] {
    [
        col("Containers", "string", 1),
        col("Images", "string", 1),
        col("Selector", "string", 1),
    ]
}

fn service_row(o: &Value) -> Vec<Value> {
    let spec = &o["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    let ingress: Vec<&str> = o["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()))
        .collect();
    let external = match ty {
        "ExternalName" => spec["externalName"]
            .as_str()
            .unwrap_or("<none>")
            .to_string(),
        "LoadBalancer" if ingress.is_empty() => "<pending>".to_string(),
        "LoadBalancer" => ingress.join(","),
        _ => "<none>".to_string(),
    };
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    vec![
        name(o),
        json!(ty),
        or_none(&spec["clusterIP"]),
        json!(external),
        json!(if ports.is_empty() {
            "<none>".to_string()
        } else {
            ports.join(",")
        }),
        age(o),
        key_values(&spec["selector"]),
    ]
}

fn endpointslice_row(o: &Value) -> Vec<Value> {
    let ports: Vec<String> = o["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64().map(|p| p.to_string()))
        .collect();
    let addrs: Vec<&str> = o["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let endpoints = match addrs.len() {
        0 => "<none>".to_string(),
        1..=3 => addrs.join(","),
        n => format!("{} + {} more...", addrs[..3].join(","), n - 3),
    };
    vec![
        name(o),
        o["addressType"].clone(),
        json!(if ports.is_empty() {
            "<unset>".to_string()
        } else {
            ports.join(",")
        }),
        json!(endpoints),
        age(o),
    ]
}

fn pdb_row(o: &Value) -> Vec<Value> {
    let na = |v: &Value| match v {
        Value::Null => json!("N/A"),
        Value::Number(n) => json!(n.to_string()),
        v => v.clone(),
    };
    vec![
        name(o),
        na(&o["spec"]["minAvailable"]),
        na(&o["spec"]["maxUnavailable"]),
        int(&o["status"]["disruptionsAllowed"]),
        age(o),
    ]
}

fn event_row(o: &Value) -> Vec<Value> {
    let last = match &o["lastTimestamp"] {
        Value::Null => &o["eventTime"],
        t => t,
    };
    let inv = &o["involvedObject"];
    let object = format!(
        "{}/{}",
        inv["kind"].as_str().unwrap_or("").to_lowercase(),
        inv["name"].as_str().unwrap_or("")
    );
    let mut source = o["source"]["component"].as_str().unwrap_or("").to_string();
    if let Some(h) = o["source"]["host"].as_str() {
        source = format!("{source}, {h}");
    }
    vec![
        json!(since(last)),
        o["type"].clone(),
        o["reason"].clone(),
        json!(object),
        json!(inv["fieldPath"].as_str().unwrap_or("")),
        json!(source),
        json!(o["message"].as_str().unwrap_or("").trim()),
        json!(since(&o["firstTimestamp"])),
        int(&o["count"]),
        name(o),
    ]
}

fn machine_deployment_row(o: &Value) -> Vec<Value> {
    let s = &o["status"];
    vec![
        name(o),
        o["spec"]["clusterName"].clone(),
        int(&s["replicas"]),
        int(&s["readyReplicas"]),
        int(&s["updatedReplicas"]),
        int(&s["unavailableReplicas"]),
        s["phase"].clone(),
        age(o),
        o["spec"]["template"]["spec"]["version"].clone(),
    ]
}

type RowFn = fn(&Value) -> Vec<Value>;

/// The columns and row printer for a kind.
fn printer(kind: &str) -> (Vec<Value>, RowFn) {
    let c = col;
    match kind {
        "Node" => (
            vec![
                c("Name", "string", 0),
                c("Status", "string", 0),
                c("Roles", "string", 0),
                c("Age", "string", 0),
                c("Version", "string", 0),
                c("Internal-IP", "string", 1),
                c("External-IP", "string", 1),
                c("OS-Image", "string", 1),
                c("Kernel-Version", "string", 1),
                c("Container-Runtime", "string", 1),
            ],
            node_row,
        ),
        "Pod" => (
            vec![
                c("Name", "string", 0),
                c("Ready", "string", 0),
                c("Status", "string", 0),
                c("Restarts", "string", 0),
                c("Age", "string", 0),
                c("IP", "string", 1),
                c("Node", "string", 1),
                c("Nominated Node", "string", 1),
                c("Readiness Gates", "string", 1),
            ],
            pod_row,
        ),
        "Namespace" => (
            vec![
                c("Name", "string", 0),
                c("Status", "string", 0),
                c("Age", "string", 0),
            ],
            |o| vec![name(o), o["status"]["phase"].clone(), age(o)],
        ),
        "Deployment" => (
            [
                vec![
                    c("Name", "string", 0),
                    c("Ready", "string", 0),
                    c("Up-to-date", "integer", 0),
                    c("Available", "integer", 0),
                    c("Age", "string", 0),
                ],
                wide_columns().to_vec(),
            ]
            .concat(),
            |o| {
                let s = &o["status"];
                let want = o["spec"]["replicas"].as_i64().unwrap_or(1);
                let ready = s["readyReplicas"].as_i64().unwrap_or(0);
                with_wide(
                    vec![
                        name(o),
                        json!(format!("{ready}/{want}")),
                        int(&s["updatedReplicas"]),
                        int(&s["availableReplicas"]),
                        age(o),
                    ],
                    o,
                )
            },
        ),
        "ReplicaSet" => (
            [
                vec![
                    c("Name", "string", 0),
                    c("Desired", "integer", 0),
                    c("Current", "integer", 0),
                    c("Ready", "integer", 0),
                    c("Age", "string", 0),
                ],
                wide_columns().to_vec(),
            ]
            .concat(),
            |o| {
                let s = &o["status"];
                with_wide(
                    vec![
                        name(o),
                        json!(o["spec"]["replicas"].as_i64().unwrap_or(1)),
                        int(&s["replicas"]),
                        int(&s["readyReplicas"]),
                        age(o),
                    ],
                    o,
                )
            },
        ),
        "DaemonSet" => (
            [
                vec![
                    c("Name", "string", 0),
                    c("Desired", "integer", 0),
                    c("Current", "integer", 0),
                    c("Ready", "integer", 0),
                    c("Up-to-date", "integer", 0),
                    c("Available", "integer", 0),
                    c("Node Selector", "string", 0),
                    c("Age", "string", 0),
                ],
                wide_columns().to_vec(),
            ]
            .concat(),
            |o| {
                let s = &o["status"];
                with_wide(
                    vec![
                        name(o),
                        int(&s["desiredNumberScheduled"]),
                        int(&s["currentNumberScheduled"]),
                        int(&s["numberReady"]),
                        int(&s["updatedNumberScheduled"]),
                        int(&s["numberAvailable"]),
                        key_values(&o["spec"]["template"]["spec"]["nodeSelector"]),
                        age(o),
                    ],
                    o,
                )
            },
        ),
        "Service" => (
            vec![
                c("Name", "string", 0),
                c("Type", "string", 0),
                c("Cluster-IP", "string", 0),
                c("External-IP", "string", 0),
                c("Port(s)", "string", 0),
                c("Age", "string", 0),
                c("Selector", "string", 1),
            ],
            service_row,
        ),
        "EndpointSlice" => (
            vec![
                c("Name", "string", 0),
                c("AddressType", "string", 0),
                c("Ports", "string", 0),
                c("Endpoints", "string", 0),
                c("Age", "string", 0),
            ],
            endpointslice_row,
        ),
        "PodDisruptionBudget" => (
            vec![
                c("Name", "string", 0),
                c("Min Available", "string", 0),
                c("Max Unavailable", "string", 0),
                c("Allowed Disruptions", "integer", 0),
                c("Age", "string", 0),
            ],
            pdb_row,
        ),
        "Event" => (
            vec![
                c("Last Seen", "string", 0),
                c("Type", "string", 0),
                c("Reason", "string", 0),
                c("Object", "string", 0),
                c("Subobject", "string", 1),
                c("Source", "string", 1),
                c("Message", "string", 0),
                c("First Seen", "string", 1),
                c("Count", "string", 1),
                c("Name", "string", 1),
            ],
            event_row,
        ),
        "Secret" => (
            vec![
                c("Name", "string", 0),
                c("Type", "string", 0),
                c("Data", "string", 0),
                c("Age", "string", 0),
            ],
            |o| {
                let n = o["data"].as_object().map_or(0, |d| d.len());
                let t = o["type"].as_str().unwrap_or("Opaque");
                vec![name(o), json!(t), json!(n), age(o)]
            },
        ),
        "ConfigMap" => (
            vec![
                c("Name", "string", 0),
                c("Data", "string", 0),
                c("Age", "string", 0),
            ],
            |o| {
                let n = o["data"].as_object().map_or(0, |d| d.len())
                    + o["binaryData"].as_object().map_or(0, |d| d.len());
                vec![name(o), json!(n), age(o)]
            },
        ),
        "Lease" => (
            vec![
                c("Name", "string", 0),
                c("Holder", "string", 0),
                c("Age", "string", 0),
            ],
            |o| {
                vec![
                    name(o),
                    json!(o["spec"]["holderIdentity"].as_str().unwrap_or("")),
                    age(o),
                ]
            },
        ),
        "ResourceSlice" => (
            vec![
                c("Name", "string", 0),
                c("Node", "string", 0),
                c("Driver", "string", 0),
                c("Pool", "string", 0),
                c("Age", "string", 0),
            ],
            |o| {
                let s = &o["spec"];
                vec![
                    name(o),
                    or_none(&s["nodeName"]),
                    s["driver"].clone(),
                    s["pool"]["name"].clone(),
                    age(o),
                ]
            },
        ),
        "ResourceClaim" => (
            vec![
                c("Name", "string", 0),
                c("State", "string", 0),
                c("Age", "string", 0),
            ],
            |o| {
                let s = &o["status"];
                let mut state = Vec::new();
                if crate::sim::deleting(o) {
                    state.push("deleted");
                }
                if s["allocation"].is_object() {
                    state.push("allocated");
                }
                if s["reservedFor"].as_array().is_some_and(|r| !r.is_empty()) {
                    state.push("reserved");
                }
                if state.is_empty() {
                    state.push("pending");
                }
                vec![name(o), json!(state.join(",")), age(o)]
            },
        ),
        // Cluster API's printer columns for v1beta1 MachineDeployments.
        "MachineDeployment" => (
            vec![
                c("Name", "string", 0),
                c("Cluster", "string", 0),
                c("Replicas", "integer", 0),
                c("Ready", "integer", 0),
                c("Updated", "integer", 0),
                c("Unavailable", "integer", 0),
                c("Phase", "string", 0),
                c("Age", "date", 0),
                c("Version", "string", 0),
            ],
            machine_deployment_row,
        ),
        // The mcs-api CRD's printer columns.
        "ServiceImport" => (
            vec![
                c("Name", "string", 0),
                c("Type", "string", 0),
                c("IP", "string", 0),
                c("Age", "date", 0),
            ],
            |o| {
                let ips: Vec<&str> = o["spec"]["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                vec![
                    name(o),
                    o["spec"]["type"].clone(),
                    json!(format!("[{}]", ips.join(","))),
                    age(o),
                ]
            },
        ),
        // ServiceExport (its CRD names Age only), DeviceClass and anything else: the default.
        _ => (vec![c("Name", "string", 0), c("Age", "string", 0)], |o| {
            vec![name(o), age(o)]
        }),
    }
}

/// One row for an object.
fn row(print: RowFn, o: &Value, include: IncludeObject) -> Value {
    let mut r = json!({"cells": print(o)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]});
        }
        IncludeObject::Object => r["object"] = o.clone(),
    }
    r
}

/// A Table of `items` for `kubectl get`; `continue_token` keeps a paged list going.
pub fn table(
    r: &ResourceType,
    items: &[Obj],
    rv: &Value,
    continue_token: Option<&str>,
    include: IncludeObject,
) -> Value {
    let (columns, print) = printer(r.kind);
    let rows: Vec<Value> = items.iter().map(|o| row(print, o, include)).collect();
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// One watch event's object as a Table of one row; only the first event of a watch carries
/// the column definitions, as on a real server.
pub fn watch_table(r: &ResourceType, o: &Value, first: bool, include: IncludeObject) -> Value {
    let (columns, print) = printer(r.kind);
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": o["metadata"]["resourceVersion"]},
        "rows": [row(print, o, include)],
    });
    if first {
        t["columnDefinitions"] = json!(columns);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{RESOURCES, idx};
    use std::sync::Arc;

    #[test]
    fn columns_match_their_cells() {
        for r in RESOURCES.iter() {
            let (columns, print) = printer(r.kind);
            let cells = print(&json!({"metadata": {"name": "x"}}));
            assert_eq!(columns.len(), cells.len(), "{}", r.kind);
        }
    }

    #[test]
    fn rows_carry_what_include_object_asks() {
        let pdb = Arc::new(
            json!({"metadata": {"name": "llm"}, "spec": {"minAvailable": 2},
            "status": {"disruptionsAllowed": 0}}),
        );
        let t = table(
            &RESOURCES[idx::PDBS],
            std::slice::from_ref(&pdb),
            &json!("7"),
            Some("7/ns/llm"),
            IncludeObject::Object,
        );
        assert_eq!(t["metadata"]["continue"], "7/ns/llm");
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["llm", "2", "N/A", 0, t["rows"][0]["cells"][4]])
        );
        assert_eq!(t["rows"][0]["object"]["spec"]["minAvailable"], 2);
        let t = table(
            &RESOURCES[idx::PDBS],
            std::slice::from_ref(&pdb),
            &json!("7"),
            None,
            IncludeObject::None,
        );
        assert!(t["rows"][0].get("object").is_none());
        let w = watch_table(&RESOURCES[idx::PDBS], &pdb, false, IncludeObject::Metadata);
        assert!(w.get("columnDefinitions").is_none());
        assert_eq!(w["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert!(IncludeObject::parse(Some("All")).is_err());
    }
}
