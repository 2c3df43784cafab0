//! Fleet membership on the hub: agent streams (leader), the fleet view and read API (every
//! replica) and join tokens. State lives in the store (schema in `store::keys`); health
//! tracking is a controller (`controllers::health`).

pub mod agent;
pub mod outbox;
pub mod service;
pub mod stream;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::fleet::ReportLimits;
use flotilla_api::v1;
use flotilla_core::health::Policy;
use flotilla_core::kv::KvBackend;

use crate::controllers::health::{HealthController, HealthCtl};
use crate::controllers::{Clock, Leadership, SystemClock};
use crate::metrics::HubMetrics;

/// Fleet settings (hub flags).
#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    /// Health timing.
    pub policy: Policy,
    /// Heartbeat interval agents are asked for.
    pub heartbeat: Duration,
    /// Report limits.
    pub limits: ReportLimits,
    /// Agents in the join handshake at once.
    pub max_concurrent_joins: usize,
    /// Export per-node GPU series too (`--metrics-per-node`).
    pub metrics_per_node: bool,
    /// Messages per second one agent stream may send (bursts of four times as many, at
    /// least 100); over it the stream is closed with RESOURCE_EXHAUSTED.
    pub message_rate: u32,
}

/// The fleet's shared parts, created before the hub serves.
#[derive(Clone)]
pub struct Fleet {
    /// This replica's view.
    pub view: Arc<view::FleetView>,
    /// This replica's discovery state and routing table.
    pub discovery: Arc<crate::discovery::Discovery>,
    /// Health state the agent streams report to.
    pub health: Arc<HealthCtl>,
    /// Settings.
    pub config: FleetConfig,
    /// Metrics.
    pub metrics: Arc<HubMetrics>,
    /// Campaigns' outboxes and controller inbox, shared by the agent streams.
    pub campaigns: Arc<crate::campaigns::Campaigns>,
    /// TLS and the CA (when secure), revocations, the audit log.
    pub security: Arc<FleetSecurity>,
    /// Admission to the join handshake, shared by every stream this replica serves.
    joins: Arc<tokio::sync::Semaphore>,
}

/// The security parts the fleet's services share.
pub struct FleetSecurity {
    /// The hub's TLS and CA; `None` without TLS (`--insecure`, `--dev`).
    pub tls: Option<Arc<crate::security::HubTls>>,
    /// Revoked cluster identities (mirrored).
    pub revocations: Arc<crate::security::Revocations>,
    /// API bearer tokens (mirrored).
    pub api_tokens: Arc<crate::security::api_tokens::ApiTokens>,
    /// The audit log.
    pub audit: crate::security::audit::Audit,
    /// The audit writer's queue, taken once by whoever runs the writer.
    pub audit_queue: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<v1::AuditRecord>>>,
}

impl Fleet {
    /// New, empty fleet state on the system clock.
    pub fn new(config: FleetConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock::default()))
    }

    /// New, empty fleet state on `clock`.
    pub fn with_clock(config: FleetConfig, clock: Arc<dyn Clock>) -> Self {
        let view = view::FleetView::new();
        let campaigns = crate::campaigns::Campaigns::new();
        let metrics = HubMetrics::new(
            view.clone(),
            config.metrics_per_node,
            vec![Box::new(campaigns.series.clone())],
        );
        let (audit, queue) =
            crate::security::audit::Audit::new(clock.clone(), metrics.audit_dropped.clone());
        Self {
            security: Arc::new(FleetSecurity {
                tls: None,
                revocations: Default::default(),
                api_tokens: Default::default(),
                audit,
                audit_queue: std::sync::Mutex::new(Some(queue)),
            }),
            metrics,
            discovery: crate::discovery::Discovery::new(view.clone()),
            view,
            health: HealthCtl::new(config.policy, clock),
            campaigns,
            config,
            joins: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_joins.max(1),
            )),
        }
    }

    /// The same fleet serving with TLS and signing with `tls`'s CA (before any service is
    /// made).
    pub fn with_tls(mut self, tls: Arc<crate::security::HubTls>) -> Self {
        let s = Arc::get_mut(&mut self.security).expect("with_tls before the services are made");
        s.tls = Some(tls);
        self
    }

    /// The agent-facing gRPC service.
    pub fn agent_service<B: KvBackend + Clone>(
        &self,
        backend: B,
        leader: Arc<dyn Leadership>,
    ) -> v1::agent_service_server::AgentServiceServer<agent::AgentSvc<B>> {
        v1::agent_service_server::AgentServiceServer::new(agent::AgentSvc {
            message_rate: self.config.message_rate,
            backend,
            health: self.health.clone(),
            leader,
            limits: self.config.limits,
            heartbeat: self.config.heartbeat,
            metrics: self.metrics.clone(),
            joins: self.joins.clone(),
            discovery: self.discovery.clone(),
            campaigns: self.campaigns.clone(),
            security: self.security.clone(),
        })
        .max_decoding_message_size(agent::MAX_MESSAGE_BYTES)
    }

    /// The campaign API.
    pub fn campaign_service<B: KvBackend + Clone>(
        &self,
        backend: B,
        leader: Arc<dyn Leadership>,
    ) -> v1::campaign_service_server::CampaignServiceServer<crate::campaigns::service::CampaignSvc<B>>
    {
        v1::campaign_service_server::CampaignServiceServer::new(
            crate::campaigns::service::CampaignSvc {
                backend,
                campaigns: self.campaigns.clone(),
                leader,
            },
        )
    }

    /// The leader-only campaign controller, for the leadership runner.
    pub fn campaign_controller<B: KvBackend + Clone>(
        &self,
        backend: B,
    ) -> crate::campaigns::controller::CampaignController<B> {
        crate::campaigns::controller::CampaignController {
            campaigns: self.campaigns.clone(),
            backend,
            view: self.view.clone(),
            clock: self.health.clock_arc(),
            tick: self.tick().min(Duration::from_millis(100)),
        }
    }

    /// The discovery API.
    pub fn discovery_service<B: KvBackend + Clone>(
        &self,
        backend: B,
    ) -> v1::discovery_service_server::DiscoveryServiceServer<
        crate::discovery::service::DiscoverySvc<B>,
    > {
        v1::discovery_service_server::DiscoveryServiceServer::new(
            crate::discovery::service::DiscoverySvc {
                backend,
                discovery: self.discovery.clone(),
                view: self.view.clone(),
            },
        )
    }

    /// The fleet read API.
    pub fn fleet_service<B: KvBackend + Clone>(
        &self,
        backend: B,
    ) -> v1::fleet_service_server::FleetServiceServer<service::FleetSvc<B>> {
        v1::fleet_service_server::FleetServiceServer::new(service::FleetSvc {
            backend,
            view: self.view.clone(),
            security: self.security.clone(),
            clock: self.health.clock_arc(),
        })
    }

    /// The leader-only health controller, for the leadership runner.
    pub fn health_controller<B: KvBackend + Clone>(&self, backend: B) -> HealthController<B> {
        HealthController {
            ctl: self.health.clone(),
            backend,
            view: self.view.clone(),
            tick: self.tick(),
        }
    }

    /// How often the leader judges liveness (and checks leadership).
    pub fn tick(&self) -> Duration {
        (self.config.policy.unreachable_after / 6)
            .clamp(Duration::from_millis(50), Duration::from_millis(500))
    }
}
