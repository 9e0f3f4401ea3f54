//! The registry's in-memory index and its change feed, shared by every [`DeviceStore`]
//! implementation: lookups by id and by certificate fingerprint (the handshake path never
//! touches a disk), the registry rules that decide what an enrollment or a status change
//! turns into (checked against the index before anything is written), and the broadcast of
//! each applied change. A store writes durably first and then calls [`Index::apply`].
//!
//! [`DeviceStore`]: super::DeviceStore

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::RegistryError;
use crate::model::{Device, DeviceChange, DeviceStatus, Enrollment, Fingerprint};

/// Most labels per device, and longest label key and value: records stay small.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 128;
/// Changes buffered per change-feed subscriber; one that falls further behind is told it
/// lagged and re-reads the devices it cares about: 4096.
pub const CHANGE_FEED_CAPACITY: usize = 4096;

#[derive(Default)]
struct Maps {
    devices: HashMap<String, Arc<Device>>,
    by_fingerprint: HashMap<Fingerprint, Arc<Device>>,
}

/// Devices by id and by fingerprint, and the change feed.
pub struct Index {
    maps: RwLock<Maps>,
    changes: broadcast::Sender<DeviceChange>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("devices", &self.len())
            .finish()
    }
}

impl Default for Index {
    fn default() -> Self {
        Self {
            maps: RwLock::default(),
            changes: broadcast::Sender::new(CHANGE_FEED_CAPACITY),
        }
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

impl Index {
    /// An index holding `devices` (loaded from storage); publishes nothing.
    pub fn load(devices: impl IntoIterator<Item = Device>) -> Self {
        let index = Self::default();
        {
            let mut maps = index.write();
            for d in devices {
                put(&mut maps, d);
            }
        }
        index
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, fingerprint: &Fingerprint) -> Option<Arc<Device>> {
        self.read().by_fingerprint.get(fingerprint).cloned()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.read().devices.get(id).cloned()
    }

    /// Every device, sorted by id.
    pub fn list(&self) -> Vec<Arc<Device>> {
        let mut all: Vec<_> = self.read().devices.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn len(&self) -> usize {
        self.read().devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver of every change applied from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceChange> {
        self.changes.subscribe()
    }

    /// What `enrollments` turn into, all or nothing: a new device is created active; an
    /// existing one (same type) gains the certificate. Labels given replace labels of the
    /// same key. Nothing changes until the caller stores the result and applies it.
    pub fn plan_enrollments(
        &self,
        enrollments: &[Enrollment],
        now: OffsetDateTime,
    ) -> Result<Vec<Device>, RegistryError> {
        let maps = self.read();
        let mut pending: BTreeMap<String, Device> = BTreeMap::new();
        let mut claimed: HashMap<Fingerprint, String> = HashMap::new();
        for e in enrollments {
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
                .or_else(|| maps.by_fingerprint.get(&fp).map(|d| d.id.clone()));
            if let Some(owner) = owner {
                if owner != e.id {
                    return Err(RegistryError::FingerprintInUse {
                        sha256: fp.to_string(),
                        other: owner,
                    });
                }
            }
            claimed.insert(fp, e.id.clone());
            let mut device = match pending.remove(&e.id) {
                Some(d) => d,
                None => match maps.devices.get(&e.id) {
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
            let hex = fp.to_string();
            if !device.fingerprints.contains(&hex) {
                device.fingerprints.push(hex);
            }
            device.labels.extend(e.labels.clone());
            device.updated_at = now;
            validate_labels(&device.labels)?;
            pending.insert(e.id.clone(), device);
        }
        Ok(pending.into_values().collect())
    }

    /// What removing certificate `sha256` from `id` turns it into. Its last certificate can
    /// be removed: the device stays, with no certificate to connect with.
    pub fn plan_remove_certificate(
        &self,
        id: &str,
        sha256: &str,
        now: OffsetDateTime,
    ) -> Result<Device, RegistryError> {
        let fp = Fingerprint::parse_hex(sha256).ok_or_else(|| {
            RegistryError::Invalid(format!(
                "{sha256:?} is not a SHA-256 fingerprint (64 hex digits)"
            ))
        })?;
        let hex = fp.to_string();
        let mut device = self
            .get(id)
            .map(|d| (*d).clone())
            .ok_or_else(|| RegistryError::UnknownDevice(id.to_string()))?;
        let before = device.fingerprints.len();
        device.fingerprints.retain(|f| *f != hex);
        if device.fingerprints.len() == before {
            return Err(RegistryError::Invalid(format!(
                "device {id} has no certificate with sha256 {hex}"
            )));
        }
        device.updated_at = now;
        Ok(device)
    }

    /// What setting `id`'s status turns it into. Revocation is final.
    pub fn plan_status(
        &self,
        id: &str,
        status: DeviceStatus,
        now: OffsetDateTime,
    ) -> Result<Device, RegistryError> {
        let mut device = self
            .get(id)
            .map(|d| (*d).clone())
            .ok_or_else(|| RegistryError::UnknownDevice(id.to_string()))?;
        if device.status == DeviceStatus::Revoked && status != DeviceStatus::Revoked {
            return Err(RegistryError::RevokedIsFinal(id.to_string()));
        }
        device.status = status;
        device.updated_at = now;
        Ok(device)
    }

    /// Puts stored devices into the index and publishes each change. Also the path for
    /// changes a replicated store learns about from elsewhere.
    pub fn apply(&self, devices: &[Device]) {
        let mut changes = Vec::with_capacity(devices.len());
        {
            let mut maps = self.write();
            for d in devices {
                let removed_fingerprints = match maps.devices.get(&d.id) {
                    Some(old) => old
                        .fingerprints
                        .iter()
                        .filter(|f| !d.fingerprints.contains(f))
                        .cloned()
                        .collect(),
                    None => Vec::new(),
                };
                for fp in &removed_fingerprints {
                    if let Some(fp) = Fingerprint::parse_hex(fp) {
                        maps.by_fingerprint.remove(&fp);
                    }
                }
                let device = put(&mut maps, d.clone());
                changes.push(DeviceChange {
                    device,
                    removed_fingerprints,
                });
            }
        }
        for change in changes {
            // No subscriber is fine: nobody needs to hear about it.
            let _ = self.changes.send(change);
        }
    }
}

fn put(maps: &mut Maps, device: Device) -> Arc<Device> {
    let device = Arc::new(device);
    for fp in &device.fingerprints {
        if let Some(fp) = Fingerprint::parse_hex(fp) {
            maps.by_fingerprint.insert(fp, device.clone());
        }
    }
    maps.devices.insert(device.id.clone(), device.clone());
    device
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_changes_reach_subscribers() {
        let index = Index::default();
        let mut feed = index.subscribe();
        let now = OffsetDateTime::now_utc();
        let enrolled = index
            .plan_enrollments(
                &[Enrollment {
                    id: "d1".into(),
                    device_type: "sensor".into(),
                    sha256: hex::encode([1u8; 32]),
                    labels: BTreeMap::new(),
                }],
                now,
            )
            .unwrap();
        index.apply(&enrolled);
        let change = feed.try_recv().unwrap();
        assert_eq!(
            (change.device.id.as_str(), change.device.status),
            ("d1", DeviceStatus::Active)
        );
        let suspended = index
            .plan_status("d1", DeviceStatus::Suspended, now)
            .unwrap();
        // Planned, not applied: nothing changed yet.
        assert!(feed.try_recv().is_err());
        assert_eq!(index.get("d1").unwrap().status, DeviceStatus::Active);
        index.apply(&[suspended]);
        assert_eq!(
            feed.try_recv().unwrap().device.status,
            DeviceStatus::Suspended
        );
    }
}
