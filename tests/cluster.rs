//! Several gateways, one fleet: three gateways on a three-node NATS JetStream cluster (all on
//! loopback, free ports, started and stopped by the test) share the registry. Needs
//! `nats-server` (`.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gatehouse::admin::Call;
use gatehouse::model::{Device, Enrollment};
use gatehouse_sim::nats::NatsCluster;
use tokio_tungstenite::tungstenite::Message;

/// One cluster test at a time: each runs three NATS nodes and three gateways, and on two
/// cores several at once slow leader elections past the tests' bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three gateways named a, b, c on `nats`, one CA, the same routes.
async fn gateways(nats: &NatsCluster, routes: Vec<RouteSpec>) -> Vec<Gateway> {
    gateways_with(nats, routes, None).await
}

/// The same, with an `[audit]` section (one shared signing key) when `audit` is given.
async fn gateways_with(
    nats: &NatsCluster,
    routes: Vec<RouteSpec>,
    audit: Option<(&str, Arc<gatehouse_pki::AuditKey>)>,
) -> Vec<Gateway> {
    let ca = Arc::new(
        gatehouse_pki::CertificateAuthority::generate("Fleet CA", time::Duration::days(30))
            .unwrap(),
    );
    let mut out = Vec::new();
    for name in ["a", "b", "c"] {
        let mut options = Options::new(routes.clone());
        options.cluster = Some(nats.section(name, 3));
        options.ca = Some(ca.clone());
        if let Some((extra, key)) = &audit {
            options.audit = Some(extra.to_string());
            options.audit_key = Some(key.clone());
        }
        out.push(Gateway::start(options).await);
    }
    out
}

/// Enrolls through `gw`'s admin API (as `gatehouse devices enroll` does).
async fn enroll(gw: &Gateway, id: &str, device_type: &str) -> gatehouse_pki::IssuedCert {
    let cert = gw.issue(id);
    let _: Vec<Device> = gw
        .api(
            Call::post("/v1/devices").json(&gatehouse::admin::EnrollRequest {
                devices: vec![Enrollment {
                    id: id.into(),
                    device_type: device_type.into(),
                    sha256: cert.fingerprint_hex(),
                    labels: Default::default(),
                }],
            }),
        )
        .await
        .unwrap();
    cert
}

/// Waits until `gw`'s index knows `id` (the watch delivered it).
async fn known(gw: &Gateway, id: &str) {
    within(async {
        while gw.registry.get(id).is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_enrolled_through_one_gateway_connects_through_another_and_a_suspend_elsewhere_closes_it(
) {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await.unwrap();
    let mut ingest = Backend::start().await;
    let gws = gateways(&nats, vec![telemetry_route(vec![ingest.url("/")])]).await;
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);

    let sensor = enroll(a, "sensor-1", "env-sensor").await;
    known(c, "sensor-1").await;
    let (mut dev, _) = c.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    futures_util::SinkExt::send(&mut dev, Message::text(reading(1)))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));

    // Suspended through b: the session on c closes with 4001 within a second.
    let asked = Instant::now();
    let _: Device = b
        .api(Call::post("/v1/devices/sensor-1/suspend"))
        .await
        .unwrap();
    assert_eq!(close_of(&mut dev).await.0, 4001);
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    // And no gateway admits it now.
    for gw in &gws {
        assert_refused(
            gw.connect(Some(&sensor), &["telemetry.v1"]).await,
            403,
            "device-suspended",
        );
    }
    for gw in gws {
        gw.stop().await;
    }
}

/// Two gateways enrolling one certificate for two devices at once: exactly one wins, the
/// other is told which device holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_certificate_cannot_be_enrolled_for_two_devices_through_two_gateways() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await.unwrap();
    let ingest = Backend::start().await;
    let gws = gateways(&nats, vec![telemetry_route(vec![ingest.url("/")])]).await;
    let cert = gws[0].issue("x");
    let body = |id: &str| {
        Call::post("/v1/devices").json(&gatehouse::admin::EnrollRequest {
            devices: vec![Enrollment {
                id: id.into(),
                device_type: "env-sensor".into(),
                sha256: cert.fingerprint_hex(),
                labels: Default::default(),
            }],
        })
    };
    let (first, second) = tokio::join!(
        gws[0].api::<Vec<Device>>(body("dev-a")),
        gws[1].api::<Vec<Device>>(body("dev-b")),
    );
    let (won, lost) = match (first, second) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("exactly one enrollment must win: {other:?}"),
    };
    assert!(
        matches!(
            &lost,
            gatehouse::admin::ClientError::Refused { status: 409, .. }
        ),
        "{lost:?}"
    );
    let winner = won[0].id.clone();
    for gw in &gws {
        known(gw, &winner).await;
        let loser = if winner == "dev-a" { "dev-b" } else { "dev-a" };
        assert!(gw.registry.get(loser).is_none());
    }
    for gw in gws {
        gw.stop().await;
    }
}

/// The duplicate policies hold across gateways: `takeover` on b ends the session on a within
/// a second (4007); `reject` on c refuses while a holds one (409), and admits once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_and_reject_hold_across_gateways() {
    let _serial = SERIAL.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,gatehouse=debug")
        .try_init();
    let nats = NatsCluster::start(3).await.unwrap();
    let mut ingest = Backend::start().await;
    let strict = RouteSpec {
        subprotocol: "strict.v1",
        extra: "duplicates = \"reject\"",
        ..telemetry_route(vec![ingest.url("/")])
    };
    let gws = gateways(&nats, vec![telemetry_route(vec![ingest.url("/")]), strict]).await;
    let (a, b, c) = (&gws[0], &gws[1], &gws[2]);
    let sensor = enroll(a, "sensor-1", "env-sensor").await;
    for gw in &gws {
        known(gw, "sensor-1").await;
    }

    // takeover (the default): the newer session, on b, ends the one on a.
    let (mut on_a, _) = a.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let _be_a = ingest.next().await;
    let asked = Instant::now();
    let (mut on_b, _) = b.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be_b = ingest.next().await;
    let (code, reason) = close_of(&mut on_a).await;
    assert_eq!(code, 4007, "{reason}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    futures_util::SinkExt::send(&mut on_b, Message::text(reading(2)))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut be_b.ws).await, Message::text(reading(2)));

    // reject: a holds the strict route; c refuses the device with 409 while it does.
    let (mut strict_a, _) = a.connect(Some(&sensor), &["strict.v1"]).await.unwrap();
    let _be = ingest.next().await;
    assert_refused(
        c.connect(Some(&sensor), &["strict.v1"]).await,
        409,
        "session-open",
    );
    // Once a's session ends, c admits it (the release reaches the bucket at once).
    futures_util::SinkExt::close(&mut strict_a).await.unwrap();
    drop(strict_a);
    within(async {
        loop {
            match c.connect(Some(&sensor), &["strict.v1"]).await {
                Ok(conn) => return conn,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    for gw in gws {
        gw.stop().await;
    }
}

fn json_of(msg: Message) -> serde_json::Value {
    match msg {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// One command from the backend, answered by the device: both delivered.
async fn command_round_trip(be: &mut BackendConn, dev: &mut DeviceSocket, id: &str) {
    use futures_util::SinkExt;
    be.ws
        .send(Message::text(format!(
            r#"{{"id":"{id}","command":"lock"}}"#
        )))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(dev).await)["id"], id);
    dev.send(Message::text(format!(r#"{{"id":"{id}","status":"ok"}}"#)))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut be.ws).await)["id"], id);
}

/// A device's audit chain stays whole across reconnects through different gateways and
/// while two gateways hold it at once and record its commands concurrently; the export
/// verifies offline with the one shared key, and `gatehouse audit verify` (through the admin
/// API, and straight from the cluster) agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_devices_audit_chain_stays_linear_across_gateways_even_when_two_race() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await.unwrap();
    let mut control = Backend::start().await;
    let both = RouteSpec {
        extra: "duplicates = \"allow\"\nmax_sessions_per_device = 2",
        ..control_route(vec![control.url("/")])
    };
    let key = Arc::new(gatehouse_pki::AuditKey::generate().unwrap());
    let gws = gateways_with(
        &nats,
        vec![both],
        Some(("checkpoint_interval_ms = 100", key.clone())),
    )
    .await;
    let lock = enroll(&gws[0], "lock-1", "door-lock").await;
    for gw in &gws {
        known(gw, "lock-1").await;
    }
    // One session after another, through a, then b.
    for (i, gw) in gws[..2].iter().enumerate() {
        let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
        let mut be = control.next().await;
        command_round_trip(&mut be, &mut dev, &format!("seq-{i}")).await;
        futures_util::SinkExt::close(&mut dev).await.unwrap();
        drop(be);
    }
    // Two sessions at once, on a and c, each carrying commands at the same time.
    let (mut dev_a, _) = gws[0].connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be_a = control.next().await;
    let (mut dev_c, _) = gws[2].connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be_c = control.next().await;
    let race_a = async {
        for n in 0..20 {
            command_round_trip(&mut be_a, &mut dev_a, &format!("a-{n}")).await;
        }
    };
    let race_c = async {
        for n in 0..20 {
            command_round_trip(&mut be_c, &mut dev_c, &format!("c-{n}")).await;
        }
    };
    tokio::join!(race_a, race_c);

    // Every command and every answer is in the one chain (none lost to the race; answers
    // are written without waiting, so they may still be on their way), sequence numbers
    // gap-free, and it verifies.
    let count =
        |e: &gatehouse::audit::Export, kind| e.records.iter().filter(|r| r.kind == kind).count();
    let export = within(async {
        loop {
            let export: gatehouse::audit::Export = gws[1]
                .api(Call::get("/v1/audit/lock-1/export"))
                .await
                .unwrap();
            if count(&export, gatehouse::audit::RecordKind::Responded) >= 42 {
                return export;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        count(&export, gatehouse::audit::RecordKind::CommandSent),
        42,
        "2 sequential + 40 racing commands"
    );
    assert_eq!(count(&export, gatehouse::audit::RecordKind::Responded), 42);
    assert!(
        export
            .records
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == i as u64),
        "gap-free"
    );
    let public: [u8; 32] = key.public.clone().try_into().unwrap();
    let verified = gatehouse::audit::verify_export(&export, &public).unwrap();
    assert_eq!(verified.records, export.records.len() as u64);
    // The records came through more than one gateway.
    let via: std::collections::BTreeSet<_> = export
        .records
        .iter()
        .filter_map(|r| r.connection.clone())
        .collect();
    assert!(via.len() >= 4, "{via:?}");

    // The CLI, through b's admin API.
    let (ok, out, err) = gatehouse_cli(
        &gws[1],
        &["audit", "verify", "--config", "{config}", "--all"],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("OK     lock-1"), "{out}");
    drop((dev_a, dev_c, be_a, be_c));
    for gw in gws {
        gw.stop().await;
    }
}

/// `gatehouse crl publish` through one gateway's configuration reaches every gateway: a
/// session on another closes with 4004, and no gateway admits the certificate again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crl_published_once_reaches_every_gateway() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await.unwrap();
    let mut ingest = Backend::start().await;
    let gws = gateways(&nats, vec![telemetry_route(vec![ingest.url("/")])]).await;
    let sensor = enroll(&gws[0], "sensor-1", "env-sensor").await;
    known(&gws[2], "sensor-1").await;
    let (mut dev, _) = gws[2]
        .connect(Some(&sensor), &["telemetry.v1"])
        .await
        .unwrap();
    let _be = ingest.next().await;

    let now = time::OffsetDateTime::now_utc();
    let crl = gws[0]
        .ca
        .crl_pem(
            &[gatehouse_pki::Revocation {
                serial: sensor.serial.clone(),
                revoked_at: now - time::Duration::seconds(1),
            }],
            2,
            now - time::Duration::minutes(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    let file = gws[0].dir.path().join("fleet-crl.pem");
    std::fs::write(&file, crl).unwrap();
    let asked = Instant::now();
    let (ok, out, err) = gatehouse_cli(
        &gws[0],
        &[
            "crl",
            "publish",
            "--config",
            "{config}",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(close_of(&mut dev).await.0, 4004);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // Every gateway applies it (the others as soon as their watch delivers it, like c).
    for gw in &gws {
        within(async {
            while gw.connect(Some(&sensor), &["telemetry.v1"]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    // Not a CRL: refused before anything is published.
    std::fs::write(&file, "not a crl").unwrap();
    let (ok, _, err) = gatehouse_cli(
        &gws[0],
        &[
            "crl",
            "publish",
            "--config",
            "{config}",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok && err.contains("not a CRL"), "{err}");
    for gw in gws {
        gw.stop().await;
    }
}

/// Three gateways whose `[cluster]` sections get `extra` keys.
async fn gateways_extra(nats: &NatsCluster, routes: Vec<RouteSpec>, extra: &str) -> Vec<Gateway> {
    let ca = Arc::new(
        gatehouse_pki::CertificateAuthority::generate("Fleet CA", time::Duration::days(30))
            .unwrap(),
    );
    let key = Arc::new(gatehouse_pki::AuditKey::generate().unwrap());
    let mut out = Vec::new();
    for name in ["a", "b", "c"] {
        let mut options = Options::new(routes.clone());
        options.cluster = Some(format!("{}{extra}\n", nats.section(name, 3)));
        options.ca = Some(ca.clone());
        options.audit = Some(String::new());
        options.audit_key = Some(key.clone());
        out.push(Gateway::start(options).await);
    }
    out
}

/// Retries an admin call until the cluster takes it (leader elections after a node loss),
/// for at most 20 s; the last refusal is in the failure message.
async fn eventually<T: serde::de::DeserializeOwned + Send + 'static>(
    gw: &Gateway,
    call: impl Fn() -> Call,
) -> T {
    let deadline = Instant::now() + 2 * common::WAIT;
    loop {
        match gw.api::<T>(call()).await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("the cluster never took it: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// One NATS node killed: enrollment, cross-gateway suspension and the audit log go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_one_nats_node_changes_nothing_for_the_fleet() {
    let _serial = SERIAL.lock().await;
    let mut nats = NatsCluster::start(3).await.unwrap();
    let mut ingest = Backend::start().await;
    let gws = gateways(&nats, vec![telemetry_route(vec![ingest.url("/")])]).await;
    nats.kill(0);
    let cert = gws[1].issue("sensor-9");
    let body = gatehouse::admin::EnrollRequest {
        devices: vec![Enrollment {
            id: "sensor-9".into(),
            device_type: "env-sensor".into(),
            sha256: cert.fingerprint_hex(),
            labels: Default::default(),
        }],
    };
    let _: Vec<Device> = eventually(&gws[1], || Call::post("/v1/devices").json(&body)).await;
    known(&gws[2], "sensor-9").await;
    let (mut dev, _) = gws[2]
        .connect(Some(&cert), &["telemetry.v1"])
        .await
        .unwrap();
    let _be = ingest.next().await;
    let _: Device = eventually(&gws[0], || Call::post("/v1/devices/sensor-9/suspend")).await;
    let asked = Instant::now();
    assert_eq!(close_of(&mut dev).await.0, 4001);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    for gw in gws {
        gw.stop().await;
    }
}

/// Every NATS node down: open sessions keep flowing; known devices are admitted from the
/// cached registry until `max_staleness_ms`, then refused 503 `registry-unavailable` (and
/// `/readyz` says so); registry writes answer 503; commands are refused (the audit log cannot
/// acknowledge them). When NATS returns, all of it recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_nats_node_down_each_store_behaves_as_documented_and_recovers() {
    let _serial = SERIAL.lock().await;
    use futures_util::SinkExt;
    let mut nats = NatsCluster::start(3).await.unwrap();
    let mut ingest = Backend::start().await;
    let mut control = Backend::start().await;
    let gws = gateways_extra(
        &nats,
        vec![
            telemetry_route(vec![ingest.url("/")]),
            control_route(vec![control.url("/")]),
        ],
        "max_staleness_ms = 3000",
    )
    .await;
    let a = &gws[0];
    let sensor = enroll(a, "sensor-1", "env-sensor").await;
    let lock = enroll(a, "lock-1", "door-lock").await;
    known(a, "lock-1").await;
    let (mut dev, _) = a.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    let (mut lock_dev, _) = a.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut lock_be = control.next().await;

    for i in 0..3 {
        nats.kill(i);
    }
    let down = Instant::now();
    // Telemetry keeps flowing on the open session.
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));
    // A known device is still admitted from the cached index.
    let (again, _) = a.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    drop(again);
    let _ = ingest.next().await;
    // A registry write cannot be made: 503, nothing changed.
    let err = a
        .api::<Device>(Call::post("/v1/devices/sensor-1/suspend"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            gatehouse::admin::ClientError::Refused { status: 503, .. }
        ),
        "{err:?}"
    );
    // A command is refused: its record cannot be acknowledged (fail closed).
    lock_be
        .ws
        .send(Message::text(r#"{"id":1,"command":"lock"}"#))
        .await
        .unwrap();
    let answer = json_of(next_msg(&mut lock_be.ws).await);
    assert_eq!(answer["id"], 1, "{answer}");
    assert!(answer["code"].is_string(), "{answer}");
    // Past max_staleness_ms: new sessions are refused and readiness is false.
    while down.elapsed() < Duration::from_millis(3200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_refused(
        a.connect(Some(&sensor), &["telemetry.v1"]).await,
        503,
        "registry-unavailable",
    );
    let ready = reqwest_status(a, "/readyz").await;
    assert_eq!(ready, 503);

    // NATS returns: admission, registry writes and commands recover by themselves.
    for i in 0..3 {
        nats.restart(i).unwrap();
    }
    nats.wait_ready().await.unwrap();
    let _: Device = eventually(a, || Call::post("/v1/devices/lock-1/suspend")).await;
    within(async {
        while reqwest_status(a, "/readyz").await != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    a.connect_eventually(&sensor, &["telemetry.v1"]).await;
    drop(lock_dev.close(None).await);
    for gw in gws {
        gw.stop().await;
    }
}

/// The status of a plain GET on the admin listener.
async fn reqwest_status(gw: &Gateway, path: &str) -> u16 {
    match gw.api_text(Call::get(path)).await {
        Ok(_) => 200,
        Err(gatehouse::admin::ClientError::Refused { status, .. }) => status,
        Err(e) => panic!("{e}"),
    }
}

/// A gateway as its own `gatehouse serve` process, from the harness's configuration with
/// these listen addresses and more `[server]` keys; returned once its `/readyz` answers.
async fn gateway_process(
    options: &Options,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    server_extra: &str,
) -> (Process, Prepared) {
    let prepared = prepare(options);
    let text = std::fs::read_to_string(&prepared.config_path)
        .unwrap()
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\"\n{server_extra}"),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{admin}\""),
            1,
        );
    std::fs::write(&prepared.config_path, text).unwrap();
    let log = std::fs::File::create(prepared.dir.path().join("gateway.log")).unwrap();
    let child = Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["serve", "--config"])
            .arg(&prepared.config_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let probe = process_admin(&prepared, admin);
    within(async {
        loop {
            let p = probe.clone();
            let up = tokio::task::spawn_blocking(move || p.call_text(Call::get("/readyz")).is_ok())
                .await
                .unwrap();
            if up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    (child, prepared)
}

fn process_admin(
    prepared: &Prepared,
    admin: std::net::SocketAddr,
) -> gatehouse::admin::AdminClient {
    gatehouse::admin::AdminClient::new(
        admin,
        gatehouse::config::AdminToken::new(&prepared.admin_token).unwrap(),
    )
}

/// Two gateway processes on one port (`server.reuse_port`), sharing the cluster: the kernel
/// spreads the devices over both, each admits devices enrolled through a third gateway, and a
/// suspension through that third one closes a session on whichever process holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateway_processes_share_one_port_with_reuse_port() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await.unwrap();
    let ingest = Backend::start().await;
    let route = telemetry_route(vec![ingest.url("/")]);
    let gws = gateways(&nats, vec![route.clone()]).await;
    let port = dead_addr().await;
    let mut procs = Vec::new();
    for name in ["p1", "p2"] {
        let mut options = Options::new(vec![route.clone()]);
        options.cluster = Some(nats.section(name, 3));
        options.ca = Some(gws[0].ca.clone());
        let admin = dead_addr().await;
        let (child, prepared) = gateway_process(&options, port, admin, "reuse_port = true").await;
        procs.push((child, process_admin(&prepared, admin), prepared));
    }
    let mut certs = Vec::new();
    for i in 0..16 {
        let id = format!("sensor-{i}");
        certs.push((id.clone(), enroll(&gws[0], &id, "env-sensor").await));
    }
    for (_, client, _) in &procs {
        let c = client.clone();
        within(async {
            loop {
                let c = c.clone();
                let known = tokio::task::spawn_blocking(move || {
                    c.call::<Device>(Call::get("/v1/devices/sensor-15")).is_ok()
                })
                .await
                .unwrap();
                if known {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let mut open = Vec::new();
    for (_, cert) in &certs {
        let (ws, _) = connect(
            port,
            gws[0].client_config(Some(cert)),
            &["telemetry.v1"],
            &[],
        )
        .await
        .unwrap();
        open.push(ws);
    }
    let mut held = Vec::new();
    for (_, client, _) in &procs {
        let c = client.clone();
        let sessions: Vec<gatehouse::session::table::LiveSession> =
            tokio::task::spawn_blocking(move || c.call(Call::get("/v1/sessions")))
                .await
                .unwrap()
                .unwrap();
        held.push(sessions);
    }
    assert_eq!(held[0].len() + held[1].len(), 16);
    assert!(
        !held[0].is_empty() && !held[1].is_empty(),
        "the kernel spread 16 connections over both processes: {} and {}",
        held[0].len(),
        held[1].len()
    );
    // A device on the second process, suspended through the in-process gateway.
    let device = held[1][0].device.clone();
    let index = certs.iter().position(|(id, _)| *id == device).unwrap();
    let _: Device = gws[0]
        .api(Call::post(format!("/v1/devices/{device}/suspend")))
        .await
        .unwrap();
    let asked = Instant::now();
    assert_eq!(close_of(&mut open[index]).await.0, 4001);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    drop(open);
    for (mut child, _, _) in procs {
        child.kill();
    }
    for gw in gws {
        gw.stop().await;
    }
}

/// A child process, killed (SIGKILL) and reaped at the latest when dropped.
struct Process(std::process::Child);

impl Process {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway process killed with SIGKILL in the middle of a command stream: every command the
/// device received has its `command_sent` record in the cluster (acknowledged before it was
/// forwarded), the chain verifies, and the dead gateway's ownership entry expires so the
/// device (on a `reject` route) is admitted elsewhere within the ownership TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_command_stream_loses_no_acknowledged_command_and_its_ownership_expires(
) {
    let _serial = SERIAL.lock().await;
    use futures_util::{SinkExt, StreamExt};
    let nats = NatsCluster::start(3).await.unwrap();
    let mut control = Backend::start().await;
    let route = RouteSpec {
        extra: "duplicates = \"reject\"",
        ..control_route(vec![control.url("/")])
    };
    let key = Arc::new(gatehouse_pki::AuditKey::generate().unwrap());
    let gws = gateways_with(&nats, vec![route.clone()], Some(("", key.clone()))).await;

    // Gateway "k" as its own process, sharing the cluster, the CA and the audit key.
    let mut options = Options::new(vec![route]);
    options.cluster = Some(nats.section("k", 3));
    options.ca = Some(gws[0].ca.clone());
    options.audit = Some(String::new());
    options.audit_key = Some(key.clone());
    let (listen, admin) = (dead_addr().await, dead_addr().await);
    let (mut child, _prepared) = gateway_process(&options, listen, admin, "").await;

    let lock = enroll(&gws[0], "lock-1", "door-lock").await;
    let (mut dev, _) = within(async {
        loop {
            match connect(
                listen,
                gws[0].client_config(Some(&lock)),
                &["control.v1"],
                &[],
            )
            .await
            {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let mut be = control.next().await;
    // The backend fires 50 commands; the device reads what reaches it. After 10, k dies.
    for n in 0..50 {
        be.ws
            .send(Message::text(format!(
                r#"{{"id":"k-{n}","command":"lock"}}"#
            )))
            .await
            .unwrap();
    }
    let mut delivered = Vec::new();
    let mut killed = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(3), dev.next()).await {
        if let Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            delivered.push(v["id"].as_str().unwrap().to_string());
            if delivered.len() == 10 {
                child.kill();
                killed = Some(Instant::now());
            }
        }
    }
    let killed = killed.expect("k delivered 10 commands before it was killed");
    assert!(delivered.len() < 50, "the stream was cut by the kill");

    // The dead gateway's holder is still live for a moment: b refuses the device (reject),
    // then admits it once the holder expired (ownership_ttl_ms = 3000 in the tests).
    let b = &gws[1];
    assert_refused(
        b.connect(Some(&lock), &["control.v1"]).await,
        409,
        "session-open",
    );
    let admitted = within(async {
        loop {
            match b.connect(Some(&lock), &["control.v1"]).await {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    let locked_out = killed.elapsed();
    assert!(
        locked_out < Duration::from_millis(3000 + 2000),
        "locked out for {locked_out:?}"
    );
    drop(admitted);

    // Every delivered command has its record; the chain verifies.
    let export: gatehouse::audit::Export =
        b.api(Call::get("/v1/audit/lock-1/export")).await.unwrap();
    let recorded: std::collections::HashSet<String> = export
        .records
        .iter()
        .filter(|r| r.kind == gatehouse::audit::RecordKind::CommandSent)
        .filter_map(|r| {
            r.command_id
                .as_ref()
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect();
    for id in &delivered {
        assert!(
            recorded.contains(id),
            "command {id} reached the device without its record"
        );
    }
    let public: [u8; 32] = key.public.clone().try_into().unwrap();
    gatehouse::audit::verify_export(&export, &public).unwrap();
    for gw in gws {
        gw.stop().await;
    }
}
