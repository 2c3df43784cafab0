//! `flotctl watch`: the fleet as it is now, then every change, as `kubectl get -w` does.

use crate::{health_name, transition_text};
use flotilla_api::v1;
use futures::StreamExt;
use serde_json::json;

use super::{Ctx, Failure, Output};

fn line(ctx: &Ctx, cluster: &str, kind: &str, detail: &str) {
    match ctx.output {
        Output::Table => println!("{cluster:<24} {kind:<10} {detail}"),
        _ => println!(
            "{}",
            json!({"cluster": cluster, "event": kind, "detail": detail})
        ),
    }
}

/// Runs `watch` until the hub closes the stream.
pub async fn run(ctx: &mut Ctx) -> Result<(), Failure> {
    // Subscribe first, then list: a change in between is printed after the list (perhaps
    // twice), never lost.
    let mut s = ctx
        .client
        .watch(v1::WatchFleetRequest {})
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    let list = ctx
        .client
        .list_clusters(v1::ListClustersRequest {})
        .await
        .map_err(|s| ctx.explain(s))?
        .into_inner();
    for c in &list.clusters {
        let mut detail = health_name(c.health).to_string();
        if !c.health_reason.is_empty() {
            detail = format!("{detail}: {}", c.health_reason);
        }
        line(ctx, &c.name, "current", &detail);
    }
    while let Some(e) = s.next().await {
        let e = e.map_err(|s| ctx.explain(s))?;
        let (kind, detail) = match &e.event {
            Some(v1::fleet_event::Event::Joined(_)) => ("joined", String::new()),
            Some(v1::fleet_event::Event::Left(_)) => ("left", String::new()),
            Some(v1::fleet_event::Event::Health(h)) => ("health", transition_text(h)),
            Some(v1::fleet_event::Event::Inventory(i)) => {
                ("inventory", format!("{} GPU nodes", i.nodes.len()))
            }
            None => ("unknown", String::new()),
        };
        line(ctx, &e.cluster, kind, &detail);
    }
    Ok(())
}
