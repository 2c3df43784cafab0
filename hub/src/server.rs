//! The hub's one gRPC server. The store's services (Kv, Raft, StoreAdmin), the fleet's
//! (AgentService, FleetService), health and reflection are all mounted here, so transport
//! security, authentication and authorization have one place to go.

use flotilla_api::v1;
use flotilla_raft_store::nodelay_incoming;
use flotilla_raft_store::service::KvService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Serves `routes` plus gRPC health and reflection on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<v1::kv_server::KvServer<KvService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    flotilla_api::grpc::server()
        .add_routes(routes)
        .add_service(health_svc)
        .add_service(reflection)
        .serve_with_incoming_shutdown(nodelay_incoming(listener), shutdown.cancelled_owned())
        .await
}
