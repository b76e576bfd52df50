//! `dongbo-agent status`: the spool, the source position, the last acknowledgement and the link,
//! as a table or JSON (`--json`, stable field names for scripts).
//!
//! A running agent answers on its `[status]` listener (`GET /status`); a stopped one is read from
//! its spool directly, which only a stopped agent allows (sled locks the spool).

use std::time::{SystemTime, UNIX_EPOCH};

use dongbo_proto::v1::AgentStatusReport;
use dongbo_proto::{STATUS_ERROR_MAX, STATUS_HOST_MAX};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::AgentConfig;
use crate::metrics;
use crate::spool::Spool;

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// The agent's id.
    pub source_id: String,
    /// `true` when read from a running agent, `false` when read from a stopped agent's spool.
    pub running: bool,
    /// Capture reads the source now.
    pub capture_running: bool,
    /// The link to the hub (or Kafka) is up.
    pub link_up: bool,
    /// Bytes of batches in the spool.
    pub spool_bytes: u64,
    /// The spool's limit.
    pub spool_limit_bytes: u64,
    /// Batches in the spool (not yet acknowledged by the hub).
    pub spool_batches: u64,
    /// Age of the oldest unacknowledged batch, in seconds (0 when none).
    pub oldest_unacknowledged_s: f64,
    /// When the hub last acknowledged a change (Unix seconds; none since the agent started).
    pub last_acknowledged_at: Option<f64>,
    /// Changes spooled and acknowledged since the agent started.
    pub changes_spooled: u64,
    /// Changes the hub acknowledged since the agent started.
    pub changes_acknowledged: u64,
    /// Where capture resumes: just past the last transaction spooled.
    pub source_position: Option<String>,
    /// The initial snapshot is fully spooled.
    pub snapshot_done: bool,
    /// A table being snapshotted online, if any.
    pub snapshotting: Option<String>,
    /// A snapshot being read now: rows so far and the rows expected (0 when unknown).
    #[serde(default)]
    pub snapshot_progress: Option<(u64, u64)>,
    /// The log the source keeps for this agent (`wal` or `binlog`) and its bytes, once read.
    #[serde(default)]
    pub source_log: Option<(String, u64)>,
}

impl AgentStatus {
    /// The status of this process's agent, from its spool and metrics.
    pub fn of(source_id: &str, spool: &Spool, running: bool) -> Self {
        let m = metrics::agent();
        let resume = spool.resume_point().unwrap_or_default();
        Self {
            source_id: source_id.to_string(),
            running,
            capture_running: m.is_capturing(),
            link_up: m.is_linked(),
            spool_bytes: spool.bytes(),
            spool_limit_bytes: spool.max_bytes(),
            spool_batches: spool.batch_count(),
            oldest_unacknowledged_s: m.oldest_unacknowledged_s(),
            last_acknowledged_at: m.last_acknowledged_at(),
            changes_spooled: m.changes_spooled(),
            changes_acknowledged: m.changes_acknowledged(),
            source_position: resume.committed_end.map(|p| p.to_string()),
            snapshot_done: resume.snapshot_done,
            snapshotting: resume.snapshotting.map(|t| t.table.to_string()),
            snapshot_progress: m.snapshot_under_way(),
            source_log: m.last_source_log().map(|(log, r)| (log, r.retained_bytes)),
        }
    }

    /// The table an operator reads.
    pub fn render(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<26} {v}\n"));
        line("agent", self.source_id.clone());
        line("running", if self.running { "yes".into() } else { "no (read from its spool)".into() });
        if self.running {
            line("capture running", yes_no(self.capture_running).into());
            line("link to the hub", if self.link_up { "up".into() } else { "down".into() });
        }
        let fill = self.spool_bytes as f64 * 100.0 / self.spool_limit_bytes.max(1) as f64;
        line(
            "spool",
            format!(
                "{} batches, {} of {} bytes ({fill:.1} %)",
                self.spool_batches, self.spool_bytes, self.spool_limit_bytes
            ),
        );
        if self.running {
            line("oldest unacknowledged", format!("{:.0} s", self.oldest_unacknowledged_s));
            line(
                "last acknowledgement",
                self.last_acknowledged_at
                    .map_or("none since the agent started".into(), |t| format!("{:.0} s ago", (now - t).max(0.0))),
            );
            line("changes spooled / acked", format!("{} / {}", self.changes_spooled, self.changes_acknowledged));
        }
        line("source position", self.source_position.clone().unwrap_or_else(|| "nothing spooled yet".into()));
        line(
            "snapshot",
            match (&self.snapshotting, self.snapshot_done) {
                (Some(t), _) => format!("table {t} being snapshotted online"),
                (None, true) => "done".into(),
                (None, false) => "not finished".into(),
            },
        );
        if let Some((rows, expected)) = self.snapshot_progress {
            let of = if expected > 0 { format!(" of about {expected}") } else { String::new() };
            line("snapshot under way", format!("{rows}{of} rows read"));
        }
        if let Some((log, bytes)) = &self.source_log {
            line("source log kept for it", format!("{bytes} bytes of {log}"));
        }
        out
    }
}

/// This host's name, as the kernel has it (empty if unreadable), at most [`STATUS_HOST_MAX`] bytes.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    truncate(name.trim(), STATUS_HOST_MAX)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The report the hub's fleet registry keeps of this agent.
pub fn report(spool: &Spool) -> AgentStatusReport {
    let m = metrics::agent();
    let snapshot = m.snapshot_under_way();
    let log = m.last_source_log();
    AgentStatusReport {
        host: host_name(),
        spool_bytes: spool.bytes(),
        spool_limit_bytes: spool.max_bytes(),
        spool_batches: spool.batch_count(),
        capture_running: m.is_capturing(),
        last_error: truncate(&m.last_error(), STATUS_ERROR_MAX),
        changes_spooled: m.changes_spooled(),
        oldest_unacknowledged_s: m.oldest_unacknowledged_s(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        snapshot_running: snapshot.is_some(),
        snapshot_rows: snapshot.map_or(0, |(rows, _)| rows),
        snapshot_estimated_rows: snapshot.map_or(0, |(_, estimate)| estimate),
        source_log_retained_bytes: log.as_ref().map_or(0, |(_, r)| r.retained_bytes),
        source_log_headroom_bytes: log.as_ref().and_then(|(_, r)| r.headroom_bytes),
        source_log_headroom_s: log.as_ref().and_then(|(_, r)| r.headroom_s),
        source_log: log.map(|(name, _)| name).unwrap_or_default(),
        certificate_expiry_s: m.certificate_expiry_s().unwrap_or(0),
    }
}

/// Asks a running agent on `listen` for its status; `None` when nothing listens there.
pub async fn fetch(listen: &str) -> anyhow::Result<Option<AgentStatus>> {
    let mut stream = match tokio::net::TcpStream::connect(listen).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("cannot reach the agent's status listener at {listen}: {e}")),
    };
    // HTTP/1.0: the listener closes the connection after its answer, so reading to the end is the
    // whole answer. Bounded: a status is a few hundred bytes.
    stream.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "the agent answered: {head}");
    Ok(Some(serde_json::from_str(body)?))
}

/// The status of the agent `config` describes: from the running agent, or from its spool.
pub async fn read(config: &AgentConfig) -> anyhow::Result<AgentStatus> {
    if config.status.listen != "off" {
        if let Some(s) = fetch(&config.status.listen).await? {
            return Ok(s);
        }
    }
    let spool = Spool::open(&config.spool.path, config.spool.max_bytes).map_err(|e| {
        anyhow::anyhow!(
            "the agent's status listener ({}) does not answer and its spool cannot be opened ({e}): \
             is the agent running with [status] listen = \"off\"?",
            config.status.listen
        )
    })?;
    Ok(AgentStatus::of(&config.source_id, &spool, false))
}
