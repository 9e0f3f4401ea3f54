//! One device connection, start to end, as the thin async shell around the core's
//! decisions: the [`handshake`] (TLS, upgrade request, admission, backend, 101), the
//! route's frame [`steps`] composed into a chain, the [`relay`] that moves frames both ways
//! through it, and the lifecycle here that ties them together and writes the one
//! `session ended` log line.

pub mod handshake;
pub mod relay;
pub mod steps;
pub mod table;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::AuditStore;
use crate::config::Config;
use crate::config::DEFAULT_REJECTION_LOG_LINES_PER_SECOND;
use crate::live::LiveHandle;
use crate::net::tls::TlsState;
use crate::policy::liveness::Liveness;
use crate::policy::rejections::{LogLimiter, RejectionStats};
use crate::storage::{DeadLetterSink, DeviceStore};
use handshake::{Outcome, Upgraded};
use steps::{SessionInfo, StepConfig, Validate};

/// Everything sessions share; built once per server.
pub struct Shared {
    /// The configuration as started: its startup part is in force; the runtime part in force
    /// is `live`'s (it changes on reload).
    pub config: Config,
    pub live: LiveHandle,
    pub tls: Arc<TlsState>,
    pub registry: Arc<dyn DeviceStore>,
    pub shutdown: CancellationToken,
    pub rejections: Arc<RejectionStats>,
    /// Limit hits per (device type, route, limit:action).
    pub limit_hits: Arc<RejectionStats>,
    pub deadletters: DeadLetterSink,
    pub audit: Option<Arc<dyn AuditStore>>,
    pub rejection_log: Arc<LogLimiter>,
    /// The last refusals of each known device (`GET /v1/devices/{id}`).
    pub recent_refusals: crate::policy::rejections::RecentRefusals,
    /// Prometheus metrics of events (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Every live session, with a handle to end it.
    pub sessions: Arc<table::SessionTable>,
    /// Session ownership across gateways (`[cluster]` only), set once at startup.
    pub ownership: std::sync::OnceLock<Arc<dyn crate::storage::SessionOwnership>>,
    /// Fires when the gateway starts draining: new handshakes get 503.
    pub draining: CancellationToken,
    /// Every backend's passive health, kept across reloads.
    pub backend_health: Arc<crate::net::backend::HealthTable>,
    /// `server.max_connections` session slots.
    pub session_slots: Arc<tokio::sync::Semaphore>,
    /// `server.max_handshakes` handshake slots, taken at accept.
    pub handshake_slots: Arc<tokio::sync::Semaphore>,
    /// Per source address budgets, checked at accept.
    pub sources: std::sync::Mutex<crate::admission::sources::SourceBudgets>,
    /// Log lines about refused connections, rate-limited across connections.
    pub refusal_log: Arc<LogLimiter>,
    /// When the process started: the accept loop's clock for the source budgets.
    pub epoch: tokio::time::Instant,
    boot_id: u64,
    next_connection: AtomicU64,
}

/// Refusals kept per device for `GET /v1/devices/{id}`: 10.
const RECENT_REFUSALS_PER_DEVICE: usize = 10;
/// Devices whose refusals are kept: 10,000 (the one refused longest ago is forgotten first).
const RECENT_REFUSALS_DEVICES: usize = 10_000;

/// The frame services sessions use.
pub struct FrameServices {
    pub rejections: Arc<RejectionStats>,
    pub deadletters: DeadLetterSink,
    pub audit: Option<Arc<dyn AuditStore>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Shared {
    pub fn new(
        config: Config,
        live: LiveHandle,
        tls: Arc<TlsState>,
        registry: Arc<dyn DeviceStore>,
        frames: FrameServices,
        shutdown: CancellationToken,
    ) -> Self {
        // The start second and 16 random bits: gateways started together (several processes
        // behind one balancer) still get different prefixes.
        let boot_id = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            << 16)
            | u64::from(fastrand::u16(..));
        let (sessions, handshakes, sources) = (
            config.max_connections.get(),
            config.max_handshakes.get(),
            config.sources,
        );
        let metrics = frames.metrics;
        for route in live.load().config.routes.iter() {
            metrics.route(&route.subprotocol);
        }
        Self {
            config,
            live,
            tls,
            registry,
            shutdown,
            rejections: frames.rejections,
            limit_hits: Arc::new(RejectionStats::default()),
            deadletters: frames.deadletters,
            audit: frames.audit,
            rejection_log: Arc::new(LogLimiter::new(DEFAULT_REJECTION_LOG_LINES_PER_SECOND)),
            recent_refusals: crate::policy::rejections::RecentRefusals::new(
                RECENT_REFUSALS_PER_DEVICE,
                RECENT_REFUSALS_DEVICES,
            ),
            metrics: metrics.clone(),
            sessions: Arc::new(table::SessionTable::default()),
            ownership: std::sync::OnceLock::new(),
            draining: CancellationToken::new(),
            backend_health: Arc::new(crate::net::backend::HealthTable::with_metrics(metrics)),
            session_slots: Arc::new(tokio::sync::Semaphore::new(sessions)),
            handshake_slots: Arc::new(tokio::sync::Semaphore::new(handshakes)),
            sources: std::sync::Mutex::new(crate::admission::sources::SourceBudgets::new(sources)),
            refusal_log: Arc::new(LogLimiter::new(DEFAULT_REJECTION_LOG_LINES_PER_SECOND)),
            epoch: tokio::time::Instant::now(),
            boot_id,
            next_connection: AtomicU64::new(1),
        }
    }

    /// What `/metrics` exports as it is now (see [`crate::metrics::State`]).
    pub fn metrics_state(&self) -> crate::metrics::State {
        let split = |stats: &RejectionStats| {
            stats
                .snapshot()
                .into_iter()
                .map(|c| (c.device_type, c.route, c.reason, c.count))
                .collect()
        };
        let mut by_status = std::collections::BTreeMap::<String, u64>::new();
        for status in ["active", "suspended", "revoked"] {
            by_status.insert(status.to_string(), 0);
        }
        for device in self.registry.list() {
            *by_status
                .entry(device.status.as_str().to_string())
                .or_default() += 1;
        }
        let live = self.live.load();
        let mut backends: Vec<&str> = live
            .config
            .routes
            .iter()
            .flat_map(|r| r.backends.iter().map(|b| b.url.as_str()))
            .collect();
        backends.sort_unstable();
        backends.dedup();
        let ejected = self.backend_health.ejected();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let tls = self.tls.current();
        let sessions_max = self.config.max_connections.get() as u64;
        let handshakes_max = self.config.max_handshakes.get() as u64;
        crate::metrics::State {
            validation_failures: split(&self.rejections),
            limit_hits: split(&self.limit_hits),
            devices: by_status.into_iter().collect(),
            backends: backends.len() as u64,
            backends_ejected: backends
                .iter()
                .filter(|b| ejected.iter().any(|e| e == *b))
                .count() as u64,
            sessions_in_use: sessions_max
                .saturating_sub(self.session_slots.available_permits() as u64),
            sessions_max,
            handshakes_in_progress: handshakes_max
                .saturating_sub(self.handshake_slots.available_permits() as u64),
            handshakes_max,
            deadletters_stored: self.deadletters.stored(),
            deadletters_dropped: self.deadletters.dropped(),
            crls: tls.crls.crl_count() as u64,
            crl_age_seconds: tls.crls.oldest_this_update().map(|t| now - t),
            crl_next_update_seconds: tls.crls.earliest_next_update().map(|t| t - now),
            draining: self.draining.is_cancelled(),
            audit_healthy: self.audit.as_ref().map(|a| a.is_healthy()),
            audit_lost: self.audit.as_ref().map_or(0, |a| a.lost()),
        }
    }

    /// Counts a connection refused for a budget (`limit` is its configuration key).
    pub fn count_refusal(&self, limit: &'static str) {
        self.limit_hits.count("-", "-", limit);
    }

    /// A connection id unique within this process and, by its boot prefix, across restarts.
    pub fn connection_id(&self) -> String {
        let n = self.next_connection.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.boot_id)
    }

    /// The frame steps' settings for a session of `device_type`, from the snapshot in force.
    fn step_config(&self, runtime: &crate::config::RuntimeConfig, device_type: &str) -> StepConfig {
        let commands = &runtime.commands;
        StepConfig {
            stats: self.rejections.clone(),
            log: self.rejection_log.clone(),
            dead_letters: self.deadletters.clone(),
            dead_letter_payload_bytes: runtime.dead_letter_payload_bytes,
            audit: self.audit.clone().map(|log| steps::AuditSettings {
                log,
                redact: Arc::from(commands.redact.clone()),
                max_payload_bytes: commands.max_payload_bytes,
            }),
            command_timeout: commands.timeout,
            limits: *runtime.device_limits.for_type(device_type),
            limit_hits: self.limit_hits.clone(),
            metrics: Some(self.metrics.clone()),
        }
    }
}

/// Handles one accepted TCP connection until it ends. `handshake` is its handshake slot,
/// given back once the handshake is over.
pub async fn handle(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: tokio::sync::OwnedSemaphorePermit,
) {
    let conn_id = shared.connection_id();
    let span = tracing::info_span!(
        "conn",
        conn.id = %conn_id,
        peer = %peer,
        trace.id = tracing::field::Empty
    );
    async move {
        let started = tokio::time::Instant::now();
        let _ = tcp.set_nodelay(true);
        // One snapshot of the runtime configuration for the whole handshake and session setup.
        let live = shared.live.load_full();
        crate::net::keepalive(&tcp, live.config.tcp_keepalive);
        // Boxed: the handshake's state (TLS accept, request parsing, backend connection) lives
        // in its own allocation, freed when it completes, instead of inline in the session's
        // future for as long as the session lasts.
        let result = Box::pin(handshake::handshake(&shared, &live, tcp, peer, &conn_id)).await;
        drop(handshake);
        let upgraded = match result {
            Ok(Outcome::Upgraded(u)) => u,
            Ok(Outcome::Refused(code)) => {
                shared.metrics.handshake(code);
                return;
            }
            Err(e) => {
                shared.metrics.handshake(e.outcome());
                tracing::info!(error = %e, "connection failed before the upgrade");
                return;
            }
        };
        shared.metrics.handshake("ok");
        let Upgraded {
            mut device_ws,
            mut backend,
            device,
            cert_sha256,
            cert_issuer,
            cert_serial,
            cert_not_after,
            route,
            backend_url,
            registration,
            taken_over,
            claim,
            handle,
            slot,
        } = *upgraded;
        let session_metrics = shared
            .metrics
            .session(&route.subprotocol, &device.device_type);
        if let Some(claim) = &claim {
            claim.upgraded(route.duplicates).await;
        }
        if !taken_over.is_empty() {
            shared
                .metrics
                .duplicates
                .get_or_create(&crate::metrics::RouteAction {
                    route: route.subprotocol.clone(),
                    action: "takeover".to_string(),
                })
                .inc_by(taken_over.len() as u64);
            tracing::info!(device.id = %device.id, route = %route.subprotocol, taken_over = ?taken_over, "takeover: this session ends the device's older sessions on the route");
        }
        // A registry change or CRL reload between admission and now is not missed: check the
        // device's record and the CRLs as they are now.
        if let Some(why) = shared
            .registry
            .get(&device.id)
            .and_then(|now| table::registry_ending(&now, &cert_sha256))
        {
            handle.end(why);
        }
        if shared.tls.current().crls.lists(&cert_issuer, &cert_serial) {
            handle.end(crate::wire::Ending::CertificateRevoked);
        }
        tracing::debug!(device.id = %device.id, route = %route.subprotocol, backend = %backend_url, "session open");
        let expires_in = cert_not_after - time::OffsetDateTime::now_utc().unix_timestamp();
        let clock = Liveness::new(
            route.timers,
            fastrand::f64(),
            Some(Duration::from_secs(expires_in.max(0) as u64)),
        );
        let info = Arc::new(SessionInfo {
            device_id: device.id.clone(),
            device_type: device.device_type.clone(),
            route,
            backend_url,
            conn_id,
        });
        let mut chain = steps::chain(
            info.clone(),
            Validate {
                live: shared.live.clone(),
                limits: live.config.limits,
            },
            shared.step_config(&live.config, &info.device_type),
        );
        let close_timeout = live.config.close_timeout;
        drop(live);
        let (end, stats) = relay::relay(
            &mut device_ws,
            &mut backend,
            &handle,
            close_timeout,
            clock,
            &mut chain,
            Some(&session_metrics),
        )
        .await;
        chain.finish(&end);
        session_metrics.ended(end.logged_code(), end.closer().as_str());
        drop(session_metrics);
        drop((registration, slot));
        tracing::info!(
            device.id = %info.device_id,
            device.r#type = %info.device_type,
            route = %info.route.subprotocol,
            backend = %info.backend_url,
            duration_ms = started.elapsed().as_millis() as u64,
            frames.up = stats.up.frames,
            bytes.up = stats.up.bytes,
            frames.down = stats.down.frames,
            bytes.down = stats.down.bytes,
            frames.rejected = chain.rejected,
            close.code = end.logged_code(),
            close.by = end.closer().as_str(),
            "session ended"
        );
    }
    .instrument(span)
    .await
}
