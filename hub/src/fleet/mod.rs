//! Fleet membership on the hub: agent streams (leader), the fleet view and read API (every
//! replica), health tracking (leader) and join tokens. State lives in the store as protobuf
//! records under `/clusters/`, `/inventory/` and `/tokens/`.

pub mod agent;
pub mod health;
pub mod records;
pub mod service;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::fleet::ReportLimits;
use flotilla_api::v1;
use flotilla_core::health::Policy;
use flotilla_raft_store::StoreNode;
use tokio_util::sync::CancellationToken;

/// Who leads the store (side effects and agent streams happen only there).
pub trait Leadership: Send + Sync + 'static {
    /// Whether this replica leads.
    fn is_leader(&self) -> bool;
    /// The leader's gRPC address, if known.
    fn leader_addr(&self) -> Option<String>;
}

impl Leadership for StoreNode {
    fn is_leader(&self) -> bool {
        self.leader().is_some_and(|(id, _)| id == self.id())
    }

    fn leader_addr(&self) -> Option<String> {
        self.leader().map(|(_, a)| a)
    }
}

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
}

/// The fleet's shared parts, created before the store member starts serving.
#[derive(Clone)]
pub struct Fleet {
    /// This replica's view.
    pub view: Arc<view::FleetView>,
    /// Health controller.
    pub health: Arc<health::HealthCtl>,
    /// Settings.
    pub config: FleetConfig,
    /// Metrics.
    pub metrics: Arc<crate::metrics::HubMetrics>,
    /// Admission to the join handshake, shared by every route set this replica serves.
    joins: Arc<tokio::sync::Semaphore>,
}

impl Fleet {
    /// New, empty fleet state.
    pub fn new(config: FleetConfig) -> Self {
        Self {
            view: view::FleetView::new(),
            health: health::HealthCtl::new(config.policy),
            config,
            metrics: crate::metrics::HubMetrics::new(),
            joins: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_joins.max(1),
            )),
        }
    }

    /// The gRPC services for a store member.
    pub fn routes(&self, node: StoreNode) -> tonic::service::Routes {
        let agent = agent::AgentSvc {
            backend: node.clone(),
            health: self.health.clone(),
            leader: Arc::new(node.clone()),
            limits: self.config.limits,
            heartbeat: self.config.heartbeat,
            metrics: self.metrics.clone(),
            joins: self.joins.clone(),
        };
        let fleet = service::FleetSvc {
            backend: node,
            view: self.view.clone(),
        };
        tonic::service::Routes::new(v1::agent_service_server::AgentServiceServer::new(agent))
            .add_service(v1::fleet_service_server::FleetServiceServer::new(fleet))
    }

    /// Start the view and the health controller for a running member.
    pub fn spawn(
        &self,
        node: StoreNode,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        use tracing::Instrument;
        let view = tokio::spawn(
            self.view
                .clone()
                .run(node.clone(), shutdown.clone())
                .instrument(tracing::info_span!("fleet-view")),
        );
        let tick = (self.config.policy.unreachable_after / 6)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        let health = tokio::spawn(
            self.health
                .clone()
                .run(
                    node.clone(),
                    self.view.clone(),
                    Arc::new(node),
                    tick,
                    shutdown,
                )
                .instrument(tracing::info_span!("fleet-health")),
        );
        vec![view, health]
    }
}
