//! A configuration file written from a few choices: the one template the demo, the relay
//! benchmark (`gatehouse-sim config`) and the tests start from, so that they all exercise the
//! same shape of file. Paths are written as given (relative ones are relative to the file).

use std::fmt::Write;

/// One `[[route]]`.
#[derive(Debug, Clone)]
pub struct TemplateRoute {
    pub subprotocol: String,
    pub kind: String,
    pub device_types: Vec<String>,
    pub backends: Vec<String>,
}

/// What the file says; everything else keeps its default.
#[derive(Debug, Clone, Default)]
pub struct Template {
    pub listen: String,
    /// More `[server]` lines, e.g. `shutdown_grace_ms = 3000`.
    pub server: Vec<String>,
    /// A `gatehouse-pki` directory: server.pem, server.key, ca.pem, crl.pem (and audit.key,
    /// audit.pub with `audit`).
    pub pki_dir: String,
    pub registry: String,
    /// A whole `[cluster]` section, written in place of `[registry]`.
    pub cluster: Option<String>,
    pub schemas_dir: String,
    /// `[admin]`: listen address and token file.
    pub admin: Option<(String, String)>,
    /// `[audit]` with this directory, and more lines for it.
    pub audit: Option<(String, Vec<String>)>,
    pub routes: Vec<TemplateRoute>,
    /// `[limits]` lines, e.g. `frames_per_second = 1000`.
    pub limits: Vec<String>,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| quoted(i)).collect();
    format!("[{}]", items.join(", "))
}

impl Template {
    pub fn render(&self) -> String {
        let pki = |file: &str| quoted(&format!("{}/{file}", self.pki_dir));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "[server]\nlisten = {}", quoted(&self.listen));
        for line in &self.server {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "\n[tls]\ncert = {}\nkey = {}\nclient_ca = {}\ncrl = [{}]",
            pki("server.pem"),
            pki("server.key"),
            pki("ca.pem"),
            pki("crl.pem")
        );
        match &self.cluster {
            Some(section) => {
                let _ = writeln!(out, "\n{}", section.trim_end());
            }
            None => {
                let _ = writeln!(out, "\n[registry]\npath = {}", quoted(&self.registry));
            }
        }
        let _ = writeln!(out, "\n[schemas]\ndir = {}", quoted(&self.schemas_dir));
        if let Some((listen, token)) = &self.admin {
            let _ = writeln!(
                out,
                "\n[admin]\nlisten = {}\ntoken_file = {}",
                quoted(listen),
                quoted(token)
            );
        }
        if let Some((dir, lines)) = &self.audit {
            let _ = writeln!(
                out,
                "\n[audit]\ndir = {}\nsigning_key = {}\npublic_key = {}",
                quoted(dir),
                pki("audit.key"),
                pki("audit.pub")
            );
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        if !self.limits.is_empty() {
            let _ = writeln!(out, "\n[limits]");
            for line in &self.limits {
                let _ = writeln!(out, "{line}");
            }
        }
        for r in &self.routes {
            let _ = writeln!(
                out,
                "\n[[route]]\nsubprotocol = {}\nkind = {}\ndevice_types = {}\nbackends = {}",
                quoted(&r.subprotocol),
                quoted(&r.kind),
                list(&r.device_types),
                list(&r.backends)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_template_is_a_valid_configuration() {
        let t = Template {
            listen: "127.0.0.1:0".into(),
            server: vec!["shutdown_grace_ms = 3000".into()],
            pki_dir: "pki".into(),
            registry: "registry".into(),
            cluster: None,
            schemas_dir: "schemas \"quoted\"".into(),
            admin: None,
            audit: Some(("audit".into(), vec!["command_timeout_ms = 5000".into()])),
            routes: vec![TemplateRoute {
                subprotocol: "telemetry.v1".into(),
                kind: "telemetry".into(),
                device_types: vec!["env-sensor".into()],
                backends: vec!["ws://127.0.0.1:9001/ingest".into()],
            }],
            limits: vec!["frames_per_second = 1000".into()],
        };
        let file: crate::config::FileConfig = toml::from_str(&t.render()).unwrap();
        let c = crate::config::Config::from_file(file, std::path::Path::new("/srv")).unwrap();
        assert_eq!(c.shutdown_grace, std::time::Duration::from_secs(3));
        assert_eq!(
            c.runtime.schemas_dir,
            std::path::Path::new("/srv/schemas \"quoted\"")
        );
        assert_eq!(
            c.runtime.tls.crls,
            vec![std::path::PathBuf::from("/srv/pki/crl.pem")]
        );
        assert_eq!(
            c.runtime.commands.timeout,
            std::time::Duration::from_secs(5)
        );
        let frames = c.runtime.device_limits.defaults.frames.unwrap();
        assert_eq!(frames.per_second.get(), 1000);
    }
}
