//! The per-frame work of a session as a chain of small steps that a route composes, each
//! owning its own state (like tower layers): validation first ([`Validate`], the core's
//! `policy::check_frame`), then every step sees each accepted frame and each rejection.
//! Counting ([`CountRejections`]), dead letters ([`DeadLetters`]), the invalid-frame window
//! ([`InvalidFrameWindow`]), the connection's audit records ([`ConnectionAudit`]) and the
//! command lifecycle on control routes ([`Commands`]) are separate steps; a rate limit or a
//! metric is one more, without touching the others. [`Chain`] is what the relay talks to.
//!
//! Time comes from [`now`], tokio's clock, so tests run the steps under paused time.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Instant;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::relay::{Hold, Inspector, Verdict};
use crate::admission::routing::{Route, RouteKind};
use crate::audit::{stored_payload, AuditStore, Record, RecordKind};
use crate::frames::{self, DecodeLimits, Encoding, Frame, RejectCode, Rejection};
use crate::model::sha256_hex;
use crate::policy::commands::OpenCommands;
use crate::policy::limits::{LimitName, RateVerdict, SessionLimits};
use crate::policy::rejections::{LogDecision, LogLimiter, RejectionStats};
use crate::policy::{self, Direction, InvalidFrameLimit};
use crate::storage::DeadLetterSink;
use crate::wire::SessionEnd;

/// The session clock: tokio's, so paused test time controls every deadline.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Who a session is, shared by its steps.
#[derive(Debug)]
pub struct SessionInfo {
    pub device_id: String,
    pub device_type: String,
    pub route: Arc<Route>,
    pub backend_url: String,
    pub conn_id: String,
}

/// One frame as the steps see it.
pub struct Inspected<'a> {
    pub direction: Direction,
    pub encoding: Encoding,
    pub bytes: &'a [u8],
    /// The decoded value, when the frame was decoded.
    pub value: Option<&'a Value>,
}

/// What a step says about an accepted frame.
pub enum Outcome {
    /// Nothing to add: the next step decides.
    Pass,
    /// Forward it once this completes (a command's audit record is on disk).
    Hold(Hold),
    /// Refuse it after all; every step hears about the rejection.
    Refuse(Rejection),
}

/// One step of the chain. Every method has a do-nothing default.
pub trait FrameStep: Send {
    /// A frame passed validation. The first step that does not say [`Outcome::Pass`]
    /// decides.
    fn accepted(&mut self, _frame: &Inspected<'_>, _now: Instant) -> Outcome {
        Outcome::Pass
    }
    /// A frame was refused (by validation or by a step). `true` ends the session.
    fn rejected(&mut self, _frame: &Inspected<'_>, _rejection: &Rejection, _now: Instant) -> bool {
        false
    }
    /// A frame held by [`Outcome::Hold`] was forwarded.
    fn forwarded(&mut self, _direction: Direction, _now: Instant) {}
    /// Drives the step's own timers; called on every wake-up of the session.
    fn poll_timers(&mut self, _cx: &mut Context<'_>) {}
    /// The session ended.
    fn finish(&mut self, _end: &SessionEnd) {}
}

/// Decodes and validates each frame against the device type's schema, in the runtime
/// snapshot in force when the frame arrives (a schema reload applies to open sessions).
pub struct Validate {
    pub live: crate::live::LiveHandle,
    pub limits: DecodeLimits,
}

fn frame_of(msg: &Message) -> Frame<'_> {
    match msg {
        Message::Text(t) => Frame::Text(t.as_bytes()),
        Message::Binary(b) => Frame::Binary(b),
        _ => Frame::Control,
    }
}

/// The reply frame for a rejection, in the sender's encoding.
pub fn error_message(encoding: Encoding, rejection: &Rejection) -> Message {
    let bytes = frames::error_frame(encoding, rejection);
    match encoding {
        Encoding::Json => Message::text(String::from_utf8_lossy(&bytes).into_owned()),
        Encoding::Cbor => Message::binary(bytes),
    }
}

/// Counts rejections per (type, route, reason) and logs them, rate-limited across sessions.
pub struct CountRejections {
    pub info: Arc<SessionInfo>,
    pub stats: Arc<RejectionStats>,
    pub log: Arc<LogLimiter>,
}

impl FrameStep for CountRejections {
    fn rejected(&mut self, frame: &Inspected<'_>, rejection: &Rejection, now: Instant) -> bool {
        let code = rejection.code.as_str();
        self.stats
            .count(&self.info.device_type, &self.info.route.subprotocol, code);
        if let LogDecision::Log { suppressed_before } = self.log.check(now) {
            tracing::info!(
                device.id = %self.info.device_id,
                device.r#type = %self.info.device_type,
                route = %self.info.route.subprotocol,
                direction = frame.direction.as_str(),
                reason = code,
                pointer = %rejection.pointer,
                suppressed_before,
                "frame rejected"
            );
        }
        false
    }
}

/// Hands each rejected frame to the dead-letter writer (never waits on storage).
pub struct DeadLetters {
    pub info: Arc<SessionInfo>,
    pub sink: DeadLetterSink,
    pub max_payload_bytes: usize,
}

impl FrameStep for DeadLetters {
    fn rejected(&mut self, frame: &Inspected<'_>, rejection: &Rejection, _now: Instant) -> bool {
        let encoding = match frame.encoding {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        };
        self.sink.send(crate::storage::letter(
            &self.info.device_id,
            &self.info.route.subprotocol,
            frame.direction.as_str(),
            encoding,
            rejection,
            frame.bytes,
            self.max_payload_bytes,
        ));
        false
    }
}

/// Ends the session when the device sends more invalid frames per window than its route
/// allows (close 1007). A backend's invalid commands only get error frames.
pub struct InvalidFrameWindow {
    pub limit: InvalidFrameLimit,
}

impl FrameStep for InvalidFrameWindow {
    fn rejected(&mut self, frame: &Inspected<'_>, _rejection: &Rejection, now: Instant) -> bool {
        frame.direction == Direction::Up && self.limit.record(now)
    }
}

/// What the audit steps need to write records.
#[derive(Clone)]
pub struct AuditContext {
    pub log: Arc<dyn AuditStore>,
    pub info: Arc<SessionInfo>,
    pub redact: Arc<[String]>,
    pub max_payload_bytes: usize,
}

impl AuditContext {
    fn event(&self, kind: RecordKind) -> Record {
        Record {
            device: self.info.device_id.clone(),
            kind,
            route: Some(self.info.route.subprotocol.clone()),
            backend: Some(self.info.backend_url.clone()),
            connection: Some(self.info.conn_id.clone()),
            ..Default::default()
        }
    }

    fn with_payload(&self, mut event: Record, frame: &[u8], value: Option<&Value>) -> Record {
        match value {
            Some(v) => {
                let (text, truncated, sha) =
                    stored_payload(frame, v, &self.redact, self.max_payload_bytes);
                event.payload = Some(text);
                event.payload_truncated = truncated;
                event.payload_sha256 = Some(sha);
            }
            None => event.payload_sha256 = Some(sha256_hex(frame)),
        }
        event
    }
}

/// The connection's own records: `connected` when the step is made, `disconnected` when
/// the session ends, or, if the session is dropped before it ends (forced shutdown), when
/// the step is dropped.
pub struct ConnectionAudit {
    audit: AuditContext,
    finished: bool,
}

impl ConnectionAudit {
    pub fn start(audit: AuditContext) -> Self {
        audit.log.record(audit.event(RecordKind::Connected));
        Self {
            audit,
            finished: false,
        }
    }
}

impl FrameStep for ConnectionAudit {
    fn finish(&mut self, end: &SessionEnd) {
        let mut e = self.audit.event(RecordKind::Disconnected);
        e.detail = Some(end.describe());
        self.audit.log.record(e);
        self.finished = true;
    }
}

impl Drop for ConnectionAudit {
    fn drop(&mut self) {
        if !self.finished {
            let mut e = self.audit.event(RecordKind::Disconnected);
            e.detail = Some("session dropped at shutdown after the grace period".into());
            self.audit.log.record(e);
        }
    }
}

/// The command lifecycle on control routes: ids required (checked by validation), at most
/// `max_open` open commands, each command's record durable before it is forwarded,
/// responses matched by id, timeouts, unanswered commands at the end, rejections recorded.
/// Without an audit log it still tracks open commands, so the limit frees up.
pub struct Commands {
    audit: Option<AuditContext>,
    open: OpenCommands,
    /// The id of the command whose audit record is being written (held by the relay).
    held: Option<Value>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Commands {
    pub fn new(audit: Option<AuditContext>, open: OpenCommands) -> Self {
        Self {
            audit,
            open,
            held: None,
            timer: None,
            metrics: None,
        }
    }

    /// Records every command still open (the session is ending, or is dropped).
    fn unanswered(&mut self) {
        for id in self.open.drain() {
            self.count("unanswered");
            self.record(|a| {
                let mut e = a.event(RecordKind::Unanswered);
                e.command_id = Some(id);
                e.detail = Some("the session ended before the device answered".into());
                e
            });
        }
    }

    fn count(&self, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.command(outcome);
        }
    }

    fn record(&self, event: impl FnOnce(&AuditContext) -> Record) {
        if let Some(a) = &self.audit {
            a.log.record(event(a));
        }
    }

    /// A valid command from the backend: recorded (durably) before it is forwarded.
    fn command(&mut self, frame: &Inspected<'_>, value: &Value, now: Instant) -> Outcome {
        let Some(id) = frames::frame_id(value) else {
            return Outcome::Pass;
        };
        if !self.open.has_room() {
            let mut r = Rejection::new(
                RejectCode::RateLimited,
                "",
                format!(
                    "the device has {} commands open; wait for answers or timeouts",
                    self.open.len()
                ),
            );
            r.id = Some(id);
            return Outcome::Refuse(r);
        }
        let Some(audit) = &self.audit else {
            self.open.sent(&id, now);
            return Outcome::Pass;
        };
        let mut event = audit.event(RecordKind::CommandSent);
        event.command_id = Some(id.clone());
        let event = audit.with_payload(event, frame.bytes, Some(value));
        let log = audit.log.clone();
        self.held = Some(id.clone());
        Outcome::Hold(Box::pin(async move {
            match log.record_durable(event).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "command refused: audit log unavailable");
                    let mut r = Rejection::new(
                        RejectCode::AuditUnavailable,
                        "",
                        "the command was not delivered: the audit log cannot be written",
                    );
                    r.id = Some(id);
                    Err(r)
                }
            }
        }))
    }

    /// A valid frame from the device: the answer to a command, or not.
    fn response(&mut self, frame: &Inspected<'_>, value: &Value, now: Instant) {
        let id = frames::frame_id(value);
        let rtt = id.as_ref().and_then(|id| self.open.answer(id, now));
        if let (Some(rtt), Some(m)) = (rtt, &self.metrics) {
            m.command("answered");
            m.command_round_trip_ms.observe(rtt.as_secs_f64() * 1000.0);
        }
        self.record(|a| {
            let mut e = match (&id, rtt) {
                (Some(_), Some(rtt)) => {
                    let mut e = a.event(RecordKind::Responded);
                    e.rtt_us = Some(rtt.as_micros() as u64);
                    e.verdict = Some(match value.get("status") {
                        Some(Value::String(s)) => s.clone(),
                        _ => "answered".into(),
                    });
                    e
                }
                (Some(_), None) => a.event(RecordKind::UnmatchedResponse),
                (None, _) => {
                    let mut e = a.event(RecordKind::UnmatchedResponse);
                    e.detail = Some("no id".into());
                    e
                }
            };
            e.command_id = id.clone();
            a.with_payload(e, frame.bytes, Some(value))
        });
    }
}

impl FrameStep for Commands {
    fn accepted(&mut self, frame: &Inspected<'_>, now: Instant) -> Outcome {
        let Some(value) = frame.value else {
            return Outcome::Pass;
        };
        match frame.direction {
            Direction::Down => self.command(frame, value, now),
            Direction::Up => {
                self.response(frame, value, now);
                Outcome::Pass
            }
        }
    }

    fn rejected(&mut self, frame: &Inspected<'_>, rejection: &Rejection, _now: Instant) -> bool {
        if rejection.code == RejectCode::AuditUnavailable {
            // The held command was not delivered.
            self.held = None;
        }
        self.record(|a| {
            let mut event = a.event(RecordKind::Rejected);
            event.command_id = rejection.id.clone();
            event.detail = Some(format!(
                "{} {}: {} {}",
                if frame.direction == Direction::Down {
                    "command"
                } else {
                    "response"
                },
                rejection.code.as_str(),
                rejection.pointer,
                rejection.message
            ));
            a.with_payload(event, frame.bytes, None)
        });
        false
    }

    fn forwarded(&mut self, _direction: Direction, now: Instant) {
        if let Some(id) = self.held.take() {
            self.open.sent(&id, now);
        }
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        use std::future::Future;
        loop {
            let Some(deadline) = self.open.next_deadline() else {
                self.timer = None;
                return;
            };
            let deadline = tokio::time::Instant::from_std(deadline);
            match &mut self.timer {
                Some(t) if t.deadline() == deadline => {}
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            let Some(timer) = self.timer.as_mut() else {
                return;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            for id in self.open.expire(now()) {
                self.count("timed_out");
                self.record(|a| {
                    let mut e = a.event(RecordKind::TimedOut);
                    e.command_id = Some(id);
                    e
                });
            }
        }
    }

    fn finish(&mut self, _end: &SessionEnd) {
        self.unanswered();
    }
}

impl Drop for Commands {
    fn drop(&mut self) {
        // Empty after `finish`; a session dropped at shutdown still records its open commands.
        self.unanswered();
    }
}

/// The device type's limits, checked before validation on frames from the device.
pub struct Rates {
    pub limits: SessionLimits,
    /// Hits per (type, route, limit:action).
    pub hits: Arc<RejectionStats>,
}

/// The device's limits, then validation, then the route's steps; the relay's [`Inspector`].
pub struct Chain {
    pub info: Arc<SessionInfo>,
    pub rates: Rates,
    pub validate: Validate,
    pub steps: Vec<Box<dyn FrameStep>>,
    /// Frames refused in this session.
    pub rejected: u64,
}

/// Holds a frame `wait`, then what else held it (a command's audit record).
fn delayed(wait: std::time::Duration, then: Option<Hold>) -> Hold {
    Box::pin(async move {
        tokio::time::sleep(wait).await;
        match then {
            Some(hold) => hold.await,
            None => Ok(()),
        }
    })
}

impl Chain {
    fn hit(&self, limit: LimitName, action: &'static str) {
        self.rates.hits.count(
            &self.info.device_type,
            &self.info.route.subprotocol,
            limit.hit(action),
        );
    }

    /// A frame over a rate with `reject`: dropped and answered, counted as a rejection; the
    /// other steps do not see it (it is not malformed: no dead letter, and it does not count
    /// towards the invalid-frame limit).
    fn rate_rejected(&mut self, encoding: Encoding, limit: LimitName) -> Verdict {
        self.rejected += 1;
        self.hit(limit, "reject");
        let rules = self.rates.limits.limits();
        let detail = match limit {
            LimitName::BytesPerSecond => rules.bytes.map(|r| (r.per_second, r.burst)),
            _ => rules.frames.map(|r| (r.per_second, r.burst)),
        };
        let message = match detail {
            Some((rate, burst)) => format!(
                "{} exceeded ({rate} per second, burst {burst}); frame dropped",
                limit.as_str()
            ),
            None => format!("{} exceeded; frame dropped", limit.as_str()),
        };
        let rejection = Rejection::new(RejectCode::RateLimited, "", message);
        let reply = self
            .info
            .route
            .frames
            .error_replies
            .then(|| error_message(encoding, &rejection));
        Verdict::Reject { reply }
    }

    /// Runs every step's rejection hook; the verdict for the frame.
    fn reject(&mut self, frame: &Inspected<'_>, rejection: Rejection, now: Instant) -> Verdict {
        self.rejected += 1;
        let mut close = false;
        for step in &mut self.steps {
            close |= step.rejected(frame, &rejection, now);
        }
        if close {
            return Verdict::RejectAndClose;
        }
        let reply = self
            .info
            .route
            .frames
            .error_replies
            .then(|| error_message(frame.encoding, &rejection));
        Verdict::Reject { reply }
    }

    /// The session ended: every step hears how.
    pub fn finish(&mut self, end: &SessionEnd) {
        for step in &mut self.steps {
            step.finish(end);
        }
    }
}

impl Chain {
    /// Validation, then the route's steps. An opaque route forwards every frame as it came.
    fn validate_and_step(&mut self, direction: Direction, frame: Frame<'_>) -> Verdict {
        if !self.info.route.validate {
            return Verdict::Forward;
        }
        let checked = {
            let live = self.validate.live.load();
            policy::check_frame(
                &live.schemas,
                &self.info.device_type,
                self.info.route.kind,
                direction,
                frame,
                self.validate.limits,
            )
        };
        let Some((encoding, bytes)) = frame.data() else {
            return Verdict::Forward;
        };
        let now = now();
        match checked {
            Ok(value) => {
                let inspected = Inspected {
                    direction,
                    encoding,
                    bytes,
                    value: value.as_ref(),
                };
                for i in 0..self.steps.len() {
                    let outcome = match self.steps.get_mut(i) {
                        Some(step) => step.accepted(&inspected, now),
                        None => Outcome::Pass,
                    };
                    match outcome {
                        Outcome::Pass => {}
                        Outcome::Hold(hold) => return Verdict::ForwardAfter(hold),
                        Outcome::Refuse(r) => return self.reject(&inspected, r, now),
                    }
                }
                Verdict::Forward
            }
            Err((encoding, rejection)) => {
                let inspected = Inspected {
                    direction,
                    encoding,
                    bytes,
                    value: None,
                };
                self.reject(&inspected, rejection, now)
            }
        }
    }
}

impl Inspector for Chain {
    fn inspect(&mut self, direction: Direction, msg: &Message) -> Verdict {
        let frame = frame_of(msg);
        let mut delay = None;
        if direction == Direction::Up {
            if let Some((encoding, bytes)) = frame.data() {
                match self.rates.limits.check(bytes.len(), now()) {
                    RateVerdict::Pass => {}
                    RateVerdict::Delay(wait, limit) => {
                        self.hit(limit, "delay");
                        delay = Some(wait);
                    }
                    RateVerdict::Reject(limit) => return self.rate_rejected(encoding, limit),
                    RateVerdict::Abuse(limit) => {
                        self.rejected += 1;
                        self.hit(limit, "close");
                        return Verdict::End(SessionEnd::OverLimit {
                            code: crate::wire::close_code::POLICY,
                            limit: limit.as_str(),
                        });
                    }
                    RateVerdict::TooBig => {
                        self.rejected += 1;
                        self.hit(LimitName::MaxMessageBytes, "close");
                        return Verdict::End(SessionEnd::OverLimit {
                            code: crate::wire::close_code::SIZE,
                            limit: LimitName::MaxMessageBytes.as_str(),
                        });
                    }
                }
            }
        }
        match (self.validate_and_step(direction, frame), delay) {
            (verdict, None) => verdict,
            (Verdict::Forward, Some(wait)) => Verdict::ForwardAfter(delayed(wait, None)),
            (Verdict::ForwardAfter(hold), Some(wait)) => {
                Verdict::ForwardAfter(delayed(wait, Some(hold)))
            }
            (verdict, Some(_)) => verdict,
        }
    }
    fn released(
        &mut self,
        direction: Direction,
        msg: &Message,
        result: Result<(), Rejection>,
    ) -> Option<Message> {
        let now = now();
        match result {
            Ok(()) => {
                for step in &mut self.steps {
                    step.forwarded(direction, now);
                }
                None
            }
            Err(rejection) => {
                let (encoding, bytes) = frame_of(msg).data()?;
                let inspected = Inspected {
                    direction,
                    encoding,
                    bytes,
                    value: None,
                };
                match self.reject(&inspected, rejection, now) {
                    Verdict::Reject { reply } => reply,
                    _ => None,
                }
            }
        }
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        for step in &mut self.steps {
            step.poll_timers(cx);
        }
    }

    /// New limits from a reload: the rates start again with a full burst.
    fn set_limits(&mut self, limits: crate::policy::limits::DeviceLimits) {
        self.rates.limits = SessionLimits::new(limits, now());
    }
}

/// Where and how a session's audit records are written.
pub struct AuditSettings {
    pub log: Arc<dyn AuditStore>,
    /// Field names whose values are replaced before a payload is stored.
    pub redact: Arc<[String]>,
    pub max_payload_bytes: usize,
}

/// The steps a route gets, in order.
pub struct StepConfig {
    /// The device type's limits and where their hits are counted.
    pub limits: crate::policy::limits::DeviceLimits,
    pub limit_hits: Arc<RejectionStats>,
    pub stats: Arc<RejectionStats>,
    pub log: Arc<LogLimiter>,
    pub dead_letters: DeadLetterSink,
    pub dead_letter_payload_bytes: usize,
    pub audit: Option<AuditSettings>,
    pub command_timeout: std::time::Duration,
    /// Where command outcomes and round trips are counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Builds the chain for one session: counting, dead letters and the invalid-frame window on
/// every route, the connection's audit records when there is a log, the command lifecycle
/// on control routes.
pub fn chain(info: Arc<SessionInfo>, validate: Validate, cfg: StepConfig) -> Chain {
    let route = info.route.clone();
    let audit = cfg.audit.map(|a| AuditContext {
        log: a.log,
        info: info.clone(),
        redact: a.redact,
        max_payload_bytes: a.max_payload_bytes,
    });
    let mut steps: Vec<Box<dyn FrameStep>> = vec![
        Box::new(CountRejections {
            info: info.clone(),
            stats: cfg.stats,
            log: cfg.log,
        }),
        Box::new(DeadLetters {
            info: info.clone(),
            sink: cfg.dead_letters,
            max_payload_bytes: cfg.dead_letter_payload_bytes,
        }),
    ];
    // `connected` is recorded now; the step goes after the commands so that at the end
    // (and on a forced drop) the unanswered commands come before `disconnected`.
    let connection = audit.clone().map(ConnectionAudit::start);
    if route.kind == RouteKind::Control {
        let mut commands = Commands::new(
            audit,
            OpenCommands::new(cfg.command_timeout, cfg.limits.commands_in_flight),
        );
        commands.metrics = cfg.metrics;
        steps.push(Box::new(commands));
    }
    if let Some(connection) = connection {
        steps.push(Box::new(connection));
    }
    steps.push(Box::new(InvalidFrameWindow {
        limit: InvalidFrameLimit::new(
            route.frames.invalid_frame_limit,
            route.frames.invalid_frame_window,
        ),
    }));
    Chain {
        info,
        rates: Rates {
            limits: SessionLimits::new(cfg.limits, now()),
            hits: cfg.limit_hits,
        },
        validate,
        steps,
        rejected: 0,
    }
}
