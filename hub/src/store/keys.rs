//! Every key prefix the hub writes, and the key of each record. One place, so a reader sees
//! the whole schema:
//!
//! | prefix | record (protobuf, `flotilla.v1`) | written by |
//! | --- | --- | --- |
//! | `/clusters/<name>` | `Cluster` (health, identity, history) | the leader: agent streams and the health controller |
//! | `/inventory/<name>` | `Inventory` (nodes and pools) | the leader: that cluster's agent stream only |
//! | `/tokens/<sha256>` | `JoinTokenRecord` | `FleetService.CreateJoinToken` (any replica) |
//!
//! Discovery (`/exports/`, `/policies/`) and campaigns (`/campaigns/`) add their prefixes here.

use sha2::{Digest, Sha256};

/// Prefix of cluster records (`v1::Cluster`).
pub const CLUSTERS: &str = "/clusters/";
/// Prefix of inventory records (`v1::Inventory`).
pub const INVENTORY: &str = "/inventory/";
/// Prefix of join tokens (`v1::JoinTokenRecord`, keyed by the token's SHA-256).
pub const TOKENS: &str = "/tokens/";

/// The prefixes every replica mirrors in memory (tokens are read on demand).
pub const MIRRORED: [&str; 2] = [CLUSTERS, INVENTORY];

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
    let hex: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{TOKENS}{hex}")
}

/// A mirrored key, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// `/clusters/<name>`.
    Cluster(&'a str),
    /// `/inventory/<name>`.
    Inventory(&'a str),
}

impl<'a> Key<'a> {
    /// The mirrored record a key names, if any.
    pub fn parse(key: &'a [u8]) -> Option<Self> {
        let key = std::str::from_utf8(key).ok()?;
        if let Some(n) = key.strip_prefix(CLUSTERS) {
            Some(Key::Cluster(n))
        } else {
            key.strip_prefix(INVENTORY).map(Key::Inventory)
        }
    }
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

    #[test]
    fn keys_parse_back() {
        assert_eq!(
            Key::parse(cluster_key("a").as_bytes()),
            Some(Key::Cluster("a"))
        );
        assert_eq!(
            Key::parse(inventory_key("b").as_bytes()),
            Some(Key::Inventory("b"))
        );
        assert_eq!(Key::parse(token_key("t").as_bytes()), None);
    }
}
