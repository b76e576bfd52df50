//! One logical decoding message, as pgoutput would send it.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dongbo_connectors::postgres::pgoutput::decode(Bytes::copy_from_slice(data));
});
