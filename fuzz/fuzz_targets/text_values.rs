//! A column value in Postgres text form, for every type the parser knows (by oid), and back to
//! text: parsing must not panic, and writing what it parsed must not either.
#![no_main]

use dongbo_connectors::postgres::text::{parse_value, write_value};
use libfuzzer_sys::fuzz_target;

/// Oids the text parser treats specially, scalars and their arrays.
const OIDS: &[u32] = &[16, 17, 20, 21, 23, 25, 26, 114, 700, 701, 1000, 1005, 1007, 1009, 1016, 1042, 1043, 1082, 1114, 1184, 1186, 1700, 2950, 3802, 16384];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let oid = OIDS[pick as usize % OIDS.len()];
    let text = String::from_utf8_lossy(rest).into_owned();
    let v = parse_value(oid, "fuzz", text);
    let mut out = String::new();
    let _ = write_value(&v, &mut out);
});
