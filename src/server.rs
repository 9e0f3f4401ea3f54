//! The server: loads TLS material, schemas, storage and the audit log before any port is
//! bound, then runs the accept loop, the CRL refresher, SIGHUP reloads and the admin API
//! under one `CancellationToken` and one `TaskTracker`. The accept loop only accepts: permit,
//! spawn on a session worker; everything slow happens in the session (`session`).
//!
//! Shutdown, in order: stop accepting; sessions close with 1001 (bounded by
//! `server.close_timeout`); wait up to `server.shutdown_grace` for them; stop the session
//! workers (sessions still running are dropped, recording what they must) and join their
//! threads; close the audit log (final sync and checkpoints) and join its writer thread;
//! flush the registry.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::live::{Live, LiveHandle};
use crate::net::tls::{TlsError, TlsState};
use crate::net::workers::SessionWorkers;
use crate::policy::rejections::RejectionStats;
use crate::schema::SchemaError;
use crate::session::{self, FrameServices, Shared};
use crate::storage::{DeadLetterStore, DeviceStore, Embedded, RegistryError};

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
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot start session worker threads: {0}")]
    Workers(std::io::Error),
    #[error("admin listener TLS: {0}")]
    AdminTls(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A gateway with its TLS material loaded and storage open, not yet listening.
pub struct Server {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    deadletter_store: Arc<dyn DeadLetterStore>,
    deadletter_writer: Option<BoxFuture>,
    /// The embedded audit log (its fault injection is for tests and drills).
    audit_log: Option<AuditLog>,
    audit_thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Loads everything that can fail on bad files. Binds nothing.
    pub async fn new(config: Config, shutdown: CancellationToken) -> Result<Self, ServerError> {
        let runtime = &config.runtime;
        let tls = Arc::new(TlsState::load(&runtime.tls)?);
        if runtime.tls.crls.is_empty() {
            tracing::warn!("no tls.crl configured: certificate revocation is checked only through the registry");
        }
        let schemas = crate::config::load_schemas(&runtime.schemas_dir)?;
        for (route, device_type, file) in &runtime.routes.missing_schemas(&schemas) {
            // Devices of these types are refused on these routes (500 no-schema); say so now.
            tracing::warn!(route = %route, device.r#type = %device_type, file = %file, "route allows a device type without the schema it needs: its devices will be refused");
        }
        let mut cluster = None;
        let (registry, deadletter_store): (Arc<dyn DeviceStore>, Arc<dyn DeadLetterStore>) =
            match &config.stores {
                crate::config::Stores::Embedded { registry_path } => {
                    let storage = Embedded::open(registry_path, config.deadletter.per_device)?;
                    (storage.devices, storage.dead_letters)
                }
                crate::config::Stores::Cluster(c) => {
                    let connected = crate::cluster::Cluster::connect(c).await?;
                    let cluster = cluster.insert(connected);
                    tracing::info!(servers = ?c.servers, cluster.name = %c.name, replicas = c.replicas, "cluster stores on NATS JetStream");
                    (
                        Arc::new(
                            crate::cluster::NatsRegistry::open(cluster, shutdown.clone()).await?,
                        ),
                        Arc::new(
                            crate::cluster::NatsDeadLetters::open(
                                cluster,
                                config.deadletter.per_device,
                            )
                            .await?,
                        ),
                    )
                }
            };
        let (deadletters, writer) =
            crate::storage::deadletter::writer(deadletter_store.clone(), shutdown.clone());
        let live: LiveHandle = Arc::new(ArcSwap::from_pointee(Live::build(
            config.runtime.clone(),
            schemas,
        )?));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let mut cluster_audit = None;
        let (audit, audit_thread) = match (&config.audit, &cluster) {
            (None, _) => {
                if config
                    .runtime
                    .routes
                    .iter()
                    .any(|r| r.kind == crate::admission::routing::RouteKind::Control)
                {
                    tracing::warn!(
                        "control routes without an [audit] section: commands are not recorded"
                    );
                }
                (None, None)
            }
            (Some(a), Some(cluster)) => {
                let key = crate::audit::load_signing_key(&a.signing_key)?;
                let store = crate::cluster::NatsAudit::open(
                    cluster,
                    key,
                    a.checkpoint_interval,
                    Some(metrics.clone()),
                )
                .await?;
                cluster_audit = Some(Arc::new(store) as Arc<dyn crate::audit::AuditStore>);
                (None, None)
            }
            (Some(a), None) => {
                let key = crate::audit::load_signing_key(&a.signing_key)?;
                let (log, thread) = AuditLog::open(
                    crate::audit::WriterConfig {
                        dir: a.dir.clone(),
                        segment_bytes: a.segment_bytes,
                        checkpoint_interval: a.checkpoint_interval,
                        retention: a.retention,
                        metrics: Some(metrics.clone()),
                    },
                    key,
                )?;
                (Some(log), Some(thread))
            }
        };
        let audit_log = audit.clone();
        let frames = FrameServices {
            audit: audit
                .map(|log| Arc::new(log) as Arc<dyn crate::audit::AuditStore>)
                .or(cluster_audit),
            rejections: Arc::new(RejectionStats::default()),
            deadletters,
            metrics,
        };
        let shared = Arc::new(Shared::new(
            config,
            live,
            tls,
            registry,
            frames,
            shutdown.clone(),
        ));
        if let Some(cluster) = &cluster {
            crate::cluster::crls::follow(cluster, shared.tls.clone(), shutdown.clone()).await?;
            let sessions = shared.sessions.clone();
            let end: crate::storage::EndSession =
                Arc::new(move |device: &str, connection: &str, why| {
                    sessions.end_connection(device, connection, why)
                });
            let ownership = crate::cluster::Ownership::open(cluster, end, shutdown).await?;
            let _ = shared
                .ownership
                .set(Arc::new(ownership) as Arc<dyn crate::storage::SessionOwnership>);
        }
        Ok(Self {
            shared,
            tracker: TaskTracker::new(),
            deadletter_store,
            deadletter_writer: Some(Box::pin(writer)),
            audit_log,
            audit_thread,
        })
    }

    /// The runtime snapshot in force, swapped on reload.
    pub fn live(&self) -> LiveHandle {
        self.shared.live.clone()
    }

    pub fn rejections(&self) -> Arc<RejectionStats> {
        self.shared.rejections.clone()
    }

    /// The audit log handle, when `[audit]` is configured.
    pub fn audit(&self) -> Option<AuditLog> {
        self.audit_log.clone()
    }

    pub fn deadletters(&self) -> Arc<dyn DeadLetterStore> {
        self.deadletter_store.clone()
    }

    pub fn registry(&self) -> Arc<dyn DeviceStore> {
        self.shared.registry.clone()
    }

    pub fn tls(&self) -> Arc<TlsState> {
        self.shared.tls.clone()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Serves devices on `listener` (and the admin API on `admin`, if given) until the
    /// shutdown token fires, then shuts down in the order the module documents.
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

        if let (Some(admin), Some(admin_cfg)) = (admin, shared.config.admin.clone()) {
            let state = crate::admin::AdminState {
                registry: shared.registry.clone(),
                tls: shared.tls.clone(),
                token: admin_cfg.token,
                live: shared.live.clone(),
                started: Arc::new(shared.config.clone()),
                rejections: shared.rejections.clone(),
                limit_hits: shared.limit_hits.clone(),
                sessions: shared.sessions.clone(),
                drain: crate::control::Drain {
                    sessions: shared.sessions.clone(),
                    draining: shared.draining.clone(),
                    shutdown: shutdown.clone(),
                },
                deadletters: self.deadletter_store.clone(),
                audit: shared.config.audit.clone(),
                gateway: shared.clone(),
                admin_clients: admin_cfg
                    .tls
                    .as_ref()
                    .map(|t| t.clients.clone())
                    .unwrap_or_default()
                    .into(),
            };
            let admin_tls = match &admin_cfg.tls {
                Some(t) => Some(
                    crate::admin::listener::server_config(t)
                        .map_err(|e| ServerError::AdminTls(e.to_string()))?,
                ),
                None => None,
            };
            let token = shutdown.clone();
            self.tracker.spawn(async move {
                if let Err(e) = crate::admin::serve(admin, state, admin_tls, token).await {
                    tracing::error!(error = %e, "admin API stopped");
                }
            });
        }

        self.tracker.spawn(crl_refresher(shared.clone()));
        // Subscribed before the first accept, so no registry change can be missed.
        self.tracker.spawn(end_sessions_on_registry_changes(
            shared.clone(),
            shared.registry.subscribe(),
        ));
        self.tracker.spawn(end_sessions_on_crl_reloads(
            shared.clone(),
            shared.tls.subscribe(),
        ));
        if let Some(every) = shared.live.load().config.backend.health_check_interval {
            self.tracker.spawn(check_backends(shared.clone(), every));
        }
        // Installed before the gateway says it listens, so a SIGHUP after that line reloads.
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => {
                self.tracker.spawn(reload_on_sighup(shared.clone(), hup));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the admin API")
            }
        }

        let workers = SessionWorkers::start(shared.config.workers).map_err(ServerError::Workers)?;
        tracing::info!(
            listen = %listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            devices = shared.registry.len(),
            routes = shared.live.load().config.routes.iter().count(),
            "gateway listening"
        );

        loop {
            // Cancel-safe: a connection not yet accepted is not lost.
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
            // Budgets checked before any TLS work; beyond one, the connection is closed at
            // once rather than left waiting. A balancer's connection names its device in a
            // PROXY header first: that device's address is the one its budgets and logs see.
            let Ok(handshake) = shared.handshake_slots.clone().try_acquire_owned() else {
                refused_at_accept(&shared, peer.ip(), "max_handshakes");
                drop(tcp);
                continue;
            };
            let proxied = shared
                .config
                .proxy_from
                .iter()
                .any(|r| r.contains(peer.ip()));
            let source = if proxied {
                None
            } else {
                match admit_source(&shared, peer.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        drop(tcp);
                        continue;
                    }
                }
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
                let mut tcp = match tokio::net::TcpStream::from_std(tcp) {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not register the connection");
                        return;
                    }
                };
                let (peer, source) = if proxied {
                    let timeout = shared.live.load().config.handshake_timeout;
                    let device = match read_proxy_header(&mut tcp, timeout).await {
                        Ok(Some(device)) => device,
                        Ok(None) => peer,
                        Err(e) => {
                            tracing::info!(balancer = %peer, error = %e, "connection from a PROXY protocol balancer closed");
                            return;
                        }
                    };
                    match admit_source(&shared, device.ip()) {
                        Some(slot) => (device, Some(slot)),
                        None => return,
                    }
                } else {
                    (peer, source)
                };
                session::handle(shared, tcp, peer, handshake).await;
                drop(source);
            }));
        }

        drop(listener);
        tracing::info!(
            tasks = self.tracker.len(),
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
        // After this no session code runs: what sessions recorded is queued.
        if let Err(e) = tokio::task::spawn_blocking(move || workers.stop()).await {
            tracing::error!(error = %e, "stopping the session workers failed");
        }
        if let Some(audit) = &shared.audit {
            if !audit.close().await {
                tracing::error!("audit log: not everything could be written before shutdown");
            }
            if let Some(thread) = self.audit_thread.take() {
                match tokio::task::spawn_blocking(move || thread.join()).await {
                    Ok(Ok(())) => {}
                    _ => tracing::error!("audit writer thread did not end cleanly"),
                }
            }
            let lost = audit.lost();
            if lost > 0 {
                tracing::error!(records = lost, "audit log: records were lost");
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
}

/// A connection's place in its source address's budget, given back when it ends.
struct SourceSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.shared
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.ip);
    }
}

/// Counts and logs (at a bounded rate) a connection closed at accept.
fn refused_at_accept(shared: &Shared, ip: std::net::IpAddr, limit: &'static str) {
    shared.count_refusal(limit);
    shared
        .metrics
        .closed_at_accept
        .get_or_create(&crate::metrics::Limit {
            limit: limit.to_string(),
        })
        .inc();
    if let crate::policy::rejections::LogDecision::Log { suppressed_before } =
        shared.refusal_log.check(crate::session::steps::now())
    {
        tracing::warn!(peer.ip = %ip, limit, suppressed_before, "connection closed at accept: budget spent");
    }
}

/// The source's budgets for a new connection from `ip`; `None` (counted and logged) when
/// one is spent.
fn admit_source(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<SourceSlot> {
    let at = shared.epoch.elapsed();
    let admitted = shared
        .sources
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .admit(ip, at);
    match admitted {
        Ok(()) => Some(SourceSlot {
            shared: shared.clone(),
            ip,
        }),
        Err(why) => {
            refused_at_accept(shared, ip, why.as_str());
            None
        }
    }
}

/// Reads the PROXY protocol v2 header a balancer sends first; the device's own address
/// (`None` for the balancer's LOCAL health checks). Bounded by the handshake timeout.
async fn read_proxy_header(
    tcp: &mut tokio::net::TcpStream,
    timeout: std::time::Duration,
) -> Result<Option<SocketAddr>, String> {
    use crate::admission::proxy;
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = [0u8; proxy::FIXED_LEN];
        tcp.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        let fixed = proxy::parse_fixed(&head).map_err(|e| e.to_string())?;
        let mut block = vec![0u8; fixed.block_len];
        tcp.read_exact(&mut block)
            .await
            .map_err(|e| e.to_string())?;
        proxy::source(&fixed, &block).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("no PROXY header within {} ms", timeout.as_millis()))?
}

/// Ends live sessions that a registry change makes inadmissible (suspended, revoked, a
/// certificate removed). The change feed is also what a replicated registry feeds, so a
/// change made on another gateway reaches this one's sessions the same way.
async fn end_sessions_on_registry_changes(
    shared: Arc<Shared>,
    mut feed: tokio::sync::broadcast::Receiver<crate::model::DeviceChange>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let change = tokio::select! {
            // Cancel-safe: `recv` loses no message when dropped.
            _ = shared.shutdown.cancelled() => return,
            c = feed.recv() => c,
        };
        match change {
            Ok(change) => {
                let ended = shared.sessions.apply(&change);
                if ended > 0 {
                    tracing::info!(
                        device.id = %change.device.id,
                        status = change.device.status.as_str(),
                        sessions = ended,
                        "registry change: live sessions ended"
                    );
                }
            }
            Err(RecvError::Lagged(missed)) => {
                // Too many changes at once: check every live session against the registry.
                tracing::warn!(
                    missed,
                    "registry change feed lagged; re-checking every live session"
                );
                for session in shared.sessions.list(&Default::default()) {
                    if let Some(device) = shared.registry.get(&session.device) {
                        shared.sessions.apply(&crate::model::DeviceChange {
                            device,
                            removed_fingerprints: Vec::new(),
                        });
                    }
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Ends live sessions whose certificate a reloaded CRL lists, whichever way the reload came
/// (SIGHUP, admin API, the file refresher, a configuration reload).
async fn end_sessions_on_crl_reloads(
    shared: Arc<Shared>,
    mut reloads: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        tokio::select! {
            // Cancel-safe: `changed` loses no change when dropped.
            _ = shared.shutdown.cancelled() => return,
            r = reloads.changed() => if r.is_err() { return },
        }
        let crls = shared.tls.current();
        let ended = shared.sessions.apply_crls(&crls.crls);
        if ended > 0 {
            tracing::info!(
                sessions = ended,
                "CRL reload: live sessions on revoked certificates ended (4004)"
            );
        }
    }
}

/// The optional active backend check: every `every`, a TCP connect to each backend of the
/// routes in force (within the connect timeout) feeds the same passive-health table, so an
/// ejected backend that is back returns before a device has to try it.
async fn check_backends(shared: Arc<Shared>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancel-safe: an interval tick is not consumed until it is returned.
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let live = shared.live.load_full();
        let backend = &live.config.backend;
        let mut seen = std::collections::HashSet::new();
        for route in live.config.routes.iter() {
            for b in &route.backends {
                if !seen.insert(b.url.clone()) {
                    continue;
                }
                let ok = matches!(
                    tokio::time::timeout(
                        backend.connect_timeout,
                        tokio::net::TcpStream::connect((b.host.as_str(), b.port)),
                    )
                    .await,
                    Ok(Ok(_))
                );
                shared.backend_health.record(&b.url, ok, &backend.health);
            }
        }
    }
}

/// Checks the TLS files for changes every `tls.crl_refresh`, and warns about stale CRLs.
async fn crl_refresher(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.runtime.tls.crl_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancel-safe: an interval tick is not consumed until it is returned.
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let tls = shared.tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
            Ok(Ok(true)) => {
                shared.metrics.reload("tls", true);
                tracing::info!("TLS material changed on disk; reloaded")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                shared.metrics.reload("tls", false);
                tracing::error!(error = %e, "TLS reload failed; the previous certificates and CRLs stay in force")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
        shared
            .tls
            .warn_if_stale(time::OffsetDateTime::now_utc().unix_timestamp());
    }
}

/// Reloads TLS material (certificates, CA bundle, CRLs) and the schemas on SIGHUP.
#[cfg(unix)]
async fn reload_on_sighup(shared: Arc<Shared>, mut hup: tokio::signal::unix::Signal) {
    loop {
        tokio::select! {
            // Cancel-safe: `recv` loses no signal when dropped.
            _ = shared.shutdown.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        match crate::control::reload_config(
            &shared.config,
            &shared.live,
            &shared.tls,
            &shared.sessions,
        )
        .await
        {
            Ok(r) => {
                shared.metrics.reload("config", true);
                tracing::info!(
                    routes = r.routes,
                    device_types = r.device_types,
                    sessions_closed = r.sessions_closed,
                    "SIGHUP: configuration, TLS material and schemas reloaded"
                );
            }
            Err(e) => {
                shared.metrics.reload("config", false);
                tracing::error!(error = %e, "SIGHUP: reload failed; the previous configuration, TLS material and schemas stay in force")
            }
        }
    }
}

/// The device listener, with SO_REUSEPORT when `reuse_port` (several gateway processes on one
/// port; each accepts its share).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Binds the listeners named in `config` and serves until `shutdown`. The binary's path.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = config.listen;
    let admin_addr: Option<SocketAddr> = config.admin.as_ref().map(|a| a.listen);
    let reuse_port = config.reuse_port;
    let server = Server::new(config, shutdown).await?;
    let listener =
        bind(listen, reuse_port).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
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
