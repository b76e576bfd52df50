//! The shape of a captured MySQL/MariaDB table, read from `information_schema`: the neutral
//! [`TableSchema`] the hub sees (type names in the MySQL dialect) and, per column, what the agent
//! needs to decode its values (kind, signedness, character set, enum and set labels).
//!
//! A column whose character set the agent cannot decode, or of a type it does not know, is refused
//! when the table is read, with the column named: never guessed at.

use std::sync::Arc;

use mysql_async::prelude::Queryable;

use crate::error::SourceError;
use crate::model::{Column, Dialect, TableId, TableSchema};

/// How a column's values are decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An integer of `bits` bits.
    Int {
        /// 8, 16, 24, 32 or 64.
        bits: u8,
        /// Declared `unsigned`.
        unsigned: bool,
    },
    /// `decimal`.
    Decimal,
    /// `float`.
    Float,
    /// `double`.
    Double,
    /// `char`: MySQL strips the padding on read, so the binlog's value is stripped too.
    Char(Charset),
    /// `varchar` and the `text` types.
    Text(Charset),
    /// `binary`, `varbinary`, the `blob` types.
    Binary,
    /// `bit(n)`, as big-endian bytes.
    Bit,
    /// `date`.
    Date,
    /// `datetime`: civil time, no zone.
    DateTime,
    /// `timestamp`: an instant, read in UTC.
    Timestamp,
    /// `time`: a signed duration up to 838 hours.
    Time,
    /// `year`.
    Year,
    /// `enum`, with its labels in order (the binlog holds the 1-based index).
    Enum(Vec<String>),
    /// `set`, with its labels in order (the binlog holds a bitmask).
    Set(Vec<String>),
    /// MySQL 8's binary `json`.
    Json,
}

/// The character sets the agent decodes. MySQL's `latin1` is Windows-1252 with the five holes
/// mapped to C1 controls, as the server itself converts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// utf8mb4, utf8mb3 (`utf8`).
    Utf8,
    /// latin1 (and ascii, its subset).
    Latin1,
    /// `binary`: bytes.
    Binary,
}

/// A captured table: the schema the hub sees and how to decode each column.
#[derive(Debug, Clone)]
pub struct MyTable {
    /// The neutral schema (MySQL dialect).
    pub schema: Arc<TableSchema>,
    /// Per column, in order.
    pub kinds: Vec<Kind>,
}

/// `'a','b''c'` inside `enum(...)`/`set(...)` → the labels.
fn labels(column_type: &str) -> Vec<String> {
    let inner = column_type.split_once('(').map_or("", |(_, rest)| rest.strip_suffix(')').unwrap_or(rest));
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    label.push('\'');
                    continue;
                }
                break;
            }
            if c == '\\' {
                if let Some(n) = chars.next() {
                    label.push(n);
                }
                continue;
            }
            label.push(c);
        }
        out.push(label);
    }
    out
}

fn charset(table: &TableId, column: &str, name: Option<&str>) -> Result<Charset, SourceError> {
    match name.unwrap_or("binary") {
        "utf8mb4" | "utf8mb3" | "utf8" => Ok(Charset::Utf8),
        "latin1" | "ascii" => Ok(Charset::Latin1),
        "binary" => Ok(Charset::Binary),
        other => Err(SourceError::Prerequisite(format!(
            "column {column} of {table} is in character set {other}, which the agent does not decode yet \
             (it decodes utf8mb4, utf8mb3, latin1, ascii); convert the column (ALTER TABLE {table} MODIFY \
             {column} ... CHARACTER SET utf8mb4) or leave the table out of source.tables"
        ))),
    }
}

fn kind(
    table: &TableId,
    column: &str,
    data_type: &str,
    column_type: &str,
    cs: Option<&str>,
) -> Result<Kind, SourceError> {
    let unsigned = column_type.contains("unsigned");
    let int = |bits| Ok(Kind::Int { bits, unsigned });
    match data_type {
        "tinyint" => int(8),
        "smallint" => int(16),
        "mediumint" => int(24),
        "int" | "integer" => int(32),
        "bigint" => int(64),
        "decimal" => Ok(Kind::Decimal),
        "float" => Ok(Kind::Float),
        "double" => Ok(Kind::Double),
        "char" => Ok(Kind::Char(charset(table, column, cs)?)),
        "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => Ok(Kind::Text(charset(table, column, cs)?)),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => Ok(Kind::Binary),
        "bit" => Ok(Kind::Bit),
        "date" => Ok(Kind::Date),
        "datetime" => Ok(Kind::DateTime),
        "timestamp" => Ok(Kind::Timestamp),
        "time" => Ok(Kind::Time),
        "year" => Ok(Kind::Year),
        "enum" => Ok(Kind::Enum(labels(column_type))),
        "set" => Ok(Kind::Set(labels(column_type))),
        "json" => Ok(Kind::Json),
        other => Err(SourceError::Prerequisite(format!(
            "column {column} of {table} has type {other}, which the agent does not capture yet; leave the table \
             out of source.tables or ask for the type"
        ))),
    }
}

/// The type name the hub sees: `COLUMN_TYPE`, but enums and sets without their labels (labels are
/// data, and the hub's grammar takes no quoted text).
fn type_name(data_type: &str, column_type: &str) -> String {
    match data_type {
        "enum" | "set" => data_type.to_string(),
        _ => column_type.to_string(),
    }
}

/// Reads the current shape of `table`; `Ok(None)` if it does not exist.
pub async fn read(conn: &mut mysql_async::Conn, table: &TableId) -> Result<Option<MyTable>, SourceError> {
    type Row = (String, String, String, Option<String>, String);
    let rows: Vec<Row> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, COLUMN_KEY FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (&table.schema, &table.name),
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let key_names: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (&table.schema, &table.name),
        )
        .await?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    for (name, data_type, column_type, cs, _) in &rows {
        let data_type = data_type.to_ascii_lowercase();
        kinds.push(kind(table, name, &data_type, column_type, cs.as_deref())?);
        columns.push(Column { name: name.clone(), type_name: type_name(&data_type, column_type), type_oid: 0 });
    }
    let key = key_names.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
    Ok(Some(MyTable { schema: Arc::new(TableSchema::in_dialect(Dialect::MySql, table.clone(), columns, key)), kinds }))
}

/// Reads every table, refusing a missing one with the fix.
pub async fn read_all(conn: &mut mysql_async::Conn, tables: &[TableId]) -> Result<Vec<MyTable>, SourceError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        match read(conn, t).await? {
            Some(table) => out.push(table),
            None => {
                return Err(SourceError::Prerequisite(format!(
                    "table {t} is in source.tables but not on the server (or the role may not see it: GRANT SELECT \
                     ON {t} TO the agent's role)"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_and_set_labels_keep_quotes_and_commas() {
        assert_eq!(labels("enum('thường trú','tạm trú')"), vec!["thường trú", "tạm trú"]);
        assert_eq!(labels("set('a,b','it''s','')"), vec!["a,b", "it's", ""]);
        assert!(labels("enum()").is_empty());
    }

    #[test]
    fn unknown_charsets_and_types_are_refused_with_the_column_named() {
        let t = TableId::new("province", "people");
        let e = kind(&t, "ten", "varchar", "varchar(10)", Some("cp1250")).unwrap_err().to_string();
        assert!(e.contains("column ten of province.people is in character set cp1250"), "{e}");
        let e = kind(&t, "shape", "geometry", "geometry", None).unwrap_err().to_string();
        assert!(e.contains("column shape of province.people has type geometry"), "{e}");
        assert_eq!(kind(&t, "n", "int", "int(10) unsigned", None).unwrap(), Kind::Int { bits: 32, unsigned: true });
    }
}
