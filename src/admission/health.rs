//! Passive backend health, pure: a backend that fails to connect `eject_after` times in a
//! row is ejected for a backoff that doubles with each ejection in a row (up to a ceiling);
//! once the backoff is over it is tried again, and one more failure ejects it again at
//! once. A success restores it. Times are offsets on the caller's monotonic clock.

use std::time::Duration;

/// When a backend is ejected and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRules {
    /// Consecutive failures that eject; 0: never eject.
    pub eject_after: u32,
    /// First ejection.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
}

/// One backend's health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendHealth {
    failures: u32,
    /// Ejections in a row without a success in between.
    ejections: u32,
    ejected_until: Option<Duration>,
}

/// What a connect outcome changed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Ejected for this long (the n-th ejection in a row).
    Ejected {
        for_: Duration,
        nth: u32,
    },
    /// Connected again after one or more ejections.
    Recovered,
}

impl BackendHealth {
    /// Whether the backend may be tried at `at`.
    pub fn available(&self, at: Duration) -> bool {
        self.ejected_until.is_none_or(|until| at >= until)
    }

    pub fn is_ejected(&self, at: Duration) -> bool {
        !self.available(at)
    }

    /// A connect failed at `at`.
    pub fn failed(&mut self, at: Duration, rules: &HealthRules) -> Change {
        if rules.eject_after == 0 {
            return Change::None;
        }
        self.failures += 1;
        // On probation after an ejection, one failure ejects again.
        if self.failures < rules.eject_after && self.ejections == 0 {
            return Change::None;
        }
        let doubling = 2u32.saturating_pow(self.ejections.min(30));
        let for_ = rules.base.saturating_mul(doubling).min(rules.max);
        self.ejections += 1;
        self.failures = 0;
        self.ejected_until = Some(at + for_);
        Change::Ejected {
            for_,
            nth: self.ejections,
        }
    }

    /// A connect succeeded.
    pub fn succeeded(&mut self) -> Change {
        let was = self.ejections > 0;
        *self = Self::default();
        if was {
            Change::Recovered
        } else {
            Change::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const RULES: HealthRules = HealthRules {
        eject_after: 3,
        base: Duration::from_secs(2),
        max: Duration::from_secs(10),
    };

    #[test]
    fn ejected_after_n_failures_with_a_growing_backoff() {
        let mut h = BackendHealth::default();
        assert_eq!(h.failed(S, &RULES), Change::None);
        assert_eq!(h.failed(S, &RULES), Change::None);
        assert!(h.available(S));
        assert_eq!(
            h.failed(S, &RULES),
            Change::Ejected {
                for_: 2 * S,
                nth: 1
            }
        );
        assert!(h.is_ejected(2 * S));
        assert!(h.available(3 * S));
        // Tried again after the backoff: one failure ejects for twice as long.
        assert_eq!(
            h.failed(3 * S, &RULES),
            Change::Ejected {
                for_: 4 * S,
                nth: 2
            }
        );
        assert_eq!(
            h.failed(7 * S, &RULES),
            Change::Ejected {
                for_: 8 * S,
                nth: 3
            }
        );
        assert_eq!(
            h.failed(15 * S, &RULES),
            Change::Ejected {
                for_: 10 * S,
                nth: 4
            }
        );
        assert_eq!(h.succeeded(), Change::Recovered);
        assert!(h.available(15 * S));
        assert_eq!(h.succeeded(), Change::None);
        assert_eq!(h.failed(16 * S, &RULES), Change::None);
    }

    #[test]
    fn zero_never_ejects() {
        let mut h = BackendHealth::default();
        let rules = HealthRules {
            eject_after: 0,
            ..RULES
        };
        for _ in 0..10 {
            assert_eq!(h.failed(S, &rules), Change::None);
        }
        assert!(h.available(S));
    }
}
