//! Fuzzes the untrusted-frame path: strict JSON and CBOR decoding, then validation against
//! the shipped schemas. Run: `cargo +nightly fuzz run frames` (from this directory).
#![no_main]

use std::sync::OnceLock;

use gatehouse::frames::{self, DecodeLimits, Encoding};
use gatehouse::schema::{SchemaKind, SchemaSet};
use libfuzzer_sys::fuzz_target;

fn schemas() -> &'static SchemaSet {
    static SET: OnceLock<SchemaSet> = OnceLock::new();
    SET.get_or_init(|| {
        gatehouse::config::load_schemas(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas"))
            .expect("shipped schemas load")
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_depth: 16 };
    for encoding in [Encoding::Json, Encoding::Cbor] {
        if let Ok(value) = frames::decode(encoding, data, limits) {
            // What decodes must survive a round trip through JSON unchanged.
            let text = serde_json::to_vec(&value).expect("a decoded value serialises");
            assert_eq!(frames::decode_json(&text, limits).expect("re-decodes"), value);
            for t in ["env-sensor", "door-lock"] {
                for kind in [SchemaKind::Telemetry, SchemaKind::Command, SchemaKind::Response] {
                    if let Some(v) = schemas().get(t, kind) {
                        let _ = gatehouse::schema::validate(v, &value);
                    }
                }
            }
            let _ = frames::error_frame(encoding, &frames::Rejection::new(frames::RejectCode::Malformed, "", ""));
        }
    }
});
