//! The records subscribers receive: domain events and applied row changes, as JSON objects.
//!
//! A record is an envelope and data. The envelope (`event_id`, and `event` for an event or `table`
//! and `op` for a row change) is written by the hub from the log item's own fields, never from row
//! values; the data are the row's columns or the event's payload, of which projection keeps only
//! what the purpose grants (`previous` / `current` nest for events). Both sit at the top level of
//! the delivered object, so their names are kept apart: the catalog refuses a dictionary field or
//! event column named like an envelope field, and projection writes the envelope last.

use std::time::{Duration, UNIX_EPOCH};

use dongbo_connectors::model::{ChangeEvent, Operation, Value};
use dongbo_connectors::postgres::text::write_value;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// A domain event derived from a row change, e.g. `residence.changed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// Stable id: `<source>:<seq>:<event>`, the same on every redelivery.
    pub event_id: String,
    /// Event name.
    pub event: String,
    /// The source (agent) whose change raised it.
    pub source_id: String,
    /// The raising change's seq.
    pub seq: u64,
    /// The citizen it concerns.
    pub citizen_id: String,
    /// Source commit time of the change, microseconds since the epoch.
    pub effective_at_us: i64,
    /// The full payload, before projection.
    pub payload: Map<String, Json>,
}

/// RFC 3339 UTC text of a microsecond timestamp.
pub fn rfc3339_micros(us: i64) -> String {
    let t = if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    };
    humantime::format_rfc3339_micros(t).to_string()
}

/// Microseconds since the epoch of text in the one form [`rfc3339_micros`] writes
/// (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, years 1 to 9999); `None` for any other text, which a caller
/// then hands on as text.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (26, b'Z')];
    if b.len() != 27 || separators.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let num = |from: usize, to: usize| {
        b[from..to].iter().try_fold(0i64, |n, &d| d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0')))
    };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, min, sec, frac) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 26)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y == 0 || !(1..=12).contains(&m) || d == 0 || d > month_days[m as usize - 1] || hour > 23 || min > 59 || sec > 59
    {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date, counted from March so the leap day
    // ends a year (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hour * 3_600 + min * 60 + sec) * 1_000_000 + frac)
}

/// Now, microseconds since the epoch.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A column value as JSON: numbers and booleans as such, everything else as its Postgres text.
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::Null | Value::UnchangedToast => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or_else(|| Json::String(f.to_string()), Json::Number),
        Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| Json::String(s.clone())),
        Value::Array(items) => Json::Array(items.iter().map(value_json).collect()),
        other => {
            let mut s = String::new();
            write_value(other, &mut s);
            Json::String(s)
        }
    }
}

/// The JSON name of a change's operation.
pub fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Insert => "insert",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Truncate => "truncate",
        Operation::SnapshotRead => "snapshot",
    }
}

/// The data of an applied row change, before projection: every column of the new row, or for a
/// delete the key. Column names are data here; the envelope is not part of it.
pub fn change_data(c: &ChangeEvent) -> Map<String, Json> {
    let mut m = Map::new();
    match &c.after {
        Some(row) => {
            for (col, v) in c.table.columns.iter().zip(row) {
                if *v != Value::UnchangedToast {
                    m.insert(col.name.clone(), value_json(v));
                }
            }
        }
        None => {
            for (&i, v) in c.table.key_columns.iter().zip(&c.key) {
                m.insert(c.table.columns[i].name.clone(), value_json(v));
            }
        }
    }
    m
}

/// The value at a dotted path of a record (`current.commune_code`).
pub fn field<'a>(record: &'a Map<String, Json>, path: &str) -> Option<&'a Json> {
    let mut parts = path.split('.');
    let mut v = record.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn commit_times_read_back_as_written() {
        let mut us: i64 = 0;
        // Steps of about 3.7 days and odd microseconds, to 9999-12-31.
        while us < 253_402_300_800_000_000 {
            assert_eq!(parse_rfc3339_micros(&rfc3339_micros(us)), Some(us), "{}", rfc3339_micros(us));
            us += 321_987_654_321;
        }
        for us in [0, 951_782_400_000_000, 1_796_321_506_699_042, 253_402_300_799_999_999] {
            assert_eq!(parse_rfc3339_micros(&rfc3339_micros(us)), Some(us), "{}", rfc3339_micros(us));
        }
        for other in [
            "2026-12-03 18:11:46.699042+00",
            "2026-12-03T18:11:46Z",
            "2026-12-03T18:11:46.699042+07",
            "2023-02-29T00:00:00.000000Z",
            "2024-13-01T00:00:00.000000Z",
            "2024-01-01T24:00:00.000000Z",
            "0000-01-01T00:00:00.000000Z",
            "2024-01-01T00:00:00.00000aZ",
            "infinity",
        ] {
            assert_eq!(parse_rfc3339_micros(other), None, "{other}");
        }
        assert_eq!(parse_rfc3339_micros("2024-02-29T00:00:00.000001Z"), Some(1_709_164_800_000_001));
    }

    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(1_795_000_000_123_456), "2026-11-18T11:06:40.123456Z");
    }

    #[test]
    fn values_become_json_of_their_kind() {
        assert_eq!(value_json(&Value::Int(7)), Json::from(7));
        assert_eq!(value_json(&Value::Numeric("12.50".into())), Json::String("12.50".into()));
        assert_eq!(value_json(&Value::Json("{\"a\":1}".into())), serde_json::json!({"a": 1}));
        assert_eq!(value_json(&Value::Null), Json::Null);
        let rec = serde_json::json!({"current": {"commune_code": "26734"}, "a": 1});
        assert_eq!(field(rec.as_object().unwrap(), "current.commune_code"), Some(&Json::String("26734".into())));
        assert_eq!(field(rec.as_object().unwrap(), "current.address"), None);
    }
}
