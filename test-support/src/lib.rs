//! Helpers shared by the tests that drive real processes over loopback. Kept tiny on purpose:
//! anything that knows a test's scenario stays in that test.

pub mod kv_battery;
pub mod mem_kv;

use std::time::{Duration, Instant};

use flotilla_api::v1;
use tonic::transport::Channel;

/// Child processes killed (and resumed first, if paused) when dropped, so a failed test
/// leaves nothing running.
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// A gRPC channel to `127.0.0.1:port`, or `None` while nothing answers there.
pub async fn channel(port: u16) -> Option<Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect()
        .await
        .ok()
}

/// The store status of the hub on `port`, or `None` while it does not answer.
pub async fn store_status(port: u16) -> Option<v1::StatusResponse> {
    let mut c = v1::store_admin_client::StoreAdminClient::new(channel(port).await?);
    c.status(v1::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Poll `f` every 100 ms until it holds; panic naming `what` after `limit` (a liveness bound,
/// generous on purpose: the machines running tests are shared and noisy).
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A single-member etcd on loopback for tests, or `None` (with the reason printed) when no
/// `etcd` binary is on the PATH (`FLOTILLA_ETCD` names another). Returns the process and its
/// client URL.
pub async fn start_etcd(dir: &std::path::Path) -> Option<(Procs, String)> {
    start_etcd_with(dir, None).await
}

/// [`start_etcd`], serving TLS when `tls` names its certificate, key and the CA it checks
/// client certificates against (`--client-cert-auth`); the URL is then `https://`.
pub async fn start_etcd_with(
    dir: &std::path::Path,
    tls: Option<(&std::path::Path, &std::path::Path, &std::path::Path)>,
) -> Option<(Procs, String)> {
    let bin = std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".into());
    let (client, peer) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = std::process::Command::new(&bin);
    if let Some((cert, key, ca)) = tls {
        cmd.arg("--cert-file")
            .arg(cert)
            .arg("--key-file")
            .arg(key)
            .arg("--trusted-ca-file")
            .arg(ca)
            .arg("--client-cert-auth");
    }
    let child = cmd
        .args(["--name", "e0", "--log-level", "error"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("e0={peer_url}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP: no etcd ({bin}: {e}); install the Debian package etcd-server");
            return None;
        }
    };
    let procs = Procs(vec![child]);
    let health = format!("127.0.0.1:{client}");
    wait_until("etcd serving", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&health).await.is_ok()
    })
    .await;
    Some((procs, url))
}
