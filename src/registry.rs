//! The device registry: the authority for each device's type and status, stored in sled.
//! Opens the gateway's sled database (the dead-letter store keeps its own tree in it). Reads on the handshake path come from an in-memory
//! index (never the disk); writes go to sled (flushed) first and then to the index, so a
//! change is visible to the next handshake without a restart. Writes are blocking calls: async
//! callers run them on the blocking pool.
//!
//! sled allows one process per database: while the gateway runs, other processes change the
//! registry through the admin API (`admin`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use time::OffsetDateTime;

use crate::identity::Fingerprint;

const DEVICES_TREE: &str = "devices.v1";
const FINGERPRINTS_TREE: &str = "fingerprints.v1";
/// Most labels per device, and longest label key and value: records stay small.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 128;
/// A locked database is retried this many times, this far apart (1 s in all), before it is
/// reported as in use by another process.
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {0} is in use by another process (a running gateway?): use the admin API, or stop that process")]
    Locked(PathBuf),
    #[error("cannot open registry {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("registry storage error: {0}")]
    Storage(#[from] sled::Error),
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

#[derive(Default)]
struct Index {
    devices: HashMap<String, Arc<Device>>,
    by_fingerprint: HashMap<Fingerprint, Arc<Device>>,
}

impl Index {
    fn put(&mut self, device: Device) {
        let device = Arc::new(device);
        for fp in &device.fingerprints {
            if let Some(fp) = Fingerprint::parse_hex(fp) {
                self.by_fingerprint.insert(fp, device.clone());
            }
        }
        self.devices.insert(device.id.clone(), device);
    }
}

/// The registry: sled for durability, an in-memory index for lookups.
pub struct Registry {
    path: PathBuf,
    db: sled::Db,
    devices: sled::Tree,
    fingerprints: sled::Tree,
    index: RwLock<Index>,
    /// Serialises writers so that sled and the index change in the same order.
    writer: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .finish()
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if labels.len() > MAX_LABELS {
        return Err(RegistryError::Invalid(format!(
            "at most {MAX_LABELS} labels per device"
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES {
            return Err(RegistryError::Invalid(format!(
                "label {k:?}: keys must be 1-{MAX_LABEL_BYTES} bytes and values at most {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Registry {
    /// Opens (or creates) the registry at `path` and loads the index.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        // sled releases its file lock from a background thread shortly after the last handle
        // is dropped; a process that just closed the database may need a moment.
        let mut attempts = 0;
        let db = loop {
            match Self::open_db(path) {
                Err(RegistryError::Locked(_)) if attempts < LOCK_RETRIES => {
                    attempts += 1;
                    std::thread::sleep(LOCK_RETRY_PAUSE);
                }
                other => break other?,
            }
        };
        let devices = db.open_tree(DEVICES_TREE)?;
        let fingerprints = db.open_tree(FINGERPRINTS_TREE)?;
        let mut index = Index::default();
        for item in devices.iter() {
            let (key, value) = item?;
            let device: Device =
                serde_json::from_slice(&value).map_err(|e| RegistryError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: e.to_string(),
                })?;
            index.put(device);
        }
        Ok(Self {
            path: path.to_path_buf(),
            db,
            devices,
            fingerprints,
            index: RwLock::new(index),
            writer: Mutex::new(()),
        })
    }

    fn open_db(path: &Path) -> Result<sled::Db, RegistryError> {
        sled::Config::new()
            .path(path)
            // The registry is small and read-mostly; a modest cache is plenty.
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    RegistryError::Locked(path.to_path_buf())
                }
                _ => RegistryError::Open {
                    path: path.to_path_buf(),
                    source,
                },
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database, for the other trees stored with the registry (dead letters).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The hot path: the device a certificate fingerprint is enrolled for. In memory only.
    pub fn lookup(&self, fingerprint: &Fingerprint) -> Option<Arc<Device>> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.by_fingerprint.get(fingerprint).cloned()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.devices.get(id).cloned()
    }

    /// Every device, sorted by id.
    pub fn list(&self) -> Vec<Arc<Device>> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = index.devices.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enrolls one certificate. See [`Registry::enroll_many`].
    pub fn enroll(&self, enrollment: Enrollment) -> Result<Device, RegistryError> {
        let mut out = self.enroll_many(vec![enrollment])?;
        out.pop()
            .ok_or_else(|| RegistryError::Invalid("empty enrollment".into()))
    }

    /// Enrolls certificates, all or nothing: a new device is created active; an existing one
    /// (same type) gains the certificate. Labels given replace labels of the same key.
    pub fn enroll_many(&self, enrollments: Vec<Enrollment>) -> Result<Vec<Device>, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let now = now();
        // Validate everything against the index and within the batch before writing.
        let mut pending: BTreeMap<String, Device> = BTreeMap::new();
        let mut claimed: HashMap<Fingerprint, String> = HashMap::new();
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            for e in &enrollments {
                gatehouse_pki::validate_device_id(&e.id)
                    .map_err(|err| RegistryError::Invalid(err.to_string()))?;
                gatehouse_pki::validate_device_type(&e.device_type)
                    .map_err(|err| RegistryError::Invalid(err.to_string()))?;
                validate_labels(&e.labels)?;
                let fp = Fingerprint::parse_hex(&e.sha256).ok_or_else(|| {
                    RegistryError::Invalid(format!(
                        "{:?} is not a SHA-256 fingerprint (64 hex digits)",
                        e.sha256
                    ))
                })?;
                let owner = claimed
                    .get(&fp)
                    .cloned()
                    .or_else(|| index.by_fingerprint.get(&fp).map(|d| d.id.clone()));
                if let Some(owner) = owner {
                    if owner != e.id {
                        return Err(RegistryError::FingerprintInUse {
                            sha256: fp.to_string(),
                            other: owner,
                        });
                    }
                }
                claimed.insert(fp, e.id.clone());
                let device = match pending.remove(&e.id) {
                    Some(d) => d,
                    None => match index.devices.get(&e.id) {
                        Some(d) => (**d).clone(),
                        None => Device {
                            id: e.id.clone(),
                            device_type: e.device_type.clone(),
                            status: DeviceStatus::Active,
                            fingerprints: Vec::new(),
                            created_at: now,
                            updated_at: now,
                            labels: BTreeMap::new(),
                        },
                    },
                };
                if device.device_type != e.device_type {
                    return Err(RegistryError::TypeMismatch {
                        id: e.id.clone(),
                        enrolled: device.device_type,
                        requested: e.device_type.clone(),
                    });
                }
                if device.status == DeviceStatus::Revoked {
                    return Err(RegistryError::RevokedIsFinal(e.id.clone()));
                }
                let mut device = device;
                let hex = fp.to_string();
                if !device.fingerprints.contains(&hex) {
                    device.fingerprints.push(hex);
                }
                device.labels.extend(e.labels.clone());
                device.updated_at = now;
                validate_labels(&device.labels)?;
                pending.insert(e.id.clone(), device);
            }
        }
        let devices: Vec<Device> = pending.into_values().collect();
        self.write(&devices)?;
        Ok(devices)
    }

    /// Sets a device's status. Revocation is final.
    pub fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut device = self
            .get(id)
            .map(|d| (*d).clone())
            .ok_or_else(|| RegistryError::UnknownDevice(id.to_string()))?;
        if device.status == DeviceStatus::Revoked && status != DeviceStatus::Revoked {
            return Err(RegistryError::RevokedIsFinal(id.to_string()));
        }
        device.status = status;
        device.updated_at = now();
        self.write(std::slice::from_ref(&device))?;
        Ok(device)
    }

    /// Writes records to sled in one transaction, flushes, then updates the index.
    fn write(&self, devices: &[Device]) -> Result<(), RegistryError> {
        let encoded: Vec<(String, Vec<u8>, Vec<String>)> = devices
            .iter()
            .map(|d| {
                serde_json::to_vec(d)
                    .map(|bytes| (d.id.clone(), bytes, d.fingerprints.clone()))
                    .map_err(|e| RegistryError::Corrupt {
                        key: d.id.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        (&self.devices, &self.fingerprints)
            .transaction(|(devices, fingerprints)| {
                for (id, bytes, fps) in &encoded {
                    devices.insert(id.as_bytes(), bytes.as_slice())?;
                    for fp in fps {
                        fingerprints.insert(fp.as_bytes(), id.as_bytes())?;
                    }
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(s) => RegistryError::Storage(s),
                TransactionError::Abort(()) => {
                    RegistryError::Invalid("registry transaction aborted".into())
                }
            })?;
        self.db.flush()?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for d in devices {
            index.put(d.clone());
        }
        Ok(())
    }

    /// Flushes sled to disk.
    pub fn flush(&self) -> Result<(), RegistryError> {
        self.db.flush()?;
        Ok(())
    }

    /// Whether the ids in this registry are a subset of `ids` (used by tests and tools).
    pub fn ids(&self) -> HashSet<String> {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> String {
        hex::encode([n; 32])
    }

    fn enroll(id: &str, t: &str, sha: String) -> Enrollment {
        Enrollment {
            id: id.into(),
            device_type: t.into(),
            sha256: sha,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn enroll_lookup_status_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg");
        {
            let reg = Registry::open(&path).unwrap();
            reg.enroll(enroll("d1", "sensor", fp(1))).unwrap();
            // Rotation: a second certificate for the same device.
            let d = reg.enroll(enroll("d1", "sensor", fp(2))).unwrap();
            assert_eq!(d.fingerprints.len(), 2);
            let f2 = Fingerprint::parse_hex(&fp(2)).unwrap();
            assert_eq!(reg.lookup(&f2).unwrap().id, "d1");
            reg.set_status("d1", DeviceStatus::Suspended).unwrap();
            assert_eq!(reg.lookup(&f2).unwrap().status, DeviceStatus::Suspended);
            assert!(matches!(
                Registry::open(&path),
                Err(RegistryError::Locked(_))
            ));
        }
        let reg = Registry::open(&path).unwrap();
        let d = reg.get("d1").unwrap();
        assert_eq!(d.status, DeviceStatus::Suspended);
        assert_eq!(d.fingerprints, vec![fp(1), fp(2)]);
    }

    #[test]
    fn bad_enrollments_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("reg")).unwrap();
        reg.enroll(enroll("d1", "sensor", fp(1))).unwrap();
        let cases = vec![
            vec![enroll("d2", "sensor", fp(1))],
            vec![enroll("d1", "lock", fp(3))],
            vec![
                enroll("ok", "sensor", fp(4)),
                enroll("bad id", "sensor", fp(5)),
            ],
            vec![enroll("d3", "sensor", "abc".into())],
            vec![enroll("d4", "sensor", fp(6)), enroll("d5", "sensor", fp(6))],
        ];
        for batch in cases {
            assert!(reg.enroll_many(batch.clone()).is_err(), "{batch:?}");
        }
        assert_eq!(reg.ids(), HashSet::from(["d1".to_string()]));
        assert!(reg
            .lookup(&Fingerprint::parse_hex(&fp(4)).unwrap())
            .is_none());
    }

    #[test]
    fn revocation_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("reg")).unwrap();
        reg.enroll(enroll("d1", "sensor", fp(1))).unwrap();
        reg.set_status("d1", DeviceStatus::Revoked).unwrap();
        assert!(matches!(
            reg.set_status("d1", DeviceStatus::Active),
            Err(RegistryError::RevokedIsFinal(_))
        ));
        assert!(reg.enroll(enroll("d1", "sensor", fp(2))).is_err());
        assert!(matches!(
            reg.set_status("nope", DeviceStatus::Active),
            Err(RegistryError::UnknownDevice(_))
        ));
    }
}
