//! What each member cluster imports: every fleet-wide service in a namespace the cluster has
//! (MCS namespace sameness), as its agent writes it (the `ServiceImport` and one
//! EndpointSlice per exporting cluster). Read from the routing table the stream's replica
//! holds; each agent stream keeps a fingerprint of what it sent and sends the difference.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use flotilla_api::convert::discovery::import_to_wire;
use flotilla_api::v1;
use flotilla_core::export::ServiceKey;
use flotilla_core::routing_table::RoutingTable;
use prost::Message;

/// Services changed over an import batch, by namespace.
pub type Batch = BTreeMap<String, BTreeSet<ServiceKey>>;

/// Most namespaces one `ImportNamespaces` may name.
pub const MAX_IMPORT_NAMESPACES: usize = 10_000;

/// The imports one agent stream has sent.
#[derive(Default)]
pub struct SentImports {
    /// A fingerprint of each service as last sent: a stream holds 16 bytes per service, not
    /// the service (10,000 streams × 1,000 services of 40 endpoints held whole were GiBs).
    sent: HashMap<ServiceKey, u64>,
    /// The namespaces the cluster has, when its agent reports them (`None`: every one).
    namespaces: Option<HashSet<String>>,
    started: bool,
}

/// Built services of one table generation, by service and decision (its address).
type BuiltByDecision = HashMap<(ServiceKey, usize), Arc<Built>>;

/// One imported service as built for the wire, with its fingerprint.
pub struct Built {
    message: v1::ImportedService,
    fingerprint: u64,
}

/// Imported services built from one table, shared by every stream whose cluster gets the same
/// decision (all of them, unless the policy is local-first): a batch builds each once, not
/// once per importing cluster.
#[derive(Default)]
pub struct Cache {
    built: Mutex<(u64, BuiltByDecision)>,
}

impl Cache {
    fn get(&self, t: &RoutingTable, cluster: &str, key: &ServiceKey) -> Option<Arc<Built>> {
        let r = t.get(&key.namespace, &key.name)?;
        let region = t.regions.get(cluster).map(String::as_str);
        let d = r.decision(Some(cluster), region);
        // The decision's address within the table identifies it while that table lives.
        let id = (key.clone(), std::ptr::from_ref(d) as usize);
        let mut g = self.built.lock().expect("import cache");
        if g.0 != t.generation {
            *g = (t.generation, HashMap::new());
        }
        if let Some(b) = g.1.get(&id) {
            return Some(b.clone());
        }
        let message = import_to_wire(&r.service, d);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        message.encode_to_vec().hash(&mut h);
        let b = Arc::new(Built {
            message,
            fingerprint: h.finish(),
        });
        g.1.insert(id, b.clone());
        Some(b)
    }
}

impl SentImports {
    /// Imports only for `namespaces` from now on: the next [`SentImports::update`] with `keys`
    /// `None` sends the whole set under it.
    pub fn set_namespaces(&mut self, namespaces: HashSet<String>) {
        self.namespaces = Some(namespaces);
    }

    fn wanted(&self, k: &ServiceKey) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.contains(&k.namespace))
    }

    /// The batch's keys in the namespaces this stream imports: a lookup per namespace the
    /// cluster has (or a pass over the batch, whichever is shorter).
    fn relevant<'b>(&self, batch: &'b Batch) -> Vec<&'b ServiceKey> {
        match &self.namespaces {
            Some(ns) if ns.len() < batch.len() => {
                ns.iter().filter_map(|n| batch.get(n)).flatten().collect()
            }
            _ => batch
                .values()
                .flatten()
                .filter(|k| self.wanted(k))
                .collect(),
        }
    }

    /// The update to send after an import batch that decided `batch` again (`None`:
    /// everything, sent whole). `None` when nothing the agent holds changed.
    pub fn update(
        &mut self,
        (t, cache): (&RoutingTable, &Cache),
        cluster: &str,
        batch: Option<&Batch>,
    ) -> Option<v1::ImportsUpdate> {
        let mut out = v1::ImportsUpdate::default();
        match batch {
            Some(batch) if self.started => {
                for k in self.relevant(batch) {
                    match cache.get(t, cluster, k) {
                        Some(b) => {
                            if self.sent.insert(k.clone(), b.fingerprint) != Some(b.fingerprint) {
                                out.upsert.push(b.message.clone());
                            }
                        }
                        None => {
                            if self.sent.remove(k).is_some() {
                                out.remove.push(format!("{}/{}", k.namespace, k.name));
                            }
                        }
                    }
                }
                if out.upsert.is_empty() && out.remove.is_empty() {
                    return None;
                }
            }
            _ => {
                self.started = true;
                let mut keys: Vec<&ServiceKey> =
                    t.services.keys().filter(|k| self.wanted(k)).collect();
                keys.sort();
                self.sent.clear();
                for k in keys {
                    if let Some(b) = cache.get(t, cluster, k) {
                        self.sent.insert(k.clone(), b.fingerprint);
                        out.upsert.push(b.message.clone());
                    }
                }
                out.full = true;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::export::{Endpoint, Export, Port, Protocol, ServiceType, aggregate};
    use flotilla_core::health::Health;
    use flotilla_core::routing::{ClusterState, NetworkIndex, RoutingPolicy};
    use flotilla_core::routing_table::TableInputs;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn table(services: &[(&str, &str, bool)]) -> RoutingTable {
        let exports: Vec<Export> = services
            .iter()
            .map(|(ns, name, ready)| Export {
                cluster: "a".into(),
                namespace: (*ns).into(),
                name: (*name).into(),
                service_type: Some(ServiceType::ClusterSetIp),
                ports: vec![Port {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    app_protocol: None,
                }],
                addresses: vec!["198.18.0.1".parse().unwrap()],
                endpoints: vec![Endpoint {
                    address: "10.0.0.1".parse().unwrap(),
                    hostname: String::new(),
                    zone: String::new(),
                    ready: *ready,
                    serving: *ready,
                    terminating: false,
                }],
                ..Export::default()
            })
            .collect();
        let merged = aggregate(&exports);
        let clusters: BTreeMap<String, ClusterState> = ["a", "b"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    ClusterState {
                        name: n.to_string(),
                        health: Some(Health::Ready),
                        ..Default::default()
                    },
                )
            })
            .collect();
        RoutingTable::build(
            1,
            TableInputs {
                services: &merged,
                policies: &BTreeMap::new(),
                default_policy: &RoutingPolicy::default(),
                clusters: &clusters,
                regions: &Arc::new(BTreeMap::new()),
                loads: &BTreeMap::new(),
                networks: &Arc::new(NetworkIndex::default()),
                now_unix_ms: 0,
            },
            None,
        )
    }

    fn names(u: &v1::ImportsUpdate) -> Vec<String> {
        u.upsert
            .iter()
            .map(|i| format!("{}/{}", i.namespace, i.name))
            .collect()
    }

    #[test]
    fn only_the_namespaces_the_cluster_has_are_sent_and_changes_only_once() {
        let t = table(&[("ml", "llm", true), ("web", "front", true)]);
        let c = Cache::default();
        let mut s = SentImports::default();
        s.set_namespaces(["ml".to_string()].into());
        let u = s.update((&t, &c), "b", None).unwrap();
        assert!(u.full);
        assert_eq!(names(&u), ["ml/llm"]);
        let keys: Batch = [
            ("ml".to_string(), [ServiceKey::new("ml", "llm")].into()),
            ("web".to_string(), [ServiceKey::new("web", "front")].into()),
        ]
        .into();
        assert!(
            s.update((&t, &c), "b", Some(&keys)).is_none(),
            "nothing changed"
        );
        let t2 = table(&[("ml", "llm", false), ("web", "front", false)]);
        let u = s.update((&t2, &c), "b", Some(&keys)).unwrap();
        assert_eq!(
            names(&u),
            ["ml/llm"],
            "a change outside the namespaces is not sent"
        );
        // The namespace goes: the next whole set leaves the service out.
        s.set_namespaces(HashSet::new());
        let u = s.update((&t2, &c), "b", None).unwrap();
        assert!(u.full && u.upsert.is_empty());
        // A service that goes is removed.
        let mut all = SentImports::default();
        all.update((&t, &c), "b", None).unwrap();
        let t3 = table(&[("web", "front", true)]);
        let u = all.update((&t3, &c), "b", Some(&keys)).unwrap();
        assert_eq!(u.remove, ["ml/llm"]);
    }
}
