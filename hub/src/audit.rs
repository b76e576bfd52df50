//! The delivery audit log: who received which citizen's data, when, through which channel and for
//! what purpose (never the data itself), hash-chained so that an edited, inserted or deleted entry
//! is detected.
//!
//! Entries live in the NDC (`dongbo.audit_log`), numbered 1, 2, 3 … without gaps. Each entry's hash
//! is SHA-256 over the previous entry's hash and the entry's own fields; `dongbo.audit_head` holds
//! the last id and hash, and is locked by every append, so several hubs writing at once still form
//! one chain. An entry is written *before* its record leaves the hub: a crash can at worst leave an
//! entry for a record that was never sent (and is then sent, and recorded, again), never a delivery
//! without an entry.

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tracing::warn;

use crate::apply::ApplyError;
use crate::config::NdcConfig;
use crate::fanout::record::{now_micros, rfc3339_micros};

/// One delivery to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Subscription id.
    pub subscription: String,
    /// Subscriber id.
    pub subscriber: String,
    /// Declared purpose.
    pub purpose: String,
    /// `grpc`, `webhook` or `kafka`.
    pub channel: String,
    /// The citizen whose data it is.
    pub citizen_id: String,
    /// The delivered record's id.
    pub event_id: String,
    /// The fields delivered.
    pub fields: Vec<String>,
}

/// A stored entry, as the citizen query and verify read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Position in the chain, from 1.
    pub id: i64,
    /// When, microseconds since the epoch.
    pub at_us: i64,
    /// The delivery.
    pub entry: Entry,
}

/// SQL creating the audit tables; part of the hub's bootstrap.
pub const AUDIT_DDL: &str = "
CREATE TABLE IF NOT EXISTS dongbo.audit_log (
    id bigint PRIMARY KEY,
    at_us bigint NOT NULL,
    at timestamptz NOT NULL,
    subscription text NOT NULL,
    subscriber text NOT NULL,
    purpose text NOT NULL,
    channel text NOT NULL,
    citizen_id text NOT NULL,
    event_id text NOT NULL,
    fields text[] NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL);
CREATE INDEX IF NOT EXISTS audit_log_citizen ON dongbo.audit_log (citizen_id);
CREATE TABLE IF NOT EXISTS dongbo.audit_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_id bigint NOT NULL,
    hash bytea NOT NULL);
INSERT INTO dongbo.audit_head VALUES (true, 0, '\\x') ON CONFLICT DO NOTHING;";

/// The chain hash of an entry given its predecessor's.
pub fn chain_hash(prev: &[u8], id: i64, at_us: i64, e: &Entry) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(id.to_be_bytes());
    h.update(at_us.to_be_bytes());
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    for s in [&e.subscription, &e.subscriber, &e.purpose, &e.channel, &e.citizen_id, &e.event_id]
        .into_iter()
        .chain(e.fields.iter())
    {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    h.update((e.fields.len() as u64).to_be_bytes());
    h.finalize().to_vec()
}

/// Entries written in one transaction at most; more wait for the next.
const GROUP_MAX: usize = 20_000;

/// A request to the writer: entries and where to say they are durable.
struct Append {
    entries: Vec<Entry>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Appends to the audit log through one writer task on its own NDC connection.
///
/// Every subscription worker waits for its entries to be durable before sending, so the writer
/// commits whatever has queued up meanwhile in one transaction (group commit): ten subscribers
/// cost one fsync per round, not ten, and the chain stays one sequence.
pub struct AuditLog {
    requests: mpsc::Sender<Append>,
}

impl AuditLog {
    /// Connects and starts the writer.
    pub async fn connect(ndc: &NdcConfig) -> Result<Self, ApplyError> {
        let client = crate::apply::connect(ndc).await?;
        let (requests, rx) = mpsc::channel(1024);
        tokio::spawn(writer(ndc.clone(), client, rx));
        Ok(Self { requests })
    }

    /// Records `entries` durably, in order; returns once they are committed.
    pub async fn record(&self, entries: &[Entry]) -> Result<(), AuditError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.requests
            .send(Append { entries: entries.to_vec(), done })
            .await
            .map_err(|_| AuditError("the audit writer stopped".into()))?;
        wait.await.map_err(|_| AuditError("the audit writer stopped".into()))?.map_err(AuditError)
    }
}

/// Why entries could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log: {0}")]
pub struct AuditError(String);

async fn writer(ndc: NdcConfig, mut client: Client, mut rx: mpsc::Receiver<Append>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        let mut n = group[0].entries.len();
        while n < GROUP_MAX {
            match rx.try_recv() {
                Ok(more) => {
                    n += more.entries.len();
                    group.push(more);
                }
                Err(_) => break,
            }
        }
        let entries: Vec<&Entry> = group.iter().flat_map(|a| a.entries.iter()).collect();
        let result = append(&mut client, &entries).await.map_err(|e| e.to_string());
        if let Err(e) = &result {
            warn!(error = %e, entries = entries.len(), "audit append failed; reconnecting");
            if let Ok(c) = crate::apply::connect(&ndc).await {
                client = c;
            }
        }
        for a in group {
            let _ = a.done.send(result.clone());
        }
    }
}

/// Appends `entries` to the chain in one transaction.
async fn append(client: &mut Client, entries: &[&Entry]) -> Result<(), tokio_postgres::Error> {
    let txn = client.transaction().await?;
    let head = txn.query_one("SELECT last_id, hash FROM dongbo.audit_head FOR UPDATE", &[]).await?;
    let (mut id, mut prev): (i64, Vec<u8>) = (head.get(0), head.get(1));
    let at_us = now_micros();
    let at = rfc3339_micros(at_us);
    let n = entries.len();
    let (mut ids, mut prevs, mut hashes) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for e in entries {
        id += 1;
        let hash = chain_hash(&prev, id, at_us, e);
        ids.push(id);
        prevs.push(std::mem::replace(&mut prev, hash.clone()));
        hashes.push(hash);
    }
    let col = |f: fn(&Entry) -> &String| entries.iter().map(|e| f(e).as_str()).collect::<Vec<&str>>();
    // Postgres arrays of arrays must be rectangular, so the field lists travel as joined text.
    let fields: Vec<String> = entries.iter().map(|e| e.fields.join("\u{1f}")).collect();
    let (subs, subscribers, purposes, channels, citizens, events) = (
        col(|e| &e.subscription),
        col(|e| &e.subscriber),
        col(|e| &e.purpose),
        col(|e| &e.channel),
        col(|e| &e.citizen_id),
        col(|e| &e.event_id),
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] =
        [&ids, &at_us, &at, &subs, &subscribers, &purposes, &channels, &citizens, &events, &fields, &prevs, &hashes];
    let head_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &prev];
    let insert = txn.execute(
        "INSERT INTO dongbo.audit_log \
         (id, at_us, at, subscription, subscriber, purpose, channel, citizen_id, event_id, fields, prev_hash, hash) \
         SELECT i, $2, $3::text::timestamptz, s, sb, p, c, ci, e, \
                CASE WHEN f = '' THEN '{}'::text[] ELSE string_to_array(f, E'\\x1f') END, ph, h \
         FROM unnest($1::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
                     $10::text[], $11::bytea[], $12::bytea[]) AS u(i, s, sb, p, c, ci, e, f, ph, h)",
        &params,
    );
    let head = txn.execute("UPDATE dongbo.audit_head SET last_id = $1, hash = $2", &head_params);
    // Both statements go out together (the connection pipelines them); the commit waits for both.
    tokio::try_join!(insert, head)?;
    txn.commit().await
}

/// The outcome of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries checked.
    pub entries: i64,
    /// The first broken link: entry id and what is wrong with it.
    pub first_broken: Option<(i64, String)>,
}

/// Walks the whole chain and reports the first entry that does not hold.
pub async fn verify(client: &Client) -> Result<Verification, tokio_postgres::Error> {
    let head = client.query_one("SELECT last_id, hash FROM dongbo.audit_head", &[]).await?;
    let (last_id, head_hash): (i64, Vec<u8>) = (head.get(0), head.get(1));
    let mut prev: Vec<u8> = Vec::new();
    let mut expected = 1i64;
    // Pages keep memory flat on chains of millions of entries.
    loop {
        let rows = client
            .query(
                "SELECT id, at_us, subscription, subscriber, purpose, channel, citizen_id, event_id, fields, \
                 prev_hash, hash FROM dongbo.audit_log WHERE id >= $1 ORDER BY id LIMIT 10000",
                &[&expected],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            let id: i64 = r.get(0);
            if id != expected {
                let what = format!("entry {expected} is missing (deleted); the chain resumes at {id}");
                return Ok(Verification { entries: expected - 1, first_broken: Some((expected, what)) });
            }
            let e = Entry {
                subscription: r.get(2),
                subscriber: r.get(3),
                purpose: r.get(4),
                channel: r.get(5),
                citizen_id: r.get(6),
                event_id: r.get(7),
                fields: r.get(8),
            };
            let (stored_prev, stored): (Vec<u8>, Vec<u8>) = (r.get(9), r.get(10));
            if stored_prev != prev {
                let what = format!("entry {id} does not link to entry {}: an entry was inserted or replaced", id - 1);
                return Ok(Verification { entries: id - 1, first_broken: Some((id, what)) });
            }
            if chain_hash(&prev, id, r.get(1), &e) != stored {
                let what = format!("entry {id} was edited: its content does not match its hash");
                return Ok(Verification { entries: id - 1, first_broken: Some((id, what)) });
            }
            prev = stored;
            expected += 1;
        }
    }
    let checked = expected - 1;
    if checked != last_id || (last_id > 0 && prev != head_hash) {
        let what =
            format!("the chain ends at entry {checked} but the head says {last_id}: entries were deleted at the end");
        return Ok(Verification { entries: checked, first_broken: Some((checked + 1, what)) });
    }
    Ok(Verification { entries: checked, first_broken: None })
}

/// Every delivery of `citizen_id`'s data, oldest first.
pub async fn citizen_deliveries(client: &Client, citizen_id: &str) -> Result<Vec<Stored>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, at_us, subscription, subscriber, purpose, channel, citizen_id, event_id, fields \
             FROM dongbo.audit_log WHERE citizen_id = $1 ORDER BY id",
            &[&citizen_id],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Stored {
            id: r.get(0),
            at_us: r.get(1),
            entry: Entry {
                subscription: r.get(2),
                subscriber: r.get(3),
                purpose: r.get(4),
                channel: r.get(5),
                citizen_id: r.get(6),
                event_id: r.get(7),
                fields: r.get(8),
            },
        })
        .collect())
}
