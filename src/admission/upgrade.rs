//! The device's HTTP/1.1 WebSocket upgrade request (RFC 6455 section 4.2.1), pure: parse and
//! validate it from bytes, and write the 101 response. The gateway reads the request itself
//! (instead of tungstenite's synchronous callback) so that it can look up the route and
//! connect to a backend before answering, and refuse with a real HTTP status.

use base64::Engine;

use super::routing::is_token;
use crate::wire::Refusal;

/// The GUID RFC 6455 section 1.3 appends to the key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// Most headers in an upgrade request; more is refused with 431.
pub const MAX_HEADERS: usize = 64;

/// Prefix of the headers only the gateway may set.
pub const IDENTITY_HEADER_PREFIX: &str = "x-gatehouse-";

/// Headers that belong to this hop and are never forwarded to the backend.
const HOP_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "proxy-connection",
    "proxy-authorization",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// Headers about the client's address and the path it came by: the gateway writes its own
/// from the address it saw, so a device's are never passed on.
const FORWARDING_HEADERS: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Trace context (W3C): the gateway sends its own, continuing the device's only where the
/// route says so (`admission::trace`).
const TRACE_HEADERS: &[&str] = &["traceparent", "tracestate"];

/// Whether a header (name folded by `routing::fold_header_name`) is the gateway's own and
/// never passed on from the device, whatever a route allows.
pub fn never_forwarded(folded: &str) -> bool {
    folded.starts_with(IDENTITY_HEADER_PREFIX)
        || HOP_HEADERS.contains(&folded)
        || FORWARDING_HEADERS.contains(&folded)
        || TRACE_HEADERS.contains(&folded)
}

/// A validated upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub path: String,
    pub key: String,
    /// Offered subprotocols, in the device's order of preference.
    pub protocols: Vec<String>,
    /// End-to-end headers a route may pass on to the backend (its `forward_headers` pick).
    pub forward_headers: Vec<(String, Vec<u8>)>,
    /// How many `x-gatehouse-*` headers the device sent (dropped).
    pub dropped_identity_headers: usize,
    /// The device's `traceparent` and `tracestate`, as sent (the last of each).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The request and how many bytes of the buffer it used.
    Complete(UpgradeRequest, usize),
    /// More bytes are needed.
    Partial,
}

fn has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// What the headers of an upgrade request say, before the checks.
#[derive(Default)]
struct Headers<'b> {
    host: bool,
    upgrade: bool,
    connection_upgrade: bool,
    version: Option<&'b [u8]>,
    key: Option<&'b [u8]>,
    protocols: Vec<String>,
    forward_headers: Vec<(String, Vec<u8>)>,
    dropped_identity_headers: usize,
    traceparent: Option<String>,
    tracestate: Option<String>,
    /// A Content-Length other than 0, or a Transfer-Encoding: the request has a body.
    body: bool,
}

impl<'b> Headers<'b> {
    /// Reads every header once: the handshake's own, the offered subprotocols, and what is
    /// passed on to the backend.
    fn scan(headers: &[httparse::Header<'b>]) -> Result<Self, Refusal> {
        let mut out = Headers::default();
        for h in headers {
            let name = h.name.to_ascii_lowercase();
            match name.as_str() {
                "host" => out.host = true,
                "upgrade" => out.upgrade |= has_token(h.value, "websocket"),
                "connection" => out.connection_upgrade |= has_token(h.value, "upgrade"),
                "sec-websocket-version" => out.version = Some(h.value),
                "sec-websocket-key" => {
                    if out.key.is_some() {
                        return Err(Refusal::BadRequest("repeated Sec-WebSocket-Key"));
                    }
                    out.key = Some(h.value)
                }
                "sec-websocket-protocol" => out.add_protocols(h.value)?,
                "transfer-encoding" => out.body = true,
                "traceparent" => {
                    out.traceparent = std::str::from_utf8(h.value).ok().map(str::to_string)
                }
                "tracestate" => {
                    out.tracestate = std::str::from_utf8(h.value).ok().map(str::to_string)
                }
                "content-length" => out.body |= h.value.trim_ascii() != b"0",
                _ => {}
            }
            // Compared as backends would read them: `X_Gatehouse_Device_Id` poses as the
            // identity header on stacks that fold `_` into `-`.
            let folded = super::routing::fold_header_name(&name);
            if folded.starts_with(IDENTITY_HEADER_PREFIX) {
                out.dropped_identity_headers += 1;
            } else if !never_forwarded(&folded) {
                out.forward_headers.push((name, h.value.to_vec()));
            }
        }
        Ok(out)
    }

    fn add_protocols(&mut self, value: &[u8]) -> Result<(), Refusal> {
        let value = std::str::from_utf8(value)
            .map_err(|_| Refusal::BadRequest("Sec-WebSocket-Protocol is not text"))?;
        for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !is_token(p) {
                return Err(Refusal::BadRequest(
                    "Sec-WebSocket-Protocol is not a list of tokens",
                ));
            }
            self.protocols.push(p.to_string());
        }
        Ok(())
    }

    /// RFC 6455 section 4.2.1: an upgrade to WebSocket 13 with a Host and a 16-byte key.
    fn key(&self) -> Result<String, Refusal> {
        if !self.upgrade || !self.connection_upgrade {
            return Err(Refusal::UpgradeRequired);
        }
        if self.version != Some(b"13".as_slice()) {
            return Err(Refusal::UpgradeRequired);
        }
        if !self.host {
            return Err(Refusal::BadRequest("missing Host header"));
        }
        let key = self
            .key
            .ok_or(Refusal::BadRequest("missing Sec-WebSocket-Key"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| Refusal::BadRequest("Sec-WebSocket-Key is not base64"))?;
        if decoded.len() != 16 {
            return Err(Refusal::BadRequest(
                "Sec-WebSocket-Key must encode 16 bytes",
            ));
        }
        Ok(String::from_utf8_lossy(key).into_owned())
    }
}

/// Parses the request at the start of `buf`. `max_bytes` bounds the request head.
pub fn parse(buf: &[u8], max_bytes: usize) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_bytes {
                Err(Refusal::HeadersTooLarge)
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::BadRequest("malformed HTTP request")),
    };
    if consumed > max_bytes {
        return Err(Refusal::HeadersTooLarge);
    }
    if req.method != Some("GET") {
        return Err(Refusal::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(Refusal::BadRequest("HTTP/1.1 is required"));
    }
    let path = req.path.unwrap_or("/").to_string();
    let headers = Headers::scan(req.headers)?;
    let key = headers.key()?;
    if headers.body {
        // Bytes after the head would be read as the first WebSocket frame.
        return Err(Refusal::BadRequest(
            "an upgrade request has no body (Content-Length or Transfer-Encoding)",
        ));
    }
    Ok(Parsed::Complete(
        UpgradeRequest {
            path,
            key,
            protocols: headers.protocols,
            forward_headers: headers.forward_headers,
            dropped_identity_headers: headers.dropped_identity_headers,
            traceparent: headers.traceparent,
            tracestate: headers.tracestate,
        },
        consumed,
    ))
}

/// The 101 response accepting the upgrade with `protocol`.
pub fn switching_protocols(key: &str, protocol: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: control.v1, telemetry.v1\r\nX-Gatehouse-Device-Id: evil\r\nUser-Agent: dev/1\r\n\r\n";

    fn complete(text: &str) -> UpgradeRequest {
        match parse(text.as_bytes(), 8192).unwrap() {
            Parsed::Complete(r, n) => {
                assert_eq!(n, text.len());
                r
            }
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_a_valid_upgrade() {
        let r = complete(GOOD);
        assert_eq!(r.path, "/ws");
        assert_eq!(r.protocols, vec!["control.v1", "telemetry.v1"]);
        assert_eq!(r.dropped_identity_headers, 1);
        assert_eq!(
            r.forward_headers,
            vec![("user-agent".to_string(), b"dev/1".to_vec())]
        );
        let resp = String::from_utf8(switching_protocols(&r.key, "control.v1")).unwrap();
        // RFC 6455 section 1.3's example key and accept value.
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn forwarding_and_identity_headers_are_never_candidates() {
        let planted = GOOD.replace(
            "User-Agent",
            "X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nX_Gatehouse_Device_Id: evil\r\nContent-Length: 0\r\nAuthorization: Bearer x\r\nUser-Agent",
        );
        let r = complete(&planted);
        assert_eq!(r.dropped_identity_headers, 2);
        let names: Vec<_> = r.forward_headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["authorization", "user-agent"]);
    }

    #[test]
    fn partial_until_the_blank_line() {
        assert_eq!(parse(&GOOD.as_bytes()[..40], 8192), Ok(Parsed::Partial));
        assert_eq!(
            parse(&GOOD.as_bytes()[..40], 40),
            Err(Refusal::HeadersTooLarge)
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (GOOD.replace("GET", "POST"), Refusal::MethodNotAllowed),
            (
                GOOD.replace("Upgrade: websocket\r\n", ""),
                Refusal::UpgradeRequired,
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                Refusal::UpgradeRequired,
            ),
            (
                GOOD.replace("Host: gw\r\n", ""),
                Refusal::BadRequest("missing Host header"),
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "abc"),
                Refusal::BadRequest("Sec-WebSocket-Key is not base64"),
            ),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                Refusal::BadRequest("HTTP/1.1 is required"),
            ),
            (
                GOOD.replace("User-Agent", "Content-Length: 5\r\nUser-Agent"),
                Refusal::BadRequest(
                    "an upgrade request has no body (Content-Length or Transfer-Encoding)",
                ),
            ),
            (
                GOOD.replace("User-Agent", "Transfer-Encoding: chunked\r\nUser-Agent"),
                Refusal::BadRequest(
                    "an upgrade request has no body (Content-Length or Transfer-Encoding)",
                ),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text.as_bytes(), 8192), Err(want), "{text}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes, 1024);
        }
    }
}
