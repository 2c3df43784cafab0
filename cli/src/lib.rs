//! `flotctl`, the Flotilla command line, as a library: the entry point ([`app::main_from`]),
//! one module per command group ([`commands`]), and the helpers below (tables, JSON views of
//! fleet records, times, argument parsing).

pub mod app;
pub mod commands;

use flotilla_api::v1;
use serde_json::{Value, json};

/// A left-aligned text table with a header row.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A health value as people read it.
pub fn health_name(h: i32) -> &'static str {
    match v1::ClusterHealth::try_from(h) {
        Ok(v1::ClusterHealth::Joining) => "Joining",
        Ok(v1::ClusterHealth::Ready) => "Ready",
        Ok(v1::ClusterHealth::Degraded) => "Degraded",
        Ok(v1::ClusterHealth::Unreachable) => "Unreachable",
        Ok(v1::ClusterHealth::Left) => "Left",
        _ => "Unknown",
    }
}

/// Where a transition came from, as people read it (`new` for a cluster's first).
pub fn from_name(h: i32) -> &'static str {
    if h == v1::ClusterHealth::Unspecified as i32 {
        "new"
    } else {
        health_name(h)
    }
}

/// `Ready -> Degraded: reason`.
pub fn transition_text(h: &v1::HealthTransition) -> String {
    format!(
        "{} -> {}: {}",
        from_name(h.from),
        health_name(h.to),
        h.reason
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as RFC 3339 UTC, to the second (`2026-12-01T19:38:19Z`).
pub fn rfc3339(unix_ms: i64) -> String {
    match jiff::Timestamp::from_second(unix_ms.div_euclid(1000)) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) => format!("{unix_ms} ms after the Unix epoch"),
    }
}

/// How long ago, as kubectl prints ages: `42s`, `17m`, `5h`, `3d`.
pub fn age(now_unix_ms: i64, at_unix_ms: i64) -> String {
    let s = (now_unix_ms - at_unix_ms).max(0) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7_200 => format!("{}m", s / 60),
        7_200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `2026-12-01T19:38:19Z (5m ago)`.
pub fn when(now_unix_ms: i64, at_unix_ms: i64) -> String {
    format!(
        "{} ({} ago)",
        rfc3339(at_unix_ms),
        age(now_unix_ms, at_unix_ms)
    )
}

/// Parse `80Gi`, `40960Mi`, `80G` (decimal) or a bare number of MiB into MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 80Gi"))?;
    Ok(match unit {
        "" | "Mi" => n,
        "Gi" => n * 1024,
        "Ti" => n * 1024 * 1024,
        "G" => n * 1_000_000_000 / (1 << 20),
        "M" => n * 1_000_000 / (1 << 20),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use Mi, Gi, Ti, M or G)"
            ));
        }
    })
}

/// A cluster record as JSON.
pub fn cluster_json(c: &v1::Cluster) -> Value {
    json!({
        "name": c.name,
        "health": health_name(c.health),
        "health_reason": c.health_reason,
        "region": c.region,
        "kubernetes_version": c.kubernetes_version,
        "agent_version": c.agent_version,
        "labels": c.labels,
        "joined_at_unix_ms": c.joined_at_unix_ms,
        "joined_at": rfc3339(c.joined_at_unix_ms),
        "nodes": c.nodes,
        "gpus": c.physical_gpus,
        "free_gpus": c.free_gpus,
        "history": c.history.iter().map(|h| json!({
            "from": from_name(h.from), "to": health_name(h.to), "reason": h.reason,
            "at_unix_ms": h.at_unix_ms, "at": rfc3339(h.at_unix_ms),
        })).collect::<Vec<_>>(),
    })
}

fn resource_json(r: &v1::GpuResource) -> Value {
    json!({"name": r.name, "capacity": r.capacity, "allocatable": r.allocatable, "allocated": r.allocated, "free": r.free})
}

/// An inventory as JSON.
pub fn inventory_json(i: &v1::Inventory) -> Value {
    json!({
        "pools": i.pools.iter().map(|p| json!({
            "name": p.name, "nodes": p.nodes, "usable_nodes": p.usable_nodes, "products": p.products,
            "gpus": p.physical_gpus, "gpus_unknown_nodes": p.physical_unknown_nodes,
            "free_gpus": p.free_gpus, "idle_gpus": p.idle_gpus, "failed_gpus": p.failed_gpus,
            "resources": p.resources.iter().map(resource_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "nodes": i.nodes.iter().map(|n| json!({
            "name": n.name, "pool": n.pool, "ready": n.ready, "schedulable": n.schedulable,
            "zone": n.zone, "instance_type": n.instance_type, "product": n.product,
            "gpu_memory_mib": n.gpu_memory_mib,
            "gpus": if n.physical_unknown { Value::Null } else { json!(n.physical_gpus) },
            "free_gpus": n.free_gpus, "idle_gpus": n.idle_gpus, "failed_gpus": n.failed_gpus,
            "condition": condition_name(n.condition), "problem": n.problem,
            "resources": n.resources.iter().map(resource_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A node's GPU condition as `describe` prints it.
pub fn condition_name(c: i32) -> &'static str {
    match v1::GpuCondition::try_from(c) {
        Ok(v1::GpuCondition::Healthy) => "Healthy",
        Ok(v1::GpuCondition::NotAdvertised) => "NotAdvertised",
        Ok(v1::GpuCondition::Degraded) => "Degraded",
        Ok(v1::GpuCondition::Failed) => "Failed",
        _ => "Unknown",
    }
}

/// `flotctl describe cluster` as text; times are shown with their age at `now_unix_ms`.
pub fn describe_text(c: &v1::Cluster, i: &v1::Inventory, now_unix_ms: i64) -> String {
    let mut out = format!(
        "Name:        {}\nHealth:      {}{}\nRegion:      {}\nKubernetes:  {}\nAgent:       {}\nJoined:      {}\nGPUs:        {} ({} requestable whole) on {} nodes\n",
        c.name,
        health_name(c.health),
        if c.health_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.health_reason)
        },
        c.region,
        c.kubernetes_version,
        c.agent_version,
        when(now_unix_ms, c.joined_at_unix_ms),
        c.physical_gpus,
        c.free_gpus,
        c.nodes,
    );
    out.push_str("\nPools:\n");
    out.push_str(&table(
        &[
            "POOL",
            "NODES",
            "USABLE",
            "PRODUCTS",
            "GPUS",
            "WHOLE-FREE",
            "IDLE",
            "FAILED",
        ],
        i.pools
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.nodes.to_string(),
                    p.usable_nodes.to_string(),
                    p.products.join(","),
                    match p.physical_unknown_nodes {
                        0 => p.physical_gpus.to_string(),
                        n => format!("{}+{n} nodes unknown", p.physical_gpus),
                    },
                    p.free_gpus.to_string(),
                    p.idle_gpus.to_string(),
                    p.failed_gpus.to_string(),
                ]
            })
            .collect(),
    ));
    out.push_str("\nNodes:\n");
    out.push_str(&table(
        &[
            "NODE",
            "POOL",
            "READY",
            "SCHEDULABLE",
            "PRODUCT",
            "GPUS",
            "WHOLE-FREE",
            "IDLE",
            "CONDITION",
            "RESOURCES",
        ],
        i.nodes
            .iter()
            .map(|n| {
                let res: Vec<String> = n
                    .resources
                    .iter()
                    .map(|r| format!("{} {}/{}", r.name, r.allocated, r.allocatable))
                    .collect();
                vec![
                    n.name.clone(),
                    n.pool.clone(),
                    n.ready.to_string(),
                    n.schedulable.to_string(),
                    n.product.clone(),
                    match n.physical_unknown {
                        true => "?".to_string(),
                        false => n.physical_gpus.to_string(),
                    },
                    n.free_gpus.to_string(),
                    n.idle_gpus.to_string(),
                    match n.problem.as_str() {
                        "" => condition_name(n.condition).to_string(),
                        p => format!("Unusable: {p}"),
                    },
                    res.join(", "),
                ]
            })
            .collect(),
    ));
    out.push_str("\nHealth history (newest first):\n");
    for h in &c.history {
        out.push_str(&format!(
            "  {}  {}\n",
            when(now_unix_ms, h.at_unix_ms),
            transition_text(h)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("80Gi").unwrap(), 81920);
        assert_eq!(parse_memory_mib("40960Mi").unwrap(), 40960);
        assert_eq!(parse_memory_mib("512").unwrap(), 512);
        assert_eq!(parse_memory_mib("80G").unwrap(), 76293);
        assert!(parse_memory_mib("lots").is_err());
        assert!(
            parse_memory_mib("8Qi")
                .unwrap_err()
                .contains("unknown unit")
        );
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A     LONGER\nxyz   1\n");
    }

    #[test]
    fn times_read_as_rfc3339_with_an_age() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_153_899_999), "2026-12-01T19:38:19Z");
        assert_eq!(age(100_000, 58_000), "42s");
        assert_eq!(age(3_600_000, 0), "60m");
        assert_eq!(age(5 * 3_600_000, 0), "5h");
        assert_eq!(age(3 * 86_400_000, 0), "3d");
        assert_eq!(
            age(0, 5_000),
            "0s",
            "a clock behind the hub's is not negative"
        );
        assert_eq!(when(61_000, 1_000), "1970-01-01T00:00:01Z (60s ago)");
    }

    #[test]
    fn a_first_transition_reads_from_new() {
        let h = v1::HealthTransition {
            from: v1::ClusterHealth::Unspecified as i32,
            to: v1::ClusterHealth::Joining as i32,
            reason: "joined the fleet".into(),
            at_unix_ms: 0,
        };
        assert_eq!(transition_text(&h), "new -> Joining: joined the fleet");
    }

    #[test]
    fn health_names() {
        assert_eq!(health_name(v1::ClusterHealth::Degraded as i32), "Degraded");
        assert_eq!(health_name(99), "Unknown");
    }
}
