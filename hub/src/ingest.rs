//! The gRPC `Ingest` service: agents stream spooled batches, the hub applies them and acknowledges
//! each position once it is durable in the NDC.
//!
//! Per stream, a reader task identifies the agent ([`crate::auth`] → [`AgentAcl`]), decodes and validates each
//! batch, and hands it to an applier task over a small bounded channel, so decoding overlaps the NDC
//! transaction and a slow NDC pushes back on the agent through HTTP/2 flow control instead of
//! growing memory. The applier gathers consecutive batches into one transaction.
//!
//! # Limits (what one agent, or one stolen token, can make the hub spend)
//! - A message is at most `limits.max_message_bytes` (tonic refuses a longer declared length before
//!   reserving it) and a batch at most `limits.max_changes_per_batch` changes: the stream ends with
//!   `InvalidArgument` naming the limit, and nothing of that batch is applied.
//! - A stream holds at most `limits.stream_buffer_bytes` of encoded batches between decoding and the
//!   NDC commit; past that the reader stops reading and HTTP/2 flow control holds the agent back.
//! - One live stream per agent: a new stream of the same agent *replaces* the old one (a reconnect
//!   after a dropped link must not wait for the dead connection to time out). The old stream is told
//!   plainly that it was replaced, finishes or abandons its NDC transaction, and gives back its NDC
//!   connection before the new one opens its own, so an agent opening 100 streams still holds one.
//! - NDC connections are shared by all appliers up to `limits.max_ndc_connections`.
//! - A status report is at most [`dongbo_proto::STATUS_REPORT_MAX`] bytes (the stream ends with
//!   `InvalidArgument` past that); it only updates the agent's entry in memory, written to the NDC
//!   every few seconds whatever the number of reports.
//!
//! # Stopping
//! When the hub stops, every stream stops reading, the applier finishes the transaction in progress
//! (or the NDC abandons it when the connection drops), acknowledges what is durable, and the stream
//! ends, so the server's graceful shutdown completes within seconds.
//!
//! What a batch may be, and what is durable when, is [`crate::pipeline`]'s: this module only reads
//! the stream and answers in gRPC's terms (the Kafka consumer drives the same pipeline).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dongbo_connectors::model::ChangeBatch;
use dongbo_connectors::wire;
use dongbo_proto::v1::{agent_message, hub_message, ingest_server::Ingest, Ack, AgentMessage, HubMessage, Welcome};
use futures::Stream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::apply::{ApplyError, NdcApplier};
use crate::auth::Authenticator;
use crate::config::{AgentAcl, HubConfig};
use crate::fanout::Fanout;
use crate::pipeline::{self, adopt_stream, apply_and_log, PipelineError, Refused, Staged};

/// An agent must say Hello this soon after opening a stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Decoded batches waiting for the applier; a few keep the NDC busy without buffering much.
const APPLY_QUEUE: usize = 8;

/// The live stream of one agent.
struct Live {
    generation: u64,
    /// Tells the stream a newer one replaces it.
    replace: watch::Sender<bool>,
    /// Turns true once the stream's applier (and its NDC connection) is gone.
    ended: watch::Receiver<bool>,
}

/// Marks a stream ended when its applier task drops it.
struct EndGuard(watch::Sender<bool>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

/// The ingest service.
pub struct IngestService {
    config: Arc<HubConfig>,
    auth: Arc<Authenticator>,
    fanout: Arc<Fanout>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    stop: watch::Receiver<bool>,
}

impl IngestService {
    /// A service for the agents in `config`, logging what it applies to `fanout`; its streams end
    /// when `stop` turns true.
    pub fn new(
        config: Arc<HubConfig>,
        auth: Arc<Authenticator>,
        fanout: Arc<Fanout>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self { config, auth, fanout, live: Arc::default(), stop }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<AgentAcl, Status> {
        let id = crate::grpc_peer::identify(&self.auth, request, crate::grpc_peer::Kind::Agent)?;
        self.config
            .agents
            .iter()
            .find(|a| a.id == id)
            .cloned()
            .ok_or_else(|| Status::internal(format!("agent {id} has a token but no entry")))
    }

    /// Registers a new stream of `source_id`, replacing (and waiting out) the live one; returns its
    /// generation, its replace signal and the guard that marks it ended.
    async fn take_over(&self, source_id: &str) -> Result<(u64, watch::Receiver<bool>, EndGuard), Status> {
        let (replace_tx, replace_rx) = watch::channel(false);
        let (ended_tx, ended_rx) = watch::channel(false);
        let old = {
            let mut live = self.live.lock().expect("live streams lock");
            let generation = live.get(source_id).map_or(1, |l| l.generation + 1);
            let old = live.insert(source_id.to_string(), Live { generation, replace: replace_tx, ended: ended_rx });
            (generation, old)
        };
        let (generation, old) = old;
        if let Some(mut old) = old {
            let _ = old.replace.send(true);
            let wait = Duration::from_millis(self.config.limits.replace_wait_ms);
            if tokio::time::timeout(wait, old.ended.wait_for(|e| *e)).await.is_err() {
                return Err(Status::unavailable(format!(
                    "agent {source_id}'s previous stream did not end within {wait:?}; retry later"
                )));
            }
            info!(source_id, "a newer stream of this agent replaced the previous one");
        }
        Ok((generation, replace_rx, EndGuard(ended_tx)))
    }
}

pub(crate) fn apply_status(e: &ApplyError) -> Status {
    if e.is_transient() {
        Status::unavailable(format!("NDC temporarily unavailable: {e}"))
    } else {
        Status::internal(format!("NDC apply failed: {e}"))
    }
}

type HubStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

/// A decoded batch on its way to the applier, holding its share of the stream's buffer.
type Queued = (Staged, OwnedSemaphorePermit);

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = HubStream;

    async fn stream(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<HubStream>, Status> {
        let acl = self.authenticate(&request)?;
        let peer = request.remote_addr().map(|a| a.to_string());
        let refused = |status: Status| {
            warn!(peer = peer.as_deref().unwrap_or("unknown"), source_id = %acl.id, reason = %status.message(), "agent stream refused");
            status
        };
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(refused(Status::invalid_argument("no Hello within 10 s"))),
            Ok(m) => m.map_err(&refused)?.and_then(|m| m.kind),
        };
        let Some(agent_message::Kind::Hello(hello)) = hello else {
            return Err(refused(Status::invalid_argument("the first message on an ingest stream must be Hello")));
        };
        if hello.source_id != acl.id {
            return Err(refused(Status::permission_denied(format!(
                "this token belongs to agent {}, not {}",
                acl.id, hello.source_id
            ))));
        }
        if !(dongbo_proto::OLDEST_PROTOCOL_VERSION..=dongbo_proto::PROTOCOL_VERSION).contains(&hello.protocol_version) {
            return Err(refused(Status::failed_precondition(format!(
                "agent speaks protocol {}, this hub speaks {} to {}: upgrade one of them",
                hello.protocol_version,
                dongbo_proto::OLDEST_PROTOCOL_VERSION,
                dongbo_proto::PROTOCOL_VERSION
            ))));
        }
        let (generation, mut replaced, ended) = self.take_over(&acl.id).await?;
        let mut applier =
            NdcApplier::connect(&self.config.ndc, &self.fanout.ndc_slots, acl.clone(), self.fanout.rules.clone())
                .await
                .map_err(|e| apply_status(&e))?;
        let applied = applier.applied_seq().await.map_err(|e| apply_status(&e))?;
        let log = self.fanout.log.clone();
        let logged =
            adopt_stream(&applier, &log, &acl.id, &acl.id, applied, None).await.map_err(|e| pipeline_status(&e))?;
        // Durable at both hops: the agent resends whatever the NDC has but the log does not yet.
        let durable = applied.min(logged);
        info!(source_id = %acl.id, agent_version = %hello.agent_version, applied_seq = applied, logged_seq = logged, generation, "agent connected");
        crate::metrics::hub().agent_connected(&acl.id, true);
        crate::fleet::connected(&acl.id, crate::fleet::Transport::Grpc, Some(&hello.agent_version), peer);

        let (out_tx, out_rx) = mpsc::channel::<Result<HubMessage, Status>>(16);
        let welcome = HubMessage {
            kind: Some(hub_message::Kind::Welcome(Welcome {
                applied_seq: durable,
                protocol_version: dongbo_proto::PROTOCOL_VERSION,
            })),
        };
        out_tx.send(Ok(welcome)).await.map_err(|_| Status::cancelled("agent went away"))?;

        let limits = self.config.limits.clone();
        let buffer = Arc::new(Semaphore::new(limits.stream_buffer_bytes));
        let (batch_tx, mut batch_rx) = mpsc::channel::<Queued>(APPLY_QUEUE);
        let reader_out = out_tx.clone();
        let source_id = acl.id.clone();
        let province = acl.province.clone();
        let mut stop = self.stop.clone();
        let mut reader_replaced = replaced.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = stop.wait_for(|s| *s) => {
                        info!(source_id = %source_id, "hub stopping: no more batches read from this agent");
                        break;
                    }
                    _ = reader_replaced.wait_for(|r| *r) => break,
                };
                crate::metrics::hub().contact(&source_id);
                let msg = match msg {
                    Ok(Some(AgentMessage { kind: Some(agent_message::Kind::Status(report)) })) => {
                        match crate::fleet::report(&source_id, crate::fleet::Transport::Grpc, report) {
                            Ok(()) => continue,
                            Err(e) => {
                                warn!(source_id = %source_id, error = %e, "status report refused; the stream ends");
                                let _ = reader_out.send(Err(Status::invalid_argument(e.to_string()))).await;
                                break;
                            }
                        }
                    }
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        // A message over the size limit, say: the agent is told why, plainly.
                        if e.code() == tonic::Code::OutOfRange {
                            warn!(source_id = %source_id, error = %e.message(), "message refused (limits.max_message_bytes); nothing of it applied");
                        } else {
                            info!(source_id = %source_id, error = %e, "agent stream ended");
                        }
                        let _ = reader_out.send(Err(e)).await;
                        break;
                    }
                };
                let size = opened_len(&msg).min(limits.stream_buffer_bytes);
                // Waits while the stream's buffer is full: the agent is then held back by flow control.
                let Ok(permit) = buffer.clone().acquire_many_owned(size as u32).await else { break };
                let batch = match decode(&source_id, msg, limits.max_changes_per_batch, limits.max_message_bytes) {
                    Ok(b) => b,
                    Err(status) => {
                        warn!(source_id = %source_id, error = %status.message(), "malformed message refused; nothing of it applied");
                        let _ = reader_out.send(Err(status)).await;
                        break;
                    }
                };
                // Mapped here, while the applier has the NDC apply the batches before it.
                let dictionary = crate::dictionary::current();
                let transform = pipeline::Transform { dictionary: &dictionary, province: province.as_deref() };
                let staged = Staged::new(batch.0, batch.1, transform);
                if batch_tx.send((staged, permit)).await.is_err() {
                    break;
                }
            }
        });
        let max_changes = self.config.apply.max_changes_per_txn;
        let live = self.live.clone();
        tokio::spawn(async move {
            let _ended = ended;
            let mut ended_with: Option<String> = None;
            loop {
                let first = tokio::select! {
                    b = batch_rx.recv() => b,
                    _ = replaced.wait_for(|r| *r) => None,
                };
                let Some(first) = first else { break };
                let mut batches = vec![first];
                let mut n = batches[0].0.batch().changes.len();
                while n < max_changes {
                    match batch_rx.try_recv() {
                        Ok(b) => {
                            n += b.0.batch().changes.len();
                            batches.push(b);
                        }
                        Err(_) => break,
                    }
                }
                // The permits stay held until the run is applied and logged: that is what bounds
                // the stream's memory, not only the queue.
                let (run, held): (Vec<Staged>, Vec<OwnedSemaphorePermit>) = batches.into_iter().unzip();
                let conflict = crate::dictionary::current().conflict;
                let done = apply_and_log(&mut applier, &log, &acl.id, &acl.id, &run, None, conflict).await;
                pipeline::release(run, held);
                match done {
                    Ok(durable_seq) => {
                        let ack = HubMessage { kind: Some(hub_message::Kind::Ack(Ack { durable_seq })) };
                        if out_tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(source_id = %acl.id, error = %e, "apply failed; the agent will resend from the last durable position");
                        ended_with = Some(format!("apply failed: {e}"));
                        let _ = out_tx.send(Err(pipeline_status(&e))).await;
                        break;
                    }
                }
            }
            if *replaced.borrow() {
                let _ = out_tx
                    .send(Err(Status::aborted(format!(
                        "a newer stream of agent {} replaced this one (one live stream per agent)",
                        acl.id
                    ))))
                    .await;
            }
            let mut live = live.lock().expect("live streams lock");
            if live.get(&acl.id).is_some_and(|l| l.generation == generation) {
                live.remove(&acl.id);
                crate::metrics::hub().agent_connected(&acl.id, false);
                crate::fleet::disconnected(&acl.id, ended_with.as_deref());
            }
            // `applier` (its NDC connection and slot) and `_ended` go here, in that order.
            drop(applier);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// The size of a message's batch once opened: what the stream's buffer is charged for it.
fn opened_len(msg: &AgentMessage) -> usize {
    match &msg.kind {
        Some(agent_message::Kind::Batch(b)) => wire::opened_size(&b.change_batch).max(1),
        _ => 1,
    }
}

/// A pipeline error as the agent is told it.
pub(crate) fn pipeline_status(e: &PipelineError) -> Status {
    match e {
        PipelineError::Apply(e) => apply_status(e),
        e => Status::internal(e.to_string()),
    }
}

/// A refused batch as the agent is told it.
fn refused_status(e: Refused) -> Status {
    match e {
        e @ Refused::TooLarge(_) => Status::out_of_range(e.to_string()),
        e @ Refused::NotYours { .. } => Status::permission_denied(e.to_string()),
        e => Status::invalid_argument(e.to_string()),
    }
}

fn decode(
    source_id: &str,
    msg: AgentMessage,
    max_changes: usize,
    max_bytes: usize,
) -> Result<(ChangeBatch, Vec<u8>), Status> {
    let spooled = match msg.kind {
        Some(agent_message::Kind::Batch(b)) => b,
        Some(agent_message::Kind::Hello(_)) => return Err(Status::invalid_argument("Hello sent twice on one stream")),
        // Taken by the reader before it decodes.
        Some(agent_message::Kind::Status(_)) => return Err(Status::internal("a status report reached the decoder")),
        None => return Err(Status::invalid_argument("message with no content")),
    };
    let envelope = Some((spooled.first_seq, spooled.last_seq));
    let batch =
        pipeline::decode(source_id, &spooled.change_batch, envelope, max_changes, max_bytes).map_err(refused_status)?;
    Ok((batch, spooled.change_batch))
}
