//! One device connection, start to end: TLS handshake, upgrade request, admission (certificate
//! and registry), route, backend connection, 101, relay, and the one log line at the end. The
//! thin async shell around the pure decisions in `identity`, `routing`, `upgrade` and `error`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use arc_swap::ArcSwap;
use tokio_tungstenite::tungstenite::Message;

use crate::audit::{stored_payload, Event, RecordKind};
use crate::backend::{Connector, DeviceIdentity};
use crate::command::OpenCommands;
use crate::config::{Config, StaleCrlPolicy};
use crate::deadletter::DeadLetterSink;
use crate::error::Refusal;
use crate::frames::Encoding;
use crate::frames::{self, RejectCode, Rejection};
use crate::identity::{check_certificate, check_device, PeerCertificate};
use crate::policy::{self, Direction, InvalidFrameLimit};
use crate::registry::Registry;
use crate::rejections::{LogDecision, LogLimiter, RejectionStats};
use crate::relay::{Inspector, Verdict};
use crate::routing::{Route, RouteKind};
use crate::schema::{SchemaKind, SchemaSet};
use crate::tls::TlsState;
use crate::upgrade::{self, Parsed, UpgradeRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;

/// Everything sessions share; built once per server.
pub struct Shared {
    pub config: Config,
    pub tls: Arc<TlsState>,
    pub registry: Arc<Registry>,
    pub connector: Connector,
    pub shutdown: CancellationToken,
    pub schemas: Arc<ArcSwap<SchemaSet>>,
    pub rejections: Arc<RejectionStats>,
    pub deadletters: DeadLetterSink,
    pub audit: Option<crate::auditlog::AuditLog>,
    pub rejection_log: LogLimiter,
    boot_id: u64,
    next_connection: AtomicU64,
}

/// The frame-validation services sessions use.
pub struct FrameServices {
    pub schemas: Arc<ArcSwap<SchemaSet>>,
    pub rejections: Arc<RejectionStats>,
    pub deadletters: DeadLetterSink,
    pub audit: Option<crate::auditlog::AuditLog>,
}

impl Shared {
    pub fn new(
        config: Config,
        tls: Arc<TlsState>,
        registry: Arc<Registry>,
        connector: Connector,
        frames: FrameServices,
        shutdown: CancellationToken,
    ) -> Self {
        let boot_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            config,
            tls,
            registry,
            connector,
            shutdown,
            schemas: frames.schemas,
            rejections: frames.rejections,
            deadletters: frames.deadletters,
            audit: frames.audit,
            rejection_log: LogLimiter::new(crate::rejections::DEFAULT_LOG_LINES_PER_SECOND),
            boot_id,
            next_connection: AtomicU64::new(1),
        }
    }

    /// A connection id unique within this process and, by its boot prefix, across restarts.
    pub fn connection_id(&self) -> String {
        let n = self.next_connection.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.boot_id)
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What the handshake phase produced.
enum Admitted {
    Upgraded(Box<Upgraded>),
    Refused,
}

struct Upgraded {
    device: WebSocketStream<TlsStream<TcpStream>>,
    backend: crate::backend::BackendSocket,
    device_id: String,
    device_type: String,
    route: Arc<Route>,
    backend_url: String,
}

/// Validates a session's frames, tracks its commands, and records what happens to them.
struct SessionInspector<'a> {
    shared: &'a Shared,
    device_id: &'a str,
    device_type: &'a str,
    route: &'a Route,
    backend_url: &'a str,
    conn_id: &'a str,
    limit: InvalidFrameLimit,
    rejected: u64,
    commands: OpenCommands,
    /// The id of the command whose audit record is being written (held by the relay).
    held_command: Option<Value>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SessionInspector<'_> {
    fn event(&self, kind: RecordKind) -> Event {
        Event {
            device: self.device_id.to_string(),
            kind: Some(kind),
            route: Some(self.route.subprotocol.clone()),
            backend: Some(self.backend_url.to_string()),
            connection: Some(self.conn_id.to_string()),
            ..Default::default()
        }
    }

    fn audit(&self, event: Event) {
        if let Some(audit) = &self.shared.audit {
            audit.record(event);
        }
    }

    fn with_payload(&self, mut event: Event, frame: &[u8], value: Option<&Value>) -> Event {
        let Some(cfg) = &self.shared.config.audit else {
            return event;
        };
        match value {
            Some(v) => {
                let (text, truncated, sha) =
                    stored_payload(frame, v, &cfg.redact, cfg.max_payload_bytes);
                event.payload = Some(text);
                event.payload_truncated = truncated;
                event.payload_sha256 = Some(sha);
            }
            None => event.payload_sha256 = Some(hex::encode(Sha256::digest(frame))),
        }
        event
    }

    /// Counts, dead-letters and logs a refused frame, records it in the audit log on control
    /// routes, and says what the sender gets.
    fn reject(
        &mut self,
        direction: Direction,
        msg: &Message,
        encoding: Encoding,
        rejection: Rejection,
    ) -> Verdict {
        self.rejected += 1;
        let code = rejection.code.as_str();
        self.shared
            .rejections
            .count(self.device_type, &self.route.subprotocol, code);
        let payload = frame_bytes(msg);
        let encoding_name = match encoding {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        };
        self.shared.deadletters.send(crate::deadletter::letter(
            self.device_id,
            &self.route.subprotocol,
            direction.as_str(),
            encoding_name,
            &rejection,
            payload,
            self.shared.config.deadletter.max_payload_bytes,
        ));
        if self.route.kind == RouteKind::Control {
            let mut event = self.event(RecordKind::Rejected);
            event.command_id = rejection.id.clone();
            event.detail = Some(format!(
                "{} {}: {} {}",
                if direction == Direction::Down {
                    "command"
                } else {
                    "response"
                },
                code,
                rejection.pointer,
                rejection.message
            ));
            let event = self.with_payload(event, payload, None);
            self.audit(event);
        }
        if let LogDecision::Log { suppressed_before } =
            self.shared.rejection_log.check(Instant::now())
        {
            tracing::info!(
                device.id = %self.device_id,
                device.r#type = %self.device_type,
                route = %self.route.subprotocol,
                direction = direction.as_str(),
                reason = code,
                pointer = %rejection.pointer,
                suppressed_before,
                "frame rejected"
            );
        }
        if direction == Direction::Up && self.limit.record(Instant::now()) {
            return Verdict::RejectAndClose;
        }
        let reply = self
            .route
            .frames
            .error_replies
            .then(|| policy::error_message(encoding, &rejection));
        Verdict::Reject { reply }
    }

    /// A valid command from the backend: recorded (durably) before it is forwarded.
    fn command(&mut self, msg: &Message, value: &Value) -> Verdict {
        let encoding = if matches!(msg, Message::Binary(_)) {
            Encoding::Cbor
        } else {
            Encoding::Json
        };
        let Some(id) = frames::frame_id(value) else {
            return Verdict::Forward;
        };
        if !self.commands.has_room() {
            let mut r = Rejection::new(
                RejectCode::RateLimited,
                "",
                format!(
                    "the device has {} commands open; wait for answers or timeouts",
                    self.commands.len()
                ),
            );
            r.id = Some(id);
            return self.reject(Direction::Down, msg, encoding, r);
        }
        let Some(audit) = self.shared.audit.clone() else {
            self.commands.sent(&id, Instant::now());
            return Verdict::Forward;
        };
        let mut event = self.event(RecordKind::CommandSent);
        event.command_id = Some(id.clone());
        let event = self.with_payload(event, frame_bytes(msg), Some(value));
        self.held_command = Some(id.clone());
        Verdict::ForwardAfter(Box::pin(async move {
            match audit.record_durable(event).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let mut r = Rejection::new(
                        RejectCode::AuditUnavailable,
                        "",
                        "the command was not delivered: the audit log cannot be written",
                    );
                    r.id = Some(id);
                    tracing::warn!(error = %e, "command refused: audit log unavailable");
                    Err(policy::error_message(encoding, &r))
                }
            }
        }))
    }

    /// A valid frame from the device on a control route: the answer to a command, or not.
    fn response(&mut self, msg: &Message, value: &Value) {
        if self.shared.audit.is_none() {
            // Still settle the command, so the open-command limit frees up.
            if let Some(id) = frames::frame_id(value) {
                self.commands.answer(&id, Instant::now());
            }
            return;
        }
        let event = match frames::frame_id(value) {
            Some(id) => match self.commands.answer(&id, Instant::now()) {
                Some(rtt) => {
                    let mut e = self.event(RecordKind::Responded);
                    e.rtt_us = Some(rtt.as_micros() as u64);
                    e.verdict = Some(match value.get("status") {
                        Some(Value::String(s)) => s.clone(),
                        _ => "answered".into(),
                    });
                    e.command_id = Some(id);
                    e
                }
                None => {
                    let mut e = self.event(RecordKind::UnmatchedResponse);
                    e.command_id = Some(id);
                    e
                }
            },
            None => {
                let mut e = self.event(RecordKind::UnmatchedResponse);
                e.detail = Some("no id".into());
                e
            }
        };
        let event = self.with_payload(event, frame_bytes(msg), Some(value));
        self.audit(event);
    }

    /// Records every command still open (the session is ending).
    fn finish(&mut self) {
        for id in self.commands.drain() {
            let mut e = self.event(RecordKind::Unanswered);
            e.command_id = Some(id);
            e.detail = Some("the session ended before the device answered".into());
            self.audit(e);
        }
    }
}

fn frame_bytes(msg: &Message) -> &[u8] {
    match msg {
        Message::Text(t) => t.as_bytes(),
        Message::Binary(b) => b,
        _ => &[],
    }
}

impl Inspector for SessionInspector<'_> {
    fn inspect(&mut self, direction: Direction, msg: &Message) -> Verdict {
        let schemas = self.shared.schemas.load();
        let result = policy::check_frame(
            &schemas,
            self.device_type,
            self.route.kind,
            direction,
            msg,
            self.shared.config.limits,
        );
        drop(schemas);
        match result {
            Ok(Some(value)) if self.route.kind == RouteKind::Control => match direction {
                Direction::Down => self.command(msg, &value),
                Direction::Up => {
                    self.response(msg, &value);
                    Verdict::Forward
                }
            },
            Ok(_) => Verdict::Forward,
            Err((encoding, rejection)) => self.reject(direction, msg, encoding, rejection),
        }
    }

    fn released(&mut self, _direction: Direction, forwarded: bool) {
        let Some(id) = self.held_command.take() else {
            return;
        };
        if forwarded {
            self.commands.sent(&id, Instant::now());
        } else {
            self.rejected += 1;
            self.shared.rejections.count(
                self.device_type,
                &self.route.subprotocol,
                RejectCode::AuditUnavailable.as_str(),
            );
            let mut e = self.event(RecordKind::Rejected);
            e.command_id = Some(id);
            e.detail = Some("command audit-unavailable: not delivered".into());
            // Queued for the writer's retry; it lands when the disk works again.
            self.audit(e);
        }
    }

    fn poll_timers(&mut self, cx: &mut std::task::Context<'_>) {
        loop {
            let Some(deadline) = self.commands.next_deadline() else {
                self.timer = None;
                return;
            };
            let deadline = tokio::time::Instant::from_std(deadline);
            match &mut self.timer {
                Some(t) if t.deadline() == deadline => {}
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            let Some(timer) = self.timer.as_mut() else {
                return;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            for id in self.commands.expire(Instant::now()) {
                let mut e = self.event(RecordKind::TimedOut);
                e.command_id = Some(id);
                self.audit(e);
            }
        }
    }
}

/// Handles one accepted TCP connection until it ends.
pub async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let conn_id = shared.connection_id();
    let span = tracing::info_span!("conn", conn.id = %conn_id, peer = %peer);
    async move {
        let started = Instant::now();
        let _ = tcp.set_nodelay(true);
        let phase = tokio::select! {
            // Cancel-safe: dropping the handshake future drops the half-open connection.
            _ = shared.shutdown.cancelled() => return,
            r = tokio::time::timeout(shared.config.handshake_timeout, handshake(&shared, tcp, &conn_id)) => r,
        };
        let admitted = match phase {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "connection failed before the upgrade");
                return;
            }
            Err(_) => {
                tracing::info!(timeout_ms = shared.config.handshake_timeout.as_millis() as u64, "handshake timed out; connection dropped");
                return;
            }
        };
        let Admitted::Upgraded(upgraded) = admitted else {
            return;
        };
        let Upgraded {
            mut device,
            mut backend,
            device_id,
            device_type,
            route,
            backend_url,
        } = *upgraded;
        tracing::debug!(device.id = %device_id, route = %route.subprotocol, backend = %backend_url, "session open");
        let mut inspector = SessionInspector {
            shared: &shared,
            device_id: &device_id,
            device_type: &device_type,
            route: &route,
            backend_url: &backend_url,
            conn_id: &conn_id,
            limit: InvalidFrameLimit::new(
                route.frames.invalid_frame_limit,
                route.frames.invalid_frame_window,
            ),
            rejected: 0,
            commands: OpenCommands::new(
                shared
                    .config
                    .audit
                    .as_ref()
                    .map(|a| a.command_timeout)
                    .unwrap_or(crate::config::DEFAULT_COMMAND_TIMEOUT),
                crate::command::DEFAULT_MAX_OPEN,
            ),
            held_command: None,
            timer: None,
        };
        inspector.audit(inspector.event(RecordKind::Connected));
        let (end, stats) = crate::relay::relay(
            &mut device,
            &mut backend,
            &shared.shutdown,
            shared.config.close_timeout,
            &mut inspector,
        )
        .await;
        inspector.finish();
        let mut disconnected = inspector.event(RecordKind::Disconnected);
        disconnected.detail = Some(end.describe());
        inspector.audit(disconnected);
        let rejected = inspector.rejected;
        tracing::info!(
            device.id = %device_id,
            device.r#type = %device_type,
            route = %route.subprotocol,
            backend = %backend_url,
            duration_ms = started.elapsed().as_millis() as u64,
            frames.up = stats.up.frames,
            bytes.up = stats.up.bytes,
            frames.down = stats.down.frames,
            bytes.down = stats.down.bytes,
            frames.rejected = rejected,
            close.code = end.logged_code(),
            close.by = end.closer().as_str(),
            "session ended"
        );
    }
    .instrument(span)
    .await
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client presented no certificate")]
    NoCertificate,
    #[error("{0}")]
    Certificate(#[from] crate::identity::IdentityError),
    #[error("reading the upgrade request: {0}")]
    Read(std::io::Error),
    #[error("connection closed before the upgrade request was complete")]
    Eof,
    #[error("writing the response: {0}")]
    Write(std::io::Error),
}

async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    conn_id: &str,
) -> Result<Admitted, HandshakeError> {
    let loaded = shared.tls.current();
    let acceptor = TlsAcceptor::from(loaded.server.clone());
    let mut tls = acceptor.accept(tcp).await.map_err(HandshakeError::Tls)?;
    let (cert, resumed) = {
        let conn = tls.get_ref().1;
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(HandshakeError::NoCertificate)?;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        (PeerCertificate::parse(leaf)?, resumed)
    };

    let (request, leftover) = read_request(&mut tls, shared.config.max_request_header_bytes).await;
    let request = match request {
        Ok(r) => r,
        Err(Ok(refusal)) => {
            tracing::info!(refusal = refusal.code(), "refused: bad upgrade request");
            refuse(&mut tls, &refusal).await?;
            return Ok(Admitted::Refused);
        }
        Err(Err(e)) => return Err(e),
    };

    let decision = admit(shared, &loaded.crls, &cert, &request);
    let (device, route) = match decision {
        Ok(ok) => ok,
        Err((refusal, device_id)) => {
            // Attribute the refusal to the enrolled device when there is one, even when the
            // certificate check came first.
            let device_id = device_id.or_else(|| {
                shared
                    .registry
                    .lookup(&cert.fingerprint)
                    .map(|d| d.id.clone())
            });
            tracing::info!(
                refusal = refusal.code(),
                device.id = device_id.as_deref().unwrap_or("-"),
                cert.sha256 = %cert.fingerprint,
                tls.resumed = resumed,
                "refused before the upgrade"
            );
            if let (Some(audit), Some(id)) = (&shared.audit, &device_id) {
                audit.record(Event {
                    device: id.clone(),
                    kind: Some(RecordKind::Refused),
                    connection: Some(conn_id.to_string()),
                    detail: Some(format!("HTTP {} {}", refusal.status(), refusal.code())),
                    ..Default::default()
                });
            }
            refuse(&mut tls, &refusal).await?;
            return Ok(Admitted::Refused);
        }
    };
    if request.dropped_identity_headers > 0 {
        tracing::warn!(device.id = %device.id, count = request.dropped_identity_headers, "device sent x-gatehouse-* headers; dropped");
    }

    let fingerprint = cert.fingerprint.to_string();
    let identity = DeviceIdentity {
        device_id: &device.id,
        device_type: &device.device_type,
        cert_sha256: &fingerprint,
        connection_id: conn_id,
    };
    let connected = tokio::select! {
        // Cancel-safe: an unfinished backend connection is dropped.
        _ = shared.shutdown.cancelled() => {
            refuse(&mut tls, &Refusal::ShuttingDown).await?;
            return Ok(Admitted::Refused);
        }
        r = shared.connector.connect_route(&route, &identity, &request.forward_headers) => r,
    };
    let (backend, backend_url) = match connected {
        Ok(ok) => ok,
        Err(errors) => {
            tracing::warn!(
                device.id = %device.id,
                route = %route.subprotocol,
                attempts = errors.len(),
                "refused: no backend of the route accepted the connection"
            );
            refuse(&mut tls, &Refusal::BackendUnavailable).await?;
            return Ok(Admitted::Refused);
        }
    };

    tls.write_all(&upgrade::switching_protocols(
        &request.key,
        &route.subprotocol,
    ))
    .await
    .map_err(HandshakeError::Write)?;
    tls.flush().await.map_err(HandshakeError::Write)?;
    let device_ws = WebSocketStream::from_partially_read(
        tls,
        leftover,
        Role::Server,
        Some(shared.config.websocket.tungstenite()),
    )
    .await;
    Ok(Admitted::Upgraded(Box::new(Upgraded {
        device: device_ws,
        backend,
        device_id: device.id.clone(),
        device_type: device.device_type.clone(),
        route: route.clone(),
        backend_url: backend_url.url.clone(),
    })))
}

type Decision =
    Result<(Arc<crate::registry::Device>, Arc<crate::routing::Route>), (Refusal, Option<String>)>;

/// Admission: certificate checks, registry status, route. Synchronous and in memory.
fn admit(
    shared: &Shared,
    crls: &crate::identity::RevocationIndex,
    cert: &PeerCertificate,
    request: &UpgradeRequest,
) -> Decision {
    let refuse_stale = shared.tls.stale_policy() == StaleCrlPolicy::Refuse;
    check_certificate(cert, crls, refuse_stale, unix_now()).map_err(|r| (r, None))?;
    let record = shared.registry.lookup(&cert.fingerprint);
    let device =
        check_device(record.as_deref()).map_err(|r| (r, record.as_ref().map(|d| d.id.clone())))?;
    if let Some(claimed) = &cert.claimed_id {
        if claimed != &device.id {
            tracing::warn!(device.id = %device.id, cert.claimed_id = %claimed, "certificate names another device id than the registry; the registry wins");
        }
    }
    let route = shared
        .config
        .routes
        .select(
            request.protocols.iter().map(String::as_str),
            &device.device_type,
        )
        .map_err(|no| {
            (
                Refusal::NoRoute {
                    offered: request.protocols.clone(),
                    allowed: no.allowed,
                },
                Some(device.id.clone()),
            )
        })?;
    let required = SchemaKind::required_by(route.kind);
    if shared
        .schemas
        .load()
        .get(&device.device_type, required)
        .is_none()
    {
        return Err((
            Refusal::NoSchema {
                file: required.file_name(),
            },
            Some(device.id.clone()),
        ));
    }
    let device = record.ok_or((Refusal::UnknownDevice, None))?;
    Ok((device, route))
}

/// Reads the upgrade request. The error is a refusal to send, or a connection failure.
async fn read_request(
    tls: &mut TlsStream<TcpStream>,
    max_bytes: usize,
) -> (
    Result<UpgradeRequest, Result<Refusal, HandshakeError>>,
    Vec<u8>,
) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match tls.read(&mut chunk).await {
            Ok(0) => return (Err(Err(HandshakeError::Eof)), Vec::new()),
            Ok(n) => n,
            Err(e) => return (Err(Err(HandshakeError::Read(e))), Vec::new()),
        };
        buf.extend_from_slice(&chunk[..n]);
        match upgrade::parse(&buf, max_bytes) {
            Ok(Parsed::Complete(request, used)) => {
                let leftover = buf.split_off(used);
                return (Ok(request), leftover);
            }
            Ok(Parsed::Partial) => continue,
            Err(refusal) => return (Err(Ok(refusal)), Vec::new()),
        }
    }
}

/// Sends the refusal and closes TLS cleanly, bounded so a stuck client cannot hold us.
async fn refuse(tls: &mut TlsStream<TcpStream>, refusal: &Refusal) -> Result<(), HandshakeError> {
    let send = async {
        tls.write_all(&refusal.http_response()).await?;
        tls.shutdown().await
    };
    match tokio::time::timeout(Duration::from_secs(2), send).await {
        Ok(Ok(())) | Err(_) => Ok(()),
        Ok(Err(e)) => Err(HandshakeError::Write(e)),
    }
}
