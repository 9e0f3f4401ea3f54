//! Per-session frame policy, pure: which schema a frame needs (by route kind and direction),
//! decode plus validate, and the invalid-frame limit per time window; a session's open
//! commands ([`commands`]); rejection accounting ([`rejections`]). Takes time as an
//! argument; no I/O. The session's frame steps call it for every data frame and record what
//! it rejected (`session::steps`).

pub mod commands;
pub mod limits;
pub mod liveness;
pub mod ownership;
pub mod rejections;

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admission::routing::RouteKind;
use crate::frames::{self, DecodeLimits, Encoding, Frame, RejectCode, Rejection};
use crate::schema::{self, SchemaKind, SchemaSet};

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device to backend.
    Up,
    /// Backend to device.
    Down,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "device-to-backend",
            Direction::Down => "backend-to-device",
        }
    }
}

/// The schema a frame in `direction` on a route of `kind` is checked against. `None`: the
/// frame is forwarded unchecked (backend to device on telemetry routes).
pub fn schema_kind(kind: RouteKind, direction: Direction) -> Option<SchemaKind> {
    match (kind, direction) {
        (RouteKind::Telemetry, Direction::Up) => Some(SchemaKind::Telemetry),
        (RouteKind::Telemetry, Direction::Down) => None,
        (RouteKind::Control, Direction::Up) => Some(SchemaKind::Response),
        (RouteKind::Control, Direction::Down) => Some(SchemaKind::Command),
    }
}

/// Checks one frame (JSON in text frames, CBOR in binary frames; control frames pass).
/// `Ok(Some(value))`: forward it (the decoded value, for command tracking); `Ok(None)`:
/// forward it, nothing was decoded. On control routes every frame is
/// decoded so commands and responses can be matched by id, and a command (backend to
/// device) without an `id` is refused (`missing-id`). A missing optional schema (a control
/// route's response schema) means the frame is decoded but not validated.
pub fn check_frame(
    schemas: &SchemaSet,
    device_type: &str,
    kind: RouteKind,
    direction: Direction,
    frame: Frame<'_>,
    limits: DecodeLimits,
) -> Result<Option<Value>, (Encoding, Rejection)> {
    let Some((encoding, bytes)) = frame.data() else {
        return Ok(None);
    };
    // Required schemas were checked at the handshake; an optional one may be absent.
    let validator = schema_kind(kind, direction).and_then(|k| schemas.get(device_type, k));
    if validator.is_none() && kind != RouteKind::Control {
        return Ok(None);
    }
    let value = frames::decode(encoding, bytes, limits).map_err(|r| (encoding, r))?;
    if kind == RouteKind::Control
        && direction == Direction::Down
        && frames::frame_id(&value).is_none()
    {
        return Err((
            encoding,
            Rejection::new(
                RejectCode::MissingId,
                "/id",
                format!(
                    "a command needs a top-level \"id\": a string of 1-{} bytes or an unsigned integer",
                    frames::MAX_ECHOED_ID_BYTES
                ),
            ),
        ));
    }
    if let Some(validator) = validator {
        schema::validate(validator, &value).map_err(|mut r| {
            r.id = frames::frame_id(&value);
            (encoding, r)
        })?;
    }
    Ok(Some(value))
}

/// Counts invalid frames in a fixed window; `record` says when the limit is passed.
#[derive(Debug, Clone)]
pub struct InvalidFrameLimit {
    limit: u32,
    window: Duration,
    started: Option<Instant>,
    count: u32,
}

impl InvalidFrameLimit {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            started: None,
            count: 0,
        }
    }

    /// Records one invalid frame at `now`; true when this one exceeds the limit.
    pub fn record(&mut self, now: Instant) -> bool {
        match self.started {
            Some(start) if now.duration_since(start) < self.window => self.count += 1,
            _ => {
                self.started = Some(now);
                self.count = 1;
            }
        }
        self.count > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_counts_within_a_window() {
        let t0 = Instant::now();
        let mut l = InvalidFrameLimit::new(2, Duration::from_secs(10));
        assert!(!l.record(t0));
        assert!(!l.record(t0 + Duration::from_secs(1)));
        assert!(l.record(t0 + Duration::from_secs(2)));
        // A new window starts after the old one ends.
        let mut l = InvalidFrameLimit::new(2, Duration::from_secs(10));
        assert!(!l.record(t0));
        assert!(!l.record(t0 + Duration::from_secs(1)));
        assert!(!l.record(t0 + Duration::from_secs(11)));
        assert!(!l.record(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn schema_by_route_and_direction() {
        assert_eq!(
            schema_kind(RouteKind::Telemetry, Direction::Up),
            Some(SchemaKind::Telemetry)
        );
        assert_eq!(schema_kind(RouteKind::Telemetry, Direction::Down), None);
        assert_eq!(
            schema_kind(RouteKind::Control, Direction::Down),
            Some(SchemaKind::Command)
        );
        assert_eq!(
            schema_kind(RouteKind::Control, Direction::Up),
            Some(SchemaKind::Response)
        );
    }

    #[test]
    fn frames_checked_against_the_shipped_schemas() {
        let set = crate::config::load_schemas(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"),
        )
        .unwrap();
        let limits = DecodeLimits { max_depth: 16 };
        let ok = Frame::Text(
            br#"{"type":"reading","seq":1,"ts":1,"temperature_c":21.5,"humidity_pct":40}"#,
        );
        assert!(check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Up,
            ok,
            limits
        )
        .is_ok());
        let hot = Frame::Text(
            br#"{"id":"r1","type":"reading","seq":1,"ts":1,"temperature_c":121.5,"humidity_pct":40}"#,
        );
        let (enc, r) = check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Up,
            hot,
            limits,
        )
        .unwrap_err();
        assert_eq!(enc, Encoding::Json);
        assert_eq!(r.pointer, "/temperature_c");
        assert_eq!(r.id, Some(serde_json::json!("r1")));
        let mut cbor = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({"id": 5, "command": "explode"}),
            &mut cbor,
        )
        .unwrap();
        let (enc, r) = check_frame(
            &set,
            "door-lock",
            RouteKind::Control,
            Direction::Down,
            Frame::Binary(&cbor),
            limits,
        )
        .unwrap_err();
        assert_eq!(
            (enc, r.pointer.as_str(), r.id),
            (Encoding::Cbor, "/command", Some(serde_json::json!(5)))
        );
        // Anything goes down a telemetry route; pings are never checked.
        assert!(check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Down,
            Frame::Text(b"x"),
            limits
        )
        .is_ok());
        assert!(check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Up,
            Frame::Control,
            limits
        )
        .is_ok());
    }
}
