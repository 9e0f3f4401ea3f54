//! Configuration: the TOML file layer ([`FileConfig`], unknown keys rejected) and the validated
//! layer ([`Config`], real types, every limit explicit). Owns every default, as a named
//! constant with its unit and reason. Does not read certificates or open ports: turning the
//! validated paths into TLS material is `tls`'s job.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod defaults;
pub mod schemas;

pub use defaults::*;

pub use crate::admission::identity::StaleCrlPolicy;
use crate::admission::routing::{FrameRules, Route, RouteTable};
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
    pub registry: FileRegistry,
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
    pub dir: PathBuf,
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
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token)
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
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub signing_key: PathBuf,
    pub public_key: Option<PathBuf>,
    pub command_timeout: Duration,
    pub checkpoint_interval: Duration,
    pub max_payload_bytes: usize,
    /// Field names whose values are replaced before a payload is stored.
    pub redact: Vec<String>,
    pub segment_bytes: u64,
    /// Segments whose newest record is older than this are pruned behind signed anchors.
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct DeadLetterConfig {
    pub per_device: usize,
    pub max_payload_bytes: usize,
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Session worker threads (one single-threaded runtime each).
    pub workers: NonZeroUsize,
    pub schemas_dir: PathBuf,
    pub limits: crate::frames::DecodeLimits,
    pub deadletter: DeadLetterConfig,
    pub audit: Option<AuditConfig>,
    pub listen: SocketAddr,
    pub max_connections: NonZeroUsize,
    pub handshake_timeout: Duration,
    pub max_request_header_bytes: usize,
    pub close_timeout: Duration,
    pub shutdown_grace: Duration,
    pub tls: TlsConfig,
    pub registry_path: PathBuf,
    pub admin: Option<AdminConfig>,
    pub websocket: WebSocketLimits,
    pub backend: BackendConfig,
    pub routes: RouteTable,
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
        Self::from_file(file, base)
    }

    /// Validates a parsed file; `base` is the directory relative paths start from.
    pub fn from_file(file: FileConfig, base: &Path) -> Result<Self, ConfigError> {
        let rel = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let ms = |v: Option<u64>, default: Duration, key: &str| -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(0) => Err(invalid(format!("{key} must be greater than 0"))),
                Some(ms) => Ok(Duration::from_millis(ms)),
            }
        };

        let s = file.server;
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

        let t = file.tls;
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
        let tls = TlsConfig {
            cert: rel(&t.cert),
            key: rel(&t.key),
            client_ca: rel(&t.client_ca),
            crls: t.crl.iter().map(|p| rel(p)).collect(),
            min_version,
            stale_crl,
            crl_refresh: ms(t.crl_refresh_ms, DEFAULT_CRL_REFRESH, "tls.crl_refresh_ms")?,
            session_resumption: t.session_resumption.unwrap_or(true),
        };

        let admin = match file.admin {
            None => None,
            Some(a) => {
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
                let token_path = rel(&a.token_file);
                let token_text = std::fs::read_to_string(&token_path).map_err(|e| {
                    invalid(format!(
                        "admin.token_file {}: {e}; create it with `head -c 32 /dev/urandom | base64 > {}`",
                        token_path.display(),
                        token_path.display()
                    ))
                })?;
                Some(AdminConfig {
                    listen,
                    token: AdminToken::new(&token_text)?,
                })
            }
        };

        let w = file.websocket;
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

        let b = file.backend;
        let client_cert =
            match (b.client_cert, b.client_key) {
                (None, None) => None,
                (Some(c), Some(k)) => Some((rel(&c), rel(&k))),
                _ => return Err(invalid(
                    "backend.client_cert and backend.client_key go together: set both or neither",
                )),
            };
        let backend = BackendConfig {
            connect_timeout: ms(
                b.connect_timeout_ms,
                DEFAULT_BACKEND_CONNECT_TIMEOUT,
                "backend.connect_timeout_ms",
            )?,
            ca: b.ca.as_deref().map(rel),
            client_cert,
        };

        if file.routes.is_empty() {
            return Err(invalid(
                "no [[route]] sections: add at least one, e.g. [[route]] subprotocol = \"telemetry.v1\", kind = \"telemetry\", device_types = [\"env-sensor\"], backends = [\"ws://127.0.0.1:9001/ingest\"]",
            ));
        }
        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        for r in file.routes {
            let rules = FrameRules {
                error_replies: r.error_replies.unwrap_or(DEFAULT_ERROR_REPLIES),
                invalid_frame_limit: r.invalid_frame_limit.unwrap_or(DEFAULT_INVALID_FRAME_LIMIT),
                invalid_frame_window: ms(
                    r.invalid_frame_window_ms,
                    DEFAULT_INVALID_FRAME_WINDOW,
                    "route.invalid_frame_window_ms",
                )?,
            };
            let route = Route::parse(&r.subprotocol, &r.kind, &r.device_types, &r.backends, rules)
                .map_err(|e| invalid(format!("route {:?}: {e}", r.subprotocol)))?;
            if !seen.insert(route.subprotocol.clone()) {
                return Err(invalid(format!(
                    "subprotocol {:?} is routed twice: each subprotocol names one route",
                    r.subprotocol
                )));
            }
            if route.uses_tls() && backend.ca.is_none() {
                return Err(invalid(format!(
                    "route {:?} has a wss:// backend but backend.ca is not set: name the CA bundle that signs the backends' certificates",
                    route.subprotocol
                )));
            }
            routes.push(route);
        }

        let max_depth = file.schemas.max_depth.unwrap_or(DEFAULT_MAX_DEPTH);
        if !(1..=MAX_DEPTH_LIMIT).contains(&max_depth) {
            return Err(invalid(format!(
                "schemas.max_depth must be between 1 and {MAX_DEPTH_LIMIT}"
            )));
        }
        let deadletter = DeadLetterConfig {
            per_device: file
                .deadletter
                .per_device
                .unwrap_or(DEFAULT_DEAD_LETTERS_PER_DEVICE),
            max_payload_bytes: file
                .deadletter
                .max_payload_bytes
                .unwrap_or(DEFAULT_DEAD_LETTER_PAYLOAD_BYTES),
        };
        if !(1..=10_000).contains(&deadletter.per_device) {
            return Err(invalid("deadletter.per_device must be between 1 and 10000"));
        }
        // More than a message can hold would never be used.
        let deadletter = DeadLetterConfig {
            max_payload_bytes: deadletter
                .max_payload_bytes
                .min(websocket.max_message_bytes),
            ..deadletter
        };

        let audit = match file.audit {
            None => None,
            Some(a) => Some(AuditConfig {
                dir: rel(&a.dir),
                signing_key: rel(&a.signing_key),
                public_key: a.public_key.as_deref().map(rel),
                command_timeout: ms(
                    a.command_timeout_ms,
                    DEFAULT_COMMAND_TIMEOUT,
                    "audit.command_timeout_ms",
                )?,
                checkpoint_interval: ms(
                    a.checkpoint_interval_ms,
                    DEFAULT_CHECKPOINT_INTERVAL,
                    "audit.checkpoint_interval_ms",
                )?,
                max_payload_bytes: a.max_payload_bytes.unwrap_or(DEFAULT_AUDIT_PAYLOAD_BYTES),
                redact: a.redact.unwrap_or_default(),
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
            }),
        };

        let workers = match s.workers {
            Some(n) => NonZeroUsize::new(n)
                .filter(|n| n.get() <= 256)
                .ok_or_else(|| invalid("server.workers must be between 1 and 256"))?,
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        };

        Ok(Self {
            workers,
            schemas_dir: rel(file.schemas.dir.as_deref().unwrap_or(Path::new("schemas"))),
            limits: crate::frames::DecodeLimits { max_depth },
            deadletter,
            audit,
            listen,
            max_connections,
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
            tls,
            registry_path: rel(&file.registry.path),
            admin,
            websocket,
            backend,
            routes: RouteTable::new(routes),
        })
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
        assert_eq!(c.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(c.websocket.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(c.tls.cert, PathBuf::from("/etc/gatehouse/server.pem"));
        assert_eq!(c.tls.min_version, MinTlsVersion::Tls13);
        assert_eq!(c.tls.stale_crl, StaleCrlPolicy::Refuse);
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
        ];
        for (from, to, needle) in cases {
            let text = MINIMAL.replacen(from, to, 1);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{to}: {err}");
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
        assert_eq!(c.audit.as_ref().unwrap().redact, vec!["code".to_string()]);
        assert_eq!(c.routes.iter().count(), 2);
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(c.max_connections.get(), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.websocket.read_buffer_bytes, DEFAULT_READ_BUFFER_BYTES);
    }
}
