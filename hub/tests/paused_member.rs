//! A hub process paused with SIGSTOP while a client shared by many tasks times requests out:
//! on resume the server sees every one of those streams reset at once. The connection, and the
//! watch open on it, must survive (h2's default allows 20 such resets before it drops the
//! connection with everything in flight).

use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla_api::v1;
use flotilla_api::v1::kv_client::KvClient;
use flotilla_test_support::{Procs, free_port, store_status, wait_until};

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_timed_out_requests_after_a_pause_do_not_drop_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = Procs(vec![
        Command::new(env!("CARGO_BIN_EXE_flotilla-hub"))
            .arg("--insecure")
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn flotilla-hub"),
    ]);
    wait_until("the hub to lead", Duration::from_secs(60), || async {
        store_status(port).await.is_some_and(|s| s.role == "leader")
    })
    .await;
    // One connection, as a client shared by many tasks has.
    let channel = flotilla_api::grpc::client(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap(),
    )
    .connect()
    .await
    .unwrap();
    let mut kv = KvClient::new(channel.clone());
    let mut watch = kv
        .watch(v1::WatchRequest {
            key: b"/w/".to_vec(),
            prefix: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    signal(hub.0[0].id(), "-STOP");
    let timed_out: Vec<_> = (0..64)
        .map(|i| {
            let mut kv = KvClient::new(channel.clone());
            tokio::spawn(async move {
                let mut r = tonic::Request::new(v1::RangeRequest {
                    key: format!("/r/{i}").into_bytes(),
                    ..Default::default()
                });
                r.set_timeout(Duration::from_millis(200));
                kv.range(r).await.is_err()
            })
        })
        .collect();
    for t in timed_out {
        assert!(t.await.unwrap(), "a request to a paused hub times out");
    }
    signal(hub.0[0].id(), "-CONT");

    // The watch opened before the pause still delivers, on the same connection.
    let mut put = tonic::Request::new(v1::PutRequest {
        key: b"/w/after".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    });
    put.set_timeout(Duration::from_secs(30));
    kv.put(put).await.expect("a write after the pause");
    let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch answers")
        .expect("the watch survived the resets")
        .expect("an event");
    assert_eq!(event.events[0].kv.as_ref().unwrap().key, b"/w/after");
}
