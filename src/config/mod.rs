//! Configuration: the TOML file layer ([`FileConfig`], unknown keys rejected) and the validated
//! layer, one `TryFrom` per section: [`Config`] (what needs a restart) holding
//! [`RuntimeConfig`] (what may change while running). Every default is in [`defaults`];
//! [`schemas`] reads the schema directory; [`template`] writes a file from a few choices.
//! Does not read certificates or open ports: turning the validated paths into TLS material is
//! `net::tls`'s job, swapping a reloaded runtime part in is `control`'s.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod cluster;
pub mod defaults;
pub mod schemas;
pub mod template;

pub use defaults::*;

pub use crate::admission::health::HealthRules;
pub use crate::admission::identity::StaleCrlPolicy;
use crate::admission::routing::{DuplicatePolicy, FrameRules, Route, RouteOptions, RouteTable};
use crate::model::{PingRules, SessionTimers};
pub use crate::policy::limits::{DeviceLimits, LimitAction, LimitTable, RateRule};
pub use schemas::load_schemas;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for Gatehouse: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: FileServer,
    pub tls: FileTls,
    /// The embedded registry; a `[cluster]` keeps it in NATS instead.
    pub registry: Option<FileRegistry>,
    pub cluster: Option<cluster::FileCluster>,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub websocket: FileWebSocket,
    #[serde(default)]
    pub backend: FileBackend,
    #[serde(default)]
    pub schemas: FileSchemas,
    #[serde(default)]
    pub deadletter: FileDeadLetter,
    pub audit: Option<FileAudit>,
    #[serde(default)]
    pub session: FileSession,
    /// `[limits]` (defaults) with `[limits.<device-type>]` tables (overrides).
    #[serde(default)]
    pub limits: toml::Table,
    #[serde(default, rename = "route")]
    pub routes: Vec<FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSchemas {
    pub dir: Option<PathBuf>,
    pub max_depth: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    /// Segment files (embedded stores only); default `audit`.
    pub dir: Option<PathBuf>,
    pub signing_key: PathBuf,
    pub public_key: Option<PathBuf>,
    pub command_timeout_ms: Option<u64>,
    pub checkpoint_interval_ms: Option<u64>,
    pub max_payload_bytes: Option<usize>,
    pub redact: Option<Vec<String>>,
    pub segment_bytes: Option<u64>,
    pub retention_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDeadLetter {
    pub per_device: Option<usize>,
    pub max_payload_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub listen: Option<String>,
    pub workers: Option<usize>,
    pub max_connections: Option<usize>,
    pub handshake_timeout_ms: Option<u64>,
    pub max_request_header_bytes: Option<usize>,
    pub close_timeout_ms: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    /// Idle time before TCP keepalive probes start on both sockets; 0 turns keepalive off.
    pub tcp_keepalive_ms: Option<u64>,
    pub max_handshakes: Option<usize>,
    /// 0: no rate per source.
    pub source_handshakes_per_second: Option<u32>,
    pub source_handshake_burst: Option<u32>,
    /// 0: no bound per source.
    pub source_connections: Option<u32>,
    pub drain_grace_ms: Option<u64>,
    /// Balancer addresses whose connections start with a PROXY protocol v2 header.
    pub proxy_protocol_from: Option<Vec<String>>,
    /// Bind the device listener with SO_REUSEPORT (several gateway processes on one port).
    pub reuse_port: Option<bool>,
}

/// One set of per-device limits, from `[limits]` or `[limits.<device-type>]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_message_bytes: Option<usize>,
    /// 0: no frame rate.
    pub frames_per_second: Option<u32>,
    pub frames_burst: Option<u32>,
    pub frames_action: Option<String>,
    /// 0: no byte rate.
    pub bytes_per_second: Option<u32>,
    pub bytes_burst: Option<u32>,
    pub bytes_action: Option<String>,
    pub commands_in_flight: Option<usize>,
    pub sessions_per_device: Option<usize>,
    pub abuse_rejections: Option<u32>,
    pub abuse_window_ms: Option<u64>,
}

impl FileLimits {
    fn or(self, d: &FileLimits) -> FileLimits {
        FileLimits {
            max_message_bytes: self.max_message_bytes.or(d.max_message_bytes),
            frames_per_second: self.frames_per_second.or(d.frames_per_second),
            frames_burst: self.frames_burst.or(d.frames_burst),
            frames_action: self.frames_action.or_else(|| d.frames_action.clone()),
            bytes_per_second: self.bytes_per_second.or(d.bytes_per_second),
            bytes_burst: self.bytes_burst.or(d.bytes_burst),
            bytes_action: self.bytes_action.or_else(|| d.bytes_action.clone()),
            commands_in_flight: self.commands_in_flight.or(d.commands_in_flight),
            sessions_per_device: self.sessions_per_device.or(d.sessions_per_device),
            abuse_rejections: self.abuse_rejections.or(d.abuse_rejections),
            abuse_window_ms: self.abuse_window_ms.or(d.abuse_window_ms),
        }
    }
}

/// Session timers: `[session]` holds the defaults, `[route.session]` a route's own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSession {
    pub device_ping_interval_ms: Option<u64>,
    pub device_ping_timeout_ms: Option<u64>,
    pub backend_ping_interval_ms: Option<u64>,
    pub backend_ping_timeout_ms: Option<u64>,
    /// 0: no idle timeout.
    pub idle_timeout_ms: Option<u64>,
    /// 0: no maximum lifetime.
    pub max_lifetime_ms: Option<u64>,
    pub lifetime_jitter_percent: Option<u8>,
    pub write_timeout_ms: Option<u64>,
}

impl FileSession {
    /// This section's values, with `defaults`' where this one has none.
    fn or(self, defaults: &FileSession) -> FileSession {
        FileSession {
            device_ping_interval_ms: self
                .device_ping_interval_ms
                .or(defaults.device_ping_interval_ms),
            device_ping_timeout_ms: self
                .device_ping_timeout_ms
                .or(defaults.device_ping_timeout_ms),
            backend_ping_interval_ms: self
                .backend_ping_interval_ms
                .or(defaults.backend_ping_interval_ms),
            backend_ping_timeout_ms: self
                .backend_ping_timeout_ms
                .or(defaults.backend_ping_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(defaults.idle_timeout_ms),
            max_lifetime_ms: self.max_lifetime_ms.or(defaults.max_lifetime_ms),
            lifetime_jitter_percent: self
                .lifetime_jitter_percent
                .or(defaults.lifetime_jitter_percent),
            write_timeout_ms: self.write_timeout_ms.or(defaults.write_timeout_ms),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    pub min_version: Option<String>,
    pub stale_crl: Option<String>,
    pub crl_refresh_ms: Option<u64>,
    pub session_resumption: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRegistry {
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: String,
    pub token_file: PathBuf,
    /// HTTPS on the admin listener: its certificate chain and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA bundle admin client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Admin certificate names (`gatehouse-pki admin --name NAME`) allowed in.
    pub clients: Option<Vec<String>>,
    /// CA bundle the CLI verifies the admin listener's certificate with (default
    /// `tls.client_ca`).
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWebSocket {
    pub max_message_bytes: Option<usize>,
    pub max_frame_bytes: Option<usize>,
    pub read_buffer_bytes: Option<usize>,
    pub write_buffer_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub connect_timeout_ms: Option<u64>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Consecutive failed connects that eject a backend; 0 never ejects.
    pub eject_after_failures: Option<u32>,
    pub eject_base_ms: Option<u64>,
    pub eject_max_ms: Option<u64>,
    /// Connect to every backend on this interval (active check); absent: passive only.
    pub health_check_interval_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub subprotocol: String,
    pub kind: String,
    pub device_types: Vec<String>,
    pub backends: Vec<String>,
    pub error_replies: Option<bool>,
    pub invalid_frame_limit: Option<u32>,
    pub invalid_frame_window_ms: Option<u64>,
    /// `takeover` (default), `reject`, or `allow` (with `max_sessions_per_device`).
    pub duplicates: Option<String>,
    pub max_sessions_per_device: Option<usize>,
    /// Request headers of the device passed on to the backend.
    pub forward_headers: Option<Vec<String>>,
    /// `false`: an opaque route (telemetry only): frames pass undecoded.
    pub validate: Option<bool>,
    /// `true`: continue the device's W3C trace (`traceparent`).
    pub continue_trace: Option<bool>,
    pub session: Option<FileSession>,
}

/// TLS protocol versions the gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinTlsVersion {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crls: Vec<PathBuf>,
    pub min_version: MinTlsVersion,
    pub stale_crl: StaleCrlPolicy,
    pub crl_refresh: Duration,
    pub session_resumption: bool,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: AdminToken,
    /// HTTPS, and admin client certificates as a second way in (besides the token).
    pub tls: Option<AdminTls>,
}

/// The admin listener's TLS: its own certificate, and which admin client certificates are
/// accepted in place of the bearer token.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `None`: no client certificates asked for (HTTPS with the token only).
    pub client_ca: Option<PathBuf>,
    pub clients: Vec<String>,
    /// What the CLI trusts for the listener's certificate; `None`: `tls.client_ca`.
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The admin API's bearer token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Shortest token accepted: 16 characters.
    pub const MIN_LEN: usize = 16;

    pub fn new(token: &str) -> Result<Self, ConfigError> {
        let token = token.trim();
        if token.len() < Self::MIN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(format!(
                "admin token must be at least {} printable characters without spaces; generate one with `head -c 32 /dev/urandom | base64 > admin.token`",
                Self::MIN_LEN
            )));
        }
        Ok(Self(token.to_string()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        let a = self.0.as_bytes();
        let b = presented.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(****)")
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WebSocketLimits {
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
}

impl Default for WebSocketLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub connect_timeout: Duration,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub health: HealthRules,
    pub health_check_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub signing_key: PathBuf,
    pub public_key: Option<PathBuf>,
    pub checkpoint_interval: Duration,
    pub segment_bytes: u64,
    /// Segments whose newest record is older than this are pruned behind signed anchors.
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub per_device: usize,
}

/// How commands are recorded on control routes (from `[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRules {
    /// Time a device has to answer a command before it is recorded as timed out.
    pub timeout: Duration,
    /// Payload bytes kept in an audit record (after redaction).
    pub max_payload_bytes: usize,
    /// Field names whose values are replaced before a payload is stored.
    pub redact: Vec<String>,
}

/// The validated configuration, in two layers: what needs a restart (these fields) and what
/// may change while the gateway runs ([`RuntimeConfig`], swapped in whole on reload).
#[derive(Debug, Clone)]
pub struct Config {
    /// Session worker threads (one single-threaded runtime each).
    pub workers: NonZeroUsize,
    pub listen: SocketAddr,
    /// Sessions at once (after their upgrade request); beyond: 503.
    pub max_connections: NonZeroUsize,
    /// Handshakes in progress at once; beyond: closed at accept.
    pub max_handshakes: NonZeroUsize,
    /// Per source address budgets, checked at accept.
    pub sources: crate::admission::sources::SourceRules,
    /// Connections from these addresses (load balancers) begin with a PROXY protocol v2
    /// header naming the device's own address; empty: PROXY protocol off.
    pub proxy_from: Vec<crate::admission::cidr::Cidr>,
    /// SO_REUSEPORT on the device listener: several processes share one port, the kernel
    /// spreads new connections over them.
    pub reuse_port: bool,
    pub shutdown_grace: Duration,
    /// Where the stores live: the embedded sled registry, or the NATS cluster.
    pub stores: Stores,
    pub deadletter: DeadLetterConfig,
    /// The audit log's storage and signing key.
    pub audit: Option<AuditConfig>,
    pub admin: Option<AdminConfig>,
    pub runtime: RuntimeConfig,
    /// The file this was loaded from: what a reload reads again.
    pub source: Option<PathBuf>,
}

/// Where the registry, dead letters, audit log and session ownership live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stores {
    /// sled at this path (registry and dead letters) and the audit segment files: one node.
    Embedded { registry_path: PathBuf },
    /// NATS JetStream, shared by every gateway configured with it.
    Cluster(cluster::ClusterConfig),
}

impl Stores {
    pub fn cluster(&self) -> Option<&cluster::ClusterConfig> {
        match self {
            Stores::Cluster(c) => Some(c),
            Stores::Embedded { .. } => None,
        }
    }
}

/// What may change while the gateway runs: TLS material, routes and their backends, schemas,
/// WebSocket limits, timers. Sessions read one snapshot of it at defined points (the
/// handshake reads it once; each frame reads the schemas of the snapshot in force).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub tls: TlsConfig,
    pub routes: RouteTable,
    pub schemas_dir: PathBuf,
    pub limits: crate::frames::DecodeLimits,
    pub websocket: WebSocketLimits,
    pub backend: BackendConfig,
    pub handshake_timeout: Duration,
    pub max_request_header_bytes: usize,
    pub close_timeout: Duration,
    /// What each device may send, per device type.
    pub device_limits: LimitTable,
    /// TCP keepalive idle time on both sockets of a session; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// Time `drain` spreads the closing of open sessions over.
    pub drain_grace: Duration,
    /// Payload bytes kept per dead letter.
    pub dead_letter_payload_bytes: usize,
    pub commands: CommandRules,
}

impl Config {
    /// Reads and validates a config file. Relative paths are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        // Errors name the file as well as the key.
        let mut config = Self::from_file(file, base).map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Validates a parsed file; `base` is the directory relative paths start from. Each
    /// section converts on its own (`TryFrom<Section<..>>`); what spans sections (wss://
    /// backends need `backend.ca`, dead letters fit in a message) is checked here.
    pub fn from_file(file: FileConfig, base: &Path) -> Result<Self, ConfigError> {
        fn at<T>(file: T, base: &Path) -> Section<'_, T> {
            Section { file, base }
        }
        let server = ServerSection::try_from(at(file.server, base))?;
        let tls = TlsConfig::try_from(at(file.tls, base))?;
        let admin = file
            .admin
            .map(|a| AdminConfig::try_from(at(a, base)))
            .transpose()?;
        let websocket = WebSocketLimits::try_from(file.websocket)?;
        let backend = BackendConfig::try_from(at(file.backend, base))?;
        let routes = RouteTable::try_from((file.routes, file.session))?;
        if let Some(route) = routes.iter().find(|r| r.uses_tls()) {
            if backend.ca.is_none() {
                return Err(invalid(format!(
                    "route {:?} has a wss:// backend but backend.ca is not set: name the CA bundle that signs the backends' certificates",
                    route.subprotocol
                )));
            }
        }
        let max_depth = file.schemas.max_depth.unwrap_or(DEFAULT_MAX_DEPTH);
        if !(1..=MAX_DEPTH_LIMIT).contains(&max_depth) {
            return Err(invalid(format!(
                "schemas.max_depth must be between 1 and {MAX_DEPTH_LIMIT}"
            )));
        }
        let stores = match (file.registry, file.cluster) {
            (Some(r), None) => Stores::Embedded {
                registry_path: at((), base).path(&r.path),
            },
            (None, Some(c)) => Stores::Cluster(cluster::ClusterConfig::try_from(at(c, base))?),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "[registry] and [cluster] are both given: a cluster gateway keeps its registry in NATS; remove [registry]",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "no [registry] section: give [registry] path = \"registry\" (embedded), or a [cluster] section",
                ))
            }
        };
        let (deadletter, dead_letter_payload_bytes) = dead_letters(file.deadletter)?;
        let device_limits = limit_table(file.limits, &websocket)?;
        let (audit, commands) = match file.audit {
            None => (None, CommandRules::default()),
            Some(a) => {
                let (audit, commands) = <(AuditConfig, CommandRules)>::try_from(at(a, base))?;
                (Some(audit), commands)
            }
        };
        if let (Stores::Cluster(_), Some(a)) = (&stores, &audit) {
            if a.retention.is_some() {
                return Err(invalid(
                    "audit.retention_days is not available with [cluster]: the cluster's audit stream keeps every record (size it with JetStream's own limits); remove the key",
                ));
            }
        }
        Ok(Self {
            workers: server.workers,
            listen: server.listen,
            max_connections: server.max_connections,
            max_handshakes: server.max_handshakes,
            sources: server.sources,
            proxy_from: server.proxy_from,
            reuse_port: server.reuse_port,
            shutdown_grace: server.shutdown_grace,
            stores,
            deadletter,
            audit,
            admin,
            runtime: RuntimeConfig {
                tls,
                routes,
                schemas_dir: at((), base)
                    .path(file.schemas.dir.as_deref().unwrap_or(Path::new("schemas"))),
                limits: crate::frames::DecodeLimits { max_depth },
                // More than a message can hold would never be used.
                dead_letter_payload_bytes: dead_letter_payload_bytes
                    .min(websocket.max_message_bytes),
                websocket,
                backend,
                handshake_timeout: server.handshake_timeout,
                max_request_header_bytes: server.max_request_header_bytes,
                close_timeout: server.close_timeout,
                device_limits,
                tcp_keepalive: server.tcp_keepalive,
                drain_grace: server.drain_grace,
                commands,
            },
            source: None,
        })
    }

    /// What differs between this configuration and `next` in the part that needs a restart;
    /// a reload applies the runtime part and reports these.
    pub fn restart_needed(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.listen != next.listen {
            changed.push("server.listen");
        }
        if self.workers != next.workers {
            changed.push("server.workers");
        }
        if self.max_connections != next.max_connections {
            changed.push("server.max_connections");
        }
        if self.max_handshakes != next.max_handshakes {
            changed.push("server.max_handshakes");
        }
        if self.sources != next.sources {
            changed.push("server.source_* budgets");
        }
        if self.proxy_from != next.proxy_from {
            changed.push("server.proxy_protocol_from");
        }
        if self.shutdown_grace != next.shutdown_grace {
            changed.push("server.shutdown_grace_ms");
        }
        if self.stores != next.stores {
            changed.push(match (&self.stores, &next.stores) {
                (Stores::Embedded { .. }, Stores::Embedded { .. }) => "registry.path",
                _ => "[cluster]",
            });
        }
        // Read once, by tasks started with the gateway.
        if self.runtime.tls.crl_refresh != next.runtime.tls.crl_refresh {
            changed.push("tls.crl_refresh_ms");
        }
        if self.runtime.backend.health_check_interval != next.runtime.backend.health_check_interval
        {
            changed.push("backend.health_check_interval_ms");
        }
        if self.deadletter != next.deadletter {
            changed.push("deadletter.per_device");
        }
        if self.audit != next.audit {
            changed.push("[audit] storage and keys");
        }
        if self.admin.as_ref().map(|a| (a.listen, &a.token))
            != next.admin.as_ref().map(|a| (a.listen, &a.token))
        {
            changed.push("[admin]");
        }
        changed
    }
}

/// A file section and the directory its relative paths start from.
pub struct Section<'a, T> {
    pub file: T,
    pub base: &'a Path,
}

impl<T> Section<'_, T> {
    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// A duration in milliseconds from the file: the default when absent, never 0.
fn ms(v: Option<u64>, default: Duration, key: &str) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(invalid(format!("{key} must be greater than 0"))),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// `[server]`, validated.
struct ServerSection {
    listen: SocketAddr,
    workers: NonZeroUsize,
    max_connections: NonZeroUsize,
    max_handshakes: NonZeroUsize,
    sources: crate::admission::sources::SourceRules,
    handshake_timeout: Duration,
    max_request_header_bytes: usize,
    close_timeout: Duration,
    shutdown_grace: Duration,
    tcp_keepalive: Option<Duration>,
    drain_grace: Duration,
    proxy_from: Vec<crate::admission::cidr::Cidr>,
    reuse_port: bool,
}

/// A duration in milliseconds where 0 turns the feature off.
fn ms_or_off(v: Option<u64>, default: Option<Duration>) -> Option<Duration> {
    match v {
        None => default,
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    }
}

impl TryFrom<Section<'_, FileServer>> for ServerSection {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileServer>) -> Result<Self, ConfigError> {
        let s = section.file;
        let listen_text = s.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(format!(
                "server.listen = {listen_text:?} is not an address: write it as \"IP:PORT\", e.g. \"0.0.0.0:8443\""
            ))
        })?;
        let max_connections =
            NonZeroUsize::new(s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))
                .ok_or_else(|| invalid("server.max_connections must be at least 1"))?;
        let max_request_header_bytes = s
            .max_request_header_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
        if !(512..=64 * 1024).contains(&max_request_header_bytes) {
            return Err(invalid(
                "server.max_request_header_bytes must be between 512 and 65536",
            ));
        }
        let workers = match s.workers {
            Some(n) => NonZeroUsize::new(n)
                .filter(|n| n.get() <= 256)
                .ok_or_else(|| invalid("server.workers must be between 1 and 256"))?,
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        };
        let max_handshakes = NonZeroUsize::new(s.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES))
            .ok_or_else(|| invalid("server.max_handshakes must be at least 1"))?;
        let rate = s
            .source_handshakes_per_second
            .unwrap_or(DEFAULT_SOURCE_HANDSHAKES_PER_SECOND);
        let handshakes = match std::num::NonZeroU32::new(rate) {
            None => None,
            Some(per_second) => Some((
                per_second,
                std::num::NonZeroU32::new(
                    s.source_handshake_burst
                        .unwrap_or(DEFAULT_SOURCE_HANDSHAKE_BURST.max(rate)),
                )
                .ok_or_else(|| invalid("server.source_handshake_burst must be at least 1"))?,
            )),
        };
        let sources = crate::admission::sources::SourceRules {
            handshakes,
            connections: match s.source_connections.unwrap_or(DEFAULT_SOURCE_CONNECTIONS) {
                0 => None,
                n => Some(n),
            },
        };
        Ok(Self {
            listen,
            workers,
            max_connections,
            max_handshakes,
            sources,
            handshake_timeout: ms(
                s.handshake_timeout_ms,
                DEFAULT_HANDSHAKE_TIMEOUT,
                "server.handshake_timeout_ms",
            )?,
            max_request_header_bytes,
            close_timeout: ms(
                s.close_timeout_ms,
                DEFAULT_CLOSE_TIMEOUT,
                "server.close_timeout_ms",
            )?,
            shutdown_grace: ms(
                s.shutdown_grace_ms,
                DEFAULT_SHUTDOWN_GRACE,
                "server.shutdown_grace_ms",
            )?,
            tcp_keepalive: ms_or_off(s.tcp_keepalive_ms, Some(DEFAULT_TCP_KEEPALIVE)),
            drain_grace: ms(
                s.drain_grace_ms,
                DEFAULT_DRAIN_GRACE,
                "server.drain_grace_ms",
            )?,
            proxy_from: s
                .proxy_protocol_from
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    crate::admission::cidr::Cidr::parse(r)
                        .map_err(|e| invalid(format!("server.proxy_protocol_from: {e}")))
                })
                .collect::<Result<_, _>>()?,
            reuse_port: s.reuse_port.unwrap_or(false),
        })
    }
}

impl TryFrom<Section<'_, FileTls>> for TlsConfig {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileTls>) -> Result<Self, ConfigError> {
        let t = &section.file;
        let min_version = match t.min_version.as_deref() {
            None | Some("1.3") => MinTlsVersion::Tls13,
            Some("1.2") => MinTlsVersion::Tls12,
            Some(other) => {
                return Err(invalid(format!(
                    "tls.min_version = {other:?}: use \"1.3\" (default) or \"1.2\""
                )))
            }
        };
        let stale_crl = match t.stale_crl.as_deref() {
            None | Some("refuse") => StaleCrlPolicy::Refuse,
            Some("warn") => StaleCrlPolicy::Warn,
            Some(other) => {
                return Err(invalid(format!(
                    "tls.stale_crl = {other:?}: use \"refuse\" (default: refuse devices while the CRL is past its next update) or \"warn\" (accept and log a warning)"
                )))
            }
        };
        Ok(TlsConfig {
            cert: section.path(&t.cert),
            key: section.path(&t.key),
            client_ca: section.path(&t.client_ca),
            crls: t.crl.iter().map(|p| section.path(p)).collect(),
            min_version,
            stale_crl,
            crl_refresh: ms(t.crl_refresh_ms, DEFAULT_CRL_REFRESH, "tls.crl_refresh_ms")?,
            session_resumption: t.session_resumption.unwrap_or(true),
        })
    }
}

impl TryFrom<Section<'_, FileAdmin>> for AdminConfig {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileAdmin>) -> Result<Self, ConfigError> {
        let a = &section.file;
        let listen: SocketAddr = a.listen.parse().map_err(|_| {
            invalid(format!(
                "admin.listen = {:?} is not an address: write it as \"127.0.0.1:PORT\"",
                a.listen
            ))
        })?;
        if !listen.ip().is_loopback() {
            return Err(invalid(format!(
                "admin.listen = {listen} is not a loopback address: the admin API only listens on 127.0.0.1 or ::1"
            )));
        }
        let token_path = section.path(&a.token_file);
        let token_text = std::fs::read_to_string(&token_path).map_err(|e| {
            invalid(format!(
                "admin.token_file {}: {e}; create it with `head -c 32 /dev/urandom | base64 > {}`",
                token_path.display(),
                token_path.display()
            ))
        })?;
        let tls = match (&a.cert, &a.key) {
            (None, None) => {
                if a.client_ca.is_some() || a.clients.is_some() || a.ca.is_some() {
                    return Err(invalid(
                        "admin.client_ca, admin.clients and admin.ca need admin.cert and admin.key (HTTPS on the admin listener)",
                    ));
                }
                None
            }
            (Some(cert), Some(key)) => {
                let clients = a.clients.clone().unwrap_or_default();
                for name in &clients {
                    gatehouse_pki::validate_device_id(name)
                        .map_err(|e| invalid(format!("admin.clients: {name:?}: {e}")))?;
                }
                if !clients.is_empty() && a.client_ca.is_none() {
                    return Err(invalid(
                        "admin.clients needs admin.client_ca: the CA the admin certificates chain to",
                    ));
                }
                Some(AdminTls {
                    cert: section.path(cert),
                    key: section.path(key),
                    client_ca: a.client_ca.as_ref().map(|p| section.path(p)),
                    clients,
                    ca: a.ca.as_ref().map(|p| section.path(p)),
                })
            }
            _ => {
                return Err(invalid(
                    "admin.cert and admin.key go together: give both for HTTPS, or neither",
                ))
            }
        };
        Ok(AdminConfig {
            listen,
            token: AdminToken::new(&token_text)?,
            tls,
        })
    }
}

impl TryFrom<FileWebSocket> for WebSocketLimits {
    type Error = ConfigError;

    fn try_from(w: FileWebSocket) -> Result<Self, ConfigError> {
        let websocket = WebSocketLimits {
            max_message_bytes: w.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            max_frame_bytes: w.max_frame_bytes.unwrap_or(DEFAULT_MAX_FRAME_BYTES),
            read_buffer_bytes: w.read_buffer_bytes.unwrap_or(DEFAULT_READ_BUFFER_BYTES),
            write_buffer_bytes: w.write_buffer_bytes.unwrap_or(DEFAULT_WRITE_BUFFER_BYTES),
        };
        if websocket.max_message_bytes < 125 || websocket.max_message_bytes > 16 << 20 {
            return Err(invalid(
                "websocket.max_message_bytes must be between 125 and 16777216",
            ));
        }
        if websocket.max_frame_bytes < 125
            || websocket.max_frame_bytes > websocket.max_message_bytes
        {
            return Err(invalid(
                "websocket.max_frame_bytes must be at least 125 and at most websocket.max_message_bytes",
            ));
        }
        if !(256..=1 << 20).contains(&websocket.read_buffer_bytes) {
            return Err(invalid(
                "websocket.read_buffer_bytes must be between 256 and 1048576",
            ));
        }
        if websocket.write_buffer_bytes > 1 << 20 {
            return Err(invalid(
                "websocket.write_buffer_bytes must be at most 1048576",
            ));
        }
        Ok(websocket)
    }
}

impl TryFrom<Section<'_, FileBackend>> for BackendConfig {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileBackend>) -> Result<Self, ConfigError> {
        let b = &section.file;
        let client_cert =
            match (&b.client_cert, &b.client_key) {
                (None, None) => None,
                (Some(c), Some(k)) => Some((section.path(c), section.path(k))),
                _ => return Err(invalid(
                    "backend.client_cert and backend.client_key go together: set both or neither",
                )),
            };
        Ok(BackendConfig {
            connect_timeout: ms(
                b.connect_timeout_ms,
                DEFAULT_BACKEND_CONNECT_TIMEOUT,
                "backend.connect_timeout_ms",
            )?,
            ca: b.ca.as_deref().map(|p| section.path(p)),
            client_cert,
            health: {
                let rules = HealthRules {
                    eject_after: b
                        .eject_after_failures
                        .unwrap_or(DEFAULT_EJECT_AFTER_FAILURES),
                    base: ms(b.eject_base_ms, DEFAULT_EJECT_BASE, "backend.eject_base_ms")?,
                    max: ms(b.eject_max_ms, DEFAULT_EJECT_MAX, "backend.eject_max_ms")?,
                };
                if rules.max < rules.base {
                    return Err(invalid(
                        "backend.eject_max_ms must be at least backend.eject_base_ms",
                    ));
                }
                rules
            },
            health_check_interval: b
                .health_check_interval_ms
                .map(|v| {
                    ms(
                        Some(v),
                        DEFAULT_BACKEND_CONNECT_TIMEOUT,
                        "backend.health_check_interval_ms",
                    )
                })
                .transpose()?,
        })
    }
}

/// Session timers from a `[session]` or `[route.session]` section (defaults filled in);
/// `at` names the section in errors.
fn session_timers(f: &FileSession, at: &str) -> Result<SessionTimers, ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    let timers = SessionTimers {
        device_ping: PingRules {
            interval: ms(
                f.device_ping_interval_ms,
                DEFAULT_DEVICE_PING_INTERVAL,
                &key("device_ping_interval_ms"),
            )?,
            timeout: ms(
                f.device_ping_timeout_ms,
                DEFAULT_DEVICE_PING_TIMEOUT,
                &key("device_ping_timeout_ms"),
            )?,
        },
        backend_ping: PingRules {
            interval: ms(
                f.backend_ping_interval_ms,
                DEFAULT_BACKEND_PING_INTERVAL,
                &key("backend_ping_interval_ms"),
            )?,
            timeout: ms(
                f.backend_ping_timeout_ms,
                DEFAULT_BACKEND_PING_TIMEOUT,
                &key("backend_ping_timeout_ms"),
            )?,
        },
        idle_timeout: ms_or_off(f.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT),
        max_lifetime: ms_or_off(f.max_lifetime_ms, DEFAULT_MAX_LIFETIME),
        lifetime_jitter: {
            let percent = f
                .lifetime_jitter_percent
                .unwrap_or(DEFAULT_LIFETIME_JITTER_PERCENT);
            if percent > 50 {
                return Err(invalid(format!(
                    "{} must be between 0 and 50",
                    key("lifetime_jitter_percent")
                )));
            }
            f64::from(percent) / 100.0
        },
        write_timeout: ms(
            f.write_timeout_ms,
            DEFAULT_WRITE_TIMEOUT,
            &key("write_timeout_ms"),
        )?,
    };
    Ok(timers)
}

fn duplicate_policy(r: &FileRoute) -> Result<DuplicatePolicy, ConfigError> {
    let at = format!("route {:?}", r.subprotocol);
    match (
        r.duplicates.as_deref().unwrap_or(DEFAULT_DUPLICATES),
        r.max_sessions_per_device,
    ) {
        ("takeover", None) => Ok(DuplicatePolicy::Takeover),
        ("reject", None) => Ok(DuplicatePolicy::Reject),
        ("allow", Some(n)) if n >= 1 => Ok(DuplicatePolicy::Allow(n)),
        ("allow", _) => Err(invalid(format!(
            "{at}: duplicates = \"allow\" needs max_sessions_per_device = N (at least 1)"
        ))),
        ("takeover" | "reject", Some(_)) => Err(invalid(format!(
            "{at}: max_sessions_per_device only goes with duplicates = \"allow\""
        ))),
        (other, _) => Err(invalid(format!(
            "{at}: duplicates = {other:?}: use \"takeover\" (default: a new session ends the older one), \"reject\" (409 while one is open) or \"allow\" with max_sessions_per_device"
        ))),
    }
}

/// The `[[route]]` sections, with `[session]`'s timers as defaults for each route's own.
impl TryFrom<(Vec<FileRoute>, FileSession)> for RouteTable {
    type Error = ConfigError;

    fn try_from((file, session): (Vec<FileRoute>, FileSession)) -> Result<Self, ConfigError> {
        if file.is_empty() {
            return Err(invalid(
                "no [[route]] sections: add at least one, e.g. [[route]] subprotocol = \"telemetry.v1\", kind = \"telemetry\", device_types = [\"env-sensor\"], backends = [\"ws://127.0.0.1:9001/ingest\"]",
            ));
        }
        // The global section is checked on its own, so its errors name it.
        session_timers(&session, "session")?;
        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        for r in file {
            let frames = FrameRules {
                error_replies: r.error_replies.unwrap_or(DEFAULT_ERROR_REPLIES),
                invalid_frame_limit: r.invalid_frame_limit.unwrap_or(DEFAULT_INVALID_FRAME_LIMIT),
                invalid_frame_window: ms(
                    r.invalid_frame_window_ms,
                    DEFAULT_INVALID_FRAME_WINDOW,
                    "route.invalid_frame_window_ms",
                )?,
            };
            let at = format!("route {:?} session", r.subprotocol);
            let timers = session_timers(&r.session.clone().unwrap_or_default().or(&session), &at)?;
            let forward_headers = r.forward_headers.clone().unwrap_or_default();
            for h in &forward_headers {
                let folded = crate::admission::routing::fold_header_name(h);
                if crate::admission::upgrade::never_forwarded(&folded) {
                    return Err(invalid(format!(
                        "route {:?}: forward_headers names {h:?}, which the gateway never passes on (handshake, hop-by-hop, forwarding and identity headers are its own)",
                        r.subprotocol
                    )));
                }
            }
            let options = RouteOptions {
                frames,
                timers,
                duplicates: duplicate_policy(&r)?,
                forward_headers,
                validate: r.validate.unwrap_or(true),
                continue_trace: r.continue_trace.unwrap_or(false),
            };
            let route = Route::parse(
                &r.subprotocol,
                &r.kind,
                &r.device_types,
                &r.backends,
                options,
            )
            .map_err(|e| invalid(format!("route {:?}: {e}", r.subprotocol)))?;
            if !seen.insert(route.subprotocol.clone()) {
                return Err(invalid(format!(
                    "subprotocol {:?} is routed twice: each subprotocol names one route",
                    r.subprotocol
                )));
            }
            routes.push(route);
        }
        Ok(RouteTable::new(routes))
    }
}

fn limit_action(v: Option<&str>, key: &str) -> Result<LimitAction, ConfigError> {
    match v.unwrap_or(DEFAULT_LIMIT_ACTION) {
        "delay" => Ok(LimitAction::Delay),
        "reject" => Ok(LimitAction::Reject),
        other => Err(invalid(format!(
            "{key} = {other:?}: use \"delay\" (stop reading from the device until it is within its limit; nothing is lost) or \"reject\" (drop the frame with a rate-limited error frame)"
        ))),
    }
}

/// A rate from its three keys; `None` when the rate is 0 (off).
fn rate_rule(
    rate: u32,
    burst: Option<u32>,
    default_burst: u32,
    action: Option<&str>,
    at: &str,
    name: &str,
) -> Result<Option<RateRule>, ConfigError> {
    let Some(per_second) = std::num::NonZeroU32::new(rate) else {
        return Ok(None);
    };
    let burst = std::num::NonZeroU32::new(burst.unwrap_or(default_burst.max(rate)))
        .ok_or_else(|| invalid(format!("{at}.{name}_burst must be at least 1")))?;
    Ok(Some(RateRule {
        per_second,
        burst,
        action: limit_action(action, &format!("{at}.{name}_action"))?,
    }))
}

/// One set of limits, with the defaults filled in; `at` names the section in errors.
fn device_limits(
    f: &FileLimits,
    websocket: &WebSocketLimits,
    at: &str,
) -> Result<DeviceLimits, ConfigError> {
    let ceiling = websocket.max_message_bytes;
    let max_message_bytes = f.max_message_bytes.unwrap_or(ceiling);
    if max_message_bytes == 0 || max_message_bytes > ceiling {
        return Err(invalid(format!(
            "{at}.max_message_bytes = {max_message_bytes}: must be between 1 and websocket.max_message_bytes ({ceiling})"
        )));
    }
    let frames = rate_rule(
        f.frames_per_second.unwrap_or(DEFAULT_FRAMES_PER_SECOND),
        f.frames_burst,
        DEFAULT_FRAMES_BURST,
        f.frames_action.as_deref(),
        at,
        "frames",
    )?;
    let bytes = rate_rule(
        f.bytes_per_second.unwrap_or(DEFAULT_BYTES_PER_SECOND),
        f.bytes_burst,
        DEFAULT_BYTES_BURST.max(u32::try_from(max_message_bytes).unwrap_or(u32::MAX)),
        f.bytes_action.as_deref(),
        at,
        "bytes",
    )?;
    if let Some(b) = bytes {
        if (b.burst.get() as usize) < max_message_bytes {
            return Err(invalid(format!(
                "{at}.bytes_burst = {}: must be at least max_message_bytes ({max_message_bytes}), or a largest message could never pass",
                b.burst
            )));
        }
    }
    let commands_in_flight = f.commands_in_flight.unwrap_or(DEFAULT_MAX_OPEN_COMMANDS);
    if commands_in_flight == 0 {
        return Err(invalid(format!(
            "{at}.commands_in_flight must be at least 1"
        )));
    }
    let sessions = f.sessions_per_device.unwrap_or(DEFAULT_SESSIONS_PER_DEVICE);
    if sessions == 0 {
        return Err(invalid(format!(
            "{at}.sessions_per_device must be at least 1"
        )));
    }
    Ok(DeviceLimits {
        max_message_bytes,
        frames,
        bytes,
        commands_in_flight,
        sessions,
        abuse_rejections: f.abuse_rejections.unwrap_or(DEFAULT_ABUSE_REJECTIONS),
        abuse_window: ms(
            f.abuse_window_ms,
            DEFAULT_ABUSE_WINDOW,
            &format!("{at}.abuse_window_ms"),
        )?,
    })
}

/// `[limits]` and its `[limits.<device-type>]` tables.
fn limit_table(table: toml::Table, websocket: &WebSocketLimits) -> Result<LimitTable, ConfigError> {
    let mut defaults = toml::Table::new();
    let mut types = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(t) => types.push((key, t)),
            other => {
                defaults.insert(key, other);
            }
        }
    }
    let parse = |t: toml::Table, at: &str| -> Result<FileLimits, ConfigError> {
        FileLimits::deserialize(toml::Value::Table(t))
            .map_err(|e| invalid(format!("[{at}]: {}", e.message())))
    };
    let file_defaults = parse(defaults, "limits")?;
    let mut per_type = std::collections::HashMap::new();
    for (device_type, t) in types {
        gatehouse_pki::validate_device_type(&device_type)
            .map_err(|e| invalid(format!("[limits.{device_type}]: {e}")))?;
        let at = format!("limits.{device_type}");
        let f = parse(t, &at)?.or(&file_defaults);
        per_type.insert(device_type, device_limits(&f, websocket, &at)?);
    }
    Ok(LimitTable {
        defaults: device_limits(&file_defaults, websocket, "limits")?,
        per_type,
    })
}

/// `[deadletter]`: the store's bound (startup) and the payload kept (runtime).
fn dead_letters(d: FileDeadLetter) -> Result<(DeadLetterConfig, usize), ConfigError> {
    let per_device = d.per_device.unwrap_or(DEFAULT_DEAD_LETTERS_PER_DEVICE);
    if !(1..=10_000).contains(&per_device) {
        return Err(invalid("deadletter.per_device must be between 1 and 10000"));
    }
    Ok((
        DeadLetterConfig { per_device },
        d.max_payload_bytes
            .unwrap_or(DEFAULT_DEAD_LETTER_PAYLOAD_BYTES),
    ))
}

impl Default for CommandRules {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_COMMAND_TIMEOUT,
            max_payload_bytes: DEFAULT_AUDIT_PAYLOAD_BYTES,
            redact: Vec::new(),
        }
    }
}

/// `[audit]`: the log's storage and keys (startup) and how commands are recorded (runtime).
impl TryFrom<Section<'_, FileAudit>> for (AuditConfig, CommandRules) {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileAudit>) -> Result<Self, ConfigError> {
        let a = &section.file;
        let audit =
            AuditConfig {
                dir: section.path(a.dir.as_deref().unwrap_or(Path::new("audit"))),
                signing_key: section.path(&a.signing_key),
                public_key: a.public_key.as_deref().map(|p| section.path(p)),
                checkpoint_interval: ms(
                    a.checkpoint_interval_ms,
                    DEFAULT_CHECKPOINT_INTERVAL,
                    "audit.checkpoint_interval_ms",
                )?,
                segment_bytes: match a.segment_bytes {
                    None => DEFAULT_AUDIT_SEGMENT_BYTES,
                    Some(n) if n >= 4096 => n,
                    Some(_) => return Err(invalid("audit.segment_bytes must be at least 4096")),
                },
                retention: match a.retention_days {
                    None => None,
                    Some(0) => return Err(invalid(
                        "audit.retention_days must be at least 1 (leave it out to keep everything)",
                    )),
                    Some(d) => Some(Duration::from_secs(u64::from(d) * 86_400)),
                },
            };
        let commands = CommandRules {
            timeout: ms(
                a.command_timeout_ms,
                DEFAULT_COMMAND_TIMEOUT,
                "audit.command_timeout_ms",
            )?,
            max_payload_bytes: a.max_payload_bytes.unwrap_or(DEFAULT_AUDIT_PAYLOAD_BYTES),
            redact: a.redact.clone().unwrap_or_default(),
        };
        Ok((audit, commands))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        Config::from_file(file, Path::new("/etc/gatehouse"))
    }

    const MINIMAL: &str = r#"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        crl = ["crl.pem"]
        [registry]
        path = "/var/lib/gatehouse/registry"
        [[route]]
        subprotocol = "telemetry.v1"
        kind = "telemetry"
        device_types = ["env-sensor"]
        backends = ["ws://127.0.0.1:9001/ingest"]
    "#;

    #[test]
    fn minimal_config_gets_named_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.runtime.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(
            c.runtime.websocket.max_message_bytes,
            DEFAULT_MAX_MESSAGE_BYTES
        );
        assert_eq!(
            c.runtime.tls.cert,
            PathBuf::from("/etc/gatehouse/server.pem")
        );
        assert_eq!(c.runtime.tls.min_version, MinTlsVersion::Tls13);
        assert_eq!(c.runtime.tls.stale_crl, StaleCrlPolicy::Refuse);
        assert!(c.admin.is_none());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = MINIMAL.replace("[registry]", "[registry]\npaht = \"x\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("paht"), "{err}");
    }

    #[test]
    fn bad_values_say_how_to_fix_them() {
        let cases = [
            ("[tls]", "[server]\nlisten = \"8443\"\n[tls]", "IP:PORT"),
            (
                "[tls]",
                "[server]\nhandshake_timeout_ms = 0\n[tls]",
                "greater than 0",
            ),
            ("cert = ", "min_version = \"1.1\"\ncert = ", "\"1.2\""),
            ("cert = ", "stale_crl = \"ignore\"\ncert = ", "\"warn\""),
            ("ws://127.0.0.1", "http://127.0.0.1", "ws:// or wss://"),
            ("kind = \"telemetry\"", "kind = \"bulk\"", "telemetry"),
            ("[\"env-sensor\"]", "[]", "device_types"),
            (
                "[tls]",
                "[websocket]\nmax_message_bytes = 1_000_000_000\n[tls]",
                "max_message_bytes",
            ),
            ("ws://127.0.0.1", "wss://127.0.0.1", "backend.ca"),
            (
                "kind = \"telemetry\"",
                "kind = \"telemetry\"\nduplicates = \"never\"",
                "\"takeover\"",
            ),
            (
                "kind = \"telemetry\"",
                "kind = \"telemetry\"\nduplicates = \"allow\"",
                "max_sessions_per_device",
            ),
            (
                "kind = \"telemetry\"",
                "kind = \"telemetry\"\nforward_headers = [\"X_Forwarded_For\"]",
                "never passes on",
            ),
            (
                "[tls]",
                "[session]\nlifetime_jitter_percent = 80\n[tls]",
                "session.lifetime_jitter_percent",
            ),
            (
                "[tls]",
                "[session]\nwrite_timeout_ms = 0\n[tls]",
                "session.write_timeout_ms must be greater than 0",
            ),
            (
                "[tls]",
                "[backend]\neject_base_ms = 10\neject_max_ms = 5\n[tls]",
                "eject_max_ms",
            ),
            (
                "kind = \"telemetry\"",
                "kind = \"control\"\nvalidate = false",
                "validate = false is for telemetry routes",
            ),
        ];
        for (from, to, needle) in cases {
            let text = MINIMAL.replacen(from, to, 1);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }

    #[test]
    fn route_session_timers_override_the_session_section() {
        let text = format!(
            "[session]\nidle_timeout_ms = 5000\nmax_lifetime_ms = 0\n{MINIMAL}\nduplicates = \"reject\"\nforward_headers = [\"User-Agent\"]\n[route.session]\ndevice_ping_interval_ms = 1000\n"
        );
        let c = parse(&text).unwrap();
        let route = c.runtime.routes.iter().next().unwrap();
        let t = route.timers;
        assert_eq!(t.device_ping.interval, Duration::from_secs(1));
        assert_eq!(t.device_ping.timeout, DEFAULT_DEVICE_PING_TIMEOUT);
        assert_eq!(t.backend_ping.interval, DEFAULT_BACKEND_PING_INTERVAL);
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(t.max_lifetime, None);
        assert_eq!(t.write_timeout, DEFAULT_WRITE_TIMEOUT);
        assert_eq!(route.duplicates, DuplicatePolicy::Reject);
        assert!(route.forwards_header("user-agent"));
        // Defaults without any section.
        let d = parse(MINIMAL).unwrap();
        let d = d.runtime.routes.iter().next().unwrap();
        assert_eq!(d.timers.max_lifetime, DEFAULT_MAX_LIFETIME);
        assert_eq!(d.timers.idle_timeout, None);
        assert_eq!(d.duplicates, DuplicatePolicy::Takeover);
        assert!(d.forward_headers.is_empty());
    }

    #[test]
    fn limits_per_device_type_override_the_defaults() {
        let text = format!(
            "{MINIMAL}\n[limits]\nframes_per_second = 20\nbytes_action = \"reject\"\ncommands_in_flight = 16\n[limits.door-lock]\nframes_per_second = 0\nmax_message_bytes = 4096\n"
        );
        let c = parse(&text).unwrap();
        let t = &c.runtime.device_limits;
        let d = t.for_type("env-sensor");
        let frames = d.frames.unwrap();
        assert_eq!((frames.per_second.get(), frames.burst.get()), (20, 200));
        assert_eq!(frames.action, LimitAction::Delay);
        assert_eq!(d.bytes.unwrap().action, LimitAction::Reject);
        assert_eq!(d.commands_in_flight, 16);
        assert_eq!(d.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        let lock = t.for_type("door-lock");
        assert!(lock.frames.is_none(), "0 turns the rate off");
        assert_eq!(lock.max_message_bytes, 4096);
        // Inherited from [limits], not from the built-in defaults.
        assert_eq!(lock.commands_in_flight, 16);
        assert_eq!(lock.bytes.unwrap().action, LimitAction::Reject);

        for (extra, needle) in [
            ("[limits]\nframes_action = \"drop\"", "limits.frames_action"),
            (
                "[limits.door-lock]\nmax_message_bytes = 100000",
                "limits.door-lock.max_message_bytes",
            ),
            ("[limits]\nbytes_burst = 10", "limits.bytes_burst"),
            ("[limits]\nframes_per_secnd = 5", "frames_per_secnd"),
            (
                "[limits.\"Bad Type\"]\nframes_per_second = 5",
                "limits.Bad Type",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn duplicate_subprotocols_are_rejected() {
        let text = format!(
            "{MINIMAL}\n[[route]]\nsubprotocol = \"telemetry.v1\"\nkind = \"telemetry\"\ndevice_types = [\"x\"]\nbackends = [\"ws://127.0.0.1:1/\"]"
        );
        assert!(parse(&text).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn admin_must_be_loopback_and_token_is_masked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "0123456789abcdef0123\n").unwrap();
        let text = format!(
            "{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9000\"\ntoken_file = \"{}\"",
            dir.path().join("t").display()
        );
        assert!(parse(&text).unwrap_err().to_string().contains("loopback"));
        let text = text.replace("0.0.0.0:9000", "127.0.0.1:9000");
        let c = parse(&text).unwrap();
        let admin = c.admin.unwrap();
        assert!(admin.token.matches("0123456789abcdef0123"));
        assert!(!admin.token.matches("0123456789abcdef0124"));
        assert!(!format!("{admin:?}").contains("0123456789"));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example parses and validates (with a token file next to it).
    #[test]
    fn example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let example = include_str!("../../gatehouse.example.toml");
        let path = dir.path().join("gatehouse.toml");
        std::fs::write(&path, example).unwrap();
        std::fs::write(dir.path().join("admin.token"), "0123456789abcdef0123456789").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.runtime.commands.redact, vec!["code".to_string()]);
        assert_eq!(c.runtime.routes.iter().count(), 2);
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(c.max_connections.get(), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            c.runtime.websocket.read_buffer_bytes,
            DEFAULT_READ_BUFFER_BYTES
        );
    }
}
