//! Cross-cluster failover routing: which clusters answer for a service, in what order, and why
//! each other cluster was skipped. One pure function, [`route`], over the merged service, its
//! policy, the clusters' health and GPU pools, the service's inference load and the client.
//!
//! The order of judgement:
//! 1. A cluster is *excluded* when it is Unreachable, Left or not reporting yet, matches none of
//!    the policy's tiers, has weight 0, has no ready endpoint, or (ClusterSetIP) no address
//!    other clusters can reach.
//! 2. The rest are classed: *healthy*; *saturated* (GPU pool or inference load over the
//!    thresholds); *degraded* (Degraded health or an incomplete inventory); *below threshold*
//!    (fewer ready endpoints than `minHealthyEndpoints` / `minHealthyFraction`).
//! 3. Tiers are walked in order (local cluster, local region when `localFirst`, then the
//!    policy's tiers). The first tier holding a healthy cluster is answered with its healthy
//!    clusters. A saturated cluster counts as healthy only while no eligible cluster is known
//!    to have headroom; a stale or missing load sample is unknown, never idle.
//! 4. With no healthy cluster anywhere, the first tier with a degraded cluster answers (unless
//!    `degraded: Never`), then the first tier with a cluster below threshold: an answer with
//!    some endpoints beats none.
//! 5. The answered clusters are ordered by weighted random choice (per query seed), their
//!    addresses interleaved so `maxAnswers` keeps clusters apart.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::export::{Endpoint, InferenceLoad, Service, ServiceType};
use crate::health::Health;
use crate::selector::Selector;

/// Default answer TTL, seconds (Lighthouse's default; the MCS examples use 4–30).
pub const DEFAULT_TTL_SECONDS: u32 = 5;
/// Default cap on addresses per answer.
pub const DEFAULT_MAX_ANSWERS: u32 = 8;
/// Default inference queue-depth threshold (llm-d's).
pub const DEFAULT_MAX_QUEUE_DEPTH: f64 = 5.0;
/// Default KV-cache use threshold (llm-d's).
pub const DEFAULT_MAX_KV_CACHE_USAGE: f64 = 0.8;
/// Default interval between inference load samples, milliseconds.
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 1000;
/// A sample older than this many intervals is unknown.
pub const STALE_AFTER_INTERVALS: u64 = 3;
/// Largest weight (as k8gb and Azure Traffic Manager allow).
pub const MAX_WEIGHT: u32 = 1000;
/// Most tiers a policy may have.
pub const MAX_TIERS: usize = 16;

/// One priority tier: the clusters its selector matches.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tier {
    /// A name for explanations; the selector's text when empty.
    #[serde(default)]
    pub name: String,
    /// Which clusters are in the tier (empty: all).
    #[serde(default)]
    pub selector: Selector,
}

/// A weight for the clusters one rule names; the first matching rule wins, the default is 1.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightRule {
    /// One cluster by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Or the clusters a selector matches (e.g. a region label value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Weight, 0–1000; 0 drains the clusters.
    pub weight: u32,
}

/// When a cluster's service counts as saturated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Saturation {
    /// Saturated when the GPU pools behind the service have fewer than this percentage of
    /// their allocatable GPUs idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_gpu_percent: Option<f64>,
    /// Judge the service's own vLLM metrics (the export opts in to sampling).
    #[serde(default)]
    pub inference: bool,
    /// Saturated at this mean queue depth (`vllm:num_requests_waiting`) or above.
    #[serde(default = "default_queue")]
    pub max_queue_depth: f64,
    /// Saturated at this mean KV-cache use (0–1) or above.
    #[serde(default = "default_kv")]
    pub max_kv_cache_usage: f64,
    /// How often the agent samples, milliseconds; three intervals without a sample is unknown.
    #[serde(default = "default_interval")]
    pub sample_interval_ms: u64,
}

fn default_queue() -> f64 {
    DEFAULT_MAX_QUEUE_DEPTH
}
fn default_kv() -> f64 {
    DEFAULT_MAX_KV_CACHE_USAGE
}
fn default_interval() -> u64 {
    DEFAULT_SAMPLE_INTERVAL_MS
}

impl Default for Saturation {
    fn default() -> Self {
        Self {
            min_free_gpu_percent: None,
            inference: true,
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            max_kv_cache_usage: DEFAULT_MAX_KV_CACHE_USAGE,
            sample_interval_ms: DEFAULT_SAMPLE_INTERVAL_MS,
        }
    }
}

/// What Degraded clusters get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DegradedMode {
    /// Answered only when no healthy cluster is eligible.
    #[default]
    Last,
    /// Never answered.
    Never,
    /// Answered as if healthy.
    AsHealthy,
}

/// How one service (or, as the fleet default, every service) is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingPolicy {
    /// Priority tiers in order; empty means one tier of every cluster.
    #[serde(default)]
    pub tiers: Vec<Tier>,
    /// Weights; clusters no rule names weigh 1.
    #[serde(default)]
    pub weights: Vec<WeightRule>,
    /// The client's own cluster first, then its region, then the tiers.
    #[serde(default)]
    pub local_first: bool,
    /// A cluster is healthy only with at least this many ready endpoints.
    #[serde(default = "one")]
    pub min_healthy_endpoints: u32,
    /// ... and at least this fraction (0–1) of its endpoints ready.
    #[serde(default)]
    pub min_healthy_fraction: f64,
    /// Saturation rules; none: never saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation: Option<Saturation>,
    /// What Degraded clusters get.
    #[serde(default)]
    pub degraded: DegradedMode,
    /// Answer TTL, seconds.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u32,
    /// Most addresses in one answer.
    #[serde(default = "default_max_answers")]
    pub max_answers: u32,
}

fn one() -> u32 {
    1
}
fn default_ttl() -> u32 {
    DEFAULT_TTL_SECONDS
}
fn default_max_answers() -> u32 {
    DEFAULT_MAX_ANSWERS
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            tiers: Vec::new(),
            weights: Vec::new(),
            local_first: false,
            min_healthy_endpoints: 1,
            min_healthy_fraction: 0.0,
            saturation: None,
            degraded: DegradedMode::Last,
            ttl_seconds: DEFAULT_TTL_SECONDS,
            max_answers: DEFAULT_MAX_ANSWERS,
        }
    }
}

/// A policy that does not hold together; `field` is the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// Path of the field, e.g. `tiers[1].selector.matchLabels`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        message: message.into(),
    }
}

impl RoutingPolicy {
    /// Check every field; the error names the first that is wrong.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.tiers.len() > MAX_TIERS {
            return Err(bad(
                "tiers",
                format!("at most {MAX_TIERS} tiers, got {}", self.tiers.len()),
            ));
        }
        for (i, t) in self.tiers.iter().enumerate() {
            let path = format!("tiers[{i}].selector");
            t.selector.validate(&path).map_err(|e| split(&e))?;
        }
        for (i, w) in self.weights.iter().enumerate() {
            let at = format!("weights[{i}]");
            match (&w.cluster, &w.selector) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(bad(at, "give exactly one of cluster and selector"));
                }
                (Some(c), None) if c.is_empty() => {
                    return Err(bad(format!("{at}.cluster"), "must not be empty"));
                }
                (None, Some(s)) => s
                    .validate(&format!("{at}.selector"))
                    .map_err(|e| split(&e))?,
                _ => {}
            }
            if w.weight > MAX_WEIGHT {
                return Err(bad(
                    format!("{at}.weight"),
                    format!("at most {MAX_WEIGHT}, got {}", w.weight),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.min_healthy_fraction) {
            return Err(bad(
                "minHealthyFraction",
                format!("must be within 0–1, got {}", self.min_healthy_fraction),
            ));
        }
        if let Some(s) = &self.saturation {
            if let Some(p) = s.min_free_gpu_percent
                && !(0.0..=100.0).contains(&p)
            {
                return Err(bad(
                    "saturation.minFreeGpuPercent",
                    format!("must be within 0–100, got {p}"),
                ));
            }
            if s.max_queue_depth.is_nan() || s.max_queue_depth < 0.0 {
                return Err(bad("saturation.maxQueueDepth", "must be 0 or more"));
            }
            if !(0.0..=1.0).contains(&s.max_kv_cache_usage) {
                return Err(bad(
                    "saturation.maxKvCacheUsage",
                    format!("must be within 0–1, got {}", s.max_kv_cache_usage),
                ));
            }
            if !(100..=60_000).contains(&s.sample_interval_ms) {
                return Err(bad(
                    "saturation.sampleIntervalMs",
                    format!("must be within 100–60000, got {}", s.sample_interval_ms),
                ));
            }
            if s.min_free_gpu_percent.is_none() && !s.inference {
                return Err(bad(
                    "saturation",
                    "set minFreeGpuPercent, inference, or both",
                ));
            }
        }
        if !(1..=86_400).contains(&self.ttl_seconds) {
            return Err(bad(
                "ttlSeconds",
                format!("must be within 1–86400, got {}", self.ttl_seconds),
            ));
        }
        if !(1..=64).contains(&self.max_answers) {
            return Err(bad(
                "maxAnswers",
                format!("must be within 1–64, got {}", self.max_answers),
            ));
        }
        Ok(())
    }

    fn weight_of(&self, c: &ClusterState) -> u32 {
        self.weights
            .iter()
            .find(|w| match (&w.cluster, &w.selector) {
                (Some(name), _) => *name == c.name,
                (None, Some(s)) => s.matches(&with_region(c)),
                (None, None) => false,
            })
            .map_or(1, |w| w.weight)
    }
}

/// `path: message` from a selector error back into a [`PolicyError`].
fn split(e: &str) -> PolicyError {
    match e.split_once(": ") {
        Some((f, m)) => bad(f, m),
        None => bad("", e),
    }
}

/// GPUs of one pool, for the saturation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolGpus {
    /// Idle physical GPUs.
    pub idle: i64,
    /// Allocatable physical GPUs.
    pub allocatable: i64,
}

/// A member cluster, reduced to what routing needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterState {
    /// Name.
    pub name: String,
    /// Health (`None`: not a member, or its record is gone).
    pub health: Option<Health>,
    /// Region.
    pub region: String,
    /// Labels (selectors match these; `region` is added from the region when missing).
    pub labels: BTreeMap<String, String>,
    /// Its agent's inventory report is incomplete.
    pub inventory_incomplete: bool,
    /// GPU pools by name.
    pub pools: BTreeMap<String, PoolGpus>,
    /// The upgrade campaign that took the cluster out of routing while its pool drains: it
    /// answers only when no other eligible cluster can.
    pub shifted: Option<String>,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Client {
    /// The client's cluster, if known (from `--from`, its address or EDNS Client Subnet).
    pub cluster: Option<String>,
    /// The client's region when its cluster is not a member (its cluster's region otherwise).
    pub region: Option<String>,
}

/// Everything [`route`] reads besides the service and policy.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Member clusters by name.
    pub clusters: &'a BTreeMap<String, ClusterState>,
    /// The service's inference load per cluster.
    pub loads: &'a BTreeMap<String, InferenceLoad>,
    /// Now, Unix milliseconds (for staleness).
    pub now_unix_ms: i64,
    /// Per-query randomness for the weighted order.
    pub seed: u64,
}

/// How a cluster was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Class {
    /// Eligible and healthy.
    Healthy,
    /// Eligible, saturated.
    Saturated,
    /// Eligible, Degraded or with an incomplete inventory.
    Degraded,
    /// Eligible, but an upgrade campaign drains it: answered only when no other is eligible.
    Shifted,
    /// Eligible, fewer ready endpoints than the policy asks.
    BelowThreshold,
    /// Never answered (see the reason).
    Excluded,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Healthy => "healthy",
            Self::Saturated => "saturated",
            Self::Degraded => "degraded",
            Self::Shifted => "shifted away (upgrade)",
            Self::BelowThreshold => "below threshold",
            Self::Excluded => "excluded",
        })
    }
}

/// Why one exporting cluster was answered or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Cluster.
    pub cluster: String,
    /// Whether it is in the answer.
    pub chosen: bool,
    /// Its class.
    pub class: Class,
    /// The tier it falls in (index into [`Route::tiers`]), if any.
    pub tier: Option<usize>,
    /// Ready endpoints / all endpoints.
    pub ready_endpoints: u32,
    /// All endpoints.
    pub endpoints: u32,
    /// Its weight.
    pub weight: u32,
    /// Why, in a sentence.
    pub reason: String,
}

/// One address in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The cluster serving it.
    pub cluster: String,
    /// Address.
    pub address: IpAddr,
    /// Endpoint hostname (headless services), else empty.
    pub hostname: String,
}

/// The routing decision for one service and client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Addresses in answer order, at most `maxAnswers`.
    pub answers: Vec<Answer>,
    /// Answered clusters in order.
    pub clusters: Vec<String>,
    /// TTL, seconds.
    pub ttl_seconds: u32,
    /// The effective tiers, by name, in order.
    pub tiers: Vec<String>,
    /// One verdict per exporting cluster, in export order.
    pub verdicts: Vec<Verdict>,
}

/// A tier's membership test.
type TierMatch<'a> = Box<dyn Fn(&ClusterState) -> bool + 'a>;

struct Judged<'a> {
    verdict: Verdict,
    /// Known to have headroom (for the saturation rule).
    headroom: bool,
    addresses: Vec<(IpAddr, &'a str)>,
}

/// Decide who answers for `service` under `policy` and order one query's answer. See the
/// module docs for the rules.
pub fn route(
    service: &Service,
    policy: &RoutingPolicy,
    inputs: Inputs<'_>,
    client: &Client,
) -> Route {
    decide(
        service,
        policy,
        inputs.clusters,
        inputs.loads,
        inputs.now_unix_ms,
        client,
    )
    .route(inputs.seed)
}

/// Decide who answers for `service` under `policy` for `client`, leaving the per-query order
/// to [`Decision::for_each_answer`].
pub fn decide(
    service: &Service,
    policy: &RoutingPolicy,
    clusters: &BTreeMap<String, ClusterState>,
    loads: &BTreeMap<String, InferenceLoad>,
    now_unix_ms: i64,
    client: &Client,
) -> Decision {
    let headless = service.service_type == Some(ServiceType::Headless);
    let client_cluster = client.cluster.as_deref().and_then(|c| clusters.get(c));
    let client_region = client_cluster
        .map(|c| c.region.as_str())
        .or(client.region.as_deref())
        .filter(|r| !r.is_empty());
    // Effective tiers: (name, predicate).
    let mut tiers: Vec<(String, TierMatch<'_>)> = Vec::new();
    if policy.local_first {
        if let Some(cc) = client_cluster {
            let me = cc.name.clone();
            tiers.push((
                format!("local cluster {me}"),
                Box::new(move |c: &ClusterState| c.name == me),
            ));
        }
        if let Some(r) = client_region {
            let r = r.to_string();
            tiers.push((
                format!("local region {r}"),
                Box::new(move |c: &ClusterState| c.region.eq_ignore_ascii_case(&r)),
            ));
        }
    }
    let first_policy_tier = tiers.len();
    if policy.tiers.is_empty() {
        tiers.push(("any".into(), Box::new(|_: &ClusterState| true)));
    }
    for t in &policy.tiers {
        let name = match t.name.is_empty() {
            true => t.selector.describe(),
            false => t.name.clone(),
        };
        tiers.push((
            name,
            Box::new(move |c: &ClusterState| t.selector.matches(&with_region(c))),
        ));
    }

    let mut judged: Vec<Judged<'_>> = service
        .exports
        .iter()
        .map(|e| {
            let ready = e.ready_endpoints().count() as u32;
            let total = e.endpoints.len() as u32;
            let mut v = Verdict {
                cluster: e.cluster.clone(),
                chosen: false,
                class: Class::Excluded,
                tier: None,
                ready_endpoints: ready,
                endpoints: total,
                weight: 0,
                reason: String::new(),
            };
            let addresses: Vec<(IpAddr, &str)> = match headless {
                true => e.ready_endpoints().map(|ep: &Endpoint| (ep.address, ep.hostname.as_str())).collect(),
                false => e.addresses.iter().map(|a| (*a, "")).collect(),
            };
            let mut j = Judged { verdict: v.clone(), headroom: false, addresses };
            let Some(c) = clusters.get(&e.cluster) else {
                v.reason = "not a member of the fleet".into();
                j.verdict = v;
                return j;
            };
            v.weight = policy.weight_of(c);
            let excluded = match c.health {
                None => Some("not a member of the fleet".to_string()),
                Some(h @ (Health::Unreachable | Health::Left)) => Some(format!("cluster is {h:?}")),
                Some(Health::Joining) => Some("cluster has not reported its inventory yet".into()),
                _ => None,
            }
            .or_else(|| {
                let in_policy = tiers[first_policy_tier..].iter().any(|(_, m)| m(c));
                (!in_policy).then(|| "matches none of the policy's tiers".into())
            })
            .or_else(|| (v.weight == 0).then(|| "weight 0 (drained)".into()))
            .or_else(|| (ready == 0).then(|| format!("no ready endpoints (0/{total})")))
            .or_else(|| {
                (!headless && e.addresses.is_empty()).then(|| {
                    "no address other clusters can reach (no LoadBalancer ingress or external IP; cluster IPs need --flat-network)".into()
                })
            });
            if let Some(why) = excluded {
                v.reason = why;
                j.verdict = v;
                return j;
            }
            v.tier = tiers.iter().position(|(_, m)| m(c));
            let below = ready < policy.min_healthy_endpoints
                || (total > 0 && f64::from(ready) / f64::from(total) < policy.min_healthy_fraction);
            let degraded = c.health == Some(Health::Degraded) || c.inventory_incomplete;
            let (saturated, headroom) = saturation(policy.saturation.as_ref(), e.gpu_pools.as_slice(), c, loads.get(&e.cluster), now_unix_ms);
            (v.class, v.reason) = if degraded && policy.degraded == DegradedMode::Never {
                (Class::Excluded, format!("{} and the policy never answers Degraded clusters", degraded_why(c)))
            } else if below {
                (Class::BelowThreshold, format!(
                    "{ready}/{total} endpoints ready, below minHealthyEndpoints {} / minHealthyFraction {}",
                    policy.min_healthy_endpoints, policy.min_healthy_fraction))
            } else if degraded && policy.degraded == DegradedMode::Last {
                (Class::Degraded, degraded_why(c))
            } else if let Some(campaign) = &c.shifted {
                (Class::Shifted, format!("{ready}/{total} endpoints ready, but upgrade campaign {campaign} is draining it"))
            } else if let Some(why) = saturated {
                (Class::Saturated, why)
            } else {
                (Class::Healthy, format!("{ready}/{total} endpoints ready"))
            };
            j.headroom = v.class == Class::Healthy && headroom;
            j.verdict = v;
            j
        })
        .collect();

    let any_headroom = judged.iter().any(|j| j.headroom);
    let tier_name = |t: Option<usize>| t.map_or("-".to_string(), |i| tiers[i].0.clone());
    // Which class, in which tier, answers.
    let effective = |j: &Judged<'_>| match j.verdict.class {
        Class::Saturated if !any_headroom => Class::Healthy,
        c => c,
    };
    let mut pick: Option<(Class, usize)> = None;
    'classes: for class in [
        Class::Healthy,
        Class::Degraded,
        Class::Shifted,
        Class::BelowThreshold,
    ] {
        for t in 0..tiers.len() {
            if judged
                .iter()
                .any(|j| j.verdict.tier == Some(t) && effective(j) == class)
            {
                pick = Some((class, t));
                break 'classes;
            }
        }
    }

    let mut chosen: Vec<usize> = Vec::new();
    for (i, j) in judged.iter_mut().enumerate() {
        let v = &mut j.verdict;
        if v.class == Class::Excluded {
            v.reason = format!("skipped: {}", v.reason);
            continue;
        }
        let eff = effective(j);
        let v = &mut j.verdict;
        match pick {
            Some((class, t)) if eff == class && v.tier == Some(t) => {
                v.chosen = true;
                let how = match (class, v.class) {
                    (Class::Healthy, Class::Saturated) => {
                        format!("{}; no eligible cluster has headroom", v.reason)
                    }
                    (Class::Healthy, _) => v.reason.clone(),
                    _ => format!("{}; no healthier cluster is eligible", v.reason),
                };
                v.reason = format!(
                    "chosen: tier {} ({}), {how}, weight {}",
                    t + 1,
                    tier_name(Some(t)),
                    v.weight
                );
                chosen.push(i);
            }
            Some((class, t)) => {
                let why = if eff == Class::Saturated {
                    format!("{} while another eligible cluster has headroom", v.reason)
                } else if eff == class {
                    format!(
                        "{}, but tier {} ({}) answers first",
                        v.reason,
                        t + 1,
                        tier_name(Some(t))
                    )
                } else {
                    format!("{}, and a {} cluster answers", v.reason, class)
                };
                v.reason = format!("skipped: {why}");
            }
            None => v.reason = format!("skipped: {}", v.reason),
        }
    }

    Decision {
        chosen: chosen
            .iter()
            .map(|&i| Choice {
                cluster: judged[i].verdict.cluster.clone(),
                weight: judged[i].verdict.weight.max(1),
                addresses: judged[i]
                    .addresses
                    .iter()
                    .map(|(a, h)| (*a, h.to_string()))
                    .collect(),
            })
            .collect(),
        ttl_seconds: policy.ttl_seconds,
        max_answers: policy.max_answers,
        tiers: tiers.iter().map(|(n, _)| n.clone()).collect(),
        verdicts: judged.into_iter().map(|j| j.verdict).collect(),
    }
}

/// One answered cluster and what it answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// Cluster.
    pub cluster: String,
    /// Weight (at least 1).
    pub weight: u32,
    /// Addresses, with the endpoint hostname for headless services.
    pub addresses: Vec<(IpAddr, String)>,
}

/// Who answers for a service, before the per-query order: what a routing table holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Decision {
    /// Answered clusters (unordered: each query orders them by weight).
    pub chosen: Vec<Choice>,
    /// TTL, seconds.
    pub ttl_seconds: u32,
    /// Most addresses in one answer.
    pub max_answers: u32,
    /// The effective tiers, by name, in order.
    pub tiers: Vec<String>,
    /// One verdict per exporting cluster, in export order.
    pub verdicts: Vec<Verdict>,
}

impl Decision {
    /// The addresses a ClusterSetIP import names (MCS allows one per IP family): the first
    /// IPv4 and the first IPv6 address of the heaviest answered clusters, in answer order.
    pub fn preferred_ips(&self) -> Vec<IpAddr> {
        let mut by_weight: Vec<&Choice> = self.chosen.iter().collect();
        // Stable: equal weights keep the decision's order.
        by_weight.sort_by_key(|c| std::cmp::Reverse(c.weight));
        let addrs = || {
            by_weight
                .iter()
                .flat_map(|c| c.addresses.iter().map(|(a, _)| *a))
        };
        let v4 = addrs().find(IpAddr::is_ipv4);
        let v6 = addrs().find(IpAddr::is_ipv6);
        v4.into_iter().chain(v6).collect()
    }

    /// The answer for one query: clusters ordered by weighted random choice from `seed`
    /// (Efraimidis–Spirakis: key u^(1/w), largest first), then addresses interleaved one per
    /// cluster in turn, each cluster's list rotated by the seed, at most `max_answers`.
    /// `f` gets each (choice, address, hostname) in answer order.
    pub fn for_each_answer(&self, seed: u64, mut f: impl FnMut(&Choice, IpAddr, &str)) {
        let n = self.chosen.len();
        if n == 0 {
            return;
        }
        // (cluster index, rotation of its addresses), in answer order. On the stack for the
        // usual handful of clusters: this runs for every DNS query.
        let mut small = [(0usize, 0usize); 16];
        let mut large = Vec::new();
        let order: &mut [(usize, usize)] = if n <= small.len() {
            &mut small[..n]
        } else {
            large.resize(n, (0, 0));
            &mut large
        };
        self.order_into(seed, order);
        let max = self.max_answers as usize;
        let (mut count, mut round) = (0, 0);
        while count < max
            && order
                .iter()
                .any(|(i, _)| round < self.chosen[*i].addresses.len())
        {
            for (i, rot) in order.iter() {
                let c = &self.chosen[*i];
                if count == max {
                    break;
                }
                if round < c.addresses.len() {
                    let (a, h) = &c.addresses[(round + rot) % c.addresses.len()];
                    f(c, *a, h);
                    count += 1;
                }
            }
            round += 1;
        }
    }

    /// Fill `order` with (cluster index, address rotation) for `seed`. Equal weights: a
    /// rotation (each cluster first equally often, as round-robin); otherwise weighted random
    /// order without replacement (Efraimidis–Spirakis: key u^(1/w), largest first).
    fn order_into(&self, seed: u64, order: &mut [(usize, usize)]) {
        let mut rng = SplitMix(seed);
        let n = order.len();
        let w0 = self.chosen[0].weight.max(1);
        if self.chosen.iter().all(|c| c.weight.max(1) == w0) {
            let start = (rng.next() % n as u64) as usize;
            for (k, o) in order.iter_mut().enumerate() {
                let i = (start + k) % n;
                let len = self.chosen[i].addresses.len().max(1) as u64;
                *o = (i, (rng.next() % len) as usize);
            }
            return;
        }
        let mut keys: Vec<(f64, usize, usize)> = self
            .chosen
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let key = rng.unit().powf(1.0 / f64::from(c.weight.max(1)));
                let len = c.addresses.len().max(1) as u64;
                (key, i, (rng.next() % len) as usize)
            })
            .collect();
        keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (o, (_, i, rot)) in order.iter_mut().zip(keys) {
            *o = (i, rot);
        }
    }

    /// The answered clusters in this query's order.
    pub fn order(&self, seed: u64) -> Vec<String> {
        let mut order = vec![(0, 0); self.chosen.len()];
        if !order.is_empty() {
            self.order_into(seed, &mut order);
        }
        order
            .into_iter()
            .map(|(i, _)| self.chosen[i].cluster.clone())
            .collect()
    }

    /// The full [`Route`] for one query.
    pub fn route(&self, seed: u64) -> Route {
        let mut answers = Vec::new();
        self.for_each_answer(seed, |c, address, hostname| {
            answers.push(Answer {
                cluster: c.cluster.clone(),
                address,
                hostname: hostname.to_string(),
            })
        });
        Route {
            answers,
            clusters: self.order(seed),
            ttl_seconds: self.ttl_seconds,
            tiers: self.tiers.clone(),
            verdicts: self.verdicts.clone(),
        }
    }
}

fn degraded_why(c: &ClusterState) -> String {
    match (c.health == Some(Health::Degraded), c.inventory_incomplete) {
        (true, _) => "cluster is Degraded".into(),
        _ => "cluster's inventory report is incomplete".into(),
    }
}

/// Labels with `region` filled from the cluster's region, so `region=eu-west` selects by it.
fn with_region(c: &ClusterState) -> std::borrow::Cow<'_, BTreeMap<String, String>> {
    if c.region.is_empty() || c.labels.contains_key("region") {
        return std::borrow::Cow::Borrowed(&c.labels);
    }
    let mut l = c.labels.clone();
    l.insert("region".into(), c.region.clone());
    std::borrow::Cow::Owned(l)
}

/// (why saturated, known headroom).
fn saturation(
    rule: Option<&Saturation>,
    pools: &[String],
    c: &ClusterState,
    load: Option<&InferenceLoad>,
    now_unix_ms: i64,
) -> (Option<String>, bool) {
    let Some(rule) = rule else {
        return (None, true);
    };
    let mut known = true;
    if let Some(min) = rule.min_free_gpu_percent {
        let (idle, alloc) = pools
            .iter()
            .filter_map(|p| c.pools.get(p))
            .fold((0i64, 0i64), |(i, a), p| {
                (i + p.idle.max(0), a + p.allocatable.max(0))
            });
        if alloc == 0 {
            known = false;
        } else {
            let pct = 100.0 * idle as f64 / alloc as f64;
            if pct < min {
                return (
                    Some(format!(
                        "saturated: {idle}/{alloc} GPUs idle ({pct:.0}% < {min}%) in pool {}",
                        pools.join(",")
                    )),
                    false,
                );
            }
        }
    }
    if rule.inference {
        match inference_verdict(rule, load, now_unix_ms) {
            LoadVerdict::Saturated(why) => return (Some(why), false),
            LoadVerdict::Headroom => {}
            LoadVerdict::Unknown => known = false,
        }
    }
    (None, known)
}

/// How a service's inference load in one cluster is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadVerdict {
    /// No sample, no pod answered, or the sample is older than [`STALE_AFTER_INTERVALS`]
    /// intervals: never taken for idle.
    Unknown,
    /// Below both thresholds.
    Headroom,
    /// At or over a threshold (the reason).
    Saturated(String),
}

/// Judge one inference load sample by a saturation rule's thresholds. Pure.
pub fn inference_verdict(
    rule: &Saturation,
    load: Option<&InferenceLoad>,
    now_unix_ms: i64,
) -> LoadVerdict {
    let stale_ms = (rule.sample_interval_ms * STALE_AFTER_INTERVALS) as i64;
    match load {
        Some(l) if l.pods > 0 && now_unix_ms - l.sampled_at_unix_ms <= stale_ms => {
            if l.queue_depth >= rule.max_queue_depth {
                LoadVerdict::Saturated(format!(
                    "saturated: queue depth {:.1} ≥ {}",
                    l.queue_depth, rule.max_queue_depth
                ))
            } else if l.kv_cache_usage >= rule.max_kv_cache_usage {
                LoadVerdict::Saturated(format!(
                    "saturated: KV-cache use {:.2} ≥ {}",
                    l.kv_cache_usage, rule.max_kv_cache_usage
                ))
            } else {
                LoadVerdict::Headroom
            }
        }
        _ => LoadVerdict::Unknown,
    }
}

/// A small deterministic generator (SplitMix64) so a query's seed fixes its order.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// An IPv4 or IPv6 network, for finding a client's cluster by its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (want ADDRESS/PREFIX)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {p:?} must be 0–{max}"))?;
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The cluster whose reported networks hold `ip`, by longest prefix; `None` when no network
/// holds it (or two clusters claim the same longest prefix: an ambiguous answer is no answer).
pub fn locate<'a>(
    ip: IpAddr,
    networks: impl IntoIterator<Item = (&'a Cidr, &'a str)>,
) -> Option<&'a str> {
    let mut best: Option<(u8, &str, bool)> = None;
    for (n, c) in networks {
        if !n.contains(ip) {
            continue;
        }
        best = match best {
            Some((p, bc, _)) if p == n.prefix && bc != c => Some((p, bc, true)),
            Some((p, _, _)) if p >= n.prefix => best,
            _ => Some((n.prefix, c, false)),
        };
    }
    best.filter(|(_, _, ambiguous)| !ambiguous)
        .map(|(_, c, _)| c)
}

/// Networks indexed for [`locate`]'s longest-prefix match in a few hash lookups (one per
/// prefix length in use), not a scan: DNS locates every query's client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkIndex {
    /// (IPv6?, prefix length, masked network → its cluster, or `None` when two clusters
    /// claim it), longest prefixes first.
    levels: Vec<(bool, u8, std::collections::HashMap<u128, Option<String>>)>,
}

fn bits_of(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn masked(bits: u128, v6: bool, prefix: u8) -> u128 {
    let host = u32::from(if v6 { 128 } else { 32 } - prefix);
    match host {
        128 => 0,
        h => bits & !((1u128 << h) - 1),
    }
}

impl NetworkIndex {
    /// Index `(network, cluster)` pairs.
    pub fn new<'a>(networks: impl IntoIterator<Item = (&'a Cidr, &'a str)>) -> Self {
        let mut by: BTreeMap<(bool, u8), std::collections::HashMap<u128, Option<String>>> =
            BTreeMap::new();
        for (n, c) in networks {
            let (v6, bits) = bits_of(n.addr);
            let m = by.entry((v6, n.prefix)).or_default();
            let slot = m
                .entry(masked(bits, v6, n.prefix))
                .or_insert_with(|| Some(c.to_string()));
            if slot.as_deref().is_some_and(|s| s != c) {
                *slot = None;
            }
        }
        let mut levels: Vec<_> = by.into_iter().map(|((v6, p), m)| (v6, p, m)).collect();
        levels.sort_by_key(|(_, p, _)| std::cmp::Reverse(*p));
        Self { levels }
    }

    /// The cluster whose networks hold `ip`, as [`locate`] decides.
    pub fn locate(&self, ip: IpAddr) -> Option<&str> {
        let (v6, bits) = bits_of(ip);
        for (lv6, prefix, m) in &self.levels {
            if *lv6 != v6 {
                continue;
            }
            if let Some(c) = m.get(&masked(bits, v6, *prefix)) {
                return c.as_deref();
            }
        }
        None
    }

    /// Whether no network is indexed.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }
}

#[cfg(test)]
mod tests;
