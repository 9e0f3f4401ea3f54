//! Reading the schema directory the config names: every `<type>/<kind>.schema.json` under
//! it, compiled into one [`SchemaSet`] (all or nothing).

use std::path::Path;

use crate::schema::{SchemaError, SchemaKind, SchemaSet};

/// Loads every `<type>/<kind>.schema.json` under `dir`.
pub fn load_schemas(dir: &Path) -> Result<SchemaSet, SchemaError> {
    let dir_err = |source| SchemaError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let mut set = SchemaSet::default();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(dir_err)?
        .collect::<Result<_, _>>()
        .map_err(dir_err)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        set.add_type(&name, &path)?;
        for kind in SchemaKind::ALL {
            let file = path.join(kind.file_name());
            if !file.exists() {
                continue;
            }
            let bytes = std::fs::read(&file).map_err(|e| SchemaError::File {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            set.add(&name, kind, &file, &bytes)?;
        }
    }
    Ok(set)
}
