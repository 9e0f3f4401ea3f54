//! The `gatehouse-pki` binary end to end, in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn pki(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gatehouse-pki"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn issue_list_and_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();

    assert!(err(&pki(&[
        "device",
        "--dir",
        d,
        "--id",
        "a",
        "--type",
        "env-sensor"
    ]))
    .contains("gatehouse-pki init"));
    ok(&pki(&["init", "--dir", d]));
    assert!(err(&pki(&["init", "--dir", d])).contains("--force"));
    ok(&pki(&[
        "server",
        "--dir",
        d,
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    ]));
    assert!(tmp.path().join("server.pem").exists());
    ok(&pki(&[
        "device",
        "--dir",
        d,
        "--id",
        "lock-1",
        "--type",
        "door-lock",
    ]));
    assert!(tmp.path().join("devices/lock-1.pem").exists());
    let fleet = ok(&pki(&[
        "fleet",
        "--dir",
        d,
        "--type",
        "env-sensor",
        "--count",
        "5",
        "--prefix",
        "s",
    ]));
    assert!(fleet.contains("5 env-sensor certificates"), "{fleet}");
    assert!(tmp.path().join("fleet-s.json").exists());

    // Bad input: a clear error and nothing changes.
    let index = std::fs::read(tmp.path().join("index.json")).unwrap();
    let crl = std::fs::read(tmp.path().join("crl.pem")).unwrap();
    assert!(err(&pki(&[
        "device",
        "--dir",
        d,
        "--id",
        "bad/id",
        "--type",
        "env-sensor"
    ]))
    .contains("invalid device id"));
    assert!(err(&pki(&[
        "device",
        "--dir",
        d,
        "--id",
        "x y",
        "--type",
        "env-sensor"
    ]))
    .contains("invalid device id"));
    assert!(err(&pki(&[
        "device", "--dir", d, "--id", "ok", "--type", "Bad Type"
    ]))
    .contains("invalid device type"));
    assert!(err(&pki(&["revoke", "--dir", d, "--id", "nobody"])).contains("unknown device"));
    assert!(err(&pki(&[
        "fleet",
        "--dir",
        d,
        "--type",
        "env-sensor",
        "--count",
        "2",
        "--prefix",
        "s"
    ]))
    .contains("already has"));
    assert_eq!(index, std::fs::read(tmp.path().join("index.json")).unwrap());
    assert_eq!(crl, std::fs::read(tmp.path().join("crl.pem")).unwrap());

    ok(&pki(&["revoke", "--dir", d, "--id", "lock-1"]));
    assert_ne!(crl, std::fs::read(tmp.path().join("crl.pem")).unwrap());
    assert!(err(&pki(&["revoke", "--dir", d, "--id", "lock-1"])).contains("already revoked"));
    let list = ok(&pki(&["list", "--dir", d]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("lock-1") && l.contains("revoked")),
        "{list}"
    );
    assert_eq!(list.lines().count(), 1 + 6);
    let json = ok(&pki(&["list", "--dir", d, "--json"]));
    assert_eq!(json.lines().count(), 6);
    ok(&pki(&["crl", "--dir", d, "--days", "1"]));
}
