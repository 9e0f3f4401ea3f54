//! TLS material: builds the rustls `ServerConfig` (client certificates required, verified
//! against the CA bundle and CRLs) once, shares it in an `Arc`, and swaps in a new one on
//! reload (CRL change, SIGHUP, admin API) with the session ticketer kept, so tickets issued
//! before a reload still resume after it. Also builds the client config for `wss://` backends.
//! Whether a verified device may connect is decided after the handshake by `identity`.

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

/// One loaded generation of TLS material.
pub struct Loaded {
    pub server: Arc<ServerConfig>,
    pub crls: RevocationIndex,
    mtimes: Vec<Option<SystemTime>>,
}

/// The current TLS material, swappable on reload.
pub struct TlsState {
    cfg: TlsConfig,
    provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    current: ArcSwap<Loaded>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("cfg", &self.cfg).finish()
    }
}

impl TlsState {
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let provider = provider();
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        let loaded = build(cfg, &provider, &ticketer)?;
        Ok(Self {
            cfg: cfg.clone(),
            provider,
            ticketer,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    pub fn stale_policy(&self) -> StaleCrlPolicy {
        self.cfg.stale_crl
    }

    /// Rebuilds from the files. On error the previous material stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = build(&self.cfg, &self.provider, &self.ticketer)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// Rebuilds if any file's modification time changed. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if mtimes(&self.cfg) == self.current.load().mtimes {
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
            match self.cfg.stale_crl {
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
    let (crl_ders, crls) = load_crls(&cfg.crls)?;
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
