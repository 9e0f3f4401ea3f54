//! Decode plus validation cost per frame: `cargo bench --bench frames`.
//! Results are recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use gatehouse::admission::routing::RouteKind;
use gatehouse::frames::{self, DecodeLimits, Encoding, Frame};
use gatehouse::policy::{check_frame, Direction};
use gatehouse::schema::{SchemaKind, SchemaSet};

fn main() {
    divan::main();
}

const LIMITS: DecodeLimits = DecodeLimits { max_depth: 16 };

/// A 200-byte env-sensor reading, valid under the shipped schema.
fn json_frame() -> String {
    let base = r#"{"type":"reading","id":"ID","seq":123456,"ts":1764000000000,"temperature_c":21.53,"humidity_pct":40.25,"co2_ppm":612,"battery_pct":87}"#;
    let pad = 200 - (base.len() - 2);
    let frame = base.replace("ID", &"x".repeat(pad));
    assert_eq!(frame.len(), 200);
    frame
}

fn cbor_frame() -> Vec<u8> {
    let value: serde_json::Value = serde_json::from_str(&json_frame()).unwrap();
    let mut out = Vec::new();
    ciborium::into_writer(&value, &mut out).unwrap();
    out
}

fn schemas() -> SchemaSet {
    gatehouse::config::load_schemas(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")).unwrap()
}

#[divan::bench]
fn json_decode(b: divan::Bencher<'_, '_>) {
    let frame = json_frame();
    b.bench(|| frames::decode(Encoding::Json, divan::black_box(frame.as_bytes()), LIMITS).unwrap());
}

#[divan::bench]
fn cbor_decode(b: divan::Bencher<'_, '_>) {
    let frame = cbor_frame();
    b.bench(|| frames::decode(Encoding::Cbor, divan::black_box(&frame), LIMITS).unwrap());
}

#[divan::bench]
fn validate_only(b: divan::Bencher<'_, '_>) {
    let set = schemas();
    let v = set.get("env-sensor", SchemaKind::Telemetry).unwrap();
    let value: serde_json::Value = serde_json::from_str(&json_frame()).unwrap();
    b.bench(|| gatehouse::schema::validate(v, divan::black_box(&value)).unwrap());
}

#[divan::bench]
fn json_decode_and_validate(b: divan::Bencher<'_, '_>) {
    let set = schemas();
    let msg = json_frame();
    b.bench(|| {
        check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Up,
            Frame::Text(divan::black_box(msg.as_bytes())),
            LIMITS,
        )
        .unwrap()
    });
}

#[divan::bench]
fn cbor_decode_and_validate(b: divan::Bencher<'_, '_>) {
    let set = schemas();
    let msg = cbor_frame();
    b.bench(|| {
        check_frame(
            &set,
            "env-sensor",
            RouteKind::Telemetry,
            Direction::Up,
            Frame::Binary(divan::black_box(&msg)),
            LIMITS,
        )
        .unwrap()
    });
}

/// Reference: serde_json's plain `Value` parse (no duplicate-key, integer or depth checks).
#[divan::bench]
fn reference_serde_json_value(b: divan::Bencher<'_, '_>) {
    let frame = json_frame();
    b.bench(|| {
        serde_json::from_slice::<serde_json::Value>(divan::black_box(frame.as_bytes())).unwrap()
    });
}

/// Reference: the CBOR path through `ciborium::Value` the crate notes warn about.
#[divan::bench]
fn reference_ciborium_value(b: divan::Bencher<'_, '_>) {
    let frame = cbor_frame();
    b.bench(|| {
        ciborium::from_reader::<ciborium::Value, _>(divan::black_box(frame.as_slice())).unwrap()
    });
}
