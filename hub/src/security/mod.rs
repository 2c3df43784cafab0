//! The hub's security: its TLS material and the fleet CA it signs with ([`HubTls`]), the
//! authorization layer and role table ([`authz`]), the audit log ([`audit`]) and the
//! revocations every agent stream checks ([`Revocations`]). Decisions (roles, names, tokens)
//! are pure, in `flotilla_core::security`; certificates in `flotilla_api::pki`; TLS in
//! `flotilla_api::tls`.

pub mod api_tokens;
pub mod audit;
pub mod authz;
pub mod caller;
pub mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use flotilla_api::pki::{Ca, PkiError, Usage};
use flotilla_api::tls::{ClientTls, Identity, ServerTls};
use flotilla_core::security::SpiffeId;
use tokio_util::sync::CancellationToken;

use crate::store::mirror::Subscriber;
use crate::store::records::Change;

/// The CA certificate in the TLS directory; it may hold more than one (old and new roots
/// during a rotation: the first is the one whose key is `ca.key`).
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";

/// How often the TLS directory is checked for a changed CA.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The hub's TLS: the fleet's CA (the hub signs agents' certificates and its own), the
/// certificate it serves and dials the other replicas with, and the bundle it trusts.
pub struct HubTls {
    /// The trust domain certificates name (`spiffe://<fleet>/...`).
    pub fleet: String,
    /// What the gRPC listener serves.
    pub server: Arc<ServerTls>,
    /// What the HTTP (metrics, health) listener serves.
    pub http: Arc<ServerTls>,
    /// What this replica dials the others with (its peer certificate; the fleet's roots).
    pub client: ClientTls,
    /// Lifetime of the certificates it signs.
    pub cert_ttl: Duration,
    ca: ArcSwap<Ca>,
    bundle: ArcSwap<String>,
    identity: Arc<Identity>,
    dir: PathBuf,
    node: String,
    names: Vec<String>,
    loaded: std::sync::Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for HubTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubTls")
            .field("fleet", &self.fleet)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: the hub needs the fleet CA here (make one with `flotctl ca init --dir {}` \
             and copy it to every replica), or run with --insecure",
            p.display(),
            dir.display()
        )
    })
}

fn mtime(dir: &Path) -> Option<SystemTime> {
    [CA_CERT, CA_KEY]
        .iter()
        .filter_map(|n| {
            std::fs::metadata(dir.join(n))
                .and_then(|m| m.modified())
                .ok()
        })
        .max()
}

impl HubTls {
    /// Loads the CA from `dir` and issues this replica (`node`) a peer certificate for
    /// `names` (the addresses it is dialled by).
    pub fn load(
        dir: &Path,
        fleet: &str,
        node: &str,
        names: Vec<String>,
        cert_ttl: Duration,
    ) -> anyhow::Result<Arc<HubTls>> {
        let (bundle, key) = (read(dir, CA_CERT)?, read(dir, CA_KEY)?);
        let ca = Ca::from_pem(&bundle, &key).with_context(|| format!("{}", dir.display()))?;
        let identity = Arc::new(Identity::default());
        let tls = HubTls {
            fleet: fleet.to_string(),
            server: ServerTls::new(&bundle, identity.clone())?,
            http: ServerTls::http1(&bundle, identity.clone())?,
            client: ClientTls::new(&bundle, Some(identity.clone()))?,
            cert_ttl,
            ca: ArcSwap::from_pointee(ca),
            bundle: ArcSwap::from_pointee(bundle),
            identity,
            dir: dir.to_path_buf(),
            node: node.to_string(),
            names,
            loaded: std::sync::Mutex::new(mtime(dir)),
        };
        tls.renew_own(unix_now())?;
        Ok(Arc::new(tls))
    }

    /// Issues this replica a new peer certificate, chained to the CA so agents can check
    /// their pin against it.
    fn renew_own(&self, now: i64) -> Result<i64, PkiError> {
        let ca = self.ca.load();
        let uri = SpiffeId::hub(&self.fleet, &self.node);
        let ttl = self.cert_ttl.as_secs() as i64;
        let pair = ca.issue(&uri, &Usage::Peer(self.names.clone()), now, ttl)?;
        let chain = format!("{}{}", pair.cert_pem, ca.cert_pem());
        self.identity.set(&chain, &pair.key_pem)?;
        Ok(now + ttl)
    }

    /// The directory the CA is read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pin a join string carries (SHA-256 of the signing CA's public key).
    pub fn pin(&self) -> String {
        self.ca.load().pin()
    }

    /// The CA bundle agents should trust.
    pub fn bundle(&self) -> String {
        self.bundle.load().as_ref().clone()
    }

    /// Signs `csr`'s public key for `cluster` as issued at `now` (Unix seconds; see
    /// [`Revocations::issue_time`]); returns the PEM leaf and its expiry.
    pub fn sign_cluster(
        &self,
        cluster: &str,
        csr: &[u8],
        now: i64,
    ) -> Result<(String, i64), PkiError> {
        let ttl = self.cert_ttl.as_secs() as i64;
        let pem =
            self.ca
                .load()
                .sign_csr(csr, &SpiffeId::cluster(&self.fleet, cluster), now, ttl)?;
        Ok((pem, now + ttl))
    }

    /// Re-reads the CA when its files change (a rotation: the new bundle is trusted at once)
    /// and renews this replica's own certificate at two thirds of its life, until `shutdown`.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let ttl = self.cert_ttl.as_secs() as i64;
        let mut renew_at = unix_now() + ttl * 2 / 3;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let changed = mtime(&self.dir);
            let reload = *self.loaded.lock().expect("loaded lock") != changed;
            if reload {
                match self.reload() {
                    Ok(()) => {
                        *self.loaded.lock().expect("loaded lock") = changed;
                        renew_at = 0;
                        tracing::info!(dir = %self.dir.display(), "fleet CA reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "fleet CA not reloaded; the previous one stays in use")
                    }
                }
            }
            let now = unix_now();
            if now >= renew_at {
                match self.renew_own(now) {
                    Ok(until) => renew_at = now + (until - now) * 2 / 3,
                    Err(e) => {
                        // The current certificate stays; try again next round.
                        tracing::error!(error = %e, "hub certificate not renewed");
                    }
                }
            }
        }
    }

    fn reload(&self) -> anyhow::Result<()> {
        let (bundle, key) = (read(&self.dir, CA_CERT)?, read(&self.dir, CA_KEY)?);
        let ca = Ca::from_pem(&bundle, &key)?;
        self.server.set_roots(&bundle)?;
        self.http.set_roots(&bundle)?;
        self.client.set_roots(&bundle)?;
        self.ca.store(Arc::new(ca));
        self.bundle.store(Arc::new(bundle));
        Ok(())
    }
}

/// The clusters whose identities were revoked, and since when, as every replica mirrors them.
/// Agent streams check it on every message and wake when it changes.
#[derive(Debug)]
pub struct Revocations {
    at: RwLock<HashMap<String, i64>>,
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            at: RwLock::default(),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Revocations {
    /// The whole second (Unix) from which `cluster`'s credentials count again: its revocation
    /// time rounded up, so nothing issued in the second of a revocation survives it.
    fn since(&self, cluster: &str) -> Option<i64> {
        let at = *self.at.read().expect("revocations lock").get(cluster)?;
        Some(at.div_euclid(1000) + i64::from(at.rem_euclid(1000) > 0))
    }

    /// Whether `cluster`'s credential issued in second `issued_at_unix_s` has been revoked.
    pub fn revoked(&self, cluster: &str, issued_at_unix_s: i64) -> bool {
        self.since(cluster).is_some_and(|s| issued_at_unix_s < s)
    }

    /// The issue time (Unix seconds) for a credential made for `cluster` now: `now_s`, or the
    /// end of its revocation second when that is later, so a rejoin straight after a removal
    /// is not taken for a credential from before it.
    pub fn issue_time(&self, cluster: &str, now_s: i64) -> i64 {
        self.since(cluster).map_or(now_s, |s| s.max(now_s))
    }

    /// Wakes on every change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn set(&self, cluster: &str, at: Option<i64>) {
        let mut m = self.at.write().expect("revocations lock");
        match at {
            Some(at) => m.insert(cluster.to_string(), at),
            None => m.remove(cluster),
        };
    }
}

impl Subscriber for Revocations {
    fn reset(&self, revision: i64, records: Vec<Change>) {
        self.at.write().expect("revocations lock").clear();
        self.apply(revision, records);
        self.version.send_modify(|v| *v += 1);
    }

    fn apply(&self, _revision: i64, changes: Vec<Change>) {
        let mut any = false;
        for c in changes {
            if let Change::Revoked {
                cluster,
                at_unix_ms,
            } = c
            {
                self.set(&cluster, at_unix_ms);
                any = true;
            }
        }
        if any {
            self.version.send_modify(|v| *v += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// The runbook's rotation: trust old and new, then sign with the new, then drop the old.
    #[test]
    fn a_ca_rotation_overlaps_old_and_new_roots() {
        let d = tempfile::tempdir().unwrap();
        let (a, pa) = Ca::generate("f", unix_now()).unwrap();
        let (b, pb) = Ca::generate("f", unix_now()).unwrap();
        write(d.path(), CA_CERT, &pa.cert_pem);
        write(d.path(), CA_KEY, &pa.key_pem);
        let t = HubTls::load(
            d.path(),
            "f",
            "1",
            vec!["127.0.0.1".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
        let own = |t: &HubTls| t.identity.leaf().unwrap();
        assert!(flotilla_api::pki::signed_by(&own(&t), a.cert_pem()));
        assert_eq!(t.pin(), a.pin());
        let (csr, _) = flotilla_api::pki::csr().unwrap();
        let signed = |t: &HubTls| {
            let (pem, _) = t.sign_cluster("c", &csr, unix_now()).unwrap();
            flotilla_api::pki::certs(&pem, "t").unwrap().remove(0)
        };

        // Step 2: old first (it signs), new beside it: both trusted, still signing with A.
        write(
            d.path(),
            CA_CERT,
            &format!("{}{}", pa.cert_pem, pb.cert_pem),
        );
        t.reload().unwrap();
        assert!(t.bundle().contains(&pb.cert_pem) && t.bundle().contains(&pa.cert_pem));
        assert_eq!(t.pin(), a.pin());
        assert!(flotilla_api::pki::signed_by(&signed(&t), a.cert_pem()));

        // Step 3: the new CA signs; its own certificate is re-issued from it.
        write(
            d.path(),
            CA_CERT,
            &format!("{}{}", pb.cert_pem, pa.cert_pem),
        );
        write(d.path(), CA_KEY, &pb.key_pem);
        t.reload().unwrap();
        t.renew_own(unix_now()).unwrap();
        assert_eq!(t.pin(), b.pin());
        assert!(flotilla_api::pki::signed_by(&signed(&t), b.cert_pem()));
        assert!(flotilla_api::pki::signed_by(&own(&t), b.cert_pem()));

        // A broken file leaves the running CA alone.
        write(d.path(), CA_KEY, "not a key");
        assert!(t.reload().is_err());
        assert_eq!(t.pin(), b.pin());
    }

    fn revoke(r: &Revocations, cluster: &str, at_ms: i64) {
        r.apply(
            1,
            vec![Change::Revoked {
                cluster: cluster.into(),
                at_unix_ms: Some(at_ms),
            }],
        );
    }

    #[test]
    fn a_revocation_covers_its_whole_second_and_a_rejoin_issues_after_it() {
        let r = Revocations::default();
        let changes = r.changes();
        revoke(&r, "a", 10_250);
        assert!(changes.has_changed().unwrap());
        // Issued in second 10 (before or after the revocation within it): revoked.
        assert!(r.revoked("a", 9));
        assert!(r.revoked("a", 10));
        assert!(!r.revoked("a", 11));
        assert!(!r.revoked("b", 0));
        // A credential made during second 10 is dated 11, so it is not taken for an old one.
        assert_eq!(r.issue_time("a", 10), 11);
        assert!(!r.revoked("a", r.issue_time("a", 10)));
        assert_eq!(r.issue_time("a", 50), 50);
        assert_eq!(r.issue_time("b", 10), 10);
        // On a whole second: that second counts again.
        revoke(&r, "c", 20_000);
        assert!(r.revoked("c", 19) && !r.revoked("c", 20));
        // Removed from the store: not revoked any more.
        r.apply(
            2,
            vec![Change::Revoked {
                cluster: "a".into(),
                at_unix_ms: None,
            }],
        );
        assert!(!r.revoked("a", 0));
    }
}
