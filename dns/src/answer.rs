//! From one question to one reply over a routing table snapshot: the MCS DNS specification
//! for `clusterset.local`, and the same names without `svc` in the global zone. Pure: the
//! server only decodes, calls [`answer`] and encodes.
//!
//! Names in `clusterset.local` (`<svc>.<ns>.svc.clusterset.local`):
//! - `dns-version` TXT `1.0.0`; the apex SOA and NS.
//! - `<svc>.<ns>.svc`: A/AAAA from the routing decision (ClusterSetIP: the answered clusters'
//!   reachable addresses; headless: their ready endpoints). A headless service with no ready
//!   endpoint is NXDOMAIN; a ClusterSetIP service no cluster may answer is NODATA (it exists).
//! - `_<port>._<proto>.<svc>.<ns>.svc`: SRV for named ports only. ClusterSetIP: one target,
//!   the service name; headless: one per answered endpoint, at its per-host name.
//! - `<host>.<cluster>.<svc>.<ns>.svc`: headless only; `<cluster>.<svc>.<ns>.svc` then exists
//!   (NODATA); for ClusterSetIP services neither exists (NXDOMAIN), as the spec requires.
//! - `svc`, `<ns>.svc`, `_<proto>.<svc>.<ns>.svc`: empty non-terminals (NODATA) when something
//!   exists beneath them.

use std::net::IpAddr;

use flotilla_core::export::{Port, Protocol, ServiceKey};
use flotilla_core::routing::Decision;
use flotilla_core::routing_table::{RoutingTable, ServiceRoutes, host_label};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The MCS DNS schema version served at `dns-version`.
pub const SCHEMA_VERSION: &str = "1.0.0";

/// The zones served and their SOA/NS data.
#[derive(Debug, Clone)]
pub struct Zones {
    /// `clusterset.local.` (lower case, fully qualified).
    pub clusterset: Name,
    /// The global zone (`fleet.example.com.`), if any.
    pub global: Option<Name>,
    /// The global zone's name server (NS and SOA); `clusterset.local`'s is
    /// `ns.dns.clusterset.local`, as CoreDNS names it.
    pub nameserver: Name,
    /// Its addresses, answered when its name is inside a served zone.
    pub nameserver_addresses: Vec<IpAddr>,
    /// TTL of negative answers (the SOA minimum), seconds.
    pub negative_ttl: u32,
    /// `clusterset.local.` as text, for matching query names without allocating names.
    clusterset_text: String,
    /// The global zone as lower-case text with the trailing dot (empty: none).
    global_text: String,
}

impl Zones {
    /// `clusterset.local` and an optional global zone, whose name server is `ns.<global>`.
    pub fn new(global: Option<&str>) -> Result<Self, String> {
        let clusterset = Name::from_ascii("clusterset.local.").expect("a valid name");
        let global = match global {
            None => None,
            Some(g) => {
                let g = g.trim_end_matches('.');
                if g.is_empty() || g.eq_ignore_ascii_case("clusterset.local") {
                    return Err(format!(
                        "--global-zone {g:?}: give a domain other than clusterset.local"
                    ));
                }
                Some(
                    Name::from_ascii(format!("{g}."))
                        .map_err(|e| format!("--global-zone {g:?}: {e}"))?
                        .to_lowercase(),
                )
            }
        };
        let nameserver = match &global {
            Some(g) => g.prepend_label("ns").map_err(|e| e.to_string())?,
            None => Name::from_ascii("ns.dns.clusterset.local.").expect("a valid name"),
        };
        let global_text = global
            .as_ref()
            .map(|g| g.to_ascii().to_ascii_lowercase())
            .unwrap_or_default();
        Ok(Self {
            clusterset,
            global,
            nameserver,
            nameserver_addresses: Vec::new(),
            negative_ttl: 5,
            clusterset_text: "clusterset.local.".into(),
            global_text,
        })
    }
}

/// Where the question came from.
#[derive(Debug, Clone, Copy)]
pub struct Asker {
    /// The packet's source address.
    pub source: IpAddr,
    /// EDNS Client Subnet address and source prefix, if the query carried one.
    pub client_subnet: Option<(IpAddr, u8)>,
}

/// A reply, before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Response code.
    pub rcode: ResponseCode,
    /// Whether the server is authoritative for the name (false only for REFUSED).
    pub authoritative: bool,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of negative answers, NS at the apex).
    pub authorities: Vec<Record>,
    /// Additional section (addresses of SRV targets).
    pub additionals: Vec<Record>,
    /// The ECS scope prefix to echo: the source prefix when the answer depends on where the
    /// client is, 0 when it does not.
    pub client_subnet_scope: u8,
}

impl Reply {
    fn new(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            authoritative: rcode != ResponseCode::Refused,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            client_subnet_scope: 0,
        }
    }

    /// Whether this is NODATA (NOERROR, nothing answered).
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

/// Most labels a name below a zone can have and still exist (`_p._proto.<svc>.<ns>.svc`, or
/// `<host>.<cluster>.<svc>.<ns>.svc`).
const MAX_LABELS: usize = 6;

/// A name split against the zones: which zone, and the lower-case text before it.
struct Split<'z> {
    zone: &'z Name,
    /// In `clusterset.local` (names end in `svc`); false in the global zone.
    svc_zone: bool,
    /// The lower-case labels before the zone, dot-separated, without a trailing dot.
    rel: String,
}

impl<'z> Split<'z> {
    fn of(zones: &'z Zones, name: &Name) -> Option<Self> {
        let mut text = name.to_ascii();
        text.make_ascii_lowercase();
        if !text.ends_with('.') {
            text.push('.');
        }
        let cut = |zone: &Name, ztext: &str| -> Option<String> {
            if text == ztext {
                return Some(String::new());
            }
            let rel = text.strip_suffix(ztext)?.strip_suffix('.')?;
            let _ = zone;
            Some(rel.to_string())
        };
        if let Some(rel) = cut(&zones.clusterset, &zones.clusterset_text) {
            return Some(Self {
                zone: &zones.clusterset,
                svc_zone: true,
                rel,
            });
        }
        let g = zones.global.as_ref()?;
        let rel = cut(g, &zones.global_text)?;
        Some(Self {
            zone: g,
            svc_zone: false,
            rel,
        })
    }
}

/// What a name is.
enum Node<'t> {
    Apex,
    Version,
    /// Exists with no records of its own.
    Empty,
    Service(&'t ServiceRoutes),
    Srv(&'t ServiceRoutes, Vec<&'t Port>),
    Host(&'t ServiceRoutes, &'t [IpAddr]),
    Missing,
}

fn parse_proto(label: &str) -> Option<Protocol> {
    match label {
        "_tcp" => Some(Protocol::Tcp),
        "_udp" => Some(Protocol::Udp),
        "_sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn lookup<'t>(table: &'t RoutingTable, svc_zone: bool, rel: &str) -> Node<'t> {
    if rel.is_empty() {
        return Node::Apex;
    }
    // Escaped characters (`\.`) never occur in a name that exists here.
    if rel.contains('\\') {
        return Node::Missing;
    }
    // In clusterset.local every service name ends in `svc`; the global zone has no such label.
    let body = match svc_zone {
        true if rel == "dns-version" => return Node::Version,
        true if rel == "svc" => {
            return match table.services.is_empty() {
                true => Node::Missing,
                false => Node::Empty,
            };
        }
        true => match rel.strip_suffix(".svc") {
            Some(b) => b,
            None => return Node::Missing,
        },
        false => rel,
    };
    let mut labels = [""; MAX_LABELS];
    let mut starts = [0usize; MAX_LABELS];
    let mut n = 0;
    let mut at = 0;
    for l in body.split('.') {
        if n == MAX_LABELS - 1 {
            return Node::Missing;
        }
        labels[n] = l;
        starts[n] = at;
        at += l.len() + 1;
        n += 1;
    }
    let labels = &labels[..n];
    // `<svc>.<ns>` is the tail of the name's text: looked up without building a key.
    let service = |from: usize| table.get_dns(&body[starts[from]..]).map(|s| &**s);
    match labels {
        [ns] => match table.namespaces.contains(*ns) {
            true => Node::Empty,
            false => Node::Missing,
        },
        [_, _] => match service(0) {
            // A headless service with no ready endpoint in any reporting cluster does not exist.
            Some(s) if s.headless() && s.hosts.is_empty() => Node::Missing,
            Some(s) => Node::Service(s),
            None => Node::Missing,
        },
        [p, _, _] if p.starts_with('_') => match (parse_proto(p), service(1)) {
            (Some(proto), Some(s))
                if s.service
                    .ports
                    .iter()
                    .any(|x| x.protocol == proto && !x.name.is_empty()) =>
            {
                Node::Empty
            }
            _ => Node::Missing,
        },
        [cluster, _, _] => match service(1) {
            Some(s) if s.headless() && s.hosts.keys().any(|(c, _)| c == cluster) => Node::Empty,
            _ => Node::Missing,
        },
        [port, proto, _, _] if port.starts_with('_') && proto.starts_with('_') => {
            let (Some(proto), Some(s)) = (parse_proto(proto), service(2)) else {
                return Node::Missing;
            };
            let want = &port[1..];
            let ports: Vec<&Port> = s
                .service
                .ports
                .iter()
                .filter(|p| {
                    p.protocol == proto && !p.name.is_empty() && p.name.eq_ignore_ascii_case(want)
                })
                .collect();
            match ports.is_empty() {
                true => Node::Missing,
                false => Node::Srv(s, ports),
            }
        }
        [host, cluster, _, _] => match service(2) {
            Some(s) if s.headless() => {
                match s.hosts.get(&(cluster.to_string(), host.to_string())) {
                    Some(a) => Node::Host(s, a),
                    None => Node::Missing,
                }
            }
            _ => Node::Missing,
        },
        _ => Node::Missing,
    }
}

fn record(name: &Name, ttl: u32, rdata: RData) -> Record {
    let mut r = Record::from_rdata(name.clone(), ttl, rdata);
    r.dns_class = DNSClass::IN;
    r
}

fn address_record(name: &Name, ttl: u32, a: IpAddr) -> Record {
    match a {
        IpAddr::V4(v4) => record(name, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => record(name, ttl, RData::AAAA(AAAA(v6))),
    }
}

fn wants(qtype: RecordType, a: IpAddr) -> bool {
    matches!(
        (qtype, a),
        (RecordType::A | RecordType::ANY, IpAddr::V4(_))
            | (RecordType::AAAA | RecordType::ANY, IpAddr::V6(_))
    )
}

impl Zones {
    fn nameserver_of(&self, zone: &Name) -> Name {
        match zone == &self.clusterset {
            true => Name::from_ascii("ns.dns.clusterset.local.").expect("a valid name"),
            false => self.nameserver.clone(),
        }
    }
}

fn soa(zones: &Zones, zone: &Name, serial: u64) -> Record {
    let rname = zone
        .prepend_label("hostmaster")
        .unwrap_or_else(|_| zone.clone());
    let data = SOA::new(
        zones.nameserver_of(zone),
        rname,
        serial as u32,
        7200,
        1800,
        86400,
        zones.negative_ttl,
    );
    record(zone, zones.negative_ttl, RData::SOA(data))
}

/// Answer one question. `seed` orders this query's answer (weighted shuffle).
pub fn answer(
    table: &RoutingTable,
    zones: &Zones,
    qname: &Name,
    qtype: RecordType,
    qclass: DNSClass,
    asker: Asker,
    seed: u64,
) -> Reply {
    // No zone transfers: the zones are generated per client, and a transfer would hand out
    // the whole fleet's topology.
    if qclass != DNSClass::IN && qclass != DNSClass::ANY
        || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
    {
        return Reply::new(ResponseCode::Refused);
    }
    let Some(split) = Split::of(zones, qname) else {
        return Reply::new(ResponseCode::Refused);
    };
    let (zone, svc_zone) = (split.zone, split.svc_zone);
    let negative = |rcode: ResponseCode| {
        let mut r = Reply::new(rcode);
        r.authorities.push(soa(zones, zone, table.generation));
        r
    };
    // The client's cluster, from ECS first (a resolver forwarding for it), else its address.
    let located = table.locate(asker.client_subnet.map_or(asker.source, |(a, _)| a));
    let mut reply = Reply::new(ResponseCode::NoError);
    match lookup(table, svc_zone, &split.rel) {
        Node::Missing => return negative(ResponseCode::NXDomain),
        Node::Empty => {}
        Node::Apex => match qtype {
            RecordType::SOA => reply.answers.push(soa(zones, zone, table.generation)),
            RecordType::NS => {
                reply
                    .answers
                    .push(record(zone, 3600, RData::NS(NS(zones.nameserver_of(zone)))))
            }
            _ => {}
        },
        Node::Version => {
            if matches!(qtype, RecordType::TXT | RecordType::ANY) {
                reply.answers.push(record(
                    qname,
                    3600,
                    RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
                ));
            }
        }
        Node::Host(s, addrs) => {
            let ttl = s.default.ttl_seconds;
            reply.answers.extend(
                addrs
                    .iter()
                    .filter(|a| wants(qtype, **a))
                    .map(|a| address_record(qname, ttl, *a)),
            );
        }
        Node::Service(s) => {
            let d = decision(s, located, asker, &mut reply);
            if matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY) {
                d.for_each_answer(seed, |_, a, _| {
                    if wants(qtype, a) {
                        reply.answers.push(address_record(qname, d.ttl_seconds, a));
                    }
                });
            }
        }
        Node::Srv(s, ports) => {
            let d = decision(s, located, asker, &mut reply);
            if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                let key = s
                    .service
                    .key
                    .clone()
                    .unwrap_or_else(|| ServiceKey::new("", ""));
                let base = service_name(zone, svc_zone, &key);
                match s.headless() {
                    false => {
                        if !d.chosen.is_empty() {
                            for p in &ports {
                                reply.answers.push(record(
                                    qname,
                                    d.ttl_seconds,
                                    RData::SRV(SRV::new(0, 100, p.port, base.clone())),
                                ));
                            }
                        }
                    }
                    true => d.for_each_answer(seed, |c, a, host| {
                        let Ok(target) = base
                            .prepend_label(c.cluster.to_ascii_lowercase())
                            .and_then(|n| n.prepend_label(host_label(host, a)))
                        else {
                            return;
                        };
                        for p in &ports {
                            reply.answers.push(record(
                                qname,
                                d.ttl_seconds,
                                RData::SRV(SRV::new(
                                    0,
                                    c.weight.min(u16::MAX as u32) as u16,
                                    p.port,
                                    target.clone(),
                                )),
                            ));
                        }
                        reply
                            .additionals
                            .push(address_record(&target, d.ttl_seconds, a));
                    }),
                }
            }
        }
    }
    if reply.answers.is_empty() && reply.rcode == ResponseCode::NoError {
        let scope = reply.client_subnet_scope;
        let mut r = negative(ResponseCode::NoError);
        r.client_subnet_scope = scope;
        return r;
    }
    reply
}

fn decision<'s>(
    s: &'s ServiceRoutes,
    located: (Option<&str>, Option<&str>),
    asker: Asker,
    reply: &mut Reply,
) -> &'s Decision {
    if s.policy.local_first
        && let Some((_, prefix)) = asker.client_subnet
    {
        reply.client_subnet_scope = prefix;
    }
    s.decision(located.0, located.1)
}

fn service_name(zone: &Name, svc_zone: bool, key: &ServiceKey) -> Name {
    let mut n = zone.clone();
    if svc_zone {
        n = n.prepend_label("svc").unwrap_or(n);
    }
    n.prepend_label(key.namespace.as_str())
        .and_then(|n| n.prepend_label(key.name.as_str()))
        .unwrap_or_else(|_| zone.clone())
}
