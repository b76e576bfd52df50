//! Polling a MySQL or MariaDB server with a SELECT-only role: each read is one prepared statement
//! in autocommit (its own consistent read), values bound as parameters, decoded as the binlog
//! source's snapshot decodes them (session in UTC and utf8mb4).

use mysql_async::prelude::Queryable;
use mysql_async::Value as My;

use super::engine::{bad_cursor, cursor_conditions, keyless, Bound, Engine, PolledTable};
use crate::error::SourceError;
use crate::model::{Row, TableId, Value};
use crate::mysql::chunks::key_param;
use crate::mysql::schema::{self, Kind, MyTable};
use crate::mysql::snapshot::quote;
use crate::mysql::value::{from_snapshot, ZeroDates};
use crate::mysql::MySqlConfig;

/// A MySQL/MariaDB server polled through one session.
pub struct MyPoller {
    conn: mysql_async::Conn,
    zero_dates: ZeroDates,
}

/// How a polled MySQL table is read.
pub struct MyPolled {
    table: MyTable,
    from: String,
    columns: String,
    key: String,
    cursor: String,
}

impl MyPoller {
    /// Connects as `config` says; every statement then runs in autocommit.
    pub async fn connect(config: &MySqlConfig) -> Result<Self, SourceError> {
        let opts = config.opts().map_err(SourceError::Prerequisite)?;
        let mut conn = mysql_async::Conn::new(opts).await?;
        conn.query_drop("SET SESSION TRANSACTION READ ONLY").await?;
        Ok(Self { conn, zero_dates: config.zero_dates })
    }

    async fn rows(&mut self, sql: String, params: Vec<My>, kinds: &[&Kind]) -> Result<Vec<Row>, SourceError> {
        let rows: Vec<mysql_async::Row> = self.conn.exec(sql, params).await?;
        let zero_dates = self.zero_dates;
        Ok(rows
            .into_iter()
            .map(|r| r.unwrap().into_iter().zip(kinds).map(|(v, k)| from_snapshot(k, v, zero_dates)).collect())
            .collect())
    }
}

fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl Engine for MyPoller {
    type Table = MyPolled;

    async fn table(&mut self, table: &TableId, cursor: &str) -> Result<PolledTable<MyPolled>, SourceError> {
        let t = schema::read(&mut self.conn, table).await?.ok_or_else(|| {
            SourceError::Prerequisite(format!(
                "polled table {table} is not on the server, or the role may not see it: GRANT SELECT ON {table} TO \
                 the agent's role"
            ))
        })?;
        if t.schema.is_keyless() {
            return Err(keyless(table));
        }
        let at =
            t.schema.columns.iter().position(|c| c.name == cursor).ok_or_else(|| bad_cursor(table, cursor, None))?;
        let time_cursor = match &t.kinds[at] {
            Kind::Date | Kind::DateTime | Kind::Timestamp => true,
            Kind::Int { .. } | Kind::Decimal => false,
            _ => return Err(bad_cursor(table, cursor, Some(&t.schema.columns[at].type_name))),
        };
        let estimated: Option<u64> = self
            .conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&table.schema, &table.name),
            )
            .await?;
        let schema = t.schema.clone();
        let engine = MyPolled {
            from: format!("{}.{}", quote(&table.schema), quote(&table.name)),
            columns: schema.columns.iter().map(|c| quote(&c.name)).collect::<Vec<_>>().join(", "),
            key: schema.key_columns.iter().map(|&k| quote(&schema.columns[k].name)).collect::<Vec<_>>().join(", "),
            cursor: quote(cursor),
            table: t,
        };
        Ok(PolledTable { schema, cursor: at, time_cursor, estimated_rows: estimated.unwrap_or(0), engine })
    }

    async fn max_cursor(&mut self, t: &PolledTable<MyPolled>) -> Result<Option<Value>, SourceError> {
        let sql = format!("SELECT max({}) FROM {}", t.engine.cursor, t.engine.from);
        let kind = &t.engine.table.kinds[t.cursor];
        let rows = self.rows(sql, Vec::new(), &[kind]).await?;
        Ok(rows.into_iter().next().and_then(|mut r| r.pop()).filter(|v| *v != Value::Null))
    }

    async fn range(
        &mut self,
        t: &PolledTable<MyPolled>,
        lower: Option<&Bound>,
        upper: Option<&Bound>,
        after: Option<(&Value, &[Value])>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let mut params = Vec::new();
        let bound = |b: &Bound| {
            params.push(key_param(&b.value));
            Ok(match (b.minus, t.time_cursor) {
                (0, _) => "?".to_string(),
                (m, true) => format!("? - INTERVAL {m} SECOND"),
                (m, false) => format!("? - {m}"),
            })
        };
        let mut conditions = cursor_conditions(&e.cursor, lower, upper, after.map(|(c, _)| c), bound)?;
        if let Some((c, k)) = after {
            params.push(key_param(c));
            params.extend(k.iter().map(key_param));
            conditions.push(format!("({}, {}) > ({})", e.cursor, e.key, marks(1 + k.len())));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {}, {} LIMIT {limit}",
            e.columns,
            e.from,
            conditions.join(" AND "),
            e.cursor,
            e.key
        );
        let kinds: Vec<&Kind> = e.table.kinds.iter().collect();
        self.rows(sql, params, &kinds).await
    }

    async fn after_key(
        &mut self,
        t: &PolledTable<MyPolled>,
        after: Option<&[Value]>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let (filter, params) = match after {
            Some(k) => (format!(" WHERE ({}) > ({})", e.key, marks(k.len())), k.iter().map(key_param).collect()),
            None => (String::new(), Vec::new()),
        };
        let sql = format!("SELECT {} FROM {}{filter} ORDER BY {} LIMIT {limit}", e.columns, e.from, e.key);
        let kinds: Vec<&Kind> = e.table.kinds.iter().collect();
        self.rows(sql, params, &kinds).await
    }

    async fn existing(&mut self, t: &PolledTable<MyPolled>, keys: &[Row]) -> Result<Vec<Row>, SourceError> {
        let e = &t.engine;
        let width = t.schema.key_columns.len();
        let tuple = format!("({})", marks(width));
        let list = vec![tuple.as_str(); keys.len()].join(", ");
        let params: Vec<My> = keys.iter().flat_map(|k| k.iter().map(key_param)).collect();
        let sql = format!("SELECT {} FROM {} WHERE ({}) IN ({list})", e.key, e.from, e.key);
        let kinds: Vec<&Kind> = t.schema.key_columns.iter().map(|&k| &e.table.kinds[k]).collect();
        self.rows(sql, params, &kinds).await
    }

    async fn oldest_transaction_s(&mut self) -> Result<u64, SourceError> {
        // INNODB_TRX needs the PROCESS privilege; without it the server refuses.
        let age: Option<Option<i64>> = self
            .conn
            .query_first(
                "SELECT MAX(TIMESTAMPDIFF(SECOND, trx_started, NOW())) FROM information_schema.INNODB_TRX \
                 WHERE trx_mysql_thread_id <> CONNECTION_ID()",
            )
            .await?;
        Ok(age.flatten().unwrap_or(0).max(0) as u64)
    }
}
