//! `DiscoveryService`: services, Resolve, WatchRoutes and policies. Reads come from this
//! replica's table and state; policy writes go to the store.

use std::pin::Pin;
use std::sync::Arc;

use flotilla_api::convert::discovery::{
    decision_to_wire, port_to_wire, route_to_wire, service_to_wire, type_to_wire,
};
use flotilla_api::convert::fleet::is_dns_label;
use flotilla_api::v1;
use flotilla_core::export::ServiceKey;
use flotilla_core::kv::{KvBackend, Op, TxnRequest};
use flotilla_core::routing::RoutingPolicy;
use flotilla_core::routing_table::RoutingTable;
use futures::Stream;
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::Discovery;
use crate::fleet::view::FleetView;
use crate::store::keys;

/// The gRPC service.
pub struct DiscoverySvc<B> {
    /// The store, for policy writes.
    pub backend: B,
    /// This replica's discovery.
    pub discovery: Arc<Discovery>,
    /// This replica's fleet view.
    pub view: Arc<FleetView>,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    flotilla_api::convert::fleet::Invalid {
        field: field.into(),
        reason: why.to_string(),
    }
    .to_status()
}

fn check_key(namespace: &str, name: &str, allow_default: bool) -> Result<(), Status> {
    if allow_default && namespace.is_empty() && name.is_empty() {
        return Ok(());
    }
    for (f, v) in [("namespace", namespace), ("name", name)] {
        if !is_dns_label(v) {
            return Err(invalid(
                f,
                format!("{v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"),
            ));
        }
    }
    Ok(())
}

/// The update for `key` as a client in `from` (or of unknown location) is answered.
fn update_for(t: &RoutingTable, key: &ServiceKey, from: Option<&str>) -> v1::RouteUpdate {
    match t.services.get(key) {
        None => v1::RouteUpdate {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            removed: true,
            generation: t.generation,
            ..Default::default()
        },
        Some(s) => {
            let d = t.decision(key, from).unwrap_or(&s.default);
            v1::RouteUpdate {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                removed: false,
                r#type: type_to_wire(s.service.service_type),
                ports: s.service.ports.iter().map(port_to_wire).collect(),
                choices: decision_to_wire(d),
                ttl_seconds: d.ttl_seconds,
                max_answers: d.max_answers,
                generation: t.generation,
                synced: false,
            }
        }
    }
}

fn matches(prefix: &str, k: &ServiceKey) -> bool {
    match prefix.split_once('/') {
        None => prefix.is_empty() || k.namespace == prefix,
        Some((ns, "")) => k.namespace == ns,
        Some((ns, name)) => k.namespace == ns && k.name == name,
    }
}

type RouteStream = Pin<Box<dyn Stream<Item = Result<v1::RouteUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl<B: KvBackend + Clone> v1::discovery_service_server::DiscoveryService for DiscoverySvc<B> {
    async fn list_services(
        &self,
        req: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        let ns = req.into_inner().namespace;
        let table = self.discovery.table().load_full();
        let services = self
            .discovery
            .services(Some(ns.as_str()).filter(|n| !n.is_empty()))
            .iter()
            .filter_map(|k| {
                let (s, json, own) = self.discovery.service(k)?;
                let answering = table
                    .services
                    .get(k)
                    .map(|r| r.default.chosen.iter().map(|c| c.cluster.clone()).collect())
                    .unwrap_or_default();
                Some(service_to_wire(&s, json, own, answering))
            })
            .collect();
        Ok(Response::new(v1::ListServicesResponse { services }))
    }

    async fn get_service(
        &self,
        req: Request<v1::GetServiceRequest>,
    ) -> Result<Response<v1::ServiceInfo>, Status> {
        let r = req.into_inner();
        check_key(&r.namespace, &r.name, false)?;
        let key = ServiceKey::new(&r.namespace, &r.name);
        let Some((s, json, own)) = self.discovery.service(&key) else {
            return Err(Status::not_found(format!(
                "service {key}: no cluster validly exports it"
            )));
        };
        let table = self.discovery.table().load_full();
        let answering = table
            .services
            .get(&key)
            .map(|r| r.default.chosen.iter().map(|c| c.cluster.clone()).collect())
            .unwrap_or_default();
        Ok(Response::new(service_to_wire(&s, json, own, answering)))
    }

    async fn resolve(
        &self,
        req: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let r = req.into_inner();
        check_key(&r.namespace, &r.name, false)?;
        let key = ServiceKey::new(&r.namespace, &r.name);
        let table = self.discovery.table().load_full();
        let Some(routes) = table.services.get(&key) else {
            return Err(Status::not_found(format!(
                "service {key}: no cluster validly exports it"
            )));
        };
        let client = match (r.from_cluster.as_str(), r.client_ip.as_str()) {
            ("", "") => None,
            (c, "") => {
                if self.view.cluster(c).is_none() {
                    return Err(invalid(
                        "from_cluster",
                        format!("no member cluster is named {c:?}"),
                    ));
                }
                Some(c.to_string())
            }
            ("", ip) => {
                let ip = ip
                    .parse()
                    .map_err(|_| invalid("client_ip", format!("{ip:?} is not an IP address")))?;
                table.locate(ip).0.map(str::to_string)
            }
            _ => {
                return Err(invalid(
                    "client_ip",
                    "give from_cluster or client_ip, not both",
                ));
            }
        };
        let region = client
            .as_deref()
            .and_then(|c| table.regions.get(c))
            .map(String::as_str);
        let decision = routes.decision(client.as_deref(), region);
        let route = decision.route(rand::random());
        Ok(Response::new(route_to_wire(&route, client.as_deref())))
    }

    type WatchRoutesStream = RouteStream;

    async fn watch_routes(
        &self,
        req: Request<v1::WatchRoutesRequest>,
    ) -> Result<Response<RouteStream>, Status> {
        let v1::WatchRoutesRequest {
            prefix,
            from_cluster,
        } = req.into_inner();
        if !from_cluster.is_empty() && !is_dns_label(&from_cluster) {
            return Err(invalid(
                "from_cluster",
                format!("{from_cluster:?} is not a cluster name (a DNS label)"),
            ));
        }
        // A cluster not (yet) in the fleet gets the unknown-location answers until it is.
        let from = Some(from_cluster).filter(|c| !c.is_empty());
        let mut changes = self.discovery.route_changes();
        let discovery = self.discovery.clone();
        let stream = async_stream(move |tx| async move {
            // Everything first, then each change; after a lag, everything again.
            let mut resync = true;
            loop {
                if resync {
                    let t = discovery.table().load_full();
                    let mut keys: Vec<&ServiceKey> =
                        t.services.keys().filter(|k| matches(&prefix, k)).collect();
                    keys.sort();
                    for k in keys {
                        if tx
                            .send(Ok(update_for(&t, k, from.as_deref())))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let synced = v1::RouteUpdate {
                        synced: true,
                        generation: t.generation,
                        ..Default::default()
                    };
                    if tx.send(Ok(synced)).await.is_err() {
                        return;
                    }
                    resync = false;
                }
                match changes.recv().await {
                    Ok(c) => {
                        let t = discovery.table().load_full();
                        for k in c.keys.iter().filter(|k| matches(&prefix, k)) {
                            if tx
                                .send(Ok(update_for(&t, k, from.as_deref())))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => resync = true,
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn set_policy(
        &self,
        req: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::RoutingPolicyRecord>, Status> {
        crate::security::authz::audit_target(
            &req,
            format!("policy/{}/{}", req.get_ref().namespace, req.get_ref().name),
        );
        let r = req.into_inner();
        check_key(&r.namespace, &r.name, true)?;
        let policy: RoutingPolicy =
            serde_json::from_str(&r.spec_json).map_err(|e| invalid("spec", e))?;
        policy
            .validate()
            .map_err(|e| invalid(&format!("spec.{}", e.field), e.message))?;
        // Stored as written by serde, so every replica reads back exactly this policy.
        let spec_json =
            serde_json::to_string(&policy).map_err(|e| Status::internal(e.to_string()))?;
        let rec = v1::RoutingPolicyRecord {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            spec_json,
            updated_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        self.backend
            .txn(TxnRequest::put(
                keys::policy_key(&r.namespace, &r.name),
                rec.encode_to_vec(),
            ))
            .await
            .map_err(|e| Status::unavailable(format!("the store: {e}")))?;
        Ok(Response::new(rec))
    }

    async fn get_policy(
        &self,
        req: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::RoutingPolicyRecord>, Status> {
        let r = req.into_inner();
        check_key(&r.namespace, &r.name, true)?;
        let (rec, _) = crate::store::records::get::<B, v1::RoutingPolicyRecord>(
            &self.backend,
            &keys::policy_key(&r.namespace, &r.name),
        )
        .await
        .map_err(|e| Status::unavailable(format!("the store: {e}")))?;
        match rec {
            Some(rec) => Ok(Response::new(rec)),
            None if r.namespace.is_empty() => Ok(Response::new(v1::RoutingPolicyRecord {
                spec_json: serde_json::to_string(&RoutingPolicy::default()).expect("json"),
                ..Default::default()
            })),
            None => Err(Status::not_found(format!(
                "no routing policy for {}/{} (the fleet default applies)",
                r.namespace, r.name
            ))),
        }
    }

    async fn delete_policy(
        &self,
        req: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        crate::security::authz::audit_target(
            &req,
            format!("policy/{}/{}", req.get_ref().namespace, req.get_ref().name),
        );
        let r = req.into_inner();
        check_key(&r.namespace, &r.name, true)?;
        let res = self
            .backend
            .txn(TxnRequest {
                compare: vec![],
                success: vec![Op::Delete {
                    range: flotilla_core::kv::KeyRange::key(keys::policy_key(
                        &r.namespace,
                        &r.name,
                    )),
                    prev_kv: true,
                }],
                failure: vec![],
            })
            .await
            .map_err(|e| Status::unavailable(format!("the store: {e}")))?;
        let deleted = res.results.iter().any(
            |o| matches!(o, flotilla_core::kv::OpResult::Delete { deleted, .. } if *deleted > 0),
        );
        Ok(Response::new(v1::DeletePolicyResponse { deleted }))
    }
}

/// A stream fed by a task through a channel (the task ends when the client goes).
fn async_stream<F, Fut>(f: F) -> RouteStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::RouteUpdate, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
