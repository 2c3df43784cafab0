//! The fleet's certificate authority and the certificates it issues (rcgen, ECDSA P-256).
//!
//! The CA signs three kinds of leaf, each naming its holder in one URI SAN
//! (`flotilla_core::security::SpiffeId`): a member cluster's agent (from its CSR, client auth
//! only), a hub replica (server and client auth, with the names it is dialled by) and a person
//! or tool with a role. From a CSR only the public key is taken: the requested names, key
//! usages and basic constraints are ignored, so a CSR asking to be a CA still gets a leaf.
//! Time is passed in (`now` in Unix seconds), never read here.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};

/// Clock skew a new certificate tolerates: it is valid from this long before it was made.
pub const SKEW_SECS: i64 = 300;

/// A CA's lifetime when Flotilla makes one.
pub const CA_LIFETIME_SECS: i64 = 10 * 365 * 24 * 3600;

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The input is not what it should be.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(what: &'static str) -> impl Fn(String) -> PkiError {
    move |reason| PkiError::Invalid { what, reason }
}

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// Its key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pair { cert_pem, key_pem: <hidden> }")
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// Client auth only (agents, people, tools).
    Client,
    /// Server and client auth, valid for these DNS names and IP addresses (hub replicas).
    Peer(Vec<String>),
}

/// The fleet's CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA for `fleet`, valid from `now` for [`CA_LIFETIME_SECS`].
    pub fn generate(fleet: &str, now: i64) -> Result<(Ca, Pair), PkiError> {
        let key = KeyPair::generate().map_err(|e| invalid("key")(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Flotilla fleet {fleet} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(now - SKEW_SECS)?;
        params.not_after = at(now + CA_LIFETIME_SECS)?;
        params.serial_number = Some(serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| invalid("CA certificate")(e.to_string()))?;
        let pair = Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok((Ca::from_pem(&pair.cert_pem, &pair.key_pem)?, pair))
    }

    /// The CA from its PEM certificate and key (an operator's own CA works too).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid("CA key")(e.to_string()))?;
        let cert_der = first_cert(cert_pem, "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid("CA certificate")(e.to_string()))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The pin agents check: SHA-256 of the CA's SubjectPublicKeyInfo, lower-case hex.
    pub fn pin(&self) -> String {
        spki_sha256(&self.cert_der).expect("the CA certificate was parsed when loaded")
    }

    /// Signs the public key of `csr` (DER) for `uri`, client auth only, valid from `now` for
    /// `ttl_secs`. Nothing else of the CSR is used, but its signature must verify.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        uri: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(|e| invalid("csr")(e.to_string()))?;
        let params = leaf_params(uri, &Usage::Client, now, ttl_secs)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| invalid("csr")(e.to_string()))?;
        Ok(cert.pem())
    }

    /// A new key and a certificate for `uri` with `usage`, valid from `now` for `ttl_secs`.
    pub fn issue(
        &self,
        uri: &str,
        usage: &Usage,
        now: i64,
        ttl_secs: i64,
    ) -> Result<Pair, PkiError> {
        let key = KeyPair::generate().map_err(|e| invalid("key")(e.to_string()))?;
        let params = leaf_params(uri, usage, now, ttl_secs)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| invalid("certificate")(e.to_string()))?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn leaf_params(
    uri: &str,
    usage: &Usage,
    now: i64,
    ttl_secs: i64,
) -> Result<CertificateParams, PkiError> {
    if ttl_secs <= 0 {
        return Err(invalid("ttl")(format!("{ttl_secs} s: must be positive")));
    }
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.not_before = at(now - SKEW_SECS)?;
    params.not_after = at(now + ttl_secs)?;
    params.serial_number = Some(serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, uri);
    params.distinguished_name = dn;
    let uri_san = SanType::URI(
        uri.try_into()
            .map_err(|e: rcgen::Error| invalid("uri")(e.to_string()))?,
    );
    params.subject_alt_names = vec![uri_san];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Usage::Peer(names) = usage {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        n.as_str()
                            .try_into()
                            .map_err(|e: rcgen::Error| invalid("name")(format!("{n:?}: {e}")))?,
                    ),
                });
        }
    }
    Ok(params)
}

/// A new key and a CSR for it (the names are the hub's to decide, so the CSR asks for none).
pub fn csr() -> Result<(Vec<u8>, String), PkiError> {
    let key = KeyPair::generate().map_err(|e| invalid("key")(e.to_string()))?;
    let req = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| invalid("csr")(e.to_string()))?;
    Ok((req.der().to_vec(), key.serialize_pem()))
}

/// What the hub reads from a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Its URI SANs.
    pub uris: Vec<String>,
    /// Its serial number, as colon-free lower-case hex.
    pub serial: String,
    /// When it becomes valid (Unix seconds).
    pub not_before: i64,
    /// When it stops being valid (Unix seconds).
    pub not_after: i64,
    /// Whether it may sign certificates.
    pub is_ca: bool,
}

/// Reads `der`.
pub fn leaf(der: &[u8]) -> Result<Leaf, PkiError> {
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid("certificate")(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                uris.push(u.to_string());
            }
        }
    }
    let is_ca = matches!(x.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    Ok(Leaf {
        uris,
        serial: flotilla_core::security::hex(x.raw_serial()),
        not_before: x.validity().not_before.timestamp(),
        not_after: x.validity().not_after.timestamp(),
        is_ca,
    })
}

/// Whether the certificate `leaf` (DER) carries a valid signature by the CA certificate
/// `ca_pem`'s key.
pub fn signed_by(leaf: &[u8], ca_pem: &str) -> bool {
    let Ok(ca) = first_cert(ca_pem, "CA") else {
        return false;
    };
    let (Ok((_, l)), Ok((_, c))) = (
        x509_parser::parse_x509_certificate(leaf),
        x509_parser::parse_x509_certificate(&ca),
    ) else {
        return false;
    };
    l.verify_signature(Some(c.public_key())).is_ok()
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo, lower-case hex (the join string's pin).
pub fn spki_sha256(der: &[u8]) -> Result<String, PkiError> {
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid("certificate")(e.to_string()))?;
    Ok(flotilla_core::security::hex(&Sha256::digest(
        x.public_key().raw,
    )))
}

/// Every certificate in `pem`, in order.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what)(e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(what)("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn first_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    Ok(certs(pem, what)?.remove(0))
}

fn at(unix: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| invalid("time")(e.to_string()))
}

fn serial() -> SerialNumber {
    // Positive (top bit clear), 16 random bytes as RFC 5280 asks.
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::security::{Principal, SpiffeId};

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_csr_asking_to_be_a_ca_gets_a_client_leaf_naming_only_the_hubs_choice() {
        let (ca, _) = Ca::generate("fleet", NOW).unwrap();
        // A hostile CSR: CA basic constraints, server auth, a name of its choosing.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.subject_alt_names.push(SanType::URI(
            SpiffeId::cluster("fleet", "b").as_str().try_into().unwrap(),
        ));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        let pem = ca
            .sign_csr(&der, &SpiffeId::cluster("fleet", "a"), NOW, 3600)
            .unwrap();
        let l = leaf(&certs(&pem, "t").unwrap()[0]).unwrap();
        assert!(!l.is_ca);
        assert_eq!(l.uris, vec![SpiffeId::cluster("fleet", "a")]);
        assert_eq!(l.not_after, NOW + 3600);
        let id = SpiffeId::parse(&l.uris[0]).unwrap();
        assert_eq!(id.principal, Principal::Cluster("a".into()));
    }

    #[test]
    fn a_csr_with_a_bad_signature_is_refused() {
        let (ca, _) = Ca::generate("fleet", NOW).unwrap();
        let (mut der, _) = csr().unwrap();
        let n = der.len();
        der[n - 3] ^= 0xff;
        let e = ca
            .sign_csr(&der, "spiffe://fleet/cluster/a", NOW, 60)
            .unwrap_err();
        assert!(e.to_string().starts_with("csr:"), "{e}");
        assert!(
            ca.sign_csr(b"garbage", "spiffe://fleet/cluster/a", NOW, 60)
                .is_err()
        );
    }

    #[test]
    fn the_pin_survives_a_reload_and_differs_between_cas() {
        let (a, pair) = Ca::generate("fleet", NOW).unwrap();
        let again = Ca::from_pem(&pair.cert_pem, &pair.key_pem).unwrap();
        assert_eq!(a.pin(), again.pin());
        assert_eq!(a.pin().len(), 64);
        let (b, _) = Ca::generate("fleet", NOW).unwrap();
        assert_ne!(a.pin(), b.pin());
        let e = Ca::from_pem("nonsense", &pair.key_pem).err().unwrap();
        assert!(e.to_string().contains("CA certificate"), "{e}");
    }

    #[test]
    fn a_leaf_verifies_against_its_own_ca_only() {
        let (a, _) = Ca::generate("fleet", NOW).unwrap();
        let (b, _) = Ca::generate("fleet", NOW).unwrap();
        let p = a
            .issue("spiffe://fleet/hub/1", &Usage::Client, NOW, 60)
            .unwrap();
        let der = certs(&p.cert_pem, "t").unwrap().remove(0);
        assert!(signed_by(&der, a.cert_pem()));
        assert!(!signed_by(&der, b.cert_pem()));
    }

    #[test]
    fn peer_certificates_serve_their_names() {
        let (ca, _) = Ca::generate("fleet", NOW).unwrap();
        let names = vec!["hub-0.example".to_string(), "127.0.0.1".to_string()];
        let p = ca
            .issue(&SpiffeId::hub("fleet", "1"), &Usage::Peer(names), NOW, 60)
            .unwrap();
        let l = leaf(&certs(&p.cert_pem, "t").unwrap()[0]).unwrap();
        assert_eq!(l.uris, vec![SpiffeId::hub("fleet", "1")]);
        assert!(
            ca.issue("spiffe://fleet/hub/1", &Usage::Client, NOW, 0)
                .is_err()
        );
    }
}
