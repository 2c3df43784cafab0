//! The campaign controller: leader only, one term at a time. At the start of a term it takes
//! a fencing term from the store, loads every campaign, restamps the steps in flight with its
//! term and puts them in the agents' outboxes (so they are sent again and resumed). Then it
//! feeds the core machine clock ticks, agents' statuses and people's commands, persists what
//! changed (fenced by its term) and only then puts the new steps in the outboxes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::campaign as conv;
use flotilla_api::convert::fleet::health_from_wire;
use flotilla_api::v1;
use flotilla_core::campaign::machine::{Campaign, ClusterRun, Ctx, MemberInfo, Refusal};
use flotilla_core::campaign::plan::{Member, snapshot};
use flotilla_core::campaign::step::{Step, StepKind, StepOutput, StepStatus};
use flotilla_core::health::Health;
use flotilla_core::kv::KvBackend;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Campaigns, Created, Input, outbox_key, records};
use crate::controllers::{Clock, Controller, Leading};
use crate::fleet::view::FleetView;

/// How long a dry run waits for the clusters' pre-flight answers.
pub const DRY_RUN_WAIT: Duration = Duration::from_secs(10);

/// Inputs taken in one batch before the changed campaigns are written.
const BATCH: usize = 512;

/// The leader's campaign controller.
pub struct CampaignController<B> {
    /// Shared with the agent streams and the API.
    pub campaigns: Arc<Campaigns>,
    /// The store.
    pub backend: B,
    /// Members and their health.
    pub view: Arc<FleetView>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// How often soaks, gates and deadlines are looked at.
    pub tick: Duration,
}

impl<B: KvBackend + Clone> Controller for CampaignController<B> {
    fn name(&self) -> &'static str {
        "campaigns"
    }

    fn lead(self: Arc<Self>, term: CancellationToken) -> Leading {
        Box::pin(async move {
            if let Err(e) = self.run(term).await {
                tracing::error!(error = %e, "campaign controller stopped");
            }
        })
    }
}

/// A campaign being run: as changed in memory, and as stored.
struct Live {
    c: Campaign,
    stored: Campaign,
    revision: i64,
}

/// A dry run waiting for pre-flight answers.
struct DryRun {
    c: Campaign,
    waiting: BTreeSet<String>,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<Created, tonic::Status>>,
}

/// This term's state.
struct Term {
    /// The fencing term (a store revision); 0 until one is needed.
    term: u64,
    live: BTreeMap<String, Live>,
    dry: BTreeMap<String, DryRun>,
    members: BTreeMap<String, MemberInfo>,
}

/// The term ended: another controller writes now.
#[derive(Debug, thiserror::Error)]
#[error("a newer campaign controller term has started")]
struct Fenced;

fn members(view: &FleetView) -> BTreeMap<String, MemberInfo> {
    view.clusters()
        .into_iter()
        .map(|c| {
            let health = health_from_wire(c.health).unwrap_or(Health::Joining);
            (
                c.name,
                MemberInfo {
                    health,
                    campaigns: c.campaigns,
                },
            )
        })
        .collect()
}

fn command(step: &Step) -> v1::HubMessage {
    v1::HubMessage {
        msg: Some(v1::hub_message::Msg::Command(conv::step_to_wire(step))),
    }
}

fn new_id(name: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &u[..8])
}

impl<B: KvBackend + Clone> CampaignController<B> {
    async fn run(self: Arc<Self>, cancel: CancellationToken) -> anyhow::Result<()> {
        // One term at a time: the previous one has returned the inbox.
        let mut rx = self.campaigns.rx.lock().await;
        let loaded = loop {
            match records::load_all(&self.backend).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "campaigns: cannot load yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        };
        // Steps of an earlier term are not this term's to send.
        for cluster in self.view.clusters() {
            let ob = self.campaigns.outboxes.of(&cluster.name);
            for k in ob.keys().into_iter().filter(|k| k.starts_with("campaign/")) {
                ob.remove(&k);
            }
        }
        // A term is taken only when there is something to write: a hub with no campaign
        // writes nothing (a new store stays empty, so a snapshot can be restored into it).
        let term = match loaded.iter().any(|(c, _)| !c.state.is_final()) {
            true => match self.take_term(&cancel).await {
                Some(t) => t,
                None => return Ok(()),
            },
            false => 0,
        };
        let mut t = Term {
            term,
            live: BTreeMap::new(),
            dry: BTreeMap::new(),
            members: members(&self.view),
        };
        for (mut c, revision) in loaded {
            let stored = c.clone();
            // Steps in flight go again under this term, so agents fence the old one.
            for s in &mut c.stages {
                for r in &mut s.clusters {
                    if let Some(step) = &mut r.step {
                        step.term = term;
                    }
                }
            }
            let id = c.id.clone();
            t.live.insert(
                id.clone(),
                Live {
                    c,
                    stored,
                    revision,
                },
            );
            self.commit(&mut t, &id, true).await?;
        }
        tracing::info!(
            term,
            campaigns = t.live.len(),
            "campaign controller leading"
        );
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch = Vec::new();
            let mut ticked = false;
            tokio::select! {
                _ = cancel.cancelled() => break,
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = tick.tick() => ticked = true,
            }
            let mut dirty = BTreeSet::new();
            for input in batch {
                if let Some(id) = self.input(&mut t, input).await? {
                    dirty.insert(id);
                }
            }
            // The clock's work (soaks, gates, deadlines, membership) on ticks; a status
            // already moved its own campaign.
            if ticked {
                t.members = members(&self.view);
                let ctx = Ctx {
                    now_ms: self.clock.unix_ms(),
                    term: t.term,
                    members: &t.members,
                };
                for (id, l) in t.live.iter_mut() {
                    if !l.c.state.is_final() {
                        l.c.tick(&ctx);
                    }
                    if l.c != l.stored {
                        dirty.insert(id.clone());
                    }
                }
            }
            for id in dirty {
                self.commit(&mut t, &id, false).await?;
            }
            // Scrapes are seconds apart: the series follow the clock, not every status.
            if ticked {
                self.campaigns
                    .series
                    .publish(t.live.values().map(|l| &l.stored));
            }
            self.finish_dry_runs(&mut t, false);
        }
        self.finish_dry_runs(&mut t, true);
        // Another replica leads now; its series are the ones to read.
        self.campaigns.series.publish(std::iter::empty());
        Ok(())
    }

    /// Take a fencing term, retrying until the store answers; `None` when the term ends first.
    async fn take_term(&self, cancel: &CancellationToken) -> Option<u64> {
        loop {
            match records::new_term(&self.backend).await {
                Ok(t) => return Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "campaigns: cannot take a term yet");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Apply one input; the campaign it changed, if any.
    async fn input(&self, t: &mut Term, input: Input) -> anyhow::Result<Option<String>> {
        let now = self.clock.unix_ms();
        match input {
            Input::Status { cluster, report } => {
                let status = match conv::status_from_wire(&report) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(cluster, error = %e, "an agent sent a bad step status");
                        return Ok(None);
                    }
                };
                if let Some(d) = t.dry.get_mut(&report.campaign) {
                    if let StepStatus::Done(StepOutput::Preflight(p)) = status {
                        d.c.preview(&cluster, p);
                        d.waiting.remove(&cluster);
                        self.campaigns
                            .outboxes
                            .of(&cluster)
                            .remove(&outbox_key(&report.campaign));
                    }
                    return Ok(None);
                }
                let Some(l) = t.live.get_mut(&report.campaign) else {
                    return Ok(None);
                };
                let ctx = Ctx {
                    now_ms: now,
                    term: t.term,
                    members: &t.members,
                };
                l.c.on_status(&ctx, &cluster, report.seq, status);
                Ok(Some(report.campaign))
            }
            Input::Create {
                spec,
                dry_run,
                reply,
            } => {
                if reply.is_closed() {
                    return Ok(None);
                }
                // The snapshot and the members' capabilities as of now, not of the last tick.
                t.members = members(&self.view);
                let member_list: Vec<Member> = self
                    .view
                    .clusters()
                    .into_iter()
                    .map(|c| Member {
                        name: c.name,
                        labels: c.labels.into_iter().collect(),
                    })
                    .collect();
                let snap = snapshot(&spec, &member_list);
                if snap.stages.iter().all(|s| s.clusters.is_empty()) {
                    let _ = reply.send(Err(tonic::Status::failed_precondition(
                        "stages: no member cluster matches any stage's selector",
                    )));
                    return Ok(None);
                }
                let id = new_id(&spec.name);
                let mut c = Campaign::new(id.clone(), *spec, snap, now);
                if t.term == 0 {
                    match records::new_term(&self.backend).await {
                        Ok(term) => t.term = term,
                        Err(e) => {
                            let _ = reply.send(Err(flotilla_api::convert::kv::to_status(e)));
                            return Ok(None);
                        }
                    }
                }
                if dry_run {
                    self.start_dry_run(t, c, reply);
                    return Ok(None);
                }
                let ctx = Ctx {
                    now_ms: now,
                    term: t.term,
                    members: &t.members,
                };
                c.tick(&ctx);
                match records::save(&self.backend, t.term, &c, None, now).await {
                    Ok(Some(revision)) => {
                        tracing::info!(campaign = %id, "campaign created");
                        self.sync(&c, None);
                        let created = Created {
                            campaign: c.clone(),
                            revision,
                            missing: Vec::new(),
                        };
                        t.live.insert(
                            id,
                            Live {
                                stored: c.clone(),
                                c,
                                revision,
                            },
                        );
                        let _ = reply.send(Ok(created));
                        Ok(None)
                    }
                    Ok(None) => {
                        let _ = reply.send(Err(tonic::Status::unavailable(
                            "this hub is no longer the leader; retry",
                        )));
                        Err(Fenced.into())
                    }
                    Err(e) => {
                        let _ = reply.send(Err(flotilla_api::convert::kv::to_status(e)));
                        Ok(None)
                    }
                }
            }
            Input::Act { id, command, reply } => {
                if reply.is_closed() {
                    return Ok(None);
                }
                // A command on an ended campaign (retry) may be this term's first write.
                if t.term == 0 && t.live.contains_key(&id) {
                    match records::new_term(&self.backend).await {
                        Ok(term) => t.term = term,
                        Err(e) => {
                            let _ = reply.send(Err(flotilla_api::convert::kv::to_status(e)));
                            return Ok(None);
                        }
                    }
                }
                let Some(l) = t.live.get_mut(&id) else {
                    let _ =
                        reply.send(Err(tonic::Status::not_found(format!("no campaign {id:?}"))));
                    return Ok(None);
                };
                let ctx = Ctx {
                    now_ms: now,
                    term: t.term,
                    members: &t.members,
                };
                match l.c.command(&ctx, command) {
                    Ok(_) => {}
                    Err(Refusal::NotNow(m)) => {
                        let _ = reply.send(Err(tonic::Status::failed_precondition(m)));
                        return Ok(None);
                    }
                    Err(Refusal::NotFound(m)) => {
                        let _ = reply.send(Err(tonic::Status::not_found(m)));
                        return Ok(None);
                    }
                }
                self.commit(t, &id, false).await?;
                let l = &t.live[&id];
                let answer = if l.c == l.stored {
                    Ok((l.c.clone(), l.revision))
                } else {
                    Err(tonic::Status::unavailable(
                        "the store did not take the change yet; it is retried",
                    ))
                };
                let _ = reply.send(answer);
                Ok(None)
            }
        }
    }

    /// Persist a campaign's changes, then put its steps in flight in the outboxes. `all`
    /// syncs every cluster's outbox (at the start of a term), not only changed ones.
    async fn commit(&self, t: &mut Term, id: &str, all: bool) -> Result<(), Fenced> {
        let Some(l) = t.live.get_mut(id) else {
            return Ok(());
        };
        if l.c != l.stored || all {
            let now = self.clock.unix_ms();
            match records::save(&self.backend, t.term, &l.c, Some(&l.stored), now).await {
                Ok(Some(rev)) => {
                    if rev > 0 {
                        l.revision = rev;
                    }
                    self.sync(&l.c, if all { None } else { Some(&l.stored) });
                    l.c.copy_into(&mut l.stored);
                }
                Ok(None) => return Err(Fenced),
                // Kept dirty: written again on the next tick, and nothing is sent before.
                Err(e) => {
                    tracing::warn!(campaign = id, error = %e, "campaign write failed; retrying")
                }
            }
        }
        Ok(())
    }

    /// Put the stored campaign's steps in flight in their clusters' outboxes, and take out
    /// those no longer in flight; only clusters whose step changed since `before`.
    fn sync(&self, c: &Campaign, before: Option<&Campaign>) {
        // What goes out: the step in flight, unless its end is parked.
        fn out(r: &ClusterRun) -> Option<&Step> {
            r.step.as_ref().filter(|_| r.parked.is_none())
        }
        let key = outbox_key(&c.id);
        for (i, stage) in c.stages.iter().enumerate() {
            for (j, r) in stage.clusters.iter().enumerate() {
                let step = out(r);
                // By position: a campaign's stages and clusters never move.
                if let Some(b) = before
                    && b.stages
                        .get(i)
                        .and_then(|s| s.clusters.get(j))
                        .is_some_and(|o| o.name == r.name && out(o) == step)
                {
                    continue;
                }
                let ob = self.campaigns.outboxes.of(&r.name);
                match step {
                    Some(s) => ob.put(&key, command(s)),
                    None => ob.remove(&key),
                }
            }
        }
    }

    fn start_dry_run(
        &self,
        t: &mut Term,
        c: Campaign,
        reply: oneshot::Sender<Result<Created, tonic::Status>>,
    ) {
        let mut waiting = BTreeSet::new();
        for (seq, (_, r)) in c.clusters().enumerate() {
            // A cluster that cannot run campaigns is not asked; it stays in `waiting`, so the
            // plan reports it as unanswered.
            waiting.insert(r.name.clone());
            if !t.members.get(&r.name).is_some_and(|m| m.campaigns) {
                continue;
            }
            let step = Step {
                campaign: c.id.clone(),
                seq: seq as u64 + 1,
                term: t.term,
                kind: StepKind::Preflight {
                    pool: c.spec.pool.clone(),
                    green: c.spec.green.clone(),
                },
            };
            self.campaigns
                .outboxes
                .of(&r.name)
                .put(&outbox_key(&c.id), command(&step));
        }
        t.dry.insert(
            c.id.clone(),
            DryRun {
                c,
                waiting,
                deadline: tokio::time::Instant::now() + DRY_RUN_WAIT,
                reply,
            },
        );
    }

    /// Answer dry runs that have every answer or ran out of time (all of them: `all`).
    fn finish_dry_runs(&self, t: &mut Term, all: bool) {
        let now = tokio::time::Instant::now();
        let done: Vec<String> = t
            .dry
            .iter()
            .filter(|(_, d)| all || d.waiting.is_empty() || now >= d.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            let d = t.dry.remove(&id).expect("listed");
            for cluster in &d.waiting {
                self.campaigns.outboxes.of(cluster).remove(&outbox_key(&id));
            }
            let _ = d.reply.send(Ok(Created {
                campaign: d.c,
                revision: 0,
                missing: d.waiting.into_iter().collect(),
            }));
        }
    }
}
