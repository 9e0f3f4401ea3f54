//! Routing policy: which route (subprotocol, kind, allowed device types, backend pool) a
//! device gets, given the subprotocols it offers and its registered type. Pure: no I/O.
//! Connecting to a backend of the chosen route is `net::backend`'s job.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use crate::model::SessionTimers;
use crate::schema::{SchemaKind, SchemaSet};

pub use crate::model::RouteKind;

/// One backend URL of a route's pool, parsed once at config time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BackendUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("backend {text:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("backend {text:?} must start with ws:// or wss://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("backend {text:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self {
            url: text.to_string(),
            tls,
            host,
            port,
        })
    }
}

impl std::fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// What a route does with invalid frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRules {
    /// Send the sender an error frame for each rejected frame.
    pub error_replies: bool,
    /// Invalid frames from a device allowed per window; one more closes with 1007.
    pub invalid_frame_limit: u32,
    pub invalid_frame_window: Duration,
}

/// What a route does when a device that already has a session on it connects again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePolicy {
    /// The newcomer, once admitted, ends the older sessions (close 4007).
    Takeover,
    /// The newcomer is refused with 409 while a session is open.
    Reject,
    /// Up to this many sessions at once; one more is refused with 409.
    Allow(usize),
}

impl DuplicatePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DuplicatePolicy::Takeover => "takeover",
            DuplicatePolicy::Reject => "reject",
            DuplicatePolicy::Allow(_) => "allow",
        }
    }
}

/// A route's settings besides its frames: session timers, duplicates, headers passed on.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOptions {
    pub frames: FrameRules,
    pub timers: SessionTimers,
    pub duplicates: DuplicatePolicy,
    /// Request headers of the device passed on to the backend (lower case, `_` folded to
    /// `-`); nothing else is, apart from what the WebSocket handshake needs.
    pub forward_headers: Vec<String>,
    /// `false`: an opaque route. Frames pass unchanged and undecoded (still under the size
    /// and rate limits), and no schema is needed. Telemetry routes only.
    pub validate: bool,
    /// `true`: a session continues the device's W3C trace (its `traceparent`) instead of
    /// starting a new one.
    pub continue_trace: bool,
}

/// A header name as backends compare it: lower case, `_` read as `-` (many stacks fold it).
pub fn fold_header_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A subprotocol's route.
#[derive(Debug)]
pub struct Route {
    pub subprotocol: String,
    pub kind: RouteKind,
    pub device_types: Vec<String>,
    pub backends: Vec<BackendUrl>,
    pub frames: FrameRules,
    pub timers: SessionTimers,
    pub duplicates: DuplicatePolicy,
    pub forward_headers: Vec<String>,
    pub validate: bool,
    pub continue_trace: bool,
    next_backend: AtomicUsize,
}

/// RFC 6455 section 4.1: a subprotocol is an RFC 2616 token.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Route {
    pub fn parse(
        subprotocol: &str,
        kind: &str,
        device_types: &[String],
        backends: &[String],
        options: RouteOptions,
    ) -> Result<Self, String> {
        if !is_token(subprotocol) {
            return Err("subprotocol must be a token (letters, digits and !#$%&'*+-.^_`|~)".into());
        }
        let kind = match kind {
            "telemetry" => RouteKind::Telemetry,
            "control" => RouteKind::Control,
            other => {
                return Err(format!(
                    "kind = {other:?}: use \"telemetry\" or \"control\""
                ))
            }
        };
        if device_types.is_empty() {
            return Err(
                "device_types is empty: list the device types allowed on this route".into(),
            );
        }
        for t in device_types {
            gatehouse_pki::validate_device_type(t).map_err(|e| e.to_string())?;
        }
        if backends.is_empty() {
            return Err("backends is empty: list at least one ws:// or wss:// URL".into());
        }
        if !options.validate && kind == RouteKind::Control {
            return Err(
                "validate = false is for telemetry routes: a control route reads command ids for the audit log"
                    .into(),
            );
        }
        let backends = backends
            .iter()
            .map(|b| BackendUrl::parse(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            subprotocol: subprotocol.to_string(),
            kind,
            device_types: device_types.to_vec(),
            backends,
            frames: options.frames,
            timers: options.timers,
            duplicates: options.duplicates,
            forward_headers: options
                .forward_headers
                .iter()
                .map(|h| fold_header_name(h))
                .collect(),
            validate: options.validate,
            continue_trace: options.continue_trace,
            next_backend: AtomicUsize::new(0),
        })
    }

    /// Whether the route passes the device's request header `name` on to the backend.
    pub fn forwards_header(&self, name: &str) -> bool {
        let name = fold_header_name(name);
        self.forward_headers.contains(&name)
    }

    pub fn allows(&self, device_type: &str) -> bool {
        self.device_types.iter().any(|t| t == device_type)
    }

    pub fn uses_tls(&self) -> bool {
        self.backends.iter().any(|b| b.tls)
    }

    /// The pool in the order to try for the next connection: round-robin start, then the rest.
    pub fn backend_order(&self) -> impl Iterator<Item = &BackendUrl> {
        let n = self.backends.len();
        let start = self.next_backend.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(move |i| &self.backends[(start + i) % n])
    }
}

/// Why no route was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute {
    /// The subprotocols this device's type may use, in config order.
    pub allowed: Vec<String>,
}

/// All routes, in config order.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// Every (route, device type, file) a route needs but `schemas` lacks.
    pub fn missing_schemas(&self, schemas: &SchemaSet) -> Vec<(String, String, &'static str)> {
        let mut out = Vec::new();
        for route in self.routes.iter().filter(|r| r.validate) {
            let kind = SchemaKind::required_by(route.kind);
            for t in &route.device_types {
                if schemas.get(t, kind).is_none() {
                    out.push((route.subprotocol.clone(), t.clone(), kind.file_name()));
                }
            }
        }
        out
    }

    /// The first subprotocol the device offers that its type may use.
    pub fn select<'a>(
        &self,
        offered: impl IntoIterator<Item = &'a str>,
        device_type: &str,
    ) -> Result<Arc<Route>, NoRoute> {
        for proto in offered {
            if let Some(route) = self
                .routes
                .iter()
                .find(|r| r.subprotocol == proto && r.allows(device_type))
            {
                return Ok(route.clone());
            }
        }
        Err(NoRoute {
            allowed: self
                .routes
                .iter()
                .filter(|r| r.allows(device_type))
                .map(|r| r.subprotocol.clone())
                .collect(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::PingRules;

    /// Route options for tests elsewhere in the crate.
    pub(crate) fn options(frames: FrameRules) -> RouteOptions {
        let ping = PingRules {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        };
        RouteOptions {
            frames,
            timers: SessionTimers {
                device_ping: ping,
                backend_ping: ping,
                idle_timeout: None,
                max_lifetime: None,
                lifetime_jitter: 0.0,
                write_timeout: Duration::from_secs(30),
            },
            duplicates: DuplicatePolicy::Allow(usize::MAX),
            forward_headers: Vec::new(),
            validate: true,
            continue_trace: false,
        }
    }

    const RULES: FrameRules = FrameRules {
        error_replies: true,
        invalid_frame_limit: 20,
        invalid_frame_window: Duration::from_secs(10),
    };

    fn table() -> RouteTable {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        RouteTable::new(vec![
            Route::parse(
                "telemetry.v1",
                "telemetry",
                &s(&["sensor", "lock"]),
                &s(&["ws://a:1/", "ws://b:2/"]),
                options(RULES),
            )
            .unwrap(),
            Route::parse(
                "control.v1",
                "control",
                &s(&["lock"]),
                &s(&["wss://c/"]),
                options(RULES),
            )
            .unwrap(),
        ])
    }

    #[test]
    fn first_usable_offer_wins() {
        let t = table();
        assert_eq!(
            t.select(["control.v1", "telemetry.v1"], "lock")
                .unwrap()
                .subprotocol,
            "control.v1"
        );
        assert_eq!(
            t.select(["control.v1", "telemetry.v1"], "sensor")
                .unwrap()
                .subprotocol,
            "telemetry.v1"
        );
        assert_eq!(
            t.select(["x", "telemetry.v1"], "sensor").unwrap().kind,
            RouteKind::Telemetry
        );
    }

    #[test]
    fn refusal_names_what_the_type_may_use() {
        let t = table();
        assert_eq!(
            t.select(["control.v1"], "sensor").unwrap_err().allowed,
            vec!["telemetry.v1"]
        );
        assert_eq!(
            t.select([], "lock").unwrap_err().allowed,
            vec!["telemetry.v1", "control.v1"]
        );
        assert!(t
            .select(["telemetry.v1"], "unknown")
            .unwrap_err()
            .allowed
            .is_empty());
    }

    #[test]
    fn round_robin_visits_every_backend() {
        let t = table();
        let r = t.select(["telemetry.v1"], "sensor").unwrap();
        let first: Vec<_> = r.backend_order().map(|b| b.port).collect();
        let second: Vec<_> = r.backend_order().map(|b| b.port).collect();
        assert_eq!(first, vec![1, 2]);
        assert_eq!(second, vec![2, 1]);
    }

    #[test]
    fn header_allow_list_folds_underscores() {
        let mut o = options(RULES);
        o.forward_headers = vec!["User_Agent".into(), "x-trace-id".into()];
        let r = Route::parse("t.v1", "telemetry", &["s".into()], &["ws://a/".into()], o).unwrap();
        assert!(r.forwards_header("user-agent"));
        assert!(r.forwards_header("X_Trace_Id"));
        assert!(!r.forwards_header("x-forwarded-for"));
    }

    #[test]
    fn backend_urls() {
        let b = BackendUrl::parse("wss://[::1]/x").unwrap();
        assert!(b.tls);
        assert_eq!((b.host.as_str(), b.port), ("::1", 443));
        assert!(BackendUrl::parse("http://x/").is_err());
        assert!(BackendUrl::parse("ws:///x").is_err());
        assert!(!is_token("a b"));
        assert!(is_token("telemetry.v1"));
    }
}
