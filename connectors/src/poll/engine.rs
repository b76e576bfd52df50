//! What the polling source needs of a server: four kinds of read, each one statement, with
//! identifiers quoted and values sent as parameters or quoted literals of the column's own type.

use std::sync::Arc;

use crate::error::SourceError;
use crate::model::{Row, TableId, TableSchema, Value};

/// A polled table as an engine opened it.
pub struct PolledTable<T> {
    /// Its shape (the hub sees the same as from a log source of this engine).
    pub schema: Arc<TableSchema>,
    /// The cursor column's index.
    pub cursor: usize,
    /// The cursor is a date or time (the safety window is in seconds), not a number.
    pub time_cursor: bool,
    /// The server's estimate of its rows (for `check`'s figures).
    pub estimated_rows: u64,
    /// What the engine needs to read it.
    pub engine: T,
}

/// A cursor bound: a value read from the table, less `minus` (seconds for a date or time
/// cursor, values for a number).
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// The value.
    pub value: Value,
    /// What to take off it.
    pub minus: u64,
}

/// A server the polling source reads.
#[allow(async_fn_in_trait)] // used generically, never as a trait object
pub trait Engine: Send {
    /// Engine-specific table data (how its values decode).
    type Table: Send + Sync;

    /// Opens `table`, refusing one without a primary key or whose `cursor` column is missing or
    /// neither a number nor a date or time.
    async fn table(&mut self, table: &TableId, cursor: &str) -> Result<PolledTable<Self::Table>, SourceError>;

    /// The cursor's highest value now (`None` when the table has no row with one).
    async fn max_cursor(&mut self, t: &PolledTable<Self::Table>) -> Result<Option<Value>, SourceError>;

    /// Up to `limit` rows whose cursor is at or above `lower` (every row with a cursor when it is
    /// `None`) and below `upper`, if given, after `after` in (cursor, key) order.
    async fn range(
        &mut self,
        t: &PolledTable<Self::Table>,
        lower: Option<&Bound>,
        upper: Option<&Bound>,
        after: Option<(&Value, &[Value])>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError>;

    /// Up to `limit` rows after key `after`, in key order.
    async fn after_key(
        &mut self,
        t: &PolledTable<Self::Table>,
        after: Option<&[Value]>,
        limit: u64,
    ) -> Result<Vec<Row>, SourceError>;

    /// Which of `keys` the table holds now (the keys, as the engine reads them).
    async fn existing(&mut self, t: &PolledTable<Self::Table>, keys: &[Row]) -> Result<Vec<Row>, SourceError>;

    /// How long the oldest transaction open on the server (other than this session's) has been
    /// open, in seconds, as far as the role may see; an error when it may not see any.
    async fn oldest_transaction_s(&mut self) -> Result<u64, SourceError>;
}

/// The cursor conditions of [`Engine::range`] every engine writes the same way: the lower bound
/// (or `IS NOT NULL`), the upper bound, and, on a later page, the plain bound at the page's cursor
/// value, which lets an index on the cursor start at the page instead of the sweep's start (the
/// engine adds the (cursor, key) comparison that skips the ties already read). `bound` writes a
/// bound as the engine's SQL, a literal or a parameter it records, in the order called.
pub(crate) fn cursor_conditions(
    cursor: &str,
    lower: Option<&Bound>,
    upper: Option<&Bound>,
    page_from: Option<&Value>,
    mut bound: impl FnMut(&Bound) -> Result<String, SourceError>,
) -> Result<Vec<String>, SourceError> {
    let mut conditions = vec![match lower {
        Some(b) if b.value != Value::Null => format!("{cursor} >= {}", bound(b)?),
        _ => format!("{cursor} IS NOT NULL"),
    }];
    if let Some(b) = upper.filter(|b| b.value != Value::Null) {
        conditions.push(format!("{cursor} < {}", bound(b)?));
    }
    if let Some(v) = page_from {
        conditions.push(format!("{cursor} >= {}", bound(&Bound { value: v.clone(), minus: 0 })?));
    }
    Ok(conditions)
}

/// The refusal of a table without a primary key: polling compares rows by key.
pub(crate) fn keyless(table: &TableId) -> SourceError {
    SourceError::Prerequisite(format!(
        "polled table {table} has no primary key: polling finds a row's changes by its key; add a primary key, \
         or capture it from the server's log (kind = \"postgres\" or \"mysql\"), which keeps keyless tables"
    ))
}

/// The refusal of a cursor column that is missing or of a type that does not rise.
pub(crate) fn bad_cursor(table: &TableId, cursor: &str, found: Option<&str>) -> SourceError {
    SourceError::Prerequisite(match found {
        None => format!("polled table {table} has no column {cursor} (source.cursors)"),
        Some(ty) => format!(
            "the cursor {cursor} of polled table {table} has type {ty}: a cursor must be a date, a time stamp or a \
             number that rises whenever a row is written"
        ),
    })
}
