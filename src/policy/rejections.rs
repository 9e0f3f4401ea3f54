//! Rejection accounting: a counter per (device type, route, reason), and a limiter that keeps
//! the rejection log from flooding (a burst per second, then a count of what was suppressed).
//! In memory; time is an argument. The session's `CountRejections` step feeds them, the admin
//! API reads the counters.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One counter row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RejectionCount {
    pub device_type: String,
    pub route: String,
    pub reason: String,
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct RejectionStats {
    counts: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl RejectionStats {
    pub fn count(&self, device_type: &str, route: &str, reason: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        // Rejections are the exception path: the key's two small strings are allocated.
        *counts
            .entry((device_type.to_string(), route.to_string(), reason))
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<RejectionCount> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .iter()
            .map(|((t, r, why), n)| RejectionCount {
                device_type: t.clone(),
                route: r.clone(),
                reason: (*why).to_string(),
                count: *n,
            })
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// A refusal of a known device, kept for `GET /v1/devices/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecentRefusal {
    /// RFC 3339.
    pub at: String,
    pub status: u16,
    pub code: String,
    pub connection: String,
    pub peer: String,
}

/// Per device: its refusals (oldest first) and when it was last refused (a counter).
type RefusalsByDevice = BTreeMap<String, (std::collections::VecDeque<RecentRefusal>, u64)>;

/// The last refusals of each device: at most `per_device` each, for at most `devices`
/// devices (the one refused longest ago is forgotten first), so memory stays bounded
/// whatever is refused.
#[derive(Debug)]
pub struct RecentRefusals {
    per_device: usize,
    devices: usize,
    /// The refusals, and the counter that orders them for eviction.
    state: Mutex<(RefusalsByDevice, u64)>,
}

impl RecentRefusals {
    pub fn new(per_device: usize, devices: usize) -> Self {
        Self {
            per_device: per_device.max(1),
            devices: devices.max(1),
            state: Mutex::new((BTreeMap::new(), 0)),
        }
    }

    pub fn record(&self, device: &str, refusal: RecentRefusal) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        if !map.contains_key(device) && map.len() >= self.devices {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let (list, at) = map.entry(device.to_string()).or_default();
        *at = now;
        if list.len() >= self.per_device {
            list.pop_front();
        }
        list.push_back(refusal);
    }

    /// A device's recent refusals, oldest first.
    pub fn of(&self, device: &str) -> Vec<RecentRefusal> {
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .0
            .get(device)
            .map(|(l, _)| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Allows `per_second` events per one-second window; reports how many were suppressed in
/// the previous window when a new one opens.
#[derive(Debug)]
pub struct LogLimiter {
    per_second: u32,
    state: Mutex<(Option<Instant>, u32, u64)>,
}

/// What the limiter says about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it; `suppressed_before` lines were dropped in the previous window.
    Log {
        suppressed_before: u64,
    },
    Suppress,
}

impl LogLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new((None, 0, 0)),
        }
    }

    pub fn check(&self, now: Instant) -> LogDecision {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, used, suppressed) = &mut *s;
        match start {
            Some(t) if now.duration_since(*t) < Duration::from_secs(1) => {}
            _ => {
                *start = Some(now);
                *used = 0;
            }
        }
        if *used < self.per_second {
            *used += 1;
            let before = std::mem::take(suppressed);
            LogDecision::Log {
                suppressed_before: before,
            }
        } else {
            *suppressed += 1;
            LogDecision::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    fn refusal(code: &str) -> RecentRefusal {
        RecentRefusal {
            at: String::new(),
            status: 403,
            code: code.into(),
            connection: String::new(),
            peer: String::new(),
        }
    }

    #[test]
    fn recent_refusals_stay_bounded_per_device_and_in_devices() {
        let r = RecentRefusals::new(2, 2);
        for code in ["a", "b", "c"] {
            r.record("d1", refusal(code));
        }
        let codes: Vec<_> = r.of("d1").into_iter().map(|x| x.code).collect();
        assert_eq!(codes, ["b", "c"]);
        r.record("d2", refusal("x"));
        // A third device pushes out the one refused longest ago (d1).
        r.record("d3", refusal("y"));
        assert!(r.of("d1").is_empty());
        assert_eq!(r.of("d2").len(), 1);
        assert_eq!(r.of("d3").len(), 1);
    }

    use super::*;

    #[test]
    fn limiter_allows_a_burst_then_counts() {
        let l = LogLimiter::new(2);
        let t = Instant::now();
        assert_eq!(
            l.check(t),
            LogDecision::Log {
                suppressed_before: 0
            }
        );
        assert_eq!(
            l.check(t),
            LogDecision::Log {
                suppressed_before: 0
            }
        );
        assert_eq!(l.check(t), LogDecision::Suppress);
        assert_eq!(l.check(t), LogDecision::Suppress);
        assert_eq!(
            l.check(t + Duration::from_secs(1)),
            LogDecision::Log {
                suppressed_before: 2
            }
        );
    }

    #[test]
    fn counters_by_type_route_reason() {
        let s = RejectionStats::default();
        s.count("lock", "control.v1", "schema-violation");
        s.count("lock", "control.v1", "schema-violation");
        s.count("sensor", "telemetry.v1", "malformed");
        assert_eq!(s.total(), 3);
        let snap = s.snapshot();
        assert_eq!(snap[0].count, 2);
        assert_eq!(snap[1].reason, "malformed");
    }
}
