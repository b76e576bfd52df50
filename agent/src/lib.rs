//! The dongbo agent: installed beside a local database, it captures every committed row change,
//! spools it durably on local disk, and ships it to the hub.
//!
//! # Delivery contract
//! source → spool: the source releases a position (Postgres: the slot's confirmed LSN) only after the
//! changes up to it are flushed to the spool together with the resume point, so a crash replays at most
//! what the resume point then drops. spool → hub: a batch leaves the spool only when the hub
//! acknowledged it durable in the NDC. Every change carries a seq that is never reused, and the hub
//! applies each seq at most once, so the whole path is exactly-once in effect.
//!
//! - [`config`] — `agent.toml`.
//! - [`spool`] — the sled spool.
//! - [`capture`] — source → spool.
//! - [`ship`] — spool → hub (gRPC).
//! - [`kafka`] — spool → Kafka topic (instead of gRPC).
//! - [`check`] — plain-words diagnosis for provincial IT.
//! - [`metrics`] — Prometheus metrics, `/healthz` and `/readyz`.
//! - [`status`] — `dongbo-agent status`.

pub mod capture;
pub mod check;
pub mod config;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod ship;
pub mod snapshot_progress;
pub mod source_log;
pub mod spool;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

/// The agent's memory budget (50 MiB) holds only with mimalloc's small-footprint options, set
/// before the first allocation.
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = dongbo_connectors::allocator::tune_small_footprint;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::capture::{Capture, CaptureError, Stopped};
use crate::config::{AgentConfig, SourceConfig};
use crate::spool::{Spool, SpoolError};

/// The agent stopped on an error it cannot retry.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Capture hit a definite error (setup problem, corrupt spool).
    #[error("capture stopped: {0}")]
    Capture(#[from] CaptureError),
    /// The spool could not be opened or written.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The config names neither a hub nor Kafka.
    #[error("agent.toml has neither a [hub] nor a [kafka] section")]
    NoLink,
    /// The shipper ended while capture was running: nothing would leave the spool any more.
    #[error("the shipper stopped ({0}); the agent stops too so that systemd restarts it")]
    ShipperStopped(String),
}

/// Marks `tables` of a stopped agent for a new snapshot at its next start, while the stream goes
/// on from where it is (the table's NDC copy is replaced by the snapshot, then follows the stream).
/// For a table that drifted in the NDC, or whose rows were quarantined and since repaired.
pub async fn resnapshot(config: &AgentConfig, tables: &[String]) -> Result<Vec<String>, ResnapshotError> {
    if matches!(config.source, SourceConfig::Poll(_)) {
        return Err(ResnapshotError::Polled);
    }
    let configured = config.source.table_ids();
    let mut wanted = Vec::new();
    for t in tables {
        let id = dongbo_connectors::model::TableId::parse(t)
            .filter(|id| configured.contains(id))
            .ok_or_else(|| ResnapshotError::NotCaptured(t.clone()))?;
        wanted.push(id);
    }
    let spool = Spool::open(&config.spool.path, config.spool.max_bytes).map_err(ResnapshotError::SpoolBusy)?;
    spool.forget_snapshots(&wanted, &configured).await.map_err(ResnapshotError::Spool)?;
    Ok(wanted.iter().map(ToString::to_string).collect())
}

/// Why a re-snapshot could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum ResnapshotError {
    /// The table is not in `source.tables`.
    #[error("{0} is not in source.tables: add it there instead (an added table is snapshotted at the next start)")]
    NotCaptured(String),
    /// The spool could not be opened: usually because the agent runs and holds it.
    #[error("cannot open the spool ({0}): stop the agent first (systemctl stop dongbo-agent), then ask again")]
    SpoolBusy(SpoolError),
    /// Writing the spool failed.
    #[error(transparent)]
    Spool(SpoolError),
    /// A polled source repairs drift itself.
    #[error(
        "a polled source needs no re-snapshot: its diff compares every row with what was shipped every \
         source.diff_interval_s and ships what differs"
    )]
    Polled,
}

/// Runs capture and shipping until `shutdown` turns true or capture meets a definite error. A new
/// value in `sources` (agent.toml's `[source]` reloaded) restarts capture with it, from the spool's
/// resume point: tables added are snapshotted online, tables removed stop being captured.
pub async fn run(
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut sources: watch::Receiver<SourceConfig>,
) -> Result<(), AgentError> {
    let spool = Arc::new(Spool::open(&config.spool.path, config.spool.max_bytes)?);
    info!(source_id = %config.source_id, spool_batches = spool.batch_count(), spool_bytes = spool.bytes(), "agent starting");
    if config.status.listen != "off" {
        tokio::spawn(metrics::serve(
            config.status.listen.clone(),
            config.source_id.clone(),
            spool.clone(),
            shutdown.clone(),
        ));
    }
    tokio::spawn(source_log::watch(sources.clone(), spool.clone(), config.status.report_interval(), shutdown.clone()));
    let shipper = match (&config.hub, &config.kafka) {
        (Some(hub), _) => tokio::spawn(ship::run(
            config.source_id.clone(),
            hub.clone(),
            spool.clone(),
            shutdown.clone(),
            config.status.report_interval(),
        )),
        #[cfg(feature = "kafka")]
        (None, Some(k)) => tokio::spawn(kafka::run(
            config.source_id.clone(),
            k.clone(),
            spool.clone(),
            shutdown.clone(),
            config.status.report_interval(),
        )),
        // Refused when the config is read; kept for the match.
        #[cfg(not(feature = "kafka"))]
        (None, Some(_)) => return Err(AgentError::NoLink),
        (None, None) => return Err(AgentError::NoLink),
    };
    let capture = Capture::new(
        &config.source_id,
        &spool,
        config.spool.batch_max_changes,
        Duration::from_millis(config.spool.batch_max_wait_ms),
    )
    .compressing(config.spool.compress);
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(500))
        .with_max_interval(Duration::from_secs(30))
        .with_max_elapsed_time(None)
        .build();
    let stopping = shutdown.clone();
    let capturing = async {
        let mut source = config.source.clone();
        sources.mark_unchanged();
        loop {
            let started = tokio::time::Instant::now();
            metrics::agent().capture_running(true);
            let ran = capture.run(&source, &mut shutdown, &mut sources).await;
            metrics::agent().capture_running(false);
            match ran {
                Ok(Stopped::Shutdown) => break Ok(()),
                Ok(Stopped::Reload) => {
                    // Validated when agent.toml was loaded again.
                    source = sources.borrow_and_update().clone();
                    info!("capture restarting with the reloaded [source]");
                }
                Err(e) if e.is_transient() => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                    }
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "capture interrupted; resuming from the spool's position");
                    metrics::agent().set_last_error(&e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    error!(error = %e, "capture stopped");
                    metrics::agent().set_last_error(&e.to_string());
                    break Err(AgentError::Capture(e));
                }
            }
        }
    };
    tokio::pin!(capturing);
    // The shipper is watched while capture runs: a shipper that died would let capture fill the
    // spool for hours before anyone noticed, so its end stops the agent at once, loudly.
    let mut shipper = Some(shipper);
    let result = tokio::select! {
        r = &mut capturing => r,
        ended = shipper.as_mut().expect("the shipper is running") => {
            shipper = None;
            let why = match ended {
                Ok(Ok(())) if *stopping.borrow() => None,
                Ok(Ok(())) => Some("it returned without being asked to".to_string()),
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("it failed: {e}")),
            };
            match why {
                None => capturing.await,
                Some(why) => {
                    error!(reason = %why, "the shipper stopped while capture was running; stopping the agent");
                    return Err(AgentError::ShipperStopped(why));
                }
            }
        }
    };
    let Some(shipper) = shipper else { return result };
    if result.is_ok() {
        match shipper.await {
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => warn!(error = %e, "shipper task failed"),
            Ok(Ok(())) => {}
        }
    } else {
        shipper.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allocator_options_hold_from_the_start() {
        assert!(dongbo_connectors::allocator::tuned());
    }
}
