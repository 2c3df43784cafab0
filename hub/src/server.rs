//! The hub's one gRPC server. The store's services (Kv, Raft, StoreAdmin), the fleet's
//! (AgentService, FleetService), health and reflection are all mounted here, so transport
//! security, authentication and authorization have one place to go.

use flotilla_api::v1;
use flotilla_raft_store::service::KvService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::store::backend::HubStore;
use std::sync::Arc;

/// The hub's routes, assembled here once for every store backend: the store's own services
/// (`store`: Kv, and on Raft also Raft and StoreAdmin), then the fleet's over `hub`.
pub fn routes(store: Routes, fleet: &crate::fleet::Fleet, hub: &HubStore) -> Routes {
    let leadership = || -> Arc<dyn crate::controllers::Leadership> { Arc::new(hub.clone()) };
    store
        .add_service(fleet.agent_service(hub.clone(), leadership()))
        .add_service(fleet.fleet_service(hub.clone()))
        .add_service(fleet.discovery_service(hub.clone()))
        .add_service(fleet.campaign_service(hub.clone(), leadership()))
}

/// Serves `routes` plus gRPC health and reflection on `listener` until `shutdown`: with TLS
/// when the fleet has it, every request authenticated, checked against the role table and
/// audited (`crate::security::authz`).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    fleet: crate::fleet::Fleet,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let tls = fleet.security.tls.clone();
    let authz = crate::security::authz::AuthzLayer {
        fleet: tls.as_ref().map(|t| Arc::from(t.fleet.as_str())),
        audit: fleet.security.audit.clone(),
        denied: fleet.metrics.denied.clone(),
        api_tokens: fleet.security.api_tokens.clone(),
        clock: fleet.health.clock_arc(),
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<v1::kv_server::KvServer<KvService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let incoming = flotilla_api::tls::incoming(listener, tls.map(|t| t.server.clone()));
    flotilla_api::grpc::server()
        .layer(authz)
        .add_routes(routes)
        .add_service(health_svc)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
