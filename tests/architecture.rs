//! The layering, checked on the source: the pure core imports no I/O, no async runtime and
//! no clock, and imports nothing from the shell; and no two modules import each other, even
//! through others. `.ci/run` runs this with the rest of the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The pure core: decisions over plain data.
const CORE: &[&str] = &[
    "model.rs",
    "admission",
    "frames",
    "policy",
    "schema.rs",
    "wire.rs",
    "audit/record.rs",
];

/// What the core must not name: runtimes, sockets, files, storage, clocks, and the shell.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tungstenite",
    "sled",
    "std::fs",
    "fs::",
    "std::net",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "std::process",
    "thread::sleep",
    "Instant::now",
    "SystemTime::now",
    "now_utc",
    "crate::config",
    "crate::storage",
    "crate::net",
    "crate::session",
    "crate::admin",
    "crate::control",
    "crate::server",
    "crate::audit::writer",
    "crate::audit::reader",
    "axum",
    "ureq",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// The file's code outside comments and outside its test modules, which must come last.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // `#[cfg(test)] mod tests;` declares a test file (skipped whole); an inline
    // `#[cfg(test)] mod tests { ... }` starts the tests of this file.
    let inline_test = |i: usize| {
        lines[i].trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|l| !l.trim_end().ends_with(';'))
    };
    let end = match (0..lines.len()).find(|&i| inline_test(i)) {
        Some(at) => {
            // Every top-level item after the first test module is another test module.
            for i in (at..lines.len()).filter(|&i| lines[i] == "}") {
                let next = lines[i + 1..].iter().find(|l| !l.trim().is_empty());
                assert!(
                    next.is_none_or(|l| l.trim() == "#[cfg(test)]"),
                    "{}: test modules must be the last items of the file",
                    path.display()
                );
            }
            at
        }
        None => lines.len(),
    };
    lines[..end]
        .iter()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_core_imports_no_io_no_clock_and_no_shell() {
    let src = src();
    let mut files = Vec::new();
    for entry in CORE {
        let path = src.join(entry);
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path);
        }
    }
    assert!(files.len() >= 10, "found only {files:?}");
    let mut violations = Vec::new();
    for file in &files {
        let code = code(file);
        for word in FORBIDDEN {
            for (n, line) in code.lines().enumerate() {
                if line.contains(word) {
                    violations.push(format!(
                        "{}:{}: {word}: {}",
                        file.strip_prefix(&src).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "the pure core names I/O, a clock or the shell:\n{}",
        violations.join("\n")
    );
}

/// `src/a/b.rs` -> `a::b`; `src/a/mod.rs` -> `a`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The longest known module a path names (`a::b::Item` -> `a::b`).
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// Every `crate::...` and `super::...` path in the code, with the `use` groups expanded.
fn paths(module: &str, code: &str) -> Vec<String> {
    let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("");
    let mut out = Vec::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_string())] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':' || *c == '{')
                .collect();
            let path = path.trim_end_matches(['{', ':']);
            let full = if base.is_empty() {
                path.to_string()
            } else {
                format!("{base}::{path}")
            };
            out.push(full.clone());
            // `use crate::a::{b, c::D}`: each member too.
            if rest[path.len()..].starts_with("::{") {
                let group = &rest[path.len() + 3..];
                if let Some(end) = group.find('}') {
                    for member in group[..end].split(',') {
                        let m = member.trim().split(" as ").next().unwrap_or("").trim();
                        if !m.is_empty() && m != "self" {
                            out.push(format!("{full}::{m}"));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn no_module_imports_another_that_imports_it() {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| {
        let rel = f.strip_prefix(&src).unwrap();
        // The binary's own modules are not part of the library's layering.
        !rel.starts_with("main.rs") && !rel.starts_with("cli")
    });
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    assert!(modules.len() >= 20, "{modules:?}");
    // Two graphs: between top-level modules (`session` -> `storage`), and between the
    // files inside one (`session::steps` -> `session::relay`). A parent module's own
    // children (declared and re-exported there) are not imports of it.
    let top = |m: &str| m.split("::").next().unwrap_or("").to_string();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        for path in paths(&from, &code(file)) {
            let Some(to) = resolve(&path, &modules) else {
                continue;
            };
            if from.is_empty() || to == from || to.starts_with(&format!("{from}::")) {
                continue;
            }
            let (f, t) = if top(&from) == top(&to) {
                (from.clone(), to)
            } else {
                (top(&from), top(&to))
            };
            edges.entry(f).or_default().insert(t);
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    // The check sees the imports it should: sessions use the core and storage.
    assert!(
        edges["session"].contains("admission"),
        "{:?}",
        edges["session"]
    );
    assert!(edges["session"].contains("storage"));
    assert!(edges["session::steps"].contains("session::relay"));
}
