//! How a member reaches the other members (Raft messages, forwarded requests, joins). The
//! embedding program chooses it, so TLS and custom connectors live with the server that
//! terminates them.

use std::fmt::Debug;
use std::time::Duration;

use tonic::transport::Endpoint;

/// Builds the endpoint for another member's `host:port`.
pub trait Transport: Debug + Send + Sync + 'static {
    /// An endpoint (scheme, timeouts, TLS) for the member at `addr`.
    fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error>;
}

/// Plaintext HTTP/2 with a short connect timeout and Nagle off.
#[derive(Debug, Clone)]
pub struct PlainTransport {
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
}

impl Default for PlainTransport {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl Transport for PlainTransport {
    fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        Ok(flotilla_api::grpc::client(
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true),
        ))
    }
}
