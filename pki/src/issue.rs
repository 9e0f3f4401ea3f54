//! Issuance (feature `issue`, on by default): the in-memory and on-disk CA, certificates,
//! CRLs and the audit signing key. The gateway links the crate without it: it needs the
//! shared definitions (device ids and types, the manifest, the public key format), not rcgen.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::*;

/// Lower-case hex SHA-256 of a certificate's DER: the identity the registry enrolls.
pub fn fingerprint_hex(cert_der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der).as_ref())
}

/// A certificate and its private key, as issued.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of the private key.
    pub key_der: Vec<u8>,
    /// Big-endian serial number bytes.
    pub serial: Vec<u8>,
    pub not_after: OffsetDateTime,
}

impl IssuedCert {
    pub fn fingerprint_hex(&self) -> String {
        fingerprint_hex(&self.cert_der)
    }
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &hex::encode(&self.serial))
            .field("sha256", &self.fingerprint_hex())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Options for a device certificate. The defaults are what production devices get; tests
/// turn individual properties off to prove the gateway refuses them.
#[derive(Clone, Debug)]
pub struct DeviceCertOptions {
    pub validity: Duration,
    /// Start of validity; `None` is now minus [`CLOCK_SKEW_ALLOWANCE`].
    pub not_before: Option<OffsetDateTime>,
    /// Include the clientAuth extended key usage (the gateway requires it).
    pub client_auth_eku: bool,
}

impl Default for DeviceCertOptions {
    fn default() -> Self {
        Self {
            validity: Duration::days(DEFAULT_DEVICE_VALIDITY_DAYS.into()),
            not_before: None,
            client_auth_eku: true,
        }
    }
}

/// One revoked certificate, as it goes into a CRL.
#[derive(Clone, Debug)]
pub struct Revocation {
    pub serial: Vec<u8>,
    pub revoked_at: OffsetDateTime,
}

/// An in-memory certificate authority with an ECDSA P-256 key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("sha256", &fingerprint_hex(&self.cert_der))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Longest CA common name: 64 characters (RFC 5280's upper bound for a CN).
pub const MAX_CA_NAME_LEN: usize = 64;

/// A CA name no other Gatehouse CA has: `Gatehouse Device CA` and 8 random hex digits.
pub fn default_ca_name() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).unwrap_or_else(|e| panic!("the OS random generator failed: {e}"));
    format!("Gatehouse Device CA {}", hex::encode(bytes))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failing OS RNG is not recoverable for a CA; fall back to time would repeat serials.
    getrandom::fill(&mut bytes).unwrap_or_else(|e| panic!("the OS random generator failed: {e}"));
    // Positive, non-zero and 16 bytes long (RFC 5280 allows up to 20).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Gatehouse");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc())
}

impl CertificateAuthority {
    /// Generates a new CA with a fresh key.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let start = now() - CLOCK_SKEW_ALLOWANCE;
        params.not_before = start;
        params.not_after = start + validity;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der: der.to_vec(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a server certificate (serverAuth) for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<IssuedCert> {
        if dns.is_empty() && ips.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let mut sans = Vec::new();
        for name in dns {
            let ia5 = name
                .clone()
                .try_into()
                .map_err(|_| PkiError::InvalidDnsName(name.clone()))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = dns
            .first()
            .cloned()
            .or_else(|| ips.first().map(|ip| ip.to_string()))
            .unwrap_or_default();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let start = now() - CLOCK_SKEW_ALLOWANCE;
        params.not_before = start;
        params.not_after = start + validity;
        self.sign(params)
    }

    /// Issues a device certificate: CN and SAN URI `urn:gatehouse:device:ID`.
    pub fn issue_device(&self, id: &str, options: &DeviceCertOptions) -> Result<IssuedCert> {
        self.issue_named(DEVICE_URI_PREFIX, id, options)
    }

    /// Issues an operator's admin certificate (clientAuth): CN NAME and SAN URI
    /// `urn:gatehouse:admin:NAME`, the form the admin listener accepts for names its
    /// configuration allows. Never a device identity: it names no device.
    pub fn issue_admin(&self, name: &str, validity: Duration) -> Result<IssuedCert> {
        let options = DeviceCertOptions {
            validity,
            ..DeviceCertOptions::default()
        };
        self.issue_named(crate::ADMIN_URI_PREFIX, name, &options)
    }

    /// A client certificate named NAME: CN NAME and SAN URI `PREFIX` + NAME.
    fn issue_named(
        &self,
        prefix: &str,
        name: &str,
        options: &DeviceCertOptions,
    ) -> Result<IssuedCert> {
        validate_device_id(name)?;
        let uri = format!("{prefix}{name}");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into()
                .map_err(|_| PkiError::InvalidDeviceId(name.to_string()))?,
        )];
        if options.client_auth_eku {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let start = options
            .not_before
            .unwrap_or_else(|| now() - CLOCK_SKEW_ALLOWANCE);
        params.not_before = start;
        params.not_after = start + options.validity;
        self.sign(params)
    }

    /// Issues a client certificate for the gateway itself, for `wss://` backends that want
    /// mutual TLS.
    pub fn issue_client(&self, common_name: &str, validity: Duration) -> Result<IssuedCert> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let start = now() - CLOCK_SKEW_ALLOWANCE;
        params.not_before = start;
        params.not_after = start + validity;
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<IssuedCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            serial: serial.to_bytes(),
            not_after,
        })
    }

    /// Signs a CRL listing `revoked`, valid from `this_update` until `next_update`.
    pub fn crl_pem(
        &self,
        revoked: &[Revocation],
        crl_number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String> {
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: r.revoked_at,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// One certificate the on-disk CA issued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: String,
    #[serde(rename = "type")]
    pub device_type: String,
    /// Hex serial number.
    pub serial: String,
    pub sha256: String,
    /// Certificate path relative to the PKI directory.
    pub cert: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Index {
    crl_number: u64,
    devices: Vec<IndexEntry>,
}

/// An Ed25519 key for signing audit-log checkpoints.
pub struct AuditKey {
    /// PKCS#8 private key, PEM.
    pub private_pem: String,
    /// The raw 32-byte public key.
    pub public: Vec<u8>,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &hex::encode(&self.public))
            .field("private", &"<redacted>")
            .finish()
    }
}

impl AuditKey {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Ok(Self {
            private_pem: key.serialize_pem(),
            public: key.public_key_raw().to_vec(),
        })
    }

    /// The public key file's text.
    pub fn public_line(&self) -> String {
        format!("{AUDIT_PUBLIC_KEY_PREFIX}{}\n", hex::encode(&self.public))
    }
}

/// The on-disk CA managed by `gatehouse-pki`.
pub struct PkiDir {
    dir: PathBuf,
    ca: CertificateAuthority,
    index: Index,
}

impl std::fmt::Debug for PkiDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkiDir").field("dir", &self.dir).finish()
    }
}

impl PkiDir {
    pub const CA_CERT: &'static str = "ca.pem";
    pub const CA_KEY: &'static str = "ca.key";
    pub const SERVER_CERT: &'static str = "server.pem";
    pub const SERVER_KEY: &'static str = "server.key";
    pub const CRL: &'static str = "crl.pem";
    pub const INDEX: &'static str = "index.json";
    pub const DEVICES: &'static str = "devices";
    pub const AUDIT_KEY: &'static str = "audit.key";
    pub const AUDIT_PUB: &'static str = "audit.pub";

    /// Creates a new CA in `dir` (and an empty CRL) with a name of its own. Refuses to
    /// replace one unless `force`.
    pub fn init(dir: &Path, force: bool) -> Result<Self> {
        Self::init_named(dir, None, force)
    }

    /// Like [`PkiDir::init`], with the CA's common name `name`, or when `None`
    /// [`default_ca_name`]. Each CA needs a distinct name: a certificate from another CA of
    /// the same name looks, to a TLS verifier, like a forged signature (`decrypt_error`)
    /// rather than an unknown issuer (`unknown_ca`).
    pub fn init_named(dir: &Path, name: Option<&str>, force: bool) -> Result<Self> {
        let name = match name {
            Some(n) if n.trim().is_empty() || n.len() > MAX_CA_NAME_LEN => {
                return Err(PkiError::InvalidCaName(n.to_string()))
            }
            Some(n) => n.to_string(),
            None => default_ca_name(),
        };
        let cert_path = dir.join(Self::CA_CERT);
        if !force && (cert_path.exists() || dir.join(Self::CA_KEY).exists()) {
            return Err(PkiError::CaExists(dir.to_path_buf()));
        }
        fs::create_dir_all(dir.join(Self::DEVICES)).map_err(io_err(dir))?;
        let ca =
            CertificateAuthority::generate(&name, Duration::days(DEFAULT_CA_VALIDITY_DAYS.into()))?;
        write_atomic(&dir.join(Self::CA_KEY), ca.key_pem().as_bytes(), true)?;
        write_atomic(&cert_path, ca.cert_pem().as_bytes(), false)?;
        let mut pki = Self {
            dir: dir.to_path_buf(),
            ca,
            index: Index::default(),
        };
        pki.save_index()?;
        pki.write_crl(Duration::days(DEFAULT_CRL_VALIDITY_DAYS.into()))?;
        Ok(pki)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(Self::CA_CERT);
        let key_path = dir.join(Self::CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::MissingCa(dir.to_path_buf()));
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem)?;
        let index_path = dir.join(Self::INDEX);
        let index = if index_path.exists() {
            let text = fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            serde_json::from_str(&text).map_err(|e| PkiError::Corrupt {
                path: index_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            Index::default()
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(Self::CA_CERT)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(Self::CRL)
    }

    pub fn device_cert_path(&self, id: &str) -> PathBuf {
        self.dir.join(Self::DEVICES).join(format!("{id}.pem"))
    }

    pub fn device_key_path(&self, id: &str) -> PathBuf {
        self.dir.join(Self::DEVICES).join(format!("{id}.key"))
    }

    /// Every certificate this CA issued to a device, in issue order.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.index.devices
    }

    fn save_index(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.index).map_err(|e| PkiError::Corrupt {
            path: self.dir.join(Self::INDEX),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir.join(Self::INDEX), text.as_bytes(), false)
    }

    /// Creates the gateway's audit signing key: `audit.key` (0600) and `audit.pub`. Refuses to
    /// replace one unless `force` (checkpoints signed by the old key then verify only with
    /// the old public key).
    pub fn issue_audit_key(&self, force: bool) -> Result<AuditKey> {
        let key_path = self.dir.join(Self::AUDIT_KEY);
        if !force && key_path.exists() {
            return Err(PkiError::AuditKeyExists(key_path));
        }
        let key = AuditKey::generate()?;
        write_atomic(&key_path, key.private_pem.as_bytes(), true)?;
        write_atomic(
            &self.dir.join(Self::AUDIT_PUB),
            key.public_line().as_bytes(),
            false,
        )?;
        Ok(key)
    }

    /// Issues `server.pem`/`server.key`.
    pub fn issue_server(&self, dns: &[String], ips: &[IpAddr]) -> Result<IssuedCert> {
        let issued = self.ca.issue_server(
            dns,
            ips,
            Duration::days(DEFAULT_SERVER_VALIDITY_DAYS.into()),
        )?;
        write_atomic(
            &self.dir.join(Self::SERVER_KEY),
            issued.key_pem.as_bytes(),
            true,
        )?;
        write_atomic(
            &self.dir.join(Self::SERVER_CERT),
            issued.cert_pem.as_bytes(),
            false,
        )?;
        Ok(issued)
    }

    /// Issues an admin certificate into `admins/NAME.pem` and `admins/NAME.key` (0600).
    pub fn issue_admin(&self, name: &str) -> Result<(IssuedCert, PathBuf)> {
        let issued = self.ca.issue_admin(
            name,
            Duration::days(crate::DEFAULT_ADMIN_VALIDITY_DAYS.into()),
        )?;
        let dir = self.dir.join("admins");
        fs::create_dir_all(&dir).map_err(io_err(&self.dir))?;
        write_atomic(
            &dir.join(format!("{name}.key")),
            issued.key_pem.as_bytes(),
            true,
        )?;
        let cert = dir.join(format!("{name}.pem"));
        write_atomic(&cert, issued.cert_pem.as_bytes(), false)?;
        Ok((issued, cert))
    }

    /// Issues a device certificate into `devices/ID.pem` and `devices/ID.key`.
    pub fn issue_device(
        &mut self,
        id: &str,
        device_type: &str,
        rotate: bool,
        options: &DeviceCertOptions,
    ) -> Result<ManifestEntry> {
        validate_device_id(id)?;
        validate_device_type(device_type)?;
        if !rotate && self.index.devices.iter().any(|e| e.id == id) {
            return Err(PkiError::DeviceExists(id.to_string()));
        }
        let issued = self.ca.issue_device(id, options)?;
        let entry = self.store_device(id, device_type, &issued, true)?;
        self.save_index()?;
        Ok(entry)
    }

    fn store_device(
        &mut self,
        id: &str,
        device_type: &str,
        issued: &IssuedCert,
        sync: bool,
    ) -> Result<ManifestEntry> {
        fs::create_dir_all(self.dir.join(Self::DEVICES)).map_err(io_err(&self.dir))?;
        write_file(
            &self.device_key_path(id),
            issued.key_pem.as_bytes(),
            true,
            sync,
        )?;
        write_file(
            &self.device_cert_path(id),
            issued.cert_pem.as_bytes(),
            false,
            sync,
        )?;
        let cert = format!("{}/{id}.pem", Self::DEVICES);
        let entry = IndexEntry {
            id: id.to_string(),
            device_type: device_type.to_string(),
            serial: hex::encode(&issued.serial),
            sha256: issued.fingerprint_hex(),
            cert: cert.clone(),
            issued_at: now(),
            not_after: issued.not_after,
            revoked_at: None,
        };
        self.index.devices.push(entry);
        Ok(ManifestEntry {
            id: id.to_string(),
            device_type: device_type.to_string(),
            cert,
            sha256: issued.fingerprint_hex(),
        })
    }

    /// Issues `count` device certificates `PREFIX-00001`... in parallel and writes the
    /// manifest `fleet-PREFIX.json` next to the CA. Returns the manifest and its path.
    pub fn issue_fleet(
        &mut self,
        device_type: &str,
        count: usize,
        prefix: &str,
    ) -> Result<(Manifest, PathBuf)> {
        validate_device_type(device_type)?;
        if count == 0 {
            return Err(PkiError::EmptyFleet);
        }
        let width = count.to_string().len().max(5);
        let ids: Vec<String> = (1..=count)
            .map(|n| format!("{prefix}-{n:0width$}"))
            .collect();
        let existing: std::collections::HashSet<&str> =
            self.index.devices.iter().map(|e| e.id.as_str()).collect();
        for id in &ids {
            validate_device_id(id)?;
            if existing.contains(id.as_str()) {
                return Err(PkiError::DeviceExists(id.clone()));
            }
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = ids.len().div_ceil(threads);
        let options = DeviceCertOptions::default();
        let issued: Vec<IssuedCert> = std::thread::scope(|scope| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|ids| {
                    let ca = &self.ca;
                    let options = &options;
                    scope.spawn(move || {
                        ids.iter()
                            .map(|id| ca.issue_device(id, options))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(ids.len());
            for handle in handles {
                match handle.join() {
                    Ok(part) => all.extend(part?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok::<_, PkiError>(all)
        })?;
        let mut manifest = Manifest::default();
        for (id, cert) in ids.iter().zip(&issued) {
            manifest
                .devices
                .push(self.store_device(id, device_type, cert, false)?);
        }
        // One file-system sync for all the certificates and keys, before the index says
        // they exist.
        let devices_dir = self.dir.join(Self::DEVICES);
        let handle = fs::File::open(&devices_dir).map_err(io_err(&devices_dir))?;
        rustix::fs::syncfs(&handle).map_err(|e| PkiError::Io {
            path: devices_dir.clone(),
            source: e.into(),
        })?;
        self.save_index()?;
        let path = self.dir.join(format!("fleet-{prefix}.json"));
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| PkiError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes(), false)?;
        Ok((manifest, path))
    }

    /// Revokes every unrevoked certificate of device `id` and rewrites `crl.pem`.
    pub fn revoke(&mut self, id: &str) -> Result<Vec<IndexEntry>> {
        validate_device_id(id)?;
        if !self.index.devices.iter().any(|e| e.id == id) {
            return Err(PkiError::UnknownDevice(id.to_string()));
        }
        let at = now();
        let mut revoked = Vec::new();
        for entry in self.index.devices.iter_mut().filter(|e| e.id == id) {
            if entry.revoked_at.is_none() {
                entry.revoked_at = Some(at);
                revoked.push(entry.clone());
            }
        }
        if revoked.is_empty() {
            return Err(PkiError::AlreadyRevoked(id.to_string()));
        }
        self.write_crl(Duration::days(DEFAULT_CRL_VALIDITY_DAYS.into()))?;
        self.save_index()?;
        Ok(revoked)
    }

    /// Signs a fresh `crl.pem` with every revoked certificate, valid for `validity`.
    pub fn write_crl(&mut self, validity: Duration) -> Result<PathBuf> {
        let revoked: Vec<Revocation> = self
            .index
            .devices
            .iter()
            .filter_map(|e| {
                Some(Revocation {
                    serial: hex::decode(&e.serial).ok()?,
                    revoked_at: e.revoked_at?,
                })
            })
            .collect();
        self.index.crl_number += 1;
        let this_update = now();
        let pem = self.ca.crl_pem(
            &revoked,
            self.index.crl_number,
            this_update,
            this_update + validity,
        )?;
        let path = self.crl_path();
        write_atomic(&path, pem.as_bytes(), false)?;
        self.save_index()?;
        Ok(path)
    }
}
