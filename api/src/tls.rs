//! TLS for the transport seam (rustls, ring): the configs clients dial with and servers accept
//! with, the connector a [`crate::grpc::Security::Tls`] client dials through, the listener
//! that completes handshakes off the accept loop, and the [`Peer`] every request carries.
//!
//! Certificates sit behind [`Identity`] (an atomically swapped key and chain) and server
//! configs behind [`ServerTls`], so a renewed certificate or a new CA bundle takes effect on the
//! next handshake without a restart. Each config names its crypto provider, so no process-wide
//! default has to be installed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

use crate::pki::{self, PkiError};

/// How long a server waits for a TLS handshake before dropping the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &'static str) -> impl Fn(rustls::Error) -> PkiError {
    move |e| PkiError::Invalid {
        what,
        reason: e.to_string(),
    }
}

/// A certificate chain and key that can be replaced while in use (renewal, rotation).
#[derive(Debug, Default)]
pub struct Identity {
    current: ArcSwapOption<CertifiedKey>,
}

impl Identity {
    /// An identity from a PEM chain (leaf first) and PEM key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Arc<Identity>, PkiError> {
        let id = Arc::new(Identity::default());
        id.set(chain_pem, key_pem)?;
        Ok(id)
    }

    /// Replaces the chain and key; the next handshake uses them.
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let chain = pki::certs(chain_pem, "certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| PkiError::Invalid {
                what: "key",
                reason: e.to_string(),
            })?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(tls_err("key"))?;
        let ck = CertifiedKey::new(chain, signer);
        ck.keys_match().map_err(tls_err("key"))?;
        self.current.store(Some(Arc::new(ck)));
        Ok(())
    }

    /// The leaf in use.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().as_ref().map(|ck| ck.cert[0].clone())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in pki::certs(ca_pem, "CA bundle")? {
        roots.add(c).map_err(tls_err("CA bundle"))?;
    }
    Ok(roots)
}

/// A client's TLS settings: whom it trusts and, optionally, who it is. Clones share them, so
/// [`ClientTls::set_roots`] reaches every clone.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ArcSwap<ClientConfig>>,
    identity: Option<Arc<Identity>>,
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}
impl Eq for ClientTls {}

impl ClientTls {
    /// Trusts the CAs in `ca_pem` (old and new roots, during a rotation); presents `identity`.
    pub fn new(ca_pem: &str, identity: Option<Arc<Identity>>) -> Result<ClientTls, PkiError> {
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
                .build()
                .map_err(|e| PkiError::Invalid {
                    what: "CA bundle",
                    reason: e.to_string(),
                })?;
        Ok(Self::with_verifier(verifier, identity))
    }

    /// Trusts only a server whose chain contains a CA with this public-key hash (a join
    /// string's pin), before the agent has a CA bundle of its own.
    pub fn pinned(pin: &str) -> ClientTls {
        Self::with_verifier(
            Arc::new(PinnedCa {
                pin: pin.to_ascii_lowercase(),
                provider: provider(),
            }),
            None,
        )
    }

    /// The same trust and identity for HTTP/1.1 over TLS (a hub's metrics port).
    pub fn http1(ca_pem: &str, identity: Option<Arc<Identity>>) -> Result<ClientTls, PkiError> {
        let t = Self::new(ca_pem, identity)?;
        let mut config = (*t.config.load_full()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        t.config.store(Arc::new(config));
        Ok(t)
    }

    /// Trusts a new CA bundle from the next connection on (a CA rotation).
    pub fn set_roots(&self, ca_pem: &str) -> Result<(), PkiError> {
        let next = Self::new(ca_pem, self.identity.clone())?;
        let mut config = (*next.config.load_full()).clone();
        config.alpn_protocols = self.config.load().alpn_protocols.clone();
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The identity presented, if any.
    pub fn identity(&self) -> Option<&Arc<Identity>> {
        self.identity.as_ref()
    }

    fn with_verifier(
        verifier: Arc<dyn ServerCertVerifier>,
        identity: Option<Arc<Identity>>,
    ) -> ClientTls {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &identity {
            Some(id) => builder.with_client_cert_resolver(id.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session carries the old client certificate, and a
        // renewed one must be what the hub sees on the next connection. Connections are
        // long-lived, so the full handshake costs little.
        config.resumption = rustls::client::Resumption::disabled();
        ClientTls {
            config: Arc::new(ArcSwap::from_pointee(config)),
            identity,
        }
    }

    /// Dials `host:port` and completes the handshake, checking the server's name is `host`.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(self.config.load_full())
            .connect(name, tcp)
            .await
    }
}

/// Verifies a server's chain against the CA in it whose public key has the pinned hash.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::spki_sha256(c).is_ok_and(|h| h == self.pin))
            .ok_or_else(|| {
                rustls::Error::General(
                    "the hub's CA does not match the join string's sha256 pin \
                     (wrong hub, or the join string is for another fleet)"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server's TLS settings, replaceable while it serves (a new CA bundle during rotation).
#[derive(Debug)]
pub struct ServerTls {
    config: ArcSwap<ServerConfig>,
    identity: Arc<Identity>,
    alpn: Vec<Vec<u8>>,
}

impl ServerTls {
    /// Serves `identity` (its chain should end with the CA, so agents can check their pin)
    /// and verifies client certificates against `ca_pem`. Clients without one are let in
    /// as anonymous: only an agent bootstrapping with a join token is allowed anything then.
    pub fn new(ca_pem: &str, identity: Arc<Identity>) -> Result<Arc<ServerTls>, PkiError> {
        Self::with_alpn(ca_pem, identity, &[b"h2"])
    }

    /// The same for HTTP/1.1 (the metrics and health port).
    pub fn http1(ca_pem: &str, identity: Arc<Identity>) -> Result<Arc<ServerTls>, PkiError> {
        Self::with_alpn(ca_pem, identity, &[b"http/1.1"])
    }

    fn with_alpn(
        ca_pem: &str,
        identity: Arc<Identity>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerTls>, PkiError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let config = Self::config(ca_pem, &identity, &alpn)?;
        Ok(Arc::new(ServerTls {
            config: ArcSwap::from_pointee(config),
            identity,
            alpn,
        }))
    }

    fn config(
        ca_pem: &str,
        identity: &Arc<Identity>,
        alpn: &[Vec<u8>],
    ) -> Result<ServerConfig, PkiError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Invalid {
                    what: "CA bundle",
                    reason: e.to_string(),
                })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.clone());
        config.alpn_protocols = alpn.to_vec();
        Ok(config)
    }

    /// Trusts a new CA bundle from the next handshake on.
    pub fn set_roots(&self, ca_pem: &str) -> Result<(), PkiError> {
        self.config
            .store(Arc::new(Self::config(ca_pem, &self.identity, &self.alpn)?));
        Ok(())
    }

    /// The identity served.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }
}

/// Where a request came from, as every request's extensions carry it.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The remote address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client's verified certificate chain, leaf first (TLS with a client certificate).
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// An accepted connection: plaintext or TLS.
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream, Peer),
    /// TLS, handshake complete.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Peer),
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// Accepts on `listener` (no Nagle delay), completing TLS handshakes (with `tls`) in their own
/// tasks so a slow or hostile client cannot hold up the accept loop. A failed handshake is
/// logged and dropped. The loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let peer = Peer {
                remote: Some(remote),
                ..Peer::default()
            };
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(tcp, peer))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.load_full());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => {
                                let certs = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|c| Arc::new(c.to_vec()));
                                let peer = Peer {
                                    tls: true,
                                    certs,
                                    ..peer
                                };
                                let _ = tx.send(Ok(Conn::Tls(Box::new(s), peer))).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream_of(rx)
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Usage};
    use flotilla_core::security::SpiffeId;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// A CA, and a server on 127.0.0.1 serving a hub certificate chained to it.
    async fn server(
        ca: &Ca,
    ) -> (
        SocketAddr,
        Arc<ServerTls>,
        impl futures::Stream<Item = io::Result<Conn>>,
    ) {
        let hub = ca
            .issue(
                &SpiffeId::hub("f", "1"),
                &Usage::Peer(vec!["127.0.0.1".into()]),
                now(),
                3600,
            )
            .unwrap();
        let chain = format!("{}{}", hub.cert_pem, ca.cert_pem());
        let tls = ServerTls::new(
            ca.cert_pem(),
            Identity::from_pem(&chain, &hub.key_pem).unwrap(),
        )
        .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, tls.clone(), incoming(l, Some(tls)))
    }

    /// Dials and exchanges one byte each way, so a refused client certificate (TLS 1.3
    /// reports it after the handshake) shows up as an error.
    async fn ping(client: &ClientTls, addr: SocketAddr) -> io::Result<()> {
        let mut s = client.dial("127.0.0.1", addr.port()).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok(())
    }

    /// Accepts one connection, answers one byte, and gives its peer.
    async fn answer(
        incoming: &mut (impl futures::Stream<Item = io::Result<Conn>> + Unpin),
    ) -> Peer {
        let mut c = incoming.next().await.unwrap().unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        c.write_all(b"y").await.unwrap();
        c.flush().await.unwrap();
        c.connect_info()
    }

    #[tokio::test]
    async fn a_client_certificate_reaches_the_request_and_anonymous_clients_get_in_without() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let (addr, _, incoming) = server(&ca).await;
        let mut incoming = Box::pin(incoming);
        let agent = ca
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, now(), 3600)
            .unwrap();
        let client = ClientTls::new(
            ca.cert_pem(),
            Some(Identity::from_pem(&agent.cert_pem, &agent.key_pem).unwrap()),
        )
        .unwrap();
        let (r, peer) = tokio::join!(ping(&client, addr), answer(&mut incoming));
        r.unwrap();
        assert!(peer.tls);
        let certs = peer.certs.expect("the client's certificate");
        assert_eq!(
            pki::leaf(&certs[0]).unwrap().uris,
            vec![SpiffeId::cluster("f", "a")]
        );

        let anonymous = ClientTls::new(ca.cert_pem(), None).unwrap();
        let (r, peer) = tokio::join!(ping(&anonymous, addr), answer(&mut incoming));
        r.unwrap();
        assert!(peer.tls && peer.certs.is_none());
    }

    #[tokio::test]
    async fn the_pin_admits_only_the_hub_of_that_ca() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let (addr, _, incoming) = server(&ca).await;
        let mut incoming = Box::pin(incoming);
        let pinned = ClientTls::pinned(&ca.pin());
        let (r, _) = tokio::join!(ping(&pinned, addr), answer(&mut incoming));
        r.unwrap();
        let (other, _) = Ca::generate("f", now()).unwrap();
        let e = ping(&ClientTls::pinned(&other.pin()), addr)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("sha256 pin"), "{e}");
        // A client trusting another CA refuses the hub too.
        let e = ping(&ClientTls::new(other.cert_pem(), None).unwrap(), addr)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let (addr, _, incoming) = server(&ca).await;
        let _incoming = Box::pin(incoming);
        let (rogue, _) = Ca::generate("f", now()).unwrap();
        let forged = rogue
            .issue(&SpiffeId::cluster("f", "b"), &Usage::Client, now(), 3600)
            .unwrap();
        let id = Identity::from_pem(&forged.cert_pem, &forged.key_pem).unwrap();
        let client = ClientTls::new(ca.cert_pem(), Some(id)).unwrap();
        assert!(ping(&client, addr).await.is_err());
    }

    #[tokio::test]
    async fn a_renewed_identity_and_new_roots_apply_from_the_next_handshake() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let (addr, server_tls, incoming) = server(&ca).await;
        let mut incoming = Box::pin(incoming);
        let first = ca
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, now(), 3600)
            .unwrap();
        let id = Identity::from_pem(&first.cert_pem, &first.key_pem).unwrap();
        let client = ClientTls::new(ca.cert_pem(), Some(id.clone())).unwrap();
        let (r, p1) = tokio::join!(ping(&client, addr), answer(&mut incoming));
        r.unwrap();
        let renewed = ca
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, now(), 7200)
            .unwrap();
        id.set(&renewed.cert_pem, &renewed.key_pem).unwrap();
        let (r, p2) = tokio::join!(ping(&client, addr), answer(&mut incoming));
        r.unwrap();
        let serial = |p: &Peer| pki::leaf(&p.certs.as_ref().unwrap()[0]).unwrap().serial;
        assert_ne!(serial(&p1), serial(&p2));
        assert_eq!(pki::leaf(&id.leaf().unwrap()).unwrap().serial, serial(&p2));

        // Rotation: a new CA's client is refused until the server trusts old and new roots.
        let (next, _) = Ca::generate("f", now()).unwrap();
        let n = next
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, now(), 3600)
            .unwrap();
        let nclient = ClientTls::new(
            ca.cert_pem(),
            Some(Identity::from_pem(&n.cert_pem, &n.key_pem).unwrap()),
        )
        .unwrap();
        assert!(ping(&nclient, addr).await.is_err());
        server_tls
            .set_roots(&format!("{}{}", ca.cert_pem(), next.cert_pem()))
            .unwrap();
        let (r, _) = tokio::join!(ping(&nclient, addr), answer(&mut incoming));
        r.unwrap();
        let (r, _) = tokio::join!(ping(&client, addr), answer(&mut incoming));
        r.unwrap();
    }
}
