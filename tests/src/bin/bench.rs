//! `dongbo-bench`: dongbo's figures, each beside the physical floor measured in the same run on the
//! same machine (only ratios from one run mean anything on a shared, noisy machine).
//!
//! 1. capture: a backlog of N inserts then N updates on a citizen table, decoded by `pg_recvlogical`
//!    (time until `pg_stat_replication.sent_lsn` reaches the end LSN) and captured by the agent into its
//!    spool (time until its slot's confirmed LSN, which it advances only once spooled, reaches it);
//!    and the agent's peak resident memory.
//! 2. end to end: the same backlog through agent → gRPC → hub → NDC, against a staged upsert of the
//!    same rows (`COPY` into a temp table, `INSERT ... ON CONFLICT`) into the NDC cluster.
//! 3. latency: commit at the source → row written in the NDC, p50 and p99, at a steady rate.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench [--rows N] [--rate R] [--seconds S]`

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{
    applied, bench_clusters, load, lsn, staged_upsert_floor, wait_for, wait_listening as wait_hub, write_hub_config,
    BenchArgs, BenchClusters,
};
use dongbo_tests::pg;
use dongbo_tests::procs::{binary, peak_rss_kib, DongboProcess};

fn agent_config(dir: &std::path::Path, name: &str, src_port: u16, hub_port: u16) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "source_id = \"{name}\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {src_port}\ndatabase = \"province\"\n\
             user = \"{role}\"\npassword = \"{pw}\"\ntables = [\"public.citizens\"]\nslot = \"{slot}\"\npublication = \"dongbo\"\n\
             feedback_interval_ms = 100\n[spool]\npath = \"{spool}\"\nmax_bytes = 68719476736\n\
             [hub]\nurl = \"http://127.0.0.1:{hub_port}\"\ntoken = \"{name}-token\"\nmax_backoff_ms = 500\n",
            role = pg::ROLE,
            pw = pg::PASSWORD,
            slot = name.replace('-', "_"),
            spool = dir.join(format!("{name}-spool")).display(),
        ),
    )?;
    Ok(path)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = BenchArgs::parse(1_000_000)?;
    println!(
        "dongbo-bench: {} inserts then {} updates; latency at {} changes/s for {} s",
        a.rows, a.rows, a.rate, a.seconds
    );
    let BenchClusters { province, ndc_pg, dir, src, ndc } = bench_clusters("bench").await?;
    src.batch_execute("SELECT pg_create_logical_replication_slot('floor', 'pgoutput')").await?;
    let hub_port = pg::free_port();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &["e2e", "snap"])?;

    // Create the agents' slots (and the NDC table) before the load, so all decode the same backlog.
    // The legacy agent (deploy/build-legacy.sh), when built, captures the same backlog too.
    let capture_cfg = agent_config(&dir, "capture", province.port, pg::free_port())?;
    let e2e_cfg = agent_config(&dir, "e2e", province.port, hub_port)?;
    let legacy_cfg = agent_config(&dir, "legacy", province.port, pg::free_port())?;
    let legacy = binary("dongbo-agent")?.parent().and_then(|d| d.parent()).map(|t| t.join("legacy/dongbo-agent"));
    let legacy = legacy.filter(|p| p.is_file());
    let mut hub =
        DongboProcess::spawn("dongbo-hub", &["serve", "--config", &hub_cfg.to_string_lossy()], &dir.join("hub.log"))?;
    wait_hub(hub_port).await?;
    let mut agents =
        vec![("capture", &capture_cfg, binary("dongbo-agent")?), ("e2e", &e2e_cfg, binary("dongbo-agent")?)];
    if let Some(exe) = &legacy {
        agents.push(("legacy", &legacy_cfg, exe.clone()));
    }
    for (name, cfg, exe) in agents {
        let mut agent = DongboProcess::spawn_path(
            &exe,
            &["run", "--config", &cfg.to_string_lossy()],
            &dir.join(format!("{name}.log")),
            &[],
        )?;
        let slot = format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}' AND confirmed_flush_lsn IS NOT NULL"
        );
        wait_for("agent slot", Duration::from_secs(60), || async { Ok(lsn(&src, &slot).await? == 1) }).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.stop();
    }
    wait_for("snapshot applied", Duration::from_secs(30), || async { Ok(applied(&ndc, "e2e").await? == 1) }).await?;
    hub.stop();

    println!("loading the backlog ...");
    let t = Instant::now();
    load(&src, 1, a.rows).await?;
    let end_lsn = lsn(&src, "SELECT (pg_current_wal_lsn() - '0/0')::int8").await?;
    let changes = 2 * a.rows;
    println!("  backlog written in {:.1} s", t.elapsed().as_secs_f64());

    // 1. Capture floor: pg_recvlogical.
    let pg_bin = pg::bin_dir()?;
    let mut recv = std::process::Command::new(pg_bin.join("pg_recvlogical"))
        .args([
            "-h",
            &province.dir.to_string_lossy(),
            "-p",
            &province.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "province",
        ])
        .args([
            "--slot",
            "floor",
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=dongbo",
            "-f",
            "/dev/null",
        ])
        .spawn()
        .context("pg_recvlogical")?;
    let floor = wait_for("pg_recvlogical", Duration::from_secs(600), || async {
        Ok(lsn(
            &src,
            "SELECT max((sent_lsn - '0/0')::int8) FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'",
        )
        .await?
            >= end_lsn)
    })
    .await?;
    let _ = recv.kill();
    let _ = recv.wait();

    // 1. Capture: the agent into its spool (no hub).
    let mut agent = DongboProcess::spawn(
        "dongbo-agent",
        &["run", "--config", &capture_cfg.to_string_lossy()],
        &dir.join("capture.log"),
    )?;
    let captured = wait_for("agent capture", Duration::from_secs(600), || async {
        Ok(lsn(
            &src,
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'capture'",
        )
        .await?
            >= end_lsn)
    })
    .await?;
    let rss = agent.pid().and_then(peak_rss_kib).unwrap_or(0);
    agent.stop();
    src.batch_execute("SELECT pg_drop_replication_slot('floor'); SELECT pg_drop_replication_slot('capture')").await?;
    // The legacy build on the same backlog.
    let legacy_captured = match &legacy {
        Some(exe) => {
            let mut agent = DongboProcess::spawn_path(
                exe,
                &["run", "--config", &legacy_cfg.to_string_lossy()],
                &dir.join("legacy.log"),
                &[],
            )?;
            let took = wait_for("legacy agent capture", Duration::from_secs(600), || async {
                Ok(lsn(
                    &src,
                    "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'legacy'",
                )
                .await?
                    >= end_lsn)
            })
            .await?;
            agent.stop();
            src.batch_execute("SELECT pg_drop_replication_slot('legacy')").await?;
            Some(took)
        }
        None => None,
    };
    let agent_size = std::fs::metadata(binary("dongbo-agent")?)?.len();

    // 2. End to end: backlog through agent, gRPC, hub, NDC; floor: staged upsert of the same rows.
    let mut hub =
        DongboProcess::spawn("dongbo-hub", &["serve", "--config", &hub_cfg.to_string_lossy()], &dir.join("hub.log"))?;
    wait_hub(hub_port).await?;
    let mut e2e =
        DongboProcess::spawn("dongbo-agent", &["run", "--config", &e2e_cfg.to_string_lossy()], &dir.join("e2e.log"))?;
    let target = 1 + changes as i64;
    let e2e_time =
        wait_for("end to end", Duration::from_secs(1200), || async { Ok(applied(&ndc, "e2e").await? >= target) })
            .await?;
    let e2e_rss = e2e.pid().and_then(peak_rss_kib).unwrap_or(0);
    let (staged, copy_in) = staged_upsert_floor(&ndc, a.rows).await?;

    // 3. Latency at a steady rate: a trigger in the NDC records (write time - source commit time).
    ndc.batch_execute(
        "CREATE TABLE latency (ms float8);
         GRANT INSERT ON latency TO dongbo;
         CREATE FUNCTION record_latency() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN INSERT INTO latency VALUES (extract(epoch FROM clock_timestamp() - NEW.updated_at) * 1000); RETURN NEW; END$$;
         CREATE TRIGGER record_latency AFTER INSERT OR UPDATE ON e2e.citizens FOR EACH ROW EXECUTE FUNCTION record_latency();",
    )
    .await?;
    let per_tick = (a.rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut next = 1u64;
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(a.seconds) {
        tick.tick().await;
        let (lo, hi) = (next, next + per_tick - 1);
        next = if hi >= a.rows { 1 } else { hi + 1 };
        sent += src
            .execute(
                "UPDATE citizens SET version = version + 1, updated_at = clock_timestamp() WHERE citizen_id BETWEEN $1::char(12) AND $2::char(12)",
                &[&format!("{lo:012}"), &format!("{hi:012}")],
            )
            .await?;
    }
    let offered = sent as f64 / started.elapsed().as_secs_f64();
    let target = target + sent as i64;
    wait_for("latency run drained", Duration::from_secs(120), || async { Ok(applied(&ndc, "e2e").await? >= target) })
        .await?;
    let lat = ndc.query_one("SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM latency", &[]).await?;
    e2e.stop();

    // 4. Initial snapshot of the whole table into the NDC, against COPY in of the same rows.
    let snap_cfg = agent_config(&dir, "snap", province.port, hub_port)?;
    let mut snap =
        DongboProcess::spawn("dongbo-agent", &["run", "--config", &snap_cfg.to_string_lossy()], &dir.join("snap.log"))?;
    let snap_target = 1 + a.rows as i64;
    let snapshot =
        wait_for("snapshot", Duration::from_secs(1200), || async { Ok(applied(&ndc, "snap").await? >= snap_target) })
            .await?;
    snap.stop();
    hub.stop();

    // 5. Capture while the load runs: pg_recvlogical and an agent both stream live from fresh slots.
    src.batch_execute("SELECT pg_create_logical_replication_slot('live_floor', 'pgoutput')").await?;
    let live_cfg = agent_config(&dir, "live", province.port, pg::free_port())?;
    let mut live =
        DongboProcess::spawn("dongbo-agent", &["run", "--config", &live_cfg.to_string_lossy()], &dir.join("live.log"))?;
    let live_slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'live' AND active";
    wait_for("live agent streaming", Duration::from_secs(600), || async { Ok(lsn(&src, live_slot).await? == 1) })
        .await?;
    // The live agent's snapshot of the whole table must be spooled before the clock starts.
    wait_for("live snapshot", Duration::from_secs(600), || async {
        Ok(lsn(&src, "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'live'")
            .await?
            >= lsn(&src, "SELECT (pg_current_wal_lsn() - '0/0')::int8").await?)
    })
    .await?;
    let mut recv_live = std::process::Command::new(pg_bin.join("pg_recvlogical"))
        .args([
            "-h",
            &province.dir.to_string_lossy(),
            "-p",
            &province.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "province",
        ])
        .args([
            "--slot",
            "live_floor",
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=dongbo",
            "-f",
            "/dev/null",
        ])
        .spawn()
        .context("pg_recvlogical")?;
    let live_start = Instant::now();
    load(&src, 10_000_000, a.rows).await?;
    let live_end = lsn(&src, "SELECT (pg_current_wal_lsn() - '0/0')::int8").await?;
    let (mut floor_live, mut agent_live) = (None, None);
    while floor_live.is_none() || agent_live.is_none() {
        if live_start.elapsed() > Duration::from_secs(600) {
            bail!("live capture did not finish within 600 s");
        }
        let sent = lsn(
            &src,
            "SELECT max((sent_lsn - '0/0')::int8) FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'",
        )
        .await?;
        let confirmed =
            lsn(&src, "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'live'")
                .await?;
        if floor_live.is_none() && sent >= live_end {
            floor_live = Some(live_start.elapsed());
        }
        if agent_live.is_none() && confirmed >= live_end {
            agent_live = Some(live_start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = recv_live.kill();
    let _ = recv_live.wait();
    live.stop();
    let (floor_live, agent_live) = (floor_live.unwrap_or_default(), agent_live.unwrap_or_default());
    let quarantined: i64 = ndc.query_one("SELECT count(*) FROM dongbo.quarantine", &[]).await?.get(0);
    if quarantined > 0 {
        bail!("{quarantined} changes were quarantined during the benchmark; see dongbo.quarantine");
    }

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    let (floor_r, cap_r, e2e_r, staged_r) =
        (rate(changes, floor), rate(changes, captured), rate(changes, e2e_time), rate(changes, staged));
    println!("\n== capture ({changes} row changes from a backlog)");
    println!("  pg_recvlogical floor   {floor_r:>10.0} changes/s  ({:.2} s)", floor.as_secs_f64());
    println!(
        "  agent into its spool   {cap_r:>10.0} changes/s  ({:.2} s)   ratio {:.2} (target >= 0.95)",
        captured.as_secs_f64(),
        cap_r / floor_r
    );
    match legacy_captured {
        Some(took) => println!(
            "  legacy agent (glibc 2.17) {:>7.0} changes/s  ({:.2} s)   ratio {:.2} of the normal build",
            rate(changes, took),
            took.as_secs_f64(),
            rate(changes, took) / cap_r
        ),
        None => println!("  legacy agent: not built (./deploy/build-legacy.sh)"),
    }
    println!(
        "  agent peak RSS         {:>10.1} MiB (capture), {:.1} MiB (end to end)   (target < 50)",
        rss as f64 / 1024.0,
        e2e_rss as f64 / 1024.0
    );
    println!("  agent binary           {:>10.1} MiB   (target < 30)", agent_size as f64 / 1048576.0);
    let (fl_r, al_r) = (rate(changes, floor_live), rate(changes, agent_live));
    println!("== capture while the load runs ({changes} row changes, both streaming live)");
    println!("  pg_recvlogical floor   {fl_r:>10.0} changes/s  ({:.2} s from load start)", floor_live.as_secs_f64());
    println!(
        "  agent into its spool   {al_r:>10.0} changes/s  ({:.2} s)   ratio {:.2} (target >= 0.85)",
        agent_live.as_secs_f64(),
        al_r / fl_r
    );
    println!("== end to end (source backlog -> NDC)");
    println!("  staged upsert floor    {staged_r:>10.0} rows/s     ({:.2} s)", staged.as_secs_f64());
    println!(
        "  dongbo end to end      {e2e_r:>10.0} changes/s  ({:.2} s)   ratio {:.2} (target >= 0.50)",
        e2e_time.as_secs_f64(),
        e2e_r / staged_r
    );
    let (copy_r, snap_r) = (rate(a.rows, copy_in), rate(a.rows, snapshot));
    println!("== initial snapshot ({} rows, source -> NDC)", a.rows);
    println!("  COPY in floor          {copy_r:>10.0} rows/s     ({:.2} s)", copy_in.as_secs_f64());
    println!(
        "  dongbo snapshot        {snap_r:>10.0} rows/s     ({:.2} s)   ratio {:.2} (target >= 0.50)",
        snapshot.as_secs_f64(),
        snap_r / copy_r
    );
    println!("== latency, source commit -> NDC write, at {offered:.0} changes/s offered");
    println!(
        "  {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   (target p99 < 250)",
        lat.get::<_, i64>(0),
        lat.get::<_, Option<f64>>(1).unwrap_or(0.0),
        lat.get::<_, Option<f64>>(2).unwrap_or(0.0),
        lat.get::<_, Option<f64>>(3).unwrap_or(0.0)
    );
    Ok(())
}
