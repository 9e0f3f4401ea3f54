//! Operator actions that several entry points share: reloading the TLS material and the
//! schemas. SIGHUP, the CRL refresher and the admin API all call these, so a reload means the
//! same thing whichever way it is asked for. On any error the previous material stays in
//! force.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::net::tls::{TlsError, TlsState};
use crate::schema::{SchemaError, SchemaSet};

/// Reloads TLS material (certificates, CA bundle, CRLs) now, on the blocking pool.
pub async fn reload_tls(tls: Arc<TlsState>) -> Result<(), TlsError> {
    match tokio::task::spawn_blocking(move || tls.reload()).await {
        Ok(r) => r,
        Err(e) => Err(TlsError::Verifier(format!("reload task failed: {e}"))),
    }
}

/// Loads the schema directory again and swaps it in as a whole. Returns the number of device
/// types loaded.
pub async fn reload_schemas(
    schemas: Arc<ArcSwap<SchemaSet>>,
    dir: PathBuf,
) -> Result<usize, SchemaError> {
    let path = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::config::load_schemas(&dir))
        .await
        .map_err(|e| SchemaError::Dir {
            path,
            source: std::io::Error::other(e.to_string()),
        })??;
    let n = loaded.device_types().count();
    schemas.store(Arc::new(loaded));
    Ok(n)
}

/// What a full reload (SIGHUP, `gatehouse reload`) did.
#[derive(Debug)]
pub struct Reloaded {
    pub tls: Result<(), TlsError>,
    pub schemas: Result<usize, SchemaError>,
}

/// Reloads the TLS material and the schemas, each on its own: a broken schema file does not
/// keep a new CRL out, and the other way round.
pub async fn reload_all(
    tls: Arc<TlsState>,
    schemas: Arc<ArcSwap<SchemaSet>>,
    schemas_dir: PathBuf,
) -> Reloaded {
    Reloaded {
        tls: reload_tls(tls).await,
        schemas: reload_schemas(schemas, schemas_dir).await,
    }
}
