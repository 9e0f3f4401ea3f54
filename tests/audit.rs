//! The command audit log over real connections: every delivered command has its record on disk
//! first; responses, timeouts, unmatched answers, rejections and connection events are
//! recorded; a failing disk refuses commands (fail closed) and recovers by itself; the log
//! verifies, and tampering with the files is caught.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use gatehouse::audit::{Record, RecordKind};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn records(gw: &Gateway, device: &str) -> Vec<Record> {
    let mut c = gatehouse::audit::read(&gw.dir.path().join("audit")).unwrap();
    c.records.remove(device).unwrap_or_default()
}

/// Syncs the writer and reads until a record matching `pred` is there (bounded by `within`).
async fn wait_for(gw: &Gateway, device: &str, pred: impl Fn(&Record) -> bool) -> Vec<Record> {
    within(async {
        loop {
            gw.audit.as_ref().unwrap().sync().await;
            let rs = records(gw, device);
            if rs.iter().any(&pred) {
                return rs;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

fn json_of(msg: Message) -> Value {
    match msg {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn the_command_lifecycle_is_recorded_and_verifies() {
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.audit =
        Some("command_timeout_ms = 300\ncheckpoint_interval_ms = 100\nredact = [\"code\"]".into());
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-a", "door-lock");
    let (mut dev, _) = gw.connect(Some(&lock), &["control.v1"]).await.unwrap();
    let mut be = control.next().await;

    // Command 1: its record is on disk by the time the device has it.
    be.ws
        .send(Message::text(
            r#"{"id":1,"command":"set_code","code":"4711"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut dev).await)["id"], 1);
    let rs = records(&gw, "lock-a");
    let sent = rs
        .iter()
        .find(|r| r.kind == RecordKind::CommandSent)
        .expect("command_sent before delivery");
    assert_eq!(sent.command_id, Some(json!(1)));
    assert!(
        sent.payload.as_deref().unwrap().contains("[redacted]"),
        "{:?}",
        sent.payload
    );
    assert!(!sent.payload.as_deref().unwrap().contains("4711"));
    assert_eq!(sent.route.as_deref(), Some("control.v1"));

    // Answered: responded with the verdict and a round-trip time.
    dev.send(Message::text(r#"{"id":1,"status":"ok"}"#))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut be.ws).await)["status"], "ok");
    // An answer to nothing.
    dev.send(Message::text(r#"{"id":99,"status":"ok"}"#))
        .await
        .unwrap();
    let _ = next_msg(&mut be.ws).await;
    // A command without an id never reaches the device; the backend is told.
    be.ws
        .send(Message::text(r#"{"command":"lock"}"#))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut be.ws).await)["code"], "missing-id");
    // Command 2 is never answered: it times out.
    be.ws
        .send(Message::text(r#"{"id":"two","command":"lock"}"#))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut dev).await)["id"], "two");
    let rs = wait_for(&gw, "lock-a", |r| r.kind == RecordKind::TimedOut).await;
    let kinds: Vec<_> = rs.iter().map(|r| (r.kind, r.command_id.clone())).collect();
    assert!(kinds.contains(&(RecordKind::Connected, None)), "{kinds:?}");
    assert!(
        kinds.contains(&(RecordKind::UnmatchedResponse, Some(json!(99)))),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(RecordKind::TimedOut, Some(json!("two")))),
        "{kinds:?}"
    );
    assert!(rs.iter().any(|r| r.kind == RecordKind::Rejected
        && r.detail.as_deref().unwrap_or("").contains("missing-id")));
    let responded = rs.iter().find(|r| r.kind == RecordKind::Responded).unwrap();
    assert_eq!(
        (responded.command_id.clone(), responded.verdict.as_deref()),
        (Some(json!(1)), Some("ok"))
    );
    assert!(responded.rtt_us.is_some());
    // Gap-free sequence numbers.
    assert!(rs.iter().enumerate().all(|(i, r)| r.seq == i as u64));

    // The disk fails: command 3 is refused (fail closed) and never reaches the device.
    let audit = gw.audit.clone().unwrap();
    audit.fail_writes(true);
    be.ws
        .send(Message::text(r#"{"id":3,"command":"unlock"}"#))
        .await
        .unwrap();
    let e = json_of(next_msg(&mut be.ws).await);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("audit-unavailable"), Some(3))
    );
    // It works again: command 4 is the next thing the device sees.
    audit.fail_writes(false);
    be.ws
        .send(Message::text(r#"{"id":4,"command":"unlock"}"#))
        .await
        .unwrap();
    assert_eq!(json_of(next_msg(&mut dev).await)["id"], 4);
    dev.close(None).await.unwrap();
    let rs = wait_for(&gw, "lock-a", |r| r.kind == RecordKind::Disconnected).await;
    assert!(rs
        .iter()
        .any(|r| r.kind == RecordKind::Rejected && r.command_id == Some(json!(3))));
    assert!(rs
        .iter()
        .any(|r| r.kind == RecordKind::Unanswered && r.command_id == Some(json!(4))));
    assert!(!rs
        .iter()
        .any(|r| r.kind == RecordKind::CommandSent && r.command_id == Some(json!(3))));

    // A refused handshake lands in the same device log.
    gw.registry
        .set_status("lock-a", gatehouse::model::DeviceStatus::Suspended)
        .unwrap();
    assert_eq!(
        gw.connect(Some(&lock), &["control.v1"])
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    let rs = wait_for(&gw, "lock-a", |r| r.kind == RecordKind::Refused).await;
    assert!(rs
        .last()
        .unwrap()
        .detail
        .as_deref()
        .unwrap()
        .contains("device-suspended"));

    // Everything verifies with the public key, through the CLI too.
    let dir = gw.dir.path().join("audit");
    let key = gatehouse::audit::load_public_key(&gw.dir.path().join("audit.pub")).unwrap();
    let v = gatehouse::audit::verify_dir(&dir, &key, None).unwrap();
    assert!(v.failures.is_empty(), "{:?}", v.failures);
    let config = gw.config_path.clone();
    let cli = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("audit")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = cli(&["verify", "--all"]);
    assert!(ok, "{out}");
    // And through the admin API.
    let verdicts: Vec<gatehouse::admin::AuditVerdict> =
        gw.api(Call::get("/v1/audit/verify")).await.unwrap();
    let shown: Vec<gatehouse::audit::Record> = gw.api(Call::get("/v1/audit/lock-a")).await.unwrap();
    assert!(
        verdicts.iter().all(|v| v.ok) && verdicts.iter().any(|v| v.device == "lock-a"),
        "{verdicts:?}"
    );
    assert_eq!(shown, records(&gw, "lock-a"));
    let (ok, out) = cli(&["show", "lock-a", "--command", "1"]);
    assert!(
        ok && out.contains("command_sent") && out.contains("responded"),
        "{out}"
    );
    let export = gw.dir.path().join("lock-a.json");
    assert!(cli(&["export", "lock-a", "--out", export.to_str().unwrap()]).0);
    let pubkey = gw.dir.path().join("audit.pub");
    let (ok, out) = cli(&[
        "verify",
        "--file",
        export.to_str().unwrap(),
        "--key",
        pubkey.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");

    // Tampering with the stored log is found, at the right record.
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .unwrap();
    let original = std::fs::read_to_string(&segment).unwrap();
    let forged = original.replacen("\"verdict\":\"ok\"", "\"verdict\":\"error\"", 1);
    assert_ne!(forged, original);
    std::fs::write(&segment, &forged).unwrap();
    let (ok, out) = cli(&["verify", "lock-a"]);
    assert!(!ok);
    assert!(
        out.contains(&format!("record {}", responded.seq)) && out.contains("modified"),
        "{out}"
    );
    // ...and in an export file.
    let text = std::fs::read_to_string(&export).unwrap();
    std::fs::write(&export, text.replacen("\"seq\": 2,", "\"seq\": 7,", 1)).unwrap();
    assert!(
        !cli(&[
            "verify",
            "--file",
            export.to_str().unwrap(),
            "--key",
            pubkey.to_str().unwrap()
        ])
        .0
    );
    gw.stop().await;
}
