//! The spool, not the province's WAL, absorbs outages, within its limit: a full spool pauses capture
//! (the slot then holds WAL) and says so; an idle captured database does not pin WAL.

use std::time::{Duration, Instant};

use dongbo_tests::citizens::{insert_citizens, CitizenGen, CITIZENS_DDL};
use dongbo_tests::Deployment;

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
async fn a_full_spool_pauses_capture_then_resumes_when_the_hub_drains_it() -> anyhow::Result<()> {
    let mut d = Deployment::new("spoolfull", CITIZENS_DDL, &["public.citizens"]).await?;
    d.spool_extra = "max_bytes = 1048576\nbatch_max_changes = 500".into();
    let src = d.source().await?;
    let mut gen = CitizenGen::new(5);
    insert_citizens(&src, &mut gen, 100).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    d.hub.as_mut().expect("hub").kill9();
    // About 8 MiB of changes against a 1 MiB spool.
    let mut changes = 1 + 100;
    for _ in 0..20 {
        changes += insert_citizens(&src, &mut gen, 1_000).await?.len() as i64;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.agent.as_ref().expect("agent").log_text().contains("spool is full: capture paused") {
        anyhow::ensure!(Instant::now() < deadline, "the agent did not say its spool is full");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Paused: after the last feedback for what was spooled (every second here), the slot stops
    // advancing, so the server keeps the WAL the spool has no room for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = slot_lsn(&src).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(slot_lsn(&src).await?, held, "a paused capture must not release WAL it has not spooled");
    let end: i64 = src.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await?.get(0);
    assert!(held < end, "the slot holds the WAL that did not fit");
    d.start_hub().await?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(120)).await?;
    d.wait_applied(changes, Duration::from_secs(30)).await?;
    assert!(d.agent.as_ref().expect("agent").log_text().contains("spool has room again: capture resumed"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_captured_table_does_not_pin_the_servers_wal() -> anyhow::Result<()> {
    let setup = format!("{CITIZENS_DDL}\nCREATE TABLE audit_trail (id bigserial PRIMARY KEY, what text);");
    let mut d = Deployment::new("idleslot", &setup, &["public.citizens"]).await?;
    d.start_hub().await?;
    d.start_agent()?;
    d.wait_same("citizens", "citizen_id", Duration::from_secs(60)).await?;
    let src = d.source().await?;
    let before = slot_lsn(&src).await?;
    // Activity on a table dongbo does not capture still produces WAL.
    for _ in 0..20 {
        src.batch_execute("INSERT INTO audit_trail (what) SELECT 'ghi nhận ' || g FROM generate_series(1, 500) g")
            .await?;
    }
    let end: i64 = src.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await?.get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_lsn(&src).await? < end {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the slot stayed at {} (from {before}) while the server moved to {end}",
            slot_lsn(&src).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, applied, _) = d.applied().await?;
    assert_eq!(applied, 1, "only the snapshot's truncate marker: nothing captured from the other table");
    Ok(())
}
