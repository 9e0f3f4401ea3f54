//! Audit log storage: append-only JSON-lines segment files and a checkpoint file, written by
//! one writer thread that batches records from every session (group commit: one `fdatasync`
//! covers a whole batch). Callers that must not go on before their record is on disk (a
//! command about to be forwarded) wait for that sync; the rest is written with the next batch.
//! A failed write rolls the batch back (file truncated to its length before the batch, no
//! sequence number consumed), fails the waiters (commands are refused: fail closed), keeps the
//! other records for the next attempt, and the writer retries on its own. Opening recovers a
//! torn last line left by a crash. The record rules are `record`'s, reading is `reader`'s;
//! see docs/audit.md.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::reader::{io, read_lines, segment_name, segments, ANCHORS_FILE, CHECKPOINTS_FILE};
use super::record::{Checkpoint, Record, GENESIS};
use super::AuditError;

/// Records queued for the writer before callers are told the log is busy: 64 Ki.
pub const QUEUE_CAPACITY: usize = 64 * 1024;
/// Records kept for retry while the disk refuses writes, beyond which the oldest are lost
/// (and counted): 64 Ki.
pub const RETRY_CAPACITY: usize = 64 * 1024;
/// Longest time a record that nobody waits for stays unsynced: 200 ms.
pub const LAZY_SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Wait between attempts while writes fail: 500 ms.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Writer configuration.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub checkpoint_interval: Duration,
    /// Whole segments whose newest record is older than this are pruned (after a signed
    /// anchor is written for each device in them). `None`: keep everything.
    pub retention: Option<Duration>,
    /// Where records written, write latency and failures are counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

type Reply = oneshot::Sender<Result<Record, AuditError>>;

// `Append` is nearly every request; boxing it would add an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Request {
    Append {
        event: Record,
        reply: Option<Reply>,
    },
    /// Sync everything and sign checkpoints now.
    Sync {
        reply: oneshot::Sender<bool>,
    },
    /// Sync, sign, and end the writer thread: the last request it takes.
    Close {
        reply: oneshot::Sender<bool>,
    },
}

/// The sessions' handle on the log.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Request>,
    /// The segment directory, for reading back (exports, verification).
    dir: std::path::PathBuf,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    fail_writes: Arc<AtomicBool>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl AuditLog {
    /// Recovers the directory (a torn last line is cut off) and starts the writer thread.
    /// The thread ends when every handle is dropped, after a final sync and checkpoint.
    pub fn open(
        cfg: WriterConfig,
        key: aws_lc_rs::signature::Ed25519KeyPair,
    ) -> Result<(AuditLog, std::thread::JoinHandle<()>), AuditError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| io(&cfg.dir, e))?;
        let mut heads: HashMap<String, (u64, String)> = HashMap::new();
        let mut summaries: BTreeMap<u64, SegmentSummary> = BTreeMap::new();
        let segs = segments(&cfg.dir)?;
        for (i, (n, path)) in segs.iter().enumerate() {
            let summary = summaries.entry(*n).or_default();
            let torn = read_lines(path, |_, line| {
                if let Ok(r) = serde_json::from_str::<Record>(line) {
                    summary.add(&r);
                    heads.insert(r.device.clone(), (r.seq + 1, r.hash));
                }
            })?;
            if let Some(at) = torn {
                if i + 1 == segs.len() {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| io(path, e))?;
                    f.set_len(at).map_err(|e| io(path, e))?;
                    f.sync_all().map_err(|e| io(path, e))?;
                    tracing::warn!(file = %path.display(), offset = at, "audit log: cut off a torn last record (a write interrupted by a crash; it was never acknowledged)");
                }
            }
        }
        let cp_path = cfg.dir.join(CHECKPOINTS_FILE);
        let mut checkpointed: HashMap<String, u64> = HashMap::new();
        if cp_path.exists() {
            if let Some(at) = read_lines(&cp_path, |_, line| {
                if let Ok(c) = serde_json::from_str::<Checkpoint>(line) {
                    checkpointed.insert(c.device.clone(), c.seq);
                }
            })? {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&cp_path)
                    .map_err(|e| io(&cp_path, e))?;
                f.set_len(at).map_err(|e| io(&cp_path, e))?;
            }
        }
        let current = segs.last().map(|(n, _)| *n).unwrap_or(1);
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let lost = Arc::new(AtomicU64::new(0));
        let fail_writes = Arc::new(AtomicBool::new(false));
        let dir = cfg.dir.clone();
        let mut writer = Writer {
            cfg,
            key,
            segment: current,
            file: None,
            summaries,
            heads,
            dirty: HashSet::new(),
            checkpointed,
            retry: VecDeque::new(),
            unsynced: false,
            healthy: healthy.clone(),
            lost: lost.clone(),
            fail_writes: fail_writes.clone(),
        };
        // Devices whose last record is newer than their last checkpoint get one soon.
        for (device, (next, _)) in &writer.heads {
            if writer
                .checkpointed
                .get(device)
                .is_none_or(|c| *c + 1 < *next)
            {
                writer.dirty.insert(device.clone());
            }
        }
        let thread = std::thread::Builder::new()
            .name("gatehouse-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        Ok((
            AuditLog {
                tx,
                dir,
                healthy,
                lost,
                fail_writes,
            },
            thread,
        ))
    }

    /// Queues a record; it is on disk within [`LAZY_SYNC_INTERVAL`] unless writes fail.
    pub fn record(&self, event: Record) {
        match self.tx.try_send(Request::Append { event, reply: None }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!("audit log queue full or writer stopped: a record was lost");
            }
        }
    }

    /// Writes a record and waits until it is synced to disk.
    pub async fn record_durable(&self, event: Record) -> Result<Record, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request::Append {
                event,
                reply: Some(reply),
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => AuditError::Busy,
                TrySendError::Disconnected(_) => AuditError::Stopped,
            })?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Syncs everything written so far and signs checkpoints (at shutdown). Returns whether
    /// everything queued is on disk.
    pub async fn sync(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.try_send(Request::Sync { reply }).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Syncs everything written so far, signs checkpoints and ends the writer thread (join
    /// its handle afterwards). Records sent later are counted as lost. Returns whether
    /// everything queued is on disk.
    pub async fn close(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        // `send` waits for room: a full queue must not turn the final sync into a loss.
        let tx = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(Request::Close { reply }).is_ok())
            .await
            .unwrap_or(false);
        sent && rx.await.unwrap_or(false)
    }

    /// Whether the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records lost (queue full while the disk failed for long): should stay 0.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Fault injection for tests and drills: while set, every write fails as a full disk
    /// would.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::Relaxed);
    }
}

/// What retention needs to know about a segment, kept up to date as records are written so
/// that pruning never reads a segment back: its newest record's time, and the last record
/// of each device in it (where that device's chain continues after the segment).
#[derive(Debug, Default)]
struct SegmentSummary {
    newest_ms: i64,
    last: BTreeMap<String, (u64, String)>,
}

impl SegmentSummary {
    fn add(&mut self, r: &Record) {
        self.newest_ms = self.newest_ms.max(r.time_ms);
        self.last.insert(r.device.clone(), (r.seq, r.hash.clone()));
    }
}

struct Writer {
    cfg: WriterConfig,
    key: aws_lc_rs::signature::Ed25519KeyPair,
    segment: u64,
    file: Option<(File, u64)>,
    /// Every segment still on disk, by number (the current one included).
    summaries: BTreeMap<u64, SegmentSummary>,
    /// Per device: next sequence number and last hash (of what is on disk).
    heads: HashMap<String, (u64, String)>,
    /// Devices whose head changed since their last checkpoint.
    dirty: HashSet<String>,
    checkpointed: HashMap<String, u64>,
    /// Records that could not be written yet (nobody waits for them).
    retry: VecDeque<Record>,
    unsynced: bool,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    fail_writes: Arc<AtomicBool>,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        let mut next_checkpoint = Instant::now() + self.cfg.checkpoint_interval;
        let mut last_sync = Instant::now();
        loop {
            let wait = if !self.retry.is_empty() {
                RETRY_INTERVAL
            } else if self.unsynced {
                LAZY_SYNC_INTERVAL.saturating_sub(last_sync.elapsed())
            } else {
                next_checkpoint.saturating_duration_since(Instant::now())
            };
            let mut batch = Vec::new();
            let mut stop = false;
            match rx.recv_timeout(wait) {
                Ok(r) => batch.push(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut syncs = Vec::new();
            let mut appends = Vec::with_capacity(batch.len());
            for r in batch {
                match r {
                    Request::Sync { reply } => syncs.push(reply),
                    Request::Close { reply } => {
                        syncs.push(reply);
                        stop = true;
                    }
                    append => appends.push(append),
                }
            }
            let must_sync = appends
                .iter()
                .any(|r| matches!(r, Request::Append { reply: Some(_), .. }))
                || stop
                || !syncs.is_empty()
                || (self.unsynced && last_sync.elapsed() >= LAZY_SYNC_INTERVAL);
            self.write_batch(appends, must_sync);
            if must_sync && !self.unsynced {
                last_sync = Instant::now();
            }
            if Instant::now() >= next_checkpoint || stop || !syncs.is_empty() {
                self.checkpoint();
                if let Some(age) = self.cfg.retention {
                    if let Err(e) = self.prune(age) {
                        tracing::error!(error = %e, "audit retention failed; nothing was removed, retrying later");
                    }
                }
                next_checkpoint = Instant::now() + self.cfg.checkpoint_interval;
            }
            for reply in syncs {
                let _ = reply.send(self.retry.is_empty() && !self.unsynced);
            }
            if stop {
                return;
            }
        }
    }

    fn open_segment(&mut self) -> Result<&mut (File, u64), AuditError> {
        if let Some((_, len)) = &self.file {
            if *len >= self.cfg.segment_bytes {
                self.file = None;
                self.segment += 1;
            }
        }
        if self.file.is_none() {
            let path = self.cfg.dir.join(segment_name(self.segment));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            let len = file.metadata().map_err(|e| io(&path, e))?.len();
            if len == 0 {
                // Make the new file's directory entry durable.
                if let Ok(d) = File::open(&self.cfg.dir) {
                    let _ = d.sync_all();
                }
            }
            self.file = Some((file, len));
        }
        self.file
            .as_mut()
            .ok_or_else(|| AuditError::Unavailable("no segment".into()))
    }

    fn write_batch(&mut self, batch: Vec<Request>, must_sync: bool) {
        // Records waiting for a retry go first, in their original order.
        let mut items: Vec<(Record, Option<Reply>)> =
            self.retry.drain(..).map(|e| (e, None)).collect();
        items.extend(batch.into_iter().filter_map(|r| match r {
            Request::Append { event, reply } => Some((event, reply)),
            Request::Sync { .. } | Request::Close { .. } => None,
        }));
        if items.is_empty() && !(must_sync && self.unsynced) {
            return;
        }
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let mut working: HashMap<String, (u64, String)> = HashMap::new();
        let mut buf = Vec::new();
        let mut sealed = Vec::with_capacity(items.len());
        for (event, _) in &items {
            let head = working.entry(event.device.clone()).or_insert_with(|| {
                self.heads
                    .get(&event.device)
                    .cloned()
                    .unwrap_or((0, GENESIS.to_string()))
            });
            let record = event.clone().seal(head.0, now_ms as i64, &head.1);
            *head = (record.seq + 1, record.hash.clone());
            // A record is plain data; serialising it cannot fail.
            let _ = serde_json::to_writer(&mut buf, &record);
            buf.push(b'\n');
            sealed.push(record);
        }
        let started = std::time::Instant::now();
        let result = self.append(&buf, must_sync);
        if let Some(m) = &self.cfg.metrics {
            match &result {
                Ok(()) => {
                    m.audit_records.inc_by(sealed.len() as u64);
                    m.audit_write_us
                        .observe(started.elapsed().as_secs_f64() * 1_000_000.0);
                }
                Err(_) => {
                    m.audit_write_failures.inc();
                }
            }
        }
        match result {
            Ok(()) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("audit log writable again");
                }
                // `append` rotated (if it had to) before writing: the batch is in `segment`.
                let summary = self.summaries.entry(self.segment).or_default();
                for record in &sealed {
                    summary.add(record);
                }
                for (device, head) in working {
                    self.dirty.insert(device.clone());
                    self.heads.insert(device, head);
                }
                for ((_, reply), record) in items.into_iter().zip(sealed) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(record));
                    }
                }
            }
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "audit log write failed: commands are refused until it works again; other records are kept for retry");
                }
                for (event, reply) in items {
                    match reply {
                        Some(reply) => {
                            let _ = reply.send(Err(AuditError::Unavailable(e.to_string())));
                        }
                        None => {
                            if self.retry.len() >= RETRY_CAPACITY {
                                self.retry.pop_front();
                                self.lost.fetch_add(1, Ordering::Relaxed);
                            }
                            self.retry.push_back(event);
                        }
                    }
                }
            }
        }
    }

    /// Appends `buf` (and syncs if asked). On failure the file is cut back to its length
    /// before this call, so no partial record stays behind.
    fn append(&mut self, buf: &[u8], sync: bool) -> Result<(), AuditError> {
        let failing = self.fail_writes.load(Ordering::Relaxed);
        let dir = self.cfg.dir.clone();
        let (file, len) = self.open_segment()?;
        let before = *len;
        let written = if failing {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "injected write failure",
            ))
        } else {
            file.write_all(buf)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        };
        match written {
            Ok(()) => {
                *len += buf.len() as u64;
                self.unsynced = !sync && (self.unsynced || !buf.is_empty());
                Ok(())
            }
            Err(e) => {
                let _ = file.set_len(before);
                *len = before;
                Err(io(&dir.join(segment_name(self.segment)), e))
            }
        }
    }

    /// Removes the oldest segments whose newest record is older than `age`, oldest first and
    /// never the current one, so what remains is a contiguous tail of every chain. Before a
    /// segment goes, an anchor (device, last removed seq and hash) is signed and synced for
    /// each device in it; verification then starts those chains at their anchors.
    fn prune(&mut self, age: Duration) -> Result<(), AuditError> {
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let cutoff = now_ms - age.as_millis() as i64;
        loop {
            let Some((&n, summary)) = self.summaries.first_key_value() else {
                return Ok(());
            };
            if n >= self.segment || summary.newest_ms >= cutoff {
                return Ok(());
            }
            let path = self.cfg.dir.join(segment_name(n));
            let mut buf = Vec::new();
            for (device, (seq, hash)) in &summary.last {
                let _ = serde_json::to_writer(
                    &mut buf,
                    &Checkpoint::sign_anchor(&self.key, device, *seq, hash, now_ms),
                );
                buf.push(b'\n');
            }
            let devices = summary.last.len();
            let anchors = self.cfg.dir.join(ANCHORS_FILE);
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&anchors)
                .map_err(|e| io(&anchors, e))?;
            f.write_all(&buf)
                .and_then(|()| f.sync_data())
                .map_err(|e| io(&anchors, e))?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path, e)),
            }
            if let Ok(d) = File::open(&self.cfg.dir) {
                let _ = d.sync_all();
            }
            self.summaries.remove(&n);
            tracing::info!(segment = %path.display(), devices, "audit retention: pruned a segment, anchors signed");
        }
    }

    /// Signs the head of every device that changed since its last checkpoint.
    fn checkpoint(&mut self) {
        if self.dirty.is_empty() || self.unsynced || !self.retry.is_empty() {
            if self.unsynced {
                // Sign only what is on disk: sync first, checkpoint next time.
                let _ = self.append(&[], true);
            }
            return;
        }
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let mut buf = Vec::new();
        let mut done = Vec::new();
        for device in &self.dirty {
            let Some((next, hash)) = self.heads.get(device) else {
                continue;
            };
            if *next == 0 {
                continue;
            }
            let cp = Checkpoint::sign(&self.key, device, next - 1, hash, now_ms);
            let _ = serde_json::to_writer(&mut buf, &cp);
            buf.push(b'\n');
            done.push((device.clone(), next - 1));
        }
        let path = self.cfg.dir.join(CHECKPOINTS_FILE);
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                let before = f.metadata()?.len();
                let r = if self.fail_writes.load(Ordering::Relaxed) {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "injected write failure",
                    ))
                } else {
                    f.write_all(&buf).and_then(|()| f.sync_data())
                };
                if r.is_err() {
                    let _ = f.set_len(before);
                }
                r
            });
        match result {
            Ok(()) => {
                for (device, seq) in done {
                    self.dirty.remove(&device);
                    self.checkpointed.insert(device, seq);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, file = %path.display(), "audit checkpoint write failed; retrying at the next interval")
            }
        }
    }
}

impl super::AuditStore for AuditLog {
    fn record(&self, record: Record) {
        AuditLog::record(self, record)
    }

    fn record_durable(&self, record: Record) -> super::AuditFuture<Result<Record, AuditError>> {
        let log = self.clone();
        Box::pin(async move { AuditLog::record_durable(&log, record).await })
    }

    fn sync(&self) -> super::AuditFuture<bool> {
        let log = self.clone();
        Box::pin(async move { AuditLog::sync(&log).await })
    }

    fn close(&self) -> super::AuditFuture<bool> {
        let log = self.clone();
        Box::pin(async move { AuditLog::close(&log).await })
    }

    fn is_healthy(&self) -> bool {
        AuditLog::is_healthy(self)
    }

    fn lost(&self) -> u64 {
        AuditLog::lost(self)
    }

    fn export(&self, device: &str) -> super::AuditFuture<Result<super::Export, AuditError>> {
        let (dir, device) = (self.dir.clone(), device.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || super::export(&dir, &device))
                .await
                .map_err(|e| AuditError::Unavailable(e.to_string()))?
        })
    }

    fn devices(&self) -> super::AuditFuture<Result<Vec<String>, AuditError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                super::read(&dir).map(|c| c.records.into_keys().collect())
            })
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
        })
    }

    fn verify(
        &self,
        public_key: [u8; 32],
        device: Option<String>,
    ) -> super::AuditFuture<Result<super::DirVerdict, AuditError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                super::verify_dir(&dir, &public_key, device.as_deref())
            })
            .await
            .map_err(|e| AuditError::Unavailable(e.to_string()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{export, read, verify_device, verify_dir, verify_export, RecordKind};
    use std::path::Path;

    /// A log that prunes everything but the current segment at its next sync, with 12
    /// durable records each for d1 and d2 written (several segments).
    async fn pruning_log_with_two_devices(
        dir: &Path,
    ) -> (AuditLog, std::thread::JoinHandle<()>, [u8; 32]) {
        let (k, pk) = key();
        let mut c = cfg(dir);
        c.retention = Some(Duration::ZERO);
        let (log, thread) = AuditLog::open(c, k).unwrap();
        for n in 0..12 {
            log.record_durable(event("d1", n)).await.unwrap();
            log.record_durable(event("d2", n)).await.unwrap();
        }
        (log, thread, pk)
    }

    #[tokio::test]
    async fn retention_prunes_old_segments_and_the_rest_still_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread, pk) = pruning_log_with_two_devices(dir.path()).await;
        let before = segments(dir.path()).unwrap().len();
        assert!(before > 2);
        assert!(log.sync().await);
        drop(log);
        thread.join().unwrap();
        // Only the newest segment is left; its chains start at signed anchors.
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let contents = read(dir.path()).unwrap();
        assert!(!contents.anchors.is_empty());
        assert!(contents.records["d1"][0].seq > 0);
        let v = verify_dir(dir.path(), &pk, None).unwrap();
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        // An export of a pruned device carries its anchor and verifies offline.
        let e = export(dir.path(), "d1").unwrap();
        assert!(!e.anchors.is_empty());
        verify_export(&e, &pk).unwrap();
        // Deleting the anchors makes the pruned prefix look like missing records.
        std::fs::remove_file(dir.path().join(ANCHORS_FILE)).unwrap();
        let v = verify_dir(dir.path(), &pk, None).unwrap();
        assert!(!v.failures.is_empty());
    }

    /// Retention decides from what the writer recorded about each segment as it wrote it;
    /// it never reads a segment back (here the old segments are overwritten with garbage
    /// before pruning, and the anchors still come out right).
    #[tokio::test]
    async fn retention_never_reads_a_segment_back() {
        let dir = tempfile::tempdir().unwrap();
        let (log, thread, pk) = pruning_log_with_two_devices(dir.path()).await;
        let segs = segments(dir.path()).unwrap();
        assert!(segs.len() > 2);
        for (_, path) in &segs[..segs.len() - 1] {
            let len = std::fs::metadata(path).unwrap().len() as usize;
            std::fs::write(path, vec![b'x'; len]).unwrap();
        }
        assert!(log.close().await);
        thread.join().unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let v = verify_dir(dir.path(), &pk, None).unwrap();
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.verified.len(), 2);
    }

    /// One device's log is read without parsing the other devices' lines.
    #[tokio::test]
    async fn one_device_is_read_without_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        let (log, thread) = AuditLog::open(cfg(dir.path()), k).unwrap();
        for n in 0..3 {
            log.record_durable(event("d1", n)).await.unwrap();
            log.record_durable(event("d10", n)).await.unwrap();
        }
        assert!(log.close().await);
        thread.join().unwrap();
        // A damaged line of another device: the whole-directory read reports it, the
        // one-device read never looks at it.
        let last = segments(dir.path()).unwrap().last().unwrap().1.clone();
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(b"{\"device\":\"d10\",damaged\n").unwrap();
        drop(f);
        assert_eq!(read(dir.path()).unwrap().unreadable.len(), 1);
        let one = crate::audit::read_device(dir.path(), "d1").unwrap();
        assert!(one.unreadable.is_empty());
        assert_eq!(one.records.keys().collect::<Vec<_>>(), vec!["d1"]);
        assert_eq!(one.records["d1"].len(), 3);
        assert!(one.checkpoints.iter().all(|c| c.device == "d1"));
        let v = verify_dir(dir.path(), &pk, Some("d1")).unwrap();
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(export(dir.path(), "d1").unwrap().records.len(), 3);
    }

    use aws_lc_rs::signature::KeyPair;

    fn key() -> (aws_lc_rs::signature::Ed25519KeyPair, [u8; 32]) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let k = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let pk = k.public_key().as_ref().try_into().unwrap();
        (k, pk)
    }

    fn cfg(dir: &Path) -> WriterConfig {
        WriterConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 600,
            checkpoint_interval: Duration::from_secs(3600),
            retention: None,
            metrics: None,
        }
    }

    fn event(device: &str, n: u64) -> Record {
        Record {
            device: device.into(),
            kind: RecordKind::CommandSent,
            command_id: Some(serde_json::json!(n)),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn durable_records_chain_across_segments_restarts_and_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        {
            let (log, thread) = AuditLog::open(cfg(dir.path()), k).unwrap();
            for n in 0..6 {
                let r = log.record_durable(event("d1", n)).await.unwrap();
                assert_eq!(r.seq, n);
            }
            log.record(event("d2", 0));
            drop(log);
            thread.join().unwrap();
        }
        assert!(segments(dir.path()).unwrap().len() > 1, "segments rotate");
        // A crash in the middle of a write leaves a torn line: recovery cuts it off.
        let last = segments(dir.path()).unwrap().last().unwrap().1.clone();
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(b"{\"device\":\"d1\",\"seq\":6,\"ti").unwrap();
        drop(f);
        let (k2, _) = key();
        let (log, thread) = AuditLog::open(cfg(dir.path()), k2).unwrap();
        let r = log.record_durable(event("d1", 6)).await.unwrap();
        assert_eq!(r.seq, 6);
        drop(log);
        thread.join().unwrap();
        let c = read(dir.path()).unwrap();
        assert!(c.unreadable.is_empty(), "{:?}", c.unreadable);
        assert_eq!(c.records["d1"].len(), 7);
        assert_eq!(c.records["d2"].len(), 1);
        // The first writer's checkpoints verify with its key; the second's were signed with
        // another key, so only checkpoints of the first key are kept for this check.
        let cps: Vec<_> = c
            .checkpoints
            .iter()
            .filter(|cp| cp.verify(&pk))
            .cloned()
            .collect();
        assert!(!cps.is_empty());
        verify_device("d1", &c.records["d1"], &cps, &pk, None).unwrap();
    }

    #[tokio::test]
    async fn failed_writes_fail_durable_callers_and_lose_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        let mut cfg = cfg(dir.path());
        cfg.segment_bytes = crate::config::DEFAULT_AUDIT_SEGMENT_BYTES;
        let (log, thread) = AuditLog::open(cfg, k).unwrap();
        log.record_durable(event("d1", 0)).await.unwrap();
        log.fail_writes(true);
        log.record(event("d1", 1));
        assert!(matches!(
            log.record_durable(event("d1", 2)).await,
            Err(AuditError::Unavailable(_))
        ));
        assert!(!log.is_healthy());
        log.fail_writes(false);
        // The retried record and this one land, in order, with no gap.
        let r = log.record_durable(event("d1", 3)).await.unwrap();
        assert_eq!(r.seq, 2);
        assert!(log.is_healthy());
        drop(log);
        thread.join().unwrap();
        let c = read(dir.path()).unwrap();
        let ids: Vec<u64> = c.records["d1"]
            .iter()
            .map(|r| r.command_id.as_ref().unwrap().as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![0, 1, 3]);
        verify_device("d1", &c.records["d1"], &c.checkpoints, &pk, None).unwrap();
    }
}
