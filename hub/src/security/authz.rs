//! Authorization: one table maps every gRPC method the hub serves to what its caller needs,
//! and one tower layer in front of every service enforces it. A tonic interceptor cannot see
//! the method, so this is a layer. A method missing from the table is denied, and a test
//! checks the table against the compiled proto descriptor, so no RPC can be added without a
//! role.

use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_api::tls::Peer;
use flotilla_core::security::{Need, Principal, Role, permits};
use futures::future::BoxFuture;
use tonic::Status;

use crate::security::audit::{Audit, Decision};
pub use crate::security::caller::{Caller, caller};

/// Every method the hub serves and what its caller needs. `mutates`: the call changes state,
/// so it is audited whatever its outcome.
pub static POLICY: &[(&str, Need, bool)] = &[
    // The store's raw API: the other replicas, and admins repairing by hand. Its reads and
    // writes are the store's data plane (forwarded writes, the audit writer's own, tools):
    // auditing each would double every write, so only admins and replicas may call them and
    // compaction and membership changes are audited (docs/security.md).
    ("/flotilla.v1.Kv/Range", Need::MemberOrAdmin, false),
    ("/flotilla.v1.Kv/Put", Need::MemberOrAdmin, false),
    ("/flotilla.v1.Kv/Delete", Need::MemberOrAdmin, false),
    ("/flotilla.v1.Kv/Txn", Need::MemberOrAdmin, false),
    ("/flotilla.v1.Kv/Watch", Need::MemberOrAdmin, false),
    ("/flotilla.v1.Kv/Compact", Need::MemberOrAdmin, true),
    ("/flotilla.v1.Raft/AppendEntries", Need::Member, false),
    ("/flotilla.v1.Raft/Vote", Need::Member, false),
    ("/flotilla.v1.Raft/InstallSnapshot", Need::Member, false),
    (
        "/flotilla.v1.StoreAdmin/AddLearner",
        Need::MemberOrAdmin,
        true,
    ),
    (
        "/flotilla.v1.StoreAdmin/ChangeMembership",
        Need::MemberOrAdmin,
        true,
    ),
    ("/flotilla.v1.StoreAdmin/Status", Need::MemberOrAdmin, false),
    (
        "/flotilla.v1.StoreAdmin/TriggerSnapshot",
        Need::MemberOrAdmin,
        true,
    ),
    // Agents: the stream audits its own joins, leaves and steps.
    ("/flotilla.v1.AgentService/Connect", Need::Agent, false),
    (
        "/flotilla.v1.FleetService/ListClusters",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/GetCluster",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/GetInventory",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/Capacity",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/Fit",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/Watch",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.FleetService/CreateJoinToken",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.FleetService/ListJoinTokens",
        Need::Role(Role::Admin),
        false,
    ),
    (
        "/flotilla.v1.FleetService/RevokeJoinToken",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.FleetService/ApproveCluster",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.FleetService/RemoveCluster",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.FleetService/ListAudit",
        Need::Role(Role::Admin),
        false,
    ),
    (
        "/flotilla.v1.FleetService/CreateApiToken",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.FleetService/ListApiTokens",
        Need::Role(Role::Admin),
        false,
    ),
    (
        "/flotilla.v1.FleetService/RevokeApiToken",
        Need::Role(Role::Admin),
        true,
    ),
    (
        "/flotilla.v1.DiscoveryService/ListServices",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.DiscoveryService/GetService",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.DiscoveryService/Resolve",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.DiscoveryService/WatchRoutes",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.DiscoveryService/SetPolicy",
        Need::Role(Role::Operator),
        true,
    ),
    (
        "/flotilla.v1.DiscoveryService/GetPolicy",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.DiscoveryService/DeletePolicy",
        Need::Role(Role::Operator),
        true,
    ),
    (
        "/flotilla.v1.CampaignService/CreateCampaign",
        Need::Role(Role::Operator),
        true,
    ),
    (
        "/flotilla.v1.CampaignService/ListCampaigns",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.CampaignService/GetCampaign",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.CampaignService/WatchCampaign",
        Need::Role(Role::Viewer),
        false,
    ),
    (
        "/flotilla.v1.CampaignService/ActOnCampaign",
        Need::Role(Role::Operator),
        true,
    ),
    ("/grpc.health.v1.Health/Check", Need::Public, false),
    ("/grpc.health.v1.Health/Watch", Need::Public, false),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Need::Role(Role::Viewer),
        false,
    ),
];

/// What a method needs and whether it mutates; `None`: not in the table.
pub fn rule(path: &str) -> Option<(Need, bool)> {
    POLICY
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, n, m)| (*n, *m))
}

/// What a mutating call acted on, as its service names it for the audit record.
#[derive(Debug, Clone, Default)]
pub struct AuditTarget(Arc<std::sync::Mutex<String>>);

impl AuditTarget {
    /// The slot of `req` (a detached one when no layer ran), to fill once the target is known.
    pub fn of<T>(req: &tonic::Request<T>) -> AuditTarget {
        req.extensions()
            .get::<AuditTarget>()
            .cloned()
            .unwrap_or_default()
    }

    /// Names the target.
    pub fn set(&self, target: impl Into<String>) {
        *self.0.lock().expect("audit target lock") = target.into();
    }
}

/// Names what the call `req` acts on (`campaign/<id>`, `policy/<ns>/<name>`), for its audit
/// record.
pub fn audit_target<T>(req: &tonic::Request<T>, target: impl Into<String>) {
    AuditTarget::of(req).set(target);
}

/// The layer: authenticate, authorize, audit.
#[derive(Clone)]
pub struct AuthzLayer {
    /// The fleet (trust domain) certificates must name; `None` without TLS.
    pub fleet: Option<Arc<str>>,
    /// Where decisions are recorded.
    pub audit: Audit,
    /// Counts refusals.
    pub denied: prometheus_client::metrics::counter::Counter,
    /// Bearer tokens, for callers without a client certificate.
    pub api_tokens: Arc<crate::security::api_tokens::ApiTokens>,
    /// Time, for token expiry.
    pub clock: Arc<dyn crate::controllers::Clock>,
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// The layer's service.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

type Req = http::Request<tonic::body::Body>;
type Resp = http::Response<tonic::body::Body>;

impl<S> tower::Service<Req> for Authz<S>
where
    S: tower::Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Resp, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        // The clone is the ready one's stand-in (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let peer = req.extensions().get::<Peer>();
        let mut caller = caller(peer, self.layer.fleet.as_deref());
        // No client certificate over TLS: a bearer token may speak for a person or tool.
        let bearer = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let (Ok(c), Some(token)) = (&mut caller, bearer)
            && c.principal == Principal::Anonymous
            && peer.is_some_and(|p| p.tls)
        {
            match self
                .layer
                .api_tokens
                .authenticate(token, self.layer.clock.unix_ms())
            {
                Ok(b) => {
                    c.principal = Principal::User {
                        name: b.name,
                        role: b.role,
                    };
                    c.credential = Some(format!("apitoken {}", b.id));
                }
                Err(e) => caller = Err(e),
            }
        }
        let audit = self.layer.audit.clone();
        let denied = self.layer.denied.clone();
        let decision = match (&caller, rule(&path)) {
            (Err(e), _) => Err(Status::unauthenticated(e.clone())),
            (Ok(_), None) => Err(Status::permission_denied(format!(
                "{path}: unknown method (every method needs an entry in the hub's role table)"
            ))),
            (Ok(c), Some((need, _))) => permits(&c.principal, need)
                .map_err(|e| Status::permission_denied(format!("{path}: {e}"))),
        };
        // Replica traffic (Raft, and store calls a follower forwards to the leader) is not
        // audited again: the request was audited where it arrived, and auditing the audit
        // writer's own forwarded writes would never end.
        let replica = req.headers().contains_key("flotilla-forwarded")
            || matches!(
                caller,
                Ok(Caller {
                    principal: Principal::Hub(_),
                    ..
                })
            );
        let mutates = rule(&path).is_some_and(|(_, m)| m) && !replica;
        Box::pin(async move {
            let c = caller.as_ref().ok();
            if let Err(status) = decision {
                denied.inc();
                tracing::debug!(path, reason = %status.message(), "request denied");
                audit.record(
                    c,
                    &path,
                    "",
                    Decision::Denied(status.message().to_string()),
                    status.code(),
                );
                return Ok(status.into_http());
            }
            let c = caller.expect("checked above");
            let target = AuditTarget::default();
            req.extensions_mut().insert(c.clone());
            req.extensions_mut().insert(target.clone());
            let resp = inner.call(req).await?;
            if mutates {
                // The code is in the headers when the call failed before any message (the
                // usual case for a unary error); otherwise in the trailers, after this.
                let code = tonic::Status::from_header_map(resp.headers())
                    .map_or(tonic::Code::Ok, |s| s.code());
                let target = target.0.lock().expect("audit target lock").clone();
                audit.record(Some(&c), &path, &target, Decision::Allowed, code);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every method in the compiled descriptors (ours, health, reflection) has exactly one
    /// rule, and every rule names a real method.
    #[test]
    fn the_table_covers_exactly_the_compiled_methods() {
        let mut methods = std::collections::BTreeSet::new();
        for set in [
            flotilla_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ] {
            let fds = prost_types::FileDescriptorSet::decode(set).unwrap();
            for f in fds.file {
                for s in &f.service {
                    for m in &s.method {
                        methods.insert(format!("/{}.{}/{}", f.package(), s.name(), m.name()));
                    }
                }
            }
        }
        let table: std::collections::BTreeSet<String> =
            POLICY.iter().map(|(p, _, _)| p.to_string()).collect();
        assert_eq!(table.len(), POLICY.len(), "a method is listed twice");
        let missing: Vec<_> = methods.difference(&table).collect();
        let stale: Vec<_> = table.difference(&methods).collect();
        assert!(missing.is_empty(), "methods without a role: {missing:?}");
        assert!(
            stale.is_empty(),
            "rules for methods that do not exist: {stale:?}"
        );
    }

    #[test]
    fn no_viewer_method_mutates() {
        for (path, need, mutates) in POLICY {
            if *mutates {
                assert_ne!(*need, Need::Role(Role::Viewer), "{path}");
                assert_ne!(*need, Need::Public, "{path}");
            }
        }
    }

    #[test]
    fn a_certificate_for_another_fleet_or_without_one_name_is_refused() {
        let (ca, _) = flotilla_api::pki::Ca::generate("f", 1_800_000_000).unwrap();
        let peer_with = |uri: &str| {
            let p = ca
                .issue(uri, &flotilla_api::pki::Usage::Client, 1_800_000_000, 60)
                .unwrap();
            let der = flotilla_api::pki::certs(&p.cert_pem, "t").unwrap();
            Peer {
                remote: None,
                tls: true,
                certs: Some(Arc::new(der)),
            }
        };
        let c = caller(Some(&peer_with("spiffe://f/cluster/a")), Some("f")).unwrap();
        assert_eq!(c.principal, Principal::Cluster("a".into()));
        let e = caller(Some(&peer_with("spiffe://g/cluster/a")), Some("f")).unwrap_err();
        assert!(e.contains("fleet \"g\""), "{e}");
        let e = caller(Some(&peer_with("urn:x")), Some("f")).unwrap_err();
        assert!(e.contains("spiffe"), "{e}");
        let anon = Peer {
            remote: None,
            tls: true,
            certs: None,
        };
        assert_eq!(
            caller(Some(&anon), Some("f")).unwrap().principal,
            Principal::Anonymous
        );
        assert_eq!(
            caller(Some(&anon), None).unwrap().principal,
            Principal::Unauthenticated
        );
    }
}
