//! FleetView: every replica's in-memory copy of the cluster and inventory records, kept current
//! from the store's watch, so any replica answers reads and fleet watches.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_api::v1;
use flotilla_core::kv::{
    EventKind, KeyRange, KvBackend, KvError, Op, OpResult, RangeRequest, TxnRequest, WatchRequest,
};
use futures::StreamExt;
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::records::{CLUSTERS, INVENTORY};

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
}

impl Held {
    fn new(encoded: Bytes, i: &v1::Inventory) -> Self {
        Self {
            encoded,
            nodes: i.nodes.len() as u32,
            physical_gpus: i.nodes.iter().map(|n| n.physical_gpus).sum(),
            free_gpus: i.pools.iter().map(|p| p.free_gpus).sum(),
        }
    }
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
    /// An empty view; [`FleetView::run`] fills it.
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

    fn apply(&self, key: &[u8], value: Option<&[u8]>) {
        let key = String::from_utf8_lossy(key);
        let mut st = self.state.write().expect("view");
        if let Some(name) = key.strip_prefix(CLUSTERS) {
            let before = st.clusters.get(name).cloned();
            match value.map(v1::Cluster::decode) {
                Some(Ok(c)) => {
                    let event = match &before {
                        None => Some(v1::fleet_event::Event::Joined(c.clone())),
                        Some(b) if b.health != c.health => {
                            if c.health == v1::ClusterHealth::Left as i32 {
                                Some(v1::fleet_event::Event::Left(c.clone()))
                            } else {
                                c.history
                                    .first()
                                    .cloned()
                                    .map(v1::fleet_event::Event::Health)
                            }
                        }
                        _ => None,
                    };
                    st.clusters.insert(name.to_string(), c);
                    if let Some(e) = event {
                        let _ = self.events.send(v1::FleetEvent {
                            cluster: name.to_string(),
                            event: Some(e),
                        });
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(key = %key, error = %e, "undecodable cluster record")
                }
                None => {
                    st.clusters.remove(name);
                }
            }
        } else if let Some(name) = key.strip_prefix(INVENTORY) {
            match value.map(|v| (v, v1::Inventory::decode(v))) {
                Some((v, Ok(i))) => {
                    st.inventory
                        .insert(name.to_string(), Held::new(Bytes::copy_from_slice(v), &i));
                    if self.events.receiver_count() > 0 {
                        let e = v1::fleet_event::Event::Inventory(i);
                        let _ = self.events.send(v1::FleetEvent {
                            cluster: name.to_string(),
                            event: Some(e),
                        });
                    }
                }
                Some((_, Err(e))) => {
                    tracing::warn!(key = %key, error = %e, "undecodable inventory record")
                }
                None => {
                    st.inventory.remove(name);
                }
            }
        }
    }

    /// Load both prefixes at one revision, then follow the watch. Restarts on errors.
    pub async fn run<B: KvBackend + Clone>(
        self: Arc<Self>,
        backend: B,
        shutdown: CancellationToken,
    ) {
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.clone().follow(&backend) => r,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "fleet view lost the store watch; reloading");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn follow<B: KvBackend>(self: Arc<Self>, b: &B) -> Result<(), KvError> {
        let load = b
            .txn(TxnRequest {
                compare: vec![],
                success: vec![
                    Op::Range(RangeRequest::new(KeyRange::prefix(CLUSTERS))),
                    Op::Range(RangeRequest::new(KeyRange::prefix(INVENTORY))),
                ],
                failure: vec![],
            })
            .await?;
        {
            let mut st = self.state.write().expect("view");
            st.clusters.clear();
            st.inventory.clear();
        }
        for r in &load.results {
            if let OpResult::Range(r) = r {
                for kv in &r.kvs {
                    self.apply(&kv.key, Some(&kv.value));
                }
            }
        }
        self.loaded.send_replace(true);
        let from = load.revision + 1;
        let watch = |p: &str| WatchRequest {
            range: KeyRange::prefix(p),
            start_revision: from,
            prev_kv: false,
        };
        let mut a = b.watch(watch(CLUSTERS)).await?;
        let mut i = b.watch(watch(INVENTORY)).await?;
        loop {
            let batch = tokio::select! {
                x = a.next() => x,
                x = i.next() => x,
            };
            let Some(batch) = batch else {
                return Err(KvError::Unavailable("watch ended".into()));
            };
            for e in batch?.events {
                match e.kind {
                    EventKind::Put => self.apply(&e.kv.key, Some(&e.kv.value)),
                    EventKind::Delete => self.apply(&e.kv.key, None),
                }
            }
        }
    }
}
