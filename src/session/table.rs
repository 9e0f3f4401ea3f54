//! The session table: every live session, with what the operator and the policies need to
//! find it (device, type, route, backend, connection id, peer, certificate fingerprint and
//! serial, start, frames and bytes each way) and a [`SessionHandle`] to end it from outside
//! with a reason or to give it new timers. Revocation (registry change feed, CRL reloads),
//! duplicate policies, kicks, reloads, drain and the admin API all go through this one table.
//!
//! A session enters the table when it is admitted, before its backend is connected, so that
//! the duplicate policy counts handshakes in flight too; it is listed once upgraded, and
//! removed when its [`Registration`] is dropped, however it ends. No lock is held across an
//! await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admission::identity::RevocationIndex;
use crate::admission::routing::{DuplicatePolicy, RouteTable};
use crate::model::{DeviceChange, DeviceStatus, SessionTimers};
use crate::policy::limits::{DeviceLimits, LimitTable};
use crate::wire::{Ending, Refusal};

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
    /// The certificate's serial number, lower-case hex.
    pub cert_serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started: time::OffsetDateTime,
    pub frames_up: u64,
    pub bytes_up: u64,
    pub frames_down: u64,
    pub bytes_down: u64,
}

/// Which sessions a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub device: Option<String>,
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    pub route: Option<String>,
}

impl Filter {
    pub fn device(id: &str) -> Self {
        Self {
            device: Some(id.to_string()),
            ..Self::default()
        }
    }

    fn matches(&self, s: &Admitted) -> bool {
        self.device.as_deref().is_none_or(|d| s.device == d)
            && self
                .device_type
                .as_deref()
                .is_none_or(|t| s.device_type == t)
            && self.route.as_deref().is_none_or(|r| s.route == r)
    }
}

/// Frames and payload bytes relayed so far, each way; the relay adds, the table reads.
#[derive(Debug, Default)]
pub struct Counters {
    pub frames_up: AtomicU64,
    pub bytes_up: AtomicU64,
    pub frames_down: AtomicU64,
    pub bytes_down: AtomicU64,
}

#[derive(Debug)]
struct HandleInner {
    token: CancellationToken,
    why: Mutex<Option<Ending>>,
    /// New timers and limits from a reload, taken by the relay when `retimed` wakes it.
    timers: Mutex<Option<SessionTimers>>,
    limits: Mutex<Option<DeviceLimits>>,
    retimed: Notify,
    /// Largest message the session may relay from now on (a reload may lower it).
    max_message: std::sync::atomic::AtomicUsize,
    counters: Counters,
}

/// How the outside reaches one session: a token the relay watches with the reason it reads,
/// new timers after a reload, and the session's counters.
#[derive(Debug, Clone)]
pub struct SessionHandle(Arc<HandleInner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SessionHandle {
    /// A handle that also fires when `parent` (shutdown) does.
    pub fn child_of(parent: &CancellationToken) -> Self {
        Self(Arc::new(HandleInner {
            token: parent.child_token(),
            why: Mutex::new(None),
            timers: Mutex::new(None),
            limits: Mutex::new(None),
            retimed: Notify::new(),
            max_message: std::sync::atomic::AtomicUsize::new(usize::MAX),
            counters: Counters::default(),
        }))
    }

    /// Sets the largest message the session relays; a larger one closes it with 1009.
    pub fn set_max_message(&self, bytes: usize) {
        self.0.max_message.store(bytes, Ordering::Relaxed);
    }

    pub fn max_message(&self) -> usize {
        self.0.max_message.load(Ordering::Relaxed)
    }

    pub fn token(&self) -> &CancellationToken {
        &self.0.token
    }

    /// Why the session was ended from outside; `None` when it was shutdown.
    pub fn why(&self) -> Option<Ending> {
        lock(&self.0.why).clone()
    }

    /// Ends the session with `why`; the first reason given stays.
    pub fn end(&self, why: Ending) {
        lock(&self.0.why).get_or_insert(why);
        self.0.token.cancel();
    }

    pub fn is_ended(&self) -> bool {
        self.0.token.is_cancelled()
    }

    /// Gives the session new timers; its relay applies them at once.
    pub fn retime(&self, timers: SessionTimers) {
        *lock(&self.0.timers) = Some(timers);
        self.0.retimed.notify_one();
    }

    /// Resolves when new timers were given (see [`SessionHandle::take_timers`]).
    pub async fn retimed(&self) {
        self.0.retimed.notified().await
    }

    pub fn take_timers(&self) -> Option<SessionTimers> {
        lock(&self.0.timers).take()
    }

    /// Gives the session its device type's new limits; its relay applies them at once.
    pub fn relimit(&self, limits: DeviceLimits) {
        *lock(&self.0.limits) = Some(limits);
        self.0.retimed.notify_one();
    }

    pub fn take_limits(&self) -> Option<DeviceLimits> {
        lock(&self.0.limits).take()
    }

    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }
}

/// What the table knows of an admitted session.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub connection: String,
    pub device: String,
    pub device_type: String,
    pub route: String,
    pub peer: String,
    pub cert_sha256: String,
    /// Issuer name (DER) and serial, to match CRL entries.
    pub cert_issuer: Vec<u8>,
    pub cert_serial: Vec<u8>,
    pub started: time::OffsetDateTime,
}

struct Entry {
    info: Admitted,
    /// Set once upgraded; listed from then on.
    backend: Option<String>,
    handle: SessionHandle,
}

impl Entry {
    fn view(&self) -> Option<LiveSession> {
        let backend = self.backend.clone()?;
        let c = self.handle.counters();
        let i = &self.info;
        Some(LiveSession {
            connection: i.connection.clone(),
            device: i.device.clone(),
            device_type: i.device_type.clone(),
            route: i.route.clone(),
            backend,
            peer: i.peer.clone(),
            cert_sha256: i.cert_sha256.clone(),
            cert_serial: hex::encode(&i.cert_serial),
            started: i.started,
            frames_up: c.frames_up.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            frames_down: c.frames_down.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        })
    }
}

/// What a registry record means for a session on certificate `cert_sha256`: `None` while
/// the device is active and still has that certificate.
pub fn registry_ending(device: &crate::model::Device, cert_sha256: &str) -> Option<Ending> {
    match device.status {
        DeviceStatus::Suspended => Some(Ending::DeviceSuspended),
        DeviceStatus::Revoked => Some(Ending::DeviceRevoked),
        DeviceStatus::Active if !device.fingerprints.iter().any(|f| f == cert_sha256) => {
            Some(Ending::CertificateRemoved)
        }
        DeviceStatus::Active => None,
    }
}

/// Every session past admission, by device (most lookups are a device's), then connection.
#[derive(Default)]
pub struct SessionTable {
    devices: Mutex<HashMap<String, Vec<Entry>>>,
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
    device: String,
    route: String,
    policy: DuplicatePolicy,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut devices = lock(&self.table.devices);
        if let Some(entries) = devices.get_mut(&self.device) {
            entries.retain(|e| e.info.connection != self.connection);
            if entries.is_empty() {
                devices.remove(&self.device);
            }
        }
    }
}

impl Registration {
    /// The session is upgraded to `backend`: it is listed from now on, and under `takeover`
    /// every other session of the device on the route ends. Returns those taken over.
    pub fn upgraded(&self, backend: &str) -> Vec<String> {
        let mut devices = lock(&self.table.devices);
        let Some(entries) = devices.get_mut(&self.device) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        for e in entries.iter_mut() {
            if e.info.connection == self.connection {
                e.backend = Some(backend.to_string());
            } else if self.policy == DuplicatePolicy::Takeover && e.info.route == self.route {
                e.handle.end(Ending::TakenOver(self.connection.clone()));
                taken.push(e.info.connection.clone());
            }
        }
        taken.sort();
        taken
    }
}

impl SessionTable {
    /// Adds an admitted session if the route's duplicate policy lets it in; otherwise the
    /// refusal (409) for the device.
    pub fn admit(
        self: &Arc<Self>,
        info: Admitted,
        policy: DuplicatePolicy,
        per_device: usize,
        handle: SessionHandle,
    ) -> Result<Registration, Refusal> {
        let mut devices = lock(&self.devices);
        let entries = devices.entry(info.device.clone()).or_default();
        let open = entries
            .iter()
            .filter(|e| e.info.route == info.route)
            .count();
        // Sessions a takeover will end do not count against the device's own limit.
        let staying = match policy {
            DuplicatePolicy::Takeover => entries.len() - open,
            _ => entries.len(),
        };
        if staying >= per_device {
            return Err(Refusal::TooManySessions { limit: per_device });
        }
        let allowed = match policy {
            DuplicatePolicy::Takeover => usize::MAX,
            DuplicatePolicy::Reject => 1,
            DuplicatePolicy::Allow(n) => n,
        };
        if open >= allowed {
            return Err(Refusal::SessionOpen { open, allowed });
        }
        let registration = Registration {
            table: self.clone(),
            connection: info.connection.clone(),
            device: info.device.clone(),
            route: info.route.clone(),
            policy,
        };
        entries.push(Entry {
            info,
            backend: None,
            handle,
        });
        Ok(registration)
    }

    /// Sessions past admission, listed or not.
    pub fn len(&self) -> usize {
        lock(&self.devices).values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.devices).is_empty()
    }

    /// Runs `f` over the entries `filter` could select.
    fn each(&self, filter: &Filter, mut f: impl FnMut(&Entry)) {
        let devices = lock(&self.devices);
        let matching = |e: &&Entry| filter.matches(&e.info);
        match &filter.device {
            Some(d) => devices
                .get(d)
                .into_iter()
                .flatten()
                .filter(matching)
                .for_each(&mut f),
            None => devices.values().flatten().filter(matching).for_each(&mut f),
        }
    }

    /// Upgraded sessions that `filter` selects, by connection id.
    pub fn list(&self, filter: &Filter) -> Vec<LiveSession> {
        let mut out = Vec::new();
        self.each(filter, |e| out.extend(e.view()));
        out.sort_by(|a, b| a.connection.cmp(&b.connection));
        out
    }

    /// Ends the sessions `filter` selects for which `pick` gives a reason. Returns how many.
    fn end_where(&self, filter: &Filter, pick: impl Fn(&Admitted) -> Option<Ending>) -> usize {
        let mut ended = 0;
        self.each(filter, |e| {
            if let Some(why) = pick(&e.info) {
                e.handle.end(why);
                ended += 1;
            }
        });
        ended
    }

    /// Ends what a registry change makes inadmissible: every session of a device that is no
    /// longer active, and sessions on a certificate the device no longer has.
    pub fn apply(&self, change: &DeviceChange) -> usize {
        let device = &change.device;
        self.end_where(&Filter::device(&device.id), |s| {
            registry_ending(device, &s.cert_sha256)
        })
    }

    /// Ends the sessions whose certificate the CRLs now list.
    pub fn apply_crls(&self, crls: &RevocationIndex) -> usize {
        self.end_where(&Filter::default(), |s| {
            crls.lists(&s.cert_issuer, &s.cert_serial)
                .then_some(Ending::CertificateRevoked)
        })
    }

    /// Ends `device`'s sessions (all of them, or one connection) on an operator's word.
    pub fn kick(&self, device: &str, connection: Option<&str>, reason: &str) -> usize {
        self.end_where(&Filter::device(device), |s| {
            connection
                .is_none_or(|c| s.connection == c)
                .then(|| Ending::Kicked(reason.to_string()))
        })
    }

    /// Ends one session of `device` (by connection id) with `why`; whether it was live here.
    pub fn end_connection(&self, device: &str, connection: &str, why: Ending) -> bool {
        self.end_where(&Filter::device(device), |s| {
            (s.connection == connection).then(|| why.clone())
        }) > 0
    }

    /// Applies a reloaded route table and message limit: sessions whose route is gone, or no
    /// longer takes their device type, end; the others get their route's new timers and the
    /// new limit (a larger one than the session started with cannot apply: the WebSocket
    /// layer's own limit was fixed at its upgrade).
    pub fn reconfigure(
        &self,
        routes: &RouteTable,
        max_message_bytes: usize,
        limits: &LimitTable,
    ) -> usize {
        let mut ended = 0;
        self.each(&Filter::default(), |e| {
            match routes.iter().find(|r| r.subprotocol == e.info.route) {
                Some(route) if route.allows(&e.info.device_type) => {
                    e.handle.set_max_message(max_message_bytes);
                    e.handle.relimit(*limits.for_type(&e.info.device_type));
                    e.handle.retime(route.timers)
                }
                _ => {
                    e.handle.end(Ending::RouteRemoved);
                    ended += 1;
                }
            }
        });
        ended
    }

    /// Every session's handle, oldest first (for drain).
    pub fn handles(&self) -> Vec<SessionHandle> {
        let mut all = Vec::new();
        self.each(&Filter::default(), |e| {
            all.push((e.info.started, e.info.connection.clone(), e.handle.clone()))
        });
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        all.into_iter().map(|(_, _, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Device;

    fn admitted(conn: &str, device: &str, sha: &str) -> Admitted {
        Admitted {
            connection: conn.into(),
            device: device.into(),
            device_type: "door-lock".into(),
            route: "control.v1".into(),
            peer: "127.0.0.1:1".into(),
            cert_sha256: sha.into(),
            cert_issuer: b"ca".to_vec(),
            cert_serial: vec![1, 2],
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

    fn open(
        table: &Arc<SessionTable>,
        shutdown: &CancellationToken,
        a: Admitted,
        policy: DuplicatePolicy,
    ) -> Result<(Registration, SessionHandle), Refusal> {
        let h = SessionHandle::child_of(shutdown);
        let r = table.admit(a, policy, 100, h.clone())?;
        Ok((r, h))
    }

    #[test]
    fn registry_changes_end_the_sessions_they_concern() {
        let table = Arc::new(SessionTable::default());
        let shutdown = CancellationToken::new();
        let any = DuplicatePolicy::Allow(10);
        let (ra, a) = open(&table, &shutdown, admitted("c1", "lock-1", "aa"), any).unwrap();
        let (rb, b) = open(&table, &shutdown, admitted("c2", "lock-1", "bb"), any).unwrap();
        let (rc, c) = open(&table, &shutdown, admitted("c3", "lock-2", "cc"), any).unwrap();
        // Listed once upgraded.
        assert!(table.list(&Filter::device("lock-1")).is_empty());
        for r in [&ra, &rb, &rc] {
            assert!(r.upgraded("ws://b/").is_empty());
        }
        assert_eq!(table.list(&Filter::device("lock-1")).len(), 2);
        // Rotation: lock-1 keeps only certificate aa; the session on bb ends.
        assert_eq!(
            table.apply(&change("lock-1", DeviceStatus::Active, &["aa"])),
            1
        );
        assert!(!a.is_ended());
        assert_eq!(b.why(), Some(Ending::CertificateRemoved));
        assert_eq!(
            table.apply(&change("lock-1", DeviceStatus::Suspended, &["aa"])),
            2
        );
        assert_eq!(a.why(), Some(Ending::DeviceSuspended));
        // The first reason stays.
        assert_eq!(b.why(), Some(Ending::CertificateRemoved));
        assert!(!c.is_ended());
        drop(rc);
        assert!(table.list(&Filter::device("lock-2")).is_empty());
        // Shutdown reaches every handle, with no reason of its own.
        shutdown.cancel();
        assert!(c.is_ended() && c.why().is_none());
        drop((ra, rb));
        assert!(table.is_empty());
    }

    #[test]
    fn duplicate_policies() {
        let table = Arc::new(SessionTable::default());
        let shutdown = CancellationToken::new();
        // reject: a second session of the device on the route is refused with 409 ...
        let (r1, h1) = open(
            &table,
            &shutdown,
            admitted("c1", "lock-1", "aa"),
            DuplicatePolicy::Reject,
        )
        .unwrap();
        let refused = open(
            &table,
            &shutdown,
            admitted("c2", "lock-1", "aa"),
            DuplicatePolicy::Reject,
        )
        .err()
        .unwrap();
        assert_eq!(refused.status(), 409);
        // ... but another device, or another route, is not a duplicate.
        let mut other_route = admitted("c3", "lock-1", "aa");
        other_route.route = "telemetry.v1".into();
        let (_r3, _) = open(&table, &shutdown, other_route, DuplicatePolicy::Reject).unwrap();
        drop(r1);
        // allow 2: two at once, the third refused.
        let allow = DuplicatePolicy::Allow(2);
        let (_r4, _) = open(&table, &shutdown, admitted("c4", "lock-1", "aa"), allow).unwrap();
        let (_r5, _) = open(&table, &shutdown, admitted("c5", "lock-1", "aa"), allow).unwrap();
        assert_eq!(
            open(&table, &shutdown, admitted("c6", "lock-1", "aa"), allow).err(),
            Some(Refusal::SessionOpen {
                open: 2,
                allowed: 2
            })
        );
        // takeover: the newcomer, once upgraded, ends the older sessions on its route.
        let take = DuplicatePolicy::Takeover;
        let (r7, h7) = open(&table, &shutdown, admitted("c7", "lock-1", "aa"), take).unwrap();
        assert_eq!(r7.upgraded("ws://b/"), vec!["c4", "c5"]);
        assert!(!h7.is_ended() && !h1.is_ended());
        assert_eq!(
            table
                .list(&Filter {
                    route: Some("telemetry.v1".into()),
                    ..Filter::default()
                })
                .len(),
            0,
            "c3 was never upgraded"
        );
    }

    #[test]
    fn sessions_per_device_count_across_routes() {
        let table = Arc::new(SessionTable::default());
        let shutdown = CancellationToken::new();
        let on = |conn: &str, route: &str| {
            let mut a = admitted(conn, "lock-1", "aa");
            a.route = route.into();
            a
        };
        let h = || SessionHandle::child_of(&shutdown);
        let any = DuplicatePolicy::Allow(10);
        let _a = table.admit(on("c1", "r1"), any, 2, h()).unwrap();
        let _b = table.admit(on("c2", "r2"), any, 2, h()).unwrap();
        assert_eq!(
            table.admit(on("c3", "r3"), any, 2, h()).err(),
            Some(Refusal::TooManySessions { limit: 2 })
        );
        // A takeover on r1 replaces c1: it stays within the limit.
        assert!(table
            .admit(on("c4", "r1"), DuplicatePolicy::Takeover, 2, h())
            .is_ok());
    }

    #[test]
    fn kicks_and_reloads() {
        let table = Arc::new(SessionTable::default());
        let shutdown = CancellationToken::new();
        let any = DuplicatePolicy::Allow(10);
        let (_r1, h1) = open(&table, &shutdown, admitted("c1", "lock-1", "aa"), any).unwrap();
        let (_r2, h2) = open(&table, &shutdown, admitted("c2", "lock-1", "aa"), any).unwrap();
        assert_eq!(table.kick("lock-1", Some("c2"), "maintenance"), 1);
        assert_eq!(h2.why(), Some(Ending::Kicked("maintenance".into())));
        assert!(!h1.is_ended());
        assert_eq!(table.kick("lock-9", None, ""), 0);
        // A route table without control.v1 ends the session.
        assert_eq!(
            table.reconfigure(
                &RouteTable::new(Vec::new()),
                1024,
                &LimitTable {
                    defaults: crate::policy::limits::tests::limits(
                        crate::policy::limits::LimitAction::Delay
                    ),
                    per_type: Default::default(),
                }
            ),
            2
        );
        assert_eq!(h1.why(), Some(Ending::RouteRemoved));
    }
}
