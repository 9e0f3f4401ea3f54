//! Operator actions that several entry points share: reloading the TLS material, the
//! schemas, or the whole runtime configuration. SIGHUP, the CRL refresher, the admin API and
//! `gatehouse reload` all call these, so a reload means the same thing whichever way it is
//! asked for. On any error the previous material stays in force.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::live::{Live, LiveHandle};
use crate::net::tls::{TlsError, TlsState};
use crate::schema::SchemaError;

/// Reloads TLS material (certificates, CA bundle, CRLs) now, on the blocking pool.
pub async fn reload_tls(tls: Arc<TlsState>) -> Result<(), TlsError> {
    match tokio::task::spawn_blocking(move || tls.reload()).await {
        Ok(r) => r,
        Err(e) => Err(TlsError::Verifier(format!("reload task failed: {e}"))),
    }
}

/// Loads the schema directory of the snapshot in force again and swaps in a snapshot with
/// the new set. Returns the number of device types loaded.
pub async fn reload_schemas(live: LiveHandle) -> Result<usize, SchemaError> {
    let dir = live.load().config.schemas_dir.clone();
    let path = dir.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::config::load_schemas(&dir))
        .await
        .map_err(|e| SchemaError::Dir {
            path,
            source: std::io::Error::other(e.to_string()),
        })??;
    let n = loaded.device_types().count();
    let loaded = Arc::new(loaded);
    live.rcu(|current| current.with_schemas(loaded.clone()));
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schemas(#[from] SchemaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("reload task failed: {0}")]
    Task(String),
}

/// What a configuration reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub device_types: usize,
    pub routes: usize,
    /// Changed settings that need a restart; the running values stay.
    pub restart_needed: Vec<&'static str>,
}

/// Reads the configuration file again (the one `started` was loaded from) with everything
/// it names (schemas, backend TLS, the gateway's TLS material), then swaps in the TLS
/// material and a new runtime snapshot. Settings that need a restart keep their running
/// values and are reported. Nothing changes on any error.
pub async fn reload_config(
    started: &Config,
    live: &LiveHandle,
    tls: &Arc<TlsState>,
) -> Result<Reloaded, ReloadError> {
    let source = started.source.clone();
    let current_runtime = live.load().config.clone();
    let tls = tls.clone();
    let (snapshot, restart_needed) = {
        let started = started.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ReloadError> {
            let (runtime, restart_needed) = match &source {
                Some(path) => {
                    let next = Config::load(path)?;
                    (next.runtime.clone(), started.restart_needed(&next))
                }
                // Built without a file (embedded): reload the files the running one names.
                None => (current_runtime, Vec::new()),
            };
            let schemas = crate::config::load_schemas(&runtime.schemas_dir)?;
            let tls_cfg = runtime.tls.clone();
            let snapshot = Live::build(runtime, schemas)?;
            // Last fallible step; the snapshot swap after it cannot fail.
            tls.reload_with(&tls_cfg)?;
            Ok((snapshot, restart_needed))
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??
    };
    let reloaded = Reloaded {
        device_types: snapshot.schemas.device_types().count(),
        routes: snapshot.config.routes.iter().count(),
        restart_needed,
    };
    live.store(Arc::new(snapshot));
    Ok(reloaded)
}
