//! Helpers the benchmark binaries share: the hub binary beside them, store members as child
//! processes, their status, and waiting with a bound.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_api::v1;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Kills child processes on drop so a failed run leaves nothing behind.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    /// Newest first: what was started on top of another goes before it.
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A process's CPU seconds (user + system) and resident memory in MiB, from `/proc`.
pub fn proc_stat(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (t(11) + t(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    (cpu, rss)
}

/// `flotilla-hub` next to this binary.
pub fn hub_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("flotilla-hub");
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p flotilla-hub)",
            p.display()
        );
    }
    Ok(p)
}

/// A benchmark's fleet CA (its `--tls` mode): hubs serve TLS with it, the benchmark calls as
/// an admin, simulated agents as their clusters.
pub struct BenchTls {
    ca: flotilla_api::pki::Ca,
    ca_pem: String,
    /// The `--tls-dir` the hubs are started with.
    pub dir: PathBuf,
}

/// How the benchmark dials the hubs (set once by [`BenchTls::install`]; plaintext without).
static SECURITY: std::sync::OnceLock<flotilla_api::grpc::Security> = std::sync::OnceLock::new();
/// How it reads the hubs' metrics over HTTPS (with TLS).
pub static METRICS_TLS: std::sync::OnceLock<flotilla_api::tls::ClientTls> =
    std::sync::OnceLock::new();
/// The fleet CA directory hubs are started with (with TLS).
static TLS_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// How the benchmark dials the hubs: TLS as its admin after [`BenchTls::install`], else
/// plaintext.
pub fn security() -> flotilla_api::grpc::Security {
    SECURITY.get().cloned().unwrap_or_default()
}

fn unix_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl BenchTls {
    /// Makes the CA in `dir/tls` and switches this process's hub commands and calls to TLS.
    pub fn install(dir: &std::path::Path) -> anyhow::Result<Self> {
        use flotilla_api::pki::{Ca, Usage};
        use flotilla_api::tls::{ClientTls, Identity};
        use flotilla_core::security::{Role, SpiffeId};
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let (ca, pair) = Ca::generate("bench", unix_secs())?;
        std::fs::write(tls.join("ca.crt"), &pair.cert_pem)?;
        std::fs::write(tls.join("ca.key"), &pair.key_pem)?;
        let admin = ca.issue(
            &SpiffeId::user("bench", Role::Admin, "bench"),
            &Usage::Client,
            unix_secs(),
            86_400,
        )?;
        let id = Identity::from_pem(&admin.cert_pem, &admin.key_pem)?;
        let _ = METRICS_TLS.set(ClientTls::http1(&pair.cert_pem, Some(id.clone()))?);
        let _ = SECURITY.set(flotilla_api::grpc::Security::Tls(ClientTls::new(
            &pair.cert_pem,
            Some(id),
        )?));
        let _ = TLS_DIR.set(tls.clone());
        Ok(Self {
            ca,
            ca_pem: pair.cert_pem,
            dir: tls,
        })
    }

    /// TLS as cluster `bench-<id>`.
    pub fn cluster(&self, id: usize) -> anyhow::Result<flotilla_api::grpc::Security> {
        use flotilla_api::pki::Usage;
        use flotilla_api::tls::{ClientTls, Identity};
        let uri = flotilla_core::security::SpiffeId::cluster("bench", &format!("bench-{id:05}"));
        let p = self.ca.issue(&uri, &Usage::Client, unix_secs(), 86_400)?;
        let ident = Identity::from_pem(&p.cert_pem, &p.key_pem)?;
        Ok(flotilla_api::grpc::Security::Tls(ClientTls::new(
            &self.ca_pem,
            Some(ident),
        )?))
    }
}

/// The store status of the member on `port`, or `None` while it does not answer.
pub async fn status(port: u16) -> Option<v1::StatusResponse> {
    let dial = flotilla_api::grpc::Dial {
        security: security(),
        ..flotilla_api::grpc::Dial::plaintext(Duration::from_millis(500))
    };
    let channel = flotilla_api::grpc::connect(&format!("127.0.0.1:{port}"), &dial)
        .await
        .ok()?;
    let mut c = v1::store_admin_client::StoreAdminClient::new(channel);
    let mut req = tonic::Request::new(v1::StatusRequest {});
    req.set_timeout(Duration::from_millis(500));
    c.status(req).await.ok().map(|r| r.into_inner())
}

/// Polls `f` every 20 ms until it holds, or fails naming `what` after 60 s.
pub async fn wait_for<F, Fut>(what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The command that starts member `id` (1-based) on `ports[id - 1]`, joining member 1.
pub fn member_command(bin: &Path, dir: &Path, ports: &[u16], id: usize) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--node-id",
        &id.to_string(),
        "--listen",
        &format!("127.0.0.1:{}", ports[id - 1]),
        "--http",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.join(format!("flotilla-{id}")))
    .env("RUST_LOG", "error")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    match TLS_DIR.get() {
        Some(tls) => cmd.arg("--tls-dir").arg(tls).args(["--fleet", "bench"]),
        None => cmd.arg("--insecure"),
    };
    if id > 1 {
        cmd.args(["--join", &format!("127.0.0.1:{}", ports[0])]);
    }
    cmd
}

/// Starts `members` store members (member 1 bootstraps, the rest join it) and waits until
/// all are voters.
pub async fn start_members(
    dir: &Path,
    members: usize,
) -> anyhow::Result<(Procs, Vec<u16>, PathBuf)> {
    let bin = hub_binary()?;
    let ports: Vec<u16> = (0..members.max(1)).map(|_| free_port()).collect();
    let mut procs = Procs(Vec::new());
    for id in 1..=ports.len() {
        procs.0.push(
            member_command(&bin, dir, &ports, id)
                .spawn()
                .context("spawn flotilla-hub")?,
        );
        if id == 1 {
            wait_for("flotilla member 1", || async {
                status(ports[0]).await.is_some_and(|s| s.role == "leader")
            })
            .await?;
        }
    }
    wait_for("flotilla voters", || async {
        status(ports[0])
            .await
            .is_some_and(|s| s.members.len() == ports.len() && s.members.iter().all(|m| m.voter))
    })
    .await?;
    Ok((procs, ports, bin))
}
