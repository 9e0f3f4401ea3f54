//! Reading the audit directory back, safe while the gateway writes to it: segment files and
//! the checkpoint and anchor files, verification of whole directories or one device, and the
//! self-contained export. The file format is `writer`'s; the record rules are `record`'s.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::record::{Anchor, Checkpoint, Failure, Record};
use super::AuditError;

pub(super) const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
pub(super) const ANCHORS_FILE: &str = "anchors.jsonl";

pub(super) fn io(path: &Path, e: impl ToString) -> AuditError {
    AuditError::Io(path.to_path_buf(), e.to_string())
}

/// Loads the Ed25519 signing key (PKCS#8 PEM, as written by `gatehouse-pki audit-key`).
pub fn load_signing_key(path: &Path) -> Result<aws_lc_rs::signature::Ed25519KeyPair, AuditError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
        .map_err(|e| AuditError::Key(path.to_path_buf(), e.to_string()))?;
    aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
        .map_err(|e| AuditError::Key(path.to_path_buf(), format!("not an Ed25519 key: {e}")))
}

/// Loads a public key file (`ed25519:HEX`).
pub fn load_public_key(path: &Path) -> Result<[u8; 32], AuditError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuditError::Key(path.to_path_buf(), e.to_string()))?;
    gatehouse_pki::parse_audit_public_key(&text).ok_or_else(|| {
        AuditError::Key(
            path.to_path_buf(),
            "expected one line `ed25519:` and 64 hex digits".into(),
        )
    })
}

pub(super) fn segment_name(n: u64) -> String {
    format!("segment-{n:08}.jsonl")
}

pub(super) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("segment-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Everything read back from an audit directory.
#[derive(Debug, Default)]
pub struct Contents {
    /// Records per device, in file order.
    pub records: BTreeMap<String, Vec<Record>>,
    pub checkpoints: Vec<Checkpoint>,
    /// Retention anchors: where each pruned chain now starts.
    pub anchors: Vec<Checkpoint>,
    /// Lines that are not records (file, line number, error).
    pub unreadable: Vec<(PathBuf, usize, String)>,
}

/// Reads lines of `path`; a last line without a newline (a write torn by a crash, or one in
/// progress) is skipped and its offset returned.
pub(super) fn read_lines(
    path: &Path,
    mut each: impl FnMut(usize, &str),
) -> Result<Option<u64>, AuditError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut offset = 0u64;
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(|e| io(path, e))?;
        if read == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') {
            return Ok(Some(offset));
        }
        n += 1;
        each(n, line.trim_end());
        offset += read as u64;
    }
}

/// Reads a whole audit directory (safe while the gateway writes to it).
pub fn read(dir: &Path) -> Result<Contents, AuditError> {
    read_filtered(dir, None)
}

/// Reads one device's records, checkpoints and anchors, segment by segment: memory grows with
/// that device's log, not with the directory. Lines of other devices are recognised by their
/// first field (records and checkpoints are written with `device` first) and skipped
/// unparsed.
pub fn read_device(dir: &Path, device: &str) -> Result<Contents, AuditError> {
    read_filtered(dir, Some(device))
}

fn read_filtered(dir: &Path, device: Option<&str>) -> Result<Contents, AuditError> {
    // `{"device":"ID",` exactly as serde_json writes it.
    let prefix = device.map(|d| format!("{{\"device\":{},", serde_json::Value::from(d)));
    let wanted = |line: &str| prefix.as_deref().is_none_or(|p| line.starts_with(p));
    let mut contents = Contents::default();
    for (_, path) in segments(dir)? {
        read_lines(&path, |n, line| {
            if !wanted(line) {
                return;
            }
            match serde_json::from_str::<Record>(line) {
                Ok(r) => contents
                    .records
                    .entry(r.device.clone())
                    .or_default()
                    .push(r),
                Err(e) => contents.unreadable.push((path.clone(), n, e.to_string())),
            }
        })?;
    }
    for (file, anchors) in [(CHECKPOINTS_FILE, false), (ANCHORS_FILE, true)] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        read_lines(&path, |n, line| {
            if !wanted(line) {
                return;
            }
            match serde_json::from_str::<Checkpoint>(line) {
                Ok(c) if anchors => contents.anchors.push(c),
                Ok(c) => contents.checkpoints.push(c),
                Err(e) => contents.unreadable.push((path.clone(), n, e.to_string())),
            }
        })?;
    }
    Ok(contents)
}

/// Where `device`'s chain starts: after the newest of its retention anchors (all of which
/// must verify with `public_key`), or at its first record when it has none.
fn chain_start(
    anchors: &[Checkpoint],
    device: &str,
    public_key: &[u8; 32],
) -> Result<Option<Anchor>, Failure> {
    let mut start: Option<Anchor> = None;
    for a in anchors.iter().filter(|a| a.device == device) {
        if !a.verify_anchor(public_key) {
            return Err(Failure {
                device: device.to_string(),
                seq: a.seq,
                reason: "retention anchor signature does not verify with this key".into(),
            });
        }
        if start.as_ref().is_none_or(|x| a.seq > x.seq) {
            start = Some(Anchor {
                seq: a.seq,
                hash: a.hash.clone(),
            });
        }
    }
    Ok(start)
}

/// The result of verifying a whole directory (or one device in it).
#[derive(Debug)]
pub struct DirVerdict {
    pub verified: Vec<super::record::Verified>,
    pub failures: Vec<super::record::Failure>,
}

/// Verifies every device (or just `device`) of an audit directory with the public key.
pub fn verify_dir(
    dir: &Path,
    public_key: &[u8; 32],
    device: Option<&str>,
) -> Result<DirVerdict, AuditError> {
    let contents = read_filtered(dir, device)?;
    let mut out = DirVerdict {
        verified: Vec::new(),
        failures: Vec::new(),
    };
    for (path, line, error) in &contents.unreadable {
        out.failures.push(super::record::Failure {
            device: "?".into(),
            seq: 0,
            reason: format!("{} line {line} is not a record ({error})", path.display()),
        });
    }
    let mut devices: Vec<&String> = contents.records.keys().collect();
    // A device with checkpoints but no records left was truncated (or pruned) to nothing.
    for cp in contents.checkpoints.iter().chain(&contents.anchors) {
        if !contents.records.contains_key(&cp.device) && !devices.contains(&&cp.device) {
            devices.push(&cp.device);
        }
    }
    let empty = Vec::new();
    for d in devices {
        if device.is_some_and(|want| want != d) {
            continue;
        }
        let records = contents.records.get(d).unwrap_or(&empty);
        let anchor = match chain_start(&contents.anchors, d, public_key) {
            Ok(a) => a,
            Err(f) => {
                out.failures.push(f);
                continue;
            }
        };
        match super::record::verify_device(
            d,
            records,
            &contents.checkpoints,
            public_key,
            anchor.as_ref(),
        ) {
            Ok(v) => out.verified.push(v),
            Err(f) => out.failures.push(f),
        }
    }
    Ok(out)
}

/// A self-contained export of one device's log, verifiable offline with the public key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub format: String,
    pub device: String,
    pub records: Vec<Record>,
    pub checkpoints: Vec<Checkpoint>,
    /// Retention anchors (where the chain starts when older records were pruned).
    #[serde(default)]
    pub anchors: Vec<Checkpoint>,
}

pub const EXPORT_FORMAT: &str = "gatehouse-audit-export/v1";

pub fn export(dir: &Path, device: &str) -> Result<Export, AuditError> {
    let mut contents = read_device(dir, device)?;
    Ok(Export {
        format: EXPORT_FORMAT.into(),
        device: device.to_string(),
        records: contents.records.remove(device).unwrap_or_default(),
        checkpoints: contents.checkpoints,
        anchors: contents.anchors,
    })
}

/// Verifies an export file's contents.
pub fn verify_export(
    export: &Export,
    public_key: &[u8; 32],
) -> Result<super::record::Verified, super::record::Failure> {
    if export.format != EXPORT_FORMAT {
        return Err(super::record::Failure {
            device: export.device.clone(),
            seq: 0,
            reason: format!("not a {EXPORT_FORMAT} file"),
        });
    }
    let anchor = chain_start(&export.anchors, &export.device, public_key)?;
    super::record::verify_device(
        &export.device,
        &export.records,
        &export.checkpoints,
        public_key,
        anchor.as_ref(),
    )
}
