//! `dongbo-agent check` for a polled source: the server answers a read-only session, every table
//! is readable with a key and a usable cursor, and the poller's blind spots as figures (how late a
//! row may arrive, how often deletes are found), so provincial IT knows what polling gives.

use super::engine::Engine;
use super::mysql::MyPoller;
use super::postgres::PgPoller;
use super::PollConfig;
use crate::check::CheckReport;

/// Runs every check; never writes to the server.
pub async fn run(config: &PollConfig) -> CheckReport {
    let mut report = CheckReport::default();
    if let Some(pg) = &config.postgres {
        let what = format!("source {}:{}/{} (polled, read-only session)", pg.host, pg.port, pg.database);
        match PgPoller::connect(pg).await {
            Ok(engine) => {
                report.ok(format!("{what} reachable"));
                tables(engine, config, &mut report, "GRANT pg_read_all_stats TO the agent's role").await;
            }
            Err(e) => report.problem(what, format!("cannot connect: {e}; check host, port, user, password")),
        }
    } else if let Some(my) = &config.mysql {
        let what = format!("source {}:{} (polled, read-only session)", my.host, my.port);
        match MyPoller::connect(my).await {
            Ok(engine) => {
                report.ok(format!("{what} reachable"));
                tables(engine, config, &mut report, "GRANT PROCESS ON *.* TO the agent's user").await;
            }
            Err(e) => report.problem(what, format!("cannot connect: {e}; check host, port, user, password")),
        }
    } else if let Some(_odbc) = &config.odbc {
        #[cfg(feature = "odbc")]
        match super::odbc::OdbcPoller::connect(_odbc).await {
            Ok(engine) => {
                report.ok("source reachable through ODBC");
                tables(engine, config, &mut report, "(ODBC shows no open transactions)").await;
            }
            Err(e) => {
                report.problem("source through ODBC", format!("cannot connect: {e}; check the connection string"))
            }
        }
        #[cfg(not(feature = "odbc"))]
        report.problem("source through ODBC", "this agent was built without ODBC (the odbc feature)");
    }
    report
}

async fn tables<E: Engine>(mut engine: E, config: &PollConfig, report: &mut CheckReport, see_transactions: &str) {
    let listed = match config.tables() {
        Ok(t) => t,
        Err(e) => return report.problem("polled tables", e.to_string()),
    };
    let interval = config.interval().as_secs_f64();
    let mut any_time_cursor = false;
    for (id, cursor) in listed {
        let t = match engine.table(&id, &cursor).await {
            Ok(t) => t,
            Err(e) => {
                report.problem(format!("polled table {id}"), e.to_string());
                continue;
            }
        };
        any_time_cursor |= t.time_cursor;
        let highest = match engine.max_cursor(&t).await {
            Ok(Some(v)) => format!("{v:?}"),
            Ok(None) => "none yet".into(),
            Err(e) => {
                report.problem(
                    format!("polled table {id} readable"),
                    format!("{e}; GRANT SELECT ON {id} TO the agent's role"),
                );
                continue;
            }
        };
        let unit = if t.time_cursor { "s" } else { " values" };
        // One diff chunk a cycle: rows against the shadow, then the shadow's keys against the table.
        let pass_s = 2.0 * (t.estimated_rows as f64 / config.chunk_rows as f64).ceil().max(1.0) * interval;
        report.ok(format!(
            "polled table {id}: key ({}), cursor {cursor} (highest value {highest}), about {} rows",
            t.schema.key_columns.iter().map(|&k| t.schema.columns[k].name.as_str()).collect::<Vec<_>>().join(", "),
            t.estimated_rows,
        ));
        report.ok(format!(
            "blind spots of {id}: a write reaches the NDC within one cycle ({interval:.1} s); one committed late \
             but within {}{unit} of its cursor value, about {}{unit} after that value; a later commit, an update \
             that leaves {cursor} alone, and a delete are found by the diff, within {} s (diff_interval_s) plus one \
             pass (about {pass_s:.0} s at {} rows a cycle)",
            config.safety_window, config.safety_window, config.diff_interval_s, config.chunk_rows
        ));
    }
    if any_time_cursor {
        match engine.oldest_transaction_s().await {
            Ok(age) if age > config.safety_window => report.warn(
                "open transactions",
                format!(
                    "a transaction has been open {age} s, longer than source.safety_window ({} s): polling reads \
                     further back while it lasts; raise the window if such transactions are usual",
                    config.safety_window
                ),
            ),
            Ok(age) => report.ok(format!(
                "oldest open transaction the role can see: {age} s, within source.safety_window ({} s); the poller \
                 widens the window while one lasts longer (to see every session: {see_transactions})",
                config.safety_window
            )),
            Err(e) => report.warn(
                "open transactions",
                format!(
                    "the role cannot see the server's open transactions ({e}), so the window cannot widen for a long \
                     one: {see_transactions}"
                ),
            ),
        }
    }
}
