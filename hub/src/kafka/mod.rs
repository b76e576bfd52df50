//! The hub as a member of a Kafka consumer group: agents produce to their topics
//! (`dongbo.cdc.<agent id>`), and the hubs of one NDC share the topics' partitions.
//!
//! Exactly-once apply does not rest on Kafka's committed offsets: each partition is a *stream* with
//! its own row in `dongbo.applied_position`, holding the last applied seq and the next offset to
//! consume, written in the same NDC transaction as the rows. On assignment a [`partition`] worker
//! reads that row and seeks there; the row lock and the seq check keep a partition applied once even
//! while two hubs both hold it during a rebalance. Offsets are also committed to Kafka after each NDC
//! commit, only so that the usual lag tools show the group's progress.
//!
//! One task reads the consumer and hands each message to its partition's worker over a bounded
//! channel; a slow NDC therefore slows consumption instead of growing memory.

pub mod partition;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::TopicPartitionList;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{AgentAcl, HubConfig, KafkaConfig};
use crate::fanout::Fanout;

/// A topic partition.
pub type TopicPartition = (String, i32);

/// Group membership changes, passed from librdkafka's rebalance callbacks to the reading task.
#[derive(Debug)]
enum Membership {
    Assigned(Vec<TopicPartition>),
    Revoked(Vec<TopicPartition>),
}

/// The consumer's context: forwards rebalances.
pub struct GroupContext {
    membership: mpsc::UnboundedSender<Membership>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.membership.send(Membership::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let _ = self.membership.send(Membership::Assigned(partitions(tpl)));
            }
            Rebalance::Error(e) => warn!(error = %e, "Kafka rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The hub's group consumer.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// What every partition worker shares.
pub struct Shared {
    /// The hub's config.
    pub config: Arc<HubConfig>,
    /// Fan-out (log and event rules).
    pub fanout: Arc<Fanout>,
    /// The consumer, for seeks and offset commits.
    pub consumer: Arc<GroupConsumer>,
    /// The agent each topic belongs to.
    pub agents: HashMap<String, AgentAcl>,
}

/// librdkafka settings: `defaults`, then the hub's `[kafka]` section, whose properties win, then
/// its security tables (which properties may not override).
pub fn client_config(k: &KafkaConfig, defaults: &[(&str, &str)]) -> Result<ClientConfig, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, v) in defaults {
        c.set(*key, *v);
    }
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    k.security().apply(&mut c).map_err(KafkaError::ClientCreation)?;
    Ok(c)
}

/// How often a hub holding no partition looks for partitions nobody consumes.
const STALL_CHECK: Duration = Duration::from_secs(10);
/// A hub rejoins the group at most this often.
const REJOIN_EVERY: Duration = Duration::from_secs(60);
/// A partition with messages waiting and no NDC progress for this long has no live consumer.
const STALLED_AFTER_SECS: f64 = 30.0;

/// Partitions of the agents' topics with messages beyond the NDC's offset and no apply for
/// [`STALLED_AFTER_SECS`]. A healthy group never has one; a coordinator that lost track of a dead
/// member (tansu 0.6 keeps assigning its partitions to it) does, and rejoining fixes that.
/// `up_secs` is how long this hub has run: a partition no hub ever started counts as idle that long.
async fn stalled_partitions(shared: &Arc<Shared>, up_secs: f64) -> anyhow::Result<Vec<TopicPartition>> {
    let consumer = shared.consumer.clone();
    let topics: Vec<String> = shared.agents.keys().cloned().collect();
    let ends = tokio::task::spawn_blocking(move || -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
        let mut ends = Vec::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(5))?;
                    ends.push(((topic.clone(), p.id()), high));
                }
            }
        }
        Ok(ends)
    })
    .await??;
    let ndc = crate::apply::connect(&shared.config.ndc).await?;
    let mut stalled = Vec::new();
    for ((topic, partition), high) in ends {
        let stream = partition::stream_name(&topic, partition);
        let row = ndc
            .query_opt(
                "SELECT kafka_next_offset, extract(epoch FROM now() - updated_at)::float8 \
                 FROM dongbo.applied_position WHERE source_id = $1",
                &[&stream],
            )
            .await?;
        let (next, idle): (Option<i64>, f64) = row.map_or((None, up_secs), |r| (r.get(0), r.get(1)));
        if high > next.unwrap_or(0) && idle > STALLED_AFTER_SECS {
            stalled.push((topic, partition));
        }
    }
    Ok(stalled)
}

/// Consumes the agents' topics until `stop` turns true.
pub async fn run(
    config: Arc<HubConfig>,
    fanout: Arc<Fanout>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let Some(k) = config.kafka.clone() else { return Ok(()) };
    let (membership_tx, mut membership) = mpsc::unbounded_channel();
    let defaults = [
        ("group.id", k.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        // A hub killed outright hands its partitions over after this long.
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "2000"),
        // Agents create their topics when they first start, often after the hubs: a group leader
        // that has not seen a topic yet would assign its partitions to nobody.
        ("topic.metadata.refresh.interval.ms", "5000"),
        // Agent topics have one partition each: the range assignor would give every topic's
        // partition 0 to the same hub, round robin spreads them over the group.
        ("partition.assignment.strategy", "roundrobin"),
        // Fewer, larger fetches when a partition has a deep backlog.
        ("max.partition.fetch.bytes", "16777216"),
    ];
    let consumer: GroupConsumer =
        client_config(&k, &defaults)?.create_with_context(GroupContext { membership: membership_tx })?;
    let agents: HashMap<String, AgentAcl> = config.agents.iter().map(|a| (k.topic_of(&a.id), a.clone())).collect();
    let topics: Vec<&str> = agents.keys().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    info!(brokers = %k.brokers, group = %k.group_id, topics = ?topics, "consuming agents' Kafka topics");
    let shared = Arc::new(Shared { config: config.clone(), fanout, consumer: Arc::new(consumer), agents });
    let mut workers: HashMap<TopicPartition, mpsc::Sender<OwnedMessage>> = HashMap::new();
    // The first look only after a rebalance had time to settle.
    let mut watchdog = tokio::time::interval_at(tokio::time::Instant::now() + STALL_CHECK, STALL_CHECK);
    let started = std::time::Instant::now();
    let mut rejoined: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            // A join in progress is left to finish: rejoining again would restart it.
            _ = watchdog.tick(), if workers.is_empty() && rejoined.is_none_or(|t| t.elapsed() > REJOIN_EVERY) => {
                match stalled_partitions(&shared, started.elapsed().as_secs_f64()).await {
                    Ok(stalled) if !stalled.is_empty() => {
                        warn!(partitions = ?stalled, "partitions with messages waiting and no progress, and this hub holds none: rejoining the group");
                        shared.consumer.unsubscribe();
                        let topics: Vec<&str> = shared.agents.keys().map(String::as_str).collect();
                        shared.consumer.subscribe(&topics)?;
                        rejoined = Some(std::time::Instant::now());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "stall check failed"),
                }
            }
            Some(change) = membership.recv() => match change {
                Membership::Revoked(list) => {
                    info!(partitions = ?list, "Kafka partitions revoked");
                    for tp in list {
                        // Dropping the sender ends the worker after its current transaction.
                        workers.remove(&tp);
                    }
                }
                Membership::Assigned(list) => {
                    info!(partitions = ?list, "Kafka partitions assigned");
                    for tp in list {
                        workers.entry(tp.clone()).or_insert_with(|| partition::spawn(shared.clone(), tp));
                    }
                }
            },
            msg = shared.consumer.recv() => match msg {
                Ok(m) => {
                    let tp = (m.topic().to_string(), m.partition());
                    let owned = m.detach();
                    let worker = workers.entry(tp.clone()).or_insert_with(|| partition::spawn(shared.clone(), tp.clone()));
                    if worker.send(owned).await.is_err() {
                        // The worker stopped; a new one starts from the NDC's offset and seeks there.
                        workers.insert(tp.clone(), partition::spawn(shared.clone(), tp));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
