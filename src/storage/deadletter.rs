//! The dead-letter store: the last N rejected frames per device in sled (time, route,
//! direction, reason, payload up to a size cap), oldest dropped first, so it never grows
//! without bound. Sessions hand rejected frames to a bounded queue ([`DeadLetterSink`]) and
//! never wait on storage; one writer task stores them. A full queue drops and counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DeadLetterStore, RegistryError};
use crate::frames::Rejection;

const TREE: &str = "deadletters.v1";
/// Rejected frames queued for the writer before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 1024;

/// One rejected frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    #[serde(default)]
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub device_id: String,
    pub route: String,
    pub direction: String,
    /// `json` (text frame) or `cbor` (binary frame).
    pub encoding: String,
    pub code: String,
    pub pointer: String,
    pub message: String,
    /// Length of the whole frame.
    pub payload_len: usize,
    /// The frame's first bytes (up to the cap), base64.
    pub payload_b64: String,
    pub truncated: bool,
}

impl DeadLetter {
    pub fn payload(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload_b64)
            .unwrap_or_default()
    }
}

fn key(device: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn prefix(device: &str) -> Vec<u8> {
    let mut k = device.as_bytes().to_vec();
    k.push(0);
    k
}

fn storage(e: sled::Error) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// The sled-backed store.
pub struct SledDeadLetters {
    tree: sled::Tree,
    per_device: usize,
    /// Per device: (oldest kept seq, next seq).
    bounds: Mutex<HashMap<String, (u64, u64)>>,
    /// Frames stored since the store was opened (for waiting on the writer).
    stored: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for SledDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledDeadLetters")
            .field("per_device", &self.per_device)
            .finish()
    }
}

impl SledDeadLetters {
    pub(super) fn open(db: &sled::Db, per_device: usize) -> Result<Self, RegistryError> {
        let tree = db.open_tree(TREE).map_err(storage)?;
        let mut bounds: HashMap<String, (u64, u64)> = HashMap::new();
        for item in tree.iter().keys() {
            let k = item.map_err(storage)?;
            let Some(split) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let (Ok(device), Ok(seq)) = (
                std::str::from_utf8(&k[..split]),
                <[u8; 8]>::try_from(&k[split + 1..]),
            ) else {
                continue;
            };
            let seq = u64::from_be_bytes(seq);
            let e = bounds.entry(device.to_string()).or_insert((seq, seq + 1));
            e.0 = e.0.min(seq);
            e.1 = e.1.max(seq + 1);
        }
        Ok(Self {
            tree,
            per_device: per_device.max(1),
            bounds: Mutex::new(bounds),
            stored: tokio::sync::watch::Sender::new(0),
        })
    }
}

impl DeadLetterStore for SledDeadLetters {
    fn record(&self, mut letter: DeadLetter) -> Result<(), RegistryError> {
        let (seq, drop_below) = {
            let mut bounds = self.bounds.lock().unwrap_or_else(|e| e.into_inner());
            let b = bounds.entry(letter.device_id.clone()).or_insert((0, 0));
            let seq = b.1;
            b.1 += 1;
            let first = b.0;
            let keep_from = b.1.saturating_sub(self.per_device as u64);
            b.0 = first.max(keep_from);
            (seq, (first, keep_from))
        };
        letter.seq = seq;
        let bytes = serde_json::to_vec(&letter).map_err(|e| RegistryError::Corrupt {
            key: letter.device_id.clone(),
            reason: e.to_string(),
        })?;
        self.tree
            .insert(key(&letter.device_id, seq), bytes)
            .map_err(storage)?;
        for old in drop_below.0..drop_below.1 {
            self.tree
                .remove(key(&letter.device_id, old))
                .map_err(storage)?;
        }
        self.stored.send_modify(|n| *n += 1);
        Ok(())
    }

    fn stored(&self) -> tokio::sync::watch::Receiver<u64> {
        self.stored.subscribe()
    }

    fn list(&self, device: &str) -> Result<Vec<DeadLetter>, RegistryError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix(device)) {
            let (k, v) = item.map_err(storage)?;
            let letter: DeadLetter =
                serde_json::from_slice(&v).map_err(|e| RegistryError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: e.to_string(),
                })?;
            out.push(letter);
        }
        Ok(out)
    }
}

/// Builds a dead letter from a rejected frame (payload capped at `max_payload`).
pub fn letter(
    device_id: &str,
    route: &str,
    direction: &str,
    encoding: &str,
    rejection: &Rejection,
    payload: &[u8],
    max_payload: usize,
) -> DeadLetter {
    let kept = &payload[..payload.len().min(max_payload)];
    DeadLetter {
        seq: 0,
        time: OffsetDateTime::now_utc(),
        device_id: device_id.to_string(),
        route: route.to_string(),
        direction: direction.to_string(),
        encoding: encoding.to_string(),
        code: rejection.code.as_str().to_string(),
        pointer: rejection.pointer.clone(),
        message: rejection.message.clone(),
        payload_len: payload.len(),
        payload_b64: base64::engine::general_purpose::STANDARD.encode(kept),
        truncated: kept.len() < payload.len(),
    }
}

/// The sessions' side: a bounded queue to the writer task. Never blocks.
#[derive(Clone, Debug)]
pub struct DeadLetterSink {
    tx: mpsc::Sender<DeadLetter>,
    dropped: Arc<AtomicU64>,
    stored: Arc<AtomicU64>,
}

impl DeadLetterSink {
    /// A sink and the receiving end of its bounded queue (the writer task's, or a test's).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<DeadLetter>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Self {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
                stored: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    pub fn send(&self, letter: DeadLetter) {
        if self.tx.try_send(letter).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Letters not kept: the queue was full, or the store failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Letters the writer stored.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }
}

/// Creates the queue and the writer future (run it on the server's task tracker). The writer
/// stores until `shutdown`, then drains what is queued.
pub fn writer(
    store: Arc<dyn DeadLetterStore>,
    shutdown: CancellationToken,
) -> (DeadLetterSink, impl std::future::Future<Output = ()>) {
    let (sink, mut rx) = DeadLetterSink::channel(QUEUE_CAPACITY);
    let (stored_count, dropped_count) = (sink.stored.clone(), sink.dropped.clone());
    let task = async move {
        loop {
            let first = tokio::select! {
                // Cancel-safe: `recv` loses nothing when dropped.
                m = rx.recv() => m,
                _ = shutdown.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let store = store.clone();
            let n = batch.len() as u64;
            let stored = tokio::task::spawn_blocking(move || {
                let mut kept = 0u64;
                for letter in batch {
                    if let Err(e) = store.record(letter) {
                        return (kept, Some(e));
                    }
                    kept += 1;
                }
                (kept, None)
            })
            .await;
            let kept = match &stored {
                Ok((kept, _)) => *kept,
                Err(_) => 0,
            };
            stored_count.fetch_add(kept, Ordering::Relaxed);
            dropped_count.fetch_add(n - kept, Ordering::Relaxed);
            match stored {
                Ok((_, None)) => {}
                Ok((_, Some(e))) => tracing::error!(error = %e, "dead-letter store write failed"),
                Err(e) => tracing::error!(error = %e, "dead-letter writer task failed"),
            }
        }
        // Drain what sessions queued before shutdown.
        rx.close();
        let mut rest = Vec::new();
        while let Ok(m) = rx.try_recv() {
            rest.push(m);
        }
        if !rest.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for letter in rest {
                    let _ = store.record(letter);
                }
            })
            .await;
        }
    };
    (sink, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::RejectCode;

    #[test]
    fn bounded_per_device_oldest_first_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Rejection::new(RejectCode::SchemaViolation, "/t", "too hot");
        {
            let db = sled::open(dir.path()).unwrap();
            let store = SledDeadLetters::open(&db, 3).unwrap();
            for i in 0..5u8 {
                store
                    .record(letter(
                        "d1",
                        "telemetry.v1",
                        "device-to-backend",
                        "json",
                        &r,
                        &[b'0' + i],
                        16,
                    ))
                    .unwrap();
            }
            store
                .record(letter(
                    "d2",
                    "telemetry.v1",
                    "device-to-backend",
                    "cbor",
                    &r,
                    &[0u8; 40],
                    16,
                ))
                .unwrap();
            let d1 = store.list("d1").unwrap();
            assert_eq!(
                d1.iter().map(|l| l.payload()).collect::<Vec<_>>(),
                vec![b"2".to_vec(), b"3".to_vec(), b"4".to_vec()]
            );
            let d2 = store.list("d2").unwrap();
            assert_eq!(
                (d2[0].payload_len, d2[0].payload().len(), d2[0].truncated),
                (40, 16, true)
            );
            db.flush().unwrap();
        }
        // Reopened through the registry, which waits for sled to release the previous lock.
        let registry = crate::storage::SledRegistry::open(dir.path()).unwrap();
        let store = registry.dead_letters(3).unwrap();
        store
            .record(letter(
                "d1",
                "telemetry.v1",
                "device-to-backend",
                "json",
                &r,
                b"5",
                16,
            ))
            .unwrap();
        let seqs: Vec<u64> = store.list("d1").unwrap().iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(store.tree.len(), 4);
        // A device whose id is a prefix of another's sees only its own.
        assert!(store.list("d").unwrap().is_empty());
    }
}
