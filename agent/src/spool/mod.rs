//! The durable local spool: captured batches wait here until the hub has made them durable.
//!
//! Payloads go to append-only segment files ([`dongbo_connectors::segments`]); sled holds the index (seq range →
//! segment, offset, length), the source's [`ResumePoint`] and the next seq, updated atomically. A
//! polled source's shadow is kept in its own store ([`shadow`]), fed from deltas spooled with
//! each batch.
//!
//! # Contract
//! - [`Spool::append`] syncs the payload to its segment, then writes its index entry and the resume
//!   point in one atomic sled batch and flushes: only then may the source release its WAL.
//! - [`Spool::ack`] removes batches the hub acknowledged as durable. A removal lost in a crash only
//!   means the batch is shipped again, and the hub drops it by seq. A segment file is deleted only
//!   after the removal of every index entry into it is flushed, so no entry outlives its file.
//! - Seqs are never reused: a new spool starts its seqs at the current Unix time in microseconds,
//!   which is above every seq an earlier spool could have handed out (that would take more than one
//!   change per microsecond since it started), so a wiped spool cannot collide with what the hub
//!   already applied.
//! - A batch's shadow delta is synced with its payload, and applied to the shadow store before
//!   [`Spool::append_with_shadow`] returns (again on open after a crash in between).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dongbo_connectors::model::TableId;
use dongbo_connectors::poll::{RowHash, Shadow};
use dongbo_connectors::source::{ResumePoint, SnapshottedTable};

use self::resume::{decode_resume, encode_resume};
use self::shadow::{encode_delta, ShadowError, ShadowStore};
use tokio::sync::watch;

use dongbo_connectors::segments::{self, Location, Segments};

mod resume;
pub mod shadow;

const BATCH_PREFIX: u8 = b'b';
/// sled's page cache defaults to 1 GiB; the spool is written once and read once in order, so a small
/// cache loses nothing and keeps the agent within its memory budget on old servers.
const CACHE_BYTES: u64 = 8 << 20;
const KEY_RESUME: &[u8] = b"m:resume";
const KEY_NEXT_SEQ: &[u8] = b"m:next_seq";
/// Where spools before the shadow store kept shadow entries, in sled: moved out on open.
const OLD_SHADOW_PREFIX: &[u8] = b"p:";

/// The spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// sled failed (disk full, corruption, I/O).
    #[error("spool storage failed: {0}; check the disk holding spool.path")]
    Storage(#[from] sled::Error),
    /// A segment file could not be written or read.
    #[error("spool segment I/O failed: {0}; check the disk holding spool.path")]
    Segment(#[from] std::io::Error),
    /// A stored record does not decode: the spool directory was damaged or written by another program.
    #[error("spool record {0} is damaged")]
    Corrupt(&'static str),
    /// The shadow store failed.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
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
    shadow: Arc<ShadowStore>,
    segments: Arc<Mutex<Segments>>,
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

/// Where a batch is: its payload, then its shadow delta (empty for a log source's batch) right
/// after it in the same segment.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    last_seq: u64,
    at: Location,
    delta_len: u32,
}

impl Indexed {
    /// Bytes the batch holds on disk.
    fn bytes(&self) -> u64 {
        u64::from(self.at.len) + u64::from(self.delta_len)
    }

    fn delta(&self) -> Option<Location> {
        (self.delta_len > 0).then_some(Location {
            segment: self.at.segment,
            offset: self.at.offset + u64::from(self.at.len),
            len: self.delta_len,
        })
    }
}

/// Index entry: last seq, where the payload is, the delta's length. Spools before the shadow
/// store wrote no delta length (28 bytes).
fn encode_index(e: Indexed) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&e.last_seq.to_be_bytes());
    v.extend_from_slice(&e.at.segment.to_be_bytes());
    v.extend_from_slice(&e.at.offset.to_be_bytes());
    v.extend_from_slice(&e.at.len.to_be_bytes());
    v.extend_from_slice(&e.delta_len.to_be_bytes());
    v
}

fn decode_index(v: &[u8]) -> Result<Indexed, SpoolError> {
    let bad = || SpoolError::Corrupt("batch index");
    let u64_at = |i: usize| v.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).ok_or_else(bad);
    let u32_at = |i: usize| v.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).ok_or_else(bad);
    let delta_len = match v.len() {
        28 => 0,
        32 => u32_at(28)?,
        _ => return Err(bad()),
    };
    Ok(Indexed {
        last_seq: u64_at(0)?,
        at: Location { segment: u64_at(8)?, offset: u64_at(16)?, len: u32_at(24)? },
        delta_len,
    })
}

fn first_seq_of(key: &[u8]) -> Result<u64, SpoolError> {
    key.get(1..9).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).ok_or(SpoolError::Corrupt("batch key"))
}

/// Moves shadow entries an older spool kept in sled into the shadow store: durably there first,
/// then removed from sled, so a crash in between only moves them again.
fn move_old_shadow(db: &sled::Db, shadow: &ShadowStore) -> Result<(), SpoolError> {
    loop {
        let mut moved = Vec::new();
        for entry in db.scan_prefix(OLD_SHADOW_PREFIX).take(10_000) {
            let (k, v) = entry?;
            let hash: RowHash = v.as_ref().try_into().map_err(|_| SpoolError::Corrupt("shadow entry"))?;
            moved.push((k, hash));
        }
        if moved.is_empty() {
            return Ok(());
        }
        shadow.write(moved.iter().map(|(k, h)| (k.as_ref(), Some(*h))), None, true)?;
        let mut b = sled::Batch::default();
        for (k, _) in moved {
            b.remove(k);
        }
        db.apply_batch(b)?;
        db.flush()?;
    }
}

impl Spool {
    /// Opens (or creates) the spool at `path`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        Self::open_with_segments(path, max_bytes, segments::SEGMENT_BYTES)
    }

    fn open_with_segments(path: &Path, max_bytes: u64, segment_bytes: u64) -> Result<Self, SpoolError> {
        let db = sled::Config::new()
            .path(path.join("index"))
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let segments = Segments::open(&path.join("segments"), segment_bytes)?;
        let shadow = ShadowStore::open(&path.join("shadow.redb"))?;
        move_old_shadow(&db, &shadow)?;
        let (mut bytes, mut batches, mut last, mut oldest) = (0u64, 0u64, 0u64, None);
        let mut unapplied = Vec::new();
        let mut held = Vec::new();
        for entry in db.scan_prefix([BATCH_PREFIX]) {
            let (k, v) = entry?;
            let e = decode_index(&v)?;
            bytes += e.bytes();
            batches += 1;
            last = last.max(e.last_seq);
            held.push(e.last_seq);
            oldest = Some(oldest.map_or(e.at.segment, |o: u64| o.min(e.at.segment)));
            let first_seq = first_seq_of(&k)?;
            if let Some(delta) = e.delta().filter(|_| first_seq > shadow.durable()) {
                unapplied.push((first_seq, delta));
            }
        }
        // A crash after a batch was indexed and before its delta reached the shadow store.
        if !unapplied.is_empty() {
            tracing::info!(
                batches = unapplied.len(),
                "the shadow store lost deltas in a crash: applied again from the spool"
            );
        }
        for (first_seq, delta) in unapplied {
            shadow.apply(first_seq, &segments.read(delta)?)?;
        }
        shadow.make_durable()?;
        crate::metrics::agent().spool_opened(held);
        // Segments no batch needs any more: acknowledged before a crash, or torn and never indexed.
        segments.release_before(oldest)?;
        if db.get(KEY_NEXT_SEQ)?.is_none() {
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(1);
            db.insert(KEY_NEXT_SEQ, &now_us.to_be_bytes())?;
            db.flush()?;
        }
        let (last_appended, _) = watch::channel(last);
        Ok(Self {
            db,
            shadow: Arc::new(shadow),
            segments: Arc::new(Mutex::new(segments)),
            bytes: AtomicU64::new(bytes),
            batches: AtomicU64::new(batches),
            max_bytes,
            last_appended,
        })
    }

    /// Where the source resumes: what is durably spooled.
    pub fn resume_point(&self) -> Result<ResumePoint, SpoolError> {
        match self.db.get(KEY_RESUME)? {
            Some(v) => decode_resume(&v),
            None => Ok(ResumePoint::default()),
        }
    }

    /// Takes `tables` off the snapshotted tables of the resume point, so the source snapshots
    /// them again at its next start (as tables added to the config); `configured` stands for the
    /// list in a spool that never recorded one. Before the initial snapshot is spooled nothing is
    /// needed: it reads every table. Written atomically like any resume point.
    pub async fn forget_snapshots(&self, tables: &[TableId], configured: &[TableId]) -> Result<(), SpoolError> {
        let mut resume = self.resume_point()?;
        if !resume.snapshot_done {
            return Ok(());
        }
        let known = resume.snapshotted.take().unwrap_or_else(|| {
            configured.iter().map(|t| SnapshottedTable { table: t.clone(), taken_at: None }).collect()
        });
        resume.snapshotted = Some(known.into_iter().filter(|s| !tables.contains(&s.table)).collect());
        if resume.snapshotting.as_ref().is_some_and(|p| tables.contains(&p.table)) {
            // Under way: start it over.
            resume.snapshotting = None;
        }
        let next = self.next_seq()?;
        self.append(None, &resume, next).await
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
        self.append_with_shadow(batch, resume, next_seq, Vec::new()).await
    }

    /// [`Spool::append`], writing the shadow entries of a polled source's changes (key and row
    /// hash, or `None` to remove) in the same atomic write.
    pub async fn append_with_shadow(
        &self,
        batch: Option<SpooledBatch>,
        resume: &ResumePoint,
        next_seq: u64,
        shadow: Vec<(Vec<u8>, Option<RowHash>)>,
    ) -> Result<(), SpoolError> {
        let mut b = sled::Batch::default();
        let mut added = None;
        if let Some(batch) = batch {
            let segments = self.segments.clone();
            let (first_seq, last_seq) = (batch.first_seq, batch.last_seq);
            let delta = encode_delta(&shadow);
            // Sequential write + fsync: blocking I/O, kept off the async workers.
            let (at, delta) = tokio::task::spawn_blocking(move || {
                let mut segments = segments.lock().map_err(|_| std::io::Error::other("spool segment lock poisoned"))?;
                let [at, _] = segments.append_parts(first_seq, [&batch.bytes, &delta])?;
                Ok::<_, std::io::Error>((at, delta))
            })
            .await
            .map_err(std::io::Error::other)??;
            let e = Indexed { last_seq, at, delta_len: delta.len() as u32 };
            b.insert(&batch_key(first_seq), encode_index(e));
            added = Some((first_seq, e, delta));
        } else if !shadow.is_empty() {
            return Err(SpoolError::Corrupt("shadow entries without a batch"));
        }
        b.insert(KEY_RESUME, encode_resume(resume));
        b.insert(KEY_NEXT_SEQ, &next_seq.to_be_bytes());
        self.db.apply_batch(b)?;
        self.db.flush_async().await?;
        if let Some((first_seq, e, delta)) = added {
            self.bytes.fetch_add(e.bytes(), Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::agent().spooled(first_seq, e.last_seq);
            if !delta.is_empty() {
                dongbo_connectors::fault::crash_at("spool-shadow-unapplied");
                let shadow = self.shadow.clone();
                tokio::task::spawn_blocking(move || shadow.apply(first_seq, &delta))
                    .await
                    .map_err(std::io::Error::other)??;
            }
            self.last_appended.send_replace(e.last_seq);
        }
        Ok(())
    }

    /// The shadow of a polled source, read from this spool.
    pub fn shadow(&self) -> Arc<dyn Shadow> {
        self.shadow.clone()
    }

    /// Removes every batch whose last seq is at or below `durable_seq`.
    pub fn ack(&self, durable_seq: u64) -> Result<(), SpoolError> {
        // Held across the scan and the release: no append can roll to a new segment in between, so
        // every batch in a segment older than the current one is already in the index we scan (appends
        // are sequential and index a batch before the next one can start a segment).
        let segments = self.segments.lock().map_err(|_| std::io::Error::other("spool segment lock poisoned"))?;
        let mut b = sled::Batch::default();
        let (mut freed, mut removed, mut changes, mut last_removed) = (0u64, 0u64, 0u64, 0u64);
        let mut oldest_kept = None;
        for entry in self.db.scan_prefix([BATCH_PREFIX]) {
            let (k, v) = entry?;
            let e = decode_index(&v)?;
            // A delta not durable in the shadow store yet exists durably only here: the store is
            // synced first, and a delta not applied yet (its append is still running) stays.
            let first_seq = first_seq_of(&k)?;
            let undurable = |shadow: &ShadowStore| e.delta_len > 0 && first_seq > shadow.durable();
            if e.last_seq <= durable_seq && undurable(&self.shadow) {
                self.shadow.make_durable()?;
            }
            if e.last_seq > durable_seq || undurable(&self.shadow) {
                oldest_kept = Some(e.at.segment);
                break;
            }
            freed += e.bytes();
            removed += 1;
            changes += e.last_seq.saturating_sub(first_seq) + 1;
            last_removed = e.last_seq;
            b.remove(k);
        }
        if removed > 0 {
            crate::metrics::agent().acknowledged(changes, last_removed);
            self.db.apply_batch(b)?;
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.batches.fetch_sub(removed, Ordering::Relaxed);
            // The index removals must be on disk before the files go: a crash in between would
            // otherwise leave entries pointing at segments that no longer exist. Most acks free no
            // segment (64 MiB each), and those need no flush: a lost removal only ships a batch again.
            if !segments.releasable(oldest_kept)?.is_empty() {
                self.db.flush()?;
                segments.release_before(oldest_kept)?;
                dongbo_connectors::fault::crash_at("spool-ack-released");
            }
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
            let first_seq = first_seq_of(&k)?;
            let e = decode_index(&v)?;
            let bytes =
                self.segments.lock().map_err(|_| std::io::Error::other("spool segment lock poisoned"))?.read(e.at)?;
            out.push(SpooledBatch { first_seq, last_seq: e.last_seq, bytes });
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

    /// The spool's limit (`spool.max_bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
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

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{Lsn, Position};
    use dongbo_connectors::source::OpenTxn;

    fn batch(first: u64, last: u64) -> SpooledBatch {
        SpooledBatch { first_seq: first, last_seq: last, bytes: vec![7; 100] }
    }

    #[tokio::test]
    async fn batches_and_resume_point_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let resume = ResumePoint {
            snapshot_done: true,
            committed_end: Some(Position::Postgres(Lsn(0x1_0000_0010))),
            open_txn: Some(OpenTxn { txn: Position::Postgres(Lsn(0x2_0000_0000)), spooled: 4096 }),
            snapshotted: Some(vec![
                SnapshottedTable { table: TableId::new("public", "citizens"), taken_at: None },
                SnapshottedTable {
                    table: TableId::new("hộ_tịch", "đăng ký"),
                    taken_at: Some(Position::Postgres(Lsn(0x3_0000_0001))),
                },
            ]),
            snapshotting: None,
            poll_marks: Vec::new(),
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
        assert_eq!(s.bytes(), 100);
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
    async fn acks_free_whole_segments_and_keep_every_unacknowledged_batch_readable() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join("segments");
        let count = || std::fs::read_dir(&segs).unwrap().count();
        // 250-byte segments: a new segment every third 100-byte batch.
        let s = Spool::open_with_segments(dir.path(), 1 << 30, 250).unwrap();
        for i in 1..=9u64 {
            s.append(Some(batch(i, i)), &ResumePoint::default(), i + 1).await.unwrap();
        }
        assert_eq!(count(), 3);
        s.ack(4).unwrap();
        assert_eq!(count(), 2, "the first segment held only acknowledged batches");
        let left: Vec<u64> = s.batches_after(0, 100).unwrap().iter().map(|b| b.first_seq).collect();
        assert_eq!(left, vec![5, 6, 7, 8, 9], "batch 5 shares a segment with acknowledged 4 and stays readable");
        s.ack(9).unwrap();
        assert_eq!(count(), 1, "only the segment being appended to remains");
        drop(s);
        let s = Spool::open_with_segments(dir.path(), 1 << 30, 250).unwrap();
        assert_eq!((s.batch_count(), s.bytes()), (0, 0));
        assert_eq!(count(), 0, "a reopened empty spool drops the old tail segment");
    }

    #[tokio::test]
    async fn fills_up_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 230).unwrap();
        s.append(Some(batch(1, 1)), &ResumePoint::default(), 2).await.unwrap();
        assert!(!s.is_full());
        s.append(Some(batch(2, 2)), &ResumePoint::default(), 3).await.unwrap();
        s.append(Some(batch(3, 3)), &ResumePoint::default(), 4).await.unwrap();
        assert!(s.is_full());
        s.ack(2).unwrap();
        assert!(!s.is_full());
    }

    #[tokio::test]
    async fn the_shadow_is_written_with_its_batch_and_read_in_key_order() {
        use dongbo_connectors::model::Value;
        use dongbo_connectors::poll::{row_hash, shadow_key, shadow_prefix};
        let dir = tempfile::tempdir().unwrap();
        let t = TableId::new("public", "residents");
        let key = |i: i64| shadow_key(&t, &[Value::Int(i)]);
        let hash = row_hash(&[Value::Int(1)]);
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            let entries = (1..=5).map(|i| (key(i), Some(hash))).collect();
            spool.append_with_shadow(Some(batch(10, 14)), &ResumePoint::default(), 15, entries).await.unwrap();
            // A delete removes its entry, in the write of its own batch.
            spool
                .append_with_shadow(Some(batch(15, 15)), &ResumePoint::default(), 16, vec![(key(3), None)])
                .await
                .unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let shadow = spool.shadow();
        assert_eq!(shadow.get(&key(1)).unwrap(), Some(hash));
        assert_eq!(shadow.get(&key(3)).unwrap(), None);
        let prefix = shadow_prefix(&t);
        let first = shadow.keys_after(&prefix, None, 2).unwrap();
        assert_eq!(first.len(), 2);
        let rest = shadow.keys_after(&prefix, Some(&first[1]), 10).unwrap();
        assert_eq!(first.len() + rest.len(), 4, "keys 1, 2, 4, 5 in two pages");
        assert!(shadow.keys_after(&shadow_prefix(&TableId::new("public", "other")), None, 10).unwrap().is_empty());
        // The spool's own records are not shadow entries.
        assert_eq!(spool.batch_count(), 2);
    }

    /// Indexes a batch with its delta as an append does, stopping where a crash could: before the
    /// shadow store has the delta.
    fn index_without_applying(spool: &Spool, first: u64, last: u64, entries: &[shadow::ShadowEntry]) {
        let delta = encode_delta(entries);
        let [at, _] = spool.segments.lock().unwrap().append_parts(first, [&[7u8; 100][..], &delta]).unwrap();
        let e = Indexed { last_seq: last, at, delta_len: delta.len() as u32 };
        spool.db.insert(batch_key(first), encode_index(e)).unwrap();
        spool.db.insert(KEY_NEXT_SEQ, &(last + 1).to_be_bytes()).unwrap();
        spool.db.flush().unwrap();
    }

    #[tokio::test]
    async fn a_delta_indexed_before_a_crash_is_applied_on_open_and_its_batch_kept_until_then() {
        use dongbo_connectors::model::Value;
        use dongbo_connectors::poll::{row_hash, shadow_key};
        let dir = tempfile::tempdir().unwrap();
        let t = TableId::new("public", "residents");
        let key = |i: i64| shadow_key(&t, &[Value::Int(i)]);
        let (h1, h2) = (row_hash(&[Value::Int(1)]), row_hash(&[Value::Int(2)]));
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            spool
                .append_with_shadow(Some(batch(10, 11)), &ResumePoint::default(), 12, vec![(key(1), Some(h1))])
                .await
                .unwrap();
            index_without_applying(&spool, 12, 13, &[(key(1), Some(h2)), (key(2), Some(h2))]);
            assert_eq!(spool.shadow().get(&key(1)).unwrap(), Some(h1), "the crash came before the store had it");
            spool.ack(13).unwrap();
            assert_eq!(
                spool.batches_after(0, 10).unwrap().iter().map(|b| b.first_seq).collect::<Vec<_>>(),
                vec![12],
                "the hub's ack frees the applied batch, not the one whose delta exists only in the spool"
            );
        }
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let shadow = spool.shadow();
        assert_eq!(shadow.get(&key(1)).unwrap(), Some(h2));
        assert_eq!(shadow.get(&key(2)).unwrap(), Some(h2));
        spool.ack(13).unwrap();
        assert_eq!(spool.batch_count(), 0, "applied on open, so acknowledged now");
    }

    #[tokio::test]
    async fn shadow_entries_an_older_spool_kept_in_sled_move_to_the_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            for i in 0..25_000u32 {
                let mut k = OLD_SHADOW_PREFIX.to_vec();
                k.extend_from_slice(&i.to_be_bytes());
                spool.db.insert(k, &[i as u8; 16]).unwrap();
            }
            spool.db.flush().unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let shadow = spool.shadow();
        assert_eq!(shadow.keys_after(OLD_SHADOW_PREFIX, None, 100_000).unwrap().len(), 25_000);
        let mut k = OLD_SHADOW_PREFIX.to_vec();
        k.extend_from_slice(&24_999u32.to_be_bytes());
        assert_eq!(shadow.get(&k).unwrap(), Some([24_999u32 as u8; 16]));
        assert_eq!(spool.db.scan_prefix(OLD_SHADOW_PREFIX).count(), 0, "sled no longer holds them");
    }
}
