//! Inference load sampling: for each ServiceExport annotated
//! `flotilla.io/inference-metrics: "<port>"`, the agent reads vLLM's metrics from the export's
//! ready pods through the API server's pod proxy (no network path to the pods needed) every
//! sample interval, and sends the hub the per-cluster means of `vllm:num_requests_waiting`
//! and `vllm:kv_cache_usage_perc` (else the deprecated `vllm:gpu_cache_usage_perc`).

use std::sync::Arc;
use std::time::Duration;

use flotilla_api::v1;
use futures::future::join_all;
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::exports::ExportWatch;

pub use crate::exports::{METRICS_ANNOTATION, PATH_ANNOTATION, Target};

/// Default sample interval (`--inference-sample-interval`).
pub const DEFAULT_INTERVAL: Duration =
    Duration::from_millis(flotilla_core::routing::DEFAULT_SAMPLE_INTERVAL_MS);

/// One pod's load, from its metrics text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodLoad {
    /// `vllm:num_requests_waiting`, summed over the pod's series (one per model).
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (else `vllm:gpu_cache_usage_perc`), the highest series.
    pub kv: f64,
}

/// Read a pod's load from Prometheus text. `None` when it has no queue metric (not vLLM, or
/// not ready). Pure.
pub fn parse(text: &str) -> Option<PodLoad> {
    let (mut waiting, mut kv, mut kv_old) = (None::<f64>, None::<f64>, None::<f64>);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]`; label values may hold spaces, so split at '}'.
        let (name, rest) = match line.find('{') {
            Some(i) => {
                let Some(j) = line[i..].find('}') else {
                    continue;
                };
                (&line[..i], &line[i + j + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r),
                None => continue,
            },
        };
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_waiting" => *waiting.get_or_insert(0.0) += v,
            "vllm:kv_cache_usage_perc" => kv = Some(kv.map_or(v, |k| k.max(v))),
            "vllm:gpu_cache_usage_perc" => kv_old = Some(kv_old.map_or(v, |k| k.max(v))),
            _ => {}
        }
    }
    Some(PodLoad {
        waiting: waiting?,
        kv: kv.or(kv_old).unwrap_or(0.0),
    })
}

/// The cluster's sample of one export: means over the pods that answered. Pure.
pub fn aggregate(t: &Target, pods: &[PodLoad]) -> v1::InferenceLoadSample {
    let n = pods.len() as f64;
    let mean = |f: fn(&PodLoad) -> f64| match pods.is_empty() {
        true => 0.0,
        false => pods.iter().map(f).sum::<f64>() / n,
    };
    v1::InferenceLoadSample {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        queue_depth: mean(|p| p.waiting),
        kv_cache_usage: mean(|p| p.kv),
        pods: pods.len() as u32,
        sampled_at_unix_ms: jiff::Timestamp::now().as_millisecond(),
    }
}

/// The latest samples, for the session to send.
pub type Latest = watch::Receiver<Option<Arc<v1::InferenceLoads>>>;

/// Sample every `interval` until `shutdown`; the receiver gets each round (none while no
/// export opts in).
pub fn start(
    client: Client,
    exports: ExportWatch,
    interval: Duration,
    shutdown: CancellationToken,
) -> Latest {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let targets = exports.inference_targets();
                if targets.is_empty() {
                    continue;
                }
                let rounds = targets.iter().map(|t| sample(&client, t, interval));
                let samples = join_all(rounds).await;
                tx.send_replace(Some(Arc::new(v1::InferenceLoads { samples })));
            }
        }
        .instrument(tracing::info_span!("agent-inference-sampler")),
    );
    rx
}

/// One export's sample: every ready pod read through the pod proxy at once, each bounded by
/// the interval; pods that fail are left out (none answering: `pods` is 0, unknown).
async fn sample(client: &Client, t: &Target, interval: Duration) -> v1::InferenceLoadSample {
    let reads = t.pods.iter().map(|pod| async move {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}:{}/proxy{}",
            t.namespace, pod, t.port, t.path
        );
        let req = http::Request::get(path).body(Vec::new()).ok()?;
        match tokio::time::timeout(interval, client.request_text(req)).await {
            Ok(Ok(text)) => parse(&text),
            Ok(Err(e)) => {
                tracing::debug!(pod = %pod, error = %e, "no metrics from the pod");
                None
            }
            Err(_) => None,
        }
    });
    let pods: Vec<PodLoad> = join_all(reads).await.into_iter().flatten().collect();
    aggregate(t, &pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_metrics_parse_with_labels_and_the_deprecated_kv_name() {
        let text = "# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{model_name=\"a b\",engine=\"0\"} 3\n\
            vllm:num_requests_waiting{model_name=\"c\"} 2.0 1700000000000\n\
            vllm:num_requests_running{model_name=\"a b\"} 9\n\
            vllm:gpu_cache_usage_perc{model_name=\"a b\"} 0.4\n";
        assert_eq!(
            parse(text),
            Some(PodLoad {
                waiting: 5.0,
                kv: 0.4
            })
        );
        let new = "vllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0.7\nvllm:gpu_cache_usage_perc 0.1\n";
        assert_eq!(
            parse(new),
            Some(PodLoad {
                waiting: 1.0,
                kv: 0.7
            })
        );
        assert_eq!(parse("up 1\n"), None, "not vLLM");
        assert_eq!(parse("vllm:num_requests_waiting NaN\n"), None);
    }

    #[test]
    fn samples_are_means_over_the_pods_that_answered() {
        let t = Target {
            namespace: "ml".into(),
            name: "llm".into(),
            port: "8000".into(),
            path: "/metrics".into(),
            pods: vec![],
        };
        let s = aggregate(
            &t,
            &[
                PodLoad {
                    waiting: 2.0,
                    kv: 0.5,
                },
                PodLoad {
                    waiting: 6.0,
                    kv: 0.9,
                },
            ],
        );
        assert_eq!((s.queue_depth, s.kv_cache_usage, s.pods), (4.0, 0.7, 2));
        let none = aggregate(&t, &[]);
        assert_eq!(none.pods, 0, "no pod answered: unknown, not idle");
    }
}
