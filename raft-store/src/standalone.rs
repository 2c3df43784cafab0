//! A member serving only the store's own services on a listener of its own: for the store's
//! tests and tools. The hub mounts the services on its server instead.

use std::net::SocketAddr;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

use crate::error::StoreError;
use crate::node::StoreNode;
use crate::start::NodeConfig;

/// A started standalone member: its handle and the task serving gRPC.
pub struct RunningNode {
    /// The member.
    pub node: StoreNode,
    /// The bound gRPC address.
    pub addr: SocketAddr,
    token: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// Stops Raft and the server, and waits until the data directory is released.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        self.token.cancel();
        self.wait().await
    }

    /// Resolves when the server stops (after the shutdown token fires).
    pub async fn wait(self) -> Result<(), StoreError> {
        let served = self.server.await;
        self.node.shutdown_raft().await?;
        served
            .map_err(|e| StoreError::Network(e.to_string()))?
            .map_err(|e| StoreError::Network(e.to_string()))
    }
}

/// Accepted connections with Nagle off: with our own listener tonic's `tcp_nodelay` does not
/// apply, and Nagle's algorithm meeting delayed ACKs stalls small replies for ~40 ms.
pub fn nodelay_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

impl StoreNode {
    /// Binds `config.listen`, opens the member, serves its services and bootstraps or joins.
    pub async fn start(
        config: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<RunningNode, StoreError> {
        let listen = config.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| StoreError::Network(format!("bind {listen}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| StoreError::Network(e.to_string()))?;
        let token = shutdown.child_token();
        let open = StoreNode::open(config, bound, token.clone()).await?;
        let node = open.node().clone();
        let routes = node.services(token.clone()).routes();
        let server = tokio::spawn(
            flotilla_api::grpc::server()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    nodelay_incoming(listener),
                    token.clone().cancelled_owned(),
                )
                .instrument(info_span!("store-grpc", node = node.id())),
        );
        info!(node = node.id(), addr = %node.addr(), "store member listening");
        let node = open.bootstrap_or_join().await?;
        Ok(RunningNode {
            node,
            addr: bound,
            token,
            server,
        })
    }
}
