//! The shared vocabulary, pure: what a device is (id, type, status, enrolled certificate
//! fingerprints), an enrollment request, and what changed about a device (the registry's
//! change feed). Every layer imports these; this module imports none of them. Storing
//! devices is `storage`'s job, deciding admission is `admission`'s.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// SHA-256 of a certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    pub fn parse_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        let text: String = text.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Self(out))
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// One leg's liveness settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingRules {
    /// Silence on the leg after which the gateway pings it.
    pub interval: Duration,
    /// Time the leg has to answer (any frame counts) before the session ends.
    pub timeout: Duration,
}

/// A session's timer settings (a route's, with the global defaults filled in).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionTimers {
    pub device_ping: PingRules,
    pub backend_ping: PingRules,
    /// No data frame either way for this long ends the session; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Longest session; `None`: no limit.
    pub max_lifetime: Option<Duration>,
    /// Share of `max_lifetime` taken off at random per session, so that a fleet that
    /// connected together does not reconnect together (0.1: between 90% and 100%).
    pub lifetime_jitter: f64,
    /// Time a leg may accept no bytes while data waits for it.
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    Active,
    Suspended,
    Revoked,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Suspended => "suspended",
            DeviceStatus::Revoked => "revoked",
        }
    }
}

/// One device record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    #[serde(rename = "type")]
    pub device_type: String,
    pub status: DeviceStatus,
    /// Lower-case hex SHA-256 of each enrolled certificate; several during a rotation.
    pub fingerprints: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A request to enroll one certificate for a device (new, or an additional certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub id: String,
    #[serde(rename = "type")]
    pub device_type: String,
    /// Lower-case hex SHA-256 of the certificate DER.
    pub sha256: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What changed about one device, as published by the registry's change feed. Sessions
/// listen to it to end connections that a change makes inadmissible; a replicated store
/// publishes the same events for changes made elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChange {
    /// The device as it is now.
    pub device: std::sync::Arc<Device>,
    /// Fingerprints the device had before the change and no longer has.
    pub removed_fingerprints: Vec<String>,
}

/// What a route carries; later layers pick the schema by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Telemetry,
    Control,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Telemetry => "telemetry",
            RouteKind::Control => "control",
        }
    }
}
