//! `dongbo-bench-poll`: the polling source on a Postgres table of N citizen rows (indexed on its
//! cursor column, as a polled table should be), read by a SELECT-only role; beside it, in the same
//! run, a full-table read of the same rows (the floor: what re-reading everything costs). It
//! prints, per phase, the rate and the source's load, read from the server's own statistics
//! (`pg_stat_database`): statements run and rows read, and rows read per change.
//!
//! Phases: the first full read by the poller; a change of M rows (one `UPDATE`) polled; ten idle
//! seconds of polling (what the safety window costs while nothing changes). The diff is set far
//! apart so it does not run during the figures.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-poll [--rows N] [--changes M]`
//! (defaults: 200 000 rows, 50 000 changes).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{applied, wait_for, wait_listening, write_hub_config, TABLE};
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::{peak_rss_kib, DongboProcess};
use tokio_postgres::Client;

const SOURCE_ID: &str = "poll";
const POLLER: &str = "poller";

struct Args {
    rows: u64,
    changes: u64,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args { rows: 200_000, changes: 50_000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--rows" => a.rows = value.parse()?,
            "--changes" => a.changes = value.parse()?,
            other => bail!("unknown flag {other}; use --rows, --changes"),
        }
    }
    a.changes = a.changes.min(a.rows);
    Ok(a)
}

/// The source database's statements and rows read so far, as the server counts them (its
/// statistics reach the view within about a second of each statement).
async fn load(admin: &Client) -> anyhow::Result<(i64, i64)> {
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

/// The load of one phase, and its rate.
fn report(what: &str, changes: u64, took: Duration, before: (i64, i64), after: (i64, i64)) {
    let (queries, rows) = (after.0 - before.0, after.1 - before.1);
    println!(
        "  {what:<34} {:>9.0} changes/s ({:.2} s)   source: {queries} statements, {rows} rows read, {:.2} rows read per change",
        changes as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        rows as f64 / changes.max(1) as f64
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
    println!("dongbo-bench-poll: {} rows, {} changed, Postgres polled by a SELECT-only role → NDC", a.rows, a.changes);
    let src_pg = PgCluster::start("bench-poll-src")?;
    src_pg.create_database("province").await?;
    let ndc_pg = PgCluster::start("bench-poll-ndc")?;
    ndc_pg.create_database("ndc").await?;
    let (admin, ndc) = (src_pg.connect("province").await?, ndc_pg.connect("ndc").await?);
    admin
        .batch_execute(&format!(
            "{TABLE}
             CREATE INDEX ON citizens (updated_at);
             INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
             SELECT lpad(g::text, 12, '0'), 'Nguyễn Văn ' || g, DATE '1960-01-01' + g % 20000, g % 2, '79',
                    lpad((25000 + g % 1500)::text, 5, '0'), 'Số ' || g % 300 || ' đường Nguyễn Huệ', 'thường trú'
             FROM generate_series(1, {rows}) g;
             CREATE ROLE {POLLER} LOGIN PASSWORD 'poller-secret';
             GRANT SELECT ON citizens TO {POLLER};",
            rows = a.rows
        ))
        .await?;
    admin.batch_execute("VACUUM ANALYZE citizens").await?;

    // What the benchmark's own UPDATE reads (the same statement, before the agent runs), taken off
    // the polled phase's figure.
    let update = format!(
        "UPDATE citizens SET version = version + 1, updated_at = clock_timestamp() WHERE citizen_id <= lpad('{}', 12, '0')",
        a.changes
    );
    let before_update = load(&admin).await?;
    admin.batch_execute(&update).await?;
    let after_update = load(&admin).await?;
    let update_cost = (after_update.0 - before_update.0, after_update.1 - before_update.1);
    admin.batch_execute("VACUUM ANALYZE citizens").await?;

    // The floor: every row read once, as a full-table re-read would each cycle.
    let mut floor = Duration::MAX;
    let mut floor_load = ((0, 0), (0, 0));
    for _ in 0..3 {
        let before = load(&admin).await?;
        let start = Instant::now();
        let n = admin.simple_query("SELECT * FROM citizens").await?.len();
        let took = start.elapsed();
        anyhow::ensure!(n as u64 > a.rows, "the floor read {n} rows");
        if took < floor {
            floor = took;
            floor_load = (before, load(&admin).await?);
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
             diff_interval_s = {diff_s}\nchunk_rows = 5000\ncursors = {{ \"public.citizens\" = \"updated_at\" }}\n\
             [source.postgres]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"province\"\nuser = \"{POLLER}\"\n\
             password = \"poller-secret\"\ntables = [\"public.citizens\"]\n[spool]\npath = \"{}\"\n\
             [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"{SOURCE_ID}-token\"\nmax_backoff_ms = 500\n",
            src_pg.port,
            dir.join("poll-spool").display(),
        ),
    )?;
    let rows = a.rows as i64;
    let before = load(&admin).await?;
    let mut agent = DongboProcess::spawn(
        "dongbo-agent",
        &["run", "--config", &agent_cfg.to_string_lossy()],
        &dir.join("poll.log"),
    )?;
    let first = wait_applied(&ndc, rows + 1, &mut agent).await?;
    let after_first = load(&admin).await?;

    // One statement changes M rows; the poller finds them at its next cycle (timed from the commit).
    let before_change = (after_first.0 + update_cost.0, after_first.1 + update_cost.1);
    admin.batch_execute(&update).await?;
    let polled = wait_applied(&ndc, rows + 1 + a.changes as i64, &mut agent).await?;
    let after_change = load(&admin).await?;

    // Idle: nothing changes; the window's rows are read again each cycle until they age out of it.
    let idle_before = load(&admin).await?;
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let idle_after = load(&admin).await?;
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
    println!(
        "  idle polling                       {:.1} statements/s, {:.0} rows read/s (the window's rows, read again until they age out)",
        q as f64 / (idle.as_secs_f64() + 1.5),
        r as f64 / (idle.as_secs_f64() + 1.5)
    );
    println!(
        "  a full-table re-read each cycle would read {} rows per cycle; polling the change read {:.2} rows per change",
        a.rows,
        (after_change.1 - before_change.1) as f64 / a.changes as f64
    );
    println!(
        "  (the UPDATE itself: {} statements, {} rows read, taken off the polled figure)",
        update_cost.0, update_cost.1
    );
    println!("  agent peak RSS {:.1} MiB", rss as f64 / 1024.0);
    Ok(())
}
