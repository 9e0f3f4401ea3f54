//! Per-device-type schemas, pure: the compiled set of `<type>/{telemetry,command,response}`
//! schemas (JSON Schema 2020-12, `jsonschema`, compiled once), and validation of decoded
//! frames. Reading the schema directory is `config::load_schemas`'s job; a whole set is
//! built or none is, so a broken file on reload leaves the previous set in force. Decoding
//! the frame is `frames`'s job; which schema a frame needs is `policy`'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::frames::{RejectCode, Rejection};
use crate::model::RouteKind;

/// Longest validation message sent back in an error frame.
pub const MAX_MESSAGE_BYTES: usize = 200;

/// Which of a type's schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaKind {
    /// Device to backend on telemetry routes.
    Telemetry,
    /// Backend to device on control routes.
    Command,
    /// Device to backend on control routes (optional).
    Response,
}

impl SchemaKind {
    pub const ALL: [SchemaKind; 3] = [
        SchemaKind::Telemetry,
        SchemaKind::Command,
        SchemaKind::Response,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            SchemaKind::Telemetry => "telemetry.schema.json",
            SchemaKind::Command => "command.schema.json",
            SchemaKind::Response => "response.schema.json",
        }
    }

    /// The schema a route of `kind` cannot do without.
    pub fn required_by(kind: RouteKind) -> SchemaKind {
        match kind {
            RouteKind::Telemetry => SchemaKind::Telemetry,
            RouteKind::Control => SchemaKind::Command,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("schema file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// Every compiled schema, by device type.
#[derive(Default)]
pub struct SchemaSet {
    types: BTreeMap<String, BTreeMap<SchemaKind, jsonschema::Validator>>,
}

impl std::fmt::Debug for SchemaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (t, kinds) in &self.types {
            m.entry(t, &kinds.keys().collect::<Vec<_>>());
        }
        m.finish()
    }
}

impl SchemaSet {
    /// Compiles one schema file's bytes (`origin` names it in errors) and adds it for
    /// `device_type`; a type with no schema file at all is added with [`SchemaSet::add_type`].
    pub fn add(
        &mut self,
        device_type: &str,
        kind: SchemaKind,
        origin: &Path,
        bytes: &[u8],
    ) -> Result<(), SchemaError> {
        let validator = compile(origin, bytes)?;
        self.types
            .entry(device_type.to_string())
            .or_default()
            .insert(kind, validator);
        Ok(())
    }

    /// Adds a device type (a directory), whether or not it has schemas. The name must be a
    /// valid device type.
    pub fn add_type(&mut self, device_type: &str, origin: &Path) -> Result<(), SchemaError> {
        if gatehouse_pki::validate_device_type(device_type).is_err() {
            return Err(SchemaError::File {
                path: origin.to_path_buf(),
                reason: "directory name is not a valid device type (a-z 0-9 _ -, starting with a letter)".into(),
            });
        }
        self.types.entry(device_type.to_string()).or_default();
        Ok(())
    }

    pub fn get(&self, device_type: &str, kind: SchemaKind) -> Option<&jsonschema::Validator> {
        self.types.get(device_type)?.get(&kind)
    }

    pub fn device_types(&self) -> impl Iterator<Item = (&String, Vec<SchemaKind>)> {
        self.types
            .iter()
            .map(|(t, k)| (t, k.keys().copied().collect()))
    }
}

fn compile(file: &Path, text: &[u8]) -> Result<jsonschema::Validator, SchemaError> {
    let err = |reason: String| SchemaError::File {
        path: file.to_path_buf(),
        reason,
    };
    let schema: Value = serde_json::from_slice(text).map_err(|e| err(format!("not JSON: {e}")))?;
    jsonschema::draft202012::options()
        .build(&schema)
        .map_err(|e| err(format!("not a valid JSON Schema 2020-12: {e}")))
}

/// Validates a decoded frame; the rejection names the first failing place.
pub fn validate(validator: &jsonschema::Validator, value: &Value) -> Result<(), Rejection> {
    if validator.is_valid(value) {
        return Ok(());
    }
    match validator.validate(value) {
        Ok(()) => Ok(()),
        Err(e) => {
            let mut message = e.to_string();
            if message.len() > MAX_MESSAGE_BYTES {
                let mut cut = MAX_MESSAGE_BYTES;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push_str("...");
            }
            Err(Rejection::new(
                RejectCode::SchemaViolation,
                e.instance_path().to_string(),
                message,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shipped schemas compile, and there is at least one type with each kind of schema.
    #[test]
    fn shipped_schemas_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let set = crate::config::load_schemas(&dir).unwrap();
        let types: Vec<_> = set.device_types().collect();
        assert!(types.len() >= 2, "{types:?}");
        for kind in SchemaKind::ALL {
            assert!(
                types.iter().any(|(_, k)| k.contains(&kind)),
                "no {kind:?} schema shipped"
            );
        }
    }

    #[test]
    fn validation_names_the_failing_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("thermo")).unwrap();
        std::fs::write(
            dir.path().join("thermo/telemetry.schema.json"),
            r#"{"type":"object","required":["t"],"properties":{"t":{"type":"number","minimum":-40}}}"#,
        )
        .unwrap();
        let set = crate::config::load_schemas(dir.path()).unwrap();
        let v = set.get("thermo", SchemaKind::Telemetry).unwrap();
        assert!(validate(v, &json!({"t": 3})).is_ok());
        let r = validate(v, &json!({"t": -41})).unwrap_err();
        assert_eq!(
            (r.code, r.pointer.as_str()),
            (RejectCode::SchemaViolation, "/t")
        );
        assert!(set.get("thermo", SchemaKind::Command).is_none());
    }

    #[test]
    fn a_broken_file_fails_the_whole_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("thermo")).unwrap();
        std::fs::write(
            dir.path().join("thermo/telemetry.schema.json"),
            r#"{"type":"objekt"}"#,
        )
        .unwrap();
        let err = crate::config::load_schemas(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.schema.json"), "{err}");
        std::fs::write(dir.path().join("thermo/telemetry.schema.json"), "{").unwrap();
        assert!(crate::config::load_schemas(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
    }
}
