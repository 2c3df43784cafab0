//! Watching one cluster: kube-rs reflectors on Nodes, non-terminal Pods, ResourceSlices and
//! ResourceClaims, and the cluster's inventory computed from their caches on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flotilla_core::inventory::{self, ClusterInventory};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::convert;

/// Reflector caches of one cluster plus its API reachability.
#[derive(Clone)]
pub struct ClusterWatch {
    nodes: Store<Node>,
    pods: Store<Pod>,
    slices: Store<ResourceSlice>,
    claims: Store<ResourceClaim>,
    pool_label: Option<String>,
    api_ok: Arc<AtomicBool>,
    events: Arc<AtomicU64>,
    changed: watch::Receiver<u64>,
}

impl ClusterWatch {
    /// Start the four reflectors; they run until `shutdown`. Each watch error marks the API
    /// unreachable until the next successful event (watchers retry with backoff on their own).
    pub fn start(client: Client, pool_label: Option<String>, shutdown: CancellationToken) -> Self {
        let api_ok = Arc::new(AtomicBool::new(true));
        let events = Arc::new(AtomicU64::new(0));
        let (tx, changed) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let pods_cfg =
            watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let nodes = spawn::<Node>(
            Api::all(client.clone()),
            watcher::Config::default(),
            "nodes",
            &api_ok,
            &events,
            &tx,
            &shutdown,
        );
        let pods = spawn::<Pod>(
            Api::all(client.clone()),
            pods_cfg,
            "pods",
            &api_ok,
            &events,
            &tx,
            &shutdown,
        );
        let slices = spawn::<ResourceSlice>(
            Api::all(client.clone()),
            watcher::Config::default(),
            "resourceslices",
            &api_ok,
            &events,
            &tx,
            &shutdown,
        );
        let claims = spawn::<ResourceClaim>(
            Api::all(client.clone()),
            watcher::Config::default(),
            "resourceclaims",
            &api_ok,
            &events,
            &tx,
            &shutdown,
        );
        tokio::spawn(
            probe(
                Api::all(client),
                api_ok.clone(),
                tx.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("agent-probe")),
        );
        Self {
            nodes,
            pods,
            slices,
            claims,
            pool_label,
            api_ok,
            events,
            changed,
        }
    }

    /// Wait until every reflector has listed once.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.claims.wait_until_ready().await
    }

    /// Whether the last watch interaction with the API server succeeded.
    pub fn api_reachable(&self) -> bool {
        self.api_ok.load(Ordering::Relaxed)
    }

    /// Watch events received so far (a metric).
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever a cache or the reachability changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// The cluster's inventory from the current caches.
    pub fn inventory(&self) -> ClusterInventory {
        let nodes: Vec<_> = self
            .nodes
            .state()
            .iter()
            .map(|n| convert::node(n))
            .collect();
        let pods: Vec<_> = self.pods.state().iter().map(|p| convert::pod(p)).collect();
        let slices: Vec<_> = self
            .slices
            .state()
            .iter()
            .map(|s| convert::slice(s))
            .collect();
        let claims: Vec<_> = self
            .claims
            .state()
            .iter()
            .flat_map(|c| convert::claim(c))
            .collect();
        inventory::compute(&nodes, &pods, &slices, &claims, self.pool_label.as_deref())
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

/// While the API is marked unreachable, probe it: a resumed watch on a quiet cluster yields no
/// events, so the watches alone cannot tell that the API is back.
async fn probe(
    nodes: Api<Node>,
    api_ok: Arc<AtomicBool>,
    tx: Arc<watch::Sender<u64>>,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if api_ok.load(Ordering::Relaxed) {
            continue;
        }
        if nodes
            .list_metadata(&kube::api::ListParams::default().limit(1))
            .await
            .is_ok()
            && !api_ok.swap(true, Ordering::Relaxed)
        {
            tracing::info!("cluster API reachable again");
            tx.send_modify(|v| *v += 1);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn<K>(
    api: Api<K>,
    cfg: watcher::Config,
    what: &'static str,
    api_ok: &Arc<AtomicBool>,
    events: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<u64>>,
    shutdown: &CancellationToken,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    let (api_ok, events, tx, shutdown) =
        (api_ok.clone(), events.clone(), tx.clone(), shutdown.clone());
    tokio::spawn(
        async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(_)) => {
                        events.fetch_add(1, Ordering::Relaxed);
                        if !api_ok.swap(true, Ordering::Relaxed) {
                            tracing::info!("watch recovered");
                        }
                        tx.send_modify(|v| *v += 1);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "watch failed; retrying with backoff");
                        if api_ok.swap(false, Ordering::Relaxed) {
                            tx.send_modify(|v| *v += 1);
                        }
                    }
                    None => return,
                }
            }
        }
        .instrument(tracing::info_span!("agent-watch", resource = what)),
    );
    reader
}
