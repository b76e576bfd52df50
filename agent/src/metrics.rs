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
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::spool::Spool;

type FloatGauge = Gauge<f64, AtomicU64>;

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
        self.spooled.inc_by(last.saturating_sub(first) + 1);
        self.unacknowledged.lock().expect("unacknowledged lock").push_back((last, now_s()));
    }

    /// The newest change spooled was committed at the source at `commit_time_us`.
    pub fn captured_commit(&self, commit_time_us: i64) {
        if commit_time_us > 0 {
            self.capture_lag.set((now_s() - commit_time_us as f64 / 1e6).max(0.0));
        }
    }

    /// The spool let go of `changes` acknowledged up to `durable_seq`.
    pub fn acknowledged(&self, changes: u64, durable_seq: u64) {
        self.acknowledged.inc_by(changes);
        self.last_ack.set(now_s());
        let mut q = self.unacknowledged.lock().expect("unacknowledged lock");
        while q.front().is_some_and(|(last, _)| *last <= durable_seq) {
            q.pop_front();
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
