//! The dongbo hub, at the National Data Center: accepts agent streams over gRPC and applies their
//! changes to the NDC Postgres exactly once, in source commit order per key.
//!
//! # Delivery contract
//! A change is acknowledged to its agent only after the NDC transaction that applied it (or put it in
//! quarantine) committed together with the source's new position (`dongbo.applied_position`). Changes
//! at or below that position are skipped, so replays after any crash change nothing.
//!
//! # Fan-out
//! After the NDC commit and before the agent's acknowledgement, the applied changes and the domain
//! events they raised are appended to the hub's fan-out log ([`fanout`]), from which each
//! subscription is delivered at its own pace, projected to its purpose, with every delivery in the
//! hash-chained [`audit`] log.
//!
//! # Kafka
//! [`apply::NdcApplier`] applies one *stream* of a source: its gRPC [`ingest`] stream, or one
//! partition of its Kafka topic ([`kafka`]), whose consumed offset is written in the same NDC
//! transaction as the rows.
//!
//! - [`config`] — `hub.toml`.
//! - [`ingest`] — the gRPC service agents stream to.
//! - [`kafka`] — the hub as a Kafka consumer-group member, applying agents' topics.
//! - [`apply`] — planning and applying changes in the NDC, quarantine.
//! - [`fanout`] — subscriptions, events, the log and delivery.
//! - [`audit`] — the delivery audit log.
//! - [`admin`] — the operators' HTTP API and the dashboard's pages ([`dashboard`] renders them).
//! - [`auth`] — who a peer is: one identity per connection, for ingest, Subscribe and admin alike.
//! - [`listener`] — accepting connections within limits.
//! - [`metrics`] — the Prometheus series the admin API serves.
//! - [`fleet`] — the fleet registry in the NDC.
//! - [`dictionary`] — the national dictionary: mappings, rules, the administrative-unit remap;
//!   read again from `hub.toml` on SIGHUP.
//! - [`quarantine`] — listing, showing, replaying and dropping quarantined changes.

pub mod admin;
pub mod admin_listener;
pub mod apply;
pub mod audit;
pub mod auth;
pub mod certs;
pub mod config;
pub mod dashboard;
pub mod dictionary;
pub mod fanout;
pub mod fleet;
pub(crate) mod grpc_peer;
pub mod ingest;
pub mod kafka;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod quarantine;
pub mod server_tls;

use std::future::Future;
use std::sync::Arc;

use dongbo_proto::v1::ingest_server::IngestServer;
use dongbo_proto::v1::subscribe_server::SubscribeServer;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tracing::info;

use crate::config::HubConfig;
use crate::fanout::grpc::SubscribeService;
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
    /// Fan-out could not start.
    #[error(transparent)]
    Fanout(#[from] fanout::FanoutError),
    /// The admin API could not listen.
    #[error("admin API: {0}")]
    Admin(#[from] std::io::Error),
    /// The Kafka consumer could not start.
    #[error("Kafka consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The audit chain's signing key or checkpoints could not be used.
    #[error(transparent)]
    Checkpoint(#[from] audit::checkpoint::CheckpointError),
    /// The TLS certificate, key, client CA or revocation list could not be loaded.
    #[error("{0}")]
    Tls(String),
    /// The national dictionary's mappings or remap table could not be used.
    #[error("{0}")]
    Dictionary(String),
    /// Replays committed before the hub stopped could not be logged.
    #[error("quarantine replays: {0}")]
    Quarantine(#[from] quarantine::QuarantineError),
}

/// A subscriber sends only Open and Ack messages, each well under a kilobyte.
const MAX_SUBSCRIBER_MESSAGE_BYTES: usize = 64 << 10;

/// Prepares the NDC and serves agents on `listener` until `shutdown` completes; then stops every
/// stream (each finishes or abandons its NDC transaction and acknowledges what is durable) and
/// returns once they have ended.
pub async fn run(
    config: HubConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let mut client = apply::connect(&config.ndc).await?;
    apply::bootstrap(&mut client).await?;
    drop(client);
    dictionary::install(dictionary::Dictionary::load(&config.national).map_err(HubError::Dictionary)?);
    let fanout = fanout::Fanout::start(&config).await?;
    // A replay the hub died after committing is logged before anything else is served.
    quarantine::log_replays(&apply::connect(&config.ndc).await?, &fanout.log).await?;
    metrics::hub().know_agents(config.agents.iter().map(|a| a.id.as_str()));
    let addr = listener.local_addr().ok();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let hub_name = format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
        addr.map(|a| a.port()).unwrap_or_default()
    );
    let fleet_writer = tokio::spawn(fleet::run(config.ndc.clone(), hub_name, stop_rx.clone()));
    let auth = Arc::new(auth::Authenticator::new(&config));
    let (anchor, signing_key) = audit::Anchor::load_or_create(&config)?;
    anchor.checkpoints()?;
    tokio::spawn(audit::run_checkpoints(
        config.ndc.clone(),
        signing_key,
        anchor.store.clone(),
        config.audit_checkpoint_interval(),
        config.audit_verify_interval(),
        config.audit.witness_url.clone(),
        stop_rx.clone(),
    ));
    let server_tls = config.tls.as_ref().map(server_tls::ServerTls::load).transpose().map_err(HubError::Tls)?;
    if let Some(t) = &server_tls {
        t.watch(stop_rx.clone());
    }
    reload_dictionary_on_hangup(config.loaded_from.clone(), stop_rx.clone());
    let handshake = std::time::Duration::from_millis(config.limits.handshake_timeout_ms);
    if let Some(admin) = config.admin.clone() {
        let guarded = listener::GuardedListener::new(TcpListener::bind(&admin.listen).await?, &config.limits, "admin");
        let https = server_tls.is_some();
        let admin_listener = admin_listener::AdminListener::start(guarded, server_tls.clone(), handshake)?;
        info!(listen = %admin.listen, https, "admin API serving");
        let mut stop = stop_rx.clone();
        let (f, a) = (fanout.clone(), auth.clone());
        let hub_config = Arc::new(config.clone());
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = admin::serve(f, a, hub_config, anchor, admin_listener, stopped).await {
                tracing::warn!(error = %e, "admin API stopped");
            }
        });
    }
    let config = Arc::new(config);
    if config.kafka.is_some() {
        let (c, f, stop) = (config.clone(), fanout.clone(), stop_rx.clone());
        let consumer = tokio::spawn(kafka::run(c, f, stop));
        tokio::spawn(async move {
            match consumer.await {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "Kafka consumer stopped: the hub no longer applies Kafka topics")
                }
                Err(e) => tracing::error!(error = %e, "Kafka consumer task failed"),
                Ok(Ok(())) => {}
            }
        });
    }
    info!(listen = ?addr, agents = config.agents.len(), subscribers = config.subscribers.len(), kafka = config.kafka.is_some(), "hub serving");
    let limits = config.limits.clone();
    let tls = config.tls.clone();
    if tls.is_none() {
        tracing::warn!("serving gRPC in clear text (insecure_plaintext_demo): tokens and citizens' data cross the network readable");
    }
    let service = IngestServer::new(IngestService::new(config, auth.clone(), fanout.clone(), stop_rx.clone()))
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let subscribe = SubscribeServer::new(SubscribeService::new(fanout, auth, stop_rx.clone()))
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(MAX_SUBSCRIBER_MESSAGE_BYTES);
    let guarded = listener::GuardedListener::new(listener, &limits, "grpc");
    // The streams end when told to stop, which lets the graceful shutdown below complete.
    let stopping = async move {
        shutdown.await;
        info!("shutdown requested: stopping streams");
        let _ = stop_tx.send(true);
    };
    // Acks are small messages: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to each one
    // (the guarded listener sets it on every connection).
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(listener::keepalive(&limits)))
        .http2_keepalive_timeout(Some(listener::keepalive(&limits)))
        .add_service(service)
        .add_service(subscribe);
    let result = match &server_tls {
        Some(t) => {
            let ready = t.incoming(guarded, server_tls::Listener::Grpc, handshake);
            let incoming = futures::stream::unfold(ready, |mut ready| async move {
                let (io, _) = ready.recv().await?;
                Some((Ok::<_, std::io::Error>(io), ready))
            });
            router.serve_with_incoming_shutdown(incoming, stopping).await
        }
        None => router.serve_with_incoming_shutdown(guarded.into_stream(), stopping).await,
    };
    drop(stop_rx);
    // Its last write: the streams that just ended show as disconnected.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), fleet_writer).await;
    result?;
    info!("hub stopped");
    Ok(())
}

/// On SIGHUP, reads `[national]` of the hub's config file again (and its `remap_file`) and puts
/// the new dictionary in use for the batches that follow; a file that does not load leaves the
/// dictionary in use as it was. Listening also keeps SIGHUP from killing the hub, its default.
fn reload_dictionary_on_hangup(path: Option<std::path::PathBuf>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the national dictionary reloads only with a restart");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                got = hangup.recv() => if got.is_none() { return },
            }
            let Some(path) = &path else {
                info!("SIGHUP: the hub's configuration was not read from a file; the dictionary stays");
                continue;
            };
            let loaded = HubConfig::load(path)
                .map_err(|e| e.to_string())
                .and_then(|c| dictionary::Dictionary::load(&c.national));
            match loaded {
                Ok(d) => {
                    info!(file = %path.display(), remap = %d.remap.version(), "SIGHUP: national dictionary reloaded");
                    dictionary::install(d);
                }
                Err(e) => tracing::warn!(file = %path.display(), error = %e,
                    "SIGHUP: the national dictionary did not reload; the one in use stays"),
            }
        }
    });
}
