//! The one place that maps a refusal or a session end to the wire: HTTP status and body before
//! the WebSocket upgrade, close code and reason after it. Internal detail (I/O errors, backend
//! addresses) goes to the logs, never to the peer. docs/close-codes.md lists everything here.

use std::borrow::Cow;

/// WebSocket close codes the gateway sends or maps (RFC 6455 section 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away: the gateway shuts down, or the other side of the session went away.
    pub const AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// No status code was present in the peer's close frame (never sent, only logged).
    pub const NO_STATUS: u16 = 1005;
    /// The connection dropped without a close frame (never sent, only logged).
    pub const ABNORMAL: u16 = 1006;
    /// Invalid payload: bad UTF-8 in a text frame, or too many invalid frames.
    pub const INVALID: u16 = 1007;
    /// Policy violation: the device kept passing one of its rate limits.
    pub const POLICY: u16 = 1008;
    /// A message larger than `websocket.max_message_bytes`.
    pub const SIZE: u16 = 1009;
    /// Internal error: the backend vanished or broke the protocol.
    pub const ERROR: u16 = 1011;
    /// The device was suspended in the registry while connected.
    pub const DEVICE_SUSPENDED: u16 = 4001;
    /// The device was revoked in the registry while connected.
    pub const DEVICE_REVOKED: u16 = 4002;
    /// The certificate this session uses was removed from the device in the registry.
    pub const CERTIFICATE_REMOVED: u16 = 4003;
    /// The certificate this session uses is now listed in a reloaded CRL.
    pub const CERTIFICATE_REVOKED: u16 = 4004;
    /// The certificate this session uses expired.
    pub const CERTIFICATE_EXPIRED: u16 = 4005;
    /// An operator ended the device's sessions (the reason is the operator's).
    pub const KICKED: u16 = 4006;
    /// A newer session of the same device on the same route took over (policy `takeover`).
    pub const TAKEN_OVER: u16 = 4007;
    /// A reload removed the session's route, or its device type from the route.
    pub const ROUTE_REMOVED: u16 = 4008;
    /// No data frame either way for the route's `idle_timeout`.
    pub const IDLE_TIMEOUT: u16 = 4009;
    /// The session reached its `max_lifetime`; the device should reconnect.
    pub const MAX_LIFETIME: u16 = 4010;
    /// The device did not answer the gateway's ping within `device_ping_timeout`.
    pub const DEVICE_PING_TIMEOUT: u16 = 4011;
    /// The backend did not answer the gateway's ping within `backend_ping_timeout`.
    pub const BACKEND_PING_TIMEOUT: u16 = 4012;
    /// The device accepted no bytes for `write_timeout` while frames waited for it.
    pub const DEVICE_WRITE_TIMEOUT: u16 = 4013;
    /// The backend accepted no bytes for `write_timeout` while frames waited for it.
    pub const BACKEND_WRITE_TIMEOUT: u16 = 4014;
}

/// One of a session's two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Device,
    Backend,
}

impl Leg {
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Device => "device",
            Leg::Backend => "backend",
        }
    }
}

/// Why the gateway ended a live session itself: from outside (registry, CRL, operator,
/// another session, reload, drain) or by one of the session's timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    DeviceSuspended,
    DeviceRevoked,
    CertificateRemoved,
    CertificateRevoked,
    CertificateExpired,
    /// An operator's kick, with the operator's reason.
    Kicked(String),
    /// Taken over by the named newer connection.
    TakenOver(String),
    RouteRemoved,
    IdleTimeout,
    MaxLifetime,
    PingTimeout(Leg),
    WriteTimeout(Leg),
    /// The gateway drains before a restart: reconnect elsewhere.
    Draining,
}

/// Longest close reason in bytes: a close frame's payload is at most 125 bytes, 2 of them
/// the code.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// `text` cut to at most `max` bytes on a character boundary.
pub fn truncate_reason(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_string()
}

impl Ending {
    /// The close frame both sides get.
    pub fn close(&self) -> Close {
        let (code, reason): (u16, Cow<'static, str>) = match self {
            Ending::DeviceSuspended => (close_code::DEVICE_SUSPENDED, "device suspended".into()),
            Ending::DeviceRevoked => (close_code::DEVICE_REVOKED, "device revoked".into()),
            Ending::CertificateRemoved => (
                close_code::CERTIFICATE_REMOVED,
                "certificate no longer enrolled for this device".into(),
            ),
            Ending::CertificateRevoked => (
                close_code::CERTIFICATE_REVOKED,
                "certificate revoked (CRL)".into(),
            ),
            Ending::CertificateExpired => (
                close_code::CERTIFICATE_EXPIRED,
                "certificate expired".into(),
            ),
            Ending::Kicked(why) => (
                close_code::KICKED,
                if why.is_empty() {
                    "ended by an operator".into()
                } else {
                    format!("ended by an operator: {why}").into()
                },
            ),
            Ending::TakenOver(by) => (
                close_code::TAKEN_OVER,
                format!("taken over by a newer session ({by})").into(),
            ),
            Ending::RouteRemoved => (
                close_code::ROUTE_REMOVED,
                "route no longer serves this device".into(),
            ),
            Ending::IdleTimeout => (close_code::IDLE_TIMEOUT, "idle timeout".into()),
            Ending::MaxLifetime => (
                close_code::MAX_LIFETIME,
                "maximum session lifetime reached; reconnect".into(),
            ),
            Ending::PingTimeout(Leg::Device) => (
                close_code::DEVICE_PING_TIMEOUT,
                "device did not answer ping".into(),
            ),
            Ending::PingTimeout(Leg::Backend) => (
                close_code::BACKEND_PING_TIMEOUT,
                "backend did not answer ping".into(),
            ),
            Ending::WriteTimeout(Leg::Device) => (
                close_code::DEVICE_WRITE_TIMEOUT,
                "device stopped reading".into(),
            ),
            Ending::WriteTimeout(Leg::Backend) => (
                close_code::BACKEND_WRITE_TIMEOUT,
                "backend stopped reading".into(),
            ),
            Ending::Draining => (close_code::AWAY, "gateway draining; reconnect".into()),
        };
        Close {
            code,
            reason: truncate_reason(&reason, MAX_CLOSE_REASON_BYTES),
        }
    }
}

/// A close frame as the wire carries it: code and reason (at most 123 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

/// Why a device was refused before the upgrade. Each maps to one HTTP status and a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request is not a valid WebSocket upgrade (missing Host, bad key, ...).
    BadRequest(&'static str),
    /// Not GET.
    MethodNotAllowed,
    /// Not a WebSocket upgrade, or a WebSocket version other than 13.
    UpgradeRequired,
    /// Request line and headers exceed `server.max_request_header_bytes`.
    HeadersTooLarge,
    /// The certificate chain is valid but its fingerprint is enrolled for no device.
    UnknownDevice,
    DeviceSuspended,
    /// Revoked in the registry.
    DeviceRevoked,
    /// Revoked by a CRL (caught after the handshake, e.g. on a resumed TLS session).
    CertificateRevoked,
    /// The CRL covering this certificate is past its next update and policy is `refuse`.
    CrlStale,
    /// Expired or not yet valid (caught after the handshake, e.g. on a resumed TLS session).
    CertificateExpired,
    /// The leaf lacks the clientAuth extended key usage.
    NotClientCertificate,
    /// No offered subprotocol is routed for this device's type.
    NoRoute {
        offered: Vec<String>,
        allowed: Vec<String>,
    },
    /// Every backend of the route failed to connect.
    BackendUnavailable,
    /// The route needs a schema this device's type does not have.
    NoSchema {
        file: &'static str,
    },
    /// The gateway is shutting down.
    ShuttingDown,
    /// The gateway is draining before a restart: new sessions go elsewhere.
    Draining,
    /// The route's duplicate policy refuses another session of this device: `open` sessions
    /// are already open and the route allows `allowed`.
    SessionOpen {
        open: usize,
        allowed: usize,
    },
    /// The device already holds its type's `sessions_per_device` sessions across routes.
    TooManySessions {
        limit: usize,
    },
    /// Every session slot (`server.max_connections`) is taken.
    OverCapacity,
    /// The cluster registry has missed changes for longer than `cluster.max_staleness_ms`
    /// (NATS unreachable): admitting on a record that may have been suspended elsewhere is
    /// refused.
    RegistryUnavailable,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) | Refusal::NoRoute { .. } => 400,
            Refusal::UnknownDevice
            | Refusal::DeviceSuspended
            | Refusal::DeviceRevoked
            | Refusal::CertificateRevoked
            | Refusal::CrlStale
            | Refusal::CertificateExpired
            | Refusal::NotClientCertificate => 403,
            Refusal::MethodNotAllowed => 405,
            Refusal::SessionOpen { .. } => 409,
            Refusal::TooManySessions { .. } => 429,
            Refusal::UpgradeRequired => 426,
            Refusal::HeadersTooLarge => 431,
            Refusal::NoSchema { .. } => 500,
            Refusal::BackendUnavailable => 502,
            Refusal::ShuttingDown
            | Refusal::Draining
            | Refusal::OverCapacity
            | Refusal::RegistryUnavailable => 503,
        }
    }

    /// Stable machine-readable code, also sent as the `x-gatehouse-refusal` header.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad-request",
            Refusal::MethodNotAllowed => "method-not-allowed",
            Refusal::UpgradeRequired => "upgrade-required",
            Refusal::HeadersTooLarge => "headers-too-large",
            Refusal::UnknownDevice => "unknown-device",
            Refusal::DeviceSuspended => "device-suspended",
            Refusal::DeviceRevoked => "device-revoked",
            Refusal::CertificateRevoked => "certificate-revoked",
            Refusal::CrlStale => "crl-stale",
            Refusal::CertificateExpired => "certificate-expired",
            Refusal::NotClientCertificate => "not-a-client-certificate",
            Refusal::NoRoute { .. } => "no-route",
            Refusal::NoSchema { .. } => "no-schema",
            Refusal::BackendUnavailable => "backend-unavailable",
            Refusal::ShuttingDown => "shutting-down",
            Refusal::Draining => "draining",
            Refusal::SessionOpen { .. } => "session-open",
            Refusal::TooManySessions { .. } => "too-many-sessions",
            Refusal::OverCapacity => "over-capacity",
            Refusal::RegistryUnavailable => "registry-unavailable",
        }
    }

    /// One short line for the device. Never internal detail.
    pub fn message(&self) -> Cow<'static, str> {
        match self {
            Refusal::BadRequest(why) => Cow::Owned(format!("not a valid WebSocket upgrade: {why}")),
            Refusal::MethodNotAllowed => "WebSocket upgrades use GET".into(),
            Refusal::UpgradeRequired => "this endpoint only speaks WebSocket version 13".into(),
            Refusal::HeadersTooLarge => "request headers too large".into(),
            Refusal::UnknownDevice => "this certificate is not enrolled for any device".into(),
            Refusal::DeviceSuspended => "device is suspended".into(),
            Refusal::DeviceRevoked => "device is revoked".into(),
            Refusal::CertificateRevoked => "certificate is revoked".into(),
            Refusal::CrlStale => "revocation list is out of date; try again later".into(),
            Refusal::CertificateExpired => "certificate is expired or not yet valid".into(),
            Refusal::NotClientCertificate => {
                "certificate lacks the clientAuth extended key usage".into()
            }
            Refusal::NoRoute { offered, allowed } => {
                let offered = if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                };
                let allowed = if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                };
                Cow::Owned(format!(
                    "no usable subprotocol (offered: {offered}); this device may use: {allowed}"
                ))
            }
            Refusal::NoSchema { file } => Cow::Owned(format!(
                "this route needs {file} for the device's type and the gateway has none"
            )),
            Refusal::BackendUnavailable => "no backend available for this subprotocol".into(),
            Refusal::ShuttingDown => "gateway is shutting down".into(),
            Refusal::Draining => "gateway is draining; connect to another one".into(),
            Refusal::SessionOpen { open, allowed } => Cow::Owned(format!(
                "a session of this device is already open on this route ({open} open, {allowed} allowed)"
            )),
            Refusal::TooManySessions { limit } => Cow::Owned(format!(
                "this device already holds {limit} sessions (limit sessions_per_device = {limit})"
            )),
            Refusal::OverCapacity => {
                "the gateway is at its session limit (server.max_connections); try again later"
                    .into()
            }
            Refusal::RegistryUnavailable => {
                "the gateway cannot reach its registry; try again later".into()
            }
        }
    }

    /// The complete HTTP/1.1 response.
    pub fn http_response(&self) -> Vec<u8> {
        let status = self.status();
        let body = format!("{}: {}\n", self.code(), self.message());
        let mut extra = String::new();
        if matches!(self, Refusal::UpgradeRequired) {
            extra.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n");
        }
        if matches!(
            self,
            Refusal::ShuttingDown
                | Refusal::Draining
                | Refusal::BackendUnavailable
                | Refusal::OverCapacity
                | Refusal::RegistryUnavailable
                | Refusal::TooManySessions { .. }
        ) {
            extra.push_str("Retry-After: 5\r\n");
        }
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nx-gatehouse-refusal: {}\r\n{extra}\r\n{body}",
            reason_phrase(status),
            body.len(),
            self.code(),
        )
        .into_bytes()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        500 => "Internal Server Error",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        409 => "Conflict",
        429 => "Too Many Requests",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Which side ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    Device,
    Backend,
    Gateway,
}

impl Closer {
    pub fn as_str(self) -> &'static str {
        match self {
            Closer::Device => "device",
            Closer::Backend => "backend",
            Closer::Gateway => "gateway",
        }
    }
}

/// How a relayed session ended, before mapping to close frames.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEnd {
    /// A side sent a close frame; it is passed to the other side unchanged.
    ClosedBy(Closer, Option<Close>),
    /// The device's connection dropped without a close frame.
    DeviceVanished,
    /// The backend's connection dropped without a close frame.
    BackendVanished,
    /// The device broke the WebSocket protocol (or a limit); the close code says how.
    DeviceProtocolError(u16),
    /// The backend broke the WebSocket protocol (or a limit).
    BackendProtocolError(u16),
    /// The device sent more invalid frames in a window than its route allows.
    InvalidFrameLimit,
    /// Shutdown.
    Shutdown,
    /// Ended from outside while live (the registry changed); both sides get this close.
    Ended(Ending),
    /// The device passed one of its type's limits: a message over `max_message_bytes`
    /// (1009), or sustained rate abuse (1008). `limit` is the configuration key.
    OverLimit { code: u16, limit: &'static str },
}

fn frame(code: u16, reason: &'static str) -> Option<Close> {
    Some(Close {
        code,
        reason: reason.to_string(),
    })
}

impl SessionEnd {
    /// The close frame for the device, if one is to be sent by the gateway. `None` also when
    /// the device initiated the close (tungstenite echoes it).
    pub fn to_device(&self) -> Option<Option<Close>> {
        match self {
            SessionEnd::ClosedBy(Closer::Backend, f) => Some(f.clone()),
            SessionEnd::ClosedBy(_, _) | SessionEnd::DeviceVanished => None,
            SessionEnd::BackendVanished => {
                Some(frame(close_code::ERROR, "backend connection lost"))
            }
            SessionEnd::BackendProtocolError(_) => Some(frame(close_code::ERROR, "backend error")),
            SessionEnd::DeviceProtocolError(code) => Some(frame(*code, protocol_reason(*code))),
            SessionEnd::InvalidFrameLimit => {
                Some(frame(close_code::INVALID, "too many invalid frames"))
            }
            SessionEnd::Shutdown => Some(frame(close_code::AWAY, "gateway shutting down")),
            SessionEnd::Ended(why) => Some(Some(why.close())),
            SessionEnd::OverLimit { code, limit } => Some(Some(Close {
                code: *code,
                reason: if *code == close_code::SIZE {
                    format!("message exceeds {limit} for this device type")
                } else {
                    format!("rate limit exceeded: {limit}")
                },
            })),
        }
    }

    /// The close frame for the backend, if one is to be sent by the gateway.
    pub fn to_backend(&self) -> Option<Option<Close>> {
        match self {
            SessionEnd::ClosedBy(Closer::Device, f) => Some(f.clone()),
            SessionEnd::ClosedBy(_, _) | SessionEnd::BackendVanished => None,
            SessionEnd::DeviceVanished
            | SessionEnd::DeviceProtocolError(_)
            | SessionEnd::InvalidFrameLimit
            | SessionEnd::OverLimit { .. } => Some(frame(close_code::AWAY, "device disconnected")),
            SessionEnd::BackendProtocolError(code) => Some(frame(*code, protocol_reason(*code))),
            SessionEnd::Shutdown => Some(frame(close_code::AWAY, "gateway shutting down")),
            SessionEnd::Ended(why) => Some(Some(why.close())),
        }
    }

    /// The device is at fault and its connection is still up: the backend is closed first
    /// and what it still sends (answers to the device's frames before the fault) reaches the
    /// device before the device's close frame, as a server facing the device directly
    /// would have answered them before it read the faulty frame.
    pub fn backend_first(&self) -> bool {
        matches!(
            self,
            SessionEnd::DeviceProtocolError(_)
                | SessionEnd::InvalidFrameLimit
                | SessionEnd::OverLimit { .. }
        )
    }

    /// The leg whose framing broke: after the close frame its bytes are read and discarded
    /// unparsed until it closes (a lingering close), since closing a socket with unread data
    /// resets it and the peer would lose the close frame.
    pub fn broken_leg(&self) -> Option<Leg> {
        match self {
            SessionEnd::DeviceProtocolError(_) => Some(Leg::Device),
            SessionEnd::BackendProtocolError(_) => Some(Leg::Backend),
            _ => None,
        }
    }

    pub fn closer(&self) -> Closer {
        match self {
            SessionEnd::ClosedBy(c, _) => *c,
            SessionEnd::DeviceVanished | SessionEnd::DeviceProtocolError(_) => Closer::Device,
            SessionEnd::BackendVanished | SessionEnd::BackendProtocolError(_) => Closer::Backend,
            SessionEnd::Shutdown
            | SessionEnd::InvalidFrameLimit
            | SessionEnd::Ended(_)
            | SessionEnd::OverLimit { .. } => Closer::Gateway,
        }
    }

    /// One line for the audit log: close code, reason and who closed.
    pub fn describe(&self) -> String {
        let reason = match self {
            SessionEnd::ClosedBy(_, Some(f)) => f.reason.to_string(),
            _ => self
                .to_device()
                .flatten()
                .or_else(|| self.to_backend().flatten())
                .map(|f| f.reason.to_string())
                .unwrap_or_default(),
        };
        format!(
            "close {} by {}{}{}",
            self.logged_code(),
            self.closer().as_str(),
            if reason.is_empty() { "" } else { ": " },
            reason
        )
    }

    /// The close code to log: the one that ended the session, 1006 for a vanished peer.
    pub fn logged_code(&self) -> u16 {
        match self {
            SessionEnd::ClosedBy(_, Some(f)) => f.code,
            SessionEnd::ClosedBy(_, None) => close_code::NO_STATUS,
            SessionEnd::DeviceVanished | SessionEnd::BackendVanished => close_code::ABNORMAL,
            SessionEnd::DeviceProtocolError(c) | SessionEnd::BackendProtocolError(c) => *c,
            SessionEnd::InvalidFrameLimit => close_code::INVALID,
            SessionEnd::Shutdown => close_code::AWAY,
            SessionEnd::Ended(why) => why.close().code,
            SessionEnd::OverLimit { code, .. } => *code,
        }
    }
}

fn protocol_reason(code: u16) -> &'static str {
    match code {
        close_code::SIZE => "message too big",
        close_code::INVALID => "invalid UTF-8 in text frame",
        _ => "WebSocket protocol error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_complete_http() {
        let r = Refusal::NoRoute {
            offered: vec!["control.v1".into()],
            allowed: vec!["telemetry.v1".into()],
        };
        let text = String::from_utf8(r.http_response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body.contains("telemetry.v1"));
        assert!(head.contains("x-gatehouse-refusal: no-route"));
    }

    #[test]
    fn close_reasons_fit_in_a_control_frame() {
        let ends = [
            SessionEnd::BackendVanished,
            SessionEnd::DeviceVanished,
            SessionEnd::DeviceProtocolError(close_code::SIZE),
            SessionEnd::InvalidFrameLimit,
            SessionEnd::BackendProtocolError(close_code::PROTOCOL),
            SessionEnd::Shutdown,
        ];
        for end in ends {
            for f in [end.to_device(), end.to_backend()]
                .into_iter()
                .flatten()
                .flatten()
            {
                assert!(f.reason.len() < 123);
            }
        }
        assert_eq!(
            SessionEnd::BackendVanished
                .to_device()
                .unwrap()
                .unwrap()
                .code,
            close_code::ERROR
        );
        assert_eq!(
            SessionEnd::Shutdown.to_backend().unwrap().unwrap().code,
            close_code::AWAY
        );
    }
}
