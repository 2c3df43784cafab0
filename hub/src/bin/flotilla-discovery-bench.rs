//! Failover convergence: how long from a health change in a simulated cluster to a changed DNS
//! answer from the hub. A one-member hub with DNS, two simulated clusters exporting the same
//! service, a policy that prefers cluster `a`, real agents; DNS is asked over UDP every 2 ms.
//!
//! ```text
//! cargo build --release -p flotilla-hub
//! ./target/release/flotilla-discovery-bench --trials 100 --kill-trials 10
//! ```
//!
//! - endpoint trials: every pod behind `a`'s export turns unready (kube-sim's readiness fault)
//!   → the answer is `b`'s address; then ready again → `a`'s.
//! - agent trials: `a`'s agent stops → the answer is `b`'s once `a` is Unreachable
//!   (`--unreachable-after`, 3 s by default); then the agent starts again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_api::v1;
use flotilla_dns::proto::op::{Message, Query};
use flotilla_dns::proto::rr::{Name, RData, RecordType};
use flotilla_kube_sim::{Fault, Scenario, SimCluster, SimFleet, SimOptions};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Health change → DNS answer convergence")]
struct Args {
    /// Endpoint trials.
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Agent-kill trials.
    #[arg(long, default_value_t = 10)]
    kill_trials: usize,
    /// The hub's --unreachable-after.
    #[arg(long, default_value = "3s", value_parser = flotilla_core::duration::parse)]
    unreachable_after: Duration,
}

const SIM: &str = r#"
clusters:
  - name: a
    region: eu-west
    provider: aks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, gpus: 1, service: {port: 8000, type: LoadBalancer}, export: true}
  - name: b
    region: us-east
    provider: eks
    timing: {node_ready_ms: 50, device_plugin_ms: 50, pod_start_ms: 20}
    pools:
      - {name: h100, count: 1, gpu: {vendor: nvidia, product: NVIDIA-H100-80GB-HBM3, memory_mib: 81559, count: 8, family: hopper}}
    workloads:
      - {name: llm, namespace: ml, replicas: 2, gpus: 1, service: {port: 8000, type: LoadBalancer}, export: true}
"#;

const NAME: &str = "llm.ml.svc.clusterset.local.";

async fn answer(dns: SocketAddr, sock: &tokio::net::UdpSocket) -> Vec<String> {
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii(NAME).expect("name"),
        RecordType::A,
    ));
    let id = m.metadata.id;
    if sock
        .send_to(&m.to_vec().expect("encode"), dns)
        .await
        .is_err()
    {
        return vec![];
    }
    let mut buf = vec![0; 2048];
    loop {
        let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
        else {
            return vec![];
        };
        let Ok(r) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if r.metadata.id != id {
            continue;
        }
        let mut v: Vec<String> = r
            .answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        v.sort();
        return v;
    }
}

/// Time from `since` until the answer is exactly `[want]`.
async fn until(
    dns: SocketAddr,
    want: &str,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    loop {
        if answer(dns, &sock).await == [want.to_string()] {
            return Ok(since.elapsed());
        }
        if since.elapsed() > limit {
            bail!("the answer never became {want}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn kube_config(c: &SimCluster) -> anyhow::Result<kube::Config> {
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig())?;
    Ok(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)
}

async fn kube_client(c: &SimCluster) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::from_yaml(&c.kubeconfig())?;
    Ok(kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?)
}

fn start_agent(
    hub: SocketAddr,
    cluster: &str,
    token: &str,
    config: kube::Config,
    stop: CancellationToken,
) {
    let opts = flotilla_agent::AgentOptions::simulated(
        cluster,
        &hub.to_string(),
        token.into(),
        Default::default(),
    );
    tokio::spawn(flotilla_agent::run(config, opts, None, stop));
}

fn summary(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| {
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e3
    };
    println!(
        "| {what} | {} | {:.0} | {:.0} | {:.0} |",
        v.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    let ua = format!("{}ms", args.unreachable_after.as_millis());
    let hub_args = <flotilla_hub::Args as clap::Parser>::parse_from([
        "flotilla-hub",
        "--insecure",
        "--data-dir",
        &d,
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
        "--unreachable-after",
        &ua,
        // A new leader waits this long before judging liveness; the agent trials measure the
        // steady state, not the first seconds after the hub starts.
        "--leader-grace",
        "1s",
    ]);
    let shutdown = CancellationToken::new();
    let hub = flotilla_hub::start(hub_args, shutdown.clone()).await?;
    let dns = hub.dns_addr.context("dns")?;
    while !hub.fleet.health.active() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", hub.addr))?
        .connect()
        .await?;
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(ch.clone());
    let mut disc = v1::discovery_service_client::DiscoveryServiceClient::new(ch);
    disc.set_policy(v1::SetPolicyRequest {
        namespace: "ml".into(),
        name: "llm".into(),
        spec_json: r#"{"tiers":[{"selector":{"matchLabels":{"region":"eu-west"}}},{}]}"#.into(),
    })
    .await?;
    let sims = SimFleet::start(&Scenario::from_yaml(SIM)?, SimOptions::default()).await?;
    let (a, b) = (
        sims.cluster("a").context("a")?,
        sims.cluster("b").context("b")?,
    );
    let mut tokens = Vec::new();
    for c in [a, b] {
        let t = fleet
            .create_join_token(v1::CreateJoinTokenRequest {
                cluster: c.name().into(),
                ttl_seconds: 86_400,
                ..Default::default()
            })
            .await?
            .into_inner()
            .token;
        tokens.push(t);
    }
    let mut a_stop = shutdown.child_token();
    start_agent(
        hub.addr,
        "a",
        &tokens[0],
        kube_config(a).await?,
        a_stop.clone(),
    );
    start_agent(
        hub.addr,
        "b",
        &tokens[1],
        kube_config(b).await?,
        shutdown.child_token(),
    );
    let lb = |c: &SimCluster| {
        let c = c.clone();
        async move {
            let svc: Api<Service> = Api::namespaced(kube_client(&c).await?, "ml");
            let s = svc.get("llm").await?;
            anyhow::Ok(
                s.status
                    .and_then(|s| s.load_balancer?.ingress?.first()?.ip.clone())
                    .context("no ingress")?,
            )
        }
    };
    let (ip_a, ip_b) = (lb(a).await?, lb(b).await?);
    until(dns, &ip_a, Instant::now(), Duration::from_secs(60))
        .await
        .context("the first answer")?;
    let pods: Vec<String> = Api::<Pod>::namespaced(kube_client(a).await?, "ml")
        .list(&ListParams::default().labels("app=llm"))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let faults: Vec<Fault> = pods
        .iter()
        .map(|p| Fault::PodUnready {
            namespace: "ml".into(),
            pod: p.clone(),
        })
        .collect();

    let (mut away, mut back) = (Vec::new(), Vec::new());
    for _ in 0..args.trials {
        let t0 = Instant::now();
        for f in &faults {
            a.inject(f).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        away.push(until(dns, &ip_b, t0, Duration::from_secs(30)).await?);
        let t1 = Instant::now();
        for f in &faults {
            a.clear(f);
        }
        back.push(until(dns, &ip_a, t1, Duration::from_secs(30)).await?);
    }
    let (mut dead, mut revived) = (Vec::new(), Vec::new());
    for _ in 0..args.kill_trials {
        let t0 = Instant::now();
        a_stop.cancel();
        dead.push(
            until(
                dns,
                &ip_b,
                t0,
                args.unreachable_after * 4 + Duration::from_secs(10),
            )
            .await?,
        );
        a_stop = shutdown.child_token();
        let t1 = Instant::now();
        start_agent(
            hub.addr,
            "a",
            &tokens[0],
            kube_config(a).await?,
            a_stop.clone(),
        );
        revived.push(until(dns, &ip_a, t1, Duration::from_secs(60)).await?);
    }
    println!("# hub --unreachable-after {ua}, agent heartbeat 1s; DNS polled every 2 ms over UDP");
    println!("| change → changed DNS answer | trials | p50 (ms) | p99 (ms) | max (ms) |");
    println!("| --- | --- | --- | --- | --- |");
    summary("endpoints unready in the preferred cluster", away);
    summary("endpoints ready again", back);
    if args.kill_trials > 0 {
        summary("preferred cluster's agent killed", dead);
        summary("agent started again", revived);
    }
    shutdown.cancel();
    sims.shutdown().await;
    Ok(())
}
