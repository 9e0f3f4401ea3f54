//! Certificate authority for a Gatehouse deployment.
//!
//! # Layout
//! - [`CertificateAuthority`]: an in-memory CA (ECDSA P-256) that issues server and device
//!   certificates and signs CRLs. Tests and the simulator use it directly, without files.
//! - [`PkiDir`]: the on-disk CA the `gatehouse-pki` tool manages: `ca.pem`/`ca.key`,
//!   `server.pem`/`server.key`, `devices/ID.pem`/`devices/ID.key`, `index.json` (every
//!   certificate issued and its revocation) and `crl.pem`.
//! - [`Manifest`]: the bulk-enrollment file written by `gatehouse-pki fleet` and read by
//!   `gatehouse devices enroll --manifest`.
//! - [`validate_device_id`] / [`validate_device_type`]: the one definition of what a device id
//!   and a device type may contain, shared with the gateway's registry.
//!
//! This crate owns certificate *issuance*. It does not decide whether a device may connect:
//! the gateway's registry is the authority for a device's type and status.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::Duration;

#[cfg(feature = "issue")]
mod issue;
#[cfg(feature = "issue")]
pub use issue::*;

/// Validity of a new CA certificate: 10 years, long enough to outlive the devices it signs.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// Validity of a server certificate: 1 year, renewed with the rest of the server's config.
pub const DEFAULT_SERVER_VALIDITY_DAYS: u32 = 365;
/// Validity of a device certificate: 2 years, a typical field-rotation period.
pub const DEFAULT_DEVICE_VALIDITY_DAYS: u32 = 730;
/// Time from a CRL's issue to its `nextUpdate`: 7 days. Re-sign (`gatehouse-pki crl`) before.
pub const DEFAULT_CRL_VALIDITY_DAYS: u32 = 7;
/// Certificates are back-dated by this much so that devices with a slightly slow clock accept
/// them and the gateway accepts them from the first second.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);
/// Longest device id: it goes into a CN (64 characters at most by RFC 5280) and a file name.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest device type: it names a directory under `schemas/`.
pub const MAX_DEVICE_TYPE_LEN: usize = 32;
/// Prefix of the SAN URI that carries the device id.
pub const DEVICE_URI_PREFIX: &str = "urn:gatehouse:device:";
/// SAN URI of an operator's admin certificate: `urn:gatehouse:admin:NAME`.
pub const ADMIN_URI_PREFIX: &str = "urn:gatehouse:admin:";
/// Validity of an admin certificate: 90 days (operators renew; a lost one expires soon).
pub const DEFAULT_ADMIN_VALIDITY_DAYS: u32 = 90;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid device id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ - (it must fit in a certificate SAN URI and a file name), not starting with '.' or '-'")]
    InvalidDeviceId(String),
    #[error("invalid device type {0:?}: use 1-32 characters from a-z 0-9 _ -, starting with a letter (it names a directory under schemas/)")]
    InvalidDeviceType(String),
    #[error("no CA in {0}: run `gatehouse-pki init --dir {0}` first")]
    MissingCa(PathBuf),
    #[error("a CA already exists in {0}: pass --force to replace it (every certificate it issued stops being trusted)")]
    CaExists(PathBuf),
    #[error("device {0:?} already has a certificate: pass --rotate to issue another one (the old one stays valid until revoked)")]
    DeviceExists(String),
    #[error("unknown device {0:?}: `gatehouse-pki list` shows the devices this CA issued")]
    UnknownDevice(String),
    #[error("device {0:?} has no certificate that is not already revoked")]
    AlreadyRevoked(String),
    #[error("invalid CA name {0:?}: use 1-64 characters")]
    InvalidCaName(String),
    #[error("fleet count must be at least 1")]
    EmptyFleet,
    #[error("server certificate needs at least one --dns name or --ip address")]
    NoServerNames,
    #[error("invalid DNS name {0:?} for the server certificate")]
    InvalidDnsName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[cfg(feature = "issue")]
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("an audit key already exists at {0}: pass --force to replace it (old checkpoints then verify only with the old audit.pub)")]
    AuditKeyExists(PathBuf),
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a device id: 1-64 of `A-Za-z0-9._-`, not starting with `.` or `-`.
pub fn validate_device_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidDeviceId(id.to_string()))
    }
}

/// Checks a device type: 1-32 of `a-z0-9_-`, starting with a letter.
pub fn validate_device_type(device_type: &str) -> Result<()> {
    let ok = device_type.len() <= MAX_DEVICE_TYPE_LEN
        && device_type.starts_with(|c: char| c.is_ascii_lowercase())
        && device_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidDeviceType(device_type.to_string()))
    }
}

/// One device in a bulk-enrollment manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub device_type: String,
    /// Certificate path; relative paths are relative to the manifest's directory.
    pub cert: String,
    /// Lower-case hex SHA-256 of the certificate DER.
    pub sha256: String,
}

/// The file `gatehouse-pki fleet` writes and `gatehouse devices enroll --manifest` reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub devices: Vec<ManifestEntry>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        serde_json::from_str(&text).map_err(|e| PkiError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a Gatehouse manifest: {e}"),
        })
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename); `private` files get
/// mode 0600 on Unix.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    write_file(path, bytes, private, true)
}

/// Like [`write_atomic`], with the fsync left to the caller when `sync` is false (bulk
/// issuance syncs the whole file system once instead of 20,000 times).
fn write_file(path: &Path, bytes: &[u8], private: bool, sync: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    if sync {
        file.sync_all().map_err(io_err(&tmp))?;
    }
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Prefix of the one-line public key file: `ed25519:` and 64 hex digits.
pub const AUDIT_PUBLIC_KEY_PREFIX: &str = "ed25519:";

/// Parses a public key file written by [`AuditKey::public_line`].
pub fn parse_audit_public_key(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.trim().strip_prefix(AUDIT_PUBLIC_KEY_PREFIX)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

#[cfg(all(test, feature = "issue"))]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn every_ca_gets_a_name_of_its_own() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let subject = |pki: &PkiDir| {
            use x509_parser::prelude::FromDer;
            let (_, cert) =
                x509_parser::certificate::X509Certificate::from_der(pki.ca().cert_der()).unwrap();
            cert.subject().to_string()
        };
        let first = subject(&PkiDir::init(a.path(), false).unwrap());
        let second = subject(&PkiDir::init(b.path(), false).unwrap());
        assert_ne!(first, second);
        assert!(first.contains("Gatehouse Device CA "), "{first}");
        let named = PkiDir::init_named(c.path(), Some("Acme Locks CA"), false).unwrap();
        assert!(subject(&named).contains("CN=Acme Locks CA"));
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            PkiDir::init_named(d.path(), Some(" "), false),
            Err(PkiError::InvalidCaName(_))
        ));
        assert!(!d.path().join(PkiDir::CA_CERT).exists());
    }

    #[test]
    fn device_ids_are_checked() {
        for ok in ["a", "dev-1", "Sensor_01.eu", &"x".repeat(64)] {
            assert!(validate_device_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "a:b", "é", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
        assert!(validate_device_type("env-sensor").is_ok());
        for bad in ["", "Env", "1env", "a.b", &"x".repeat(33)] {
            assert!(validate_device_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_certificate_carries_id_and_client_auth() {
        let ca = CertificateAuthority::generate("test", Duration::days(1)).unwrap();
        let issued = ca
            .issue_device("dev-1", &DeviceCertOptions::default())
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "dev-1");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::URI("urn:gatehouse:device:dev-1")
        )));
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.client_auth);
        assert_eq!(cert.raw_serial(), issued.serial.as_slice());
    }

    #[test]
    fn serials_differ_between_certificates() {
        let ca = CertificateAuthority::generate("test", Duration::days(1)).unwrap();
        let a = ca.issue_device("a", &DeviceCertOptions::default()).unwrap();
        let b = ca.issue_device("a", &DeviceCertOptions::default()).unwrap();
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn directory_lifecycle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        PkiDir::init(dir, false).unwrap();
        assert!(matches!(
            PkiDir::init(dir, false),
            Err(PkiError::CaExists(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut pki = PkiDir::open(dir).unwrap();
        pki.issue_device("d1", "sensor", false, &DeviceCertOptions::default())
            .unwrap();
        assert!(matches!(
            pki.issue_device("d1", "sensor", false, &DeviceCertOptions::default()),
            Err(PkiError::DeviceExists(_))
        ));
        // Bad input changes nothing.
        let before = fs::read(dir.join("index.json")).unwrap();
        assert!(pki
            .issue_device("bad id", "sensor", false, &DeviceCertOptions::default())
            .is_err());
        assert!(pki.revoke("nobody").is_err());
        assert_eq!(before, fs::read(dir.join("index.json")).unwrap());

        let (manifest, path) = pki.issue_fleet("sensor", 3, "fl").unwrap();
        assert_eq!(manifest.devices.len(), 3);
        assert_eq!(Manifest::load(&path).unwrap(), manifest);
        let revoked = pki.revoke("fl-00002").unwrap();
        assert_eq!(revoked.len(), 1);
        let crl = fs::read(dir.join("crl.pem")).unwrap();
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&crl).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![revoked[0].serial.clone()]);
        assert!(parsed.next_update().is_some());

        let reopened = PkiDir::open(dir).unwrap();
        assert_eq!(reopened.entries().len(), 4);
        assert!(matches!(
            PkiDir::open(&dir.join("missing")),
            Err(PkiError::MissingCa(_))
        ));
    }
}
