//! `[cluster]`: several gateways sharing their stores through NATS JetStream. Without it the
//! embedded stores (sled, audit segment files) are used.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::defaults::*;
use super::{invalid, ConfigError, Section};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub servers: Vec<String>,
    pub name: Option<String>,
    pub replicas: Option<usize>,
    pub prefix: Option<String>,
    pub max_staleness_ms: Option<u64>,
    pub ownership_ttl_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub credentials: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`, `tls://host:port`).
    pub servers: Vec<String>,
    /// This gateway's name in ownership entries and logs; unique among running gateways.
    pub name: String,
    pub replicas: usize,
    pub prefix: String,
    pub max_staleness: Duration,
    pub ownership_ttl: Duration,
    pub timeout: Duration,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub credentials: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for NATS servers that ask for one.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl ClusterConfig {
    /// `{prefix}-{what}`: a bucket or stream name.
    pub fn name_of(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The default gateway name: the host name and the process id, unique among processes.
fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    let mut name = format!("{host}-{}", std::process::id());
    name.truncate(64);
    name
}

fn ms(v: Option<u64>, default: Duration, key: &str) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(0) => Err(invalid(format!("cluster.{key} must be more than 0"))),
        Some(n) => Ok(Duration::from_millis(n)),
    }
}

impl TryFrom<Section<'_, FileCluster>> for ClusterConfig {
    type Error = ConfigError;

    fn try_from(section: Section<'_, FileCluster>) -> Result<Self, ConfigError> {
        let c = &section.file;
        if c.servers.is_empty() {
            return Err(invalid(
                "cluster.servers is empty: list the NATS servers, e.g. [\"nats://127.0.0.1:4222\"]",
            ));
        }
        for s in &c.servers {
            let scheme_ok = ["nats://", "tls://"].iter().any(|p| s.starts_with(p));
            if !scheme_ok || s.parse::<async_nats::ServerAddr>().is_err() {
                return Err(invalid(format!(
                    "cluster.servers: {s:?} is not a NATS URL: write nats://HOST:PORT or tls://HOST:PORT"
                )));
            }
        }
        let name = match &c.name {
            Some(n) if is_token(n) => n.clone(),
            Some(n) => {
                return Err(invalid(format!(
                    "cluster.name = {n:?}: use 1-64 letters, digits, '-' or '_'"
                )))
            }
            None => default_name(),
        };
        let prefix = c
            .prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_CLUSTER_PREFIX.into());
        if !is_token(&prefix) || prefix.len() > 32 {
            return Err(invalid(format!(
                "cluster.prefix = {prefix:?}: use 1-32 letters, digits, '-' or '_'"
            )));
        }
        let replicas = c.replicas.unwrap_or(DEFAULT_CLUSTER_REPLICAS);
        if !(1..=5).contains(&replicas) {
            return Err(invalid(format!(
                "cluster.replicas = {replicas}: JetStream keeps 1 to 5 replicas"
            )));
        }
        let ownership_ttl = ms(
            c.ownership_ttl_ms,
            DEFAULT_CLUSTER_OWNERSHIP_TTL,
            "ownership_ttl_ms",
        )?;
        if ownership_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "cluster.ownership_ttl_ms must be at least 1000: owners refresh every third of it",
            ));
        }
        let tls_client = match (&c.tls_cert, &c.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((section.path(cert), section.path(key))),
            _ => {
                return Err(invalid(
                    "cluster.tls_cert and cluster.tls_key go together: give both, or neither",
                ))
            }
        };
        Ok(ClusterConfig {
            servers: c.servers.clone(),
            name,
            replicas,
            prefix,
            max_staleness: ms(
                c.max_staleness_ms,
                DEFAULT_CLUSTER_MAX_STALENESS,
                "max_staleness_ms",
            )?,
            ownership_ttl,
            timeout: ms(c.timeout_ms, DEFAULT_CLUSTER_TIMEOUT, "timeout_ms")?,
            credentials: c.credentials.as_ref().map(|p| section.path(p)),
            tls_ca: c.tls_ca.as_ref().map(|p| section.path(p)),
            tls_client,
        })
    }
}
