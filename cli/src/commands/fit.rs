//! `flotctl fit`: where can replicas × GPUs run?

use crate::{parse_memory_mib, table};
use clap::Args;
use flotilla_api::v1;
use serde_json::json;

use super::{Ctx, Failure};

/// The request.
#[derive(Debug, Args)]
pub struct FitArgs {
    /// GPUs per replica (with --shared: shared replicas; with --mig-profile: slices).
    #[arg(long)]
    gpus: u32,
    /// Each replica takes time-sliced/MPS GPU replicas (no memory or fault isolation).
    #[arg(long, conflicts_with = "mig_profile")]
    shared: bool,
    /// Each replica takes MIG slices of this profile, e.g. 1g.10gb.
    #[arg(long)]
    mig_profile: Option<String>,
    /// Replicas.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Minimum memory per GPU, e.g. 80Gi, 40960Mi.
    #[arg(long)]
    min_memory: Option<String>,
    /// Product substring, e.g. H100.
    #[arg(long)]
    product: Option<String>,
    /// Architecture family, e.g. hopper.
    #[arg(long)]
    family: Option<String>,
    /// Region.
    #[arg(long)]
    region: Option<String>,
}

/// Runs `fit`; exit code 5 when nothing fits.
pub async fn run(ctx: &mut Ctx, a: FitArgs) -> Result<(), Failure> {
    let min_memory_mib = match &a.min_memory {
        Some(m) => parse_memory_mib(m).map_err(|e| (format!("--min-memory: {e}"), 2))?,
        None => 0,
    };
    let r = ctx
        .client
        .fit(v1::FitRequest {
            replicas: a.replicas,
            gpus_per_replica: a.gpus,
            min_memory_mib,
            product: a.product.unwrap_or_default(),
            family: a.family.unwrap_or_default(),
            region: a.region.unwrap_or_default(),
            shared: a.shared,
            mig_profile: a.mig_profile.unwrap_or_default(),
        })
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let v = json!({
        "candidates": r.candidates.iter().map(|c| json!({"cluster": c.cluster, "pool": c.pool, "product": c.product,
            "replicas_fit": c.replicas_fit, "free_gpus": c.free_gpus, "headroom_gpus": c.headroom_gpus, "degraded": c.degraded,
            "resource": c.resource, "device_class": c.device_class})).collect::<Vec<_>>(),
        "rejections": r.rejections.iter().map(|x| json!({"cluster": x.cluster, "reason": x.reason})).collect::<Vec<_>>(),
    });
    ctx.print(&v, || {
        let mut out = table(
            &[
                "RANK", "CLUSTER", "POOL", "PRODUCT", "FITS", "FREE", "HEADROOM", "REQUEST",
            ],
            r.candidates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    vec![
                        (i + 1).to_string(),
                        c.cluster.clone(),
                        c.pool.clone(),
                        c.product.clone(),
                        c.replicas_fit.to_string(),
                        c.free_gpus.to_string(),
                        c.headroom_gpus.to_string(),
                        match c.device_class.as_str() {
                            "" => c.resource.clone(),
                            class => format!("ResourceClaim ({class})"),
                        },
                    ]
                })
                .collect(),
        );
        if !r.rejections.is_empty() {
            out.push_str("\nDoes not fit:\n");
            for x in &r.rejections {
                out.push_str(&format!("  {}: {}\n", x.cluster, x.reason));
            }
        }
        out
    });
    if r.candidates.is_empty() {
        return Err(("no cluster can run this request now".into(), 5));
    }
    Ok(())
}
