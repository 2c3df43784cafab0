//! The three PATCH content types: JSON merge patch, JSON patch, and strategic merge patch.
//!
//! Strategic merge patch merges the lists whose Go fields carry `patchStrategy:"merge"` in the
//! built-in types (containers, volumes, env, ports, conditions, addresses, ownerReferences,
//! finalizers...) by their `patchMergeKey`, plus the `$patch`, `$retainKeys`,
//! `$deleteFromPrimitiveList` and `$setElementOrder` directives. Every other list is replaced
//! whole, as the API server does: among them `spec.taints` of a Node and `tolerations`, which
//! have no patch strategy.

use serde_json::{Map, Value};

/// The PATCH body format, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386)
    Merge,
    /// `application/json-patch+json` (RFC 6902)
    Json,
    /// `application/strategic-merge-patch+json`
    Strategic,
}

impl PatchKind {
    /// Map a content type to a patch kind; `None` for unsupported ones (e.g. server-side apply).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            _ => None,
        }
    }
}

/// Apply `patch` (already parsed JSON) to `doc`.
pub fn apply(kind: PatchKind, doc: &mut Value, patch: &Value) -> Result<(), String> {
    match kind {
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err("a merge patch must be a JSON object".into());
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| format!("invalid JSON patch: {e}"))?;
            json_patch::patch(doc, &ops).map_err(|e| format!("the JSON patch failed: {e}"))
        }
        PatchKind::Strategic => {
            if !patch.is_object() {
                return Err("a strategic merge patch must be a JSON object".into());
            }
            strategic(doc, patch);
            Ok(())
        }
    }
}

/// The merge key of a list field of the built-in types, by field name; `None` for lists
/// that are replaced. Only lists of objects merge by key.
fn merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    if !sample.is_some_and(Value::is_object) {
        return None;
    }
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" | "podIPs" | "hostIPs" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            if sample.is_some_and(|s| s.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// Lists of scalars that merge as sets (`metadata.finalizers`, a Node's `spec.podCIDRs`).
fn is_primitive_merge_list(field: &str) -> bool {
    matches!(field, "finalizers" | "podCIDRs")
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn strategic(doc: &mut Value, patch: &Value) {
    let Some(pm) = patch.as_object() else {
        *doc = patch.clone();
        return;
    };
    match pm.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *doc = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *doc = Value::Null;
            return;
        }
        _ => {}
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let target = doc.as_object_mut().expect("object");
    if let Some(keep) = pm.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in pm {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (target.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            target.remove(k);
            continue;
        }
        match (target.get_mut(k), v) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => strategic(existing, v),
            (Some(Value::Array(existing)), Value::Array(items)) => {
                if is_primitive_merge_list(k) {
                    for item in items {
                        if !existing.contains(item) {
                            existing.push(item.clone());
                        }
                    }
                } else if let Some(key) = merge_key(k, items.first().or(existing.first())) {
                    merge_list(existing, items, key);
                } else {
                    *existing = items.iter().map(strip_directives).collect();
                }
            }
            _ => {
                target.insert(k.clone(), strip_directives(v));
            }
        }
    }
}

fn merge_list(existing: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let id = item.get(key).cloned();
        let pos = id
            .as_ref()
            .and_then(|id| existing.iter().position(|e| e.get(key) == Some(id)));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut existing[i], item),
            (None, false) => existing.push(strip_directives(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cordon_and_label_patches() {
        let mut node = json!({"metadata": {"name": "n", "labels": {"a": "1"}}, "spec": {}});
        apply(
            PatchKind::Strategic,
            &mut node,
            &json!({"spec": {"unschedulable": true}}),
        )
        .unwrap();
        assert_eq!(node["spec"]["unschedulable"], true);
        apply(
            PatchKind::Merge,
            &mut node,
            &json!({"metadata": {"labels": {"b": "2", "a": null}}}),
        )
        .unwrap();
        assert_eq!(node["metadata"]["labels"], json!({"b": "2"}));
        apply(
            PatchKind::Json,
            &mut node,
            &json!([{"op": "replace", "path": "/spec/unschedulable", "value": false}]),
        )
        .unwrap();
        assert_eq!(node["spec"]["unschedulable"], false);
        let err = apply(
            PatchKind::Json,
            &mut node,
            &json!([{"op": "remove", "path": "/nope"}]),
        );
        assert!(err.is_err());
    }

    #[test]
    fn strategic_lists_merge_by_key() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}
        ]}, "metadata": {"finalizers": ["f1"]}});
        apply(
            PatchKind::Strategic,
            &mut pod,
            &json!({
                "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                "spec": {"containers": [{"name": "b", "image": "y:2"}, {"name": "c", "image": "z"}]},
                "metadata": {"finalizers": ["f2"]}
            }),
        )
        .unwrap();
        let c = &pod["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 3);
        assert_eq!(c[0]["image"], "x:1");
        assert_eq!(c[1]["image"], "y:2");
        assert_eq!(pod["metadata"]["finalizers"], json!(["f1", "f2"]));
        apply(
            PatchKind::Strategic,
            &mut pod,
            &json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]},
                    "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        )
        .unwrap();
        assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 2);
        assert_eq!(pod["metadata"]["finalizers"], json!(["f2"]));
    }

    #[test]
    fn lists_without_a_patch_strategy_are_replaced() {
        // `kubectl taint nodes n gpu-':` sends the whole remaining list; the Node type's
        // taints have no merge key, so the list is replaced, not merged.
        let mut node = json!({"spec": {"taints": [
            {"key": "gpu", "effect": "NoSchedule"}, {"key": "zone", "effect": "NoExecute"}
        ], "podCIDRs": ["10.0.0.0/24"]}});
        apply(
            PatchKind::Strategic,
            &mut node,
            &json!({"spec": {"taints": [{"key": "zone", "effect": "NoExecute"}]}}),
        )
        .unwrap();
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "zone", "effect": "NoExecute"}])
        );
        // Tolerations too; lists of scalars merge only where the type says so.
        let mut pod = json!({"spec": {"tolerations": [{"key": "a"}, {"key": "b"}],
                                       "containers": [{"name": "c", "args": ["x", "y"]}]}});
        apply(
            PatchKind::Strategic,
            &mut pod,
            &json!({"spec": {"tolerations": [{"key": "c"}],
                             "containers": [{"name": "c", "args": ["z"]}]}}),
        )
        .unwrap();
        assert_eq!(pod["spec"]["tolerations"], json!([{"key": "c"}]));
        assert_eq!(pod["spec"]["containers"][0]["args"], json!(["z"]));
        apply(
            PatchKind::Strategic,
            &mut node,
            &json!({"spec": {"podCIDRs": ["10.0.1.0/24"]}}),
        )
        .unwrap();
        assert_eq!(
            node["spec"]["podCIDRs"],
            json!(["10.0.0.0/24", "10.0.1.0/24"])
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/strategic-merge-patch+json; charset=utf-8"),
            Some(PatchKind::Strategic)
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml"),
            None
        );
    }
}
