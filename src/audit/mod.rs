//! The per-device command audit log: the record format, hash chain, checkpoints and
//! verification ([`record`], pure), the writer thread that appends segment files with group
//! commit ([`writer`]), and reading, verifying and exporting the files ([`reader`]). The
//! sessions see the log through [`AuditSink`]; docs/audit.md describes the scheme.

pub mod reader;
pub mod record;
pub mod writer;

use std::path::PathBuf;

pub use reader::{
    export, load_public_key, load_signing_key, read, read_device, verify_dir, verify_export,
    Contents, DirVerdict, Export, EXPORT_FORMAT,
};
pub use record::{
    redact, stored_payload, verify_device, Anchor, Checkpoint, Failure, Record, RecordKind,
    Verified, GENESIS, REDACTED,
};
pub use writer::{AuditLog, WriterConfig};

#[derive(Debug, thiserror::Error, Clone)]
pub enum AuditError {
    #[error("audit log {0}: {1}")]
    Io(PathBuf, String),
    #[error("audit log cannot be written: {0}")]
    Unavailable(String),
    #[error("audit log queue is full")]
    Busy,
    #[error("audit log writer stopped")]
    Stopped,
    #[error("audit signing key {0}: {1}")]
    Key(PathBuf, String),
}
