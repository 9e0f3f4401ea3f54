//! Sample backends for demos and tests: `ingest` counts the telemetry it receives per device;
//! `control` also sends commands to every connected device and counts the answers. Both read
//! the identity headers the gateway sets and count connections that lack them. `echo` sends
//! every message back as it came (the server behind the Autobahn conformance run).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fleet::Latency;

/// Counters a backend keeps.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub connections: AtomicU64,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub commands_sent: AtomicU64,
    pub responses: AtomicU64,
    pub missing_identity: AtomicU64,
    per_device: Mutex<BTreeMap<String, u64>>,
    latencies: Mutex<Latencies>,
}

#[derive(Debug, Default)]
struct Latencies {
    telemetry: Latency,
    command_round_trip: Latency,
}

/// What `/stats` answers: the counters and both latency distributions.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StatsReport {
    pub connections: u64,
    pub frames: u64,
    pub bytes: u64,
    pub commands_sent: u64,
    pub responses: u64,
    pub missing_identity: u64,
    pub devices: u64,
    /// The frame's `ts` (milliseconds since the epoch) to its arrival here.
    pub telemetry_latency: Latency,
    /// A command sent to its answer received.
    pub command_round_trip: Latency,
}

/// Asks a sample backend for its figures (`ws://HOST:PORT`); with `reset`, it also starts its
/// latency distributions afresh (what a fleet run does at its start).
pub async fn fetch_stats(base: &str, reset: bool) -> anyhow::Result<StatsReport> {
    let url = format!(
        "{}/stats{}",
        base.trim_end_matches('/'),
        if reset { "/reset" } else { "" }
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    while let Some(msg) = ws.next().await {
        if let Message::Text(t) = msg.map_err(|e| anyhow::anyhow!("{url}: {e}"))? {
            let _ = ws.close(None).await;
            return serde_json::from_str(&t).map_err(|e| anyhow::anyhow!("{url}: {e}"));
        }
    }
    anyhow::bail!("{url}: closed without an answer")
}

impl BackendStats {
    /// Frames received per device id (from `x-gatehouse-device-id`).
    pub fn per_device(&self) -> BTreeMap<String, u64> {
        self.per_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn add_frame(&self, device: &str, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        *self
            .per_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(device.to_string())
            .or_default() += 1;
    }

    /// The counters and latency distributions now; `reset` empties the distributions.
    pub fn report(&self, reset: bool) -> StatsReport {
        let mut lat = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let out = StatsReport {
            connections: l(&self.connections),
            frames: l(&self.frames),
            bytes: l(&self.bytes),
            commands_sent: l(&self.commands_sent),
            responses: l(&self.responses),
            missing_identity: l(&self.missing_identity),
            devices: self.per_device().len() as u64,
            telemetry_latency: lat.telemetry.clone(),
            command_round_trip: lat.command_round_trip.clone(),
        };
        if reset {
            *lat = Latencies::default();
        }
        out
    }

    fn record_telemetry(&self, frame: &Message) {
        let ts = match frame {
            Message::Text(t) => serde_json::from_str::<serde_json::Value>(t)
                .ok()
                .and_then(|v| v.get("ts").and_then(|t| t.as_i64())),
            Message::Binary(b) => ciborium::from_reader::<serde_json::Value, _>(&b[..])
                .ok()
                .and_then(|v| v.get("ts").and_then(|t| t.as_i64())),
            _ => None,
        };
        let Some(ts) = ts else { return };
        // `ts` is whole milliseconds (what device schemas carry), so this is an upper bound:
        // the true latency is up to 1 ms less.
        let now_us = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        let latency = now_us - ts.saturating_mul(1000);
        if ts > 0 && (0..3_600_000_000).contains(&latency) {
            self.latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .telemetry
                .record(latency as u64);
        }
    }

    fn record_round_trip(&self, us: u64) {
        self.latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .command_round_trip
            .record(us);
    }

    pub fn summary(&self, name: &str) -> String {
        format!(
            "{name}: {} connection(s), {} frame(s) / {} bytes received from {} device(s), {} command(s) sent, {} response(s), {} connection(s) without identity headers",
            self.connections.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.per_device().len(),
            self.commands_sent.load(Ordering::Relaxed),
            self.responses.load(Ordering::Relaxed),
            self.missing_identity.load(Ordering::Relaxed),
        )
    }
}

/// Which sample backend to run.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Ingest,
    /// Sends a command to each device every interval.
    Control {
        interval: Duration,
    },
    /// Sends every text and binary message back unchanged, up to this size.
    Echo {
        max_message_bytes: usize,
    },
}

fn ws_config(kind: Kind) -> WebSocketConfig {
    let max = match kind {
        Kind::Echo { max_message_bytes } => max_message_bytes,
        Kind::Ingest | Kind::Control { .. } => 1 << 20,
    };
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Serves until `shutdown`, then closes every connection with 1001.
pub async fn serve(
    listener: TcpListener,
    kind: Kind,
    stats: Arc<BackendStats>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, "sample backend accept failed");
                    continue;
                }
            },
        };
        tracker.spawn(connection(tcp, kind, stats.clone(), shutdown.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

async fn connection(
    tcp: TcpStream,
    kind: Kind,
    stats: Arc<BackendStats>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let mut device = String::new();
    let mut stats_request = None;
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let callback = |req: &Request, mut resp: Response| {
        match req.uri().path() {
            "/stats" => stats_request = Some(false),
            "/stats/reset" => stats_request = Some(true),
            _ => {}
        }
        device = req
            .headers()
            .get("x-gatehouse-device-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if let Some(first) = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|p| HeaderValue::from_str(p.trim()).ok())
        {
            resp.headers_mut().insert("sec-websocket-protocol", first);
        }
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(ws_config(kind))).await
    else {
        return;
    };
    if let Some(reset) = stats_request {
        let report = serde_json::to_string(&stats.report(reset)).unwrap_or_default();
        let _ = ws.send(Message::text(report)).await;
        let _ = ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        return;
    }
    stats.connections.fetch_add(1, Ordering::Relaxed);
    if device.is_empty() {
        stats.missing_identity.fetch_add(1, Ordering::Relaxed);
    }
    let interval = match kind {
        Kind::Ingest | Kind::Echo { .. } => None,
        Kind::Control { interval } => Some(interval),
    };
    let echo = matches!(kind, Kind::Echo { .. });
    let mut tick = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut next_id = 1u64;
    let mut open: HashMap<u64, tokio::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "backend stopping".into() })).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
                return;
            }
            _ = tick.tick(), if interval.is_some() => {
                let command = serde_json::json!({
                    "id": next_id,
                    "command": if next_id % 2 == 1 { "lock" } else { "unlock" },
                });
                open.insert(next_id, tokio::time::Instant::now());
                next_id += 1;
                if ws.send(Message::text(command.to_string())).await.is_err() {
                    return;
                }
                stats.commands_sent.fetch_add(1, Ordering::Relaxed);
            }
            msg = ws.next() => match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) if echo => {
                    stats.add_frame(&device, msg.len());
                    if ws.send(msg).await.is_err() {
                        return;
                    }
                }
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) if interval.is_none() => {
                    stats.add_frame(&device, msg.len());
                    stats.record_telemetry(&msg);
                }
                Some(Ok(Message::Text(t))) => {
                    stats.add_frame(&device, t.len());
                    let id = serde_json::from_str::<serde_json::Value>(&t)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
                    if let Some(sent) = id.and_then(|id| open.remove(&id)) {
                        stats.responses.fetch_add(1, Ordering::Relaxed);
                        stats.record_round_trip(sent.elapsed().as_micros() as u64);
                    }
                }
                Some(Ok(Message::Binary(b))) => stats.add_frame(&device, b.len()),
                Some(Ok(Message::Close(_))) => {
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}
