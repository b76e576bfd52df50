//! Subscription state kept beside the log in the hub's sled database: definitions (those added at
//! run time survive restarts), acknowledged cursors and webhook dead letters.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::log::{cursor_bytes, cursor_from, Cursor, LogError};
use super::subscription::SubscriptionDef;

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `hub.toml`: changed only by editing the file.
    Config,
    /// The admin API or CLI.
    Api,
}

/// A stored definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredDef {
    /// The definition.
    pub def: SubscriptionDef,
    /// Where it came from.
    pub origin: Origin,
}

/// A record a webhook could not deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Position in the dead-letter queue of its subscription.
    pub id: u64,
    /// Log position after the record.
    pub resume_token: String,
    /// Stable record id.
    pub event_id: String,
    /// Whose data.
    pub citizen_id: String,
    /// The projected record that was to be sent.
    pub body: Map<String, Json>,
    /// The granted fields it carries.
    pub fields: Vec<String>,
    /// Why it failed the last time.
    pub reason: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When it was dead-lettered, microseconds since the epoch.
    pub at_us: i64,
}

/// The state trees.
#[derive(Clone)]
pub struct State {
    defs: sled::Tree,
    cursors: sled::Tree,
    /// Each subscription's start: the earliest cursor its grant reaches back to.
    starts: sled::Tree,
    dead: sled::Tree,
    db: sled::Db,
}

fn dead_key(sub: &str, id: u64) -> Vec<u8> {
    let mut k = sub.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn dead_prefix(sub: &str) -> Vec<u8> {
    let mut k = sub.as_bytes().to_vec();
    k.push(0);
    k
}

impl State {
    /// Opens the trees in `db`.
    pub fn open(db: &sled::Db) -> Result<Self, LogError> {
        Ok(Self {
            defs: db.open_tree("subscriptions")?,
            cursors: db.open_tree("cursors")?,
            starts: db.open_tree("starts")?,
            dead: db.open_tree("dead_letters")?,
            db: db.clone(),
        })
    }

    /// Every stored definition.
    pub fn defs(&self) -> Result<Vec<StoredDef>, LogError> {
        self.defs
            .iter()
            .values()
            .map(|v| {
                let v = v?;
                serde_json::from_slice(&v).map_err(|e| LogError::Corrupt(0, format!("stored subscription: {e}")))
            })
            .collect()
    }

    /// Stores a definition durably.
    pub async fn put_def(&self, d: &StoredDef) -> Result<(), LogError> {
        self.defs.insert(d.def.id.as_bytes(), serde_json::to_vec(d).expect("definitions serialise"))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Removes a definition with its cursor and dead letters.
    pub async fn remove(&self, id: &str) -> Result<bool, LogError> {
        let existed = self.defs.remove(id.as_bytes())?.is_some();
        self.cursors.remove(id.as_bytes())?;
        self.starts.remove(id.as_bytes())?;
        for k in self.dead.scan_prefix(dead_prefix(id)).keys() {
            self.dead.remove(k?)?;
        }
        self.db.flush_async().await?;
        Ok(existed)
    }

    /// The acknowledged cursor of a subscription.
    pub fn cursor(&self, id: &str) -> Result<Option<Cursor>, LogError> {
        Ok(self.cursors.get(id.as_bytes())?.and_then(|v| cursor_from(&v)))
    }

    /// Every subscription's cursor.
    pub fn cursors(&self) -> Result<Vec<(String, Cursor)>, LogError> {
        let mut out = Vec::new();
        for kv in self.cursors.iter() {
            let (k, v) = kv?;
            if let Some(c) = cursor_from(&v) {
                out.push((String::from_utf8_lossy(&k).into_owned(), c));
            }
        }
        Ok(out)
    }

    /// Records an acknowledged cursor; a cursor never moves back.
    ///
    /// It reaches disk with sled's next periodic flush (within half a second), not before
    /// returning: an acknowledgement lost in a crash only means those records are delivered
    /// again, which at-least-once delivery with stable event ids allows, and an fsync per
    /// acknowledgement would cost every subscriber's latency.
    pub async fn ack(&self, id: &str, c: Cursor) -> Result<(), LogError> {
        if self.cursor(id)?.is_some_and(|old| old >= c) {
            return Ok(());
        }
        self.cursors.insert(id.as_bytes(), &cursor_bytes(c))?;
        Ok(())
    }

    /// Sets a cursor only when the subscription has none (its start), and records that start.
    pub async fn init_cursor(&self, id: &str, c: Cursor) -> Result<Cursor, LogError> {
        if let Some(old) = self.cursor(id)? {
            if self.starts.get(id.as_bytes())?.is_none() {
                // Created before starts were kept: its grant reaches back to where it stands now.
                self.starts.insert(id.as_bytes(), &cursor_bytes(old))?;
                self.db.flush_async().await?;
            }
            return Ok(old);
        }
        self.starts.insert(id.as_bytes(), &cursor_bytes(c))?;
        self.cursors.insert(id.as_bytes(), &cursor_bytes(c))?;
        self.db.flush_async().await?;
        Ok(c)
    }

    /// The earliest cursor a subscription may read from: where it started.
    pub fn start(&self, id: &str) -> Result<Option<Cursor>, LogError> {
        Ok(self.starts.get(id.as_bytes())?.and_then(|v| cursor_from(&v)))
    }

    /// Adds a dead letter (its `id` is assigned here) durably.
    pub async fn dead_letter(&self, sub: &str, mut d: DeadLetter) -> Result<u64, LogError> {
        d.id = self.db.generate_id()?;
        self.dead.insert(dead_key(sub, d.id), serde_json::to_vec(&d).expect("dead letters serialise"))?;
        self.db.flush_async().await?;
        Ok(d.id)
    }

    /// A subscription's dead letters, oldest first.
    pub fn dead_letters(&self, sub: &str) -> Result<Vec<DeadLetter>, LogError> {
        self.dead
            .scan_prefix(dead_prefix(sub))
            .values()
            .map(|v| {
                let v = v?;
                serde_json::from_slice(&v).map_err(|e| LogError::Corrupt(0, format!("stored dead letter: {e}")))
            })
            .collect()
    }

    /// Removes a dead letter once delivered.
    pub async fn drop_dead_letter(&self, sub: &str, id: u64) -> Result<(), LogError> {
        self.dead.remove(dead_key(sub, id))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Updates a dead letter after another failed attempt.
    pub async fn update_dead_letter(&self, sub: &str, d: &DeadLetter) -> Result<(), LogError> {
        self.dead.insert(dead_key(sub, d.id), serde_json::to_vec(d).expect("dead letters serialise"))?;
        self.db.flush_async().await?;
        Ok(())
    }
}
