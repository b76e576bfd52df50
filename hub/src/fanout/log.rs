//! The hub's retained, replayable log of applied changes and domain events, on local disk.
//!
//! One *chunk* per NDC transaction: a header (source, seq range, seqs not applied, the events
//! raised, when logged) and the agent's batches verbatim, so logging re-encodes no change. Chunks
//! are written to append-only segment files ([`Segments`]) and fsynced; sled holds only a small
//! index entry per chunk (where it is, when it was logged) and each source's logged seq, because
//! sled keeps every value it ever wrote in memory and a week of retention must not live in RAM. Chunk
//! offsets count up from 1; inside a chunk, items are its applied changes in seq order and then its
//! events, so a position in the log is `(chunk, item)`, printed `chunk.item` as a resume token.
//!
//! A truncate of a national table empties only one agent's rows, so it is logged with the keys it
//! removed (after the batches, one protobuf row of keys per such truncate) and read as a delete of
//! each, in key order, sharing the truncate's seq and told apart by their `part`. The keys are kept
//! [`KEYS_PER_ROW`] to a row, and a read opens only the rows of the items it returns, so paging
//! through the truncate of a whole province costs each page its own keys, not the province's.
//!
//! Appending is idempotent per source: the source's last logged seq is written in the same atomic
//! sled batch as the chunk, and a chunk only takes seqs above it. The ingest path appends after the
//! NDC commit and before acknowledging the agent, so everything in the log is applied, and a hub
//! that dies between the two logs the changes on the replay the missing acknowledgement causes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dongbo_connectors::model::{ChangeBatch, ChangeEvent, Operation, Value};
use dongbo_connectors::segments::{Location, Segments, SEGMENT_BYTES};
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
    /// A segment file could not be written or read.
    #[error("fan-out log segment I/O failed: {0}; check the disk holding fanout.data_dir")]
    Segment(#[from] std::io::Error),
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
    /// Events raised by the chunk's changes, in seq order (shared with readers, never copied).
    pub events: Vec<Arc<DomainEvent>>,
    /// When the chunk was logged, microseconds since the epoch.
    pub logged_at_us: i64,
    /// National truncates read as deletes: each one's seq and how many keys it removed, in the
    /// order their key rows follow the batches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<(u64, u32)>,
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
        /// For a delete a national truncate is read as, which of its deletes (their event ids differ
        /// by it).
        part: Option<u32>,
        /// When it was logged.
        logged_at_us: i64,
    },
    /// A domain event.
    Event(Arc<DomainEvent>),
}

/// What one append logs.
pub struct Append<'a> {
    /// The source.
    pub source_id: &'a str,
    /// The stream the batches came on (the source's gRPC stream or one Kafka partition): appends
    /// are idempotent per stream by seq.
    pub stream: &'a str,
    /// For a Kafka partition, the offset after the last message of these batches.
    pub next_offset: Option<i64>,
    /// The stream's seq after this append is at least this, batches or not: what recovering events
    /// from the NDC outbox alone logs up to.
    pub upto: u64,
    /// The batches of the transaction, decoded and encoded (as received, or as mapped).
    pub batches: Vec<(&'a ChangeBatch, &'a [u8])>,
    /// Seqs of these batches that were not applied.
    pub excluded: Vec<u64>,
    /// The keys each national truncate among them removed, by seq: logged as a delete of each.
    pub removed: BTreeMap<u64, Vec<String>>,
    /// Events their changes raised (including events recovered from the outbox).
    pub events: Vec<DomainEvent>,
}

/// Keys of a national truncate per stored row (see the module doc).
pub const KEYS_PER_ROW: usize = 10_000;

/// Index entries, by chunk offset.
const INDEX: u8 = b'i';
/// Logged seq (and Kafka offset), by stream.
const SOURCE: u8 = b's';

/// Where a chunk lives and when it was logged: what sled keeps per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    at: Location,
    header_len: u32,
    logged_at_us: i64,
}

impl IndexEntry {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&self.at.segment.to_be_bytes());
        b[8..16].copy_from_slice(&self.at.offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.at.len.to_be_bytes());
        b[20..24].copy_from_slice(&self.header_len.to_be_bytes());
        b[24..].copy_from_slice(&self.logged_at_us.to_be_bytes());
        b
    }

    fn decode(offset: u64, b: &[u8]) -> Result<Self, LogError> {
        let bad = || LogError::Corrupt(offset, "index entry is not 32 bytes".into());
        let u64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes);
        let u32_at = |i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes);
        if b.len() != 32 {
            return Err(bad());
        }
        Ok(Self {
            at: Location {
                segment: u64_at(0).ok_or_else(bad)?,
                offset: u64_at(8).ok_or_else(bad)?,
                len: u32_at(16).ok_or_else(bad)?,
            },
            header_len: u32_at(20).ok_or_else(bad)?,
            logged_at_us: u64_at(24).ok_or_else(bad)? as i64,
        })
    }

    /// The header's bytes in the segment.
    fn header(&self) -> Location {
        Location { len: self.header_len, ..self.at }
    }

    /// The batches' bytes in the segment.
    fn data(&self) -> Location {
        Location { offset: self.at.offset + u64::from(self.header_len), len: self.at.len - self.header_len, ..self.at }
    }
}

fn stream_key(stream: &str) -> Vec<u8> {
    let mut k = vec![SOURCE];
    k.extend_from_slice(stream.as_bytes());
    k
}

fn stream_value(seq: u64, offset: Option<i64>) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

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
    recent: std::sync::Mutex<RecentHeaders>,
    segments: Arc<std::sync::Mutex<Segments>>,
}

/// Weight (events, plus one per chunk) the decoded-header cache holds at most.
const RECENT_WEIGHT: usize = 50_000;

/// Decoded headers of the chunks read last. Live subscribers all read the chunk just appended, and
/// subscribers catching up often read the same old chunks; without this each would decode the same
/// JSON header (and its events) again.
#[derive(Default)]
struct RecentHeaders {
    by_offset: HashMap<u64, (Arc<ChunkHeader>, u64)>,
    weight: usize,
    tick: u64,
}

impl RecentHeaders {
    fn weight(h: &ChunkHeader) -> usize {
        1 + h.events.len()
    }

    fn get(&mut self, offset: u64) -> Option<Arc<ChunkHeader>> {
        self.tick += 1;
        let tick = self.tick;
        self.by_offset.get_mut(&offset).map(|(h, used)| {
            *used = tick;
            h.clone()
        })
    }

    fn insert(&mut self, offset: u64, h: Arc<ChunkHeader>) {
        self.tick += 1;
        self.weight += Self::weight(&h);
        if let Some((old, _)) = self.by_offset.insert(offset, (h, self.tick)) {
            self.weight -= Self::weight(&old);
        }
        // Least recently used out, never the one just added.
        while self.weight > RECENT_WEIGHT && self.by_offset.len() > 1 {
            let Some((&victim, _)) =
                self.by_offset.iter().filter(|(&o, _)| o != offset).min_by_key(|(_, (_, used))| *used)
            else {
                break;
            };
            self.remove(victim);
        }
    }

    fn remove(&mut self, offset: u64) {
        if let Some((old, _)) = self.by_offset.remove(&offset) {
            self.weight -= Self::weight(&old);
        }
    }
}

impl FanoutLog {
    /// Opens (or creates) the log: its index inside `db`, its segment files in `segment_dir`.
    pub fn open(db: sled::Db, segment_dir: &std::path::Path) -> Result<Arc<Self>, LogError> {
        let tree = db.open_tree("log")?;
        let next = match tree.scan_prefix([INDEX]).next_back() {
            Some(kv) => u64::from_be_bytes(kv?.0[1..9].try_into().expect("9-byte keys")) + 1,
            None => 1,
        };
        let segments = Segments::open(segment_dir, SEGMENT_BYTES)?;
        let (end, _) = watch::channel(next);
        let log = Arc::new(Self {
            db,
            tree,
            next: Mutex::new(next),
            end,
            recent: Default::default(),
            segments: Arc::new(std::sync::Mutex::new(segments)),
        });
        // Segments a crash left behind after their chunks were pruned.
        log.release_segments()?;
        Ok(log)
    }

    fn entry(&self, offset: u64) -> Result<Option<IndexEntry>, LogError> {
        self.tree.get(key(INDEX, offset))?.map(|v| IndexEntry::decode(offset, &v)).transpose()
    }

    fn read_at(&self, at: Location) -> Result<Vec<u8>, LogError> {
        Ok(self.segments.lock().map_err(|_| std::io::Error::other("segment lock poisoned"))?.read(at)?)
    }

    fn release_segments(&self) -> Result<(), LogError> {
        let oldest = match self.tree.scan_prefix([INDEX]).next() {
            Some(kv) => {
                let (k, v) = kv?;
                let offset = u64::from_be_bytes(k[1..9].try_into().expect("9-byte keys"));
                Some(IndexEntry::decode(offset, &v)?.at.segment)
            }
            None => None,
        };
        self.segments.lock().map_err(|_| std::io::Error::other("segment lock poisoned"))?.release_before(oldest)?;
        Ok(())
    }

    /// The last seq of `stream` in the log, if the log has seen the stream.
    pub fn logged_seq(&self, stream: &str) -> Result<Option<u64>, LogError> {
        Ok(self.logged_position(stream)?.map(|(seq, _)| seq))
    }

    /// The last seq of `stream` in the log and, for a Kafka partition, the offset after it.
    pub fn logged_position(&self, stream: &str) -> Result<Option<(u64, Option<i64>)>, LogError> {
        let Some(v) = self.tree.get(stream_key(stream))? else { return Ok(None) };
        let seq = v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
        let offset = v.get(8..16).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes);
        Ok(Some((seq, offset)))
    }

    /// Appends a chunk and makes it durable; returns the source's logged seq after it.
    pub async fn append(&self, a: Append<'_>) -> Result<u64, LogError> {
        let mut next = self.next.lock().await;
        let (logged, logged_offset) = self.logged_position(a.stream)?.unwrap_or((0, None));
        let last_seq = a.batches.iter().map(|(b, _)| b.last_seq()).max().unwrap_or(0).max(a.upto);
        if last_seq <= logged {
            if a.next_offset > logged_offset {
                // Nothing new to log, but the offset moves on so a restart does not reread these.
                self.tree.insert(stream_key(a.stream), stream_value(logged, a.next_offset))?;
            }
            return Ok(logged);
        }
        let first_seq = logged + 1;
        let logged_changes = || {
            a.batches
                .iter()
                .flat_map(|(b, _)| &b.changes)
                .filter(|c| c.seq >= first_seq && !a.excluded.contains(&c.seq))
        };
        let removed: Vec<(u64, &Vec<String>)> = logged_changes()
            .filter(|c| c.op == Operation::Truncate)
            .filter_map(|c| a.removed.get(&c.seq).map(|keys| (c.seq, keys)))
            .collect();
        let n_changes =
            (logged_changes().count() - removed.len() + removed.iter().map(|(_, k)| k.len()).sum::<usize>()) as u32;
        let events: Vec<Arc<DomainEvent>> = a.events.into_iter().filter(|e| e.seq >= first_seq).map(Arc::new).collect();
        if n_changes == 0 && events.is_empty() {
            // Nothing a reader would see: only the stream's position moves.
            self.tree.insert(stream_key(a.stream), stream_value(last_seq, a.next_offset.or(logged_offset)))?;
            self.db.flush_async().await?;
            return Ok(last_seq);
        }
        let header = ChunkHeader {
            source_id: a.source_id.into(),
            first_seq,
            last_seq,
            excluded: a.excluded,
            n_changes,
            events,
            logged_at_us: now_micros(),
            removed: removed.iter().map(|(seq, keys)| (*seq, keys.len() as u32)).collect(),
        };
        let mut data = Vec::new();
        let key_rows = removed.iter().flat_map(|(_, keys)| keys.chunks(KEYS_PER_ROW)).map(|keys| {
            let values: Vec<Value> = keys.iter().map(|k| Value::Text(k.clone())).collect();
            wire::encode_values(&values)
        });
        for raw in a.batches.iter().map(|(_, raw)| std::borrow::Cow::Borrowed(*raw)).chain(key_rows.map(Into::into)) {
            data.extend_from_slice(&(raw.len() as u32).to_be_bytes());
            data.extend_from_slice(&raw);
        }
        let mut payload = serde_json::to_vec(&header).expect("headers serialise");
        let header_len = payload.len() as u32;
        if n_changes > 0 {
            payload.extend_from_slice(&data);
        }
        let (segments, offset) = (self.segments.clone(), *next);
        // Sequential write + fsync: blocking I/O, kept off the async workers.
        let at = tokio::task::spawn_blocking(move || {
            segments.lock().map_err(|_| std::io::Error::other("segment lock poisoned"))?.append(offset, &payload)
        })
        .await
        .map_err(std::io::Error::other)??;
        let entry = IndexEntry { at, header_len, logged_at_us: header.logged_at_us };
        let mut batch = sled::Batch::default();
        batch.insert(&key(INDEX, *next), &entry.encode());
        batch.insert(stream_key(a.stream), stream_value(last_seq, a.next_offset));
        self.tree.apply_batch(batch)?;
        self.db.flush_async().await?;
        self.recent.lock().expect("cache lock").insert(*next, Arc::new(header));
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
        Ok(match self.tree.scan_prefix([INDEX]).next() {
            Some(kv) => u64::from_be_bytes(kv?.0[1..9].try_into().expect("9-byte keys")),
            None => *self.end.borrow(),
        })
    }

    fn header(&self, offset: u64) -> Result<Option<Arc<ChunkHeader>>, LogError> {
        if let Some(h) = self.recent.lock().expect("cache lock").get(offset) {
            return Ok(Some(h));
        }
        let Some(entry) = self.entry(offset)? else { return Ok(None) };
        let v = self.read_at(entry.header())?;
        let h: Arc<ChunkHeader> =
            Arc::new(serde_json::from_slice(&v).map_err(|e| LogError::Corrupt(offset, e.to_string()))?);
        self.recent.lock().expect("cache lock").insert(offset, h.clone());
        Ok(Some(h))
    }

    /// Where a new subscription starting at `start` begins.
    pub fn start_cursor(&self, start: Start) -> Result<Cursor, LogError> {
        let chunk = match start {
            Start::Now => *self.end.borrow(),
            Start::Beginning => self.first()?,
            Start::At(t) => {
                let mut found = *self.end.borrow();
                for kv in self.tree.scan_prefix([INDEX]) {
                    let (k, v) = kv?;
                    let offset = u64::from_be_bytes(k[1..9].try_into().expect("9-byte keys"));
                    if IndexEntry::decode(offset, &v)?.logged_at_us >= t {
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
            // Only the changes this call returns are decoded.
            let want = at.item..h.n_changes.min(at.item.saturating_add((max - out.len()) as u32));
            let first = want.start;
            let decoded = if changes && !want.is_empty() { self.changes_of(at.chunk, &h, want)? } else { Vec::new() };
            while at.item < h.items() && out.len() < max {
                let i = at.item;
                at.item += 1;
                examined += 1;
                if i < h.n_changes {
                    if changes {
                        let (part, change) = decoded[(i - first) as usize].clone();
                        out.push((
                            at,
                            Item::Change { source_id: h.source_id.clone(), change, part, logged_at_us: h.logged_at_us },
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

    /// The chunk's changes with item numbers in `want` (deletes a national truncate is read as
    /// counted one each), with their part.
    fn changes_of(
        &self,
        offset: u64,
        h: &ChunkHeader,
        want: std::ops::Range<u32>,
    ) -> Result<Vec<(Option<u32>, ChangeEvent)>, LogError> {
        let corrupt = |what: String| LogError::Corrupt(offset, what);
        let entry = self.entry(offset)?.ok_or_else(|| corrupt("no index entry".into()))?;
        let data = self.read_at(entry.data())?;
        let mut entries = Vec::new();
        let mut rest: &[u8] = &data;
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            entries.push(rest.get(4..4 + n).ok_or_else(|| corrupt("truncated batch".into()))?);
            rest = &rest[4 + n..];
        }
        // Each truncate's count of keys and its first key row.
        let mut truncates: HashMap<u64, (u32, usize)> = HashMap::new();
        let mut key_rows = 0;
        for &(seq, count) in &h.removed {
            truncates.insert(seq, (count, key_rows));
            key_rows += (count as usize).div_ceil(KEYS_PER_ROW);
        }
        let batches = entries.len().checked_sub(key_rows).ok_or_else(|| corrupt("missing key rows".into()))?;
        let (key_entries, batch_entries) = (&entries[batches..], &entries[..batches]);
        let mut opened: HashMap<usize, Vec<Value>> = HashMap::new();
        let mut out = Vec::with_capacity(want.len());
        let mut item = 0u32;
        'batches: for raw in batch_entries {
            let batch = wire::decode_batch(raw).map_err(|e| corrupt(e.to_string()))?;
            let logged = batch
                .changes
                .into_iter()
                .filter(|c| c.seq >= h.first_seq && c.seq <= h.last_seq && !h.excluded.contains(&c.seq));
            for c in logged {
                if item >= want.end {
                    break 'batches;
                }
                let Some(&(count, first_row)) = truncates.get(&c.seq).filter(|_| c.op == Operation::Truncate) else {
                    if item >= want.start {
                        out.push((None, c));
                    }
                    item += 1;
                    continue;
                };
                let parts = want.start.saturating_sub(item).min(count)..(want.end - item).min(count);
                for part in parts {
                    let row = first_row + part as usize / KEYS_PER_ROW;
                    let keys = match opened.entry(row) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let raw = key_entries.get(row).ok_or_else(|| corrupt(format!("no key row {row}")))?;
                            e.insert(wire::decode_row(raw).map_err(|e| corrupt(e.to_string()))?)
                        }
                    };
                    let key = keys
                        .get(part as usize % KEYS_PER_ROW)
                        .cloned()
                        .ok_or_else(|| corrupt(format!("truncate {} has no key {part}", c.seq)))?;
                    let delete =
                        ChangeEvent { op: Operation::Delete, key: vec![key], before: None, after: None, ..c.clone() };
                    out.push((Some(part), delete));
                }
                item += count;
            }
        }
        if out.len() != want.len() {
            return Err(corrupt(format!("{} of changes {want:?} found, header says {}", out.len(), h.n_changes)));
        }
        Ok(out)
    }

    /// Drops chunks logged before `before_us` and below `keep_from` (the slowest subscription);
    /// returns how many were dropped.
    pub fn prune(&self, before_us: i64, keep_from: u64) -> Result<u64, LogError> {
        let mut dropped = 0;
        for kv in self.tree.scan_prefix([INDEX]) {
            let (k, v) = kv?;
            let offset = u64::from_be_bytes(k[1..9].try_into().expect("9-byte keys"));
            if offset >= keep_from || offset + 1 >= *self.end.borrow() {
                break;
            }
            if IndexEntry::decode(offset, &v)?.logged_at_us >= before_us {
                break;
            }
            self.tree.remove(key(INDEX, offset))?;
            self.recent.lock().expect("cache lock").remove(offset);
            dropped += 1;
        }
        if dropped > 0 {
            // The index must forget a chunk before its segment goes.
            self.db.flush()?;
            self.release_segments()?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc as StdArc;

    /// Opens the sled database at `dir` again. sled lets go of its file lock only once its
    /// flusher thread has seen the last handle dropped, a moment after `drop`: on a loaded machine
    /// the first attempt can find it still held.
    fn reopen(dir: &std::path::Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("cannot reopen {}: {e}", dir.display()),
            }
        }
    }

    use dongbo_connectors::model::{Column, Lsn, Operation, Position, TableId, TableSchema, Value};
    use serde_json::Map;

    use super::*;

    fn header_with(events: usize) -> Arc<ChunkHeader> {
        let e = DomainEvent {
            event_id: "s:1:e".into(),
            event: "e".into(),
            source_id: "s".into(),
            seq: 1,
            citizen_id: "1".into(),
            effective_at_us: 0,
            payload: Map::new(),
        };
        Arc::new(ChunkHeader {
            source_id: "s".into(),
            first_seq: 1,
            last_seq: 1,
            excluded: vec![],
            n_changes: 0,
            events: (0..events).map(|_| Arc::new(e.clone())).collect(),
            logged_at_us: 0,
            removed: vec![],
        })
    }

    #[test]
    fn the_header_cache_stays_within_its_weight_and_drops_the_least_recently_read() {
        let mut r = RecentHeaders::default();
        let big = RECENT_WEIGHT / 3 - 1;
        for offset in 1..=3 {
            r.insert(offset, header_with(big));
        }
        assert!(r.get(1).is_some(), "three fit");
        // A fourth does not fit: 2 was read least recently (1 was just read), so 2 goes.
        r.insert(4, header_with(big));
        assert!(r.weight <= RECENT_WEIGHT);
        assert!(r.get(2).is_none());
        assert!(r.get(1).is_some() && r.get(3).is_some() && r.get(4).is_some());
        // One header heavier than the whole budget is still kept: it is the one being read.
        r.insert(5, header_with(RECENT_WEIGHT * 2));
        assert_eq!(r.by_offset.len(), 1);
        assert!(r.get(5).is_some());
        r.remove(5);
        assert_eq!((r.by_offset.len(), r.weight), (0, 0));
    }

    fn batch(source: &str, seqs: std::ops::RangeInclusive<u64>) -> (ChangeBatch, Vec<u8>) {
        let schema = StdArc::new(TableSchema::new(
            TableId::new("public", "citizens"),
            vec![Column { name: "citizen_id".into(), type_name: "text".into(), type_oid: 25 }],
            vec![0],
        ));
        let changes = seqs
            .map(|seq| ChangeEvent {
                seq,
                table: schema.clone(),
                op: Operation::Insert,
                key: vec![Value::Text(format!("{seq:012}"))],
                before: None,
                after: Some(vec![Value::Text(format!("{seq:012}"))]),
                position: Position::Postgres(Lsn(seq)),
                commit_time_us: 0,
                txid: seq,
                txn_order: 0,
                txn_last: true,
            })
            .collect();
        let b = ChangeBatch { source_id: source.into(), changes };
        let raw = wire::encode_batch(b.clone());
        (b, raw)
    }

    fn event(seq: u64) -> DomainEvent {
        DomainEvent {
            event_id: format!("s:{seq}:e"),
            event: "e".into(),
            source_id: "s".into(),
            seq,
            citizen_id: format!("{seq:012}"),
            effective_at_us: 0,
            payload: Map::new(),
        }
    }

    /// `b` with its change at `i` a truncate, and its bytes.
    fn truncating(mut b: ChangeBatch, i: usize) -> (ChangeBatch, Vec<u8>) {
        b.changes[i].op = Operation::Truncate;
        b.changes[i].key.clear();
        b.changes[i].after = None;
        let raw = wire::encode_batch(&b);
        (b, raw)
    }

    fn borrowed(batches: &[(ChangeBatch, Vec<u8>)]) -> Vec<(&ChangeBatch, &[u8])> {
        batches.iter().map(|(b, raw)| (b, raw.as_slice())).collect()
    }

    fn seqs(items: &[(Cursor, Item)]) -> Vec<String> {
        items
            .iter()
            .map(|(_, i)| match i {
                Item::Change { change, .. } => format!("c{}", change.seq),
                Item::Event(e) => format!("e{}", e.seq),
            })
            .collect()
    }

    #[tokio::test]
    async fn appends_are_idempotent_reads_resume_anywhere_and_retention_spares_the_slowest() {
        let dir = std::env::temp_dir().join(format!("dongbo-log-test-{}", rand_suffix()));
        let log = FanoutLog::open(sled::Config::new().path(&dir).open().unwrap(), &dir.join("segments")).unwrap();
        let b1: &'static [(ChangeBatch, Vec<u8>)] = Box::leak(Box::new([batch("s", 1..=3)]));
        let a = |batches: &'static [(ChangeBatch, Vec<u8>)], excluded: Vec<u64>, events: Vec<DomainEvent>| Append {
            source_id: "s",
            stream: "s",
            next_offset: None,
            batches: borrowed(batches),
            excluded,
            removed: BTreeMap::new(),
            events,
            upto: 0,
        };
        assert_eq!(log.append(a(b1, vec![2], vec![event(3)])).await.unwrap(), 3);
        // The same batches again (an agent resending after a lost ack) log nothing.
        assert_eq!(log.append(a(b1, vec![2], vec![event(3)])).await.unwrap(), 3);
        // Overlapping batches log only what is new.
        let b2: &'static [(ChangeBatch, Vec<u8>)] = Box::leak(Box::new([batch("s", 3..=5)]));
        assert_eq!(log.append(a(b2, vec![], vec![event(3), event(5)])).await.unwrap(), 5);
        assert_eq!(*log.end().borrow(), 3, "two chunks");

        let (all, end) = log.read(Cursor { chunk: 1, item: 0 }, 100, true).unwrap();
        assert_eq!(seqs(&all), vec!["c1", "c3", "e3", "c4", "c5", "e5"]);
        assert_eq!(end, Cursor { chunk: 3, item: 0 });
        // Resuming after any item continues right after it; without changes, only events.
        let (rest, _) = log.read(all[1].0, 100, true).unwrap();
        assert_eq!(seqs(&rest), vec!["e3", "c4", "c5", "e5"]);
        let (events, _) = log.read(Cursor { chunk: 1, item: 0 }, 100, false).unwrap();
        assert_eq!(seqs(&events), vec!["e3", "e5"]);
        let (page, next) = log.read(Cursor { chunk: 1, item: 0 }, 2, true).unwrap();
        assert_eq!(seqs(&page), vec!["c1", "c3"]);
        assert_eq!(next, all[1].0);

        // Retention drops old chunks, but not one a subscription still needs, nor the newest.
        assert_eq!(log.prune(now_micros() + 1, 1).unwrap(), 0);
        assert_eq!(log.prune(now_micros() + 1, u64::MAX).unwrap(), 1);
        assert_eq!(log.first().unwrap(), 2);
        assert_eq!(log.start_cursor(Start::Beginning).unwrap(), Cursor { chunk: 2, item: 0 });
        assert_eq!(log.start_cursor(Start::Now).unwrap(), Cursor { chunk: 3, item: 0 });
        assert_eq!(log.start_cursor(Start::At(0)).unwrap(), Cursor { chunk: 2, item: 0 });
        let (after_prune, _) = log.read(Cursor { chunk: 1, item: 1 }, 100, true).unwrap();
        assert_eq!(seqs(&after_prune), vec!["c4", "c5", "e5"], "a cursor behind retention starts at the oldest kept");
        drop(log);
        // Offsets keep counting after a reopen.
        let log = FanoutLog::open(reopen(&dir), &dir.join("segments")).unwrap();
        assert_eq!(*log.end().borrow(), 3);
        assert_eq!(log.logged_seq("s").unwrap(), Some(5));

        // A Kafka partition's stream: its offset is kept beside its seq, events recovered from the
        // outbox alone log up to `upto`, and a run with nothing new still moves the offset on.
        let p = |batches: &'static [(ChangeBatch, Vec<u8>)], events: Vec<DomainEvent>, next_offset, upto| Append {
            source_id: "s",
            stream: "s@t/0",
            next_offset: Some(next_offset),
            batches: borrowed(batches),
            excluded: vec![],
            removed: BTreeMap::new(),
            events,
            upto,
        };
        assert_eq!(log.append(p(&[], vec![event(7)], 10, 8)).await.unwrap(), 8);
        assert_eq!(log.logged_position("s@t/0").unwrap(), Some((8, Some(10))));
        let (recovered, _) = log.read(Cursor { chunk: 3, item: 0 }, 100, true).unwrap();
        assert_eq!(seqs(&recovered), vec!["e7"]);
        let again: &'static [(ChangeBatch, Vec<u8>)] = Box::leak(Box::new([batch("s", 6..=8)]));
        assert_eq!(log.append(p(again, vec![], 14, 0)).await.unwrap(), 8);
        assert_eq!(log.logged_position("s@t/0").unwrap(), Some((8, Some(14))));
        assert_eq!(log.logged_seq("s").unwrap(), Some(5), "streams are apart");
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_truncate_logged_with_its_removed_keys_reads_as_a_delete_of_each() {
        let dir = std::env::temp_dir().join(format!("dongbo-log-truncate-{}", rand_suffix()));
        let log = FanoutLog::open(sled::Config::new().path(&dir).open().unwrap(), &dir.join("segments")).unwrap();
        let (b, raw) = truncating(batch("s", 1..=3).0, 1);
        let removed =
            BTreeMap::from([(2, vec!["k1".to_string(), "k2".into()]), (9, vec!["not in these batches".into()])]);
        let append = Append {
            source_id: "s",
            stream: "s",
            next_offset: None,
            batches: vec![(&b, raw.as_slice())],
            excluded: vec![],
            removed,
            events: vec![event(2)],
            upto: 0,
        };
        assert_eq!(log.append(append).await.unwrap(), 3);
        let read = |log: &FanoutLog| {
            let (items, _) = log.read(Cursor { chunk: 1, item: 0 }, 100, true).unwrap();
            items
                .into_iter()
                .map(|(_, i)| match i {
                    Item::Change { change, part, .. } => {
                        format!("{:?} {} {part:?} {:?}", change.op, change.seq, change.key)
                    }
                    Item::Event(e) => format!("event {}", e.seq),
                })
                .collect::<Vec<_>>()
        };
        let expected = [
            "Insert 1 None [Text(\"000000000001\")]",
            "Delete 2 Some(0) [Text(\"k1\")]",
            "Delete 2 Some(1) [Text(\"k2\")]",
            "Insert 3 None [Text(\"000000000003\")]",
            "event 2",
        ];
        assert_eq!(read(&log), expected);
        // Read from disk, not the header cache: the same.
        drop(log);
        let log = FanoutLog::open(reopen(&dir), &dir.join("segments")).unwrap();
        assert_eq!(read(&log), expected);

        // A truncate of more keys than a row holds, read a page at a time from anywhere.
        let (b, raw) = truncating(batch("s", 4..=5).0, 0);
        let n = 2 * KEYS_PER_ROW + 3;
        let keys: Vec<String> = (0..n).map(|i| format!("{i:012}")).collect();
        let append = Append {
            source_id: "s",
            stream: "s",
            next_offset: None,
            batches: vec![(&b, raw.as_slice())],
            excluded: vec![],
            removed: BTreeMap::from([(4, keys.clone())]),
            events: vec![],
            upto: 0,
        };
        assert_eq!(log.append(append).await.unwrap(), 5);
        let mut at = Cursor { chunk: 2, item: 0 };
        let mut got = Vec::new();
        while at.chunk < 3 {
            let (page, next) = log.read(at, 997, true).unwrap();
            got.extend(page.into_iter().map(|(_, i)| match i {
                Item::Change { change, part, .. } => (change.seq, part, change.key),
                Item::Event(_) => unreachable!("no events"),
            }));
            at = next;
        }
        assert_eq!(got.len(), n + 1);
        for (i, (seq, part, key)) in got[..n].iter().enumerate() {
            assert_eq!((*seq, *part, key), (4, Some(i as u32), &vec![Value::Text(keys[i].clone())]));
        }
        assert_eq!((got[n].0, got[n].1), (5, None));
        let (page, _) = log.read(Cursor { chunk: 2, item: KEYS_PER_ROW as u32 - 1 }, 2, true).unwrap();
        let parts: Vec<_> =
            page.iter().map(|(c, i)| (c.item, matches!(i, Item::Change { part: Some(_), .. }))).collect();
        assert_eq!(parts, [(KEYS_PER_ROW as u32, true), (KEYS_PER_ROW as u32 + 1, true)], "across two key rows");
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }
}
