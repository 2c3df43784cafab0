//! Campaign wire types ↔ core: the step envelope on the agent stream, the status the agent
//! sends back, and the campaign as the API shows it. Step and status payloads are the core
//! types as JSON inside typed envelopes (decision 0020).

use std::collections::BTreeMap;

use flotilla_core::campaign::machine::{Campaign, RunState};
use flotilla_core::campaign::step::{Step, StepStatus};

use super::fleet::Invalid;
use crate::v1;

/// A step as the hub sends it.
pub fn step_to_wire(step: &Step) -> v1::StepCommand {
    v1::StepCommand {
        campaign: step.campaign.clone(),
        seq: step.seq,
        term: step.term,
        kind: step.kind.name().to_string(),
        step_json: serde_json::to_string(&step.kind).expect("a step serializes"),
    }
}

/// A step as the agent receives it; the error names the field.
pub fn step_from_wire(w: &v1::StepCommand) -> Result<Step, Invalid> {
    if w.campaign.is_empty() {
        return Err(Invalid {
            field: "command.campaign".into(),
            reason: "empty".into(),
        });
    }
    let kind = serde_json::from_str(&w.step_json).map_err(|e| Invalid {
        field: "command.step_json".into(),
        reason: format!("not a step this agent understands: {e}"),
    })?;
    Ok(Step {
        campaign: w.campaign.clone(),
        seq: w.seq,
        term: w.term,
        kind,
    })
}

/// The state an agent's status carries, for readers of the envelope.
fn state_of(s: &StepStatus) -> v1::StepState {
    match s {
        StepStatus::Accepted => v1::StepState::Accepted,
        StepStatus::Progress { .. } => v1::StepState::Progress,
        StepStatus::Done(_) => v1::StepState::Done,
        StepStatus::Failed { .. } => v1::StepState::Failed,
    }
}

/// A line for people.
fn message_of(s: &StepStatus) -> String {
    match s {
        StepStatus::Accepted => "accepted".into(),
        StepStatus::Progress { message, .. } => message.clone(),
        StepStatus::Done(_) => "done".into(),
        StepStatus::Failed { reason, .. } => reason.clone(),
    }
}

/// What the agent sends about step `seq` of `campaign`.
pub fn status_to_wire(campaign: &str, seq: u64, s: &StepStatus) -> v1::StepStatusReport {
    v1::StepStatusReport {
        campaign: campaign.to_string(),
        seq,
        state: state_of(s) as i32,
        message: message_of(s),
        status_json: serde_json::to_string(s).expect("a status serializes"),
    }
}

/// Most bytes a status may carry (a drain's blocked pods are bounded by the agent).
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// A status as the hub receives it; the error names the field.
pub fn status_from_wire(w: &v1::StepStatusReport) -> Result<StepStatus, Invalid> {
    if w.status_json.len() > MAX_STATUS_BYTES {
        return Err(Invalid {
            field: "step_status.status_json".into(),
            reason: format!(
                "{} bytes, over the limit of {MAX_STATUS_BYTES}",
                w.status_json.len()
            ),
        });
    }
    serde_json::from_str(&w.status_json).map_err(|e| Invalid {
        field: "step_status.status_json".into(),
        reason: format!("not a step status: {e}"),
    })
}

/// The wire state of a campaign.
pub fn state_to_wire(s: RunState) -> v1::CampaignState {
    match s {
        RunState::Running => v1::CampaignState::Running,
        RunState::Paused => v1::CampaignState::Paused,
        RunState::Succeeded => v1::CampaignState::Succeeded,
        RunState::Failed => v1::CampaignState::Failed,
        RunState::Aborted => v1::CampaignState::Aborted,
    }
}

/// The campaign as the API shows it.
pub fn info(c: &Campaign, revision: i64) -> v1::CampaignInfo {
    let mut by_phase: BTreeMap<String, u32> = BTreeMap::new();
    for (_, cl) in c.clusters() {
        *by_phase.entry(format!("{:?}", cl.phase)).or_default() += 1;
    }
    v1::CampaignInfo {
        id: c.id.clone(),
        name: c.spec.name.clone(),
        state: state_to_wire(c.state) as i32,
        reason: c.reason.clone(),
        created_at_unix_ms: c.created_ms,
        clusters_by_phase: by_phase.into_iter().collect(),
        current_stage: c
            .stages
            .get(c.current)
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        waiting_approvals: c.waiting_approvals(),
        detail_json: serde_json::to_string(c).expect("a campaign serializes"),
        revision,
    }
}

/// The campaign inside an API answer.
pub fn campaign_from_info(i: &v1::CampaignInfo) -> Result<Campaign, Invalid> {
    serde_json::from_str(&i.detail_json).map_err(|e| Invalid {
        field: "detail_json".into(),
        reason: format!("not a campaign this client understands: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use flotilla_core::campaign::spec::{PoolRef, Provisioner};
    use flotilla_core::campaign::step::{BlockedPod, FailureKind, StepKind};

    use super::*;

    #[test]
    fn steps_and_statuses_round_trip() {
        let step = Step {
            campaign: "c1".into(),
            seq: 7,
            term: 3,
            kind: StepKind::Preflight {
                pool: PoolRef::Name("gpu".into()),
                green: Provisioner::ClusterApi {
                    name: None,
                    version: Some("v1.31.2".into()),
                    template: None,
                },
            },
        };
        let w = step_to_wire(&step);
        assert_eq!(w.kind, "preflight");
        assert_eq!(step_from_wire(&w).unwrap(), step);
        let st = StepStatus::Failed {
            kind: FailureKind::Undrainable,
            reason: "n1 not drained".into(),
            blocked: vec![BlockedPod::default()],
        };
        let w = status_to_wire("c1", 7, &st);
        assert_eq!(w.state, v1::StepState::Failed as i32);
        assert_eq!(w.message, "n1 not drained");
        assert_eq!(status_from_wire(&w).unwrap(), st);
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let bad = v1::StepCommand {
            campaign: "c1".into(),
            step_json: r#"{"Reboot":{}}"#.into(),
            ..Default::default()
        };
        assert_eq!(step_from_wire(&bad).unwrap_err().field, "command.step_json");
        let huge = v1::StepStatusReport {
            status_json: "x".repeat(MAX_STATUS_BYTES + 1),
            ..Default::default()
        };
        assert!(
            status_from_wire(&huge)
                .unwrap_err()
                .reason
                .contains("over the limit")
        );
    }
}
