//! Health gates: whether a cluster's rollout is healthy after a batch, judged from the agent's
//! [`HealthReport`] against the baseline pre-flight recorded. A failed gate rolls the cluster
//! back.

use serde::{Deserialize, Serialize};

use super::rollout::Counts;
use super::spec::HealthGates;
use super::step::{HealthReport, PreflightReport};

/// What the cluster looked like before the rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Blue GPU allocatable at the start.
    pub blue_gpu_allocatable: i64,
    /// Ready endpoints of exported services at the start.
    pub ready_endpoints: u32,
}

impl From<&PreflightReport> for Baseline {
    fn from(p: &PreflightReport) -> Self {
        Self {
            blue_gpu_allocatable: p.blue_gpu_allocatable,
            ready_endpoints: p.ready_endpoints,
        }
    }
}

/// Judge a health report; the error lists every gate that failed, for people.
pub fn judge(
    gates: &HealthGates,
    base: &Baseline,
    counts: &Counts,
    r: &HealthReport,
) -> Result<(), Vec<String>> {
    let mut failed = Vec::new();
    if r.green_ready < counts.green {
        failed.push(format!(
            "{} of {} green nodes are Ready with their GPUs allocatable",
            r.green_ready, counts.green
        ));
    }
    // Green so far against the same share of blue: with bounded surge green is still partial.
    if counts.blue > 0 && base.blue_gpu_allocatable > 0 {
        let want = i128::from(base.blue_gpu_allocatable)
            * i128::from(counts.green)
            * i128::from(gates.green_gpu_allocatable_percent);
        let have = i128::from(r.green_gpu_allocatable) * i128::from(counts.blue) * 100;
        if have < want {
            failed.push(format!(
                "green GPU allocatable {} is below {}% of blue's {} for {} of {} nodes",
                r.green_gpu_allocatable,
                gates.green_gpu_allocatable_percent,
                base.blue_gpu_allocatable,
                counts.green,
                counts.blue
            ));
        }
    }
    if u64::from(r.ready_endpoints) * 100
        < u64::from(base.ready_endpoints) * u64::from(gates.endpoints_ready_percent)
    {
        failed.push(format!(
            "{} ready endpoints, below {}% of the {} before the rollout",
            r.ready_endpoints, gates.endpoints_ready_percent, base.ready_endpoints
        ));
    }
    if r.gpu_pods_pending > 0 && r.longest_gpu_pending_secs > gates.max_gpu_pod_pending.as_secs() {
        failed.push(format!(
            "{} GPU pod(s) Pending, the longest for {}s (limit {}s)",
            r.gpu_pods_pending,
            r.longest_gpu_pending_secs,
            gates.max_gpu_pod_pending.as_secs()
        ));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gates() -> HealthGates {
        HealthGates {
            green_gpu_allocatable_percent: 100,
            endpoints_ready_percent: 90,
            max_gpu_pod_pending: Duration::from_secs(300),
            window: Duration::from_secs(60),
        }
    }

    fn healthy() -> HealthReport {
        HealthReport {
            green_nodes: 5,
            green_ready: 5,
            green_gpu_allocatable: 40,
            ready_endpoints: 10,
            gpu_pods_pending: 0,
            longest_gpu_pending_secs: 0,
        }
    }

    const BASE: Baseline = Baseline {
        blue_gpu_allocatable: 80,
        ready_endpoints: 10,
    };
    const HALF: Counts = Counts {
        blue: 10,
        green: 5,
        drained: 5,
        retired: 0,
    };

    #[test]
    fn each_gate_fails_on_its_own() {
        assert_eq!(judge(&gates(), &BASE, &HALF, &healthy()), Ok(()));
        // (what changes, the words the failure must contain)
        type Case = (fn(&mut HealthReport), &'static str);
        let cases: [Case; 4] = [
            (|r| r.green_ready = 4, "4 of 5 green nodes"),
            (|r| r.green_gpu_allocatable = 39, "below 100% of blue's 80"),
            (|r| r.ready_endpoints = 8, "8 ready endpoints"),
            (
                |r| {
                    r.gpu_pods_pending = 2;
                    r.longest_gpu_pending_secs = 301;
                },
                "2 GPU pod(s) Pending",
            ),
        ];
        for (change, words) in cases {
            let mut r = healthy();
            change(&mut r);
            let e = judge(&gates(), &BASE, &HALF, &r).unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].contains(words), "{e:?}");
        }
    }

    #[test]
    fn thresholds_are_inclusive_and_pending_within_the_limit_passes() {
        let mut r = healthy();
        r.ready_endpoints = 9; // exactly 90%
        r.gpu_pods_pending = 3;
        r.longest_gpu_pending_secs = 300;
        assert_eq!(judge(&gates(), &BASE, &HALF, &r), Ok(()));
    }
}
