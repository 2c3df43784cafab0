//! Who is calling: the principal a request's verified peer (or bearer token) establishes,
//! carried in every request's extensions for the services and the audit log.

use flotilla_api::tls::Peer;
use flotilla_core::security::{Principal, SpiffeId};

/// Who called, as the layer established it; every request to a service carries one.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal.
    pub principal: Principal,
    /// The client certificate's serial (hex), if one was presented.
    pub credential: Option<String>,
    /// When that certificate was made valid (Unix seconds).
    pub not_before: Option<i64>,
    /// When that certificate expires (Unix seconds).
    pub not_after: Option<i64>,
    /// Where from.
    pub remote: Option<std::net::SocketAddr>,
}

impl Caller {
    /// The caller of `req` (unauthenticated when no layer ran, as in unit tests).
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or(Caller {
            principal: Principal::Unauthenticated,
            credential: None,
            not_before: None,
            not_after: None,
            remote: None,
        })
    }
}

/// Turns a connection's verified peer into a caller. `fleet: None`: the hub runs without TLS.
pub fn caller(peer: Option<&Peer>, fleet: Option<&str>) -> Result<Caller, String> {
    let remote = peer.and_then(|p| p.remote);
    let Some(fleet) = fleet else {
        return Ok(Caller {
            principal: Principal::Unauthenticated,
            credential: None,
            not_before: None,
            not_after: None,
            remote,
        });
    };
    let Some(leaf) = peer.and_then(|p| p.certs.as_ref()).and_then(|c| c.first()) else {
        return Ok(Caller {
            principal: Principal::Anonymous,
            credential: None,
            not_before: None,
            not_after: None,
            remote,
        });
    };
    let leaf = flotilla_api::pki::leaf(leaf).map_err(|e| e.to_string())?;
    let [uri] = leaf.uris.as_slice() else {
        return Err("the client certificate must carry exactly one spiffe:// URI SAN".into());
    };
    let id = SpiffeId::parse(uri)?;
    if id.fleet != fleet {
        return Err(format!(
            "the client certificate is for fleet {:?}, this hub serves {fleet:?}",
            id.fleet
        ));
    }
    Ok(Caller {
        principal: id.principal,
        credential: Some(leaf.serial),
        not_before: Some(leaf.not_before),
        not_after: Some(leaf.not_after),
        remote,
    })
}
