//! Fuzzes the device's HTTP upgrade request parser (request line, headers, key, protocols,
//! header candidates for the backend). Run: `cargo +nightly fuzz run upgrade`.
#![no_main]

use gatehouse::admission::upgrade::{self, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for max in [512usize, 8192] {
        if let Ok(Parsed::Complete(request, used)) = upgrade::parse(data, max) {
            assert!(used <= data.len() && used <= max);
            // What parses yields a well-formed answer.
            let answer = upgrade::switching_protocols(&request.key, "telemetry.v1");
            assert!(answer.starts_with(b"HTTP/1.1 101 "));
            for (name, _) in &request.forward_headers {
                let folded = gatehouse::admission::routing::fold_header_name(name);
                assert!(!upgrade::never_forwarded(&folded), "{name} would be passed on");
            }
        }
    }
});
