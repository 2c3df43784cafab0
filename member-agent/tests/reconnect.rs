//! An agent sent away by a hub that names itself as the leader (a replica in the instant
//! before it knows it leads) waits a poll interval instead of reconnecting in a hot loop. `--dev` once
//! logged 621 such reconnects in its first half second.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_api::convert::kv::LEADER_HINT_KEY;
use flotilla_api::v1;
use flotilla_kube_sim::{Scenario, SimFleet, SimOptions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

const SCENARIO: &str = r#"
clusters:
  - name: bounce
    region: westeurope
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 50}
    pools:
      - name: l4
        count: 1
        gpu: {vendor: nvidia, product: NVIDIA-L4, memory_mib: 23034, count: 4, family: ada-lovelace}
"#;

/// A hub that answers every connect with "not the leader; the leader is me".
struct SelfRedirect {
    addr: String,
    connects: Arc<AtomicUsize>,
}

type Replies = Pin<Box<dyn futures::Stream<Item = Result<v1::HubMessage, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for SelfRedirect {
    type ConnectStream = Replies;

    async fn connect(
        &self,
        _: tonic::Request<tonic::Streaming<v1::AgentMessage>>,
    ) -> Result<tonic::Response<Replies>, tonic::Status> {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let mut s = tonic::Status::unavailable("not the leader yet");
        s.metadata_mut()
            .insert(LEADER_HINT_KEY, self.addr.parse().unwrap());
        Err(s)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_naming_the_same_hub_waits_a_poll_interval() {
    let shutdown = CancellationToken::new();
    let sims = SimFleet::start(
        &Scenario::from_yaml(SCENARIO).unwrap(),
        SimOptions::default(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connects = Arc::new(AtomicUsize::new(0));
    let svc = SelfRedirect {
        addr: addr.clone(),
        connects: connects.clone(),
    };
    let token = shutdown.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::agent_service_server::AgentServiceServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                token.cancelled_owned(),
            ),
    );
    let kc = Kubeconfig::from_yaml(&sims.clusters()[0].kubeconfig()).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let opts = flotilla_agent::AgentOptions::simulated(
        "bounce",
        &addr,
        "flt_test".into(),
        Default::default(),
    );
    let agent = tokio::spawn(flotilla_agent::run(cfg, opts, None, shutdown.clone()));
    // Wait for the first connect (the agent fills its caches first), then watch 3 s.
    let start = tokio::time::Instant::now();
    while connects.load(Ordering::Relaxed) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = connects.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = connects.load(Ordering::Relaxed) - first;
    // A live replica that does not lead is polled about once a heartbeat interval (1 s before
    // a hub has named one): three to six attempts in 3 s. A hot loop makes hundreds.
    assert!((1..=15).contains(&n), "{n} reconnects in 3 s");
    shutdown.cancel();
    let _ = agent.await;
    sims.shutdown().await;
}
