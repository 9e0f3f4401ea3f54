//! The frame relay between a device's WebSocket and its backend's, in one task with no locks
//! and no queues: each direction holds at most one message in flight, and reads from its
//! source only when the previous message was accepted by the destination, so a slow reader on
//! one side slows the other side down instead of growing memory. Writes are batched: the
//! destination is flushed when the source has nothing more ready. Close frames pass through;
//! how a session ends maps to close frames in `wire::SessionEnd`. Every data frame is shown
//! to an [`Inspector`] first (the session's frame steps); a rejected frame is not forwarded
//! and the inspector's error frame goes back to its sender.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::table::EndHandle;
use crate::frames::Rejection;
use crate::policy::Direction;
use crate::wire::{close_code, Close, Closer, SessionEnd};

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
}

/// One direction's state: at most one message waiting for the destination, and at most one
/// error frame waiting to go back to the source.
struct Pump {
    direction: Direction,
    held: Option<(Hold, Message)>,
    pending: Option<Message>,
    needs_flush: bool,
    reply: Option<Message>,
    reply_needs_flush: bool,
    stats: DirectionStats,
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

impl Pump {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            held: None,
            pending: None,
            needs_flush: false,
            reply: None,
            reply_needs_flush: false,
            stats: DirectionStats::default(),
        }
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
            if let Some(reply) = self.reply.take() {
                match Pin::new(&mut *src).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(PumpEnd::Vanished),
                    Poll::Pending => {
                        self.reply = Some(reply);
                        return Poll::Pending;
                    }
                }
                if Pin::new(&mut *src).start_send(reply).is_err() {
                    return Poll::Ready(PumpEnd::Vanished);
                }
                self.reply_needs_flush = true;
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
                        return Poll::Pending;
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
            // Tokio's cooperative budget makes the socket read return Pending after a burst,
            // so this loop yields to other sessions on its own.
            match Pin::new(&mut *src).poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Close(frame)))) => {
                    return Poll::Ready(PumpEnd::Closed(frame.map(from_wire)))
                }
                Poll::Ready(Some(Ok(Message::Frame(_)))) => {}
                Poll::Ready(Some(Ok(msg @ (Message::Text(_) | Message::Binary(_))))) => {
                    match inspector.inspect(self.direction, &msg) {
                        Verdict::Forward => self.pending = Some(msg),
                        Verdict::ForwardAfter(hold) => self.held = Some((hold, msg)),
                        Verdict::Reject { reply } => self.reply = reply,
                        Verdict::RejectAndClose => return Poll::Ready(PumpEnd::TooManyInvalid),
                    }
                }
                // Each leg answers its own pings (tungstenite queues the pong and sends it with
                // the next read or write of that stream): forwarding them too would give the
                // sender two pongs, one of them from the far side.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(classify(&e)),
                Poll::Ready(None) => return Poll::Ready(PumpEnd::Vanished),
                Poll::Pending => return self.flush(cx, src, dst),
            }
        }
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

/// Relays until either side ends or `stop` fires (shutdown, or the session table ending the
/// session with a reason), then runs the close handshakes (each bounded by `close_timeout`).
/// Returns how the session ended and what was relayed.
pub async fn relay<D, B>(
    device: &mut WebSocketStream<D>,
    backend: &mut WebSocketStream<B>,
    stop: &EndHandle,
    close_timeout: Duration,
    inspector: &mut (dyn Inspector + Send),
) -> (SessionEnd, RelayStats)
where
    D: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pump::new(Direction::Up);
    let mut down = Pump::new(Direction::Down);
    let end = {
        let mut cancelled = pin!(stop.token().cancelled());
        std::future::poll_fn(|cx| {
            // Every arm only polls; nothing is lost when another arm completes first: a
            // message read but not yet written stays in its pump's `pending` slot.
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(match stop.why() {
                    Some(why) => SessionEnd::Ended(why),
                    None => SessionEnd::Shutdown,
                });
            }
            if let Poll::Ready(end) = up.poll(cx, device, backend, &mut *inspector) {
                return Poll::Ready(match end {
                    PumpEnd::Closed(f) => SessionEnd::ClosedBy(Closer::Device, f),
                    PumpEnd::Vanished => SessionEnd::DeviceVanished,
                    PumpEnd::Protocol(code) => SessionEnd::DeviceProtocolError(code),
                    PumpEnd::WriteFailed => SessionEnd::BackendVanished,
                    PumpEnd::TooManyInvalid => SessionEnd::InvalidFrameLimit,
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
                });
            }
            // After the pumps: a command they just released arms its timeout here.
            inspector.poll_timers(cx);
            Poll::Pending
        })
        .await
    };
    let device_alive = !matches!(end, SessionEnd::DeviceVanished);
    let backend_alive = !matches!(end, SessionEnd::BackendVanished);
    tokio::join!(
        finish(device, end.to_device(), device_alive, close_timeout),
        finish(backend, end.to_backend(), backend_alive, close_timeout),
    );
    (
        end,
        RelayStats {
            up: up.stats,
            down: down.stats,
        },
    )
}

/// Completes one side's close handshake: sends `send` (or just flushes a queued echo of the
/// peer's close), then reads until the peer's close or end of stream, within `timeout`.
async fn finish<S>(
    ws: &mut WebSocketStream<S>,
    send: Option<Option<Close>>,
    alive: bool,
    timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
}
