//! `CampaignService`: writes go to the leader's controller (another replica answers
//! UNAVAILABLE naming the leader); reads come from the store, so any replica answers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::campaign as conv;
use flotilla_api::v1;
use flotilla_core::campaign::machine::Command;
use flotilla_core::kv::{KeyRange, KvBackend, WatchRequest};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::controller::DRY_RUN_WAIT;
use super::{Campaigns, Input, records};
use crate::controllers::Leadership;
use crate::fleet::agent::not_leader;
use crate::store::keys;

/// The campaign API.
pub struct CampaignSvc<B> {
    /// The store.
    pub backend: B,
    /// The controller's inbox.
    pub campaigns: Arc<Campaigns>,
    /// Leadership, to send writers to the leader.
    pub leader: Arc<dyn Leadership>,
}

fn store_err(e: flotilla_core::kv::KvError) -> Status {
    flotilla_api::convert::kv::to_status(e)
}

/// A campaign id as ids are made: a DNS label.
fn check_id(id: &str) -> Result<(), Status> {
    if flotilla_api::convert::fleet::is_dns_label(id) {
        Ok(())
    } else {
        Err(flotilla_api::convert::fleet::Invalid {
            field: "id".into(),
            reason: format!("{id:?} is not a campaign id"),
        }
        .to_status())
    }
}

type InfoStream = Pin<Box<dyn Stream<Item = Result<v1::CampaignInfo, Status>> + Send>>;

#[tonic::async_trait]
impl<B: KvBackend + Clone> v1::campaign_service_server::CampaignService for CampaignSvc<B> {
    async fn create_campaign(
        &self,
        req: Request<v1::CreateCampaignRequest>,
    ) -> Result<Response<v1::CreateCampaignResponse>, Status> {
        // The id is known only once created; until then the target is the name asked for.
        let target = crate::security::authz::AuditTarget::of(&req);
        let r = req.into_inner();
        let spec = flotilla_core::campaign::spec::parse_json(&r.spec_json).map_err(|e| {
            flotilla_api::convert::fleet::Invalid {
                field: format!("spec.{}", e.field),
                reason: e.reason,
            }
            .to_status()
        })?;
        let dry = if r.dry_run { " dry-run" } else { "" };
        target.set(format!("campaign name={}{dry}", spec.name));
        if !self.leader.is_leader() {
            return Err(not_leader(&*self.leader));
        }
        let dry_run = r.dry_run;
        let created = self
            .campaigns
            .ask(
                |reply| Input::Create {
                    spec: Box::new(spec),
                    dry_run,
                    reply,
                },
                DRY_RUN_WAIT + Duration::from_secs(10),
            )
            .await?;
        target.set(format!(
            "campaign/{} name={}{dry}",
            created.campaign.id, created.campaign.spec.name
        ));
        Ok(Response::new(v1::CreateCampaignResponse {
            campaign: Some(conv::info(&created.campaign, created.revision)),
            preflight_missing: created.missing,
        }))
    }

    async fn list_campaigns(
        &self,
        _: Request<v1::ListCampaignsRequest>,
    ) -> Result<Response<v1::ListCampaignsResponse>, Status> {
        let all = records::load_all(&self.backend).await.map_err(store_err)?;
        let mut campaigns: Vec<v1::CampaignInfo> =
            all.iter().map(|(c, rev)| conv::info(c, *rev)).collect();
        campaigns.sort_by_key(|c| std::cmp::Reverse(c.created_at_unix_ms));
        Ok(Response::new(v1::ListCampaignsResponse { campaigns }))
    }

    async fn get_campaign(
        &self,
        req: Request<v1::GetCampaignRequest>,
    ) -> Result<Response<v1::CampaignInfo>, Status> {
        let id = req.into_inner().id;
        check_id(&id)?;
        match records::load(&self.backend, &id).await.map_err(store_err)? {
            Some((c, rev)) => Ok(Response::new(conv::info(&c, rev))),
            None => Err(Status::not_found(format!("no campaign {id:?}"))),
        }
    }

    type WatchCampaignStream = InfoStream;

    async fn watch_campaign(
        &self,
        req: Request<v1::GetCampaignRequest>,
    ) -> Result<Response<InfoStream>, Status> {
        let id = req.into_inner().id;
        check_id(&id)?;
        let Some((c, rev)) = records::load(&self.backend, &id).await.map_err(store_err)? else {
            return Err(Status::not_found(format!("no campaign {id:?}")));
        };
        let changes = self
            .backend
            .watch(WatchRequest {
                range: KeyRange::prefix(keys::campaign_prefix(&id)),
                start_revision: rev + 1,
                prev_kv: false,
            })
            .await
            .map_err(store_err)?;
        let backend = self.backend.clone();
        let first = futures::stream::once(async move { Ok(conv::info(&c, rev)) });
        // Each batch of changes: the campaign read again, whole.
        let rest = changes.then(move |batch| {
            let (backend, id) = (backend.clone(), id.clone());
            async move {
                batch.map_err(store_err)?;
                match records::load(&backend, &id).await.map_err(store_err)? {
                    Some((c, rev)) => Ok(conv::info(&c, rev)),
                    None => Err(Status::not_found(format!("campaign {id:?} was removed"))),
                }
            }
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn act_on_campaign(
        &self,
        req: Request<v1::CampaignActionRequest>,
    ) -> Result<Response<v1::CampaignInfo>, Status> {
        {
            let r = req.get_ref();
            let action =
                v1::CampaignAction::try_from(r.action).map_or("unknown", |a| a.as_str_name());
            let mut t = format!("campaign/{} {action}", r.id);
            for (k, v) in [("gate", &r.gate), ("cluster", &r.cluster)] {
                if !v.is_empty() {
                    t.push_str(&format!(" {k}={v}"));
                }
            }
            crate::security::authz::audit_target(&req, t);
        }
        let r = req.into_inner();
        check_id(&r.id)?;
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let command = match v1::CampaignAction::try_from(r.action) {
            Ok(v1::CampaignAction::Approve) => Command::Approve(opt(r.gate)),
            Ok(v1::CampaignAction::Pause) => Command::Pause,
            Ok(v1::CampaignAction::Resume) => Command::Resume,
            Ok(v1::CampaignAction::Abort) => Command::Abort,
            Ok(v1::CampaignAction::Rollback) => Command::Rollback(opt(r.cluster)),
            Ok(v1::CampaignAction::Retry) => Command::Retry,
            Ok(v1::CampaignAction::Complete) => Command::Complete,
            _ => {
                return Err(flotilla_api::convert::fleet::Invalid {
                    field: "action".into(),
                    reason: "approve, pause, resume, abort, rollback, retry or complete".into(),
                }
                .to_status());
            }
        };
        if !self.leader.is_leader() {
            return Err(not_leader(&*self.leader));
        }
        let (c, rev) = self
            .campaigns
            .ask(
                |reply| Input::Act {
                    id: r.id,
                    command,
                    reply,
                },
                Duration::from_secs(20),
            )
            .await?;
        Ok(Response::new(conv::info(&c, rev)))
    }
}
