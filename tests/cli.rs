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
    // A port nothing listens on: the CLI must fall back to the database.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = gatehouse::config::template::Template {
        listen: "127.0.0.1:0".into(),
        server: vec!["shutdown_grace_ms = 2000".into()],
        pki_dir: "pki".into(),
        registry: "registry".into(),
        cluster: None,
        schemas_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .to_string_lossy()
            .into_owned(),
        admin: Some((format!("127.0.0.1:{admin_port}"), "admin.token".into())),
        audit: None,
        routes: vec![gatehouse::config::template::TemplateRoute {
            subprotocol: "telemetry.v1".into(),
            kind: "telemetry".into(),
            device_types: vec!["env-sensor".into()],
            backends: vec!["ws://127.0.0.1:9/".into()],
        }],
        limits: Vec::new(),
    }
    .render();
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

/// `gatehouse serve` on `config`, logging at info to a pipe.
fn serve(config: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["serve", "--config", config])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[cfg(unix)]
#[test]
fn serve_exits_zero_on_sigterm() {
    let (_tmp, config) = setup();
    let mut child = serve(&config);
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

/// Reads `lines` until one contains `needle`; every line read, for the failure message.
fn read_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return seen;
        }
    }
    panic!("the gateway ended without logging {needle:?}: {seen:?}");
}

/// SIGHUP reloads the schemas as well as the TLS material: a broken schema file keeps the
/// previous set and says so, a fixed one with a new device type is taken in. Logs written to
/// a pipe carry no colour codes.
#[cfg(unix)]
#[test]
fn sighup_reloads_schemas_and_logs_to_a_pipe_have_no_colour() {
    let (tmp, config) = setup();
    let schemas = tmp.path().join("schemas");
    std::fs::create_dir_all(schemas.join("env-sensor")).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    std::fs::copy(
        shipped.join("env-sensor/telemetry.schema.json"),
        schemas.join("env-sensor/telemetry.schema.json"),
    )
    .unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("dir = {shipped:?}"), &format!("dir = {schemas:?}"));
    assert!(text.contains(schemas.to_str().unwrap()));
    std::fs::write(&config, text).unwrap();

    let mut child = serve(&config);
    // A bound on the whole test, so a missing log line fails it instead of hanging it.
    let pid = child.id().to_string();
    let watchdog_pid = pid.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        let _ = Command::new("kill").args(["-KILL", &watchdog_pid]).status();
    });
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success())
    };
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = read_until(&mut lines, "gateway listening");

    std::fs::write(schemas.join("env-sensor/telemetry.schema.json"), "{").unwrap();
    hup();
    log.extend(read_until(&mut lines, "SIGHUP: reload failed"));

    std::fs::copy(
        shipped.join("env-sensor/telemetry.schema.json"),
        schemas.join("env-sensor/telemetry.schema.json"),
    )
    .unwrap();
    std::fs::create_dir_all(schemas.join("thermostat")).unwrap();
    std::fs::write(schemas.join("thermostat/telemetry.schema.json"), "{}").unwrap();
    hup();
    let reloaded = read_until(
        &mut lines,
        "SIGHUP: configuration, TLS material and schemas reloaded",
    );
    assert!(
        reloaded.last().unwrap().contains("device_types=2"),
        "{reloaded:?}"
    );
    log.extend(reloaded);

    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    log.extend(lines.map_while(Result::ok));
    assert!(child.wait().unwrap().success(), "{log:?}");
    assert!(!log.iter().any(|l| l.contains('\u{1b}')), "{log:?}");
}

/// `--config` is one global option, before or after the subcommand, or GATEHOUSE_CONFIG;
/// times print as RFC 3339.
#[test]
fn config_is_global_and_times_are_rfc3339() {
    let (tmp, config) = setup();
    let manifest = tmp.path().join("pki/fleet-s.json");
    for args in [
        vec!["--config", &config, "check"],
        vec!["check", "--config", &config],
    ] {
        let out = gatehouse(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = gatehouse(&[
        "--config",
        &config,
        "devices",
        "enroll",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["devices", "list"])
        .env("GATEHOUSE_CONFIG", &config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout.lines().find(|l| l.starts_with("s-00001")).unwrap();
    let updated = row.split_whitespace().last().unwrap();
    time::OffsetDateTime::parse(updated, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{updated:?} is not RFC 3339: {e}"));
    let out = gatehouse(&["devices", "show", "s-00001", "--config", &config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let created = stdout
        .lines()
        .find_map(|l| l.strip_prefix("created"))
        .unwrap()
        .trim();
    assert!(
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{created:?}"
    );
    let out = gatehouse(&["devices", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEHOUSE_CONFIG"));
}
