//! Live session control over real TLS WebSockets: registry and CRL changes, certificate
//! expiry, kicks, duplicate policies, liveness and idle timers, backend ejection and
//! recovery, and drain. Every wait is bounded by `within`; nothing sleeps for readiness.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use gatehouse::audit::RecordKind;
use tokio_tungstenite::tungstenite::Message;

/// Reads until a close frame (skipping pings and data); its code and reason.
/// The `detail` of the device's audit records of `kind`, once there are `n` of them.
async fn audit_details(gw: &Gateway, device: &str, kind: RecordKind, n: usize) -> Vec<String> {
    let audit = gw.audit.clone().unwrap();
    within(async {
        loop {
            // Each round waits for the writer's sync: no spinning.
            assert!(audit.sync().await);
            let records = gatehouse::audit::read_device(&gw.dir.path().join("audit"), device)
                .unwrap()
                .records
                .remove(device)
                .unwrap_or_default();
            let details: Vec<String> = records
                .iter()
                .filter(|r| r.kind == kind)
                .filter_map(|r| r.detail.clone())
                .collect();
            if details.len() >= n {
                return details;
            }
        }
    })
    .await
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

/// Removing a device's certificate and listing its serial in a reloaded CRL each close its
/// live session within a second, both sides, with the documented code; each close is in the
/// device's audit log.
#[tokio::test]
async fn certificate_removal_and_crl_reload_close_live_sessions_within_a_second() {
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.audit = Some(String::new());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    let spare = gw.issue("lock-1");
    gw.registry
        .enroll(gatehouse::model::Enrollment {
            id: "lock-1".into(),
            device_type: "door-lock".into(),
            sha256: spare.fingerprint_hex(),
            labels: Default::default(),
        })
        .unwrap();

    // Removal through the admin API (as `gatehouse devices remove-cert` does).
    let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be = control.next().await;
    let sha = lock.fingerprint_hex();
    let asked = Instant::now();
    let left: gatehouse::model::Device = gw
        .api(Call::delete(format!(
            "/v1/devices/lock-1/certificates/{sha}"
        )))
        .await
        .unwrap();
    assert_eq!(left.fingerprints, vec![spare.fingerprint_hex()]);
    assert_eq!(close_of(&mut dev).await.0, 4003);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(close_of(&mut be.ws).await.0, 4003);
    // The removed certificate no longer connects.
    assert_refused(
        gw.connect(Some(&lock), &["control.v1"]).await,
        403,
        "unknown-device",
    );

    // A CRL listing the other certificate's serial, reloaded: its session closes.
    let (mut dev, _) = gw.connect(Some(&spare), &["control.v1"]).await.unwrap();
    let mut be = control.next().await;
    let asked = Instant::now();
    gw.revoke_in_crl(&spare);
    let (code, reason) = close_of(&mut dev).await;
    assert_eq!((code, reason.as_str()), (4004, "certificate revoked (CRL)"));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(close_of(&mut be.ws).await.0, 4004);

    let closes = audit_details(&gw, "lock-1", RecordKind::Disconnected, 2).await;
    assert!(closes[0].starts_with("close 4003 by gateway"), "{closes:?}");
    assert!(closes[1].starts_with("close 4004 by gateway"), "{closes:?}");
    gw.stop().await;
}

/// A session ends when its certificate expires, with its own code.
#[tokio::test]
async fn a_session_ends_when_its_certificate_expires() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let now = time::OffsetDateTime::now_utc();
    let mut opts = device_options();
    opts.not_before = Some(now - time::Duration::minutes(1));
    // Valid for about two more seconds.
    opts.validity = time::Duration::minutes(1) + time::Duration::seconds(2);
    let short = gw.ca.issue_device("sensor-short", &opts).unwrap();
    gw.registry
        .enroll(gatehouse::model::Enrollment {
            id: "sensor-short".into(),
            device_type: "env-sensor".into(),
            sha256: short.fingerprint_hex(),
            labels: Default::default(),
        })
        .unwrap();
    let (mut dev, _) = gw.connect(Some(&short), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    let (code, reason) = close_of(&mut dev).await;
    assert_eq!((code, reason.as_str()), (4005, "certificate expired"));
    assert_eq!(close_of(&mut be.ws).await.0, 4005);
    gw.stop().await;
}

/// An operator sees a device's live sessions (admin API, `gatehouse sessions`,
/// `gatehouse devices show`) and ends them with a reason (`gatehouse devices kick`).
#[tokio::test]
async fn operators_list_and_kick_live_sessions() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    dev.send(Message::text(reading(1))).await.unwrap();
    let _ = next_msg(&mut be.ws).await;

    let view: gatehouse::admin::DeviceView =
        gw.api(Call::get("/v1/devices/sensor-1")).await.unwrap();
    assert_eq!(view.sessions.len(), 1);
    let s = &view.sessions[0];
    assert_eq!(
        (s.route.as_str(), s.device_type.as_str()),
        ("telemetry.v1", "env-sensor")
    );
    assert_eq!(s.cert_serial, hex::encode(&sensor.serial));
    assert_eq!(s.cert_sha256, sensor.fingerprint_hex());
    assert_eq!((s.frames_up, s.bytes_up), (1, reading(1).len() as u64));

    let (ok, out, err) = gatehouse_cli(
        &gw,
        &[
            "--config",
            "{config}",
            "sessions",
            "--route",
            "telemetry.v1",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("sensor-1") && out.contains(&s.connection),
        "{out}"
    );
    let (ok, out, _) = gatehouse_cli(
        &gw,
        &["--config", "{config}", "sessions", "--type", "door-lock"],
    )
    .await;
    assert!(ok && !out.contains("sensor-1"), "{out}");
    let (ok, out, err) = gatehouse_cli(
        &gw,
        &["--config", "{config}", "devices", "show", "sensor-1"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("session      {}", s.connection)),
        "{out}"
    );

    let (ok, out, err) = gatehouse_cli(
        &gw,
        &[
            "--config",
            "{config}",
            "devices",
            "kick",
            "sensor-1",
            "--reason",
            "firmware update",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("ended 1 session"), "{out}");
    let (code, reason) = close_of(&mut dev).await;
    assert_eq!(code, 4006);
    assert!(reason.contains("firmware update"), "{reason}");
    assert_eq!(close_of(&mut be.ws).await.0, 4006);
    gw.stop().await;
}

/// Per route: `takeover` (a newcomer ends the older session, 4007), `reject` (409 while a
/// session is open), `allow` up to N; takeovers and rejections are in the audit log.
#[tokio::test]
async fn duplicate_connection_policies() {
    let mut backend = Backend::start().await;
    let control = control_route(vec![backend.url("/c")]);
    let mut reject = telemetry_route(vec![backend.url("/t")]);
    reject.extra = "duplicates = \"reject\"";
    let allow = RouteSpec {
        subprotocol: "telemetry.v2",
        kind: "telemetry",
        device_types: vec!["door-lock"],
        backends: vec![backend.url("/t2")],
        extra: "duplicates = \"allow\"\nmax_sessions_per_device = 2",
    };
    let mut options = Options::new(vec![control, reject, allow]);
    options.audit = Some(String::new());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    let sensor = gw.enroll("sensor-1", "env-sensor");

    // takeover (the default)
    let (mut first, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut first_be = backend.next().await;
    let (_second, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let _second_be = backend.next().await;
    let (code, reason) = close_of(&mut first).await;
    assert_eq!(code, 4007);
    assert!(reason.contains("taken over"), "{reason}");
    assert_eq!(close_of(&mut first_be.ws).await.0, 4007);

    // reject: the newcomer gets 409 while a session is open; the open one is untouched.
    let (mut open, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut open_be = backend.next().await;
    match gw.connect(Some(&sensor), &["telemetry.v1"]).await {
        Err(ConnectError::Http {
            status,
            refusal,
            body,
        }) => {
            assert_eq!((status, refusal.as_deref()), (409, Some("session-open")));
            assert!(body.contains("already open"), "{body}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    open.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut open_be.ws).await, Message::text(reading(1)));

    // allow 2: two at once, the third refused.
    let (_a, _) = gw.connect(Some(&lock), &["telemetry.v2"]).await.unwrap();
    let (_b, _) = gw.connect(Some(&lock), &["telemetry.v2"]).await.unwrap();
    assert_refused(
        gw.connect(Some(&lock), &["telemetry.v2"]).await,
        409,
        "session-open",
    );

    for device in ["lock-1", "sensor-1"] {
        let refused = audit_details(&gw, device, RecordKind::Refused, 1).await;
        assert_eq!(refused, vec!["HTTP 409 session-open"], "{device}");
    }
    let closes = audit_details(&gw, "lock-1", RecordKind::Disconnected, 1).await;
    assert!(
        closes[0].starts_with("close 4007 by gateway: taken over"),
        "{closes:?}"
    );
    gw.stop().await;
}

/// A backend that stops answering pings is found within ping interval plus timeout (the
/// device gets 4012), and a route's idle timeout ends a quiet session (4009).
#[tokio::test]
async fn a_silent_backend_and_an_idle_session_are_ended() {
    let mut backend = Backend::start().await;
    let mut idle = control_route(vec![backend.url("/c")]);
    idle.extra = "[route.session]\nidle_timeout_ms = 400\nbackend_ping_interval_ms = 60000";
    let mut options = Options::new(vec![telemetry_route(vec![backend.url("/t")]), idle]);
    options.tail =
        "[session]\nbackend_ping_interval_ms = 300\nbackend_ping_timeout_ms = 300\n".into();
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");

    // The backend connection is held but never read: no pong.
    let (mut dev, _) = gw.connect(Some(&lock), &["telemetry.v1"]).await.unwrap();
    let started = Instant::now();
    let _silent = backend.next().await;
    let (code, reason) = close_of(&mut dev).await;
    assert_eq!(
        (code, reason.as_str()),
        (4012, "backend did not answer ping")
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // The control route's own timers: idle after 400 ms without data.
    let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let started = Instant::now();
    let mut be = backend.next().await;
    assert_eq!(close_of(&mut dev).await, (4009, "idle timeout".to_string()));
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(close_of(&mut be.ws).await.0, 4009);
    gw.stop().await;
}

/// A backend that fails is ejected: while every backend of the route is ejected, devices get
/// 502 at once instead of waiting out the connect timeout; once it is back it is tried again
/// after the backoff and serves devices.
#[tokio::test]
async fn a_failing_backend_is_ejected_and_recovers() {
    // Accepts TCP and never answers the upgrade: each attempt costs the connect timeout.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    let url = format!("ws://{addr}/");
    let mut options = Options::new(vec![telemetry_route(vec![url])]);
    options.backend_connect_timeout_ms = 500;
    options.extra = "eject_after_failures = 1\neject_base_ms = 1500\n".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");

    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hole.accept().await {
            held.push(tcp);
        }
    });
    let t = Instant::now();
    assert_refused(
        gw.connect(Some(&sensor), &["telemetry.v1"]).await,
        502,
        "backend-unavailable",
    );
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    // Ejected: the next device is answered without a connect attempt.
    let t = Instant::now();
    assert_refused(
        gw.connect(Some(&sensor), &["telemetry.v1"]).await,
        502,
        "backend-unavailable",
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // The backend comes back on the same address.
    held.abort();
    let _ = held.await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut backend = Backend::start_on(listener);
    // 502 at once while ejected; served once the backoff is over.
    let back = gw.connect_eventually(&sensor, &["telemetry.v1"]).await;
    let _be = backend.next().await;
    drop(back);
    gw.stop().await;
}

/// `gatehouse drain`: new handshakes get 503 `draining`, readiness turns false, open
/// sessions are closed with 1001 over the grace period, and the gateway exits when they are
/// gone.
#[tokio::test]
async fn drain_refuses_new_sessions_closes_open_ones_and_exits() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let a = gw.enroll("sensor-a", "env-sensor");
    let b = gw.enroll("sensor-b", "env-sensor");
    let (mut dev_a, _) = gw.connect(Some(&a), &["telemetry.v1"]).await.unwrap();
    let (mut dev_b, _) = gw.connect(Some(&b), &["telemetry.v1"]).await.unwrap();
    let _be = (ingest.next().await, ingest.next().await);
    let ready = |addr: std::net::SocketAddr| {
        blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            agent
                .get(format!("http://{addr}/readyz"))
                .call()
                .unwrap()
                .status()
                .as_u16()
        })
    };
    assert_eq!(ready(gw.admin_addr).await.unwrap(), 200);

    let (ok, out, err) =
        gatehouse_cli(&gw, &["--config", "{config}", "drain", "--grace-ms", "600"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2 session(s)"), "{out}");
    assert_eq!(ready(gw.admin_addr).await.unwrap(), 503);
    assert_refused(
        gw.connect(Some(&a), &["telemetry.v1"]).await,
        503,
        "draining",
    );
    for dev in [&mut dev_a, &mut dev_b] {
        assert_eq!(
            close_of(dev).await,
            (1001, "gateway draining; reconnect".to_string())
        );
    }
    // Both sessions gone: `serve` returns on its own.
    within(gw.task).await.unwrap();
}
