//! End-to-end suite driving the real binaries (`tests/`). Store crash tests live in `hub/tests`.
//! This library holds what the suites share: building and starting the binaries, and asking
//! the hubs (leadership, clusters, DNS) from outside.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::sync::LazyLock;

use flotilla_api::grpc::{Dial, Security};
use flotilla_api::pki::{Ca, Pair, Usage};
use flotilla_api::tls::{ClientTls, Identity};
use flotilla_api::v1;
use flotilla_core::security::{Role, SpiffeId};
use flotilla_test_support::{free_port, wait_until};
use tonic::transport::Channel;

/// The fleet name every e2e hub serves.
pub const FLEET: &str = "e2e";

/// One fleet CA for the whole test process, and an admin identity from it: every hub the
/// suite starts serves TLS with it, and every call the suite makes presents the admin.
struct FleetCa {
    ca: Ca,
    pair: Pair,
    admin: Pair,
}

static FLEET_CA: LazyLock<FleetCa> = LazyLock::new(|| {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (ca, pair) = Ca::generate(FLEET, now).expect("a CA");
    let admin = ca
        .issue(
            &SpiffeId::user(FLEET, Role::Admin, "e2e"),
            &Usage::Client,
            now,
            86_400,
        )
        .expect("an admin certificate");
    FleetCa { ca, pair, admin }
});

/// Writes the suite's fleet CA and admin identity into `<dir>/tls` (what `flotctl ca init`
/// makes) and returns it.
pub fn fleet_tls(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    let f = &*FLEET_CA;
    for (name, text) in [
        ("ca.crt", &f.pair.cert_pem),
        ("ca.key", &f.pair.key_pem),
        ("admin.crt", &f.admin.cert_pem),
        ("admin.key", &f.admin.key_pem),
    ] {
        std::fs::write(tls.join(name), text).expect("tls file");
    }
    std::fs::write(tls.join("fleet"), FLEET).expect("tls file");
    tls
}

/// How the suite dials a hub: TLS, as the admin.
pub fn security() -> Security {
    let f = &*FLEET_CA;
    let id = Identity::from_pem(&f.admin.cert_pem, &f.admin.key_pem).expect("admin identity");
    Security::Tls(ClientTls::new(&f.pair.cert_pem, Some(id)).expect("client TLS"))
}

/// TLS as cluster `name`'s agent would present it (a certificate the fleet CA signed).
pub fn cluster_security(name: &str) -> Security {
    let f = &*FLEET_CA;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let p =
        f.ca.issue(&SpiffeId::cluster(FLEET, name), &Usage::Client, now, 3600)
            .expect("a cluster certificate");
    let id = Identity::from_pem(&p.cert_pem, &p.key_pem).expect("cluster identity");
    Security::Tls(ClientTls::new(&f.pair.cert_pem, Some(id)).expect("client TLS"))
}

/// A connection to the hub on `port` as `security` says, or `None` while it does not answer.
pub async fn channel_as(port: u16, security: Security) -> Option<Channel> {
    let dial = Dial {
        security,
        ..Dial::plaintext(Duration::from_secs(2))
    };
    flotilla_api::grpc::connect(&format!("127.0.0.1:{port}"), &dial)
        .await
        .ok()
}

/// A connection to the hub on `port` as the admin, or `None` while it does not answer.
pub async fn channel(port: u16) -> Option<Channel> {
    channel_as(port, security()).await
}

/// The store status of the hub on `port`, or `None` while it does not answer.
pub async fn status(port: u16) -> Option<v1::StatusResponse> {
    let mut c = v1::store_admin_client::StoreAdminClient::new(channel(port).await?);
    c.status(v1::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `flotctl` flags that reach the suite's hubs as the admin (`--ca`, `--cert`, `--key`).
pub fn ctl_tls_args(dir: &Path) -> Vec<String> {
    let tls = fleet_tls(dir);
    ["ca", "cert", "key"]
        .iter()
        .zip(["ca.crt", "admin.crt", "admin.key"])
        .flat_map(|(flag, file)| [format!("--{flag}"), tls.join(file).display().to_string()])
        .collect()
}

/// The workspace's binaries for this profile, built on demand (a test cannot depend on
/// another package's binaries directly).
pub fn binaries() -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let names = ["flotilla-hub", "flotilla-agent", "flotilla-kube-sim"];
    // Always ask cargo: a binary left from an older build would test old code.
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "flotilla-hub",
            "-p",
            "flotilla-agent",
            "-p",
            "flotilla-kube-sim",
            "--bins",
        ]);
        if cfg!(feature = "etcd") {
            cmd.args(["--features", "flotilla-hub/etcd"]);
        }
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the binaries failed"
        );
    }
    assert!(
        names.iter().all(|n| dir.join(n).exists()),
        "binaries missing in {}",
        dir.display()
    );
    dir
}

/// Where the hubs keep the fleet.
#[derive(Clone, Copy, PartialEq)]
pub enum Backend<'a> {
    /// The embedded Raft store.
    Raft,
    /// The etcd client URL.
    Etcd(&'a str),
}

/// One hub replica: `id` (1-based), its gRPC and HTTP ports, and on Raft the member to join.
pub fn hub(
    bin: &Path,
    backend: Backend<'_>,
    id: u64,
    dir: &Path,
    ports: (u16, u16, u16),
    join: Option<u16>,
) -> Child {
    hub_on(bin, backend, id, dir, ports, join, None)
}

/// [`hub`], its gRPC port also reachable at `expose` (an address of this host, e.g. a
/// [`Netns`]'s host side), which it advertises to agents and peers.
pub fn hub_on(
    bin: &Path,
    backend: Backend<'_>,
    id: u64,
    dir: &Path,
    (port, http, dns): (u16, u16, u16),
    join: Option<u16>,
    expose: Option<&str>,
) -> Child {
    let mut cmd = Command::new(bin.join("flotilla-hub"));
    let listen = match expose {
        Some(ip) => {
            cmd.args(["--advertise", &format!("{ip}:{port}")]);
            format!("0.0.0.0:{port}")
        }
        None => format!("127.0.0.1:{port}"),
    };
    cmd.args([
        "--node-id",
        &id.to_string(),
        "--listen",
        &listen,
        "--http",
        &format!("127.0.0.1:{http}"),
        "--dns",
        &format!("127.0.0.1:{dns}"),
    ])
    .args([
        "--heartbeat-ms",
        "100",
        "--unreachable-after",
        "1500ms",
        "--agent-heartbeat",
        "300ms",
    ])
    .args(["--leader-grace", "3s"])
    .env("RUST_LOG", "info");
    // Every e2e hub serves TLS with the suite's fleet CA.
    cmd.arg("--tls-dir")
        .arg(fleet_tls(dir))
        .args(["--fleet", FLEET]);
    // Kept for a failed run: `hub<id>.log` beside the test's data (tracing writes stdout).
    let log = std::fs::File::create(dir.join(format!("hub{id}.log"))).expect("hub log");
    cmd.stderr(log.try_clone().expect("hub log")).stdout(log);
    match backend {
        Backend::Raft => {
            cmd.arg("--data-dir").arg(dir.join(format!("hub{id}")));
        }
        Backend::Etcd(url) => {
            cmd.args(["--store", "etcd", "--etcd-endpoints", url])
                .args(["--etcd-lease-ttl", "2s"]);
        }
    }
    if let Some(j) = join {
        cmd.arg("--join").arg(format!("127.0.0.1:{j}"));
    }
    cmd.spawn().expect("spawn flotilla-hub")
}

/// Whether the hub with HTTP port `http` says it leads (`flotilla_hub_leader 1`), read over
/// HTTPS as the admin.
pub async fn leads(http: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = &*FLEET_CA;
    let id = Identity::from_pem(&f.admin.cert_pem, &f.admin.key_pem).expect("admin identity");
    let tls = ClientTls::http1(&f.pair.cert_pem, Some(id)).expect("client TLS");
    let Ok(mut s) = tls.dial("127.0.0.1", http).await else {
        return false;
    };
    let req = "GET /metrics HTTP/1.0\r\nHost: hub\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body.lines().any(|l| l.trim() == "flotilla_hub_leader 1")
}

/// The 0-based index of the replica that leads, as the replicas `among` see it.
pub async fn leader(
    backend: Backend<'_>,
    (ports, http): (&[u16; 3], &[u16; 3]),
    among: &[usize],
) -> Option<usize> {
    for &i in among {
        match backend {
            Backend::Raft => {
                if let Some(s) = status(ports[i]).await
                    && s.leader_id != 0
                {
                    return Some(s.leader_id as usize - 1);
                }
            }
            Backend::Etcd(_) => {
                if leads(http[i]).await {
                    return Some(i);
                }
            }
        }
    }
    None
}

/// Start an agent for `cluster` against the hubs on `hubs` (its log beside the kubeconfig).
pub fn agent(bin: &Path, cluster: &str, hubs: &[u16], token: &str, kubeconfig: &Path) -> Child {
    let hubs: Vec<String> = hubs.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    agent_in(None, bin, (cluster, ""), &hubs, token, kubeconfig)
}

/// [`agent`] inside `ns` when given, with the cluster's `labels` (`k=v,…`), dialling the hubs
/// at `hubs` (`host:port`).
pub fn agent_in(
    ns: Option<&Netns>,
    bin: &Path,
    (cluster, labels): (&str, &str),
    hubs: &[String],
    token: &str,
    kubeconfig: &Path,
) -> Child {
    // Beside the kubeconfigs; appended to, so a restarted agent's log follows the first.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(kubeconfig.with_extension("agent.log"))
        .expect("agent log");
    let mut cmd = command(ns, &bin.join("flotilla-agent"));
    if !labels.is_empty() {
        cmd.env("FLOTILLA_LABELS", labels);
    }
    // kube-sim has no flotilla-system namespace (the install manifest makes it on a real
    // cluster): the identity Secret goes in `default`, so a restarted agent finds it.
    cmd.args([
        "--cluster",
        cluster,
        "--token",
        token,
        "--identity-secret",
        "default/flotilla-agent-identity",
        "--http",
        "",
        "--hub",
        &hubs.join(","),
    ])
    .arg("--kubeconfig")
    .arg(kubeconfig)
    .env("RUST_LOG", "info")
    .stderr(log.try_clone().expect("agent log"))
    .stdout(log)
    .spawn()
    .expect("spawn flotilla-agent")
}

/// The member clusters as the hub on `port` lists them (`None`: it did not answer).
pub async fn clusters(port: u16) -> Option<Vec<v1::Cluster>> {
    let mut c = v1::fleet_service_client::FleetServiceClient::new(channel(port).await?);
    c.list_clusters(v1::ListClustersRequest {})
        .await
        .ok()
        .map(|r| r.into_inner().clusters)
}

/// A UDP port that was free a moment ago (the hub binds UDP and TCP on it).
pub fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// The A records the hub's DNS on `port` answers for `llm.ml.svc.clusterset.local`, or
/// `None` without a NOERROR answer within a second.
pub async fn dns_a(port: u16) -> Option<Vec<String>> {
    use flotilla_dns::proto::op::{Message, Query, ResponseCode};
    use flotilla_dns::proto::rr::{Name, RData, RecordType};
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii("llm.ml.svc.clusterset.local.").ok()?,
        RecordType::A,
    ));
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    s.send_to(&m.to_vec().ok()?, ("127.0.0.1", port))
        .await
        .ok()?;
    let mut buf = vec![0; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let r = Message::from_vec(&buf[..n]).ok()?;
    if r.metadata.response_code != ResponseCode::NoError {
        return None;
    }
    Some(
        r.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect(),
    )
}

/// The health of cluster `name` in `cs`.
pub fn health(cs: &[v1::Cluster], name: &str) -> Option<v1::ClusterHealth> {
    cs.iter()
        .find(|c| c.name == name)
        .and_then(|c| v1::ClusterHealth::try_from(c.health).ok())
}

/// `flotilla-kube-sim` serving `scenario`, writing each cluster's kubeconfig under `kc`.
pub fn kube_sim(bin: &Path, scenario: &Path, kc: &Path) -> Child {
    kube_sim_in(None, bin, scenario, kc)
}

/// [`kube_sim`], inside `ns` when given.
pub fn kube_sim_in(ns: Option<&Netns>, bin: &Path, scenario: &Path, kc: &Path) -> Child {
    command(ns, &bin.join("flotilla-kube-sim"))
        .arg("--scenario")
        .arg(scenario)
        .arg("--kubeconfig-dir")
        .arg(kc)
        .args(["--control", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla-kube-sim")
}

/// A cluster's labels by its name (`k=v,…`).
pub type Labels = dyn Fn(&str) -> String;

/// An agent per cluster in `names`, each with a new join token from the hub on `token_port`,
/// started once kube-sim has written its kubeconfig under `kc`, with the cluster labels
/// `labels` gives (`k=v,…`); the agents and their tokens.
pub async fn agents(
    bin: &Path,
    (names, labels): (&[&str], &Labels),
    hubs: &[u16],
    token_port: u16,
    kc: &Path,
    limit: Duration,
) -> (Vec<Child>, Vec<String>) {
    let mut tokens = Vec::new();
    for n in names {
        tokens.push(join_token(token_port, n).await);
    }
    wait_until("kubeconfigs written", limit, || async {
        names
            .iter()
            .all(|n| kc.join(format!("{n}.kubeconfig")).exists())
    })
    .await;
    let children = names
        .iter()
        .zip(&tokens)
        .map(|(n, t)| {
            let hubs: Vec<String> = hubs.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let kubeconfig = kc.join(format!("{n}.kubeconfig"));
            agent_in(None, bin, (n, &labels(n)), &hubs, t, &kubeconfig)
        })
        .collect();
    (children, tokens)
}

/// A join string for `cluster` from the hub on `port` (single use, pinning the fleet CA).
pub async fn join_token(port: u16, cluster: &str) -> String {
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(
        channel(port).await.expect("a hub to ask for a token"),
    );
    fleet
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: cluster.to_string(),
            ttl_seconds: 600,
            ..Default::default()
        })
        .await
        .expect("a join token")
        .into_inner()
        .join
}

/// `program`, run inside `ns` when given.
fn command(ns: Option<&Netns>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            // `ip netns exec` execs the program: the child's pid is the program's.
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A network namespace joined to this host by a veth pair, to partition the processes in it
/// from the rest as a network does (their link goes down; processes here still reach the
/// host side's address). Needs root and `ip`; dropping it deletes the namespace and the pair.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// This host's address on the pair, which processes inside reach it at.
    pub host_ip: String,
    inside: String,
}

impl Netns {
    /// A new namespace, or why there cannot be one here.
    pub fn create() -> Result<Self, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("needs root to create a network namespace".into());
        }
        let pid = std::process::id();
        let name = format!("flt{pid}");
        let (host, inside) = (format!("flt{pid}h"), format!("flt{pid}n"));
        let octet = pid % 250 + 1;
        let (host_ip, inside_ip) = (format!("10.213.{octet}.1"), format!("10.213.{octet}.2"));
        let ns = Self {
            name: name.clone(),
            host_ip: host_ip.clone(),
            inside: inside.clone(),
        };
        let steps: [&[&str]; 8] = [
            &["netns", "add", &name],
            &[
                "link", "add", &host, "type", "veth", "peer", "name", &inside,
            ],
            &["link", "set", &inside, "netns", &name],
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host],
            &["link", "set", &host, "up"],
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{inside_ip}/30"),
                "dev",
                &inside,
            ],
            &["-n", &name, "link", "set", &inside, "up"],
            &["-n", &name, "link", "set", "lo", "up"],
        ];
        for args in steps {
            ip(args)?;
        }
        Ok(ns)
    }

    /// Cut the namespace off (true) or join it again (false).
    pub fn partition(&self, cut: bool) {
        let state = if cut { "down" } else { "up" };
        ip(&["-n", &self.name, "link", "set", &self.inside, state]).expect("partition");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The pair goes with the namespace.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A join as an agent makes it, against the hub on `port`: a connection trusting only the CA
/// the join string pins, a hello with the token and a CSR; `Ok` once a certificate comes back.
pub async fn bootstrap(port: u16, cluster: &str, join: &str) -> Result<(), tonic::Status> {
    let j = flotilla_core::security::JoinString::parse(join)
        .map_err(tonic::Status::invalid_argument)?;
    let ch = channel_as(port, Security::Tls(ClientTls::pinned(&j.ca_hash)))
        .await
        .ok_or_else(|| tonic::Status::unavailable("no connection"))?;
    let (csr, _key) =
        flotilla_api::pki::csr().map_err(|e| tonic::Status::internal(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let hello = v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            cluster: cluster.into(),
            token: j.token.reveal(),
            csr,
            ..Default::default()
        })),
    };
    let _ = tx.send(hello).await;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut replies = v1::agent_service_client::AgentServiceClient::new(ch)
        .connect(stream)
        .await?
        .into_inner();
    match replies.message().await? {
        Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Welcome(w)),
        }) if w.certificate.is_some() => Ok(()),
        other => Err(tonic::Status::internal(format!(
            "no certificate: {other:?}"
        ))),
    }
}
