//! `dongbo-bench-kafka`: the end-to-end rate through Kafka with one and with two hubs, against the
//! gRPC path, in the same run on the same backlog.
//!
//! Two sources (two agents, two topics of one partition each) each get N inserts then N updates.
//! Then, each on its own NDC database:
//! 1. gRPC: both agents stream to one hub; time until the NDC has every change.
//! 2. Kafka: both agents first produce their backlog to the broker (the produce rate is printed), then
//!    one hub consumes both topics; time until the NDC has every change.
//! 3. Kafka, two hubs in one consumer group (one topic each); same.
//!
//! Usage: `cargo build --release --bins && target/release/dongbo-bench-kafka [--rows N]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dongbo_tests::backlog::{load, wait_for, TABLE};
use dongbo_tests::kafka::Broker;
use dongbo_tests::pg::{self, PgCluster};
use dongbo_tests::procs::DongboProcess;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::Client;

const SOURCES: [&str; 2] = ["a", "b"];

fn rows_arg() -> anyhow::Result<u64> {
    // tansu 0.6 (the test broker) serves a fetch in time proportional to the partition's whole
    // remaining backlog, so deep backlogs measure the broker, not dongbo.
    let mut rows = 20_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--rows" => rows = it.next().context("--rows needs a value")?.parse()?,
            other => bail!("unknown flag {other}; use --rows N"),
        }
    }
    Ok(rows)
}

/// An agent of source `src` (database `province_<src>`) with its own slot, shipping by `link`.
fn agent_config(dir: &Path, name: &str, src: &str, pg_port: u16, link: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "source_id = \"{name}\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {pg_port}\n\
             database = \"province_{src}\"\nuser = \"{role}\"\npassword = \"{pw}\"\ntables = [\"public.citizens\"]\n\
             slot = \"{slot}\"\npublication = \"dongbo\"\nfeedback_interval_ms = 100\n\
             [spool]\npath = \"{spool}\"\nmax_bytes = 68719476736\n{link}",
            role = pg::ROLE,
            pw = pg::PASSWORD,
            slot = name.replace('-', "_"),
            spool = dir.join(format!("{name}-spool")).display(),
        ),
    )?;
    Ok(path)
}

/// A hub on NDC database `ndc` for agents `ids`, with `extra` appended (a `[kafka]` section).
fn hub_config(
    dir: &Path,
    name: &str,
    pg_port: u16,
    ndc: &str,
    ids: &[String],
    extra: &str,
) -> anyhow::Result<(PathBuf, u16)> {
    let port = pg::free_port();
    let agents: String = ids.iter().map(|id| format!("[[agents]]\nid = \"{id}\"\ntoken = \"{id}-token\"\n")).collect();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ninsecure_plaintext_demo = true\n[fanout]\ndata_dir = \"{data}\"\n[ndc]\nhost = \"127.0.0.1\"\nport = {pg_port}\n\
             database = \"{ndc}\"\nuser = \"{role}\"\npassword = \"{pw}\"\n{agents}{extra}",
            role = pg::ROLE,
            pw = pg::PASSWORD,
            data = dir.join(format!("{name}-data")).display(),
        ),
    )?;
    Ok((path, port))
}

fn spawn(binary: &str, config: &Path, dir: &Path, name: &str) -> anyhow::Result<DongboProcess> {
    let command = if binary == "dongbo-hub" { "serve" } else { "run" };
    DongboProcess::spawn(binary, &[command, "--config", &config.to_string_lossy()], &dir.join(format!("{name}.log")))
}

async fn applied_total(ndc: &Client) -> anyhow::Result<i64> {
    let r = ndc
        .query_one(
            "SELECT coalesce(sum(changes_applied + changes_quarantined), 0)::int8 FROM dongbo.applied_position",
            &[],
        )
        .await;
    // Before the first hub bootstraps the NDC, the table does not exist yet.
    Ok(r.map(|r| r.get(0)).unwrap_or(0))
}

/// Time from now until the NDC database `ndc` holds `total` changes.
async fn time_to_apply(pg: &PgCluster, ndc: &str, total: i64) -> anyhow::Result<Duration> {
    let client = pg.connect(ndc).await?;
    wait_for("apply", Duration::from_secs(1800), || async { Ok(applied_total(&client).await? >= total) }).await
}

/// The end offsets of the agents' topics, summed.
fn produced(brokers: &str, topics: &[String]) -> anyhow::Result<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "bench-probe").create()?;
    let mut total = 0;
    for t in topics {
        total += consumer.fetch_watermarks(t, 0, Duration::from_secs(5)).map(|(_, high)| high).unwrap_or(0);
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = rows_arg()?;
    let per_source = 2 * rows as i64 + 1; // the snapshot's opening truncate of the empty table, then the load
    let total = per_source * SOURCES.len() as i64;
    println!("dongbo-bench-kafka: {} sources x ({rows} inserts + {rows} updates)", SOURCES.len());
    let pg = PgCluster::start("bench-kafka")?;
    let dir = pg.dir.join("bench");
    std::fs::create_dir_all(&dir)?;
    let broker = Broker::start(&dir).await?;
    for ndc in ["ndc_grpc", "ndc_k1", "ndc_k2"] {
        pg.create_database(ndc).await?;
    }
    let mut sources = Vec::new();
    for s in SOURCES {
        pg.create_database(&format!("province_{s}")).await?;
        let c = pg.connect(&format!("province_{s}")).await?;
        c.batch_execute(TABLE).await?;
        c.batch_execute("ALTER TABLE citizens OWNER TO dongbo; CREATE PUBLICATION dongbo FOR TABLE citizens").await?;
        sources.push(c);
    }
    let grpc_ids: Vec<String> = SOURCES.iter().map(|s| format!("grpc-{s}")).collect();
    let kafka_ids: Vec<String> = SOURCES.iter().map(|s| format!("kafka-{s}")).collect();
    let topics: Vec<String> = kafka_ids.iter().map(|id| format!("dongbo.cdc.{id}")).collect();
    let (grpc_hub, grpc_port) = hub_config(&dir, "hub-grpc", pg.port, "ndc_grpc", &grpc_ids, "")?;
    let kafka_section = |group: &str| {
        format!("[kafka]\nbrokers = \"{}\"\ngroup_id = \"{group}\"\ninsecure_plaintext_demo = true\n", broker.brokers())
    };
    let (k1_hub, _) = hub_config(&dir, "hub-k1", pg.port, "ndc_k1", &kafka_ids, &kafka_section("k1"))?;
    let (k2a_hub, _) = hub_config(&dir, "hub-k2a", pg.port, "ndc_k2", &kafka_ids, &kafka_section("k2"))?;
    let (k2b_hub, _) = hub_config(&dir, "hub-k2b", pg.port, "ndc_k2", &kafka_ids, &kafka_section("k2"))?;
    let mut agents = Vec::new();
    for (i, s) in SOURCES.iter().enumerate() {
        let grpc_link = format!(
            "[hub]\nurl = \"http://127.0.0.1:{grpc_port}\"\ntoken = \"{id}-token\"\nmax_backoff_ms = 500\n",
            id = grpc_ids[i]
        );
        let kafka_link = format!(
            "[kafka]\nbrokers = \"{}\"\nmax_backoff_ms = 500\ninsecure_plaintext_demo = true\n",
            broker.brokers()
        );
        agents.push((grpc_ids[i].clone(), agent_config(&dir, &grpc_ids[i], s, pg.port, &grpc_link)?));
        agents.push((kafka_ids[i].clone(), agent_config(&dir, &kafka_ids[i], s, pg.port, &kafka_link)?));
    }
    // Every agent's slot exists before the load, so all of them decode the same backlog.
    for (name, cfg) in &agents {
        let mut agent = spawn("dongbo-agent", cfg, &dir, name)?;
        let src = &sources[SOURCES.iter().position(|s| name.ends_with(s)).unwrap_or(0)];
        let slot = name.replace('-', "_");
        wait_for("agent slot", Duration::from_secs(60), || async {
            let q =
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL";
            Ok(src.query_one(q, &[&slot]).await?.get::<_, i64>(0) == 1)
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.stop();
    }
    println!("loading the backlog ...");
    let t = Instant::now();
    for src in &sources {
        load(src, 1, rows).await?;
    }
    println!("  written in {:.1} s", t.elapsed().as_secs_f64());
    let rate = |d: Duration| total as f64 / d.as_secs_f64();

    // 1. gRPC.
    let mut hub = spawn("dongbo-hub", &grpc_hub, &dir, "hub-grpc")?;
    let mut running: Vec<DongboProcess> = Vec::new();
    for (name, cfg) in agents.iter().filter(|(n, _)| n.starts_with("grpc")) {
        running.push(spawn("dongbo-agent", cfg, &dir, name)?);
    }
    let grpc = time_to_apply(&pg, "ndc_grpc", total).await?;
    running.iter_mut().for_each(DongboProcess::stop);
    hub.stop();

    // 2. Kafka: produce everything first, then consume with one hub.
    let mut producing: Vec<DongboProcess> = Vec::new();
    for (name, cfg) in agents.iter().filter(|(n, _)| n.starts_with("kafka")) {
        producing.push(spawn("dongbo-agent", cfg, &dir, name)?);
    }
    let brokers = broker.brokers();
    let produce = wait_for("produce", Duration::from_secs(1800), || {
        let (b, t) = (brokers.clone(), topics.clone());
        async move { Ok(tokio::task::spawn_blocking(move || produced(&b, &t)).await?? >= total) }
    })
    .await?;
    println!("  agents -> broker        {:>10.0} changes/s  ({:.2} s)", rate(produce), produce.as_secs_f64());
    producing.iter_mut().for_each(DongboProcess::stop);
    let mut one = spawn("dongbo-hub", &k1_hub, &dir, "hub-k1")?;
    let k1 = time_to_apply(&pg, "ndc_k1", total).await?;
    one.stop();

    // 3. Kafka, two hubs sharing the topics.
    let mut two = [spawn("dongbo-hub", &k2a_hub, &dir, "hub-k2a")?, spawn("dongbo-hub", &k2b_hub, &dir, "hub-k2b")?];
    let k2 = time_to_apply(&pg, "ndc_k2", total).await?;
    two.iter_mut().for_each(DongboProcess::stop);

    println!("== end to end into the NDC ({total} changes from a backlog, 2 sources)");
    println!("  gRPC, one hub           {:>10.0} changes/s  ({:.2} s)", rate(grpc), grpc.as_secs_f64());
    println!(
        "  Kafka, one hub          {:>10.0} changes/s  ({:.2} s)   ratio to gRPC {:.2}",
        rate(k1),
        k1.as_secs_f64(),
        rate(k1) / rate(grpc)
    );
    println!(
        "  Kafka, two hubs         {:>10.0} changes/s  ({:.2} s)   ratio to one hub {:.2}",
        rate(k2),
        k2.as_secs_f64(),
        rate(k2) / rate(k1)
    );
    println!("  (broker -> NDC only for Kafka: the backlog was already on the broker)");
    Ok(())
}
