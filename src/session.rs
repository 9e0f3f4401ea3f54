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

use crate::backend::{Connector, DeviceIdentity};
use crate::config::{Config, StaleCrlPolicy};
use crate::deadletter::DeadLetterSink;
use crate::error::Refusal;
use crate::frames::Encoding;
use crate::identity::{check_certificate, check_device, PeerCertificate};
use crate::policy::{self, Direction, InvalidFrameLimit};
use crate::registry::Registry;
use crate::rejections::{LogDecision, LogLimiter, RejectionStats};
use crate::relay::{Inspector, Verdict};
use crate::routing::Route;
use crate::schema::{SchemaKind, SchemaSet};
use crate::tls::TlsState;
use crate::upgrade::{self, Parsed, UpgradeRequest};

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
    pub rejection_log: LogLimiter,
    boot_id: u64,
    next_connection: AtomicU64,
}

/// The frame-validation services sessions use.
pub struct FrameServices {
    pub schemas: Arc<ArcSwap<SchemaSet>>,
    pub rejections: Arc<RejectionStats>,
    pub deadletters: DeadLetterSink,
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

/// Validates a session's frames and records what it rejects.
struct SessionInspector<'a> {
    shared: &'a Shared,
    device_id: &'a str,
    device_type: &'a str,
    route: &'a Route,
    limit: InvalidFrameLimit,
    rejected: u64,
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
        let Err((encoding, rejection)) = result else {
            return Verdict::Forward;
        };
        self.rejected += 1;
        let code = rejection.code.as_str();
        self.shared
            .rejections
            .count(self.device_type, &self.route.subprotocol, code);
        let payload: &[u8] = match msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            _ => &[],
        };
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
            limit: InvalidFrameLimit::new(
                route.frames.invalid_frame_limit,
                route.frames.invalid_frame_window,
            ),
            rejected: 0,
        };
        let (end, stats) = crate::relay::relay(
            &mut device,
            &mut backend,
            &shared.shutdown,
            shared.config.close_timeout,
            &mut inspector,
        )
        .await;
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
            tracing::info!(
                refusal = refusal.code(),
                device.id = device_id.as_deref().unwrap_or("-"),
                cert.sha256 = %cert.fingerprint,
                tls.resumed = resumed,
                "refused before the upgrade"
            );
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
