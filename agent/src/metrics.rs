//! The agent's Prometheus metrics and its small HTTP listener (`[status]`, on 127.0.0.1:9187 by
//! default): `/metrics`, `/healthz` (the process answers), `/readyz` (capture is running and
//! the spool has room; 503 with the reason otherwise) and `/status` (the JSON of
//! [`crate::status::AgentStatus`], for `dongbo-agent status`).
//!
//! The listener is bound to localhost unless configured otherwise and asks for no token: what it
//! shows is counts and sizes, never a row, a key or a credential. A port already taken is logged
//! and the agent runs on without it: metrics must never stop capture.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::spool::Spool;

type FloatGauge = Gauge<f64, AtomicU64>;

/// The label of a certificate's series: what the certificate is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    /// `agent` (the agent's client certificate towards the hub).
    pub certificate: String,
}

/// The label of a source log's series: which log the server keeps.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogLabel {
    /// `wal` (Postgres) or `binlog` (MySQL/MariaDB).
    pub log: String,
}

/// Whether series are recorded: `DONGBO_METRICS=off` turns recording off (the series stay at
/// zero), only to measure what metrics cost (`dongbo-bench-metrics`).
pub fn recording() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DONGBO_METRICS").map_or(true, |v| v != "off"))
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Every series the agent exports.
pub struct AgentMetrics {
    registry: Registry,
    capture_running: Gauge,
    link_up: Gauge,
    spooled: Counter,
    acknowledged: Counter,
    capture_lag: FloatGauge,
    spool_bytes: Gauge,
    spool_limit: Gauge,
    spool_batches: Gauge,
    oldest_age: FloatGauge,
    last_ack: FloatGauge,
    snapshot_running: Gauge,
    snapshot_rows: Counter,
    snapshot_estimated: Gauge,
    snapshot_ratio: FloatGauge,
    snapshot_remaining: FloatGauge,
    certificate_expiry: Family<CertificateLabel, Gauge>,
    log_retained: Family<LogLabel, Gauge>,
    log_headroom_bytes: Family<LogLabel, Gauge>,
    log_headroom_seconds: Family<LogLabel, FloatGauge>,
    /// Source commit time (Unix seconds) of the newest change spooled; not exported.
    newest_commit: FloatGauge,
    /// Snapshot rows already counted in `snapshot_rows`.
    snapshot_counted: Mutex<u64>,
    /// The last reading of the source's log, for the status report.
    source_log: Mutex<Option<(String, dongbo_connectors::source::RetainedLog)>>,
    /// Last seq and spooling time of each unacknowledged batch, oldest first.
    unacknowledged: Mutex<VecDeque<(u64, f64)>>,
    /// The last capture error since the agent started.
    last_error: Mutex<String>,
}

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            capture_running: Gauge::default(),
            link_up: Gauge::default(),
            spooled: Counter::default(),
            acknowledged: Counter::default(),
            capture_lag: FloatGauge::default(),
            spool_bytes: Gauge::default(),
            spool_limit: Gauge::default(),
            spool_batches: Gauge::default(),
            oldest_age: FloatGauge::default(),
            last_ack: FloatGauge::default(),
            snapshot_running: Gauge::default(),
            snapshot_rows: Counter::default(),
            snapshot_estimated: Gauge::default(),
            snapshot_ratio: FloatGauge::default(),
            snapshot_remaining: FloatGauge::default(),
            certificate_expiry: Family::default(),
            log_retained: Family::default(),
            log_headroom_bytes: Family::default(),
            log_headroom_seconds: Family::default(),
            newest_commit: FloatGauge::default(),
            snapshot_counted: Mutex::new(0),
            source_log: Mutex::new(None),
            unacknowledged: Mutex::new(VecDeque::new()),
            last_error: Mutex::new(String::new()),
        };
        registry.register(
            "dongbo_build",
            "The agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "agent")]),
        );
        registry.register(
            "dongbo_agent_capture_running",
            "1 while capture reads the source",
            m.capture_running.clone(),
        );
        registry.register(
            "dongbo_agent_hub_link_up",
            "1 while the link to the hub (or Kafka) is up",
            m.link_up.clone(),
        );
        registry.register("dongbo_agent_changes_spooled", "Changes made durable in the spool", m.spooled.clone());
        registry.register(
            "dongbo_agent_changes_acknowledged",
            "Changes the hub acknowledged as durable and the spool let go",
            m.acknowledged.clone(),
        );
        registry.register(
            "dongbo_agent_capture_lag_seconds",
            "From the source commit of the newest change spooled to its spooling",
            m.capture_lag.clone(),
        );
        registry.register("dongbo_spool_bytes", "Bytes of batches the spool holds", m.spool_bytes.clone());
        registry.register("dongbo_spool_limit_bytes", "The spool's limit (spool.max_bytes)", m.spool_limit.clone());
        registry.register("dongbo_spool_batches", "Batches the spool holds", m.spool_batches.clone());
        registry.register(
            "dongbo_spool_oldest_unacknowledged_age_seconds",
            "Age of the oldest batch not yet acknowledged by the hub (0 when none)",
            m.oldest_age.clone(),
        );
        registry.register(
            "dongbo_agent_last_acknowledgement_timestamp_seconds",
            "When the hub last acknowledged a change (Unix time; 0 before any)",
            m.last_ack.clone(),
        );
        registry.register(
            "dongbo_agent_snapshot_running",
            "1 while a snapshot is being read",
            m.snapshot_running.clone(),
        );
        registry.register("dongbo_agent_snapshot_rows", "Rows read by snapshots", m.snapshot_rows.clone());
        registry.register(
            "dongbo_agent_snapshot_estimated_rows",
            "Rows the snapshot under way is expected to read (the server's estimate; 0 when unknown)",
            m.snapshot_estimated.clone(),
        );
        registry.register(
            "dongbo_agent_snapshot_progress_ratio",
            "How far the snapshot under way is, 0 to 1 (1 once done)",
            m.snapshot_ratio.clone(),
        );
        registry.register(
            "dongbo_agent_snapshot_remaining_seconds",
            "Seconds the snapshot under way still needs at its rate so far (0 when done or unknown)",
            m.snapshot_remaining.clone(),
        );
        registry.register(
            "dongbo_tls_certificate_expiry_timestamp_seconds",
            "When the agent's client certificate expires (Unix time; absent without one)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_retained_bytes",
            "Log the source server keeps for this agent (Postgres: WAL behind its slot; MySQL: binlog from its position)",
            m.log_retained.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_headroom_bytes",
            "How much more WAL the server keeps for the slot before it gives it up (max_slot_wal_keep_size)",
            m.log_headroom_bytes.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_headroom_seconds",
            "How long the server keeps the binlog at this agent's position at least (binlog_expire_logs_seconds)",
            m.log_headroom_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// Capture started (`true`) or stopped.
    pub fn capture_running(&self, running: bool) {
        self.capture_running.set(i64::from(running));
    }

    /// Whether capture runs now.
    pub fn is_capturing(&self) -> bool {
        self.capture_running.get() == 1
    }

    /// Capture stopped on `error` (shown to operators through the hub's fleet registry).
    pub fn set_last_error(&self, error: &str) {
        *self.last_error.lock().expect("last error lock") = error.to_string();
    }

    /// The last capture error since the agent started, empty when none.
    pub fn last_error(&self) -> String {
        self.last_error.lock().expect("last error lock").clone()
    }

    /// Whether the link to the hub is up.
    pub fn is_linked(&self) -> bool {
        self.link_up.get() == 1
    }

    /// Changes spooled since the agent started.
    pub fn changes_spooled(&self) -> u64 {
        self.spooled.get()
    }

    /// Changes acknowledged since the agent started.
    pub fn changes_acknowledged(&self) -> u64 {
        self.acknowledged.get()
    }

    /// When the hub last acknowledged a change (Unix seconds), if it did since the agent started.
    pub fn last_acknowledged_at(&self) -> Option<f64> {
        Some(self.last_ack.get()).filter(|t| *t > 0.0)
    }

    /// Age of the oldest unacknowledged batch in seconds (0 when none).
    pub fn oldest_unacknowledged_s(&self) -> f64 {
        let oldest = self.unacknowledged.lock().expect("unacknowledged lock").front().map(|(_, t)| *t);
        oldest.map_or(0.0, |t| (now_s() - t).max(0.0))
    }

    /// The link to the hub came up (`true`) or went down.
    pub fn link_up(&self, up: bool) {
        self.link_up.set(i64::from(up));
    }

    /// Batches already in the spool when it was opened: their age counts from now.
    pub fn spool_opened(&self, last_seqs: impl IntoIterator<Item = u64>) {
        let now = now_s();
        let mut q = self.unacknowledged.lock().expect("unacknowledged lock");
        q.clear();
        q.extend(last_seqs.into_iter().map(|s| (s, now)));
    }

    /// A batch of `first..=last` was made durable in the spool.
    pub fn spooled(&self, first: u64, last: u64) {
        if !recording() {
            return;
        }
        self.spooled.inc_by(last.saturating_sub(first) + 1);
        self.unacknowledged.lock().expect("unacknowledged lock").push_back((last, now_s()));
    }

    /// The newest change spooled was committed at the source at `commit_time_us`.
    pub fn captured_commit(&self, commit_time_us: i64) {
        if !recording() {
            return;
        }
        if commit_time_us > 0 {
            self.newest_commit.set(commit_time_us as f64 / 1e6);
            self.capture_lag.set((now_s() - commit_time_us as f64 / 1e6).max(0.0));
        }
    }

    /// The source commit time (Unix seconds) of the newest change spooled since the agent started.
    pub fn newest_commit_s(&self) -> Option<f64> {
        Some(self.newest_commit.get()).filter(|t| *t > 0.0)
    }

    /// The spool let go of `changes` acknowledged up to `durable_seq`.
    pub fn acknowledged(&self, changes: u64, durable_seq: u64) {
        if !recording() {
            return;
        }
        self.acknowledged.inc_by(changes);
        self.last_ack.set(now_s());
        let mut q = self.unacknowledged.lock().expect("unacknowledged lock");
        while q.front().is_some_and(|(last, _)| *last <= durable_seq) {
            q.pop_front();
        }
    }

    /// A snapshot started, expecting `estimated_rows`.
    pub fn snapshot_started(&self, estimated_rows: Option<u64>) {
        *self.snapshot_counted.lock().expect("snapshot lock") = 0;
        self.snapshot_running.set(1);
        self.snapshot_estimated.set(estimated_rows.map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX)));
        self.snapshot_ratio.set(0.0);
        self.snapshot_remaining.set(0.0);
    }

    /// Where the snapshot under way is.
    pub fn snapshot_progress(&self, f: &crate::snapshot_progress::Figures) {
        self.count_snapshot_rows(f.rows);
        self.snapshot_estimated.set(f.estimated_rows.map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX)));
        self.snapshot_ratio.set(f.percent.map_or(0.0, |p| p / 100.0));
        self.snapshot_remaining.set(f.eta_s.unwrap_or(0.0));
    }

    /// The snapshot is read whole.
    pub fn snapshot_finished(&self, f: &crate::snapshot_progress::Figures) {
        self.count_snapshot_rows(f.rows);
        self.snapshot_running.set(0);
        self.snapshot_ratio.set(1.0);
        self.snapshot_remaining.set(0.0);
    }

    fn count_snapshot_rows(&self, rows: u64) {
        let mut counted = self.snapshot_counted.lock().expect("snapshot lock");
        self.snapshot_rows.inc_by(rows.saturating_sub(*counted));
        *counted = (*counted).max(rows);
    }

    /// The last reading of the source's log (`wal` or `binlog`), if one was made.
    pub fn last_source_log(&self) -> Option<(String, dongbo_connectors::source::RetainedLog)> {
        self.source_log.lock().expect("source log lock").clone()
    }

    /// A snapshot under way: rows read so far (as last logged) and the estimate (0 when unknown).
    pub fn snapshot_under_way(&self) -> Option<(u64, u64)> {
        (self.snapshot_running.get() == 1).then(|| {
            let rows = *self.snapshot_counted.lock().expect("snapshot lock");
            (rows, u64::try_from(self.snapshot_estimated.get()).unwrap_or(0))
        })
    }

    /// When the agent's client certificate expires (Unix seconds), if it has one.
    pub fn certificate_expiry_s(&self) -> Option<i64> {
        self.certificate_expiry.get(&CertificateLabel { certificate: "agent".into() }).map(|g| g.get())
    }

    /// The agent's client certificate expires at `not_after_s` (Unix seconds).
    pub fn certificate_expires(&self, not_after_s: i64) {
        self.certificate_expiry.get_or_create(&CertificateLabel { certificate: "agent".into() }).set(not_after_s);
    }

    /// What the source server keeps of its `log` for this agent.
    pub fn source_log(&self, log: &str, retained: &dongbo_connectors::source::RetainedLog) {
        *self.source_log.lock().expect("source log lock") = Some((log.to_string(), *retained));
        let label = LogLabel { log: log.to_string() };
        let bytes = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
        self.log_retained.get_or_create(&label).set(bytes(retained.retained_bytes));
        if let Some(h) = retained.headroom_bytes {
            self.log_headroom_bytes.get_or_create(&label).set(bytes(h));
        }
        if let Some(h) = retained.headroom_s {
            self.log_headroom_seconds.get_or_create(&label).set(h);
        }
    }

    /// The text exposition (OpenMetrics), the spool's gauges read now.
    pub fn encode(&self, spool: &Spool) -> String {
        self.spool_bytes.set(spool.bytes() as i64);
        self.spool_limit.set(spool.max_bytes() as i64);
        self.spool_batches.set(spool.batch_count() as i64);
        self.oldest_age.set(self.oldest_unacknowledged_s());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The agent's metrics (one set per process).
pub fn agent() -> &'static AgentMetrics {
    static METRICS: OnceLock<AgentMetrics> = OnceLock::new();
    METRICS.get_or_init(AgentMetrics::new)
}

/// Why the agent is not ready, if it is not.
fn not_ready(spool: &Spool) -> Option<String> {
    if !agent().is_capturing() {
        return Some("capture is not running (see the log for why)".into());
    }
    spool.is_full().then(|| "the spool is full: capture is paused until the hub catches up".into())
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until `shutdown` turns true; a listen
/// address that cannot be bound is logged and the agent runs on.
pub async fn serve(listen: String, source_id: String, spool: Arc<Spool>, mut shutdown: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%listen, error = %e, "cannot listen for metrics and health ([status] listen); running without them");
            return;
        }
    };
    info!(%listen, "metrics and health serving");
    let (for_metrics, for_ready, for_status) = (spool.clone(), spool.clone(), spool);
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                match not_ready(&for_ready) {
                    None => "ready".into_response(),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                }
            }),
        )
        .route(
            "/status",
            get(move || async move {
                axum::Json(crate::status::AgentStatus::of(&source_id, &for_status, true)).into_response()
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    agent().encode(&for_metrics),
                )
                    .into_response()
            }),
        );
    let stopped = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        warn!(error = %e, "metrics and health listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_spool_series_follow_appends_and_acks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let m = AgentMetrics::new();
        m.spool_opened([]);
        m.spooled(10, 19);
        m.spooled(20, 24);
        m.captured_commit((now_s() * 1e6) as i64 - 3_000_000);
        let text = m.encode(&spool);
        assert!(text.contains("dongbo_agent_changes_spooled_total 15"), "{text}");
        assert!(text.contains("dongbo_spool_limit_bytes 1048576"), "{text}");
        assert!(text.contains("dongbo_build_info{version=\""), "{text}");
        m.acknowledged(10, 19);
        assert_eq!(m.unacknowledged.lock().unwrap().len(), 1, "the batch up to 24 is still unacknowledged");
        m.acknowledged(5, 24);
        let text = m.encode(&spool);
        assert!(text.contains("dongbo_agent_changes_acknowledged_total 15"), "{text}");
        assert!(text.contains("dongbo_spool_oldest_unacknowledged_age_seconds 0.0"), "{text}");
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("dongbo_agent_capture_lag_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("lag");
        assert!((3.0..10.0).contains(&lag), "lag {lag}");
    }
}
