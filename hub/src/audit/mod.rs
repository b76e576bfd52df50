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
//!
//! # Threat model
//! The chain lives in the NDC, so it is read by [`verify`] with two outside anchors: the ids must run
//! 1…head with no gap and no stray (an entry with id −7 or past the head is reported), and the chain
//! must hold every Ed25519-signed [`checkpoint`] the hub appended to its checkpoint directory (and
//! witness) at a fixed interval. A DBA with write access to the NDC, but not to the hub host's key
//! file and checkpoint directory, therefore cannot undetected:
//! - edit, delete or insert an entry anywhere (the links or the ids break);
//! - rewrite the chain consistently at or before the last checkpoint (the checkpoint's hash no
//!   longer matches), or cut entries off its end (the checkpoint saw a later head).
//!
//! What such a DBA *can* do undetected: rewrite or drop entries newer than the last checkpoint
//! (at most one `checkpoint_interval_s` of deliveries, and the checkpointer refuses to sign a chain
//! that no longer links onto its previous checkpoint, which it reports), and stop the hub from
//! writing entries at all (visible as missing checkpoints and an audit writer that fails). Whoever
//! also controls the hub host (the key file and checkpoint directory) can rewrite everything unless
//! a witness URL run by another party keeps copies of the checkpoints. The citizen query reports
//! only entries inside the verified chain.

pub mod checkpoint;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, IsolationLevel, Transaction};
use tracing::warn;

pub use self::checkpoint::{Checkpoint, CheckpointStore};

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
        crate::metrics::hub().set_audit_queue(self.requests.max_capacity() - self.requests.capacity());
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

/// The outside anchor of the chain: the checkpoint store and the key that signs it.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// Where checkpoints are appended.
    pub store: CheckpointStore,
    /// The public half of the signing key, to check them.
    pub key: ed25519_dalek::VerifyingKey,
}

impl Anchor {
    /// The hub's anchor, creating its signing key on first start.
    pub fn load_or_create(
        config: &crate::config::HubConfig,
    ) -> Result<(Self, SigningKey), checkpoint::CheckpointError> {
        let key = checkpoint::load_or_create_key(&config.audit_signing_key_file())?;
        let anchor = Self { store: CheckpointStore::new(config.audit_checkpoint_dir()), key: key.verifying_key() };
        Ok((anchor, key))
    }

    /// The anchor for a reader (the CLI), or `None` when the hub never created a signing key.
    pub fn open(config: &crate::config::HubConfig) -> Result<Option<Self>, checkpoint::CheckpointError> {
        if !config.audit_signing_key_file().exists() {
            return Ok(None);
        }
        Self::load_or_create(config).map(|(a, _)| Some(a))
    }

    /// Every checkpoint, signatures checked.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, checkpoint::CheckpointError> {
        self.store.read(&self.key)
    }
}

/// The outcome of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Entries that hold, from 1: the verified chain.
    pub entries: i64,
    /// The first broken link: entry id and what is wrong with it.
    pub first_broken: Option<(i64, String)>,
    /// Signed checkpoints the chain was checked against.
    pub checkpoints: usize,
    /// The last entry anchored by a signed checkpoint (0 when none): a rewrite at or before it is
    /// detected even if the NDC's copy of the chain is consistent.
    pub anchored_upto: i64,
}

/// Rows per page while walking: memory stays flat on chains of millions of entries.
const VERIFY_PAGE: i64 = 10_000;

/// Where a walk of the chain ended.
struct Walked {
    /// The first broken link, if any.
    broken: Option<(i64, String)>,
    /// The highest signed anchor the walk met with its hash intact (0 when none).
    anchor_ok: i64,
}

/// Walks entries `from..=upto`, expecting the first to link to `prev`, and reports the first broken
/// link. `anchors` are signed (id, hash) pairs the walk must meet.
async fn walk(
    txn: &Transaction<'_>,
    from: i64,
    mut prev: Vec<u8>,
    upto: i64,
    anchors: &std::collections::HashMap<i64, Vec<u8>>,
) -> Result<Walked, tokio_postgres::Error> {
    let mut anchor_ok = 0;
    let broken = |id: i64, what: String, anchor_ok: i64| Ok(Walked { broken: Some((id, what)), anchor_ok });
    let mut expected = from;
    while expected <= upto {
        let rows = txn
            .query(
                "SELECT id, at_us, subscription, subscriber, purpose, channel, citizen_id, event_id, fields, \
                 prev_hash, hash FROM dongbo.audit_log WHERE id >= $1 AND id <= $2 ORDER BY id LIMIT $3",
                &[&expected, &upto, &VERIFY_PAGE],
            )
            .await?;
        if rows.is_empty() {
            break;
        }
        for r in rows {
            let id: i64 = r.get(0);
            if id != expected {
                let what = format!("entry {expected} is missing (deleted); the chain resumes at {id}");
                return broken(expected, what, anchor_ok);
            }
            let e = stored_entry(&r, 2);
            let (stored_prev, stored): (Vec<u8>, Vec<u8>) = (r.get(9), r.get(10));
            if stored_prev != prev {
                let what = format!("entry {id} does not link to entry {}: an entry was inserted or replaced", id - 1);
                return broken(id, what, anchor_ok);
            }
            if chain_hash(&prev, id, r.get(1), &e) != stored {
                return broken(id, format!("entry {id} was edited: its content does not match its hash"), anchor_ok);
            }
            match anchors.get(&id) {
                Some(h) if *h != stored => {
                    let what = format!(
                        "entry {id} differs from the signed checkpoint of entry {id}: the chain was rewritten after it was anchored"
                    );
                    return broken(id, what, anchor_ok);
                }
                Some(_) => anchor_ok = id,
                None => {}
            }
            prev = stored;
            expected += 1;
        }
    }
    if expected <= upto {
        return broken(expected, format!("entry {expected} is missing (deleted) up to the head's {upto}"), anchor_ok);
    }
    Ok(Walked { broken: None, anchor_ok })
}

fn stored_entry(r: &tokio_postgres::Row, from: usize) -> Entry {
    Entry {
        subscription: r.get(from),
        subscriber: r.get(from + 1),
        purpose: r.get(from + 2),
        channel: r.get(from + 3),
        citizen_id: r.get(from + 4),
        event_id: r.get(from + 5),
        fields: r.get(from + 6),
    }
}

/// Checks the whole chain inside `txn` (one snapshot): ids run 1…head without gaps or strays, every
/// link and hash holds, and the chain holds every signed checkpoint.
async fn verify_in(txn: &Transaction<'_>, checkpoints: &[Checkpoint]) -> Result<Verification, tokio_postgres::Error> {
    let head = txn.query_one("SELECT last_id, hash FROM dongbo.audit_head", &[]).await?;
    let (last_id, head_hash): (i64, Vec<u8>) = (head.get(0), head.get(1));
    let anchors: std::collections::HashMap<i64, Vec<u8>> =
        checkpoints.iter().filter_map(|c| Some((c.last_id, hex::decode(&c.hash).ok()?))).collect();
    let anchored_upto = checkpoints.iter().map(|c| c.last_id).max().unwrap_or(0);
    let done = |entries: i64, first_broken: Option<(i64, String)>| Verification {
        entries,
        first_broken,
        checkpoints: checkpoints.len(),
        anchored_upto,
    };
    // An entry outside 1..=head is never reached by the walk, so look for strays first.
    let stray = txn
        .query_one("SELECT min(id) FROM dongbo.audit_log WHERE id < 1 OR id > $1", &[&last_id])
        .await?
        .get::<_, Option<i64>>(0);
    let walked = walk(txn, 1, Vec::new(), last_id, &anchors).await?;
    if let Some((id, what)) = walked.broken {
        // Past a signed checkpoint that no longer holds, even linked entries are not trusted: only
        // what an intact checkpoint still anchors is.
        let trusted = if anchors.contains_key(&id) { walked.anchor_ok } else { id - 1 };
        return Ok(done(trusted, Some((id, what))));
    }
    if let Some(id) = stray {
        let what = format!("entry {id} lies outside the chain 1..={last_id}: it was inserted by hand");
        return Ok(done(last_id, Some((id, what))));
    }
    if last_id > 0 {
        let tail: Vec<u8> = txn.query_one("SELECT hash FROM dongbo.audit_log WHERE id = $1", &[&last_id]).await?.get(0);
        if tail != head_hash {
            let what = format!("the head's hash does not match entry {last_id}: the head was edited");
            return Ok(done(last_id, Some((last_id + 1, what))));
        }
    }
    if anchored_upto > last_id {
        let what = format!(
            "the chain ends at entry {last_id} but a signed checkpoint saw entry {anchored_upto}: entries were deleted or the chain was rewritten"
        );
        return Ok(done(walked.anchor_ok, Some((last_id + 1, what))));
    }
    Ok(done(last_id, None))
}

/// Walks the whole chain in one snapshot and reports the first entry that does not hold, checking
/// it against the signed `checkpoints` too.
pub async fn verify(client: &mut Client, checkpoints: &[Checkpoint]) -> Result<Verification, tokio_postgres::Error> {
    let txn =
        client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let v = verify_in(&txn, checkpoints).await?;
    txn.commit().await?;
    crate::metrics::hub().audit_checked(v.first_broken.is_none());
    Ok(v)
}

/// Every delivery of `citizen_id`'s data inside the verified chain, oldest first, with the
/// verification it rests on: entries past a break are not reported as facts.
pub async fn citizen_deliveries(
    client: &mut Client,
    citizen_id: &str,
    checkpoints: &[Checkpoint],
) -> Result<(Verification, Vec<Stored>), tokio_postgres::Error> {
    let txn =
        client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let v = verify_in(&txn, checkpoints).await?;
    let rows = txn
        .query(
            "SELECT id, at_us, subscription, subscriber, purpose, channel, citizen_id, event_id, fields \
             FROM dongbo.audit_log WHERE citizen_id = $1 AND id >= 1 AND id <= $2 ORDER BY id",
            &[&citizen_id, &v.entries],
        )
        .await?;
    txn.commit().await?;
    let stored = rows.iter().map(|r| Stored { id: r.get(0), at_us: r.get(1), entry: stored_entry(r, 2) }).collect();
    Ok((v, stored))
}

/// Signs a checkpoint of the chain head every `interval`, after checking that the entries since the
/// previous checkpoint link onto it, and checks the whole chain every `verify_every` (at start
/// first); both set `dongbo_audit_chain_broken`. Runs until `stop` turns true.
pub async fn run_checkpoints(
    ndc: NdcConfig,
    key: SigningKey,
    store: CheckpointStore,
    interval: std::time::Duration,
    verify_every: Option<std::time::Duration>,
    witness: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = match store.read(&key.verifying_key()) {
        Ok(cps) => cps.last().cloned(),
        Err(e) => {
            tracing::error!(error = %e, "audit checkpoints unreadable: no new checkpoint is signed until this is fixed");
            crate::metrics::hub().audit_checked(false);
            return;
        }
    };
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().ok();
    let mut client: Option<Client> = None;
    let mut verify_due = verify_every.map(|_| tokio::time::Instant::now());
    loop {
        let tick = match verify_due {
            Some(due) => interval.min(due.saturating_duration_since(tokio::time::Instant::now())),
            None => interval,
        };
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::apply::connect(&ndc).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        if let (Some(due), Some(every)) = (verify_due, verify_every) {
            if tokio::time::Instant::now() >= due {
                match full_check(c, &store, &key).await {
                    Ok(()) => verify_due = Some(tokio::time::Instant::now() + every),
                    // The NDC did not answer: try again at the next round.
                    Err(e) => warn!(error = %e, "audit chain check could not run"),
                }
            }
        }
        match checkpoint_once(c, &key, &store, last.as_ref()).await {
            Ok(Some(cp)) => {
                // Only a full check clears a break: this round saw the newest entries only.
                tracing::debug!(last_id = cp.last_id, "audit checkpoint signed");
                if let (Some(url), Some(http)) = (&witness, &http) {
                    if let Err(e) = http.post(url).json(&cp).send().await.and_then(|r| r.error_for_status()) {
                        warn!(error = %e, "audit witness did not take the checkpoint; the local store has it");
                    }
                }
                last = Some(cp);
            }
            Ok(None) => {}
            Err(RoundError::Broken(e)) => {
                crate::metrics::hub().audit_checked(false);
                tracing::error!(error = %e, "audit checkpoint not signed")
            }
            Err(RoundError::Unavailable(e)) => warn!(error = %e, "audit checkpoint not signed"),
        }
    }
}

/// Checks the whole chain against the signed checkpoints and exports the result; `Err` when the
/// NDC or the checkpoint store could not be read.
async fn full_check(client: &mut Client, store: &CheckpointStore, key: &SigningKey) -> Result<(), String> {
    let checkpoints = store.read(&key.verifying_key()).map_err(|e| e.to_string())?;
    let v = verify(client, &checkpoints).await.map_err(|e| e.to_string())?;
    match &v.first_broken {
        None => tracing::info!(entries = v.entries, checkpoints = v.checkpoints, "audit chain checked: intact"),
        Some((id, what)) => tracing::error!(
            entry = id,
            problem = %what,
            "audit chain checked: BROKEN; run `dongbo-hub audit verify` and see RUNBOOK.md"
        ),
    }
    Ok(())
}

/// Why a checkpoint round signed nothing.
enum RoundError {
    /// The chain does not hold: nothing is signed over it.
    Broken(String),
    /// The NDC did not answer or the store could not be written: the next round tries again.
    Unavailable(String),
}

/// One checkpoint round: `None` when the head has not moved.
async fn checkpoint_once(
    client: &mut Client,
    key: &SigningKey,
    store: &CheckpointStore,
    last: Option<&Checkpoint>,
) -> Result<Option<Checkpoint>, RoundError> {
    let ndc = |e: tokio_postgres::Error| RoundError::Unavailable(e.to_string());
    let txn = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(ndc)?;
    let head = txn.query_one("SELECT last_id, hash FROM dongbo.audit_head", &[]).await.map_err(ndc)?;
    let (head_id, head_hash): (i64, Vec<u8>) = (head.get(0), head.get(1));
    let (from, prev) = match last {
        // A checkpoint of the empty chain anchors nothing to look up.
        None => (1, Vec::new()),
        Some(cp) if cp.last_id == 0 => {
            if head_id == 0 {
                return Ok(None);
            }
            (1, Vec::new())
        }
        Some(cp) => {
            if head_id == cp.last_id && hex::encode(&head_hash) == cp.hash {
                return Ok(None);
            }
            let anchored: Option<Vec<u8>> = txn
                .query_opt("SELECT hash FROM dongbo.audit_log WHERE id = $1", &[&cp.last_id])
                .await
                .map_err(ndc)?
                .map(|r| r.get(0));
            if anchored.as_ref().map(hex::encode).as_deref() != Some(cp.hash.as_str()) {
                return Err(RoundError::Broken(format!(
                    "the NDC's audit chain no longer holds the checkpoint of entry {}: it was rewritten; run `dongbo-hub audit verify`",
                    cp.last_id
                )));
            }
            (cp.last_id + 1, hex::decode(&cp.hash).map_err(|e| RoundError::Broken(e.to_string()))?)
        }
    };
    let walked = walk(&txn, from, prev, head_id, &Default::default()).await.map_err(ndc)?;
    if let Some((id, what)) = walked.broken {
        return Err(RoundError::Broken(format!(
            "the audit chain is broken at entry {id} ({what}); run `dongbo-hub audit verify`"
        )));
    }
    txn.commit().await.map_err(ndc)?;
    store.append(key, head_id, &head_hash, now_micros()).map(Some).map_err(|e| RoundError::Unavailable(e.to_string()))
}
