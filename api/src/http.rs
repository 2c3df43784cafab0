//! The small HTTP side every Flotilla process serves next to gRPC: Prometheus metrics
//! (`/metrics`), liveness (`/healthz`) and readiness (`/readyz`). With TLS (the hub outside
//! `--dev`/`--insecure`) it is HTTPS, and `/metrics` needs a client certificate from the
//! fleet's CA or a bearer token ([`MetricsAuth`]); the probes stay open, as kubelet sends
//! neither.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the endpoints report.
pub trait Probe: Send + Sync + 'static {
    /// Refresh gauges that are computed at scrape time.
    fn refresh(&self) {}
    /// The registry to encode.
    fn registry(&self) -> &Registry;
    /// `Ok(())` when ready to serve, else why not.
    fn ready(&self) -> Result<(), String>;
}

fn reply(code: u16, ct: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", ct)
        .body(Full::new(body.into()))
        .expect("response")
}

/// Who may read `/metrics` on a TLS port.
#[derive(Clone, Default)]
pub struct MetricsAuth {
    /// SHA-256 (hex) of the bearer token a scraper may send instead of a client certificate.
    pub token_sha256: Option<String>,
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsAuth { .. }")
    }
}

impl MetricsAuth {
    /// Whether a request from `peer` with `authorization` may read the metrics.
    fn allows(&self, peer: &crate::tls::Peer, authorization: Option<&str>) -> bool {
        use sha2::Digest;
        if !peer.tls || peer.certs.is_some() {
            return true;
        }
        let (Some(want), Some(got)) = (
            &self.token_sha256,
            authorization.and_then(|a| a.strip_prefix("Bearer ")),
        ) else {
            return false;
        };
        let got = flotilla_core::security::hex(&sha2::Sha256::digest(got.trim().as_bytes()));
        flotilla_core::security::constant_time_eq(want, &got)
    }
}

async fn handle<P: Probe>(
    p: Arc<P>,
    (peer, auth): (crate::tls::Peer, MetricsAuth),
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    Ok(match req.uri().path() {
        "/metrics" if !auth.allows(&peer, authorization) => reply(
            401,
            "text/plain",
            "/metrics needs a client certificate from the fleet CA or a bearer token\n",
        ),
        "/metrics" => {
            p.refresh();
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, p.registry()) {
                Ok(()) => reply(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => reply(500, "text/plain", format!("encoding metrics failed: {e}\n")),
            }
        }
        "/healthz" | "/livez" => reply(200, "text/plain", "ok\n"),
        "/readyz" => match p.ready() {
            Ok(()) => reply(200, "text/plain", "ready\n"),
            Err(why) => reply(503, "text/plain", format!("not ready: {why}\n")),
        },
        other => reply(
            404,
            "text/plain",
            format!("no such endpoint {other}; try /metrics, /healthz, /readyz\n"),
        ),
    })
}

/// Serve plaintext until `shutdown`.
pub async fn serve<P: Probe>(listener: TcpListener, probe: Arc<P>, shutdown: CancellationToken) {
    serve_tls(listener, probe, None, MetricsAuth::default(), shutdown).await
}

/// Serve until `shutdown`: HTTPS with `tls`, plaintext without; `/metrics` as `auth` says.
pub async fn serve_tls<P: Probe>(
    listener: TcpListener,
    probe: Arc<P>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    auth: MetricsAuth,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    use tonic::transport::server::Connected;
    let incoming = crate::tls::incoming(listener, tls);
    tokio::pin!(incoming);
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let p = probe.clone();
        let token = shutdown.clone();
        let who = (conn.connect_info(), auth.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(p.clone(), who.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(conn), svc);
            tokio::select! { _ = conn => {}, _ = token.cancelled() => {} }
        });
    }
}
