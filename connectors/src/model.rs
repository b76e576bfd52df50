//! The change model shared by sources, the agent and the hub.

use std::fmt;
use std::sync::Arc;

/// A column value, typed enough that the hub can write it back without loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value an UPDATE left unchanged: the target keeps what it has.
    UnchangedToast,
    /// boolean.
    Bool(bool),
    /// int2, int4, int8, oid.
    Int(i64),
    /// float4, float8.
    Float(f64),
    /// numeric, exact decimal text.
    Numeric(String),
    /// text, varchar, char, name.
    Text(String),
    /// bytea.
    Bytes(Vec<u8>),
    /// date, ISO text.
    Date(String),
    /// timestamp without time zone, ISO text.
    Timestamp(String),
    /// timestamp with time zone, ISO text in UTC.
    TimestampTz(String),
    /// json or jsonb text.
    Json(String),
    /// uuid text.
    Uuid(String),
    /// An array; nested arrays for more dimensions.
    Array(Vec<Value>),
    /// Any other type, as text with its type name.
    Other {
        /// The type name as the source prints it.
        type_name: String,
        /// The value's text form.
        text: String,
    },
}

impl Value {
    /// Whether this is [`Value::UnchangedToast`]: a match, not a comparison, because rows are
    /// scanned for it once per change on the apply path.
    #[inline]
    pub fn is_unchanged_toast(&self) -> bool {
        matches!(self, Value::UnchangedToast)
    }
}

/// The column indexes of `row` whose values were sent (not [`Value::UnchangedToast`]).
pub fn present_columns(row: &[Value]) -> Vec<usize> {
    (0..row.len()).filter(|&i| !row[i].is_unchanged_toast()).collect()
}

/// Values in the column order of a [`TableSchema`].
pub type Row = Vec<Value>;

/// A table's qualified name at the source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl TableId {
    /// A table id from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self { schema: schema.into(), name: name.into() }
    }

    /// Parses `schema.table`, or `table` in schema `public`.
    pub fn parse(qualified: &str) -> Option<Self> {
        let (schema, name) = match qualified.split_once('.') {
            Some((s, n)) => (s, n),
            None => ("public", qualified),
        };
        (!schema.is_empty() && !name.is_empty() && !name.contains('.')).then(|| Self::new(schema, name))
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One column of a table schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type as the source prints it (`format_type`), used to create the target column.
    pub type_name: String,
    /// Source type oid, used to decode values.
    pub type_oid: u32,
}

/// The shape of a source table at one point of its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// Which table.
    pub table: TableId,
    /// Columns in source order.
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the primary key, in key order. Empty for a keyless table
    /// (Postgres `REPLICA IDENTITY FULL`), which is replicated as a multiset: its updates and deletes
    /// carry the whole old row and change one row equal to it.
    pub key_columns: Vec<usize>,
    /// Digest of the shape; changes on schema drift.
    pub version: u64,
    /// The dialect of the column type names.
    pub dialect: Dialect,
    /// Built by the hub's national dictionary, never decoded from a peer: its changes load a
    /// national table, not the sending agent's own copy. Not on the wire.
    pub national: bool,
}

impl TableSchema {
    /// Builds a Postgres schema and computes its version digest.
    pub fn new(table: TableId, columns: Vec<Column>, key_columns: Vec<usize>) -> Self {
        Self::in_dialect(Dialect::Postgres, table, columns, key_columns)
    }

    /// Builds a schema whose type names are in `dialect`, and computes its version digest.
    pub fn in_dialect(dialect: Dialect, table: TableId, columns: Vec<Column>, key_columns: Vec<usize>) -> Self {
        let version = shape_digest(dialect, &table, &columns, &key_columns);
        Self { table, columns, key_columns, version, dialect, national: false }
    }

    /// Whether the table has no key and is replicated as a multiset.
    pub fn is_keyless(&self) -> bool {
        self.key_columns.is_empty()
    }

    /// The key values of a full row.
    pub fn key_of(&self, row: &[Value]) -> Row {
        self.key_columns.iter().map(|&i| row.get(i).cloned().unwrap_or(Value::Null)).collect()
    }
}

/// FNV-1a over the shape: stable across processes and builds, which `DefaultHasher` is not.
/// Postgres schemas digest as they did before dialects existed, so their versions stay the same.
fn shape_digest(dialect: Dialect, table: &TableId, columns: &[Column], key: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    if dialect == Dialect::MySql {
        eat(b"mysql");
    }
    eat(table.schema.as_bytes());
    eat(table.name.as_bytes());
    for c in columns {
        eat(c.name.as_bytes());
        eat(c.type_name.as_bytes());
    }
    for k in key {
        eat(&(*k as u64).to_le_bytes());
    }
    h
}

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A new row.
    Insert,
    /// A changed row (possibly with a changed key).
    Update,
    /// A removed row.
    Delete,
    /// The table emptied; also opens a table's initial snapshot.
    Truncate,
    /// A row read by the initial snapshot.
    SnapshotRead,
}

impl Operation {
    /// Whether the change brings a whole new row, whose key is in the row itself.
    pub fn is_new_row(self) -> bool {
        matches!(self, Operation::Insert | Operation::SnapshotRead)
    }
}

/// A Postgres log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("invalid lsn {s:?}: expected X/Y"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("invalid lsn {s:?}: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("invalid lsn {s:?}: {e}"))?;
        Ok(Lsn((hi << 32) | lo))
    }
}

/// A place in a MySQL/MariaDB server's binlog: the file's sequence number (the digits after the
/// last dot of its name, `binlog.000042` → 42; the base name is the server's own) and the byte
/// offset in it. Ordered as the binlog is: by file, then offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinlogPos {
    /// Sequence number of the binlog file.
    pub file: u32,
    /// Byte offset in the file.
    pub pos: u64,
}

impl fmt::Display for BinlogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}:{}", self.file, self.pos)
    }
}

/// Where in the source's log a change was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Postgres: commit end LSN, or the slot's consistent point for snapshot rows.
    Postgres(Lsn),
    /// MySQL/MariaDB: just past the transaction's commit event, or the snapshot's binlog position
    /// for snapshot rows.
    MySql(BinlogPos),
    /// A polled source (no readable log): the poll cycle that read the row, counted by the agent
    /// from 1 and rising with every cycle of the same spool.
    Poll(u64),
}

impl Position {
    /// What kind of position this is, in words: names the source kind a spool belongs to.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Position::Postgres(_) => "Postgres LSNs",
            Position::MySql(_) => "MySQL binlog positions",
            Position::Poll(_) => "poll cycles",
        }
    }

    /// The refusal when a spool holds positions of another source kind than the configured one.
    pub fn of_another_source(&self, configured: &str) -> crate::error::SourceError {
        crate::error::SourceError::Prerequisite(format!(
            "the spool holds {} but source.kind is {configured}: a spool belongs to one source; point spool.path \
             at a new directory for this source",
            self.kind_name()
        ))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres(lsn) => write!(f, "{lsn}"),
            Position::MySql(p) => write!(f, "binlog {p}"),
            Position::Poll(cycle) => write!(f, "poll cycle {cycle}"),
        }
    }
}

/// Which SQL dialect a schema's column type names are in: the hub maps each to NDC types through
/// its own grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dialect {
    /// Postgres, as `format_type` prints.
    #[default]
    Postgres,
    /// MySQL/MariaDB, as `information_schema.COLUMNS.COLUMN_TYPE` prints (enum and set without
    /// their labels).
    MySql,
}

/// One captured row change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// Agent sequence number, strictly increasing per source; 0 until the spool assigns it.
    pub seq: u64,
    /// The table's schema at the time of the change.
    pub table: Arc<TableSchema>,
    /// What the change does.
    pub op: Operation,
    /// Primary key values (empty for truncate).
    pub key: Row,
    /// The old row, as far as the replica identity gives it.
    pub before: Option<Row>,
    /// The new row.
    pub after: Option<Row>,
    /// Where the change was read.
    pub position: Position,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// Source transaction id.
    pub txid: u64,
    /// Order inside the transaction.
    pub txn_order: u32,
    /// Last change of its transaction.
    pub txn_last: bool,
}

impl ChangeEvent {
    /// A change for tests and tools that build changes by hand: read at LSN `seq`, committed at the
    /// epoch, alone in transaction 1.
    pub fn for_test(seq: u64, table: &Arc<TableSchema>, op: Operation, key: Row, after: Option<Row>) -> Self {
        Self {
            seq,
            table: table.clone(),
            op,
            key,
            before: None,
            after,
            position: Position::Postgres(Lsn(seq)),
            commit_time_us: 0,
            txid: 1,
            txn_order: 0,
            txn_last: true,
        }
    }
}

/// Changes of one source, contiguous in seq.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeBatch {
    /// Which source (agent) produced them.
    pub source_id: String,
    /// The changes, in seq order.
    pub changes: Vec<ChangeEvent>,
}

impl ChangeBatch {
    /// Seq of the first change.
    pub fn first_seq(&self) -> u64 {
        self.changes.first().map_or(0, |c| c.seq)
    }

    /// Seq of the last change.
    pub fn last_seq(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn schema_version_changes_with_shape() {
        let col = |n: &str, t: &str| Column { name: n.into(), type_name: t.into(), type_oid: 25 };
        let a = TableSchema::new(TableId::new("public", "c"), vec![col("id", "text")], vec![0]);
        let b = TableSchema::new(TableId::new("public", "c"), vec![col("id", "text"), col("x", "text")], vec![0]);
        let a2 = TableSchema::new(TableId::new("public", "c"), vec![col("id", "text")], vec![0]);
        assert_ne!(a.version, b.version);
        assert_eq!(a.version, a2.version);
    }

    #[test]
    fn table_id_parses_qualified_and_bare_names() {
        assert_eq!(TableId::parse("pop.citizens"), Some(TableId::new("pop", "citizens")));
        assert_eq!(TableId::parse("citizens"), Some(TableId::new("public", "citizens")));
        assert_eq!(TableId::parse("a.b.c"), None);
        assert_eq!(TableId::parse(".x"), None);
    }
}
