//! The session table: every live session, with what the operator and the policies need to
//! find it (device, type, route, backend, connection id, peer, certificate) and a handle to
//! end it from outside with a reason. The registry's change feed ends sessions through it;
//! the admin API lists it. A session registers after its upgrade and is removed when its
//! registration is dropped, however the session ends. No lock is held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::model::DeviceChange;
use crate::model::DeviceStatus;
use crate::wire::Ending;

/// A live session as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSession {
    pub connection: String,
    pub device: String,
    #[serde(rename = "type")]
    pub device_type: String,
    pub route: String,
    pub backend: String,
    pub peer: String,
    pub cert_sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started: time::OffsetDateTime,
}

/// How the table ends one session: a token the relay watches and the reason it reads.
#[derive(Debug, Clone)]
pub struct EndHandle {
    token: CancellationToken,
    why: Arc<Mutex<Option<Ending>>>,
}

impl EndHandle {
    /// A handle that also fires when `parent` (shutdown) does.
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            why: Arc::new(Mutex::new(None)),
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why the session was ended from outside; `None` when it was shutdown.
    pub fn why(&self) -> Option<Ending> {
        *self.why.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self, why: Ending) {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        self.token.cancel();
    }
}

struct Entry {
    info: LiveSession,
    end: EndHandle,
}

/// Every live session, by connection id.
#[derive(Default)]
pub struct SessionTable {
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("sessions", &self.len())
            .finish()
    }
}

/// A session's place in the table; dropping it removes the session.
pub struct Registration {
    table: Arc<SessionTable>,
    connection: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.connection);
    }
}

impl SessionTable {
    /// Adds a live session; it stays until the registration is dropped.
    pub fn register(self: &Arc<Self>, info: LiveSession, end: EndHandle) -> Registration {
        let connection = info.connection.clone();
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(connection.clone(), Entry { info, end });
        Registration {
            table: self.clone(),
            connection,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live sessions, by connection id; only `device`'s when given.
    pub fn list(&self, device: Option<&str>) -> Vec<LiveSession> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LiveSession> = entries
            .values()
            .filter(|e| device.is_none_or(|d| e.info.device == d))
            .map(|e| e.info.clone())
            .collect();
        out.sort_by(|a, b| a.connection.cmp(&b.connection));
        out
    }

    /// Ends the sessions `pick` selects, each with the reason it returns. Returns how many.
    fn end_where(&self, pick: impl Fn(&LiveSession) -> Option<Ending>) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut ended = 0;
        for e in entries.values() {
            if let Some(why) = pick(&e.info) {
                e.end.end(why);
                ended += 1;
            }
        }
        ended
    }

    /// Ends what a registry change makes inadmissible: every session of a device that is no
    /// longer active, and sessions on a certificate the device no longer has.
    pub fn apply(&self, change: &DeviceChange) -> usize {
        let device = &change.device;
        self.end_where(|s| {
            if s.device != device.id {
                return None;
            }
            match device.status {
                DeviceStatus::Suspended => Some(Ending::DeviceSuspended),
                DeviceStatus::Revoked => Some(Ending::DeviceRevoked),
                DeviceStatus::Active if !device.fingerprints.contains(&s.cert_sha256) => {
                    Some(Ending::CertificateRemoved)
                }
                DeviceStatus::Active => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Device;

    fn session(conn: &str, device: &str, sha: &str) -> LiveSession {
        LiveSession {
            connection: conn.into(),
            device: device.into(),
            device_type: "door-lock".into(),
            route: "control.v1".into(),
            backend: "ws://b/".into(),
            peer: "127.0.0.1:1".into(),
            cert_sha256: sha.into(),
            started: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn change(id: &str, status: DeviceStatus, fingerprints: &[&str]) -> DeviceChange {
        let t = time::OffsetDateTime::UNIX_EPOCH;
        DeviceChange {
            device: Arc::new(Device {
                id: id.into(),
                device_type: "door-lock".into(),
                status,
                fingerprints: fingerprints.iter().map(|f| f.to_string()).collect(),
                created_at: t,
                updated_at: t,
                labels: Default::default(),
            }),
            removed_fingerprints: Vec::new(),
        }
    }

    #[test]
    fn registry_changes_end_the_sessions_they_concern() {
        let table = Arc::new(SessionTable::default());
        let shutdown = CancellationToken::new();
        let (a, b, c) = (
            EndHandle::child_of(&shutdown),
            EndHandle::child_of(&shutdown),
            EndHandle::child_of(&shutdown),
        );
        let _ra = table.register(session("c1", "lock-1", "aa"), a.clone());
        let _rb = table.register(session("c2", "lock-1", "bb"), b.clone());
        let rc = table.register(session("c3", "lock-2", "cc"), c.clone());
        assert_eq!(table.list(Some("lock-1")).len(), 2);
        // Rotation: lock-1 keeps only certificate aa; the session on bb ends.
        assert_eq!(
            table.apply(&change("lock-1", DeviceStatus::Active, &["aa"])),
            1
        );
        assert!(!a.token().is_cancelled());
        assert_eq!(b.why(), Some(Ending::CertificateRemoved));
        assert_eq!(
            table.apply(&change("lock-1", DeviceStatus::Suspended, &["aa"])),
            2
        );
        assert!(a.token().is_cancelled());
        assert_eq!(a.why(), Some(Ending::DeviceSuspended));
        // The first reason stays.
        assert_eq!(b.why(), Some(Ending::CertificateRemoved));
        assert!(!c.token().is_cancelled());
        drop(rc);
        assert!(table.list(Some("lock-2")).is_empty());
        // Shutdown reaches every handle, with no reason of its own.
        shutdown.cancel();
        assert!(c.token().is_cancelled() && c.why().is_none());
    }
}
