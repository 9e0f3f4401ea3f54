//! Operator actions that several entry points share: reloading the TLS material, the
//! schemas, or the whole runtime configuration, and draining. SIGHUP, the CRL refresher, the
//! admin API and `gatehouse reload` / `gatehouse drain` all call these, so an action means
//! the same thing whichever way it is asked for. On any reload error the previous
//! configuration stays in force, whole.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::live::{Live, LiveHandle};
use crate::net::tls::{TlsError, TlsState};
use crate::schema::SchemaError;
use crate::session::table::SessionTable;
use crate::wire::Ending;

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
    #[error("{file}: {} changed, and only a restart applies it: nothing was reloaded (restore the running value, or restart the gateway)", .keys.join(", "))]
    RestartNeeded {
        file: String,
        keys: Vec<&'static str>,
    },
}

/// What a configuration reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub device_types: usize,
    pub routes: usize,
    /// Open sessions closed because their route went away or stopped taking their type.
    pub sessions_closed: usize,
}

/// Reads the configuration file again (the one `started` was loaded from) with everything
/// it names (schemas, backend TLS, the gateway's TLS material), then swaps in the TLS
/// material and a new runtime snapshot, and applies it to open sessions: new timers for all,
/// a close (4008) for those whose route is gone. A changed setting that needs a restart
/// refuses the reload. Nothing changes on any error.
pub async fn reload_config(
    started: &Config,
    live: &LiveHandle,
    tls: &Arc<TlsState>,
    sessions: &SessionTable,
) -> Result<Reloaded, ReloadError> {
    let source = started.source.clone();
    let current_runtime = live.load().config.clone();
    let tls = tls.clone();
    let snapshot = {
        let started = started.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ReloadError> {
            let runtime = match &source {
                Some(path) => {
                    let next = Config::load(path)?;
                    let keys = started.restart_needed(&next);
                    if !keys.is_empty() {
                        return Err(ReloadError::RestartNeeded {
                            file: path.display().to_string(),
                            keys,
                        });
                    }
                    next.runtime
                }
                // Built without a file (embedded): reload the files the running one names.
                None => current_runtime,
            };
            let schemas = crate::config::load_schemas(&runtime.schemas_dir)?;
            let tls_cfg = runtime.tls.clone();
            let snapshot = Live::build(runtime, schemas)?;
            // Last fallible step; the snapshot swap after it cannot fail.
            tls.reload_with(&tls_cfg)?;
            Ok(snapshot)
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??
    };
    let snapshot = Arc::new(snapshot);
    live.store(snapshot.clone());
    let sessions_closed = sessions.reconfigure(
        &snapshot.config.routes,
        snapshot.config.websocket.max_message_bytes,
        &snapshot.config.device_limits,
    );
    if sessions_closed > 0 {
        tracing::info!(
            sessions = sessions_closed,
            "reload: sessions whose route no longer serves them closed (4008)"
        );
    }
    Ok(Reloaded {
        device_types: snapshot.schemas.device_types().count(),
        routes: snapshot.config.routes.iter().count(),
        sessions_closed,
    })
}

/// What `drain` needs: the sessions, the draining flag handshakes read, and the shutdown
/// token it fires at the end.
#[derive(Clone)]
pub struct Drain {
    pub sessions: Arc<SessionTable>,
    pub draining: CancellationToken,
    pub shutdown: CancellationToken,
}

/// How often a drain checks whether the last session has gone.
const DRAIN_POLL: Duration = Duration::from_millis(50);

impl Drain {
    /// Starts draining: new handshakes get 503 from now on; open sessions are closed with
    /// 1001, spread evenly over `grace`; the gateway shuts down when none is left, or at the
    /// end of `grace` plus `close_timeout`. Returns how many sessions were open, or `None`
    /// when a drain is already under way.
    pub fn start(&self, grace: Duration, close_timeout: Duration) -> Option<usize> {
        if self.draining.is_cancelled() {
            return None;
        }
        self.draining.cancel();
        let handles = self.sessions.handles();
        let open = handles.len();
        tracing::info!(
            sessions = open,
            grace_ms = grace.as_millis() as u64,
            "draining: new sessions refused, open ones closed over the grace period"
        );
        let drain = self.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let n = handles.len().max(1) as u32;
            for (i, handle) in handles.into_iter().enumerate() {
                let at = start + grace.mul_f64(i as f64 / f64::from(n));
                tokio::select! {
                    _ = drain.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                handle.end(Ending::Draining);
            }
            // Sessions that were past admission when the drain began.
            for handle in drain.sessions.handles() {
                handle.end(Ending::Draining);
            }
            let deadline = start + grace + close_timeout;
            while !drain.sessions.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = drain.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DRAIN_POLL) => {}
                }
            }
            tracing::info!(left = drain.sessions.len(), "drain complete; shutting down");
            drain.shutdown.cancel();
        });
        Some(open)
    }
}
