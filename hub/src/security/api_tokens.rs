//! Bearer tokens for people and tools that cannot present a client certificate (a dashboard, a
//! CI job): `authorization: Bearer <id>.<secret>` over TLS, each token with a name and a role.
//! Stored as `/apitokens/<id>` with only the secret's SHA-256; every replica mirrors them, so
//! checking one is a map lookup and a hash.

use std::collections::HashMap;
use std::sync::RwLock;

use flotilla_api::v1;
use flotilla_core::security::{JoinToken, Role, constant_time_eq};

use crate::store::mirror::Subscriber;
use crate::store::records::Change;

/// The API tokens, as this replica mirrors them.
#[derive(Debug, Default)]
pub struct ApiTokens {
    by_id: RwLock<HashMap<String, v1::ApiTokenRecord>>,
}

/// Who a valid bearer token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bearer {
    /// The token's id (its credential in the audit log).
    pub id: String,
    /// Whose it is.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl ApiTokens {
    /// The holder of `token` (`<id>.<secret>`) at `now_unix_ms`, or why there is none. Unknown
    /// ids and wrong secrets get the same answer.
    pub fn authenticate(&self, token: &str, now_unix_ms: i64) -> Result<Bearer, String> {
        let invalid = || "bearer token: not valid (unknown, revoked or mistyped)".to_string();
        let t = JoinToken::parse(token.trim()).map_err(|_| invalid())?;
        let by_id = self.by_id.read().expect("api tokens lock");
        let rec = by_id.get(&t.id).ok_or_else(invalid)?;
        if !constant_time_eq(&rec.secret_sha256, &t.secret_hash()) {
            return Err(invalid());
        }
        if rec.expires_at_unix_ms <= now_unix_ms {
            return Err(
                "bearer token: expired; an admin makes a new one (flotctl apitoken create)".into(),
            );
        }
        let role = Role::parse(&rec.role).map_err(|e| format!("bearer token: {e}"))?;
        Ok(Bearer {
            id: rec.id.clone(),
            name: rec.name.clone(),
            role,
        })
    }
}

impl Subscriber for ApiTokens {
    fn reset(&self, revision: i64, records: Vec<Change>) {
        self.by_id.write().expect("api tokens lock").clear();
        self.apply(revision, records);
    }

    fn apply(&self, _revision: i64, changes: Vec<Change>) {
        let mut by_id = self.by_id.write().expect("api tokens lock");
        for c in changes {
            if let Change::ApiToken { id, record } = c {
                match record {
                    Some(r) => by_id.insert(id, r),
                    None => by_id.remove(&id),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_speaks_for_its_holder_until_revoked_or_expired() {
        let t = JoinToken::from_random([1; 6], [2; 16]);
        let tokens = ApiTokens::default();
        let rec = v1::ApiTokenRecord {
            id: t.id.clone(),
            name: "grafana".into(),
            role: "viewer".into(),
            secret_sha256: t.secret_hash(),
            expires_at_unix_ms: 1000,
            ..Default::default()
        };
        tokens.apply(
            1,
            vec![Change::ApiToken {
                id: t.id.clone(),
                record: Some(rec),
            }],
        );
        let b = tokens.authenticate(&t.reveal(), 10).unwrap();
        assert_eq!((b.name.as_str(), b.role), ("grafana", Role::Viewer));
        let wrong = JoinToken {
            secret: "0".repeat(32),
            ..t.clone()
        };
        assert!(
            tokens
                .authenticate(&wrong.reveal(), 10)
                .unwrap_err()
                .contains("not valid")
        );
        assert!(
            tokens
                .authenticate("nonsense", 10)
                .unwrap_err()
                .contains("not valid")
        );
        assert!(
            tokens
                .authenticate(&t.reveal(), 1000)
                .unwrap_err()
                .contains("expired")
        );
        tokens.apply(
            2,
            vec![Change::ApiToken {
                id: t.id.clone(),
                record: None,
            }],
        );
        assert!(tokens.authenticate(&t.reveal(), 10).is_err());
    }
}
