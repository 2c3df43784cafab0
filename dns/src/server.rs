//! The DNS server: hickory-server's UDP and TCP listeners, and a request handler that reads
//! the current routing table (one atomic load per query) and calls [`crate::answer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_core::routing_table::RoutingTable;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::answer::{Asker, Zones, answer};

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
}

struct Handler {
    table: SharedTable,
    zones: Arc<Zones>,
    seq: AtomicU64,
    stats: Arc<DnsStats>,
}

impl Handler {
    fn reply_error(&self, request: &Request, rcode: ResponseCode) -> (Metadata, ResponseCode) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut m = Metadata::response_from_request(&request.metadata);
        m.response_code = rcode;
        (m, rcode)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let resp_edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e.set_version(0);
            e
        });
        let mut resp_edns = resp_edns;
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
        if let Some(rcode) = error {
            let (m, _) = self.reply_error(request, rcode);
            let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
            return send(&mut response, builder.build_no_records(m)).await;
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
        if let (Some(e), Some((addr, source))) = (resp_edns.as_mut(), subnet) {
            e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                addr,
                source,
                reply.client_subnet_scope,
            )));
        }
        let mut m = Metadata::response_from_request(&request.metadata);
        m.response_code = reply.rcode;
        m.authoritative = reply.authoritative;
        let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
        let msg = builder.build(
            m,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        send(&mut response, msg).await
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
            let mut m = Metadata::new(id, hickory_proto::op::MessageType::Response, OpCode::Query);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: m,
                counts: HeaderCounts::default(),
            })
        }
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
}

impl DnsServer {
    /// Bind UDP and TCP on `addr` (port 0: any free port, the same for both).
    pub async fn bind(
        addr: SocketAddr,
        zones: Zones,
        table: SharedTable,
    ) -> Result<Self, DnsError> {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
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
            let handler = Handler {
                table: self.table,
                zones: self.zones,
                seq: AtomicU64::new(1),
                stats: self.stats,
            };
            let mut server = Server::new(handler);
            server.register_socket(self.udp);
            // A TCP client gets 10 s between requests, and a 64 KiB response buffer.
            server.register_listener(self.tcp, Duration::from_secs(10), 64 * 1024);
            info!("DNS serving clusterset.local on udp and tcp");
            tokio::select! {
                r = server.block_until_done() => r.map_err(|e| DnsError::Serve(e.to_string())),
                _ = shutdown.cancelled() => {
                    server.shutdown_gracefully().await.map_err(|e| DnsError::Serve(e.to_string()))
                }
            }
        }
        .instrument(span)
        .await
    }
}
