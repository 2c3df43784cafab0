//! Inference load: the agents' samples are soft state on the leader (they change every
//! second); the leader's load controller writes an export's `/loads/` record only when the
//! verdict its routing policy draws from it changes (saturated, headroom, unknown), so every
//! replica decides alike from the store at a write rate of verdict flips, not samples
//! (decision 0015).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::mem::discriminant;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::convert::fleet::Invalid;
use flotilla_api::v1;
use flotilla_core::export::{InferenceLoad, ServiceKey};
use flotilla_core::kv::{KvBackend, Op};
use flotilla_core::routing::{LoadVerdict, STALE_AFTER_INTERVALS, inference_verdict};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Discovery;
use crate::controllers::{Controller, Leading, unix_ms};
use crate::store::keys;

/// Most samples in one message (one per opted-in export).
pub const MAX_SAMPLES: usize = 2000;

/// The latest samples the leader received, by (cluster, service).
#[derive(Default)]
pub struct Samples {
    latest: Mutex<HashMap<(String, ServiceKey), InferenceLoad>>,
    notify: Notify,
}

impl Samples {
    /// Take one agent's samples, stamped with the hub's receive time. Invalid numbers are
    /// refused naming the field.
    pub fn observe(
        &self,
        cluster: &str,
        m: &v1::InferenceLoads,
        now_unix_ms: i64,
    ) -> Result<(), Invalid> {
        if m.samples.len() > MAX_SAMPLES {
            return Err(Invalid {
                field: "loads.samples".into(),
                reason: format!("at most {MAX_SAMPLES}, got {}", m.samples.len()),
            });
        }
        let mut next = Vec::with_capacity(m.samples.len());
        for (i, s) in m.samples.iter().enumerate() {
            for (f, v) in [
                ("queue_depth", s.queue_depth),
                ("kv_cache_usage", s.kv_cache_usage),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(Invalid {
                        field: format!("loads.samples[{i}].{f}"),
                        reason: format!("{v} is not a finite, non-negative number"),
                    });
                }
            }
            next.push((
                (cluster.to_string(), ServiceKey::new(&s.namespace, &s.name)),
                InferenceLoad {
                    queue_depth: s.queue_depth,
                    kv_cache_usage: s.kv_cache_usage,
                    pods: s.pods,
                    sampled_at_unix_ms: now_unix_ms,
                },
            ));
        }
        self.latest.lock().expect("samples").extend(next);
        self.notify.notify_one();
        Ok(())
    }
}

/// A stored load as routing reads it: a fresh record counts as sampled now (the leader
/// vouches for it until it writes otherwise), a stale one as never sampled.
pub(super) fn load_of(r: &v1::InferenceLoadRecord, now_unix_ms: i64) -> InferenceLoad {
    let s = r.sample.clone().unwrap_or_default();
    InferenceLoad {
        queue_depth: s.queue_depth,
        kv_cache_usage: s.kv_cache_usage,
        pods: s.pods,
        sampled_at_unix_ms: if r.fresh { now_unix_ms } else { i64::MIN / 2 },
    }
}

/// The writes that bring the stored loads in line with the samples: a put where the verdict
/// differs, a delete where the export is gone. `grace_until`: before then, a missing sample
/// is not yet stale (a new leader waits for the agents to reconnect). Pure over its inputs.
pub(super) fn plan(
    d: &Discovery,
    samples: &HashMap<(String, ServiceKey), InferenceLoad>,
    now_unix_ms: i64,
    grace_until: i64,
) -> Vec<Op> {
    let st = d.state.lock().expect("discovery");
    let mut keys: BTreeSet<(String, ServiceKey)> = samples.keys().cloned().collect();
    for (k, m) in &st.loads {
        keys.extend(m.keys().map(|c| (c.clone(), k.clone())));
    }
    let mut ops = Vec::new();
    for (cluster, key) in keys {
        let stored = st.loads.get(&key).and_then(|m| m.get(&cluster));
        let exported = st
            .exports
            .get(&key)
            .is_some_and(|m| m.contains_key(&cluster));
        let lkey = keys::load_key(&cluster, &key.namespace, &key.name);
        if !exported {
            if stored.is_some() {
                ops.push(Op::delete(lkey));
            }
            continue;
        }
        let Some(rule) = st
            .policies
            .get(&key)
            .unwrap_or(&st.default_policy)
            .saturation
            .as_ref()
            .filter(|s| s.inference)
        else {
            continue;
        };
        let sample = samples.get(&(cluster.clone(), key.clone()));
        if sample.is_none() && now_unix_ms < grace_until {
            continue;
        }
        let now_verdict = inference_verdict(rule, sample, now_unix_ms);
        let stored_verdict = stored.map_or(LoadVerdict::Unknown, |r| {
            inference_verdict(rule, Some(&load_of(r, now_unix_ms)), now_unix_ms)
        });
        if discriminant(&now_verdict) == discriminant(&stored_verdict) {
            continue;
        }
        let fresh = now_verdict != LoadVerdict::Unknown;
        let sample = match sample {
            Some(s) => v1::InferenceLoadSample {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                queue_depth: s.queue_depth,
                kv_cache_usage: s.kv_cache_usage,
                pods: s.pods,
                sampled_at_unix_ms: s.sampled_at_unix_ms,
            },
            None => stored.and_then(|r| r.sample.clone()).unwrap_or_default(),
        };
        use prost::Message;
        let rec = v1::InferenceLoadRecord {
            sample: Some(sample),
            fresh,
        };
        ops.push(Op::put(lkey, rec.encode_to_vec()));
    }
    ops
}

/// The leader's load controller.
pub struct LoadController<B> {
    /// Discovery (samples, stored loads, policies).
    pub discovery: Arc<Discovery>,
    /// Store.
    pub backend: B,
}

/// How often the controller looks for stale samples, besides on each new one.
const TICK: Duration = Duration::from_millis(250);

impl<B: KvBackend + Clone> Controller for LoadController<B> {
    fn name(&self) -> &'static str {
        "inference-loads"
    }

    fn lead(self: Arc<Self>, term: CancellationToken) -> Leading {
        Box::pin(async move {
            // Samples from before this term may be from a previous leadership: start afresh,
            // and give the agents the stale window to reach this leader.
            let started = unix_ms();
            let grace =
                (flotilla_core::routing::DEFAULT_SAMPLE_INTERVAL_MS * STALE_AFTER_INTERVALS) as i64;
            let samples = &self.discovery.samples;
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = term.cancelled() => return,
                    _ = samples.notify.notified() => {}
                    _ = tick.tick() => {}
                }
                let now = unix_ms();
                let latest = samples.latest.lock().expect("samples").clone();
                let ops = plan(&self.discovery, &latest, now, started + grace);
                if ops.is_empty() {
                    continue;
                }
                let n = ops.len();
                match crate::discovery::exports::write(&self.backend, ops).await {
                    Ok(_) => tracing::debug!(writes = n, "inference load verdicts changed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not write inference loads; retrying")
                    }
                }
                // The mirror applies the write before the next plan reads it; until then a
                // plan would repeat it, which is harmless (same record).
            }
        })
    }
}

/// Stored loads by service, then cluster, as the routing table reads them.
pub(super) fn table_loads(
    stored: &BTreeMap<ServiceKey, BTreeMap<String, v1::InferenceLoadRecord>>,
    now_unix_ms: i64,
) -> BTreeMap<ServiceKey, BTreeMap<String, InferenceLoad>> {
    stored
        .iter()
        .map(|(k, m)| {
            (
                k.clone(),
                m.iter()
                    .map(|(c, r)| (c.clone(), load_of(r, now_unix_ms)))
                    .collect(),
            )
        })
        .collect()
}
