//! Postgres text format of values, both ways: the source parses what pgoutput and `COPY ... TO` print,
//! the hub prints values back for `COPY ... FROM`. Sessions run with DateStyle=ISO and TimeZone=UTC so
//! temporal text is unambiguous.

use crate::model::Value;

/// Type oids with a typed representation; anything else travels as [`Value::Other`].
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of the array types we model.
fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1009 => oid::TEXT,
        1028 => oid::OID,
        199 => oid::JSON,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1182 => oid::DATE,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1231 => oid::NUMERIC,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// Parses a value printed in Postgres text format, taking the text by value so text-like values move
/// instead of being copied. Never fails: text that does not parse as its type is kept as
/// [`Value::Other`], so nothing is lost.
pub fn parse_value(type_oid: u32, type_name: &str, text: String) -> Value {
    let text = match parse_scalar(type_oid, text) {
        Ok(v) => return v,
        Err(text) => text,
    };
    if let Some(v) = array_element(type_oid).and_then(|elem| parse_array(elem, &text)) {
        return v;
    }
    Value::Other { type_name: type_name.to_string(), text }
}

/// A scalar of a modelled type, or the text back when the type is not modelled or does not parse.
fn parse_scalar(type_oid: u32, text: String) -> Result<Value, String> {
    Ok(match type_oid {
        oid::BOOL => match text.as_str() {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(text),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse() {
            Ok(i) => Value::Int(i),
            Err(_) => return Err(text),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text.parse() {
            Ok(f) => Value::Float(f),
            Err(_) => return Err(text),
        },
        oid::NUMERIC => Value::Numeric(text),
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR => Value::Text(text),
        oid::BYTEA => match text.strip_prefix("\\x").and_then(|h| hex::decode(h).ok()) {
            Some(b) => Value::Bytes(b),
            None => return Err(text),
        },
        oid::DATE => Value::Date(text),
        oid::TIMESTAMP => Value::Timestamp(text),
        oid::TIMESTAMPTZ => Value::TimestampTz(text),
        oid::JSON | oid::JSONB => Value::Json(text),
        oid::UUID => Value::Uuid(text),
        _ => return Err(text),
    })
}

/// Parses an array literal such as `{1,NULL,"a \"b\""}` or `{{1,2},{3,4}}`. Literals with explicit
/// bounds (`[0:1]={...}`) return `None` and travel as text, keeping their bounds.
fn parse_array(elem_oid: u32, text: &str) -> Option<Value> {
    let mut chars = text.chars().peekable();
    let v = parse_array_level(elem_oid, &mut chars)?;
    chars.next().is_none().then_some(v)
}

fn parse_array_level(elem_oid: u32, chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<Value> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(parse_array_level(elem_oid, chars)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(parse_scalar(elem_oid, s).ok()?);
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                let s = s.trim();
                items.push(if s.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    parse_scalar(elem_oid, s.to_string()).ok()?
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

/// A key's identity as text; `\u{1}` separates parts and `\u{2}` marks NULL, neither of which Postgres
/// prints in a value's text.
pub fn key_text(key: &[Value]) -> String {
    let mut s = String::new();
    for v in key {
        if write_value(v, &mut s).is_none() {
            s.push('\u{2}');
        }
        s.push('\u{1}');
    }
    s
}

/// Writes a value in Postgres text format (not yet escaped for COPY). `None` for SQL NULL and for an
/// unchanged TOAST value, which has no text.
pub fn write_value(v: &Value, out: &mut String) -> Option<()> {
    use std::fmt::Write;
    match v {
        Value::Null | Value::UnchangedToast => return None,
        Value::Bool(b) => out.push(if *b { 't' } else { 'f' }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => write_float(*f, out),
        Value::Numeric(s)
        | Value::Text(s)
        | Value::Date(s)
        | Value::Timestamp(s)
        | Value::TimestampTz(s)
        | Value::Json(s)
        | Value::Uuid(s) => out.push_str(s),
        Value::Other { text, .. } => out.push_str(text),
        Value::Bytes(b) => {
            out.push_str("\\x");
            out.push_str(&hex::encode(b));
        }
        Value::Array(items) => write_array(items, out),
    }
    Some(())
}

fn write_float(f: f64, out: &mut String) {
    use std::fmt::Write;
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        // Rust prints the shortest text that round-trips, as Postgres does with extra_float_digits=1.
        let _ = write!(out, "{f}");
    }
}

fn write_array(items: &[Value], out: &mut String) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Array(inner) => write_array(inner, out),
            other => {
                let mut s = String::new();
                if write_value(other, &mut s).is_none() {
                    out.push_str("NULL");
                    continue;
                }
                // Quoting every element is valid for every element type and avoids deciding when.
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
}

/// Appends `text` to a COPY text-format line, escaping what COPY treats specially. Runs of plain
/// bytes are copied whole.
pub fn push_copy_escaped(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    // Nearly every value has nothing to escape: one branch-free scan (it vectorises), one copy.
    // The scan also flags the rare control bytes below '\r' that need no escape; the loop below
    // copies those as they are.
    if !bytes.iter().fold(false, |seen, &b| seen | (b <= b'\r') | (b == b'\\')) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Appends a value to a COPY text-format line (`\N` for NULL); `scratch` holds the text of
/// values that are not text already. `false` for an unchanged TOAST value, which has no text.
pub fn push_copy_value(v: &Value, out: &mut Vec<u8>, scratch: &mut String) -> bool {
    match v {
        Value::UnchangedToast => return false,
        Value::Null => out.extend_from_slice(b"\\N"),
        Value::Numeric(s)
        | Value::Text(s)
        | Value::Date(s)
        | Value::Timestamp(s)
        | Value::TimestampTz(s)
        | Value::Json(s)
        | Value::Uuid(s) => push_copy_escaped(s, out),
        Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        other => {
            scratch.clear();
            if write_value(other, scratch).is_some() {
                push_copy_escaped(scratch, out);
            }
        }
    }
    true
}

/// Splits one line of `COPY ... TO STDOUT` text output (without its newline) into fields, `None` for
/// `\N`, undoing COPY's escapes.
pub fn split_copy_line(line: &[u8]) -> Result<Vec<Option<String>>, String> {
    let mut fields = Vec::with_capacity(16);
    // Validated once for the line: cut at its ASCII tabs, valid UTF-8 stays valid in every field.
    let line = std::str::from_utf8(line).map_err(|e| format!("COPY line is not UTF-8: {e}"))?;
    for field in line.split('\t') {
        if field == "\\N" {
            fields.push(None);
            continue;
        }
        let raw = field.as_bytes();
        if memchr::memchr(b'\\', raw).is_none() {
            fields.push(Some(field.to_owned()));
            continue;
        }
        let mut bytes = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let b = raw[i];
            i += 1;
            if b != b'\\' {
                bytes.push(b);
                continue;
            }
            let e = *raw.get(i).ok_or("COPY line ends in a lone backslash")?;
            i += 1;
            bytes.push(match e {
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 11,
                b'0'..=b'7' => {
                    let mut n = u32::from(e - b'0');
                    for _ in 0..2 {
                        match raw.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                n = n * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    n as u8
                }
                other => other,
            });
        }
        fields.push(Some(String::from_utf8(bytes).map_err(|e| format!("COPY field is not UTF-8: {e}"))?));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(oid: u32, text: &str) -> String {
        let v = parse_value(oid, "t", text.to_string());
        let mut s = String::new();
        write_value(&v, &mut s).unwrap();
        s
    }

    #[test]
    fn scalars_parse_to_their_types_and_print_back() {
        assert_eq!(parse_value(23, "integer", "-42".into()), Value::Int(-42));
        assert_eq!(parse_value(16, "boolean", "t".into()), Value::Bool(true));
        assert_eq!(
            parse_value(1700, "numeric", "12345678901234567890.000000001".into()),
            Value::Numeric("12345678901234567890.000000001".into())
        );
        assert_eq!(parse_value(17, "bytea", "\\x00ff".into()), Value::Bytes(vec![0, 255]));
        assert_eq!(round_trip(701, "0.1"), "0.1");
        assert_eq!(round_trip(701, "-Infinity"), "-Infinity");
        assert_eq!(round_trip(701, "NaN"), "NaN");
        assert_eq!(round_trip(17, "\\x00ff"), "\\x00ff");
        assert_eq!(
            parse_value(600, "point", "(1,2)".into()),
            Value::Other { type_name: "point".into(), text: "(1,2)".into() }
        );
    }

    #[test]
    fn arrays_parse_quoted_null_and_nested_elements() {
        let v = parse_value(1009, "text[]", r#"{plain,"with space","q\"uote",NULL,"NULL"}"#.into());
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Text("plain".into()),
                Value::Text("with space".into()),
                Value::Text("q\"uote".into()),
                Value::Null,
                Value::Text("NULL".into()),
            ])
        );
        let v = parse_value(1007, "integer[]", "{{1,2},{3,4}}".into());
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)])
            ])
        );
        assert_eq!(round_trip(1009, r#"{"a\\b","c"}"#), r#"{"a\\b","c"}"#);
        assert_eq!(round_trip(1007, "{}"), "{}");
        // Explicit bounds are kept verbatim rather than lost.
        assert!(matches!(parse_value(1007, "integer[]", "[0:1]={1,2}".into()), Value::Other { .. }));
    }

    #[test]
    fn copy_lines_split_and_unescape() {
        let f = split_copy_line(b"1\t\\N\ta\\tb\\\\c\\nd\t\\101").unwrap();
        assert_eq!(f, vec![Some("1".into()), None, Some("a\tb\\c\nd".into()), Some("A".into())]);
        let mut out = Vec::new();
        push_copy_escaped("a\tb\\c\nd", &mut out);
        assert_eq!(out, b"a\\tb\\\\c\\nd");
    }

    #[test]
    fn copy_values_are_escaped_in_place() {
        let mut out = Vec::new();
        let mut scratch = String::new();
        for v in [
            Value::Text("a\tb\\c\nd\re".into()),
            Value::Null,
            Value::Int(-42),
            Value::Bytes(vec![0, 255]),
            Value::Text("Nguyễn".into()),
        ] {
            assert!(push_copy_value(&v, &mut out, &mut scratch));
            out.push(b'|');
        }
        assert_eq!(String::from_utf8(out).unwrap(), "a\\tb\\\\c\\nd\\re|\\N|-42|\\\\x00ff|Nguyễn|");
        assert!(!push_copy_value(&Value::UnchangedToast, &mut Vec::new(), &mut scratch));
    }
}
