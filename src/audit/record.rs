//! The command audit log's data and rules, pure: the record format, the per-device hash chain,
//! signed checkpoints, payload redaction, and verification. No files and no clocks here: the
//! storage and the writer are `audit::writer`, reading back is `audit::reader`; docs/audit.md describes the scheme and its limits.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::sha256_hex;

/// `prev` of a device's first record: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Replaces the value of a redacted field.
pub const REDACTED: &str = "[redacted]";
/// Domain separation for checkpoint signatures.
const CHECKPOINT_CONTEXT: &str = "gatehouse-audit-checkpoint:v1";
/// Domain separation for retention anchors, so a checkpoint can never pass as an anchor.
const ANCHOR_CONTEXT: &str = "gatehouse-audit-anchor:v1";

/// What a record says happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// The device's session was established.
    #[default]
    Connected,
    /// The session ended (`detail`: close code, reason, who closed).
    Disconnected,
    /// The device was refused at the handshake (`detail`: the reason).
    Refused,
    /// A command was accepted for delivery. Written and flushed before it is forwarded.
    CommandSent,
    /// The device answered an open command (`verdict`, `rtt_us`).
    Responded,
    /// No answer within the command timeout.
    TimedOut,
    /// The session ended while the command was still open.
    Unanswered,
    /// A command was not delivered (`detail`: schema, missing id, audit unavailable, ...).
    Rejected,
    /// A response whose id matches no open command.
    UnmatchedResponse,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Connected => "connected",
            RecordKind::Disconnected => "disconnected",
            RecordKind::Refused => "refused",
            RecordKind::CommandSent => "command_sent",
            RecordKind::Responded => "responded",
            RecordKind::TimedOut => "timed_out",
            RecordKind::Unanswered => "unanswered",
            RecordKind::Rejected => "rejected",
            RecordKind::UnmatchedResponse => "unmatched_response",
        }
    }
}

/// One record of a device's chain, as stored (one JSON line). Callers fill in what happened
/// (`Record { device, kind, .., ..Default::default() }`); the writer seals it: sequence
/// number, time and chain fields ([`Record::seal`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub device: String,
    /// Gap-free per device, from 0 (or from the retention anchor).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub kind: RecordKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_sha256: Option<String>,
    /// The payload as JSON text, redacted and cut to the configured size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// `hash` of the device's previous record ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 of this record's JSON with `hash` set to "" (see [`Record::compute_hash`]).
    pub hash: String,
}

impl Record {
    /// Makes this record the one that follows `prev` in its device's chain: sets the
    /// sequence number, time and `prev`, and computes the hash.
    pub fn seal(mut self, seq: u64, time_ms: i64, prev: &str) -> Record {
        self.seq = seq;
        self.time_ms = time_ms;
        self.prev = prev.to_string();
        self.hash = self.compute_hash();
        self
    }

    /// Whether the record is about the command whose id is written `want` (`7` matches the
    /// number 7 and the string "7").
    pub fn is_about(&self, want: &str) -> bool {
        match &self.command_id {
            Some(id) => {
                id.as_str() == Some(want) || id.as_u64().is_some_and(|n| want.parse() == Ok(n))
            }
            None => false,
        }
    }

    /// SHA-256 (hex) of the record serialised as stored, with `hash` = "".
    pub fn compute_hash(&self) -> String {
        let mut copy = self.clone();
        copy.hash = String::new();
        // Serialising a struct of strings, integers and a JSON value cannot fail.
        let bytes = serde_json::to_vec(&copy).unwrap_or_default();
        sha256_hex(&bytes)
    }
}

/// A signed statement: "device D's chain had record `seq` with hash `hash` at `time_ms`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub device: String,
    pub seq: u64,
    pub hash: String,
    pub time_ms: i64,
    /// Ed25519 signature (hex) over [`Checkpoint::message`].
    pub sig: String,
}

impl Checkpoint {
    pub fn message(device: &str, seq: u64, hash: &str, time_ms: i64) -> Vec<u8> {
        format!("{CHECKPOINT_CONTEXT}\n{device}\n{seq}\n{hash}\n{time_ms}").into_bytes()
    }

    pub fn sign(
        key: &aws_lc_rs::signature::Ed25519KeyPair,
        device: &str,
        seq: u64,
        hash: &str,
        time_ms: i64,
    ) -> Checkpoint {
        let sig = key.sign(&Self::message(device, seq, hash, time_ms));
        Checkpoint {
            device: device.to_string(),
            seq,
            hash: hash.to_string(),
            time_ms,
            sig: hex::encode(sig.as_ref()),
        }
    }

    pub fn verify(&self, public_key: &[u8; 32]) -> bool {
        self.verify_in(CHECKPOINT_CONTEXT, public_key)
    }

    fn verify_in(&self, context: &str, public_key: &[u8; 32]) -> bool {
        let Ok(sig) = hex::decode(&self.sig) else {
            return false;
        };
        let message = format!(
            "{context}\n{}\n{}\n{}\n{}",
            self.device, self.seq, self.hash, self.time_ms
        );
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public_key)
            .verify(message.as_bytes(), &sig)
            .is_ok()
    }

    /// Signs a retention anchor: "records up to `seq` (ending in `hash`) were pruned".
    pub fn sign_anchor(
        key: &aws_lc_rs::signature::Ed25519KeyPair,
        device: &str,
        seq: u64,
        hash: &str,
        time_ms: i64,
    ) -> Checkpoint {
        let message = format!("{ANCHOR_CONTEXT}\n{device}\n{seq}\n{hash}\n{time_ms}");
        Checkpoint {
            device: device.to_string(),
            seq,
            hash: hash.to_string(),
            time_ms,
            sig: hex::encode(key.sign(message.as_bytes()).as_ref()),
        }
    }

    /// Verifies a retention anchor (never a checkpoint).
    pub fn verify_anchor(&self, public_key: &[u8; 32]) -> bool {
        self.verify_in(ANCHOR_CONTEXT, public_key)
    }
}

/// Replaces the value of every object key named in `fields`, at any depth, with
/// [`REDACTED`].
pub fn redact(value: &mut Value, fields: &[String]) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if fields.iter().any(|f| f == k) {
                    *v = Value::String(REDACTED.into());
                } else {
                    redact(v, fields);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, fields)),
        _ => {}
    }
}

/// The stored form of a payload: redacted JSON text cut at `max_bytes` (on a character
/// boundary), whether it was cut, and the SHA-256 of the frame's own bytes.
pub fn stored_payload(
    frame: &[u8],
    decoded: &Value,
    redact_fields: &[String],
    max_bytes: usize,
) -> (String, bool, String) {
    let mut value = decoded.clone();
    redact(&mut value, redact_fields);
    let mut text = value.to_string();
    let truncated = text.len() > max_bytes;
    if truncated {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    (text, truncated, sha256_hex(frame))
}

/// Where a device's chain starts: the first record, or the record after a signed anchor left
/// by retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

/// The first problem verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub device: String,
    /// The first sequence number that is wrong or missing.
    pub seq: u64,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {}: record {}: {}",
            self.device, self.seq, self.reason
        )
    }
}

/// What verification of one device established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub device: String,
    pub records: u64,
    /// The last checkpoint that matched (sequence number), if any.
    pub checkpointed_to: Option<u64>,
    /// Records after the last checkpoint: protected by the chain only.
    pub unsigned_tail: u64,
}

/// Verifies one device's records (in file order) against its checkpoints.
pub fn verify_device(
    device: &str,
    records: &[Record],
    checkpoints: &[Checkpoint],
    public_key: &[u8; 32],
    anchor: Option<&Anchor>,
) -> Result<Verified, Failure> {
    let fail = |seq: u64, reason: String| Failure {
        device: device.to_string(),
        seq,
        reason,
    };
    let first = anchor.map(|a| a.seq + 1).unwrap_or(0);
    let mut expected = first;
    let mut prev = anchor
        .map(|a| a.hash.clone())
        .unwrap_or_else(|| GENESIS.to_string());
    for r in records {
        if r.device != device {
            return Err(fail(
                expected,
                format!("record of device {:?} in this device's log", r.device),
            ));
        }
        if r.seq != expected {
            let why = if r.seq < expected {
                format!("sequence {} appears again or out of order", r.seq)
            } else {
                format!("missing: the next record has sequence {}", r.seq)
            };
            return Err(fail(expected, why));
        }
        if r.prev != prev {
            return Err(fail(
                r.seq,
                "does not follow the previous record (a record was inserted, deleted or reordered)"
                    .into(),
            ));
        }
        if r.compute_hash() != r.hash {
            return Err(fail(
                r.seq,
                "content does not match its hash (modified)".into(),
            ));
        }
        prev = r.hash.clone();
        expected += 1;
    }
    let mut checkpointed_to = None;
    for cp in checkpoints.iter().filter(|c| c.device == device) {
        if !cp.verify(public_key) {
            return Err(fail(
                cp.seq,
                "checkpoint signature does not verify with this key".into(),
            ));
        }
        if cp.seq < first {
            continue;
        }
        if cp.seq >= expected {
            return Err(fail(
                expected,
                format!(
                    "log truncated: a signed checkpoint covers record {} but the log ends before it",
                    cp.seq
                ),
            ));
        }
        let index = (cp.seq - first) as usize;
        if records.get(index).map(|r| r.hash.as_str()) != Some(cp.hash.as_str()) {
            return Err(fail(
                cp.seq,
                "differs from the signed checkpoint (the chain was rewritten)".into(),
            ));
        }
        checkpointed_to = Some(checkpointed_to.map_or(cp.seq, |c: u64| c.max(cp.seq)));
    }
    let total = expected - first;
    Ok(Verified {
        device: device.to_string(),
        records: total,
        checkpointed_to,
        unsigned_tail: match checkpointed_to {
            Some(c) => expected - 1 - c,
            None => total,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::KeyPair;
    use serde_json::json;

    fn key() -> aws_lc_rs::signature::Ed25519KeyPair {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn public(k: &aws_lc_rs::signature::Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    fn chain(n: u64) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for seq in 0..n {
            let prev = out
                .last()
                .map(|r| r.hash.clone())
                .unwrap_or_else(|| GENESIS.into());
            let event = Record {
                device: "d1".into(),
                kind: RecordKind::CommandSent,
                command_id: Some(json!(seq)),
                payload: Some(format!("{{\"id\":{seq}}}")),
                ..Default::default()
            };
            out.push(event.seal(seq, 1000 + seq as i64, &prev));
        }
        out
    }

    #[test]
    fn an_intact_chain_verifies() {
        let k = key();
        let records = chain(5);
        let cp = Checkpoint::sign(&k, "d1", 3, &records[3].hash, 9);
        let v = verify_device("d1", &records, &[cp], &public(&k), None).unwrap();
        assert_eq!(
            (v.records, v.checkpointed_to, v.unsigned_tail),
            (5, Some(3), 1)
        );
        // A record survives a trip through its stored JSON line.
        let line = serde_json::to_string(&records[2]).unwrap();
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.compute_hash(), records[2].hash);
    }

    #[test]
    fn every_kind_of_tampering_is_found() {
        let k = key();
        let pk = public(&k);
        let records = chain(6);
        let cps = vec![Checkpoint::sign(&k, "d1", 4, &records[4].hash, 9)];
        let check = |rs: &[Record]| verify_device("d1", rs, &cps, &pk, None).unwrap_err();

        let mut modified = records.clone();
        modified[2].verdict = Some("ok".into());
        assert_eq!(check(&modified).seq, 2);
        assert!(check(&modified).reason.contains("modified"));

        let mut deleted = records.clone();
        deleted.remove(3);
        assert_eq!(check(&deleted).seq, 3);

        let mut inserted = records.clone();
        let extra = Record {
            device: "d1".into(),
            ..Default::default()
        }
        .seal(3, 0, &records[2].hash);
        inserted.insert(3, extra);
        assert_eq!(check(&inserted).seq, 4);

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        assert_eq!(check(&reordered).seq, 1);

        // Truncated before the checkpoint: caught.
        let truncated = records[..3].to_vec();
        let f = check(&truncated);
        assert_eq!(f.seq, 3);
        assert!(f.reason.contains("truncated"));
        // Truncated after it: the chain alone cannot tell (documented limit).
        assert!(verify_device("d1", &records[..5], &cps, &pk, None).is_ok());

        // A consistently rewritten chain (all hashes recomputed) contradicts the checkpoint.
        let mut rewritten = records.clone();
        rewritten[1].verdict = Some("forged".into());
        for i in 1..rewritten.len() {
            if i > 1 {
                rewritten[i].prev = rewritten[i - 1].hash.clone();
            }
            rewritten[i].hash = rewritten[i].compute_hash();
        }
        assert!(check(&rewritten).reason.contains("signed checkpoint"));

        // A checkpoint signed by another key.
        let other = key();
        let forged = vec![Checkpoint::sign(&other, "d1", 4, &records[4].hash, 9)];
        assert!(verify_device("d1", &records, &forged, &pk, None)
            .unwrap_err()
            .reason
            .contains("signature"));
    }

    #[test]
    fn checkpoints_and_anchors_are_not_interchangeable() {
        let k = key();
        let pk = public(&k);
        let cp = Checkpoint::sign(&k, "d1", 3, "h", 1);
        let anchor = Checkpoint::sign_anchor(&k, "d1", 3, "h", 1);
        assert!(cp.verify(&pk) && !cp.verify_anchor(&pk));
        assert!(anchor.verify_anchor(&pk) && !anchor.verify(&pk));
    }

    #[test]
    fn an_anchor_starts_a_pruned_chain() {
        let k = key();
        let records = chain(6);
        let anchor = Anchor {
            seq: 2,
            hash: records[2].hash.clone(),
        };
        let v = verify_device("d1", &records[3..], &[], &public(&k), Some(&anchor)).unwrap();
        assert_eq!(v.records, 3);
        assert!(verify_device("d1", &records[4..], &[], &public(&k), Some(&anchor)).is_err());
    }

    #[test]
    fn redaction_and_truncation() {
        let v = json!({"id": 1, "command": "set_code", "code": "1234", "nested": [{"code": "9"}]});
        let (text, truncated, sha) = stored_payload(b"frame", &v, &["code".to_string()], 1000);
        assert!(!text.contains("1234") && !text.contains("\"9\""));
        assert!(text.contains(REDACTED));
        assert!(!truncated);
        assert_eq!(sha, sha256_hex(b"frame"));
        let (text, truncated, _) = stored_payload(b"x", &v, &[], 10);
        assert_eq!((text.len(), truncated), (10, true));
    }
}
