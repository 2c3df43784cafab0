//! How a member reaches the other members (Raft messages, forwarded requests, joins). The
//! embedding program chooses it; the default dials through Flotilla's one transport seam
//! (`flotilla_api::grpc`), where transport security lives.

use std::fmt::Debug;
use std::time::Duration;

use flotilla_api::grpc::{Dial, DialError};
use tonic::transport::Channel;

/// Builds the channel to another member's `host:port`.
pub trait Transport: Debug + Send + Sync + 'static {
    /// A lazily connecting channel (timeouts, security) to the member at `addr`.
    fn channel(&self, addr: &str) -> Result<Channel, DialError>;
}

/// Members dialled as `dial` says (default: plaintext, a short connect timeout).
#[derive(Debug, Clone)]
pub struct DialTransport {
    /// How members are dialled.
    pub dial: Dial,
}

impl Default for DialTransport {
    fn default() -> Self {
        Self {
            dial: Dial::plaintext(Duration::from_secs(1)),
        }
    }
}

impl Transport for DialTransport {
    fn channel(&self, addr: &str) -> Result<Channel, DialError> {
        flotilla_api::grpc::lazy(addr, &self.dial)
    }
}
