//! Trace context and structured logs: every session has a W3C `traceparent` the backend
//! receives (continuing the device's only where the route allows), and the gateway binary's
//! JSON log of a session carries every documented field, with the same trace id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const DEVICE_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn trace_parts(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    (parts[1].to_string(), parts[2].to_string())
}

#[tokio::test]
async fn the_backend_gets_a_traceparent_that_continues_the_devices_only_where_allowed() {
    let mut ingest = Backend::start().await;
    let mut continuing = telemetry_route(vec![ingest.url("/")]);
    continuing.subprotocol = "traced.v1";
    continuing.extra = "continue_trace = true";
    let gw = Gateway::start(Options::new(vec![
        telemetry_route(vec![ingest.url("/")]),
        continuing,
    ]))
    .await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let headers = [("traceparent", DEVICE_TRACE), ("tracestate", "vendor=1")];

    let (_plain, _) = connect(
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["telemetry.v1"],
        &headers,
    )
    .await
    .unwrap();
    let be = ingest.next().await;
    let (trace, _) = trace_parts(be.headers["traceparent"].to_str().unwrap());
    assert_ne!(
        trace, "4bf92f3577b34da6a3ce929d0e0e4736",
        "a new trace by default"
    );
    assert!(!be.headers.contains_key("tracestate"));

    let (_traced, _) = connect(
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["traced.v1"],
        &headers,
    )
    .await
    .unwrap();
    let be = ingest.next().await;
    assert_eq!(be.headers.get_all("traceparent").iter().count(), 1);
    let (trace, span) = trace_parts(be.headers["traceparent"].to_str().unwrap());
    assert_eq!(
        trace, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the device's trace"
    );
    assert_ne!(span, "00f067aa0ba902b7", "a span of the gateway's own");
    assert_eq!(be.headers["tracestate"], "vendor=1");

    // A malformed traceparent on a continuing route starts a new trace.
    let (_bad, _) = connect(
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["traced.v1"],
        &[("traceparent", "00-zz-00f067aa0ba902b7-01")],
    )
    .await
    .unwrap();
    let be = ingest.next().await;
    let (trace, _) = trace_parts(be.headers["traceparent"].to_str().unwrap());
    assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    gw.stop().await;
}

/// Reads the gateway's standard error line by line on a thread.
fn lines_of(stderr: std::process::ChildStderr) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next JSON log line whose message is `message`.
async fn next_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    message: &str,
) -> serde_json::Value {
    within(async {
        loop {
            let line = lines.recv().await.expect("gateway exited");
            let value: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if value["message"] == message {
                return value;
            }
        }
    })
    .await
}

/// A field of a JSON log line: the event's own, or its session span's.
fn field<'v>(line: &'v serde_json::Value, name: &str) -> &'v serde_json::Value {
    let own = &line[name];
    if !own.is_null() {
        return own;
    }
    &line["span"][name]
}

#[tokio::test]
async fn the_json_log_of_a_session_has_every_documented_field() {
    let mut ingest = Backend::start().await;
    let prepared = prepare(&Options::new(vec![telemetry_route(vec![ingest.url("/")])]));
    let cert = prepared
        .ca
        .issue_device("sensor-9", &device_options())
        .unwrap();
    let cert_path = prepared.dir.path().join("sensor-9.pem");
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    let bin = env!("CARGO_BIN_EXE_gatehouse");
    let config = prepared.config_path.to_str().unwrap().to_string();
    let enrolled = std::process::Command::new(bin)
        .args(["--config", &config, "devices", "enroll", "--id", "sensor-9"])
        .args([
            "--type",
            "env-sensor",
            "--cert",
            cert_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut gateway = std::process::Command::new(bin)
        .args(["--config", &config, "--log-format", "json", "serve"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = lines_of(gateway.stderr.take().unwrap());
    let listening = next_line(&mut lines, "gateway listening").await;
    let listen = listening["listen"].as_str().unwrap();
    let addr: std::net::SocketAddr = listen
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .parse()
        .unwrap();

    let (mut dev, _) = connect(
        addr,
        client_config(prepared.ca.cert_pem(), Some(&cert)),
        &["telemetry.v1"],
        &[],
    )
    .await
    .unwrap();
    let mut be = ingest.next().await;
    let (backend_trace, _) = trace_parts(be.headers["traceparent"].to_str().unwrap());
    dev.send(Message::text(reading(1))).await.unwrap();
    let _ = next_msg(&mut be.ws).await;
    dev.close(None).await.unwrap();
    let ended = next_line(&mut lines, "session ended").await;
    let _ = gateway.kill();
    let _ = gateway.wait();

    // The fields docs/operations.md lists for the line that ends every session.
    for name in [
        "device.id",
        "device.type",
        "route",
        "backend",
        "duration_ms",
        "frames.up",
        "bytes.up",
        "frames.down",
        "bytes.down",
        "frames.rejected",
        "close.code",
        "close.by",
        "conn.id",
        "peer",
        "trace.id",
        "timestamp",
        "level",
    ] {
        assert!(!field(&ended, name).is_null(), "{name} missing: {ended}");
    }
    assert_eq!(field(&ended, "device.id"), "sensor-9");
    assert_eq!(field(&ended, "device.type"), "env-sensor");
    assert_eq!(field(&ended, "route"), "telemetry.v1");
    assert_eq!(field(&ended, "frames.up"), 1);
    assert_eq!(field(&ended, "close.by"), "device");
    assert_eq!(
        field(&ended, "trace.id").as_str(),
        Some(backend_trace.as_str()),
        "the backend's trace joins the gateway's log line"
    );
}
