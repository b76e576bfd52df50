//! The stored form of the spool's [`ResumePoint`].
//!
//! Layout 2 (written now): byte 0 is `0x80 | snapshot_done`; then the committed end; then the open
//! transaction (0, or 1 then its position and the spooled count as u32); then the snapshotted
//! tables (0 for unknown, or 1, a u32 count, and each table: schema and name as u16-length-prefixed
//! UTF-8, then the position its snapshot was taken at); then, if a table's online snapshot is
//! under way, 1, its schema and name, the rows spooled (u64) and the last key (u32 length, bytes),
//! else 0; then, only for a polled source, its watermarks: a u32 count and each table's schema
//! and name and its cursor (u32 length, bytes). A position is a tag and its bytes: 0 none,
//! 1 a Postgres LSN (u64), 2 a binlog position (file u32, offset u64), 3 a poll cycle (u64).
//! Integers are big-endian.
//!
//! Layout 1 (spools of earlier agents, read only): byte 0 is 0 or 1, Postgres LSNs only, 0 for
//! none: the committed end (u64), the open transaction (flag, LSN, count; 1 byte or 13), then, if
//! the snapshotted tables were recorded, tag 1 and the tables with a u64 LSN each.

use dongbo_connectors::model::{BinlogPos, Lsn, Position, TableId};
use dongbo_connectors::source::{OpenTxn, PollMark, ResumePoint, SnapshottedTable, TableProgress};

use super::SpoolError;

const LAYOUT_2: u8 = 0x80;

fn put_position(v: &mut Vec<u8>, p: Option<Position>) {
    match p {
        None => v.push(0),
        Some(Position::Postgres(l)) => {
            v.push(1);
            v.extend_from_slice(&l.0.to_be_bytes());
        }
        Some(Position::MySql(b)) => {
            v.push(2);
            v.extend_from_slice(&b.file.to_be_bytes());
            v.extend_from_slice(&b.pos.to_be_bytes());
        }
        Some(Position::Poll(cycle)) => {
            v.push(3);
            v.extend_from_slice(&cycle.to_be_bytes());
        }
    }
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u16).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// Encodes in layout 2.
pub(super) fn encode_resume(r: &ResumePoint) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.push(LAYOUT_2 | u8::from(r.snapshot_done));
    put_position(&mut v, r.committed_end);
    match r.open_txn {
        Some(o) => {
            v.push(1);
            put_position(&mut v, Some(o.txn));
            v.extend_from_slice(&o.spooled.to_be_bytes());
        }
        None => v.push(0),
    }
    match &r.snapshotted {
        None => v.push(0),
        Some(tables) => {
            v.push(1);
            v.extend_from_slice(&(tables.len() as u32).to_be_bytes());
            for t in tables {
                put_str(&mut v, &t.table.schema);
                put_str(&mut v, &t.table.name);
                put_position(&mut v, t.taken_at);
            }
        }
    }
    if let Some(p) = &r.snapshotting {
        v.push(1);
        put_str(&mut v, &p.table.schema);
        put_str(&mut v, &p.table.name);
        v.extend_from_slice(&p.rows.to_be_bytes());
        v.extend_from_slice(&(p.after_key.len() as u32).to_be_bytes());
        v.extend_from_slice(&p.after_key);
    } else {
        v.push(0);
    }
    // Absent for log sources, so their resume points read as before.
    if !r.poll_marks.is_empty() {
        v.extend_from_slice(&(r.poll_marks.len() as u32).to_be_bytes());
        for m in &r.poll_marks {
            put_str(&mut v, &m.table.schema);
            put_str(&mut v, &m.table.name);
            v.extend_from_slice(&(m.cursor.len() as u32).to_be_bytes());
            v.extend_from_slice(&m.cursor);
        }
    }
    v
}

/// Decodes either layout.
pub(super) fn decode_resume(v: &[u8]) -> Result<ResumePoint, SpoolError> {
    let bad = || SpoolError::Corrupt("resume point");
    match v.first() {
        Some(b) if b & LAYOUT_2 != 0 => {
            let mut r = Reader(v.get(1..).ok_or_else(bad)?);
            decode_layout_2(b & 1 == 1, &mut r).filter(|_| r.0.is_empty()).ok_or_else(bad)
        }
        Some(_) => decode_layout_1(v),
        None => Err(bad()),
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn position(&mut self) -> Option<Option<Position>> {
        Some(match self.u8()? {
            0 => None,
            1 => Some(Position::Postgres(Lsn(self.u64()?))),
            2 => Some(Position::MySql(BinlogPos { file: self.u32()?, pos: self.u64()? })),
            3 => Some(Position::Poll(self.u64()?)),
            _ => return None,
        })
    }
}

fn decode_layout_2(snapshot_done: bool, r: &mut Reader<'_>) -> Option<ResumePoint> {
    let committed_end = r.position()?;
    let open_txn = match r.u8()? {
        0 => None,
        1 => Some(OpenTxn { txn: r.position()??, spooled: r.u32()? }),
        _ => return None,
    };
    let snapshotted = match r.u8()? {
        0 => None,
        1 => {
            let count = r.u32()?;
            let mut tables = Vec::with_capacity(count.min(4096) as usize);
            for _ in 0..count {
                let table = TableId::new(r.string()?, r.string()?);
                tables.push(SnapshottedTable { table, taken_at: r.position()? });
            }
            Some(tables)
        }
        _ => return None,
    };
    let snapshotting = match r.u8()? {
        0 => None,
        1 => {
            let table = TableId::new(r.string()?, r.string()?);
            let rows = r.u64()?;
            let len = r.u32()? as usize;
            Some(TableProgress { table, rows, after_key: r.take(len)?.to_vec() })
        }
        _ => return None,
    };
    let mut poll_marks = Vec::new();
    if !r.0.is_empty() {
        let count = r.u32()?;
        for _ in 0..count {
            let table = TableId::new(r.string()?, r.string()?);
            let len = r.u32()? as usize;
            poll_marks.push(PollMark { table, cursor: r.take(len)?.to_vec() });
        }
    }
    Some(ResumePoint { snapshot_done, committed_end, open_txn, snapshotted, snapshotting, poll_marks })
}

fn decode_layout_1(v: &[u8]) -> Result<ResumePoint, SpoolError> {
    let bad = || SpoolError::Corrupt("resume point");
    let u64_at = |i: usize| v.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).ok_or_else(bad);
    let open_txn = match v.get(9) {
        Some(1) => Some(OpenTxn {
            txn: Position::Postgres(Lsn(u64_at(10)?)),
            spooled: v.get(18..22).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).ok_or_else(bad)?,
        }),
        Some(0) => None,
        _ => return Err(bad()),
    };
    let committed_end = Some(u64_at(1)?).filter(|&l| l != 0).map(|l| Position::Postgres(Lsn(l)));
    // The open transaction took 13 bytes in every spool that records tables, 1 or 13 before.
    let rest = match (open_txn.is_some(), v.len()) {
        (true, _) => 22,
        (false, 10) => 10,
        (false, _) => 22,
    };
    let snapshotted = match v.get(rest) {
        None => None,
        Some(1) => {
            let mut r = Reader(v.get(rest + 1..).ok_or_else(bad)?);
            let tables = (|| {
                let count = r.u32()?;
                let mut tables = Vec::with_capacity(count.min(4096) as usize);
                for _ in 0..count {
                    let table = TableId::new(r.string()?, r.string()?);
                    let at = r.u64()?;
                    tables.push(SnapshottedTable { table, taken_at: (at != 0).then_some(Position::Postgres(Lsn(at))) });
                }
                Some(tables)
            })();
            Some(tables.ok_or_else(bad)?)
        }
        Some(_) => return Err(bad()),
    };
    Ok(ResumePoint {
        snapshot_done: *v.first().ok_or_else(bad)? == 1,
        committed_end,
        open_txn,
        snapshotted,
        snapshotting: None,
        poll_marks: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_points_of_older_spools_still_read() {
        // Layout 1 without the tables: no open transaction (10 bytes) and with one (22 bytes).
        let mut old = vec![1];
        old.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        old.push(0);
        let r = decode_resume(&old).unwrap();
        assert!(r.snapshot_done && r.open_txn.is_none() && r.snapshotted.is_none());
        assert_eq!(r.committed_end, Some(Position::Postgres(Lsn(0x1_0000_0010))));
        let mut with_txn = vec![0];
        with_txn.extend_from_slice(&0x10u64.to_be_bytes());
        with_txn.push(1);
        with_txn.extend_from_slice(&0x20u64.to_be_bytes());
        with_txn.extend_from_slice(&7u32.to_be_bytes());
        let r = decode_resume(&with_txn).unwrap();
        assert_eq!(r.open_txn, Some(OpenTxn { txn: Position::Postgres(Lsn(0x20)), spooled: 7 }));
        // Layout 1 with the tables.
        with_txn.push(1);
        with_txn.extend_from_slice(&1u32.to_be_bytes());
        for part in ["public", "t"] {
            with_txn.extend_from_slice(&(part.len() as u16).to_be_bytes());
            with_txn.extend_from_slice(part.as_bytes());
        }
        with_txn.extend_from_slice(&0x30u64.to_be_bytes());
        let r = decode_resume(&with_txn).unwrap();
        assert_eq!(
            r.snapshotted,
            Some(vec![SnapshottedTable {
                table: TableId::new("public", "t"),
                taken_at: Some(Position::Postgres(Lsn(0x30)))
            }])
        );
    }

    #[test]
    fn both_kinds_of_position_round_trip_and_a_cut_record_is_corrupt() {
        let binlog = |file, pos| Position::MySql(BinlogPos { file, pos });
        for r in [
            ResumePoint::default(),
            ResumePoint { snapshotted: Some(Vec::new()), ..ResumePoint::default() },
            ResumePoint {
                snapshot_done: true,
                committed_end: Some(binlog(3, 1_234_567)),
                open_txn: Some(OpenTxn { txn: binlog(4, 256), spooled: 50_000 }),
                snapshotted: Some(vec![
                    SnapshottedTable { table: TableId::new("province", "households"), taken_at: None },
                    SnapshottedTable { table: TableId::new("hộ_tịch", "đăng ký"), taken_at: Some(binlog(4, 9)) },
                ]),
                snapshotting: Some(TableProgress {
                    table: TableId::new("province", "households"),
                    after_key: vec![1, 2, 3],
                    rows: 40_000,
                }),
                poll_marks: Vec::new(),
            },
        ] {
            let bytes = encode_resume(&r);
            assert_eq!(decode_resume(&bytes).unwrap(), r);
            for cut in 1..bytes.len() {
                assert!(decode_resume(&bytes[..cut]).is_err(), "cut at {cut} of {} decoded", bytes.len());
            }
        }
    }

    #[test]
    fn a_polled_sources_cycles_and_watermarks_round_trip() {
        let r = ResumePoint {
            snapshot_done: true,
            committed_end: Some(Position::Poll(41)),
            poll_marks: vec![
                PollMark { table: TableId::new("public", "citizens"), cursor: vec![10, 3, 58, 1, 50] },
                PollMark { table: TableId::new("hộ_tịch", "đăng ký"), cursor: vec![] },
            ],
            ..ResumePoint::default()
        };
        let bytes = encode_resume(&r);
        assert_eq!(decode_resume(&bytes).unwrap(), r);
        // A log source's record ends before the watermarks: a cut inside them never reads as r.
        for cut in 1..bytes.len() {
            assert!(decode_resume(&bytes[..cut]).map_or(true, |d| d != r), "cut at {cut} read as the whole");
        }
    }
}
