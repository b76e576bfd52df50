//! Catalog look-ups: table shapes, primary keys, type names.
//!
//! Both the snapshot (from `pg_attribute`) and the stream (from pgoutput Relation messages) build
//! schemas through here, with the same type names, so a table's schema version is the same on both
//! paths and the hub sees no false drift at the switch from snapshot to stream.

use tokio_postgres::Client;

use crate::error::SourceError;
use crate::model::{Column, TableId, TableSchema};
use crate::postgres::pgoutput::RelationColumn;

/// A table found in the catalog.
pub struct CatalogTable {
    /// Table oid.
    pub oid: u32,
    /// Its schema (generated columns excluded: pgoutput does not send them).
    pub schema: TableSchema,
    /// The planner's row estimate, for snapshot progress.
    pub estimated_rows: i64,
    /// pg_class.relreplident: 'd' default, 'f' full, 'i' index, 'n' nothing.
    pub replica_identity: char,
}

/// A table's columns and primary key as the catalog has them, before any replication rule.
pub struct TableShape {
    /// Table oid.
    pub oid: u32,
    /// Its columns (generated ones excluded: pgoutput does not send them).
    pub columns: Vec<Column>,
    /// The primary key's column names, in key order; empty without one.
    pub key: Vec<String>,
    /// The planner's row estimate.
    pub estimated_rows: i64,
    /// pg_class.relreplident.
    pub replica_identity: char,
}

/// Reads a table's shape; `Ok(None)` when it does not exist (or the role may not see it).
pub async fn table_shape(client: &Client, table: &TableId) -> Result<Option<TableShape>, SourceError> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.reltuples::int8, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let rows = client
        .query(
            "SELECT attname::text, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let columns: Vec<Column> =
        rows.iter().map(|r| Column { name: r.get(0), type_oid: r.get(1), type_name: r.get(2) }).collect();
    let key = primary_key(client, oid).await?;
    let identity: String = row.get(2);
    Ok(Some(TableShape {
        oid,
        columns,
        key,
        estimated_rows: row.get::<_, i64>(1).max(0),
        replica_identity: identity.chars().next().unwrap_or('d'),
    }))
}

/// Looks a table up by name; `Ok(None)` when it does not exist.
pub async fn find_table(client: &Client, table: &TableId) -> Result<Option<CatalogTable>, SourceError> {
    let Some(shape) = table_shape(client, table).await? else { return Ok(None) };
    let key = key_indexes(table, &shape.columns, &shape.key, shape.replica_identity)?;
    let schema = TableSchema::new(table.clone(), shape.columns, key);
    Ok(Some(CatalogTable {
        oid: shape.oid,
        schema,
        estimated_rows: shape.estimated_rows,
        replica_identity: shape.replica_identity,
    }))
}

/// Builds the schema of a table announced by a pgoutput Relation message.
pub async fn relation_schema(
    client: &Client,
    relid: u32,
    table: TableId,
    replica_identity: char,
    rel_columns: &[RelationColumn],
) -> Result<TableSchema, SourceError> {
    let oids: Vec<u32> = rel_columns.iter().map(|c| c.type_oid).collect();
    let mods: Vec<i32> = rel_columns.iter().map(|c| c.type_mod).collect();
    let rows = client
        .query(
            "SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(t, m, o) ORDER BY o",
            &[&oids, &mods],
        )
        .await?;
    let columns: Vec<Column> = rel_columns
        .iter()
        .zip(rows.iter())
        .map(|(c, r)| Column { name: c.name.clone(), type_oid: c.type_oid, type_name: r.get(0) })
        .collect();
    let key = primary_key(client, relid).await?;
    Ok(TableSchema::new(table.clone(), columns.clone(), key_indexes(&table, &columns, &key, replica_identity)?))
}

async fn primary_key(client: &Client, oid: u32) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The key's column indexes. A table without a primary key is keyless (an empty key, replicated as
/// a multiset) when its REPLICA IDENTITY is FULL, so that each update and delete carries the whole
/// old row; otherwise its changes would not say which row they change, and it is refused.
fn key_indexes(
    table: &TableId,
    columns: &[Column],
    key: &[String],
    replica_identity: char,
) -> Result<Vec<usize>, SourceError> {
    if key.is_empty() {
        if replica_identity == 'f' {
            return Ok(Vec::new());
        }
        return Err(SourceError::Prerequisite(format!(
            "table {table} has no primary key and its REPLICA IDENTITY is not FULL, so its updates and deletes \
             would not say which row they change; as the table's owner run ALTER TABLE {table} REPLICA IDENTITY FULL \
             (dongbo then keeps it as a multiset: duplicate rows stay duplicates), or add a primary key"
        )));
    }
    key.iter()
        .map(|k| {
            columns
                .iter()
                .position(|c| &c.name == k)
                .ok_or_else(|| SourceError::Prerequisite(format!("primary key column {k} of {table} is not published")))
        })
        .collect()
}

/// The rows a snapshot of `tables` will read, from the planner's statistics; a table without any
/// (never analysed) is counted, in the caller's snapshot. For progress only.
pub async fn snapshot_rows(client: &Client, tables: &[TableId]) -> Result<u64, SourceError> {
    let mut total = 0u64;
    for t in tables {
        let Some(row) = client
            .query_opt(
                "SELECT c.reltuples::float8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await?
        else {
            continue;
        };
        let estimate: f64 = row.get(0);
        total += if estimate > 0.0 {
            estimate as u64
        } else {
            let sql = format!(
                "SELECT count(*) FROM {}.{}",
                crate::postgres::snapshot::quote_ident(&t.schema),
                crate::postgres::snapshot::quote_ident(&t.name)
            );
            client.query_one(&sql, &[]).await?.get::<_, i64>(0).max(0) as u64
        };
    }
    Ok(total)
}
