//! The hub's records in the store (keys in `keys.rs`): typed changes for the mirror, the
//! inventory record assembled from already-encoded nodes, and the read/write helpers.

use flotilla_api::v1;
use flotilla_core::kv::{
    Compare, CompareOp, CompareTarget, Consistency, KeyRange, KvBackend, KvError, Op, RangeRequest,
    TxnRequest,
};
use prost::Message;
use prost::bytes::{BufMut, Bytes};

use super::keys::Key;

/// One change to a mirrored record (`None`: deleted).
#[derive(Debug, Clone)]
pub enum Change {
    /// `/clusters/<name>`.
    Cluster {
        /// Cluster name.
        name: String,
        /// The record (boxed: it is several times the size of the other variant).
        record: Option<Box<v1::Cluster>>,
    },
    /// `/inventory/<name>`, left encoded: decoded, ten thousand inventories at once (a load)
    /// would take hundreds of MiB, so each subscriber decodes one at a time what it needs.
    Inventory {
        /// Cluster name.
        name: String,
        /// The `v1::Inventory` record's bytes.
        encoded: Option<Bytes>,
    },
    /// `/exports/<cluster>/<namespace>/<name>`, validated into core (boxed: large).
    Export {
        /// Exporting cluster.
        cluster: String,
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// The export.
        record: Option<Box<flotilla_core::export::Export>>,
    },
    /// `/loads/<cluster>/<namespace>/<name>`: an export's inference load.
    Load {
        /// Exporting cluster.
        cluster: String,
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// The record.
        record: Option<v1::InferenceLoadRecord>,
    },
    /// `/shifts/<cluster>`: a campaign took the cluster out of routing (`None`: it is back).
    Shift {
        /// Cluster name.
        cluster: String,
        /// The campaign's id.
        campaign: Option<String>,
    },
    /// `/revoked/<cluster>`: the time before which the cluster's certificates are refused
    /// (`None`: not revoked).
    Revoked {
        /// Cluster name.
        cluster: String,
        /// Unix ms.
        at_unix_ms: Option<i64>,
    },
    /// `/apitokens/<id>`: an API bearer token (`None`: revoked).
    ApiToken {
        /// Its id.
        id: String,
        /// The record.
        record: Option<v1::ApiTokenRecord>,
    },
    /// `/policies/...`: a routing policy (empty namespace and name: the fleet default).
    Policy {
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// The record.
        record: Option<v1::RoutingPolicyRecord>,
    },
}

impl Change {
    /// Decode a put (`Some(value)`) or delete of `key`. `None` for keys that are not mirrored;
    /// `Some(Err)` for a cluster record that does not decode.
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Option<Result<Change, String>> {
        let undecodable = |e: prost::DecodeError| {
            format!("{}: undecodable record: {e}", String::from_utf8_lossy(key))
        };
        Some(match Key::parse(key)? {
            Key::Cluster(name) => match value.map(v1::Cluster::decode).transpose() {
                Ok(record) => Ok(Change::Cluster {
                    name: name.to_string(),
                    record: record.map(Box::new),
                }),
                Err(e) => Err(undecodable(e)),
            },
            Key::Inventory(name) => Ok(Change::Inventory {
                name: name.to_string(),
                encoded: value.map(Bytes::copy_from_slice),
            }),
            Key::Export(cluster, namespace, name) => {
                let record = match value {
                    None => None,
                    Some(v) => {
                        let w = v1::ServiceExport::decode(v).map_err(undecodable);
                        let e = w.and_then(|w| {
                            flotilla_api::convert::discovery::export_from_wire(
                                &w, cluster, "stored",
                            )
                            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(key)))
                        });
                        match e {
                            Ok(e) => Some(Box::new(e)),
                            Err(e) => return Some(Err(e)),
                        }
                    }
                };
                Ok(Change::Export {
                    cluster: cluster.to_string(),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    record,
                })
            }
            Key::Load(cluster, namespace, name) => {
                match value.map(v1::InferenceLoadRecord::decode).transpose() {
                    Ok(record) => Ok(Change::Load {
                        cluster: cluster.to_string(),
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        record,
                    }),
                    Err(e) => Err(undecodable(e)),
                }
            }
            Key::Shift(cluster) => match value.map(v1::TrafficShiftRecord::decode).transpose() {
                Ok(r) => Ok(Change::Shift {
                    cluster: cluster.to_string(),
                    campaign: r.map(|r| r.campaign),
                }),
                Err(e) => Err(undecodable(e)),
            },
            Key::Revoked(cluster) => match value.map(v1::RevocationRecord::decode).transpose() {
                Ok(r) => Ok(Change::Revoked {
                    cluster: cluster.to_string(),
                    at_unix_ms: r.map(|r| r.revoked_at_unix_ms),
                }),
                Err(e) => Err(undecodable(e)),
            },
            Key::ApiToken(id) => match value.map(v1::ApiTokenRecord::decode).transpose() {
                Ok(record) => Ok(Change::ApiToken {
                    id: id.to_string(),
                    record,
                }),
                Err(e) => Err(undecodable(e)),
            },
            Key::Policy(namespace, name) => {
                match value.map(v1::RoutingPolicyRecord::decode).transpose() {
                    Ok(record) => Ok(Change::Policy {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        record,
                    }),
                    Err(e) => Err(undecodable(e)),
                }
            }
        })
    }
}

/// The bytes of `v1::Inventory { cluster, nodes, pools, updated_at_unix_ms }` built from
/// nodes that are already encoded, so a delta re-encodes none of the nodes it does not carry.
pub fn encode_inventory<'a>(
    cluster: &str,
    nodes: impl ExactSizeIterator<Item = &'a Bytes>,
    pools: &[v1::PoolInventory],
    updated_at_unix_ms: i64,
) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let mut nodes_len = 0;
    let nodes: Vec<&Bytes> = nodes.collect();
    for n in &nodes {
        nodes_len += 1 + encoded_len_varint(n.len() as u64) + n.len();
    }
    let mut buf = Vec::with_capacity(cluster.len() + 8 + nodes_len + 64 * pools.len());
    // Fields in number order, as prost writes them, so the bytes equal a whole-message encode.
    if !cluster.is_empty() {
        prost::encoding::string::encode(1, &cluster.to_string(), &mut buf);
    }
    for n in nodes {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(n.len() as u64, &mut buf);
        buf.put_slice(n);
    }
    for p in pools {
        prost::encoding::message::encode(3, p, &mut buf);
    }
    if updated_at_unix_ms != 0 {
        prost::encoding::int64::encode(4, &updated_at_unix_ms, &mut buf);
    }
    buf
}

/// Read one record and its mod revision (0 when absent), linearizably.
pub async fn get<B: KvBackend, M: Message + Default>(
    b: &B,
    key: &str,
) -> Result<(Option<M>, i64), KvError> {
    get_at(b, key, Consistency::Linearizable).await
}

/// Read one record from this replica's applied state, without a round of Raft: for
/// read-modify-writes, whose compare on the mod revision catches a stale read.
pub async fn get_local<B: KvBackend, M: Message + Default>(
    b: &B,
    key: &str,
) -> Result<(Option<M>, i64), KvError> {
    get_at(b, key, Consistency::Serializable).await
}

async fn get_at<B: KvBackend, M: Message + Default>(
    b: &B,
    key: &str,
    consistency: Consistency,
) -> Result<(Option<M>, i64), KvError> {
    let mut req = RangeRequest::new(KeyRange::key(key));
    req.consistency = consistency;
    let r = b.range(req).await?;
    match r.kvs.into_iter().next() {
        Some(kv) => {
            let m = M::decode(kv.value.as_slice())
                .map_err(|e| KvError::Internal(format!("{key}: undecodable record: {e}")))?;
            Ok((Some(m), kv.mod_revision))
        }
        None => Ok((None, 0)),
    }
}

/// Write a record if it still has `mod_revision` (0 = must not exist). `Ok(None)` when another
/// writer got there first; `Ok(Some(revision))` on success.
pub async fn put_if<B: KvBackend, M: Message>(
    b: &B,
    key: &str,
    m: &M,
    mod_revision: i64,
) -> Result<Option<i64>, KvError> {
    let r = b
        .txn(TxnRequest {
            compare: vec![Compare {
                key: key.as_bytes().to_vec(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(mod_revision),
            }],
            success: vec![Op::put(key, m.encode_to_vec())],
            failure: vec![],
        })
        .await?;
    Ok(r.succeeded.then_some(r.revision))
}

/// Write encoded bytes unconditionally (for keys only one writer owns, such as a connected
/// cluster's inventory). Returns the revision.
pub async fn put_bytes<B: KvBackend>(b: &B, key: &str, value: Vec<u8>) -> Result<i64, KvError> {
    let r = b
        .txn(TxnRequest {
            compare: vec![],
            success: vec![Op::put(key, value)],
            failure: vec![],
        })
        .await?;
    Ok(r.revision)
}

/// Write a record unconditionally. Returns the revision.
pub async fn put<B: KvBackend, M: Message>(b: &B, key: &str, m: &M) -> Result<i64, KvError> {
    put_bytes(b, key, m.encode_to_vec()).await
}

/// Delete one key; whether it existed.
pub async fn delete<B: KvBackend>(b: &B, key: &str) -> Result<bool, KvError> {
    let r = b
        .txn(TxnRequest {
            compare: vec![],
            success: vec![Op::delete(key)],
            failure: vec![],
        })
        .await?;
    Ok(
        matches!(r.results.first(), Some(flotilla_core::kv::OpResult::Delete { deleted, .. }) if *deleted > 0),
    )
}

/// Read-modify-write a record with compare-on-revision, retrying on conflicts. `f` gets the
/// current record (if any) and returns the new one, or `None` to leave it alone. The read is
/// local (see [`get_local`]): a stale one costs a retry when writing, and a linearizable
/// re-read before concluding there is nothing to write.
pub async fn update<B, M, F>(b: &B, key: &str, mut f: F) -> Result<Option<i64>, KvError>
where
    B: KvBackend,
    M: Message + Default,
    F: FnMut(Option<M>) -> Option<M>,
{
    for _ in 0..16 {
        let (cur, mut rev) = get_local::<B, M>(b, key).await?;
        let new = match f(cur) {
            Some(new) => new,
            // "Nothing to do" from a possibly stale read is confirmed by a linearizable one.
            None => {
                let (cur, r) = get::<B, M>(b, key).await?;
                rev = r;
                match f(cur) {
                    Some(new) => new,
                    None => return Ok(None),
                }
            }
        };
        if let Some(r) = put_if(b, key, &new, rev).await? {
            return Ok(Some(r));
        }
    }
    Err(KvError::Unavailable(format!(
        "{key}: too many concurrent writers"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inventory_built_from_encoded_nodes_equals_a_whole_encode() {
        let nodes: Vec<v1::NodeInventory> = ["a", "b"]
            .iter()
            .map(|n| v1::NodeInventory {
                name: n.to_string(),
                pool: "p".into(),
                physical_gpus: 8,
                ..Default::default()
            })
            .collect();
        let pools = vec![v1::PoolInventory {
            name: "p".into(),
            nodes: 2,
            physical_gpus: 16,
            ..Default::default()
        }];
        let whole = v1::Inventory {
            cluster: "c1".into(),
            nodes: nodes.clone(),
            pools: pools.clone(),
            updated_at_unix_ms: 1_700_000_000_000,
        };
        let encoded: Vec<Bytes> = nodes.iter().map(|n| n.encode_to_vec().into()).collect();
        assert_eq!(
            encode_inventory("c1", encoded.iter(), &pools, 1_700_000_000_000),
            whole.encode_to_vec()
        );
        assert_eq!(
            encode_inventory("c1", [].iter(), &[], 0),
            v1::Inventory {
                cluster: "c1".into(),
                ..Default::default()
            }
            .encode_to_vec()
        );
    }

    #[test]
    fn changes_decode_by_prefix() {
        let c = v1::Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let key = super::super::keys::cluster_key("a");
        match Change::decode(key.as_bytes(), Some(&c.encode_to_vec())) {
            Some(Ok(Change::Cluster { name, record })) => {
                assert_eq!((name.as_str(), record), ("a", Some(Box::new(c))));
            }
            other => panic!("{other:?}"),
        }
        assert!(Change::decode(b"/tokens/x", Some(b"")).is_none());
        assert!(matches!(
            Change::decode(key.as_bytes(), Some(b"\xff\xff")),
            Some(Err(_))
        ));
        let inv = super::super::keys::inventory_key("a");
        match Change::decode(inv.as_bytes(), None) {
            Some(Ok(Change::Inventory { name, encoded })) => {
                assert_eq!((name.as_str(), encoded), ("a", None), "a delete");
            }
            other => panic!("{other:?}"),
        }
    }
}
