//! Storage behind traits: [`DeviceStore`] (the registry: device records, the in-memory
//! lookup index and its change feed) and [`DeadLetterStore`] (the bounded per-device store
//! of rejected frames), with the embedded sled implementations as the default. Nothing
//! outside this folder (and the audit writer, which keeps its own segment files) names
//! sled, so a replicated store is a second implementation of these traits, not a rewrite of
//! the sessions. Deciding what a record means is the core's job (`model`, `admission`).

pub mod deadletter;
pub mod index;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::model::{Device, DeviceChange, DeviceStatus, Enrollment, Fingerprint};

pub use deadletter::{letter, DeadLetter, DeadLetterSink, SledDeadLetters};
pub use index::Index;
pub use registry::SledRegistry;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {0} is in use by another process (a running gateway?): use the admin API, or stop that process")]
    Locked(PathBuf),
    #[error("cannot open registry {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("registry storage error: {0}")]
    Storage(String),
    #[error("registry record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    #[error("device {id:?} is enrolled as type {enrolled:?}, not {requested:?}: a device keeps its type")]
    TypeMismatch {
        id: String,
        enrolled: String,
        requested: String,
    },
    #[error("certificate {sha256} is already enrolled for device {other:?}")]
    FingerprintInUse { sha256: String, other: String },
    #[error("device {0:?} is revoked; revocation is final, enroll the device under a new id")]
    RevokedIsFinal(String),
    /// The replicated store cannot be reached (or did not answer in time): nothing changed.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

impl RegistryError {
    /// Whether the caller's input was at fault (as opposed to storage).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            RegistryError::Invalid(_)
                | RegistryError::UnknownDevice(_)
                | RegistryError::TypeMismatch { .. }
                | RegistryError::FingerprintInUse { .. }
                | RegistryError::RevokedIsFinal(_)
        )
    }
}

/// The device registry. Reads are in memory and never block; writes are durable before they
/// return and are blocking calls (async callers use the blocking pool).
pub trait DeviceStore: Send + Sync + std::fmt::Debug {
    /// The hot path: the device a certificate fingerprint is enrolled for.
    fn lookup(&self, fingerprint: &Fingerprint) -> Option<Arc<Device>>;
    fn get(&self, id: &str) -> Option<Arc<Device>>;
    /// Every device, sorted by id.
    fn list(&self) -> Vec<Arc<Device>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Enrolls one certificate. See [`DeviceStore::enroll_many`].
    fn enroll(&self, enrollment: Enrollment) -> Result<Device, RegistryError> {
        let mut out = self.enroll_many(vec![enrollment])?;
        out.pop()
            .ok_or_else(|| RegistryError::Invalid("empty enrollment".into()))
    }
    /// Enrolls certificates, all or nothing (see [`Index::plan_enrollments`]).
    fn enroll_many(&self, enrollments: Vec<Enrollment>) -> Result<Vec<Device>, RegistryError>;
    /// Sets a device's status. Revocation is final.
    fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, RegistryError>;
    /// Removes one enrolled certificate (by SHA-256) from a device; sessions on it end.
    fn remove_certificate(&self, id: &str, sha256: &str) -> Result<Device, RegistryError>;
    /// Makes every write durable (at shutdown).
    fn flush(&self) -> Result<(), RegistryError>;
    /// Every change from now on: a device's status or certificates changed.
    fn subscribe(&self) -> broadcast::Receiver<DeviceChange>;
    /// How long the index may have been missing changes made elsewhere: `None` when it is
    /// known current (always, for an embedded store), the length of the outage otherwise.
    fn stale_for(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Rejected frames, the last N per device. Blocking calls.
pub trait DeadLetterStore: Send + Sync + std::fmt::Debug {
    /// Stores one rejected frame, dropping the device's oldest beyond the bound.
    fn record(&self, letter: DeadLetter) -> Result<(), RegistryError>;
    /// The device's rejected frames, oldest first.
    fn list(&self, device: &str) -> Result<Vec<DeadLetter>, RegistryError>;
    /// The number of frames stored since the store was opened.
    fn stored(&self) -> watch::Receiver<u64>;
}

/// A boxed future, for the async parts of the store traits.
pub type StoreFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Ends a live session of this gateway: (device, connection, why); whether it was live.
pub type EndSession = Arc<dyn Fn(&str, &str, crate::wire::Ending) -> bool + Send + Sync>;

/// Who holds a device's sessions on a route across gateways (the cluster store; a single
/// gateway needs none: its session table is the whole truth).
pub trait SessionOwnership: Send + Sync + std::fmt::Debug {
    /// At admission: a claim for the newcomer, or the route's duplicate policy's refusal
    /// counted across gateways.
    fn admit<'a>(
        &'a self,
        device: &'a str,
        route: &'a str,
        policy: crate::admission::routing::DuplicatePolicy,
        connection: &'a str,
    ) -> StoreFuture<'a, Result<Box<dyn OwnershipClaim>, crate::wire::Refusal>>;
}

/// One session's claim; dropping it releases the session's place.
pub trait OwnershipClaim: Send + Sync {
    /// At the upgrade: under `takeover` the session becomes the only holder everywhere.
    fn upgraded(&self, policy: crate::admission::routing::DuplicatePolicy) -> StoreFuture<'_, ()>;
}

/// The embedded single-node storage: registry and dead letters in one sled database.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub devices: Arc<SledRegistry>,
    pub dead_letters: Arc<SledDeadLetters>,
}

impl Embedded {
    pub fn open(
        path: &std::path::Path,
        dead_letters_per_device: usize,
    ) -> Result<Self, RegistryError> {
        let devices = Arc::new(SledRegistry::open(path)?);
        let dead_letters = Arc::new(devices.dead_letters(dead_letters_per_device)?);
        Ok(Self {
            devices,
            dead_letters,
        })
    }
}
