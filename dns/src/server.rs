//! The DNS server: our own UDP loop and hickory-server's TCP listener, both answering through
//! one handler that reads the current routing table (one atomic load per query) and calls
//! [`crate::answer`]. Decoding and encoding are hickory-proto's.

use flotilla_core::rate::{Rrl, RrlConfig, Verdict, prefix};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_core::routing_table::RoutingTable;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::answer::{Asker, Reply, Zones, answer};

/// The largest UDP payload answered, whatever the client offers (the DNS flag day 2020 value:
/// no IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// The routing table the server answers from; swapped whole on every change.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listener could not bind.
    #[error("DNS could not listen on {addr} ({proto}): {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("DNS server failed: {0}")]
    Serve(String),
}

/// Counters of what the server answered.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Questions answered.
    pub queries: AtomicU64,
    /// NXDOMAIN answers.
    pub nxdomain: AtomicU64,
    /// NODATA answers.
    pub nodata: AtomicU64,
    /// REFUSED answers (names outside the zones, other classes).
    pub refused: AtomicU64,
    /// FORMERR, NOTIMP and BADVERS answers.
    pub errors: AtomicU64,
    /// UDP answers not sent: over the response rate limit.
    pub rate_limited: AtomicU64,
    /// UDP answers sent empty and truncated instead (slip), so a real client retries on TCP.
    pub slipped: AtomicU64,
}

struct Handler {
    table: SharedTable,
    zones: Arc<Zones>,
    seq: AtomicU64,
    stats: Arc<DnsStats>,
}

/// A response before encoding: the header, the EDNS record, and the records (none for an
/// error). The same for UDP and TCP; only the encoding's size limit differs.
struct Prepared {
    metadata: Metadata,
    edns: Option<Edns>,
    reply: Option<Reply>,
}

impl Handler {
    /// Decides the response to `request` (pure apart from the counters and the table load).
    fn prepare(&self, request: &Request) -> Prepared {
        let mut edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e.set_version(0);
            e
        });
        let queries = request.queries.queries();
        let error = if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if queries.len() != 1 {
            Some(ResponseCode::FormErr)
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some(ResponseCode::BADVERS)
        } else {
            None
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        if let Some(rcode) = error {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            metadata.response_code = rcode;
            return Prepared {
                metadata,
                edns,
                reply: None,
            };
        }
        let q = &queries[0];
        let subnet = request
            .edns
            .as_ref()
            .and_then(|e| match e.option(EdnsCode::Subnet) {
                Some(EdnsOption::Subnet(s)) => Some((s.addr(), s.source_prefix())),
                _ => None,
            });
        let asker = Asker {
            source: request.src().ip(),
            client_subnet: subnet,
        };
        let seed =
            self.seq.fetch_add(1, Ordering::Relaxed) ^ (u64::from(request.metadata.id) << 48);
        let table = self.table.load();
        let reply = answer(
            &table,
            &self.zones,
            q.original().name(),
            q.query_type(),
            q.query_class(),
            asker,
            seed,
        );
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        match reply.rcode {
            ResponseCode::NXDomain => self.stats.nxdomain.fetch_add(1, Ordering::Relaxed),
            ResponseCode::Refused => self.stats.refused.fetch_add(1, Ordering::Relaxed),
            _ if reply.is_nodata() => self.stats.nodata.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if let (Some(e), Some((addr, source))) = (edns.as_mut(), subnet) {
            e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                addr,
                source,
                reply.client_subnet_scope,
            )));
        }
        metadata.response_code = reply.rcode;
        metadata.authoritative = reply.authoritative;
        Prepared {
            metadata,
            edns,
            reply: Some(reply),
        }
    }

    /// Answers one UDP datagram into `out`; false when nothing is to be sent (shorter than a
    /// header, a response, or a source that cannot be answered).
    fn answer_udp(&self, raw: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
        if src.port() == 0 || src.ip().is_unspecified() {
            return false;
        }
        let Ok(header) = Header::read(&mut BinDecoder::new(raw)) else {
            return false;
        };
        // Never answer a response: a spoofed one would make us a reflector.
        if header.metadata.message_type == MessageType::Response {
            return false;
        }
        out.clear();
        // A question's name is the first in the message, so it has nothing to point back to:
        // a compression pointer there (into the header) is hostile, and hickory would echo it
        // into an answer that points at garbage. FORMERR, header only.
        if questions_end(raw, header.counts.queries).is_none() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return encode_header(&header, ResponseCode::FormErr, out);
        }
        let mut encoder = BinEncoder::new(out);
        match Request::from_bytes(raw.to_vec(), src, Protocol::Udp) {
            Ok(request) => {
                let p = self.prepare(&request);
                // RFC 1035 §4.2.1: 512 bytes unless the client's EDNS offers more.
                encoder.set_max_size(p.edns.as_ref().map_or(512, Edns::max_payload));
                if let Err(e) = response(&request, &p).destructive_emit(&mut encoder) {
                    warn!(error = %e, "could not encode a DNS response");
                    out.clear();
                    return encode_header(&header, ResponseCode::ServFail, out);
                }
                true
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                encode_header(&header, ResponseCode::FormErr, out)
            }
        }
    }
}

/// The fuzz target's entry (`fuzz/`, and its corpus replayed as a test): one datagram from
/// anyone, answered from `table` as the UDP loop answers it. Panics if the answer breaks a
/// rule: larger than the client may take, not a response, not the query's id, or not a
/// message hickory can read back.
pub fn fuzz_datagram(table: &SharedTable, zones: &Arc<Zones>, data: &[u8]) {
    let handler = Handler {
        table: table.clone(),
        zones: zones.clone(),
        seq: AtomicU64::new(1),
        stats: Arc::default(),
    };
    let mut out = Vec::new();
    let src: SocketAddr = "192.0.2.1:5353".parse().expect("a literal address");
    if !handler.answer_udp(data, src, &mut out) {
        return;
    }
    assert!(
        out.len() <= usize::from(MAX_UDP_PAYLOAD),
        "{} bytes over UDP",
        out.len()
    );
    let reply = hickory_proto::op::Message::from_vec(&out)
        .unwrap_or_else(|e| panic!("the answer {out:02x?} does not decode: {e}"));
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(&out[..2], &data[..2], "the answer carries the query's id");
    // The slipped form of any answer is a valid message too.
    slip(&mut out);
    hickory_proto::op::Message::from_vec(&out).expect("the slipped answer decodes");
}

/// A header-only response to `request` with `rcode` (for what could not be decoded or
/// encoded).
fn encode_header(request: &Header, rcode: ResponseCode, out: &mut Vec<u8>) -> bool {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    header.emit(&mut BinEncoder::new(out)).is_ok()
}

/// The encodable response for `p`, borrowing the request's question.
fn response<'q>(
    request: &'q Request,
    p: &'q Prepared,
) -> hickory_server::zone_handler::MessageResponse<
    'q,
    'q,
    impl Iterator<Item = &'q hickory_proto::rr::Record> + Send + 'q,
    impl Iterator<Item = &'q hickory_proto::rr::Record> + Send + 'q,
    impl Iterator<Item = &'q hickory_proto::rr::Record> + Send + 'q,
    impl Iterator<Item = &'q hickory_proto::rr::Record> + Send + 'q,
> {
    let none: &[hickory_proto::rr::Record] = &[];
    let (answers, authorities, additionals) = match &p.reply {
        Some(r) => (&r.answers[..], &r.authorities[..], &r.additionals[..]),
        None => (none, none, none),
    };
    MessageResponseBuilder::new(&request.queries, p.edns.as_ref()).build(
        p.metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    )
}

/// TCP goes through hickory-server's listener (framing, idle timeouts) to this handler.
struct Tcp(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Tcp {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let p = self.0.prepare(request);
        send(&mut response_handle, response(request, &p)).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let id = msg.metadata().id;
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "could not send a DNS response");
            let mut m = Metadata::new(id, MessageType::Response, OpCode::Query);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: m,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// The UDP receive buffer asked for (the kernel caps it at `net.core.rmem_max`). The default
/// (about 200 KiB, some 270 queries) overflowed under a burst while the loop was busy.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket on `addr` with a receive buffer for bursts.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if let Err(e) = s.set_recv_buffer_size(UDP_RECV_BUFFER) {
        debug!(error = %e, "DNS UDP receive buffer left at the default");
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Datagrams answered in a row before the loop lets other tasks run.
const UDP_BATCH: usize = 64;

/// The end of the question section of the DNS message `m` (one question), if it is whole.
fn question_end(m: &[u8]) -> Option<usize> {
    questions_end(m, 1)
}

/// The end of `count` questions from offset 12 of `m`, if they are whole and none of their
/// names is compressed.
fn questions_end(m: &[u8], count: u16) -> Option<usize> {
    let mut i = 12;
    for _ in 0..count {
        i = name_end(m, i)? + 4;
        if i > m.len() {
            return None;
        }
    }
    Some(i)
}

/// The end of the uncompressed name at `at` in `m`.
fn name_end(m: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    loop {
        let len = usize::from(*m.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len & 0xc0 != 0 {
            // Compressed (or a reserved label type): a question's name has nothing before it
            // to point to.
            return None;
        }
        i += 1 + len;
    }
    Some(i)
}

/// The rate-limit key of a response: its question (name case-folded, type, class) for an
/// answer or NODATA; 0 for an error, so a client's errors count together whatever the name
/// (a flood of random names is limited as one).
fn rrl_key(response: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let rcode = response.get(3).map_or(0, |b| b & 0x0f);
    match (rcode, question_end(response)) {
        (0, Some(end)) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for b in &response[12..end] {
                b.to_ascii_lowercase().hash(&mut h);
            }
            h.finish() | 1
        }
        _ => 0,
    }
}

/// Turns the response in `out` into its slipped form: the header with TC set and no records,
/// and the question.
fn slip(out: &mut Vec<u8>) {
    match question_end(out) {
        // The first question only (an error answer may echo more than one).
        Some(end) => {
            out.truncate(end);
            out[2] |= 0x02;
            out[4..6].copy_from_slice(&1u16.to_be_bytes());
            out[6..12].fill(0);
        }
        // No whole question to keep (none, or a compressed name): the header alone, with no
        // records of any section.
        None if out.len() >= 12 => {
            out.truncate(12);
            out[2] |= 0x02;
            out[4..12].fill(0);
        }
        None => out.clear(),
    }
}

/// The UDP loop: drains every datagram that has arrived and answers each in place, with no
/// task or channel per query (hickory-server's UDP path spent most of a core on those).
/// Answers pass the response rate limit first (TCP needs none: it cannot be spoofed).
async fn serve_udp(
    socket: UdpSocket,
    handler: Arc<Handler>,
    rrl: RrlConfig,
    shutdown: CancellationToken,
) {
    // A query larger than this is cut by the kernel and answered FORMERR.
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(usize::from(MAX_UDP_PAYLOAD));
    let mut limit = Rrl::new(rrl);
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.readable() => if let Err(e) = r {
                warn!(error = %e, "DNS UDP socket failed");
                return;
            },
        }
        for _ in 0..UDP_BATCH {
            let (n, src) = match socket.try_recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(error = %e, "DNS UDP receive");
                    break;
                }
            };
            if !handler.answer_udp(&buf[..n], src, &mut out) {
                continue;
            }
            if let Some((limit, cfg)) = &mut limit {
                let client = prefix(src.ip(), cfg.ipv4_prefix, cfg.ipv6_prefix);
                let now = started.elapsed().as_millis() as u64;
                match limit.check(client, rrl_key(&out), now) {
                    Verdict::Answer => {}
                    Verdict::Slip => {
                        handler.stats.slipped.fetch_add(1, Ordering::Relaxed);
                        slip(&mut out);
                    }
                    Verdict::Drop => {
                        handler.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            match socket.try_send_to(&out, src) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(e) = socket.send_to(&out, src).await {
                        debug!(error = %e, %src, "DNS UDP send");
                    }
                }
                Err(e) => debug!(error = %e, %src, "DNS UDP send"),
            }
        }
        tokio::task::yield_now().await;
    }
}

/// A bound DNS server, not yet serving.
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    addr: SocketAddr,
    zones: Arc<Zones>,
    table: SharedTable,
    stats: Arc<DnsStats>,
    rrl: RrlConfig,
}

impl DnsServer {
    /// Limits UDP answers as `rrl` says (the default: NSD's 200 per second per client /24 or
    /// /56 and name, slip 2; `rate: 0` turns it off).
    pub fn with_rate_limit(mut self, rrl: RrlConfig) -> Self {
        self.rrl = rrl;
        self
    }

    /// Bind UDP and TCP on `addr` (port 0: any free port, the same for both).
    pub async fn bind(
        addr: SocketAddr,
        zones: Zones,
        table: SharedTable,
    ) -> Result<Self, DnsError> {
        let udp = bind_udp(addr).map_err(|source| DnsError::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                addr,
                proto: "tcp",
                source,
            })?;
        Ok(Self {
            udp,
            tcp,
            addr,
            zones: Arc::new(zones),
            table,
            stats: Arc::default(),
            rrl: RrlConfig::default(),
        })
    }

    /// The address both listeners are on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<DnsStats> {
        self.stats.clone()
    }

    /// Serve until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DnsError> {
        let span = info_span!("dns", addr = %self.addr);
        async move {
            let handler = Arc::new(Handler {
                table: self.table,
                zones: self.zones,
                seq: AtomicU64::new(1),
                stats: self.stats,
            });
            let udp = tokio::spawn(
                serve_udp(self.udp, handler.clone(), self.rrl, shutdown.clone())
                    .instrument(Span::current()),
            );
            let mut server = Server::new(Tcp(handler));
            // A TCP client gets 10 s between requests, and a 64 KiB response buffer.
            server.register_listener(self.tcp, Duration::from_secs(10), 64 * 1024);
            info!("DNS serving clusterset.local on udp and tcp");
            let r = tokio::select! {
                r = server.block_until_done() => r.map_err(|e| DnsError::Serve(e.to_string())),
                _ = shutdown.cancelled() => {
                    server.shutdown_gracefully().await.map_err(|e| DnsError::Serve(e.to_string()))
                }
            };
            let _ = udp.await;
            r
        }
        .instrument(span)
        .await
    }
}
