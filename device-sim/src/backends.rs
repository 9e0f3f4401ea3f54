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
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let callback = |req: &Request, mut resp: Response| {
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
                Some(Ok(Message::Text(t))) => {
                    stats.add_frame(&device, t.len());
                    let id = serde_json::from_str::<serde_json::Value>(&t)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
                    if let Some(id) = id {
                        if open.remove(&id).is_some() {
                            stats.responses.fetch_add(1, Ordering::Relaxed);
                        }
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
