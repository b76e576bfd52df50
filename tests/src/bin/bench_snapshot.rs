//! `dongbo-bench-snapshot`: an initial snapshot of N rows in K tables, source → agent → hub → NDC,
//! beside `COPY` in of the same rows into the same NDC cluster (the floor the issue names), in one
//! run. It also prints the CPU seconds each process spent, so a slow figure says where it went:
//! the source server, the agent, the hub or the NDC server (two cores share all four).
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-snapshot [--source postgres|mariadb]
//! [--rows N] [--tables K]` (defaults: postgres, 1 000 000 rows, 2 tables).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{applied, send_all, wait_for, wait_listening, write_hub_config, TABLE};
use dongbo_tests::mariadb::{self, MariaDb};
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::{peak_rss_kib, tree_cpu_seconds, DongboProcess};
use tokio_postgres::Client;

const MY_TABLE: &str = "CREATE TABLE province.TNAME (
    citizen_id char(12) PRIMARY KEY, full_name varchar(200) NOT NULL, birth_date date, gender smallint,
    province_code varchar(2), commune_code varchar(5), address text, residence_kind varchar(50),
    updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), version int NOT NULL DEFAULT 1
  ) CHARACTER SET utf8mb4";

struct Args {
    mariadb: bool,
    rows: u64,
    tables: u64,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args { mariadb: false, rows: 1_000_000, tables: 2 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--source" => a.mariadb = dongbo_tests::mariadb::is_mariadb_source(&value)?,
            "--rows" => a.rows = value.parse()?,
            "--tables" => a.tables = value.parse::<u64>()?.max(1),
            other => bail!("unknown flag {other}; use --source, --rows, --tables"),
        }
    }
    Ok(a)
}

/// The source server under test, with what the agent's `[source]` needs.
enum Source {
    Postgres(PgCluster),
    MariaDb(MariaDb),
}

impl Source {
    fn pid(&self) -> Option<u32> {
        match self {
            Source::Postgres(pg) => pg.postmaster_pid(),
            Source::MariaDb(db) => db.pid(),
        }
    }

    fn source_toml(&self, tables: &[String]) -> String {
        match self {
            Source::Postgres(pg) => format!(
                "kind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"province\"\nuser = \"{}\"\npassword = \"{}\"\n\
                 tables = [{}]\nslot = \"snap\"\npublication = \"dongbo\"\n",
                pg.port,
                pg::ROLE,
                pg::PASSWORD,
                tables.iter().map(|t| format!("\"public.{t}\"")).collect::<Vec<_>>().join(", ")
            ),
            Source::MariaDb(db) => format!(
                "kind = \"mysql\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\npassword = \"{}\"\ntables = [{}]\nreplica_server_id = 77\n",
                db.port,
                mariadb::ROLE,
                mariadb::PASSWORD,
                tables.iter().map(|t| format!("\"province.{t}\"")).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// Fills K tables of `rows / K` rows each, the citizen rows of the other benchmarks.
async fn fill(source: &Source, names: &[String], rows: u64) -> anyhow::Result<()> {
    let per = rows / names.len() as u64;
    for (i, name) in names.iter().enumerate() {
        let (a, b) = (1 + i as u64 * per, (i as u64 + 1) * per);
        match source {
            Source::Postgres(pg) => {
                let src = pg.connect("province").await?;
                src.batch_execute(&format!(
                    "{};
                     ALTER TABLE {name} OWNER TO {role};
                     INSERT INTO {name} (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
                     SELECT lpad(g::text, 12, '0'), 'Nguyễn Văn ' || g, DATE '1960-01-01' + g % 20000, g % 2, '79',
                            lpad((25000 + g % 1500)::text, 5, '0'), 'Số ' || g % 300 || ' đường Nguyễn Huệ, Thành phố Hồ Chí Minh', 'thường trú'
                     FROM generate_series({a}, {b}) g",
                    TABLE.replace("citizens", name),
                    role = pg::ROLE,
                ))
                .await?;
                src.batch_execute(&format!("VACUUM ANALYZE {name}")).await?;
            }
            Source::MariaDb(db) => {
                db.sql(&MY_TABLE.replace("TNAME", name))?;
                db.sql(&format!(
                    "INSERT INTO province.{name} (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
                     SELECT LPAD(seq, 12, '0'), CONCAT('Nguyễn Văn ', seq), DATE_ADD('1960-01-01', INTERVAL seq % 20000 DAY), seq % 2, '79',
                            LPAD(25000 + seq % 1500, 5, '0'), CONCAT('Số ', seq % 300, ' đường Nguyễn Huệ, Thành phố Hồ Chí Minh'), 'thường trú'
                     FROM province.seq_{a}_to_{b}"
                ))?;
            }
        }
    }
    if let Source::Postgres(pg) = source {
        let list = names.join(", ");
        // Checkpointed, so the load's dirty pages are not written out while the floor is timed.
        pg.connect("province")
            .await?
            .batch_execute(&format!("CREATE PUBLICATION dongbo FOR TABLE {list}; CHECKPOINT"))
            .await?;
    }
    Ok(())
}

/// `COPY` in of the same rows into fresh tables, one table after another in one transaction, as
/// text built here (before the clock starts).
async fn copy_floor(ndc: &Client, names: &[String], rows: u64) -> anyhow::Result<Duration> {
    let per = rows / names.len() as u64;
    let mut texts = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let floor = format!("floor_{name}");
        ndc.batch_execute(&format!("DROP TABLE IF EXISTS {floor}; {}", TABLE.replace("citizens", &floor))).await?;
        let mut buf = Vec::with_capacity(per as usize * 130);
        for g in (1 + i as u64 * per)..=((i as u64 + 1) * per) {
            buf.extend_from_slice(
                format!(
                    "{g:012}\tNguyễn Văn {g}\t1990-01-01\t{}\t79\t{:05}\tSố {} đường Nguyễn Huệ, Thành phố Hồ Chí Minh\tthường trú\t2026-01-01 00:00:00+00\t1\n",
                    g % 2,
                    25000 + g % 1500,
                    g % 300,
                )
                .as_bytes(),
            );
        }
        texts.push((floor, buf));
    }
    ndc.batch_execute("BEGIN").await?;
    let start = Instant::now();
    for (floor, buf) in texts {
        send_all(ndc, &format!("COPY {floor} FROM STDIN"), buf).await?;
    }
    ndc.batch_execute("COMMIT").await?;
    Ok(start.elapsed())
}

fn cpu(pid: Option<u32>) -> f64 {
    pid.map(tree_cpu_seconds).unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let kind = if a.mariadb { "MariaDB" } else { "Postgres" };
    let rows = a.rows / a.tables * a.tables;
    println!("dongbo-bench-snapshot: {rows} rows in {} tables, {kind} → NDC", a.tables);
    let names: Vec<String> = (1..=a.tables).map(|i| format!("citizens_{i}")).collect();
    let source = if a.mariadb {
        Source::MariaDb(MariaDb::start("bench-snap", &["--innodb-buffer-pool-size=1G"]).await?)
    } else {
        let pg = PgCluster::start("bench-snap-src")?;
        pg.create_database("province").await?;
        Source::Postgres(pg)
    };
    let ndc_pg = PgCluster::start("bench-snap-ndc")?;
    ndc_pg.create_database("ndc").await?;
    let ndc = ndc_pg.connect("ndc").await?;
    let dir = ndc_pg.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    println!("loading ...");
    fill(&source, &names, rows).await?;

    // The best of three: the floor is the fastest the NDC takes these rows, the strictest ratio.
    let mut copy_in = Duration::MAX;
    for _ in 0..3 {
        copy_in = copy_in.min(copy_floor(&ndc, &names, rows).await?);
    }
    ndc.batch_execute(&names.iter().map(|n| format!("DROP TABLE floor_{n};")).collect::<String>()).await?;
    ndc.batch_execute("CHECKPOINT").await?;

    let hub_port = pg::free_port();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &["snap"])?;
    let mut hub =
        DongboProcess::spawn("dongbo-hub", &["serve", "--config", &hub_cfg.to_string_lossy()], &dir.join("hub.log"))?;
    wait_listening(hub_port).await?;
    // The hub prepares the NDC when it starts: wait for that before the clock starts.
    wait_for("hub ready", Duration::from_secs(60), || async {
        Ok(ndc.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'dongbo'", &[]).await?.is_some())
    })
    .await?;

    let agent_cfg = dir.join("snap.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "source_id = \"snap\"\n[source]\n{}[spool]\npath = \"{}\"\nmax_bytes = 68719476736\n\
             [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"snap-token\"\nmax_backoff_ms = 500\n",
            source.source_toml(&names),
            dir.join("snap-spool").display(),
        ),
    )?;
    let (ndc_pid, src_pid, hub_pid) = (ndc_pg.postmaster_pid(), source.pid(), hub.pid());
    let before = [cpu(src_pid), cpu(hub_pid), cpu(ndc_pid)];
    let start = Instant::now();
    let mut agent = DongboProcess::spawn(
        "dongbo-agent",
        &["run", "--config", &agent_cfg.to_string_lossy()],
        &dir.join("snap.log"),
    )?;
    let agent_pid = agent.pid();
    let mut agent_cpu;
    let target = (rows + a.tables) as i64;
    let mut first_row = None;
    loop {
        // Sampled while it runs: the agent's counters are gone once it exits.
        agent_cpu = cpu(agent_pid);
        let n = applied(&ndc, "snap").await?;
        if n > 0 && first_row.is_none() {
            first_row = Some(start.elapsed());
        }
        if n >= target {
            break;
        }
        if !agent.is_running() || start.elapsed() > Duration::from_secs(3600) {
            bail!("the snapshot did not finish (applied {n} of {target}); see {}", agent.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = start.elapsed();
    agent_cpu = agent_cpu.max(cpu(agent_pid));
    let after = [cpu(src_pid), cpu(hub_pid), cpu(ndc_pid)];
    let rss = agent_pid.and_then(peak_rss_kib).unwrap_or(0);
    agent.stop();
    hub.stop();

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!("== initial snapshot, {rows} rows in {} tables, {kind} → NDC", a.tables);
    println!("  COPY in (floor)        {:>10.0} rows/s     ({:.2} s)", rate(copy_in), copy_in.as_secs_f64());
    println!(
        "  dongbo snapshot        {:>10.0} rows/s     ({:.2} s, first rows applied after {:.2} s)   ratio {:.2} (target >= 0.50)",
        rate(snapshot),
        snapshot.as_secs_f64(),
        first_row.unwrap_or_default().as_secs_f64(),
        rate(snapshot) / rate(copy_in)
    );
    let spent = [after[0] - before[0], agent_cpu, after[1] - before[1], after[2] - before[2]];
    println!(
        "  CPU seconds: source server {:.2}, agent {:.2}, hub {:.2}, NDC server {:.2} (total {:.2} of {:.2} available on 2 cores)",
        spent[0],
        spent[1],
        spent[2],
        spent[3],
        spent.iter().sum::<f64>(),
        2.0 * snapshot.as_secs_f64()
    );
    println!("  agent peak RSS {:.1} MiB", rss as f64 / 1024.0);
    Ok(())
}
