use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::export::{
    Endpoint, Export, InferenceLoad, Port, Protocol, Service, ServiceType, aggregate,
};
use crate::selector::Selector;

const NOW: i64 = 1_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(addr: &str, ready: bool) -> Endpoint {
    Endpoint {
        address: ip(addr),
        hostname: String::new(),
        zone: String::new(),
        ready,
        serving: ready,
        terminating: false,
    }
}

/// An export from `cluster` with `ready` of `total` endpoints and one LoadBalancer address.
fn export(cluster: &str, n: u8, ready: usize, total: usize) -> Export {
    Export {
        cluster: cluster.into(),
        namespace: "ml".into(),
        name: "llm".into(),
        service_type: Some(ServiceType::ClusterSetIp),
        ports: vec![Port {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8000,
            app_protocol: None,
        }],
        addresses: vec![ip(&format!("192.0.2.{n}"))],
        endpoints: (0..total)
            .map(|i| ep(&format!("10.{n}.0.{i}"), i < ready))
            .collect(),
        created_at_unix_ms: i64::from(n),
        gpu_pools: vec!["h100".into()],
        ..Export::default()
    }
}

fn cluster(name: &str, region: &str, health: Health) -> ClusterState {
    ClusterState {
        name: name.into(),
        health: Some(health),
        region: region.into(),
        labels: BTreeMap::new(),
        inventory_incomplete: false,
        pools: [(
            "h100".to_string(),
            PoolGpus {
                idle: 4,
                allocatable: 8,
            },
        )]
        .into(),
        shifted: None,
    }
}

struct Fleet {
    clusters: BTreeMap<String, ClusterState>,
    exports: Vec<Export>,
    loads: BTreeMap<String, InferenceLoad>,
}

impl Fleet {
    /// Clusters a (eu-west), b (eu-west), c (us-east), each with 3/3 endpoints.
    fn three() -> Self {
        let mut f = Fleet {
            clusters: BTreeMap::new(),
            exports: Vec::new(),
            loads: BTreeMap::new(),
        };
        for (i, (n, r)) in [("a", "eu-west"), ("b", "eu-west"), ("c", "us-east")]
            .iter()
            .enumerate()
        {
            f.clusters
                .insert(n.to_string(), cluster(n, r, Health::Ready));
            f.exports.push(export(n, i as u8 + 1, 3, 3));
        }
        f
    }

    fn service(&self) -> Service {
        aggregate(&self.exports).pop_first().unwrap().1
    }

    fn route(&self, p: &RoutingPolicy, from: Option<&str>) -> Route {
        self.route_seeded(p, from, 7)
    }

    fn route_seeded(&self, p: &RoutingPolicy, from: Option<&str>, seed: u64) -> Route {
        let inputs = Inputs {
            clusters: &self.clusters,
            loads: &self.loads,
            now_unix_ms: NOW,
            seed,
        };
        route(
            &self.service(),
            p,
            inputs,
            &Client {
                cluster: from.map(str::to_string),
                region: None,
            },
        )
    }

    fn set_ready(&mut self, c: &str, ready: usize) {
        let e = self.exports.iter_mut().find(|e| e.cluster == c).unwrap();
        for (i, ep) in e.endpoints.iter_mut().enumerate() {
            ep.ready = i < ready;
        }
    }

    fn health(&mut self, c: &str, h: Health) {
        self.clusters.get_mut(c).unwrap().health = Some(h);
    }

    fn load(&mut self, c: &str, queue: f64, kv: f64, age_ms: i64) {
        self.loads.insert(
            c.into(),
            InferenceLoad {
                queue_depth: queue,
                kv_cache_usage: kv,
                pods: 2,
                sampled_at_unix_ms: NOW - age_ms,
            },
        );
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn tier(k: &str, v: &str) -> Tier {
    Tier {
        name: String::new(),
        selector: Selector {
            match_labels: [(k.to_string(), v.to_string())].into(),
            ..Default::default()
        },
    }
}

fn eu_then_us() -> RoutingPolicy {
    RoutingPolicy {
        tiers: vec![tier("region", "eu-west"), tier("region", "us-east")],
        ..Default::default()
    }
}

fn verdict<'a>(r: &'a Route, c: &str) -> &'a Verdict {
    r.verdicts.iter().find(|v| v.cluster == c).unwrap()
}

#[test]
fn without_a_policy_every_healthy_cluster_answers() {
    let f = Fleet::three();
    let r = f.route(&RoutingPolicy::default(), None);
    assert_eq!(sorted(r.clusters.clone()), ["a", "b", "c"]);
    assert_eq!(r.answers.len(), 3);
    assert_eq!(r.ttl_seconds, DEFAULT_TTL_SECONDS);
}

#[test]
fn the_first_tier_with_a_healthy_cluster_answers() {
    let mut f = Fleet::three();
    let p = eu_then_us();
    assert_eq!(sorted(f.route(&p, None).clusters), ["a", "b"]);
    let r = f.route(&p, None);
    assert!(
        verdict(&r, "c")
            .reason
            .contains("tier 1 (region=eu-west) answers first"),
        "{}",
        verdict(&r, "c").reason
    );
    f.set_ready("a", 0);
    assert_eq!(f.route(&p, None).clusters, ["b"]);
    f.set_ready("b", 0);
    let r = f.route(&p, None);
    assert_eq!(r.clusters, ["c"]);
    assert_eq!(verdict(&r, "a").reason, "skipped: no ready endpoints (0/3)");
}

#[test]
fn unreachable_left_and_joining_clusters_are_never_answered() {
    for h in [Health::Unreachable, Health::Left, Health::Joining] {
        let mut f = Fleet::three();
        f.health("a", h);
        f.health("b", h);
        f.health("c", h);
        let r = f.route(&RoutingPolicy::default(), None);
        assert!(r.answers.is_empty(), "{h:?}");
        assert!(
            r.verdicts
                .iter()
                .all(|v| v.class == Class::Excluded && !v.chosen)
        );
    }
    let mut f = Fleet::three();
    f.clusters.remove("a");
    let r = f.route(&RoutingPolicy::default(), None);
    assert_eq!(
        verdict(&r, "a").reason,
        "skipped: not a member of the fleet"
    );
}

#[test]
fn a_cluster_needs_min_healthy_endpoints_and_falls_back_when_nobody_has_them() {
    let mut f = Fleet::three();
    let p = RoutingPolicy {
        min_healthy_endpoints: 2,
        ..eu_then_us()
    };
    f.set_ready("a", 1);
    assert_eq!(f.route(&p, None).clusters, ["b"]);
    f.set_ready("b", 1);
    let r = f.route(&p, None);
    assert_eq!(
        r.clusters,
        ["c"],
        "the next tier with enough endpoints answers"
    );
    assert_eq!(verdict(&r, "a").class, Class::BelowThreshold);
    f.set_ready("c", 1);
    let r = f.route(&p, None);
    assert_eq!(
        sorted(r.clusters.clone()),
        ["a", "b"],
        "last resort: the first tier's clusters with any endpoint"
    );
    assert!(
        verdict(&r, "a")
            .reason
            .contains("no healthier cluster is eligible")
    );
}

#[test]
fn min_healthy_fraction_counts_ready_over_all() {
    let mut f = Fleet::three();
    let p = RoutingPolicy {
        min_healthy_fraction: 0.5,
        ..eu_then_us()
    };
    f.set_ready("a", 1); // 1/3 < 0.5
    assert_eq!(f.route(&p, None).clusters, ["b"]);
    f.set_ready("a", 2); // 2/3
    assert_eq!(sorted(f.route(&p, None).clusters), ["a", "b"]);
}

#[test]
fn local_first_prefers_the_clients_cluster_then_its_region() {
    let mut f = Fleet::three();
    let p = RoutingPolicy {
        local_first: true,
        ..Default::default()
    };
    let r = f.route(&p, Some("a"));
    assert_eq!(r.clusters, ["a"]);
    assert_eq!(r.tiers, ["local cluster a", "local region eu-west", "any"]);
    f.set_ready("a", 0);
    assert_eq!(f.route(&p, Some("a")).clusters, ["b"]);
    f.health("b", Health::Unreachable);
    assert_eq!(f.route(&p, Some("a")).clusters, ["c"]);
    // An unknown client: the plain tiers.
    assert_eq!(sorted(f.route(&p, Some("nowhere")).clusters), ["c"]);
}

#[test]
fn local_first_stays_within_the_policys_tiers() {
    let f = Fleet::three();
    let p = RoutingPolicy {
        local_first: true,
        tiers: vec![tier("region", "us-east")],
        ..Default::default()
    };
    let r = f.route(&p, Some("a"));
    assert_eq!(r.clusters, ["c"], "a is local but outside every tier");
    assert_eq!(
        verdict(&r, "a").reason,
        "skipped: matches none of the policy's tiers"
    );
}

#[test]
fn weights_order_answers_in_proportion() {
    let f = Fleet::three();
    let p = RoutingPolicy {
        weights: vec![
            WeightRule {
                cluster: Some("a".into()),
                selector: None,
                weight: 6,
            },
            WeightRule {
                cluster: None,
                selector: Some(tier("region", "eu-west").selector),
                weight: 3,
            },
        ],
        ..Default::default()
    };
    let mut first: BTreeMap<String, u32> = BTreeMap::new();
    let n = 20_000;
    for seed in 0..n {
        let r = f.route_seeded(&p, None, seed);
        *first.entry(r.clusters[0].clone()).or_default() += 1;
    }
    // a: 6, b: 3 (the eu-west rule), c: 1 => 0.6, 0.3, 0.1 of first answers.
    for (c, want) in [("a", 0.6), ("b", 0.3), ("c", 0.1)] {
        let got = f64::from(first[c]) / n as f64;
        assert!((got - want).abs() < 0.02, "{c}: {got} vs {want}");
    }
}

#[test]
fn weight_zero_drains_a_cluster() {
    let f = Fleet::three();
    let p = RoutingPolicy {
        weights: vec![WeightRule {
            cluster: Some("b".into()),
            selector: None,
            weight: 0,
        }],
        ..eu_then_us()
    };
    let r = f.route(&p, None);
    assert_eq!(r.clusters, ["a"]);
    assert_eq!(verdict(&r, "b").reason, "skipped: weight 0 (drained)");
}

fn inference() -> RoutingPolicy {
    RoutingPolicy {
        saturation: Some(Saturation::default()),
        ..eu_then_us()
    }
}

#[test]
fn a_saturated_cluster_is_skipped_while_another_has_headroom() {
    let mut f = Fleet::three();
    f.exports.retain(|e| e.cluster != "b");
    let p = inference();
    f.load("a", 7.0, 0.2, 0);
    f.load("c", 1.0, 0.3, 0);
    let r = f.route(&p, None);
    assert_eq!(r.clusters, ["c"], "a's queue is over 5; c has headroom");
    assert!(
        verdict(&r, "a")
            .reason
            .contains("queue depth 7.0 ≥ 5 while another eligible cluster has headroom"),
        "{}",
        verdict(&r, "a").reason
    );
    f.load("a", 1.0, 0.85, 0);
    assert_eq!(f.route(&p, None).clusters, ["c"], "KV-cache use 0.85 ≥ 0.8");
    f.load("a", 1.0, 0.5, 0);
    assert_eq!(f.route(&p, None).clusters, ["a"], "traffic comes back");
    // Everyone saturated: tier order again.
    f.load("a", 9.0, 0.9, 0);
    f.load("c", 9.0, 0.9, 0);
    let r = f.route(&p, None);
    assert_eq!(r.clusters, ["a"]);
    assert!(
        verdict(&r, "a")
            .reason
            .contains("no eligible cluster has headroom")
    );
}

#[test]
fn a_stale_sample_is_unknown_never_idle() {
    let mut f = Fleet::three();
    f.exports.retain(|e| e.cluster != "b");
    let p = inference();
    f.load("a", 7.0, 0.2, 0);
    f.load("c", 0.0, 0.0, 3_001); // older than 3 intervals of 1 s
    assert_eq!(
        f.route(&p, None).clusters,
        ["a"],
        "c's idle sample is stale: not headroom"
    );
    f.loads.remove("c");
    assert_eq!(
        f.route(&p, None).clusters,
        ["a"],
        "no sample at all: not headroom either"
    );
    f.load("c", 0.0, 0.0, 2_999);
    assert_eq!(f.route(&p, None).clusters, ["c"]);
    // A stale sample does not make a cluster saturated either.
    f.load("a", 9.0, 0.9, 10_000);
    assert_eq!(f.route(&p, None).clusters, ["a"]);
}

#[test]
fn gpu_pool_saturation_uses_idle_over_allocatable() {
    let mut f = Fleet::three();
    let p = RoutingPolicy {
        saturation: Some(Saturation {
            min_free_gpu_percent: Some(25.0),
            inference: false,
            ..Default::default()
        }),
        ..eu_then_us()
    };
    for c in ["a", "b"] {
        f.clusters.get_mut(c).unwrap().pools.insert(
            "h100".into(),
            PoolGpus {
                idle: 1,
                allocatable: 8,
            },
        );
    }
    let r = f.route(&p, None);
    assert_eq!(r.clusters, ["c"]);
    assert!(
        verdict(&r, "a")
            .reason
            .contains("1/8 GPUs idle (12% < 25%) in pool h100"),
        "{}",
        verdict(&r, "a").reason
    );
}

#[test]
fn degraded_clusters_answer_last_never_or_as_healthy() {
    let mut f = Fleet::three();
    f.health("a", Health::Degraded);
    f.clusters.get_mut("b").unwrap().inventory_incomplete = true;
    let p = eu_then_us();
    let r = f.route(&p, None);
    assert_eq!(
        r.clusters,
        ["c"],
        "a Ready cluster in a later tier beats Degraded ones"
    );
    assert_eq!(verdict(&r, "b").class, Class::Degraded);
    f.health("c", Health::Unreachable);
    assert_eq!(
        sorted(f.route(&p, None).clusters),
        ["a", "b"],
        "nothing healthy: degraded answers"
    );
    let never = RoutingPolicy {
        degraded: DegradedMode::Never,
        ..eu_then_us()
    };
    assert!(f.route(&never, None).clusters.is_empty());
    f.health("c", Health::Ready);
    let as_healthy = RoutingPolicy {
        degraded: DegradedMode::AsHealthy,
        ..eu_then_us()
    };
    assert_eq!(sorted(f.route(&as_healthy, None).clusters), ["a", "b"]);
}

#[test]
fn a_clusterset_ip_export_needs_a_reachable_address() {
    let mut f = Fleet::three();
    f.exports[0].addresses.clear();
    let r = f.route(&eu_then_us(), None);
    assert_eq!(r.clusters, ["b"]);
    assert!(verdict(&r, "a").reason.contains("--flat-network"));
}

#[test]
fn headless_answers_ready_endpoints_with_their_hostnames() {
    let mut f = Fleet::three();
    for e in &mut f.exports {
        e.service_type = Some(ServiceType::Headless);
        e.addresses.clear();
        for (i, ep) in e.endpoints.iter_mut().enumerate() {
            ep.hostname = format!("pod-{i}");
        }
    }
    f.set_ready("a", 2);
    let p = RoutingPolicy {
        tiers: vec![tier("region", "eu-west")],
        ..Default::default()
    };
    let r = f.route(&p, None);
    let a: Vec<_> = r
        .answers
        .iter()
        .filter(|x| x.cluster == "a")
        .map(|x| x.hostname.clone())
        .collect();
    assert_eq!(sorted(a), ["pod-0", "pod-1"]);
    assert_eq!(r.answers.len(), 5);
}

#[test]
fn max_answers_interleaves_clusters() {
    let mut f = Fleet::three();
    for e in &mut f.exports {
        let base = e.addresses[0];
        e.addresses = vec![base, ip(&format!("198.51.100.{}", e.created_at_unix_ms))];
    }
    let p = RoutingPolicy {
        max_answers: 3,
        ..Default::default()
    };
    let r = f.route(&p, None);
    assert_eq!(r.answers.len(), 3);
    assert_eq!(
        sorted(r.answers.iter().map(|a| a.cluster.clone()).collect()),
        ["a", "b", "c"]
    );
}

#[test]
fn validation_names_the_field() {
    let cases: Vec<(RoutingPolicy, &str)> = vec![
        (
            RoutingPolicy {
                min_healthy_fraction: 1.5,
                ..Default::default()
            },
            "minHealthyFraction",
        ),
        (
            RoutingPolicy {
                ttl_seconds: 0,
                ..Default::default()
            },
            "ttlSeconds",
        ),
        (
            RoutingPolicy {
                max_answers: 0,
                ..Default::default()
            },
            "maxAnswers",
        ),
        (
            RoutingPolicy {
                weights: vec![WeightRule {
                    cluster: Some("a".into()),
                    selector: None,
                    weight: 1001,
                }],
                ..Default::default()
            },
            "weights[0].weight",
        ),
        (
            RoutingPolicy {
                weights: vec![WeightRule::default()],
                ..Default::default()
            },
            "weights[0]",
        ),
        (
            RoutingPolicy {
                tiers: vec![
                    tier("region", "eu"),
                    Tier {
                        name: String::new(),
                        selector: Selector {
                            match_labels: [("a b".into(), "x".into())].into(),
                            ..Default::default()
                        },
                    },
                ],
                ..Default::default()
            },
            "tiers[1].selector.matchLabels[\"a b\"]",
        ),
        (
            RoutingPolicy {
                saturation: Some(Saturation {
                    max_kv_cache_usage: 80.0,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "saturation.maxKvCacheUsage",
        ),
        (
            RoutingPolicy {
                saturation: Some(Saturation {
                    min_free_gpu_percent: None,
                    inference: false,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "saturation",
        ),
        (
            RoutingPolicy {
                saturation: Some(Saturation {
                    sample_interval_ms: 5,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "saturation.sampleIntervalMs",
        ),
    ];
    for (p, field) in cases {
        assert_eq!(p.validate().unwrap_err().field, field);
    }
    assert!(eu_then_us().validate().is_ok());
    assert!(inference().validate().is_ok());
}

#[test]
fn a_policy_reads_from_json_with_defaults_and_refuses_unknown_fields() {
    let p: RoutingPolicy = serde_json::from_str(
        r#"{"tiers":[{"selector":{"matchLabels":{"region":"eu-west"}}}],"localFirst":true}"#,
    )
    .unwrap();
    assert!(p.local_first);
    assert_eq!(p.min_healthy_endpoints, 1);
    assert_eq!(p.ttl_seconds, DEFAULT_TTL_SECONDS);
    let e = serde_json::from_str::<RoutingPolicy>(r#"{"tierz":[]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `tierz`"), "{e}");
}

#[test]
fn cidrs_locate_clients_by_longest_prefix() {
    let nets: Vec<(Cidr, &str)> = vec![
        ("10.0.0.0/8".parse().unwrap(), "a"),
        ("10.1.0.0/16".parse().unwrap(), "b"),
        ("fd00::/8".parse().unwrap(), "c"),
        ("172.16.0.0/12".parse().unwrap(), "d"),
        ("172.16.0.0/12".parse().unwrap(), "e"),
    ];
    let at = |s: &str| locate(ip(s), nets.iter().map(|(n, c)| (n, *c)));
    assert_eq!(at("10.2.3.4"), Some("a"));
    assert_eq!(at("10.1.3.4"), Some("b"));
    assert_eq!(at("fd12::1"), Some("c"));
    assert_eq!(at("192.168.1.1"), None);
    assert_eq!(at("172.16.0.1"), None, "two clusters claim it");
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("10.0.0.0".parse::<Cidr>().is_err());
    assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
}

/// Random fleets: the invariants hold for every policy and state.
#[test]
fn properties_hold_on_random_fleets() {
    let mut rng = SplitMix(42);
    let healths = [
        Health::Joining,
        Health::Ready,
        Health::Degraded,
        Health::Unreachable,
        Health::Left,
    ];
    for round in 0..3_000 {
        let n = 1 + (rng.next() % 6) as usize;
        let mut f = Fleet {
            clusters: BTreeMap::new(),
            exports: Vec::new(),
            loads: BTreeMap::new(),
        };
        for i in 0..n {
            let name = format!("c{i}");
            let region = ["eu", "us", "ap"][(rng.next() % 3) as usize];
            let mut c = cluster(&name, region, healths[(rng.next() % 5) as usize]);
            c.inventory_incomplete = rng.next().is_multiple_of(7);
            f.clusters.insert(name.clone(), c);
            let total = (rng.next() % 4) as usize;
            let ready = (rng.next() % (total as u64 + 1)) as usize;
            f.exports.push(export(&name, i as u8 + 1, ready, total));
            if rng.next().is_multiple_of(2) {
                f.load(
                    &name,
                    (rng.next() % 10) as f64,
                    (rng.next() % 100) as f64 / 100.0,
                    (rng.next() % 6000) as i64,
                );
            }
        }
        let p = RoutingPolicy {
            tiers: match rng.next() % 3 {
                0 => vec![],
                1 => vec![tier("region", "eu"), tier("region", "us")],
                _ => vec![tier("region", "us"), Tier::default()],
            },
            local_first: rng.next().is_multiple_of(2),
            min_healthy_endpoints: 1 + (rng.next() % 3) as u32,
            saturation: (rng.next().is_multiple_of(2)).then(Saturation::default),
            degraded: [
                DegradedMode::Last,
                DegradedMode::Never,
                DegradedMode::AsHealthy,
            ][(rng.next() % 3) as usize],
            ..Default::default()
        };
        let from = format!("c{}", rng.next() % 7);
        let r = f.route_seeded(&p, Some(&from), rng.next());
        for a in &r.answers {
            let h = f.clusters[&a.cluster].health;
            assert!(
                matches!(h, Some(Health::Ready | Health::Degraded)),
                "round {round}: {} is {h:?}",
                a.cluster
            );
            assert!(r.clusters.contains(&a.cluster));
        }
        let healthy_exists = r.verdicts.iter().any(|v| v.class == Class::Healthy);
        if healthy_exists {
            assert!(
                !r.answers.is_empty(),
                "round {round}: a healthy cluster exists but nothing is answered: {r:#?}"
            );
            assert!(
                r.verdicts
                    .iter()
                    .filter(|v| v.chosen)
                    .all(|v| matches!(v.class, Class::Healthy | Class::Saturated))
            );
        }
        assert!(r.answers.len() <= p.max_answers as usize);
        assert!(
            r.verdicts
                .iter()
                .all(|v| v.chosen == r.clusters.contains(&v.cluster))
        );
    }
}

#[test]
fn an_import_names_the_heaviest_clusters_first_address_per_family() {
    let choice = |c: &str, w: u32, a: &[&str]| Choice {
        cluster: c.into(),
        weight: w,
        addresses: a.iter().map(|s| (ip(s), String::new())).collect(),
    };
    let d = Decision {
        chosen: vec![
            choice("a", 1, &["10.0.0.1"]),
            choice("b", 5, &["fd00::2", "10.0.0.2"]),
            choice("c", 5, &["10.0.0.3"]),
        ],
        ..Default::default()
    };
    assert_eq!(d.preferred_ips(), vec![ip("10.0.0.2"), ip("fd00::2")]);
    assert!(Decision::default().preferred_ips().is_empty());
}

/// The network index answers exactly as the scan does, on random networks and addresses
/// (both families, overlaps, ambiguous claims, /0).
#[test]
fn the_network_index_agrees_with_locate() {
    let mut rng = SplitMix(7);
    for _ in 0..500 {
        let n = (rng.next() % 12) as usize;
        let mut nets: Vec<(Cidr, String)> = Vec::new();
        for _ in 0..n {
            let v6 = rng.next().is_multiple_of(4);
            let r = rng.next();
            let (addr, max) = match v6 {
                false => (
                    IpAddr::from([10, (r % 3) as u8, (r >> 8) as u8 % 4, (r >> 16) as u8]),
                    32,
                ),
                true => (
                    IpAddr::from([0xfd00, 0, 0, (r % 3) as u16, 0, 0, 0, (r >> 8) as u16 % 4]),
                    128,
                ),
            };
            let prefix = [0, 8, 16, 24, max][(rng.next() % 5) as usize];
            nets.push((Cidr { addr, prefix }, format!("c{}", rng.next() % 3)));
        }
        let index = NetworkIndex::new(nets.iter().map(|(n, c)| (n, c.as_str())));
        for _ in 0..20 {
            let r = rng.next();
            let ip = match r % 4 {
                0 => IpAddr::from([
                    0xfd00,
                    0,
                    0,
                    (r >> 4) as u16 % 3,
                    0,
                    0,
                    0,
                    (r >> 8) as u16 % 4,
                ]),
                _ => IpAddr::from([10, (r >> 4) as u8 % 3, (r >> 8) as u8 % 4, (r >> 16) as u8]),
            };
            let scan = locate(ip, nets.iter().map(|(n, c)| (n, c.as_str())));
            assert_eq!(index.locate(ip), scan, "{ip} in {nets:?}");
        }
    }
}

#[test]
fn a_cluster_an_upgrade_drains_answers_only_when_no_other_can() {
    let mut f = Fleet::three();
    let p = RoutingPolicy::default();
    f.clusters.get_mut("a").unwrap().shifted = Some("k8s-135-abcd".into());
    let r = f.route(&p, None);
    assert_eq!(sorted(r.clusters.clone()), ["b", "c"]);
    let v = verdict(&r, "a");
    assert_eq!(v.class, Class::Shifted);
    assert!(v.reason.contains("k8s-135-abcd"), "{}", v.reason);
    // With no other eligible cluster, the drained one answers.
    f.health("b", Health::Unreachable);
    f.health("c", Health::Unreachable);
    assert_eq!(f.route(&p, None).clusters, ["a"], "nothing else can serve");
}
