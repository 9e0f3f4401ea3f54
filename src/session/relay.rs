//! The frame relay between a device's WebSocket and its backend's, in one task with no locks
//! and no queues: each direction holds at most one message in flight (and one read ahead
//! while its destination is blocked, so that a source that closes or vanishes is still
//! seen), so a slow reader on one side slows the other side down instead of growing memory.
//! Writes are batched: the destination is flushed when the source has nothing more ready.
//! Close frames pass through; how a session ends maps to close frames in `wire::SessionEnd`.
//! Every data frame is shown to an [`Inspector`] first (the session's frame steps); a
//! rejected frame is not forwarded and the inspector's error frame goes back to its sender.
//!
//! Each leg answers its own pings; the relay pings a silent leg and ends the session on the
//! session's clocks (`policy::liveness`: ping timeouts, idle, lifetime, certificate expiry,
//! write timeout), and when its [`SessionHandle`] is ended from outside.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::table::SessionHandle;
use crate::frames::Rejection;
use crate::metrics::SessionMetrics;
use crate::policy::limits::DeviceLimits;
use crate::policy::liveness::{Due, Liveness};
use crate::policy::Direction;
use crate::wire::{close_code, Close, Closer, Leg, SessionEnd};

/// A write the relay waits for before it forwards a held frame: `Ok` forwards, `Err` drops
/// the frame (the inspector says what goes back to its sender).
pub type Hold = Pin<Box<dyn Future<Output = Result<(), Rejection>> + Send>>;

/// What to do with one data frame.
pub enum Verdict {
    Forward,
    /// Forward only once `Hold` completes with `Ok` (the command's audit record is on disk).
    /// Nothing more is read from this direction's source meanwhile.
    ForwardAfter(Hold),
    /// Do not forward; send `reply` (if any) back to the sender.
    Reject {
        reply: Option<Message>,
    },
    /// Do not forward, and end the session: the device passed its invalid-frame limit.
    RejectAndClose,
    /// Do not forward, and end the session this way.
    End(SessionEnd),
}

/// Decides about every text and binary frame before it is forwarded.
pub trait Inspector {
    fn inspect(&mut self, direction: Direction, msg: &Message) -> Verdict;

    /// A frame held by [`Verdict::ForwardAfter`] was released: forwarded on `Ok`, dropped on
    /// `Err`; returns the reply to send back to its sender.
    fn released(
        &mut self,
        _direction: Direction,
        _msg: &Message,
        _result: Result<(), Rejection>,
    ) -> Option<Message> {
        None
    }

    /// Drives the inspector's own timers (command timeouts); called on every wake-up.
    fn poll_timers(&mut self, _cx: &mut Context<'_>) {}

    /// A reload gave the device's type new limits.
    fn set_limits(&mut self, _limits: DeviceLimits) {}
}

/// Forwards everything.
pub struct ForwardAll;

impl Inspector for ForwardAll {
    fn inspect(&mut self, _: Direction, _: &Message) -> Verdict {
        Verdict::Forward
    }
}

/// Frames and payload bytes in one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionStats {
    pub frames: u64,
    pub bytes: u64,
}

/// Both directions: `up` is device to backend.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub up: DirectionStats,
    pub down: DirectionStats,
}

/// How one direction stopped.
enum PumpEnd {
    /// The source sent a close frame.
    Closed(Option<Close>),
    /// The source's connection ended without a close frame.
    Vanished,
    /// The source broke the protocol or a limit (the close code to send).
    Protocol(u16),
    /// Writing to the destination failed.
    WriteFailed,
    /// The source passed its invalid-frame limit.
    TooManyInvalid,
    /// The inspector ended the session.
    Ended(SessionEnd),
}

/// One direction's state: at most one message waiting for the destination (and one read
/// ahead of it), and at most one error frame or ping waiting to go back to the source.
struct Pump {
    direction: Direction,
    held: Option<(Hold, Message)>,
    pending: Option<Message>,
    /// Read while the destination was blocked; inspected once `pending` is written.
    lookahead: Option<Message>,
    needs_flush: bool,
    /// A ping from the gateway to the source.
    control: Option<Message>,
    reply: Option<Message>,
    reply_needs_flush: bool,
    stats: DirectionStats,
    /// Since the relay last looked: a frame came from the source / a data frame did.
    heard: bool,
    data: bool,
    /// Largest data frame accepted from the source (set by the relay on each wake).
    max_message: usize,
}

fn classify(e: &WsError) -> PumpEnd {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => PumpEnd::Vanished,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => PumpEnd::Vanished,
        WsError::Capacity(_) => PumpEnd::Protocol(close_code::SIZE),
        WsError::Utf8(_) => PumpEnd::Protocol(close_code::INVALID),
        _ => PumpEnd::Protocol(close_code::PROTOCOL),
    }
}

/// A close frame from the wire, in the core's terms.
fn from_wire(frame: CloseFrame) -> Close {
    Close {
        code: frame.code.into(),
        reason: frame.reason.to_string(),
    }
}

/// A close frame the core decided, for tungstenite.
fn to_wire(close: Close) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(close.code),
        reason: close.reason.into(),
    }
}

fn payload_len(msg: &Message) -> u64 {
    (match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) | Message::Frame(_) => 0,
    }) as u64
}

/// What one read from a source means.
enum Read {
    Data(Message),
    /// A ping or pong (answered by the leg itself) or a raw frame: nothing to forward.
    Control,
    End(PumpEnd),
}

fn read(item: Option<Result<Message, WsError>>) -> Read {
    match item {
        Some(Ok(Message::Close(frame))) => Read::End(PumpEnd::Closed(frame.map(from_wire))),
        Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => Read::Data(msg),
        // Each leg answers its own pings (tungstenite queues the pong and sends it with the
        // next read or write of that stream): forwarding them too would give the sender two
        // pongs, one of them from the far side.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Read::Control,
        Some(Err(e)) => Read::End(classify(&e)),
        None => Read::End(PumpEnd::Vanished),
    }
}

impl Pump {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            held: None,
            pending: None,
            lookahead: None,
            needs_flush: false,
            control: None,
            reply: None,
            reply_needs_flush: false,
            stats: DirectionStats::default(),
            heard: false,
            data: false,
            max_message: usize::MAX,
        }
    }

    /// Data waits for the destination to accept bytes.
    fn destination_blocked(&self) -> bool {
        self.pending.is_some() || self.needs_flush
    }

    /// A reply or ping waits for the source to accept bytes.
    fn source_blocked(&self) -> bool {
        self.control.is_some() || self.reply.is_some() || self.reply_needs_flush
    }

    /// Queues a ping to the source, unless one is already waiting.
    fn ping(&mut self) {
        if self.control.is_none() {
            self.control = Some(Message::Ping(Default::default()));
        }
    }

    /// Writes `msg` back to the source. `Ok(false)`: not ready, keep it for later.
    fn send_back<S>(
        cx: &mut Context<'_>,
        src: &mut S,
        msg: &mut Option<Message>,
    ) -> Result<bool, PumpEnd>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let Some(m) = msg.take() else {
            return Ok(true);
        };
        match Pin::new(&mut *src).poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Err(PumpEnd::Vanished),
            Poll::Pending => {
                *msg = Some(m);
                return Ok(false);
            }
        }
        Pin::new(&mut *src)
            .start_send(m)
            .map_err(|_| PumpEnd::Vanished)?;
        Ok(true)
    }

    /// A data frame read from the source: the inspector decides.
    fn inspect(&mut self, msg: Message, inspector: &mut (dyn Inspector + Send)) -> Option<PumpEnd> {
        self.data = true;
        if payload_len(&msg) > self.max_message as u64 {
            // A limit lowered by a reload after this session's upgrade.
            return Some(PumpEnd::Protocol(close_code::SIZE));
        }
        match inspector.inspect(self.direction, &msg) {
            Verdict::Forward => self.pending = Some(msg),
            Verdict::ForwardAfter(hold) => self.held = Some((hold, msg)),
            Verdict::Reject { reply } => self.reply = reply,
            Verdict::RejectAndClose => return Some(PumpEnd::TooManyInvalid),
            Verdict::End(end) => return Some(PumpEnd::Ended(end)),
        }
        None
    }

    /// Moves messages from `src` to `dst` until one of them is not ready.
    fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        inspector: &mut (dyn Inspector + Send),
    ) -> Poll<PumpEnd>
    where
        S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
        D: Sink<Message, Error = WsError> + Unpin,
    {
        loop {
            for which in 0..2 {
                let slot = if which == 0 {
                    &mut self.control
                } else {
                    &mut self.reply
                };
                let had = slot.is_some();
                match Self::send_back(cx, src, slot) {
                    Ok(true) => self.reply_needs_flush |= had,
                    Ok(false) => return self.flush(cx, src, dst),
                    Err(end) => return Poll::Ready(end),
                }
            }
            if let Some((mut hold, msg)) = self.held.take() {
                match hold.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => {
                        inspector.released(self.direction, &msg, Ok(()));
                        self.pending = Some(msg);
                    }
                    Poll::Ready(Err(rejection)) => {
                        self.reply = inspector.released(self.direction, &msg, Err(rejection));
                        continue;
                    }
                    Poll::Pending => {
                        self.held = Some((hold, msg));
                        return self.flush(cx, src, dst);
                    }
                }
            }
            if let Some(msg) = self.pending.take() {
                match Pin::new(&mut *dst).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::WriteFailed),
                    Poll::Pending => {
                        self.pending = Some(msg);
                        return self.read_ahead(cx, src, dst);
                    }
                }
                let len = payload_len(&msg);
                if Pin::new(&mut *dst).start_send(msg).is_err() {
                    return Poll::Ready(PumpEnd::WriteFailed);
                }
                self.stats.frames += 1;
                self.stats.bytes += len;
                self.needs_flush = true;
            }
            if let Some(msg) = self.lookahead.take() {
                if let Some(end) = self.inspect(msg, inspector) {
                    return Poll::Ready(end);
                }
                continue;
            }
            // Tokio's cooperative budget makes the socket read return Pending after a burst,
            // so this loop yields to other sessions on its own.
            match Pin::new(&mut *src).poll_next(cx) {
                Poll::Ready(item) => {
                    self.heard = true;
                    match read(item) {
                        Read::Data(msg) => {
                            if let Some(end) = self.inspect(msg, inspector) {
                                return Poll::Ready(end);
                            }
                        }
                        Read::Control => {}
                        Read::End(end) => return Poll::Ready(end),
                    }
                }
                Poll::Pending => return self.flush(cx, src, dst),
            }
        }
    }

    /// The destination is blocked: keep reading the source into the read-ahead slot (one
    /// data frame at most), so that its close, its disappearance and its pings are seen.
    fn read_ahead<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D) -> Poll<PumpEnd>
    where
        S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
        D: Sink<Message, Error = WsError> + Unpin,
    {
        while self.lookahead.is_none() {
            match Pin::new(&mut *src).poll_next(cx) {
                Poll::Ready(item) => {
                    self.heard = true;
                    match read(item) {
                        Read::Data(msg) => self.lookahead = Some(msg),
                        Read::Control => {}
                        Read::End(end) => return Poll::Ready(end),
                    }
                }
                Poll::Pending => break,
            }
        }
        self.flush(cx, src, dst)
    }

    /// Flushes what was written since the last flush, to both sides. Ready only when a
    /// flush failed (the pump ends); otherwise Pending.
    fn flush<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D) -> Poll<PumpEnd>
    where
        S: Sink<Message, Error = WsError> + Unpin,
        D: Sink<Message, Error = WsError> + Unpin,
    {
        if self.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::WriteFailed),
                Poll::Pending => {}
            }
        }
        if self.reply_needs_flush {
            match Pin::new(&mut *src).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.reply_needs_flush = false,
                Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::Vanished),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

/// How long after `start` `offset` is, without overflowing on "never".
fn instant_at(start: tokio::time::Instant, offset: Duration) -> tokio::time::Instant {
    // About 30 years: later than any session.
    const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);
    start + offset.min(FAR)
}

/// Relays until either side ends, the session's clocks end it, or its handle is ended
/// (shutdown, or the session table ending it with a reason), then runs the close handshakes
/// (each bounded by `close_timeout`, even when a side does not read). `clock` starts now.
/// Returns how the session ended and what was relayed.
pub async fn relay<D, B>(
    device: &mut WebSocketStream<D>,
    backend: &mut WebSocketStream<B>,
    handle: &SessionHandle,
    close_timeout: Duration,
    mut clock: Liveness,
    inspector: &mut (dyn Inspector + Send),
    metrics: Option<&SessionMetrics>,
) -> (SessionEnd, RelayStats)
where
    D: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pump::new(Direction::Up);
    let mut down = Pump::new(Direction::Down);
    let start = tokio::time::Instant::now();
    let end = {
        let mut cancelled = pin!(handle.token().cancelled());
        let mut retimed = pin!(handle.retimed());
        let mut deadline = instant_at(start, clock.next_deadline());
        let mut sleep = pin!(tokio::time::sleep_until(deadline));
        // Whether the clocks must be asked what is due (the sleep fired, or new timers).
        let mut check = false;
        let counters = handle.counters();
        std::future::poll_fn(|cx| loop {
            // Every arm only polls; nothing is lost when another arm completes first: a
            // message read but not yet written stays in its pump's `pending` slot.
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(match handle.why() {
                    Some(why) => SessionEnd::Ended(why),
                    None => SessionEnd::Shutdown,
                });
            }
            let max_message = handle.max_message();
            up.max_message = max_message;
            down.max_message = max_message;
            if retimed.as_mut().poll(cx).is_ready() {
                if let Some(timers) = handle.take_timers() {
                    clock.retime(timers);
                }
                if let Some(limits) = handle.take_limits() {
                    inspector.set_limits(limits);
                }
                retimed.set(handle.retimed());
                check = true;
                continue;
            }
            if let Poll::Ready(end) = up.poll(cx, device, backend, &mut *inspector) {
                return Poll::Ready(match end {
                    PumpEnd::Closed(f) => SessionEnd::ClosedBy(Closer::Device, f),
                    PumpEnd::Vanished => SessionEnd::DeviceVanished,
                    PumpEnd::Protocol(code) => SessionEnd::DeviceProtocolError(code),
                    PumpEnd::WriteFailed => SessionEnd::BackendVanished,
                    PumpEnd::TooManyInvalid => SessionEnd::InvalidFrameLimit,
                    PumpEnd::Ended(end) => end,
                });
            }
            if let Poll::Ready(end) = down.poll(cx, backend, device, &mut *inspector) {
                return Poll::Ready(match end {
                    PumpEnd::Closed(f) => SessionEnd::ClosedBy(Closer::Backend, f),
                    PumpEnd::Vanished => SessionEnd::BackendVanished,
                    PumpEnd::Protocol(code) => SessionEnd::BackendProtocolError(code),
                    PumpEnd::WriteFailed => SessionEnd::DeviceVanished,
                    // The limit applies to devices; a backend's invalid commands only get
                    // error frames.
                    PumpEnd::TooManyInvalid => {
                        SessionEnd::BackendProtocolError(close_code::INVALID)
                    }
                    PumpEnd::Ended(end) => end,
                });
            }
            // After the pumps: a command they just released arms its timeout here.
            inspector.poll_timers(cx);

            let now = tokio::time::Instant::now().saturating_duration_since(start);
            if std::mem::take(&mut up.heard) {
                clock.heard(Leg::Device, now);
            }
            if std::mem::take(&mut down.heard) {
                clock.heard(Leg::Backend, now);
            }
            if std::mem::take(&mut up.data) | std::mem::take(&mut down.data) {
                clock.data(now);
            }
            // A write that starts waiting may bring a deadline closer; everything else the
            // pumps report only pushes deadlines later, so the sleep armed for the earliest
            // one stays valid (at worst it wakes early, and is re-armed).
            let newly_blocked = clock.blocked(
                Leg::Device,
                down.destination_blocked() || up.source_blocked(),
                now,
            ) | clock.blocked(
                Leg::Backend,
                up.destination_blocked() || down.source_blocked(),
                now,
            );
            report(counters, &up.stats, &down.stats, metrics);
            if std::mem::take(&mut check) || newly_blocked {
                match clock.due(now) {
                    Some(Due::End(why)) => return Poll::Ready(SessionEnd::Ended(why)),
                    Some(Due::Ping(leg)) => {
                        match leg {
                            Leg::Device => up.ping(),
                            Leg::Backend => down.ping(),
                        }
                        // The other leg may be due too.
                        check = true;
                        continue;
                    }
                    None => {}
                }
                let next = instant_at(start, clock.next_deadline());
                if next != deadline {
                    deadline = next;
                    sleep.as_mut().reset(next);
                }
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            check = true;
        })
        .await
    };
    let device_alive = !matches!(end, SessionEnd::DeviceVanished);
    let mut backend_alive = !matches!(end, SessionEnd::BackendVanished);
    if end.backend_first() && backend_alive {
        // The backend's close handshake completes here (or fails): nothing left for `finish`.
        let unsent = up.pending.take();
        let _ = tokio::time::timeout(
            close_timeout,
            settle_backend(
                backend,
                device,
                &mut down,
                unsent,
                end.to_backend(),
                inspector,
            ),
        )
        .await;
        backend_alive = false;
    }
    report(handle.counters(), &up.stats, &down.stats, metrics);
    let broken = end.broken_leg();
    tokio::join!(
        finish(
            device,
            end.to_device(),
            device_alive,
            broken == Some(Leg::Device),
            close_timeout
        ),
        finish(
            backend,
            end.to_backend(),
            backend_alive,
            broken == Some(Leg::Backend),
            close_timeout
        ),
    );
    (
        end,
        RelayStats {
            up: up.stats,
            down: down.stats,
        },
    )
}

/// Brings the session's live counters up to the pumps' totals and adds what they grew by
/// to the route's metrics: once per wake, however many frames it moved.
fn report(
    counters: &super::table::Counters,
    up: &DirectionStats,
    down: &DirectionStats,
    metrics: Option<&SessionMetrics>,
) {
    for (live, total, metric) in [
        (
            &counters.frames_up,
            up.frames,
            metrics.map(|m| &m.frames_up),
        ),
        (&counters.bytes_up, up.bytes, metrics.map(|m| &m.bytes_up)),
        (
            &counters.frames_down,
            down.frames,
            metrics.map(|m| &m.frames_down),
        ),
        (
            &counters.bytes_down,
            down.bytes,
            metrics.map(|m| &m.bytes_down),
        ),
    ] {
        let before = live.swap(total, Ordering::Relaxed);
        if let Some(metric) = metric.filter(|_| total > before) {
            metric.inc_by(total - before);
        }
    }
}

/// The device is at fault (see [`SessionEnd::backend_first`]): forwards the frame it sent
/// before the fault if the backend had not taken it yet, closes the backend, and relays what
/// the backend still sends to the device (inspected as always) until the backend's close.
async fn settle_backend<D, B>(
    backend: &mut WebSocketStream<B>,
    device: &mut WebSocketStream<D>,
    down: &mut Pump,
    unsent: Option<Message>,
    close: Option<Option<Close>>,
    inspector: &mut (dyn Inspector + Send),
) where
    D: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(msg) = unsent {
        if backend.feed(msg).await.is_err() {
            return;
        }
    }
    // `close` flushes what was fed before it.
    if backend.close(close.flatten().map(to_wire)).await.is_err() {
        return;
    }
    let _ = std::future::poll_fn(|cx| down.poll(cx, backend, device, &mut *inspector)).await;
}

/// Completes one side's close handshake: sends `send` (or just flushes a queued echo of the
/// peer's close), then reads until the peer's close or end of stream, within `timeout`. A
/// `broken` side's framing cannot be trusted: after the close frame the gateway shuts its
/// write half and discards what the peer still sends, unparsed, until the peer closes (a
/// lingering close: dropping a socket with unread data resets the connection, and the peer
/// would lose the close frame that says why).
async fn finish<S>(
    ws: &mut WebSocketStream<S>,
    send: Option<Option<Close>>,
    alive: bool,
    broken: bool,
    timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !alive {
        return;
    }
    let handshake = async {
        let sent = match send {
            Some(frame) => ws.close(frame.map(to_wire)).await,
            None => ws.flush().await,
        };
        if sent.is_err() {
            return;
        }
        if broken {
            let raw = ws.get_mut();
            if raw.shutdown().await.is_err() {
                return;
            }
            // On the heap: an array here would sit in every session's future for its life.
            let mut discard = vec![0u8; 8192];
            while let Ok(1..) = raw.read(&mut discard).await {}
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
}
