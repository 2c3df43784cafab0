//! Join tokens in the store: minted (by `FleetService.CreateJoinToken`, `--dev` and the
//! benchmarks), and spent by the leader's agent streams with a compare-and-swap on the
//! record's revision, so two replicas cannot both admit a join with its last use. The rules
//! are `flotilla_core::security::spend`.

use std::time::Duration;

use flotilla_api::v1;
use flotilla_core::kv::{KvBackend, KvError};
use flotilla_core::security::{JoinToken, StoredToken, TokenRefused, spend};

use crate::store::{keys, records};

/// What [`mint`] makes.
#[derive(Debug, Clone)]
pub struct Mint<'a> {
    /// The cluster it admits.
    pub cluster: &'a str,
    /// How long it admits.
    pub ttl: Duration,
    /// How many joins.
    pub uses: u32,
    /// A join waits for approval.
    pub require_approval: bool,
    /// Who made it (a principal).
    pub by: &'a str,
}

/// Stores a new token; returns it (the only time its secret exists outside the caller).
pub async fn mint<B: KvBackend>(
    b: &B,
    m: &Mint<'_>,
    now_unix_ms: i64,
) -> Result<(JoinToken, i64), KvError> {
    for _ in 0..4 {
        let token = JoinToken::from_random(rand::random(), rand::random());
        let expires = now_unix_ms.saturating_add(m.ttl.as_millis() as i64);
        let uses = m.uses.max(1);
        let rec = v1::JoinTokenRecord {
            cluster: m.cluster.to_string(),
            expires_at_unix_ms: expires,
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            uses_left: uses,
            uses,
            require_approval: m.require_approval,
            created_at_unix_ms: now_unix_ms,
            created_by: m.by.to_string(),
        };
        if records::put_if(b, &keys::token_key(&token.id), &rec, 0)
            .await?
            .is_some()
        {
            return Ok((token, expires));
        }
    }
    Err(KvError::Unavailable(
        "join token ids kept colliding; retry".into(),
    ))
}

fn stored(r: &v1::JoinTokenRecord) -> StoredToken {
    StoredToken {
        cluster: r.cluster.clone(),
        expires_at_unix_ms: r.expires_at_unix_ms,
        secret_sha256: r.secret_sha256.clone(),
        uses_left: r.uses_left,
    }
}

/// Why a token admitted nobody.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// By the rules.
    #[error(transparent)]
    Token(#[from] TokenRefused),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] KvError),
}

/// Checks `presented` for `cluster`. With `spend_use`, one use is spent (compare-and-swap,
/// retried on a conflict with the record read again). Returns the record as it stands.
pub async fn admit<B: KvBackend>(
    b: &B,
    presented: &JoinToken,
    cluster: &str,
    now_unix_ms: i64,
    spend_use: bool,
) -> Result<v1::JoinTokenRecord, Refused> {
    let key = keys::token_key(&presented.id);
    for _ in 0..8 {
        let (rec, rev) = records::get::<B, v1::JoinTokenRecord>(b, &key).await?;
        let next = spend(
            rec.as_ref().map(stored).as_ref(),
            presented,
            cluster,
            now_unix_ms,
        )?;
        let rec = rec.expect("spend refuses a missing record");
        if !spend_use {
            return Ok(rec);
        }
        let spent = v1::JoinTokenRecord {
            uses_left: next.uses_left,
            ..rec
        };
        if records::put_if(b, &key, &spent, rev).await?.is_some() {
            return Ok(spent);
        }
    }
    Err(KvError::Unavailable("the join token is contended; retry".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_test_support::mem_kv::MemBackend as MemKv;

    fn m(cluster: &str, uses: u32) -> Mint<'_> {
        Mint {
            cluster,
            ttl: Duration::from_secs(60),
            uses,
            require_approval: false,
            by: "admin/test",
        }
    }

    #[tokio::test]
    async fn a_single_use_token_admits_one_join_however_many_race_for_it() {
        let kv = MemKv::default();
        let (t, _) = mint(&kv, &m("a", 1), 0).await.unwrap();
        let tries = (0..16).map(|_| admit(&kv, &t, "a", 1, true));
        let results = futures::future::join_all(tries).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        for r in results.into_iter().filter_map(Result::err) {
            assert!(matches!(r, Refused::Token(TokenRefused::UsedUp)), "{r}");
        }
    }

    #[tokio::test]
    async fn an_n_use_token_admits_n_and_is_stored_without_its_secret() {
        let kv = MemKv::default();
        let (t, _) = mint(&kv, &m("a", 3), 0).await.unwrap();
        for left in [2, 1, 0] {
            assert_eq!(admit(&kv, &t, "a", 1, true).await.unwrap().uses_left, left);
        }
        assert!(admit(&kv, &t, "a", 1, true).await.is_err());
        let (rec, _) = records::get::<_, v1::JoinTokenRecord>(&kv, &keys::token_key(&t.id))
            .await
            .unwrap();
        let rec = rec.unwrap();
        assert_ne!(rec.secret_sha256, t.secret);
        assert!(!format!("{rec:?}").contains(&t.secret));
        // Checking without spending leaves the uses alone.
        let (u, _) = mint(&kv, &m("b", 1), 0).await.unwrap();
        admit(&kv, &u, "b", 1, false).await.unwrap();
        assert_eq!(admit(&kv, &u, "b", 1, true).await.unwrap().uses_left, 0);
    }
}
