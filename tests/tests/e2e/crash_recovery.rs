//! `kill -9` of the agent or the hub mid-stream: after a restart the NDC equals the source and every
//! change was applied exactly once (counted by the hub in the same transaction as the rows). These
//! run over mutual TLS (certificates from `dongbo-hub certs`), as production does.

use std::time::Duration;

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::workload::{big_insert_txn, mixed_small_txns};
use dongbo_tests::Deployment;

async fn deployment_after_snapshot(
    name: &str,
    rows: usize,
) -> anyhow::Result<(Deployment, CitizenGen, Vec<String>, u64)> {
    let mut d = Deployment::new(name, CITIZENS_DDL, &["public.citizens"]).await?;
    d.tls = Some(dongbo_tests::tls::TestPki::new(&d.dir.join("pki"))?);
    let src = d.source().await?;
    let mut gen = CitizenGen::new(3);
    let ids = insert_citizens(&src, &mut gen, rows).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    Ok((d, gen, ids, 1 + rows as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_stream_resumes_without_loss_or_duplicates() -> anyhow::Result<()> {
    let (mut d, mut gen, mut ids, mut changes) = deployment_after_snapshot("agentkill", 2_000).await?;
    let src = d.source().await?;
    let writer_src = d.source().await?;
    // A large transaction in flight while the agent dies: part of it may be spooled, part not.
    let big = tokio::spawn(async move { big_insert_txn(&writer_src, 800_000_000_000, 30_000).await });
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 30).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.agent.as_mut().expect("agent").kill9();
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 30).await?;
    changes += big.await??;
    d.start_agent()?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    // And once more, while it catches up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.agent.as_mut().expect("agent").kill9();
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(180)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_killed_mid_apply_restarts_without_loss_or_duplicates() -> anyhow::Result<()> {
    let (mut d, mut gen, mut ids, mut changes) = deployment_after_snapshot("hubkill", 2_000).await?;
    let src = d.source().await?;
    changes += big_insert_txn(&src, 810_000_000_000, 40_000).await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    // The hub is applying the 40 000-row transaction now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    d.hub.as_mut().expect("hub").kill9();
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 30).await?;
    d.start_hub().await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 20).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.hub.as_mut().expect("hub").kill9();
    d.start_hub().await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(180)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}

async fn slot_lsn(src: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let r = src
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = 'dongbo'",
            &[],
        )
        .await?;
    Ok(r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_down_for_a_while_the_spool_absorbs_then_drains() -> anyhow::Result<()> {
    let (mut d, mut gen, mut ids, mut changes) = deployment_after_snapshot("huboutage", 1_000).await?;
    let src = d.source().await?;
    d.hub.as_mut().expect("hub").kill9();
    let (_, applied_before, _) = d.applied().await?;
    let before = slot_lsn(&src).await?;
    changes += big_insert_txn(&src, 820_000_000_000, 10_000).await?;
    changes += mixed_small_txns(&src, &mut gen, &mut ids, 50).await?;
    // With the hub down, the slot still advances: the spool, not the province's WAL, holds the backlog.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = slot_lsn(&src).await?;
        if now > before {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the slot did not advance while the hub was down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, applied_during, _) = d.applied().await?;
    assert_eq!(applied_during, applied_before, "nothing can be applied while the hub is down");
    let log = d.agent.as_ref().expect("agent").log_text();
    assert!(log.contains("link to hub down"), "the agent says the link is down");
    d.start_hub().await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await?;
    d.wait_applied(changes as i64, Duration::from_secs(30)).await?;
    Ok(())
}
