//! Fault injection: what tests and the control API can break in a simulated cluster.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One fault. The same JSON is accepted by the control API (`POST .../faults`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// The node's kubelet stops posting Ready: the node and its pods go NotReady.
    NodeNotReady {
        /// Node name.
        node: String,
    },
    /// `count` GPUs on the node fail: allocatable (or the DRA slice) drops by that many GPUs.
    GpuFailure {
        /// Node name.
        node: String,
        /// Failed physical GPUs.
        count: u32,
    },
    /// The pod's readiness probe fails.
    PodUnready {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
    },
    /// Nodes created from now on from the machine template `pool` come up broken: NotReady
    /// (a bad image) and/or with `failed_gpus` GPUs failed (a bad driver). Clearing it heals
    /// the nodes it broke and stops it for new ones.
    BadNewNodes {
        /// Machine template (scenario pool name).
        pool: String,
        /// The kubelet never posts Ready.
        #[serde(default)]
        not_ready: bool,
        /// GPUs failed on each new node.
        #[serde(default)]
        failed_gpus: u32,
    },
    /// Every API request waits this long first.
    ApiLatency {
        /// Delay in milliseconds.
        millis: u64,
    },
    /// Requests matching verb and resource (absent = any) fail with this HTTP code.
    ApiError {
        /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
        #[serde(default)]
        verb: Option<String>,
        /// Plural resource, e.g. `nodes`.
        #[serde(default)]
        resource: Option<String>,
        /// HTTP status, 400..=599.
        code: u16,
    },
    /// The API server stops accepting connections and drops open ones.
    Unreachable,
}

/// API-level faults, checked on every request.
#[derive(Debug, Default, Clone)]
pub struct ApiFaults {
    /// Added latency.
    pub latency: Option<Duration>,
    /// (verb, resource, code) error rules.
    pub errors: Vec<(Option<String>, Option<String>, u16)>,
}

impl ApiFaults {
    /// The code of the first error rule matching this request.
    pub fn error_for(&self, verb: &str, resource: &str) -> Option<u16> {
        self.errors
            .iter()
            .find(|(v, r, _)| {
                v.as_deref().is_none_or(|v| v == verb) && r.as_deref().is_none_or(|r| r == resource)
            })
            .map(|(_, _, c)| *c)
    }
}

/// `Status.reason` for an HTTP code, as the API server uses them.
pub fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_round_trip_as_json() {
        let f: Fault =
            serde_json::from_str(r#"{"type":"gpu-failure","node":"n1","count":2}"#).unwrap();
        assert_eq!(
            f,
            Fault::GpuFailure {
                node: "n1".into(),
                count: 2
            }
        );
        assert!(
            serde_json::from_str::<Fault>(r#"{"type":"gpu-failure","node":"n1","count":2,"x":1}"#)
                .is_err()
        );
        let f: Fault = serde_json::from_str(r#"{"type":"unreachable"}"#).unwrap();
        assert_eq!(f, Fault::Unreachable);
    }

    #[test]
    fn error_rules_match_verb_and_resource() {
        let f = ApiFaults {
            latency: None,
            errors: vec![
                (Some("list".into()), Some("nodes".into()), 500),
                (None, Some("pods".into()), 503),
            ],
        };
        assert_eq!(f.error_for("list", "nodes"), Some(500));
        assert_eq!(f.error_for("watch", "nodes"), None);
        assert_eq!(f.error_for("get", "pods"), Some(503));
    }
}
