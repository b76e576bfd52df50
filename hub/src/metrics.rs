//! The hub's Prometheus metrics, served at `/metrics` on the admin listener (token role `read`).
//!
//! Names follow Prometheus conventions: base units (seconds, bytes), `_total` on counters,
//! `dongbo_build_info` carrying the version. Labels are agent ids (`source_id`) and subscription
//! ids (`subscription`), both from the hub's own configuration: never a citizen id, never a string
//! only a peer chose, so a peer cannot grow the series count.
//!
//! Lag is measured from the commit times carried in the changes (the source server's clock) to the
//! hub's clock when the NDC transaction committed, or when a subscription's delivery was made
//! durable: a skew between the two hosts shows in it, which is why `check` on the agent reports the
//! source clock.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The label of an agent's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    /// The agent's configured id.
    pub source_id: String,
}

/// The label of a subscription's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabel {
    /// The subscription's id.
    pub subscription: String,
}

/// The label of a certificate's series: what the certificate is for, and whose.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    /// `hub` (the hub's own server certificate) or `agent` (an agent's client certificate).
    pub certificate: String,
    /// The agent's id for an agent's certificate (as it reported it); empty for the hub's own,
    /// which Prometheus stores as no label.
    pub source_id: String,
}

/// The label of a source log's series, from an agent's report.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLogLabel {
    /// The agent's configured id.
    pub source_id: String,
    /// `wal` or `binlog` (anything else an agent reports is ignored).
    pub log: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What the hub knows of an agent's contact, to answer "silent for how long" at scrape time.
#[derive(Clone, Copy)]
struct Contact {
    connected: bool,
    /// Unix seconds of the last message, or of the hub's start for an agent not seen since.
    last: f64,
}

/// Every series the hub exports.
pub struct HubMetrics {
    registry: Registry,
    contacts: Mutex<HashMap<String, Contact>>,
    connected: Family<AgentLabel, Gauge>,
    last_contact: Family<AgentLabel, FloatGauge>,
    silence: Family<AgentLabel, FloatGauge>,
    applied: Family<AgentLabel, Counter>,
    quarantined: Family<AgentLabel, Counter>,
    apply_lag: Family<AgentLabel, FloatGauge>,
    apply_seconds: Histogram,
    delivered: Family<SubscriptionLabel, Counter>,
    retried: Family<SubscriptionLabel, Counter>,
    dead_lettered: Family<SubscriptionLabel, Counter>,
    delivery_lag: Family<SubscriptionLabel, FloatGauge>,
    audit_queue: Gauge,
    audit_broken: Gauge,
    audit_verified: FloatGauge,
    certificate_expiry: Family<CertificateLabel, Gauge>,
    reported: Reported,
}

/// What agents report of themselves (`AgentStatusReport`), exported per agent by the hub, so an
/// NDC's Prometheus sees every spool, snapshot and source log without reaching the provincial
/// servers (whose agents listen on localhost). Values are as last reported.
#[derive(Default)]
struct Reported {
    spool_bytes: Family<AgentLabel, Gauge>,
    spool_limit: Family<AgentLabel, Gauge>,
    oldest_age: Family<AgentLabel, FloatGauge>,
    snapshot_running: Family<AgentLabel, Gauge>,
    snapshot_ratio: Family<AgentLabel, FloatGauge>,
    log_retained: Family<AgentLogLabel, Gauge>,
    log_headroom_bytes: Family<AgentLogLabel, Gauge>,
    log_headroom_seconds: Family<AgentLogLabel, FloatGauge>,
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

/// Seconds from a commit time (Unix microseconds) to now; never negative.
fn lag_from(commit_time_us: i64) -> f64 {
    (now_s() - commit_time_us as f64 / 1e6).max(0.0)
}

impl HubMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let connected = Family::<AgentLabel, Gauge>::default();
        let last_contact = Family::<AgentLabel, FloatGauge>::default();
        let silence = Family::<AgentLabel, FloatGauge>::default();
        let applied = Family::<AgentLabel, Counter>::default();
        let quarantined = Family::<AgentLabel, Counter>::default();
        let apply_lag = Family::<AgentLabel, FloatGauge>::default();
        // 1 ms to about 65 s.
        let apply_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let delivered = Family::<SubscriptionLabel, Counter>::default();
        let retried = Family::<SubscriptionLabel, Counter>::default();
        let dead_lettered = Family::<SubscriptionLabel, Counter>::default();
        let delivery_lag = Family::<SubscriptionLabel, FloatGauge>::default();
        let audit_queue = Gauge::default();
        let audit_broken = Gauge::default();
        let audit_verified = FloatGauge::default();
        let certificate_expiry = Family::<CertificateLabel, Gauge>::default();
        let reported = Reported::default();
        registry.register(
            "dongbo_build",
            "The hub's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "hub")]),
        );
        registry.register(
            "dongbo_agent_connected",
            "1 while the agent has a live stream to this hub",
            connected.clone(),
        );
        registry.register(
            "dongbo_agent_last_contact_timestamp_seconds",
            "When the agent was last heard from (Unix time; the hub's start for one not seen since)",
            last_contact.clone(),
        );
        registry.register(
            "dongbo_agent_silence_seconds",
            "Seconds since the agent was last heard from (0 while connected)",
            silence.clone(),
        );
        registry.register("dongbo_changes_applied", "Changes applied to the NDC", applied.clone());
        registry.register("dongbo_changes_quarantined", "Changes put in quarantine with a reason", quarantined.clone());
        registry.register(
            "dongbo_apply_lag_seconds",
            "From the source commit of the newest change applied to its NDC commit",
            apply_lag.clone(),
        );
        registry.register(
            "dongbo_ndc_apply_transaction_duration_seconds",
            "Duration of the NDC transactions applying agents' changes",
            apply_seconds.clone(),
        );
        registry.register("dongbo_subscription_delivered", "Records delivered to the subscriber", delivered.clone());
        registry.register(
            "dongbo_subscription_retried",
            "Delivery attempts that failed and were retried",
            retried.clone(),
        );
        registry.register(
            "dongbo_subscription_dead_lettered",
            "Records put in the subscription's dead-letter queue",
            dead_lettered.clone(),
        );
        registry.register(
            "dongbo_subscription_delivery_lag_seconds",
            "From the source commit of the newest record delivered to its delivery",
            delivery_lag.clone(),
        );
        registry.register(
            "dongbo_audit_queue_depth",
            "Audit appends waiting for the audit writer",
            audit_queue.clone(),
        );
        registry.register(
            "dongbo_audit_chain_broken",
            "1 if the last check of the audit chain found it broken (0 before any check found a break)",
            audit_broken.clone(),
        );
        registry.register(
            "dongbo_audit_chain_verified_timestamp_seconds",
            "When the audit chain was last checked and found intact (Unix time)",
            audit_verified.clone(),
        );
        registry.register(
            "dongbo_tls_certificate_expiry_timestamp_seconds",
            "When a TLS certificate expires (Unix time): the hub's own, and each agent's as it reported it",
            certificate_expiry.clone(),
        );
        let r = &reported;
        let as_reported = " (as the agent last reported it)";
        registry.register(
            "dongbo_spool_bytes",
            format!("Bytes of batches the agent's spool holds{as_reported}"),
            r.spool_bytes.clone(),
        );
        registry.register(
            "dongbo_spool_limit_bytes",
            format!("The agent's spool limit{as_reported}"),
            r.spool_limit.clone(),
        );
        registry.register(
            "dongbo_spool_oldest_unacknowledged_age_seconds",
            format!("Age of the oldest batch the agent's spool holds unacknowledged{as_reported}"),
            r.oldest_age.clone(),
        );
        registry.register(
            "dongbo_agent_snapshot_running",
            format!("1 while the agent reads a snapshot{as_reported}"),
            r.snapshot_running.clone(),
        );
        registry.register(
            "dongbo_agent_snapshot_progress_ratio",
            format!("How far the agent's snapshot under way is, 0 to 1 (0 when its size is unknown){as_reported}"),
            r.snapshot_ratio.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_retained_bytes",
            format!("Log the agent's source server keeps for it{as_reported}"),
            r.log_retained.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_headroom_bytes",
            format!("How much more WAL the server keeps for the agent's slot (max_slot_wal_keep_size){as_reported}"),
            r.log_headroom_bytes.clone(),
        );
        registry.register(
            "dongbo_agent_source_log_headroom_seconds",
            format!("How long the server keeps the binlog at the agent's position at least{as_reported}"),
            r.log_headroom_seconds.clone(),
        );

        Self {
            registry,
            contacts: Mutex::new(HashMap::new()),
            connected,
            last_contact,
            silence,
            applied,
            quarantined,
            apply_lag,
            apply_seconds,
            delivered,
            retried,
            dead_lettered,
            delivery_lag,
            audit_queue,
            audit_broken,
            audit_verified,
            certificate_expiry,
            reported,
        }
    }

    fn agent(id: &str) -> AgentLabel {
        AgentLabel { source_id: id.to_string() }
    }

    fn subscription(id: &str) -> SubscriptionLabel {
        SubscriptionLabel { subscription: id.to_string() }
    }

    /// Lists the configured agents, so one never seen shows as silent since the hub started.
    pub fn know_agents<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let now = now_s();
        let mut contacts = self.contacts.lock().expect("contacts lock");
        for id in ids {
            contacts.entry(id.to_string()).or_insert(Contact { connected: false, last: now });
            let label = Self::agent(id);
            // Zero series exist from the start, so a rate over them is defined.
            let _ = self.applied.get_or_create(&label);
            let _ = self.quarantined.get_or_create(&label);
        }
    }

    /// The agent `id` opened (`true`) or closed its stream.
    pub fn agent_connected(&self, id: &str, connected: bool) {
        let mut contacts = self.contacts.lock().expect("contacts lock");
        let c = contacts.entry(id.to_string()).or_insert(Contact { connected, last: now_s() });
        c.connected = connected;
        c.last = now_s();
    }

    /// A message arrived from agent `id`.
    pub fn contact(&self, id: &str) {
        if !recording() {
            return;
        }
        if let Some(c) = self.contacts.lock().expect("contacts lock").get_mut(id) {
            c.last = now_s();
        }
    }

    /// An NDC transaction of agent `id` committed `applied` and `quarantined` changes after `took`;
    /// the newest of them was committed at the source at `newest_commit_us`.
    pub fn applied(&self, id: &str, applied: u64, quarantined: u64, newest_commit_us: Option<i64>, took: Duration) {
        if !recording() {
            return;
        }
        let label = Self::agent(id);
        self.applied.get_or_create(&label).inc_by(applied);
        self.quarantined.get_or_create(&label).inc_by(quarantined);
        if let Some(t) = newest_commit_us.filter(|t| *t > 0) {
            self.apply_lag.get_or_create(&label).set(lag_from(t));
        }
        self.apply_seconds.observe(took.as_secs_f64());
    }

    /// The delivery lag of subscription `id`, if it delivered since the hub started.
    pub fn delivery_lag(&self, id: &str) -> Option<f64> {
        self.delivery_lag.get(&Self::subscription(id)).map(|g| g.get())
    }

    /// Changes of agent `id` applied since the hub started.
    pub fn applied_total(&self, id: &str) -> u64 {
        self.applied.get(&Self::agent(id)).map_or(0, |c| c.get())
    }

    /// The ids of the agents the hub knows.
    pub fn agent_ids(&self) -> Vec<String> {
        self.contacts.lock().expect("contacts lock").keys().cloned().collect()
    }

    /// The apply lag of agent `id`, if this hub applied one of its changes since it started.
    pub fn apply_lag(&self, id: &str) -> Option<f64> {
        self.apply_lag.get(&Self::agent(id)).map(|g| g.get())
    }

    /// Subscription `id` delivered `n` records durably, the newest committed at `newest_commit_us`.
    pub fn delivered(&self, id: &str, n: u64, newest_commit_us: Option<i64>) {
        if !recording() {
            return;
        }
        let label = Self::subscription(id);
        self.delivered.get_or_create(&label).inc_by(n);
        if let Some(t) = newest_commit_us.filter(|t| *t > 0) {
            self.delivery_lag.get_or_create(&label).set(lag_from(t));
        }
    }

    /// Subscription `id` retried a delivery.
    pub fn retried(&self, id: &str) {
        self.retried.get_or_create(&Self::subscription(id)).inc();
    }

    /// Subscription `id` put a record in its dead-letter queue.
    pub fn dead_lettered(&self, id: &str) {
        self.dead_lettered.get_or_create(&Self::subscription(id)).inc();
    }

    /// Lists subscription `id`, so its counters exist at zero.
    pub fn know_subscription(&self, id: &str) {
        let label = Self::subscription(id);
        let _ = self.delivered.get_or_create(&label);
        let _ = self.retried.get_or_create(&label);
        let _ = self.dead_lettered.get_or_create(&label);
        // Nothing delivered yet is nothing late yet.
        let _ = self.delivery_lag.get_or_create(&label);
    }

    /// Audit appends now waiting for the writer.
    pub fn set_audit_queue(&self, depth: usize) {
        self.audit_queue.set(depth as i64);
    }

    /// A check of the audit chain found it intact (`true`) or broken.
    pub fn audit_checked(&self, intact: bool) {
        self.audit_broken.set(i64::from(!intact));
        if intact {
            self.audit_verified.set(now_s());
        }
    }

    /// Agent `id` reported `report` (already bounded by the fleet registry).
    pub fn reported(&self, id: &str, report: &dongbo_proto::v1::AgentStatusReport) {
        let r = &self.reported;
        let label = Self::agent(id);
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        r.spool_bytes.get_or_create(&label).set(int(report.spool_bytes));
        r.spool_limit.get_or_create(&label).set(int(report.spool_limit_bytes));
        r.oldest_age.get_or_create(&label).set(report.oldest_unacknowledged_s);
        r.snapshot_running.get_or_create(&label).set(i64::from(report.snapshot_running));
        let ratio = match (report.snapshot_running, report.snapshot_estimated_rows) {
            (false, _) => 1.0,
            (true, 0) => 0.0,
            (true, e) => (report.snapshot_rows as f64 / e as f64).min(0.99),
        };
        r.snapshot_ratio.get_or_create(&label).set(ratio);
        // Only the two names a source has: an agent cannot grow the series count.
        if matches!(report.source_log.as_str(), "wal" | "binlog") {
            let log = AgentLogLabel { source_id: id.to_string(), log: report.source_log.clone() };
            r.log_retained.get_or_create(&log).set(int(report.source_log_retained_bytes));
            if let Some(h) = report.source_log_headroom_bytes {
                r.log_headroom_bytes.get_or_create(&log).set(int(h));
            }
            if let Some(h) = report.source_log_headroom_s.filter(|h| h.is_finite()) {
                r.log_headroom_seconds.get_or_create(&log).set(h.max(0.0));
            }
        }
        if report.certificate_expiry_s > 0 {
            let cert = CertificateLabel { certificate: "agent".into(), source_id: id.to_string() };
            self.certificate_expiry.get_or_create(&cert).set(report.certificate_expiry_s);
        }
    }

    /// The hub's TLS certificate expires at `not_after_s` (Unix seconds).
    pub fn certificate_expires(&self, not_after_s: i64) {
        let hub = CertificateLabel { certificate: "hub".into(), source_id: String::new() };
        self.certificate_expiry.get_or_create(&hub).set(not_after_s);
    }

    /// The text exposition (OpenMetrics), with the contact series brought up to now.
    pub fn encode(&self) -> String {
        let now = now_s();
        for (id, c) in self.contacts.lock().expect("contacts lock").iter_mut() {
            if c.connected {
                c.last = now;
            }
            let label = Self::agent(id);
            self.connected.get_or_create(&label).set(i64::from(c.connected));
            self.last_contact.get_or_create(&label).set(c.last);
            self.silence.get_or_create(&label).set((now - c.last).max(0.0));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The hub's metrics (one set per process).
pub fn hub() -> &'static HubMetrics {
    static METRICS: OnceLock<HubMetrics> = OnceLock::new();
    METRICS.get_or_init(HubMetrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_by_convention_and_move() {
        let m = HubMetrics::new();
        m.know_agents(["hcm-population"]);
        m.know_subscription("insurance");
        m.agent_connected("hcm-population", true);
        let commit = (now_s() * 1e6) as i64 - 2_000_000;
        m.applied("hcm-population", 10, 1, Some(commit), Duration::from_millis(3));
        m.delivered("insurance", 4, Some(commit));
        m.dead_lettered("insurance");
        let text = m.encode();
        for line in [
            "dongbo_changes_applied_total{source_id=\"hcm-population\"} 10",
            "dongbo_changes_quarantined_total{source_id=\"hcm-population\"} 1",
            "dongbo_agent_connected{source_id=\"hcm-population\"} 1",
            "dongbo_subscription_delivered_total{subscription=\"insurance\"} 4",
            "dongbo_subscription_dead_lettered_total{subscription=\"insurance\"} 1",
            "dongbo_subscription_retried_total{subscription=\"insurance\"} 0",
            "dongbo_ndc_apply_transaction_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.contains("dongbo_build_info{version=\""), "{text}");
        // What an agent reports is exported under its id; a log name of its own invention is not.
        let report = dongbo_proto::v1::AgentStatusReport {
            spool_bytes: 800,
            spool_limit_bytes: 1000,
            snapshot_running: true,
            snapshot_rows: 50,
            snapshot_estimated_rows: 200,
            source_log: "wal".into(),
            source_log_retained_bytes: 4096,
            source_log_headroom_bytes: Some(1 << 30),
            certificate_expiry_s: 1_930_348_800,
            ..Default::default()
        };
        m.reported("hcm-population", &report);
        m.reported(
            "hcm-population",
            &dongbo_proto::v1::AgentStatusReport { source_log: "evil".into(), ..report.clone() },
        );
        let text = m.encode();
        for line in [
            "dongbo_spool_bytes{source_id=\"hcm-population\"} 800",
            "dongbo_agent_snapshot_progress_ratio{source_id=\"hcm-population\"} 0.25",
            "dongbo_agent_source_log_retained_bytes{source_id=\"hcm-population\",log=\"wal\"} 4096",
            "dongbo_tls_certificate_expiry_timestamp_seconds{certificate=\"agent\",source_id=\"hcm-population\"} 1930348800",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("evil"), "{text}");
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("dongbo_apply_lag_seconds{source_id=\"hcm-population\"} "))
            .and_then(|v| v.parse().ok())
            .expect("lag series");
        assert!((2.0..10.0).contains(&lag), "lag {lag}");
        m.agent_connected("hcm-population", false);
        std::thread::sleep(Duration::from_millis(20));
        let text = m.encode();
        assert!(text.contains("dongbo_agent_connected{source_id=\"hcm-population\"} 0"), "{text}");
        let silence: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("dongbo_agent_silence_seconds{source_id=\"hcm-population\"} "))
            .and_then(|v| v.parse().ok())
            .expect("silence series");
        assert!(silence >= 0.02, "silence {silence}");
    }
}
