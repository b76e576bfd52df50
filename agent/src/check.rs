//! `dongbo-agent check`: what is wrong, in plain words, before anything runs.

use dongbo_connectors::check::{CheckItem, CheckReport};

use crate::config::{AgentConfig, SourceConfig};
use crate::ship;

/// Checks the source database, the spool directory and the link (hub or Kafka); never changes anything.
pub async fn run(config: &AgentConfig) -> CheckReport {
    let mut report = match &config.source {
        SourceConfig::Postgres(pg) => postgres(pg).await,
        SourceConfig::MySql(my) => dongbo_connectors::mysql::check::run(my).await,
        SourceConfig::Poll(poll) => dongbo_connectors::poll::check::run(poll).await,
    };
    if let SourceConfig::MySql(my) = &config.source {
        binlog_resume(config, my, &mut report).await;
    }
    link(config, &mut report).await;
    report
}

/// Whether the server still has the binlog the spool resumes from: `run` would stop at once on a
/// purged one, so `check` says so first.
async fn binlog_resume(config: &AgentConfig, my: &dongbo_connectors::mysql::MySqlConfig, report: &mut CheckReport) {
    if !config.spool.path.join("index").exists() {
        return;
    }
    let resume = match crate::spool::Spool::open(&config.spool.path, config.spool.max_bytes) {
        Ok(spool) => spool.resume_point(),
        // A running agent holds its spool; its position is its own business then.
        Err(_) => return,
    };
    let Ok(dongbo_connectors::source::ResumePoint {
        committed_end: Some(dongbo_connectors::model::Position::MySql(pos)),
        ..
    }) = resume
    else {
        return;
    };
    match dongbo_connectors::mysql::check::has_binlog_of(my, pos).await {
        Ok((file, true)) => report.ok(format!("the binlog the spool resumes from ({file}) is still on the server")),
        Ok((file, false)) => report.problem(
            "binlog position",
            format!(
                "the spool resumes from {file}, which the server no longer has (purged): the changes since are gone \
                 from the binlog. Keep binlogs longer (binlog_expire_logs_seconds) and take a new snapshot: move \
                 the spool directory aside, then start the agent"
            ),
        ),
        Err(e) => report.warn("binlog position", format!("cannot tell whether the server still has it: {e}")),
    }
}

async fn postgres(pg: &dongbo_connectors::postgres::PostgresConfig) -> CheckReport {
    let mut report = CheckReport::default();
    match pg.connect_query().await {
        Ok(client) => {
            report.push(CheckItem {
                what: format!("source {}:{}/{} reachable", pg.host, pg.port, pg.database),
                problem: None,
            });
            match dongbo_connectors::postgres::check::run(&client, pg).await {
                Ok(r) => {
                    r.items.into_iter().for_each(|i| report.push(i));
                    r.warnings.into_iter().for_each(|(what, why)| report.warn(what, why));
                }
                Err(e) => report.push(CheckItem { what: "source checks".into(), problem: Some(e.to_string()) }),
            }
            replication(&mut report, pg).await;
        }
        Err(e) => report.push(CheckItem {
            what: format!("source {}:{}/{}", pg.host, pg.port, pg.database),
            problem: Some(match e {
                // The TLS message already says what to change.
                dongbo_connectors::error::SourceError::Tls(_) => format!("cannot connect: {e}"),
                _ => format!("cannot connect: {e}; check host, port, user, password and pg_hba.conf"),
            }),
        }),
    }
    report
}

/// The spool directory, and the link to the hub or the Kafka brokers.
async fn link(config: &AgentConfig, report: &mut CheckReport) {
    let spool_dir = &config.spool.path;
    let parent = spool_dir.parent().unwrap_or(spool_dir);
    let writable = std::fs::create_dir_all(spool_dir).is_ok()
        || parent.metadata().map(|m| !m.permissions().readonly()).unwrap_or(false);
    report.push(CheckItem {
        what: format!("spool directory {}", spool_dir.display()),
        problem: (!writable).then(|| "cannot be created or written; fix spool.path or its permissions".to_string()),
    });
    if let Some(hub) = &config.hub {
        for (what, file) in [("agent certificate", &hub.cert_file), ("hub CA", &hub.ca_file)] {
            let Some(path) = file else { continue };
            certificate(report, what, path);
        }
        let token = hub.resolve_token().unwrap_or_default();
        match ship::open_stream(&config.source_id, hub, &token).await {
            Ok((dongbo_proto::v1::Welcome { applied_seq: applied, .. }, _, _)) => report.push(CheckItem {
                what: format!("hub {} accepts this agent (applied seq {applied})", hub.url),
                problem: None,
            }),
            Err(e) => report.push(CheckItem { what: format!("hub {}", hub.url), problem: Some(e.to_string()) }),
        }
    }
    if let Some(k) = &config.kafka {
        let what = format!("Kafka brokers {}", k.brokers);
        #[cfg(feature = "kafka")]
        match crate::kafka::reachable(k).await {
            Ok(n) => report.push(CheckItem { what: format!("{what} reachable ({n} brokers)"), problem: None }),
            Err(e) => report.push(CheckItem { what, problem: Some(e.to_string()) }),
        }
        #[cfg(not(feature = "kafka"))]
        report.push(CheckItem { what, problem: Some(crate::config::NO_KAFKA.into()) });
    }
}

/// Opens the replication connection as `run` will (pg_hba.conf, TLS, the REPLICATION attribute and
/// a free WAL sender all decide it) and asks the server who it is.
async fn replication(report: &mut CheckReport, pg: &dongbo_connectors::postgres::PostgresConfig) {
    use dongbo_connectors::postgres::protocol::ReplicationConnection;
    let what = format!("replication connection to {}:{}/{}", pg.host, pg.port, pg.database);
    let password = pg.resolve_password().ok().flatten();
    let result = async {
        let mut c = ReplicationConnection::connect(&pg.target(password.as_deref())).await?;
        c.simple_query("IDENTIFY_SYSTEM").await
    }
    .await;
    match result {
        Ok(_) => report.push(CheckItem { what: format!("{what} accepted"), problem: None }),
        Err(e) => report.push(CheckItem {
            what,
            problem: Some(format!(
                "{e}; run opens this connection to stream changes: check pg_hba.conf (a line for this database \
                 and role from this host), max_wal_senders and the role's REPLICATION attribute"
            )),
        }),
    }
}

/// An expired or unreadable certificate is a problem; one that expires within 30 days a warning.
fn certificate(report: &mut CheckReport, what: &str, path: &std::path::Path) {
    use dongbo_connectors::tls::{certificate_validity, EXPIRY_WARNING_DAYS};
    let what = format!("{what} {}", path.display());
    match certificate_validity(path) {
        Err(e) => report.push(CheckItem { what, problem: Some(e) }),
        Ok(v) if v.days_left < 0 => report.push(CheckItem {
            what,
            problem: Some(format!("expired on {}; ask the NDC for a new certificate", v.not_after)),
        }),
        Ok(v) => {
            if v.days_left < EXPIRY_WARNING_DAYS {
                report.warn(
                    what.clone(),
                    format!("expires in {} days ({}): ask the NDC for a new one now", v.days_left, v.not_after),
                );
            }
            report.push(CheckItem { what: format!("{what} valid until {}", v.not_after), problem: None });
        }
    }
}
