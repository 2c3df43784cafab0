//! The control API of the `flotilla-kube-sim` binary (plain HTTP + JSON, loopback):
//!
//! - `GET  /v1/clusters` — names, URLs and kubeconfig paths
//! - `GET  /v1/clusters/{name}/kubeconfig`
//! - `POST /v1/clusters/{name}/faults` — body: a [`Fault`] as JSON, e.g. `{"type":"gpu-failure","node":"n","count":2}`
//! - `DELETE /v1/clusters/{name}/faults` — body: a fault to clear, or empty to clear all
//! - `POST /v1/clusters/{name}/metrics` — body: a [`MetricsRule`], e.g.
//!   `{"namespace":"ml","selector":"app=llm","values":{"vllm:num_requests_waiting":12}}`:
//!   what the pods' `/metrics` answer through the pod proxy
//! - `DELETE /v1/clusters/{name}/metrics` — forget every value set

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::SimFleet;
use crate::faults::Fault;
use crate::sim::metrics::MetricsRule;

fn reply(code: u16, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&v).expect("json"),
        )))
        .expect("response")
}

async fn handle(
    fleet: Arc<SimFleet>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    Ok(match (method, segs.as_slice()) {
        (Method::GET, ["v1", "clusters"]) => reply(
            200,
            json!({"simulated": true, "clusters": fleet.clusters().iter().map(|c| json!({"name": c.name(), "url": c.url()})).collect::<Vec<_>>()}),
        ),
        (Method::GET, ["v1", "clusters", name, "kubeconfig"]) => match fleet.cluster(name) {
            Some(c) => Response::builder()
                .header(header::CONTENT_TYPE, "application/yaml")
                .body(Full::new(Bytes::from(c.kubeconfig())))
                .expect("response"),
            None => reply(404, json!({"error": format!("no cluster {name:?}")})),
        },
        (m, ["v1", "clusters", name, "faults"]) if m == Method::POST || m == Method::DELETE => {
            let Some(c) = fleet.cluster(name) else {
                return Ok(reply(404, json!({"error": format!("no cluster {name:?}")})));
            };
            if m == Method::DELETE && body.is_empty() {
                c.clear_all();
                return Ok(reply(200, json!({"cleared": "all"})));
            }
            let fault: Fault = match serde_json::from_slice(&body) {
                Ok(f) => f,
                Err(e) => return Ok(reply(400, json!({"error": format!("fault: {e}")}))),
            };
            if m == Method::DELETE {
                c.clear(&fault);
                reply(200, json!({"cleared": fault}))
            } else {
                match c.inject(&fault) {
                    Ok(()) => reply(200, json!({"injected": fault})),
                    Err(e) => reply(e.code, json!({"error": e.message})),
                }
            }
        }
        (m, ["v1", "clusters", name, "metrics"]) if m == Method::POST || m == Method::DELETE => {
            let Some(c) = fleet.cluster(name) else {
                return Ok(reply(404, json!({"error": format!("no cluster {name:?}")})));
            };
            if m == Method::DELETE {
                c.clear_pod_metrics();
                return Ok(reply(200, json!({"cleared": "metrics"})));
            }
            let rule: MetricsRule = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return Ok(reply(400, json!({"error": format!("metrics: {e}")}))),
            };
            match c.set_pod_metrics(rule.clone()) {
                Ok(()) => reply(200, json!({"set": rule})),
                Err(e) => reply(e.code, json!({"error": e.message})),
            }
        }
        _ => reply(404, json!({"error": format!("no route {path}")})),
    })
}

/// Serve the control API until `shutdown`.
pub async fn serve(listener: TcpListener, fleet: Arc<SimFleet>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let f = fleet.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(f.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! { _ = conn => {}, _ = token.cancelled() => {} }
        });
    }
}
