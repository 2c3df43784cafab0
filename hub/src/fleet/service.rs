//! FleetService: reads and queries answered from this replica's FleetView; join tokens are
//! written through the store (any replica; followers forward).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::fleet::{self as conv, ReportLimits, health_from_wire};
use flotilla_api::v1;
use flotilla_core::capacity::{self, CapacityCluster, GroupBy};
use flotilla_core::fit::{self, FitCluster, FitRequest};
use flotilla_core::health::Health;
use flotilla_core::inventory::{ClusterInventory, NodeInventory};
use flotilla_core::kv::KvBackend;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use super::view::FleetView;
use crate::store::{keys, records};

/// Default join token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest join token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of an API bearer token.
pub const DEFAULT_API_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest lifetime of an API bearer token.
pub const MAX_API_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most joins one token may admit.
pub const MAX_TOKEN_USES: u32 = 10_000;

/// The fleet API: reads from this replica's view; tokens, approvals, removal and the audit
/// log through the store.
pub struct FleetSvc<B> {
    /// Store.
    pub backend: B,
    /// This replica's view.
    pub view: Arc<FleetView>,
    /// TLS, revocations and the audit log.
    pub security: Arc<super::FleetSecurity>,
    /// Time.
    pub clock: Arc<dyn crate::controllers::Clock>,
}

fn kv_status(e: flotilla_core::kv::KvError) -> Status {
    flotilla_api::convert::kv::to_status(e)
}

impl<B: KvBackend + Clone> FleetSvc<B> {
    /// Deletes every record of `cluster` (its cluster record, inventory, exports, loads,
    /// approval and traffic shift); returns how many went.
    async fn remove_records(&self, cluster: &str) -> Result<u32, Status> {
        use flotilla_core::kv::{KeyRange, Op, TxnRequest};
        let ranges = [
            KeyRange::key(keys::cluster_key(cluster)),
            KeyRange::key(keys::inventory_key(cluster)),
            KeyRange::prefix(keys::exports_of(cluster)),
            KeyRange::prefix(format!("{}{cluster}/", keys::LOADS)),
            KeyRange::key(keys::approval_key(cluster)),
            KeyRange::key(keys::shift_key(cluster)),
        ];
        let r = self
            .backend
            .txn(TxnRequest {
                success: ranges
                    .into_iter()
                    .map(|range| Op::Delete {
                        range,
                        prev_kv: false,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .map_err(kv_status)?;
        Ok(r.results
            .iter()
            .map(|o| match o {
                flotilla_core::kv::OpResult::Delete { deleted, .. } => *deleted as u32,
                _ => 0,
            })
            .sum())
    }
}

/// A stored inventory as core types (records were validated when written).
fn core_inventory(i: &v1::Inventory) -> ClusterInventory {
    let limits = ReportLimits::unlimited();
    let nodes: Vec<NodeInventory> = i
        .nodes
        .iter()
        .filter_map(|n| conv::node_from_wire(n, "stored", &limits).ok())
        .collect();
    let pools = flotilla_core::inventory::pools(&nodes);
    ClusterInventory { nodes, pools }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::FleetEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<B: KvBackend + Clone> v1::fleet_service_server::FleetService for FleetSvc<B> {
    async fn list_clusters(
        &self,
        _: Request<v1::ListClustersRequest>,
    ) -> Result<Response<v1::ListClustersResponse>, Status> {
        Ok(Response::new(v1::ListClustersResponse {
            clusters: self.view.clusters_with_totals(),
        }))
    }

    async fn get_cluster(
        &self,
        req: Request<v1::GetClusterRequest>,
    ) -> Result<Response<v1::Cluster>, Status> {
        let name = req.into_inner().name;
        let c = self
            .view
            .cluster_with_totals(&name)
            .ok_or_else(|| Status::not_found(format!("name: no cluster {name:?} in the fleet")))?;
        Ok(Response::new(c))
    }

    async fn get_inventory(
        &self,
        req: Request<v1::GetInventoryRequest>,
    ) -> Result<Response<v1::Inventory>, Status> {
        let r = req.into_inner();
        if self.view.cluster(&r.cluster).is_none() {
            return Err(Status::not_found(format!(
                "cluster: no cluster {:?} in the fleet",
                r.cluster
            )));
        }
        let mut inv = self.view.inventory(&r.cluster).unwrap_or(v1::Inventory {
            cluster: r.cluster.clone(),
            ..Default::default()
        });
        if !r.pool.is_empty() {
            inv.nodes.retain(|n| n.pool == r.pool);
            inv.pools.retain(|p| p.name == r.pool);
            if inv.pools.is_empty() {
                return Err(Status::not_found(format!(
                    "pool: no pool {:?} in cluster {:?}",
                    r.pool, r.cluster
                )));
            }
        }
        if !r.node.is_empty() {
            inv.nodes.retain(|n| n.name == r.node);
            if inv.nodes.is_empty() {
                return Err(Status::not_found(format!(
                    "node: no GPU node {:?} in cluster {:?}",
                    r.node, r.cluster
                )));
            }
        }
        Ok(Response::new(inv))
    }

    async fn capacity(
        &self,
        req: Request<v1::CapacityRequest>,
    ) -> Result<Response<v1::CapacityResponse>, Status> {
        let by = v1::CapacityGroupBy::try_from(req.into_inner().group_by)
            .map_err(|_| Status::invalid_argument("group_by: unknown grouping"))?;
        let by = match by {
            v1::CapacityGroupBy::Product | v1::CapacityGroupBy::Unspecified => GroupBy::Product,
            v1::CapacityGroupBy::Region => GroupBy::Region,
            v1::CapacityGroupBy::Cluster => GroupBy::Cluster,
            v1::CapacityGroupBy::Pool => GroupBy::Pool,
        };
        let clusters = self.view.clusters();
        let nodes: Vec<Vec<NodeInventory>> = clusters
            .iter()
            .map(|c| {
                self.view
                    .inventory(&c.name)
                    .map(|i| core_inventory(&i).nodes)
                    .unwrap_or_default()
            })
            .collect();
        let rows = capacity::capacity(
            clusters.iter().zip(&nodes).map(|(c, n)| CapacityCluster {
                name: &c.name,
                health: health_from_wire(c.health).unwrap_or(Health::Joining),
                region: (!c.region.is_empty()).then_some(c.region.as_str()),
                nodes: n,
            }),
            by,
        );
        Ok(Response::new(v1::CapacityResponse {
            rows: rows
                .into_iter()
                .map(|r| v1::CapacityRow {
                    key: r.key,
                    gpus_total: r.gpus_total,
                    gpus_allocatable: r.gpus_allocatable,
                    gpus_allocated: r.gpus_allocated,
                    gpus_free: r.gpus_free,
                    memory_total_mib: r.memory_total_mib,
                    memory_free_mib: r.memory_free_mib,
                    nodes_gpus_unknown: r.nodes_gpus_unknown,
                })
                .collect(),
        }))
    }

    async fn fit(&self, req: Request<v1::FitRequest>) -> Result<Response<v1::FitResponse>, Status> {
        let r = req.into_inner();
        if r.gpus_per_replica == 0 {
            return Err(Status::invalid_argument(
                "gpus_per_replica: must be at least 1",
            ));
        }
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let unit = match (r.shared, r.mig_profile.as_str()) {
            (true, "") => fit::FitUnit::Shared,
            (false, "") => fit::FitUnit::Whole,
            (false, p) => fit::FitUnit::Mig(p.to_string()),
            (true, _) => {
                return Err(Status::invalid_argument(
                    "shared, mig_profile: a replica asks for shared replicas or MIG slices, not both",
                ));
            }
        };
        let request = FitRequest {
            replicas: r.replicas.max(1),
            gpus_per_replica: r.gpus_per_replica,
            unit,
            min_memory_mib: r.min_memory_mib,
            product: opt(r.product),
            family: opt(r.family),
            region: opt(r.region),
        };
        let clusters = self.view.clusters();
        let invs: Vec<ClusterInventory> = clusters
            .iter()
            .map(|c| {
                self.view
                    .inventory(&c.name)
                    .map(|i| core_inventory(&i))
                    .unwrap_or(ClusterInventory {
                        nodes: vec![],
                        pools: vec![],
                    })
            })
            .collect();
        let fits: Vec<FitCluster<'_>> = clusters
            .iter()
            .zip(&invs)
            .filter(|(c, _)| health_from_wire(c.health) != Some(Health::Left))
            .map(|(c, i)| FitCluster {
                name: &c.name,
                health: health_from_wire(c.health).unwrap_or(Health::Joining),
                region: (!c.region.is_empty()).then_some(c.region.as_str()),
                inventory: i,
                incomplete: &c.inventory_incomplete,
            })
            .collect();
        let result = fit::fit(&request, &fits);
        Ok(Response::new(v1::FitResponse {
            candidates: result
                .candidates
                .into_iter()
                .map(|c| v1::FitCandidate {
                    cluster: c.cluster,
                    pool: c.pool,
                    product: c.product,
                    replicas_fit: c.replicas_fit,
                    free_gpus: c.free_gpus,
                    headroom_gpus: c.headroom_gpus,
                    degraded: c.degraded,
                    resource: c.resource,
                    device_class: c.device_class.unwrap_or_default(),
                })
                .collect(),
            rejections: result
                .rejections
                .into_iter()
                .map(|r| v1::FitRejection {
                    cluster: r.cluster,
                    reason: r.reason,
                })
                .collect(),
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        _: Request<v1::WatchFleetRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let s = BroadcastStream::new(self.view.subscribe()).map(|e| {
            e.map_err(|_| {
                Status::data_loss(
                    "this watcher fell behind the fleet's event rate; re-list and watch again",
                )
            })
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn create_join_token(
        &self,
        req: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let by = crate::security::authz::Caller::of(&req)
            .principal
            .to_string();
        let r = req.get_ref();
        conv::cluster_name("cluster", &r.cluster).map_err(|e| e.to_status())?;
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(u64::from(s)),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: at most {} (30 days)",
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        if r.uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "uses: at most {MAX_TOKEN_USES}"
            )));
        }
        let token = flotilla_core::security::JoinToken::from_random(rand::random(), rand::random());
        crate::security::authz::audit_target(
            &req,
            format!("token/{} cluster/{}", token.id, r.cluster),
        );
        let now = self.clock.unix_ms();
        let expires = now + ttl.as_millis() as i64;
        let uses = r.uses.max(1);
        let rec = v1::JoinTokenRecord {
            cluster: r.cluster.clone(),
            expires_at_unix_ms: expires,
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            uses_left: uses,
            uses,
            require_approval: r.require_approval,
            created_at_unix_ms: now,
            created_by: by,
        };
        records::put_if(&self.backend, &keys::token_key(&token.id), &rec, 0)
            .await
            .map_err(kv_status)?
            .ok_or_else(|| Status::aborted("token id collision; retry"))?;
        let join = match &self.security.tls {
            Some(tls) => flotilla_core::security::JoinString {
                token: token.clone(),
                ca_hash: tls.pin(),
            }
            .reveal(),
            None => token.reveal(),
        };
        Ok(Response::new(v1::CreateJoinTokenResponse {
            token: token.reveal(),
            expires_at_unix_ms: expires,
            id: token.id,
            join,
        }))
    }

    async fn list_join_tokens(
        &self,
        _: Request<v1::ListJoinTokensRequest>,
    ) -> Result<Response<v1::ListJoinTokensResponse>, Status> {
        use flotilla_core::kv::{KeyRange, RangeRequest};
        use prost::Message;
        let r = self
            .backend
            .range(RangeRequest::new(KeyRange::prefix(keys::TOKENS)))
            .await
            .map_err(kv_status)?;
        let tokens = r
            .kvs
            .iter()
            .filter_map(|kv| v1::JoinTokenRecord::decode(kv.value.as_slice()).ok())
            .map(|t| v1::JoinTokenRecord {
                secret_sha256: String::new(),
                ..t
            })
            .collect();
        Ok(Response::new(v1::ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<v1::RevokeJoinTokenRequest>,
    ) -> Result<Response<v1::RevokeJoinTokenResponse>, Status> {
        let id = req.get_ref().id.clone();
        crate::security::authz::audit_target(&req, format!("token/{id}"));
        if id.is_empty() || id.len() > 16 {
            return Err(Status::invalid_argument(
                "id: the token's id (flotctl token list)",
            ));
        }
        let deleted = records::delete(&self.backend, &keys::token_key(&id))
            .await
            .map_err(kv_status)?;
        if !deleted {
            return Err(Status::not_found(format!("id: no join token {id:?}")));
        }
        Ok(Response::new(v1::RevokeJoinTokenResponse {}))
    }

    async fn approve_cluster(
        &self,
        req: Request<v1::ApproveClusterRequest>,
    ) -> Result<Response<v1::ApproveClusterResponse>, Status> {
        let cluster = req.get_ref().cluster.clone();
        crate::security::authz::audit_target(&req, format!("cluster/{cluster}"));
        conv::cluster_name("cluster", &cluster).map_err(|e| e.to_status())?;
        let key = keys::approval_key(&cluster);
        let mut missing = false;
        records::update::<B, v1::ApprovalRecord, _>(&self.backend, &key, |cur| match cur {
            Some(a) => Some(v1::ApprovalRecord {
                approved: true,
                ..a
            }),
            None => {
                missing = true;
                None
            }
        })
        .await
        .map_err(kv_status)?;
        if missing {
            return Err(Status::not_found(format!(
                "cluster: no join of {cluster:?} is waiting for approval"
            )));
        }
        Ok(Response::new(v1::ApproveClusterResponse {}))
    }

    async fn remove_cluster(
        &self,
        req: Request<v1::RemoveClusterRequest>,
    ) -> Result<Response<v1::RemoveClusterResponse>, Status> {
        let by = crate::security::authz::Caller::of(&req)
            .principal
            .to_string();
        let cluster = req.get_ref().cluster.clone();
        crate::security::authz::audit_target(&req, format!("cluster/{cluster}"));
        conv::cluster_name("cluster", &cluster).map_err(|e| e.to_status())?;
        // Revoke first: from this write on, every replica refuses the cluster's certificates
        // and the leader closes its stream; only then are its records removed, so a report in
        // flight cannot bring them back.
        let rec = v1::RevocationRecord {
            cluster: cluster.clone(),
            revoked_at_unix_ms: self.clock.unix_ms(),
            by,
        };
        records::put(&self.backend, &keys::revoked_key(&cluster), &rec)
            .await
            .map_err(kv_status)?;
        let removed = self.remove_records(&cluster).await?;
        Ok(Response::new(v1::RemoveClusterResponse { removed }))
    }

    async fn create_api_token(
        &self,
        req: Request<v1::CreateApiTokenRequest>,
    ) -> Result<Response<v1::CreateApiTokenResponse>, Status> {
        let by = crate::security::authz::Caller::of(&req)
            .principal
            .to_string();
        let r = req.get_ref();
        flotilla_core::security::check_user_name(&r.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let role = flotilla_core::security::Role::parse(&r.role)
            .map_err(|e| Status::invalid_argument(format!("role: {e}")))?;
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_API_TOKEN_TTL,
            s => Duration::from_secs(u64::from(s)),
        };
        if ttl > MAX_API_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: at most {} (one year)",
                MAX_API_TOKEN_TTL.as_secs()
            )));
        }
        let token = flotilla_core::security::JoinToken::from_random(rand::random(), rand::random());
        crate::security::authz::audit_target(
            &req,
            format!("apitoken/{} {role}/{}", token.id, r.name),
        );
        let now = self.clock.unix_ms();
        let expires = now + ttl.as_millis() as i64;
        let rec = v1::ApiTokenRecord {
            id: token.id.clone(),
            name: r.name.clone(),
            role: role.to_string(),
            secret_sha256: token.secret_hash(),
            expires_at_unix_ms: expires,
            created_at_unix_ms: now,
            created_by: by,
        };
        records::put_if(&self.backend, &keys::api_token_key(&token.id), &rec, 0)
            .await
            .map_err(kv_status)?
            .ok_or_else(|| Status::aborted("token id collision; retry"))?;
        Ok(Response::new(v1::CreateApiTokenResponse {
            token: token.reveal(),
            id: token.id,
            expires_at_unix_ms: expires,
        }))
    }

    async fn list_api_tokens(
        &self,
        _: Request<v1::ListApiTokensRequest>,
    ) -> Result<Response<v1::ListApiTokensResponse>, Status> {
        use flotilla_core::kv::{KeyRange, RangeRequest};
        use prost::Message;
        let r = self
            .backend
            .range(RangeRequest::new(KeyRange::prefix(keys::API_TOKENS)))
            .await
            .map_err(kv_status)?;
        let tokens = r
            .kvs
            .iter()
            .filter_map(|kv| v1::ApiTokenRecord::decode(kv.value.as_slice()).ok())
            .map(|t| v1::ApiTokenRecord {
                secret_sha256: String::new(),
                ..t
            })
            .collect();
        Ok(Response::new(v1::ListApiTokensResponse { tokens }))
    }

    async fn revoke_api_token(
        &self,
        req: Request<v1::RevokeApiTokenRequest>,
    ) -> Result<Response<v1::RevokeApiTokenResponse>, Status> {
        let id = req.get_ref().id.clone();
        crate::security::authz::audit_target(&req, format!("apitoken/{id}"));
        if id.is_empty() || id.len() > 16 {
            return Err(Status::invalid_argument(
                "id: the token's id (flotctl apitoken list)",
            ));
        }
        if !records::delete(&self.backend, &keys::api_token_key(&id))
            .await
            .map_err(kv_status)?
        {
            return Err(Status::not_found(format!("id: no API token {id:?}")));
        }
        Ok(Response::new(v1::RevokeApiTokenResponse {}))
    }

    async fn list_audit(
        &self,
        req: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let records = crate::security::audit::list(&self.backend, r.since_unix_ms, &r.who, limit)
            .await
            .map_err(kv_status)?;
        Ok(Response::new(v1::ListAuditResponse { records }))
    }
}
