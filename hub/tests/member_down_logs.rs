//! While one of three members is down, every linearizable read makes openraft log an ERROR
//! ("timeout while confirming leadership for read request"). The hub rate-limits openraft's
//! WARN and ERROR lines per call site, so a few hundred reads log a handful of lines.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_core::kv::{KeyRange, KvBackend, RangeRequest};
use flotilla_raft_store::client::StoreClient;
use flotilla_test_support::{Procs, free_port, store_status, wait_until};

fn spawn(id: u64, dir: &Path, port: u16, join: Option<u16>) -> Child {
    let log = std::fs::File::create(dir.join(format!("n{id}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-hub"));
    cmd.arg("--insecure")
        .arg("--node-id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(dir.join(format!("n{id}")))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http",
            "127.0.0.1:0",
        ])
        .args(["--heartbeat-ms", "50"])
        .env_remove("RUST_LOG")
        .stdout(log)
        .stderr(Stdio::null());
    if let Some(j) = join {
        cmd.arg("--join").arg(format!("127.0.0.1:{j}"));
    }
    cmd.spawn().expect("spawn flotilla-hub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_member_does_not_flood_the_leaders_log() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Procs(vec![spawn(1, dir.path(), ports[0], None)]);
    wait_until("member 1 to lead", Duration::from_secs(60), || async {
        store_status(ports[0])
            .await
            .is_some_and(|s| s.role == "leader")
    })
    .await;
    for id in 2..=3 {
        procs.0.push(spawn(
            id,
            dir.path(),
            ports[id as usize - 1],
            Some(ports[0]),
        ));
        wait_until("the member to join", Duration::from_secs(60), || async {
            store_status(ports[0])
                .await
                .is_some_and(|s| s.members.iter().filter(|m| m.voter).count() == id as usize)
        })
        .await;
    }
    let _ = procs.0[2].kill();
    let _ = procs.0[2].wait();

    let client = StoreClient::new(&[format!("127.0.0.1:{}", ports[0])]).unwrap();
    let mut ok = 0;
    for _ in 0..300 {
        if client
            .range(RangeRequest::new(KeyRange::key("/k")))
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    assert!(
        ok > 0,
        "two of three members still serve linearizable reads"
    );
    let log = std::fs::read_to_string(dir.path().join("n1.log")).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("confirming leadership"))
        .count();
    assert!(lines >= 1, "the down member is noticed:\n{log}");
    assert!(
        lines <= 3,
        "{lines} lines about confirming leadership after 300 reads:\n{log}"
    );
}
