//! MySQL/MariaDB values → the change model, from the two places they come from: the snapshot's
//! binary-protocol rows (strings already converted by the server to the session's utf8mb4) and
//! the binlog's row images (strings in the column's own character set, enums as indexes, sets as
//! bitmasks, timestamps as epoch seconds, unsigned integers possibly as signed).
//!
//! Both paths end in [`from_snapshot`]'s shapes, so a row read by the snapshot and the same row
//! read from the binlog give equal [`Value`]s: the NDC cannot tell which path a row took.
//!
//! Zero dates (`0000-00-00`, and dates with a zero month or day) have no Postgres equivalent: as
//! configured, they become NULL or travel as their text, which the NDC refuses, so the change goes
//! to quarantine with the reason.

use mysql_async::Value as My;

use super::schema::{Charset, Kind};
use crate::model::Value;

/// What to do with a zero date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroDates {
    /// Send the text; the NDC refuses it and the change is quarantined with the reason.
    #[default]
    Quarantine,
    /// Send NULL.
    Null,
}

/// Windows-1252's 0x80..=0x9F as MySQL's latin1 maps them (its five undefined bytes to C1 controls).
const LATIN1_HIGH: [u16; 32] = [
    0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0x008D,
    0x017D, 0x008F, 0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A,
    0x0153, 0x009D, 0x017E, 0x0178,
];

/// Decodes latin1 bytes as the server converts them for a utf8mb4 client.
pub fn latin1_to_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9F => char::from_u32(u32::from(LATIN1_HIGH[usize::from(b - 0x80)])).unwrap_or('\u{FFFD}'),
            _ => char::from(b),
        })
        .collect()
}

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Appends `n` in decimal, zero-padded to `width` digits. Written by hand: `format!` was a tenth of
/// the agent's CPU in a MariaDB snapshot of dated rows.
fn push_padded(out: &mut String, n: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in digits.len() - at..width {
        out.push('0');
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

fn push_fraction(out: &mut String, us: u32) {
    if us != 0 {
        out.push('.');
        push_padded(out, us, 6);
    }
}

fn push_date(out: &mut String, y: u16, m: u8, d: u8) {
    push_padded(out, u32::from(y), 4);
    out.push('-');
    push_padded(out, u32::from(m), 2);
    out.push('-');
    push_padded(out, u32::from(d), 2);
}

fn push_clock(out: &mut String, h: u64, mi: u8, s: u8, us: u32) {
    push_padded(out, u32::try_from(h).unwrap_or(u32::MAX), 2);
    out.push(':');
    push_padded(out, u32::from(mi), 2);
    out.push(':');
    push_padded(out, u32::from(s), 2);
    push_fraction(out, us);
}

fn date_text(y: u16, m: u8, d: u8) -> String {
    let mut out = String::with_capacity(10);
    push_date(&mut out, y, m, d);
    out
}

/// `YYYY-MM-DD hh:mm:ss[.ffffff]`, with room for a zone suffix.
fn datetime_text(y: u16, mo: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> String {
    let mut out = String::with_capacity(30);
    push_date(&mut out, y, mo, d);
    out.push(' ');
    push_clock(&mut out, u64::from(h), mi, s, us);
    out
}

fn time_text(negative: bool, hours: u64, m: u8, s: u8, us: u32) -> String {
    let mut out = String::with_capacity(18);
    if negative {
        out.push('-');
    }
    push_clock(&mut out, hours, m, s, us);
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A value of a column of `kind`, as the snapshot's binary protocol gives it.
pub fn from_snapshot(kind: &Kind, v: My, zero_dates: ZeroDates) -> Value {
    let zero = |text: String| match zero_dates {
        ZeroDates::Null => Value::Null,
        ZeroDates::Quarantine => Value::Date(text),
    };
    match (kind, v) {
        (_, My::NULL) => Value::Null,
        (Kind::Int { bits: 64, unsigned: true }, My::UInt(u)) => Value::Numeric(u.to_string()),
        (Kind::Int { bits: 64, unsigned: true }, My::Int(i)) => Value::Numeric((i as u64).to_string()),
        (Kind::Int { .. } | Kind::Year, My::Int(i)) => Value::Int(i),
        (Kind::Int { .. } | Kind::Year, My::UInt(u)) => Value::Int(u as i64),
        (Kind::Decimal, My::Bytes(b)) => Value::Numeric(utf8(b)),
        (Kind::Float, My::Float(f)) => Value::Float(f64::from(f)),
        (Kind::Float | Kind::Double, My::Double(f)) => Value::Float(f),
        (Kind::Char(Charset::Binary) | Kind::Text(Charset::Binary) | Kind::Binary | Kind::Bit, My::Bytes(b)) => {
            Value::Bytes(b)
        }
        (Kind::Char(_), My::Bytes(b)) => {
            let mut text = utf8(b);
            text.truncate(text.trim_end_matches(' ').len());
            Value::Text(text)
        }
        (Kind::Text(_) | Kind::Enum(_) | Kind::Set(_), My::Bytes(b)) => Value::Text(utf8(b)),
        (Kind::Json, My::Bytes(b)) => Value::Json(utf8(b)),
        (Kind::Date, My::Date(y, m, d, ..)) if y == 0 || m == 0 || d == 0 => zero(date_text(y, m, d)),
        (Kind::Date, My::Date(y, m, d, ..)) => Value::Date(date_text(y, m, d)),
        (Kind::DateTime | Kind::Timestamp, My::Date(y, mo, d, h, mi, s, us)) if y == 0 || mo == 0 || d == 0 => {
            zero(datetime_text(y, mo, d, h, mi, s, us))
        }
        (Kind::DateTime, My::Date(y, mo, d, h, mi, s, us)) => Value::Timestamp(datetime_text(y, mo, d, h, mi, s, us)),
        (Kind::Timestamp, My::Date(y, mo, d, h, mi, s, us)) => {
            let mut text = datetime_text(y, mo, d, h, mi, s, us);
            text.push_str("+00");
            Value::TimestampTz(text)
        }
        (Kind::Time, My::Time(negative, days, h, m, s, us)) => Value::Other {
            type_name: "time".into(),
            text: time_text(negative, u64::from(days) * 24 + u64::from(h), m, s, us),
        },
        // A value of a shape the column's kind does not expect travels as text, never dropped.
        (kind, v) => Value::Other { type_name: format!("{kind:?}"), text: v.as_sql(true) },
    }
}

/// A value of a column of `kind`, as a binlog row image gives it.
pub fn from_binlog(kind: &Kind, v: My, zero_dates: ZeroDates) -> Value {
    let v = match (kind, v) {
        (_, My::NULL) => My::NULL,
        // Without binlog_row_metadata = FULL the binlog does not say a column is unsigned.
        (Kind::Int { bits, unsigned: true }, My::Int(i)) if i < 0 => {
            My::UInt(if *bits == 64 { i as u64 } else { (i as u64) & ((1u64 << bits) - 1) })
        }
        (Kind::Char(Charset::Latin1) | Kind::Text(Charset::Latin1), My::Bytes(b)) => {
            My::Bytes(latin1_to_string(&b).into_bytes())
        }
        (Kind::Enum(labels), My::Int(i)) => {
            let label = usize::try_from(i).ok().and_then(|i| i.checked_sub(1)).and_then(|i| labels.get(i));
            My::Bytes(label.cloned().unwrap_or_default().into_bytes())
        }
        (Kind::Set(labels), My::Bytes(mask)) => {
            let on: Vec<&str> = labels
                .iter()
                .enumerate()
                .filter(|(i, _)| mask.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0))
                .map(|(_, l)| l.as_str())
                .collect();
            My::Bytes(on.join(",").into_bytes())
        }
        // YEAR 0000 is stored as 0, which the decoder prints as 1900 (not a legal year otherwise).
        (Kind::Year, My::Bytes(b)) => match utf8(b).parse::<i64>() {
            Ok(1900) => My::Int(0),
            Ok(y) => My::Int(y),
            Err(_) => My::NULL,
        },
        (Kind::Timestamp, My::Bytes(b)) => {
            let text = utf8(b);
            let (sec, us) = text.split_once('.').unwrap_or((&text, "0"));
            match (sec.parse::<i64>(), us.parse::<u32>()) {
                // 0 is the zero timestamp: 1970-01-01 00:00:00 UTC itself is outside TIMESTAMP's range.
                (Ok(0), Ok(0)) => My::Date(0, 0, 0, 0, 0, 0, 0),
                (Ok(sec), Ok(us)) => {
                    let (y, m, d) = civil_from_days(sec.div_euclid(86_400));
                    let t = sec.rem_euclid(86_400);
                    My::Date(y as u16, m, d, (t / 3600) as u8, (t % 3600 / 60) as u8, (t % 60) as u8, us)
                }
                _ => My::Bytes(text.into_bytes()),
            }
        }
        (_, v) => v,
    };
    from_snapshot(kind, v, zero_dates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_is_decoded_as_the_server_converts_it() {
        assert_eq!(latin1_to_string(b"caf\xe9"), "café");
        assert_eq!(latin1_to_string(b"\x80\x81\x9f"), "€\u{81}Ÿ");
        // UTF-8 bytes of "ễ" stored by an old latin1 client: delivered double-encoded, as the server does.
        assert_eq!(latin1_to_string("ễ".as_bytes()), "á»…");
    }

    #[test]
    fn binlog_shapes_equal_snapshot_shapes() {
        let q = ZeroDates::Quarantine;
        let int = |bits, unsigned| Kind::Int { bits, unsigned };
        assert_eq!(
            from_binlog(&int(32, true), My::Int(-1), q),
            from_snapshot(&int(32, true), My::UInt(4_294_967_295), q)
        );
        assert_eq!(from_binlog(&int(64, true), My::Int(-1), q), Value::Numeric("18446744073709551615".into()));
        let labels = vec!["thường trú".to_string(), "tạm trú".to_string()];
        assert_eq!(from_binlog(&Kind::Enum(labels.clone()), My::Int(2), q), Value::Text("tạm trú".into()));
        assert_eq!(from_binlog(&Kind::Set(labels), My::Bytes(vec![3]), q), Value::Text("thường trú,tạm trú".into()));
        assert_eq!(
            from_binlog(&Kind::Timestamp, My::Bytes(b"1735689600.000250".to_vec()), q),
            from_snapshot(&Kind::Timestamp, My::Date(2025, 1, 1, 0, 0, 0, 250), q)
        );
        assert_eq!(
            from_binlog(&Kind::Timestamp, My::Bytes(b"951782400".to_vec()), q),
            Value::TimestampTz("2000-02-29 00:00:00+00".into())
        );
        assert_eq!(from_binlog(&Kind::Year, My::Bytes(b"1900".to_vec()), q), Value::Int(0));
        assert_eq!(
            from_binlog(&Kind::Char(Charset::Latin1), My::Bytes(b"caf\xe9  ".to_vec()), q),
            Value::Text("café".into())
        );
        assert_eq!(
            from_snapshot(&Kind::Time, My::Time(true, 1, 2, 3, 4, 5), q),
            Value::Other { type_name: "time".into(), text: "-26:03:04.000005".into() }
        );
    }

    #[test]
    fn dates_and_times_print_as_the_ndc_reads_them() {
        let q = ZeroDates::Quarantine;
        assert_eq!(from_snapshot(&Kind::Date, My::Date(987, 3, 9, 0, 0, 0, 0), q), Value::Date("0987-03-09".into()));
        assert_eq!(
            from_snapshot(&Kind::DateTime, My::Date(2025, 7, 1, 8, 5, 0, 0), q),
            Value::Timestamp("2025-07-01 08:05:00".into())
        );
        assert_eq!(
            from_snapshot(&Kind::Timestamp, My::Date(2025, 12, 31, 23, 59, 59, 120), q),
            Value::TimestampTz("2025-12-31 23:59:59.000120+00".into())
        );
        let time = from_snapshot(&Kind::Time, My::Time(true, 34, 22, 0, 7, 500_000), q);
        assert_eq!(time, Value::Other { type_name: "time".into(), text: "-838:00:07.500000".into() });
        let char_padded = from_snapshot(&Kind::Char(Charset::Utf8), My::Bytes("Huế  ".as_bytes().to_vec()), q);
        assert_eq!(char_padded, Value::Text("Huế".into()));
    }

    #[test]
    fn zero_dates_are_null_or_their_text_as_configured() {
        let zero = My::Date(0, 0, 0, 0, 0, 0, 0);
        assert_eq!(from_snapshot(&Kind::Date, zero.clone(), ZeroDates::Quarantine), Value::Date("0000-00-00".into()));
        assert_eq!(from_snapshot(&Kind::Date, zero.clone(), ZeroDates::Null), Value::Null);
        assert_eq!(from_binlog(&Kind::Timestamp, My::Bytes(b"0".to_vec()), ZeroDates::Null), Value::Null);
        assert_eq!(
            from_snapshot(&Kind::DateTime, My::Date(2024, 0, 5, 1, 2, 3, 0), ZeroDates::Quarantine),
            Value::Date("2024-00-05 01:02:03".into())
        );
    }
}
