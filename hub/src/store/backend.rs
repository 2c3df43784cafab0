//! The one seam between the hub and its store (decision 0011): everything above it programs
//! against [`KvBackend`] and [`Leadership`], and [`HubStore`] says which store it is.

use flotilla_core::kv::{
    KvBackend, KvError, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult, WatchRequest,
    WatchStream,
};
use flotilla_raft_store::StoreNode;

use crate::controllers::Leadership;

/// The store this hub replica runs on. Cheap to clone.
#[derive(Clone)]
pub enum HubStore {
    /// A member of the embedded Raft store (leadership is Raft's).
    Raft(StoreNode),
    /// An external etcd (leadership by an etcd election).
    #[cfg(feature = "etcd")]
    Etcd(Box<super::etcd::EtcdKv>, super::etcd::EtcdLeadership),
}

impl HubStore {
    /// The Raft member, on the Raft backend.
    pub fn raft(&self) -> Option<&StoreNode> {
        match self {
            HubStore::Raft(n) => Some(n),
            #[cfg(feature = "etcd")]
            HubStore::Etcd(..) => None,
        }
    }

    /// `raft` or `etcd`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HubStore::Raft(_) => "raft",
            #[cfg(feature = "etcd")]
            HubStore::Etcd(..) => "etcd",
        }
    }

    /// Whether some replica is known to lead (readiness).
    pub fn leader_known(&self) -> bool {
        match self {
            HubStore::Raft(n) => n.leader().is_some(),
            #[cfg(feature = "etcd")]
            HubStore::Etcd(_, l) => l.leader_known(),
        }
    }

    /// The leadership's term: Raft's term, or the etcd leader key's create revision.
    pub fn term(&self) -> u64 {
        match self {
            HubStore::Raft(n) => n.status().term,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(_, l) => l.term().max(0) as u64,
        }
    }

    /// Waits for Raft to release the data directory (nothing to wait for on etcd).
    pub async fn shutdown(&self) -> Result<(), flotilla_raft_store::StoreError> {
        match self {
            HubStore::Raft(n) => n.shutdown_raft().await,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(..) => Ok(()),
        }
    }
}

impl Leadership for HubStore {
    fn is_leader(&self) -> bool {
        match self {
            HubStore::Raft(n) => n.is_leader(),
            #[cfg(feature = "etcd")]
            HubStore::Etcd(_, l) => l.is_leader(),
        }
    }

    fn leader_addr(&self) -> Option<String> {
        match self {
            HubStore::Raft(n) => n.leader_addr(),
            #[cfg(feature = "etcd")]
            HubStore::Etcd(_, l) => l.leader_addr(),
        }
    }
}

impl KvBackend for HubStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        match self {
            HubStore::Raft(n) => n.range(req).await,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(e, _) => e.range(req).await,
        }
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        match self {
            HubStore::Raft(n) => n.txn(req).await,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(e, _) => e.txn(req).await,
        }
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        match self {
            HubStore::Raft(n) => n.watch(req).await,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(e, _) => e.watch(req).await,
        }
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        match self {
            HubStore::Raft(n) => n.compact(revision).await,
            #[cfg(feature = "etcd")]
            HubStore::Etcd(e, _) => e.compact(revision).await,
        }
    }
}
