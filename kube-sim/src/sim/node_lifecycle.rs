//! The node lifecycle controller's taints: `unschedulable` for a cordoned node, `not-ready`
//! while the kubelet reports NotReady, `unreachable` when it stops reporting (Ready Unknown),
//! as TaintNodesByCondition and the NoExecute taint manager write them.

use super::*;

/// Taint keys this controller owns; other taints on a node are left as they are.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
/// Set while the node's Ready condition is False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// Set while the node's Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// The system taints a node should carry, as (key, effect).
pub fn system_taints(node: &Value) -> Vec<(&'static str, &'static str)> {
    let mut want = Vec::new();
    if node["spec"]["unschedulable"].as_bool().unwrap_or(false) {
        want.push((UNSCHEDULABLE_TAINT, "NoSchedule"));
    }
    match condition(node, "Ready").as_deref() {
        Some("True") => {}
        Some("Unknown") => {
            want.push((UNREACHABLE_TAINT, "NoSchedule"));
            want.push((UNREACHABLE_TAINT, "NoExecute"));
        }
        _ => {
            want.push((NOT_READY_TAINT, "NoSchedule"));
            want.push((NOT_READY_TAINT, "NoExecute"));
        }
    }
    want
}

impl SimState {
    pub(super) fn node_lifecycle(&mut self) {
        for node in self.all(idx::NODES) {
            let owned = [UNSCHEDULABLE_TAINT, NOT_READY_TAINT, UNREACHABLE_TAINT];
            let current: Vec<Value> = node["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let have: Vec<(&str, &str)> = current
                .iter()
                .filter(|t| owned.contains(&t["key"].as_str().unwrap_or("")))
                .map(|t| {
                    (
                        t["key"].as_str().unwrap_or(""),
                        t["effect"].as_str().unwrap_or(""),
                    )
                })
                .collect();
            let want = system_taints(&node);
            if have.len() == want.len() && want.iter().all(|w| have.contains(w)) {
                continue;
            }
            let now = now_rfc3339();
            let mut taints: Vec<Value> = current
                .iter()
                .filter(|t| {
                    let k = t["key"].as_str().unwrap_or("");
                    let e = t["effect"].as_str().unwrap_or("");
                    !owned.contains(&k) || want.contains(&(k, e))
                })
                .cloned()
                .collect();
            for (k, e) in &want {
                if !have.contains(&(*k, *e)) {
                    let mut t = json!({"key": k, "effect": e});
                    if *e == "NoExecute" {
                        t["timeAdded"] = json!(now);
                    }
                    taints.push(t);
                }
            }
            let mut n = (*node).clone();
            if taints.is_empty() {
                n["spec"].as_object_mut().map(|s| s.remove("taints"));
            } else {
                n["spec"]["taints"] = json!(taints);
            }
            let name = meta_str(&node, "name").to_string();
            let _ = self.store.update(idx::NODES, "", &name, n, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_has_its_taints() {
        let ready =
            json!({"spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(system_taints(&ready).is_empty());
        let mut cordoned = ready.clone();
        cordoned["spec"]["unschedulable"] = json!(true);
        assert_eq!(
            system_taints(&cordoned),
            vec![(UNSCHEDULABLE_TAINT, "NoSchedule")]
        );
        let silent =
            json!({"spec": {}, "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}});
        assert_eq!(
            system_taints(&silent),
            vec![
                (UNREACHABLE_TAINT, "NoSchedule"),
                (UNREACHABLE_TAINT, "NoExecute")
            ]
        );
        let booting =
            json!({"spec": {}, "status": {"conditions": [{"type": "Ready", "status": "False"}]}});
        assert_eq!(system_taints(&booting)[0], (NOT_READY_TAINT, "NoSchedule"));
    }
}
