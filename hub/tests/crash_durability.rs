//! Crash durability with real processes: three `flotilla-hub` members on loopback take writes
//! from concurrent clients; the leader is killed with SIGKILL mid-load and restarted. Every
//! acknowledged write must be present afterwards, and all replicas must end with the same
//! state digest.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_core::kv::{Consistency, KeyRange, KvBackend, KvError, RangeRequest, TxnRequest};
use flotilla_raft_store::client::StoreClient;
use flotilla_test_support::{free_port, store_status as status, wait_until};
use sha2::{Digest, Sha256};

/// Liveness bound for every wait in this test.
const LIMIT: Duration = Duration::from_secs(60);

fn spawn(id: u64, dir: &Path, port: u16, join: Option<u16>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-hub"));
    cmd.arg("--insecure")
        .arg("--node-id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(dir.join(format!("n{id}")))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--http", "127.0.0.1:0"])
        .arg("--heartbeat-ms")
        .arg("50")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(j) = join {
        cmd.arg("--join").arg(format!("127.0.0.1:{j}"));
    }
    cmd.spawn().expect("spawn flotilla-hub")
}

async fn digest_of(port: u16) -> String {
    let c = StoreClient::new(&[format!("127.0.0.1:{port}")]).unwrap();
    let r = c
        .range(RangeRequest {
            consistency: Consistency::Serializable,
            ..RangeRequest::new(KeyRange::prefix(""))
        })
        .await
        .unwrap();
    let mut h = Sha256::new();
    h.update(r.revision.to_be_bytes());
    for kv in &r.kvs {
        h.update(&kv.key);
        h.update(&kv.value);
        h.update(kv.mod_revision.to_be_bytes());
        h.update(kv.version.to_be_bytes());
    }
    format!("{:x}", h.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut children: Vec<Option<Child>> = vec![Some(spawn(1, dir.path(), ports[0], None))];
    wait_until("member 1 to lead", LIMIT, || async {
        status(ports[0]).await.is_some_and(|s| s.role == "leader")
    })
    .await;
    children.push(Some(spawn(2, dir.path(), ports[1], Some(ports[0]))));
    children.push(Some(spawn(3, dir.path(), ports[2], Some(ports[0]))));
    wait_until("three voters", LIMIT, || async {
        status(ports[0])
            .await
            .is_some_and(|s| s.members.len() == 3 && s.members.iter().all(|m| m.voter))
    })
    .await;

    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let unknown = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = StoreClient::new(&addrs)
            .unwrap()
            .with_timeout(Duration::from_secs(3));
        let (acked, unknown, stop) = (acked.clone(), unknown.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("/crash/{w}/{i}");
                match client
                    .txn(TxnRequest::put(key.clone(), "v".repeat(256)))
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key);
                    }
                    Err(KvError::OutcomeUnknown(_)) => *unknown.lock().unwrap() += 1,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = status(ports[0]).await.expect("status").leader_id;
    assert!(leader >= 1);
    let before = acked.lock().unwrap().len();
    // SIGKILL: no chance to flush anything that was not already fsynced.
    children[leader as usize - 1]
        .take()
        .unwrap()
        .kill()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    children[leader as usize - 1] =
        Some(spawn(leader, dir.path(), ports[leader as usize - 1], None));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > before,
        "writes continued after the leader was killed"
    );

    wait_until("replicas to converge", LIMIT, || async {
        let mut s = Vec::new();
        for p in ports {
            match status(p).await {
                Some(x) => s.push((x.last_applied_index, x.revision)),
                None => return false,
            }
        }
        s.windows(2).all(|w| w[0] == w[1])
    })
    .await;

    let client = StoreClient::new(&addrs).unwrap();
    let all = client
        .range(RangeRequest::new(KeyRange::prefix("/crash/")))
        .await
        .unwrap();
    let present: BTreeSet<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    let missing: Vec<&String> = acked.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let digests = [
        digest_of(ports[0]).await,
        digest_of(ports[1]).await,
        digest_of(ports[2]).await,
    ];
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replica digests differ: {digests:?}"
    );
    println!(
        "{} acknowledged writes, {} with unknown outcome, all present; killed leader {leader}",
        acked.len(),
        unknown.lock().unwrap()
    );
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
