//! Watches how much log the source server still keeps for this agent, every
//! `status.report_interval_s`, and exports it (`dongbo_agent_source_log_*`): the WAL behind the
//! Postgres slot, and with `max_slot_wal_keep_size` how much more before the server gives the slot
//! up; the MySQL binlog from the spool's resume position, and how long the server keeps it at least.
//! A polled source reads no log: nothing is watched.
//!
//! Read with its own short query connection, never the capture's: a failed probe is logged once
//! and tried again, and never stops capture.

use std::sync::Arc;
use std::time::Duration;

use dongbo_connectors::model::Position;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::SourceConfig;
use crate::spool::Spool;

/// Probes the source named by `sources` every `every` until `shutdown` turns true.
pub async fn watch(
    mut sources: watch::Receiver<SourceConfig>,
    spool: Arc<Spool>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pg_client: Option<tokio_postgres::Client> = None;
    let mut warned = false;
    loop {
        let source = sources.borrow_and_update().clone();
        let probed = match &source {
            SourceConfig::Postgres(pg) => {
                if pg_client.as_ref().is_none_or(|c| c.is_closed()) {
                    pg_client = pg.connect_query().await.ok();
                }
                match &pg_client {
                    Some(c) => dongbo_connectors::postgres::retention::retained_log(c, &pg.slot)
                        .await
                        .map(|r| r.map(|r| ("wal", r)))
                        .map_err(|e| e.to_string()),
                    None => Err("cannot connect to the source".to_string()),
                }
            }
            SourceConfig::MySql(my) => match spool.resume_point().map(|r| r.committed_end) {
                Ok(Some(Position::MySql(at))) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    let newest = crate::metrics::agent().newest_commit_s();
                    dongbo_connectors::mysql::retention::retained_log(my, at, newest, now)
                        .await
                        .map(|r| Some(("binlog", r)))
                        .map_err(|e| e.to_string())
                }
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            SourceConfig::Poll(_) => return,
        };
        match probed {
            Ok(Some((log, retained))) => {
                debug!(log, retained_bytes = retained.retained_bytes, "source log probed");
                crate::metrics::agent().source_log(log, &retained);
                warned = false;
            }
            Ok(None) => {}
            Err(e) if !warned => {
                warn!(error = %e, "cannot read how much log the source keeps for this agent; trying again");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
            Ok(()) = sources.changed() => {}
        }
    }
}
