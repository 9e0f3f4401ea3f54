//! `gatehouse top`: a live terminal view of a running gateway, from its admin API (`/metrics`
//! and `/v1/sessions`), refreshed every interval; `--once` prints one view (two samples an
//! interval apart, since rates need two) and exits. What changes between two samples is
//! computed by pure functions over parsed samples ([`render`]), so the view is tested without
//! a terminal or a network.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::bail;
use gatehouse::admin::{AdminClient, Call};
use gatehouse::config::Config;
use gatehouse::session::table::LiveSession;

/// Busiest devices shown.
const BUSIEST: usize = 10;

/// One metric sample: its labels and value.
type Series = Vec<(BTreeMap<String, String>, f64)>;

/// A parsed exposition: sample name (as printed, e.g. `gatehouse_handshakes_total`) to its
/// series.
#[derive(Debug, Default, Clone)]
pub struct Exposition(BTreeMap<String, Series>);

impl Exposition {
    /// Parses the OpenMetrics/Prometheus text format (what `/metrics` serves). Comment lines
    /// and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let mut out: BTreeMap<String, Series> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (head, BTreeMap::new()),
            };
            out.entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        Self(out)
    }

    /// The sum of `name` over all its series.
    pub fn total(&self, name: &str) -> f64 {
        self.0
            .get(name)
            .map_or(0.0, |s| s.iter().fold(0.0, |a, (_, v)| a + v))
    }

    /// `name` summed by the values of `labels` (joined with a space).
    pub fn by(&self, name: &str, labels: &[&str]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (set, value) in self.0.get(name).into_iter().flatten() {
            let key = labels
                .iter()
                .map(|l| set.get(*l).map_or("-", String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            *out.entry(key).or_insert(0.0) += value;
        }
        out
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    // Label values from the gateway never hold `",`; split on it.
    text.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once("=\"")?;
            Some((k.trim().to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}

/// What one look at the gateway saw.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub metrics: Exposition,
    pub sessions: Vec<LiveSession>,
}

fn rate(now: f64, before: f64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    // A counter that went down: the gateway restarted between the samples.
    (now - before).max(0.0) / seconds
}

/// Per-second rates of counter `name` by `labels` between two samples, busiest first, zero
/// rates left out.
fn rates(
    before: &Exposition,
    now: &Exposition,
    name: &str,
    labels: &[&str],
    seconds: f64,
) -> Vec<(String, f64)> {
    let old = before.by(name, labels);
    let mut out: Vec<(String, f64)> = now
        .by(name, labels)
        .into_iter()
        .map(|(k, v)| {
            let r = rate(v, old.get(&k).copied().unwrap_or(0.0), seconds);
            (k, r)
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

fn human_bytes(per_second: f64) -> String {
    match per_second {
        b if b >= 1_048_576.0 => format!("{:.1} MiB/s", b / 1_048_576.0),
        b if b >= 1024.0 => format!("{:.1} KiB/s", b / 1024.0),
        b => format!("{b:.0} B/s"),
    }
}

fn list(out: &mut String, rows: &[(String, f64)], unit: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (k, r) in rows {
        let _ = writeln!(out, "  {k:<52} {r:>10.1}{unit}");
    }
}

/// The view of what happened between `before` and `now`, `seconds` apart.
pub fn render(target: &str, before: &Sample, now: &Sample, seconds: f64) -> String {
    let (b, n) = (&before.metrics, &now.metrics);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gatehouse top  {target}  over {seconds:.1} s{}",
        if n.total("gatehouse_draining") > 0.0 {
            "  DRAINING"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "\nSESSIONS  {} open, {} of {} slots taken, {} of {} handshake slots",
        n.total("gatehouse_sessions_open"),
        n.total("gatehouse_session_slots_in_use"),
        n.total("gatehouse_session_slots"),
        n.total("gatehouse_handshakes_in_progress"),
        n.total("gatehouse_handshake_slots"),
    );
    let open: Vec<(String, f64)> = n
        .by("gatehouse_sessions_open", &["route", "device_type"])
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .collect();
    for (k, v) in &open {
        let _ = writeln!(out, "  {k:<52} {v:>10}");
    }

    let handshakes = rates(b, n, "gatehouse_handshakes_total", &["outcome"], seconds);
    let refused: f64 = handshakes
        .iter()
        .filter(|(k, _)| k != "ok")
        .fold(0.0, |a, (_, r)| a + r);
    let ok = handshakes
        .iter()
        .find(|(k, _)| k == "ok")
        .map_or(0.0, |(_, r)| *r);
    let _ = writeln!(
        out,
        "\nHANDSHAKES  {ok:.1}/s ok, {refused:.1}/s refused or failed"
    );
    let refusals: Vec<_> = handshakes.into_iter().filter(|(k, _)| k != "ok").collect();
    if !refusals.is_empty() {
        list(&mut out, &refusals, "/s");
    }
    let at_accept = rates(
        b,
        n,
        "gatehouse_connections_closed_at_accept_total",
        &["limit"],
        seconds,
    );
    if !at_accept.is_empty() {
        let _ = writeln!(out, "  closed at accept:");
        list(&mut out, &at_accept, "/s");
    }

    let frames = rates(
        b,
        n,
        "gatehouse_frames_forwarded_total",
        &["route", "direction"],
        seconds,
    );
    let bytes: HashMap<String, f64> = rates(
        b,
        n,
        "gatehouse_payload_forwarded_bytes_total",
        &["route", "direction"],
        seconds,
    )
    .into_iter()
    .collect();
    let _ = writeln!(
        out,
        "\nFRAMES  {:.1}/s, {}",
        frames.iter().fold(0.0, |a, (_, r)| a + r),
        human_bytes(bytes.values().fold(0.0, |a, r| a + r))
    );
    for (k, r) in &frames {
        let _ = writeln!(
            out,
            "  {k:<52} {r:>10.1}/s  {}",
            human_bytes(bytes.get(k).copied().unwrap_or(0.0))
        );
    }

    let _ = writeln!(out, "\nVALIDATION FAILURES");
    list(
        &mut out,
        &rates(
            b,
            n,
            "gatehouse_validation_failures_total",
            &["device_type", "route", "reason"],
            seconds,
        ),
        "/s",
    );
    let _ = writeln!(out, "\nLIMIT HITS");
    list(
        &mut out,
        &rates(
            b,
            n,
            "gatehouse_limit_hits_total",
            &["device_type", "limit", "action"],
            seconds,
        ),
        "/s",
    );

    let failures = rates(
        b,
        n,
        "gatehouse_backend_connect_failures_total",
        &["route"],
        seconds,
    );
    let _ = writeln!(
        out,
        "\nBACKENDS  {} named, {} ejected, {:.1} connect failures/s",
        n.total("gatehouse_backends"),
        n.total("gatehouse_backends_ejected"),
        failures.iter().fold(0.0, |a, (_, r)| a + r)
    );
    if n.0.contains_key("gatehouse_audit_healthy") {
        let _ = writeln!(
            out,
            "AUDIT     {}, {:.1} records/s",
            if n.total("gatehouse_audit_healthy") > 0.0 {
                "writable"
            } else {
                "FAILING: commands refused"
            },
            rate(
                n.total("gatehouse_audit_records_total"),
                b.total("gatehouse_audit_records_total"),
                seconds
            )
        );
    }

    let _ = writeln!(out, "\nBUSIEST DEVICES");
    let earlier: HashMap<&str, &LiveSession> = before
        .sessions
        .iter()
        .map(|s| (s.connection.as_str(), s))
        .collect();
    let mut busiest: Vec<(f64, f64, &LiveSession)> = now
        .sessions
        .iter()
        .map(|s| {
            let (f0, b0) = earlier.get(s.connection.as_str()).map_or((0, 0), |e| {
                (e.frames_up + e.frames_down, e.bytes_up + e.bytes_down)
            });
            (
                rate((s.frames_up + s.frames_down) as f64, f0 as f64, seconds),
                rate((s.bytes_up + s.bytes_down) as f64, b0 as f64, seconds),
                s,
            )
        })
        .filter(|(f, _, _)| *f > 0.0)
        .collect();
    busiest.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| a.2.device.cmp(&b.2.device))
    });
    if busiest.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (f, by, s) in busiest.into_iter().take(BUSIEST) {
        let _ = writeln!(
            out,
            "  {:<24} {:<14} {:<14} {f:>8.1} frames/s  {}",
            s.device,
            s.device_type,
            s.route,
            human_bytes(by)
        );
    }
    out
}

fn sample(client: &AdminClient) -> anyhow::Result<Sample> {
    Ok(Sample {
        metrics: Exposition::parse(&client.call_text(Call::get("/metrics"))?),
        sessions: client.call(Call::get("/v1/sessions"))?,
    })
}

/// Runs the view against the gateway `config` names until Ctrl-C (or once).
pub fn top(config: &Config, once: bool, interval: Duration) -> anyhow::Result<()> {
    let Some(admin) = &config.admin else {
        bail!("no [admin] section: `gatehouse top` reads the running gateway's admin API");
    };
    let target = admin.listen.to_string();
    let Some(client) = AdminClient::for_config(config) else {
        bail!("no [admin] section");
    };
    let client = client?;
    let mut before = sample(&client)?;
    let mut at = std::time::Instant::now();
    loop {
        std::thread::sleep(interval);
        let now = sample(&client)?;
        let seconds = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        let view = render(&target, &before, &now, seconds);
        if once {
            print!("{view}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{view}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE gatehouse_handshakes counter
gatehouse_handshakes_total{outcome="ok"} 10
gatehouse_handshakes_total{outcome="unknown-device"} 1
gatehouse_frames_forwarded_total{route="telemetry.v1",direction="up"} 100
gatehouse_payload_forwarded_bytes_total{route="telemetry.v1",direction="up"} 10000
gatehouse_sessions_open{route="telemetry.v1",device_type="env-sensor"} 2
gatehouse_session_slots 9000
# EOF
"#;
    const NOW: &str = r#"gatehouse_handshakes_total{outcome="ok"} 14
gatehouse_handshakes_total{outcome="unknown-device"} 3
gatehouse_frames_forwarded_total{route="telemetry.v1",direction="up"} 300
gatehouse_payload_forwarded_bytes_total{route="telemetry.v1",direction="up"} 30480
gatehouse_sessions_open{route="telemetry.v1",device_type="env-sensor"} 3
gatehouse_sessions_open{route="control.v1",device_type="door-lock"} 0
gatehouse_validation_failures_total{device_type="env-sensor",route="telemetry.v1",reason="schema-violation"} 6
gatehouse_session_slots 9000
gatehouse_session_slots_in_use 3
# EOF
"#;

    fn session(device: &str, conn: &str, frames: u64) -> LiveSession {
        LiveSession {
            connection: conn.into(),
            device: device.into(),
            device_type: "env-sensor".into(),
            route: "telemetry.v1".into(),
            backend: "ws://b/".into(),
            peer: "127.0.0.1:1".into(),
            cert_sha256: String::new(),
            cert_serial: String::new(),
            started: time::OffsetDateTime::UNIX_EPOCH,
            frames_up: frames,
            bytes_up: frames * 100,
            frames_down: 0,
            bytes_down: 0,
        }
    }

    #[test]
    fn the_exposition_is_parsed_with_labels() {
        let e = Exposition::parse(NOW);
        assert_eq!(e.total("gatehouse_handshakes_total"), 17.0);
        assert_eq!(
            e.by("gatehouse_sessions_open", &["device_type"])
                .get("env-sensor"),
            Some(&3.0)
        );
        assert_eq!(e.total("gatehouse_missing"), 0.0);
    }

    #[test]
    fn the_view_shows_rates_between_two_samples_and_the_busiest_devices() {
        let before = Sample {
            metrics: Exposition::parse(BEFORE),
            sessions: vec![session("s-1", "c1", 10), session("s-2", "c2", 50)],
        };
        let now = Sample {
            metrics: Exposition::parse(NOW),
            sessions: vec![
                session("s-1", "c1", 210),
                session("s-2", "c2", 60),
                session("s-3", "c3", 5),
            ],
        };
        let view = render("127.0.0.1:9443", &before, &now, 2.0);
        assert!(view.contains("3 open, 3 of 9000 slots taken"), "{view}");
        assert!(view.contains("2.0/s ok, 1.0/s refused or failed"), "{view}");
        assert!(view.contains("unknown-device"), "{view}");
        // 200 frames and 20,480 bytes in 2 s.
        assert!(view.contains("FRAMES  100.0/s, 10.0 KiB/s"), "{view}");
        assert!(
            view.contains("env-sensor telemetry.v1 schema-violation"),
            "{view}"
        );
        // Busiest first: s-1 (100/s), s-2 (5/s), then s-3, new (2.5/s).
        let order: Vec<usize> = ["s-1 ", "s-2 ", "s-3 "]
            .iter()
            .map(|d| view.find(d).expect(d))
            .collect();
        assert!(order[0] < order[1] && order[1] < order[2], "{view}");
        assert!(view.contains("100.0 frames/s"), "{view}");
        // A route with no open session is not listed.
        assert!(!view.contains("control.v1 door-lock"), "{view}");
    }

    #[test]
    fn a_restart_between_samples_gives_no_negative_rates() {
        let before = Sample {
            metrics: Exposition::parse(NOW),
            sessions: vec![],
        };
        let now = Sample {
            metrics: Exposition::parse(BEFORE),
            sessions: vec![],
        };
        let view = render("x", &before, &now, 1.0);
        assert!(
            view.contains("HANDSHAKES  0.0/s ok, 0.0/s refused"),
            "{view}"
        );
        assert!(view.contains("FRAMES  0.0/s, 0 B/s"), "{view}");
        assert!(!view.contains("-1") && !view.contains("-0"), "{view}");
    }
}
