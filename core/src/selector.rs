//! Kubernetes-style label selectors over cluster labels (`matchLabels` and
//! `matchExpressions`), as routing tiers and weights use them. Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An operator of a selector expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is missing or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is missing.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: Operator,
    /// Values (`In`/`NotIn` need at least one; `Exists`/`DoesNotExist` none).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector; the empty selector matches every cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Labels that must be equal.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Expressions that must all hold.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator {
                    Operator::In => v.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => v.is_some(),
                    Operator::DoesNotExist => v.is_none(),
                }
            })
    }

    /// Whether this is the empty selector (matches everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Check the selector; the error names the offending field under `path`.
    pub fn validate(&self, path: &str) -> Result<(), String> {
        for k in self.match_labels.keys() {
            check_key(k).map_err(|e| format!("{path}.matchLabels[{k:?}]: {e}"))?;
        }
        for (i, r) in self.match_expressions.iter().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            check_key(&r.key).map_err(|e| format!("{at}.key: {e}"))?;
            match (r.operator, r.values.is_empty()) {
                (Operator::In | Operator::NotIn, true) => {
                    return Err(format!(
                        "{at}.values: {:?} needs at least one value",
                        r.operator
                    ));
                }
                (Operator::Exists | Operator::DoesNotExist, false) => {
                    return Err(format!("{at}.values: {:?} takes no values", r.operator));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A short human form (`region=eu-west,gpu in (a100,h100)`); `*` for the empty selector.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "*".into();
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        parts.join(",")
    }
}

fn check_key(k: &str) -> Result<(), String> {
    let name = k.rsplit('/').next().unwrap_or(k);
    if name.is_empty() || name.len() > 63 {
        return Err("a label key's name must be 1–63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("a label key may hold only letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn terms_match_as_kubernetes_defines_them() {
        let l = labels(&[("region", "eu-west"), ("gpu", "h100")]);
        let cases = [
            (Selector::default(), true),
            (
                Selector {
                    match_labels: labels(&[("region", "eu-west")]),
                    ..Default::default()
                },
                true,
            ),
            (
                Selector {
                    match_labels: labels(&[("region", "us-east")]),
                    ..Default::default()
                },
                false,
            ),
            (
                Selector {
                    match_expressions: vec![expr("gpu", Operator::In, &["a100", "h100"])],
                    ..Default::default()
                },
                true,
            ),
            (
                Selector {
                    match_expressions: vec![expr("gpu", Operator::NotIn, &["h100"])],
                    ..Default::default()
                },
                false,
            ),
            (
                Selector {
                    match_expressions: vec![expr("zone", Operator::NotIn, &["a"])],
                    ..Default::default()
                },
                true,
            ),
            (
                Selector {
                    match_expressions: vec![expr("zone", Operator::Exists, &[])],
                    ..Default::default()
                },
                false,
            ),
            (
                Selector {
                    match_expressions: vec![expr("zone", Operator::DoesNotExist, &[])],
                    ..Default::default()
                },
                true,
            ),
        ];
        for (i, (s, want)) in cases.iter().enumerate() {
            assert_eq!(s.matches(&l), *want, "case {i}: {}", s.describe());
        }
    }

    #[test]
    fn validation_names_the_field() {
        let s = Selector {
            match_expressions: vec![expr("gpu", Operator::In, &[])],
            ..Default::default()
        };
        assert_eq!(
            s.validate("tiers[1].selector").unwrap_err(),
            "tiers[1].selector.matchExpressions[0].values: In needs at least one value"
        );
        let s = Selector {
            match_labels: labels(&[("bad key", "x")]),
            ..Default::default()
        };
        assert!(
            s.validate("t")
                .unwrap_err()
                .starts_with("t.matchLabels[\"bad key\"]")
        );
    }
}
