//! The embedded device registry: [`DeviceStore`] on sled. Tree `devices.v1` holds one JSON
//! record per device; the in-memory [`Index`] built from it at open serves every read, so
//! the handshake path never touches the disk. A write goes to sled in one transaction, is
//! flushed, and only then enters the index (and its change feed), so the next handshake
//! sees it without a restart. Writes are blocking calls: async callers run them on the
//! blocking pool. The same database holds the dead-letter tree ([`SledDeadLetters`]).
//!
//! sled allows one process per database: while the gateway runs, other processes change the
//! registry through the admin API (`admin`).
//!
//! [`SledDeadLetters`]: super::deadletter::SledDeadLetters

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::index::Index;
use super::{DeviceStore, RegistryError};
use crate::model::{Device, DeviceChange, DeviceStatus, Enrollment, Fingerprint};

const DEVICES_TREE: &str = "devices.v1";
/// Written by earlier versions and never read (the index is built from `devices.v1`):
/// dropped when the database is opened.
const LEGACY_FINGERPRINTS_TREE: &str = "fingerprints.v1";
/// The registry is small and read-mostly: 64 MiB of sled page cache is plenty.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// A locked database is retried this many times, this far apart (1 s in all), before it is
/// reported as in use by another process.
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

fn storage(e: sled::Error) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// The registry: sled for durability, an in-memory index for lookups.
pub struct SledRegistry {
    path: PathBuf,
    db: sled::Db,
    devices: sled::Tree,
    index: Index,
    /// Serialises writers so that sled and the index change in the same order.
    writer: Mutex<()>,
}

impl std::fmt::Debug for SledRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledRegistry")
            .field("path", &self.path)
            .finish()
    }
}

impl SledRegistry {
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
        if db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == LEGACY_FINGERPRINTS_TREE.as_bytes())
        {
            db.drop_tree(LEGACY_FINGERPRINTS_TREE).map_err(storage)?;
        }
        let devices = db.open_tree(DEVICES_TREE).map_err(storage)?;
        let mut loaded = Vec::new();
        for item in devices.iter() {
            let (key, value) = item.map_err(storage)?;
            let device: Device =
                serde_json::from_slice(&value).map_err(|e| RegistryError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: e.to_string(),
                })?;
            loaded.push(device);
        }
        Ok(Self {
            path: path.to_path_buf(),
            db,
            devices,
            index: Index::load(loaded),
            writer: Mutex::new(()),
        })
    }

    fn open_db(path: &Path) -> Result<sled::Db, RegistryError> {
        sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
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
                    reason: source.to_string(),
                },
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dead-letter store kept in the same database.
    pub fn dead_letters(
        &self,
        per_device: usize,
    ) -> Result<super::deadletter::SledDeadLetters, RegistryError> {
        super::deadletter::SledDeadLetters::open(&self.db, per_device)
    }

    /// Writes records to sled in one transaction, flushes, then updates the index.
    fn write(&self, devices: &[Device]) -> Result<(), RegistryError> {
        let encoded: Vec<(String, Vec<u8>)> = devices
            .iter()
            .map(|d| {
                serde_json::to_vec(d)
                    .map(|bytes| (d.id.clone(), bytes))
                    .map_err(|e| RegistryError::Corrupt {
                        key: d.id.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        self.devices
            .transaction(|tree| {
                for (id, bytes) in &encoded {
                    tree.insert(id.as_bytes(), bytes.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(s) => storage(s),
                TransactionError::Abort(()) => {
                    RegistryError::Invalid("registry transaction aborted".into())
                }
            })?;
        self.db.flush().map_err(storage)?;
        self.index.apply(devices);
        Ok(())
    }
}

impl DeviceStore for SledRegistry {
    fn lookup(&self, fingerprint: &Fingerprint) -> Option<Arc<Device>> {
        self.index.lookup(fingerprint)
    }

    fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.index.get(id)
    }

    fn list(&self) -> Vec<Arc<Device>> {
        self.index.list()
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn enroll_many(&self, enrollments: Vec<Enrollment>) -> Result<Vec<Device>, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let devices = self
            .index
            .plan_enrollments(&enrollments, OffsetDateTime::now_utc())?;
        self.write(&devices)?;
        Ok(devices)
    }

    fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let device = self
            .index
            .plan_status(id, status, OffsetDateTime::now_utc())?;
        self.write(std::slice::from_ref(&device))?;
        Ok(device)
    }

    fn remove_certificate(&self, id: &str, sha256: &str) -> Result<Device, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let device = self
            .index
            .plan_remove_certificate(id, sha256, OffsetDateTime::now_utc())?;
        self.write(std::slice::from_ref(&device))?;
        Ok(device)
    }

    fn flush(&self) -> Result<(), RegistryError> {
        self.db.flush().map_err(storage)?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceChange> {
        self.index.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

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
            let reg = SledRegistry::open(&path).unwrap();
            reg.enroll(enroll("d1", "sensor", fp(1))).unwrap();
            // Rotation: a second certificate for the same device.
            let d = reg.enroll(enroll("d1", "sensor", fp(2))).unwrap();
            assert_eq!(d.fingerprints.len(), 2);
            let f2 = Fingerprint::parse_hex(&fp(2)).unwrap();
            assert_eq!(reg.lookup(&f2).unwrap().id, "d1");
            reg.set_status("d1", DeviceStatus::Suspended).unwrap();
            assert_eq!(reg.lookup(&f2).unwrap().status, DeviceStatus::Suspended);
            assert!(matches!(
                SledRegistry::open(&path),
                Err(RegistryError::Locked(_))
            ));
        }
        let reg = SledRegistry::open(&path).unwrap();
        let d = reg.get("d1").unwrap();
        assert_eq!(d.status, DeviceStatus::Suspended);
        assert_eq!(d.fingerprints, vec![fp(1), fp(2)]);
    }

    #[test]
    fn bad_enrollments_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SledRegistry::open(&dir.path().join("reg")).unwrap();
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
        let ids: HashSet<String> = reg.list().iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, HashSet::from(["d1".to_string()]));
        assert!(reg
            .lookup(&Fingerprint::parse_hex(&fp(4)).unwrap())
            .is_none());
    }

    #[test]
    fn revocation_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SledRegistry::open(&dir.path().join("reg")).unwrap();
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
