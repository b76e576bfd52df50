//! The hub's retained, replayable log of applied changes and domain events (sled, on local disk).
//!
//! One *chunk* per NDC transaction: a header (source, seq range, seqs not applied, the events
//! raised, when logged) and the agent's batches verbatim, so logging re-encodes no change. Chunk
//! offsets count up from 1; inside a chunk, items are its applied changes in seq order and then its
//! events, so a position in the log is `(chunk, item)`, printed `chunk.item` as a resume token.
//!
//! Appending is idempotent per source: the source's last logged seq is written in the same atomic
//! sled batch as the chunk, and a chunk only takes seqs above it. The ingest path appends after the
//! NDC commit and before acknowledging the agent, so everything in the log is applied, and a hub
//! that dies between the two logs the changes on the replay the missing acknowledgement causes.

use std::sync::Arc;

use dongbo_connectors::model::{ChangeBatch, ChangeEvent};
use dongbo_connectors::wire;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::record::{now_micros, DomainEvent};
use super::subscription::Start;

/// The log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// sled failed.
    #[error("fan-out log storage failed: {0}")]
    Storage(#[from] sled::Error),
    /// A stored chunk does not decode.
    #[error("fan-out log chunk {0} is corrupt: {1}")]
    Corrupt(u64, String),
}

/// A position in the log: the next item to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    /// Chunk offset.
    pub chunk: u64,
    /// Item inside the chunk.
    pub item: u32,
}

impl Cursor {
    /// `chunk.item`, the resume token form.
    pub fn token(&self) -> String {
        format!("{}.{}", self.chunk, self.item)
    }

    /// Parses a resume token.
    pub fn parse(token: &str) -> Option<Self> {
        let (c, i) = token.split_once('.')?;
        Some(Self { chunk: c.parse().ok()?, item: i.parse().ok()? })
    }

    fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&self.chunk.to_be_bytes());
        b[8..].copy_from_slice(&self.item.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(Self {
            chunk: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            item: u32::from_be_bytes(b.get(8..12)?.try_into().ok()?),
        })
    }
}

/// What a chunk holds besides the raw batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The source.
    pub source_id: String,
    /// Changes with seqs in `first_seq..=last_seq` belong to this chunk ...
    pub first_seq: u64,
    /// ... up to here ...
    pub last_seq: u64,
    /// ... except these, which were not applied (quarantined).
    pub excluded: Vec<u64>,
    /// Number of applied changes in the chunk.
    pub n_changes: u32,
    /// Events raised by the chunk's changes, in seq order.
    pub events: Vec<DomainEvent>,
    /// When the chunk was logged, microseconds since the epoch.
    pub logged_at_us: i64,
}

impl ChunkHeader {
    fn items(&self) -> u32 {
        self.n_changes + self.events.len() as u32
    }
}

/// One item read from the log.
#[derive(Debug, Clone)]
pub enum Item {
    /// An applied row change.
    Change {
        /// Its source.
        source_id: String,
        /// The change.
        change: ChangeEvent,
        /// When it was logged.
        logged_at_us: i64,
    },
    /// A domain event.
    Event(DomainEvent),
}

/// What one append logs.
pub struct Append<'a> {
    /// The source.
    pub source_id: &'a str,
    /// The agent's batches of the transaction, decoded and as received.
    pub batches: &'a [(ChangeBatch, Vec<u8>)],
    /// Seqs of these batches that were not applied.
    pub excluded: Vec<u64>,
    /// Events their changes raised (including events recovered from the outbox).
    pub events: Vec<DomainEvent>,
}

const HEADER: u8 = b'h';
const DATA: u8 = b'd';
const SOURCE: u8 = b's';

fn key(prefix: u8, offset: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// The log.
pub struct FanoutLog {
    db: sled::Db,
    tree: sled::Tree,
    next: Mutex<u64>,
    end: watch::Sender<u64>,
}

impl FanoutLog {
    /// Opens (or creates) the log inside `db`.
    pub fn open(db: sled::Db) -> Result<Arc<Self>, LogError> {
        let tree = db.open_tree("log")?;
        let next = match tree.scan_prefix([HEADER]).next_back() {
            Some(kv) => u64::from_be_bytes(kv?.0[1..9].try_into().expect("9-byte keys")) + 1,
            None => 1,
        };
        let (end, _) = watch::channel(next);
        Ok(Arc::new(Self { db, tree, next: Mutex::new(next), end }))
    }

    /// The last seq of `source_id` in the log, if the log has seen the source.
    pub fn logged_seq(&self, source_id: &str) -> Result<Option<u64>, LogError> {
        let mut k = vec![SOURCE];
        k.extend_from_slice(source_id.as_bytes());
        Ok(self.tree.get(k)?.map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))))
    }

    /// Starts tracking a source the log has never seen at `seq` (its applied seq), so the log does
    /// not wait for history it will never get.
    pub async fn adopt_source(&self, source_id: &str, seq: u64) -> Result<u64, LogError> {
        let _guard = self.next.lock().await;
        if let Some(s) = self.logged_seq(source_id)? {
            return Ok(s);
        }
        let mut k = vec![SOURCE];
        k.extend_from_slice(source_id.as_bytes());
        self.tree.insert(k, &seq.to_be_bytes())?;
        self.db.flush_async().await?;
        Ok(seq)
    }

    /// Appends a chunk and makes it durable; returns the source's logged seq after it.
    pub async fn append(&self, a: Append<'_>) -> Result<u64, LogError> {
        let mut next = self.next.lock().await;
        let logged = self.logged_seq(a.source_id)?.unwrap_or(0);
        let last_seq = a.batches.iter().map(|(b, _)| b.last_seq()).max().unwrap_or(0);
        if last_seq <= logged {
            return Ok(logged);
        }
        let first_seq = logged + 1;
        let n_changes = a
            .batches
            .iter()
            .flat_map(|(b, _)| &b.changes)
            .filter(|c| c.seq >= first_seq && !a.excluded.contains(&c.seq))
            .count() as u32;
        let events: Vec<DomainEvent> = a.events.into_iter().filter(|e| e.seq >= first_seq).collect();
        let header = ChunkHeader {
            source_id: a.source_id.into(),
            first_seq,
            last_seq,
            excluded: a.excluded,
            n_changes,
            events,
            logged_at_us: now_micros(),
        };
        let mut data = Vec::new();
        for (_, raw) in a.batches {
            data.extend_from_slice(&(raw.len() as u32).to_be_bytes());
            data.extend_from_slice(raw);
        }
        let mut batch = sled::Batch::default();
        batch.insert(&key(HEADER, *next), serde_json::to_vec(&header).expect("headers serialise"));
        if n_changes > 0 {
            batch.insert(&key(DATA, *next), data);
        }
        let mut k = vec![SOURCE];
        k.extend_from_slice(a.source_id.as_bytes());
        batch.insert(k, &last_seq.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.db.flush_async().await?;
        *next += 1;
        self.end.send_replace(*next);
        Ok(last_seq)
    }

    /// The offset the next chunk will get; a watch of it wakes readers.
    pub fn end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// The oldest retained chunk's offset (the end when the log is empty).
    pub fn first(&self) -> Result<u64, LogError> {
        Ok(match self.tree.scan_prefix([HEADER]).next() {
            Some(kv) => u64::from_be_bytes(kv?.0[1..9].try_into().expect("9-byte keys")),
            None => *self.end.borrow(),
        })
    }

    fn header(&self, offset: u64) -> Result<Option<ChunkHeader>, LogError> {
        match self.tree.get(key(HEADER, offset))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| LogError::Corrupt(offset, e.to_string())),
        }
    }

    /// Where a new subscription starting at `start` begins.
    pub fn start_cursor(&self, start: Start) -> Result<Cursor, LogError> {
        let chunk = match start {
            Start::Now => *self.end.borrow(),
            Start::Beginning => self.first()?,
            Start::At(t) => {
                let mut found = *self.end.borrow();
                for kv in self.tree.scan_prefix([HEADER]) {
                    let (k, v) = kv?;
                    let offset = u64::from_be_bytes(k[1..9].try_into().expect("9-byte keys"));
                    let h: ChunkHeader =
                        serde_json::from_slice(&v).map_err(|e| LogError::Corrupt(offset, e.to_string()))?;
                    if h.logged_at_us >= t {
                        found = offset;
                        break;
                    }
                }
                found
            }
        };
        Ok(Cursor { chunk, item: 0 })
    }

    /// Reads up to `max` items from `from`; row changes are decoded only when `changes` is set
    /// (otherwise skipped). Returns the items with the cursor after each, and the cursor after
    /// everything examined (further than the last item when skipped items follow it).
    pub fn read(&self, from: Cursor, max: usize, changes: bool) -> Result<(Vec<(Cursor, Item)>, Cursor), LogError> {
        let mut out = Vec::new();
        let mut at = Cursor {
            chunk: from.chunk.max(self.first()?),
            item: if from.chunk < self.first()? { 0 } else { from.item },
        };
        let end = *self.end.borrow();
        let mut examined = 0usize;
        while at.chunk < end && out.len() < max && examined < 64 * max.max(1) {
            let Some(h) = self.header(at.chunk)? else {
                at = Cursor { chunk: at.chunk + 1, item: 0 };
                continue;
            };
            let decoded = if changes && at.item < h.n_changes { self.changes_of(at.chunk, &h)? } else { Vec::new() };
            while at.item < h.items() && out.len() < max {
                let i = at.item;
                at.item += 1;
                examined += 1;
                if i < h.n_changes {
                    if changes {
                        out.push((
                            at,
                            Item::Change {
                                source_id: h.source_id.clone(),
                                change: decoded[i as usize].clone(),
                                logged_at_us: h.logged_at_us,
                            },
                        ));
                    }
                } else {
                    out.push((at, Item::Event(h.events[(i - h.n_changes) as usize].clone())));
                }
            }
            if at.item >= h.items() {
                at = Cursor { chunk: at.chunk + 1, item: 0 };
            }
            examined += 1;
        }
        Ok((out, at))
    }

    fn changes_of(&self, offset: u64, h: &ChunkHeader) -> Result<Vec<ChangeEvent>, LogError> {
        let data =
            self.tree.get(key(DATA, offset))?.ok_or_else(|| LogError::Corrupt(offset, "no change data".into()))?;
        let mut out = Vec::with_capacity(h.n_changes as usize);
        let mut rest: &[u8] = &data;
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let raw = rest.get(4..4 + n).ok_or_else(|| LogError::Corrupt(offset, "truncated batch".into()))?;
            rest = &rest[4 + n..];
            let batch = wire::decode_batch(raw).map_err(|e| LogError::Corrupt(offset, e.to_string()))?;
            out.extend(
                batch
                    .changes
                    .into_iter()
                    .filter(|c| c.seq >= h.first_seq && c.seq <= h.last_seq && !h.excluded.contains(&c.seq)),
            );
        }
        if out.len() != h.n_changes as usize {
            return Err(LogError::Corrupt(offset, format!("{} changes, header says {}", out.len(), h.n_changes)));
        }
        Ok(out)
    }

    /// Drops chunks logged before `before_us` and below `keep_from` (the slowest subscription);
    /// returns how many were dropped.
    pub fn prune(&self, before_us: i64, keep_from: u64) -> Result<u64, LogError> {
        let mut dropped = 0;
        for kv in self.tree.scan_prefix([HEADER]) {
            let (k, v) = kv?;
            let offset = u64::from_be_bytes(k[1..9].try_into().expect("9-byte keys"));
            if offset >= keep_from || offset + 1 >= *self.end.borrow() {
                break;
            }
            let h: ChunkHeader = serde_json::from_slice(&v).map_err(|e| LogError::Corrupt(offset, e.to_string()))?;
            if h.logged_at_us >= before_us {
                break;
            }
            let mut batch = sled::Batch::default();
            batch.remove(&key(HEADER, offset));
            batch.remove(&key(DATA, offset));
            self.tree.apply_batch(batch)?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The underlying database, for the subscription state kept beside the log.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

/// Cursor bytes in sled.
pub fn cursor_bytes(c: Cursor) -> [u8; 12] {
    c.to_bytes()
}

/// A cursor from sled bytes.
pub fn cursor_from(b: &[u8]) -> Option<Cursor> {
    Cursor::from_bytes(b)
}
