//! The deployment files: the systemd unit verifies with `systemd-analyze verify` (no warning
//! either), carries the hardening the handbook promises, and its command lines are ones the
//! binary accepts. (The dashboard and alert rules are checked against a live scrape in
//! `tests/metrics.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gatehouse.service"))
        .unwrap()
}

/// The unit with its binary path pointing at the binary under test (verify checks that the
/// executables exist).
fn unit_for_test(dir: &Path) -> std::path::PathBuf {
    let text = unit_text().replace("/usr/local/bin/gatehouse", env!("CARGO_BIN_EXE_gatehouse"));
    let path = dir.join("gatehouse.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed to verify the unit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze warned about the unit: {stderr}"
    );
}

#[test]
fn the_unit_carries_the_hardening_the_handbook_promises() {
    let text = unit_text();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing from the unit"))
            .to_string()
    };
    assert_eq!(value("User"), "gatehouse");
    assert_eq!(value("NoNewPrivileges"), "yes");
    assert_eq!(value("ProtectSystem"), "strict");
    assert_eq!(value("ProtectHome"), "yes");
    assert_eq!(value("PrivateTmp"), "yes");
    assert_eq!(value("CapabilityBoundingSet"), "");
    assert_eq!(value("StateDirectory"), "gatehouse");
    assert_eq!(value("ReadOnlyPaths"), "/etc/gatehouse");
    let nofile: u64 = value("LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 20_000,
        "LimitNOFILE {nofile}: two sockets per session"
    );
    assert!(value("ExecReload").contains("-HUP"));
}

#[tokio::test]
async fn the_units_command_lines_are_ones_the_binary_accepts() {
    // `ExecStartPre` runs `check` on the configuration: run it on a real one.
    let ingest = Backend::start().await;
    let prepared = prepare(&Options::new(vec![telemetry_route(vec![ingest.url("/")])]));
    let text = unit_text();
    let pre = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .unwrap();
    let args: Vec<String> = pre
        .split_whitespace()
        .skip(1)
        .map(|a| {
            a.replace(
                "/etc/gatehouse/gatehouse.toml",
                prepared.config_path.to_str().unwrap(),
            )
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `ExecStart` names the same configuration and `serve`.
    let start = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(
        start.ends_with("--config /etc/gatehouse/gatehouse.toml serve"),
        "{start}"
    );
}

/// deploy/haproxy.cfg: TCP mode (TLS reaches the gateways), PROXY protocol v2 to them,
/// `/readyz` as the health check; and `haproxy -c` accepts it where HAProxy is installed.
#[test]
fn the_haproxy_configuration_is_what_the_cluster_docs_describe() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
    let text = std::fs::read_to_string(path).unwrap();
    for needed in [
        "mode tcp",
        "send-proxy-v2",
        "option httpchk GET /readyz",
        "balance leastconn",
    ] {
        assert!(text.contains(needed), "deploy/haproxy.cfg lacks {needed:?}");
    }
    assert!(
        !text.contains("mode http"),
        "TLS must reach the gateways untouched"
    );
    if let Ok(out) = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(path)
        .output()
    {
        assert!(
            out.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
