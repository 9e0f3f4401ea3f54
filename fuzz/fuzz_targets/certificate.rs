//! Fuzzes identity extraction from a client certificate's DER (fingerprint, serial, issuer,
//! validity, clientAuth, the device-id SAN) and CRL parsing. Run:
//! `cargo +nightly fuzz run certificate`.
#![no_main]

use gatehouse::admission::identity::{PeerCertificate, RevocationIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = PeerCertificate::parse(data) {
        let mut crls = RevocationIndex::default();
        let _ = crls.add_crl(data);
        let _ = crls.is_revoked(&cert);
    }
    let mut crls = RevocationIndex::default();
    let _ = crls.add_crl(data);
});
