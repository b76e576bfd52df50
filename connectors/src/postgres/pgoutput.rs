//! Decoding of `pgoutput` logical decoding messages, protocol version 1.
//! See <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.
//!
//! Version 1 is enough: without `streaming` the server spills large transactions to its own disk and
//! sends them whole at commit, so every change we see is committed.

use bytes::{Buf, Bytes};

use crate::error::SourceError;
use crate::model::Lsn;
use crate::postgres::protocol::PG_EPOCH_OFFSET_US;

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// Part of the replica identity.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
}

/// A column value inside a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// Unchanged TOASTed value: not sent.
    UnchangedToast,
    /// Text representation.
    Text(Bytes),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutput {
    /// A transaction starts; `final_lsn` is the LSN of its commit record.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time, Unix microseconds.
        commit_time_us: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction ends.
    Commit {
        /// End of the commit record: the position to confirm once durable.
        end_lsn: Lsn,
    },
    /// The shape of a table, sent before its first change and after each change of shape.
    Relation {
        /// Table oid.
        relid: u32,
        /// Schema.
        namespace: String,
        /// Table name.
        name: String,
        /// Its REPLICA IDENTITY setting: `d` default, `f` full, `i` index, `n` nothing.
        replica_identity: u8,
        /// Columns in order.
        columns: Vec<RelationColumn>,
    },
    /// A row was inserted.
    Insert {
        /// Table oid.
        relid: u32,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// A row was updated; `old` is present if the key changed or identity is FULL.
    Update {
        /// Table oid.
        relid: u32,
        /// Old row or key.
        old: Option<Vec<TupleValue>>,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// A row was deleted.
    Delete {
        /// Table oid.
        relid: u32,
        /// Old row or key.
        old: Vec<TupleValue>,
    },
    /// Tables were truncated.
    Truncate {
        /// Table oids.
        relids: Vec<u32>,
    },
    /// Origin, Type and logical Message messages: nothing to capture.
    Ignored,
}

fn short(what: &str) -> SourceError {
    SourceError::Protocol(format!("truncated pgoutput {what} message"))
}

fn need(buf: &Bytes, n: usize, what: &str) -> Result<(), SourceError> {
    if buf.remaining() < n {
        Err(short(what))
    } else {
        Ok(())
    }
}

fn cstring(buf: &mut Bytes, what: &str) -> Result<String, SourceError> {
    let end = buf.iter().position(|&b| b == 0).ok_or_else(|| short(what))?;
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Ok(s)
}

fn tuple(buf: &mut Bytes, what: &str) -> Result<Vec<TupleValue>, SourceError> {
    need(buf, 2, what)?;
    let n = buf.get_i16().max(0) as usize;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        need(buf, 1, what)?;
        values.push(match buf.get_u8() {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                need(buf, 4, what)?;
                let len = buf.get_i32().max(0) as usize;
                need(buf, len, what)?;
                TupleValue::Text(buf.split_to(len))
            }
            other => {
                return Err(SourceError::Protocol(format!(
                    "tuple value kind {:?} (binary mode is not requested)",
                    other as char
                )))
            }
        });
    }
    Ok(values)
}

/// Decodes one pgoutput message.
pub fn decode(mut buf: Bytes) -> Result<PgOutput, SourceError> {
    need(&buf, 1, "empty")?;
    let tag = buf.get_u8();
    Ok(match tag {
        b'B' => {
            need(&buf, 20, "Begin")?;
            let final_lsn = Lsn(buf.get_u64());
            let ts = buf.get_i64();
            let xid = buf.get_u32();
            // Postgres timestamps end in 294276 AD; anything that overflows here is not one.
            let commit_time_us = ts
                .checked_add(PG_EPOCH_OFFSET_US)
                .ok_or_else(|| SourceError::Protocol(format!("Begin commit time {ts} is out of range")))?;
            PgOutput::Begin { final_lsn, commit_time_us, xid }
        }
        b'C' => {
            need(&buf, 25, "Commit")?;
            let _flags = buf.get_u8();
            let _commit_lsn = buf.get_u64();
            PgOutput::Commit { end_lsn: Lsn(buf.get_u64()) }
        }
        b'R' => {
            need(&buf, 4, "Relation")?;
            let relid = buf.get_u32();
            let namespace = cstring(&mut buf, "Relation")?;
            let name = cstring(&mut buf, "Relation")?;
            need(&buf, 3, "Relation")?;
            let replica_identity = buf.get_u8();
            let n = buf.get_i16().max(0) as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                need(&buf, 1, "Relation")?;
                let flags = buf.get_u8();
                let name = cstring(&mut buf, "Relation")?;
                need(&buf, 8, "Relation")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid: buf.get_u32(),
                    type_mod: buf.get_i32(),
                });
            }
            // An empty namespace means pg_catalog.
            let namespace = if namespace.is_empty() { "pg_catalog".into() } else { namespace };
            PgOutput::Relation { relid, namespace, name, replica_identity, columns }
        }
        b'I' => {
            need(&buf, 5, "Insert")?;
            let relid = buf.get_u32();
            match buf.get_u8() {
                b'N' => PgOutput::Insert { relid, new: tuple(&mut buf, "Insert")? },
                other => return Err(SourceError::Protocol(format!("Insert tuple marker {:?}", other as char))),
            }
        }
        b'U' => {
            need(&buf, 5, "Update")?;
            let relid = buf.get_u32();
            let mut marker = buf.get_u8();
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                old = Some(tuple(&mut buf, "Update")?);
                need(&buf, 1, "Update")?;
                marker = buf.get_u8();
            }
            if marker != b'N' {
                return Err(SourceError::Protocol(format!("Update tuple marker {:?}", marker as char)));
            }
            PgOutput::Update { relid, old, new: tuple(&mut buf, "Update")? }
        }
        b'D' => {
            need(&buf, 5, "Delete")?;
            let relid = buf.get_u32();
            match buf.get_u8() {
                b'K' | b'O' => PgOutput::Delete { relid, old: tuple(&mut buf, "Delete")? },
                other => return Err(SourceError::Protocol(format!("Delete tuple marker {:?}", other as char))),
            }
        }
        b'T' => {
            need(&buf, 5, "Truncate")?;
            let n = buf.get_u32() as usize;
            let _options = buf.get_u8();
            need(&buf, n * 4, "Truncate")?;
            PgOutput::Truncate { relids: (0..n).map(|_| buf.get_u32()).collect() }
        }
        b'O' | b'Y' | b'M' => PgOutput::Ignored,
        other => return Err(SourceError::Protocol(format!("pgoutput message type {:?}", other as char))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn text_tuple(buf: &mut BytesMut, values: &[Option<&str>]) {
        buf.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => buf.put_u8(b'n'),
                Some(s) => {
                    buf.put_u8(b't');
                    buf.put_i32(s.len() as i32);
                    buf.put_slice(s.as_bytes());
                }
            }
        }
    }

    #[test]
    fn a_commit_time_that_overflows_is_a_protocol_error() {
        // Found by the pgoutput fuzz target: a Begin whose timestamp overflowed the epoch shift.
        let mut m = vec![b'B'];
        m.extend_from_slice(&1u64.to_be_bytes());
        m.extend_from_slice(&i64::MAX.to_be_bytes());
        m.extend_from_slice(&7u32.to_be_bytes());
        let err = decode(Bytes::from(m)).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn decodes_begin_and_commit() {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(0x100);
        b.put_i64(0);
        b.put_u32(7);
        assert_eq!(
            decode(b.freeze()).unwrap(),
            PgOutput::Begin { final_lsn: Lsn(0x100), commit_time_us: PG_EPOCH_OFFSET_US, xid: 7 }
        );
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(0x100);
        b.put_u64(0x128);
        b.put_i64(0);
        assert_eq!(decode(b.freeze()).unwrap(), PgOutput::Commit { end_lsn: Lsn(0x128) });
    }

    #[test]
    fn decodes_relation_and_update_with_old_key() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0citizens\0");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(1042);
        b.put_i32(16);
        b.put_u8(0);
        b.put_slice(b"name\0");
        b.put_u32(25);
        b.put_i32(-1);
        let rel = decode(b.freeze()).unwrap();
        let PgOutput::Relation { relid, columns, .. } = rel else { panic!("{rel:?}") };
        assert_eq!(relid, 16384);
        assert!(columns[0].is_key && !columns[1].is_key);
        assert_eq!(columns[1].name, "name");

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        text_tuple(&mut b, &[Some("001"), None]);
        b.put_u8(b'N');
        b.put_i16(2);
        b.put_u8(b't');
        b.put_i32(3);
        b.put_slice(b"002");
        b.put_u8(b'u');
        let up = decode(b.freeze()).unwrap();
        assert_eq!(
            up,
            PgOutput::Update {
                relid: 16384,
                old: Some(vec![TupleValue::Text(Bytes::from_static(b"001")), TupleValue::Null]),
                new: vec![TupleValue::Text(Bytes::from_static(b"002")), TupleValue::UnchangedToast],
            }
        );
    }

    #[test]
    fn truncated_messages_are_protocol_errors_not_panics() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(100);
        b.put_slice(b"short");
        assert!(matches!(decode(b.freeze()), Err(SourceError::Protocol(_))));
        assert!(matches!(decode(Bytes::from_static(b"B\0\0")), Err(SourceError::Protocol(_))));
        assert!(matches!(decode(Bytes::from_static(b"?")), Err(SourceError::Protocol(_))));
    }
}
