//! The dongbo hub, at the National Data Center: accepts agent streams over gRPC and applies their
//! changes to the NDC Postgres exactly once, in source commit order per key.
//!
//! # Delivery contract
//! A change is acknowledged to its agent only after the NDC transaction that applied it (or put it in
//! quarantine) committed together with the source's new position (`dongbo.applied_position`). Changes
//! at or below that position are skipped, so replays after any crash change nothing.
//!
//! # Where fan-out and Kafka plug in
//! [`apply::NdcApplier::apply`] takes validated [`dongbo_connectors::model::ChangeBatch`]es of one source
//! in seq order; it does not care whether they came from the gRPC [`ingest`] stream or, later, a Kafka
//! partition (whose consumed offsets then belong in the same NDC transaction as the rows). Fan-out
//! needs a retained, replayable log of applied changes: the plan is a hub-local sled log keyed by
//! (source, seq), appended idempotently for every received batch before the agent's acknowledgement
//! is sent (so a batch applied but not yet logged when the hub dies is logged on the replay the missing
//! acknowledgement causes), and read by subscribers only up to the NDC's applied seq.
//!
//! - [`config`] — `hub.toml`.
//! - [`ingest`] — the gRPC service agents stream to.
//! - [`apply`] — planning and applying changes in the NDC, quarantine.

pub mod apply;
pub mod config;
pub mod ingest;

use std::future::Future;
use std::sync::Arc;

use dongbo_proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tracing::info;

use crate::config::HubConfig;
use crate::ingest::IngestService;

/// The hub could not run.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The NDC could not be prepared.
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// gRPC messages up to this size: one change can carry a TOASTed value of hundreds of MiB.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Prepares the NDC and serves agents on `listener` until `shutdown` completes.
pub async fn run(
    config: HubConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HubError> {
    let client = apply::connect(&config.ndc).await?;
    apply::bootstrap(&client).await?;
    drop(client);
    let addr = listener.local_addr().ok();
    info!(listen = ?addr, agents = config.agents.len(), "hub serving");
    let service = IngestServer::new(IngestService::new(Arc::new(config)))
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Acks are small messages: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to each one.
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
