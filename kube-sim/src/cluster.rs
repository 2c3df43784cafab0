//! One simulated cluster at run time: the handle to it and its controller loop (its shared
//! core is in `cluster_core.rs`, its HTTP listener in `server.rs`). [`SimFleet`] starts many
//! of them in one process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster_core::{ClusterCore, Tls};
use crate::faults::{ApiFaults, Fault};
use crate::resources::RESOURCES;
use crate::scenario::{ClusterSpec, Scenario};
use crate::server::serve;
use crate::sim::SimState;
use crate::store::{ApiError, DEFAULT_HISTORY};

/// How simulated clusters are served.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Address to listen on (loopback by default).
    pub host: IpAddr,
    /// First port; cluster `i` listens on `first_port + i`. 0 picks free ports.
    pub first_port: u16,
    /// Changes each cluster keeps for watches to resume from; older ones get 410.
    pub history: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Serve HTTPS with a generated certificate (kubectl only sends bearer tokens over TLS).
    pub tls: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            first_port: 0,
            history: DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(10),
            tls: true,
        }
    }
}

/// A handle to one running simulated cluster.
#[derive(Clone)]
pub struct SimCluster {
    core: Arc<ClusterCore>,
}

fn plural_index(plural: &str) -> Result<usize, ApiError> {
    RESOURCES
        .iter()
        .position(|r| r.plural == plural)
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("kube-sim does not serve {plural:?}"),
            )
        })
}

impl SimCluster {
    /// Cluster name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// Listen address.
    pub fn addr(&self) -> SocketAddr {
        self.core.addr
    }

    /// Base URL of the API server.
    pub fn url(&self) -> String {
        let scheme = if self.core.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.core.addr)
    }

    /// PEM of the CA that signed the serving certificate (None for plain HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.core.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// Bearer token.
    pub fn token(&self) -> &str {
        &self.core.token
    }

    /// A kubeconfig (YAML) for this cluster; kube-rs and kubectl take it unchanged.
    pub fn kubeconfig(&self) -> String {
        use base64::Engine;
        let n = &self.core.name;
        let ca = self.ca_pem().map_or(String::new(), |pem| {
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        });
        format!(
            "# kube-sim: a SIMULATED cluster (test double), not a real Kubernetes API server.\n\
             apiVersion: v1\nkind: Config\nclusters:\n- name: {n}\n  cluster:\n    server: {url}\n{ca}\
             users:\n- name: {n}-admin\n  user:\n    token: {token}\n\
             contexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {n}-admin\n    namespace: default\n\
             current-context: {n}\npreferences: {{}}\n",
            url = self.url(),
            token = self.core.token,
        )
    }

    /// Inject a fault.
    pub fn inject(&self, fault: &Fault) -> Result<(), ApiError> {
        match fault {
            Fault::ApiLatency { millis } => {
                self.core.api_faults.write().expect("faults").latency =
                    Some(Duration::from_millis(*millis));
            }
            Fault::ApiError {
                verb,
                resource,
                code,
            } => {
                if !(400..=599).contains(code) {
                    return Err(ApiError::bad_request(
                        "code: must be an HTTP error status 400..=599",
                    ));
                }
                self.core.api_faults.write().expect("faults").errors.push((
                    verb.clone(),
                    resource.clone(),
                    *code,
                ));
            }
            Fault::Unreachable => {
                self.core.reachable.send_replace(false);
            }
            other => self.core.write(|s| s.inject(other))?,
        }
        Ok(())
    }

    /// Undo one fault (for `gpu-failure` the count is ignored: all GPUs recover).
    pub fn clear(&self, fault: &Fault) {
        match fault {
            Fault::ApiLatency { .. } => {
                self.core.api_faults.write().expect("faults").latency = None
            }
            Fault::ApiError { verb, resource, .. } => self
                .core
                .api_faults
                .write()
                .expect("faults")
                .errors
                .retain(|(v, r, _)| v != verb || r != resource),
            Fault::Unreachable => {
                self.core.reachable.send_replace(true);
            }
            other => self.core.write(|s| s.clear(other)),
        }
    }

    /// Set vLLM-style metric values on pods (what their `/metrics` answers through the pod
    /// proxy).
    pub fn set_pod_metrics(&self, rule: crate::sim::metrics::MetricsRule) -> Result<(), ApiError> {
        self.core.write(|s| s.set_metrics(rule))
    }

    /// Forget every metric value set.
    pub fn clear_pod_metrics(&self) {
        self.core.write(|s| s.clear_metrics());
    }

    /// Undo every fault.
    pub fn clear_all(&self) {
        *self.core.api_faults.write().expect("faults") = ApiFaults::default();
        self.core.reachable.send_replace(true);
        self.core.write(|s| s.clear_all());
    }

    /// One object by plural resource name (`nodes`, `pods`, ...).
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Result<Value, ApiError> {
        let res = plural_index(plural)?;
        self.core
            .read(|s| s.store.get(res, ns, name).map(|o| (*o).clone()))
    }

    /// All objects of a type (optionally in one namespace).
    pub fn list(&self, plural: &str, ns: Option<&str>) -> Result<Vec<Value>, ApiError> {
        let res = plural_index(plural)?;
        Ok(self
            .core
            .read(|s| s.store.iter(res, ns, None).map(|o| (**o).clone()).collect()))
    }

    /// Create an object as a client would (with API-server defaulting).
    pub fn create(&self, plural: &str, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let res = plural_index(plural)?;
        self.core
            .write(|s| s.create(res, ns, obj).map(|o| (*o).clone()))
    }

    /// The cluster's current `resourceVersion`.
    pub fn revision(&self) -> u64 {
        self.core.read(|s| s.store.revision())
    }

    /// Forget the watch history so that every resume gets 410 Gone (as after etcd compaction).
    pub fn compact(&self) {
        self.core.write(|s| s.store.compact());
    }

    /// Direct access to the state, for tests that need more than the helpers.
    pub fn with_state<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        self.core.write(f)
    }
}

/// Many simulated clusters served from one process.
pub struct SimFleet {
    clusters: Vec<SimCluster>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimFleet {
    /// Start every cluster of the scenario. Clusters are ready to serve when this returns.
    pub async fn start(scenario: &Scenario, opts: SimOptions) -> std::io::Result<Self> {
        let shutdown = CancellationToken::new();
        let tls = if opts.tls {
            Some(Arc::new(Tls::generate(opts.host)?))
        } else {
            None
        };
        let mut fleet = Self {
            clusters: Vec::new(),
            shutdown: shutdown.clone(),
            tasks: Vec::new(),
        };
        for (i, spec) in scenario.clusters.iter().enumerate() {
            let port = if opts.first_port == 0 {
                0
            } else {
                opts.first_port + i as u16
            };
            let listener = TcpListener::bind(SocketAddr::new(opts.host, port)).await?;
            let addr = listener.local_addr()?;
            let core = Arc::new(ClusterCore {
                name: spec.name.clone(),
                token: format!("sim-{}", uuid::Uuid::new_v4().simple()),
                shutdown: shutdown.child_token(),
                bookmark_interval: opts.bookmark_interval,
                addr,
                version: spec.kubernetes_version.clone(),
                tls: tls.clone(),
                state: Mutex::new(new_state(spec, i as u32, opts.history)),
                api_faults: RwLock::new(ApiFaults::default()),
                changed: Notify::new(),
                reachable: watch::Sender::new(true),
                rbac_deny: spec.rbac_deny.clone(),
                mcs_versions: spec.mcs_versions.clone(),
            });
            let span = tracing::info_span!("kube-sim", cluster = %spec.name);
            fleet.tasks.push(tokio::spawn(
                serve(core.clone(), listener).instrument(span.clone()),
            ));
            fleet
                .tasks
                .push(tokio::spawn(controllers(core.clone()).instrument(span)));
            fleet.clusters.push(SimCluster { core });
        }
        Ok(fleet)
    }

    /// Every cluster, in scenario order.
    pub fn clusters(&self) -> &[SimCluster] {
        &self.clusters
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&SimCluster> {
        self.clusters.iter().find(|c| c.name() == name)
    }

    /// Write `<dir>/<cluster>.kubeconfig` for every cluster; returns the paths.
    pub fn write_kubeconfigs(
        &self,
        dir: &std::path::Path,
    ) -> std::io::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut out = Vec::new();
        for c in &self.clusters {
            let p = dir.join(format!("{}.kubeconfig", c.name()));
            std::fs::write(&p, c.kubeconfig())?;
            out.push(p);
        }
        Ok(out)
    }

    /// Stop serving and wait for every task.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn new_state(spec: &ClusterSpec, index: u32, history: usize) -> SimState {
    SimState::new(spec.clone(), index, history)
}

async fn controllers(core: Arc<ClusterCore>) {
    loop {
        let next = {
            let mut s = core.state.lock().expect("cluster state poisoned");
            s.reconcile(Instant::now())
        };
        let wait = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = core.changed.notified() => {}
            _ = wait => {}
        }
    }
}
