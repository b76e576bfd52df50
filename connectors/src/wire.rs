//! Conversion between the domain model and the `dongbo.v1` wire contract.
//!
//! Encoding cannot fail. Decoding validates everything a malformed or hostile peer could get wrong
//! (missing fields, out-of-range schema references, rows of the wrong width, seqs out of order) and
//! says exactly what, so the hub refuses the batch before touching the NDC.

use std::collections::HashMap;
use std::sync::Arc;

use dongbo_proto::v1 as pb;
use prost::Message;

use crate::model::{
    BinlogPos, ChangeBatch, ChangeEvent, Column, Dialect, Lsn, Operation, Position, Row, TableId, TableSchema, Value,
};

/// Why a batch from the wire was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes are not a protobuf `ChangeBatch`.
    #[error("batch is not a valid protobuf ChangeBatch: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// A field is missing or out of range.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// A compressed batch says it opens to more than the receiver's limit.
    #[error("compressed batch opens to {size} bytes, over the limit of {max}")]
    TooLarge {
        /// The size the frame states.
        size: u64,
        /// The receiver's limit.
        max: usize,
    },
}

fn malformed(msg: impl Into<String>) -> WireError {
    WireError::Malformed(msg.into())
}

/// Encodes a batch into the bytes the agent spools and ships: the protobuf `ChangeBatch`,
/// byte for byte what prost writes for [`batch_into_proto`], but written straight from the domain
/// model (building the protobuf structs first, then sizing every nested message once per level
/// of nesting, was a sixth of the agent's CPU in a snapshot).
pub fn encode_batch(batch: impl std::borrow::Borrow<ChangeBatch>) -> Vec<u8> {
    direct::encode_batch(batch.borrow())
}

mod decode;

/// Decodes and validates batch bytes, plain or compressed (a compressed batch may open to at
/// most [`MAX_OPENED_BYTES`]; a receiver with a tighter limit calls [`open_batch`] first).
/// Reads the protobuf straight into the domain model; see [`decode_batch_with_prost`].
pub fn decode_batch(bytes: &[u8]) -> Result<ChangeBatch, WireError> {
    let opened = open_batch(bytes, MAX_OPENED_BYTES)?;
    decode::decode_batch(&opened)
}

/// The reference decoder [`decode_batch`] is held to (tests and the `wire_decoders` fuzz
/// target): prost's generated structs, then `TryFrom`. Accepts and yields exactly the same.
pub fn decode_batch_with_prost(bytes: &[u8]) -> Result<ChangeBatch, WireError> {
    let opened = open_batch(bytes, MAX_OPENED_BYTES)?;
    ChangeBatch::try_from(pb::ChangeBatch::decode(&*opened)?)
}

/// The magic number that opens a zstd frame. No protobuf `ChangeBatch` can start with its first
/// byte (0x28 would be field 5, `changes`, as a varint), so the two forms never read as each other.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The most a compressed batch may open to when the caller names no tighter limit.
pub const MAX_OPENED_BYTES: usize = 256 << 20;

/// zstd's fastest regular level: spooling must keep up with capture.
const COMPRESSION_LEVEL: i32 = 1;

/// Compresses encoded batch bytes into one zstd frame that states its opened size (so a receiver
/// can refuse it, or charge its buffer for it, before opening it).
pub fn compress_batch(bytes: &[u8]) -> Vec<u8> {
    compress_batch_at(bytes, COMPRESSION_LEVEL)
}

/// [`compress_batch`] at zstd level `level` (negative levels are its fast mode); the frame opens
/// the same way whatever the level.
pub fn compress_batch_at(bytes: &[u8], level: i32) -> Vec<u8> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let compressor = match c.as_mut() {
            Some((at, z)) if *at == level => z,
            _ => &mut c.insert((level, zstd::bulk::Compressor::new(level).expect("zstd compressor"))).1,
        };
        // The frame states its content size by default; compression into a Vec cannot fail
        // short of memory.
        compressor.compress(bytes).expect("zstd compression of an in-memory batch")
    })
}

/// Whether batch bytes are a compressed frame.
pub fn is_compressed(bytes: &[u8]) -> bool {
    bytes.starts_with(&ZSTD_MAGIC)
}

/// The size of batch bytes once opened: what a compressed frame says it holds, or their own length.
/// A frame that does not say is refused when opened, so its length stands in.
pub fn opened_size(bytes: &[u8]) -> usize {
    if !is_compressed(bytes) {
        return bytes.len();
    }
    match zstd::zstd_safe::get_frame_content_size(bytes) {
        Ok(Some(n)) => usize::try_from(n).unwrap_or(usize::MAX),
        _ => bytes.len(),
    }
}

/// Batch bytes ready to decode: plain ones as they are, a compressed frame opened if it says it
/// holds at most `max` bytes. A frame that does not say, says more, or holds more than it says
/// is refused before or while opening, never opened past `max`.
pub fn open_batch(bytes: &[u8], max: usize) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
    if !is_compressed(bytes) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let size = match zstd::zstd_safe::get_frame_content_size(bytes) {
        Ok(Some(n)) => n,
        _ => return Err(malformed("compressed batch does not state its size")),
    };
    if size > max as u64 {
        return Err(WireError::TooLarge { size, max });
    }
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let decompressor = match d.as_mut() {
            Some(z) => z,
            None => d.insert(zstd::bulk::Decompressor::new().map_err(|e| malformed(format!("zstd: {e}")))?),
        };
        // The capacity is the stated size: a frame holding more fails here instead of growing.
        let opened = decompressor
            .decompress(bytes, size as usize)
            .map_err(|e| malformed(format!("compressed batch does not open to its stated size: {e}")))?;
        Ok(std::borrow::Cow::Owned(opened))
    })
}

/// The `ChangeBatch.changes` field number.
const CHANGES_FIELD: u32 = 5;

/// Counts the changes in encoded (opened, see [`open_batch`]) batch bytes without decoding them, so a receiver can refuse a
/// batch of too many changes before allocating them: ten million tiny deletes fit in 268 MB on the
/// wire but take gigabytes once decoded.
pub fn count_changes(mut bytes: &[u8]) -> Result<usize, WireError> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut n = 0;
    while !bytes.is_empty() {
        let (tag, wire_type) = decode_key(&mut bytes)?;
        let skip = match wire_type {
            WireType::Varint => {
                decode_varint(&mut bytes)?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                if tag == CHANGES_FIELD {
                    n += 1;
                }
                usize::try_from(decode_varint(&mut bytes)?).map_err(|_| malformed("field length overflows"))?
            }
            WireType::StartGroup | WireType::EndGroup => return Err(malformed("groups are not part of the contract")),
        };
        if skip > bytes.len() {
            return Err(malformed("a field runs past the end of the batch"));
        }
        bytes = &bytes[skip..];
    }
    Ok(n)
}

/// The `ChangeBatch` encoder that writes the domain model as protobuf without building the
/// generated structs. Field numbers and proto3 presence rules follow `dongbo.proto`: scalars
/// outside a oneof are left out at their default, a oneof member and a present message are
/// always written, fields in number order.
mod direct {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    use prost::Message;

    use super::*;

    fn key_len(tag: u32) -> usize {
        prost::encoding::key_len(tag)
    }

    fn len_delimited_len(tag: u32, body: usize) -> usize {
        key_len(tag) + encoded_len_varint(body as u64) + body
    }

    fn put_len_delimited(tag: u32, body: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(body as u64, buf);
    }

    fn put_bytes(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
        put_len_delimited(tag, bytes.len(), buf);
        buf.extend_from_slice(bytes);
    }

    fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }

    /// Protobuf `Value` body length.
    fn value_len(v: &Value) -> usize {
        match v {
            Value::Null | Value::UnchangedToast | Value::Bool(_) => 2,
            Value::Int(i) => 1 + encoded_len_varint(*i as u64),
            Value::Float(_) => 9,
            Value::Numeric(s)
            | Value::Text(s)
            | Value::Date(s)
            | Value::Timestamp(s)
            | Value::TimestampTz(s)
            | Value::Json(s)
            // Their oneof tags (6 to 13) all take a one-byte key.
            | Value::Uuid(s) => len_delimited_len(7, s.len()),
            Value::Bytes(b) => len_delimited_len(8, b.len()),
            Value::Array(items) => len_delimited_len(14, values_len(items)),
            Value::Other { type_name, text } => len_delimited_len(15, other_len(type_name, text)),
        }
    }

    fn other_len(type_name: &str, text: &str) -> usize {
        let field = |tag, s: &str| if s.is_empty() { 0 } else { len_delimited_len(tag, s.len()) };
        field(1, type_name) + field(2, text)
    }

    /// Body length of a message of `repeated Value = 1` (`Row`, `ArrayValue`).
    fn values_len(values: &[Value]) -> usize {
        values.iter().map(|v| len_delimited_len(1, value_len(v))).sum()
    }

    fn put_value(v: &Value, buf: &mut Vec<u8>) {
        match v {
            Value::Null => put_varint(1, 1, buf),
            Value::UnchangedToast => put_varint(2, 1, buf),
            Value::Bool(b) => put_varint(3, u64::from(*b), buf),
            Value::Int(i) => put_varint(4, *i as u64, buf),
            Value::Float(f) => {
                encode_key(5, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&f.to_le_bytes());
            }
            Value::Numeric(s) => put_bytes(6, s.as_bytes(), buf),
            Value::Text(s) => put_bytes(7, s.as_bytes(), buf),
            Value::Bytes(b) => put_bytes(8, b, buf),
            Value::Date(s) => put_bytes(9, s.as_bytes(), buf),
            Value::Timestamp(s) => put_bytes(10, s.as_bytes(), buf),
            Value::TimestampTz(s) => put_bytes(11, s.as_bytes(), buf),
            Value::Json(s) => put_bytes(12, s.as_bytes(), buf),
            Value::Uuid(s) => put_bytes(13, s.as_bytes(), buf),
            Value::Array(items) => {
                put_len_delimited(14, values_len(items), buf);
                put_values(items, buf);
            }
            Value::Other { type_name, text } => {
                put_len_delimited(15, other_len(type_name, text), buf);
                if !type_name.is_empty() {
                    put_bytes(1, type_name.as_bytes(), buf);
                }
                if !text.is_empty() {
                    put_bytes(2, text.as_bytes(), buf);
                }
            }
        }
    }

    fn put_values(values: &[Value], buf: &mut Vec<u8>) {
        for v in values {
            put_len_delimited(1, value_len(v), buf);
            put_value(v, buf);
        }
    }

    fn position_len(p: &Position) -> usize {
        match p {
            Position::Postgres(lsn) => key_len(1) + encoded_len_varint(lsn.0),
            Position::MySql(b) => len_delimited_len(2, binlog_len(b)),
            Position::Poll(cycle) => key_len(3) + encoded_len_varint(*cycle),
        }
    }

    fn binlog_len(b: &BinlogPos) -> usize {
        let field = |tag, v: u64| if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) };
        field(1, u64::from(b.file)) + field(2, b.pos)
    }

    /// The rows a change carries on the wire (key, before, after), with their body lengths.
    struct Rows<'a> {
        rows: [(u32, Option<&'a [Value]>, usize); 3],
    }

    impl<'a> Rows<'a> {
        fn of(c: &'a ChangeEvent) -> Self {
            let key = (!c.key.is_empty() && !c.op.is_new_row()).then_some(c.key.as_slice());
            let row = |tag, r: Option<&'a [Value]>| (tag, r, r.map_or(0, values_len));
            Rows { rows: [row(4, key), row(5, c.before.as_deref()), row(6, c.after.as_deref())] }
        }

        fn len(&self) -> usize {
            self.rows.iter().filter(|(_, r, _)| r.is_some()).map(|&(tag, _, n)| len_delimited_len(tag, n)).sum()
        }
    }

    fn event_len(c: &ChangeEvent, schema_index: u32, rows: &Rows<'_>) -> usize {
        let varint = |tag, v: u64| if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) };
        varint(1, c.seq)
            + varint(2, u64::from(schema_index))
            + varint(3, op_to_proto(c.op) as u64)
            + rows.len()
            + len_delimited_len(7, position_len(&c.position))
            + varint(8, c.commit_time_us as u64)
            + varint(9, c.txid)
            + varint(10, u64::from(c.txn_order))
            + varint(11, u64::from(c.txn_last))
    }

    fn put_event(c: &ChangeEvent, schema_index: u32, rows: &Rows<'_>, buf: &mut Vec<u8>) {
        let varint = |tag, v: u64, buf: &mut Vec<u8>| {
            if v != 0 {
                put_varint(tag, v, buf);
            }
        };
        varint(1, c.seq, buf);
        varint(2, u64::from(schema_index), buf);
        varint(3, op_to_proto(c.op) as u64, buf);
        for &(tag, row, n) in &rows.rows {
            if let Some(row) = row {
                put_len_delimited(tag, n, buf);
                put_values(row, buf);
            }
        }
        put_len_delimited(7, position_len(&c.position), buf);
        match &c.position {
            Position::Postgres(lsn) => put_varint(1, lsn.0, buf),
            Position::MySql(b) => {
                put_len_delimited(2, binlog_len(b), buf);
                varint(1, u64::from(b.file), buf);
                varint(2, b.pos, buf);
            }
            Position::Poll(cycle) => put_varint(3, *cycle, buf),
        }
        varint(8, c.commit_time_us as u64, buf);
        varint(9, c.txid, buf);
        varint(10, u64::from(c.txn_order), buf);
        varint(11, u64::from(c.txn_last), buf);
    }

    pub(super) fn encode_values(values: &[Value]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(values_len(values));
        put_values(values, &mut buf);
        buf
    }

    pub(super) fn encode_batch(batch: &ChangeBatch) -> Vec<u8> {
        let (first_seq, last_seq) = (batch.first_seq(), batch.last_seq());
        // Schemas (field 4) precede changes (field 5): index them in a first pass.
        let mut index: HashMap<(&TableId, u64), u32> = HashMap::new();
        let mut schemas = Vec::new();
        let mut last: Option<(&Arc<TableSchema>, u32)> = None;
        let indices: Vec<u32> = batch
            .changes
            .iter()
            .map(|c| match last {
                Some((t, i)) if Arc::ptr_eq(t, &c.table) => i,
                _ => {
                    let i = *index.entry((&c.table.table, c.table.version)).or_insert_with(|| {
                        schemas.push(schema_to_proto(&c.table));
                        (schemas.len() - 1) as u32
                    });
                    last = Some((&c.table, i));
                    i
                }
            })
            .collect();
        let mut buf = Vec::with_capacity(64 + batch.changes.len() * 160);
        if !batch.source_id.is_empty() {
            put_bytes(1, batch.source_id.as_bytes(), &mut buf);
        }
        if first_seq != 0 {
            put_varint(2, first_seq, &mut buf);
        }
        if last_seq != 0 {
            put_varint(3, last_seq, &mut buf);
        }
        for s in &schemas {
            put_len_delimited(4, s.encoded_len(), &mut buf);
            s.encode_raw(&mut buf);
        }
        for (c, &i) in batch.changes.iter().zip(&indices) {
            let rows = Rows::of(c);
            put_len_delimited(5, event_len(c, i, &rows), &mut buf);
            put_event(c, i, &rows, &mut buf);
        }
        buf
    }
}

/// Converts a domain batch to its protobuf form, listing each referenced schema once.
pub fn batch_into_proto(batch: ChangeBatch) -> pb::ChangeBatch {
    let (first_seq, last_seq) = (batch.first_seq(), batch.last_seq());
    let mut index: HashMap<(TableId, u64), u32> = HashMap::new();
    let mut schemas = Vec::new();
    let changes = batch
        .changes
        .into_iter()
        .map(|c| {
            let key = (c.table.table.clone(), c.table.version);
            let schema_index = *index.entry(key).or_insert_with(|| {
                schemas.push(schema_to_proto(&c.table));
                (schemas.len() - 1) as u32
            });
            pb::ChangeEvent {
                seq: c.seq,
                schema_index,
                op: op_to_proto(c.op) as i32,
                // A new row's key is in the row: the receiver takes it from there (a tenth of a
                // snapshot's bytes not sent twice).
                key: row_into_proto(Some(c.key).filter(|k| !k.is_empty() && !c.op.is_new_row())),
                before: row_into_proto(c.before),
                after: row_into_proto(c.after),
                position: Some(match c.position {
                    Position::Postgres(lsn) => {
                        pb::SourcePosition { kind: Some(pb::source_position::Kind::PgLsn(lsn.0)) }
                    }
                    Position::MySql(p) => pb::SourcePosition {
                        kind: Some(pb::source_position::Kind::Binlog(pb::BinlogPosition { file: p.file, pos: p.pos })),
                    },
                    Position::Poll(cycle) => {
                        pb::SourcePosition { kind: Some(pb::source_position::Kind::PollCycle(cycle)) }
                    }
                }),
                commit_time_us: c.commit_time_us,
                txid: c.txid,
                txn_order: c.txn_order,
                txn_last: c.txn_last,
            }
        })
        .collect();
    pb::ChangeBatch { source_id: batch.source_id, first_seq, last_seq, schemas, changes }
}

fn schema_to_proto(s: &TableSchema) -> pb::TableSchema {
    pb::TableSchema {
        table: Some(pb::TableId { schema: s.table.schema.clone(), name: s.table.name.clone() }),
        columns: s
            .columns
            .iter()
            .map(|c| pb::Column { name: c.name.clone(), type_name: c.type_name.clone(), type_oid: c.type_oid })
            .collect(),
        key_columns: s.key_columns.iter().map(|&k| k as u32).collect(),
        version: s.version,
        dialect: match s.dialect {
            Dialect::Postgres => pb::Dialect::Postgres,
            Dialect::MySql => pb::Dialect::Mysql,
        } as i32,
    }
}

fn op_to_proto(op: Operation) -> pb::Operation {
    match op {
        Operation::Insert => pb::Operation::Insert,
        Operation::Update => pb::Operation::Update,
        Operation::Delete => pb::Operation::Delete,
        Operation::Truncate => pb::Operation::Truncate,
        Operation::SnapshotRead => pb::Operation::SnapshotRead,
    }
}

fn row_into_proto(row: Option<Row>) -> Option<pb::Row> {
    row.map(|r| pb::Row { values: r.into_iter().map(value_into_proto).collect() })
}

/// Encodes a row on its own (a snapshot's progress key, kept in the spool).
pub fn encode_row(row: Row) -> Vec<u8> {
    encode_values(&row)
}

/// Encodes values as the protobuf `Row` [`encode_row`] writes, without taking them (the polling
/// source's shadow keys and row hashes, one per row read).
pub fn encode_values(values: &[Value]) -> Vec<u8> {
    direct::encode_values(values)
}

/// Decodes a row written by [`encode_row`].
pub fn decode_row(bytes: &[u8]) -> Result<Row, WireError> {
    let row: pb::Row = prost::Message::decode(bytes).map_err(|e| malformed(format!("row: {e}")))?;
    row.values.into_iter().map(Value::try_from).collect()
}

/// Converts one value to its protobuf form.
pub fn value_into_proto(v: Value) -> pb::Value {
    use pb::value::Kind as K;
    let kind = match v {
        Value::Null => K::Null(true),
        Value::UnchangedToast => K::UnchangedToast(true),
        Value::Bool(b) => K::Boolean(b),
        Value::Int(i) => K::Int(i),
        Value::Float(f) => K::Float(f),
        Value::Numeric(s) => K::Numeric(s),
        Value::Text(s) => K::Text(s),
        Value::Bytes(b) => K::Bytea(b),
        Value::Date(s) => K::Date(s),
        Value::Timestamp(s) => K::Timestamp(s),
        Value::TimestampTz(s) => K::Timestamptz(s),
        Value::Json(s) => K::Json(s),
        Value::Uuid(s) => K::Uuid(s),
        Value::Array(items) => K::Array(pb::ArrayValue { elements: items.into_iter().map(value_into_proto).collect() }),
        Value::Other { type_name, text } => K::Other(pb::OtherValue { type_name, text }),
    };
    pb::Value { kind: Some(kind) }
}

impl TryFrom<pb::Value> for Value {
    type Error = WireError;
    fn try_from(v: pb::Value) -> Result<Self, WireError> {
        use pb::value::Kind as K;
        Ok(match v.kind.ok_or_else(|| malformed("a value has no kind"))? {
            K::Null(_) => Value::Null,
            K::UnchangedToast(_) => Value::UnchangedToast,
            K::Boolean(b) => Value::Bool(b),
            K::Int(i) => Value::Int(i),
            K::Float(f) => Value::Float(f),
            K::Numeric(s) => Value::Numeric(s),
            K::Text(s) => Value::Text(s),
            K::Bytea(b) => Value::Bytes(b),
            K::Date(s) => Value::Date(s),
            K::Timestamp(s) => Value::Timestamp(s),
            K::Timestamptz(s) => Value::TimestampTz(s),
            K::Json(s) => Value::Json(s),
            K::Uuid(s) => Value::Uuid(s),
            K::Array(a) => Value::Array(a.elements.into_iter().map(Value::try_from).collect::<Result<_, _>>()?),
            K::Other(o) => Value::Other { type_name: o.type_name, text: o.text },
        })
    }
}

impl TryFrom<pb::TableSchema> for TableSchema {
    type Error = WireError;
    fn try_from(s: pb::TableSchema) -> Result<Self, WireError> {
        let t = s.table.ok_or_else(|| malformed("a schema has no table"))?;
        if t.schema.is_empty() || t.name.is_empty() {
            return Err(malformed("a schema has an empty table name"));
        }
        if s.columns.is_empty() {
            return Err(malformed(format!("schema of {}.{} has no columns", t.schema, t.name)));
        }
        if let Some(k) = s.key_columns.iter().find(|&&k| k as usize >= s.columns.len()) {
            return Err(malformed(format!("schema of {}.{} names key column {k} past its columns", t.schema, t.name)));
        }
        if let Some(c) = s.columns.iter().find(|c| c.name.is_empty() || c.type_name.is_empty()) {
            return Err(malformed(format!(
                "schema of {}.{} has a column without name or type ({c:?})",
                t.schema, t.name
            )));
        }
        let columns = s
            .columns
            .into_iter()
            .map(|c| Column { name: c.name, type_name: c.type_name, type_oid: c.type_oid })
            .collect();
        let dialect = match pb::Dialect::try_from(s.dialect) {
            Ok(pb::Dialect::Postgres) => Dialect::Postgres,
            Ok(pb::Dialect::Mysql) => Dialect::MySql,
            Err(_) => {
                return Err(malformed(format!("schema of {}.{} has unknown dialect {}", t.schema, t.name, s.dialect)))
            }
        };
        let schema = TableSchema::in_dialect(
            dialect,
            TableId::new(t.schema, t.name),
            columns,
            s.key_columns.into_iter().map(|k| k as usize).collect(),
        );
        if schema.version != s.version {
            return Err(malformed(format!(
                "schema of {} carries version {} but its shape digests to {}",
                schema.table, s.version, schema.version
            )));
        }
        Ok(schema)
    }
}

fn row_from_proto(row: Option<pb::Row>) -> Result<Option<Row>, WireError> {
    row.map(|r| r.values.into_iter().map(Value::try_from).collect::<Result<_, _>>()).transpose()
}

/// One change as read off the wire, before it is checked against its schema.
pub(crate) struct WireChange {
    seq: u64,
    schema_index: u32,
    op: i32,
    key: Option<Row>,
    before: Option<Row>,
    after: Option<Row>,
    position: Option<Position>,
    commit_time_us: i64,
    txid: u64,
    txn_order: u32,
    txn_last: bool,
}

/// Checks a batch read off the wire (by prost or by [`decode`]) and builds its domain form: every
/// rule a hostile peer could break is checked here, once for both decoders.
pub(crate) fn batch_from_wire(
    source_id: String,
    first_seq: u64,
    last_seq: u64,
    schemas: Vec<pb::TableSchema>,
    wire_changes: impl ExactSizeIterator<Item = Result<WireChange, WireError>>,
) -> Result<ChangeBatch, WireError> {
    if source_id.is_empty() {
        return Err(malformed("batch has no source_id"));
    }
    let schemas: Vec<Arc<TableSchema>> =
        schemas.into_iter().map(|s| TableSchema::try_from(s).map(Arc::new)).collect::<Result<_, _>>()?;
    let mut prev_seq = None;
    let mut changes = Vec::with_capacity(wire_changes.len());
    for c in wire_changes {
        let c = c?;
        let seq = c.seq;
        if prev_seq.is_some_and(|p| seq <= p) || seq == 0 {
            return Err(malformed(format!("change seq {seq} is zero or not above the previous one")));
        }
        prev_seq = Some(seq);
        let table = schemas.get(c.schema_index as usize).cloned().ok_or_else(|| {
            malformed(format!("change {seq} references schema {} of {}", c.schema_index, schemas.len()))
        })?;
        let op = match pb::Operation::try_from(c.op) {
            Ok(pb::Operation::Insert) => Operation::Insert,
            Ok(pb::Operation::Update) => Operation::Update,
            Ok(pb::Operation::Delete) => Operation::Delete,
            Ok(pb::Operation::Truncate) => Operation::Truncate,
            Ok(pb::Operation::SnapshotRead) => Operation::SnapshotRead,
            _ => return Err(malformed(format!("change {seq} has unknown operation {}", c.op))),
        };
        let width = table.columns.len();
        let sized = |row: Option<Row>, width: usize, what: &str| match row {
            Some(r) if r.len() != width => {
                Err(malformed(format!("change {seq}: {what} row has {} values, expected {width}", r.len())))
            }
            row => Ok(row),
        };
        let sent_key = sized(c.key, table.key_columns.len(), "key")?;
        let before = sized(c.before, width, "before")?;
        let after = sized(c.after, width, "after")?;
        let needs_after = matches!(op, Operation::Insert | Operation::Update | Operation::SnapshotRead);
        if needs_after && after.is_none() {
            return Err(malformed(format!("change {seq} ({op:?}) has no after row")));
        }
        // A new row's key is its row's: one sent beside it (older agents do) must agree.
        let key = match (&after, sent_key) {
            (Some(row), sent) if op.is_new_row() => {
                let derived = table.key_of(row);
                if sent.is_some_and(|k| k != derived) {
                    return Err(malformed(format!("change {seq} ({op:?}) sends a key that is not its row's")));
                }
                derived
            }
            (_, sent) => sent.unwrap_or_default(),
        };
        if op != Operation::Truncate && key.len() != table.key_columns.len() {
            return Err(malformed(format!("change {seq} ({op:?}) has no key")));
        }
        // A keyless table's update or delete says which row it changes only by its old row.
        let whole_before = before.as_ref().is_some_and(|b| !b.contains(&Value::UnchangedToast));
        if table.is_keyless() && matches!(op, Operation::Update | Operation::Delete) && !whole_before {
            return Err(malformed(format!(
                "change {seq} ({op:?}) of keyless table {} has no whole before row",
                table.table
            )));
        }
        // A new row's key must be known: an "unchanged" key would read as a key change to
        // nowhere, and the row would be deleted.
        let unknown_key = |row: &Option<Row>| {
            row.as_ref().is_some_and(|r| table.key_columns.iter().any(|&k| r[k] == Value::UnchangedToast))
        };
        if unknown_key(&after) || key.contains(&Value::UnchangedToast) {
            return Err(malformed(format!(
                "change {seq} ({op:?}) of {} leaves a key column unchanged-unknown",
                table.table
            )));
        }
        let position = c.position.ok_or_else(|| malformed(format!("change {seq} has no source position")))?;
        changes.push(ChangeEvent {
            seq,
            table,
            op,
            key,
            before,
            after,
            position,
            commit_time_us: c.commit_time_us,
            txid: c.txid,
            txn_order: c.txn_order,
            txn_last: c.txn_last,
        });
    }
    let batch = ChangeBatch { source_id, changes };
    if batch.first_seq() != first_seq || batch.last_seq() != last_seq {
        return Err(malformed(format!(
            "batch says seqs {first_seq}..={last_seq} but carries {}..={}",
            batch.first_seq(),
            batch.last_seq()
        )));
    }
    Ok(batch)
}

impl TryFrom<pb::ChangeBatch> for ChangeBatch {
    type Error = WireError;
    fn try_from(b: pb::ChangeBatch) -> Result<Self, WireError> {
        let changes = b.changes.into_iter().map(|c| {
            Ok(WireChange {
                seq: c.seq,
                schema_index: c.schema_index,
                op: c.op,
                key: row_from_proto(c.key)?,
                before: row_from_proto(c.before)?,
                after: row_from_proto(c.after)?,
                position: c.position.and_then(|p| p.kind).map(|k| match k {
                    pb::source_position::Kind::PgLsn(l) => Position::Postgres(Lsn(l)),
                    pb::source_position::Kind::Binlog(b) => Position::MySql(BinlogPos { file: b.file, pos: b.pos }),
                    pb::source_position::Kind::PollCycle(cycle) => Position::Poll(cycle),
                }),
                commit_time_us: c.commit_time_us,
                txid: c.txid,
                txn_order: c.txn_order,
                txn_last: c.txn_last,
            })
        });
        batch_from_wire(b.source_id, b.first_seq, b.last_seq, b.schemas, changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Arc<TableSchema> {
        let col = |n: &str, t: &str, o| Column { name: n.into(), type_name: t.into(), type_oid: o };
        Arc::new(TableSchema::new(
            TableId::new("public", "citizens"),
            vec![col("id", "character(12)", 1042), col("tags", "text[]", 1009), col("photo", "bytea", 17)],
            vec![0],
        ))
    }

    fn change(seq: u64) -> ChangeEvent {
        let row = vec![
            Value::Text("079123456789".into()),
            Value::Array(vec![Value::Text("Hồ Chí Minh".into()), Value::Null]),
            Value::UnchangedToast,
        ];
        ChangeEvent {
            seq,
            table: schema(),
            op: Operation::Update,
            key: vec![Value::Text("079123456789".into())],
            before: None,
            after: Some(row),
            position: Position::Postgres(Lsn(42)),
            commit_time_us: 1_700_000_000_000_000,
            txid: 7,
            txn_order: 0,
            txn_last: true,
        }
    }

    #[test]
    fn changes_are_counted_without_decoding() {
        let schema = Arc::new(TableSchema::new(
            TableId::new("public", "t"),
            vec![Column { name: "id".into(), type_name: "int8".into(), type_oid: 20 }],
            vec![0],
        ));
        let changes: Vec<ChangeEvent> = (1..=37)
            .map(|seq| ChangeEvent::for_test(seq, &schema, Operation::Delete, vec![Value::Int(seq as i64)], None))
            .collect();
        let bytes = encode_batch(ChangeBatch { source_id: "s".into(), changes });
        assert_eq!(count_changes(&bytes).unwrap(), 37);
        assert!(count_changes(&bytes[..bytes.len() - 1]).is_err(), "a truncated batch");
        assert!(count_changes(&[0x0b]).is_err(), "a group");
    }

    #[test]
    fn batch_round_trips_with_one_schema_entry() {
        let batch = ChangeBatch { source_id: "hcm".into(), changes: vec![change(5), change(6)] };
        let proto = batch_into_proto(batch.clone());
        assert_eq!(proto.schemas.len(), 1);
        let back = decode_batch(&encode_batch(batch.clone())).unwrap();
        assert_eq!(back, batch);
    }

    #[test]
    fn the_direct_encoder_writes_what_prost_writes() {
        let mysql = Arc::new(TableSchema::new(
            TableId::new("province", "residence_log"),
            vec![
                Column { name: "citizen_id".into(), type_name: "char(12)".into(), type_oid: 0 },
                Column { name: "note".into(), type_name: "text".into(), type_oid: 0 },
            ],
            vec![],
        ));
        let every_kind = vec![
            Value::Null,
            Value::UnchangedToast,
            Value::Bool(false),
            Value::Bool(true),
            Value::Int(0),
            Value::Int(-1),
            Value::Int(i64::MAX),
            Value::Float(0.0),
            Value::Float(-1.5e300),
            Value::Numeric("12.50".into()),
            Value::Text(String::new()),
            Value::Text("Nguyễn Thị Minh Khai ".repeat(20)),
            Value::Bytes(vec![0, 255]),
            Value::Date("2025-07-01".into()),
            Value::Timestamp("2025-07-01 08:00:00".into()),
            Value::TimestampTz("2025-07-01 01:00:00+00".into()),
            Value::Json("{\"a\":1}".into()),
            Value::Uuid("7c1e0c3a-3f5e-4a43-9d8e-2b1c4d5e6f70".into()),
            Value::Array(vec![Value::Array(vec![Value::Int(1), Value::Null]), Value::Array(vec![])]),
            Value::Other { type_name: "interval".into(), text: "1 day".into() },
            Value::Other { type_name: String::new(), text: String::new() },
        ];
        let wide = Arc::new(TableSchema::new(
            TableId::new("public", "wide"),
            (0..every_kind.len())
                .map(|i| Column { name: format!("c{i}"), type_name: "text".into(), type_oid: 25 })
                .collect(),
            vec![0],
        ));
        let mut changes = Vec::new();
        for (i, op) in
            [Operation::Insert, Operation::Update, Operation::Delete, Operation::SnapshotRead, Operation::Truncate]
                .into_iter()
                .enumerate()
        {
            let mut c = change(10 + i as u64);
            c.op = op;
            c.txn_last = i % 2 == 0;
            c.txid = i as u64;
            c.txn_order = (i * 300) as u32;
            c.commit_time_us = if i == 0 { 0 } else { -5 };
            if op == Operation::Truncate {
                (c.key, c.before, c.after) = (vec![], None, None);
            }
            changes.push(c);
        }
        let mut w = ChangeEvent::for_test(20, &wide, Operation::Update, vec![Value::Null], Some(every_kind.clone()));
        w.before = Some(every_kind.clone());
        changes.push(w);
        for (seq, pos) in [(21, BinlogPos { file: 0, pos: 0 }), (22, BinlogPos { file: 3, pos: 1 << 40 })] {
            let row = vec![Value::Text("079123456789".into()), Value::Null];
            let mut c = ChangeEvent::for_test(seq, &mysql, Operation::Delete, vec![], None);
            c.before = Some(row);
            c.position = Position::MySql(pos);
            changes.push(c);
        }
        changes.push(change(23));
        for (seq, cycle) in [(24, 0), (25, 1), (26, u64::MAX)] {
            let mut c = change(seq);
            c.position = Position::Poll(cycle);
            changes.push(c);
        }
        for source_id in ["hcm", ""] {
            let batch = ChangeBatch { source_id: source_id.into(), changes: changes.clone() };
            assert_eq!(encode_batch(batch.clone()), batch_into_proto(batch.clone()).encode_to_vec());
        }
        // And both decoders read it back as it was.
        let batch = ChangeBatch { source_id: "hcm".into(), changes: changes.clone() };
        let bytes = encode_batch(batch.clone());
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
        assert_eq!(decode_batch_with_prost(&bytes).unwrap(), batch);
        let empty = ChangeBatch { source_id: "hcm".into(), changes: vec![] };
        assert_eq!(encode_batch(empty.clone()), batch_into_proto(empty).encode_to_vec());
        // A row on its own, as the spool keeps snapshot progress and the poller its shadow.
        let row = pb::Row { values: every_kind.iter().cloned().map(value_into_proto).collect() };
        assert_eq!(encode_row(every_kind.clone()), row.encode_to_vec());
        assert_eq!(decode_row(&encode_values(&every_kind)).unwrap(), every_kind);
    }

    /// Both decoders' verdicts on the same bytes, compared by re-encoding (a NaN float equals
    /// itself only as bytes).
    fn verdicts(bytes: &[u8]) -> (Result<Vec<u8>, String>, Result<Vec<u8>, String>) {
        let verdict = |r: Result<ChangeBatch, WireError>| r.map(encode_batch).map_err(|e| e.to_string());
        (verdict(decode_batch(bytes)), verdict(decode_batch_with_prost(bytes)))
    }

    #[test]
    fn the_direct_decoder_agrees_with_prost_on_valid_merged_and_mutated_bytes() {
        let batch = ChangeBatch { source_id: "hcm".into(), changes: (5..9).map(change).collect() };
        let plain = encode_batch(batch.clone());
        assert_eq!(decode_batch(&plain).unwrap(), batch);

        // What protobuf allows and no agent of ours writes: an unknown field and an unknown group
        // (skipped), a scalar sent twice (the last wins), a row sent twice (merged).
        let mut p = batch_into_proto(batch.clone());
        p.changes[0].after.as_mut().unwrap().values.truncate(1);
        let mut odd = p.encode_to_vec();
        odd.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100, varint
        odd.extend_from_slice(&[0xa3, 0x06, 0x08, 0x01, 0xa4, 0x06]); // group 100 holding a varint
        odd.extend_from_slice(&[0x08 | 2, 3, b'd', b'n', b'g']); // source_id again
        let short = verdicts(&odd);
        assert!(short.0.is_err() && short.1.is_err(), "the first change's after row is one value short");
        // The same change's field 6 (after) again, as a second change message would not do:
        // rebuild the first change with its after row split in two.
        let mut first = p.changes[0].encode_to_vec();
        let rest =
            pb::Row { values: batch_into_proto(batch.clone()).changes[0].after.clone().unwrap().values[1..].to_vec() };
        prost::encoding::message::encode(6, &rest, &mut first);
        let mut rebuilt = pb::ChangeBatch { changes: vec![], ..p.clone() }.encode_to_vec();
        prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, &mut rebuilt);
        prost::encoding::encode_varint(first.len() as u64, &mut rebuilt);
        rebuilt.extend_from_slice(&first);
        for c in &p.changes[1..] {
            prost::encoding::message::encode(5, c, &mut rebuilt);
        }
        let (direct, reference) = verdicts(&rebuilt);
        assert_eq!(direct, reference);
        assert_eq!(decode_batch(&rebuilt).unwrap(), batch, "the split row is merged back");

        // Arrays nested to prost's depth limit and one past it.
        let nested = |depth: usize| {
            let mut v = Value::Int(1);
            for _ in 0..depth {
                v = Value::Array(vec![v]);
            }
            let mut c = change(5);
            c.after.as_mut().unwrap()[1] = v;
            encode_batch(ChangeBatch { source_id: "hcm".into(), changes: vec![c] })
        };
        let (ok, too_deep) = (verdicts(&nested(48)), verdicts(&nested(49)));
        assert_eq!(ok.0, ok.1);
        assert!(ok.0.is_ok());
        assert!(too_deep.0.is_err() && too_deep.1.is_err(), "{too_deep:?}");

        // Random mutations: flipped, dropped and inserted bytes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut agreed_ok, mut agreed_err) = (0, 0);
        for _ in 0..20_000 {
            let mut m = plain.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[at] ^= 1 << (next() % 8),
                    1 => {
                        m.remove(at);
                    }
                    _ => m.insert(at, next() as u8),
                }
            }
            let (direct, reference) = verdicts(&m);
            assert_eq!(direct.is_ok(), reference.is_ok(), "{m:?}: {direct:?} vs {reference:?}");
            if let (Ok(d), Ok(r)) = (&direct, &reference) {
                assert_eq!(d, r, "{m:?}");
                agreed_ok += 1;
            } else {
                agreed_err += 1;
            }
        }
        assert!(agreed_ok > 100 && agreed_err > 100, "{agreed_ok} accepted, {agreed_err} refused");
    }

    #[test]
    fn a_compressed_batch_opens_within_its_limit_and_a_lying_or_oversized_frame_is_refused() {
        let batch = ChangeBatch { source_id: "hcm".into(), changes: (5..200).map(change).collect() };
        let plain = encode_batch(batch.clone());
        let packed = compress_batch(&plain);
        assert!(is_compressed(&packed) && !is_compressed(&plain));
        assert!(packed.len() * 3 < plain.len(), "{} of {} bytes", packed.len(), plain.len());
        assert_eq!(opened_size(&packed), plain.len());
        assert_eq!(decode_batch(&packed).unwrap(), batch);
        assert_eq!(decode_batch(&plain).unwrap(), batch);
        assert_eq!(count_changes(&open_batch(&packed, plain.len()).unwrap()).unwrap(), 195);

        let over = open_batch(&packed, plain.len() - 1).unwrap_err().to_string();
        assert!(over.contains("over the limit"), "{over}");
        // A frame that does not state its size (zstd's streaming encoder) is not opened at all.
        let unsized_frame = {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            std::io::Write::write_all(&mut e, &plain).unwrap();
            e.finish().unwrap()
        };
        assert!(open_batch(&unsized_frame, usize::MAX).unwrap_err().to_string().contains("does not state its size"));
        // A frame that says it holds less than it does fails while opening, at the stated size.
        let mut lying = packed.clone();
        let small = compress_batch(&plain[..100]);
        lying[..small.len().min(6)].copy_from_slice(&small[..small.len().min(6)]);
        let lied = open_batch(&lying, usize::MAX).unwrap_err().to_string();
        assert!(lied.contains("does not open to its stated size"), "{lied}");
    }

    #[test]
    fn a_new_rows_key_is_taken_from_the_row_and_a_disagreeing_one_refused() {
        let mut insert = change(5);
        insert.op = Operation::Insert;
        insert.after.as_mut().unwrap()[2] = Value::Null;
        let batch = ChangeBatch { source_id: "hcm".into(), changes: vec![insert.clone()] };
        let mut p = batch_into_proto(batch.clone());
        assert!(p.changes[0].key.is_none(), "the key is not sent twice");
        assert_eq!(ChangeBatch::try_from(p.clone()).unwrap(), batch);

        // An older agent sends it beside the row: the same key is accepted, another refused.
        p.changes[0].key = row_into_proto(Some(insert.key.clone()));
        assert_eq!(ChangeBatch::try_from(p.clone()).unwrap(), batch);
        p.changes[0].key = row_into_proto(Some(vec![Value::Text("079000000000".into())]));
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("not its row's"));
    }

    #[test]
    fn decoding_refuses_malformed_batches_with_reasons() {
        let batch = ChangeBatch { source_id: "hcm".into(), changes: vec![change(5), change(6)] };
        let mut p = batch_into_proto(batch.clone());
        p.changes[1].seq = 5;
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("not above"));

        let mut p = batch_into_proto(batch.clone());
        p.changes[0].schema_index = 3;
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("references schema 3"));

        let mut p = batch_into_proto(batch.clone());
        p.changes[0].after.as_mut().unwrap().values.pop();
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("after row has 2 values"));

        let mut p = batch_into_proto(batch.clone());
        p.schemas[0].key_columns.clear();
        p.schemas[0].version = TableSchema::new(schema().table.clone(), schema().columns.clone(), vec![]).version;
        p.changes[0].key = None;
        p.changes[0].op = pb::Operation::Delete as i32;
        p.changes[0].before = None;
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("has no whole before row"));

        let mut p = batch_into_proto(batch.clone());
        p.changes[0].after.as_mut().unwrap().values[0].kind = None;
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("no kind"));

        let mut p = batch_into_proto(batch.clone());
        p.changes[0].after.as_mut().unwrap().values[0] = value_into_proto(Value::UnchangedToast);
        assert!(ChangeBatch::try_from(p).unwrap_err().to_string().contains("leaves a key column unchanged-unknown"));

        assert!(matches!(decode_batch(b"\xff\xff\xff"), Err(WireError::Undecodable(_))));
    }
}
