//! A connection's way to a session, before the first frame: the TLS handshake and the upgrade
//! request (the device's part, bounded by `server.handshake_timeout`), the admission decision
//! (the core's `admission::admit` on what the handshake learned), the backend connection
//! (bounded by its own deadline, `backend.connect_timeout` per backend tried), and the
//! answer: 101, or the refusal `wire` maps to HTTP. Shutdown is watched at defined points,
//! and a connection that has sent its request gets a complete 503 rather than a dropped
//! socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::table::{Admitted, Registration, SessionHandle};
use super::Shared;
use crate::admission::identity::{IdentityError, PeerCertificate};
use crate::admission::routing::Route;
use crate::admission::upgrade::{self, Parsed, UpgradeRequest};
use crate::admission::{admit, Admission};
use crate::audit::{Record, RecordKind};
use crate::live::Live;
use crate::model::Device;
use crate::net::backend::{BackendError, BackendSocket, DeviceIdentity};
use crate::policy::rejections::LogDecision;
use crate::wire::Refusal;

/// Longest time to write an answer (a refusal or the 101) and close TLS: 2 s. A device that
/// does not read cannot hold the connection longer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read from the socket per call while the upgrade request comes in: 1 KiB.
const REQUEST_CHUNK_BYTES: usize = 1024;

/// What the handshake produced.
pub enum Outcome {
    Upgraded(Box<Upgraded>),
    /// An answer other than 101 was sent: the refusal's code.
    Refused(&'static str),
}

/// A device connection upgraded to WebSocket, with its backend connected.
pub struct Upgraded {
    pub device_ws: WebSocketStream<TlsStream<TcpStream>>,
    pub backend: BackendSocket,
    pub device: Arc<Device>,
    /// Lower-case hex SHA-256 of the certificate the device presented.
    pub cert_sha256: String,
    pub cert_issuer: Vec<u8>,
    pub cert_serial: Vec<u8>,
    /// The certificate's notAfter, Unix time.
    pub cert_not_after: i64,
    pub route: Arc<Route>,
    pub backend_url: String,
    /// The session's place in the table (entered at admission) and its handle.
    pub registration: Registration,
    /// The older sessions this one took over (ended as it was listed).
    pub taken_over: Vec<String>,
    /// Its holder in the cluster's session ownership (`[cluster]` only).
    pub claim: Option<Box<dyn crate::storage::OwnershipClaim>>,
    pub handle: SessionHandle,
    /// Its slot of `server.max_connections`, released when the session ends.
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("client presented no certificate")]
    NoCertificate,
    #[error("{0}")]
    Certificate(#[from] IdentityError),
    #[error("reading the upgrade request: {0}")]
    Read(std::io::Error),
    #[error("connection closed before the upgrade request was complete")]
    Eof,
    #[error("writing the response: {0}")]
    Write(std::io::Error),
    #[error("TLS handshake and upgrade request not complete within {0:?}; connection dropped")]
    TimedOut(Duration),
    #[error("the gateway began shutting down before the upgrade request was complete")]
    ShuttingDown,
}

impl HandshakeError {
    /// The `outcome` label of `gatehouse_handshakes_total` for a handshake that ended so.
    pub fn outcome(&self) -> &'static str {
        match self {
            HandshakeError::Tls(_) => "tls-failed",
            HandshakeError::NoCertificate | HandshakeError::Certificate(_) => "bad-certificate",
            HandshakeError::Read(_) | HandshakeError::Eof | HandshakeError::Write(_) => {
                "incomplete"
            }
            HandshakeError::TimedOut(_) => "timeout",
            HandshakeError::ShuttingDown => "shutting-down",
        }
    }
}

/// The device's part of the handshake: TLS, its certificate, its request.
struct Greeting {
    tls: TlsStream<TcpStream>,
    cert: PeerCertificate,
    resumed: bool,
    /// The request and the bytes after it, or the refusal for a bad request.
    request: Result<(UpgradeRequest, Vec<u8>), Refusal>,
}

async fn greeting(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    max_request_bytes: usize,
) -> Result<Greeting, HandshakeError> {
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
    let request = read_request(&mut tls, max_request_bytes).await?;
    Ok(Greeting {
        tls,
        cert,
        resumed,
        request,
    })
}

/// Runs the handshake of one connection.
pub async fn handshake(
    shared: &Arc<Shared>,
    live: &Live,
    tcp: TcpStream,
    peer: SocketAddr,
    conn_id: &str,
) -> Result<Outcome, HandshakeError> {
    let loaded = shared.tls.current();
    let runtime = &live.config;
    let timeout = runtime.handshake_timeout;
    let greeting = tokio::select! {
        // Cancel-safe: nothing has been answered yet; dropping the future drops the
        // half-open connection.
        _ = shared.shutdown.cancelled() => return Err(HandshakeError::ShuttingDown),
        r = tokio::time::timeout(
            timeout,
            greeting(
                TlsAcceptor::from(loaded.server.clone()),
                tcp,
                runtime.max_request_header_bytes,
            ),
        ) => r.map_err(|_| HandshakeError::TimedOut(timeout))??,
    };
    let Greeting {
        mut tls,
        cert,
        resumed,
        request,
    } = greeting;
    let (request, leftover) = match request {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(refusal = refusal.code(), "refused: bad upgrade request");
            refuse(&mut tls, &refusal).await?;
            return Ok(Outcome::Refused(refusal.code()));
        }
    };
    if shared.shutdown.is_cancelled() {
        refuse(&mut tls, &Refusal::ShuttingDown).await?;
        return Ok(Outcome::Refused(Refusal::ShuttingDown.code()));
    }
    if shared.draining.is_cancelled() {
        tracing::info!(refusal = Refusal::Draining.code(), "refused: draining");
        refuse(&mut tls, &Refusal::Draining).await?;
        return Ok(Outcome::Refused(Refusal::Draining.code()));
    }
    // A session slot, held by the session until it ends. Handshakes have their own budget
    // (taken at accept), so connections that never finish one never hold a slot.
    let slot = match shared.session_slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            shared.count_refusal("max_connections");
            if shared.refusal_log.check(super::steps::now()) != LogDecision::Suppress {
                tracing::warn!(
                    refusal = Refusal::OverCapacity.code(),
                    "refused: every session slot is taken (server.max_connections)"
                );
            }
            refuse(&mut tls, &Refusal::OverCapacity).await?;
            return Ok(Outcome::Refused(Refusal::OverCapacity.code()));
        }
    };

    if let (Some(stale), Some(cluster)) =
        (shared.registry.stale_for(), shared.config.stores.cluster())
    {
        if stale > cluster.max_staleness {
            if shared.refusal_log.check(super::steps::now()) != LogDecision::Suppress {
                tracing::warn!(
                    refusal = Refusal::RegistryUnavailable.code(),
                    stale_ms = stale.as_millis() as u64,
                    "refused: the cluster registry is stale beyond cluster.max_staleness_ms (NATS unreachable)"
                );
            }
            refuse(&mut tls, &Refusal::RegistryUnavailable).await?;
            return Ok(Outcome::Refused(Refusal::RegistryUnavailable.code()));
        }
    }
    let record = shared.registry.lookup(&cert.fingerprint);
    let decision = admit(Admission {
        cert: &cert,
        crls: &loaded.crls,
        stale_crl: loaded.cfg.stale_crl,
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
        device: record.as_ref(),
        offered: &request.protocols,
        routes: &runtime.routes,
        schemas: &live.schemas,
    });
    let admitted = match decision {
        Ok(a) => a,
        Err((refusal, device_id)) => {
            log_refusal(
                shared,
                (conn_id, peer),
                &refusal,
                device_id.as_deref(),
                &cert,
                resumed,
            );
            refuse(&mut tls, &refusal).await?;
            return Ok(Outcome::Refused(refusal.code()));
        }
    };
    let (device, route) = (admitted.device, admitted.route);
    if let Some(claimed) = &cert.claimed_id {
        if claimed != &device.id {
            tracing::warn!(device.id = %device.id, cert.claimed_id = %claimed, "certificate names another device id than the registry; the registry wins");
        }
    }
    if request.dropped_identity_headers > 0 {
        tracing::warn!(device.id = %device.id, count = request.dropped_identity_headers, "device sent x-gatehouse-* headers; dropped");
    }

    // Entered in the session table now, so the duplicate policy also counts handshakes in
    // flight, and a suspension from here on reaches this session.
    let handle = SessionHandle::child_of(&shared.shutdown);
    handle.set_max_message(runtime.websocket.max_message_bytes);
    let admitted = Admitted {
        connection: conn_id.to_string(),
        device: device.id.clone(),
        device_type: device.device_type.clone(),
        route: route.subprotocol.clone(),
        peer: peer.to_string(),
        cert_sha256: cert.fingerprint.to_string(),
        cert_issuer: cert.issuer.clone(),
        cert_serial: cert.serial.clone(),
        started: time::OffsetDateTime::now_utc(),
    };
    let per_device = runtime.device_limits.for_type(&device.device_type).sessions;
    // The route's duplicate policy on this gateway, then across gateways (the cluster's
    // ownership entry); either refusal is answered the same way.
    let registered =
        match shared
            .sessions
            .admit(admitted, route.duplicates, per_device, handle.clone())
        {
            Ok(registration) => match shared.ownership.get() {
                None => Ok((registration, None)),
                Some(ownership) => ownership
                    .admit(&device.id, &route.subprotocol, route.duplicates, conn_id)
                    .await
                    .map(|claim| (registration, Some(claim))),
            },
            Err(refusal) => Err(refusal),
        };
    let (registration, claim) = match registered {
        Ok(r) => r,
        Err(refusal) => {
            if matches!(refusal, Refusal::SessionOpen { .. }) {
                shared
                    .metrics
                    .duplicates
                    .get_or_create(&crate::metrics::RouteAction {
                        route: route.subprotocol.clone(),
                        action: "reject".to_string(),
                    })
                    .inc();
            }
            log_refusal(
                shared,
                (conn_id, peer),
                &refusal,
                Some(&device.id),
                &cert,
                resumed,
            );
            refuse(&mut tls, &refusal).await?;
            return Ok(Outcome::Refused(refusal.code()));
        }
    };

    let connected = connect_backend(
        shared,
        live,
        &device,
        &route,
        &cert,
        (conn_id, peer),
        &request,
    )
    .await;
    let (backend, backend_url) = match connected {
        Ok(connected) => connected,
        Err(refusal) => {
            refuse(&mut tls, &refusal).await?;
            return Ok(Outcome::Refused(refusal.code()));
        }
    };

    // Listed (and older sessions taken over) before the device reads its 101: a device that
    // holds an answer always finds its session in the table.
    let taken_over = registration.upgraded(&backend_url);
    accept_upgrade(&mut tls, &request.key, &route.subprotocol).await?;
    let device_ws = WebSocketStream::from_partially_read(
        tls,
        leftover,
        Role::Server,
        Some(crate::net::websocket_config(&runtime.websocket)),
    )
    .await;
    Ok(Outcome::Upgraded(Box::new(Upgraded {
        device_ws,
        backend,
        device,
        cert_sha256: cert.fingerprint.to_string(),
        cert_issuer: cert.issuer,
        cert_serial: cert.serial,
        cert_not_after: cert.not_after,
        route,
        backend_url,
        registration,
        taken_over,
        claim,
        handle,
        slot,
    })))
}

/// Connects the route's backend for `device`. The backend connection has its own deadline
/// (each backend tried gets `backend.connect_timeout`), not the device's handshake timeout:
/// a dead pool is a 502, shutdown meanwhile a 503.
async fn connect_backend(
    shared: &Shared,
    live: &Live,
    device: &Device,
    route: &Route,
    cert: &PeerCertificate,
    (conn_id, peer): (&str, SocketAddr),
    request: &UpgradeRequest,
) -> Result<(BackendSocket, String), Refusal> {
    let fingerprint = cert.fingerprint.to_string();
    let trace = crate::admission::trace::TraceContext::for_session(
        request.traceparent.as_deref(),
        route.continue_trace,
        (fastrand::u128(..), fastrand::u64(..)),
    );
    tracing::Span::current().record("trace.id", trace.trace_id_hex());
    let traceparent = trace.header();
    // The device's vendor state travels with its trace, and only then.
    let continued = route.continue_trace
        && request
            .traceparent
            .as_deref()
            .and_then(crate::admission::trace::TraceContext::parse)
            .is_some_and(|p| p.trace_id == trace.trace_id);
    let identity = DeviceIdentity {
        device_id: &device.id,
        device_type: &device.device_type,
        cert_sha256: &fingerprint,
        connection_id: conn_id,
        peer: peer.ip(),
        traceparent: &traceparent,
        tracestate: request.tracestate.as_deref().filter(|_| continued),
    };
    // Only what the route allows; the upgrade parser already left out what never passes.
    let headers: Vec<(String, Vec<u8>)> = request
        .forward_headers
        .iter()
        .filter(|(name, _)| route.forwards_header(name))
        .cloned()
        .collect();
    let runtime = &live.config;
    let connected = tokio::select! {
        // Cancel-safe: an unfinished backend connection is dropped.
        _ = shared.shutdown.cancelled() => return Err(Refusal::ShuttingDown),
        r = live.connector.connect_route(
            route,
            &identity,
            &headers,
            &shared.backend_health,
            &runtime.backend.health,
            runtime.tcp_keepalive,
        ) => r,
    };
    match connected {
        Ok((backend, url)) => Ok((backend, url.url.clone())),
        Err(errors) => {
            let all_ejected = matches!(errors.as_slice(), [BackendError::AllEjected]);
            tracing::warn!(
                device.id = %device.id,
                route = %route.subprotocol,
                attempts = if all_ejected { 0 } else { errors.len() },
                all_ejected,
                "refused: no backend of the route accepted the connection"
            );
            Err(Refusal::BackendUnavailable)
        }
    }
}

/// Writes the 101 answer, bounded by [`ANSWER_TIMEOUT`].
async fn accept_upgrade(
    tls: &mut TlsStream<TcpStream>,
    key: &str,
    subprotocol: &str,
) -> Result<(), HandshakeError> {
    let answer = async {
        tls.write_all(&upgrade::switching_protocols(key, subprotocol))
            .await?;
        tls.flush().await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(HandshakeError::Write(e)),
        Err(_) => Err(HandshakeError::Write(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the device did not read the 101 answer",
        ))),
    }
}

/// Logs an admission refusal and records it in the enrolled device's audit log.
fn log_refusal(
    shared: &Shared,
    (conn_id, peer): (&str, SocketAddr),
    refusal: &Refusal,
    device_id: Option<&str>,
    cert: &PeerCertificate,
    resumed: bool,
) {
    if let LogDecision::Log { suppressed_before } = shared.refusal_log.check(super::steps::now()) {
        tracing::info!(
            refusal = refusal.code(),
            device.id = device_id.unwrap_or("-"),
            cert.sha256 = %cert.fingerprint,
            tls.resumed = resumed,
            suppressed_before,
            "refused before the upgrade"
        );
    }
    if let Some(id) = device_id {
        shared.recent_refusals.record(
            id,
            crate::policy::rejections::RecentRefusal {
                at: time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                status: refusal.status(),
                code: refusal.code().to_string(),
                connection: conn_id.to_string(),
                peer: peer.to_string(),
            },
        );
    }
    if let (Some(audit), Some(id)) = (&shared.audit, device_id) {
        audit.record(Record {
            device: id.to_string(),
            kind: RecordKind::Refused,
            connection: Some(conn_id.to_string()),
            detail: Some(format!("HTTP {} {}", refusal.status(), refusal.code())),
            ..Default::default()
        });
    }
}

/// Reads the upgrade request. `Ok(Err(refusal))`: a bad request to answer.
async fn read_request(
    tls: &mut TlsStream<TcpStream>,
    max_bytes: usize,
) -> Result<Result<(UpgradeRequest, Vec<u8>), Refusal>, HandshakeError> {
    let mut buf = Vec::with_capacity(REQUEST_CHUNK_BYTES);
    let mut chunk = [0u8; REQUEST_CHUNK_BYTES];
    loop {
        let n = match tls.read(&mut chunk).await {
            Ok(0) => return Err(HandshakeError::Eof),
            Ok(n) => n,
            Err(e) => return Err(HandshakeError::Read(e)),
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match upgrade::parse(&buf, max_bytes) {
            Ok(Parsed::Complete(request, used)) => {
                let leftover = buf.split_off(used);
                return Ok(Ok((request, leftover)));
            }
            Ok(Parsed::Partial) => continue,
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
}

/// Sends the refusal and closes TLS cleanly, bounded so a stuck client cannot hold us.
async fn refuse(tls: &mut TlsStream<TcpStream>, refusal: &Refusal) -> Result<(), HandshakeError> {
    let send = async {
        tls.write_all(&refusal.http_response()).await?;
        tls.shutdown().await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, send).await {
        Ok(Ok(())) | Err(_) => Ok(()),
        Ok(Err(e)) => Err(HandshakeError::Write(e)),
    }
}
