//! What both demo tests check.

use gatehouse_sim::device::Refused;

/// The demo's four probes are refused, each with the answer an operator should expect.
pub fn assert_refusals(refusals: &[(String, Option<Refused>)]) {
    let verdict = |id: &str| refusals.iter().find(|(i, _)| i == id).unwrap().1.clone();
    assert_eq!(
        verdict("intruder"),
        Some(Refused::Http {
            status: 403,
            code: "unknown-device".into(),
            retry_after: None,
        })
    );
    assert!(
        matches!(verdict("stolen-lock"), Some(Refused::Tls(a)) if a.contains("CertificateRevoked"))
    );
    assert_eq!(
        verdict("retired-sensor"),
        Some(Refused::Http {
            status: 403,
            code: "device-revoked".into(),
            retry_after: None,
        })
    );
    assert_eq!(
        verdict("sensor-00001"),
        Some(Refused::Http {
            status: 400,
            code: "no-route".into(),
            retry_after: None,
        })
    );
}
