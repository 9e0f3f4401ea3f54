//! A simulated fleet: loads devices (a pki directory or a manifest), connects each with its own
//! certificate at a bounded connection rate, sends telemetry at a given rate, answers
//! commands, and reports what happened.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::{ClientConfig, RootCertStore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::device::{self, Refused, Target};

/// One device of the fleet, ready to connect.
#[derive(Clone)]
pub struct FleetDevice {
    pub id: String,
    pub device_type: String,
    pub config: Arc<ClientConfig>,
}

fn load_device(
    roots: &Arc<RootCertStore>,
    id: &str,
    device_type: &str,
    cert: &Path,
) -> anyhow::Result<FleetDevice> {
    let key = cert.with_extension("key");
    let cert_pem = std::fs::read(cert).map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let key_pem = std::fs::read(&key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    Ok(FleetDevice {
        id: id.to_string(),
        device_type: device_type.to_string(),
        config: device::client_config(roots.clone(), &cert_pem, &key_pem)?,
    })
}

/// Every device certificate in a pki directory that is not revoked, optionally of one type.
pub fn from_pki_dir(
    dir: &Path,
    roots: &Arc<RootCertStore>,
    device_type: Option<&str>,
) -> anyhow::Result<Vec<FleetDevice>> {
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
        out.push(load_device(
            roots,
            &e.id,
            &e.device_type,
            &dir.join(&e.cert),
        )?);
    }
    out.reverse();
    Ok(out)
}

/// Every device in a manifest (keys next to the certificates, `.key` for `.pem`).
pub fn from_manifest(path: &Path, roots: &Arc<RootCertStore>) -> anyhow::Result<Vec<FleetDevice>> {
    let manifest = gatehouse_pki::Manifest::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    manifest
        .devices
        .iter()
        .map(|e| load_device(roots, &e.id, &e.device_type, &base.join(&e.cert)))
        .collect()
}

#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub target: Target,
    /// Subprotocols offered, comma-separated, in preference order.
    pub protocols: String,
    /// Telemetry frames per second per device (0: none).
    pub rate_hz: f64,
    /// How long each device stays connected.
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
}

/// What one device saw.
#[derive(Debug, Default)]
struct DeviceOutcome {
    refused: Option<Refused>,
    connect_us: Option<u64>,
    sent: u64,
    received: u64,
    answered: u64,
    close: Option<u16>,
    error: Option<String>,
}

/// What the fleet saw.
#[derive(Debug)]
pub struct FleetReport {
    pub devices: usize,
    pub connected: u64,
    pub refused: BTreeMap<String, u64>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub commands_answered: u64,
    pub closes: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub connect_latency: hdrhistogram::Histogram<u64>,
    pub elapsed: Duration,
}

impl FleetReport {
    pub fn print(&self) {
        self.print_indented("");
    }

    pub fn print_indented(&self, pad: &str) {
        println!(
            "{pad}fleet: {} device(s) in {:.1?}",
            self.devices, self.elapsed
        );
        println!("{pad}  connected          {}", self.connected);
        for (why, n) in &self.refused {
            println!("{pad}  refused            {n:>6}  {why}");
        }
        if !self.connect_latency.is_empty() {
            println!(
                "{pad}  connect time       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                self.connect_latency.value_at_quantile(0.5) as f64 / 1000.0,
                self.connect_latency.value_at_quantile(0.99) as f64 / 1000.0,
                self.connect_latency.max() as f64 / 1000.0
            );
        }
        println!("{pad}  telemetry sent     {}", self.frames_sent);
        println!("{pad}  frames received    {}", self.frames_received);
        println!("{pad}  commands answered  {}", self.commands_answered);
        for (code, n) in &self.closes {
            println!("{pad}  closed with {code}    {n}");
        }
        for (e, n) in &self.errors {
            println!("{pad}  error              {n:>6}  {e}");
        }
    }
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
    let value: serde_json::Value = serde_json::from_str(command).ok()?;
    if value.get("$gatehouse").is_some() {
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

async fn run_device(
    device: FleetDevice,
    options: Arc<FleetOptions>,
    source: Option<IpAddr>,
    shutdown: CancellationToken,
) -> DeviceOutcome {
    let mut out = DeviceOutcome::default();
    let started = Instant::now();
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return out,
        r = device::connect(&options.target, device.config.clone(), &options.protocols, source, options.connect_timeout) => r,
    };
    let (mut ws, _proto) = match connected {
        Ok(ok) => ok,
        Err(refused) => {
            out.refused = Some(refused);
            return out;
        }
    };
    out.connect_us = Some(started.elapsed().as_micros() as u64);
    let deadline = tokio::time::Instant::now() + options.duration;
    let period = if options.rate_hz > 0.0 {
        Some(Duration::from_secs_f64(1.0 / options.rate_hz))
    } else {
        None
    };
    let mut tick = tokio::time::interval(period.unwrap_or(options.duration));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick(), if period.is_some() => {
                seq += 1;
                if let Err(e) = ws.send(Message::text(telemetry(&device.device_type, &device.id, seq))).await {
                    out.error = Some(e.to_string());
                    return out;
                }
                out.sent += 1;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    out.received += 1;
                    if let Some(reply) = answer(&device.id, &t, options.error_rate) {
                        if !options.response_delay.is_zero() {
                            tokio::time::sleep(options.response_delay).await;
                        }
                        if ws.send(Message::text(reply)).await.is_ok() {
                            out.answered += 1;
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    out.close = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                    // Let tungstenite send the echo.
                    while let Some(Ok(_)) = ws.next().await {}
                    return out;
                }
                Some(Ok(_)) => out.received += 1,
                Some(Err(e)) => {
                    out.error = Some(e.to_string());
                    return out;
                }
                None => {
                    out.error = Some("connection ended without a close frame".into());
                    return out;
                }
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
            if let Message::Close(f) = msg {
                out.close = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
        }
    })
    .await;
    out
}

/// Runs the fleet to completion (or until `shutdown`).
pub async fn run(
    devices: Vec<FleetDevice>,
    options: FleetOptions,
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
            shutdown.clone(),
        ));
    }
    let mut report = FleetReport {
        devices: count,
        connected: 0,
        refused: BTreeMap::new(),
        frames_sent: 0,
        frames_received: 0,
        commands_answered: 0,
        closes: BTreeMap::new(),
        errors: BTreeMap::new(),
        connect_latency: hdrhistogram::Histogram::new(3)
            .expect("3 significant digits is a valid precision"),
        elapsed: Duration::ZERO,
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
        if let Some(us) = out.connect_us {
            report.connected += 1;
            let _ = report.connect_latency.record(us);
        }
        if let Some(r) = out.refused {
            *report.refused.entry(r.to_string()).or_default() += 1;
        }
        report.frames_sent += out.sent;
        report.frames_received += out.received;
        report.commands_answered += out.answered;
        if let Some(code) = out.close {
            *report.closes.entry(code).or_default() += 1;
        }
        if let Some(e) = out.error {
            *report.errors.entry(e).or_default() += 1;
        }
    }
    report.elapsed = started.elapsed();
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
