//! Prometheus metrics (`GET /metrics` on the admin listener, OpenMetrics text), through
//! `prometheus-client`: one [`Metrics`] per gateway, no global recorder, so every gateway
//! in a process (tests run several) has its own.
//!
//! Two kinds of metric:
//! - **Events** counted where they happen, on handles resolved once (a session resolves its
//!   route's frame counters at its start; the relay adds to them once per wake, not per
//!   frame): handshakes by outcome, sessions opened and ended, frames and bytes, duplicates,
//!   backend connects, commands, audit writes, dead letters, reloads.
//! - **State** read when scraped from what the gateway already keeps (one source of truth
//!   with the admin API): validation failures and limit hits (the stats behind
//!   `/v1/stats/*`), the registry by status, backend health, budgets in use, CRL times.
//!
//! No label carries a device id: per-device detail is the admin API's. Label values are
//! bounded: routes and device types come from the configuration and the registry, reasons
//! and outcomes are the gateway's own codes, close codes outside the known ones are `other`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Backend connect time buckets, milliseconds: loopback to a slow remote pool.
const CONNECT_MS: [f64; 12] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
];
/// Command round trip buckets, milliseconds.
const COMMAND_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];
/// Audit write (append + fsync) buckets, microseconds.
const AUDIT_US: [f64; 12] = [
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0, 250000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteType {
    pub route: String,
    pub device_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteDirection {
    pub route: String,
    /// `up` (device to backend) or `down`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ended {
    pub route: String,
    pub code: String,
    /// Who ended it: `device`, `backend` or `gateway`.
    pub side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteAction {
    pub route: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reload {
    /// `config`, `tls` or `schemas`.
    pub what: String,
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn connect_histogram() -> Histogram {
    Histogram::new(CONNECT_MS)
}

/// The event metrics of one gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub handshakes: Family<Outcome, Counter>,
    pub closed_at_accept: Family<Limit, Counter>,
    pub sessions_open: Family<RouteType, Gauge>,
    pub sessions_opened: Family<RouteType, Counter>,
    pub sessions_ended: Family<Ended, Counter>,
    pub frames: Family<RouteDirection, Counter>,
    pub bytes: Family<RouteDirection, Counter>,
    pub duplicates: Family<RouteAction, Counter>,
    pub backend_connect_ms: Histograms<Route>,
    pub backend_connect_failures: Family<Route, Counter>,
    pub backend_ejections: Counter,
    pub command_round_trip_ms: Histogram,
    pub commands: Family<Outcome, Counter>,
    pub audit_records: Counter,
    pub audit_write_us: Histogram,
    pub audit_write_failures: Counter,
    pub reloads: Family<Reload, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let m = Self {
            registry: Registry::default(),
            handshakes: Family::default(),
            closed_at_accept: Family::default(),
            sessions_open: Family::default(),
            sessions_opened: Family::default(),
            sessions_ended: Family::default(),
            frames: Family::default(),
            bytes: Family::default(),
            duplicates: Family::default(),
            backend_connect_ms: Family::new_with_constructor(connect_histogram),
            backend_connect_failures: Family::default(),
            backend_ejections: Counter::default(),
            command_round_trip_ms: Histogram::new(COMMAND_MS),
            commands: Family::default(),
            audit_records: Counter::default(),
            audit_write_us: Histogram::new(AUDIT_US),
            audit_write_failures: Counter::default(),
            reloads: Family::default(),
        };
        registry.register(
            "handshakes",
            "Device connections by how their handshake ended: ok, a refusal code (unknown-device, device-suspended, no-route, backend-unavailable, over-capacity, draining, ...), tls-failed, bad-certificate, timeout, incomplete",
            m.handshakes.clone(),
        );
        registry.register(
            "connections_closed_at_accept",
            "Connections closed at accept, before TLS, by the budget they were over",
            m.closed_at_accept.clone(),
        );
        registry.register(
            "sessions_open",
            "Sessions open now",
            m.sessions_open.clone(),
        );
        registry.register(
            "sessions_opened",
            "Sessions upgraded",
            m.sessions_opened.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions ended, by close code and the side that ended them",
            m.sessions_ended.clone(),
        );
        registry.register(
            "frames_forwarded",
            "Data frames forwarded, by route and direction (up: device to backend)",
            m.frames.clone(),
        );
        registry.register_with_unit(
            "payload_forwarded",
            "Payload bytes forwarded, by route and direction",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "duplicate_sessions",
            "A device's second session on a route: takeover (the older one closed), reject (409)",
            m.duplicates.clone(),
        );
        registry.register(
            "backend_connect_milliseconds",
            "Time to connect a backend (TCP, TLS, upgrade), successful connects",
            m.backend_connect_ms.clone(),
        );
        registry.register(
            "backend_connect_failures",
            "Backend connects that failed (each backend tried counts)",
            m.backend_connect_failures.clone(),
        );
        registry.register(
            "backend_ejections",
            "Backends ejected after failed connects (passive health)",
            m.backend_ejections.clone(),
        );
        registry.register(
            "command_round_trip_milliseconds",
            "Command sent to a device until its answer",
            m.command_round_trip_ms.clone(),
        );
        registry.register(
            "commands",
            "Commands to devices by outcome: answered, timed_out, unanswered (session ended first)",
            m.commands.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records written (durable)",
            m.audit_records.clone(),
        );
        registry.register(
            "audit_write_microseconds",
            "Audit append until durable",
            m.audit_write_us.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit writes that failed (commands are refused meanwhile)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "reloads",
            "Reloads by what was reloaded and result",
            m.reloads.clone(),
        );
        // Series that should read 0 rather than be missing before their first event, so
        // that rates and alerts work from the start.
        m.handshake_outcome("ok");
        for limit in [
            "max_handshakes",
            "source_connections",
            "source_handshakes_per_second",
        ] {
            let _ = m.closed_at_accept.get_or_create(&Limit {
                limit: limit.to_string(),
            });
        }
        for outcome in ["answered", "timed_out", "unanswered"] {
            let _ = m.commands.get_or_create(&Outcome {
                outcome: outcome.to_string(),
            });
        }
        Self { registry, ..m }
    }

    /// Zero-initialises what a route will count: connect failures and latency.
    pub fn route(&self, route: &str) {
        let route = Route {
            route: route.to_string(),
        };
        let _ = self.backend_connect_failures.get_or_create(&route);
        let _ = self.backend_connect_ms.get_or_create(&route);
    }

    fn handshake_outcome(&self, outcome: &str) -> Counter {
        self.handshakes.get_or_create_owned(&Outcome {
            outcome: outcome.to_string(),
        })
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, outcome: &str) {
        self.handshake_outcome(outcome).inc();
    }

    pub fn reload(&self, what: &str, ok: bool) {
        self.reloads
            .get_or_create(&Reload {
                what: what.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    pub fn command(&self, outcome: &str) {
        self.commands
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The handles one session adds to.
    pub fn session(self: &Arc<Self>, route: &str, device_type: &str) -> SessionMetrics {
        let key = RouteType {
            route: route.to_string(),
            device_type: device_type.to_string(),
        };
        self.sessions_opened.get_or_create(&key).inc();
        let open = self.sessions_open.get_or_create_owned(&key);
        open.inc();
        let dir = |direction: &str| RouteDirection {
            route: route.to_string(),
            direction: direction.to_string(),
        };
        SessionMetrics {
            metrics: self.clone(),
            route: route.to_string(),
            open,
            frames_up: self.frames.get_or_create_owned(&dir("up")),
            frames_down: self.frames.get_or_create_owned(&dir("down")),
            bytes_up: self.bytes.get_or_create_owned(&dir("up")),
            bytes_down: self.bytes.get_or_create_owned(&dir("down")),
        }
    }

    /// The text exposition: these event metrics, then `state` (metrics read at scrape time).
    pub fn render(&self, state: &Registry) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, state);
        let _ = encode_eof(&mut out);
        out
    }
}

/// What the gateway keeps that is exported as it is when scraped.
#[derive(Debug, Default, Clone)]
pub struct State {
    /// Validation failures: (device type, route, reason, count).
    pub validation_failures: Vec<(String, String, String, u64)>,
    /// Limit hits: (device type, route, `limit:action`, count); type and route `-` for
    /// budgets checked before a device is known.
    pub limit_hits: Vec<(String, String, String, u64)>,
    /// Registry size by status.
    pub devices: Vec<(String, u64)>,
    /// Backends in the routes, and how many of them are ejected now.
    pub backends: u64,
    pub backends_ejected: u64,
    /// Session and handshake budgets: in use and configured.
    pub sessions_in_use: u64,
    pub sessions_max: u64,
    pub handshakes_in_progress: u64,
    pub handshakes_max: u64,
    pub deadletters_stored: u64,
    pub deadletters_dropped: u64,
    /// CRLs loaded, seconds since the oldest this-update, seconds to the earliest
    /// next-update (negative once past it).
    pub crls: u64,
    pub crl_age_seconds: Option<i64>,
    pub crl_next_update_seconds: Option<i64>,
    pub draining: bool,
    /// `None` without an audit log.
    pub audit_healthy: Option<bool>,
    pub audit_lost: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeRouteReason {
    device_type: String,
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeRouteLimit {
    device_type: String,
    route: String,
    limit: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

impl State {
    /// These values as metrics (a registry built for one scrape).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("gatehouse");
        let failures = Family::<TypeRouteReason, Counter>::default();
        for (t, route, reason, n) in &self.validation_failures {
            failures
                .get_or_create(&TypeRouteReason {
                    device_type: t.clone(),
                    route: route.clone(),
                    reason: reason.clone(),
                })
                .inc_by(*n);
        }
        r.register(
            "validation_failures",
            "Frames refused by decoding or the type's schema, by device type, route and reason",
            failures,
        );
        let hits = Family::<TypeRouteLimit, Counter>::default();
        for (t, route, key, n) in &self.limit_hits {
            let (limit, action) = key.split_once(':').unwrap_or((key.as_str(), "close"));
            hits.get_or_create(&TypeRouteLimit {
                device_type: t.clone(),
                route: route.clone(),
                limit: limit.to_string(),
                action: action.to_string(),
            })
            .inc_by(*n);
        }
        r.register(
            "limit_hits",
            "Limits hit, by device type, route, limit (its configuration key) and action (delay, reject, close)",
            hits,
        );
        let devices = Family::<Status, Gauge>::default();
        for (status, n) in &self.devices {
            devices
                .get_or_create(&Status {
                    status: status.clone(),
                })
                .set(*n as i64);
        }
        r.register(
            "registry_devices",
            "Devices in the registry, by status",
            devices,
        );
        let gauge = |r: &mut Registry, name: &str, help: &str, v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            r.register(name, help, g);
        };
        gauge(
            &mut r,
            "backends",
            "Backends named by the routes",
            self.backends as i64,
        );
        gauge(
            &mut r,
            "backends_ejected",
            "Backends ejected from their pools now (passive health)",
            self.backends_ejected as i64,
        );
        gauge(
            &mut r,
            "session_slots_in_use",
            "Session slots taken (server.max_connections)",
            self.sessions_in_use as i64,
        );
        gauge(
            &mut r,
            "session_slots",
            "Session slots configured (server.max_connections)",
            self.sessions_max as i64,
        );
        gauge(
            &mut r,
            "handshakes_in_progress",
            "Handshakes in progress (server.max_handshakes slots taken)",
            self.handshakes_in_progress as i64,
        );
        gauge(
            &mut r,
            "handshake_slots",
            "Handshake slots configured (server.max_handshakes)",
            self.handshakes_max as i64,
        );
        let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            r.register(name, help, c);
        };
        counter(
            &mut r,
            "deadletters_stored",
            "Rejected frames kept in the dead-letter store",
            self.deadletters_stored,
        );
        counter(
            &mut r,
            "deadletters_dropped",
            "Rejected frames not kept (queue full or store failing)",
            self.deadletters_dropped,
        );
        gauge(&mut r, "crls", "CRLs loaded", self.crls as i64);
        if let Some(age) = self.crl_age_seconds {
            gauge(
                &mut r,
                "crl_age_seconds",
                "Seconds since the oldest loaded CRL was issued (its this-update)",
                age,
            );
        }
        if let Some(next) = self.crl_next_update_seconds {
            gauge(
                &mut r,
                "crl_next_update_seconds",
                "Seconds until the earliest next-update of the loaded CRLs; negative once past",
                next,
            );
        }
        gauge(
            &mut r,
            "draining",
            "1 while the gateway drains",
            i64::from(self.draining),
        );
        if let Some(healthy) = self.audit_healthy {
            gauge(
                &mut r,
                "audit_healthy",
                "1 while the audit log is writable (commands are refused otherwise)",
                i64::from(healthy),
            );
            counter(
                &mut r,
                "audit_records_lost",
                "Audit records lost (retry queue overflow while the log was failing)",
                self.audit_lost,
            );
        }
        r
    }
}

/// One session's metric handles: the open-sessions gauge (decremented when dropped) and its
/// route's frame counters.
#[derive(Debug)]
pub struct SessionMetrics {
    metrics: Arc<Metrics>,
    route: String,
    open: Gauge,
    pub frames_up: Counter,
    pub frames_down: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
}

impl SessionMetrics {
    /// The session ended with `code`, by `side`.
    pub fn ended(&self, code: u16, side: &str) {
        self.metrics
            .sessions_ended
            .get_or_create(&Ended {
                route: self.route.clone(),
                code: close_code_label(code),
                side: side.to_string(),
            })
            .inc();
    }
}

impl Drop for SessionMetrics {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A close code as a label: the codes RFC 6455 registers and the gateway's own (4001-4014)
/// as themselves, anything a peer made up as `other`.
pub fn close_code_label(code: u16) -> String {
    match code {
        1000..=1015 | 4001..=4014 => code.to_string(),
        _ => "other".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_session_counts_while_open_and_its_end_is_labelled() {
        let m = Arc::new(Metrics::new());
        let s = m.session("telemetry.v1", "env-sensor");
        s.frames_up.inc_by(3);
        let text = m.render(&Registry::default());
        assert_eq!(
            value(
                &text,
                r#"gatehouse_sessions_open{route="telemetry.v1",device_type="env-sensor"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"gatehouse_frames_forwarded_total{route="telemetry.v1",direction="up"}"#
            ),
            Some(3.0)
        );
        s.ended(4001, "gateway");
        s.ended(3999, "device");
        drop(s);
        let text = m.render(&Registry::default());
        assert_eq!(
            value(
                &text,
                r#"gatehouse_sessions_open{route="telemetry.v1",device_type="env-sensor"}"#
            ),
            Some(0.0)
        );
        assert!(text.contains(r#"code="4001",side="gateway"} 1"#), "{text}");
        assert!(text.contains(r#"code="other",side="device"} 1"#), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn histograms_have_their_units_buckets() {
        let m = Metrics::new();
        m.audit_write_us.observe(120.0);
        m.backend_connect_ms
            .get_or_create(&Route { route: "r".into() })
            .observe(3.0);
        let text = m.render(&Registry::default());
        assert!(
            text.contains(r#"gatehouse_audit_write_microseconds_bucket{le="250.0"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gatehouse_backend_connect_milliseconds_bucket{le="5.0",route="r"} 1"#),
            "{text}"
        );
    }
}
