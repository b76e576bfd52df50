//! The `ChangeBatch` decoder that reads protobuf straight into the domain model, without building
//! prost's generated structs first (the hub decodes every change a snapshot ships: one `Vec` of
//! generated values per row, then a second `Vec` of domain values, was its largest cost after the
//! NDC itself).
//!
//! It sits on the trust boundary, so it follows prost's rules exactly and the fuzz target
//! `wire_decoders` holds it to them: for any bytes it accepts what prost + `TryFrom` accept and
//! yields the same batch. The rules that matter to a hostile peer:
//! - a field of a known number with the wrong wire type, a length past its message, a varint of
//!   more than ten bytes, text that is not UTF-8: refused;
//! - unknown fields (groups included) are skipped; a scalar sent twice keeps its last value; a
//!   singular message sent twice is merged (a row's values appended), as protobuf specifies;
//! - nesting is limited to prost's depth of 100, counted the way prost counts it, so a deep array
//!   cannot exhaust the stack.
//!
//! Everything past the wire format (seqs, schema references, row widths, keys) is checked once,
//! for both decoders, by [`super::batch_from_wire`].

use prost::encoding::{decode_key, decode_varint, DecodeContext, WireType};

use super::{batch_from_wire, malformed, WireChange, WireError};
use crate::model::{BinlogPos, ChangeBatch, Lsn, Position, Row, Value};
use dongbo_proto::v1 as pb;

/// prost's recursion limit: how many messages deep a top-level message's fields may nest.
const RECURSION_LIMIT: u32 = 100;

/// What is left of the recursion budget for the fields of the message being read (prost's
/// `DecodeContext`, which cannot be built at a given depth from outside prost).
type Depth = u32;

fn expect(wire_type: WireType, expected: WireType) -> Result<(), WireError> {
    if wire_type == expected {
        Ok(())
    } else {
        Err(malformed(format!("a field has wire type {wire_type:?}, expected {expected:?}")))
    }
}

/// Reads a length-delimited field's body.
fn body<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let len = decode_varint(buf)?;
    if len > buf.len() as u64 {
        return Err(malformed("a field runs past the end of its message"));
    }
    let (body, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(body)
}

/// Reads a nested message's body. `depth` is the budget of the message it sits in: a nested
/// message may only be entered while it is above zero.
fn message_body<'a>(wire_type: WireType, buf: &mut &'a [u8], depth: Depth) -> Result<&'a [u8], WireError> {
    expect(wire_type, WireType::LengthDelimited)?;
    if depth == 0 {
        return Err(malformed("messages nest more than 100 deep"));
    }
    body(buf)
}

fn varint(wire_type: WireType, buf: &mut &[u8]) -> Result<u64, WireError> {
    expect(wire_type, WireType::Varint)?;
    Ok(decode_varint(buf)?)
}

fn string(wire_type: WireType, buf: &mut &[u8]) -> Result<String, WireError> {
    expect(wire_type, WireType::LengthDelimited)?;
    let bytes = body(buf)?;
    std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| malformed("a text field is not UTF-8"))
}

/// Skips a field this contract does not know, as prost does (groups included, each level of a
/// group counted against the depth).
fn skip(wire_type: WireType, tag: u32, buf: &mut &[u8], depth: Depth) -> Result<(), WireError> {
    if depth == 0 {
        return Err(malformed("messages nest more than 100 deep"));
    }
    let len = match wire_type {
        WireType::Varint => {
            decode_varint(buf)?;
            0
        }
        WireType::ThirtyTwoBit => 4,
        WireType::SixtyFourBit => 8,
        WireType::LengthDelimited => decode_varint(buf)?,
        WireType::StartGroup => loop {
            let (inner_tag, inner_type) = decode_key(buf)?;
            if inner_type == WireType::EndGroup {
                if inner_tag != tag {
                    return Err(malformed("a group ends with another group's tag"));
                }
                break 0;
            }
            skip(inner_type, inner_tag, buf, depth - 1)?;
        },
        WireType::EndGroup => return Err(malformed("a group ends that never started")),
    };
    if len > buf.len() as u64 {
        return Err(malformed("a field runs past the end of its message"));
    }
    *buf = &buf[len as usize..];
    Ok(())
}

/// Reads the fields of a `Value` into `value` (merging, as protobuf merges a message sent twice).
fn merge_value(value: &mut Option<Value>, mut buf: &[u8], depth: Depth) -> Result<(), WireError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        let text = |buf: &mut &[u8]| string(wt, buf);
        *value = Some(match tag {
            1 => {
                varint(wt, &mut buf)?;
                Value::Null
            }
            2 => {
                varint(wt, &mut buf)?;
                Value::UnchangedToast
            }
            3 => Value::Bool(varint(wt, &mut buf)? != 0),
            4 => Value::Int(varint(wt, &mut buf)? as i64),
            5 => {
                expect(wt, WireType::SixtyFourBit)?;
                let Some((bits, rest)) = buf.split_first_chunk::<8>() else {
                    return Err(malformed("a float runs past the end of its value"));
                };
                buf = rest;
                Value::Float(f64::from_le_bytes(*bits))
            }
            6 => Value::Numeric(text(&mut buf)?),
            7 => Value::Text(text(&mut buf)?),
            8 => {
                expect(wt, WireType::LengthDelimited)?;
                Value::Bytes(body(&mut buf)?.to_vec())
            }
            9 => Value::Date(text(&mut buf)?),
            10 => Value::Timestamp(text(&mut buf)?),
            11 => Value::TimestampTz(text(&mut buf)?),
            12 => Value::Json(text(&mut buf)?),
            13 => Value::Uuid(text(&mut buf)?),
            14 => {
                let inner = message_body(wt, &mut buf, depth)?;
                let mut items = match value.take() {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                };
                merge_values(&mut items, inner, depth - 1)?;
                Value::Array(items)
            }
            15 => {
                let inner = message_body(wt, &mut buf, depth)?;
                let (mut type_name, mut text) = match value.take() {
                    Some(Value::Other { type_name, text }) => (type_name, text),
                    _ => (String::new(), String::new()),
                };
                merge_other(&mut type_name, &mut text, inner, depth - 1)?;
                Value::Other { type_name, text }
            }
            _ => {
                skip(wt, tag, &mut buf, depth)?;
                continue;
            }
        });
    }
    Ok(())
}

fn merge_other(type_name: &mut String, text: &mut String, mut buf: &[u8], depth: Depth) -> Result<(), WireError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match tag {
            1 => *type_name = string(wt, &mut buf)?,
            2 => *text = string(wt, &mut buf)?,
            _ => skip(wt, tag, &mut buf, depth)?,
        }
    }
    Ok(())
}

/// Reads the fields of a message whose field 1 is `repeated Value` (`Row`, `ArrayValue`),
/// appending its values.
fn merge_values(values: &mut Vec<Value>, mut buf: &[u8], depth: Depth) -> Result<(), WireError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        if tag != 1 {
            skip(wt, tag, &mut buf, depth)?;
            continue;
        }
        let inner = message_body(wt, &mut buf, depth)?;
        let mut value = None;
        merge_value(&mut value, inner, depth - 1)?;
        values.push(value.ok_or_else(|| malformed("a value has no kind"))?);
    }
    Ok(())
}

fn merge_row(row: &mut Option<Row>, wt: WireType, buf: &mut &[u8], depth: Depth) -> Result<(), WireError> {
    let inner = message_body(wt, buf, depth)?;
    merge_values(row.get_or_insert_with(Vec::new), inner, depth - 1)
}

fn merge_binlog(pos: &mut BinlogPos, mut buf: &[u8], depth: Depth) -> Result<(), WireError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match tag {
            1 => pos.file = varint(wt, &mut buf)? as u32,
            2 => pos.pos = varint(wt, &mut buf)?,
            _ => skip(wt, tag, &mut buf, depth)?,
        }
    }
    Ok(())
}

fn merge_position(position: &mut Option<Position>, mut buf: &[u8], depth: Depth) -> Result<(), WireError> {
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match tag {
            1 => *position = Some(Position::Postgres(Lsn(varint(wt, &mut buf)?))),
            2 => {
                let inner = message_body(wt, &mut buf, depth)?;
                let mut pos = match position.take() {
                    Some(Position::MySql(p)) => p,
                    _ => BinlogPos { file: 0, pos: 0 },
                };
                merge_binlog(&mut pos, inner, depth - 1)?;
                *position = Some(Position::MySql(pos));
            }
            3 => *position = Some(Position::Poll(varint(wt, &mut buf)?)),
            _ => skip(wt, tag, &mut buf, depth)?,
        }
    }
    Ok(())
}

fn change(mut buf: &[u8], depth: Depth) -> Result<WireChange, WireError> {
    let mut c = WireChange {
        seq: 0,
        schema_index: 0,
        op: 0,
        key: None,
        before: None,
        after: None,
        position: None,
        commit_time_us: 0,
        txid: 0,
        txn_order: 0,
        txn_last: false,
    };
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match tag {
            1 => c.seq = varint(wt, &mut buf)?,
            2 => c.schema_index = varint(wt, &mut buf)? as u32,
            3 => c.op = varint(wt, &mut buf)? as i32,
            4 => merge_row(&mut c.key, wt, &mut buf, depth)?,
            5 => merge_row(&mut c.before, wt, &mut buf, depth)?,
            6 => merge_row(&mut c.after, wt, &mut buf, depth)?,
            7 => {
                let inner = message_body(wt, &mut buf, depth)?;
                merge_position(&mut c.position, inner, depth - 1)?;
            }
            8 => c.commit_time_us = varint(wt, &mut buf)? as i64,
            9 => c.txid = varint(wt, &mut buf)?,
            10 => c.txn_order = varint(wt, &mut buf)? as u32,
            11 => c.txn_last = varint(wt, &mut buf)? != 0,
            _ => skip(wt, tag, &mut buf, depth)?,
        }
    }
    Ok(c)
}

/// Decodes opened batch bytes (see [`super::open_batch`]) and validates them.
pub(super) fn decode_batch(mut buf: &[u8]) -> Result<ChangeBatch, WireError> {
    let depth = RECURSION_LIMIT;
    let mut source_id = String::new();
    let (mut first_seq, mut last_seq) = (0, 0);
    let mut schemas: Vec<pb::TableSchema> = Vec::new();
    let mut changes: Vec<&[u8]> = Vec::new();
    while !buf.is_empty() {
        let (tag, wt) = decode_key(&mut buf)?;
        match tag {
            1 => source_id = string(wt, &mut buf)?,
            2 => first_seq = varint(wt, &mut buf)?,
            3 => last_seq = varint(wt, &mut buf)?,
            // A handful per batch: prost reads them, at the depth it would.
            4 => prost::encoding::message::merge_repeated(wt, &mut schemas, &mut buf, DecodeContext::default())?,
            // Read once every schema is known (the contract lets them follow their changes).
            5 => changes.push(message_body(wt, &mut buf, depth)?),
            _ => skip(wt, tag, &mut buf, depth)?,
        }
    }
    let wire_changes = changes.into_iter().map(|c| change(c, depth - 1));
    batch_from_wire(source_id, first_seq, last_seq, schemas, wire_changes)
}
