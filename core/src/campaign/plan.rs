//! The snapshot a campaign takes at creation: which member clusters run in which stage, in
//! which order. Clusters that join later are not included; each cluster belongs to the first
//! stage whose selector matches it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::spec::{Round, Spec};

/// A member cluster as the snapshot sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The clusters of each stage, in run order, with the stage's resolved limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Cluster names in run order.
    pub clusters: Vec<String>,
    /// Clusters at once: `maxConcurrency` of the stage's size, rounded down, at least 1.
    pub concurrency: u32,
    /// Clusters of the stage that may fail (rounded up).
    pub budget: u32,
}

/// The whole snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// One per spec stage.
    pub stages: Vec<StagePlan>,
    /// Members no stage selects (not part of the campaign).
    pub unselected: Vec<String>,
    /// Clusters of the whole campaign that may fail (rounded up).
    pub budget: u32,
}

/// Assign `members` to the spec's stages.
pub fn snapshot(spec: &Spec, members: &[Member]) -> Snapshot {
    let mut stages: Vec<Vec<&Member>> = vec![Vec::new(); spec.stages.len()];
    let mut unselected = Vec::new();
    for m in members {
        match spec
            .stages
            .iter()
            .position(|s| s.clusters.matches(&m.labels))
        {
            Some(i) => stages[i].push(m),
            None => unselected.push(m.name.clone()),
        }
    }
    let total: usize = stages.iter().map(Vec::len).sum();
    unselected.sort();
    let stages: Vec<StagePlan> = spec
        .stages
        .iter()
        .zip(stages)
        .map(|(s, mut ms)| {
            // Clusters without the sort label go last.
            ms.sort_by(|a, b| {
                let key = |m: &Member| {
                    let v = s.sort_by.as_ref().and_then(|k| m.labels.get(k));
                    (v.is_none(), v.cloned(), m.name.clone())
                };
                key(a).cmp(&key(b))
            });
            let n = ms.len() as u32;
            StagePlan {
                concurrency: s.max_concurrency.of(n, Round::Down).max(1),
                budget: spec.failure_budget_per_stage.of(n, Round::Up),
                clusters: ms.into_iter().map(|m| m.name.clone()).collect(),
            }
        })
        .collect();
    let budget = match spec.failure_budget_per_campaign {
        Some(a) => a.of(total as u32, Round::Up),
        None => stages.iter().map(|s| s.budget).sum(),
    };
    Snapshot {
        stages,
        unselected,
        budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::spec::RawSpec;

    fn member(name: &str, labels: &[(&str, &str)]) -> Member {
        Member {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn first_matching_stage_sorted_by_label_then_name() {
        let spec: RawSpec = serde_json::from_value(serde_json::json!({
            "name": "c", "pool": {"name": "gpu"}, "green": {"clusterApi": {"version": "v2"}},
            "stages": [
                {"name": "canary", "clusters": {"matchLabels": {"ring": "canary"}}},
                {"name": "rest", "sortBy": "region", "maxConcurrency": "50%"}
            ],
            "failureBudget": {"perStage": "10%", "perCampaign": 1}
        }))
        .unwrap();
        let spec = spec.validate().unwrap();
        let members = [
            member("e", &[("region", "us")]),
            member("a", &[("ring", "canary"), ("region", "zz")]),
            member("d", &[("region", "eu")]),
            member("b", &[]),
            member("c", &[("region", "eu")]),
        ];
        let s = snapshot(&spec, &members);
        assert_eq!(s.stages[0].clusters, ["a"]);
        assert_eq!(s.stages[1].clusters, ["c", "d", "e", "b"]);
        // 50% of 4 = 2; 50% of 1 rounds down to 0, then at least 1.
        assert_eq!(s.stages[1].concurrency, 2);
        assert_eq!(s.stages[0].concurrency, 1);
        // 10% of 4 rounded up.
        assert_eq!(s.stages[1].budget, 1);
        assert_eq!(s.budget, 1);
        assert!(s.unselected.is_empty());
    }
}
