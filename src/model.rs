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

/// Which devices a listing shows, one page at a time (ordered by id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceQuery {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// `key=value`: devices carrying that label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Only devices whose id sorts after this one (the previous page's `next_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Devices per page: 1 to [`DeviceQuery::MAX_LIMIT`], default [`DeviceQuery::DEFAULT_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// One page of a device listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePage {
    pub devices: Vec<Device>,
    /// Give this as `after` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

impl DeviceQuery {
    pub const DEFAULT_LIMIT: usize = 1000;
    pub const MAX_LIMIT: usize = 10_000;

    fn label_pair(&self) -> Result<Option<(&str, &str)>, String> {
        match &self.label {
            None => Ok(None),
            Some(l) => l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(Some)
                .ok_or_else(|| format!("label {l:?}: give it as key=value")),
        }
    }

    /// The page of `devices` (any order) this query selects.
    pub fn page<'a>(
        &self,
        devices: impl IntoIterator<Item = &'a Device>,
    ) -> Result<DevicePage, String> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(format!(
                "limit {limit}: must be between 1 and {}",
                Self::MAX_LIMIT
            ));
        }
        let label = self.label_pair()?;
        let mut selected: Vec<&Device> = devices
            .into_iter()
            .filter(|d| self.after.as_deref().is_none_or(|a| d.id.as_str() > a))
            .filter(|d| {
                self.device_type
                    .as_deref()
                    .is_none_or(|t| d.device_type == t)
            })
            .filter(|d| self.status.is_none_or(|s| d.status == s))
            .filter(|d| label.is_none_or(|(k, v)| d.labels.get(k).is_some_and(|x| x == v)))
            .collect();
        selected.sort_by(|a, b| a.id.cmp(&b.id));
        let more = selected.len() > limit;
        selected.truncate(limit);
        Ok(DevicePage {
            next_after: if more {
                selected.last().map(|d| d.id.clone())
            } else {
                None
            },
            devices: selected.into_iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, t: &str, status: DeviceStatus, site: &str) -> Device {
        Device {
            id: id.into(),
            device_type: t.into(),
            status,
            fingerprints: vec![],
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            labels: [("site".to_string(), site.to_string())].into(),
        }
    }

    fn ids(page: &DevicePage) -> Vec<&str> {
        page.devices.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn a_listing_filters_and_pages_in_id_order() {
        let all = [
            device("c", "lock", DeviceStatus::Active, "north"),
            device("a", "sensor", DeviceStatus::Active, "north"),
            device("d", "sensor", DeviceStatus::Suspended, "south"),
            device("b", "sensor", DeviceStatus::Active, "south"),
        ];
        let q = |f: fn(&mut DeviceQuery)| {
            let mut q = DeviceQuery::default();
            f(&mut q);
            q.page(&all).unwrap()
        };
        assert_eq!(ids(&q(|_| {})), ["a", "b", "c", "d"]);
        assert_eq!(
            ids(&q(|q| q.device_type = Some("sensor".into()))),
            ["a", "b", "d"]
        );
        assert_eq!(ids(&q(|q| q.status = Some(DeviceStatus::Suspended))), ["d"]);
        assert_eq!(ids(&q(|q| q.label = Some("site=north".into()))), ["a", "c"]);
        let first = q(|q| q.limit = Some(2));
        assert_eq!(
            (ids(&first), first.next_after.as_deref()),
            (vec!["a", "b"], Some("b"))
        );
        let rest = q(|q| {
            q.limit = Some(2);
            q.after = Some("b".into());
        });
        assert_eq!(
            (ids(&rest), rest.next_after.as_deref()),
            (vec!["c", "d"], None)
        );
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        let none: [Device; 0] = [];
        let mut q = DeviceQuery {
            limit: Some(0),
            ..Default::default()
        };
        assert!(q.page(&none).unwrap_err().contains("limit 0"));
        q.limit = Some(DeviceQuery::MAX_LIMIT + 1);
        assert!(q.page(&none).is_err());
        q.limit = None;
        q.label = Some("no-equals".into());
        assert!(q.page(&none).unwrap_err().contains("key=value"));
    }
}
