//! Session ownership across gateways: which connections, on which gateways, hold a device's
//! sessions on a route, and what the route's duplicate policy makes of a newcomer. The cluster
//! store keeps one [`Entry`] per (device, route) and writes it with compare-and-set; this
//! module only decides (no clock: callers pass `now_ms`).
//!
//! A holder is live while its gateway refreshes it (`seen_ms` within the ownership TTL): the
//! holders of a gateway that died stop counting after the TTL even before the bucket's max
//! age removes the entry, so a device is never locked out for longer than that.

use serde::{Deserialize, Serialize};

use crate::admission::routing::DuplicatePolicy;

/// One session holding a device on a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub gateway: String,
    pub connection: String,
    /// When the session was admitted (Unix ms).
    pub since_ms: i64,
    /// When its gateway last refreshed it (Unix ms).
    pub seen_ms: i64,
}

/// Every holder of one (device, route).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub holders: Vec<Holder>,
}

/// What to do with a newcomer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Write this entry (compare-and-set); the holders it no longer lists are to be ended.
    Write { entry: Entry, evicted: Vec<Holder> },
    /// The policy refuses the newcomer: `open` live sessions, `allowed` at most.
    Refuse { open: usize, allowed: usize },
}

impl Entry {
    /// Holders refreshed within `ttl_ms` of `now_ms`.
    pub fn live(&self, now_ms: i64, ttl_ms: i64) -> impl Iterator<Item = &Holder> {
        self.holders
            .iter()
            .filter(move |h| now_ms.saturating_sub(h.seen_ms) <= ttl_ms)
    }

    fn live_others(&self, me: &Holder, now_ms: i64, ttl_ms: i64) -> Vec<Holder> {
        self.live(now_ms, ttl_ms)
            .filter(|h| (&h.gateway, &h.connection) != (&me.gateway, &me.connection))
            .cloned()
            .collect()
    }
}

/// At admission: `reject` and `allow` count the live holders on every gateway; `takeover`
/// lets the newcomer in and evicts at the upgrade ([`plan_takeover`]).
pub fn plan_admit(
    entry: Option<&Entry>,
    me: &Holder,
    policy: DuplicatePolicy,
    now_ms: i64,
    ttl_ms: i64,
) -> Plan {
    let others = entry.map_or_else(Vec::new, |e| e.live_others(me, now_ms, ttl_ms));
    let allowed = match policy {
        DuplicatePolicy::Takeover => usize::MAX,
        DuplicatePolicy::Reject => 1,
        DuplicatePolicy::Allow(n) => n,
    };
    if others.len() >= allowed {
        return Plan::Refuse {
            open: others.len(),
            allowed,
        };
    }
    let mut holders = others;
    holders.push(me.clone());
    Plan::Write {
        entry: Entry { holders },
        evicted: Vec::new(),
    }
}

/// At a `takeover` newcomer's upgrade: it becomes the only holder; every other live holder
/// is evicted (its gateway ends it with 4007).
pub fn plan_takeover(entry: Option<&Entry>, me: &Holder, now_ms: i64, ttl_ms: i64) -> Plan {
    let evicted = entry.map_or_else(Vec::new, |e| e.live_others(me, now_ms, ttl_ms));
    Plan::Write {
        entry: Entry {
            holders: vec![me.clone()],
        },
        evicted,
    }
}

/// A session ended: the entry without it (`None`: nothing is left, delete the key).
pub fn plan_release(
    entry: &Entry,
    gateway: &str,
    connection: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> Option<Entry> {
    let holders: Vec<Holder> = entry
        .live(now_ms, ttl_ms)
        .filter(|h| (h.gateway.as_str(), h.connection.as_str()) != (gateway, connection))
        .cloned()
        .collect();
    (!holders.is_empty()).then_some(Entry { holders })
}

/// A gateway refreshes its holders: `seen_ms` moves to `now_ms` for the `mine` connections
/// still listed. Those no longer listed were evicted elsewhere (a takeover whose notice was
/// lost): they are returned to be ended, with the holder that replaced them.
pub fn plan_refresh(
    entry: &Entry,
    gateway: &str,
    mine: &[String],
    now_ms: i64,
    ttl_ms: i64,
) -> (Entry, Vec<String>) {
    let mut holders: Vec<Holder> = entry
        .live(now_ms, ttl_ms)
        .filter(|h| h.gateway != gateway || mine.contains(&h.connection))
        .cloned()
        .collect();
    for h in holders.iter_mut().filter(|h| h.gateway == gateway) {
        h.seen_ms = now_ms;
    }
    let gone = mine
        .iter()
        .filter(|c| {
            !entry
                .holders
                .iter()
                .any(|h| h.gateway == gateway && &h.connection == *c)
        })
        .cloned()
        .collect();
    (Entry { holders }, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 15_000;

    fn holder(gw: &str, conn: &str, seen: i64) -> Holder {
        Holder {
            gateway: gw.into(),
            connection: conn.into(),
            since_ms: seen,
            seen_ms: seen,
        }
    }

    #[test]
    fn reject_counts_live_holders_on_every_gateway_and_forgets_dead_ones() {
        let me = holder("b", "b-1", 100_000);
        let held = Entry {
            holders: vec![holder("a", "a-1", 99_000)],
        };
        assert_eq!(
            plan_admit(Some(&held), &me, DuplicatePolicy::Reject, 100_000, TTL),
            Plan::Refuse {
                open: 1,
                allowed: 1
            }
        );
        // Gateway a died: its holder was last refreshed more than a TTL ago.
        let stale = Entry {
            holders: vec![holder("a", "a-1", 100_000 - TTL - 1)],
        };
        assert_eq!(
            plan_admit(Some(&stale), &me, DuplicatePolicy::Reject, 100_000, TTL),
            Plan::Write {
                entry: Entry {
                    holders: vec![me.clone()]
                },
                evicted: vec![]
            }
        );
    }

    #[test]
    fn allow_n_admits_up_to_n_across_gateways() {
        let now = 50_000;
        let mut entry = Entry::default();
        for (i, gw) in ["a", "b", "c"].iter().enumerate() {
            let me = holder(gw, &format!("{gw}-{i}"), now);
            match plan_admit(Some(&entry), &me, DuplicatePolicy::Allow(3), now, TTL) {
                Plan::Write { entry: e, .. } => entry = e,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(entry.holders.len(), 3);
        let fourth = holder("a", "a-9", now);
        assert_eq!(
            plan_admit(Some(&entry), &fourth, DuplicatePolicy::Allow(3), now, TTL),
            Plan::Refuse {
                open: 3,
                allowed: 3
            }
        );
        // The same connection asking again is not counted twice.
        let again = entry.holders[0].clone();
        assert!(matches!(
            plan_admit(Some(&entry), &again, DuplicatePolicy::Allow(3), now, TTL),
            Plan::Write { .. }
        ));
    }

    #[test]
    fn the_same_connection_id_on_two_gateways_is_two_holders() {
        let now = 1_000;
        let entry = Entry {
            holders: vec![holder("a", "x-1", now)],
        };
        let me = holder("b", "x-1", now);
        match plan_takeover(Some(&entry), &me, now, TTL) {
            Plan::Write { evicted, .. } => assert_eq!(evicted, vec![holder("a", "x-1", now)]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn takeover_evicts_every_other_live_holder() {
        let now = 10_000;
        let entry = Entry {
            holders: vec![holder("a", "a-1", now), holder("c", "c-1", now - TTL - 5)],
        };
        let me = holder("b", "b-1", now);
        match plan_takeover(Some(&entry), &me, now, TTL) {
            Plan::Write { entry, evicted } => {
                assert_eq!(entry.holders, vec![me]);
                assert_eq!(evicted, vec![holder("a", "a-1", now)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn release_and_refresh() {
        let now = 20_000;
        let entry = Entry {
            holders: vec![holder("a", "a-1", now - 100), holder("b", "b-1", now - 100)],
        };
        assert_eq!(
            plan_release(&entry, "a", "a-1", now, TTL),
            Some(Entry {
                holders: vec![holder("b", "b-1", now - 100)]
            })
        );
        assert_eq!(
            plan_release(
                &Entry {
                    holders: vec![holder("a", "a-1", now)]
                },
                "a",
                "a-1",
                now,
                TTL
            ),
            None
        );
        // a refreshes a-1 and learns that a-2 was taken over elsewhere.
        let (fresh, gone) = plan_refresh(
            &entry,
            "a",
            &["a-1".to_string(), "a-2".to_string()],
            now,
            TTL,
        );
        assert_eq!(fresh.holders[0].seen_ms, now);
        assert_eq!(fresh.holders[1].seen_ms, now - 100, "b's holder untouched");
        assert_eq!(gone, vec!["a-2".to_string()]);
    }
}
