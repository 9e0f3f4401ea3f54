//! Open commands of one session, pure: which command ids were sent and when, which answer
//! matches, which have passed their deadline. Takes time as an argument. The session records
//! what this decides in the audit log (`session::steps::Commands`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The key an id is matched by: its JSON text (so `1` and `"1"` are different ids).
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

#[derive(Debug, Clone)]
struct Open {
    id: Value,
    sent: Instant,
    deadline: Instant,
}

/// Open commands, by id.
#[derive(Debug)]
pub struct OpenCommands {
    open: HashMap<String, Open>,
    timeout: Duration,
    max_open: usize,
}

impl OpenCommands {
    pub fn new(timeout: Duration, max_open: usize) -> Self {
        Self {
            open: HashMap::new(),
            timeout,
            max_open,
        }
    }

    /// Whether another command may be sent now.
    pub fn has_room(&self) -> bool {
        self.open.len() < self.max_open
    }

    /// A command was delivered at `now`. A repeated id replaces the older entry.
    pub fn sent(&mut self, id: &Value, now: Instant) {
        self.open.insert(
            id_key(id),
            Open {
                id: id.clone(),
                sent: now,
                deadline: now + self.timeout,
            },
        );
    }

    /// A response with `id` arrived at `now`: the round-trip time, if the command was open.
    pub fn answer(&mut self, id: &Value, now: Instant) -> Option<Duration> {
        self.open
            .remove(&id_key(id))
            .map(|o| now.saturating_duration_since(o.sent))
    }

    /// Removes and returns the ids whose deadline passed at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Value> {
        let expired: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.open.remove(&k).map(|o| o.id))
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|o| o.deadline).min()
    }

    /// Every open id (the session is ending).
    pub fn drain(&mut self) -> Vec<Value> {
        self.open.drain().map(|(_, o)| o.id).collect()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_timeouts_and_room() {
        let t0 = Instant::now();
        let mut c = OpenCommands::new(Duration::from_secs(5), 2);
        c.sent(&json!(1), t0);
        c.sent(&json!("1"), t0 + Duration::from_secs(1));
        assert!(!c.has_room());
        assert_eq!(
            c.answer(&json!(1), t0 + Duration::from_millis(250)),
            Some(Duration::from_millis(250))
        );
        assert_eq!(c.answer(&json!(1), t0), None, "answered once");
        assert_eq!(c.next_deadline(), Some(t0 + Duration::from_secs(6)));
        assert!(c.expire(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(c.expire(t0 + Duration::from_secs(6)), vec![json!("1")]);
        assert!(c.is_empty());
        c.sent(&json!(7), t0);
        assert_eq!(c.drain(), vec![json!(7)]);
    }
}
