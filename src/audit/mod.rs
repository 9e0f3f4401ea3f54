//! The per-device command audit log: the record format, hash chain, checkpoints and
//! verification ([`record`], pure), the writer thread that appends segment files with group
//! commit ([`writer`]), and reading, verifying and exporting the files ([`reader`]). The
//! sessions and the server see the log through [`AuditStore`], so a replicated log is a
//! second implementation; docs/audit.md describes the scheme.

pub mod reader;
pub mod record;
pub mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

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

/// A future an [`AuditStore`] answers with.
pub type AuditFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where the command audit log is written. The embedded implementation is [`AuditLog`]
/// (segment files, one writer thread); every method returns at once or as a future, never
/// blocking a session.
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Queues a record for the device's chain (sealed by the store); on disk shortly.
    fn record(&self, record: Record);
    /// Writes a record and resolves once it is durable: what a command waits for before it
    /// is forwarded.
    fn record_durable(&self, record: Record) -> AuditFuture<Result<Record, AuditError>>;
    /// Makes everything queued durable and signs checkpoints; whether all of it is.
    fn sync(&self) -> AuditFuture<bool>;
    /// Like `sync`, then stops taking records (at shutdown).
    fn close(&self) -> AuditFuture<bool>;
    /// Whether the last write succeeded.
    fn is_healthy(&self) -> bool;
    /// Records lost since start (should stay 0).
    fn lost(&self) -> u64;
    /// One device's records and checkpoints, as a self-contained export.
    fn export(&self, device: &str) -> AuditFuture<Result<Export, AuditError>>;
    /// The devices that have records, sorted.
    fn devices(&self) -> AuditFuture<Result<Vec<String>, AuditError>>;
    /// Verifies every device's chain (or one) and its checkpoints with `public_key`.
    fn verify(
        &self,
        public_key: [u8; 32],
        device: Option<String>,
    ) -> AuditFuture<Result<DirVerdict, AuditError>>;
}
