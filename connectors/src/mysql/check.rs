//! `dongbo-agent check` for a MySQL/MariaDB source: what capture will need, in plain words, with
//! the statement that fixes each problem. Touches nothing.
//!
//! The role's replication right is proved the way capture will use it: by opening a binlog stream
//! at the server's current position (non-blocking, so it ends at once), not by reading grants,
//! whose names differ between MySQL and MariaDB versions.

use futures::StreamExt;
use mysql_async::prelude::Queryable;

use super::config::MySqlConfig;
use crate::check::CheckReport;

/// Warn when the server keeps its binlogs for less than this: a link down longer loses changes.
const RETENTION_WARNING_HOURS: u64 = 72;

/// A backquoted identifier.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Checks the server, the role and the tables.
pub async fn run(config: &MySqlConfig) -> CheckReport {
    let mut r = CheckReport::default();
    let server = format!("source {}:{}", config.host, config.port);
    let opts = match config.opts() {
        Ok(o) => o,
        Err(e) => {
            r.problem(server, e);
            return r;
        }
    };
    let mut conn = match mysql_async::Conn::new(opts.clone()).await {
        Ok(c) => c,
        Err(e) => {
            r.problem(server, format!("cannot connect: {e}; check host, port, user, password and TLS"));
            return r;
        }
    };
    let full_image = match settings(&mut conn, config, &mut r, &server).await {
        Ok(full) => full,
        Err(e) => {
            r.problem("server settings", e.to_string());
            true
        }
    };
    binlog_access(&mut conn, opts, config, &mut r).await;
    for table in config.table_ids() {
        if let Err(e) = one_table(&mut conn, &table, full_image, &mut r).await {
            r.problem(format!("table {table}"), e.to_string());
        }
    }
    let _ = conn.disconnect().await;
    r
}

async fn settings(
    conn: &mut mysql_async::Conn,
    config: &MySqlConfig,
    r: &mut CheckReport,
    server: &str,
) -> Result<bool, mysql_async::Error> {
    let (version, log_bin, format, image, server_id): (String, i64, String, String, u32) = conn
        .query_first("SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id")
        .await?
        .unwrap_or_default();
    r.ok(format!("{server} reachable ({version})"));
    if log_bin == 1 {
        r.ok("log_bin is on");
    } else {
        r.problem("log_bin", "is off: set log_bin (and server_id) in the server's configuration and restart it");
    }
    if format.eq_ignore_ascii_case("ROW") {
        r.ok("binlog_format is ROW");
    } else {
        r.problem(
            "binlog_format",
            format!("is {format}; run SET GLOBAL binlog_format = 'ROW' and set binlog_format = ROW in the server's configuration"),
        );
    }
    if image.eq_ignore_ascii_case("FULL") {
        r.ok("binlog_row_image is FULL");
    } else {
        r.warn(
            "binlog_row_image",
            format!(
                "is {image}: columns a change leaves out keep their NDC value, and a table without primary key \
                 needs FULL; SET GLOBAL binlog_row_image = 'FULL' to send whole rows"
            ),
        );
    }
    if server_id == 0 {
        r.problem("server_id", "is 0, which disables replication: set server_id in the server's configuration");
    } else if server_id == config.replica_server_id {
        r.problem("server_id", format!("equals source.replica_server_id ({server_id}): give the agent another id"));
    } else {
        r.ok(format!("server_id is {server_id}, the agent replicates as {}", config.replica_server_id));
    }
    let gtid: Option<String> = conn.query_first("SELECT @@gtid_current_pos").await.ok().flatten();
    if let Some(g) = gtid {
        r.ok(format!("MariaDB GTID position {}", if g.is_empty() { "(none yet)" } else { &g }));
    }
    match super::retention::expire_seconds(conn).await? {
        0 => r.ok("binlogs are kept until purged by hand"),
        s if s / 3600 < RETENTION_WARNING_HOURS => r.warn(
            "binlog retention",
            format!(
                "the server keeps binlogs {} hours: a link down longer than that loses changes the spool never saw; \
                 raise binlog_expire_logs_seconds",
                s / 3600
            ),
        ),
        s => r.ok(format!("binlogs are kept {} hours", s / 3600)),
    }
    // Capture refuses compressed events: say so before it starts.
    if conn.query_first::<i64, _>("SELECT @@log_bin_compress").await.ok().flatten() == Some(1) {
        r.problem(
            "log_bin_compress",
            "is ON: the agent does not read compressed binlog events; run SET GLOBAL log_bin_compress = OFF",
        );
    }
    // The snapshot needs the binlog position of its read view, which MariaDB publishes.
    let snapshot: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_file'").await?;
    if snapshot.is_empty() {
        r.problem(
            "consistent snapshot",
            "this server does not report binlog_snapshot_file (it is MySQL): the agent snapshots MariaDB without \
             locks; MySQL 8's short per-table lock path is not built yet",
        );
    } else {
        r.ok("consistent snapshots without a lock (binlog_snapshot_file)");
    }
    Ok(image.eq_ignore_ascii_case("FULL"))
}

/// Opens a binlog stream at the server's current position, as capture will.
async fn binlog_access(
    conn: &mut mysql_async::Conn,
    opts: mysql_async::Opts,
    config: &MySqlConfig,
    r: &mut CheckReport,
) {
    let status: Result<Option<mysql_async::Row>, _> = conn.query_first("SHOW MASTER STATUS").await;
    let (file, pos) = match status {
        Ok(Some(row)) => match (row.get::<String, usize>(0), row.get::<u64, usize>(1)) {
            (Some(f), Some(p)) => (f, p),
            _ => return r.problem("binlog position", "SHOW MASTER STATUS returned no file and position"),
        },
        Ok(None) => return r.problem("binlog position", "SHOW MASTER STATUS is empty: is log_bin on?"),
        Err(e) => {
            return r.problem(
                "binlog position",
                format!(
                    "{e}; as an administrator run GRANT BINLOG MONITOR ON *.* TO '{}' (MariaDB 10.5 and later) or \
                     GRANT REPLICATION CLIENT ON *.* TO '{}' (MySQL)",
                    config.user, config.user
                ),
            )
        }
    };
    let stream = async {
        let replica = mysql_async::Conn::new(opts).await?;
        let request = mysql_async::BinlogStreamRequest::new(config.replica_server_id)
            .with_filename(file.as_bytes())
            .with_pos(pos)
            .with_non_blocking();
        let mut events = replica.get_binlog_stream(request).await?;
        while let Some(event) = events.next().await {
            event?;
        }
        Ok::<_, mysql_async::Error>(())
    };
    match stream.await {
        Ok(()) => r.ok(format!("role {} may read the binlog (from {file}:{pos})", config.user)),
        Err(e) => r.problem(
            format!("role {}", config.user),
            format!(
                "cannot read the binlog ({e}); as an administrator run GRANT REPLICATION SLAVE ON *.* TO '{}'",
                config.user
            ),
        ),
    }
}

async fn one_table(
    conn: &mut mysql_async::Conn,
    table: &crate::model::TableId,
    full_image: bool,
    r: &mut CheckReport,
) -> Result<(), mysql_async::Error> {
    let what = format!("table {table}");
    let engine: Option<Option<String>> = conn
        .exec_first(
            "SELECT ENGINE FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            (&table.schema, &table.name),
        )
        .await?;
    let Some(engine) = engine else {
        r.problem(what, "does not exist (or the role may not see it); fix source.tables or GRANT SELECT on it");
        return Ok(());
    };
    let engine = engine.unwrap_or_default();
    if !engine.eq_ignore_ascii_case("InnoDB") {
        r.warn(
            &what,
            format!(
                "uses the {engine} engine, which has no transactions: the snapshot's read view does not cover it, so \
                 writes during the snapshot may be missed or doubled; ALTER TABLE {}.{} ENGINE = InnoDB",
                quote(&table.schema),
                quote(&table.name)
            ),
        );
    }
    // The same decoding rules capture uses: a column it cannot decode is refused here first.
    if let Err(e) = super::schema::read(conn, table).await {
        r.problem(&what, e.to_string());
        return Ok(());
    }
    let read = conn.query_drop(format!("SELECT 1 FROM {}.{} LIMIT 0", quote(&table.schema), quote(&table.name))).await;
    if let Err(e) = read {
        r.problem(
            what,
            format!(
                "cannot be read ({e}); GRANT SELECT ON {}.{} TO the agent's role",
                quote(&table.schema),
                quote(&table.name)
            ),
        );
        return Ok(());
    }
    let keys: Option<u64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = ? AND table_name = ? AND column_key = 'PRI'",
            (&table.schema, &table.name),
        )
        .await?;
    if keys.unwrap_or(0) > 0 {
        r.ok(format!("{what} has a primary key and is readable"));
    } else if full_image {
        r.ok(format!("{what} has no primary key: kept as a multiset (needs binlog_row_image = FULL); it is readable"));
    } else {
        r.problem(
            what,
            "has no primary key, so its updates and deletes name their row by all of its old values, which \
             binlog_row_image = FULL logs; run SET GLOBAL binlog_row_image = 'FULL' (and set it in the server's \
             configuration)",
        );
    }
    Ok(())
}

/// Whether the server still has the binlog file of `pos` (where an agent's spool resumes): `Err`
/// with the reason when it cannot be asked.
pub async fn has_binlog_of(config: &MySqlConfig, pos: crate::model::BinlogPos) -> Result<(String, bool), String> {
    let opts = config.opts()?;
    let mut conn = mysql_async::Conn::new(opts).await.map_err(|e| e.to_string())?;
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(|e| e.to_string())?;
    let _ = conn.disconnect().await;
    let names: Vec<String> = logs.iter().filter_map(|r| r.get::<String, usize>(0)).collect();
    let first = names.first().ok_or("the server lists no binlogs")?;
    let files = super::position::BinlogFiles::from_file_name(first).map_err(|e| e.to_string())?;
    let wanted = files.file_name(pos);
    let present = names.contains(&wanted);
    Ok((wanted, present))
}
