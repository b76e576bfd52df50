//! The fleet registry: every configured agent and what the hub last heard of it (transport,
//! version, host, last contact, last error, spool, lag), kept in the NDC (`dongbo.fleet`) so every
//! hub of a consumer group shows the same fleet and a restart forgets nothing.
//!
//! # Contract
//! - A hub writes the rows of the agents it hears from (a gRPC stream, or a Kafka partition it
//!   applies), at most every [`FLUSH_EVERY`]: a crash loses at most that much of the registry's
//!   freshness, never an agent (the configured ones are listed whether or not they ever spoke).
//! - What an agent reports of itself ([`AgentStatusReport`]) is bounded before it is kept: the host
//!   name and the last error are cut to [`dongbo_proto::STATUS_HOST_MAX`] and
//!   [`dongbo_proto::STATUS_ERROR_MAX`] bytes, control characters dropped; it is shown, never
//!   interpreted, and goes to the NDC as a bound parameter. An agent can only describe itself: the
//!   row is keyed by the identity its connection authenticated, not by anything it sends. A report
//!   over [`dongbo_proto::STATUS_REPORT_MAX`] bytes is refused whole ([`ReportTooLarge`]): the gRPC
//!   stream ends with `InvalidArgument`, a Kafka record is quarantined.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use dongbo_proto::v1::AgentStatusReport;
use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::warn;

use crate::config::{HubConfig, NdcConfig};

/// How often changed registry rows are written to the NDC.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// The registry's table, created at bootstrap.
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS dongbo.fleet (
    source_id text PRIMARY KEY,
    transport text NOT NULL,
    agent_version text,
    host text,
    peer text,
    connected boolean NOT NULL DEFAULT false,
    last_contact timestamptz,
    last_error text,
    spool_bytes bigint,
    spool_limit_bytes bigint,
    spool_batches bigint,
    capture_running boolean,
    oldest_unacknowledged_s double precision,
    changes_spooled bigint,
    reported_at timestamptz,
    written_by text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE dongbo.fleet ADD COLUMN IF NOT EXISTS snapshot_rows bigint,
    ADD COLUMN IF NOT EXISTS snapshot_estimated_rows bigint,
    ADD COLUMN IF NOT EXISTS source_log text,
    ADD COLUMN IF NOT EXISTS source_log_retained_bytes bigint,
    ADD COLUMN IF NOT EXISTS source_log_headroom_bytes bigint,
    ADD COLUMN IF NOT EXISTS source_log_headroom_s double precision,
    ADD COLUMN IF NOT EXISTS certificate_expiry timestamptz;";

/// How an agent reaches the hubs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A gRPC ingest stream.
    Grpc,
    /// Its Kafka topic.
    Kafka,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Kafka => "kafka",
        }
    }
}

/// What this hub knows of one agent, not yet written.
#[derive(Debug, Clone, Default)]
struct Heard {
    transport: &'static str,
    agent_version: Option<String>,
    peer: Option<String>,
    connected: bool,
    last_contact_us: Option<i64>,
    last_error: Option<String>,
    report: Option<AgentStatusReport>,
    reported_at_us: Option<i64>,
}

/// The registry's in-memory side: what changed since the last write, and recent samples.
#[derive(Default)]
struct Registry {
    heard: HashMap<String, Heard>,
    dirty: HashSet<String>,
    samples: HashMap<String, std::collections::VecDeque<Sample>>,
}

/// One agent's counters at one moment, for the dashboard's recent throughput and lag.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When (Unix seconds).
    pub at_s: f64,
    /// Changes applied since the hub started.
    pub applied: u64,
    /// Apply lag then.
    pub lag_s: Option<f64>,
}

/// Samples kept per agent: ten minutes at one per [`FLUSH_EVERY`].
const SAMPLES: usize = 300;

/// Takes a sample of every known agent.
fn sample() {
    let m = crate::metrics::hub();
    let at_s = now_us() as f64 / 1e6;
    let taken: Vec<(String, Sample)> = m
        .agent_ids()
        .into_iter()
        .map(|id| {
            let s = Sample { at_s, applied: m.applied_total(&id), lag_s: m.apply_lag(&id) };
            (id, s)
        })
        .collect();
    let mut r = registry().lock().expect("fleet lock");
    for (id, s) in taken {
        let q = r.samples.entry(id).or_default();
        if q.len() >= SAMPLES {
            q.pop_front();
        }
        q.push_back(s);
    }
}

/// Agent `id`'s recent samples, oldest first.
pub fn samples(id: &str) -> Vec<Sample> {
    registry().lock().expect("fleet lock").samples.get(id).map(|q| q.iter().copied().collect()).unwrap_or_default()
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Cuts `s` to `max` bytes on a character boundary, without control characters.
fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

fn update(id: &str, f: impl FnOnce(&mut Heard)) {
    let mut r = registry().lock().expect("fleet lock");
    f(r.heard.entry(id.to_string()).or_default());
    r.dirty.insert(id.to_string());
}

/// Agent `id` opened a stream (`peer` its address) saying it runs `agent_version`.
pub fn connected(id: &str, transport: Transport, agent_version: Option<&str>, peer: Option<String>) {
    update(id, |h| {
        h.transport = transport.name();
        if let Some(v) = agent_version {
            h.agent_version = Some(bounded(v, 64));
        }
        h.peer = peer;
        h.connected = true;
        h.last_contact_us = Some(now_us());
    });
}

/// Agent `id`'s stream ended, with `error` if it ended badly.
pub fn disconnected(id: &str, error: Option<&str>) {
    update(id, |h| {
        h.connected = false;
        h.last_contact_us = Some(now_us());
        if let Some(e) = error {
            h.last_error = Some(bounded(e, dongbo_proto::STATUS_ERROR_MAX));
        }
    });
}

/// Something of agent `id` arrived (a Kafka message applied, say).
pub fn contact(id: &str, transport: Transport) {
    update(id, |h| {
        h.transport = transport.name();
        if transport == Transport::Kafka {
            // A Kafka agent has no stream: heard from is as connected as it gets.
            h.connected = true;
        }
        h.last_contact_us = Some(now_us());
    });
}

/// Agent `id` reported its status.
pub fn report(id: &str, transport: Transport, report: AgentStatusReport) -> Result<(), ReportTooLarge> {
    let len = prost::Message::encoded_len(&report);
    if len > dongbo_proto::STATUS_REPORT_MAX {
        return Err(ReportTooLarge(len));
    }
    let report = AgentStatusReport {
        host: bounded(&report.host, dongbo_proto::STATUS_HOST_MAX),
        last_error: bounded(&report.last_error, dongbo_proto::STATUS_ERROR_MAX),
        agent_version: bounded(&report.agent_version, 64),
        oldest_unacknowledged_s: if report.oldest_unacknowledged_s.is_finite() {
            report.oldest_unacknowledged_s.max(0.0)
        } else {
            0.0
        },
        ..report
    };
    crate::metrics::hub().reported(id, &report);
    update(id, |h| {
        h.transport = transport.name();
        if transport == Transport::Kafka {
            h.connected = true;
        }
        if !report.agent_version.is_empty() {
            h.agent_version = Some(report.agent_version.clone());
        }
        if !report.last_error.is_empty() {
            h.last_error = Some(report.last_error.clone());
        }
        h.last_contact_us = Some(now_us());
        h.reported_at_us = Some(now_us());
        h.report = Some(report);
    });
    Ok(())
}

/// A status report over [`dongbo_proto::STATUS_REPORT_MAX`] bytes, refused whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a status report of {0} bytes is over the {max} bytes a hub takes", max = dongbo_proto::STATUS_REPORT_MAX)]
pub struct ReportTooLarge(pub usize);

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Writes the rows that changed; those that could not be written stay changed.
async fn flush(client: &Client, hub: &str) -> Result<(), tokio_postgres::Error> {
    let rows: Vec<(String, Heard)> = {
        let mut r = registry().lock().expect("fleet lock");
        let ids: Vec<String> = r.dirty.drain().collect();
        ids.into_iter().filter_map(|id| r.heard.get(&id).cloned().map(|h| (id, h))).collect()
    };
    for (i, (id, h)) in rows.iter().enumerate() {
        let rep = h.report.as_ref();
        let written = client
            .execute(
                "INSERT INTO dongbo.fleet (source_id, transport, agent_version, host, peer, connected, last_contact, \
                   last_error, spool_bytes, spool_limit_bytes, spool_batches, capture_running, oldest_unacknowledged_s, \
                   changes_spooled, reported_at, written_by, updated_at, snapshot_rows, snapshot_estimated_rows, \
                   source_log, source_log_retained_bytes, source_log_headroom_bytes, source_log_headroom_s, \
                   certificate_expiry) \
                 VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::float8 / 1e6), $8, $9, $10, $11, $12, $13, $14, \
                   to_timestamp($15::float8 / 1e6), $16, now(), $17, $18, $19, $20, $21, $22, to_timestamp($23::float8)) \
                 ON CONFLICT (source_id) DO UPDATE SET transport = EXCLUDED.transport, \
                   agent_version = COALESCE(EXCLUDED.agent_version, fleet.agent_version), \
                   host = COALESCE(EXCLUDED.host, fleet.host), peer = COALESCE(EXCLUDED.peer, fleet.peer), \
                   connected = EXCLUDED.connected, last_contact = EXCLUDED.last_contact, \
                   last_error = COALESCE(EXCLUDED.last_error, fleet.last_error), \
                   spool_bytes = COALESCE(EXCLUDED.spool_bytes, fleet.spool_bytes), \
                   spool_limit_bytes = COALESCE(EXCLUDED.spool_limit_bytes, fleet.spool_limit_bytes), \
                   spool_batches = COALESCE(EXCLUDED.spool_batches, fleet.spool_batches), \
                   capture_running = COALESCE(EXCLUDED.capture_running, fleet.capture_running), \
                   oldest_unacknowledged_s = COALESCE(EXCLUDED.oldest_unacknowledged_s, fleet.oldest_unacknowledged_s), \
                   changes_spooled = COALESCE(EXCLUDED.changes_spooled, fleet.changes_spooled), \
                   reported_at = COALESCE(EXCLUDED.reported_at, fleet.reported_at), \
                   written_by = EXCLUDED.written_by, updated_at = now(), \
                   snapshot_rows = CASE WHEN EXCLUDED.reported_at IS NULL THEN fleet.snapshot_rows ELSE EXCLUDED.snapshot_rows END, \
                   snapshot_estimated_rows = CASE WHEN EXCLUDED.reported_at IS NULL THEN fleet.snapshot_estimated_rows \
                     ELSE EXCLUDED.snapshot_estimated_rows END, \
                   source_log = COALESCE(EXCLUDED.source_log, fleet.source_log), \
                   source_log_retained_bytes = COALESCE(EXCLUDED.source_log_retained_bytes, fleet.source_log_retained_bytes), \
                   source_log_headroom_bytes = COALESCE(EXCLUDED.source_log_headroom_bytes, fleet.source_log_headroom_bytes), \
                   source_log_headroom_s = COALESCE(EXCLUDED.source_log_headroom_s, fleet.source_log_headroom_s), \
                   certificate_expiry = COALESCE(EXCLUDED.certificate_expiry, fleet.certificate_expiry)",
                &[
                    id,
                    &h.transport,
                    &h.agent_version,
                    &rep.map(|r| r.host.clone()).filter(|s| !s.is_empty()),
                    &h.peer,
                    &h.connected,
                    &h.last_contact_us.map(|t| t as f64),
                    &h.last_error,
                    &rep.map(|r| to_i64(r.spool_bytes)),
                    &rep.map(|r| to_i64(r.spool_limit_bytes)),
                    &rep.map(|r| to_i64(r.spool_batches)),
                    &rep.map(|r| r.capture_running),
                    &rep.map(|r| r.oldest_unacknowledged_s),
                    &rep.map(|r| to_i64(r.changes_spooled)),
                    &h.reported_at_us.map(|t| t as f64),
                    &hub,
                    // A snapshot's columns are null once none runs.
                    &rep.filter(|r| r.snapshot_running).map(|r| to_i64(r.snapshot_rows)),
                    &rep.filter(|r| r.snapshot_running).map(|r| to_i64(r.snapshot_estimated_rows)),
                    &rep.map(|r| r.source_log.clone()).filter(|l| matches!(l.as_str(), "wal" | "binlog")),
                    &rep.filter(|r| !r.source_log.is_empty()).map(|r| to_i64(r.source_log_retained_bytes)),
                    &rep.and_then(|r| r.source_log_headroom_bytes).map(to_i64),
                    &rep.and_then(|r| r.source_log_headroom_s).filter(|h| h.is_finite()),
                    &rep.map(|r| r.certificate_expiry_s).filter(|t| *t > 0).map(|t| t as f64),
                ],
            )
            .await;
        if let Err(e) = written {
            let mut r = registry().lock().expect("fleet lock");
            r.dirty.extend(rows[i..].iter().map(|(id, _)| id.clone()));
            return Err(e);
        }
    }
    Ok(())
}

/// Writes the registry's changes to the NDC every [`FLUSH_EVERY`] until `stop`, then once more.
pub async fn run(ndc: NdcConfig, hub: String, mut stop: watch::Receiver<bool>) {
    let mut client: Option<Client> = None;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        sample();
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::apply::connect(&ndc).await.ok();
        }
        if let Some(c) = &client {
            if let Err(e) = flush(c, &hub).await {
                warn!(error = %e, "cannot write the fleet registry; retrying");
                client = None;
            }
        }
        if stopping {
            return;
        }
    }
}

/// One agent as the registry shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct FleetEntry {
    /// The agent's id.
    pub source_id: String,
    /// Its province (hub.toml), if configured.
    pub province: Option<String>,
    /// `grpc` or `kafka`; none before it was ever heard from.
    pub transport: Option<String>,
    /// The agent's version.
    pub agent_version: Option<String>,
    /// Its host name, as it reports it.
    pub host: Option<String>,
    /// The address its stream came from.
    pub peer: Option<String>,
    /// A live stream (gRPC), or heard from lately (Kafka).
    pub connected: bool,
    /// When it was last heard from (RFC 3339), none if never.
    pub last_contact: Option<String>,
    /// Seconds since then.
    pub silence_s: Option<f64>,
    /// The last error it reported or its stream ended with.
    pub last_error: Option<String>,
    /// Its spool, as last reported.
    pub spool_bytes: Option<i64>,
    /// Its spool's limit.
    pub spool_limit_bytes: Option<i64>,
    /// Batches in its spool.
    pub spool_batches: Option<i64>,
    /// Whether its capture was running.
    pub capture_running: Option<bool>,
    /// Rows its snapshot under way has read, none when no snapshot runs.
    pub snapshot_rows: Option<i64>,
    /// The rows that snapshot expects in all (0 when unknown).
    pub snapshot_estimated_rows: Option<i64>,
    /// `wal` or `binlog`: the log its source keeps for it, once read.
    pub source_log: Option<String>,
    /// Bytes of that log kept for it.
    pub source_log_retained_bytes: Option<i64>,
    /// How much more the server keeps, when bounded by size.
    pub source_log_headroom_bytes: Option<i64>,
    /// How long the server keeps its position at least, when bounded by time.
    pub source_log_headroom_s: Option<f64>,
    /// When its client certificate expires (RFC 3339), if it has one.
    pub certificate_expiry: Option<String>,
    /// Changes applied to the NDC, all its streams together.
    pub changes_applied: i64,
    /// Changes quarantined.
    pub changes_quarantined: i64,
    /// When the NDC last applied one of its changes (RFC 3339).
    pub last_applied: Option<String>,
    /// From the source commit of its newest change applied to its NDC commit, in seconds, if this
    /// hub applied one since it started.
    pub lag_s: Option<f64>,
    /// `green` (up), `amber` (up, lag over 5 min) or `red` (down, or never heard from).
    pub health: String,
}

/// A Kafka agent silent longer than this (three default status intervals) shows as down.
const KAFKA_LIVE_S: f64 = 90.0;
/// Lag past this is amber.
const LAG_AMBER_S: f64 = 300.0;

/// Every configured agent with what the NDC's registry holds of it.
pub async fn list(client: &Client, config: &HubConfig) -> Result<Vec<FleetEntry>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT source_id, transport, agent_version, host, peer, connected, \
               to_char(last_contact AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
               EXTRACT(EPOCH FROM now() - last_contact)::float8, last_error, spool_bytes, spool_limit_bytes, \
               spool_batches, capture_running, snapshot_rows, snapshot_estimated_rows, source_log, \
               source_log_retained_bytes, source_log_headroom_bytes, source_log_headroom_s, \
               to_char(certificate_expiry AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM dongbo.fleet",
            &[],
        )
        .await?;
    let mut by_id: HashMap<String, tokio_postgres::Row> = rows.into_iter().map(|r| (r.get(0), r)).collect();
    let mut out = Vec::with_capacity(config.agents.len());
    for a in &config.agents {
        let mut streams = vec![a.id.clone()];
        if let Some(k) = &config.kafka {
            streams.push(format!("{}/%", k.topic_of(&a.id)));
        }
        let applied = client
            .query_one(
                "SELECT COALESCE(sum(changes_applied), 0)::int8, COALESCE(sum(changes_quarantined), 0)::int8, \
                   to_char(max(updated_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
                 FROM dongbo.applied_position WHERE source_id = $1 OR source_id LIKE $2",
                &[&streams[0], &streams.get(1).cloned().unwrap_or_else(|| streams[0].clone())],
            )
            .await?;
        let row = by_id.remove(&a.id);
        let get = |i: usize| row.as_ref().and_then(|r| r.get::<_, Option<String>>(i));
        let silence_s: Option<f64> = row.as_ref().and_then(|r| r.get(7));
        let transport: Option<String> = row.as_ref().map(|r| r.get(1));
        // A Kafka agent has no stream: it is up while its messages and status records keep coming.
        let connected = match transport.as_deref() {
            Some("kafka") => silence_s.is_some_and(|s| s < KAFKA_LIVE_S),
            _ => row.as_ref().is_some_and(|r| r.get::<_, bool>(5)),
        };
        let lag_s = crate::metrics::hub().apply_lag(&a.id);
        // Down is red at once: an operator on night duty wants to see a stopped agent, not wait
        // for the alert's 15 minutes. Up but late is amber.
        let health = if !connected {
            "red"
        } else if lag_s.is_some_and(|l| l > LAG_AMBER_S) {
            "amber"
        } else {
            "green"
        };
        out.push(FleetEntry {
            source_id: a.id.clone(),
            province: a.province.clone(),
            transport,
            agent_version: get(2),
            host: get(3),
            peer: get(4),
            connected,
            last_contact: get(6),
            silence_s: if connected { Some(0.0) } else { silence_s.map(|s| s.max(0.0)) },
            last_error: get(8),
            spool_bytes: row.as_ref().and_then(|r| r.get(9)),
            spool_limit_bytes: row.as_ref().and_then(|r| r.get(10)),
            spool_batches: row.as_ref().and_then(|r| r.get(11)),
            capture_running: row.as_ref().and_then(|r| r.get(12)),
            snapshot_rows: row.as_ref().and_then(|r| r.get(13)),
            snapshot_estimated_rows: row.as_ref().and_then(|r| r.get(14)),
            source_log: get(15),
            source_log_retained_bytes: row.as_ref().and_then(|r| r.get(16)),
            source_log_headroom_bytes: row.as_ref().and_then(|r| r.get(17)),
            source_log_headroom_s: row.as_ref().and_then(|r| r.get(18)),
            certificate_expiry: get(19),
            changes_applied: applied.get(0),
            changes_quarantined: applied.get(1),
            last_applied: applied.get(2),
            lag_s,
            health: health.into(),
        });
    }
    Ok(out)
}

/// The fleet as a table for `dongbo-hub status`.
pub fn render(entries: &[FleetEntry]) -> String {
    let mut out = format!(
        "{:<22} {:<8} {:<6} {:<6} {:<10} {:>10} {:>12} {:>12} {:>8}  {}\n",
        "AGENT", "PROVINCE", "HEALTH", "LINK", "TRANSPORT", "SILENCE", "SPOOL", "APPLIED", "LAG", "LAST ERROR"
    );
    for e in entries {
        let dash = || "-".to_string();
        out.push_str(&format!(
            "{:<22} {:<8} {:<6} {:<6} {:<10} {:>10} {:>12} {:>12} {:>8}  {}\n",
            e.source_id,
            e.province.clone().unwrap_or_else(dash),
            e.health,
            if e.connected { "up" } else { "down" },
            e.transport.clone().unwrap_or_else(dash),
            e.silence_s.map_or_else(|| "never".into(), |s| format!("{s:.0} s")),
            e.spool_bytes.map_or_else(dash, |b| format!("{b} B")),
            e.changes_applied,
            e.lag_s.map_or_else(dash, |l| format!("{l:.1} s")),
            e.last_error.clone().unwrap_or_default(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_agent_reports_is_bounded_and_stripped() {
        assert_eq!(bounded("host\u{7}\nname", 255), "hostname");
        let long = "đ".repeat(600);
        let cut = bounded(&long, 1000);
        assert_eq!(cut.len(), 1000);
        assert!(cut.chars().all(|c| c == 'đ'));
        let oversized = AgentStatusReport { host: "x".repeat(10_000), ..Default::default() };
        assert_eq!(report("fleet-unit", Transport::Kafka, oversized), Err(ReportTooLarge(10_003)));
        report(
            "fleet-unit",
            Transport::Kafka,
            AgentStatusReport {
                host: "x".repeat(2_000),
                last_error: "e".repeat(1_800),
                oldest_unacknowledged_s: f64::NAN,
                ..Default::default()
            },
        )
        .expect("under the report limit");
        let r = registry().lock().unwrap();
        let h = &r.heard["fleet-unit"];
        let rep = h.report.as_ref().unwrap();
        assert_eq!(rep.host.len(), dongbo_proto::STATUS_HOST_MAX);
        assert_eq!(h.last_error.as_ref().unwrap().len(), dongbo_proto::STATUS_ERROR_MAX);
        assert_eq!(rep.oldest_unacknowledged_s, 0.0);
        assert!(h.connected, "a Kafka agent heard from counts as connected");
    }
}
