//! Campaign series on `/metrics`, encoded at scrape time from the summary the leader's
//! controller publishes after each batch of changes (other replicas publish nothing):
//! `flotilla_hub_campaign_state`, `_campaign_clusters` by phase, `_campaign_stage_phase`,
//! `_campaign_cluster_phase` (the current phase only) and `_campaign_blocked_nodes`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use flotilla_core::campaign::machine::{Campaign, Phase, RunState, StagePhase};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{Labels, gauges};

/// Every phase a cluster can be in, so each campaign's counts are complete series.
const PHASES: [Phase; 17] = [
    Phase::Pending,
    Phase::UpdateStarted,
    Phase::Preflight,
    Phase::ProvisioningGreen,
    Phase::WaitingGreenReady,
    Phase::ShiftingTraffic,
    Phase::CordoningBlue,
    Phase::DrainingBatch,
    Phase::BatchSoaking,
    Phase::VerifyingHealth,
    Phase::FinalSoaking,
    Phase::RetiringBlue,
    Phase::Done,
    Phase::RollingBack,
    Phase::RolledBack,
    Phase::Failed,
    Phase::Skipped,
];

const STATES: [RunState; 5] = [
    RunState::Running,
    RunState::Paused,
    RunState::Succeeded,
    RunState::Failed,
    RunState::Aborted,
];

/// One campaign as the series show it.
#[derive(Debug, Clone, Default)]
struct Summary {
    id: String,
    state: Option<RunState>,
    stages: Vec<(String, String)>,
    clusters: Vec<(String, Phase, u32)>,
}

fn stage_phase(p: StagePhase) -> &'static str {
    match p {
        StagePhase::Pending => "Pending",
        StagePhase::BeforeGate(_) => "BeforeGate",
        StagePhase::Running => "Running",
        StagePhase::AfterGate(_) => "AfterGate",
        StagePhase::Done => "Done",
        StagePhase::Failed => "Failed",
    }
}

/// The published summaries, shared by the controller (writer) and the registry (reader).
#[derive(Debug, Default, Clone)]
pub struct CampaignSeries {
    rows: Arc<Mutex<Vec<Summary>>>,
}

impl CampaignSeries {
    /// Replace what the series show with these campaigns.
    pub fn publish<'a>(&self, campaigns: impl Iterator<Item = &'a Campaign>) {
        let rows = campaigns
            .map(|c| Summary {
                id: c.id.clone(),
                state: Some(c.state),
                stages: c
                    .stages
                    .iter()
                    .map(|s| (s.name.clone(), stage_phase(s.phase).to_string()))
                    .collect(),
                clusters: c
                    .clusters()
                    .map(|(_, r)| {
                        // Nodes whose drain is held now, and nodes left quarantined.
                        let held: BTreeSet<&str> =
                            r.blocked.iter().map(|b| b.node.as_str()).collect();
                        let blocked = held.len() + r.quarantined.len();
                        (r.name.clone(), r.phase, blocked as u32)
                    })
                    .collect(),
            })
            .collect();
        *self.rows.lock().expect("series lock") = rows;
    }
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Collector for CampaignSeries {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let rows = self.rows.lock().expect("series lock").clone();
        let mut state = Vec::new();
        let mut counts = Vec::new();
        let mut stages = Vec::new();
        let mut clusters = Vec::new();
        let mut blocked = Vec::new();
        for c in &rows {
            for s in STATES {
                let name = format!("{s:?}");
                state.push((
                    l(&[("campaign", &c.id), ("state", &name)]),
                    i64::from(c.state == Some(s)),
                ));
            }
            for p in PHASES {
                let n = c.clusters.iter().filter(|(_, q, _)| *q == p).count();
                let name = format!("{p:?}");
                counts.push((l(&[("campaign", &c.id), ("phase", &name)]), n as i64));
            }
            for (s, p) in &c.stages {
                stages.push((l(&[("campaign", &c.id), ("stage", s), ("phase", p)]), 1));
            }
            for (cl, p, b) in &c.clusters {
                let name = format!("{p:?}");
                clusters.push((
                    l(&[("campaign", &c.id), ("cluster", cl), ("phase", &name)]),
                    1,
                ));
                blocked.push((l(&[("campaign", &c.id), ("cluster", cl)]), i64::from(*b)));
            }
        }
        gauges(
            &mut enc,
            "campaign_state",
            "1 for the campaign's state, 0 for the others",
            &state,
        )?;
        gauges(
            &mut enc,
            "campaign_clusters",
            "Clusters of the campaign in each phase",
            &counts,
        )?;
        gauges(
            &mut enc,
            "campaign_stage_phase",
            "1 for each stage's current phase",
            &stages,
        )?;
        gauges(
            &mut enc,
            "campaign_cluster_phase",
            "1 for each cluster's current phase",
            &clusters,
        )?;
        gauges(
            &mut enc,
            "campaign_blocked_nodes",
            "Nodes whose drain is held now (a PDB, a job still running) or left quarantined",
            &blocked,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::campaign::plan::{Member, snapshot};

    #[test]
    fn series_follow_the_published_campaigns() {
        let spec = flotilla_core::campaign::spec::parse_json(
            r#"{"name": "c", "pool": {"name": "gpu"}, "green": {"clusterApi": {"version": "v2"}},
                "stages": [{"name": "all"}]}"#,
        )
        .unwrap();
        let members = [Member {
            name: "east".into(),
            labels: Default::default(),
        }];
        let c = Campaign::new("c-1".into(), spec.clone(), snapshot(&spec, &members), 0);
        let series = CampaignSeries::default();
        series.publish([&c].into_iter());
        let mut reg = prometheus_client::registry::Registry::with_prefix("flotilla_hub");
        reg.register_collector(Box::new(series.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            r#"flotilla_hub_campaign_state{campaign="c-1",state="Running"} 1"#,
            r#"flotilla_hub_campaign_clusters{campaign="c-1",phase="Pending"} 1"#,
            r#"flotilla_hub_campaign_stage_phase{campaign="c-1",stage="all",phase="Pending"} 1"#,
            r#"flotilla_hub_campaign_cluster_phase{campaign="c-1",cluster="east",phase="Pending"} 1"#,
            r#"flotilla_hub_campaign_blocked_nodes{campaign="c-1",cluster="east"} 0"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        series.publish(std::iter::empty());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            !text.contains("c-1"),
            "a campaign no longer published leaves no series"
        );
    }
}
