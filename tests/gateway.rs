//! End-to-end: real gateway, real TLS WebSockets on 127.0.0.1:0, certificates minted per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Reads until a close frame and returns it.
async fn next_close<S>(ws: &mut S) -> Option<CloseFrame>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Close(f))) => return f,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn telemetry_and_control_reach_the_backend_of_their_subprotocol() {
    let mut ingest = Backend::start().await;
    let mut control = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![
        telemetry_route(vec![ingest.url("/ingest")]),
        control_route(vec![control.url("/control")]),
    ]))
    .await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let lock = gw.enroll("lock-1", "door-lock");

    let (mut dev, resp) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "telemetry.v1");
    let mut be = ingest.next().await;
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));

    // The lock offers control first: it gets the control backend.
    let (mut lock_dev, resp) = gw
        .connect(Some(&lock), &["control.v1", "telemetry.v1"])
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "control.v1");
    let mut cbe = control.next().await;
    cbe.ws
        .send(Message::text(r#"{"id":1,"command":"unlock"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut lock_dev).await,
        Message::text(r#"{"id":1,"command":"unlock"}"#)
    );
    lock_dev
        .send(Message::text(r#"{"id":1,"status":"ok"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut cbe.ws).await,
        Message::text(r#"{"id":1,"status":"ok"}"#)
    );
    assert!(
        ingest.conns.try_recv().is_err(),
        "the lock's session must not reach the ingest backend"
    );

    // Ping from the device: answered once, by the gateway, and not passed on to the backend
    // (issue 8: forwarding it gave the device a second pong from the backend).
    dev.send(Message::Ping(b"hb".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut dev).await,
        Message::Pong(b"hb".to_vec().into())
    );
    dev.send(Message::text(reading(2))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(2)));
    gw.stop().await;
}

/// The backend gets the gateway's identity and forwarding headers, and of the device's own
/// headers only those its route allows: planted identity (also spelled with underscores),
/// forwarding and credential headers never arrive.
#[tokio::test]
async fn identity_headers_arrive_and_spoofed_ones_do_not() {
    let mut ingest = Backend::start().await;
    let mut route = telemetry_route(vec![ingest.url("/")]);
    route.extra = "forward_headers = [\"User-Agent\", \"x_trace_id\"]";
    let gw = Gateway::start(Options::new(vec![route])).await;
    let sensor = gw.enroll("sensor-7", "env-sensor");
    let (_dev, _) = connect(
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["telemetry.v1"],
        &[
            ("x-gatehouse-device-id", "someone-else"),
            ("X-Gatehouse-Device-Type", "door-lock"),
            ("x-gatehouse-admin", "true"),
            ("X_Gatehouse_Device_Id", "someone-else"),
            ("X-Forwarded-For", "10.9.9.9"),
            ("Forwarded", "for=10.9.9.9"),
            ("X-Real-IP", "10.9.9.9"),
            ("Authorization", "Bearer stolen"),
            ("Cookie", "session=1"),
            ("user-agent", "sensor-fw/1.2"),
            ("x-trace-id", "abc"),
        ],
    )
    .await
    .unwrap();
    let be = ingest.next().await;
    let h = &be.headers;
    assert_eq!(h["x-gatehouse-device-id"], "sensor-7");
    assert_eq!(h["x-gatehouse-device-type"], "env-sensor");
    assert_eq!(
        h["x-gatehouse-cert-sha256"],
        sensor.fingerprint_hex().as_str()
    );
    assert!(!h["x-gatehouse-connection-id"].is_empty());
    assert_eq!(h.get_all("x-gatehouse-device-id").iter().count(), 1);
    assert_eq!(h.get_all("x-gatehouse-device-type").iter().count(), 1);
    assert!(h.get("x-gatehouse-admin").is_none());
    assert_eq!(h["sec-websocket-protocol"], "telemetry.v1");
    assert_eq!(h["user-agent"], "sensor-fw/1.2");
    assert_eq!(h["x-trace-id"], "abc");
    assert!(h.get("x_gatehouse_device_id").is_none());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["forwarded"], "for=127.0.0.1");
    for planted in ["x-real-ip", "authorization", "cookie"] {
        assert!(h.get(planted).is_none(), "{planted} reached the backend");
    }
    gw.stop().await;
}

#[tokio::test]
async fn registry_refusals_have_documented_statuses() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let unknown = gw.issue("never-enrolled");
    let suspended = gw.enroll("suspended-1", "env-sensor");
    let revoked = gw.enroll("revoked-1", "env-sensor");
    gw.registry
        .set_status("suspended-1", gatehouse::model::DeviceStatus::Suspended)
        .unwrap();
    gw.registry
        .set_status("revoked-1", gatehouse::model::DeviceStatus::Revoked)
        .unwrap();

    for (cert, code) in [
        (&unknown, "unknown-device"),
        (&suspended, "device-suspended"),
        (&revoked, "device-revoked"),
    ] {
        match gw.connect(Some(cert), &["telemetry.v1"]).await {
            Err(ConnectError::Http {
                status,
                body,
                refusal,
            }) => {
                assert_eq!(status, 403, "{code}");
                assert_eq!(refusal.as_deref(), Some(code));
                assert!(body.starts_with(code), "{body}");
            }
            other => panic!("{code}: expected 403, got {other:?}"),
        }
    }

    // A certificate without the clientAuth extended key usage.
    let no_eku = gw
        .ca
        .issue_device(
            "no-eku",
            &gatehouse_pki::DeviceCertOptions {
                client_auth_eku: false,
                ..Default::default()
            },
        )
        .unwrap();
    gw.registry
        .enroll(gatehouse::model::Enrollment {
            id: "no-eku".into(),
            device_type: "env-sensor".into(),
            sha256: no_eku.fingerprint_hex(),
            labels: Default::default(),
        })
        .unwrap();
    let err = gw
        .connect(Some(&no_eku), &["telemetry.v1"])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err:?}");

    // No usable subprotocol: 400, and the body names what the device may use.
    let sensor = gw.enroll("sensor-2", "env-sensor");
    match gw.connect(Some(&sensor), &["control.v1"]).await {
        Err(ConnectError::Http { status, body, .. }) => {
            assert_eq!(status, 400);
            assert!(body.contains("telemetry.v1"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let err = gw.connect(Some(&sensor), &[]).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    gw.stop().await;
}

#[tokio::test]
async fn tls_refusals_crl_other_ca_and_no_certificate() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;

    // Revoked in the CRL (registry says active): the TLS handshake fails.
    let crl_revoked = gw.enroll("crl-revoked", "env-sensor");
    gw.revoke_in_crl(&crl_revoked);
    match gw.connect(Some(&crl_revoked), &["telemetry.v1"]).await {
        Err(ConnectError::Transport(e)) => assert!(e.contains("CertificateRevoked"), "{e}"),
        other => panic!("expected a TLS alert, got {other:?}"),
    }

    // A certificate from another CA, even with an enrolled fingerprint.
    let other_ca =
        gatehouse_pki::CertificateAuthority::generate("Other CA", time::Duration::days(1)).unwrap();
    let foreign = other_ca
        .issue_device("foreign", &gatehouse_pki::DeviceCertOptions::default())
        .unwrap();
    gw.registry
        .enroll(gatehouse::model::Enrollment {
            id: "foreign".into(),
            device_type: "env-sensor".into(),
            sha256: foreign.fingerprint_hex(),
            labels: Default::default(),
        })
        .unwrap();
    match gw.connect(Some(&foreign), &["telemetry.v1"]).await {
        Err(ConnectError::Transport(e)) => assert!(
            e.contains("UnknownCA") || e.contains("BadCertificate"),
            "{e}"
        ),
        other => panic!("expected a TLS alert, got {other:?}"),
    }

    // No client certificate at all.
    match gw.connect(None, &["telemetry.v1"]).await {
        Err(ConnectError::Transport(e)) => assert!(e.contains("CertificateRequired"), "{e}"),
        other => panic!("expected a TLS alert, got {other:?}"),
    }

    // A valid device still gets in: the refusals above were about those certificates.
    let good = gw.enroll("good", "env-sensor");
    gw.connect(Some(&good), &["telemetry.v1"]).await.unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("s1", "env-sensor");

    // Device closes: the backend sees the device's code and reason.
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    dev.close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "battery low".into(),
    }))
    .await
    .unwrap();
    let f = next_close(&mut be.ws).await.unwrap();
    assert_eq!(
        (u16::from(f.code), f.reason.as_str()),
        (4001, "battery low")
    );
    // The device gets its close answered and the connection ends.
    let echo = next_close(&mut dev).await.unwrap();
    assert_eq!(u16::from(echo.code), 4001);

    // Backend closes: the device sees the backend's code and reason.
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    be.ws
        .close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: "quota exceeded".into(),
        }))
        .await
        .unwrap();
    let f = next_close(&mut dev).await.unwrap();
    assert_eq!(
        (f.code, f.reason.as_str()),
        (CloseCode::Policy, "quota exceeded")
    );
    gw.stop().await;
}

#[tokio::test]
async fn dead_backends_give_502_and_a_vanished_backend_gives_1011() {
    let dead1 = dead_addr().await;
    let dead2 = dead_addr().await;
    let mut live = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![
        telemetry_route(vec![format!("ws://{dead1}/"), format!("ws://{dead2}/")]),
        control_route(vec![format!("ws://{dead1}/"), live.url("/")]),
    ]))
    .await;
    let sensor = gw.enroll("s1", "env-sensor");
    match gw.connect(Some(&sensor), &["telemetry.v1"]).await {
        Err(ConnectError::Http {
            status, refusal, ..
        }) => {
            assert_eq!(status, 502);
            assert_eq!(refusal.as_deref(), Some("backend-unavailable"));
        }
        other => panic!("expected 502, got {other:?}"),
    }

    // One dead backend in the pool is skipped, whichever the round-robin starts with.
    let lock = gw.enroll("l1", "door-lock");
    for _ in 0..2 {
        let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
        let be = live.next().await;
        // The backend vanishes without a close frame: the device gets 1011.
        drop(be);
        let f = next_close(&mut dev).await.unwrap();
        assert_eq!(f.code, CloseCode::Error);
    }
    gw.stop().await;
}

#[tokio::test]
async fn suspension_through_the_admin_cli_applies_to_the_next_handshake() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("s-admin", "env-sensor");
    let (_dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let _be = ingest.next().await;

    let (ok, stdout, stderr) = gatehouse_cli(
        &gw,
        &["devices", "--config", "{config}", "suspend", "s-admin"],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("suspended"));

    let err = gw
        .connect(Some(&sensor), &["telemetry.v1"])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err:?}");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_sends_1001_to_device_and_backend() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    gw.shutdown.cancel();
    let (d, b) = tokio::join!(next_close(&mut dev), next_close(&mut be.ws));
    assert_eq!(d.unwrap().code, CloseCode::Away);
    assert_eq!(b.unwrap().code, CloseCode::Away);
    within(gw.task).await.unwrap();
}

#[tokio::test]
async fn resumed_tls_sessions_are_rechecked() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("s-resume", "env-sensor");
    let crl_dev = gw.enroll("s-resume-crl", "env-sensor");
    let cfg = gw.client_config(Some(&sensor));
    let crl_cfg = gw.client_config(Some(&crl_dev));

    // First connections: full handshakes; the client keeps the session tickets.
    for c in [&cfg, &crl_cfg] {
        let (mut dev, _) = connect(gw.addr, c.clone(), &["telemetry.v1"], &[])
            .await
            .unwrap();
        let _be = ingest.next().await;
        assert_eq!(
            dev.get_ref().get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        dev.close(None).await.unwrap();
        let _ = next_close(&mut dev).await;
    }

    // While resumption works for a device in good standing...
    let (dev, _) = connect(gw.addr, cfg.clone(), &["telemetry.v1"], &[])
        .await
        .unwrap();
    assert_eq!(
        dev.get_ref().get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let _be = ingest.next().await;
    drop(dev);

    // ...a device suspended after its first connection cannot come back by resuming,
    gw.registry
        .set_status("s-resume", gatehouse::model::DeviceStatus::Suspended)
        .unwrap();
    let err = connect(gw.addr, cfg.clone(), &["telemetry.v1"], &[])
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err:?}");

    // ...nor one revoked in the CRL after its first connection.
    gw.revoke_in_crl(&crl_dev);
    let tls = connect_tls(gw.addr, crl_cfg).await.unwrap();
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    match upgrade(tls, gw.addr, &["telemetry.v1"], &[]).await {
        Err(ConnectError::Http {
            status, refusal, ..
        }) => {
            assert_eq!(status, 403);
            assert_eq!(refusal.as_deref(), Some("certificate-revoked"));
        }
        other => panic!("expected 403 certificate-revoked, got {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test]
async fn stale_crl_policy_refuse_and_warn() {
    for (policy, admitted) in [("refuse", false), ("warn", true)] {
        let mut ingest = Backend::start().await;
        let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
        options.stale_crl = policy;
        let gw = Gateway::start(options).await;
        let sensor = gw.enroll("s1", "env-sensor");
        // Replace the CRL with one whose next update has passed.
        let now = time::OffsetDateTime::now_utc();
        let crl = gw
            .ca
            .crl_pem(
                &[],
                9,
                now - time::Duration::days(2),
                now - time::Duration::days(1),
            )
            .unwrap();
        std::fs::write(gw.dir.path().join("crl.pem"), crl).unwrap();
        gw.tls.reload().unwrap();
        let result = gw.connect(Some(&sensor), &["telemetry.v1"]).await;
        if admitted {
            result.unwrap();
            let _be = ingest.next().await;
        } else {
            assert!(result.is_err(), "stale CRL under {policy} must refuse");
        }
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_without_blocking_others() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.handshake_timeout_ms = 300;
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");

    // A client that connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Meanwhile a real device is served.
    let (_dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let _be = ingest.next().await;
    // The silent one is dropped once its handshake timeout passes.
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let n = within(silent.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the gateway must close a stalled handshake");
    gw.stop().await;
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.max_message_bytes = 1024;
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    dev.send(Message::binary(vec![0u8; 4096])).await.unwrap();
    let f = next_close(&mut dev).await.unwrap();
    assert_eq!(f.code, CloseCode::Size);
    let f = next_close(&mut be.ws).await.unwrap();
    assert_eq!(f.code, CloseCode::Away);
    gw.stop().await;
}

#[tokio::test]
async fn a_backend_that_stops_reading_slows_the_device_down() {
    let mut ingest = Backend::start().await;
    let schemas = tempfile::tempdir().unwrap();
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.schemas_dir = Some(permissive_schemas(schemas.path()));
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await; // accepted, never read until the end
                                      // A valid CBOR byte string of 60 KiB (the schema here accepts anything).
    let mut chunk = vec![0x5a, 0x00, 0x00, 0xf0, 0x00];
    chunk.resize(5 + 60 * 1024, 7u8);
    let limit: usize = 256 << 20;
    let mut sent = 0usize;
    // Keep sending until a send cannot complete: the gateway stopped reading from the device.
    while sent < limit {
        match tokio::time::timeout(
            std::time::Duration::from_millis(500),
            dev.send(Message::binary(chunk.clone())),
        )
        .await
        {
            Ok(r) => {
                r.unwrap();
                sent += chunk.len();
            }
            Err(_) => break,
        }
    }
    assert!(
        sent < limit,
        "the device could push {sent} bytes into a backend that does not read"
    );
    // Only socket buffers hold the backlog; the backend then receives every byte, in order.
    let mut received = 0usize;
    while received < sent {
        match next_msg(&mut be.ws).await {
            Message::Binary(b) => received += b.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, sent);
    gw.stop().await;
}

#[tokio::test]
async fn wss_backend_gets_the_gateways_client_certificate() {
    let backend_ca =
        gatehouse_pki::CertificateAuthority::generate("Backend CA", time::Duration::days(1))
            .unwrap();
    let files = tempfile::tempdir().unwrap();
    let (mut backend, lines) = Backend::start_tls(&backend_ca, files.path()).await;
    let mut options = Options::new(vec![telemetry_route(vec![backend.wss_url("/secure")])]);
    options.extra = lines;
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s-wss", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = backend.next().await;
    assert!(
        be.client_cert,
        "the gateway must present its client certificate"
    );
    assert_eq!(be.headers["x-gatehouse-device-id"], "s-wss");
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));
    gw.stop().await;
}
