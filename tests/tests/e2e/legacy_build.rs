//! The legacy agent (`deploy/build-legacy.sh`: glibc 2.17, no Kafka transport), as the old servers of
//! the provinces run it: the binary needs no glibc symbol newer than 2.17, says plainly that it has
//! no Kafka transport, and carries the Postgres scenario (snapshot, streaming over mutual TLS, a
//! `kill -9` inside a large transaction) with the NDC equal to the source and every change applied
//! once.

use std::path::PathBuf;
use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::workload::{big_insert_txn, mixed_small_txns};
use dongbo_tests::Deployment;

/// The legacy agent, built by `deploy/build-legacy.sh` (which `.ci/run` calls first).
fn legacy_agent() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/legacy/dongbo-agent");
    anyhow::ensure!(path.is_file(), "{} is missing: run ./deploy/build-legacy.sh first", path.display());
    Ok(path)
}

/// The highest `GLIBC_x.y` version among the dynamic symbols `objdump -T` lists.
fn highest_glibc(exe: &std::path::Path) -> anyhow::Result<(u32, u32)> {
    let out = std::process::Command::new("objdump").arg("-T").arg(exe).output()?;
    anyhow::ensure!(out.status.success(), "objdump -T failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let versions = text.split(|c: char| c.is_whitespace() || c == '(' || c == ')').filter_map(|w| {
        let (major, minor) = w.strip_prefix("GLIBC_")?.split_once('.')?;
        let minor = minor.split('.').next()?;
        Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
    });
    versions.max().ok_or_else(|| anyhow::anyhow!("no GLIBC_ symbol versions in {}", exe.display()))
}

#[test]
fn the_legacy_agent_needs_nothing_newer_than_glibc_2_17_and_refuses_kafka_plainly() -> anyhow::Result<()> {
    let exe = legacy_agent()?;
    let (major, minor) = highest_glibc(&exe)?;
    assert!((major, minor) <= (2, 17), "the legacy agent needs GLIBC_{major}.{minor}");
    // The normal build is the control: the reading works (it needs a newer glibc here).
    let normal = highest_glibc(&dongbo_tests::procs::binary("dongbo-agent")?)?;
    assert!(normal > (2, 17), "the normal build reads as {normal:?}: is the reading broken?");
    let dir = tempfile_dir()?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "source_id = \"old\"\n[source]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\ndatabase = \"x\"\nuser = \"u\"\n\
             tables = [\"public.t\"]\n[spool]\npath = \"{}\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\ninsecure_plaintext_demo = true\n",
            dir.join("spool").display()
        ),
    )?;
    let out = std::process::Command::new(&exe).args(["run", "--config"]).arg(&config).output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("without the Kafka transport"), "{said}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dongbo-legacy-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_agent_carries_the_postgres_scenario_exactly_once() -> anyhow::Result<()> {
    let mut d = Deployment::new("legacy", CITIZENS_DDL, &["public.citizens"]).await?;
    d.agent_binary = Some(legacy_agent()?);
    d.tls = Some(dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?);
    let src = d.source().await?;
    let mut gen = CitizenGen::new(17);
    let mut ids = insert_citizens(&src, &mut gen, 2_000).await?;
    let mut changes = 1 + 2_000u64;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let writer = d.source().await?;
    let big = tokio::spawn(async move { big_insert_txn(&writer, 870_000_000_000, 20_000).await });
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 30).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.agent.as_mut().expect("agent").kill9();
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    changes += big.await??;
    d.start_agent()?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(180)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}
