//! The admin API over HTTP: authentication (none, a wrong token, an admin certificate, a
//! device certificate), every endpoint with each of its errors in the one JSON shape
//! (including the ones axum produces itself: bad body, unknown path, wrong method), device
//! listings with filters and pages, a device's recent refusals, the docs, and `gatehouse api`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::admin::Call;
use gatehouse::model::{DevicePage, DeviceQuery, DeviceStatus};

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

/// A wrong token is refused exactly like none; the probes stay plain text.
#[tokio::test]
async fn a_wrong_token_is_refused_like_none() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    for token in [None, Some("wrong-token-0123456789")] {
        assert_error(
            &call(&gw, "GET", "/v1/devices", token, None).await,
            401,
            "unauthorized",
        );
    }
    assert_eq!(
        call(&gw, "GET", "/healthz", None, None).await,
        (200, serde_json::Value::String("ok\n".into()))
    );
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
    let page = |q: DeviceQuery| gw.api::<DevicePage>(Call::get("/v1/devices").query(&q));
    let sensors = DeviceQuery {
        device_type: Some("env-sensor".into()),
        limit: Some(2),
        ..Default::default()
    };
    let first = page(sensors.clone()).await.unwrap();
    // Page after page, as the CLI does.
    let mut all = Vec::new();
    let mut q = sensors.clone();
    loop {
        let p = page(q.clone()).await.unwrap();
        assert!(p.devices.len() <= 2);
        all.extend(p.devices);
        match p.next_after {
            Some(next) => q.after = Some(next),
            None => break,
        }
    }
    let _: gatehouse::model::Device = gw
        .api(Call::post("/v1/devices/lock-0/suspend"))
        .await
        .unwrap();
    let suspended = page(DeviceQuery {
        status: Some(DeviceStatus::Suspended),
        ..Default::default()
    })
    .await
    .unwrap()
    .devices;
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
    let view: gatehouse::admin::DeviceView = gw.api(Call::get("/v1/devices/lock-0")).await.unwrap();
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

/// One error case: method, path, body (content type, text), status, code.
type Case = (
    &'static str,
    String,
    Option<(&'static str, &'static str)>,
    u16,
    &'static str,
);

/// `path` with its placeholders filled in.
fn concrete(path: &str, id: &str) -> String {
    path.replace("{id}", id)
        .replace("{sha256}", &"0".repeat(64))
}

/// Every endpoint: refused without a credential (but the probes and `/metrics`), routed (a
/// method it does not take answers 405, not 404), and each of its documented errors, in the
/// one JSON shape.
#[tokio::test]
async fn every_endpoint_answers_its_errors() {
    let schemas = tempfile::tempdir().unwrap();
    std::fs::create_dir(schemas.path().join("env-sensor")).unwrap();
    let schema = schemas.path().join("env-sensor/telemetry.schema.json");
    std::fs::write(&schema, r#"{"type":"object"}"#).unwrap();
    let ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.audit = Some(String::new());
    options.schemas_dir = Some(schemas.path().to_path_buf());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-0", "door-lock");
    let t = Some(gw.admin_token.as_str());
    let json = |body: &'static str| Some(("application/json", body));

    for (method, path) in gatehouse::admin::ENDPOINTS {
        let url = concrete(path, "lock-0");
        let public = matches!(*path, "/healthz" | "/readyz" | "/metrics");
        let anonymous = call(&gw, method, &url, None, None).await;
        if public {
            assert_eq!(anonymous.0, 200, "{method} {path}: {anonymous:?}");
        } else {
            assert_error(&anonymous, 401, "unauthorized");
        }
        let takes = |m: &str| {
            gatehouse::admin::ENDPOINTS
                .iter()
                .any(|(m2, p2)| *m2 == m && p2 == path)
        };
        let other = ["GET", "POST", "DELETE", "PUT"]
            .into_iter()
            .find(|m| !takes(m))
            .unwrap();
        assert_error(
            &call(&gw, other, &url, t, None).await,
            405,
            "method-not-allowed",
        );
    }

    let sha = lock.fingerprint_hex();
    let cases: Vec<Case> = vec![
        // Listing: each malformed query.
        (
            "GET",
            "/v1/devices?limit=0".into(),
            None,
            400,
            "bad-request",
        ),
        (
            "GET",
            "/v1/devices?limit=10001".into(),
            None,
            400,
            "bad-request",
        ),
        (
            "GET",
            "/v1/devices?status=sleepy".into(),
            None,
            400,
            "bad-request",
        ),
        (
            "GET",
            "/v1/devices?label=nokey".into(),
            None,
            400,
            "bad-request",
        ),
        // Enrollment: not JSON, not declared as JSON, the wrong shape, an invalid id, a
        // certificate another device has, a change of type.
        (
            "POST",
            "/v1/devices".into(),
            json("{not json"),
            400,
            "bad-request",
        ),
        (
            "POST",
            "/v1/devices".into(),
            Some(("text/plain", "{}")),
            415,
            "unsupported-media-type",
        ),
        (
            "POST",
            "/v1/devices".into(),
            json(r#"{"devices":[{"id":"x"}]}"#),
            422,
            "unprocessable",
        ),
        (
            "POST",
            "/v1/devices".into(),
            json(r#"{"devices":[{"id":"x"}],"extra":1}"#),
            422,
            "unprocessable",
        ),
        (
            "POST",
            "/v1/devices".into(),
            Some((
                "application/json",
                Box::leak(
                    format!(
                        r#"{{"devices":[{{"id":"bad id!","type":"door-lock","sha256":"{sha}"}}]}}"#
                    )
                    .into_boxed_str(),
                ),
            )),
            400,
            "bad-request",
        ),
        (
            "POST",
            "/v1/devices".into(),
            json(r#"{"devices":[{"id":"lock-9","type":"door-lock","sha256":"zz"}]}"#),
            400,
            "bad-request",
        ),
        (
            "POST",
            "/v1/devices".into(),
            Some((
                "application/json",
                Box::leak(
                    format!(
                        r#"{{"devices":[{{"id":"lock-9","type":"door-lock","sha256":"{sha}"}}]}}"#
                    )
                    .into_boxed_str(),
                ),
            )),
            409,
            "conflict",
        ),
        (
            "POST",
            "/v1/devices".into(),
            Some((
                "application/json",
                Box::leak(
                    format!(
                        r#"{{"devices":[{{"id":"lock-0","type":"env-sensor","sha256":"{}"}}]}}"#,
                        "1".repeat(64)
                    )
                    .into_boxed_str(),
                ),
            )),
            409,
            "conflict",
        ),
        // Per device: an unknown id everywhere.
        ("GET", "/v1/devices/nobody".into(), None, 404, "not-found"),
        (
            "POST",
            "/v1/devices/nobody/suspend".into(),
            None,
            404,
            "not-found",
        ),
        (
            "POST",
            "/v1/devices/nobody/resume".into(),
            None,
            404,
            "not-found",
        ),
        (
            "POST",
            "/v1/devices/nobody/revoke".into(),
            None,
            404,
            "not-found",
        ),
        (
            "POST",
            "/v1/devices/nobody/kick".into(),
            None,
            404,
            "not-found",
        ),
        (
            "GET",
            "/v1/devices/nobody/deadletters".into(),
            None,
            404,
            "not-found",
        ),
        (
            "DELETE",
            format!("/v1/devices/nobody/certificates/{sha}"),
            None,
            404,
            "not-found",
        ),
        // Certificates: one the device does not have, and one that is not a fingerprint.
        (
            "DELETE",
            format!("/v1/devices/lock-0/certificates/{}", "2".repeat(64)),
            None,
            400,
            "bad-request",
        ),
        (
            "DELETE",
            "/v1/devices/lock-0/certificates/zz".into(),
            None,
            400,
            "bad-request",
        ),
        // Kick: a body that is not JSON, or has a field it does not know.
        (
            "POST",
            "/v1/devices/lock-0/kick".into(),
            json("{"),
            400,
            "bad-request",
        ),
        (
            "POST",
            "/v1/devices/lock-0/kick".into(),
            json(r#"{"why":"x"}"#),
            422,
            "unprocessable",
        ),
        // Audit: an id that is not a device id.
        ("GET", "/v1/audit/bad%20id".into(), None, 400, "bad-request"),
        (
            "GET",
            "/v1/audit/bad%20id/export".into(),
            None,
            400,
            "bad-request",
        ),
        (
            "GET",
            "/v1/audit/verify?device=bad%20id".into(),
            None,
            400,
            "bad-request",
        ),
        (
            "GET",
            "/v1/audit/lock-0?since_ms=soon".into(),
            None,
            400,
            "bad-request",
        ),
        // Drain: a body of the wrong shape.
        (
            "POST",
            "/v1/drain".into(),
            json(r#"{"grace":5}"#),
            422,
            "unprocessable",
        ),
        // Unknown paths.
        ("GET", "/v1/nothing-here".into(), None, 404, "not-found"),
        (
            "GET",
            "/v1/devices/lock-0/nothing".into(),
            None,
            404,
            "not-found",
        ),
    ];
    for (method, path, body, status, code) in &cases {
        let got = call(&gw, method, path, t, *body).await;
        assert_eq!(got.0, *status, "{method} {path}: {got:?}");
        assert_error(&got, *status, code);
    }
    // What succeeds where it could have failed: a kick with nothing live, a device with no
    // dead letters or audit records.
    let ok = call(&gw, "POST", "/v1/devices/lock-0/kick", t, None).await;
    assert_eq!((ok.0, ok.1["sessions"].as_u64()), (200, Some(0)), "{ok:?}");
    let ok = call(&gw, "GET", "/v1/devices/lock-0/deadletters", t, None).await;
    assert_eq!(ok, (200, serde_json::json!([])));
    let ok = call(&gw, "GET", "/v1/audit/lock-0", t, None).await;
    assert_eq!(ok, (200, serde_json::json!([])));

    // Revocation is final: resuming answers 409 and the device stays revoked.
    assert_eq!(
        call(&gw, "POST", "/v1/devices/lock-0/revoke", t, None)
            .await
            .0,
        200
    );
    assert_error(
        &call(&gw, "POST", "/v1/devices/lock-0/resume", t, None).await,
        409,
        "conflict",
    );
    assert_eq!(
        call(&gw, "GET", "/v1/devices/lock-0", t, None).await.1["status"],
        "revoked"
    );

    // Reloads: a broken file is 422 naming it, and nothing changed (the next good reload
    // works).
    let crl = gw.dir.path().join("crl.pem");
    let good_crl = std::fs::read(&crl).unwrap();
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let got = call(&gw, "POST", "/v1/tls/reload", t, None).await;
    assert_error(&got, 422, "unprocessable");
    assert!(
        got.1["error"].as_str().unwrap().contains("crl.pem"),
        "{got:?}"
    );
    std::fs::write(&crl, good_crl).unwrap();
    assert_eq!(call(&gw, "POST", "/v1/tls/reload", t, None).await.0, 200);

    std::fs::write(&schema, r#"{"type":"number","minimum":"low"}"#).unwrap();
    let got = call(&gw, "POST", "/v1/schemas/reload", t, None).await;
    assert_error(&got, 422, "unprocessable");
    assert!(
        got.1["error"]
            .as_str()
            .unwrap()
            .contains("telemetry.schema.json"),
        "{got:?}"
    );
    std::fs::write(&schema, r#"{"type":"object"}"#).unwrap();
    assert_eq!(
        call(&gw, "POST", "/v1/schemas/reload", t, None).await.0,
        200
    );

    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        original.replace("[websocket]", "[websocket]\nmax_message_bytes = \"big\""),
    )
    .unwrap();
    let got = call(&gw, "POST", "/v1/reload", t, None).await;
    assert_error(&got, 422, "unprocessable");
    assert!(
        got.1["error"]
            .as_str()
            .unwrap()
            .contains("max_message_bytes"),
        "{got:?}"
    );
    std::fs::write(&gw.config_path, original).unwrap();
    assert_eq!(call(&gw, "POST", "/v1/reload", t, None).await.0, 200);

    // Drain: once, then 409; readiness turns false. Two live sessions keep the gateway up
    // (the second closes half-way through the grace period).
    let mut held = Vec::new();
    for id in ["sensor-0", "sensor-1"] {
        let sensor = gw.enroll(id, "env-sensor");
        held.push(gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap());
    }
    let drained = call(&gw, "POST", "/v1/drain", t, json(r#"{"grace_ms":60000}"#)).await;
    assert_eq!(drained.0, 200, "{drained:?}");
    assert_error(
        &call(&gw, "POST", "/v1/drain", t, None).await,
        409,
        "conflict",
    );
    assert_eq!(call(&gw, "GET", "/readyz", None, None).await.0, 503);
    gw.stop().await;
}

/// Without an `[audit]` section the audit endpoints say so (404), in the same shape.
#[tokio::test]
async fn audit_endpoints_without_an_audit_section_say_so() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    let t = Some(gw.admin_token.as_str());
    for path in [
        "/v1/audit/lock-0",
        "/v1/audit/lock-0/export",
        "/v1/audit/verify",
    ] {
        let got = call(&gw, "GET", path, t, None).await;
        assert_error(&got, 404, "not-found");
        assert!(
            got.1["error"].as_str().unwrap().contains("[audit]"),
            "{got:?}"
        );
    }
    gw.stop().await;
}

/// docs/admin-api.md documents every endpoint the router has, with a curl example per
/// section.
#[test]
fn every_endpoint_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/admin-api.md")).unwrap();
    for (method, path) in gatehouse::admin::ENDPOINTS {
        let named = format!("`{method} {path}");
        let found = doc
            .match_indices(&named)
            .any(|(at, _)| matches!(doc[at + named.len()..].chars().next(), Some('`' | '?')));
        assert!(found, "docs/admin-api.md does not document {method} {path}");
    }
    for section in doc.split("\n## ").skip(1) {
        let title = section.lines().next().unwrap();
        if title == "Errors" || title.starts_with("The CLI") {
            continue;
        }
        assert!(
            section.contains("curl "),
            "section {title:?} has no curl example"
        );
    }
}

/// `gatehouse api` reaches any endpoint: a body from the command line, the answer as JSON, a
/// refusal as the command's error with its code.
#[tokio::test]
async fn the_cli_reaches_any_endpoint_through_one_generic_call() {
    let ingest = Backend::start().await;
    let gw = Gateway::start(Options::new(vec![telemetry_route(vec![ingest.url("/")])])).await;
    gw.enroll("lock-0", "door-lock");
    let (ok, stdout, stderr) = gatehouse_cli(
        &gw,
        &[
            "api",
            "--config",
            "{config}",
            "GET",
            "/v1/devices?type=door-lock",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let page: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(page["devices"][0]["id"], "lock-0");
    let (ok, stdout, stderr) = gatehouse_cli(
        &gw,
        &[
            "api",
            "--config",
            "{config}",
            "POST",
            "/v1/devices/lock-0/kick",
            "--data",
            r#"{"reason":"maintenance"}"#,
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"sessions\": 0"), "{stdout}");
    let (ok, _, stderr) = gatehouse_cli(
        &gw,
        &["api", "--config", "{config}", "GET", "/v1/devices/nobody"],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("404 not-found"), "{stderr}");
    let (ok, _, stderr) = gatehouse_cli(
        &gw,
        &[
            "api",
            "--config",
            "{config}",
            "POST",
            "/v1/drain",
            "--data",
            "{oops",
        ],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("--data is not JSON"), "{stderr}");
    // Nothing was sent: the gateway is not draining.
    assert_eq!(call(&gw, "GET", "/readyz", None, None).await.0, 200);
    gw.stop().await;
}
