//! `flotctl store snapshot save/restore` between real hubs: Raft to Raft (backup and
//! restore), and with the `etcd` feature and an `etcd` binary, Raft to etcd (moving a fleet
//! between backends). A damaged file or a non-empty target is refused, and nothing is written.

use std::process::Command;

use clap::Parser;
use flotilla_api::v1;
use flotilla_api::v1::kv_client::KvClient;
use tokio_util::sync::CancellationToken;

const FLOTCTL: &str = env!("CARGO_BIN_EXE_flotctl");

fn flotctl(hub: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(FLOTCTL)
        .arg("--hub")
        .arg(hub)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

async fn flotctl_async(hub: String, args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        flotctl(&hub, &a)
    })
    .await
    .unwrap()
}

async fn raft_hub(dir: &std::path::Path, shutdown: &CancellationToken) -> flotilla_hub::RunningHub {
    let d = dir.display().to_string();
    let args = flotilla_hub::Args::parse_from([
        "flotilla-hub",
        "--insecure",
        "--data-dir",
        &d,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    flotilla_hub::start(args, shutdown.clone()).await.unwrap()
}

async fn kv(hub: &flotilla_hub::RunningHub) -> KvClient<tonic::transport::Channel> {
    KvClient::new(
        flotilla_test_support::channel(hub.addr.port())
            .await
            .expect("hub answers"),
    )
}

/// Every key and value in the hub's store but its audit log (which records this test's own
/// calls, so it differs between hubs).
async fn everything(hub: &flotilla_hub::RunningHub) -> Vec<(Vec<u8>, Vec<u8>)> {
    let r = kv(hub)
        .await
        .range(v1::RangeRequest {
            prefix: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.kvs
        .into_iter()
        .filter(|kv| !kv.key.starts_with(b"/audit/"))
        .map(|kv| (kv.key, kv.value))
        .collect()
}

/// A fleet worth saving: join tokens through the fleet API, and records of every size up to
/// a 1 MiB one (several restore batches).
async fn fill(hub: &flotilla_hub::RunningHub) {
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(
        flotilla_test_support::channel(hub.addr.port())
            .await
            .unwrap(),
    );
    for c in ["east", "west"] {
        fleet
            .create_join_token(v1::CreateJoinTokenRequest {
                cluster: c.into(),
                ttl_seconds: 600,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut kv = kv(hub).await;
    for i in 0..150 {
        kv.put(v1::PutRequest {
            key: format!("/test/record-{i:03}").into_bytes(),
            value: vec![i as u8; i * 10],
            prev_kv: false,
        })
        .await
        .unwrap();
    }
    kv.put(v1::PutRequest {
        key: b"/test/big".to_vec(),
        value: vec![7; 1 << 20],
        prev_kv: false,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_into_a_new_hub_and_bad_restores_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let a = raft_hub(&dir.path().join("a"), &shutdown).await;
    fill(&a).await;
    let file = dir.path().join("fleet.snapshot");
    let f = file.display().to_string();
    let (code, out) = flotctl_async(
        a.addr.to_string(),
        ["store", "snapshot", "save", &f].map(String::from).to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    // 153 records, and the audit log of writing them.
    let saved: usize = out
        .split("saved ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(saved >= 153, "{out}");

    // Restored into a new, empty hub cluster: the same keys and values.
    let b = raft_hub(&dir.path().join("b"), &shutdown).await;
    let restore = ["store", "snapshot", "restore", &f]
        .map(String::from)
        .to_vec();
    let (code, out) = flotctl_async(b.addr.to_string(), restore.clone()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("restored {saved} keys")), "{out}");
    let want = everything(&a).await;
    assert_eq!(want.len(), 153);
    assert_eq!(everything(&b).await, want);

    // Not into a store that holds data: refused, and nothing changes.
    let (code, out) = flotctl_async(b.addr.to_string(), restore).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("holds 153 keys") && out.contains("nothing restored"),
        "{out}"
    );
    assert_eq!(everything(&b).await, want);

    // A damaged file: refused before anything is written.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[5] = lines[5].replace("\"value\":\"", "\"value\":\"AAAA");
    let damaged = dir.path().join("damaged.snapshot");
    std::fs::write(&damaged, lines.join("\n") + "\n").unwrap();
    let truncated = dir.path().join("truncated.snapshot");
    std::fs::write(
        &truncated,
        text.lines().take(40).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let c = raft_hub(&dir.path().join("c"), &shutdown).await;
    for (file, says) in [(&damaged, "sha256 mismatch"), (&truncated, "truncated")] {
        let f = file.display().to_string();
        let (code, out) = flotctl_async(
            c.addr.to_string(),
            ["store", "snapshot", "restore", &f]
                .map(String::from)
                .to_vec(),
        )
        .await;
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(says) && out.contains("nothing restored"),
            "{out}"
        );
    }
    assert!(everything(&c).await.is_empty());
    shutdown.cancel();
    for h in [a, b, c] {
        h.wait().await.unwrap();
    }
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_moves_from_the_raft_store_to_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_etcd, url)) = flotilla_test_support::start_etcd(dir.path()).await else {
        return;
    };
    let shutdown = CancellationToken::new();
    let a = raft_hub(&dir.path().join("a"), &shutdown).await;
    fill(&a).await;
    let f = dir.path().join("fleet.snapshot").display().to_string();
    let (code, out) = flotctl_async(
        a.addr.to_string(),
        ["store", "snapshot", "save", &f].map(String::from).to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let args = flotilla_hub::Args::parse_from([
        "flotilla-hub",
        "--insecure",
        "--store",
        "etcd",
        "--etcd-endpoints",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    // etcd accepts connections a moment before it serves.
    let mut e = None;
    for _ in 0..50 {
        match flotilla_hub::start(args.clone(), shutdown.clone()).await {
            Ok(h) => {
                e = Some(h);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    let e = e.expect("a hub on etcd");
    let (code, out) = flotctl_async(
        e.addr.to_string(),
        ["store", "snapshot", "restore", &f]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(everything(&e).await, everything(&a).await);
    shutdown.cancel();
    a.wait().await.unwrap();
    e.wait().await.unwrap();
}
