//! The `gatehouse` binary: `check`, offline `devices`, and `serve` stopping on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

fn gatehouse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(args)
        .output()
        .unwrap()
}

/// A pki directory, a fleet manifest and a config in a temporary directory.
fn setup() -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let mut pki = gatehouse_pki::PkiDir::init(&pki_dir, false).unwrap();
    pki.issue_server(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    pki.issue_fleet("env-sensor", 3, "s").unwrap();
    std::fs::write(tmp.path().join("admin.token"), "cli-test-token-0123456789").unwrap();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
crl = ["pki/crl.pem"]
[registry]
path = "registry"
[schemas]
dir = {schemas:?}
[admin]
listen = "127.0.0.1:{}"
token_file = "admin.token"
[[route]]
subprotocol = "telemetry.v1"
kind = "telemetry"
device_types = ["env-sensor"]
backends = ["ws://127.0.0.1:9/"]
"#,
        // A port nothing listens on: the CLI must fall back to the database.
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
        schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"),
    );
    let path = tmp.path().join("gatehouse.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap().to_string();
    (tmp, path)
}

#[test]
fn check_reports_valid_and_invalid_configs() {
    let (tmp, config) = setup();
    let out = gatehouse(&["check", "--config", &config]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("telemetry.v1"));

    let broken = tmp.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("kind = \"telemetry\"", "kind = \"bulk\""),
    )
    .unwrap();
    let out = gatehouse(&["check", "--config", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"telemetry\" or \"control\""));

    // A route whose device type has no schema: check names the missing file.
    let no_schema = tmp.path().join("no-schema.toml");
    std::fs::write(
        &no_schema,
        std::fs::read_to_string(&config).unwrap().replace(
            "device_types = [\"env-sensor\"]",
            "device_types = [\"env-sensor\", \"thermostat\"]",
        ),
    )
    .unwrap();
    let out = gatehouse(&["check", "--config", no_schema.to_str().unwrap()]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("thermostat") && stdout.contains("telemetry.schema.json"),
        "{stdout}"
    );

    std::fs::remove_file(tmp.path().join("pki/server.key")).unwrap();
    let out = gatehouse(&["check", "--config", &config]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.key"));
}

#[test]
fn devices_work_offline() {
    let (tmp, config) = setup();
    let manifest = tmp.path().join("pki/fleet-s.json");
    let dev = |args: &[&str]| {
        let mut all = vec!["devices", "--config", &config];
        all.extend_from_slice(args);
        gatehouse(&all)
    };

    // A manifest whose fingerprint does not match its certificate enrolls nothing.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let m: gatehouse_pki::Manifest = serde_json::from_str(&text).unwrap();
    let bad = text.replace(&m.devices[1].sha256, &"0".repeat(64));
    let bad_path = tmp.path().join("pki/bad.json");
    std::fs::write(&bad_path, bad).unwrap();
    let out = dev(&["enroll", "--manifest", bad_path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing enrolled"));

    let out = dev(&["enroll", "--manifest", manifest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = tmp.path().join("pki/devices/s-00001.pem");
    let out = dev(&[
        "enroll",
        "--id",
        "other",
        "--type",
        "env-sensor",
        "--cert",
        cert.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "one certificate cannot belong to two devices"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already enrolled"));

    assert!(dev(&["suspend", "s-00002"]).status.success());
    let out = dev(&["list", "--json"]);
    let list: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(list.len(), 3);
    assert_eq!(list[1]["status"], "suspended");
    let out = dev(&["show", "s-00003"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("env-sensor"));
    let out = dev(&["show", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device"));
    assert!(dev(&["revoke", "s-00003"]).status.success());
    let out = dev(&["resume", "s-00003"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("final"));
}

#[cfg(unix)]
#[test]
fn serve_exits_zero_on_sigterm() {
    let (_tmp, config) = setup();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--config", &config])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Ready when it says so; no sleeps.
    for line in lines.by_ref() {
        if line.unwrap().contains("gateway listening") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("gateway stopped")),
        "{rest:?}"
    );
}
