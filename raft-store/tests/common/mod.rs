//! In-process store clusters over real gRPC on loopback, with injectable network faults.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::kv::{KeyRange, KvBackend, RangeRequest, TxnRequest};
use flotilla_raft_store::client::StoreClient;
use flotilla_raft_store::{Faults, NodeConfig, RunningNode, StoreNode, Tuning};
use tokio_util::sync::CancellationToken;

pub fn fast_tuning() -> Tuning {
    Tuning {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(200),
        election_timeout_max: Duration::from_millis(400),
        write_timeout: Duration::from_secs(3),
        ..Tuning::default()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub faults: Arc<Faults>,
    pub nodes: Vec<Option<RunningNode>>,
    pub addrs: Vec<SocketAddr>,
    pub tuning: Tuning,
    pub token: CancellationToken,
}

impl Cluster {
    /// Starts `n` members: member 1 bootstraps, the others join through it.
    pub async fn start(n: usize, tuning: Tuning) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into()))
            .with_test_writer()
            .try_init();
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            faults: Arc::new(Faults::default()),
            nodes: Vec::new(),
            addrs: Vec::new(),
            tuning,
            token: CancellationToken::new(),
        };
        for i in 1..=n as u64 {
            c.add_member(i).await;
        }
        c
    }

    pub async fn add_member(&mut self, id: u64) {
        let join = (id != 1).then(|| self.addrs[0].to_string());
        let mut cfg = NodeConfig::new(
            id,
            self.dir.path().join(format!("n{id}")),
            "127.0.0.1:0".parse().unwrap(),
        );
        cfg.join = join;
        cfg.tuning = self.tuning.clone();
        cfg.faults = Some(self.faults.clone());
        let running = StoreNode::start(cfg, self.token.clone())
            .await
            .expect("start member");
        self.addrs.push(running.addr);
        self.nodes.push(Some(running));
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64).collect()
    }

    pub fn node(&self, id: u64) -> &StoreNode {
        &self.nodes[id as usize - 1]
            .as_ref()
            .expect("member is running")
            .node
    }

    pub fn client(&self) -> StoreClient {
        StoreClient::new(&self.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()).unwrap()
    }

    pub fn client_of(&self, id: u64) -> StoreClient {
        StoreClient::new(&[self.addrs[id as usize - 1].to_string()]).unwrap()
    }

    /// Stops a member abruptly (its data stays).
    pub async fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes[id as usize - 1].take() {
            n.shutdown().await.expect("shutdown");
        }
    }

    /// Restarts a killed member on its old address.
    pub async fn restart(&mut self, id: u64) {
        self.restart_joining(id, None).await;
    }

    /// Restarts a killed member on its old address with `--join` set as given.
    pub async fn restart_joining(&mut self, id: u64, join: Option<String>) {
        let mut cfg = NodeConfig::new(
            id,
            self.dir.path().join(format!("n{id}")),
            self.addrs[id as usize - 1],
        );
        cfg.join = join;
        cfg.tuning = self.tuning.clone();
        cfg.faults = Some(self.faults.clone());
        let running = StoreNode::start(cfg, self.token.clone())
            .await
            .expect("restart member");
        self.nodes[id as usize - 1] = Some(running);
    }

    pub fn running(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|i| self.nodes[*i as usize - 1].is_some())
            .collect()
    }

    /// Waits until the running members among `among` agree on one leader in `among`.
    pub async fn leader_among(&self, among: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let views: Vec<Option<u64>> = among
                .iter()
                .map(|i| self.node(*i).raft().metrics().borrow().current_leader)
                .collect();
            if let Some(Some(l)) = views.first()
                && among.contains(l)
                && views.iter().all(|v| *v == Some(*l))
                && self.node(*l).raft().metrics().borrow().state == openraft::ServerState::Leader
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?}: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn leader(&self) -> u64 {
        self.leader_among(&self.running()).await
    }

    /// Waits until every running member has applied up to the leader's last log index.
    pub async fn converge(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // (applied index, last log index) per running member.
            let (idx, last): (Vec<u64>, Vec<u64>) = self
                .running()
                .iter()
                .map(|i| {
                    let m = self.node(*i).raft().metrics().borrow().clone();
                    (
                        m.last_applied.map_or(0, |l| l.index),
                        m.last_log_index.unwrap_or(0),
                    )
                })
                .unzip();
            let max = last.iter().copied().max().unwrap_or(0);
            if idx.iter().all(|a| *a == max) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge: applied {idx:?}, last {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn digests(&self) -> Vec<String> {
        self.running()
            .iter()
            .map(|i| self.node(*i).reader().digest().unwrap())
            .collect()
    }

    pub async fn shutdown(mut self) {
        for id in self.ids() {
            self.kill(id).await;
        }
    }
}

pub async fn put(b: &impl KvBackend, k: &str, v: &str) -> flotilla_core::kv::TxnResult {
    b.txn(TxnRequest::put(k, v)).await.expect("put")
}

pub async fn get(b: &impl KvBackend, k: &str) -> Option<String> {
    let r = b
        .range(RangeRequest::new(KeyRange::key(k)))
        .await
        .expect("get");
    r.kvs
        .first()
        .map(|kv| String::from_utf8(kv.value.clone()).unwrap())
}
