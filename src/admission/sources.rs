//! Per source address budgets, pure: new handshakes per second (GCRA with a burst, through
//! `governor`) and connections at once. Checked at accept, before any TLS work: a source over
//! either is closed at once. Time is an argument (a clock the caller moves); entries of
//! sources that went quiet are dropped so the table stays bounded by the active sources.

use std::collections::HashMap;
// An address is plain data (`core::net`), not a socket.
use core::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};

/// The budgets of one source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRules {
    /// New handshakes per second, with a burst; `None`: no rate.
    pub handshakes: Option<(NonZeroU32, NonZeroU32)>,
    /// Connections (handshakes and sessions) at once; `None`: no bound.
    pub connections: Option<u32>,
}

/// Why a source's connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    HandshakeRate,
    Connections,
}

impl SourceRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceRefusal::HandshakeRate => "source_handshakes_per_second",
            SourceRefusal::Connections => "source_connections",
        }
    }
}

type Keyed = RateLimiter<
    IpAddr,
    governor::state::keyed::HashMapStateStore<IpAddr>,
    FakeRelativeClock,
    governor::middleware::NoOpMiddleware<<FakeRelativeClock as governor::clock::Clock>::Instant>,
>;

/// Admits after this many, the limiter forgets sources whose burst is whole again.
const FORGET_EVERY: u32 = 4096;

/// Every source's budget.
pub struct SourceBudgets {
    rules: SourceRules,
    clock: FakeRelativeClock,
    at: Duration,
    rate: Option<Keyed>,
    open: HashMap<IpAddr, u32>,
    since_forget: u32,
}

impl std::fmt::Debug for SourceBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceBudgets")
            .field("rules", &self.rules)
            .field("sources_open", &self.open.len())
            .finish()
    }
}

impl SourceBudgets {
    pub fn new(rules: SourceRules) -> Self {
        let clock = FakeRelativeClock::default();
        let rate = rules.handshakes.map(|(per_second, burst)| {
            RateLimiter::hashmap_with_clock(
                Quota::per_second(per_second).allow_burst(burst),
                clock.clone(),
            )
        });
        Self {
            rules,
            clock,
            at: Duration::ZERO,
            rate,
            open: HashMap::new(),
            since_forget: 0,
        }
    }

    /// A new connection from `ip` at `at` (the caller's monotonic offset). On `Ok` the caller
    /// owes one [`SourceBudgets::release`] when the connection ends.
    pub fn admit(&mut self, ip: IpAddr, at: Duration) -> Result<(), SourceRefusal> {
        if at > self.at {
            self.clock.advance(at - self.at);
            self.at = at;
        }
        if let Some(max) = self.rules.connections {
            if self.open.get(&ip).copied().unwrap_or(0) >= max {
                return Err(SourceRefusal::Connections);
            }
        }
        if let Some(rate) = &self.rate {
            if rate.check_key(&ip).is_err() {
                return Err(SourceRefusal::HandshakeRate);
            }
            self.since_forget += 1;
            if self.since_forget >= FORGET_EVERY {
                self.since_forget = 0;
                rate.retain_recent();
            }
        }
        *self.open.entry(ip).or_default() += 1;
        Ok(())
    }

    /// A connection admitted from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.open.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn rate_and_connections_per_source() {
        let mut b = SourceBudgets::new(SourceRules {
            handshakes: Some((nz(10), nz(3))),
            connections: Some(4),
        });
        let (a, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(b.admit(a, Duration::ZERO), Ok(()));
        }
        assert_eq!(
            b.admit(a, Duration::ZERO),
            Err(SourceRefusal::HandshakeRate)
        );
        // Another source has its own budget.
        assert_eq!(b.admit(other, Duration::ZERO), Ok(()));
        // 100 ms later one more handshake; then the connection bound applies.
        assert_eq!(b.admit(a, 100 * MS), Ok(()));
        assert_eq!(b.admit(a, 500 * MS), Err(SourceRefusal::Connections));
        b.release(a);
        assert_eq!(b.open(a), 3);
        assert_eq!(b.admit(a, 500 * MS), Ok(()));
        for _ in 0..4 {
            b.release(a);
        }
        assert_eq!(b.open(a), 0);
    }

    #[test]
    fn no_rules_admit_everything() {
        let mut b = SourceBudgets::new(SourceRules {
            handshakes: None,
            connections: None,
        });
        let a: IpAddr = "::1".parse().unwrap();
        for _ in 0..10_000 {
            assert_eq!(b.admit(a, Duration::ZERO), Ok(()));
        }
        assert_eq!(b.open(a), 10_000);
    }
}
