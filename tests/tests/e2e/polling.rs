//! The polling source, on a PostgreSQL server and on a MariaDB server without a binlog, each read
//! by a role that may only SELECT the table: the first full read; updates; two rows written with
//! the same cursor value; a row committed late with an older cursor value (caught by the safety
//! window); deletes and an update that leaves the cursor alone (both caught by the diff); then a
//! `kill -9` of the agent in the middle of a poll of 20 000 new rows. After every step the NDC
//! equals the source row for row, and the hub applied exactly as many changes as were made.

use std::process::Command;
use std::time::{Duration, Instant};

use dongbo_tests::mariadb::MariaDb;
use dongbo_tests::procs::binary;
use dongbo_tests::{pg, Deployment};

const ROWS: i64 = 1_000;
const BULK: i64 = 20_000;
const POLLER: &str = "poller";
const POLLER_PASSWORD: &str = "poller-secret";

/// The safety window of the scenario, in seconds.
const WINDOW_S: u64 = 8;

/// The `[source]` of a polled table `table` on a server described by `server` (its section),
/// with a diff every `diff_s` seconds.
fn poll_config(d: &Deployment, table: &str, server: &str, diff_s: u64) -> String {
    format!(
        "source_id = \"{id}\"\n\n[source]\nkind = \"poll\"\ninterval_ms = 200\nsafety_window = {WINDOW_S}\n\
         diff_interval_s = {diff_s}\nchunk_rows = 50\ncursors = {{ \"{table}\" = \"updated_at\" }}\n\n{server}\n\
         [spool]\npath = \"{spool}\"\n\n[hub]\nurl = \"http://127.0.0.1:{hub}\"\ntoken = \"{token}\"\n\
         max_backoff_ms = 1000\n",
        id = d.source_id,
        spool = d.dir.join("spool").display(),
        hub = d.hub_port,
        token = dongbo_tests::TOKEN,
    )
}

/// What a source server does in the scenario: statements, a transaction left open, the rows.
trait Server {
    /// Runs statements in one session, autocommit.
    async fn exec(&self, sql: &str) -> anyhow::Result<()>;
    /// Updates row `id` in a transaction that stays open for `open_for` while the rest of the
    /// scenario goes on, then commits: its cursor value is from when it began.
    fn late_update(&self, id: i64, open_for: Duration) -> std::thread::JoinHandle<anyhow::Result<()>>;
    /// Every row as `id|name|version`, sorted.
    async fn rows(&self) -> anyhow::Result<Vec<String>>;
}

/// The Postgres source, as the table's owner.
struct Postgres {
    port: u16,
}

impl Postgres {
    async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(self.port).user(pg::ROLE).password(pg::PASSWORD).dbname("province");
        let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

impl Server for Postgres {
    async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        Ok(self.client().await?.batch_execute(sql).await?)
    }

    fn late_update(&self, id: i64, open_for: Duration) -> std::thread::JoinHandle<anyhow::Result<()>> {
        let port = self.port;
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let mut c = tokio_postgres::Config::new();
                c.host("127.0.0.1").port(port).user(pg::ROLE).password(pg::PASSWORD).dbname("province");
                let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                // now() is the transaction's start: the row's cursor is older than its commit.
                client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE residents SET version = version + 1, updated_at = now() WHERE id = {id}"
                    ))
                    .await?;
                tokio::time::sleep(open_for).await;
                client.batch_execute("COMMIT").await?;
                anyhow::Ok(())
            })
        })
    }

    async fn rows(&self) -> anyhow::Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query("SELECT concat_ws('|', id, name, version) FROM residents ORDER BY 1", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

struct Maria<'a> {
    db: &'a MariaDb,
}

impl Server for Maria<'_> {
    async fn exec(&self, sql: &str) -> anyhow::Result<()> {
        self.db.sql(&format!("USE province; {sql}")).map(drop)
    }

    fn late_update(&self, id: i64, open_for: Duration) -> std::thread::JoinHandle<anyhow::Result<()>> {
        let socket = self.db.socket();
        let sql = format!(
            "BEGIN; UPDATE province.residents SET version = version + 1, updated_at = NOW(6) WHERE id = {id}; \
             SELECT SLEEP({}); COMMIT;",
            open_for.as_secs_f64()
        );
        std::thread::spawn(move || {
            let out = Command::new("mariadb")
                .arg(format!("--socket={}", socket.display()))
                .args(["-u", "root", "--batch", "-e", &sql])
                .output()?;
            anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        })
    }

    async fn rows(&self) -> anyhow::Result<Vec<String>> {
        self.db.sorted_lines("SELECT concat_ws('|', id, name, version) FROM province.residents")
    }
}

async fn ndc_rows(d: &Deployment, table: &str) -> anyhow::Result<Vec<String>> {
    let sql = format!("SELECT concat_ws('|', id, name, version) FROM {}.\"{table}\"", d.ndc_schema());
    let mut rows: Vec<String> = d.ndc().await?.query(&sql, &[]).await?.iter().map(|r| r.get(0)).collect();
    rows.sort();
    Ok(rows)
}

/// Waits for exactly `expected` changes applied, then for the NDC to equal the source.
async fn settle(d: &Deployment, s: &impl Server, table: &str, expected: i64, what: &str) -> anyhow::Result<()> {
    if let Err(e) = d.wait_applied(expected, Duration::from_secs(90)).await {
        let log = d.agent.as_ref().map(|a| dongbo_tests::tail(&a.log_text(), 10)).unwrap_or_default();
        let hub = d.hub.as_ref().map(|a| dongbo_tests::tail(&a.log_text(), 20)).unwrap_or_default();
        let (ndc, source) = (ndc_rows(d, table).await?.len(), s.rows().await?.len());
        anyhow::bail!("{what}: {e}; NDC rows {ndc}, source rows {source}; the agent's log:\n{log}\nthe hub's:\n{hub}");
    }
    let (_, _, quarantined) = d.applied().await?;
    if quarantined > 0 {
        let reasons = d.ndc().await?.query("SELECT reason FROM dongbo.quarantine LIMIT 3", &[]).await?;
        let reasons: Vec<String> = reasons.iter().map(|r| r.get(0)).collect();
        anyhow::bail!("{what}: {quarantined} changes quarantined: {reasons:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (source, ndc) = (s.rows().await?, ndc_rows(d, table).await?);
        if source == ndc {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what}: the NDC holds {} rows, the source {}; first differences: {:?}",
                ndc.len(),
                source.len(),
                source.iter().zip(&ndc).filter(|(a, b)| a != b).take(3).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The scenario after the table and the role exist; `config` makes the agent's config with a
/// diff every so many seconds; `now` is the server's current-time function.
async fn scenario(
    d: &mut Deployment,
    s: &impl Server,
    table: &str,
    config: impl Fn(&Deployment, u64) -> String,
    now: &str,
) -> anyhow::Result<()> {
    d.start_hub().await?;
    // No diff at first: what these steps catch, polling alone must.
    d.start_agent_from(&config(d, 3_600), &[])?;
    // The first read: a TRUNCATE, then every row.
    let mut expected = 1 + ROWS;
    settle(d, s, table, expected, "first read").await?;

    s.exec(&format!("UPDATE residents SET version = version + 1, updated_at = {now} WHERE id <= 50")).await?;
    expected += 50;
    settle(d, s, table, expected, "updates").await?;

    // Two rows with one cursor value, written together.
    s.exec(&format!(
        "INSERT INTO residents (id, name, version, updated_at) VALUES (5001, 'Trần Văn A', 1, {now}), \
         (5002, 'Trần Văn B', 1, {now})"
    ))
    .await?;
    expected += 2;
    settle(d, s, table, expected, "two rows with the same cursor value").await?;

    // A transaction open for 3 s: while it is open, later writes are polled and move the
    // watermark past its cursor value. Committed within the safety window of that value, it is
    // read when the settled sweep passes it, once later writes have moved the watermark a window
    // further (no diff runs yet: polling alone must catch it).
    let late = s.late_update(7, Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.exec(&format!("UPDATE residents SET version = version + 1, updated_at = {now} WHERE id BETWEEN 100 AND 104"))
        .await?;
    expected += 5;
    d.wait_applied(expected, Duration::from_secs(30)).await?;
    late.join().expect("late writer")?;
    tokio::time::sleep(Duration::from_secs(WINDOW_S + 1)).await;
    s.exec(&format!("UPDATE residents SET version = version + 1, updated_at = {now} WHERE id = 105")).await?;
    expected += 2;
    settle(d, s, table, expected, "a row committed late with an older cursor value").await?;

    // What polling cannot see, the diff finds: deletes, and an update that leaves the cursor
    // alone. The agent restarts with a diff every 2 s (and resumes from its spool).
    d.agent.as_mut().expect("agent").stop();
    d.start_agent_from(&config(d, 2), &[])?;
    s.exec("DELETE FROM residents WHERE id BETWEEN 200 AND 209").await?;
    s.exec("UPDATE residents SET name = 'Lê Thị Cursor Không Đổi' WHERE id = 300").await?;
    expected += 11;
    settle(d, s, table, expected, "deletes and an update without a new cursor value").await?;

    // kill -9 in the middle of a poll: 20 000 new rows, read 50 at a time.
    s.exec(&format!(
        "INSERT INTO residents (id, name, version, updated_at) SELECT 10000 + g, concat('Người ', g), 1, {now} \
         FROM {series}",
        series = if now == "now()" {
            "generate_series(1, 20000) AS g"
        } else {
            "(SELECT seq AS g FROM seq_1_to_20000) AS s"
        }
    ))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, applied, _) = d.applied().await?;
        if applied > expected {
            anyhow::ensure!(applied < expected + BULK, "the poll finished before the kill: {applied} applied");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the bulk insert was not polled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.agent.as_mut().expect("agent").kill9();
    d.start_agent_from(&config(d, 2), &[])?;
    expected += BULK;
    settle(d, s, table, expected, "kill -9 mid-poll").await?;

    // A crash after a batch is spooled and before its shadow delta reaches the shadow store: the
    // restarted agent applies the delta from the spool, so the batch's rows are not shipped again.
    d.agent.as_mut().expect("agent").stop();
    d.start_agent_from(&config(d, 3_600), &[("DONGBO_FAULT", "spool-shadow-unapplied")])?;
    s.exec(&format!("UPDATE residents SET version = version + 1, updated_at = {now} WHERE id BETWEEN 400 AND 409"))
        .await?;
    expected += 10;
    let agent = d.agent.as_mut().expect("agent");
    let status = agent.wait_exit(Duration::from_secs(60));
    anyhow::ensure!(status.is_some_and(|s| !s.success()), "the fault did not fire: {status:?}");
    d.start_agent_from(&config(d, 3_600), &[])?;
    settle(d, s, table, expected, "a crash between a batch and its shadow delta").await?;
    let log = d.agent.as_ref().expect("agent").log_text();
    anyhow::ensure!(log.contains("applied again from the spool"), "the restarted agent replayed no delta:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_polled_by_a_select_only_role_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut d = Deployment::new(
        "poll-pg",
        &format!(
            "CREATE TABLE residents (id int PRIMARY KEY, name text NOT NULL, version int NOT NULL, \
               updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO residents SELECT g, 'Nguyễn Văn ' || g, 1, now() - interval '1 day' FROM generate_series(1, {ROWS}) g;"
        ),
        &["public.residents"],
    )
    .await?;
    let admin = d.pg.connect("province").await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {POLLER} LOGIN PASSWORD '{POLLER_PASSWORD}'; GRANT SELECT ON public.residents TO {POLLER};"
        ))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let server = format!(
        "[source.postgres]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"province\"\nuser = \"{POLLER}\"\n\
         password = \"{POLLER_PASSWORD}\"\ntables = [\"public.residents\"]\n",
        d.pg.port
    );
    let config = |d: &Deployment, diff_s| poll_config(d, "public.residents", &server, diff_s);

    // check: readable, keyed, a usable cursor, and the blind spots in figures.
    let path = d.dir.join("check.toml");
    std::fs::write(&path, config(&d, 600))?;
    let out = Command::new(binary("dongbo-agent")?).args(["check", "--config"]).arg(&path).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("polled table public.residents: key (id), cursor updated_at"), "{text}");
    assert!(text.contains("blind spots of public.residents"), "{text}");
    // It never asks for a publication or a slot: the role could not make them.
    assert!(!text.contains("publication") && !text.contains("slot"), "{text}");

    let s = Postgres { port: d.pg.port };
    scenario(&mut d, &s, "residents", config, "now()").await
}

/// The scenario's table on a MariaDB server, and the user that may only SELECT it.
fn residents_on(db: &MariaDb) -> anyhow::Result<()> {
    db.sql(&format!(
        "CREATE TABLE province.residents (id int PRIMARY KEY, name varchar(100) NOT NULL, version int NOT NULL, \
           updated_at datetime(6) NOT NULL) CHARACTER SET utf8mb4;
         INSERT INTO province.residents SELECT seq, CONCAT('Nguyễn Văn ', seq), 1, NOW(6) - INTERVAL 1 DAY \
           FROM province.seq_1_to_{ROWS};
         CREATE USER '{POLLER}'@'%' IDENTIFIED BY '{POLLER_PASSWORD}';
         GRANT SELECT ON province.residents TO '{POLLER}'@'%';"
    ))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_without_a_binlog_polled_by_a_select_only_user_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut d = Deployment::new("poll-maria", "SELECT 1", &["province.residents"]).await?;
    let db = MariaDb::start("poll", &["--skip-log-bin"]).await?;
    residents_on(&db)?;
    let server = format!(
        "[source.mysql]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{POLLER}\"\npassword = \"{POLLER_PASSWORD}\"\n\
         tables = [\"province.residents\"]\n",
        db.port
    );
    let config = |d: &Deployment, diff_s| poll_config(d, "province.residents", &server, diff_s);
    let s = Maria { db: &db };
    scenario(&mut d, &s, "province.residents", config, "NOW(6)").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_polled_through_odbc_loses_and_doubles_nothing() -> anyhow::Result<()> {
    // The agent built with the odbc feature (tests/run-all.sh builds it beside the default one).
    let odbc_agent = binary("dongbo-agent-odbc")?;
    let drivers = Command::new("odbcinst").args(["-q", "-d"]).output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&drivers.stdout).contains("[MariaDB Unicode]"),
        "Debian's MariaDB ODBC driver is not installed: run ./deploy/install-deps.sh"
    );
    let mut d = Deployment::new("poll-odbc", "SELECT 1", &["province.residents"]).await?;
    d.agent_binary = Some(odbc_agent);
    let db = MariaDb::start("poll-odbc", &["--skip-log-bin"]).await?;
    residents_on(&db)?;
    let password = d.dir.join("odbc.password");
    std::fs::write(&password, POLLER_PASSWORD)?;
    let server = format!(
        "[source.odbc]\nconnection_string = \"Driver={{MariaDB Unicode}};Server=127.0.0.1;Port={};Database=province;\
         UID={POLLER}\"\npassword_file = \"{}\"\ntables = [\"province.residents\"]\nnamespace = \"catalog\"\n",
        db.port,
        password.display()
    );
    let config = |d: &Deployment, diff_s| poll_config(d, "province.residents", &server, diff_s);
    let s = Maria { db: &db };
    scenario(&mut d, &s, "province.residents", config, "NOW(6)").await
}
