//! What the audit benchmarks share: a command record, a fresh signing key and a local log.

use gatehouse::audit::{Record, RecordKind};

/// A `command_sent` record for `device`, as a control session writes it.
pub fn command(device: String, n: u64) -> Record {
    Record {
        device,
        kind: RecordKind::CommandSent,
        route: Some("control.v1".into()),
        command_id: Some(serde_json::json!(n)),
        payload: Some(format!(r#"{{"command":"unlock","id":{n}}}"#)),
        ..Default::default()
    }
}

/// A fresh Ed25519 checkpoint key.
pub fn key() -> aws_lc_rs::signature::Ed25519KeyPair {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

/// A local segment log in the target directory (the build's file system, not tmpfs); the
/// directory lives as long as the returned guard.
pub fn local_log() -> (
    tempfile::TempDir,
    gatehouse::audit::AuditLog,
    std::thread::JoinHandle<()>,
) {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::tempdir_in(base).unwrap();
    let (log, thread) = gatehouse::audit::AuditLog::open(
        gatehouse::audit::WriterConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 64 << 20,
            checkpoint_interval: std::time::Duration::from_secs(10),
            retention: None,
            metrics: None,
        },
        key(),
    )
    .unwrap();
    (dir, log, thread)
}
