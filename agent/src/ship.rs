//! Shipping: spool → hub over the gRPC `Ingest` stream.
//!
//! The shipper sends spooled batches in seq order, keeps at most `max_in_flight_batches` unacknowledged,
//! and removes a batch from the spool only when the hub acknowledges it as durable in the NDC. On any
//! failure it reconnects with exponential backoff and starts again from the hub's `Welcome`, which says
//! how far the NDC already is: nothing is skipped and nothing re-sent is applied twice.
//!
//! A spooled batch larger than the hub's message limit (`hub.max_message_bytes`) is split into
//! pieces that fit ([`fit`]); a single change larger than the limit stops shipping with a message
//! saying which limits to raise, before anything after it is sent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use dongbo_connectors::model::{ChangeBatch, ChangeEvent};
use dongbo_connectors::wire;
use dongbo_proto::v1::{agent_message, hub_message, ingest_client::IngestClient, AgentMessage, Hello, Welcome};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use crate::config::HubLinkConfig;
use crate::spool::{Spool, SpoolError, SpooledBatch};

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
    /// The session was ended on purpose, to reconnect (e.g. with rotated TLS files).
    #[error("{0}")]
    Reconnect(String),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// One change is larger than the hub accepts in a message: shipping stops before it, so
    /// nothing after it reaches the hub out of order.
    #[error(
        "change {seq} encodes to {bytes} bytes, over the hub's message limit of {max}: raise limits.max_message_bytes \
         at the hub and hub.max_message_bytes here"
    )]
    TooLarge {
        /// Its seq.
        seq: u64,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A spooled batch did not decode when it had to be split.
    #[error("spooled batch {0} does not decode: {1}")]
    Undecodable(u64, String),
}

/// Hub messages (Welcome, Ack) are tiny; this bounds what a hostile hub can make the agent reserve.
const MAX_HUB_MESSAGE_BYTES: usize = 1 << 20;

/// A spooled batch as it goes on the wire: split into pieces of at most `max` bytes if it is
/// larger. Each piece is a batch of its own seq range; the hub acknowledges by seq, so the spooled
/// batch is released once its last piece is durable.
pub fn fit(source_id: &str, b: SpooledBatch, max: usize) -> Result<Vec<SpooledBatch>, ShipError> {
    // The hub's limit is on the batch opened, compressed or not.
    if wire::opened_size(&b.bytes) <= max {
        return Ok(vec![b]);
    }
    let batch = wire::decode_batch(&b.bytes).map_err(|e| ShipError::Undecodable(b.first_seq, e.to_string()))?;
    let mut out = Vec::new();
    split(source_id, batch.changes, max, &mut out)?;
    Ok(out)
}

fn split(source_id: &str, changes: Vec<ChangeEvent>, max: usize, out: &mut Vec<SpooledBatch>) -> Result<(), ShipError> {
    let (first_seq, last_seq) = (changes[0].seq, changes[changes.len() - 1].seq);
    let bytes = wire::encode_batch(ChangeBatch { source_id: source_id.to_string(), changes: changes.clone() });
    if bytes.len() <= max {
        out.push(SpooledBatch { first_seq, last_seq, bytes });
        return Ok(());
    }
    if changes.len() == 1 {
        return Err(ShipError::TooLarge { seq: first_seq, bytes: bytes.len(), max });
    }
    let mut first = changes;
    let second = first.split_off(first.len() / 2);
    split(source_id, first, max, out)?;
    split(source_id, second, max, out)
}

/// Ships the spool to the hub until `shutdown` turns true, reporting the agent's status every
/// `report_every` to hubs that take it.
pub async fn run(
    source_id: String,
    link: HubLinkConfig,
    spool: Arc<Spool>,
    shutdown: watch::Receiver<bool>,
    report_every: Duration,
) -> Result<(), SpoolError> {
    let token = link.resolve_token().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read hub.token_file; connecting without a token");
        String::new()
    });
    let progress = Progress::default();
    let files: Vec<std::path::PathBuf> =
        [&link.ca_file, &link.cert_file, &link.key_file].into_iter().flatten().cloned().collect();
    let hangups = hangups();
    keep_linked("hub", link.max_backoff_ms, &spool, shutdown, &progress, || {
        let session = session(&source_id, &link, &token, &spool, &progress, report_every);
        let mut stamps = dongbo_connectors::tls::FileStamps::new(files.clone());
        let mut hangup = hangups.clone();
        hangup.mark_unchanged();
        async move {
            // A session keeps the TLS files it connected with; a rotated certificate or CA is
            // picked up by reconnecting, which loses nothing: unacknowledged batches are sent again.
            let rotated = async {
                let mut tick = tokio::time::interval(TLS_FILES_CHECK);
                loop {
                    tokio::select! {
                        Ok(()) = hangup.changed() => return "SIGHUP",
                        _ = tick.tick() => if stamps.changed() { return "a TLS file changed" },
                    }
                }
            };
            tokio::select! {
                r = session => r,
                why = rotated => Err(ShipError::Reconnect(format!("{why}: reconnecting with the TLS files as they are now"))),
            }
        }
    })
    .await
}

/// A channel that changes at each SIGHUP (the agent reloads its link on it instead of dying, as
/// the signal's default would).
fn hangups() -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut signal) => {
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot listen for SIGHUP: TLS files are reloaded when they change only"),
    }
    rx
}

/// How often the link's TLS files are checked for a rotation.
const TLS_FILES_CHECK: Duration = Duration::from_secs(2);

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
                crate::metrics::agent().link_up(false);
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

/// The TLS settings of the link: the hub's CA and, for mutual TLS, this agent's certificate.
fn client_tls(link: &HubLinkConfig) -> Result<Option<ClientTlsConfig>, ShipError> {
    let Some(ca) = &link.ca_file else { return Ok(None) };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ShipError::Protocol(format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&link.cert_file, &link.key_file) {
        if let Ok(v) = dongbo_connectors::tls::certificate_validity(cert) {
            crate::metrics::agent().certificate_expires(v.not_after_s);
        }
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// Opens a channel to the hub (TLS when `link` has a CA).
pub async fn connect_link(link: &HubLinkConfig) -> Result<Channel, ShipError> {
    let mut endpoint = Endpoint::from_shared(link.url.clone())?;
    if let Some(tls) = client_tls(link)? {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(configure(endpoint).connect().await?)
}

fn configure(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .tcp_nodelay(true)
}

/// Opens the ingest stream, says Hello and returns the hub's Welcome with the live stream.
pub async fn open_stream(
    source_id: &str,
    link: &HubLinkConfig,
    token: &str,
) -> Result<(Welcome, mpsc::Sender<AgentMessage>, tonic::Streaming<dongbo_proto::v1::HubMessage>), ShipError> {
    let channel = connect_link(link).await?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(MAX_HUB_MESSAGE_BYTES)
        .max_encoding_message_size(link.max_message_bytes);
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
        Some(hub_message::Kind::Welcome(w)) => Ok((w, tx, inbound)),
        other => Err(ShipError::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

async fn session(
    source_id: &str,
    link: &HubLinkConfig,
    token: &str,
    spool: &Arc<Spool>,
    progress: &Progress,
    report_every: Duration,
) -> Result<(), ShipError> {
    let (welcome, tx, mut inbound) = open_stream(source_id, link, token).await?;
    let applied = welcome.applied_seq;
    // Older hubs refuse a message they do not know: they get no status.
    let reports = welcome.protocol_version >= dongbo_proto::STATUS_PROTOCOL_VERSION;
    let mut report_tick = tokio::time::interval(report_every);
    spool.ack(applied)?;
    info!(hub = %link.url, applied_seq = applied, spool_batches = spool.batch_count(), "connected to hub");
    crate::metrics::agent().link_up(true);
    let mut appended = spool.subscribe();
    let mut sent_upto = applied;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    loop {
        // Fill the window from the spool.
        if in_flight.len() < link.max_in_flight_batches {
            let room = link.max_in_flight_batches - in_flight.len();
            for spooled in spool.batches_after(sent_upto, room)? {
                sent_upto = spooled.last_seq;
                for mut b in fit(source_id, spooled, link.max_message_bytes)? {
                    in_flight.push_back(b.last_seq);
                    if link.compress && !wire::is_compressed(&b.bytes) {
                        b.bytes = wire::compress_batch(&b.bytes);
                    }
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
            _ = report_tick.tick(), if reports => {
                let msg = AgentMessage { kind: Some(agent_message::Kind::Status(crate::status::report(spool))) };
                if tx.send(msg).await.is_err() {
                    return Err(match inbound.message().await {
                        Err(status) => status.into(),
                        Ok(_) => ShipError::Protocol("hub closed the stream".into()),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongbo_connectors::model::{Column, Operation, TableId, TableSchema, Value};

    fn changes(n: u64, text_bytes: usize) -> Vec<ChangeEvent> {
        let schema = Arc::new(TableSchema::new(
            TableId::new("public", "t"),
            vec![
                Column { name: "id".into(), type_name: "int8".into(), type_oid: 20 },
                Column { name: "v".into(), type_name: "text".into(), type_oid: 25 },
            ],
            vec![0],
        ));
        (1..=n)
            .map(|seq| {
                let after = vec![Value::Int(seq as i64), Value::Text("x".repeat(text_bytes))];
                ChangeEvent::for_test(seq, &schema, Operation::Insert, vec![Value::Int(seq as i64)], Some(after))
            })
            .collect()
    }

    fn spooled(changes: Vec<ChangeEvent>) -> SpooledBatch {
        let (first_seq, last_seq) = (changes[0].seq, changes[changes.len() - 1].seq);
        SpooledBatch { first_seq, last_seq, bytes: wire::encode_batch(ChangeBatch { source_id: "s".into(), changes }) }
    }

    #[test]
    fn an_oversized_batch_is_split_into_contiguous_pieces_that_fit() {
        let whole = spooled(changes(100, 1000));
        assert!(whole.bytes.len() > 100_000);
        let pieces = fit("s", whole.clone(), 10_000).unwrap();
        assert!(pieces.len() >= 10, "{}", pieces.len());
        assert!(pieces.iter().all(|p| p.bytes.len() <= 10_000));
        let mut next = 1;
        for p in &pieces {
            assert_eq!(p.first_seq, next);
            let b = wire::decode_batch(&p.bytes).unwrap();
            assert_eq!((b.first_seq(), b.last_seq()), (p.first_seq, p.last_seq));
            next = p.last_seq + 1;
        }
        assert_eq!(next, 101, "every change is in exactly one piece");
        assert_eq!(fit("s", whole.clone(), usize::MAX).unwrap().len(), 1, "a batch that fits goes as it is");
    }

    #[test]
    fn a_single_change_over_the_limit_stops_with_the_limits_to_raise() {
        let err = fit("s", spooled(changes(3, 20_000)), 10_000).unwrap_err();
        assert!(matches!(err, ShipError::TooLarge { seq: 1, max: 10_000, .. }), "{err}");
        assert!(err.to_string().contains("limits.max_message_bytes"), "{err}");
    }
}
