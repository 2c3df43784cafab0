//! The one seam every Flotilla gRPC connection and listener goes through: the HTTP/2 limits
//! both sides agree on, how a client dials (`host:port` or a URL, with its [`Security`]), and
//! how a server is built. The agent session, flotctl, flotilla-dns's follower, the store
//! client and the Raft transport all dial with [`connect`] or [`endpoint`]; the hub and the
//! standalone store build their listeners with [`server`]. Transport security (issue 22)
//! lives here and nowhere else.

use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::tls::ClientTls;

/// Streams a peer may reset on one connection before it is given up. h2's server default is
/// 20: after a pause, a client shared by many tasks whose requests time out resets more than
/// that at once, and the whole connection (with its watches and in-flight writes) would drop.
pub const MAX_RESET_STREAMS: usize = 1024;

/// How a client's connection is secured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// No transport security (`--insecure`, or `--dev` on loopback).
    #[default]
    Plaintext,
    /// TLS (rustls), with the trust and identity these settings carry.
    Tls(ClientTls),
}

impl Security {
    /// TLS from PEM files: the CA bundle to check the hub against and, optionally, a client
    /// certificate and key; plaintext without a CA. Errors name the flag (`--ca`, `--cert`,
    /// `--key`) at fault.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Security, String> {
        use crate::tls::Identity;
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        let Some(ca) = ca else {
            if cert.is_some() || key.is_some() {
                return Err(
                    "--cert and --key need --ca: the CA the hub's certificate is checked against"
                        .into(),
                );
            }
            return Ok(Security::Plaintext);
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some(
                Identity::from_pem(&read("--cert", c)?, &read("--key", k)?)
                    .map_err(|e| format!("--cert/--key: {e}"))?,
            ),
            (None, None) => None,
            _ => return Err("--cert and --key go together".into()),
        };
        ClientTls::new(&read("--ca", ca)?, identity)
            .map(Security::Tls)
            .map_err(|e| format!("--ca: {e}"))
    }
}

/// How a client dials.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Transport security.
    pub security: Security,
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// For long-lived streams: an HTTP/2 ping this often, and a connection whose peer does not
    /// answer within as long is dropped. A partition that drops packets (no reset) otherwise
    /// leaves the stream hanging until TCP gives up, many minutes later.
    pub keepalive: Option<Duration>,
}

impl Dial {
    /// Plaintext, with `connect_timeout`, no pings.
    pub fn plaintext(connect_timeout: Duration) -> Self {
        Self {
            security: Security::Plaintext,
            connect_timeout,
            keepalive: None,
        }
    }

    /// The same, pinging every `every` (see [`Dial::keepalive`]).
    pub fn with_keepalive(self, every: Duration) -> Self {
        Self {
            keepalive: Some(every),
            ..self
        }
    }
}

/// Why a client could not dial.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The address is not one Flotilla can dial with these settings.
    #[error("{addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing answered, or the connection failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport's error.
        reason: String,
    },
}

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

/// The endpoint for `addr` (`host:port`, or an `http://` URL) as `dial` says: Flotilla's
/// HTTP/2 limits, the connect timeout, no Nagle delay.
pub fn endpoint(addr: &str, dial: &Dial) -> Result<Endpoint, DialError> {
    let bad = |reason: String| DialError::Address {
        addr: addr.to_string(),
        reason,
    };
    let url = match addr.split_once("://") {
        None => format!("http://{addr}"),
        Some(("http", _)) => addr.to_string(),
        Some(("https", rest)) if matches!(dial.security, Security::Tls(_)) => {
            format!("http://{rest}")
        }
        Some((scheme, _)) => {
            return Err(bad(format!(
                "the scheme {scheme:?} is not supported with {:?} (give host:port)",
                dial.security
            )));
        }
    };
    let mut ep = Endpoint::from_shared(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(dial.connect_timeout)
        .tcp_nodelay(true);
    if let Some(every) = dial.keepalive {
        ep = ep
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(every)
            .keep_alive_while_idle(true);
    }
    Ok(client(ep))
}

/// Dial `addr` now.
pub async fn connect(addr: &str, dial: &Dial) -> Result<Channel, DialError> {
    let ep = endpoint(addr, dial)?;
    let connected = match &dial.security {
        Security::Plaintext => ep.connect().await,
        Security::Tls(tls) => ep.connect_with_connector(TlsConnector(tls.clone())).await,
    };
    connected.map_err(|e| DialError::Connect {
        addr: addr.to_string(),
        reason: error_chain(&e),
    })
}

/// A channel to `addr` that connects on first use (and reconnects after a failure).
pub fn lazy(addr: &str, dial: &Dial) -> Result<Channel, DialError> {
    let ep = endpoint(addr, dial)?;
    Ok(match &dial.security {
        Security::Plaintext => ep.connect_lazy(),
        Security::Tls(tls) => ep.connect_with_connector_lazy(TlsConnector(tls.clone())),
    })
}

/// Dials TLS for tonic: TCP, then the handshake, checking the server's name is the host dialled.
#[derive(Clone)]
struct TlsConnector(ClientTls);

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            Ok(TokioIo::new(tls.dial(&host, port).await?))
        })
    }
}

/// The transport error with its causes (tonic's own message is only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_port_or_http_urls() {
        let d = Dial::plaintext(Duration::from_secs(1));
        assert_eq!(
            endpoint("127.0.0.1:7400", &d).unwrap().uri().to_string(),
            "http://127.0.0.1:7400/"
        );
        assert_eq!(
            endpoint("http://hub.example:7400", &d)
                .unwrap()
                .uri()
                .to_string(),
            "http://hub.example:7400/"
        );
        let e = endpoint("https://hub.example:7400", &d).unwrap_err();
        assert!(e.to_string().contains("\"https\" is not supported"), "{e}");
        let e = endpoint("not a host", &d).unwrap_err();
        assert!(matches!(e, DialError::Address { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_address_and_the_cause() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let e = connect(&addr, &Dial::plaintext(Duration::from_secs(1)))
            .await
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("cannot connect to {addr}")), "{s}");
        assert!(s.to_lowercase().contains("refused"), "{s}");
    }
}
