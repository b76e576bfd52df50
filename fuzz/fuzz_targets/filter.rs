//! A subscription filter as the admin API receives it: parsed (bounded in size and depth), its
//! fields listed, and evaluated against a record. Nothing may panic or overflow the stack.
#![no_main]

use dongbo_hub::fanout::filter::{FieldValue, Filter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(f) = Filter::parse(text) else { return };
    let _ = f.fields();
    let get = |path: &str| match path.len() % 4 {
        0 => FieldValue::Null,
        1 => FieldValue::Text("79"),
        2 => FieldValue::Number(79.0),
        _ => FieldValue::Bool(true),
    };
    let _ = f.matches(&get);
});
