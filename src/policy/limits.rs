//! What one device may send, per device type, pure: the largest message, frames per second
//! and bytes per second (each with a burst and an action: `delay` holds the frame until the
//! device is within its limit, `reject` drops it with an error frame), commands in flight,
//! and how many rate rejections in a window count as sustained abuse (the session ends with
//! 1008). Rates are GCRA through `governor`, on a clock the caller moves: time is an
//! argument here, never read.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, FakeRelativeClock};
use governor::{Quota, RateLimiter};

use super::InvalidFrameLimit;

/// What happens to a frame over a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAction {
    /// Stop reading from the device until it is within its limit: nothing is lost, and TCP
    /// slows the device down.
    Delay,
    /// Drop the frame and answer it with a `rate-limited` error frame.
    Reject,
}

impl LimitAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitAction::Delay => "delay",
            LimitAction::Reject => "reject",
        }
    }
}

/// A rate with its burst and action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub action: LimitAction,
}

/// Which limit a frame hit; the names are the configuration keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitName {
    MaxMessageBytes,
    FramesPerSecond,
    BytesPerSecond,
    CommandsInFlight,
}

impl LimitName {
    /// The counter key of a hit: the limit and what was done.
    pub fn hit(self, action: &'static str) -> &'static str {
        match (self, action) {
            (LimitName::FramesPerSecond, "delay") => "frames_per_second:delay",
            (LimitName::FramesPerSecond, "reject") => "frames_per_second:reject",
            (LimitName::FramesPerSecond, _) => "frames_per_second:close",
            (LimitName::BytesPerSecond, "delay") => "bytes_per_second:delay",
            (LimitName::BytesPerSecond, "reject") => "bytes_per_second:reject",
            (LimitName::BytesPerSecond, _) => "bytes_per_second:close",
            (LimitName::MaxMessageBytes, _) => "max_message_bytes:close",
            (LimitName::CommandsInFlight, _) => "commands_in_flight:reject",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::MaxMessageBytes => "max_message_bytes",
            LimitName::FramesPerSecond => "frames_per_second",
            LimitName::BytesPerSecond => "bytes_per_second",
            LimitName::CommandsInFlight => "commands_in_flight",
        }
    }
}

/// One device type's limits (the defaults, with its overrides applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    pub max_message_bytes: usize,
    /// `None`: no frame rate.
    pub frames: Option<RateRule>,
    /// `None`: no byte rate. Its burst is at least `max_message_bytes`.
    pub bytes: Option<RateRule>,
    pub commands_in_flight: usize,
    /// Sessions one device may hold at once across all routes; one more gets 429.
    pub sessions: usize,
    /// Rate rejections allowed per `abuse_window`; one more ends the session with 1008.
    pub abuse_rejections: u32,
    pub abuse_window: Duration,
}

/// Every device type's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitTable {
    pub defaults: DeviceLimits,
    pub per_type: HashMap<String, DeviceLimits>,
}

impl LimitTable {
    pub fn for_type(&self, device_type: &str) -> &DeviceLimits {
        self.per_type.get(device_type).unwrap_or(&self.defaults)
    }
}

/// What [`SessionLimits::check`] says about one frame from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    Pass,
    /// Hold the frame this long, then forward it.
    Delay(Duration, LimitName),
    /// Drop it with an error frame naming the limit.
    Reject(LimitName),
    /// Drop it and end the session (1008): the device kept hitting this limit.
    Abuse(LimitName),
    /// The message is larger than the type allows: end the session (1009).
    TooBig,
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    FakeRelativeClock,
    governor::middleware::NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>,
>;

struct Rate {
    rule: RateRule,
    limiter: Limiter,
    /// Cells a delayed frame still owes: taken before the next frame is checked (the
    /// delayed frame was held until they were free).
    owed: Option<NonZeroU32>,
}

impl Rate {
    fn new(rule: RateRule, clock: &FakeRelativeClock) -> Self {
        let quota = Quota::per_second(rule.per_second).allow_burst(rule.burst);
        Self {
            rule,
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            owed: None,
        }
    }

    /// `Ok(None)`: conforming; `Ok(Some(wait))`: not before `wait`.
    fn check(&mut self, cells: NonZeroU32, clock: &FakeRelativeClock) -> Option<Duration> {
        if let Some(owed) = self.owed.take() {
            // Free by now (the frame waited for them); if not quite, it is taken anyway.
            let _ = self.limiter.check_n(owed);
        }
        // More cells than the burst: treated as a full burst (config keeps bytes' burst at
        // least the largest message, so this only guards against a bad table).
        let cells = cells.min(self.rule.burst);
        match self.limiter.check_n(cells) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => {
                if self.rule.action == LimitAction::Delay {
                    self.owed = Some(cells);
                }
                Some(not_until.wait_time_from(clock.now()))
            }
            Err(_) => Some(Duration::ZERO),
        }
    }
}

/// One session's limiters.
pub struct SessionLimits {
    limits: DeviceLimits,
    clock: FakeRelativeClock,
    /// Where the clock is, as an offset from the session's start.
    at: Duration,
    frames: Option<Rate>,
    bytes: Option<Rate>,
    abuse: InvalidFrameLimit,
    started: std::time::Instant,
}

impl std::fmt::Debug for SessionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLimits")
            .field("limits", &self.limits)
            .field("at", &self.at)
            .finish()
    }
}

impl SessionLimits {
    /// `start` anchors the abuse window (the caller's session clock at the start).
    pub fn new(limits: DeviceLimits, start: std::time::Instant) -> Self {
        let clock = FakeRelativeClock::default();
        Self {
            frames: limits.frames.map(|r| Rate::new(r, &clock)),
            bytes: limits.bytes.map(|r| Rate::new(r, &clock)),
            abuse: InvalidFrameLimit::new(limits.abuse_rejections, limits.abuse_window),
            limits,
            clock,
            at: Duration::ZERO,
            started: start,
        }
    }

    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
    }

    /// Checks one frame of `len` payload bytes from the device at `now`.
    pub fn check(&mut self, len: usize, now: std::time::Instant) -> RateVerdict {
        if len > self.limits.max_message_bytes {
            return RateVerdict::TooBig;
        }
        let at = now.saturating_duration_since(self.started);
        if at > self.at {
            self.clock.advance(at - self.at);
            self.at = at;
        }
        let mut verdict = RateVerdict::Pass;
        let checks = [
            (&mut self.frames, 1usize, LimitName::FramesPerSecond),
            (&mut self.bytes, len, LimitName::BytesPerSecond),
        ];
        for (rate, cells, name) in checks {
            let Some(rate) = rate else { continue };
            let cells = NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX))
                .unwrap_or(NonZeroU32::MIN);
            if let Some(wait) = rate.check(cells, &self.clock) {
                let this = match rate.rule.action {
                    LimitAction::Delay => RateVerdict::Delay(wait, name),
                    LimitAction::Reject => RateVerdict::Reject(name),
                };
                verdict = match (verdict, this) {
                    // A rejection wins over a delay; the longer delay wins.
                    (RateVerdict::Reject(n), _) => RateVerdict::Reject(n),
                    (_, RateVerdict::Reject(n)) => RateVerdict::Reject(n),
                    (RateVerdict::Delay(a, n), RateVerdict::Delay(b, _)) if a >= b => {
                        RateVerdict::Delay(a, n)
                    }
                    (_, this) => this,
                };
            }
        }
        if let RateVerdict::Reject(name) = verdict {
            // The frame is dropped: a delay elsewhere owes nothing for it.
            for rate in [&mut self.frames, &mut self.bytes].into_iter().flatten() {
                rate.owed = None;
            }
            if self.abuse.record(now) {
                return RateVerdict::Abuse(name);
            }
        }
        verdict
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// 10 frames per second with a burst of 5, for tests elsewhere in the crate too.
    pub(crate) fn limits(action: LimitAction) -> DeviceLimits {
        DeviceLimits {
            max_message_bytes: 1000,
            frames: Some(RateRule {
                per_second: nz(10),
                burst: nz(5),
                action,
            }),
            bytes: None,
            commands_in_flight: 8,
            sessions: 8,
            abuse_rejections: 3,
            abuse_window: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let t0 = std::time::Instant::now();
        let mut s = SessionLimits::new(limits(LimitAction::Reject), t0);
        for _ in 0..5 {
            assert_eq!(s.check(10, t0), RateVerdict::Pass);
        }
        assert_eq!(
            s.check(10, t0),
            RateVerdict::Reject(LimitName::FramesPerSecond)
        );
        // 100 ms later one more cell is free.
        let t = t0 + Duration::from_millis(100);
        assert_eq!(s.check(10, t), RateVerdict::Pass);
        assert_eq!(
            s.check(10, t),
            RateVerdict::Reject(LimitName::FramesPerSecond)
        );
        // The third rejection within the window is one too many? No: 3 are allowed.
        assert_eq!(
            s.check(10, t),
            RateVerdict::Reject(LimitName::FramesPerSecond)
        );
        assert_eq!(
            s.check(10, t),
            RateVerdict::Abuse(LimitName::FramesPerSecond)
        );
        assert_eq!(s.check(1001, t), RateVerdict::TooBig);
    }

    #[test]
    fn delay_waits_for_the_next_cell_and_takes_it() {
        let t0 = std::time::Instant::now();
        let mut s = SessionLimits::new(limits(LimitAction::Delay), t0);
        for _ in 0..5 {
            assert_eq!(s.check(10, t0), RateVerdict::Pass);
        }
        let RateVerdict::Delay(wait, LimitName::FramesPerSecond) = s.check(10, t0) else {
            panic!("a delay");
        };
        assert_eq!(wait, Duration::from_millis(100));
        // The delayed frame took the cell free at 100 ms: the next one waits another 100.
        let t = t0 + wait;
        let RateVerdict::Delay(next, _) = s.check(10, t) else {
            panic!("a delay");
        };
        assert_eq!(next, Duration::from_millis(100));
        // Sustained: 10 per second go through, never more.
        let mut passed = 0;
        let mut now = t + next;
        let end = t0 + Duration::from_secs(10);
        while now < end {
            match s.check(10, now) {
                RateVerdict::Pass => passed += 1,
                RateVerdict::Delay(w, _) => {
                    passed += 1;
                    now += w;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!((90..=100).contains(&passed), "{passed}");
    }

    #[test]
    fn bytes_count_the_payload() {
        let t0 = std::time::Instant::now();
        let mut l = limits(LimitAction::Reject);
        l.frames = None;
        l.bytes = Some(RateRule {
            per_second: nz(1000),
            burst: nz(1000),
            action: LimitAction::Reject,
        });
        let mut s = SessionLimits::new(l, t0);
        assert_eq!(s.check(600, t0), RateVerdict::Pass);
        assert_eq!(
            s.check(600, t0),
            RateVerdict::Reject(LimitName::BytesPerSecond)
        );
        assert_eq!(s.check(400, t0), RateVerdict::Pass);
        assert_eq!(
            s.check(600, t0 + Duration::from_millis(600)),
            RateVerdict::Pass
        );
    }
}
