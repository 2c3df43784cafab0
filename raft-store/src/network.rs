//! The Raft transport's client side (gRPC, postcard payloads) and fault injection for tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use flotilla_api::v1::{RaftMessage, raft_client::RaftClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::transport::Transport;
use crate::types::{Node, NodeId, TypeConfig};

/// Simulated network faults between in-process nodes (tests only; empty in production).
///
/// A blocked link drops messages in that direction: a request is not delivered, or its reply
/// is lost after the receiver acted on it, as on a real network.
#[derive(Debug, Default)]
pub struct Faults {
    blocked: Mutex<HashSet<(NodeId, NodeId)>>,
    delay: Mutex<Duration>,
}

impl Faults {
    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut g = self.blocked.lock().expect("faults lock");
        for &x in a {
            for &y in b {
                g.insert((x, y));
                g.insert((y, x));
            }
        }
    }

    /// Cuts `node` off from every node in `others`.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        self.partition(&[node], others);
    }

    /// Restores every link and removes delay.
    pub fn heal(&self) {
        self.blocked.lock().expect("faults lock").clear();
        *self.delay.lock().expect("faults lock") = Duration::ZERO;
    }

    /// Adds `d` of latency to every message.
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().expect("faults lock") = d;
    }

    /// Whether messages from `from` to `to` are dropped.
    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked
            .lock()
            .expect("faults lock")
            .contains(&(from, to))
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().expect("faults lock")
    }
}

/// Shared state of one node's outgoing connections.
pub(crate) struct NetCtx {
    pub(crate) self_id: NodeId,
    pub(crate) cluster_id: Arc<RwLock<Option<String>>>,
    pub(crate) faults: Option<Arc<Faults>>,
    pub(crate) transport: Arc<dyn Transport>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl NetCtx {
    pub(crate) fn new(
        self_id: NodeId,
        cluster_id: Arc<RwLock<Option<String>>>,
        faults: Option<Arc<Faults>>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            self_id,
            cluster_id,
            faults,
            transport,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A lazily connecting, cached channel to `addr` (host:port).
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, flotilla_api::grpc::DialError> {
        let mut g = self.channels.lock().expect("channels lock");
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let c = self.transport.channel(addr)?;
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Applies injected faults before a message to `to`; `Err` means dropped.
    pub(crate) async fn outbound(&self, to: NodeId) -> Result<(), String> {
        if let Some(f) = &self.faults {
            let d = f.delay();
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            if f.is_blocked(self.self_id, to) {
                return Err(format!("injected partition {} -> {to}", self.self_id));
            }
        }
        Ok(())
    }

    /// Applies injected faults to the reply from `from`.
    pub(crate) fn inbound(&self, from: NodeId) -> Result<(), String> {
        match &self.faults {
            Some(f) if f.is_blocked(from, self.self_id) => {
                Err(format!("injected partition {from} -> {}", self.self_id))
            }
            _ => Ok(()),
        }
    }

    fn cluster_id(&self) -> String {
        self.cluster_id
            .read()
            .expect("cluster id lock")
            .clone()
            .unwrap_or_default()
    }
}

/// Creates a [`Connection`] per target node.
pub struct NetworkFactory {
    pub(crate) ctx: Arc<NetCtx>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            ctx: self.ctx.clone(),
        }
    }
}

/// One node's link to one target.
pub struct Connection {
    target: NodeId,
    addr: String,
    ctx: Arc<NetCtx>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable =
            |msg: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg)));
        self.ctx.outbound(self.target).await.map_err(unreachable)?;
        let payload =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let channel = self
            .ctx
            .channel(&self.addr)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut client = RaftClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
        let mut request = tonic::Request::new(RaftMessage {
            cluster_id: self.ctx.cluster_id(),
            payload,
        });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply
            .map_err(|s| unreachable(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        self.ctx.inbound(self.target).map_err(unreachable)?;
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
