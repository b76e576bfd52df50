//! The shadow of a polled source ([`dongbo_connectors::poll::shadow`]) in its own redb file beside
//! the spool's index.
//!
//! Not in sled: sled 0.34 keeps every value it has written resident whatever its cache size, so a
//! shadow of 400 000 rows grew the agent past 110 MiB. redb keeps its pages on disk behind a cache of
//! [`CACHE_BYTES`].
//!
//! # Contract
//! - A batch's shadow delta (each changed key with its new row hash, or a removal) is written to
//!   the batch's segment right after its payload, with the same sync, and the batch's index entry
//!   records its length: once a batch is indexed, its delta is durable.
//! - The delta is then applied to redb in one transaction that also records the batch's first seq
//!   as [`ShadowStore::applied`], committed before the append returns. The polling source reads
//!   the shadow only between appends, so it never sees a batch without its delta.
//! - Most of those commits are not synced (a sync costs two fsyncs, a third of the polled
//!   change rate when every batch paid it): every [`DURABLE_EVERY`]th is, and
//!   [`ShadowStore::make_durable`] syncs on demand. A crash loses the unsynced commits; the
//!   deltas they held are still indexed in the spool, and opening it applies every indexed delta
//!   above [`ShadowStore::durable`] again, in seq order, before anything reads the shadow.
//! - The spool never drops a batch whose delta is not durable in the store yet: it syncs the
//!   store first ([`ShadowStore::make_durable`]), so an acknowledgement cannot take the only
//!   durable copy of a delta with it.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use dongbo_connectors::error::SourceError;
use dongbo_connectors::poll::{RowHash, Shadow};
use redb::{ReadableDatabase, TableDefinition, TableError};

/// redb's page cache. The shadow is read by key in sweeps and walked in key order by the diff, so
/// a small cache costs reads from the OS page cache, not memory of our own.
pub const CACHE_BYTES: usize = 4 << 20;

const ENTRIES: TableDefinition<&[u8], &[u8; 16]> = TableDefinition::new("shadow");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED: &str = "applied_first_seq";

/// Every this many applied deltas, the commit is synced: unsynced commits stay in redb's memory
/// (and their freed pages unreused) until one is.
pub const DURABLE_EVERY: u32 = 32;

/// A shadow entry as the spool writes it: the shadow key and the row hash, or `None` to remove.
pub type ShadowEntry = (Vec<u8>, Option<RowHash>);

/// The shadow store failed.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// redb failed (disk full, I/O, a damaged file).
    #[error("the spool's shadow store failed: {0}; check the disk holding spool.path")]
    Storage(#[from] redb::Error),
    /// A delta in a segment does not decode.
    #[error("a shadow delta in the spool is damaged; move the spool aside and let the poller read every table again")]
    Corrupt,
}

fn storage(e: impl Into<redb::Error>) -> ShadowError {
    ShadowError::Storage(e.into())
}

/// Encodes a batch's delta: per entry a u32 key length, the key, then 0 (remove) or 1 and the hash.
pub fn encode_delta(entries: &[ShadowEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|(k, _)| k.len() + 21).sum());
    for (key, hash) in entries {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        match hash {
            Some(h) => {
                out.push(1);
                out.extend_from_slice(h);
            }
            None => out.push(0),
        }
    }
    out
}

/// A decoded delta entry, borrowing its key from the delta.
type DeltaEntry<'a> = (&'a [u8], Option<RowHash>);

fn decode_delta(mut bytes: &[u8]) -> Result<Vec<DeltaEntry<'_>>, ShadowError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = bytes.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).ok_or(ShadowError::Corrupt)?;
        let rest = &bytes[4..];
        let key = rest.get(..len as usize).ok_or(ShadowError::Corrupt)?;
        let rest = &rest[len as usize..];
        let (hash, rest) = match rest.first() {
            Some(0) => (None, &rest[1..]),
            Some(1) => {
                let h: RowHash = rest.get(1..17).and_then(|h| h.try_into().ok()).ok_or(ShadowError::Corrupt)?;
                (Some(h), &rest[17..])
            }
            _ => return Err(ShadowError::Corrupt),
        };
        out.push((key, hash));
        bytes = rest;
    }
    Ok(out)
}

/// The redb file holding the shadow, and the first seqs of the last batches whose deltas it holds
/// (visible, and synced).
pub struct ShadowStore {
    db: redb::Database,
    applied: AtomicU64,
    durable: AtomicU64,
    /// Commits since the last synced one; held across a commit, so commits are serial.
    unsynced: std::sync::Mutex<u32>,
}

impl ShadowStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, ShadowError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(storage)?;
        let applied = {
            let txn = db.begin_read().map_err(storage)?;
            match txn.open_table(META) {
                Ok(meta) => meta.get(APPLIED).map_err(storage)?.map_or(0, |v| v.value()),
                Err(TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(storage(e)),
            }
        };
        Ok(Self {
            db,
            applied: AtomicU64::new(applied),
            durable: AtomicU64::new(applied),
            unsynced: std::sync::Mutex::new(0),
        })
    }

    /// The first seq of the last batch whose delta is applied (0 before any).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The first seq of the last batch whose delta survives a crash.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Applies the delta of the batch starting at `first_seq`, unless it already is.
    pub fn apply(&self, first_seq: u64, delta: &[u8]) -> Result<(), ShadowError> {
        if first_seq <= self.applied() {
            return Ok(());
        }
        let entries = decode_delta(delta)?;
        self.write(entries.into_iter(), Some(first_seq), false)
    }

    /// Syncs every applied delta to disk.
    pub fn make_durable(&self) -> Result<(), ShadowError> {
        if self.durable() < self.applied() {
            self.write(std::iter::empty(), None, true)?;
        }
        Ok(())
    }

    /// Writes entries in one transaction, recording `first_seq` as applied if given (a one-time
    /// move from an older spool passes none); synced if `sync` or every [`DURABLE_EVERY`]th time.
    pub fn write<'a>(
        &self,
        entries: impl Iterator<Item = DeltaEntry<'a>>,
        first_seq: Option<u64>,
        sync: bool,
    ) -> Result<(), ShadowError> {
        let mut unsynced = self.unsynced.lock().map_err(|_| ShadowError::Corrupt)?;
        let sync = sync || *unsynced + 1 >= DURABLE_EVERY;
        let mut txn = self.db.begin_write().map_err(storage)?;
        if !sync {
            txn.set_durability(redb::Durability::None).map_err(storage)?;
        }
        {
            let mut table = txn.open_table(ENTRIES).map_err(storage)?;
            for (key, hash) in entries {
                match hash {
                    Some(h) => {
                        table.insert(key, &h).map_err(storage)?;
                    }
                    None => {
                        table.remove(key).map_err(storage)?;
                    }
                }
            }
            if let Some(seq) = first_seq {
                txn.open_table(META).map_err(storage)?.insert(APPLIED, seq).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        if let Some(seq) = first_seq {
            self.applied.store(seq, Ordering::Release);
        }
        if sync {
            *unsynced = 0;
            self.durable.store(self.applied(), Ordering::Release);
        } else {
            *unsynced += 1;
        }
        Ok(())
    }
}

fn read_error(e: impl Into<redb::Error>) -> SourceError {
    SourceError::Io(std::io::Error::other(format!("the spool's shadow cannot be read: {}", e.into())))
}

impl Shadow for ShadowStore {
    fn get(&self, key: &[u8]) -> Result<Option<RowHash>, SourceError> {
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(read_error(e)),
        };
        Ok(table.get(key).map_err(read_error)?.map(|v| *v.value()))
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<RowHash>>, SourceError> {
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(vec![None; keys.len()]),
            Err(e) => return Err(read_error(e)),
        };
        keys.iter().map(|k| Ok(table.get(*k).map_err(read_error)?.map(|v| *v.value()))).collect()
    }

    fn keys_after(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>, SourceError> {
        let txn = self.db.begin_read().map_err(read_error)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(read_error(e)),
        };
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for entry in table.range::<&[u8]>((start, Bound::Unbounded)).map_err(read_error)? {
            let (k, _) = entry.map_err(read_error)?;
            let k = k.value();
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push(k.to_vec());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_and_damage_is_refused() {
        let entries = vec![(b"p:a".to_vec(), Some([7u8; 16])), (b"p:b".to_vec(), None), (Vec::new(), Some([1; 16]))];
        let bytes = encode_delta(&entries);
        let back = decode_delta(&bytes).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!((back[0].0, back[0].1), (&b"p:a"[..], Some([7u8; 16])));
        assert_eq!((back[1].0, back[1].1), (&b"p:b"[..], None));
        for cut in 1..bytes.len() {
            if decode_delta(&bytes[..cut]).is_ok() {
                // Only a cut between whole entries decodes.
                assert!(cut == 3 + 4 + 17 || cut == 3 + 4 + 17 + 3 + 4 + 1, "cut at {cut} decoded");
            }
        }
        let mut bad = bytes.clone();
        bad[4 + 3] = 2;
        assert!(matches!(decode_delta(&bad), Err(ShadowError::Corrupt)));
    }

    #[test]
    fn a_delta_is_applied_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shadow.redb");
        {
            let s = ShadowStore::open(&path).unwrap();
            assert_eq!(s.applied(), 0);
            s.apply(10, &encode_delta(&[(b"p:k1".to_vec(), Some([1; 16])), (b"p:k2".to_vec(), Some([2; 16]))]))
                .unwrap();
            s.apply(12, &encode_delta(&[(b"p:k1".to_vec(), None)])).unwrap();
            // An older delta applied again (a replay after a crash) changes nothing.
            s.apply(10, &encode_delta(&[(b"p:k1".to_vec(), Some([9; 16]))])).unwrap();
        }
        let s = ShadowStore::open(&path).unwrap();
        assert_eq!(s.applied(), 12);
        assert_eq!(s.get(b"p:k1").unwrap(), None);
        assert_eq!(s.get(b"p:k2").unwrap(), Some([2; 16]));
        assert_eq!(s.keys_after(b"p:", None, 10).unwrap(), vec![b"p:k2".to_vec()]);
    }
}
