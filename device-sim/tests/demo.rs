//! The demo end to end: the same code path as `gatehouse-sim demo`, smaller and shorter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gatehouse_sim::demo::{run, DemoOptions};
use gatehouse_sim::device::Refused;

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
    let verdict = |id: &str| s.refusals.iter().find(|(i, _)| i == id).unwrap().1.clone();
    assert_eq!(
        verdict("intruder"),
        Some(Refused::Http {
            status: 403,
            code: "unknown-device".into()
        })
    );
    assert!(
        matches!(verdict("stolen-lock"), Some(Refused::Tls(a)) if a.contains("CertificateRevoked"))
    );
    assert_eq!(
        verdict("retired-sensor"),
        Some(Refused::Http {
            status: 403,
            code: "device-revoked".into()
        })
    );
    assert_eq!(
        verdict("sensor-00001"),
        Some(Refused::Http {
            status: 400,
            code: "no-route".into()
        })
    );
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
