//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay tests: hostile bytes in,
//! no panic out. Each decodes what an agent may send and runs every validator the hub runs on
//! it.

use prost::Message;

use crate::convert::{campaign, discovery, fleet};
use crate::v1;

/// An agent stream message, as the hub validates it.
pub fn agent_message(data: &[u8]) {
    let Ok(m) = v1::AgentMessage::decode(data) else {
        return;
    };
    let limits = fleet::ReportLimits::default();
    use v1::agent_message::Msg;
    match m.msg {
        Some(Msg::Hello(h)) => {
            let _ = fleet::cluster_name("hello.cluster", &h.cluster);
            let _ = flotilla_core::security::JoinToken::parse(&h.token);
            let _ = flotilla_core::security::JoinString::parse(&h.token);
            let _ = rcgen::CertificateSigningRequestParams::from_der(&h.csr.as_slice().into());
        }
        Some(Msg::Snapshot(s)) => {
            let _ = fleet::nodes_from_wire(&s.nodes, "snapshot.nodes", &limits);
            let _ = fleet::signals_from_wire(s.signals.as_ref(), "snapshot.signals");
        }
        Some(Msg::Delta(d)) => {
            let _ = fleet::nodes_from_wire(&d.upsert, "delta.upsert", &limits);
            let _ = fleet::signals_from_wire(d.signals.as_ref(), "delta.signals");
        }
        Some(Msg::Heartbeat(h)) => {
            let _ = fleet::signals_from_wire(h.signals.as_ref(), "heartbeat.signals");
        }
        Some(Msg::Exports(x)) => {
            let _ = discovery::exports_from_wire(&x.exports, "fuzz", "exports");
        }
        Some(Msg::ExportsDelta(x)) => {
            let _ = discovery::exports_from_wire(&x.upsert, "fuzz", "exports_delta.upsert");
        }
        Some(Msg::StepStatus(r)) => {
            let _ = campaign::status_from_wire(&r);
        }
        Some(Msg::Renew(r)) => {
            let _ = rcgen::CertificateSigningRequestParams::from_der(&r.csr.as_slice().into());
        }
        Some(Msg::Networks(n)) => {
            for c in &n.cidrs {
                let _ = c.parse::<flotilla_core::routing::Cidr>();
            }
        }
        Some(Msg::Loads(_) | Msg::Leave(_) | Msg::ImportNamespaces(_)) | None => {}
    }
}

/// A campaign spec (JSON) as `CreateCampaign` parses and validates it.
pub fn campaign_spec(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = flotilla_core::campaign::spec::parse_json(text);
    }
}

/// A routing policy (JSON) as `SetPolicy` parses and validates it.
pub fn routing_policy(data: &[u8]) {
    if let Ok(p) = serde_json::from_slice::<flotilla_core::routing::RoutingPolicy>(data) {
        let _ = p.validate();
    }
}
