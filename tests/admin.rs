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

/// `GET path` over TLS to the admin listener with `cert` (or none) and `token` (or none):
/// the HTTP status, or `None` when TLS failed.
async fn https_status(
    gw: &Gateway,
    cert: Option<&gatehouse_pki::IssuedCert>,
    token: Option<&str>,
    path: &str,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect_tls(gw.admin_addr, gw.client_config(cert))
        .await
        .ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let mut answer = Vec::new();
    let _ = within(tls.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn an_admin_certificate_named_in_the_config_is_a_credential_and_a_device_certificate_is_not()
{
    let ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    // The admin listener speaks HTTPS with the gateway's own certificate and asks for admin
    // certificates from the same CA.
    options.admin_extra = "cert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\nclients = [\"ops-alice\"]".into();
    let gw = Gateway::start(options).await;
    let alice = gw
        .ca
        .issue_admin("ops-alice", time::Duration::days(1))
        .unwrap();
    let bob = gw
        .ca
        .issue_admin("ops-bob", time::Duration::days(1))
        .unwrap();
    let device = gw.enroll("sensor-1", "env-sensor");
    let token = gw.admin_token.clone();

    assert_eq!(
        https_status(&gw, Some(&alice), None, "/v1/devices").await,
        Some(200)
    );
    assert_eq!(
        https_status(&gw, Some(&alice), None, "/metrics").await,
        Some(200)
    );
    assert_eq!(
        https_status(&gw, Some(&bob), None, "/v1/devices").await,
        Some(403)
    );
    assert_eq!(
        https_status(&gw, Some(&device), None, "/v1/devices").await,
        Some(403)
    );
    // A device certificate with the token is still let in by the token.
    assert_eq!(
        https_status(&gw, Some(&device), Some(&token), "/v1/devices").await,
        Some(200)
    );
    assert_eq!(
        https_status(&gw, None, Some(&token), "/v1/devices").await,
        Some(200)
    );
    assert_eq!(
        https_status(&gw, None, None, "/v1/devices").await,
        Some(401)
    );
    assert_eq!(https_status(&gw, None, None, "/readyz").await, Some(200));
    // A certificate from another CA fails the TLS handshake.
    let other = gatehouse_pki::CertificateAuthority::generate("Other CA", time::Duration::days(1))
        .unwrap()
        .issue_admin("ops-alice", time::Duration::days(1))
        .unwrap();
    assert_ne!(
        https_status(&gw, Some(&other), None, "/v1/devices").await,
        Some(200)
    );
    // Plain HTTP to the HTTPS listener gets no answer.
    assert_plain_http_refused(&gw).await;
    // The CLI talks HTTPS to it (trusting tls.client_ca) with the token.
    let (ok, out, err) = gatehouse_cli(&gw, &["--config", "{config}", "devices", "list"]).await;
    assert!(ok && out.contains("sensor-1"), "{out}{err}");
    gw.stop().await;
}

async fn assert_plain_http_refused(gw: &Gateway) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gw.admin_addr).await.unwrap();
    tcp.write_all(b"GET /v1/devices HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(tcp.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}
