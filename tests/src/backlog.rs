//! A citizen-table backlog for the benchmarks: the table, N inserts then N updates, and polling.

use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_postgres::Client;

use crate::pg::PgCluster;

/// The two servers of an end-to-end benchmark: a source cluster whose `province` database holds
/// the citizen table, owned by the agent's role and published as `dongbo`, and an NDC cluster
/// with an empty `ndc` database; with the bench directory and a superuser client of each.
pub struct BenchClusters {
    /// The source cluster.
    pub province: PgCluster,
    /// The NDC cluster.
    pub ndc_pg: PgCluster,
    /// Configs, spools and logs.
    pub dir: std::path::PathBuf,
    /// The `province` database.
    pub src: Client,
    /// The `ndc` database.
    pub ndc: Client,
}

/// Starts the clusters of benchmark `name` (named `<name>-province` and `<name>-ndc`).
pub async fn bench_clusters(name: &str) -> anyhow::Result<BenchClusters> {
    let province = PgCluster::start(&format!("{name}-province"))?;
    let ndc_pg = PgCluster::start(&format!("{name}-ndc"))?;
    province.create_database("province").await?;
    ndc_pg.create_database("ndc").await?;
    let dir = province.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let src = province.connect("province").await?;
    src.batch_execute(TABLE).await?;
    src.batch_execute("ALTER TABLE citizens OWNER TO dongbo; CREATE PUBLICATION dongbo FOR TABLE citizens").await?;
    let ndc = ndc_pg.connect("ndc").await?;
    // A checkpoint forced by WAL volume, or an autovacuum worker woken (once a minute) in the
    // middle of one run and not another, would be most of the difference between them; runs call
    // [`settle`] first instead.
    ndc.execute("ALTER SYSTEM SET max_wal_size = '16GB'", &[]).await?;
    ndc.execute("ALTER SYSTEM SET autovacuum = off", &[]).await?;
    ndc.execute("SELECT pg_reload_conf()", &[]).await?;
    Ok(BenchClusters { province, ndc_pg, dir, src, ndc })
}

/// Clears what earlier runs left in the NDC, so each run starts from the same state: their dead
/// rows are vacuumed (else autovacuum does it during the next run, on the same two cores) and
/// their dirty pages written out.
pub async fn settle(ndc: &Client) -> anyhow::Result<()> {
    ndc.batch_execute("VACUUM (ANALYZE)").await?;
    ndc.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// The benchmarks' citizen table (no autovacuum, so runs compare).
pub const TABLE: &str = "CREATE TABLE citizens (
    citizen_id char(12) PRIMARY KEY, full_name text NOT NULL, birth_date date, gender smallint,
    province_code varchar(2), commune_code varchar(5), address text, residence_kind text,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), version int NOT NULL DEFAULT 1);
    ALTER TABLE citizens SET (autovacuum_enabled = false);";

/// Polls `done` every 20 ms until it is true; returns how long that took.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut done: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while !done().await? {
        if start.elapsed() > timeout {
            bail!("{what} did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// N inserts in 10 transactions, then N updates in 10 transactions, on ids `first..first + rows`.
pub async fn load(src: &Client, first: u64, rows: u64) -> anyhow::Result<()> {
    let step = rows.div_ceil(10);
    for i in 0..10 {
        let (a, b) = (first + i * step, first + ((i + 1) * step).min(rows) - 1);
        src.execute(
            &format!(
                "INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
                 SELECT lpad(g::text, 12, '0'), 'Nguyễn Văn ' || g, DATE '1960-01-01' + g % 20000, g % 2, '79',
                        lpad((25000 + g % 1500)::text, 5, '0'), 'Số ' || g % 300 || ' đường Nguyễn Huệ, Thành phố Hồ Chí Minh', 'thường trú'
                 FROM generate_series({a}, {b}) g"
            ),
            &[],
        )
        .await?;
    }
    for i in 0..10 {
        let (a, b) = (first + i * step, first + ((i + 1) * step).min(rows) - 1);
        src.execute(
            &format!(
                "UPDATE citizens SET commune_code = '26734', address = address || ' (mới)', version = version + 1, updated_at = clock_timestamp()
                 WHERE citizen_id BETWEEN '{a:012}' AND '{b:012}'"
            ),
            &[],
        )
        .await?;
    }
    Ok(())
}

/// The single `int8` a query returns (0 for NULL): an LSN as a number, a count.
pub async fn lsn(client: &Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get::<_, Option<i64>>(0).unwrap_or(0))
}

/// Changes the NDC has applied for agent `id` (0 before the hub has made its tables: a hub
/// listens before it has prepared the NDC).
pub async fn applied(ndc: &Client, id: &str) -> anyhow::Result<i64> {
    match ndc.query_opt("SELECT changes_applied FROM dongbo.applied_position WHERE source_id = $1", &[&id]).await {
        Ok(row) => Ok(row.map(|r| r.get(0)).unwrap_or(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Writes `dir/hub.toml` for a benchmark's hub: clear text on `hub_port`, its fan-out log in
/// `dir/hub-data`, the NDC database `ndc` on `ndc_port`, and one agent per id (token `<id>-token`).
pub fn write_hub_config(
    dir: &std::path::Path,
    ndc_port: u16,
    hub_port: u16,
    agents: &[&str],
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("hub.toml");
    let agents: String =
        agents.iter().map(|id| format!("[[agents]]\nid = \"{id}\"\ntoken = \"{id}-token\"\n")).collect();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{hub_port}\"\ninsecure_plaintext_demo = true\n[fanout]\ndata_dir = \"{data}\"\n[ndc]\nhost = \"127.0.0.1\"\nport = {ndc_port}\ndatabase = \"ndc\"\nuser = \"{role}\"\npassword = \"{pw}\"\n{agents}",
            role = crate::pg::ROLE,
            pw = crate::pg::PASSWORD,
            data = dir.join("hub-data").display(),
        ),
    )?;
    Ok(path)
}

/// Writes `dir/<name>.toml` for a benchmark agent `name`: the source's `public.citizens` through
/// its own slot `name`, its spool in `dir/<name>-spool`, the hub in clear text on `hub_port`
/// (token `<name>-token`).
pub fn agent_config(
    dir: &std::path::Path,
    name: &str,
    src_port: u16,
    hub_port: u16,
    status_port: u16,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "source_id = \"{name}\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {src_port}\ndatabase = \"province\"\n\
         user = \"{role}\"\npassword = \"{pw}\"\ntables = [\"public.citizens\"]\nslot = \"{name}\"\npublication = \"dongbo\"\n\
         feedback_interval_ms = 100\n[spool]\npath = \"{spool}\"\nmax_bytes = 68719476736\n\
         [status]\nlisten = \"127.0.0.1:{status_port}\"\n\
         [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"{name}-token\"\nmax_backoff_ms = 500\n",
        role = crate::pg::ROLE,
        pw = crate::pg::PASSWORD,
        spool = dir.join(format!("{name}-spool")).display(),
    );
    std::fs::write(&path, text).expect("bench directory writable");
    path
}

/// Makes every benchmark agent's slot before the backlog is written: starts the hub (`hub_args`,
/// listening on `hub_port`), then each agent of `names` in turn until its empty snapshot is applied.
pub async fn create_slots(
    dir: &std::path::Path,
    hub_args: &[&str],
    ports: (u16, u16, u16),
    ndc: &Client,
    names: &[&str],
) -> anyhow::Result<()> {
    let (src_port, hub_port, status_port) = ports;
    let mut hub = crate::procs::DongboProcess::spawn("dongbo-hub", hub_args, &dir.join("hub.log"))?;
    wait_listening(hub_port).await?;
    for name in names {
        let cfg = agent_config(dir, name, src_port, hub_port, status_port);
        let mut agent = crate::procs::DongboProcess::spawn(
            "dongbo-agent",
            &["run", "--config", &cfg.to_string_lossy()],
            &dir.join(format!("{name}.log")),
        )?;
        wait_for("empty snapshot applied", Duration::from_secs(60), || async { Ok(applied(ndc, name).await? == 1) })
            .await?;
        agent.stop();
    }
    hub.stop();
    Ok(())
}

/// Waits until something listens on 127.0.0.1:`port`.
pub async fn wait_listening(port: u16) -> anyhow::Result<()> {
    wait_for("listener", Duration::from_secs(30), || async move {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok())
    })
    .await
    .map(|_| ())
}

/// Sends `data` through `COPY ... FROM STDIN`.
pub async fn send_all(client: &Client, sql: &str, data: Vec<u8>) -> anyhow::Result<()> {
    use futures::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await?;
    sink.finish().await?;
    Ok(())
}

/// The flags of the backlog benchmarks: `--rows N`, `--rate R`, `--seconds S`.
#[derive(Debug, Clone, Copy)]
pub struct BenchArgs {
    /// Rows inserted then updated.
    pub rows: u64,
    /// Changes per second of the latency run.
    pub rate: u64,
    /// Length of the latency run.
    pub seconds: u64,
}

impl BenchArgs {
    /// Parses the command line over defaults of `rows` rows, 5 000 changes/s for 20 s.
    pub fn parse(rows: u64) -> anyhow::Result<Self> {
        let mut a = Self { rows, rate: 5_000, seconds: 20 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value: u64 = anyhow::Context::context(it.next(), "flag without value")?.parse()?;
            match flag.as_str() {
                "--rows" => a.rows = value,
                "--rate" => a.rate = value,
                "--seconds" => a.seconds = value,
                other => bail!("unknown flag {other}; use --rows, --rate, --seconds"),
            }
        }
        Ok(a)
    }
}

/// Staged upsert of the same rows into the NDC: the apply floor. Also returns the time of the first
/// `COPY` alone (rows in, no upsert): the snapshot floor.
pub async fn staged_upsert_floor(ndc: &Client, rows: u64) -> anyhow::Result<(Duration, Duration)> {
    ndc.batch_execute(&format!("DROP TABLE IF EXISTS floor_target; {}", TABLE.replace("citizens", "floor_target")))
        .await?;
    ndc.batch_execute("CREATE TEMP TABLE floor_stage (LIKE floor_target)").await?;
    let start = Instant::now();
    let mut copy_in = Duration::ZERO;
    for pass in 0..2 {
        let mut buf = Vec::with_capacity(rows as usize * 120);
        for g in 1..=rows {
            let suffix = if pass == 1 { " (mới)" } else { "" };
            buf.extend_from_slice(
                format!(
                    "{g:012}\tNguyễn Văn {g}\t1990-01-01\t{}\t79\t{:05}\tSố {} đường Nguyễn Huệ, Thành phố Hồ Chí Minh{suffix}\tthường trú\t2026-01-01 00:00:00+00\t{}\n",
                    g % 2,
                    25000 + g % 1500,
                    g % 300,
                    pass + 1
                )
                .as_bytes(),
            );
        }
        ndc.batch_execute("BEGIN; TRUNCATE floor_stage").await?;
        let copy_start = Instant::now();
        send_all(ndc, "COPY floor_stage FROM STDIN", buf).await?;
        if pass == 0 {
            copy_in = copy_start.elapsed();
        }
        ndc.batch_execute(
            "INSERT INTO floor_target SELECT * FROM floor_stage ON CONFLICT (citizen_id) DO UPDATE SET
               full_name = EXCLUDED.full_name, birth_date = EXCLUDED.birth_date, gender = EXCLUDED.gender,
               province_code = EXCLUDED.province_code, commune_code = EXCLUDED.commune_code, address = EXCLUDED.address,
               residence_kind = EXCLUDED.residence_kind, updated_at = EXCLUDED.updated_at, version = EXCLUDED.version;
             COMMIT",
        )
        .await?;
    }
    Ok((start.elapsed(), copy_in))
}
