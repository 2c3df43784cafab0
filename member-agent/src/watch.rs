//! Watching one cluster: kube-rs reflectors on Nodes, non-terminal Pods, and, in whichever
//! `resource.k8s.io` version the cluster serves, ResourceSlices and ResourceClaims. The
//! cluster's inventory is computed from their caches on demand.
//!
//! Each watched resource has a listing state, so a report can say whether it is complete:
//! a cache that has not listed yet (slow API server) or may not list (403, missing RBAC) is
//! not "no pods", and a cluster that serves no DRA API has nothing to list there.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flotilla_core::inventory::{self, ClusterInventory, Options};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::convert;

/// The DRA API group.
pub const DRA_GROUP: &str = "resource.k8s.io";

/// DRA versions the agent reads, most preferred first (v1 is GA from Kubernetes 1.34;
/// 1.32 serves v1beta1, 1.33 v1beta1 and v1beta2).
pub const DRA_VERSIONS: [&str; 3] = ["v1", "v1beta2", "v1beta1"];

/// Where one watched resource stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Not listed yet.
    Pending,
    /// Listed; the cache follows the cluster.
    Listed,
    /// The agent's credentials may not list it (403).
    Forbidden,
    /// The cluster does not serve it (no DRA API): nothing to list.
    NotServed,
}

/// State shared by the watch tasks.
struct Shared {
    api_ok: AtomicBool,
    events: AtomicU64,
    tx: watch::Sender<u64>,
    listing: Mutex<BTreeMap<&'static str, Listing>>,
    dra_version: OnceLock<String>,
}

impl Shared {
    fn changed(&self) {
        self.tx.send_modify(|v| *v += 1);
    }

    fn set(&self, what: &'static str, to: Listing) {
        let mut l = self.listing.lock().expect("listing lock");
        if l.insert(what, to) != Some(to) {
            drop(l);
            self.changed();
        }
    }

    fn get(&self, what: &str) -> Listing {
        let l = self.listing.lock().expect("listing lock");
        l.get(what).copied().unwrap_or(Listing::Pending)
    }

    fn api(&self, ok: bool) {
        if self.api_ok.swap(ok, Ordering::Relaxed) != ok {
            match ok {
                true => tracing::info!("cluster API reachable again"),
                false => tracing::warn!("cluster API unreachable"),
            }
            self.changed();
        }
    }
}

/// DRA caches, present once discovery found a served version.
struct DraStores {
    slices: Store<DynamicObject>,
    claims: Store<DynamicObject>,
}

/// Reflector caches of one cluster plus its API reachability.
#[derive(Clone)]
pub struct ClusterWatch {
    nodes: Store<Node>,
    pods: Store<Pod>,
    dra: Arc<OnceLock<DraStores>>,
    opts: Options,
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
}

/// What the agent watches besides the reflectors' own settings.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Node label naming pools, overriding provider detection.
    pub pool_label: Option<String>,
    /// How long after a node turned Ready its GPUs may stay unadvertised before they count
    /// as failed.
    pub not_advertised_bound: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            pool_label: None,
            not_advertised_bound: crate::DEFAULT_GPU_ADVERTISE_BOUND,
        }
    }
}

const NODES: &str = "nodes";
const PODS: &str = "pods";
const SLICES: &str = "resourceslices";
const CLAIMS: &str = "resourceclaims";

impl ClusterWatch {
    /// Start the reflectors and DRA discovery; they run until `shutdown`. A watch error
    /// marks the API unreachable until the next successful event, except a 403, which marks
    /// that one resource forbidden (watchers retry with backoff on their own).
    pub fn start(client: Client, opts: WatchOptions, shutdown: CancellationToken) -> Self {
        let (tx, changed) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            api_ok: AtomicBool::new(true),
            events: AtomicU64::new(0),
            tx,
            listing: Mutex::new(BTreeMap::new()),
            dra_version: OnceLock::new(),
        });
        let pods_cfg =
            watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let nodes = spawn::<Node>(
            Api::all(client.clone()),
            watcher::Config::default(),
            (),
            NODES,
            &shared,
            &shutdown,
        );
        let pods = spawn::<Pod>(
            Api::all(client.clone()),
            pods_cfg,
            (),
            PODS,
            &shared,
            &shutdown,
        );
        let dra = Arc::new(OnceLock::new());
        tokio::spawn(
            discover_dra(
                client.clone(),
                shared.clone(),
                dra.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("agent-dra-discovery")),
        );
        tokio::spawn(
            probe(Api::all(client), shared.clone(), shutdown.clone())
                .instrument(tracing::info_span!("agent-probe")),
        );
        Self {
            nodes,
            pods,
            dra,
            opts: Options {
                pool_label: opts.pool_label,
                now_ms: None,
                not_advertised_bound_ms: opts.not_advertised_bound.as_millis() as i64,
            },
            shared,
            changed,
        }
    }

    /// Wait until every resource has listed once (or is known forbidden or not served).
    pub async fn ready(&self) {
        let mut changes = self.changes();
        while [NODES, PODS, SLICES, CLAIMS]
            .iter()
            .any(|r| self.listing(r) == Listing::Pending)
        {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Where one watched resource stands.
    pub fn listing(&self, what: &str) -> Listing {
        self.shared.get(what)
    }

    /// Resources whose cache does not (yet) hold the cluster's objects: not listed, or
    /// forbidden. A report from these caches is incomplete.
    pub fn incomplete(&self) -> Vec<String> {
        [NODES, PODS, SLICES, CLAIMS]
            .into_iter()
            .filter(|r| matches!(self.listing(r), Listing::Pending | Listing::Forbidden))
            .map(str::to_string)
            .collect()
    }

    /// Resources the agent may not list (403).
    pub fn forbidden(&self) -> Vec<String> {
        [NODES, PODS, SLICES, CLAIMS]
            .into_iter()
            .filter(|r| self.listing(r) == Listing::Forbidden)
            .map(str::to_string)
            .collect()
    }

    /// The `resource.k8s.io` version being watched, once discovered.
    pub fn dra_version(&self) -> Option<String> {
        self.shared.dra_version.get().cloned()
    }

    /// Whether the last interaction with the API server succeeded.
    pub fn api_reachable(&self) -> bool {
        self.shared.api_ok.load(Ordering::Relaxed)
    }

    /// Watch events received so far (a metric).
    pub fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever a cache, a listing state or the reachability
    /// changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    fn node_inputs(&self) -> Vec<inventory::NodeInput> {
        self.nodes
            .state()
            .iter()
            .map(|n| convert::node(n))
            .collect()
    }

    fn opts_at(&self, now_ms: i64) -> Options {
        Options {
            now_ms: Some(now_ms),
            ..self.opts.clone()
        }
    }

    /// The cluster's networks: each node's pod ranges (`spec.podCIDRs`) and internal
    /// addresses (as /32 or /128), sorted.
    pub fn networks(&self) -> Vec<String> {
        let mut out: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for n in self.nodes.state() {
            let spec = n.spec.clone().unwrap_or_default();
            out.extend(spec.pod_cidrs.into_iter().flatten());
            out.extend(spec.pod_cidr);
            for a in n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
            {
                if a.type_ == "InternalIP"
                    && let Ok(ip) = a.address.parse::<std::net::IpAddr>()
                {
                    out.insert(format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 }));
                }
            }
        }
        out.into_iter().collect()
    }

    /// The cluster's inventory from the current caches, now.
    pub fn inventory(&self) -> ClusterInventory {
        self.inventory_at(unix_ms())
    }

    /// The inventory as of `now_ms` (unadvertised GPUs turn into failures by the clock).
    pub fn inventory_at(&self, now_ms: i64) -> ClusterInventory {
        let nodes = self.node_inputs();
        let pods: Vec<_> = self.pods.state().iter().map(|p| convert::pod(p)).collect();
        let (slices, claims) = match self.dra.get() {
            Some(d) => (
                d.slices
                    .state()
                    .iter()
                    .map(|s| convert::slice(&s.data))
                    .collect(),
                d.claims
                    .state()
                    .iter()
                    .flat_map(|c| convert::claim(&c.data))
                    .collect(),
            ),
            None => (vec![], vec![]),
        };
        inventory::compute_with(&nodes, &pods, &slices, &claims, &self.opts_at(now_ms))
    }

    /// When the inventory next changes by the clock alone (a node's start-up bound passes).
    pub fn next_deadline(&self) -> Option<Duration> {
        let now = unix_ms();
        let at = inventory::next_deadline(&self.node_inputs(), &self.opts_at(now))?;
        Some(Duration::from_millis((at - now).max(0) as u64))
    }

    /// Nodes whose Ready condition is not True.
    pub fn nodes_not_ready(&self) -> u32 {
        self.nodes
            .state()
            .iter()
            .filter(|n| !convert::node(n).ready)
            .count() as u32
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The HTTP status of a watch error from the API server, if it was one.
fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Find the DRA version the cluster serves and start its watches. A cluster that serves
/// none is asked again every few minutes (it may be upgraded under the agent).
async fn discover_dra(
    client: Client,
    shared: Arc<Shared>,
    dra: Arc<OnceLock<DraStores>>,
    shutdown: CancellationToken,
) {
    let mut retry = Duration::from_millis(500);
    loop {
        let wait = match served_dra_version(&client).await {
            Ok(Some(version)) => {
                tracing::info!(%version, "watching {DRA_GROUP}/{version}");
                let ar = |kind: &str, plural: &str| {
                    ApiResource::from_gvk_with_plural(
                        &GroupVersionKind::gvk(DRA_GROUP, &version, kind),
                        plural,
                    )
                };
                let (slices_ar, claims_ar) =
                    (ar("ResourceSlice", SLICES), ar("ResourceClaim", CLAIMS));
                let slices = spawn::<DynamicObject>(
                    Api::all_with(client.clone(), &slices_ar),
                    watcher::Config::default(),
                    slices_ar,
                    SLICES,
                    &shared,
                    &shutdown,
                );
                let claims = spawn::<DynamicObject>(
                    Api::all_with(client.clone(), &claims_ar),
                    watcher::Config::default(),
                    claims_ar,
                    CLAIMS,
                    &shared,
                    &shutdown,
                );
                let _ = shared.dra_version.set(version);
                let _ = dra.set(DraStores { slices, claims });
                shared.changed();
                return;
            }
            Ok(None) => {
                shared.set(SLICES, Listing::NotServed);
                shared.set(CLAIMS, Listing::NotServed);
                Duration::from_secs(300)
            }
            Err(e) => {
                let code = match &e {
                    kube::Error::Api(s) => Some(s.code),
                    _ => None,
                };
                if code == Some(403) {
                    shared.set(SLICES, Listing::Forbidden);
                    shared.set(CLAIMS, Listing::Forbidden);
                } else {
                    tracing::warn!(error = %e, "API discovery failed; retrying");
                    shared.api(false);
                }
                retry = (retry * 2).min(Duration::from_secs(30));
                retry
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The most preferred DRA version in the cluster's discovery document, if any.
async fn served_dra_version(client: &Client) -> Result<Option<String>, kube::Error> {
    let groups = client.list_api_groups().await?;
    let Some(g) = groups.groups.iter().find(|g| g.name == DRA_GROUP) else {
        return Ok(None);
    };
    Ok(DRA_VERSIONS
        .iter()
        .find(|v| g.versions.iter().any(|gv| gv.version == **v))
        .map(|v| v.to_string()))
}

/// While the API is marked unreachable, probe it: a resumed watch on a quiet cluster yields no
/// events, so the watches alone cannot tell that the API is back.
async fn probe(nodes: Api<Node>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if shared.api_ok.load(Ordering::Relaxed) {
            continue;
        }
        match nodes
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await
        {
            Ok(_) => shared.api(true),
            // An answer, even a refusal, is a reachable API.
            Err(kube::Error::Api(_)) => shared.api(true),
            Err(_) => {}
        }
    }
}

fn spawn<K>(
    api: Api<K>,
    cfg: watcher::Config,
    dyntype: K::DynamicType,
    what: &'static str,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    let (shared, shutdown) = (shared.clone(), shutdown.clone());
    tokio::spawn(
        async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(event)) => {
                        shared.events.fetch_add(1, Ordering::Relaxed);
                        shared.api(true);
                        match event {
                            watcher::Event::InitDone => shared.set(what, Listing::Listed),
                            // A relist after a 403 is not complete until it is done.
                            watcher::Event::Init
                                if matches!(
                                    shared.get(what),
                                    Listing::Forbidden | Listing::NotServed
                                ) =>
                            {
                                shared.set(what, Listing::Pending)
                            }
                            _ => {}
                        }
                        shared.changed();
                    }
                    Some(Err(e)) => match status_code(&e) {
                        Some(403) => {
                            tracing::warn!(error = %e, "the agent may not list {what}; grant it in the agent's RBAC");
                            shared.api(true);
                            shared.set(what, Listing::Forbidden);
                        }
                        // The API server answered: this version is no longer served (an API
                        // disabled or a downgrade). Not an outage; nothing to list until it is.
                        Some(404) => {
                            tracing::warn!(error = %e, "{what} are not served (404)");
                            shared.api(true);
                            shared.set(what, Listing::NotServed);
                        }
                        _ => {
                            tracing::warn!(error = %e, "watch failed; retrying with backoff");
                            shared.api(false);
                        }
                    },
                    None => return,
                }
            }
        }
        .instrument(tracing::info_span!("agent-watch", resource = what)),
    );
    reader
}
