//! Handshake deadlines and shutdown, over real TLS WebSockets: the backend connection has its
//! own deadline, a connection waiting on its backend at shutdown gets a whole 503, and what a
//! session records at shutdown is on disk and signed when `serve` returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use gatehouse::audit::RecordKind;
use tokio_tungstenite::tungstenite::Message;

/// Two black-holed backends at 300 ms each take longer than the device's 500 ms handshake
/// timeout: the device still gets the documented 502, not a silent drop.
#[tokio::test]
async fn the_backend_connection_has_its_own_deadline() {
    let (hole1, _held1) = black_hole().await;
    let (hole2, _held2) = black_hole().await;
    let mut options = Options::new(vec![telemetry_route(vec![
        format!("ws://{hole1}/"),
        format!("ws://{hole2}/"),
    ])]);
    options.handshake_timeout_ms = 500;
    options.backend_connect_timeout_ms = 300;
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");
    assert_refused(
        gw.connect(Some(&sensor), &["telemetry.v1"]).await,
        502,
        "backend-unavailable",
    );
    gw.stop().await;
}

/// Shutdown while the gateway waits on the device's backend: the device gets a complete
/// 503 `shutting-down`, not a connection dropped in the middle of the answer.
#[tokio::test]
async fn a_connection_waiting_on_its_backend_at_shutdown_gets_a_whole_503() {
    let (hole, mut held) = black_hole().await;
    let mut options = Options::new(vec![telemetry_route(vec![format!("ws://{hole}/")])]);
    options.backend_connect_timeout_ms = 10_000;
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let config = gw.client_config(Some(&sensor));
    let addr = gw.addr;
    let device = tokio::spawn(async move { connect(addr, config, &["telemetry.v1"], &[]).await });
    // The gateway has connected to the black hole: it is waiting on the backend now.
    let _backend_socket = within(held.recv()).await.unwrap();
    gw.shutdown.cancel();
    assert_refused(within(device).await.unwrap(), 503, "shutting-down");
    within(gw.task).await.unwrap();
}

/// A session still closing when the grace period ends is stopped before the final sync:
/// its last records (the unanswered command, the disconnection) are on disk and covered by
/// a signed checkpoint by the time `serve` returns.
#[tokio::test]
async fn records_of_sessions_cut_off_at_shutdown_are_synced_and_signed() {
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.audit = Some(String::new());
    options.shutdown_grace_ms = 200;
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be = control.next().await;
    be.ws
        .send(Message::text(r#"{"id":1,"command":"unlock"}"#))
        .await
        .unwrap();
    assert!(matches!(next_msg(&mut dev).await, Message::Text(_)));
    // Neither side answers the gateway's close from here on: the session outlives the grace
    // period (close timeout 2 s > grace 200 ms).
    let dir = gw.dir.path().join("audit");
    let public = gatehouse::audit::load_public_key(&gw.dir.path().join("audit.pub")).unwrap();
    gw.shutdown.cancel();
    within(gw.task).await.unwrap();

    let contents = gatehouse::audit::read(&dir).unwrap();
    let kinds: Vec<RecordKind> = contents.records["lock-1"].iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            RecordKind::Connected,
            RecordKind::CommandSent,
            RecordKind::Unanswered,
            RecordKind::Disconnected
        ]
    );
    let verdict = gatehouse::audit::verify_dir(&dir, &public, Some("lock-1")).unwrap();
    assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
    assert_eq!(
        verdict.verified[0].unsigned_tail, 0,
        "{:?}",
        verdict.verified
    );
    drop((dev, be));
}

/// A configuration reload (`POST /v1/reload`, as `gatehouse reload` and SIGHUP do) swaps in
/// the new runtime part as one unit: a changed backend pool applies to new sessions while
/// the open one keeps its backend; a route that no longer takes the device's type closes its
/// session with 4008. A change to a setting that needs a restart, or a broken file, changes
/// nothing, and the answer names the file and the key.
#[tokio::test]
async fn a_configuration_reload_applies_routes_to_new_and_open_sessions() {
    let mut first = Backend::start().await;
    let mut second = Backend::start().await;
    let mut route = telemetry_route(vec![first.url("/a")]);
    route.extra = "duplicates = \"allow\"\nmax_sessions_per_device = 10";
    let gw = Gateway::start(Options::new(vec![route])).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut old = first.next().await;
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    let reload = || gw.api::<gatehouse::admin::ReloadReport>(Call::post("/v1/reload"));

    // A setting that needs a restart refuses the whole reload.
    let with_new_pool = original
        .replace(&first.url("/a"), &second.url("/b"))
        .replace("max_message_bytes = 65536", "max_message_bytes = 65000")
        .replace("max_frame_bytes = 65536", "max_frame_bytes = 65000");
    std::fs::write(
        &gw.config_path,
        with_new_pool.replacen("shutdown_grace_ms = 5000", "shutdown_grace_ms = 4000", 1),
    )
    .unwrap();
    let err = reload().await.unwrap_err().to_string();
    assert!(err.contains("server.shutdown_grace_ms"), "{err}");
    assert!(err.contains("restart"), "{err}");
    assert!(err.contains("gatehouse.toml"), "{err}");
    assert_eq!(gw.live.load().config.websocket.max_message_bytes, 65536);

    std::fs::write(&gw.config_path, &with_new_pool).unwrap();
    let report = reload().await.unwrap();
    assert_eq!((report.routes, report.sessions_closed), (1, 0));
    assert_eq!(gw.live.load().config.websocket.max_message_bytes, 65000);
    // The open session keeps its backend; a new one goes to the new pool.
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut old.ws).await, Message::text(reading(1)));
    let (_dev2, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let conn = second.next().await;
    assert_eq!(conn.headers["x-gatehouse-device-id"], "s1");

    // A broken value changes nothing; the answer names the key.
    std::fs::write(
        &gw.config_path,
        with_new_pool.replace("[tls]", "[session]\nlifetime_jitter_percent = 90\n[tls]"),
    )
    .unwrap();
    let err = reload().await.unwrap_err().to_string();
    assert!(err.contains("session.lifetime_jitter_percent"), "{err}");
    assert!(err.contains("previous configuration kept"), "{err}");
    let (_dev3, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let _ = second.next().await;

    // The route no longer takes env-sensor: its open sessions close with 4008.
    std::fs::write(
        &gw.config_path,
        with_new_pool.replace(
            "device_types = [\"env-sensor\", \"door-lock\"]",
            "device_types = [\"door-lock\"]",
        ),
    )
    .unwrap();
    let report = reload().await.unwrap();
    assert_eq!(report.sessions_closed, 3);
    match next_msg(&mut dev).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4008),
        other => panic!("expected close 4008, got {other:?}"),
    }
    gw.stop().await;
}

/// Suspending or revoking a device closes its open sessions, both sides, with the documented
/// code, and the close is in the device's audit log; the session table lists live sessions.
#[tokio::test]
async fn suspension_and_revocation_reach_open_sessions() {
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.audit = Some(String::new());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    for (status, code, reason) in [
        (
            gatehouse::model::DeviceStatus::Suspended,
            4001,
            "device suspended",
        ),
        (
            gatehouse::model::DeviceStatus::Revoked,
            4002,
            "device revoked",
        ),
    ] {
        if status == gatehouse::model::DeviceStatus::Revoked {
            gw.registry
                .set_status("lock-1", gatehouse::model::DeviceStatus::Active)
                .unwrap();
        }
        let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
        let mut be = control.next().await;
        let live: Vec<gatehouse::session::table::LiveSession> = gw
            .api(
                Call::get("/v1/sessions")
                    .query(&gatehouse::session::table::Filter::device("lock-1")),
            )
            .await
            .unwrap();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].route, "control.v1");
        let verb = match status {
            gatehouse::model::DeviceStatus::Suspended => "suspend",
            _ => "revoke",
        };
        let _: gatehouse::model::Device = gw
            .api(Call::post(format!("/v1/devices/lock-1/{verb}")))
            .await
            .unwrap();
        for ws in [&mut dev] {
            match next_msg(ws).await {
                Message::Close(Some(f)) => {
                    assert_eq!((u16::from(f.code), f.reason.as_str()), (code, reason))
                }
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
        match next_msg(&mut be.ws).await {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), code),
            other => panic!("expected close {code}, got {other:?}"),
        }
        drop((dev, be));
    }
    let audit = gw.audit.clone().unwrap();
    let rs = within(async {
        loop {
            // Each round waits for the writer's sync: no spinning.
            assert!(audit.sync().await);
            let records = gatehouse::audit::read_device(&gw.dir.path().join("audit"), "lock-1")
                .unwrap()
                .records
                .remove("lock-1")
                .unwrap_or_default();
            let closes: Vec<String> = records
                .iter()
                .filter(|r| r.kind == RecordKind::Disconnected)
                .filter_map(|r| r.detail.clone())
                .collect();
            if closes.len() == 2 {
                return closes;
            }
        }
    })
    .await;
    assert!(rs[0].contains("close 4001 by gateway"), "{rs:?}");
    assert!(rs[1].contains("close 4002 by gateway"), "{rs:?}");
    let live: Vec<gatehouse::session::table::LiveSession> =
        gw.api(Call::get("/v1/sessions")).await.unwrap();
    assert!(live.is_empty(), "{live:?}");
    gw.stop().await;
}
