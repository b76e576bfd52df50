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
