//! Every key prefix the hub writes, and the key of each record. One place, so a reader sees
//! the whole schema:
//!
//! | prefix | record (protobuf, `flotilla.v1`) | written by |
//! | --- | --- | --- |
//! | `/clusters/<name>` | `Cluster` (health, identity, history) | the leader: agent streams and the health controller |
//! | `/inventory/<name>` | `Inventory` (nodes and pools) | the leader: that cluster's agent stream only |
//! | `/tokens/<id>` | `JoinTokenRecord` (the secret only hashed) | `FleetService.CreateJoinToken` (any replica); uses spent by the leader's agent streams with a compare-and-swap |
//! | `/approvals/<cluster>` | `ApprovalRecord` | a join with an approval token (pending); `FleetService.ApproveCluster` |
//! | `/revoked/<cluster>` | `RevocationRecord` | `FleetService.RemoveCluster` |
//! | `/apitokens/<id>` | `ApiTokenRecord` (the secret only hashed) | `FleetService.CreateApiToken` (any replica) |
//! | `/audit/<ms, 16 digits>-<id>` | `AuditRecord` | every replica's audit writer; trimmed by the leader after the retention |
//! | `/exports/<cluster>/<namespace>/<name>` | `ServiceExport` | the leader: that cluster's agent stream only |
//! | `/policies/<namespace>/<name>`, `/policies/_default` | `RoutingPolicyRecord` | `DiscoveryService.SetPolicy` (any replica) |
//! | `/loads/<cluster>/<namespace>/<name>` | `InferenceLoadRecord` | the leader's load tracker, when a verdict changes |
//! | `/campaigns/<id>/spec` | `CampaignRecord` (the campaign as JSON, without cluster runs) | the leader's campaign controller only |
//! | `/campaigns/<id>/clusters/<cluster>` | `CampaignClusterRecord` (one cluster's run) | the leader's campaign controller only |
//! | `/shifts/<cluster>` | `TrafficShiftRecord` | the campaign controller, in the same txn as the campaign |
//! | `/campaign-epoch` | empty; its mod revision is the controller's fencing term | the campaign controller, when it starts leading |

/// Prefix of cluster records (`v1::Cluster`).
pub const CLUSTERS: &str = "/clusters/";
/// Prefix of inventory records (`v1::Inventory`).
pub const INVENTORY: &str = "/inventory/";
/// Prefix of join tokens (`v1::JoinTokenRecord`, keyed by the token's id).
pub const TOKENS: &str = "/tokens/";
/// Prefix of join approvals (`v1::ApprovalRecord`).
pub const APPROVALS: &str = "/approvals/";
/// Prefix of revoked cluster identities (`v1::RevocationRecord`).
pub const REVOKED: &str = "/revoked/";
/// Prefix of API bearer tokens (`v1::ApiTokenRecord`).
pub const API_TOKENS: &str = "/apitokens/";
/// Prefix of the audit log (`v1::AuditRecord`), in time order.
pub const AUDIT: &str = "/audit/";

/// Prefix of exported services (`v1::ServiceExport`).
pub const EXPORTS: &str = "/exports/";
/// Prefix of routing policies (`v1::RoutingPolicyRecord`).
pub const POLICIES: &str = "/policies/";
/// Prefix of inference loads (`v1::InferenceLoadRecord`).
pub const LOADS: &str = "/loads/";
/// Prefix of campaigns (`v1::CampaignRecord`).
pub const CAMPAIGNS: &str = "/campaigns/";
/// Prefix of traffic shifts (`v1::TrafficShiftRecord`): clusters out of global routing.
pub const SHIFTS: &str = "/shifts/";
/// Written by each new campaign controller term; its revision fences older terms' steps.
pub const CAMPAIGN_EPOCH: &str = "/campaign-epoch";
/// The fleet default policy's name under [`POLICIES`] (no namespace has an underscore).
pub const DEFAULT_POLICY: &str = "_default";

/// The prefixes every replica mirrors in memory (tokens, approvals, the audit log and
/// campaigns are read on demand).
pub const MIRRORED: [&str; 8] = [
    CLUSTERS, INVENTORY, EXPORTS, POLICIES, LOADS, SHIFTS, REVOKED, API_TOKENS,
];

/// Key of one cluster's export.
pub fn export_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{EXPORTS}{cluster}/{namespace}/{name}")
}

/// Key of one export's inference load.
pub fn load_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{LOADS}{cluster}/{namespace}/{name}")
}

/// Prefix of one cluster's exports.
pub fn exports_of(cluster: &str) -> String {
    format!("{EXPORTS}{cluster}/")
}

/// Key of a routing policy; empty namespace and name: the fleet default.
pub fn policy_key(namespace: &str, name: &str) -> String {
    match namespace.is_empty() && name.is_empty() {
        true => format!("{POLICIES}{DEFAULT_POLICY}"),
        false => format!("{POLICIES}{namespace}/{name}"),
    }
}

/// Prefix of one campaign's records.
pub fn campaign_prefix(id: &str) -> String {
    format!("{CAMPAIGNS}{id}/")
}

/// Key of a campaign's header.
pub fn campaign_key(id: &str) -> String {
    format!("{CAMPAIGNS}{id}/spec")
}

/// Key of one cluster's run in a campaign.
pub fn campaign_cluster_key(id: &str, cluster: &str) -> String {
    format!("{CAMPAIGNS}{id}/clusters/{cluster}")
}

/// Key of a cluster's traffic shift.
pub fn shift_key(cluster: &str) -> String {
    format!("{SHIFTS}{cluster}")
}

/// Key of a cluster record.
pub fn cluster_key(name: &str) -> String {
    format!("{CLUSTERS}{name}")
}

/// Key of an inventory record.
pub fn inventory_key(name: &str) -> String {
    format!("{INVENTORY}{name}")
}

/// Key of a join token's record (by its id; the secret is stored only as its hash).
pub fn token_key(id: &str) -> String {
    format!("{TOKENS}{id}")
}

/// Key of a cluster's join approval.
pub fn approval_key(cluster: &str) -> String {
    format!("{APPROVALS}{cluster}")
}

/// Key of an API bearer token's record.
pub fn api_token_key(id: &str) -> String {
    format!("{API_TOKENS}{id}")
}

/// Key of a cluster's revocation.
pub fn revoked_key(cluster: &str) -> String {
    format!("{REVOKED}{cluster}")
}

/// Key of an audit record: time first, so a range from a time reads in order.
pub fn audit_key(at_unix_ms: i64, id: &str) -> String {
    format!("{AUDIT}{:016}-{id}", at_unix_ms.max(0))
}

/// A mirrored key, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// `/clusters/<name>`.
    Cluster(&'a str),
    /// `/inventory/<name>`.
    Inventory(&'a str),
    /// `/exports/<cluster>/<namespace>/<name>`.
    Export(&'a str, &'a str, &'a str),
    /// `/policies/<namespace>/<name>`; both empty for the fleet default.
    Policy(&'a str, &'a str),
    /// `/loads/<cluster>/<namespace>/<name>`.
    Load(&'a str, &'a str, &'a str),
    /// `/shifts/<cluster>`.
    Shift(&'a str),
    /// `/revoked/<cluster>`.
    Revoked(&'a str),
    /// `/apitokens/<id>`.
    ApiToken(&'a str),
}

/// `<cluster>/<namespace>/<name>`, each part non-empty.
fn three(rest: &str) -> Option<(&str, &str, &str)> {
    let mut p = rest.splitn(3, '/');
    match (p.next(), p.next(), p.next()) {
        (Some(c), Some(ns), Some(n)) if !c.is_empty() && !ns.is_empty() && !n.is_empty() => {
            Some((c, ns, n))
        }
        _ => None,
    }
}

impl<'a> Key<'a> {
    /// The mirrored record a key names, if any.
    pub fn parse(key: &'a [u8]) -> Option<Self> {
        let key = std::str::from_utf8(key).ok()?;
        if let Some(n) = key.strip_prefix(CLUSTERS) {
            Some(Key::Cluster(n))
        } else if let Some(rest) = key.strip_prefix(EXPORTS) {
            three(rest).map(|(c, ns, n)| Key::Export(c, ns, n))
        } else if let Some(c) = key.strip_prefix(SHIFTS) {
            (!c.is_empty()).then_some(Key::Shift(c))
        } else if let Some(c) = key.strip_prefix(REVOKED) {
            (!c.is_empty()).then_some(Key::Revoked(c))
        } else if let Some(id) = key.strip_prefix(API_TOKENS) {
            (!id.is_empty()).then_some(Key::ApiToken(id))
        } else if let Some(rest) = key.strip_prefix(LOADS) {
            three(rest).map(|(c, ns, n)| Key::Load(c, ns, n))
        } else if let Some(rest) = key.strip_prefix(POLICIES) {
            match rest.split_once('/') {
                _ if rest == DEFAULT_POLICY => Some(Key::Policy("", "")),
                Some((ns, n)) if !ns.is_empty() && !n.is_empty() => Some(Key::Policy(ns, n)),
                _ => None,
            }
        } else {
            key.strip_prefix(INVENTORY).map(Key::Inventory)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_keys_sort_by_time() {
        assert!(audit_key(999, "b") < audit_key(1000, "a"));
        assert_eq!(audit_key(5, "x"), "/audit/0000000000000005-x");
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
        assert_eq!(Key::parse(audit_key(1, "a").as_bytes()), None);
        assert_eq!(
            Key::parse(revoked_key("c").as_bytes()),
            Some(Key::Revoked("c"))
        );
        assert_eq!(
            Key::parse(api_token_key("ab12cd").as_bytes()),
            Some(Key::ApiToken("ab12cd"))
        );
        assert_eq!(
            Key::parse(export_key("c", "ml", "llm").as_bytes()),
            Some(Key::Export("c", "ml", "llm"))
        );
        assert_eq!(
            Key::parse(policy_key("ml", "llm").as_bytes()),
            Some(Key::Policy("ml", "llm"))
        );
        assert_eq!(
            Key::parse(policy_key("", "").as_bytes()),
            Some(Key::Policy("", ""))
        );
        assert_eq!(Key::parse(b"/exports/c/ml"), None);
        assert_eq!(
            Key::parse(load_key("c", "ml", "llm").as_bytes()),
            Some(Key::Load("c", "ml", "llm"))
        );
        assert_eq!(Key::parse(b"/loads/c//llm"), None);
    }
}
