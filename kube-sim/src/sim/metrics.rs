//! What pods answer on `.../pods/NAME[:PORT]/proxy/metrics`: vLLM's Prometheus metrics for
//! inference workloads (scenario `inference: true`), with values set through the control API
//! (`POST /v1/clusters/{name}/metrics`) or [`crate::SimCluster::set_pod_metrics`].

use super::*;

/// Pods labelled so serve vLLM metrics.
pub const VLLM_LABEL: &str = "sim.flotilla.dev/vllm";

/// The metrics a vLLM pod serves before anything is set: an idle server.
const VLLM_DEFAULTS: [(&str, f64); 3] = [
    ("vllm:num_requests_waiting", 0.0),
    ("vllm:num_requests_running", 0.0),
    ("vllm:kv_cache_usage_perc", 0.0),
];

/// Metric values for the pods a rule selects; `None` removes a metric (e.g. a vLLM that
/// only emits the deprecated `vllm:gpu_cache_usage_perc`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsRule {
    /// Namespace.
    pub namespace: String,
    /// One pod by name (else `selector`).
    #[serde(default)]
    pub pod: Option<String>,
    /// A label selector (`app=llm`) over the namespace's pods; absent with no `pod`: all.
    #[serde(default)]
    pub selector: Option<String>,
    /// Metric name → value (`null` removes it).
    pub values: BTreeMap<String, Option<f64>>,
}

impl SimState {
    /// Add a rule; later rules win over earlier ones for the same metric.
    pub fn set_metrics(&mut self, rule: MetricsRule) -> Result<(), ApiError> {
        if let Some(s) = &rule.selector {
            LabelSelector::parse(s).map_err(|e| ApiError::bad_request(format!("selector: {e}")))?;
        }
        if let Some(p) = &rule.pod {
            self.store.get(idx::PODS, &rule.namespace, p)?;
        }
        self.metric_rules.push(rule);
        Ok(())
    }

    /// Forget every metrics rule.
    pub fn clear_metrics(&mut self) {
        self.metric_rules.clear();
    }

    /// The pod's `/metrics` text, or the error the API server's proxy gives.
    pub fn pod_metrics(&self, ns: &str, pod: &str) -> Result<String, ApiError> {
        let p = self.store.get(idx::PODS, ns, pod)?;
        if !p["status"]["podIP"].is_string() || p["status"]["phase"] != "Running" {
            return Err(ApiError::new(
                503,
                "ServiceUnavailable",
                format!("pod {pod} is not running"),
            ));
        }
        let mut values: BTreeMap<String, f64> = BTreeMap::new();
        if p["metadata"]["labels"][VLLM_LABEL] == "true" {
            values.extend(VLLM_DEFAULTS.iter().map(|(k, v)| (k.to_string(), *v)));
        }
        let mut matched = false;
        for r in self.metric_rules.iter().filter(|r| r.namespace == ns) {
            let hit = match (&r.pod, &r.selector) {
                (Some(name), _) => name == pod,
                (None, Some(s)) => LabelSelector::parse(s).is_ok_and(|sel| sel.matches(&p)),
                (None, None) => true,
            };
            if !hit {
                continue;
            }
            matched = true;
            for (k, v) in &r.values {
                match v {
                    Some(v) => values.insert(k.clone(), *v),
                    None => values.remove(k),
                };
            }
        }
        if values.is_empty() && !matched {
            // Nothing listens: what the real proxy says for a refused connection.
            return Err(ApiError::new(
                503,
                "ServiceUnavailable",
                format!(
                    "error trying to reach service: dial tcp {}: connect: connection refused",
                    p["status"]["podIP"].as_str().unwrap_or("")
                ),
            ));
        }
        let mut out = String::new();
        for (k, v) in values {
            // vLLM labels its series by model.
            out.push_str(&format!(
                "# TYPE {k} gauge\n{k}{{model_name=\"sim\"}} {v}\n"
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    const INFER: &str = "clusters:\n  - name: c\n    pools:\n      - name: gpu\n        count: 1\n        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}\n    workloads:\n      - {name: llm, namespace: ml, replicas: 2, gpus: 1, inference: true, export: true, service: {port: 80, target_port: 8000}}\n      - {name: web, namespace: ml, replicas: 1, service: {port: 80}}\n";

    fn pods(st: &SimState, app: &str) -> Vec<String> {
        st.store
            .iter(idx::PODS, Some("ml"), None)
            .filter(|p| p["metadata"]["labels"]["app"] == app)
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn inference_pods_serve_idle_vllm_metrics_until_set_and_the_export_opts_in() {
        let s = Scenario::from_yaml(INFER).unwrap();
        let mut st = SimState::new(s.clusters[0].clone(), 0, 1000);
        st.reconcile(Instant::now());
        let se = st.store.get(idx::SERVICEEXPORTS, "ml", "llm").unwrap();
        assert_eq!(
            se["metadata"]["annotations"][INFERENCE_METRICS_ANNOTATION],
            "8000"
        );
        let llm = pods(&st, "llm");
        let text = st.pod_metrics("ml", &llm[0]).unwrap();
        assert!(
            text.contains("vllm:num_requests_waiting{model_name=\"sim\"} 0\n"),
            "{text}"
        );
        // A pod that serves nothing: the proxy's connection refused.
        let web = pods(&st, "web");
        assert_eq!(st.pod_metrics("ml", &web[0]).unwrap_err().code, 503);

        st.set_metrics(MetricsRule {
            namespace: "ml".into(),
            pod: None,
            selector: Some("app=llm".into()),
            values: [("vllm:num_requests_waiting".to_string(), Some(12.0))]
                .into_iter()
                .collect(),
        })
        .unwrap();
        // Only the deprecated KV metric, on one pod.
        st.set_metrics(MetricsRule {
            namespace: "ml".into(),
            pod: Some(llm[1].clone()),
            selector: None,
            values: [
                ("vllm:kv_cache_usage_perc".to_string(), None),
                ("vllm:gpu_cache_usage_perc".to_string(), Some(0.9)),
            ]
            .into_iter()
            .collect(),
        })
        .unwrap();
        let a = st.pod_metrics("ml", &llm[0]).unwrap();
        let b = st.pod_metrics("ml", &llm[1]).unwrap();
        assert!(
            a.contains("vllm:num_requests_waiting{model_name=\"sim\"} 12\n"),
            "{a}"
        );
        assert!(
            !b.contains("vllm:kv_cache_usage_perc")
                && b.contains("vllm:gpu_cache_usage_perc{model_name=\"sim\"} 0.9\n"),
            "{b}"
        );
        assert!(
            st.set_metrics(MetricsRule {
                namespace: "ml".into(),
                pod: Some("nope".into()),
                selector: None,
                values: BTreeMap::new()
            })
            .is_err()
        );
        st.clear_metrics();
        assert!(
            st.pod_metrics("ml", &llm[0])
                .unwrap()
                .contains("waiting{model_name=\"sim\"} 0\n")
        );
    }
}
