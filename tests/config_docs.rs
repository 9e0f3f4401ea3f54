//! docs/configuration.md names every key the configuration accepts, in its section's table.
//! The keys come from the parser itself: an unknown key makes serde list the ones it
//! expects, so a key added to the code without a line in the docs fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatehouse::config::{FileConfig, FileLimits};

/// The keys serde expects in a table, from its unknown-field error.
fn expected_keys(error: &str) -> Vec<String> {
    let list = error
        .split("expected one of ")
        .nth(1)
        .or_else(|| error.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no key list in {error:?}"));
    list.split(',')
        .filter_map(|k| k.trim().split('`').nth(1))
        .map(str::to_string)
        .collect()
}

fn keys_of(section: &str) -> Vec<String> {
    let text = format!("{section}\nzz_not_a_key = 1\n");
    let error = match toml::from_str::<FileConfig>(&text) {
        Ok(_) => panic!("{section} took an unknown key"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("zz_not_a_key"), "{section}: {error}");
    expected_keys(&error)
}

/// The part of the docs under the heading that starts with `heading`.
fn doc_section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no section {heading}"));
    let rest = &doc[start + 4..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The keys a section's tables name: every `code` in a row's first cell (`cert`, `key`
/// share a row; `[route.session]` names the table key `session`), for rows that also give a
/// default and a meaning.
fn documented_keys(section: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        assert!(
            cells.len() >= 3 && cells.iter().all(|c| !c.trim_matches('|').trim().is_empty()),
            "a row without a default or a meaning: {line}"
        );
        for name in cells[0].split('`').skip(1).step_by(2) {
            keys.push(
                name.trim_start_matches("[route.")
                    .trim_end_matches(']')
                    .to_string(),
            );
        }
    }
    keys
}

#[test]
fn every_configuration_key_is_documented_in_its_section() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let limits = match toml::from_str::<FileLimits>("zz_not_a_key = 1") {
        Ok(_) => panic!("[limits] took an unknown key"),
        Err(e) => expected_keys(&e.to_string()),
    };
    let sections: Vec<(&str, Vec<String>)> = vec![
        ("`[server]`", keys_of("[server]")),
        ("`[limits]`", limits),
        ("`[session]`", keys_of("[session]")),
        ("`[tls]`", keys_of("[tls]")),
        ("`[registry]`", keys_of("[registry]")),
        ("`[cluster]`", keys_of("[cluster]")),
        ("`[admin]`", keys_of("[admin]")),
        ("`[websocket]`", keys_of("[websocket]")),
        ("`[schemas]`", keys_of("[schemas]")),
        ("`[deadletter]`", keys_of("[deadletter]")),
        ("`[audit]`", keys_of("[audit]")),
        ("`[backend]`", keys_of("[backend]")),
        ("`[[route]]`", keys_of("[[route]]")),
        ("`[session]`", keys_of("[[route]]\n[route.session]")),
    ];
    let mut missing = Vec::new();
    for (heading, keys) in &sections {
        assert!(!keys.is_empty(), "{heading}: {keys:?}");
        let rows = documented_keys(doc_section(&doc, heading));
        for key in keys {
            if !rows.iter().any(|r| r == key) {
                missing.push(format!("{heading} {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md has no table row for: {missing:?}"
    );
}
