//! HTTP/2 limits every Flotilla gRPC server and client sets, so that both sides agree.

use tonic::transport::{Endpoint, Server};

/// Streams a peer may reset on one connection before it is given up. h2's server default is
/// 20: after a pause, a client shared by many tasks whose requests time out resets more than
/// that at once, and the whole connection (with its watches and in-flight writes) would drop.
pub const MAX_RESET_STREAMS: usize = 1024;

/// A server builder with Flotilla's HTTP/2 limits.
pub fn server() -> Server {
    Server::builder()
        .http2_max_pending_accept_reset_streams(Some(MAX_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_RESET_STREAMS))
}

/// `endpoint` with Flotilla's HTTP/2 limits.
pub fn client(endpoint: Endpoint) -> Endpoint {
    endpoint
        .http2_max_concurrent_reset_streams(MAX_RESET_STREAMS)
        .http2_max_local_error_reset_streams(MAX_RESET_STREAMS)
}
