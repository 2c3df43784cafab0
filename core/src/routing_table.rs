//! The routing table: every service's routing decision, computed once per change of the
//! fleet's state and then read by every DNS query and `Resolve` call without locks (the edges
//! hold it behind an atomic pointer swap). Pure.
//!
//! A local-first decision depends on the client, but only through its cluster (when that
//! cluster exports the service) or its region: the table holds one decision per exporting
//! cluster and one per region, so a query never decides anything.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::export::{InferenceLoad, Service, ServiceKey, ServiceType};
use crate::health::Health;
use crate::routing::{Client, ClusterState, Decision, NetworkIndex, RoutingPolicy, decide};

/// What the table is built from.
#[derive(Debug, Clone, Copy)]
pub struct TableInputs<'a> {
    /// Merged services.
    pub services: &'a BTreeMap<ServiceKey, Service>,
    /// Per-service policies.
    pub policies: &'a BTreeMap<ServiceKey, RoutingPolicy>,
    /// The policy of services without one.
    pub default_policy: &'a RoutingPolicy,
    /// Member clusters (at least every exporting cluster; others are not read).
    pub clusters: &'a BTreeMap<String, ClusterState>,
    /// Every member cluster's region (local-first answers per region).
    pub regions: &'a Arc<BTreeMap<String, String>>,
    /// Inference load per service and cluster.
    pub loads: &'a BTreeMap<ServiceKey, BTreeMap<String, InferenceLoad>>,
    /// The networks (pod and node CIDRs) each cluster reported, to locate clients.
    pub networks: &'a Arc<NetworkIndex>,
    /// Now, Unix milliseconds.
    pub now_unix_ms: i64,
}

/// One service's routes.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRoutes {
    /// The merged service.
    pub service: Service,
    /// The policy that decided (the service's own or the default).
    pub policy: RoutingPolicy,
    /// Whether the policy is the service's own.
    pub own_policy: bool,
    /// The decision for a client of unknown location.
    pub default: Decision,
    /// Decisions for clients in an exporting cluster (local-first policies only).
    pub by_cluster: BTreeMap<String, Decision>,
    /// Decisions for clients elsewhere in a region (local-first policies only).
    pub by_region: BTreeMap<String, Decision>,
    /// Headless per-host names: (cluster, hostname) → ready addresses, for clusters that
    /// may be answered at all (not Unreachable, Left, ...).
    pub hosts: BTreeMap<(String, String), Vec<IpAddr>>,
}

impl ServiceRoutes {
    /// The decision for a client in `cluster` (of `region`), or of unknown location.
    pub fn decision(&self, cluster: Option<&str>, region: Option<&str>) -> &Decision {
        cluster
            .and_then(|c| self.by_cluster.get(c))
            .or_else(|| region.and_then(|r| self.by_region.get(r)))
            .unwrap_or(&self.default)
    }

    /// Whether this is a headless service.
    pub fn headless(&self) -> bool {
        self.service.service_type == Some(ServiceType::Headless)
    }
}

/// The name a headless endpoint without a hostname gets: its address with dashes
/// (`10-1-0-7`), as Kubernetes DNS names pods.
pub fn host_label(hostname: &str, address: IpAddr) -> String {
    match hostname.is_empty() {
        false => hostname.to_ascii_lowercase(),
        true => address.to_string().replace(['.', ':'], "-"),
    }
}

/// Every service's routes, immutable once built.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    /// Increases with every build (DNS serves it as the SOA serial).
    pub generation: u64,
    /// When it was built, Unix milliseconds.
    pub built_at_unix_ms: i64,
    /// Services by key.
    pub services: HashMap<ServiceKey, Arc<ServiceRoutes>>,
    /// The same services by `<name>.<namespace>`, the tail of their DNS names, so a query
    /// finds its service from the name's text without building a key.
    pub by_dns: HashMap<String, Arc<ServiceRoutes>>,
    /// Namespaces with at least one service.
    pub namespaces: BTreeSet<String>,
    /// Networks for locating clients.
    pub networks: Arc<NetworkIndex>,
    /// Region of each member cluster.
    pub regions: Arc<BTreeMap<String, String>>,
}

fn service_routes<'a>(
    key: &ServiceKey,
    s: &Service,
    inputs: &TableInputs<'a>,
    regions: &OnceCell<BTreeSet<&'a str>>,
) -> ServiceRoutes {
    let no_loads = BTreeMap::new();
    let (policy, own) = match inputs.policies.get(key) {
        Some(p) => (p, true),
        None => (inputs.default_policy, false),
    };
    let loads = inputs.loads.get(key).unwrap_or(&no_loads);
    let d = |client: &Client| {
        decide(
            s,
            policy,
            inputs.clusters,
            loads,
            inputs.now_unix_ms,
            client,
        )
    };
    let default = d(&Client::default());
    let (mut by_cluster, mut by_region) = (BTreeMap::new(), BTreeMap::new());
    if policy.local_first {
        for e in &s.exports {
            by_cluster.insert(
                e.cluster.clone(),
                d(&Client {
                    cluster: Some(e.cluster.clone()),
                    region: None,
                }),
            );
        }
        // The fleet's regions, gathered once per build and only for a local-first policy.
        let regions = regions.get_or_init(|| region_set(inputs.regions));
        for r in regions {
            by_region.insert(
                r.to_string(),
                d(&Client {
                    cluster: None,
                    region: Some(r.to_string()),
                }),
            );
        }
    }
    let mut hosts: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
    if s.service_type == Some(ServiceType::Headless) {
        // Per-host names answer for every reporting cluster's ready endpoints: the policy
        // orders the service name, it does not hide pods that exist.
        let answerable = |c: &str| {
            inputs
                .clusters
                .get(c)
                .and_then(|c| c.health)
                .is_some_and(|h| matches!(h, Health::Ready | Health::Degraded))
        };
        for e in s.exports.iter().filter(|e| answerable(&e.cluster)) {
            for ep in e.ready_endpoints() {
                hosts
                    .entry((
                        e.cluster.to_ascii_lowercase(),
                        host_label(&ep.hostname, ep.address),
                    ))
                    .or_default()
                    .push(ep.address);
            }
        }
    }
    ServiceRoutes {
        service: s.clone(),
        policy: policy.clone(),
        own_policy: own,
        default,
        by_cluster,
        by_region,
        hosts,
    }
}

/// The `by_dns` key of a service: `<name>.<namespace>`, the tail of its DNS names.
fn dns_key(k: &ServiceKey) -> String {
    format!("{}.{}", k.name, k.namespace)
}

fn region_set(regions: &BTreeMap<String, String>) -> BTreeSet<&str> {
    regions
        .values()
        .map(String::as_str)
        .filter(|r| !r.is_empty())
        .collect()
}

impl RoutingTable {
    /// Decide every service. `previous` lends the routes of services whose result did not
    /// change (compared by value), so unchanged entries keep their identity.
    pub fn build(
        generation: u64,
        inputs: TableInputs<'_>,
        previous: Option<&RoutingTable>,
    ) -> Self {
        let regions = OnceCell::new();
        let mut services = HashMap::with_capacity(inputs.services.len());
        for (key, s) in inputs.services {
            let routes = service_routes(key, s, &inputs, &regions);
            let reused = previous
                .and_then(|p| p.services.get(key))
                .filter(|old| ***old == routes)
                .cloned();
            services.insert(key.clone(), reused.unwrap_or_else(|| Arc::new(routes)));
        }
        Self::assemble(generation, &inputs, services)
    }

    /// Decide again only the services in `changed` (gone from `inputs.services`: removed);
    /// every other entry is shared with `self`. The hub calls this after each batch of store
    /// changes, so one endpoint change costs one decision, not ten thousand.
    pub fn update(
        &self,
        generation: u64,
        inputs: TableInputs<'_>,
        changed: &BTreeSet<ServiceKey>,
    ) -> Self {
        let regions = OnceCell::new();
        let mut services = self.services.clone();
        let mut by_dns = self.by_dns.clone();
        let mut namespaces = self.namespaces.clone();
        let mut removed = false;
        for key in changed {
            let dns = dns_key(key);
            match inputs.services.get(key) {
                Some(s) => {
                    let r = Arc::new(service_routes(key, s, &inputs, &regions));
                    by_dns.insert(dns, r.clone());
                    services.insert(key.clone(), r);
                    if !namespaces.contains(&key.namespace) {
                        namespaces.insert(key.namespace.clone());
                    }
                }
                None => {
                    by_dns.remove(&dns);
                    removed |= services.remove(key).is_some();
                }
            }
        }
        // A namespace goes only with its last service (rare: recounted then).
        if removed {
            namespaces = services.keys().map(|k| k.namespace.clone()).collect();
        }
        RoutingTable {
            generation,
            built_at_unix_ms: inputs.now_unix_ms,
            services,
            by_dns,
            namespaces,
            networks: inputs.networks.clone(),
            regions: inputs.regions.clone(),
        }
    }

    fn assemble(
        generation: u64,
        inputs: &TableInputs<'_>,
        services: HashMap<ServiceKey, Arc<ServiceRoutes>>,
    ) -> Self {
        RoutingTable {
            generation,
            built_at_unix_ms: inputs.now_unix_ms,
            by_dns: services
                .iter()
                .map(|(k, v)| (dns_key(k), v.clone()))
                .collect(),
            namespaces: services.keys().map(|k| k.namespace.clone()).collect(),
            services,
            networks: inputs.networks.clone(),
            regions: inputs.regions.clone(),
        }
    }

    /// One service by `<name>.<namespace>` (lower case).
    pub fn get_dns(&self, name_dot_namespace: &str) -> Option<&Arc<ServiceRoutes>> {
        self.by_dns.get(name_dot_namespace)
    }

    /// One service's routes.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceRoutes>> {
        self.services.get(&ServiceKey::new(namespace, name))
    }

    /// The cluster whose networks hold `ip`, and that cluster's region.
    pub fn locate(&self, ip: IpAddr) -> (Option<&str>, Option<&str>) {
        let c = self.networks.locate(ip);
        (
            c,
            c.and_then(|c| self.regions.get(c))
                .map(String::as_str)
                .filter(|r| !r.is_empty()),
        )
    }

    /// The decision for `key` for a client in `cluster` (its region looked up here).
    pub fn decision(&self, key: &ServiceKey, cluster: Option<&str>) -> Option<&Decision> {
        let s = self.services.get(key)?;
        let region = cluster
            .and_then(|c| self.regions.get(c))
            .map(String::as_str);
        Some(s.decision(cluster, region))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Endpoint, Export, Port, Protocol, aggregate};

    fn export(cluster: &str, n: u8, headless: bool) -> Export {
        Export {
            cluster: cluster.into(),
            namespace: "ml".into(),
            name: "llm".into(),
            service_type: Some(if headless {
                ServiceType::Headless
            } else {
                ServiceType::ClusterSetIp
            }),
            ports: vec![Port {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                app_protocol: None,
            }],
            addresses: if headless {
                vec![]
            } else {
                vec![format!("192.0.2.{n}").parse().unwrap()]
            },
            endpoints: vec![Endpoint {
                address: format!("10.{n}.0.1").parse().unwrap(),
                hostname: if n == 1 {
                    "pod-a".into()
                } else {
                    String::new()
                },
                zone: String::new(),
                ready: true,
                serving: true,
                terminating: false,
            }],
            created_at_unix_ms: i64::from(n),
            ..Export::default()
        }
    }

    fn clusters(specs: &[(&str, &str, Health)]) -> BTreeMap<String, ClusterState> {
        specs
            .iter()
            .map(|(n, r, h)| {
                (
                    n.to_string(),
                    ClusterState {
                        name: n.to_string(),
                        health: Some(*h),
                        region: r.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    struct Fixture {
        services: BTreeMap<ServiceKey, Service>,
        policies: BTreeMap<ServiceKey, RoutingPolicy>,
        default_policy: RoutingPolicy,
        clusters: BTreeMap<String, ClusterState>,
        loads: BTreeMap<ServiceKey, BTreeMap<String, InferenceLoad>>,
        networks: Arc<NetworkIndex>,
    }

    impl Fixture {
        fn new(exports: &[Export]) -> Self {
            Fixture {
                services: aggregate(exports),
                policies: BTreeMap::new(),
                default_policy: RoutingPolicy::default(),
                clusters: clusters(&[
                    ("a", "eu", Health::Ready),
                    ("b", "eu", Health::Ready),
                    ("c", "us", Health::Ready),
                    ("d", "us", Health::Ready),
                ]),
                loads: BTreeMap::new(),
                networks: Arc::new(NetworkIndex::new([
                    (&"10.1.0.0/16".parse().unwrap(), "a"),
                    (&"10.4.0.0/16".parse().unwrap(), "d"),
                ])),
            }
        }

        fn build(&self, previous: Option<&RoutingTable>) -> RoutingTable {
            RoutingTable::build(
                1,
                TableInputs {
                    services: &self.services,
                    policies: &self.policies,
                    default_policy: &self.default_policy,
                    clusters: &self.clusters,
                    regions: &Arc::new(
                        self.clusters
                            .values()
                            .map(|c| (c.name.clone(), c.region.clone()))
                            .collect(),
                    ),
                    loads: &self.loads,
                    networks: &self.networks,
                    now_unix_ms: 0,
                },
                previous,
            )
        }
    }

    #[test]
    fn local_first_decisions_are_held_per_exporting_cluster_and_per_region() {
        let mut f = Fixture::new(&[
            export("a", 1, false),
            export("b", 2, false),
            export("c", 3, false),
        ]);
        f.default_policy.local_first = true;
        let t = f.build(None);
        let key = ServiceKey::new("ml", "llm");
        let chosen = |c: Option<&str>| -> Vec<String> {
            t.decision(&key, c)
                .unwrap()
                .chosen
                .iter()
                .map(|c| c.cluster.clone())
                .collect()
        };
        assert_eq!(chosen(Some("a")), ["a"]);
        assert_eq!(chosen(Some("c")), ["c"]);
        assert_eq!(
            chosen(Some("d")),
            ["c"],
            "d exports nothing: its region us answers"
        );
        assert_eq!(chosen(None).len(), 3);
        let (c, r) = t.locate("10.4.2.2".parse().unwrap());
        assert_eq!((c, r), (Some("d"), Some("us")));
    }

    #[test]
    fn unchanged_services_keep_their_routes_across_builds() {
        let mut exports = vec![export("a", 1, false)];
        let mut other = export("b", 2, false);
        other.name = "other".into();
        exports.push(other);
        let mut f = Fixture::new(&exports);
        let t1 = f.build(None);
        exports[0].endpoints[0].ready = false;
        f.services = aggregate(&exports);
        let t2 = f.build(Some(&t1));
        let k_llm = ServiceKey::new("ml", "llm");
        let k_other = ServiceKey::new("ml", "other");
        assert!(Arc::ptr_eq(&t1.services[&k_other], &t2.services[&k_other]));
        assert!(!Arc::ptr_eq(&t1.services[&k_llm], &t2.services[&k_llm]));
        assert!(t2.services[&k_llm].default.chosen.is_empty());
    }

    #[test]
    fn an_update_decides_only_the_changed_services_and_drops_removed_ones() {
        let mut exports = vec![export("a", 1, false)];
        let mut other = export("b", 2, false);
        other.name = "other".into();
        exports.push(other);
        let mut f = Fixture::new(&exports);
        let t1 = f.build(None);
        exports[0].endpoints[0].ready = false;
        exports.pop();
        f.services = aggregate(&exports);
        let (k_llm, k_other) = (ServiceKey::new("ml", "llm"), ServiceKey::new("ml", "other"));
        let inputs = TableInputs {
            services: &f.services,
            policies: &f.policies,
            default_policy: &f.default_policy,
            clusters: &f.clusters,
            regions: &Arc::default(),
            loads: &f.loads,
            networks: &f.networks,
            now_unix_ms: 0,
        };
        let only_llm = t1.update(2, inputs, &[k_llm.clone()].into());
        assert!(only_llm.services[&k_llm].default.chosen.is_empty());
        assert!(
            Arc::ptr_eq(&t1.services[&k_other], &only_llm.services[&k_other]),
            "not in `changed`: kept"
        );
        let both = t1.update(3, inputs, &[k_llm.clone(), k_other.clone()].into());
        assert!(!both.services.contains_key(&k_other));
        assert_eq!(both.generation, 3);
    }

    #[test]
    fn headless_hosts_are_named_by_hostname_or_dashed_address_and_skip_unreachable_clusters() {
        let mut f = Fixture::new(&[
            export("a", 1, true),
            export("b", 2, true),
            export("c", 3, true),
        ]);
        f.clusters.get_mut("c").unwrap().health = Some(Health::Unreachable);
        let t = f.build(None);
        let s = t.get("ml", "llm").unwrap();
        let names: Vec<_> = s.hosts.keys().cloned().collect();
        assert_eq!(
            names,
            [
                ("a".to_string(), "pod-a".to_string()),
                ("b".to_string(), "10-2-0-1".to_string())
            ]
        );
    }
}
