//! Schema validation over real connections: what is forwarded byte for byte, what is refused
//! and what the sender gets back, the invalid-frame limit, commands, dead letters, reloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

fn error_json(msg: Message) -> Value {
    match msg {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a JSON error frame, got {other:?}"),
    }
}

fn error_cbor(msg: Message) -> Value {
    match msg {
        Message::Binary(b) => ciborium::from_reader(b.as_ref()).unwrap(),
        other => panic!("expected a CBOR error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn valid_frames_arrive_byte_for_byte_and_invalid_ones_get_error_frames() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;

    // JSON with its own spacing and key order: forwarded as sent, not re-serialised.
    let text = "{ \"humidity_pct\" : 40 ,\"type\":\"reading\",\"seq\":1,\"ts\":5,\"temperature_c\":-3.25 }";
    dev.send(Message::text(text)).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(text));
    // CBOR: same schema, exact bytes (with the self-describe tag in front).
    let mut bytes = vec![0xd9, 0xd9, 0xf7];
    bytes.extend(cbor(
        &json!({"type":"reading","seq":2,"ts":6,"temperature_c":22,"humidity_pct":41.5}),
    ));
    dev.send(Message::binary(bytes.clone())).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::binary(bytes));

    // Invalid JSON: an error frame in JSON, with the pointer and the frame's id.
    dev.send(Message::text(
        r#"{"id":"r-7","type":"reading","seq":3,"ts":7,"temperature_c":99,"humidity_pct":40}"#,
    ))
    .await
    .unwrap();
    let e = error_json(next_msg(&mut dev).await);
    assert_eq!(e["$gatehouse"], "error");
    assert_eq!(e["code"], "schema-violation");
    assert_eq!(e["pointer"], "/temperature_c");
    assert_eq!(e["id"], "r-7");
    assert!(e["message"].as_str().unwrap().contains("85"), "{e}");

    // Invalid CBOR: an error frame in CBOR.
    dev.send(Message::binary(cbor(
        &json!({"id": 9, "type":"reading","seq":"x","ts":7,"temperature_c":20,"humidity_pct":40}),
    )))
    .await
    .unwrap();
    let e = error_cbor(next_msg(&mut dev).await);
    assert_eq!(
        (e["code"].as_str(), e["pointer"].as_str(), e["id"].as_u64()),
        (Some("schema-violation"), Some("/seq"), Some(9))
    );

    // What validation would see differently from what the backend gets is refused.
    let cases: Vec<(Message, &str)> = vec![
        (
            Message::text(format!("{} ", reading(4)) + "{}"),
            "trailing-data",
        ),
        (
            Message::text(
                r#"{"type":"reading","type":"reading","seq":1,"ts":1,"temperature_c":1,"humidity_pct":1}"#,
            ),
            "duplicate-key",
        ),
        (
            Message::text(
                r#"{"type":"reading","seq":123456789012345678901234,"ts":1,"temperature_c":1,"humidity_pct":1}"#,
            ),
            "integer-out-of-range",
        ),
        (Message::binary(vec![0xc1, 0x00]), "unsupported-tag"),
        (Message::binary(vec![0xa1, 0x01, 0x02]), "non-text-key"),
        (
            Message::binary(vec![0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]),
            "non-finite-number",
        ),
        (
            Message::binary(vec![0x7a, 0xff, 0xff, 0xff, 0xff]),
            "length-exceeds-frame",
        ),
        (
            Message::text(r#"{"$gatehouse":"error","code":"x"}"#),
            "reserved-key",
        ),
        (Message::text("not json"), "malformed"),
    ];
    for (msg, code) in cases {
        let binary = matches!(msg, Message::Binary(_));
        dev.send(msg).await.unwrap();
        let reply = next_msg(&mut dev).await;
        let e = if binary {
            error_cbor(reply)
        } else {
            error_json(reply)
        };
        assert_eq!(e["code"], code);
    }

    // None of the invalid frames reached the backend: the next thing it sees is this one.
    dev.send(Message::text(reading(10))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(10)));
    gw.stop().await;
}

#[tokio::test]
async fn the_invalid_frame_limit_closes_with_1007() {
    let mut ingest = Backend::start().await;
    let mut route = telemetry_route(vec![ingest.url("/")]);
    route.extra = "invalid_frame_limit = 2\ninvalid_frame_window_ms = 60000\nerror_replies = false";
    let gw = Gateway::start(Options::new(vec![route])).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    for _ in 0..3 {
        dev.send(Message::text("{}")).await.unwrap();
    }
    // No error frames (error_replies = false); the third invalid frame closes the session.
    match next_msg(&mut dev).await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Invalid);
            assert_eq!(f.reason.as_str(), "too many invalid frames");
        }
        other => panic!("expected close 1007, got {other:?}"),
    }
    match next_msg(&mut be.ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
        other => panic!("expected the backend to be closed, got {other:?}"),
    }
    gw.stop().await;
}

#[tokio::test]
async fn invalid_commands_never_reach_the_device_and_the_backend_is_told() {
    let mut control = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![control_route(vec![control.url("/")])])).await;
    let lock = gw.enroll("lock-1", "door-lock");
    let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be = control.next().await;

    // An unknown command, as JSON: the backend gets a JSON error frame with the id.
    be.ws
        .send(Message::text(r#"{"id":41,"command":"self-destruct"}"#))
        .await
        .unwrap();
    let e = error_json(next_msg(&mut be.ws).await);
    assert_eq!(
        (e["code"].as_str(), e["pointer"].as_str(), e["id"].as_u64()),
        (Some("schema-violation"), Some("/command"), Some(41))
    );
    // set_code without a code, as CBOR: a CBOR error frame.
    be.ws
        .send(Message::binary(cbor(
            &json!({"id":"c-2","command":"set_code"}),
        )))
        .await
        .unwrap();
    let e = error_cbor(next_msg(&mut be.ws).await);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("schema-violation"), Some("c-2"))
    );
    // A valid command is the first thing the device receives.
    be.ws
        .send(Message::text(r#"{"id":42,"command":"unlock"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut dev).await,
        Message::text(r#"{"id":42,"command":"unlock"}"#)
    );
    // The device's answer is checked against the response schema.
    dev.send(Message::text(r#"{"id":42,"status":"maybe"}"#))
        .await
        .unwrap();
    assert_eq!(error_json(next_msg(&mut dev).await)["pointer"], "/status");
    dev.send(Message::text(r#"{"id":42,"status":"ok","locked":false}"#))
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut be.ws).await,
        Message::text(r#"{"id":42,"status":"ok","locked":false}"#)
    );
    gw.stop().await;
}

#[tokio::test]
async fn dead_letters_keep_the_last_rejected_frames() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.tail = "[deadletter]\nper_device = 3\nmax_payload_bytes = 20\n".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s-dl", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let _be = ingest.next().await;
    for i in 0..5 {
        dev.send(Message::text(format!(
            r#"{{"bad":{i},"padding":"{}"}}"#,
            "x".repeat(40)
        )))
        .await
        .unwrap();
        let _ = next_msg(&mut dev).await;
    }
    gw.dead_letters_stored(5).await;

    let letters: Vec<gatehouse::storage::DeadLetter> = gw
        .api(Call::get("/v1/devices/s-dl/deadletters"))
        .await
        .unwrap();
    assert_eq!(letters.len(), 3, "bounded to the last 3");
    let payloads: Vec<String> = letters
        .iter()
        .map(|l| String::from_utf8(l.payload()).unwrap())
        .collect();
    assert!(payloads[0].starts_with(r#"{"bad":2"#), "{payloads:?}");
    assert!(payloads[2].starts_with(r#"{"bad":4"#), "{payloads:?}");
    for l in &letters {
        assert_eq!(l.route, "telemetry.v1");
        assert_eq!(l.direction, "device-to-backend");
        assert_eq!(l.code, "schema-violation");
        assert!(l.truncated && l.payload().len() == 20 && l.payload_len > 40);
    }
    // The counters saw all five.
    let counts: Vec<gatehouse::policy::rejections::RejectionCount> =
        gw.api(Call::get("/v1/stats/rejections")).await.unwrap();
    assert_eq!(counts.iter().map(|c| c.count).sum::<u64>(), 5);
    assert_eq!(counts[0].device_type, "env-sensor");

    // The CLI shows them too.
    let (ok, stdout, stderr) = gatehouse_cli(
        &gw,
        &["deadletters", "--config", "{config}", "s-dl", "--json"],
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn a_schema_reload_applies_to_a_live_connection() {
    let schemas = tempfile::tempdir().unwrap();
    std::fs::create_dir(schemas.path().join("env-sensor")).unwrap();
    let file = schemas.path().join("env-sensor/telemetry.schema.json");
    std::fs::write(
        &file,
        r#"{"type":"object","properties":{"t":{"type":"number"}}}"#,
    )
    .unwrap();
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![RouteSpec {
        device_types: vec!["env-sensor"],
        ..telemetry_route(vec![ingest.url("/")])
    }]);
    options.schemas_dir = Some(schemas.path().to_path_buf());
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("s1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    dev.send(Message::text(r#"{"t":150}"#)).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(r#"{"t":150}"#));

    // A broken file: the reload fails and the old schema stays in force.
    std::fs::write(&file, r#"{"type":"number","minimum":"low"}"#).unwrap();
    let err = gw
        .api::<gatehouse::admin::Health>(Call::post("/v1/schemas/reload"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("telemetry.schema.json"), "{err}");
    dev.send(Message::text(r#"{"t":151}"#)).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(r#"{"t":151}"#));

    // A stricter schema: the same connection's next frame is checked against it.
    std::fs::write(
        &file,
        r#"{"type":"object","properties":{"t":{"type":"number","maximum":100}}}"#,
    )
    .unwrap();
    let _: gatehouse::admin::Health = gw.api(Call::post("/v1/schemas/reload")).await.unwrap();
    dev.send(Message::text(r#"{"t":150}"#)).await.unwrap();
    assert_eq!(error_json(next_msg(&mut dev).await)["pointer"], "/t");
    dev.send(Message::text(r#"{"t":50}"#)).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(r#"{"t":50}"#));
    gw.stop().await;
}

#[tokio::test]
async fn a_type_without_the_routes_schema_is_refused_at_the_handshake() {
    let schemas = tempfile::tempdir().unwrap();
    permissive_schemas(schemas.path());
    std::fs::remove_file(schemas.path().join("door-lock/command.schema.json")).unwrap();
    let control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.schemas_dir = Some(schemas.path().to_path_buf());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    match gw.connect(Some(&lock), &["control.v1"]).await {
        Err(ConnectError::Http {
            status,
            refusal,
            body,
        }) => {
            assert_eq!(status, 500);
            assert_eq!(refusal.as_deref(), Some("no-schema"));
            assert!(body.contains("command.schema.json"), "{body}");
        }
        other => panic!("expected 500 no-schema, got {other:?}"),
    }
    gw.stop().await;
}
