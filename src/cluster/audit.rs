//! The command audit log in the cluster: one JetStream stream, `{prefix}-audit`, one subject per
//! device (`{prefix}.audit.records.<device>`), and signed checkpoints in a second stream
//! (`{prefix}-audit-checkpoints`, the last 16 per device). The records and the chain are exactly
//! the embedded log's (`audit::record`); only the storage differs.
//!
//! Each append carries `Nats-Expected-Last-Subject-Sequence`: the stream sequence of the device's
//! last record as this gateway knows it. When another gateway appended first (the device
//! reconnected elsewhere, or two gateways race on it), the stream refuses the write; the writer
//! reads the device's last record again, seals the record after it and retries. So each
//! device's chain stays gap-free and linear across gateways without any lock of our own.
//!
//! `record_durable` resolves once the stream has acknowledged the record (stored on a majority of
//! its replicas): a command is forwarded only then, as with the fsync of the embedded log. NATS
//! unreachable: durable records fail (commands are refused, fail closed), others are counted as
//! lost. Appends are spread over [`SHARDS`] writer tasks by device, so one device's records keep
//! their order while different devices are written in parallel.
//!
//! Checkpoint signing across gateways: every gateway signs with the same `[audit] signing_key`
//! (one shared key, distributed like the TLS key), so verification takes the one `audit.pub`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{Cluster, ClusterError};
use crate::audit::{AuditError, AuditFuture, Checkpoint, Export, Record, EXPORT_FORMAT, GENESIS};

/// Writer tasks; a device always goes to the same one.
pub const SHARDS: usize = 8;
/// Appends that lose the expected-sequence race this many times in a row fail.
const APPEND_ATTEMPTS: usize = 16;
/// Checkpoints kept per device in the checkpoint stream.
const CHECKPOINTS_PER_DEVICE: i64 = 16;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn unavailable(e: impl std::fmt::Display) -> AuditError {
    AuditError::Unavailable(format!("NATS: {e}"))
}

enum Job {
    Append(
        Box<Record>,
        Option<oneshot::Sender<Result<Record, AuditError>>>,
    ),
    /// Sign checkpoints for what changed; answer once everything before is acknowledged.
    Sync(oneshot::Sender<bool>),
}

/// A device's last record as this gateway knows it.
#[derive(Clone)]
struct Head {
    stream_seq: u64,
    next: u64,
    hash: String,
}

struct Inner {
    js: jetstream::Context,
    reader: AuditReader,
    records: stream::Stream,
    record_subjects: String,
    checkpoint_subjects: String,
    key: aws_lc_rs::signature::Ed25519KeyPair,
    healthy: AtomicBool,
    lost: AtomicU64,
    closed: AtomicBool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Read access to the cluster's audit streams (what `gatehouse audit` uses without a running
/// gateway): exports, the devices with records, verification.
#[derive(Clone)]
pub struct AuditReader {
    records: stream::Stream,
    checkpoints: stream::Stream,
    record_subjects: String,
    checkpoint_subjects: String,
}

impl AuditReader {
    /// Opens the streams (creating them if no gateway has yet).
    pub async fn open(cluster: &Cluster) -> Result<Self, ClusterError> {
        let c = &cluster.config;
        let record_subjects = format!("{}.audit.records", c.prefix);
        let checkpoint_subjects = format!("{}.audit.checkpoints", c.prefix);
        let create = |name: String, subject: &str, per_subject: i64, what: &str| stream::Config {
            name,
            description: Some(format!("gatehouse command audit log: {what}")),
            subjects: vec![format!("{subject}.>")],
            max_messages_per_subject: per_subject,
            num_replicas: c.replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        let records = cluster
            .js
            .get_or_create_stream(create(
                c.name_of("audit"),
                &record_subjects,
                -1,
                "records, one subject per device",
            ))
            .await
            .map_err(|e| ClusterError::Nats(format!("audit stream: {e}")))?;
        let checkpoints = cluster
            .js
            .get_or_create_stream(create(
                c.name_of("audit-checkpoints"),
                &checkpoint_subjects,
                CHECKPOINTS_PER_DEVICE,
                "signed checkpoints",
            ))
            .await
            .map_err(|e| ClusterError::Nats(format!("audit checkpoint stream: {e}")))?;
        Ok(Self {
            records,
            checkpoints,
            record_subjects,
            checkpoint_subjects,
        })
    }

    pub async fn export(&self, device: &str) -> Result<Export, AuditError> {
        export(
            &self.records,
            &self.checkpoints,
            &self.record_subjects,
            &self.checkpoint_subjects,
            device,
        )
        .await
    }

    pub async fn devices(&self) -> Result<Vec<String>, AuditError> {
        devices(&self.records, &self.record_subjects).await
    }

    /// Verifies each device's export (or one device's) with `public_key`.
    pub async fn verify(
        &self,
        public_key: &[u8; 32],
        device: Option<String>,
    ) -> Result<crate::audit::DirVerdict, AuditError> {
        let names = match device {
            Some(d) => vec![d],
            None => self.devices().await?,
        };
        let mut verdict = crate::audit::DirVerdict {
            verified: Vec::new(),
            failures: Vec::new(),
        };
        for name in names {
            let export = self.export(&name).await?;
            if export.records.is_empty() && export.checkpoints.is_empty() {
                continue;
            }
            match crate::audit::verify_export(&export, public_key) {
                Ok(v) => verdict.verified.push(v),
                Err(f) => verdict.failures.push(f),
            }
        }
        Ok(verdict)
    }
}

/// The JetStream audit store (an [`crate::audit::AuditStore`]).
#[derive(Clone)]
pub struct NatsAudit {
    inner: Arc<Inner>,
    shards: Arc<Vec<mpsc::UnboundedSender<Job>>>,
}

impl std::fmt::Debug for NatsAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAudit")
            .field("subjects", &self.inner.record_subjects)
            .finish_non_exhaustive()
    }
}

impl NatsAudit {
    /// Opens (creating) both streams and starts the writers; checkpoints are signed every
    /// `checkpoint_interval`.
    pub async fn open(
        cluster: &Cluster,
        key: aws_lc_rs::signature::Ed25519KeyPair,
        checkpoint_interval: Duration,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, ClusterError> {
        let reader = AuditReader::open(cluster).await?;
        let inner = Arc::new(Inner {
            js: cluster.js.clone(),
            records: reader.records.clone(),
            record_subjects: reader.record_subjects.clone(),
            checkpoint_subjects: reader.checkpoint_subjects.clone(),
            reader,
            key,
            healthy: AtomicBool::new(true),
            lost: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            metrics,
        });
        let mut shards = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(shard(inner.clone(), rx, checkpoint_interval));
            shards.push(tx);
        }
        Ok(Self {
            inner,
            shards: Arc::new(shards),
        })
    }

    fn shard(&self, device: &str) -> &mpsc::UnboundedSender<Job> {
        let h = device.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        &self.shards[(h % SHARDS as u64) as usize]
    }

    async fn sync_all(&self) -> bool {
        let mut waits = Vec::new();
        for s in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            if s.send(Job::Sync(tx)).is_err() {
                return false;
            }
            waits.push(rx);
        }
        let mut ok = true;
        for w in waits {
            ok &= w.await.unwrap_or(false);
        }
        ok
    }
}

impl Inner {
    fn record_subject(&self, device: &str) -> String {
        format!("{}.{device}", self.record_subjects)
    }

    /// The device's last record in the stream.
    async fn load_head(&self, device: &str) -> Result<Head, AuditError> {
        match self
            .records
            .get_last_raw_message_by_subject(&self.record_subject(device))
            .await
        {
            Ok(m) => {
                let r: Record = serde_json::from_slice(&m.payload).map_err(|e| {
                    AuditError::Unavailable(format!(
                        "the last audit record of {device} (stream sequence {}) is unreadable: {e}",
                        m.sequence
                    ))
                })?;
                Ok(Head {
                    stream_seq: m.sequence,
                    next: r.seq + 1,
                    hash: r.hash,
                })
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(Head {
                stream_seq: 0,
                next: 0,
                hash: GENESIS.to_string(),
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Seals `record` after the device's head and appends it, re-reading the head whenever
    /// another gateway appended first.
    async fn append(
        &self,
        heads: &mut HashMap<String, Head>,
        record: Record,
    ) -> Result<Record, AuditError> {
        let device = record.device.clone();
        let subject = self.record_subject(&device);
        for _ in 0..APPEND_ATTEMPTS {
            let head = match heads.get(&device) {
                Some(h) => h.clone(),
                None => {
                    let h = self.load_head(&device).await?;
                    heads.insert(device.clone(), h.clone());
                    h
                }
            };
            let sealed = record.clone().seal(head.next, now_ms(), &head.hash);
            let bytes = serde_json::to_vec(&sealed).map_err(unavailable)?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                head.stream_seq.to_string().as_str(),
            );
            let started = std::time::Instant::now();
            let acked = match self
                .js
                .publish_with_headers(subject.clone(), headers, bytes.into())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(ack) => {
                    if let Some(m) = &self.metrics {
                        m.audit_records.inc();
                        m.audit_write_us
                            .observe(started.elapsed().as_secs_f64() * 1_000_000.0);
                    }
                    heads.insert(
                        device,
                        Head {
                            stream_seq: ack.sequence,
                            next: sealed.seq + 1,
                            hash: sealed.hash.clone(),
                        },
                    );
                    return Ok(sealed);
                }
                Err(e) if lost_race(&e) => {
                    heads.remove(&device);
                    continue;
                }
                Err(e) => {
                    heads.remove(&device);
                    if let Some(m) = &self.metrics {
                        m.audit_write_failures.inc();
                    }
                    return Err(unavailable(e));
                }
            }
        }
        Err(AuditError::Unavailable(format!(
            "the audit chain of {device} kept moving under {APPEND_ATTEMPTS} attempts"
        )))
    }

    async fn checkpoint(&self, device: &str, head: &Head) -> bool {
        if head.next == 0 {
            return true;
        }
        let cp = Checkpoint::sign(&self.key, device, head.next - 1, &head.hash, now_ms());
        let Ok(bytes) = serde_json::to_vec(&cp) else {
            return false;
        };
        let subject = format!("{}.{device}", self.checkpoint_subjects);
        match self.js.publish(subject, bytes.into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        }
    }
}

/// Whether a refused append lost the expected-sequence race: JetStream answers 10071 for the
/// stream's last sequence and 10164 for a subject's, and the client names only the first.
fn lost_race(e: &async_nats::jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence || e.to_string().contains("wrong last sequence")
}

/// One writer: appends in order, signs the heads it moved at each interval and at a sync.
async fn shard(inner: Arc<Inner>, mut jobs: mpsc::UnboundedReceiver<Job>, interval: Duration) {
    let mut heads: HashMap<String, Head> = HashMap::new();
    let mut moved: HashMap<String, Head> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_since_sync = false;
    loop {
        let job = tokio::select! {
            j = jobs.recv() => j,
            _ = tick.tick() => {
                for (device, head) in std::mem::take(&mut moved) {
                    let _ = inner.checkpoint(&device, &head).await;
                }
                continue;
            }
        };
        let Some(job) = job else { return };
        match job {
            Job::Append(record, reply) => match inner.append(&mut heads, *record).await {
                Ok(sealed) => {
                    inner.healthy.store(true, Ordering::Relaxed);
                    if let Some(h) = heads.get(&sealed.device) {
                        moved.insert(sealed.device.clone(), h.clone());
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(sealed));
                    }
                }
                Err(e) => {
                    inner.healthy.store(false, Ordering::Relaxed);
                    failed_since_sync = true;
                    match reply {
                        Some(reply) => {
                            let _ = reply.send(Err(e));
                        }
                        None => {
                            inner.lost.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(error = %e, "audit record lost: the cluster did not acknowledge it");
                        }
                    }
                }
            },
            Job::Sync(reply) => {
                let mut ok = !failed_since_sync;
                for (device, head) in moved.drain() {
                    ok &= inner.checkpoint(&device, &head).await;
                }
                failed_since_sync = false;
                let _ = reply.send(ok);
            }
        }
    }
}

impl crate::audit::AuditStore for NatsAudit {
    fn record(&self, record: Record) {
        if self.inner.closed.load(Ordering::Relaxed)
            || self
                .shard(&record.device)
                .send(Job::Append(Box::new(record), None))
                .is_err()
        {
            self.inner.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_durable(&self, record: Record) -> AuditFuture<Result<Record, AuditError>> {
        let this = self.clone();
        Box::pin(async move {
            if this.inner.closed.load(Ordering::Relaxed) {
                return Err(AuditError::Stopped);
            }
            let (tx, rx) = oneshot::channel();
            this.shard(&record.device)
                .send(Job::Append(Box::new(record), Some(tx)))
                .map_err(|_| AuditError::Stopped)?;
            rx.await.map_err(|_| AuditError::Stopped)?
        })
    }

    fn sync(&self) -> AuditFuture<bool> {
        let this = self.clone();
        Box::pin(async move { this.sync_all().await })
    }

    fn close(&self) -> AuditFuture<bool> {
        let this = self.clone();
        Box::pin(async move {
            let ok = this.sync_all().await;
            this.inner.closed.store(true, Ordering::Relaxed);
            ok
        })
    }

    fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    fn lost(&self) -> u64 {
        self.inner.lost.load(Ordering::Relaxed)
    }

    fn export(&self, device: &str) -> AuditFuture<Result<Export, AuditError>> {
        let reader = self.inner.reader.clone();
        let device = device.to_string();
        Box::pin(async move { reader.export(&device).await })
    }

    fn devices(&self) -> AuditFuture<Result<Vec<String>, AuditError>> {
        let reader = self.inner.reader.clone();
        Box::pin(async move { reader.devices().await })
    }

    fn verify(
        &self,
        public_key: [u8; 32],
        device: Option<String>,
    ) -> AuditFuture<Result<crate::audit::DirVerdict, AuditError>> {
        let reader = self.inner.reader.clone();
        Box::pin(async move { reader.verify(&public_key, device).await })
    }
}

/// Every message of `subject` in `stream`, oldest first.
async fn read_subject(
    stream: &stream::Stream,
    subject: String,
) -> Result<Vec<bytes::Bytes>, AuditError> {
    super::read_subject(stream, subject, usize::MAX)
        .await
        .map_err(unavailable)
}

/// A device's records and checkpoints as an export, verifiable offline like the embedded one.
pub async fn export(
    records: &stream::Stream,
    checkpoints: &stream::Stream,
    record_subjects: &str,
    checkpoint_subjects: &str,
    device: &str,
) -> Result<Export, AuditError> {
    let mut out = Export {
        format: EXPORT_FORMAT.into(),
        device: device.to_string(),
        records: Vec::new(),
        checkpoints: Vec::new(),
        anchors: Vec::new(),
    };
    for payload in read_subject(records, format!("{record_subjects}.{device}")).await? {
        out.records
            .push(serde_json::from_slice(&payload).map_err(|e| {
                AuditError::Unavailable(format!("an audit record of {device} is unreadable: {e}"))
            })?);
    }
    for payload in read_subject(checkpoints, format!("{checkpoint_subjects}.{device}")).await? {
        match serde_json::from_slice::<Checkpoint>(&payload) {
            Ok(c) => out.checkpoints.push(c),
            Err(e) => {
                tracing::warn!(device.id = %device, error = %e, "unreadable audit checkpoint skipped")
            }
        }
    }
    Ok(out)
}

/// The devices with records in the stream.
pub async fn devices(
    records: &stream::Stream,
    record_subjects: &str,
) -> Result<Vec<String>, AuditError> {
    let mut subjects = records
        .info_with_subjects(format!("{record_subjects}.>"))
        .await
        .map_err(unavailable)?;
    let prefix = format!("{record_subjects}.");
    let mut out = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _count) = s.map_err(unavailable)?;
        if let Some(d) = subject.strip_prefix(&prefix) {
            out.push(d.to_string());
        }
    }
    out.sort();
    Ok(out)
}
