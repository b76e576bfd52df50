//! The durable local spool (sled): captured batches wait here until the hub has made them durable.
//!
//! # Contract
//! - [`Spool::append`] writes a batch and the source's [`ResumePoint`] in one atomic sled batch and
//!   flushes to disk before returning: only then may the source release its WAL.
//! - [`Spool::ack`] removes batches the hub acknowledged as durable. A removal lost in a crash only
//!   means the batch is shipped again, and the hub drops it by seq.
//! - Seqs are never reused: a new spool starts its seqs at the current Unix time in microseconds,
//!   which is above every seq an earlier spool could have handed out (that would take more than one
//!   change per microsecond since it started), so a wiped spool cannot collide with what the hub
//!   already applied.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dongbo_connectors::model::Lsn;
use dongbo_connectors::postgres::{OpenTxn, ResumePoint};
use tokio::sync::watch;

const BATCH_PREFIX: u8 = b'b';
const KEY_RESUME: &[u8] = b"m:resume";
const KEY_NEXT_SEQ: &[u8] = b"m:next_seq";

/// The spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// sled failed (disk full, corruption, I/O).
    #[error("spool storage failed: {0}; check the disk holding spool.path")]
    Storage(#[from] sled::Error),
    /// A stored record does not decode: the spool directory was damaged or written by another program.
    #[error("spool record {0} is damaged")]
    Corrupt(&'static str),
}

/// A spooled batch as stored.
#[derive(Debug, Clone)]
pub struct SpooledBatch {
    /// First seq in the batch.
    pub first_seq: u64,
    /// Last seq in the batch.
    pub last_seq: u64,
    /// The encoded `ChangeBatch`.
    pub bytes: Vec<u8>,
}

/// The spool.
pub struct Spool {
    db: sled::Db,
    bytes: AtomicU64,
    batches: AtomicU64,
    max_bytes: u64,
    last_appended: watch::Sender<u64>,
}

fn batch_key(first_seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = BATCH_PREFIX;
    k[1..].copy_from_slice(&first_seq.to_be_bytes());
    k
}

fn encode_resume(r: &ResumePoint) -> Vec<u8> {
    let mut v = Vec::with_capacity(22);
    v.push(u8::from(r.snapshot_done));
    v.extend_from_slice(&r.committed_end.0.to_be_bytes());
    match r.open_txn {
        Some(o) => {
            v.push(1);
            v.extend_from_slice(&o.final_lsn.0.to_be_bytes());
            v.extend_from_slice(&o.spooled.to_be_bytes());
        }
        None => v.push(0),
    }
    v
}

fn decode_resume(v: &[u8]) -> Result<ResumePoint, SpoolError> {
    let bad = || SpoolError::Corrupt("resume point");
    let u64_at = |i: usize| v.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).ok_or_else(bad);
    let open_txn = match v.get(9) {
        Some(1) => Some(OpenTxn {
            final_lsn: Lsn(u64_at(10)?),
            spooled: v.get(18..22).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).ok_or_else(bad)?,
        }),
        Some(0) => None,
        _ => return Err(bad()),
    };
    Ok(ResumePoint { snapshot_done: *v.first().ok_or_else(bad)? == 1, committed_end: Lsn(u64_at(1)?), open_txn })
}

impl Spool {
    /// Opens (or creates) the spool at `path`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let db = sled::Config::new().path(path).mode(sled::Mode::HighThroughput).open()?;
        let (mut bytes, mut batches, mut last) = (0u64, 0u64, 0u64);
        for entry in db.scan_prefix([BATCH_PREFIX]) {
            let (_, v) = entry?;
            bytes += v.len() as u64;
            batches += 1;
            last = last.max(read_last_seq(&v)?);
        }
        if db.get(KEY_NEXT_SEQ)?.is_none() {
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1);
            db.insert(KEY_NEXT_SEQ, &now_us.to_be_bytes())?;
            db.flush()?;
        }
        let (last_appended, _) = watch::channel(last);
        Ok(Self { db, bytes: AtomicU64::new(bytes), batches: AtomicU64::new(batches), max_bytes, last_appended })
    }

    /// Where the source resumes: what is durably spooled.
    pub fn resume_point(&self) -> Result<ResumePoint, SpoolError> {
        match self.db.get(KEY_RESUME)? {
            Some(v) => decode_resume(&v),
            None => Ok(ResumePoint::default()),
        }
    }

    /// The seq the next captured change gets.
    pub fn next_seq(&self) -> Result<u64, SpoolError> {
        let v = self.db.get(KEY_NEXT_SEQ)?.ok_or(SpoolError::Corrupt("next seq"))?;
        Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| SpoolError::Corrupt("next seq"))?))
    }

    /// Durably stores a batch (if any) with the resume point that includes it. Returns once flushed.
    pub async fn append(
        &self,
        batch: Option<SpooledBatch>,
        resume: &ResumePoint,
        next_seq: u64,
    ) -> Result<(), SpoolError> {
        let mut b = sled::Batch::default();
        let mut added = 0;
        if let Some(batch) = &batch {
            let mut value = Vec::with_capacity(8 + batch.bytes.len());
            value.extend_from_slice(&batch.last_seq.to_be_bytes());
            value.extend_from_slice(&batch.bytes);
            added = value.len() as u64;
            b.insert(&batch_key(batch.first_seq), value);
        }
        b.insert(KEY_RESUME, encode_resume(resume));
        b.insert(KEY_NEXT_SEQ, &next_seq.to_be_bytes());
        self.db.apply_batch(b)?;
        self.db.flush_async().await?;
        if let Some(batch) = batch {
            self.bytes.fetch_add(added, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.last_appended.send_replace(batch.last_seq);
        }
        Ok(())
    }

    /// Removes every batch whose last seq is at or below `durable_seq`.
    pub fn ack(&self, durable_seq: u64) -> Result<(), SpoolError> {
        let mut b = sled::Batch::default();
        let (mut freed, mut removed) = (0u64, 0u64);
        for entry in self.db.scan_prefix([BATCH_PREFIX]) {
            let (k, v) = entry?;
            if read_last_seq(&v)? > durable_seq {
                break;
            }
            freed += v.len() as u64;
            removed += 1;
            b.remove(k);
        }
        if removed > 0 {
            self.db.apply_batch(b)?;
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.batches.fetch_sub(removed, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Up to `limit` batches whose first seq is above `after`, in seq order.
    pub fn batches_after(&self, after: u64, limit: usize) -> Result<Vec<SpooledBatch>, SpoolError> {
        let start = batch_key(after.saturating_add(1)).to_vec();
        let end = vec![BATCH_PREFIX + 1];
        let mut out = Vec::new();
        for entry in self.db.range(start..end).take(limit) {
            let (k, v) = entry?;
            let first_seq = u64::from_be_bytes(k[1..9].try_into().map_err(|_| SpoolError::Corrupt("batch key"))?);
            out.push(SpooledBatch { first_seq, last_seq: read_last_seq(&v)?, bytes: v[8..].to_vec() });
        }
        Ok(out)
    }

    /// Bytes of batches held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Batches held.
    pub fn batch_count(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Whether capture must pause.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Follows the last appended seq, to wake the shipper.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_appended.subscribe()
    }
}

fn read_last_seq(v: &[u8]) -> Result<u64, SpoolError> {
    v.get(..8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).ok_or(SpoolError::Corrupt("batch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first: u64, last: u64) -> SpooledBatch {
        SpooledBatch { first_seq: first, last_seq: last, bytes: vec![7; 100] }
    }

    #[tokio::test]
    async fn batches_and_resume_point_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let resume = ResumePoint {
            snapshot_done: true,
            committed_end: Lsn(0x1_0000_0010),
            open_txn: Some(OpenTxn { final_lsn: Lsn(0x2_0000_0000), spooled: 4096 }),
        };
        {
            let s = Spool::open(dir.path(), 1 << 30).unwrap();
            let first = s.next_seq().unwrap();
            s.append(Some(batch(first, first + 9)), &ResumePoint::default(), first + 10).await.unwrap();
            s.append(Some(batch(first + 10, first + 19)), &resume, first + 20).await.unwrap();
        }
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.resume_point().unwrap(), resume);
        assert_eq!(s.batch_count(), 2);
        let first = s.next_seq().unwrap() - 20;
        let all = s.batches_after(0, 10).unwrap();
        assert_eq!(
            all.iter().map(|b| (b.first_seq, b.last_seq)).collect::<Vec<_>>(),
            vec![(first, first + 9), (first + 10, first + 19)]
        );
        assert_eq!(s.batches_after(first, 10).unwrap().len(), 1);
        s.ack(first + 9).unwrap();
        assert_eq!(s.batch_count(), 1);
        assert_eq!(s.bytes(), 108);
        s.ack(first + 15).unwrap();
        assert_eq!(s.batch_count(), 1, "a batch is dropped only when all of it is durable");
    }

    #[tokio::test]
    async fn a_new_spool_starts_seqs_above_an_old_one() {
        let a = tempfile::tempdir().unwrap();
        let old = Spool::open(a.path(), 1 << 30).unwrap();
        let first_old = old.next_seq().unwrap();
        old.append(Some(batch(first_old, first_old + 999)), &ResumePoint::default(), first_old + 1000).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = tempfile::tempdir().unwrap();
        let fresh = Spool::open(b.path(), 1 << 30).unwrap();
        assert!(fresh.next_seq().unwrap() > first_old + 1000);
    }

    #[tokio::test]
    async fn fills_up_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 250).unwrap();
        s.append(Some(batch(1, 1)), &ResumePoint::default(), 2).await.unwrap();
        assert!(!s.is_full());
        s.append(Some(batch(2, 2)), &ResumePoint::default(), 3).await.unwrap();
        s.append(Some(batch(3, 3)), &ResumePoint::default(), 4).await.unwrap();
        assert!(s.is_full());
        s.ack(2).unwrap();
        assert!(!s.is_full());
    }
}
