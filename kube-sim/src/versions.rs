//! Groups served in several versions, and the conversion between them.
//!
//! - `resource.k8s.io`: the versions follow the cluster's Kubernetes version as on a real API
//!   server. Objects are stored as `v1`; a client of an older version reads and writes its own
//!   shape (`v1beta1` nests a device's fields under `basic`, and a claim request's fields
//!   beside its name).
//! - `multicluster.x-k8s.io` (MCS): the CRDs of mcs-api v0.5 serve `v1beta1` (storage) and
//!   `v1alpha1` with the same schema, as a CRD with conversion strategy `None` does: only
//!   `apiVersion` changes. A scenario can install the older CRDs (`v1alpha1` only).

use serde_json::{Map, Value, json};

/// The DRA API group.
pub const DRA_GROUP: &str = "resource.k8s.io";

/// The version objects are stored in.
pub const STORAGE: &str = "v1";

/// `resource.k8s.io` versions served by Kubernetes `k8s` (`v1.33.2`): v1 from 1.34 (the
/// betas are off by default there), v1beta1 and v1beta2 on 1.33, v1beta1 on 1.32, none
/// before.
pub fn dra_versions(k8s: &str) -> &'static [&'static str] {
    let minor: u32 = k8s
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(u32::MAX);
    match minor {
        34.. => &["v1"],
        33 => &["v1beta2", "v1beta1"],
        32 => &["v1beta1"],
        _ => &[],
    }
}

/// The MCS API group.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";

/// The version MCS objects are stored in.
pub const MCS_STORAGE: &str = "v1beta1";

/// MCS versions served: both by default, or those a scenario names (older CRDs).
pub fn mcs_versions(named: &[String]) -> Vec<&'static str> {
    ["v1beta1", "v1alpha1"]
        .into_iter()
        .filter(|v| named.is_empty() || named.iter().any(|n| n == v))
        .collect()
}

/// The storage version of a multi-version group.
pub fn storage_of(group: &str) -> &'static str {
    match group {
        MCS_GROUP => MCS_STORAGE,
        _ => STORAGE,
    }
}

fn rename_in(obj: &mut Value, group: &str, version: &str) {
    if let Some(av) = obj["apiVersion"].as_str()
        && av.starts_with(group)
        && av[group.len()..].starts_with('/')
    {
        obj["apiVersion"] = json!(format!("{group}/{version}"));
    }
}

fn rename_api_version(obj: &mut Value, version: &str) {
    rename_in(obj, DRA_GROUP, version);
}

/// Move every field but `keep` into `obj[under]` (v1 → v1beta1 shapes).
fn nest(obj: &mut Value, keep: &str, under: &str) {
    let Some(m) = obj.as_object_mut() else { return };
    let kept = m.remove(keep);
    let rest: Map<String, Value> = std::mem::take(m);
    if let Some(k) = kept {
        m.insert(keep.into(), k);
    }
    m.insert(under.into(), Value::Object(rest));
}

/// Lift `obj[under]`'s fields beside `keep` (v1beta1 → v1 shapes).
fn unnest(obj: &mut Value, under: &str) {
    let Some(m) = obj.as_object_mut() else { return };
    if let Some(Value::Object(inner)) = m.remove(under) {
        m.extend(inner);
    }
}

/// A stored (`v1`) object as a client of `version` sees it.
pub fn to_version(obj: &mut Value, version: &str) {
    if version == STORAGE {
        return;
    }
    rename_api_version(obj, version);
    if version != "v1beta1" {
        return; // v1beta2 has v1's shape.
    }
    match obj["kind"].as_str() {
        Some("ResourceSlice") => {
            for d in obj["spec"]["devices"].as_array_mut().into_iter().flatten() {
                nest(d, "name", "basic");
            }
        }
        Some("ResourceClaim") => {
            for r in obj["spec"]["devices"]["requests"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                unnest(r, "exactly");
            }
        }
        _ => {}
    }
}

/// An object a client of `version` wrote, as stored (`v1`).
pub fn to_storage(obj: &mut Value, version: &str) {
    if version == STORAGE {
        return;
    }
    rename_api_version(obj, STORAGE);
    if version != "v1beta1" {
        return;
    }
    match obj["kind"].as_str() {
        Some("ResourceSlice") => {
            for d in obj["spec"]["devices"].as_array_mut().into_iter().flatten() {
                unnest(d, "basic");
            }
        }
        Some("ResourceClaim") => {
            for r in obj["spec"]["devices"]["requests"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                nest(r, "name", "exactly");
            }
        }
        _ => {}
    }
}

/// A stored object of `group` as a client of `version` sees it.
pub fn to_version_of(obj: &mut Value, group: &str, version: &str) {
    match group {
        MCS_GROUP => rename_in(obj, MCS_GROUP, version),
        _ => to_version(obj, version),
    }
}

/// An object of `group` a client of `version` wrote, as stored.
pub fn to_storage_of(obj: &mut Value, group: &str, version: &str) {
    match group {
        MCS_GROUP => rename_in(obj, MCS_GROUP, MCS_STORAGE),
        _ => to_storage(obj, version),
    }
}

/// A response document (an object, a list, or a watch event) for a client of `version`.
pub fn convert_doc(doc: &mut Value, group: &str, version: &str) {
    if let Some(items) = doc["items"].as_array_mut() {
        for i in items {
            to_version_of(i, group, version);
        }
        rename_in(doc, group, version);
    } else if doc.get("object").is_some() && doc.get("type").is_some() {
        to_version_of(&mut doc["object"], group, version);
    } else {
        to_version_of(doc, group, version);
    }
}

/// The `/apis` or `/apis/{group}` document with `group`'s versions cut to those served (and
/// the group gone when none is).
pub fn filter_groups(doc: &mut Value, group: &str, served: &[&str]) {
    let fix = |g: &mut Value| {
        let versions: Vec<Value> = served
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        if let Some(first) = versions.first() {
            g["preferredVersion"] = first.clone();
        }
        g["versions"] = json!(versions);
    };
    if let Some(groups) = doc["groups"].as_array_mut() {
        groups.retain(|g| g["name"] != group || !served.is_empty());
        for g in groups.iter_mut().filter(|g| g["name"] == group) {
            fix(g);
        }
    } else if doc["name"] == group {
        fix(doc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_versions_decide_what_is_served() {
        // (Kubernetes version, DRA versions)
        let cases: [(&str, &[&str]); 5] = [
            ("v1.35.0", &["v1"]),
            ("v1.34.2", &["v1"]),
            ("v1.33.5", &["v1beta2", "v1beta1"]),
            ("v1.32.9", &["v1beta1"]),
            ("v1.31.4", &[]),
        ];
        for (k8s, want) in cases {
            assert_eq!(dra_versions(k8s), want, "{k8s}");
        }
    }

    #[test]
    fn v1beta1_nests_device_fields_and_round_trips() {
        let stored = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "spec": {"devices": [{"name": "gpu-0", "attributes": {"type": {"string": "gpu"}},
                                  "capacity": {"memory": {"value": "80Gi"}}}]}});
        let mut old = stored.clone();
        to_version(&mut old, "v1beta1");
        assert_eq!(old["apiVersion"], "resource.k8s.io/v1beta1");
        assert_eq!(old["spec"]["devices"][0]["name"], "gpu-0");
        assert_eq!(
            old["spec"]["devices"][0]["basic"]["attributes"]["type"]["string"],
            "gpu"
        );
        let mut back = old.clone();
        to_storage(&mut back, "v1beta1");
        assert_eq!(back, stored);
        let mut beta2 = stored.clone();
        to_version(&mut beta2, "v1beta2");
        assert_eq!(beta2["spec"], stored["spec"], "v1beta2 has v1's shape");
        let claim = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 2}}]}}});
        let mut old = claim.clone();
        to_version(&mut old, "v1beta1");
        assert_eq!(
            old["spec"]["devices"]["requests"][0]["deviceClassName"],
            "gpu.nvidia.com"
        );
        to_storage(&mut old, "v1beta1");
        assert_eq!(old, claim);
    }

    #[test]
    fn discovery_lists_only_served_versions() {
        let mut groups = json!({"groups": [
            {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}]},
            {"name": DRA_GROUP, "versions": [{"groupVersion": "resource.k8s.io/v1", "version": "v1"}]}]});
        let mut old = groups.clone();
        filter_groups(&mut old, DRA_GROUP, &["v1beta2", "v1beta1"]);
        assert_eq!(old["groups"][1]["preferredVersion"]["version"], "v1beta2");
        assert_eq!(old["groups"][1]["versions"].as_array().unwrap().len(), 2);
        filter_groups(&mut groups, DRA_GROUP, &[]);
        assert_eq!(
            groups["groups"].as_array().unwrap().len(),
            1,
            "no DRA group before 1.32"
        );
    }
}
