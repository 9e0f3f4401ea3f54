//! `/metrics` after a scripted run over real TLS: every counter moved by exactly what the run
//! did, the state gauges say what the gateway holds, and scraping needs the admin token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use tokio_tungstenite::tungstenite::Message;

/// One scrape: `name{labels}` (as the exposition prints them) to value.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (key, value) = l.rsplit_once(' ')?;
                    Some((key.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The value of `key`, 0 when absent (a counter not yet created).
    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }
}

async fn scrape(gw: &Gateway) -> Scrape {
    let text = gw.api_text(Call::get("/metrics")).await.unwrap();
    Scrape::parse(&text)
}

/// Scrapes until `key` has `want` (the relay reports frame counts once per wake, right after
/// the write the backend may already have seen), within the test bound.
async fn eventually(gw: &Gateway, key: &str, want: f64) -> Scrape {
    within(async {
        loop {
            let s = scrape(gw).await;
            if s.get(key) == want {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

const TELEMETRY: &str = r#"route="telemetry.v1""#;

#[tokio::test]
async fn counters_move_by_exactly_what_a_scripted_run_did_and_deploy_files_name_real_metrics() {
    let mut ingest = Backend::start().await;
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![
        telemetry_route(vec![ingest.url("/")]),
        control_route(vec![control.url("/")]),
    ]);
    options.audit = Some("checkpoint_interval_ms = 100".into());
    options.tail = "[limits.env-sensor]\nmax_message_bytes = 256\n".into();
    let gw = Gateway::start(options).await;
    let a = gw.enroll("sensor-a", "env-sensor");
    let b = gw.enroll("sensor-b", "env-sensor");
    let lock = gw.enroll("lock-1", "door-lock");
    let ghost = gw.issue("ghost-1");
    let before = scrape(&gw).await;

    // Two sensors and a lock connect; an unknown device and an unrouted offer are refused.
    let (mut dev_a, _) = gw.connect(Some(&a), &["telemetry.v1"]).await.unwrap();
    let mut be_a = ingest.next().await;
    let (mut dev_b, _) = gw.connect(Some(&b), &["telemetry.v1"]).await.unwrap();
    let _be_b = ingest.next().await;
    let (mut dev_lock, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be_lock = control.next().await;
    assert_refused(
        gw.connect(Some(&ghost), &["telemetry.v1"]).await,
        403,
        "unknown-device",
    );
    assert_refused(gw.connect(Some(&a), &["nope.v1"]).await, 400, "no-route");

    // Sensor A: five valid readings, one invalid frame; the backend answers once.
    let mut payload = 0;
    for seq in 0..5 {
        let r = reading(seq);
        payload += r.len();
        dev_a.send(Message::text(r)).await.unwrap();
        let _ = next_msg(&mut be_a.ws).await;
    }
    dev_a
        .send(Message::text(r#"{"type":"reading"}"#))
        .await
        .unwrap();
    let _error_frame = next_msg(&mut dev_a).await;
    be_a.ws.send(Message::text("ack")).await.unwrap();
    assert_eq!(next_msg(&mut dev_a).await, Message::text("ack"));

    // The lock: one command answered.
    be_lock
        .ws
        .send(Message::text(r#"{"id":1,"command":"lock"}"#))
        .await
        .unwrap();
    let _ = next_msg(&mut dev_lock).await;
    dev_lock
        .send(Message::text(r#"{"id":1,"status":"ok"}"#))
        .await
        .unwrap();
    let _ = next_msg(&mut be_lock.ws).await;

    let up = format!(r#"gatehouse_frames_forwarded_total{{{TELEMETRY},direction="up"}}"#);
    let now = eventually(&gw, &up, before.get(&up) + 5.0).await;
    let delta = |key: &str| now.get(key) - before.get(key);
    assert_eq!(delta(r#"gatehouse_handshakes_total{outcome="ok"}"#), 3.0);
    assert_eq!(
        delta(r#"gatehouse_handshakes_total{outcome="unknown-device"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"gatehouse_handshakes_total{outcome="no-route"}"#),
        1.0
    );
    assert_eq!(
        now.get(&format!(
            r#"gatehouse_sessions_open{{{TELEMETRY},device_type="env-sensor"}}"#
        )),
        2.0
    );
    assert_eq!(
        now.get(r#"gatehouse_sessions_open{route="control.v1",device_type="door-lock"}"#),
        1.0
    );
    assert_eq!(
        delta(&format!(
            r#"gatehouse_payload_forwarded_bytes_total{{{TELEMETRY},direction="up"}}"#
        )),
        payload as f64
    );
    assert_eq!(
        delta(&format!(
            r#"gatehouse_frames_forwarded_total{{{TELEMETRY},direction="down"}}"#
        )),
        1.0
    );
    assert_eq!(
        delta(&format!(
            r#"gatehouse_validation_failures_total{{device_type="env-sensor",{TELEMETRY},reason="schema-violation"}}"#
        )),
        1.0
    );
    assert_eq!(
        delta(&format!(
            r#"gatehouse_backend_connect_milliseconds_count{{{TELEMETRY}}}"#
        )),
        2.0
    );
    assert_eq!(
        delta(r#"gatehouse_commands_total{outcome="answered"}"#),
        1.0
    );
    assert_eq!(
        delta("gatehouse_command_round_trip_milliseconds_count"),
        1.0
    );
    // command_sent and responded, plus connected for the lock at least.
    assert!(delta("gatehouse_audit_records_total") >= 3.0, "{now:?}");
    assert!(delta("gatehouse_audit_write_microseconds_count") >= 1.0);
    assert_eq!(now.get("gatehouse_audit_write_failures_total"), 0.0);
    assert_eq!(now.get("gatehouse_audit_healthy"), 1.0);
    assert_eq!(
        now.get(r#"gatehouse_registry_devices{status="active"}"#),
        3.0
    );
    assert_eq!(
        now.get(r#"gatehouse_registry_devices{status="suspended"}"#),
        0.0
    );
    assert_eq!(now.get("gatehouse_session_slots_in_use"), 3.0);
    assert_eq!(now.get("gatehouse_backends"), 2.0);
    assert_eq!(now.get("gatehouse_backends_ejected"), 0.0);
    assert_eq!(now.get("gatehouse_crls"), 1.0);
    assert!(now.get("gatehouse_crl_next_update_seconds") > 0.0);
    assert_eq!(now.get("gatehouse_draining"), 0.0);

    // The invalid frame's dead letter is stored by a writer task: it arrives.
    eventually(
        &gw,
        "gatehouse_deadletters_stored_total",
        before.get("gatehouse_deadletters_stored_total") + 1.0,
    )
    .await;

    // Sensor B closes without a status (logged 1005, by the device); a reload is counted.
    dev_b.close(None).await.unwrap();
    let ended =
        format!(r#"gatehouse_sessions_ended_total{{{TELEMETRY},code="1005",side="device"}}"#);
    let after = eventually(&gw, &ended, before.get(&ended) + 1.0).await;
    assert_eq!(
        after.get(&format!(
            r#"gatehouse_sessions_open{{{TELEMETRY},device_type="env-sensor"}}"#
        )),
        1.0
    );
    let _: gatehouse::admin::ReloadReport = gw.api(Call::post("/v1/reload")).await.unwrap();
    let reloaded = scrape(&gw).await;
    assert_eq!(
        reloaded.get(r#"gatehouse_reloads_total{what="config",result="ok"}"#)
            - before.get(r#"gatehouse_reloads_total{what="config",result="ok"}"#),
        1.0
    );

    // Sensor A again: a takeover of its session, then a message over its type's limit.
    let (mut dev_a2, _) = gw.connect(Some(&a), &["telemetry.v1"]).await.unwrap();
    let _be_a2 = ingest.next().await;
    let _ =
        within(async { while futures_util::StreamExt::next(&mut dev_a).await.is_some() {} }).await;
    dev_a2.send(Message::text("x".repeat(300))).await.unwrap();
    let takeover =
        format!(r#"gatehouse_duplicate_sessions_total{{{TELEMETRY},action="takeover"}}"#);
    let over = format!(
        r#"gatehouse_limit_hits_total{{device_type="env-sensor",{TELEMETRY},limit="max_message_bytes",action="close"}}"#
    );
    eventually(&gw, &over, 1.0).await;
    assert_eq!(scrape(&gw).await.get(&takeover), 1.0);
    let text = gw.api_text(Call::get("/metrics")).await.unwrap();
    check_named_metrics(&text);
    gw.stop().await;
}

/// `/metrics` is open like the probes (counts only, no device ids, loopback listener); the
/// rest of the API is not.
#[tokio::test]
async fn metrics_need_no_token_and_the_rest_of_the_api_does() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let wrong = gatehouse::admin::AdminClient::new(
        gw.admin_addr,
        gatehouse::config::AdminToken::new("not-the-token-0123456789").unwrap(),
    );
    let (metrics, devices) = tokio::task::spawn_blocking(move || {
        (
            wrong.call_text(Call::get("/metrics")),
            wrong.call::<gatehouse::model::DevicePage>(Call::get("/v1/devices")),
        )
    })
    .await
    .unwrap();
    assert!(
        metrics
            .as_ref()
            .is_ok_and(|t| t.contains("gatehouse_handshakes_total")),
        "{metrics:?}"
    );
    assert!(
        matches!(
            devices,
            Err(gatehouse::admin::ClientError::Refused { status: 401, .. })
        ),
        "{devices:?}"
    );
    gw.stop().await;
}

/// Every `gatehouse_*` name in `text`, as its family name (sample suffixes removed).
fn named_families(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gatehouse_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(family.to_string());
    }
    out
}

/// The dashboard, the alert rules and docs/metrics.md name only metrics that `text` (a
/// scrape after a run that touched every family) has, and the docs name all of them.
fn check_named_metrics(text: &str) {
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "deploy/prometheus/gatehouse-alerts.yml",
        "deploy/grafana/gatehouse-dashboard.json",
        "docs/metrics.md",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let named = named_families(&text);
        assert!(!named.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics that do not exist: {unknown:?}"
        );
    }
    let documented =
        named_families(&std::fs::read_to_string(root.join("docs/metrics.md")).unwrap());
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/metrics.md: {undocumented:?}"
    );
}

#[tokio::test]
async fn top_once_shows_the_live_sessions_and_the_busiest_device() {
    let mut ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let busy = gw.enroll("busy-1", "env-sensor");
    let quiet = gw.enroll("quiet-1", "env-sensor");
    let (mut dev_busy, _) = gw.connect(Some(&busy), &["telemetry.v1"]).await.unwrap();
    let mut be_busy = ingest.next().await;
    let (_dev_quiet, _) = gw.connect(Some(&quiet), &["telemetry.v1"]).await.unwrap();
    let _be_quiet = ingest.next().await;
    // The busy device sends all the while `top` samples.
    let stop = tokio_util::sync::CancellationToken::new();
    let sending = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.is_cancelled() {
                dev_busy.send(Message::text(reading(seq))).await.unwrap();
                let _ = next_msg(&mut be_busy.ws).await;
                seq += 1;
            }
            seq
        })
    };
    let (ok, out, err) = gatehouse_cli(
        &gw,
        &[
            "--config",
            "{config}",
            "top",
            "--once",
            "--interval-ms",
            "500",
        ],
    )
    .await;
    stop.cancel();
    let sent = within(sending).await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("SESSIONS  2 open"), "{out}");
    assert!(out.contains("telemetry.v1 env-sensor"), "{out}");
    assert!(out.contains("telemetry.v1 up"), "{out}");
    let busiest = out.split("BUSIEST DEVICES").nth(1).unwrap();
    assert!(busiest.contains("busy-1"), "{out}");
    assert!(
        !busiest.contains("quiet-1"),
        "a silent device is not busy: {out}"
    );
    assert!(sent > 0);
    gw.stop().await;
}
