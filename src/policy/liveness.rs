//! A session's clocks, pure: when to ping each leg, when a leg that does not answer its ping
//! is dead, when a session is idle, too old, past its certificate, or stuck on a side that
//! stopped reading. The relay reports what happened (a frame heard from a leg, a data frame,
//! a write that waits) with the time since the session started, asks what is due, and sleeps
//! until [`Liveness::next_deadline`]. No clock of its own.

use std::time::Duration;

pub use crate::model::{PingRules, SessionTimers};
use crate::wire::{Ending, Leg};

/// `max` shortened by up to `jitter` of itself; `unit` in [0, 1) picks where.
pub fn jittered(max: Duration, jitter: f64, unit: f64) -> Duration {
    let cut = jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
    max.mul_f64(1.0 - cut)
}

/// What the relay has to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Ping(Leg),
    End(Ending),
}

#[derive(Debug, Clone, Copy, Default)]
struct LegState {
    /// Last time any frame came from the leg.
    heard: Duration,
    /// When the gateway's unanswered ping went out.
    pinged: Option<Duration>,
    /// Since when data has waited for the leg to accept bytes.
    blocked: Option<Duration>,
}

/// One session's clocks. Times are offsets from the session's start.
#[derive(Debug, Clone)]
pub struct Liveness {
    timers: SessionTimers,
    /// Where in its jitter range this session's lifetime falls, in [0, 1).
    jitter_unit: f64,
    /// When the device's certificate expires.
    expires: Option<Duration>,
    device: LegState,
    backend: LegState,
    last_data: Duration,
}

impl Liveness {
    pub fn new(timers: SessionTimers, jitter_unit: f64, expires: Option<Duration>) -> Self {
        Self {
            timers,
            jitter_unit,
            expires,
            device: LegState::default(),
            backend: LegState::default(),
            last_data: Duration::ZERO,
        }
    }

    /// New settings from a reload; they apply from now on (the session's lifetime is
    /// measured from its start, with the same place in the jitter range).
    pub fn retime(&mut self, timers: SessionTimers) {
        self.timers = timers;
    }

    pub fn timers(&self) -> &SessionTimers {
        &self.timers
    }

    fn leg(&mut self, leg: Leg) -> &mut LegState {
        match leg {
            Leg::Device => &mut self.device,
            Leg::Backend => &mut self.backend,
        }
    }

    /// A frame (of any kind) came from `leg`: it is alive.
    pub fn heard(&mut self, leg: Leg, at: Duration) {
        let state = self.leg(leg);
        state.heard = at;
        state.pinged = None;
    }

    /// A data frame went through, either way.
    pub fn data(&mut self, at: Duration) {
        self.last_data = at;
    }

    /// Whether data waits for `leg` to accept bytes, as of `at`. Returns whether it just
    /// started waiting (a new, possibly earlier, deadline).
    pub fn blocked(&mut self, leg: Leg, blocked: bool, at: Duration) -> bool {
        let state = self.leg(leg);
        let (next, started) = match (blocked, state.blocked) {
            (false, _) => (None, false),
            (true, Some(since)) => (Some(since), false),
            (true, None) => (Some(at), true),
        };
        state.blocked = next;
        started
    }

    fn lifetime(&self) -> Option<Duration> {
        self.timers
            .max_lifetime
            .map(|max| jittered(max, self.timers.lifetime_jitter, self.jitter_unit))
    }

    /// Every deadline with what happens at it; the earliest wins.
    fn deadlines(&self) -> impl Iterator<Item = (Duration, Due)> + '_ {
        let legs = [
            (Leg::Device, self.device, self.timers.device_ping),
            (Leg::Backend, self.backend, self.timers.backend_ping),
        ];
        let pings = legs.into_iter().flat_map(move |(leg, state, rules)| {
            let ping = match state.pinged {
                None => (state.heard + rules.interval, Due::Ping(leg)),
                Some(sent) => (sent + rules.timeout, Due::End(Ending::PingTimeout(leg))),
            };
            let write = state.blocked.map(|since| {
                (
                    since + self.timers.write_timeout,
                    Due::End(Ending::WriteTimeout(leg)),
                )
            });
            std::iter::once(ping).chain(write)
        });
        let idle = self
            .timers
            .idle_timeout
            .map(|t| (self.last_data + t, Due::End(Ending::IdleTimeout)));
        let lifetime = self.lifetime().map(|t| (t, Due::End(Ending::MaxLifetime)));
        let expiry = self
            .expires
            .map(|t| (t, Due::End(Ending::CertificateExpired)));
        pings.chain(idle).chain(lifetime).chain(expiry)
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Duration {
        self.deadlines()
            .map(|(at, _)| at)
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// What is due at `at`: endings before pings. A ping is recorded as sent.
    pub fn due(&mut self, at: Duration) -> Option<Due> {
        let mut ping = None;
        for (deadline, due) in self.deadlines() {
            if deadline > at {
                continue;
            }
            match due {
                Due::End(_) => return Some(due),
                Due::Ping(leg) => ping = ping.or(Some(leg)),
            }
        }
        let leg = ping?;
        self.leg(leg).pinged = Some(at);
        Some(Due::Ping(leg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timers() -> SessionTimers {
        SessionTimers {
            device_ping: PingRules {
                interval: 30 * S,
                timeout: 10 * S,
            },
            backend_ping: PingRules {
                interval: 20 * S,
                timeout: 5 * S,
            },
            idle_timeout: Some(300 * S),
            max_lifetime: Some(3600 * S),
            lifetime_jitter: 0.1,
            write_timeout: 15 * S,
        }
    }

    #[test]
    fn a_silent_leg_is_pinged_then_ended() {
        let mut l = Liveness::new(timers(), 0.0, None);
        assert_eq!(l.next_deadline(), 20 * S);
        assert_eq!(l.due(19 * S), None);
        assert_eq!(l.due(20 * S), Some(Due::Ping(Leg::Backend)));
        // The backend answers; the device stays silent.
        l.heard(Leg::Backend, 21 * S);
        assert_eq!(l.due(30 * S), Some(Due::Ping(Leg::Device)));
        assert_eq!(l.next_deadline(), 40 * S);
        l.heard(Leg::Backend, 39 * S);
        assert_eq!(l.due(39 * S), None);
        assert_eq!(
            l.due(40 * S),
            Some(Due::End(Ending::PingTimeout(Leg::Device)))
        );
    }

    #[test]
    fn any_frame_answers_a_ping() {
        let mut l = Liveness::new(timers(), 0.0, None);
        l.heard(Leg::Backend, 25 * S);
        assert_eq!(l.due(30 * S), Some(Due::Ping(Leg::Device)));
        l.heard(Leg::Device, 31 * S);
        l.heard(Leg::Backend, 31 * S);
        assert_eq!(l.due(45 * S), None);
        assert_eq!(l.next_deadline(), 51 * S);
    }

    #[test]
    fn idle_lifetime_and_expiry() {
        let mut t = timers();
        t.device_ping.interval = 10_000 * S;
        t.backend_ping.interval = 10_000 * S;
        let mut l = Liveness::new(t, 0.5, Some(7200 * S));
        l.data(100 * S);
        assert_eq!(l.next_deadline(), 400 * S);
        assert_eq!(l.due(400 * S), Some(Due::End(Ending::IdleTimeout)));
        // Lifetime: 3600 s less half of 10%.
        t.idle_timeout = None;
        l.retime(t);
        assert_eq!(l.next_deadline(), 3420 * S);
        assert_eq!(l.due(3420 * S), Some(Due::End(Ending::MaxLifetime)));
        t.max_lifetime = None;
        l.retime(t);
        assert_eq!(l.due(7200 * S), Some(Due::End(Ending::CertificateExpired)));
    }

    #[test]
    fn a_leg_that_accepts_nothing_for_the_write_timeout_ends_the_session() {
        let mut l = Liveness::new(timers(), 0.0, None);
        assert!(l.blocked(Leg::Device, true, 2 * S));
        assert!(!l.blocked(Leg::Device, true, 10 * S));
        assert_eq!(l.next_deadline(), 17 * S);
        // Progress resets it.
        l.blocked(Leg::Device, false, 12 * S);
        l.blocked(Leg::Device, true, 13 * S);
        assert_eq!(l.due(17 * S), None);
        assert_eq!(
            l.due(28 * S),
            Some(Due::End(Ending::WriteTimeout(Leg::Device)))
        );
    }

    #[test]
    fn jitter_stays_in_its_range() {
        let max = 1000 * S;
        assert_eq!(jittered(max, 0.1, 0.0), max);
        let low = jittered(max, 0.1, 0.999_999);
        assert!(low > 899 * S && low < 901 * S, "{low:?}");
        assert_eq!(jittered(max, 0.0, 0.7), max);
        assert!(jittered(max, 5.0, 0.5) >= max / 2);
    }
}
