//! Polling a PostgreSQL server with a SELECT-only role: each read is one simple-protocol
//! statement in its own snapshot (autocommit), on a session that cannot write
//! (`default_transaction_read_only`). Values come back as text and are parsed as a log source's
//! are; values sent back (a watermark, the last key read) are quoted literals cast to the column's
//! type as `format_type` prints it, with `standard_conforming_strings` on.

use std::sync::Arc;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::engine::{bad_cursor, cursor_conditions, keyless, Bound, Engine, PolledTable};
use crate::error::SourceError;
use crate::model::{Column, Row, TableId, TableSchema, Value};
use crate::postgres::catalog::table_shape;
use crate::postgres::config::PostgresConfig;
use crate::postgres::snapshot::quote_ident;
use crate::postgres::text::{parse_value, write_value};

/// The type oids a cursor may have: dates and times, and numbers.
const TIME_TYPES: [u32; 3] = [1082, 1114, 1184];
const NUMBER_TYPES: [u32; 4] = [20, 21, 23, 1700];

/// A PostgreSQL server polled through one session.
pub struct PgPoller {
    client: Client,
}

/// How a polled Postgres table is read.
pub struct PgTable {
    from: String,
    columns: String,
    key: String,
    cursor: String,
}

impl PgPoller {
    /// Connects as `config` says and makes the session read-only.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, SourceError> {
        let client = config.connect_query().await?;
        client.batch_execute("SET default_transaction_read_only = on; SET standard_conforming_strings = on").await?;
        Ok(Self { client })
    }

    async fn rows(&self, sql: &str, columns: &[&Column]) -> Result<Vec<Row>, SourceError> {
        let mut out = Vec::new();
        for m in self.client.simple_query(sql).await? {
            if let SimpleQueryMessage::Row(r) = m {
                let row = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match r.get(i) {
                        Some(text) => parse_value(c.type_oid, &c.type_name, text.to_owned()),
                        None => Value::Null,
                    })
                    .collect();
                out.push(row);
            }
        }
        Ok(out)
    }
}

/// A value as a literal of `type_name`.
fn literal(v: &Value, type_name: &str) -> String {
    let mut text = String::new();
    match write_value(v, &mut text) {
        Some(()) => format!("'{}'::{type_name}", text.replace('\'', "''")),
        None => "NULL".to_string(),
    }
}

fn key_literals(schema: &TableSchema, key: &[Value]) -> String {
    let l: Vec<String> =
        key.iter().zip(&schema.key_columns).map(|(v, &k)| literal(v, &schema.columns[k].type_name)).collect();
    l.join(", ")
}

fn all_columns(schema: &TableSchema) -> Vec<&Column> {
    schema.columns.iter().collect()
}

impl Engine for PgPoller {
    type Table = PgTable;

    async fn table(&mut self, table: &TableId, cursor: &str) -> Result<PolledTable<PgTable>, SourceError> {
        let shape = table_shape(&self.client, table).await?.ok_or_else(|| {
            SourceError::Prerequisite(format!(
                "polled table {table} is not on the server, or the role may not see it: GRANT SELECT ON {table} TO \
                 the agent's role"
            ))
        })?;
        if shape.key.is_empty() {
            return Err(keyless(table));
        }
        let key: Vec<usize> =
            shape.key.iter().filter_map(|k| shape.columns.iter().position(|c| &c.name == k)).collect();
        let cursor_at =
            shape.columns.iter().position(|c| c.name == cursor).ok_or_else(|| bad_cursor(table, cursor, None))?;
        let c = &shape.columns[cursor_at];
        let time_cursor = TIME_TYPES.contains(&c.type_oid);
        if !time_cursor && !NUMBER_TYPES.contains(&c.type_oid) {
            return Err(bad_cursor(table, cursor, Some(&c.type_name)));
        }
        let estimated_rows = shape.estimated_rows;
        let schema = Arc::new(TableSchema::new(table.clone(), shape.columns, key));
        let quoted = |i: &usize| quote_ident(&schema.columns[*i].name);
        let engine = PgTable {
            from: format!("ONLY {}.{}", quote_ident(&table.schema), quote_ident(&table.name)),
            columns: schema.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", "),
            key: schema.key_columns.iter().map(quoted).collect::<Vec<_>>().join(", "),
            cursor: quote_ident(cursor),
        };
        Ok(PolledTable { schema, cursor: cursor_at, time_cursor, estimated_rows: estimated_rows as u64, engine })
    }

    async fn max_cursor(&mut self, t: &PolledTable<PgTable>) -> Result<Option<Value>, SourceError> {
        let sql = format!("SELECT max({}) FROM {}", t.engine.cursor, t.engine.from);
        let column = &t.schema.columns[t.cursor];
        let rows = self.rows(&sql, &[column]).await?;
        Ok(rows.into_iter().next().and_then(|mut r| r.pop()).filter(|v| *v != Value::Null))
    }

    async fn range(
        &mut self,
        t: &PolledTable<PgTable>,
        lower: Option<&Bound>,
        upper: Option<&Bound>,
        after: Option<(&Value, &[Value])>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let (e, cursor_type) = (&t.engine, &t.schema.columns[t.cursor].type_name);
        let bound = |b: &Bound| {
            Ok(match (b.minus, t.time_cursor) {
                (0, _) => literal(&b.value, cursor_type),
                (m, true) => format!("{} - interval '{m} seconds'", literal(&b.value, cursor_type)),
                (m, false) => format!("{} - {m}", literal(&b.value, cursor_type)),
            })
        };
        let mut conditions = cursor_conditions(&e.cursor, lower, upper, after.map(|(c, _)| c), bound)?;
        if let Some((c, k)) = after {
            let c = literal(c, cursor_type);
            conditions.push(format!("({}, {}) > ({c}, {})", e.cursor, e.key, key_literals(&t.schema, k)));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {}, {} LIMIT {limit}",
            e.columns,
            e.from,
            conditions.join(" AND "),
            e.cursor,
            e.key
        );
        self.rows(&sql, &all_columns(&t.schema)).await
    }

    async fn after_key(
        &mut self,
        t: &PolledTable<PgTable>,
        after: Option<&[Value]>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let filter = match after {
            Some(k) => format!(" WHERE ({}) > ({})", e.key, key_literals(&t.schema, k)),
            None => String::new(),
        };
        let sql = format!("SELECT {} FROM {}{filter} ORDER BY {} LIMIT {limit}", e.columns, e.from, e.key);
        self.rows(&sql, &all_columns(&t.schema)).await
    }

    async fn existing(&mut self, t: &PolledTable<PgTable>, keys: &[Row]) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let list: Vec<String> = keys.iter().map(|k| format!("({})", key_literals(&t.schema, k))).collect();
        let sql = format!("SELECT {} FROM {} WHERE ({}) IN ({})", e.key, e.from, e.key, list.join(", "));
        let columns: Vec<&Column> = t.schema.key_columns.iter().map(|&k| &t.schema.columns[k]).collect();
        self.rows(&sql, &columns).await
    }

    async fn oldest_transaction_s(&mut self) -> Result<u64, SourceError> {
        // Sessions of other roles show no xact_start unless the role has pg_read_all_stats.
        let row = self
            .client
            .query_one(
                "SELECT COALESCE(EXTRACT(EPOCH FROM max(now() - xact_start))::int8, 0) FROM pg_stat_activity \
                 WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }
}
