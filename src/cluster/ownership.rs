//! Session ownership across gateways: the `{prefix}-sessions` key-value bucket holds one
//! [`Entry`] per (device, route), naming the gateway and connection of every session that
//! holds it, written with compare-and-set on the key's revision. The route's duplicate policy
//! thus holds across gateways:
//!
//! - `reject` and `allow = N` count the live holders on every gateway at admission (409
//!   `session-open` beyond them);
//! - `takeover`: once the newcomer is upgraded it becomes the only holder, and each gateway
//!   whose session it evicted is told at once on its own subject
//!   (`{prefix}.gateways.<name>.takeover`) and ends that session with 4007.
//!
//! Owners refresh their holders every third of `cluster.ownership_ttl_ms`; the bucket's max age
//! is that TTL, so the entries of a gateway that died expire and a device is never locked out
//! for longer. A refresh that finds one of its sessions no longer listed (a takeover notice
//! that was lost) ends that session then. With NATS unreachable, ownership fails open: the
//! local duplicate policy still applies, and a device is never locked out by an outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError};
use crate::admission::routing::DuplicatePolicy;
use crate::policy::ownership::{self as plan, Entry, Holder, Plan};
use crate::storage::{EndSession, OwnershipClaim, SessionOwnership, StoreFuture};
use crate::wire::{Ending, Refusal};

/// A compare-and-set that keeps losing is given up after this many attempts.
const CAS_ATTEMPTS: usize = 8;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The key of (device, route): the route's subprotocol with anything outside the key
/// alphabet folded to `_` (device ids are already tokens).
fn key(device: &str, route: &str) -> String {
    let route: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{device}.{route}")
}

/// A takeover notice, sent to the gateway whose session was evicted.
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    device: String,
    connection: String,
    /// The connection that took over.
    by: String,
}

enum Change {
    Put(Entry),
    Delete,
    Keep,
}

/// What one local session holds: for release and refresh.
#[derive(Debug, Clone)]
struct Held {
    device: String,
    key: String,
    connection: String,
}

pub struct Ownership {
    bucket: kv::Store,
    client: async_nats::Client,
    gateway: String,
    subjects: String,
    ttl: Duration,
    /// This gateway's holders, by key.
    local: Mutex<HashMap<String, Vec<String>>>,
    /// What this gateway last wrote or read of its keys (revision, entry): the first
    /// compare-and-set of a change starts from it instead of reading the entry first.
    known: Mutex<HashMap<String, Known>>,
    releases: mpsc::UnboundedSender<Held>,
}

/// A key as last seen: its revision and entry (`None`: deleted).
type Known = (u64, Option<Entry>);

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

/// A session's claim; dropping it releases the session's holder in the background.
pub struct Claim {
    ownership: Arc<Ownership>,
    held: Held,
    since_ms: i64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.ownership.forget(&self.held);
        let _ = self.ownership.releases.send(self.held.clone());
    }
}

impl OwnershipClaim for Claim {
    fn upgraded(&self, policy: DuplicatePolicy) -> StoreFuture<'_, ()> {
        Box::pin(self.take_over(policy))
    }
}

impl SessionOwnership for Arc<Ownership> {
    fn admit<'a>(
        &'a self,
        device: &'a str,
        route: &'a str,
        policy: DuplicatePolicy,
        connection: &'a str,
    ) -> StoreFuture<'a, Result<Box<dyn OwnershipClaim>, Refusal>> {
        Box::pin(async move {
            Ownership::admit(self, device, route, policy, connection)
                .await
                .map(|c| Box::new(c) as Box<dyn OwnershipClaim>)
        })
    }
}

impl Claim {
    /// At the upgrade: under `takeover` the session becomes the only holder on every
    /// gateway, and the evicted sessions' gateways are told.
    async fn take_over(&self, policy: DuplicatePolicy) {
        if policy != DuplicatePolicy::Takeover {
            return;
        }
        let me = self.ownership.holder(&self.held.connection, self.since_ms);
        let ttl = self.ownership.ttl_ms();
        let evicted = self
            .ownership
            .cas(&self.held.key, |entry| {
                match plan::plan_takeover(entry, &me, now_ms(), ttl) {
                    // Alone already (as this gateway last saw the key): nothing to write. A
                    // newcomer elsewhere since then takes over from this session in turn.
                    Plan::Write { evicted, .. } if evicted.is_empty() => (Change::Keep, evicted),
                    Plan::Write { entry, evicted } => (Change::Put(entry), evicted),
                    Plan::Refuse { .. } => (Change::Keep, Vec::new()),
                }
            })
            .await;
        match evicted {
            Ok(evicted) => {
                for h in evicted
                    .iter()
                    .filter(|h| h.gateway != self.ownership.gateway)
                {
                    self.ownership.notify(h, &self.held).await;
                }
            }
            Err(e) => {
                tracing::warn!(device.id = %self.held.device, error = %e, "cluster takeover not recorded (NATS); older sessions on other gateways end at their next refresh")
            }
        }
    }
}

impl Ownership {
    /// Opens the bucket, listens for takeover notices addressed to this gateway, and starts
    /// the refresher and the releaser, all until `shutdown`.
    pub async fn open(
        cluster: &Cluster,
        end: EndSession,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ClusterError> {
        let ttl = cluster.config.ownership_ttl;
        let bucket = cluster
            .bucket(
                "sessions",
                kv::Config {
                    description: "gatehouse session ownership: holders per device and route".into(),
                    history: 1,
                    max_age: ttl,
                    ..Default::default()
                },
            )
            .await?;
        let subjects = format!("{}.gateways", cluster.config.prefix);
        let inbox = format!("{subjects}.{}.takeover", cluster.config.name);
        let mut notices = cluster
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClusterError::Nats(format!("subscribing to {inbox}: {e}")))?;
        let (releases, mut released) = mpsc::unbounded_channel::<Held>();
        let ownership = Arc::new(Self {
            bucket,
            client: cluster.client.clone(),
            gateway: cluster.config.name.clone(),
            subjects,
            ttl,
            local: Mutex::default(),
            known: Mutex::default(),
            releases,
        });
        let table = end.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = notices.next() => m,
                };
                let Some(message) = message else { return };
                match serde_json::from_slice::<Notice>(&message.payload) {
                    Ok(n) => {
                        if table(&n.device, &n.connection, Ending::TakenOver(n.by.clone())) {
                            tracing::info!(device.id = %n.device, conn = %n.connection, by = %n.by, "takeover on another gateway: session ended");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable takeover notice"),
                }
            }
        });
        let this = ownership.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let held = tokio::select! {
                    _ = stop.cancelled() => return,
                    h = released.recv() => h,
                };
                let Some(held) = held else { return };
                let ttl = this.ttl_ms();
                let released = this
                    .cas(&held.key, |entry| match entry {
                        None => (Change::Keep, ()),
                        Some(e) => match plan::plan_release(
                            e,
                            &this.gateway,
                            &held.connection,
                            now_ms(),
                            ttl,
                        ) {
                            Some(rest) => (Change::Put(rest), ()),
                            None => (Change::Delete, ()),
                        },
                    })
                    .await;
                if let Err(e) = released {
                    tracing::debug!(device.id = %held.device, error = %e, "session ownership not released (it expires)");
                }
                this.forget_known(&held.key);
            }
        });
        let this = ownership.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => this.refresh(&end).await,
                }
            }
        });
        Ok(ownership)
    }

    fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }

    fn holder(&self, connection: &str, since_ms: i64) -> Holder {
        Holder {
            gateway: self.gateway.clone(),
            connection: connection.to_string(),
            since_ms,
            seen_ms: now_ms(),
        }
    }

    /// Drops what is known of `key` once no session of this gateway holds it.
    fn forget_known(&self, key: &str) {
        let held = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key);
        if !held {
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
        }
    }

    fn forget(&self, held: &Held) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = local.get_mut(&held.key) {
            conns.retain(|c| c != &held.connection);
            if conns.is_empty() {
                local.remove(&held.key);
            }
        }
    }

    /// At admission: the newcomer is entered, or refused by the policy counted across
    /// gateways. NATS unreachable: admitted (fail open; the local policy already applied).
    pub async fn admit(
        self: &Arc<Self>,
        device: &str,
        route: &str,
        policy: DuplicatePolicy,
        connection: &str,
    ) -> Result<Claim, Refusal> {
        let held = Held {
            device: device.to_string(),
            key: key(device, route),
            connection: connection.to_string(),
        };
        let since_ms = now_ms();
        let me = self.holder(connection, since_ms);
        let ttl = self.ttl_ms();
        let decided = self
            .cas(&held.key, |entry| {
                match plan::plan_admit(entry, &me, policy, now_ms(), ttl) {
                    Plan::Write { entry, .. } => (Change::Put(entry), None),
                    Plan::Refuse { open, allowed } => {
                        (Change::Keep, Some(Refusal::SessionOpen { open, allowed }))
                    }
                }
            })
            .await;
        match decided {
            Ok(Some(refusal)) => return Err(refusal),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(device.id = %device, error = %e, "session ownership unavailable (NATS): admitted on the local policy alone")
            }
        }
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(held.key.clone())
            .or_default()
            .push(held.connection.clone());
        Ok(Claim {
            ownership: self.clone(),
            held,
            since_ms,
        })
    }

    async fn notify(&self, evicted: &Holder, by: &Held) {
        let notice = Notice {
            device: by.device.clone(),
            connection: evicted.connection.clone(),
            by: by.connection.clone(),
        };
        let subject = format!("{}.{}.takeover", self.subjects, evicted.gateway);
        match serde_json::to_vec(&notice) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    tracing::warn!(error = %e, gateway = %evicted.gateway, "takeover notice not sent; that gateway finds out at its next refresh");
                }
            }
            Err(e) => tracing::error!(error = %e, "takeover notice not encodable"),
        }
    }

    /// Refreshes every holder of this gateway; sessions found evicted are ended.
    async fn refresh(&self, end: &EndSession) {
        let local: Vec<(String, Vec<String>)> = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ttl = self.ttl_ms();
        for (key, mine) in local {
            let gateway = self.gateway.clone();
            let since = now_ms();
            let result = self
                .cas(&key, |entry| {
                    let current = entry.cloned().unwrap_or_default();
                    let (mut fresh, gone) =
                        plan::plan_refresh(&current, &gateway, &mine, now_ms(), ttl);
                    if entry.is_none() {
                        // Expired (NATS was away longer than the TTL): enter ours again.
                        fresh.holders = mine
                            .iter()
                            .map(|c| Holder {
                                gateway: gateway.clone(),
                                connection: c.clone(),
                                since_ms: since,
                                seen_ms: since,
                            })
                            .collect();
                        return (Change::Put(fresh), Vec::new());
                    }
                    let by = fresh
                        .holders
                        .iter()
                        .find(|h| h.gateway != gateway || !mine.contains(&h.connection))
                        .map(|h| h.connection.clone())
                        .unwrap_or_default();
                    (
                        Change::Put(fresh),
                        gone.into_iter().map(|c| (c, by.clone())).collect(),
                    )
                })
                .await;
            match result {
                Ok(gone) => {
                    let device = key.split('.').next().unwrap_or_default().to_string();
                    for (connection, by) in gone {
                        if end(&device, &connection, Ending::TakenOver(by)) {
                            tracing::info!(device.id = %device, conn = %connection, "session no longer owns its device in the cluster: ended");
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "session ownership refresh failed (NATS)");
                    return;
                }
            }
        }
    }

    fn remember(&self, key: &str, now: Option<Known>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match now {
            Some(k) => {
                known.insert(key.to_string(), k);
            }
            None => {
                known.remove(key);
            }
        }
    }

    /// Lets `f` decide on the entry and writes with compare-and-set, reading the entry again
    /// after a lost race.
    async fn cas<T>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<&Entry>) -> (Change, T),
    ) -> Result<T, ClusterError> {
        let nats = |e: &dyn std::fmt::Display| ClusterError::Nats(e.to_string());
        // First from what this gateway knows of the key, or, for a key it has never seen,
        // on the guess that it is free (the common admission: the device is connected
        // nowhere): one round trip instead of two. A wrong guess loses the
        // compare-and-set, and the entry is read.
        let mut known: Option<Known> = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        let mut guessed = true;
        for _ in 0..CAS_ATTEMPTS {
            let (revision, parsed) = match known.take() {
                Some((rev, entry)) => (Some(rev), entry),
                None if guessed => (None, None),
                None => {
                    let current = self.bucket.entry(key).await.map_err(|e| nats(&e))?;
                    let revision = current.as_ref().map(|e| e.revision);
                    let parsed: Option<Entry> = current
                        .filter(|e| e.operation == kv::Operation::Put)
                        .and_then(|e| serde_json::from_slice(&e.value).ok());
                    (revision, parsed)
                }
            };
            let from_store = !guessed;
            guessed = false;
            let (change, out) = f(parsed.as_ref());
            let written: Result<Option<Known>, Option<ClusterError>> = match change {
                Change::Keep => {
                    if from_store {
                        if let Some(rev) = revision {
                            self.remember(key, Some((rev, parsed)));
                        }
                    }
                    return Ok(out);
                }
                Change::Put(entry) => {
                    let bytes: bytes::Bytes =
                        serde_json::to_vec(&entry).map_err(|e| nats(&e))?.into();
                    match revision {
                        None => match self.bucket.create(key, bytes).await {
                            Ok(rev) => Ok(Some((rev, Some(entry)))),
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(None),
                            Err(e) => Err(Some(nats(&e))),
                        },
                        Some(rev) => match self.bucket.update(key, bytes, rev).await {
                            Ok(rev) => Ok(Some((rev, Some(entry)))),
                            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                                Err(None)
                            }
                            Err(e) => Err(Some(nats(&e))),
                        },
                    }
                }
                Change::Delete => match revision {
                    None => return Ok(out),
                    Some(rev) => match self.bucket.delete_expect_revision(key, Some(rev)).await {
                        Ok(()) => Ok(None),
                        Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Err(None),
                        Err(e) => Err(Some(nats(&e))),
                    },
                },
            };
            match written {
                Ok(now) => {
                    self.remember(key, now);
                    return Ok(out);
                }
                Err(None) => continue,
                Err(Some(e)) => {
                    self.remember(key, None);
                    return Err(e);
                }
            }
        }
        Err(ClusterError::Nats(format!(
            "session ownership of {key} kept changing under {CAS_ATTEMPTS} attempts"
        )))
    }
}
