//! In front of the gateway: PROXY protocol v2 from a configured balancer address (the
//! device's own address is what `X-Forwarded-For`, the session listing and the per-source
//! budgets see; a balancer's connection without the header is closed; other addresses are not
//! asked for one), and SO_REUSEPORT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gatehouse::admin::Call;

#[tokio::test]
async fn the_devices_own_address_reaches_logs_budgets_and_the_backend() {
    let mut ingest = Backend::start().await;
    let mut options = Options::new(vec![telemetry_route(vec![ingest.url("/")])]);
    options.server_extra =
        "proxy_protocol_from = [\"127.0.0.1/32\"]\nsource_connections = 1".into();
    let gw = Gateway::start(options).await;
    let sensor = gw.enroll("sensor-1", "env-sensor");
    let other = gw.enroll("sensor-2", "env-sensor");
    let device: std::net::SocketAddr = "203.0.113.7:51234".parse().unwrap();

    let (_dev, _) = connect_proxied(
        device,
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["telemetry.v1"],
    )
    .await
    .unwrap();
    let be = ingest.next().await;
    assert_eq!(be.headers["x-forwarded-for"], "203.0.113.7");
    let live: Vec<gatehouse::session::table::LiveSession> =
        gw.api(Call::get("/v1/sessions")).await.unwrap();
    assert_eq!(live[0].peer, "203.0.113.7:51234");

    // source_connections = 1 counts the device's address, not the balancer's: a second
    // connection from the same device address is closed, one from another is admitted.
    assert!(connect_proxied(
        device,
        gw.addr,
        gw.client_config(Some(&other)),
        &["telemetry.v1"]
    )
    .await
    .is_err());
    let elsewhere: std::net::SocketAddr = "198.51.100.9:4000".parse().unwrap();
    let (_dev2, _) = connect_proxied(
        elsewhere,
        gw.addr,
        gw.client_config(Some(&other)),
        &["telemetry.v1"],
    )
    .await
    .unwrap();
    let be2 = ingest.next().await;
    assert_eq!(be2.headers["x-forwarded-for"], "198.51.100.9");

    // From the balancer's address without a header: closed (the TLS ClientHello is not a
    // PROXY header).
    assert!(gw.connect(Some(&sensor), &["telemetry.v1"]).await.is_err());
    // Another address is not a balancer: no header expected, admitted as it is.
    let (_dev3, _) = connect_from(
        "127.0.0.2".parse().unwrap(),
        gw.addr,
        gw.client_config(Some(&sensor)),
        &["telemetry.v1"],
    )
    .await
    .unwrap();
    gw.stop().await;
}

#[test]
fn a_bad_balancer_range_is_refused_with_the_key() {
    let mut options = Options::new(vec![telemetry_route(vec!["ws://127.0.0.1:9/".into()])]);
    options.server_extra = "proxy_protocol_from = [\"10.1.2.3/16\"]".into();
    let prepared = prepare(&options);
    let err = gatehouse::Config::load(&prepared.config_path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.proxy_protocol_from") && err.contains("10.1.0.0/16"),
        "{err}"
    );
}

/// `server.reuse_port`: several gateway processes can listen on one port.
#[tokio::test]
async fn reuse_port_lets_two_listeners_share_a_port() {
    let first = gatehouse::server::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let addr = first.local_addr().unwrap();
    let second = gatehouse::server::bind(addr, true).unwrap();
    assert_eq!(second.local_addr().unwrap(), addr);
    let plain = gatehouse::server::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    assert!(gatehouse::server::bind(plain.local_addr().unwrap(), false).is_err());
}
