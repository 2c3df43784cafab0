//! Fleet records in the store: keys, protobuf values, and the read/write helpers.

use flotilla_api::v1;
use flotilla_core::kv::{
    Compare, CompareOp, CompareTarget, Consistency, KeyRange, KvBackend, KvError, Op, RangeRequest,
    TxnRequest,
};
use prost::Message;
use sha2::{Digest, Sha256};

/// Prefix of cluster records (`v1::Cluster`).
pub const CLUSTERS: &str = "/clusters/";
/// Prefix of inventory records (`v1::Inventory`).
pub const INVENTORY: &str = "/inventory/";
/// Prefix of join tokens (`v1::JoinTokenRecord`, keyed by the token's SHA-256).
pub const TOKENS: &str = "/tokens/";

/// Key of a cluster record.
pub fn cluster_key(name: &str) -> String {
    format!("{CLUSTERS}{name}")
}

/// Key of an inventory record.
pub fn inventory_key(name: &str) -> String {
    format!("{INVENTORY}{name}")
}

/// Key of a token record: the token is stored only as its hash.
pub fn token_key(token: &str) -> String {
    format!("{TOKENS}{}", hex(&Sha256::digest(token.as_bytes())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Digest of a node record, so a reconnecting agent resends only what differs.
pub fn node_digest(n: &v1::NodeInventory) -> Vec<u8> {
    digest(&n.encode_to_vec())
}

/// Digest of an encoded node record (see [`node_digest`]).
pub fn digest(encoded: &[u8]) -> Vec<u8> {
    Sha256::digest(encoded).to_vec()
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

/// Write a record unconditionally (for keys only one writer owns, such as a connected
/// cluster's inventory). Returns the revision.
pub async fn put<B: KvBackend, M: Message>(b: &B, key: &str, m: &M) -> Result<i64, KvError> {
    let r = b
        .txn(TxnRequest {
            compare: vec![],
            success: vec![Op::put(key, m.encode_to_vec())],
            failure: vec![],
        })
        .await?;
    Ok(r.revision)
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
    fn tokens_are_stored_hashed() {
        let k = token_key("secret-token");
        assert!(k.starts_with(TOKENS));
        assert!(!k.contains("secret"));
        assert_eq!(k.len(), TOKENS.len() + 64);
    }
}
