//! A simulated fleet: loads devices (a pki directory or a manifest), connects each with its own
//! certificate at a bounded connection rate, sends telemetry that fits the device type's
//! schema (JSON, CBOR or both, with a share of invalid frames), answers commands, reconnects
//! as real devices do after a close or a refusal, and reports what happened.
//!
//! - [`backoff`]: when a device tries again (pure).
//! - [`payload`]: frames from the device type's schema.
//! - [`report`]: the report and how reports of several processes merge.
//! - [`workers`]: a fleet spread over worker processes.

pub mod backoff;
pub mod payload;
pub mod report;
pub mod workers;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::{ClientConfig, RootCertStore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::device::{self, DeviceSocket, Refused, Target};
pub use backoff::Backoff;
pub use payload::{Encoding, Generator};
pub use report::{FleetReport, Latency};

/// One device of the fleet, ready to connect.
#[derive(Clone)]
pub struct FleetDevice {
    pub id: String,
    pub device_type: String,
    pub config: Arc<ClientConfig>,
}

/// A device as listed in a pki directory or manifest, before its key is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetEntry {
    pub id: String,
    pub device_type: String,
    pub cert: PathBuf,
}

impl FleetEntry {
    /// Loads the certificate and its key (`.key` next to the `.pem`).
    pub fn load(&self, roots: &Arc<RootCertStore>) -> anyhow::Result<FleetDevice> {
        let key = self.cert.with_extension("key");
        let read = |p: &Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        Ok(FleetDevice {
            id: self.id.clone(),
            device_type: self.device_type.clone(),
            config: device::client_config(roots.clone(), &read(&self.cert)?, &read(&key)?)?,
        })
    }
}

/// Every device certificate in a pki directory that is not revoked, optionally of one type.
pub fn entries_from_pki_dir(
    dir: &Path,
    device_type: Option<&str>,
) -> anyhow::Result<Vec<FleetEntry>> {
    let pki = gatehouse_pki::PkiDir::open(dir)?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    // The newest certificate of each device is the one on disk.
    for e in pki.entries().iter().rev() {
        if e.revoked_at.is_some() || !seen.insert(e.id.clone()) {
            continue;
        }
        if device_type.is_some_and(|t| t != e.device_type) {
            continue;
        }
        out.push(FleetEntry {
            id: e.id.clone(),
            device_type: e.device_type.clone(),
            cert: dir.join(&e.cert),
        });
    }
    out.reverse();
    Ok(out)
}

/// Every device in a manifest.
pub fn entries_from_manifest(path: &Path) -> anyhow::Result<Vec<FleetEntry>> {
    let manifest = gatehouse_pki::Manifest::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(manifest
        .devices
        .iter()
        .map(|e| FleetEntry {
            id: e.id.clone(),
            device_type: e.device_type.clone(),
            cert: base.join(&e.cert),
        })
        .collect())
}

/// Loads every entry's certificate and key.
pub fn load_all(
    entries: &[FleetEntry],
    roots: &Arc<RootCertStore>,
) -> anyhow::Result<Vec<FleetDevice>> {
    entries.iter().map(|e| e.load(roots)).collect()
}

/// Every unrevoked device in a pki directory, loaded.
pub fn from_pki_dir(
    dir: &Path,
    roots: &Arc<RootCertStore>,
    device_type: Option<&str>,
) -> anyhow::Result<Vec<FleetDevice>> {
    load_all(&entries_from_pki_dir(dir, device_type)?, roots)
}

/// Every device in a manifest, loaded.
pub fn from_manifest(path: &Path, roots: &Arc<RootCertStore>) -> anyhow::Result<Vec<FleetDevice>> {
    load_all(&entries_from_manifest(path)?, roots)
}

/// Frame generators by device type; a type without one sends [`telemetry`]'s fixed shape.
#[derive(Clone, Default)]
pub struct Payloads(pub Arc<BTreeMap<String, Generator>>);

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl Payloads {
    /// A generator for each of `types` from `<schemas>/<type>/telemetry.schema.json`.
    pub fn load<'a>(
        schemas: &Path,
        types: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<Self> {
        let mut out = BTreeMap::new();
        for ty in types {
            if !out.contains_key(ty) {
                let g = Generator::load(schemas, ty)
                    .map_err(|e| anyhow::anyhow!("device type {ty}: {e}"))?;
                out.insert(ty.to_string(), g);
            }
        }
        Ok(Self(Arc::new(out)))
    }
}

#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub target: Target,
    /// Subprotocols offered, comma-separated, in preference order.
    pub protocols: String,
    /// Telemetry frames per second per device (0: none).
    pub rate_hz: f64,
    /// How long each device runs, from its first attempt (reconnects included).
    pub duration: Duration,
    /// New connections per second across the fleet.
    pub connect_rate: u32,
    pub connect_timeout: Duration,
    /// Source addresses to spread connections over (empty: the OS chooses).
    pub sources: Vec<IpAddr>,
    /// Delay before a device answers a command.
    pub response_delay: Duration,
    /// Fraction of commands answered with `"status":"error"` (0.0-1.0).
    pub error_rate: f64,
    /// Schema-fitting frame generators (empty: a fixed shape per known type).
    pub payloads: Payloads,
    pub encoding: Encoding,
    /// Share of telemetry frames made to fail the schema (0.0-1.0).
    pub invalid_share: f64,
    /// Pad telemetry frames to about this many bytes (where the schema has room).
    pub frame_bytes: Option<usize>,
    /// Reconnect after a close or a refusal (`None`: every device tries once).
    pub reconnect: Option<Backoff>,
    /// Seed of every device's random choices (jitter, invalid frames, encodings).
    pub seed: u64,
    /// How long each session lasts before the device closes it (`None`: until the run ends).
    pub session_hold: Option<Duration>,
    /// Sessions a device opens one after another, each `session_hold` long, with the same
    /// TLS client (so every one after the first can resume its TLS session).
    pub sessions_per_device: u32,
}

impl FleetOptions {
    /// A fleet that connects once per device, sends JSON, and answers commands at once.
    pub fn new(target: Target, protocols: impl Into<String>) -> Self {
        Self {
            target,
            protocols: protocols.into(),
            rate_hz: 1.0,
            duration: Duration::from_secs(10),
            connect_rate: 500,
            connect_timeout: Duration::from_secs(10),
            sources: Vec::new(),
            response_delay: Duration::ZERO,
            error_rate: 0.0,
            payloads: Payloads::default(),
            encoding: Encoding::Json,
            invalid_share: 0.0,
            frame_bytes: None,
            reconnect: None,
            seed: 1,
            session_hold: None,
            sessions_per_device: 1,
        }
    }
}

/// Counters the fleet updates as it runs, for the live progress line.
#[derive(Debug, Default)]
pub struct Live {
    connected: AtomicU64,
    sessions: AtomicU64,
    refused: AtomicU64,
    sent: AtomicU64,
    ended: AtomicU64,
    errors: AtomicU64,
    /// Frames that came back (from an echo backend) to the device that sent them.
    echo: std::sync::Mutex<Latency>,
}

/// One reading of [`Live`]; worker processes send theirs to the coordinator, which adds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Sessions open now.
    pub connected: u64,
    pub sessions: u64,
    pub refused: u64,
    pub sent: u64,
    /// Sessions ended by the gateway or the network (not by the simulation).
    pub ended: u64,
    pub errors: u64,
}

impl Live {
    fn record_echo(&self, us: u64) {
        self.echo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(us);
    }

    pub fn progress(&self) -> Progress {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Progress {
            connected: l(&self.connected),
            sessions: l(&self.sessions),
            refused: l(&self.refused),
            sent: l(&self.sent),
            ended: l(&self.ended),
            errors: l(&self.errors),
        }
    }
}

impl Progress {
    pub fn add(&mut self, other: &Progress) {
        self.connected += other.connected;
        self.sessions += other.sessions;
        self.refused += other.refused;
        self.sent += other.sent;
        self.ended += other.ended;
        self.errors += other.errors;
    }

    /// `[ 12s] connected 8990/9000  refused 10  1500 frames/s  ended 0  errors 0`, the rate
    /// since `before`, `dt` earlier.
    pub fn line(&self, elapsed: Duration, devices: u64, before: &Progress, dt: Duration) -> String {
        let fps = (self.sent.saturating_sub(before.sent)) as f64 / dt.as_secs_f64().max(0.001);
        format!(
            "[{:>5.0}s] connected {}/{devices}  sessions {}  refused {}  {fps:.0} frames/s  ended {}  errors {}",
            elapsed.as_secs_f64(),
            self.connected,
            self.sessions,
            self.refused,
            self.ended,
            self.errors
        )
    }
}

/// What one device saw over its run.
#[derive(Debug, Default)]
struct DeviceOutcome {
    sessions: u64,
    resumed: u64,
    reconnects: u64,
    gave_up: bool,
    refused: Vec<Refused>,
    handshake_us: Vec<u64>,
    back_after_us: Vec<u64>,
    sent: u64,
    invalid: u64,
    bytes: u64,
    received: u64,
    error_frames: u64,
    answered: u64,
    closes: Vec<u16>,
    errors: Vec<String>,
}

/// How a session ended.
enum End {
    /// The run is over (its time, or shutdown): the device closed normally.
    Over,
    /// The session lasted its `session_hold`: the device closed it normally.
    Held,
    /// The gateway closed it with this code.
    Closed(u16),
    /// The connection failed.
    Failed(String),
}

/// A small, deterministic telemetry payload for the device's type.
pub fn telemetry(device_type: &str, id: &str, seq: u64) -> String {
    let h = id
        .bytes()
        .fold(seq, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    let ts = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    match device_type {
        "env-sensor" => format!(
            r#"{{"type":"reading","seq":{seq},"ts":{ts},"temperature_c":{:.1},"humidity_pct":{:.1}}}"#,
            15.0 + (h % 150) as f64 / 10.0,
            30.0 + (h % 400) as f64 / 10.0
        ),
        "door-lock" => format!(
            r#"{{"type":"status","seq":{seq},"ts":{ts},"locked":{},"battery_pct":{}}}"#,
            h % 2 == 0,
            20 + h % 80
        ),
        _ => format!(r#"{{"seq":{seq},"ts":{ts}}}"#),
    }
}

/// The answer to a command frame, or `None` if the frame is not a command (or is one of the
/// gateway's error frames). A fraction `error_rate` of answers (chosen deterministically from
/// the device and command id) report a failure.
pub fn answer(device: &str, command: &str, error_rate: f64) -> Option<String> {
    answer_value(device, &serde_json::from_str(command).ok()?, error_rate)
}

/// [`answer`] for a frame already decoded.
fn answer_value(device: &str, value: &serde_json::Value, error_rate: f64) -> Option<String> {
    if is_error_frame(value) {
        return None;
    }
    let id = value.get("id")?;
    let h = device
        .bytes()
        .chain(id.to_string().into_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
            (a ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let failed = (h % 10_000) as f64 / 10_000.0 < error_rate;
    Some(if failed {
        serde_json::json!({"id": id, "status": "error", "error": "simulated failure"}).to_string()
    } else {
        serde_json::json!({"id": id, "status": "ok"}).to_string()
    })
}

fn seed_for(seed: u64, id: &str) -> u64 {
    id.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |a, b| {
        (a ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sleeps until `at` unless the run is over first; false when it is.
async fn wait_until(
    at: tokio::time::Instant,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> bool {
    if at >= deadline {
        return false;
    }
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep_until(at) => true,
    }
}

async fn run_device(
    device: FleetDevice,
    options: Arc<FleetOptions>,
    source: Option<IpAddr>,
    live: Arc<Live>,
    shutdown: CancellationToken,
) -> DeviceOutcome {
    let mut out = DeviceOutcome::default();
    let mut rng = fastrand::Rng::with_seed(seed_for(options.seed, &device.id));
    let never = options
        .reconnect
        .as_ref()
        .is_some_and(|b| b.never_reconnects(rng.f64()));
    let deadline = tokio::time::Instant::now() + options.duration;
    let mut attempts = backoff::Attempts::default();
    // When this device lost its session (or was first refused), until it has one again.
    let mut down_since: Option<Instant> = None;
    let mut seq = 0u64;
    loop {
        if shutdown.is_cancelled() || tokio::time::Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = device::connect(&options.target, device.config.clone(), &options.protocols, source, options.connect_timeout) => r,
        };
        let (session, retry_after) = match connected {
            Err(refused) => {
                live.refused.fetch_add(1, Ordering::Relaxed);
                let retry_after = refused.retry_after();
                out.refused.push(refused);
                (None, retry_after)
            }
            Ok((mut ws, _proto)) => {
                out.handshake_us.push(started.elapsed().as_micros() as u64);
                if let device::Stream::Tls(tls) = ws.get_ref() {
                    out.resumed += u64::from(
                        tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                    );
                }
                if let Some(since) = down_since.take() {
                    out.back_after_us.push(since.elapsed().as_micros() as u64);
                }
                if out.sessions > 0 || !out.refused.is_empty() {
                    out.reconnects += 1;
                }
                out.sessions += 1;
                live.sessions.fetch_add(1, Ordering::Relaxed);
                live.connected.fetch_add(1, Ordering::Relaxed);
                let opened = Instant::now();
                let end = session(
                    &mut ws, &device, &options, &mut rng, &mut seq, &mut out, &live, deadline,
                    &shutdown,
                )
                .await;
                live.connected.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::Over => break,
                    End::Held if out.sessions < u64::from(options.sessions_per_device.max(1)) => {
                        continue
                    }
                    End::Held => break,
                    End::Closed(code) => out.closes.push(code),
                    End::Failed(e) => {
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        out.errors.push(e);
                    }
                }
                live.ended.fetch_add(1, Ordering::Relaxed);
                (Some(opened.elapsed()), None)
            }
        };
        let Some(backoff) = options.reconnect.as_ref() else {
            break;
        };
        if never {
            out.gave_up = true;
            break;
        }
        // Down since the session ended, or since the first refused attempt.
        down_since.get_or_insert(if session.is_some() {
            Instant::now()
        } else {
            started
        });
        let attempt = attempts.next(backoff, session);
        let wait = backoff.delay(attempt, retry_after, rng.f64());
        if !wait_until(tokio::time::Instant::now() + wait, deadline, &shutdown).await {
            break;
        }
    }
    out
}

/// One open session: telemetry at the device's rate, answers to commands, until the run is
/// over or the gateway ends it.
#[allow(clippy::too_many_arguments)]
async fn session(
    ws: &mut DeviceSocket,
    device: &FleetDevice,
    options: &FleetOptions,
    rng: &mut fastrand::Rng,
    seq: &mut u64,
    out: &mut DeviceOutcome,
    live: &Live,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> End {
    let period = (options.rate_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / options.rate_hz));
    // The first frame at a random point of the period, so a fleet does not send in lockstep.
    let first =
        tokio::time::Instant::now() + period.map(|p| p.mul_f64(rng.f64())).unwrap_or_default();
    let mut tick = tokio::time::interval_at(
        first,
        period.unwrap_or(options.duration.max(Duration::from_secs(1))),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let generator = options.payloads.0.get(&device.device_type);
    let ends = match options.session_hold {
        Some(hold) => deadline.min(tokio::time::Instant::now() + hold),
        None => deadline,
    };
    let held = ends < deadline;
    // Frames in flight by seq, for the round trip through an echo backend.
    let mut in_flight: std::collections::VecDeque<(u64, Instant)> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(ends) => break,
            _ = tick.tick(), if period.is_some() => {
                *seq += 1;
                let invalid = options.invalid_share > 0.0 && rng.f64() < options.invalid_share;
                let message = match generator {
                    Some(g) => {
                        let stamp = payload::Stamp {
                            seq: *seq,
                            ts_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
                        };
                        match g.frame(rng, stamp, options.encoding, invalid, options.frame_bytes) {
                            payload::Frame::Text(t) => Message::text(t),
                            payload::Frame::Binary(b) => Message::binary(b),
                        }
                    }
                    None => Message::text(telemetry(&device.device_type, &device.id, *seq)),
                };
                let len = message.len() as u64;
                if in_flight.len() == 64 {
                    in_flight.pop_front();
                }
                in_flight.push_back((*seq, Instant::now()));
                if let Err(e) = ws.send(message).await {
                    return End::Failed(e.to_string());
                }
                out.sent += 1;
                out.invalid += u64::from(invalid && generator.is_some());
                out.bytes += len;
                live.sent.fetch_add(1, Ordering::Relaxed);
            }
            msg = ws.next() => match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    out.received += 1;
                    let value = decode(&msg);
                    if value.as_ref().is_some_and(is_error_frame) {
                        out.error_frames += 1;
                    } else if let Some(us) = echoed(&mut in_flight, value.as_ref()) {
                        live.record_echo(us);
                    } else if let (Message::Text(_), Some(v)) = (&msg, &value) {
                        if let Some(reply) = answer_value(&device.id, v, options.error_rate) {
                            if !options.response_delay.is_zero() {
                                tokio::time::sleep(options.response_delay).await;
                            }
                            if ws.send(Message::text(reply)).await.is_ok() {
                                out.answered += 1;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    // Let tungstenite send the echo.
                    while let Some(Ok(_)) = ws.next().await {}
                    return End::Closed(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::Failed(e.to_string()),
                None => return End::Failed("connection ended without a close frame".into()),
            },
        }
    }
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "simulation over".into(),
        }))
        .await;
    // Read until the gateway's close answer, bounded.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                Message::Close(f) => out
                    .closes
                    .push(f.map(|f| u16::from(f.code)).unwrap_or(1005)),
                // Answers to the last frames, still in flight when the device closed.
                msg @ (Message::Text(_) | Message::Binary(_)) => {
                    out.received += 1;
                    out.error_frames += u64::from(decode(&msg).is_some_and(|v| is_error_frame(&v)));
                }
                _ => {}
            }
        }
    })
    .await;
    if held {
        End::Held
    } else {
        End::Over
    }
}

/// A text (JSON) or binary (CBOR) frame from the gateway, decoded once.
fn decode(msg: &Message) -> Option<serde_json::Value> {
    match msg {
        Message::Text(t) => serde_json::from_str(t).ok(),
        // The gateway answers a CBOR frame with a CBOR error frame.
        Message::Binary(b) => ciborium::from_reader(&b[..]).ok(),
        _ => None,
    }
}

/// One of the gateway's error frames (`{"$gatehouse":"error",...}`).
fn is_error_frame(value: &serde_json::Value) -> bool {
    value.get("$gatehouse").is_some()
}

/// The round trip of a frame that came back, if `value` is one this device sent.
fn echoed(
    in_flight: &mut std::collections::VecDeque<(u64, Instant)>,
    value: Option<&serde_json::Value>,
) -> Option<u64> {
    let seq = value?.get("seq")?.as_u64()?;
    let at = in_flight.iter().position(|(s, _)| *s == seq)?;
    let (_, sent) = in_flight.remove(at)?;
    // Older frames did not come back in order: drop them.
    in_flight.drain(..at);
    Some(sent.elapsed().as_micros() as u64)
}

/// Runs the fleet to completion (or until `shutdown`).
pub async fn run(
    devices: Vec<FleetDevice>,
    options: FleetOptions,
    shutdown: CancellationToken,
) -> FleetReport {
    run_with(devices, options, Arc::new(Live::default()), shutdown).await
}

/// [`run`], updating `live` as it goes (for a progress line).
pub async fn run_with(
    devices: Vec<FleetDevice>,
    options: FleetOptions,
    live: Arc<Live>,
    shutdown: CancellationToken,
) -> FleetReport {
    let started = Instant::now();
    let count = devices.len();
    let options = Arc::new(options);
    let mut set = JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / f64::from(options.connect_rate.max(1)));
    let mut pace = tokio::time::interval(gap);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for (i, device) in devices.into_iter().enumerate() {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = pace.tick() => {}
        }
        let source = if options.sources.is_empty() {
            None
        } else {
            Some(options.sources[i % options.sources.len()])
        };
        set.spawn(run_device(
            device,
            options.clone(),
            source,
            live.clone(),
            shutdown.clone(),
        ));
    }
    let mut report = FleetReport {
        devices: count as u64,
        processes: 1,
        ..FleetReport::default()
    };
    while let Some(joined) = set.join_next().await {
        let out = match joined {
            Ok(out) => out,
            Err(e) => {
                *report
                    .errors
                    .entry(format!("device task failed: {e}"))
                    .or_default() += 1;
                continue;
            }
        };
        report.connected += u64::from(out.sessions > 0);
        report.sessions += out.sessions;
        report.resumed += out.resumed;
        report.reconnects += out.reconnects;
        report.gave_up += u64::from(out.gave_up);
        for us in out.handshake_us {
            report.handshake.record(us);
        }
        for us in out.back_after_us {
            report.reconnect.record(us);
        }
        for r in out.refused {
            *report.refused.entry(r.to_string()).or_default() += 1;
        }
        report.frames_sent += out.sent;
        report.invalid_sent += out.invalid;
        report.bytes_sent += out.bytes;
        report.frames_received += out.received;
        report.error_frames += out.error_frames;
        report.commands_answered += out.answered;
        for code in out.closes {
            *report.closes.entry(code).or_default() += 1;
        }
        for e in out.errors {
            *report.errors.entry(e).or_default() += 1;
        }
    }
    report.echo = live.echo.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report
}

/// Default CA path for a pki directory.
pub fn default_ca(dir: &Path) -> PathBuf {
    dir.join(gatehouse_pki::PkiDir::CA_CERT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_echo_the_id_and_fail_at_the_given_rate() {
        let ok = answer("d", r#"{"id":7,"command":"lock"}"#, 0.0).unwrap();
        assert_eq!(ok, r#"{"id":7,"status":"ok"}"#);
        assert!(answer("d", r#"{"$gatehouse":"error","id":7}"#, 0.0).is_none());
        assert!(answer("d", "not json", 0.0).is_none());
        let failed = (0..1000)
            .filter(|n| {
                answer("d", &format!(r#"{{"id":{n}}}"#), 0.2)
                    .unwrap()
                    .contains("error")
            })
            .count();
        assert!((120..280).contains(&failed), "{failed}");
        assert!(answer("d", r#"{"id":1}"#, 1.0)
            .unwrap()
            .contains("simulated failure"));
    }
}
