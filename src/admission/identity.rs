//! Device identity and admission, pure: what a verified leaf certificate says (fingerprint,
//! serial, issuer, validity, clientAuth), what the loaded CRLs say about it, and whether the
//! registry record lets it in. Takes time as an argument; no I/O. Chain verification itself is
//! rustls/webpki's job (`net::tls`); this module re-checks what a resumed TLS session would skip.

use std::collections::HashSet;

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::model::{Device, DeviceStatus, Fingerprint};
use crate::wire::Refusal;

/// What to do when a CRL is past its next-update time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCrlPolicy {
    /// Refuse every client certificate the stale CRL covers until a fresh CRL is loaded.
    Refuse,
    /// Keep accepting with the stale CRL and log a warning at every check.
    Warn,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("peer certificate is not valid DER: {0}")]
    BadCertificate(String),
    #[error("CRL is not valid DER: {0}")]
    BadCrl(String),
}

/// What the gateway needs from a device's leaf certificate.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    pub fingerprint: Fingerprint,
    pub serial: Vec<u8>,
    /// DER of the issuer name, to match CRL entries.
    pub issuer: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub client_auth: bool,
    /// The id in the `urn:gatehouse:device:` SAN URI, if any (informational).
    pub claimed_id: Option<String>,
}

impl PeerCertificate {
    pub fn parse(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let client_auth =
            matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
        let claimed_id = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => uri
                        .strip_prefix(gatehouse_pki::DEVICE_URI_PREFIX)
                        .map(str::to_string),
                    _ => None,
                })
            });
        Ok(Self {
            fingerprint: Fingerprint::of(der),
            serial: cert.raw_serial().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            client_auth,
            claimed_id,
        })
    }
}

/// Who an admin client certificate names: `Admin(NAME)` for a `urn:gatehouse:admin:NAME` SAN
/// URI, `Device` for a device certificate (never an admin credential), `None` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminIdentity {
    Admin(String),
    Device,
    Other,
}

pub fn admin_identity(der: &[u8]) -> AdminIdentity {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return AdminIdentity::Other;
    };
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris
        .iter()
        .any(|u| u.starts_with(gatehouse_pki::DEVICE_URI_PREFIX))
    {
        return AdminIdentity::Device;
    }
    uris.iter()
        .find_map(|u| u.strip_prefix(gatehouse_pki::ADMIN_URI_PREFIX))
        .map_or(AdminIdentity::Other, |n| {
            AdminIdentity::Admin(n.to_string())
        })
}

/// One CRL's revoked serials, indexed for the post-handshake check.
#[derive(Debug, Clone, Default)]
pub struct RevocationIndex {
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
    /// (issuer DER, next update as Unix time) per CRL.
    next_updates: Vec<(Vec<u8>, Option<i64>)>,
    /// Each CRL's this-update, Unix time.
    this_updates: Vec<i64>,
}

impl RevocationIndex {
    pub fn add_crl(&mut self, der: &[u8]) -> Result<(), IdentityError> {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| IdentityError::BadCrl(e.to_string()))?;
        let issuer = crl.issuer().as_raw().to_vec();
        for entry in crl.iter_revoked_certificates() {
            self.revoked
                .insert((issuer.clone(), entry.raw_serial().to_vec()));
        }
        self.next_updates
            .push((issuer, crl.next_update().map(|t| t.timestamp())));
        self.this_updates.push(crl.last_update().timestamp());
        Ok(())
    }

    pub fn is_revoked(&self, cert: &PeerCertificate) -> bool {
        self.lists(&cert.issuer, &cert.serial)
    }

    /// Whether a CRL of `issuer` (DER name) lists `serial`.
    pub fn lists(&self, issuer: &[u8], serial: &[u8]) -> bool {
        self.revoked.contains(&(issuer.to_vec(), serial.to_vec()))
    }

    /// Whether any CRL covering this certificate's issuer is past its next update at `now`.
    pub fn is_stale_for(&self, cert: &PeerCertificate, now: i64) -> bool {
        self.next_updates
            .iter()
            .any(|(issuer, next)| *issuer == cert.issuer && next.is_some_and(|n| n < now))
    }

    /// Next-update times already in the past at `now`, one per stale CRL.
    pub fn stale(&self, now: i64) -> impl Iterator<Item = i64> + '_ {
        self.next_updates
            .iter()
            .filter_map(move |(_, next)| next.filter(|n| *n < now))
    }

    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// CRLs loaded.
    pub fn crl_count(&self) -> usize {
        self.this_updates.len()
    }

    /// The earliest next-update of the loaded CRLs (Unix time), if any has one.
    pub fn earliest_next_update(&self) -> Option<i64> {
        self.next_updates.iter().filter_map(|(_, n)| *n).min()
    }

    /// The oldest this-update of the loaded CRLs (Unix time).
    pub fn oldest_this_update(&self) -> Option<i64> {
        self.this_updates.iter().copied().min()
    }

    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

/// Checks on the certificate alone, run after every handshake (full or resumed).
pub fn check_certificate(
    cert: &PeerCertificate,
    crls: &RevocationIndex,
    refuse_stale_crl: bool,
    now: i64,
) -> Result<(), Refusal> {
    if !cert.client_auth {
        return Err(Refusal::NotClientCertificate);
    }
    if now < cert.not_before || now > cert.not_after {
        return Err(Refusal::CertificateExpired);
    }
    if crls.is_revoked(cert) {
        return Err(Refusal::CertificateRevoked);
    }
    if refuse_stale_crl && crls.is_stale_for(cert, now) {
        return Err(Refusal::CrlStale);
    }
    Ok(())
}

/// The registry's verdict on a device record found by fingerprint.
pub fn check_device(device: Option<&Device>) -> Result<&Device, Refusal> {
    match device {
        None => Err(Refusal::UnknownDevice),
        Some(d) => match d.status {
            DeviceStatus::Active => Ok(d),
            DeviceStatus::Suspended => Err(Refusal::DeviceSuspended),
            DeviceStatus::Revoked => Err(Refusal::DeviceRevoked),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Identity extraction and CRL parsing take arbitrary bytes without panicking.
        #[test]
        fn arbitrary_der_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = PeerCertificate::parse(&bytes);
            let _ = RevocationIndex::default().add_crl(&bytes);
        }

        /// A real certificate with bytes flipped is refused or parsed, never a panic.
        #[test]
        fn mutated_certificates_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16)) {
            let mut der = mutation_base().to_vec();
            for (at, x) in flips {
                let i = at % der.len();
                der[i] ^= x;
            }
            let _ = PeerCertificate::parse(&der);
        }
    }

    /// One device certificate's DER, issued once for the mutation test.
    fn mutation_base() -> &'static [u8] {
        static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DER.get_or_init(|| {
            ca().issue_device("dev-fuzz", &DeviceCertOptions::default())
                .unwrap()
                .cert_der
        })
    }
    use gatehouse_pki::{CertificateAuthority, DeviceCertOptions, Revocation};
    use time::{Duration, OffsetDateTime};

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("test", Duration::days(10)).unwrap()
    }

    #[test]
    fn an_admin_certificate_names_its_admin_and_a_device_certificate_never_does() {
        let ca = ca();
        let admin = ca.issue_admin("ops-alice", Duration::days(1)).unwrap();
        assert_eq!(
            admin_identity(&admin.cert_der),
            AdminIdentity::Admin("ops-alice".into())
        );
        let device = ca
            .issue_device("sensor-1", &DeviceCertOptions::default())
            .unwrap();
        assert_eq!(admin_identity(&device.cert_der), AdminIdentity::Device);
        let server = ca
            .issue_server(&["localhost".into()], &[], Duration::days(1))
            .unwrap();
        assert_eq!(admin_identity(&server.cert_der), AdminIdentity::Other);
        assert_eq!(admin_identity(b"not a certificate"), AdminIdentity::Other);
        // An admin certificate is no device identity either.
        assert_eq!(
            PeerCertificate::parse(&admin.cert_der).unwrap().claimed_id,
            None
        );
        assert!(ca.issue_admin("bad name!", Duration::days(1)).is_err());
    }

    fn crl_der(ca: &CertificateAuthority, serials: &[Vec<u8>], next: OffsetDateTime) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject;
        let now = OffsetDateTime::now_utc();
        let revoked: Vec<_> = serials
            .iter()
            .map(|s| Revocation {
                serial: s.clone(),
                revoked_at: now - Duration::hours(2),
            })
            .collect();
        let pem = ca
            .crl_pem(&revoked, 1, now - Duration::hours(1), next)
            .unwrap();
        rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn parses_identity_fields() {
        let ca = ca();
        let issued = ca
            .issue_device("dev-9", &DeviceCertOptions::default())
            .unwrap();
        let cert = PeerCertificate::parse(&issued.cert_der).unwrap();
        assert_eq!(cert.fingerprint.to_string(), issued.fingerprint_hex());
        assert_eq!(cert.serial, issued.serial);
        assert!(cert.client_auth);
        assert_eq!(cert.claimed_id.as_deref(), Some("dev-9"));
        assert_eq!(
            Fingerprint::parse_hex(&issued.fingerprint_hex()),
            Some(cert.fingerprint)
        );
        assert!(PeerCertificate::parse(b"garbage").is_err());
    }

    #[test]
    fn certificate_checks() {
        let ca = ca();
        let now = OffsetDateTime::now_utc();
        let good = PeerCertificate::parse(
            &ca.issue_device("a", &DeviceCertOptions::default())
                .unwrap()
                .cert_der,
        )
        .unwrap();
        let revoked_issued = ca.issue_device("b", &DeviceCertOptions::default()).unwrap();
        let revoked = PeerCertificate::parse(&revoked_issued.cert_der).unwrap();
        let no_eku = PeerCertificate::parse(
            &ca.issue_device(
                "c",
                &DeviceCertOptions {
                    client_auth_eku: false,
                    ..Default::default()
                },
            )
            .unwrap()
            .cert_der,
        )
        .unwrap();
        let mut crls = RevocationIndex::default();
        crls.add_crl(&crl_der(
            &ca,
            std::slice::from_ref(&revoked_issued.serial),
            now + Duration::days(1),
        ))
        .unwrap();
        let t = now.unix_timestamp();
        assert_eq!(check_certificate(&good, &crls, true, t), Ok(()));
        assert_eq!(
            check_certificate(&revoked, &crls, true, t),
            Err(Refusal::CertificateRevoked)
        );
        assert_eq!(
            check_certificate(&no_eku, &crls, true, t),
            Err(Refusal::NotClientCertificate)
        );
        assert_eq!(
            check_certificate(&good, &crls, true, t + 1000 * 86400),
            Err(Refusal::CertificateExpired)
        );
        // Two days on, the CRL is stale: refused under `refuse`, admitted under `warn`.
        let later = t + 2 * 86400;
        assert_eq!(
            check_certificate(&good, &crls, true, later),
            Err(Refusal::CrlStale)
        );
        assert_eq!(check_certificate(&good, &crls, false, later), Ok(()));
        assert_eq!(crls.stale(later).count(), 1);
        // A CRL from another CA says nothing about this one's certificates.
        let other = CertificateAuthority::generate("other", Duration::days(10)).unwrap();
        let mut other_crls = RevocationIndex::default();
        other_crls
            .add_crl(&crl_der(
                &other,
                std::slice::from_ref(&revoked_issued.serial),
                now + Duration::days(1),
            ))
            .unwrap();
        assert_eq!(check_certificate(&revoked, &other_crls, true, t), Ok(()));
    }
}
