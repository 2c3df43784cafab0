//! Campaign records in the store: a header per campaign (`/campaigns/<id>/spec`: the campaign
//! without its clusters' runs) and one record per cluster run
//! (`/campaigns/<id>/clusters/<cluster>`), so a step rewrites one small record rather than the
//! whole campaign; the clusters it shifted out of routing (`/shifts/<cluster>`), in the same
//! transaction; and the controller's fencing term (`/campaign-epoch`): every write compares
//! it, so a controller whose term has ended cannot write.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_api::v1;
use flotilla_core::campaign::machine::{Campaign, ClusterRun};
use flotilla_core::kv::{
    Compare, CompareOp, CompareTarget, KeyRange, KvBackend, KvError, Op, RangeRequest, TxnRequest,
};
use prost::Message;

use crate::store::keys;

/// Writes per transaction: below the store's limit of 128 operations (one is the compare).
const OPS_PER_TXN: usize = 100;

/// A campaign as stored: its header and cluster records, gathered from a range.
#[derive(Default)]
struct Parts {
    header: Option<Campaign>,
    runs: Vec<(u32, u32, ClusterRun)>,
}

fn assemble(parts: Parts) -> Result<Campaign, String> {
    let Some(mut c) = parts.header else {
        return Err("cluster records without a header".into());
    };
    let mut runs = parts.runs;
    runs.sort_by_key(|(stage, pos, _)| (*stage, *pos));
    for (stage, _, run) in runs {
        let s = c
            .stages
            .get_mut(stage as usize)
            .ok_or_else(|| format!("campaign {}: a run names stage {stage}", c.id))?;
        s.clusters.push(run);
    }
    Ok(c)
}

/// Group a range of `/campaigns/` into campaigns with their newest mod revision.
fn gather(kvs: Vec<flotilla_core::kv::KeyValue>) -> Vec<(Campaign, i64)> {
    let mut by_id: BTreeMap<String, Parts> = BTreeMap::new();
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key).to_string();
        let Some(rest) = key.strip_prefix(keys::CAMPAIGNS) else {
            continue;
        };
        let Some((id, what)) = rest.split_once('/') else {
            continue;
        };
        let n = newest.entry(id.to_string()).or_default();
        *n = (*n).max(kv.mod_revision);
        let parts = by_id.entry(id.to_string()).or_default();
        let decoded = if what == "spec" {
            v1::CampaignRecord::decode(kv.value.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|r| serde_json::from_str(&r.state_json).map_err(|e| e.to_string()))
                .map(|c| parts.header = Some(c))
        } else {
            v1::CampaignClusterRecord::decode(kv.value.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    serde_json::from_str(&r.run_json)
                        .map(|run| parts.runs.push((r.stage, r.position, run)))
                        .map_err(|e| e.to_string())
                })
        };
        if let Err(e) = decoded {
            tracing::error!(key, error = %e, "a stored campaign record does not decode");
        }
    }
    by_id
        .into_iter()
        .filter_map(|(id, parts)| match assemble(parts) {
            Ok(c) => Some((c, newest[&id])),
            Err(e) => {
                tracing::error!(campaign = id, error = %e, "a stored campaign is incomplete; left alone");
                None
            }
        })
        .collect()
}

/// Every stored campaign with its newest record's revision.
pub async fn load_all<B: KvBackend>(b: &B) -> Result<Vec<(Campaign, i64)>, KvError> {
    let r = b
        .range(RangeRequest::new(KeyRange::prefix(keys::CAMPAIGNS)))
        .await?;
    Ok(gather(r.kvs))
}

/// One campaign, if stored.
pub async fn load<B: KvBackend>(b: &B, id: &str) -> Result<Option<(Campaign, i64)>, KvError> {
    let r = b
        .range(RangeRequest::new(KeyRange::prefix(keys::campaign_prefix(
            id,
        ))))
        .await?;
    Ok(gather(r.kvs).into_iter().next())
}

/// Write what changed from `before` (the stored version; `None`: a new campaign) to `c`,
/// fenced by `term`. `Ok(None)`: another term has started, nothing was written.
pub async fn save<B: KvBackend>(
    b: &B,
    term: u64,
    c: &Campaign,
    before: Option<&Campaign>,
    now_ms: i64,
) -> Result<Option<i64>, KvError> {
    let mut ops = Vec::new();
    let h = c.header();
    if before.map(Campaign::header).as_ref() != Some(&h) {
        let rec = v1::CampaignRecord {
            id: c.id.clone(),
            state_json: serde_json::to_string(&h).expect("a campaign serializes"),
            updated_at_unix_ms: now_ms,
        };
        ops.push(Op::put(keys::campaign_key(&c.id), rec.encode_to_vec()));
    }
    let old: BTreeMap<&str, &ClusterRun> = before
        .map(|b| b.clusters().map(|(_, r)| (r.name.as_str(), r)).collect())
        .unwrap_or_default();
    for (i, s) in c.stages.iter().enumerate() {
        for (pos, run) in s.clusters.iter().enumerate() {
            if old.get(run.name.as_str()) == Some(&run) {
                continue;
            }
            let rec = v1::CampaignClusterRecord {
                campaign: c.id.clone(),
                stage: i as u32,
                position: pos as u32,
                run_json: serde_json::to_string(run).expect("a run serializes"),
            };
            ops.push(Op::put(
                keys::campaign_cluster_key(&c.id, &run.name),
                rec.encode_to_vec(),
            ));
        }
    }
    let was: BTreeSet<&str> = before
        .map(|b| b.shifted_away().collect())
        .unwrap_or_default();
    let now: BTreeSet<&str> = c.shifted_away().collect();
    for cluster in now.difference(&was) {
        let shift = v1::TrafficShiftRecord {
            cluster: cluster.to_string(),
            campaign: c.id.clone(),
            since_unix_ms: now_ms,
        };
        ops.push(Op::put(keys::shift_key(cluster), shift.encode_to_vec()));
    }
    for cluster in was.difference(&now) {
        ops.push(Op::delete(keys::shift_key(cluster)));
    }
    if ops.is_empty() {
        return Ok(Some(0));
    }
    // Within the store's per-transaction limit, header first: it carries `next_seq`, so a
    // crash between chunks can never let a sequence number be used twice, and nothing is sent
    // before every chunk is stored.
    let mut revision = 0;
    for chunk in ops.chunks(OPS_PER_TXN) {
        let r = b
            .txn(TxnRequest {
                compare: vec![Compare {
                    key: keys::CAMPAIGN_EPOCH.as_bytes().to_vec(),
                    op: CompareOp::Equal,
                    target: CompareTarget::ModRevision(term as i64),
                }],
                success: chunk.to_vec(),
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Ok(None);
        }
        revision = r.revision;
    }
    Ok(Some(revision))
}

/// Start a controller term: write the epoch key; its revision is the term. Revisions only
/// grow, so a later term always fences an earlier one.
pub async fn new_term<B: KvBackend>(b: &B) -> Result<u64, KvError> {
    let r = b
        .txn(TxnRequest {
            compare: vec![],
            success: vec![Op::put(keys::CAMPAIGN_EPOCH, Vec::new())],
            failure: vec![],
        })
        .await?;
    Ok(r.revision as u64)
}

#[cfg(test)]
mod tests {
    use flotilla_core::campaign::plan::{Member, snapshot};
    use flotilla_core::kv::Limits;
    use flotilla_test_support::mem_kv::MemBackend;

    use super::*;

    fn campaign(clusters: usize) -> Campaign {
        let spec = flotilla_core::campaign::spec::parse_json(
            r#"{"name": "c", "pool": {"name": "gpu"}, "green": {"clusterApi": {"version": "v2"}},
                "stages": [{"name": "all"}]}"#,
        )
        .unwrap();
        let members: Vec<Member> = (0..clusters)
            .map(|i| Member {
                name: format!("c{i:04}"),
                labels: Default::default(),
            })
            .collect();
        Campaign::new("c-1".into(), spec.clone(), snapshot(&spec, &members), 0)
    }

    #[tokio::test]
    async fn a_campaign_of_many_clusters_is_stored_within_the_transaction_limit_and_fenced() {
        let b = MemBackend::new(Limits::default());
        let term = new_term(&b).await.unwrap();
        let c = campaign(300);
        assert!(save(&b, term, &c, None, 0).await.unwrap().is_some());
        let (back, _) = load(&b, "c-1").await.unwrap().unwrap();
        assert_eq!(back, c, "header and 300 runs read back whole, in order");
        // A later term fences this one: nothing is written.
        let newer = new_term(&b).await.unwrap();
        assert!(newer > term);
        let mut changed = c.clone();
        changed.reason = "changed".into();
        assert_eq!(save(&b, term, &changed, Some(&c), 0).await.unwrap(), None);
        assert_eq!(load(&b, "c-1").await.unwrap().unwrap().0, c);
        assert!(
            save(&b, newer, &changed, Some(&c), 0)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(load(&b, "c-1").await.unwrap().unwrap().0.reason, "changed");
    }
}
