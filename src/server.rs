//! The server: loads TLS material and the registry before any port is bound, then runs the
//! accept loop, the CRL refresher and the admin API under one `CancellationToken` and one
//! `TaskTracker`. The accept loop only accepts: permit, spawn; everything slow happens in the
//! session task (`session`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::backend::Connector;
use crate::config::Config;
use crate::deadletter::DeadLetterStore;
use crate::registry::{Registry, RegistryError};
use crate::rejections::RejectionStats;
use crate::schema::{SchemaError, SchemaSet};
use crate::session::FrameServices;
use crate::session::{self, Shared};
use crate::tls::{TlsError, TlsState};

/// Pause after an accept error such as EMFILE, so a full file table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Audit(#[from] crate::auditlog::AuditError),
    #[error("cannot start session worker threads: {0}")]
    Workers(std::io::Error),
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A gateway with its TLS material loaded and registry open, not yet listening.
pub struct Server {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    deadletter_store: Arc<DeadLetterStore>,
    deadletter_writer: Option<BoxFuture>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Loads everything that can fail on bad files. Binds nothing.
    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Self, ServerError> {
        let tls = Arc::new(TlsState::load(&config.tls)?);
        if config.tls.crls.is_empty() {
            tracing::warn!("no tls.crl configured: certificate revocation is checked only through the registry");
        }
        let backend_tls = crate::tls::backend_client_config(&config.backend)?;
        let schemas = SchemaSet::load(&config.schemas_dir)?;
        let missing = schemas.missing_for(&config.routes);
        if !missing.is_empty() {
            // Devices of these types are refused on these routes (500 no-schema); say so now.
            for (route, device_type, file) in &missing {
                tracing::warn!(route = %route, device.r#type = %device_type, file = %file, "route allows a device type without the schema it needs: its devices will be refused");
            }
        }
        let registry = Arc::new(Registry::open(&config.registry_path)?);
        let deadletter_store = Arc::new(DeadLetterStore::open(
            registry.db(),
            config.deadletter.per_device,
        )?);
        let (deadletters, writer) =
            crate::deadletter::writer(deadletter_store.clone(), shutdown.clone());
        let connector = Connector::new(
            backend_tls,
            config.backend.connect_timeout,
            config.websocket.tungstenite(),
        );
        let audit = match &config.audit {
            None => {
                if config
                    .routes
                    .iter()
                    .any(|r| r.kind == crate::routing::RouteKind::Control)
                {
                    tracing::warn!(
                        "control routes without an [audit] section: commands are not recorded"
                    );
                }
                None
            }
            Some(a) => {
                let key = crate::auditlog::load_signing_key(&a.signing_key)?;
                let (log, _thread) = crate::auditlog::AuditLog::open(
                    crate::auditlog::WriterConfig {
                        dir: a.dir.clone(),
                        segment_bytes: a.segment_bytes,
                        checkpoint_interval: a.checkpoint_interval,
                        retention: a.retention,
                    },
                    key,
                )?;
                Some(log)
            }
        };
        let frames = FrameServices {
            audit,
            schemas: Arc::new(ArcSwap::from_pointee(schemas)),
            rejections: Arc::new(RejectionStats::default()),
            deadletters,
        };
        let shared = Arc::new(Shared::new(
            config, tls, registry, connector, frames, shutdown,
        ));
        Ok(Self {
            shared,
            tracker: TaskTracker::new(),
            deadletter_store,
            deadletter_writer: Some(Box::pin(writer)),
        })
    }

    pub fn schemas(&self) -> Arc<ArcSwap<SchemaSet>> {
        self.shared.schemas.clone()
    }

    pub fn rejections(&self) -> Arc<RejectionStats> {
        self.shared.rejections.clone()
    }

    /// The audit log handle, when `[audit]` is configured.
    pub fn audit(&self) -> Option<crate::auditlog::AuditLog> {
        self.shared.audit.clone()
    }

    pub fn deadletters(&self) -> Arc<DeadLetterStore> {
        self.deadletter_store.clone()
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    pub fn tls(&self) -> Arc<TlsState> {
        self.shared.tls.clone()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Serves devices on `listener` (and the admin API on `admin`, if given) until the
    /// shutdown token fires; then closes sessions with 1001, waits up to the grace period
    /// and flushes the registry.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<(), ServerError> {
        if let Some(writer) = self.deadletter_writer.take() {
            self.tracker.spawn(writer);
        }
        let shared = self.shared.clone();
        let shutdown = shared.shutdown.clone();
        let local = listener.local_addr().ok();
        tracing::info!(
            listen = ?local,
            devices = shared.registry.len(),
            routes = shared.config.routes.iter().count(),
            "gateway listening"
        );

        if let Some(admin) = admin {
            let admin_cfg = shared.config.admin.clone();
            if let Some(admin_cfg) = admin_cfg {
                let state = crate::admin::AdminState {
                    registry: shared.registry.clone(),
                    tls: shared.tls.clone(),
                    token: admin_cfg.token,
                    schemas: shared.schemas.clone(),
                    schemas_dir: shared.config.schemas_dir.clone(),
                    rejections: shared.rejections.clone(),
                    deadletters: self.deadletter_store.clone(),
                    audit: shared.config.audit.clone(),
                };
                let token = shutdown.clone();
                self.tracker.spawn(async move {
                    if let Err(e) = crate::admin::serve(admin, state, token).await {
                        tracing::error!(error = %e, "admin API stopped");
                    }
                });
            }
        }

        self.tracker.spawn(crl_refresher(shared.clone()));
        #[cfg(unix)]
        self.tracker.spawn(reload_on_sighup(shared.clone()));

        let workers = SessionWorkers::start(
            shared.config.workers,
            shutdown.clone(),
            self.tracker.clone(),
            shared.config.shutdown_grace + shared.config.close_timeout,
        )
        .map_err(ServerError::Workers)?;
        let permits = Arc::new(Semaphore::new(shared.config.max_connections.get()));
        loop {
            // Both waits are cancel-safe: a permit or connection not yet obtained is not lost.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let shared = shared.clone();
            // The session runs on a worker's own runtime: move the socket's registration.
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "could not hand the connection to a worker");
                    continue;
                }
            };
            workers.spawn(self.tracker.track_future(async move {
                match tokio::net::TcpStream::from_std(tcp) {
                    Ok(tcp) => session::handle(shared, tcp, peer).await,
                    Err(e) => tracing::warn!(error = %e, "could not register the connection"),
                }
                drop(permit);
            }));
        }

        drop(listener);
        let open = self.tracker.len();
        tracing::info!(
            tasks = open,
            "shutting down: listener closed, sessions closing with 1001"
        );
        self.tracker.close();
        let grace = shared.config.shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                still_running = self.tracker.len(),
                grace_ms = grace.as_millis() as u64,
                "shutdown grace period over; remaining sessions dropped"
            );
        }
        if let Some(audit) = &shared.audit {
            if !audit.sync().await {
                tracing::error!("audit log: not everything could be written before shutdown");
            }
        }
        let registry = shared.registry.clone();
        match tokio::task::spawn_blocking(move || registry.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "registry flush at shutdown failed"),
            Err(e) => tracing::error!(error = %e, "registry flush task failed"),
        }
        tracing::info!("gateway stopped");
        Ok(())
    }

    /// Reloads TLS material (certificates, CA bundle, CRLs) now. The old set stays on error.
    pub async fn reload(tls: Arc<TlsState>) -> Result<(), TlsError> {
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(r) => r,
            Err(e) => Err(TlsError::Verifier(format!("reload task failed: {e}"))),
        }
    }
}

impl Server {
    /// Loads the schema directory again and swaps it in as a whole; on any error the previous
    /// set stays in force. Returns the number of device types loaded.
    pub async fn reload_schemas(
        schemas: Arc<ArcSwap<SchemaSet>>,
        dir: std::path::PathBuf,
    ) -> Result<usize, SchemaError> {
        let loaded = tokio::task::spawn_blocking(move || SchemaSet::load(&dir))
            .await
            .map_err(|e| SchemaError::Dir {
                path: Default::default(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let n = loaded.device_types().count();
        schemas.store(Arc::new(loaded));
        Ok(n)
    }
}

/// Checks the TLS files for changes every `tls.crl_refresh`, and warns about stale CRLs.
async fn crl_refresher(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.tls.crl_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancel-safe: an interval tick is not consumed until it is returned.
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let tls = shared.tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
            Ok(Ok(true)) => tracing::info!("TLS material changed on disk; reloaded"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "TLS reload failed; the previous certificates and CRLs stay in force")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
        shared
            .tls
            .warn_if_stale(time::OffsetDateTime::now_utc().unix_timestamp());
    }
}

/// Session worker threads, each running a single-threaded runtime, like nginx's worker
/// processes: a session's TLS, parsing, validation and relaying all happen on one thread, with
/// no cross-thread wake-ups per frame (measured: about 20% less CPU per frame than tokio's
/// work-stealing scheduler for the same fleet, docs/benchmarks.md). Sessions are handed out
/// round-robin. The accept loop, admin API and storage stay on the main runtime.
struct SessionWorkers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl SessionWorkers {
    /// Starts `n` threads. Each runs until `shutdown`, then until the tracker is empty or
    /// `linger` has passed; tasks still running then are dropped with the runtime.
    fn start(
        n: std::num::NonZeroUsize,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        linger: std::time::Duration,
    ) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n.get());
        for i in 0..n.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let shutdown = shutdown.clone();
            let tracker = tracker.clone();
            std::thread::Builder::new()
                .name(format!("gatehouse-session-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        shutdown.cancelled().await;
                        let _ = tokio::time::timeout(linger, tracker.wait()).await;
                    });
                })?;
        }
        Ok(Self {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.handles.len();
        drop(self.handles[i].spawn(future));
    }
}

/// Reloads TLS material (certificates, CA bundle, CRLs) on SIGHUP.
#[cfg(unix)]
async fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the admin API");
            return;
        }
    };
    loop {
        tokio::select! {
            // Cancel-safe: `recv` loses no signal when dropped.
            _ = shared.shutdown.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        match Server::reload(shared.tls.clone()).await {
            Ok(()) => tracing::info!("SIGHUP: TLS material reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: reload failed; the previous certificates and CRLs stay in force")
            }
        }
    }
}

/// Binds the listeners named in `config` and serves until `shutdown`. The binary's path.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = config.listen;
    let admin_addr: Option<SocketAddr> = config.admin.as_ref().map(|a| a.listen);
    let server = Server::new(config, shutdown)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let admin = match admin_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on admin address {addr}: {e}"))?,
        ),
        None => None,
    };
    server.serve(listener, admin).await?;
    Ok(())
}
