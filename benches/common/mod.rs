//! What the audit benchmarks share: a command record and a fresh signing key.

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
