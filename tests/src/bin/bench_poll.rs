//! `dongbo-bench-poll`: the polling source on a Postgres or MariaDB table of N citizen rows (indexed on its
//! cursor column, as a polled table should be), read by a SELECT-only role; beside it, in the same
//! run, a full-table read of the same rows (the floor: what re-reading everything costs). It
//! prints, per phase, the rate and the source's load, read from the server's own statistics
//! (Postgres `pg_stat_database`, MariaDB's global status): statements run and rows read, and rows
//! read per change.
//!
//! Phases: the first full read by the poller; a change of M rows (one `UPDATE`) polled; ten idle
//! seconds of polling (what the safety window costs while nothing changes). The diff is set far
//! apart so it does not run during the figures. The rows start an hour old, outside the window, as a
//! legacy table's rows mostly are: the UPDATE phase then measures the UPDATE alone.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-poll [--source postgres|mariadb]
//! [--rows N] [--changes M]`
//! (defaults: 200 000 rows, 50 000 changes).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{applied, wait_for, wait_listening, write_hub_config, TABLE};
use dongbo_tests::mariadb::MariaDb;
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::{peak_rss_kib, DongboProcess};
use mysql_async::prelude::Queryable;
use tokio_postgres::Client;

const SOURCE_ID: &str = "poll";
const POLLER: &str = "poller";

struct Args {
    mariadb: bool,
    rows: u64,
    changes: u64,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args { mariadb: false, rows: 200_000, changes: 50_000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--source" => a.mariadb = dongbo_tests::mariadb::is_mariadb_source(&value)?,
            "--rows" => a.rows = value.parse()?,
            "--changes" => a.changes = value.parse()?,
            other => bail!("unknown flag {other}; use --source, --rows, --changes"),
        }
    }
    a.changes = a.changes.min(a.rows);
    Ok(a)
}

/// The polled server: Postgres (the table owner's connection) or MariaDB (root's).
enum Source {
    Postgres(PgCluster, Client),
    MariaDb(MariaDb, mysql_async::Conn),
}

impl Source {
    /// Statements run and rows read so far, as the server counts them: Postgres's
    /// `pg_stat_database` (statistics reach it within about a second), MariaDB's global status
    /// (`Questions`; rows read are not counted there: MariaDB adds a session's handler counts to
    /// the global status only when the session ends, and the poller's does not, so they are -1).
    async fn load(&mut self) -> anyhow::Result<(i64, i64)> {
        match self {
            Source::Postgres(_, admin) => {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                let r = admin
                    .query_one(
                        "SELECT xact_commit + xact_rollback, tup_returned + tup_fetched FROM pg_stat_database \
                         WHERE datname = 'province'",
                        &[],
                    )
                    .await?;
                Ok((r.get(0), r.get(1)))
            }
            Source::MariaDb(_, conn) => {
                let questions: Option<(String, i64)> = conn.query_first("SHOW GLOBAL STATUS LIKE 'Questions'").await?;
                // This statement is one of the questions counted.
                Ok((questions.map_or(0, |q| q.1) - 1, -1))
            }
        }
    }

    async fn execute(&mut self, sql: &str) -> anyhow::Result<()> {
        match self {
            Source::Postgres(_, admin) => admin.batch_execute(sql).await?,
            Source::MariaDb(_, conn) => conn.query_drop(sql).await?,
        }
        Ok(())
    }

    /// Reads every row once; returns how many.
    async fn read_all(&mut self) -> anyhow::Result<usize> {
        Ok(match self {
            Source::Postgres(_, admin) => admin
                .simple_query("SELECT * FROM citizens")
                .await?
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count(),
            Source::MariaDb(_, conn) => {
                let rows: Vec<mysql_async::Row> = conn.query("SELECT * FROM province.citizens").await?;
                rows.len()
            }
        })
    }

    /// The statement changing the first `n` rows.
    fn update(&self, n: u64) -> String {
        match self {
            Source::Postgres(..) => format!(
                "UPDATE citizens SET version = version + 1, updated_at = clock_timestamp() \
                 WHERE citizen_id <= lpad('{n}', 12, '0')"
            ),
            Source::MariaDb(..) => format!(
                "UPDATE province.citizens SET version = version + 1, updated_at = NOW(6) WHERE citizen_id <= LPAD({n}, 12, '0')"
            ),
        }
    }

    /// The agent's `[source.*]` section, as the SELECT-only role.
    fn server_toml(&self) -> String {
        match self {
            Source::Postgres(pg, _) => format!(
                "[source.postgres]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"province\"\nuser = \"{POLLER}\"\n\
                 password = \"poller-secret\"\ntables = [\"public.citizens\"]\n",
                pg.port
            ),
            Source::MariaDb(db, _) => format!(
                "[source.mysql]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{POLLER}\"\npassword = \"poller-secret\"\n\
                 tables = [\"province.citizens\"]\n",
                db.port
            ),
        }
    }

    fn table(&self) -> &'static str {
        match self {
            Source::Postgres(..) => "public.citizens",
            Source::MariaDb(..) => "province.citizens",
        }
    }
}

async fn start_source(mariadb: bool, rows: u64) -> anyhow::Result<Source> {
    if mariadb {
        let db = MariaDb::start("bench-poll", &["--skip-log-bin", "--innodb-buffer-pool-size=512M"]).await?;
        db.sql(&format!(
            "CREATE TABLE province.citizens (
               citizen_id char(12) PRIMARY KEY, full_name varchar(200) NOT NULL, birth_date date, gender smallint,
               province_code varchar(2), commune_code varchar(5), address text, residence_kind varchar(50),
               updated_at datetime(6) NOT NULL DEFAULT NOW(6), version int NOT NULL DEFAULT 1, KEY (updated_at)
             ) CHARACTER SET utf8mb4;
             INSERT INTO province.citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind, updated_at)
             SELECT LPAD(seq, 12, '0'), CONCAT('Nguyễn Văn ', seq), DATE_ADD('1960-01-01', INTERVAL seq % 20000 DAY), seq % 2, '79',
                    LPAD(25000 + seq % 1500, 5, '0'), CONCAT('Số ', seq % 300, ' đường Nguyễn Huệ'), 'thường trú', NOW(6) - INTERVAL 1 HOUR
             FROM province.seq_1_to_{rows};
             CREATE USER '{POLLER}'@'%' IDENTIFIED BY 'poller-secret';
             GRANT SELECT ON province.citizens TO '{POLLER}'@'%';
             CREATE USER 'bench'@'%' IDENTIFIED BY 'bench-secret';
             GRANT ALL ON province.* TO 'bench'@'%';"
        ))?;
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(db.port)
            .user(Some("bench"))
            .pass(Some("bench-secret"));
        let conn = mysql_async::Conn::new(opts).await?;
        return Ok(Source::MariaDb(db, conn));
    }
    let pg = PgCluster::start("bench-poll-src")?;
    pg.create_database("province").await?;
    let admin = pg.connect("province").await?;
    admin
        .batch_execute(&format!(
            "{TABLE}
             CREATE INDEX ON citizens (updated_at);
             INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind, updated_at)
             SELECT lpad(g::text, 12, '0'), 'Nguyễn Văn ' || g, DATE '1960-01-01' + g % 20000, g % 2, '79',
                    lpad((25000 + g % 1500)::text, 5, '0'), 'Số ' || g % 300 || ' đường Nguyễn Huệ', 'thường trú',
                    now() - interval '1 hour'
             FROM generate_series(1, {rows}) g;
             CREATE ROLE {POLLER} LOGIN PASSWORD 'poller-secret';
             GRANT SELECT ON citizens TO {POLLER};"
        ))
        .await?;
    admin.batch_execute("VACUUM ANALYZE citizens").await?;
    Ok(Source::Postgres(pg, admin))
}

/// The load of one phase, and its rate.
fn report(what: &str, changes: u64, took: Duration, before: (i64, i64), after: (i64, i64)) {
    let (queries, rows) = (after.0 - before.0, after.1 - before.1);
    let read = if after.1 < 0 {
        "rows read not counted".to_string()
    } else {
        format!("{rows} rows read, {:.2} rows read per change", rows as f64 / changes.max(1) as f64)
    };
    println!(
        "  {what:<34} {:>9.0} changes/s ({:.2} s)   source: {queries} statements, {read}",
        changes as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
    );
}

async fn wait_applied(ndc: &Client, target: i64, agent: &mut DongboProcess) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let n = applied(ndc, SOURCE_ID).await?;
        if n >= target {
            return Ok(start.elapsed());
        }
        if !agent.is_running() || start.elapsed() > Duration::from_secs(1800) {
            bail!("applied {n} of {target}; see {}", agent.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let kind = if a.mariadb { "MariaDB (no binlog)" } else { "Postgres" };
    println!("dongbo-bench-poll: {} rows, {} changed, {kind} polled by a SELECT-only role → NDC", a.rows, a.changes);
    let mut source = start_source(a.mariadb, a.rows).await?;
    let ndc_pg = PgCluster::start("bench-poll-ndc")?;
    ndc_pg.create_database("ndc").await?;
    let ndc = ndc_pg.connect("ndc").await?;

    // What the benchmark's own UPDATE reads (the same statement, before the agent runs), taken off
    // the polled phase's figure.
    let update = source.update(a.changes);
    let before_update = source.load().await?;
    source.execute(&update).await?;
    let after_update = source.load().await?;
    let update_cost = (after_update.0 - before_update.0, after_update.1 - before_update.1);

    // The floor: every row read once, as a full-table re-read would each cycle.
    let mut floor = Duration::MAX;
    let mut floor_load = ((0, 0), (0, 0));
    for _ in 0..3 {
        let before = source.load().await?;
        let start = Instant::now();
        let n = source.read_all().await?;
        let took = start.elapsed();
        anyhow::ensure!(n as u64 == a.rows, "the floor read {n} rows");
        if took < floor {
            floor = took;
            floor_load = (before, source.load().await?);
        }
    }

    let dir = ndc_pg.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let hub_port = pg::free_port();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &[SOURCE_ID])?;
    let mut hub =
        DongboProcess::spawn("dongbo-hub", &["serve", "--config", &hub_cfg.to_string_lossy()], &dir.join("hub.log"))?;
    wait_listening(hub_port).await?;
    wait_for("hub ready", Duration::from_secs(60), || async {
        Ok(ndc.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'dongbo'", &[]).await?.is_some())
    })
    .await?;
    let (interval_ms, window_s, diff_s) = (1_000, 10, 3_600);
    let agent_cfg = dir.join("poll.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "source_id = \"{SOURCE_ID}\"\n[source]\nkind = \"poll\"\ninterval_ms = {interval_ms}\nsafety_window = {window_s}\n\
             diff_interval_s = {diff_s}\nchunk_rows = 5000\ncursors = {{ \"{table}\" = \"updated_at\" }}\n\
             {server}[spool]\npath = \"{}\"\n\
             [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"{SOURCE_ID}-token\"\nmax_backoff_ms = 500\n",
            dir.join("poll-spool").display(),
            table = source.table(),
            server = source.server_toml(),
        ),
    )?;
    let rows = a.rows as i64;
    let before = source.load().await?;
    let mut agent = DongboProcess::spawn(
        "dongbo-agent",
        &["run", "--config", &agent_cfg.to_string_lossy()],
        &dir.join("poll.log"),
    )?;
    let first = wait_applied(&ndc, rows + 1, &mut agent).await?;
    let after_first = source.load().await?;

    // One statement changes M rows; the poller finds them at its next cycle (timed from the commit,
    // so the figure includes the wait for that cycle: 0 to interval_ms, as a user sees it).
    let before_change = (after_first.0 + update_cost.0, after_first.1 + update_cost.1);
    source.execute(&update).await?;
    let polled = wait_applied(&ndc, rows + 1 + a.changes as i64, &mut agent).await?;
    let after_change = source.load().await?;

    // Idle: nothing changes; the window's rows are read again each cycle until they age out of it.
    let idle_before = source.load().await?;
    let idle_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_after = source.load().await?;
    let idle_took = idle_start.elapsed();
    let rss = agent.pid().and_then(peak_rss_kib).unwrap_or(0);
    agent.stop();
    hub.stop();

    println!(
        "== polling, {} rows, {} changed (interval {interval_ms} ms, window {window_s} s, diff every {diff_s} s)",
        a.rows, a.changes
    );
    report("full-table read (floor)", a.rows, floor, floor_load.0, floor_load.1);
    report("first read by the poller", a.rows, first, before, after_first);
    report("one UPDATE of M rows, polled", a.changes, polled, before_change, after_change);
    let (q, r) = (idle_after.0 - idle_before.0, idle_after.1 - idle_before.1);
    let idle_s = idle_took.as_secs_f64();
    if idle_after.1 < 0 {
        println!("  idle polling                       {:.1} statements/s", q as f64 / idle_s);
    } else {
        println!(
            "  idle polling                       {:.1} statements/s, {:.0} rows read/s",
            q as f64 / idle_s,
            r as f64 / idle_s
        );
        println!(
            "  (the UPDATE itself: {} statements, {} rows read, taken off the polled figure)",
            update_cost.0, update_cost.1
        );
    }
    println!("  agent peak RSS {:.1} MiB", rss as f64 / 1024.0);
    Ok(())
}
