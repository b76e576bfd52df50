//! The hub's direct batch decoder against the reference (prost's generated structs, then
//! `TryFrom`): on any bytes both accept or both refuse, and what they accept is the same batch.
//! Also re-encodes what was accepted and decodes it again, so the encoder is held to the decoder.
#![no_main]

use dongbo_connectors::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let direct = wire::decode_batch(data);
    let reference = wire::decode_batch_with_prost(data);
    match (direct, reference) {
        (Ok(d), Ok(r)) => {
            // Compared as bytes: a NaN float is not equal to itself as a value.
            let (d, r) = (wire::encode_batch(d), wire::encode_batch(r));
            assert_eq!(d, r, "the decoders read the same bytes as different batches");
            let again = wire::decode_batch(&d).expect("a batch we encoded decodes");
            assert_eq!(wire::encode_batch(again), d);
        }
        (Err(_), Err(_)) => {}
        (d, r) => panic!("the decoders disagree: direct {:?}, prost {:?}", d.map(|_| ()), r.map(|_| ())),
    }
});
