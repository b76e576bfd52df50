//! Fan-out: applied changes and the domain events they raise reach subscribing systems, each
//! seeing only what its purpose allows, with every delivery in the audit log.
//!
//! ```text
//! agent ─▶ ingest ─▶ NDC txn (rows + events in dongbo.event_outbox) ─▶ fan-out log (sled) ─▶ ack agent
//!                                                                         │
//!                      per subscription, at its own pace:  read ─▶ filter/project ─▶ audit ─▶ send
//!                                                          (gRPC stream, webhook; Kafka with issue 4)
//! ```
//! Every hop keeps its position until the next one has made the record durable: the agent's spool
//! until the log has the chunk, a subscription's cursor until the subscriber acknowledged (gRPC) or
//! answered 2xx (webhook) or the record is in the dead-letter queue. Delivery is therefore at least
//! once; records carry stable `event_id`s so receivers drop duplicates. Each subscription reads the
//! log on its own task, a page at a time, so a slow or dead subscriber holds back only itself and
//! memory stays flat; the log keeps what the slowest enabled subscription has not acknowledged.
//!
//! - [`subscription`] — dictionary, event rules, purposes, subscriptions and their checks.
//! - [`filter`] — the row-filter language.
//! - [`events`] — deriving domain events inside the apply transaction.
//! - [`record`] — events and change records as JSON.
//! - [`log`] — the retained, replayable log.
//! - [`projection`] — purpose-bound projection, the one gate every path goes through.
//! - [`state`] — definitions, cursors, dead letters.
//! - [`grpc`] — the `Subscribe` stream.
//! - [`webhook`] — signed HTTP POSTs, retries, dead letters and replay.

pub mod events;
pub mod filter;
pub mod grpc;
pub mod kafka;
pub mod log;
pub mod projection;
pub mod record;
pub mod state;
pub mod subscription;
pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, RwLock};
use tracing::{info, warn};

use self::events::ActiveRule;
use self::log::{Cursor, FanoutLog, LogError};
use self::projection::{Outgoing, Subscription};
use self::state::{Origin, State};
use self::subscription::{Catalog, Delivery, Start, SubscriptionDef};
use crate::audit::AuditLog;
use crate::config::HubConfig;

/// Fan-out could not start or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// The log or state storage failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The NDC (audit log) failed.
    #[error(transparent)]
    Ndc(#[from] crate::apply::ApplyError),
    /// A definition was refused; every reason is listed.
    #[error("subscription refused:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    /// No such subscription.
    #[error("no subscription {0}")]
    Unknown(String),
}

/// What an operator asks a webhook worker.
pub enum Command {
    /// Re-deliver the dead letters; answers with (delivered, still failing).
    Replay(oneshot::Sender<Result<(u64, u64), String>>),
}

/// A subscription as listed to operators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// The definition, its webhook secret left out.
    #[serde(flatten)]
    pub def: SubscriptionDef,
    /// Where it came from.
    pub origin: Origin,
    /// Its acknowledged position.
    pub acked: Option<String>,
    /// Records waiting in its dead-letter queue.
    pub dead_letters: usize,
}

/// The fan-out side of the hub.
pub struct Fanout {
    /// The log.
    pub log: Arc<FanoutLog>,
    /// Definitions, cursors, dead letters.
    pub state: State,
    /// What can be followed and granted.
    pub catalog: Arc<Catalog>,
    /// Event rules for the appliers.
    pub rules: Arc<Vec<ActiveRule>>,
    /// Where deliveries are recorded.
    pub audit: Arc<AuditLog>,
    /// NDC connections the hub's appliers may hold together (`limits.max_ndc_connections`); shared
    /// here because the gRPC ingest and the Kafka consumer both open appliers.
    pub ndc_slots: Arc<tokio::sync::Semaphore>,
    subs: RwLock<HashMap<String, Arc<Subscription>>>,
    workers: RwLock<HashMap<String, mpsc::Sender<Command>>>,
    /// Bumped by each new gRPC stream of a subscription, so the newest stream wins.
    pub(crate) generations: std::sync::Mutex<HashMap<String, u64>>,
    retention: Duration,
    /// The hub's Kafka cluster, for Kafka delivery.
    kafka: Option<crate::config::KafkaConfig>,
}

impl Fanout {
    /// Opens the log, loads subscriptions (the config's replace stored ones of the same id) and
    /// starts their workers and the retention task.
    pub async fn start(config: &HubConfig) -> Result<Arc<Self>, FanoutError> {
        let db = sled::Config::new().path(&config.fanout.data_dir).open().map_err(LogError::from)?;
        let log = FanoutLog::open(db, &config.fanout.data_dir.join("log-segments"))?;
        let state = State::open(log.db())?;
        let (catalog, problems) =
            Catalog::new(&config.dictionary, &config.events, &config.purposes, &config.subscribers);
        if !problems.is_empty() {
            return Err(FanoutError::Refused(problems));
        }
        let rules = catalog
            .rules
            .iter()
            .map(|r| ActiveRule { rule: r.clone(), citizen_id: catalog.tables[&r.table].citizen_id.clone() })
            .collect();
        let audit = AuditLog::connect(&config.ndc).await?;
        let fanout = Arc::new(Self {
            ndc_slots: Arc::new(tokio::sync::Semaphore::new(config.limits.max_ndc_connections)),
            log,
            state,
            catalog: Arc::new(catalog),
            rules: Arc::new(rules),
            audit: Arc::new(audit),
            subs: RwLock::new(HashMap::new()),
            workers: RwLock::new(HashMap::new()),
            generations: std::sync::Mutex::new(HashMap::new()),
            retention: Duration::from_secs(config.fanout.retention_hours * 3600),
            kafka: config.kafka.clone(),
        });
        let declared: Vec<&str> = config.subscriptions.iter().map(|d| d.id.as_str()).collect();
        for stored in fanout.state.defs()? {
            if stored.origin == Origin::Config && !declared.contains(&stored.def.id.as_str()) {
                info!(subscription = %stored.def.id, "subscription no longer in hub.toml: removed");
                fanout.state.remove(&stored.def.id).await?;
            } else if stored.origin == Origin::Api {
                if let Err(e) = fanout.install(stored.def, Origin::Api).await {
                    warn!(error = %e, "a stored subscription no longer passes the checks; it is not served");
                }
            }
        }
        for def in &config.subscriptions {
            fanout.install(def.clone(), Origin::Config).await?;
        }
        let retention = fanout.clone();
        tokio::spawn(async move { retention.retention_loop().await });
        Ok(fanout)
    }

    /// A served subscription.
    pub async fn get(&self, id: &str) -> Option<Arc<Subscription>> {
        self.subs.read().await.get(id).cloned()
    }

    /// Checks, stores and starts serving a subscription (replacing one of the same id).
    pub async fn install(self: &Arc<Self>, def: SubscriptionDef, origin: Origin) -> Result<(), FanoutError> {
        let sub = Arc::new(Subscription::new(def.clone(), &self.catalog).map_err(FanoutError::Refused)?);
        if matches!(def.delivery, Delivery::Kafka { .. }) && self.kafka.is_none() {
            return Err(FanoutError::Refused(vec![format!(
                "subscription {}: Kafka delivery needs a [kafka] section (the brokers) in hub.toml",
                def.id
            )]));
        }
        let start = Start::parse(&def.start).map_err(|e| FanoutError::Refused(vec![e]))?;
        self.state.put_def(&state::StoredDef { def: def.clone(), origin }).await?;
        let cursor = self.state.init_cursor(&def.id, self.log.start_cursor(start)?).await?;
        self.workers.write().await.remove(&def.id);
        self.subs.write().await.insert(def.id.clone(), sub.clone());
        if let Delivery::Webhook { .. } = &def.delivery {
            let (tx, rx) = mpsc::channel(4);
            self.workers.write().await.insert(def.id.clone(), tx);
            let me = self.clone();
            tokio::spawn(async move { webhook::run(me, sub, rx).await });
        } else if let (Delivery::Kafka { .. }, Some(k)) = (&def.delivery, &self.kafka) {
            let (tx, rx) = mpsc::channel(4);
            self.workers.write().await.insert(def.id.clone(), tx);
            let (me, k) = (self.clone(), k.clone());
            tokio::spawn(async move { kafka::run(me, sub, k, rx).await });
        }
        crate::metrics::hub().know_subscription(&def.id);
        info!(subscription = %def.id, subscriber = %def.subscriber, purpose = %def.purpose, delivery = def.delivery.channel(), from = %cursor.token(), "subscription served");
        Ok(())
    }

    /// Adds a subscription at run time (admin API).
    pub async fn add(self: &Arc<Self>, def: SubscriptionDef) -> Result<(), FanoutError> {
        if self.state.defs()?.iter().any(|d| d.def.id == def.id && d.origin == Origin::Config) {
            return Err(FanoutError::Refused(vec![format!(
                "subscription {} is declared in hub.toml: change it there",
                def.id
            )]));
        }
        self.install(def, Origin::Api).await
    }

    /// Stops serving and forgets a subscription added at run time.
    pub async fn remove(&self, id: &str) -> Result<(), FanoutError> {
        let stored = self.state.defs()?;
        match stored.iter().find(|d| d.def.id == id) {
            None => return Err(FanoutError::Unknown(id.into())),
            Some(d) if d.origin == Origin::Config => {
                return Err(FanoutError::Refused(vec![format!(
                    "subscription {id} is declared in hub.toml: remove it there"
                )]))
            }
            Some(_) => {}
        }
        self.subs.write().await.remove(id);
        self.workers.write().await.remove(id);
        self.state.remove(id).await?;
        info!(subscription = %id, "subscription removed");
        Ok(())
    }

    /// Every subscription with its position.
    pub async fn list(&self) -> Result<Vec<Listed>, FanoutError> {
        let mut out = Vec::new();
        for d in self.state.defs()? {
            out.push(Listed {
                acked: self.state.cursor(&d.def.id)?.map(|c| c.token()),
                dead_letters: self.state.dead_letters(&d.def.id)?.len(),
                def: d.def.redacted(),
                origin: d.origin,
            });
        }
        Ok(out)
    }

    /// Asks a webhook subscription's worker to replay its dead letters.
    pub async fn replay(&self, id: &str) -> Result<(u64, u64), FanoutError> {
        let worker = self.workers.read().await.get(id).cloned().ok_or_else(|| FanoutError::Unknown(id.into()))?;
        let (tx, rx) = oneshot::channel();
        let gone = || FanoutError::Refused(vec![format!("the worker of {id} stopped")]);
        worker.send(Command::Replay(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|e| FanoutError::Refused(vec![e]))
    }

    /// Whether `sub` is still the served version of its subscription (it was not removed or
    /// The next page of up to `max` log items from the subscription's cursor, projected to its
    /// purpose, with the cursor after the page; `None` when it is at the end of the log.
    pub fn next_page(&self, sub: &Subscription, max: usize) -> Result<Option<(Vec<Outgoing>, Cursor)>, String> {
        let from = self.state.cursor(&sub.def.id).map_err(|e| e.to_string())?.unwrap_or_default();
        let (items, scanned) = self.log.read(from, max, sub.follows_tables).map_err(|e| e.to_string())?;
        if scanned == from {
            return Ok(None);
        }
        Ok(Some((items.iter().filter_map(|(c, item)| sub.project(*c, item)).collect(), scanned)))
    }

    /// replaced since the worker started).
    pub async fn is_current(&self, sub: &Arc<Subscription>) -> bool {
        self.subs.read().await.get(&sub.def.id).is_some_and(|s| Arc::ptr_eq(s, sub))
    }

    async fn retention_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = self.prune() {
                warn!(error = %e, "log retention failed; will retry");
            }
        }
    }

    /// Drops log chunks past retention that every subscription has acknowledged.
    pub fn prune(&self) -> Result<u64, LogError> {
        let slowest = self.state.cursors()?.into_iter().map(|(_, c)| c.chunk).min().unwrap_or(u64::MAX);
        let before = record::now_micros() - self.retention.as_micros() as i64;
        let dropped = self.log.prune(before, slowest)?;
        if dropped > 0 {
            info!(chunks = dropped, "log retention dropped old chunks");
        }
        Ok(dropped)
    }

    /// The acknowledged cursor of a subscription.
    pub fn acked(&self, id: &str) -> Result<Option<Cursor>, LogError> {
        self.state.cursor(id)
    }
}
