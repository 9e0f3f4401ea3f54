//! The relay and the session's frame steps over in-memory streams (`tokio::io::duplex`),
//! with the session clock paused where time matters: no sockets, no TLS, no sleeps.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::DuplexStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::relay::{relay, ForwardAll, RelayStats};
use super::steps::{self, Chain, SessionInfo, StepConfig, Validate};
use super::table::SessionHandle;
use crate::admission::routing::{FrameRules, Route};
use crate::audit::{AuditLog, RecordKind, WriterConfig};
use crate::frames::DecodeLimits;
use crate::policy::limits::{DeviceLimits, LimitAction, RateRule};
use crate::policy::liveness::{Liveness, PingRules, SessionTimers};
use crate::policy::rejections::{LogLimiter, RejectionStats};
use crate::schema::{SchemaKind, SchemaSet};
use crate::storage::{DeadLetter, DeadLetterSink};
use crate::wire::{close_code, Closer, Ending, Leg, SessionEnd};

type Ws = WebSocketStream<DuplexStream>;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const DAY: Duration = Duration::from_secs(86_400);

/// Session timers that never fire within a test unless a test sets them.
fn timers() -> SessionTimers {
    let never = PingRules {
        interval: DAY,
        timeout: DAY,
    };
    SessionTimers {
        device_ping: never,
        backend_ping: never,
        idle_timeout: None,
        max_lifetime: None,
        lifetime_jitter: 0.0,
        write_timeout: DAY,
    }
}

fn quiet() -> Liveness {
    Liveness::new(timers(), 0.0, None)
}

/// The gateway's end and the peer's end of one WebSocket; `gateway_role` is the gateway's.
async fn ws_pair(gateway_role: Role) -> (Ws, Ws) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let peer_role = match gateway_role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    };
    (
        WebSocketStream::from_raw_socket(a, gateway_role, None).await,
        WebSocketStream::from_raw_socket(b, peer_role, None).await,
    )
}

/// (gateway's device side, the device), (gateway's backend side, the backend).
async fn session_pairs() -> ((Ws, Ws), (Ws, Ws)) {
    (ws_pair(Role::Server).await, ws_pair(Role::Client).await)
}

async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(60), ws.next())
        .await
        .expect("a message within a minute of session time")
        .expect("stream open")
        .expect("no read error")
}

fn close_of(msg: Message) -> Option<(u16, String)> {
    match msg {
        Message::Close(Some(f)) => Some((f.code.into(), f.reason.to_string())),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn frames_and_close_codes_pass_through_both_ways() {
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let shutdown = CancellationToken::new();
    let mut fwd = ForwardAll;
    let stop = SessionHandle::child_of(&shutdown);
    let peers = async {
        device.send(Message::text("up")).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text("up"));
        backend.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        assert_eq!(next(&mut device).await, Message::binary(vec![1, 2, 3]));
        device
            .close(Some(CloseFrame {
                code: CloseCode::Library(4001),
                reason: "bye".into(),
            }))
            .await
            .unwrap();
        // The device's close code reaches the backend unchanged.
        assert_eq!(
            close_of(next(&mut backend).await),
            Some((4001, "bye".into()))
        );
        // The backend's answer completes the close handshake on its side.
        backend.flush().await.unwrap();
    };
    let ((end, stats), ()) = tokio::join!(
        relay(
            &mut gw_dev,
            &mut gw_be,
            &stop,
            CLOSE_TIMEOUT,
            quiet(),
            &mut fwd,
            None
        ),
        peers
    );
    assert!(matches!(end, SessionEnd::ClosedBy(Closer::Device, Some(ref c)) if c.code == 4001));
    // The gateway answered the device's close: the device sees its close handshake end.
    drop(gw_dev);
    while let Some(Ok(_)) = device.next().await {}
    assert_eq!(
        (
            stats.up.frames,
            stats.up.bytes,
            stats.down.frames,
            stats.down.bytes
        ),
        (1, 2, 1, 3)
    );
}

/// One pong per ping, from the leg that was pinged; pings are not relayed (RFC 6455 5.5.2).
#[tokio::test(start_paused = true)]
async fn each_leg_answers_its_own_pings_once() {
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let shutdown = CancellationToken::new();
    let mut fwd = ForwardAll;
    let stop = SessionHandle::child_of(&shutdown);
    let peers = async {
        device
            .send(Message::Ping(b"d".to_vec().into()))
            .await
            .unwrap();
        backend
            .send(Message::Ping(b"b".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(next(&mut device).await, Message::Pong(b"d".to_vec().into()));
        assert_eq!(
            next(&mut backend).await,
            Message::Pong(b"b".to_vec().into())
        );
        // What arrives next on each side is data, not a relayed ping or a second pong.
        device.send(Message::text("up")).await.unwrap();
        backend.send(Message::text("down")).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text("up"));
        assert_eq!(next(&mut device).await, Message::text("down"));
        shutdown.cancel();
        assert!(matches!(next(&mut device).await, Message::Close(_)));
        assert!(matches!(next(&mut backend).await, Message::Close(_)));
    };
    let ((end, stats), ()) = tokio::join!(
        relay(
            &mut gw_dev,
            &mut gw_be,
            &stop,
            CLOSE_TIMEOUT,
            quiet(),
            &mut fwd,
            None
        ),
        peers
    );
    assert_eq!(end, SessionEnd::Shutdown);
    assert_eq!((stats.up.frames, stats.down.frames), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_vanished_backend_closes_the_device_with_1011_and_shutdown_closes_both_with_1001() {
    let ((mut gw_dev, mut device), (mut gw_be, backend)) = session_pairs().await;
    let shutdown = CancellationToken::new();
    let mut fwd = ForwardAll;
    let stop = SessionHandle::child_of(&shutdown);
    let peers = async {
        drop(backend);
        assert_eq!(
            close_of(next(&mut device).await).map(|c| c.0),
            Some(close_code::ERROR)
        );
    };
    let ((end, _), ()) = tokio::join!(
        relay(
            &mut gw_dev,
            &mut gw_be,
            &stop,
            CLOSE_TIMEOUT,
            quiet(),
            &mut fwd,
            None
        ),
        peers
    );
    assert_eq!(end, SessionEnd::BackendVanished);

    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let stop = SessionHandle::child_of(&shutdown);
    let peers = async {
        shutdown.cancel();
        for ws in [&mut device, &mut backend] {
            assert_eq!(
                close_of(next(ws).await).map(|c| c.0),
                Some(close_code::AWAY)
            );
        }
    };
    let ((end, _), ()) = tokio::join!(
        relay(
            &mut gw_dev,
            &mut gw_be,
            &stop,
            CLOSE_TIMEOUT,
            quiet(),
            &mut fwd,
            None
        ),
        peers
    );
    assert_eq!(end, SessionEnd::Shutdown);
}

/// Runs a forward-all relay on `clock` while `peers` plays the device and the backend; also
/// returns the session time at which the relay returned.
async fn run_clocked<F>(
    gw_dev: &mut Ws,
    gw_be: &mut Ws,
    handle: &SessionHandle,
    clock: Liveness,
    peers: F,
) -> (SessionEnd, Duration)
where
    F: std::future::Future<Output = ()>,
{
    let start = tokio::time::Instant::now();
    let relay = async {
        let (end, _) = relay(
            gw_dev,
            gw_be,
            handle,
            CLOSE_TIMEOUT,
            clock,
            &mut ForwardAll,
            None,
        )
        .await;
        (end, start.elapsed())
    };
    let (out, ()) = tokio::join!(relay, peers);
    out
}

/// Reads `ws` (answering pings, as a live peer does) until a close frame; its code.
async fn close_code_of(ws: &mut Ws) -> u16 {
    loop {
        match next(ws).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(Some(f)) => return f.code.into(),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// A leg that answers nothing is pinged after the interval of silence and the session ends
/// at interval plus timeout, with the leg's own code to the other side; a leg that answers
/// stays up.
#[tokio::test(start_paused = true)]
async fn a_silent_leg_is_found_within_ping_interval_plus_timeout() {
    for silent in [Leg::Device, Leg::Backend] {
        let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
        let mut t = timers();
        let ping = PingRules {
            interval: 30 * SECOND,
            timeout: 10 * SECOND,
        };
        t.device_ping = ping;
        t.backend_ping = ping;
        let handle = SessionHandle::child_of(&CancellationToken::new());
        let start = tokio::time::Instant::now();
        let peers = async {
            // Only the live peer reads, so only it answers the gateway's pings.
            let (live, code) = match silent {
                Leg::Device => (&mut backend, close_code::DEVICE_PING_TIMEOUT),
                Leg::Backend => (&mut device, close_code::BACKEND_PING_TIMEOUT),
            };
            assert_eq!(close_code_of(live).await, code);
            let at = start.elapsed();
            assert!(at >= 40 * SECOND && at < 41 * SECOND, "{silent:?}: {at:?}");
        };
        let (end, _) = run_clocked(
            &mut gw_dev,
            &mut gw_be,
            &handle,
            Liveness::new(t, 0.0, None),
            peers,
        )
        .await;
        assert_eq!(end, SessionEnd::Ended(Ending::PingTimeout(silent)));
    }
}

/// No data either way for the idle timeout ends the session (4009), data resets it; new
/// timers given to an open session (a reload) apply at once; the maximum lifetime ends a
/// session that is busy (4010).
#[tokio::test(start_paused = true)]
async fn idle_timeout_retiming_and_maximum_lifetime() {
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let mut t = timers();
    t.idle_timeout = Some(100 * SECOND);
    let start = tokio::time::Instant::now();
    let peers = async {
        tokio::time::sleep(50 * SECOND).await;
        device.send(Message::text("up")).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text("up"));
        // From a reload on: 20 s idle, counted from the last data frame (at 50 s).
        tokio::time::sleep(10 * SECOND).await;
        let mut shorter = t;
        shorter.idle_timeout = Some(20 * SECOND);
        handle.retime(shorter);
        assert_eq!(close_code_of(&mut device).await, close_code::IDLE_TIMEOUT);
        assert_eq!(close_code_of(&mut backend).await, close_code::IDLE_TIMEOUT);
        let at = start.elapsed();
        assert!(at >= 70 * SECOND && at < 71 * SECOND, "{at:?}");
    };
    let (end, at) = run_clocked(
        &mut gw_dev,
        &mut gw_be,
        &handle,
        Liveness::new(t, 0.0, None),
        peers,
    )
    .await;
    assert_eq!(end, SessionEnd::Ended(Ending::IdleTimeout));
    // The peers stopped reading after the close: the close handshake is bounded.
    assert!(at <= 71 * SECOND + CLOSE_TIMEOUT, "{at:?}");

    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let mut t = timers();
    t.max_lifetime = Some(300 * SECOND);
    t.lifetime_jitter = 0.1;
    let start = tokio::time::Instant::now();
    let peers = async {
        // Busy all along: a frame every second, until the close.
        loop {
            device.send(Message::text("up")).await.unwrap();
            match next(&mut backend).await {
                Message::Text(_) => {}
                Message::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), close_code::MAX_LIFETIME);
                    break;
                }
                other => panic!("{other:?}"),
            }
            tokio::time::sleep(SECOND).await;
        }
        // Half-way into the jitter: 300 s less 5 %.
        let at = start.elapsed();
        assert!(at >= 285 * SECOND && at <= 286 * SECOND, "{at:?}");
    };
    let (end, _) = run_clocked(
        &mut gw_dev,
        &mut gw_be,
        &handle,
        Liveness::new(t, 0.5, None),
        peers,
    )
    .await;
    assert_eq!(end, SessionEnd::Ended(Ending::MaxLifetime));
}

/// A message limit lowered by a reload applies to an open session: a larger frame closes it
/// with 1009.
#[tokio::test(start_paused = true)]
async fn a_lowered_message_limit_applies_to_an_open_session() {
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let peers = async {
        device.send(Message::text("0123456789abc")).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text("0123456789abc"));
        handle.set_max_message(10);
        device.send(Message::text("0123456789abc")).await.unwrap();
        assert_eq!(close_code_of(&mut device).await, close_code::SIZE);
    };
    let (end, _) = run_clocked(&mut gw_dev, &mut gw_be, &handle, quiet(), peers).await;
    assert_eq!(end, SessionEnd::DeviceProtocolError(close_code::SIZE));
}

/// A device that stops reading while its backend sends is closed after the write timeout
/// (the backend gets 4013), and the relay returns within the close timeout after that even
/// though the device never reads its close frame.
#[tokio::test(start_paused = true)]
async fn a_device_that_stops_reading_is_closed_after_the_write_timeout() {
    let ((mut gw_dev, _device), (mut gw_be, backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let mut t = timers();
    t.write_timeout = 20 * SECOND;
    let (mut tx, mut rx) = backend.split();
    let start = tokio::time::Instant::now();
    let peers = async {
        let flood = async {
            loop {
                if tx.send(Message::binary(vec![7u8; 1024])).await.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await
        };
        let close = async {
            loop {
                match rx.next().await {
                    Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        };
        let code = tokio::select! {
            code = close => code,
            _ = flood => unreachable!(),
        };
        assert_eq!(code, close_code::DEVICE_WRITE_TIMEOUT);
        let at = start.elapsed();
        // Blocked within the first second of flooding.
        assert!(at >= 20 * SECOND && at < 21 * SECOND, "{at:?}");
    };
    let (end, at) = run_clocked(
        &mut gw_dev,
        &mut gw_be,
        &handle,
        Liveness::new(t, 0.0, None),
        peers,
    )
    .await;
    assert_eq!(end, SessionEnd::Ended(Ending::WriteTimeout(Leg::Device)));
    assert!(at <= 21 * SECOND + CLOSE_TIMEOUT, "{at:?}");
}

/// A backend that stops reading no longer keeps a device's session once the device is gone:
/// the session ends at once if the device goes while its frame waits, and at the latest at
/// the write timeout.
#[tokio::test(start_paused = true)]
async fn a_backend_that_stops_reading_does_not_keep_a_departed_device_session() {
    let ((mut gw_dev, mut device), (mut gw_be, _backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let mut t = timers();
    t.write_timeout = 30 * SECOND;
    let start = tokio::time::Instant::now();
    let dropped_at = std::cell::Cell::new(Duration::ZERO);
    let peers = async {
        // Send until the gateway stops taking frames, then disconnect.
        while tokio::time::timeout(SECOND, device.send(Message::binary(vec![1u8; 1024])))
            .await
            .is_ok()
        {}
        drop(device);
        dropped_at.set(start.elapsed());
    };
    let (end, at) = run_clocked(
        &mut gw_dev,
        &mut gw_be,
        &handle,
        Liveness::new(t, 0.0, None),
        peers,
    )
    .await;
    assert!(
        matches!(
            end,
            SessionEnd::DeviceVanished | SessionEnd::Ended(Ending::WriteTimeout(Leg::Backend))
        ),
        "{end:?}"
    );
    let after = at - dropped_at.get();
    assert!(after <= t.write_timeout + CLOSE_TIMEOUT, "{after:?}");
}

/// A device that closes while its frame waits for a blocked backend is seen at once.
#[tokio::test(start_paused = true)]
async fn a_device_close_is_seen_while_its_backend_is_blocked() {
    let ((mut gw_dev, mut device), (mut gw_be, _backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let mut t = timers();
    t.write_timeout = 60 * SECOND;
    let peers = async {
        // Fill the backend's pipe with one large frame, then close.
        device
            .send(Message::binary(vec![1u8; 200 * 1024]))
            .await
            .unwrap();
        device.close(None).await.unwrap();
    };
    let (end, at) = run_clocked(
        &mut gw_dev,
        &mut gw_be,
        &handle,
        Liveness::new(t, 0.0, None),
        peers,
    )
    .await;
    assert!(
        matches!(end, SessionEnd::ClosedBy(Closer::Device, _)),
        "{end:?}"
    );
    // The backend's close handshake cannot complete (it does not read): bounded.
    assert!(at <= CLOSE_TIMEOUT + SECOND, "{at:?}");
}

/// A runtime snapshot with these schemas (the configuration is a minimal valid one; nothing
/// in it is read from disk).
fn live(schemas: SchemaSet) -> crate::live::LiveHandle {
    let file: crate::config::FileConfig = toml::from_str(
        r#"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        [registry]
        path = "registry"
        [[route]]
        subprotocol = "telemetry.v1"
        kind = "telemetry"
        device_types = ["env-sensor"]
        backends = ["ws://127.0.0.1:1/"]
        "#,
    )
    .unwrap();
    let config = crate::config::Config::from_file(file, std::path::Path::new("/")).unwrap();
    Arc::new(arc_swap::ArcSwap::from_pointee(
        crate::live::Live::build(config.runtime, schemas).unwrap(),
    ))
}

fn schemas() -> SchemaSet {
    let mut set = SchemaSet::default();
    let reading = br#"{"type":"object","required":["t"],"properties":{"t":{"type":"number"}}}"#;
    set.add("env-sensor", SchemaKind::Telemetry, "t".as_ref(), reading)
        .unwrap();
    let command = br#"{"type":"object","required":["id","command"]}"#;
    set.add("door-lock", SchemaKind::Command, "c".as_ref(), command)
        .unwrap();
    set
}

fn info(subprotocol: &str, kind: &str, device_type: &str, rules: FrameRules) -> Arc<SessionInfo> {
    let route = Route::parse(
        subprotocol,
        kind,
        &[device_type.to_string()],
        &["ws://127.0.0.1:1/".to_string()],
        crate::admission::routing::tests::options(rules),
    )
    .unwrap();
    Arc::new(SessionInfo {
        device_id: "dev-1".into(),
        device_type: device_type.into(),
        route: Arc::new(route),
        backend_url: "ws://127.0.0.1:1/".into(),
        conn_id: "c-1".into(),
    })
}

fn step_config(
    audit: Option<AuditLog>,
    command_timeout: Duration,
) -> (StepConfig, tokio::sync::mpsc::Receiver<DeadLetter>) {
    let (dead_letters, rx) = DeadLetterSink::channel(64);
    (
        StepConfig {
            stats: Arc::new(RejectionStats::default()),
            log: Arc::new(LogLimiter::new(20)),
            dead_letters,
            dead_letter_payload_bytes: 1024,
            audit: audit.map(|log| steps::AuditSettings {
                log: Arc::new(log),
                redact: Arc::from(Vec::new()),
                max_payload_bytes: 1024,
            }),
            command_timeout,
            limits: unlimited(),
            limit_hits: Arc::new(RejectionStats::default()),
            metrics: None,
        },
        rx,
    )
}

/// Limits that no test frame reaches, with 4 commands in flight.
fn unlimited() -> DeviceLimits {
    DeviceLimits {
        max_message_bytes: 1 << 20,
        frames: None,
        bytes: None,
        commands_in_flight: 4,
        sessions: 8,
        abuse_rejections: 50,
        abuse_window: Duration::from_secs(10),
    }
}

fn frame_rate(per_second: u32, burst: u32, action: LimitAction) -> DeviceLimits {
    DeviceLimits {
        frames: Some(RateRule {
            per_second: std::num::NonZeroU32::new(per_second).unwrap(),
            burst: std::num::NonZeroU32::new(burst).unwrap(),
            action,
        }),
        abuse_rejections: 3,
        ..unlimited()
    }
}

fn default_rules() -> FrameRules {
    FrameRules {
        error_replies: true,
        invalid_frame_limit: 20,
        invalid_frame_window: Duration::from_secs(10),
    }
}

/// An env-sensor's chain on `telemetry.v1` with these limits.
fn sensor_chain(limits: DeviceLimits) -> Chain {
    let (mut cfg, _dead) = step_config(None, Duration::from_secs(30));
    cfg.limits = limits;
    chain(
        info("telemetry.v1", "telemetry", "env-sensor", default_rules()),
        cfg,
    )
}

/// `reject`: frames over the rate are dropped with a `rate-limited` error frame naming the
/// limit, counted per (type, route, limit); one rejection more than the abuse allowance in
/// its window ends the session with 1008, and the backend gets 1001.
#[tokio::test(start_paused = true)]
async fn frames_over_the_rate_are_rejected_and_sustained_abuse_closes_with_1008() {
    let (mut cfg, _dead) = step_config(None, Duration::from_secs(30));
    cfg.limits = frame_rate(10, 2, LimitAction::Reject);
    let hits = cfg.limit_hits.clone();
    let mut chain = chain(
        info("telemetry.v1", "telemetry", "env-sensor", default_rules()),
        cfg,
    );
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let peers = async {
        for _ in 0..2 {
            device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
            assert_eq!(next(&mut backend).await, Message::text(r#"{"t":1}"#));
        }
        for _ in 0..3 {
            device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
            let Message::Text(reply) = next(&mut device).await else {
                panic!("an error frame");
            };
            let reply: Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(reply["code"], "rate-limited");
            assert!(
                reply["message"]
                    .as_str()
                    .unwrap()
                    .contains("frames_per_second"),
                "{reply}"
            );
        }
        device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
        assert_eq!(
            close_code_of(&mut device).await,
            close_code::POLICY,
            "sustained abuse"
        );
        assert_eq!(close_code_of(&mut backend).await, close_code::AWAY);
    };
    let (end, stats) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    assert_eq!(
        end,
        SessionEnd::OverLimit {
            code: close_code::POLICY,
            limit: "frames_per_second"
        }
    );
    assert_eq!(stats.up.frames, 2);
    let counted: Vec<(String, u64)> = hits
        .snapshot()
        .into_iter()
        .map(|c| (c.reason, c.count))
        .collect();
    assert_eq!(
        counted,
        vec![
            ("frames_per_second:close".to_string(), 1),
            ("frames_per_second:reject".to_string(), 3)
        ]
    );
}

/// `delay`: nothing is lost; the device's frames reach the backend at the configured rate
/// (the relay stops reading from the device meanwhile).
#[tokio::test(start_paused = true)]
async fn frames_over_the_rate_are_delayed_and_none_is_lost() {
    let mut chain = sensor_chain(frame_rate(10, 2, LimitAction::Delay));
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let start = tokio::time::Instant::now();
    let peers = async {
        for i in 0..12 {
            device
                .send(Message::text(format!(r#"{{"t":{i}}}"#)))
                .await
                .unwrap();
        }
        for i in 0..12 {
            assert_eq!(
                next(&mut backend).await,
                Message::text(format!(r#"{{"t":{i}}}"#))
            );
        }
        // Two in the burst, then ten at 100 ms each.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        device.close(None).await.unwrap();
        backend.flush().await.unwrap();
    };
    let (end, stats) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    assert!(
        matches!(end, SessionEnd::ClosedBy(Closer::Device, _)),
        "{end:?}"
    );
    assert_eq!(stats.up.frames, 12);
}

/// New limits from a reload apply to an open session.
#[tokio::test(start_paused = true)]
async fn reloaded_limits_apply_to_an_open_session() {
    let mut chain = sensor_chain(unlimited());
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let handle = SessionHandle::child_of(&CancellationToken::new());
    let peers = async {
        for _ in 0..3 {
            device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
            assert_eq!(next(&mut backend).await, Message::text(r#"{"t":1}"#));
        }
        handle.relimit(frame_rate(1, 1, LimitAction::Reject));
        tokio::task::yield_now().await;
        device.send(Message::text(r#"{"t":2}"#)).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text(r#"{"t":2}"#));
        device.send(Message::text(r#"{"t":3}"#)).await.unwrap();
        let Message::Text(reply) = next(&mut device).await else {
            panic!("an error frame");
        };
        assert!(reply.contains("rate-limited"), "{reply}");
        device.close(None).await.unwrap();
        backend.flush().await.unwrap();
    };
    let (out, ()) = tokio::join!(
        relay(
            &mut gw_dev,
            &mut gw_be,
            &handle,
            CLOSE_TIMEOUT,
            quiet(),
            &mut chain,
            None
        ),
        peers
    );
    assert_eq!(out.1.up.frames, 4);
}

/// An opaque route (`validate = false`) passes frames that are neither JSON nor CBOR
/// unchanged, for a device type without any schema, still under the rate limit.
#[tokio::test(start_paused = true)]
async fn an_opaque_route_forwards_undecoded_frames() {
    let mut options = crate::admission::routing::tests::options(default_rules());
    options.validate = false;
    let route = Route::parse(
        "firmware.v1",
        "telemetry",
        &["camera".to_string()],
        &["ws://127.0.0.1:1/".to_string()],
        options,
    )
    .unwrap();
    let info = Arc::new(SessionInfo {
        device_id: "cam-1".into(),
        device_type: "camera".into(),
        route: Arc::new(route),
        backend_url: "ws://127.0.0.1:1/".into(),
        conn_id: "c-1".into(),
    });
    let (mut cfg, _dead) = step_config(None, Duration::from_secs(30));
    cfg.limits = frame_rate(10, 2, LimitAction::Reject);
    let mut chain = chain(info, cfg);
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let peers = async {
        let frames = [
            Message::text("not json at all {"),
            Message::binary(vec![0xff, 0x00, 0xfe, 0x01]),
        ];
        for f in frames {
            device.send(f.clone()).await.unwrap();
            assert_eq!(next(&mut backend).await, f);
        }
        // The rate still applies.
        device.send(Message::text("third")).await.unwrap();
        let Message::Text(reply) = next(&mut device).await else {
            panic!("an error frame");
        };
        assert!(reply.contains("rate-limited"), "{reply}");
        device.close(None).await.unwrap();
        backend.flush().await.unwrap();
    };
    let (end, stats) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    assert!(
        matches!(end, SessionEnd::ClosedBy(Closer::Device, _)),
        "{end:?}"
    );
    assert_eq!(stats.up.frames, 2);
}

/// A message over the device type's `max_message_bytes` ends the session with 1009.
#[tokio::test(start_paused = true)]
async fn a_message_over_the_type_limit_closes_with_1009() {
    let mut chain = sensor_chain(DeviceLimits {
        max_message_bytes: 16,
        ..unlimited()
    });
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let peers = async {
        device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text(r#"{"t":1}"#));
        device
            .send(Message::text(r#"{"t":1234567890123}"#))
            .await
            .unwrap();
        assert_eq!(close_code_of(&mut device).await, close_code::SIZE);
    };
    let (end, _) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    assert_eq!(
        end,
        SessionEnd::OverLimit {
            code: close_code::SIZE,
            limit: "max_message_bytes"
        }
    );
}

fn chain(info: Arc<SessionInfo>, cfg: StepConfig) -> Chain {
    steps::chain(
        info,
        Validate {
            live: live(schemas()),
            limits: DecodeLimits { max_depth: 16 },
        },
        cfg,
    )
}

async fn relay_with(
    chain: &mut Chain,
    gw_dev: &mut Ws,
    gw_be: &mut Ws,
    peers: impl std::future::Future<Output = ()>,
) -> (SessionEnd, RelayStats) {
    let shutdown = CancellationToken::new();
    let stop = SessionHandle::child_of(&shutdown);
    let (out, ()) = tokio::join!(
        relay(gw_dev, gw_be, &stop, CLOSE_TIMEOUT, quiet(), chain, None),
        peers
    );
    out
}

#[tokio::test(start_paused = true)]
async fn the_invalid_frame_window_resets_on_the_session_clock_and_closes_with_1007() {
    let rules = FrameRules {
        error_replies: true,
        invalid_frame_limit: 2,
        invalid_frame_window: Duration::from_secs(10),
    };
    let (cfg, mut dead) = step_config(None, Duration::from_secs(30));
    let mut chain = chain(info("telemetry.v1", "telemetry", "env-sensor", rules), cfg);
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let peers = async {
        // Two invalid frames fill the window; each gets an error frame.
        for bad in ["not json", r#"{"t":"hot"}"#] {
            device.send(Message::text(bad)).await.unwrap();
            let Message::Text(reply) = next(&mut device).await else {
                panic!("an error frame");
            };
            let reply: Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(reply["$gatehouse"], "error");
        }
        // Eleven seconds later (session time) the window has passed: two more are allowed.
        tokio::time::sleep(Duration::from_secs(11)).await;
        for _ in 0..2 {
            device.send(Message::text("{")).await.unwrap();
            assert!(matches!(next(&mut device).await, Message::Text(_)));
        }
        device.send(Message::text(r#"{"t":1}"#)).await.unwrap();
        assert_eq!(next(&mut backend).await, Message::text(r#"{"t":1}"#));
        // The third invalid frame within this window ends the session.
        device.send(Message::text("[")).await.unwrap();
        assert_eq!(
            close_of(next(&mut device).await),
            Some((close_code::INVALID, "too many invalid frames".into()))
        );
        assert_eq!(
            close_of(next(&mut backend).await).map(|c| c.0),
            Some(close_code::AWAY)
        );
    };
    let (end, stats) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    assert_eq!(end, SessionEnd::InvalidFrameLimit);
    assert_eq!((stats.up.frames, chain.rejected), (1, 5));
    // Every rejected frame went to the dead-letter queue, with its reason.
    let mut codes = Vec::new();
    while let Ok(letter) = dead.try_recv() {
        codes.push(letter.code);
    }
    assert_eq!(
        codes,
        [
            "malformed",
            "schema-violation",
            "malformed",
            "malformed",
            "malformed"
        ]
    );
}

#[tokio::test]
async fn commands_time_out_on_the_session_clock_and_the_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    };
    let (log, thread) = AuditLog::open(
        WriterConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 1 << 20,
            checkpoint_interval: Duration::from_secs(3600),
            retention: None,
            metrics: None,
        },
        key,
    )
    .unwrap();
    let timeout = Duration::from_secs(30);
    let (cfg, _dead) = step_config(Some(log.clone()), timeout);
    let mut chain = chain(
        info(
            "control.v1",
            "control",
            "door-lock",
            FrameRules {
                error_replies: true,
                invalid_frame_limit: 20,
                invalid_frame_window: Duration::from_secs(10),
            },
        ),
        cfg,
    );
    let ((mut gw_dev, mut device), (mut gw_be, mut backend)) = session_pairs().await;
    let peers = async {
        backend
            .send(Message::text(r#"{"id":1,"command":"unlock"}"#))
            .await
            .unwrap();
        assert_eq!(
            next(&mut device).await,
            Message::text(r#"{"id":1,"command":"unlock"}"#)
        );
        let sent = tokio::time::Instant::now();
        // Command 2 is answered at once; command 1 never is.
        backend
            .send(Message::text(r#"{"id":2,"command":"lock"}"#))
            .await
            .unwrap();
        assert!(matches!(next(&mut device).await, Message::Text(_)));
        device
            .send(Message::text(r#"{"id":2,"status":"ok"}"#))
            .await
            .unwrap();
        assert!(matches!(next(&mut backend).await, Message::Text(_)));
        // Every durable write is done: from here on the session clock is paused, and the
        // sleep past the timeout takes no wall-clock time.
        tokio::time::pause();
        tokio::time::sleep_until(sent + timeout + Duration::from_secs(1)).await;
        device.close(None).await.unwrap();
    };
    let (end, _) = relay_with(&mut chain, &mut gw_dev, &mut gw_be, peers).await;
    chain.finish(&end);
    drop(chain);
    assert!(log.close().await);
    thread.join().unwrap();
    let records = &crate::audit::read(dir.path()).unwrap().records["dev-1"];
    let kinds: Vec<(RecordKind, Option<Value>)> = records
        .iter()
        .map(|r| (r.kind, r.command_id.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (RecordKind::Connected, None),
            (RecordKind::CommandSent, Some(json!(1))),
            (RecordKind::CommandSent, Some(json!(2))),
            (RecordKind::Responded, Some(json!(2))),
            (RecordKind::TimedOut, Some(json!(1))),
            (RecordKind::Disconnected, None),
        ]
    );
}
