//! The small HTTP side every Flotilla process serves next to gRPC: Prometheus metrics
//! (`/metrics`), liveness (`/healthz`) and readiness (`/readyz`).

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

async fn handle<P: Probe>(
    p: Arc<P>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
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

/// Serve until `shutdown`.
pub async fn serve<P: Probe>(listener: TcpListener, probe: Arc<P>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let p = probe.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(p.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! { _ = conn => {}, _ = token.cancelled() => {} }
        });
    }
}
