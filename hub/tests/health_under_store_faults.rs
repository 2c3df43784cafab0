//! Health stays true when the store misbehaves (the hub's fleet parts on the in-memory
//! backend, over real gRPC):
//! - a heartbeat counts when it arrives, even while the same agent's report is still being
//!   written: a slow store does not make a live cluster Unreachable;
//! - a transition whose write fails is retried until it is stored: a cluster that died is not
//!   left Ready in the store because one write failed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_api::v1;
use flotilla_core::kv::{
    KvBackend, KvError, Op, RangeRequest, RangeResult, Revision, TxnRequest, TxnResult,
    WatchRequest, WatchStream,
};
use flotilla_hub::controllers::{Controller, Leadership, run_while_leader};
use flotilla_hub::store::mirror::StoreMirror;
use flotilla_test_support::mem_kv::MemBackend;
use flotilla_test_support::wait_until;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// The in-memory store, with writes under a prefix made slow or failing on demand.
#[derive(Clone, Default)]
struct Faulty {
    inner: MemBackend,
    slow: Arc<Mutex<Option<(String, Duration)>>>,
    failing: Arc<Mutex<Option<String>>>,
}

impl Faulty {
    fn writes_to(req: &TxnRequest, prefix: &str) -> bool {
        req.success.iter().chain(&req.failure).any(|op| match op {
            Op::Put { key, .. } => key.starts_with(prefix.as_bytes()),
            _ => false,
        })
    }
}

impl KvBackend for Faulty {
    async fn range(&self, req: RangeRequest) -> Result<RangeResult, KvError> {
        self.inner.range(req).await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResult, KvError> {
        let fail = self.failing.lock().unwrap().clone();
        if fail.is_some_and(|p| Self::writes_to(&req, &p)) {
            return Err(KvError::Unavailable(
                "injected: the store is failing".into(),
            ));
        }
        let slow = self.slow.lock().unwrap().clone();
        if let Some((p, d)) = slow
            && Self::writes_to(&req, &p)
        {
            tokio::time::sleep(d).await;
        }
        self.inner.txn(req).await
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, KvError> {
        self.inner.watch(req).await
    }

    async fn compact(&self, revision: Revision) -> Result<Revision, KvError> {
        self.inner.compact(revision).await
    }
}

struct Leader(String);

impl Leadership for Leader {
    fn is_leader(&self) -> bool {
        true
    }
    fn leader_addr(&self) -> Option<String> {
        Some(self.0.clone())
    }
}

struct Hub {
    url: String,
    store: Faulty,
    shutdown: CancellationToken,
}

/// The fleet parts the hub wires (mirror, health controller, agent and fleet services) on
/// `Faulty`, with 200 ms heartbeats judged after 1 s.
async fn hub() -> Hub {
    let store = Faulty::default();
    let fleet = flotilla_hub::fleet::Fleet::new(flotilla_hub::fleet::FleetConfig {
        policy: flotilla_core::health::Policy {
            unreachable_after: Duration::from_secs(1),
            leader_grace: Duration::from_millis(100),
        },
        heartbeat: Duration::from_millis(200),
        limits: Default::default(),
        max_concurrent_joins: 8,
        metrics_per_node: false,
        message_rate: 50,
    });
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let leader: Arc<dyn Leadership> = Arc::new(Leader(addr.clone()));
    let routes = tonic::service::Routes::default()
        .add_service(fleet.agent_service(store.clone(), leader.clone()))
        .add_service(fleet.fleet_service(store.clone()));
    tokio::spawn(flotilla_hub::server::serve(
        listener,
        routes,
        fleet.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(StoreMirror::new(vec![fleet.view.clone()]).run(store.clone(), shutdown.clone()));
    let controllers: Vec<Arc<dyn Controller>> =
        vec![Arc::new(fleet.health_controller(store.clone()))];
    tokio::spawn(run_while_leader(
        leader,
        controllers,
        fleet.tick(),
        shutdown.clone(),
    ));
    wait_until("health tracking", Duration::from_secs(10), || async {
        fleet.health.active()
    })
    .await;
    Hub {
        url: format!("http://{addr}"),
        store,
        shutdown,
    }
}

async fn fleet_client(
    url: &str,
) -> v1::fleet_service_client::FleetServiceClient<tonic::transport::Channel> {
    v1::fleet_service_client::FleetServiceClient::new(channel(url).await)
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(url: &str, name: &str) -> Option<v1::ClusterHealth> {
    let cs = fleet_client(url)
        .await
        .list_clusters(v1::ListClustersRequest {})
        .await
        .ok()?
        .into_inner()
        .clusters;
    cs.into_iter()
        .find(|c| c.name == name)
        .and_then(|c| v1::ClusterHealth::try_from(c.health).ok())
}

fn msg(m: v1::agent_message::Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

fn node(name: &str) -> v1::NodeInventory {
    v1::NodeInventory {
        name: name.into(),
        ready: true,
        schedulable: true,
        condition: v1::GpuCondition::Healthy as i32,
        ..Default::default()
    }
}

/// Joins `name` with a one-node snapshot and waits until it is Ready; returns the stream.
async fn join(
    hub: &Hub,
    name: &str,
) -> (
    mpsc::Sender<v1::AgentMessage>,
    tonic::Streaming<v1::HubMessage>,
) {
    let token = fleet_client(&hub.url)
        .await
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: name.into(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (tx, rx) = mpsc::channel(64);
    tx.send(msg(v1::agent_message::Msg::Hello(v1::Hello {
        cluster: name.into(),
        token,
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut agent = v1::agent_service_client::AgentServiceClient::new(channel(&hub.url).await);
    let mut replies = agent
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap(); // welcome
    tx.send(msg(v1::agent_message::Msg::Snapshot(
        v1::InventorySnapshot {
            nodes: vec![node("n1")],
            signals: None,
        },
    )))
    .await
    .unwrap();
    replies.message().await.unwrap().unwrap(); // ack
    wait_until("Ready", Duration::from_secs(10), || async {
        health(&hub.url, name).await == Some(v1::ClusterHealth::Ready)
    })
    .await;
    (tx, replies)
}

fn heartbeat() -> v1::AgentMessage {
    msg(v1::agent_message::Msg::Heartbeat(v1::Heartbeat::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_count_on_arrival_while_a_report_is_slow_to_store() {
    let hub = hub().await;
    let (tx, _replies) = join(&hub, "slow").await;
    // Inventory writes now take 3 s: three times the Unreachable threshold.
    *hub.store.slow.lock().unwrap() = Some(("/inventory/".into(), Duration::from_secs(3)));
    tx.send(msg(v1::agent_message::Msg::Delta(v1::InventoryDelta {
        upsert: vec![node("n2")],
        remove: vec![],
        signals: None,
    })))
    .await
    .unwrap();
    // The agent keeps heartbeating while its delta is written; nobody may judge it dead.
    for _ in 0..20 {
        tx.send(heartbeat()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            health(&hub.url, "slow").await,
            Some(v1::ClusterHealth::Ready),
            "a live agent was judged by a slow store write"
        );
    }
    hub.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_fails_to_store_is_retried_until_it_is() {
    let hub = hub().await;
    let (tx, replies) = join(&hub, "dies").await;
    // The store refuses cluster-record writes, and the agent goes silent.
    *hub.store.failing.lock().unwrap() = Some("/clusters/".into());
    drop((tx, replies));
    // The tracker judges it Unreachable after 1 s, but the record cannot say so yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        health(&hub.url, "dies").await,
        Some(v1::ClusterHealth::Ready)
    );
    // The store recovers: the transition that failed is written.
    *hub.store.failing.lock().unwrap() = None;
    wait_until(
        "the record says Unreachable",
        Duration::from_secs(20),
        || async { health(&hub.url, "dies").await == Some(v1::ClusterHealth::Unreachable) },
    )
    .await;
    hub.shutdown.cancel();
}
