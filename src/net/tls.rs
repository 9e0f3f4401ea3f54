//! TLS material: builds the rustls `ServerConfig` (client certificates required, verified
//! against the CA bundle and CRLs) once, shares it in an `Arc`, and swaps in a new one on
//! reload (CRL change, SIGHUP, admin API) with the session ticketer kept, so tickets issued
//! before a reload still resume after it. Also builds the client config for `wss://` backends.
//! Whether a verified device may connect is decided after the handshake by `admission`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::admission::identity::RevocationIndex;
use crate::config::{BackendConfig, MinTlsVersion, StaleCrlPolicy, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration rejected by rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider, chosen explicitly (see CRATES.md: two enabled providers panic).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads every certificate in a PEM file; at least one.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(what, path, e))
}

fn load_crls(
    paths: &[PathBuf],
) -> Result<(Vec<CertificateRevocationListDer<'static>>, RevocationIndex), TlsError> {
    let mut ders = Vec::new();
    let mut index = RevocationIndex::default();
    for path in paths {
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| file_err("tls.crl", path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err("tls.crl", path, e))?;
        if crls.is_empty() {
            return Err(file_err("tls.crl", path, "no X509 CRL block found"));
        }
        for crl in crls {
            index
                .add_crl(&crl)
                .map_err(|e| file_err("tls.crl", path, e))?;
            ders.push(crl);
        }
    }
    Ok((ders, index))
}

fn mtimes(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&cfg.cert, &cfg.key, &cfg.client_ca]
        .into_iter()
        .chain(cfg.crls.iter())
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// One loaded generation of TLS material, with the configuration it was built from.
pub struct Loaded {
    pub server: Arc<ServerConfig>,
    pub crls: RevocationIndex,
    pub cfg: TlsConfig,
    mtimes: Vec<Option<SystemTime>>,
}

/// The current TLS material, swappable on reload.
pub struct TlsState {
    provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    current: ArcSwap<Loaded>,
    /// CRLs published to the cluster (`gatehouse crl publish`), used besides the files.
    published: ArcSwap<Vec<CertificateRevocationListDer<'static>>>,
    /// Counts reloads; sessions are checked against the new CRLs on each change.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("cfg", &self.current.load().cfg)
            .finish()
    }
}

impl TlsState {
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let provider = provider();
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        let loaded = build(cfg, &[], &provider, &ticketer)?;
        Ok(Self {
            provider,
            ticketer,
            current: ArcSwap::from_pointee(loaded),
            published: ArcSwap::from_pointee(Vec::new()),
            reloads: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Changes on every successful reload (SIGHUP, admin API, a file change, a config reload).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    pub fn stale_policy(&self) -> StaleCrlPolicy {
        self.current.load().cfg.stale_crl
    }

    /// Rebuilds from the files. On error the previous material stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = self.current.load().cfg.clone();
        self.reload_with(&cfg)
    }

    /// Builds from `cfg` (a reloaded configuration) and swaps it in. On error nothing changes.
    pub fn reload_with(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        let loaded = build(cfg, &self.published.load(), &self.provider, &self.ticketer)?;
        self.current.store(Arc::new(loaded));
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Replaces the CRLs published to the cluster and rebuilds with them (on error the
    /// previous material, published CRLs included, stays in force).
    pub fn set_published(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<(), TlsError> {
        let cfg = self.current.load().cfg.clone();
        let loaded = build(&cfg, &crls, &self.provider, &self.ticketer)?;
        self.published.store(Arc::new(crls));
        self.current.store(Arc::new(loaded));
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Rebuilds if any file's modification time changed. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let current = self.current.load();
        if mtimes(&current.cfg) == current.mtimes {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Logs every CRL past its next update, loudly.
    pub fn warn_if_stale(&self, now: i64) {
        let current = self.current.load();
        for next_update in current.crls.stale(now) {
            let when = time::OffsetDateTime::from_unix_timestamp(next_update)
                .map(|t| t.to_string())
                .unwrap_or_default();
            match current.cfg.stale_crl {
                StaleCrlPolicy::Refuse => tracing::error!(
                    crl.next_update = %when,
                    "a CRL is past its next update: devices it covers are REFUSED until a fresh CRL is installed (tls.stale_crl = \"refuse\")"
                ),
                StaleCrlPolicy::Warn => tracing::warn!(
                    crl.next_update = %when,
                    "a CRL is past its next update: devices are still ADMITTED with stale revocation data (tls.stale_crl = \"warn\"); re-sign it with `gatehouse-pki crl`"
                ),
            }
        }
    }
}

fn build(
    cfg: &TlsConfig,
    published: &[CertificateRevocationListDer<'static>],
    provider: &Arc<CryptoProvider>,
    ticketer: &Arc<dyn ProducesTickets>,
) -> Result<Loaded, TlsError> {
    let stamp = mtimes(cfg);
    let certs = load_certs("tls.cert", &cfg.cert)?;
    let key = load_key("tls.key", &cfg.key)?;
    let mut roots = RootCertStore::empty();
    for ca in load_certs("tls.client_ca", &cfg.client_ca)? {
        roots
            .add(ca)
            .map_err(|e| file_err("tls.client_ca", &cfg.client_ca, e))?;
    }
    let (mut crl_ders, mut crls) = load_crls(&cfg.crls)?;
    for crl in published {
        crls.add_crl(crl)
            .map_err(|e| TlsError::Verifier(format!("a CRL published to the cluster: {e}")))?;
        crl_ders.push(crl.clone());
    }
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crl_ders.is_empty() {
        verifier = verifier.with_crls(crl_ders);
        if cfg.stale_crl == StaleCrlPolicy::Refuse {
            verifier = verifier.enforce_revocation_expiration();
        }
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match cfg.min_version {
        MinTlsVersion::Tls13 => &[&rustls::version::TLS13],
        MinTlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| file_err("tls.cert/tls.key", &cfg.cert, e))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    if cfg.session_resumption {
        // Resumed sessions skip chain and CRL checks inside rustls; the session re-checks
        // the certificate and the registry after every handshake (see `identity`).
        server.ticketer = ticketer.clone();
        server.send_tls13_tickets = crate::config::DEFAULT_TLS13_TICKETS;
    } else {
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
    }
    Ok(Loaded {
        server: Arc::new(server),
        crls,
        cfg: cfg.clone(),
        mtimes: stamp,
    })
}

/// Client TLS for `wss://` backends: the configured CA bundle, and the gateway's own client
/// certificate when configured. `None` when no backend uses TLS.
pub fn backend_client_config(cfg: &BackendConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let Some(ca) = &cfg.ca else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    for cert in load_certs("backend.ca", ca)? {
        roots.add(cert).map_err(|e| file_err("backend.ca", ca, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let config = match &cfg.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs("backend.client_cert", cert)?,
                load_key("backend.client_key", key)?,
            )
            .map_err(|e| file_err("backend.client_cert", cert, e))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_pki::{DeviceCertOptions, PkiDir};

    /// A device certificate from another `gatehouse-pki init` CA is refused as `unknown_ca`:
    /// every CA gets a name of its own, so the verifier finds no issuer instead of a
    /// signature that fails (`decrypt_error`).
    #[tokio::test]
    async fn a_certificate_from_another_gatehouse_ca_gets_unknown_ca() {
        let (ours_dir, theirs_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ours = PkiDir::init(ours_dir.path(), false).unwrap();
        let theirs = PkiDir::init(theirs_dir.path(), false).unwrap();
        assert_ne!(
            x509_subject(ours.ca().cert_der()),
            x509_subject(theirs.ca().cert_der())
        );
        ours.issue_server(&["localhost".into()], &[]).unwrap();
        let cfg = TlsConfig {
            cert: ours_dir.path().join(PkiDir::SERVER_CERT),
            key: ours_dir.path().join(PkiDir::SERVER_KEY),
            client_ca: ours_dir.path().join(PkiDir::CA_CERT),
            crls: vec![ours_dir.path().join(PkiDir::CRL)],
            min_version: MinTlsVersion::Tls13,
            stale_crl: StaleCrlPolicy::Refuse,
            crl_refresh: std::time::Duration::from_secs(60),
            session_resumption: false,
        };
        let state = TlsState::load(&cfg).unwrap();
        let foreign = theirs
            .ca()
            .issue_device("foreign", &DeviceCertOptions::default())
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ours.ca().cert_der().to_vec()))
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(foreign.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(foreign.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio_rustls::TlsAcceptor::from(state.current().server.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (served, connected) = tokio::join!(server.accept(a), async {
            let mut tls = connector.connect(name, b).await?;
            // TLS 1.3: the client learns of the refusal on its first read.
            use tokio::io::AsyncReadExt;
            let mut byte = [0u8; 1];
            tls.read(&mut byte).await
        });
        assert!(served.is_err());
        let err = connected.unwrap_err().to_string();
        assert!(err.contains("UnknownCA"), "{err}");
    }

    fn x509_subject(der: &[u8]) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
        cert.subject().as_raw().to_vec()
    }
}
