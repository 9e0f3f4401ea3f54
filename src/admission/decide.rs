//! The admission decision, pure: given what the handshake learned (the verified certificate,
//! the CRL index in force, the registry's record for the certificate, the offered
//! subprotocols) and what is configured (routes, schemas, the stale-CRL policy), either the
//! device and route of a new session or the refusal to send. Time is an argument. The
//! handshake (`session::handshake`) gathers the inputs and carries out the answer.

use std::sync::Arc;

use super::identity::{
    check_certificate, check_device, PeerCertificate, RevocationIndex, StaleCrlPolicy,
};
use super::routing::{Route, RouteTable};
use crate::model::Device;
use crate::schema::{SchemaKind, SchemaSet};
use crate::wire::Refusal;

/// Everything admission looks at.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub cert: &'a PeerCertificate,
    pub crls: &'a RevocationIndex,
    pub stale_crl: StaleCrlPolicy,
    /// Unix time, seconds.
    pub now: i64,
    /// The registry's record for the certificate's fingerprint.
    pub device: Option<&'a Arc<Device>>,
    /// Subprotocols in the device's order of preference.
    pub offered: &'a [String],
    pub routes: &'a RouteTable,
    pub schemas: &'a SchemaSet,
}

/// A connection that may become a session.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub device: Arc<Device>,
    pub route: Arc<Route>,
}

/// A refusal, with the enrolled device's id when there is one (for the audit log).
pub type Refused = (Refusal, Option<String>);

/// Certificate checks, registry status, route, the route's schema: the first that fails
/// decides the refusal.
pub fn admit(a: Admission<'_>) -> Result<Admitted, Refused> {
    let enrolled_id = || a.device.map(|d| d.id.clone());
    check_certificate(a.cert, a.crls, a.stale_crl == StaleCrlPolicy::Refuse, a.now)
        .map_err(|r| (r, enrolled_id()))?;
    let device = check_device(a.device.map(|d| &**d)).map_err(|r| (r, enrolled_id()))?;
    let route = a
        .routes
        .select(a.offered.iter().map(String::as_str), &device.device_type)
        .map_err(|no| {
            (
                Refusal::NoRoute {
                    offered: a.offered.to_vec(),
                    allowed: no.allowed,
                },
                enrolled_id(),
            )
        })?;
    let required = SchemaKind::required_by(route.kind);
    if route.validate && a.schemas.get(&device.device_type, required).is_none() {
        return Err((
            Refusal::NoSchema {
                file: required.file_name(),
            },
            enrolled_id(),
        ));
    }
    let device = a.device.cloned().ok_or((Refusal::UnknownDevice, None))?;
    Ok(Admitted { device, route })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceStatus, Fingerprint};

    fn cert(not_after: i64) -> PeerCertificate {
        PeerCertificate {
            fingerprint: Fingerprint([7; 32]),
            serial: vec![1],
            issuer: vec![2],
            not_before: 0,
            not_after,
            client_auth: true,
            claimed_id: None,
        }
    }

    fn device(status: DeviceStatus, device_type: &str) -> Arc<Device> {
        let now = time::OffsetDateTime::UNIX_EPOCH;
        Arc::new(Device {
            id: "lock-1".into(),
            device_type: device_type.into(),
            status,
            fingerprints: vec![Fingerprint([7; 32]).to_string()],
            created_at: now,
            updated_at: now,
            labels: Default::default(),
        })
    }

    fn schemas() -> SchemaSet {
        let mut set = SchemaSet::default();
        set.add("door-lock", SchemaKind::Telemetry, "t".as_ref(), b"{}")
            .unwrap();
        set.add("door-lock", SchemaKind::Command, "c".as_ref(), b"{}")
            .unwrap();
        set.add_type("env-sensor", "e".as_ref()).unwrap();
        set
    }

    const RULES: crate::admission::routing::FrameRules = crate::admission::routing::FrameRules {
        error_replies: true,
        invalid_frame_limit: 20,
        invalid_frame_window: std::time::Duration::from_secs(10),
    };

    fn routes() -> RouteTable {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        RouteTable::new(vec![
            Route::parse(
                "telemetry.v1",
                "telemetry",
                &s(&["door-lock", "env-sensor"]),
                &s(&["ws://a:1/"]),
                crate::admission::routing::tests::options(RULES),
            )
            .unwrap(),
            Route::parse(
                "control.v1",
                "control",
                &s(&["door-lock"]),
                &s(&["ws://b:2/"]),
                crate::admission::routing::tests::options(RULES),
            )
            .unwrap(),
        ])
    }

    #[test]
    fn the_first_failing_check_decides() {
        let (crls, schemas, routes) = (RevocationIndex::default(), schemas(), routes());
        let offered = vec!["control.v1".to_string()];
        let active = device(DeviceStatus::Active, "door-lock");
        let valid = cert(100);
        let base = Admission {
            cert: &valid,
            crls: &crls,
            stale_crl: StaleCrlPolicy::Refuse,
            now: 50,
            device: Some(&active),
            offered: &offered,
            routes: &routes,
            schemas: &schemas,
        };
        let ok = admit(base).unwrap();
        assert_eq!(ok.route.subprotocol, "control.v1");

        let expired = cert(10);
        let refused = admit(Admission {
            cert: &expired,
            ..base
        })
        .unwrap_err();
        // The certificate check comes first, and the refusal names the enrolled device.
        assert_eq!(
            refused,
            (Refusal::CertificateExpired, Some("lock-1".into()))
        );

        let suspended = device(DeviceStatus::Suspended, "door-lock");
        assert_eq!(
            admit(Admission {
                device: Some(&suspended),
                ..base
            })
            .unwrap_err()
            .0,
            Refusal::DeviceSuspended
        );
        assert_eq!(
            admit(Admission {
                device: None,
                ..base
            })
            .unwrap_err(),
            (Refusal::UnknownDevice, None)
        );
        let telemetry_only = vec!["bogus".to_string()];
        assert!(matches!(
            admit(Admission {
                offered: &telemetry_only,
                ..base
            })
            .unwrap_err()
            .0,
            Refusal::NoRoute { .. }
        ));
        // env-sensor may use telemetry.v1 but has no telemetry schema: 500 no-schema.
        let sensor = device(DeviceStatus::Active, "env-sensor");
        let telemetry = vec!["telemetry.v1".to_string()];
        assert_eq!(
            admit(Admission {
                device: Some(&sensor),
                offered: &telemetry,
                ..base
            })
            .unwrap_err()
            .0,
            Refusal::NoSchema {
                file: "telemetry.schema.json"
            }
        );
    }
}
