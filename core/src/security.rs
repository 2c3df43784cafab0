//! Who a caller is and what it may do. Pure: the TLS edge (`flotilla_api::tls`) turns a peer
//! certificate into a [`Principal`]; the hub's authorization layer asks [`permits`] with the
//! [`Need`] its table names for the method. Also the names certificates carry
//! (`spiffe://<fleet>/…`) and the join string an agent bootstraps with.

use std::fmt;

use sha2::{Digest, Sha256};

/// Checks the name of a person or tool (in certificates and bearer tokens, shown in the
/// audit log): 1-64 letters, digits, `-`, `_`, `.` or `@`.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    match ok {
        true => Ok(()),
        false => Err("1-64 letters, digits, '-', '_', '.' or '@'".into()),
    }
}

/// A person's or tool's role. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read anything.
    Viewer,
    /// Also routing policies, campaigns and their approvals.
    Operator,
    /// Also join tokens, membership, the CA and hub replicas.
    Admin,
}

impl Role {
    /// The lower-case name used in certificates and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "role {other:?}: expected viewer, operator or admin"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling, as the transport established it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A member cluster's agent, by its certificate.
    Cluster(String),
    /// A hub replica, by its certificate.
    Hub(String),
    /// A person or tool with a role.
    User {
        /// The name in its certificate.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// A TLS peer without a client certificate: only an agent bootstrapping with a join token.
    Anonymous,
    /// The hub runs without TLS (`--insecure`, or `--dev` on loopback): nobody is known and
    /// everything is allowed.
    Unauthenticated,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Cluster(c) => write!(f, "cluster/{c}"),
            Principal::Hub(h) => write!(f, "hub/{h}"),
            Principal::User { name, role } => write!(f, "{role}/{name}"),
            Principal::Anonymous => f.write_str("anonymous"),
            Principal::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

/// What a method requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone (health checks).
    Public,
    /// A member cluster's agent, or an anonymous peer bootstrapping with a join token (the
    /// service checks the token and, on every message, the cluster).
    Agent,
    /// A hub replica (Raft).
    Member,
    /// A hub replica or an admin (the store's raw API and its membership).
    MemberOrAdmin,
    /// A person or tool with at least this role.
    Role(Role),
}

/// Whether `who` may call a method that needs `need`; the reason when not.
pub fn permits(who: &Principal, need: Need) -> Result<(), String> {
    let ok = match (need, who) {
        (_, Principal::Unauthenticated) | (Need::Public, _) => true,
        (Need::Agent, Principal::Cluster(_) | Principal::Anonymous) => true,
        (Need::Member | Need::MemberOrAdmin, Principal::Hub(_)) => true,
        (Need::MemberOrAdmin, Principal::User { role, .. }) => *role == Role::Admin,
        (Need::Role(need), Principal::User { role, .. }) => role >= &need,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let wanted = match need {
        Need::Public => "anyone",
        Need::Agent => "a member cluster's agent",
        Need::Member => "a hub replica",
        Need::MemberOrAdmin => "a hub replica or the admin role",
        Need::Role(r) => r.as_str(),
    };
    Err(match who {
        Principal::Anonymous => {
            format!("needs {wanted}; present a client certificate (flotctl --cert/--key)")
        }
        _ => format!("{who} may not call this: it needs {wanted}"),
    })
}

/// The identity a certificate names: `spiffe://<fleet>/<kind>/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    /// The trust domain: the fleet's name.
    pub fleet: String,
    /// Whom it names.
    pub principal: Principal,
}

impl SpiffeId {
    /// `spiffe://<fleet>/cluster/<name>`.
    pub fn cluster(fleet: &str, name: &str) -> String {
        format!("spiffe://{fleet}/cluster/{name}")
    }

    /// `spiffe://<fleet>/hub/<name>`.
    pub fn hub(fleet: &str, name: &str) -> String {
        format!("spiffe://{fleet}/hub/{name}")
    }

    /// `spiffe://<fleet>/user/<role>/<name>`.
    pub fn user(fleet: &str, role: Role, name: &str) -> String {
        format!("spiffe://{fleet}/user/{role}/{name}")
    }

    /// Parses one of the three forms above.
    pub fn parse(uri: &str) -> Result<SpiffeId, String> {
        let bad = |why: &str| format!("{uri:?}: {why}");
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let fleet = parts.next().filter(|f| !f.is_empty());
        let fleet = fleet.ok_or_else(|| bad("no trust domain"))?.to_string();
        let parts: Vec<&str> = parts.collect();
        let name_ok = |n: &str| !n.is_empty() && n.len() <= 253;
        let principal = match parts.as_slice() {
            ["cluster", n] if name_ok(n) => Principal::Cluster(n.to_string()),
            ["hub", n] if name_ok(n) => Principal::Hub(n.to_string()),
            ["user", role, n] if name_ok(n) => Principal::User {
                name: n.to_string(),
                role: Role::parse(role).map_err(|e| bad(&e))?,
            },
            _ => {
                return Err(bad(
                    "expected /cluster/<name>, /hub/<name> or /user/<role>/<name>",
                ));
            }
        };
        Ok(SpiffeId { fleet, principal })
    }
}

/// A join token as an agent presents it: `<id>.<secret>`. The hub stores the id in the clear
/// (it is the record's key, listed and revoked by it) and the secret only as its SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Six to sixteen lower-case letters and digits.
    pub id: String,
    /// At least 32 lower-case hex digits (128 bits).
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "JoinToken({}.…)", self.id)
    }
}

impl JoinToken {
    /// Parses `<id>.<secret>`.
    pub fn parse(s: &str) -> Result<JoinToken, String> {
        let (id, secret) = s
            .split_once('.')
            .ok_or("the join token has the form <id>.<secret> (flotctl token create)")?;
        let id_ok = (6..=16).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !id_ok {
            return Err("the join token's id is 6-16 lower-case letters and digits".into());
        }
        let secret_ok = (32..=128).contains(&secret.len())
            && secret
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !secret_ok {
            return Err("the join token's secret is 32-128 lower-case hex digits".into());
        }
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// A token from random bytes: the id from `id` (base 36), the secret `secret` in hex.
    pub fn from_random(id: [u8; 6], secret: [u8; 16]) -> JoinToken {
        const DIGITS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        JoinToken {
            id: id
                .iter()
                .map(|b| DIGITS[*b as usize % 36] as char)
                .collect(),
            secret: hex(&secret),
        }
    }

    /// The secret's SHA-256 in hex: what the store keeps.
    pub fn secret_hash(&self) -> String {
        hex(&Sha256::digest(self.secret.as_bytes()))
    }

    /// `<id>.<secret>`.
    pub fn reveal(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// What an agent is started with: a join token and the hash of the hub CA's public key
/// (`<id>.<secret>@sha256:<hex>`), so it trusts only that CA before it has a certificate, as
/// kubeadm's `--discovery-token-ca-cert-hash` does.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    /// The token.
    pub token: JoinToken,
    /// SHA-256 of the CA certificate's SubjectPublicKeyInfo, lower-case hex.
    pub ca_hash: String,
}

impl fmt::Debug for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinString({:?}, sha256:{})", self.token, self.ca_hash)
    }
}

impl JoinString {
    /// Parses `<id>.<secret>@sha256:<64 hex>`.
    pub fn parse(s: &str) -> Result<JoinString, String> {
        let (token, pin) = s.split_once('@').ok_or(
            "the join string has the form <id>.<secret>@sha256:<ca hash> (flotctl token create)",
        )?;
        let hash = pin
            .strip_prefix("sha256:")
            .ok_or("the join string's CA hash starts with sha256:")?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the join string's CA hash is 64 hex digits".into());
        }
        Ok(JoinString {
            token: JoinToken::parse(token)?,
            ca_hash: hash.to_ascii_lowercase(),
        })
    }

    /// `<id>.<secret>@sha256:<hex>`.
    pub fn reveal(&self) -> String {
        format!("{}@sha256:{}", self.token.reveal(), self.ca_hash)
    }
}

/// A stored join token, as the admission decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// The cluster it admits.
    pub cluster: String,
    /// When it stops admitting (Unix ms).
    pub expires_at_unix_ms: i64,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Joins it still admits.
    pub uses_left: u32,
}

/// Why a join token admits nobody; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// Unknown id, or the secret does not match (the two are not told apart).
    #[error(
        "the join token is not valid (unknown, revoked or mistyped); create one with `flotctl token create`"
    )]
    Invalid,
    /// Past its expiry.
    #[error("the join token expired; create a new one with `flotctl token create`")]
    Expired,
    /// Every use spent.
    #[error("the join token has been used up; create a new one with `flotctl token create`")]
    UsedUp,
    /// Made for another cluster.
    #[error("this join token is for cluster {token:?}, not {hello:?}")]
    OtherCluster {
        /// The token's cluster.
        token: String,
        /// The cluster the agent named.
        hello: String,
    },
}

/// Whether `stored` (`None`: no such id) admits `presented` for `cluster` at `now`; on success
/// the record with one use spent, which the caller writes with a compare-and-swap on the
/// record's revision, so two replicas cannot both spend the last use.
pub fn spend(
    stored: Option<&StoredToken>,
    presented: &JoinToken,
    cluster: &str,
    now_unix_ms: i64,
) -> Result<StoredToken, TokenRefused> {
    let t = stored.ok_or(TokenRefused::Invalid)?;
    if !constant_time_eq(&t.secret_sha256, &presented.secret_hash()) {
        return Err(TokenRefused::Invalid);
    }
    if t.expires_at_unix_ms <= now_unix_ms {
        return Err(TokenRefused::Expired);
    }
    if t.cluster != cluster {
        return Err(TokenRefused::OtherCluster {
            token: t.cluster.clone(),
            hello: cluster.to_string(),
        });
    }
    if t.uses_left == 0 {
        return Err(TokenRefused::UsedUp);
    }
    Ok(StoredToken {
        uses_left: t.uses_left - 1,
        ..t.clone()
    })
}

/// When a certificate valid from `not_before` to `not_after` should be renewed: at a point
/// 60-90% through its life chosen by `jitter` in [0, 1), so a fleet's agents spread their
/// renewals out (Consul's window).
pub fn renew_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let life = (not_after - not_before).max(0) as f64;
    not_before + (life * (0.6 + 0.3 * jitter.clamp(0.0, 1.0))).round() as i64
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two strings in time that does not depend on where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role) -> Principal {
        Principal::User {
            name: "alice".into(),
            role,
        }
    }

    #[test]
    fn roles_include_the_ones_below_and_nothing_else() {
        let needs = [Role::Viewer, Role::Operator, Role::Admin];
        for have in needs {
            for need in needs {
                assert_eq!(
                    permits(&user(have), Need::Role(need)).is_ok(),
                    have >= need,
                    "{have} calling a {need} method"
                );
            }
        }
        let viewer = permits(&user(Role::Viewer), Need::Role(Role::Operator)).unwrap_err();
        assert_eq!(viewer, "viewer/alice may not call this: it needs operator");
    }

    #[test]
    fn clusters_and_hubs_get_only_their_own_methods() {
        let c = Principal::Cluster("a".into());
        let h = Principal::Hub("1".into());
        assert!(permits(&c, Need::Agent).is_ok());
        assert!(permits(&c, Need::Role(Role::Viewer)).is_err());
        assert!(permits(&c, Need::Member).is_err());
        assert!(permits(&h, Need::Member).is_ok());
        assert!(permits(&h, Need::MemberOrAdmin).is_ok());
        assert!(permits(&h, Need::Agent).is_err());
        assert!(permits(&h, Need::Role(Role::Viewer)).is_err());
        assert!(permits(&user(Role::Admin), Need::MemberOrAdmin).is_ok());
        assert!(permits(&user(Role::Operator), Need::MemberOrAdmin).is_err());
        assert!(permits(&user(Role::Admin), Need::Member).is_err());
        assert!(permits(&user(Role::Admin), Need::Agent).is_err());
    }

    #[test]
    fn anonymous_peers_may_only_bootstrap_and_are_told_how() {
        let a = Principal::Anonymous;
        assert!(permits(&a, Need::Agent).is_ok());
        assert!(permits(&a, Need::Public).is_ok());
        let e = permits(&a, Need::Role(Role::Viewer)).unwrap_err();
        assert!(e.contains("client certificate"), "{e}");
        assert!(permits(&a, Need::Member).is_err());
        assert!(permits(&Principal::Unauthenticated, Need::Member).is_ok());
    }

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_shapes() {
        let cases = [
            (
                SpiffeId::cluster("f", "gpu-a"),
                Principal::Cluster("gpu-a".into()),
            ),
            (SpiffeId::hub("f", "2"), Principal::Hub("2".into())),
            (
                SpiffeId::user("f", Role::Operator, "bob"),
                Principal::User {
                    name: "bob".into(),
                    role: Role::Operator,
                },
            ),
        ];
        for (uri, want) in cases {
            let id = SpiffeId::parse(&uri).unwrap();
            assert_eq!((id.fleet.as_str(), id.principal), ("f", want));
        }
        for bad in [
            "https://f/cluster/a",
            "spiffe:///cluster/a",
            "spiffe://f/cluster/",
            "spiffe://f/cluster/a/b",
            "spiffe://f/user/root/a",
            "spiffe://f/ca/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn join_strings_parse_and_name_the_bad_part() {
        let hash = "ab".repeat(32);
        let s = format!("abc123.{}@sha256:{hash}", "0f".repeat(16));
        let j = JoinString::parse(&s).unwrap();
        assert_eq!(j.token.id, "abc123");
        assert_eq!(j.reveal(), s);
        assert!(
            !format!("{j:?}").contains(&"0f".repeat(16)),
            "Debug hides the secret"
        );
        let cases = [
            ("abc123.x", "form <id>.<secret>@sha256"),
            (
                &format!("abc123.{}@md5:{hash}", "0f".repeat(16)),
                "starts with sha256:",
            ),
            (
                &format!("abc123.{}@sha256:abc", "0f".repeat(16)),
                "64 hex digits",
            ),
            (
                &format!("AB.{}@sha256:{hash}", "0f".repeat(16)),
                "id is 6-16",
            ),
            (&format!("abc123.xyz@sha256:{hash}"), "secret is 32-128"),
        ];
        for (input, want) in cases {
            let e = JoinString::parse(input).unwrap_err();
            assert!(e.contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn a_token_is_spent_once_per_use_and_refused_with_what_to_do() {
        let presented = JoinToken::parse(&format!("abc123.{}", "0f".repeat(16))).unwrap();
        let stored = StoredToken {
            cluster: "a".into(),
            expires_at_unix_ms: 1000,
            secret_sha256: presented.secret_hash(),
            uses_left: 2,
        };
        let once = spend(Some(&stored), &presented, "a", 10).unwrap();
        assert_eq!(once.uses_left, 1);
        let twice = spend(Some(&once), &presented, "a", 10).unwrap();
        assert_eq!(
            spend(Some(&twice), &presented, "a", 10),
            Err(TokenRefused::UsedUp)
        );
        assert_eq!(
            spend(Some(&stored), &presented, "a", 1000),
            Err(TokenRefused::Expired)
        );
        assert!(matches!(
            spend(Some(&stored), &presented, "b", 10),
            Err(TokenRefused::OtherCluster { .. })
        ));
        assert_eq!(spend(None, &presented, "a", 10), Err(TokenRefused::Invalid));
        let wrong = JoinToken::parse(&format!("abc123.{}", "1f".repeat(16))).unwrap();
        // A wrong secret is not told apart from an unknown id, even for an expired token.
        assert_eq!(
            spend(Some(&stored), &wrong, "a", 5000),
            Err(TokenRefused::Invalid)
        );
        assert!(
            TokenRefused::UsedUp
                .to_string()
                .contains("flotctl token create")
        );
    }

    #[test]
    fn renewal_falls_between_60_and_90_percent_of_the_life() {
        assert_eq!(renew_at(0, 1000, 0.0), 600);
        assert_eq!(renew_at(0, 1000, 0.5), 750);
        assert_eq!(renew_at(100, 1100, 0.999_999), 1000);
        assert_eq!(renew_at(0, 1000, 7.0), 900, "jitter is clamped");
    }

    #[test]
    fn user_names_are_short_and_plain() {
        assert!(check_user_name("alice@example.com").is_ok());
        assert!(check_user_name("ci-deploy_2").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_compared_whole() {
        let t = JoinToken::parse(&format!("abc123.{}", "0f".repeat(16))).unwrap();
        assert_eq!(t.secret_hash().len(), 64);
        assert!(constant_time_eq(&t.secret_hash(), &t.secret_hash()));
        assert!(!constant_time_eq("abcd", "abce"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
