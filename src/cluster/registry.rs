//! The cluster registry: [`DeviceStore`] on two JetStream key-value buckets.
//!
//! - `{prefix}-devices`: one JSON [`Device`] per key (the device id). Every write is a
//!   compare-and-set on the key's revision (`create` for a new device, `update` with the
//!   revision this gateway last saw otherwise), so two gateways changing one device never
//!   lose each other's change: the loser reads the winner's record and plans again.
//! - `{prefix}-fingerprints`: one claim per certificate fingerprint naming its device,
//!   created before the device record names the certificate, so two gateways can never
//!   enroll one certificate for two devices. A claim whose device no longer lists the
//!   certificate (a removal whose claim delete was lost) is stale and taken over.
//!
//! Every gateway keeps the whole registry in its in-memory [`Index`] (the handshake never
//! waits on the network) and follows the devices bucket's watch: a change written through
//! any gateway reaches every index, and the index's change feed closes the sessions it makes
//! inadmissible, as with the embedded store. Revisions make the watch and this gateway's own
//! writes commute: an entry older than what the index holds is skipped.
//!
//! Writes are blocking calls, like the sled store's: they run the NATS requests on the
//! runtime the registry was opened on and wait (callers are on the blocking pool).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{Cluster, ClusterError, Link};
use crate::model::{Device, DeviceChange, DeviceStatus, Enrollment, Fingerprint};
use crate::storage::{DeviceStore, Index, RegistryError};

/// A write that lost a compare-and-set race is planned again this many times.
const WRITE_ATTEMPTS: usize = 8;
/// A certificate claim younger than this is never taken over as stale (server time; the
/// margin covers clock differences between gateways and NATS).
const CLAIM_GRACE: time::Duration = time::Duration::seconds(30);
/// Pause before a broken watch is opened again.
const WATCH_RETRY: Duration = Duration::from_millis(500);

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("NATS: {e}"))
}

/// Revisions of the records the index holds, per device id.
type Revisions = Arc<Mutex<HashMap<String, u64>>>;

pub struct NatsRegistry {
    devices: kv::Store,
    claims: kv::Store,
    index: Arc<Index>,
    revisions: Revisions,
    runtime: tokio::runtime::Handle,
    link: Link,
    /// Whether the watch is following the bucket (false between a failure and its retry).
    watching: Arc<std::sync::atomic::AtomicBool>,
    /// Serialises this gateway's writers (other gateways are handled by compare-and-set).
    writer: Mutex<()>,
    timeout: Duration,
}

impl std::fmt::Debug for NatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRegistry")
            .field("devices", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// The outcome of one attempt at a write.
enum Attempt<T> {
    Done(T),
    /// Another gateway wrote first; the index now has its record: plan again.
    Raced,
}

impl NatsRegistry {
    /// Opens (creating if needed) the buckets, loads every device into the index from the
    /// bucket's watch, and keeps following it until `shutdown`.
    pub async fn open(
        cluster: &Cluster,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Self, ClusterError> {
        let devices = cluster
            .bucket(
                "devices",
                kv::Config {
                    description: "gatehouse device registry: one JSON record per device id".into(),
                    history: 5,
                    ..Default::default()
                },
            )
            .await?;
        let claims = cluster
            .bucket(
                "fingerprints",
                kv::Config {
                    description: "gatehouse certificate claims: SHA-256 -> device id".into(),
                    history: 1,
                    ..Default::default()
                },
            )
            .await?;
        let index = Arc::new(Index::default());
        let revisions: Revisions = Arc::default();
        let watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stored = devices
            .status()
            .await
            .map_err(|e| ClusterError::Nats(format!("devices bucket: {e}")))?
            .values();
        let mut watch = devices
            .watch_with_history(">")
            .await
            .map_err(|e| ClusterError::Nats(format!("watching the devices bucket: {e}")))?;
        // The initial values, up to the entry the watch marks as current.
        let mut last = 0;
        if stored > 0 {
            while let Some(entry) = tokio::time::timeout(cluster.config.timeout, watch.next())
                .await
                .map_err(|_| ClusterError::Nats("loading the registry timed out".into()))?
            {
                let entry = entry.map_err(|e| ClusterError::Nats(e.to_string()))?;
                last = last.max(entry.revision);
                let current = entry.seen_current;
                apply_entry(&index, &revisions, entry);
                if current {
                    break;
                }
            }
        }
        watching.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(devices = index.len(), "cluster registry loaded");
        tokio::spawn(follow(
            devices.clone(),
            watch,
            last,
            index.clone(),
            revisions.clone(),
            watching.clone(),
            shutdown,
        ));
        Ok(Self {
            devices,
            claims,
            index,
            revisions,
            runtime: tokio::runtime::Handle::current(),
            link: cluster.link.clone(),
            watching,
            writer: Mutex::new(()),
            timeout: cluster.config.timeout,
        })
    }

    fn revision(&self, id: &str) -> Option<u64> {
        self.revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// Runs `f` on the registry's runtime and waits for it, bounded by the request timeout.
    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        self.run_for(self.timeout * 2, f)
    }

    /// [`Self::run`] with its own bound (a batch of writes gets one per hundred records).
    fn run_for<T>(
        &self,
        bound: Duration,
        f: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        super::block_on(&self.runtime, bound, f, |t| {
            unavailable(format!("no answer in {} ms", t.as_millis()))
        })
    }

    /// Reads `id`'s current record into the index (after a lost compare-and-set).
    async fn refresh(&self, id: &str) -> Result<(), RegistryError> {
        if let Some(entry) = self.devices.entry(id).await.map_err(unavailable)? {
            apply_entry(&self.index, &self.revisions, entry);
        }
        Ok(())
    }

    /// Writes one record with compare-and-set against the revision the index holds.
    async fn put(&self, device: &Device) -> Result<Attempt<u64>, RegistryError> {
        let bytes: bytes::Bytes = serde_json::to_vec(device)
            .map_err(|e| RegistryError::Corrupt {
                key: device.id.clone(),
                reason: e.to_string(),
            })?
            .into();
        let written = match self.revision(&device.id) {
            None => self
                .devices
                .create(&device.id, bytes)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(unavailable(e)),
                }),
            Some(rev) => self
                .devices
                .update(&device.id, bytes, rev)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(unavailable(e)),
                }),
        };
        match written {
            Ok(rev) => Ok(Attempt::Done(rev)),
            Err(None) => {
                self.refresh(&device.id).await?;
                Ok(Attempt::Raced)
            }
            Err(Some(e)) => Err(e),
        }
    }

    /// Claims `fp` for `id`: created, already ours, or a stale claim taken over.
    async fn claim(&self, fp: &str, id: &str) -> Result<Attempt<bool>, RegistryError> {
        match self.claims.create(fp, id.to_string().into()).await {
            Ok(_) => return Ok(Attempt::Done(true)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(e)),
        }
        let Some(entry) = self.claims.entry(fp).await.map_err(unavailable)? else {
            return Ok(Attempt::Raced);
        };
        let owner = String::from_utf8_lossy(&entry.value).into_owned();
        if entry.operation != kv::Operation::Put {
            // A deleted claim: take it.
        } else if owner == id {
            return Ok(Attempt::Done(false));
        } else {
            self.refresh(&owner).await?;
            let holds = self
                .index
                .get(&owner)
                .is_some_and(|d| d.fingerprints.iter().any(|f| f == fp));
            // A claim whose device does not hold the certificate is stale (its enrollment
            // failed, or the device dropped it) unless it is recent: then that enrollment
            // may be between its claim and its record, and taking it over would give one
            // certificate to two devices.
            let age = time::OffsetDateTime::now_utc() - entry.created;
            if holds || age < CLAIM_GRACE {
                return Err(RegistryError::FingerprintInUse {
                    sha256: fp.to_string(),
                    other: owner,
                });
            }
            tracing::info!(sha256 = %fp, stale_owner = %owner, device.id = %id, "taking over a stale certificate claim");
        }
        match self
            .claims
            .update(fp, id.to_string().into(), entry.revision)
            .await
        {
            Ok(_) => Ok(Attempt::Done(true)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Attempt::Raced),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Writes planned records (claims first), applying each to the index as it is
    /// acknowledged. `Raced` when another gateway changed one of them first.
    async fn write(&self, planned: &[Device]) -> Result<Attempt<()>, RegistryError> {
        let mut claimed: Vec<String> = Vec::new();
        for d in planned {
            let held: Vec<String> = self
                .index
                .get(&d.id)
                .map(|old| old.fingerprints.clone())
                .unwrap_or_default();
            for fp in d.fingerprints.iter().filter(|f| !held.contains(f)) {
                match self.claim(fp, &d.id).await {
                    Ok(Attempt::Done(true)) => claimed.push(fp.clone()),
                    Ok(Attempt::Done(false)) => {}
                    other => {
                        for fp in &claimed {
                            let _ = self.claims.delete(fp).await;
                        }
                        return other.map(|_| Attempt::Raced);
                    }
                }
            }
        }
        for d in planned {
            match self.put(d).await? {
                Attempt::Done(rev) => {
                    record(&self.index, &self.revisions, d.clone(), rev);
                }
                Attempt::Raced => return Ok(Attempt::Raced),
            }
        }
        Ok(Attempt::Done(()))
    }

    /// Plans with `plan` against the index and writes, planning again after a lost race.
    fn change(
        &self,
        plan: impl Fn(&Index) -> Result<Vec<Device>, RegistryError>,
    ) -> Result<Vec<Device>, RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..WRITE_ATTEMPTS {
            let planned = plan(&self.index)?;
            // Each record is two sequential writes: a fleet enrolled at once (100,000
            // devices) must not be cut off by the bound meant for one request.
            let bound = self.timeout * 2 * (1 + planned.len() / 100) as u32;
            if let Attempt::Done(()) = self.run_for(bound, self.write(&planned))? {
                return Ok(planned);
            }
        }
        Err(unavailable(format!(
            "the record kept changing under {WRITE_ATTEMPTS} attempts; try again"
        )))
    }
}

/// Applies a watched (or re-read) entry when it is newer than what the index holds.
fn apply_entry(index: &Index, revisions: &Revisions, entry: kv::Entry) {
    if entry.operation != kv::Operation::Put {
        tracing::warn!(device.id = %entry.key, "a device record was deleted from the cluster bucket; devices are suspended or revoked, never deleted: keeping the last record");
        return;
    }
    match serde_json::from_slice::<Device>(&entry.value) {
        Ok(d) if d.id == entry.key => record(index, revisions, d, entry.revision),
        Ok(d) => {
            tracing::error!(key = %entry.key, device.id = %d.id, "cluster registry record under the wrong key: ignored")
        }
        Err(e) => {
            tracing::error!(key = %entry.key, error = %e, "unreadable cluster registry record: ignored")
        }
    }
}

fn record(index: &Index, revisions: &Revisions, device: Device, revision: u64) {
    {
        let mut revs = revisions.lock().unwrap_or_else(|e| e.into_inner());
        let known = revs.entry(device.id.clone()).or_insert(0);
        if *known >= revision {
            return;
        }
        *known = revision;
    }
    index.apply(std::slice::from_ref(&device));
}

/// Follows the devices bucket until `shutdown`, opening the watch again (from the last
/// revision seen) when it breaks.
async fn follow(
    devices: kv::Store,
    mut watch: kv::Watch,
    mut last: u64,
    index: Arc<Index>,
    revisions: Revisions,
    watching: Arc<std::sync::atomic::AtomicBool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut lag = super::Lag::default();
    let mut check = tokio::time::interval(super::LAG_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = watch.next() => Some(next),
            _ = check.tick() => None,
        };
        match next {
            Some(Some(Ok(entry))) => {
                last = last.max(entry.revision);
                apply_entry(&index, &revisions, entry);
                continue;
            }
            Some(Some(Err(e))) => {
                tracing::warn!(error = %e, "cluster registry watch failed; reopening")
            }
            Some(None) => tracing::warn!("cluster registry watch ended; reopening"),
            None => match super::last_sequence(&devices).await {
                Some(bucket_last) if lag.stalled(bucket_last, last) => tracing::warn!(
                    delivered = last,
                    bucket_last,
                    "cluster registry watch stalled (its NATS server went away?); reopening"
                ),
                _ => continue,
            },
        }
        watching.store(false, std::sync::atomic::Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(WATCH_RETRY) => {}
            }
            match devices.watch_all_from_revision(last + 1).await {
                Ok(w) => {
                    watch = w;
                    watching.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(from_revision = last + 1, "cluster registry watch reopened");
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "cluster registry watch not reopened yet"),
            }
        }
    }
}

impl DeviceStore for NatsRegistry {
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
        self.change(|index| index.plan_enrollments(&enrollments, OffsetDateTime::now_utc()))
    }

    fn set_status(&self, id: &str, status: DeviceStatus) -> Result<Device, RegistryError> {
        let mut out = self.change(|index| {
            index
                .plan_status(id, status, OffsetDateTime::now_utc())
                .map(|d| vec![d])
        })?;
        out.pop()
            .ok_or_else(|| RegistryError::UnknownDevice(id.to_string()))
    }

    fn remove_certificate(&self, id: &str, sha256: &str) -> Result<Device, RegistryError> {
        let mut out = self.change(|index| {
            index
                .plan_remove_certificate(id, sha256, OffsetDateTime::now_utc())
                .map(|d| vec![d])
        })?;
        let device = out
            .pop()
            .ok_or_else(|| RegistryError::UnknownDevice(id.to_string()))?;
        // The certificate is free again; a claim left behind is stale and taken over later.
        let fp = sha256.to_ascii_lowercase();
        if let Err(e) = self.run(async { self.claims.delete(&fp).await.map_err(unavailable) }) {
            tracing::warn!(sha256 = %fp, error = %e, "certificate claim not released (it is taken over when the certificate is enrolled again)");
        }
        Ok(device)
    }

    /// Every acknowledged write is already replicated and durable.
    fn flush(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<DeviceChange> {
        self.index.subscribe()
    }

    fn stale_for(&self) -> Option<Duration> {
        let down = self.link.down_for();
        if down.is_none() && !self.watching.load(std::sync::atomic::Ordering::Relaxed) {
            // Connected, but the watch is being reopened: fresh enough for a moment.
            return Some(Duration::ZERO);
        }
        down
    }
}
