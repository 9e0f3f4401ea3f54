//! The demo end to end: the same code path as `gatehouse-sim demo`, smaller and shorter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;

use gatehouse_sim::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_refuses_what_it_should_and_delivers_everything_else() {
    let s = run(DemoOptions {
        sensors: 4,
        locks: 2,
        duration: Duration::from_millis(1500),
        rate_hz: 4.0,
        keep: false,
    })
    .await
    .unwrap();
    common::assert_refusals(&s.refusals);
    assert_eq!(s.sensors_connected, 4);
    assert_eq!(s.locks_connected, 2);
    assert!(s.telemetry_sent >= 4 * 4, "{s:?}");
    assert_eq!(
        s.telemetry_delivered,
        s.telemetry_sent + 1,
        "every valid telemetry frame reaches the backend (the fleet's and the faulty sensor's one)"
    );
    assert!(s.commands_sent >= 2, "{s:?}");
    assert!(s.commands_answered >= 2, "{s:?}");
    assert_eq!(
        s.responses_delivered, s.commands_answered,
        "every answer reaches the control backend"
    );
}
