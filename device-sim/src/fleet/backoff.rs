//! When a device tries again after a close or a refusal: exponential backoff with jitter, at
//! least what the gateway's `Retry-After` asked for, and a share of devices that never come
//! back. Pure: the caller supplies the randomness, so every schedule is reproducible.

use std::time::Duration;

/// How a fleet reconnects.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Ceiling of the exponential part.
    pub max: Duration,
    /// Growth per failed attempt (2.0: doubling).
    pub multiplier: f64,
    /// A session that lasted at least this long resets the attempt count: the next drop is
    /// treated as the first.
    pub stable_after: Duration,
    /// Share of devices (0.0-1.0) that never reconnect.
    pub never_share: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            stable_after: Duration::from_secs(10),
            never_share: 0.0,
        }
    }
}

impl Backoff {
    /// The exponential part for the given attempt (0: first retry), capped at `max`.
    pub fn base(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The wait before retry number `attempt` (0-based). "Equal jitter": uniformly between
    /// half the exponential base and the whole of it, so a fleet dropped at one instant spreads
    /// out and no device retries at once. A `Retry-After` from the gateway is a floor; devices
    /// spread over up to half as much again beyond it rather than all returning on the second.
    /// `unit` is a uniform random number in [0, 1).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let base = self.base(attempt);
        let jittered = base.mul_f64(0.5 + 0.5 * unit);
        match retry_after {
            Some(floor) => jittered.max(floor + floor.mul_f64(0.5 * unit)),
            None => jittered,
        }
    }

    /// Whether a device (chosen by a uniform `unit` drawn once per device) never reconnects.
    pub fn never_reconnects(&self, unit: f64) -> bool {
        unit < self.never_share
    }
}

/// A device's retry state across its sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    failures: u32,
}

impl Attempts {
    /// Records how the last attempt ended and returns the attempt number for the next wait.
    /// `session` is how long the session lasted (`None`: it never opened).
    pub fn next(&mut self, backoff: &Backoff, session: Option<Duration>) -> u32 {
        if session.is_some_and(|d| d >= backoff.stable_after) {
            self.failures = 0;
        }
        let attempt = self.failures;
        self.failures = self.failures.saturating_add(1);
        attempt
    }
}

/// The `Retry-After` header value as a delay: delta-seconds only (RFC 9110 10.2.3 also allows
/// an HTTP date, which gateways behind a clock-skewed fleet should not send; it is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(24 * 3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            ..Backoff::default()
        }
    }

    #[test]
    fn the_base_doubles_up_to_the_ceiling() {
        let b = backoff();
        let bases: Vec<u128> = (0..10).map(|a| b.base(a).as_millis()).collect();
        assert_eq!(
            bases,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(b.base(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_base() {
        let b = backoff();
        for attempt in 0..12 {
            let base = b.base(attempt);
            assert_eq!(b.delay(attempt, None, 0.0), base / 2);
            assert_eq!(b.delay(attempt, None, 1.0), base);
            let mid = b.delay(attempt, None, 0.5);
            assert!(mid > base / 2 && mid < base, "{attempt}: {mid:?}");
        }
    }

    #[test]
    fn a_fleet_dropped_at_once_spreads_over_the_window() {
        let b = backoff();
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: Vec<Duration> = (0..10_000).map(|_| b.delay(3, None, rng.f64())).collect();
        // Ten buckets over [400 ms, 800 ms): each holds about a tenth.
        let mut buckets = [0u32; 10];
        for d in &delays {
            let ms = d.as_secs_f64() * 1000.0;
            assert!((400.0..=800.0).contains(&ms), "{ms}");
            buckets[(((ms - 400.0) / 40.0) as usize).min(9)] += 1;
        }
        for n in buckets {
            assert!((800..1200).contains(&n), "{buckets:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_with_spread_beyond_it() {
        let b = backoff();
        let floor = Duration::from_secs(5);
        assert_eq!(b.delay(0, Some(floor), 0.0), floor);
        assert_eq!(b.delay(0, Some(floor), 1.0), Duration::from_millis(7500));
        // A longer backoff than the floor wins.
        assert_eq!(b.delay(9, Some(floor), 1.0), Duration::from_secs(10));
    }

    #[test]
    fn a_stable_session_resets_the_count_and_failures_grow_it() {
        let b = backoff();
        let mut a = Attempts::default();
        assert_eq!(a.next(&b, None), 0);
        assert_eq!(a.next(&b, None), 1);
        assert_eq!(a.next(&b, Some(Duration::from_secs(1))), 2);
        assert_eq!(a.next(&b, Some(Duration::from_secs(10))), 0);
        assert_eq!(a.next(&b, None), 1);
    }

    #[test]
    fn the_never_share_is_honoured() {
        let b = Backoff {
            never_share: 0.25,
            ..backoff()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let never = (0..10_000)
            .filter(|_| b.never_reconnects(rng.f64()))
            .count();
        assert!((2300..2700).contains(&never), "{never}");
        assert!(!Backoff::default().never_reconnects(0.0));
    }

    #[test]
    fn retry_after_takes_delta_seconds() {
        assert_eq!(parse_retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(
            parse_retry_after("99999999"),
            Some(Duration::from_secs(86400))
        );
    }
}
