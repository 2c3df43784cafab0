//! FleetService: reads and queries answered from this replica's FleetView; join tokens are
//! written through the store (any replica; followers forward).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::convert::fleet::{self as conv, ReportLimits, health_from_wire};
use flotilla_api::v1;
use flotilla_core::fit::{self, FitCluster, FitRequest};
use flotilla_core::health::Health;
use flotilla_core::inventory::{ClusterInventory, GpuUnit, NodeInventory};
use flotilla_core::kv::KvBackend;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use super::health::unix_ms;
use super::records;
use super::view::FleetView;

/// Default join token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The fleet read API.
pub struct FleetSvc<B> {
    /// Store (for tokens).
    pub backend: B,
    /// This replica's view.
    pub view: Arc<FleetView>,
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

/// Physical GPUs a node can hand out (allocatable, in whole GPUs).
fn allocatable_gpus(n: &NodeInventory) -> i64 {
    let whole: i64 = n
        .resources
        .iter()
        .map(|r| match r.unit {
            GpuUnit::Whole => r.allocatable,
            GpuUnit::Shared(k) => r.allocatable / i64::from(k.max(1)),
            _ => 0,
        })
        .sum();
    if whole > 0
        || n.resources
            .iter()
            .all(|r| matches!(r.unit, GpuUnit::Whole | GpuUnit::Shared(_)))
    {
        whole
    } else {
        // MIG or partitions only: count physical GPUs while anything is advertised.
        if n.resources.iter().any(|r| r.allocatable > 0) {
            n.physical_gpus
        } else {
            0
        }
    }
}

/// GPUs with nothing in use. For whole and shared GPUs that is the inventory's free count; for
/// MIG or partitioned GPUs, a lower bound: each allocated slice may sit on a different GPU.
fn unused_gpus(n: &NodeInventory) -> i64 {
    if n.resources
        .iter()
        .any(|r| matches!(r.unit, GpuUnit::Whole | GpuUnit::Shared(_)))
    {
        return n.free_gpus;
    }
    if n.resources.iter().all(|r| r.allocatable == 0) {
        return 0;
    }
    let used: i64 = n.resources.iter().map(|r| r.allocated).sum();
    (n.physical_gpus - used).max(0)
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
        let mut rows: BTreeMap<String, v1::CapacityRow> = BTreeMap::new();
        for c in self.view.clusters() {
            if health_from_wire(c.health) == Some(Health::Left) {
                continue;
            }
            let Some(inv) = self.view.inventory(&c.name) else {
                continue;
            };
            for n in core_inventory(&inv).nodes {
                let key = match by {
                    v1::CapacityGroupBy::Product | v1::CapacityGroupBy::Unspecified => {
                        n.product.clone().unwrap_or_else(|| "unknown".into())
                    }
                    v1::CapacityGroupBy::Region => n.region.clone().unwrap_or_else(|| {
                        if c.region.is_empty() {
                            "unknown".into()
                        } else {
                            c.region.clone()
                        }
                    }),
                    v1::CapacityGroupBy::Cluster => c.name.clone(),
                    v1::CapacityGroupBy::Pool => {
                        format!("{}/{}", c.name, n.pool.clone().unwrap_or_default())
                    }
                };
                let row = rows.entry(key.clone()).or_insert_with(|| v1::CapacityRow {
                    key,
                    ..Default::default()
                });
                let alloc = allocatable_gpus(&n);
                let free = if n.ready && n.schedulable {
                    unused_gpus(&n)
                } else {
                    0
                };
                let mem = n.gpu_memory_mib.unwrap_or(0);
                row.gpus_total += n.physical_gpus;
                row.gpus_allocatable += alloc;
                row.gpus_allocated += (alloc - unused_gpus(&n)).max(0);
                row.gpus_free += free;
                row.memory_total_mib += mem * n.physical_gpus.max(0) as u64;
                row.memory_free_mib += mem * free.max(0) as u64;
            }
        }
        Ok(Response::new(v1::CapacityResponse {
            rows: rows.into_values().collect(),
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
        let request = FitRequest {
            replicas: r.replicas.max(1),
            gpus_per_replica: r.gpus_per_replica,
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
        let r = req.into_inner();
        conv::cluster_name("cluster", &r.cluster).map_err(|e| e.to_status())?;
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            Duration::from_secs(u64::from(r.ttl_seconds))
        };
        let token = format!("flt_{}", uuid::Uuid::new_v4().simple());
        let expires = unix_ms() + ttl.as_millis() as i64;
        let rec = v1::JoinTokenRecord {
            cluster: r.cluster,
            expires_at_unix_ms: expires,
        };
        records::put_if(&self.backend, &records::token_key(&token), &rec, 0)
            .await
            .map_err(flotilla_api::convert::kv::to_status)?
            .ok_or_else(|| Status::aborted("token collision; retry"))?;
        Ok(Response::new(v1::CreateJoinTokenResponse {
            token,
            expires_at_unix_ms: expires,
        }))
    }
}
