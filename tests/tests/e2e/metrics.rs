//! Metrics: the hub's `/metrics` (admin listener, operator token) and the agent's (its `[status]`
//! listener) move as a workload runs, read from the exposition itself, not from logs.

use std::time::{Duration, Instant};

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::fanout::{start_with_failing_webhook, ADMIN_TOKEN};
use dongbo_tests::scrape::{get, value};
use dongbo_tests::Deployment;

/// The repository's root (the tests crate is one level down).
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `dongbo_…` metric name in a rules or dashboard file.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("dongbo_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Series this deployment (Postgres, no TLS) cannot export, and the test that
/// sees each exported.
const CONDITIONAL: &[(&str, &str)] = &[
    ("dongbo_tls_certificate_expiry_timestamp_seconds", "with TLS: cert_rotation checks it"),
    ("dongbo_agent_source_log_headroom_seconds", "by a MySQL agent: mariadb_capture checks it"),
];

struct Scrapes {
    hub: String,
    agent: String,
}

impl Scrapes {
    async fn hub(&self) -> anyhow::Result<String> {
        let (status, text) = get(&self.hub, Some(ADMIN_TOKEN)).await?;
        anyhow::ensure!(status == 200, "hub /metrics answered {status}: {text}");
        Ok(text)
    }

    async fn agent(&self) -> anyhow::Result<String> {
        let (status, text) = get(&self.agent, None).await?;
        anyhow::ensure!(status == 200, "agent /metrics answered {status}: {text}");
        Ok(text)
    }

    /// Waits until `series` on the hub (or the agent) reaches `at_least`; returns its value.
    async fn wait(&self, on_hub: bool, series: &str, at_least: f64) -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = if on_hub { self.hub().await? } else { self.agent().await? };
            let v = value(&text, series);
            if v.is_some_and(|v| v >= at_least) {
                return Ok(v.unwrap_or_default());
            }
            anyhow::ensure!(Instant::now() < deadline, "{series} is {v:?}, not {at_least} or more:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_lag_move_with_the_workload_a_stopped_agent_falls_silent_and_dead_letters_count(
) -> anyhow::Result<()> {
    let mut d = Deployment::new("metrics", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(21);
    let ids = insert_citizens(&src, &mut gen, 200).await?;
    // A bounded slot: the agent exports how much WAL more the server keeps for it.
    let admin = d.pg.connect("postgres").await?;
    admin.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'").await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    let admin_port = start_with_failing_webhook(&mut d).await?.admin_port;
    let m = Scrapes {
        hub: format!("http://127.0.0.1:{admin_port}/metrics"),
        agent: format!("http://127.0.0.1:{}/metrics", d.status_port),
    };
    let id = d.source_id.clone();
    let applied = format!("dongbo_changes_applied_total{{source_id=\"{id}\"}}");

    // The snapshot: a truncate and 200 rows, applied and acknowledged.
    let before = m.wait(true, &applied, 201.0).await?;
    let hub = m.hub().await?;
    assert_eq!(value(&hub, &format!("dongbo_agent_connected{{source_id=\"{id}\"}}")), Some(1.0), "{hub}");
    assert_eq!(value(&hub, &format!("dongbo_agent_silence_seconds{{source_id=\"{id}\"}}")), Some(0.0), "{hub}");
    assert!(value(&hub, "dongbo_ndc_apply_transaction_duration_seconds_count").is_some_and(|n| n >= 1.0), "{hub}");
    assert!(hub.contains("dongbo_build_info{"), "{hub}");
    assert!(!ids.iter().any(|c| hub.contains(c.as_str())), "a citizen id in the hub's metrics");
    let spooled = m.wait(false, "dongbo_agent_changes_spooled_total", 201.0).await?;
    m.wait(false, "dongbo_agent_changes_acknowledged_total", spooled).await?;
    let agent = m.agent().await?;
    assert_eq!(value(&agent, "dongbo_agent_hub_link_up"), Some(1.0), "{agent}");
    assert_eq!(value(&agent, "dongbo_agent_capture_running"), Some(1.0), "{agent}");
    // The snapshot's progress: 200 rows of 200 expected (a table never analysed is counted).
    assert_eq!(value(&agent, "dongbo_agent_snapshot_rows_total"), Some(200.0), "{agent}");
    assert_eq!(value(&agent, "dongbo_agent_snapshot_estimated_rows"), Some(200.0), "{agent}");
    assert_eq!(value(&agent, "dongbo_agent_snapshot_progress_ratio"), Some(1.0), "{agent}");
    assert_eq!(value(&agent, "dongbo_agent_snapshot_running"), Some(0.0), "{agent}");
    let log = d.agent.as_ref().expect("agent").log_text();
    assert!(log.contains("snapshot read whole") && log.contains("rows=200"), "{log}");
    // The WAL the slot holds, read from the source: present, and growing while the slot is behind.
    let retained = m.wait(false, "dongbo_agent_source_log_retained_bytes{log=\"wal\"}", 1.0).await?;
    let headroom = m.wait(false, "dongbo_agent_source_log_headroom_bytes{log=\"wal\"}", 1.0).await?;
    let gib = 1024.0 * 1024.0 * 1024.0;
    assert!((9.0 * gib..=11.0 * gib).contains(&(retained + headroom)), "{retained} + {headroom} is not about 10 GiB");
    // The hub exports what the agent reports of itself: an NDC Prometheus sees every spool and
    // source log without reaching the provincial server.
    let limit = value(&agent, "dongbo_spool_limit_bytes").expect("the agent's spool limit");
    m.wait(true, &format!("dongbo_spool_limit_bytes{{source_id=\"{id}\"}}"), limit).await?;
    m.wait(true, &format!("dongbo_agent_snapshot_progress_ratio{{source_id=\"{id}\"}}"), 1.0).await?;
    m.wait(true, &format!("dongbo_agent_source_log_retained_bytes{{source_id=\"{id}\",log=\"wal\"}}"), 1.0).await?;
    m.wait(true, &format!("dongbo_agent_source_log_headroom_bytes{{source_id=\"{id}\",log=\"wal\"}}"), 1.0).await?;
    // The audit chain is checked at the hub's start.
    assert_eq!(value(&hub, "dongbo_audit_chain_broken"), Some(0.0), "{hub}");
    m.wait(true, "dongbo_audit_chain_verified_timestamp_seconds", 1.0).await?;
    let health = format!("http://127.0.0.1:{}/", d.status_port);
    assert_eq!(get(&(health.clone() + "healthz"), None).await?.0, 200);
    assert_eq!(get(&(health.clone() + "readyz"), None).await?, (200, "ready".into()));

    // `dongbo-agent status` asks the running agent.
    let status = agent_status(&d)?;
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["link_up"], true, "{status}");
    assert_eq!(status["snapshot_done"], true, "{status}");
    assert!(status["changes_spooled"].as_u64().is_some_and(|n| n >= 201), "{status}");
    assert!(status["source_position"].as_str().is_some_and(|p| p.contains('/')), "an LSN: {status}");
    assert_eq!(status["source_log"][0], "wal", "{status}");
    assert!(status["snapshot_progress"].is_null(), "the snapshot is done: {status}");

    // 100 changes more: the counter moves by exactly 100, the lag is measured from their commits.
    insert_citizens(&src, &mut gen, 100).await?;
    let after = m.wait(true, &applied, before + 100.0).await?;
    assert_eq!(after, before + 100.0, "each change counted once");
    let lag = value(&m.hub().await?, &format!("dongbo_apply_lag_seconds{{source_id=\"{id}\"}}"));
    assert!(lag.is_some_and(|l| (0.0..30.0).contains(&l)), "apply lag {lag:?}");

    // A webhook that answers 500: one retry, then a dead letter, counted per subscription.
    src.execute(
        "UPDATE citizens SET commune_code = '26734', address = 'Số 1 phố Mới' WHERE citizen_id = $1",
        &[&ids[0]],
    )
    .await?;
    m.wait(true, "dongbo_subscription_dead_lettered_total{subscription=\"bhyt-residence\"}", 1.0).await?;
    m.wait(true, "dongbo_subscription_retried_total{subscription=\"bhyt-residence\"}", 1.0).await?;

    // Every series the alert rules and the Grafana dashboard use exists.
    let (hub, agent) = (m.hub().await?, m.agent().await?);
    for file in ["deploy/prometheus/dongbo-alerts.yml", "deploy/grafana/dongbo-fleet.json"] {
        let text = std::fs::read_to_string(repo_root().join(file))?;
        for name in metric_names(&text) {
            if let Some((_, covered_by)) = CONDITIONAL.iter().find(|(n, _)| *n == name) {
                eprintln!("{name} is exported only {covered_by}");
                continue;
            }
            let exported =
                |t: &str| t.lines().any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
            assert!(
                exported(&hub) || exported(&agent),
                "{file} uses {name}, which neither the hub nor the agent exports"
            );
        }
    }

    // Unauthenticated scrapes of the hub are refused.
    assert_eq!(get(&m.hub, None).await?.0, 401);

    // The agent stops: the hub shows it disconnected and its silence growing.
    d.agent.as_mut().expect("agent").stop();
    let series = format!("dongbo_agent_silence_seconds{{source_id=\"{id}\"}}");
    let first = m.wait(true, &series, 0.5).await?;
    let hub = m.hub().await?;
    assert_eq!(value(&hub, &format!("dongbo_agent_connected{{source_id=\"{id}\"}}")), Some(0.0), "{hub}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = value(&m.hub().await?, &series).unwrap_or_default();
    assert!(later >= first + 1.0, "silence went from {first} to {later}");

    // Stopped, the agent's status is read from its spool.
    let status = agent_status(&d)?;
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["spool_batches"], 0, "everything was acknowledged: {status}");
    assert!(status["source_position"].as_str().is_some(), "{status}");

    // The fleet registry is in the NDC: a restarted hub still shows the agent as it last was.
    let fleet = hub_status(admin_port, &id, |e| e["connected"] == false && e["silence_s"].as_f64().is_some()).await?;
    let applied_before_restart = fleet["changes_applied"].clone();
    d.hub.as_mut().expect("hub").stop();
    d.start_hub().await?;
    let fleet = hub_status(admin_port, &id, |e| e["connected"] == false).await?;
    assert_eq!(fleet["province"], "79", "{fleet}");
    assert_eq!(fleet["transport"], "grpc", "{fleet}");
    assert!(fleet["host"].as_str().is_some_and(|h| !h.is_empty()), "the agent's host, from its report: {fleet}");
    assert!(fleet["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{fleet}");
    assert_eq!(fleet["spool_limit_bytes"], status["spool_limit_bytes"], "{fleet}");
    assert_eq!(fleet["changes_applied"], applied_before_restart, "{fleet}");
    assert!(fleet["changes_applied"].as_i64().is_some_and(|n| n >= 301), "{fleet}");
    assert!(fleet["last_contact"].as_str().is_some(), "{fleet}");
    assert_eq!(fleet["health"], "red", "a stopped agent is red at once: {fleet}");
    assert_eq!(fleet["source_log"], "wal", "{fleet}");
    assert!(fleet["source_log_retained_bytes"].as_i64().is_some_and(|b| b > 0), "{fleet}");
    assert!(fleet["source_log_headroom_bytes"].as_i64().is_some_and(|b| b > 0), "{fleet}");
    assert!(fleet["snapshot_rows"].is_null(), "no snapshot runs: {fleet}");
    // The table an operator reads.
    let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
        .args(["status", "--admin", &format!("http://127.0.0.1:{admin_port}")])
        .env("DONGBO_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap_or_default();
    assert!(row.contains(" 79 ") && row.contains("down") && row.contains("grpc"), "{table}");
    Ok(())
}

/// The agent's entry in `dongbo-hub status --json`, once `ready` holds for it.
async fn hub_status(
    admin_port: u16,
    id: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-hub")?)
            .args(["status", "--json", "--admin", &format!("http://127.0.0.1:{admin_port}")])
            .env("DONGBO_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()?;
        let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let entry = fleet.as_array().and_then(|a| a.iter().find(|e| e["source_id"] == id)).cloned();
        if let Some(e) = entry.filter(|e| ready(e)) {
            return Ok(e);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "dongbo-hub status never showed {id} as expected: {fleet}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `dongbo-agent status --json` on the deployment's agent.toml.
fn agent_status(d: &Deployment) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(dongbo_tests::procs::binary("dongbo-agent")?)
        .args(["status", "--json", "--config"])
        .arg(d.dir.join("agent.toml"))
        .output()?;
    anyhow::ensure!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn the_alert_rules_pass_promtool_and_fire_on_synthetic_series() -> anyhow::Result<()> {
    let dir = repo_root().join("deploy/prometheus");
    for args in [&["check", "rules", "dongbo-alerts.yml"][..], &["test", "rules", "dongbo-alerts.test.yml"][..]] {
        let out = std::process::Command::new("promtool").args(args).current_dir(&dir).output().map_err(|e| {
            anyhow::anyhow!("promtool: {e}; install Debian's prometheus package (./deploy/install-deps.sh)")
        })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
        anyhow::ensure!(text.contains("SUCCESS"), "promtool {}:\n{text}", args.join(" "));
    }
    Ok(())
}
