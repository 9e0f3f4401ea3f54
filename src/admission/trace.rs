//! W3C Trace Context (`traceparent`) for sessions: every session gets one, sent to the
//! backend in the upgrade request and written in the session's log lines as `trace.id`, so a
//! backend's traces join the gateway's logs. A route with `continue_trace = true` continues
//! the device's own trace (a new span in it) when the device sent a valid `traceparent`;
//! otherwise the gateway starts a new trace. Randomness comes from the caller.

/// A parsed or generated trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

fn hex_u128(s: &str) -> Option<u128> {
    (s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u128::from_str_radix(s, 16).ok())
    .flatten()
}

fn hex_u64(s: &str) -> Option<u64> {
    (s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u64::from_str_radix(s, 16).ok())
    .flatten()
}

impl TraceContext {
    /// Parses a `traceparent` value (W3C Trace Context level 1): `VERSION-TRACEID-PARENTID-
    /// FLAGS`, lower-case hex. Version `ff` and all-zero ids are invalid; a later version is
    /// read by its first four fields, as the specification asks.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let version_ok = version.len() == 2
            && version
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && version != "ff";
        // Version 00 has exactly four fields; later versions may add more.
        if !version_ok || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = hex_u128(trace).filter(|t| *t != 0)?;
        let span_id = hex_u64(parent).filter(|s| *s != 0)?;
        if flags.len() != 2
            || !flags
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A new trace (sampled). A zero id (one chance in 2^128) is made non-zero.
    pub fn new_root(trace_id: u128, span_id: u64) -> Self {
        Self {
            trace_id: trace_id.max(1),
            span_id: span_id.max(1),
            sampled: true,
        }
    }

    /// A new span in this trace, with this context's sampling decision.
    pub fn child(&self, span_id: u64) -> Self {
        Self {
            span_id: span_id.max(1),
            ..*self
        }
    }

    /// The session's context: the device's continued when the route allows it and the
    /// device sent a valid one, otherwise a new trace.
    pub fn for_session(device: Option<&str>, continue_trace: bool, random: (u128, u64)) -> Self {
        match device.filter(|_| continue_trace).and_then(Self::parse) {
            Some(parent) => parent.child(random.1),
            None => Self::new_root(random.0, random.1),
        }
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The trace id as logged (`trace.id`).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let t = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(t.header(), EXAMPLE);
    }

    #[test]
    fn invalid_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its first four fields.
        assert!(TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what"
        )
        .is_some());
    }

    #[test]
    fn a_session_continues_the_devices_trace_only_where_the_route_allows() {
        let continued = TraceContext::for_session(Some(EXAMPLE), true, (7, 9));
        assert_eq!(continued.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(continued.span_id, 9);
        let fresh = TraceContext::for_session(Some(EXAMPLE), false, (7, 9));
        assert_eq!((fresh.trace_id, fresh.span_id, fresh.sampled), (7, 9, true));
        let garbage = TraceContext::for_session(Some("nonsense"), true, (7, 9));
        assert_eq!(garbage.trace_id, 7);
        assert_eq!(
            TraceContext::new_root(0, 0).header(),
            format!("00-{:032x}-{:016x}-01", 1, 1)
        );
    }
}
