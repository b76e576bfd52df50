//! `dongbo-bench-mysql`: the MariaDB source's figures, each beside its floor measured in the same
//! run on the same machine.
//!
//! 1. capture: a backlog of N inserts then N updates in a binlog file of its own, decoded by
//!    `mariadb-binlog --read-from-remote-server --base64-output=decode-rows --verbose` (the server's
//!    own decoder, to /dev/null) and captured by the agent into its spool (until its log says the
//!    spool holds everything up to the binlog's end); and the agent's peak resident memory.
//!    Then the same spool replayed to the hub by a restarted agent, and its peak resident memory.
//! 2. end to end: the same backlog through agent → gRPC → hub → NDC.
//! 3. initial snapshot of the N rows → NDC, against `COPY` in of the same rows into the NDC.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-mysql [--rows N]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{applied, send_all, wait_for, wait_listening, write_hub_config, BenchArgs, TABLE};
use dongbo_tests::mariadb::{MariaDb, PASSWORD, ROLE};
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::{peak_rss_kib, DongboProcess};

const MY_TABLE: &str = "CREATE TABLE province.citizens (
    citizen_id char(12) PRIMARY KEY, full_name varchar(200) NOT NULL, birth_date date, gender smallint,
    province_code varchar(2), commune_code varchar(5), address text, residence_kind varchar(50),
    updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), version int NOT NULL DEFAULT 1
  ) CHARACTER SET utf8mb4";

/// N inserts in 10 transactions, then N updates in 10, as the Postgres benchmark's backlog.
fn load(db: &MariaDb, rows: u64) -> anyhow::Result<()> {
    let step = rows.div_ceil(10);
    let range = |i: u64| (1 + i * step, ((i + 1) * step).min(rows));
    for i in 0..10 {
        let (a, b) = range(i);
        db.sql(&format!(
            "INSERT INTO province.citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
             SELECT LPAD(seq, 12, '0'), CONCAT('Nguyễn Văn ', seq), DATE_ADD('1960-01-01', INTERVAL seq % 20000 DAY), seq % 2, '79',
                    LPAD(25000 + seq % 1500, 5, '0'), CONCAT('Số ', seq % 300, ' đường Nguyễn Huệ, Thành phố Hồ Chí Minh'), 'thường trú'
             FROM province.seq_{a}_to_{b}"
        ))?;
    }
    for i in 0..10 {
        let (a, b) = range(i);
        db.sql(&format!(
            "UPDATE province.citizens SET commune_code = '26734', address = CONCAT(address, ' (mới)'), version = version + 1,
               updated_at = CURRENT_TIMESTAMP(6) WHERE citizen_id BETWEEN '{a:012}' AND '{b:012}'"
        ))?;
    }
    Ok(())
}

fn agent_config(dir: &std::path::Path, name: &str, db: &MariaDb, hub_port: u16) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "source_id = \"{name}\"\n[source]\nkind = \"mysql\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{ROLE}\"\n\
             password = \"{PASSWORD}\"\ntables = [\"province.citizens\"]\nreplica_server_id = {id}\n\
             [spool]\npath = \"{spool}\"\nmax_bytes = 68719476736\n\
             [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"{name}-token\"\nmax_backoff_ms = 500\n",
            port = db.port,
            id = 4_000_000 + name.len() as u32,
            spool = dir.join(format!("{name}-spool")).display(),
        ),
    )?;
    Ok(path)
}

fn spawn_agent(dir: &std::path::Path, name: &str, config: &std::path::Path) -> anyhow::Result<DongboProcess> {
    DongboProcess::spawn_with_env(
        "dongbo-agent",
        &["run", "--config", &config.to_string_lossy()],
        &dir.join(format!("{name}.log")),
        &[("DONGBO_LOG", "info,dongbo_agent::capture=debug"), ("DONGBO_LOG_FORMAT", "json")],
    )
}

/// The binlog's current end: (file, position).
fn binlog_end(db: &MariaDb) -> anyhow::Result<(String, u64)> {
    let out = db.sql("SHOW MASTER STATUS")?;
    let mut f = out.split_whitespace();
    match (f.next(), f.next().and_then(|p| p.parse().ok())) {
        (Some(file), Some(pos)) => Ok((file.to_string(), pos)),
        _ => bail!("SHOW MASTER STATUS: {out:?}"),
    }
}

/// The spool position text the agent logs for (`file`, `pos`).
fn spooled_marker(file: &str, pos: u64) -> anyhow::Result<String> {
    let number: u32 = file.rsplit_once('.').context("binlog file name")?.1.parse()?;
    Ok(format!("\"upto\":\"binlog {number:06}:{pos}\""))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = BenchArgs::parse(200_000)?;
    println!("dongbo-bench-mysql: {} inserts then {} updates on MariaDB", a.rows, a.rows);
    let db = MariaDb::start("bench", &["--innodb-buffer-pool-size=512M", "--max-binlog-size=1073741824"]).await?;
    db.sql(MY_TABLE)?;
    let ndc_pg = PgCluster::start("bench-mysql-ndc")?;
    ndc_pg.create_database("ndc").await?;
    let ndc = ndc_pg.connect("ndc").await?;
    let dir = db.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let hub_port = pg::free_port();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &["e2e", "snap", "capture"])?;
    let mut hub =
        DongboProcess::spawn("dongbo-hub", &["serve", "--config", &hub_cfg.to_string_lossy()], &dir.join("hub.log"))?;
    wait_listening(hub_port).await?;

    // The capture and end-to-end agents snapshot the empty table, then stop: both resume at the
    // backlog's start.
    let capture_cfg = agent_config(&dir, "capture", &db, pg::free_port())?;
    let e2e_cfg = agent_config(&dir, "e2e", &db, hub_port)?;
    for (name, cfg) in [("capture", &capture_cfg), ("e2e", &e2e_cfg)] {
        let mut agent = spawn_agent(&dir, name, cfg)?;
        wait_for("agent snapshot", Duration::from_secs(60), || async {
            Ok(agent.log_text().contains("snapshot spooled"))
        })
        .await?;
        agent.stop();
    }
    wait_for("e2e snapshot applied", Duration::from_secs(60), || async { Ok(applied(&ndc, "e2e").await? == 1) })
        .await?;

    println!("loading the backlog ...");
    db.sql("FLUSH BINARY LOGS")?;
    let (file, _) = binlog_end(&db)?;
    let t = Instant::now();
    load(&db, a.rows)?;
    let (end_file, end_pos) = binlog_end(&db)?;
    anyhow::ensure!(end_file == file, "the backlog spans binlog files; raise --max-binlog-size");
    let binlog_bytes = std::fs::metadata(db.dir.join(&file))?.len();
    let changes = 2 * a.rows;
    println!("  backlog written in {:.1} s ({} MB of binlog)", t.elapsed().as_secs_f64(), binlog_bytes >> 20);

    // 1. Floor: the server's own decoder reading the same file over the replication protocol.
    let start = Instant::now();
    let out = Command::new("mariadb-binlog")
        .args(["--read-from-remote-server", "--host=127.0.0.1", "--base64-output=decode-rows", "--verbose"])
        .arg(format!("--port={}", db.port))
        .arg(format!("--user={ROLE}"))
        .arg(format!("--password={PASSWORD}"))
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .output()
        .context("mariadb-binlog (install mariadb-client: ./deploy/install-deps.sh)")?;
    let floor = start.elapsed();
    anyhow::ensure!(out.status.success(), "mariadb-binlog: {}", String::from_utf8_lossy(&out.stderr));

    // 1. Capture into the spool (no hub).
    let marker = spooled_marker(&file, end_pos)?;
    let mut agent = spawn_agent(&dir, "capture", &capture_cfg)?;
    let captured =
        wait_for("agent capture", Duration::from_secs(900), || async { Ok(agent.log_text().contains(&marker)) })
            .await?;
    let capture_rss = agent.pid().and_then(peak_rss_kib).unwrap_or(0);
    agent.stop();
    let spool_bytes = dir_bytes(&dir.join("capture-spool"));

    // 1b. The same spool replayed to the hub after a restart: the agent's memory while it ships.
    let text = std::fs::read_to_string(&capture_cfg)?;
    let unreachable = text.lines().find(|l| l.starts_with("url = ")).context("hub url")?.to_string();
    std::fs::write(&capture_cfg, text.replace(&unreachable, &format!("url = \"http://127.0.0.1:{hub_port}\"")))?;
    let mut replay = spawn_agent(&dir, "replay", &capture_cfg)?;
    let replay_target = 1 + changes as i64;
    let replayed = wait_for("spool replay", Duration::from_secs(1800), || async {
        Ok(applied(&ndc, "capture").await? >= replay_target)
    })
    .await?;
    let replay_rss = replay.pid().and_then(peak_rss_kib).unwrap_or(0);
    replay.stop();

    // 2. End to end.
    let mut e2e = spawn_agent(&dir, "e2e", &e2e_cfg)?;
    let target = 1 + changes as i64;
    let e2e_time =
        wait_for("end to end", Duration::from_secs(1800), || async { Ok(applied(&ndc, "e2e").await? >= target) })
            .await?;
    let e2e_rss = e2e.pid().and_then(peak_rss_kib).unwrap_or(0);
    e2e.stop();

    // 3. Snapshot of the N rows into the NDC, against COPY in of the same rows.
    let snap_cfg = agent_config(&dir, "snap", &db, hub_port)?;
    let mut snap = spawn_agent(&dir, "snap", &snap_cfg)?;
    let snap_target = 1 + a.rows as i64;
    let snapshot =
        wait_for("snapshot", Duration::from_secs(1800), || async { Ok(applied(&ndc, "snap").await? >= snap_target) })
            .await?;
    let snap_rss = snap.pid().and_then(peak_rss_kib).unwrap_or(0);
    snap.stop();
    hub.stop();
    ndc.batch_execute(&format!("DROP TABLE IF EXISTS floor_target; {}", TABLE.replace("citizens", "floor_target")))
        .await?;
    let mut buf = Vec::with_capacity(a.rows as usize * 120);
    for g in 1..=a.rows {
        buf.extend_from_slice(
            format!(
                "{g:012}\tNguyễn Văn {g}\t1990-01-01\t{}\t79\t26734\tSố {} đường Nguyễn Huệ, Thành phố Hồ Chí Minh (mới)\tthường trú\t2026-01-01 00:00:00+00\t2\n",
                g % 2,
                g % 300,
            )
            .as_bytes(),
        );
    }
    let start = Instant::now();
    send_all(&ndc, "COPY floor_target FROM STDIN", buf).await?;
    let copy_in = start.elapsed();

    let (floor_r, cap_r) = (rate(changes, floor), rate(changes, captured));
    println!("== capture from a backlog ({changes} changes, {} MB of binlog)", binlog_bytes >> 20);
    println!("  mariadb-binlog decode  {floor_r:>10.0} changes/s  ({:.2} s)", floor.as_secs_f64());
    println!(
        "  dongbo agent → spool   {cap_r:>10.0} changes/s  ({:.2} s)   ratio {:.2}",
        captured.as_secs_f64(),
        cap_r / floor_r
    );
    println!(
        "== spool replay after a restart ({} MB of spool → NDC): {:.0} changes/s ({:.2} s), agent peak RSS {:.1} MiB",
        spool_bytes >> 20,
        rate(changes, replayed),
        replayed.as_secs_f64(),
        replay_rss as f64 / 1024.0
    );
    println!("== end to end, backlog → NDC");
    println!("  dongbo                 {:>10.0} changes/s  ({:.2} s)", rate(changes, e2e_time), e2e_time.as_secs_f64());
    let (copy_r, snap_r) = (rate(a.rows, copy_in), rate(a.rows, snapshot));
    println!("== initial snapshot ({} rows, MariaDB → NDC)", a.rows);
    println!("  COPY in (floor)        {copy_r:>10.0} rows/s     ({:.2} s)", copy_in.as_secs_f64());
    println!(
        "  dongbo snapshot        {snap_r:>10.0} rows/s     ({:.2} s)   ratio {:.2} (target >= 0.50)",
        snapshot.as_secs_f64(),
        snap_r / copy_r
    );
    println!(
        "== agent peak RSS: capture {:.1} MiB, end to end {:.1} MiB, snapshot {:.1} MiB (target < 50)",
        capture_rss as f64 / 1024.0,
        e2e_rss as f64 / 1024.0,
        snap_rss as f64 / 1024.0
    );
    Ok(())
}
