//! Global service discovery on the hub: every replica follows the exports and policies in the
//! store (through the mirror), merges exports into services by the MCS rules, and keeps a
//! routing table that DNS and `Resolve` read without locks. Decisions are `flotilla_core`'s
//! (`export::aggregate`, `routing::decide`); this module only feeds them and publishes.
//!
//! - `exports`: what an agent stream writes for its cluster's ServiceExports.
//! - `imports`: what an agent stream sends its cluster to import.
//! - `loads`: inference load samples (leader soft state) and the verdicts written from them.
//! - `service`: the `DiscoveryService` gRPC API.

pub mod exports;
pub mod imports;
pub mod loads;
pub mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_api::convert::fleet::health_from_wire;
use flotilla_api::v1;
use flotilla_core::export::{Export, Service, ServiceKey, aggregate};
use flotilla_core::routing::{Cidr, ClusterState, NetworkIndex, PoolGpus, RoutingPolicy};
use flotilla_core::routing_table::{RoutingTable, TableInputs};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::fleet::view::FleetView;
use crate::store::mirror::Subscriber;
use crate::store::records::Change;

/// The routing table every DNS query and `Resolve` reads.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// How long the table builder waits after a change for more changes to batch with it.
pub const COALESCE: Duration = Duration::from_millis(10);

/// How long import changes gather before the agent streams hear of them. Every importing
/// stream wakes once per batch, not once per build: with 10,000 streams and a build every
/// 10 ms, per-build wakes cost the hub more than a core.
pub const IMPORT_BATCH: Duration = Duration::from_secs(1);

/// Services decided again over one import batch, by namespace (a stream looks up only the
/// namespaces its cluster has); `None`: the batcher fell behind, resend all.
pub type ImportsChanged = Option<Arc<imports::Batch>>;

#[derive(Default)]
struct State {
    /// Exports by service, then cluster.
    exports: BTreeMap<ServiceKey, BTreeMap<String, Export>>,
    /// Merged services (valid exports only).
    services: BTreeMap<ServiceKey, Service>,
    /// Per-service policies.
    policies: BTreeMap<ServiceKey, RoutingPolicy>,
    /// The stored JSON of each policy, for reads.
    policy_json: BTreeMap<ServiceKey, String>,
    /// The fleet default.
    default_policy: RoutingPolicy,
    default_json: String,
    /// Services each cluster exports (to re-decide them when the cluster changes).
    by_cluster: BTreeMap<String, BTreeSet<ServiceKey>>,
    /// Services to merge and decide again.
    dirty: BTreeSet<ServiceKey>,
    /// Clusters whose health, labels or GPUs changed.
    dirty_clusters: BTreeSet<String>,
    /// Every member cluster as routing reads it (GPU pools are read at build time), kept
    /// from the cluster records the mirror delivers: a build copies no record from the view.
    clusters: BTreeMap<String, ClusterState>,
    /// Every member cluster's region.
    regions: Arc<BTreeMap<String, String>>,
    /// Decide everything again (a reload, or the default policy changed).
    dirty_all: bool,
    /// Every cluster's reported networks, to locate clients (source address or ECS).
    networks: BTreeMap<String, Vec<Cidr>>,
    /// The networks changed since the last build.
    networks_dirty: bool,
    /// The index of `networks` the table holds (rebuilt only when they change).
    network_index: Arc<NetworkIndex>,
    /// Stored inference loads, by service then cluster.
    loads: BTreeMap<ServiceKey, BTreeMap<String, v1::InferenceLoadRecord>>,
    /// Clusters an upgrade campaign took out of routing, with the campaign's id.
    shifts: BTreeMap<String, String>,
}

impl State {
    fn uses_gpu_saturation(&self) -> bool {
        let gpu = |p: &RoutingPolicy| {
            p.saturation
                .as_ref()
                .is_some_and(|s| s.min_free_gpu_percent.is_some())
        };
        gpu(&self.default_policy) || self.policies.values().any(gpu)
    }

    fn set_export(&mut self, cluster: &str, key: ServiceKey, e: Option<Export>) {
        match e {
            Some(e) => {
                self.exports
                    .entry(key.clone())
                    .or_default()
                    .insert(cluster.to_string(), e);
                self.by_cluster
                    .entry(cluster.to_string())
                    .or_default()
                    .insert(key.clone());
            }
            None => {
                if let Some(m) = self.exports.get_mut(&key) {
                    m.remove(cluster);
                    if m.is_empty() {
                        self.exports.remove(&key);
                    }
                }
                if let Some(s) = self.by_cluster.get_mut(cluster) {
                    s.remove(&key);
                    if s.is_empty() {
                        self.by_cluster.remove(cluster);
                    }
                }
            }
        }
        self.dirty.insert(key);
    }

    fn set_policy(&mut self, namespace: &str, name: &str, rec: Option<v1::RoutingPolicyRecord>) {
        let parsed = rec.as_ref().and_then(|r| match serde_json::from_str::<RoutingPolicy>(&r.spec_json) {
            Ok(p) => Some((p, r.spec_json.clone())),
            Err(e) => {
                tracing::warn!(namespace, name, error = %e, "skipping an unreadable routing policy");
                None
            }
        });
        if namespace.is_empty() && name.is_empty() {
            let (p, j) = parsed.unwrap_or_default();
            self.default_policy = p;
            self.default_json = j;
            self.dirty_all = true;
            return;
        }
        let key = ServiceKey::new(namespace, name);
        match parsed {
            Some((p, j)) => {
                self.policies.insert(key.clone(), p);
                self.policy_json.insert(key.clone(), j);
            }
            None => {
                self.policies.remove(&key);
                self.policy_json.remove(&key);
            }
        }
        self.dirty.insert(key);
    }

    fn change(&mut self, c: Change) {
        match c {
            Change::Export {
                cluster,
                namespace,
                name,
                record,
            } => self.set_export(
                &cluster,
                ServiceKey::new(namespace, name),
                record.map(|b| *b),
            ),
            Change::Policy {
                namespace,
                name,
                record,
            } => self.set_policy(&namespace, &name, record),
            Change::Load {
                cluster,
                namespace,
                name,
                record,
            } => {
                let key = ServiceKey::new(namespace, name);
                match record {
                    Some(r) => {
                        self.loads
                            .entry(key.clone())
                            .or_default()
                            .insert(cluster, r);
                    }
                    None => {
                        if let Some(m) = self.loads.get_mut(&key) {
                            m.remove(&cluster);
                            if m.is_empty() {
                                self.loads.remove(&key);
                            }
                        }
                    }
                }
                self.dirty.insert(key);
            }
            Change::Cluster { name, record } => {
                match record {
                    Some(c) => {
                        let state = ClusterState {
                            name: c.name.clone(),
                            health: health_from_wire(c.health),
                            region: c.region.clone(),
                            labels: c.labels.clone().into_iter().collect(),
                            inventory_incomplete: !c.inventory_incomplete.is_empty(),
                            pools: BTreeMap::new(),
                            shifted: self.shifts.get(&name).cloned(),
                        };
                        let nets: Vec<Cidr> =
                            c.networks.iter().filter_map(|n| n.parse().ok()).collect();
                        if self.networks.get(&name) != Some(&nets) {
                            self.networks.insert(name.clone(), nets);
                            self.networks_dirty = true;
                        }
                        if self.regions.get(&name) != Some(&c.region) {
                            Arc::make_mut(&mut self.regions).insert(name.clone(), c.region.clone());
                        }
                        // Heartbeats do not change the record; a transition or a rejoin does.
                        if self.clusters.get(&name) == Some(&state) {
                            return;
                        }
                        self.clusters.insert(name.clone(), state);
                    }
                    None => {
                        self.networks_dirty |= self.networks.remove(&name).is_some();
                        self.clusters.remove(&name);
                        Arc::make_mut(&mut self.regions).remove(&name);
                    }
                }
                if self.by_cluster.contains_key(&name) {
                    self.dirty_clusters.insert(name);
                }
            }
            Change::Shift { cluster, campaign } => {
                match &campaign {
                    Some(id) => self.shifts.insert(cluster.clone(), id.clone()),
                    None => self.shifts.remove(&cluster),
                };
                if let Some(state) = self.clusters.get_mut(&cluster)
                    && state.shifted != campaign
                {
                    state.shifted = campaign;
                    if self.by_cluster.contains_key(&cluster) {
                        self.dirty_clusters.insert(cluster);
                    }
                }
            }
            Change::Revoked { .. } | Change::ApiToken { .. } => {}
            // GPU pools matter only to a policy that judges GPU saturation.
            Change::Inventory { name, .. } => {
                if self.by_cluster.contains_key(&name) && self.uses_gpu_saturation() {
                    self.dirty_clusters.insert(name);
                }
            }
        }
    }
}

/// Routes changed in one table build: the keys, for `WatchRoutes`.
#[derive(Debug, Clone)]
pub struct RoutesChanged {
    /// The table generation.
    pub generation: u64,
    /// Services decided again (removed ones are gone from the table).
    pub keys: Arc<Vec<ServiceKey>>,
}

/// This replica's discovery state and routing table.
pub struct Discovery {
    state: Mutex<State>,
    view: Arc<FleetView>,
    table: SharedTable,
    notify: Notify,
    generation: AtomicU64,
    /// The generation of the last build.
    built: watch::Sender<u64>,
    /// Per cluster: bumped when a build changed a service it exports (its agent stream then
    /// sends the export status), so a build wakes only the streams it concerns.
    status: Mutex<BTreeMap<String, watch::Sender<u64>>>,
    changes: broadcast::Sender<RoutesChanged>,
    imports: broadcast::Sender<ImportsChanged>,
    /// Imported services built for the agent streams, shared between them.
    pub import_cache: imports::Cache,
    /// Inference load samples from the agents connected here (the leader's soft state).
    pub samples: loads::Samples,
}

impl Discovery {
    /// Empty discovery over `view` (which must subscribe to the mirror before this does, so
    /// cluster records are current when a build reads them).
    pub fn new(view: Arc<FleetView>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            view,
            table: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            notify: Notify::new(),
            generation: AtomicU64::new(0),
            built: watch::Sender::new(0),
            status: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(1024).0,
            imports: broadcast::channel(64).0,
            import_cache: imports::Cache::default(),
            samples: loads::Samples::default(),
        })
    }

    /// The routing table, for DNS and `Resolve`.
    pub fn table(&self) -> SharedTable {
        self.table.clone()
    }

    /// Follow table builds (the generation).
    pub fn builds(&self) -> watch::Receiver<u64> {
        self.built.subscribe()
    }

    /// Follow builds that changed a service `cluster` exports (or exported).
    pub fn status_changes(&self, cluster: &str) -> watch::Receiver<u64> {
        let mut m = self.status.lock().expect("status");
        m.entry(cluster.to_string())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Follow which services each build decided again.
    pub fn route_changes(&self) -> broadcast::Receiver<RoutesChanged> {
        self.changes.subscribe()
    }

    /// Follow which services changed, in batches of [`IMPORT_BATCH`] (for imports).
    pub fn import_changes(&self) -> broadcast::Receiver<ImportsChanged> {
        self.imports.subscribe()
    }

    /// Gathers route changes into one import batch per [`IMPORT_BATCH`] until `shutdown`.
    pub async fn batch_imports(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.route_changes();
        loop {
            let mut keys: imports::Batch = BTreeMap::new();
            let mut all = false;
            // The first change of a batch, then whatever else arrives within the batch.
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.recv() => r,
            };
            let deadline = tokio::time::Instant::now() + IMPORT_BATCH;
            let mut next = Some(first);
            loop {
                match next.take() {
                    Some(Ok(c)) => {
                        for k in c.keys.iter() {
                            keys.entry(k.namespace.clone())
                                .or_default()
                                .insert(k.clone());
                        }
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => all = true,
                    Some(Err(broadcast::error::RecvError::Closed)) => return,
                    None => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    r = changes.recv() => next = Some(r),
                }
            }
            let batch = (!all).then(|| Arc::new(keys));
            let _ = self.imports.send(batch);
        }
    }

    /// One merged service with its policy JSON and whether it is the service's own.
    pub fn service(&self, key: &ServiceKey) -> Option<(Service, String, bool)> {
        let st = self.state.lock().expect("discovery");
        let s = st.services.get(key)?.clone();
        let (json, own) = match st.policy_json.get(key) {
            Some(j) => (j.clone(), true),
            None => (st.default_json.clone(), false),
        };
        Some((s, json, own))
    }

    /// Every merged service (optionally of one namespace).
    pub fn services(&self, namespace: Option<&str>) -> Vec<ServiceKey> {
        let st = self.state.lock().expect("discovery");
        st.services
            .keys()
            .filter(|k| namespace.is_none_or(|n| k.namespace == n))
            .cloned()
            .collect()
    }

    /// The stored policy JSON for a key (empty key: the default), if one is set.
    pub fn policy_json(&self, namespace: &str, name: &str) -> Option<String> {
        let st = self.state.lock().expect("discovery");
        match namespace.is_empty() && name.is_empty() {
            true => Some(st.default_json.clone()).filter(|j| !j.is_empty()),
            false => st
                .policy_json
                .get(&ServiceKey::new(namespace, name))
                .cloned(),
        }
    }

    /// The MCS status each of `cluster`'s valid exports should carry.
    pub fn statuses_for(&self, cluster: &str) -> Vec<v1::ExportStatus> {
        let st = self.state.lock().expect("discovery");
        let Some(keys) = st.by_cluster.get(cluster) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| {
                let s = st.services.get(k)?.status.get(cluster)?;
                Some(flotilla_api::convert::discovery::status_to_wire(
                    &k.namespace,
                    &k.name,
                    s,
                ))
            })
            .collect()
    }

    /// Rebuild the table after changes, batching those within [`COALESCE`], until `shutdown`.
    /// A table with a saturation policy is decided again every second too (samples go stale).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.notify.notified() => {}
                _ = tick.tick() => {
                    let mut st = self.state.lock().expect("discovery");
                    let stale: Vec<ServiceKey> = st
                        .services
                        .keys()
                        .filter(|k| st.policies.get(*k).unwrap_or(&st.default_policy).saturation.is_some())
                        .cloned()
                        .collect();
                    if stale.is_empty() {
                        continue;
                    }
                    st.dirty.extend(stale);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(COALESCE) => {}
            }
            self.build();
        }
    }

    /// Merge and decide what changed, and publish a new table. Synchronous and short.
    pub fn build(&self) {
        let mut st = self.state.lock().expect("discovery");
        let dirty_clusters = std::mem::take(&mut st.dirty_clusters);
        let mut dirty = std::mem::take(&mut st.dirty);
        for c in &dirty_clusters {
            if let Some(keys) = st.by_cluster.get(c) {
                dirty.extend(keys.iter().cloned());
            }
        }
        let all = std::mem::take(&mut st.dirty_all);
        if all {
            dirty.extend(st.services.keys().cloned());
            dirty.extend(st.exports.keys().cloned());
        }
        let networks_changed = std::mem::take(&mut st.networks_dirty);
        if dirty.is_empty() && !networks_changed {
            return;
        }
        // Clusters whose export status may change: those exporting a changed service before
        // or after this build.
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for k in &dirty {
            if let Some(old) = st.services.get(k) {
                touched.extend(old.status.keys().cloned());
            }
            if let Some(m) = st.exports.get(k) {
                touched.extend(m.keys().cloned());
            }
        }
        for k in &dirty {
            let merged = st
                .exports
                .get(k)
                .and_then(|m| aggregate(m.values()).remove(k));
            match merged {
                Some(s) => st.services.insert(k.clone(), s),
                None => st.services.remove(k),
            };
        }
        // Only the clusters these services read: a build after one endpoint change does not
        // copy ten thousand cluster records.
        let exporters: BTreeSet<&str> = dirty
            .iter()
            .filter_map(|k| st.exports.get(k))
            .flat_map(|m| m.keys().map(String::as_str))
            .collect();
        let with_pools = st.uses_gpu_saturation();
        let clusters: BTreeMap<String, ClusterState> = exporters
            .iter()
            .filter_map(|n| {
                let mut c = st.clusters.get(*n)?.clone();
                if with_pools {
                    c.pools = self.pools(n);
                }
                Some((n.to_string(), c))
            })
            .collect();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_unix_ms();
        let table_loads = loads::table_loads(&st.loads, now);
        if networks_changed {
            st.network_index = Arc::new(NetworkIndex::new(
                st.networks
                    .iter()
                    .flat_map(|(c, nets)| nets.iter().map(move |n| (n, c.as_str()))),
            ));
        }
        let networks = st.network_index.clone();
        let inputs = TableInputs {
            services: &st.services,
            policies: &st.policies,
            default_policy: &st.default_policy,
            clusters: &clusters,
            regions: &st.regions,
            loads: &table_loads,
            networks: &networks,
            now_unix_ms: now,
        };
        let next = self.table.load().update(generation, inputs, &dirty);
        drop(st);
        self.table.store(Arc::new(next));
        self.built.send_replace(generation);
        {
            let mut m = self.status.lock().expect("status");
            // Streams that went away leave senders without receivers: drop them.
            m.retain(|_, tx| tx.receiver_count() > 0);
            for c in &touched {
                if let Some(tx) = m.get(c) {
                    tx.send_replace(generation);
                }
            }
        }
        let _ = self.changes.send(RoutesChanged {
            generation,
            keys: Arc::new(dirty.into_iter().collect()),
        });
    }

    /// A cluster's GPU pools (idle and allocatable), from the view's precomputed rows.
    fn pools(&self, name: &str) -> BTreeMap<String, PoolGpus> {
        let mut out: BTreeMap<String, PoolGpus> = BTreeMap::new();
        for row in self.view.pool_rows(name).iter().flat_map(|r| r.iter()) {
            let p = out.entry(row.pool.clone()).or_default();
            p.idle += row.idle;
            p.allocatable += row.allocatable;
        }
        out
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Subscriber for Discovery {
    fn reset(&self, _revision: i64, records: Vec<Change>) {
        {
            let mut st = self.state.lock().expect("discovery");
            let services = std::mem::take(&mut st.services);
            *st = State::default();
            for c in records {
                st.change(c);
            }
            // Services that are gone after the reload must leave the table too.
            st.dirty.extend(services.into_keys());
            st.dirty_all = true;
        }
        self.notify.notify_one();
    }

    fn apply(&self, _revision: i64, changes: Vec<Change>) {
        {
            let mut st = self.state.lock().expect("discovery");
            for c in changes {
                st.change(c);
            }
        }
        self.notify.notify_one();
    }
}
