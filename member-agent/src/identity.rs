//! The agent's identity. With a join string (`<id>.<secret>@sha256:<CA hash>`) the agent
//! trusts only a hub whose CA has that hash, sends the token and a CSR, and gets a certificate
//! naming its cluster. From then on it connects with that certificate, renews it on its
//! stream at a jittered 60-90% of its life, and keeps it in a Secret in its own cluster, so a
//! restart needs no new token. A token without a pin means a hub without TLS (`--insecure`,
//! `--dev`): the token is sent on every connect.
//!
//! A failed renewal keeps the current certificate (it is still valid; the next try comes
//! later). A certificate that expired while the agent was offline cannot be renewed: without
//! a fresh join string the agent stops with an error saying so.

use std::sync::{Arc, Mutex};

use flotilla_api::grpc::Security;
use flotilla_api::tls::{ClientTls, Identity};
use flotilla_api::v1;
use flotilla_core::security::JoinString;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use crate::stream::SessionError;

/// Seconds before expiry at which a certificate is no longer used to connect (clock skew).
pub const EXPIRY_MARGIN_SECS: i64 = 60;

/// Where the identity is kept: a Secret in the agent's own cluster.
#[derive(Clone)]
pub struct Keeper {
    api: kube::Api<Secret>,
    name: String,
}

impl Keeper {
    /// The Secret `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: kube::Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }

    async fn load(&self) -> Result<Option<Held>, String> {
        let s = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        let Some(data) = s.and_then(|s| s.data) else {
            return Ok(None);
        };
        let get = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or(format!("Secret {}: no {k}", self.name))
        };
        Held::new(get("tls.crt")?, get("tls.key")?, get("ca.crt")?).map(Some)
    }

    async fn save(&self, h: &Held) -> Result<(), String> {
        let data = [
            ("tls.crt", &h.cert_pem),
            ("tls.key", &h.key_pem),
            ("ca.crt", &h.bundle_pem),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/name".to_string(),
                        "flotilla-agent".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        match self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(cur) => {
                let next = Secret {
                    metadata: kube::api::ObjectMeta {
                        resource_version: cur.metadata.resource_version,
                        ..secret.metadata
                    },
                    ..secret
                };
                self.api
                    .replace(&self.name, &Default::default(), &next)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            None => {
                self.api
                    .create(&Default::default(), &secret)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// A certificate held: PEMs and the leaf's validity.
#[derive(Clone)]
struct Held {
    cert_pem: String,
    key_pem: String,
    bundle_pem: String,
    not_before: i64,
    not_after: i64,
}

impl Held {
    fn new(cert_pem: String, key_pem: String, bundle_pem: String) -> Result<Held, String> {
        let leaf = flotilla_api::pki::certs(&cert_pem, "certificate")
            .and_then(|c| flotilla_api::pki::leaf(&c[0]))
            .map_err(|e| e.to_string())?;
        Ok(Held {
            cert_pem,
            key_pem,
            bundle_pem,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }
}

/// How one connection attempt identifies itself.
pub struct Attempt {
    /// How to dial.
    pub security: Security,
    /// The hello's token (empty with a certificate).
    pub token: String,
    /// The hello's CSR (a bootstrap over TLS).
    pub csr: Vec<u8>,
}

/// The agent's credentials across sessions.
pub struct Credentials {
    cluster: String,
    token: String,
    join: Option<JoinString>,
    keeper: Option<Keeper>,
    held: Mutex<Option<Held>>,
    identity: Arc<Identity>,
    /// The key of the CSR in flight (bootstrap or renewal).
    pending: Mutex<Option<String>>,
    /// Where in the 60-90% window this agent renews.
    jitter: f64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster", &self.cluster)
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// From the `--token` value and, when kept, the identity already in `keeper`'s Secret.
    pub async fn load(
        cluster: &str,
        token: &str,
        keeper: Option<Keeper>,
    ) -> Result<Arc<Credentials>, SessionError> {
        let join = match token.contains('@') {
            true => Some(JoinString::parse(token).map_err(|e| {
                SessionError::Refused(tonic::Status::invalid_argument(format!("--token: {e}")))
            })?),
            false => None,
        };
        let held = match &keeper {
            Some(k) => match k.load().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stored identity; joining with the token");
                    None
                }
            },
            None => None,
        };
        let c = Credentials {
            cluster: cluster.to_string(),
            token: token.to_string(),
            join,
            keeper,
            held: Mutex::new(None),
            identity: Arc::new(Identity::default()),
            pending: Mutex::new(None),
            jitter: rand::random(),
        };
        if let Some(h) = held {
            match c.install(h) {
                Ok(()) => tracing::info!("using the identity kept in the cluster"),
                Err(e) => {
                    tracing::warn!(error = %e, "the stored identity is unusable; joining with the token")
                }
            }
        }
        Ok(Arc::new(c))
    }

    /// The plaintext credentials of an agent whose hub runs without TLS.
    pub fn plaintext(cluster: &str, token: &str) -> Arc<Credentials> {
        Arc::new(Credentials {
            cluster: cluster.to_string(),
            token: token.to_string(),
            join: None,
            keeper: None,
            held: Mutex::new(None),
            identity: Arc::new(Identity::default()),
            pending: Mutex::new(None),
            jitter: 0.5,
        })
    }

    fn install(&self, h: Held) -> Result<(), String> {
        self.identity
            .set(&h.cert_pem, &h.key_pem)
            .map_err(|e| e.to_string())?;
        *self.held.lock().expect("held lock") = Some(h);
        Ok(())
    }

    /// How the next connection identifies itself at `now` (Unix seconds).
    pub fn attempt(&self, now: i64) -> Result<Attempt, SessionError> {
        let held = self.held.lock().expect("held lock").clone();
        if let Some(h) = &held
            && now + EXPIRY_MARGIN_SECS < h.not_after
        {
            let tls = ClientTls::new(&h.bundle_pem, Some(self.identity.clone()))
                .map_err(|e| SessionError::Retry(format!("the stored CA bundle: {e}")))?;
            return Ok(Attempt {
                security: Security::Tls(tls),
                token: String::new(),
                csr: Vec::new(),
            });
        }
        let Some(join) = &self.join else {
            if let Some(h) = held {
                return Err(expired(&self.cluster, h.not_after));
            }
            // No pin: a hub without TLS.
            return Ok(Attempt {
                security: Security::Plaintext,
                token: self.token.clone(),
                csr: Vec::new(),
            });
        };
        let (csr, key) =
            flotilla_api::pki::csr().map_err(|e| SessionError::Retry(e.to_string()))?;
        *self.pending.lock().expect("pending lock") = Some(key);
        Ok(Attempt {
            security: Security::Tls(ClientTls::pinned(&join.ca_hash)),
            token: join.token.reveal(),
            csr,
        })
    }

    /// Keeps a certificate the hub signed for the CSR in flight: in use from the next
    /// connection, and in the Secret. On any failure the current certificate stays.
    pub async fn accept(&self, issued: &v1::IssuedCertificate) -> Result<(), String> {
        let key = self
            .pending
            .lock()
            .expect("pending lock")
            .take()
            .ok_or("a certificate arrived with no request in flight")?;
        let h = Held::new(
            issued.certificate_pem.clone(),
            key,
            issued.ca_bundle_pem.clone(),
        )?;
        self.install(h.clone())?;
        tracing::info!(not_after = h.not_after, "certificate issued by the hub");
        if let Some(k) = &self.keeper
            && let Err(e) = k.save(&h).await
        {
            tracing::warn!(error = %e, "the certificate could not be kept in the cluster; a restart will need a new join token");
        }
        Ok(())
    }

    /// When the current certificate should be renewed (Unix seconds), if there is one.
    pub fn renew_at(&self) -> Option<i64> {
        let held = self.held.lock().expect("held lock");
        held.as_ref()
            .map(|h| flotilla_core::security::renew_at(h.not_before, h.not_after, self.jitter))
    }

    /// A renewal CSR (its key kept until the certificate arrives).
    pub fn renewal(&self) -> Result<Vec<u8>, String> {
        let (csr, key) = flotilla_api::pki::csr().map_err(|e| e.to_string())?;
        *self.pending.lock().expect("pending lock") = Some(key);
        Ok(csr)
    }

    /// The serial of the certificate in use (for logs and tests).
    pub fn serial(&self) -> Option<String> {
        let leaf = self.identity.leaf()?;
        flotilla_api::pki::leaf(&leaf).ok().map(|l| l.serial)
    }
}

fn expired(cluster: &str, not_after: i64) -> SessionError {
    SessionError::Refused(tonic::Status::unauthenticated(format!(
        "the agent's certificate expired (at Unix time {not_after}) while it could not reach the \
         hub, so it cannot renew it; create a new join token (flotctl token create {cluster}) \
         and restart the agent with the join string"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::pki::{Ca, Usage};
    use flotilla_core::security::SpiffeId;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn credentials(join: Option<String>) -> Credentials {
        Credentials {
            cluster: "a".into(),
            token: join.clone().unwrap_or_default(),
            join: join.map(|j| JoinString::parse(&j).unwrap()),
            keeper: None,
            held: Mutex::new(None),
            identity: Arc::new(Identity::default()),
            pending: Mutex::new(None),
            jitter: 0.5,
        }
    }

    fn held(ca: &Ca, issued: i64, ttl: i64) -> Held {
        let p = ca
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, issued, ttl)
            .unwrap();
        Held::new(p.cert_pem, p.key_pem, ca.cert_pem().to_string()).unwrap()
    }

    #[test]
    fn a_valid_certificate_connects_without_a_token() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let c = credentials(None);
        c.install(held(&ca, now(), 3600)).unwrap();
        let a = c.attempt(now()).unwrap();
        assert!(matches!(a.security, Security::Tls(_)));
        assert!(a.token.is_empty() && a.csr.is_empty());
        // Renewal is due 60-90% through the life (0.5 jitter: 75%).
        let at = c.renew_at().unwrap();
        assert!(
            (at - (now() - flotilla_api::pki::SKEW_SECS
                + (3600 + flotilla_api::pki::SKEW_SECS) * 3 / 4))
                .abs()
                <= 2
        );
    }

    #[test]
    fn a_certificate_that_expired_offline_fails_clearly_without_a_join_string() {
        let (ca, _) = Ca::generate("f", now() - 7200).unwrap();
        let c = credentials(None);
        c.install(held(&ca, now() - 7200, 3600)).unwrap();
        let Err(SessionError::Refused(s)) = c.attempt(now()) else {
            panic!("an expired certificate was used");
        };
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("expired"), "{s}");
        assert!(s.message().contains("flotctl token create a"), "{s}");
        // With a fresh join string it bootstraps again instead.
        let join = format!("abc123.{}@sha256:{}", "0f".repeat(16), ca.pin());
        let c = credentials(Some(join));
        c.install(held(&ca, now() - 7200, 3600)).unwrap();
        let a = c.attempt(now()).unwrap();
        assert_eq!(a.token, format!("abc123.{}", "0f".repeat(16)));
        assert!(!a.csr.is_empty());
    }

    #[tokio::test]
    async fn a_failed_renewal_keeps_the_valid_certificate() {
        let (ca, _) = Ca::generate("f", now()).unwrap();
        let c = credentials(None);
        c.install(held(&ca, now(), 3600)).unwrap();
        let before = c.serial().unwrap();
        // A certificate arriving with no request in flight is refused; so is one whose key is
        // not the pending request's.
        let stray = ca
            .issue(&SpiffeId::cluster("f", "a"), &Usage::Client, now(), 7200)
            .unwrap();
        let issued = v1::IssuedCertificate {
            certificate_pem: stray.cert_pem.clone(),
            ca_bundle_pem: ca.cert_pem().to_string(),
            not_after_unix: now() + 7200,
        };
        assert!(c.accept(&issued).await.is_err());
        c.renewal().unwrap();
        assert!(
            c.accept(&issued).await.is_err(),
            "a certificate for another key was taken"
        );
        assert_eq!(c.serial().unwrap(), before);
        assert!(matches!(
            c.attempt(now()).unwrap().security,
            Security::Tls(_)
        ));
        // The renewal that matches is taken.
        let csr = c.renewal().unwrap();
        let pem = ca
            .sign_csr(&csr, &SpiffeId::cluster("f", "a"), now(), 7200)
            .unwrap();
        c.accept(&v1::IssuedCertificate {
            certificate_pem: pem,
            ca_bundle_pem: ca.cert_pem().to_string(),
            not_after_unix: now() + 7200,
        })
        .await
        .unwrap();
        assert_ne!(c.serial().unwrap(), before);
    }
}
