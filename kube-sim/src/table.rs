//! Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for.

use serde_json::{Value, json};

use crate::resources::ResourceType;
use crate::store::{Obj, parse_rfc3339};

fn age(o: &Value) -> String {
    let Some(created) = o["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339)
    else {
        return "<unknown>".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn node_row(o: &Value) -> Vec<Value> {
    let ready = crate::sim::node_ready(o);
    let mut status = if ready {
        "Ready".to_string()
    } else {
        "NotReady".to_string()
    };
    if o["spec"]["unschedulable"].as_bool().unwrap_or(false) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<&str> = o["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };
    vec![
        o["metadata"]["name"].clone(),
        json!(status),
        json!(roles),
        json!(age(o)),
        o["status"]["nodeInfo"]["kubeletVersion"].clone(),
        o["status"]["addresses"][0]["address"].clone(),
    ]
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
    let phase = o["status"]["phase"].as_str().unwrap_or("Unknown");
    vec![
        o["metadata"]["name"].clone(),
        json!(format!("{ready}/{total}")),
        json!(phase),
        json!(restarts),
        json!(age(o)),
        json!(o["status"]["podIP"].as_str().unwrap_or("<none>")),
        json!(o["spec"]["nodeName"].as_str().unwrap_or("<none>")),
    ]
}

type RowFn = fn(&Value) -> Vec<Value>;

/// A Table of `items` for `kubectl get`.
pub fn table(r: &ResourceType, items: &[Obj], rv: &Value) -> Value {
    let (columns, row): (Vec<Value>, RowFn) = match r.kind {
        "Node" => (
            vec![
                col("Name", "string", 0),
                col("Status", "string", 0),
                col("Roles", "string", 0),
                col("Age", "string", 0),
                col("Version", "string", 0),
                col("Internal-IP", "string", 1),
            ],
            node_row,
        ),
        "Pod" => (
            vec![
                col("Name", "string", 0),
                col("Ready", "string", 0),
                col("Status", "string", 0),
                col("Restarts", "integer", 0),
                col("Age", "string", 0),
                col("IP", "string", 1),
                col("Node", "string", 1),
            ],
            pod_row,
        ),
        // The mcs-api CRD's printer columns.
        "ServiceImport" => (
            vec![
                col("Name", "string", 0),
                col("Type", "string", 0),
                col("IP", "string", 0),
                col("Age", "string", 0),
            ],
            |o| {
                let ips: Vec<&str> = o["spec"]["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                vec![
                    o["metadata"]["name"].clone(),
                    o["spec"]["type"].clone(),
                    json!(format!("[{}]", ips.join(","))),
                    json!(age(o)),
                ]
            },
        ),
        _ => (
            vec![col("Name", "string", 0), col("Age", "string", 0)],
            |o| vec![o["metadata"]["name"].clone(), json!(age(o))],
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({
                "cells": row(o),
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": columns,
        "rows": rows,
    })
}
