//! The loopback admin API (axum, bearer token); its blocking client for the CLI is
//! [`client`]. While the gateway runs it holds the registry, so `gatehouse devices ...` in
//! another process goes through here; a change takes effect for the next handshake. Owns
//! the HTTP mapping of storage errors; the registry rules live in `storage`, the operator
//! actions in `control`.

pub mod client;
pub mod listener;

pub use client::{AdminClient, Call, ClientError, Method};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminToken;
use crate::model::{Device, DeviceStatus, Enrollment};
use crate::net::tls::TlsState;
use crate::policy::rejections::{RejectionCount, RejectionStats};
use crate::session::table::{Filter, LiveSession};
use crate::storage::{DeadLetter, DeadLetterStore, DeviceStore, RegistryError};

/// Time the CLI waits for the admin API before it gives up: 10 s.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<dyn DeviceStore>,
    pub tls: Arc<TlsState>,
    pub token: AdminToken,
    pub live: crate::live::LiveHandle,
    /// The configuration as started (what a configuration reload compares with).
    pub started: Arc<crate::config::Config>,
    pub rejections: Arc<RejectionStats>,
    /// Limit hits per (device type, route, limit:action).
    pub limit_hits: Arc<RejectionStats>,
    pub sessions: Arc<crate::session::table::SessionTable>,
    /// Draining: the flag handshakes read and how to start it.
    pub drain: crate::control::Drain,
    pub deadletters: Arc<dyn DeadLetterStore>,
    /// `[audit]`: the directory and the public key file, when configured.
    pub audit: Option<crate::config::AuditConfig>,
    /// The gateway's shared state: what `/metrics` reads.
    pub gateway: Arc<crate::session::Shared>,
    /// Admin certificate names let in without the token (`[admin] clients`).
    pub admin_clients: Arc<[String]>,
}

/// Body of `POST /v1/devices`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub devices: Vec<Enrollment>,
}

/// Every error the admin API answers, whatever produced it (a handler, a malformed body, an
/// unknown path, a wrong method): `{"code": "not-found", "error": "unknown device x"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, from the status: `bad-request`, `unauthorized`, `forbidden`, `not-found`,
    /// `method-not-allowed`, `conflict`, `payload-too-large`, `unsupported-media-type`,
    /// `unprocessable`, `internal`, `unavailable`.
    pub code: String,
    /// What went wrong, for a person.
    pub error: String,
}

/// The stable `code` of an error status.
pub fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        409 => "conflict",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        422 => "unprocessable",
        503 => "unavailable",
        _ => "internal",
    }
}

/// Gives every error response the one JSON shape: handlers already answer [`ErrorBody`];
/// axum's own refusals (a body that is not JSON, an unknown path, a wrong method) come as
/// plain text and are rewritten here.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    (
        status,
        Json(ErrorBody {
            code: error_code(status).to_string(),
            error,
        }),
    )
        .into_response()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub devices: usize,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ErrorBody {
                code: error_code(self.0).to_string(),
                error: self.1,
            }),
        )
            .into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::UnknownDevice(_) => StatusCode::NOT_FOUND,
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::TypeMismatch { .. }
            | RegistryError::FingerprintInUse { .. }
            | RegistryError::RevokedIsFinal(_) => StatusCode::CONFLICT,
            RegistryError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "admin API: registry failure");
        }
        ApiError(status, e.to_string())
    }
}

/// The one place requests are let in: every endpoint but the probes and `/metrics` (counts
/// only, no device ids, on a loopback listener, as exporters usually are) needs the bearer token
/// or, on an HTTPS admin listener, an admin certificate whose name `[admin] clients` lists.
/// A device certificate is never an admin credential.
async fn authenticate(
    State(s): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<listener::AdminPeer>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|t| s.token.matches(t)) {
        return next.run(request).await;
    }
    use crate::admission::identity::AdminIdentity;
    match &peer.identity {
        Some(AdminIdentity::Admin(name)) if s.admin_clients.iter().any(|c| c == name) => {
            next.run(request).await
        }
        Some(AdminIdentity::Admin(name)) => ApiError(
            StatusCode::FORBIDDEN,
            format!("admin certificate {name:?} is not in admin.clients"),
        )
        .into_response(),
        Some(AdminIdentity::Device) => ApiError(
            StatusCode::FORBIDDEN,
            "a device certificate is not an admin credential".into(),
        )
        .into_response(),
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (admin.token_file), and no admin certificate".into(),
        )
        .into_response(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )),
    }
}

async fn health(State(s): State<AdminState>) -> Result<Json<Health>, ApiError> {
    Ok(Json(Health {
        status: "ok".into(),
        devices: s.registry.len(),
    }))
}

/// `GET /v1/devices?type=&status=&label=key=value&after=&limit=`: one page, by id.
async fn list(
    State(s): State<AdminState>,
    axum::extract::Query(query): axum::extract::Query<crate::model::DeviceQuery>,
) -> Result<Json<crate::model::DevicePage>, ApiError> {
    let all = s.registry.list();
    query
        .page(all.iter().map(|d| &**d))
        .map(Json)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

/// A device with its live sessions (`GET /v1/devices/{id}`).
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub sessions: Vec<LiveSession>,
    /// Its last refusals (at most 10), oldest first: why it cannot connect.
    #[serde(default)]
    pub recent_refusals: Vec<crate::policy::rejections::RecentRefusal>,
}

async fn show(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let device = s
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::from(RegistryError::UnknownDevice(id.clone())))?;
    Ok(Json(DeviceView {
        device: (*device).clone(),
        sessions: s.sessions.list(&Filter::device(&id)),
        recent_refusals: s.gateway.recent_refusals.of(&id),
    }))
}

async fn remove_certificate(
    State(s): State<AdminState>,
    Path((id, sha256)): Path<(String, String)>,
) -> Result<Json<Device>, ApiError> {
    let registry = s.registry.clone();
    let device = blocking(move || registry.remove_certificate(&id, &sha256)).await?;
    tracing::info!(device.id = %device.id, "admin: certificate removed from device");
    Ok(Json(device))
}

/// Body of `POST /v1/devices/{id}/kick`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickRequest {
    /// Sent to the device and the backend in the close frame (truncated to fit).
    #[serde(default)]
    pub reason: String,
    /// Only this connection of the device; all of them when absent.
    pub connection: Option<String>,
}

/// How many sessions an action ended.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ended {
    pub sessions: usize,
}

async fn kick(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    body: Option<Json<KickRequest>>,
) -> Result<Json<Ended>, ApiError> {
    if s.registry.get(&id).is_none() {
        return Err(ApiError::from(RegistryError::UnknownDevice(id)));
    }
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let n = s
        .sessions
        .kick(&id, body.connection.as_deref(), &body.reason);
    tracing::info!(device.id = %id, sessions = n, reason = %body.reason, "admin: device's sessions kicked");
    Ok(Json(Ended { sessions: n }))
}

/// Body of `POST /v1/drain`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Time to spread the closes over; `server.drain_grace_ms` when absent.
    pub grace_ms: Option<u64>,
}

/// Answer of `POST /v1/drain`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainReport {
    pub status: String,
    pub sessions: usize,
    pub grace_ms: u64,
}

async fn drain(
    State(s): State<AdminState>,
    body: Option<Json<DrainRequest>>,
) -> Result<Json<DrainReport>, ApiError> {
    let runtime = &s.live.load().config;
    let grace = body
        .and_then(|Json(b)| b.grace_ms)
        .map(Duration::from_millis)
        .unwrap_or(runtime.drain_grace);
    match s.drain.start(grace, runtime.close_timeout) {
        Some(n) => Ok(Json(DrainReport {
            status: "draining".into(),
            sessions: n,
            grace_ms: grace.as_millis() as u64,
        })),
        None => Err(ApiError(
            StatusCode::CONFLICT,
            "the gateway is already draining".into(),
        )),
    }
}

/// `GET /healthz`: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: listeners bound and stores open (the admin API only starts then), and not
/// draining: a load balancer should send new devices here.
/// With a cluster, NATS unreachable is reported: still ready while the cached registry is
/// within `cluster.max_staleness_ms`, not ready past it (handshakes are refused then).
async fn readyz(State(s): State<AdminState>) -> Response {
    if s.drain.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let cluster = s.gateway.config.stores.cluster();
    match (s.registry.stale_for(), cluster) {
        (Some(stale), Some(c)) if stale > c.max_staleness => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "registry stale: NATS unreachable for {} s (cluster.max_staleness_ms = {})\n",
                stale.as_secs(),
                c.max_staleness.as_millis()
            ),
        )
            .into_response(),
        (Some(stale), Some(_)) => (
            StatusCode::OK,
            format!(
                "ready (NATS unreachable for {} s: serving from the cached registry)\n",
                stale.as_secs()
            ),
        )
            .into_response(),
        _ => (StatusCode::OK, "ready\n").into_response(),
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics text); no token needed (a token is accepted).
async fn metrics(State(s): State<AdminState>) -> Result<Response, ApiError> {
    let text = s
        .gateway
        .metrics
        .render(&s.gateway.metrics_state().registry());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn enroll(
    State(s): State<AdminState>,
    Json(body): Json<EnrollRequest>,
) -> Result<Json<Vec<Device>>, ApiError> {
    let registry = s.registry.clone();
    let devices = blocking(move || registry.enroll_many(body.devices)).await?;
    tracing::info!(count = devices.len(), "admin: devices enrolled");
    Ok(Json(devices))
}

async fn set_status(
    s: AdminState,
    id: String,
    status: DeviceStatus,
) -> Result<Json<Device>, ApiError> {
    let registry = s.registry.clone();
    let device = blocking(move || registry.set_status(&id, status)).await?;
    tracing::info!(device.id = %device.id, status = status.as_str(), "admin: device status changed");
    Ok(Json(device))
}

async fn suspend(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    set_status(s, id, DeviceStatus::Suspended).await
}

async fn resume(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    set_status(s, id, DeviceStatus::Active).await
}

async fn revoke(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Device>, ApiError> {
    set_status(s, id, DeviceStatus::Revoked).await
}

async fn reload_tls(State(s): State<AdminState>) -> Result<Json<Health>, ApiError> {
    let reloaded = crate::control::reload_tls(s.tls.clone()).await;
    s.gateway.metrics.reload("tls", reloaded.is_ok());
    reloaded.map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, previous TLS material kept: {e}"),
        )
    })?;
    tracing::info!("admin: TLS material reloaded");
    Ok(Json(Health {
        status: "reloaded".into(),
        devices: s.registry.len(),
    }))
}

async fn reload_schemas(State(s): State<AdminState>) -> Result<Json<Health>, ApiError> {
    let reloaded = crate::control::reload_schemas(s.live.clone()).await;
    s.gateway.metrics.reload("schemas", reloaded.is_ok());
    let n = reloaded.map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, previous schemas kept: {e}"),
        )
    })?;
    tracing::info!(device_types = n, "admin: schemas reloaded");
    Ok(Json(Health {
        status: "reloaded".into(),
        devices: s.registry.len(),
    }))
}

/// Answer of `POST /v1/reload`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadReport {
    pub status: String,
    pub routes: usize,
    pub device_types: usize,
    /// Open sessions closed because their route no longer serves them.
    pub sessions_closed: usize,
}

async fn reload_config(State(s): State<AdminState>) -> Result<Json<ReloadReport>, ApiError> {
    let reloaded = crate::control::reload_config(&s.started, &s.live, &s.tls, &s.sessions).await;
    s.gateway.metrics.reload("config", reloaded.is_ok());
    let r = reloaded.map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, previous configuration kept: {e}"),
        )
    })?;
    tracing::info!(
        routes = r.routes,
        device_types = r.device_types,
        "admin: configuration reloaded"
    );
    Ok(Json(ReloadReport {
        status: "reloaded".into(),
        routes: r.routes,
        device_types: r.device_types,
        sessions_closed: r.sessions_closed,
    }))
}

async fn sessions(
    State(s): State<AdminState>,
    axum::extract::Query(filter): axum::extract::Query<Filter>,
) -> Result<Json<Vec<LiveSession>>, ApiError> {
    Ok(Json(s.sessions.list(&filter)))
}

async fn rejections(State(s): State<AdminState>) -> Result<Json<Vec<RejectionCount>>, ApiError> {
    Ok(Json(s.rejections.snapshot()))
}

async fn limit_hits(State(s): State<AdminState>) -> Result<Json<Vec<RejectionCount>>, ApiError> {
    Ok(Json(s.limit_hits.snapshot()))
}

async fn deadletters(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    if s.registry.get(&id).is_none() {
        return Err(ApiError::from(RegistryError::UnknownDevice(id)));
    }
    let store = s.deadletters.clone();
    Ok(Json(blocking(move || store.list(&id)).await?))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    since_ms: Option<i64>,
    command: Option<String>,
}

/// A device id in an audit path: the same rule as enrollment, so a path can never name
/// something else.
fn audit_device(id: &str) -> Result<(), ApiError> {
    gatehouse_pki::validate_device_id(id)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

fn audit_cfg(s: &AdminState) -> Result<crate::config::AuditConfig, ApiError> {
    s.audit.clone().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no [audit] section is configured".into(),
        )
    })
}

async fn audit_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::audit::AuditError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )),
    }
}

/// The audit store the gateway writes (segment files or the cluster's streams).
fn audit_store(s: &AdminState) -> Result<Arc<dyn crate::audit::AuditStore>, ApiError> {
    audit_cfg(s)?;
    s.gateway.audit.clone().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "no [audit] section is configured".into(),
        )
    })
}

fn audit_error(e: crate::audit::AuditError) -> ApiError {
    let status = match e {
        crate::audit::AuditError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

async fn audit_show(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Result<Json<Vec<crate::audit::Record>>, ApiError> {
    audit_device(&id)?;
    let export = audit_store(&s)?.export(&id).await.map_err(audit_error)?;
    Ok(Json(
        export
            .records
            .into_iter()
            .filter(|r| q.since_ms.is_none_or(|t| r.time_ms >= t))
            .filter(|r| q.command.as_deref().is_none_or(|want| r.is_about(want)))
            .collect(),
    ))
}

async fn audit_export(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<crate::audit::Export>, ApiError> {
    audit_device(&id)?;
    Ok(Json(
        audit_store(&s)?.export(&id).await.map_err(audit_error)?,
    ))
}

/// One line per device: `ok` with counts, or the first failure.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuditVerdict {
    pub device: String,
    pub ok: bool,
    pub records: u64,
    pub checkpointed_to: Option<u64>,
    pub failed_seq: Option<u64>,
    pub reason: Option<String>,
}

async fn audit_verify(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Result<Json<Vec<AuditVerdict>>, ApiError> {
    let cfg = audit_cfg(&s)?;
    let key_path = cfg.public_key.clone().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "[audit] public_key is not configured".into(),
        )
    })?;
    let device = q.get("device").cloned();
    if let Some(d) = &device {
        audit_device(d)?;
    }
    let store = audit_store(&s)?;
    let key = audit_blocking(move || crate::audit::load_public_key(&key_path)).await?;
    let verdict = store.verify(key, device).await.map_err(audit_error)?;
    let mut out: Vec<AuditVerdict> = verdict
        .verified
        .into_iter()
        .map(|v| AuditVerdict {
            device: v.device,
            ok: true,
            records: v.records,
            checkpointed_to: v.checkpointed_to,
            failed_seq: None,
            reason: None,
        })
        .collect();
    out.extend(verdict.failures.into_iter().map(|f| AuditVerdict {
        device: f.device,
        ok: false,
        records: 0,
        checkpointed_to: None,
        failed_seq: Some(f.seq),
        reason: Some(f.reason),
    }));
    Ok(Json(out))
}

/// Every endpoint (method, path), as [`router`] routes them and docs/admin-api.md documents
/// them; the first three need no credential.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/health"),
    ("GET", "/v1/devices"),
    ("POST", "/v1/devices"),
    ("GET", "/v1/devices/{id}"),
    ("POST", "/v1/devices/{id}/suspend"),
    ("POST", "/v1/devices/{id}/resume"),
    ("POST", "/v1/devices/{id}/revoke"),
    ("DELETE", "/v1/devices/{id}/certificates/{sha256}"),
    ("POST", "/v1/devices/{id}/kick"),
    ("GET", "/v1/devices/{id}/deadletters"),
    ("GET", "/v1/sessions"),
    ("POST", "/v1/reload"),
    ("POST", "/v1/tls/reload"),
    ("POST", "/v1/schemas/reload"),
    ("POST", "/v1/drain"),
    ("GET", "/v1/stats/rejections"),
    ("GET", "/v1/stats/limits"),
    ("GET", "/v1/audit/{id}"),
    ("GET", "/v1/audit/verify"),
    ("GET", "/v1/audit/{id}/export"),
];

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/devices", get(list).post(enroll))
        .route("/v1/devices/{id}", get(show))
        .route("/v1/devices/{id}/suspend", post(suspend))
        .route("/v1/devices/{id}/resume", post(resume))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/devices/{id}/deadletters", get(deadletters))
        .route("/v1/devices/{id}/kick", post(kick))
        .route(
            "/v1/devices/{id}/certificates/{sha256}",
            axum::routing::delete(remove_certificate),
        )
        .route("/v1/drain", post(drain))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/reload", post(reload_config))
        .route("/v1/sessions", get(sessions))
        .route("/v1/tls/reload", post(reload_tls))
        .route("/v1/schemas/reload", post(reload_schemas))
        .route("/v1/stats/rejections", get(rejections))
        .route("/v1/stats/limits", get(limit_hits))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/audit/{id}", get(audit_show))
        .route("/v1/audit/{id}/export", get(audit_export))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "no such endpoint (docs/admin-api.md)",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Serves the admin API until `shutdown`: HTTPS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    let app = router(state).into_make_service_with_connect_info::<listener::AdminPeer>();
    let stop = shutdown.clone();
    match tls {
        Some(config) => {
            tracing::info!(listen = ?local, "admin API listening (HTTPS)");
            axum::serve(listener::tls(listener, config, shutdown.clone()), app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
        None => {
            tracing::info!(listen = ?local, "admin API listening");
            axum::serve(listener::Plain(listener), app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        }
    }
}
