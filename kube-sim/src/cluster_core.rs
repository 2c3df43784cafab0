//! The shared core of one simulated cluster: its state behind a lock, its API faults, the
//! serving certificate, and the switch that takes its listener away. The HTTP side
//! (`server.rs`) and the run-time handles (`cluster.rs`) both build on it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::faults::ApiFaults;
use crate::sim::SimState;

/// Shared core of one cluster (state, faults, listener control).
pub struct ClusterCore {
    /// Cluster name.
    pub name: String,
    /// Bearer token the API requires.
    pub token: String,
    /// Ends watches and the listener.
    pub shutdown: CancellationToken,
    /// Bookmark period for watches.
    pub bookmark_interval: Duration,
    pub(crate) addr: SocketAddr,
    pub(crate) version: String,
    pub(crate) tls: Option<Arc<Tls>>,
    pub(crate) state: Mutex<SimState>,
    pub(crate) api_faults: RwLock<ApiFaults>,
    pub(crate) changed: Notify,
    pub(crate) reachable: watch::Sender<bool>,
    /// Plural resources the token may not access (403), from the scenario's `rbac_deny`.
    pub(crate) rbac_deny: Vec<String>,
    /// MCS versions served (empty: v1beta1 and v1alpha1), from the scenario's `mcs_versions`.
    pub(crate) mcs_versions: Vec<String>,
}

impl ClusterCore {
    /// Read the state under the lock.
    pub fn read<T>(&self, f: impl FnOnce(&SimState) -> T) -> T {
        f(&self.state.lock().expect("cluster state poisoned"))
    }

    /// Change the state under the lock and wake the controllers.
    pub fn write<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        let out = f(&mut self.state.lock().expect("cluster state poisoned"));
        self.changed.notify_one();
        out
    }

    /// A copy of the API faults in force.
    pub fn api_faults(&self) -> ApiFaults {
        self.api_faults.read().expect("faults poisoned").clone()
    }

    /// The `resource.k8s.io` versions this cluster's Kubernetes version serves.
    pub fn dra_versions(&self) -> &'static [&'static str] {
        crate::versions::dra_versions(&self.version)
    }

    /// The MCS versions this cluster's CRDs serve.
    pub fn mcs_versions(&self) -> Vec<&'static str> {
        crate::versions::mcs_versions(&self.mcs_versions)
    }

    /// The served versions of a multi-version group.
    pub fn versions_of(&self, group: &str) -> Vec<&'static str> {
        match group {
            crate::versions::MCS_GROUP => self.mcs_versions(),
            _ => self.dra_versions().to_vec(),
        }
    }

    /// `host:port` the cluster listens on.
    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// The `/version` document.
    pub fn version_info(&self) -> Value {
        let v = self.version.trim_start_matches('v');
        let mut parts = v.split('.');
        json!({
            "major": parts.next().unwrap_or("1"),
            "minor": parts.next().unwrap_or("0"),
            "gitVersion": self.version,
            "gitCommit": "kube-sim",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "n/a (kube-sim, a simulated API server)",
            "compiler": "rustc",
            "platform": "linux/amd64",
        })
    }
}

/// The serving certificate shared by a fleet's API servers.
pub struct Tls {
    pub(crate) ca_pem: String,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl Tls {
    /// A self-signed certificate for `host`, `localhost` and 127.0.0.1.
    pub(crate) fn generate(host: IpAddr) -> std::io::Result<Self> {
        let io = |e: &dyn std::fmt::Display| std::io::Error::other(format!("TLS set-up: {e}"));
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        if !host.is_unspecified() {
            names.push(host.to_string());
        }
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| io(&e))?;
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .map_err(|e| io(&e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| io(&e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| io(&e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: ck.cert.pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }
}
