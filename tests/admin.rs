//! The admin API over HTTP: authentication, device listings with filters and pages, a
//! device's recent refusals, and one JSON error shape for every failure, including the ones
//! axum produces itself (bad body, unknown path, wrong method).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::model::{DeviceQuery, DeviceStatus};

/// A raw request: status and the JSON body.
async fn call(
    gw: &Gateway,
    method: &'static str,
    path: &str,
    token: Option<&str>,
    body: Option<(&'static str, &'static str)>,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}{path}", gw.admin_addr);
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (m, body) => {
                let mut r = match m {
                    "POST" => agent.post(&url),
                    "PUT" => agent.put(&url),
                    _ => agent.delete(&url).force_send_body(),
                };
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some((content_type, text)) => {
                        r.header("Content-Type", content_type).send(text.as_bytes())
                    }
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = resp.unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    })
    .await
    .unwrap()
}

/// The one error shape: a stable code and a message.
fn assert_error(got: &(u16, serde_json::Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["code"], code, "{got:?}");
    assert!(
        got.1["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{got:?}"
    );
}

#[tokio::test]
async fn every_failure_has_one_json_shape() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let token = gw.admin_token.clone();
    let t = Some(token.as_str());
    assert_error(
        &call(&gw, "GET", "/v1/devices", None, None).await,
        401,
        "unauthorized",
    );
    assert_error(
        &call(
            &gw,
            "GET",
            "/v1/devices",
            Some("wrong-token-0123456789"),
            None,
        )
        .await,
        401,
        "unauthorized",
    );
    assert_error(
        &call(&gw, "GET", "/v1/devices/nobody", t, None).await,
        404,
        "not-found",
    );
    assert_error(
        &call(&gw, "GET", "/v1/nothing-here", t, None).await,
        404,
        "not-found",
    );
    assert_error(
        &call(&gw, "PUT", "/v1/devices", t, None).await,
        405,
        "method-not-allowed",
    );
    assert_error(
        &call(
            &gw,
            "POST",
            "/v1/devices",
            t,
            Some(("application/json", "{not json")),
        )
        .await,
        400,
        "bad-request",
    );
    assert_error(
        &call(&gw, "POST", "/v1/devices", t, Some(("text/plain", "{}"))).await,
        415,
        "unsupported-media-type",
    );
    assert_error(
        &call(
            &gw,
            "POST",
            "/v1/devices",
            t,
            Some(("application/json", r#"{"devices":[{"id":"x"}]}"#)),
        )
        .await,
        422,
        "unprocessable",
    );
    assert_error(
        &call(&gw, "GET", "/v1/devices?limit=0", t, None).await,
        400,
        "bad-request",
    );
    assert_error(
        &call(&gw, "GET", "/v1/devices?status=sleepy", t, None).await,
        400,
        "bad-request",
    );
    assert_error(
        &call(&gw, "GET", "/v1/devices?label=nokey", t, None).await,
        400,
        "bad-request",
    );
    assert_error(
        &call(&gw, "POST", "/v1/devices/nobody/suspend", t, None).await,
        404,
        "not-found",
    );
    // Unauthenticated probes stay plain.
    assert_eq!(call(&gw, "GET", "/healthz", None, None).await.0, 200);
    gw.stop().await;
}

#[tokio::test]
async fn devices_are_listed_by_filter_and_page_and_show_their_recent_refusals() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    for i in 0..5 {
        gw.enroll(&format!("sensor-{i}"), "env-sensor");
    }
    let lock = gw.enroll("lock-0", "door-lock");
    let client = gw.admin_client();
    let c = client.clone();
    let pages = tokio::task::spawn_blocking(move || {
        let first = c
            .list_page(&DeviceQuery {
                device_type: Some("env-sensor".into()),
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        let all = c
            .list(&DeviceQuery {
                device_type: Some("env-sensor".into()),
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        c.set_status("lock-0", DeviceStatus::Suspended).unwrap();
        let suspended = c
            .list(&DeviceQuery {
                status: Some(DeviceStatus::Suspended),
                ..Default::default()
            })
            .unwrap();
        (first, all, suspended)
    })
    .await
    .unwrap();
    let (first, all, suspended) = pages;
    let ids = |d: &[gatehouse::model::Device]| d.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first.devices), ["sensor-0", "sensor-1"]);
    assert_eq!(first.next_after.as_deref(), Some("sensor-1"));
    assert_eq!(
        ids(&all),
        ["sensor-0", "sensor-1", "sensor-2", "sensor-3", "sensor-4"]
    );
    assert_eq!(ids(&suspended), ["lock-0"]);

    // The suspended lock tries to connect: its refusal shows on the device.
    assert_refused(
        gw.connect(Some(&lock), &["telemetry.v1"]).await,
        403,
        "device-suspended",
    );
    let view = tokio::task::spawn_blocking(move || client.show("lock-0").unwrap())
        .await
        .unwrap();
    assert_eq!(view.recent_refusals.len(), 1, "{view:?}");
    let r = &view.recent_refusals[0];
    assert_eq!((r.status, r.code.as_str()), (403, "device-suspended"));
    assert!(r.peer.starts_with("127.0.0.1:"), "{r:?}");
    assert!(r.at.ends_with('Z'), "{r:?}");
    gw.stop().await;
}
