//! Shipping: spool → hub over the gRPC `Ingest` stream.
//!
//! The shipper sends spooled batches in seq order, keeps at most `max_in_flight_batches` unacknowledged,
//! and removes a batch from the spool only when the hub acknowledges it as durable in the NDC. On any
//! failure it reconnects with exponential backoff and starts again from the hub's `Welcome`, which says
//! how far the NDC already is: nothing is skipped and nothing re-sent is applied twice.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use dongbo_proto::v1::{agent_message, hub_message, ingest_client::IngestClient, AgentMessage, Hello};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::config::HubLinkConfig;
use crate::spool::{Spool, SpoolError};

/// Why one shipping session ended.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The hub could not be reached.
    #[error("hub unreachable: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The hub ended the stream or refused it.
    #[error("hub refused the stream: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    /// The hub broke the protocol.
    #[error("hub protocol error: {0}")]
    Protocol(String),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// gRPC messages up to this size: one change can carry a TOASTed value of hundreds of MiB.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Ships the spool to the hub until `shutdown` turns true.
pub async fn run(
    source_id: String,
    link: HubLinkConfig,
    spool: Arc<Spool>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SpoolError> {
    let token = link.resolve_token().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read hub.token_file; connecting without a token");
        String::new()
    });
    let progress = Progress::default();
    keep_linked("hub", link.max_backoff_ms, &spool, shutdown, &progress, || {
        session(&source_id, &link, &token, &spool, &progress)
    })
    .await
}

/// A link session's failure: the spool's own errors end the agent, the rest only the session.
pub trait LinkFailure: std::fmt::Display {
    /// The spool error inside, if this is one.
    fn into_spool(self) -> Result<SpoolError, Self>
    where
        Self: Sized;
}

impl LinkFailure for ShipError {
    fn into_spool(self) -> Result<SpoolError, Self> {
        match self {
            ShipError::Spool(e) => Ok(e),
            other => Err(other),
        }
    }
}

/// Set by a session whenever the next hop made something durable; resets the reconnection backoff.
#[derive(Default)]
pub struct Progress(std::sync::atomic::AtomicBool);

impl Progress {
    /// Records that the link works.
    pub fn made(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs link sessions one after another, with exponential backoff between failures, until
/// `shutdown` turns true or the spool fails.
pub async fn keep_linked<E, F, Fut>(
    peer: &str,
    max_backoff_ms: u64,
    spool: &Spool,
    mut shutdown: watch::Receiver<bool>,
    progress: &Progress,
    mut session: F,
) -> Result<(), SpoolError>
where
    E: LinkFailure,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(200))
        .with_max_interval(Duration::from_millis(max_backoff_ms))
        .with_max_elapsed_time(None)
        .build();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result = tokio::select! {
            r = session() => r,
            _ = shutdown.changed() => continue,
        };
        // Only progress proves the link works: a peer that accepts and then refuses every batch
        // must not be hammered at the initial backoff interval.
        if progress.take() {
            backoff.reset();
        }
        match result.map_err(E::into_spool) {
            Ok(()) => return Ok(()),
            Err(Ok(e)) => return Err(e),
            Err(Err(e)) => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_millis(max_backoff_ms));
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, spool_batches = spool.batch_count(), spool_bytes = spool.bytes(), "link to {peer} down; changes stay in the spool");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

/// Opens a channel to the hub.
pub async fn connect(url: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_nodelay(true)
        .connect()
        .await
}

/// Opens the ingest stream, says Hello and returns the hub's applied seq with the live stream.
pub async fn open_stream(
    source_id: &str,
    link: &HubLinkConfig,
    token: &str,
) -> Result<(u64, mpsc::Sender<AgentMessage>, tonic::Streaming<dongbo_proto::v1::HubMessage>), ShipError> {
    let channel = connect(&link.url).await?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    if link.compress {
        client = client.send_compressed(CompressionEncoding::Zstd);
    }
    let (tx, rx) = mpsc::channel(4);
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            source_id: source_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: dongbo_proto::PROTOCOL_VERSION,
        })),
    };
    tx.send(hello).await.map_err(|_| ShipError::Protocol("stream closed before Hello".into()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let bearer = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| ShipError::Protocol("hub token has characters not allowed in a header".into()))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut inbound = client.stream(request).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(hub_message::Kind::Welcome(w)) => Ok((w.applied_seq, tx, inbound)),
        other => Err(ShipError::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

async fn session(
    source_id: &str,
    link: &HubLinkConfig,
    token: &str,
    spool: &Arc<Spool>,
    progress: &Progress,
) -> Result<(), ShipError> {
    let (applied, tx, mut inbound) = open_stream(source_id, link, token).await?;
    spool.ack(applied)?;
    info!(hub = %link.url, applied_seq = applied, spool_batches = spool.batch_count(), "connected to hub");
    let mut appended = spool.subscribe();
    let mut sent_upto = applied;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    loop {
        // Fill the window from the spool.
        if in_flight.len() < link.max_in_flight_batches {
            let room = link.max_in_flight_batches - in_flight.len();
            for b in spool.batches_after(sent_upto, room)? {
                sent_upto = b.last_seq;
                in_flight.push_back(b.last_seq);
                let msg = AgentMessage {
                    kind: Some(agent_message::Kind::Batch(dongbo_proto::v1::SpooledBatch {
                        first_seq: b.first_seq,
                        last_seq: b.last_seq,
                        change_batch: b.bytes,
                    })),
                };
                debug!(first_seq = b.first_seq, last_seq = b.last_seq, "batch sent");
                if tx.send(msg).await.is_err() {
                    // The hub ended the stream; its status says why (a refused batch, say).
                    return Err(match inbound.message().await {
                        Err(status) => status.into(),
                        Ok(_) => ShipError::Protocol("hub closed the stream".into()),
                    });
                }
            }
        }
        let window_full = in_flight.len() >= link.max_in_flight_batches;
        tokio::select! {
            msg = inbound.message() => match msg?.and_then(|m| m.kind) {
                Some(hub_message::Kind::Ack(ack)) => {
                    progress.made();
                    spool.ack(ack.durable_seq)?;
                    if dongbo_connectors::fault::armed_at("shipper-dies") {
                        panic!("fault injection: the shipper dies after an acknowledgement");
                    }
                    while in_flight.front().is_some_and(|&s| s <= ack.durable_seq) {
                        in_flight.pop_front();
                    }
                }
                Some(other) => return Err(ShipError::Protocol(format!("unexpected {other:?}"))),
                None => return Err(ShipError::Protocol("hub ended the stream".into())),
            },
            changed = appended.changed(), if !window_full => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
