//! `dongbo-bench-tls`: what mutual TLS costs on the agent → hub link, measured in one run on one
//! machine: the same backlog drained end to end by an agent over clear-text gRPC and by one over
//! mutual TLS (each with its own hub on the same NDC), then commit → NDC latency of each agent
//! alone under the same steady load.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-tls [--rows N] [--rate R] [--seconds S]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dongbo_tests::backlog::{applied, load, wait_for, wait_listening, BenchArgs, TABLE};
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::DongboProcess;
use dongbo_tests::tls::TestPki;

/// Updates at `rate` changes/s for `length` over ids 1..=`rows`; returns how many rows changed.
async fn steady_load(src: &tokio_postgres::Client, rows: u64, rate: u64, length: Duration) -> anyhow::Result<u64> {
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let (mut next, mut sent) = (1u64, 0u64);
    while started.elapsed() < length {
        tick.tick().await;
        let (lo, hi) = (next, next + per_tick - 1);
        next = if hi >= rows { 1 } else { hi + 1 };
        sent += src
            .execute(
                "UPDATE citizens SET version = version + 1, updated_at = clock_timestamp() WHERE citizen_id BETWEEN $1::char(12) AND $2::char(12)",
                &[&format!("{lo:012}"), &format!("{hi:012}")],
            )
            .await?;
    }
    Ok(sent)
}

/// One side of the comparison: a hub and its agent.
struct Side {
    name: &'static str,
    hub_cfg: PathBuf,
    agent_cfg: PathBuf,
    hub_port: u16,
}

fn side(
    dir: &Path,
    name: &'static str,
    province: &PgCluster,
    ndc: &PgCluster,
    pki: Option<&TestPki>,
) -> anyhow::Result<Side> {
    let hub_port = pg::free_port();
    let (hub_tls, link) = match pki {
        Some(p) => (p.hub_toml(), format!("url = \"https://localhost:{hub_port}\"\n{}", p.agent_toml(name))),
        None => ("insecure_plaintext_demo = true\n".to_string(), format!("url = \"http://127.0.0.1:{hub_port}\"\n")),
    };
    let hub_cfg = dir.join(format!("hub-{name}.toml"));
    std::fs::write(
        &hub_cfg,
        format!(
            "listen = \"127.0.0.1:{hub_port}\"\n{hub_tls}\n[fanout]\ndata_dir = \"{data}\"\n[ndc]\nhost = \"127.0.0.1\"\n\
             port = {ndc_port}\ndatabase = \"ndc\"\nuser = \"{role}\"\npassword = \"{pw}\"\n\
             [[agents]]\nid = \"{name}\"\ntoken = \"{name}-token\"\n",
            data = dir.join(format!("hub-{name}-data")).display(),
            ndc_port = ndc.port,
            role = pg::ROLE,
            pw = pg::PASSWORD,
        ),
    )?;
    let agent_cfg = dir.join(format!("agent-{name}.toml"));
    std::fs::write(
        &agent_cfg,
        format!(
            "source_id = \"{name}\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {src_port}\n\
             database = \"province\"\nuser = \"{role}\"\npassword = \"{pw}\"\ntables = [\"public.citizens\"]\n\
             slot = \"{name}\"\npublication = \"dongbo\"\nfeedback_interval_ms = 100\n[spool]\npath = \"{spool}\"\n\
             max_bytes = 68719476736\n[hub]\n{link}token = \"{name}-token\"\nmax_backoff_ms = 500\n",
            src_port = province.port,
            role = pg::ROLE,
            pw = pg::PASSWORD,
            spool = dir.join(format!("spool-{name}")).display(),
        ),
    )?;
    Ok(Side { name, hub_cfg, agent_cfg, hub_port })
}

impl Side {
    async fn hub(&self, dir: &Path) -> anyhow::Result<DongboProcess> {
        let p = DongboProcess::spawn(
            "dongbo-hub",
            &["serve", "--config", &self.hub_cfg.to_string_lossy()],
            &dir.join(format!("hub-{}.log", self.name)),
        )?;
        wait_listening(self.hub_port).await?;
        Ok(p)
    }

    fn agent(&self, dir: &Path) -> anyhow::Result<DongboProcess> {
        DongboProcess::spawn(
            "dongbo-agent",
            &["run", "--config", &self.agent_cfg.to_string_lossy()],
            &dir.join(format!("agent-{}.log", self.name)),
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = BenchArgs::parse(200_000)?;
    println!(
        "dongbo-bench-tls: {} inserts then {} updates through clear-text gRPC and through mutual TLS; \
         latency at {} changes/s for {} s",
        a.rows, a.rows, a.rate, a.seconds
    );
    let province = PgCluster::start("benchtls-province")?;
    let ndc_pg = PgCluster::start("benchtls-ndc")?;
    province.create_database("province").await?;
    ndc_pg.create_database("ndc").await?;
    let dir = province.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let pki = TestPki::new(&dir.join("pki"))?;
    let src = province.connect("province").await?;
    src.batch_execute(TABLE).await?;
    src.batch_execute("ALTER TABLE citizens OWNER TO dongbo; CREATE PUBLICATION dongbo FOR TABLE citizens").await?;
    let ndc = ndc_pg.connect("ndc").await?;
    let sides = [side(&dir, "plain", &province, &ndc_pg, None)?, side(&dir, "mtls", &province, &ndc_pg, Some(&pki))?];

    // Both slots (and NDC tables) exist before the backlog, so both agents decode the same one.
    let mut hubs = Vec::new();
    for s in &sides {
        hubs.push(s.hub(&dir).await?);
        let mut agent = s.agent(&dir)?;
        let name = s.name;
        wait_for("snapshot applied", Duration::from_secs(60), || async { Ok(applied(&ndc, name).await? == 1) }).await?;
        agent.stop();
    }
    println!("loading the backlog ...");
    load(&src, 1, a.rows).await?;
    let changes = 2 * a.rows;
    let target = 1 + changes as i64;

    // Throughput: each agent drains the backlog alone.
    let mut drain = Vec::new();
    for s in &sides {
        let mut agent = s.agent(&dir)?;
        let name = s.name;
        let took =
            wait_for("end to end", Duration::from_secs(1200), || async { Ok(applied(&ndc, name).await? >= target) })
                .await?;
        agent.stop();
        drain.push(took);
    }

    // Latency: both stream the same steady load at once.
    for s in &sides {
        ndc.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS latency (side text, ms float8);
             GRANT INSERT ON latency TO dongbo;
             CREATE OR REPLACE FUNCTION record_latency() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN INSERT INTO latency VALUES (TG_TABLE_SCHEMA, extract(epoch FROM clock_timestamp() - NEW.updated_at) * 1000); RETURN NEW; END$$;
             CREATE TRIGGER record_latency AFTER INSERT OR UPDATE ON {}.citizens FOR EACH ROW EXECUTE FUNCTION record_latency();",
            s.name
        ))
        .await?;
    }
    // Each agent alone, as in production: caught up first, then the clock starts. A first run is
    // discarded (the first seconds after the backlog stall, whichever side runs them); then ABBA,
    // with a checkpoint on both clusters before each run, so neither side gets the other's stalls.
    let mut total = target;
    let mut offered = 0.0;
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(), Vec::new()];
    for (i, kept) in [(0usize, false), (0, true), (1, true), (1, true), (0, true)] {
        let s = &sides[i];
        let mut agent = s.agent(&dir)?;
        let name = s.name;
        let caught_up = total;
        wait_for("caught up", Duration::from_secs(300), || async { Ok(applied(&ndc, name).await? >= caught_up) })
            .await?;
        src.batch_execute("CHECKPOINT").await?;
        ndc.batch_execute("CHECKPOINT").await?;
        ndc.execute("DELETE FROM latency", &[]).await?;
        let sent = steady_load(&src, a.rows, a.rate, Duration::from_secs(a.seconds)).await?;
        offered = sent as f64 / a.seconds as f64;
        total += sent as i64;
        let drained = total;
        wait_for("latency run drained", Duration::from_secs(120), || async {
            Ok(applied(&ndc, name).await? >= drained)
        })
        .await?;
        agent.stop();
        let r = ndc
            .query_one(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM latency WHERE side = $1",
                &[&name],
            )
            .await?;
        if kept {
            runs[i].push((r.get(0), r.get(1)));
        }
    }
    for mut h in hubs {
        h.stop();
    }

    let rate = |d: Duration| changes as f64 / d.as_secs_f64();
    println!("== end to end (source backlog -> NDC), each agent alone");
    println!("  clear-text gRPC        {:>10.0} changes/s  ({:.2} s)", rate(drain[0]), drain[0].as_secs_f64());
    println!(
        "  mutual TLS             {:>10.0} changes/s  ({:.2} s)  = {:.2} of clear text (goal >= 0.9)",
        rate(drain[1]),
        drain[1].as_secs_f64(),
        drain[0].as_secs_f64() / drain[1].as_secs_f64()
    );
    println!("== latency, source commit -> NDC write, at {offered:.0} changes/s offered, each agent alone, runs in order ABBA");
    let mut p99 = Vec::new();
    for (s, r) in sides.iter().zip(&runs) {
        let text: Vec<String> = r.iter().map(|(p50, q99)| format!("p50 {p50:>5.1} ms p99 {q99:>6.1} ms")).collect();
        let mean = r.iter().map(|(_, q)| q).sum::<f64>() / r.len() as f64;
        println!("  {:<8} {}   (mean p99 {mean:.1} ms)", s.name, text.join(" | "));
        p99.push(mean);
    }
    println!("  mutual TLS p99 / clear-text p99 = {:.2} (mean of the runs)", p99[1] / p99[0]);
    Ok(())
}
