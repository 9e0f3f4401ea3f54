//! The hostile-input suite: raw bytes an attacker (or a broken device) sends, over real TLS.
//! Each case asserts the documented answer (HTTP status, close code, or a closed
//! connection), that the gateway stays up, and that a well-behaved device connected all
//! along keeps exchanging frames with its backend within normal latency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket frame as bytes: any flags, opcode, mask and announced length.
struct Raw {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
    /// Announce this length instead of the payload's.
    announce: Option<u64>,
}

impl Raw {
    fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload: payload.into(),
            announce: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![(u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode];
        let len = self.announce.unwrap_or(self.payload.len() as u64);
        let mask_bit = if self.masked { 0x80 } else { 0 };
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= u64::from(u16::MAX) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        let key = [0x11, 0x22, 0x33, 0x44];
        if self.masked {
            out.extend_from_slice(&key);
            out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(&self.payload);
        }
        out
    }
}

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// A gateway with one well-behaved device connected for the whole test.
struct Bed {
    gw: Gateway,
    ingest: Backend,
    good: DeviceSocket,
    good_be: BackendConn,
    attacker: gatehouse_pki::IssuedCert,
}

impl Bed {
    async fn start() -> Bed {
        let mut ingest = Backend::start().await;
        let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
        let good_cert = gw.enroll("good-1", "env-sensor");
        let attacker = gw.enroll("bad-1", "env-sensor");
        let (good, _) = gw
            .connect(Some(&good_cert), &["telemetry.v1"])
            .await
            .unwrap();
        let good_be = ingest.next().await;
        Bed {
            gw,
            ingest,
            good,
            good_be,
            attacker,
        }
    }

    /// The well-behaved device still gets a frame through, quickly.
    async fn good_device_unharmed(&mut self, case: &str) {
        let t = Instant::now();
        self.good.send(Message::text(reading(7))).await.unwrap();
        assert_eq!(
            next_msg(&mut self.good_be.ws).await,
            Message::text(reading(7)),
            "{case}"
        );
        let rtt = t.elapsed();
        assert!(rtt < Duration::from_millis(500), "{case}: {rtt:?}");
    }

    /// An upgraded attacker session, and its backend side.
    async fn attacker_session(&mut self) -> (DeviceSocket, BackendConn) {
        let (ws, _) = self
            .gw
            .connect(Some(&self.attacker), &["telemetry.v1"])
            .await
            .unwrap();
        (ws, self.ingest.next().await)
    }

    /// TLS to the gateway with the attacker's certificate, nothing sent yet.
    async fn attacker_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        connect_tls(self.gw.addr, self.gw.client_config(Some(&self.attacker)))
            .await
            .unwrap()
    }
}

/// Reads the close code the gateway sends, within the test bound; `None` for a connection
/// that ended without one. Then reads on, as a real peer does, so that its close reply goes
/// out and it sees the connection end.
async fn close_code<S>(ws: &mut S) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures_util::StreamExt;
    within(async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => {
                    while let Some(Ok(_)) = ws.next().await {}
                    return f.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
}

/// A ClientHello record as a TLS 1.0-1.2 client sends it: `version` in the hello, no
/// supported_versions extension, ECDHE and RSA suites, and a renegotiation_info extension.
fn legacy_client_hello(version: u16) -> Vec<u8> {
    let suites: &[u16] = &[0xc02b, 0xc009, 0xc013, 0x002f, 0x0035];
    let mut extensions = Vec::new();
    let mut extension = |kind: u16, data: &[u8]| {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extensions.extend_from_slice(data);
    };
    extension(0x000a, &[0x00, 0x02, 0x00, 0x17]); // supported_groups: secp256r1
    extension(0x000b, &[0x01, 0x00]); // ec_point_formats: uncompressed
    extension(0x000d, &[0x00, 0x02, 0x04, 0x03]); // signature_algorithms: ecdsa_secp256r1_sha256
    extension(0xff01, &[0x00]); // renegotiation_info, initial handshake
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// A case: its name, the raw frames sent, the close codes that are correct.
type Case = (&'static str, Vec<Vec<u8>>, &'static [u16]);

#[tokio::test]
async fn malformed_frames_get_their_documented_close_codes() {
    let mut bed = Bed::start().await;
    let long_ping = Raw::new(PING, vec![0u8; 126]);
    let mut unmasked = Raw::new(TEXT, "hi");
    unmasked.masked = false;
    let mut rsv = Raw::new(TEXT, "hi");
    rsv.rsv = 0b100;
    let mut fragmented_ping = Raw::new(PING, "x");
    fragmented_ping.fin = false;
    let mut huge = Raw::new(TEXT, Vec::new());
    huge.announce = Some(1 << 40);
    let mut first_half = Raw::new(TEXT, vec![b'a'; 60 * 1024]);
    first_half.fin = false;
    let cases: Vec<Case> = vec![
        ("unmasked client frame", vec![unmasked.bytes()], &[1002]),
        (
            "reserved bits without an extension",
            vec![rsv.bytes()],
            &[1002],
        ),
        (
            "reserved opcode 3",
            vec![Raw::new(0x3, "x").bytes()],
            &[1002],
        ),
        ("fragmented ping", vec![fragmented_ping.bytes()], &[1002]),
        (
            "control frame over 125 bytes",
            vec![long_ping.bytes()],
            &[1002],
        ),
        (
            "continuation with nothing to continue",
            vec![Raw::new(CONTINUATION, "x").bytes()],
            &[1002],
        ),
        (
            "invalid UTF-8 in a text frame",
            vec![Raw::new(TEXT, vec![0xc3, 0x28]).bytes()],
            &[1007],
        ),
        (
            "a header announcing 2^40 bytes",
            vec![huge.bytes()],
            &[1009],
        ),
        (
            "fragments beyond the message limit",
            vec![
                first_half.bytes(),
                Raw::new(CONTINUATION, vec![b'a'; 10 * 1024]).bytes(),
            ],
            &[1009],
        ),
        (
            "close code 999",
            vec![Raw::new(CLOSE, 999u16.to_be_bytes().to_vec()).bytes()],
            &[1002],
        ),
        (
            "close code 1005 on the wire",
            vec![Raw::new(CLOSE, 1005u16.to_be_bytes().to_vec()).bytes()],
            &[1002],
        ),
        (
            "close reason that is not UTF-8",
            vec![Raw::new(CLOSE, [&1000u16.to_be_bytes()[..], &[0xff, 0xfe]].concat()).bytes()],
            &[1002, 1007],
        ),
    ];
    for (case, frames, codes) in cases {
        let (mut ws, mut be) = bed.attacker_session().await;
        for f in frames {
            ws.get_mut().write_all(&f).await.unwrap();
        }
        ws.get_mut().flush().await.unwrap();
        // The backend is told the device is gone (first), then the device why.
        let (got, backend_close) = tokio::join!(close_code(&mut ws), close_code(&mut be.ws));
        assert!(
            got.is_some_and(|c| codes.contains(&c)),
            "{case}: close {got:?}, expected one of {codes:?}"
        );
        assert!(backend_close.is_some(), "{case}: backend not closed");
        bed.good_device_unharmed(case).await;
    }
    bed.gw.stop().await;
}

#[tokio::test]
async fn answers_in_flight_reach_a_device_before_its_protocol_error_close() {
    // What a server facing the device directly would do: it answers the frames before the
    // faulty one, then fails the connection. The gateway closes the backend first and
    // relays what it still sends.
    let mut bed = Bed::start().await;
    let (mut ws, mut be) = bed.attacker_session().await;
    let mut rsv = Raw::new(TEXT, "bad");
    rsv.rsv = 0b010;
    let frames = [Raw::new(TEXT, reading(1)).bytes(), rsv.bytes()].concat();
    ws.get_mut().write_all(&frames).await.unwrap();
    ws.get_mut().flush().await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));
    be.ws.send(Message::text("ack 1")).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, Message::text("ack 1"));
    let (device_close, backend_close) = tokio::join!(close_code(&mut ws), close_code(&mut be.ws));
    assert_eq!(device_close, Some(1002));
    assert_eq!(backend_close, Some(1001));
    bed.good_device_unharmed("answer before a protocol error close")
        .await;
    bed.gw.stop().await;
}

#[tokio::test]
async fn a_device_still_sending_an_oversized_frame_receives_its_1009() {
    // The gateway stops parsing at the header, but the device goes on sending the payload.
    // Closing the socket with that data unread would reset the connection (and a peer in the
    // middle of a write may lose the close frame): the gateway shuts its side and discards
    // what still comes, unparsed, until the device closes.
    let mut bed = Bed::start().await;
    let (mut ws, mut be) = bed.attacker_session().await;
    let mut frame = Raw::new(TEXT, Vec::new());
    frame.announce = Some(16 << 20);
    let tls = ws.get_mut();
    tls.write_all(&frame.bytes()).await.unwrap();
    tls.write_all(&vec![b'a'; 256 << 10]).await.unwrap();
    tls.flush().await.unwrap();
    let (device_close, backend_close) = tokio::join!(close_code(&mut ws), close_code(&mut be.ws));
    assert_eq!(device_close, Some(1009));
    assert!(backend_close.is_some());
    // The rest of the payload is still taken (and dropped), not answered with a reset.
    let tls = ws.get_mut();
    let rest = within(async {
        for _ in 0..16 {
            tls.write_all(&vec![b'a'; 64 << 10]).await?;
            tls.flush().await?;
        }
        tls.shutdown().await
    })
    .await;
    assert!(rest.is_ok(), "the gateway reset the connection: {rest:?}");
    bed.good_device_unharmed("oversized frame still being sent")
        .await;
    bed.gw.stop().await;
}

#[tokio::test]
async fn a_ping_flood_and_frames_after_close_harm_nobody() {
    let mut bed = Bed::start().await;
    // 5,000 pings the attacker never reads the pongs of.
    let (mut ws, _be) = bed.attacker_session().await;
    let ping = Raw::new(PING, "p").bytes();
    let flood: Vec<u8> = std::iter::repeat_n(ping, 5000).flatten().collect();
    ws.get_mut().write_all(&flood).await.unwrap();
    ws.get_mut().flush().await.unwrap();
    bed.good_device_unharmed("ping flood").await;
    drop(ws);

    // A close, then data after it: the gateway answers the close and forwards nothing.
    let (mut ws, mut be) = bed.attacker_session().await;
    let mut bytes = Raw::new(CLOSE, 1000u16.to_be_bytes().to_vec()).bytes();
    bytes.extend(Raw::new(TEXT, reading(1)).bytes());
    ws.get_mut().write_all(&bytes).await.unwrap();
    ws.get_mut().flush().await.unwrap();
    assert_eq!(close_code(&mut be.ws).await, Some(1000));
    assert_eq!(close_code(&mut ws).await, Some(1000));
    bed.good_device_unharmed("frames after close").await;
    bed.gw.stop().await;
}

/// Reads an HTTP answer off a raw TLS stream: the status and the whole text.
async fn http_answer(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = within(tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: telemetry.v1\r\n";

#[tokio::test]
async fn hostile_upgrade_requests_get_their_documented_statuses() {
    let mut bed = Bed::start().await;
    let many_headers: String = (0..70).map(|i| format!("X-Pad-{i}: x\r\n")).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "a body",
            format!("{UPGRADE}Content-Length: 5\r\n\r\nhello"),
            400,
            "bad-request",
        ),
        (
            "Content-Length with Transfer-Encoding",
            format!("{UPGRADE}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400,
            "bad-request",
        ),
        (
            "no key",
            format!("{UPGRADE}\r\n").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
            "bad-request",
        ),
        (
            "a key that is not 16 bytes",
            format!("{UPGRADE}\r\n").replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            400,
            "bad-request",
        ),
        (
            "version 8",
            format!("{UPGRADE}\r\n").replace("Version: 13", "Version: 8"),
            426,
            "upgrade-required",
        ),
        (
            "too many headers",
            format!("{UPGRADE}{many_headers}\r\n"),
            431,
            "headers-too-large",
        ),
        (
            "an oversized head",
            format!("{UPGRADE}X-Big: {}\r\n\r\n", "a".repeat(9000)),
            431,
            "headers-too-large",
        ),
        (
            "an unrouted subprotocol",
            format!("{UPGRADE}\r\n").replace("telemetry.v1", "admin.v1"),
            400,
            "no-route",
        ),
    ];
    for (case, request, status, code) in cases {
        let mut tls = bed.attacker_tls().await;
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let (got, text) = http_answer(&mut tls).await;
        assert_eq!(got, status, "{case}: {text}");
        assert!(
            text.contains(&format!("x-gatehouse-refusal: {code}")),
            "{case}: {text}"
        );
        bed.good_device_unharmed(case).await;
    }

    // permessage-deflate offered: the upgrade succeeds without it.
    let mut tls = bed.attacker_tls().await;
    tls.write_all(
        format!(
            "{UPGRADE}Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = within(tls.read(&mut head)).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    let _be = bed.ingest.next().await;
    drop(tls);

    // A second request pipelined after the upgrade is read as WebSocket bytes: 1002.
    let mut tls = bed.attacker_tls().await;
    tls.write_all(format!("{UPGRADE}\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = within(tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // The close frame after the 101: opcode 0x88, then the code 1002.
    let close_at = buf
        .windows(2)
        .position(|w| w[0] == 0x88)
        .expect("a close frame");
    let code = u16::from_be_bytes([buf[close_at + 2], buf[close_at + 3]]);
    assert_eq!(code, 1002, "{text}");
    bed.good_device_unharmed("pipelined request").await;
    bed.gw.stop().await;
}

#[tokio::test]
async fn hostile_tls_clients_are_refused_and_harm_nobody() {
    let mut bed = Bed::start().await;
    // Plain HTTP to the TLS port.
    let mut tcp = tokio::net::TcpStream::connect(bed.gw.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = within(tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 101"));
    bed.good_device_unharmed("plain HTTP").await;

    // TLS 1.2 when the minimum is 1.3.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            bed.gw.ca.cert_der().to_vec(),
        ))
        .unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(gatehouse::net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let refused = connect(
        bed.gw.addr,
        std::sync::Arc::new(tls12),
        &["telemetry.v1"],
        &[],
    )
    .await;
    assert!(
        matches!(refused, Err(ConnectError::Transport(_))),
        "{refused:?}"
    );
    bed.good_device_unharmed("TLS 1.2").await;

    // TLS 1.0, 1.1 and 1.2 ClientHellos (no supported_versions extension: the version is
    // the hello's own), each also asking for renegotiation: a fatal protocol_version alert.
    for (version, name) in [
        (0x0301, "TLS 1.0"),
        (0x0302, "TLS 1.1"),
        (0x0303, "TLS 1.2"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(bed.gw.addr).await.unwrap();
        tcp.write_all(&legacy_client_hello(version)).await.unwrap();
        let mut answer = Vec::new();
        let _ = within(tcp.read_to_end(&mut answer)).await;
        assert_eq!(
            answer.get(..2),
            Some(&[0x15, 0x03][..]),
            "{name}: not an alert record: {answer:02x?}"
        );
        assert_eq!(
            answer.get(5..7),
            Some(&[2, 70][..]),
            "{name}: not a fatal protocol_version alert: {answer:02x?}"
        );
        bed.good_device_unharmed(name).await;
    }

    // Renegotiation: TLS 1.3 has none, and TLS 1.2 is refused above. A client that finishes
    // a TLS 1.3 handshake and then sends a new ClientHello in the clear gets a fatal alert
    // (rustls reads every record after the handshake as encrypted: bad_record_mac) and is
    // closed.
    let mut tls = bed.attacker_tls().await;
    let (tcp, _) = tls.get_mut();
    tcp.write_all(&legacy_client_hello(0x0303)).await.unwrap();
    let mut buf = [0u8; 64];
    let after = within(tls.read(&mut buf)).await;
    let alert = after
        .as_ref()
        .err()
        .and_then(|e| e.get_ref())
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(
        matches!(
            alert,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadRecordMac
            ))
        ),
        "renegotiation: {after:?}"
    );
    let mut rest = Vec::new();
    let _ = within(tls.get_mut().0.read_to_end(&mut rest)).await;
    bed.good_device_unharmed("renegotiation").await;

    // A ClientHello one byte at a time, slower than the handshake timeout allows, does not
    // hold up a new device meanwhile.
    let mut slow = tokio::net::TcpStream::connect(bed.gw.addr).await.unwrap();
    slow.write_all(&[0x16]).await.unwrap();
    let other = bed.gw.enroll("good-2", "env-sensor");
    let (_dev, _) = bed
        .gw
        .connect(Some(&other), &["telemetry.v1"])
        .await
        .unwrap();
    bed.good_device_unharmed("slow ClientHello").await;
    drop(slow);
    bed.gw.stop().await;
}

/// Every kind of bad certificate is refused with its documented answer, and the device
/// connected all along is unharmed each time.
#[tokio::test]
async fn bad_certificates_are_refused_and_harm_nobody() {
    let mut bed = Bed::start().await;
    let now = time::OffsetDateTime::now_utc();
    let enroll = |gw: &Gateway, id: &str, cert: &gatehouse_pki::IssuedCert| {
        gw.registry
            .enroll(gatehouse::model::Enrollment {
                id: id.into(),
                device_type: "env-sensor".into(),
                sha256: cert.fingerprint_hex(),
                labels: Default::default(),
            })
            .unwrap();
    };
    let mut expired_opts = device_options();
    expired_opts.not_before = Some(now - time::Duration::days(3));
    expired_opts.validity = time::Duration::days(1);
    let expired = bed.gw.ca.issue_device("expired-1", &expired_opts).unwrap();
    let mut future_opts = device_options();
    future_opts.not_before = Some(now + time::Duration::days(2));
    let future = bed.gw.ca.issue_device("future-1", &future_opts).unwrap();
    let mut no_eku_opts = device_options();
    no_eku_opts.client_auth_eku = false;
    let no_eku = bed.gw.ca.issue_device("no-eku-1", &no_eku_opts).unwrap();
    let server_only = bed
        .gw
        .ca
        .issue_server(&["localhost".into()], &[], time::Duration::days(1))
        .unwrap();
    let revoked = bed.gw.enroll("revoked-1", "env-sensor");
    bed.gw.revoke_in_crl(&revoked);
    let unknown = bed.gw.issue("never-enrolled");
    for (id, cert) in [
        ("expired-1", &expired),
        ("future-1", &future),
        ("no-eku-1", &no_eku),
        ("server-only", &server_only),
    ] {
        enroll(&bed.gw, id, cert);
    }
    // (case, certificate, the HTTP answer; `None`: a TLS alert).
    type Answer = Option<(u16, &'static str)>;
    let cases: [(&str, &gatehouse_pki::IssuedCert, Answer); 6] = [
        ("expired", &expired, None),
        ("not yet valid", &future, None),
        (
            "no extended key usage",
            &no_eku,
            Some((403, "not-a-client-certificate")),
        ),
        ("serverAuth only", &server_only, None),
        ("revoked in the CRL", &revoked, None),
        (
            "valid chain, not enrolled",
            &unknown,
            Some((403, "unknown-device")),
        ),
    ];
    for (case, cert, answer) in cases {
        let result = bed.gw.connect(Some(cert), &["telemetry.v1"]).await;
        match answer {
            Some((status, code)) => assert_refused(result, status, code),
            // The TLS layer refuses these with an alert.
            None => assert!(
                matches!(
                    result,
                    Err(ConnectError::Transport(_)) | Err(ConnectError::Http { status: 403, .. })
                ),
                "{case}: {result:?}"
            ),
        }
        bed.good_device_unharmed(case).await;
    }
    bed.gw.stop().await;
}

/// Sends `frame` over `ws` until the gateway closes it; the close code.
async fn flood_until_closed<S>(ws: S, frame: &str) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let (mut tx, mut rx) = futures_util::StreamExt::split(ws);
    let flood = async {
        while tx.send(Message::text(frame)).await.is_ok() {}
        std::future::pending::<()>().await
    };
    tokio::select! {
        c = close_code(&mut rx) => c,
        _ = flood => unreachable!(),
    }
}

/// A stalled reader on either side, over real TLS: a device that stops reading while its
/// backend sends is closed after the write timeout (the backend gets 4013), and a backend
/// that stops reading while its device sends ends the session the same way (the device gets
/// 4014); a device connected all along is unharmed.
#[tokio::test]
async fn stalled_readers_on_either_side_are_cut_off() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.tail = "[session]\nwrite_timeout_ms = 500\n[limits]\nframes_per_second = 0\nbytes_per_second = 0\n".into();
    options.schemas_dir = Some(permissive_schemas(&tempfile::tempdir().unwrap().keep()));
    let gw = Gateway::start(options).await;
    let good_cert = gw.enroll("good-1", "env-sensor");
    let (mut good, _) = gw
        .connect(Some(&good_cert), &["telemetry.v1"])
        .await
        .unwrap();
    let mut good_be = ingest.next().await;
    let stalled = gw.enroll("stalled-1", "env-sensor");
    // A JSON string: valid under the permissive schemas.
    let big = format!("\"{}\"", "x".repeat(16 * 1024));

    // The device never reads; its backend floods it.
    let (dev, _) = gw.connect(Some(&stalled), &["telemetry.v1"]).await.unwrap();
    let be = ingest.next().await;
    assert_eq!(flood_until_closed(be.ws, &big).await, Some(4013));
    drop(dev);
    good.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut good_be.ws).await, Message::text(reading(1)));

    // The backend never reads; the device floods it.
    let (dev, _) = gw.connect(Some(&stalled), &["telemetry.v1"]).await.unwrap();
    let _be = ingest.next().await;
    assert_eq!(flood_until_closed(dev, &big).await, Some(4014));
    good.send(Message::text(reading(2))).await.unwrap();
    assert_eq!(next_msg(&mut good_be.ws).await, Message::text(reading(2)));
    gw.stop().await;
}
