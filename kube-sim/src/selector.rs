//! Label and field selectors, in the string form of list/watch query parameters and in the
//! object form (`matchLabels` / `matchExpressions`) of PDBs, Deployments and Services.

use serde_json::Value;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelReq {
    /// `key=value` / `key==value`
    Eq(String, String),
    /// `key!=value` (also true when the key is absent)
    NotEq(String, String),
    /// `key in (a,b)`
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent)
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    NotExists(String),
    /// `key>N`: the label is an integer greater than N (false when absent).
    Gt(String, i64),
    /// `key<N`: the label is an integer less than N (false when absent).
    Lt(String, i64),
}

/// A conjunction of label requirements; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<LabelReq>);

impl LabelSelector {
    /// Parse the query-string form, e.g. `app=web,tier in (a,b),!legacy`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_label_req(part)?);
        }
        Ok(Self(reqs))
    }

    /// Build from a `metav1.LabelSelector` object. `None` input means "matches nothing".
    pub fn from_object(sel: &Value) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in ml {
                reqs.push(LabelReq::Eq(
                    k.clone(),
                    v.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                reqs.push(match e["operator"].as_str().unwrap_or_default() {
                    "In" => LabelReq::In(key, values),
                    "NotIn" => LabelReq::NotIn(key, values),
                    "Exists" => LabelReq::Exists(key),
                    "DoesNotExist" => LabelReq::NotExists(key),
                    other => {
                        return Err(format!(
                            "\"{other}\" is not a valid label selector operator"
                        ));
                    }
                });
            }
        }
        Ok(Self(reqs))
    }

    /// Build from a plain `key: value` map (Service `spec.selector`).
    pub fn from_map(map: &Value) -> Self {
        Self(
            map.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            LabelReq::Eq(k.clone(), v.as_str().unwrap_or_default().into())
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.matches_labels(labels)
    }

    /// Whether a labels map satisfies every requirement.
    pub fn matches_labels(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Gt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            LabelReq::Lt(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }

    /// Whether the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The string form, as `metav1.FormatLabelSelector` writes it (requirements sorted by key).
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = |r: &LabelReq| match r {
            LabelReq::Eq(k, _)
            | LabelReq::NotEq(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k)
            | LabelReq::Gt(k, _)
            | LabelReq::Lt(k, _) => k.clone(),
        };
        let mut reqs = self.0.clone();
        reqs.sort_by_key(key);
        let parts: Vec<String> = reqs
            .iter()
            .map(|r| match r {
                LabelReq::Eq(k, v) => format!("{k}={v}"),
                LabelReq::NotEq(k, v) => format!("{k}!={v}"),
                LabelReq::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                LabelReq::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                LabelReq::Exists(k) => k.clone(),
                LabelReq::NotExists(k) => format!("!{k}"),
                LabelReq::Gt(k, n) => format!("{k}>{n}"),
                LabelReq::Lt(k, n) => format!("{k}<{n}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Split on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn parse_label_req(part: &str) -> Result<LabelReq, String> {
    let bad = |why: &str| format!("unable to parse requirement: {part:?}: {why}");
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(LabelReq::NotExists(key.into()))
        } else {
            Err(bad("invalid label key"))
        };
    }
    for (op, greater) in [(">", true), ("<", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(bad("invalid label key"));
            }
            let n = v
                .parse::<i64>()
                .map_err(|_| bad("for 'Gt', 'Lt' operators, the value must be an integer"))?;
            return Ok(if greater {
                LabelReq::Gt(k.into(), n)
            } else {
                LabelReq::Lt(k.into(), n)
            });
        }
    }
    for (op, ctor) in [("!=", 0), ("==", 1), ("=", 1)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(bad("invalid label key"));
            }
            return Ok(if ctor == 0 {
                LabelReq::NotEq(k.into(), v.into())
            } else {
                LabelReq::Eq(k.into(), v.into())
            });
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0].trim();
        let rest = words[1].trim();
        let (neg, list) = if let Some(l) = rest.strip_prefix("notin") {
            (true, l)
        } else if let Some(l) = rest.strip_prefix("in") {
            (false, l)
        } else {
            return Err(bad("expected 'in' or 'notin'"));
        };
        let list = list.trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| bad("expected a parenthesised list of values"))?;
        if !valid_key(key) {
            return Err(bad("invalid label key"));
        }
        let values: Vec<String> = inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        return Ok(if neg {
            LabelReq::NotIn(key.into(), values)
        } else {
            LabelReq::In(key.into(), values)
        });
    }
    if valid_key(part) {
        Ok(LabelReq::Exists(part.into()))
    } else {
        Err(bad("invalid label key"))
    }
}

/// One field requirement: `path=value` or `path!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReq {
    /// Dotted field label such as `spec.nodeName`.
    pub field: String,
    /// Expected value.
    pub value: String,
    /// `!=` instead of `=`.
    pub negate: bool,
}

/// A conjunction of field requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldReq>);

impl FieldSelector {
    /// Parse `a=b,c!=d`. `supported` says which field labels the resource type allows.
    pub fn parse(s: &str, supported: impl Fn(&str) -> bool) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !supported(field) {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push(FieldReq {
                field: field.into(),
                value: value.trim().into(),
                negate,
            });
        }
        Ok(Self(reqs))
    }

    /// Whether the object satisfies every requirement. Absent fields read as "".
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let actual = field_value(obj, &r.field);
            (actual == r.value) != r.negate
        })
    }
}

/// Field labels whose Go type is a `bool`: an absent one reads `false`, as the server's field
/// set prints it (`spec.unschedulable=false` lists the schedulable nodes).
const BOOL_FIELDS: &[&str] = &["spec.unschedulable"];

/// The string value of a dotted field path, as the API server renders it for field selectors.
pub fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for seg in path.split('.') {
        cur = match cur.get(seg) {
            Some(v) => v,
            None if BOOL_FIELDS.contains(&path) => return "false".into(),
            None => return String::new(),
        };
    }
    if cur.is_null() && BOOL_FIELDS.contains(&path) {
        return "false".into();
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn equality_and_set_based_label_selectors() {
        let o = obj(json!({"app": "web", "tier": "gpu"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier=gpu"));
        assert!(!m("app=db"));
        assert!(m("app!=db"));
        assert!(m("missing!=x"));
        assert!(m("tier in (gpu, cpu)"));
        assert!(!m("tier notin (gpu)"));
        assert!(m("missing notin (gpu)"));
        assert!(m("app"));
        assert!(!m("!app"));
        assert!(m("!missing,app in (web),tier"));
        let n = obj(json!({"nvidia.com/gpu.count": "8"}));
        let g = |s: &str| LabelSelector::parse(s).unwrap().matches(&n);
        assert!(g("nvidia.com/gpu.count>4") && g("nvidia.com/gpu.count<9"));
        assert!(!g("nvidia.com/gpu.count>8") && !g("missing<100"));
        assert!(
            LabelSelector::parse("x>many")
                .unwrap_err()
                .contains("must be an integer")
        );
        assert_eq!(LabelSelector::parse("a>3").unwrap().to_string(), "a>3");
    }

    #[test]
    fn bad_label_selectors_are_rejected() {
        assert!(LabelSelector::parse("app in gpu").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
        assert!(LabelSelector::parse("bad key=1").is_err());
    }

    #[test]
    fn object_form_selectors() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["gpu"]}]
        }))
        .unwrap();
        assert!(sel.matches(&obj(json!({"app": "web", "tier": "gpu"}))));
        assert!(!sel.matches(&obj(json!({"app": "web"}))));
        assert!(
            LabelSelector::from_object(
                &json!({"matchExpressions": [{"key": "a", "operator": "Near"}]})
            )
            .is_err()
        );
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let ok = |_: &str| true;
        let m = |s: &str| FieldSelector::parse(s, ok).unwrap().matches(&pod);
        assert!(m("spec.nodeName=n1"));
        assert!(m(
            "spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed"
        ));
        assert!(!m("status.phase=Pending"));
        assert!(m("spec.schedulerName="));
        let err = FieldSelector::parse("spec.color=red", |f| f == "spec.nodeName").unwrap_err();
        assert!(err.contains("spec.color"), "{err}");
        assert_eq!(
            field_value(
                &json!({"spec": {"unschedulable": true}}),
                "spec.unschedulable"
            ),
            "true"
        );
        // An absent bool reads false: the schedulable nodes.
        let sel = FieldSelector::parse("spec.unschedulable=false", ok).unwrap();
        assert!(sel.matches(&json!({"spec": {}})));
        assert!(!sel.matches(&json!({"spec": {"unschedulable": true}})));
    }
}
