//! The MCS DNS specification as a table of cases, asked over real UDP and TCP of a running
//! server, plus the protocol edges: EDNS, Client Subnet, truncation, REFUSED, malformed
//! packets and a table swap.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_core::export::{Endpoint, Export, Port, Protocol, ServiceKey, ServiceType, aggregate};
use flotilla_core::health::Health;
use flotilla_core::routing::{Cidr, ClusterState, RoutingPolicy};
use flotilla_core::routing_table::{RoutingTable, TableInputs};
use flotilla_dns::{DnsServer, MAX_UDP_PAYLOAD, SharedTable, Zones};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(addr: &str, host: &str, ready: bool) -> Endpoint {
    Endpoint {
        address: ip(addr),
        hostname: host.into(),
        zone: String::new(),
        ready,
        serving: ready,
        terminating: false,
    }
}

fn export(cluster: &str, name: &str, t: ServiceType, addrs: &[&str], eps: Vec<Endpoint>) -> Export {
    Export {
        cluster: cluster.into(),
        namespace: "ml".into(),
        name: name.into(),
        service_type: Some(t),
        ports: vec![
            Port {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8000,
                app_protocol: None,
            },
            Port {
                name: "grpc".into(),
                protocol: Protocol::Tcp,
                port: 9000,
                app_protocol: Some("grpc".into()),
            },
        ],
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        endpoints: eps,
        created_at_unix_ms: 1,
        ..Export::default()
    }
}

fn fixture_exports() -> Vec<Export> {
    use ServiceType::*;
    let mut v = vec![
        export(
            "a",
            "llm",
            ClusterSetIp,
            &["192.0.2.1"],
            vec![ep("10.1.0.9", "", true)],
        ),
        export(
            "b",
            "llm",
            ClusterSetIp,
            &["192.0.2.2"],
            vec![ep("10.2.0.9", "", true)],
        ),
        export(
            "a",
            "db",
            Headless,
            &[],
            vec![ep("10.1.0.1", "db-0", true), ep("10.1.0.2", "db-1", false)],
        ),
        export("b", "db", Headless, &[], vec![ep("10.2.0.1", "", true)]),
        export(
            "c",
            "empty",
            Headless,
            &[],
            vec![ep("10.3.0.1", "x", false)],
        ),
        export(
            "a",
            "v6",
            ClusterSetIp,
            &["2001:db8::1"],
            vec![ep("fd00::1", "", true)],
        ),
        export(
            "a",
            "local",
            ClusterSetIp,
            &["192.0.2.11"],
            vec![ep("10.1.0.3", "", true)],
        ),
        export(
            "b",
            "local",
            ClusterSetIp,
            &["192.0.2.12"],
            vec![ep("10.2.0.3", "", true)],
        ),
        export(
            "a",
            "big",
            Headless,
            &[],
            (0..100)
                .map(|i| ep(&format!("10.1.1.{i}"), &format!("p{i}"), true))
                .collect(),
        ),
    ];
    // `dead` is exported only from an Unreachable cluster.
    v.push(export(
        "d",
        "dead",
        ClusterSetIp,
        &["192.0.2.4"],
        vec![ep("10.4.0.1", "", true)],
    ));
    v
}

fn table(exports: &[Export], generation: u64) -> RoutingTable {
    let services = aggregate(exports);
    let mut policies = BTreeMap::new();
    policies.insert(
        ServiceKey::new("ml", "local"),
        RoutingPolicy {
            local_first: true,
            ..Default::default()
        },
    );
    policies.insert(
        ServiceKey::new("ml", "big"),
        RoutingPolicy {
            max_answers: 64,
            ..Default::default()
        },
    );
    let clusters: BTreeMap<String, ClusterState> = [
        ("a", Health::Ready),
        ("b", Health::Ready),
        ("c", Health::Ready),
        ("d", Health::Unreachable),
    ]
    .iter()
    .map(|(n, h)| {
        (
            n.to_string(),
            ClusterState {
                name: n.to_string(),
                health: Some(*h),
                region: "eu".into(),
                ..Default::default()
            },
        )
    })
    .collect();
    let networks: Vec<(Cidr, String)> = vec![
        ("10.1.0.0/16".parse().unwrap(), "a".into()),
        ("10.2.0.0/16".parse().unwrap(), "b".into()),
    ];
    RoutingTable::build(
        generation,
        TableInputs {
            services: &services,
            policies: &policies,
            default_policy: &RoutingPolicy::default(),
            clusters: &clusters,
            regions: &std::sync::Arc::new(
                clusters
                    .values()
                    .map(|c| (c.name.clone(), c.region.clone()))
                    .collect(),
            ),
            loads: &BTreeMap::new(),
            networks: &std::sync::Arc::new(flotilla_core::routing::NetworkIndex::new(
                networks.iter().map(|(n, c)| (n, c.as_str())),
            )),
            now_unix_ms: 0,
        },
        None,
    )
}

struct Running {
    addr: SocketAddr,
    table: SharedTable,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Running {
    start_with(flotilla_dns::RrlConfig::default()).await
}

async fn start_with(rrl: flotilla_dns::RrlConfig) -> Running {
    let shared: SharedTable = Arc::new(ArcSwap::from_pointee(table(&fixture_exports(), 1)));
    let zones = Zones::new(Some("fleet.example.com")).unwrap();
    let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), zones, shared.clone())
        .await
        .unwrap()
        .with_rate_limit(rrl);
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    Running {
        addr,
        table: shared,
        shutdown,
    }
}

#[derive(Clone, Copy, Default)]
struct Opts {
    tcp: bool,
    edns: Option<u16>,
    edns_version: u8,
    subnet: Option<(&'static str, u8)>,
    class: Option<DNSClass>,
}

fn build(name: &str, t: RecordType, o: Opts) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    let mut q = Query::query(Name::from_ascii(name).unwrap(), t);
    if let Some(c) = o.class {
        q.set_query_class(c);
    }
    m.add_query(q);
    if let Some(p) = o.edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        e.set_version(o.edns_version);
        if let Some((a, prefix)) = o.subnet {
            e.options_mut()
                .insert(EdnsOption::Subnet(ClientSubnet::new(ip(a), prefix, 0)));
        }
        m.set_edns(e);
    }
    m
}

async fn exchange(addr: SocketAddr, bytes: &[u8], tcp: bool) -> Message {
    let fut = async {
        if tcp {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&(bytes.len() as u16).to_be_bytes())
                .await
                .unwrap();
            s.write_all(bytes).await.unwrap();
            let n = s.read_u16().await.unwrap() as usize;
            let mut buf = vec![0; n];
            s.read_exact(&mut buf).await.unwrap();
            Message::from_vec(&buf).unwrap()
        } else {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.send_to(bytes, addr).await.unwrap();
            let mut buf = vec![0; 65535];
            let (n, _) = s.recv_from(&mut buf).await.unwrap();
            assert!(
                n <= usize::from(MAX_UDP_PAYLOAD).max(512),
                "UDP reply of {n} bytes"
            );
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("the server answers within 10 s")
}

async fn ask(addr: SocketAddr, name: &str, t: RecordType, o: Opts) -> Message {
    let q = build(name, t, o);
    let r = exchange(addr, &q.to_vec().unwrap(), o.tcp).await;
    assert_eq!(r.metadata.id, q.metadata.id);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    r
}

/// The answer section as sorted text: `A 1.2.3.4`, `SRV 0 100 8000 target.`, `TXT 1.0.0`.
fn rdata(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => format!("A {}", a.0),
            RData::AAAA(a) => format!("AAAA {}", a.0),
            RData::SRV(s) => format!("SRV {} {} {} {}", s.priority, s.weight, s.port, s.target),
            RData::TXT(t) => format!("TXT {t}"),
            RData::SOA(s) => format!("SOA {}", s.mname),
            RData::NS(n) => format!("NS {}", n.0),
            other => format!("{other:?}"),
        })
        .collect();
    v.sort();
    v
}

enum Want {
    Records(&'static [&'static str]),
    NoData,
    NxDomain,
    Refused,
}

const S: &str = "svc.clusterset.local.";

#[tokio::test]
async fn every_record_form_of_the_mcs_dns_spec() {
    let r = start().await;
    use RecordType::*;
    use Want::*;
    let cases: Vec<(String, RecordType, Want)> = vec![
        (
            "dns-version.clusterset.local.".into(),
            TXT,
            Records(&["TXT 1.0.0"]),
        ),
        ("dns-version.clusterset.local.".into(), A, NoData),
        (
            "clusterset.local.".into(),
            SOA,
            Records(&["SOA ns.dns.clusterset.local."]),
        ),
        (
            "clusterset.local.".into(),
            NS,
            Records(&["NS ns.dns.clusterset.local."]),
        ),
        ("clusterset.local.".into(), A, NoData),
        // ClusterSetIP: the answered clusters' addresses; no per-cluster names.
        (
            format!("llm.ml.{S}"),
            A,
            Records(&["A 192.0.2.1", "A 192.0.2.2"]),
        ),
        (
            "LLM.Ml.SVC.ClusterSet.Local.".to_string(),
            A,
            Records(&["A 192.0.2.1", "A 192.0.2.2"]),
        ),
        (format!("llm.ml.{S}"), AAAA, NoData),
        (format!("llm.ml.{S}"), TXT, NoData),
        (
            format!("_http._tcp.llm.ml.{S}"),
            SRV,
            Records(&["SRV 0 100 8000 llm.ml.svc.clusterset.local."]),
        ),
        (
            format!("_grpc._tcp.llm.ml.{S}"),
            SRV,
            Records(&["SRV 0 100 9000 llm.ml.svc.clusterset.local."]),
        ),
        (format!("_http._udp.llm.ml.{S}"), SRV, NxDomain),
        (format!("_nope._tcp.llm.ml.{S}"), SRV, NxDomain),
        (format!("_tcp.llm.ml.{S}"), SRV, NoData),
        (format!("a.llm.ml.{S}"), A, NxDomain),
        (format!("x.a.llm.ml.{S}"), A, NxDomain),
        (format!("v6.ml.{S}"), AAAA, Records(&["AAAA 2001:db8::1"])),
        (format!("v6.ml.{S}"), A, NoData),
        // Headless: ready endpoints only, per-host names, SRV at them.
        (
            format!("db.ml.{S}"),
            A,
            Records(&["A 10.1.0.1", "A 10.2.0.1"]),
        ),
        (format!("db-0.a.db.ml.{S}"), A, Records(&["A 10.1.0.1"])),
        (format!("DB-0.A.db.ml.{S}"), A, Records(&["A 10.1.0.1"])),
        (format!("db-1.a.db.ml.{S}"), A, NxDomain),
        (format!("10-2-0-1.b.db.ml.{S}"), A, Records(&["A 10.2.0.1"])),
        (format!("db-0.b.db.ml.{S}"), A, NxDomain),
        (format!("a.db.ml.{S}"), A, NoData),
        (format!("z.db.ml.{S}"), A, NxDomain),
        (
            format!("_http._tcp.db.ml.{S}"),
            SRV,
            Records(&[
                "SRV 0 1 8000 10-2-0-1.b.db.ml.svc.clusterset.local.",
                "SRV 0 1 8000 db-0.a.db.ml.svc.clusterset.local.",
            ]),
        ),
        (format!("empty.ml.{S}"), A, NxDomain),
        // A service only an Unreachable cluster exports exists, but nobody answers for it.
        (format!("dead.ml.{S}"), A, NoData),
        // Empty non-terminals and missing names.
        (format!("ml.{S}"), A, NoData),
        (S.into(), A, NoData),
        (format!("nope.{S}"), A, NxDomain),
        (format!("missing.ml.{S}"), A, NxDomain),
        ("other.clusterset.local.".into(), A, NxDomain),
        // The global zone: the same names without `svc`.
        (
            "llm.ml.fleet.example.com.".into(),
            A,
            Records(&["A 192.0.2.1", "A 192.0.2.2"]),
        ),
        (
            "_http._tcp.llm.ml.fleet.example.com.".into(),
            SRV,
            Records(&["SRV 0 100 8000 llm.ml.fleet.example.com."]),
        ),
        (
            "db-0.a.db.ml.fleet.example.com.".into(),
            A,
            Records(&["A 10.1.0.1"]),
        ),
        (
            "fleet.example.com.".into(),
            SOA,
            Records(&["SOA ns.fleet.example.com."]),
        ),
        (
            "fleet.example.com.".into(),
            NS,
            Records(&["NS ns.fleet.example.com."]),
        ),
        ("missing.ml.fleet.example.com.".into(), A, NxDomain),
        // Outside the zones.
        ("example.com.".into(), A, Refused),
        ("local.".into(), A, Refused),
    ];
    for tcp in [false, true] {
        for (name, t, want) in &cases {
            let m = ask(
                r.addr,
                name,
                *t,
                Opts {
                    tcp,
                    ..Default::default()
                },
            )
            .await;
            let what = format!("{name} {t} over {}", if tcp { "tcp" } else { "udp" });
            let soa_in_authority = m
                .authorities
                .iter()
                .any(|a| a.record_type() == RecordType::SOA);
            match want {
                Records(recs) => {
                    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{what}");
                    assert_eq!(rdata(&m), *recs, "{what}");
                    assert!(m.metadata.authoritative, "{what}: AA");
                    assert!(
                        m.answers
                            .iter()
                            .all(|a| a.name.to_string().eq_ignore_ascii_case(name)),
                        "{what}: owner names"
                    );
                    assert_eq!(
                        m.answers[0].name.to_string(),
                        *name,
                        "{what}: the name as asked"
                    );
                }
                NoData => {
                    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{what}");
                    assert!(m.answers.is_empty(), "{what}: {:?}", rdata(&m));
                    assert!(soa_in_authority, "{what}: SOA for negative caching");
                }
                NxDomain => {
                    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{what}");
                    assert!(soa_in_authority, "{what}: SOA for negative caching");
                }
                Refused => {
                    assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{what}");
                    assert!(!m.metadata.authoritative, "{what}");
                }
            }
        }
    }
}

#[tokio::test]
async fn ttls_follow_the_policy_and_negative_answers_the_soa_minimum() {
    let r = start().await;
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert!(m.answers.iter().all(|a| a.ttl == 5));
    let m = ask(
        r.addr,
        &format!("missing.ml.{S}"),
        RecordType::A,
        Opts::default(),
    )
    .await;
    let RData::SOA(soa) = &m.authorities[0].data else {
        panic!("SOA")
    };
    assert_eq!(soa.minimum, 5);
    assert_eq!(soa.serial, 1, "the table generation");
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let r = start().await;
    let name = format!("big.ml.{S}");
    let udp = ask(r.addr, &name, RecordType::A, Opts::default()).await;
    assert!(
        udp.metadata.truncation,
        "64 A records do not fit in 512 bytes"
    );
    let edns = ask(
        r.addr,
        &name,
        RecordType::A,
        Opts {
            edns: Some(4096),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(edns.edns.as_ref().unwrap().max_payload(), MAX_UDP_PAYLOAD);
    let tcp = ask(
        r.addr,
        &name,
        RecordType::A,
        Opts {
            tcp: true,
            ..Default::default()
        },
    )
    .await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 64, "maxAnswers");
}

#[tokio::test]
async fn edns_is_answered_with_edns_and_an_unknown_version_with_badvers() {
    let r = start().await;
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts {
            edns: Some(1232),
            ..Default::default()
        },
    )
    .await;
    assert!(m.edns.is_some());
    assert_eq!(rdata(&m).len(), 2);
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts {
            edns: Some(1232),
            edns_version: 1,
            ..Default::default()
        },
    )
    .await;
    // BADVERS and BADSIG share the value 16; the decoder names it BADSIG.
    assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
}

#[tokio::test]
async fn client_subnet_picks_the_clients_cluster_for_local_first_and_is_echoed_with_its_scope() {
    let r = start().await;
    let name = format!("local.ml.{S}");
    for (subnet, want) in [("10.1.7.0", "A 192.0.2.11"), ("10.2.7.0", "A 192.0.2.12")] {
        let m = ask(
            r.addr,
            &name,
            RecordType::A,
            Opts {
                edns: Some(1232),
                subnet: Some((subnet, 24)),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(rdata(&m), [want], "client in {subnet}");
        let Some(EdnsOption::Subnet(s)) = m.edns.as_ref().unwrap().option(EdnsCode::Subnet) else {
            panic!("ECS echoed")
        };
        assert_eq!(
            s.scope_prefix(),
            24,
            "the answer depends on the client's /24"
        );
    }
    // Unknown location: both; a policy without local-first echoes scope 0.
    let m = ask(r.addr, &name, RecordType::A, Opts::default()).await;
    assert_eq!(rdata(&m).len(), 2);
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts {
            edns: Some(1232),
            subnet: Some(("10.1.7.0", 24)),
            ..Default::default()
        },
    )
    .await;
    let Some(EdnsOption::Subnet(s)) = m.edns.as_ref().unwrap().option(EdnsCode::Subnet) else {
        panic!("ECS echoed")
    };
    assert_eq!(s.scope_prefix(), 0);
}

#[tokio::test]
async fn other_classes_opcodes_and_question_counts_are_refused_or_rejected() {
    let r = start().await;
    let m = ask(
        r.addr,
        "dns-version.clusterset.local.",
        RecordType::TXT,
        Opts {
            class: Some(DNSClass::CH),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let mut q = build(&format!("llm.ml.{S}"), RecordType::A, Opts::default());
    q.metadata.op_code = OpCode::Notify;
    assert_eq!(
        exchange(r.addr, &q.to_vec().unwrap(), false)
            .await
            .metadata
            .response_code,
        ResponseCode::NotImp
    );
    let mut q = build(&format!("llm.ml.{S}"), RecordType::A, Opts::default());
    q.add_query(Query::query(
        Name::from_ascii(format!("db.ml.{S}")).unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        exchange(r.addr, &q.to_vec().unwrap(), false)
            .await
            .metadata
            .response_code,
        ResponseCode::FormErr
    );
}

#[tokio::test]
async fn malformed_packets_never_stop_the_server() {
    let r = start().await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = build(&format!("llm.ml.{S}"), RecordType::A, Opts::default())
        .to_vec()
        .unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..2_000 {
        let mut pkt = good.clone();
        match i % 4 {
            0 => pkt.truncate((next() as usize) % pkt.len()),
            1 => {
                let k = (next() as usize) % pkt.len();
                pkt[k] = next() as u8;
            }
            2 => pkt = (0..(next() % 600) as usize).map(|_| next() as u8).collect(),
            _ => {
                // A label length pointing past the end, and a compression loop.
                pkt[12] = 63;
                pkt.extend_from_slice(&[0xC0, 0x0C]);
            }
        }
        s.send_to(&pkt, r.addr).await.unwrap();
    }
    // TCP: a length prefix promising more than is sent, then a close.
    let mut t = TcpStream::connect(r.addr).await.unwrap();
    t.write_all(&[0xFF, 0xFF, 1, 2, 3]).await.unwrap();
    drop(t);
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert_eq!(rdata(&m).len(), 2, "still answering");
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts {
            tcp: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rdata(&m).len(), 2);
}

#[tokio::test]
async fn an_undecodable_query_gets_formerr_and_a_response_gets_nothing() {
    let r = start().await;
    let good = build(&format!("llm.ml.{S}"), RecordType::A, Opts::default());
    let mut cut = good.to_vec().unwrap();
    cut.truncate(16); // the header and a piece of the question
    let m = exchange(r.addr, &cut, false).await;
    assert_eq!(m.metadata.id, good.metadata.id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.queries.is_empty() && m.answers.is_empty());

    // A response sent to the server (a reflection attempt) is dropped, not answered.
    let mut resp = good.clone();
    resp.metadata.message_type = MessageType::Response;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&resp.to_vec().unwrap(), r.addr).await.unwrap();
    let mut buf = vec![0; 2048];
    let got = tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await;
    assert!(got.is_err(), "a response packet was answered");
    // Shorter than a header: dropped too; the server still answers afterwards.
    s.send_to(&[1, 2, 3], r.addr).await.unwrap();
    assert_eq!(
        rdata(
            &ask(
                r.addr,
                &format!("llm.ml.{S}"),
                RecordType::A,
                Opts::default()
            )
            .await
        )
        .len(),
        2
    );
}

#[tokio::test]
async fn a_swapped_table_answers_from_the_next_query() {
    let r = start().await;
    let mut exports = fixture_exports();
    for e in exports
        .iter_mut()
        .filter(|e| e.name == "llm" && e.cluster == "a")
    {
        e.endpoints[0].ready = false;
    }
    r.table.store(Arc::new(table(&exports, 2)));
    let m = ask(
        r.addr,
        &format!("llm.ml.{S}"),
        RecordType::A,
        Opts::default(),
    )
    .await;
    assert_eq!(rdata(&m), ["A 192.0.2.2"]);
}

/// Sends `n` copies of `q` over UDP at once and gathers what comes back within a moment.
async fn burst(addr: SocketAddr, q: &Message, n: usize) -> Vec<Message> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = q.to_vec().unwrap();
    for _ in 0..n {
        s.send_to(&bytes, addr).await.unwrap();
    }
    let mut out = Vec::new();
    let mut buf = vec![0; 65535];
    while let Ok(Ok((len, _))) =
        tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
    {
        out.push(Message::from_vec(&buf[..len]).unwrap());
    }
    out
}

#[tokio::test]
async fn over_the_rate_limit_udp_answers_slip_or_drop_and_tcp_still_answers() {
    let r = start_with(flotilla_dns::RrlConfig {
        rate: 5,
        slip: 2,
        ..Default::default()
    })
    .await;
    let name = format!("llm.ml.{S}");
    let q = build(&name, RecordType::A, Opts::default());
    let got = burst(r.addr, &q, 25).await;
    let full: Vec<&Message> = got.iter().filter(|m| !m.metadata.truncation).collect();
    let slipped: Vec<&Message> = got.iter().filter(|m| m.metadata.truncation).collect();
    // The bucket holds 5 (and refills 5 a second, so a slow machine may see one or two more).
    assert!((5..=7).contains(&full.len()), "{} full answers", full.len());
    assert!(full.iter().all(|m| !m.answers.is_empty()));
    // Of the other 18 to 20, every second one slips: empty, truncated, with the question, so
    // a real client retries over TCP; the rest are dropped.
    assert!(
        (8..=10).contains(&slipped.len()),
        "{} slipped",
        slipped.len()
    );
    for m in &slipped {
        assert!(m.answers.is_empty() && m.additionals.is_empty());
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.metadata.id, q.metadata.id);
    }
    assert!(got.len() < 25, "nothing was dropped");
    // Another name has its own budget; TCP is never limited.
    let other = ask(r.addr, &name, RecordType::SRV, Opts::default()).await;
    assert!(!other.metadata.truncation);
    let tcp = ask(
        r.addr,
        &name,
        RecordType::A,
        Opts {
            tcp: true,
            ..Opts::default()
        },
    )
    .await;
    assert!(!tcp.answers.is_empty() && !tcp.metadata.truncation);
}

#[tokio::test]
async fn errors_for_random_names_share_one_budget_and_zone_transfers_are_refused() {
    let r = start_with(flotilla_dns::RrlConfig {
        rate: 5,
        slip: 0,
        ..Default::default()
    })
    .await;
    // A flood of distinct nonexistent names is limited as one.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..30 {
        let q = build(&format!("nope{i}.prod.{S}"), RecordType::A, Opts::default());
        s.send_to(&q.to_vec().unwrap(), r.addr).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = vec![0; 65535];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await
    {
        answered += 1;
    }
    assert!(
        (5..=7).contains(&answered),
        "{answered} NXDOMAIN answers sent"
    );
    // No zone transfer, over TCP either.
    for t in [RecordType::AXFR, RecordType::IXFR] {
        let m = ask(
            r.addr,
            S,
            t,
            Opts {
                tcp: true,
                ..Opts::default()
            },
        )
        .await;
        assert!(
            matches!(
                m.metadata.response_code,
                ResponseCode::Refused | ResponseCode::NotImp
            ),
            "{t:?}: {:?}",
            m.metadata.response_code
        );
        assert!(m.answers.is_empty());
    }
}
