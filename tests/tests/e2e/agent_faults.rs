//! Faults injected inside the agent's own windows (`DONGBO_FAULT`), each recovered with nothing lost
//! or applied twice: a crash between deleting acknowledged spool segments and the end of the ack,
//! and a shipper that dies while capture goes on.

use std::time::{Duration, Instant};

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

/// Waits until the source's slot has released everything written so far: it is in the spool.
async fn wait_spooled(d: &Deployment) -> anyhow::Result<()> {
    let src = d.source().await?;
    let end: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: bool = src
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots",
                &[&end],
            )
            .await?
            .get(0);
        if done {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent did not spool up to {end} within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_the_spool_deletes_acknowledged_segments_loses_nothing() -> anyhow::Result<()> {
    let mut d = Deployment::new("spoolack", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(41);
    insert_citizens(&src, &mut gen, 100).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;

    // With the hub away, 200 changes wait in the agent's current segment.
    if let Some(h) = d.hub.as_mut() {
        h.kill9();
    }
    insert_citizens(&src, &mut gen, 200).await?;
    wait_spooled(&d).await?;
    if let Some(a) = d.agent.as_mut() {
        a.stop();
    }
    // Restarted, the agent appends to a new segment; the hub's ack frees the old one, and the
    // agent dies right after deleting it.
    d.start_hub().await?;
    d.start_agent_with_env(&[("DONGBO_FAULT", "spool-ack-released")])?;
    let agent = d.agent.as_mut().expect("agent started");
    let status = agent.wait_exit(Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "the fault did not fire: {:?}", status);
    assert!(agent.log_text().contains("crashing at spool-ack-released"));
    // Every batch the spool still lists must read back: the Kafka shipper, which starts from the
    // spool's first batch rather than the hub's position, would otherwise die on a missing file.
    {
        let spool = dongbo_agent::spool::Spool::open(&d.dir.join("spool"), 1 << 30)?;
        let left = spool.batches_after(0, usize::MAX);
        assert!(left.is_ok(), "the spool lists a batch whose segment was deleted: {:?}", left.err());
    }

    d.start_agent()?;
    insert_citizens(&src, &mut gen, 50).await?;
    let rows = d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    assert_eq!(rows, 350);
    // 1 truncate + 100 snapshot rows + 250 inserts, each applied once.
    d.wait_applied(351, Duration::from_secs(30)).await?;
    d.ensure_alive()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shipper_stops_the_agent_at_once_and_a_restart_delivers_everything() -> anyhow::Result<()> {
    let mut d = Deployment::new("deadship", CITIZENS_DDL, &["public.citizens"]).await?;
    let src = d.source().await?;
    let mut gen = CitizenGen::new(42);
    insert_citizens(&src, &mut gen, 100).await?;
    d.start_hub().await?;
    d.start_agent_with_env(&[("DONGBO_FAULT", "shipper-dies")])?;
    let agent = d.agent.as_mut().expect("agent started");
    // The shipper dies after its first acknowledgement; capture alone must not go on.
    let status = agent.wait_exit(Duration::from_secs(30));
    let log = agent.log_text();
    assert!(status.is_some_and(|s| !s.success()), "the agent kept running without a shipper:\n{log}");
    assert!(log.contains("the shipper stopped while capture was running"), "{log}");

    insert_citizens(&src, &mut gen, 100).await?;
    d.start_agent()?;
    insert_citizens(&src, &mut gen, 100).await?;
    assert_eq!(d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?, 300);
    d.wait_applied(301, Duration::from_secs(30)).await?;
    Ok(())
}
