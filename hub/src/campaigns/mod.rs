//! Fleet upgrade campaigns on the hub. The decisions are `flotilla_core::campaign`; here are
//! the edges: the leader's controller (`controller`: store records in, steps out through the
//! agents' outboxes, statuses back), the store records (`records`) and the API (`service`).
//!
//! ```text
//! CampaignService ──Create/Act──▶ inbox ──▶ CampaignController (leader) ── core machine
//!                                   ▲            │ persist /campaigns/<id> (+ /shifts/) first,
//! agent stream ──StepStatusReport───┘            ▼ then put the step in flight
//!        ▲                                  Outbox(cluster) ──▶ every stream of that cluster
//!        └──────────────── StepCommand ◀──────────┘
//! ```

pub mod controller;
pub mod metrics;
pub mod records;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::v1;
use flotilla_core::campaign::machine::{Campaign, Command};
use flotilla_core::campaign::spec::Spec;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::fleet::outbox::Outboxes;

/// What the controller is asked to do.
pub enum Input {
    /// An agent's status for a step.
    Status {
        /// The agent's cluster (from its stream, not from the message).
        cluster: String,
        /// What it said.
        report: v1::StepStatusReport,
    },
    /// Start a campaign (or only plan it).
    Create {
        /// The validated spec.
        spec: Box<Spec>,
        /// Plan and pre-flight only.
        dry_run: bool,
        /// The answer.
        reply: oneshot::Sender<Result<Created, tonic::Status>>,
    },
    /// A person's command.
    Act {
        /// Campaign id.
        id: String,
        /// The command.
        command: Command,
        /// The campaign after it, with its record's revision.
        reply: oneshot::Sender<Result<(Campaign, i64), tonic::Status>>,
    },
}

/// A created (or planned) campaign.
pub struct Created {
    /// The campaign.
    pub campaign: Campaign,
    /// Its record's revision (0 for a dry run).
    pub revision: i64,
    /// Dry run: clusters whose pre-flight did not answer in time.
    pub missing: Vec<String>,
}

/// The campaigns' shared parts: the agents' outboxes and the controller's inbox.
pub struct Campaigns {
    /// Every cluster's outbox (campaign steps go there).
    pub outboxes: Arc<Outboxes>,
    /// What `/metrics` shows of the campaigns (published by the leader's controller).
    pub series: metrics::CampaignSeries,
    inbox: mpsc::Sender<Input>,
    /// Taken by the controller for one term at a time.
    rx: Mutex<mpsc::Receiver<Input>>,
}

/// Inputs waiting for the controller; an agent stream waits for room rather than drop a
/// status.
const INBOX: usize = 4096;

/// How long a stream or an API call waits for room in the inbox.
const INBOX_WAIT: Duration = Duration::from_secs(10);

impl Campaigns {
    /// New, with empty outboxes.
    pub fn new() -> Arc<Self> {
        let (inbox, rx) = mpsc::channel(INBOX);
        Arc::new(Self {
            outboxes: Arc::new(Outboxes::default()),
            series: metrics::CampaignSeries::default(),
            inbox,
            rx: Mutex::new(rx),
        })
    }

    /// Hand an agent's status to the controller. A status that finds no controller (this
    /// replica stopped leading) is dropped: the next leader sends the step again and the
    /// agent answers again.
    pub async fn status(&self, cluster: &str, report: v1::StepStatusReport) {
        let input = Input::Status {
            cluster: cluster.to_string(),
            report,
        };
        if tokio::time::timeout(INBOX_WAIT, self.inbox.send(input))
            .await
            .is_err()
        {
            tracing::warn!(cluster, "campaign controller inbox full; status dropped");
        }
    }

    /// Ask the controller; UNAVAILABLE when it does not answer (not leading).
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, tonic::Status>>) -> Input,
        wait: Duration,
    ) -> Result<T, tonic::Status> {
        let (tx, rx) = oneshot::channel();
        let busy = || tonic::Status::unavailable("the campaign controller is not running here");
        tokio::time::timeout(INBOX_WAIT, self.inbox.send(make(tx)))
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(busy()),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "the campaign controller did not answer in time",
            )),
        }
    }
}

/// The outbox key of a campaign's step.
pub fn outbox_key(campaign: &str) -> String {
    format!("campaign/{campaign}")
}
