//! FleetView: every replica's in-memory copy of the cluster and inventory records, kept current
//! by the store mirror, so any replica answers reads and fleet watches.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use flotilla_api::convert::fleet::pool_from_wire;
use flotilla_api::v1;
use flotilla_core::gpu_metrics::{PoolGpus, pool_gpus};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::store::mirror::Subscriber;
use crate::store::records::Change;

#[derive(Default)]
struct State {
    clusters: BTreeMap<String, v1::Cluster>,
    inventory: BTreeMap<String, Held>,
}

/// An inventory as the view holds it: encoded (a fraction of the decoded size, which matters
/// at ten thousand clusters) with its totals, decoded when a read needs the nodes.
struct Held {
    encoded: Bytes,
    nodes: u32,
    physical_gpus: i64,
    free_gpus: i64,
    updated_at_unix_ms: i64,
    /// The metric rows, from the record's pool totals (no node is looked at).
    gpus: Arc<Vec<PoolGpus>>,
}

impl Held {
    fn new(encoded: Bytes, i: &v1::Inventory) -> Self {
        Self {
            gpus: Arc::new(pool_gpus(
                &i.pools.iter().map(pool_from_wire).collect::<Vec<_>>(),
            )),
            encoded,
            nodes: i.nodes.len() as u32,
            physical_gpus: i.nodes.iter().map(|n| n.physical_gpus).sum(),
            free_gpus: i.pools.iter().map(|p| p.free_gpus).sum(),
            updated_at_unix_ms: i.updated_at_unix_ms,
        }
    }
}

/// One cluster's GPU metric rows as this replica sees them.
#[derive(Debug, Clone)]
pub struct ClusterGpus {
    /// Cluster name.
    pub name: String,
    /// Health (wire enum value).
    pub health: i32,
    /// When its inventory last changed (0: never reported).
    pub updated_at_unix_ms: i64,
    /// Rows by pool and product.
    pub pools: Arc<Vec<PoolGpus>>,
}

/// A cluster record with node and GPU totals from its inventory.
fn with_totals(c: &v1::Cluster, inv: Option<&Held>) -> v1::Cluster {
    let mut c = c.clone();
    if let Some(i) = inv {
        c.nodes = i.nodes;
        c.physical_gpus = i.physical_gpus;
        c.free_gpus = i.free_gpus;
    }
    c
}

/// The fleet as this replica knows it.
pub struct FleetView {
    state: RwLock<State>,
    events: broadcast::Sender<v1::FleetEvent>,
    loaded: watch::Sender<bool>,
}

impl FleetView {
    /// An empty view; the store mirror fills it (see [`Subscriber`]).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(State::default()),
            events: broadcast::channel(1024).0,
            loaded: watch::Sender::new(false),
        })
    }

    /// Every cluster record, by name.
    pub fn clusters(&self) -> Vec<v1::Cluster> {
        self.state
            .read()
            .expect("view")
            .clusters
            .values()
            .cloned()
            .collect()
    }

    /// One cluster's GPU metric rows (per pool and product), without decoding its inventory.
    pub fn pool_rows(&self, name: &str) -> Option<Arc<Vec<PoolGpus>>> {
        let st = self.state.read().expect("view");
        st.inventory.get(name).map(|h| h.gpus.clone())
    }

    /// One cluster record.
    pub fn cluster(&self, name: &str) -> Option<v1::Cluster> {
        self.state.read().expect("view").clusters.get(name).cloned()
    }

    /// Every cluster record with its node and GPU totals filled in from its inventory,
    /// without copying inventories.
    pub fn clusters_with_totals(&self) -> Vec<v1::Cluster> {
        let st = self.state.read().expect("view");
        st.clusters
            .values()
            .map(|c| with_totals(c, st.inventory.get(&c.name)))
            .collect()
    }

    /// One cluster record with its totals.
    pub fn cluster_with_totals(&self, name: &str) -> Option<v1::Cluster> {
        let st = self.state.read().expect("view");
        st.clusters
            .get(name)
            .map(|c| with_totals(c, st.inventory.get(name)))
    }

    /// Every cluster's GPU metric rows.
    pub fn gpu_rows(&self) -> Vec<ClusterGpus> {
        let st = self.state.read().expect("view");
        st.clusters
            .values()
            .map(|c| {
                let held = st.inventory.get(&c.name);
                ClusterGpus {
                    name: c.name.clone(),
                    health: c.health,
                    updated_at_unix_ms: held.map_or(0, |h| h.updated_at_unix_ms),
                    pools: held.map(|h| h.gpus.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Every cluster's name with its inventory (decoded one at a time by the caller).
    pub fn inventory_names(&self) -> Vec<String> {
        self.state
            .read()
            .expect("view")
            .inventory
            .keys()
            .cloned()
            .collect()
    }

    /// One cluster's inventory.
    pub fn inventory(&self, name: &str) -> Option<v1::Inventory> {
        let encoded = self
            .state
            .read()
            .expect("view")
            .inventory
            .get(name)
            .map(|h| h.encoded.clone())?;
        // It decoded once already, when it arrived.
        v1::Inventory::decode(encoded).ok()
    }

    /// Fleet events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::FleetEvent> {
        self.events.subscribe()
    }

    /// Whether the first full load has happened.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Wait until the first full load.
    pub async fn loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Apply one change; fleet events go to watchers unless this is a (re)load.
    fn change(&self, st: &mut State, c: Change, notify: bool) {
        let event = match c {
            Change::Cluster {
                name,
                record: Some(c),
            } => {
                let event = match st.clusters.get(&name) {
                    None => Some(v1::fleet_event::Event::Joined((*c).clone())),
                    Some(b) if b.health != c.health => {
                        if c.health == v1::ClusterHealth::Left as i32 {
                            Some(v1::fleet_event::Event::Left((*c).clone()))
                        } else {
                            c.history
                                .first()
                                .cloned()
                                .map(v1::fleet_event::Event::Health)
                        }
                    }
                    _ => None,
                };
                st.clusters.insert(name.clone(), *c);
                event.map(|e| (name, e))
            }
            Change::Cluster { name, record: None } => {
                st.clusters.remove(&name);
                None
            }
            Change::Inventory {
                name,
                encoded: Some(encoded),
            } => match v1::Inventory::decode(encoded.clone()) {
                Ok(inventory) => {
                    st.inventory
                        .insert(name.clone(), Held::new(encoded, &inventory));
                    // Sent as an event only when someone watches.
                    (self.events.receiver_count() > 0)
                        .then_some((name, v1::fleet_event::Event::Inventory(inventory)))
                }
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "undecodable inventory record");
                    None
                }
            },
            Change::Inventory {
                name,
                encoded: None,
            } => {
                st.inventory.remove(&name);
                None
            }
            // Discovery's records; the discovery view follows them.
            Change::Export { .. }
            | Change::Policy { .. }
            | Change::Load { .. }
            | Change::Shift { .. }
            | Change::Revoked { .. }
            | Change::ApiToken { .. } => None,
        };
        if let Some((cluster, e)) = event
            && notify
        {
            let _ = self.events.send(v1::FleetEvent {
                cluster,
                event: Some(e),
            });
        }
    }
}

impl Subscriber for FleetView {
    fn reset(&self, _revision: i64, records: Vec<Change>) {
        {
            let mut st = self.state.write().expect("view");
            *st = State::default();
            for c in records {
                self.change(&mut st, c, false);
            }
        }
        self.loaded.send_replace(true);
    }

    fn apply(&self, _revision: i64, changes: Vec<Change>) {
        let mut st = self.state.write().expect("view");
        for c in changes {
            self.change(&mut st, c, true);
        }
    }
}
