//! Security on a one-member hub over real TLS: roles on every RPC, plaintext and foreign
//! certificates refused, join tokens (pin, single use, expiry, cluster), certificates signed
//! from CSRs and renewed, per-message identity, revocation that ends an open stream, approval,
//! the audit log, and a real agent keeping its identity in a Secret across a restart. Each
//! denial is its own assertion.

use std::time::Duration;

use clap::Parser;
use flotilla_api::grpc::{Dial, Security};
use flotilla_api::pki::{Ca, Usage};
use flotilla_api::tls::{ClientTls, Identity};
use flotilla_api::v1;
use flotilla_api::v1::agent_service_client::AgentServiceClient;
use flotilla_api::v1::fleet_service_client::FleetServiceClient;
use flotilla_core::security::{Role, SpiffeId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

const FLEET: &str = "sec";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Hub {
    addr: String,
    ca: Ca,
    ca_pem: String,
    _shutdown: Shutdown,
    _running: flotilla_hub::RunningHub,
    _dir: tempfile::TempDir,
}

struct Shutdown(CancellationToken);
impl Drop for Shutdown {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn hub(extra: &[&str]) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (ca, pair) = Ca::generate(FLEET, now()).unwrap();
    std::fs::write(tls.join("ca.crt"), &pair.cert_pem).unwrap();
    std::fs::write(tls.join("ca.key"), &pair.key_pem).unwrap();
    let d = dir.path().join("data");
    let mut args = vec![
        "flotilla-hub",
        "--data-dir",
        d.to_str().unwrap(),
        "--tls-dir",
        tls.to_str().unwrap(),
        "--fleet",
        FLEET,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--unreachable-after",
        "1s",
        "--leader-grace",
        "100ms",
        "--agent-heartbeat",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let shutdown = CancellationToken::new();
    let running = flotilla_hub::start(flotilla_hub::Args::parse_from(args), shutdown.clone())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !running.fleet.health.active() {
        assert!(tokio::time::Instant::now() < deadline, "hub never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Hub {
        addr: running.addr.to_string(),
        ca,
        ca_pem: pair.cert_pem,
        _shutdown: Shutdown(shutdown),
        _running: running,
        _dir: dir,
    }
}

impl Hub {
    /// A client identity for `uri`, issued by this hub's CA.
    fn identity(&self, uri: &str) -> std::sync::Arc<Identity> {
        let p = self.ca.issue(uri, &Usage::Client, now(), 3600).unwrap();
        Identity::from_pem(&p.cert_pem, &p.key_pem).unwrap()
    }

    async fn channel(&self, identity: Option<std::sync::Arc<Identity>>) -> Channel {
        let tls = ClientTls::new(&self.ca_pem, identity).unwrap();
        dial(&self.addr, Security::Tls(tls)).await
    }

    async fn user(&self, role: Role) -> FleetServiceClient<Channel> {
        let id = self.identity(&SpiffeId::user(FLEET, role, role.as_str()));
        FleetServiceClient::new(self.channel(Some(id)).await)
    }

    async fn join_string(&self, cluster: &str, uses: u32, ttl: u32) -> String {
        let mut admin = self.user(Role::Admin).await;
        admin
            .create_join_token(v1::CreateJoinTokenRequest {
                cluster: cluster.into(),
                ttl_seconds: ttl,
                uses,
                require_approval: false,
            })
            .await
            .unwrap()
            .into_inner()
            .join
    }
}

async fn dial(addr: &str, security: Security) -> Channel {
    let dial = Dial {
        security,
        ..Dial::plaintext(Duration::from_secs(5))
    };
    flotilla_api::grpc::connect(addr, &dial).await.unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn every_rpc_needs_its_role_and_plaintext_or_foreign_certificates_are_refused() {
    let hub = hub(&[]).await;

    // Plaintext to a TLS hub gets nowhere.
    let plain = Dial::plaintext(Duration::from_secs(2));
    let refused = match flotilla_api::grpc::connect(&hub.addr, &plain).await {
        Err(_) => true,
        Ok(ch) => FleetServiceClient::new(ch)
            .list_clusters(v1::ListClustersRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was served");

    // No client certificate: only the bootstrap is open, and the error says what to do.
    let mut anon = FleetServiceClient::new(hub.channel(None).await);
    let e = anon
        .list_clusters(v1::ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("client certificate"), "{e}");

    // A viewer reads but changes nothing.
    let mut viewer = hub.user(Role::Viewer).await;
    assert_eq!(
        code(viewer.list_clusters(v1::ListClustersRequest {}).await),
        Code::Ok
    );
    let mut campaigns = v1::campaign_service_client::CampaignServiceClient::new(
        hub.channel(Some(hub.identity(&SpiffeId::user(
            FLEET,
            Role::Viewer,
            "v",
        ))))
        .await,
    );
    let e = campaigns
        .create_campaign(v1::CreateCampaignRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("needs operator"), "{e}");
    let mut discovery = v1::discovery_service_client::DiscoveryServiceClient::new(
        hub.channel(Some(hub.identity(&SpiffeId::user(
            FLEET,
            Role::Viewer,
            "v",
        ))))
        .await,
    );
    assert_eq!(
        code(discovery.set_policy(v1::SetPolicyRequest::default()).await),
        Code::PermissionDenied
    );

    // An operator runs campaigns but mints no tokens and removes no clusters.
    let op = hub.identity(&SpiffeId::user(FLEET, Role::Operator, "o"));
    let mut campaigns = v1::campaign_service_client::CampaignServiceClient::new(
        hub.channel(Some(op.clone())).await,
    );
    let c = code(
        campaigns
            .create_campaign(v1::CreateCampaignRequest::default())
            .await,
    );
    assert_ne!(
        c,
        Code::PermissionDenied,
        "an operator may create campaigns"
    );
    let mut operator = FleetServiceClient::new(hub.channel(Some(op)).await);
    let e = operator
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        code(
            operator
                .remove_cluster(v1::RemoveClusterRequest {
                    cluster: "a".into()
                })
                .await
        ),
        Code::PermissionDenied
    );

    // The store's raw API and Raft are not for people, not even admins (Raft).
    let admin_id = hub.identity(&SpiffeId::user(FLEET, Role::Admin, "root"));
    let mut kv = v1::kv_client::KvClient::new(
        hub.channel(Some(hub.identity(&SpiffeId::user(
            FLEET,
            Role::Operator,
            "o",
        ))))
        .await,
    );
    assert_eq!(
        code(kv.put(v1::PutRequest::default()).await),
        Code::PermissionDenied
    );
    let mut raft = v1::raft_client::RaftClient::new(hub.channel(Some(admin_id.clone())).await);
    assert_eq!(
        code(raft.vote(v1::RaftMessage::default()).await),
        Code::PermissionDenied
    );
    // A cluster's identity may not read the fleet.
    let mut as_cluster = FleetServiceClient::new(
        hub.channel(Some(hub.identity(&SpiffeId::cluster(FLEET, "a"))))
            .await,
    );
    assert_eq!(
        code(as_cluster.list_clusters(v1::ListClustersRequest {}).await),
        Code::PermissionDenied
    );

    // An admin mints a token; the join string pins this hub's CA.
    let mut admin = FleetServiceClient::new(hub.channel(Some(admin_id)).await);
    let t = admin
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        t.join.ends_with(&format!("@sha256:{}", hub.ca.pin())),
        "{}",
        t.join
    );

    // A certificate for another fleet, or from another CA, gets nothing.
    let other_fleet = hub.identity(&SpiffeId::user("elsewhere", Role::Admin, "x"));
    let mut foreign = FleetServiceClient::new(hub.channel(Some(other_fleet)).await);
    let e = foreign
        .list_clusters(v1::ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let (rogue, _) = Ca::generate(FLEET, now()).unwrap();
    let forged = rogue
        .issue(
            &SpiffeId::user(FLEET, Role::Admin, "x"),
            &Usage::Client,
            now(),
            3600,
        )
        .unwrap();
    let forged = Identity::from_pem(&forged.cert_pem, &forged.key_pem).unwrap();
    let tls = ClientTls::new(&hub.ca_pem, Some(forged)).unwrap();
    let dial = Dial {
        security: Security::Tls(tls),
        ..Dial::plaintext(Duration::from_secs(2))
    };
    let served = match flotilla_api::grpc::connect(&hub.addr, &dial).await {
        Err(_) => false,
        Ok(ch) => FleetServiceClient::new(ch)
            .list_clusters(v1::ListClustersRequest {})
            .await
            .is_ok(),
    };
    assert!(!served, "a certificate from another CA was accepted");

    // The audit log has the denials and the token, never its secret.
    let secret = t.token.split_once('.').unwrap().1.to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r = admin
            .list_audit(v1::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .records;
        let has_token = r
            .iter()
            .any(|a| a.action.ends_with("CreateJoinToken") && a.decision == "allowed");
        if has_token || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let find = |action: &str, who: &str, decision: &str| {
        records
            .iter()
            .any(|a| a.action.ends_with(action) && a.principal == who && a.decision == decision)
    };
    assert!(find("CreateCampaign", "viewer/v", "denied"), "{records:#?}");
    assert!(
        find("CreateJoinToken", "operator/o", "denied"),
        "{records:#?}"
    );
    assert!(
        find("CreateJoinToken", "admin/root", "allowed"),
        "{records:#?}"
    );
    assert!(find("ListClusters", "anonymous", "denied"), "{records:#?}");
    let made = records
        .iter()
        .find(|a| a.action.ends_with("CreateJoinToken") && a.decision == "allowed")
        .unwrap();
    assert_eq!(made.target, format!("token/{} cluster/a", t.id));
    assert!(
        !made.credential.is_empty() && !made.source.is_empty(),
        "{made:?}"
    );
    assert!(
        !format!("{records:?}").contains(&secret),
        "a token secret reached the audit log"
    );
    // Reads are not audited.
    assert!(
        !records
            .iter()
            .any(|a| a.action.ends_with("ListClusters") && a.decision == "allowed")
    );
}

/// An agent stream: the sender for its messages and the hub's answers.
struct Stream {
    tx: mpsc::Sender<v1::AgentMessage>,
    rx: tonic::Streaming<v1::HubMessage>,
}

fn hello(cluster: &str, token: &str, csr: Vec<u8>) -> v1::AgentMessage {
    v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Hello(v1::Hello {
            cluster: cluster.into(),
            token: token.into(),
            csr,
            ..Default::default()
        })),
    }
}

async fn open(
    ch: Channel,
    first: v1::AgentMessage,
) -> Result<(Stream, v1::Welcome), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let mut rx = AgentServiceClient::new(ch)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match rx.message().await? {
        Some(v1::HubMessage {
            msg: Some(v1::hub_message::Msg::Welcome(w)),
        }) => Ok((Stream { tx, rx }, w)),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Bootstraps `cluster` with `join` over a pinned connection; its identity on success.
async fn bootstrap(
    hub: &Hub,
    cluster: &str,
    join: &str,
) -> Result<(Stream, std::sync::Arc<Identity>, v1::IssuedCertificate), tonic::Status> {
    let j = flotilla_core::security::JoinString::parse(join).unwrap();
    let ch = dial(&hub.addr, Security::Tls(ClientTls::pinned(&j.ca_hash))).await;
    let (csr, key) = flotilla_api::pki::csr().unwrap();
    let (s, w) = open(ch, hello(cluster, &j.token.reveal(), csr)).await?;
    let cert = w.certificate.expect("a certificate for the CSR");
    let id = Identity::from_pem(&cert.certificate_pem, &key).unwrap();
    Ok((s, id, cert))
}

#[tokio::test]
async fn clusters_join_with_a_pinned_token_renew_and_are_revoked_at_once() {
    let hub = hub(&["--cert-ttl", "1h"]).await;

    // The join string's pin admits only this hub's CA.
    let join = hub.join_string("a", 1, 0).await;
    let (other, _) = Ca::generate(FLEET, now()).unwrap();
    let wrong = flotilla_api::grpc::connect(
        &hub.addr,
        &Dial {
            security: Security::Tls(ClientTls::pinned(&other.pin())),
            ..Dial::plaintext(Duration::from_secs(2))
        },
    )
    .await;
    assert!(wrong.is_err(), "a wrong pin connected");

    // A malformed CSR is refused and costs the token nothing.
    let j = flotilla_core::security::JoinString::parse(&join).unwrap();
    let pinned = || dial(&hub.addr, Security::Tls(ClientTls::pinned(&j.ca_hash)));
    let e = open(
        pinned().await,
        hello("a", &j.token.reveal(), b"not a csr".to_vec()),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("csr"), "{e}");

    // The join: a certificate for cluster a, valid for the hub's TTL.
    let (mut first, id_a, cert) = bootstrap(&hub, "a", &join).await.unwrap();
    let leaf = flotilla_api::pki::leaf(&id_a.leaf().unwrap()).unwrap();
    assert_eq!(leaf.uris, vec![SpiffeId::cluster(FLEET, "a")]);
    assert!(!leaf.is_ca);
    assert!((leaf.not_after - now() - 3600).abs() < 60, "{leaf:?}");
    assert_eq!(cert.ca_bundle_pem, hub.ca_pem);

    // The single-use token is spent.
    let e = bootstrap(&hub, "a", &join).await.err().unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("used up"), "{e}");

    // A token for a does not admit b; an expired token says so.
    let for_a = hub.join_string("a", 1, 0).await;
    let e = bootstrap(&hub, "b", &for_a).await.err().unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let short = hub.join_string("c", 1, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = bootstrap(&hub, "c", &short).await.err().unwrap();
    assert!(e.message().contains("expired"), "{e}");

    // With its certificate the cluster reconnects without a token, but only as itself.
    let with_cert = hub.channel(Some(id_a.clone())).await;
    let e = open(with_cert.clone(), hello("b", "", vec![]))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("for cluster \"a\""), "{e}");
    let (mut second, w) = open(with_cert, hello("a", "", vec![])).await.unwrap();
    assert!(w.certificate.is_none());
    drop(first.tx);
    let _ = first.rx.message().await;

    // Renewal on the stream: a new certificate from a new key.
    let (csr, key) = flotilla_api::pki::csr().unwrap();
    second
        .tx
        .send(v1::AgentMessage {
            msg: Some(v1::agent_message::Msg::Renew(v1::RenewCertificate { csr })),
        })
        .await
        .unwrap();
    let renewed = loop {
        match second.rx.message().await.unwrap() {
            Some(v1::HubMessage {
                msg: Some(v1::hub_message::Msg::Certificate(c)),
            }) => break c,
            Some(_) => continue,
            None => panic!("stream closed before the renewal"),
        }
    };
    let id_renewed = Identity::from_pem(&renewed.certificate_pem, &key).unwrap();
    let serial = |i: &Identity| flotilla_api::pki::leaf(&i.leaf().unwrap()).unwrap().serial;
    assert_ne!(serial(&id_renewed), serial(&id_a));

    // Removal revokes the identity: the open stream ends at once, and no certificate issued
    // before it connects again.
    let mut admin = hub.user(Role::Admin).await;
    admin
        .remove_cluster(v1::RemoveClusterRequest {
            cluster: "a".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match second.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the revoked cluster's stream stayed open");
    let s = ended.expect("the stream ends with the reason");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("removed"), "{s}");
    for id in [id_a, id_renewed] {
        let e = open(hub.channel(Some(id)).await, hello("a", "", vec![]))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }
    // A new token rejoins it (after the revocation time).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = hub.join_string("a", 1, 0).await;
    let (_s, id, _) = bootstrap(&hub, "a", &again).await.unwrap();
    open(hub.channel(Some(id)).await, hello("a", "", vec![]))
        .await
        .unwrap();

    let records = admin
        .list_audit(v1::ListAuditRequest {
            who: "cluster/a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert!(actions.iter().any(|a| a.ends_with(":renew")), "{actions:?}");
    assert!(
        records
            .iter()
            .any(|r| r.action.ends_with(":join") && r.decision == "denied"),
        "{records:#?}"
    );
}

#[tokio::test]
async fn a_join_can_wait_for_approval() {
    let hub = hub(&[]).await;
    let mut admin = hub.user(Role::Admin).await;
    let join = admin
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster: "gated".into(),
            require_approval: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .join;
    let e = bootstrap(&hub, "gated", &join).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("flotctl cluster approve gated"), "{e}");
    // Waiting costs no use.
    let e = bootstrap(&hub, "gated", &join).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition);
    admin
        .approve_cluster(v1::ApproveClusterRequest {
            cluster: "gated".into(),
        })
        .await
        .unwrap();
    bootstrap(&hub, "gated", &join).await.unwrap();
    let e = admin
        .approve_cluster(v1::ApproveClusterRequest {
            cluster: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

const SIM: &str = r#"
clusters:
  - name: sim-sec
    region: westeurope
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - name: h100
        count: 2
        gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}
"#;

async fn wait_ready(fleet: &mut FleetServiceClient<Channel>, name: &str, since_ms: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = fleet
            .get_cluster(v1::GetClusterRequest { name: name.into() })
            .await
        {
            let c = c.into_inner();
            let fresh = c.history.first().is_some_and(|h| h.at_unix_ms >= since_ms);
            if c.health == v1::ClusterHealth::Ready as i32 && fresh {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never became Ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn agent(
    hub: &Hub,
    config: &kube::Config,
    token: String,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), flotilla_agent::session::SessionError>> {
    let mut opts =
        flotilla_agent::AgentOptions::simulated("sim-sec", &hub.addr, token, Default::default());
    opts.identity_secret = Some(("flotilla-system".into(), "flotilla-agent-identity".into()));
    tokio::spawn(flotilla_agent::run(
        config.clone(),
        opts,
        None,
        stop.clone(),
    ))
}

#[tokio::test]
async fn a_real_agent_keeps_its_identity_in_a_secret_across_a_restart() {
    use flotilla_kube_sim::{Scenario, SimFleet, SimOptions};
    let hub = hub(&[]).await;
    let sims = SimFleet::start(&Scenario::from_yaml(SIM).unwrap(), SimOptions::default())
        .await
        .unwrap();
    let c = &sims.clusters()[0];
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let mut viewer = hub.user(Role::Viewer).await;
    let join = hub.join_string("sim-sec", 1, 0).await;
    let client = kube::Client::try_from(config.clone()).unwrap();
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": "flotilla-system"}}))
        .unwrap();
    namespaces.create(&Default::default(), &ns).await.unwrap();

    let stop = CancellationToken::new();
    let started = now() * 1000 - 1000;
    let first = agent(&hub, &config, join.clone(), &stop).await;
    wait_ready(&mut viewer, "sim-sec", started).await;

    // The certificate is in the cluster's Secret.
    let client = kube::Client::try_from(config.clone()).unwrap();
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, "flotilla-system");
    let s = secrets.get("flotilla-agent-identity").await.unwrap();
    let data = s.data.unwrap();
    let crt = String::from_utf8(data["tls.crt"].0.clone()).unwrap();
    let leaf = flotilla_api::pki::leaf(&flotilla_api::pki::certs(&crt, "t").unwrap()[0]).unwrap();
    assert_eq!(leaf.uris, vec![SpiffeId::cluster(FLEET, "sim-sec")]);

    // Restarted with the spent join string (or none), it connects with the kept identity.
    stop.cancel();
    first.await.unwrap().unwrap();
    let mut admin = hub.user(Role::Admin).await;
    let stop = CancellationToken::new();
    let restarted_at = now() * 1000;
    let second = agent(&hub, &config, String::new(), &stop).await;
    // Ready again: the health history gains a fresh entry only on a transition, so wait on
    // the agent's connection through the audit log instead.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = admin
            .list_audit(v1::ListAuditRequest {
                since_unix_ms: restarted_at,
                who: "cluster/sim-sec".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        if r.iter()
            .any(|a| a.action.ends_with(":join") && a.decision == "allowed")
        {
            break;
        }
        assert!(
            !second.is_finished(),
            "the restarted agent stopped: {:?}",
            second.await
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted agent never rejoined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    second.await.unwrap().unwrap();
}

/// GET `path` over HTTPS (HTTP/1.1) from the hub's HTTP port, trusting `ca_pem`, presenting
/// `identity` and `bearer` if given; the status line.
async fn https_get(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<std::sync::Arc<Identity>>,
    bearer: Option<&str>,
    path: &str,
) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in flotilla_api::pki::certs(ca_pem, "ca").unwrap() {
        roots.add(c).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => b.with_client_cert_resolver(id),
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn metrics_need_a_fleet_certificate_or_the_token_and_probes_stay_open() {
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "scrape-me\n").unwrap();
    let hub = hub(&["--metrics-token-file", token_file.to_str().unwrap()]).await;
    let http = hub._running.http_addr;
    // Plain HTTP gets no answer.
    let plain = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
    .await;
    assert!(!plain.contains("200"), "{plain}");
    let ca = &hub.ca_pem;
    assert!(
        https_get(http, ca, None, None, "/healthz")
            .await
            .unwrap()
            .contains("200")
    );
    assert!(
        https_get(http, ca, None, None, "/metrics")
            .await
            .unwrap()
            .contains("401")
    );
    assert!(
        https_get(http, ca, None, Some("wrong"), "/metrics")
            .await
            .unwrap()
            .contains("401")
    );
    assert!(
        https_get(http, ca, None, Some("scrape-me"), "/metrics")
            .await
            .unwrap()
            .contains("200")
    );
    let viewer = hub.identity(&SpiffeId::user(FLEET, Role::Viewer, "prometheus"));
    assert!(
        https_get(http, ca, Some(viewer), None, "/metrics")
            .await
            .unwrap()
            .contains("200")
    );
}

#[tokio::test]
async fn a_bearer_token_speaks_for_its_role_until_revoked() {
    let hub = hub(&[]).await;
    let mut admin = hub.user(Role::Admin).await;
    let t = admin
        .create_api_token(v1::CreateApiTokenRequest {
            name: "grafana".into(),
            role: "viewer".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let e = admin
        .create_api_token(v1::CreateApiTokenRequest {
            name: "x".into(),
            role: "root".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // TLS without a client certificate; the token in every request's metadata.
    let ch = hub.channel(None).await;
    fn with<T>(token: &str, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }
    let mut fleet = FleetServiceClient::new(ch.clone());
    // Mirrored a moment after the write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fleet
        .list_clusters(with(&t.token, v1::ListClustersRequest {}))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token never worked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut campaigns = v1::campaign_service_client::CampaignServiceClient::new(ch.clone());
    let e = campaigns
        .create_campaign(with(&t.token, v1::CreateCampaignRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("viewer/grafana"), "{e}");
    let forged = format!("{}.{}", t.id, "0".repeat(32));
    let e = fleet
        .list_clusters(with(&forged, v1::ListClustersRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    // Revoked: refused from the next call the mirror has seen.
    admin
        .revoke_api_token(v1::RevokeApiTokenRequest { id: t.id.clone() })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fleet
        .list_clusters(with(&t.token, v1::ListClustersRequest {}))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a revoked token kept working"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = admin
        .list_api_tokens(v1::ListApiTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(listed.is_empty(), "{listed:?}");
    let records = admin
        .list_audit(v1::ListAuditRequest {
            who: "viewer/grafana".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        records.iter().any(|r| r.action.ends_with("CreateCampaign")
            && r.credential == format!("apitoken {}", t.id)),
        "{records:#?}"
    );
}
