//! Polling any server with an ODBC driver (SQL Server, Oracle, and whatever else provincial
//! systems run on), through unixODBC and `odbc-api`. Built only with the `odbc` feature.
//!
//! The statements use nothing but SQL-92 and the row limit the configuration names: row
//! comparisons are written out (`a > ? OR (a = ? AND b > ?)`, SQL Server has no row values),
//! every value is a bound text parameter the server converts to the column's type, and
//! identifiers are quoted with the character the driver reports. Values are fetched as text and
//! typed by the column's ODBC data type, mapped to the PostgreSQL-dialect names the hub knows
//! (`integer`, `numeric(p,s)`, `text`, `timestamp without time zone`, …); a column of another
//! type is refused, naming it. The safety window is taken off a time cursor here, not in SQL
//! (date arithmetic differs between servers), so the cursor's text must be ISO
//! (`YYYY-MM-DD[ HH:MM:SS[.ffffff]]`), as ODBC drivers print it.
//!
//! ODBC calls block: each runs on tokio's blocking pool with the connection moved there and back.

use std::sync::Arc;

use odbc_api::buffers::TextRowSet;
use odbc_api::{Connection, ConnectionOptions, Cursor, IntoParameter, ResultSetMetadata};

use super::config::{Namespace, OdbcConfig, RowLimit};
use super::engine::{bad_cursor, cursor_conditions, keyless, Bound, Engine, PolledTable};
use crate::error::SourceError;
use crate::model::{Column, Row, TableId, TableSchema, Value};
use crate::postgres::text::parse_value;

/// Rows fetched per round trip, and the longest text value taken (longer is refused, never cut).
const FETCH_ROWS: usize = 128;
const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Keys per existence check: SQL Server takes at most 2 100 parameters a statement.
const KEYS_PER_CHECK: usize = 200;

/// A server polled through one ODBC connection.
pub struct OdbcPoller {
    conn: Option<Connection<'static>>,
    quote: (String, String),
    namespace: Namespace,
    row_limit: RowLimit,
}

/// How a polled ODBC table is read.
pub struct OdbcTable {
    from: String,
    columns: String,
    key: Vec<String>,
    cursor: String,
}

fn odbc_error(e: odbc_api::Error) -> SourceError {
    SourceError::Io(std::io::Error::other(format!("ODBC: {e}")))
}

/// One column's ODBC data type as a PostgreSQL-dialect name and type oid, or `None` if dongbo does
/// not carry it.
fn map_type(data_type: i16, size: Option<i32>, digits: Option<i16>) -> Option<(String, u32)> {
    Some(match data_type {
        4 => ("integer".into(), 23),
        5 | -6 => ("smallint".into(), 21),
        -5 => ("bigint".into(), 20),
        2 | 3 => match (size, digits) {
            (Some(p), Some(s)) if p > 0 => (format!("numeric({p},{s})"), 1700),
            _ => ("numeric".into(), 1700),
        },
        6 | 8 => ("double precision".into(), 701),
        7 => ("real".into(), 700),
        1 | 12 | -1 | -8 | -9 | -10 => ("text".into(), 25),
        9 | 91 => ("date".into(), 1082),
        11 | 93 => ("timestamp without time zone".into(), 1114),
        -7 => ("boolean".into(), 16),
        -4..=-2 => ("bytea".into(), 17),
        -11 => ("uuid".into(), 2950),
        _ => return None,
    })
}

/// A driver's text of a value as the Postgres text parser reads it.
fn value(c: &Column, text: Option<String>) -> Value {
    let Some(text) = text else { return Value::Null };
    let text = match c.type_oid {
        16 => if text == "1" || text.eq_ignore_ascii_case("true") { "t" } else { "f" }.to_string(),
        17 => format!("\\x{}", text.to_ascii_lowercase()),
        _ => text,
    };
    parse_value(c.type_oid, &c.type_name, text)
}

/// A value as the text parameter the server converts back.
fn param(v: &Value) -> String {
    let mut text = String::new();
    match v {
        Value::Bool(b) => text.push_str(if *b { "1" } else { "0" }),
        v => {
            crate::postgres::text::write_value(v, &mut text);
        }
    }
    text
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD[ HH:MM:SS[.f…]]` less `seconds`, in the same shape (the fraction kept).
fn minus_seconds(text: &str, seconds: u64) -> Option<String> {
    let (date, time) = text.split_once([' ', 'T']).map_or((text, None), |(d, t)| (d, Some(t)));
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (clock, fraction) = match time {
        Some(t) => t.split_once('.').map_or((t, ""), |(c, f)| (c, f)),
        None => ("00:00:00", ""),
    };
    let mut hms = clock.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    let total = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s - seconds as i64;
    let (days, secs) = (total.div_euclid(86_400), total.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let fraction = if fraction.is_empty() { String::new() } else { format!(".{fraction}") };
    Some(format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}{fraction}", secs / 3600, secs % 3600 / 60, secs % 60))
}

/// `(a, b) > (?, ?)` written out for servers without row values, with its parameters.
fn after_condition(columns: &[String], values: &[String]) -> (String, Vec<String>) {
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for i in 0..columns.len() {
        let mut part: Vec<String> = Vec::new();
        for j in 0..i {
            part.push(format!("{} = ?", columns[j]));
            params.push(values[j].clone());
        }
        part.push(format!("{} > ?", columns[i]));
        params.push(values[i].clone());
        parts.push(format!("({})", part.join(" AND ")));
    }
    (format!("({})", parts.join(" OR ")), params)
}

impl OdbcPoller {
    /// Connects with the configured connection string (and password file).
    pub async fn connect(config: &OdbcConfig) -> Result<Self, SourceError> {
        let password = crate::config_file::resolve_secret(None, config.password_file.as_deref())?;
        let mut connection_string = config.connection_string.trim_end_matches(';').to_string();
        if let Some(p) = password {
            connection_string = format!("{connection_string};PWD={}", odbc_api::escape_attribute_value(&p));
        }
        // Every attribute ends with `;`: Debian's MariaDB driver (3.1) reads the last value past the
        // string's given length when nothing ends it, so a password came with whatever bytes
        // followed it in memory, and the login failed depending on the heap.
        connection_string.push(';');
        let (conn, quote) = tokio::task::spawn_blocking(move || {
            let env = odbc_api::environment().map_err(odbc_error)?;
            let conn = env
                .connect_with_connection_string(&connection_string, ConnectionOptions::default())
                .map_err(|e| SourceError::Auth(format!("ODBC connection refused: {e}")))?;
            let quote = conn.identifier_quote_char().map_err(odbc_error)?.unwrap_or('"');
            Ok::<_, SourceError>((conn, quote))
        })
        .await
        .map_err(|e| SourceError::Io(std::io::Error::other(e)))??;
        let quote = match quote {
            '[' => ("[".to_string(), "]".to_string()),
            q => (q.to_string(), q.to_string()),
        };
        Ok(Self { conn: Some(conn), quote, namespace: config.namespace, row_limit: config.row_limit })
    }

    fn q(&self, name: &str) -> String {
        let (open, close) = &self.quote;
        format!("{open}{}{close}", name.replace(close.as_str(), &format!("{close}{close}")))
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Connection<'static>) -> Result<T, SourceError> + Send + 'static,
    ) -> Result<T, SourceError> {
        let conn = self.conn.take().ok_or_else(|| SourceError::Io(std::io::Error::other("ODBC connection lost")))?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let r = f(&conn);
            (conn, r)
        })
        .await
        .map_err(|e| SourceError::Io(std::io::Error::other(e)))?;
        self.conn = Some(conn);
        result
    }

    /// Runs `sql` with text `params` and returns at most `max` rows of text.
    async fn text_rows(
        &mut self,
        sql: String,
        params: Vec<String>,
        max: usize,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        self.with_conn(move |conn| {
            let bound: Vec<_> = params.iter().map(|p| p.as_str().into_parameter()).collect();
            let Some(mut cursor) = conn.execute(&sql, &bound[..], None).map_err(odbc_error)? else {
                return Ok(Vec::new());
            };
            let cols = cursor.num_result_cols().map_err(odbc_error)? as usize;
            // Drivers report display sizes in characters, and some too small (MariaDB's
            // datetime(6) says 19): room for four bytes a character and at least 64 bytes.
            let mut lens = Vec::with_capacity(cols);
            for c in 1..=cols as u16 {
                let chars = cursor.col_display_size(c).map_err(odbc_error)?.map_or(MAX_TEXT_BYTES, |n| n.get());
                lens.push(chars.saturating_mul(4).clamp(64, MAX_TEXT_BYTES));
            }
            let mut buffers = TextRowSet::from_max_str_lens(FETCH_ROWS, lens).map_err(odbc_error)?;
            let mut rows = cursor.bind_buffer(&mut buffers).map_err(odbc_error)?;
            let mut out = Vec::new();
            while let Some(batch) = rows.fetch_with_truncation_check(true).map_err(|e| {
                SourceError::Prerequisite(format!(
                    "a value is longer than {MAX_TEXT_BYTES} bytes, which ODBC polling does not take: {e}"
                ))
            })? {
                for r in 0..batch.num_rows() {
                    out.push((0..cols).map(|c| batch.at_as_str(c, r).ok().flatten().map(str::to_owned)).collect());
                }
                if out.len() >= max {
                    break;
                }
            }
            out.truncate(max);
            Ok(out)
        })
        .await
    }

    fn limited(&self, select: &str, rest: &str, limit: u64) -> String {
        match self.row_limit {
            RowLimit::Limit => format!("SELECT {select}{rest} LIMIT {limit}"),
            RowLimit::Top => format!("SELECT TOP {limit} {select}{rest}"),
            RowLimit::FetchFirst => format!("SELECT {select}{rest} FETCH FIRST {limit} ROWS ONLY"),
        }
    }

    fn typed(rows: Vec<Vec<Option<String>>>, columns: &[&Column]) -> Vec<Row> {
        rows.into_iter().map(|r| r.into_iter().zip(columns).map(|(t, c)| value(c, t)).collect()).collect()
    }

    fn bound_text(t: &PolledTable<OdbcTable>, b: &Bound) -> Result<String, SourceError> {
        let text = param(&b.value);
        if b.minus == 0 {
            return Ok(text);
        }
        if t.time_cursor {
            minus_seconds(&text, b.minus).ok_or_else(|| {
                SourceError::Prerequisite(format!(
                    "the cursor value {text:?} of {} is not an ISO date or time",
                    t.schema.table
                ))
            })
        } else {
            let n: i64 = text.parse().map_err(|_| {
                SourceError::Prerequisite(format!("the cursor value {text:?} of {} is not an integer", t.schema.table))
            })?;
            Ok((n - b.minus as i64).to_string())
        }
    }
}

impl Engine for OdbcPoller {
    type Table = OdbcTable;

    async fn table(&mut self, table: &TableId, cursor: &str) -> Result<PolledTable<OdbcTable>, SourceError> {
        let (ns, name, namespace) = (table.schema.clone(), table.name.clone(), self.namespace);
        let (columns, key) = self
            .with_conn(move |conn| {
                let (catalog, schema) = match namespace {
                    Namespace::Catalog => (ns.as_str(), ""),
                    Namespace::Schema => ("", ns.as_str()),
                };
                let mut columns = Vec::new();
                for row in conn.columns(catalog, schema, &name, "").map_err(odbc_error)? {
                    let row = row.map_err(odbc_error)?;
                    let text = |v: &odbc_api::parameter::VarCharArray<255>| {
                        v.as_str().ok().flatten().unwrap_or("").to_string()
                    };
                    let type_name = row.type_name.as_str().ok().flatten().unwrap_or("").to_string();
                    columns.push((
                        row.ordinal_position,
                        text(&row.column_name),
                        row.data_type,
                        row.column_size.into_opt(),
                        row.decimal_digits.into_opt(),
                        type_name,
                    ));
                }
                let (catalog, schema) = match namespace {
                    Namespace::Catalog => (Some(ns.as_str()), None),
                    Namespace::Schema => (None, Some(ns.as_str())),
                };
                let mut key = Vec::new();
                for row in conn.primary_keys(catalog, schema, &name).map_err(odbc_error)? {
                    let row = row.map_err(odbc_error)?;
                    key.push((row.key_seq, row.column.as_str().ok().flatten().unwrap_or("").to_string()));
                }
                Ok((columns, key))
            })
            .await?;
        if columns.is_empty() {
            return Err(SourceError::Prerequisite(format!(
                "polled table {table} is not on the server, or the role may not see it (source.odbc.namespace is {:?})",
                self.namespace
            )));
        }
        let mut columns = columns;
        columns.sort_by_key(|c| c.0);
        let mut schema_columns = Vec::with_capacity(columns.len());
        for (_, name, data_type, size, digits, driver_type) in &columns {
            let (type_name, type_oid) = map_type(*data_type, *size, *digits).ok_or_else(|| {
                SourceError::Prerequisite(format!(
                    "column {name} of {table} has type {driver_type} (ODBC type {data_type}), which ODBC polling does not \
                     carry; leave the table out of source.odbc.tables"
                ))
            })?;
            schema_columns.push(Column { name: name.clone(), type_name, type_oid });
        }
        let mut key = key;
        key.sort_by_key(|k| k.0);
        let key: Vec<usize> =
            key.iter().filter_map(|(_, k)| schema_columns.iter().position(|c| &c.name == k)).collect();
        if key.is_empty() {
            return Err(keyless(table));
        }
        let at = schema_columns.iter().position(|c| c.name == cursor).ok_or_else(|| bad_cursor(table, cursor, None))?;
        let time_cursor = match schema_columns[at].type_oid {
            1082 | 1114 => true,
            20 | 21 | 23 => false,
            _ => return Err(bad_cursor(table, cursor, Some(&schema_columns[at].type_name))),
        };
        let schema = Arc::new(TableSchema::new(table.clone(), schema_columns, key));
        let engine = OdbcTable {
            from: format!("{}.{}", self.q(&table.schema), self.q(&table.name)),
            columns: schema.columns.iter().map(|c| self.q(&c.name)).collect::<Vec<_>>().join(", "),
            key: schema.key_columns.iter().map(|&k| self.q(&schema.columns[k].name)).collect(),
            cursor: self.q(cursor),
        };
        Ok(PolledTable { schema, cursor: at, time_cursor, estimated_rows: 0, engine })
    }

    async fn max_cursor(&mut self, t: &PolledTable<OdbcTable>) -> Result<Option<Value>, SourceError> {
        let sql = format!("SELECT MAX({}) FROM {}", t.engine.cursor, t.engine.from);
        let rows = self.text_rows(sql, Vec::new(), 1).await?;
        let column = &t.schema.columns[t.cursor];
        Ok(Self::typed(rows, &[column]).into_iter().next().and_then(|mut r| r.pop()).filter(|v| *v != Value::Null))
    }

    async fn range(
        &mut self,
        t: &PolledTable<OdbcTable>,
        lower: Option<&Bound>,
        upper: Option<&Bound>,
        after: Option<(&Value, &[Value])>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let mut params = Vec::new();
        let bound = |b: &Bound| {
            params.push(Self::bound_text(t, b)?);
            Ok("?".to_string())
        };
        let mut conditions = cursor_conditions(&e.cursor, lower, upper, after.map(|(c, _)| c), bound)?;
        if let Some((c, k)) = after {
            let mut columns = vec![e.cursor.clone()];
            columns.extend(e.key.iter().cloned());
            let mut values = vec![param(c)];
            values.extend(k.iter().map(param));
            let (condition, more) = after_condition(&columns, &values);
            conditions.push(condition);
            params.extend(more);
        }
        let rest =
            format!(" FROM {} WHERE {} ORDER BY {}, {}", e.from, conditions.join(" AND "), e.cursor, e.key.join(", "));
        let sql = self.limited(&e.columns, &rest, limit);
        let rows = self.text_rows(sql, params, limit as usize).await?;
        Ok(Self::typed(rows, &t.schema.columns.iter().collect::<Vec<_>>()))
    }

    async fn after_key(
        &mut self,
        t: &PolledTable<OdbcTable>,
        after: Option<&[Value]>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let (filter, params) = match after {
            Some(k) => {
                let (condition, params) = after_condition(&e.key, &k.iter().map(param).collect::<Vec<_>>());
                (format!(" WHERE {condition}"), params)
            }
            None => (String::new(), Vec::new()),
        };
        let rest = format!(" FROM {}{filter} ORDER BY {}", e.from, e.key.join(", "));
        let sql = self.limited(&e.columns, &rest, limit);
        let rows = self.text_rows(sql, params, limit as usize).await?;
        Ok(Self::typed(rows, &t.schema.columns.iter().collect::<Vec<_>>()))
    }

    async fn existing(&mut self, t: &PolledTable<OdbcTable>, keys: &[Row]) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let key_columns: Vec<&Column> = t.schema.key_columns.iter().map(|&k| &t.schema.columns[k]).collect();
        let mut out = Vec::new();
        for group in keys.chunks(KEYS_PER_CHECK) {
            let one: Vec<String> = e.key.iter().map(|k| format!("{k} = ?")).collect();
            let one = format!("({})", one.join(" AND "));
            let sql =
                format!("SELECT {} FROM {} WHERE {}", e.key.join(", "), e.from, vec![one; group.len()].join(" OR "));
            let params: Vec<String> = group.iter().flat_map(|k| k.iter().map(param)).collect();
            let rows = self.text_rows(sql, params, group.len()).await?;
            out.extend(Self::typed(rows, &key_columns));
        }
        Ok(out)
    }

    async fn oldest_transaction_s(&mut self) -> Result<u64, SourceError> {
        Err(SourceError::Prerequisite("ODBC gives no portable view of the server's open transactions".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_comes_off_iso_times_and_dates_across_midnight_and_years() {
        assert_eq!(minus_seconds("2026-01-01 00:00:05.250", 10).as_deref(), Some("2025-12-31 23:59:55.250"));
        assert_eq!(minus_seconds("2024-03-01", 86_400).as_deref(), Some("2024-02-29 00:00:00"));
        assert_eq!(minus_seconds("2026-12-01T08:30:00", 3600).as_deref(), Some("2026-12-01 07:30:00"));
        assert_eq!(minus_seconds("yesterday", 1), None);
    }

    #[test]
    fn row_comparisons_are_written_out_in_order() {
        let (sql, params) = after_condition(&["a".into(), "b".into()], &["1".into(), "2".into()]);
        assert_eq!(sql, "((a > ?) OR (a = ? AND b > ?))");
        assert_eq!(params, vec!["1", "1", "2"]);
    }

    #[test]
    fn odbc_types_map_to_names_the_hub_knows_and_others_are_refused() {
        assert_eq!(map_type(3, Some(12), Some(2)), Some(("numeric(12,2)".into(), 1700)));
        assert_eq!(map_type(-9, Some(50), None), Some(("text".into(), 25)));
        assert_eq!(map_type(93, None, None), Some(("timestamp without time zone".into(), 1114)));
        assert_eq!(map_type(-151, None, None), None, "SQL Server's sql_variant");
    }
}
