//! What an agent sends so the hub ends up holding the cluster's current nodes: node digests
//! (the agent and the hub compute them the same way, over a node's encoded record) and the
//! delta between what is held and what is current.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

/// SHA-256 of a node's encoded record: equal digests mean equal records.
pub type Digest = [u8; 32];

/// The digest of an encoded node record.
pub fn digest(encoded: &[u8]) -> Digest {
    Sha256::digest(encoded).into()
}

/// The nodes to send (new or changed) and the names to remove, so that a receiver holding
/// `held` ends up holding `current`. Both are in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta<'a> {
    /// Names of nodes that are new or differ from what is held.
    pub upsert: Vec<&'a str>,
    /// Names of held nodes that are gone.
    pub remove: Vec<&'a str>,
}

impl Delta<'_> {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// The delta from `held` to `current`; values are compared (digests, or whole records).
pub fn delta<'a, V: PartialEq>(
    held: &'a BTreeMap<String, V>,
    current: &'a BTreeMap<String, V>,
) -> Delta<'a> {
    Delta {
        upsert: current
            .iter()
            .filter(|(name, v)| held.get(*name) != Some(*v))
            .map(|(name, _)| name.as_str())
            .collect(),
        remove: held
            .keys()
            .filter(|name| !current.contains_key(*name))
            .map(String::as_str)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, u8)]) -> BTreeMap<String, Digest> {
        kv.iter().map(|(k, v)| (k.to_string(), [*v; 32])).collect()
    }

    #[test]
    fn sends_new_and_changed_nodes_and_removes_gone_ones() {
        let held = map(&[("a", 1), ("b", 2), ("c", 3)]);
        let current = map(&[("a", 1), ("b", 9), ("d", 4)]);
        let d = delta(&held, &current);
        assert_eq!(d.upsert, vec!["b", "d"]);
        assert_eq!(d.remove, vec!["c"]);
        assert!(!d.is_empty());
    }

    #[test]
    fn nothing_held_sends_everything_and_equal_sends_nothing() {
        let current = map(&[("a", 1), ("b", 2)]);
        assert_eq!(delta(&BTreeMap::new(), &current).upsert, vec!["a", "b"]);
        assert!(delta(&current, &current).is_empty());
        let none = BTreeMap::new();
        let d = delta(&current, &none);
        assert_eq!((d.upsert.len(), d.remove), (0, vec!["a", "b"]));
    }

    #[test]
    fn digests_tell_records_apart() {
        assert_eq!(digest(b"node-a"), digest(b"node-a"));
        assert_ne!(digest(b"node-a"), digest(b"node-b"));
    }
}
