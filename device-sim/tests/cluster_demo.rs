//! The cluster demo end to end (`gatehouse-sim demo --cluster`, smaller and shorter): three
//! NATS nodes, three gateways, HAProxy from the shipped configuration (and, in the second
//! test, SO_REUSEPORT instead), a fleet through the balancer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use gatehouse_sim::cluster_demo::{run, Balancer, ClusterDemoOptions, ClusterDemoSummary};

/// One three-node NATS cluster and three gateways at a time on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn demo(balancer: Balancer) -> ClusterDemoSummary {
    let _serial = SERIAL.lock().await;
    run(ClusterDemoOptions {
        sensors: 6,
        locks: 3,
        duration: Duration::from_millis(2000),
        rate_hz: 4.0,
        keep: false,
        replicas: 3,
        balancer: Some(balancer),
    })
    .await
    .unwrap()
}

fn check(s: &ClusterDemoSummary) {
    // Enrolled through gw-a, known to all three.
    let devices = 6 + 3 + 2;
    for (name, known) in &s.known_per_gateway {
        assert_eq!(*known, devices, "{name}");
    }
    common::assert_refusals(&s.refusals);
    // Suspended through one gateway, closed by the one holding the session, within a second.
    let sus = &s.suspension;
    assert_ne!(sus.held_on, sus.suspended_through);
    assert_eq!(sus.close.as_ref().map(|c| c.0), Some(4001), "{sus:?}");
    assert!(sus.elapsed < Duration::from_secs(1), "{sus:?}");
    // The fleet went through the balancer to more than one gateway.
    assert_eq!(s.sensors_connected, 6);
    assert_eq!(s.locks_connected, 3);
    let busy = s
        .sessions_per_gateway
        .iter()
        .filter(|(_, n)| *n > 0)
        .count();
    assert!(busy >= 2, "{:?}", s.sessions_per_gateway);
    assert_eq!(
        s.sessions_per_gateway.iter().map(|(_, n)| n).sum::<usize>(),
        9
    );
    assert_eq!(s.telemetry_delivered, s.telemetry_sent);
    assert!(s.commands_answered >= 3, "{s:?}");
    // Every chain verifies; the locks' and the suspended session's are there.
    assert_eq!(s.audit_failures, 0);
    assert!(s.audit_devices_verified >= 3, "{s:?}");
    assert!(s.audit_records >= 2 * s.commands_answered, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_demo_through_haproxy_does_what_it_says() {
    assert!(
        gatehouse_sim::haproxy::find().is_some(),
        "HAProxy is not installed: `apt-get install haproxy` (what scripts/test does)"
    );
    let s = demo(Balancer::Haproxy).await;
    assert_eq!(s.balancer, Balancer::Haproxy);
    check(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_demo_with_three_gateways_on_one_reuse_port_socket_does_what_it_says() {
    let s = demo(Balancer::ReusePort).await;
    assert_eq!(s.balancer, Balancer::ReusePort);
    check(&s);
}
