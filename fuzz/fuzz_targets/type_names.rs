//! A source column's type name from the wire: whatever it is, the NDC type the hub writes is one of
//! its own closed grammar, and parsing that text again gives the same type.
#![no_main]

use dongbo_hub::apply::types;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else { return };
    if let Some(t) = types::parse(name) {
        let sql = t.to_string();
        assert!(sql.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b" (),[]".contains(&b)), "{sql:?}");
        assert_eq!(types::parse(&sql), Some(t), "{sql:?}");
    }
    let _ = types::ndc_ident(name, "column");
});
