//! A webhook signature header as a forger would send it: checking it must not panic, and a header
//! the fuzzer made up must not verify.
#![no_main]

use dongbo_proto::webhook;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    assert!(webhook::verify(b"secret", header, "hcm:1", b"{}", 1_000, 300).is_err(), "{header:?}");
});
