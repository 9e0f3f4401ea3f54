//! Crash safety of the audit log: the real `gatehouse serve` binary is killed with SIGKILL
//! while a control backend streams commands to several devices; after each crash the whole
//! log verifies, and every command a device reports having received has its `command_sent`
//! record. A few cycles run here; `device-sim/bench/audit-crash.sh` repeats it hundreds of
//! times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gatehouse::storage::DeviceStore;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use futures_util::{SinkExt, StreamExt};
use gatehouse::audit::RecordKind;
use tokio_tungstenite::tungstenite::Message;

/// Cycles per test run (override with GATEHOUSE_CRASH_CYCLES).
const DEFAULT_CYCLES: usize = 3;
const DEVICES: usize = 8;

/// Starts the binary and waits for its "gateway listening" line; returns it and its port.
fn start_gateway(config: &std::path::Path) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("gateway exited before listening")
            .unwrap();
        if line.contains("gateway listening") {
            let at = line
                .find("127.0.0.1:")
                .expect("listen address in the log line")
                + 10;
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            break digits.parse().unwrap();
        }
    };
    // Keep draining the log so the gateway never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_commands_stream_never_loses_a_delivered_command() {
    let cycles = std::env::var("GATEHOUSE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CYCLES);
    let mut control = Backend::start().await;
    let mut options = Options::new(vec![control_route(vec![control.url("/")])]);
    options.audit = Some("checkpoint_interval_ms = 50".into());
    let prepared = prepare(&options);
    let dir = prepared.dir.path().to_path_buf();
    let config_path = prepared.config_path.clone();
    // The listen address must be fixed per run for the binary: 127.0.0.1:0 is fine, the port
    // is read from its log.
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| {
            prepared
                .ca
                .issue_device(&format!("lock-{i}"), &device_options())
                .unwrap()
        })
        .collect();
    {
        let registry = gatehouse::storage::SledRegistry::open(&dir.join("registry")).unwrap();
        for (i, d) in devices.iter().enumerate() {
            registry
                .enroll(gatehouse::model::Enrollment {
                    id: format!("lock-{i}"),
                    device_type: "door-lock".into(),
                    sha256: d.fingerprint_hex(),
                    labels: Default::default(),
                })
                .unwrap();
        }
    }
    let public = gatehouse::audit::load_public_key(&dir.join("audit.pub")).unwrap();
    let received: Arc<Mutex<HashSet<(String, u64)>>> = Arc::default();
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));

    for cycle in 0..cycles {
        let (mut child, port) = tokio::task::spawn_blocking({
            let config_path = config_path.clone();
            move || start_gateway(&config_path)
        })
        .await
        .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut tasks = Vec::new();
        for (i, cert) in devices.iter().enumerate() {
            let (mut dev, _) = connect(
                addr,
                client_config(prepared.ca.cert_pem(), Some(cert)),
                &["control.v1"],
                &[],
            )
            .await
            .unwrap();
            let mut be = control.next().await;
            let received = received.clone();
            let name = format!("lock-{i}");
            // The device: note every command it receives, answer it.
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(msg)) = dev.next().await {
                    if let Message::Text(t) = msg {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        let id = v["id"].as_u64().unwrap();
                        received.lock().unwrap().insert((name.clone(), id));
                        let answer = format!(r#"{{"id":{id},"status":"ok"}}"#);
                        if dev.send(Message::text(answer)).await.is_err() {
                            break;
                        }
                    }
                }
            }));
            // The backend: stream commands as fast as the gateway takes them.
            let next_id = next_id.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let cmd = format!(r#"{{"id":{id},"command":"lock"}}"#);
                    if be.ws.send(Message::text(cmd)).await.is_err() {
                        break;
                    }
                }
            }));
        }
        // Let commands flow, then kill the gateway mid-stream.
        let target = (cycle + 1) * 200;
        within(async {
            while received.lock().unwrap().len() < target {
                tokio::task::yield_now().await;
            }
        })
        .await;
        child.kill().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(!status.success(), "killed with SIGKILL");
        for t in tasks {
            let _ = within(t).await;
        }

        // Straight from the crashed files: every log verifies...
        let verdict = gatehouse::audit::verify_dir(&dir.join("audit"), &public, None).unwrap();
        assert!(
            verdict.failures.is_empty(),
            "cycle {cycle}: {:?}",
            verdict.failures
        );
        // ...and every command a device received was recorded before it got it.
        let contents = gatehouse::audit::read(&dir.join("audit")).unwrap();
        let recorded: HashSet<(String, u64)> = contents
            .records
            .values()
            .flatten()
            .filter(|r| r.kind == RecordKind::CommandSent)
            .map(|r| {
                (
                    r.device.clone(),
                    r.command_id.as_ref().unwrap().as_u64().unwrap(),
                )
            })
            .collect();
        let received = received.lock().unwrap();
        let missing: Vec<_> = received.difference(&recorded).collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: delivered but not recorded: {missing:?}"
        );
    }
    drop(prepared);
}
