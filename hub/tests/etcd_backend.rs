//! The hub's etcd backend (feature `etcd`, and an `etcd` binary; each test skips with the
//! reason when either is missing): the store conformance battery, prefixes that keep fleets
//! apart, and leadership by etcd election.

#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_backend_tests_need_the_etcd_feature() {
    println!("SKIP: built without the `etcd` feature (cargo test -p flotilla-hub --features etcd)");
}

#[cfg(feature = "etcd")]
mod with_etcd {
    use std::time::Duration;

    use flotilla_core::kv::{KeyRange, KvBackend, KvError, Limits, RangeRequest, TxnRequest};
    use flotilla_hub::controllers::Leadership;
    use flotilla_hub::store::etcd::{EtcdConfig, EtcdKv, EtcdLeadership};
    use flotilla_test_support::{kv_battery, start_etcd, wait_until};
    use tokio_util::sync::CancellationToken;

    const LIMIT: Duration = Duration::from_secs(30);

    async fn kv(url: &str, prefix: &str) -> EtcdKv {
        let config = EtcdConfig {
            prefix: prefix.into(),
            ..EtcdConfig::new(vec![url.into()])
        };
        // etcd accepts connections a moment before it serves.
        let mut last = None;
        for _ in 0..100 {
            match EtcdKv::connect(&config, Limits::default()).await {
                Ok(kv) => match kv.range(RangeRequest::new(KeyRange::key("/ping"))).await {
                    Ok(_) => return kv,
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd at {url} never served: {last:?}");
    }

    /// etcd with TLS and client-certificate authentication: the hub connects with its client
    /// certificate, and is refused without one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hub_reaches_an_etcd_that_requires_client_certificates() {
        use flotilla_api::pki::{Ca, Usage};
        use flotilla_hub::store::etcd::EtcdTls;
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let (ca, pair) = Ca::generate("etcd", now).unwrap();
        let server = ca
            .issue(
                "spiffe://etcd/hub/etcd",
                &Usage::Peer(vec!["127.0.0.1".into()]),
                now,
                3600,
            )
            .unwrap();
        let client = ca
            .issue("spiffe://etcd/hub/1", &Usage::Client, now, 3600)
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.crt"), &pair.cert_pem).unwrap();
        std::fs::write(p("etcd.crt"), &server.cert_pem).unwrap();
        std::fs::write(p("etcd.key"), &server.key_pem).unwrap();
        let tls = Some((p("etcd.crt"), p("etcd.key"), p("ca.crt")));
        let tls = tls
            .as_ref()
            .map(|(a, b, c)| (a.as_path(), b.as_path(), c.as_path()));
        let Some((_etcd, url)) = flotilla_test_support::start_etcd_with(dir.path(), tls).await
        else {
            return;
        };
        assert!(url.starts_with("https://"));
        let with = |identity| EtcdConfig {
            tls: Some(EtcdTls {
                ca_pem: pair.cert_pem.clone(),
                identity,
            }),
            ..EtcdConfig::new(vec![url.clone()])
        };
        let mut last = None;
        let mut kv = None;
        for _ in 0..100 {
            match EtcdKv::connect(
                &with(Some((client.cert_pem.clone(), client.key_pem.clone()))),
                Limits::default(),
            )
            .await
            {
                Ok(k) => match k.range(RangeRequest::new(KeyRange::key("/ping"))).await {
                    Ok(_) => {
                        kv = Some(k);
                        break;
                    }
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kv = kv.unwrap_or_else(|| panic!("etcd over TLS never served: {last:?}"));
        kv.txn(TxnRequest::put("/tls/x", "1")).await.unwrap();
        let r = kv
            .range(RangeRequest::new(KeyRange::key("/tls/x")))
            .await
            .unwrap();
        assert_eq!(r.kvs[0].value, b"1");
        // Without a client certificate etcd refuses the hub.
        let refused = match EtcdKv::connect(&with(None), Limits::default()).await {
            Err(_) => true,
            Ok(k) => k
                .range(RangeRequest::new(KeyRange::key("/tls/x")))
                .await
                .is_err(),
        };
        assert!(refused, "etcd served a hub without a client certificate");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_passes_the_battery() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        let b = kv(&url, "/flotilla/").await;
        kv_battery::run(&b, "/battery/", true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fleet_larger_than_one_grpc_message_loads_and_watches() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        let b = kv(&url, "/flotilla/").await;
        // Six 1 MiB records: one range of them is beyond tonic's default 4 MiB.
        let r0 = b
            .range(RangeRequest::new(KeyRange::key("/ping")))
            .await
            .unwrap()
            .revision;
        for i in 0..6 {
            b.txn(TxnRequest::put(
                format!("/inventory/c{i}"),
                vec![b'x'; 1 << 20],
            ))
            .await
            .unwrap();
        }
        let r = b
            .range(RangeRequest::new(KeyRange::prefix("/inventory/")))
            .await
            .unwrap();
        assert_eq!(r.kvs.len(), 6);
        let mut w = b
            .watch(flotilla_core::kv::WatchRequest {
                range: KeyRange::prefix("/inventory/"),
                start_revision: r0 + 1,
                prev_kv: false,
            })
            .await
            .unwrap();
        use futures::StreamExt;
        let mut seen = 0;
        while seen < 6 {
            let batch = tokio::time::timeout(LIMIT, w.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen += batch.events.len();
        }
    }

    /// etcd sends GOAWAY (too_many_pings) to a client that pings more often than its
    /// `--grpc-keepalive-min-time` (5 s by default). With the hub's old 2 s keep-alive every
    /// watch on the connection failed within about 13 s; nothing may fail here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_watch_outlives_etcds_ping_policy() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        let b = kv(&url, "/flotilla/").await;
        let mut w = b
            .watch(flotilla_core::kv::WatchRequest {
                range: KeyRange::prefix("/quiet/"),
                start_revision: 0,
                prev_kv: false,
            })
            .await
            .unwrap();
        // 20 s: a few times the window in which the old settings lost the connection.
        match tokio::time::timeout(Duration::from_secs(20), w.next()).await {
            Err(_) => {}
            Ok(got) => panic!("the quiet watch ended or errored: {got:?}"),
        }
        let r = b.range(RangeRequest::new(KeyRange::key("/ping"))).await;
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefixes_keep_fleets_apart_and_keys_must_start_with_a_slash() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        let a = kv(&url, "/fleet-a/").await;
        let b = kv(&url, "/fleet-a2/").await;
        a.txn(TxnRequest::put("/clusters/x", "a")).await.unwrap();
        b.txn(TxnRequest::put("/clusters/y", "b")).await.unwrap();
        let all = |s: &EtcdKv| {
            let s = s.clone();
            async move {
                let r = s
                    .range(RangeRequest::new(KeyRange::prefix("")))
                    .await
                    .unwrap();
                r.kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
            }
        };
        // "/fleet-a" is a string prefix of "/fleet-a2": the namespace ends at its '/'.
        assert_eq!(all(&a).await, [b"/clusters/x".to_vec()]);
        assert_eq!(all(&b).await, [b"/clusters/y".to_vec()]);
        let e = a.txn(TxnRequest::put("clusters/z", "v")).await.unwrap_err();
        assert!(
            matches!(&e, KvError::InvalidArgument { field, .. } if field == "success[0].put.key"),
            "{e:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_leads_and_a_resigning_leader_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        kv(&url, "/flotilla/").await;
        let config = EtcdConfig {
            lease_ttl: Duration::from_secs(2),
            ..EtcdConfig::new(vec![url.clone()])
        };
        let tokens = [CancellationToken::new(), CancellationToken::new()];
        let mut replicas = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let l = EtcdLeadership::start(&config, format!("hub-{i}:7400"), t.clone())
                .await
                .unwrap();
            replicas.push(l);
        }
        let leaders = |rs: &[EtcdLeadership]| rs.iter().filter(|l| l.is_leader()).count();
        wait_until("one leader", LIMIT, || async { leaders(&replicas) == 1 }).await;
        let first = replicas.iter().position(|l| l.is_leader()).unwrap();
        let other = 1 - first;
        wait_until("both know the leader", LIMIT, || async {
            replicas
                .iter()
                .all(|l| l.leader_addr() == Some(format!("hub-{first}:7400")))
        })
        .await;
        let term = replicas[first].term();
        assert!(term > 0);
        // Never two leaders, while it lasts.
        for _ in 0..20 {
            assert_eq!(leaders(&replicas), 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The leader stops (shutdown revokes its lease): the other takes over, well before
        // the lease's TTL would have run out.
        tokens[first].cancel();
        wait_until("the other replica leads", LIMIT, || async {
            replicas[other].is_leader() && !replicas[first].is_leader()
        })
        .await;
        wait_until("its address is the leader's", LIMIT, || async {
            replicas[other].leader_addr() == Some(format!("hub-{other}:7400"))
        })
        .await;
        assert!(
            replicas[other].term() > term,
            "a new leadership has a higher term"
        );
        tokens[other].cancel();
    }

    async fn ready_clusters(addr: std::net::SocketAddr) -> Vec<String> {
        use flotilla_api::v1;
        let Some(ch) = flotilla_test_support::channel(addr.port()).await else {
            return Vec::new();
        };
        let mut c = v1::fleet_service_client::FleetServiceClient::new(ch);
        let Ok(r) = c.list_clusters(v1::ListClustersRequest {}).await else {
            return Vec::new();
        };
        r.into_inner()
            .clusters
            .into_iter()
            .filter(|c| c.health == v1::ClusterHealth::Ready as i32 && c.physical_gpus > 0)
            .map(|c| c.name)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dev_fleet_runs_on_etcd_and_a_second_replica_serves_it() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        kv(&url, "/flotilla/").await;
        let hub = |extra: &[&str]| {
            let mut a = vec![
                "flotilla-hub",
                "--store",
                "etcd",
                "--etcd-endpoints",
                &url,
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--agent-heartbeat",
                "200ms",
            ];
            a.extend_from_slice(extra);
            flotilla_hub::Args::parse_from(a)
        };
        let shutdown = CancellationToken::new();
        let dev = flotilla_hub::start(hub(&["--dev"]), shutdown.clone())
            .await
            .unwrap();
        let replica = flotilla_hub::start(hub(&["--insecure"]), shutdown.clone())
            .await
            .unwrap();
        let (a, b) = (dev.addr, replica.addr);
        wait_until("the three dev clusters Ready", LIMIT, || async {
            ready_clusters(a).await.len() == 3
        })
        .await;
        // Any replica serves reads from its own watch-fed view of the same etcd.
        wait_until("the second replica sees them", LIMIT, || async {
            ready_clusters(b).await.len() == 3
        })
        .await;
        assert_eq!(
            [dev.store.is_leader(), replica.store.is_leader()]
                .iter()
                .filter(|l| **l)
                .count(),
            1,
            "exactly one replica leads"
        );
        // The fleet API and the health controller read the watch-fed view, not etcd: a burst
        // of reads on both replicas, and a few seconds of heartbeats, send no etcd range.
        let etcd_ranges = || -> u64 {
            [&dev.store, &replica.store]
                .iter()
                .map(|s| match s {
                    flotilla_hub::store::backend::HubStore::Etcd(kv, _) => {
                        kv.sent().ranges.load(std::sync::atomic::Ordering::Relaxed)
                    }
                    _ => unreachable!("both hubs run on etcd"),
                })
                .sum()
        };
        let before = etcd_ranges();
        for addr in [a, b] {
            let ch = flotilla_test_support::channel(addr.port()).await.unwrap();
            let mut c = flotilla_api::v1::fleet_service_client::FleetServiceClient::new(ch);
            for _ in 0..20 {
                c.list_clusters(flotilla_api::v1::ListClustersRequest {})
                    .await
                    .unwrap();
                c.capacity(flotilla_api::v1::CapacityRequest::default())
                    .await
                    .unwrap();
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(etcd_ranges(), before, "fleet reads went to etcd");
        // The records are etcd's, under the prefix.
        let e = kv(&url, "/flotilla/").await;
        let r = e
            .range(RangeRequest::new(KeyRange::prefix("/clusters/")))
            .await
            .unwrap();
        assert_eq!(r.kvs.len(), 3);
        shutdown.cancel();
        dev.wait().await.unwrap();
        replica.wait().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_kv_api_of_a_hub_on_etcd_passes_the_battery() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let Some((_etcd, url)) = start_etcd(dir.path()).await else {
            return;
        };
        kv(&url, "/flotilla/").await;
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
        let shutdown = CancellationToken::new();
        let hub = flotilla_hub::start(args, shutdown.clone()).await.unwrap();
        // The battery counts revisions, and etcd's are global: let the election's one write
        // happen first.
        wait_until("the hub leads", LIMIT, || async { hub.store.is_leader() }).await;
        let client =
            flotilla_raft_store::client::StoreClient::new(&[hub.addr.to_string()]).unwrap();
        kv_battery::run(&client, "/battery/", true).await;
        shutdown.cancel();
        hub.wait().await.unwrap();
    }
}
