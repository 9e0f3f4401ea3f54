//! What a fleet saw, in a form that merges: every worker process's report folds into one
//! (counts add, latency histograms add bucket by bucket), and the JSON form (`--json`, and
//! what workers send their coordinator) carries the histograms whole, not only quantiles.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A latency distribution in microseconds.
#[derive(Clone, Debug)]
pub struct Latency(pub Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new(3).expect("3 significant digits is a valid precision"))
    }
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        // Saturate rather than drop values beyond the auto-resizing range.
        let _ = self.0.record(us.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// `p50 1.2 ms, p90 .., p99 .., max ..` or `-` when empty.
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.quantile_ms(0.5),
            self.quantile_ms(0.9),
            self.quantile_ms(0.99),
            self.max_ms(),
            self.count()
        )
    }
}

#[derive(Serialize, Deserialize)]
struct LatencyWire {
    count: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    /// `[value_us, count]` per recorded bucket: what a merge needs.
    buckets: Vec<(u64, u64)>,
}

impl Serialize for Latency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let h = &self.0;
        LatencyWire {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            buckets: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = LatencyWire::deserialize(d)?;
        let mut out = Latency::default();
        for (value, count) in wire.buckets {
            out.0
                .record_n(value.max(1), count)
                .map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

/// What the fleet saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetReport {
    pub devices: u64,
    /// Devices that had at least one session.
    pub connected: u64,
    /// Sessions opened (a reconnecting device opens several).
    pub sessions: u64,
    /// Sessions whose TLS handshake resumed an earlier one.
    #[serde(default)]
    pub resumed: u64,
    /// Sessions opened after an earlier session or refusal of the same device.
    pub reconnects: u64,
    /// Devices that dropped and did not come back because they never reconnect.
    pub gave_up: u64,
    /// Refused attempts by reason.
    pub refused: BTreeMap<String, u64>,
    pub frames_sent: u64,
    /// Of those, frames made to fail the schema.
    pub invalid_sent: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    /// The gateway's error frames among those received.
    pub error_frames: u64,
    pub commands_answered: u64,
    /// Sessions ended by the gateway, by close code.
    pub closes: BTreeMap<u16, u64>,
    /// Sessions ended by something else, by error.
    pub errors: BTreeMap<String, u64>,
    /// TCP connect to upgraded session, per session.
    pub handshake: Latency,
    /// From a device losing its session (or its first refusal) to its next session.
    pub reconnect: Latency,
    /// Telemetry frames that an echo backend sent back, from send to return.
    #[serde(default)]
    pub echo: Latency,
    /// End-to-end telemetry latency and command round trip, as measured by the sample
    /// backends named with `--backend-stats` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<BackendFigures>,
    pub elapsed_ms: u64,
    /// Worker processes merged into this report (1: this process alone).
    pub processes: u64,
}

/// Figures the sample backends measure (see [`crate::backends::StatsReport`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BackendFigures {
    /// Device timestamp (`ts`, whole milliseconds) to arrival at the ingest backend: an upper
    /// bound, up to 1 ms above the true latency.
    pub telemetry: Latency,
    /// Command sent by the control backend to the device's answer arriving back.
    pub command_round_trip: Latency,
    pub frames: u64,
    pub responses: u64,
}

impl FleetReport {
    pub fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_ms)
    }

    /// Folds another process's report into this one. Elapsed time is the longest of the two:
    /// the processes ran side by side.
    pub fn merge(&mut self, other: &FleetReport) {
        self.devices += other.devices;
        self.connected += other.connected;
        self.sessions += other.sessions;
        self.resumed += other.resumed;
        self.reconnects += other.reconnects;
        self.gave_up += other.gave_up;
        add_all(&mut self.refused, &other.refused);
        self.frames_sent += other.frames_sent;
        self.invalid_sent += other.invalid_sent;
        self.bytes_sent += other.bytes_sent;
        self.frames_received += other.frames_received;
        self.error_frames += other.error_frames;
        self.commands_answered += other.commands_answered;
        add_all(&mut self.closes, &other.closes);
        add_all(&mut self.errors, &other.errors);
        self.handshake.merge(&other.handshake);
        self.reconnect.merge(&other.reconnect);
        self.echo.merge(&other.echo);
        match (&mut self.backends, &other.backends) {
            (Some(mine), Some(theirs)) => {
                mine.telemetry.merge(&theirs.telemetry);
                mine.command_round_trip.merge(&theirs.command_round_trip);
                mine.frames += theirs.frames;
                mine.responses += theirs.responses;
            }
            (None, Some(theirs)) => self.backends = Some(theirs.clone()),
            _ => {}
        }
        self.elapsed_ms = self.elapsed_ms.max(other.elapsed_ms);
        self.processes += other.processes;
    }

    pub fn print(&self) {
        self.print_indented("");
    }

    pub fn print_indented(&self, pad: &str) {
        let secs = self.elapsed().as_secs_f64().max(0.001);
        let procs = if self.processes > 1 {
            format!(" across {} processes", self.processes)
        } else {
            String::new()
        };
        println!(
            "{pad}fleet: {} device(s) in {:.1?}{procs}",
            self.devices,
            self.elapsed()
        );
        println!("{pad}  connected          {}", self.connected);
        if self.sessions != self.connected || self.reconnects > 0 {
            println!(
                "{pad}  sessions           {} ({} after a reconnect, {} TLS resumed)",
                self.sessions, self.reconnects, self.resumed
            );
        }
        for (why, n) in &self.refused {
            println!("{pad}  refused            {n:>6}  {why}");
        }
        if self.gave_up > 0 {
            println!("{pad}  never reconnected  {}", self.gave_up);
        }
        if self.handshake.count() > 0 {
            println!("{pad}  connect time       {}", self.handshake.summary());
        }
        if self.reconnect.count() > 0 {
            println!("{pad}  back after         {}", self.reconnect.summary());
        }
        if self.echo.count() > 0 {
            println!("{pad}  echo round trip    {}", self.echo.summary());
        }
        println!(
            "{pad}  telemetry sent     {} ({:.0}/s{})",
            self.frames_sent,
            self.frames_sent as f64 / secs,
            if self.invalid_sent > 0 {
                format!(", {} invalid on purpose", self.invalid_sent)
            } else {
                String::new()
            }
        );
        println!("{pad}  frames received    {}", self.frames_received);
        if self.error_frames > 0 {
            println!("{pad}  error frames       {}", self.error_frames);
        }
        println!("{pad}  commands answered  {}", self.commands_answered);
        if let Some(b) = &self.backends {
            if b.telemetry.count() > 0 {
                println!(
                    "{pad}  telemetry latency  {} (frame ts to ingest; ts in whole ms, so up to 1 ms high)",
                    b.telemetry.summary()
                );
            }
            if b.command_round_trip.count() > 0 {
                println!(
                    "{pad}  command round trip {}",
                    b.command_round_trip.summary()
                );
            }
        }
        for (code, n) in &self.closes {
            println!("{pad}  closed with {code}    {n}");
        }
        for (e, n) in &self.errors {
            println!("{pad}  error              {n:>6}  {e}");
        }
    }
}

fn add_all<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (k, n) in from {
        *into.entry(k.clone()).or_default() += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(devices: u64, latencies: &[u64], refused: &[(&str, u64)]) -> FleetReport {
        let mut r = FleetReport {
            devices,
            connected: latencies.len() as u64,
            sessions: latencies.len() as u64,
            processes: 1,
            elapsed_ms: 1000 * devices,
            ..FleetReport::default()
        };
        for &us in latencies {
            r.handshake.record(us);
        }
        for (why, n) in refused {
            r.refused.insert(why.to_string(), *n);
        }
        *r.closes.entry(1001).or_default() += devices;
        r
    }

    #[test]
    fn merging_adds_counts_and_histograms_and_keeps_the_longest_run() {
        let mut a = report(3, &[1_000, 2_000, 3_000], &[("HTTP 503 over-capacity", 2)]);
        let b = report(
            5,
            &[10_000, 20_000, 30_000, 40_000, 50_000],
            &[("HTTP 503 over-capacity", 1), ("timeout", 4)],
        );
        a.merge(&b);
        assert_eq!(a.devices, 8);
        assert_eq!(a.connected, 8);
        assert_eq!(a.processes, 2);
        assert_eq!(a.elapsed_ms, 5000);
        assert_eq!(a.refused["HTTP 503 over-capacity"], 3);
        assert_eq!(a.refused["timeout"], 4);
        assert_eq!(a.closes[&1001], 8);
        assert_eq!(a.handshake.count(), 8);
        // The merged quantiles are those of all eight samples, not an average of the two.
        let p50 = a.handshake.0.value_at_quantile(0.5);
        assert!((9_990..=10_010).contains(&p50), "{p50}");
        let max = a.handshake.0.max();
        assert!((50_000..50_100).contains(&max), "{max}");
    }

    #[test]
    fn a_report_survives_its_json_form_whole() {
        let mut r = report(4, &[150, 1_500, 15_000, 150_000], &[("TLS alert", 1)]);
        r.backends = Some(BackendFigures::default());
        r.backends.as_mut().unwrap().telemetry.record(2_000);
        let json = serde_json::to_string(&r).unwrap();
        let back: FleetReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.handshake.count(), 4);
        for q in [0.25, 0.5, 0.75, 1.0] {
            assert_eq!(
                back.handshake.0.value_at_quantile(q),
                r.handshake.0.value_at_quantile(q)
            );
        }
        assert_eq!(back.refused, r.refused);
        assert_eq!(back.backends.unwrap().telemetry.count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["handshake"]["p99_us"].as_u64().unwrap() >= 15_000);
    }

    #[test]
    fn merging_into_an_empty_report_is_the_identity() {
        let b = report(2, &[5, 7], &[]);
        let mut a = FleetReport::default();
        a.merge(&b);
        assert_eq!(a.devices, 2);
        assert_eq!(a.handshake.count(), 2);
        assert_eq!(a.processes, 1);
    }
}
