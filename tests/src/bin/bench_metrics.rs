//! `dongbo-bench-metrics`: what metrics cost end to end. The same backlog (N inserts then N
//! updates) goes through agent → gRPC → hub → NDC four times, from four slots created before the
//! load: metrics on, off, on, off (alternating, so a drift of the machine falls on both). "On" is
//! the default: every series recorded, the agent's `/metrics` scraped every second as Prometheus
//! would (ten times more often than usual); "off" is `DONGBO_METRICS=off` on hub and agent, which
//! records nothing. Beside them, the floor measured in the same run: a staged upsert of the same
//! rows into the NDC (`COPY` into a temp table, `INSERT … ON CONFLICT`). Goal: on costs ≤ 3 %.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-metrics [--rows N]`

use std::time::{Duration, Instant};

use dongbo_tests::backlog::{
    agent_config, applied, bench_clusters, create_slots, load, lsn, staged_upsert_floor, wait_for,
    wait_listening as wait_hub, write_hub_config, BenchArgs, BenchClusters,
};
use dongbo_tests::pg;
use dongbo_tests::procs::DongboProcess;

const RUNS: [(&str, bool); 4] = [("on1", true), ("off1", false), ("on2", true), ("off2", false)];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = BenchArgs::parse(200_000)?;
    println!(
        "dongbo-bench-metrics: {} inserts then {} updates, end to end, metrics on / off / on / off",
        a.rows, a.rows
    );
    let BenchClusters { province, ndc_pg, dir, src, ndc } = bench_clusters("bench-metrics").await?;
    let hub_port = pg::free_port();
    let status_port = pg::free_port();
    let ids: Vec<&str> = RUNS.iter().map(|(n, _)| *n).collect();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &ids)?;
    let hub_args = ["serve", "--config", &hub_cfg.to_string_lossy()].map(str::to_string);
    let hub_args: Vec<&str> = hub_args.iter().map(String::as_str).collect();

    // Every agent's slot exists (and its empty snapshot is applied) before the backlog is written.
    create_slots(&dir, &hub_args, (province.port, hub_port, status_port), &ndc, &ids).await?;

    println!("loading the backlog ...");
    load(&src, 1, a.rows).await?;
    let changes = 2 * a.rows;
    let end_lsn = lsn(&src, "SELECT (pg_current_wal_lsn() - '0/0')::int8").await?;
    println!("  backlog of {changes} changes written (WAL end {end_lsn})");

    let mut figures = Vec::new();
    for (name, on) in RUNS {
        let env: &[(&str, &str)] = if on { &[] } else { &[("DONGBO_METRICS", "off")] };
        let mut hub =
            DongboProcess::spawn_with_env("dongbo-hub", &hub_args, &dir.join(format!("hub-{name}.log")), env)?;
        wait_hub(hub_port).await?;
        let cfg = agent_config(&dir, name, province.port, hub_port, status_port);
        let started = Instant::now();
        let mut agent = DongboProcess::spawn_with_env(
            "dongbo-agent",
            &["run", "--config", &cfg.to_string_lossy()],
            &dir.join(format!("{name}.log")),
            env,
        )?;
        let scraper = on.then(|| {
            tokio::spawn(async move {
                let url = format!("http://127.0.0.1:{status_port}/metrics");
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = dongbo_tests::scrape::get(&url, None).await;
                }
            })
        });
        let target = 1 + changes as i64;
        wait_for(name, Duration::from_secs(1800), || async { Ok(applied(&ndc, name).await? >= target) }).await?;
        let took = started.elapsed();
        if let Some(s) = scraper {
            s.abort();
        }
        agent.stop();
        hub.stop();
        let rate = changes as f64 / took.as_secs_f64();
        println!(
            "  run {name:<5} metrics {:<3}: {:>6.2} s, {rate:>9.0} changes/s",
            if on { "on" } else { "off" },
            took.as_secs_f64()
        );
        figures.push((on, rate));
    }
    let (floor, _) = staged_upsert_floor(&ndc, a.rows).await?;
    let floor_rate = changes as f64 / floor.as_secs_f64();
    let mean = |on: bool| {
        let v: Vec<f64> = figures.iter().filter(|(o, _)| *o == on).map(|(_, r)| *r).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (with, without) = (mean(true), mean(false));
    println!();
    println!("end to end, metrics on:  {with:>9.0} changes/s ({:.2} of the floor)", with / floor_rate);
    println!("end to end, metrics off: {without:>9.0} changes/s ({:.2} of the floor)", without / floor_rate);
    println!("floor (staged upsert of the same rows into the NDC): {floor_rate:>9.0} changes/s");
    println!("metrics cost {:+.1} % of end-to-end throughput (goal: at most 3 %)", (1.0 - with / without) * 100.0);
    Ok(())
}
