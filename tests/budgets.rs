//! Admission budgets over real TLS: handshakes in progress, session slots, per source
//! address (rate and connections at once) and sessions per device. Each refusal comes at
//! once, says which limit was hit, and a session already running keeps exchanging frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use gatehouse::admin::Call;
use tokio_tungstenite::tungstenite::Message;

const LOCAL: &str = "127.0.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Silent TCP connections fill the handshake budget: the next connection is closed at once
/// instead of waiting, and a running session is not harmed. Once they go, devices connect.
#[tokio::test]
async fn silent_connections_cannot_take_session_slots() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.server_extra = "max_handshakes = 2\n".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;

    let silent: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
        }
        v
    };
    // The budget is taken once the gateway has accepted both: poll until a third is closed.
    let t = within(async {
        loop {
            let t = Instant::now();
            if closed_at_accept(ip(LOCAL), gw.addr).await {
                return t.elapsed();
            }
        }
    })
    .await;
    assert!(t < Duration::from_millis(500), "closed after {t:?}");
    // The running session is unharmed.
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));

    drop(silent);
    drop(gw.connect_eventually(&sensor, &["telemetry.v1"]).await);
    let hits: Vec<gatehouse::policy::rejections::RejectionCount> =
        gw.api(Call::get("/v1/stats/limits")).await.unwrap();
    assert!(
        hits.iter()
            .any(|h| h.reason == "max_handshakes" && h.count >= 1),
        "{hits:?}"
    );
    gw.stop().await;
}

/// Beyond `server.max_connections` sessions a device gets 503 `over-capacity` with
/// Retry-After after TLS; a freed slot serves the next one.
#[tokio::test]
async fn beyond_the_session_budget_devices_get_503() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.server_extra = "max_connections = 1\n".into();
    let gw = Gateway::start(options).await;
    let a = gw.enroll("sensor-a", "env-sensor");
    let b = gw.enroll("sensor-b", "env-sensor");
    let (dev_a, _) = gw.connect(Some(&a), &["telemetry.v1"]).await.unwrap();
    let _be = ingest.next().await;
    match gw.connect(Some(&b), &["telemetry.v1"]).await {
        Err(ConnectError::Http {
            status,
            refusal,
            body,
        }) => {
            assert_eq!((status, refusal.as_deref()), (503, Some("over-capacity")));
            assert!(body.contains("server.max_connections"), "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(dev_a);
    drop(gw.connect_eventually(&b, &["telemetry.v1"]).await);
    gw.stop().await;
}

/// One source address over its connections at once, or over its handshake rate, is closed
/// at accept; a device from another address is served meanwhile.
#[tokio::test]
async fn per_source_budgets_close_at_accept_and_spare_other_sources() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.server_extra =
        "source_connections = 2\nsource_handshakes_per_second = 1\nsource_handshake_burst = 2\n"
            .into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let other = gw.enroll("sensor-2", "env-sensor");
    let src = ip("127.0.0.3");
    let cfg = gw.client_config(Some(&sensor));
    let (_a, _) = connect_from(src, gw.addr, cfg.clone(), &["telemetry.v1"])
        .await
        .unwrap();
    let (_b, _) = connect_from(src, gw.addr, cfg.clone(), &["telemetry.v1"])
        .await
        .unwrap();
    let _ = (ingest.next().await, ingest.next().await);
    // Two open from 127.0.0.3: a third is closed before TLS.
    assert!(closed_at_accept(src, gw.addr).await);
    // Another address is served.
    let (mut dev, _) = connect_from(
        ip("127.0.0.4"),
        gw.addr,
        gw.client_config(Some(&other)),
        &["telemetry.v1"],
    )
    .await
    .unwrap();
    let mut be = ingest.next().await;
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));
    // The rate: 127.0.0.5 may open 2 at once (burst), then 1 per second.
    let rated = ip("127.0.0.5");
    let mut refused = 0;
    for _ in 0..6 {
        if closed_at_accept(rated, gw.addr).await {
            refused += 1;
        }
    }
    assert!(refused >= 1, "the handshake rate closed none of 6");
    let hits: Vec<gatehouse::policy::rejections::RejectionCount> =
        gw.api(Call::get("/v1/stats/limits")).await.unwrap();
    for limit in ["source_connections", "source_handshakes_per_second"] {
        assert!(hits.iter().any(|h| h.reason == limit), "{limit}: {hits:?}");
    }
    gw.stop().await;
}

/// One certificate cannot hold more than its type's `sessions_per_device` across routes:
/// the next gets 429 naming the limit.
#[tokio::test]
async fn a_device_beyond_its_sessions_gets_429() {
    let mut backend = Backend::start().await;
    let mut options = Options::new(vec![
        telemetry_route(vec![backend.url("/t")]),
        control_route(vec![backend.url("/c")]),
    ]);
    options.tail = "[limits.door-lock]\nsessions_per_device = 1\n".into();
    let gw = Gateway::start(options).await;
    let lock = gw.enroll("lock-1", "door-lock");
    let (_t, _) = gw.connect(Some(&lock), &["telemetry.v1"]).await.unwrap();
    let _be = backend.next().await;
    match gw.connect(Some(&lock), &["control.v1"]).await {
        Err(ConnectError::Http {
            status,
            refusal,
            body,
        }) => {
            assert_eq!(
                (status, refusal.as_deref()),
                (429, Some("too-many-sessions"))
            );
            assert!(body.contains("sessions_per_device = 1"), "{body}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // A takeover on the same route replaces the session instead.
    let (_t2, _) = gw.connect(Some(&lock), &["telemetry.v1"]).await.unwrap();
    gw.stop().await;
}

/// Over real TLS: a type whose frame rate rejects gets `rate-limited` error frames and,
/// kept up, a 1008 close naming the limit; a type whose rate delays loses nothing.
#[tokio::test]
async fn rate_limits_per_device_type_over_tls() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.tail = "[limits]\nframes_per_second = 20\nframes_burst = 5\n[limits.door-lock]\nframes_per_second = 2\nframes_burst = 2\nframes_action = \"reject\"\nabuse_rejections = 3\n".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let lock = gw.enroll("lock-1", "door-lock");

    // delay (env-sensor): 15 frames at once all arrive, in order, at about 20 per second.
    let (mut dev, _) = gw.connect(Some(&sensor), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    let t = Instant::now();
    for i in 0..15 {
        dev.send(Message::text(reading(i))).await.unwrap();
    }
    for i in 0..15 {
        assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(i)));
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "10 over the burst at 20/s: {took:?}"
    );

    // reject (door-lock): 2 pass, then error frames, then 1008.
    let (mut dev, _) = gw.connect(Some(&lock), &["telemetry.v1"]).await.unwrap();
    let mut be = ingest.next().await;
    let frame = r#"{"type":"status","seq":1,"ts":1764000000000,"locked":true,"battery_pct":80}"#;
    let mut errors = 0;
    for _ in 0..6 {
        dev.send(Message::text(frame)).await.unwrap();
    }
    loop {
        match next_msg(&mut dev).await {
            Message::Text(t) => {
                assert!(
                    t.contains("rate-limited") && t.contains("frames_per_second"),
                    "{t}"
                );
                errors += 1;
            }
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 1008);
                assert!(f.reason.contains("frames_per_second"), "{}", f.reason);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // The backend got the two within the burst, then the close.
    let mut forwarded = 0;
    loop {
        match next_msg(&mut be.ws).await {
            Message::Text(_) => forwarded += 1,
            Message::Close(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((forwarded, errors), (2, 3));
    gw.stop().await;
}

/// A flood of silent connections from several addresses: each source is held to its share,
/// the excess is closed at once, and a device from another address is served meanwhile.
#[tokio::test]
async fn a_flood_from_several_addresses_leaves_room_for_others() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.server_extra = "max_handshakes = 30\nsource_connections = 5\n".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let mut held = Vec::new();
    let mut closed = 0;
    for source in ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        for _ in 0..10 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::new(ip(source), 0))
                .unwrap();
            held.push(socket.connect(gw.addr).await.unwrap());
        }
        // The sixth and later from this source are closed at once.
        if closed_at_accept(ip(source), gw.addr).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 4, "every flooding source is over its share");
    let t = Instant::now();
    let (mut dev, _) = connect_from(
        ip("127.0.0.20"),
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["telemetry.v1"],
    )
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let mut be = ingest.next().await;
    dev.send(Message::text(reading(1))).await.unwrap();
    assert_eq!(next_msg(&mut be.ws).await, Message::text(reading(1)));
    drop(held);
    gw.stop().await;
}
