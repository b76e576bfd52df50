//! `dongbo-bench-dictionary`: what the national dictionary's transform stage costs end to end. The
//! same backlog (N inserts then N updates of citizens shaped as the national rules want them: valid
//! 12-digit ids, birth dates agreeing with them, gender 1/2, pre-2025 commune codes of Hồ Chí Minh
//! City) goes through agent → gRPC → hub → NDC eight times, from eight slots created before the
//! load, in four pairs ordered mapped-plain, plain-mapped, mapped-plain, plain-mapped (so a steady
//! drift of the machine falls on both kinds alike; each run starts after an NDC vacuum and
//! checkpoint, with autovacuum off, so none pays for the writes of the one before). "Mapped"
//! agents are mapped onto `national.citizens` (columns renamed, text trimmed and NFC, dates and
//! gender normalised, the citizen id checked, every commune code remapped through the 2025 table,
//! provenance added, the conflict rule as a guard on the upsert); "plain" agents' rows are copied as
//! they are into their own schema. Beside them, the floor measured in the same run: a staged upsert
//! of as many rows into the NDC. Goal: mapped ≥ 0.9 of plain, judged on the median of the four
//! pairs' ratios: on a shared two-core machine one run in several is slowed by a third or more
//! (hub and NDC CPU seconds grow with it for the same work), which a mean of rates passes on
//! whole to whichever kind it fell on. The mean-based ratio is printed too.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-dictionary [--rows N]`

use std::time::{Duration, Instant};

use anyhow::bail;
use dongbo_tests::backlog::{
    agent_config, applied, bench_clusters, create_slots, settle, staged_upsert_floor, wait_for,
    wait_listening as wait_hub, write_hub_config, BenchArgs, BenchClusters,
};
use dongbo_tests::pg;
use dongbo_tests::procs::{tree_cpu_seconds, DongboProcess};
use tokio_postgres::Client;

/// The runs in order: pair k is the k-th mapped run and the k-th plain run.
const RUNS: [(&str, bool); 8] = [
    ("mapped1", true),
    ("plain1", false),
    ("plain2", false),
    ("mapped2", true),
    ("mapped3", true),
    ("plain3", false),
    ("plain4", false),
    ("mapped4", true),
];

/// Hồ Chí Minh City's legacy commune codes that went whole into one new commune.
fn hcm_legacy_codes() -> Vec<String> {
    include_str!("../../../data/admin-units/commune_remap_2025.csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > 7 && f[0] == "79" && f[7] == "whole")
        .map(|f| f[2].to_string())
        .collect()
}

/// N inserts in 10 transactions, then N updates (a move to Tân Định, 26734) in 10 transactions.
/// Ids are `079` + century-and-gender digit + birth year + a six-digit serial, as the rules want.
async fn load(src: &Client, rows: u64) -> anyhow::Result<()> {
    if rows >= 1_000_000 {
        bail!("at most 999 999 rows: the serial has six digits");
    }
    let codes = hcm_legacy_codes();
    let array = format!("ARRAY[{}]", codes.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(","));
    let step = rows.div_ceil(10);
    for i in 0..10 {
        let (a, b) = (1 + i * step, ((i + 1) * step).min(rows));
        src.execute(
            &format!(
                "INSERT INTO citizens (citizen_id, full_name, birth_date, gender, province_code, commune_code, address, residence_kind)
                 SELECT '079' || ((CASE WHEN extract(year FROM d) >= 2000 THEN 2 ELSE 0 END) + (1 + g % 2) - 1)::text
                          || to_char(d, 'YY') || lpad(g::text, 6, '0'),
                        'Nguyễn Văn ' || g, d, 1 + g % 2, '79', ({array})[1 + g % {n}],
                        'Số ' || g % 300 || ' đường Nguyễn Huệ, Thành phố Hồ Chí Minh', 'thường trú'
                 FROM generate_series({a}, {b}) g, LATERAL (SELECT DATE '1960-01-01' + (g % 20000)::int AS d) bd"
            , n = codes.len()),
            &[],
        )
        .await?;
    }
    for i in 0..10 {
        let (a, b) = (1 + i * step, ((i + 1) * step).min(rows));
        src.execute(
            &format!(
                "UPDATE citizens SET commune_code = '26734', address = address || ' (mới)', version = version + 1,
                 updated_at = clock_timestamp() WHERE substr(citizen_id, 7)::int BETWEEN {a} AND {b}"
            ),
            &[],
        )
        .await?;
    }
    Ok(())
}

/// The `[national]` section mapping the mapped agents' `public.citizens`.
fn national_toml() -> String {
    let mut t = String::from("[national]\nconflict = \"priority\"\n");
    for (priority, (name, mapped)) in RUNS.iter().enumerate() {
        if *mapped {
            t.push_str(&format!(
                "[[national.mappings]]\nagent = \"{name}\"\nsource_table = \"public.citizens\"\ntable = \"citizens\"\n\
                 columns = {{ citizen_id = \"citizen_id\", full_name = \"full_name\", birth_date = \"birth_date\", \
                 gender = \"gender\", commune_code = \"commune_code\", address = \"address\" }}\ncommune_codes = \"legacy\"\npriority = {priority}\n"
            ));
        }
    }
    t
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = BenchArgs::parse(200_000)?;
    println!(
        "dongbo-bench-dictionary: {} inserts then {} updates, end to end, mapped and plain in four pairs",
        a.rows, a.rows
    );
    let BenchClusters { province, ndc_pg, dir, src, ndc } = bench_clusters("bench-dictionary").await?;
    let hub_port = pg::free_port();
    let status_port = pg::free_port();
    let ids: Vec<&str> = RUNS.iter().map(|(n, _)| *n).collect();
    let hub_cfg = write_hub_config(&dir, ndc_pg.port, hub_port, &ids)?;
    let agents = std::fs::read_to_string(&hub_cfg)?;
    // Agents serve Hồ Chí Minh City, so their national rows record it.
    let agents = agents.replace("-token\"\n", "-token\"\nprovince = \"79\"\n");
    std::fs::write(&hub_cfg, agents + &national_toml())?;
    let hub_args = ["serve", "--config", &hub_cfg.to_string_lossy()].map(str::to_string);
    let hub_args: Vec<&str> = hub_args.iter().map(String::as_str).collect();

    // Every agent's slot exists (and its empty snapshot is applied) before the backlog is written.
    create_slots(&dir, &hub_args, (province.port, hub_port, status_port), &ndc, &ids).await?;

    println!("loading the backlog ...");
    load(&src, a.rows).await?;
    let changes = 2 * a.rows;
    println!("  backlog of {changes} changes written");

    let mut figures = Vec::new();
    for (name, mapped) in RUNS {
        // Each mapped run starts from an empty national table, as each plain run from its own.
        ndc.batch_execute("DO $$ BEGIN IF to_regclass('national.citizens') IS NOT NULL THEN TRUNCATE national.citizens; END IF; END $$")
            .await?;
        settle(&ndc).await?;
        let mut hub = DongboProcess::spawn("dongbo-hub", &hub_args, &dir.join(format!("hub-{name}.log")))?;
        wait_hub(hub_port).await?;
        let cfg = agent_config(&dir, name, province.port, hub_port, status_port);
        let cpu = |pid: Option<u32>| pid.map(tree_cpu_seconds).unwrap_or(0.0);
        let before = (cpu(hub.pid()), cpu(ndc_pg.postmaster_pid()));
        let started = Instant::now();
        let mut agent = DongboProcess::spawn(
            "dongbo-agent",
            &["run", "--config", &cfg.to_string_lossy()],
            &dir.join(format!("{name}.log")),
        )?;
        let target = 1 + changes as i64;
        wait_for(name, Duration::from_secs(1800), || async { Ok(applied(&ndc, name).await? >= target) }).await?;
        let took = started.elapsed();
        let spent = (cpu(hub.pid()) - before.0, cpu(ndc_pg.postmaster_pid()) - before.1);
        agent.stop();
        hub.stop();
        if mapped {
            let row = ndc
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE commune_code = '26737' AND legacy_commune_code = '26734' \
                     AND source_agent = $1 AND source_province = '79') FROM national.citizens",
                    &[&name],
                )
                .await?;
            let (n, right): (i64, i64) = (row.get(0), row.get(1));
            if n != a.rows as i64 || right != n {
                bail!(
                    "{name}: national.citizens holds {n} rows, {right} of them remapped and attributed; expected {}",
                    a.rows
                );
            }
        }
        let rate = changes as f64 / took.as_secs_f64();
        println!(
            "  run {name:<8} {:<6}: {:>6.2} s, {rate:>9.0} changes/s; CPU s: hub {:.2}, NDC server {:.2}",
            if mapped { "mapped" } else { "plain" },
            took.as_secs_f64(),
            spent.0,
            spent.1
        );
        figures.push((mapped, rate));
    }
    let quarantined: i64 = ndc.query_one("SELECT count(*) FROM dongbo.quarantine", &[]).await?.get(0);
    if quarantined > 0 {
        bail!("{quarantined} changes were quarantined: the backlog breaks a rule, so the runs do not compare");
    }
    let (floor, _) = staged_upsert_floor(&ndc, a.rows).await?;
    let floor_rate = changes as f64 / floor.as_secs_f64();
    let mean = |mapped: bool| {
        let v: Vec<f64> = figures.iter().filter(|(m, _)| *m == mapped).map(|(_, r)| *r).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (with, without) = (mean(true), mean(false));
    let rates = |mapped: bool| figures.iter().filter(move |(m, _)| *m == mapped).map(|(_, r)| *r);
    let mut pairs: Vec<f64> = rates(true).zip(rates(false)).map(|(m, p)| m / p).collect();
    println!();
    println!("mapped / plain by pair: {}", pairs.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "));
    pairs.sort_by(f64::total_cmp);
    let median = (pairs[pairs.len() / 2 - 1] + pairs[pairs.len() / 2]) / 2.0;
    println!(
        "end to end, mapped onto national.citizens: {with:>9.0} changes/s ({:.2} of the floor)",
        with / floor_rate
    );
    println!(
        "end to end, copied as they are:            {without:>9.0} changes/s ({:.2} of the floor)",
        without / floor_rate
    );
    println!("floor (staged upsert of the same rows into the NDC): {floor_rate:>9.0} changes/s");
    println!("mapped / plain, mean rates: {:.2}", with / without);
    println!("mapped / plain, median of the pairs: {median:.2} (goal: at least 0.90)");
    Ok(())
}
